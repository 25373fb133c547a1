//! A real guest: a small Debian system (built by `scripts/guest-image.sh` from Debian's
//! packages, cached outside the clone) booted under QEMU (TCG), with its guest agent and a
//! workload that writes continuously (SQLite inserts, one per transaction, and a log line after
//! each). Backed up full and incrementally while it writes, with the guest frozen through its
//! agent, then application-consistent with Cairn's hook in the guest running its pre- and
//! post-scripts; the last point restored and checked: the file system is clean, the database
//! passes its integrity check, the last insert the workload logged before the freeze is in it,
//! and exactly the inserts the pre-script saw. Then the point boots straight from the vault:
//! served over NBD by `serve-nbd`, a second QEMU boots from the export with its writes in a
//! local overlay, finds the database sound, and leaves the vault as it was.
//! Needs root (the image is built with mmdebstrap) and qemu-system-x86_64; CI sets
//! CAIRN_REQUIRE_GUEST so it cannot skip there.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_qemu::GuestAgent;
use cairn_testkit::qemu::qemu_or_skip;
use serde_json::json;
use support::{agent, evidence, fleecing_images, ok, tool};

/// The guest image, built (or found in its cache) by the script.
fn image() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/guest-image.sh");
    let out = tool("bash", &[script.to_str().unwrap()]);
    PathBuf::from(out.trim().lines().last().unwrap())
}

struct Guest {
    child: Child,
    qga: PathBuf,
    console: PathBuf,
}

impl Guest {
    /// Boots `disk` (of `format`; a qcow2 image's backing file, such as an NBD export, is
    /// opened from its header) with the image's kernel; sockets in `dir`.
    fn boot(dir: &Path, cache: &Path, disk: &Path, format: &str) -> Guest {
        let (qmp, qga, console) =
            (dir.join("qmp.sock"), dir.join("qga.sock"), dir.join("console.log"));
        for p in [&qmp, &qga] {
            let _ = std::fs::remove_file(p);
        }
        let child = Command::new("qemu-system-x86_64")
            .args(["-M", "q35", "-accel", "tcg", "-m", "512", "-smp", "1", "-nodefaults"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(cache.join("vmlinuz"))
            .arg("-initrd")
            .arg(cache.join("initrd.img"))
            .args(["-append", "root=/dev/vda1 rw console=ttyS0 quiet panic=-1"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-blockdev")
            .arg(format!("driver=file,filename={},node-name=os-file", disk.display()))
            .arg("-blockdev")
            .arg(format!("driver={format},file=os-file,node-name=os"))
            .args(["-device", "virtio-blk-pci,drive=os,id=virtio-disk0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=qga0", qga.display()))
            .args([
                "-device",
                "virtio-serial",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let guest = Guest { child, qga, console };
        guest.wait_for_agent();
        guest
    }

    fn wait_for_agent(&self) {
        let started = Instant::now();
        loop {
            if self.qga.exists()
                && let Ok(mut a) = GuestAgent::connect(&self.qga, Duration::from_secs(2))
                && a.ping().is_ok()
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "the guest agent did not answer within 300 s; console:\n{}",
                std::fs::read_to_string(&self.console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Runs a program in the guest through its agent; returns its output.
    fn exec(&self, path: &str, args: &[&str]) -> String {
        self.exec_all(path, args).0
    }

    /// Runs a program in the guest through its agent; returns its output and error output.
    fn exec_all(&self, path: &str, args: &[&str]) -> (String, String) {
        let mut a = GuestAgent::connect(&self.qga, Duration::from_secs(10)).unwrap();
        let started = a
            .execute(
                "guest-exec",
                json!({"path": path, "arg": args, "capture-output": true}),
                Duration::from_secs(10),
            )
            .unwrap();
        let pid = started["pid"].as_u64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = a
                .execute("guest-exec-status", json!({"pid": pid}), Duration::from_secs(10))
                .unwrap();
            if status["exited"] == json!(true) {
                let text = |k: &str| {
                    String::from_utf8_lossy(&base64(status[k].as_str().unwrap_or(""))).into_owned()
                };
                return (text("out-data"), text("err-data"));
            }
            assert!(Instant::now() < deadline, "{path} {args:?} did not exit in the guest");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The guest's clock, in seconds.
    fn clock(&self) -> f64 {
        self.exec("/usr/bin/date", &["+%s.%N"]).trim().parse().unwrap()
    }

    fn inserts(&self) -> u64 {
        let out = self.exec(
            "/usr/bin/sqlite3",
            &["/var/lib/work/db.sqlite", "SELECT coalesce(max(n), 0) FROM t;"],
        );
        out.trim().parse().unwrap_or(0)
    }

    /// Writes `bytes` to `path` in the guest through its agent, with `mode`.
    fn put(&self, path: &str, bytes: &[u8], mode: &str) {
        use base64::Engine;
        let mut a = GuestAgent::connect(&self.qga, Duration::from_secs(10)).unwrap();
        let t = Duration::from_secs(60);
        let handle = a.execute("guest-file-open", json!({"path": path, "mode": "w"}), t).unwrap();
        for chunk in bytes.chunks(256 << 10) {
            let data = base64::engine::general_purpose::STANDARD.encode(chunk);
            a.execute("guest-file-write", json!({"handle": handle, "buf-b64": data}), t).unwrap();
        }
        a.execute("guest-file-close", json!({"handle": handle}), t).unwrap();
        drop(a);
        self.exec("/usr/bin/chmod", &[mode, path]);
    }

    /// Installs Cairn's in-guest hook as a script of the guest agent's fsfreeze hook, with a
    /// script configuration whose pre-script stops the workload (noting its last insert in
    /// /var/lib/work/quiesced-at) and whose post-script starts it again.
    fn install_hook(&self, dir: &Path) {
        let hook = dir.join("cairn-guest-hook");
        tool("strip", &["-o", hook.to_str().unwrap(), env!("CARGO_BIN_EXE_cairn-guest-hook")]);
        self.exec("/usr/bin/mkdir", &["-p", "/etc/cairn", "/etc/qemu/fsfreeze-hook.d"]);
        self.put("/usr/local/sbin/cairn-guest-hook", &std::fs::read(&hook).unwrap(), "755");
        self.put(
            "/etc/qemu/fsfreeze-hook.d/cairn",
            b"#!/bin/sh\nexec /usr/local/sbin/cairn-guest-hook \"$@\"\n",
            "755",
        );
        self.put(
            "/etc/cairn/pre.sh",
            b"#!/bin/sh\nsystemctl stop cairn-workload\nsqlite3 /var/lib/work/db.sqlite 'SELECT max(n) FROM t;' > /var/lib/work/quiesced-at\n",
            "700",
        );
        self.put("/etc/cairn/post.sh", b"#!/bin/sh\nsystemctl start cairn-workload\n", "700");
        let config = json!({
            "pluginName": "ScriptRunner",
            "preScriptLocation": "/etc/cairn/pre.sh",
            "postScriptLocation": "/etc/cairn/post.sh",
            "timeoutInSeconds": 30,
            "continueBackupOnFailure": false,
        });
        self.put(
            "/etc/cairn/VMSnapshotScriptPluginConfig.json",
            config.to_string().as_bytes(),
            "600",
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}

#[test]
fn a_running_debian_guest_is_backed_up_frozen_and_restores_clean() {
    if !cairn_testkit::root_or_skip() || !qemu_or_skip() {
        return;
    }
    let cache = image();
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (vault, disk) = (s("vault"), s("os.qcow2"));
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", cache.join("guest.raw").to_str().unwrap(), &disk],
    );
    ok(agent(&["init", "--vault", &vault]));
    let boot_started = Instant::now();
    let guest = Guest::boot(dir.path(), &cache, Path::new(&disk), "qcow2");
    eprintln!(
        "booted from its own image: the guest agent answered {:.1} s after QEMU started",
        boot_started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    while guest.inserts() < 20 {
        assert!(started.elapsed() < Duration::from_secs(120), "the workload does not write");
        std::thread::sleep(Duration::from_millis(500));
    }
    let config = dir.path().join("guest.toml");
    std::fs::write(
        &config,
        format!(
            "vm = \"guest\"\nqmp = \"{}\"\nguest_agent = \"{}\"\nguest_agent_required = true\n[fleece]\ndir = \"{}\"\n[[disk]]\nname = \"os\"\nqemu_device = \"virtio-disk0\"\n",
            s("qmp.sock"),
            s("qga.sock"),
            s("fleece")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = config.to_str().unwrap();
    let check = ok(agent(&["--config", config, "config", "check", "--json"]));
    assert_eq!(check["valid"], json!(true), "{check}");

    let mut points = Vec::new();
    let mut longest_freeze = 0f64;
    let mut windows = Vec::new();
    for round in 0..3 {
        let before = guest.inserts();
        let from = guest.clock();
        let m = ok(agent(&["--config", config, "backup", "--json", "--vault", &vault]));
        windows.push((from, guest.clock()));
        assert_eq!(m["consistency"], json!("file_system"), "{m}");
        let ev = evidence(&m);
        assert!(ev.iter().any(|(k, msg)| k == "freeze" && msg.contains("thawed")), "{ev:?}");
        let frozen_ms: f64 = ev
            .iter()
            .find_map(|(k, msg)| {
                let rest =
                    msg.strip_prefix("the guest was frozen for ").filter(|_| k == "freeze")?;
                rest.split(' ').next()?.parse().ok()
            })
            .unwrap();
        longest_freeze = longest_freeze.max(frozen_ms / 1000.0);
        for (_, msg) in ev.iter().filter(|(_, msg)| msg.contains("froze") || msg.contains("vCPUs"))
        {
            eprintln!("backup {round}: {msg}");
        }
        eprintln!(
            "backup {round}: {} bytes scanned, {} changed",
            m["disks"]["os"]["stats"]["bytes_scanned"], m["disks"]["os"]["stats"]["bytes_changed"]
        );
        if round > 0 {
            assert!(ev.iter().any(|(k, _)| k == "cbt"), "incrementals read the bitmap: {ev:?}");
            let scanned = m["disks"]["os"]["stats"]["bytes_scanned"].as_u64().unwrap();
            assert!(scanned < 256 << 20, "an incremental read {scanned} bytes of a 1.5 GiB disk");
        }
        points.push(m["point"].as_str().unwrap().to_owned());
        let started = Instant::now();
        while guest.inserts() < before + 20 {
            assert!(started.elapsed() < Duration::from_secs(120), "the workload stopped writing");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let status = GuestAgent::connect(&guest.qga, Duration::from_secs(5)).unwrap().frozen().unwrap();
    assert!(!status, "the guest is thawed after the backups");

    // The stall the workload sees: the longest gap between two of its inserts, over the
    // frozen backups, and over one backup without the guest agent (crash-consistent).
    let frozen_gaps: Vec<f64> = windows.iter().map(|w| longest_gap(&guest, *w)).collect();
    let crash_config = dir.path().join("crash.toml");
    let text =
        std::fs::read_to_string(config).unwrap().replace("guest_agent_required = true\n", "");
    let text =
        text.lines().filter(|l| !l.starts_with("guest_agent")).collect::<Vec<_>>().join("\n");
    std::fs::write(&crash_config, text + "\n").unwrap();
    std::fs::set_permissions(&crash_config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = guest.inserts();
    let from = guest.clock();
    let m = ok(agent(&[
        "--config",
        crash_config.to_str().unwrap(),
        "backup",
        "--json",
        "--vault",
        &vault,
    ]));
    let window = (from, guest.clock());
    assert_eq!(m["consistency"], json!("crash"), "{m}");
    let started = Instant::now();
    while guest.inserts() < before + 20 {
        assert!(started.elapsed() < Duration::from_secs(120), "the workload stopped writing");
        std::thread::sleep(Duration::from_millis(300));
    }
    let crash_gap = longest_gap(&guest, window);
    let ms =
        |v: &[f64]| v.iter().map(|g| format!("{:.0}", g * 1000.0)).collect::<Vec<_>>().join(", ");
    eprintln!(
        "longest gap between the workload's inserts during each backup: {} ms with the guest frozen (full, then incrementals; longest freeze {:.0} ms); {:.0} ms during an incremental without the guest agent",
        ms(&frozen_gaps),
        longest_freeze * 1000.0,
        crash_gap * 1000.0
    );
    // No guest write ever waits out the copy-before-write timeout: the guest comes first.
    for gap in frozen_gaps.iter().chain([&crash_gap]) {
        assert!(*gap < 45.0, "the workload stalled {gap} s");
    }

    // The agent killed (-9) while the guest is frozen: its watchdog, another process, thaws
    // the guest through the guest agent once the agent's connection is gone; the next backup
    // undoes what the killed one left in QEMU and on disk.
    let mut killed = Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env("CAIRN_PASSPHRASE", "running VM tests")
        .env("CAIRN_FAILPOINT", "while-quiesced=sleep:60000")
        .args(["--config", config, "backup", "--vault", &vault])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = dir.path().join("fleece/cairn-guest.state.json");
    let started = Instant::now();
    while !std::fs::read_to_string(&state).is_ok_and(|t| t.contains("cairn-exp-0")) {
        assert!(started.elapsed() < Duration::from_secs(60), "the backup did not reach its views");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The views exist and the failpoint holds the guest frozen: kill the agent.
    std::thread::sleep(Duration::from_millis(200));
    killed.kill().unwrap();
    killed.wait().unwrap();
    let killed_at = Instant::now();
    let thawed = loop {
        let status =
            GuestAgent::connect(&guest.qga, Duration::from_secs(2)).and_then(|mut a| a.frozen());
        if let Ok(false) = status {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "the guest stays frozen: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "after kill -9 of the agent, the guest was thawed within {:.0} ms",
        thawed.as_secs_f64() * 1000.0
    );
    let before = guest.inserts();
    let m = ok(agent(&["--config", config, "backup", "--json", "--vault", &vault]));
    assert_eq!(m["consistency"], json!("file_system"), "{m}");
    assert!(!state.exists(), "the killed run's state is undone");
    let images = fleecing_images(&dir.path().join("fleece"));
    assert!(images.is_empty(), "fleecing images left: {images:?}");
    let started = Instant::now();
    while guest.inserts() < before + 10 {
        assert!(started.elapsed() < Duration::from_secs(120), "the workload stopped writing");
        std::thread::sleep(Duration::from_millis(300));
    }

    // Application consistency: Cairn's hook in the guest runs the guest's pre-script (it
    // stops the workload) before the freeze and its post-script (it starts it again) after
    // the thaw; the point says so with both scripts' runs.
    guest.install_hook(dir.path());
    let before = guest.inserts();
    let m = ok(agent(&["--config", config, "backup", "--json", "--vault", &vault]));
    assert_eq!(m["consistency"], json!("application"), "{m}");
    let ev = evidence(&m);
    for which in ["pre", "post"] {
        let ran = format!("the guest's {which}-script /etc/cairn/{which}.sh succeeded");
        assert!(ev.iter().any(|(k, msg)| k == "script" && msg.contains(&ran)), "{ev:?}");
    }
    for (k, msg) in ev.iter().filter(|(k, _)| k == "script" || k == "consistency") {
        eprintln!("application-consistent backup: {k}: {msg}");
    }
    points.push(m["point"].as_str().unwrap().to_owned());
    let started = Instant::now();
    while guest.inserts() < before + 10 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the post-script did not restart the workload"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(guest);

    // The last point, restored: a clean file system holding a sound database whose last
    // logged insert (the log line follows each committed insert) is there.
    let restored = s("restored.raw");
    let last = points.last().unwrap();
    ok(agent(&[
        "restore", "--vault", &vault, "--vm", "guest", "--point", last, "--disk", "os", "--to",
        &restored,
    ]));
    let part = s("root.ext4");
    tool(
        "dd",
        &[&format!("if={restored}"), &format!("of={part}"), "bs=1M", "skip=1", "status=none"],
    );
    tool("e2fsck", &["-fn", &part]);
    for f in ["db.sqlite", "db.sqlite-wal", "log", "quiesced-at"] {
        let out = s(f);
        let _ = Command::new("debugfs")
            .args(["-R", &format!("dump /var/lib/work/{f} {out}"), &part])
            .output();
    }
    let check = tool("sqlite3", &[&s("db.sqlite"), "PRAGMA integrity_check;"]);
    assert_eq!(check.trim(), "ok");
    let max: u64 =
        tool("sqlite3", &[&s("db.sqlite"), "SELECT max(n) FROM t;"]).trim().parse().unwrap();
    let log = std::fs::read_to_string(s("log")).unwrap();
    let logged: u64 = log
        .lines()
        .filter_map(|l| l.strip_prefix("insert "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .max()
        .unwrap();
    assert!(max >= logged && max <= logged + 1, "database holds {max} inserts, the log {logged}");
    // The application-consistent point holds exactly what the pre-script saw when it had
    // stopped the workload.
    let quiesced: u64 = std::fs::read_to_string(s("quiesced-at")).unwrap().trim().parse().unwrap();
    assert_eq!(max, quiesced, "the point holds {max} inserts, the pre-script saw {quiesced}");

    // And it boots straight from the vault, before anything is copied: the point served over
    // NBD (an instant restore), a second QEMU booting from the export with its writes going to
    // a local overlay, which the vault never sees. The first boot's reads are noted on the
    // point (--record-reads); the next export fetches those blocks before the guest asks.
    let vault_before = tree_of(Path::new(&vault));
    let boot_from_export = |tag: &str, extra: &[&str]| -> f64 {
        let socket = dir.path().join(format!("{tag}.sock"));
        let server = Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
            .env("CAIRN_PASSPHRASE", "running VM tests")
            .args(["serve-nbd", "--vault", &vault, "--vm", "guest", "--point", last])
            .args(["--disk", "os", "--socket", socket.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !socket.exists() {
            assert!(started.elapsed() < Duration::from_secs(60), "serve-nbd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let overlay = s(&format!("{tag}-overlay.qcow2"));
        let backing = format!("nbd+unix:///os?socket={}", socket.display());
        tool("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &backing, "-F", "raw", &overlay]);
        let boot_started = Instant::now();
        let booted = Guest::boot(dir.path(), &cache, Path::new(&overlay), "qcow2");
        let boot = boot_started.elapsed().as_secs_f64();
        // The workload, started at boot, may hold the database a moment: asked again until
        // it answers.
        let started = Instant::now();
        loop {
            let check = booted.exec_all(
                "/usr/bin/sqlite3",
                &["-cmd", ".timeout 5000", "/var/lib/work/db.sqlite", "PRAGMA integrity_check;"],
            );
            if check.0.trim() == "ok" {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "integrity check: {check:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
        let started = Instant::now();
        while booted.inserts() < max {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the booted restore lacks inserts"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        drop(booted);
        tool("kill", &["-INT", &server.id().to_string()]);
        let served = server.wait_with_output().unwrap();
        assert!(served.status.success());
        // The guest wrote (its workload runs): into the overlay.
        assert!(std::fs::metadata(&overlay).unwrap().len() > 1 << 20, "the guest wrote nothing");
        eprintln!(
            "booted from the export ({tag}): the guest agent answered {boot:.1} s after QEMU started"
        );
        boot
    };
    boot_from_export("recorded", &["--record-reads"]);
    boot_from_export("prefetched", &[]);
    // Nothing of the guests' writes reached the vault: only the note of the first boot's reads.
    let is_note = |p: &PathBuf| p.starts_with("notes");
    let after: Vec<_> =
        tree_of(Path::new(&vault)).into_iter().filter(|(p, ..)| !is_note(p)).collect();
    let before: Vec<_> = vault_before.into_iter().filter(|(p, ..)| !is_note(p)).collect();
    assert_eq!(after, before, "booting from the export changed the vault");
}

/// Every file under `root` with its size and modification time.
fn tree_of(root: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    cairn_testkit::walk(root)
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::symlink_metadata(root.join(&p)).ok()?;
            m.is_file().then(|| (p, m.len(), m.modified().unwrap()))
        })
        .collect()
}

/// The longest time between two consecutive lines of the workload's log within `window`
/// (guest clock, seconds), counting from the window's start to its first line and from its
/// last line to the window's end.
fn longest_gap(guest: &Guest, (from, to): (f64, f64)) -> f64 {
    let log = guest.exec("/usr/bin/cat", &["/var/lib/work/log"]);
    let mut times: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split(' ').nth(2)?.parse().ok())
        .filter(|t| *t >= from && *t <= to)
        .collect();
    times.insert(0, from);
    times.push(to);
    times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}
