//! The vault config: the one object that says how everything else in a vault is written.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::index::{DEFAULT_BLOCKS_PER_PAGE, MAX_BLOCKS_PER_PAGE};
use crate::manifest::decode_json;
use crate::{Error, check_block_size};

/// The config format this build writes and reads.
pub const CONFIG_FORMAT: u32 = 2;

/// Target size of a pack unless the config says otherwise. Measured on a local ext4 vault
/// (`docs/performance.md`): 2 and 8 MiB back up equally fast, 32 MiB is slower and needs twice
/// the memory; 8 MiB keeps object counts (and requests to object stores) low.
pub const DEFAULT_PACK_SIZE: u32 = 8 << 20;
/// The smallest and largest pack target a config may set.
pub const PACK_SIZE_RANGE: std::ops::RangeInclusive<u32> = (1 << 20)..=(512 << 20);

/// How chunk ids are computed. Today `sha256` (plain SHA-256 of the plaintext); keyed ids
/// (an HMAC, so that ids do not reveal content) will add an algorithm and a key reference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkIdParams {
    /// `sha256`.
    pub algorithm: String,
}

/// How chunks are encrypted. Today `none`; encryption at rest adds algorithms and wrapped keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CipherParams {
    /// `none`.
    pub algorithm: String,
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
}

impl VaultConfig {
    /// A config with today's defaults.
    pub fn new(vault_id: String, created_at: Timestamp, block_size: u32) -> Result<Self, Error> {
        check_block_size(block_size)?;
        Ok(VaultConfig {
            format: CONFIG_FORMAT,
            vault_id,
            created_at,
            block_size,
            blocks_per_page: DEFAULT_BLOCKS_PER_PAGE,
            pack_size: DEFAULT_PACK_SIZE,
            chunk_id: ChunkIdParams { algorithm: "sha256".into() },
            cipher: CipherParams { algorithm: "none".into() },
            compression: CompressionParams { algorithm: "zstd".into(), level: 1 },
        })
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
        let c: VaultConfig = decode_json(bytes, WHAT, CONFIG_FORMAT).map_err(|e| match e {
            // Format 1 stored each chunk as its own object; this build reads packs only.
            Error::Unsupported { what, detail } if detail == "format 1" => Error::Invalid {
                what,
                detail: "format 1, written by an earlier Cairn that stored one object per chunk; \
                         this version reads packed chunks only: create a new vault"
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
        if c.chunk_id.algorithm != "sha256" {
            return Err(unsupported(format!("chunk id algorithm {:?}", c.chunk_id.algorithm)));
        }
        if c.cipher.algorithm != "none" {
            return Err(unsupported(format!("cipher {:?}", c.cipher.algorithm)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> VaultConfig {
        VaultConfig::new("v1".into(), "2026-11-22T00:00:00Z".parse().unwrap(), 65536).unwrap()
    }

    #[test]
    fn round_trips() {
        let c = config();
        assert_eq!(VaultConfig::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn refuses_unknown_cipher_and_bad_block_size() {
        let mut c = config();
        c.cipher.algorithm = "aes-256-gcm".into();
        let err = VaultConfig::decode(&c.encode()).unwrap_err();
        assert!(err.to_string().contains("upgrade"), "{err}");
        let mut c = config();
        c.block_size = 3000;
        assert!(VaultConfig::decode(&c.encode()).is_err());
        assert!(VaultConfig::new("x".into(), c.created_at, 8 << 20).is_err());
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
