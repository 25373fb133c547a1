//! The script contract: modes and owners, timeouts, retries, post-scripts that always run,
//! and `continueBackupOnFailure` both ways.

use cairn_testkit::root_or_skip;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cairn_format::Consistency;
use cairn_snapshot::scripts::{ScriptConfig, Scripts};
use cairn_snapshot::views::LiveRead;
use cairn_snapshot::{DiskSpec, Error, GuestQuiescer, VmState, capture};

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A script (mode 700) running `body` with bash.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        p
    }

    /// A config (mode 600) for the two scripts, with `extra` JSON fields.
    fn config(&self, pre: &Path, post: &Path, extra: &str) -> PathBuf {
        let p = self.path("VMSnapshotScriptPluginConfig.json");
        let timeout =
            if extra.contains("timeoutInSeconds") { "" } else { "\"timeoutInSeconds\": 5,\n  " };
        let text = format!(
            r#"{{
  "pluginName": "ScriptRunner",
  "preScriptLocation": "{}",
  "postScriptLocation": "{}",
  "preScriptParams": ["{}", ""],
  "postScriptParams": ["{}"],
  {timeout}"ScriptsExecutionPollTimeSeconds": 1{extra}
}}"#,
            pre.display(),
            post.display(),
            self.dir.path().display(),
            self.dir.path().display()
        );
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Standard scripts: pre logs "pre" (and runs `pre_body`), post logs "post".
    fn standard(&self, pre_body: &str, post_body: &str, extra: &str) -> PathBuf {
        let pre = self.script("pre.sh", &format!("echo pre >> \"$1/log\"\n{pre_body}"));
        let post = self.script("post.sh", &format!("echo post >> \"$1/log\"\n{post_body}"));
        self.config(&pre, &post, extra)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("log")).unwrap_or_default()
    }

    /// Captures one live disk of a running VM with these scripts and no freeze.
    fn capture(&self, config: &Path) -> Result<cairn_snapshot::Capture, Error> {
        let disk = self.path("disk.img");
        std::fs::write(&disk, b"disk").unwrap();
        let scripts = Scripts::load(config)?;
        let mut quiescer = GuestQuiescer::new(Some(scripts), None);
        let spec = DiskSpec { name: "os".parse().unwrap(), path: disk };
        capture(&mut quiescer, &[(spec, &LiveRead)], VmState::Stopped)
    }
}

fn fix_of(e: Error) -> String {
    match e {
        Error::Permissions { fix, .. } => fix,
        other => panic!("not a permissions error: {other}"),
    }
}

#[test]
fn a_config_readable_by_others_is_refused_with_the_chmod_that_fixes_it() {
    let s = Setup::new();
    let config = s.standard("", "", "");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Scripts::load(&config).unwrap_err();
    assert!(e.to_string().contains("its mode is 644, it must be 600"), "{e}");
    assert_eq!(fix_of(e), format!("chmod 600 {}", config.display()));
}

#[test]
fn a_script_writable_by_others_is_refused_with_the_chmod_that_fixes_it() {
    let s = Setup::new();
    let config = s.standard("", "", "");
    for (mode, script) in [(0o755, "pre.sh"), (0o777, "post.sh"), (0o500, "pre.sh")] {
        std::fs::set_permissions(s.path(script), std::fs::Permissions::from_mode(mode)).unwrap();
        let e = Scripts::load(&config).unwrap_err();
        assert_eq!(fix_of(e), format!("chmod 700 {}", s.path(script).display()));
        std::fs::set_permissions(s.path(script), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    assert!(Scripts::load(&config).is_ok());
}

#[test]
fn root_a_script_owned_by_another_user_is_refused_with_the_chown_that_fixes_it() {
    if !root_or_skip() {
        return;
    }
    let s = Setup::new();
    let config = s.standard("", "", "");
    for file in [config.clone(), s.path("post.sh")] {
        std::os::unix::fs::chown(&file, Some(1000), Some(1000)).unwrap();
        let e = Scripts::load(&config).unwrap_err();
        assert!(e.to_string().contains("owned by uid 1000, not root"), "{e}");
        assert_eq!(fix_of(e), format!("chown root:root {}", file.display()));
        std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
    }
}

#[test]
fn a_script_in_a_folder_others_may_write_to_is_refused() {
    let s = Setup::new();
    let open = s.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let pre = open.join("pre.sh");
    std::fs::write(&pre, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&pre, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = s.config(&pre, &s.script("post.sh", ""), "");
    let e = Scripts::load(&config).unwrap_err();
    assert!(e.to_string().contains("may be written by others"), "{e}");
    assert_eq!(fix_of(e), format!("chmod go-w {}", open.display()));
}

#[test]
fn a_script_below_a_folder_others_may_write_to_is_refused_however_deep() {
    let s = Setup::new();
    // Only the grandparent is open: whoever may write there may replace the whole folder.
    let open = s.path("open");
    let inner = open.join("inner");
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o700)).unwrap();
    let pre = inner.join("pre.sh");
    std::fs::write(&pre, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&pre, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = s.config(&pre, &s.script("post.sh", ""), "");
    let e = Scripts::load(&config).unwrap_err();
    assert!(e.to_string().contains("may be written by others"), "{e}");
    assert_eq!(fix_of(e), format!("chmod go-w {}", open.display()));
    // A link from a safe place into the open folder is judged where it leads.
    let link = s.path("link.sh");
    std::os::unix::fs::symlink(&pre, &link).unwrap();
    let config = s.config(&link, &s.script("post.sh", ""), "");
    assert!(Scripts::load(&config).is_err());
}

#[test]
fn the_script_that_runs_is_the_one_that_was_checked() {
    let s = Setup::new();
    let config = s.standard("", "", "");
    let scripts = Scripts::load(&config).unwrap();
    // Replaced after the check (as whoever could write the folder would): the new file never
    // runs, the checked one does.
    let evil = s.path("evil.sh");
    std::fs::write(&evil, format!("#!/bin/bash\necho evil >> {}/log\n", s.dir.path().display()))
        .unwrap();
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::rename(&evil, s.path("pre.sh")).unwrap();
    let run = scripts.run_pre();
    assert!(run.succeeded(), "{:?}", run.attempts);
    assert_eq!(s.log(), "pre\n");
}

#[test]
fn a_vm_configuration_is_held_to_the_rules_of_a_script_configuration() {
    let s = Setup::new();
    let file = s.path("vm.toml");
    std::fs::write(&file, "vm = \"v\"\n[[disk]]\nname = \"os\"\npath = \"/os.img\"\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = cairn_snapshot::VmConfig::load(&file).unwrap_err();
    assert_eq!(fix_of(e), format!("chmod 600 {}", file.display()));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(cairn_snapshot::VmConfig::load(&file).is_ok());
    let open = s.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let moved = open.join("vm.toml");
    std::fs::rename(&file, &moved).unwrap();
    let e = cairn_snapshot::VmConfig::load(&moved).unwrap_err();
    assert_eq!(fix_of(e), format!("chmod go-w {}", open.display()));
}

#[test]
fn a_vm_configuration_is_judged_where_it_lies_and_read_where_it_leads() {
    let s = Setup::new();
    let real = s.path("real");
    std::fs::create_dir(&real).unwrap();
    let file = real.join("vm.toml");
    std::fs::write(&file, "vm = \"v\"\n[[disk]]\nname = \"os\"\npath = \"os.img\"\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A link to it from a safe folder: relative paths are relative to the real file.
    let link = s.path("vm.toml");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let c = cairn_snapshot::VmConfig::load(&link).unwrap();
    assert_eq!(c.disks[0].spec.path, real.canonicalize().unwrap().join("os.img"));
    // A link from a folder others may write to is refused: they could point it elsewhere.
    let open = s.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let planted = open.join("vm.toml");
    std::os::unix::fs::symlink(&file, &planted).unwrap();
    let e = cairn_snapshot::VmConfig::load(&planted).unwrap_err();
    assert_eq!(fix_of(e), format!("chmod go-w {}", open.display()));
}

#[test]
fn a_missing_script_is_refused_by_name() {
    let s = Setup::new();
    let config = s.config(&s.path("nope.sh"), &s.script("post.sh", ""), "");
    let e = Scripts::load(&config).unwrap_err();
    assert!(e.to_string().contains("nope.sh: it does not exist"), "{e}");
}

#[test]
fn bad_fields_are_named() {
    let cases = [
        (
            r#"{"preScriptLocation":"/a","postScriptLocation":"/b","timeoutInSeconds":1801}"#,
            "timeoutInSeconds",
        ),
        (
            r#"{"preScriptLocation":"/a","postScriptLocation":"/b","timeoutInSeconds":0}"#,
            "timeoutInSeconds",
        ),
        (
            r#"{"preScriptLocation":"/a","postScriptLocation":"/b","preScriptNoOfRetries":99}"#,
            "preScriptNoOfRetries",
        ),
        (r#"{"preScriptLocation":"a.sh","postScriptLocation":"/b"}"#, "preScriptLocation"),
        (r#"{"postScriptLocation":"/b"}"#, "preScriptLocation"),
        (
            r#"{"preScriptLocation":"/a","postScriptLocation":"/b","continueOnFailure":true}"#,
            "continueOnFailure",
        ),
        (
            r#"{"preScriptLocation":"/a","postScriptLocation":"/b","ScriptsExecutionPollTimeSeconds":0}"#,
            "ScriptsExecutionPollTimeSeconds",
        ),
    ];
    for (text, field) in cases {
        match ScriptConfig::parse(text, "cfg.json") {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    // Azure's defaults for what is left out.
    let c = ScriptConfig::parse(r#"{"preScriptLocation":"/a","postScriptLocation":"/b"}"#, "x")
        .unwrap();
    assert!(c.continue_on_failure && c.fs_freeze);
    assert_eq!((c.timeout_seconds, c.pre_retries, c.poll_seconds), (30, 0, 2));
}

#[test]
fn scripts_that_succeed_give_application_consistency_with_their_evidence() {
    let s = Setup::new();
    let config = s.standard("echo quiesced", "", "");
    let capture = s.capture(&config).unwrap();
    // The VM is "stopped" in these tests (no freeze, a live disk): the view judges crash,
    // but the scripts' evidence is there.
    assert_eq!(s.log(), "pre\npost\n");
    let scripts: Vec<_> =
        capture.record().evidence().iter().filter(|e| e.kind == "script").collect();
    assert_eq!(scripts.len(), 2);
    assert_eq!(scripts[0].details["succeeded"], true);
    assert_eq!(scripts[0].details["attempts"][0]["exit_code"], 0);
    assert!(scripts[0].details["attempts"][0]["duration_ms"].is_u64());
    assert_eq!(scripts[0].details["output"], "quiesced");
}

#[test]
fn a_hanging_pre_script_times_out_and_the_post_script_still_runs() {
    let s = Setup::new();
    let extra = r#", "timeoutInSeconds": 1, "continueBackupOnFailure": false"#;
    let config = s.standard("sleep 600", "", extra);
    let e = s.capture(&config).err().expect("the backup fails");
    assert!(matches!(e, Error::ScriptFailed { script: "pre", .. }), "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert_eq!(s.log(), "pre\npost\n");
}

#[test]
fn a_failed_pre_script_with_continue_falls_back_and_still_runs_the_post_script() {
    let s = Setup::new();
    let config = s.standard("exit 3", "", "");
    let mut quiescer = GuestQuiescer::new(Some(Scripts::load(&config).unwrap()), None);
    let mut record = cairn_snapshot::Record::new(Consistency::Crash);
    let hold = cairn_snapshot::Quiescer::quiesce(&mut quiescer, &mut record).unwrap();
    hold.resume(&mut record).unwrap();
    assert_eq!(s.log(), "pre\npost\n");
    assert_eq!(record.level(), Consistency::Crash, "no freeze configured: nothing else quiesced");
    let fallback =
        record.evidence().iter().find(|e| e.kind == "fallback").expect("fallback evidence");
    assert!(fallback.message.contains("exit code 3"), "{}", fallback.message);
    assert_eq!(fallback.details["from"], "application");
}

#[test]
fn a_failed_pre_script_without_continue_fails_the_job_after_the_post_script() {
    let s = Setup::new();
    let config = s.standard("exit 4", "", r#", "continueBackupOnFailure": false"#);
    let e = s.capture(&config).err().expect("the backup fails");
    assert!(
        e.to_string().contains("exit code 4")
            && e.to_string().contains("continueBackupOnFailure is false"),
        "{e}"
    );
    assert_eq!(s.log(), "pre\npost\n");
}

#[test]
fn retries_run_the_script_again_until_it_succeeds() {
    let s = Setup::new();
    // Fails on the first two runs, succeeds on the third.
    let pre =
        "n=$(cat \"$1/count\" 2>/dev/null || echo 0); echo $((n+1)) > \"$1/count\"; [ $n -ge 2 ]";
    let config = s.standard(pre, "", r#", "preScriptNoOfRetries": 2"#);
    let run = Scripts::load(&config).unwrap().run_pre();
    assert!(run.succeeded());
    assert_eq!(run.attempts.len(), 3);
    assert_eq!(run.evidence().details["attempts"][0]["exit_code"], 1);
    std::fs::remove_file(s.path("count")).unwrap();
    let config = s.standard(pre, "", r#", "preScriptNoOfRetries": 1"#);
    let run = Scripts::load(&config).unwrap().run_pre();
    assert!(!run.succeeded());
    assert_eq!(run.outcome(), "exit code 1 (after 2 attempts)");
}

#[test]
fn a_failed_post_script_lowers_the_level_or_fails_the_job() {
    let s = Setup::new();
    let config = s.standard("", "exit 5", "");
    let mut quiescer = GuestQuiescer::new(Some(Scripts::load(&config).unwrap()), None);
    let mut record = cairn_snapshot::Record::new(Consistency::Crash);
    let hold = cairn_snapshot::Quiescer::quiesce(&mut quiescer, &mut record).unwrap();
    assert_eq!(record.level(), Consistency::Application);
    hold.resume(&mut record).unwrap();
    assert_eq!(record.level(), Consistency::Crash);
    assert!(
        record.evidence().iter().any(|e| e.kind == "fallback" && e.message.contains("exit code 5"))
    );

    let config = s.standard("", "exit 5", r#", "continueBackupOnFailure": false"#);
    let e = s.capture(&config).err().expect("the backup fails");
    assert!(matches!(e, Error::ScriptFailed { script: "post", .. }), "{e}");
}

#[test]
fn parameters_are_passed_and_empty_ones_dropped() {
    let s = Setup::new();
    let config = s.standard("echo \"args=$#\" >> \"$1/log\"", "", "");
    Scripts::load(&config).unwrap().run_pre();
    assert_eq!(s.log(), "pre\nargs=1\n");
}
