//! The long-running Cairn agent, as a library: what `cairn-agent install`, `uninstall` and
//! `run` do on a host.
//!
//! - [`install`] / [`uninstall`]: the agent's changes to the host (folders, configuration,
//!   enrollment token, systemd unit), listed, recorded and reverted exactly.
//! - [`AgentConfig`]: the agent's file, which alone maps the coordinator's VM and vault names
//!   to disks and URLs.
//! - [`Worker`]: enrollment, the job long poll through a [`Transport`] ([`HttpTransport`] over
//!   the coordinator's API), jobs run by a [`Runner`] (the agent's backup), reports kept on
//!   disk until delivered, and the cached schedule that keeps backups going while the
//!   coordinator is away.
//!
//! Nothing here reads a disk or a vault: the [`Runner`] the binary hands in does.

mod config;
mod error;
mod install;
mod state;
mod transport;
mod worker;

pub use config::{AgentConfig, VaultEntry, VmEntry};
pub use error::Error;
pub use install::{Change, InstallOptions, Step, UNIT, install, uninstall, unit_text};
pub use state::{OfflineRecord, State};
pub use transport::{HttpTransport, Transport};
pub use worker::{JobProgress, Runner, Stop, Task, Worker};
