//! `cairn-agent copy`.

use anyhow::Context;
use cairn_backup::CopyOptions;

use crate::cli::{CopyArgs, VaultArg};
use crate::output::{Exit, print_json};
use crate::units::bytes;

pub async fn run(args: CopyArgs, json: bool) -> anyhow::Result<Exit> {
    let side = |vault: &str, key_file, passphrase_file| VaultArg {
        vault: vault.to_string(),
        store_options: vec![],
        key_file,
        passphrase_file,
        append_only: false,
    };
    let from = super::open_vault(&side(&args.from, args.from_key_file, args.from_passphrase_file))
        .await
        .with_context(|| format!("opening the source vault {}", args.from))?;
    let to = super::open_vault(&side(&args.to, args.to_key_file, args.to_passphrase_file))
        .await
        .with_context(|| format!("opening the target vault {}", args.to))?;
    let options = CopyOptions {
        vm: args.vm.as_deref().map(super::vm_name).transpose()?,
        point: match args.point.as_deref() {
            Some(p) => Some(p.parse().with_context(|| format!("--point {p:?}"))?),
            None => None,
        },
    };
    let r = cairn_backup::copy_points(&from, &to, &options)
        .await
        .with_context(|| format!("copying from {} to {}", from.url(), to.url()))?;
    if json {
        let names = |v: &[(cairn_format::Name, cairn_format::PointId)]| {
            v.iter().map(|(vm, p)| format!("{vm}/{p}")).collect::<Vec<_>>()
        };
        print_json(&serde_json::json!({
            "copied": names(&r.copied), "present": names(&r.present),
            "chunks_read": r.chunks_read, "chunks_sent": r.chunks_sent, "bytes_sent": r.bytes_sent,
        }));
    } else {
        for (vm, p) in &r.copied {
            println!("copied point {p} of VM {vm}");
        }
        println!(
            "{} point(s) copied, {} already there; {} chunk(s) read, {} sent ({})",
            r.copied.len(),
            r.present.len(),
            r.chunks_read,
            r.chunks_sent,
            bytes(r.bytes_sent)
        );
    }
    Ok(Exit::Ok)
}
