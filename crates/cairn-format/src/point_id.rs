//! Recovery-point ids: sortable by time, unique in a vault.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;

use crate::Error;

/// A recovery point's id, `YYYYMMDDTHHMMSS.mmmZ-xxxxxxxx`: the UTC start time to the
/// millisecond, then 8 hex digits of randomness.
///
/// Ids sort in time order as plain strings, so object listings come back chronological; the
/// random tail keeps two agents that start in the same millisecond apart.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PointId(String);

const LEN: usize = "20261122T021720.123Z-0123abcd".len();

impl PointId {
    /// The id for a point started at `started` with random tail `nonce`.
    pub fn new(started: Timestamp, nonce: u32) -> PointId {
        let dt = started.to_zoned(jiff::tz::TimeZone::UTC);
        let text = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z-{nonce:08x}",
            dt.year(),
            dt.month(),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            dt.millisecond()
        );
        PointId(text)
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PointId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape_ok = s.len() == LEN
            && s.bytes().enumerate().all(|(i, b)| match i {
                8 => b == b'T',
                15 => b == b'.',
                19 => b == b'Z',
                20 => b == b'-',
                21.. => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
                _ => b.is_ascii_digit(),
            });
        if !shape_ok {
            return Err(Error::Invalid {
                what: "point id",
                detail: format!("{s:?} is not of the form 20261122T021720.123Z-0123abcd"),
            });
        }
        Ok(PointId(s.to_owned()))
    }
}

impl TryFrom<String> for PointId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PointId> for String {
    fn from(p: PointId) -> String {
        p.0
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_and_sorts() {
        let a: Timestamp = "2026-11-22T02:17:20.123Z".parse().unwrap();
        let b: Timestamp = "2026-11-22T02:17:20.124Z".parse().unwrap();
        let pa = PointId::new(a, 0xffff_ffff);
        let pb = PointId::new(b, 0);
        assert_eq!(pa.as_str(), "20261122T021720.123Z-ffffffff");
        assert!(pa < pb);
        assert_eq!(pa.as_str().parse::<PointId>().unwrap(), pa);
    }

    proptest! {
        #[test]
        fn round_trips(secs in 0i64..4_000_000_000, ms in 0i64..1000, nonce: u32) {
            let ts = Timestamp::from_millisecond(secs * 1000 + ms).unwrap();
            let id = PointId::new(ts, nonce);
            prop_assert_eq!(id.as_str().parse::<PointId>().unwrap(), id);
        }

        #[test]
        fn parse_never_panics(s: String) {
            let _ = s.parse::<PointId>();
        }
    }
}
