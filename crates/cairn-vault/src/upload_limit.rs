//! A bandwidth limit on what a host uploads: a token bucket shared by every backup that holds
//! it, so that transfers running together stay under one rate. A pack is never split: one
//! larger than a second's worth goes out whole and later packs wait off the debt.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes a second for packs written through the vault handles that share it.
#[derive(Debug)]
pub struct UploadLimit {
    bytes_per_second: u64,
    /// When the bucket was last filled, and what it held then (negative: owed).
    bucket: Mutex<(Instant, f64)>,
}

impl UploadLimit {
    /// A limit of `bytes_per_second` (at least 1), with a second's worth of burst.
    pub fn new(bytes_per_second: u64) -> UploadLimit {
        let rate = bytes_per_second.max(1);
        UploadLimit { bytes_per_second: rate, bucket: Mutex::new((Instant::now(), rate as f64)) }
    }

    /// The rate.
    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// How long the caller must wait before sending `bytes`; the bytes are counted now.
    pub fn debit(&self, bytes: u64) -> Duration {
        let rate = self.bytes_per_second as f64;
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(bucket.0).as_secs_f64() * rate;
        bucket.0 = now;
        bucket.1 = (bucket.1 + refill).min(rate) - bytes as f64;
        if bucket.1 < 0.0 { Duration::from_secs_f64(-bucket.1 / rate) } else { Duration::ZERO }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let wait = self.debit(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_waits_that_pay_the_debt() {
        let limit = UploadLimit::new(1000);
        // A second's worth goes at once.
        assert_eq!(limit.debit(1000), Duration::ZERO);
        // The next 500 bytes are owed: half a second (less what passed meanwhile).
        let wait = limit.debit(500);
        assert!(
            wait > Duration::from_millis(450) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another caller waits for both debts.
        let wait = limit.debit(500);
        assert!(
            wait > Duration::from_millis(950) && wait <= Duration::from_millis(1000),
            "{wait:?}"
        );
        assert_eq!(UploadLimit::new(0).bytes_per_second(), 1);
    }
}
