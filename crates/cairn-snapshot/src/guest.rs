//! The Linux guest quiescer: pre-script, file-system freeze, then after the views: thaw and
//! post-script, with Azure's fallback ladder.
//!
//! | what happened | level |
//! |---|---|
//! | pre-script succeeded (freeze or not) | application |
//! | pre-script failed, `continueBackupOnFailure`, freeze succeeded | file system |
//! | no scripts, freeze succeeded | file system |
//! | nothing quiesced | crash (the views decide from there) |
//!
//! The post-script runs whenever the pre-script ran, its failure and timeout included. A
//! failed post-script lowers an application-consistent point to file-system consistency when
//! `continueBackupOnFailure` is true, and fails the job when it is false (as in Azure).

use std::sync::Arc;

use cairn_format::Consistency;

use crate::capture::{DiskSpec, Hold, Quiescer};
use crate::freeze::{Freezer, Frozen};
use crate::scripts::Scripts;
use crate::{Error, Record};

/// Quiesces a Linux guest with scripts and/or a file-system freeze.
pub struct GuestQuiescer {
    scripts: Option<Scripts>,
    freezer: Option<Arc<Freezer>>,
    /// Set by `quiesce`: the file systems were frozen.
    frozen: bool,
}

impl GuestQuiescer {
    /// Scripts (if configured) and a freezer (if mount points are configured). The scripts'
    /// `fsFreezeEnabled = false` turns the freeze off.
    pub fn new(scripts: Option<Scripts>, freezer: Option<Freezer>) -> GuestQuiescer {
        let freeze = scripts.as_ref().is_none_or(|s| s.config().fs_freeze);
        GuestQuiescer { freezer: freezer.filter(|_| freeze).map(Arc::new), scripts, frozen: false }
    }
}

impl Quiescer for GuestQuiescer {
    fn quiesce(&mut self, record: &mut Record) -> Result<Box<dyn Hold>, Error> {
        let mut pre_ok = false;
        if let Some(scripts) = &self.scripts {
            record.aim(Consistency::Application);
            let pre = scripts.run_pre();
            record.note(pre.evidence());
            pre_ok = pre.succeeded();
            if !pre_ok {
                if !scripts.config().continue_on_failure {
                    record.note(scripts.run_post().evidence());
                    return Err(Error::ScriptFailed {
                        script: "pre",
                        outcome: pre.outcome(),
                        path: pre.path,
                    });
                }
                let to = if self.freezer.is_some() {
                    Consistency::FileSystem
                } else {
                    Consistency::Crash
                };
                record.fall_back(
                    to,
                    format!(
                        "pre-script {} failed ({}); continueBackupOnFailure is true, so the backup goes on without application consistency",
                        pre.path.display(),
                        pre.outcome()
                    ),
                );
            }
        }
        let post = self.scripts.clone();
        let frozen = match &self.freezer {
            None => None,
            Some(freezer) => match freezer.freeze() {
                Ok(frozen) => Some(frozen),
                Err(e) => {
                    // Nothing is frozen now; the pre-script's application still waits.
                    if let Some(scripts) = &post {
                        record.note(scripts.run_post().evidence());
                    }
                    return Err(e);
                }
            },
        };
        let mounts = self.freezer.as_ref().map_or(0, |f| f.mounts().count());
        self.frozen = frozen.is_some();
        if pre_ok {
            let how = if frozen.is_some() { " and the file systems were frozen" } else { "" };
            record.reached(
                Consistency::Application,
                format!("the pre-script quiesced the applications{how}"),
            );
        } else if frozen.is_some() && self.scripts.is_none() {
            record.reached(Consistency::FileSystem, format!("{mounts} file system(s) frozen"));
        }
        Ok(Box::new(GuestHold { frozen, mounts, post }))
    }

    /// A disk is held still when a frozen file system is mounted from its image (through a
    /// loop device the agent can see). Scripts quiesce applications, not disks: they raise
    /// the level, but do not make clones taken one after another one instant.
    fn holds_still(&self, disk: &DiskSpec) -> bool {
        self.frozen && self.freezer.as_ref().is_some_and(|f| f.holds_image(&disk.path))
    }
}

struct GuestHold {
    frozen: Option<Frozen>,
    mounts: usize,
    post: Option<Scripts>,
}

impl Hold for GuestHold {
    fn resume(self: Box<Self>, record: &mut Record) -> Result<(), Error> {
        let thawed = match self.frozen {
            Some(frozen) => frozen.thaw().map(|t| {
                record.froze_for(self.mounts, t.duration, t.freeze_calls);
                if !t.thawed_early.is_empty() {
                    let mounts: Vec<String> =
                        t.thawed_early.iter().map(|m| m.display().to_string()).collect();
                    record.fall_back(
                        Consistency::Crash,
                        format!(
                            "the watchdog thawed {} at its deadline, before the agent did: the views may postdate the thaw. Raise freeze.watchdog_seconds",
                            mounts.join(", ")
                        ),
                    );
                }
            }),
            None => Ok(()),
        };
        if let Some(scripts) = &self.post {
            let post = scripts.run_post();
            record.note(post.evidence());
            if !post.succeeded() {
                if !scripts.config().continue_on_failure {
                    thawed?;
                    return Err(Error::ScriptFailed {
                        script: "post",
                        outcome: post.outcome(),
                        path: post.path,
                    });
                }
                let to = if self.mounts > 0 { Consistency::FileSystem } else { Consistency::Crash };
                record.fall_back(
                    to,
                    format!(
                        "post-script {} failed ({}); continueBackupOnFailure is true: the point does not count on the applications",
                        post.path.display(),
                        post.outcome()
                    ),
                );
            }
        }
        thawed
    }
}

/// A quiescer that does nothing: for stopped VMs and for views that need no quiescing.
pub struct NoQuiescer;

impl Quiescer for NoQuiescer {
    fn quiesce(&mut self, _: &mut Record) -> Result<Box<dyn Hold>, Error> {
        Ok(Box::new(NoHold))
    }
}

struct NoHold;

impl Hold for NoHold {
    fn resume(self: Box<Self>, _: &mut Record) -> Result<(), Error> {
        Ok(())
    }
}
