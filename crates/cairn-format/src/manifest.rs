//! The recovery-point manifest and the small JSON markers around it.
//!
//! A manifest is JSON: it is small, it must stay readable by people in a disaster, and new
//! fields (evidence kinds, encryption parameters) are added without breaking old readers,
//! which ignore what they do not know. Its `format` field is checked: a manifest of a newer
//! format is refused, never half-understood.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{Digest, Error, Name, PointId, check_block_size};

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// How consistent the captured disks are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Live disks read with no snapshot: blocks may come from different instants.
    None,
    /// All disks captured at one instant, nothing quiesced (like pulling the power).
    Crash,
    /// File systems were frozen or flushed when the disks were captured.
    FileSystem,
    /// Applications were quiesced (VSS writers, pre-scripts) as well as file systems.
    Application,
}

impl Consistency {
    /// The name used in manifests and on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Consistency::None => "none",
            Consistency::Crash => "crash",
            Consistency::FileSystem => "file_system",
            Consistency::Application => "application",
        }
    }
}

/// What a backup did for one disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskStats {
    /// Blocks in the disk.
    pub blocks: u64,
    /// Bytes read and hashed (allocated data; holes are skipped).
    pub bytes_scanned: u64,
    /// Bytes of blocks whose content differs from the previous point.
    pub bytes_changed: u64,
    /// Bytes written to the vault for this disk (chunk frames and index pages).
    pub bytes_sent: u64,
    /// Bytes of changed blocks that the vault already held (stored once).
    pub bytes_deduplicated: u64,
    /// Chunks written.
    pub chunks_written: u64,
    /// Blocks that were holes in the source.
    pub hole_blocks: u64,
    /// Blocks that were allocated but all zeros.
    pub zero_blocks: u64,
    /// Changed blocks stored as a patch over an earlier version (sub-block deltas).
    pub patched_blocks: u64,
    /// Wall time for this disk in milliseconds.
    pub duration_ms: u64,
}

/// One disk of a recovery point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Disk size in bytes.
    pub size: u64,
    /// Block size of its index.
    pub block_size: u32,
    /// Chunk id of the index root.
    pub index_root: Digest,
    /// The point this disk was compared against, if any (`None`: a full scan).
    #[serde(default)]
    pub previous_point: Option<PointId>,
    /// What was read (a path or URL): informational, never the disk's identity.
    #[serde(default)]
    pub source: String,
    /// What the backup did.
    #[serde(default)]
    pub stats: DiskStats,
}

/// One fact about how a point was made: why a full scan happened, which scripts ran, why a
/// consistency level was not reached. Extensible: new kinds need no new format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// A short machine-readable kind, e.g. `full_scan`, `previous_point_skipped`.
    pub kind: String,
    /// The disk it is about, if it is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Name>,
    /// A sentence for people.
    pub message: String,
    /// Structured details.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, serde_json::Value>,
}

impl Evidence {
    /// Evidence of `kind` with a message.
    pub fn new(kind: &str, disk: Option<&Name>, message: impl Into<String>) -> Self {
        Evidence {
            kind: kind.into(),
            disk: disk.cloned(),
            message: message.into(),
            details: BTreeMap::new(),
        }
    }
}

/// A recovery point: written last, create-only; its presence is what makes the point exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointManifest {
    /// Manifest format, [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The point's id.
    pub point: PointId,
    /// The VM it protects.
    pub vm: Name,
    /// When the job started.
    pub started_at: Timestamp,
    /// When the disks were captured (the snapshot instant, or the start of a live read).
    pub captured_at: Timestamp,
    /// When the manifest was written.
    pub finished_at: Timestamp,
    /// The consistency reached.
    pub consistency: Consistency,
    /// The disks, by name.
    pub disks: BTreeMap<Name, DiskRecord>,
    /// How the point was made.
    #[serde(default)]
    pub evidence: Vec<Evidence>,
    /// The agent that wrote it, e.g. `cairn-agent 0.1.0`.
    #[serde(default)]
    pub writer: String,
    /// What is needed to recreate the VM, where the hypervisor said (a VM in QEMU); absent
    /// for disks read from files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineRecord>,
    /// The scheduled job that made the point, when a coordinator asked for it: a retried job
    /// finds its point by this and does not commit a second one, and a catalogue rebuilt
    /// from the vault alone gets its jobs back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// Who asked for a point: a coordinator's job, or an agent running its cached schedule while
/// the coordinator was away.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The coordinator's catalogue, by its id (job ids are numbered per catalogue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalogue: Option<String>,
    /// The coordinator's job id (absent for a run from the agent's cached schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
    /// The policy's time the job was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<Timestamp>,
    /// The policy, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// A VM's definition as its hypervisor reported it at the point's capture: enough to create
/// it again around restored disks. Informative: nothing in Cairn acts on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// The hypervisor and its version, e.g. `QEMU 7.2.22`.
    pub hypervisor: String,
    /// The machine type, e.g. `pc-q35-7.2`.
    #[serde(default)]
    pub machine_type: String,
    /// Virtual CPUs.
    #[serde(default)]
    pub cpus: u64,
    /// Memory, bytes.
    #[serde(default)]
    pub memory: u64,
    /// The disks by name: the device, format, size and image the hypervisor had.
    #[serde(default)]
    pub disks: BTreeMap<Name, MachineDisk>,
    /// The devices the VM was started with, `id: type` (e.g. `virtio-disk0: virtio-blk-pci`).
    #[serde(default)]
    pub devices: Vec<String>,
}

/// One disk in a [`MachineRecord`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDisk {
    /// The device that holds it.
    pub device: String,
    /// Its image's format (`qcow2`, `raw`).
    pub format: String,
    /// The size the guest sees, bytes.
    pub size: u64,
    /// The image file, as the hypervisor names it.
    #[serde(default)]
    pub file: String,
}

impl PointManifest {
    /// The manifest's bytes (pretty JSON, so people can read it in a disaster).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Decodes and checks a manifest.
    pub fn decode(bytes: &[u8]) -> Result<PointManifest, Error> {
        let m: PointManifest = decode_json(bytes, "manifest", MANIFEST_FORMAT)?;
        for (name, disk) in &m.disks {
            check_block_size(disk.block_size).map_err(|e| Error::Corrupt {
                what: "manifest",
                detail: format!("disk {name}: {e}"),
            })?;
        }
        Ok(m)
    }

    /// Total bytes sent to the vault over all disks.
    pub fn bytes_sent(&self) -> u64 {
        self.disks.values().map(|d| d.stats.bytes_sent).sum()
    }
}

/// Written when a backup starts and removed after its manifest commits: tells a garbage
/// collector that chunks newer than `started_at` may belong to a point still in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightMarker {
    /// Marker format (1).
    pub format: u32,
    /// The point being written.
    pub point: PointId,
    /// Its VM.
    pub vm: Name,
    /// When the job started; chunks written since then may be unreferenced yet.
    pub started_at: Timestamp,
    /// Host and process that runs it, for people.
    #[serde(default)]
    pub owner: String,
}

json_document!(InflightMarker, "in-flight marker");

/// A pack, named with its size: what a resume record lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizedPack {
    /// The pack's name.
    pub pack: Digest,
    /// Its size in bytes, as uploaded.
    pub size: u64,
}

/// Written beside an in-flight marker, create-only: packs a running backup has, so that the
/// next backup of its VM can use them if it dies (a resume). `inflight/<point>/<pack>.json`
/// records one pack it uploaded; `inflight/<point>/adopted.json` the packs it took over from
/// an interrupted backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRecord {
    /// Record format (1).
    pub format: u32,
    /// The packs.
    pub packs: Vec<SizedPack>,
}

json_document!(ResumeRecord, "resume record");

/// Written by verify for a point that references bad or missing chunks. A damaged point is
/// never used as the base of an incremental backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamageRecord {
    /// Record format (1).
    pub format: u32,
    /// The damaged point.
    pub point: PointId,
    /// Its VM.
    pub vm: Name,
    /// When verify found it.
    pub found_at: Timestamp,
    /// Bad chunk ids and what is wrong with each.
    pub bad_chunks: BTreeMap<Digest, String>,
}

json_document!(DamageRecord, "damage record");

#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

/// `encode` (pretty JSON) and `decode` (format 1, checked first) for a small JSON document
/// of the vault: markers, records, plans.
macro_rules! json_document {
    ($ty:ty, $what:literal) => {
        impl $ty {
            /// The document's bytes.
            pub fn encode(&self) -> Vec<u8> {
                serde_json::to_vec_pretty(self).unwrap_or_default()
            }
            /// Decodes the document; another format than 1 is refused with "upgrade Cairn".
            pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
                $crate::manifest::decode_json(bytes, $what, 1)
            }
        }
    };
}
pub(crate) use json_document;

pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    format: u32,
) -> Result<T, Error> {
    decode_json_formats(bytes, what, format..=format)
}

/// As [`decode_json`], for a reader of every format in `formats`.
pub(crate) fn decode_json_formats<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    formats: std::ops::RangeInclusive<u32>,
) -> Result<T, Error> {
    // Read the format first, so a newer document gets "upgrade", not a field error.
    let probe: FormatOnly =
        serde_json::from_slice(bytes).map_err(|source| Error::Json { what, source })?;
    if !formats.contains(&probe.format) {
        return Err(Error::Unsupported { what, detail: format!("format {}", probe.format) });
    }
    serde_json::from_slice(bytes).map_err(|source| Error::Json { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> PointManifest {
        let ts: Timestamp = "2026-11-22T02:17:20.123Z".parse().unwrap();
        let mut disks = BTreeMap::new();
        disks.insert(
            "sda".parse().unwrap(),
            DiskRecord {
                size: 1 << 30,
                block_size: 65536,
                index_root: Digest::of(b"root"),
                previous_point: None,
                source: "/var/lib/vm/sda.raw".into(),
                stats: DiskStats { blocks: 16384, bytes_scanned: 1 << 29, ..Default::default() },
            },
        );
        PointManifest {
            format: MANIFEST_FORMAT,
            point: PointId::new(ts, 1),
            vm: "web-01".parse().unwrap(),
            started_at: ts,
            captured_at: ts,
            finished_at: ts,
            consistency: Consistency::None,
            disks,
            evidence: vec![Evidence::new("full_scan", None, "first backup of this VM")],
            writer: "test".into(),
            machine: None,
            origin: None,
        }
    }

    #[test]
    fn round_trips_and_refuses_newer_formats() {
        let m = sample();
        assert_eq!(PointManifest::decode(&m.encode()).unwrap(), m);
        let newer =
            String::from_utf8(m.encode()).unwrap().replace("\"format\": 1", "\"format\": 2");
        assert!(matches!(PointManifest::decode(newer.as_bytes()), Err(Error::Unsupported { .. })));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let text =
            String::from_utf8(sample().encode()).unwrap().replacen('{', "{\"future\": [1,2],", 1);
        assert!(PointManifest::decode(text.as_bytes()).is_ok());
    }

    #[test]
    fn bad_block_size_is_corrupt() {
        let text = String::from_utf8(sample().encode()).unwrap().replace("65536", "1000");
        assert!(matches!(PointManifest::decode(text.as_bytes()), Err(Error::Corrupt { .. })));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes: Vec<u8>) {
            let _ = PointManifest::decode(&bytes);
        }

        #[test]
        fn truncated_manifests_are_refused(cut in 1usize..200) {
            let bytes = sample().encode();
            let keep = bytes.len().saturating_sub(cut);
            prop_assert!(PointManifest::decode(&bytes[..keep]).is_err());
        }
    }
}
