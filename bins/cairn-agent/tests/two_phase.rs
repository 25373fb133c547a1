//! The two phases of a scheduled job, end to end as separate processes (root: a loop-mounted
//! XFS gives the VM's disk reflink views). A policy with one instant-restore day and a
//! one-hour transfer deadline; the agent's transfer held back by a test failpoint. The
//! snapshot phase's point is in the catalogue (tier `snapshot`) before its transfer; the late
//! transfer raises an alert; the committed point is `snapshot-and-vault`, its notes say which
//! host keeps its views until when, and the kept view restores the disk at once,
//! byte-identical to the vault's restore; a day later the views are released and the point is
//! in the vault alone. A running QEMU VM's job does the same in one go: a reflink clone of its
//! qcow2 image, made while QEMU holds the VM paused at the instant, is its kept view.

mod coordinator;
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_testkit::qemu::{TestDisk, TestVm, qemu_or_skip};
use cairn_testkit::{Loop, Mount, root_or_skip, sh};
use serde_json::{Value, json};

use coordinator::{Proc, coordinator_exe, free_port};
use support::{cairn_nodes, tool};

fn agent_exe() -> &'static str {
    env!("CARGO_BIN_EXE_cairn-agent")
}

struct Site {
    dir: PathBuf,
    url: String,
    coordinator: PathBuf,
    vm: &'static str,
}

impl Site {
    fn cli(&self, args: &[&str]) -> Value {
        let out = Command::new(&self.coordinator)
            .args(["--url", &self.url, "--json", "--token-file"])
            .arg(self.dir.join("admin.token"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn agent(&self, args: &[&str]) -> Value {
        let out = Command::new(agent_exe()).arg("--json").args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn set_clock(&self, at: &str) {
        let tmp = self.dir.join("clock.tmp");
        std::fs::write(&tmp, at).unwrap();
        std::fs::rename(tmp, self.dir.join("clock")).unwrap();
    }

    fn wait(&self, what: &str, mut f: impl FnMut(&Site) -> bool) {
        let start = Instant::now();
        while !f(self) {
            let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}; jobs {:#}\nagent log (newest first):\n{}",
                self.cli(&["jobs"]),
                tail.join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("{what}: {:.1} s", start.elapsed().as_secs_f64());
    }

    /// `cairn-agent held restore` of the VM's disk `os` from its newest held point.
    fn held_restore(&self, agent_toml: &Path, to: &Path) -> Value {
        let config = agent_toml.to_str().unwrap();
        let to = to.to_str().unwrap();
        self.agent(&[
            "held",
            "restore",
            "--agent-config",
            config,
            "--vm",
            self.vm,
            "--disk",
            "os",
            "--to",
            to,
        ])
    }

    /// `cairn-agent restore` of the VM's disk `os` at `point` from `vault`.
    fn vault_restore(&self, vault: &Path, point: &str, to: &Path) {
        let (vault, to) = (vault.to_str().unwrap(), to.to_str().unwrap());
        self.agent(&[
            "restore", "--vault", vault, "--vm", self.vm, "--point", point, "--disk", "os", "--to",
            to,
        ]);
    }

    fn point_of(&self, day: &str) -> Option<Value> {
        let points = self.cli(&["points", "--vm", self.vm]);
        points["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["captured_at"].as_str().unwrap().starts_with(day))
            .cloned()
    }
}

const POLICY: &str = r#"name = "instant"
instant-restore-days = 1
transfer-deadline-hours = 1
[schedule]
kind = "daily"
times = ["02:00"]
[retention]
keep-daily = 7
"#;

/// A disk whose bytes depend on `seed`.
fn write_disk(path: &Path, mib: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

/// A loop-mounted XFS with reflinks, in `dir`.
fn xfs(dir: &Path) -> (Loop, Mount) {
    let xfs_img = dir.join("xfs.img");
    std::fs::File::create(&xfs_img).unwrap().set_len(1 << 30).unwrap();
    sh("mkfs.xfs", &["-q", "-m", "reflink=1", xfs_img.to_str().unwrap()]);
    let xfs_loop = Loop::attach(&xfs_img);
    let xfs = Mount::new(&xfs_loop.0, &dir.join("xfs"), &[]);
    (xfs_loop, xfs)
}

/// An unencrypted vault in `dir`, the coordinator on an injected clock after the day's backup
/// time, the `instant` policy, and `vm` protected by it on host kvm-1.
fn start_site(dir: &Path, vm: &'static str) -> (Site, Proc, PathBuf) {
    let vault = dir.join("vault");
    let init = Command::new(agent_exe())
        .args(["init", "--no-encryption", "--vault", vault.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let port = free_port();
    let site = Site {
        dir: dir.to_owned(),
        url: format!("http://127.0.0.1:{port}"),
        coordinator: coordinator_exe(),
        vm,
    };
    site.set_clock("2026-06-01T03:00:00Z");
    let mut server = Command::new(&site.coordinator)
        .arg("serve")
        .arg("--db")
        .arg(dir.join("catalogue.db"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--admin-token-file")
        .arg(dir.join("admin.token"))
        .arg("--fake-clock")
        .arg(dir.join("clock"))
        .args(["--agent-timeout-seconds", "3600"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("coordinator.log")).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on "), "{line}");
    let server = Proc(server);
    std::fs::write(dir.join("instant.toml"), POLICY).unwrap();
    site.cli(&["policy", "put", dir.join("instant.toml").to_str().unwrap()]);
    site.cli(&[
        "protect",
        vm,
        "--policy",
        "instant",
        "--host",
        "kvm-1",
        "--datastore",
        "xfs",
        "--vault",
        "main",
    ]);
    (site, server, vault)
}

/// The agent of host kvm-1: installed under a root folder, backing up the site's VM as
/// `vm_toml` describes it into `vault`, one transfer at a time under 1 MiB/s, on the site's
/// clock, with `failpoint` set. Returns its configuration and process.
fn start_agent(site: &Site, vm_toml: &str, vault: &Path, failpoint: &str) -> (PathBuf, Proc) {
    let dir = &site.dir;
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let enroll = site.cli(&["enroll", "kvm-1"]);
    std::fs::write(dir.join("enroll.token"), enroll["token"].as_str().unwrap()).unwrap();
    site.agent(&[
        "install",
        "--coordinator",
        &site.url,
        "--host",
        "kvm-1",
        "--enroll-token-file",
        dir.join("enroll.token").to_str().unwrap(),
        "--root",
        root.to_str().unwrap(),
    ]);
    let vm_config = dir.join(format!("{}.toml", site.vm));
    std::fs::write(&vm_config, vm_toml).unwrap();
    std::fs::set_permissions(&vm_config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let state = root.join("var/lib/cairn");
    let config = std::fs::read_to_string(root.join("etc/cairn/agent.toml"))
        .unwrap()
        .replace("\"/var/lib/cairn\"", &format!("{:?}", state.to_str().unwrap()))
        .replace(
            "\"/etc/cairn/enroll-token\"",
            &format!("{:?}", root.join("etc/cairn/enroll-token").to_str().unwrap()),
        )
        + &format!(
            "poll-wait-seconds = 2\nmax-transfers = 1\ntransfer-mib-per-second = 1\n\n[vms.{}]\nconfig = {:?}\n\n[vaults.main]\nurl = {:?}\n",
            site.vm,
            vm_config.to_str().unwrap(),
            vault.to_str().unwrap()
        );
    let agent_toml = dir.join("agent.toml");
    std::fs::write(&agent_toml, &config).unwrap();
    let agent = Command::new(agent_exe())
        .env("CAIRN_FAILPOINT", failpoint)
        .args(["-v", "run", "--agent-config", agent_toml.to_str().unwrap(), "--fake-clock"])
        .arg(dir.join("clock"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    (agent_toml, Proc(agent))
}

#[test]
fn a_job_snapshots_then_transfers_and_its_views_serve_restores_until_released() {
    if !root_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let (_xfs_loop, xfs) = xfs(&dir);
    let disk = xfs.0.join("web.img");
    write_disk(&disk, 8, 1);
    let (site, _server, vault) = start_site(&dir, "web");
    // The VM's disk viewed by reflink clones; the transfer held back 8 s.
    let (agent_toml, _agent) = start_agent(
        &site,
        &format!(
            "vm = \"web\"\n[[disk]]\nname = \"os\"\npath = {:?}\nview = \"reflink\"\n",
            disk.to_str().unwrap()
        ),
        &vault,
        "before-transfer=sleep:8000",
    );

    // Day 1: the snapshot phase's point is in the catalogue before its transfer ends.
    site.set_clock("2026-06-02T02:30:00Z");
    site.wait("the point in the snapshot tier", |s| {
        s.point_of("2026-06-02").is_some_and(|p| p["tier"] == "snapshot")
    });
    let jobs = site.cli(&["jobs", "--vm", "web"]);
    assert_eq!(jobs["jobs"][0]["state"], "running", "{jobs}");
    // Past the deadline (02:00 + 1 h) with the transfer still held: one late-transfer alert
    // (raised while it waits, or when it ends, whichever comes first).
    site.set_clock("2026-06-02T03:30:00Z");
    site.wait("the late-transfer alert", |s| {
        s.cli(&["alerts"])["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "late-transfer" && a["vm"] == "web")
    });
    site.wait("the transfer committed", |s| {
        s.point_of("2026-06-02").is_some_and(|p| p["tier"] == "snapshot-and-vault")
    });
    let first = site.point_of("2026-06-02").unwrap();
    let id = first["point"].as_str().unwrap().to_owned();
    assert!(first["held_until"].as_str().unwrap().starts_with("2026-06-03T02:30"), "{first}");
    let alerts = site.cli(&["alerts"]);
    assert_eq!(
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "late-transfer")
            .count(),
        1,
        "{alerts}"
    );
    // The vault's notes say which host keeps the views, until when.
    let listed = site.agent(&["points", "--vault", vault.to_str().unwrap(), "--vm", "web"]);
    let in_vault = listed["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["point"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(in_vault["state"]["snapshot"]["host"], "kvm-1", "{in_vault}");

    // An instant restore from the kept view: the disk as it was, byte for byte, the same as
    // the vault's restore.
    let held = site.agent(&["held", "list", "--agent-config", agent_toml.to_str().unwrap()]);
    assert_eq!(held["held"][0]["point"], id.as_str(), "{held}");
    let from_view = xfs.0.join("instant.img");
    let restored = site.held_restore(&agent_toml, &from_view);
    assert_eq!(restored["how"], "reflink clone", "{restored}");
    let from_vault = dir.join("from-vault.img");
    site.vault_restore(&vault, &id, &from_vault);
    let original = std::fs::read(&disk).unwrap();
    assert!(std::fs::read(&from_view).unwrap() == original, "the kept view restores the disk");
    assert!(std::fs::read(&from_vault).unwrap() == original, "the vault restores the same");
    let kept_file = PathBuf::from(held["held"][0]["views"][0]["handle"].as_str().unwrap());
    assert!(kept_file.exists());

    // Day 2: a new point with its own views; the first one's day is over, so its views go and
    // it is in the vault alone.
    write_disk(&disk, 8, 2);
    site.set_clock("2026-06-03T02:30:00Z");
    site.wait("day 2's point committed", |s| {
        s.point_of("2026-06-03").is_some_and(|p| p["tier"] == "snapshot-and-vault")
    });
    site.set_clock("2026-06-03T03:00:00Z");
    site.wait("day 1's views released", |s| {
        s.point_of("2026-06-02").is_some_and(|p| p["tier"] == "vault") && !kept_file.exists()
    });
    let held = site.agent(&["held", "list", "--agent-config", agent_toml.to_str().unwrap()]);
    let held = held["held"].as_array().unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0]["captured_at"].as_str().unwrap().starts_with("2026-06-03"));
    // The released point restores from its vault only, and says so.
    let late = Command::new(agent_exe())
        .args([
            "held",
            "restore",
            "--agent-config",
            agent_toml.to_str().unwrap(),
            "--vm",
            "web",
            "--point",
            &id,
        ])
        .args(["--disk", "os", "--to", dir.join("late.img").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!late.status.success());
    let e = String::from_utf8_lossy(&late.stderr);
    assert!(e.contains("no held point") && e.contains("vault"), "{e}");
}

#[test]
fn a_running_qemu_vm_keeps_a_clone_of_its_image_for_instant_restores() {
    if !root_or_skip() || !qemu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let (_xfs_loop, xfs) = xfs(&dir);
    // The VM runs on a qcow2 image on the XFS, seeded from a raw disk.
    let seed = dir.join("seed.raw");
    write_disk(&seed, 16, 3);
    let image = xfs.0.join("db.qcow2");
    tool("qemu-img", &["convert", "-O", "qcow2", seed.to_str().unwrap(), image.to_str().unwrap()]);
    let qemu_dir = dir.join("qemu");
    std::fs::create_dir(&qemu_dir).unwrap();
    let vm = TestVm::start(
        &qemu_dir,
        &[TestDisk {
            path: image.clone(),
            format: "qcow2",
            id: "disk-os".into(),
            device: "virtio-blk-pci",
        }],
    );
    let (site, _server, vault) = start_site(&dir, "db");
    let (agent_toml, _agent) = start_agent(
        &site,
        &format!(
            "vm = \"db\"\nqmp = {:?}\n[fleece]\ndir = {:?}\n[[disk]]\nname = \"os\"\nqemu_device = \"disk-os\"\n",
            vm.qmp.to_str().unwrap(),
            dir.join("fleece").to_str().unwrap()
        ),
        &vault,
        "",
    );

    // Day 1: the point commits with its snapshot tier: this host keeps a clone of the image.
    site.set_clock("2026-06-02T02:30:00Z");
    site.wait("the point committed with its views kept", |s| {
        s.point_of("2026-06-02").is_some_and(|p| p["tier"] == "snapshot-and-vault")
    });
    let first = site.point_of("2026-06-02").unwrap();
    let id = first["point"].as_str().unwrap().to_owned();
    assert!(first["held_until"].as_str().unwrap().starts_with("2026-06-03T02:3"), "{first}");
    assert!(cairn_nodes(&vm.harness).is_empty(), "QEMU keeps nothing of the backup");
    let held = site.agent(&["held", "list", "--agent-config", agent_toml.to_str().unwrap()]);
    let view = &held["held"][0]["views"][0];
    assert_eq!(held["held"][0]["point"], id.as_str(), "{held}");
    assert_eq!((view["kind"].as_str(), view["format"].as_str()), (Some("reflink"), Some("qcow2")));
    let kept_file = PathBuf::from(view["handle"].as_str().unwrap());
    assert_eq!(kept_file.parent(), Some(xfs.0.as_path()), "the clone is beside the image");
    // The point's evidence says how the clone was made, and its notes which host keeps it.
    let listed = site.agent(&["points", "--vault", vault.to_str().unwrap(), "--vm", "db"]);
    let point = listed["points"].as_array().unwrap().iter().find(|p| p["point"] == id.as_str());
    let point = point.unwrap();
    assert_eq!(point["state"]["snapshot"]["host"], "kvm-1", "{point}");
    let views: Vec<&str> = point["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "view")
        .filter_map(|e| e["message"].as_str())
        .collect();
    eprintln!("evidence: {views:#?}");
    assert!(views.iter().any(|m| m.contains("cloned by reflink")), "{views:?}");

    // The guest writes on: its image changes, the kept view does not.
    let mut qmp = cairn_qemu::Qmp::connect(&vm.harness).unwrap();
    let wrote = qmp
        .execute(
            "human-monitor-command",
            json!({"command-line": "qemu-io -d /machine/peripheral/disk-os/virtio-backend \"write -P 0x5a 1M 2M\""}),
        )
        .unwrap();
    assert_eq!(wrote, json!(""));
    drop(qmp);

    // An instant restore from the kept view: a qcow2 image that reads as the point, the same
    // as the vault's restore and the disk before the guest's write.
    let from_view = xfs.0.join("instant.qcow2");
    let restored = site.held_restore(&agent_toml, &from_view);
    assert_eq!(
        (restored["how"].as_str(), restored["format"].as_str()),
        (Some("reflink clone"), Some("qcow2"))
    );
    let from_vault = dir.join("from-vault.raw");
    site.vault_restore(&vault, &id, &from_vault);
    assert!(std::fs::read(&from_vault).unwrap() == std::fs::read(&seed).unwrap());
    let (view_s, vault_s) = (from_view.to_str().unwrap(), from_vault.to_str().unwrap());
    tool("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", view_s, vault_s]);
    tool("qemu-img", &["check", "-f", "qcow2", view_s]);
    // The running image has the guest's write; the clone never had it.
    let now = dir.join("now.raw");
    tool(
        "qemu-img",
        &["convert", "-U", "-O", "raw", image.to_str().unwrap(), now.to_str().unwrap()],
    );
    assert!(std::fs::read(&now).unwrap() != std::fs::read(&seed).unwrap());

    // Day 2: a new point with its own clone; day 1's views are released once their day is
    // over, and that point is in the vault alone.
    site.set_clock("2026-06-03T02:40:00Z");
    site.wait("day 2's point committed", |s| {
        s.point_of("2026-06-03").is_some_and(|p| p["tier"] == "snapshot-and-vault")
    });
    site.wait("day 1's views released", |s| {
        s.point_of("2026-06-02").is_some_and(|p| p["tier"] == "vault") && !kept_file.exists()
    });
    assert!(cairn_nodes(&vm.harness).is_empty());
    let left: Vec<String> = std::fs::read_dir(&xfs.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".cairn-"))
        .collect();
    assert_eq!(left.len(), 1, "only day 2's kept clone is left beside the image: {left:?}");
}
