//! A VM that a running QEMU holds, backed up through the agent: QEMU's own copy-before-write
//! views at one instant, read over its NBD export, incrementals through dirty bitmaps that
//! QEMU keeps, and nothing left in QEMU or on disk afterwards. The QEMU runs no guest system
//! (its firmware waits for a boot disk): the test writes through the disk's device, as a
//! guest would, over a second QMP socket. The booted-guest tests are in `guest.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cairn_testkit::qemu::{TestDisk, TestVm, qemu_or_skip};
use serde_json::{Value, json};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env_remove("RUST_LOG")
        .env("CAIRN_PASSPHRASE", "live tests")
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).stderr(Stdio::piped()).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// HMP over the test's own QMP socket: a guest's write through the device.
fn guest_write(vm: &TestVm, byte: u8, at: u64, len: u64) {
    let mut qmp = cairn_qemu::Qmp::connect(&vm.harness).unwrap();
    let out = qmp
        .execute(
            "human-monitor-command",
            json!({"command-line": format!("qemu-io -d /machine/peripheral/disk-os/virtio-backend \"write -P {byte} {at} {len}\"")}),
        )
        .unwrap();
    assert_eq!(out, json!(""));
}

fn cairn_nodes(vm: &TestVm) -> Vec<String> {
    let mut qmp = cairn_qemu::Qmp::connect(&vm.harness).unwrap();
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true})).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("cairn-"))
        .map(str::to_owned)
        .collect()
}

fn evidence(m: &Value) -> Vec<(String, String)> {
    m["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().into(), e["message"].as_str().unwrap().into()))
        .collect()
}

#[test]
fn a_running_qemu_vm_is_backed_up_at_one_instant_and_incrementally_through_its_bitmap() {
    if !qemu_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (vault, seed, image, want) = (s("vault"), s("seed.raw"), s("os.qcow2"), s("want.raw"));
    ok(agent(&["init", "--vault", &vault]));
    ok(agent(&["sample", "create", &seed, "--size", "96M", "--seed", "7"]));
    tool("qemu-img", &["convert", "-O", "qcow2", &seed, &image]);
    std::fs::copy(&seed, &want).unwrap();
    let vm = TestVm::start(
        dir.path(),
        &[TestDisk {
            path: image.clone().into(),
            format: "qcow2",
            id: "disk-os".into(),
            device: "virtio-blk-pci",
        }],
    );
    let config = dir.path().join("db.toml");
    std::fs::write(
        &config,
        format!(
            "vm = \"db\"\nqmp = \"{}\"\n[fleece]\ndir = \"{}\"\n[[disk]]\nname = \"os\"\nqemu_device = \"disk-os\"\n",
            vm.qmp.display(),
            s("fleece")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = config.to_str().unwrap();

    let check = ok(agent(&["--config", config, "config", "check", "--json"]));
    assert_eq!(check["valid"], json!(true), "{check}");
    let details = check.to_string();
    assert!(details.contains("QEMU 7") || details.contains("QEMU "), "{details}");
    assert!(details.contains("no Cairn bitmap yet"), "{details}");

    let backup = || ok(agent(&["--config", config, "backup", "--json", "--vault", &vault]));
    let p1 = backup();
    assert_eq!(p1["consistency"], json!("crash"), "{p1}");
    let ev = evidence(&p1);
    assert!(ev.iter().any(|(k, m)| k == "view" && m.contains("at one instant")), "{ev:?}");
    assert!(cairn_nodes(&vm).is_empty(), "the views are gone after the commit");
    // The VM's definition, as QEMU reported it, is on the point.
    let machine = &p1["machine"];
    assert!(machine["hypervisor"].as_str().unwrap().starts_with("QEMU "), "{machine}");
    assert!(machine["machine_type"].as_str().unwrap().starts_with("pc-q35"), "{machine}");
    assert_eq!((machine["cpus"].as_u64(), machine["memory"].as_u64()), (Some(1), Some(128 << 20)));
    assert_eq!(machine["disks"]["os"]["device"], json!("disk-os"));
    assert_eq!(machine["disks"]["os"]["format"], json!("qcow2"));
    assert_eq!(machine["disks"]["os"]["size"], json!(96 << 20));
    assert!(
        machine["devices"].as_array().unwrap().contains(&json!("disk-os: virtio-blk-pci")),
        "{machine}"
    );

    // The guest writes 16 MiB in a row and 20 scattered 4 KiB blocks.
    guest_write(&vm, 0x41, 32 << 20, 16 << 20);
    let mut ops = vec!["write -P 0x41 32M 16M".to_owned()];
    for i in 0..20u64 {
        let at = (i * 4 + 3) << 20;
        guest_write(&vm, 0x42, at, 4096);
        ops.push(format!("write -P 0x42 {at} 4k"));
    }
    let mut io = vec!["-f", "raw"];
    for op in &ops {
        io.extend(["-c", op]);
    }
    io.push(&want);
    tool("qemu-io", &io);

    let p2 = backup();
    let ev = evidence(&p2);
    let id1 = p1["point"].as_str().unwrap();
    assert!(
        ev.iter().any(|(k, m)| k == "cbt" && m.contains(&format!("cairn:db:os:{id1}"))),
        "{ev:?}"
    );
    let scanned = p2["disks"]["os"]["stats"]["bytes_scanned"].as_u64().unwrap();
    assert!(scanned < 20 << 20, "read {scanned} bytes for 16.1 MiB of writes");
    let id2 = p2["point"].as_str().unwrap();
    let out = s("restored.raw");
    ok(agent(&[
        "restore", "--vault", &vault, "--vm", "db", "--point", id2, "--disk", "os", "--to", &out,
    ]));
    tool("cmp", &[&out, &want]);
    assert!(cairn_nodes(&vm).is_empty());
    let left: Vec<String> = std::fs::read_dir(s("fleece"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "fleecing images left: {left:?}");
    ok(agent(&["verify", "--vault", &vault]));
}

#[test]
fn a_missing_qmp_socket_or_device_is_a_clear_error_and_changes_nothing() {
    if !qemu_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let vault = s("vault");
    ok(agent(&["init", "--vault", &vault]));
    let write_config = |qmp: &str, device: &str| {
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            format!("vm = \"db\"\nqmp = \"{qmp}\"\n[fleece]\ndir = \"{}\"\n[[disk]]\nname = \"os\"\nqemu_device = \"{device}\"\n", s("fleece")),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let config = write_config(&s("absent.sock"), "disk-os");
    let out = agent(&["--config", &config, "backup", "--vault", &vault]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("absent.sock"), "{err}");

    let image = s("os.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", &image, "16M"]);
    let vm = TestVm::start(
        dir.path(),
        &[TestDisk {
            path: image.into(),
            format: "qcow2",
            id: "disk-os".into(),
            device: "virtio-blk-pci",
        }],
    );
    let config = write_config(vm.qmp.to_str().unwrap(), "disk-data");
    let out = agent(&["--config", &config, "backup", "--vault", &vault]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no disk \"disk-data\"") && err.contains("disk-os"),
        "{err}"
    );
    assert!(cairn_nodes(&vm).is_empty());
    let points = ok(agent(&["points", "--json", "--vault", &vault]));
    assert_eq!(points["points"].as_array().map(Vec::len), Some(0), "{points}");
    let _ = Path::new(&config);
}

/// A VM configuration for disk `disk-os` of `vm`, with `extra` top-level lines.
fn config_for(dir: &Path, vm: &TestVm, extra: &str) -> String {
    let path = dir.join("vm.toml");
    std::fs::write(
        &path,
        format!(
            "vm = \"db\"\nqmp = \"{}\"\n{extra}[fleece]\ndir = \"{}\"\n[[disk]]\nname = \"os\"\nqemu_device = \"disk-os\"\n",
            vm.qmp.display(),
            dir.join("fleece").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

fn started_vm(dir: &Path, size: &str) -> (TestVm, String) {
    let image = dir.join("os.qcow2").to_str().unwrap().to_owned();
    if !Path::new(&image).exists() {
        let seed = dir.join("seed.raw").to_str().unwrap().to_owned();
        ok(agent(&["sample", "create", &seed, "--size", size, "--seed", "3"]));
        tool("qemu-img", &["convert", "-O", "qcow2", &seed, &image]);
    }
    let vm = TestVm::start(
        dir,
        &[TestDisk {
            path: image.clone().into(),
            format: "qcow2",
            id: "disk-os".into(),
            device: "virtio-blk-pci",
        }],
    );
    (vm, image)
}

#[test]
fn a_guest_agent_that_is_missing_or_hung_gives_a_crash_consistent_point_with_the_reason() {
    if !qemu_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault").to_str().unwrap().to_owned();
    ok(agent(&["init", "--vault", &vault]));
    let (vm, _) = started_vm(dir.path(), "32M");
    let missing = dir.path().join("no-agent.sock");
    let config = config_for(dir.path(), &vm, &format!("guest_agent = \"{}\"\n", missing.display()));
    let m = ok(agent(&["--config", &config, "backup", "--json", "--vault", &vault]));
    assert_eq!(m["consistency"], json!("crash"), "{m}");
    let ev = evidence(&m);
    assert!(
        ev.iter().any(|(_, msg)| msg.contains("did not answer") && msg.contains("no-agent.sock")),
        "{ev:?}"
    );

    // Required: the backup fails, saying why, and leaves nothing in QEMU.
    let config = config_for(
        dir.path(),
        &vm,
        &format!("guest_agent = \"{}\"\nguest_agent_required = true\n", missing.display()),
    );
    let out = agent(&["--config", &config, "backup", "--vault", &vault]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("guest_agent_required"), "{err}");
    assert!(cairn_nodes(&vm).is_empty());

    // An agent that accepts the connection and never answers (a hung qemu-ga).
    let hung = dir.path().join("hung.sock");
    let listener = std::os::unix::net::UnixListener::bind(&hung).unwrap();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept() {
            held.push(stream);
        }
    });
    let config = config_for(dir.path(), &vm, &format!("guest_agent = \"{}\"\n", hung.display()));
    let started = std::time::Instant::now();
    let m = ok(agent(&["--config", &config, "backup", "--json", "--vault", &vault]));
    assert_eq!(m["consistency"], json!("crash"), "{m}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(40),
        "a hung agent holds the backup {:?}",
        started.elapsed()
    );
    let ev = evidence(&m);
    assert!(
        ev.iter().any(|(_, msg)| msg.contains("did not answer") && msg.contains("hung.sock")),
        "{ev:?}"
    );
    assert!(cairn_nodes(&vm).is_empty());
    drop(holder);
}

#[test]
fn qemu_killed_mid_backup_fails_it_clearly_and_the_next_run_cleans_up() {
    if !qemu_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault").to_str().unwrap().to_owned();
    ok(agent(&["init", "--vault", &vault]));
    let (mut vm, _) = started_vm(dir.path(), "256M");
    let config = config_for(dir.path(), &vm, "");
    ok(agent(&["--config", &config, "backup", "--json", "--vault", &vault]));

    let child = Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env("CAIRN_PASSPHRASE", "live tests")
        .args(["--config", &config, "backup", "--vault", &vault])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = dir.path().join("fleece/cairn-db.state.json");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&state).is_ok_and(|t| t.contains("cairn-exp-0")) {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "no view was taken");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    vm.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a backup whose QEMU died must fail");
    assert!(err.contains("NBD") || err.contains("QEMU") || err.contains("QMP"), "{err}");
    let points = ok(agent(&["points", "--json", "--vault", &vault]));
    assert_eq!(points["points"].as_array().map(Vec::len), Some(1), "no second point: {points}");

    // QEMU again (a new process on the same image): the next backup undoes what is left,
    // and scans the disk whole, since a killed QEMU leaves its bitmaps in-use.
    let (vm, _) = started_vm(dir.path(), "256M");
    let m = ok(agent(&["--config", &config, "backup", "--json", "--vault", &vault]));
    let ev = evidence(&m);
    assert!(ev.iter().any(|(k, _)| k == "cbt_fallback" || k == "full_scan"), "{ev:?}");
    assert!(!state.exists());
    assert!(cairn_nodes(&vm).is_empty());
    let images: Vec<_> = std::fs::read_dir(dir.path().join("fleece"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
        .collect();
    assert!(images.is_empty(), "fleecing images left: {images:?}");
    ok(agent(&["verify", "--vault", &vault]));
}

/// A guest agent played by the test: it freezes no file system, but runs the real
/// `cairn-guest-hook` at the freeze and the thaw as qemu-ga's stock hook does (ignoring its
/// exit code, as Debian's does), and serves `guest-file-*` on `/run` from `run_dir`.
/// `tamper` replaces the freeze report the hook wrote, as a hostile guest may.
struct FakeGuestAgent {
    socket: std::path::PathBuf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeGuestAgent {
    fn start(dir: &Path, hook_config: &Path, tamper: Option<Vec<u8>>) -> FakeGuestAgent {
        use std::io::{BufRead, Write};
        use std::sync::atomic::Ordering;
        let socket = dir.join(format!("qga-{}.sock", rand_suffix()));
        let run_dir = dir.join("guest-run");
        std::fs::create_dir_all(&run_dir).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let state = frozen.clone();
        let config = hook_config.to_path_buf();
        std::thread::spawn(move || {
            let hook = |phase: &str| {
                let _ = Command::new(env!("CARGO_BIN_EXE_cairn-guest-hook"))
                    .arg(phase)
                    .arg("--config")
                    .arg(&config)
                    .arg("--run-dir")
                    .arg(&run_dir)
                    .stderr(Stdio::null())
                    .status();
            };
            let mut files: Vec<(Vec<u8>, usize)> = Vec::new();
            while let Ok((stream, _)) = listener.accept() {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = std::io::BufReader::new(stream);
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                    let text: Vec<u8> = line.drain(..).filter(|&b| b != 0xff).collect();
                    let Ok(request) = serde_json::from_slice::<Value>(&text) else { continue };
                    let args = &request["arguments"];
                    let command = request["execute"].as_str().unwrap_or("");
                    let answer = match command {
                        c if c.starts_with("guest-file-") && state.load(Ordering::SeqCst) => {
                            // As qemu-ga: no file access while the guest is frozen.
                            json!({"error": {"class": "CommandNotFound", "desc": format!("Command {c} has been disabled: the agent is in frozen state")}})
                        }
                        "guest-sync-delimited" => {
                            writer.write_all(&[0xff]).unwrap();
                            json!({"return": args["id"]})
                        }
                        "guest-fsfreeze-freeze" => {
                            hook("freeze");
                            if let Some(bytes) = &tamper {
                                std::fs::write(run_dir.join("cairn-hook-freeze.json"), bytes)
                                    .unwrap();
                            }
                            state.store(true, Ordering::SeqCst);
                            json!({"return": 1})
                        }
                        "guest-fsfreeze-thaw" => {
                            state.store(false, Ordering::SeqCst);
                            hook("thaw");
                            json!({"return": 1})
                        }
                        "guest-fsfreeze-status" => {
                            let s = if state.load(Ordering::SeqCst) { "frozen" } else { "thawed" };
                            json!({"return": s})
                        }
                        "guest-file-open" => {
                            let name =
                                args["path"].as_str().unwrap().strip_prefix("/run/").unwrap();
                            let path = run_dir.join(name);
                            if args["mode"] == json!("w") {
                                std::fs::write(&path, b"").unwrap();
                            }
                            files.push((std::fs::read(&path).unwrap_or_default(), 0));
                            json!({"return": files.len() - 1})
                        }
                        "guest-file-read" => {
                            use base64::Engine;
                            let (bytes, at) = &mut files[args["handle"].as_u64().unwrap() as usize];
                            let n =
                                (bytes.len() - *at).min(args["count"].as_u64().unwrap() as usize);
                            let chunk = &bytes[*at..*at + n];
                            *at += n;
                            json!({"return": {
                                "count": n,
                                "buf-b64": base64::engine::general_purpose::STANDARD.encode(chunk),
                                "eof": *at == bytes.len(),
                            }})
                        }
                        "guest-file-close" => json!({"return": {}}),
                        other => json!({"error": {"class": "CommandNotFound", "desc": other}}),
                    };
                    let mut out = serde_json::to_vec(&answer).unwrap();
                    out.push(b'\n');
                    if writer.write_all(&out).is_err() {
                        break;
                    }
                }
            }
        });
        FakeGuestAgent { socket, frozen }
    }

    fn frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// The guest's script configuration (mode 600) and its two scripts (mode 700), which log to
/// `log`; the pre-script exits 3 when its parameter is `fail`.
fn guest_scripts(dir: &Path, pre_param: &str, continue_on_failure: bool) -> std::path::PathBuf {
    let script = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        p
    };
    let log = dir.join("log");
    let pre = script(
        "pre.sh",
        &format!(
            "echo pre >> {0}\n[ \"$1\" = fail ] && echo 'no quiesce' && exit 3\nexit 0",
            log.display()
        ),
    );
    let post = script("post.sh", &format!("echo post >> {}", log.display()));
    let config = dir.join("VMSnapshotScriptPluginConfig.json");
    std::fs::write(
        &config,
        json!({
            "pluginName": "ScriptRunner",
            "preScriptLocation": pre,
            "postScriptLocation": post,
            "preScriptParams": [pre_param],
            "timeoutInSeconds": 10,
            "continueBackupOnFailure": continue_on_failure,
        })
        .to_string(),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _ = std::fs::remove_file(&log);
    config
}

#[test]
fn the_guests_fsfreeze_hook_runs_its_scripts_and_the_point_says_what_they_did() {
    if !qemu_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault").to_str().unwrap().to_owned();
    ok(agent(&["init", "--vault", &vault]));
    let (vm, _) = started_vm(dir.path(), "32M");
    let guest = dir.path().join("guest");
    std::fs::create_dir(&guest).unwrap();
    let log = guest.join("log");
    let backup = |qga: &FakeGuestAgent| {
        let extra = format!("guest_agent = \"{}\"\n", qga.socket.display());
        agent(&[
            "--config",
            &config_for(dir.path(), &vm, &extra),
            "backup",
            "--json",
            "--vault",
            &vault,
        ])
    };
    let points = || {
        let p = ok(agent(&["points", "--json", "--vault", &vault]));
        p["points"].as_array().map_or(0, Vec::len)
    };

    // The pre-script succeeds: application-consistent, each script ran once.
    let qga = FakeGuestAgent::start(dir.path(), &guest_scripts(&guest, "", true), None);
    let m = ok(backup(&qga));
    assert_eq!(m["consistency"], json!("application"), "{m}");
    let ev = evidence(&m);
    for s in ["the guest's pre-script", "the guest's post-script"] {
        assert!(
            ev.iter().any(|(k, msg)| k == "script" && msg.contains(s) && msg.contains("succeeded")),
            "{ev:?}"
        );
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost\n");
    assert!(!qga.frozen());

    // It fails, and the guest's configuration lets the backup go on: file-system consistent,
    // saying why, with the script's output.
    let qga = FakeGuestAgent::start(dir.path(), &guest_scripts(&guest, "fail", true), None);
    let m = ok(backup(&qga));
    assert_eq!(m["consistency"], json!("file_system"), "{m}");
    let fallback =
        m["evidence"].as_array().unwrap().iter().find(|e| e["kind"] == "fallback").unwrap();
    assert!(fallback["message"].as_str().unwrap().contains("exit code 3"), "{fallback}");
    let script =
        m["evidence"].as_array().unwrap().iter().find(|e| e["details"]["script"] == "pre").unwrap();
    assert_eq!(script["details"]["output"], json!("no quiesce"), "{script}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost\n");

    // It fails, and the configuration says stop: the backup fails saying so, the guest is
    // thawed, the post-script ran once, nothing is committed and nothing is left in QEMU.
    let before = points();
    let qga = FakeGuestAgent::start(dir.path(), &guest_scripts(&guest, "fail", false), None);
    let out = backup(&qga);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("continueBackupOnFailure=false"), "{err}");
    assert!(!qga.frozen());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre\npost\n");
    assert_eq!(points(), before);
    assert!(cairn_nodes(&vm).is_empty());

    // A hostile guest's report (escapes, a wrong shape) is not believed and not echoed raw:
    // file-system consistent, with the report called unreadable.
    let lie = b"{\"cairn_hook\":1,\"phase\":\"freeze\",\"pre\":{\"path\":\"\x1b[2J\",\"succeeded\":true}}".to_vec();
    let qga = FakeGuestAgent::start(dir.path(), &guest_scripts(&guest, "", true), Some(lie));
    let m = ok(backup(&qga));
    assert_eq!(m["consistency"], json!("file_system"), "{m}");
    let text = m.to_string();
    assert!(text.contains("unreadable") && !text.contains('\u{1b}'), "{m}");
    assert!(!qga.frozen());
}

#[test]
fn a_disk_removed_from_the_vm_mid_backup_or_before_leaves_nothing_behind() {
    if !qemu_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let vault = s("vault");
    ok(agent(&["init", "--vault", &vault]));
    for name in ["os", "data"] {
        let seed = s(&format!("{name}.raw"));
        ok(agent(&["sample", "create", &seed, "--size", "16M", "--seed", "5"]));
        tool("qemu-img", &["convert", "-O", "qcow2", &seed, &s(&format!("{name}.qcow2"))]);
    }
    let vm = TestVm::start(
        dir.path(),
        &[
            TestDisk {
                path: s("os.qcow2").into(),
                format: "qcow2",
                id: "disk-os".into(),
                device: "virtio-blk-pci",
            },
            TestDisk {
                path: s("data.qcow2").into(),
                format: "qcow2",
                id: "disk-data".into(),
                device: "scsi-hd",
            },
        ],
    );
    let config = config_for(dir.path(), &vm, "");
    let text = std::fs::read_to_string(&config).unwrap()
        + "[[disk]]\nname = \"data\"\nqemu_device = \"disk-data\"\n";
    std::fs::write(&config, text).unwrap();
    ok(agent(&["--config", &config, "backup", "--json", "--vault", &vault]));

    // The data disk is pulled out of the VM while the backup holds its views.
    let running = Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env("CAIRN_PASSPHRASE", "live tests")
        .env("CAIRN_FAILPOINT", "while-quiesced=sleep:3000")
        .args(["--config", &config, "backup", "--json", "--vault", &vault])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = dir.path().join("fleece/cairn-db.state.json");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&state).is_ok_and(|t| t.contains("cairn-exp-1")) {
        assert!(started.elapsed().as_secs() < 30, "the backup did not reach its views");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut qmp = cairn_qemu::Qmp::connect(&vm.harness).unwrap();
    qmp.execute("device_del", json!({"id": "disk-data"})).unwrap();
    drop(qmp);
    let out = running.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // The views were taken before the removal: the point holds both disks at that instant.
        let m: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(m["disks"]["data"]["size"].as_u64() == Some(16 << 20), "{m}");
        eprintln!("removed mid-backup: committed; {err}");
    } else {
        assert!(err.contains("data") || err.contains("disk-data"), "{err}");
        eprintln!("removed mid-backup: {err}");
    }
    assert!(cairn_nodes(&vm).is_empty(), "{:?}", cairn_nodes(&vm));
    assert!(!state.exists(), "the run's state is undone");
    let images: Vec<_> = std::fs::read_dir(dir.path().join("fleece"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
        .collect();
    assert!(images.is_empty(), "fleecing images left: {images:?}");

    // The configuration still names it: the next backup says which disk is gone.
    let out = agent(&["--config", &config, "backup", "--vault", &vault]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("disk-data"), "{err}");
    assert!(cairn_nodes(&vm).is_empty());
    ok(agent(&["verify", "--vault", &vault]));
}
