//! One module per subcommand; each takes its parsed arguments and returns an [`Exit`].

mod backup;
mod bench;
mod config;
mod copy;
mod drill;
mod files;
mod gc;
mod held;
mod init;
mod key;
mod lifecycle;
mod point_disk;
mod points;
mod quickstart;
mod restore;
mod restore_job;
mod sample;
mod serve_nbd;
mod service;
mod verify;

use anyhow::{Context, bail};
use cairn_format::{Name, PointId};
use cairn_vault::{OpenOptions, Vault};

use crate::cli::{Cli, Command, ConfigCommand};
use crate::output::Exit;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<Exit> {
    let json = cli.global.json;
    let config = cli.global.config;
    match cli.command {
        Command::Init(args) => init::run(args, json).await,
        Command::Backup(args) => backup::run(args, config, json).await,
        Command::Points(args) => points::run(args, json).await,
        Command::Restore(args) => restore::run(args, json).await,
        Command::ServeNbd(args) => serve_nbd::run(args, json).await,
        Command::Files(cmd) => files::run(cmd, json).await,
        Command::Verify(args) => verify::run(args, json).await,
        Command::Drill(args) => drill::run(args, json).await,
        Command::Quickstart(args) => quickstart::run(args, json).await,
        Command::Prune(args) => lifecycle::prune(args, json).await,
        Command::Delete(args) => lifecycle::delete(args, json).await,
        Command::Undelete(args) => lifecycle::undelete(args, json).await,
        Command::Gc(args) => gc::run(args, json).await,
        Command::Copy(args) => copy::run(args, json).await,
        Command::Repair(crate::cli::RepairCommand::Index(args)) => {
            gc::repair_index(args, json).await
        }
        Command::Lock(args) => lifecycle::lock(args, json).await,
        Command::Key(cmd) => key::run(cmd, json).await,
        Command::Sample(cmd) => sample::run(cmd, json),
        Command::Bench(args) => bench::run(args, json).await,
        Command::Install(args) => service::install(args, json),
        Command::Uninstall(args) => service::uninstall(args, json),
        Command::Run(args) => service::run(args).await,
        Command::Held(cmd) => held::run(cmd, json),
        Command::Config(ConfigCommand::Check) => match config {
            Some(file) => config::check(&file, json),
            None => bail!("config check needs --config FILE"),
        },
        // main() serves the watchdog before the runtime starts.
        Command::WatchdogThaw { .. } => bail!("watchdog-thaw is started by the agent itself"),
    }
}

/// Opens the vault `arg` names, with the key its flags or the environment give, or one
/// asked for on a terminal when the vault turns out to be encrypted.
pub(crate) async fn open_vault(arg: &crate::cli::VaultArg) -> anyhow::Result<Vault> {
    let key = crate::keys::given(arg.key_file.as_deref(), arg.passphrase_file.as_deref())?;
    let prompted = key.is_none();
    let options = OpenOptions { store: arg.options(), key, append_only: arg.append_only };
    match Vault::open_with(&arg.vault, &options).await {
        Err(e @ cairn_vault::Error::KeyRequired { .. }) if prompted => {
            match crate::keys::prompt(&arg.vault)? {
                Some(key) => {
                    let options = OpenOptions { key: Some(key), ..options };
                    Ok(Vault::open_with(&arg.vault, &options).await?)
                }
                None => Err(e.into()),
            }
        }
        result => Ok(result?),
    }
}

/// Opens the vault of `from` and reads the point it names (its newest for `latest`).
pub(crate) async fn open_point(
    from: &crate::cli::PointChoice,
) -> anyhow::Result<(Vault, cairn_format::PointManifest)> {
    let vault = open_vault(&from.vault).await?;
    let vm = vm_name(&from.vm)?;
    let point = point_id(&from.point)?;
    let manifest = vault.resolve_point(&vm, point.as_ref()).await?;
    Ok((vault, manifest))
}

pub(crate) fn vm_name(s: &str) -> anyhow::Result<Name> {
    s.parse().with_context(|| format!("--vm {s:?}"))
}

pub(crate) fn point_id(s: &str) -> anyhow::Result<Option<PointId>> {
    if s == "latest" {
        return Ok(None);
    }
    Ok(Some(s.parse().with_context(|| {
        format!("--point {s:?} (give a point id from `cairn-agent points`, or latest)")
    })?))
}

/// Waits for ctrl-C or SIGTERM, then asks the job to stop.
pub(crate) fn cancel_on_signal(cancel: cairn_backup::Cancel) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("interrupted: stopping; nothing will be committed");
        cancel.cancel();
    });
}

/// Waits for Ctrl-C or SIGTERM; says which. The handlers are in place when this returns, not
/// when the future is first polled: a signal that comes in between is not fatal.
pub(crate) fn stop_signal() -> impl std::future::Future<Output = &'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let (int, term) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()));
    async move {
        match (int, term) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => "interrupted",
                _ = term.recv() => "terminated",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "interrupted"
            }
        }
    }
}
