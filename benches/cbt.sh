#!/usr/bin/env bash
# Changed-block tracking on a qcow2 image: the same incremental with and without the bitmap.
#
# Per run: a seeded sample image converted to qcow2, a fresh vault, a full backup (which
# starts the image's dirty bitmap), then a copy of vault and image. The same writes go to
# both images; the copy's Cairn bitmaps are removed, so its backup falls back to a full hash
# scan against the same base point, while the original's reads only what its bitmap marks.
# Two workloads: 64 MiB contiguous, and 1% of the 4 KiB blocks at random offsets. Every
# timed step includes `sync`; page cache warm (the writes have just gone through it).
# Also: how many bytes bitmaps of 4 KiB, 64 KiB and 1 MiB granularity mark for the
# scattered writes (the bitmap granularity choice). Prints markdown tables of medians.
#
#   SIZE=4G RUNS=3 BENCH_DIR=/var/tmp/x benches/cbt.sh
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
SIZE=${SIZE:-4G}
RUNS=${RUNS:-3}
BENCH_DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/cairn-cbt.XXXXXX)}
AGENT=${CAIRN_AGENT:-$REPO_ROOT/target/release/cairn-agent}
for t in qemu-img qemu-io nbdinfo /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "cbt.sh: needs $t (Debian: qemu-utils, libnbd-bin, time)" >&2; exit 1; }
done
[[ -x $AGENT ]] || (cd "$REPO_ROOT" && cargo build --release -q -p cairn-agent)
mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"

# timed LABEL CMD...: runs CMD then sync; appends "LABEL wall user+sys maxrss_kib" to times.txt
timed() {
    local label=$1
    shift
    /usr/bin/time -f "$label %e %U %S %M" -a -o times.txt sh -c '"$@" && sync' sh "$@"
}

"$AGENT" sample create seed.raw --size "$SIZE" --seed 1 >/dev/null
size_bytes=$(stat -c %s seed.raw)
head -c $((64 << 20)) /dev/urandom > contiguous.bin
for i in $(seq 0 63); do head -c 4096 /dev/urandom > "piece$i.bin"; done

# The scattered workload: 1% of the 4 KiB blocks, at seeded random offsets.
python3 - "$size_bytes" > scattered.ops <<'PY'
import random, sys
size = int(sys.argv[1]); blocks = size // 4096
rng = random.Random(4)
for i, b in enumerate(sorted(rng.sample(range(blocks), blocks // 100))):
    print(f"write -s piece{i % 64}.bin {b * 4096} 4k")
PY
echo "write -s contiguous.bin $((size_bytes / 4)) 64M" > contiguous.ops

apply() { # apply OPSFILE IMAGE
    local args=() op
    while IFS= read -r op; do args+=(-c "$op"); done < "$1"
    qemu-io -f qcow2 "${args[@]}" "$2" >/dev/null
}

scanned() { sed -n 's/.*"bytes_scanned": *\([0-9]*\).*/\1/p' "$1" | paste -sd+ | bc; }

: > times.txt
: > scanned.txt
for run in $(seq 1 "$RUNS"); do
    for work in contiguous scattered; do
        rm -rf vault vault2 img.qcow2 img2.qcow2
        qemu-img convert -O qcow2 seed.raw img.qcow2
        "$AGENT" init --vault vault --no-encryption >/dev/null
        timed "full-qcow2" "$AGENT" backup --vault vault --vm vm --disk os=img.qcow2 >/dev/null
        cp -a vault vault2
        cp --reflink=auto img.qcow2 img2.qcow2
        apply "$work.ops" img.qcow2
        apply "$work.ops" img2.qcow2
        for b in $(qemu-img info --output=json img2.qcow2 | sed -n 's/.*"name": "\(cairn:[^"]*\)".*/\1/p'); do
            qemu-img bitmap --remove img2.qcow2 "$b"
        done
        sync
        timed "$work-cbt" "$AGENT" backup --json --vault vault --vm vm --disk os=img.qcow2 > cbt.json
        timed "$work-scan" "$AGENT" backup --json --vault vault2 --vm vm --disk os=img2.qcow2 > scan.json
        grep -q '"cbt"' cbt.json || { echo "cbt.sh: the tracked backup did not use its bitmap" >&2; exit 1; }
        echo "$work-cbt $(scanned cbt.json)" >> scanned.txt
        echo "$work-scan $(scanned scan.json)" >> scanned.txt
    done
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
col() { awk -v l="$1" -v c="$2" '$1==l {print $c}' "$3" | median; }
echo
echo "| $SIZE qcow2, median of $RUNS | wall s | CPU s | peak RSS MiB | bytes read |"
echo "|---|---|---|---|---|"
for l in full-qcow2 contiguous-cbt contiguous-scan scattered-cbt scattered-scan; do
    wall=$(col "$l" 2 times.txt)
    cpu=$(awk -v l="$l" '$1==l {print $3+$4}' times.txt | median)
    rss=$(( $(col "$l" 5 times.txt) / 1024 ))
    read_b=$(col "$l" 2 scanned.txt)
    printf '| %s | %s | %s | %s | %s |\n' "$l" "$wall" "$cpu" "$rss" "${read_b:--}"
done

# Bitmap granularity: bytes marked dirty by the scattered writes.
rm -f g.qcow2
qemu-img create -q -f qcow2 g.qcow2 "$size_bytes"
for g in 4096 65536 1048576; do qemu-img bitmap --add -g "$g" g.qcow2 "g$g"; done
apply scattered.ops g.qcow2
echo
echo "| granularity | bytes marked dirty by 1% scattered 4 KiB writes | x written |"
echo "|---|---|---|"
written=$(( $(wc -l < scattered.ops) * 4096 ))
qemu-nbd --persistent --shared=4 --read-only -f qcow2 --socket="$BENCH_DIR/g.sock" \
    -B g4096 -B g65536 -B g1048576 g.qcow2 >/dev/null 2>&1 &
nbd=$!
trap 'kill $nbd 2>/dev/null' EXIT
while [[ ! -S $BENCH_DIR/g.sock ]]; do sleep 0.05; done
for g in 4096 65536 1048576; do
    dirty=$(nbdinfo --map="qemu:dirty-bitmap:g$g" --totals "nbd+unix:///?socket=$BENCH_DIR/g.sock" \
        | awk '$3==1 {print $1}')
    echo "| $g | ${dirty:-0} | $(echo "scale=1; ${dirty:-0} / $written" | bc) |"
done
kill "$nbd"
