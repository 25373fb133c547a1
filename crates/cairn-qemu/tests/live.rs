//! Live views of a running QEMU's disks, against a real QEMU (no guest system: writes go
//! through the device with HMP's `qemu-io -d`, as a guest's would).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_delta::{BlockSource, ChangeTracking, Extent};
use cairn_format::{Name, PointId};
use cairn_nbd::{NbdSource, Previous};
use cairn_qemu::{FleeceOptions, LiveDiskSpec, LiveVm, Qmp};
use cairn_snapshot::{NoQuiescer, VmState, capture_with};
use cairn_testkit::qemu::{TestDisk, TestVm, qemu_or_skip};
use cairn_testkit::{Loop, Mount, root_or_skip, sh};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

struct Fixture {
    // Dropped in this order: QEMU, then the file system its image is on, then the folder.
    vm: TestVm,
    _xfs: Option<(Mount, Loop)>,
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// What the disk holds, kept in step with every write.
    expected: Vec<u8>,
    qdev: String,
}

fn fixture(format: &'static str) -> Fixture {
    fixture_on(format, false)
}

/// A fixture whose image is on a loop-mounted XFS with reflinks (`xfs`, as root), or in the
/// test's temporary folder.
fn fixture_on(format: &'static str, xfs: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut root = dir.path().to_path_buf();
    let mut mounted = None;
    if xfs {
        let file = root.join("xfs.img");
        std::fs::File::create(&file).unwrap().set_len(1024 * MIB).unwrap();
        sh("mkfs.xfs", &["-q", "-m", "reflink=1", file.to_str().unwrap()]);
        let device = Loop::attach(&file);
        let mount = Mount::new(&device.0, &root.join("xfs"), &[]);
        root = mount.0.clone();
        mounted = Some((mount, device));
    }
    let image = root.join(format!("os.{format}"));
    sh("qemu-img", &["create", "-q", "-f", format, image.to_str().unwrap(), &SIZE.to_string()]);
    let mut expected = vec![0u8; SIZE as usize];
    for (byte, at, len) in [(0x11u8, 0, 4 * MIB), (0x22, 16 * MIB, 4 * MIB)] {
        let cmd = format!("write -P {byte} {at} {len}");
        sh("qemu-io", &["-f", format, "-c", &cmd, image.to_str().unwrap()]);
        expected[at as usize..(at + len) as usize].fill(byte);
    }
    let vm = TestVm::start(
        &root,
        &[TestDisk { path: image, format, id: "disk-os".into(), device: "virtio-blk-pci" }],
    );
    let mut qmp = Qmp::connect(&vm.harness).unwrap();
    let qdev = cairn_qemu::vm::find(&cairn_qemu::vm::disks(&mut qmp).unwrap(), "disk-os")
        .unwrap()
        .qdev
        .clone();
    Fixture { vm, _xfs: mounted, _dir: dir, root, expected, qdev }
}

impl Fixture {
    /// A guest write of `byte` over `len` bytes at `at`, through the device.
    fn write(&mut self, byte: u8, at: u64, len: u64) {
        let mut qmp = Qmp::connect(&self.vm.harness).unwrap();
        let out = qmp
            .execute(
                "human-monitor-command",
                json!({"command-line": format!("qemu-io -d {} \"write -P {byte} {at} {len}\"", self.qdev)}),
            )
            .unwrap();
        assert_eq!(out, json!(""), "the guest's write must succeed: {out}");
        self.expected[at as usize..(at + len) as usize].fill(byte);
    }

    /// Whether the guest reads `byte` over the range.
    fn guest_reads(&self, byte: u8, at: u64, len: u64) -> bool {
        let mut qmp = Qmp::connect(&self.vm.harness).unwrap();
        let out = qmp
            .execute(
                "human-monitor-command",
                json!({"command-line": format!("qemu-io -d {} \"read -P {byte} {at} {len}\"", self.qdev)}),
            )
            .unwrap();
        out == json!("")
    }

    fn options(&self, quota: Option<u64>) -> FleeceOptions {
        FleeceOptions {
            dir: self.root.join("fleece"),
            quota,
            cbw_timeout: Duration::from_secs(5),
            clone_images: false,
        }
    }

    fn prepare(&self, point: &PointId, previous: Option<&PointId>, quota: Option<u64>) -> LiveVm {
        self.prepare_with(point, previous, self.options(quota))
    }

    fn prepare_with(
        &self,
        point: &PointId,
        previous: Option<&PointId>,
        options: FleeceOptions,
    ) -> LiveVm {
        let since: BTreeMap<Name, PointId> =
            previous.map(|p| (name("os"), p.clone())).into_iter().collect();
        LiveVm::prepare(
            &self.vm.qmp,
            &name("vm1"),
            point,
            &[LiveDiskSpec { name: name("os"), device: "disk-os".into() }],
            &since,
            65536,
            &options,
        )
        .unwrap()
    }

    /// Files beside the image that Cairn made (clones, kept or not).
    fn clones(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".cairn-"))
            .collect()
    }

    /// Names of the block nodes Cairn added, and files left in the fleecing folder.
    fn leftovers(&self) -> (Vec<String>, Vec<String>) {
        let mut qmp = Qmp::connect(&self.vm.harness).unwrap();
        let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true})).unwrap();
        let ours = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .filter(|n| n.starts_with("cairn-"))
            .map(str::to_owned)
            .collect();
        let files = std::fs::read_dir(self.root.join("fleece"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default();
        (ours, files)
    }

    fn bitmaps(&self) -> Vec<(String, bool)> {
        let mut qmp = Qmp::connect(&self.vm.harness).unwrap();
        let disks = cairn_qemu::vm::disks(&mut qmp).unwrap();
        let disk = cairn_qemu::vm::find(&disks, "disk-os").unwrap();
        disk.bitmaps.iter().map(|b| (b.name.clone(), b.enabled())).collect()
    }
}

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

fn point(n: u32) -> PointId {
    format!("20261203T0{n}0000.000Z-0000000{n}").parse().unwrap()
}

fn open(live: &LiveVm) -> NbdSource {
    let previous = live.previous(&name("os")).cloned();
    NbdSource::connect(
        live.socket(),
        &LiveVm::export_name(&name("os")),
        "os".into(),
        previous.as_ref(),
    )
    .unwrap()
}

fn read_all(source: &NbdSource) -> Result<Vec<u8>, cairn_delta::Error> {
    let mut out = vec![0u8; source.size() as usize];
    for (i, chunk) in out.chunks_mut(4 * MIB as usize).enumerate() {
        source.read_at(i as u64 * 4 * MIB, chunk)?;
    }
    Ok(out)
}

fn dirty(source: &NbdSource) -> Vec<Extent> {
    match source.change_tracking() {
        ChangeTracking::Since { dirty, .. } => dirty,
        other => panic!("expected dirty ranges, got {other:?}"),
    }
}

#[test]
fn the_view_is_the_instant_while_the_guest_writes_on_and_bitmaps_rotate() {
    if !qemu_or_skip() {
        return;
    }
    let mut f = fixture("qcow2");
    // Full: no earlier point, so no bitmap to trust.
    let mut live = f.prepare(&point(1), None, None);
    assert!(matches!(live.previous(&name("os")), Some(Previous::Unusable(_))));
    live.take().unwrap();
    let at_instant = f.expected.clone();
    f.write(0x33, 0, MIB);
    f.write(0x44, 32 * MIB, MIB);
    let source = open(&live);
    assert!(read_all(&source).unwrap() == at_instant, "the view is the disk at the instant");
    assert!(f.guest_reads(0x33, 0, MIB), "the guest sees its own writes");
    drop(source);
    live.finish(true).unwrap();
    assert_eq!(f.leftovers(), (vec![], vec![]), "no node, export or fleecing image is left");
    let b1 = cairn_nbd::bitmap_name(&name("vm1"), &name("os"), &point(1));
    assert_eq!(f.bitmaps(), vec![(b1.clone(), true)]);

    // Incremental: the bitmap of point 1 says exactly what the guest wrote since.
    let mut live = f.prepare(&point(2), Some(&point(1)), None);
    assert!(matches!(live.previous(&name("os")), Some(Previous::Bitmap { .. })));
    live.take().unwrap();
    f.write(0x55, 48 * MIB, MIB);
    let source = open(&live);
    assert_eq!(
        dirty(&source),
        vec![Extent { offset: 0, len: MIB }, Extent { offset: 32 * MIB, len: MIB }]
    );
    let mut expected = f.expected.clone();
    expected[48 * MIB as usize..49 * MIB as usize].fill(0);
    assert!(read_all(&source).unwrap() == expected, "the second view is its instant too");
    drop(source);
    live.finish(true).unwrap();
    let b2 = cairn_nbd::bitmap_name(&name("vm1"), &name("os"), &point(2));
    assert_eq!(f.bitmaps(), vec![(b2.clone(), true)], "point 1's bitmap goes after the commit");

    // A failed run: its bitmap is merged back into point 2's, which records again.
    let mut live = f.prepare(&point(3), Some(&point(2)), None);
    live.take().unwrap();
    f.write(0x66, 8 * MIB, MIB);
    live.finish(false).unwrap();
    assert_eq!(f.bitmaps(), vec![(b2.clone(), true)]);
    f.write(0x77, 40 * MIB, MIB);

    // A killed run: the next one undoes what it left in QEMU and merges its bitmap back.
    let mut live = f.prepare(&point(4), Some(&point(2)), None);
    live.take().unwrap();
    f.write(0x78, 56 * MIB, MIB);
    live.abandon_as_if_killed();
    let (nodes, files) = f.leftovers();
    assert!(!nodes.is_empty() && !files.is_empty(), "a killed run leaves its view behind");
    let mut live = f.prepare(&point(5), Some(&point(2)), None);
    live.take().unwrap();
    let source = open(&live);
    assert_eq!(
        dirty(&source),
        vec![
            Extent { offset: 8 * MIB, len: MIB },
            Extent { offset: 40 * MIB, len: MIB },
            Extent { offset: 48 * MIB, len: MIB },
            Extent { offset: 56 * MIB, len: MIB },
        ],
        "every write since point 2 is marked: before, during and after the failed and killed runs"
    );
    assert!(read_all(&source).unwrap() == f.expected);
    drop(source);
    live.finish(true).unwrap();
    assert_eq!(f.leftovers(), (vec![], vec![]));
    let b5 = cairn_nbd::bitmap_name(&name("vm1"), &name("os"), &point(5));
    assert_eq!(f.bitmaps(), vec![(b5, true)]);
}

#[test]
fn a_full_fleecing_image_breaks_the_view_never_the_guests_write() {
    if !qemu_or_skip() {
        return;
    }
    let mut f = fixture("qcow2");
    let mut live = f.prepare(&point(1), None, Some(MIB));
    live.take().unwrap();
    // 4 MiB of old data to keep, 1 MiB of room: the copy fails, the write goes through.
    f.write(0x99, 0, 4 * MIB);
    assert!(f.guest_reads(0x99, 0, 4 * MIB), "the guest's write went through");
    let source = open(&live);
    let read = read_all(&source);
    assert!(read.is_err(), "the broken view must not be read as if it were the instant");
    drop(source);
    live.finish(false).unwrap();
    assert_eq!(f.leftovers(), (vec![], vec![]));
    assert!(f.bitmaps().is_empty(), "a failed first run leaves no bitmap");
}

#[test]
fn a_raw_disk_has_a_bitmap_in_memory_and_a_missing_device_is_named() {
    if !qemu_or_skip() {
        return;
    }
    let mut f = fixture("raw");
    let mut live = f.prepare(&point(1), None, None);
    live.take().unwrap();
    f.write(0x12, 0, MIB);
    live.finish(true).unwrap();
    let mut live = f.prepare(&point(2), Some(&point(1)), None);
    live.take().unwrap();
    let source = open(&live);
    assert_eq!(dirty(&source), vec![Extent { offset: 0, len: MIB }]);
    drop(source);
    live.finish(true).unwrap();

    let err = LiveVm::prepare(
        &f.vm.qmp,
        &name("vm1"),
        &point(3),
        &[LiveDiskSpec { name: name("data"), device: "disk-data".into() }],
        &BTreeMap::new(),
        65536,
        &f.options(None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no disk \"disk-data\"") && err.contains("disk-os"), "{err}");
    let err = LiveVm::prepare(
        Path::new("/nonexistent/qmp.sock"),
        &name("vm1"),
        &point(3),
        &[],
        &BTreeMap::new(),
        65536,
        &f.options(None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("QMP socket /nonexistent/qmp.sock"), "{err}");
}

#[test]
fn leftovers_of_another_running_qemu_are_refused_and_of_a_dead_one_removed() {
    if !qemu_or_skip() {
        return;
    }
    // Two QEMUs whose configurations both name VM vm1 and share a fleecing folder.
    let a = fixture("qcow2");
    let b = fixture("qcow2");
    let options = a.options(None);
    let prepare_b = || {
        LiveVm::prepare(
            &b.vm.qmp,
            &name("vm1"),
            &point(2),
            &[LiveDiskSpec { name: name("os"), device: "disk-os".into() }],
            &BTreeMap::new(),
            65536,
            &options,
        )
    };
    let mut live = a.prepare(&point(1), None, None);
    live.take().unwrap();
    live.abandon_as_if_killed();
    let err = prepare_b().unwrap_err().to_string();
    assert!(err.contains("another QEMU") && err.contains("its own name"), "{err}");
    assert!(!a.leftovers().0.is_empty(), "A's leftovers are A's next run's to undo");

    // A's QEMU gone: what it held went with it; its files are removed, and B backs up.
    let (_, files) = a.leftovers();
    assert!(files.iter().any(|f| f.ends_with(".qcow2")), "{files:?}");
    drop(a.vm);
    let mut live = prepare_b().unwrap();
    live.take().unwrap();
    live.finish(true).unwrap();
    let left: Vec<String> = std::fs::read_dir(&options.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Kept views: with `clone_images`, each image is cloned at the instant where its file system
/// can. On XFS (as root) the clone reads as the instant while the guest writes on, and is
/// either kept under the point's id or removed with the other views; on the test folder's
/// ext4 there is no clone, the evidence says why, and the capture has nothing to keep.
#[test]
fn images_are_cloned_at_the_instant_where_their_file_system_can() {
    if !qemu_or_skip() {
        return;
    }
    let f = fixture("qcow2");
    let cloning = FleeceOptions { clone_images: true, ..f.options(Some(32 * MIB)) };
    let mut live = f.prepare_with(&point(1), None, cloning);
    let capture = capture_with(&mut NoQuiescer, &mut live, VmState::Running).unwrap();
    let notes: Vec<&str> = capture.record().evidence().iter().map(|e| e.message.as_str()).collect();
    assert!(!capture.can_keep(), "{notes:?}");
    assert!(
        notes.iter().any(|n| n.contains("no view kept for instant restores")
            && n.contains("not on XFS or btrfs")),
        "{notes:?}"
    );
    capture.release(true).unwrap();
    live.finish(true).unwrap();
    assert!(f.clones().is_empty());

    if !root_or_skip() {
        return;
    }
    let mut f = fixture_on("qcow2", true);
    let cloning = FleeceOptions { clone_images: true, ..f.options(Some(32 * MIB)) };
    // A backup that fails: its clone goes with its other views.
    let mut live = f.prepare_with(&point(1), None, cloning.clone());
    let capture = capture_with(&mut NoQuiescer, &mut live, VmState::Running).unwrap();
    assert!(capture.can_keep());
    assert_eq!(f.clones().len(), 1);
    capture.release(false).unwrap();
    live.finish(false).unwrap();
    assert!(f.clones().is_empty(), "a released clone is removed");

    // A backup that commits: the clone is the instant, kept under the point's id.
    let at_instant = f.expected.clone();
    let mut live = f.prepare_with(&point(2), None, cloning);
    let capture = capture_with(&mut NoQuiescer, &mut live, VmState::Running).unwrap();
    f.write(0x5a, 8 * MIB, 2 * MIB);
    let kept = capture.keep(&point(2).to_string()).unwrap();
    live.finish(true).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].kind, "reflink");
    assert!(kept[0].is_kept_name() && kept[0].path.starts_with(&f.root));
    assert_eq!(f.clones(), vec![kept[0].path.clone()]);
    let raw = f.root.join("kept.raw");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            kept[0].path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&raw).unwrap() == at_instant,
        "the kept clone is the disk at the instant"
    );
    assert!(f.guest_reads(0x5a, 8 * MIB, 2 * MIB), "the guest runs on its own image");
    assert_eq!(f.leftovers(), (vec![], vec![]));
    kept[0].release().unwrap();
    assert!(f.clones().is_empty());

    // An image in more extents than a pause allows is not cloned: the evidence says why.
    let image = f.root.join("os.qcow2");
    let file = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    let end = file.metadata().unwrap().len();
    for i in 0..=cairn_qemu::MAX_CLONE_EXTENTS as u64 {
        // Past the image's end, one block in two: one extent each (QEMU never reads there).
        std::os::unix::fs::FileExt::write_at(&file, b"x", end + i * 8192).unwrap();
    }
    file.sync_all().unwrap();
    let extents = cairn_snapshot::views::extent_count(&file).unwrap();
    assert!(extents > cairn_qemu::MAX_CLONE_EXTENTS, "{extents}");
    let cloning = FleeceOptions { clone_images: true, ..f.options(Some(32 * MIB)) };
    let mut live = f.prepare_with(&point(3), None, cloning);
    let capture = capture_with(&mut NoQuiescer, &mut live, VmState::Running).unwrap();
    let notes: Vec<&str> = capture.record().evidence().iter().map(|e| e.message.as_str()).collect();
    assert!(!capture.can_keep());
    assert!(notes.iter().any(|n| n.contains("extents, more than")), "{notes:?}");
    capture.release(true).unwrap();
    live.finish(true).unwrap();
    assert!(f.clones().is_empty());

    // The name QEMU reports now holds another file (the image was moved aside): root never
    // clones a file QEMU does not have open.
    std::fs::rename(&image, f.root.join("os.moved")).unwrap();
    std::fs::write(&image, b"some other file").unwrap();
    let cloning = FleeceOptions { clone_images: true, ..f.options(Some(32 * MIB)) };
    let mut live = f.prepare_with(&point(4), None, cloning);
    let capture = capture_with(&mut NoQuiescer, &mut live, VmState::Running).unwrap();
    let notes: Vec<&str> = capture.record().evidence().iter().map(|e| e.message.as_str()).collect();
    assert!(!capture.can_keep());
    assert!(notes.iter().any(|n| n.contains("is not the file QEMU")), "{notes:?}");
    capture.release(true).unwrap();
    live.finish(true).unwrap();
    assert!(f.clones().is_empty());
}
