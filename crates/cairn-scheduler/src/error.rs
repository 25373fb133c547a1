//! The scheduler's errors: each names the thing and what to do.

/// What went wrong on the coordinator side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another coordinator holds the database.
    #[error(
        "the catalogue {path} is held by another coordinator: run one coordinator per database, or stop the other"
    )]
    Held {
        /// The database file.
        path: String,
    },
    /// The database was written by a newer coordinator.
    #[error(
        "the catalogue {path} is at schema version {found}, newer than this coordinator's {known}: upgrade the coordinator"
    )]
    TooNew {
        /// The database file.
        path: String,
        /// Its version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// SQLite failed.
    #[error("catalogue {what}: {source}")]
    Sql {
        /// What was being done.
        what: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A policy or schedule is invalid.
    #[error(transparent)]
    Policy(#[from] cairn_policy::Error),
    /// A request the catalogue refuses as it stands (the message says what to do).
    #[error("{0}")]
    Refused(String),
    /// The local user file cannot be used.
    #[error("the users file {path}: {message}")]
    UsersFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, and where.
        message: String,
    },
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The HTTP server stopped with an error.
    #[error("the API server failed: {0}")]
    Serve(String),
    /// Something named does not exist.
    #[error("no {kind} named {name:?}: {hint}")]
    Unknown {
        /// `VM`, `policy`, `job`...
        kind: &'static str,
        /// The name given.
        name: String,
        /// How to list what exists.
        hint: &'static str,
    },
}

impl Error {
    pub(crate) fn sql(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
        let what = what.into();
        move |source| Error::Sql { what, source }
    }
}
