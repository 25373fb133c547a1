//! The in-guest hook: the same script contract as on the host, one post-script per
//! pre-script, and a report for every phase.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cairn_snapshot::guest_hook::{FREEZE_REPORT, HookReport, Phase, THAW_REPORT, run_hook};

fn file(path: &Path, text: &str, mode: u32) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_path_buf()
}

fn setup(dir: &Path, config_mode: u32) -> PathBuf {
    let log = dir.join("log");
    let pre = file(&dir.join("pre"), &format!("#!/bin/sh\necho pre >> {}\n", log.display()), 0o700);
    let post =
        file(&dir.join("post"), &format!("#!/bin/sh\necho post >> {}\n", log.display()), 0o700);
    let config = format!(
        r#"{{"preScriptLocation":"{}","postScriptLocation":"{}","timeoutInSeconds":5,"fsFreezeEnabled":false}}"#,
        pre.display(),
        post.display()
    );
    file(&dir.join("config.json"), &config, config_mode)
}

fn report(dir: &Path, name: &str) -> HookReport {
    HookReport::parse(&std::fs::read(dir.join(name)).unwrap()).unwrap()
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("log")).unwrap_or_default()
}

#[test]
fn no_configuration_runs_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (r, code) = run_hook(Phase::Freeze, &dir.path().join("absent.json"), dir.path());
    assert_eq!(code, 0);
    assert_eq!((r.config, r.pre, r.error), (None, None, None));
    assert_eq!(report(dir.path(), FREEZE_REPORT).phase, Phase::Freeze);
    let (r, code) = run_hook(Phase::Thaw, &dir.path().join("absent.json"), dir.path());
    assert_eq!((code, r.post), (0, None));
}

#[test]
fn each_pre_script_gets_one_post_script_at_the_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), 0o600);
    let (r, code) = run_hook(Phase::Freeze, &config, dir.path());
    assert_eq!(code, 0);
    assert!(r.pre.as_ref().unwrap().succeeded && r.post.is_none() && !r.fs_freeze);
    assert_eq!(log(dir.path()), "pre\n");
    let (r, code) = run_hook(Phase::Thaw, &config, dir.path());
    assert_eq!(code, 0);
    assert!(r.post.as_ref().unwrap().succeeded);
    assert_eq!(report(dir.path(), THAW_REPORT), r);
    // A second thaw (the watchdog's, someone else's) owes nothing.
    let (r, _) = run_hook(Phase::Thaw, &config, dir.path());
    assert!(r.post.is_none());
    assert_eq!(log(dir.path()), "pre\npost\n");
}

#[test]
fn an_unsafe_configuration_runs_nothing_and_the_freeze_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), 0o644);
    let (r, code) = run_hook(Phase::Freeze, &config, dir.path());
    assert_eq!(code, 0);
    assert!(r.error.as_deref().unwrap().contains("chmod 600"), "{r:?}");
    assert!(r.pre.is_none());
    let (r, _) = run_hook(Phase::Thaw, &config, dir.path());
    assert!(r.post.is_none());
    assert_eq!(log(dir.path()), "");
}

#[test]
fn the_thaw_runs_the_post_script_the_freeze_read_even_if_the_file_goes() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), 0o600);
    run_hook(Phase::Freeze, &config, dir.path());
    std::fs::remove_file(&config).unwrap();
    let (r, _) = run_hook(Phase::Thaw, &config, dir.path());
    assert!(r.post.as_ref().unwrap().succeeded, "{r:?}");
    assert_eq!(log(dir.path()), "pre\npost\n");
}

#[test]
fn a_hook_installed_twice_runs_once_per_phase() {
    // Both copies run under the same hook script (here: this test process).
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), 0o600);
    for _ in 0..2 {
        run_hook(Phase::Freeze, &config, dir.path());
    }
    for _ in 0..2 {
        run_hook(Phase::Thaw, &config, dir.path());
    }
    assert_eq!(log(dir.path()), "pre\npost\n");
    assert!(report(dir.path(), THAW_REPORT).post.is_some(), "the second copy kept the report");
}
