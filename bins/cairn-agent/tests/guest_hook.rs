//! The guest's fsfreeze hook: `cairn-guest-hook` runs the guest's scripts under the host's
//! script contract, and the point's level and evidence say what they did. The guest agent is
//! played by the test (it runs the real hook, as qemu-ga's stock hook does, and serves
//! `guest-file-*` on `/run` from a folder), in front of a real QEMU with no guest system; the
//! booted Debian guest runs the same hook in `guest.rs`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use cairn_testkit::qemu::qemu_or_skip;
use serde_json::{Value, json};
use support::{agent, cairn_nodes, config_for, evidence, new_vault, ok, started_vm};

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
                // Through a shell, as qemu-ga's hook script runs it: each phase has its own
                // parent process.
                let _ = Command::new("sh")
                    .args(["-c", "\"$0\" \"$@\"; exit $?", env!("CARGO_BIN_EXE_cairn-guest-hook")])
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
                            match std::fs::read(run_dir.join(name)) {
                                Ok(bytes) => {
                                    files.push((bytes, 0));
                                    json!({"return": files.len() - 1})
                                }
                                Err(e) => {
                                    json!({"error": {"class": "GenericError", "desc": format!("failed to open file '{name}': {e}")}})
                                }
                            }
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
                    let mut answer = answer;
                    if let Some(id) = request.get("id") {
                        answer["id"] = id.clone();
                    }
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
    let (dir, vault) = new_vault();
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
    assert!(cairn_nodes(&vm.harness).is_empty());

    // A hostile guest's report (escapes, a wrong shape) is not believed and not echoed raw:
    // file-system consistent, with the report called unreadable.
    let lie = b"{\"cairn_hook\":1,\"phase\":\"freeze\",\"pre\":{\"path\":\"\x1b[2J\",\"succeeded\":true}}".to_vec();
    let qga = FakeGuestAgent::start(dir.path(), &guest_scripts(&guest, "", true), Some(lie));
    let m = ok(backup(&qga));
    assert_eq!(m["consistency"], json!("file_system"), "{m}");
    let text = m.to_string();
    assert!(text.contains("unreadable") && !text.contains('\u{1b}'), "{m}");
    assert!(!qga.frozen());

    // A guest another tool froze (virsh domfsfreeze) is neither frozen again nor thawed.
    let qga = FakeGuestAgent::start(dir.path(), &guest_scripts(&guest, "", true), None);
    qga.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let m = ok(backup(&qga));
    assert_eq!(m["consistency"], json!("crash"), "{m}");
    assert!(m.to_string().contains("already frozen by another tool"), "{m}");
    assert!(qga.frozen(), "the other tool's freeze is left alone");
    assert!(!std::fs::read_to_string(&log).unwrap_or_default().contains("pre\npost\npre"));
}
