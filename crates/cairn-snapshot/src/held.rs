//! Views kept past their backup: a point's snapshot tier. A kept view leaves the agent's
//! per-process names (which a later agent removes as left by a crash) for a name carrying the
//! point's id, and is released by the agent when the policy's instant-restore time is over.
//! What release deletes is checked against those names, so a record read back from the state
//! folder can delete nothing else.

use std::path::{Path, PathBuf};

use cairn_format::Name;
use serde::{Deserialize, Serialize};

use crate::Error;

/// The marker in a kept view's name.
pub(crate) const HELD: &str = ".cairn-held-";

/// A view kept for instant restores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptView {
    /// The disk.
    pub disk: Name,
    /// `reflink` or `btrfs-snapshot`.
    pub kind: String,
    /// Where the disk's image reads, as it was at the capture.
    pub path: PathBuf,
    /// What release removes: the clone file, or the snapshot's subvolume.
    pub handle: PathBuf,
    /// The image format `path` holds, when the view knows it (a running QEMU's clone of a
    /// `qcow2` image is itself a qcow2 image); else the disk's configured format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// A tag (a point id) fit for a file name.
pub(crate) fn check_tag(tag: &str) -> Result<(), Error> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::io(
            format!("keeping a view as {tag:?}"),
            std::io::Error::other("not a point id"),
        ))
    }
}

impl KeptView {
    /// True if the record names a kept view: a kept clone's name (`.cairn-held-`), or a kept
    /// snapshot's (`cairn-held-*`) in a `.cairn-views` folder. Nothing else is ever removed.
    pub fn is_kept_name(&self) -> bool {
        let name =
            self.handle.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match self.kind.as_str() {
            "reflink" => name.contains(HELD),
            "btrfs-snapshot" => {
                let parent = self.handle.parent().unwrap_or(Path::new("/"));
                name.starts_with(&HELD[1..])
                    && parent.file_name().is_some_and(|n| n == ".cairn-views")
            }
            _ => false,
        }
    }

    /// Removes the kept view (see [`KeptView::is_kept_name`]; anything else is refused). A
    /// view already gone counts as released only when its folder is there (a datastore not
    /// mounted right now is an error, to try again later).
    pub fn release(&self) -> Result<(), Error> {
        let refuse = |why: &str| {
            Err(Error::io(
                format!("releasing kept view {}", self.handle.display()),
                std::io::Error::other(why.to_owned()),
            ))
        };
        if !self.is_kept_name() {
            return refuse("not a kept view's name");
        }
        let parent = self.handle.parent().unwrap_or(Path::new("/"));
        let name =
            self.handle.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound && parent.is_dir();
        match self.kind.as_str() {
            "reflink" => match std::fs::symlink_metadata(&self.handle) {
                Ok(m) if m.is_file() => std::fs::remove_file(&self.handle).map_err(|e| {
                    Error::io(format!("removing kept view {}", self.handle.display()), e)
                }),
                Ok(_) => refuse("not a regular file"),
                Err(e) if gone(&e) => Ok(()),
                Err(e) => Err(Error::io(format!("reading {}", self.handle.display()), e)),
            },
            _ => match std::fs::symlink_metadata(&self.handle) {
                Ok(m) if m.is_dir() => {
                    let dir = std::fs::File::open(parent)
                        .map_err(|e| Error::io(format!("opening {}", parent.display()), e))?;
                    crate::sys::btrfs_delete(&dir, &name).map_err(|e| {
                        Error::io(format!("deleting kept snapshot {}", self.handle.display()), e)
                    })
                }
                Ok(_) => refuse("not a snapshot"),
                Err(e) if gone(&e) => Ok(()),
                Err(e) => Err(Error::io(format!("reading {}", self.handle.display()), e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_removes_only_what_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join(format!(".disk.img{HELD}20261203T010203.000Z-0a1b2c3d"));
        std::fs::write(&kept, b"view").unwrap();
        let view = |handle: PathBuf, kind: &str| KeptView {
            disk: "d".parse().unwrap(),
            kind: kind.into(),
            path: handle.clone(),
            handle,
            format: None,
        };
        view(kept.clone(), "reflink").release().unwrap();
        assert!(!kept.exists());
        // Released twice: nothing left, nothing to do.
        view(kept.clone(), "reflink").release().unwrap();
        // A record naming another file (a tampered state folder) deletes nothing.
        let image = dir.path().join("disk.img");
        std::fs::write(&image, b"the VM's disk").unwrap();
        assert!(view(image.clone(), "reflink").release().is_err());
        assert!(view(image.clone(), "btrfs-snapshot").release().is_err());
        assert!(view(image.clone(), "lvm").release().is_err());
        assert!(image.exists());
        // Its folder gone (a datastore not mounted): not released, to try again.
        let unmounted = dir.path().join("gone").join(format!(".d{HELD}p"));
        assert!(view(unmounted, "reflink").release().is_err());
        let link = dir.path().join(format!("x{HELD}y"));
        std::os::unix::fs::symlink(&image, &link).unwrap();
        assert!(view(link, "reflink").release().is_err());
        assert!(image.exists());
        assert!(check_tag("20261203T010203.000Z-0a1b2c3d").is_ok());
        assert!(check_tag("../x").is_err() && check_tag("").is_err());
    }
}
