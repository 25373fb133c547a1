//! The agent's configuration file (TOML, `/etc/cairn/agent.toml` by default).
//!
//! ```toml
//! coordinator = "http://coordinator.example:8470"
//! host = "kvm-1"                       # the agent's name: the coordinator places VMs on it
//! state-dir = "/var/lib/cairn"         # token, cached schedule, reports not yet delivered
//! enroll-token-file = "/etc/cairn/enroll-token"  # read once, at the first contact
//! coordinator-ca = "/etc/cairn/coordinator-ca.pem"  # for a coordinator with its own CA
//! max-jobs = 2                         # jobs at once on this host
//! max-transfers = 1                    # of those, transfers to vaults at once
//! transfer-mib-per-second = 100        # uploads of every transfer together (default: no limit)
//! restore-dir = "/var/lib/cairn/restores"  # restore jobs write here (default: state-dir/restores)
//!
//! [vms.web-1]                          # the VMs this host backs up, by the coordinator's name
//! config = "/etc/cairn/vms/web-1.toml" # the VM's configuration (disks, freeze, scripts)
//!
//! [vaults.main]                        # the vaults, by the coordinator's name
//! url = "s3://backups/cairn"
//! key-file = "/etc/cairn/main.key"     # for an encrypted vault
//! options = { aws_region = "eu-west-1" }
//! ```
//!
//! The coordinator names VMs and vaults; only this file says which files and URLs those names
//! open, so a coordinator (or whoever speaks for it) cannot make the agent read another disk
//! or write to another place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The agent's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentConfig {
    /// The coordinator's URL (`http://` or `https://`).
    pub coordinator: String,
    /// The agent's name: its host's, as the coordinator places VMs.
    pub host: String,
    /// A PEM certificate to trust for an https:// coordinator (its own CA, or its
    /// certificate), besides the system's roots.
    #[serde(default)]
    pub coordinator_ca: Option<PathBuf>,
    /// Where the agent keeps its token, cached schedule and undelivered reports.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The one-time enrollment token, read at the first contact.
    #[serde(default)]
    pub enroll_token_file: Option<PathBuf>,
    /// Jobs at once on this host.
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    /// How long a poll may wait at the coordinator for a job.
    #[serde(default = "default_poll_wait")]
    pub poll_wait_seconds: u64,
    /// Transfers to vaults at once (a job's second phase); snapshots wait in a queue.
    #[serde(default = "default_max_transfers")]
    pub max_transfers: usize,
    /// The host's upload bandwidth for all transfers together, MiB a second (none: no limit).
    #[serde(default)]
    pub transfer_mib_per_second: Option<u64>,
    /// Where restore jobs write, each into a new folder the coordinator names (default:
    /// `restores` in the state folder).
    #[serde(default)]
    pub restore_dir: Option<PathBuf>,
    /// The VMs this host backs up.
    #[serde(default)]
    pub vms: BTreeMap<String, VmEntry>,
    /// The vaults this host writes to.
    #[serde(default)]
    pub vaults: BTreeMap<String, VaultEntry>,
}

/// One VM the agent backs up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmEntry {
    /// The VM's configuration file (the `cairn-agent backup --config` format).
    pub config: PathBuf,
}

pub use cairn_protocol::VaultEntry;

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/cairn")
}

fn default_max_jobs() -> usize {
    2
}

fn default_max_transfers() -> usize {
    1
}

fn default_poll_wait() -> u64 {
    25
}

/// The names the coordinator accepts for hosts, VMs and vaults: those a vault accepts.
pub(crate) fn name_ok(name: &str) -> bool {
    name.parse::<cairn_format::Name>().is_ok()
}

impl AgentConfig {
    /// Where restore jobs write.
    pub fn restore_dir(&self) -> PathBuf {
        self.restore_dir.clone().unwrap_or_else(|| self.state_dir.join("restores"))
    }

    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<AgentConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(Error::io("reading", path))?;
        AgentConfig::parse(&text, path)
    }

    /// Parses and checks `text` (read from `path`, for messages).
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, Error> {
        let bad = |message: String| Error::Config { path: path.to_owned(), message };
        let config: AgentConfig = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if !(config.coordinator.starts_with("http://")
            || config.coordinator.starts_with("https://"))
        {
            return Err(bad(format!(
                "coordinator = {:?}: give the coordinator's http:// or https:// URL",
                config.coordinator
            )));
        }
        if !name_ok(&config.host) {
            return Err(bad(format!(
                "host = {:?}: 1 to 64 letters, digits, '-', '_' or '.'",
                config.host
            )));
        }
        if config.coordinator_ca.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(bad("coordinator-ca: give an absolute path".into()));
        }
        if !config.state_dir.is_absolute() {
            return Err(bad(format!("state-dir = {:?}: give an absolute path", config.state_dir)));
        }
        if !(1..=64).contains(&config.max_jobs) {
            return Err(bad(format!("max-jobs = {}: give 1 to 64", config.max_jobs)));
        }
        if !(1..=64).contains(&config.max_transfers) {
            return Err(bad(format!("max-transfers = {}: give 1 to 64", config.max_transfers)));
        }
        if config.transfer_mib_per_second == Some(0) {
            return Err(
                bad("transfer-mib-per-second = 0: give at least 1, or leave it out".into()),
            );
        }
        if config.restore_dir.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(bad("restore-dir: give an absolute path".into()));
        }
        if config.poll_wait_seconds > 60 {
            return Err(bad(format!(
                "poll-wait-seconds = {}: at most 60",
                config.poll_wait_seconds
            )));
        }
        for (name, vm) in &config.vms {
            if !name_ok(name) {
                return Err(bad(format!("[vms.{name:?}]: not a VM name")));
            }
            if !vm.config.is_absolute() {
                return Err(bad(format!("[vms.{name}] config: give an absolute path")));
            }
        }
        for (name, vault) in &config.vaults {
            if !name_ok(name) {
                return Err(bad(format!("[vaults.{name:?}]: not a vault name")));
            }
            if vault.url.is_empty() {
                return Err(bad(format!("[vaults.{name}] url: give the vault's URL")));
            }
            for file in [&vault.key_file, &vault.passphrase_file].into_iter().flatten() {
                if !file.is_absolute() {
                    return Err(bad(format!("[vaults.{name}] {file:?}: give an absolute path")));
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
coordinator = "http://127.0.0.1:8470"
host = "kvm-1"
state-dir = "/var/lib/cairn"
[vms.web-1]
config = "/etc/cairn/vms/web-1.toml"
[vaults.main]
url = "/srv/vault"
options = { aws_region = "eu-west-1" }
"#;

    fn parse(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(text, Path::new("agent.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_file_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.max_jobs, 2);
        assert_eq!(c.poll_wait_seconds, 25);
        assert_eq!(c.vms["web-1"].config, PathBuf::from("/etc/cairn/vms/web-1.toml"));
        assert_eq!(c.vaults["main"].options["aws_region"], "eu-west-1");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (GOOD.replace("http://127", "ftp://127"), "coordinator"),
            (GOOD.replace("\"kvm-1\"", "\"kvm 1\""), "host"),
            (GOOD.replace("\"/var/lib/cairn\"", "\"var\""), "state-dir"),
            (GOOD.replace("/etc/cairn/vms/web-1.toml", "web-1.toml"), "[vms.web-1] config"),
            (GOOD.replace("url = \"/srv/vault\"", "url = \"\""), "[vaults.main] url"),
            (GOOD.replace("[vms.web-1]", "max-jobs = 0\n[vms.web-1]"), "max-jobs"),
            (GOOD.replace("[vms.web-1]", "max-transfers = 0\n[vms.web-1]"), "max-transfers"),
            (
                GOOD.replace("[vms.web-1]", "transfer-mib-per-second = 0\n[vms.web-1]"),
                "transfer-mib-per-second",
            ),
            (GOOD.replace("host =", "hots ="), "unknown field `hots`"),
            (GOOD.replace("[vms.web-1]", "restore-dir = \"r\"\n[vms.web-1]"), "restore-dir"),
            (GOOD.replace("[vms.web-1]", "[vms.\"../x\"]"), "not a VM name"),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
