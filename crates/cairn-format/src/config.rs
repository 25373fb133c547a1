//! The vault config: the one object that says how everything else in a vault is written.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::index::{DEFAULT_BLOCKS_PER_PAGE, MAX_BLOCKS_PER_PAGE};
use crate::manifest::decode_json_formats;
use crate::patch::PieceKey;
use crate::{Error, check_block_size};

/// The config format this build writes for plaintext vaults. It also reads format 2, whose
/// piece sums are unkeyed.
pub const CONFIG_FORMAT: u32 = 3;
/// The config format of encrypted vaults: keyed chunk ids, AES-256-GCM, keys in key slots.
pub const ENCRYPTED_CONFIG_FORMAT: u32 = 4;
/// The oldest config format this build reads.
const OLDEST_FORMAT: u32 = 2;

/// Target size of a pack unless the config says otherwise. Measured on a local ext4 vault
/// (`docs/performance.md`): 2 and 8 MiB back up equally fast, 32 MiB is slower and needs twice
/// the memory; 8 MiB keeps object counts (and requests to object stores) low.
pub const DEFAULT_PACK_SIZE: u32 = 8 << 20;
/// The smallest and largest pack target a config may set.
pub const PACK_SIZE_RANGE: std::ops::RangeInclusive<u32> = (1 << 20)..=(512 << 20);

/// How chunk ids are computed: `sha256` (plaintext vaults) or `hmac-sha256` (encrypted
/// vaults: keyed with a key derived from the master key, so ids do not reveal content).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkIdParams {
    /// `sha256` or `hmac-sha256`.
    pub algorithm: String,
}

/// How chunks and objects are encrypted: `none`, or `aes-256-gcm` with the master key in key
/// slots (`keys/`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CipherParams {
    /// `none` or `aes-256-gcm`.
    pub algorithm: String,
    /// `aes-256-gcm`: HMAC of the rest of the config under a key derived from the master key
    /// (hex): a key slot that opens to another key, and any change to the config, are known
    /// at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_check: Option<String>,
}

/// How piece sums (sub-block deltas) are computed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceSumParams {
    /// `xxh3-64` (unkeyed; format 2 vaults) or `xxh3-64-keyed`.
    pub algorithm: String,
    /// The 32-byte key, hex, for `xxh3-64-keyed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl std::fmt::Debug for PieceSumParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: logs and debug output never show it.
        f.debug_struct("PieceSumParams").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl Default for PieceSumParams {
    /// What a format 2 config, which has no such field, means.
    fn default() -> Self {
        PieceSumParams { algorithm: "xxh3-64".into(), key: None }
    }
}

/// How chunks are compressed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionParams {
    /// `zstd` or `none`.
    pub algorithm: String,
    /// The zstd level (1 is the measured sweet spot for disk data).
    #[serde(default)]
    pub level: i32,
}

/// The vault config object, written once by `init`, create-only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultConfig {
    /// Config format, [`CONFIG_FORMAT`].
    pub format: u32,
    /// A random id for this vault.
    pub vault_id: String,
    /// When the vault was created.
    pub created_at: Timestamp,
    /// Block size of new disk indexes.
    pub block_size: u32,
    /// Blocks per index page.
    pub blocks_per_page: u32,
    /// Target size of a pack: chunks are written in packs of about this many bytes.
    pub pack_size: u32,
    /// Chunk-id parameters.
    pub chunk_id: ChunkIdParams,
    /// Cipher parameters.
    pub cipher: CipherParams,
    /// Compression parameters.
    pub compression: CompressionParams,
    /// Piece-sum parameters (absent in format 2: unkeyed).
    #[serde(default)]
    pub piece_sums: PieceSumParams,
}

impl VaultConfig {
    /// A config with today's defaults; `piece_key` (random, from the caller) keys the vault's
    /// piece sums.
    pub fn new(
        vault_id: String,
        created_at: Timestamp,
        block_size: u32,
        piece_key: [u8; 32],
    ) -> Result<Self, Error> {
        check_block_size(block_size)?;
        Ok(VaultConfig {
            format: CONFIG_FORMAT,
            vault_id,
            created_at,
            block_size,
            blocks_per_page: DEFAULT_BLOCKS_PER_PAGE,
            pack_size: DEFAULT_PACK_SIZE,
            chunk_id: ChunkIdParams { algorithm: "sha256".into() },
            cipher: CipherParams { algorithm: "none".into(), key_check: None },
            compression: CompressionParams { algorithm: "zstd".into(), level: 1 },
            piece_sums: PieceSumParams {
                algorithm: "xxh3-64-keyed".into(),
                key: Some(hex::encode(piece_key)),
            },
        })
    }

    /// A config for an encrypted vault, checked with `crypto`'s keys
    /// ([`crate::Crypto::config_check`]).
    pub fn new_encrypted(
        vault_id: String,
        created_at: Timestamp,
        block_size: u32,
        crypto: &crate::Crypto,
    ) -> Result<Self, Error> {
        let mut c = VaultConfig::new(vault_id, created_at, block_size, [0; 32])?;
        c.format = ENCRYPTED_CONFIG_FORMAT;
        c.chunk_id.algorithm = "hmac-sha256".into();
        c.cipher = CipherParams { algorithm: "aes-256-gcm".into(), key_check: None };
        // The piece-sum key is derived from the master key: none in the plaintext config.
        c.piece_sums.key = None;
        c.cipher.key_check = crypto.config_check(&c.checked_bytes());
        if c.cipher.key_check.is_none() {
            return Err(Error::Invalid {
                what: "vault config",
                detail: "no keys to check it with".into(),
            });
        }
        Ok(c)
    }

    /// The bytes the key check covers: the config as encoded, without the check.
    pub fn checked_bytes(&self) -> Vec<u8> {
        let mut c = self.clone();
        c.cipher.key_check = None;
        c.encode()
    }

    /// True if `crypto` (opened from a key slot) is the key this config was written with, and
    /// the config is as it was written.
    pub fn checks_with(&self, crypto: &crate::Crypto) -> bool {
        self.cipher.key_check.is_some()
            && crypto.config_check(&self.checked_bytes()) == self.cipher.key_check
    }

    /// True if the vault is encrypted (its keys are in key slots).
    pub fn is_encrypted(&self) -> bool {
        self.cipher.algorithm == "aes-256-gcm"
    }

    /// The key of this vault's piece sums (plaintext vaults; an encrypted vault's is derived
    /// from its master key: [`crate::Crypto::piece_key`]).
    pub fn piece_key(&self) -> PieceKey {
        match self.piece_sums.key.as_deref().map(decode_key) {
            Some(Some(key)) => PieceKey::from_key(&key),
            _ => PieceKey::UNKEYED,
        }
    }

    /// The zstd level to use, or `None` to store chunks uncompressed.
    pub fn zstd_level(&self) -> Option<i32> {
        (self.compression.algorithm == "zstd").then_some(self.compression.level)
    }

    /// The config's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Decodes and checks a config; unknown algorithms are refused as unsupported.
    pub fn decode(bytes: &[u8]) -> Result<VaultConfig, Error> {
        const WHAT: &str = "vault config";
        let c: VaultConfig = decode_json_formats(
            bytes,
            WHAT,
            OLDEST_FORMAT..=ENCRYPTED_CONFIG_FORMAT,
        )
        .map_err(|e| match e {
            // Format 1 stored each chunk as its own object; this build reads packs only.
            Error::Unsupported { what, detail } if detail == "format 1" => Error::Obsolete {
                what,
                detail: "format 1, written by an earlier Cairn that stored one object per \
                             chunk; this version reads packed chunks only"
                    .into(),
            },
            e => e,
        })?;
        check_block_size(c.block_size)
            .map_err(|e| Error::Corrupt { what: WHAT, detail: e.to_string() })?;
        if c.blocks_per_page == 0 || c.blocks_per_page > MAX_BLOCKS_PER_PAGE {
            return Err(Error::corrupt(WHAT, format!("{} blocks per page", c.blocks_per_page)));
        }
        if !PACK_SIZE_RANGE.contains(&c.pack_size) {
            return Err(Error::corrupt(WHAT, format!("pack size {}", c.pack_size)));
        }
        let unsupported = |detail: String| Error::Unsupported { what: WHAT, detail };
        // Format 4 is encrypted, and only format 4.
        let encrypted = c.format == ENCRYPTED_CONFIG_FORMAT;
        let (id, cipher) =
            if encrypted { ("hmac-sha256", "aes-256-gcm") } else { ("sha256", "none") };
        if c.chunk_id.algorithm != id {
            return Err(unsupported(format!(
                "chunk id algorithm {:?} in format {}",
                c.chunk_id.algorithm, c.format
            )));
        }
        if c.cipher.algorithm != cipher {
            return Err(unsupported(format!(
                "cipher {:?} in format {}",
                c.cipher.algorithm, c.format
            )));
        }
        if encrypted && c.cipher.key_check.as_deref().and_then(decode_key).is_none() {
            return Err(Error::corrupt(WHAT, "the key check is not 32 bytes of hex"));
        }
        // Format 3 and later key their piece sums; format 2 did not; format 4 derives the key.
        let keyed = c.format >= 3;
        match (c.piece_sums.algorithm.as_str(), &c.piece_sums.key) {
            ("xxh3-64", None) if !keyed => {}
            ("xxh3-64-keyed", None) if encrypted => {}
            ("xxh3-64-keyed", Some(key)) if keyed && !encrypted => {
                if decode_key(key).is_none() {
                    return Err(Error::corrupt(WHAT, "the piece-sum key is not 32 bytes of hex"));
                }
            }
            (other, _) => {
                return Err(unsupported(format!("piece sums {other:?} in format {}", c.format)));
            }
        }
        match c.compression.algorithm.as_str() {
            "none" => {}
            "zstd" if (1..=22).contains(&c.compression.level) => {}
            "zstd" => {
                return Err(Error::corrupt(WHAT, format!("zstd level {}", c.compression.level)));
            }
            other => return Err(unsupported(format!("compression {other:?}"))),
        }
        Ok(c)
    }
}

/// A 32-byte key from its hex.
fn decode_key(hex_key: &str) -> Option<[u8; 32]> {
    hex::decode(hex_key).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> VaultConfig {
        VaultConfig::new("v1".into(), "2026-11-22T00:00:00Z".parse().unwrap(), 65536, [9; 32])
            .unwrap()
    }

    #[test]
    fn round_trips() {
        let c = config();
        assert_eq!(VaultConfig::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn encrypted_configs_round_trip_and_hold_no_key() {
        let crypto = crate::Crypto::from_master(&crate::MasterKey::from_bytes([4; 32]));
        let c =
            VaultConfig::new_encrypted("v1".into(), config().created_at, 65536, &crypto).unwrap();
        assert!(c.checks_with(&crypto));
        let other = crate::Crypto::from_master(&crate::MasterKey::from_bytes([5; 32]));
        assert!(!c.checks_with(&other));
        let mut changed = c.clone();
        changed.compression.level = 3;
        assert!(!changed.checks_with(&crypto), "a changed config fails its check");
        let back = VaultConfig::decode(&c.encode()).unwrap();
        assert!(back.is_encrypted());
        assert_eq!(back, c);
        assert!(c.piece_sums.key.is_none());
        let mut no_check = c.clone();
        no_check.cipher.key_check = None;
        assert!(VaultConfig::decode(&no_check.encode()).is_err());
        let mut plain_ids = c;
        plain_ids.chunk_id.algorithm = "sha256".into();
        assert!(VaultConfig::decode(&plain_ids.encode()).is_err());
    }

    #[test]
    fn refuses_unknown_cipher_and_bad_block_size() {
        let mut c = config();
        c.cipher.algorithm = "chacha".into();
        let err = VaultConfig::decode(&c.encode()).unwrap_err();
        assert!(err.to_string().contains("upgrade"), "{err}");
        let mut c = config();
        c.block_size = 3000;
        assert!(VaultConfig::decode(&c.encode()).is_err());
        assert!(VaultConfig::new("x".into(), c.created_at, 8 << 20, [0; 32]).is_err());
    }

    #[test]
    fn piece_sums_are_keyed_in_new_vaults_and_plain_in_format_2() {
        let c = config();
        assert!(c.piece_key().is_keyed());
        assert!(!format!("{c:?}").contains(&hex::encode([9u8; 32])), "the key is never printed");
        let mut old = config();
        old.format = 2;
        old.piece_sums = PieceSumParams::default();
        let back = VaultConfig::decode(&old.encode()).unwrap();
        assert!(!back.piece_key().is_keyed());
        // A format 2 vault says nothing of piece sums at all.
        let mut json: serde_json::Value = serde_json::from_slice(&old.encode()).unwrap();
        json.as_object_mut().unwrap().remove("piece_sums");
        assert!(VaultConfig::decode(&serde_json::to_vec(&json).unwrap()).is_ok());
        // A format 3 vault without a key, or with a short one, is refused.
        let mut bad = config();
        bad.piece_sums = PieceSumParams::default();
        assert!(VaultConfig::decode(&bad.encode()).is_err());
        let mut bad = config();
        bad.piece_sums.key = Some("abcd".into());
        assert!(VaultConfig::decode(&bad.encode()).is_err());
    }

    #[test]
    fn an_old_format_says_to_create_a_new_vault() {
        let mut c = config();
        c.format = 1;
        let err = VaultConfig::decode(&c.encode()).unwrap_err();
        assert!(err.to_string().contains("create a new vault"), "{err}");
        let mut c = config();
        c.pack_size = 1000;
        assert!(VaultConfig::decode(&c.encode()).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes: Vec<u8>) {
            let _ = VaultConfig::decode(&bytes);
        }
    }
}
