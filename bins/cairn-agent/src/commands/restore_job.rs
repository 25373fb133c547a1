//! A restore job from the coordinator: a point's disks, read from the job's vault, written
//! into a new folder of the host's restore folder (`restore-dir`).
//!
//! The coordinator names the folder, never a path, and the folder must be new: a restore job
//! cannot overwrite anything on the host. A job handed out again (the agent restarted) finds
//! its own folder by the marker it left there and writes the disks again.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cairn_backup::RestoreOptions;
use cairn_protocol::{RestoreOrder, RestoreReport, RestoredDisk};
use cairn_worker::{JobProgress, Task};

use super::service::{BackupRunner, Reporter};

/// The file in a restore's folder that says which job made it.
const MARKER: &str = ".cairn-restore-job";

pub(crate) async fn run(
    runner: &BackupRunner,
    task: &Task,
    order: &RestoreOrder,
    progress: &JobProgress,
) -> Result<RestoreReport, String> {
    if let Some(problem) = order.problem() {
        return Err(format!("the coordinator's restore order is not valid: {problem}"));
    }
    let vault_entry = runner.config.vaults.get(&task.vault).ok_or_else(|| {
        format!(
            "vault {} is not in this agent's configuration: add [vaults.{}] to {}",
            task.vault,
            task.vault,
            runner.file.display()
        )
    })?;
    let vault = runner.open_vault(task, vault_entry).await?;
    let vm: cairn_format::Name = task.vm.parse().map_err(|e| format!("VM {}: {e}", task.vm))?;
    let point: cairn_format::PointId =
        order.point.parse().map_err(|e| format!("point {}: {e}", order.point))?;
    let manifest = vault
        .resolve_point(&vm, Some(&point))
        .await
        .map_err(|e| format!("point {point} of VM {vm} in vault {}: {e}", task.vault))?;
    let job = format!("{}/{}", task.catalogue.as_deref().unwrap_or("-"), task.job.unwrap_or(0));
    let folder = {
        let root = runner.config.restore_dir();
        let job = job.clone();
        let to = order.to.clone();
        tokio::task::spawn_blocking(move || own_folder(&root, &to, &job))
            .await
            .map_err(|e| e.to_string())??
    };
    // Our own folder: what an earlier attempt of this job left is overwritten.
    let options = RestoreOptions { force: true };
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
        None => cairn_backup::restore_point(&vault, &manifest, &folder, &options, reporter)
            .await
            .map_err(failed)?,
    };
    tracing::info!(job, vm = %vm, point = %point, folder = %folder.display(), "restored");
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

/// The folder `to` inside `root`, made now (0700, with this job's marker), or made earlier by
/// the same job. Anything else there is refused: a restore never writes into what it did not
/// make.
fn own_folder(root: &Path, to: &str, job: &str) -> Result<PathBuf, String> {
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
    let marker = folder.join(MARKER);
    match private().create(&folder) {
        Ok(()) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&marker)
                .map_err(|e| format!("writing {}: {e}", marker.display()))?;
            file.write_all(job.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("writing {}: {e}", marker.display()))?;
            Ok(folder)
        }
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
            let mut found = String::new();
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc_flags())
                .open(&marker)
                .and_then(|f| f.take(200).read_to_string(&mut found))
                .map_err(|_| taken())?;
            if found != job {
                return Err(taken());
            }
            tracing::warn!(folder = %folder.display(), "the job's earlier attempt made this folder: restoring again into it");
            Ok(folder)
        }
        Err(e) => Err(format!("making {}: {e}", folder.display())),
    }
}

/// Open flags for the marker: never through a link, never blocking on a FIFO.
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_made_once_and_found_again_only_by_its_own_job() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("restores");
        let first = own_folder(&root, "drill-1", "cat/7").unwrap();
        assert_eq!(first, root.join("drill-1"));
        // The same job again (a retry): the same folder.
        assert_eq!(own_folder(&root, "drill-1", "cat/7").unwrap(), first);
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
}
