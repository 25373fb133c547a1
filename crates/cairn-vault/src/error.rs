//! The vault's errors. Each says which object or URL is involved and what to do next.

use cairn_format::{Digest, Name, PointId};

/// What went wrong in the vault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// There is no vault at this URL.
    #[error("no Cairn vault at {url}: create one there first")]
    NoVault {
        /// The URL.
        url: String,
    },
    /// `init` on a URL that already holds a vault.
    #[error("a Cairn vault already exists at {url}; use it, or choose another location")]
    AlreadyExists {
        /// The URL.
        url: String,
    },
    /// The URL cannot name a vault.
    #[error("cannot use {url:?} as a vault: {detail}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// The storage under the vault is full. Nothing was committed; earlier points are intact.
    #[error(
        "the vault's storage is full (writing {path}): free space or move the vault, then run the \
         backup again; no recovery point was committed and earlier points are intact"
    )]
    StorageFull {
        /// The object being written.
        path: String,
    },
    /// The object store failed.
    #[error("vault storage failed to {op} {path}: {source}")]
    Storage {
        /// What was attempted.
        op: &'static str,
        /// The object.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A local I/O operation on the vault failed (sync, folder creation).
    #[error("vault I/O on {path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Writing back to a local vault's disk failed while a job ran: some of its writes may be
    /// lost, so it must not commit.
    #[error(
        "the vault's file system at {path} failed to write back data ({failures} failed \
         flush(es), last: {last}); no recovery point was committed and earlier points are \
         intact; check the disk (dmesg) and run the backup again"
    )]
    WriteBack {
        /// The vault's root.
        path: String,
        /// Failed flushes since the job began.
        failures: u64,
        /// The last failure.
        last: String,
    },
    /// An object is damaged.
    #[error("vault object {path} is damaged: {source}; verify the vault to find what it affects")]
    Corrupt {
        /// The object.
        path: String,
        /// What is wrong.
        #[source]
        source: cairn_format::Error,
    },
    /// A chunk a point needs is missing.
    #[error("chunk {id} is missing from the vault; verify the vault to find the damaged points")]
    ChunkMissing {
        /// The chunk.
        id: Digest,
    },
    /// A chunk's pack ends before the chunk does.
    #[error("chunk {id} is truncated in pack {pack}; verify the vault to find the damaged points")]
    ChunkTruncated {
        /// The chunk.
        id: Digest,
        /// The pack that should hold it.
        pack: Digest,
    },
    /// A point was committed while some of its pack writers had not finished.
    #[error("{writers} pack writer(s) of this backup never finished; the point cannot commit")]
    Unfinished {
        /// How many.
        writers: usize,
    },
    /// Another writer created the same object first: two backups chose the same point id, or
    /// two commits raced. Nothing of this job was committed.
    #[error(
        "another writer created {path} first (two backups with the same point id, or a \
         concurrent commit); this job committed nothing: run it again"
    )]
    Concurrent {
        /// The object.
        path: String,
    },
    /// The vault is encrypted and no key was given.
    #[error(
        "vault {url} is encrypted: give its key with --key-file PATH, --passphrase-file PATH \
         or the CAIRN_PASSPHRASE variable"
    )]
    KeyRequired {
        /// The URL.
        url: String,
    },
    /// A key was given for a vault whose config says it is not encrypted: a plaintext config
    /// where an encrypted vault was expected may be a downgrade by whoever holds the storage.
    #[error(
        "vault {url} is not encrypted, but a key was given: Cairn will not write plaintext into \
         a vault expected to be encrypted (its config.json may have been replaced). If the vault \
         was made with --no-encryption, open it without a key"
    )]
    UnexpectedPlaintext {
        /// The URL.
        url: String,
    },
    /// An object is larger than its kind ever is.
    #[error(
        "vault object {path} is {size} bytes, more than a {what} can be ({max}); it is not Cairn's"
    )]
    TooLarge {
        /// The object.
        path: String,
        /// What it should be.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The most it may be.
        max: u64,
    },
    /// The object store does not honour create-only writes.
    #[error(
        "the object store at {url} overwrote an object a create-only write should have refused \
         (it ignores If-None-Match): Cairn cannot commit safely there; use a store that supports \
         conditional writes"
    )]
    NoCreateOnly {
        /// The URL.
        url: String,
    },
    /// The key given opens no key slot.
    #[error("wrong key for vault {url}: {detail}; check the passphrase or key file")]
    WrongKey {
        /// The URL.
        url: String,
        /// What was tried.
        detail: String,
    },
    /// A key slot opened to a key that does not check the config: the slot was planted, or
    /// the config was altered.
    #[error(
        "key slot {slot} of vault {url} opens, but its key does not check the vault's config: \
         the config was altered, or the slot planted; nothing was read or written. If another \
         key opens the vault, remove this slot with it; if none does, config.json itself was \
         changed: put back a copy of it"
    )]
    KeyMismatch {
        /// The URL.
        url: String,
        /// The slot.
        slot: String,
    },
    /// A key operation on a vault that is not encrypted.
    #[error("vault {url} is not encrypted: it has no keys to manage")]
    NotEncrypted {
        /// The URL.
        url: String,
    },
    /// No key slot has this id.
    #[error("the vault has no key slot {id}; `cairn-agent key list` shows them")]
    NoSuchKey {
        /// The id asked for.
        id: String,
    },
    /// The slot that opened the vault (or the last one) cannot be removed.
    #[error(
        "key slot {id} is the one this vault was opened with, or its last: open the vault with \
         another key to remove it (add one first if there is none)"
    )]
    LastKey {
        /// The slot.
        id: String,
    },
    /// An append-only agent was asked to delete or overwrite something.
    #[error(
        "this agent opened vault {url} append-only: it may add chunks, points and notes, but \
         not {what}; run that from an agent allowed to delete"
    )]
    AppendOnly {
        /// The URL.
        url: String,
        /// What was refused.
        what: String,
    },
    /// A point's lock forbids deleting it.
    #[error(
        "point {point} of VM {vm} is locked until {until}: nothing may delete it before then \
         (a lock cannot be shortened)"
    )]
    Locked {
        /// The VM.
        vm: Name,
        /// The point.
        point: PointId,
        /// When the lock ends.
        until: jiff::Timestamp,
    },
    /// A collector took this backup for dead (its marker was older than the stale age) and
    /// may have freed chunks it needed: it must not commit.
    #[error(
        "backup {point} ran longer than the collector's stale age, and a gc run reaped it as \
         dead; nothing was committed. Run the backup again (and give gc a longer --stale-after \
         if backups really run that long)"
    )]
    Reaped {
        /// The point.
        point: PointId,
    },
    /// Verify quarantined a chunk this backup needs while it ran, and no good copy is left.
    #[error(
        "verify found chunk {chunk} bad while this backup ran, and the point would need it; \
         nothing was committed: run the backup again (it stores that block anew)"
    )]
    QuarantinedUnderBackup {
        /// The chunk.
        chunk: Digest,
    },
    /// The collector cannot work safely on this vault as it is.
    #[error("gc cannot run safely: {detail}")]
    GcUnsafe {
        /// Why, and what to do.
        detail: String,
    },
    /// A purge of a point that is not soft-deleted.
    #[error(
        "point {point} of VM {vm} is not deleted: delete it first (prune, or `cairn-agent delete`)"
    )]
    NotDeleted {
        /// The VM.
        vm: Name,
        /// The point.
        point: PointId,
    },
    /// A purge of a soft-deleted point still in its grace time.
    #[error(
        "point {point} of VM {vm} is soft-deleted and may be purged only after {purge_after}; \
         until then it restores by id and `cairn-agent undelete` brings it back"
    )]
    InGrace {
        /// The VM.
        vm: Name,
        /// The point.
        point: PointId,
        /// The end of its grace time.
        purge_after: jiff::Timestamp,
    },
    /// A point's notes cannot be read, so its state (deleted, locked) is unknown.
    #[error(
        "the notes of point {point} of VM {vm} cannot be read ({detail}); its state (deletion, \
         lock) is unknown, so nothing deletes it; verify the vault"
    )]
    UnreadableNotes {
        /// The VM.
        vm: Name,
        /// The point.
        point: PointId,
        /// What is wrong.
        detail: String,
    },
    /// No such point.
    #[error("VM {vm} has no recovery point {point}; list its points to choose one")]
    PointNotFound {
        /// The VM.
        vm: Name,
        /// The point asked for.
        point: PointId,
    },
    /// A key or passphrase file cannot be used.
    #[error(
        "vault secret file {path} {reason}; give a readable file (mode 600) holding the key or passphrase"
    )]
    SecretFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The VM has no points at all.
    #[error("VM {vm} has no recovery points in this vault; list the vault's points to see its VMs")]
    NoPoints {
        /// The VM.
        vm: Name,
    },
    /// A value handed to the vault is invalid.
    #[error(transparent)]
    Format(#[from] cairn_format::Error),
}

impl Error {
    /// Whether trying again may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Storage { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            Error::Io { .. } | Error::WriteBack { .. } => true,
            _ => false,
        }
    }

    /// A create-only write refused because the object exists: another writer's.
    pub(crate) fn concurrent(self, path: &object_store::path::Path) -> Self {
        match self {
            Error::Storage { source: object_store::Error::AlreadyExists { .. }, .. } => {
                Error::Concurrent { path: path.to_string() }
            }
            other => other,
        }
    }

    /// Wraps an error of a local file operation on the vault, recognising a full file system.
    pub(crate) fn local_io(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            return Error::StorageFull { path: path.display().to_string() };
        }
        Error::Io { path: path.display().to_string(), source }
    }

    /// Wraps a store error, recognising a full file system.
    pub(crate) fn storage(
        op: &'static str,
        path: &object_store::path::Path,
        source: object_store::Error,
    ) -> Self {
        if is_no_space(&source) {
            return Error::StorageFull { path: path.to_string() };
        }
        Error::Storage { op, path: path.to_string(), source }
    }
}

pub(crate) fn is_no_space(e: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
        {
            return true;
        }
        cur = err.source();
    }
    false
}
