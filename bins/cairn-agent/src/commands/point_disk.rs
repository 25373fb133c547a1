//! A point's disk read in place from its vault: what `serve-nbd` exports and `files` reads.
//!
//! Both open the same way (vault, VM, point, disk, a cache and a read-ahead in MiB) and both
//! hand the async [`PointReader`] to synchronous code on threads of their own (the NBD
//! server's, the ext4 reader's), which drive it on the agent's runtime: [`BlockingReader`].

use anyhow::Context;
use cairn_backup::{BlockingReader, PointReader, ReaderOptions};
use cairn_format::{Name, PointManifest};

use crate::cli::PointDiskArgs;

/// The disk, opened.
pub(crate) struct PointDisk {
    pub vault: cairn_vault::Vault,
    pub manifest: PointManifest,
    pub name: Name,
    pub reader: PointReader,
}

impl PointDisk {
    /// Opens the vault, finds the point and opens a reader over its disk, reading ahead
    /// `read_ahead_mib` of a reader going in order.
    pub(crate) async fn open(r: &PointDiskArgs, read_ahead_mib: u64) -> anyhow::Result<PointDisk> {
        let name: Name = r.disk.parse().with_context(|| format!("--disk {:?}", r.disk))?;
        let (vault, manifest) = super::open_point(&r.from).await?;
        let mib = |n: u64, what: &str| {
            n.checked_mul(1 << 20).with_context(|| format!("--{what} {n} is too large"))
        };
        let options = ReaderOptions {
            cache_bytes: mib(r.cache_mib, "cache-mib")?,
            read_ahead: mib(read_ahead_mib, "read-ahead-mib")?,
            ..ReaderOptions::default()
        };
        let reader = PointReader::open(vault.clone(), &manifest, &name, options).await?;
        Ok(PointDisk { vault, manifest, name, reader })
    }

    /// Blocks of the disk holding data (neither holes nor zeros), as its backup counted them.
    pub(crate) fn data_blocks(&self) -> u64 {
        self.manifest
            .disks
            .get(&self.name)
            .map(|d| d.stats.blocks.saturating_sub(d.stats.hole_blocks + d.stats.zero_blocks))
            .unwrap_or(0)
    }

    /// The reader, for a thread that may block (not a runtime worker).
    pub(crate) fn blocking(&self) -> BlockingReader {
        self.reader.blocking()
    }
}
