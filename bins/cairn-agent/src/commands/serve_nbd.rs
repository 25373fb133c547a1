//! `cairn-agent serve-nbd`: a point's disk exported read-only over NBD, read from the vault
//! as clients read it (an instant restore).

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use cairn_backup::{PointReader, ReaderOptions};
use cairn_nbd::server::{ExportSource, Server};

use crate::cli::ServeNbdArgs;
use crate::output::{Exit, print_json};
use crate::units::bytes;

/// The point's disk as the NBD server sees it: the async reader, driven from the server's
/// threads on the agent's runtime.
struct Export {
    reader: PointReader,
    runtime: tokio::runtime::Handle,
}

impl ExportSource for Export {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.runtime.block_on(self.reader.read(offset, buf)).map_err(|e| e.to_string())
    }

    fn prefetch(&self, offset: u64, len: u64) {
        let _entered = self.runtime.enter();
        self.reader.prefetch(offset, len);
    }
}

pub async fn run(args: ServeNbdArgs, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault).await?;
    let vm = super::vm_name(&args.vm)?;
    let point = super::point_id(&args.point)?;
    let disk: cairn_format::Name =
        args.disk.parse().with_context(|| format!("--disk {:?}", args.disk))?;
    let manifest = vault.resolve_point(&vm, point.as_ref()).await?;
    let options = ReaderOptions {
        cache_bytes: args.cache_mib << 20,
        read_ahead: args.read_ahead_mib << 20,
        ..ReaderOptions::default()
    };
    let reader = PointReader::open(vault, &manifest, &disk, options).await?;
    let size = reader.size();
    let export =
        Arc::new(Export { reader: reader.clone(), runtime: tokio::runtime::Handle::current() });
    let server = Arc::new(Server::new(disk.as_str(), export));
    // The server runs on threads of its own; its end (accepting failed) stops the command.
    let (ended, serving) = tokio::sync::oneshot::channel::<std::io::Result<()>>();
    let uri = match (&args.socket, args.listen) {
        (Some(path), _) => {
            let listener = bind_private(path)?;
            let server = Arc::clone(&server);
            std::thread::spawn(move || ended.send(server.serve_unix(listener)));
            format!("nbd+unix:///{disk}?socket={}", path.display())
        }
        (None, Some(addr)) => {
            if !addr.ip().is_loopback() {
                bail!(
                    "--listen {addr}: serve-nbd serves only on a unix socket or a loopback \
                     address, since its NBD has no TLS yet; reach it from elsewhere through an \
                     SSH tunnel"
                );
            }
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr}"))?;
            let uri = format!("nbd://{}/{disk}", listener.local_addr()?);
            let server = Arc::clone(&server);
            std::thread::spawn(move || ended.send(server.serve_tcp(listener)));
            uri
        }
        (None, None) => bail!("give --socket PATH or --listen ADDR"),
    };
    if json {
        print_json(&serde_json::json!({
            "vm": vm, "point": manifest.point, "disk": disk, "size": size, "uri": uri,
        }));
    } else {
        println!(
            "serving disk {disk} of VM {vm} at point {} ({}) read-only on {uri}; Ctrl-C stops",
            manifest.point,
            bytes(size)
        );
    }
    std::io::stdout().flush().ok();
    let stopped = tokio::select! {
        why = stop_signal() => Ok(why),
        ended = serving => Err(match ended {
            Ok(Err(e)) => e.to_string(),
            _ => "it stopped".to_owned(),
        }),
    };
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    let stopped = stopped.map_err(|e| anyhow::anyhow!("the NBD server on {uri} failed: {e}"))?;
    let stats = reader.stats();
    tracing::info!(
        chunks = stats.chunks_fetched,
        bytes = stats.bytes_fetched,
        cache_hits = stats.cache_hits,
        "stopped ({stopped})"
    );
    eprintln!(
        "served {uri}: {} chunks fetched ({}), {} reads from the cache",
        stats.chunks_fetched,
        bytes(stats.bytes_fetched),
        stats.cache_hits
    );
    Ok(Exit::Ok)
}

/// Binds a unix socket at `path` (which must not exist), readable and writable by this user
/// alone: whoever can connect can read the disk.
fn bind_private(path: &std::path::Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::symlink_metadata(path).is_ok() {
        bail!(
            "--socket {}: something is there already; remove it or choose another path",
            path.display()
        );
    }
    // Made with no permission for others from the start, then opened to this user.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))?;
    Ok(listener)
}

/// Waits for Ctrl-C or SIGTERM; says which.
async fn stop_signal() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "interrupted";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}
