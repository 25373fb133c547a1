//! `cairn-agent key list|add|remove`: the key slots of an encrypted vault. Adding or removing
//! a slot rewraps the vault's master key; no data is rewritten.

use anyhow::bail;
use cairn_format::keyslot::{Argon2Costs, SlotKind};
use serde_json::json;

use crate::cli::{KeyAddArgs, KeyCommand};
use crate::output::{Exit, print_json};

pub async fn run(cmd: KeyCommand, json: bool) -> anyhow::Result<Exit> {
    match cmd {
        KeyCommand::List(args) => {
            let vault = super::open_vault(&args.vault).await?;
            let (slots, unreadable) = vault.key_slots().await?;
            if json {
                print_json(&json!({ "slots": slots, "unreadable": unreadable }));
                return Ok(Exit::Ok);
            }
            if !vault.is_encrypted() {
                println!("vault {} is not encrypted: it has no keys", vault.url());
                return Ok(Exit::Ok);
            }
            println!("{:<16}  {:<10}  {:<24}  LABEL", "SLOT", "KIND", "ADDED");
            for s in &slots {
                let kind = match s.kind {
                    SlotKind::Passphrase => "passphrase",
                    SlotKind::KeyFile => "key-file",
                    SlotKind::Recovery => "recovery",
                };
                println!(
                    "{:<16}  {kind:<10}  {:<24}  {}",
                    s.slot,
                    s.created_at.to_string(),
                    // Labels come from the bucket: shown escaped, never as terminal controls.
                    s.label.escape_debug()
                );
            }
            for (path, why) in &unreadable {
                println!("unreadable slot {path}: {why}");
            }
            Ok(Exit::Ok)
        }
        KeyCommand::Add(args) => add(args, json).await,
        KeyCommand::Remove(args) => {
            let vault = super::open_vault(&args.vault).await?;
            vault.remove_key(&args.slot).await?;
            if json {
                print_json(&json!({ "removed": args.slot }));
            } else {
                println!("removed key slot {} from {}", args.slot, vault.url());
                println!(
                    "note: this is not revocation: the vault's master key is unchanged, so a copy \
                     of the slot kept elsewhere still opens it with its old secret"
                );
            }
            Ok(Exit::Ok)
        }
    }
}

async fn add(args: KeyAddArgs, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault).await?;
    let mut printed = None;
    let (key, kind) = if args.recovery {
        let (key, text) = crate::keys::new_recovery_key();
        printed = Some(text);
        (key, Some(SlotKind::Recovery))
    } else if let Some(path) = &args.new_key_file {
        let key = if path.exists() {
            cairn_vault::Credential::KeyFile(cairn_vault::read_key_file(path)?)
        } else {
            crate::keys::create_key_file(path)?
        };
        (key, None)
    } else if let Some(path) = &args.new_passphrase_file {
        match crate::keys::given(None, Some(path))? {
            Some(key) => (key, None),
            None => bail!("{} holds no passphrase", path.display()),
        }
    } else {
        match crate::keys::prompt_new("the new key slot")? {
            Some(key) => (key, None),
            None => {
                bail!("say which key to add: --new-key-file, --new-passphrase-file or --recovery")
            }
        }
    };
    let slot = vault.add_key(&key, kind, Argon2Costs::default(), args.label).await?;
    if json {
        print_json(
            &json!({ "added": slot.slot, "kind": slot.kind, "recovery_key": printed.as_deref().map(|s| s.as_str()) }),
        );
    } else {
        println!("added key slot {} to {}", slot.slot, vault.url());
        if let Some(text) = &printed {
            println!(
                "recovery key (shown once; write it down, keep it offline):\n\n    {}\n",
                text.as_str()
            );
            println!("to use it, put it in a file and give --key-file FILE");
        }
    }
    Ok(Exit::Ok)
}
