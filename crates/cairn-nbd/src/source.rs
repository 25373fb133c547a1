//! An NBD export as a block source.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

use cairn_delta::{BlockSource, ChangeTracking, Extent};

use crate::qemu::QemuNbd;
use crate::{Client, Error, Previous, proto};

const ALLOCATION: &str = "base:allocation";

/// A disk read over NBD. Its allocation comes from `base:allocation`; with a usable previous
/// bitmap, its dirty ranges come from `qemu:dirty-bitmap:NAME`, read once at open (before the
/// engine reads any data, and bounded by the number of dirty runs, not the disk size).
pub struct NbdSource {
    client: Mutex<Client<BufReader<UnixStream>, UnixStream>>,
    name: String,
    size: u64,
    tracking: ChangeTracking,
    // Declared after the client, so the connection closes before the server stops.
    _server: Option<QemuNbd>,
}

impl NbdSource {
    /// Serves `image` (of `format`, such as `qcow2`) with `qemu-nbd`, read-only, and connects.
    /// With `previous`, the dirty ranges of its bitmap become the source's change tracking.
    pub fn serve(image: &Path, format: &str, previous: Option<&Previous>) -> Result<Self, Error> {
        let bitmap = match previous {
            Some(Previous::Bitmap { name, .. }) => Some(name.as_str()),
            _ => None,
        };
        let server = QemuNbd::serve(image, format, bitmap)?;
        // qemu-nbd creates its socket (bind) a moment before it listens: a connection refused
        // then is tried again, for as long as the server may take to start.
        let started = std::time::Instant::now();
        let mut source = loop {
            match NbdSource::connect(server.socket(), "", image.display().to_string(), previous) {
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused
                        && started.elapsed() < crate::qemu::START_TIMEOUT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                result => break result?,
            }
        };
        source._server = Some(server);
        Ok(source)
    }

    /// Connects to export `export` on unix socket `socket`; `name` describes the disk in errors.
    /// A `Previous::Bitmap` must be exported by the server.
    pub fn connect(
        socket: &Path,
        export: &str,
        name: String,
        previous: Option<&Previous>,
    ) -> Result<Self, Error> {
        let mut contexts = vec![ALLOCATION.to_owned()];
        if let Some(Previous::Bitmap { name, .. }) = previous {
            contexts.push(format!("qemu:dirty-bitmap:{name}"));
        }
        let mut client = Client::connect_unix(socket, export, &contexts)?;
        let size = client.export().size;
        let tracking = match previous {
            None => ChangeTracking::NotTracked,
            Some(Previous::Unusable(why)) => ChangeTracking::Unusable(why.clone()),
            Some(Previous::Bitmap { name: bitmap, since, granularity }) => {
                let dirty = client
                    .block_status(&contexts[1], 0, size)?
                    .into_iter()
                    .filter(|e| e.flags & proto::STATE_DIRTY != 0)
                    .map(|e| Extent { offset: e.offset, len: e.len })
                    .collect();
                ChangeTracking::Since {
                    since: since.clone(),
                    dirty,
                    tracker: format!("dirty bitmap {bitmap} ({granularity}-byte granules)"),
                }
            }
        };
        Ok(NbdSource { client: Mutex::new(client), name, size, tracking, _server: None })
    }

    fn with_client<T>(
        &self,
        offset: u64,
        f: impl FnOnce(&mut Client<BufReader<UnixStream>, UnixStream>) -> Result<T, Error>,
    ) -> Result<T, cairn_delta::Error> {
        let read_err = |e: Error| cairn_delta::Error::Read {
            disk: self.name.clone(),
            offset,
            source: std::io::Error::other(e),
        };
        let mut client = self
            .client
            .lock()
            .map_err(|_| read_err(Error::Protocol("an earlier read panicked".into())))?;
        f(&mut client).map_err(read_err)
    }
}

impl BlockSource for NbdSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), cairn_delta::Error> {
        self.with_client(offset, |c| c.read(offset, buf))
    }

    /// Ranges that may hold data: neither holes nor known to read as zeros.
    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<Extent>, cairn_delta::Error> {
        let status = self.with_client(offset, |c| c.block_status(ALLOCATION, offset, len))?;
        Ok(status
            .into_iter()
            .filter(|e| e.flags & proto::STATE_ZERO == 0)
            .map(|e| Extent { offset: e.offset, len: e.len })
            .collect())
    }

    fn change_tracking(&self) -> ChangeTracking {
        self.tracking.clone()
    }
}
