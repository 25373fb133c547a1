#!/usr/bin/env bash
# Vault growth of a 1%-scattered incremental against the full backup, per block size.
#
#   SIZE=4G SIZES="16K 32K 64K 128K" benches/blocksize.sh
#
# Generates the seeded sample image once, then for each block size: a fresh vault, a full
# backup, 1% of the 4 KiB blocks overwritten at random offsets (the same seed each time), an
# incremental; prints the vault growth of each and their ratio, as a markdown table.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
agent="${CAIRN_AGENT:-$root/target/release/cairn-agent}"
[ -x "$agent" ] || (cd "$root" && cargo build --release -p cairn-agent)
size="${SIZE:-4G}"
sizes="${SIZES:-16K 32K 64K 128K}"
work="$(mktemp -d "${BENCH_DIR:-/var/tmp}/cairn-blocksize.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$agent" sample create "$work/pristine.img" --size "$size" --seed 1 >/dev/null
du_b() { du -sb "$1" | cut -f1; }
echo "| block size | full growth MiB | incremental growth MiB | incremental / full | full s | incremental s |"
echo "|---:|---:|---:|---:|---:|---:|"
for bs in $sizes; do
    cp --sparse=always "$work/pristine.img" "$work/disk.img"
    vault="$work/vault-$bs"
    "$agent" init --vault "$vault" --block-size "$bs" --no-encryption >/dev/null
    a=$(du_b "$vault"); t0=$(date +%s.%N)
    "$agent" backup --vault "$vault" --vm bench --disk disk="$work/disk.img" >/dev/null
    t1=$(date +%s.%N); b=$(du_b "$vault")
    "$agent" sample mutate "$work/disk.img" --fraction 0.01 --seed 2 >/dev/null
    t2=$(date +%s.%N)
    "$agent" backup --vault "$vault" --vm bench --disk disk="$work/disk.img" >/dev/null
    t3=$(date +%s.%N); c=$(du_b "$vault")
    awk -v bs="$bs" -v f=$((b - a)) -v i=$((c - b)) -v t0="$t0" -v t1="$t1" -v t2="$t2" -v t3="$t3" \
        'BEGIN { printf "| %s | %.1f | %.1f | %.1f%% | %.2f | %.2f |\n", bs, f/1048576, i/1048576, 100*i/f, t1-t0, t3-t2 }'
    rm -rf "$vault"
done
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(findmnt -no FSTYPE -T "$work") scratch; image: $size seeded sample (seed 1), change: 1% of 4 KiB blocks (seed 2)"
