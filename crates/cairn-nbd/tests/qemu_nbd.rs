//! The client and the bitmap rotation against real `qemu-nbd`, `qemu-img` and `qemu-io`, with
//! libnbd's `nbdinfo` as an independent reading of the same exports. `scripts/test.sh`
//! installs them (Debian: qemu-utils, libnbd-bin).

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cairn_delta::{BlockSource, ChangeTracking, Extent};
use cairn_format::{Name, PointId};
use cairn_nbd::{Client, NbdSource, Previous, Rotation, proto, qemu};

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?} cannot run ({e}); install qemu-utils and libnbd-bin (scripts/test.sh does)")
    });
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn qemu_io(image: &Path, ops: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for op in ops {
        cmd.args(["-c", op]);
    }
    run(cmd.arg(image));
}

/// A 64 MiB qcow2 image with data at 1 MiB (4 KiB), 10 MiB (200 KiB) and 40 MiB (3 MiB).
fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&path).arg("64M"));
    qemu_io(&path, &["write -P 0x55 1M 4k", "write -P 0x66 10M 200k", "write -P 0x77 40M 3M"]);
    path
}

/// A persistent `qemu-nbd` (several clients in turn), killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(image: &Path, extra: &[&str]) -> Server {
        let socket = image.with_extension("sock");
        let child = Command::new("qemu-nbd")
            .args(["--persistent", "--shared=4", "--format=qcow2"])
            .arg(format!("--socket={}", socket.display()))
            .args(extra)
            .arg(image)
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd runs (install qemu-utils)");
        // Waits until it accepts a connection, not for a time: qemu-nbd creates its socket a
        // moment before it listens (a probe is harmless to a --persistent server).
        let started = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "qemu-nbd never listened"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Server { child, socket }
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nbdinfo --map=CONTEXT --json`: (offset, length, type) per extent.
fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = run(Command::new("nbdinfo").arg(format!("--map={context}")).arg("--json").arg(uri));
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

#[test]
fn reads_and_maps_the_same_as_qemu_and_libnbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let raw = dir.path().join("disk.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&img).arg(&raw));
    let want = std::fs::read(&raw).unwrap();

    let server = Server::start(&img, &["--read-only"]);
    let mut client =
        Client::connect_unix(&server.socket, "", &["base:allocation".to_string()]).unwrap();
    assert_eq!(client.export().size, 64 << 20);
    assert_ne!(client.export().flags & proto::TRANSMIT_READ_ONLY, 0);
    // Reads larger than the server's maximum payload are split; holes come back as zeros.
    let mut got = vec![0xffu8; want.len()];
    client.read(0, &mut got).unwrap();
    assert!(got == want, "the export's bytes differ from qemu-img convert's");
    let mut piece = vec![0u8; 10000];
    client.read((10 << 20) - 3, &mut piece).unwrap();
    assert_eq!(piece[..], want[(10 << 20) - 3..(10 << 20) - 3 + 10000]);
    assert!(client.read((64 << 20) - 10, &mut piece).is_err(), "a read past the end is refused");

    let map = client.block_status("base:allocation", 0, 64 << 20).unwrap();
    let ours: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.offset, e.len, e.flags)).collect();
    assert_eq!(ours, nbdinfo_map(&server.uri(), "base:allocation"));
    client.disconnect();
}

#[test]
fn dirty_bitmap_extents_match_nbdinfo_and_the_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    run(Command::new("qemu-img").args(["bitmap", "--add", "-g", "65536"]).arg(&img).arg("b1"));
    qemu_io(&img, &["write -P 0x11 5M 4k", "write -P 0x12 20M 1M", "write -P 0x13 63M 64k"]);
    let server = Server::start(&img, &["--read-only", "--bitmap=b1"]);
    let since: PointId = "20261122T021720.123Z-0123abcd".parse().unwrap();
    let previous = Previous::Bitmap { name: "b1".into(), since: since.clone(), granularity: 65536 };
    let source = NbdSource::connect(&server.socket, "", "disk".into(), Some(&previous)).unwrap();
    let ChangeTracking::Since { dirty, since: got_since, .. } = source.change_tracking() else {
        panic!("no tracking")
    };
    assert_eq!(got_since, since);
    // One 64 KiB granule for the 4 KiB write, the 1 MiB run, the last granule.
    assert_eq!(
        dirty,
        vec![
            Extent { offset: 5 << 20, len: 64 << 10 },
            Extent { offset: 20 << 20, len: 1 << 20 },
            Extent { offset: (63 << 20), len: 64 << 10 },
        ]
    );
    let theirs: Vec<Extent> = nbdinfo_map(&server.uri(), "qemu:dirty-bitmap:b1")
        .into_iter()
        .filter(|(_, _, t)| t & 1 != 0)
        .map(|(offset, len, _)| Extent { offset, len })
        .collect();
    assert_eq!(dirty, theirs);
    // Allocation covers every write and skips the holes: a few MiB of the 64.
    let allocated = source.allocated(0, 64 << 20).unwrap();
    let total: u64 = allocated.iter().map(|e| e.len).sum();
    assert!(total < 8 << 20, "{allocated:?}");
    for (offset, len) in
        [(1u64 << 20, 4096u64), (5 << 20, 4096), (20 << 20, 1 << 20), (40 << 20, 3 << 20)]
    {
        assert!(
            allocated.iter().any(|e| e.offset <= offset && e.end() >= offset + len),
            "{offset}: {allocated:?}"
        );
    }
}

#[test]
fn rotation_adds_the_next_bitmap_and_drops_the_old_only_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let (vm, disk): (Name, Name) = ("vm1".parse().unwrap(), "os".parse().unwrap());
    let p1: PointId = "20261122T021720.123Z-00000001".parse().unwrap();
    let p2: PointId = "20261122T031720.123Z-00000002".parse().unwrap();
    let p3: PointId = "20261122T041720.123Z-00000003".parse().unwrap();
    let names = || -> Vec<String> {
        qemu::image_info(&img).unwrap().bitmaps.into_iter().map(|b| b.name).collect()
    };

    let first = Rotation::begin(&img, &vm, &disk, None, &p1, 65536).unwrap();
    assert!(
        matches!(first.previous(), Previous::Unusable(why) if why.contains("no earlier point"))
    );
    first.committed().unwrap();
    assert_eq!(names(), vec![format!("cairn:vm1:os:{p1}")]);

    qemu_io(&img, &["write -P 0x21 30M 8k"]);
    let second = Rotation::begin(&img, &vm, &disk, Some(&p1), &p2, 65536).unwrap();
    assert!(matches!(second.previous(), Previous::Bitmap { since, .. } if *since == p1));
    // A failed backup removes only its own bitmap: the old one keeps recording.
    second.abandoned().unwrap();
    assert_eq!(names(), vec![format!("cairn:vm1:os:{p1}")]);

    let third = Rotation::begin(&img, &vm, &disk, Some(&p1), &p3, 65536).unwrap();
    let source = NbdSource::serve(&img, "qcow2", Some(third.previous())).unwrap();
    let ChangeTracking::Since { dirty, .. } = source.change_tracking() else { panic!("untracked") };
    assert_eq!(dirty, vec![Extent { offset: 30 << 20, len: 64 << 10 }]);
    drop(source);
    third.committed().unwrap();
    assert_eq!(names(), vec![format!("cairn:vm1:os:{p3}")]);
}

#[test]
fn a_killed_writer_leaves_a_bitmap_that_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let (vm, disk): (Name, Name) = ("vm1".parse().unwrap(), "os".parse().unwrap());
    let p1: PointId = "20261122T021720.123Z-00000001".parse().unwrap();
    let p2: PointId = "20261122T031720.123Z-00000002".parse().unwrap();
    Rotation::begin(&img, &vm, &disk, None, &p1, 65536).unwrap().committed().unwrap();
    // A writable qemu-nbd marks the bitmap in-use while it runs; SIGKILL leaves it so.
    let mut server = Server::start(&img, &[]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x31 2M 4k"]).arg(server.uri()));
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let next = Rotation::begin(&img, &vm, &disk, Some(&p1), &p2, 65536).unwrap();
    match next.previous() {
        Previous::Unusable(why) => assert!(why.contains("in-use"), "{why}"),
        other => panic!("an in-use bitmap was trusted: {other:?}"),
    }
    // The next commit clears the stale bitmap away.
    next.committed().unwrap();
    let names: Vec<String> =
        qemu::image_info(&img).unwrap().bitmaps.into_iter().map(|b| b.name).collect();
    assert_eq!(names, vec![format!("cairn:vm1:os:{p2}")]);
}

#[test]
fn an_image_that_cannot_hold_bitmaps_is_still_read_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v2.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "compat=0.10"])
        .arg(&img)
        .arg("8M"));
    let (vm, disk): (Name, Name) = ("vm1".parse().unwrap(), "os".parse().unwrap());
    let p1: PointId = "20261122T021720.123Z-00000001".parse().unwrap();
    let p2: PointId = "20261122T031720.123Z-00000002".parse().unwrap();
    let rotation = Rotation::begin(&img, &vm, &disk, Some(&p1), &p2, 65536).unwrap();
    assert_eq!(rotation.started(), None);
    match rotation.previous() {
        Previous::Unusable(why) => assert!(why.contains("compat=1.1"), "{why}"),
        other => panic!("{other:?}"),
    }
    let source = NbdSource::serve(&img, "qcow2", Some(rotation.previous())).unwrap();
    assert_eq!(source.size(), 8 << 20);
    drop(source);
    rotation.committed().unwrap();
}

#[test]
fn a_peer_that_is_not_an_nbd_server_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("junk.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let junk = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let err = Client::connect_unix(&socket, "", &[]).err().expect("junk was accepted");
    assert!(err.to_string().contains("not an NBD server"), "{err}");
    junk.join().unwrap();
    let err = Client::connect_unix(&dir.path().join("none.sock"), "", &[]).err().unwrap();
    assert!(err.to_string().contains("none.sock"), "{err}");
}
