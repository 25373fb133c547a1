//! `cairn-coordinator`: the coordinator service (`serve`) and a command line over its API.
//!
//! Thin on purpose: arguments in, a call into `cairn-scheduler` or one HTTP request, output.
//! Exit codes: 0 success, 1 failure, 2 usage error.

mod client;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use cairn_policy::Limits;
use cairn_scheduler::{Catalogue, Clock, FileClock, Role, SystemClock};
use clap::{Parser, Subcommand};

/// The Cairn coordinator.
#[derive(Parser)]
#[command(name = "cairn-coordinator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The coordinator's URL (commands other than `serve`).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8470")]
    url: String,
    /// A file holding the API token (or CAIRN_TOKEN).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// A PEM certificate to trust for an https:// coordinator (its own CA, or its certificate).
    #[arg(long, global = true, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the coordinator: the API on --listen, and the schedules.
    Serve {
        /// The catalogue (SQLite), created if missing.
        #[arg(long)]
        db: PathBuf,
        /// Where the API listens.
        #[arg(long, default_value = "127.0.0.1:8470")]
        listen: SocketAddr,
        /// On the first start (no users yet), an admin's token is written here (mode 600).
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// Backups at once per host.
        #[arg(long, default_value_t = Limits::default().per_host)]
        max_per_host: u32,
        /// Backups at once per datastore.
        #[arg(long, default_value_t = Limits::default().per_datastore)]
        max_per_datastore: u32,
        /// Backups at once per vault.
        #[arg(long, default_value_t = Limits::default().per_vault)]
        max_per_vault: u32,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key).
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's PEM private key.
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP on an address other than loopback (tokens would cross the network
        /// in clear: only behind a TLS proxy on the same host or network namespace).
        #[arg(long)]
        allow_plain_http: bool,
        /// A running job whose agent has been silent this long fails, with an alert.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=604_800))]
        agent_timeout_seconds: u64,
        /// POST each alert here as JSON.
        #[arg(long, value_name = "URL")]
        webhook: Option<String>,
        /// The vaults the coordinator prunes and collects, with their keys and the upkeep
        /// schedule (TOML; see docs/formats.md). Without it, no upkeep runs and rescan and
        /// data deletion are refused.
        #[arg(long, value_name = "FILE")]
        vaults: Option<PathBuf>,
        /// People who log in with a name and password (TOML: [users.NAME] role and
        /// password-hash; see docs/formats.md). Read again at each login.
        #[arg(long, value_name = "FILE")]
        users: Option<PathBuf>,
        /// Tests only: read the time from this file (RFC 3339) instead of the clock.
        #[arg(long, hide = true)]
        fake_clock: Option<PathBuf>,
    },
    /// Policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Protects a VM with a policy (or changes how it is protected).
    Protect {
        /// The VM.
        vm: String,
        /// Its policy.
        #[arg(long)]
        policy: String,
        /// The agent (host) that backs it up.
        #[arg(long)]
        host: String,
        /// The datastore its disks are on.
        #[arg(long)]
        datastore: String,
        /// The vault its points go to.
        #[arg(long)]
        vault: String,
    },
    /// Lists the VMs.
    Vms,
    /// Lists jobs.
    Jobs {
        /// Only this VM's.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Lists open alerts.
    Alerts,
    /// Logs in as a user of the coordinator's users file: the session's token (12 h) is
    /// written to FILE (mode 600), for --token-file.
    Login {
        /// The user.
        name: String,
        /// Where the session's token goes.
        #[arg(long, value_name = "FILE")]
        save: PathBuf,
        /// A file holding the password (default: read from stdin).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Ends the session of --token-file.
    Logout,
    /// Prints the Argon2id hash of the password read from stdin, for a users file.
    HashPassword,
    /// Lists the audit log: every change and every restore, with who made it.
    Audit,
    /// Lists recovery points.
    Points {
        /// Only this VM's.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Stops a VM's protection: its schedule no longer runs. Its points are kept, or with
    /// --delete-data soft-deleted (purged by the upkeep after the grace time; admin only).
    Stop {
        /// The VM.
        vm: String,
        /// Also delete its recovery points.
        #[arg(long)]
        delete_data: bool,
    },
    /// Retention and space: prune and gc on the coordinator's vaults.
    #[command(subcommand)]
    Upkeep(UpkeepCommand),
    /// Rebuilds the catalogue's points from the vaults (the vaults are the source of truth).
    Rescan {
        /// Only this vault (default: every vault of the vaults file).
        #[arg(long)]
        vault: Option<String>,
        /// Empty the catalogue's points of a vault that lists none (refused otherwise: a
        /// wrong URL would look the same).
        #[arg(long)]
        force: bool,
    },
    /// Backs a VM up now, outside its schedule.
    Backup {
        /// The VM.
        vm: String,
        /// Keep this point until then, whatever the policy's retention (RFC 3339 time).
        #[arg(long)]
        retain_until: Option<String>,
    },
    /// Restores a point of a VM on its host: a restore job for the host's agent, which writes
    /// the point's disks into a new folder of its restore folder (`restore-dir`).
    Restore {
        /// The VM.
        vm: String,
        /// The point (default: the newest in a vault).
        #[arg(long)]
        point: Option<String>,
        /// Only this disk (default: every disk of the point).
        #[arg(long)]
        disk: Option<String>,
        /// The new folder's name inside the agent's restore folder.
        #[arg(long)]
        to: String,
        /// Wait until the job ends; print what it wrote (exit code 1 if it failed). Ctrl-C
        /// stops the waiting, not the job.
        #[arg(long)]
        wait: bool,
    },
    /// Users of the API and the dashboard.
    #[command(subcommand)]
    User(UserCommand),
    /// Makes a one-time token with which the agent of HOST enrolls (valid for a day).
    Enroll {
        /// The host (the agent's name).
        host: String,
    },
    /// Agents.
    #[command(subcommand)]
    Agent(AgentCommand),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Adds a user; prints their token (shown once).
    Add {
        /// The user.
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
    },
    /// Revokes a user's token.
    Revoke {
        /// The user.
        name: String,
    },
    /// Lists users.
    List,
}

#[derive(Subcommand)]
enum UpkeepCommand {
    /// Prunes each VM by its policy and collects the space, now; prints what became of every
    /// point.
    Run {
        /// Only this vault (default: every vault of the vaults file).
        #[arg(long)]
        vault: Option<String>,
    },
    /// Lists upkeep runs, newest first.
    List,
    /// Shows one run with each point's fate.
    Show {
        /// The run's id.
        id: u64,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Lists agents and when each was last heard from.
    List,
    /// Revokes an agent's token: its next call is refused.
    Revoke {
        /// The agent (its host's name).
        name: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Adds or replaces a policy from its TOML file.
    Put {
        /// The policy file.
        file: PathBuf,
    },
    /// Lists policies.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // reqwest's TLS has no crypto provider of its own here (docs/ARCHITECTURE.md, "TLS").
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Warns when a file of secrets may be read by others.
fn warn_if_readable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        eprintln!("warning: {} may be read by other users: chmod 600 it", path.display());
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            db,
            listen,
            admin_token_file,
            max_per_host,
            max_per_datastore,
            max_per_vault,
            tls_cert,
            tls_key,
            allow_plain_http,
            agent_timeout_seconds,
            webhook,
            vaults,
            users,
            fake_clock,
        } => {
            let tls = match (&tls_cert, &tls_key) {
                (Some(cert), Some(key)) => Some(cairn_scheduler::tls::acceptor(cert, key)?),
                _ => None,
            };
            if tls.is_none() && !listen.ip().is_loopback() && !allow_plain_http {
                anyhow::bail!(
                    "--listen {listen} is not loopback: give --tls-cert and --tls-key (tokens must not cross the network in clear), or --allow-plain-http behind a TLS proxy"
                );
            }
            let clock: Arc<dyn Clock> = match fake_clock {
                Some(path) => Arc::new(FileClock::new(path)),
                None => Arc::new(SystemClock),
            };
            let keeper = match &vaults {
                Some(path) => {
                    let file = cairn_upkeep::VaultsFile::load(path)?;
                    let set = cairn_upkeep::VaultSet::new(&file, path)?;
                    Some(cairn_scheduler::Keeper(Arc::new(set)))
                }
                None => None,
            };
            let users = match &users {
                Some(path) => {
                    let file = cairn_scheduler::UsersFile::load(path)?;
                    warn_if_readable(path);
                    eprintln!("{} user(s) may log in from {}", file.len(), path.display());
                    Some(file)
                }
                None => None,
            };
            let mut catalogue = Catalogue::open(&db)?;
            if catalogue.user_count()? == 0 {
                let file = admin_token_file.context(
                    "the catalogue has no user yet: give --admin-token-file FILE for the first admin's token",
                )?;
                let token = catalogue.add_user("admin", Role::Admin, clock.now())?;
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&file)
                    .with_context(|| format!("writing the admin token to {}", file.display()))?;
                out.write_all(token.as_bytes())?;
                eprintln!("the first admin's token is in {}", file.display());
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            let addr = listener.local_addr()?;
            println!("listening on {}://{addr}", if tls.is_some() { "https" } else { "http" });
            let settings = cairn_scheduler::Settings {
                limits: Limits {
                    per_host: max_per_host,
                    per_datastore: max_per_datastore,
                    per_vault: max_per_vault,
                },
                agent_timeout: std::time::Duration::from_secs(agent_timeout_seconds),
                webhook,
                keeper,
                users,
            };
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            match tls {
                Some(acceptor) => {
                    let listener = cairn_scheduler::tls::TlsListener::new(listener, acceptor)?;
                    cairn_scheduler::serve(catalogue, listener, clock, settings, shutdown).await?
                }
                None => {
                    cairn_scheduler::serve(catalogue, listener, clock, settings, shutdown).await?
                }
            }
            Ok(())
        }
        Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
            let password = line.trim_end_matches(['\n', '\r']);
            println!("{}", cairn_scheduler::hash_password(password)?);
            Ok(())
        }
        command => {
            let client = client::http_client(cli.ca_file.as_deref())?;
            client::run(&client, &cli.url, cli.token_file.as_deref(), cli.json, command).await
        }
    }
}
