//! Retention: which points of one VM to keep.
//!
//! Every rule is applied on its own to all the points, newest first, and a point is kept iff
//! at least one rule keeps it (restic's reading; Proxmox instead lets each rule see only what
//! earlier rules left, which keeps fewer points for the same counts). The calendar rules keep
//! the newest point of each of their N newest periods that have a point: an empty day does not
//! use up a `keep-daily` count.
//!
//! Periods are read in the policy's time zone: a day is a local calendar day (23 or 25 hours
//! long across a DST change), a week an ISO week (Monday to Sunday), an hour a local clock
//! hour with its UTC offset, so that the hour repeated when clocks go back counts as the two
//! hours it really is.

use std::fmt;
use std::str::FromStr;

use jiff::tz::{TimeZone, TimeZoneDatabase};
use jiff::{Span, Timestamp, Zoned};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Retention rules. The field names are those of the command-line flags (`--keep-daily`)
/// and of policy files (`keep-daily = 7`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Retention {
    /// Keep the N newest points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the N newest hours that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// The same per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// The same per ISO week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// The same per month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// The same per year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Keep every point taken within this span before the newest point (not before now: a
    /// VM whose backups stopped keeps its last ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<KeepWithin>,
    /// The IANA time zone of the calendar rules (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// A span for `keep-within`: `14d`, `36h`, `6mo`, `1y 6mo`, or ISO 8601 `P14D`.
#[derive(Clone, Copy, Debug)]
pub struct KeepWithin(pub Span);

impl PartialEq for KeepWithin {
    /// Field by field: `24h` and `1d` differ (a local day is not always 24 hours).
    fn eq(&self, other: &Self) -> bool {
        self.0.fieldwise() == other.0.fieldwise()
    }
}

impl FromStr for KeepWithin {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |detail: String| Error::BadDuration { input: s.into(), detail };
        let span: Span = s.trim().parse().map_err(|e: jiff::Error| bad(e.to_string()))?;
        if span.is_negative() {
            return Err(bad("it is negative".into()));
        }
        Ok(KeepWithin(span))
    }
}

impl fmt::Display for KeepWithin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl Serialize for KeepWithin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeepWithin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The time zone named `name` in the bundled database (`None`: UTC).
pub fn time_zone(name: Option<&str>) -> Result<TimeZone, Error> {
    match name {
        None => Ok(TimeZone::UTC),
        Some(name) => TimeZoneDatabase::bundled()
            .get(name)
            .map_err(|_| Error::UnknownTimeZone { name: name.into() }),
    }
}

impl Retention {
    /// True if no rule can keep a point (every `keep-*` count unset or 0, no `keep-within`);
    /// the time zone is not a rule.
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(|(_, n)| n.unwrap_or(0) == 0) && self.keep_within.is_none()
    }

    /// Checks the policy: at least one rule, a known time zone.
    pub fn check(&self) -> Result<TimeZone, Error> {
        if self.is_empty() {
            return Err(Error::NoRules);
        }
        time_zone(self.time_zone.as_deref())
    }

    fn counts(&self) -> [(Period, Option<u32>); 6] {
        [
            (Period::Last, self.keep_last),
            (Period::Hour, self.keep_hourly),
            (Period::Day, self.keep_daily),
            (Period::Week, self.keep_weekly),
            (Period::Month, self.keep_monthly),
            (Period::Year, self.keep_yearly),
        ]
    }
}

/// What retention needs to know of a point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointFacts {
    /// When it was taken (its capture time).
    pub time: Timestamp,
    /// Kept until then, whatever the rules say (an on-demand backup's own retention).
    pub retain_until: Option<Timestamp>,
    /// Locked until then: nothing may delete it.
    pub locked_until: Option<Timestamp>,
    /// Verify found it whole last time it ran over it.
    pub verified: bool,
    /// Its last restore drill passed: it is known to restore.
    pub restores: bool,
}

impl PointFacts {
    /// A point taken at `time` with no retain-until, lock or verification.
    pub fn at(time: Timestamp) -> Self {
        PointFacts {
            time,
            retain_until: None,
            locked_until: None,
            verified: false,
            restores: false,
        }
    }
}

/// Why a point is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Among the `keep-last` newest: it is the `n`th newest (1 = newest).
    Last(u32),
    /// The newest point of its hour (the label, local time with offset).
    Hourly(String),
    /// The newest point of its day.
    Daily(String),
    /// The newest point of its ISO week.
    Weekly(String),
    /// The newest point of its month.
    Monthly(String),
    /// The newest point of its year.
    Yearly(String),
    /// Taken within `keep-within` of the newest point: at or after this time.
    Within(Timestamp),
    /// Its own retain-until is later than now.
    RetainUntil(Timestamp),
    /// Locked until later than now.
    Locked(Timestamp),
    /// The newest point verify found whole: never expired.
    NewestVerified,
    /// The newest point a restore drill restored: never expired, so a VM always has a point
    /// known to restore once one drill passed.
    NewestRestored,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Last(n) => write!(f, "keep-last (newest #{n})"),
            Reason::Hourly(b) => write!(f, "keep-hourly (hour {b})"),
            Reason::Daily(b) => write!(f, "keep-daily (day {b})"),
            Reason::Weekly(b) => write!(f, "keep-weekly (week {b})"),
            Reason::Monthly(b) => write!(f, "keep-monthly (month {b})"),
            Reason::Yearly(b) => write!(f, "keep-yearly (year {b})"),
            Reason::Within(since) => write!(f, "keep-within (taken at or after {})", secs(since)),
            Reason::RetainUntil(t) => write!(f, "retain-until {}", secs(t)),
            Reason::Locked(t) => write!(f, "locked until {}", secs(t)),
            Reason::NewestVerified => write!(f, "newest verified point"),
            Reason::NewestRestored => write!(f, "newest point a restore drill passed on"),
        }
    }
}

/// A time to the second, for reasons people read.
fn secs(t: &Timestamp) -> impl fmt::Display {
    t.strftime("%Y-%m-%dT%H:%M:%SZ")
}

/// The decision for one point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Every reason it is kept; empty means it expires.
    pub reasons: Vec<Reason>,
}

impl Verdict {
    /// True if some rule keeps the point.
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Period {
    Last,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// The label of the period `t` falls in.
    fn label(self, t: &Zoned) -> String {
        match self {
            Period::Last => String::new(),
            Period::Hour => format!("{}T{:02}{}", t.date(), t.hour(), t.offset()),
            Period::Day => t.date().to_string(),
            Period::Week => {
                let w = t.date().iso_week_date();
                format!("{:04}-W{:02}", w.year(), w.week())
            }
            Period::Month => format!("{:04}-{:02}", t.year(), t.month()),
            Period::Year => format!("{:04}", t.year()),
        }
    }

    fn reason(self, label: String, rank: u32) -> Reason {
        match self {
            Period::Last => Reason::Last(rank),
            Period::Hour => Reason::Hourly(label),
            Period::Day => Reason::Daily(label),
            Period::Week => Reason::Weekly(label),
            Period::Month => Reason::Monthly(label),
            Period::Year => Reason::Yearly(label),
        }
    }
}

/// Decides, for each of `points` (the points of one VM that are not deleted, in any order),
/// whether `retention` keeps it at `now`. The verdicts are in the order of `points`.
///
/// Besides the rules, a point is kept while its own retain-until or lock is later than `now`,
/// and the newest verified point and the newest point a restore drill passed on are always
/// kept.
pub fn evaluate(
    retention: &Retention,
    points: &[PointFacts],
    now: Timestamp,
) -> Result<Vec<Verdict>, Error> {
    let tz = retention.check()?;
    let mut verdicts = vec![Verdict::default(); points.len()];
    // Newest first; equal times in input order.
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| points.get(b).map(|p| p.time).cmp(&points.get(a).map(|p| p.time)));
    let zoned: Vec<Zoned> = points.iter().map(|p| p.time.to_zoned(tz.clone())).collect();
    for (period, count) in retention.counts() {
        let Some(count) = count else { continue };
        let mut kept = 0u32;
        let mut last_label: Option<String> = None;
        for &i in &order {
            if kept >= count {
                break;
            }
            let Some(t) = zoned.get(i) else { continue };
            let label = period.label(t);
            if period != Period::Last && last_label.as_deref() == Some(label.as_str()) {
                continue;
            }
            kept += 1;
            if let Some(v) = verdicts.get_mut(i) {
                v.reasons.push(period.reason(label.clone(), kept));
            }
            last_label = Some(label);
        }
    }
    if let (Some(within), Some(&newest)) = (retention.keep_within, order.first()) {
        // A span too long for the calendar reaches back past every point.
        let since = zoned
            .get(newest)
            .and_then(|z| z.checked_sub(within.0).ok())
            .map(|z| z.timestamp())
            .unwrap_or(Timestamp::MIN);
        for (p, v) in points.iter().zip(&mut verdicts) {
            if p.time >= since {
                v.reasons.push(Reason::Within(since));
            }
        }
    }
    for (p, v) in points.iter().zip(&mut verdicts) {
        if let Some(until) = p.retain_until.filter(|u| *u > now) {
            v.reasons.push(Reason::RetainUntil(until));
        }
        if let Some(until) = p.locked_until.filter(|u| *u > now) {
            v.reasons.push(Reason::Locked(until));
        }
    }
    if let Some(&i) = order.iter().find(|&&i| points.get(i).is_some_and(|p| p.verified))
        && let Some(v) = verdicts.get_mut(i)
    {
        v.reasons.push(Reason::NewestVerified);
    }
    if let Some(&i) = order.iter().find(|&&i| points.get(i).is_some_and(|p| p.restores))
        && let Some(v) = verdicts.get_mut(i)
    {
        v.reasons.push(Reason::NewestRestored);
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests;
