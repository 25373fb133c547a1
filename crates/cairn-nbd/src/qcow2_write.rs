//! A qcow2 image written by Cairn itself: a restore's output under `--format qcow2`.
//!
//! The image is written in one pass, in whatever order the data arrives. Host cluster 0 is kept
//! for the header; a guest cluster gets the next host cluster the first time any byte of it
//! is written; the metadata (L2 tables, the L1 table, the refcount blocks and their table)
//! is appended once the data is in, and the header is written last of all. Until then the
//! file's first cluster is zeros, so no tool takes a half-written image for a whole one.
//!
//! Guest clusters never written stay unallocated and read as zeros (the image has no backing
//! file), so a disk's holes stay holes; the unwritten parts of an allocated cluster are holes
//! in the host file. Every host cluster is referenced exactly once: each has refcount 1 and
//! every L1 and L2 entry carries the COPIED flag, as qemu itself writes a fresh image, so
//! `qemu-img check` finds nothing to say. Version 3, 16-bit refcounts, no extensions.
//!
//! Memory: the L2 tables are held until the end, allocated only where data was written, so
//! about 8 bytes per allocated cluster (128 MiB for 1 TiB of data in 64 KiB clusters).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::qcow2::MAGIC;

/// L1 and L2 entries: the cluster's refcount is exactly 1.
const COPIED: u64 = 1 << 63;
/// Smallest and largest cluster sizes qemu accepts (512 B .. 2 MiB); Cairn uses 64 KiB and up.
const MIN_CLUSTER_BITS: u32 = 16;
const MAX_CLUSTER_BITS: u32 = 21;
/// log2 of the refcount width: 16-bit refcounts, qemu's default.
const REFCOUNT_ORDER: u32 = 4;
/// Length of a version 3 header with no optional fields.
const HEADER_LENGTH: u32 = 104;

/// Writes a qcow2 image of a disk of `size` bytes into a file.
pub struct Qcow2Writer {
    file: File,
    size: u64,
    cluster_bits: u32,
    /// One L2 table per L1 entry, where any cluster under it was written.
    l2: Vec<Option<Box<[u64]>>>,
    /// The next free host offset.
    end: u64,
}

impl Qcow2Writer {
    /// The cluster size (as bits) for a disk stored in blocks of `block_size` bytes: the block
    /// size, kept within 64 KiB and 2 MiB, so that a block fills whole clusters.
    pub fn cluster_bits_for(block_size: u32) -> u32 {
        block_size.max(1).ilog2().clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)
    }

    /// Starts an image of a disk of `size` bytes in `file`, which must be empty and open for
    /// writing.
    pub fn new(file: File, size: u64, cluster_bits: u32) -> io::Result<Self> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a qcow2 cluster of 2^{cluster_bits} bytes is out of range"),
            ));
        }
        let cluster = 1u64 << cluster_bits;
        let clusters = size.div_ceil(cluster);
        let l1_len = clusters.div_ceil(cluster / 8).max(1);
        // The L1 table's length is a u32 in the header; a guest this large is refused.
        if l1_len > u64::from(u32::MAX) / 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a disk of {size} bytes is too large for a qcow2 image"),
            ));
        }
        file.set_len(0)?;
        Ok(Qcow2Writer {
            file,
            size,
            cluster_bits,
            l2: (0..l1_len).map(|_| None).collect(),
            end: cluster,
        })
    }

    fn cluster(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Writes `data` at guest offset `at`.
    pub fn write(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        let end = at.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes at {at} lie past the disk's end ({})", data.len(), self.size),
            ));
        }
        let cluster = self.cluster();
        let mut done = 0usize;
        while done < data.len() {
            let pos = at + done as u64;
            let within = pos & (cluster - 1);
            let n = ((cluster - within) as usize).min(data.len() - done);
            let host = self.host_of(pos >> self.cluster_bits);
            self.file.write_all_at(&data[done..done + n], host + within)?;
            done += n;
        }
        Ok(())
    }

    /// The host offset of guest cluster `index`, allocated at the end on first use.
    fn host_of(&mut self, index: u64) -> u64 {
        let per_table = self.cluster() / 8;
        let cluster = self.cluster();
        let table = self.l2[(index / per_table) as usize]
            .get_or_insert_with(|| vec![0u64; per_table as usize].into_boxed_slice());
        let slot = &mut table[(index % per_table) as usize];
        if *slot == 0 {
            *slot = self.end;
            self.end += cluster;
        }
        *slot
    }

    /// Appends the metadata, writes the header, syncs, and returns the file.
    pub fn finish(mut self) -> io::Result<File> {
        let cluster = self.cluster();
        let mut l1 = vec![0u64; self.l2.len()];
        for (i, table) in self.l2.iter().enumerate() {
            let Some(table) = table else { continue };
            let bytes: Vec<u8> = table
                .iter()
                .flat_map(|&host| if host == 0 { 0 } else { host | COPIED }.to_be_bytes())
                .collect();
            self.file.write_all_at(&bytes, self.end)?;
            l1[i] = self.end | COPIED;
            self.end += cluster;
        }
        let l1_offset = self.end;
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&l1_bytes, l1_offset)?;
        self.end += (l1_bytes.len() as u64).div_ceil(cluster) * cluster;

        // The refcounts cover every cluster, their own included: grow both counts until they
        // hold themselves.
        let used = self.end / cluster;
        let per_block = cluster * 8 / (1 << REFCOUNT_ORDER);
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = used + blocks + table_clusters;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cluster);
            if (need_blocks, need_table) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (need_blocks, need_table);
        }
        let total = used + blocks + table_clusters;
        let table_offset = self.end;
        let blocks_offset = table_offset + table_clusters * cluster;
        let table: Vec<u8> =
            (0..blocks).flat_map(|k| (blocks_offset + k * cluster).to_be_bytes()).collect();
        self.file.write_all_at(&table, table_offset)?;
        for k in 0..blocks {
            let first = k * per_block;
            let count = total.saturating_sub(first).min(per_block);
            let mut block = vec![0u8; cluster as usize];
            for entry in block.chunks_exact_mut(2).take(count as usize) {
                entry.copy_from_slice(&1u16.to_be_bytes());
            }
            self.file.write_all_at(&block, blocks_offset + k * cluster)?;
        }
        self.file.set_len(total * cluster)?;

        let mut header = vec![0u8; HEADER_LENGTH as usize];
        let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, MAGIC);
        put(4, &3u32.to_be_bytes());
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.size.to_be_bytes());
        put(36, &(l1.len() as u32).to_be_bytes());
        put(40, &l1_offset.to_be_bytes());
        put(48, &table_offset.to_be_bytes());
        put(56, &(table_clusters as u32).to_be_bytes());
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &HEADER_LENGTH.to_be_bytes());
        // The data and metadata are durable before the header makes them an image.
        self.file.sync_data()?;
        self.file.write_all_at(&header, 0)?;
        self.file.sync_all()?;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Reads guest offset `at` back through the image's tables, as a reader would.
    fn read_back(image: &[u8], at: u64, len: usize) -> Vec<u8> {
        let be = |o: u64| u64::from_be_bytes(image[o as usize..o as usize + 8].try_into().unwrap());
        let bits = u32::from_be_bytes(image[20..24].try_into().unwrap());
        let cluster = 1u64 << bits;
        let l1_offset = be(40);
        let mut out = Vec::new();
        for pos in at..at + len as u64 {
            let index = pos >> bits;
            let l1 = be(l1_offset + (index / (cluster / 8)) * 8) & !COPIED;
            let byte = if l1 == 0 {
                0
            } else {
                let host = be(l1 + (index % (cluster / 8)) * 8) & !COPIED;
                if host == 0 { 0 } else { image[(host + (pos & (cluster - 1))) as usize] }
            };
            out.push(byte);
        }
        out
    }

    #[test]
    fn data_written_in_any_order_reads_back_and_the_rest_is_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        let file = File::create_new(&path).unwrap();
        let size = (3 << 20) + 4096 + 100;
        let mut w = Qcow2Writer::new(file, size, 16).unwrap();
        w.write(2 << 20, &[7u8; 70_000]).unwrap(); // across two clusters
        w.write(0, &[1u8; 4096]).unwrap();
        w.write(size - 100, &[9u8; 100]).unwrap(); // the short tail
        assert!(w.write(size - 99, &[0u8; 100]).is_err(), "past the end");
        drop(w.finish().unwrap());
        let mut image = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut image).unwrap();
        assert_eq!(&image[..4], MAGIC);
        assert_eq!(read_back(&image, 0, 4096), vec![1u8; 4096]);
        assert_eq!(read_back(&image, 4096, 10), vec![0u8; 10]);
        assert_eq!(read_back(&image, 2 << 20, 70_000), vec![7u8; 70_000]);
        assert_eq!(read_back(&image, (2 << 20) + 70_000, 8), vec![0u8; 8]);
        assert_eq!(read_back(&image, 1 << 20, 8), vec![0u8; 8], "a cluster never written");
        assert_eq!(read_back(&image, size - 100, 100), vec![9u8; 100]);
        // Header, three data clusters (one for 0, two for the run), one for the tail's, an L2
        // table, the L1 table, a refcount table and block: all of it, and nothing more.
        assert_eq!(image.len() as u64, 9 << 16);
        let header = crate::qcow2::parse_header(&image).unwrap();
        assert_eq!((header.version, header.virtual_size), (3, size));
    }

    #[test]
    fn cluster_sizes_follow_the_block_size_within_qemu_s_range() {
        assert_eq!(Qcow2Writer::cluster_bits_for(4096), 16);
        assert_eq!(Qcow2Writer::cluster_bits_for(1 << 20), 20);
        assert_eq!(Qcow2Writer::cluster_bits_for(4 << 20), 21);
        let file = tempfile::tempfile().unwrap();
        assert!(Qcow2Writer::new(file, 1, 12).is_err());
    }
}
