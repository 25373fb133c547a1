//! The coordinator side of Cairn: which VMs are protected by which policy, which backups are
//! due, and what became of them.
//!
//! [`Catalogue`] keeps the coordinator's state (policies, VMs, jobs, points, agents, alerts and
//! the audit log) in one SQLite database, migrated in place and held by one coordinator at a
//! time. [`plan`] turns policies into jobs at their scheduled times, once each, whatever the
//! coordinator's restarts; [`dispatch`] starts the jobs whose time has come wherever their
//! host, datastore and vault have room, and records why the others wait. The vaults stay the source of truth for points, and the catalogue
//! can be rebuilt from them.

pub mod agent_api;
mod agents;
pub mod api;
mod auth;
mod catalogue;
mod dispatch;
mod error;
mod keeper;
mod metrics;
mod plan;
mod points;
mod restores;
mod service;
mod sessions;
#[cfg(test)]
mod testing;
pub mod tls;
mod upkeep;
mod users_file;
mod vault_api;
mod webhook;

pub use agents::{
    AgentRecord, JobOrder, OfflineRun, Orders, PointReport, Report, ReportOutcome, ScheduleEntry,
};
pub use metrics::render as render_metrics;
pub use points::{JobCounts, PointRecord, VmStanding};

pub use catalogue::{Catalogue, JobRecord, JobState, Role, VmRecord};
pub use dispatch::{Dispatched, dispatch};
pub use error::Error;
pub use keeper::{Fate, FoundPoint, Keeper, PointFate, UpkeepReport, VaultKeeper, VmRule};
pub use plan::{PlanOutcome, plan};
pub use service::{Clock, FileClock, Settings, SystemClock, serve};
pub use upkeep::{RescanSummary, UpkeepRun, keep_everything};
pub use users_file::{SESSION_HOURS, UsersFile, hash_password};
