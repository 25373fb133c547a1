//! Checking the file systems of a restored copy with `e2fsck`.
//!
//! Each ext2/3/4 volume is checked in place inside the disk image, in two runs: one in preen
//! mode that replays the journal on the copy and makes only the fixes that are safe (a
//! crash-consistent point has a journal to replay; anything more is damage, and fails), then a
//! forced read-only check whose exit status is the verdict. A checker that ends without a
//! verdict (its own failure, the time limit) is an error: nothing is noted on the point.
//!
//! The checker is found in the system's own folders, never through `PATH`, and runs with a
//! clean environment, a time limit, a bounded tail of its output kept, in a session of its own
//! (`setsid`: no terminal to type into), and as root as `nobody` with no new privileges and
//! killed if the agent dies (util-linux's `setpriv`). The copy is opened once, without
//! following links, handed to `nobody` by its descriptor and given to the checker as its
//! standard input (`e2fsck` opens `/dev/stdin`; each volume is first brought to the start of
//! a file, see [`bring_to_front`]), so the work folder stays private
//! and no path is parsed by the checker.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cairn_files::FsKind;

use super::volumes::Step;
use super::{CheckOutcome, VolumeCheck};
use crate::Error;

/// The longest one `e2fsck` run may take before it counts as failed (a crafted file system
/// must not hold a drill forever).
const CHECK_TIME_LIMIT: Duration = Duration::from_secs(3600);

/// Who runs the checker when the agent is root.
const NOBODY: u32 = 65534;

/// Where the system's own programs are: the only folders a checker is taken from.
const SYSTEM_FOLDERS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Debian's `e2fsck` (package e2fsprogs), from the system's own folders.
pub fn find_e2fsck() -> Option<PathBuf> {
    find_program("e2fsck")
}

fn find_program(name: &str) -> Option<PathBuf> {
    SYSTEM_FOLDERS.iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `setpriv`, when the checker should drop to `nobody` (the agent is root).
fn privilege_drop() -> Option<PathBuf> {
    if is_root() { find_program("setpriv") } else { None }
}

/// Checks that the checker runs, and (as root) runs as `nobody`: a drill that could not
/// check would restore a whole disk for nothing, and one that ran the checker as root on a
/// guest's bytes would be a hole.
pub(super) async fn preflight(e2fsck: &Path) -> Result<(), Error> {
    if is_root() && privilege_drop().is_none() {
        return Err(Error::InvalidRequest(
            "as root, a drill runs e2fsck as nobody through util-linux's setpriv, which was not \
             found in /usr/bin or /bin: install util-linux"
                .into(),
        ));
    }
    let input = std::fs::File::open("/dev/null")
        .map_err(|source| Error::Target { path: "/dev/null".into(), source })?;
    match run(e2fsck, input, &["-V"]).await? {
        (Some(0), _) => Ok(()),
        (code, said) => Err(Error::InvalidRequest(format!(
            "the file system checker {} cannot run{} ({}: {said}): install e2fsprogs, or give \
             an e2fsck that user may run",
            e2fsck.display(),
            if is_root() { " as nobody" } else { "" },
            status(code)
        ))),
    }
}

/// A read of the local copy that failed is the host's trouble (a failing disk, an I/O error),
/// not the point's: it is an `Err`, and nothing is noted. A read past the copy's end is the
/// point's (its table or volume claims more than the disk holds), and is returned to fail it.
fn host_trouble(copy: &Path, e: cairn_files::Error) -> Result<cairn_files::Error, Error> {
    match e {
        cairn_files::Error::Read { source, .. }
            if source.kind() != std::io::ErrorKind::UnexpectedEof =>
        {
            Err(Error::Target { path: copy.into(), source })
        }
        e => Ok(e),
    }
}

/// Finds the volumes of the restored disk at `copy` and checks each ext2/3/4 one. The copy
/// is opened once, never through a link, and that one descriptor is what is handed to the
/// checker. `Err` means a check could not run (nothing of the point is to be concluded).
pub(super) async fn check_volumes(copy: &Path, e2fsck: &Path) -> Result<Vec<VolumeCheck>, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    // Writable: the bytes before each volume are cut from it in turn.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(copy)
        .map_err(|source| Error::Target { path: copy.into(), source })?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let steps = super::volumes::plan(&file, size, &|e| host_trouble(copy, e))?;
    let handed = privilege_drop().is_some();
    if handed {
        hand_over(&file, copy)?;
    }
    // Outcomes in the table's order; volumes checked in the order they start on the disk.
    let mut out: Vec<Option<VolumeCheck>> = Vec::with_capacity(steps.len());
    let mut checks = Vec::new();
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Step::Settled(check) => out.push(Some(check)),
            Step::Check(volume) => {
                out.push(None);
                checks.push((i, volume));
            }
        }
    }
    checks.sort_by_key(|(_, v)| v.start);
    // Bytes cut from the copy's front so far: each volume is brought to offset 0 in turn.
    let mut cut = 0u64;
    for (i, volume) in checks {
        let (outcome, scratch) = match bring_to_front(&file, copy, volume.start - cut)? {
            Front::Collapsed => {
                cut = volume.start;
                (e2fsck_volume(e2fsck, &file).await, None)
            }
            Front::Copied(scratch, path) => {
                if handed {
                    hand_over(&scratch, &path)?;
                }
                (e2fsck_volume(e2fsck, &scratch).await, Some(path))
            }
        };
        if let Some(path) = scratch {
            let _ = std::fs::remove_file(path);
        }
        let outcome = outcome.map_err(|e| match e {
            Error::InvalidRequest(why) => {
                Error::InvalidRequest(format!("{} of {}: {why}", volume.name, copy.display()))
            }
            e => e,
        })?;
        out[i] = Some(VolumeCheck { volume: volume.name, fs: FsKind::Ext4.name().into(), outcome });
    }
    Ok(out.into_iter().flatten().collect())
}

/// Gives the checker's user (`nobody`) the file it checks, by its descriptor.
fn hand_over(file: &std::fs::File, path: &Path) -> Result<(), Error> {
    rustix::fs::fchown(file, Some(nobody_uid()), Some(nobody_gid()))
        .map_err(|e| Error::Target { path: path.into(), source: e.into() })
}

/// Where the volume to check now starts at offset 0.
enum Front {
    /// In the copy itself: what came before it was cut away.
    Collapsed,
    /// In a file of its own beside the copy (removed after the check).
    Copied(std::fs::File, PathBuf),
}

/// Brings the volume that starts `shift` bytes into the copy to offset 0: e2fsck, once it has
/// replayed a journal, opens its device again without the `offset=` it was given (e2fsprogs
/// 1.47), so it must check a file the volume starts. The bytes before it are cut from the copy
/// (`FALLOC_FL_COLLAPSE_RANGE`: no data moves; ext4 and XFS, block-aligned); where that cannot
/// be done, the volume's data is copied into a sparse file of its own.
fn bring_to_front(file: &std::fs::File, copy: &Path, shift: u64) -> Result<Front, Error> {
    use rustix::fs::FallocateFlags;
    let target = |source: std::io::Error| Error::Target { path: copy.into(), source };
    if shift == 0 {
        return Ok(Front::Collapsed);
    }
    match rustix::fs::fallocate(file, FallocateFlags::COLLAPSE_RANGE, 0, shift) {
        Ok(()) => return Ok(Front::Collapsed),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {}
        Err(e) => return Err(target(e.into())),
    }
    let len = file.metadata().map_err(target)?.len().saturating_sub(shift);
    let mut name = copy.as_os_str().to_owned();
    name.push(".volume");
    let path = PathBuf::from(name);
    use std::os::unix::fs::OpenOptionsExt;
    let scratch = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|source| Error::Target { path: path.clone(), source })?;
    if let Err(source) = copy_sparse(file, shift, len, &scratch) {
        let _ = std::fs::remove_file(&path);
        return Err(Error::Target { path, source });
    }
    Ok(Front::Copied(scratch, path))
}

/// Copies the `len` bytes at `start` of `from` to the start of `to`, holes left as holes.
fn copy_sparse(
    from: &std::fs::File,
    start: u64,
    len: u64,
    to: &std::fs::File,
) -> std::io::Result<()> {
    use rustix::fs::SeekFrom;
    to.set_len(len)?;
    let end = start.saturating_add(len);
    let mut at = start;
    while at < end {
        let data = match rustix::fs::seek(from, SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data past `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(from, SeekFrom::Hole(data))?.min(end);
        let (mut off_in, mut off_out) = (data, data - start);
        while off_in < hole {
            let ask = usize::try_from(hole - off_in).unwrap_or(usize::MAX).min(1 << 30);
            let n =
                rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), ask)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        at = hole;
    }
    Ok(())
}

fn nobody_uid() -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(NOBODY)
}

fn nobody_gid() -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(NOBODY)
}

/// Replays the journal of the ext2/3/4 volume at byte `start` of `copy`, then checks it. A
/// checker that could not run to a verdict (its own failure, no memory, the time limit) is an
/// `Err`: the point is neither passed nor failed by it.
async fn e2fsck_volume(e2fsck: &Path, copy: &std::fs::File) -> Result<CheckOutcome, Error> {
    // The volume starts the file (see `bring_to_front`).
    let target = "/dev/stdin";
    let input = || {
        copy.try_clone().map_err(|e| Error::Internal(format!("handing the copy to e2fsck: {e}")))
    };
    let inconclusive = |code: Option<i32>, said: &str| {
        Error::InvalidRequest(format!(
            "e2fsck {} without a verdict ({said}); nothing was noted on the point",
            status(code)
        ))
    };
    // Preen mode: the journal replayed and the safe fixes only (orphans); anything else is
    // damage, which a forced fix (-y) would have repaired on the copy and hidden.
    // Its exit status is a set of bits: 1 fixed (the journal replayed, an orphan), 2 the same
    // ("reboot"), 4 errors left, 8 its own failure, 16 bad usage, 32 cancelled. Errors left
    // are a verdict even when it then gave up (4 + 8: "cannot proceed without a root inode").
    let (code, said) = run(e2fsck, input()?, &["-p", "-E", "journal_only", target]).await?;
    match code {
        Some(c) if c & 4 != 0 => {
            return Ok(CheckOutcome::Failed(format!(
                "replaying its journal, e2fsck found damage it would not fix safely: {said}"
            )));
        }
        Some(0..=3) => {}
        other => return Err(inconclusive(other, &said)),
    }
    let (code, said) = run(e2fsck, input()?, &["-f", "-n", target]).await?;
    match code {
        Some(0) => Ok(CheckOutcome::Clean),
        Some(c) if c & 4 != 0 || c <= 3 => {
            Ok(CheckOutcome::Failed(format!("e2fsck found errors: {said}")))
        }
        other => Err(inconclusive(other, &said)),
    }
}

fn status(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited {c}"),
        None => format!("was stopped (killed, or over its {} s limit)", CHECK_TIME_LIMIT.as_secs()),
    }
}

/// Bytes of the checker's output kept (its last ones): a crafted file system can make it
/// print without end.
const OUTPUT_KEPT: usize = 64 << 10;

/// Runs the checker with `args` and `input` as its standard input, in a session of its own
/// (no controlling terminal to type into) and, as root, as `nobody`, killed if the agent dies:
/// its exit code (None when killed or too slow) and the last lines it printed, made safe to
/// show (the names in them are the guest's).
async fn run(
    e2fsck: &Path,
    input: std::fs::File,
    args: &[&str],
) -> Result<(Option<i32>, String), Error> {
    let mut chain: Vec<std::ffi::OsString> = Vec::new();
    if let Some(setsid) = find_program("setsid") {
        chain.push(setsid.into());
    }
    if let Some(setpriv) = privilege_drop() {
        chain.push(setpriv.into());
        for flag in [
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            "--no-new-privs".into(),
            "--pdeathsig=KILL".into(),
            "--".into(),
        ] {
            chain.push(flag.into());
        }
    }
    chain.push(e2fsck.into());
    let mut command = tokio::process::Command::new(&chain[0]);
    command
        .args(&chain[1..])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::from(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| {
        Error::InvalidRequest(format!(
            "the file system checker {} could not be started ({e}): install e2fsprogs",
            e2fsck.display()
        ))
    })?;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let finished = async {
        let (out, err) = tokio::join!(tail(out), tail(err));
        let status = child.wait().await;
        (out, err, status)
    };
    match tokio::time::timeout(CHECK_TIME_LIMIT, finished).await {
        Ok((out, err, Ok(status))) => {
            let mut text = String::from_utf8_lossy(&out).into_owned();
            text.push_str(&String::from_utf8_lossy(&err));
            Ok((status.code(), last_lines(&text)))
        }
        Ok((_, _, Err(e))) => Err(Error::Internal(format!("waiting for e2fsck: {e}"))),
        Err(_) => Ok((None, "no answer within the time limit".into())),
    }
}

/// The last [`OUTPUT_KEPT`] bytes `from` gives until its end.
async fn tail(from: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let Some(mut from) = from else { return Vec::new() };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * OUTPUT_KEPT {
            kept.drain(..kept.len() - OUTPUT_KEPT);
        }
    }
    if kept.len() > OUTPUT_KEPT {
        kept.drain(..kept.len() - OUTPUT_KEPT);
    }
    kept
}

/// The last few lines of the checker's output, control and invisible characters escaped.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(6)..];
    tail.iter()
        .map(|l| {
            let short: String = l.chars().take(200).collect();
            cairn_files::escape(short.as_bytes())
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_output_is_made_safe_and_short() {
        let text = "a\n\nb\x1b[31mred\n".to_owned() + &"x".repeat(500);
        let shown = last_lines(&text);
        assert!(shown.starts_with("a / b\\x1b[31mred / "), "{shown}");
        assert!(!shown.contains('\x1b'));
        assert!(shown.len() < 250, "{shown}");
    }

    #[test]
    fn a_failing_host_disk_is_an_error_and_a_short_copy_the_points_fault() {
        let read = |kind| cairn_files::Error::Read {
            what: "sector 0".into(),
            source: std::io::Error::new(kind, "test"),
        };
        let copy = Path::new("/var/tmp/copy");
        let host = host_trouble(copy, read(std::io::ErrorKind::Other));
        assert!(matches!(host, Err(Error::Target { .. })), "{host:?}");
        let short = host_trouble(copy, read(std::io::ErrorKind::UnexpectedEof));
        assert!(matches!(short, Ok(cairn_files::Error::Read { .. })), "{short:?}");
        let table = host_trouble(copy, cairn_files::Error::BadTable("crafted".into()));
        assert!(matches!(table, Ok(cairn_files::Error::BadTable(_))), "{table:?}");
    }
}
