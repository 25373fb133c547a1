//! How the agent talks to the coordinator: a [`Transport`] (a trait object, so tests and other
//! carriers can stand in), and [`HttpTransport`], the API over HTTP(S) with a bearer token.
//! The agent only ever calls out: a host needs no inbound port.

use std::time::Duration;

use async_trait::async_trait;
use cairn_protocol::{Enrolled, OfflineRun, Orders, Poll, Report};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;

/// The coordinator as the agent sees it.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Exchanges a one-time enrollment token for the agent's own.
    async fn enroll(&self, enrollment: &str) -> Result<Enrolled, Error>;
    /// Asks for jobs, saying what runs; the coordinator may hold the call up to the wait.
    async fn poll(&self, token: &str, poll: &Poll) -> Result<Orders, Error>;
    /// Reports on a job.
    async fn report(&self, token: &str, job: u64, report: &Report) -> Result<(), Error>;
    /// Reports a backup run from the cached schedule.
    async fn offline(&self, token: &str, run: &OfflineRun) -> Result<(), Error>;
}

/// The coordinator's API over HTTP(S).
pub struct HttpTransport {
    base: String,
    client: reqwest::Client,
}

/// Answers bigger than this are refused (an order list is a few kilobytes).
const MAX_ANSWER: usize = 4 << 20;

impl HttpTransport {
    /// A transport to the coordinator at `base` (its URL), trusting `ca` (PEM) besides the
    /// system's roots.
    pub fn new(base: &str, ca: Option<&std::path::Path>) -> Result<HttpTransport, Error> {
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(Error::io("reading", ca))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::Config {
                path: ca.to_owned(),
                message: format!("not a PEM certificate: {e}"),
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .connect_timeout(Duration::from_secs(10))
            // A poll is held up to a minute; anything longer is a dead connection.
            .timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| Error::Unreachable { url: base.into(), detail: e.to_string() })?;
        Ok(HttpTransport { base: base.trim_end_matches('/').to_owned(), client })
    }

    async fn call<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &B,
    ) -> Result<T, Error> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.post(&url).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let unreachable = |e: reqwest::Error| Error::Unreachable {
            url: self.base.clone(),
            detail: e.to_string(),
        };
        let mut response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if bytes.len() + chunk.len() > MAX_ANSWER {
                return Err(Error::Refused {
                    call: path.into(),
                    status: status.as_u16(),
                    message: format!("the answer is bigger than {MAX_ANSWER} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            return Err(Error::Refused { call: path.into(), status: status.as_u16(), message });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Refused {
            call: path.into(),
            status: status.as_u16(),
            message: format!("the answer does not decode: {e}"),
        })
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn enroll(&self, enrollment: &str) -> Result<Enrolled, Error> {
        self.call("/api/v1/agents/enroll", None, &serde_json::json!({ "token": enrollment })).await
    }

    async fn poll(&self, token: &str, poll: &Poll) -> Result<Orders, Error> {
        self.call("/api/v1/agents/poll", Some(token), poll).await
    }

    async fn report(&self, token: &str, job: u64, report: &Report) -> Result<(), Error> {
        let _: serde_json::Value =
            self.call(&format!("/api/v1/agents/jobs/{job}"), Some(token), report).await?;
        Ok(())
    }

    async fn offline(&self, token: &str, run: &OfflineRun) -> Result<(), Error> {
        let _: serde_json::Value = self.call("/api/v1/agents/offline", Some(token), run).await?;
        Ok(())
    }
}
