#!/usr/bin/env bash
# Object-store vaults: backup and restore throughput to a local folder, moto (S3) and Azurite
# (Azure Blob), encrypted; then the cost of listing the points of a vault of many points and of
# loading its chunk map (a backup of an unchanged disk, which loads every pack index).
# The emulators are started by scripts/object-stores.sh on loopback; figures include their
# own cost (Python and Node.js servers), so they are a floor for the client, not a forecast
# for a real cloud.
#
# Settings: SIZE=1G (the sample disk), POINTS=100 (points of the listing vault), CAIRN_AGENT=
# (default target/release/cairn-agent, built if missing). Writes results.md in a temp folder.
set -euo pipefail
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)
SIZE=${SIZE:-1G}
POINTS=${POINTS:-100}
AGENT=${CAIRN_AGENT:-$REPO_ROOT/target/release/cairn-agent}
[[ -x $AGENT ]] || (cd "$REPO_ROOT" && cargo build --release -p cairn-agent)

cd "$REPO_ROOT"
# shellcheck source=../scripts/object-stores.sh
source scripts/object-stores.sh
WORK=$(mktemp -d /var/tmp/cairn-objstore.XXXXXX)
cleanup() {
    stop_object_stores
    rm -rf "$WORK/disk.img" "$WORK/local" "$WORK"/out-*
}
trap cleanup EXIT
start_object_stores >/dev/null

KEY=$WORK/vault.key
"$AGENT" sample create "$WORK/disk.img" --size "$SIZE" --seed 5 >/dev/null
sync

seconds() { # seconds COMMAND... : wall seconds of one run
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    echo "$end - $start" | bc
}

RESULTS=$WORK/results.md
{
    echo "### Object-store vaults: $SIZE sample disk, encrypted, emulators on loopback"
    echo
    echo "| backend | full backup s | MiB/s of disk | restore s | MiB/s |"
    echo "|---|---:|---:|---:|---:|"
} >"$RESULTS"
size_mib=$(($(stat -c %s "$WORK/disk.img") / 1048576))
for backend in local s3 azure; do
    case $backend in
    local) url=$WORK/local ;;
    s3) url=$CAIRN_TEST_S3/bench-$$ ;;
    azure) url=$CAIRN_TEST_AZURE/bench-$$ ;;
    esac
    rm -f "$KEY"
    "$AGENT" init --vault "$url" --key-file "$KEY" >/dev/null 2>&1
    b=$(seconds "$AGENT" backup --vault "$url" --key-file "$KEY" --vm bench --disk "disk=$WORK/disk.img")
    r=$(seconds "$AGENT" restore --vault "$url" --key-file "$KEY" --vm bench --disk disk --to "$WORK/out-$backend")
    cmp "$WORK/disk.img" "$WORK/out-$backend"
    rm -f "$WORK/out-$backend"
    printf '| %s | %.2f | %.0f | %.2f | %.0f |\n' "$backend" "$b" "$(echo "$size_mib / $b" | bc -l)" \
        "$r" "$(echo "$size_mib / $r" | bc -l)" >>"$RESULTS"
done

# Many points: one small disk changed a little between backups.
{
    echo
    echo "### A vault of $POINTS points (S3, moto): listing and loading the chunk map"
    echo
    echo "| step | s |"
    echo "|---|---:|"
} >>"$RESULTS"
url=$CAIRN_TEST_S3/many-$$
rm -f "$KEY"
"$AGENT" init --vault "$url" --key-file "$KEY" >/dev/null 2>&1
"$AGENT" sample create "$WORK/small.img" --size 64M --seed 9 >/dev/null
for i in $(seq 1 "$POINTS"); do
    "$AGENT" sample mutate "$WORK/small.img" --fraction 0.01 --seed "$i" >/dev/null
    "$AGENT" backup --vault "$url" --key-file "$KEY" --vm many --disk "disk=$WORK/small.img" >/dev/null
done
list=$(seconds "$AGENT" points --vault "$url" --key-file "$KEY" --vm many)
same=$(seconds "$AGENT" backup --vault "$url" --key-file "$KEY" --vm many --disk "disk=$WORK/small.img")
printf '| list %s points (`points --vm`) | %.2f |\n' "$POINTS" "$list" >>"$RESULTS"
printf '| backup of an unchanged 64 MiB disk (opens the vault, loads %s pack indexes, hashes the disk) | %.2f |\n' \
    "$POINTS" "$same" >>"$RESULTS"
echo >>"$RESULTS"
echo "Command: \`SIZE=$SIZE POINTS=$POINTS benches/objstore.sh\`; $(nproc) CPUs." >>"$RESULTS"
cat "$RESULTS"
