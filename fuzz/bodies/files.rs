//! Fuzz bodies for cairn-files: partition tables and ext4 volumes on crafted disks, shared by
//! the fuzz targets and the stable corpus replay.

use std::sync::Arc;

use cairn_files::{ReadAt, Volume, locate, read_table};

/// Partition tables: reading never panics, and every partition read fits the disk.
pub fn partition_table(data: &[u8]) {
    let disk = data.to_vec();
    if let Ok(table) = read_table(&disk) {
        for p in table.partitions {
            assert!(p.start.checked_add(p.len).is_some_and(|end| end <= disk.len() as u64));
        }
    }
}

/// ext4 volumes: locating, opening, listing everything and reading every file never panic
/// (nor loop: the walk is bounded).
pub fn ext4_volume(data: &[u8]) {
    let disk: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    let Ok(at) = locate(disk.as_ref(), None) else { return };
    let Ok(volume) = Volume::open(disk, &at) else { return };
    let mut files = Vec::new();
    let _ = volume.list(b"/", true, 2_000, &mut |e| {
        if e.kind == cairn_files::Kind::File {
            files.push(e.path.clone());
        }
    });
    for path in files.iter().take(200) {
        let _ = volume.read(path, 1 << 20);
    }
}
