//! Time for both sides: the system's clock, or a file's for tests that compress days into
//! seconds (the coordinator's `--fake-clock`, the agent's too, so both agree).

use std::path::PathBuf;
use std::sync::Mutex;

use jiff::Timestamp;

/// Where time comes from: the system's clock, or in tests one that compresses days.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock read from a file holding an RFC 3339 time, for tests that compress days into
/// seconds: whoever writes the file moves time. Unreadable: the last time read.
pub struct FileClock {
    path: PathBuf,
    last: Mutex<Timestamp>,
}

impl FileClock {
    /// A clock reading `path`.
    pub fn new(path: PathBuf) -> FileClock {
        FileClock { path, last: Mutex::new(Timestamp::UNIX_EPOCH) }
    }
}

impl Clock for FileClock {
    fn now(&self) -> Timestamp {
        let read = std::fs::read_to_string(&self.path).ok().and_then(|t| t.trim().parse().ok());
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = read {
            *last = t;
        }
        *last
    }
}
