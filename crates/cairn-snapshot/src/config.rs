//! The VM configuration: one TOML file with the VM's disks, how to view them, what to freeze
//! and which scripts to run. Every error names the field.
//!
//! ```toml
//! vm = "web-1"
//! state = "running"          # or "stopped": read the disks as they are, crash-consistent
//! live_read = false          # true: a disk with no view is read live (consistency "none")
//!
//! [freeze]
//! mounts = ["/srv/data"]     # file systems to freeze (FIFREEZE) while the views are taken
//! watchdog_seconds = 30      # the watchdog thaws them after this, whatever happens
//!
//! [scripts]                  # optional: Azure-style VMSnapshotScriptPluginConfig.json
//! config = "/etc/cairn/VMSnapshotScriptPluginConfig.json"
//!
//! [[disk]]
//! name = "os"
//! path = "/var/lib/vms/web-1/os.img"
//! view = "reflink"           # "reflink", "btrfs-snapshot" or "none"
//! format = "raw"             # or "qcow2"; never guessed from the image's bytes
//! allow_backing_file = false # qcow2 only: true accepts an image with a backing file
//! ```
//!
//! A VM that a running QEMU holds names QEMU's sockets instead of image paths, and each disk
//! its QEMU device: the views are QEMU's own (copy-before-write, exported over NBD), the
//! format and bitmaps are what QEMU reports, and the guest is frozen through its agent:
//!
//! ```toml
//! vm = "db-1"
//! qmp = "/run/qemu/db-1.qmp"             # QEMU's monitor (-qmp unix:PATH,server=on,wait=off)
//! guest_agent = "/run/qemu/db-1.qga"     # optional: qemu-ga's virtio-serial socket
//! guest_agent_required = false           # true: a guest that cannot be frozen fails the job
//! guest_freeze_seconds = 60              # how long the guest's freeze (and its hook) may take
//!
//! [fleece]                               # where copy-before-write keeps old data meanwhile
//! dir = "/var/lib/cairn/fleece"          # owned by the agent, mode 700
//! quota_mib = 4096                       # per disk; default a quarter of the disk, >= 256
//! cbw_timeout_seconds = 45               # a guest write waits no longer: the backup breaks
//!
//! [[disk]]
//! name = "os"
//! qemu_device = "virtio-disk0"           # device id, drive name or block node name
//! ```
//!
//! A disk's format is what this file declares, never what its first bytes look like: a guest
//! writes every byte of a raw disk, and a raw disk that starts with a qcow2 header naming a
//! backing file (`/etc/shadow`, another VM's disk) would otherwise make the agent read that
//! file instead. An undeclared disk is raw.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_format::Name;
use serde::Deserialize;

use crate::Error;
use crate::capture::{DiskSpec, ViewProvider, VmState};
use crate::freeze::{DEFAULT_DEADLINE, MAX_DEADLINE};

/// Where fleecing images go unless the configuration says.
pub const DEFAULT_FLEECE_DIR: &str = "/var/lib/cairn/fleece";
/// The longest fleecing folder accepted (see `qemu_config`).
const MAX_FLEECE_DIR: usize = 80;
/// How long a guest write may wait for copy-before-write unless the configuration says.
pub const DEFAULT_CBW_TIMEOUT: Duration = Duration::from_secs(45);
/// How long the guest's freeze may take unless the configuration says.
pub const DEFAULT_GUEST_FREEZE: Duration = Duration::from_secs(60);
use crate::trusted::TrustedFile;
use crate::views::{BtrfsSnapshot, LiveRead, ReflinkClone};

/// How a disk's point-in-time view is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViewKind {
    /// A reflink clone of the image file (XFS with reflink, btrfs).
    Reflink,
    /// A read-only snapshot of the btrfs subvolume holding the image.
    BtrfsSnapshot,
    /// No view: the disk is read as it is (needs `live_read = true` for a running VM).
    None,
}

impl ViewKind {
    /// The provider for this kind.
    pub fn provider(self) -> &'static dyn ViewProvider {
        match self {
            ViewKind::Reflink => &ReflinkClone,
            ViewKind::BtrfsSnapshot => &BtrfsSnapshot,
            ViewKind::None => &LiveRead,
        }
    }
}

/// The format of a disk image, as the operator declared it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskFormat {
    /// The disk's bytes as they are (an image file or a block device). The default.
    #[default]
    Raw,
    /// A qcow2 image, read through `qemu-nbd`, with changed-block tracking.
    Qcow2,
}

impl DiskFormat {
    /// `raw` or `qcow2`, as qemu's tools name them.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(format!("{other:?}: give \"raw\" or \"qcow2\"")),
        }
    }
}

/// One disk of the VM.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Name and image.
    pub spec: DiskSpec,
    /// How to view it.
    pub view: ViewKind,
    /// Its format, as declared (raw when not).
    pub format: DiskFormat,
    /// Whether a qcow2 image may have a backing file (refused unless the operator says so).
    pub allow_backing_file: bool,
    /// The QEMU device that holds the disk, for a VM a running QEMU holds (its `path` is
    /// then empty: QEMU has the image open).
    pub qemu_device: Option<String>,
}

impl DiskConfig {
    /// A disk read as it is, with no view (what `--disk NAME=PATH` means on a command line).
    pub fn live(name: Name, path: PathBuf, format: DiskFormat, allow_backing_file: bool) -> Self {
        DiskConfig {
            spec: DiskSpec { name, path },
            view: ViewKind::None,
            format,
            allow_backing_file,
            qemu_device: None,
        }
    }
}

/// A checked VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The file it came from (`None` for disks named on a command line).
    pub file: Option<PathBuf>,
    /// The VM's name.
    pub vm: Name,
    /// Running or stopped.
    pub state: VmState,
    /// Whether a running VM's disk may be read without a view.
    pub live_read: bool,
    /// Mount points to freeze.
    pub freeze_mounts: Vec<PathBuf>,
    /// The watchdog's deadline.
    pub watchdog_deadline: Duration,
    /// The script configuration file, if any.
    pub scripts: Option<PathBuf>,
    /// The disks, in the file's order.
    pub disks: Vec<DiskConfig>,
    /// For a VM a running QEMU holds: its sockets and the fleecing settings.
    pub qemu: Option<QemuConfig>,
}

/// How to reach a running QEMU and its guest, and where copy-before-write keeps old data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuConfig {
    /// QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The guest agent's socket, if the guest runs one.
    pub guest_agent: Option<PathBuf>,
    /// Whether a guest that cannot be frozen fails the backup (else: crash-consistent).
    pub guest_agent_required: bool,
    /// How long the guest's freeze may take.
    pub guest_freeze: Duration,
    /// The fleecing folder.
    pub fleece_dir: PathBuf,
    /// Bytes each disk's fleecing image may grow to (`None`: a quarter of the disk).
    pub fleece_quota: Option<u64>,
    /// How long a guest write may wait for copy-before-write.
    pub cbw_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    vm: String,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    live_read: bool,
    #[serde(default)]
    freeze: RawFreeze,
    #[serde(default)]
    scripts: Option<RawScripts>,
    #[serde(default)]
    disk: Vec<RawDisk>,
    #[serde(default)]
    qmp: Option<PathBuf>,
    #[serde(default)]
    guest_agent: Option<PathBuf>,
    #[serde(default)]
    guest_agent_required: bool,
    #[serde(default)]
    guest_freeze_seconds: Option<u64>,
    #[serde(default)]
    fleece: Option<RawFleece>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleece {
    #[serde(default)]
    dir: Option<PathBuf>,
    #[serde(default)]
    quota_mib: Option<u64>,
    #[serde(default)]
    cbw_timeout_seconds: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFreeze {
    #[serde(default)]
    mounts: Vec<PathBuf>,
    watchdog_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScripts {
    config: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    name: String,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    qemu_device: Option<String>,
    #[serde(default)]
    view: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    allow_backing_file: bool,
}

impl VmConfig {
    /// A running VM whose `disks` are read live, with nothing quiesced and no views (the
    /// point's consistency is `none`): what disks named on a command line mean.
    pub fn live(vm: Name, disks: Vec<DiskConfig>) -> VmConfig {
        VmConfig {
            file: None,
            vm,
            state: VmState::Running,
            live_read: true,
            freeze_mounts: Vec::new(),
            watchdog_deadline: DEFAULT_DEADLINE,
            scripts: None,
            disks,
            qemu: None,
        }
    }

    /// Reads and checks `path`. It says what the agent runs as root reads, freezes and
    /// writes next to, so it is held to the rules of a script configuration: mode 600, owned
    /// by the agent's user, in folders nobody else may write to (see [`crate::trusted`]).
    /// Relative paths in it are relative to its real folder (links resolved).
    pub fn load(path: &Path) -> Result<VmConfig, Error> {
        let in_context = |e| match e {
            Error::Io { what, source } => {
                Error::io(format!("reading VM configuration {what}"), source)
            }
            e => e,
        };
        let file = TrustedFile::open(path, 0o600).map_err(in_context)?;
        let text = file.read_to_string().map_err(in_context)?;
        // Relative paths in it are relative to where it really is: the folder of a link to it
        // may belong to someone else.
        VmConfig::parse(&text, file.real_path())
    }

    /// Parses and checks a configuration's text; `file` names it in errors and anchors
    /// relative paths (they are relative to the file's folder).
    pub fn parse(text: &str, file: &Path) -> Result<VmConfig, Error> {
        let name = file.display().to_string();
        let bad = |field: String, message: String| Error::config(name.clone(), field, message);
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().to_string();
            let field = crate::error::field_in(&message).unwrap_or_else(|| "(syntax)".into());
            let at = e
                .span()
                .map(|s| line_of(text, s.start))
                .map(|l| format!(" (line {l})"))
                .unwrap_or_default();
            bad(field, format!("{message}{at}"))
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let anchor = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let vm: Name = raw.vm.parse().map_err(|e| bad("vm".into(), format!("{e}")))?;
        let state = match raw.state.as_deref() {
            None | Some("running") => VmState::Running,
            Some("stopped") => VmState::Stopped,
            Some(other) => {
                return Err(bad(
                    "state".into(),
                    format!("{other:?}: give \"running\" or \"stopped\""),
                ));
            }
        };
        if raw.disk.is_empty() {
            return Err(bad(
                "disk".into(),
                "no disks: add a [[disk]] table with name and path".into(),
            ));
        }
        let mut disks: Vec<DiskConfig> = Vec::new();
        for (i, d) in raw.disk.iter().enumerate() {
            let field = |f: &str| format!("disk[{i}].{f}");
            let name: Name = d.name.parse().map_err(|e| bad(field("name"), format!("{e}")))?;
            if disks.iter().any(|o| o.spec.name == name) {
                return Err(bad(field("name"), format!("{name} is used by two disks")));
            }
            if raw.qmp.is_some() {
                disks.push(qemu_disk(d, name, &|f, m| bad(field(f), m))?);
                continue;
            }
            if d.qemu_device.is_some() {
                return Err(bad(
                    field("qemu_device"),
                    "a QEMU device needs the VM's QMP socket: set qmp = \"PATH\"".into(),
                ));
            }
            let Some(path) = &d.path else {
                return Err(bad(
                    field("path"),
                    format!(
                        "disk {name} has no path: give its image or device (or, for a VM a running QEMU holds, qmp and qemu_device)"
                    ),
                ));
            };
            let view = match d.view.as_deref() {
                None | Some("reflink") => ViewKind::Reflink,
                Some("btrfs-snapshot") => ViewKind::BtrfsSnapshot,
                Some("none") => ViewKind::None,
                Some(other) => {
                    return Err(bad(
                        field("view"),
                        format!(
                            "{other:?}: give \"reflink\", \"btrfs-snapshot\" or \"none\" (LVM and device-mapper are not built in)"
                        ),
                    ));
                }
            };
            if view == ViewKind::None && state == VmState::Running && !raw.live_read {
                return Err(bad(
                    field("view"),
                    format!(
                        "disk {name} has no view on a running VM: set live_read = true to accept consistency \"none\", or choose a view"
                    ),
                ));
            }
            let format = match d.format.as_deref() {
                None => DiskFormat::Raw,
                Some(f) => f.parse().map_err(|e| bad(field("format"), e))?,
            };
            if d.allow_backing_file && format != DiskFormat::Qcow2 {
                return Err(bad(
                    field("allow_backing_file"),
                    "only a qcow2 image has backing files: declare format = \"qcow2\"".into(),
                ));
            }
            disks.push(DiskConfig {
                spec: DiskSpec { name, path: anchor(path) },
                view,
                format,
                allow_backing_file: d.allow_backing_file,
                qemu_device: None,
            });
        }
        let watchdog_deadline = match raw.freeze.watchdog_seconds {
            None => DEFAULT_DEADLINE,
            Some(s) if (1..=MAX_DEADLINE.as_secs()).contains(&s) => Duration::from_secs(s),
            Some(s) => {
                return Err(bad(
                    "freeze.watchdog_seconds".into(),
                    format!("{s} is out of range: give 1 to {}", MAX_DEADLINE.as_secs()),
                ));
            }
        };
        for (i, m) in raw.freeze.mounts.iter().enumerate() {
            if !m.is_absolute() {
                return Err(bad(
                    format!("freeze.mounts[{i}]"),
                    format!("{} is not an absolute path", m.display()),
                ));
            }
        }
        let qemu = qemu_config(&raw, &anchor, &bad)?;
        if qemu.is_some() {
            if state == VmState::Stopped {
                return Err(bad(
                    "state".into(),
                    "a VM reached through qmp is running: leave state out, or back up a stopped VM's images by path".into(),
                ));
            }
            if !raw.freeze.mounts.is_empty() || raw.scripts.is_some() {
                return Err(bad(
                    if raw.scripts.is_some() { "scripts" } else { "freeze.mounts" }.into(),
                    "a VM in QEMU is frozen through its guest agent (guest_agent), whose fsfreeze hook runs the guest's own scripts: host-side freezes and scripts do not apply".into(),
                ));
            }
        }
        Ok(VmConfig {
            file: Some(file.to_path_buf()),
            vm,
            state,
            live_read: raw.live_read,
            freeze_mounts: raw.freeze.mounts,
            watchdog_deadline,
            scripts: raw.scripts.map(|s| anchor(&s.config)),
            disks,
            qemu,
        })
    }
}

/// A disk of a VM in QEMU: its device, and nothing about an image.
fn qemu_disk(
    d: &RawDisk,
    name: Name,
    bad: &dyn Fn(&str, String) -> Error,
) -> Result<DiskConfig, Error> {
    let Some(device) = d.qemu_device.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        return Err(bad(
            "qemu_device",
            format!(
                "disk {name} needs qemu_device: the id of its QEMU device (or its drive or block node name)"
            ),
        ));
    };
    if device.len() > 128 || device.chars().any(|c| c.is_control()) {
        return Err(bad("qemu_device", format!("{device:?} is not a QEMU device id")));
    }
    for (set, what) in [
        (d.path.is_some(), "path"),
        (d.view.is_some(), "view"),
        (d.format.is_some(), "format"),
        (d.allow_backing_file, "allow_backing_file"),
    ] {
        if set {
            return Err(bad(
                what,
                format!(
                    "disk {name} is in QEMU (qmp is set): QEMU has its image open, and its view and format come from QEMU; remove {what}"
                ),
            ));
        }
    }
    Ok(DiskConfig {
        spec: DiskSpec { name, path: PathBuf::new() },
        view: ViewKind::None,
        format: DiskFormat::Raw,
        allow_backing_file: false,
        qemu_device: Some(device.to_owned()),
    })
}

/// The QEMU settings, checked; `None` when the VM is not reached through QMP.
fn qemu_config(
    raw: &RawConfig,
    anchor: &dyn Fn(&Path) -> PathBuf,
    bad: &dyn Fn(String, String) -> Error,
) -> Result<Option<QemuConfig>, Error> {
    let Some(qmp) = &raw.qmp else {
        for (set, what) in [
            (raw.guest_agent.is_some(), "guest_agent"),
            (raw.guest_agent_required, "guest_agent_required"),
            (raw.guest_freeze_seconds.is_some(), "guest_freeze_seconds"),
            (raw.fleece.is_some(), "fleece"),
        ] {
            if set {
                return Err(bad(
                    what.into(),
                    "applies to a VM in QEMU only: set qmp = \"PATH\"".into(),
                ));
            }
        }
        return Ok(None);
    };
    if raw.guest_agent_required && raw.guest_agent.is_none() {
        return Err(bad(
            "guest_agent_required".into(),
            "requires the guest agent, but guest_agent names no socket".into(),
        ));
    }
    let seconds = |v: Option<u64>, field: &str, default: Duration| match v {
        None => Ok(default),
        Some(s) if (1..=600).contains(&s) => Ok(Duration::from_secs(s)),
        Some(s) => Err(bad(field.into(), format!("{s} is out of range: give 1 to 600"))),
    };
    let fleece = raw.fleece.as_ref();
    let fleece_dir = match fleece.and_then(|f| f.dir.as_ref()) {
        None => PathBuf::from(DEFAULT_FLEECE_DIR),
        Some(d) if d.is_absolute() => d.clone(),
        Some(d) => {
            return Err(bad(
                "fleece.dir".into(),
                format!("{} is not an absolute path", d.display()),
            ));
        }
    };
    // QEMU's NBD socket goes in a folder made there ("cairn-nbd-", six random characters,
    // then "/nbd.sock": 25 bytes more), and a unix socket's path holds at most 107 bytes.
    if fleece_dir.as_os_str().len() > MAX_FLEECE_DIR {
        return Err(bad(
            "fleece.dir".into(),
            format!(
                "{} is longer than {MAX_FLEECE_DIR} bytes: the NBD socket made in it would pass the 107-byte limit of a unix socket's path; give a shorter folder",
                fleece_dir.display()
            ),
        ));
    }
    if raw.guest_agent.as_ref() == Some(qmp) {
        return Err(bad(
            "guest_agent".into(),
            "names the same socket as qmp: QEMU's monitor and the guest agent's port are two sockets (-qmp unix:..., and a virtserialport's chardev)".into(),
        ));
    }
    let fleece_quota = match fleece.and_then(|f| f.quota_mib) {
        None => None,
        Some(m) if (16..=(1 << 30)).contains(&m) => Some(m << 20),
        Some(m) => {
            return Err(bad(
                "fleece.quota_mib".into(),
                format!("{m} is out of range: give 16 or more"),
            ));
        }
    };
    Ok(Some(QemuConfig {
        qmp: anchor(qmp),
        guest_agent: raw.guest_agent.as_deref().map(anchor),
        guest_agent_required: raw.guest_agent_required,
        guest_freeze: seconds(
            raw.guest_freeze_seconds,
            "guest_freeze_seconds",
            DEFAULT_GUEST_FREEZE,
        )?,
        fleece_dir,
        fleece_quota,
        cbw_timeout: seconds(
            fleece.and_then(|f| f.cbw_timeout_seconds),
            "fleece.cbw_timeout_seconds",
            DEFAULT_CBW_TIMEOUT,
        )?,
    }))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, Error> {
        VmConfig::parse(text, Path::new("/etc/cairn/vm.toml"))
    }

    fn field(e: Error) -> String {
        match e {
            Error::Config { field, .. } => field,
            other => panic!("not a config error: {other}"),
        }
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse(
            r#"
vm = "web-1"
[freeze]
mounts = ["/srv/data"]
watchdog_seconds = 12
[scripts]
config = "scripts.json"
[[disk]]
name = "os"
path = "os.img"
[[disk]]
name = "data"
path = "/vms/data.img"
view = "btrfs-snapshot"
format = "qcow2"
allow_backing_file = true
"#,
        )
        .unwrap();
        assert_eq!(c.vm.as_str(), "web-1");
        assert_eq!(c.state, VmState::Running);
        assert_eq!(c.watchdog_deadline, Duration::from_secs(12));
        assert_eq!(c.scripts, Some(PathBuf::from("/etc/cairn/scripts.json")));
        assert_eq!(c.disks[0].spec.path, PathBuf::from("/etc/cairn/os.img"));
        assert_eq!(c.disks[0].view, ViewKind::Reflink);
        assert_eq!(c.disks[1].view, ViewKind::BtrfsSnapshot);
        assert_eq!(c.disks[0].format, DiskFormat::Raw, "an undeclared disk is raw");
        assert_eq!(c.disks[1].format, DiskFormat::Qcow2);
        assert!(c.disks[1].allow_backing_file);
        assert_eq!(c.freeze_mounts, vec![PathBuf::from("/srv/data")]);
    }

    #[test]
    fn every_error_names_its_field() {
        let disk = "[[disk]]\nname = \"os\"\npath = \"/os.img\"\n";
        let cases = [
            (format!("vm = \"bad name!\"\n{disk}"), "vm"),
            (format!("vm = \"v\"\nstate = \"paused\"\n{disk}"), "state"),
            ("vm = \"v\"\n".to_string(), "disk"),
            (format!("vm = \"v\"\ncolour = 1\n{disk}"), "colour"),
            (disk.to_string(), "vm"),
            (format!("vm = \"v\"\n{disk}view = \"lvm\"\n"), "disk[0].view"),
            (format!("vm = \"v\"\n{disk}view = \"none\"\n"), "disk[0].view"),
            (format!("vm = \"v\"\n{disk}{disk}"), "disk[1].name"),
            (format!("vm = \"v\"\n{disk}format = \"vmdk\"\n"), "disk[0].format"),
            (
                format!("vm = \"v\"\n{disk}allow_backing_file = true\n"),
                "disk[0].allow_backing_file",
            ),
            (
                format!("vm = \"v\"\n[freeze]\nwatchdog_seconds = 0\n{disk}"),
                "freeze.watchdog_seconds",
            ),
            (
                format!("vm = \"v\"\n[freeze]\nwatchdog_seconds = 9999\n{disk}"),
                "freeze.watchdog_seconds",
            ),
            (format!("vm = \"v\"\n[freeze]\nmounts = [\"rel\"]\n{disk}"), "freeze.mounts[0]"),
            (format!("vm = \"v\"\n[freeze]\nmount = [\"/x\"]\n{disk}"), "mount"),
            ("vm = \"v\"\n[[disk]]\nname = \"os\"\n".to_string(), "disk[0].path"),
            (format!("vm = \"v\"\n{disk}qemu_device = \"d0\"\n"), "disk[0].qemu_device"),
            (format!("vm = \"v\"\nguest_agent = \"/g\"\n{disk}"), "guest_agent"),
            (format!("vm = \"v\"\n[fleece]\ndir = \"/f\"\n{disk}"), "fleece"),
        ];
        let qemu = "vm = \"v\"\nqmp = \"/q\"\n";
        let dev = "[[disk]]\nname = \"os\"\nqemu_device = \"d0\"\n";
        let cases = cases.into_iter().chain([
            (format!("{qemu}{disk}"), "disk[0].qemu_device"),
            (format!("{qemu}{dev}path = \"/os.img\"\n"), "disk[0].path"),
            (format!("{qemu}[[disk]]\nname = \"os\"\n"), "disk[0].qemu_device"),
            (format!("{qemu}{dev}format = \"qcow2\"\n"), "disk[0].format"),
            (format!("{qemu}{dev}view = \"reflink\"\n"), "disk[0].view"),
            (format!("{qemu}guest_agent_required = true\n{dev}"), "guest_agent_required"),
            (format!("{qemu}state = \"stopped\"\n{dev}"), "state"),
            (format!("{qemu}[freeze]\nmounts = [\"/x\"]\n{dev}"), "freeze.mounts"),
            (format!("{qemu}guest_freeze_seconds = 0\n{dev}"), "guest_freeze_seconds"),
            (format!("{qemu}[fleece]\ndir = \"rel\"\n{dev}"), "fleece.dir"),
            (format!("{qemu}[fleece]\ndir = \"/{}\"\n{dev}", "d".repeat(90)), "fleece.dir"),
            (format!("{qemu}guest_agent = \"/q\"\n{dev}"), "guest_agent"),
            (format!("{qemu}[fleece]\nquota_mib = 1\n{dev}"), "fleece.quota_mib"),
            (
                format!("{qemu}[fleece]\ncbw_timeout_seconds = 9999\n{dev}"),
                "fleece.cbw_timeout_seconds",
            ),
            (format!("{qemu}[fleece]\nsize = 3\n{dev}"), "size"),
        ]);
        for (text, expected) in cases {
            assert_eq!(field(parse(&text).unwrap_err()), expected, "{text}");
        }
    }

    #[test]
    fn a_vm_in_qemu_names_sockets_and_devices() {
        let text = "vm = \"db\"\nqmp = \"run/db.qmp\"\nguest_agent = \"/run/db.qga\"\n\
                    guest_agent_required = true\nguest_freeze_seconds = 20\n\
                    [fleece]\ndir = \"/var/fleece\"\nquota_mib = 512\ncbw_timeout_seconds = 30\n\
                    [[disk]]\nname = \"os\"\nqemu_device = \"virtio-disk0\"\n";
        let c = parse(text).unwrap();
        let q = c.qemu.as_ref().unwrap();
        assert_eq!(q.qmp, PathBuf::from("/etc/cairn/run/db.qmp"), "relative to the file");
        assert_eq!(q.guest_agent, Some(PathBuf::from("/run/db.qga")));
        assert!(q.guest_agent_required);
        assert_eq!(q.guest_freeze, Duration::from_secs(20));
        assert_eq!(q.fleece_dir, PathBuf::from("/var/fleece"));
        assert_eq!(q.fleece_quota, Some(512 << 20));
        assert_eq!(q.cbw_timeout, Duration::from_secs(30));
        assert_eq!(c.disks[0].qemu_device.as_deref(), Some("virtio-disk0"));
        let defaults =
            parse("vm = \"db\"\nqmp = \"/q\"\n[[disk]]\nname = \"os\"\nqemu_device = \"d\"\n")
                .unwrap();
        let q = defaults.qemu.unwrap();
        assert_eq!((q.guest_agent, q.guest_agent_required), (None, false));
        assert_eq!(q.fleece_dir, PathBuf::from(DEFAULT_FLEECE_DIR));
        assert_eq!((q.fleece_quota, q.cbw_timeout), (None, DEFAULT_CBW_TIMEOUT));
    }

    #[test]
    fn live_reads_are_allowed_when_asked_for_or_when_stopped() {
        let disk = "[[disk]]\nname = \"os\"\npath = \"/os.img\"\nview = \"none\"\n";
        assert!(parse(&format!("vm = \"v\"\nlive_read = true\n{disk}")).is_ok());
        let c = parse(&format!("vm = \"v\"\nstate = \"stopped\"\n{disk}")).unwrap();
        assert_eq!(c.state, VmState::Stopped);
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let e = parse("vm = \"v\"\n[[disk]\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_names_a_field(text in ".{0,200}") {
            match parse(&text) {
                Ok(c) => proptest::prop_assert!(!c.disks.is_empty()),
                Err(Error::Config { field, .. }) => proptest::prop_assert!(!field.is_empty()),
                Err(other) => proptest::prop_assert!(false, "{other}"),
            }
        }

        #[test]
        fn near_valid_configs_parse_or_name_a_field(
            vm in "[a-z.!-]{0,8}",
            state in "(running|stopped|paused)",
            view in "(reflink|btrfs-snapshot|none|lvm)",
            live in proptest::bool::ANY,
            seconds in 0u64..1000,
        ) {
            let text = format!(
                "vm = \"{vm}\"\nstate = \"{state}\"\nlive_read = {live}\n[freeze]\nwatchdog_seconds = {seconds}\n[[disk]]\nname = \"os\"\npath = \"/os.img\"\nview = \"{view}\"\n"
            );
            match parse(&text) {
                Ok(c) => {
                    proptest::prop_assert!(c.watchdog_deadline <= MAX_DEADLINE);
                    proptest::prop_assert!(c.disks[0].view != ViewKind::None || live || c.state == VmState::Stopped);
                }
                Err(Error::Config { field, .. }) => proptest::prop_assert!(!field.is_empty()),
                Err(other) => proptest::prop_assert!(false, "{other}"),
            }
        }
    }
}
