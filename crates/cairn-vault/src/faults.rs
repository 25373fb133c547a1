//! A store that fails on purpose, for tests of everything above it: errors, lost answers,
//! stalls, latency and cut reads, at a given rate, from a seed (the same seed gives the same
//! sequence of draws; the interleaving of concurrent calls still varies).
//!
//! Put it between a real store and the vault ([`crate::Vault::open_store`]): the vault's own
//! retries ([`crate::RetryingStore`]) sit above it, as they sit above a network.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use rand::{RngExt, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// What to inject.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// The share of operations that go wrong, 0 to 1.
    pub rate: f64,
    /// The seed of the draws.
    pub seed: u64,
    /// Each operation first waits a random time up to this.
    pub latency: Duration,
    /// A stalled operation hangs this long before it fails (set it above the vault's attempt
    /// timeout to test that timeout).
    pub stall: Duration,
}

/// One drawn fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The request fails before it reaches the store.
    Before,
    /// The store did the work, the answer is lost (a write landed, a delete happened).
    After,
    /// The request hangs, then fails; it never reaches the store.
    Stall,
    /// A read returns only part of the bytes, with no error.
    Cut,
}

/// How many faults of each kind were injected.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Failed before the store.
    pub before: AtomicU64,
    /// Answers lost after the store.
    pub after: AtomicU64,
    /// Stalls.
    pub stalls: AtomicU64,
    /// Cut reads.
    pub cuts: AtomicU64,
}

impl FaultCounts {
    /// All faults injected so far.
    pub fn total(&self) -> u64 {
        [&self.before, &self.after, &self.stalls, &self.cuts]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// A store that fails on purpose; see the module docs.
pub struct FaultyStore(Arc<Shared>);

struct Shared {
    inner: Arc<dyn ObjectStore>,
    faults: Faults,
    /// The rate now (`f64` bits): [`FaultyStore::set_rate`] changes it.
    rate: AtomicU64,
    rng: Mutex<Xoshiro256PlusPlus>,
    counts: Arc<FaultCounts>,
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore").field("faults", &self.0.faults).finish_non_exhaustive()
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faulty({}) {}", self.0.rate(), self.0.inner)
    }
}

fn injected(what: &str, location: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faults",
        source: format!("injected fault: {what} {location}").into(),
    }
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Faults) -> Self {
        FaultyStore(Arc::new(Shared {
            inner,
            faults,
            rate: AtomicU64::new(faults.rate.to_bits()),
            rng: Mutex::new(Xoshiro256PlusPlus::seed_from_u64(faults.seed)),
            counts: Arc::default(),
        }))
    }

    /// Changes the share of operations that go wrong from now on.
    pub fn set_rate(&self, rate: f64) {
        self.0.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// The counts of injected faults (shared: it keeps counting).
    pub fn counts(&self) -> Arc<FaultCounts> {
        Arc::clone(&self.0.counts)
    }
}

impl Shared {
    fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// Waits the drawn latency, then draws whether (and how) this call fails, among `kinds`.
    async fn draw(&self, kinds: &[Fault]) -> Option<Fault> {
        let (wait, fault) = {
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            let wait = self.faults.latency.mul_f64(rng.random_range(0.0..1.0));
            let fault = (rng.random_range(0.0..1.0) < self.rate())
                .then(|| kinds[rng.random_range(0..kinds.len())]);
            (wait, fault)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let counter = match fault? {
            Fault::Before => &self.counts.before,
            Fault::After => &self.counts.after,
            Fault::Stall => &self.counts.stalls,
            Fault::Cut => &self.counts.cuts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if fault == Some(Fault::Stall) {
            tokio::time::sleep(self.faults.stall).await;
        }
        fault
    }
}

const READ: &[Fault] = &[Fault::Before, Fault::Stall, Fault::Cut];
const WRITE: &[Fault] = &[Fault::Before, Fault::After, Fault::Stall];

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        match self.0.draw(WRITE).await {
            None => self.0.inner.put_opts(location, payload, opts).await,
            Some(Fault::After) => {
                self.0.inner.put_opts(location, payload, opts).await?;
                Err(injected("answer lost after writing", location.as_ref()))
            }
            Some(_) => Err(injected("write failed", location.as_ref())),
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        match self.0.draw(&[Fault::Before]).await {
            None => self.0.inner.put_multipart_opts(location, opts).await,
            Some(_) => Err(injected("upload failed", location.as_ref())),
        }
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        match self.0.draw(READ).await {
            None => self.0.inner.get_opts(location, options).await,
            Some(Fault::Cut) => {
                let result = self.0.inner.get_opts(location, options).await?;
                let (meta, range) = (result.meta.clone(), result.range.clone());
                let attributes = result.attributes.clone();
                let whole = result.bytes().await?;
                let cut = whole.slice(..whole.len() / 2);
                Ok(crate::retry::with_body(meta, range, attributes, cut))
            }
            Some(_) => Err(injected("read failed", location.as_ref())),
        }
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        match self.0.draw(READ).await {
            None => self.0.inner.get_ranges(location, ranges).await,
            Some(Fault::Cut) => {
                let mut got = self.0.inner.get_ranges(location, ranges).await?;
                if let Some(first) = got.first_mut() {
                    *first = first.slice(..first.len() / 2);
                }
                Ok(got)
            }
            Some(_) => Err(injected("read failed", location.as_ref())),
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        // One draw per deletion.
        let this = Arc::clone(&self.0);
        locations
            .then(move |location| {
                let this = Arc::clone(&this);
                async move {
                    let inner = &this.inner;
                    let location = location?;
                    match this.draw(&[Fault::Before, Fault::After]).await {
                        None => inner.delete(&location).await.map(|()| location),
                        Some(Fault::After) => {
                            inner.delete(&location).await?;
                            Err(injected("answer lost after deleting", location.as_ref()))
                        }
                        Some(_) => Err(injected("delete failed", location.as_ref())),
                    }
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let fail = {
            let mut rng = self.0.rng.lock().unwrap_or_else(PoisonError::into_inner);
            rng.random_range(0.0..1.0) < self.0.rate()
        };
        if fail {
            self.0.counts.before.fetch_add(1, Ordering::Relaxed);
            let name = prefix.map(|p| p.to_string()).unwrap_or_default();
            // Part of the listing, then the error, as a connection cut mid-listing gives.
            let head = self.0.inner.list(prefix).take(1);
            return head
                .chain(futures::stream::once(async move { Err(injected("list failed", &name)) }))
                .boxed();
        }
        self.0.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        match self.0.draw(&[Fault::Before]).await {
            None => self.0.inner.list_with_delimiter(prefix).await,
            Some(_) => {
                Err(injected("list failed", &prefix.map(|p| p.to_string()).unwrap_or_default()))
            }
        }
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        match self.0.draw(WRITE).await {
            None => self.0.inner.copy_opts(from, to, options).await,
            Some(Fault::After) => {
                self.0.inner.copy_opts(from, to, options).await?;
                Err(injected("answer lost after copying", from.as_ref()))
            }
            Some(_) => Err(injected("copy failed", from.as_ref())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::integration::*;
    use object_store::memory::InMemory;

    /// With no faults, the wrapper is the store: object_store's own suite.
    #[tokio::test]
    async fn without_faults_it_passes_object_stores_own_integration_tests() {
        let faults = Faults { rate: 0.0, seed: 1, latency: Duration::ZERO, stall: Duration::ZERO };
        let s = FaultyStore::new(Arc::new(InMemory::new()), faults);
        put_get_delete_list(&s).await;
        get_opts(&s).await;
        list_uses_directories_correctly(&s).await;
        list_with_delimiter(&s).await;
        rename_and_copy(&s).await;
        copy_if_not_exists(&s).await;
        stream_get(&s).await;
        put_opts(&s, true).await;
    }
}
