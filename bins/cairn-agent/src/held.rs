//! The points whose views this host keeps for instant restores (their snapshot tier), in the
//! state folder's `held.json`: what `cairn-agent run` kept after each transfer, released when
//! the policy's instant-restore time is over, and what `cairn-agent held` lists and restores
//! from. Written whole (a temporary file renamed over it, then the folder synced).

use std::path::{Path, PathBuf};

use anyhow::Context;
use cairn_snapshot::KeptView;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The largest registry read (a host keeps a few hundred points at most).
const MAX_FILE: u64 = 4 << 20;

/// One point's kept views.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldPoint {
    /// The VM, by the coordinator's name.
    pub vm: String,
    /// The point.
    pub point: String,
    /// When its disks were captured.
    pub captured_at: Timestamp,
    /// When its views are released.
    pub until: Timestamp,
    /// Each disk's kept view.
    pub views: Vec<KeptView>,
}

/// The registry file of a state folder.
#[derive(Clone)]
pub struct Registry {
    path: PathBuf,
}

impl Registry {
    /// The registry in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> Registry {
        Registry { path: state_dir.join("held.json") }
    }

    /// The held points (none if there is no file yet).
    pub fn load(&self) -> anyhow::Result<Vec<HeldPoint>> {
        use std::io::Read;
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        let mut bytes = vec![];
        file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
        anyhow::ensure!(bytes.len() as u64 <= MAX_FILE, "{} is too large", self.path.display());
        serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is not a list of held points; move it aside", self.path.display())
        })
    }

    /// Replaces the registry with `points`.
    pub fn save(&self, points: &[HeldPoint]) -> anyhow::Result<()> {
        use std::io::Write;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("writing in {}", dir.display()))?;
        tmp.write_all(&serde_json::to_vec_pretty(points)?)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).with_context(|| format!("writing {}", self.path.display()))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
        Ok(())
    }

    /// Adds `point` (after its transfer kept its views).
    pub fn add(&self, point: HeldPoint) -> anyhow::Result<()> {
        let mut points = self.load()?;
        points.retain(|p| !(p.vm == point.vm && p.point == point.point));
        points.push(point);
        self.save(&points)
    }

    /// Releases the views of every point whose time is over at `now`, and early, oldest
    /// first, those on a file system with less than [`MIN_FREE`] of its space free (kept
    /// views grow as their VMs write). Returns the points released. A record that does not
    /// name a kept view is dropped (it deletes nothing); a view that fails to release stays
    /// listed for a later try.
    pub fn release_due(&self, now: Timestamp) -> anyhow::Result<Vec<String>> {
        self.release_when(now, low_on_space)
    }

    /// [`Registry::release_due`] with the free-space test handed in (the tests' machines
    /// may themselves be short of space).
    fn release_when(
        &self,
        now: Timestamp,
        low_on_space: impl Fn(&Path) -> bool,
    ) -> anyhow::Result<Vec<String>> {
        let mut points = self.load()?;
        points.sort_by_key(|p| p.captured_at);
        let mut kept = vec![];
        let mut released = vec![];
        for mut p in points {
            let short = p.views.iter().find(|v| low_on_space(&v.handle));
            if p.until > now && short.is_none() {
                kept.push(p);
                continue;
            }
            if let Some(v) = short.filter(|_| p.until > now) {
                tracing::warn!(vm = %p.vm, point = %p.point, path = %v.handle.display(), "less than 10% free where views are kept: releasing the oldest point's views early");
            }
            p.views.retain(|v| {
                if !v.is_kept_name() {
                    tracing::error!(vm = %p.vm, point = %p.point, path = %v.handle.display(), "a held record names no kept view: dropped, nothing deleted");
                    return false;
                }
                match v.release() {
                    Ok(()) => false,
                    Err(e) => {
                        tracing::warn!(vm = %p.vm, point = %p.point, "releasing a kept view: {e}");
                        true
                    }
                }
            });
            if p.views.is_empty() {
                tracing::info!(vm = %p.vm, point = %p.point, "views released: the point is in its vault alone");
                released.push(p.point);
            } else {
                kept.push(p);
            }
        }
        if !released.is_empty() {
            self.save(&kept)?;
        }
        Ok(released)
    }
}

/// Below this fraction of free space where views are kept, the oldest are released early.
pub const MIN_FREE: f64 = 0.10;

/// True if the file system holding `path` has less than [`MIN_FREE`] of its space free.
fn low_on_space(path: &Path) -> bool {
    let dir = path.parent().unwrap_or(Path::new("/"));
    match rustix::fs::statvfs(dir) {
        Ok(s) if s.f_blocks > 0 => (s.f_bavail as f64) < MIN_FREE * s.f_blocks as f64,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_added_listed_and_released_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::in_dir(dir.path());
        assert!(registry.load().unwrap().is_empty());
        let clone = dir.path().join(".d.img.cairn-held-p1");
        std::fs::write(&clone, b"view").unwrap();
        let held = |point: &str, until: &str, views: Vec<KeptView>| HeldPoint {
            vm: "web-1".into(),
            point: point.into(),
            captured_at: "2026-06-01T02:00:00Z".parse().unwrap(),
            until: until.parse().unwrap(),
            views,
        };
        let view = KeptView {
            disk: "d".parse().unwrap(),
            kind: "reflink".into(),
            path: clone.clone(),
            handle: clone.clone(),
            format: None,
        };
        registry.add(held("p1", "2026-06-03T02:00:00Z", vec![view.clone()])).unwrap();
        registry.add(held("p2", "2026-06-04T02:00:00Z", vec![])).unwrap();
        assert_eq!(registry.load().unwrap().len(), 2);
        let plenty = |_: &Path| false;
        let at = |t: &str| t.parse::<Timestamp>().unwrap();
        assert!(registry.release_when(at("2026-06-02T00:00:00Z"), plenty).unwrap().is_empty());
        let released = registry.release_when(at("2026-06-03T02:00:00Z"), plenty).unwrap();
        assert_eq!(released, ["p1"]);
        assert!(!clone.exists());
        assert_eq!(registry.load().unwrap().len(), 1);
        // Short of space, a point is released before its time.
        let clone2 = dir.path().join(".d.img.cairn-held-p3");
        std::fs::write(&clone2, b"view").unwrap();
        let view2 = KeptView { path: clone2.clone(), handle: clone2.clone(), ..view };
        registry.add(held("p3", "2026-06-09T02:00:00Z", vec![view2])).unwrap();
        let short = |p: &Path| p == clone2;
        let released = registry.release_when(at("2026-06-03T03:00:00Z"), short).unwrap();
        assert_eq!(released, ["p3"]);
        assert!(!clone2.exists());
        // A damaged registry is an error naming the file.
        std::fs::write(dir.path().join("held.json"), b"{").unwrap();
        let e = format!("{:#}", registry.load().unwrap_err());
        assert!(e.contains("held.json"), "{e}");
    }
}
