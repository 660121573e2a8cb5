//! The relay's edge limits against hostile peers, all in memory:
//!
//! - [`ConnectionLimiter`]: connections open at once, in total and per
//!   source network, refused before the QUIC handshake costs anything;
//! - [`KeyedBuckets`]: token buckets per key (a source network, a device),
//!   behind the registration limit per address and the `FetchPrekeys` limits
//!   per requesting and per target device.
//!
//! Addresses are grouped by [`net_key`]: an IPv4 address is its own key, an
//! IPv6 address counts as its /64 (one host usually owns a whole /64, so
//! keying on the full address would let it pick a fresh one per attempt).
//! Maps are bounded: idle entries (full buckets, zero counts) are dropped,
//! and a table that still outgrows its bound refuses new keys rather than
//! grow without limit.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most keys a [`KeyedBuckets`] table holds.
pub const MAX_KEYS: usize = 100_000;

/// The key an address is limited under: IPv4 (also IPv4-mapped IPv6) as is,
/// IPv6 cut to its /64 prefix.
pub fn net_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a few integer operations that cannot panic halfway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// The relay holds its maximum number of connections.
    Total,
    /// The source network holds its maximum number of connections.
    PerAddress,
}

#[derive(Default)]
struct ConnCounts {
    total: usize,
    per_key: HashMap<IpAddr, usize>,
}

/// Bounds connections open at once, in total and per source network.
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_address: usize,
    counts: Mutex<ConnCounts>,
}

impl std::fmt::Debug for ConnectionLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionLimiter")
            .field("max_total", &self.max_total)
            .field("max_per_address", &self.max_per_address)
            .finish_non_exhaustive()
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnectionLimiter>,
    key: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = lock(&self.limiter.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_key.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_key.remove(&self.key);
            }
        }
    }
}

impl ConnectionLimiter {
    /// At most `max_total` connections, `max_per_address` per source network.
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(ConnectionLimiter {
            max_total,
            max_per_address,
            counts: Mutex::new(ConnCounts::default()),
        })
    }

    /// Admit a connection from `ip`, or say which bound it hits.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, ConnRefusal> {
        let key = net_key(ip);
        let mut c = lock(&self.counts);
        if c.total >= self.max_total {
            return Err(ConnRefusal::Total);
        }
        let n = c.per_key.entry(key).or_insert(0);
        if *n >= self.max_per_address {
            return Err(ConnRefusal::PerAddress);
        }
        *n += 1;
        c.total += 1;
        Ok(ConnPermit {
            limiter: Arc::clone(self),
            key,
        })
    }

    /// Connections admitted and still open.
    pub fn open(&self) -> usize {
        lock(&self.counts).total
    }
}

/// Token buckets per key, all with the same rate: `per_period` tokens per
/// `period_ms`, a burst of `per_period`. A rate of 0 tokens means no limit.
///
/// Kept as the generic cell rate algorithm: per key only the time at which
/// its bucket would be full again ("theoretical arrival time", in µs), so
/// slow rates (a few per hour) lose nothing to rounding.
pub struct KeyedBuckets<K> {
    per_period: u64,
    /// Microseconds per token.
    interval_us: u64,
    max_keys: usize,
    buckets: Mutex<HashMap<K, u64>>,
}

impl<K> std::fmt::Debug for KeyedBuckets<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedBuckets")
            .field("per_period", &self.per_period)
            .field("interval_us", &self.interval_us)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Copy> KeyedBuckets<K> {
    /// `per_period` tokens per `period_ms` per key (0 = unlimited).
    pub fn new(per_period: u32, period_ms: u64) -> Self {
        Self::with_max_keys(per_period, period_ms, MAX_KEYS)
    }

    /// [`KeyedBuckets::new`] holding at most `max_keys` keys.
    pub fn with_max_keys(per_period: u32, period_ms: u64, max_keys: usize) -> Self {
        let per_period = u64::from(per_period);
        KeyedBuckets {
            per_period,
            interval_us: (period_ms.saturating_mul(1000) / per_period.max(1)).max(1),
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// How far ahead of now a bucket's arrival time may be and still
    /// admit one more token: the burst minus one token.
    fn tolerance_us(&self) -> u64 {
        self.interval_us
            .saturating_mul(self.per_period.saturating_sub(1))
    }

    /// Take one token for `key` at `now_ms`, or return the milliseconds
    /// until one will be available.
    pub fn take(&self, key: K, now_ms: u64) -> Result<(), u32> {
        if self.per_period == 0 {
            return Ok(());
        }
        let now = now_ms.saturating_mul(1000);
        let mut map = lock(&self.buckets);
        if !map.contains_key(&key) && map.len() >= self.max_keys {
            // Forget the keys whose buckets are full again: they are
            // indistinguishable from keys never seen.
            map.retain(|_, tat| *tat > now);
            if map.len() >= self.max_keys {
                return Err(u32::try_from(self.interval_us.div_ceil(1000)).unwrap_or(u32::MAX));
            }
        }
        let tat = map.entry(key).or_insert(now);
        let start = (*tat).max(now);
        let ahead = start - now;
        if ahead > self.tolerance_us() {
            let wait_us = ahead - self.tolerance_us();
            return Err(u32::try_from(wait_us.div_ceil(1000))
                .unwrap_or(u32::MAX)
                .max(1));
        }
        *tat = start.saturating_add(self.interval_us);
        Ok(())
    }

    /// Give back a token taken for an attempt that did not happen after all.
    pub fn refund(&self, key: K) {
        if self.per_period == 0 {
            return;
        }
        if let Some(tat) = lock(&self.buckets).get_mut(&key) {
            *tat = tat.saturating_sub(self.interval_us);
        }
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        lock(&self.buckets).len()
    }

    /// No key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn connections_are_bounded_per_address_and_in_total() {
        let l = ConnectionLimiter::new(5, 3);
        let a: Vec<_> = (0..3).map(|_| l.try_admit(v4(1)).unwrap()).collect();
        assert_eq!(l.try_admit(v4(1)).unwrap_err(), ConnRefusal::PerAddress);
        let b: Vec<_> = (0..2).map(|_| l.try_admit(v4(2)).unwrap()).collect();
        assert_eq!(l.try_admit(v4(3)).unwrap_err(), ConnRefusal::Total);
        assert_eq!(l.open(), 5);
        drop(a);
        assert_eq!(l.open(), 2);
        let _again = l.try_admit(v4(1)).unwrap();
        drop(b);
        assert_eq!(l.open(), 1);
    }

    #[test]
    fn ipv6_hosts_count_per_64_and_mapped_v4_as_v4() {
        let l = ConnectionLimiter::new(100, 2);
        let host = |i: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, i));
        let _p1 = l.try_admit(host(1)).unwrap();
        let _p2 = l.try_admit(host(2)).unwrap();
        assert_eq!(
            l.try_admit(host(3)).unwrap_err(),
            ConnRefusal::PerAddress,
            "a fresh address in the same /64 is the same source"
        );
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped());
        assert_eq!(net_key(mapped), v4(9));
    }

    #[test]
    fn buckets_refuse_past_the_burst_and_refill_over_the_period() {
        // 3 per hour.
        let b = KeyedBuckets::new(3, 3_600_000);
        for _ in 0..3 {
            b.take(v4(1), 0).unwrap();
        }
        let wait = b.take(v4(1), 0).unwrap_err();
        assert_eq!(wait, 1_200_000, "one token every 20 minutes");
        assert!(b.take(v4(2), 0).is_ok(), "other keys are unaffected");
        assert_eq!(b.take(v4(1), 1_199_999).unwrap_err(), 1);
        assert!(b.take(v4(1), 1_200_000).is_ok());
        assert!(b.take(v4(1), 1_200_000).is_err());
        b.refund(v4(1));
        assert!(b.take(v4(1), 1_200_000).is_ok());
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let b = KeyedBuckets::new(0, 1000);
        for _ in 0..10_000 {
            b.take(1u32, 0).unwrap();
        }
        assert!(b.is_empty());
    }

    #[test]
    fn tables_stay_bounded_and_forget_idle_keys() {
        let b = KeyedBuckets::with_max_keys(1, 1000, 4);
        for k in 0..4u32 {
            b.take(k, 0).unwrap();
        }
        assert!(b.take(99, 0).is_err(), "a full table refuses new keys");
        assert_eq!(b.len(), 4);
        // A second later every bucket is full again: they are forgotten.
        b.take(99, 1000).unwrap();
        assert_eq!(b.len(), 1);
    }
}
