//! The qemu tools Cairn drives: `qemu-nbd` to serve an image on a unix socket, `qemu-img` to
//! read an image's description and to add and remove its persistent dirty bitmaps. Every call
//! names the image's format: qemu never guesses it from bytes a guest may have written.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// How long `qemu-nbd` may take to open an image and listen.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A persistent dirty bitmap stored in a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// qemu's flags: `auto` (enabled: it records writes), `in-use` (the image was open for
    /// writing and not closed cleanly: the bitmap may have missed writes).
    #[serde(default)]
    pub flags: Vec<String>,
}

impl Bitmap {
    /// Whether it records writes.
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
    /// Whether qemu marks it inconsistent.
    pub fn in_use(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
}

/// What `qemu-img info` says about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// `qcow2`, `raw`, ...
    pub format: String,
    /// The disk's size as the guest sees it.
    pub virtual_size: u64,
    /// Persistent dirty bitmaps (qcow2 only).
    pub bitmaps: Vec<Bitmap>,
}

/// Parses `qemu-img info --output=json`.
pub fn parse_info(json: &[u8]) -> Result<ImageInfo, Error> {
    #[derive(serde::Deserialize)]
    struct Raw {
        format: String,
        #[serde(rename = "virtual-size")]
        virtual_size: u64,
        #[serde(rename = "format-specific")]
        specific: Option<Specific>,
    }
    #[derive(serde::Deserialize)]
    struct Specific {
        data: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        #[serde(default)]
        bitmaps: Vec<Bitmap>,
    }
    let raw: Raw = serde_json::from_slice(json).map_err(|e| Error::Qemu {
        tool: "qemu-img",
        detail: format!("info printed JSON Cairn cannot read: {e}"),
    })?;
    let bitmaps = raw.specific.and_then(|s| s.data).map(|d| d.bitmaps).unwrap_or_default();
    Ok(ImageInfo { format: raw.format, virtual_size: raw.virtual_size, bitmaps })
}

/// Runs `qemu-img ARGS IMAGE TAIL`, returning its standard output.
fn qemu_img(args: &[&str], image: &Path, tail: &[&str]) -> Result<Vec<u8>, Error> {
    let out = Command::new("qemu-img").args(args).arg(image).args(tail).output().map_err(|e| {
        Error::Qemu {
            tool: "qemu-img",
            detail: format!("cannot be run ({e}); install it (Debian: qemu-utils)"),
        }
    })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let hint = if msg.contains("lock") {
            "; the image is open in a running QEMU: Cairn reads qcow2 images only while no QEMU writes them"
        } else {
            ""
        };
        return Err(Error::Qemu {
            tool: "qemu-img",
            detail: format!("{} failed on {}: {msg}{hint}", args.join(" "), image.display()),
        });
    }
    Ok(out.stdout)
}

/// Describes qcow2 `image` (the format is given, never probed).
pub fn image_info(image: &Path) -> Result<ImageInfo, Error> {
    parse_info(&qemu_img(&["info", "-f", "qcow2", "--output=json"], image, &[])?)
}

/// Adds an enabled persistent bitmap `name` of `granularity` bytes per bit to qcow2 `image`.
pub fn add_bitmap(image: &Path, name: &str, granularity: u64) -> Result<(), Error> {
    let g = granularity.to_string();
    qemu_img(&["bitmap", "--add", "-g", &g, "-f", "qcow2"], image, &[name]).map(drop)
}

/// Removes bitmap `name` from qcow2 `image`.
pub fn remove_bitmap(image: &Path, name: &str) -> Result<(), Error> {
    qemu_img(&["bitmap", "--remove", "-f", "qcow2"], image, &[name]).map(drop)
}

/// A `qemu-nbd` serving one image read-only on a private unix socket; stopped on drop.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl QemuNbd {
    /// Serves `image` (of `format`) read-only, exporting dirty bitmap `bitmap` if given.
    pub fn serve(image: &Path, format: &str, bitmap: Option<&str>) -> Result<QemuNbd, Error> {
        let dir =
            tempfile::Builder::new().prefix("cairn-nbd-").tempdir().map_err(|e| Error::Qemu {
                tool: "qemu-nbd",
                detail: format!("cannot make a folder for its socket: {e}"),
            })?;
        let socket = dir.path().join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--read-only")
            .arg(format!("--format={format}"))
            .arg(format!("--socket={}", socket.display()))
            .arg("--shared=1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(b) = bitmap {
            cmd.arg(format!("--bitmap={b}"));
        }
        cmd.arg(image);
        let child = cmd.spawn().map_err(|e| Error::Qemu {
            tool: "qemu-nbd",
            detail: format!("cannot be run ({e}); install it (Debian: qemu-utils)"),
        })?;
        let mut server = QemuNbd { child, socket, _dir: dir };
        server.wait_listening(image)?;
        Ok(server)
    }

    /// The socket to connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn wait_listening(&mut self, image: &Path) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut msg = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut msg);
                }
                return Err(Error::Qemu {
                    tool: "qemu-nbd",
                    detail: format!(
                        "could not serve {} ({status}): {}",
                        image.display(),
                        msg.trim()
                    ),
                });
            }
            if self.socket.exists() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(Error::Qemu {
                    tool: "qemu-nbd",
                    detail: format!(
                        "did not listen within {START_TIMEOUT:?} for {}",
                        image.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SIGTERM lets qemu-nbd close the image cleanly; it exits at once on a read-only image
        // once it runs. One that does not (a signal caught while it was still starting) is
        // killed after a grace time: a drop never waits without bound.
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let started = Instant::now();
        while started.elapsed() < STOP_GRACE {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a stopped qemu-nbd may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qemu_img_info() {
        let json = br#"{"virtual-size": 67108864, "filename": "d.qcow2", "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
            "bitmaps": [{"flags": ["in-use", "auto"], "name": "b1", "granularity": 65536}],
            "corrupt": false}}}"#;
        let info = parse_info(json).unwrap();
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.bitmaps.len(), 1);
        assert!(info.bitmaps[0].in_use() && info.bitmaps[0].enabled());
        let raw = br#"{"virtual-size": 512, "format": "raw"}"#;
        assert!(parse_info(raw).unwrap().bitmaps.is_empty());
        assert!(parse_info(b"not json").is_err());
    }
}
