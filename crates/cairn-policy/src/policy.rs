//! A backup policy: a schedule, a retention, how long the quick-restore snapshot tier is kept,
//! the consistency wanted, and the deadline of the transfer to the vault. Written in TOML:
//!
//! ```toml
//! name = "daily-30"
//! consistency = "application"     # wanted; a point below it raises an alert (it is kept)
//! instant-restore-days = 2        # the snapshot tier is kept this long (0: none)
//! transfer-deadline-hours = 24    # the transfer to the vault must end within this
//!
//! [schedule]
//! kind = "daily"
//! times = ["02:00"]
//! time-zone = "Europe/Amsterdam"
//! jitter-minutes = 60
//!
//! [retention]
//! keep-daily = 30
//! keep-weekly = 12
//! time-zone = "Europe/Amsterdam"
//! ```
//!
//! Every error names its field, as written in the file.

use jiff::SignedDuration;
use serde::{Deserialize, Serialize};

use crate::schedule::{Schedule, ScheduleSpec};
use crate::{Error, Retention};

/// The longest instant-restore retention accepted, in days (Azure's enhanced policy: 30).
pub const MAX_INSTANT_RESTORE_DAYS: u32 = 30;

/// The consistency a policy wants of its points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wanted {
    /// Disks at one instant, nothing quiesced.
    Crash,
    /// File systems frozen.
    FileSystem,
    /// Applications quiesced by scripts or VSS writers (the default).
    #[default]
    Application,
}

impl Wanted {
    /// The level's name as points record it (`file_system`).
    pub fn as_point_level(self) -> &'static str {
        match self {
            Wanted::Crash => "crash",
            Wanted::FileSystem => "file_system",
            Wanted::Application => "application",
        }
    }
}

/// A policy as written in its file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicySpec {
    /// Its name: letters, digits, `-`, `_` and `.`, at most 64.
    pub name: String,
    /// When backups start.
    pub schedule: ScheduleSpec,
    /// Which points are kept.
    pub retention: Retention,
    /// How many days a point's local snapshot is kept for quick restores (default 0).
    #[serde(default)]
    pub instant_restore_days: u32,
    /// The consistency wanted (default application).
    #[serde(default)]
    pub consistency: Wanted,
    /// How long after its scheduled time a backup's transfer to the vault may end; default 24
    /// hours, or the interval of an hourly schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_deadline_hours: Option<u32>,
}

/// A checked policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The policy as written.
    pub spec: PolicySpec,
    /// Its schedule.
    pub schedule: Schedule,
    /// How long a point's snapshot tier is kept.
    pub instant_restore: SignedDuration,
    /// How long a transfer may take after the scheduled time.
    pub transfer_deadline: SignedDuration,
}

impl PolicySpec {
    /// Reads a policy file's TOML; the error names the field and its line.
    pub fn parse(text: &str) -> Result<PolicySpec, Error> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().to_owned();
            let start = e.span().map(|s| s.start);
            let line = start.map(|s| text.get(..s).unwrap_or("").lines().count().max(1));
            let named =
                message.starts_with("unknown field") || message.starts_with("missing field");
            let field = match (named, start) {
                (true, _) | (false, None) => quoted_field(&message),
                (false, Some(at)) => key_at(text, at),
            };
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            Error::Field {
                field: field.unwrap_or_else(|| "(file)".into()),
                message: format!("{message}{at}"),
            }
        })
    }

    /// Checks every field; the error names the first bad one.
    pub fn check(&self) -> Result<Policy, Error> {
        let bad = |field: &str, message: String| Error::Field { field: field.into(), message };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !self.name.starts_with('.');
        if !name_ok {
            return Err(bad(
                "name",
                format!(
                    "{:?}: give 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                    self.name
                ),
            ));
        }
        let schedule = self.schedule.check()?;
        self.retention.check().map_err(|e| bad("retention", e.to_string()))?;
        if self.instant_restore_days > MAX_INSTANT_RESTORE_DAYS {
            return Err(bad(
                "instant-restore-days",
                format!(
                    "{} is out of range: give 0 to {MAX_INSTANT_RESTORE_DAYS}",
                    self.instant_restore_days
                ),
            ));
        }
        let default_deadline = match self.schedule.every_hours {
            Some(h) if self.schedule.kind == "hourly" => h,
            _ => 24,
        };
        let hours = self.transfer_deadline_hours.map_or(default_deadline, i64::from);
        if !(1..=24 * 7).contains(&hours) {
            return Err(bad(
                "transfer-deadline-hours",
                format!("{hours} is out of range: give 1 to 168"),
            ));
        }
        Ok(Policy {
            spec: self.clone(),
            schedule,
            instant_restore: SignedDuration::from_hours(24 * i64::from(self.instant_restore_days)),
            transfer_deadline: SignedDuration::from_hours(hours),
        })
    }
}

impl Policy {
    /// Reads and checks a policy file's TOML.
    pub fn parse(text: &str) -> Result<Policy, Error> {
        PolicySpec::parse(text)?.check()
    }
}

/// The key whose value starts at byte `at`, with its table (`schedule.times`).
fn key_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let key = text.get(line_start..)?.split('=').next()?.trim();
    if key.is_empty() || key.contains(['[', '"', '\n']) {
        return None;
    }
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(['[', ']']).trim().to_owned());
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

/// The field a TOML error names (`unknown field `x``, `missing field `x``).
fn quoted_field(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message.get(start..)?.find('`')?;
    message.get(start..start + len).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "daily-30"
instant-restore-days = 2
[schedule]
kind = "daily"
times = ["02:00"]
time-zone = "Europe/Amsterdam"
[retention]
keep-daily = 30
"#;

    #[test]
    fn a_policy_parses_with_its_defaults() {
        let p = Policy::parse(GOOD).unwrap();
        assert_eq!(p.spec.consistency, Wanted::Application);
        assert_eq!(p.instant_restore, SignedDuration::from_hours(48));
        assert_eq!(p.transfer_deadline, SignedDuration::from_hours(24));
        let hourly = GOOD
            .replace("kind = \"daily\"\ntimes = [\"02:00\"]", "kind = \"hourly\"\nevery-hours = 6");
        assert_eq!(
            Policy::parse(&hourly).unwrap().transfer_deadline,
            SignedDuration::from_hours(6)
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (GOOD.replace("name = \"daily-30\"", "name = \"../x\""), "name"),
            (GOOD.replace("name = \"daily-30\"\n", ""), "name"),
            (
                GOOD.replace("instant-restore-days = 2", "instant-restore-days = 31"),
                "instant-restore-days",
            ),
            (
                GOOD.replace("instant-restore-days = 2", "instant-restore-days = -1"),
                "instant-restore-days",
            ),
            (
                GOOD.replace("instant-restore-days = 2", "transfer-deadline-hours = 0"),
                "transfer-deadline-hours",
            ),
            (GOOD.replace("instant-restore-days = 2", "consistency = \"best\""), "consistency"),
            (GOOD.replace("kind = \"daily\"", "kind = 3"), "schedule.kind"),
            (GOOD.replace("instant-restore-days = 2", "colour = 1"), "colour"),
            (GOOD.replace("keep-daily = 30", "keep-dayly = 30"), "keep-dayly"),
            (GOOD.replace("keep-daily = 30", ""), "retention"),
            (GOOD.replace("times = [\"02:00\"]", "times = [\"2am\"]"), "schedule.times[0]"),
        ];
        for (text, want) in cases {
            match Policy::parse(&text) {
                Err(Error::Field { field, message }) => {
                    assert_eq!(field, want, "{message}\n{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
