//! The keys of an encrypted vault: opening it with a passphrase or a key file, and the key
//! slots under `keys/` (added create-only, removed by deletion; the config is write-once).

use cairn_format::keyslot::{Argon2Costs, KeySlot, SlotKind, SlotSeed, check_secret};
use cairn_format::{Crypto, MasterKey};
use object_store::path::Path;
use rand::RngExt;
use zeroize::Zeroizing;

use crate::{Error, Vault, layout};

/// A secret that opens an encrypted vault.
#[derive(Clone)]
pub enum Credential {
    /// A passphrase (opens passphrase slots).
    Passphrase(Zeroizing<Vec<u8>>),
    /// A key file's bytes, or a recovery key (opens key-file and recovery slots).
    KeyFile(Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Passphrase(_) => "Credential::Passphrase(..)",
            Credential::KeyFile(_) => "Credential::KeyFile(..)",
        })
    }
}

impl Credential {
    /// The secret's bytes.
    fn secret(&self) -> &[u8] {
        match self {
            Credential::Passphrase(s) | Credential::KeyFile(s) => s,
        }
    }

    /// The slot kinds this credential may open.
    fn opens(&self, kind: SlotKind) -> bool {
        match self {
            Credential::Passphrase(_) => kind == SlotKind::Passphrase,
            Credential::KeyFile(_) => matches!(kind, SlotKind::KeyFile | SlotKind::Recovery),
        }
    }

    /// What to call it in messages.
    fn noun(&self) -> &'static str {
        match self {
            Credential::Passphrase(_) => "passphrase",
            Credential::KeyFile(_) => "key file or recovery key",
        }
    }

    /// The slot kind a new slot for this credential gets.
    fn kind(&self) -> SlotKind {
        match self {
            Credential::Passphrase(_) => SlotKind::Passphrase,
            Credential::KeyFile(_) => SlotKind::KeyFile,
        }
    }
}

/// A new random master key.
pub(crate) fn new_master_key() -> MasterKey {
    MasterKey::from_bytes(rand::rng().random())
}

fn slot_seed(label: String) -> SlotSeed {
    let mut rng = rand::rng();
    SlotSeed {
        id: rng.random(),
        salt: rng.random(),
        nonce: rng.random(),
        created_at: jiff::Timestamp::now(),
        label,
    }
}

/// A new key slot that `credential` (of `kind`, or the credential's own kind) opens.
pub(crate) fn new_slot(
    vault_id: &str,
    master: &MasterKey,
    credential: &Credential,
    kind: Option<SlotKind>,
    costs: Argon2Costs,
    label: String,
) -> Result<KeySlot, Error> {
    let kind = kind.unwrap_or(credential.kind());
    check_secret(kind, credential.secret())?;
    Ok(KeySlot::new(kind, credential.secret(), master, vault_id, costs, slot_seed(label))?)
}

impl Vault {
    /// The key slots of this vault, and the slots that cannot be read (path, reason).
    pub async fn key_slots(&self) -> Result<(Vec<KeySlot>, Vec<(String, String)>), Error> {
        read_slots(self).await
    }

    /// Adds a key slot that `credential` opens (`kind` overrides the credential's own kind,
    /// to mark a recovery key). The vault must have been opened with a key.
    pub async fn add_key(
        &self,
        credential: &Credential,
        kind: Option<SlotKind>,
        costs: Argon2Costs,
        label: String,
    ) -> Result<KeySlot, Error> {
        let master = self.master.as_ref().ok_or(Error::NotEncrypted { url: self.url().into() })?;
        let slot = new_slot(&self.config.vault_id, master, credential, kind, costs, label)?;
        let path = layout::key_slot(&slot.slot);
        self.put_raw_new(&path, slot.encode(), "write").await?;
        Ok(slot)
    }

    /// Removes key slot `id`. The slot this vault was opened with is never removed (open the
    /// vault with another key to remove it): a slot known to open the vault always remains.
    /// Removing a slot is not revocation: the master key stays the same, so whoever kept a
    /// copy of the slot and its secret can still open the vault.
    pub async fn remove_key(&self, id: &str) -> Result<(), Error> {
        if self.master.is_none() {
            return Err(Error::NotEncrypted { url: self.url().into() });
        }
        if self.unlocked_by.as_deref() == Some(id) {
            return Err(Error::LastKey { id: id.into() });
        }
        let (slots, _) = self.key_slots().await?;
        if !slots.iter().any(|s| s.slot == id) {
            return Err(Error::NoSuchKey { id: id.into() });
        }
        if slots.len() == 1 {
            return Err(Error::LastKey { id: id.into() });
        }
        self.delete_all(&[layout::key_slot(id)]).await
    }
}

/// The largest key slot read (a slot is a few hundred bytes).
const MAX_SLOT_BYTES: u64 = 64 << 10;

/// Key slots an unlock tries at most.
const MAX_SLOTS_TRIED: usize = 32;

/// What opening a slot costs, in KiB-passes of Argon2id (0 for the HMAC of a key file).
fn slot_cost(slot: &KeySlot) -> u64 {
    match &slot.kdf {
        cairn_format::keyslot::Kdf::Argon2id { memory_kib, iterations, .. } => {
            u64::from(*memory_kib) * u64::from(*iterations)
        }
        cairn_format::keyslot::Kdf::HmacSha256 { .. } => 0,
    }
}

/// Reads every slot under `keys/`.
async fn read_slots(vault: &Vault) -> Result<(Vec<KeySlot>, Vec<(String, String)>), Error> {
    let mut slots = Vec::new();
    let mut unreadable = Vec::new();
    for path in vault.list_paths(&Path::from(layout::KEYS)).await? {
        let Some(bytes) = vault.get_small(&path, MAX_SLOT_BYTES).await? else { continue };
        match KeySlot::decode(&bytes) {
            Ok(slot) if layout::key_slot(&slot.slot) == path => slots.push(slot),
            Ok(slot) => unreadable.push((path.to_string(), format!("it names slot {}", slot.slot))),
            Err(e) => unreadable.push((path.to_string(), e.to_string())),
        }
    }
    Ok((slots, unreadable))
}

/// Opens the master key of the vault `vault` (assembled without keys) with `credential`,
/// checked against the config's key check.
pub(crate) async fn unlock(
    vault: &Vault,
    credential: &Credential,
) -> Result<(MasterKey, Crypto, String), Error> {
    let url = vault.url().to_string();
    let (slots, unreadable) = read_slots(vault).await?;
    for (path, why) in &unreadable {
        tracing::warn!(%path, "unreadable key slot: {why}");
    }
    // Cheapest first, and a bounded number: slots come from the bucket, and whoever writes
    // there must not make an unlock run for hours.
    let mut candidates: Vec<&KeySlot> = slots.iter().filter(|s| credential.opens(s.kind)).collect();
    candidates.sort_by_key(|s| (slot_cost(s), s.created_at));
    candidates.truncate(MAX_SLOTS_TRIED);
    if candidates.is_empty() {
        return Err(Error::WrongKey {
            url,
            detail: format!(
                "it has no key slot for a {} ({} slot(s) of other kinds)",
                credential.noun(),
                slots.len()
            ),
        });
    }
    let vault_id = vault.config.vault_id.clone();
    for slot in &candidates {
        let secret = Zeroizing::new(credential.secret().to_vec());
        let (slot_copy, id) = ((*slot).clone(), vault_id.clone());
        // Argon2id is slow on purpose: off the runtime's threads.
        let opened = tokio::task::spawn_blocking(move || slot_copy.open(&secret, &id))
            .await
            .map_err(|e| Error::Io { path: "key slot".into(), source: std::io::Error::other(e) })?;
        let master = match opened {
            Ok(Some(master)) => master,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(slot = %slot.slot, "key slot cannot be used: {e}");
                continue;
            }
        };
        let crypto = Crypto::from_master(&master);
        if !vault.config.checks_with(&crypto) {
            return Err(Error::KeyMismatch { url, slot: slot.slot.clone() });
        }
        return Ok((master, crypto, slot.slot.clone()));
    }
    Err(Error::WrongKey {
        url,
        detail: format!(
            "no key slot opens with this {} ({} tried)",
            credential.noun(),
            candidates.len()
        ),
    })
}
