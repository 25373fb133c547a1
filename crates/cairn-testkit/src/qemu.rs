//! A running QEMU for tests: disks attached as `-blockdev` nodes behind virtio devices, a QMP
//! socket, and writes through a device as a guest would make them (HMP `qemu-io -d`, which
//! goes through the device's block backend and so through any filter above the disk).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when `qemu-system-x86_64` can run here. Without it the test prints why and returns
/// false, unless `CAIRN_REQUIRE_GUEST` is set (CI sets it), where a skip would hide a test.
pub fn qemu_or_skip() -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    assert!(
        std::env::var_os("CAIRN_REQUIRE_GUEST").is_none(),
        "CAIRN_REQUIRE_GUEST is set but qemu-system-x86_64 cannot run"
    );
    eprintln!("skipped: qemu-system-x86_64 is not installed (Debian: qemu-system-x86)");
    false
}

/// One disk of a test VM.
pub struct TestDisk {
    /// Its image.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// The device id (`-device virtio-blk-pci,id=...`).
    pub id: String,
    /// The device: `virtio-blk-pci`, or `scsi-hd` (on a virtio-scsi controller; QEMU removes
    /// it at once on `device_del`, with no guest to agree, as a surprise removal).
    pub device: &'static str,
}

/// A QEMU process with no guest system (the firmware finds nothing to boot and waits): its
/// devices and block layer work as with a guest. Killed when dropped.
pub struct TestVm {
    child: Child,
    /// The QMP socket (for the code under test: QEMU serves one client per socket).
    pub qmp: PathBuf,
    /// A second QMP socket, for the test itself.
    pub harness: PathBuf,
    /// The folder of its sockets.
    pub dir: PathBuf,
}

impl TestVm {
    /// Starts QEMU with `disks`, its sockets in `dir`.
    pub fn start(dir: &Path, disks: &[TestDisk]) -> TestVm {
        let qmp = dir.join("qmp.sock");
        let harness = dir.join("harness.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "128"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", harness.display()));
        if disks.iter().any(|d| d.device == "scsi-hd") {
            cmd.args(["-device", "virtio-scsi-pci,id=scsi0"]);
        }
        for (i, d) in disks.iter().enumerate() {
            cmd.arg("-blockdev").arg(format!(
                "driver=file,filename={},node-name=file{i},aio=threads",
                d.path.display()
            ));
            cmd.arg("-blockdev").arg(format!("driver={},file=file{i},node-name=disk{i}", d.format));
            let bus = if d.device == "scsi-hd" { ",bus=scsi0.0" } else { "" };
            cmd.arg("-device").arg(format!("{},drive=disk{i},id={}{bus}", d.device, d.id));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64");
        let started = Instant::now();
        while !qmp.exists() || !harness.exists() {
            assert!(started.elapsed() < Duration::from_secs(30), "QEMU made no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        TestVm { child, qmp, harness, dir: dir.to_path_buf() }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills QEMU at once (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.kill();
    }
}
