//! Installing the agent on a host, and taking it away again: every change is listed, recorded
//! in `/etc/cairn/install.json`, and `uninstall` reverts exactly the recorded changes (a file
//! changed since is kept and said so). Both are idempotent, and both work under a root folder
//! (`--root DIR`) for images and tests; systemd is only asked to enable or disable the unit
//! when the root is `/` and systemd runs.

use std::fs::Permissions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// The unit's name.
pub const UNIT: &str = "cairn-agent.service";
const RECORD: &str = "etc/cairn/install.json";
const CONFIG: &str = "etc/cairn/agent.toml";
const ENROLL: &str = "etc/cairn/enroll-token";
const UNIT_PATH: &str = "etc/systemd/system/cairn-agent.service";
const STATE: &str = "var/lib/cairn";

/// What `install` is given.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The coordinator's URL.
    pub coordinator: String,
    /// The agent's name (the host's).
    pub host: String,
    /// The one-time enrollment token, copied for the agent's first contact.
    pub enroll_token: Option<String>,
    /// The agent's executable as the host will run it.
    pub executable: PathBuf,
}

/// One change made to (or found on) the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `dir`, `file` or `unit-enabled`.
    pub kind: String,
    /// The path on the host (as seen from the root), or the unit.
    pub path: String,
    /// A file's SHA-256 when written, to know whether it changed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// What one step did, for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// `created`, `unchanged`, `kept`, `removed`, `gone`, `enabled`, `disabled`.
    pub action: String,
    /// The path or unit.
    pub path: String,
    /// Why, when it is not obvious.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    version: u32,
    changes: Vec<Change>,
}

fn step(action: &str, path: &str, note: Option<&str>) -> Step {
    Step { action: action.into(), path: path.into(), note: note.map(str::to_owned) }
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn under(root: &Path, rel: &str) -> PathBuf {
    root.join(rel)
}

fn shown(rel: &str) -> String {
    format!("/{rel}")
}

/// The systemd unit.
pub fn unit_text(executable: &Path) -> String {
    format!(
        "[Unit]
Description=Cairn backup agent
Documentation=https://example.invalid/cairn
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
ExecStart={} run --agent-config /{CONFIG}
Restart=on-failure
RestartSec=10s
# SIGTERM stops running backups without committing; the coordinator hands them out again.
KillMode=mixed
TimeoutStopSec=120s
# Root: the agent reads disks and freezes file systems.
User=root
UMask=0077

[Install]
WantedBy=multi-user.target
",
        executable.display()
    )
}

fn config_text(o: &InstallOptions) -> String {
    format!(
        "# Cairn agent configuration, written by `cairn-agent install`.
coordinator = {:?}
host = {:?}
state-dir = \"/{STATE}\"
enroll-token-file = \"/{ENROLL}\"

# The VMs this host backs up, by the names the coordinator uses:
# [vms.web-1]
# config = \"/etc/cairn/vms/web-1.toml\"

# The vaults this host writes to:
# [vaults.main]
# url = \"/srv/cairn/vault\"
",
        o.coordinator, o.host
    )
}

/// Writes `path` whole: a temporary file beside it, synced, renamed over, the folder synced.
/// A full disk or a crash leaves the old file or none, never a truncated one.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("cairn-tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(Error::io("creating", &tmp))?;
    let written = file
        .set_permissions(Permissions::from_mode(mode))
        .and_then(|()| file.write_all(bytes))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("writing", path)(e));
    }
    std::fs::rename(&tmp, path).map_err(Error::io("replacing", path))?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn read_record(root: &Path) -> Result<Option<Record>, Error> {
    let path = under(root, RECORD);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::Install(format!(
                "{} does not decode ({e}): remove what it lists by hand",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("reading", path)(e)),
    }
}

fn save_record(root: &Path, record: &Record) -> Result<(), Error> {
    let path = under(root, RECORD);
    write_file(&path, &serde_json::to_vec_pretty(record).unwrap_or_default(), 0o600)
}

/// Writes the file `rel` under `root` and records it (with its SHA-256) before going on.
fn write_recorded(
    root: &Path,
    record: &mut Record,
    rel: &str,
    text: &str,
    mode: u32,
) -> Result<(), Error> {
    write_file(&under(root, rel), text.as_bytes(), mode)?;
    record.changes.retain(|c| c.path != shown(rel));
    record.changes.push(Change {
        kind: "file".into(),
        path: shown(rel),
        sha256: Some(sha(text.as_bytes())),
    });
    save_record(root, record)
}

/// Whether systemd manages this root (it is `/` and systemd runs).
fn systemd_runs(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> Result<(), Error> {
    let status = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .map_err(|e| Error::Install(format!("running systemctl {}: {e}", args.join(" "))))?;
    if !status.success() {
        return Err(Error::Install(format!("systemctl {} failed ({status})", args.join(" "))));
    }
    Ok(())
}

/// Installs the agent under `root`: its folders, configuration (an existing one is kept),
/// enrollment token and systemd unit; enables and starts the unit when systemd runs. Returns
/// what it did.
pub fn install(root: &Path, options: &InstallOptions) -> Result<Vec<Step>, Error> {
    if !crate::config::name_ok(&options.host) {
        return Err(Error::Install(format!(
            "--host {:?}: 1 to 64 letters, digits, '-', '_' or '.'",
            options.host
        )));
    }
    if !(options.coordinator.starts_with("http://") || options.coordinator.starts_with("https://"))
    {
        return Err(Error::Install(format!(
            "--coordinator {:?}: give its http:// or https:// URL",
            options.coordinator
        )));
    }
    if !options.executable.is_absolute() {
        return Err(Error::Install(format!(
            "the executable {:?} is not an absolute path",
            options.executable
        )));
    }
    if !root.is_dir() {
        return Err(Error::Install(format!("the root folder {} does not exist", root.display())));
    }
    let mut record = read_record(root)?.unwrap_or(Record { version: 1, changes: vec![] });
    let mut steps = Vec::new();
    let recorded = |record: &Record, rel: &str| record.changes.iter().any(|c| c.path == shown(rel));
    // Refused before anything is changed: a unit or token someone else wrote.
    for rel in [UNIT_PATH, ENROLL] {
        let path = under(root, rel);
        if std::fs::symlink_metadata(&path).is_ok() && !recorded(&record, rel) {
            return Err(Error::Install(format!(
                "{} exists and was not written by cairn-agent install: move it away first",
                path.display()
            )));
        }
    }
    for (rel, mode) in [("etc/cairn", 0o700), (STATE, 0o700), ("etc/systemd/system", 0o755)] {
        // Parents (etc, var/lib...) are the host's: only the folders made here are recorded.
        let mut missing = Vec::new();
        let mut at = Some(Path::new(rel));
        while let Some(p) = at.filter(|p| !p.as_os_str().is_empty()) {
            if root.join(p).exists() {
                break;
            }
            missing.push(p.to_owned());
            at = p.parent();
        }
        for p in missing.iter().rev() {
            let leaf = p == Path::new(rel);
            let made = root.join(p);
            std::fs::DirBuilder::new().create(&made).map_err(Error::io("creating", &made))?;
            // Explicit, whatever the umask: parents as a host has them, the leaf as asked.
            std::fs::set_permissions(
                &made,
                Permissions::from_mode(if leaf { mode } else { 0o755 }),
            )
            .map_err(Error::io("setting the mode of", &made))?;
            let rel = p.to_string_lossy().into_owned();
            record.changes.push(Change { kind: "dir".into(), path: shown(&rel), sha256: None });
            steps.push(step("created", &shown(&rel), None));
        }
        if missing.is_empty() {
            let note =
                if recorded(&record, rel) { None } else { Some("the host's, left as it is") };
            steps.push(step("unchanged", &shown(rel), note));
        }
    }
    save_record(root, &record)?;
    let mut files: Vec<(&str, String, u32)> = vec![(CONFIG, config_text(options), 0o600)];
    if let Some(token) = &options.enroll_token {
        files.push((ENROLL, format!("{}\n", token.trim()), 0o600));
    }
    files.push((UNIT_PATH, unit_text(&options.executable), 0o644));
    for (rel, text, mode) in files {
        let path = under(root, rel);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {
                let mine = recorded(&record, rel);
                let same = std::fs::read(&path).map(|b| b == text.as_bytes()).unwrap_or(false);
                // A new enrollment token replaces the one install wrote (used or not).
                if rel == ENROLL && mine && !same {
                    write_recorded(root, &mut record, rel, &text, mode)?;
                    steps.push(step("replaced", &shown(rel), None));
                    continue;
                }
                let note = match (rel, same, mine) {
                    (_, true, _) => None,
                    (CONFIG, false, _) => Some("exists: your configuration is kept"),
                    (_, false, true) => Some("changed since install: kept"),
                    (_, false, false) => {
                        return Err(Error::Install(format!(
                            "{} exists and was not written by cairn-agent install: move it away first",
                            path.display()
                        )));
                    }
                };
                steps.push(step(if same { "unchanged" } else { "kept" }, &shown(rel), note));
            }
            Err(_) => {
                write_recorded(root, &mut record, rel, &text, mode)?;
                steps.push(step("created", &shown(rel), None));
            }
        }
    }
    if systemd_runs(root) {
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", "--now", UNIT])?;
        if !recorded(&record, UNIT) {
            record.changes.push(Change {
                kind: "unit-enabled".into(),
                path: UNIT.into(),
                sha256: None,
            });
            save_record(root, &record)?;
        }
        steps.push(step("enabled", UNIT, Some("started now and at every boot")));
    } else {
        steps.push(step(
            "unchanged",
            UNIT,
            Some("systemd does not manage this root: enable the unit when the host boots it"),
        ));
    }
    Ok(steps)
}

/// Reverts what `install` recorded under `root`, newest first: the unit disabled and stopped,
/// files removed unless changed since, the state folder (token, cached schedule) removed,
/// folders removed when empty. Without a record there is nothing to do.
pub fn uninstall(root: &Path) -> Result<Vec<Step>, Error> {
    let Some(record) = read_record(root)? else {
        return Ok(vec![step(
            "unchanged",
            &shown(RECORD),
            Some("nothing was installed here by cairn-agent"),
        )]);
    };
    let mut steps = Vec::new();
    for change in record.changes.iter().rev() {
        let rel = change.path.trim_start_matches('/');
        let path = under(root, rel);
        match change.kind.as_str() {
            "unit-enabled" => {
                if systemd_runs(root) {
                    systemctl(&["disable", "--now", UNIT])?;
                    steps.push(step("disabled", UNIT, None));
                }
            }
            "file" => match std::fs::read(&path) {
                Ok(bytes) if change.sha256.as_deref() == Some(&sha(&bytes)) => {
                    std::fs::remove_file(&path).map_err(Error::io("removing", &path))?;
                    steps.push(step("removed", &change.path, None));
                }
                Ok(_) => steps.push(step("kept", &change.path, Some("changed since install"))),
                Err(_) => steps.push(step("gone", &change.path, Some("already removed"))),
            },
            "dir" if rel == STATE => {
                // Only the worker's own files: the folder may hold others' (the fleecing
                // folder of live VMs, with the state a killed run left for its undo).
                let removed = crate::state::remove_own_files(&path);
                match std::fs::remove_dir(&path) {
                    Ok(()) => steps.push(step(
                        "removed",
                        &change.path,
                        Some("the agent's token and cache"),
                    )),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        steps.push(step("gone", &change.path, None))
                    }
                    Err(_) => {
                        let note = format!(
                            "{removed} file(s) of the agent's removed; it holds others (a fleecing folder?), kept"
                        );
                        steps.push(step("kept", &change.path, Some(&note)))
                    }
                }
            }
            "dir" => {
                if rel == "etc/cairn" {
                    let _ = std::fs::remove_file(under(root, RECORD));
                }
                match std::fs::remove_dir(&path) {
                    Ok(()) => steps.push(step("removed", &change.path, None)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        steps.push(step("gone", &change.path, None))
                    }
                    Err(_) => steps.push(step(
                        "kept",
                        &change.path,
                        Some("holds files not installed by cairn-agent"),
                    )),
                }
            }
            other => steps.push(step(
                "kept",
                &change.path,
                Some(&format!("unknown change kind {other}")),
            )),
        }
    }
    let _ = std::fs::remove_file(under(root, RECORD));
    if systemd_runs(root) {
        let _ = systemctl(&["daemon-reload"]);
    }
    Ok(steps)
}
