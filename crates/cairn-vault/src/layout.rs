//! Where each kind of object lives in a vault (see `docs/formats.md`).

use cairn_format::{Digest, Name, PointId};
use object_store::path::Path;

/// The folder of key slots.
pub(crate) const KEYS: &str = "keys";

/// Key slot `id`.
pub(crate) fn key_slot(id: &str) -> Path {
    Path::from(format!("{KEYS}/{id}.json"))
}

/// The vault config.
pub(crate) fn config() -> Path {
    Path::from("config.json")
}

/// A pack: `packs/<first 2 hex>/<64 hex>`; the fan-out keeps local folders small.
pub(crate) fn pack(name: &Digest) -> Path {
    let hex = name.to_hex();
    Path::from(format!("packs/{}/{hex}", &hex[..2]))
}

/// All packs.
pub(crate) fn packs() -> Path {
    Path::from("packs")
}

/// Parses `packs/<2 hex>/<64 hex>` into the pack's name (staging files and strays: `None`).
pub(crate) fn parse_pack_path(path: &Path) -> Option<Digest> {
    let parts: Vec<_> = path.parts().collect();
    let [root, fan, file] = parts.as_slice() else { return None };
    let name: Digest = file.as_ref().parse().ok()?;
    (root.as_ref() == "packs" && name.to_hex().starts_with(fan.as_ref())).then_some(name)
}

/// All pack indexes.
pub(crate) fn pack_indexes() -> Path {
    Path::from("pack-index")
}

/// The pack index of the packs point `point` wrote (each point writes at most one).
pub(crate) fn pack_index(point: &PointId) -> Path {
    Path::from(format!("pack-index/{point}"))
}

/// The pack index a collector run writes: the packs it repacked and what survives of the
/// pack indexes it rewrote. Named by the run, with `.gc`, so that it never collides with a
/// point's, and sorts beside the points of its time.
pub(crate) fn gc_pack_index(run: &PointId) -> Path {
    Path::from(format!("pack-index/{run}.gc"))
}

/// The pack index a repair run writes for packs no readable pack index names.
pub(crate) fn repair_pack_index(run: &PointId) -> Path {
    Path::from(format!("pack-index/{run}.repair"))
}

/// The lease of the collector (or repair) run working on the vault.
pub(crate) fn gc_lease() -> Path {
    Path::from("lease/gc.json")
}

/// All collector plans.
pub(crate) fn gc_plans() -> Path {
    Path::from("gc")
}

/// The plan of collector run `run`.
pub(crate) fn gc_plan(run: &PointId) -> Path {
    Path::from(format!("gc/{run}.json"))
}

/// Where verify moves an unreadable pack index.
pub(crate) fn quarantined_pack_index(index: &Path) -> Path {
    Path::from(format!("quarantine/pack-index/{}", index.filename().unwrap_or("unnamed")))
}

/// All quarantine markers.
pub(crate) fn quarantine() -> Path {
    Path::from("quarantine")
}

/// The marker verify writes for chunk `id` found bad in `pack`: `quarantine/<chunk>.<pack>`.
pub(crate) fn quarantined(id: &Digest, pack: &Digest) -> Path {
    Path::from(format!("quarantine/{}.{}", id.to_hex(), pack.to_hex()))
}

/// Parses a quarantine marker's path back into `(chunk, pack)`.
pub(crate) fn parse_quarantined(path: &Path) -> Option<(Digest, Digest)> {
    let file = path.filename()?;
    let (chunk, pack) = file.split_once('.')?;
    Some((chunk.parse().ok()?, pack.parse().ok()?))
}

/// All points, or one VM's.
pub(crate) fn points(vm: Option<&Name>) -> Path {
    match vm {
        Some(vm) => Path::from(format!("points/{vm}")),
        None => Path::from("points"),
    }
}

/// A point's manifest.
pub(crate) fn manifest(vm: &Name, point: &PointId) -> Path {
    Path::from(format!("points/{vm}/{point}.json"))
}

/// Notes of all points, of one VM's, or of one point.
pub(crate) fn notes(vm: Option<&Name>, point: Option<&PointId>) -> Path {
    match (vm, point) {
        (Some(vm), Some(p)) => Path::from(format!("notes/{vm}/{p}")),
        (Some(vm), None) => Path::from(format!("notes/{vm}")),
        _ => Path::from("notes"),
    }
}

/// Note `id` of a point.
pub(crate) fn note(vm: &Name, point: &PointId, id: &PointId) -> Path {
    Path::from(format!("notes/{vm}/{point}/{id}.json"))
}

/// Parses `notes/<vm>/<point>/<id>.json` into its parts.
pub(crate) fn parse_note_path(path: &Path) -> Option<(Name, PointId, PointId)> {
    let parts: Vec<_> = path.parts().collect();
    let [root, vm, point, file] = parts.as_slice() else { return None };
    if root.as_ref() != "notes" {
        return None;
    }
    let id = file.as_ref().strip_suffix(".json")?.parse().ok()?;
    Some((vm.as_ref().parse().ok()?, point.as_ref().parse().ok()?, id))
}

/// A backup's in-flight marker.
pub(crate) fn inflight(point: &PointId) -> Path {
    Path::from(format!("inflight/{point}.json"))
}

/// The folder of a running backup's resume records.
pub(crate) fn resume_records(point: &PointId) -> Path {
    Path::from(format!("inflight/{point}"))
}

/// The resume record of one pack a running backup uploaded.
pub(crate) fn uploaded_record(point: &PointId, pack: &Digest) -> Path {
    Path::from(format!("inflight/{point}/{}.json", pack.to_hex()))
}

/// The resume record of the packs a running backup adopted from interrupted ones.
pub(crate) fn adopted_record(point: &PointId) -> Path {
    Path::from(format!("inflight/{point}/adopted.json"))
}

/// The fate record of a backup: `commit` or `reaped`, written once (see the gc module).
pub(crate) fn fate(point: &PointId) -> Path {
    Path::from(format!("inflight/{point}/fate.json"))
}

/// True for a fate record.
pub(crate) fn is_fate(path: &Path) -> bool {
    path.filename() == Some("fate.json")
}

/// The base record of a backup: the point it compares against (see the gc module).
pub(crate) fn base_record(point: &PointId) -> Path {
    Path::from(format!("inflight/{point}/base.json"))
}

/// True for a record beside a marker that is not a resume record (a fate or base record).
pub(crate) fn is_side_record(path: &Path) -> bool {
    matches!(path.filename(), Some("fate.json" | "base.json"))
}

/// True for `inflight/<point>.json` (a marker, not a record below one).
pub(crate) fn is_marker(path: &Path) -> bool {
    path.parts().count() == 2
}

/// Damage records of one VM, or the folder of one point's records.
pub(crate) fn damage(vm: &Name, point: Option<&PointId>) -> Path {
    match point {
        Some(p) => Path::from(format!("damage/{vm}/{p}")),
        None => Path::from(format!("damage/{vm}")),
    }
}

/// One damage record of a point, written create-only by the verify run `run`.
pub(crate) fn damage_record(vm: &Name, point: &PointId, run: &PointId) -> Path {
    Path::from(format!("damage/{vm}/{point}/{run}.json"))
}

/// Where vaults before create-only damage records kept a point's one, overwritten, record.
pub(crate) fn legacy_damage(vm: &Name, point: &PointId) -> Path {
    Path::from(format!("damage/{vm}/{point}.json"))
}

/// Parses a damage record's path (`damage/<vm>/<point>/<run>.json`, or a legacy
/// `damage/<vm>/<point>.json`) into its VM, point and run (`None` for a legacy record).
pub(crate) fn parse_damage_path(path: &Path) -> Option<(Name, PointId, Option<PointId>)> {
    let parts: Vec<_> = path.parts().collect();
    let name = |i: usize| parts.get(i).map(|p| p.as_ref());
    if name(0)? != "damage" {
        return None;
    }
    let vm = name(1)?.parse().ok()?;
    match parts.len() {
        3 => Some((vm, name(2)?.strip_suffix(".json")?.parse().ok()?, None)),
        4 => {
            let run = name(3)?.strip_suffix(".json")?.parse().ok()?;
            Some((vm, name(2)?.parse().ok()?, Some(run)))
        }
        _ => None,
    }
}

/// Parses `points/<vm>/<point>.json` back into its parts.
pub(crate) fn parse_point_path(path: &Path) -> Option<(Name, PointId)> {
    let mut parts = path.parts();
    let _root = parts.next()?;
    let vm = parts.next()?.as_ref().parse().ok()?;
    let file = parts.next()?;
    let point = file.as_ref().strip_suffix(".json")?.parse().ok()?;
    parts.next().is_none().then_some((vm, point))
}
