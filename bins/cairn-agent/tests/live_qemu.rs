//! A VM that a running QEMU holds, backed up through the agent: QEMU's own copy-before-write
//! views at one instant, read over its NBD export, incrementals through dirty bitmaps that
//! QEMU keeps, and nothing left in QEMU or on disk afterwards. The QEMU runs no guest system
//! (its firmware waits for a boot disk): the test writes through the disk's device, as a
//! guest would, over a second QMP socket. The booted-guest tests are in `guest.rs`, the guest's
//! fsfreeze hook in `guest_hook.rs`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use cairn_testkit::qemu::{TestDisk, TestVm, qemu_or_skip};
use serde_json::{Value, json};
use support::{
    agent, cairn_nodes, config_for, evidence, fleecing_images, new_vault, ok, started_vm, tool,
};

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
    assert!(cairn_nodes(&vm.harness).is_empty(), "the views are gone after the commit");
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
    assert!(cairn_nodes(&vm.harness).is_empty());
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
    let (dir, vault) = new_vault();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
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
    assert!(cairn_nodes(&vm.harness).is_empty());
    let points = ok(agent(&["points", "--json", "--vault", &vault]));
    assert_eq!(points["points"].as_array().map(Vec::len), Some(0), "{points}");
    let _ = Path::new(&config);
}

#[test]
fn a_guest_agent_that_is_missing_or_hung_gives_a_crash_consistent_point_with_the_reason() {
    if !qemu_or_skip() {
        return;
    }
    let (dir, vault) = new_vault();
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
    assert!(cairn_nodes(&vm.harness).is_empty());

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
    assert!(cairn_nodes(&vm.harness).is_empty());
    drop(holder);
}

#[test]
fn qemu_killed_mid_backup_fails_it_clearly_and_the_next_run_cleans_up() {
    if !qemu_or_skip() {
        return;
    }
    let (dir, vault) = new_vault();
    let (mut vm, _) = started_vm(dir.path(), "256M");
    let config = config_for(dir.path(), &vm, "");
    ok(agent(&["--config", &config, "backup", "--json", "--vault", &vault]));

    let child = Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env("CAIRN_PASSPHRASE", "running VM tests")
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
    // The failed run kept what it could not undo for the next run.
    let kept = std::fs::read_to_string(&state).unwrap();
    assert!(kept.contains("cairn-fleece-db-0-"), "{kept}");
    let (vm, _) = started_vm(dir.path(), "256M");
    let m = ok(agent(&["--config", &config, "backup", "--json", "--vault", &vault]));
    let ev = evidence(&m);
    assert!(ev.iter().any(|(k, _)| k == "cbt_fallback" || k == "full_scan"), "{ev:?}");
    assert!(!state.exists());
    assert!(cairn_nodes(&vm.harness).is_empty());
    let images = fleecing_images(&dir.path().join("fleece"));
    assert!(images.is_empty(), "fleecing images left: {images:?}");
    ok(agent(&["verify", "--vault", &vault]));
}

#[test]
fn a_disk_removed_from_the_vm_mid_backup_or_before_leaves_nothing_behind() {
    if !qemu_or_skip() {
        return;
    }
    let (dir, vault) = new_vault();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
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
        .env("CAIRN_PASSPHRASE", "running VM tests")
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
    assert!(cairn_nodes(&vm.harness).is_empty(), "{:?}", cairn_nodes(&vm.harness));
    assert!(!state.exists(), "the run's state is undone");
    let images = fleecing_images(&dir.path().join("fleece"));
    assert!(images.is_empty(), "fleecing images left: {images:?}");

    // The configuration still names it: the next backup says which disk is gone.
    let out = agent(&["--config", &config, "backup", "--vault", &vault]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("disk-data"), "{err}");
    assert!(cairn_nodes(&vm.harness).is_empty());
    ok(agent(&["verify", "--vault", &vault]));
}
