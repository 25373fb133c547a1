//! Snapshots for Cairn: bring a VM's disks to one point in time, know how consistent that
//! point is, and say why.
//!
//! Two roles, two traits. A [`Quiescer`] works inside the VM: pre/post scripts, a
//! file-system freeze, VSS on Windows. A [`ViewProvider`] works where the disks live: it
//! takes and releases a point-in-time view (a reflink clone, a btrfs snapshot). Today the
//! agent plays both roles on one host; the split lets a coordinator put them on two
//! machines later. [`capture`] runs the lifecycle in the only order that is safe (quiesce,
//! take the views, resume) and returns a [`Capture`] whose views the backup reads; the
//! views are released after the recovery point is committed.
//!
//! The consistency levels, from best to worst: application (scripts or VSS writers
//! quiesced the applications), file system (file systems frozen), crash (disks captured
//! at one instant, nothing quiesced), none (a live disk read with no snapshot). Every
//! step that lowers the level records why in a [`Record`], which becomes the recovery
//! point's evidence.
//!
//! Linux only for now, except [`vss`], whose requester state machine is portable and whose
//! calls into Windows live behind `cfg(windows)`.

mod capture;
#[cfg(unix)]
pub mod config;
mod error;
pub mod failpoint;
#[cfg(unix)]
pub mod freeze;
#[cfg(unix)]
mod guest;
#[cfg(unix)]
pub mod guest_hook;
mod held;
#[cfg(unix)]
mod loops;
mod record;
#[cfg(unix)]
pub mod scripts;
#[cfg(unix)]
mod sys;
#[cfg(unix)]
pub mod trusted;
#[cfg(unix)]
pub mod views;
pub mod vss;
#[cfg(unix)]
pub mod watchdog;

pub use capture::{
    Capture, DiskSpec, DiskViews, EachDisk, Hold, Keep, Quiescer, Release, View, ViewProvider,
    VmState, capture, capture_with, take_noted,
};
#[cfg(unix)]
pub use config::{DiskConfig, DiskFormat, QemuConfig, ViewKind, VmConfig};
pub use error::Error;
#[cfg(unix)]
pub use guest::{GuestQuiescer, NoQuiescer};
pub use held::KeptView;
pub use record::Record;
