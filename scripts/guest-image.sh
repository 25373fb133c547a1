#!/usr/bin/env bash
# Builds the small Debian guest the running-VM tests boot under QEMU, from Debian's packages:
# a bookworm system with the cloud kernel, qemu-guest-agent (its fsfreeze hook on) and a
# workload that writes continuously (SQLite inserts and a log), in an ext4 file system on a
# GPT-partitioned raw image, plus the kernel and initrd to boot it with -kernel/-initrd.
# Cached outside the clone (CAIRN_GUEST_CACHE, default /var/cache/cairn-guest): built once,
# reused by every later run. Needs root (mmdebstrap's root mode) and network to a mirror.
# Prints the cache folder.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/apt.sh
cache="${CAIRN_GUEST_CACHE:-/var/cache/cairn-guest}"
version=3   # bump when what goes into the image changes
out="$cache/v$version"
if [ -f "$out/done" ]; then
    echo "$out"
    exit 0
fi
for tool in mmdebstrap:mmdebstrap sfdisk:fdisk mkfs.ext4:e2fsprogs sqlite3:sqlite3 debugfs:e2fsprogs; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [ -n "${missing[*]:-}" ]; then
    apt_install "${missing[@]}"
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/cairn-guest.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mmdebstrap --quiet --variant=minbase \
    --include=linux-image-cloud-amd64,systemd-sysv,udev,qemu-guest-agent,sqlite3,e2fsprogs,initramfs-tools,kmod \
    --customize-hook='
        cat > "$1/etc/fstab" <<FSTAB
/dev/vda1 / ext4 defaults,errors=remount-ro 0 1
FSTAB
        echo cairn-guest > "$1/etc/hostname"
        # The guest agent runs its fsfreeze hook around every freeze.
        mkdir -p "$1/etc/systemd/system/qemu-guest-agent.service.d"
        cat > "$1/etc/systemd/system/qemu-guest-agent.service.d/hook.conf" <<UNIT
[Unit]
ConditionPathExists=
[Service]
ExecStart=
ExecStart=/usr/sbin/qemu-ga --fsfreeze-hook=/etc/qemu/fsfreeze-hook
UNIT
        # The workload: a SQLite table taking inserts (one per transaction) and a log.
        cat > "$1/usr/local/bin/cairn-workload" <<SCRIPT
#!/bin/sh
mkdir -p /var/lib/work
sqlite3 /var/lib/work/db.sqlite "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(n INTEGER PRIMARY KEY, at TEXT, pad BLOB);" >/dev/null
n=\$(sqlite3 /var/lib/work/db.sqlite "SELECT coalesce(max(n), 0) FROM t;")
while true; do
    n=\$((n + 1))
    sqlite3 /var/lib/work/db.sqlite "INSERT INTO t VALUES(\$n, strftime(\"%Y-%m-%dT%H:%M:%f\", \"now\"), randomblob(4096));"
    echo "insert \$n \$(date +%s.%N)" >> /var/lib/work/log
done
SCRIPT
        chmod 755 "$1/usr/local/bin/cairn-workload"
        cat > "$1/etc/systemd/system/cairn-workload.service" <<UNIT
[Unit]
Description=Cairn test workload (SQLite inserts and a log)
After=local-fs.target
[Service]
ExecStart=/usr/local/bin/cairn-workload
Restart=always
[Install]
WantedBy=multi-user.target
UNIT
        # Quiet, quick boots: no getty on the serial console, no network wait.
        chroot "$1" systemctl mask serial-getty@ttyS0.service systemd-networkd-wait-online.service >/dev/null 2>&1 || true
        chroot "$1" systemctl enable qemu-guest-agent cairn-workload >/dev/null 2>&1
        cp "$1"/boot/vmlinuz-* "$1/../vmlinuz"
        cp "$1"/boot/initrd.img-* "$1/../initrd.img"
    ' \
    bookworm "$root" http://deb.debian.org/debian >&2
image="$work/guest.raw"
size_mib=1536
truncate -s "${size_mib}M" "$image"
printf 'label: gpt\nstart=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n' | sfdisk -q "$image"
part_blocks=$(( (size_mib - 2) * 256 ))
mkfs.ext4 -q -F -L root -E offset=1048576 -d "$root" "$image" "${part_blocks}" >&2
mkdir -p "$out"
cp "$work/vmlinuz" "$work/initrd.img" "$out/"
cp --sparse=always "$image" "$out/guest.raw"
touch "$out/done"
echo "$out"
