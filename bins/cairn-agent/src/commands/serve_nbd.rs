//! `cairn-agent serve-nbd`: a point's disk exported read-only over NBD, read from the vault
//! as clients read it (an instant restore).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use cairn_backup::PointReader;
use cairn_format::{BootReads, Change, Name};
use cairn_nbd::server::Server;

use crate::cli::ServeNbdArgs;
use crate::output::{Exit, print_json};
use crate::units::bytes;

pub async fn run(args: ServeNbdArgs, json: bool) -> anyhow::Result<Exit> {
    // Checked before the vault is opened: a bad certificate is said at once.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_config(cert, key)?),
        _ => None,
    };
    let opened = super::point_disk::PointDisk::open(&args.disk, args.read_ahead_mib).await?;
    let (manifest, disk, reader) = (&opened.manifest, &opened.name, &opened.reader);
    let vm = &manifest.vm;
    let size = reader.size();
    if args.record_reads {
        reader.record_first_reads(RECORDED_BLOCKS);
    }
    let export = Arc::new(opened.blocking());
    // The server runs on threads of its own; its end (accepting failed) stops the command.
    let (ended, serving) = tokio::sync::oneshot::channel::<std::io::Result<()>>();
    let mut bound = None;
    // The URI, and how it is shown in the log: a TCP export's name is its only key.
    let (uri, shown) = match (&args.socket, args.listen) {
        (Some(path), _) => {
            let (listener, identity) = bind_private(path)?;
            bound = Some(identity);
            let server = Arc::new(Server::new(disk.as_str(), export));
            std::thread::spawn(move || ended.send(server.serve_unix(listener)));
            let uri =
                format!("nbd+unix:///{disk}?socket={}", uri_escape(&path.display().to_string()));
            (uri.clone(), uri)
        }
        (None, Some(addr)) => {
            if !addr.ip().is_loopback() && tls.is_none() {
                bail!(
                    "--listen {addr}: an export on an address other hosts reach is served over \
                     TLS only: give --tls-cert and --tls-key (or serve on a loopback address or \
                     a unix socket)"
                );
            }
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("listening on {addr}"))?;
            // Anyone on the host can connect to a loopback port: the export's name carries a
            // random part, and only that exact name reaches it.
            let secret: [u8; 16] = rand::RngExt::random(&mut rand::rng());
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            let name = format!("{disk}-{hex}");
            let scheme = if tls.is_some() { "nbds" } else { "nbd" };
            let local = listener.local_addr()?;
            // A wildcard address is no address to connect to: the host's name is.
            let host = if local.ip().is_unspecified() {
                format!("{}:{}", rustix::system::uname().nodename().to_string_lossy(), local.port())
            } else {
                local.to_string()
            };
            let uri = format!("{scheme}://{host}/{name}");
            let shown = format!("{scheme}://{host}/{disk}-...");
            let mut server = Server::new(&name, export).private();
            if let Some(config) = tls {
                server = server.with_tls(config);
            }
            let server = Arc::new(server);
            std::thread::spawn(move || ended.send(server.serve_tcp(listener)));
            (uri, shown)
        }
        (None, None) => bail!("give --socket PATH or --listen ADDR"),
    };
    // Before the line that tells clients (and scripts) it serves: a stop from then on is heard.
    let stop = super::stop_signal();
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
    if !args.no_prefetch {
        // In the background: the first reads are answered meanwhile, as without it.
        let (vault, reader, vm) = (opened.vault.clone(), reader.clone(), vm.clone());
        tokio::spawn(async move { prefetch_boot_reads(&vault, &reader, &vm).await });
    }
    let stopped = tokio::select! {
        why = stop => Ok(why),
        ended = serving => Err(match ended {
            Ok(Err(e)) => e.to_string(),
            _ => "it stopped".to_owned(),
        }),
    };
    if let (Some(path), Some(identity)) = (&args.socket, bound) {
        // Only the socket we made: something put there since is not ours to remove.
        if socket_identity(path) == Some(identity) {
            let _ = std::fs::remove_file(path);
        }
    }
    if args.record_reads {
        let blocks = reader.first_reads();
        let reads = BootReads::of(jiff::Timestamp::now(), reader.block_size(), &blocks);
        let noted = opened
            .vault
            .write_note(vm, &manifest.point, "serve-nbd", &[Change::BootReads(reads)])
            .await;
        match noted {
            Ok(_) => eprintln!(
                "noted on point {}: the {} blocks clients read first, for later exports to \
                 prefetch",
                manifest.point,
                blocks.len()
            ),
            Err(e) => eprintln!("the blocks read first could not be noted on the point: {e}"),
        }
    }
    let stopped = stopped.map_err(|e| anyhow::anyhow!("the NBD server on {shown} failed: {e}"))?;
    let stats = reader.stats();
    tracing::info!(
        chunks = stats.chunks_fetched,
        bytes = stats.bytes_fetched,
        cache_hits = stats.cache_hits,
        "stopped ({stopped})"
    );
    let (indexes, all) = opened.vault.pack_indexes_loaded();
    eprintln!(
        "served {shown}: {} chunks fetched ({}), {} reads from the cache; pack indexes loaded: \
         {indexes} ({})",
        stats.chunks_fetched,
        bytes(stats.bytes_fetched),
        stats.cache_hits,
        if all { "all of the vault's" } else { "only this point's and its VM's" }
    );
    Ok(Exit::Ok)
}

/// The TLS configuration of an export: the PEM certificate chain `cert` and its key `key`.
fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        bail!("--tls-cert {}: it holds no PEM certificate", cert.display());
    }
    use std::os::unix::fs::MetadataExt;
    let mode =
        std::fs::metadata(key).with_context(|| format!("--tls-key {}", key.display()))?.mode();
    if mode & 0o077 != 0 {
        bail!(
            "--tls-key {}: others may read it (mode {:o}): chmod 600 it, and consider the key \
             seen",
            key.display(),
            mode & 0o777
        );
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("--tls-cert and --tls-key do not go together")?;
    Ok(Arc::new(config))
}

/// Blocks noted with `--record-reads` at most (4 GiB of 64 KiB blocks).
const RECORDED_BLOCKS: usize = 65_536;

/// Fetches the blocks a guest read first when it last booted from an export of this VM (the
/// newest such note on any of its points), if they were counted in this point's block size.
async fn prefetch_boot_reads(vault: &cairn_vault::Vault, reader: &PointReader, vm: &Name) {
    let states = match vault.point_states(Some(vm)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no prefetch: the VM's point notes cannot be read: {e}");
            return;
        }
    };
    let newest = states
        .states
        .iter()
        .filter_map(|((_, point), s)| Some((point, s.boot_reads.as_ref()?)))
        .filter(|(_, r)| r.block_size == reader.block_size())
        .max_by_key(|(_, r)| r.at);
    let Some((point, reads)) = newest else { return };
    let blocks = reads.blocks(u64::MAX, RECORDED_BLOCKS);
    let fetched = reader.prefetch(&blocks).await;
    eprintln!("prefetched {fetched} blocks a guest read first at boot (as noted on point {point})");
}

/// Binds a unix socket at `path`, readable and writable by this user alone (whoever can
/// connect can read the disk), in a folder no one else may change (no one can swap the
/// socket for theirs). A socket left by a killed server (nothing answers on it) is replaced;
/// anything else there is refused. Returns the listener and the socket's identity.
fn bind_private(
    path: &std::path::Path,
) -> anyhow::Result<(std::os::unix::net::UnixListener, (u64, u64))> {
    use std::os::unix::fs::FileTypeExt;
    cairn_snapshot::trusted::check_folders(path)
        .with_context(|| format!("--socket {}", path.display()))?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let refused = std::os::unix::net::UnixStream::connect(path)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
        if !(meta.file_type().is_socket() && refused) {
            bail!(
                "--socket {}: something is there already (another server?); remove it or \
                 choose another path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // Made with no permission for others from the start (bind never follows a link).
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("listening on {}", path.display()))?;
    let identity = socket_identity(path).context("the socket vanished")?;
    Ok((listener, identity))
}

/// The device and inode of the socket at `path`.
fn socket_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// `s` with what a URI's query cannot hold as is percent-encoded.
fn uri_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'_' | b'-' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
