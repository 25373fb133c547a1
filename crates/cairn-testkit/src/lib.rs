//! Helpers shared by the test suites of several Cairn crates. Only what more than one crate's
//! tests need lives here; a crate's own helpers stay in its `tests/`.

/// True when the test runs as root and may go on. As non-root it prints
/// "skipped: needs root" and returns false, unless `CAIRN_REQUIRE_ROOT_TESTS` is set (as
/// `scripts/test.sh` does when run as root), where a skip would hide a test: then it panics.
pub fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CAIRN_REQUIRE_ROOT_TESTS").is_none(),
        "CAIRN_REQUIRE_ROOT_TESTS is set but the tests do not run as root"
    );
    eprintln!("skipped: needs root");
    false
}

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs a command and returns its output, failing the test with its stderr if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out =
        Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop device over a file (root only), detached when dropped.
pub struct Loop(pub String);

impl Loop {
    /// Attaches `file` to the first free loop device.
    pub fn attach(file: &Path) -> Loop {
        Loop(sh("losetup", &["--find", "--show", file.to_str().unwrap_or_default()]))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mount (root only), thawed (in case a test failed while it was frozen) and unmounted when
/// dropped.
pub struct Mount(pub PathBuf);

impl Mount {
    /// Mounts `device` (or a file system type's source, such as `tmpfs`) on `dir`, creating
    /// the folder, with `options` given to mount(8) before the device.
    pub fn new(device: &str, dir: &Path, options: &[&str]) -> Mount {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut args = options.to_vec();
        args.extend([device, dir.to_str().unwrap_or_default()]);
        sh("mount", &args);
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).stderr(Stdio::null()).status();
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fewest inputs a fuzz target's committed corpus may hold: a missing or emptied corpus fails.
const MIN_CORPUS: usize = 5;

/// Replays the committed corpus of fuzz target `target`, `fuzz/corpus/<target>/`, through
/// `body` (the very function the fuzz target runs), naming every input that panics. Fails when
/// the corpus is missing or holds fewer than five inputs.
pub fn replay_corpus(target: &str, body: fn(&[u8])) {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    assert!(dir.is_dir(), "the fuzz corpus {} is missing", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= MIN_CORPUS,
        "the fuzz corpus {} holds {} files, fewer than {MIN_CORPUS}",
        dir.display(),
        files.len()
    );
    let mut failed = Vec::new();
    for path in &files {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(a panic without a message)");
            failed.push(format!("{}: {message}", path.display()));
        }
    }
    assert!(failed.is_empty(), "{target} panicked on {} input(s): {failed:#?}", failed.len());
}

/// Vault URLs, each under a fresh prefix, in the object-store emulators that
/// `scripts/object-stores.sh` started (`CAIRN_TEST_S3`, `CAIRN_TEST_AZURE`): `(backend, url)`.
/// A backend whose variable is unset is left out with "skipped: ..." on stderr, unless
/// `CAIRN_REQUIRE_OBJECT_STORES` is set (as `scripts/test.sh` does): then a skip would hide a
/// test, and it panics.
pub fn object_store_urls() -> Vec<(&'static str, String)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut urls = Vec::new();
    for (backend, var) in [("s3", "CAIRN_TEST_S3"), ("azure", "CAIRN_TEST_AZURE")] {
        match std::env::var(var) {
            Ok(root) if !root.is_empty() => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default();
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let unique = format!("t{nanos:x}-{}-{n}", std::process::id());
                urls.push((backend, format!("{}/{unique}", root.trim_end_matches('/'))));
            }
            _ => {
                assert!(
                    std::env::var_os("CAIRN_REQUIRE_OBJECT_STORES").is_none(),
                    "CAIRN_REQUIRE_OBJECT_STORES is set but {var} is not: start the emulators \
                     with scripts/object-stores.sh"
                );
                eprintln!("skipped: {backend} ({var} unset; scripts/test.sh starts the emulator)");
            }
        }
    }
    urls
}

pub mod qemu;

/// Every path under `root`, relative and sorted, links not followed, with a top-level
/// `lost+found` (which `mkfs.ext4` adds) left out: the tree a file-level recovery test compares.
pub fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel == std::path::Path::new("lost+found") {
                continue;
            }
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                pending.push(p.clone());
            }
            out.push(rel);
        }
    }
    out.sort();
    out
}

/// Writes the partition table `script` (sfdisk's input, e.g. `label: gpt\nstart=2048, type=L\n`)
/// onto the image file or device `disk`.
pub fn partition(disk: &str, script: &str) {
    let mut sfdisk = std::process::Command::new("sfdisk")
        .args(["-q", disk])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (Debian fdisk) runs");
    std::io::Write::write_all(&mut sfdisk.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk wrote the table of {disk}");
}

/// A CA and a certificate it signed for 127.0.0.1 (EC P-256, two days), made with openssl in
/// `dir`: (the CA's certificate, the certificate, its key), all PEM.
pub fn tls_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let f = |name: &str| dir.join(name);
    let s = |name: &str| f(name).to_str().unwrap().to_owned();
    std::fs::write(f("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        .unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let runs: [Vec<String>; 3] = [
        [&["req", "-x509"][..], &ec, &["-keyout", &s("ca.key"), "-out", &s("ca.pem")]]
            .concat()
            .iter()
            .chain(&["-days", "2", "-subj", "/CN=Cairn test CA"])
            .map(|a| a.to_string())
            .collect(),
        [&["req"][..], &ec, &["-keyout", &s("tls.key"), "-out", &s("tls.csr")]]
            .concat()
            .iter()
            .chain(&["-subj", "/CN=127.0.0.1"])
            .map(|a| a.to_string())
            .collect(),
        ["x509", "-req", "-in", &s("tls.csr"), "-CA", &s("ca.pem"), "-CAkey", &s("ca.key")]
            .iter()
            .chain(&["-CAcreateserial", "-out", &s("tls.pem"), "-days", "2"])
            .chain(&["-extfile", &s("ext.cnf")])
            .map(|a| a.to_string())
            .collect(),
    ];
    for args in runs {
        let out = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl (Debian openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (f("ca.pem"), f("tls.pem"), f("tls.key"))
}
