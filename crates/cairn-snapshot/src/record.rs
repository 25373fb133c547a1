//! What a capture reached and why: the consistency level and the evidence behind it.

use std::time::Duration;

use cairn_format::{Consistency, Evidence, Name};
use serde_json::Value;

/// The running account of one capture. Every step that could lower the consistency level
/// does it here, with a reason, so the recovery point can say why it is what it is.
#[derive(Clone, Debug)]
pub struct Record {
    level: Consistency,
    evidence: Vec<Evidence>,
}

impl Record {
    /// A record that starts at `level` (what the quiescer reached).
    pub fn new(level: Consistency) -> Record {
        Record { level, evidence: Vec::new() }
    }

    /// The level reached so far.
    pub fn level(&self) -> Consistency {
        self.level
    }

    /// Sets the level aimed at, silently: a later [`Record::fall_back`] says why it was not
    /// reached.
    pub fn aim(&mut self, level: Consistency) {
        self.level = level;
    }

    /// Sets the level a quiescer reached, with the evidence of how.
    pub fn reached(&mut self, level: Consistency, message: impl Into<String>) {
        self.level = level;
        self.note(Evidence::new("consistency", None, message));
    }

    /// Lowers the level to `to` (never raises it), with a `fallback` evidence saying why, and a
    /// warning: something fell short.
    pub fn fall_back(&mut self, to: Consistency, message: impl Into<String>) {
        self.lower(to, message.into(), true);
    }

    /// Lowers the level to `to` as [`Record::fall_back`] does, without a warning: for a level
    /// the configuration asked for (disks read live on purpose).
    pub fn settle(&mut self, to: Consistency, message: impl Into<String>) {
        self.lower(to, message.into(), false);
    }

    fn lower(&mut self, to: Consistency, message: String, warn: bool) {
        if to < self.level {
            if warn {
                tracing::warn!(from = self.level.as_str(), to = to.as_str(), "{message}");
            } else {
                tracing::info!(from = self.level.as_str(), to = to.as_str(), "{message}");
            }
            let mut ev = Evidence::new("fallback", None, message);
            ev.details.insert("from".into(), Value::from(self.level.as_str()));
            ev.details.insert("to".into(), Value::from(to.as_str()));
            self.level = to;
            self.evidence.push(ev);
        } else {
            self.note(Evidence::new("warning", None, message));
        }
    }

    /// Adds a fact.
    pub fn note(&mut self, evidence: Evidence) {
        self.evidence.push(evidence);
    }

    /// Adds a fact about one disk.
    pub fn note_disk(&mut self, kind: &str, disk: &Name, message: impl Into<String>) {
        self.evidence.push(Evidence::new(kind, Some(disk), message));
    }

    /// Records how long the file systems were frozen (from the first FIFREEZE call to the
    /// last FITHAW), and how much of that the FIFREEZE calls took (they flush dirty data).
    pub fn froze_for(&mut self, mounts: usize, duration: Duration, freeze_calls: Duration) {
        let ms = duration.as_secs_f64() * 1000.0;
        let calls_ms = freeze_calls.as_secs_f64() * 1000.0;
        let mut ev = Evidence::new(
            "freeze",
            None,
            format!("{mounts} file system(s) frozen for {ms:.1} ms (freeze call to thaw)"),
        );
        ev.details.insert("freeze_ms".into(), Value::from((ms * 1000.0).round() / 1000.0));
        ev.details
            .insert("freeze_calls_ms".into(), Value::from((calls_ms * 1000.0).round() / 1000.0));
        ev.details.insert("mounts".into(), Value::from(mounts));
        self.evidence.push(ev);
    }

    /// The evidence so far.
    pub fn evidence(&self) -> &[Evidence] {
        &self.evidence
    }

    /// Splits into level and evidence.
    pub fn into_parts(self) -> (Consistency, Vec<Evidence>) {
        (self.level, self.evidence)
    }
}
