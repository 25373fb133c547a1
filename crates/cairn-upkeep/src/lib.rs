//! The coordinator's hands on its vaults. Agents only add to vaults (they open them
//! append-only); the coordinator alone holds the rights to prune, collect and delete, with the
//! keys named in its vaults file ([`VaultsFile`]). [`VaultSet`] is the scheduler's
//! [`cairn_scheduler::VaultKeeper`]: the scheduler decides when upkeep runs and keeps one
//! operation at a time per vault; this crate does the work with `cairn-backup`'s prune and
//! `cairn-vault`'s gc, and reads what a vault holds for `rescan`.

mod error;
mod keeper;
mod vaults_file;

pub use error::Error;
pub use keeper::VaultSet;
pub use vaults_file::{UpkeepSection, VaultEntry, VaultsFile};
