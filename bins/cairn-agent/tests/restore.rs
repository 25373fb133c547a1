//! Disk restores, complete: every disk of a point at once to raw files (holes kept), one disk
//! to a qcow2 image (checked and compared by qemu-img), in place over a changed disk (only
//! what differs fetched and written), to a block device (zeros where the disk has none), and
//! past damaged chunks on request. Bad input: no --force, a target someone writes, the wrong
//! size, a mounted device.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use cairn_testkit::{Loop, Mount, root_or_skip, sh};
use support::{agent, ok, pack_files, tool};

/// Bytes of `path` the file system has allocated.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// A vault holding one point of VM `web` with disks `os` (128 MiB) and `data` (32 MiB).
struct Site {
    dir: tempfile::TempDir,
    vault: String,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let vault = dir.path().join("vault").to_str().unwrap().to_owned();
        ok(agent(&["init", "--vault", &vault]));
        let site = Site { dir, vault };
        ok(agent(&["sample", "create", &site.s("os.raw"), "--size", "128M", "--seed", "3"]));
        ok(agent(&["sample", "create", &site.s("data.raw"), "--size", "32M", "--seed", "4"]));
        site
    }

    fn p(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.p(name).to_str().unwrap().to_owned()
    }

    fn backup(&self) -> String {
        let os = format!("os={}", self.s("os.raw"));
        let data = format!("data={}", self.s("data.raw"));
        let args = ["backup", "--json", "--vault", &self.vault, "--vm", "web", "--disk", &os];
        let p = ok(agent(&[&args[..], &["--disk", &data]].concat()));
        p["point"].as_str().unwrap().to_owned()
    }

    /// `restore --json` of `point` with `extra` arguments.
    fn restore(&self, point: &str, extra: &[&str]) -> std::process::Output {
        let args = ["restore", "--json", "--vault", &self.vault, "--vm", "web", "--point", point];
        agent(&[&args[..], extra].concat())
    }
}

#[test]
fn disks_restore_to_raw_files_qcow2_images_and_in_place() {
    let site = Site::new();
    let p1 = site.backup();
    std::fs::copy(site.p("os.raw"), site.p("os-at-p1.raw")).unwrap();

    // Every disk of the point at once, into a folder: identical, holes kept.
    let started = Instant::now();
    let all = ok(site.restore(&p1, &["--to", &site.s("all")]));
    let full_seconds = started.elapsed().as_secs_f64();
    assert_eq!(all["disks"].as_array().unwrap().len(), 2);
    for disk in ["os", "data"] {
        let restored = site.p("all").join(disk);
        assert!(same(&restored, &site.p(&format!("{disk}.raw"))), "{disk} differs");
        assert!(
            allocated(&restored) <= allocated(&site.p(&format!("{disk}.raw"))),
            "{disk}: holes are kept"
        );
    }
    let full_chunks = all["disks"][1]["chunks"].as_u64().unwrap();
    eprintln!("full restore of 160 MiB (two disks at once): {full_seconds:.2} s");

    // To qcow2: qemu-img finds it clean and identical, and it is sparse.
    let image = site.s("os.qcow2");
    ok(site.restore(&p1, &["--disk", "os", "--to", &image, "--format", "qcow2"]));
    let info: serde_json::Value =
        serde_json::from_str(&tool("qemu-img", &["info", "--output=json", &image])).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 128u64 << 20);
    tool("qemu-img", &["check", "-f", "qcow2", &image]);
    tool("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", &image, &site.s("os.raw")]);
    assert!(allocated(Path::new(&image)) < 128 << 20, "a sparse image");
    // Over an existing file only with --force.
    let out = site.restore(&p1, &["--disk", "os", "--to", &image, "--format", "qcow2"]);
    assert!(!out.status.success());
    // Never to a device: covered by the root test.

    // In place, after a 1% change: only what differs is fetched and written.
    ok(agent(&["sample", "mutate", &site.s("os.raw"), "--fraction", "0.01", "--seed", "8"]));
    assert!(!same(&site.p("os.raw"), &site.p("os-at-p1.raw")));
    let os = site.s("os.raw");
    let out = site.restore(&p1, &["--disk", "os", "--to", &os, "--in-place"]);
    assert!(!out.status.success(), "--in-place needs --force");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let started = Instant::now();
    let done = ok(site.restore(&p1, &["--disk", "os", "--to", &os, "--in-place", "--force"]));
    let in_place_seconds = started.elapsed().as_secs_f64();
    assert!(same(&site.p("os.raw"), &site.p("os-at-p1.raw")), "back to the point");
    let d = &done["disks"][0];
    let (kept, chunks) = (d["blocks_kept"].as_u64().unwrap(), d["chunks"].as_u64().unwrap());
    let blocks = (128u64 << 20) / 65536;
    // 1% of the disk in scattered 4 KiB writes touches about 15% of its 64 KiB blocks.
    assert!(kept > blocks * 8 / 10, "{kept} of {blocks} blocks were already right");
    assert!(chunks * 4 < full_chunks, "{chunks} chunks fetched; a full restore: {full_chunks}");
    eprintln!(
        "in place after a 1% change: {in_place_seconds:.2} s, {chunks} chunks fetched, {kept} \
         of {blocks} blocks kept"
    );
    let started = Instant::now();
    ok(site.restore(&p1, &["--disk", "os", "--to", &site.s("os-full.raw")]));
    eprintln!("full restore of the same disk: {:.2} s", started.elapsed().as_secs_f64());
    // Again, nothing differs: nothing is fetched.
    let again = ok(site.restore(&p1, &["--disk", "os", "--to", &os, "--in-place", "--force"]));
    assert_eq!(again["disks"][0]["chunks"], 0);
    assert_eq!(again["disks"][0]["bytes_written"], 0);

    // Refused: a target someone has open for writing (named), one of the wrong size, one
    // that does not exist, and in-place to qcow2.
    let mut holder = Command::new("sh")
        .args(["-c", "exec 3>>\"$0\"; read line", &os])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let fd3 = format!("/proc/{}/fd/3", holder.id());
    while std::fs::metadata(&fd3).is_err() {
        assert!(holder.try_wait().unwrap().is_none());
        std::thread::yield_now();
    }
    let out = site.restore(&p1, &["--disk", "os", "--to", &os, "--in-place", "--force"]);
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("open for writing") && err.contains(&holder.id().to_string()), "{err}");
    let small = site.s("small.raw");
    std::fs::write(&small, vec![1u8; 4096]).unwrap();
    let out = site.restore(&p1, &["--disk", "os", "--to", &small, "--in-place", "--force"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("4096 bytes"), "{out:?}");
    let nothing = site.s("nothing.raw");
    let out = site.restore(&p1, &["--disk", "os", "--to", &nothing, "--in-place", "--force"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"), "{out:?}");
    let out = site
        .restore(&p1, &["--disk", "os", "--to", &os, "--in-place", "--force", "--format", "qcow2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("qcow2"), "{out:?}");
}

#[test]
fn a_damaged_chunk_is_named_and_the_rest_restored_on_request() {
    let site = Site::new();
    let p1 = site.backup();
    let packs = pack_files(Path::new(&site.vault));
    let biggest = packs.iter().max_by_key(|p| p.metadata().unwrap().len()).unwrap();
    let mut bytes = std::fs::read(biggest).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(biggest, bytes).unwrap();

    // Without --keep-going: the restore stops, names the disk and the offset, and leaves no
    // file behind.
    let to = site.p("out");
    let out = site.restore(&p1, &["--to", to.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("damaged") && err.contains("at offset"), "{err}");

    // With it: exit 3, each damaged block listed, zeros there, everything else identical.
    let out = site.restore(&p1, &["--to", to.to_str().unwrap(), "--keep-going", "--force"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut damaged = 0;
    for disk in report["disks"].as_array().unwrap() {
        let name = disk["disk"].as_str().unwrap();
        let restored = std::fs::read(to.join(name)).unwrap();
        let mut source = std::fs::read(site.p(&format!("{name}.raw"))).unwrap();
        for gap in disk["damaged"].as_array().unwrap() {
            damaged += 1;
            let (at, len) = (gap["offset"].as_u64().unwrap(), gap["len"].as_u64().unwrap());
            let range = at as usize..(at + len) as usize;
            assert!(restored[range.clone()].iter().all(|b| *b == 0), "zeros where damaged");
            assert!(gap["detail"].as_str().unwrap().contains("damaged"), "{gap}");
            source[range].fill(0);
        }
        assert!(restored == source, "{name}: the rest is the point");
    }
    assert!(damaged >= 1, "{report}");
}

#[test]
fn a_block_device_gets_zeros_where_the_disk_has_none() {
    if !root_or_skip() {
        return;
    }
    let site = Site::new();
    let p1 = site.backup();
    // A device full of old data, larger than the disk.
    let backing = site.p("device.img");
    std::fs::write(&backing, vec![0xa5u8; 129 << 20]).unwrap();
    let device = Loop::attach(&backing);
    let out = site.restore(&p1, &["--disk", "os", "--to", &device.0]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"), "{out:?}");
    ok(site.restore(&p1, &["--disk", "os", "--to", &device.0, "--force"]));
    let written = std::fs::read(&device.0).unwrap();
    let source = std::fs::read(site.p("os.raw")).unwrap();
    assert!(written[..source.len()] == source[..], "the device holds the disk, zeros and all");
    assert!(written[source.len()..].iter().all(|b| *b == 0xa5), "nothing past the disk");

    // In place on the device after a change to it.
    sh(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", device.0),
            "bs=64K",
            "count=20",
            "seek=100",
            "conv=notrunc,fsync",
        ],
    );
    let done = ok(site.restore(&p1, &["--disk", "os", "--to", &device.0, "--in-place", "--force"]));
    assert!(std::fs::read(&device.0).unwrap()[..source.len()] == source[..]);
    assert!(done["disks"][0]["chunks"].as_u64().unwrap() <= 20, "{done}");

    // A mounted device is refused.
    sh("mkfs.ext4", &["-q", "-F", &device.0]);
    let _mount = Mount::new(&device.0, &site.p("mnt"), &[]);
    let out = site.restore(&p1, &["--disk", "os", "--to", &device.0, "--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
}
