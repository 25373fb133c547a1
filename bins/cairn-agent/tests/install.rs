//! `cairn-agent install` and `uninstall` under `--root`: the changes are listed, the unit
//! passes `systemd-analyze verify`, a second install changes nothing, an edited configuration
//! survives the uninstall, everything else is reverted exactly, a second uninstall has nothing
//! to do, and a unit someone else wrote is never overwritten.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn agent(args: &[&str], root: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .arg("--json")
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .unwrap()
}

fn changes(out: &Output) -> Vec<(String, String)> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["action"].as_str().unwrap().into(), c["path"].as_str().unwrap().into()))
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file and folder under `root`, relative.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_lists_its_changes_and_uninstall_reverts_exactly_those() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    // The host already has /etc (with a file of its own) and /var.
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("var")).unwrap();
    std::fs::write(root.join("etc/hostname"), "kvm-1\n").unwrap();
    let before = tree(&root);
    let token = tmp.path().join("enroll.token");
    std::fs::write(&token, "cairn_enrollment\n").unwrap();
    let exe = env!("CARGO_BIN_EXE_cairn-agent");
    let install = [
        "install",
        "--coordinator",
        "http://coordinator.test:8470",
        "--host",
        "kvm-1",
        "--executable",
        exe,
        "--enroll-token-file",
        token.to_str().unwrap(),
    ];
    let made = changes(&agent(&install, &root));
    let created: Vec<&str> =
        made.iter().filter(|c| c.0 == "created").map(|c| c.1.as_str()).collect();
    assert_eq!(
        created,
        [
            "/etc/cairn",
            "/var/lib",
            "/var/lib/cairn",
            "/etc/systemd",
            "/etc/systemd/system",
            "/etc/cairn/agent.toml",
            "/etc/cairn/enroll-token",
            "/etc/systemd/system/cairn-agent.service"
        ],
        "{made:?}"
    );
    // The host's own folders and files are left as they are.
    assert_eq!(mode(&root.join("etc")), 0o755);
    assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "kvm-1\n");
    assert_eq!(mode(&root.join("etc/cairn")), 0o700);
    assert_eq!(mode(&root.join("etc/cairn/agent.toml")), 0o600);
    assert_eq!(mode(&root.join("etc/cairn/enroll-token")), 0o600);
    assert_eq!(mode(&root.join("var/lib/cairn")), 0o700);
    assert_eq!(mode(&root.join("etc/systemd/system/cairn-agent.service")), 0o644);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/cairn/enroll-token")).unwrap(),
        "cairn_enrollment\n"
    );
    let config = std::fs::read_to_string(root.join("etc/cairn/agent.toml")).unwrap();
    assert!(config.contains("coordinator = \"http://coordinator.test:8470\""), "{config}");
    assert!(config.contains("host = \"kvm-1\""), "{config}");

    // The unit passes systemd's own check, with nothing to say.
    let unit = root.join("etc/systemd/system/cairn-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains(&format!("ExecStart={exe} run --agent-config /etc/cairn/agent.toml")));
    let verify = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit).output();
    let verify = verify.expect("systemd-analyze (Debian systemd) is installed by scripts/test.sh");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    assert_eq!(String::from_utf8_lossy(&verify.stderr).trim(), "", "systemd-analyze verify");

    // Again: nothing changes.
    let again = changes(&agent(&install, &root));
    assert!(again.iter().all(|c| c.0 == "unchanged"), "{again:?}");

    // The operator edits the configuration; uninstall keeps it and removes the rest.
    std::fs::write(root.join("etc/cairn/agent.toml"), format!("{config}\n[vms.web-1]\n")).unwrap();
    std::fs::write(root.join("var/lib/cairn/agent-token"), "secret").unwrap();
    // A live VM's fleecing folder in the state folder: not the agent's to remove.
    std::fs::create_dir_all(root.join("var/lib/cairn/fleece")).unwrap();
    std::fs::write(root.join("var/lib/cairn/fleece/cairn-web.state.json"), "{}").unwrap();
    let removed = changes(&agent(&["uninstall"], &root));
    assert!(removed.contains(&("kept".into(), "/etc/cairn/agent.toml".into())), "{removed:?}");
    assert!(
        removed.contains(&("removed".into(), "/etc/systemd/system/cairn-agent.service".into())),
        "{removed:?}"
    );
    assert!(!root.join("var/lib/cairn/agent-token").exists(), "the agent's token is removed");
    assert!(
        root.join("var/lib/cairn/fleece/cairn-web.state.json").exists(),
        "others' files are kept"
    );
    assert!(removed.contains(&("kept".into(), "/var/lib/cairn".into())), "{removed:?}");
    std::fs::remove_dir_all(root.join("var/lib")).unwrap();
    assert!(!root.join("etc/systemd").exists());
    assert!(root.join("etc/cairn/agent.toml").exists());
    std::fs::remove_file(root.join("etc/cairn/agent.toml")).unwrap();
    std::fs::remove_dir(root.join("etc/cairn")).unwrap();
    assert_eq!(tree(&root), before, "everything else as before the install");

    // Nothing more to do.
    let nothing = changes(&agent(&["uninstall"], &root));
    assert!(nothing.iter().all(|c| c.0 == "unchanged"), "{nothing:?}");

    // A unit written by someone else is not overwritten.
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    std::fs::write(root.join("etc/systemd/system/cairn-agent.service"), "[Unit]\n").unwrap();
    let refused = agent(&install, &root);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("was not written by cairn-agent install"), "{err}");
    assert!(!root.join("etc/cairn").exists(), "a refused install changes nothing");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/systemd/system/cairn-agent.service")).unwrap(),
        "[Unit]\n"
    );
}
