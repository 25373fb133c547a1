//! The qcow2 header, read by Cairn itself before any qemu tool opens an image.
//!
//! An image declared qcow2 is checked here first: what it would make qemu open besides
//! itself. A backing file is refused unless the operator allows it (and then its format must
//! be recorded in the image, so qemu never probes it, and its own header is checked the same
//! way); a `json:` backing name, which can describe any block driver, and an external data
//! file are refused always; so is an encrypted image. The decoder is fuzzed: an image is as
//! hostile as whoever made it.
//!
//! Layout (big-endian; qemu's `docs/interop/qcow2.txt`): magic `QFI\xfb`, version (2 or 3),
//! backing file offset u64 and size u32, cluster bits, virtual size u64, crypt method u32,
//! ...; version 3 adds incompatible, compatible and autoclear feature bits at 72, 80 and 88,
//! and the header length at 100. Header extensions follow the header (at 72 in version 2):
//! type u32, length u32, data padded to 8 bytes, until type 0.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::Error;

/// The first bytes of a qcow2 image.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension: the name of an external data file.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Incompatible feature bit: the image's data lives in an external data file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Bytes read from an image to decode its header: the largest cluster, which holds the
/// header, its extensions and the backing file name.
const HEADER_READ: u64 = 2 << 20;
/// Longest backing file name qemu accepts.
const MAX_BACKING_NAME: u32 = 1023;
/// Longest backing chain followed.
const MAX_CHAIN: usize = 16;

/// What a qcow2 header says about the files an image needs besides itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// The disk's size as the guest sees it.
    pub virtual_size: u64,
    /// The backing file's name, as stored.
    pub backing_file: Option<String>,
    /// The backing file's format, when the image records it.
    pub backing_format: Option<String>,
    /// The external data file's name, or `Some("")` when only the feature bit says so.
    pub data_file: Option<String>,
    /// The image is encrypted (qcow2's own AES or LUKS).
    pub encrypted: bool,
}

/// Whether `bytes` start like a qcow2 image (its magic). Used only to warn: a disk's format
/// is what the operator declared.
pub fn looks_like_qcow2(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

fn bad(detail: impl Into<String>) -> Error {
    Error::Image { detail: detail.into() }
}

/// A big-endian reader over the header bytes; every read is bounds-checked.
struct Be<'a>(&'a [u8]);

impl Be<'_> {
    fn slice(&self, at: u64, len: u64) -> Result<&[u8], Error> {
        let end = at.checked_add(len).ok_or_else(|| bad("a header field overflows"))?;
        usize::try_from(at)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(a, e)| self.0.get(a..e))
            .ok_or_else(|| bad(format!("the header is cut short (needs bytes {at}..{end})")))
    }
    fn u32(&self, at: u64) -> Result<u32, Error> {
        let b: [u8; 4] = self.slice(at, 4)?.try_into().map_err(|_| bad("a short field"))?;
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&self, at: u64) -> Result<u64, Error> {
        Ok(u64::from(self.u32(at)?) << 32 | u64::from(self.u32(at + 4)?))
    }
    fn text(&self, at: u64, len: u64, what: &str) -> Result<String, Error> {
        String::from_utf8(self.slice(at, len)?.to_vec())
            .map_err(|_| bad(format!("the {what} is not UTF-8")))
    }
}

/// Decodes a qcow2 header from the first bytes of an image.
pub fn parse_header(bytes: &[u8]) -> Result<Header, Error> {
    let h = Be(bytes);
    if !looks_like_qcow2(bytes) {
        return Err(bad("it does not start with the qcow2 magic: it is not a qcow2 image"));
    }
    let version = h.u32(4)?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!("qcow2 version {version} is not one Cairn knows (2 or 3)")));
    }
    let backing_offset = h.u64(8)?;
    let backing_size = h.u32(16)?;
    let cluster_bits = h.u32(20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!("cluster bits {cluster_bits} out of range")));
    }
    let cluster = 1u64 << cluster_bits;
    let virtual_size = h.u64(24)?;
    let encrypted = h.u32(32)? != 0;
    let (incompatible, header_length) =
        if version == 3 { (h.u64(72)?, u64::from(h.u32(100)?)) } else { (0, 72) };
    if header_length < 72 || header_length > cluster {
        return Err(bad(format!("header length {header_length} out of range")));
    }
    let backing_file = if backing_offset == 0 {
        None
    } else {
        if backing_size == 0 || backing_size > MAX_BACKING_NAME {
            return Err(bad(format!("backing file name of {backing_size} bytes")));
        }
        if backing_offset.saturating_add(u64::from(backing_size)) > cluster {
            return Err(bad("the backing file name lies outside the first cluster"));
        }
        Some(h.text(backing_offset, u64::from(backing_size), "backing file name")?)
    };
    let mut header = Header {
        version,
        virtual_size,
        backing_file,
        backing_format: None,
        data_file: (incompatible & INCOMPAT_DATA_FILE != 0).then(String::new),
        encrypted,
    };
    // Header extensions, right after the header, until the end marker; like qemu, they end
    // where the backing file name starts, or at the end of the first cluster.
    let end = if backing_offset == 0 { cluster } else { backing_offset.min(cluster) };
    let mut at = header_length;
    loop {
        if at + 8 > end {
            // qemu reads no further either: what follows is the backing file name.
            break;
        }
        let kind = h.u32(at)?;
        let len = u64::from(h.u32(at + 4)?);
        if kind == 0 {
            break;
        }
        let data = at + 8;
        if data + len > end {
            return Err(bad(format!("header extension {kind:#x} runs past the header's end")));
        }
        match kind {
            EXT_BACKING_FORMAT => {
                header.backing_format = Some(h.text(data, len, "backing file format")?)
            }
            EXT_DATA_FILE => header.data_file = Some(h.text(data, len, "data file name")?),
            _ => {}
        }
        at = data + len.next_multiple_of(8);
    }
    Ok(header)
}

/// Reads the header of the image at `path`, which must be a regular file or a block device
/// (opened without blocking, so a FIFO planted there cannot hang the agent).
pub fn read_header(path: &Path) -> Result<Header, Error> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let io = |e: std::io::Error| bad(format!("cannot read {}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io)?;
    let kind = file.metadata().map_err(io)?.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(bad(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    file.take(HEADER_READ).read_to_end(&mut bytes).map_err(io)?;
    parse_header(&bytes).map_err(|e| match e {
        Error::Image { detail } => bad(format!("{}: {detail}", path.display())),
        e => e,
    })
}

/// Checks that the qcow2 image at `path` makes qemu open nothing it should not: no external
/// data file, no `json:` backing name, no encryption, and a backing file only when
/// `allow_backing` (then recorded with its format, and checked in turn along the chain).
/// Returns the image's header.
pub fn check_image(path: &Path, allow_backing: bool) -> Result<Header, Error> {
    let first = read_header(path)?;
    let mut header = first.clone();
    let mut image = path.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let refuse = |why: String| bad(format!("{}: {why}", image.display()));
        if let Some(data) = &header.data_file {
            return Err(refuse(format!(
                "it keeps its data in an external data file ({data:?}); Cairn refuses such \
                 images: convert it with `qemu-img convert -O qcow2`"
            )));
        }
        if header.encrypted {
            return Err(refuse(
                "it is encrypted, which Cairn cannot read: convert it to an unencrypted image \
                 with `qemu-img convert -O qcow2`"
                    .into(),
            ));
        }
        let Some(backing) = &header.backing_file else { return Ok(first) };
        if backing.starts_with("json:") {
            return Err(refuse(format!(
                "its backing file is a json: description ({backing:?}), which can name any \
                 block device or protocol; Cairn refuses it always: flatten the image with \
                 `qemu-img convert -O qcow2`"
            )));
        }
        if names_a_protocol(backing) {
            return Err(refuse(format!(
                "its backing file {backing:?} names a protocol (nbd:, http:, ssh:, file:, ...), \
                 not a file; Cairn refuses it always: flatten the image with `qemu-img convert \
                 -O qcow2`"
            )));
        }
        if !allow_backing {
            return Err(Error::BackingRefused { image: image.clone(), backing: backing.clone() });
        }
        let next = backing_path(&image, backing);
        // A backing file is a file: never a device, a FIFO or anything else qemu could open.
        if !std::fs::metadata(&next).is_ok_and(|m| m.is_file()) {
            return Err(refuse(format!(
                "its backing file {} is not a regular file; Cairn follows regular files only",
                next.display()
            )));
        }
        match header.backing_format.as_deref() {
            Some("raw") => return Ok(first),
            Some("qcow2") => {}
            Some(other) => {
                return Err(refuse(format!(
                    "its backing file {backing} is {other}; Cairn follows raw and qcow2 backing \
                     files only"
                )));
            }
            None => {
                return Err(refuse(format!(
                    "its backing file {backing} has no recorded format, so qemu would guess it \
                     from the file's bytes; record it with `qemu-img rebase -u -F raw|qcow2 -b \
                     {backing} {}`",
                    image.display()
                )));
            }
        }
        header = read_header(&next)?;
        image = next;
    }
    Err(bad(format!("{}: its backing chain is longer than {MAX_CHAIN} images", path.display())))
}

/// Whether qemu would take `name` as a protocol rather than a file: a colon before any slash
/// (qemu's own rule, `path_has_protocol`).
fn names_a_protocol(name: &str) -> bool {
    let head = name.split('/').next().unwrap_or_default();
    head.contains(':')
}

/// Where a backing file name leads, relative to the image that names it.
fn backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    image.parent().unwrap_or(Path::new(".")).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version 3 header with 64 KiB clusters, optional backing file and extensions.
    fn image(backing: Option<&str>, extensions: &[(u32, &[u8])], incompatible: u64) -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[72..80].copy_from_slice(&incompatible.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        let mut at = 112;
        for (kind, data) in extensions {
            b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().next_multiple_of(8);
        }
        if let Some(name) = backing {
            let off = 4096usize;
            b[8..16].copy_from_slice(&(off as u64).to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b[off..off + name.len()].copy_from_slice(name.as_bytes());
        }
        b
    }

    #[test]
    fn reads_backing_files_formats_and_data_files() {
        let h = parse_header(&image(None, &[], 0)).unwrap();
        assert_eq!((h.version, h.virtual_size, h.backing_file), (3, 1 << 30, None));
        let h =
            parse_header(&image(Some("/etc/shadow"), &[(EXT_BACKING_FORMAT, b"raw")], 0)).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("/etc/shadow"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        let h = parse_header(&image(None, &[(EXT_DATA_FILE, b"/dev/sda")], 0)).unwrap();
        assert_eq!(h.data_file.as_deref(), Some("/dev/sda"));
        let h = parse_header(&image(None, &[], INCOMPAT_DATA_FILE)).unwrap();
        assert_eq!(h.data_file.as_deref(), Some(""));
        // Version 2, the backing name right after the 72-byte header: no room for extensions,
        // which end where the name starts (as qemu reads them).
        let mut v2 = vec![0u8; 65536];
        v2[..4].copy_from_slice(MAGIC);
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        v2[8..16].copy_from_slice(&72u64.to_be_bytes());
        v2[16..20].copy_from_slice(&8u32.to_be_bytes());
        v2[20..24].copy_from_slice(&16u32.to_be_bytes());
        v2[72..80].copy_from_slice(b"base.img");
        let h = parse_header(&v2).unwrap();
        assert_eq!((h.version, h.backing_file.as_deref()), (2, Some("base.img")));
        assert!(parse_header(b"RAW DISK").is_err());
        assert!(parse_header(&image(None, &[], 0)[..90]).is_err());
    }

    #[test]
    fn refuses_what_would_open_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: Vec<u8>| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        write("base.raw", vec![0; 4096]);
        let plain = write("plain.qcow2", image(None, &[], 0));
        assert!(check_image(&plain, false).is_ok());
        let backed =
            write("backed.qcow2", image(Some("base.raw"), &[(EXT_BACKING_FORMAT, b"raw")], 0));
        let err = check_image(&backed, false).unwrap_err().to_string();
        assert!(err.contains("has a backing file (base.raw)"), "{err}");
        assert!(check_image(&backed, true).is_ok());
        let json = write("json.qcow2", image(Some("json:{\"driver\":\"file\"}"), &[], 0));
        let err = check_image(&json, true).unwrap_err().to_string();
        assert!(err.contains("json:"), "{err}");
        let data =
            write("data.qcow2", image(None, &[(EXT_DATA_FILE, b"/dev/sda")], INCOMPAT_DATA_FILE));
        let err = check_image(&data, true).unwrap_err().to_string();
        assert!(err.contains("external data file"), "{err}");
        let unformatted = write("guess.qcow2", image(Some("base.raw"), &[], 0));
        let err = check_image(&unformatted, true).unwrap_err().to_string();
        assert!(err.contains("no recorded format"), "{err}");
        // Along the chain: a qcow2 backing file whose own backing is a json: name.
        write("evil.qcow2", image(Some("json:{}"), &[], 0));
        let chained =
            write("top.qcow2", image(Some("evil.qcow2"), &[(EXT_BACKING_FORMAT, b"qcow2")], 0));
        let err = check_image(&chained, true).unwrap_err().to_string();
        assert!(err.contains("evil.qcow2") && err.contains("json:"), "{err}");
        let nbd = write(
            "nbd.qcow2",
            image(Some("nbd+unix:///x?socket=/s"), &[(EXT_BACKING_FORMAT, b"raw")], 0),
        );
        assert!(check_image(&nbd, true).unwrap_err().to_string().contains("names a protocol"));
        let device =
            write("dev.qcow2", image(Some("/dev/null"), &[(EXT_BACKING_FORMAT, b"raw")], 0));
        assert!(check_image(&device, true).unwrap_err().to_string().contains("not a regular file"));
        let looped =
            write("loop.qcow2", image(Some("loop.qcow2"), &[(EXT_BACKING_FORMAT, b"qcow2")], 0));
        assert!(check_image(&looped, true).unwrap_err().to_string().contains("longer than"));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes: Vec<u8>) {
            let _ = parse_header(&bytes);
        }

        #[test]
        fn mutated_headers_never_panic(pos in 0usize..256, byte: u8, cut in 0usize..65536) {
            let mut b = image(Some("base.qcow2"), &[(EXT_BACKING_FORMAT, b"qcow2"), (EXT_DATA_FILE, b"x")], 0);
            b[pos] = byte;
            let _ = parse_header(&b);
            b.truncate(cut);
            let _ = parse_header(&b);
        }
    }
}
