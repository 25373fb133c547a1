//! Encryption at rest: the keys of a vault and what they do to its bytes.
//!
//! An encrypted vault has one random 32-byte *master key*, stored only wrapped in key slots
//! ([`crate::keyslot`]). Every other key is derived from it with HMAC-SHA256 and a label:
//!
//! - chunk ids: `HMAC-SHA256(id key, plaintext)`, so that an id says nothing about content to
//!   whoever holds the bucket (a bare SHA-256 would confirm a guess of a block);
//! - piece sums: keyed XXH3 under a derived key (the plaintext config of an encrypted vault
//!   holds no key);
//! - chunk frames: AES-256-GCM under a key derived per frame from 24 random bytes stored in the
//!   frame (`HMAC(frame key, salt)`), nonce zero. Each key encrypts one frame, so no nonce can
//!   repeat under a key unless two 192-bit random salts collide (the birthday bound is 2^96
//!   frames, where a random 96-bit nonce under one key allows about 2^32). Frames do not depend
//!   on the pack they land in: workers encrypt in parallel, and a repack moves frames as they are;
//! - every other object (pack tables, pack indexes, manifests, markers, records): sealed whole
//!   the same way under the object key, with the object's path as associated data, so an
//!   object moved to another name does not open.
//!
//! The layouts are in `docs/formats.md`. Plaintext vaults use [`Crypto::none`]: SHA-256 ids,
//! plain frames, objects stored as they are.

use std::sync::Arc;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::patch::PieceKey;
use crate::{Digest, Error};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the random salt that derives a frame's or an object's key.
pub const SALT_LEN: usize = 24;
/// Bytes of an AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed object adds to what it seals: header, salt and tag.
pub const SEAL_OVERHEAD: usize = SEALED_HEADER.len() + SALT_LEN + TAG_LEN;

const SEALED_HEADER: [u8; 8] = *b"CRNS\x01\0\0\0";
const SEALED: &str = "sealed object";

/// Labels of the keys derived from the master key. A new use gets a new label.
const ID_LABEL: &[u8] = b"cairn/v1/chunk-id";
const PIECE_LABEL: &[u8] = b"cairn/v1/piece-sums";
const FRAME_LABEL: &[u8] = b"cairn/v1/frames";
const OBJECT_LABEL: &[u8] = b"cairn/v1/objects";
const CHECK_LABEL: &[u8] = b"cairn/v1/key-check";

/// A vault's master key: 32 random bytes, wiped from memory when dropped.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// Wraps 32 bytes (random, from the caller: this crate does no I/O).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(Zeroizing::new(bytes))
    }

    /// The raw bytes (to wrap them in a key slot).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// HMAC-SHA256 of the concatenated `parts` under `key`.
pub(crate) fn prf(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| HmacSha256::new(&Default::default()));
    for p in parts {
        mac.update(p);
    }
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// How a vault names chunks: plain SHA-256, or HMAC-SHA256 under the vault's id key.
#[derive(Clone)]
pub enum ChunkIds {
    /// SHA-256 of the plaintext (plaintext vaults).
    Sha256,
    /// HMAC-SHA256 of the plaintext; the HMAC state is keyed once and cloned per id.
    Keyed(Box<HmacSha256>),
}

impl std::fmt::Debug for ChunkIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkIds::Sha256 => "ChunkIds::Sha256",
            ChunkIds::Keyed(_) => "ChunkIds::Keyed(..)",
        })
    }
}

impl ChunkIds {
    /// The id of `plaintext`.
    pub fn of(&self, plaintext: &[u8]) -> Digest {
        match self {
            ChunkIds::Sha256 => Digest::of(plaintext),
            ChunkIds::Keyed(mac) => {
                let mut mac = (**mac).clone();
                mac.update(plaintext);
                Digest(mac.finalize().into_bytes().into())
            }
        }
    }

    /// True for keyed ids.
    pub fn is_keyed(&self) -> bool {
        matches!(self, ChunkIds::Keyed(_))
    }
}

/// The keys of an encrypted vault, derived from its master key.
struct Keys {
    pieces: PieceKey,
    frames: HmacSha256,
    objects: HmacSha256,
    check: Zeroizing<[u8; 32]>,
}

/// What a vault does to its bytes: ids, frames and sealed objects, with or without keys.
/// Cheap to clone.
#[derive(Clone)]
pub struct Crypto {
    keys: Option<Arc<Keys>>,
    /// Chunk ids of a plaintext vault (SHA-256) or the keyed ones.
    ids: ChunkIds,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.keys.is_some() { "Crypto(aes-256-gcm)" } else { "Crypto(none)" })
    }
}

impl Crypto {
    /// A plaintext vault: SHA-256 ids, nothing encrypted.
    pub fn none() -> Self {
        Crypto { keys: None, ids: ChunkIds::Sha256 }
    }

    /// An encrypted vault's keys, derived from `master`.
    pub fn from_master(master: &MasterKey) -> Self {
        let keyed = |label: &[u8]| {
            let key = prf(master.as_bytes(), &[label]);
            <HmacSha256 as hmac::KeyInit>::new_from_slice(&key[..])
                .unwrap_or_else(|_| HmacSha256::new(&Default::default()))
        };
        let ids = ChunkIds::Keyed(Box::new(keyed(ID_LABEL)));
        let piece_key = prf(master.as_bytes(), &[PIECE_LABEL]);
        let keys = Keys {
            pieces: PieceKey::from_key(&piece_key),
            frames: keyed(FRAME_LABEL),
            objects: keyed(OBJECT_LABEL),
            check: prf(master.as_bytes(), &[CHECK_LABEL]),
        };
        Crypto { keys: Some(Arc::new(keys)), ids }
    }

    /// True if the vault is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// How chunk ids are computed.
    pub fn ids(&self) -> &ChunkIds {
        &self.ids
    }

    /// The piece-sum key of an encrypted vault (`None`: the config holds it).
    pub fn piece_key(&self) -> Option<PieceKey> {
        self.keys.as_ref().map(|k| k.pieces.clone())
    }

    /// The value an encrypted vault's config records to prove it was written with this master
    /// key and not changed since: `HMAC(check key, config)` in hex, over the config's bytes as
    /// [`crate::VaultConfig::encode`] writes them with the check itself left out
    /// ([`crate::VaultConfig::checked_bytes`]).
    pub fn config_check(&self, checked_bytes: &[u8]) -> Option<String> {
        let keys = self.keys.as_ref()?;
        Some(hex::encode(*prf(&keys.check[..], &[checked_bytes])))
    }

    /// The AES-256-GCM key for `salt` under the derivation key `base`.
    fn cipher(base: &HmacSha256, salt: &[u8]) -> Aes256Gcm {
        let mut mac = base.clone();
        mac.update(salt);
        let mut key: [u8; 32] = mac.finalize().into_bytes().into();
        let cipher = Aes256Gcm::new(&key.into());
        key.zeroize();
        cipher
    }

    /// Encrypts `buf` in place under a key derived from `salt`; returns the tag.
    pub(crate) fn seal_frame(
        &self,
        salt: &[u8; SALT_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        let keys = self.keys.as_ref()?;
        let cipher = Crypto::cipher(&keys.frames, salt);
        let tag = cipher.encrypt_inout_detached(&Nonce::from([0u8; 12]), aad, buf.into()).ok()?;
        Some(tag.into())
    }

    /// Decrypts `buf` in place; `false` if the tag does not match (or the vault has no keys).
    pub(crate) fn open_frame(&self, salt: &[u8], aad: &[u8], buf: &mut [u8], tag: &[u8]) -> bool {
        let (Some(keys), Ok(tag)) = (self.keys.as_ref(), <[u8; TAG_LEN]>::try_from(tag)) else {
            return false;
        };
        let cipher = Crypto::cipher(&keys.frames, salt);
        cipher
            .decrypt_inout_detached(&Nonce::from([0u8; 12]), aad, buf.into(), &Tag::from(tag))
            .is_ok()
    }

    /// Seals an object's bytes for the object at `path` (plaintext vaults: the bytes as they
    /// are). `salt` must be fresh random bytes.
    pub fn seal(&self, path: &str, plain: Vec<u8>, salt: [u8; SALT_LEN]) -> Vec<u8> {
        let Some(keys) = self.keys.as_ref() else { return plain };
        let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&SEALED_HEADER);
        out.extend_from_slice(&salt);
        let at = out.len();
        out.extend_from_slice(&plain);
        let cipher = Crypto::cipher(&keys.objects, &salt);
        let aad = [&SEALED_HEADER[..], path.as_bytes()].concat();
        let tag = match out.get_mut(at..) {
            Some(body) => cipher
                .encrypt_inout_detached(&Nonce::from([0u8; 12]), &aad, body.into())
                .map(<[u8; TAG_LEN]>::from)
                .unwrap_or([0; TAG_LEN]),
            None => [0; TAG_LEN],
        };
        out.extend_from_slice(&tag);
        let mut plain = plain;
        plain.zeroize();
        out
    }

    /// Opens the sealed object at `path` (plaintext vaults: the bytes as they are). A wrong
    /// key, a flipped bit or an object moved from another name all fail the tag.
    pub fn open(&self, what: &'static str, path: &str, sealed: &[u8]) -> Result<Vec<u8>, Error> {
        let Some(keys) = self.keys.as_ref() else { return Ok(sealed.to_vec()) };
        let body_at = SEALED_HEADER.len() + SALT_LEN;
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Error::Truncated { what, offset: sealed.len(), needed: SEAL_OVERHEAD });
        }
        let (head, rest) = sealed.split_at(body_at);
        if head.get(..4) != Some(&SEALED_HEADER[..4]) {
            return Err(Error::corrupt(what, "not a sealed object (bad magic)"));
        }
        if head.get(4) != Some(&1) {
            return Err(Error::Unsupported {
                what,
                detail: format!("{SEALED} version {}", head.get(4).copied().unwrap_or(0)),
            });
        }
        if head.get(5..8) != Some(&[0, 0, 0][..]) {
            return Err(Error::corrupt(what, "reserved bytes of a sealed object are not zero"));
        }
        let salt = head.get(8..).unwrap_or_default();
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plain = body.to_vec();
        let cipher = Crypto::cipher(&keys.objects, salt);
        let aad = [&SEALED_HEADER[..], path.as_bytes()].concat();
        let tag: [u8; TAG_LEN] = tag.try_into().unwrap_or([0; TAG_LEN]);
        cipher
            .decrypt_inout_detached(
                &Nonce::from([0u8; 12]),
                &aad,
                (&mut plain[..]).into(),
                &Tag::from(tag),
            )
            .map_err(|_| {
                Error::corrupt(
                    what,
                    "it does not authenticate: damaged, written under another key, or moved \
                     from another name",
                )
            })?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_ids_differ_from_sha256_and_between_keys() {
        let a = Crypto::from_master(&MasterKey::from_bytes([1; 32]));
        let b = Crypto::from_master(&MasterKey::from_bytes([2; 32]));
        let block = vec![7u8; 4096];
        assert_ne!(a.ids().of(&block), Digest::of(&block));
        assert_ne!(a.ids().of(&block), b.ids().of(&block));
        assert_eq!(a.ids().of(&block), a.ids().of(&block));
        assert_eq!(Crypto::none().ids().of(&block), Digest::of(&block));
    }

    #[test]
    fn sealed_objects_open_only_with_their_key_and_name() {
        let a = Crypto::from_master(&MasterKey::from_bytes([1; 32]));
        let b = Crypto::from_master(&MasterKey::from_bytes([2; 32]));
        let sealed = a.seal("points/vm/p.json", b"secret manifest".to_vec(), [5; SALT_LEN]);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(a.open("m", "points/vm/p.json", &sealed).unwrap(), b"secret manifest");
        assert!(b.open("m", "points/vm/p.json", &sealed).is_err(), "another key");
        assert!(a.open("m", "points/vm/q.json", &sealed).is_err(), "another name");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(a.open("m", "points/vm/p.json", &bad).is_err(), "bit flipped at {i}");
        }
        assert!(a.open("m", "x", &sealed[..10]).is_err());
        // A plaintext vault stores objects as they are.
        assert_eq!(Crypto::none().seal("x", b"abc".to_vec(), [0; SALT_LEN]), b"abc");
    }
}
