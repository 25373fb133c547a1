//! The capture lifecycle: resume on every path, views released once, levels judged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cairn_format::Consistency;
use cairn_snapshot::views::{LiveRead, ReflinkClone};
use cairn_snapshot::{
    DiskSpec, Error, Hold, Quiescer, Record, View, ViewProvider, VmState, capture,
};

/// Counts quiesces and resumes; reaches `level`.
struct Counting {
    level: Consistency,
    resumed: Arc<AtomicUsize>,
    /// Only this disk is covered by what was quiesced (all when `None`).
    covers_only: Option<&'static str>,
}

impl Quiescer for Counting {
    fn quiesce(&mut self, record: &mut Record) -> Result<Box<dyn Hold>, Error> {
        if self.level > Consistency::Crash {
            record.reached(self.level, "test quiescer");
        }
        Ok(Box::new(CountingHold(Arc::clone(&self.resumed))))
    }

    fn holds_still(&self, disk: &DiskSpec) -> bool {
        self.covers_only.is_none_or(|only| disk.name.as_str() == only)
    }
}

struct CountingHold(Arc<AtomicUsize>);

impl Hold for CountingHold {
    fn resume(self: Box<Self>, _: &mut Record) -> Result<(), Error> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Hands out views whose releases are logged; fails or panics for a chosen disk.
#[derive(Default)]
struct Scripted {
    released: Arc<Mutex<Vec<(String, bool)>>>,
    fail_on: Option<&'static str>,
    panic_on: Option<&'static str>,
}

impl ViewProvider for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    fn take(&self, disk: &DiskSpec) -> Result<View, Error> {
        let name = disk.name.to_string();
        if self.panic_on == Some(name.as_str()) {
            panic!("provider panics on {name}");
        }
        if self.fail_on == Some(name.as_str()) {
            return Err(Error::NoSnapshot {
                disk: name,
                path: disk.path.clone(),
                reason: "scripted".into(),
            });
        }
        let log = Arc::clone(&self.released);
        Ok(View::snapshot(
            disk,
            "scripted",
            disk.path.clone(),
            Box::new(move |committed| {
                log.lock().unwrap().push((name, committed));
                Ok(())
            }),
        ))
    }
}

fn disk(name: &str) -> DiskSpec {
    DiskSpec { name: name.parse().unwrap(), path: PathBuf::from(format!("/images/{name}.img")) }
}

fn quiescer(level: Consistency) -> (Counting, Arc<AtomicUsize>) {
    let resumed = Arc::new(AtomicUsize::new(0));
    (Counting { level, resumed: Arc::clone(&resumed), covers_only: None }, resumed)
}

#[test]
fn views_are_read_after_resume_and_released_after_the_commit() {
    let (mut q, resumed) = quiescer(Consistency::FileSystem);
    let provider = Scripted::default();
    let disks = [(disk("os"), &provider as &dyn ViewProvider), (disk("data"), &provider)];
    let c = capture(&mut q, &disks, VmState::Running).unwrap();
    assert_eq!(resumed.load(Ordering::SeqCst), 1, "resumed before the views are handed out");
    assert_eq!(c.level(), Consistency::FileSystem);
    assert_eq!(c.views().len(), 2);
    assert!(c.record().evidence().iter().filter(|e| e.kind == "view").count() == 2);
    assert!(provider.released.lock().unwrap().is_empty());
    c.release(true).unwrap();
    assert_eq!(
        *provider.released.lock().unwrap(),
        [("os".to_string(), true), ("data".to_string(), true)]
    );
}

#[test]
fn a_dropped_capture_releases_its_views_as_uncommitted() {
    let (mut q, _) = quiescer(Consistency::FileSystem);
    let provider = Scripted::default();
    let c =
        capture(&mut q, &[(disk("os"), &provider as &dyn ViewProvider)], VmState::Running).unwrap();
    drop(c);
    assert_eq!(*provider.released.lock().unwrap(), [("os".to_string(), false)]);
}

#[test]
fn a_failing_view_resumes_the_guest_and_releases_the_views_already_taken() {
    let (mut q, resumed) = quiescer(Consistency::Application);
    let provider = Scripted { fail_on: Some("data"), ..Default::default() };
    let disks = [(disk("os"), &provider as &dyn ViewProvider), (disk("data"), &provider)];
    let e = capture(&mut q, &disks, VmState::Running).err().unwrap();
    assert!(e.to_string().contains("no snapshot possible for disk data"), "{e}");
    assert_eq!(resumed.load(Ordering::SeqCst), 1);
    assert_eq!(*provider.released.lock().unwrap(), [("os".to_string(), false)]);
}

#[test]
fn a_panic_while_quiesced_still_resumes_the_guest() {
    let (mut q, resumed) = quiescer(Consistency::Application);
    let provider = Scripted { panic_on: Some("data"), ..Default::default() };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let disks = [(disk("os"), &provider as &dyn ViewProvider), (disk("data"), &provider)];
        capture(&mut q, &disks, VmState::Running).map(|_| ())
    }));
    assert!(result.is_err(), "the panic propagates");
    assert_eq!(resumed.load(Ordering::SeqCst), 1, "resumed while unwinding");
    assert_eq!(*provider.released.lock().unwrap(), [("os".to_string(), false)]);
}

#[test]
fn a_disk_nothing_quiesced_makes_the_point_crash_consistent_at_best() {
    let provider = Scripted::default();
    let two = [(disk("os"), &provider as &dyn ViewProvider), (disk("data"), &provider)];
    let three = [
        (disk("os"), &provider as &dyn ViewProvider),
        (disk("data"), &provider),
        (disk("logs"), &provider),
    ];
    // One unfrozen disk among frozen ones: the others did not change, so one instant.
    let (mut q, _) = quiescer(Consistency::FileSystem);
    q.covers_only = Some("os");
    let c = capture(&mut q, &two, VmState::Running).unwrap();
    assert_eq!(c.level(), Consistency::Crash);
    let why = c.record().evidence().iter().find(|e| e.kind == "fallback").unwrap();
    assert!(
        why.message.contains("disk data") && why.message.contains("holds none of the frozen"),
        "{}",
        why.message
    );
    // Two unfrozen disks were cloned one after the other: no instant holds for both.
    let c = capture(&mut q, &three, VmState::Running).unwrap();
    assert_eq!(c.level(), Consistency::None);
    // Scripts quiesce applications but hold no disk still: the same rule applies.
    let (mut q, _) = quiescer(Consistency::Application);
    q.covers_only = Some("none of them");
    assert_eq!(capture(&mut q, &two, VmState::Running).unwrap().level(), Consistency::None);
    q.covers_only = Some("os");
    assert_eq!(capture(&mut q, &two, VmState::Running).unwrap().level(), Consistency::Application);
}

#[test]
fn levels_follow_what_was_quiesced_and_how_disks_were_viewed() {
    let provider = Scripted::default();
    let one = [(disk("os"), &provider as &dyn ViewProvider)];
    let two = [(disk("os"), &provider as &dyn ViewProvider), (disk("data"), &provider)];
    let level = |q: Consistency, disks: &[(DiskSpec, &dyn ViewProvider)], state| {
        capture(&mut quiescer(q).0, disks, state).unwrap().level()
    };
    assert_eq!(level(Consistency::Application, &two, VmState::Running), Consistency::Application);
    assert_eq!(level(Consistency::Crash, &one, VmState::Running), Consistency::Crash);
    // Two views taken one after the other with nothing quiesced are not one instant.
    assert_eq!(level(Consistency::Crash, &two, VmState::Running), Consistency::None);
    assert_eq!(level(Consistency::Crash, &two, VmState::Stopped), Consistency::Crash);

    let live = [(disk("os"), &LiveRead as &dyn ViewProvider)];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("os.img");
    std::fs::write(&path, b"x").unwrap();
    let live_disk = [(DiskSpec { path, ..live[0].0.clone() }, live[0].1)];
    let c =
        capture(&mut quiescer(Consistency::FileSystem).0, &live_disk, VmState::Running).unwrap();
    assert_eq!(c.level(), Consistency::None);
    assert!(
        c.record()
            .evidence()
            .iter()
            .any(|e| e.kind == "fallback" && e.message.contains("read live"))
    );
    let c = capture(&mut quiescer(Consistency::Crash).0, &live_disk, VmState::Stopped).unwrap();
    assert_eq!(c.level(), Consistency::Crash);
    assert!(c.record().evidence().iter().any(|e| e.message.contains("VM is stopped")));
}

/// On a file system without reflink the error says so and what to do; on one with it, the
/// clone holds the image's bytes and is removed on release.
#[test]
fn reflink_clones_or_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("os.img");
    std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
    let spec = DiskSpec { name: "os".parse().unwrap(), path: path.clone() };
    let (mut q, _) = quiescer(Consistency::Crash);
    match capture(&mut q, &[(spec, &ReflinkClone as &dyn ViewProvider)], VmState::Running) {
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("no snapshot possible for disk os")
                    && text.contains("cannot make reflink clones"),
                "{text}"
            );
            assert!(text.contains("live_read = true"), "{text}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no clone left behind");
        }
        Ok(c) => {
            let clone = c.views()[0].path().to_path_buf();
            assert_ne!(clone, path);
            assert_eq!(std::fs::read(&clone).unwrap(), vec![7u8; 1 << 16]);
            c.release(true).unwrap();
            assert!(!clone.exists());
        }
    }
}

#[test]
fn a_missing_disk_is_named() {
    let spec = DiskSpec { name: "os".parse().unwrap(), path: PathBuf::from("/nonexistent/os.img") };
    for provider in [&ReflinkClone as &dyn ViewProvider, &LiveRead] {
        let e = capture(
            &mut quiescer(Consistency::Crash).0,
            &[(spec.clone(), provider)],
            VmState::Running,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("disk os: /nonexistent/os.img"), "{e}");
    }
}
