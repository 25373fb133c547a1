//! `cairn-agent init`.

use anyhow::{Context, bail};
use cairn_vault::{CreateOptions, Credential, Vault};

use crate::cli::InitArgs;
use crate::output::{Exit, print_json};

pub async fn run(args: InitArgs, json: bool) -> anyhow::Result<Exit> {
    let block_size = u32::try_from(args.block_size).context("--block-size is too large")?;
    let key = if args.no_encryption { None } else { Some(new_vault_key(&args)?) };
    let options =
        CreateOptions { store: args.vault.options(), key, ..CreateOptions::plain(block_size) };
    let vault = Vault::create_with(&args.vault.vault, &options).await?;
    let config = vault.config();
    if json {
        print_json(&serde_json::json!({ "vault": vault.url(), "config": config }));
    } else {
        let cipher =
            if vault.is_encrypted() { "encrypted with AES-256-GCM" } else { "NOT encrypted" };
        println!(
            "created vault {} ({} blocks, zstd level {}, {cipher})",
            vault.url(),
            crate::units::bytes(u64::from(config.block_size)),
            config.compression.level
        );
        if vault.is_encrypted() {
            println!(
                "without its key the vault cannot be read: keep a copy of the key somewhere else, \
                 and make a recovery key with `cairn-agent key add --recovery`"
            );
        }
    }
    Ok(Exit::Ok)
}

/// The first key of a new vault: a key file (made when it does not exist), a passphrase file,
/// CAIRN_PASSPHRASE, or a passphrase asked for twice on a terminal.
fn new_vault_key(args: &InitArgs) -> anyhow::Result<Credential> {
    if let Some(path) = &args.vault.key_file
        && !path.exists()
    {
        let key = crate::keys::create_key_file(path)?;
        eprintln!("wrote a new key file {} (mode 600)", path.display());
        return Ok(key);
    }
    let given =
        crate::keys::given(args.vault.key_file.as_deref(), args.vault.passphrase_file.as_deref())?;
    if let Some(key) = given {
        return Ok(key);
    }
    match crate::keys::prompt_new(&format!("vault {}", args.vault.vault))? {
        Some(key) => Ok(key),
        None => bail!(
            "a new vault is encrypted: give --key-file PATH (created if it does not exist), \
             --passphrase-file PATH or the CAIRN_PASSPHRASE variable, or choose --no-encryption"
        ),
    }
}
