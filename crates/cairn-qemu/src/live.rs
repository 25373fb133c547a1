//! A point-in-time view of every disk of a running VM at one instant, read over QEMU's own
//! NBD export, with the next dirty bitmap started at that instant.
//!
//! For each disk, before anything is quiesced ([`LiveVm::prepare`]): a temporary qcow2
//! **fleecing image** (at most `quota` bytes), opened by QEMU as node `cairn-fl-N`, and a
//! **copy-before-write** filter `cairn-cbw-N` over the disk's node, which copies the old
//! data of every block the guest overwrites into the fleecing image first. Then, at the
//! instant ([`LiveVm::take`], while the guest is quiesced): the VM's vCPUs are paused
//! (`stop`, which also drains in-flight I/O) if it was running, one QMP `transaction`
//! disables each disk's previous Cairn bitmap and adds the next one, every device is
//! switched onto its filter (`qom-set drive`), and the VM runs on (`cont`). The view of
//! each disk is then a `snapshot-access` node exported read-only over NBD on a private unix
//! socket, with a frozen copy of the previous bitmap so the reader sees what changed.
//!
//! **The guest comes first**: the filter is opened with `on-cbw-error=break-snapshot` and a
//! `cbw-timeout`, so a guest write that cannot be copied in time (slow, full or failed
//! fleecing storage, or an image past its quota) goes through and breaks the view instead:
//! the backup's reads fail and the point is not committed.
//!
//! [`LiveVm::finish`] undoes it all, after the commit or the failure: exports, NBD server,
//! devices back on their own nodes, filter and fleecing nodes and files deleted; after a
//! commit the older bitmaps are removed, after a failure the next one is merged back into
//! the previous one, which records again. What a killed run left (recorded in a state file
//! beside its fleecing images before QEMU was touched) is undone by the next run, under the
//! same per-VM lock, before it starts.
//!
//! **Kept views** ([`FleeceOptions::clone_images`], for a point's snapshot tier): while the
//! vCPUs are paused at the instant, after QEMU drained and flushed every disk, each disk's
//! image file is cloned by reflink beside itself (XFS, btrfs), the same instant as the
//! fleecing view at the cost of a metadata copy. The clone is not what the backup reads (the
//! previous bitmap lives in QEMU, on the export); it is what the job may keep afterwards and
//! `cairn-agent held restore` copies. Cloned only where safe: an absolute path to a raw image
//! of exactly the disk's size, or a qcow2 image with no backing file, data file or
//! encryption, in folders no one else may change, on XFS or btrfs with 10 % free; cloned from
//! a descriptor checked to be the very file QEMU holds open (a name QEMU reports never makes
//! root clone another file); only when this run paused the VM itself and no block job runs;
//! and within [`MAX_CLONE_EXTENTS`] for all disks (counted before the pause and again in it).
//! Every disk is cloned or none is, and the clones' names are in the state file first, so a
//! killed run's clones are removed by the next. The VM keeps running on its own image:
//! nothing in QEMU's block graph outlives the backup (an external overlay would, and a QEMU
//! restarted from its own configuration would then boot from the stale base).
//!
//! Needs QEMU 7.1 or later (`snapshot-access`, `on-cbw-error`, `cbw-timeout`; 7.2 is tested).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_format::{Name, PointId};
use cairn_nbd::{Previous, bitmap_name, judge};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::vm::{self, QemuDisk};
use crate::{Error, Qmp};

/// The most extents an image may have to be cloned while the VM is paused: a reflink clone
/// copies one record per extent (about 20 µs each on XFS), so this holds the pause near half
/// a second. A more fragmented image gets no kept view (`xfs_fsr` defragments it).
pub const MAX_CLONE_EXTENTS: u32 = 25_000;

/// How long a guest write may wait for its old data to be copied before the view breaks
/// instead (Proxmox uses 45 s: Windows storage drivers give up at 60 s).
pub const DEFAULT_CBW_TIMEOUT: Duration = Duration::from_secs(45);

/// The oldest QEMU with what a live view needs.
pub const MIN_QEMU: (u64, u64) = (7, 1);

/// One disk of the VM to view: its name in Cairn and the QEMU device that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveDiskSpec {
    /// The disk's name in the point.
    pub name: Name,
    /// `qemu_device`: the device id (or drive or node name) in QEMU.
    pub device: String,
}

/// Where fleecing images go, and their limits.
#[derive(Clone, Debug)]
pub struct FleeceOptions {
    /// A folder only the agent writes to (made 0700 if missing), on storage that can take
    /// the guest's writes during a backup. It also holds the per-VM lock and state files.
    pub dir: PathBuf,
    /// Bytes a disk's fleecing image may grow to; `None`: a quarter of the disk, at least
    /// 256 MiB.
    pub quota: Option<u64>,
    /// How long a guest write may wait for copy-before-write.
    pub cbw_timeout: Duration,
    /// Also clone each disk's image file at the instant (a reflink clone, made while the
    /// vCPUs are paused and QEMU has flushed the image): a view that may be kept past the
    /// backup for instant restores. A disk whose image cannot be cloned cheaply is noted and
    /// read as usual; the point then has no snapshot tier.
    pub clone_images: bool,
}

impl FleeceOptions {
    fn quota_for(&self, size: u64) -> u64 {
        self.quota.unwrap_or((size / 4).max(256 << 20))
    }
}

/// What a run changes in QEMU, written before the first change so a later run can undo it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    /// Per disk: the device's QOM path and the node it used before.
    devices: Vec<(String, String)>,
    /// Nodes added, in the order to delete them (views, filters, fleecing images).
    nodes: Vec<String>,
    /// Exports added.
    exports: Vec<String>,
    /// Whether this run started QEMU's NBD server.
    server: bool,
    /// Fleecing images made.
    files: Vec<PathBuf>,
    /// Whether this run paused the VM (and must let it run on).
    #[serde(default)]
    paused: bool,
    /// The folder of this run's NBD socket.
    #[serde(default)]
    socket_dir: Option<PathBuf>,
    /// The QEMU the changes were made in: a later run undoes them only in that QEMU.
    #[serde(default)]
    qemu: Option<QemuId>,
}

impl State {
    /// Whether it records no change to QEMU and no file (the NBD socket's folder goes with
    /// its `TempDir`).
    fn changes_nothing(&self) -> bool {
        self.devices.is_empty()
            && self.nodes.is_empty()
            && self.exports.is_empty()
            && !self.server
            && self.files.is_empty()
            && !self.paused
    }
}

/// One QEMU process, known by the QMP socket it made: its path, the socket file's identity
/// (a restarted QEMU, or libvirt for it, makes a new one) and the boot it was made in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct QemuId {
    socket: PathBuf,
    boot: String,
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl QemuId {
    fn of(socket: &Path) -> Option<QemuId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(socket).ok()?;
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(QemuId {
            socket: socket.to_path_buf(),
            boot: boot.trim().to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Whether this QEMU still runs: its socket is still the one it made, and accepts (or is
    /// busy with another client, which only a live QEMU can be).
    fn runs(&self) -> bool {
        QemuId::of(&self.socket).as_ref() == Some(self)
            && match crate::socket::connect(&self.socket, Duration::from_secs(2)) {
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::TimedOut,
            }
    }
}

/// One disk being viewed.
#[derive(Debug)]
struct LiveDisk {
    spec: LiveDiskSpec,
    qemu: QemuDisk,
    previous: Previous,
    /// The bitmap this point starts.
    started: String,
    /// The disk's Cairn bitmaps when the run began: removed after a commit.
    older: Vec<String>,
    /// Whether the previous bitmap was disabled at the instant (to re-enable on failure).
    froze_previous: bool,
}

/// A running VM whose disks are being viewed: see the module's documentation.
pub struct LiveVm {
    qmp: Qmp,
    vm: Name,
    disks: Vec<LiveDisk>,
    /// Bytes per bit of the bitmaps this run starts: the vault's block size.
    granularity: u64,
    /// Whether the instant's transaction ran (the next bitmaps exist).
    bitmaps_started: bool,
    /// Per disk, in order, when the images are to be cloned at the instant: the image as
    /// QEMU holds it open and the clone's name (checked before the pause). Empty: no clones.
    clone_plan: Vec<PlannedClone>,
    /// Per disk, in order: its image's clone made at the instant, if one was.
    clones: Vec<Option<cairn_snapshot::View>>,
    /// What the cloning did or why a disk has no clone, for the point's evidence.
    clone_notes: Vec<(Name, String)>,
    state: State,
    state_file: PathBuf,
    socket: PathBuf,
    _lock: File,
    _socket_dir: tempfile::TempDir,
}

impl std::fmt::Debug for LiveVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVm").field("vm", &self.vm).field("disks", &self.disks).finish()
    }
}

impl LiveVm {
    /// Connects to the VM's QMP socket, takes the per-VM lock, undoes what a killed run left,
    /// finds each disk's device, judges its bitmaps against `previous` (the point each disk's
    /// last bitmap should have been started by) and prepares its fleecing image and filter.
    /// Nothing the guest sees has changed yet.
    pub fn prepare(
        qmp_socket: &Path,
        vm: &Name,
        point: &PointId,
        disks: &[LiveDiskSpec],
        previous: &BTreeMap<Name, PointId>,
        granularity: u64,
        options: &FleeceOptions,
    ) -> Result<LiveVm, Error> {
        let dir = private_dir(&options.dir)?;
        let lock = lock(&dir, vm)?;
        let mut qmp = Qmp::connect(qmp_socket)?;
        let (major, minor, micro) = qmp.version();
        if (major, minor) < MIN_QEMU {
            return Err(Error::Vm(format!(
                "QEMU {major}.{minor}.{micro} cannot give a point-in-time view of a running VM's \
                 disks: it needs {}.{} or later (snapshot-access, on-cbw-error); back the VM up \
                 stopped, or upgrade QEMU",
                MIN_QEMU.0, MIN_QEMU.1
            )));
        }
        let state_file = dir.join(format!("cairn-{vm}.state.json"));
        let qemu = QemuId::of(qmp_socket);
        undo_leftovers(&mut qmp, &state_file, vm, qemu.as_ref())?;
        let found = vm::disks(&mut qmp)?;
        let mut live = Vec::new();
        for spec in disks {
            let qemu = vm::find(&found, &spec.device)?.clone();
            if qemu.qdev.is_empty() {
                return Err(Error::Vm(format!(
                    "disk {} ({}) is block node {}, which no guest device uses: give the id of \
                     the device the guest sees (`config check` lists them)",
                    spec.name, spec.device, qemu.node
                )));
            }
            if let Some(other) = live.iter().find(|d: &&LiveDisk| d.qemu.node == qemu.node) {
                return Err(Error::Vm(format!(
                    "disks {} and {} name the same QEMU disk (node {}): give each its own qemu_device",
                    other.spec.name, spec.name, qemu.node
                )));
            }
            if qemu.format == "copy-before-write" || qemu.node.starts_with("cairn-") {
                return Err(Error::Vm(format!(
                    "disk {} ({}) is already behind a copy-before-write filter ({}): another \
                     backup of this VM is running in this QEMU",
                    spec.name, spec.device, qemu.node
                )));
            }
            let prefix = format!("cairn:{vm}:{}:", spec.name);
            let mut bitmaps = qemu.bitmaps.clone();
            if repair_rotation(&mut qmp, &qemu, &prefix, previous.get(&spec.name))? {
                bitmaps = vm::find(&vm::disks(&mut qmp)?, &spec.device)?.bitmaps.clone();
            }
            let mut judged = judge(&bitmaps, &prefix, previous.get(&spec.name));
            if let Previous::Bitmap { granularity: g, .. } = judged
                && g > granularity
            {
                judged = Previous::Unusable(format!(
                    "its previous bitmap has {g}-byte granules, coarser than the vault's \
                     {granularity}-byte blocks"
                ));
            }
            let started = bitmap_name(vm, &spec.name, point);
            let older = bitmaps
                .iter()
                .map(|b| b.name.clone())
                .filter(|n| n.starts_with(&prefix) && *n != started)
                .collect();
            live.push(LiveDisk {
                spec: spec.clone(),
                qemu,
                previous: judged,
                started,
                older,
                froze_previous: false,
            });
        }
        let socket_dir = tempfile::Builder::new()
            .prefix("cairn-nbd-")
            .tempdir_in(&dir)
            .map_err(|e| Error::Fleece { path: dir.clone(), detail: e.to_string() })?;
        let mut this = LiveVm {
            qmp,
            vm: vm.clone(),
            disks: live,
            granularity,
            bitmaps_started: false,
            clone_plan: Vec::new(),
            clones: Vec::new(),
            clone_notes: Vec::new(),
            state: State {
                socket_dir: Some(socket_dir.path().to_path_buf()),
                qemu,
                ..State::default()
            },
            state_file,
            socket: socket_dir.path().join("nbd.sock"),
            _lock: lock,
            _socket_dir: socket_dir,
        };
        let need: u64 = this.disks.iter().map(|d| options.quota_for(d.qemu.size)).sum();
        let free = rustix::fs::statvfs(&dir)
            .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
            .map_err(|e| Error::Fleece { path: dir.clone(), detail: e.to_string() })?;
        if free < need {
            return Err(Error::Fleece {
                path: dir.clone(),
                detail: format!(
                    "has {} MiB free, and the fleecing images may take up to {} MiB while the \
                     guest writes (fleece.quota_mib per disk): free space there, choose another \
                     fleece.dir, or lower fleece.quota_mib",
                    free >> 20,
                    need >> 20
                ),
            });
        }
        if options.clone_images {
            this.plan_clones();
        }
        if let Err(e) = this.add_filters(&dir, point, options) {
            this.undo_logged();
            return Err(e);
        }
        Ok(this)
    }

    /// Each disk's fleecing image and filter, recorded in the state file first.
    fn add_filters(
        &mut self,
        dir: &Path,
        point: &PointId,
        options: &FleeceOptions,
    ) -> Result<(), Error> {
        for (i, d) in self.disks.iter().enumerate() {
            let file = dir.join(format!("cairn-fleece-{}-{i}-{point}.qcow2", self.vm));
            let (fl, cbw) = (format!("cairn-fl-{i}"), format!("cairn-cbw-{i}"));
            self.state.devices.push((d.qemu.drive_owner().to_owned(), d.qemu.node.clone()));
            self.state.files.push(file.clone());
            self.state.nodes.splice(0..0, [cbw.clone(), fl.clone()]);
            save(&self.state_file, &self.state)?;
            make_fleecing_image(&file, d.qemu.size, options.quota_for(d.qemu.size))?;
            let quota = options.quota_for(d.qemu.size);
            self.qmp.execute(
                "blockdev-add",
                json!({
                    "driver": "qcow2", "node-name": fl, "discard": "unmap",
                    "file": {"driver": "raw", "size": quota,
                             "file": {"driver": "file", "filename": file}}
                }),
            )?;
            self.qmp.execute(
                "blockdev-add",
                json!({
                    "driver": "copy-before-write", "node-name": cbw,
                    "file": d.qemu.node, "target": fl,
                    "on-cbw-error": "break-snapshot",
                    "cbw-timeout": options.cbw_timeout.as_secs().max(1),
                }),
            )?;
        }
        Ok(())
    }

    /// What each disk's previous bitmap can tell, by disk name.
    pub fn previous(&self, disk: &Name) -> Option<&Previous> {
        self.disks.iter().find(|d| &d.spec.name == disk).map(|d| &d.previous)
    }

    /// The NBD socket the views are exported on (after [`LiveVm::take`]).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The name of disk `disk`'s export.
    pub fn export_name(disk: &Name) -> String {
        format!("cairn-{disk}")
    }

    /// Lets go of the VM as a killed process would: the connection and the lock are closed,
    /// nothing is undone (the state file stays for the next run). For tests of that next run.
    #[doc(hidden)]
    pub fn abandon_as_if_killed(mut self) {
        self.state = State::default();
        self.bitmaps_started = false;
    }

    /// The VM's definition as QEMU reports it: machine type, vCPUs, memory, the disks and the
    /// devices it was started with. What QEMU does not answer is left empty: the record is
    /// informative, and never fails a backup.
    pub fn machine(&mut self) -> cairn_format::MachineRecord {
        let (major, minor, micro) = self.qmp.version();
        let machine_type = self
            .qmp
            .execute("qom-get", json!({"path": "/machine", "property": "type"}))
            .ok()
            .and_then(|v| v.as_str().map(|t| t.trim_end_matches("-machine").to_owned()))
            .unwrap_or_default();
        let cpus = self
            .qmp
            .execute("query-cpus-fast", json!({}))
            .ok()
            .and_then(|v| v.as_array().map(|a| a.len() as u64))
            .unwrap_or(0);
        let memory = self
            .qmp
            .execute("query-memory-size-summary", json!({}))
            .ok()
            .and_then(|v| v.get("base-memory").and_then(Value::as_u64))
            .unwrap_or(0);
        let devices = self
            .qmp
            .execute("qom-list", json!({"path": "/machine/peripheral"}))
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let kind = p.get("type")?.as_str()?.strip_prefix("child<")?.strip_suffix('>')?;
                Some(format!("{}: {kind}", p.get("name")?.as_str()?))
            })
            .collect();
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let disk = cairn_format::MachineDisk {
                    device: d.spec.device.clone(),
                    format: d.qemu.format.clone(),
                    size: d.qemu.size,
                    file: d.qemu.file.clone(),
                };
                (d.spec.name.clone(), disk)
            })
            .collect();
        cairn_format::MachineRecord {
            hypervisor: format!("QEMU {major}.{minor}.{micro}"),
            machine_type,
            cpus,
            memory,
            disks,
            devices,
        }
    }

    /// QEMU's version.
    pub fn qemu_version(&self) -> (u64, u64, u64) {
        self.qmp.version()
    }

    /// Each disk as QEMU reported it: node, format, file, size.
    pub fn disks(&self) -> impl Iterator<Item = (&Name, &QemuDisk)> {
        self.disks.iter().map(|d| (&d.spec.name, &d.qemu))
    }

    /// The instant: pauses the VM if it runs, freezes each previous bitmap and starts the
    /// next, switches every device onto its filter, lets the VM run on; then exports the
    /// views. Returns how long the vCPUs were paused. On error, what was done is undone.
    pub fn take(&mut self) -> Result<Duration, Error> {
        match self.switch() {
            Ok(paused) => match self.export() {
                Ok(()) => Ok(paused),
                Err(e) => {
                    self.undo_logged();
                    Err(e)
                }
            },
            Err(e) => {
                self.undo_logged();
                Err(e)
            }
        }
    }

    fn switch(&mut self) -> Result<Duration, Error> {
        let running =
            self.qmp.execute("query-status", json!({}))?.get("running") == Some(&Value::Bool(true));
        let mut actions = Vec::new();
        let granularity = self.granularity;
        for d in &mut self.disks {
            if let Previous::Bitmap { name, .. } = &d.previous {
                actions.push(json!({"type": "block-dirty-bitmap-disable",
                                    "data": {"node": d.qemu.node, "name": name}}));
                d.froze_previous = true;
            }
            actions.push(json!({"type": "block-dirty-bitmap-add",
                                "data": {"node": d.qemu.node, "name": d.started,
                                         "persistent": d.qemu.persistent_bitmaps(),
                                         "granularity": granularity}}));
        }
        let started = std::time::Instant::now();
        let mut stopped = Ok(());
        if running {
            // Recorded first: if this process dies before `cont`, the next run resumes the VM.
            self.state.paused = true;
            save(&self.state_file, &self.state)?;
            stopped = self.qmp.execute("stop", json!({})).map(|_| ());
        }
        let switched = stopped.and_then(|()| self.switch_paused(actions));
        if switched.is_ok() && !self.clone_plan.is_empty() {
            if running {
                // Paused and flushed by our `stop`: each image file holds the instant.
                self.clone_paused();
            } else {
                self.no_clones("the VM was not running (paused or stopped by someone else, its disks maybe not flushed)".into());
            }
        }
        // Once `stop` was sent the VM runs on, whatever happened.
        let resumed = match running {
            true => self.qmp.execute("cont", json!({})).map(|_| ()),
            false => Ok(()),
        };
        if running && resumed.is_ok() {
            self.state.paused = false;
            save(&self.state_file, &self.state)?;
        }
        let paused = started.elapsed();
        switched?;
        resumed?;
        self.check_clones();
        Ok(paused)
    }

    /// Plans each disk's clone (see [`plan_clone`]); a tier is whole or absent, so if one
    /// disk cannot be cloned none is. The clones' names go into the state file (written by
    /// `add_filters` before anything changes), so a later run removes a killed run's clones.
    fn plan_clones(&mut self) {
        let pid = self.qmp.peer_pid();
        let mut plan = vec![];
        for d in &self.disks {
            match plan_clone(&d.qemu, pid) {
                Ok(p) => plan.push(p),
                Err(why) => {
                    self.no_clones(format!("disk {}'s image cannot be: {why}", d.spec.name));
                    return;
                }
            }
        }
        for p in &plan {
            cairn_snapshot::views::remove_stale_clones_of(&p.image);
            self.state.files.push(p.clone_path.clone());
        }
        self.clone_plan = plan;
    }

    /// Gives the clones up, saying why in the point's evidence.
    fn no_clones(&mut self, why: String) {
        self.clone_plan.clear();
        self.clones.clear();
        for d in &self.disks {
            self.clone_notes
                .push((d.spec.name.clone(), format!("no view kept for instant restores: {why}")));
        }
    }

    /// Clones each disk's image file, while the VM is paused, from the file QEMU holds open,
    /// within [`MAX_CLONE_EXTENTS`] for all disks together (counted again now: the guest may
    /// have written since the plan), and only while no block job writes to the disks.
    fn clone_paused(&mut self) {
        let jobs = self.qmp.execute("query-block-jobs", json!({}));
        if !jobs.as_ref().is_ok_and(|j| j.as_array().is_some_and(Vec::is_empty)) {
            return self.no_clones("a QEMU block job (mirror, stream, commit) is running".into());
        }
        let mut extents = 0u64;
        for p in &self.clone_plan {
            extents +=
                u64::from(cairn_snapshot::views::extent_count(&p.source).unwrap_or(u32::MAX));
        }
        if extents > u64::from(MAX_CLONE_EXTENTS) {
            return self.no_clones(format!(
                "the images have {extents} extents together, more than {MAX_CLONE_EXTENTS}: \
                 cloning them would hold the VM paused too long (defragment them, with \
                 `xfs_fsr` on XFS)"
            ));
        }
        let mut clones = vec![];
        let mut notes = vec![];
        for (d, p) in self.disks.iter().zip(&self.clone_plan) {
            let started = std::time::Instant::now();
            let spec =
                cairn_snapshot::DiskSpec { name: d.spec.name.clone(), path: p.image.clone() };
            match cairn_snapshot::views::clone_view(&spec, &p.source, p.clone_path.clone()) {
                Ok(view) => {
                    notes.push((
                        d.spec.name.clone(),
                        format!(
                            "{} image {} cloned by reflink in {:.1} ms while paused, for instant restores",
                            d.qemu.format,
                            view.path().display(),
                            started.elapsed().as_secs_f64() * 1000.0
                        ),
                    ));
                    clones.push(Some(view));
                }
                Err(e) => {
                    // Dropping the clones made removes them.
                    drop(clones);
                    return self.no_clones(format!("cloning disk {}: {e}", d.spec.name));
                }
            }
        }
        self.clone_notes.extend(notes);
        self.clones = clones;
    }

    /// After the VM runs on: each clone must read as the disk (a raw clone of exactly its
    /// size; a qcow2 clone of its size that opens nothing besides itself). One that does not
    /// is removed, with a note.
    fn check_clones(&mut self) {
        let mut bad = None;
        for (d, clone) in self.disks.iter().zip(self.clones.iter()) {
            let Some(view) = clone else { continue };
            let fits = match d.qemu.format.as_str() {
                "qcow2" => cairn_nbd::qcow2::check_image(view.path(), false)
                    .map_err(|e| e.to_string())
                    .and_then(|h| match h.virtual_size == d.qemu.size {
                        true => Ok(()),
                        false => Err(format!(
                            "its clone's size ({} bytes) is not the disk's ({} bytes)",
                            h.virtual_size, d.qemu.size
                        )),
                    }),
                _ => match std::fs::symlink_metadata(view.path()) {
                    Ok(m) if m.len() == d.qemu.size => Ok(()),
                    Ok(m) => Err(format!(
                        "the raw image's file has {} bytes, the disk {} (an offset or size \
                         option?)",
                        m.len(),
                        d.qemu.size
                    )),
                    Err(e) => Err(e.to_string()),
                },
            };
            if let Err(why) = fits {
                bad = Some(format!("disk {}'s clone was removed: {why}", d.spec.name));
                break;
            }
        }
        if let Some(why) = bad {
            self.no_clones(why);
        }
    }

    fn switch_paused(&mut self, actions: Vec<Value>) -> Result<(), Error> {
        let transaction = self.qmp.execute("transaction", json!({ "actions": actions }));
        if let Err(e) = transaction {
            for d in &mut self.disks {
                d.froze_previous = false;
            }
            return Err(e);
        }
        self.bitmaps_started = true;
        for (i, d) in self.disks.iter().enumerate() {
            self.qmp.execute(
                "qom-set",
                json!({"path": d.qemu.drive_owner(), "property": "drive", "value": format!("cairn-cbw-{i}")}),
            )?;
        }
        Ok(())
    }

    fn export(&mut self) -> Result<(), Error> {
        for (i, d) in self.disks.iter().enumerate() {
            let snap = format!("cairn-snap-{i}");
            self.state.nodes.insert(0, snap.clone());
            save(&self.state_file, &self.state)?;
            self.qmp.execute(
                "blockdev-add",
                json!({"driver": "snapshot-access", "node-name": snap, "file": format!("cairn-cbw-{i}")}),
            )?;
            if let Previous::Bitmap { name, granularity, .. } = &d.previous {
                // QEMU 7.2 exports only bitmaps of the exported node: a frozen copy goes there.
                self.qmp.execute(
                    "block-dirty-bitmap-add",
                    json!({"node": snap, "name": name, "persistent": false,
                           "granularity": granularity, "disabled": true}),
                )?;
                self.qmp.execute(
                    "block-dirty-bitmap-merge",
                    json!({"node": snap, "target": name,
                           "bitmaps": [{"node": d.qemu.node, "name": name}]}),
                )?;
            }
        }
        // Recorded before it is started, as every change is (a run killed in between would
        // otherwise leave a server that blocks every later run); taken back if QEMU refuses,
        // since a server that was running already is another tool's.
        self.state.server = true;
        save(&self.state_file, &self.state)?;
        if let Err(e) = start_server(&mut self.qmp, &self.socket) {
            // Only a server that was running already is not ours (a timeout may have started
            // ours: it stays recorded, to be stopped).
            if matches!(e, Error::Vm(_)) {
                self.state.server = false;
                if let Err(saved) = save(&self.state_file, &self.state) {
                    tracing::warn!("{saved}");
                }
            }
            return Err(e);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let id = format!("cairn-exp-{i}");
            self.state.exports.push(id.clone());
            save(&self.state_file, &self.state)?;
            let mut export = json!({"type": "nbd", "id": id, "node-name": format!("cairn-snap-{i}"),
                                    "name": LiveVm::export_name(&d.spec.name), "writable": false});
            if let Previous::Bitmap { name, .. } = &d.previous {
                export["bitmaps"] = json!([name]);
            }
            self.qmp.execute("block-export-add", export)?;
        }
        Ok(())
    }

    /// After the point committed (or failed): removes the views and fleecing images, puts
    /// every device back on its own node, and rotates the bitmaps (a commit removes the
    /// older ones; a failure merges the next one back into the previous, which records
    /// again). Returns the first failure; every step is tried.
    pub fn finish(mut self, committed: bool) -> Result<(), Error> {
        let mut first = self.undo();
        let mut note = |r: Result<(), Error>| {
            if let (Ok(()), Err(e)) = (&first, r) {
                first = Err(e);
            }
        };
        for d in std::mem::take(&mut self.disks) {
            note(rotate(&mut self.qmp, &d, committed));
        }
        self.bitmaps_started = false;
        first
    }

    /// [`LiveVm::undo`] on an error path: a failure to undo is logged (the state file stays
    /// for the next run), the first error is the one reported.
    fn undo_logged(&mut self) {
        if let Err(e) = self.undo() {
            tracing::warn!(vm = %self.vm, "undoing the live view after a failure: {e}");
        }
        self.abandon_bitmaps();
    }

    /// Undoes every change to QEMU but the bitmaps', and removes the state file once done.
    fn undo(&mut self) -> Result<(), Error> {
        let state = std::mem::take(&mut self.state);
        if state.changes_nothing() {
            // Undone already (or nothing done): a second call must not overwrite the state
            // file an earlier failed undo kept for the next run.
            return Ok(());
        }
        let result = undo_state(&mut self.qmp, &state);
        if result.is_ok() {
            let _ = std::fs::remove_file(&self.state_file);
        } else {
            // Kept, for the next run to finish the job.
            let _ = save(&self.state_file, &state);
        }
        result
    }

    /// After a failure past the instant's transaction: each disk's next bitmap goes back into
    /// its previous one, which records again (or is removed, when there was none to trust).
    fn abandon_bitmaps(&mut self) {
        if !self.bitmaps_started {
            return;
        }
        for d in &self.disks {
            if let Err(e) = rotate(&mut self.qmp, d, false) {
                tracing::warn!(vm = %self.vm, disk = %d.spec.name, "restoring dirty bitmaps: {e}");
            }
        }
        self.bitmaps_started = false;
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        if !self.state.nodes.is_empty() || !self.state.exports.is_empty() || self.bitmaps_started {
            self.undo_logged();
        }
    }
}

/// Bitmaps after the run: see [`LiveVm::finish`].
fn rotate(qmp: &mut Qmp, d: &LiveDisk, committed: bool) -> Result<(), Error> {
    let node = &d.qemu.node;
    let actions: Vec<Value> = if committed {
        d.older
            .iter()
            .map(
                |n| json!({"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": n}}),
            )
            .collect()
    } else {
        let mut actions = Vec::new();
        if let (Previous::Bitmap { name, .. }, true) = (&d.previous, d.froze_previous) {
            actions.push(json!({"type": "block-dirty-bitmap-merge",
                                "data": {"node": node, "target": name, "bitmaps": [d.started]}}));
            actions.push(json!({"type": "block-dirty-bitmap-enable",
                                "data": {"node": node, "name": name}}));
        }
        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": node, "name": d.started}}));
        actions
    };
    if actions.is_empty() {
        return Ok(());
    }
    match qmp.execute("transaction", json!({ "actions": actions })) {
        // Never started (the capture failed before the instant): nothing to rotate.
        Err(Error::Command { desc, .. }) if !committed && desc.contains("not found") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// A killed run froze the previous bitmap and started its own: the two together record every
/// write since the previous point, so they are merged back before the bitmaps are judged.
/// Returns whether anything changed.
fn repair_rotation(
    qmp: &mut Qmp,
    disk: &QemuDisk,
    prefix: &str,
    previous: Option<&PointId>,
) -> Result<bool, Error> {
    let Some(previous) = previous else { return Ok(false) };
    let expected = format!("{prefix}{previous}");
    let Some(frozen) = disk.bitmaps.iter().find(|b| b.name == expected) else { return Ok(false) };
    let later: Vec<_> = disk
        .bitmaps
        .iter()
        .filter(|b| b.name.starts_with(prefix) && b.name != expected && b.enabled() && !b.in_use())
        .collect();
    if frozen.enabled() || frozen.in_use() || later.len() != 1 {
        return Ok(false);
    }
    let node = &disk.node;
    qmp.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": node, "target": expected, "bitmaps": [later[0].name]}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": expected}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": later[0].name}},
        ]}),
    )?;
    tracing::info!(node = %node, "merged bitmap {} of an interrupted backup back into {expected}", later[0].name);
    Ok(true)
}

/// Starts QEMU's NBD server on `socket`. One that is already running belongs to another tool
/// (a server a killed run of Cairn started was stopped by the undo of its leftovers): it is
/// left alone, and the backup fails saying so.
fn start_server(qmp: &mut Qmp, socket: &Path) -> Result<(), Error> {
    match qmp
        .execute("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": socket}}}))
    {
        Ok(_) => Ok(()),
        Err(Error::Command { desc, .. }) if desc.contains("already running") => Err(Error::Vm(
            "QEMU's NBD server is already running for another tool (a pull backup, a \
                 migration): Cairn needs to start its own; back up when that tool is done"
                .into(),
        )),
        Err(e) => Err(e),
    }
}

/// Undoes a run's changes in order: exports, the NBD server, views, devices, filters and
/// fleecing images, files. Only what QEMU still has is touched (a run may have stopped before
/// making something, and a restarted QEMU has none of it), so a killed run at any step can be
/// undone.
fn undo_state(qmp: &mut Qmp, state: &State) -> Result<(), Error> {
    let mut first = Ok(());
    let mut note = |r: Result<Value, Error>| {
        if let (Ok(()), Err(e)) = (&first, r) {
            first = Err(e);
        }
    };
    if state.paused {
        // The run paused the VM and did not live to let it run on: the guest comes first.
        note(qmp.execute("cont", json!({})));
    }
    let exports: Vec<String> = qmp
        .execute("query-block-exports", json!({}))?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("id").and_then(Value::as_str).map(str::to_owned))
        .collect();
    for id in state.exports.iter().filter(|id| exports.contains(id)) {
        note(qmp.execute("block-export-del", json!({"id": id, "mode": "hard"})));
    }
    if state.server {
        match qmp.execute("nbd-server-stop", json!({})) {
            Err(Error::Command { desc, .. }) if desc.contains("not running") => {}
            other => note(other),
        }
    }
    let existing = node_names(qmp)?;
    // Views first (a snapshot-access node keeps its filter from sharing the disk's writes,
    // so the device could not go back while it exists), then the devices, then the filters
    // and fleecing images. A deleted export lets go of its node a moment later.
    let (views, others): (Vec<&String>, Vec<&String>) = state
        .nodes
        .iter()
        .filter(|n| existing.contains(*n))
        .partition(|n| n.starts_with("cairn-snap-"));
    for node in views {
        note(delete_node(qmp, node));
    }
    let current = vm::disks(qmp)?;
    for (qdev, node) in &state.devices {
        let on_filter =
            current.iter().any(|d| d.drive_owner() == qdev && d.node.starts_with("cairn-cbw-"));
        if on_filter {
            note(qmp.execute("qom-set", json!({"path": qdev, "property": "drive", "value": node})));
        }
    }
    for node in others {
        note(delete_node(qmp, node));
    }
    // A fleecing image is unlinked only once no node of QEMU's has it open.
    let still_open = node_names(qmp)?;
    if first.is_ok() && !state.nodes.iter().any(|n| still_open.contains(n)) {
        first = remove_files(state);
    }
    first
}

/// Removes a run's fleecing images and NBD socket folder.
fn remove_files(state: &State) -> Result<(), Error> {
    for file in &state.files {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::Fleece { path: file.clone(), detail: e.to_string() });
            }
            _ => {}
        }
    }
    if let Some(dir) = &state.socket_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// The names of QEMU's named block nodes.
fn node_names(qmp: &mut Qmp) -> Result<Vec<String>, Error> {
    Ok(qmp
        .execute("query-named-block-nodes", json!({"flat": true}))?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.get("node-name").and_then(Value::as_str).map(str::to_owned))
        .collect())
}

/// Deletes a block node, waiting a little for a parent that is going away (an export).
fn delete_node(qmp: &mut Qmp, node: &str) -> Result<Value, Error> {
    let mut tries = 0;
    loop {
        match qmp.execute("blockdev-del", json!({"node-name": node})) {
            Err(Error::Command { desc, .. }) if desc.contains("in use") && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Undoes what a killed run recorded in `state_file`, then removes the file. `qemu` is the
/// process `qmp` reaches: changes recorded in another QEMU process are undone only by its
/// end (it took its nodes, exports and pause with it), and refused while it runs (two
/// configurations naming one VM).
fn undo_leftovers(
    qmp: &mut Qmp,
    state_file: &Path,
    vm: &Name,
    qemu: Option<&QemuId>,
) -> Result<(), Error> {
    let bytes = match std::fs::read(state_file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Fleece { path: state_file.into(), detail: e.to_string() }),
    };
    let state: State = serde_json::from_slice(&bytes).map_err(|e| Error::Fleece {
        path: state_file.into(),
        detail: format!(
            "unreadable state of an earlier run ({e}); remove it once QEMU's \
                         cairn-* nodes and exports are gone"
        ),
    })?;
    if let (Some(then), Some(now)) = (&state.qemu, qemu)
        && then != now
    {
        if then.runs() {
            return Err(Error::Vm(format!(
                "{} records an interrupted backup of VM {vm} in another QEMU (QMP socket {}), \
                 which still runs: do two VM configurations on this host name VM {vm}? Give \
                 each VM its own name (its leftovers are undone by its own next backup)",
                state_file.display(),
                then.socket.display()
            )));
        }
        tracing::warn!(
            "an interrupted backup's QEMU ({}) is gone, and what it held with it: removing its files ({})",
            then.socket.display(),
            state_file.display()
        );
        remove_files(&state)?;
        return std::fs::remove_file(state_file)
            .map_err(|e| Error::Fleece { path: state_file.into(), detail: e.to_string() });
    }
    tracing::warn!("undoing what an interrupted backup left in QEMU ({})", state_file.display());
    undo_state(qmp, &state).map_err(|e| {
        Error::Vm(format!(
            "cannot undo what an interrupted backup left in QEMU ({e}); it is listed in {}: \
             remove those cairn-* exports and nodes by hand (or restart the VM), then delete \
             that file",
            state_file.display()
        ))
    })?;
    std::fs::remove_file(state_file)
        .map_err(|e| Error::Fleece { path: state_file.into(), detail: e.to_string() })
}

fn save(path: &Path, state: &State) -> Result<(), Error> {
    let fail = |e: std::io::Error| Error::Fleece { path: path.into(), detail: e.to_string() };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(fail)?;
    let bytes = serde_json::to_vec(state).map_err(|e| fail(std::io::Error::other(e)))?;
    file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// The fleecing folder, made 0700 if missing; refused if others may write to it.
fn private_dir(dir: &Path) -> Result<PathBuf, Error> {
    use std::os::unix::fs::MetadataExt;
    let fail = |detail: String| Error::Fleece { path: dir.to_path_buf(), detail };
    if !dir.is_absolute() {
        return Err(fail("is not an absolute path".into()));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(format!("cannot make the folder: {e}")))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("is not a folder (a link is refused)".into()));
    }
    // QEMU and qemu-img open what is in it by name, as root: no link on the way, and no
    // folder above it that someone else could rename or replace.
    let real = dir.canonicalize().map_err(|e| fail(e.to_string()))?;
    if real != dir {
        return Err(fail(format!("goes through a link: give its real path, {}", real.display())));
    }
    cairn_snapshot::trusted::check_folders(&dir.join("image")).map_err(|e| fail(e.to_string()))?;
    if meta.mode() & 0o022 != 0 || meta.uid() != rustix::process::getuid().as_raw() {
        return Err(fail(format!(
            "must belong to the agent's user and be writable by it alone (mode {:o}): \
             `chmod 700` it",
            meta.mode() & 0o777
        )));
    }
    Ok(dir.to_path_buf())
}

/// The per-VM lock: held for the whole run, released by the kernel if the process dies.
fn lock(dir: &Path, vm: &Name) -> Result<File, Error> {
    let path = dir.join(format!("cairn-{vm}.lock"));
    let fail = |detail: String| Error::Fleece { path: path.clone(), detail };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| fail(e.to_string()))?;
    // A lock just released can look held for a moment: a process forked by another thread
    // holds a copy of the descriptor until it runs its program. A second is long enough for
    // that and far too short to hide a real run.
    for _ in 0..LOCK_TRIES {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(fail(e.to_string())),
        }
    }
    Err(fail(format!("another backup of VM {vm} is running on this host; wait for it")))
}

/// Attempts at the per-VM lock, 50 ms apart.
const LOCK_TRIES: u32 = 20;

/// A qcow2 image of `size` virtual bytes whose file may grow to `quota` bytes.
fn make_fleecing_image(path: &Path, size: u64, quota: u64) -> Result<(), Error> {
    let fail = |detail: String| Error::Fleece { path: path.to_path_buf(), detail };
    // Made by us, exclusively, then formatted in place: nothing planted there is followed.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| fail(format!("cannot create it: {e}")))?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| fail(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // The quota is the file's length: QEMU opens it through a raw node of that size, so the
    // fleecing image cannot grow past it (a copy that would gets ENOSPC: the view breaks).
    file.set_len(quota).map_err(|e| fail(format!("cannot size it to its quota: {e}")))?;
    Ok(())
}

/// A disk's image, opened to be cloned at the instant.
#[derive(Debug)]
struct PlannedClone {
    /// The image file as QEMU names it.
    image: PathBuf,
    /// The image, opened without following links and checked to be the very file QEMU
    /// holds open: the clone is made from this descriptor, never from the name again.
    source: File,
    /// Where the clone goes (beside the image, under this agent's process id).
    clone_path: PathBuf,
}

/// Whether `disk`'s image file may be cloned as a view of it, quickly and safely, while the
/// VM is paused: a plain file QEMU opened by an absolute path (not a `json:` description, a
/// device or a protocol) through the raw or qcow2 driver; the very file QEMU (process `pid`)
/// holds open, so a name QEMU reports can never make root clone another file; in folders no
/// one else may change, on XFS or btrfs, with at least 10 % of that file system free, and
/// at most [`MAX_CLONE_EXTENTS`] extents.
fn plan_clone(disk: &QemuDisk, pid: Option<u32>) -> Result<PlannedClone, String> {
    use std::os::unix::fs::MetadataExt;
    clonable_file(disk)?;
    let image = PathBuf::from(&disk.file);
    let dir = image.parent().unwrap_or(Path::new("/"));
    cairn_snapshot::trusted::check_folders(&image).map_err(|e| e.to_string())?;
    if !cairn_snapshot::views::shares_blocks(dir) {
        return Err(format!("{} is not on XFS or btrfs, which share blocks", dir.display()));
    }
    let source = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&image)
        .map_err(|e| format!("opening {}: {e}", image.display()))?;
    let meta = source.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", image.display()));
    }
    let pid = pid.ok_or("QEMU's process is not known from its QMP socket")?;
    if !holds_open(pid, meta.dev(), meta.ino()) {
        return Err(format!(
            "{} is not the file QEMU (process {pid}) has open: was it renamed or replaced?",
            image.display()
        ));
    }
    let space = rustix::fs::statvfs(dir).map_err(|e| e.to_string())?;
    if (space.f_bavail as f64) < MIN_FREE_TO_CLONE * space.f_blocks as f64 {
        return Err(format!(
            "{} has less than 10 % of its space free: a clone would make the guest's \
             overwrites need space it may not have",
            dir.display()
        ));
    }
    match cairn_snapshot::views::extent_count(&source) {
        Ok(n) if n > MAX_CLONE_EXTENTS => Err(format!(
            "{} has {n} extents, more than {MAX_CLONE_EXTENTS}: cloning it would hold the VM \
             paused too long (defragment it, with `xfs_fsr` on XFS)",
            image.display()
        )),
        Ok(_) => {
            let clone_path = cairn_snapshot::views::clone_name(&image);
            Ok(PlannedClone { image, source, clone_path })
        }
        Err(e) => Err(format!("cannot count {}'s extents: {e}", image.display())),
    }
}

/// Below this fraction of free space on the image's file system, no clone is made (the
/// agent releases kept views early below it, too).
const MIN_FREE_TO_CLONE: f64 = 0.10;

/// Whether process `pid` has a descriptor open on the file `(dev, ino)`.
fn holds_open(pid: u32, dev: u64, ino: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        std::fs::metadata(fd.path()).is_ok_and(|m| m.is_file() && m.dev() == dev && m.ino() == ino)
    })
}

/// The part of [`plan_clone`] that reads only QEMU's answer and the file's type.
fn clonable_file(disk: &QemuDisk) -> Result<(), String> {
    if !matches!(disk.format.as_str(), "raw" | "qcow2") {
        return Err(format!("its {} node is neither a raw nor a qcow2 image", disk.format));
    }
    let image = Path::new(&disk.file);
    if !image.is_absolute() || disk.file.contains(':') {
        return Err(format!("QEMU opened it as {:?}, not an image file's path", disk.file));
    }
    match std::fs::symlink_metadata(image) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{} is not a regular file", image.display())),
        Err(e) => Err(format!("{}: {e}", image.display())),
    }
}

/// The capture's one step for a running VM: every disk's view at one instant.
impl cairn_snapshot::DiskViews for LiveVm {
    fn disks(&self) -> Vec<cairn_snapshot::DiskSpec> {
        self.disks
            .iter()
            .map(|d| cairn_snapshot::DiskSpec {
                name: d.spec.name.clone(),
                path: PathBuf::from(&d.qemu.file),
            })
            .collect()
    }

    fn take(
        &mut self,
        record: &mut cairn_snapshot::Record,
    ) -> Result<Vec<cairn_snapshot::View>, cairn_snapshot::Error> {
        let paused = LiveVm::take(self).map_err(|e| cairn_snapshot::Error::LiveView {
            vm: self.vm.to_string(),
            detail: e.to_string(),
        })?;
        let (major, minor, micro) = self.qmp.version();
        record.note(cairn_format::Evidence::new(
            "view",
            None,
            format!(
                "QEMU {major}.{minor}.{micro}: copy-before-write views of {} disk(s) at one instant (vCPUs paused {:.1} ms), read over QEMU's NBD export",
                self.disks.len(),
                paused.as_secs_f64() * 1000.0
            ),
        ));
        for (disk, note) in std::mem::take(&mut self.clone_notes) {
            record.note_disk("view", &disk, note);
        }
        let mut clones = std::mem::take(&mut self.clones).into_iter();
        let mut views = Vec::new();
        for spec in cairn_snapshot::DiskViews::disks(self) {
            let d = self.disks.iter().find(|d| d.spec.name == spec.name);
            if let Some(d) = d.filter(|d| !d.qemu.persistent_bitmaps()) {
                record.note_disk(
                    "cbt",
                    &spec.name,
                    format!(
                        "the {} image's dirty bitmap lives in QEMU's memory: a restart of QEMU loses it, and the next backup of this disk scans it whole",
                        d.qemu.format
                    ),
                );
            }
            if let Some(clone) = clones.next().flatten() {
                // The clone can be kept; the backup reads the export all the same.
                views.push(clone);
                continue;
            }
            // Removed with the whole VM's view in `finish`, not disk by disk.
            views.push(cairn_snapshot::View::snapshot(
                &spec,
                "qemu-fleece",
                self.socket.clone(),
                Box::new(|_| Ok(())),
            ));
        }
        Ok(views)
    }

    fn one_instant(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_image_files_are_cloned() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("os.qcow2");
        std::fs::write(&image, b"image").unwrap();
        let disk = |format: &str, file: String| QemuDisk {
            qdev: "/machine/peripheral/disk-os".into(),
            drive: String::new(),
            node: "disk0".into(),
            format: format.into(),
            file,
            size: 5,
            compat: String::new(),
            bitmaps: vec![],
        };
        let path = image.to_str().unwrap().to_owned();
        assert!(clonable_file(&disk("qcow2", path.clone())).is_ok());
        assert!(clonable_file(&disk("raw", path.clone())).is_ok());
        for (format, file, why) in [
            ("luks", path.clone(), "neither a raw nor a qcow2"),
            ("host_device", "/dev/sda".into(), "neither a raw nor a qcow2"),
            ("raw", format!("json:{{\"file.filename\": {path:?}}}"), "not an image file's path"),
            ("qcow2", "os.qcow2".into(), "not an image file's path"),
            ("raw", "nbd://127.0.0.1/x".into(), "not an image file's path"),
            ("raw", dir.path().to_str().unwrap().into(), "not a regular file"),
            ("raw", format!("{path}.gone"), "No such file"),
        ] {
            let e = clonable_file(&disk(format, file.clone())).unwrap_err();
            assert!(e.contains(why), "{format} {file}: {e}");
        }
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&image, &link).unwrap();
        let e = clonable_file(&disk("qcow2", link.to_str().unwrap().into())).unwrap_err();
        assert!(e.contains("not a regular file"), "a link is not followed: {e}");
    }
}
