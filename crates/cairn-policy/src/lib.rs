//! Cairn's policies, as pure functions of their inputs: time is a parameter, nothing here
//! reads a clock, a file or the network.
//!
//! Policies ([`Policy`], from TOML): a schedule, a retention, the instant-restore days, the
//! consistency wanted and the transfer deadline.
//!
//! Schedules ([`ScheduleSpec`], [`Schedule`]): daily, weekly, and hourly within a window,
//! in a time zone and right across DST, with a stable per-VM jitter.
//!
//! Admission ([`admit`]): which due backups start now without passing a host's, a
//! datastore's or a vault's limit, and why the others wait.
//!
//! Retention ([`Retention`], [`evaluate`]): which recovery points of a VM to keep,
//! by the rules users of restic and Proxmox know (the last N; hourly, daily, weekly, monthly
//! and yearly counts; everything within a span of the newest point), plus a per-point "retain
//! until" for on-demand backups, locks, and the newest verified point, which is never
//! expired. Calendar rules work in a named time zone, resolved from the IANA database bundled
//! into the binary (`jiff`'s `tzdb-bundle-always`), so a policy gives the same answer on every
//! host, whatever its own tzdata.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

mod admission;
mod error;
mod policy;
mod retention;
mod schedule;

pub use admission::{Decision, Due, Limits, Placement, admit};
pub use error::Error;
pub use policy::{MAX_INSTANT_RESTORE_DAYS, Policy, PolicySpec, Wanted};
pub use retention::{KeepWithin, PointFacts, Reason, Retention, Verdict, evaluate, time_zone};
pub use schedule::{HOURLY_INTERVALS, MAX_JITTER_MINUTES, Schedule, ScheduleSpec};
