//! Quiescing a running guest through its guest agent: `guest-fsfreeze-freeze` (which runs
//! the guest's fsfreeze hook, where in-guest pre-scripts live) before the instant, and
//! `guest-fsfreeze-thaw` after, under a thaw watchdog.
//!
//! A guest agent that is absent, does not answer in time, or refuses gives a crash-consistent
//! point with the reason in its evidence, never a failed backup, unless the configuration
//! requires the freeze. The watchdog is another process: the agent serves one client at a
//! time, so it connects only once this process's connection is gone (this process died, or
//! gave up), and thaws. A guest agent that hangs while its guest is frozen cannot be helped
//! from the host: the thaw is a request to that agent. The guest then stays frozen until the
//! agent answers again (its writers block); the watchdog keeps asking until this process
//! is gone, and the point is never better than crash-consistent.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_format::Consistency;
use cairn_snapshot::watchdog::{Watchdog, WatchdogCommand};
use cairn_snapshot::{DiskSpec, Hold, Quiescer, Record};

use cairn_format::Evidence;
use cairn_snapshot::guest_hook::{HookReport, Phase};

use crate::GuestAgent;
use crate::agent::QUICK;
use crate::hook;
use crate::wire::printable;

/// How long the guest may take to freeze (its hook's scripts included) by default.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the watchdog keeps asking a guest agent to thaw, past the deadline.
const THAW_RETRY: Duration = Duration::from_secs(90);

/// The watchdog argument that names a guest agent's socket instead of mount points.
pub const WATCHDOG_FLAG: &str = "--guest-agent";

/// Freezes a guest through its agent.
pub struct AgentQuiescer {
    socket: PathBuf,
    freeze_timeout: Duration,
    required: bool,
    watchdog: Option<(WatchdogCommand, Duration)>,
}

impl AgentQuiescer {
    /// A quiescer for the guest agent at `socket`. With `required`, a guest that cannot be
    /// frozen fails the backup instead of giving a crash-consistent point. `watchdog` is the
    /// thaw watchdog's program and deadline (the freeze is refused without one).
    pub fn new(
        socket: &Path,
        freeze_timeout: Duration,
        required: bool,
        watchdog: Option<(WatchdogCommand, Duration)>,
    ) -> AgentQuiescer {
        AgentQuiescer { socket: socket.to_path_buf(), freeze_timeout, required, watchdog }
    }

    /// Falls back to crash consistency with `why`, or fails if the freeze is required.
    fn give_up(
        &self,
        record: &mut Record,
        why: String,
    ) -> Result<Box<dyn Hold>, cairn_snapshot::Error> {
        if self.required {
            return Err(cairn_snapshot::Error::Quiesce {
                detail: format!(
                    "{why}; the configuration requires the guest's freeze (guest_agent_required)"
                ),
            });
        }
        record.fall_back(Consistency::Crash, format!("{why}: the point is crash-consistent"));
        Ok(Box::new(Nothing))
    }
}

impl Quiescer for AgentQuiescer {
    fn quiesce(&mut self, record: &mut Record) -> Result<Box<dyn Hold>, cairn_snapshot::Error> {
        record.aim(Consistency::FileSystem);
        let socket = self.socket.display().to_string();
        let mut agent = match GuestAgent::connect(&self.socket, QUICK) {
            Ok(agent) => agent,
            Err(e) => {
                return self
                    .give_up(record, format!("the guest agent at {socket} did not answer ({e})"));
            }
        };
        let Some((command, deadline)) = &self.watchdog else {
            return self.give_up(
                record,
                "no thaw watchdog program was given, so the guest was not frozen".into(),
            );
        };
        // A guest already frozen is another tool's (virsh domfsfreeze, a snapshot): neither
        // frozen again nor thawed under it.
        if let Ok(true) = agent.frozen() {
            return self.give_up(
                record,
                "the guest is already frozen by another tool: Cairn neither freezes nor thaws it"
                    .into(),
            );
        }
        // The hook's reports as they are before this freeze (see crate::hook).
        let earlier = match hook::earlier(&mut agent) {
            Ok(earlier) => Some(earlier),
            Err(e) => {
                record.note(Evidence::new(
                    "warning",
                    None,
                    format!("the guest's hook reports cannot be read ({e}): what the guest's scripts do, if it has any, is not known here, and none can stop the backup (RHEL's qemu-ga blocks guest-file-* by default)"),
                ));
                None
            }
        };
        let watchdog = match Watchdog::arm_for(
            command,
            *deadline,
            &[OsString::from(WATCHDOG_FLAG), self.socket.clone().into_os_string()],
        ) {
            Ok(w) => w,
            Err(e) => {
                return self.give_up(record, format!("the thaw watchdog did not start ({e})"));
            }
        };
        let started = Instant::now();
        match agent.freeze(self.freeze_timeout) {
            Ok(0) => {
                let _ = agent.thaw(self.freeze_timeout);
                drop(agent);
                watchdog.disarm();
                self.give_up(record, "the guest agent reported no file system frozen".into())
            }
            Ok(n) => {
                record.reached(
                    Consistency::FileSystem,
                    format!(
                        "the guest agent reported {n} file system(s) frozen in the guest (after its fsfreeze hook) in {:.0} ms",
                        started.elapsed().as_secs_f64() * 1000.0
                    ),
                );
                // What the hook's scripts did is read after the thaw: a frozen guest agent
                // refuses guest-file-* commands.
                Ok(Box::new(AgentHold {
                    agent: Some(agent),
                    watchdog: Some(watchdog),
                    frozen_at: Instant::now(),
                    deadline: *deadline,
                    thaw_timeout: self.freeze_timeout,
                    earlier,
                }))
            }
            Err(e) => {
                // A freeze that failed or timed out may have frozen some file systems (or be
                // about to): thaw now, and let the watchdog try too if that fails.
                // (A freeze that timed out left the connection unusable: the thaw fails at once
                // and the watchdog, not disarmed, thaws on a connection of its own.)
                let thawed = agent.thaw(self.freeze_timeout);
                let report = match (&earlier, &thawed) {
                    (Some(earlier), Ok(_)) => {
                        hook::read(&mut agent, Phase::Freeze, earlier).ok().flatten()
                    }
                    _ => None,
                };
                drop(agent);
                match thawed {
                    Ok(_) => watchdog.disarm(),
                    Err(_) => drop(watchdog),
                }
                if let Some(report) = &report {
                    note_scripts(record, report);
                    if let Some(why) = hook::stop_reason(report) {
                        return Err(cairn_snapshot::Error::Quiesce { detail: why });
                    }
                }
                self.give_up(record, format!("the guest agent could not freeze the guest ({e})"))
            }
        }
    }

    /// The guest's freeze covers every disk the guest has.
    fn holds_still(&self, _disk: &DiskSpec) -> bool {
        true
    }
}

struct Nothing;

impl Hold for Nothing {
    fn resume(self: Box<Self>, _: &mut Record) -> Result<(), cairn_snapshot::Error> {
        Ok(())
    }
}

/// A frozen guest.
struct AgentHold {
    agent: Option<GuestAgent>,
    watchdog: Option<Watchdog>,
    frozen_at: Instant,
    deadline: Duration,
    /// How long the thaw (and the guest's post-scripts) may take.
    thaw_timeout: Duration,
    /// The guest's hook reports before the freeze (`None`: they cannot be read).
    earlier: Option<hook::Earlier>,
}

impl Hold for AgentHold {
    fn resume(mut self: Box<Self>, record: &mut Record) -> Result<(), cairn_snapshot::Error> {
        let frozen_for = self.frozen_at.elapsed();
        let timeout = self.thaw_timeout;
        let thawed = self.agent.as_mut().map(|a| a.thaw(timeout));
        if thawed.as_ref().is_some_and(|t| t.is_err()) {
            // The connection is of no use now; the watchdog needs it closed.
            drop(self.agent.take());
        }
        match thawed {
            Some(Ok(n)) => {
                record.note(cairn_format::Evidence::new(
                    "freeze",
                    None,
                    format!("the guest was frozen for {:.0} ms; the agent thawed {n} file system(s) and ran the hook's post-scripts", frozen_for.as_secs_f64() * 1000.0),
                ));
                if frozen_for >= self.deadline {
                    record.fall_back(
                        Consistency::Crash,
                        "the freeze outlasted the watchdog's deadline, which may have thawed the guest before the views were taken",
                    );
                }
                let applied = match (&self.earlier, self.agent.as_mut()) {
                    (Some(earlier), Some(agent)) => apply_reports(record, agent, earlier),
                    _ => Ok(()),
                };
                // Connection first: a watchdog past its deadline may be waiting to reach the
                // agent, and disarming waits for it.
                drop(self.agent.take());
                if let Some(w) = self.watchdog.take() {
                    w.disarm();
                }
                applied
            }
            Some(Err(e)) => {
                // The connection is closed now; the watchdog connects and thaws.
                drop(self.watchdog.take());
                record.fall_back(
                    Consistency::Crash,
                    format!("the guest agent did not confirm the thaw ({e}); the watchdog thawed through it"),
                );
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Drop for AgentHold {
    fn drop(&mut self) {
        // Connection first: the watchdog can reach the agent only once this one is closed.
        drop(self.agent.take());
        drop(self.watchdog.take());
    }
}

/// The scripts' runs in a report, as evidence.
fn note_scripts(record: &mut Record, report: &HookReport) {
    for (which, script) in [("pre", &report.pre), ("post", &report.post)] {
        if let Some(script) = script {
            record.note(hook::script_evidence(which, script));
        }
    }
}

/// After the thaw: what the guest's hook did at the freeze and at the thaw, read back through
/// the guest agent. A pre-script that succeeded raises a file-system-consistent point to
/// application consistency (nothing else lowered it meanwhile); a failed script, an unusable
/// configuration or an unreadable report says why it does not; a failed script whose
/// configuration says not to continue stops the backup.
fn apply_reports(
    record: &mut Record,
    agent: &mut GuestAgent,
    earlier: &hook::Earlier,
) -> Result<(), cairn_snapshot::Error> {
    let freeze = match hook::read(agent, Phase::Freeze, earlier) {
        Ok(Some(report)) => report,
        // No Cairn hook in the guest: the freeze alone.
        Ok(None) => return Ok(()),
        Err(e) => {
            record.note(Evidence::new(
                "warning",
                None,
                format!("the guest's hook report is unreadable ({e}): its scripts, if any, are not counted on"),
            ));
            return Ok(());
        }
    };
    note_scripts(record, &freeze);
    if let Some(why) = hook::stop_reason(&freeze) {
        return Err(cairn_snapshot::Error::Quiesce { detail: why });
    }
    let config = printable(freeze.config.as_deref().unwrap_or("?"), 200);
    // Raised only from file system: a point something already lowered stays where it is.
    let short_of_application = |record: &mut Record, why: String| {
        if record.level() == Consistency::FileSystem {
            record.aim(Consistency::Application);
            record.fall_back(Consistency::FileSystem, why);
        } else {
            record.note(Evidence::new("warning", None, why));
        }
    };
    if let Some(error) = &freeze.error {
        short_of_application(
            record,
            format!(
                "the guest's script configuration {config} is unusable ({}): no pre-script ran",
                printable(error, 400)
            ),
        );
        return Ok(());
    }
    let Some(pre) = &freeze.pre else {
        return Ok(());
    };
    if !freeze.fs_freeze {
        record.note(Evidence::new(
            "warning",
            None,
            format!("{config} sets fsFreezeEnabled to false, but a guest agent freezes the guest's file systems after its hook: they were frozen"),
        ));
    }
    if !pre.succeeded {
        short_of_application(
            record,
            format!(
                "the guest's pre-script {} failed ({}); its continueBackupOnFailure is true, so the backup goes on without application consistency",
                printable(&pre.path, 200),
                printable(&pre.outcome, 100)
            ),
        );
    } else if record.level() == Consistency::FileSystem {
        record.reached(
            Consistency::Application,
            format!(
                "the guest's pre-script {} quiesced its applications before the freeze",
                printable(&pre.path, 200)
            ),
        );
    }
    // The post-script ran at the thaw, as every pre-script's does.
    let thaw = match hook::read(agent, Phase::Thaw, earlier) {
        Ok(Some(report)) => report,
        Ok(None) => {
            record.fall_back(
                Consistency::FileSystem,
                "the guest's hook left no report of its post-script: the point does not count on the applications",
            );
            return Ok(());
        }
        Err(e) => {
            record.fall_back(
                Consistency::FileSystem,
                format!("the guest's hook report of its post-script is unreadable ({e}): the point does not count on the applications"),
            );
            return Ok(());
        }
    };
    note_scripts(record, &thaw);
    if let Some(why) = hook::stop_reason(&thaw) {
        return Err(cairn_snapshot::Error::Quiesce { detail: why });
    }
    match (&thaw.post, &thaw.error) {
        (Some(post), _) if !post.succeeded => record.fall_back(
            Consistency::FileSystem,
            format!(
                "the guest's post-script {} failed ({}); continueBackupOnFailure is true: the point does not count on the applications",
                printable(&post.path, 200),
                printable(&post.outcome, 100)
            ),
        ),
        (None, Some(error)) => record.fall_back(
            Consistency::FileSystem,
            format!(
                "the guest's post-script did not run ({}): the point does not count on the applications",
                printable(error, 400)
            ),
        ),
        (None, None) => record.fall_back(
            Consistency::FileSystem,
            "the guest's hook ran no post-script at the thaw: the point does not count on the applications",
        ),
        _ => {}
    }
    Ok(())
}

/// The watchdog's role for a guest agent: `args` are the deadline in milliseconds, then
/// [`WATCHDOG_FLAG`] and the agent's socket. Thaws through the agent when the backup's
/// process dies or the deadline passes.
pub fn serve_watchdog(args: &[OsString]) -> i32 {
    let say = |m: std::fmt::Arguments<'_>| cairn_snapshot::watchdog::say(m);
    let [deadline, flag, socket] = args else {
        say(format_args!("usage: DEADLINE_MS {WATCHDOG_FLAG} SOCKET"));
        return 2;
    };
    let Some(deadline) = cairn_snapshot::watchdog::parse_deadline(deadline) else {
        say(format_args!("bad deadline {deadline:?}"));
        return 2;
    };
    if flag != WATCHDOG_FLAG {
        say(format_args!("usage: DEADLINE_MS {WATCHDOG_FLAG} SOCKET"));
        return 2;
    }
    let socket = PathBuf::from(socket);
    let armed = Instant::now();
    cairn_snapshot::watchdog::serve_with(deadline, |reason| {
        // The agent may still be busy with a freeze the dead process asked for (its hook's
        // scripts may take up to the whole deadline, which covers the freeze): asked again
        // until it says the guest is thawed, for the rest of the deadline and a while more.
        let end = armed.checked_add(deadline).unwrap_or(armed).max(Instant::now());
        let until = end.checked_add(THAW_RETRY).unwrap_or(end);
        loop {
            let attempt = GuestAgent::connect(&socket, QUICK).and_then(|mut a| {
                let n = a.thaw(QUICK)?;
                Ok((n, a.frozen()?))
            });
            let late = Instant::now() >= until;
            match attempt {
                Ok((n, false)) => {
                    if n > 0 {
                        say(format_args!("thawed {n} file system(s) in the guest ({reason})"));
                    }
                    return;
                }
                Ok((_, true)) if late => {
                    say(format_args!("the guest still reports frozen ({reason})"));
                    return;
                }
                Err(e) if late => {
                    say(format_args!(
                        "cannot thaw the guest through {} ({reason}): {e}",
                        socket.display()
                    ));
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    })
}
