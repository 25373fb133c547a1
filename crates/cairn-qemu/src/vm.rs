//! What a running VM's disks are, as QEMU reports them (`query-block`).

use cairn_nbd::qemu::Bitmap;
use serde_json::{Value, json};

use crate::{Error, Qmp};

/// One disk of a running VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuDisk {
    /// The device's QOM path (`/machine/peripheral/ID/...`): where its `drive` is set.
    pub qdev: String,
    /// The legacy drive name (`-drive id=...`), empty for `-blockdev` disks.
    pub drive: String,
    /// The block node the device reads and writes (its top format node).
    pub node: String,
    /// That node's driver: `qcow2`, `raw`, ... (or a filter's name while a backup runs).
    pub format: String,
    /// The image file, as QEMU names it.
    pub file: String,
    /// The size the guest sees.
    pub size: u64,
    /// A qcow2 image's compatibility level (`1.1`, or `0.10` for v2), else empty.
    pub compat: String,
    /// The node's dirty bitmaps (`auto` when recording, `in-use` when QEMU calls it
    /// inconsistent, as `qemu-img info` would say).
    pub bitmaps: Vec<Bitmap>,
}

impl QemuDisk {
    /// Whether `id` (a configuration's `qemu_device`) names this disk: the device's id, its
    /// QOM path, the legacy drive name, or the block node's name.
    pub fn is(&self, id: &str) -> bool {
        if id.is_empty() {
            return false;
        }
        let peripheral = format!("/machine/peripheral/{id}");
        self.qdev == id
            || self.qdev == peripheral
            || self.qdev.strip_prefix(&peripheral).is_some_and(|rest| rest.starts_with('/'))
            || self.drive == id
            || self.node == id
    }

    /// The device whose `drive` property switches the disk's node: for a virtio-blk-pci
    /// device, the PCI proxy (`/machine/peripheral/ID`) rather than its `virtio-backend`
    /// (setting the backend's drive attaches the new node before the old one lets go, and
    /// QEMU refuses the overlap).
    pub fn drive_owner(&self) -> &str {
        const PERIPHERAL: &str = "/machine/peripheral/";
        match device_id(&self.qdev) {
            Some(id) => &self.qdev[..PERIPHERAL.len() + id.len()],
            None => self.qdev.strip_suffix("/virtio-backend").unwrap_or(&self.qdev),
        }
    }

    /// Whether its bitmaps can outlive QEMU (stored in a qcow2 v3 image: v2 cannot hold
    /// them, so its bitmaps live in QEMU's memory as a raw disk's do).
    pub fn persistent_bitmaps(&self) -> bool {
        self.format == "qcow2" && self.compat != "0.10"
    }
}

/// The VM's disks: every block device with a medium inserted.
pub fn disks(qmp: &mut Qmp) -> Result<Vec<QemuDisk>, Error> {
    parse_block(&qmp.execute("query-block", json!({}))?)
}

/// The disk that `qemu_device` names, or an error listing the ones there are.
pub fn find<'a>(disks: &'a [QemuDisk], qemu_device: &str) -> Result<&'a QemuDisk, Error> {
    let found: Vec<&QemuDisk> = disks.iter().filter(|d| d.is(qemu_device)).collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::Vm(format!(
            "the VM has no disk {qemu_device:?} (qemu_device); it has {}",
            describe(disks)
        ))),
        _ => Err(Error::Vm(format!(
            "qemu_device {qemu_device:?} names {} disks; give a device id that names one: {}",
            found.len(),
            describe(disks)
        ))),
    }
}

/// The disks, one line each, for errors and `config check`.
pub fn describe(disks: &[QemuDisk]) -> String {
    if disks.is_empty() {
        return "no disks".into();
    }
    disks
        .iter()
        .map(|d| {
            let id = device_id(&d.qdev).unwrap_or(&d.qdev);
            let p = |s: &str| crate::wire::printable(s, 200);
            format!(
                "{} (node {}, {} {}, {} bytes)",
                p(id),
                p(&d.node),
                p(&d.format),
                p(&d.file),
                d.size
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The id in a QOM path under `/machine/peripheral/`.
pub fn device_id(qdev: &str) -> Option<&str> {
    qdev.strip_prefix("/machine/peripheral/").map(|rest| rest.split('/').next().unwrap_or(rest))
}

/// Parses `query-block`'s answer.
pub fn parse_block(value: &Value) -> Result<Vec<QemuDisk>, Error> {
    let bad = |what: &str| Error::Protocol(format!("query-block answered {what}"));
    let list = value.as_array().ok_or_else(|| bad("something that is not a list"))?;
    let mut disks = Vec::new();
    for entry in list {
        let Some(inserted) = entry.get("inserted") else { continue };
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let image = inserted.get("image").unwrap_or(&Value::Null);
        let bitmaps = inserted
            .get("dirty-bitmaps")
            .and_then(Value::as_array)
            .map(|list| list.iter().filter_map(bitmap).collect())
            .unwrap_or_default();
        disks.push(QemuDisk {
            qdev: text(entry, "qdev"),
            drive: text(entry, "device"),
            node: text(inserted, "node-name"),
            format: text(inserted, "drv"),
            file: text(inserted, "file"),
            size: image.get("virtual-size").and_then(Value::as_u64).unwrap_or(0),
            compat: image
                .get("format-specific")
                .and_then(|f| f.get("data"))
                .and_then(|d| d.get("compat"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            bitmaps,
        });
    }
    Ok(disks)
}

/// A bitmap as QMP lists it, in `qemu-img info`'s terms. Unnamed ones (QEMU's own, inside a
/// running job) are left out.
fn bitmap(value: &Value) -> Option<Bitmap> {
    let name = value.get("name")?.as_str()?.to_owned();
    let flag = |k: &str| value.get(k).and_then(Value::as_bool).unwrap_or(false);
    let mut flags = Vec::new();
    if flag("recording") {
        flags.push("auto".to_owned());
    }
    if flag("inconsistent") {
        flags.push("in-use".to_owned());
    }
    Some(Bitmap { name, granularity: value.get("granularity")?.as_u64()?, flags })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!([
            {"device": "", "qdev": "/machine/peripheral/disk0/virtio-backend", "inserted": {
                "node-name": "d0", "drv": "qcow2", "file": "/v/os.qcow2",
                "image": {"virtual-size": 67108864},
                "dirty-bitmaps": [
                    {"name": "cairn:vm:os:p1", "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 0},
                    {"name": "old", "recording": false, "inconsistent": true, "granularity": 65536},
                    {"recording": false, "granularity": 65536}
                ]}},
            {"device": "drive1", "qdev": "/machine/peripheral-anon/device[3]", "inserted": {
                "node-name": "#block123", "drv": "raw", "file": "/v/data.img",
                "image": {"virtual-size": 1048576}}},
            {"device": "cd0", "qdev": "cdrom", "locked": false}
        ])
    }

    #[test]
    fn finds_disks_by_any_name() {
        let disks = parse_block(&sample()).unwrap();
        assert_eq!(disks.len(), 2, "a drive with no medium is no disk");
        assert_eq!(find(&disks, "disk0").unwrap().node, "d0");
        assert_eq!(find(&disks, "d0").unwrap().node, "d0");
        assert_eq!(find(&disks, "drive1").unwrap().format, "raw");
        let missing = find(&disks, "disk9").unwrap_err().to_string();
        assert!(missing.contains("disk0 (node d0, qcow2 /v/os.qcow2"), "{missing}");
        assert!(find(&disks, "disk").is_err(), "a prefix of an id names nothing");
        assert!(find(&disks, "").is_err());
        let os = &disks[0];
        assert_eq!(os.bitmaps.len(), 2, "unnamed bitmaps are QEMU's own");
        assert!(os.bitmaps[0].enabled() && !os.bitmaps[0].in_use());
        assert!(!os.bitmaps[1].enabled() && os.bitmaps[1].in_use());
        assert!(os.persistent_bitmaps() && !disks[1].persistent_bitmaps());
        assert_eq!(os.drive_owner(), "/machine/peripheral/disk0");
        assert_eq!(disks[1].drive_owner(), "/machine/peripheral-anon/device[3]");
        let tricky =
            QemuDisk { qdev: "/machine/peripheral/ma/virtio-backend".into(), ..os.clone() };
        assert_eq!(tricky.drive_owner(), "/machine/peripheral/ma", "an id inside the prefix");
        let anon = QemuDisk {
            qdev: "/machine/peripheral-anon/device[0]/virtio-backend".into(),
            ..os.clone()
        };
        assert_eq!(anon.drive_owner(), "/machine/peripheral-anon/device[0]");
        let v2 = QemuDisk { compat: "0.10".into(), ..os.clone() };
        assert!(!v2.persistent_bitmaps(), "qcow2 v2 cannot store bitmaps");
    }

    #[test]
    fn odd_answers_are_errors_or_skipped() {
        assert!(parse_block(&json!({})).is_err());
        assert_eq!(parse_block(&json!([1, {"inserted": 3}])).unwrap().len(), 1);
    }
}
