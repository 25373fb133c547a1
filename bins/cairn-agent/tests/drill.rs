//! Restore drills: `cairn-agent drill` restores a point to a temporary copy, compares sampled
//! blocks with their digests, checks its ext4 file system with e2fsck and notes the outcome
//! on the point; `points` shows it and retention keeps the newest point a drill passed on.
//! A point whose file system is damaged (its root inode cleared before the backup) or whose
//! chunks are damaged in the vault fails, is noted as failed, and exits 3. Bad input: a work
//! folder that does not exist, a checker that does not exist.

mod support;

use std::path::Path;

use support::{agent, ok, pack_files, tool};

/// A GPT disk of 64 MiB at `path`: partition 1 ext4 holding a small tree, partition 2 left
/// unformatted.
fn make_disk(path: &str, tree: &Path) {
    std::fs::File::create(path).unwrap().set_len(64 << 20).unwrap();
    let table = "label: gpt\nstart=2048, size=98304, type=L, name=root\nstart=100352, type=L\n";
    cairn_testkit::partition(path, table);
    let offset = format!("offset={}", 2048 * 512);
    let tree = tree.to_str().unwrap();
    tool("mkfs.ext4", &["-q", "-F", "-b", "4096", "-E", &offset, "-d", tree, path, "12288"]);
}

/// Damages the ext4 file system of partition 1 of `disk` as a guest's could be: its root
/// folder's inode cleared (`part` is a scratch file).
fn clear_root_inode(disk: &str, part: &str) {
    debugfs_on_partition(disk, part, "clri <2>");
}

/// Runs debugfs `command` (writing) on the ext4 file system of partition 1 of `disk`.
fn debugfs_on_partition(disk: &str, part: &str, command: &str) {
    tool(
        "dd",
        &[
            &format!("if={disk}"),
            &format!("of={part}"),
            "bs=512",
            "skip=2048",
            "count=98304",
            "status=none",
        ],
    );
    tool("debugfs", &["-w", "-R", command, part]);
    tool(
        "dd",
        &[
            &format!("if={part}"),
            &format!("of={disk}"),
            "bs=512",
            "seek=2048",
            "conv=notrunc",
            "status=none",
        ],
    );
}

/// A folder of files with some content.
fn make_tree(root: &Path) {
    for i in 0..40 {
        let dir = root.join(format!("d{}", i % 5));
        std::fs::create_dir_all(&dir).unwrap();
        let body: Vec<u8> = (0..(i * 7919 % 200_000)).map(|j| (j * 31 + i) as u8).collect();
        std::fs::write(dir.join(format!("f{i}")), body).unwrap();
    }
    std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap();
}

fn drill(vault: &str, vm: &str, work: &str, extra: &[&str]) -> std::process::Output {
    let args = ["drill", "--json", "--vault", vault, "--vm", vm, "--work-dir", work];
    agent(&[&args[..], extra].concat())
}

fn backup(vault: &str, vm: &str, disk: &str) -> serde_json::Value {
    ok(agent(&["backup", "--json", "--vault", vault, "--vm", vm, "--disk", &format!("os={disk}")]))
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The state of `vm`'s points in `points --json`, newest last.
fn states(vault: &str, vm: &str) -> Vec<serde_json::Value> {
    let listed = ok(agent(&["points", "--json", "--vault", vault, "--vm", vm]));
    listed["points"].as_array().unwrap().iter().map(|p| p["state"].clone()).collect()
}

/// A folder holding an initialised vault, a small tree and a GPT disk made of it (not yet
/// backed up): (folder, vault, disk).
fn setup() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let vault = s("vault");
    ok(agent(&["init", "--vault", &vault]));
    make_tree(&dir.path().join("tree"));
    let disk = s("os.raw");
    make_disk(&disk, &dir.path().join("tree"));
    (dir, vault, disk)
}

#[test]
fn a_drill_restores_checks_and_notes_the_outcome_and_retention_keeps_the_drilled_point() {
    let (dir, vault, disk) = setup();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let first = backup(&vault, "web", &disk);
    let work = s("work");
    std::fs::create_dir(&work).unwrap();

    let out = drill(&vault, "web", &work, &["--sample-blocks", "4096"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json(&out);
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["recorded"], true);
    let d = &report["disks"][0];
    assert_eq!(d["sampled_blocks"], 1024, "a 64 MiB disk of 64 KiB blocks is sampled whole");
    assert_eq!(d["mismatched_offsets"].as_array().unwrap().len(), 0);
    let volumes = d["volumes"].as_array().unwrap();
    assert_eq!(volumes[0]["volume"], "partition 1");
    assert_eq!(volumes[0]["fs"], "ext4");
    assert_eq!(volumes[0]["outcome"], "clean", "{report}");
    assert_eq!(volumes[1]["outcome"], "not-checked");
    assert!(report["summary"].as_str().unwrap().contains("1 file system(s) checked clean"));
    // The copy is gone: the work folder is as it was.
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    // The outcome is on the point.
    let st = states(&vault, "web");
    assert_eq!(st[0]["drill"]["passed"], true, "{st:?}");
    assert_eq!(st[0]["drill"]["method"], "restore");

    // A later point, not drilled: keep-last 1 keeps it, and keeps the drilled one as well.
    std::fs::write(dir.path().join("tree/new"), b"later").unwrap();
    make_disk(&disk, &dir.path().join("tree"));
    let second = backup(&vault, "web", &disk);
    let pruned = ok(agent(&[
        "prune",
        "--json",
        "--vault",
        &vault,
        "--vm",
        "web",
        "--keep-last",
        "1",
        "--dry-run",
    ]));
    let why = |point: &serde_json::Value| {
        let p = pruned["points"].as_array().unwrap().iter().find(|p| p["point"] == *point).unwrap();
        (p["action"].as_str().unwrap().to_owned(), p["why"].to_string())
    };
    let (action, reasons) = why(&first["point"]);
    assert_eq!(action, "keep", "{pruned}");
    assert!(reasons.contains("restore drill"), "{reasons}");
    assert_eq!(why(&second["point"]).0, "keep");

    // A trial run records nothing.
    let out =
        drill(&vault, "web", &work, &["--no-record", "--point", second["point"].as_str().unwrap()]);
    assert_eq!(json(&out)["recorded"], false);
    assert!(states(&vault, "web")[1]["drill"].is_null());
}

#[test]
fn a_damaged_file_system_or_vault_fails_the_drill_and_the_failure_is_noted() {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let vault = s("vault");
    ok(agent(&["init", "--vault", &vault]));
    make_tree(&dir.path().join("tree"));
    let work = s("work");
    std::fs::create_dir(&work).unwrap();

    // The guest's file system was damaged before the backup: its root folder's inode cleared.
    let disk = s("broken.raw");
    make_disk(&disk, &dir.path().join("tree"));
    clear_root_inode(&disk, &s("part.raw"));
    backup(&vault, "broken", &disk);
    let out = drill(&vault, "broken", &work, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json(&out);
    assert_eq!(report["passed"], false);
    let v = &report["disks"][0]["volumes"][0];
    assert_eq!(v["outcome"], "failed", "{report}");
    assert!(report["summary"].as_str().unwrap().contains("partition 1 (ext4)"), "{report}");
    assert_eq!(states(&vault, "broken")[0]["drill"]["passed"], false);

    // A file system that claims more than its partition: e2fsck, handed the disk from the
    // partition's start, would check the next partition's bytes as its own.
    let spill = s("spill.raw");
    make_disk(&spill, &dir.path().join("tree"));
    cairn_testkit::partition(&spill, "label: gpt\nstart=2048, size=49152, type=L, name=root\n");
    backup(&vault, "spill", &spill);
    for method in [&[][..], &["--read-files"][..]] {
        let out = drill(&vault, "spill", &work, method);
        assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
        let report = json(&out);
        let v = &report["disks"][0]["volumes"][0];
        assert_eq!(v["outcome"], "failed", "{report}");
        assert!(v["detail"].as_str().unwrap().contains("more than the 25165824 bytes"), "{report}");
    }

    // A sound point whose chunks were damaged in the vault afterwards.
    let good = s("good.raw");
    make_disk(&good, &dir.path().join("tree"));
    let vault2 = s("vault2");
    ok(agent(&["init", "--vault", &vault2]));
    backup(&vault2, "web", &good);
    for pack in pack_files(Path::new(&vault2)) {
        let mut bytes = std::fs::read(&pack).unwrap();
        let n = bytes.len();
        for b in &mut bytes[n / 4..n / 2] {
            *b ^= 0x5a;
        }
        std::fs::write(&pack, bytes).unwrap();
    }
    let out = drill(&vault2, "web", &work, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json(&out);
    assert_eq!(report["passed"], false);
    // Damaged data blocks are named by range; a damaged index stops that disk's restore.
    let d = &report["disks"][0];
    assert!(
        d["damaged_ranges"].as_u64().unwrap() > 0
            || d["restore_error"].as_str().is_some_and(|e| e.contains("is damaged")),
        "{report}"
    );
    assert!(report["summary"].as_str().unwrap().contains("damaged"), "{report}");
    assert_eq!(states(&vault2, "web")[0]["drill"]["passed"], false);
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "no copy left behind");
}

#[test]
fn a_drill_refuses_what_it_cannot_run_with_and_notes_nothing() {
    let (dir, vault, disk) = setup();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    backup(&vault, "web", &disk);

    let out = drill(&vault, "web", &s("nowhere"), &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nowhere"), "{err}");

    std::fs::create_dir(s("work")).unwrap();
    let out = drill(&vault, "web", &s("work"), &["--e2fsck", "/nonexistent/e2fsck"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("e2fsprogs"), "{err}");

    let out = drill(&vault, "web", &s("work"), &["--point", "20200101T000000.000Z-00000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(states(&vault, "web")[0]["drill"].is_null(), "nothing noted");
    assert_eq!(std::fs::read_dir(s("work")).unwrap().count(), 0);
}

#[test]
fn a_drill_that_reads_every_file_needs_no_room_and_fails_on_damage() {
    let (dir, vault, disk) = setup();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    backup(&vault, "web", &disk);
    // No work folder at all: nothing is restored.
    let out = drill(&vault, "web", &s("nowhere"), &["--read-files"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json(&out);
    assert_eq!(
        (report["passed"].clone(), report["method"].clone()),
        (true.into(), "read-files".into())
    );
    let volumes = report["disks"][0]["volumes"].as_array().unwrap();
    assert_eq!(volumes[0]["outcome"], "clean", "{report}");
    assert_eq!(volumes[1]["outcome"], "not-checked");
    assert!(
        report["summary"].as_str().unwrap().contains("1 file system(s) read whole"),
        "{report}"
    );
    assert_eq!(report["disks"][0]["sampled_blocks"], 1024);
    assert_eq!(states(&vault, "web")[0]["drill"]["method"], "read-files");
    assert_eq!(states(&vault, "web")[0]["drill"]["passed"], true);

    // A file system damaged in the guest fails.
    clear_root_inode(&disk, &s("part.raw"));
    backup(&vault, "broken", &disk);
    let out = drill(&vault, "broken", &s("nowhere"), &["--read-files"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json(&out);
    assert_eq!(report["disks"][0]["volumes"][0]["outcome"], "failed", "{report}");
    assert_eq!(states(&vault, "broken")[0]["drill"]["passed"], false);

    // Chunks damaged in the vault fail the point too (a block sampled, or a file read).
    let vault2 = s("vault2");
    ok(agent(&["init", "--vault", &vault2]));
    make_disk(&disk, &dir.path().join("tree"));
    backup(&vault2, "web", &disk);
    for pack in pack_files(Path::new(&vault2)) {
        let mut bytes = std::fs::read(&pack).unwrap();
        let n = bytes.len();
        for b in &mut bytes[n / 4..n / 2] {
            *b ^= 0x5a;
        }
        std::fs::write(&pack, bytes).unwrap();
    }
    let out = drill(&vault2, "web", &s("nowhere"), &["--read-files"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["passed"], false);
    assert_eq!(states(&vault2, "web")[0]["drill"]["passed"], false);
}

#[test]
fn a_read_files_drill_leaves_what_its_reader_cannot_read_not_checked() {
    let (dir, vault, disk) = setup();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let volume = |out: &std::process::Output| {
        assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
        let report = json(out);
        assert!(report["summary"].as_str().unwrap().contains("not known to restore"), "{report}");
        report["disks"][0]["volumes"][0].clone()
    };
    // A crash-consistent file system whose journal the reader cannot replay (no journal
    // checksums): not checked, never failed; e2fsck on a copy replays it and passes.
    debugfs_on_partition(&disk, &s("part.raw"), "feature needs_recovery");
    backup(&vault, "journal", &disk);
    let v = volume(&drill(&vault, "journal", &s("nowhere"), &["--read-files"]));
    assert_eq!(v["outcome"], "not-checked", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("without --read-files"), "{v}");
    let work = s("work");
    std::fs::create_dir(&work).unwrap();
    let out = drill(&vault, "journal", &work, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // A sparse file larger than twice the volume: left unread (every other file is read), so
    // the volume is not "read whole".
    let tree = dir.path().join("tree");
    let sparse = std::fs::File::create(tree.join("sparse")).unwrap();
    sparse.set_len(200 << 20).unwrap();
    make_disk(&disk, &tree);
    backup(&vault, "sparse", &disk);
    let v = volume(&drill(&vault, "sparse", &s("nowhere"), &["--read-files"]));
    assert_eq!(v["outcome"], "not-checked", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("1 file(s) left unread"), "{v}");
}

#[test]
fn a_crash_consistent_file_system_is_checked_after_its_journal_replays_wherever_it_starts() {
    let (dir, vault, _) = setup();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    // Partition 1 at sector 2049, not 4 KiB-aligned: the copy cannot be cut before it, so it
    // is copied to a file of its own for e2fsck; its journal needs recovery, as any mounted
    // file system's does when its disk is captured.
    let (disk, part) = (s("odd.raw"), s("odd-part.raw"));
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    cairn_testkit::partition(&disk, "label: gpt\nstart=2049, size=98304, type=L\n");
    std::fs::File::create(&part).unwrap().set_len(48 << 20).unwrap();
    let tree = dir.path().join("tree");
    tool("mkfs.ext4", &["-q", "-F", "-b", "4096", "-d", tree.to_str().unwrap(), &part]);
    tool("debugfs", &["-w", "-R", "feature needs_recovery", &part]);
    let (from, to) = (format!("if={part}"), format!("of={disk}"));
    tool("dd", &[&from, &to, "bs=512", "seek=2049", "conv=notrunc", "status=none"]);
    backup(&vault, "odd", &disk);
    let work = s("work");
    std::fs::create_dir(&work).unwrap();
    let out = drill(&vault, "odd", &work, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let report = json(&out);
    assert_eq!(report["disks"][0]["volumes"][0]["outcome"], "clean", "{report}");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "no copy left behind");
}
