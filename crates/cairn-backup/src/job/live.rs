//! A VM that a running QEMU holds: every disk viewed by QEMU at one instant (copy-before-write
//! fleecing, see `cairn_qemu::LiveVm`), the guest frozen through its agent around that
//! instant, the views read over QEMU's NBD export with the previous dirty bitmap, and
//! everything removed again after the commit or the failure.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_format::{Consistency, Name, PointId, PointManifest};
use cairn_nbd::NbdSource;
use cairn_qemu::{AgentQuiescer, FleeceOptions, LiveDiskSpec, LiveVm};
use cairn_snapshot::{Capture, Hold, QemuConfig, Quiescer, Record, VmState};
use cairn_vault::Vault;

use super::{Captured, VmJob};
use crate::{BackupRequest, Cancel, DiskInput, Error, Progress};

/// Runs `job`, whose VM is in QEMU as `qemu` says; with `keep`, each image is also cloned at
/// the instant and the clones kept past the commit (see [`VmJob::run_keeping`]).
pub(super) async fn run(
    job: &VmJob,
    qemu: &QemuConfig,
    vault: &Vault,
    progress: Arc<dyn Progress>,
    cancel: &Cancel,
    keep: Option<cairn_format::SnapshotTier>,
    on_captured: Box<dyn FnOnce(Captured) + Send>,
) -> Result<(PointManifest, Vec<cairn_snapshot::KeptView>), Error> {
    let config = &job.config;
    super::check::names(config)?;
    let vm = config.vm.clone();
    let point = vault.reserve_point_id(&vm, job.options.shifted(jiff::Timestamp::now())).await?;
    let since: BTreeMap<Name, PointId> = match vault.previous_point(&vm).await?.0 {
        Some(m) => m.disks.keys().map(|d| (d.clone(), m.point.clone())).collect(),
        None => BTreeMap::new(),
    };
    let specs: Vec<LiveDiskSpec> = config
        .disks
        .iter()
        .map(|d| LiveDiskSpec {
            name: d.spec.name.clone(),
            device: d.qemu_device.clone().unwrap_or_default(),
        })
        .collect();
    let fleece = FleeceOptions {
        dir: qemu.fleece_dir.clone(),
        quota: qemu.fleece_quota,
        cbw_timeout: qemu.cbw_timeout,
        clone_images: keep.is_some(),
    };
    let granularity = u64::from(vault.config().block_size);
    let (socket, for_vm, for_point) = (qemu.qmp.clone(), vm.clone(), point.clone());
    let (live, machine) = tokio::task::spawn_blocking(move || {
        let mut live =
            LiveVm::prepare(&socket, &for_vm, &for_point, &specs, &since, granularity, &fleece)?;
        let machine = live.machine();
        Ok::<_, cairn_qemu::Error>((live, machine))
    })
    .await?
    .map_err(|source| Error::Live { vm: vm.clone(), source })?;
    let mut quiescer: Box<dyn Quiescer> = match &qemu.guest_agent {
        Some(socket) => Box::new(AgentQuiescer::new(
            socket,
            qemu.guest_freeze,
            qemu.guest_agent_required,
            // The watchdog's deadline covers the freeze call (the guest's hook and its
            // pre-scripts), the hold, and the thaw call (the post-scripts).
            job.options
                .watchdog
                .clone()
                .map(|w| (w, config.watchdog_deadline + 2 * qemu.guest_freeze)),
        )),
        None => Box::new(NoAgent),
    };
    let (captured, live) = tokio::task::spawn_blocking(move || {
        let mut live = live;
        let captured = cairn_snapshot::capture_with(quiescer.as_mut(), &mut live, VmState::Running);
        (captured, live)
    })
    .await?;
    let capture = match captured {
        Ok(capture) => capture,
        Err(source) => {
            finish(None, live, false).await;
            return Err(Error::Capture { vm, source });
        }
    };
    if cancel.is_cancelled() {
        finish(Some(capture), live, false).await;
        return Err(Error::Cancelled);
    }
    let keep = keep.filter(|_| capture.can_keep());
    on_captured(Captured {
        point: point.clone(),
        captured_at: job.options.shifted(capture.captured_at()),
        level: capture.level(),
        keeps_views: keep.is_some(),
    });
    let formats: BTreeMap<Name, String> =
        live.disks().map(|(name, q)| (name.clone(), q.format.clone())).collect();
    let result =
        back_up(job, vault, &capture, &live, point, machine, keep.clone(), progress, cancel).await;
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            finish(Some(capture), live, false).await;
            return Err(e);
        }
    };
    let mut kept = vec![];
    match keep {
        Some(_) => {
            kept = super::keep_views(capture, vault, &manifest).await;
            for view in &mut kept {
                view.format = formats.get(&view.disk).cloned();
            }
            finish(None, live, true).await;
        }
        None => finish(Some(capture), live, true).await,
    }
    Ok((manifest, kept))
}

/// Reads every disk's export into the vault and commits the point.
#[allow(clippy::too_many_arguments)]
async fn back_up(
    job: &VmJob,
    vault: &Vault,
    capture: &Capture,
    live: &LiveVm,
    point: PointId,
    machine: cairn_format::MachineRecord,
    snapshot: Option<cairn_format::SnapshotTier>,
    progress: Arc<dyn Progress>,
    cancel: &Cancel,
) -> Result<PointManifest, Error> {
    let mut disks = Vec::new();
    for view in capture.views() {
        let name = view.disk().clone();
        let previous = live.previous(&name).cloned();
        let (socket, export) = (live.socket().to_path_buf(), LiveVm::export_name(&name));
        let describe = format!("disk {name} (QEMU export {export})");
        let for_disk = name.clone();
        let source = tokio::task::spawn_blocking(move || {
            NbdSource::connect(&socket, &export, describe, previous.as_ref())
        })
        .await?
        .map_err(|source| Error::Image { disk: for_disk, source })?;
        disks.push(DiskInput { name, source: Arc::new(source) });
    }
    let request = BackupRequest {
        vm: job.config.vm.clone(),
        disks,
        consistency: capture.level(),
        captured_at: Some(job.options.shifted(capture.captured_at())),
        evidence: capture.record().evidence().to_vec(),
        threads: job.options.threads,
        point: Some(point),
        parallel_disks: job.options.parallel_disks,
        retain_until: job.options.retain_until,
        machine: Some(machine),
        origin: job.options.origin.clone(),
        snapshot,
    };
    crate::backup(vault, request, progress, cancel).await
}

/// Releases the capture, then removes the views from QEMU and rotates the bitmaps. Nothing
/// here can lose data any more, so failures are warnings (a later run undoes what is left).
async fn finish(capture: Option<Capture>, live: LiveVm, committed: bool) {
    let done = tokio::task::spawn_blocking(move || {
        if let Some(capture) = capture
            && let Err(e) = capture.release(committed)
        {
            tracing::warn!("releasing the views: {e}");
        }
        live.finish(committed)
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("removing QEMU's views of the disks: {e}"),
        Err(e) => tracing::warn!("removing QEMU's views of the disks: {e}"),
    }
}

/// No guest agent configured: the disks are viewed at one instant with nothing quiesced.
struct NoAgent;

impl Quiescer for NoAgent {
    fn quiesce(&mut self, record: &mut Record) -> Result<Box<dyn Hold>, cairn_snapshot::Error> {
        record.settle(
            Consistency::Crash,
            "no guest agent is configured (guest_agent): the disks were viewed at one instant without quiescing the guest",
        );
        Ok(Box::new(Resumed))
    }
}

struct Resumed;

impl Hold for Resumed {
    fn resume(self: Box<Self>, _: &mut Record) -> Result<(), cairn_snapshot::Error> {
        Ok(())
    }
}

/// `config check` for a VM in QEMU: QEMU's version, each configured disk as QEMU has it
/// (node, format, size, Cairn's bitmaps), the fleecing folder, and whether the guest agent
/// answers. Nothing is changed.
pub(super) fn check(
    config: &cairn_snapshot::VmConfig,
    qemu: &QemuConfig,
    options: &super::JobOptions,
    add: &mut dyn FnMut(String, Result<String, String>),
) {
    let qmp_what = format!("qmp {}", qemu.qmp.display());
    match cairn_qemu::Qmp::connect(&qemu.qmp) {
        Err(e) => {
            add(qmp_what, Err(e.to_string()));
            for d in &config.disks {
                add(format!("disk {}", d.spec.name), Err("QEMU did not answer".into()));
            }
        }
        Ok(mut qmp) => {
            let (major, minor, micro) = qmp.version();
            let supported = (major, minor) >= cairn_qemu::MIN_QEMU;
            add(
                qmp_what,
                match supported {
                    true => Ok(format!("QEMU {major}.{minor}.{micro}")),
                    false => Err(format!(
                        "QEMU {major}.{minor}.{micro}: live views need {}.{} or later",
                        cairn_qemu::MIN_QEMU.0,
                        cairn_qemu::MIN_QEMU.1
                    )),
                },
            );
            match cairn_qemu::vm::disks(&mut qmp) {
                Err(e) => add("disks".into(), Err(e.to_string())),
                Ok(found) => {
                    for d in &config.disks {
                        let device = d.qemu_device.as_deref().unwrap_or("");
                        let prefix = format!("cairn:{}:{}:", config.vm, d.spec.name);
                        let result = cairn_qemu::vm::find(&found, device)
                            .map(|q| {
                                let ours: Vec<String> = q
                                    .bitmaps
                                    .iter()
                                    .filter(|b| b.name.starts_with(&prefix))
                                    .map(|b| {
                                        let state =
                                            if b.enabled() { "recording" } else { "disabled" };
                                        format!("{} ({state})", b.name)
                                    })
                                    .collect();
                                let tracking = match (ours.is_empty(), q.persistent_bitmaps()) {
                                    (true, _) => {
                                        "no Cairn bitmap yet: the next backup scans it whole"
                                            .to_string()
                                    }
                                    (false, true) => format!("bitmaps {}", ours.join(", ")),
                                    (false, false) => format!(
                                        "bitmaps {} (in QEMU's memory: lost if QEMU restarts)",
                                        ours.join(", ")
                                    ),
                                };
                                format!(
                                    "node {}, {} {}, {} bytes; {tracking}",
                                    q.node, q.format, q.file, q.size
                                )
                            })
                            .map_err(|e| e.to_string());
                        add(format!("disk {} (qemu_device {device})", d.spec.name), result);
                    }
                }
            }
        }
    }
    add(
        format!("fleece {}", qemu.fleece_dir.display()),
        Ok(format!(
            "copy-before-write waits at most {} s; quota {} per disk",
            qemu.cbw_timeout.as_secs(),
            qemu.fleece_quota
                .map(|q| format!("{} MiB", q >> 20))
                .unwrap_or_else(|| "a quarter of the disk (at least 256 MiB)".into())
        )),
    );
    match &qemu.guest_agent {
        None => add(
            "guest agent".into(),
            Ok("none configured: points are crash-consistent (all disks at one instant)".into()),
        ),
        Some(socket) => {
            let answered =
                cairn_qemu::GuestAgent::connect(socket, std::time::Duration::from_secs(5))
                    .and_then(|mut a| {
                        let version = a.version()?;
                        let frozen = a.frozen()?;
                        Ok((version, frozen))
                    });
            let result = match answered {
                Ok((version, false)) => {
                    Ok(format!("qemu-ga {version} answers; the guest is thawed"))
                }
                Ok((version, true)) => {
                    Err(format!("qemu-ga {version} answers, but the guest is frozen now"))
                }
                Err(e) if qemu.guest_agent_required => {
                    Err(format!("{e}; guest_agent_required is set, so backups would fail"))
                }
                Err(e) => Err(format!("{e}; backups would be crash-consistent")),
            };
            add(format!("guest agent {}", socket.display()), result);
            if options.watchdog.is_none() {
                add(
                    "thaw watchdog".into(),
                    Err("no watchdog program: the guest would not be frozen".into()),
                );
            }
        }
    }
}
