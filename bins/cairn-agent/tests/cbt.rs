//! qcow2 disks with changed-block tracking, end to end through the agent: the bitmap
//! rotation, incrementals that read only what the bitmap marks, and the fallbacks. Needs
//! qemu-img, qemu-io and qemu-nbd (Debian: qemu-utils), which `scripts/test.sh` installs.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env_remove("RUST_LOG")
        // Vaults are encrypted by default; the tests' vaults use this passphrase.
        .env("CAIRN_PASSPHRASE", "cbt tests")
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn tool(program: &str, args: &[&str]) -> Vec<u8> {
    let out =
        Command::new(program).args(args).stderr(Stdio::piped()).output().unwrap_or_else(|e| {
            panic!("{program} cannot run ({e}); install qemu-utils (scripts/test.sh does)")
        });
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn bitmaps(image: &str) -> Vec<String> {
    let info: serde_json::Value =
        serde_json::from_slice(&tool("qemu-img", &["info", "--output=json", image])).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| a.iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn kinds(m: &serde_json::Value) -> Vec<(String, String)> {
    m["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (e["kind"].as_str().unwrap().to_owned(), e["message"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// Restores the point's disk and checks it against `qemu-img convert` of the image.
fn restores_identically(dir: &Path, vault: &str, point: &str, image: &str) {
    let out = dir.join(format!("restored-{point}.raw"));
    let want = dir.join(format!("want-{point}.raw"));
    ok(agent(&[
        "restore",
        "--vault",
        vault,
        "--vm",
        "web",
        "--point",
        point,
        "--disk",
        "os",
        "--to",
        out.to_str().unwrap(),
    ]));
    tool("qemu-img", &["convert", "-O", "raw", image, want.to_str().unwrap()]);
    tool("cmp", &[out.to_str().unwrap(), want.to_str().unwrap()]);
}

#[test]
fn qcow2_incrementals_read_only_the_dirty_ranges_and_fall_back_when_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (vault, raw, image) = (s("vault"), s("seed.raw"), s("os.qcow2"));
    ok(agent(&["init", "--vault", &vault]));
    ok(agent(&["sample", "create", &raw, "--size", "128M", "--seed", "1"]));
    tool("qemu-img", &["convert", "-O", "qcow2", &raw, &image]);
    let disk = format!("os={image},format=qcow2");
    let backup =
        || ok(agent(&["backup", "--json", "--vault", &vault, "--vm", "web", "--disk", &disk]));

    // First point: a full scan, and the bitmap for the next one is started.
    let p1 = backup();
    let id1 = p1["point"].as_str().unwrap().to_owned();
    assert_eq!(bitmaps(&image), vec![format!("cairn:web:os:{id1}")]);
    restores_identically(dir.path(), &vault, &id1, &image);

    // 16 MiB contiguous and scattered 4 KiB writes: only those are read (plus the sample).
    let mut ops = vec!["write -P 0x41 32M 16M".to_owned()];
    ops.extend((0..20).map(|i| format!("write -P 0x42 {} 4k", (i * 5 + 3) << 20)));
    let mut io = vec!["-f", "qcow2"];
    for op in &ops {
        io.extend(["-c", op]);
    }
    io.push(&image);
    tool("qemu-io", &io);
    let p2 = backup();
    let id2 = p2["point"].as_str().unwrap().to_owned();
    let ev = kinds(&p2);
    assert!(
        ev.iter().any(|(k, m)| k == "cbt" && m.contains(&format!("cairn:web:os:{id1}"))),
        "{ev:?}"
    );
    let scanned = p2["disks"]["os"]["stats"]["bytes_scanned"].as_u64().unwrap();
    assert!(scanned < 20 << 20, "read {scanned} bytes for 16.1 MiB of writes");
    assert_eq!(bitmaps(&image), vec![format!("cairn:web:os:{id2}")]);
    restores_identically(dir.path(), &vault, &id2, &image);

    // A writer killed with the image open leaves the bitmap in-use: the next backup does not
    // trust it, says why, and still gets every change.
    let sock = s("nbd.sock");
    let mut server = Command::new("qemu-nbd")
        .args(["--persistent", "--format=qcow2", &format!("--socket={sock}"), &image])
        .spawn()
        .unwrap();
    while !Path::new(&sock).exists() {
        std::thread::yield_now();
    }
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x43 100M 4k", &format!("nbd+unix:///?socket={sock}")],
    );
    server.kill().unwrap();
    server.wait().unwrap();
    let p3 = backup();
    let id3 = p3["point"].as_str().unwrap().to_owned();
    let ev = kinds(&p3);
    assert!(ev.iter().any(|(k, m)| k == "cbt_fallback" && m.contains("in-use")), "{ev:?}");
    assert_eq!(p3["disks"]["os"]["stats"]["bytes_changed"].as_u64(), Some(64 << 10));
    assert_eq!(bitmaps(&image), vec![format!("cairn:web:os:{id3}")]);
    restores_identically(dir.path(), &vault, &id3, &image);

    // A disk of another size is scanned in full, whatever its bitmap says.
    tool("qemu-img", &["resize", "-f", "qcow2", &image, "192M"]);
    let p4 = backup();
    let ev = kinds(&p4);
    assert!(ev.iter().any(|(k, m)| k == "full_scan" && m.contains("size changed")), "{ev:?}");
    assert!(!ev.iter().any(|(k, _)| k == "cbt"), "{ev:?}");
    restores_identically(dir.path(), &vault, p4["point"].as_str().unwrap(), &image);
    ok(agent(&["verify", "--vault", &vault]));
}

/// A guest writes a qcow2 header into its raw disk, naming a host file as backing file: the
/// disk is still read as the raw bytes the guest wrote, the host file is not read, and the
/// disk file is not changed (no bitmap written into it).
#[test]
fn a_raw_disk_that_starts_like_qcow2_is_backed_up_as_its_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (vault, secret, header, raw) = (s("vault"), s("secret"), s("evil.qcow2"), s("guest.raw"));
    ok(agent(&["init", "--vault", &vault]));
    std::fs::write(&secret, b"root:$6$hostsecret".repeat(1000)).unwrap();
    tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &secret, "-F", "raw", &header, "1M"]);
    // The guest's disk: 8 MiB whose first bytes are that header, the rest its own data.
    let mut bytes = std::fs::read(&header).unwrap();
    bytes.resize(8 << 20, 0x5a);
    std::fs::write(&raw, &bytes).unwrap();

    let point = ok(agent(&[
        "backup",
        "--json",
        "--vault",
        &vault,
        "--vm",
        "g",
        "--disk",
        &format!("os={raw}"),
    ]));
    assert_eq!(
        point["disks"]["os"]["size"].as_u64(),
        Some(8 << 20),
        "the raw file, not the qcow2 view"
    );
    let ev = kinds(&point);
    assert!(ev.iter().any(|(k, m)| k == "disk_format" && m.contains("read as raw")), "{ev:?}");
    assert_eq!(std::fs::read(&raw).unwrap(), bytes, "the disk file is unchanged");
    let out = dir.path().join("restored.raw");
    ok(agent(&[
        "restore",
        "--json",
        "--vault",
        &vault,
        "--vm",
        "g",
        "--disk",
        "os",
        "--to",
        out.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}

/// A declared qcow2 image is read through qemu only when its header opens nothing else: a
/// backing file needs the operator's leave, an external data file or a json: backing name is
/// refused always, and nothing is written into a refused image.
#[test]
fn declared_qcow2_images_with_backing_or_data_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (vault, base, top, data, ext) =
        (s("vault"), s("base.raw"), s("top.qcow2"), s("data.raw"), s("ext.qcow2"));
    ok(agent(&["init", "--vault", &vault]));
    ok(agent(&["sample", "create", &base, "--size", "4M", "--seed", "3"]));
    tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &top]);
    let before = std::fs::read(&top).unwrap();
    let backup = |disk: String| {
        agent(&["backup", "--json", "--vault", &vault, "--vm", "web", "--disk", &disk])
    };
    let refused = backup(format!("os={top},format=qcow2"));
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("has a backing file") && err.contains("backing=allow"), "{err}");
    assert_eq!(std::fs::read(&top).unwrap(), before, "no bitmap was added to a refused image");

    let allowed = ok(backup(format!("os={top},format=qcow2,backing=allow")));
    restores_identically(dir.path(), &vault, allowed["point"].as_str().unwrap(), &top);

    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &format!("data_file={data}"), &ext, "4M"],
    );
    let refused = backup(format!("data={ext},format=qcow2,backing=allow"));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("external data file"));
}

/// Two disks named alike (`--disk` names a disk after its file) are refused before anything is
/// written: no bitmap is added to either image.
#[test]
fn two_disks_of_one_name_are_refused_before_any_bitmap_is_added() {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let vault = s("vault");
    ok(agent(&["init", "--vault", &vault]));
    std::fs::create_dir(dir.path().join("a")).unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    let (a, b) = (s("a/disk.qcow2"), s("b/disk.qcow2"));
    for image in [&a, &b] {
        tool("qemu-img", &["create", "-q", "-f", "qcow2", image, "4M"]);
    }
    let out = agent(&[
        "backup",
        "--vault",
        &vault,
        "--vm",
        "web",
        "--disk",
        &format!("{a},format=qcow2"),
        "--disk",
        &format!("{b},format=qcow2"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("two disks are named disk.qcow2"));
    assert!(bitmaps(&a).is_empty() && bitmaps(&b).is_empty());
}
