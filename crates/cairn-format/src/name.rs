//! Names of VMs and disks: they become parts of object paths, so they are checked.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A VM or disk name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
///
/// A disk's name is its identity within its VM and is stable across backups; it never comes
/// from the path that happens to be read.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_chars = s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        let ok_start = !s.starts_with(['.', '-']);
        if s.is_empty() || s.len() > 64 || !ok_chars || !ok_start {
            return Err(Error::Invalid {
                what: "name",
                detail: format!(
                    "{s:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ -, not starting with . or -"
                ),
            });
        }
        Ok(Name(s.to_owned()))
    }
}

impl TryFrom<String> for Name {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        for good in ["web-01", "sda", "disk_1.raw", "A"] {
            assert!(good.parse::<Name>().is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(bad.parse::<Name>().is_err(), "{bad}");
        }
    }
}
