//! Partition tables: GPT and MBR (with logical partitions) written here by the book, read
//! back; crafted tables refused with a reason; arbitrary bytes never panic.

use cairn_files::{Error, TableKind, read_table};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const LINUX: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];

/// A disk of `size` bytes with a GPT (512-byte sectors) holding `parts` as (first, last
/// sector, name).
fn gpt_disk(size: u64, parts: &[(u64, u64, &str)]) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    // Protective MBR.
    disk[446 + 4] = 0xEE;
    disk[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    disk[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xAA;
    let mut entries = vec![0u8; 128 * 128];
    for (i, (first, last, name)) in parts.iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[..16].copy_from_slice(&LINUX);
        e[16] = i as u8 + 1;
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (j, c) in name.encode_utf16().enumerate().take(36) {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&c.to_le_bytes());
        }
    }
    let mut h = vec![0u8; 92];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&(size / 512 - 1).to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(size / 512 - 34).to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    disk[512..604].copy_from_slice(&h);
    disk[1024..1024 + entries.len()].copy_from_slice(&entries);
    disk
}

/// Writes an MBR-style entry `slot` into the sector at `at`.
fn mbr_entry(disk: &mut [u8], at: usize, slot: usize, kind: u8, first: u32, sectors: u32) {
    let e = &mut disk[at + 446 + 16 * slot..at + 446 + 16 * (slot + 1)];
    e[4] = kind;
    e[8..12].copy_from_slice(&first.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    disk[at + 510] = 0x55;
    disk[at + 511] = 0xAA;
}

#[test]
fn gpt_partitions_are_read_with_their_names_and_types() {
    let disk = gpt_disk(8 * MIB, &[(2048, 4095, "boot"), (4096, 16350, "root")]);
    let table = read_table(&disk).unwrap();
    assert_eq!(table.kind, TableKind::Gpt);
    assert_eq!(table.partitions.len(), 2);
    let root = &table.partitions[1];
    assert_eq!((root.number, root.start, root.len), (2, 4096 * 512, (16351 - 4096) * 512));
    assert_eq!(root.name, "root");
    assert!(root.kind.contains("Linux file system"), "{}", root.kind);
}

#[test]
fn damaged_or_crafted_gpts_are_refused_with_a_reason() {
    let good = gpt_disk(8 * MIB, &[(2048, 4095, "a")]);
    // A flipped byte in the header.
    let mut disk = good.clone();
    disk[512 + 40] ^= 1;
    assert!(matches!(read_table(&disk), Err(Error::BadTable(m)) if m.contains("CRC")));
    // A flipped byte in the entries.
    let mut disk = good.clone();
    disk[1024 + 33] ^= 1;
    assert!(matches!(read_table(&disk), Err(Error::BadTable(m)) if m.contains("CRC")));
    // A partition past the disk's end (CRCs right).
    let disk = gpt_disk(8 * MIB, &[(2048, 1 << 40, "huge")]);
    assert!(matches!(read_table(&disk), Err(Error::BadTable(m)) if m.contains("does not fit")));
    // Overflowing sectors.
    let disk = gpt_disk(8 * MIB, &[(u64::MAX - 1, u64::MAX, "wrap")]);
    assert!(matches!(read_table(&disk), Err(Error::BadTable(_))));
}

#[test]
fn mbr_primary_and_logical_partitions_are_numbered_as_linux_does() {
    let mut disk = vec![0u8; 16 * MIB as usize];
    mbr_entry(&mut disk, 0, 0, 0x83, 2048, 8192);
    mbr_entry(&mut disk, 0, 1, 0x05, 10240, 20480);
    // First EBR at sector 10240: logical 5, then a link to the next EBR.
    let ebr1 = 10240 * 512;
    mbr_entry(&mut disk, ebr1, 0, 0x82, 2048, 4096);
    mbr_entry(&mut disk, ebr1, 1, 0x05, 8192, 8192);
    let ebr2 = (10240 + 8192) * 512;
    mbr_entry(&mut disk, ebr2, 0, 0x83, 2048, 4096);
    let table = read_table(&disk).unwrap();
    assert_eq!(table.kind, TableKind::Mbr);
    let got: Vec<_> = table.partitions.iter().map(|p| (p.number, p.start, p.len)).collect();
    assert_eq!(
        got,
        vec![
            (1, 2048 * 512, 8192 * 512),
            (5, (10240 + 2048) * 512, 4096 * 512),
            (6, (10240 + 8192 + 2048) * 512, 4096 * 512),
        ]
    );
    assert!(table.partitions[1].kind.contains("swap"));
}

#[test]
fn an_extended_partition_chain_that_loops_is_refused() {
    let mut disk = vec![0u8; 16 * MIB as usize];
    mbr_entry(&mut disk, 0, 0, 0x05, 2048, 20480);
    // Boot records at relative sectors 0, 1024 and 2048, the last linking back to 1024.
    for (rel, next) in [(0u32, 1024u32), (1024, 2048), (2048, 1024)] {
        let at = (2048 + rel as usize) * 512;
        mbr_entry(&mut disk, at, 0, 0x83, 64, 64);
        mbr_entry(&mut disk, at, 1, 0x05, next, 64);
    }
    assert!(matches!(read_table(&disk), Err(Error::BadTable(m)) if m.contains("loops")));
}

#[test]
fn a_bare_file_system_or_an_empty_disk_has_no_table() {
    let disk = vec![0u8; MIB as usize];
    assert_eq!(read_table(&disk).unwrap().kind, TableKind::None);
    // A boot sector whose "entries" do not fit the disk is not an MBR.
    let mut disk = vec![0u8; MIB as usize];
    mbr_entry(&mut disk, 0, 0, 0x83, 2048, 1 << 30);
    assert_eq!(read_table(&disk).unwrap().kind, TableKind::None);
    assert_eq!(read_table(&vec![0u8; 100]).unwrap().kind, TableKind::None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any set of partitions written as a GPT reads back as written.
    #[test]
    fn gpt_round_trips(parts in proptest::collection::vec((34u64..16000, 0u64..300), 0..10)) {
        let parts: Vec<(u64, u64, &str)> = parts.iter().map(|(f, n)| (*f, f + n, "p")).collect();
        let disk = gpt_disk(8 * MIB, &parts);
        let table = read_table(&disk).unwrap();
        prop_assert_eq!(table.kind, TableKind::Gpt);
        prop_assert_eq!(table.partitions.len(), parts.len());
        for (p, (first, last, _)) in table.partitions.iter().zip(&parts) {
            prop_assert_eq!(p.start, first * 512);
            prop_assert_eq!(p.len, (last - first + 1) * 512);
        }
    }

    /// Arbitrary bytes over a table's sectors never panic, and whatever is read fits the disk.
    #[test]
    fn arbitrary_tables_never_panic(
        noise in proptest::collection::vec(any::<u8>(), 0..40000),
        at in 0usize..2048,
        gpt in any::<bool>(),
    ) {
        let mut disk = if gpt { gpt_disk(MIB, &[(2048 / 4, 1000, "x")]) } else { vec![0u8; MIB as usize] };
        let end = (at + noise.len()).min(disk.len());
        disk[at..end].copy_from_slice(&noise[..end - at]);
        if !gpt && noise.len() > 512 {
            disk[510] = 0x55;
            disk[511] = 0xAA;
        }
        if let Ok(table) = read_table(&disk) {
            for p in table.partitions {
                prop_assert!(p.start.checked_add(p.len).is_some_and(|e| e <= MIB));
            }
        }
    }
}
