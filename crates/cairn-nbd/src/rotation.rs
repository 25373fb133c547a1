//! Dirty-bitmap rotation: one persistent bitmap per disk and recovery point.
//!
//! Bitmap `cairn:VM:DISK:POINT` records every write to the disk since point POINT's view was
//! taken. A backup (1) judges the bitmap of the disk's previous point, (2) adds its own before
//! any data is read, (3) reads the previous bitmap's dirty ranges, and after the commit (4)
//! removes every older Cairn bitmap of the disk. If the backup fails, its own bitmap is removed
//! and the previous one, still recording, serves the next try. Writes between (2) and the view
//! land in both bitmaps: they may be read twice, never missed.

use std::path::{Path, PathBuf};

use cairn_format::{Name, PointId};

use crate::Error;
use crate::qemu::{self, Bitmap};

/// The bitmap that records writes to `disk` of `vm` from the view of `point` on. `:` cannot
/// appear in names or point ids, so the parts cannot run into each other.
pub fn bitmap_name(vm: &Name, disk: &Name, point: &PointId) -> String {
    format!("cairn:{vm}:{disk}:{point}")
}

/// Whether the previous point's bitmap can say what changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Previous {
    /// It can: bitmap `name`, recording since point `since`.
    Bitmap {
        /// The bitmap.
        name: String,
        /// The point whose view started it.
        since: PointId,
        /// Bytes per bit.
        granularity: u64,
    },
    /// It cannot; why (for the point's evidence).
    Unusable(String),
}

/// Judges an image's bitmaps for the disk whose bitmaps start with `prefix`, against the
/// disk's previous point.
pub fn judge(bitmaps: &[Bitmap], prefix: &str, previous: Option<&PointId>) -> Previous {
    let Some(previous) = previous else {
        return Previous::Unusable(
            "no earlier point of this VM has this disk: tracking starts with this point".into(),
        );
    };
    let expected = format!("{prefix}{previous}");
    let Some(b) = bitmaps.iter().find(|b| b.name == expected) else {
        let ours: Vec<&str> =
            bitmaps.iter().map(|b| b.name.as_str()).filter(|n| n.starts_with(prefix)).collect();
        return Previous::Unusable(if ours.is_empty() {
            format!(
                "the image has no dirty bitmap {expected}: it was removed, or the image was \
                 replaced or restored; tracking restarts with this point"
            )
        } else {
            format!(
                "the image's Cairn bitmaps ({}) were not started by the previous point {previous}, \
                 so what changed since it is unknown",
                ours.join(", ")
            )
        });
    };
    if b.in_use() {
        return Previous::Unusable(format!(
            "dirty bitmap {expected} is marked in-use: the image was not closed cleanly (a QEMU or \
             qemu-nbd was killed), so the bitmap may have missed writes"
        ));
    }
    if !b.enabled() {
        return Previous::Unusable(format!(
            "dirty bitmap {expected} is disabled: writes since point {previous} were not recorded"
        ));
    }
    Previous::Bitmap { name: expected, since: previous.clone(), granularity: b.granularity }
}

/// One disk's bitmap rotation for one backup.
#[derive(Debug)]
pub struct Rotation {
    image: PathBuf,
    /// `None` when the image cannot hold a bitmap (qcow2 v2): the next backup will scan.
    started: Option<String>,
    previous: Previous,
    /// The disk's Cairn bitmaps found at the start, removed once the point commits.
    older: Vec<String>,
}

impl Rotation {
    /// At the moment of the view, before any data is read: judges the bitmap of the disk's
    /// `previous` point and adds the bitmap for `point`, of `granularity` bytes per bit, to
    /// qcow2 `image`.
    pub fn begin(
        image: &Path,
        vm: &Name,
        disk: &Name,
        previous: Option<&PointId>,
        point: &PointId,
        granularity: u64,
    ) -> Result<Rotation, Error> {
        let info = qemu::image_info(image)?;
        if info.format != "qcow2" {
            return Err(Error::Qemu {
                tool: "qemu-img",
                detail: format!(
                    "reports {} as {}, not qcow2: dirty bitmaps need qcow2",
                    image.display(),
                    info.format
                ),
            });
        }
        let prefix = format!("cairn:{vm}:{disk}:");
        let mut previous = judge(&info.bitmaps, &prefix, previous);
        let name = bitmap_name(vm, disk, point);
        // An image that cannot hold bitmaps is still backed up, by hash scans; the reason goes
        // into every point's evidence until it is fixed.
        let started = match qemu::add_bitmap(image, &name, granularity) {
            Ok(()) => Some(name),
            Err(e) if info.bitmaps.is_empty() => {
                previous = Previous::Unusable(format!(
                    "no dirty bitmap can be added ({e}); a qcow2 v2 image cannot hold one: \
                     `qemu-img amend -f qcow2 -o compat=1.1 {}` upgrades it",
                    image.display()
                ));
                None
            }
            Err(e) => return Err(e),
        };
        let older = info
            .bitmaps
            .into_iter()
            .map(|b| b.name)
            .filter(|n| n.starts_with(&prefix) && Some(n) != started.as_ref())
            .collect();
        Ok(Rotation { image: image.to_owned(), started, previous, older })
    }

    /// What the previous point's bitmap can tell.
    pub fn previous(&self) -> &Previous {
        &self.previous
    }

    /// The bitmap this backup started, if the image can hold one.
    pub fn started(&self) -> Option<&str> {
        self.started.as_deref()
    }

    /// After the point committed: removes every older Cairn bitmap of the disk.
    ///
    /// They are the ones listed when the backup began: a second `qemu-img info` here cost as
    /// much as a small tracked incremental's reads. A bitmap some other run added meanwhile
    /// (none should) is removed by the next backup's commit instead.
    pub fn committed(self) -> Result<(), Error> {
        for name in &self.older {
            qemu::remove_bitmap(&self.image, name)?;
        }
        Ok(())
    }

    /// After a failed backup: removes this backup's bitmap; the previous one keeps recording.
    pub fn abandoned(self) -> Result<(), Error> {
        match &self.started {
            Some(name) => qemu::remove_bitmap(&self.image, name),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(name: &str, flags: &[&str]) -> Bitmap {
        Bitmap {
            name: name.into(),
            granularity: 65536,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn judges_every_way_a_bitmap_can_lie() {
        let vm: Name = "vm1".parse().unwrap();
        let disk: Name = "os".parse().unwrap();
        let p1: PointId = "20261122T021720.123Z-0123abcd".parse().unwrap();
        let p0: PointId = "20261121T021720.123Z-0123abcd".parse().unwrap();
        let prefix = "cairn:vm1:os:";
        let good = bitmap(&bitmap_name(&vm, &disk, &p1), &["auto"]);
        assert!(matches!(
            judge(std::slice::from_ref(&good), prefix, Some(&p1)),
            Previous::Bitmap { since, .. } if since == p1
        ));
        let why = |bitmaps: &[Bitmap], prev: Option<&PointId>| match judge(bitmaps, prefix, prev) {
            Previous::Unusable(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(why(std::slice::from_ref(&good), None).contains("no earlier point"));
        assert!(why(&[], Some(&p1)).contains("has no dirty bitmap"));
        assert!(why(&[bitmap("cairn:vm1:os:x", &["auto"])], Some(&p1)).contains("not started by"));
        assert!(
            why(&[bitmap(&bitmap_name(&vm, &disk, &p0), &["auto"])], Some(&p1))
                .contains(&p0.to_string())
        );
        assert!(why(&[bitmap(&good.name, &["in-use", "auto"])], Some(&p1)).contains("in-use"));
        assert!(why(&[bitmap(&good.name, &[])], Some(&p1)).contains("disabled"));
        // Another disk's bitmap is not this disk's.
        let other = bitmap(&format!("cairn:vm1:os2:{p1}"), &["auto"]);
        assert!(why(&[other], Some(&p1)).contains("has no dirty bitmap"));
    }
}
