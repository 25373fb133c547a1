//! Cairn's vocabulary and its bytes.
//!
//! Everything Cairn writes to a vault is defined here, and only here: digests and names, the
//! chunk frame (compression, cipher field, CRC-32), packs of chunk frames and their indexes, the paged, content-addressed disk index, the
//! recovery-point manifest, the notes that carry a point's changing state, and the vault config. The crate is synchronous and does no I/O:
//! encoders take values and return bytes, decoders take bytes and return values or an
//! [`Error`], and never panic on any input (each decoder has a fuzz target in `fuzz/` and
//! property tests in its module). `docs/formats.md` describes every byte.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

mod chunk;
mod codec;
mod config;
pub mod crypto;
mod digest;
mod error;
pub mod gc;
pub mod index;
pub mod keyslot;
mod manifest;
mod name;
pub mod note;
pub mod pack;
pub mod patch;
mod point_id;

pub use chunk::{
    ChunkFrame, Cipher, Compression, FRAME_HEADER_LEN, MAX_CHUNK_LEN, check_chunk, decode_chunk,
    encode_chunk, encode_chunk_in, size_class,
};
pub use config::{
    CONFIG_FORMAT, ChunkIdParams, CipherParams, CompressionParams, DEFAULT_PACK_SIZE,
    ENCRYPTED_CONFIG_FORMAT, PACK_SIZE_RANGE, PieceSumParams, VaultConfig,
};
pub use crypto::{ChunkIds, Crypto, MasterKey};
pub use digest::Digest;
pub use error::Error;
pub use gc::{BaseRecord, Fate, FateKind, GcPlan, Lease};
pub use manifest::{
    Consistency, DamageRecord, DiskRecord, DiskStats, Evidence, InflightMarker, MANIFEST_FORMAT,
    MachineDisk, MachineRecord, Origin, PointManifest, ResumeRecord, SizedPack,
};
pub use name::Name;
pub use note::{
    BootReads, Change, Deletion, Drill, MAX_BOOT_RUNS, PointNote, PointState, SnapshotTier,
    Verification,
};
pub use point_id::PointId;

/// The smallest block size a disk index may use: 4 KiB.
pub const MIN_BLOCK_SIZE: u32 = 4 * 1024;
/// The largest block size a disk index may use: 4 MiB.
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;
/// Block size of new vaults unless chosen otherwise (see `docs/performance.md` for why).
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

/// Checks that `block_size` is a power of two between [`MIN_BLOCK_SIZE`] and [`MAX_BLOCK_SIZE`].
pub fn check_block_size(block_size: u32) -> Result<(), Error> {
    if block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "block size",
            detail: format!(
                "{block_size} bytes; it must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            ),
        })
    }
}
