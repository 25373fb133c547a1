//! kill -9 at random moments of backups, in a loop: every committed point restores to what
//! its disk held, no point is half-visible, and what a killed backup uploaded is resumed by
//! the next one instead of being sent again (the duplicated bytes are measured).
//!
//! CI runs 8 seeded rounds; `CAIRN_SOAK=1` runs 100.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_format::{Digest, PointId};
use cairn_vault::{Credential, OpenOptions, Vault};

fn rounds() -> u64 {
    if std::env::var_os("CAIRN_SOAK").is_some() { 100 } else { 8 }
}

fn agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-agent"));
    cmd.env_remove("RUST_LOG").env_remove("CAIRN_PASSPHRASE").args(args);
    cmd
}

fn digest_of(path: &Path) -> Digest {
    Digest::of(&std::fs::read(path).unwrap())
}

/// A small seeded generator (xorshift), so that the kill moments repeat from run to run.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

async fn open(url: &str, key: &Path) -> Vault {
    let secret = std::fs::read(key).unwrap();
    let secret: Vec<u8> = secret.trim_ascii_end().to_vec();
    let options =
        OpenOptions { key: Some(Credential::KeyFile(secret.into())), ..Default::default() };
    Vault::open_with(url, &options).await.unwrap()
}

/// Bytes of chunk frames stored in more than one pack (uploaded twice), bytes of packs cut
/// short by a kill (their frames are sent again), and all stored frame bytes.
async fn duplicated_bytes(vault: &Vault, root: &Path) -> (u64, u64, u64) {
    let mut seen: HashMap<Digest, u32> = HashMap::new();
    let mut stored = 0u64;
    let mut twice = 0u64;
    let mut cut = 0u64;
    let packs = root.join("packs");
    for fan in std::fs::read_dir(&packs).unwrap() {
        for entry in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.contains('#') {
                // A pack a kill cut short while it was written: its frames are sent again.
                cut += std::fs::metadata(&path).unwrap().len();
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
            let bytes = std::fs::read(&path).unwrap();
            // A pack cut short by the kill has no table: never resumed, never counted.
            let Ok(entries) =
                cairn_format::pack::decode_pack_table_in(vault.crypto(), &rel, &bytes)
            else {
                cut += bytes.len() as u64;
                continue;
            };
            for e in entries {
                stored += u64::from(e.len);
                if seen.insert(e.id, e.len).is_some() {
                    twice += u64::from(e.len);
                }
            }
        }
    }
    (twice, cut, stored)
}

/// Restores each of `points` and checks it holds what its disk held at backup.
async fn restores_as_recorded(
    vault: &Vault,
    points: &[cairn_format::PointManifest],
    content: &BTreeMap<PointId, Digest>,
    dir: &Path,
) {
    for p in points {
        let to = dir.join(format!("restored-{}", p.point));
        let opts = cairn_backup::RestoreOptions::default();
        let progress = std::sync::Arc::new(cairn_backup::NoProgress);
        cairn_backup::restore_disk(vault, p, &"sda".parse().unwrap(), &to, &opts, progress)
            .await
            .unwrap();
        assert_eq!(digest_of(&to), content[&p.point], "point {}", p.point);
        std::fs::remove_file(&to).unwrap();
    }
}

/// A sample disk and where its vault and key go, in a fresh folder.
struct Setup {
    dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    vault_dir: std::path::PathBuf,
    url: String,
    key: std::path::PathBuf,
    key_s: String,
    disk_arg: String,
}

impl Setup {
    fn new(size: u64, seed: u64) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("sda.raw");
        cairn_sample::create_disk(&disk, size, seed).unwrap();
        let vault_dir = dir.path().join("vault");
        let url = vault_dir.to_str().unwrap().to_owned();
        let key = dir.path().join("vault.key");
        let key_s = key.to_str().unwrap().to_owned();
        let disk_arg = format!("sda={}", disk.display());
        Setup { dir, disk, vault_dir, url, key, key_s, disk_arg }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_killed_at_random_moments_commit_whole_points_and_resume() {
    let Setup { dir, disk, vault_dir, url, key, key_s, disk_arg } = Setup::new(128 << 20, 31);
    let backup_args = [
        "backup",
        "--json",
        "--vault",
        &url,
        "--key-file",
        &key_s,
        "--vm",
        "web",
        "--disk",
        &disk_arg,
    ];
    let init = agent(&["init", "--vault", &url, "--key-file", &key_s]).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let out = agent(&backup_args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut content: BTreeMap<PointId, Digest> = BTreeMap::new();
    for p in open(&url, &key).await.list_points(None).await.unwrap().points {
        content.insert(p.point, digest_of(&disk));
    }
    // How long an uninterrupted incremental of the rounds' size takes, the fastest of three (one
    // slowed by the machine would put most kills after the end): kills land anywhere in
    // [0, 1.2 x that) of the incrementals below.
    let mut fastest = Duration::MAX;
    for seed in 997..1000 {
        cairn_sample::mutate_range(&disk, 0, 48 << 20, seed).unwrap();
        let started = Instant::now();
        let out = agent(&backup_args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        fastest = fastest.min(started.elapsed());
        let now = digest_of(&disk);
        for p in open(&url, &key).await.list_points(None).await.unwrap().points {
            content.entry(p.point).or_insert(now);
        }
    }
    let span = fastest.mul_f64(1.2).max(Duration::from_millis(50));

    let mut draws = Draws(0x9e37_79b9_7f4a_7c15);
    let (mut killed, mut resumed) = (0, 0);
    for round in 0..rounds() {
        // 48 MiB of new data at a random place: several packs per backup, so kills land
        // between, during and after their uploads.
        let at = (draws.next() % 80) << 20;
        cairn_sample::mutate_range(&disk, at, 48 << 20, 1000 + round).unwrap();
        let now = digest_of(&disk);
        let delay = span.mul_f64((draws.next() % 1000) as f64 / 1000.0);
        let mut child =
            agent(&backup_args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        // The next backup completes, and resumes from what the killed one uploaded.
        let out = agent(&backup_args).output().unwrap();
        assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let kinds: Vec<&str> =
            m["evidence"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
        if kinds.contains(&"resume") {
            resumed += 1;
        }
        // Whatever became visible this round (the killed run may have committed before its
        // kill) holds this round's disk, and nothing is half-visible.
        let listing = open(&url, &key).await.list_points(None).await.unwrap();
        assert!(listing.unreadable.is_empty(), "round {round}: {:?}", listing.unreadable);
        for p in listing.points {
            content.entry(p.point).or_insert(now);
        }
    }
    let vault = open(&url, &key).await;
    let (twice, cut, stored) = duplicated_bytes(&vault, &vault_dir).await;
    eprintln!(
        "{} rounds, {killed} backups killed mid-way, {resumed} resumed; {} points; \
         {twice} of {stored} stored bytes were uploaded twice ({:.2}%), and {cut} bytes of \
         packs cut short by a kill were sent again ({:.2}%)",
        rounds(),
        content.len(),
        twice as f64 * 100.0 / stored.max(1) as f64,
        cut as f64 * 100.0 / stored.max(1) as f64
    );
    assert!(killed > rounds() / 2, "{killed} of {} kills landed mid-backup", rounds());
    assert!(resumed > 0, "no backup resumed");
    // Uploaded twice: at most the packs that were in flight at each kill, a small part.
    // What a kill loses is bounded by the packs in flight (two uploading and one filling per
    // disk, 8 MiB each), whatever the backup's size: a small part of what it sent.
    assert!((twice + cut) * 3 < stored, "{twice} + {cut} of {stored} bytes sent twice");
    let report = vault.verify(&Default::default(), &|_| {}).await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    let listing = vault.list_points(None).await.unwrap();
    assert_eq!(listing.points.len(), content.len());
    restores_as_recorded(&vault, &listing.points, &content, dir.path()).await;
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs `args` to completion and returns how long it took.
fn timed(args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = agent(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    started.elapsed()
}

/// Starts `args` and kills it after `delay`; true if it was still running.
fn kill_after(args: &[&str], delay: Duration) -> bool {
    let mut child = agent(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    running
}

/// kill -9 at random moments of prune and gc, in a loop beside backups: every point left
/// restores to what its disk held, nothing is half-deleted, and a later gc finishes what a
/// killed one started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_and_gc_killed_at_random_moments_leave_every_point_whole() {
    let Setup { dir, disk, vault_dir, url, key, key_s, disk_arg } = Setup::new(16 << 20, 41);
    let vault_args = ["--vault", url.as_str(), "--key-file", key_s.as_str()];
    let with = |cmd: &[&'static str]| -> Vec<String> {
        cmd.iter().map(|s| s.to_string()).chain(vault_args.iter().map(|s| s.to_string())).collect()
    };
    let backup =
        [with(&["backup", "--json", "--vm", "web"]), vec!["--disk".into(), disk_arg]].concat();
    let prune = with(&["prune", "--keep-last", "3", "--grace", "0"]);
    let gc = with(&["gc"]);
    let init = agent(&["init", "--vault", &url, "--key-file", &key_s]).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let mut content: BTreeMap<PointId, Digest> = BTreeMap::new();
    let mut draws = Draws(0x2545_f491_4f6c_dd1d);
    let mut back_up = |round: u64, content: &mut BTreeMap<PointId, Digest>| {
        let at = (draws.next() % 12) << 20;
        cairn_sample::mutate_range(&disk, at, 4 << 20, 500 + round).unwrap();
        let out = agent(&as_strs(&backup)).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let point: PointId = m["point"].as_str().unwrap().parse().unwrap();
        content.insert(point, digest_of(&disk));
    };
    for round in 0..5 {
        back_up(round, &mut content);
    }
    let prune_span = timed(&as_strs(&prune)).mul_f64(1.2).max(Duration::from_millis(30));
    let gc_span = timed(&as_strs(&gc)).mul_f64(1.2).max(Duration::from_millis(30));
    let mut draws = Draws(0x9e37_79b9_7f4a_7c15);
    let mut killed = 0;
    for round in 0..rounds() {
        back_up(100 + round, &mut content);
        back_up(200 + round, &mut content);
        let delay = prune_span.mul_f64((draws.next() % 1000) as f64 / 1000.0);
        killed += u64::from(kill_after(&as_strs(&prune), delay));
        let delay = gc_span.mul_f64((draws.next() % 1000) as f64 / 1000.0);
        killed += u64::from(kill_after(&as_strs(&gc), delay));
        // Every point still listed is whole.
        let vault = open(&url, &key).await;
        let listing = vault.list_points(None).await.unwrap();
        assert!(listing.unreadable.is_empty(), "round {round}: {:?}", listing.unreadable);
        let report = vault.verify(&Default::default(), &|_| {}).await.unwrap();
        assert!(report.is_clean(), "round {round}: {report:?}");
    }
    // Finished without kills: what killed runs left is done now.
    timed(&as_strs(&prune));
    timed(&as_strs(&gc));
    let vault = open(&url, &key).await;
    let listing = vault.list_points(None).await.unwrap();
    assert_eq!(listing.points.len(), 3, "keep-last 3 holds once prune runs whole");
    assert!(
        std::fs::read_dir(vault_dir.join("gc")).map(|d| d.count()).unwrap_or(0) == 0,
        "no plan left pending"
    );
    let report = vault.verify(&Default::default(), &|_| {}).await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    restores_as_recorded(&vault, &listing.points, &content, dir.path()).await;
    eprintln!("{} rounds, {killed} prune/gc runs killed mid-way", rounds());
    assert!(killed > 0, "no kill landed mid-run");
}
