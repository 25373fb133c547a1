//! The store under a local vault: `object_store`'s `LocalFileSystem`, with every object it
//! creates made private.
//!
//! A vault holds every VM's disks. `LocalFileSystem` creates files as the process umask says
//! (0644 under the usual 022), so any local user could read them wherever the vault's root
//! lets them through. The root is created 0700 (`open.rs`); this wrapper also sets every
//! object it writes, copies or renames to 0600, whatever the umask, so that a root widened
//! later by mistake still exposes nothing. Packs, which the vault writes itself with
//! `O_DIRECT`, are created 0600 in `local_pack.rs`.

use std::fmt;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};

/// Mode of every file a vault creates.
pub(crate) const FILE_MODE: u32 = 0o600;

/// `LocalFileSystem` whose objects are mode 0600.
#[derive(Debug)]
pub(crate) struct PrivateLocal {
    inner: LocalFileSystem,
}

impl PrivateLocal {
    pub(crate) fn new(inner: LocalFileSystem) -> Self {
        PrivateLocal { inner }
    }

    /// Sets `location` to 0600. The object is written by then, so a failure (which only a
    /// file removed under us could cause) is a warning, not a failed write.
    fn restrict(&self, location: &Path) {
        let result =
            self.inner.path_to_filesystem(location).map_err(|e| e.to_string()).and_then(|path| {
                make_private(&path).map_err(|e| format!("{}: {e}", path.display()))
            });
        if let Err(e) = result {
            tracing::warn!(%location, "cannot make a vault object private (mode 600): {e}");
        }
    }
}

/// Sets the file at `path` to 0600 through a descriptor opened without following a link (and
/// without blocking on a FIFO): whatever was swapped in under the name, only a file of the
/// vault's is changed.
fn make_private(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(flags.bits() as i32).open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
}

impl fmt::Display for PrivateLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "private {}", self.inner)
    }
}

#[async_trait]
impl ObjectStore for PrivateLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.restrict(location);
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        let path = self.inner.path_to_filesystem(location)?;
        Ok(Box::new(PrivateUpload { inner, path }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        self.restrict(to);
        Ok(())
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await?;
        self.restrict(to);
        Ok(())
    }
}

/// A multipart upload whose object is made private when it completes.
#[derive(Debug)]
struct PrivateUpload {
    inner: Box<dyn MultipartUpload>,
    path: std::path::PathBuf,
}

#[async_trait]
impl MultipartUpload for PrivateUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let result = self.inner.complete().await?;
        if let Err(e) = make_private(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot make a vault object private: {e}");
        }
        Ok(result)
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::integration::*;
    use std::os::unix::fs::MetadataExt;

    fn store(dir: &std::path::Path) -> PrivateLocal {
        PrivateLocal::new(LocalFileSystem::new_with_prefix(dir).unwrap())
    }

    /// The wrapper keeps every behaviour of `LocalFileSystem`: object_store's own suite.
    #[tokio::test]
    async fn passes_object_stores_own_integration_tests() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        put_get_delete_list(&s).await;
        get_opts(&s).await;
        list_uses_directories_correctly(&s).await;
        list_with_delimiter(&s).await;
        rename_and_copy(&s).await;
        copy_if_not_exists(&s).await;
        copy_rename_nonexistent_object(&s).await;
        stream_get(&s).await;
        put_opts(&s, false).await;
    }

    #[tokio::test]
    async fn objects_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        // No other test of this binary looks at modes: a wide-open umask cannot upset them.
        rustix::process::umask(rustix::fs::Mode::empty());
        let mode = |rel: &str| std::fs::metadata(dir.path().join(rel)).unwrap().mode() & 0o777;
        s.put(&Path::from("a/put"), Bytes::from_static(b"x").into()).await.unwrap();
        assert_eq!(mode("a/put"), 0o600);
        let mut upload = s.put_multipart(&Path::from("a/multi")).await.unwrap();
        upload.put_part(Bytes::from_static(b"part").into()).await.unwrap();
        upload.complete().await.unwrap();
        assert_eq!(mode("a/multi"), 0o600);
        s.copy(&Path::from("a/put"), &Path::from("b/copy")).await.unwrap();
        assert_eq!(mode("b/copy"), 0o600);
    }
}
