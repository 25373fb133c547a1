//! Snapshots on real file systems (root only): an ext4 guest file system in a disk image on
//! an XFS (reflink) loop mount, mounted through a second loop device, with an application
//! writing to it; and the thaw watchdog against `kill -9`, panics and its deadline.
//!
//! Only 8 loop devices exist on these machines: the tests take one lock and use at most three.

use cairn_testkit::{Loop, Mount, root_or_skip, sh};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

static LOOP_DEVICES: Mutex<()> = Mutex::new(());

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-agent"));
    cmd.env_remove("RUST_LOG").env_remove("CAIRN_FAILPOINT");
    // Vaults are encrypted by default; the tests' vaults use this passphrase.
    cmd.env("CAIRN_PASSPHRASE", "snapshot tests");
    cmd
}

/// True while `mount` is frozen: a second FIFREEZE fails with EBUSY. (When it is not
/// frozen the probe freezes it, and thaws it at once.)
fn is_frozen(mount: &Path) -> bool {
    let out = Command::new("fsfreeze").arg("-f").arg(mount).output().unwrap();
    if out.status.success() {
        sh("fsfreeze", &["-u", mount.to_str().unwrap()]);
        return false;
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Waits (up to `limit`) for `mount` to be thawed; true if it was.
fn thawed_within(mount: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !is_frozen(mount) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The application: appends a record, then separately rewrites a checksum of all records.
/// Between the two its files are inconsistent; it pauses between iterations when asked.
const APP: &str = r#"#!/bin/bash
d=$1; ctl=$2; n=0
mkdir -p "$d"
while [ ! -e "$ctl/stop" ]; do
  if [ -e "$ctl/pause" ]; then
    touch "$ctl/paused"
    while [ -e "$ctl/pause" ]; do sleep 0.01; done
    rm -f "$ctl/paused"
  fi
  n=$((n+1))
  printf 'record %06d %s\n' "$n" "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >> "$d/records"
  sha256sum < "$d/records" > "$d/records.sum"
done
"#;

/// The application's own check: the checksum matches the records.
fn app_consistent(dir: &Path) -> bool {
    let records = std::fs::read(dir.join("records")).unwrap_or_default();
    let sum = std::fs::read_to_string(dir.join("records.sum")).unwrap_or_default();
    let out =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(
            |mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&records)?;
                c.wait_with_output()
            },
        );
    !records.is_empty() && out.map(|o| String::from_utf8_lossy(&o.stdout) == sum).unwrap_or(false)
}

/// An XFS file system on a loop device holding the guest's disk image, whose ext4 file
/// system is mounted through a second loop device.
struct Guest {
    dir: tempfile::TempDir,
    _guest_mount: Option<Mount>,
    _guest_loop: Option<Loop>,
    _xfs_mount: Option<Mount>,
    _xfs_loop: Option<Loop>,
}

impl Guest {
    fn new() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let xfs_img = p("xfs.img");
        std::fs::File::create(&xfs_img).unwrap().set_len(1 << 30).unwrap();
        sh("mkfs.xfs", &["-q", "-m", "reflink=1", xfs_img.to_str().unwrap()]);
        let xfs_loop = Loop::attach(&xfs_img);
        let xfs_mount = Mount::new(&xfs_loop.0, &p("xfs"), &[]);
        let image = p("xfs/guest.img");
        std::fs::File::create(&image).unwrap().set_len(256 << 20).unwrap();
        sh("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let guest_loop = Loop::attach(&image);
        let guest_mount = Mount::new(&guest_loop.0, &p("guest"), &[]);
        std::fs::create_dir_all(p("ctl")).unwrap();
        Guest {
            dir,
            _guest_mount: Some(guest_mount),
            _guest_loop: Some(guest_loop),
            _xfs_mount: Some(xfs_mount),
            _xfs_loop: Some(xfs_loop),
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.p(name).to_str().unwrap().to_string()
    }

    fn vault(&self) -> String {
        let v = self.s("vault");
        if !self.p("vault").exists() {
            let out = agent().args(["init", "--vault", &v]).output().unwrap();
            assert!(out.status.success());
        }
        v
    }

    fn file(&self, name: &str, mode: u32, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.p(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// Pre-script: ask the application to pause and wait until it has; post: let it go.
    fn scripts(&self) -> PathBuf {
        let pre = self.file(
            "pre.sh",
            0o700,
            "#!/bin/bash\ntouch \"$1/pause\"\nfor i in $(seq 2000); do [ -e \"$1/paused\" ] && exit 0; sleep 0.01; done\nexit 1\n",
        );
        let post = self.file("post.sh", 0o700, "#!/bin/bash\nrm -f \"$1/pause\"\n");
        let ctl = self.s("ctl");
        self.file(
            "VMSnapshotScriptPluginConfig.json",
            0o600,
            &format!(
                r#"{{"pluginName": "ScriptRunner", "preScriptLocation": "{}", "postScriptLocation": "{}",
"preScriptParams": ["{ctl}"], "postScriptParams": ["{ctl}"], "preScriptNoOfRetries": 0, "postScriptNoOfRetries": 1,
"timeoutInSeconds": 30, "continueBackupOnFailure": false, "fsFreezeEnabled": true, "ScriptsExecutionPollTimeSeconds": 2}}"#,
                pre.display(),
                post.display()
            ),
        )
    }

    /// A VM configuration freezing the guest mount; with scripts when given.
    fn config(&self, name: &str, scripts: Option<&Path>, watchdog_seconds: u64) -> String {
        let scripts = scripts
            .map(|s| format!("[scripts]\nconfig = \"{}\"\n", s.display()))
            .unwrap_or_default();
        let text = format!(
            "vm = \"guest\"\n[freeze]\nmounts = [\"{}\"]\nwatchdog_seconds = {watchdog_seconds}\n{scripts}[[disk]]\nname = \"root\"\npath = \"{}\"\nview = \"reflink\"\n",
            self.s("guest"),
            self.s("xfs/guest.img")
        );
        self.file(name, 0o600, &text);
        self.s(name)
    }

    fn start_app(&self) -> Child {
        let app = self.file("app.sh", 0o755, APP);
        let child = Command::new(app).arg(self.p("guest/app")).arg(self.p("ctl")).spawn().unwrap();
        let start = Instant::now();
        while std::fs::read_to_string(self.p("guest/app/records"))
            .map(|r| r.lines().count())
            .unwrap_or(0)
            < 50
        {
            assert!(start.elapsed() < Duration::from_secs(60), "the application does not write");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn stop_app(&self, mut app: Child) {
        std::fs::write(self.p("ctl/stop"), b"").unwrap();
        let _ = std::fs::remove_file(self.p("ctl/pause"));
        app.wait().unwrap();
        std::fs::remove_file(self.p("ctl/stop")).unwrap();
    }

    /// Backs up with `config`, restores the disk, checks it with e2fsck and returns the
    /// manifest and whether the application's files were consistent in the restored disk.
    fn backup_restore_check(&self, config: &str, tag: &str) -> (serde_json::Value, bool) {
        let vault = self.vault();
        let out = agent()
            .args(["--config", config, "backup", "--json", "--vault", &vault])
            .output()
            .unwrap();
        assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
        let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let point = manifest["point"].as_str().unwrap().to_string();
        // The view is gone after the commit.
        let leftovers: Vec<_> = std::fs::read_dir(self.p("xfs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("cairn-view"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let restored = self.s(&format!("restored-{tag}.img"));
        let out = agent()
            .args([
                "restore", "--vault", &vault, "--vm", "guest", "--point", &point, "--disk", "root",
                "--to", &restored,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
        let fsck = Command::new("e2fsck").args(["-fn", &restored]).output().unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck -fn found problems: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        let restored_loop = Loop::attach(Path::new(&restored));
        let mount =
            Mount::new(&restored_loop.0, &self.p(&format!("check-{tag}")), &["-o", "ro,noload"]);
        let consistent = app_consistent(&mount.0.join("app"));
        drop(mount);
        drop(restored_loop);
        (manifest, consistent)
    }
}

fn evidence<'a>(manifest: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    manifest["evidence"].as_array().unwrap().iter().filter(|e| e["kind"] == kind).collect()
}

#[test]
fn root_a_running_application_is_captured_consistent_only_when_quiesced() {
    if !root_or_skip() {
        return;
    }
    let _serial = LOOP_DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    let g = Guest::new();
    let app = g.start_app();

    // With the scripts: application-consistent, and the application's own check passes.
    let config = g.config("vm-scripts.toml", Some(&g.scripts()), 30);
    let (manifest, consistent) = g.backup_restore_check(&config, "scripts");
    assert_eq!(manifest["consistency"], "application", "{manifest:#}");
    assert!(consistent, "the application's check failed on an application-consistent point");
    let scripts = evidence(&manifest, "script");
    assert_eq!(scripts.len(), 2, "{manifest:#}");
    assert!(scripts.iter().all(
        |s| s["details"]["succeeded"] == true && s["details"]["attempts"][0]["exit_code"] == 0
    ));
    let freeze = evidence(&manifest, "freeze");
    let freeze_ms = freeze[0]["details"]["freeze_ms"].as_f64().unwrap();
    eprintln!("freeze (FIFREEZE to FITHAW) with scripts: {freeze_ms:.2} ms");
    assert!(freeze_ms > 0.0);
    assert!(!is_frozen(&g.p("guest")));

    // Without scripts: file-system consistent; e2fsck is still clean.
    let config = g.config("vm-freeze.toml", None, 30);
    let (manifest, consistent) = g.backup_restore_check(&config, "freeze");
    assert_eq!(manifest["consistency"], "file_system", "{manifest:#}");
    let freeze_ms = evidence(&manifest, "freeze")[0]["details"]["freeze_ms"].as_f64().unwrap();
    eprintln!("freeze without scripts: {freeze_ms:.2} ms; application check passed: {consistent}");

    // The points list shows the level and the evidence.
    let out = agent().args(["points", "--vault", &g.vault(), "--vm", "guest"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("application") && text.contains("file_system"), "{text}");
    assert!(text.contains("pre-script") && text.contains("frozen for"), "{text}");
    g.stop_app(app);

    // The file system holding the disk images (where views are written) is never frozen.
    let bad = g.file(
        "vm-bad.toml",
        0o600,
        &format!(
            "vm = \"guest\"\n[freeze]\nmounts = [\"{}\"]\n[[disk]]\nname = \"root\"\npath = \"{}\"\n",
            g.s("xfs"),
            g.s("xfs/guest.img")
        ),
    );
    let out = agent()
        .args(["--config", bad.to_str().unwrap(), "backup", "--vault", &g.vault()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("refusing to freeze") && err.contains("disk root and its views"), "{err}");
    assert!(!is_frozen(&g.p("xfs")));
}

/// Starts a backup that stops while frozen (the failpoint), and waits until the agent says
/// the file system is frozen. Returns the agent and the lines it logged.
fn backup_frozen(g: &Guest, config: &str, failpoint: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = agent()
        .args(["-v", "--config", config, "backup", "--vault", &g.vault()])
        .env("CAIRN_FAILPOINT", failpoint)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the agent never froze");
        if line.contains("file system frozen") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60));
    }
    (child, rx)
}

#[test]
fn root_the_watchdog_thaws_when_the_agent_is_killed_or_panics_or_hangs() {
    if !root_or_skip() {
        return;
    }
    let _serial = LOOP_DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    let g = Guest::new();
    let guest = g.p("guest");

    // kill -9 while frozen: no code of the agent runs, the watchdog sees its pipe close.
    let config = g.config("vm-long.toml", None, 600);
    let (mut child, _) = backup_frozen(&g, &config, "while-quiesced=sleep:120000");
    assert!(is_frozen(&guest), "the failpoint holds the freeze");
    // What stops a service (systemd's SIGTERM to every process, a hang-up) does not stop
    // the watchdog.
    let watchdog = sh("pgrep", &["-P", &child.id().to_string(), "-f", "watchdog-thaw"]);
    for signal in ["-TERM", "-HUP", "-INT"] {
        sh("kill", &[signal, &watchdog]);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(thawed_within(&guest, Duration::from_secs(20)), "not thawed after kill -9");

    // A panic while frozen: the agent fails, and the file system is thawed when it exits.
    let (mut child, lines) = backup_frozen(&g, &config, "while-quiesced=panic");
    let status = child.wait().unwrap();
    assert!(!status.success());
    let logged: Vec<String> = lines.try_iter().collect();
    assert!(logged.iter().any(|l| l.contains("file systems thawed")), "{logged:?}");
    assert!(!is_frozen(&guest), "still frozen after a panic");

    // Nothing was committed by either of them.
    let out = agent().args(["points", "--vault", &g.vault()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("no recovery points"));

    // A slow agent: the watchdog's 1 s deadline thaws before the agent (held 3 s by the
    // failpoint) does. The agent finds the file system thawed behind its back and commits
    // the point as crash-consistent only, saying why.
    let config = g.config("vm-short.toml", None, 1);
    let (child, _) = backup_frozen(&g, &config, "while-quiesced=sleep:3000");
    assert!(thawed_within(&guest, Duration::from_secs(20)), "the deadline did not thaw");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let out = agent().args(["points", "--json", "--vault", &g.vault()]).output().unwrap();
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let point = &listing["points"][0];
    assert_eq!(point["consistency"], "crash", "{point:#}");
    let fallback = evidence(point, "fallback");
    assert!(
        fallback.iter().any(|f| f["message"].as_str().unwrap().contains("watchdog thawed")),
        "{point:#}"
    );
}

#[test]
fn root_btrfs_snapshots_and_reflink_clones_capture_a_disk() {
    if !root_or_skip() {
        return;
    }
    let _serial = LOOP_DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| p(n).to_str().unwrap().to_string();
    let img = p("btrfs.img");
    std::fs::File::create(&img).unwrap().set_len(512 << 20).unwrap();
    sh("mkfs.btrfs", &["-q", "-f", img.to_str().unwrap()]);
    let device = Loop::attach(&img);
    let _mount = Mount::new(&device.0, &p("btrfs"), &[]);
    let disk = s("btrfs/os.img");
    let out =
        agent().args(["sample", "create", &disk, "--size", "48M", "--seed", "9"]).output().unwrap();
    assert!(out.status.success());
    let vault = s("vault");
    assert!(agent().args(["init", "--vault", &vault]).output().unwrap().status.success());

    for view in ["btrfs-snapshot", "reflink"] {
        let config = p(&format!("{view}.toml"));
        std::fs::write(
            &config,
            format!("vm = \"b\"\n[[disk]]\nname = \"os\"\npath = \"{disk}\"\nview = \"{view}\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let config = config.to_str().unwrap();
        let out = agent().args(["--config", config, "config", "check"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let out = agent()
            .args(["--config", config, "backup", "--json", "--vault", &vault])
            .output()
            .unwrap();
        assert!(out.status.success(), "{view}: {}", String::from_utf8_lossy(&out.stderr));
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(m["consistency"], "crash", "{m:#}");
        let views = evidence(&m, "view");
        assert!(
            views[0]["message"].as_str().unwrap().starts_with(&format!("{view} view")),
            "{m:#}"
        );
        let restored = s(&format!("restored-{view}.img"));
        let point = m["point"].as_str().unwrap();
        let out = agent()
            .args([
                "restore", "--vault", &vault, "--vm", "b", "--point", point, "--disk", "os",
                "--to", &restored,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(&restored).unwrap(), std::fs::read(&disk).unwrap(), "{view}");
    }
    // Every view was removed after its commit.
    let left: Vec<_> = std::fs::read_dir(p("btrfs/.cairn-views")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    let names: Vec<_> = std::fs::read_dir(p("btrfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".cairn-view-")), "{names:?}");
}
