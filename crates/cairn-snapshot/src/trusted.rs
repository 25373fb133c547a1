//! Files the agent reads or runs as root: checked once, then used only through the descriptor
//! that was checked.
//!
//! A script or configuration that someone else could change between the check and the use is
//! theirs to run as root. So a trusted file is opened, not just looked at: its path is
//! resolved to the real one, every folder from the file up to `/` must be safe (owned by root
//! or the agent's user, and writable by nobody else, except a root-owned sticky folder such as
//! `/tmp`, as sshd allows), and the open file itself must be a regular file owned by the
//! agent's user with exactly the required mode. What is read or executed afterwards is that
//! open file (`/proc/self/fd/N` for a script), whatever its name points to by then.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

/// A file opened and checked, to be read or run through its descriptor.
#[derive(Debug)]
pub struct TrustedFile {
    file: File,
    /// The path it was opened by, as given (for messages).
    path: PathBuf,
    /// Where it really is (links resolved): what relative paths inside it are relative to.
    real: PathBuf,
}

impl TrustedFile {
    /// Opens `path` and checks it and its folders; the file's permission bits must be exactly
    /// `mode`, its owner the user the agent runs as.
    pub fn open(path: &Path, mode: u32) -> Result<TrustedFile, Error> {
        let owner = rustix::process::geteuid().as_raw();
        let real = path.canonicalize().map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                "it does not exist"
            } else {
                "cannot read it"
            };
            Error::io(format!("{}: {what}", path.display()), e)
        })?;
        for folder in real.ancestors().skip(1) {
            check_folder(path, folder, owner)?;
        }
        // A link is judged where it leads, and where it lies: whoever may write the folder of
        // the name given may point it elsewhere.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            check_folders_of(path, owner)?;
        }
        let file =
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(
                    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32
                )
                .open(&real)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("reading the mode of {}", path.display()), e))?;
        check_file(path, &meta, mode, owner)?;
        Ok(TrustedFile { file, path: path.to_path_buf(), real })
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its real path, links resolved.
    pub fn real_path(&self) -> &Path {
        &self.real
    }

    /// Its whole content, read from the checked descriptor.
    pub fn read_to_string(&self) -> Result<String, Error> {
        let mut text = String::new();
        let mut file = &self.file;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_string(&mut text))
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
        Ok(text)
    }

    /// The descriptor, for running the file as a program (`/proc/self/fd/N`).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Checks that nobody but root and the agent's user may change what `path` names: every folder
/// that holds it, up to `/`, links resolved (see [`check_folder`]). For a link the agent is
/// about to follow, or a folder it is about to write into.
pub fn check_folders(path: &Path) -> Result<(), Error> {
    check_folders_of(path, rustix::process::geteuid().as_raw())
}

fn check_folders_of(path: &Path, owner: u32) -> Result<(), Error> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let real = parent
        .canonicalize()
        .map_err(|e| Error::io(format!("{}: cannot resolve its folder", path.display()), e))?;
    for folder in real.ancestors() {
        check_folder(path, folder, owner)?;
    }
    Ok(())
}

/// How to name the agent's user in fixes.
fn who(owner: u32) -> String {
    if owner == 0 { "root:root".into() } else { owner.to_string() }
}

/// A folder above a trusted file: owned by root or the agent's user, and writable by nobody
/// else, unless it is root's and sticky (nobody may then replace another's files in it).
fn check_folder(file: &Path, folder: &Path, owner: u32) -> Result<(), Error> {
    let meta = std::fs::symlink_metadata(folder).map_err(|e| {
        Error::io(format!("{}: cannot read its folder {}", file.display(), folder.display()), e)
    })?;
    let mode = meta.mode() & 0o7777;
    let foreign = meta.uid() != owner && meta.uid() != 0;
    let open = mode & 0o022 != 0 && !(mode & 0o1000 != 0 && meta.uid() == 0);
    if !foreign && !open {
        return Ok(());
    }
    let fix = if foreign {
        format!("chown {} {}", who(owner), folder.display())
    } else {
        format!("chmod go-w {}", folder.display())
    };
    Err(Error::Permissions {
        path: file.to_path_buf(),
        problem: format!(
            "its folder {} may be written by others (mode {mode:o}, uid {}), who could replace it",
            folder.display(),
            meta.uid()
        ),
        fix,
    })
}

/// The file itself: regular, owned by the agent's user, permission bits exactly `mode`.
fn check_file(path: &Path, meta: &std::fs::Metadata, mode: u32, owner: u32) -> Result<(), Error> {
    let refuse =
        |problem: String, fix: String| Error::Permissions { path: path.into(), problem, fix };
    if !meta.is_file() {
        return Err(refuse("it is not a regular file".into(), format!("ls -l {}", path.display())));
    }
    if meta.uid() != owner {
        let user = if owner == 0 { "root".to_string() } else { format!("uid {owner}") };
        return Err(refuse(
            format!("it is owned by uid {}, not {user} (the agent's user)", meta.uid()),
            format!("chown {} {}", who(owner), path.display()),
        ));
    }
    let actual = meta.mode() & 0o7777;
    if actual != mode {
        return Err(refuse(
            format!("its mode is {actual:o}, it must be {mode:o}"),
            format!("chmod {mode:o} {}", path.display()),
        ));
    }
    Ok(())
}
