//! Retries above the store: what `object_store`'s own retries (HTTP status codes, connection
//! errors, below every request) cannot see.
//!
//! Every vault puts its store inside a [`RetryingStore`]. It retries an operation that failed
//! in a way trying again may mend (a generic error: a reset connection, a timeout, a body cut
//! short), with exponential backoff and jitter, a bounded number of times, and bounds each
//! attempt in time, so a request that hangs becomes an error that is retried. It never
//! retries a refusal: not found, already exists, a failed precondition, permissions, a full
//! disk.
//!
//! A write can succeed at the server and still fail at the client (the answer was lost). The
//! retry of a create-only put then finds the object existing: it is read back, and if it
//! holds exactly the bytes being written, the write is done; otherwise the refusal stands
//! (someone else wrote it). A conditional update whose retry finds its precondition failed
//! is refused as it is: equal bytes there may be another writer's equal update, and the
//! caller must read again. (The vault itself never updates an object: every object is
//! created once, then at most deleted.) Reads are checked for length: a body that ends
//! before the range it was asked for is retried, not handed on as a truncated object.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    RenameOptions, Result,
};
use rand::RngExt;

/// How hard to try.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included (at least 1).
    pub attempts: u32,
    /// The wait before the second attempt; it doubles after each failure.
    pub first_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// An attempt that has not finished after this long is abandoned and counts as failed.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    /// Five attempts, 200 ms doubling to at most 5 s, two minutes per attempt (an 8 MiB pack
    /// over a slow link). Below this, `object_store` retries each HTTP request up to ten times
    /// within three minutes.
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(120),
        }
    }
}

/// A store whose operations are retried; see the module docs.
#[derive(Debug)]
pub struct RetryingStore {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
}

impl RetryingStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        RetryingStore { inner, policy }
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of attempts.
    async fn run<T, F, Fut>(&self, what: &str, location: &str, op: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.run_sized(what, location, 0, op).await
    }

    /// As [`RetryingStore::run`], for an operation that moves `bytes`: each attempt may also
    /// take one second per MiB (a 512 MiB pack over a slow link must not time out forever).
    async fn run_sized<T, F, Fut>(
        &self,
        what: &str,
        location: &str,
        bytes: u64,
        mut op: F,
    ) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let timeout = self.policy.attempt_timeout + Duration::from_secs(bytes >> 20);
        let mut backoff = self.policy.first_backoff;
        let mut attempt = 0;
        loop {
            let result = match tokio::time::timeout(timeout, op(attempt)).await {
                Ok(r) => r,
                Err(_) => Err(object_store::Error::Generic {
                    store: "retry",
                    source: format!("{what} {location} did not finish within {timeout:?}").into(),
                }),
            };
            attempt += 1;
            match result {
                Err(e) if attempt < self.policy.attempts.max(1) && is_transient(&e) => {
                    tracing::debug!(%location, attempt, error = %e, "{what} failed; retrying");
                    let jitter = rand::rng().random_range(0.5..1.0);
                    tokio::time::sleep(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(self.policy.max_backoff);
                }
                other => return other,
            }
        }
    }

    /// True if `location` holds exactly `bytes` (an earlier attempt of this write landed).
    async fn holds(&self, location: &Path, bytes: &Bytes) -> bool {
        match self.get_opts(location, GetOptions::default()).await {
            Ok(r) => r.bytes().await.is_ok_and(|stored| stored == *bytes),
            Err(_) => false,
        }
    }
}

/// Whether trying again may help: only generic failures (transport, timeouts, server
/// errors past `object_store`'s own retries), never a refusal or a full disk.
pub(crate) fn is_transient(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. } | object_store::Error::JoinError { .. })
        && !crate::error::is_no_space(e)
}

impl fmt::Display for RetryingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "retrying {}", self.inner)
    }
}

/// The whole body of `result`, checked to be as long as the range it answers.
async fn whole_body(result: GetResult) -> Result<(GetResult, Bytes)> {
    let range = result.range.clone();
    let meta = result.meta.clone();
    let attributes = result.attributes.clone();
    let expected = range.end - range.start;
    let location = meta.location.to_string();
    let body = result.bytes().await?;
    if body.len() as u64 != expected {
        return Err(object_store::Error::Generic {
            store: "retry",
            source: format!("{location}: got {} bytes of a {expected}-byte range", body.len())
                .into(),
        });
    }
    Ok((with_body(meta, range, attributes, body.clone()), body))
}

/// A get result whose payload is `body`, already in memory.
pub(crate) fn with_body(
    meta: ObjectMeta,
    range: Range<u64>,
    attributes: object_store::Attributes,
    body: Bytes,
) -> GetResult {
    let once = futures::stream::once(futures::future::ready(Ok(body))).boxed();
    GetResult {
        payload: GetResultPayload::Stream(once),
        meta,
        range,
        attributes,
        extensions: Default::default(),
    }
}

#[async_trait]
impl ObjectStore for RetryingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let bytes: Bytes = payload.into();
        let create = matches!(opts.mode, PutMode::Create);
        let retried = std::sync::atomic::AtomicBool::new(false);
        let result = self
            .run_sized("write", location.as_ref(), bytes.len() as u64, |attempt| {
                if attempt > 0 {
                    retried.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                self.inner.put_opts(location, bytes.clone().into(), opts.clone())
            })
            .await;
        match result {
            // A create-only write refused after an earlier attempt failed: that attempt may
            // have landed. It did if the object holds exactly these bytes. (A conditional
            // update is not resolved so: equal bytes may be another writer's equal update.)
            Err(e @ object_store::Error::AlreadyExists { .. })
                if create && retried.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                if self.holds(location, &bytes).await {
                    let meta = self.head(location).await?;
                    Ok(PutResult {
                        e_tag: meta.e_tag,
                        version: meta.version,
                        extensions: Default::default(),
                    })
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        // Parts are retried by object_store; the vault writes packs as single puts.
        self.run("start upload of", location.as_ref(), |_| {
            self.inner.put_multipart_opts(location, opts.clone())
        })
        .await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if options.head {
            return self
                .run("read", location.as_ref(), |_| self.inner.get_opts(location, options.clone()))
                .await;
        }
        self.run("read", location.as_ref(), |_| {
            let options = options.clone();
            async move { whole_body(self.inner.get_opts(location, options).await?).await }
        })
        .await
        .map(|(result, _)| result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.run("read", location.as_ref(), |_| async move {
            let got = self.inner.get_ranges(location, ranges).await?;
            if got.len() != ranges.len() {
                return Err(object_store::Error::Generic {
                    store: "retry",
                    source: format!(
                        "{location}: {} ranges asked, {} answered",
                        ranges.len(),
                        got.len()
                    )
                    .into(),
                });
            }
            let short = ranges.iter().zip(&got).any(|(r, b)| (b.len() as u64) < r.end - r.start);
            if short || got.len() != ranges.len() {
                // A cut read, or the object really ends early: the head tells which.
                let size = self.inner.head(location).await?.size;
                if ranges
                    .iter()
                    .zip(&got)
                    .any(|(r, b)| (b.len() as u64) < r.end.min(size) - r.start.min(size))
                {
                    return Err(object_store::Error::Generic {
                        store: "retry",
                        source: format!("{location}: a ranged read came back short").into(),
                    });
                }
            }
            Ok(got)
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let inner = Arc::clone(&self.inner);
        let policy = self.policy;
        locations
            .then(move |location| {
                let inner = Arc::clone(&inner);
                async move {
                    let location = location?;
                    let store = RetryingStore { inner, policy };
                    let delete = |attempt: u32| {
                        let store = &store;
                        let location = &location;
                        async move {
                            match store.inner.delete(location).await {
                                // An earlier attempt deleted it and its answer was lost.
                                Err(object_store::Error::NotFound { .. }) if attempt > 0 => Ok(()),
                                other => other,
                            }
                        }
                    };
                    store.run("delete", location.as_ref(), delete).await.map(|()| location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        // Listed whole and retried whole: a listing that failed half-way is started again.
        let inner = Arc::clone(&self.inner);
        let policy = self.policy;
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            let store = RetryingStore { inner, policy };
            let name = prefix.as_ref().map(|p| p.to_string()).unwrap_or_default();
            store
                .run("list", &name, |_| store.inner.list(prefix.as_ref()).try_collect::<Vec<_>>())
                .await
        })
        .map_ok(|metas| futures::stream::iter(metas.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let name = prefix.map(|p| p.to_string()).unwrap_or_default();
        self.run("list", &name, |_| self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.run("copy", from.as_ref(), |_| self.inner.copy_opts(from, to, options.clone())).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.run("rename", from.as_ref(), |_| self.inner.rename_opts(from, to, options.clone()))
            .await
    }
}
