//! The agent as a user runs it: exit codes, messages, JSON, signals.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-agent"));
    cmd.env_remove("RUST_LOG");
    // Vaults are encrypted by default; the tests' vaults use this passphrase.
    cmd.env("CAIRN_PASSPHRASE", "cli tests");
    cmd
}

fn run(args: &[&str]) -> Output {
    agent().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap() }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).to_str().unwrap().to_owned()
    }
    fn vault(&self) -> String {
        let v = self.s("vault");
        if !self.p("vault").exists() {
            assert!(run(&["init", "--vault", &v]).status.success());
        }
        v
    }
    fn disk(&self, name: &str, size: &str, seed: &str) -> String {
        let p = self.s(name);
        assert!(run(&["sample", "create", &p, "--size", size, "--seed", seed]).status.success());
        p
    }
}

#[test]
fn init_backup_points_restore_verify_with_json() {
    let e = Env::new();
    let v = e.vault();
    let d = e.disk("a.raw", "8M", "1");
    let out =
        run(&["backup", "--json", "--vault", &v, "--vm", "web-01", "--disk", &format!("sda={d}")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = json(&out);
    assert_eq!(m["vm"], "web-01");
    assert_eq!(m["consistency"], "none");
    let point = m["point"].as_str().unwrap().to_owned();

    let out = run(&["points", "--json", "--vault", &v, "--vm", "web-01"]);
    assert_eq!(json(&out)["points"][0]["point"], point.as_str());
    let human = run(&["points", "--vault", &v]);
    assert!(String::from_utf8_lossy(&human.stdout).contains(&point));

    let target = e.s("restored.raw");
    let out = run(&[
        "restore", "--vault", &v, "--vm", "web-01", "--point", &point, "--disk", "sda", "--to",
        &target,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(cairn_sample_same(&d, &target));

    let out = run(&["verify", "--json", "--vault", &v]);
    assert!(out.status.success());
    assert_eq!(json(&out)["clean"], true);
}

fn cairn_sample_same(a: &str, b: &str) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn mistakes_get_clear_errors() {
    let e = Env::new();
    let missing_vault = e.s("no-vault");
    let out = run(&["points", "--vault", &missing_vault]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("cairn-agent init --vault {missing_vault}")),
        "{}",
        stderr(&out)
    );

    let v = e.vault();
    let out = run(&["init", "--vault", &v]);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    let out = run(&["backup", "--vault", &v, "--vm", "vm", "--disk", &e.s("nope.raw")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nope.raw") && stderr(&out).contains("check the path"),
        "{}",
        stderr(&out)
    );

    let out = run(&[
        "backup",
        "--vault",
        &v,
        "--vm",
        "vm",
        "--disk",
        &format!("sda={}", e.dir.path().display()),
    ]);
    assert!(stderr(&out).contains("is a folder"), "{}", stderr(&out));

    let out = run(&["backup", "--vault", &v, "--vm", "bad/name", "--disk", "x"]);
    assert!(stderr(&out).contains("--vm"), "{}", stderr(&out));

    let out = run(&["restore", "--vault", &v, "--vm", "vm", "--to", &e.s("x")]);
    assert!(stderr(&out).contains("no recovery points"), "{}", stderr(&out));

    let out = run(&["backup", "--vault", &v, "--config", &e.s("nope.toml")]);
    assert!(stderr(&out).contains("reading VM configuration"), "{}", stderr(&out));
    let out = run(&["backup", "--vault", &v]);
    assert!(stderr(&out).contains("give either --config FILE"), "{}", stderr(&out));
    let out = run(&["config", "check"]);
    assert!(stderr(&out).contains("needs --config"), "{}", stderr(&out));

    // A vault of an earlier, unreleased layout is not called damaged: it says what to do.
    let old = e.p("old-vault");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("config.json"), r#"{"format": 1}"#).unwrap();
    let out = run(&["points", "--vault", old.to_str().unwrap()]);
    assert!(stderr(&out).contains("create a new vault"), "{}", stderr(&out));
    assert!(stderr(&out).contains("hint: `cairn-agent init"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("damaged"), "{}", stderr(&out));

    let out = run(&["init"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn restore_refuses_to_overwrite_and_verify_exits_3_on_damage() {
    let e = Env::new();
    let v = e.vault();
    let d = e.disk("a.raw", "4M", "2");
    assert!(run(&["backup", "--vault", &v, "--vm", "vm", "--disk", &d]).status.success());
    let target = e.p("t.raw");
    std::fs::write(&target, b"keep me").unwrap();
    let t = target.to_str().unwrap();
    let out = run(&["restore", "--vault", &v, "--vm", "vm", "--disk", "a.raw", "--to", t]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    let out =
        run(&["restore", "--vault", &v, "--vm", "vm", "--disk", "a.raw", "--to", t, "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Damage the first chunk of a pack: verify names it and exits 3.
    let pack = first_pack(&e.p("vault"));
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&pack, bytes).unwrap();
    let out = run(&["verify", "--vault", &v]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("BAD chunk"));
}

fn first_pack(vault: &Path) -> PathBuf {
    let fan = std::fs::read_dir(vault.join("packs")).unwrap().next().unwrap().unwrap().path();
    std::fs::read_dir(fan).unwrap().next().unwrap().unwrap().path()
}

#[test]
fn ctrl_c_during_a_backup_commits_nothing() {
    let e = Env::new();
    let v = e.vault();
    let d = e.disk("big.raw", "1G", "3");
    let child = agent()
        .args(["backup", "--vault", &v, "--vm", "vm", "--threads", "1", "--disk", &d])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the backup has really started: its in-flight marker exists.
    let inflight = e.p("vault").join("inflight");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !inflight.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false) {
        assert!(Instant::now() < deadline, "the backup never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("no recovery point was committed"), "{}", stderr(&out));

    let listing = json(&run(&["points", "--json", "--vault", &v]));
    assert_eq!(listing["points"].as_array().unwrap().len(), 0);
    assert!(run(&["verify", "--vault", &v]).status.success());
    assert_eq!(inflight.read_dir().unwrap().count(), 0, "the in-flight marker must be removed");
}

#[test]
fn quickstart_runs_the_whole_path() {
    let e = Env::new();
    let out = run(&["quickstart", "--json", "--size", "32M", "--dir", &e.s("qs")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["restore_identical"], true);
    assert_eq!(report["verify_clean"], true);
    let growth = report["incremental_growth_percent"].as_f64().unwrap();
    assert!(growth > 0.0 && growth < 40.0, "{growth}");
}

#[test]
fn vm_configs_are_checked_and_drive_the_backup() {
    let e = Env::new();
    let v = e.vault();
    let disk = e.disk("os.raw", "4M", "3");
    // Configurations are mode 600, as the agent requires of what it reads as root.
    let write = |name: &str, text: String| {
        std::fs::write(e.p(name), text).unwrap();
        std::fs::set_permissions(e.p(name), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        e.s(name)
    };

    // A field error names the field and the line.
    let bad = write(
        "bad.toml",
        format!("vm = \"web\"\n[[disk]]\nname = \"os\"\npath = \"{disk}\"\nview = \"lvm\"\n"),
    );
    let out = run(&["--config", &bad, "config", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("disk[0].view"), "{}", stderr(&out));

    // A reflink view on a file system without reflink, and scripts readable by others.
    let pre = write("pre.sh", "#!/bin/sh\n".into());
    std::fs::set_permissions(&pre, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let scripts = write(
        "scripts.json",
        format!(r#"{{"preScriptLocation": "{pre}", "postScriptLocation": "{pre}"}}"#),
    );
    std::fs::set_permissions(&scripts, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .unwrap();
    let cfg = write(
        "vm.toml",
        format!(
            "vm = \"web\"\n[scripts]\nconfig = \"{scripts}\"\n[[disk]]\nname = \"os\"\npath = \"{disk}\"\n"
        ),
    );
    let out = run(&["--config", &cfg, "--json", "config", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert_eq!(report["valid"], false);
    let problems: Vec<String> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["problem"].as_str().unwrap().to_string())
        .collect();
    assert!(problems.iter().any(|p| p.contains(&format!("chmod 600 {scripts}"))), "{problems:?}");
    let fs = cairn_fs_supports_reflink(&e.p("os.raw"));
    assert_eq!(
        problems.iter().any(|p| p.contains("cannot make reflink clones")),
        !fs,
        "{problems:?}"
    );

    // A live read of a running VM is allowed only when asked for, and recorded as such.
    let live = write(
        "live.toml",
        format!(
            "vm = \"web\"\nlive_read = true\n[[disk]]\nname = \"os\"\npath = \"{disk}\"\nview = \"none\"\n"
        ),
    );
    let out = run(&["--config", &live, "config", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
    let out = run(&["--config", &live, "backup", "--json", "--vault", &v]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = json(&out);
    assert_eq!(m["consistency"], "none");
    assert!(
        m["evidence"].as_array().unwrap().iter().any(
            |e| e["kind"] == "fallback" && e["message"].as_str().unwrap().contains("read live")
        )
    );

    // A stopped VM needs no view: its disks are crash-consistent as they are.
    let stopped = write(
        "stopped.toml",
        format!(
            "vm = \"web\"\nstate = \"stopped\"\n[[disk]]\nname = \"os\"\npath = \"{disk}\"\nview = \"none\"\n"
        ),
    );
    let out = run(&["--config", &stopped, "backup", "--json", "--vault", &v]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["consistency"], "crash");
    let out = run(&["points", "--vault", &v, "--vm", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("crash") && text.contains("VM is stopped"), "{text}");

    // ...unless something still writes to them.
    let writer = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let out = run(&["--config", &stopped, "config", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configured as stopped"));
    let out = run(&["--config", &stopped, "backup", "--vault", &v]);
    assert!(!out.status.success());
    let pid = std::process::id().to_string();
    assert!(
        stderr(&out).contains("configured as stopped") && stderr(&out).contains(&pid),
        "{}",
        stderr(&out)
    );
    drop(writer);

    // --config and --vm together are refused.
    let out = run(&["--config", &live, "backup", "--vault", &v, "--vm", "web", "--disk", &disk]);
    assert!(stderr(&out).contains("give either --config FILE"), "{}", stderr(&out));
}

/// True when the file system holding `path` can make reflink clones (XFS or btrfs).
fn cairn_fs_supports_reflink(path: &Path) -> bool {
    let fs = Command::new("stat").args(["-f", "-c", "%T"]).arg(path).output().unwrap();
    let name = String::from_utf8_lossy(&fs.stdout);
    name.trim() == "xfs" || name.trim() == "btrfs"
}

#[test]
fn ctrl_c_during_the_pre_script_still_runs_the_post_script_and_commits_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let e = Env::new();
    let v = e.vault();
    let disk = e.disk("os.raw", "4M", "5");
    let script = |name: &str, body: &str| {
        std::fs::write(e.p(name), format!("#!/bin/bash\n{body}\n")).unwrap();
        std::fs::set_permissions(e.p(name), std::fs::Permissions::from_mode(0o700)).unwrap();
        e.s(name)
    };
    let log = e.s("log");
    let pre = script("pre.sh", &format!("echo pre >> {log}; sleep 2"));
    let post = script("post.sh", &format!("echo post >> {log}"));
    std::fs::write(
        e.p("scripts.json"),
        format!(r#"{{"preScriptLocation": "{pre}", "postScriptLocation": "{post}"}}"#),
    )
    .unwrap();
    std::fs::set_permissions(e.p("scripts.json"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        e.p("vm.toml"),
        format!(
            "vm = \"web\"\nlive_read = true\n[scripts]\nconfig = \"{}\"\n[[disk]]\nname = \"os\"\npath = \"{disk}\"\nview = \"none\"\n",
            e.s("scripts.json")
        ),
    )
    .unwrap();
    std::fs::set_permissions(e.p("vm.toml"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let child = agent()
        .args(["--config", &e.s("vm.toml"), "backup", "--vault", &v])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("pre") {
        assert!(Instant::now() < deadline, "the pre-script never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost\n");
    let listing = json(&run(&["points", "--json", "--vault", &v]));
    assert_eq!(listing["points"].as_array().unwrap().len(), 0);
}

#[test]
fn bench_measures_every_stage_and_projects_a_window() {
    let e = Env::new();
    let v = e.vault();
    let d = e.disk("d.raw", "16M", "2");
    let out = run(&["bench", "--json", "--vault", &v, "--disk", &d, "--size", "10G"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    let stages: Vec<&str> =
        report["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    for stage in [
        "chunk ids (SHA-256)",
        "piece sums (keyed XXH3)",
        "chunk frame encode (zstd 1 + CRC)",
        "chunk frame decode (CRC + zstd)",
        "AES-256-GCM (primitive)",
        "vault pack writes",
        "vault chunk reads",
        "disk read",
    ] {
        assert!(stages.contains(&stage), "{stage} missing from {stages:?}");
    }
    assert!(
        report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["bytes_per_sec"].as_f64().unwrap() > 0.0)
    );
    let p = &report["projection"];
    assert!(p["full_backup_seconds"].as_f64().unwrap() > 0.0);
    assert!(p["incremental_seconds"].as_f64().unwrap() > 0.0);
    // Nothing is left in the vault.
    let names: Vec<_> = std::fs::read_dir(&v).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().contains("bench")), "{names:?}");
    assert!(run(&["verify", "--vault", &v]).status.success());
}

#[test]
fn a_vault_folder_others_may_enter_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let e = Env::new();
    let fresh = e.vault();
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fresh), 0o700);
    assert!(!stderr(&run(&["points", "--vault", &fresh])).contains("chmod"));

    let open = e.s("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(&["init", "--vault", &open]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("chmod 700 {open}")), "{}", stderr(&out));
    let out = run(&["points", "--vault", &open]);
    assert!(stderr(&out).contains("other users of this host may read"), "{}", stderr(&out));
}
