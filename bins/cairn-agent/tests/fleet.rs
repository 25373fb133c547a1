//! End to end, as separate processes on loopback: one coordinator, three agents (each its own
//! host and state folder; one backs up a stopped VM's disk files), a host whose agent never
//! came, and a daily policy run over several days of an injected clock. Checked against the
//! API, the vault and the policy: every scheduled job ran once and made one point, the silent
//! host's jobs failed saying why, agent and coordinator restarts in the middle of a job lose
//! nothing and double nothing, and a coordinator away at backup time does not stop the backups.

mod coordinator;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use coordinator::{Proc, coordinator_exe, free_port};

fn agent_exe() -> &'static str {
    env!("CARGO_BIN_EXE_cairn-agent")
}

struct Fleet {
    dir: PathBuf,
    coordinator: PathBuf,
    port: u16,
    server: Option<Proc>,
    agents: Vec<(String, Option<Proc>)>,
    vault: String,
}

/// Waits for `f` to hold; on time out, fails showing the jobs and the processes' logs.
fn wait_until(fleet: &Fleet, what: &str, timeout: Duration, mut f: impl FnMut(&Fleet) -> bool) {
    let start = Instant::now();
    while !f(fleet) {
        if start.elapsed() > timeout {
            panic!("timed out waiting for {what}\n{}", fleet.diagnosis());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{what}: {:.1} s", start.elapsed().as_secs_f64());
}

impl Fleet {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn diagnosis(&self) -> String {
        let tail = |p: PathBuf| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!("--- {}\n{}", p.display(), lines[lines.len().saturating_sub(30)..].join("\n"))
        };
        let mut out = String::new();
        if self.server.is_some() {
            out += &format!("jobs: {:#?}\n", self.jobs());
        }
        out += &tail(self.dir.join("coordinator.log"));
        for (host, _) in &self.agents {
            out += "\n";
            out += &tail(self.dir.join(host).join("agent.log"));
        }
        out
    }

    fn set_clock(&self, at: &str) {
        let tmp = self.dir.join("clock.tmp");
        std::fs::write(&tmp, at).unwrap();
        std::fs::rename(tmp, self.dir.join("clock")).unwrap();
    }

    fn start_coordinator(&mut self) {
        let mut child = Command::new(&self.coordinator)
            .arg("serve")
            .arg("--db")
            .arg(self.dir.join("catalogue.db"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--admin-token-file")
            .arg(self.dir.join("admin.token"))
            .arg("--fake-clock")
            .arg(self.dir.join("clock"))
            .args(["--agent-timeout-seconds", "3600"])
            .arg("--vaults")
            .arg(self.dir.join("vaults.toml"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.dir.join("coordinator.log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("listening on "), "{line}");
        self.server = Some(Proc(child));
    }

    /// A client command as the admin, in JSON.
    fn run_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.coordinator)
            .args(["--url", &self.url(), "--json", "--token-file"])
            .arg(self.dir.join("admin.token"))
            .args(args)
            .output()
            .unwrap()
    }

    fn cli(&self, args: &[&str]) -> Value {
        let out = self.run_cli(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs a client command that must fail; returns what it printed on stderr.
    fn cli_fails(&self, args: &[&str]) -> String {
        let out = self.run_cli(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn jobs(&self) -> Vec<Value> {
        self.cli(&["jobs"])["jobs"].as_array().unwrap().clone()
    }

    /// Starts the agent of `host`; `hold` makes each of its backups wait 6 s after the
    /// capture (a failpoint of the test build), so that a test can act in the middle of one.
    fn start_agent(&mut self, host: &str, hold: bool) {
        let config = self.dir.join(host).join("agent.toml");
        let mut command = Command::new(agent_exe());
        if hold {
            command.env("CAIRN_FAILPOINT", "while-quiesced=sleep:6000");
        }
        let child = command
            .args(["-v", "run", "--agent-config"])
            .arg(&config)
            .arg("--fake-clock")
            .arg(self.dir.join("clock"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(host).join("agent.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        match self.agents.iter_mut().find(|a| a.0 == host) {
            Some(a) => a.1 = Some(Proc(child)),
            None => self.agents.push((host.into(), Some(Proc(child)))),
        }
    }

    fn kill_agent(&mut self, host: &str) {
        if let Some(a) = self.agents.iter_mut().find(|a| a.0 == host) {
            a.1 = None;
        }
    }

    /// Sets up a VM on `host`: a disk file, the VM's configuration, the host's agent
    /// configuration (installed with `cairn-agent install --root`) and enrollment.
    fn add_host(&mut self, host: &str, vm: &str, disk_mib: usize) {
        let home = self.dir.join(host);
        let root = home.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let disk = home.join(format!("{vm}.raw"));
        write_disk(&disk, disk_mib, 1);
        let vm_config = home.join(format!("{vm}.toml"));
        std::fs::write(
            &vm_config,
            format!(
                "vm = \"{vm}\"\nlive_read = true\n[[disk]]\nname = \"os\"\npath = \"{}\"\nview = \"none\"\n",
                disk.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&vm_config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let enrollment = self.cli(&["enroll", host]);
        let token_file = home.join("enroll.token");
        std::fs::write(&token_file, enrollment["token"].as_str().unwrap()).unwrap();
        let out = Command::new(agent_exe())
            .args(["--json", "install", "--coordinator", &self.url(), "--host", host])
            .arg("--enroll-token-file")
            .arg(&token_file)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The installed configuration, pointed at this test's folders and given the VM and
        // the vault, as an operator would edit it.
        let installed = std::fs::read_to_string(root.join("etc/cairn/agent.toml")).unwrap();
        let config = installed
            .replace("\"/var/lib/cairn\"", &format!("{:?}", root.join("var/lib/cairn")))
            .replace(
                "\"/etc/cairn/enroll-token\"",
                &format!("{:?}", root.join("etc/cairn/enroll-token")),
            )
            + &format!(
                "\n[vms.{vm}]\nconfig = {:?}\n\n[vaults.main]\nurl = {:?}\n",
                vm_config, self.vault
            );
        std::fs::write(home.join("agent.toml"), config).unwrap();
    }

    fn points_in_vault(&self, vm: &str) -> Vec<Value> {
        let out = Command::new(agent_exe())
            .args(["--json", "points", "--vault", &self.vault, "--vm", vm])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["points"].as_array().cloned().unwrap_or_default()
    }
}

/// A disk of `mib` MiB whose content depends on `seed`, changed in place for a later day.
fn write_disk(path: &Path, mib: usize, seed: u64) {
    let mut file =
        std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(path).unwrap();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in block.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        file.write_all(&block).unwrap();
    }
}

/// Changes one MiB in the middle of the disk.
fn change_disk(path: &Path, seed: u64) {
    use std::io::Seek;
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = file.metadata().unwrap().len();
    file.seek(std::io::SeekFrom::Start(len / 2)).unwrap();
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i as u64 * seed) as u8 ^ 0x5a).collect();
    file.write_all(&block).unwrap();
}

const POLICY: &str = r#"name = "daily"
[schedule]
kind = "daily"
times = ["02:00"]
jitter-minutes = 10
[retention]
keep-daily = 4
"#;

/// The coordinator's vaults file: upkeep at 03:00, an hour after the backups; expired points
/// wait an hour before they are purged.
fn vaults_file(vault: &str) -> String {
    format!(
        "[upkeep]\ngrace-hours = 1\n[upkeep.schedule]\nkind = \"daily\"\ntimes = [\"03:00\"]\n\
         [vaults.main]\nurl = {vault:?}\n"
    )
}

fn backups<'a>(jobs: &'a [Value], vm: &str) -> Vec<&'a Value> {
    jobs.iter().filter(|j| j["vm"] == vm && j["kind"] == "backup").collect()
}

#[test]
fn a_fleet_backs_up_on_schedule_through_restarts_and_an_absent_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let vault = dir.join("vault").to_str().unwrap().to_owned();
    let init = Command::new(agent_exe())
        .args(["init", "--no-encryption", "--vault", &vault])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut fleet = Fleet {
        dir: dir.clone(),
        coordinator: coordinator_exe(),
        port: free_port(),
        server: None,
        agents: vec![],
        vault,
    };
    std::fs::write(dir.join("vaults.toml"), vaults_file(&fleet.vault)).unwrap();
    // After the day's backup time: the first scheduled backup is the next day's.
    fleet.set_clock("2026-06-01T03:00:00Z");
    fleet.start_coordinator();
    std::fs::write(dir.join("daily.toml"), POLICY).unwrap();
    fleet.cli(&["policy", "put", dir.join("daily.toml").to_str().unwrap()]);
    let vms = [("kvm-a", "vm-a"), ("kvm-b", "vm-b"), ("kvm-c", "stopped-c")];
    for (host, vm) in vms {
        fleet.add_host(host, vm, 16);
        fleet.cli(&[
            "protect",
            vm,
            "--policy",
            "daily",
            "--host",
            host,
            "--datastore",
            "ds-1",
            "--vault",
            "main",
        ]);
        fleet.start_agent(host, false);
    }
    // A VM on a host whose agent never came.
    fleet.cli(&[
        "protect",
        "vm-d",
        "--policy",
        "daily",
        "--host",
        "kvm-d",
        "--datastore",
        "ds-2",
        "--vault",
        "main",
    ]);
    wait_until(&fleet, "three agents enrolled", Duration::from_secs(60), |fleet| {
        fleet.cli(&["agent", "list"])["agents"].as_array().unwrap().len() == 3
    });
    // The enrollment tokens are used up and removed from the hosts.
    assert!(!dir.join("kvm-a/root/etc/cairn/enroll-token").exists());

    let done_for = |fleet: &Fleet, day: &str| {
        let jobs = fleet.jobs();
        vms.iter().all(|(_, vm)| {
            backups(&jobs, vm).iter().any(|j| {
                j["scheduled_at"].as_str().unwrap().starts_with(day) && j["state"] == "done"
            })
        })
    };

    // Day 1 and 2: scheduled backups on every host.
    for (n, day) in ["2026-06-02", "2026-06-03"].into_iter().enumerate() {
        for (host, vm) in vms {
            change_disk(&dir.join(host).join(format!("{vm}.raw")), n as u64 + 2);
        }
        fleet.set_clock(&format!("{day}T02:30:00Z"));
        wait_until(&fleet, &format!("the backups of {day}"), Duration::from_secs(120), |f| {
            done_for(f, day)
        });
    }

    // Day 3: in the middle of their backups, the agent of kvm-a is killed (and started
    // again), and so is the coordinator (while kvm-b's backup goes on).
    for host in ["kvm-a", "kvm-b"] {
        fleet.kill_agent(host);
        fleet.start_agent(host, true);
    }
    fleet.set_clock("2026-06-04T02:30:00Z");
    let in_snapshot = |fleet: &Fleet, vm: &str| {
        backups(&fleet.jobs(), vm).iter().any(|j| {
            j["scheduled_at"].as_str().unwrap().starts_with("2026-06-04")
                && j["state"] == "running"
                && j["phase"] == "snapshot"
        })
    };
    wait_until(&fleet, "vm-a's backup under way", Duration::from_secs(60), |f| {
        in_snapshot(f, "vm-a")
    });
    fleet.kill_agent("kvm-a");
    fleet.start_agent("kvm-a", false);
    wait_until(&fleet, "vm-b's backup under way", Duration::from_secs(60), |f| {
        in_snapshot(f, "vm-b")
    });
    fleet.server = None;
    fleet.start_coordinator();
    wait_until(&fleet, "the backups of 2026-06-04", Duration::from_secs(120), |f| {
        done_for(f, "2026-06-04")
    });
    let day3 = |vm: &str| {
        backups(&fleet.jobs(), vm)
            .into_iter()
            .find(|j| j["scheduled_at"].as_str().unwrap().starts_with("2026-06-04"))
            .cloned()
            .unwrap()
    };
    // The killed agent's job was handed out again; the job the coordinator's restart
    // interrupted went on and was reported once the coordinator was back.
    assert_eq!(day3("vm-a")["attempt"], 2, "{}", day3("vm-a"));
    assert_eq!(day3("vm-b")["attempt"], 1, "{}", day3("vm-b"));
    fleet.kill_agent("kvm-b");
    fleet.start_agent("kvm-b", false);

    // Day 4: the coordinator is down at backup time; the agents back up from their cached
    // schedule and report when it is back; it then plans the same time and runs nothing twice.
    fleet.server = None;
    fleet.set_clock("2026-06-05T02:30:00Z");
    for (host, _) in vms {
        wait_until(&fleet, &format!("{host}'s offline backup"), Duration::from_secs(120), |_| {
            let offline =
                std::fs::read_to_string(dir.join(host).join("root/var/lib/cairn/offline.json"))
                    .unwrap_or_default();
            offline.contains("2026-06-05T02:00:00Z")
        });
    }
    fleet.start_coordinator();
    wait_until(&fleet, "the offline backups reported", Duration::from_secs(120), |f| {
        done_for(f, "2026-06-05")
    });

    // Every scheduled time of every agent's VM: one done job, one point with its job id, in
    // the catalogue and in the vault alike.
    let jobs = fleet.jobs();
    let points = fleet.cli(&["points"])["points"].as_array().unwrap().clone();
    for (_, vm) in vms {
        let vm_jobs = backups(&jobs, vm);
        let days: Vec<&str> =
            vm_jobs.iter().map(|j| &j["scheduled_at"].as_str().unwrap()[..10]).collect();
        assert_eq!(
            days,
            ["2026-06-02", "2026-06-03", "2026-06-04", "2026-06-05"],
            "{vm}: {vm_jobs:?}"
        );
        assert!(vm_jobs.iter().all(|j| j["state"] == "done"), "{vm}: {vm_jobs:?}");
        let in_vault = fleet.points_in_vault(vm);
        assert_eq!(
            in_vault.len(),
            4,
            "{vm}: one point per scheduled time, none doubled: {in_vault:?}"
        );
        let in_catalogue: Vec<&Value> = points.iter().filter(|p| p["vm"] == vm).collect();
        assert_eq!(in_catalogue.len(), 4, "{vm}: {in_catalogue:?}");
        for p in &in_catalogue {
            let m = in_vault
                .iter()
                .find(|m| m["point"] == p["point"])
                .expect("the catalogue's point is in the vault");
            assert_eq!(m["origin"]["policy"], "daily");
            assert!(p["bytes_scanned"].as_u64().unwrap() > 0);
            // The point names the job and the scheduled time it was for.
            let job = vm_jobs.iter().find(|j| j["id"] == p["job"]).expect("the point's job");
            assert_eq!(m["origin"]["scheduled_at"], job["scheduled_at"], "{m}");
            if m["origin"]["job"].is_u64() {
                assert_eq!(m["origin"]["job"], p["job"]);
            }
        }
        // Jobs run by the coordinator carry their id into the point; the offline one none.
        let with_job = in_vault.iter().filter(|m| m["origin"]["job"].is_u64()).count();
        assert_eq!(with_job, 3, "{vm}");
    }
    // The silent host: its jobs failed, saying why, with an alert each.
    let silent = backups(&jobs, "vm-d");
    assert!(!silent.is_empty());
    let failed: Vec<_> = silent.iter().filter(|j| j["state"] == "failed").collect();
    assert!(!failed.is_empty(), "{silent:?}");
    assert!(
        failed.iter().all(|j| j["reason"].as_str().unwrap().contains("has never enrolled")),
        "{failed:?}"
    );
    let alerts = fleet.cli(&["alerts"])["alerts"].as_array().unwrap().clone();
    assert!(alerts.iter().any(|a| a["kind"] == "failed-job" && a["vm"] == "vm-d"), "{alerts:?}");
    // The dashboard, in headless Chromium, shows what the API says, in every view.
    dashboard_matches_the_api(&fleet);

    retention_and_deletion_on_schedule(&mut fleet, &vms);
    points_rescanned_from_the_vault(&fleet);
    restored_through_the_coordinator(&fleet);

    // A revoked agent is refused: its agent stops, saying why.
    fleet.cli(&["agent", "revoke", "kvm-c"]);
    let agent = fleet.agents.iter_mut().find(|a| a.0 == "kvm-c").unwrap();
    let child = &mut agent.1.as_mut().unwrap().0;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the revoked agent still runs");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.join("kvm-c/agent.log")).unwrap();
    assert!(log.contains("unknown or revoked agent token"), "{log}");
}

fn days_of(points: &[Value]) -> Vec<String> {
    let mut days: Vec<String> =
        points.iter().map(|p| p["captured_at"].as_str().unwrap()[..10].to_owned()).collect();
    days.sort();
    days
}

impl Fleet {
    fn deleted_in_vault(&self, vm: &str) -> Vec<Value> {
        let out = Command::new(agent_exe())
            .args(["--json", "points", "--deleted", "--vault", &self.vault, "--vm", vm])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["points"].as_array().cloned().unwrap_or_default()
    }

    /// Waits for the upkeep run scheduled at `at` to end, and returns it.
    fn upkeep_for(&self, at: &str) -> Value {
        let mut found = Value::Null;
        wait_until(self, &format!("the upkeep of {at}"), Duration::from_secs(120), |f| {
            let runs = f.cli(&["upkeep", "list"])["runs"].as_array().unwrap().clone();
            match runs.into_iter().find(|r| r["scheduled_at"] == at && r["state"] != "running") {
                Some(r) => {
                    found = f.cli(&["upkeep", "show", &r["id"].to_string()]);
                    true
                }
                None => false,
            }
        });
        assert_eq!(found["state"], "done", "{found}");
        found
    }
}

/// Each point's fate in an upkeep report, for one VM: (day, fate).
fn fates(run: &Value, vm: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = run["report"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["vm"] == vm)
        .map(|p| {
            (
                p["captured_at"].as_str().unwrap()[..10].to_owned(),
                p["fate"].as_str().unwrap().into(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Retention on schedule, point by point: the policy keeps the newest point of each of 4
/// days; the coordinator's upkeep expires the fifth day back and a later one purges it and
/// frees its space. Stopping a VM's protection with deletion removes its points, and its
/// schedule stops.
fn retention_and_deletion_on_schedule(fleet: &mut Fleet, vms: &[(&str, &str)]) {
    // The upkeep of 06-05 03:00: four days of points, all kept.
    fleet.set_clock("2026-06-05T03:30:00Z");
    let run = fleet.upkeep_for("2026-06-05T03:00:00Z");
    for (_, vm) in vms {
        let all_kept: Vec<(String, String)> = ["02", "03", "04", "05"]
            .iter()
            .map(|d| (format!("2026-06-{d}"), "kept".to_owned()))
            .collect();
        assert_eq!(fates(&run, vm), all_kept, "{vm}: {run}");
    }
    // Day 5: a fifth point each; the upkeep an hour later expires the oldest.
    // (stopped-c's change is its own: the vault holds it for stopped-c alone.)
    for (host, vm) in vms {
        change_disk(
            &fleet.dir.join(host).join(format!("{vm}.raw")),
            if *vm == "stopped-c" { 7 } else { 6 },
        );
    }
    fleet.set_clock("2026-06-06T02:30:00Z");
    wait_until(fleet, "the backups of 2026-06-06", Duration::from_secs(120), |f| {
        let jobs = f.jobs();
        vms.iter().all(|(_, vm)| {
            backups(&jobs, vm).iter().any(|j| {
                j["scheduled_at"].as_str().unwrap().starts_with("2026-06-06")
                    && j["state"] == "done"
            })
        })
    });
    fleet.set_clock("2026-06-06T03:30:00Z");
    let run = fleet.upkeep_for("2026-06-06T03:00:00Z");
    for (_, vm) in vms {
        let expected: Vec<(String, String)> =
            [("02", "expired"), ("03", "kept"), ("04", "kept"), ("05", "kept"), ("06", "kept")]
                .iter()
                .map(|(d, f)| (format!("2026-06-{d}"), (*f).to_owned()))
                .collect();
        assert_eq!(fates(&run, vm), expected, "{vm}: {run}");
        assert_eq!(
            days_of(&fleet.points_in_vault(vm)),
            ["2026-06-03", "2026-06-04", "2026-06-05", "2026-06-06"]
        );
        assert_eq!(days_of(&fleet.deleted_in_vault(vm)), ["2026-06-02"], "{vm}");
        let in_catalogue = fleet.cli(&["points", "--vm", vm])["points"].as_array().unwrap().clone();
        let expired: Vec<&Value> =
            in_catalogue.iter().filter(|p| p["expired_at"].is_string()).collect();
        assert_eq!(days_of(&expired.into_iter().cloned().collect::<Vec<_>>()), ["2026-06-02"]);
    }
    // An admin's upkeep once their hour of grace has passed: the expired points are purged
    // (their blocks are still used by later points: the collector frees nothing yet).
    fleet.set_clock("2026-06-06T05:00:00Z");
    let now = fleet.cli(&["upkeep", "run", "--vault", "main"]);
    let run = &now["upkeep"][0]["run"];
    assert_eq!(run["state"], "done", "{now}");
    assert_eq!(run["who"], "admin", "{now}");
    for (_, vm) in vms {
        assert_eq!(
            fates(run, vm).into_iter().filter(|(_, f)| f == "purged").count(),
            1,
            "{vm}: {run}"
        );
        assert!(fleet.deleted_in_vault(vm).is_empty(), "{vm}");
        let days = days_of(fleet.cli(&["points", "--vm", vm])["points"].as_array().unwrap());
        assert_eq!(days, ["2026-06-03", "2026-06-04", "2026-06-05", "2026-06-06"], "{vm}");
    }

    // Stop protection of stopped-c, deleting its data: its points are soft-deleted at once,
    // purged by the next upkeep, and its schedule no longer runs.
    let stopped = fleet.cli(&["stop", "stopped-c", "--delete-data"]);
    assert_eq!(stopped["deleted"].as_array().unwrap().len(), 4, "{stopped}");
    assert!(fleet.points_in_vault("stopped-c").is_empty());
    fleet.cli(&["upkeep", "run"]);
    assert_eq!(fleet.deleted_in_vault("stopped-c").len(), 4, "in their hour of grace");
    fleet.set_clock("2026-06-06T06:30:00Z");
    let purge = fleet.cli(&["upkeep", "run"]);
    // Day 5's change on stopped-c was in no other point: its pack goes, and its space.
    let run = &purge["upkeep"][0]["run"];
    assert_eq!(fates(run, "stopped-c").into_iter().filter(|(_, f)| f == "purged").count(), 4);
    assert!(run["report"]["packs_deleted"].as_u64().unwrap() >= 1, "{run}");
    assert!(run["report"]["bytes_freed"].as_u64().unwrap() > 0, "{run}");
    assert!(fleet.deleted_in_vault("stopped-c").is_empty());
    assert!(fleet.cli(&["points", "--vm", "stopped-c"])["points"].as_array().unwrap().is_empty());
    fleet.set_clock("2026-06-07T02:30:00Z");
    wait_until(fleet, "the backups of 2026-06-07", Duration::from_secs(120), |f| {
        let jobs = f.jobs();
        ["vm-a", "vm-b"].iter().all(|vm| {
            backups(&jobs, vm).iter().any(|j| {
                j["scheduled_at"].as_str().unwrap().starts_with("2026-06-07")
                    && j["state"] == "done"
            })
        })
    });
    assert!(
        !backups(&fleet.jobs(), "stopped-c")
            .iter()
            .any(|j| j["scheduled_at"].as_str().unwrap().starts_with("2026-06-07")),
        "a VM whose protection stopped got a job"
    );
}

/// A restore asked of the coordinator runs on the VM's host: its agent writes the point's
/// disk into a new folder of its restore folder, byte for byte what a restore straight from
/// the vault gives; the request and its end are in the audit log.
fn restored_through_the_coordinator(fleet: &Fleet) {
    let points = fleet.cli(&["points", "--vm", "vm-a"])["points"].as_array().unwrap().clone();
    let oldest = points.iter().find(|p| p["expired_at"].is_null()).unwrap();
    let point = oldest["point"].as_str().unwrap();
    let asked = Instant::now();
    let job = fleet.cli(&["restore", "vm-a", "--point", point, "--to", "drill-1", "--wait"]);
    eprintln!("restore through the coordinator: done {:?} after it was asked", asked.elapsed());
    assert_eq!(job["kind"], "restore");
    assert_eq!(job["state"], "done", "{job}");
    let disks = job["restored"]["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{job}");
    let file = fleet.dir.join("kvm-a/root/var/lib/cairn/restores/drill-1/os");
    assert_eq!(disks[0]["path"], file.to_str().unwrap());
    let direct = fleet.dir.join("direct-os");
    let out = Command::new(agent_exe())
        .args([
            "restore",
            "--vault",
            &fleet.vault,
            "--vm",
            "vm-a",
            "--point",
            point,
            "--disk",
            "os",
        ])
        .arg("--to")
        .arg(&direct)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        std::fs::read(&file).unwrap() == std::fs::read(&direct).unwrap(),
        "restored bytes differ"
    );
    // The folder is the job's own: another restore cannot name it.
    let refused = fleet.cli_fails(&["restore", "vm-a", "--to", "drill-1"]);
    assert!(refused.contains("already writes to folder drill-1"), "{refused}");
    let log = fleet.cli(&["audit"])["audit"].as_array().unwrap().clone();
    let asked = log.iter().any(|e| e["action"] == "restore" && e["who"] == "admin");
    let ended = log.iter().any(|e| e["action"] == "restore-ended" && e["who"] == "kvm-a");
    assert!(asked && ended, "{log:?}");
}

/// A second coordinator on an empty catalogue rebuilds the points from the vault alone, with
/// the outcome of a restore drill run on one of them, which the dashboard shows. (The sample
/// disks hold no file system, so the drill restores and samples them but cannot call the
/// point known to restore: it fails, and says why.)
fn points_rescanned_from_the_vault(fleet: &Fleet) {
    let newest =
        fleet.points_in_vault("vm-a").last().unwrap()["point"].as_str().unwrap().to_owned();
    let drill = Command::new(agent_exe())
        .args(["--json", "drill", "--vault", &fleet.vault, "--vm", "vm-a", "--point", &newest])
        .arg("--work-dir")
        .arg(&fleet.dir)
        .output()
        .unwrap();
    assert_eq!(drill.status.code(), Some(3), "{}", String::from_utf8_lossy(&drill.stderr));
    let said: Value = serde_json::from_slice(&drill.stdout).unwrap();
    assert!(
        said["summary"].as_str().unwrap().contains("no file system could be checked"),
        "{said}"
    );
    let mut fresh = Fleet {
        dir: fleet.dir.join("second"),
        coordinator: fleet.coordinator.clone(),
        port: free_port(),
        server: None,
        agents: vec![],
        vault: fleet.vault.clone(),
    };
    std::fs::create_dir_all(&fresh.dir).unwrap();
    std::fs::copy(fleet.dir.join("vaults.toml"), fresh.dir.join("vaults.toml")).unwrap();
    std::fs::copy(fleet.dir.join("clock"), fresh.dir.join("clock")).unwrap();
    fresh.start_coordinator();
    assert!(fresh.cli(&["points"])["points"].as_array().unwrap().is_empty());
    let rescan = fresh.cli(&["rescan"]);
    let key = |p: &Value| {
        (
            p["vm"].as_str().unwrap().to_owned(),
            p["point"].as_str().unwrap().to_owned(),
            p["captured_at"].clone(),
        )
    };
    let mut want: Vec<_> =
        fleet.cli(&["points"])["points"].as_array().unwrap().iter().map(key).collect();
    let mut got: Vec<_> =
        fresh.cli(&["points"])["points"].as_array().unwrap().iter().map(key).collect();
    want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    got.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(got, want, "{rescan}");
    assert_eq!(rescan["rescan"][0]["added"].as_u64().unwrap() as usize, want.len(), "{rescan}");
    // Another catalogue's jobs are not this one's: the points carry none.
    assert!(
        fresh.cli(&["points"])["points"].as_array().unwrap().iter().all(|p| p["job"].is_null())
    );
    // A second rescan changes nothing.
    let again = fresh.cli(&["rescan"]);
    assert_eq!(again["rescan"][0]["added"], 0, "{again}");
    assert_eq!(again["rescan"][0]["removed"], 0, "{again}");
    // The drill came with the points: vm-a is known to restore to its newest point.
    let drilled: Vec<Value> = fresh.cli(&["points"])["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["drilled_at"].is_null())
        .cloned()
        .collect();
    assert_eq!(drilled.len(), 1, "{drilled:?}");
    assert_eq!(
        (drilled[0]["point"].as_str(), &drilled[0]["drill_passed"]),
        (Some(&*newest), &Value::Bool(false))
    );
    // The first coordinator learns it from its next rescan, and shows it beside each VM: no
    // point of vm-a is known to restore, and its last drill failed.
    fleet.cli(&["rescan"]);
    let vms = fleet.cli(&["vms"])["vms"].as_array().unwrap().clone();
    let a = vms.iter().find(|v| v["name"] == "vm-a").unwrap();
    assert!(a["known_good"].is_null(), "{a}");
    assert_eq!(a["last_drill"]["passed"], false, "{a}");
    let b = vms.iter().find(|v| v["name"] == "vm-b").unwrap();
    assert!(b["known_good"].is_null() && b["last_drill"].is_null(), "{b}");
    let token = std::fs::read_to_string(fleet.dir.join("admin.token")).unwrap();
    let url = format!("{}/dashboard?view=vms#token={}", fleet.url(), token.trim());
    let dom = chromium(&url, None);
    assert!(
        dom.contains("data-known-good=\"\" data-drill=\"failed\""),
        "the dashboard does not show vm-a's drill:\n{dom}"
    );
}

/// Headless Chromium (Debian `chromium`, installed by scripts/test.sh) on `url`: the DOM after
/// the page's script ran, or a screenshot written to `png`.
fn chromium(url: &str, png: Option<&Path>) -> String {
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=15000",
        "--window-size=1280,720",
    ]);
    match png {
        Some(png) => command.arg(format!("--screenshot={}", png.display())),
        None => command.arg("--dump-dom"),
    };
    let out = command
        .arg(url)
        .output()
        .expect("chromium (Debian chromium) is installed by scripts/test.sh");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dashboard_matches_the_api(fleet: &Fleet) {
    let token = std::fs::read_to_string(fleet.dir.join("admin.token")).unwrap();
    let vms = fleet.cli(&["vms"])["vms"].as_array().unwrap().clone();
    let jobs = fleet.jobs();
    let points = fleet.cli(&["points"])["points"].as_array().unwrap().clone();
    let alerts = fleet.cli(&["alerts"])["alerts"].as_array().unwrap().clone();
    let shots = std::env::var_os("CAIRN_SCREENSHOTS").map(PathBuf::from);
    for view in ["vms", "jobs", "plots", "alerts"] {
        let url = format!("{}/dashboard?view={view}#token={}", fleet.url(), token.trim());
        let dom = chromium(&url, None);
        assert!(dom.contains("data-loaded=\"yes\""), "{view}: the page did not load:\n{dom}");
        match view {
            "vms" => {
                for vm in &vms {
                    let row = format!(
                        "data-vm=\"{}\" data-points=\"{}\" data-rpo=\"{}\"",
                        vm["name"].as_str().unwrap(),
                        vm["points"],
                        vm["rpo_seconds"].as_i64().map(|r| r.to_string()).unwrap_or_default()
                    );
                    assert!(dom.contains(&row), "{view}: no row {row}");
                }
            }
            "jobs" => {
                for state in ["done", "failed", "running", "queued"] {
                    let api = jobs.iter().filter(|j| j["state"] == state).count();
                    let shown = dom.matches(&format!("data-state=\"{state}\"")).count();
                    assert_eq!(shown, api, "{view}: {state} jobs");
                }
                let retried = jobs.iter().find(|j| j["attempt"] == 2).expect("kvm-a's retried job");
                let row = format!(
                    "data-job=\"{}\" data-state=\"done\" data-attempt=\"2\"",
                    retried["id"]
                );
                assert!(dom.contains(&row), "{view}: {row}");
            }
            "plots" => {
                for vm in ["vm-a", "vm-b", "stopped-c"] {
                    let n = points.iter().filter(|p| p["vm"] == vm).count();
                    let plot = format!("class=\"plot\" data-vm=\"{vm}\" data-points=\"{n}\"");
                    assert!(dom.contains(&plot), "{view}: {plot}");
                }
            }
            _ => {
                let shown = dom.matches("data-kind=").count();
                assert_eq!(shown, alerts.len(), "{view}: alerts");
            }
        }
        let png = fleet.dir.join(format!("dashboard-{view}.png"));
        chromium(&url, Some(&png));
        let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{view}: a screenshot of {size} bytes");
        if let Some(dir) = &shots {
            std::fs::copy(&png, dir.join(format!("dashboard-{view}.png"))).unwrap();
        }
    }
}
