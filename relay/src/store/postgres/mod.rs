//! The PostgreSQL [`Store`]: any number of relay nodes share one PostgreSQL
//! cluster and keep no state of their own.
//!
//! Every mutating call is one transaction at `READ COMMITTED` (a large
//! commit group is several, one per lane of disjoint inboxes, see
//! `commit`); it is acknowledged only after PostgreSQL committed it on the
//! primary and (with
//! `synchronous_commit = on`, which every connection sets, and a
//! `synchronous_standby_names` on the server) on a synchronous standby.
//! [`PgStore::open`] refuses a cluster without a synchronous standby unless
//! told otherwise. Rows that several nodes may change at once are locked in
//! a fixed order (inbox rows by device id, then one `hush_totals` stripe), so
//! concurrent commits to one inbox from different nodes get contiguous,
//! unique seqs. The tables and which transaction touches what are in
//! `docs/STORAGE.md` ("PostgreSQL store").
//!
//! Module map: [`pool`] (blocking bridge, connections, retries), [`schema`]
//! (tables, versions, replication check), `commit`, `inbox` (pull, ack,
//! counters), `registry` (devices, prekeys, device lists), `purge`, `blobs`
//! (history-transfer archives).

mod blobs;
mod commit;
mod inbox;
pub mod pool;
mod purge;
mod registry;
pub mod schema;

pub use schema::{Replication, SCHEMA_VERSION};

/// Statements of a commit, for the tests of their query plans.
#[doc(hidden)]
pub mod commit_statements {
    pub use super::commit::{BEGIN, LOCK_INBOXES, READ_DEDUP, UPDATE_INBOXES};
}

use super::{
    BlobLimits, BlobMeta, BlobWrite, DeviceRecord, InboxPage, InboxState, NewEnvelope, PurgeStats,
    Store, StoreError, StoreLimits,
};
use hush_protocol::{
    BlobId, DeviceId, DeviceRegistration, OneTimePrekey, PrekeyBundle, SignedDeviceList,
    SignedPrekey, UserKey,
};
use pool::Pool;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a [`PgStore`] connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgOptions {
    /// Start even if the primary has no synchronous standby (commits are then
    /// durable on the primary only).
    pub allow_unreplicated: bool,
    /// Most idle connections kept open.
    pub max_idle_connections: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            allow_unreplicated: false,
            max_idle_connections: 8,
        }
    }
}

/// The PostgreSQL store.
#[derive(Debug)]
pub struct PgStore {
    pool: Pool,
    limits: StoreLimits,
    replication: Replication,
    /// Picks the `hush_totals` stripe of the next transaction.
    stripe: AtomicU64,
}

impl PgStore {
    /// Connect to `url` (`postgres://…`, possibly multi-host with
    /// `target_session_attrs=read-write`), create or check the schema, and
    /// check replication: without a synchronous standby this fails unless
    /// `options.allow_unreplicated`.
    pub fn open(url: &str, limits: StoreLimits, options: PgOptions) -> Result<PgStore, StoreError> {
        let pool = Pool::new(url, options.max_idle_connections, commit::PREPARED)?;
        pool.block(|| schema::migrate(&pool))??;
        let replication = pool.block(|| schema::replication(&pool))??;
        if !replication.is_synchronous() && !options.allow_unreplicated {
            return Err(StoreError::Backend(format!(
                "the PostgreSQL primary has no synchronous standby \
                 (synchronous_standby_names = '{}', {} standby(s) in sync): commits would \
                 not be replicated before they are acknowledged; configure one, or pass \
                 --allow-unreplicated to accept that",
                replication.standby_names, replication.sync_standbys
            )));
        }
        Ok(PgStore {
            pool,
            limits,
            replication,
            stripe: AtomicU64::new(u64::from(std::process::id())),
        })
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// What the replication check found at start-up.
    pub fn replication(&self) -> &Replication {
        &self.replication
    }

    /// Whether commits wait for a synchronous standby (as checked at start).
    pub fn replicated(&self) -> bool {
        self.replication.is_synchronous()
    }

    /// The `hush_totals` stripe the next transaction updates: spreading
    /// counter updates over stripes keeps concurrent transactions (of this and
    /// other nodes) from queueing on one row.
    fn next_stripe(&self) -> i16 {
        let n = self.stripe.fetch_add(1, Ordering::Relaxed);
        i16::try_from(n % schema::TOTAL_STRIPES as u64).unwrap_or(0)
    }
}

/// A `u64` as a `bigint`, clamped at `i64::MAX` (2^63 − 1 ms is 292 million
/// years; seqs and counters never get there).
pub(crate) fn db_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A non-negative `bigint` read back as `u64` (negative values, which the
/// store never writes, read as 0).
pub(crate) fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A value stored bit for bit (sender seqs: any `u64`, never compared in
/// SQL).
pub(crate) fn bits_to_db(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// Inverse of [`bits_to_db`].
pub(crate) fn bits_from_db(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// A fixed-size id column read back.
pub(crate) fn array<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], StoreError> {
    <[u8; N]>::try_from(bytes)
        .map_err(|_| StoreError::Backend(format!("postgres store: corrupt {what}")))
}

impl Store for PgStore {
    fn register_device(
        &self,
        registration: &DeviceRegistration,
        now_ms: u64,
    ) -> Result<DeviceRecord, StoreError> {
        self.pool
            .block(|| self.register_device_async(registration, now_ms))?
    }

    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.pool.block(|| self.device_async(device))?
    }

    fn commit(&self, batch: &[NewEnvelope]) -> Result<Vec<super::CommitOutcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.pool.block(|| self.commit_async(batch))?
    }

    fn pull(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        self.pool
            .block(|| self.pull_async(device, after, limit, max_bytes))?
    }

    fn ack(&self, device: &DeviceId, up_to: u64) -> Result<u64, StoreError> {
        self.pool.block(|| self.ack_async(device, up_to))?
    }

    fn inbox_state(&self, device: &DeviceId) -> Result<InboxState, StoreError> {
        self.pool.block(|| self.inbox_state_async(device))?
    }

    fn purge_expired(&self, now_ms: u64, max: usize) -> Result<PurgeStats, StoreError> {
        self.pool.block(|| self.purge_async(now_ms, max))?
    }

    fn publish_prekeys(
        &self,
        device: &DeviceId,
        signed_prekey: &SignedPrekey,
        one_time: &[OneTimePrekey],
    ) -> Result<u32, StoreError> {
        self.pool
            .block(|| self.publish_prekeys_async(device, signed_prekey, one_time))?
    }

    fn take_prekey_bundle(&self, device: &DeviceId) -> Result<Option<PrekeyBundle>, StoreError> {
        self.pool.block(|| self.take_prekey_bundle_async(device))?
    }

    fn one_time_prekeys_left(&self, device: &DeviceId) -> Result<u32, StoreError> {
        self.pool
            .block(|| self.one_time_prekeys_left_async(device))?
    }

    fn publish_device_list(&self, list: &SignedDeviceList) -> Result<u64, StoreError> {
        self.pool.block(|| self.publish_device_list_async(list))?
    }

    fn device_list(&self, user: &UserKey) -> Result<Option<SignedDeviceList>, StoreError> {
        self.pool.block(|| self.device_list_async(user))?
    }

    fn total_depth(&self) -> Result<u64, StoreError> {
        Ok(self.pool.block(|| self.totals_async())??.0)
    }

    fn touch_device(
        &self,
        device: &DeviceId,
        now_ms: u64,
        granularity_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.pool
            .block(|| self.touch_device_async(device, now_ms, granularity_ms))?
    }

    fn device_last_seen(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        self.pool.block(|| self.device_last_seen_async(device))?
    }

    fn remove_device(&self, device: &DeviceId, now_ms: u64) -> Result<bool, StoreError> {
        self.pool
            .block(|| self.remove_device_async(device, now_ms))?
    }

    fn publish_device_list_removing(
        &self,
        list: &SignedDeviceList,
        now_ms: u64,
    ) -> Result<(u64, Vec<DeviceId>), StoreError> {
        self.pool
            .block(|| self.publish_device_list_removing_async(list, now_ms))?
    }

    fn device_removed(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        self.pool.block(|| self.device_removed_async(device))?
    }

    fn lease_counts(
        &self,
        stale_before_ms: u64,
        owns: &(dyn Fn(&DeviceId) -> bool + Sync),
    ) -> Result<super::LeaseCounts, StoreError> {
        self.pool
            .block(|| self.lease_counts_async(stale_before_ms, owns))?
    }

    fn stored_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.pool.block(|| self.totals_async())??.1)
    }

    fn blob_put(
        &self,
        put: &BlobWrite<'_>,
        limits: &BlobLimits,
        now_ms: u64,
    ) -> Result<BlobMeta, StoreError> {
        self.pool
            .block(|| self.blob_put_async(put, limits, now_ms))?
    }

    fn blob_read(
        &self,
        blob: &BlobId,
        offset: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Option<(BlobMeta, Vec<u8>)>, StoreError> {
        self.pool
            .block(|| self.blob_read_async(blob, offset, max, now_ms))?
    }

    fn purge_blobs(&self, now_ms: u64, max: usize) -> Result<u64, StoreError> {
        self.pool.block(|| self.purge_blobs_async(now_ms, max))?
    }
}
