//! Counters, gauges and histograms, rendered in the Prometheus text format.
//!
//! Plain atomics instead of a metrics framework: the relay exports a dozen
//! series, and the hot paths (commit, pull) only do relaxed atomic adds.
//! Nothing here ever holds a device id, a message id or any envelope byte:
//! metrics are aggregate by construction.

use hush_protocol::ErrorCode;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Every refusal code, in wire order (index = position in this list).
const ALL_CODES: [ErrorCode; 21] = [
    ErrorCode::UnknownDevice,
    ErrorCode::BadAuth,
    ErrorCode::TooLarge,
    ErrorCode::Quota,
    ErrorCode::RateLimited,
    ErrorCode::ExpiredCursor,
    ErrorCode::BadFrame,
    ErrorCode::UnsupportedVersion,
    ErrorCode::NotAuthenticated,
    ErrorCode::Forbidden,
    ErrorCode::AlreadyRegistered,
    ErrorCode::NoPrekeys,
    ErrorCode::Replaced,
    ErrorCode::ShuttingDown,
    ErrorCode::Internal,
    ErrorCode::StoreFull,
    ErrorCode::DeviceLimit,
    ErrorCode::RegistrationLimit,
    ErrorCode::BlobLimit,
    ErrorCode::UnknownBlob,
    ErrorCode::DeviceRemoved,
];

/// The label value of a refusal code (`kind="…"`).
pub fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::UnknownDevice => "unknown_device",
        ErrorCode::BadAuth => "bad_auth",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::Quota => "quota",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::ExpiredCursor => "expired_cursor",
        ErrorCode::BadFrame => "bad_frame",
        ErrorCode::UnsupportedVersion => "unsupported_version",
        ErrorCode::NotAuthenticated => "not_authenticated",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::AlreadyRegistered => "already_registered",
        ErrorCode::NoPrekeys => "no_prekeys",
        ErrorCode::Replaced => "replaced",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Internal => "internal",
        ErrorCode::StoreFull => "store_full",
        ErrorCode::DeviceLimit => "device_limit",
        ErrorCode::RegistrationLimit => "registration_limit",
        ErrorCode::BlobLimit => "blob_limit",
        ErrorCode::UnknownBlob => "unknown_blob",
        ErrorCode::DeviceRemoved => "device_removed",
    }
}

fn code_index(code: ErrorCode) -> usize {
    ALL_CODES.iter().position(|c| *c == code).unwrap_or(0)
}

/// A histogram with fixed upper bounds (Prometheus `le` buckets).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One counter per bound plus one for `+Inf` (not cumulative).
    buckets: Vec<AtomicU64>,
    /// Sum of observations, as `f64` bits.
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram over ascending `bounds`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    /// Record one observation.
    pub fn observe(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        // A CAS loop: contention is low (one writer task, a few readers).
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of all observations.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }

    /// Observations at most `bound`, counted from the buckets whose upper
    /// bound is at most `bound` (so exact only at a bucket bound).
    pub fn count_at_most(&self, bound: f64) -> u64 {
        self.bounds
            .iter()
            .zip(&self.buckets)
            .take_while(|(b, _)| **b <= bound)
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        if let Some(inf) = self.buckets.last() {
            cumulative += inf.load(Ordering::Relaxed);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum());
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const SYNC_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// All of the relay's metrics. Shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    /// Envelopes received in `Send` requests (stored, duplicate or refused).
    pub sends_total: AtomicU64,
    /// Envelopes newly stored.
    pub envelopes_stored_total: AtomicU64,
    /// Envelopes that were retries of already stored ones.
    pub duplicate_sends_total: AtomicU64,
    /// Group-commit transactions.
    pub commit_batches_total: AtomicU64,
    /// Envelopes per group-commit transaction.
    pub commit_batch_size: Histogram,
    /// The commit writer's time in one group commit. With the redb store
    /// the group's segment sync runs behind it and is not included (see
    /// `send_durable_seconds`).
    pub commit_latency_seconds: Histogram,
    /// Time from a `Send` being queued for the commit writer to its durable
    /// outcome: the wait behind the commit in progress plus its own group's
    /// commit and sync. The relay's share of a sender's ack latency; the
    /// rest is the network and the two ends' QUIC stacks.
    pub send_durable_seconds: Histogram,
    /// Wall time of serving one `Pull`.
    pub pull_latency_seconds: Histogram,
    /// Envelopes currently stored across all inboxes (sampled).
    pub inbox_depth: AtomicU64,
    /// Pages that reported expired envelopes (`truncated`).
    pub truncations_total: AtomicU64,
    /// Pages served from a read ahead of their `Pull`.
    pub read_ahead_used_total: AtomicU64,
    /// Pages read ahead that no `Pull` asked for (read again, or never).
    pub read_ahead_wasted_total: AtomicU64,
    /// Reads ahead not started because the relay held its most already.
    pub read_ahead_skipped_total: AtomicU64,
    /// Envelopes removed by retention.
    pub expired_total: AtomicU64,
    /// Connections currently open.
    pub connections: AtomicI64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused before their handshake: the relay was full.
    pub connections_refused_total: AtomicU64,
    /// Connections refused before their handshake: their address was full.
    pub connections_refused_per_ip_total: AtomicU64,
    /// Unauthenticated connections closed for sending a frame larger than
    /// the pre-authentication limit.
    pub preauth_oversize_total: AtomicU64,
    /// HTTP connections closed (or refused) to keep slots for real requests.
    pub http_dropped_total: AtomicU64,
    /// `PrekeysLow` notices sent to devices.
    pub prekeys_low_notices_total: AtomicU64,
    /// Whether the store's commits wait for a synchronous standby: 1 or 0
    /// for PostgreSQL, -1 (not reported) for a local store.
    pub store_replicated: AtomicI64,
    /// 1 while the store refuses every commit until a restart
    /// ([`crate::store::Store::failure`]; sampled).
    pub store_failed: AtomicI64,
    /// WebSocket connections upgraded (also counted in `connections_total`).
    pub websocket_connections_total: AtomicU64,
    /// WebSocket connections closed for breaking the WebSocket protocol
    /// (text message, bad framing).
    pub websocket_violations_total: AtomicU64,
    /// Connections that authenticated (a sync session started).
    pub sync_sessions_started_total: AtomicU64,
    /// Sync sessions that caught up (drained their backlog, went live).
    pub sync_sessions_finished_total: AtomicU64,
    /// Sync sessions whose connection ended before catching up.
    pub sync_sessions_failed_total: AtomicU64,
    /// Time from connection open to caught up (relay clock).
    pub sync_catch_up_seconds: Histogram,
    /// Bytes received in accepted `BlobPut` requests (a resumed upload
    /// sends only what the relay did not commit yet).
    pub blob_bytes_received_total: AtomicU64,
    /// Bytes sent in `BlobChunk` answers.
    pub blob_bytes_sent_total: AtomicU64,
    /// Registered devices not seen for the stale period (sampled by the
    /// retention loop).
    pub devices_stale: AtomicU64,
    /// Device ids removed by their users, ever (sampled by the retention loop).
    pub devices_removed: AtomicU64,
    /// Devices removed by this relay process since it started.
    pub devices_removed_total: AtomicU64,
    /// Refusals by code.
    refusals: [AtomicU64; ALL_CODES.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zeros.
    pub fn new() -> Self {
        Metrics {
            sends_total: AtomicU64::new(0),
            envelopes_stored_total: AtomicU64::new(0),
            duplicate_sends_total: AtomicU64::new(0),
            commit_batches_total: AtomicU64::new(0),
            commit_batch_size: Histogram::new(BATCH_BOUNDS),
            commit_latency_seconds: Histogram::new(LATENCY_BOUNDS),
            send_durable_seconds: Histogram::new(LATENCY_BOUNDS),
            pull_latency_seconds: Histogram::new(LATENCY_BOUNDS),
            inbox_depth: AtomicU64::new(0),
            truncations_total: AtomicU64::new(0),
            read_ahead_used_total: AtomicU64::new(0),
            read_ahead_wasted_total: AtomicU64::new(0),
            read_ahead_skipped_total: AtomicU64::new(0),
            expired_total: AtomicU64::new(0),
            connections: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            connections_refused_total: AtomicU64::new(0),
            connections_refused_per_ip_total: AtomicU64::new(0),
            preauth_oversize_total: AtomicU64::new(0),
            http_dropped_total: AtomicU64::new(0),
            prekeys_low_notices_total: AtomicU64::new(0),
            store_replicated: AtomicI64::new(-1),
            store_failed: AtomicI64::new(0),
            websocket_connections_total: AtomicU64::new(0),
            websocket_violations_total: AtomicU64::new(0),
            sync_sessions_started_total: AtomicU64::new(0),
            sync_sessions_finished_total: AtomicU64::new(0),
            sync_sessions_failed_total: AtomicU64::new(0),
            blob_bytes_received_total: AtomicU64::new(0),
            blob_bytes_sent_total: AtomicU64::new(0),
            sync_catch_up_seconds: Histogram::new(SYNC_BOUNDS),
            devices_stale: AtomicU64::new(0),
            devices_removed: AtomicU64::new(0),
            devices_removed_total: AtomicU64::new(0),
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Count one refusal of kind `code`.
    pub fn refused(&self, code: ErrorCode) {
        if let Some(c) = self.refusals.get(code_index(code)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals of kind `code` so far.
    pub fn refusals(&self, code: ErrorCode) -> u64 {
        self.refusals
            .get(code_index(code))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {v}");
        };
        counter(
            &mut out,
            "hush_sends_total",
            "Envelopes received in Send requests.",
            Self::get(&self.sends_total),
        );
        counter(
            &mut out,
            "hush_envelopes_stored_total",
            "Envelopes durably stored.",
            Self::get(&self.envelopes_stored_total),
        );
        counter(
            &mut out,
            "hush_duplicate_sends_total",
            "Envelopes recognised as retries of stored ones.",
            Self::get(&self.duplicate_sends_total),
        );
        counter(
            &mut out,
            "hush_blob_bytes_received_total",
            "Bytes received in accepted BlobPut requests.",
            Self::get(&self.blob_bytes_received_total),
        );
        counter(
            &mut out,
            "hush_blob_bytes_sent_total",
            "Bytes sent in BlobChunk answers.",
            Self::get(&self.blob_bytes_sent_total),
        );
        counter(
            &mut out,
            "hush_sync_sessions_started_total",
            "Connections that authenticated (sync sessions started).",
            Self::get(&self.sync_sessions_started_total),
        );
        counter(
            &mut out,
            "hush_sync_sessions_finished_total",
            "Sync sessions that caught up (backlog drained, live).",
            Self::get(&self.sync_sessions_finished_total),
        );
        counter(
            &mut out,
            "hush_sync_sessions_failed_total",
            "Sync sessions whose connection ended before catching up.",
            Self::get(&self.sync_sessions_failed_total),
        );
        self.sync_catch_up_seconds.render(
            &mut out,
            "hush_sync_catch_up_seconds",
            "Time from connection open to caught up.",
        );
        counter(
            &mut out,
            "hush_commit_batches_total",
            "Group-commit transactions.",
            Self::get(&self.commit_batches_total),
        );
        self.commit_batch_size.render(
            &mut out,
            "hush_commit_batch_size",
            "Envelopes per group-commit transaction.",
        );
        self.commit_latency_seconds.render(
            &mut out,
            "hush_commit_latency_seconds",
            "Commit writer time of one group commit (the redb store syncs behind it).",
        );
        self.send_durable_seconds.render(
            &mut out,
            "hush_send_durable_seconds",
            "Time from a Send being queued for the commit writer to its durable outcome.",
        );
        self.pull_latency_seconds.render(
            &mut out,
            "hush_pull_latency_seconds",
            "Duration of serving one Pull.",
        );
        let replicated = self.store_replicated.load(Ordering::Relaxed);
        if replicated >= 0 {
            gauge(
                &mut out,
                "hush_store_replicated",
                "1 if stored envelopes are on a synchronous standby before they are acknowledged.",
                replicated,
            );
        }
        // Rendered on the runtime that serves `/metrics`: the relay's own.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            gauge(
                &mut out,
                "hush_runtime_workers",
                "Threads that run the connections (--workers).",
                i64::try_from(runtime.metrics().num_workers()).unwrap_or(i64::MAX),
            );
        }
        gauge(
            &mut out,
            "hush_store_failed",
            "1 if the store refuses every send until the relay is restarted (a failed write of its log or index).",
            self.store_failed.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "hush_inbox_depth",
            "Envelopes stored across all inboxes.",
            i64::try_from(Self::get(&self.inbox_depth)).unwrap_or(i64::MAX),
        );
        gauge(
            &mut out,
            "hush_devices_stale",
            "Registered devices not seen for the stale period (--stale-after).",
            i64::try_from(Self::get(&self.devices_stale)).unwrap_or(i64::MAX),
        );
        gauge(
            &mut out,
            "hush_devices_removed",
            "Devices removed by their users (ids remembered by the store).",
            i64::try_from(Self::get(&self.devices_removed)).unwrap_or(i64::MAX),
        );
        counter(
            &mut out,
            "hush_devices_removed_total",
            "Devices removed by their users through this relay process.",
            Self::get(&self.devices_removed_total),
        );
        counter(
            &mut out,
            "hush_truncations_total",
            "Pages that reported envelopes expired unread.",
            Self::get(&self.truncations_total),
        );
        counter(
            &mut out,
            "hush_read_ahead_used_total",
            "Catch-up pages served from a read ahead of their Pull.",
            Self::get(&self.read_ahead_used_total),
        );
        counter(
            &mut out,
            "hush_read_ahead_wasted_total",
            "Catch-up pages read ahead that no Pull asked for.",
            Self::get(&self.read_ahead_wasted_total),
        );
        counter(
            &mut out,
            "hush_read_ahead_skipped_total",
            "Reads ahead not started: the relay held its most already.",
            Self::get(&self.read_ahead_skipped_total),
        );
        counter(
            &mut out,
            "hush_expired_total",
            "Envelopes removed by retention.",
            Self::get(&self.expired_total),
        );
        gauge(
            &mut out,
            "hush_connections",
            "Connections currently open.",
            self.connections.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "hush_connections_total",
            "Connections accepted.",
            Self::get(&self.connections_total),
        );
        let _ = writeln!(
            out,
            "# HELP hush_connections_refused_total Connection attempts refused before their handshake, by bound."
        );
        let _ = writeln!(out, "# TYPE hush_connections_refused_total counter");
        let _ = writeln!(
            out,
            "hush_connections_refused_total{{limit=\"total\"}} {}",
            Self::get(&self.connections_refused_total)
        );
        let _ = writeln!(
            out,
            "hush_connections_refused_total{{limit=\"per_ip\"}} {}",
            Self::get(&self.connections_refused_per_ip_total)
        );
        counter(
            &mut out,
            "hush_preauth_oversize_total",
            "Unauthenticated connections closed for a frame over the pre-authentication limit.",
            Self::get(&self.preauth_oversize_total),
        );
        counter(
            &mut out,
            "hush_http_dropped_total",
            "HTTP connections dropped or refused to keep serving real requests.",
            Self::get(&self.http_dropped_total),
        );
        counter(
            &mut out,
            "hush_prekeys_low_notices_total",
            "PrekeysLow notices sent to devices.",
            Self::get(&self.prekeys_low_notices_total),
        );
        counter(
            &mut out,
            "hush_websocket_connections_total",
            "WebSocket connections upgraded.",
            Self::get(&self.websocket_connections_total),
        );
        counter(
            &mut out,
            "hush_websocket_violations_total",
            "WebSocket connections closed for breaking the WebSocket protocol.",
            Self::get(&self.websocket_violations_total),
        );
        let _ = writeln!(
            out,
            "# HELP hush_refusals_total Requests or envelopes refused, by kind."
        );
        let _ = writeln!(out, "# TYPE hush_refusals_total counter");
        for code in ALL_CODES {
            let _ = writeln!(
                out,
                "hush_refusals_total{{kind=\"{}\"}} {}",
                code_label(code),
                self.refusals(code)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 10.0]);
        h.observe(0.5);
        h.observe(5.0);
        h.observe(50.0);
        let mut out = String::new();
        h.render(&mut out, "x", "test");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 55.5\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert_eq!(h.count_at_most(0.1), 0);
        assert_eq!(h.count_at_most(1.0), 1);
        assert_eq!(h.count_at_most(10.0), 2);
        assert_eq!(h.count_at_most(100.0), 2, "+Inf is not a bound");
    }

    #[test]
    fn refusals_render_per_kind() {
        let m = Metrics::new();
        m.refused(ErrorCode::RateLimited);
        m.refused(ErrorCode::RateLimited);
        m.refused(ErrorCode::Internal);
        let text = m.render();
        assert!(text.contains("hush_refusals_total{kind=\"rate_limited\"} 2\n"));
        assert!(text.contains("hush_refusals_total{kind=\"internal\"} 1\n"));
        assert!(text.contains("hush_refusals_total{kind=\"bad_auth\"} 0\n"));
        assert_eq!(m.refusals(ErrorCode::RateLimited), 2);
    }
}
