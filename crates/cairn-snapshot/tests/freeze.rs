//! What the freezer refuses before anything is frozen (no root needed: nothing is frozen).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_snapshot::Error;
use cairn_snapshot::freeze::{Freezer, Protected};
use cairn_snapshot::watchdog::WatchdogCommand;

fn watchdog(program: &str) -> WatchdogCommand {
    WatchdogCommand { program: PathBuf::from(program), args: vec![] }
}

fn freezer(mounts: &[&str], protected: &[Protected]) -> Result<Freezer, Error> {
    let mounts: Vec<PathBuf> = mounts.iter().map(PathBuf::from).collect();
    Freezer::new(&mounts, Duration::from_secs(5), watchdog("/nonexistent/watchdog"), protected)
}

#[test]
fn the_root_file_system_is_never_frozen() {
    let e = freezer(&["/"], &[]).err().unwrap();
    assert!(matches!(e, Error::FreezeRefused { .. }), "{e}");
    assert!(e.to_string().contains("refusing to freeze /"), "{e}");
}

#[test]
fn a_folder_that_is_not_a_mount_point_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = freezer(&[dir.path().to_str().unwrap()], &[]).err().unwrap();
    assert!(e.to_string().contains("is not a mount point"), "{e}");
    let e = freezer(&["/nonexistent/mount"], &[]).err().unwrap();
    assert!(e.to_string().contains("/nonexistent/mount"), "{e}");
}

#[test]
fn a_file_system_holding_what_the_agent_writes_to_is_refused_by_name() {
    // /proc is a mount point on every Linux machine; pretend the vault lives in it.
    let protected = [Protected::new("the vault", "/proc/self/not-yet-created/vault")];
    let e = freezer(&["/proc"], &protected).err().unwrap();
    let text = e.to_string();
    assert!(text.contains("refusing to freeze /proc") && text.contains("the vault"), "{text}");
    // The agent's own temporary files, working folder and log are always protected.
    assert!(Protected::of_this_process().iter().any(|p| p.what == "temporary files"));
}

#[test]
fn the_same_file_system_twice_is_refused() {
    let e = freezer(&["/proc", "/proc"], &[]).err().unwrap();
    assert!(
        e.to_string().contains("freeze.mounts[1]") && e.to_string().contains("same file system"),
        "{e}"
    );
}

#[test]
fn without_a_watchdog_nothing_is_frozen() {
    let f = Arc::new(freezer(&["/proc"], &[]).unwrap());
    let e = f.freeze().err().unwrap();
    assert!(matches!(e, Error::Watchdog { .. }), "{e}");
    assert!(e.to_string().contains("nothing was frozen"), "{e}");
}
