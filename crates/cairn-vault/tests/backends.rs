//! The stores under a vault, on every backend the tests can reach: object_store's own
//! integration suite through the vault's wrappers (retries, faults at rate 0), on the
//! emulators `scripts/object-stores.sh` starts (moto for S3, Azurite for Azure Blob).

use std::sync::Arc;
use std::time::Duration;

use cairn_vault::faults::{Faults, FaultyStore};
use cairn_vault::{CreateOptions, RetryPolicy, RetryingStore, Vault};
use object_store::ObjectStore;
use object_store::integration::*;

/// The vault's stack over `url`'s store: retries above a fault injector that injects nothing.
async fn wrapped(url: &str) -> RetryingStore {
    // A vault is created to get the store the vault itself would build from the URL.
    let vault = Vault::create_with(url, &CreateOptions::plain(65536)).await.unwrap();
    let store: Arc<dyn ObjectStore> = Arc::clone(vault.store());
    let quiet = Faults { rate: 0.0, seed: 7, latency: Duration::ZERO, stall: Duration::ZERO };
    RetryingStore::new(Arc::new(FaultyStore::new(store, quiet)), RetryPolicy::default())
}

#[tokio::test]
async fn the_vault_stores_pass_object_stores_own_integration_tests_on_every_cloud_backend() {
    for (backend, url) in cairn_testkit::object_store_urls() {
        eprintln!("{backend}: {url}");
        let s = wrapped(&format!("{url}/suite")).await;
        put_get_delete_list(&s).await;
        get_opts(&s).await;
        list_uses_directories_correctly(&s).await;
        list_with_delimiter(&s).await;
        rename_and_copy(&s).await;
        stream_get(&s).await;
        put_opts(&s, true).await;
    }
}
