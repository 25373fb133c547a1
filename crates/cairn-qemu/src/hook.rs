//! What the guest's Cairn fsfreeze hook reported, read back through the guest agent.
//!
//! The in-guest half ([`cairn_snapshot::guest_hook`], run by the guest agent's fsfreeze hook)
//! leaves one report per phase in the guest's `/run`. The host reads both before the freeze
//! and after the thaw: a report that changed is this freeze's. A report is the
//! guest's word: it is size-capped and decoded strictly, and every string from it is escaped
//! and cut before it reaches a log, an error or a point's evidence. A guest can lie in it only
//! about its own applications, which it could stop quiescing anyway.

use cairn_format::Evidence;
use cairn_snapshot::guest_hook::{
    DEFAULT_RUN_DIR, FREEZE_REPORT, HookReport, MAX_REPORT, Phase, ScriptReport, THAW_REPORT,
};
use serde_json::json;

use crate::agent::GuestAgent;
use crate::wire::printable;

/// The report's path in the guest.
fn path(phase: Phase) -> String {
    let name = match phase {
        Phase::Freeze => FREEZE_REPORT,
        Phase::Thaw => THAW_REPORT,
    };
    format!("{DEFAULT_RUN_DIR}/{name}")
}

/// The reports as they were before this freeze: one still the same afterwards is an earlier
/// freeze's (each report carries the time and process that wrote it, so a new one differs).
/// The host only reads: it writes nothing into the guest.
pub(crate) struct Earlier {
    freeze: Vec<u8>,
    thaw: Vec<u8>,
}

/// Reads the reports before the freeze; an error means they cannot be read at all (the guest
/// agent forbids `guest-file-*`, as RHEL's does by default).
pub(crate) fn earlier(agent: &mut GuestAgent) -> Result<Earlier, crate::Error> {
    Ok(Earlier { freeze: fetch(agent, Phase::Freeze)?, thaw: fetch(agent, Phase::Thaw)? })
}

/// A report's bytes; empty when the guest has none.
fn fetch(agent: &mut GuestAgent, phase: Phase) -> Result<Vec<u8>, crate::Error> {
    match agent.read_file(&path(phase), MAX_REPORT) {
        // No such file: no report (yet). A forbidden command is an error.
        Err(crate::Error::Command { class, desc, .. })
            if class != "CommandNotFound" && !desc.contains("disabled") =>
        {
            Ok(Vec::new())
        }
        other => other,
    }
}

/// The report of `phase` written by this freeze, `None` when the hook wrote none (no Cairn
/// hook in the guest).
pub(crate) fn read(
    agent: &mut GuestAgent,
    phase: Phase,
    earlier: &Earlier,
) -> Result<Option<HookReport>, String> {
    let bytes = fetch(agent, phase).map_err(|e| e.to_string())?;
    let before = match phase {
        Phase::Freeze => &earlier.freeze,
        Phase::Thaw => &earlier.thaw,
    };
    if bytes == *before {
        return Ok(None);
    }
    match decode(&bytes)? {
        Some(report) if report.phase != phase => {
            Err(format!("the {phase:?} report says it is of phase {:?}", report.phase))
        }
        other => Ok(other),
    }
}

/// Decodes a report's bytes: empty is no report; anything else must be a valid report.
pub fn decode(bytes: &[u8]) -> Result<Option<HookReport>, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    HookReport::parse(bytes).map(Some).map_err(|e| printable(&e, 300))
}

/// A script's run in the guest, as evidence: every string escaped and cut.
pub fn script_evidence(which: &str, script: &ScriptReport) -> Evidence {
    let verdict = if script.succeeded { "succeeded" } else { "failed" };
    let path = printable(&script.path, 200);
    let mut ev = Evidence::new(
        "script",
        None,
        format!("the guest's {which}-script {path} {verdict}: {}", printable(&script.outcome, 100)),
    );
    ev.details.insert("script".into(), json!(which));
    ev.details.insert("in_guest".into(), json!(true));
    ev.details.insert("path".into(), json!(path));
    ev.details.insert("succeeded".into(), json!(script.succeeded));
    ev.details.insert("attempts".into(), json!(script.attempts));
    ev.details.insert("duration_ms".into(), json!(script.duration_ms));
    if !script.output.is_empty() {
        ev.details.insert("output".into(), json!(printable(&script.output, 1024)));
    }
    ev
}

/// Why a report stops the backup, as an error's words, when it does.
pub fn stop_reason(report: &HookReport) -> Option<String> {
    let script = report.stops_the_backup()?;
    let which = if report.pre.as_ref() == Some(script) { "pre" } else { "post" };
    Some(format!(
        "in the guest, the {which}-script {} failed ({}) and its configuration {} says continueBackupOnFailure=false: the backup stops",
        printable(&script.path, 200),
        printable(&script.outcome, 100),
        printable(report.config.as_deref().unwrap_or("?"), 200),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_reports_are_none_and_bad_ones_are_errors() {
        assert_eq!(decode(b""), Ok(None));
        assert_eq!(decode(b" \n"), Ok(None));
        assert!(decode(b"{").is_err());
        assert!(decode(b"{\"cairn_hook\":1}").is_err());
    }

    #[test]
    fn guest_strings_are_escaped_in_evidence() {
        let s = ScriptReport {
            path: "/x\u{1b}[31m".into(),
            succeeded: false,
            outcome: "exit code 3\n".into(),
            attempts: 2,
            duration_ms: 5,
            output: "a".repeat(5000),
        };
        let ev = script_evidence("pre", &s);
        assert!(!ev.message.contains('\u{1b}') && !ev.message.contains('\n'), "{}", ev.message);
        assert!(ev.details["output"].as_str().unwrap().chars().count() <= 1025);
    }
}
