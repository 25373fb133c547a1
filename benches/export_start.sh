#!/usr/bin/env bash
# How soon an export serves its first byte in a vault that many VMs share: the export loads
# its point's own pack indexes (the point's, then its VM's earlier points') and the rest of
# the vault's only on a miss, so its start should not grow with the vault.
#
#   OTHERS=24 SIZE=256M POINTS=4 RUNS=5 STORE=s3 benches/export_start.sh
#   EAGER_AGENT=/path/to/older/cairn-agent ...   # also time an agent that loads every index
#
# The vault (encrypted; STORE=local, or s3 on moto_server on loopback) holds OTHERS VMs, each
# with one seeded SIZE disk backed up POINTS times (1% changed between backups), and the VM
# `target` made the same way. Time to first byte: from the start of `serve-nbd --vm target`
# to the end of `qemu-io` reading its first 4 KiB (polled every 10 ms), median of RUNS; the
# block comes from target's first point, so the VM's earlier points are read too. Then the
# pack indexes the export loaded, from its own last line. Installs qemu-utils when missing.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
OTHERS=${OTHERS:-24}
SIZE=${SIZE:-256M}
POINTS=${POINTS:-4}
RUNS=${RUNS:-5}
STORE=${STORE:-local}
AGENT=${CAIRN_AGENT:-$REPO_ROOT/target/release/cairn-agent}
[[ -x $AGENT ]] || (cd "$REPO_ROOT" && cargo build --release -q -p cairn-agent)
source "$REPO_ROOT/scripts/apt.sh"
command -v qemu-io >/dev/null || apt_install qemu-utils

work=$(mktemp -d /var/tmp/cairn-export-start.XXXXXX)
cleanup() {
    [[ $STORE == s3 ]] && stop_object_stores
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
case $STORE in
local) vault=$work/vault ;;
s3)
    source "$REPO_ROOT/scripts/object-stores.sh"
    start_object_stores >&2
    vault="$CAIRN_TEST_S3/export-start-$$"
    ;;
*) echo "STORE is local or s3, not $STORE" >&2 && exit 2 ;;
esac
vault_args=(--vault "$vault" --key-file "$work/key")
"$AGENT" init "${vault_args[@]}" >/dev/null

fill() { # fill VM SEED: POINTS backups of one seeded disk, 1% changed between them
    "$AGENT" sample create "$work/$1.img" --size "$SIZE" --seed "$2" >/dev/null
    for p in $(seq "$POINTS"); do
        ((p == 1)) || "$AGENT" sample mutate "$work/$1.img" --fraction 0.01 --seed "$((p + $2 * 100))" >/dev/null
        "$AGENT" backup "${vault_args[@]}" --vm "$1" --disk "disk=$work/$1.img" >/dev/null
    done
    rm -f "$work/$1.img"
}
for n in $(seq "$OTHERS"); do fill "vm$n" "$n"; done
fill target 9999
echo "vault: $OTHERS other VMs and target, $POINTS points of one $SIZE disk each ($STORE)"

now() { date +%s.%N; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
first_byte_once() { # first_byte_once AGENT: seconds until the first 4 KiB are read
    local t0 t1 server
    rm -f nbd.sock
    t0=$(now)
    "$1" serve-nbd "${vault_args[@]}" --vm target --disk disk --socket nbd.sock --no-prefetch >/dev/null 2>serve.err &
    server=$!
    until qemu-io -r -f raw -c 'read 0 4096' "nbd+unix:///disk?socket=$work/nbd.sock" >/dev/null 2>&1; do
        sleep 0.01
    done
    t1=$(now)
    kill -INT "$server" && wait "$server" 2>/dev/null || true
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}
report() { # report NAME AGENT
    local t
    t=$(for _ in $(seq "$RUNS"); do first_byte_once "$2"; done | median)
    echo "$1: first 4 KiB after $t s (median of $RUNS); $(grep -o 'pack indexes loaded.*' serve.err || echo 'pack indexes: not reported')"
}
report focused "$AGENT"
[[ -z ${EAGER_AGENT:-} ]] || report "every index" "$EAGER_AGENT"
