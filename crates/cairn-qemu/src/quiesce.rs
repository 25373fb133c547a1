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

use crate::GuestAgent;
use crate::agent::QUICK;

/// How long the guest may take to freeze (its hook's scripts included) by default.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the watchdog keeps asking a guest agent to thaw.
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
                let _ = agent.thaw(QUICK);
                drop(agent);
                watchdog.disarm();
                self.give_up(record, "the guest agent reported no file system frozen".into())
            }
            Ok(n) => {
                record.reached(
                    Consistency::FileSystem,
                    format!(
                        "the guest agent reported {n} file system(s) frozen in the guest (its fsfreeze hook ran first) in {:.0} ms",
                        started.elapsed().as_secs_f64() * 1000.0
                    ),
                );
                Ok(Box::new(AgentHold {
                    agent: Some(agent),
                    watchdog: Some(watchdog),
                    frozen_at: Instant::now(),
                    deadline: *deadline,
                }))
            }
            Err(e) => {
                // A freeze that failed or timed out may have frozen some file systems (or be
                // about to): thaw now, and let the watchdog try too if that fails.
                let thawed = agent.thaw(QUICK);
                drop(agent);
                match thawed {
                    Ok(_) => watchdog.disarm(),
                    Err(_) => drop(watchdog),
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
}

impl Hold for AgentHold {
    fn resume(mut self: Box<Self>, record: &mut Record) -> Result<(), cairn_snapshot::Error> {
        let frozen_for = self.frozen_at.elapsed();
        let thawed = self.agent.take().map(|mut a| a.thaw(QUICK));
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
                if let Some(w) = self.watchdog.take() {
                    w.disarm();
                }
                Ok(())
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
    cairn_snapshot::watchdog::serve_with(deadline, |reason| {
        // The agent may still be busy with a freeze the dead process asked for (its hook can
        // take a minute): asked again until it says the guest is thawed.
        let until = Instant::now() + THAW_RETRY;
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
