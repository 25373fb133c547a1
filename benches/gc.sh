#!/usr/bin/env bash
# Space reclamation: Cairn's prune + gc against `restic forget --prune` on the same data, and
# Cairn's repacking threshold.
#
# One seeded sample image; ROUNDS times: 10% of it overwritten at a random place (contiguous),
# then a backup by each tool (cairn: an encrypted vault; restic). Then each keeps the last 2
# backups and frees the rest: `cairn-agent prune --keep-last 2 --grace 0` then `cairn-agent
# gc`; `restic forget --keep-last 2 --prune` (restic's defaults: repack when more than 5% of
# the repository is unused). Reports wall time, peak RSS and the repository before and after.
# Then the Cairn vault as it was before gc is copied once per threshold and collected with
# `gc --repack-below P` for P in THRESHOLDS: time, bytes freed, bytes rewritten.
#
# Settings: SIZE=1G ROUNDS=10 THRESHOLDS="0 25 50 75 90" BENCH_DIR= KEEP=0 CAIRN_AGENT=
#   CHANGE=contiguous   contiguous: 10% of the image overwritten in one run per round;
#                       scattered: 3% of its 4 KiB blocks overwritten at random places per round
#                       (old packs then hold a mix of live and dead chunks: repacking matters)
# Example: SIZE=256M ROUNDS=6 benches/gc.sh      (results in $BENCH_DIR/results.md)
set -euo pipefail
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)
SIZE=${SIZE:-1G}
ROUNDS=${ROUNDS:-10}
THRESHOLDS=${THRESHOLDS:-0 25 50 75 90}
KEEP=${KEEP:-0}
CHANGE=${CHANGE:-contiguous}
die() { echo "gc.sh: error: $*" >&2; exit 1; }
note() { echo "gc.sh: $*" >&2; }
command -v restic >/dev/null || { [[ $(id -u) == 0 ]] && apt-get install -y -q restic >/dev/null; } || die "install restic"
command -v /usr/bin/time >/dev/null || apt-get install -y -q time >/dev/null || die "install time"
AGENT=${CAIRN_AGENT:-$REPO_ROOT/target/release/cairn-agent}
[[ -x $AGENT ]] || (cd "$REPO_ROOT" && cargo build --release -q -p cairn-agent)
DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/cairn-gc.XXXXXX)}
mkdir -p "$DIR"
[[ $KEEP == 1 ]] || trap 'rm -rf "$DIR/img" "$DIR/cairn" "$DIR/restic" "$DIR"/t-*' EXIT
cd "$DIR"
export RESTIC_PASSWORD=bench CAIRN_PASSPHRASE=bench RESTIC_CACHE_DIR="$DIR/restic-cache"
bytes() { du -sb "$1" | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
# timed NAME CMD...: wall seconds and peak RSS (KiB) into $NAME.t
timed() {
    local name=$1; shift
    sync
    /usr/bin/time -f "%e %M" -o "$name.t" "$@" >"$name.out" 2>"$name.err" || { cat "$name.err" >&2; die "$name failed"; }
}

note "sample image of $SIZE, $ROUNDS rounds, in $DIR"
"$AGENT" sample create img --size "$SIZE" --seed 7 >/dev/null
size_bytes=$(stat -c %s img)
"$AGENT" init --vault cairn --passphrase-file <(echo bench) >/dev/null 2>&1 || "$AGENT" init --vault cairn >/dev/null
restic init --repo restic -q
for r in $(seq 1 "$ROUNDS"); do
    if [[ $CHANGE == scattered ]]; then
        "$AGENT" sample mutate img --fraction 0.03 --seed "$r" >/dev/null
    else
        len=$((size_bytes / 10))
        off=$(( (r * 7919 % 9) * size_bytes / 10 ))
        "$AGENT" sample mutate img --range "$off:$len" --seed "$r" >/dev/null
    fi
    "$AGENT" backup --vault cairn --vm bench --disk d=img >/dev/null
    restic --repo restic backup -q img >/dev/null
done
cairn_before=$(bytes cairn); restic_before=$(bytes restic)
cp -a cairn cairn-pristine
timed cairn-prune "$AGENT" prune --vault cairn --keep-last 2 --grace 0
timed cairn-gc "$AGENT" gc --vault cairn
timed restic-prune restic --repo restic forget -q --keep-last 2 --prune
cairn_after=$(bytes cairn); restic_after=$(bytes restic)
read -r cp_s cp_kb < cairn-prune.t; read -r cg_s cg_kb < cairn-gc.t; read -r rp_s rp_kb < restic-prune.t
"$AGENT" verify --vault cairn >/dev/null || die "cairn verify failed after gc"
restic --repo restic check -q || die "restic check failed after prune"
{
    echo "## Space reclamation: $SIZE image, $ROUNDS backups of $CHANGE changes, keep the last 2"
    echo
    echo "| tool | repository before | after | freed | time | peak RSS |"
    echo "|---|---|---|---|---|---|"
    printf "| cairn prune + gc | %s MiB | %s MiB | %s MiB | %.2f s + %.2f s | %d / %d MiB |\n" \
        "$(mib "$cairn_before")" "$(mib "$cairn_after")" "$(mib $((cairn_before - cairn_after)))" "$cp_s" "$cg_s" $((cp_kb / 1024)) $((cg_kb / 1024))
    printf "| restic forget --prune | %s MiB | %s MiB | %s MiB | %.2f s | %d MiB |\n" \
        "$(mib "$restic_before")" "$(mib "$restic_after")" "$(mib $((restic_before - restic_after)))" "$rp_s" $((rp_kb / 1024))
    echo
    echo "## Cairn's repack threshold (the same vault before gc, collected once per threshold)"
    echo
    echo "| --repack-below | gc time | vault after | freed | rewritten |"
    echo "|---|---|---|---|---|"
} > results.md
for p in $THRESHOLDS; do
    rm -rf "t-$p"; cp -a cairn-pristine "t-$p"
    "$AGENT" prune --vault "t-$p" --keep-last 2 --grace 0 >/dev/null
    before=$(bytes "t-$p")
    timed "gc-$p" "$AGENT" gc --json --vault "t-$p" --repack-below "$p"
    read -r s _ < "gc-$p.t"
    written=$(python3 -c "import json,sys; print(json.load(open('gc-$p.out'))['bytes_written'])")
    after=$(bytes "t-$p")
    printf "| %s%% | %.2f s | %s MiB | %s MiB | %s MiB |\n" "$p" "$s" "$(mib "$after")" "$(mib $((before - after)))" "$(mib "$written")" >> results.md
    rm -rf "t-$p"
done
rm -rf cairn-pristine
cat results.md
