//! Helpers the agent's running-VM tests share (`live_qemu.rs`, `guest_hook.rs`, `guest.rs`).
#![allow(dead_code)] // each test file uses some of them

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cairn_testkit::qemu::{TestDisk, TestVm};
use serde_json::Value;

/// Runs the agent with `args` (the vault's passphrase in its environment).
pub fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env_remove("RUST_LOG")
        .env("CAIRN_PASSPHRASE", "running VM tests")
        .args(args)
        .output()
        .unwrap()
}

/// A fresh folder holding an initialised vault (`vault`), and the vault's path.
pub fn new_vault() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault").to_str().unwrap().to_owned();
    ok(agent(&["init", "--vault", &vault]));
    (dir, vault)
}

/// The agent's JSON output, after asserting it succeeded.
pub fn ok(out: Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Runs a tool that must succeed; returns its output.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).stderr(Stdio::piped()).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A point's evidence as (kind, message) pairs.
pub fn evidence(m: &Value) -> Vec<(String, String)> {
    m["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().into(), e["message"].as_str().unwrap().into()))
        .collect()
}

/// The fleecing images left in a fleecing folder.
pub fn fleecing_images(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".qcow2"))
                .collect()
        })
        .unwrap_or_default()
}

/// The names of the block nodes Cairn added to the QEMU behind QMP socket `harness`.
pub fn cairn_nodes(harness: &Path) -> Vec<String> {
    let mut qmp = cairn_qemu::Qmp::connect(harness).unwrap();
    let nodes = qmp.execute("query-named-block-nodes", serde_json::json!({"flat": true})).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("cairn-"))
        .map(str::to_owned)
        .collect()
}

/// A VM configuration for disk `disk-os` of `vm`, with `extra` top-level lines.
pub fn config_for(dir: &Path, vm: &TestVm, extra: &str) -> String {
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

/// A QEMU with one qcow2 disk `disk-os` of `size`, its content seeded (kept across calls).
pub fn started_vm(dir: &Path, size: &str) -> (TestVm, String) {
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

/// The vault's pack files.
pub fn pack_files(vault: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    let mut dirs = vec![vault.join("packs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                found.push(p);
            }
        }
    }
    assert!(!found.is_empty(), "no packs under {}", vault.display());
    found
}
