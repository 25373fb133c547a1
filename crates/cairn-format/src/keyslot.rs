//! Key slots: the master key of an encrypted vault, wrapped once per way to open it.
//!
//! A slot is a JSON object `keys/<slot id>.json`, written create-only and deleted to remove the
//! slot (the vault config is write-once, so slots live beside it). Each holds the master key
//! encrypted (AES-256-GCM) under a key-encryption key derived from a secret:
//! - a passphrase, through Argon2id (memory-hard, parameters and salt in the slot);
//! - a key file or a recovery key (32 random bytes or more), through HMAC-SHA256 with the slot's
//!   salt: the secret is already a key, a slow KDF would add nothing.
//!
//! Adding, removing or rotating a slot rewraps the master key and rewrites no data. A secret
//! opens a slot or it does not: the AEAD tag tells, so a wrong passphrase is one clear error.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;
use crate::crypto::{MasterKey, prf};
use crate::manifest::decode_json_formats;

/// The key-slot format this build writes and reads.
pub const KEY_SLOT_FORMAT: u32 = 1;
const WHAT: &str = "key slot";

/// Argon2id cost ceilings a slot may ask for: a slot comes from the bucket, and whoever can
/// write there must not make an unlock allocate without bound or run for hours.
const MAX_MEMORY_KIB: u32 = 4 << 20;
const MAX_ITERATIONS: u32 = 64;
const MAX_PARALLELISM: u32 = 16;

/// What kind of secret opens a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotKind {
    /// A passphrase (Argon2id).
    Passphrase,
    /// A key file's bytes.
    KeyFile,
    /// A recovery key printed at its creation (used like a key file).
    Recovery,
}

impl SlotKind {
    /// True if `secret` of kind `self` goes through Argon2id.
    fn is_passphrase(self) -> bool {
        self == SlotKind::Passphrase
    }
}

/// How the key-encryption key is derived from the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm")]
pub enum Kdf {
    /// Argon2id (version 0x13) with these costs; `salt` is hex.
    #[serde(rename = "argon2id")]
    Argon2id {
        /// Memory, KiB.
        memory_kib: u32,
        /// Passes.
        iterations: u32,
        /// Lanes.
        parallelism: u32,
        /// 16 or more random bytes, hex.
        salt: String,
    },
    /// HMAC-SHA256(secret, salt); `salt` is hex.
    #[serde(rename = "hmac-sha256")]
    HmacSha256 {
        /// 16 or more random bytes, hex.
        salt: String,
    },
}

/// Argon2id costs for new passphrase slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Argon2Costs {
    /// Memory, KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for Argon2Costs {
    /// 64 MiB, 3 passes, 1 lane: above OWASP's minimum for Argon2id (19 MiB, 2 passes), about
    /// a fifth of a second here (`docs/performance.md`).
    fn default() -> Self {
        Argon2Costs { memory_kib: 64 * 1024, iterations: 3, parallelism: 1 }
    }
}

/// One key slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlot {
    /// [`KEY_SLOT_FORMAT`].
    pub format: u32,
    /// The slot's id: 16 random hex digits, also its object name.
    pub slot: String,
    /// What opens it.
    pub kind: SlotKind,
    /// When it was added.
    pub created_at: Timestamp,
    /// A note for people (`key list` shows it).
    #[serde(default)]
    pub label: String,
    /// How its key-encryption key is derived.
    pub kdf: Kdf,
    /// The master key, wrapped: hex of nonce (12) || ciphertext (32) || tag (16).
    pub wrapped: String,
}

/// What a new slot is made of besides its secret, from the caller (this crate does no I/O):
/// randomness, time and a label.
#[derive(Clone, Debug)]
pub struct SlotSeed {
    /// The slot id (8 random bytes; shown as 16 hex digits).
    pub id: [u8; 8],
    /// The KDF salt (random).
    pub salt: [u8; 16],
    /// The wrapping nonce (random).
    pub nonce: [u8; 12],
    /// When the slot is added.
    pub created_at: Timestamp,
    /// A note for people.
    pub label: String,
}

impl KeySlot {
    /// A slot of `kind` for `vault_id` that `secret` opens, wrapping `master`.
    pub fn new(
        kind: SlotKind,
        secret: &[u8],
        master: &MasterKey,
        vault_id: &str,
        costs: Argon2Costs,
        random: SlotSeed,
    ) -> Result<KeySlot, Error> {
        check_secret(kind, secret)?;
        let salt = hex::encode(random.salt);
        let kdf = if kind.is_passphrase() {
            Kdf::Argon2id {
                memory_kib: costs.memory_kib,
                iterations: costs.iterations,
                parallelism: costs.parallelism,
                salt,
            }
        } else {
            Kdf::HmacSha256 { salt }
        };
        let mut slot = KeySlot {
            format: KEY_SLOT_FORMAT,
            slot: hex::encode(random.id),
            kind,
            created_at: random.created_at,
            label: random.label,
            kdf,
            wrapped: String::new(),
        };
        let kek = slot.kek(secret)?;
        let cipher = Aes256Gcm::new(&(*kek).into());
        let mut body = *master.as_bytes();
        let tag = cipher
            .encrypt_inout_detached(
                &Nonce::from(random.nonce),
                &slot.aad(vault_id),
                (&mut body[..]).into(),
            )
            .map_err(|_| Error::Invalid { what: WHAT, detail: "wrapping failed".into() })?;
        slot.wrapped = hex::encode([&random.nonce[..], &body[..], &tag[..]].concat());
        Ok(slot)
    }

    /// The master key if `secret` opens this slot of vault `vault_id`; `None` if it does not.
    pub fn open(&self, secret: &[u8], vault_id: &str) -> Result<Option<MasterKey>, Error> {
        let wrapped = hex::decode(&self.wrapped)
            .ok()
            .filter(|w| w.len() == 12 + 32 + 16)
            .ok_or_else(|| Error::corrupt(WHAT, "the wrapped key is not 60 bytes of hex"))?;
        let (nonce, rest) = wrapped.split_at(12);
        let (body, tag) = rest.split_at(32);
        let kek = self.kek(secret)?;
        let cipher = Aes256Gcm::new(&(*kek).into());
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(body);
        let nonce: [u8; 12] = nonce.try_into().unwrap_or_default();
        let tag: [u8; 16] = tag.try_into().unwrap_or_default();
        let opened = cipher.decrypt_inout_detached(
            &Nonce::from(nonce),
            &self.aad(vault_id),
            (&mut key[..]).into(),
            &Tag::from(tag),
        );
        Ok(opened.ok().map(|()| MasterKey::from_bytes(*key)))
    }

    /// The associated data of the wrap: the slot is bound to its vault, id, kind, time and
    /// label (its KDF parameters are bound through the key they derive), so no byte of a slot
    /// changes unnoticed.
    fn aad(&self, vault_id: &str) -> Vec<u8> {
        let kind = match self.kind {
            SlotKind::Passphrase => "passphrase",
            SlotKind::KeyFile => "key-file",
            SlotKind::Recovery => "recovery",
        };
        format!(
            "cairn key slot v1\0{vault_id}\0{}\0{kind}\0{}\0{}",
            self.slot, self.created_at, self.label
        )
        .into_bytes()
    }

    /// The key-encryption key `secret` gives under this slot's KDF.
    fn kek(&self, secret: &[u8]) -> Result<Zeroizing<[u8; 32]>, Error> {
        match &self.kdf {
            Kdf::HmacSha256 { salt } => Ok(prf(secret, &[&decode_salt(salt)?])),
            Kdf::Argon2id { memory_kib, iterations, parallelism, salt } => {
                let params = argon2::Params::new(*memory_kib, *iterations, *parallelism, Some(32))
                    .map_err(|e| Error::corrupt(WHAT, format!("Argon2id costs: {e}")))?;
                let argon = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    params,
                );
                let mut out = Zeroizing::new([0u8; 32]);
                argon
                    .hash_password_into(secret, &decode_salt(salt)?, &mut out[..])
                    .map_err(|e| Error::Invalid { what: WHAT, detail: format!("Argon2id: {e}") })?;
                Ok(out)
            }
        }
    }

    /// The slot's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Decodes and checks a slot: format, id, kind against KDF, bounded costs, salt.
    pub fn decode(bytes: &[u8]) -> Result<KeySlot, Error> {
        let s: KeySlot = decode_json_formats(bytes, WHAT, KEY_SLOT_FORMAT..=KEY_SLOT_FORMAT)?;
        if s.slot.len() != 16
            || !s.slot.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::corrupt(WHAT, "its id is not 16 lowercase hex digits"));
        }
        match (&s.kdf, s.kind.is_passphrase()) {
            (Kdf::Argon2id { memory_kib, iterations, parallelism, salt }, true) => {
                if *memory_kib > MAX_MEMORY_KIB
                    || !(1..=MAX_ITERATIONS).contains(iterations)
                    || !(1..=MAX_PARALLELISM).contains(parallelism)
                {
                    return Err(Error::corrupt(WHAT, "Argon2id costs beyond what Cairn accepts"));
                }
                decode_salt(salt)?;
            }
            (Kdf::HmacSha256 { salt }, false) => {
                decode_salt(salt)?;
            }
            _ => return Err(Error::corrupt(WHAT, "its KDF does not fit its kind")),
        }
        Ok(s)
    }
}

/// A salt: 16 to 64 bytes of hex.
fn decode_salt(salt: &str) -> Result<Vec<u8>, Error> {
    hex::decode(salt)
        .ok()
        .filter(|s| (16..=64).contains(&s.len()))
        .ok_or_else(|| Error::corrupt(WHAT, "the salt is not 16 to 64 bytes of hex"))
}

/// Refuses secrets too weak for their kind: an empty passphrase, a key file under 32 bytes.
pub fn check_secret(kind: SlotKind, secret: &[u8]) -> Result<(), Error> {
    let min = if kind.is_passphrase() { 1 } else { 32 };
    if secret.len() < min {
        return Err(Error::Invalid {
            what: "key",
            detail: if kind.is_passphrase() {
                "the passphrase is empty".into()
            } else {
                format!("a key file must hold at least 32 bytes; this one has {}", secret.len())
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random(n: u8) -> SlotSeed {
        SlotSeed {
            id: [n; 8],
            salt: [n; 16],
            nonce: [n; 12],
            created_at: at(),
            label: "ops".into(),
        }
    }

    fn cheap() -> Argon2Costs {
        Argon2Costs { memory_kib: 64, iterations: 1, parallelism: 1 }
    }

    fn at() -> Timestamp {
        "2026-12-02T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_slot_opens_with_its_secret_only() {
        let master = MasterKey::from_bytes([3; 32]);
        let slot =
            KeySlot::new(SlotKind::Passphrase, b"correct horse", &master, "v1", cheap(), random(1))
                .unwrap();
        let back = KeySlot::decode(&slot.encode()).unwrap();
        assert_eq!(back, slot);
        assert_eq!(
            back.open(b"correct horse", "v1").unwrap().unwrap().as_bytes(),
            master.as_bytes()
        );
        assert!(back.open(b"wrong horse", "v1").unwrap().is_none());
        assert!(back.open(b"correct horse", "v2").unwrap().is_none(), "bound to its vault");
        let file =
            KeySlot::new(SlotKind::KeyFile, &[9; 32], &master, "v1", cheap(), random(2)).unwrap();
        assert!(matches!(file.kdf, Kdf::HmacSha256 { .. }));
        assert!(file.open(&[9; 32], "v1").unwrap().is_some());
        assert!(file.open(&[8; 32], "v1").unwrap().is_none());
        assert!(
            KeySlot::new(SlotKind::KeyFile, &[9; 31], &master, "v1", cheap(), random(2),).is_err()
        );
    }

    #[test]
    fn hostile_slots_are_refused() {
        let master = MasterKey::from_bytes([3; 32]);
        let slot =
            KeySlot::new(SlotKind::Passphrase, b"pw", &master, "v1", cheap(), random(1)).unwrap();
        let mut huge = slot.clone();
        huge.kdf = Kdf::Argon2id {
            memory_kib: u32::MAX,
            iterations: 1,
            parallelism: 1,
            salt: "00".repeat(16),
        };
        assert!(KeySlot::decode(&huge.encode()).is_err());
        let mut mismatched = slot.clone();
        mismatched.kind = SlotKind::KeyFile;
        assert!(KeySlot::decode(&mismatched.encode()).is_err());
        let mut short = slot;
        short.wrapped = "00".into();
        assert!(short.open(b"pw", "v1").is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes: Vec<u8>) {
            let _ = KeySlot::decode(&bytes);
        }
    }
}
