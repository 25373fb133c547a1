#!/usr/bin/env bash
# Booting a guest straight from its point in a vault on S3 (moto_server on loopback), with and
# without the prefetch of the blocks a guest read first at an earlier boot.
#
#   sudo benches/boot.sh          # needs root (the guest image is built with mmdebstrap)
#
# The Debian guest of the running-VM tests (scripts/guest-image.sh) is backed up into an S3
# vault; then it boots three times under QEMU (TCG, 512 MiB, one vCPU) from a qcow2 overlay
# whose backing file is `serve-nbd`'s export: first with --record-reads (noting its reads),
# then with the prefetch (the default), then with --no-prefetch. Each boot is timed from
# QEMU's start to the guest agent's first answer. Prints one line per boot.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO_ROOT"
AGENT=${CAIRN_AGENT:-$REPO_ROOT/target/release/cairn-agent}
[[ -x $AGENT ]] || cargo build --release -q -p cairn-agent
cache=$(bash scripts/guest-image.sh | tail -n 1)
source scripts/object-stores.sh
start_object_stores >&2
work=$(mktemp -d /var/tmp/cairn-boot.XXXXXX)
trap 'stop_object_stores; rm -rf "$work"' EXIT
vault="$CAIRN_TEST_S3/boot-$$"
"$AGENT" init --vault "$vault" --no-encryption >/dev/null
cp --sparse=always "$cache/guest.raw" "$work/os.raw"
"$AGENT" backup --vault "$vault" --vm guest --disk "os=$work/os.raw" >/dev/null

# Waits for the guest agent on socket $1 to answer a ping; at most 600 s.
wait_agent() {
    python3 - "$1" <<'PYEOF'
import json, socket, sys, time
deadline = time.time() + 600
while time.time() < deadline:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(sys.argv[1])
        s.sendall(b'{"execute":"guest-ping"}\n')
        if b"return" in s.recv(4096):
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("the guest agent did not answer")
PYEOF
}

boot() { # boot TAG SERVE-NBD-FLAGS...
    local tag=$1 sock=$work/$1.sock qga=$work/$1.qga
    shift
    "$AGENT" serve-nbd --vault "$vault" --vm guest --disk os --socket "$sock" "$@" >"$work/$tag.out" 2>"$work/$tag.err" &
    local server=$!
    until [[ -S $sock ]]; do sleep 0.05; done
    qemu-img create -q -f qcow2 -b "nbd+unix:///os?socket=$sock" -F raw "$work/$tag.qcow2"
    local t0 t1
    t0=$(date +%s.%N)
    qemu-system-x86_64 -M q35 -accel tcg -m 512 -smp 1 -nodefaults -display none -no-reboot \
        -kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" \
        -append "root=/dev/vda1 rw console=ttyS0 quiet panic=-1" -serial "file:$work/$tag.console" \
        -blockdev "driver=file,filename=$work/$tag.qcow2,node-name=os-file" \
        -blockdev "driver=qcow2,file=os-file,node-name=os" \
        -device virtio-blk-pci,drive=os -chardev "socket,path=$qga,server=on,wait=off,id=qga0" \
        -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 &
    local qemu=$!
    wait_agent "$qga"
    t1=$(date +%s.%N)
    kill "$qemu" && wait "$qemu" 2>/dev/null || true
    kill -INT "$server" && wait "$server" || true
    printf '%s: the guest agent answered %.1f s after QEMU started; %s\n' "$tag" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" "$(grep -h '^served\|^prefetched' "$work/$tag.err" | tr '\n' ' ')"
}

boot recording --record-reads --no-prefetch
boot prefetched
boot without --no-prefetch
