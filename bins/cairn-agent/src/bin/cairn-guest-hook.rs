//! `cairn-guest-hook`: the in-guest half of backing up a VM that runs in QEMU.
//!
//! Installed inside the guest as a script of the guest agent's fsfreeze hook
//! (`/etc/qemu/fsfreeze-hook.d/`), it runs the guest's pre-script before the guest agent
//! freezes the file systems and its post-script after it thaws them, under the same
//! `VMSnapshotScriptPluginConfig.json` contract as the host-side agent, and leaves a report
//! in `/run` that the host reads back (see `cairn_snapshot::guest_hook`). Small on purpose:
//! it links only the snapshot crate, so that it can be copied into a guest alone.

use std::path::PathBuf;
use std::process::ExitCode;

use cairn_snapshot::guest_hook::{DEFAULT_CONFIG, DEFAULT_RUN_DIR, Phase, run_hook};
use clap::Parser;

/// Runs the guest's pre-script (freeze) or post-script (thaw) for a Cairn backup.
#[derive(Parser)]
#[command(name = "cairn-guest-hook", version)]
struct Args {
    /// `freeze` (before the file systems freeze) or `thaw` (after they thaw), as the guest
    /// agent's fsfreeze hook passes it.
    phase: Phase,
    /// The script configuration (Azure's VMSnapshotScriptPluginConfig.json format): mode 600,
    /// owned by root; absent means no scripts.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Where the reports for the host and the freeze's marker are kept.
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (report, code) = run_hook(args.phase, &args.config, &args.run_dir);
    // The guest agent's hook logs this line (/var/log/qga-fsfreeze-hook.log on Debian).
    let ran = |s: &Option<cairn_snapshot::guest_hook::ScriptReport>, which: &str| {
        s.as_ref().map(|s| format!(" {which}-script {}: {};", s.path, s.outcome))
    };
    eprintln!(
        "cairn-guest-hook {:?}:{}{}{} exit {code}",
        args.phase,
        ran(&report.pre, "pre").unwrap_or_default(),
        ran(&report.post, "post").unwrap_or_default(),
        report.error.as_deref().map(|e| format!(" {e};")).unwrap_or_default(),
    );
    ExitCode::from(code as u8)
}
