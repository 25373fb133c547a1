//! `cairn-agent files`: a point's files, read straight from its vault (file-level recovery).
//!
//! The disk is read through a [`PointReader`]: only the blocks the partition table, the file
//! system's metadata and the files asked for live in are fetched, kept in its bounded cache.
//! The ext4 reader is not `Send`, so the whole walk runs on one blocking thread that drives
//! the async reader on the agent's runtime.

use std::sync::Arc;

use anyhow::Context;
use cairn_files::{Entry, ExtractOptions, ReadAt, Volume, escape, locate};
use serde_json::json;

use super::point_disk::PointDisk;
use crate::cli::{FilesCommand, FilesDiskArgs};
use crate::output::{Exit, print_json};
use crate::units::bytes;

/// Opens the disk the arguments name.
async fn open(args: &FilesDiskArgs) -> anyhow::Result<PointDisk> {
    PointDisk::open(&args.disk, args.read_ahead_mib).await
}

/// Runs `work` on the disk, on a blocking thread.
async fn on_disk<T: Send + 'static>(
    opened: &PointDisk,
    work: impl FnOnce(Arc<dyn ReadAt>) -> Result<T, cairn_files::Error> + Send + 'static,
) -> anyhow::Result<T> {
    let disk = opened.blocking();
    let joined = tokio::task::spawn_blocking(move || work(Arc::new(disk))).await;
    Ok(joined.context("the file reader stopped")??)
}

pub async fn run(cmd: FilesCommand, json: bool) -> anyhow::Result<Exit> {
    match cmd {
        FilesCommand::Partitions(args) => partitions(&args, json).await,
        FilesCommand::Ls(args) => {
            let opened = open(&args.disk).await?;
            let path = args.path.clone().into_bytes();
            let (recursive, limit, number) = (args.recursive, args.max_entries, args.partition);
            // On a terminal each line is printed as the walk finds it (a large tree starts at
            // once and is never held whole); JSON is one document, gathered first.
            let entries = on_disk(&opened, move |disk| {
                let at = locate(disk.as_ref(), number)?;
                let volume = Volume::open(disk, &at)?;
                let mut entries = Vec::new();
                volume.list(&path, recursive, limit, &mut |e| {
                    if json {
                        entries.push(entry_json(e));
                    } else {
                        println!("{}", ls_line(e));
                    }
                })?;
                Ok(entries)
            })
            .await?;
            if json {
                let fetched = opened.reader.stats();
                print_json(&json!({
                    "vm": opened.manifest.vm, "point": opened.manifest.point,
                    "disk": opened.name,
                    "entries": entries,
                    "chunks_fetched": fetched.chunks_fetched,
                    "bytes_fetched": fetched.bytes_fetched,
                    "data_blocks": opened.data_blocks(),
                }));
            }
            Ok(Exit::Ok)
        }
        FilesCommand::Get(args) => {
            let opened = open(&args.disk).await?;
            let options = ExtractOptions {
                same_owner: rustix::process::geteuid().is_root(),
                keep_setid: args.keep_setid,
                max_entries: args.max_entries,
                max_bytes: u64::MAX,
            };
            let (to, paths, number) = (args.to.clone(), args.paths.clone(), args.partition);
            let reports = on_disk(&opened, move |disk| {
                let at = locate(disk.as_ref(), number)?;
                let volume = Volume::open(disk, &at)?;
                // A volume holds no more data than its size: more means blocks mapped many
                // times by a crafted file system, which must not fill the host.
                let options = ExtractOptions { max_bytes: at.len, ..options };
                let mut reports = Vec::new();
                for path in &paths {
                    reports.push((path.clone(), volume.extract(path.as_bytes(), &to, &options)?));
                }
                Ok(reports)
            })
            .await?;
            let fetched = opened.reader.stats();
            let sum = |f: fn(&cairn_files::ExtractReport) -> u64| -> u64 {
                reports.iter().map(|(_, r)| f(r)).sum()
            };
            let skipped: Vec<_> = reports.iter().flat_map(|(_, r)| r.skipped.clone()).collect();
            if json {
                print_json(&json!({
                    "vm": opened.manifest.vm, "point": opened.manifest.point,
                    "disk": opened.name, "to": args.to,
                    "files": sum(|r| r.files), "dirs": sum(|r| r.dirs),
                    "symlinks": sum(|r| r.symlinks), "bytes": sum(|r| r.bytes),
                    "written": sum(|r| r.written), "setid_dropped": sum(|r| r.setid_dropped),
                    "skipped": skipped.iter()
                        .map(|s| json!({"path": s.path, "why": s.why})).collect::<Vec<_>>(),
                    "chunks_fetched": fetched.chunks_fetched,
                    "bytes_fetched": fetched.bytes_fetched,
                    "data_blocks": opened.data_blocks(),
                }));
            } else {
                for s in &skipped {
                    eprintln!("skipped {}: {}", s.path, s.why);
                }
                if sum(|r| r.setid_dropped) > 0 {
                    eprintln!(
                        "{} set-user-ID or set-group-ID bits dropped (--keep-setid keeps them)",
                        sum(|r| r.setid_dropped)
                    );
                }
                println!(
                    "extracted {} files, {} folders, {} symlinks ({}) into {}; fetched {} chunks \
                     ({}) of the disk's {} data blocks",
                    sum(|r| r.files),
                    sum(|r| r.dirs),
                    sum(|r| r.symlinks),
                    bytes(sum(|r| r.bytes)),
                    args.to.display(),
                    fetched.chunks_fetched,
                    bytes(fetched.bytes_fetched),
                    opened.data_blocks()
                );
            }
            Ok(Exit::Ok)
        }
    }
}

async fn partitions(args: &FilesDiskArgs, json: bool) -> anyhow::Result<Exit> {
    let opened = open(args).await?;
    let (table, found) = on_disk(&opened, |disk| {
        let table = cairn_files::read_table(disk.as_ref())?;
        let mut found = Vec::new();
        for p in &table.partitions {
            found.push(cairn_files::detect(disk.as_ref(), p.start, p.len)?);
        }
        if table.partitions.is_empty() {
            found.push(cairn_files::detect(disk.as_ref(), 0, disk.size())?);
        }
        Ok((table, found))
    })
    .await?;
    let kind = format!("{:?}", table.kind).to_lowercase();
    if json {
        let parts: Vec<_> = table
            .partitions
            .iter()
            .zip(&found)
            .map(|(p, fs)| {
                json!({"number": p.number, "start": p.start, "size": p.len, "type": p.kind,
                       "name": p.name, "fs": fs.name()})
            })
            .collect();
        let whole = table.partitions.is_empty().then(|| found[0].name());
        print_json(&json!({"table": kind, "partitions": parts, "whole_disk_fs": whole}));
    } else if table.partitions.is_empty() {
        println!("no partition table: the whole disk holds {}", found[0].name());
    } else {
        println!("{kind} partition table");
        println!("{:>3}  {:>12}  {:>10}  {:<10}  TYPE / NAME", "#", "START", "SIZE", "FS");
        for (p, fs) in table.partitions.iter().zip(&found) {
            println!(
                "{:>3}  {:>12}  {:>10}  {:<10}  {} {}",
                p.number,
                p.start,
                bytes(p.len),
                fs.name(),
                p.kind,
                escape(p.name.as_bytes())
            );
        }
    }
    Ok(Exit::Ok)
}

fn entry_json(e: &Entry) -> serde_json::Value {
    json!({
        "path": e.display_path(), "kind": e.kind.name(), "size": e.size,
        "mode": format!("{:04o}", e.mode), "uid": e.uid, "gid": e.gid,
        "modified": time(e.modified),
        "target": e.target.as_deref().map(escape),
    })
}

fn time((s, ns): (i64, u32)) -> String {
    jiff::Timestamp::new(s, ns.min(999_999_999) as i32)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("@{s}"))
}

/// One entry as `ls -l` shows it.
fn ls_line(e: &Entry) -> String {
    let mut mode = String::with_capacity(10);
    mode.push(e.kind.letter());
    for (shift, special, on, off) in
        [(6, 0o4000, 's', 'S'), (3, 0o2000, 's', 'S'), (0, 0o1000, 't', 'T')]
    {
        let bits = (e.mode >> shift) & 7;
        mode.push(if bits & 4 != 0 { 'r' } else { '-' });
        mode.push(if bits & 2 != 0 { 'w' } else { '-' });
        mode.push(match (bits & 1 != 0, e.mode & special != 0) {
            (true, true) => on,
            (false, true) => off,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    let when = jiff::Timestamp::new(e.modified.0, 0)
        .map(|t| t.strftime("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|_| "?".into());
    let target = e.target.as_deref().map(|t| format!(" -> {}", escape(t))).unwrap_or_default();
    format!("{mode} {:>6} {:>6} {:>12} {when} {}{target}", e.uid, e.gid, e.size, e.display_path())
}
