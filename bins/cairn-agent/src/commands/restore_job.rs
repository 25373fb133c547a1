//! A restore job from the coordinator: a point's disks, read from the job's vault, written
//! into a new folder of the host's restore folder (`restore-dir`).
//!
//! The coordinator names the folder, never a path, and the folder must be new: a restore job
//! cannot overwrite anything on the host. The folder holds a marker naming the job; a job
//! handed out again (the agent restarted) finds its own unfinished folder by it and writes
//! the disks again, and a finished one (marked done) is reported again, never rewritten. A
//! restore that fails or is stopped removes its folder.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cairn_backup::RestoreOptions;
use cairn_protocol::{RestoreOrder, RestoreReport, RestoredDisk};
use cairn_worker::{JobProgress, Stop, Task};

use super::service::{BackupRunner, Reporter};

/// The file in a restore's folder that says which job made it.
const MARKER: &str = ".cairn-restore-job";
/// The file a finished restore adds: its report, and a sign never to write there again.
const DONE: &str = ".cairn-restore-done";

pub(crate) async fn run(
    runner: &BackupRunner,
    task: &Task,
    order: &RestoreOrder,
    progress: &JobProgress,
    mut stop: Stop,
) -> Result<RestoreReport, String> {
    if let Some(problem) = order.problem() {
        return Err(format!("the coordinator's restore order is not valid: {problem}"));
    }
    let file = runner.file.display();
    // Only the VMs this host backs up, from the vaults it names.
    if !runner.config.vms.contains_key(&task.vm) {
        return Err(format!(
            "VM {} is not in this agent's configuration: add [vms.{}] to {file}",
            task.vm, task.vm
        ));
    }
    let vault_entry = runner.config.vaults.get(&task.vault).ok_or_else(|| {
        format!(
            "vault {} is not in this agent's configuration: add [vaults.{}] to {file}",
            task.vault, task.vault
        )
    })?;
    let job = format!("{}/{}", task.catalogue.as_deref().unwrap_or("-"), task.job.unwrap_or(0));
    let folder = {
        let root = runner.config.restore_dir();
        let (job, to) = (job.clone(), order.to.clone());
        tokio::task::spawn_blocking(move || own_folder(&root, &to, &job))
            .await
            .map_err(|e| e.to_string())??
    };
    let folder = match folder {
        Owned::Done(report) => {
            tracing::info!(job, "the job's restore was finished by an earlier attempt");
            return Ok(report);
        }
        Owned::Writable(folder) => folder,
    };
    let result = tokio::select! {
        r = write_disks(runner, task, order, vault_entry, &folder, progress) => r,
        _ = stop.stopped() => Err("stopped before the restore ended".into()),
    };
    let done = result.and_then(|report| {
        let text = serde_json::to_vec(&report).map_err(|e| e.to_string())?;
        write_new(&folder.join(DONE), &text)
            .map_err(|e| format!("marking {} done: {e}", folder.display()))?;
        Ok(report)
    });
    if let Err(e) = &done {
        // Nothing half-written stays: the folder was this job's alone.
        if let Err(rm) = std::fs::remove_dir_all(&folder) {
            tracing::warn!(folder = %folder.display(), "removing the failed restore's folder: {rm}");
        }
        return Err(format!("{e}; the restore's folder {} was removed", folder.display()));
    }
    tracing::info!(job, folder = %folder.display(), "restored");
    done
}

/// Reads the point from the vault and writes its disks (or the one named) into `folder`.
async fn write_disks(
    runner: &BackupRunner,
    task: &Task,
    order: &RestoreOrder,
    vault_entry: &cairn_worker::VaultEntry,
    folder: &Path,
    progress: &JobProgress,
) -> Result<RestoreReport, String> {
    let vault = runner.open_vault(task, vault_entry).await?;
    let vm: cairn_format::Name = task.vm.parse().map_err(|e| format!("VM {}: {e}", task.vm))?;
    let point: cairn_format::PointId =
        order.point.parse().map_err(|e| format!("point {}: {e}", order.point))?;
    let manifest = vault
        .resolve_point(&vm, Some(&point))
        .await
        .map_err(|e| format!("point {point} of VM {vm} in vault {}: {e}", task.vault))?;
    // The job's own folder: what an earlier attempt left there is overwritten.
    let options = RestoreOptions { force: true, ..Default::default() };
    let reporter = Reporter::new(progress, "restore");
    let failed = |e: cairn_backup::Error| format!("restoring point {point} of VM {vm}: {e}");
    let restored = match &order.disk {
        Some(disk) => {
            let disk: cairn_format::Name = disk.parse().map_err(|e| format!("disk: {e}"))?;
            let target = folder.join(disk.as_str());
            let stats =
                cairn_backup::restore_disk(&vault, &manifest, &disk, &target, &options, reporter)
                    .await
                    .map_err(failed)?;
            vec![(disk, target, stats)]
        }
        None => cairn_backup::restore_point(&vault, &manifest, folder, &options, reporter)
            .await
            .map_err(failed)?,
    };
    Ok(RestoreReport {
        point: manifest.point.to_string(),
        disks: restored
            .into_iter()
            .map(|(disk, path, stats)| RestoredDisk {
                disk: disk.to_string(),
                path: path.display().to_string(),
                size: stats.size,
                bytes_written: stats.bytes_written,
            })
            .collect(),
    })
}

/// What [`own_folder`] found.
#[derive(Debug, PartialEq, Eq)]
enum Owned {
    /// The job's folder, to write the disks into.
    Writable(PathBuf),
    /// The job finished there before: its report.
    Done(RestoreReport),
}

/// The folder `to` inside `root`: made now (0700, with this job's marker), or made earlier by
/// the same job (unfinished: written again; finished: its report). Anything else there is
/// refused: a restore never writes into what it did not make. The restore folder and every
/// folder above it must be changeable by root (or the agent's user) alone.
fn own_folder(root: &Path, to: &str, job: &str) -> Result<Owned, String> {
    let private = || {
        let mut b = std::fs::DirBuilder::new();
        b.mode(0o700);
        b
    };
    match std::fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(format!(
                "the restore folder {} is not a folder (a link or a file): fix restore-dir in \
                 the agent's configuration",
                root.display()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = private();
            b.recursive(true);
            b.create(root)
                .map_err(|e| format!("making the restore folder {}: {e}", root.display()))?;
        }
        Err(e) => return Err(format!("the restore folder {}: {e}", root.display())),
    }
    let folder = root.join(to);
    cairn_snapshot::trusted::check_folders(&folder).map_err(|e| {
        format!("the restore folder {} is not safe to write in: {e}", root.display())
    })?;
    let marker = folder.join(MARKER);
    match private().create(&folder) {
        Ok(()) => match write_new(&marker, job.as_bytes()) {
            Ok(()) => Ok(Owned::Writable(folder)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&folder);
                Err(format!("writing {}: {e}", marker.display()))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let taken = || {
                format!(
                    "{} exists and is not this job's: give the restore another folder name",
                    folder.display()
                )
            };
            // Not followed if a link: only a folder this job made counts.
            if !std::fs::symlink_metadata(&folder).is_ok_and(|m| m.is_dir()) {
                return Err(taken());
            }
            if read_small(&marker).ok().as_deref() != Some(job.as_bytes()) {
                return Err(taken());
            }
            match read_small(&folder.join(DONE)) {
                Ok(bytes) => serde_json::from_slice(&bytes).map(Owned::Done).map_err(|e| {
                    format!(
                        "{} holds a finished restore whose report is damaged ({e})",
                        folder.display()
                    )
                }),
                Err(_) => {
                    tracing::warn!(folder = %folder.display(), "the job's earlier attempt made this folder: restoring again into it");
                    Ok(Owned::Writable(folder))
                }
            }
        }
        Err(e) => Err(format!("making {}: {e}", folder.display())),
    }
}

/// Writes a new file (0600) whole: a temporary name, synced, then linked under its name
/// (refused if the name exists).
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A small file of the job's folder, never through a link or a FIFO.
fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let mut bytes = Vec::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?
        .take(1 << 20)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_made_once_and_found_again_only_by_its_own_job() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("restores");
        let first = root.join("drill-1");
        assert_eq!(own_folder(&root, "drill-1", "cat/7").unwrap(), Owned::Writable(first.clone()));
        // The same job again (a retry): the same folder, to write again.
        assert_eq!(own_folder(&root, "drill-1", "cat/7").unwrap(), Owned::Writable(first.clone()));
        // Once done, a retry gets the report and writes nothing.
        let report = RestoreReport { point: "p".into(), disks: vec![] };
        write_new(&first.join(DONE), &serde_json::to_vec(&report).unwrap()).unwrap();
        assert_eq!(own_folder(&root, "drill-1", "cat/7").unwrap(), Owned::Done(report));
        // Another job naming it: refused.
        let e = own_folder(&root, "drill-1", "cat/8").unwrap_err();
        assert!(e.contains("not this job's"), "{e}");
        // A folder someone else made, or a link, is not taken either.
        std::fs::create_dir(root.join("other")).unwrap();
        assert!(own_folder(&root, "other", "cat/7").is_err());
        std::os::unix::fs::symlink(&first, root.join("link")).unwrap();
        assert!(own_folder(&root, "link", "cat/7").is_err());
        // A restore folder that is a link is refused.
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&root, &linked).unwrap();
        let e = own_folder(&linked, "x", "cat/9").unwrap_err();
        assert!(e.contains("not a folder"), "{e}");
    }

    #[test]
    fn a_restore_folder_others_may_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("restores");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = own_folder(&root, "drill", "cat/1").unwrap_err();
        assert!(e.contains("not safe to write in"), "{e}");
        assert!(!root.join("drill").exists());
    }
}
