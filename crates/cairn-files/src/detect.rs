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
