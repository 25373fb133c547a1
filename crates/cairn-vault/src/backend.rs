//! From a vault URL to a store: a local folder, memory, or an object store (S3, Azure Blob,
//! Google Cloud Storage) built by `object_store`'s own builders.
//!
//! Cloud stores read their usual environment variables first (`AWS_*`, `AZURE_*`, `GOOGLE_*`:
//! credentials, region, endpoint, `AWS_ALLOW_HTTP` or `AZURE_STORAGE_USE_EMULATOR` for an
//! emulator), then the options given with the URL ([`StoreOptions`]), which win. An option the
//! backend does not know is refused, never ignored: a misspelt endpoint must not send a
//! vault's data somewhere else. The URL's path below the bucket or container is the vault's
//! prefix, so several vaults can share one bucket.

use std::path::PathBuf;
use std::sync::{Arc, Once};

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::prefix::PrefixStore;

use crate::Error;

/// Options for an object-store backend, as `key=value` pairs: the keys of `object_store`'s
/// builders (`aws_endpoint`, `aws_region`, `allow_http`, `azure_storage_account_name`,
/// `google_service_account`, ...; the environment variable names, lowercased, work too).
#[derive(Clone, Debug, Default)]
pub struct StoreOptions(pub Vec<(String, String)>);

impl StoreOptions {
    /// Parses `KEY=VALUE` (as the agent's `--store-option` takes it).
    pub fn parse_pair(s: &str) -> Result<(String, String), String> {
        let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
        if k.trim().is_empty() {
            return Err(format!("{s:?} has no key"));
        }
        Ok((k.trim().to_owned(), v.to_owned()))
    }
}

/// Where a vault lives.
pub(crate) enum Location {
    /// A folder of this host.
    Local(PathBuf),
    /// This process's memory (tests and embedders).
    Memory,
    /// An object store, already built, with the vault's prefix applied.
    Remote(Arc<dyn ObjectStore>),
}

/// The object-store kinds Cairn builds, by URL scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cloud {
    S3,
    Azure,
    Gcs,
}

impl Cloud {
    fn of(scheme: &str) -> Option<Cloud> {
        match scheme {
            "s3" | "s3a" => Some(Cloud::S3),
            "az" | "azure" | "abfs" | "abfss" => Some(Cloud::Azure),
            "gs" => Some(Cloud::Gcs),
            _ => None,
        }
    }
}

/// Reads `url` (and builds its store when it names an object store).
pub(crate) fn locate(url: &str, options: &StoreOptions) -> Result<Location, Error> {
    let bad = |detail: &str| Error::Url { url: url.into(), detail: detail.into() };
    if !url.contains("://") {
        // A plain path: the friendliest way to name a local vault.
        let path = std::path::absolute(url).map_err(|e| bad(&e.to_string()))?;
        return Ok(Location::Local(path));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    let local_only = |what: &str| {
        if options.0.is_empty() {
            Ok(())
        } else {
            Err(bad(&format!("store options apply to object stores, not to {what}")))
        }
    };
    match parsed.scheme() {
        "file" => {
            local_only("a local folder")?;
            parsed
                .to_file_path()
                .map(Location::Local)
                .map_err(|()| bad("a file URL needs an absolute path, like file:///srv/vault"))
        }
        "memory" => {
            local_only("memory")?;
            Ok(Location::Memory)
        }
        scheme => match Cloud::of(scheme) {
            Some(cloud) => build(cloud, url, &parsed, options).map(Location::Remote),
            None => Err(bad(&format!(
                "unknown scheme {scheme:?}; use a path, file:///path, s3://bucket/prefix, \
                 az://container/prefix or gs://bucket/prefix"
            ))),
        },
    }
}

/// Builds the store of `url`, under the URL's path as prefix.
fn build(
    cloud: Cloud,
    url: &str,
    parsed: &url::Url,
    options: &StoreOptions,
) -> Result<Arc<dyn ObjectStore>, Error> {
    install_crypto_provider();
    let bad = |detail: String| Error::Url { url: url.into(), detail };
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("it names no bucket or container, like s3://bucket/prefix".into()));
    }
    let unknown = |key: &str| {
        bad(format!(
            "unknown store option {key:?} for {cloud:?}; see object_store's {} config keys",
            match cloud {
                Cloud::S3 => "AmazonS3",
                Cloud::Azure => "Azure",
                Cloud::Gcs => "Google",
            }
        ))
    };
    // The builders take the bucket from the URL; the rest of its path is ours.
    let store: Arc<dyn ObjectStore> = match cloud {
        Cloud::S3 => {
            let b = AmazonS3Builder::from_env().with_url(url);
            let b =
                configure(b, options, &unknown, |b, k: AmazonS3ConfigKey, v| b.with_config(k, v))?;
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        Cloud::Azure => {
            let b = MicrosoftAzureBuilder::from_env().with_url(url);
            let b = configure(b, options, &unknown, |b, k: AzureConfigKey, v| b.with_config(k, v))?;
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        Cloud::Gcs => {
            let b = GoogleCloudStorageBuilder::from_env().with_url(url);
            let b =
                configure(b, options, &unknown, |b, k: GoogleConfigKey, v| b.with_config(k, v))?;
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
    };
    warn_if_plain_http(cloud, options);
    let prefix = parsed.path().trim_matches('/');
    if prefix.is_empty() {
        return Ok(store);
    }
    let prefix = object_store::path::Path::parse(prefix)
        .map_err(|e| bad(format!("the prefix {prefix:?} is not a valid object path: {e}")))?;
    Ok(Arc::new(PrefixStore::new(store, prefix)))
}

/// `builder` with every option applied: each key parsed as the builder's config key (the
/// environment variable names, lowercased, parse too), an unknown one refused.
fn configure<B, K: std::str::FromStr>(
    builder: B,
    options: &StoreOptions,
    unknown: &dyn Fn(&str) -> Error,
    set: impl Fn(B, K, &str) -> B,
) -> Result<B, Error> {
    options.0.iter().try_fold(builder, |b, (k, v)| {
        let key = k.to_ascii_lowercase().parse().map_err(|_| unknown(k))?;
        Ok(set(b, key, v))
    })
}

/// Warns when the store is reached without TLS (an emulator's setting, left in the
/// environment or given by mistake): the data is encrypted by Cairn, the credentials are not.
fn warn_if_plain_http(cloud: Cloud, options: &StoreOptions) {
    let truthy = |v: &str| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes");
    let from_options = options.0.iter().any(|(k, v)| {
        let k = k.to_ascii_lowercase();
        (k.ends_with("allow_http") || k.ends_with("use_emulator")) && truthy(v)
    });
    let var = match cloud {
        Cloud::S3 => "AWS_ALLOW_HTTP",
        Cloud::Azure => "AZURE_STORAGE_USE_EMULATOR",
        Cloud::Gcs => "GOOGLE_ALLOW_HTTP",
    };
    if from_options || std::env::var(var).is_ok_and(|v| truthy(&v)) {
        tracing::warn!(
            "the {cloud:?} store may be reached over plain HTTP ({}): fine for an emulator on \
             loopback, not for a real store",
            if from_options { "a store option" } else { var }
        );
    }
}

/// Makes `ring` the TLS crypto of the process (see `docs/ARCHITECTURE.md`, "TLS"), once. An
/// embedder that installed its own provider first keeps it.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str, options: &[(&str, &str)]) -> String {
        let options =
            StoreOptions(options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        match locate(url, &options) {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn urls_name_their_backend_and_prefix() {
        let opts = StoreOptions(vec![
            ("aws_endpoint".into(), "http://127.0.0.1:9".into()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_region".into(), "us-east-1".into()),
        ]);
        assert!(matches!(locate("s3://bucket/a/b", &opts), Ok(Location::Remote(_))));
        assert!(matches!(locate("memory://", &StoreOptions::default()), Ok(Location::Memory)));
        assert!(matches!(
            locate("file:///srv/v", &StoreOptions::default()),
            Ok(Location::Local(p)) if p == std::path::Path::new("/srv/v")
        ));
        let az = StoreOptions(vec![("azure_storage_use_emulator".into(), "true".into())]);
        assert!(matches!(locate("az://container/p", &az), Ok(Location::Remote(_))));
    }

    #[test]
    fn bad_urls_and_options_are_refused_with_the_reason() {
        assert!(err("ftp://x/y", &[]).contains("unknown scheme"));
        assert!(err("s3:///prefix", &[]).contains("names no bucket"));
        assert!(err("s3://b/p", &[("aws_endpiont", "http://x")]).contains("unknown store option"));
        assert!(err("file:///srv/v", &[("aws_region", "x")]).contains("apply to object stores"));
    }
}
