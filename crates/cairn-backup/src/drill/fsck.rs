//! Checking the file systems of a restored copy with `e2fsck`.
//!
//! Each ext2/3/4 volume is checked in place inside the disk image, in two runs: one that only replays the journal on the copy (a
//! crash-consistent point has one to replay; a frozen one does not), then a forced read-only
//! check whose exit status is the verdict. The checker is found in the system's own folders,
//! never through `PATH`, runs with a clean environment and a time limit, and as root drops to
//! `nobody` (through util-linux's `setpriv`) on a copy handed to that user: a crafted file
//! system that trips a bug in the checker gains nothing. The copy reaches it as its standard
//! input (`e2fsck` opens `/dev/stdin?offset=N`), so the work folder stays private (0700) and
//! no path of the operator's is ever parsed by the checker.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cairn_files::{FsKind, TableKind};

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

/// Finds the volumes of the restored disk at `copy` and checks each ext2/3/4 one.
pub(super) async fn check_volumes(copy: &Path, e2fsck: &Path) -> Result<Vec<VolumeCheck>, Error> {
    let file =
        std::fs::File::open(copy).map_err(|source| Error::Target { path: copy.into(), source })?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let volumes: Vec<(String, u64, u64)> = match cairn_files::read_table(&file) {
        Err(e) => {
            return Ok(vec![VolumeCheck {
                volume: "the disk".into(),
                fs: "unknown".into(),
                outcome: CheckOutcome::NotChecked(format!("its partition table: {e}")),
            }]);
        }
        Ok(table) if table.kind == TableKind::None => vec![("the whole disk".into(), 0, size)],
        Ok(table) => table
            .partitions
            .iter()
            .map(|p| (format!("partition {}", p.number), p.start, p.len))
            .collect(),
    };
    let mut handed = false;
    let mut out = Vec::new();
    for (volume, start, len) in volumes {
        let fs = match cairn_files::detect(&file, start, len) {
            Ok(fs) => fs,
            Err(e) => {
                out.push(VolumeCheck {
                    volume,
                    fs: "unknown".into(),
                    outcome: CheckOutcome::Failed(format!("its first sectors: {e}")),
                });
                continue;
            }
        };
        let outcome = match fs {
            FsKind::Ext4 => {
                if !handed && privilege_drop().is_some() {
                    std::os::unix::fs::chown(copy, Some(NOBODY), Some(NOBODY))
                        .map_err(|source| Error::Target { path: copy.into(), source })?;
                    handed = true;
                }
                e2fsck_volume(e2fsck, copy, start).await?
            }
            FsKind::Swap => CheckOutcome::NotChecked("swap space holds no files".into()),
            FsKind::Unknown => CheckOutcome::NotChecked("no file system found".into()),
            other => CheckOutcome::NotChecked(format!(
                "drills check ext2/3/4 today; {} comes with its reader",
                other.name()
            )),
        };
        out.push(VolumeCheck { volume, fs: fs.name().into(), outcome });
    }
    Ok(out)
}

/// Replays the journal of the ext2/3/4 volume at byte `start` of `copy`, then checks it.
async fn e2fsck_volume(e2fsck: &Path, copy: &Path, start: u64) -> Result<CheckOutcome, Error> {
    let target = format!("/dev/stdin?offset={start}");
    // 0: nothing to do; 1: the journal was replayed (or errors fixed); 2: the same, "reboot".
    let (code, said) = run(e2fsck, copy, &["-y", "-E", "journal_only", &target]).await?;
    if !matches!(code, Some(0..=2)) {
        return Ok(CheckOutcome::Failed(format!(
            "replaying its journal, e2fsck {}: {said}",
            status(code)
        )));
    }
    let (code, said) = run(e2fsck, copy, &["-f", "-n", &target]).await?;
    Ok(match code {
        Some(0) => CheckOutcome::Clean,
        Some(4) => CheckOutcome::Failed(format!("e2fsck found errors: {said}")),
        other => CheckOutcome::Failed(format!("e2fsck {}: {said}", status(other))),
    })
}

fn status(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exited {c}"),
        None => format!("was stopped (killed, or over its {} s limit)", CHECK_TIME_LIMIT.as_secs()),
    }
}

/// Runs the checker with `args` and `copy` as its standard input: its exit code (None when
/// killed or too slow) and the last lines it printed, made safe to show (the names in them
/// are the guest's).
async fn run(e2fsck: &Path, copy: &Path, args: &[&str]) -> Result<(Option<i32>, String), Error> {
    let input =
        std::fs::File::open(copy).map_err(|source| Error::Target { path: copy.into(), source })?;
    let mut command = match privilege_drop() {
        Some(setpriv) => {
            let mut c = tokio::process::Command::new(setpriv);
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "--no-new-privs",
                "--",
            ])
            .arg(e2fsck);
            c
        }
        None => tokio::process::Command::new(e2fsck),
    };
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::from(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().map_err(|e| {
        Error::InvalidRequest(format!(
            "the file system checker {} could not be started ({e}): install e2fsprogs",
            e2fsck.display()
        ))
    })?;
    match tokio::time::timeout(CHECK_TIME_LIMIT, child.wait_with_output()).await {
        Ok(Ok(output)) => {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            Ok((output.status.code(), last_lines(&text)))
        }
        Ok(Err(e)) => Err(Error::Internal(format!("waiting for e2fsck: {e}"))),
        Err(_) => Ok((None, "no answer within the time limit".into())),
    }
}

/// The last few lines of the checker's output, control characters shown as `?`.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(6)..];
    tail.iter()
        .map(|l| {
            l.chars().take(200).map(|c| if c.is_control() { '?' } else { c }).collect::<String>()
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
        assert!(shown.starts_with("a / b?[31mred / "), "{shown}");
        assert!(!shown.contains('\x1b'));
        assert!(shown.len() < 240);
    }
}
