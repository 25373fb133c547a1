#!/usr/bin/env bash
# A/B of two cairn-agent builds on the 1% scattered incremental: a fresh vault, a full backup
# of the seeded sample, 1% of its 4 KiB pieces overwritten, then the timed incremental (with
# sync), alternating the builds round after round. Prints wall time, vault growth and patched
# blocks per round. See docs/performance.md.
#
#   OLD=path/to/old/cairn-agent NEW=target/release/cairn-agent SIZE=4G ROUNDS=3 benches/ab.sh
#   EXTRA="--threads 3" passes options to both incrementals.
#
# Build an older commit beside this one with, for example:
#   git worktree add /var/tmp/cairn-old COMMIT && (cd /var/tmp/cairn-old && cargo build --release -p cairn-agent)
set -euo pipefail
REPO=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
NEW=${NEW:-$REPO/target/release/cairn-agent}
OLD=${OLD:?set OLD to the cairn-agent binary to compare against}
SIZE=${SIZE:-4G}
ROUNDS=${ROUNDS:-3}
DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/cairn-ab.XXXXXX)}
cd "$DIR"
[ -f base.img ] || "$NEW" sample create base.img --size "$SIZE" --seed 1 >/dev/null
for round in $(seq "$ROUNDS"); do
    for which in old new; do
        bin=$OLD; [ "$which" = new ] && bin=$NEW
        rm -rf vault disk.img; cp --sparse=always base.img disk.img; sync
        # Plaintext on both sides (a binary from before encryption knows no --no-encryption).
        "$bin" init --vault vault --no-encryption >/dev/null 2>&1 || "$bin" init --vault vault >/dev/null
        "$bin" backup --vault vault --vm v --disk os=disk.img >/dev/null; sync
        "$bin" sample mutate disk.img --fraction 0.01 --seed 2 >/dev/null; sync
        cat disk.img >/dev/null
        before=$(du -sb vault | cut -f1)
        start=$(date +%s.%N)
        # shellcheck disable=SC2086
        "$bin" backup --json --vault vault --vm v --disk os=disk.img ${EXTRA:-} >incr.json; sync
        end=$(date +%s.%N)
        after=$(du -sb vault | cut -f1)
        patched=$(python3 -c "import json; print(json.load(open('incr.json'))['disks']['os']['stats']['patched_blocks'])")
        printf '%s round %s: incremental %.2f s, vault +%.1f MiB, %s blocks patched\n' "$which" "$round" \
            "$(echo "$end - $start" | bc)" "$(echo "($after - $before) / 1048576" | bc -l)" "$patched"
    done
done
echo "scratch folder: $DIR"
