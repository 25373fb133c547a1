//! The command line's side of the API: one request per command, the answer printed.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{AgentCommand, Command, PolicyCommand, UpkeepCommand, UserCommand};

/// The token: from `--token-file`, else CAIRN_TOKEN.
fn token(file: Option<&Path>) -> anyhow::Result<String> {
    match file {
        Some(f) => Ok(std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?
            .trim()
            .to_owned()),
        None => std::env::var("CAIRN_TOKEN")
            .context("give --token-file FILE or set CAIRN_TOKEN (the admin's is written at the first `serve`)"),
    }
}

/// The HTTP client: the system's roots, plus `ca_file` when given.
pub fn http_client(ca_file: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    if let Some(file) = ca_file {
        let pem = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} holds no PEM certificate", file.display()))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().context("making the HTTP client")
}

/// Sends one request (with a body of a content type) and returns the JSON answer, or the
/// API's error as an error.
async fn call(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<(String, &str)>,
) -> anyhow::Result<Value> {
    let mut request =
        client.request(method, format!("{}{path}", url.trim_end_matches('/'))).bearer_auth(token);
    if let Some((body, content_type)) = body {
        request = request.header(reqwest::header::CONTENT_TYPE, content_type).body(body);
    }
    let response = request.send().await.map_err(|e| {
        // The TLS error is deep in the chain: show all of it (an untrusted certificate says so).
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            source = s.source();
        }
        anyhow::anyhow!(
            "cannot reach the coordinator at {url} ({detail}): is it running, and for https, is its certificate trusted (--ca-file)?"
        )
    })?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = answer["error"].as_str().unwrap_or("no message");
        bail!("the coordinator answered {status}: {message}");
    }
    Ok(answer)
}

pub async fn run(
    client: &reqwest::Client,
    url: &str,
    token_file: Option<&Path>,
    as_json: bool,
    command: Command,
) -> anyhow::Result<()> {
    if let Command::Login { name, save, password_file } = command {
        return login(client, url, &name, &save, password_file.as_deref(), as_json).await;
    }
    let token = token(token_file)?;
    let get = reqwest::Method::GET;
    let put = reqwest::Method::PUT;
    let post = reqwest::Method::POST;
    let json_body = |v: Value| Some((v.to_string(), "application/json"));
    let (answer, list) = match command {
        Command::Serve { .. } | Command::HashPassword | Command::Login { .. } => {
            unreachable_serve()?
        }
        Command::Logout => {
            (call(client, url, &token, post.clone(), "/api/v1/logout", None).await?, None)
        }
        Command::Policy(PolicyCommand::Put { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let policy = cairn_policy::Policy::parse(&text)
                .with_context(|| format!("{} is not a valid policy", file.display()))?;
            let path = format!("/api/v1/policies/{}", policy.spec.name);
            (call(client, url, &token, put, &path, Some((text, "application/toml"))).await?, None)
        }
        Command::Policy(PolicyCommand::List) => {
            (call(client, url, &token, get, "/api/v1/policies", None).await?, Some("policies"))
        }
        Command::Protect { vm, policy, host, datastore, vault } => {
            let body =
                json!({ "host": host, "datastore": datastore, "vault": vault, "policy": policy });
            let path = format!("/api/v1/vms/{vm}");
            (
                call(client, url, &token, put, &path, Some((body.to_string(), "application/json")))
                    .await?,
                None,
            )
        }
        Command::Vms => (call(client, url, &token, get, "/api/v1/vms", None).await?, Some("vms")),
        Command::Jobs { vm } => {
            let path = match vm {
                Some(vm) => format!("/api/v1/jobs?vm={vm}"),
                None => "/api/v1/jobs".into(),
            };
            (call(client, url, &token, get, &path, None).await?, Some("jobs"))
        }
        Command::Alerts => {
            (call(client, url, &token, get, "/api/v1/alerts", None).await?, Some("alerts"))
        }
        Command::Audit => {
            (call(client, url, &token, get.clone(), "/api/v1/audit", None).await?, Some("audit"))
        }
        Command::Points { vm } => {
            let path = match vm {
                Some(vm) => format!("/api/v1/points?vm={vm}"),
                None => "/api/v1/points".into(),
            };
            (call(client, url, &token, get, &path, None).await?, Some("points"))
        }
        Command::Backup { vm, retain_until } => {
            let body = json!({ "retain_until": retain_until });
            let path = format!("/api/v1/vms/{vm}/backup");
            (call(client, url, &token, post, &path, json_body(body)).await?, None)
        }
        Command::Restore { vm, point, disk, to, wait } => {
            let body = json!({ "point": point, "disk": disk, "to": to });
            let path = format!("/api/v1/vms/{vm}/restore");
            let queued = call(client, url, &token, post, &path, json_body(body)).await?;
            if !wait {
                (queued, None)
            } else {
                let id = queued["job"].as_u64().context("the coordinator named no job")?;
                eprintln!("restore job {id} queued: waiting for the agent of {vm}'s host");
                let job = loop {
                    let jobs = call(
                        client,
                        url,
                        &token,
                        get.clone(),
                        &format!("/api/v1/jobs?vm={vm}"),
                        None,
                    )
                    .await?;
                    let job = jobs["jobs"]
                        .as_array()
                        .and_then(|j| j.iter().find(|j| j["id"].as_u64() == Some(id)).cloned())
                        .with_context(|| format!("job {id} is no longer listed"))?;
                    if matches!(job["state"].as_str(), Some("done" | "failed")) {
                        break job;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                };
                if job["state"] == "failed" {
                    bail!("restore job {id} failed: {}", job["reason"].as_str().unwrap_or("-"));
                }
                (job, None)
            }
        }
        Command::Stop { vm, delete_data } => {
            let body = json!({ "delete_data": delete_data });
            let path = format!("/api/v1/vms/{vm}/stop");
            (call(client, url, &token, post, &path, json_body(body)).await?, None)
        }
        Command::Upkeep(UpkeepCommand::Run { vault }) => {
            let body = json!({ "vault": vault });
            (call(client, url, &token, post, "/api/v1/upkeep", json_body(body)).await?, None)
        }
        Command::Upkeep(UpkeepCommand::List) => {
            (call(client, url, &token, get, "/api/v1/upkeep", None).await?, Some("runs"))
        }
        Command::Upkeep(UpkeepCommand::Show { id }) => {
            (call(client, url, &token, get, &format!("/api/v1/upkeep/{id}"), None).await?, None)
        }
        Command::Rescan { vault, force } => {
            let body = json!({ "vault": vault, "force": force });
            (call(client, url, &token, post, "/api/v1/rescan", json_body(body)).await?, None)
        }
        Command::User(UserCommand::Add { name, role }) => {
            let body = json!({ "name": name, "role": role });
            (call(client, url, &token, post, "/api/v1/users", json_body(body)).await?, None)
        }
        Command::User(UserCommand::Revoke { name }) => {
            let path = format!("/api/v1/users/{name}/revoke");
            (call(client, url, &token, post, &path, None).await?, None)
        }
        Command::User(UserCommand::List) => {
            (call(client, url, &token, get, "/api/v1/users", None).await?, Some("users"))
        }
        Command::Enroll { host } => {
            let body = json!({ "host": host });
            (call(client, url, &token, post, "/api/v1/enrollments", json_body(body)).await?, None)
        }
        Command::Agent(AgentCommand::List) => {
            (call(client, url, &token, get, "/api/v1/agents", None).await?, Some("agents"))
        }
        Command::Agent(AgentCommand::Revoke { name }) => {
            let path = format!("/api/v1/agents/{name}");
            (call(client, url, &token, reqwest::Method::DELETE, &path, None).await?, None)
        }
    };
    match (as_json, list) {
        (true, _) | (false, None) => println!("{}", serde_json::to_string_pretty(&answer)?),
        (false, Some(key)) => {
            for row in answer[key].as_array().into_iter().flatten() {
                println!("{}", line(key, row));
            }
        }
    }
    Ok(())
}

fn unreachable_serve() -> anyhow::Result<(Value, Option<&'static str>)> {
    bail!("not a client command")
}

/// Logs in and keeps the session's token in `save` (0600, never through a link).
async fn login(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    save: &Path,
    password_file: Option<&Path>,
    as_json: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let password = match password_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the password file {}", f.display()))?,
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
            line
        }
    };
    let password = password.trim_end_matches(['\n', '\r']);
    let body = json!({ "name": name, "password": password }).to_string();
    let answer = call(
        client,
        url,
        "",
        reqwest::Method::POST,
        "/api/v1/login",
        Some((body, "application/json")),
    )
    .await?;
    let token = answer["token"].as_str().context("the coordinator sent no token")?;
    if std::fs::symlink_metadata(save).is_ok_and(|m| !m.is_file()) {
        bail!("{} is not a regular file: give a file to write the token to", save.display());
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(save)
        .with_context(|| format!("writing the session's token to {}", save.display()))?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(token.as_bytes())?;
    let shown = json!({ "name": answer["name"], "role": answer["role"], "expires_at": answer["expires_at"], "token_file": save });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        println!(
            "logged in as {} ({}) until {}: use --token-file {}",
            name,
            answer["role"].as_str().unwrap_or("-"),
            answer["expires_at"].as_str().unwrap_or("-"),
            save.display()
        );
    }
    Ok(())
}

/// One row of a list, for people.
fn line(key: &str, row: &Value) -> String {
    let s = |k: &str| match &row[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    match key {
        "policies" => s("name"),
        "vms" => format!(
            "{}\t{}\t{}\t{}\tprotected={}",
            s("name"),
            s("policy"),
            s("host"),
            s("vault"),
            s("protected")
        ),
        "jobs" => format!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            s("id"),
            s("vm"),
            s("kind"),
            s("scheduled_at"),
            s("state"),
            s("reason")
        ),
        "alerts" => format!("{}\t{}\t{}", s("kind"), s("vm"), s("message")),
        "audit" => format!("{}\t{}\t{}\t{}", s("at"), s("who"), s("action"), s("details")),
        "points" => {
            format!(
                "{}\t{}\t{}\t{}\tjob={}\tstored={}",
                s("vm"),
                s("point"),
                s("captured_at"),
                s("consistency"),
                s("job"),
                s("bytes_stored")
            ) + &row["expired_at"].as_str().map(|t| format!("\texpired {t}")).unwrap_or_default()
        }
        "runs" => format!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            s("id"),
            s("vault"),
            s("scheduled_at"),
            s("state"),
            s("who"),
            s("summary")
        ),
        "users" => format!("{}\t{}\trevoked={}", s("name"), s("role"), s("revoked")),
        "agents" => {
            format!("{}\tlast seen {}\trevoked={}", s("name"), s("last_seen"), s("revoked"))
        }
        _ => row.to_string(),
    }
}
