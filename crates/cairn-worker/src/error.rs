//! The worker's errors: each names the thing and what to do.

use std::path::PathBuf;

/// What went wrong in the long-running agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The agent's configuration file is wrong.
    #[error("agent configuration {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A file of the agent's state or install could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator could not be reached (the agent retries with backoff).
    #[error("cannot reach the coordinator at {url}: {detail}")]
    Unreachable {
        /// Its URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// The coordinator refused a call.
    #[error("the coordinator refused {call} ({status}): {message}")]
    Refused {
        /// The call.
        call: String,
        /// The HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// The agent has no token and no enrollment token to get one.
    #[error(
        "this agent is not enrolled: ask an admin for an enrollment token (cairn-coordinator enroll {host}) and give it with --enroll-token-file at install, or write it to {path}"
    )]
    NotEnrolled {
        /// The agent's host name.
        host: String,
        /// Where the enrollment token is read from.
        path: PathBuf,
    },
    /// Something on the host refused the install or uninstall.
    #[error("{0}")]
    Install(String),
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }

    /// True for a failure worth retrying later (the coordinator is unreachable or failing).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}
