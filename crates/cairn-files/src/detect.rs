//! Which file system a volume holds, told by its magic numbers.

use crate::{Error, ReadAt};

/// A volume's file system, as far as Cairn can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    /// ext2, ext3 or ext4: read by [`crate::Volume`].
    Ext4,
    /// XFS.
    Xfs,
    /// Btrfs.
    Btrfs,
    /// NTFS.
    Ntfs,
    /// FAT12/16/32 (an EFI system partition).
    Fat,
    /// exFAT.
    ExFat,
    /// Linux swap.
    Swap,
    /// An LVM physical volume.
    Lvm,
    /// A LUKS encrypted volume.
    Luks,
    /// Nothing Cairn knows.
    Unknown,
}

impl FsKind {
    /// The name users know it by.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "XFS",
            FsKind::Btrfs => "btrfs",
            FsKind::Ntfs => "NTFS",
            FsKind::Fat => "FAT",
            FsKind::ExFat => "exFAT",
            FsKind::Swap => "Linux swap",
            FsKind::Lvm => "LVM physical volume",
            FsKind::Luks => "LUKS",
            FsKind::Unknown => "unknown",
        }
    }

    /// Why its files cannot be read yet, and what to do instead (None for ext4).
    pub fn unsupported_reason(self) -> Option<String> {
        let plan = "file-level recovery reads ext2/3/4 today; XFS and NTFS come next, then \
                    btrfs and FAT";
        let workaround = "meanwhile, serve the disk with `cairn-agent serve-nbd` and mount the \
                          export read-only (qemu-nbd --read-only, or nbd-client), or restore \
                          the disk";
        Some(match self {
            FsKind::Ext4 => return None,
            FsKind::Swap => "it is swap space: it holds no files".to_owned(),
            FsKind::Lvm | FsKind::Luks => format!(
                "it is a {} (volumes inside it are not opened by Cairn); {workaround}",
                self.name()
            ),
            FsKind::Unknown => format!(
                "no file system Cairn knows was found there (is it the right partition? \
                 `files partitions` lists them); {plan}"
            ),
            other => format!("it holds {}: {plan}; {workaround}", other.name()),
        })
    }
}

/// Tells the file system of the `len` bytes at `start` of `disk`.
pub fn detect(disk: &dyn ReadAt, start: u64, len: u64) -> Result<FsKind, Error> {
    let mut head = vec![0u8; len.min(8192) as usize];
    disk.read_at(start, &mut head).map_err(|e| Error::read("the volume's first sectors", e))?;
    let kind = detect_head(&head);
    if kind != FsKind::Unknown {
        return Ok(kind);
    }
    // Btrfs keeps its superblock at 64 KiB.
    if len >= 0x10000 + 0x48 {
        let mut magic = [0u8; 8];
        disk.read_at(start + 0x10040, &mut magic)
            .map_err(|e| Error::read("the volume's btrfs superblock", e))?;
        if &magic == b"_BHRfS_M" {
            return Ok(FsKind::Btrfs);
        }
    }
    Ok(FsKind::Unknown)
}

/// The size in bytes an ext2/3/4 superblock says its file system spans, from the volume's
/// first bytes (at least 2 KiB); `None` if they hold no such superblock or a size that makes
/// no sense. A file system that claims more than its partition is damaged or crafted: its
/// checker, handed the disk from the partition's start, would read the next partition as its
/// own.
pub fn ext4_size(head: &[u8]) -> Option<u64> {
    let sb = head.get(1024..2048)?;
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if sb[0x38..0x3a] != [0x53, 0xEF] {
        return None;
    }
    let log = u32_at(0x18);
    // Block sizes from 1 KiB to 64 KiB.
    if log > 6 {
        return None;
    }
    let mut blocks = u64::from(u32_at(0x04));
    const INCOMPAT_64BIT: u32 = 0x80;
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    blocks.checked_mul(1024 << log)
}

/// Tells a file system from its first bytes (up to 8 KiB), as far as they show it.
pub fn detect_head(head: &[u8]) -> FsKind {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0x438, &[0x53, 0xEF]) {
        FsKind::Ext4
    } else if at(0, b"XFSB") {
        FsKind::Xfs
    } else if at(3, b"NTFS    ") {
        FsKind::Ntfs
    } else if at(3, b"EXFAT   ") {
        FsKind::ExFat
    } else if at(82, b"FAT32   ") || at(54, b"FAT12   ") || at(54, b"FAT16   ") {
        FsKind::Fat
    } else if at(0, b"LUKS\xBA\xBE") {
        FsKind::Luks
    } else if at(512, b"LABELONE") && at(536, b"LVM2 001") {
        FsKind::Lvm
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        FsKind::Swap
    } else {
        FsKind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(blocks_lo: u32, log: u32, incompat: u32, blocks_hi: u32) -> Vec<u8> {
        let mut head = vec![0u8; 4096];
        let mut put = |o: usize, v: u32| head[1024 + o..1028 + o].copy_from_slice(&v.to_le_bytes());
        put(0x04, blocks_lo);
        put(0x18, log);
        put(0x60, incompat);
        put(0x150, blocks_hi);
        head[1024 + 0x38..1024 + 0x3a].copy_from_slice(&[0x53, 0xEF]);
        head
    }

    #[test]
    fn an_ext4_superblock_gives_its_size_and_nonsense_gives_none() {
        assert_eq!(ext4_size(&superblock(12288, 2, 0, 7)), Some(12288 * 4096), "hi ignored");
        assert_eq!(ext4_size(&superblock(1, 2, 0x80, 1)), Some(((1u64 << 32) + 1) * 4096));
        assert_eq!(ext4_size(&superblock(100, 0, 0, 0)), Some(100 * 1024));
        assert_eq!(ext4_size(&superblock(100, 7, 0, 0)), None, "128 KiB blocks");
        assert_eq!(ext4_size(&superblock(u32::MAX, 6, 0x80, u32::MAX)), None, "overflow");
        assert_eq!(ext4_size(&[0u8; 4096]), None);
        assert_eq!(ext4_size(&[0u8; 100]), None, "too short");
    }
}
