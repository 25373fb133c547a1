//! An ext4 image made by `mkfs.ext4 -d` from a tree holding every kind of file (sparse, empty,
//! large, set-user-ID, symlinks relative, absolute and dangling, names that are not UTF-8 or
//! hold a newline, a fifo, a read-only folder): listed and extracted, everything compared with
//! the source tree. Bad input: a missing path, a relative one, `..`, an existing target, an
//! unsupported file system.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use cairn_testkit::walk;
use std::process::Command;
use std::sync::Arc;

use cairn_files::{Error, ExtractOptions, FsKind, Kind, ReadAt, Volume, locate};

fn run(program: &str, args: &[&OsStr]) {
    let out =
        Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The source tree.
fn make_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).unwrap();
    for d in ["etc", "usr/share/doc/pkg", "var/empty", "locked", "deep/a/b/c/d/e/f/g"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    w("etc/hostname", b"cairn-test\n");
    w("etc/empty", b"");
    let big: Vec<u8> =
        (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    w("usr/share/doc/pkg/big.bin", &big);
    w("deep/a/b/c/d/e/f/g/leaf", b"leaf\n");
    // Sparse: 10 MiB with data only at 5 MiB.
    let sparse = std::fs::File::create(root.join("var/sparse.img")).unwrap();
    sparse.set_len(10 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 5 << 20).unwrap();
    w("usr/setuid-tool", b"#!/bin/sh\n");
    std::fs::set_permissions(root.join("usr/setuid-tool"), std::fs::Permissions::from_mode(0o4755))
        .unwrap();
    w("etc/secret", b"s3cret\n");
    std::fs::set_permissions(root.join("etc/secret"), std::fs::Permissions::from_mode(0o600))
        .unwrap();
    symlink("hostname", root.join("etc/alias")).unwrap();
    symlink("/etc/hostname", root.join("etc/absolute")).unwrap();
    symlink("../../../../../etc/shadow", root.join("var/escape")).unwrap();
    symlink("nowhere", root.join("var/dangling")).unwrap();
    std::fs::write(root.join(OsStr::from_bytes(b"var/latin1-\xe9t\xe9")), b"x").unwrap();
    std::fs::write(root.join("var/new\nline"), b"y").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("var/pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    w("locked/inside", b"in a read-only folder\n");
    std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(root.join("var/empty"), std::fs::Permissions::from_mode(0o1777))
        .unwrap();
}

/// An image of `tree`, as the whole disk (no table).
fn image_of(tree: &Path, image: &Path) {
    run(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-I".as_ref(),
            "256".as_ref(),
            "-d".as_ref(),
            tree.as_os_str(),
            image.as_os_str(),
            "64M".as_ref(),
        ],
    );
}

struct Fixture {
    _dir: tempfile::TempDir,
    tree: PathBuf,
    image: PathBuf,
    out: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    let image = dir.path().join("disk.img");
    image_of(&tree, &image);
    let out = dir.path().join("out");
    Fixture { tree, image, out, _dir: dir }
}

fn volume(image: &Path) -> Volume {
    let disk: Arc<dyn ReadAt> = Arc::new(std::fs::File::open(image).unwrap());
    let at = locate(disk.as_ref(), None).unwrap();
    assert_eq!((at.fs, at.start, at.partition.is_none()), (FsKind::Ext4, 0, true));
    Volume::open(disk, &at).unwrap()
}

#[test]
fn every_file_is_listed_as_in_the_source_tree() {
    let f = fixture();
    let vol = volume(&f.image);
    let mut listed = Vec::new();
    vol.list(b"/", true, 1_000_000, &mut |e| listed.push(e.clone())).unwrap();
    listed.retain(|e| !e.path.starts_with(b"/lost+found"));
    let mut paths: Vec<PathBuf> =
        listed.iter().map(|e| PathBuf::from(OsStr::from_bytes(&e.path[1..]))).collect();
    paths.sort();
    assert_eq!(paths, walk(&f.tree));
    for e in &listed {
        let src = f.tree.join(OsStr::from_bytes(&e.path[1..]));
        let meta = std::fs::symlink_metadata(&src).unwrap();
        assert_eq!(u32::from(e.mode), meta.mode() & 0o7777, "{}", src.display());
        assert_eq!(e.modified.0, meta.mtime(), "{}", src.display());
        if meta.is_file() {
            assert_eq!((e.kind, e.size), (Kind::File, meta.len()), "{}", src.display());
        }
        if meta.is_symlink() {
            assert_eq!(e.kind, Kind::Symlink);
            let target = std::fs::read_link(&src).unwrap();
            assert_eq!(e.target.as_deref(), Some(target.as_os_str().as_bytes()));
        }
    }
    // One file, and one folder's direct entries only.
    let mut one = Vec::new();
    vol.list(b"/etc/hostname", false, 10, &mut |e| one.push(e.clone())).unwrap();
    assert_eq!((one.len(), one[0].size), (1, 11));
    let mut etc = Vec::new();
    vol.list(b"/etc", false, 100, &mut |e| etc.push(e.display_path())).unwrap();
    assert_eq!(etc, ["/etc/absolute", "/etc/alias", "/etc/empty", "/etc/hostname", "/etc/secret"]);
    // A limit on entries stops a walk.
    let err = vol.list(b"/", true, 5, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::TooMany(_)), "{err}");
}

#[test]
fn extraction_keeps_content_mode_times_symlinks_and_holes() {
    let f = fixture();
    let vol = volume(&f.image);
    let report = vol.extract(b"/", &f.out, &ExtractOptions::default()).unwrap();
    assert_eq!(report.setid_dropped, 1);
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    assert!(report.skipped[0].path.ends_with("/var/pipe"));
    let mut expected = walk(&f.tree);
    expected.retain(|p| p != Path::new("var/pipe"));
    assert_eq!(walk(&f.out), expected);
    for rel in &expected {
        let (src, got) = (f.tree.join(rel), f.out.join(rel));
        let (a, b) =
            (std::fs::symlink_metadata(&src).unwrap(), std::fs::symlink_metadata(&got).unwrap());
        assert_eq!(a.file_type(), b.file_type(), "{}", rel.display());
        // mkfs.ext4 -d keeps seconds only; the extracted file has the volume's own time.
        let listed = vol.entry(&[b"/", rel.as_os_str().as_bytes()].concat()).unwrap();
        assert_eq!(a.mtime(), b.mtime(), "{}", rel.display());
        assert_eq!(listed.modified, (b.mtime(), b.mtime_nsec() as u32), "{}", rel.display());
        let mode = if rel == Path::new("usr/setuid-tool") { 0o755 } else { a.mode() & 0o7777 };
        if !a.is_symlink() {
            assert_eq!(b.mode() & 0o7777, mode, "{}", rel.display());
        }
        if a.is_file() {
            assert_eq!(
                std::fs::read(&src).unwrap(),
                std::fs::read(&got).unwrap(),
                "{}",
                rel.display()
            );
        }
        if a.is_symlink() {
            assert_eq!(std::fs::read_link(&src).unwrap(), std::fs::read_link(&got).unwrap());
        }
    }
    // The sparse file stayed sparse; the escaping symlink was recreated, not followed.
    let sparse = std::fs::metadata(f.out.join("var/sparse.img")).unwrap();
    assert_eq!(sparse.len(), 10 << 20);
    assert!(sparse.blocks() * 512 <= 64 << 10, "{} bytes allocated", sparse.blocks() * 512);
    assert!(report.bytes - report.written >= (10 << 20) - 4096, "{report:?}");
    assert!(std::fs::symlink_metadata(f.out.join("var/escape")).unwrap().is_symlink());

    // Again into the same folder: nothing is overwritten.
    let err = vol.extract(b"/etc", &f.out, &ExtractOptions::default()).unwrap_err();
    assert!(matches!(&err, Error::Exists(p) if p.ends_with("etc")), "{err}");
    // A link planted where a file would go is not followed.
    let elsewhere = f.out.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let planted = f.out.join("one");
    std::fs::create_dir(&planted).unwrap();
    symlink(&elsewhere, planted.join("hostname")).unwrap();
    let err = vol.extract(b"/etc/hostname", &planted, &ExtractOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Exists(_)), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // One file into a new folder; set-user-ID kept on request.
    let single = f.out.join("single");
    let keep = ExtractOptions { keep_setid: true, ..ExtractOptions::default() };
    let r = vol.extract(b"/usr/setuid-tool", &single, &keep).unwrap();
    assert_eq!((r.files, r.setid_dropped), (1, 0));
    assert_eq!(std::fs::metadata(single.join("setuid-tool")).unwrap().mode() & 0o7777, 0o4755);
    assert_eq!(std::fs::metadata(&single).unwrap().mode() & 0o777, 0o700);
}

#[test]
fn the_destination_is_reached_without_links_and_what_is_written_is_bounded() {
    let f = fixture();
    let vol = volume(&f.image);
    let opts = ExtractOptions::default();
    // A link on the way to --to (a guest's link an earlier extraction restored) is refused.
    let real = f.out.join("real");
    std::fs::create_dir_all(&real).unwrap();
    symlink(&real, f.out.join("link")).unwrap();
    let err = vol.extract(b"/etc/hostname", &f.out.join("link/sub"), &opts).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0, "nothing made through the link");
    // An existing folder others may write into is refused; a new one is made private.
    let shared = f.out.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = vol.extract(b"/etc/hostname", &shared, &opts).unwrap_err();
    assert!(err.to_string().contains("others may write"), "{err}");
    // More data than allowed: an error, and the file being written is not left behind.
    let bounded = f.out.join("bounded");
    let small = ExtractOptions { max_bytes: 1, ..ExtractOptions::default() };
    let err = vol.extract(b"/etc/hostname", &bounded, &small).unwrap_err();
    assert!(matches!(&err, Error::TooMany(m) if m.contains("more data than the volume")), "{err}");
    assert_eq!(std::fs::read_dir(&bounded).unwrap().count(), 0, "no partial file");
}

#[test]
fn bad_paths_and_unsupported_file_systems_are_named() {
    let f = fixture();
    let vol = volume(&f.image);
    let opts = ExtractOptions::default();
    let err = vol.extract(b"/etc/nothing", &f.out, &opts).unwrap_err();
    assert!(matches!(&err, Error::NotFound(p) if p == "/etc/nothing"), "{err}");
    let err = vol.entry(b"etc/hostname").unwrap_err();
    assert!(matches!(&err, Error::BadPath(m) if m.contains("absolute")), "{err}");
    let err = vol.extract(b"/etc/..", &f.out, &opts).unwrap_err();
    assert!(matches!(&err, Error::BadPath(m) if m.contains("..")), "{err}");
    let err = vol.children(b"/etc/hostname").unwrap_err();
    assert!(matches!(&err, Error::BadPath(_)), "{err}");

    // XFS, NTFS and swap signatures: refused, naming the file system and what comes next.
    for (offset, magic, name) in
        [(0usize, &b"XFSB"[..], "XFS"), (3, b"NTFS    ", "NTFS"), (4086, b"SWAPSPACE2", "swap")]
    {
        let mut bytes = vec![0u8; 1 << 20];
        bytes[offset..offset + magic.len()].copy_from_slice(magic);
        let disk: Arc<dyn ReadAt> = Arc::new(bytes);
        let at = locate(disk.as_ref(), None).unwrap();
        let err = Volume::open(disk, &at).err().expect("refused");
        let text = err.to_string();
        assert!(matches!(err, Error::Unsupported { .. }), "{text}");
        assert!(text.contains(name), "{text}");
    }
    let err = locate(&vec![0u8; 1 << 20], Some(1)).unwrap_err();
    assert!(err.to_string().contains("no partition table"), "{err}");
}

#[test]
fn a_damaged_image_is_an_error_not_a_crash() {
    let f = fixture();
    let mut bytes = std::fs::read(&f.image).unwrap();
    // Trample the inode tables and directory blocks past the superblock and group descriptors.
    let mut x = 0x9e37_79b9_u32;
    for b in bytes[8192..4 << 20].iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let disk: Arc<dyn ReadAt> = Arc::new(bytes);
    // The superblock is intact: the volume opens, and what is trampled reads as damage.
    let at = locate(disk.as_ref(), None).unwrap();
    let vol = Volume::open(disk, &at).unwrap();
    let listed = vol.list(b"/", true, 100_000, &mut |_| {});
    assert!(matches!(listed, Err(Error::Damaged { .. })), "{listed:?}");
    let out = f.out.join("damaged");
    let err = vol.extract(b"/", &out, &ExtractOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Damaged { .. }), "{err}");
    let err = vol.scan(u64::MAX, &|| None).unwrap_err();
    assert!(matches!(err, Error::Damaged { .. }), "{err}");
}

#[test]
fn a_scan_reads_every_file_and_stops_reading_data_at_its_budget() {
    let f = fixture();
    let vol = volume(&f.image);
    let (mut files, mut bytes, mut links, mut folders, mut others) = (0u64, 0u64, 0u64, 1u64, 0u64);
    for rel in walk(&f.tree) {
        let meta = std::fs::symlink_metadata(f.tree.join(&rel)).unwrap();
        match () {
            _ if meta.is_file() => (files, bytes) = (files + 1, bytes + meta.len()),
            _ if meta.is_symlink() => links += 1,
            _ if meta.is_dir() => folders += 1,
            _ => others += 1,
        }
    }
    let report = vol.scan(u64::MAX, &|| None).unwrap();
    // lost+found is the volume's own folder, not the tree's.
    assert_eq!(report.folders, folders + 1, "{report:?}");
    assert_eq!((report.files, report.bytes, report.files_cut), (files, bytes, 0), "{report:?}");
    assert_eq!((report.links, report.others), (links, others), "{report:?}");
    // A budget smaller than the data: every entry still visited, data read up to it.
    let cut = vol.scan(1 << 20, &|| None).unwrap();
    assert_eq!(cut.files, files, "{cut:?}");
    assert_eq!(cut.files_cut, 2, "the 3 MB and the 10 MiB sparse files are not read: {cut:?}");
    assert_eq!(cut.bytes, bytes - 3_000_000 - (10 << 20), "every other file read whole");
    assert_eq!(cut.skipped, 0);
    // The caller may stop it (a time limit, Ctrl-C).
    let stopped = vol.scan(u64::MAX, &|| Some("time is up".into())).unwrap_err();
    assert!(matches!(&stopped, Error::Stopped(why) if why == "time is up"), "{stopped}");
}
