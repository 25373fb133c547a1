//! The coordinator as a process on loopback: tokens and roles, policies with their field
//! errors, protection, jobs planned and started at their times on an injected clock, the audit
//! log, and one coordinator per catalogue.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Coordinator {
    child: Child,
    url: String,
    token: PathBuf,
    clock: PathBuf,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_clock(clock: &Path, at: &str) {
    std::fs::write(clock, at).unwrap();
}

fn start(dir: &Path) -> Coordinator {
    let clock = dir.join("clock");
    if !clock.exists() {
        set_clock(&clock, "2026-06-01T00:00:00Z");
    }
    let token = dir.join("admin.token");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .arg("serve")
        .arg("--db")
        .arg(dir.join("catalogue.db"))
        .args(["--listen", "127.0.0.1:0", "--max-per-host", "1"])
        .arg("--admin-token-file")
        .arg(&token)
        .arg("--fake-clock")
        .arg(&clock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").expect(&line).to_owned();
    Coordinator { child, url, token, clock }
}

fn cli(c: &Coordinator, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .args(["--url", &c.url, "--token-file", c.token.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// A GET over a plain HTTP/1.1 connection: the status and the JSON body.
fn get(c: &Coordinator, path: &str, token: Option<&str>) -> (u16, Value) {
    use std::io::{Read, Write};
    let addr = c.url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let code = answer.split(' ').nth(1).unwrap().parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

const POLICY: &str = r#"
name = "daily"
[schedule]
kind = "daily"
times = ["02:00"]
jitter-minutes = 30
[retention]
keep-daily = 7
"#;

#[test]
fn the_coordinator_plans_and_starts_jobs_and_guards_its_api() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let admin = std::fs::read_to_string(&c.token).unwrap();

    // No token, a wrong token: 401, nothing done.
    assert_eq!(get(&c, "/api/v1/health", None).0, 200);
    assert_eq!(get(&c, "/api/v1/vms", None).0, 401);
    assert_eq!(get(&c, "/api/v1/vms", Some("cairn_00")).0, 401);
    assert_eq!(get(&c, "/api/v1/vms", Some(&admin)).0, 200);

    // A malformed policy names its field; a good one is stored.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, POLICY.replace("times = [\"02:00\"]", "times = [\"2am\"]")).unwrap();
    let out = cli(&c, &["policy", "put", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("schedule.times[0]"), "{err}");
    let good = dir.path().join("daily.toml");
    std::fs::write(&good, POLICY).unwrap();
    ok(cli(&c, &["policy", "put", good.to_str().unwrap()]));

    // Two VMs on one host (one backup at a time there), one on another.
    for (vm, host) in [("web-1", "kvm-1"), ("web-2", "kvm-1"), ("db-1", "kvm-2")] {
        ok(cli(
            &c,
            &[
                "protect",
                vm,
                "--policy",
                "daily",
                "--host",
                host,
                "--datastore",
                "ds",
                "--vault",
                "v",
            ],
        ));
    }
    let unknown = cli(
        &c,
        &["protect", "x", "--policy", "weekly", "--host", "h", "--datastore", "d", "--vault", "v"],
    );
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no policy named \"weekly\""));

    // 02:40: every VM's jittered start has passed; kvm-1 runs one at a time.
    set_clock(&c.clock, "2026-06-01T02:40:00Z");
    let started = Instant::now();
    let jobs = loop {
        let jobs = ok(cli(&c, &["--json", "jobs"]));
        let jobs = jobs["jobs"].as_array().unwrap().clone();
        if jobs.len() == 3 && jobs.iter().filter(|j| j["state"] == "running").count() == 2 {
            break jobs;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{jobs:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let waiting: Vec<&Value> = jobs.iter().filter(|j| j["state"] == "queued").collect();
    assert_eq!(waiting.len(), 1);
    assert!(waiting[0]["reason"].as_str().unwrap().contains("host kvm-1"), "{waiting:?}");
    for j in &jobs {
        assert_eq!(j["scheduled_at"], "2026-06-01T02:00:00Z");
    }

    // The audit log has who did what.
    let (_, audit) = get(&c, "/api/v1/audit", Some(&admin));
    let actions: Vec<&str> =
        audit["audit"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["put-policy", "protect", "protect", "protect"]);

    // One coordinator per catalogue.
    let second = Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .arg("serve")
        .arg("--db")
        .arg(dir.path().join("catalogue.db"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("held by another coordinator"), "{err}");

    // A restart loses nothing and doubles nothing.
    drop(c);
    let c = start(dir.path());
    std::thread::sleep(Duration::from_millis(1500));
    let jobs = ok(cli(&c, &["--json", "jobs"]));
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 3, "{jobs}");
}
