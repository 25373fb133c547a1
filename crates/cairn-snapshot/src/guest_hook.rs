//! The in-guest half of quiescing a VM that runs in QEMU: what the guest agent's fsfreeze
//! hook runs inside the guest (`cairn-guest-hook freeze|thaw`).
//!
//! It runs the same pre- and post-scripts, under the same `VMSnapshotScriptPluginConfig.json`
//! contract (modes, owners, timeouts, retries, `continueBackupOnFailure`), as the host-side
//! agent does for a VM it quiesces itself ([`crate::scripts`]). The guest agent calls the
//! hook with `freeze` before it freezes the guest's file systems and with `thaw` after it
//! thaws them; the hook leaves a [`HookReport`] of each phase in the guest's `/run`, which
//! the host reads back through the guest agent to learn what the scripts did.
//!
//! | phase | what happened | report | exit |
//! |---|---|---|---|
//! | freeze | no script configuration | no scripts | 0 |
//! | freeze | configuration unusable | its error | 0: the freeze goes on |
//! | freeze | pre-script succeeded | pre | 0 |
//! | freeze | pre-script failed, continue | pre | 0 |
//! | freeze | pre-script failed, do not continue | pre, and post run at once | 1 |
//! | thaw | a pre-script ran at the freeze | post | 0 |
//! | thaw | nothing ran at the freeze | nothing | 0 |
//!
//! The post-script runs whenever the pre-script ran, once: the freeze leaves a marker holding
//! the configuration it used, which the thaw consumes (so a configuration changed or removed
//! in between changes nothing), and a failed pre-script that stops the backup runs the
//! post-script itself. The thaw always exits 0, since the file systems are thawed by then and
//! the host must be able to tell. Stock hooks (Debian's `/etc/qemu/fsfreeze-hook`) ignore
//! their scripts' exit codes, so the host decides from the report, not from whether the
//! freeze succeeded. A hook installed twice runs once per phase: each report names the hook
//! script's process, and a second copy run by the same one does nothing.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::scripts::{ScriptRun, Scripts};
use crate::trusted::TrustedFile;

/// Where the hook looks for its script configuration unless told.
pub const DEFAULT_CONFIG: &str = "/etc/cairn/VMSnapshotScriptPluginConfig.json";
/// The folder of the reports and the marker in the guest (a root-only tmpfs on Linux).
pub const DEFAULT_RUN_DIR: &str = "/run";
/// The freeze phase's report, in the run folder.
pub const FREEZE_REPORT: &str = "cairn-hook-freeze.json";
/// The thaw phase's report, in the run folder.
pub const THAW_REPORT: &str = "cairn-hook-thaw.json";
/// Left by a freeze whose pre-script ran, consumed by the thaw that runs the post-script.
const PENDING: &str = "cairn-hook.pending";
/// The largest report the host reads.
pub const MAX_REPORT: usize = 64 * 1024;
/// The report format.
pub const REPORT_FORMAT: u32 = 1;
/// How much of a script's output goes into a report.
const MAX_OUTPUT: usize = 1024;

/// A phase of the guest agent's freeze.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Before the file systems are frozen: the pre-script.
    Freeze,
    /// After they are thawed: the post-script.
    Thaw,
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Phase, String> {
        match s {
            "freeze" => Ok(Phase::Freeze),
            "thaw" => Ok(Phase::Thaw),
            other => Err(format!("{other:?}: give freeze or thaw")),
        }
    }
}

/// What one phase of the hook did, as the host reads it back. Fields a later hook adds are
/// ignored (a change older hosts cannot read bumps [`REPORT_FORMAT`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    /// [`REPORT_FORMAT`].
    pub cairn_hook: u32,
    /// Which phase wrote it.
    pub phase: Phase,
    /// When it was written (Unix nanoseconds) and by which process: a new report never has
    /// the bytes of an old one.
    #[serde(default)]
    pub written: String,
    /// The process that ran the hook (the guest agent's hook script): a second installation of
    /// the hook, run by the same script in the same phase, does nothing.
    #[serde(default)]
    pub parent: u32,
    /// The script configuration used; absent when there is none.
    #[serde(default)]
    pub config: Option<String>,
    /// Its `continueBackupOnFailure`.
    #[serde(default)]
    pub continue_on_failure: bool,
    /// Its `fsFreezeEnabled` (a guest agent freezes anyway: the host says so).
    #[serde(default)]
    pub fs_freeze: bool,
    /// The pre-script, when this phase ran it.
    #[serde(default)]
    pub pre: Option<ScriptReport>,
    /// The post-script, when this phase ran it.
    #[serde(default)]
    pub post: Option<ScriptReport>,
    /// Why the scripts could not run (an unusable configuration).
    #[serde(default)]
    pub error: Option<String>,
}

/// One script's run, as reported from the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptReport {
    /// The script's path in the guest.
    pub path: String,
    /// Whether its last attempt exited 0.
    pub succeeded: bool,
    /// How its last attempt ended (exit code, signal, timeout).
    pub outcome: String,
    /// How many attempts it took.
    pub attempts: u32,
    /// How long all attempts took.
    pub duration_ms: u64,
    /// The end of its output.
    #[serde(default)]
    pub output: String,
}

impl ScriptReport {
    fn of(run: &ScriptRun) -> ScriptReport {
        let output = match run.output_tail.char_indices().rev().nth(MAX_OUTPUT - 1) {
            Some((at, _)) => run.output_tail[at..].to_owned(),
            None => run.output_tail.clone(),
        };
        ScriptReport {
            path: run.path.display().to_string(),
            succeeded: run.succeeded(),
            outcome: run.outcome(),
            attempts: run.attempts.len() as u32,
            duration_ms: run.attempts.iter().map(|a| a.duration.as_millis() as u64).sum(),
            output,
        }
    }
}

impl HookReport {
    fn new(phase: Phase) -> HookReport {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        HookReport {
            cairn_hook: REPORT_FORMAT,
            phase,
            written: format!("{nanos}-{}", std::process::id()),
            parent: parent(),
            config: None,
            continue_on_failure: false,
            fs_freeze: false,
            pre: None,
            post: None,
            error: None,
        }
    }

    /// Decodes a report read from a guest: at most [`MAX_REPORT`] bytes of JSON in the known
    /// format; every string in it is still the guest's and must be escaped before display.
    pub fn parse(bytes: &[u8]) -> Result<HookReport, String> {
        if bytes.len() > MAX_REPORT {
            return Err(format!("{} bytes, more than {MAX_REPORT}", bytes.len()));
        }
        let report: HookReport = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if report.cairn_hook != REPORT_FORMAT {
            return Err(format!(
                "report format {}, this agent reads {REPORT_FORMAT}",
                report.cairn_hook
            ));
        }
        Ok(report)
    }

    /// Whether this report asks the backup to stop: a script failed and the configuration's
    /// `continueBackupOnFailure` is false.
    pub fn stops_the_backup(&self) -> Option<&ScriptReport> {
        if self.continue_on_failure {
            return None;
        }
        self.pre.iter().chain(&self.post).find(|s| !s.succeeded)
    }
}

/// Runs one phase of the hook with the script configuration at `config` (absent: nothing to
/// run), keeping its report and marker in `run_dir`. Returns the report and the exit code
/// the hook should end with.
pub fn run_hook(phase: Phase, config: &Path, run_dir: &Path) -> (HookReport, i32) {
    let mut report = HookReport::new(phase);
    let pending = run_dir.join(PENDING);
    let name = match phase {
        Phase::Freeze => FREEZE_REPORT,
        Phase::Thaw => THAW_REPORT,
    };
    let report_path = run_dir.join(name);
    if ran_already(&report_path, phase) {
        // The hook is installed twice and this phase's other copy ran: once is enough.
        eprintln!("cairn-guest-hook: {phase:?} ran already in this hook run; nothing done");
        return (report, 0);
    }
    let code = match phase {
        Phase::Freeze => {
            let _ = std::fs::remove_file(&pending);
            freeze(config, &pending, &mut report)
        }
        Phase::Thaw => {
            thaw(&pending, &mut report);
            0
        }
    };
    if let Err(e) = write_report(&report_path, &report) {
        eprintln!("cairn-guest-hook: cannot write {}: {e}", report_path.display());
    }
    (report, code)
}

/// The process that runs this hook (qemu-ga's hook script; the test itself in tests).
fn parent() -> u32 {
    rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs())
}

/// Whether this phase's report was written by another copy of the hook under the same hook
/// script, within the last hour (a later hook run has another process).
fn ran_already(report: &Path, phase: Phase) -> bool {
    let Ok(bytes) = std::fs::read(report) else { return false };
    let Ok(earlier) = HookReport::parse(&bytes) else { return false };
    let recent = std::fs::metadata(report)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < std::time::Duration::from_secs(3600));
    earlier.phase == phase && earlier.parent == parent() && earlier.parent != 0 && recent
}

fn freeze(config: &Path, pending: &Path, report: &mut HookReport) -> i32 {
    let Some((scripts, text)) = load(config, report) else {
        return 0;
    };
    let pre = scripts.run_pre();
    report.pre = Some(ScriptReport::of(&pre));
    if !pre.succeeded() && !scripts.config().continue_on_failure {
        report.post = Some(ScriptReport::of(&scripts.run_post()));
        return 1;
    }
    // The thaw runs the post-script of the configuration the freeze used, whatever happens
    // to the file meanwhile: the marker keeps it (root's, in a root-only folder).
    let marker = Marker { config: config.display().to_string(), text };
    if let Err(e) = write_private(pending, &marker) {
        // Without the marker the thaw would not run the post-script: run it now rather than
        // leave the applications quiesced.
        report.error = Some(format!("cannot leave the marker {}: {e}", pending.display()));
        report.post = Some(ScriptReport::of(&scripts.run_post()));
    }
    0
}

/// What a freeze leaves for its thaw.
#[derive(Serialize, Deserialize)]
struct Marker {
    config: String,
    text: String,
}

/// The post-script is owed only when a freeze left a marker; it is taken away first, so the
/// post-script runs once.
fn thaw(pending: &Path, report: &mut HookReport) {
    let marker = match TrustedFile::open(pending, 0o600).and_then(|f| f.read_to_string()) {
        Ok(text) => text,
        Err(_) if !pending.exists() => return,
        Err(e) => {
            report.error = Some(format!("the freeze's marker is unusable: {e}"));
            let _ = std::fs::remove_file(pending);
            return;
        }
    };
    let _ = std::fs::remove_file(pending);
    let marker: Marker = match serde_json::from_str(&marker) {
        Ok(m) => m,
        Err(e) => {
            report.error = Some(format!("the freeze's marker is unreadable: {e}"));
            return;
        }
    };
    report.config = Some(marker.config.clone());
    match Scripts::from_text(&marker.text, &marker.config) {
        Ok(scripts) => {
            report.continue_on_failure = scripts.config().continue_on_failure;
            report.fs_freeze = scripts.config().fs_freeze;
            report.post = Some(ScriptReport::of(&scripts.run_post()));
        }
        Err(e) => report.error = Some(e.to_string()),
    }
}

/// Loads the configuration into `report`, with its text; `None` when there is none or it is
/// unusable.
fn load(config: &Path, report: &mut HookReport) -> Option<(Scripts, String)> {
    if std::fs::symlink_metadata(config).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return None;
    }
    report.config = Some(config.display().to_string());
    let loaded = TrustedFile::open(config, 0o600)
        .and_then(|f| f.read_to_string())
        .and_then(|text| Ok((Scripts::from_text(&text, &config.display().to_string())?, text)));
    match loaded {
        Ok((scripts, text)) => {
            report.continue_on_failure = scripts.config().continue_on_failure;
            report.fs_freeze = scripts.config().fs_freeze;
            Some((scripts, text))
        }
        Err(e) => {
            report.error = Some(e.to_string());
            None
        }
    }
}

/// Writes the report whole or not at all (a temporary file renamed over it), mode 600.
fn write_report(path: &Path, report: &HookReport) -> Result<(), Error> {
    write_private(path, report)
}

/// Writes `value` as JSON to `path` whole or not at all, mode 600: a temporary file in the
/// same folder, renamed over the name (which replaces a link there, never follows it).
fn write_private(path: &Path, value: &impl Serialize) -> Result<(), Error> {
    let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let io = |e| Error::io(format!("writing {}", path.display()), e);
    let mut file = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
    let text = serde_json::to_vec(value)
        .map_err(|e| Error::io("encoding for the hook", std::io::Error::other(e)))?;
    file.write_all(&text).map_err(io)?;
    file.as_file().sync_all().map_err(io)?;
    file.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = HookReport::parse(&bytes);
        }

        #[test]
        fn reports_round_trip(ok in proptest::bool::ANY, cont in proptest::bool::ANY, out in ".{0,50}") {
            let mut r = HookReport::new(Phase::Freeze);
            r.continue_on_failure = cont;
            r.pre = Some(ScriptReport { path: "/p".into(), succeeded: ok, outcome: "exit code 0".into(), attempts: 1, duration_ms: 3, output: out });
            let back = HookReport::parse(&serde_json::to_vec(&r).unwrap()).unwrap();
            proptest::prop_assert_eq!(back.stops_the_backup().is_some(), !ok && !cont);
            proptest::prop_assert_eq!(back, r);
        }
    }

    #[test]
    fn other_formats_and_oversized_reports_are_refused() {
        let r = HookReport::new(Phase::Thaw);
        let mut text = serde_json::to_value(&r).unwrap();
        text["cairn_hook"] = 2.into();
        assert!(HookReport::parse(text.to_string().as_bytes()).unwrap_err().contains("format 2"));
        let big = vec![b' '; MAX_REPORT + 1];
        assert!(HookReport::parse(&big).unwrap_err().contains("more than"));
        // A field a later hook adds is ignored.
        assert!(HookReport::parse(b"{\"cairn_hook\":1,\"phase\":\"freeze\",\"x\":1}").is_ok());
    }
}
