//! Running QEMU guests: what Cairn needs to back up a VM while it runs.
//!
//! - [`Qmp`]: a synchronous client of QEMU's monitor (QMP) on its unix socket, with events.
//! - [`GuestAgent`]: a client of the guest agent (`qemu-ga`), whose every byte comes from the
//!   guest and is decoded as hostile ([`wire`], fuzzed).
//! - [`vm`]: the VM's disks as QEMU reports them, found by a configuration's `qemu_device`.
//! - [`LiveVm`]: a point-in-time view of every disk at one instant through copy-before-write
//!   fleecing, exported over QEMU's own NBD server with the previous dirty bitmap, the next
//!   bitmap started at that instant; removed after the commit or the failure, and after a
//!   killed run by the next one.
//! - [`AgentQuiescer`]: the guest's file systems frozen through its agent (the guest's
//!   fsfreeze hook runs its pre- and post-scripts), under a thaw watchdog in another process.
//!
//! Used by the job library (`cairn-backup`), never by the delta engine: the engine reads the
//! export through `cairn-nbd`'s block source like any other disk.

mod agent;
mod error;
pub mod hook;
mod live;
mod qmp;
mod quiesce;
pub mod socket;
pub mod vm;
pub mod wire;

pub use agent::GuestAgent;
pub use error::Error;
pub use live::{
    DEFAULT_CBW_TIMEOUT, FleeceOptions, LiveDiskSpec, LiveVm, MAX_CLONE_EXTENTS, MIN_QEMU,
};
pub use qmp::{DEFAULT_TIMEOUT, Event, Qmp};
pub use quiesce::{AgentQuiescer, DEFAULT_FREEZE_TIMEOUT, WATCHDOG_FLAG, serve_watchdog};
