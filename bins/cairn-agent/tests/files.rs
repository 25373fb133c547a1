//! File-level recovery from a point, straight from the vault: `files partitions`, `ls` and
//! `get` on a GPT disk whose ext4 partition holds this machine's Debian documentation tree
//! (`/usr/share/doc`, as Debian's packages installed it, through `mkfs.ext4 -d`), every file
//! compared with the source; one small file fetches a small fraction of the disk's chunks.
//! As root, the same on the Debian guest image (`scripts/guest-image.sh`) compared with a
//! read-only mount of it, owners included. Bad input: a missing path, a partition with no
//! file system or with XFS, a partition that does not exist, a missing point, an existing
//! target, a damaged chunk.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cairn_testkit::walk;
use std::time::Instant;

use support::{agent, ok, pack_files, tool};

/// Asserts `got` holds what `want` holds: the same paths, kinds, sizes, contents, modes
/// (set-ID bits dropped as extraction does), symlink targets and modification seconds, and
/// with `owners`, the same owners.
fn same_tree(want: &Path, got: &Path, owners: bool) -> usize {
    // Device nodes, pipes and sockets are never extracted.
    let special = |p: &PathBuf| {
        use std::os::unix::fs::FileTypeExt;
        let t = std::fs::symlink_metadata(want.join(p)).unwrap().file_type();
        t.is_char_device() || t.is_block_device() || t.is_fifo() || t.is_socket()
    };
    let paths: Vec<PathBuf> = walk(want).into_iter().filter(|p| !special(p)).collect();
    let extracted = walk(got);
    let missing: Vec<_> =
        paths.iter().filter(|p| extracted.binary_search(p).is_err()).take(10).collect();
    let extra: Vec<_> =
        extracted.iter().filter(|p| paths.binary_search(p).is_err()).take(10).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
    for rel in &paths {
        let (a, b) = (want.join(rel), got.join(rel));
        let (ma, mb) =
            (std::fs::symlink_metadata(&a).unwrap(), std::fs::symlink_metadata(&b).unwrap());
        let what = rel.display();
        assert_eq!(ma.file_type(), mb.file_type(), "{what}");
        assert_eq!(ma.mtime(), mb.mtime(), "{what}");
        if owners {
            assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{what}");
        }
        if ma.is_symlink() {
            assert_eq!(std::fs::read_link(&a).unwrap(), std::fs::read_link(&b).unwrap(), "{what}");
            continue;
        }
        let mode = if ma.is_file() { ma.mode() & 0o1777 } else { ma.mode() & 0o7777 };
        assert_eq!(mb.mode() & 0o7777, mode, "{what}");
        if ma.is_file() {
            assert_eq!(ma.len(), mb.len(), "{what}");
            assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "{what} differs");
        }
    }
    paths.len()
}

/// `files <verb> --json` on disk `os` of VM `web`.
fn files(vault: &str, verb: &str, extra: &[&str]) -> std::process::Output {
    let args = ["files", verb, "--json", "--vault", vault, "--vm", "web", "--disk", "os"];
    agent(&[&args[..], extra].concat())
}

fn failed(out: std::process::Output) -> String {
    assert!(!out.status.success(), "should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Bytes of the tree at `root`.
fn tree_bytes(root: &Path) -> u64 {
    walk(root).iter().map(|p| std::fs::symlink_metadata(root.join(p)).unwrap().len()).sum()
}

#[test]
fn files_come_out_of_a_point_without_restoring_the_disk() {
    let source = Path::new("/usr/share/doc");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_str().unwrap().to_owned();
    let vault = s("vault");
    ok(agent(&["init", "--vault", &vault]));

    // A GPT disk: partition 1 empty (an EFI partition never formatted), partition 2 ext4
    // holding the tree, sized to it.
    let mib = ((tree_bytes(source) * 2) >> 20) + 96;
    let disk = s("os.raw");
    std::fs::File::create(&disk).unwrap().set_len((mib + 4) << 20).unwrap();
    let table = "label: gpt\nstart=2048, size=4096, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, \
                 name=efi\nstart=6144, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n";
    cairn_testkit::partition(&disk, table);
    let offset = format!("offset={}", 6144 * 512);
    let blocks = (((mib + 4) << 20) - 6144 * 512 - (1 << 20)) / 4096;
    tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            &offset,
            "-d",
            "/usr/share/doc",
            &disk,
            &blocks.to_string(),
        ],
    );
    ok(agent(&[
        "backup",
        "--json",
        "--vault",
        &vault,
        "--vm",
        "web",
        "--disk",
        &format!("os={disk}"),
    ]));

    // The partitions, with the file system of each.
    let parts = ok(files(&vault, "partitions", &[]));
    assert_eq!(parts["table"], "gpt");
    let fs: Vec<&str> =
        parts["partitions"].as_array().unwrap().iter().map(|p| p["fs"].as_str().unwrap()).collect();
    assert_eq!(fs, ["unknown", "ext4"]);
    assert_eq!(parts["partitions"][1]["name"], "root");

    // Everything listed, as in the source.
    let listed = ok(files(&vault, "ls", &["--recursive", "/"]));
    let mut paths: Vec<PathBuf> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| PathBuf::from(&e["path"].as_str().unwrap()[1..]))
        .filter(|p| p != Path::new("lost+found"))
        .collect();
    paths.sort();
    let ascii: Vec<PathBuf> = walk(source)
        .into_iter()
        .filter(|p| p.to_str().is_some_and(|s| !s.contains('\\')))
        .collect();
    let mut ascii_listed = paths.clone();
    ascii_listed.retain(|p| ascii.binary_search(p).is_ok());
    assert_eq!(ascii_listed, ascii, "ls lists other files");
    for e in listed["entries"].as_array().unwrap().iter().take(500) {
        let src = source.join(&e["path"].as_str().unwrap()[1..]);
        let Ok(meta) = std::fs::symlink_metadata(&src) else { continue };
        assert_eq!(e["mode"], format!("{:04o}", meta.mode() & 0o7777), "{}", src.display());
        if meta.is_file() {
            assert_eq!(e["size"], meta.len(), "{}", src.display());
        }
    }

    // Everything extracted, as in the source.
    let started = Instant::now();
    let all = ok(files(&vault, "get", &["--to", &s("all"), "/"]));
    let seconds = started.elapsed().as_secs_f64();
    let count = same_tree(source, &p("all"), false);
    let bytes = all["bytes"].as_u64().unwrap();
    eprintln!(
        "files get /: {count} entries, {:.1} MiB in {seconds:.2} s ({:.0} MiB/s), {} chunks fetched of {} data blocks",
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / seconds,
        all["chunks_fetched"],
        all["data_blocks"]
    );

    // One small file: a small fraction of the disk's chunks, with and without read-ahead.
    let small = walk(source)
        .into_iter()
        .find(|r| {
            let m = std::fs::symlink_metadata(source.join(r)).unwrap();
            m.is_file() && m.len() > 100 && m.len() < 4096
        })
        .expect("a small file");
    let guest = format!("/{}", small.display());
    for read_ahead in ["0", "4"] {
        let to = s(&format!("one-{read_ahead}"));
        let one = ok(files(&vault, "get", &["--read-ahead-mib", read_ahead, "--to", &to, &guest]));
        let name = small.file_name().unwrap();
        assert_eq!(
            std::fs::read(Path::new(&to).join(name)).unwrap(),
            std::fs::read(source.join(&small)).unwrap()
        );
        let (fetched, data) =
            (one["chunks_fetched"].as_u64().unwrap(), one["data_blocks"].as_u64().unwrap());
        eprintln!(
            "files get {guest} (read-ahead {read_ahead} MiB): {fetched} chunks fetched of {data} ({:.2}%)",
            fetched as f64 * 100.0 / data as f64
        );
        assert!(fetched * 50 < data, "{fetched} chunks of {data} fetched for one small file");
    }

    // Bad input, each named.
    let err = failed(files(&vault, "get", &["--to", &s("x"), "/no/such/file"]));
    assert!(err.contains("/no/such/file: no such file"), "{err}");
    let err = failed(files(&vault, "ls", &["--partition", "1", "/"]));
    assert!(err.contains("partition 1") && err.contains("XFS and NTFS come next"), "{err}");
    let err = failed(files(&vault, "ls", &["--partition", "7", "/"]));
    assert!(err.contains("--partition 7") && err.contains("ext4"), "{err}");
    let err = failed(files(&vault, "ls", &["--point", "20200101T000000.000Z-00000000", "/"]));
    assert!(err.contains("20200101T000000.000Z-00000000"), "{err}");
    let err = failed(files(&vault, "get", &["--to", &s("all"), "/"]));
    assert!(err.contains("exists already"), "{err}");
    let err = failed(files(&vault, "ls", &["relative/path"]));
    assert!(err.contains("absolute"), "{err}");

    // An XFS disk: refused, naming it.
    let xfs = s("xfs.raw");
    std::fs::File::create(&xfs).unwrap().set_len(320 << 20).unwrap();
    tool("mkfs.xfs", &["-q", &xfs]);
    let args =
        ["backup", "--json", "--vault", &vault, "--vm", "store", "--disk", &format!("data={xfs}")];
    ok(agent(&args));
    let args = ["files", "ls", "--vault", &vault, "--vm", "store", "--disk", "data", "/"];
    let err = failed(agent(&args));
    assert!(err.contains("it holds XFS") && err.contains("serve-nbd"), "{err}");

    // A damaged chunk under a file: the extraction names the file system's read as failed.
    for pack in pack_files(Path::new(&vault)) {
        let mut bytes = std::fs::read(&pack).unwrap();
        let n = bytes.len();
        for b in &mut bytes[n / 4..n / 2] {
            *b ^= 0x5a;
        }
        std::fs::write(&pack, bytes).unwrap();
    }
    let err = failed(files(&vault, "get", &["--to", &s("damaged"), "/"]));
    assert!(err.contains("reading") || err.contains("damaged"), "{err}");
}

/// The Debian guest image built from Debian's packages, extracted whole from a point and
/// compared with a read-only mount of the same image, owners and times included.
#[test]
fn a_debian_system_comes_out_of_a_point_as_it_went_in() {
    if !cairn_testkit::root_or_skip() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/guest-image.sh");
    let cache =
        PathBuf::from(tool("bash", &[script.to_str().unwrap()]).trim().lines().last().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let vault = s("vault");
    ok(agent(&["init", "--vault", &vault]));
    let image = cache.join("guest.raw");
    let started = Instant::now();
    let point = ok(agent(&[
        "backup",
        "--json",
        "--vault",
        &vault,
        "--vm",
        "web",
        "--disk",
        &format!("os={}", image.display()),
    ]));
    eprintln!("backup of the guest image: {:.2} s", started.elapsed().as_secs_f64());
    assert!(point["point"].is_string());

    let started = Instant::now();
    let all = ok(files(&vault, "get", &["--to", &s("root"), "/"]));
    let seconds = started.elapsed().as_secs_f64();
    let mount = s("mnt");
    std::fs::create_dir(&mount).unwrap();
    let mounted = cairn_testkit::Mount::new(
        &image.display().to_string(),
        Path::new(&mount),
        &["-o", "ro,noload,loop,offset=1048576"],
    );
    let count = same_tree(Path::new(&mount), Path::new(&s("root")), true);
    drop(mounted);
    let bytes = all["bytes"].as_u64().unwrap();
    eprintln!(
        "files get / of the Debian guest: {count} entries, {:.1} MiB in {seconds:.2} s ({:.0} MiB/s), {} chunks of {} data blocks; {} set-ID bits dropped; skipped {}",
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / seconds,
        all["chunks_fetched"],
        all["data_blocks"],
        all["setid_dropped"],
        all["skipped"].as_array().unwrap().len()
    );
    assert!(all["setid_dropped"].as_u64().unwrap() > 0, "a Debian system has set-user-ID programs");

    let one =
        ok(files(&vault, "get", &["--read-ahead-mib", "0", "--to", &s("one"), "/etc/hostname"]));
    assert_eq!(
        std::fs::read_to_string(Path::new(&s("one")).join("hostname")).unwrap(),
        "cairn-guest\n"
    );
    let (fetched, data) =
        (one["chunks_fetched"].as_u64().unwrap(), one["data_blocks"].as_u64().unwrap());
    eprintln!(
        "files get /etc/hostname: {fetched} chunks fetched of {data} ({:.2}%)",
        fetched as f64 * 100.0 / data as f64
    );
    assert!(fetched * 100 < data, "{fetched} of {data}");
}
