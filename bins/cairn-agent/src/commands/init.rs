//! `cairn-agent init`.

use anyhow::Context;
use cairn_vault::Vault;

use crate::cli::InitArgs;
use crate::output::{Exit, print_json};

pub async fn run(args: InitArgs, json: bool) -> anyhow::Result<Exit> {
    let block_size = u32::try_from(args.block_size).context("--block-size is too large")?;
    let vault = Vault::create_with(&args.vault.vault, block_size, &args.vault.options()).await?;
    let config = vault.config();
    if json {
        print_json(&serde_json::json!({ "vault": vault.url(), "config": config }));
    } else {
        println!(
            "created vault {} ({} blocks, zstd level {}, no encryption)",
            vault.url(),
            crate::units::bytes(u64::from(config.block_size)),
            config.compression.level
        );
    }
    Ok(Exit::Ok)
}
