//! Reading a vault's secret from a file: a key file (32 random bytes as 64 hex digits, or a
//! recovery key printed in groups) or a passphrase file (its first line, as restic reads a
//! password file). Agents and the coordinator read their vaults' secrets the same way.

use std::path::Path;

use zeroize::Zeroizing;

use crate::{Credential, Error};

/// The largest key or passphrase file read.
const MAX_SECRET_FILE: u64 = 4096;

impl Credential {
    /// The credential a key file or a passphrase file holds (`None` if neither is given; the
    /// key file wins when both are).
    pub fn from_files(
        key_file: Option<&Path>,
        passphrase_file: Option<&Path>,
    ) -> Result<Option<Credential>, Error> {
        if let Some(path) = key_file {
            return Ok(Some(Credential::KeyFile(read_key_file(path)?)));
        }
        if let Some(path) = passphrase_file {
            let text = read_secret_file(path)?;
            let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            return Ok(Some(Credential::Passphrase(Zeroizing::new(line.to_vec()))));
        }
        Ok(None)
    }
}

/// A key file's secret: its bytes without trailing whitespace; a recovery key's groups are
/// joined (dashes dropped).
pub fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    let text = read_secret_file(path)?;
    let joined: Vec<u8> = text.iter().copied().filter(|b| *b != b'-').collect();
    if joined.len() == 64 && joined.iter().all(u8::is_ascii_hexdigit) {
        return Ok(Zeroizing::new(joined.to_ascii_lowercase()));
    }
    Ok(text)
}

/// A secret file's bytes, trailing whitespace dropped: a regular file, at most 4 KiB.
fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    use std::io::Read;
    let bad = |reason: String| Error::SecretFile { path: path.display().to_string(), reason };
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot be opened: {e}")))?;
    let meta = file.metadata().map_err(|e| bad(format!("cannot be read: {e}")))?;
    if !meta.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    warn_if_readable(path, &meta);
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(bad(format!("is larger than {MAX_SECRET_FILE} bytes: not a key file")));
    }
    while bytes.last().is_some_and(u8::is_ascii_whitespace) {
        bytes.pop();
    }
    Ok(bytes)
}

fn warn_if_readable(path: &Path, meta: &std::fs::Metadata) {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            "key file {} has mode {mode:o}: other users may read the vault's key; `chmod 600` it",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_passphrase_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "ABCD-".repeat(16).trim_end_matches('-').to_owned() + "\n").unwrap();
        let Some(Credential::KeyFile(k)) = Credential::from_files(Some(&key), None).unwrap() else {
            panic!("a key file is a key")
        };
        assert_eq!(&k[..], "abcd".repeat(16).as_bytes());
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "secret words\r\nsecond line\n").unwrap();
        let Some(Credential::Passphrase(p)) = Credential::from_files(None, Some(&pass)).unwrap()
        else {
            panic!("a passphrase file is a passphrase")
        };
        assert_eq!(&p[..], b"secret words");
        assert!(Credential::from_files(None, None).unwrap().is_none());
        let e = Credential::from_files(Some(dir.path()), None).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Credential::from_files(Some(&dir.path().join("none")), None).unwrap_err();
        assert!(e.to_string().contains("cannot be opened"), "{e}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 5000]).unwrap();
        let e = Credential::from_files(Some(&big), None).unwrap_err().to_string();
        assert!(e.contains("larger than 4096"), "{e}");
    }
}
