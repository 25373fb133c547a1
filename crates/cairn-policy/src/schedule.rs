//! Schedules: when a policy's backups start.
//!
//! Three kinds, as Azure Backup offers them: **daily** at given times, **weekly** on given days
//! at given times, and **hourly** every 4, 6, 8, 12 or 24 hours within a daily window (its start
//! and length). Times are wall-clock times in the schedule's time zone, so a 02:30 backup stays
//! at 02:30 local time all year. Across a DST change a run whose time does not exist that day
//! (the hour skipped in spring) starts at the same distance past the gap (02:30 becomes 03:30),
//! and a run whose time happens twice (the hour repeated in autumn) starts once, the first
//! time: a day never loses or doubles a backup.
//!
//! **Jitter** spreads the VMs of one schedule so that ten thousand of them do not start on the
//! same second: each VM starts a fixed offset after the scheduled time, from 0 up to the
//! jitter, derived from its name by a stable hash, so a VM keeps its offset from day to day
//! and from host to host (its recovery-point spacing stays regular), and the offsets of many
//! VMs are spread evenly.

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::retention::time_zone;

/// The intervals an hourly schedule may use, in hours.
pub const HOURLY_INTERVALS: [i64; 5] = [4, 6, 8, 12, 24];
/// The longest jitter accepted, in minutes.
pub const MAX_JITTER_MINUTES: u32 = 180;

/// A schedule as written in a policy file (`[schedule]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScheduleSpec {
    /// `daily`, `weekly` or `hourly`.
    pub kind: String,
    /// Daily and weekly: the start times, `HH:MM`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub times: Vec<String>,
    /// Weekly: the days, `mon` to `sun` (or the full English names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
    /// Hourly: the interval, 4, 6, 8, 12 or 24.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_hours: Option<i64>,
    /// Hourly: when the daily window opens, `HH:MM` (default 00:00).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<String>,
    /// Hourly: how long the window stays open, 1 to 24 hours (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_hours: Option<i64>,
    /// The IANA time zone of the times (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Spread the VMs' starts over this many minutes after each scheduled time (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_minutes: Option<u32>,
}

/// A checked schedule: when runs are due, in a time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    rule: Rule,
    zone: TimeZone,
    jitter: SignedDuration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    /// At `times` on every day (`days` is `None`) or on the days marked (Monday first).
    Times { days: Option<[bool; 7]>, times: Vec<Time> },
    /// Every `every` hours from `start`, while less than `hours` have passed since it.
    Window { every: i64, start: Time, hours: i64 },
}

fn field(name: &str, message: impl Into<String>) -> Error {
    Error::Field { field: format!("schedule.{name}"), message: message.into() }
}

fn parse_time(text: &str, name: &str) -> Result<Time, Error> {
    let bad = || field(name, format!("{text:?} is not a time: write HH:MM, such as \"02:30\""));
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let two_digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return Err(bad());
    }
    let (h, m): (i8, i8) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    Time::new(h, m, 0, 0).map_err(|_| bad())
}

fn parse_day(text: &str, name: &str) -> Result<Weekday, Error> {
    Ok(match text.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Monday,
        "tue" | "tuesday" => Weekday::Tuesday,
        "wed" | "wednesday" => Weekday::Wednesday,
        "thu" | "thursday" => Weekday::Thursday,
        "fri" | "friday" => Weekday::Friday,
        "sat" | "saturday" => Weekday::Saturday,
        "sun" | "sunday" => Weekday::Sunday,
        _ => return Err(field(name, format!("{text:?} is not a day: write mon, tue, ... sun"))),
    })
}

impl ScheduleSpec {
    /// Checks the schedule; every error names its field (`schedule.times[1]`).
    pub fn check(&self) -> Result<Schedule, Error> {
        let zone =
            time_zone(self.time_zone.as_deref()).map_err(|e| field("time-zone", e.to_string()))?;
        let only = |set: bool, name: &str, kinds: &str| match set {
            true => Err(field(name, format!("applies to {kinds} schedules only"))),
            false => Ok(()),
        };
        let times = || -> Result<Vec<Time>, Error> {
            if self.times.is_empty() {
                return Err(field("times", "give at least one start time, such as [\"02:00\"]"));
            }
            let mut times = Vec::new();
            for (i, t) in self.times.iter().enumerate() {
                times.push(parse_time(t, &format!("times[{i}]"))?);
            }
            times.sort();
            times.dedup();
            Ok(times)
        };
        let rule = match self.kind.as_str() {
            "daily" | "weekly" => {
                only(self.every_hours.is_some(), "every-hours", "hourly")?;
                only(self.window_start.is_some(), "window-start", "hourly")?;
                only(self.window_hours.is_some(), "window-hours", "hourly")?;
                let days = match self.kind.as_str() {
                    "daily" => {
                        only(!self.days.is_empty(), "days", "weekly")?;
                        None
                    }
                    _ => {
                        if self.days.is_empty() {
                            return Err(field("days", "give at least one day, such as [\"sun\"]"));
                        }
                        let mut mask = [false; 7];
                        for (i, d) in self.days.iter().enumerate() {
                            let day = parse_day(d, &format!("days[{i}]"))?;
                            if let Some(slot) =
                                mask.get_mut(day.to_monday_zero_offset().unsigned_abs() as usize)
                            {
                                *slot = true;
                            }
                        }
                        Some(mask)
                    }
                };
                Rule::Times { days, times: times()? }
            }
            "hourly" => {
                only(!self.times.is_empty(), "times", "daily and weekly")?;
                only(!self.days.is_empty(), "days", "weekly")?;
                let every = self
                    .every_hours
                    .ok_or_else(|| field("every-hours", "give the interval: 4, 6, 8, 12 or 24"))?;
                if !HOURLY_INTERVALS.contains(&every) {
                    return Err(field(
                        "every-hours",
                        format!("{every} is not offered: give 4, 6, 8, 12 or 24"),
                    ));
                }
                let start = match &self.window_start {
                    Some(t) => parse_time(t, "window-start")?,
                    None => Time::midnight(),
                };
                let hours = self.window_hours.unwrap_or(24);
                if !(1..=24).contains(&hours) {
                    return Err(field(
                        "window-hours",
                        format!("{hours} is out of range: give 1 to 24"),
                    ));
                }
                Rule::Window { every, start, hours }
            }
            other => {
                return Err(field(
                    "kind",
                    format!(
                        "{other:?} is not a schedule: give \"daily\", \"weekly\" or \"hourly\""
                    ),
                ));
            }
        };
        let minutes = self.jitter_minutes.unwrap_or(0);
        let shortest = rule.shortest_gap_minutes();
        if minutes > MAX_JITTER_MINUTES || i64::from(minutes) >= shortest {
            return Err(field(
                "jitter-minutes",
                format!(
                    "{minutes} is too long: give at most {MAX_JITTER_MINUTES}, and less than the \
                     {shortest} minutes between two runs of this schedule"
                ),
            ));
        }
        let jitter = SignedDuration::from_mins(i64::from(minutes));
        Ok(Schedule { rule, zone, jitter })
    }
}

impl Rule {
    /// The wall-clock times of the runs that belong to `date` (an hourly window opened on
    /// `date` may run past midnight), in order.
    fn runs_of(&self, date: Date) -> Vec<DateTime> {
        match self {
            Rule::Times { days, times } => {
                let today = date.weekday().to_monday_zero_offset().unsigned_abs() as usize;
                if days.is_some_and(|d| !d.get(today).copied().unwrap_or(false)) {
                    return Vec::new();
                }
                times.iter().map(|t| date.to_datetime(*t)).collect()
            }
            Rule::Window { every, start, hours } => {
                let open = date.to_datetime(*start);
                (0..)
                    .map(|k| k * every)
                    .take_while(|h| h < hours)
                    .filter_map(|h| open.checked_add(h.hours()).ok())
                    .collect()
            }
        }
    }

    /// The fewest minutes between two runs, on the wall clock.
    fn shortest_gap_minutes(&self) -> i64 {
        match self {
            Rule::Window { every, .. } => every * 60,
            Rule::Times { times, .. } => {
                let minutes: Vec<i64> = times
                    .iter()
                    .map(|t| i64::from(t.hour()) * 60 + i64::from(t.minute()))
                    .collect();
                let mut shortest = 24 * 60;
                for pair in minutes.windows(2) {
                    if let [a, b] = pair {
                        shortest = shortest.min(b - a);
                    }
                }
                if let (Some(first), Some(last)) = (minutes.first(), minutes.last())
                    && minutes.len() > 1
                {
                    shortest = shortest.min(first + 24 * 60 - last);
                }
                shortest
            }
        }
    }
}

impl Schedule {
    /// The time zone of its times.
    pub fn time_zone(&self) -> &TimeZone {
        &self.zone
    }

    /// The longest offset [`Schedule::start_for`] adds.
    pub fn jitter(&self) -> SignedDuration {
        self.jitter
    }

    /// The first scheduled time strictly after `after`, before jitter.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let today = after.to_zoned(self.zone.clone()).date();
        // From the day before (a window opened yesterday may still be running), over more
        // than a week (a weekly schedule runs at least once in any seven days).
        let mut day = today.yesterday().ok()?;
        let mut best: Option<Timestamp> = None;
        for _ in 0..10 {
            for run in self.rule.runs_of(day) {
                // Compatible: a time in a gap moves past it, a repeated time is the first.
                let Ok(at) = self.zone.to_ambiguous_timestamp(run).compatible() else {
                    continue;
                };
                if at > after && best.is_none_or(|b| at < b) {
                    best = Some(at);
                }
            }
            if best.is_some() && day > today {
                break;
            }
            day = day.tomorrow().ok()?;
        }
        best
    }

    /// Every scheduled time in `(from, to]`, before jitter, in order.
    pub fn between(&self, from: Timestamp, to: Timestamp) -> Vec<Timestamp> {
        let mut out = Vec::new();
        let mut at = from;
        while let Some(next) = self.next_after(at).filter(|n| *n <= to) {
            out.push(next);
            at = next;
        }
        out
    }

    /// When the run scheduled at `scheduled` starts for the VM named `key`: a fixed offset
    /// from 0 up to the jitter, the same for that VM at every run and on every host.
    pub fn start_for(&self, scheduled: Timestamp, key: &str) -> Timestamp {
        scheduled.checked_add(self.offset_for(key)).unwrap_or(scheduled)
    }

    /// The VM's offset from each scheduled time.
    pub fn offset_for(&self, key: &str) -> SignedDuration {
        let span = self.jitter.as_millis();
        if span <= 0 {
            return SignedDuration::ZERO;
        }
        let hash = twox_hash::XxHash3_64::oneshot_with_seed(0x6361_6972_6e00, key.as_bytes());
        let span = span as u64;
        SignedDuration::from_millis((hash % span) as i64)
    }
}

#[cfg(test)]
mod tests;
