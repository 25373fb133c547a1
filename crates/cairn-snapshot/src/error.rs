//! Errors of snapshot providers. Each names the thing at fault and says what to do.

use std::path::PathBuf;

/// A snapshot could not be taken, or a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM or script configuration is malformed or unsafe; `field` names the setting.
    #[error("{file}: {field}: {message}")]
    Config {
        /// The configuration file (or `<inline>`).
        file: String,
        /// The field at fault, as written in the file.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A file's mode or owner makes it unsafe to run or trust; `fix` is the command to run.
    #[error("{path} is refused: {problem}; run `{fix}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// What is wrong (its mode or owner).
        problem: String,
        /// The exact command that fixes it.
        fix: String,
    },
    /// A pre- or post-script failed and `continueBackupOnFailure` is false.
    #[error(
        "{script} script {path} failed: {outcome}; the backup stops (continueBackupOnFailure is false)"
    )]
    ScriptFailed {
        /// `pre` or `post`.
        script: &'static str,
        /// The script.
        path: PathBuf,
        /// How it ended (exit code, timeout, signal).
        outcome: String,
    },
    /// The agent would freeze a file system it needs itself.
    #[error(
        "refusing to freeze {mount}: it holds {what} ({path}); a writer there would hang the agent. Move it to another file system or leave {mount} out of the freeze list"
    )]
    FreezeRefused {
        /// The mount point.
        mount: PathBuf,
        /// What the agent keeps there (its vault, temp files, logs...).
        what: String,
        /// The path that lies on it.
        path: PathBuf,
    },
    /// A path given as a mount point to freeze is not one.
    #[error("{path} is not a mount point; freeze lists the mount points of file systems")]
    NotAMountPoint {
        /// The path.
        path: PathBuf,
    },
    /// Freezing or thawing failed.
    #[error("cannot {action} {mount}: {source}")]
    Freeze {
        /// `freeze` or `thaw`.
        action: &'static str,
        /// The mount point.
        mount: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The thaw watchdog could not be started; nothing was frozen.
    #[error("cannot start the thaw watchdog ({detail}); nothing was frozen")]
    Watchdog {
        /// What failed.
        detail: String,
    },
    /// A disk has no way to take a point-in-time view, and live reads are not allowed.
    #[error(
        "no snapshot possible for disk {disk} ({path}): {reason}. Put the image on XFS (reflink=1) or btrfs, choose another view, or set live_read = true to accept consistency \"none\""
    )]
    NoSnapshot {
        /// The disk's name.
        disk: String,
        /// Its image.
        path: PathBuf,
        /// Why no view could be taken.
        reason: String,
    },
    /// A view was taken but something about it failed (creating or removing the clone).
    #[error("view of disk {disk}: {detail}: {source}")]
    View {
        /// The disk.
        disk: String,
        /// What was being done.
        detail: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// A view provider could not start tracking a disk's changes in the capture's step.
    #[error("starting the change tracking of disk {disk}: {detail}")]
    Tracking {
        /// The disk.
        disk: String,
        /// What failed.
        detail: String,
    },
    /// A disk declared stopped is open for writing by a running process.
    #[error(
        "VM is configured as stopped, but {path} is open for writing by {holder}; stop the VM or set state = \"running\""
    )]
    DiskInUse {
        /// The disk image.
        path: PathBuf,
        /// Who holds it: a process with its command name, or a loop device.
        holder: String,
    },
    /// The VSS requester failed on every rung of its ladder.
    #[error("VSS: {0}")]
    Vss(String),
    /// A running VM's disks could not be viewed at one instant (QEMU's copy-before-write).
    #[error("point-in-time view of running VM {vm}: {detail}")]
    LiveView {
        /// The VM.
        vm: String,
        /// What failed.
        detail: String,
    },
    /// The guest could not be quiesced, and the configuration requires it.
    #[error("the guest could not be quiesced: {detail}")]
    Quiesce {
        /// What happened and what to do.
        detail: String,
    },
    /// Any other I/O error, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A configuration error for `field` of `file`.
    pub fn config(
        file: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config { file: file.into(), field: field.into(), message: message.into() }
    }

    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}

/// The field a serde error message names (`unknown field `x``, `missing field `x``, ...);
/// an empty key is named `""` so it can still be found.
#[cfg(unix)]
pub(crate) fn field_in(message: &str) -> Option<String> {
    let markers = ["unknown field `", "missing field `", "duplicate key `", "duplicate field `"];
    let rest = markers.iter().find_map(|m| message.split(m).nth(1))?;
    let field = rest.split('`').next().unwrap_or_default();
    Some(if field.is_empty() { "\"\"".into() } else { field.to_string() })
}
