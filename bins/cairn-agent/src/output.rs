//! How the agent talks: logs, progress bars, tables, JSON, errors and exit codes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;

use cairn_backup::{DiskProgress, Progress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Exit status of a command that ran to its end.
pub enum Exit {
    /// Everything fine.
    Ok,
    /// Verify found damage.
    Damaged,
    /// A check failed and has already said why (exit 1).
    Failed,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        match e {
            Exit::Ok => ExitCode::SUCCESS,
            Exit::Damaged => ExitCode::from(3),
            Exit::Failed => ExitCode::FAILURE,
        }
    }
}

/// Logs go to stderr; `-v` raises the level, `RUST_LOG` overrides it.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Prints the error (and, with `--json`, an error document) with the agent command that helps,
/// and picks the exit code.
pub fn report_error(error: &anyhow::Error, json: bool) -> ExitCode {
    let cancelled = error.chain().any(|e| {
        matches!(e.downcast_ref::<cairn_backup::Error>(), Some(cairn_backup::Error::Cancelled))
    });
    let message = chain_message(error);
    let hint = advice(error);
    if json {
        println!(
            "{}",
            serde_json::json!({ "error": message, "hint": hint, "cancelled": cancelled })
        );
    }
    eprintln!("error: {message}");
    if let Some(hint) = hint {
        eprintln!("hint: {hint}");
    }
    if cancelled { ExitCode::from(130) } else { ExitCode::FAILURE }
}

/// The error and its causes, each cause left out when the message before it already says it
/// (library errors often name their source in their own text).
fn chain_message(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

/// The agent command that helps with an error, for the errors a library can only describe.
fn advice(error: &anyhow::Error) -> Option<String> {
    use cairn_vault::Error as V;
    error.chain().find_map(|e| {
        if let Some(v) = e.downcast_ref::<V>() {
            return match v {
                V::NoVault { url } => {
                    Some(format!("create it with `cairn-agent init --vault {url}`"))
                }
                V::Format(cairn_format::Error::Obsolete { .. }) => {
                    Some("`cairn-agent init --vault NEW-URL` creates one".into())
                }
                V::Corrupt { .. } | V::ChunkMissing { .. } | V::ChunkTruncated { .. } => {
                    Some("`cairn-agent verify --vault URL` finds the damaged points".into())
                }
                V::PointNotFound { vm, .. } => {
                    Some(format!("`cairn-agent points --vault URL --vm {vm}` lists its points"))
                }
                V::NoPoints { .. } => Some("`cairn-agent points --vault URL` lists the VMs".into()),
                V::NoSuchKey { .. } => {
                    Some("`cairn-agent key list --vault URL` lists the key slots".into())
                }
                V::LastKey { .. } => Some(
                    "`cairn-agent key add --vault URL --new-key-file PATH` adds another first"
                        .into(),
                ),
                V::Concurrent { .. } => {
                    Some("another backup of this VM may be running; run this one again".into())
                }
                _ => None,
            };
        }
        if let Some(b) = e.downcast_ref::<cairn_backup::Error>() {
            return match b {
                cairn_backup::Error::TargetExists { .. } => {
                    Some("pass --force to overwrite it".into())
                }
                cairn_backup::Error::Corrupt { .. } => {
                    Some("`cairn-agent verify --vault URL` finds the damaged points".into())
                }
                _ => None,
            };
        }
        if let Some(cairn_nbd::Error::BackingRefused { .. }) = e.downcast_ref::<cairn_nbd::Error>()
        {
            return Some(
                "to read it with its backing file, declare the disk with \
                 `--disk NAME=PATH,format=qcow2,backing=allow`, or set `allow_backing_file = true` \
                 on its [[disk]] in the VM configuration"
                    .into(),
            );
        }
        None
    })
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// One progress bar per disk on a terminal; nothing otherwise.
pub struct Bars {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
    verb: &'static str,
}

impl Bars {
    /// Bars labelled with `verb` ("backup", "restore"), shown only on a terminal without --json.
    pub fn new(json: bool, verb: &'static str) -> Bars {
        let show = !json && std::io::stderr().is_terminal();
        let multi = show.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Bars { multi, bars: Mutex::new(HashMap::new()), verb }
    }
}

impl Progress for Bars {
    fn disk(&self, u: &DiskProgress) {
        let Some(multi) = &self.multi else { return };
        let name = u.disk.as_ref().map(|d| d.to_string()).unwrap_or_default();
        let Ok(mut bars) = self.bars.lock() else { return };
        let bar = bars.entry(name.clone()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(u.size));
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(format!("{} {name}", self.verb));
            bar
        });
        bar.set_position(u.position);
        bar.set_message(format!(
            "changed {} sent {}",
            crate::units::bytes(u.bytes_changed),
            crate::units::bytes(u.bytes_sent)
        ));
        if u.done {
            bar.finish();
        }
    }
}

/// A plain text table, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
