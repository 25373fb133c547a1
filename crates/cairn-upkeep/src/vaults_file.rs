//! The coordinator's vaults file (TOML): the vaults it prunes and collects, with their keys,
//! and when upkeep runs.
//!
//! ```toml
//! [upkeep]
//! grace-hours = 336          # soft-deleted points are purged after this (default 14 days)
//! [upkeep.schedule]          # when prune and gc run on each vault (default daily 03:00 UTC)
//! kind = "daily"
//! times = ["03:00"]
//!
//! [vaults.main]              # the name VMs are protected into
//! url = "s3://backups/cairn"
//! key-file = "/etc/cairn/main.key"
//! options = { aws_endpoint = "http://127.0.0.1:5000" }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use cairn_policy::{Schedule, ScheduleSpec};
use jiff::SignedDuration;
use serde::Deserialize;

use crate::Error;

/// The largest vaults file read.
const MAX_FILE: u64 = 1 << 20;

/// The vaults file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VaultsFile {
    /// When upkeep runs and how long deleted points wait.
    #[serde(default)]
    pub upkeep: UpkeepSection,
    /// The vaults by name.
    pub vaults: BTreeMap<String, VaultEntry>,
}

/// `[upkeep]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UpkeepSection {
    /// When upkeep runs (default daily at 03:00 UTC).
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// Hours a soft-deleted point waits before it is purged (default 14 days).
    #[serde(default)]
    pub grace_hours: Option<u32>,
}

pub use cairn_protocol::VaultEntry;

impl VaultsFile {
    /// Reads and checks the file at `path`; errors name the field.
    pub fn load(path: &Path) -> Result<VaultsFile, Error> {
        use std::io::Read;
        let shown = path.display().to_string();
        let read = |source| Error::Read { path: shown.clone(), source };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_FILE {
            return Err(Error::Invalid {
                path: shown,
                message: format!("larger than {MAX_FILE} bytes: not a vaults file"),
            });
        }
        VaultsFile::parse(&text).map_err(|message| Error::Invalid { path: shown, message })
    }

    /// Parses and checks the text of a vaults file.
    pub fn parse(text: &str) -> Result<VaultsFile, String> {
        let file: VaultsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.vaults.is_empty() {
            return Err("no [vaults.NAME] section: name at least one vault".into());
        }
        for name in file.vaults.keys() {
            name.parse::<cairn_format::Name>().map_err(|e| format!("[vaults.{name}]: {e}"))?;
        }
        let mut urls = std::collections::BTreeSet::new();
        for (name, entry) in &file.vaults {
            // Two names for one vault would take two locks: a prune beside a gc.
            if !urls.insert(entry.url.trim_end_matches('/')) {
                return Err(format!(
                    "[vaults.{name}]: url is the same as another vault's; name each vault once"
                ));
            }
        }
        if file.upkeep.grace_hours == Some(0) {
            return Err("[upkeep] grace-hours must be at least 1: an expired point stays restorable (undelete) that long".into());
        }
        file.schedule().map_err(|e| format!("[upkeep] {e}"))?;
        Ok(file)
    }

    /// When upkeep runs.
    pub fn schedule(&self) -> Result<Schedule, cairn_policy::Error> {
        let spec = self.upkeep.schedule.clone().unwrap_or_else(|| ScheduleSpec {
            kind: "daily".into(),
            times: vec!["03:00".into()],
            ..ScheduleSpec::default()
        });
        spec.check()
    }

    /// How long a soft-deleted point waits before it is purged.
    pub fn grace(&self) -> SignedDuration {
        self.upkeep
            .grace_hours
            .map_or(cairn_vault::DEFAULT_GRACE, |h| SignedDuration::from_hours(i64::from(h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_file_and_its_defaults() {
        let f = VaultsFile::parse(
            "[upkeep]\ngrace-hours = 2\n[upkeep.schedule]\nkind = \"daily\"\ntimes = [\"04:30\"]\n\
             [vaults.main]\nurl = \"file:///tmp/v\"\nkey-file = \"/k\"\n",
        )
        .unwrap();
        assert_eq!(f.grace(), SignedDuration::from_hours(2));
        assert_eq!(f.vaults["main"].key_file.as_deref(), Some(Path::new("/k")));
        let f = VaultsFile::parse("[vaults.main]\nurl = \"file:///tmp/v\"\n").unwrap();
        assert_eq!(f.grace(), cairn_vault::DEFAULT_GRACE);
        let at = "2026-06-01T12:00:00Z".parse().unwrap();
        assert_eq!(
            f.schedule().unwrap().next_after(at).unwrap().to_string(),
            "2026-06-02T03:00:00Z"
        );
    }

    #[test]
    fn bad_files_name_what_is_wrong() {
        for (text, needle) in [
            ("", "missing field `vaults`"),
            ("[vaults]\n", "no [vaults.NAME]"),
            ("[vaults.main]\n", "missing field `url`"),
            ("[vaults.main]\nurl = \"x\"\nkey = \"k\"\n", "unknown field `key`"),
            ("[vaults.\"a b\"]\nurl = \"x\"\n", "[vaults.a b]"),
            (
                "[upkeep.schedule]\nkind = \"daily\"\ntimes = [\"25:00\"]\n[vaults.m]\nurl = \"x\"\n",
                "schedule.times",
            ),
            ("[upkeep]\ngrace-hours = -1\n[vaults.m]\nurl = \"x\"\n", "grace-hours"),
            ("[upkeep]\ngrace-hours = 0\n[vaults.m]\nurl = \"x\"\n", "at least 1"),
            (
                "[vaults.a]\nurl = \"s3://b/p\"\n[vaults.b]\nurl = \"s3://b/p/\"\n",
                "[vaults.b]: url is the same",
            ),
        ] {
            let e = VaultsFile::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
