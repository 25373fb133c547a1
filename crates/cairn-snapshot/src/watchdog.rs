//! The thaw watchdog: a separate process that thaws frozen file systems if the agent does
//! not say in time that it thawed them itself.
//!
//! A writer to a frozen file system hangs, unkillable, until the thaw; if the agent died
//! while file systems were frozen, the VM would hang with it. A thread of the agent cannot
//! help when the agent is killed with `kill -9`, so the watchdog is another process. The
//! protocol is a pipe: the agent starts the watchdog with the mount points and a deadline,
//! waits for it to print `armed`, freezes, and after its own thaw writes `thawed`. When the
//! deadline passes first, or the pipe closes without `thawed` (the agent exited, crashed or
//! was killed), the watchdog thaws every mount point itself; past its deadline it keeps
//! thawing them until the agent is gone, so nothing the agent freezes late stays frozen.
//! The watchdog runs in its own process group and ignores SIGTERM, SIGINT and SIGHUP, so
//! whatever stops the agent short of SIGKILL does not stop it first (under systemd, use
//! `KillMode=process`, so that a stop ending in SIGKILL kills the agent alone).
//!
//! The watchdog is the agent's own executable with a hidden subcommand; embedders name
//! theirs in [`WatchdogCommand`] and call [`serve`] from it.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::{Error, sys};

/// How long the agent waits for a new watchdog to report `armed`.
const ARM_TIMEOUT: Duration = Duration::from_secs(10);

/// The program that serves as watchdog, and the arguments that select that role; the
/// deadline in milliseconds and the mount points are appended.
#[derive(Clone, Debug)]
pub struct WatchdogCommand {
    /// The executable.
    pub program: PathBuf,
    /// Arguments before the deadline and mount points.
    pub args: Vec<OsString>,
}

/// A running, armed watchdog.
pub struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts a watchdog for `mounts` and waits until it is armed.
    pub fn arm(
        command: &WatchdogCommand,
        deadline: Duration,
        mounts: &[PathBuf],
    ) -> Result<Watchdog, Error> {
        let targets: Vec<OsString> = mounts.iter().map(|m| m.clone().into_os_string()).collect();
        Watchdog::arm_for(command, deadline, &targets)
    }

    /// Starts a watchdog with its own `targets` after the deadline (what a [`serve_with`]
    /// role reads: mount points, or a guest agent's socket), and waits until it is armed.
    pub fn arm_for(
        command: &WatchdogCommand,
        deadline: Duration,
        targets: &[OsString],
    ) -> Result<Watchdog, Error> {
        let fail = |detail: String| Error::Watchdog { detail };
        let mut child = Command::new(&command.program)
            .args(&command.args)
            .arg(deadline.as_millis().to_string())
            .args(targets)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| fail(format!("{}: {e}", command.program.display())))?;
        let stdout = child.stdout.take().ok_or_else(|| fail("no stdout pipe".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut watchdog = Watchdog { stdin: child.stdin.take(), child };
        let problem = match rx.recv_timeout(ARM_TIMEOUT) {
            Ok(line) if line.trim() == "armed" => return Ok(watchdog),
            Ok(line) => format!("it answered {:?} instead of \"armed\"", line.trim()),
            Err(_) => format!("it did not report armed within {ARM_TIMEOUT:?}"),
        };
        // Nothing was frozen: it must not go on to thaw anything.
        let _ = watchdog.child.kill();
        Err(fail(problem))
    }

    /// Tells the watchdog the agent thawed everything itself, and waits for it to exit.
    pub fn disarm(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"thawed\n");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing the pipe without "thawed" makes the watchdog thaw at once. Its exit is
        // awaited a while, not forever: a watchdog still retrying a thaw goes on alone.
        drop(self.stdin.take());
        let until = std::time::Instant::now() + DROP_WAIT;
        while std::time::Instant::now() < until {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How long dropping a watchdog waits for it to finish thawing.
const DROP_WAIT: Duration = Duration::from_secs(15);

/// The watchdog's side: `args` are the deadline in milliseconds and the mount points.
/// Returns the process exit code: 0 when disarmed, 1 when it had to thaw, 2 on bad usage.
/// It ignores SIGTERM, SIGINT and SIGHUP.
pub fn serve(args: &[OsString]) -> i32 {
    let Some((deadline, mounts)) = args.split_first() else {
        say(format_args!("usage: DEADLINE_MS MOUNT..."));
        return 2;
    };
    let Some(deadline) = parse_deadline(deadline) else {
        say(format_args!("bad deadline {deadline:?}"));
        return 2;
    };
    let mut dirs = Vec::new();
    for mount in mounts {
        match File::open(mount) {
            Ok(dir) => dirs.push((PathBuf::from(mount), dir)),
            Err(e) => {
                say(format_args!("cannot open {}: {e}", PathBuf::from(mount).display()));
                return 2;
            }
        }
    }
    let thaw_all = |reason: &str| {
        for (path, dir) in &dirs {
            match sys::thaw(dir) {
                Ok(()) => say(format_args!("thawed {} ({reason})", path.display())),
                // EINVAL: it was not frozen (the agent thawed it, or never froze it).
                Err(e) if e.raw_os_error() == Some(22) => {}
                Err(e) => say(format_args!("cannot thaw {}: {e}", path.display())),
            }
        }
    };
    serve_with(deadline, thaw_all)
}

/// Parses a deadline argument in milliseconds.
pub fn parse_deadline(arg: &std::ffi::OsStr) -> Option<Duration> {
    arg.to_str().and_then(|d| d.parse().ok()).map(Duration::from_millis)
}

/// The watchdog's protocol around any way to thaw: prints `armed`, then calls `thaw_all`
/// (with the reason) when the pipe closes without `thawed` or the deadline passes, and again
/// every 200 ms past the deadline until the agent is gone. Returns the exit code (0 when
/// disarmed, 1 when it had to thaw, 2 when it could not report armed).
pub fn serve_with(deadline: Duration, thaw_all: impl Fn(&str)) -> i32 {
    // Whatever stops the agent (ctrl-C, `systemctl stop`, a hang-up) must not stop the
    // watchdog; only SIGKILL can.
    sys::ignore_termination_signals();
    if writeln!(std::io::stdout(), "armed").and_then(|()| std::io::stdout().flush()).is_err() {
        return 2;
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(read.ok().filter(|n| *n > 0).map(|_| line));
    });
    match rx.recv_timeout(deadline) {
        Ok(Some(line)) if line.trim() == "thawed" => return 0,
        Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            thaw_all("the agent exited without thawing");
            return 1;
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            thaw_all(&format!("the {} ms deadline passed", deadline.as_millis()));
        }
    }
    // Past the deadline the agent is not to be trusted with a freeze: whatever it freezes
    // from now on (a mount later in its list, say) is thawed again, until it goes away.
    loop {
        match rx.recv_timeout(LATE_THAW_INTERVAL) {
            Err(mpsc::RecvTimeoutError::Timeout) => thaw_all("the deadline had passed"),
            _ => {
                thaw_all("the agent exited after the deadline");
                return 1;
            }
        }
    }
}

/// Writes a line to standard error, ignoring failure: a closed pipe or a hung-up terminal
/// must never stop the watchdog in the middle of thawing (`eprintln!` would panic).
pub fn say(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "cairn watchdog: {message}");
}

/// How often a watchdog past its deadline thaws again.
const LATE_THAW_INTERVAL: Duration = Duration::from_millis(200);
