//! Back up a VM and restore it from another Rust program: the whole job in a few calls.
//!
//! `cargo run --release -p cairn-backup --example vm_backup [WORK_DIR]` makes two sample disks
//! in WORK_DIR (a temporary folder by default), backs the VM up into a vault there, changes a
//! disk, backs up again incrementally, restores the second point and checks it. To back up
//! your own VM, build the `VmConfig` from its TOML file (`VmConfig::load`) instead.

use std::path::PathBuf;
use std::sync::Arc;

use cairn_backup::{Cancel, JobOptions, NoProgress, RestoreOptions, VmJob};
use cairn_snapshot::{DiskConfig, DiskFormat, VmConfig};
use cairn_vault::Vault;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let temp = tempfile::tempdir()?;
    let work = std::env::args().nth(1).map(PathBuf::from).unwrap_or(temp.path().to_owned());
    std::fs::create_dir_all(&work)?;

    // Two disks of a VM, read live (no snapshot): raw images here, qcow2 if declared so.
    let (os, data) = (work.join("os.raw"), work.join("data.raw"));
    cairn_sample::create_disk(&os, 64 << 20, 1)?;
    cairn_sample::create_disk(&data, 32 << 20, 2)?;
    let disks = vec![
        DiskConfig::live("os".parse()?, os.clone(), DiskFormat::Raw, false),
        DiskConfig::live("data".parse()?, data.clone(), DiskFormat::Raw, false),
    ];
    let job = VmJob::new(VmConfig::live("web-01".parse()?, disks), JobOptions::default());

    let vault = Vault::create(work.join("vault").to_str().ok_or("path not UTF-8")?, 65536).await?;
    let full = job.run(&vault, Arc::new(NoProgress), &Cancel::new()).await?;
    cairn_sample::mutate_scattered(&os, 0.01, 3)?;
    let incremental = job.run(&vault, Arc::new(NoProgress), &Cancel::new()).await?;

    let restored = work.join("restored");
    let options = RestoreOptions::default();
    cairn_backup::restore_point(&vault, &incremental, &restored, &options, Arc::new(NoProgress))
        .await?;
    for (disk, source) in [("os", &os), ("data", &data)] {
        assert!(cairn_sample::same_content(source, &restored.join(disk))?, "{disk} differs");
    }
    let stored = |m: &cairn_format::PointManifest| -> u64 {
        m.disks.values().map(|d| d.stats.bytes_sent).sum()
    };
    println!(
        "full point {} stored {} bytes; incremental point {} stored {} bytes; both disks restored identical",
        full.point,
        stored(&full),
        incremental.point,
        stored(&incremental)
    );
    Ok(())
}
