//! The volumes of a disk a drill checks: its partitions (or the whole disk when it has no
//! table), each with its file system as detected. Both ways of checking (e2fsck on a copy,
//! reading every file from the vault) start from this list.

use cairn_files::{FsKind, ReadAt, TableKind};

use super::{CheckOutcome, VolumeCheck};
use crate::Error;

/// Volumes of one disk checked at most (a crafted table may list thousands).
const MAX_VOLUMES: usize = 128;

/// One volume to check.
pub(super) struct Volume {
    /// "partition 1", or "the whole disk".
    pub name: String,
    pub start: u64,
    pub len: u64,
    /// Its partition, if it is one.
    pub partition: Option<cairn_files::Partition>,
}

/// What the drill does with one volume.
pub(super) enum Step {
    /// Check this ext2/3/4 volume.
    Check(Volume),
    /// Nothing to check, or damage found already: the outcome.
    Settled(VolumeCheck),
}

/// The volumes of `disk` (`size` bytes) and what to do with each. `host` sorts a read error:
/// `Err` for the host's or the backend's trouble (the drill stops and notes nothing), `Ok`
/// with the error for the point's damage (the volume fails).
pub(super) fn plan(
    disk: &dyn ReadAt,
    size: u64,
    host: &dyn Fn(cairn_files::Error) -> Result<cairn_files::Error, Error>,
) -> Result<Vec<Step>, Error> {
    let volumes: Vec<Volume> = match cairn_files::read_table(disk) {
        Err(e) => {
            let e = host(e)?;
            return Ok(vec![Step::Settled(VolumeCheck {
                volume: "the disk".into(),
                fs: "unknown".into(),
                outcome: CheckOutcome::Failed(format!("its partition table: {e}")),
            })]);
        }
        Ok(table) if table.kind == TableKind::None => {
            vec![Volume { name: "the whole disk".into(), start: 0, len: size, partition: None }]
        }
        Ok(table) => table
            .partitions
            .iter()
            .map(|p| Volume {
                name: format!("partition {}", p.number),
                start: p.start,
                len: p.len,
                partition: Some(p.clone()),
            })
            .collect(),
    };
    let mut starts = std::collections::HashSet::new();
    let mut steps = Vec::new();
    for volume in volumes {
        let fs = match cairn_files::detect(disk, volume.start, volume.len) {
            Ok(fs) => fs,
            Err(e) => {
                let e = host(e)?;
                steps.push(Step::Settled(VolumeCheck {
                    volume: volume.name,
                    fs: "unknown".into(),
                    outcome: CheckOutcome::Failed(format!("its first sectors: {e}")),
                }));
                continue;
            }
        };
        let not_checked = |why: String| {
            Step::Settled(VolumeCheck {
                volume: volume.name.clone(),
                fs: fs.name().into(),
                outcome: CheckOutcome::NotChecked(why),
            })
        };
        let step = match fs {
            FsKind::Ext4 if !starts.insert(volume.start) => {
                not_checked("it starts where another partition does".into())
            }
            FsKind::Ext4 if starts.len() > MAX_VOLUMES => {
                not_checked(format!("more than {MAX_VOLUMES} volumes on one disk"))
            }
            FsKind::Ext4 => match claims_more_than(disk, &volume)
                .or_else(|e| host(e).map(|e| Some(format!("its superblock: {e}"))))?
            {
                Some(why) => Step::Settled(VolumeCheck {
                    volume: volume.name.clone(),
                    fs: fs.name().into(),
                    outcome: CheckOutcome::Failed(why),
                }),
                None => Step::Check(volume),
            },
            FsKind::Swap => not_checked("swap space holds no files".into()),
            FsKind::Unknown => not_checked("no file system found".into()),
            other => not_checked(format!(
                "drills check ext2/3/4 today; {} comes with its reader",
                other.name()
            )),
        };
        steps.push(step);
    }
    Ok(steps)
}

/// Why the ext2/3/4 file system of `volume` is damaged, if its superblock claims more bytes
/// than the volume holds (a checker given the disk from the volume's start would take what
/// follows for its own).
fn claims_more_than(
    disk: &dyn ReadAt,
    volume: &Volume,
) -> Result<Option<String>, cairn_files::Error> {
    let mut head = vec![0u8; 2048.min(volume.len) as usize];
    disk.read_at(volume.start, &mut head).map_err(|e| cairn_files::Error::Read {
        what: "the volume's superblock".into(),
        source: e,
    })?;
    Ok(match cairn_files::ext4_size(&head) {
        Some(size) if size > volume.len => Some(format!(
            "its superblock says the file system spans {size} bytes, more than the {} bytes of \
             its partition: damaged or crafted",
            volume.len
        )),
        Some(_) => None,
        None => Some("its superblock is unreadable (block size or count out of range)".into()),
    })
}
