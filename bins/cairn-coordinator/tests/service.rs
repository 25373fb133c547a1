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
    start_with(dir, &[])
}

fn start_with(dir: &Path, extra: &[&str]) -> Coordinator {
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
        .args(extra)
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
    let (code, body) = request(c, "GET", path, token, None);
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A POST of a JSON body: the status and the JSON answer.
fn post(c: &Coordinator, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let (code, body) = request(c, "POST", path, token, Some(&body.to_string()));
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// One request over a plain HTTP/1.1 connection: the status and the body's text.
fn request(
    c: &Coordinator,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = c.url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    let kind = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{kind}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let code = answer.split(' ').nth(1).unwrap().parse().unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // A chunked body (no Content-Length) comes as size lines around the data.
    let body = if answer.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body.split("\r\n").skip(1).step_by(2).collect::<Vec<_>>().join("")
    } else {
        body.to_owned()
    };
    (code, body)
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

/// A webhook receiver on loopback: the JSON bodies POSTed to it.
fn webhook() -> (String, std::sync::mpsc::Receiver<Value>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut data = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as many bytes as Content-Length says.
            let body = loop {
                let n = stream.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break None;
                }
                data.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&data).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break Some(body.to_owned());
                    }
                }
            };
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            if let Some(body) = body
                && let Ok(v) = serde_json::from_str(&body)
            {
                let _ = tx.send(v);
            }
        }
    });
    (url, rx)
}

#[test]
fn agents_get_only_their_jobs_and_users_only_their_role() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, alerts) = webhook();
    let c = start_with(dir.path(), &["--webhook", &hook]);
    let admin = std::fs::read_to_string(&c.token).unwrap();
    let good = dir.path().join("daily.toml");
    std::fs::write(&good, POLICY).unwrap();
    ok(cli(&c, &["policy", "put", good.to_str().unwrap()]));
    for (vm, host) in [("web-1", "kvm-1"), ("db-1", "kvm-2")] {
        let args = [
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
        ];
        ok(cli(&c, &args));
    }

    // Enrollment: an unknown token is refused; a good one works once.
    let (code, _) =
        post(&c, "/api/v1/agents/enroll", None, serde_json::json!({ "token": "cairn_00" }));
    assert_eq!(code, 401);
    let enrollment =
        ok(cli(&c, &["--json", "enroll", "kvm-1"]))["token"].as_str().unwrap().to_owned();
    let (code, enrolled) =
        post(&c, "/api/v1/agents/enroll", None, serde_json::json!({ "token": enrollment }));
    assert_eq!(code, 200, "{enrolled}");
    assert_eq!(enrolled["name"], "kvm-1");
    let agent = enrolled["token"].as_str().unwrap().to_owned();
    let (code, _) =
        post(&c, "/api/v1/agents/enroll", None, serde_json::json!({ "token": enrollment }));
    assert_eq!(code, 401, "an enrollment token works once");

    // A bad agent token, a user's token: 401 at the agents' calls; an agent's token opens
    // nothing of the users' API.
    let poll = serde_json::json!({ "running": [], "wait_seconds": 0 });
    assert_eq!(post(&c, "/api/v1/agents/poll", Some("cairn_00"), poll.clone()).0, 401);
    assert_eq!(post(&c, "/api/v1/agents/poll", Some(&admin), poll.clone()).0, 401);
    assert_eq!(get(&c, "/api/v1/vms", Some(&agent)).0, 401);
    let (code, orders) = post(&c, "/api/v1/agents/poll", Some(&agent), poll.clone());
    assert_eq!(code, 200);
    assert_eq!(orders["jobs"], serde_json::json!([]));
    assert_eq!(orders["schedule"][0]["vm"], "web-1", "the agent's VMs' schedule: {orders}");
    assert_eq!(orders["schedule"].as_array().unwrap().len(), 1);

    // At 02:40 the long poll answers with kvm-1's job only.
    set_clock(&c.clock, "2026-06-01T02:40:00Z");
    let wait = serde_json::json!({ "running": [], "wait_seconds": 30 });
    let (code, orders) = post(&c, "/api/v1/agents/poll", Some(&agent), wait);
    assert_eq!(code, 200);
    let jobs = orders["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{orders}");
    assert_eq!(jobs[0]["vm"], "web-1");
    assert_eq!(jobs[0]["attempt"], 1);
    let web = jobs[0]["id"].as_u64().unwrap();
    let all = ok(cli(&c, &["--json", "jobs"]));
    let db = all["jobs"].as_array().unwrap().iter().find(|j| j["vm"] == "db-1").unwrap()["id"]
        .as_u64()
        .unwrap();

    // Not running it any more (say, the agent restarted): handed out again as attempt 2.
    let (_, orders) = post(&c, "/api/v1/agents/poll", Some(&agent), poll.clone());
    assert_eq!(orders["jobs"][0]["id"], web);
    assert_eq!(orders["jobs"][0]["attempt"], 2);

    // Another host's job: 403, nothing recorded.
    let running = serde_json::json!({ "state": "running", "phase": "snapshot" });
    assert_eq!(
        post(&c, &format!("/api/v1/agents/jobs/{db}"), Some(&agent), running.clone()).0,
        403
    );
    assert_eq!(post(&c, &format!("/api/v1/agents/jobs/{web}"), Some(&agent), running).0, 200);
    let point = |id: &str| {
        serde_json::json!({ "state": "done", "point": {
            "id": id, "captured_at": "2026-06-01T02:39:00Z", "consistency": "crash",
            "size": 1000, "bytes_scanned": 1000, "bytes_changed": 100, "bytes_stored": 50,
            "duration_ms": 2000 } })
    };
    let first = "20260601T024100.000Z-00000001";
    let path = format!("/api/v1/agents/jobs/{web}");
    assert_eq!(post(&c, &path, Some(&agent), point(first)).0, 200);
    assert_eq!(post(&c, &path, Some(&agent), point(first)).0, 200, "the same report again");
    let (code, answer) = post(&c, &path, Some(&agent), point("20260601T024500.000Z-00000002"));
    assert_eq!(code, 409, "a second point for one job: {answer}");
    let late = serde_json::json!({ "state": "running", "phase": "transfer" });
    assert_eq!(post(&c, &path, Some(&agent), late).0, 410, "progress on an ended job");
    let points = ok(cli(&c, &["--json", "points"]));
    let points = points["points"].as_array().unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0]["point"], first);
    assert_eq!(points[0]["job"], web);

    // The duplicate's alert reaches the webhook.
    let alert = alerts.recv_timeout(Duration::from_secs(30)).expect("an alert at the webhook");
    assert_eq!(alert["kind"], "failed-job");
    assert!(alert["message"].as_str().unwrap().contains("second point"), "{alert}");

    // A viewer reads, metrics included, and changes nothing; revoked, nothing at all.
    let viewer = ok(cli(&c, &["--json", "user", "add", "eve", "--role", "viewer"]));
    let viewer = viewer["token"].as_str().unwrap().to_owned();
    let (code, metrics) = request(&c, "GET", "/metrics", Some(&viewer), None);
    assert_eq!(code, 200);
    assert!(metrics.contains("cairn_points{vm=\"web-1\"} 1"), "{metrics}");
    assert!(metrics.contains("cairn_last_backup_stored_bytes{vm=\"web-1\"} 50"), "{metrics}");
    assert!(metrics.contains("cairn_rpo_seconds{vm=\"web-1\"} 60"), "{metrics}");
    assert!(metrics.contains("cairn_jobs{kind=\"backup\",state=\"done\"} 1"), "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    let (code, _) = request(&c, "PUT", "/api/v1/policies/daily", Some(&viewer), Some(POLICY));
    assert_eq!(code, 403);
    // Restores are an operator's: a viewer's is refused, and nothing is queued.
    let restore = serde_json::json!({ "to": "drill" });
    let (code, _) = post(&c, "/api/v1/vms/web-1/restore", Some(&viewer), restore.clone());
    assert_eq!(code, 403);
    assert!(!get(&c, "/api/v1/jobs", Some(&admin)).1.to_string().contains("restore"));
    let (code, body) = post(&c, "/api/v1/vms/web-9/restore", Some(&admin), restore.clone());
    assert_eq!(code, 404, "{body}");
    let bad = serde_json::json!({ "to": "../../etc" });
    let (code, body) = post(&c, "/api/v1/vms/web-1/restore", Some(&admin), bad);
    assert_eq!((code, body["error"].as_str().unwrap().contains("folder")), (409, true), "{body}");
    ok(cli(&c, &["user", "revoke", "eve"]));
    assert_eq!(get(&c, "/api/v1/vms", Some(&viewer)).0, 401);

    // Back up now, kept until a date: the agent gets the job with it.
    let until = "2027-01-01T00:00:00Z";
    ok(cli(&c, &["backup", "web-1", "--retain-until", until]));
    let wait = serde_json::json!({ "running": [], "wait_seconds": 30 });
    let (_, orders) = post(&c, "/api/v1/agents/poll", Some(&agent), wait);
    assert_eq!(orders["jobs"][0]["retain_until"], until, "{orders}");
    // Not the schedule's: its point records no policy.
    assert_eq!(orders["jobs"][0]["policy"], Value::Null);
    assert_eq!(orders["jobs"][0]["catalogue"].as_str().unwrap().len(), 32, "{orders}");

    // A revoked agent: 401, nothing done.
    ok(cli(&c, &["agent", "revoke", "kvm-1"]));
    assert_eq!(post(&c, "/api/v1/agents/poll", Some(&agent), poll).0, 401);
    let (_, audit) = get(&c, "/api/v1/audit", Some(&admin));
    let actions: Vec<&str> =
        audit["audit"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    for action in
        ["new-enrollment", "enroll", "add-user", "revoke-user", "back-up-now", "revoke-agent"]
    {
        assert!(actions.contains(&action), "{action}: {actions:?}");
    }
}

#[test]
fn the_coordinator_serves_https_and_refuses_plain_http_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    // Plain HTTP on an address other than loopback: refused before anything is served.
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .arg("serve")
        .arg("--db")
        .arg(dir.path().join("refused.db"))
        .args(["--listen", "0.0.0.0:0"])
        .arg("--admin-token-file")
        .arg(dir.path().join("refused.token"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("give --tls-cert and --tls-key"), "{err}");

    let (ca, cert, key) = cairn_testkit::tls_certificates(dir.path());
    let c = start_with(
        dir.path(),
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(c.url.starts_with("https://127.0.0.1:"), "{}", c.url);
    // Trusted through --ca-file: the API answers.
    let trusted = cli(&c, &["--ca-file", ca.to_str().unwrap(), "--json", "vms"]);
    assert_eq!(ok(trusted)["vms"], serde_json::json!([]));
    // Not trusted: refused, saying why.
    let untrusted = cli(&c, &["--json", "vms"]);
    let err = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success(), "{err}");
    assert!(err.contains("certificate"), "{err}");
    // Plain HTTP to the TLS port gets no API answer.
    let plain = Coordinator {
        child: Command::new("true").spawn().unwrap(),
        url: c.url.replace("https://", "http://"),
        token: c.token.clone(),
        clock: c.clock.clone(),
    };
    use std::io::{Read, Write};
    let addr = plain.url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = write!(stream, "GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("\"status\":\"ok\""));
}

/// `serve` with a bad vaults file: it does not start, and says which field or file is wrong.
fn refused_to_serve(dir: &Path, vaults: &str) -> String {
    let file = dir.join("vaults.toml");
    std::fs::write(&file, vaults).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .arg("serve")
        .arg("--db")
        .arg(dir.join("refused.db"))
        .args(["--listen", "127.0.0.1:0", "--vaults"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{vaults}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn vault_calls_need_a_vaults_file_the_right_role_and_a_known_vault() {
    let dir = tempfile::tempdir().unwrap();
    // Bad vaults files stop the coordinator before it serves, naming what is wrong.
    let e = refused_to_serve(dir.path(), "[vaults.main]\nurl = \"file:///x\"\nkey-fil = \"k\"\n");
    assert!(e.contains("unknown field `key-fil`"), "{e}");
    let e = refused_to_serve(
        dir.path(),
        "[upkeep.schedule]\nkind = \"daily\"\ntimes = [\"3am\"]\n[vaults.main]\nurl = \"file:///x\"\n",
    );
    assert!(e.contains("schedule.times"), "{e}");
    let e = refused_to_serve(
        dir.path(),
        "[vaults.main]\nurl = \"file:///x\"\nkey-file = \"/nonexistent/main.key\"\n",
    );
    assert!(e.contains("/nonexistent/main.key") && e.contains("[vaults.main]"), "{e}");

    // Without a vaults file: upkeep, rescan and deletion are refused, and a refused deletion
    // leaves the VM protected.
    let plain = start(&dir.path().join("plain").tap_mkdir());
    let admin = std::fs::read_to_string(&plain.token).unwrap();
    std::fs::write(dir.path().join("daily.toml"), POLICY).unwrap();
    ok(cli(&plain, &["policy", "put", dir.path().join("daily.toml").to_str().unwrap()]));
    let protect = [
        "protect",
        "web-1",
        "--policy",
        "daily",
        "--host",
        "h",
        "--datastore",
        "d",
        "--vault",
        "main",
    ];
    ok(cli(&plain, &protect));
    for path in ["/api/v1/upkeep", "/api/v1/rescan"] {
        let (code, answer) = post(&plain, path, Some(&admin), serde_json::json!({}));
        assert_eq!(code, 409, "{path}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains("--vaults"), "{answer}");
    }
    let (code, _) = post(
        &plain,
        "/api/v1/vms/web-1/stop",
        Some(&admin),
        serde_json::json!({"delete_data": true}),
    );
    assert_eq!(code, 409);
    let vms = ok(cli(&plain, &["--json", "vms"]));
    assert_eq!(vms["vms"][0]["protected"], true, "{vms}");
    drop(plain);

    // With a vaults file whose vault is not there (yet): the upkeep runs, fails saying why,
    // and raises an alert; roles and names are checked first.
    let home = dir.path().join("keeper").tap_mkdir();
    let missing = home.join("no-vault-here");
    std::fs::write(
        home.join("vaults.toml"),
        format!("[vaults.main]\nurl = {:?}\n", missing.to_str().unwrap()),
    )
    .unwrap();
    let vaults = home.join("vaults.toml");
    let c = start_with(&home, &["--vaults", vaults.to_str().unwrap()]);
    let admin = std::fs::read_to_string(&c.token).unwrap();
    ok(cli(&c, &["policy", "put", dir.path().join("daily.toml").to_str().unwrap()]));
    ok(cli(&c, &protect));
    let viewer = ok(cli(&c, &["--json", "user", "add", "eve", "--role", "viewer"]));
    let viewer = viewer["token"].as_str().unwrap().to_owned();
    let operator = ok(cli(&c, &["--json", "user", "add", "olga", "--role", "operator"]));
    let operator = operator["token"].as_str().unwrap().to_owned();
    let (code, _) = post(&c, "/api/v1/upkeep", Some(&viewer), serde_json::json!({}));
    assert_eq!(code, 403);
    let (code, _) = post(&c, "/api/v1/rescan", Some(&operator), serde_json::json!({}));
    assert_eq!(code, 403);
    let (code, _) = post(&c, "/api/v1/upkeep", None, serde_json::json!({}));
    assert_eq!(code, 401);
    // Deleting data takes an admin; stopping protection alone an operator.
    let (code, _) = post(
        &c,
        "/api/v1/vms/web-1/stop",
        Some(&operator),
        serde_json::json!({"delete_data": true}),
    );
    assert_eq!(code, 403);
    let (code, answer) =
        post(&c, "/api/v1/vms/nobody/stop", Some(&operator), serde_json::json!({}));
    assert_eq!(code, 404, "{answer}");
    let (code, answer) =
        post(&c, "/api/v1/upkeep", Some(&admin), serde_json::json!({"vault": "elsewhere"}));
    assert_eq!(code, 404, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("elsewhere"), "{answer}");
    let (code, answer) =
        post(&c, "/api/v1/upkeep", Some(&admin), serde_json::json!({"vault": "main"}));
    assert_eq!(code, 200, "{answer}");
    let run = &answer["upkeep"][0];
    assert_eq!(run["ok"], false, "{answer}");
    assert_eq!(run["run"]["state"], "failed");
    assert!(run["run"]["summary"].as_str().unwrap().contains("vault main"), "{answer}");
    let alerts = ok(cli(&c, &["--json", "alerts"]));
    assert!(
        alerts["alerts"].as_array().unwrap().iter().any(|a| a["kind"] == "failed-upkeep"),
        "{alerts}"
    );
    let (code, answer) = post(&c, "/api/v1/rescan", Some(&admin), serde_json::json!({}));
    assert_eq!(code, 502, "{answer}");
    // The audit log names who asked.
    let (_, audit) = get(&c, "/api/v1/audit", Some(&admin));
    assert!(
        audit["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "upkeep" && a["who"] == "admin"),
        "{audit}"
    );
    // Stopping protection keeping the data: the VM is no longer protected.
    let (code, answer) = post(&c, "/api/v1/vms/web-1/stop", Some(&operator), serde_json::json!({}));
    assert_eq!(code, 200, "{answer}");
    let vms = ok(cli(&c, &["--json", "vms"]));
    assert_eq!(vms["vms"][0]["protected"], false, "{vms}");
}

trait MkDir {
    fn tap_mkdir(self) -> Self;
}

impl MkDir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Runs the CLI with `stdin` as its input.
fn cli_with_input(c: &Coordinator, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .args(["--url", &c.url])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn people_log_in_from_the_users_file_with_their_role() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    // The hash for the file, from the CLI.
    let out = cli_with_input(&c, &["hash-password"], "correct horse\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    drop(c);
    let users = dir.path().join("users.toml");
    // A bad file stops the coordinator before it serves, naming the entry.
    std::fs::write(&users, "[users.alice]\nrole = \"root\"\npassword-hash = \"x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .arg("serve")
        .arg("--db")
        .arg(dir.path().join("catalogue.db"))
        .args(["--listen", "127.0.0.1:0", "--users"])
        .arg(&users)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("[users.alice] role"), "{e}");
    std::fs::write(
        &users,
        format!(
            "[users.alice]\nrole = \"operator\"\npassword-hash = {hash:?}\n\
             [users.eve]\nrole = \"viewer\"\npassword-hash = {hash:?}\n"
        ),
    )
    .unwrap();
    let c = start_with(dir.path(), &["--users", users.to_str().unwrap()]);

    // Wrong passwords and unknown names: 401; five in a row make the name wait.
    let login = |name: &str, password: &str| {
        post(&c, "/api/v1/login", None, serde_json::json!({ "name": name, "password": password }))
    };
    assert_eq!(login("mallory", "correct horse").0, 401);
    for _ in 0..5 {
        assert_eq!(login("eve", "wrong").0, 401);
    }
    assert_eq!(login("eve", "correct horse").0, 429, "eve waits after five failures");

    // alice logs in with the CLI: the session's token works as an operator's, not an admin's.
    let password = dir.path().join("password");
    std::fs::write(&password, "correct horse\n").unwrap();
    let session = dir.path().join("alice.token");
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .args(["--url", &c.url, "--json", "login", "alice", "--save"])
        .arg(&session)
        .arg("--password-file")
        .arg(&password)
        .output()
        .unwrap();
    let answer = ok(out);
    assert_eq!(answer["role"], "operator");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&session).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&session).unwrap();
    assert_eq!(get(&c, "/api/v1/vms", Some(&token)).0, 200);
    let (code, _) = post(
        &c,
        "/api/v1/users",
        Some(&token),
        serde_json::json!({ "name": "x", "role": "admin" }),
    );
    assert_eq!(code, 403, "an operator's session does not add users");
    // The session holds no more than the user's role in the file now: demoted, a viewer's;
    // taken out of the file, nothing.
    let restore = serde_json::json!({ "to": "drill" });
    assert_eq!(post(&c, "/api/v1/vms/web-9/restore", Some(&token), restore.clone()).0, 404);
    let file = std::fs::read_to_string(&users).unwrap();
    std::fs::write(&users, file.replacen("operator", "viewer", 1)).unwrap();
    assert_eq!(post(&c, "/api/v1/vms/web-9/restore", Some(&token), restore.clone()).0, 403);
    std::fs::write(&users, "").unwrap();
    assert_eq!(get(&c, "/api/v1/vms", Some(&token)).0, 401);
    std::fs::write(&users, file).unwrap();
    assert_eq!(post(&c, "/api/v1/vms/web-9/restore", Some(&token), restore).0, 404);
    // The session ends 12 hours later.
    set_clock(&c.clock, "2026-06-01T12:00:01Z");
    assert_eq!(get(&c, "/api/v1/vms", Some(&token)).0, 401);
    set_clock(&c.clock, "2026-06-01T01:00:00Z");
    assert_eq!(get(&c, "/api/v1/vms", Some(&token)).0, 200);
    // Logout ends it at once; the login and logout are in the audit log.
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-coordinator"))
        .args(["--url", &c.url, "--token-file"])
        .arg(&session)
        .arg("logout")
        .output()
        .unwrap();
    ok(out);
    assert_eq!(get(&c, "/api/v1/vms", Some(&token)).0, 401);
    let admin = std::fs::read_to_string(&c.token).unwrap();
    let log = get(&c, "/api/v1/audit", Some(&admin)).1.to_string();
    assert!(
        log.contains("\"login\"") && log.contains("\"logout\"") && log.contains("alice"),
        "{log}"
    );
}
