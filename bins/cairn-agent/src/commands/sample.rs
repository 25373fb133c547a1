//! `cairn-agent sample`.

use anyhow::Context;

use crate::cli::SampleCommand;
use crate::output::{Exit, print_json};
use crate::units::{bytes, parse_size};

pub fn run(cmd: SampleCommand, json: bool) -> anyhow::Result<Exit> {
    match cmd {
        SampleCommand::Create { path, size, seed } => {
            let c = cairn_sample::create_disk(&path, size, seed)
                .with_context(|| format!("writing sample disk {}", path.display()))?;
            if json {
                print_json(
                    &serde_json::json!({ "path": path, "size": size, "hole": c.hole, "zeros": c.zeros, "random": c.random, "text": c.text }),
                );
            } else {
                println!(
                    "wrote {} ({}): holes {}, zeros {}, random {}, text {}",
                    path.display(),
                    bytes(size),
                    bytes(c.hole),
                    bytes(c.zeros),
                    bytes(c.random),
                    bytes(c.text)
                );
            }
        }
        SampleCommand::Mutate { path, fraction, range, seed } => {
            let what = match (fraction, range) {
                (Some(f), _) => {
                    let n = cairn_sample::mutate_scattered(&path, f, seed)
                        .with_context(|| format!("changing {}", path.display()))?;
                    format!("{n} scattered 4 KiB blocks")
                }
                (None, Some(r)) => {
                    let (off, len) =
                        r.split_once(':').context("--range takes OFFSET:LENGTH, e.g. 1G:64M")?;
                    let (off, len) = (
                        parse_size(off).map_err(anyhow::Error::msg)?,
                        parse_size(len).map_err(anyhow::Error::msg)?,
                    );
                    cairn_sample::mutate_range(&path, off, len, seed)
                        .with_context(|| format!("changing {}", path.display()))?;
                    format!("{} from offset {off}", bytes(len))
                }
                (None, None) => anyhow::bail!("give --fraction F or --range OFFSET:LENGTH"),
            };
            if json {
                print_json(&serde_json::json!({ "path": path, "changed": what }));
            } else {
                println!("overwrote {what} of {}", path.display());
            }
        }
    }
    Ok(Exit::Ok)
}
