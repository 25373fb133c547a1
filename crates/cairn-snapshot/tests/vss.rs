//! The VSS requester against simulated writers: every rung of the fallback ladder.

use std::time::Duration;

use cairn_format::Consistency;
use cairn_snapshot::Record;
use cairn_snapshot::vss::simulated::{Behaviour, SimWriter, SimulatedVss};
use cairn_snapshot::vss::{self, BackupType, HResult, VssOptions, VssSnapshot, WriterState};

fn volumes() -> Vec<String> {
    vec!["C:\\".into(), "D:\\".into()]
}

fn healthy() -> Vec<SimWriter> {
    vec![
        SimWriter::new("System Writer", Behaviour::Healthy),
        SimWriter::new("SqlServerWriter", Behaviour::Healthy),
        SimWriter::new("Registry Writer", Behaviour::Healthy),
    ]
}

fn with(name: &str, behaviour: Behaviour) -> Vec<SimWriter> {
    let mut writers = healthy();
    writers.push(SimWriter::new(name, behaviour));
    writers
}

fn options() -> VssOptions {
    VssOptions { start_retry_delay: Duration::ZERO, ..Default::default() }
}

fn run(
    sim: &mut SimulatedVss,
    options: &VssOptions,
) -> (Result<VssSnapshot, cairn_snapshot::Error>, Record) {
    let mut record = Record::new(Consistency::Crash);
    let result = vss::run(sim, &volumes(), options, &mut record);
    (result, record)
}

fn kinds(record: &Record) -> Vec<String> {
    record.evidence().iter().map(|e| format!("{}: {}", e.kind, e.message)).collect()
}

#[test]
fn healthy_writers_give_an_application_consistent_full_backup() {
    let mut sim = SimulatedVss::with_writers(healthy());
    let (snap, mut record) = run(&mut sim, &options());
    let snap = snap.unwrap();
    assert_eq!(snap.level, Consistency::Application);
    assert!(snap.failed_writers.is_empty());
    assert_eq!(snap.devices.len(), 2);
    assert!(snap.devices["D:\\"].ends_with("ShadowCopy2"), "{:?}", snap.devices);
    assert_eq!(sim.backup_type(), Some(BackupType::Full));
    // Backup-complete (which lets writers truncate logs) only comes with the commit.
    assert!(!sim.calls.contains(&"backup_complete".to_string()));
    snap.finish(&mut sim, true, &mut record);
    assert_eq!(
        sim.calls,
        [
            "gather_writer_metadata",
            "set_backup_state(Full, writers=true)",
            "start_snapshot_set",
            "add_to_snapshot_set(C:\\)",
            "add_to_snapshot_set(D:\\)",
            "prepare_for_backup",
            "do_snapshot_set(writers)",
            "gather_writer_status",
            "backup_complete",
        ]
    );
    assert!(
        kinds(&record).iter().any(|k| k.contains("full backup complete")),
        "{:?}",
        kinds(&record)
    );
}

#[test]
fn copy_backups_are_an_option() {
    let mut sim = SimulatedVss::with_writers(healthy());
    let options = VssOptions { backup_type: BackupType::Copy, ..options() };
    let (snap, mut record) = run(&mut sim, &options);
    let snap = snap.unwrap();
    assert_eq!(snap.level, Consistency::Application);
    assert_eq!(sim.backup_type(), Some(BackupType::Copy));
    snap.finish(&mut sim, true, &mut record);
    assert!(!kinds(&record).iter().any(|k| k.contains("truncate")));
}

#[test]
fn an_uncommitted_point_aborts_instead_of_completing() {
    let mut sim = SimulatedVss::with_writers(healthy());
    let (snap, mut record) = run(&mut sim, &options());
    snap.unwrap().finish(&mut sim, false, &mut record);
    assert_eq!(sim.calls.last().map(String::as_str), Some("abort_backup"));
    assert!(!sim.calls.contains(&"backup_complete".to_string()));
}

#[test]
fn a_slow_writer_within_its_timeout_is_fine() {
    let mut sim = SimulatedVss::with_writers(with(
        "SlowWriter",
        Behaviour::SlowFreeze(Duration::from_secs(45)),
    ));
    let (snap, _) = run(&mut sim, &options());
    assert_eq!(snap.unwrap().level, Consistency::Application);
}

/// Each writer failure drops the point to file-system consistency and names the writer.
#[test]
fn a_failing_or_timed_out_writer_is_named_and_drops_to_file_system() {
    let cases = [
        (Behaviour::FailsAt(WriterState::FailedAtIdentify), "FailedAtIdentify"),
        (Behaviour::FailsAt(WriterState::FailedAtPrepareBackup), "FailedAtPrepareBackup"),
        (Behaviour::FailsAt(WriterState::FailedAtPrepareSnapshot), "FailedAtPrepareSnapshot"),
        (Behaviour::FailsAt(WriterState::FailedAtFreeze), "FailedAtFreeze"),
        (Behaviour::FailsAt(WriterState::FailedAtThaw), "FailedAtThaw"),
        (Behaviour::FailsAt(WriterState::FailedAtPostSnapshot), "FailedAtPostSnapshot"),
        (Behaviour::SlowFreeze(Duration::from_secs(90)), "VSS_E_WRITERERROR_TIMEOUT"),
        (Behaviour::CrashesBeforeThaw, "vanished"),
    ];
    for (behaviour, expected) in cases {
        let mut sim = SimulatedVss::with_writers(with("ExchangeWriter", behaviour.clone()));
        let (snap, record) = run(&mut sim, &options());
        let snap = snap.unwrap();
        assert_eq!(snap.level, Consistency::FileSystem, "{behaviour:?}");
        assert_eq!(snap.failed_writers, ["ExchangeWriter"], "{behaviour:?}");
        let evidence = kinds(&record);
        assert!(
            evidence.iter().any(|k| k.starts_with("vss_writer: writer ExchangeWriter failed")
                && k.contains(expected)),
            "{behaviour:?}: {evidence:?}"
        );
        assert!(
            evidence.iter().any(|k| k.starts_with("fallback:") && k.contains("ExchangeWriter")),
            "{evidence:?}"
        );
        // The snapshot itself was made with the other writers: no second set was needed.
        assert_eq!(sim.calls.iter().filter(|c| c.starts_with("do_snapshot_set")).count(), 1);
    }
}

#[test]
fn the_flush_and_hold_window_passing_falls_back_to_a_snapshot_without_writers() {
    let mut sim = SimulatedVss::with_writers(healthy());
    sim.flush_times = [Duration::from_secs(12), Duration::from_secs(2)].into();
    let (snap, mut record) = run(&mut sim, &options());
    let snap = snap.unwrap();
    assert_eq!(snap.level, Consistency::FileSystem);
    let evidence = kinds(&record);
    assert!(
        evidence
            .iter()
            .any(|k| k.contains("10-second window") && k.contains("VSS_E_HOLD_WRITES_TIMEOUT")),
        "{evidence:?}"
    );
    assert!(sim.calls.contains(&"abort_backup".to_string()));
    assert!(sim.calls.contains(&"set_backup_state(Copy, writers=false)".to_string()));
    assert!(sim.calls.contains(&"do_snapshot_set(no writers)".to_string()));
    snap.finish(&mut sim, true, &mut record);
    assert!(
        !kinds(&record).iter().any(|k| k.contains("truncate")),
        "a writerless snapshot lets no writer truncate"
    );
}

#[test]
fn a_writer_hanging_in_metadata_falls_back_to_a_snapshot_without_writers() {
    let mut sim = SimulatedVss::with_writers(with(
        "HungWriter",
        Behaviour::SlowIdentify(Duration::from_secs(600)),
    ));
    let (snap, record) = run(&mut sim, &options());
    assert_eq!(snap.unwrap().level, Consistency::FileSystem);
    assert!(
        kinds(&record)
            .iter()
            .any(|k| k.contains("gathering writer metadata failed: ERROR_TIMEOUT")),
        "{:?}",
        kinds(&record)
    );
    assert_eq!(sim.calls[0], "gather_writer_metadata");
    assert_eq!(sim.calls[1], "abort_backup");
}

#[test]
fn a_machine_without_writers_is_file_system_consistent() {
    let mut sim = SimulatedVss::with_writers(vec![]);
    let (snap, record) = run(&mut sim, &options());
    assert_eq!(snap.unwrap().level, Consistency::FileSystem);
    assert!(kinds(&record).iter().any(|k| k.contains("no VSS writer")), "{:?}", kinds(&record));
}

#[test]
fn another_snapshot_set_in_progress_is_retried() {
    let mut sim = SimulatedVss::with_writers(healthy());
    sim.start_results =
        [HResult::SNAPSHOT_SET_IN_PROGRESS, HResult::SNAPSHOT_SET_IN_PROGRESS].into();
    let (snap, _) = run(&mut sim, &options());
    assert_eq!(snap.unwrap().level, Consistency::Application);
    assert_eq!(sim.calls.iter().filter(|c| *c == "start_snapshot_set").count(), 3);
}

#[test]
fn when_no_shadow_copy_can_be_made_the_error_says_to_fall_back_to_crash_consistency() {
    let mut sim = SimulatedVss::with_writers(healthy());
    sim.provider_failure = Some(HResult::INSUFFICIENT_STORAGE);
    let (snap, record) = run(&mut sim, &options());
    let err = snap.unwrap_err().to_string();
    assert!(
        err.contains("VSS_E_INSUFFICIENT_STORAGE") && err.contains("crash-consistent"),
        "{err}"
    );
    assert_eq!(sim.calls.iter().filter(|c| *c == "abort_backup").count(), 2);
    assert!(kinds(&record).iter().any(|k| k.starts_with("fallback:")));
}

#[test]
fn a_snapshot_set_still_busy_after_every_attempt_falls_through() {
    let mut sim = SimulatedVss::with_writers(healthy());
    sim.start_results = std::iter::repeat_n(HResult::SNAPSHOT_SET_IN_PROGRESS, 6).collect();
    let (snap, _) = run(&mut sim, &options());
    let err = snap.unwrap_err().to_string();
    assert!(err.contains("VSS_E_SNAPSHOT_SET_IN_PROGRESS"), "{err}");
}

mod lifecycle {
    use std::path::PathBuf;

    use cairn_format::Consistency;
    use cairn_snapshot::vss::simulated::{Behaviour, SimWriter, SimulatedVss};
    use cairn_snapshot::vss::{VssOptions, VssSession};
    use cairn_snapshot::{DiskSpec, ViewProvider, VmState, capture};

    fn disks() -> Vec<DiskSpec> {
        vec![
            DiskSpec { name: "os".parse().unwrap(), path: PathBuf::from("C:\\") },
            DiskSpec { name: "data".parse().unwrap(), path: PathBuf::from("D:\\") },
        ]
    }

    fn session(writers: Vec<SimWriter>) -> VssSession<SimulatedVss> {
        let volumes = vec!["C:\\".to_string(), "D:\\".to_string()];
        VssSession::new(SimulatedVss::with_writers(writers), volumes, VssOptions::default())
    }

    #[test]
    fn a_committed_capture_reads_shadow_copies_then_completes_the_backup() {
        let mut vss = session(super::healthy());
        let views = vss.views();
        let pairs: Vec<(DiskSpec, &dyn ViewProvider)> =
            disks().into_iter().map(|d| (d, &views as &dyn ViewProvider)).collect();
        let c = capture(&mut vss, &pairs, VmState::Running).unwrap();
        assert_eq!(c.level(), Consistency::Application);
        let paths: Vec<String> = c.views().iter().map(|v| v.path().display().to_string()).collect();
        assert!(
            paths[0].ends_with("ShadowCopy1") && paths[1].ends_with("ShadowCopy2"),
            "{paths:?}"
        );
        assert!(!vss.with_backend(|b| b.calls.contains(&"backup_complete".to_string())));
        c.release(true).unwrap();
        let calls = vss.with_backend(|b| b.calls.clone());
        assert_eq!(calls.last().map(String::as_str), Some("backup_complete"), "{calls:?}");
        assert_eq!(
            calls.iter().filter(|c| *c == "backup_complete").count(),
            1,
            "once, after the last view"
        );
    }

    #[test]
    fn a_failed_backup_aborts_and_a_failed_writer_lowers_the_level() {
        let mut vss =
            session(vec![SimWriter::new("SqlServerWriter", Behaviour::CrashesBeforeThaw)]);
        let views = vss.views();
        let pairs: Vec<(DiskSpec, &dyn ViewProvider)> =
            disks().into_iter().map(|d| (d, &views as &dyn ViewProvider)).collect();
        let c = capture(&mut vss, &pairs, VmState::Running).unwrap();
        assert_eq!(c.level(), Consistency::FileSystem);
        drop(c);
        let calls = vss.with_backend(|b| b.calls.clone());
        assert_eq!(calls.last().map(String::as_str), Some("abort_backup"));
        assert!(!calls.contains(&"backup_complete".to_string()));
    }

    /// The simulation, with aborts also counted where the test can see them after the
    /// session is gone.
    struct Counted(SimulatedVss, std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl cairn_snapshot::vss::VssBackend for Counted {
        fn gather_writer_metadata(
            &mut self,
            t: std::time::Duration,
        ) -> Result<Vec<cairn_snapshot::vss::WriterInfo>, cairn_snapshot::vss::HResult> {
            self.0.gather_writer_metadata(t)
        }
        fn set_backup_state(
            &mut self,
            k: cairn_snapshot::vss::BackupType,
            w: bool,
        ) -> Result<(), cairn_snapshot::vss::HResult> {
            self.0.set_backup_state(k, w)
        }
        fn start_snapshot_set(&mut self) -> Result<(), cairn_snapshot::vss::HResult> {
            self.0.start_snapshot_set()
        }
        fn add_to_snapshot_set(&mut self, v: &str) -> Result<(), cairn_snapshot::vss::HResult> {
            self.0.add_to_snapshot_set(v)
        }
        fn prepare_for_backup(
            &mut self,
            t: std::time::Duration,
        ) -> Result<(), cairn_snapshot::vss::HResult> {
            self.0.prepare_for_backup(t)
        }
        fn do_snapshot_set(
            &mut self,
            t: std::time::Duration,
        ) -> Result<(), cairn_snapshot::vss::HResult> {
            self.0.do_snapshot_set(t)
        }
        fn gather_writer_status(
            &mut self,
            t: std::time::Duration,
        ) -> Result<Vec<cairn_snapshot::vss::WriterStatus>, cairn_snapshot::vss::HResult> {
            self.0.gather_writer_status(t)
        }
        fn snapshot_device(&mut self, v: &str) -> Result<String, cairn_snapshot::vss::HResult> {
            self.0.snapshot_device(v)
        }
        fn backup_complete(
            &mut self,
            t: std::time::Duration,
        ) -> Result<(), cairn_snapshot::vss::HResult> {
            self.0.backup_complete(t)
        }
        fn abort_backup(&mut self) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.abort_backup()
        }
    }

    #[test]
    fn a_volume_outside_the_snapshot_set_is_refused_and_the_set_aborted() {
        let aborts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let backend = Counted(SimulatedVss::with_writers(super::healthy()), aborts.clone());
        let mut vss = VssSession::new(backend, vec!["C:\\".to_string()], VssOptions::default());
        let views = vss.views();
        let e = DiskSpec { name: "e".parse().unwrap(), path: PathBuf::from("E:\\") };
        let err =
            capture(&mut vss, &[(e, &views as &dyn ViewProvider)], VmState::Running).err().unwrap();
        assert!(err.to_string().contains("not in the VSS snapshot set"), "{err}");
        assert_eq!(aborts.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(views);
        drop(vss);
        assert_eq!(
            aborts.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the session aborts its unused set"
        );
    }
}
