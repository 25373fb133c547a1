#!/usr/bin/env bash
# The whole test suite, as the README promises: installs what the tests need, then runs
# formatting, lints, every test (root-only tests included when run as root), doc tests,
# a build of the benchmarks and a compile check of the fuzz targets.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

source scripts/apt.sh

step "toolchain"
cargo --version
rustc --version

if [ "$(id -u)" = 0 ]; then
    # Root-only tests (a small tmpfs for the full-file-system test) must run, not skip.
    export CAIRN_REQUIRE_ROOT_TESTS=1
    # Snapshot tests: XFS (reflink) and btrfs loop mounts, an ext4 guest, fsfreeze, e2fsck;
    # strip makes the in-guest hook small enough to copy into the test guest.
    missing=()
    for tool in mount:mount losetup:mount fsfreeze:util-linux mkfs.xfs:xfsprogs \
                mkfs.btrfs:btrfs-progs mkfs.ext4:e2fsprogs e2fsck:e2fsprogs strip:binutils; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    losetup -f >/dev/null || { echo "no free loop device: the snapshot tests need two" >&2; exit 1; }
else
    echo "not root: tests that need root will report 'skipped: needs root'"
fi

# Running VMs: QEMU itself (Debian's qemu-system-x86, 7.2 on bookworm). It goes first: on a
# machine with a newer qemu-utils from backports, installing it replaces qemu-utils, which the
# next step then installs again at QEMU's own version. The live-VM tests must not skip here.
if ! command -v qemu-system-x86_64 >/dev/null; then
    apt_install qemu-system-x86
fi
export CAIRN_REQUIRE_GUEST=1

# qcow2 and changed-block tracking: qemu-img, qemu-io and qemu-nbd serve the images, libnbd's
# nbdinfo reads the same exports independently. These tests run as any user.
missing=()
# systemd-analyze checks the unit `cairn-agent install` writes (systemd need not run);
# openssl makes the coordinator's test CA and certificate; headless chromium loads the dashboard.
# sfdisk, mkfs.ext4 and mkfs.xfs make the partitioned disks file-level recovery reads.
for tool in qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils nbdinfo:libnbd-bin \
            systemd-analyze:systemd openssl:openssl chromium:chromium \
            sfdisk:fdisk mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi

step "object-store emulators (Azurite, moto_server), on loopback"
# The vault conformance suite runs on S3 and Azure Blob as well as local and memory vaults;
# a skip would hide it, so the tests fail if the emulators are not there.
source scripts/object-stores.sh
start_object_stores
trap stop_object_stores EXIT
export CAIRN_REQUIRE_OBJECT_STORES=1

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

if rustup target list --installed 2>/dev/null | grep -q x86_64-pc-windows-gnu \
    && command -v x86_64-w64-mingw32-gcc >/dev/null; then
    step "cargo clippy for Windows (the VSS backend; compiled, never run here)"
    cargo clippy --target x86_64-pc-windows-gnu -p cairn-snapshot -- -D warnings
fi

step "cargo test (unit, integration and doc tests)"
cargo test --workspace --all-targets
cargo test --workspace --doc

step "examples (embedding the job, the engine alone), on small data"
cargo run -q -p cairn-backup --example vm_backup
cargo run -q -p cairn-delta --example diff_files

step "no failpoints outside the tests"
# The freeze-path failpoints (CAIRN_FAILPOINT) exist only in the binary the agent's own tests
# build (a dev-dependency turns them on); a build without dev-dependencies must not have them.
cargo build -p cairn-agent
if grep -q CAIRN_FAILPOINT target/debug/cairn-agent; then
    echo "target/debug/cairn-agent (built without dev-dependencies) reads CAIRN_FAILPOINT" >&2
    exit 1
fi

step "cargo bench --no-run"
cargo bench --workspace --no-run

step "fuzz targets compile (stable; running them needs nightly and cargo-fuzz)"
(cd fuzz && cargo check --bins)

step "cargo deny check bans licenses sources"
if ! command -v cargo-deny >/dev/null; then
    cargo install --locked cargo-deny
fi
cargo deny check bans licenses sources

step "dependency direction"
# The pure crates never depend on tokio or object_store; backup never depends on a scheduler.
for crate in cairn-format cairn-delta cairn-sample cairn-nbd cairn-qemu; do
    if cargo tree -p "$crate" -e normal --prefix none | grep -Eq '^(tokio|object_store) '; then
        echo "$crate must not depend on tokio or object_store" >&2
        exit 1
    fi
done
# Snapshots know how to capture disks, not how to read or store them: no engine, no vault,
# no runtime.
if cargo tree -p cairn-snapshot -e normal --prefix none \
    | grep -Eq '^(tokio|object_store|cairn-delta|cairn-vault|cairn-backup) '; then
    echo "cairn-snapshot must not depend on tokio, object_store, the engine, the vault or the job" >&2
    exit 1
fi
# File-level recovery reads a volume through the ReadAt it is handed: no runtime, no vault.
if cargo tree -p cairn-files -e normal --prefix none \
    | grep -Eq '^(tokio|object_store|cairn-vault|cairn-backup) '; then
    echo "cairn-files must not depend on tokio, object_store, the vault or the job" >&2
    exit 1
fi
# The coordinator side and the agent side never depend on each other.
if cargo tree -p cairn-scheduler -e normal --prefix none | grep -Eq '^cairn-backup '; then
    echo "cairn-scheduler must not depend on cairn-backup" >&2
    exit 1
fi
if cargo tree -p cairn-backup -e normal --prefix none | grep -Eq '^cairn-scheduler '; then
    echo "cairn-backup must not depend on cairn-scheduler" >&2
    exit 1
fi
# The long-running agent's loop knows the coordinator only through the protocol, and backups
# only through the runner the binary hands it.
if cargo tree -p cairn-worker -e normal --prefix none \
    | grep -Eq '^(cairn-scheduler|cairn-backup|cairn-vault|object_store) '; then
    echo "cairn-worker must not depend on the scheduler, the job, the vault or object_store" >&2
    exit 1
fi
# The scheduler decides when vault work runs; the keeper it is handed (cairn-upkeep) does it.
if cargo tree -p cairn-scheduler -e normal --prefix none \
    | grep -Eq '^(cairn-backup|cairn-vault|object_store) '; then
    echo "cairn-scheduler must not depend on the job, the vault or object_store" >&2
    exit 1
fi

echo
echo "all checks passed"
