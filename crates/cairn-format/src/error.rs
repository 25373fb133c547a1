//! The one error type of the format crate.

/// What went wrong while decoding or validating Cairn's bytes.
///
/// Every variant names the object kind (`what`) so that callers can add *which* object
/// (its path or id) and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes end before the structure does.
    #[error("{what} is truncated: needed {needed} more bytes at offset {offset}")]
    Truncated {
        /// The kind of object being decoded.
        what: &'static str,
        /// Where decoding stopped.
        offset: usize,
        /// How many more bytes were needed.
        needed: usize,
    },
    /// The bytes are not what they claim to be (bad magic, bad CRC, inconsistent fields).
    #[error("{what} is corrupt: {detail}")]
    Corrupt {
        /// The kind of object being decoded.
        what: &'static str,
        /// What exactly is wrong.
        detail: String,
    },
    /// A value is well-formed but not allowed (a bad name, an out-of-range block size).
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// The kind of value.
        what: &'static str,
        /// Why it is refused.
        detail: String,
    },
    /// The bytes use a version or feature this build does not know; a newer Cairn may.
    #[error("{what} uses {detail}, which this version of Cairn does not support; upgrade Cairn")]
    Unsupported {
        /// The kind of object.
        what: &'static str,
        /// The unknown version or feature.
        detail: String,
    },
    /// The bytes are in a format an earlier Cairn wrote that this version no longer reads.
    #[error("{what} is {detail}; create a new vault")]
    Obsolete {
        /// The kind of object.
        what: &'static str,
        /// What it is, and why it is not read.
        detail: String,
    },
    /// A JSON document (manifest, config, marker) could not be parsed.
    #[error("{what} is not valid: {source}")]
    Json {
        /// The kind of document.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub(crate) fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Corrupt { what, detail: detail.into() }
    }
}
