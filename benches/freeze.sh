#!/usr/bin/env bash
# How long a consistent capture stalls the guest: FIFREEZE to FITHAW, and the reflink view
# taken inside it, for an ext4 guest file system in a disk image on XFS (reflink), with an
# application writing to it. Root only (loop devices, mounts, fsfreeze).
#
#   sudo RUNS=10 SIZE=1G benches/freeze.sh
#
# Prints, per run, the freeze and view durations from the point's evidence and the backup's
# wall time, with scripts (application-consistent) and without (file-system-consistent).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
SIZE=${SIZE:-1G}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
command -v jq >/dev/null || apt-get install -y -qq jq >/dev/null

cargo build --release -q -p cairn-agent
agent=$PWD/target/release/cairn-agent
work=$(mktemp -d)
cleanup() {
    [ -n "${app:-}" ] && kill "$app" 2>/dev/null || true
    fsfreeze -u "$work/guest" 2>/dev/null || true
    umount "$work/guest" 2>/dev/null || true
    [ -n "${guest_loop:-}" ] && losetup -d "$guest_loop" || true
    umount "$work/xfs" 2>/dev/null || true
    [ -n "${xfs_loop:-}" ] && losetup -d "$xfs_loop" || true
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 4G "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
xfs_loop=$(losetup --find --show "$work/xfs.img")
mkdir -p "$work/xfs" "$work/guest" "$work/ctl"
mount "$xfs_loop" "$work/xfs"
truncate -s "$SIZE" "$work/xfs/guest.img"
mkfs.ext4 -q -F "$work/xfs/guest.img"
guest_loop=$(losetup --find --show "$work/xfs/guest.img")
mount "$guest_loop" "$work/guest"
# Some data in the guest, so the clone has extents to share.
head -c 256M /dev/urandom > "$work/guest/data.bin"

cat > "$work/app.sh" <<'EOF'
#!/bin/bash
d=$1; ctl=$2; n=0
while :; do
  if [ -e "$ctl/pause" ]; then touch "$ctl/paused"; while [ -e "$ctl/pause" ]; do sleep 0.01; done; rm -f "$ctl/paused"; fi
  n=$((n+1)); echo "record $n" >> "$d/records"; sha256sum < "$d/records" > "$d/records.sum"
done
EOF
cat > "$work/pre.sh" <<'EOF'
#!/bin/bash
touch "$1/pause"; for i in $(seq 2000); do [ -e "$1/paused" ] && exit 0; sleep 0.01; done; exit 1
EOF
printf '#!/bin/bash\nrm -f "$1/pause"\n' > "$work/post.sh"
chmod 700 "$work/pre.sh" "$work/post.sh"
cat > "$work/scripts.json" <<EOF
{"preScriptLocation": "$work/pre.sh", "postScriptLocation": "$work/post.sh",
 "preScriptParams": ["$work/ctl"], "postScriptParams": ["$work/ctl"]}
EOF
chmod 600 "$work/scripts.json"
for kind in scripts freeze; do
    {
        echo "vm = \"bench\""
        echo "[freeze]"
        echo "mounts = [\"$work/guest\"]"
        [ "$kind" = scripts ] && printf '[scripts]\nconfig = "%s"\n' "$work/scripts.json"
        printf '[[disk]]\nname = "root"\npath = "%s"\n' "$work/xfs/guest.img"
    } > "$work/$kind.toml"
    chmod 600 "$work/$kind.toml"
done

bash "$work/app.sh" "$work/guest" "$work/ctl" & app=$!
"$agent" init --vault "$work/vault" --no-encryption >/dev/null
printf '%-8s %4s %10s %10s %10s %10s %s\n' kind run freeze_ms fifreeze_ms view_ms backup_s consistency
for kind in scripts freeze; do
    for run in $(seq "$RUNS"); do
        start=$(date +%s.%N)
        m=$("$agent" --config "$work/$kind.toml" backup --json --vault "$work/vault")
        end=$(date +%s.%N)
        freeze=$(jq -r '.evidence[] | select(.kind=="freeze") | .details.freeze_ms' <<<"$m")
        calls=$(jq -r '.evidence[] | select(.kind=="freeze") | .details.freeze_calls_ms' <<<"$m")
        view=$(jq -r '.evidence[] | select(.kind=="view") | .message' <<<"$m" | grep -o '[0-9.]* ms' | cut -d' ' -f1)
        printf '%-8s %4s %10s %10s %10s %10.2f %s\n' "$kind" "$run" "$freeze" "$calls" "$view" \
            "$(echo "$end - $start" | bc)" "$(jq -r .consistency <<<"$m")"
    done
done
