//! `cairn-agent`: the command line over `cairn-backup` and `cairn-vault`.
//!
//! Thin on purpose: parse arguments, set up logging and signals, call the libraries, print.
//! Exit codes: 0 success, 1 failure, 2 usage error, 3 verify found damage, 130 interrupted.

mod cli;
mod commands;
mod held;
mod keys;
mod memory;
mod output;
mod units;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    memory::limit_malloc_arenas();
    // Taken out of the environment before any thread or child exists: scripts, qemu tools
    // and the watchdog the agent starts must not inherit the vault's passphrase.
    keys::take_passphrase_from_env();
    // Everything the agent creates (vaults, views, restored disks, temporary files) is its
    // own: the libraries set modes explicitly where it matters; this covers the rest.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = cli::Cli::parse();
    if let cli::Command::WatchdogThaw { args } = &cli.command {
        // A separate process that must not depend on the agent's runtime or logging.
        let code = match args.get(1).is_some_and(|a| a == cairn_qemu::WATCHDOG_FLAG) {
            true => cairn_qemu::serve_watchdog(args),
            false => cairn_snapshot::watchdog::serve(args),
        };
        return ExitCode::from(code as u8);
    }
    output::init_logging(cli.global.verbose);
    // Few blocking threads: the vault's file operations run there, and more threads than
    // operations in flight only add switching (measured in docs/performance.md).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(16)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.global.json;
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code.into(),
        Err(error) => output::report_error(&error, json),
    }
}
