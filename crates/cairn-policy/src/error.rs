//! The policy errors. Each names the field and what to write instead.

/// What is wrong with a policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A time zone the bundled database does not know.
    #[error(
        "unknown time zone {name:?}: give an IANA name such as \"Europe/Amsterdam\" or \"UTC\""
    )]
    UnknownTimeZone {
        /// The name given.
        name: String,
    },
    /// A duration that cannot be read.
    #[error(
        "cannot read the duration {input:?} ({detail}): write it as \"14d\", \"36h\", \"6mo\", \
         \"1y 6mo\" or ISO 8601 \"P14D\" (\"m\" means minutes, \"mo\" months)"
    )]
    BadDuration {
        /// What was given.
        input: String,
        /// Why it was refused.
        detail: String,
    },
    /// A retention with no rule at all would expire every point.
    #[error(
        "no retention rule given: name at least one of keep-last, keep-hourly, keep-daily, \
         keep-weekly, keep-monthly, keep-yearly, keep-within (a policy that keeps nothing is \
         refused)"
    )]
    NoRules,
    /// A field of a policy or schedule is missing, malformed or out of range.
    #[error("{field}: {message}")]
    Field {
        /// The field, as written in the policy file (`schedule.times[0]`).
        field: String,
        /// What is wrong and what to write instead.
        message: String,
    },
}
