#!/usr/bin/env bash
# Restores against peers: throughput of a whole restore, and the time to the first byte of
# the disk image, for Cairn (encrypted vault), restic and borg (repokey-blake2), on one seeded
# sample image backed up once by each.
#
#   SIZE=2G RUNS=3 BENCH_DIR=/var/tmp/restore-bench benches/restore.sh
#
# Whole restore: `cairn-agent restore`, `restic restore` (`--sparse` where it has it),
# `borg extract --sparse`,
# each followed by `sync` and checked with `cmp`; page cache warm (the repository read once
# before), median of RUNS. Time to first byte: Cairn starts `serve-nbd` on a unix socket and
# `qemu-io` reads the first 4 KiB through it (polled every 10 ms: the figure is the time from
# the start of `serve-nbd` to the end of that read); restic `dump` and `borg extract --stdout`
# piped into `head -c 4096`. Prints a Markdown table; installs restic, borgbackup and
# qemu-utils from Debian when missing (as root).
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-2G}
RUNS=${RUNS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp/restore-bench}

source "$REPO_ROOT/scripts/apt.sh"
missing=()
command -v restic >/dev/null || missing+=(restic)
command -v borg >/dev/null || missing+=(borgbackup)
command -v qemu-io >/dev/null || missing+=(qemu-utils)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"

AGENT=${CAIRN_AGENT:-$REPO_ROOT/target/release/cairn-agent}
if [[ ! -x $AGENT ]]; then
    (cd "$REPO_ROOT" && cargo build --release -q -p cairn-agent)
fi

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench RESTIC_CACHE_DIR=$BENCH_DIR/cache/restic
export BORG_BASE_DIR=$BENCH_DIR/cache/borg
"$AGENT" sample create disk.img --size "$SIZE" --seed 7 >/dev/null
bytes=$(stat -c %s disk.img)

"$AGENT" init --vault cairn --key-file cairn.key >/dev/null
"$AGENT" backup --vault cairn --key-file cairn.key --vm bench --disk disk=disk.img >/dev/null
restic init -r restic -q >/dev/null
restic -r restic backup -q disk.img >/dev/null
borg init --encryption=repokey-blake2 borg >/dev/null 2>&1
borg create borg::full disk.img >/dev/null 2>&1

now() { date +%s.%N; }
# Debian's restic 0.14 has no --sparse (it writes zeros in full); newer ones do.
RESTIC_SPARSE=()
if restic restore --help 2>/dev/null | grep -q -- '--sparse'; then RESTIC_SPARSE=(--sparse); fi
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", b - a }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
warm() { find "$1" -type f -exec cat {} + >/dev/null; }

restore_once() { # restore_once TOOL: seconds for a whole restore, checked
    local out=$BENCH_DIR/out.$1 t0 t1 file
    rm -rf "$out" && mkdir -p "$out"
    warm "$BENCH_DIR/$1"
    sync
    t0=$(now)
    case $1 in
    cairn) "$AGENT" restore --vault cairn --key-file cairn.key --vm bench --disk disk --to "$out/disk.img" >/dev/null ;;
    restic) restic -r restic restore latest --target "$out" "${RESTIC_SPARSE[@]}" -q >/dev/null ;;
    borg) (cd "$out" && borg extract --sparse "$BENCH_DIR/borg::full") ;;
    esac
    sync
    t1=$(now)
    file=$(find "$out" -type f -name disk.img)
    cmp -s "$file" disk.img || { echo "$1: restored image differs" >&2; exit 1; }
    rm -rf "$out"
    seconds "$t0" "$t1"
}

first_byte_once() { # first_byte_once TOOL: seconds until the first 4 KiB of the image are read
    local t0 t1
    warm "$BENCH_DIR/$1"
    case $1 in
    cairn)
        rm -f nbd.sock
        t0=$(now)
        "$AGENT" serve-nbd --vault cairn --key-file cairn.key --vm bench --disk disk --socket nbd.sock >/dev/null 2>&1 &
        local server=$!
        until qemu-io -r -f raw -c 'read 0 4096' "nbd+unix:///disk?socket=$BENCH_DIR/nbd.sock" >/dev/null 2>&1; do
            sleep 0.01
        done
        t1=$(now)
        kill "$server" && wait "$server" 2>/dev/null || true
        ;;
    restic)
        t0=$(now)
        { restic -r restic dump latest "$BENCH_DIR/disk.img" 2>/dev/null || true; } | head -c 4096 >/dev/null
        t1=$(now)
        ;;
    borg)
        t0=$(now)
        { borg extract --stdout borg::full disk.img 2>/dev/null || true; } | head -c 4096 >/dev/null
        t1=$(now)
        ;;
    esac
    seconds "$t0" "$t1"
}

echo "| tool | restore s (median of $RUNS) | MB/s | first 4 KiB s (median of $RUNS) |"
echo "|---|---|---|---|"
for tool in cairn restic borg; do
    r=$(for _ in $(seq "$RUNS"); do restore_once "$tool"; done | median)
    f=$(for _ in $(seq "$RUNS"); do first_byte_once "$tool"; done | median)
    rate=$(awk -v b="$bytes" -v s="$r" 'BEGIN { printf "%.0f", b / s / 1e6 }')
    echo "| $tool | $r | $rate | $f |"
done
echo
echo "Image: $SIZE seeded sample ($(du -h --apparent-size disk.img | cut -f1) apparent, $(du -h disk.img | cut -f1) allocated)."
echo "restic restores $( ((${#RESTIC_SPARSE[@]})) && echo "with --sparse" || echo "without --sparse (not in this version): it writes the zeros")."
echo "Versions: $("$AGENT" --version), restic $(restic version | awk '{ print $2 }'), borg $(borg --version | awk '{ print $2 }')."
