//! Pre- and post-scripts, configured like Azure's `VMSnapshotScriptPluginConfig.json`.
//!
//! The pre-script brings an application to a consistent point and holds it there; the
//! post-script lets it go. They run as the agent's user (root), so the configuration and
//! the scripts must be writable by that user alone: the config mode 600 and the scripts
//! mode 700, both owned by the user the agent runs as, in folders nobody else may write to
//! up to `/`. Anything else is refused with the exact `chmod`/`chown` that fixes it. A script
//! is checked when the configuration is loaded and run from the descriptor that was checked
//! (`/proc/self/fd/N`, which is then also its `$0`): replacing the file afterwards changes
//! nothing.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_format::Evidence;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Error;
use crate::trusted::TrustedFile;

/// The longest script timeout accepted, as in Azure.
pub const MAX_TIMEOUT_SECONDS: u32 = 1800;
/// The most retries accepted for either script.
pub const MAX_RETRIES: u32 = 10;
/// How much of a script's output is kept in the evidence.
const OUTPUT_TAIL: u64 = 1024;

/// The script configuration, field for field as Azure names them.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScriptConfig {
    /// Informational (Azure uses `ScriptRunner`).
    #[serde(rename = "pluginName", default)]
    pub plugin_name: String,
    /// The pre-script: an absolute path.
    #[serde(rename = "preScriptLocation")]
    pub pre_script: PathBuf,
    /// The post-script: an absolute path.
    #[serde(rename = "postScriptLocation")]
    pub post_script: PathBuf,
    /// Arguments of the pre-script (empty strings, as in Azure's template, are dropped).
    #[serde(rename = "preScriptParams", default)]
    pub pre_params: Vec<String>,
    /// Arguments of the post-script.
    #[serde(rename = "postScriptParams", default)]
    pub post_params: Vec<String>,
    /// Further attempts after a failed pre-script.
    #[serde(rename = "preScriptNoOfRetries", default)]
    pub pre_retries: u32,
    /// Further attempts after a failed post-script.
    #[serde(rename = "postScriptNoOfRetries", default)]
    pub post_retries: u32,
    /// Each attempt's time limit, at most 1800.
    #[serde(rename = "timeoutInSeconds", default = "default_timeout")]
    pub timeout_seconds: u32,
    /// On a failed script: true falls back to file-system consistency, false fails the job.
    #[serde(rename = "continueBackupOnFailure", default = "yes")]
    pub continue_on_failure: bool,
    /// Freeze the file systems as well as running the scripts.
    #[serde(rename = "fsFreezeEnabled", default = "yes")]
    pub fs_freeze: bool,
    /// How often a running script is reported in the log (the agent checks for its exit
    /// every 10 ms whatever this says, so it only paces the "still running" messages).
    #[serde(rename = "ScriptsExecutionPollTimeSeconds", default = "default_poll")]
    pub poll_seconds: u32,
}

fn default_timeout() -> u32 {
    30
}
fn default_poll() -> u32 {
    2
}
fn yes() -> bool {
    true
}

/// A script configuration loaded and checked, with its two scripts open: what runs is the
/// file that was checked (see [`crate::trusted`]).
#[derive(Clone, Debug)]
pub struct Scripts {
    config: ScriptConfig,
    pre: Arc<TrustedFile>,
    post: Arc<TrustedFile>,
}

impl Scripts {
    /// Reads and checks the configuration at `path` and opens and checks the scripts it names:
    /// the configuration mode 600 and the scripts 700, all owned by the user the agent runs as
    /// (root for a real agent), in folders nobody else may write to, up to `/`.
    pub fn load(path: &Path) -> Result<Scripts, Error> {
        let text = TrustedFile::open(path, 0o600)?.read_to_string()?;
        Scripts::from_text(&text, &path.display().to_string())
    }

    /// Parses a configuration already read from a trusted file (`name` names it in errors),
    /// and opens and checks the scripts it names.
    pub fn from_text(text: &str, name: &str) -> Result<Scripts, Error> {
        let config = ScriptConfig::parse(text, name)?;
        let pre = Arc::new(TrustedFile::open(&config.pre_script, 0o700)?);
        let post = Arc::new(TrustedFile::open(&config.post_script, 0o700)?);
        Ok(Scripts { config, pre, post })
    }

    /// The configuration.
    pub fn config(&self) -> &ScriptConfig {
        &self.config
    }

    /// Runs the pre-script with its timeout and retries.
    pub fn run_pre(&self) -> ScriptRun {
        let c = &self.config;
        run("pre", &self.pre, &c.pre_params, c.pre_retries, c)
    }

    /// Runs the post-script with its timeout and retries.
    pub fn run_post(&self) -> ScriptRun {
        let c = &self.config;
        run("post", &self.post, &c.post_params, c.post_retries, c)
    }
}

impl ScriptConfig {
    /// Parses and validates the JSON (no file checks); `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ScriptConfig, Error> {
        let config: ScriptConfig = serde_json::from_str(text).map_err(|e| {
            // serde_json names unknown and missing fields in its message.
            Error::config(
                file,
                crate::error::field_in(&e.to_string()).unwrap_or_else(|| "(file)".into()),
                e.to_string(),
            )
        })?;
        let bad = |field: &str, message: String| Err(Error::config(file, field, message));
        if config.timeout_seconds == 0 || config.timeout_seconds > MAX_TIMEOUT_SECONDS {
            return bad(
                "timeoutInSeconds",
                format!(
                    "{} is out of range: give 1 to {MAX_TIMEOUT_SECONDS}",
                    config.timeout_seconds
                ),
            );
        }
        for (field, retries) in [
            ("preScriptNoOfRetries", config.pre_retries),
            ("postScriptNoOfRetries", config.post_retries),
        ] {
            if retries > MAX_RETRIES {
                return bad(field, format!("{retries} retries: give at most {MAX_RETRIES}"));
            }
        }
        if config.poll_seconds == 0 {
            return bad("ScriptsExecutionPollTimeSeconds", "must be at least 1".into());
        }
        for (field, p) in
            [("preScriptLocation", &config.pre_script), ("postScriptLocation", &config.post_script)]
        {
            if !p.is_absolute() {
                return bad(field, format!("{} is not an absolute path", p.display()));
            }
        }
        Ok(config)
    }
}

/// How one attempt of a script ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signalled(i32),
    /// It ran past its timeout and was killed (with its process group).
    TimedOut,
    /// It could not be started.
    NotStarted(String),
}

impl Outcome {
    /// True for exit code 0.
    pub fn succeeded(&self) -> bool {
        *self == Outcome::Exited(0)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(code) => write!(f, "exit code {code}"),
            Outcome::Signalled(sig) => write!(f, "killed by signal {sig}"),
            Outcome::TimedOut => write!(f, "timed out"),
            Outcome::NotStarted(e) => write!(f, "could not start: {e}"),
        }
    }
}

/// One attempt.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// How it ended.
    pub outcome: Outcome,
    /// How long it ran.
    pub duration: Duration,
}

/// All attempts of one script.
#[derive(Clone, Debug)]
pub struct ScriptRun {
    /// `pre` or `post`.
    pub script: &'static str,
    /// The script.
    pub path: PathBuf,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// The end of the last attempt's output.
    pub output_tail: String,
}

impl ScriptRun {
    /// True when the last attempt succeeded.
    pub fn succeeded(&self) -> bool {
        self.attempts.last().is_some_and(|a| a.outcome.succeeded())
    }

    /// How the last attempt ended.
    pub fn outcome(&self) -> String {
        let last = self.attempts.last().map(|a| a.outcome.to_string()).unwrap_or_default();
        match self.attempts.len() {
            1 => last,
            n => format!("{last} (after {n} attempts)"),
        }
    }

    /// The evidence of this run: attempts with exit codes and durations, and output.
    pub fn evidence(&self) -> Evidence {
        let verdict = if self.succeeded() { "succeeded" } else { "failed" };
        let mut ev = Evidence::new(
            "script",
            None,
            format!("{}-script {} {verdict}: {}", self.script, self.path.display(), self.outcome()),
        );
        let attempts: Vec<Value> = self
            .attempts
            .iter()
            .map(|a| {
                let (code, signal) = match a.outcome {
                    Outcome::Exited(c) => (Some(c), None),
                    Outcome::Signalled(s) => (None, Some(s)),
                    _ => (None, None),
                };
                json!({
                    "exit_code": code,
                    "signal": signal,
                    "timed_out": a.outcome == Outcome::TimedOut,
                    "duration_ms": a.duration.as_millis() as u64,
                })
            })
            .collect();
        ev.details.insert("script".into(), json!(self.script));
        ev.details.insert("path".into(), json!(self.path));
        ev.details.insert("succeeded".into(), json!(self.succeeded()));
        ev.details.insert("attempts".into(), Value::Array(attempts));
        if !self.output_tail.is_empty() {
            ev.details.insert("output".into(), json!(self.output_tail));
        }
        ev
    }
}

fn run(
    kind: &'static str,
    script: &TrustedFile,
    params: &[String],
    retries: u32,
    config: &ScriptConfig,
) -> ScriptRun {
    let path = script.path();
    let timeout = Duration::from_secs(u64::from(config.timeout_seconds));
    let poll = Duration::from_secs(u64::from(config.poll_seconds));
    let params: Vec<&String> = params.iter().filter(|p| !p.is_empty()).collect();
    let mut run = ScriptRun {
        script: kind,
        path: path.into(),
        attempts: Vec::new(),
        output_tail: String::new(),
    };
    for attempt in 0..=retries {
        let (outcome, duration, tail) = run_once(script, &params, timeout, poll);
        tracing::info!(script = kind, path = %path.display(), attempt = attempt + 1, %outcome, "script finished");
        let ok = outcome.succeeded();
        run.attempts.push(Attempt { outcome, duration });
        run.output_tail = tail;
        if ok {
            break;
        }
    }
    run
}

fn run_once(
    script: &TrustedFile,
    params: &[&String],
    timeout: Duration,
    poll: Duration,
) -> (Outcome, Duration, String) {
    let path = script.path();
    let started = Instant::now();
    let output = match tempfile::tempfile() {
        Ok(f) => f,
        Err(e) => {
            return (
                Outcome::NotStarted(format!("no temporary file for its output: {e}")),
                started.elapsed(),
                String::new(),
            );
        }
    };
    let stdout = output.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null());
    let stderr = output.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null());
    // The very file that was checked, through its descriptor (kept open across the exec so
    // that a script's interpreter can open it too); argv[0] is its path, for messages.
    let mut command = Command::new(format!("/proc/self/fd/{}", script.raw_fd()));
    crate::sys::keep_open_across_exec(&mut command, script.raw_fd());
    let child = command
        .arg0(path)
        .args(params)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        // Its own process group, so a timeout kills whatever it started too.
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (Outcome::NotStarted(e.to_string()), started.elapsed(), String::new()),
    };
    let mut next_report = poll;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                break match (status.code(), status.signal()) {
                    (Some(code), _) => Outcome::Exited(code),
                    (None, Some(sig)) => Outcome::Signalled(sig),
                    _ => Outcome::Exited(-1),
                };
            }
            Ok(None) => {}
            Err(e) => {
                kill_group(&mut child);
                break Outcome::NotStarted(format!("lost track of it: {e}"));
            }
        }
        let elapsed = started.elapsed();
        if elapsed >= timeout {
            kill_group(&mut child);
            break Outcome::TimedOut;
        }
        if elapsed >= next_report {
            tracing::info!(script = %path.display(), seconds = elapsed.as_secs(), "script still running");
            next_report += poll;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (outcome, started.elapsed(), tail_of(output))
}

/// Kills a script and everything it started (its own process group), and reaps it.
fn kill_group(child: &mut std::process::Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tail_of(mut file: File) -> String {
    let len = file.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_text_parses_within_limits_or_names_a_field(text in ".{0,200}") {
            match ScriptConfig::parse(&text, "x.json") {
                Ok(c) => proptest::prop_assert!(c.timeout_seconds <= MAX_TIMEOUT_SECONDS),
                Err(Error::Config { field, .. }) => proptest::prop_assert!(!field.is_empty()),
                Err(other) => proptest::prop_assert!(false, "{other}"),
            }
        }

        #[test]
        fn numbers_out_of_range_are_refused(timeout in 0u32..5000, retries in 0u32..50) {
            let text = format!(
                r#"{{"preScriptLocation":"/a","postScriptLocation":"/b","timeoutInSeconds":{timeout},"preScriptNoOfRetries":{retries}}}"#
            );
            let ok = (1..=MAX_TIMEOUT_SECONDS).contains(&timeout) && retries <= MAX_RETRIES;
            proptest::prop_assert_eq!(ScriptConfig::parse(&text, "x.json").is_ok(), ok);
        }
    }
}
