//! Rate limits that must hold across the nodes of a cluster.
//!
//! Registrations per source address per hour and `FetchPrekeys` per
//! requesting and per target device per minute bound what one attacker can
//! do, whichever node it connects to. A single relay keeps them in memory
//! ([`LocalLimits`], the token buckets of [`crate::server::guard`]); a
//! cluster keeps them in PostgreSQL ([`super::pg::PgLimits`]) so that
//! connecting to every node in turn does not multiply them. Connection caps
//! (total and per address) stay per node: they protect the node's own
//! memory and sockets, and a connection exists on one node only.

use crate::server::guard::KeyedBuckets;
use hush_protocol::DeviceId;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

/// One limited action and the key it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A registration from this source network (see
    /// [`crate::server::guard::net_key`]).
    Registration(IpAddr),
    /// A prekey fetch by this device.
    PrekeyFetcher(DeviceId),
    /// A prekey fetch of this device's bundle.
    PrekeyTarget(DeviceId),
}

/// The rates in force, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Registrations per address per hour (0 = unlimited).
    pub registrations_per_ip_hour: u32,
    /// Prekey fetches per requesting device per minute (0 = unlimited).
    pub prekey_fetches_per_device_minute: u32,
    /// Prekey fetches per target device per minute (0 = unlimited).
    pub prekey_fetches_per_target_minute: u32,
}

impl Rates {
    /// `(tokens per period, period in ms)` of a limit.
    pub fn of(&self, limit: &Limit) -> (u32, u64) {
        match limit {
            Limit::Registration(_) => (self.registrations_per_ip_hour, 3_600_000),
            Limit::PrekeyFetcher(_) => (self.prekey_fetches_per_device_minute, 60_000),
            Limit::PrekeyTarget(_) => (self.prekey_fetches_per_target_minute, 60_000),
        }
    }
}

/// The answer of [`RateLimits::take`]: `Err(ms)` = refused, retry after `ms`.
pub type TakeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), u32>> + Send + 'a>>;

/// Token buckets per [`Limit`] key (the generic cell rate algorithm, burst
/// = rate per period).
pub trait RateLimits: Send + Sync + 'static {
    /// Take one token at `now_ms`, or say how many ms until one is free.
    fn take(&self, limit: Limit, now_ms: u64) -> TakeFuture<'_>;

    /// Give back a token taken for an attempt that did not happen after
    /// all (best effort).
    fn refund(&self, limit: Limit);
}

/// The single-node limits: in memory.
#[derive(Debug)]
pub struct LocalLimits {
    registrations: KeyedBuckets<IpAddr>,
    prekey_fetchers: KeyedBuckets<DeviceId>,
    prekey_targets: KeyedBuckets<DeviceId>,
}

impl LocalLimits {
    /// Buckets at these rates.
    pub fn new(rates: Rates) -> LocalLimits {
        LocalLimits {
            registrations: KeyedBuckets::new(rates.registrations_per_ip_hour, 3_600_000),
            prekey_fetchers: KeyedBuckets::new(rates.prekey_fetches_per_device_minute, 60_000),
            prekey_targets: KeyedBuckets::new(rates.prekey_fetches_per_target_minute, 60_000),
        }
    }

    fn take_now(&self, limit: Limit, now_ms: u64) -> Result<(), u32> {
        match limit {
            Limit::Registration(ip) => self.registrations.take(ip, now_ms),
            Limit::PrekeyFetcher(d) => self.prekey_fetchers.take(d, now_ms),
            Limit::PrekeyTarget(d) => self.prekey_targets.take(d, now_ms),
        }
    }
}

impl RateLimits for LocalLimits {
    fn take(&self, limit: Limit, now_ms: u64) -> TakeFuture<'_> {
        let answer = self.take_now(limit, now_ms);
        Box::pin(std::future::ready(answer))
    }

    fn refund(&self, limit: Limit) {
        match limit {
            Limit::Registration(ip) => self.registrations.refund(ip),
            Limit::PrekeyFetcher(d) => self.prekey_fetchers.refund(d),
            Limit::PrekeyTarget(d) => self.prekey_targets.refund(d),
        }
    }
}

/// The generic cell rate algorithm on one key's "theoretical arrival time"
/// (µs; `None` = never seen): the new arrival time, or the ms to wait.
/// Shared by the PostgreSQL limits (which run the same arithmetic in SQL)
/// and their tests.
pub fn gcra(tat_us: Option<u64>, now_ms: u64, per_period: u32, period_ms: u64) -> Result<u64, u32> {
    let per_period = u64::from(per_period.max(1));
    let interval = (period_ms.saturating_mul(1000) / per_period).max(1);
    let tolerance = interval.saturating_mul(per_period - 1);
    let now = now_ms.saturating_mul(1000);
    let start = tat_us.unwrap_or(now).max(now);
    let ahead = start - now;
    if ahead > tolerance {
        let wait = (ahead - tolerance).div_ceil(1000);
        return Err(u32::try_from(wait).unwrap_or(u32::MAX).max(1));
    }
    Ok(start.saturating_add(interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates() -> Rates {
        Rates {
            registrations_per_ip_hour: 3,
            prekey_fetches_per_device_minute: 2,
            prekey_fetches_per_target_minute: 0,
        }
    }

    #[tokio::test]
    async fn local_limits_refuse_past_the_burst_per_key_and_kind() {
        let l = LocalLimits::new(rates());
        let ip = Limit::Registration(IpAddr::from([192, 0, 2, 1]));
        for _ in 0..3 {
            assert!(l.take(ip, 0).await.is_ok());
        }
        assert_eq!(l.take(ip, 0).await, Err(1_200_000));
        l.refund(ip);
        assert!(l.take(ip, 0).await.is_ok());
        let me = Limit::PrekeyFetcher(DeviceId([1; 16]));
        assert!(l.take(me, 0).await.is_ok());
        assert!(l.take(me, 0).await.is_ok());
        assert_eq!(l.take(me, 0).await, Err(30_000));
        let target = Limit::PrekeyTarget(DeviceId([1; 16]));
        for _ in 0..100 {
            assert!(l.take(target, 0).await.is_ok(), "0 = unlimited");
        }
    }

    #[test]
    fn gcra_matches_the_in_memory_buckets() {
        let b = KeyedBuckets::new(3, 3_600_000);
        let mut tat = None;
        for now in [0u64, 0, 0, 0, 1_199_999, 1_200_000, 1_200_000, 5_000_000] {
            let mem = b.take(1u8, now);
            let sql = gcra(tat, now, 3, 3_600_000);
            assert_eq!(mem.is_ok(), sql.is_ok(), "at {now}");
            match sql {
                Ok(t) => tat = Some(t),
                Err(wait) => assert_eq!(Err(wait), mem),
            }
        }
    }
}
