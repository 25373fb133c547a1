//! GPT and MBR partition tables, read from a disk's first sectors.
//!
//! Every field comes from the guest: a table is believed only where it is consistent (GPT: its
//! signature and both CRCs; MBR: its signature and entries that fit the disk), and a partition
//! that reaches past the disk's end is refused, never clipped. A disk with neither table is
//! one file system from its first byte.

use crate::{Error, ReadAt};

/// The sector size tables are read in. GPT on 4 KiB-sector disks is found too, its header
/// being at 4096.
const SECTOR: u64 = 512;

/// Bytes of GPT partition entries read at most (the usual table is 16 KiB).
const MAX_GPT_ENTRIES_BYTES: u64 = 1 << 20;

/// Logical partitions followed at most in an MBR's extended partition.
const MAX_LOGICAL: usize = 128;

/// Which table a disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    /// A GUID partition table.
    Gpt,
    /// A DOS master boot record (with its logical partitions).
    Mbr,
    /// No table: the disk is one volume.
    None,
}

/// One partition, numbered as Linux numbers them (`sda1` is 1; MBR logical ones from 5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Its number.
    pub number: u32,
    /// Its first byte on the disk.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Its type: a GPT type GUID, or an MBR type byte as `0x83`, with a known name after.
    pub kind: String,
    /// A GPT partition's own name (empty on MBR).
    pub name: String,
}

/// A disk's partitions, in number order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// Which table was found.
    pub kind: TableKind,
    /// Its partitions (none when `kind` is [`TableKind::None`]).
    pub partitions: Vec<Partition>,
}

/// Reads the partition table of `disk`.
pub fn read_table(disk: &dyn ReadAt) -> Result<Table, Error> {
    let size = disk.size();
    for sector in [SECTOR, 4096] {
        if size < sector * 2 {
            continue;
        }
        let mut header = vec![0u8; sector as usize];
        disk.read_at(sector, &mut header).map_err(|e| Error::read("the GPT header", e))?;
        if !header.starts_with(b"EFI PART") {
            continue;
        }
        let layout = gpt_header(&header, sector, size)?;
        let mut entries = vec![0u8; layout.entries_len() as usize];
        disk.read_at(layout.entries_at, &mut entries)
            .map_err(|e| Error::read("the GPT partition entries", e))?;
        let partitions = gpt_entries(&layout, &entries, size)?;
        return Ok(Table { kind: TableKind::Gpt, partitions });
    }
    if size < SECTOR {
        return Ok(Table { kind: TableKind::None, partitions: Vec::new() });
    }
    let mut mbr = [0u8; SECTOR as usize];
    disk.read_at(0, &mut mbr).map_err(|e| Error::read("the master boot record", e))?;
    let Some(primary) = mbr_entries(&mbr, size) else {
        return Ok(Table { kind: TableKind::None, partitions: Vec::new() });
    };
    let mut partitions = Vec::new();
    let mut extended = None;
    for (i, entry) in primary.iter().enumerate() {
        let Some(entry) = entry else { continue };
        if is_extended(entry.kind) {
            extended.get_or_insert(*entry);
            continue;
        }
        partitions.push(entry.partition(i as u32 + 1, 0));
    }
    if let Some(ext) = extended {
        logical_partitions(disk, &ext, size, &mut partitions)?;
    }
    Ok(Table { kind: TableKind::Mbr, partitions })
}

/// Where a GPT's entries are and how they are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptLayout {
    /// The sector size the header was found with.
    pub sector: u64,
    /// Byte offset of the first entry.
    pub entries_at: u64,
    /// Number of entries.
    pub count: u32,
    /// Bytes per entry.
    pub entry_size: u32,
    /// CRC-32 of all the entries' bytes.
    pub entries_crc: u32,
}

impl GptLayout {
    /// Bytes the entries take.
    pub fn entries_len(&self) -> u64 {
        u64::from(self.count) * u64::from(self.entry_size)
    }
}

/// Checks a GPT header (one sector from the second) and says where its entries are.
pub fn gpt_header(header: &[u8], sector: u64, disk_size: u64) -> Result<GptLayout, Error> {
    let bad = |why: String| Error::BadTable(format!("GPT header: {why}"));
    if header.len() < 92 || !header.starts_with(b"EFI PART") {
        return Err(bad("no signature".into()));
    }
    let header_size = le32(header, 12) as usize;
    if !(92..=header.len()).contains(&header_size) {
        return Err(bad(format!("header size {header_size} is out of range")));
    }
    let mut copy = header[..header_size].to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != le32(header, 16) {
        return Err(bad("its CRC does not match (damaged or not a GPT)".into()));
    }
    let entries_lba = le64(header, 72);
    let count = le32(header, 80);
    let entry_size = le32(header, 84);
    if entry_size < 128 || !entry_size.is_multiple_of(8) || entry_size > 4096 {
        return Err(bad(format!("entry size {entry_size} is not a multiple of 8 from 128")));
    }
    let layout = GptLayout {
        sector,
        entries_at: entries_lba.saturating_mul(sector),
        count,
        entry_size,
        entries_crc: le32(header, 88),
    };
    if layout.entries_len() > MAX_GPT_ENTRIES_BYTES {
        return Err(bad(format!("{count} entries of {entry_size} bytes is too many")));
    }
    if layout.entries_at.checked_add(layout.entries_len()).is_none_or(|end| end > disk_size) {
        return Err(bad(format!("its entries at sector {entries_lba} are past the disk's end")));
    }
    Ok(layout)
}

/// The partitions of a GPT's entries (the bytes `layout` names).
pub fn gpt_entries(
    layout: &GptLayout,
    entries: &[u8],
    disk_size: u64,
) -> Result<Vec<Partition>, Error> {
    let bad = |why: String| Error::BadTable(format!("GPT entries: {why}"));
    if entries.len() as u64 != layout.entries_len() {
        return Err(bad("short".into()));
    }
    if crc32fast::hash(entries) != layout.entries_crc {
        return Err(bad("their CRC does not match the header's".into()));
    }
    let mut partitions = Vec::new();
    for (i, entry) in entries.chunks_exact(layout.entry_size as usize).enumerate() {
        let type_guid = &entry[..16];
        if type_guid.iter().all(|b| *b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (le64(entry, 32), le64(entry, 40));
        let start = first.checked_mul(layout.sector);
        let end = last.checked_add(1).and_then(|l| l.checked_mul(layout.sector));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(bad(format!("partition {number}'s sectors overflow")));
        };
        if first > last || end > disk_size || start < 2 * layout.sector {
            return Err(bad(format!(
                "partition {number} (sectors {first}..={last}) does not fit the disk of \
                 {disk_size} bytes"
            )));
        }
        let name: Vec<u16> = entry[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|c| *c != 0)
            .collect();
        partitions.push(Partition {
            number,
            start,
            len: end - start,
            kind: gpt_type(type_guid),
            name: String::from_utf16_lossy(&name).chars().filter(|c| !c.is_control()).collect(),
        });
    }
    Ok(partitions)
}

/// A GPT type GUID as text, with its name where it is a common one.
fn gpt_type(guid: &[u8]) -> String {
    let text = format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        le32(guid, 0),
        u16::from_le_bytes([guid[4], guid[5]]),
        u16::from_le_bytes([guid[6], guid[7]]),
        guid[8],
        guid[9],
        guid[10..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let known = match text.as_str() {
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => " (Linux file system)",
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => " (EFI system)",
        "21686148-6449-6e6f-744e-656564454649" => " (BIOS boot)",
        "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => " (Linux swap)",
        "e6d6d379-f507-44c2-a23c-238f2a3df928" => " (Linux LVM)",
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => " (Linux root x86-64)",
        "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7" => " (Microsoft basic data)",
        "e3c9e316-0b5c-4db8-817d-f92df00215ae" => " (Microsoft reserved)",
        "de94bba4-06d1-4d40-a16a-bfd50179d6ac" => " (Windows recovery)",
        _ => "",
    };
    format!("{text}{known}")
}

/// One MBR entry, in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MbrEntry {
    /// Its type byte.
    pub kind: u8,
    /// First sector (relative to the table that holds it).
    pub first: u64,
    /// Sectors.
    pub sectors: u64,
}

impl MbrEntry {
    fn partition(&self, number: u32, base: u64) -> Partition {
        Partition {
            number,
            start: (base + self.first) * SECTOR,
            len: self.sectors * SECTOR,
            kind: mbr_type(self.kind),
            name: String::new(),
        }
    }
}

/// The four entries of an MBR sector, or `None` when it is not one (no signature, a GPT's
/// protective MBR, or an entry that does not fit the disk: a boot sector of a file system).
pub fn mbr_entries(sector: &[u8], disk_size: u64) -> Option<[Option<MbrEntry>; 4]> {
    if sector.len() < 512 || sector[510..512] != [0x55, 0xAA] {
        return None;
    }
    let mut entries = [None; 4];
    for (i, slot) in entries.iter_mut().enumerate() {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        if e[0] != 0 && e[0] != 0x80 {
            return None;
        }
        let kind = e[4];
        let (first, sectors) = (u64::from(le32(e, 8)), u64::from(le32(e, 12)));
        if kind == 0 || sectors == 0 {
            continue;
        }
        if kind == 0xEE || first == 0 || (first + sectors) * SECTOR > disk_size {
            return None;
        }
        *slot = Some(MbrEntry { kind, first, sectors });
    }
    entries.iter().any(Option::is_some).then_some(entries)
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// Follows the chain of extended boot records inside `ext`, adding logical partitions 5, 6...
fn logical_partitions(
    disk: &dyn ReadAt,
    ext: &MbrEntry,
    size: u64,
    out: &mut Vec<Partition>,
) -> Result<(), Error> {
    let ext_end = ext.first + ext.sectors;
    let mut next = Some(0u64);
    let mut seen = std::collections::HashSet::new();
    while let Some(rel) = next.take() {
        if !seen.insert(rel) || seen.len() > MAX_LOGICAL {
            return Err(Error::BadTable(
                "the extended partition's chain of boot records loops or is too long".into(),
            ));
        }
        let ebr_at = ext.first + rel;
        let mut sector = [0u8; SECTOR as usize];
        disk.read_at(ebr_at * SECTOR, &mut sector)
            .map_err(|e| Error::read("an extended boot record", e))?;
        let Some(entries) = mbr_entries(&sector, size) else { break };
        if let Some(logical) = entries[0] {
            let end = ebr_at + logical.first + logical.sectors;
            if end > ext_end {
                return Err(Error::BadTable(format!(
                    "logical partition {} reaches past its extended partition",
                    out.len() + 5
                )));
            }
            let number = 5 + out.iter().filter(|p| p.number >= 5).count() as u32;
            out.push(logical.partition(number, ebr_at));
        }
        if let Some(link) = entries[1].filter(|e| is_extended(e.kind)) {
            next = Some(link.first);
        }
    }
    Ok(())
}

/// An MBR type byte as text, with its name where it is a common one.
fn mbr_type(kind: u8) -> String {
    let known = match kind {
        0x83 => " (Linux)",
        0x82 => " (Linux swap)",
        0x8E => " (Linux LVM)",
        0x07 => " (NTFS/exFAT)",
        0x0B | 0x0C => " (FAT32)",
        0x06 | 0x0E => " (FAT16)",
        0xEF => " (EFI system)",
        0xFD => " (Linux RAID)",
        _ => "",
    };
    format!("0x{kind:02x}{known}")
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
