//! Restoring in place: over the disk a point came from, writing only the blocks that differ.
//!
//! Each block already on the target is read and hashed with the vault's chunk ids (keyed in
//! an encrypted vault, so the comparison needs no plaintext from the vault); a block whose
//! id matches the point's is left as it is, and a hole or zero block is left where the target
//! already reads zeros. Only the rest is fetched. After a small change this reads the target
//! once and fetches a small part of the point.
//!
//! It is not atomic: a restore that stops halfway leaves a target that is part old, part new
//! (run it again to finish). So it needs `--force`, and it refuses a target that anything
//! holds open for writing: a file or device any process has open for writing (from
//! `/proc/PID/fdinfo`), and a device that is mounted or held (opened with `O_EXCL`, which the
//! kernel refuses while it is).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use cairn_format::ChunkIds;
use cairn_format::index::BlockEntry;

/// Which blocks of one page of the disk (starting at `base`) the target already holds:
/// `true` where it does.
pub(crate) fn already_there(
    target: &File,
    ids: &ChunkIds,
    entries: &[BlockEntry],
    base: u64,
    block: u64,
    size: u64,
) -> io::Result<Vec<bool>> {
    let mut buf = vec![0u8; block as usize];
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let at = base + i as u64 * block;
        let len = block.min(size.saturating_sub(at)) as usize;
        let bytes = &mut buf[..len];
        target.read_exact_at(bytes, at)?;
        let same = match entry.content() {
            Some(digest) => ids.of(bytes) == *digest,
            None => bytes.iter().all(|b| *b == 0),
        };
        out.push(same);
    }
    Ok(out)
}

/// The processes that hold `opened` (a file or block device) open for writing, as "PID (NAME)".
/// Only processes this one may look at are seen: run as root to see them all.
pub(crate) fn writers_of(opened: &std::fs::Metadata) -> Vec<String> {
    let device = opened.file_type().is_block_device();
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for proc in procs.flatten() {
        let Some(pid) = proc.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            // A stat through /proc/PID/fd/N reaches the open file itself, whatever its name.
            let Ok(meta) = std::fs::metadata(fd.path()) else { continue };
            let same = if device {
                meta.file_type().is_block_device() && meta.rdev() == opened.rdev()
            } else {
                meta.dev() == opened.dev() && meta.ino() == opened.ino()
            };
            if !same {
                continue;
            }
            let info = proc.path().join("fdinfo").join(fd.file_name());
            if opened_for_writing(&std::fs::read_to_string(info).unwrap_or_default()) {
                let name = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
                found.push(format!("{pid} ({})", name.trim()));
                break;
            }
        }
    }
    found
}

/// Whether an fdinfo text says the descriptor was opened for writing (`flags:` in octal;
/// access mode `O_WRONLY` or `O_RDWR`).
fn opened_for_writing(fdinfo: &str) -> bool {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & 0o3 != 0)
}

/// Refuses a target someone holds open for writing, naming them.
pub(crate) fn refuse_if_written(target: &Path, opened: &std::fs::Metadata) -> io::Result<()> {
    let writers = writers_of(opened);
    if writers.is_empty() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "it is open for writing by process {}; an in-place restore would mix its writes with \
         the restore's: stop the VM (or whatever holds {}) first",
        writers.join(", "),
        target.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_access_modes_are_read() {
        assert!(!opened_for_writing("pos:\t0\nflags:\t0100000\nmnt_id:\t1\n"));
        assert!(opened_for_writing("pos:\t0\nflags:\t0100001\n"));
        assert!(opened_for_writing("pos:\t0\nflags:\t02100002\n"));
        assert!(!opened_for_writing("flags:\tnot octal\n"));
        assert!(!opened_for_writing(""));
    }

    #[test]
    fn a_file_open_for_writing_elsewhere_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, b"x").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        // Our own descriptors do not count: the restore opens the target itself.
        let _mine = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(writers_of(&meta).is_empty());
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3>>\"$0\"; read line")
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the shell has the file open as its fd 3, without timing. Until it execs,
        // the child holds copies of this test's descriptors (fd 3 may be another file): the
        // link must name the file, and the child must run the shell, not this test.
        let (fd3, exe) =
            (format!("/proc/{}/fd/3", child.id()), format!("/proc/{}/exe", child.id()));
        let ours = std::env::current_exe().unwrap();
        while std::fs::read_link(&fd3).ok().as_deref() != Some(path.as_path())
            || std::fs::read_link(&exe).ok().as_deref() == Some(ours.as_path())
        {
            assert!(child.try_wait().unwrap().is_none(), "the shell could not open the file");
            std::thread::yield_now();
        }
        let found = writers_of(&meta);
        drop(child.stdin.take());
        child.wait().unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with(&child.id().to_string()), "{found:?}");
        let err = refuse_if_written(&path, &meta);
        assert!(err.is_ok(), "the writer has gone");
    }
}
