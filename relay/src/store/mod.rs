//! Durable storage of the relay, behind the [`Store`] trait.
//!
//! The relay keeps, per recipient device, an inbox of opaque envelope bytes
//! keyed by a contiguous relay seq, plus the small amount of metadata it needs
//! to route, deduplicate, expire and authenticate. Two implementations:
//!
//! - [`redb_store::RedbStore`] — the real one: a redb file for the index and
//!   metadata plus append-only segment files for the envelope bodies; every
//!   mutating call is one write transaction committed with
//!   `Durability::Immediate` (after the bodies it references were synced), so
//!   when it returns the change survives `kill -9`.
//! - [`memory::MemoryStore`] — the same semantics in memory, for the
//!   deterministic simulator and unit tests.
//!
//! The store never reads a clock: callers pass `now_ms`, so retention can be
//! tested with virtual time. It never sees plaintext: envelopes arrive as the
//! sender's bytes and leave unchanged. Group commit (batching concurrent sends
//! into one transaction) is the caller's job: [`Store::commit`] takes a batch.
//!
//! The redb file's tables, the segment files and their byte layouts are
//! specified in `docs/STORAGE.md`. The redb file is opened on `paced_file`,
//! redb's file backend syncing as it writes, so that a checkpoint reaches
//! the disk in slices instead of holding the sends' syncs behind it.

mod blobs;
mod keys;
pub mod memory;
mod paced_file;
pub mod postgres;
pub mod redb_store;
mod rules;
mod segments;
mod tables;
mod tombstones;

use hush_protocol::{
    BlobId, ConversationId, DeviceId, DeviceRegistration, MessageId, OneTimePrekey, PrekeyBundle,
    SignedDeviceList, SignedPrekey, Truncation, UserKey,
};

/// Where a relay keeps its data (`--store`).
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `redb:DIR`: the redb store (and its segment files) in `DIR`.
    Redb(std::path::PathBuf),
    /// `postgres://…` or `postgresql://…`: a PostgreSQL database, possibly
    /// with several hosts and `target_session_attrs=read-write`.
    Postgres(String),
}

impl StoreSpec {
    /// Parse `redb:DIR`, `postgres://…` or `postgresql://…`.
    pub fn parse(s: &str) -> Result<StoreSpec, String> {
        if let Some(dir) = s.strip_prefix("redb:") {
            if dir.is_empty() {
                return Err("redb: needs a directory (redb:DIR)".into());
            }
            return Ok(StoreSpec::Redb(dir.into()));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreSpec::Postgres(s.to_string()));
        }
        Err(format!(
            "unknown store {:?}: expected redb:DIR or postgres://…",
            StoreSpec::redact(s)
        ))
    }

    /// The spec as given (with its password, if any: for config files only).
    pub fn to_spec_string(&self) -> String {
        match self {
            StoreSpec::Redb(dir) => format!("redb:{}", dir.display()),
            StoreSpec::Postgres(url) => url.clone(),
        }
    }

    /// `s` with any URL password (in the user info or a `password=` query
    /// parameter) replaced by `***`, for logs and errors.
    pub fn redact(s: &str) -> String {
        let Some((scheme, rest)) = s.split_once("://") else {
            return s.to_string();
        };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                let hidden = if userinfo.contains(':') { ":***" } else { "" };
                format!("{user}{hidden}@{hosts}")
            }
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .map(|p| match p.split_once('=') {
                        Some(("password", _)) => "password=***".to_string(),
                        _ => p.to_string(),
                    })
                    .collect();
                format!("{path}?{}", params.join("&"))
            }
            None => tail.to_string(),
        };
        format!("{scheme}://{authority}{tail}")
    }
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Redb(dir) => write!(f, "Redb({})", dir.display()),
            // Never print a database password.
            StoreSpec::Postgres(url) => write!(f, "Postgres({})", StoreSpec::redact(url)),
        }
    }
}

/// Inbox and retention limits enforced inside the commit transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most unacknowledged envelopes one inbox may hold.
    pub max_inbox_messages: u64,
    /// Most unacknowledged envelope bytes one inbox may hold.
    pub max_inbox_bytes: u64,
    /// Most one-time prekeys one device may keep on the relay.
    pub max_one_time_prekeys: u32,
    /// Most bytes all stored envelopes may occupy together, counted as
    /// [`stored_cost`] per envelope (`u64::MAX` = no cap).
    pub max_store_bytes: u64,
    /// Most devices one user may register.
    pub max_devices_per_user: u32,
}

/// Bytes charged per stored envelope besides its segment record: its `inbox`
/// row (24-byte key, 76-byte value) and its `dedup` row (48-byte key,
/// 16-byte value), rounded up for the B-tree's per-entry overhead.
pub const INDEX_BYTES_PER_ENVELOPE: u64 = 192;

/// What one stored envelope of `len` bytes counts against
/// [`StoreLimits::max_store_bytes`]: its segment record (36-byte header +
/// the envelope) plus [`INDEX_BYTES_PER_ENVELOPE`]. Both stores count the
/// same, so they refuse at the same point.
pub fn stored_cost(len: u64) -> u64 {
    len.saturating_add(segments::RECORD_HEADER_LEN as u64)
        .saturating_add(INDEX_BYTES_PER_ENVELOPE)
}

/// Bytes charged per blob besides its declared size: its `blobs`,
/// `blob_owners` and `blob_expiry` rows, rounded up for the B-tree's
/// per-entry overhead.
pub const INDEX_BYTES_PER_BLOB: u64 = 256;

/// What one blob of declared size `total_len` counts against
/// [`StoreLimits::max_store_bytes`], from its creation until it is purged
/// (or replaced after expiring): the whole declared size is reserved when
/// the first piece arrives, so an upload that started never runs out of
/// room half way. Every store counts the same.
pub fn blob_cost(total_len: u64) -> u64 {
    total_len.saturating_add(INDEX_BYTES_PER_BLOB)
}

/// Default of [`StoreLimits::max_devices_per_user`].
pub const DEFAULT_MAX_DEVICES_PER_USER: u32 = 10;

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_inbox_messages: 100_000,
            max_inbox_bytes: 1024 * 1024 * 1024,
            max_one_time_prekeys: 1_000,
            max_store_bytes: u64::MAX,
            max_devices_per_user: DEFAULT_MAX_DEVICES_PER_USER,
        }
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Keys and certificate as registered.
    pub registration: DeviceRegistration,
    /// When it registered (relay clock).
    pub registered_at_ms: u64,
}

/// An envelope to commit, with the plaintext header fields the relay reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEnvelope {
    /// Inbox it goes to (= header's recipient device).
    pub recipient: DeviceId,
    /// Sending device (= header's sender device, = the authenticated device).
    pub sender: DeviceId,
    /// Header's message id; with sender and recipient, the dedup key.
    pub message_id: MessageId,
    /// Header's conversation id (kept in tombstones).
    pub conversation: ConversationId,
    /// Header's sender seq (kept in tombstones).
    pub sender_seq: u64,
    /// The envelope exactly as received (`Envelope::to_bytes`).
    pub bytes: Vec<u8>,
    /// When it is purged if still unacknowledged.
    pub expires_at_ms: u64,
}

/// Told a batch (as committed) and its outcomes once its envelopes are
/// written, before they are durable ([`Store::commit_early`]).
pub type Written<'a> = &'a mut dyn FnMut(&[NewEnvelope], &[CommitOutcome]);

/// What [`Store::commit_then`] calls once a batch's outcomes are final: the
/// batch back, and one outcome per envelope (durable) or the error.
pub type Then = Box<dyn FnOnce(Vec<NewEnvelope>, Result<Vec<CommitOutcome>, StoreError>) + Send>;

/// The fate of one [`NewEnvelope`] in a committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Stored under this relay seq in the recipient's inbox.
    Stored {
        /// The new relay seq.
        seq: u64,
    },
    /// Already stored earlier (same sender, recipient and message id, not
    /// yet expired): the original seq, nothing written.
    Duplicate {
        /// The original relay seq.
        seq: u64,
    },
    /// Not stored, nothing written for it.
    Refused(Refusal),
}

/// Why an envelope was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The recipient device is not registered.
    UnknownRecipient,
    /// The recipient's inbox holds `max_inbox_messages` already.
    QuotaMessages,
    /// The recipient's inbox would exceed `max_inbox_bytes`.
    QuotaBytes,
    /// All stored envelopes together would exceed `max_store_bytes`.
    StoreFull,
}

/// One stored envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// Its relay seq.
    pub seq: u64,
    /// The envelope bytes as the sender sent them (a shared slice of what
    /// the store read, so a page reaches the frame without a copy per
    /// envelope).
    pub bytes: bytes::Bytes,
}

/// A page read from an inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxPage {
    /// Envelopes with seq > `after`, ascending, at most `limit` and at most
    /// `max_bytes` in total (but always at least one if any exists).
    pub envelopes: Vec<StoredEnvelope>,
    /// Envelopes still stored after the last one of this page.
    pub remaining: u64,
    /// Set when envelopes with seq > `after` were purged before being acked:
    /// the tombstones of those seqs, merged into per-(sender, conversation)
    /// sender-seq ranges.
    pub truncated: Option<Truncation>,
}

/// Counters of one inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InboxState {
    /// Highest relay seq ever assigned in this inbox (0 = none).
    pub head: u64,
    /// Highest seq the device acknowledged (everything ≤ it is deleted).
    pub acked: u64,
    /// Envelopes currently stored.
    pub depth: u64,
    /// Bytes currently stored.
    pub bytes: u64,
}

/// What one purge pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeStats {
    /// Envelopes removed because they expired unread (tombstones written).
    pub expired: u64,
    /// Dedup entries removed.
    pub dedup_removed: u64,
}

/// A stored blob (an opaque history archive, see `docs/PROTOCOL.md` §8.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobMeta {
    /// The device that created it: the only one that may write it.
    pub owner: DeviceId,
    /// Its declared complete size.
    pub total_len: u64,
    /// Bytes committed so far (`0..=total_len`), always a prefix.
    pub committed: u64,
    /// When it was created (relay clock).
    pub created_at_ms: u64,
    /// When it stops existing (relay clock): from then on every call treats
    /// it as absent, and [`Store::purge_blobs`] deletes it.
    pub expires_at_ms: u64,
}

/// One `BlobPut`, as checked by the caller (protocol limits: `total_len >
/// 0`, `offset + bytes.len() ≤ total_len`, `bytes.len() ≤ MAX_BLOB_CHUNK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobWrite<'a> {
    /// The authenticated device writing.
    pub owner: DeviceId,
    /// The blob.
    pub blob: BlobId,
    /// Where `bytes` start.
    pub offset: u64,
    /// The declared complete size.
    pub total_len: u64,
    /// The bytes.
    pub bytes: &'a [u8],
}

/// Blob policy, checked inside the put's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLimits {
    /// Largest `total_len` of one blob.
    pub max_blob_bytes: u64,
    /// Most unexpired blobs one device may own.
    pub max_blobs_per_device: u32,
    /// Most bytes (sum of declared `total_len`) of one device's unexpired blobs.
    pub max_blob_bytes_per_device: u64,
    /// Lifetime of a blob from its creation, ms.
    pub ttl_ms: u64,
}

/// Default of [`BlobLimits::ttl_ms`]: a day.
pub const BLOB_TTL_MS: u64 = 24 * 60 * 60 * 1000;

impl Default for BlobLimits {
    fn default() -> Self {
        BlobLimits {
            max_blob_bytes: 256 * 1024 * 1024,
            max_blobs_per_device: 4,
            max_blob_bytes_per_device: 512 * 1024 * 1024,
            ttl_ms: BLOB_TTL_MS,
        }
    }
}

/// Storage failures. Bad input from peers is not a `StoreError` (the server
/// validates first); these are conflicts the caller reports as typed refusals,
/// or real IO/corruption problems.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The device id is registered with different keys.
    #[error("device already registered with different keys")]
    AlreadyRegistered,
    /// The device is not registered.
    #[error("unknown device")]
    UnknownDevice,
    /// A device list with this or a newer version is already stored.
    #[error("stale device list: stored version {stored}")]
    StaleDeviceList {
        /// The version already stored.
        stored: u64,
    },
    /// The user already has `max_devices_per_user` registered devices.
    #[error("the user already has {max} registered devices")]
    DeviceLimit {
        /// The cap in force.
        max: u32,
    },
    /// The database file failed or holds something unreadable.
    #[error("storage failure: {0}")]
    Backend(String),
    /// A blob write the writer may not make: the blob belongs to another
    /// device, or the write would change committed bytes.
    #[error("blob write refused: {0}")]
    BlobForbidden(&'static str),
    /// A blob write inconsistent with the blob: another `total_len`, or an
    /// offset past the committed length.
    #[error("blob write inconsistent: {0}")]
    BlobMismatch(&'static str),
    /// A new blob would exceed a [`BlobLimits`] bound.
    #[error("blob limit: {0}")]
    BlobLimit(String),
    /// No unexpired blob with this id (or, for a put at an offset other
    /// than 0, none to append to).
    #[error("unknown blob")]
    UnknownBlob,
    /// A new blob would take the store past `max_store_bytes` (see
    /// [`blob_cost`]).
    #[error("the relay's store is full")]
    StoreFull,
    /// The device was removed by its user ([`Store::remove_device`]): it may
    /// not register again.
    #[error("device removed")]
    DeviceRemoved,
}

/// Device counts for the lifecycle gauges ([`Store::lease_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseCounts {
    /// Registered devices last seen before the stale threshold.
    pub stale: u64,
    /// Devices removed by their users (remembered ids).
    pub removed: u64,
}

/// Default write granularity of [`Store::touch_device`]: an hour.
pub const LAST_SEEN_GRANULARITY_MS: u64 = 60 * 60 * 1000;

/// The relay's storage. All methods are synchronous and may block on disk;
/// async callers run them on a blocking thread. Every mutating method is
/// atomic and durable when it returns `Ok`.
pub trait Store: Send + Sync + 'static {
    /// Register a device. Registering the same keys again is a no-op
    /// (returns the existing record); different keys under the same id fail
    /// with [`StoreError::AlreadyRegistered`]. A new device of a user who
    /// already has `max_devices_per_user` devices fails with
    /// [`StoreError::DeviceLimit`] (checked in the same transaction).
    fn register_device(
        &self,
        registration: &DeviceRegistration,
        now_ms: u64,
    ) -> Result<DeviceRecord, StoreError>;

    /// Look a device up.
    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;

    /// Commit a batch of envelopes in ONE durable transaction and return one
    /// outcome per input, in order. `expires_at_ms` need not be
    /// non-decreasing within an inbox (retention classes differ, clocks
    /// step); see [`Store::purge_expired`] for the prefix rule that follows. Within the batch, envelopes to the same
    /// inbox get consecutive seqs in input order; a duplicate inside the batch
    /// gets the seq of its first occurrence. A dedup entry lives until
    /// [`Store::purge_expired`] passes the envelope's `expires_at_ms` (acking
    /// does not remove it), so a late retry still gets the original seq.
    fn commit(&self, batch: &[NewEnvelope]) -> Result<Vec<CommitOutcome>, StoreError>;

    /// [`Store::commit`], calling `written` with the batch's outcomes (one
    /// per input, in order) once its envelopes are written and while the
    /// commit makes them durable, so that live recipients can be pushed
    /// them early (docs/PROTOCOL.md §8.5). `written` is called at most
    /// once, and not at all by a store that cannot tell that moment (the
    /// default) or for a batch it commits some other way.
    ///
    /// A store that called `written` and then fails the commit must refuse
    /// every later commit until it is opened again ([`Store::failure`]):
    /// otherwise it would hand the seqs it announced to other envelopes
    /// while recipients hold the announced ones under them.
    fn commit_early(
        &self,
        batch: &[NewEnvelope],
        written: Written<'_>,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let _ = written;
        self.commit(batch)
    }

    /// [`Store::commit_early`] (or, without `written`, [`Store::commit`])
    /// that answers through `then`, with the batch back and its outcomes,
    /// once they are durable. A store that syncs behind its commits (the
    /// redb store) returns as soon as the batch is committed, so the
    /// caller can commit the next while this one syncs, and calls `then`
    /// later from another thread; `then`s come in commit order. The
    /// default commits in line and calls `then` before it returns.
    fn commit_then(&self, batch: Vec<NewEnvelope>, written: Option<Written<'_>>, then: Then) {
        let result = match written {
            Some(w) => self.commit_early(&batch, w),
            None => self.commit(&batch),
        };
        then(batch, result);
    }

    /// Read up to `limit` envelopes with seq > `after` from `device`'s inbox,
    /// stopping early once `max_bytes` would be exceeded.
    fn pull(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError>;

    /// Cumulative acknowledgement: delete every envelope and tombstone with
    /// seq ≤ `up_to` (clamped to the inbox head) and remember the cursor.
    /// Returns the acked cursor now in force (never moves backwards).
    fn ack(&self, device: &DeviceId, up_to: u64) -> Result<u64, StoreError>;

    /// Counters of one inbox (zeros for an empty or unknown one).
    fn inbox_state(&self, device: &DeviceId) -> Result<InboxState, StoreError>;

    /// Remove the expired prefix of each inbox: an envelope goes once its
    /// `expires_at_ms` ≤ `now_ms` and every older envelope of its inbox has
    /// gone too (with uniform retention, simply once it expired; after a
    /// clock step, or behind an envelope of the longer "important"
    /// retention class, it waits for the older one, so deletions stay
    /// prefixes: a normal envelope queued behind an unread important one is
    /// kept until that one is acked or expires). The dedup entry of such a
    /// held-back envelope still goes at its own `expires_at_ms`.
    /// Writes a tombstone (sender, conversation, sender seq) for each.
    /// Inboxes are taken in the order of their oldest envelope's expiry, at
    /// most `max` envelopes per call. Then drops expired dedup entries,
    /// looking at most `max` of them.
    fn purge_expired(&self, now_ms: u64, max: usize) -> Result<PurgeStats, StoreError>;

    /// Replace the device's signed prekey and append one-time prekeys (ids
    /// already present are ignored; the pool is capped at
    /// `max_one_time_prekeys`). Returns the one-time prekeys now available.
    /// Fails with [`StoreError::UnknownDevice`] if the device is not registered.
    fn publish_prekeys(
        &self,
        device: &DeviceId,
        signed_prekey: &SignedPrekey,
        one_time: &[OneTimePrekey],
    ) -> Result<u32, StoreError>;

    /// A bundle for starting a session with `device`, removing the one-time
    /// prekey it hands out (each is handed out at most once). `None` if the
    /// device has published no signed prekey; [`StoreError::UnknownDevice`] if
    /// it is not registered. The lowest-id one-time prekey goes first.
    fn take_prekey_bundle(&self, device: &DeviceId) -> Result<Option<PrekeyBundle>, StoreError>;

    /// One-time prekeys the device has left.
    fn one_time_prekeys_left(&self, device: &DeviceId) -> Result<u32, StoreError>;

    /// Store a user's signed device list if its version is newer than the
    /// stored one (the caller has checked the signature).
    fn publish_device_list(&self, list: &SignedDeviceList) -> Result<u64, StoreError>;

    /// A user's latest device list.
    fn device_list(&self, user: &UserKey) -> Result<Option<SignedDeviceList>, StoreError>;

    /// Total envelopes stored across all inboxes (for the inbox-depth metric).
    fn total_depth(&self) -> Result<u64, StoreError>;

    /// Bytes counted against `max_store_bytes`: the sum of [`stored_cost`]
    /// over every stored envelope. O(1).
    fn stored_bytes(&self) -> Result<u64, StoreError>;

    /// Write one chunk of a blob in one durable transaction and return the
    /// blob's state afterwards. A blob whose `expires_at_ms ≤ now_ms` counts
    /// as absent here and in every blob method (a put replaces it). Rules,
    /// in order:
    ///
    /// 1. No blob: a put at `offset` 0 creates it (owner = `put.owner`,
    ///    `created_at_ms = now_ms`, `expires_at_ms = now_ms + limits.ttl_ms`,
    ///    committed 0) unless `total_len > limits.max_blob_bytes`, or the
    ///    owner already has `max_blobs_per_device` unexpired blobs, or their
    ///    `total_len`s plus this one exceed `max_blob_bytes_per_device`
    ///    ([`StoreError::BlobLimit`]). A put at another offset fails with
    ///    [`StoreError::UnknownBlob`].
    /// 2. Another owner: [`StoreError::BlobForbidden`]; another `total_len`
    ///    or `offset > committed`: [`StoreError::BlobMismatch`].
    /// 3. The bytes below `committed` must equal the committed ones (else
    ///    [`StoreError::BlobForbidden`], nothing written); the rest is
    ///    appended and `committed` grows by its length. A put entirely
    ///    inside the committed prefix changes nothing (an idempotent retry).
    ///
    /// Expiry never moves: neither puts nor reads extend a blob's life.
    fn blob_put(
        &self,
        put: &BlobWrite<'_>,
        limits: &BlobLimits,
        now_ms: u64,
    ) -> Result<BlobMeta, StoreError>;

    /// A blob's state and up to `max` committed bytes from `offset`
    /// (`[offset, min(offset + max, committed))`, empty if `offset ≥
    /// committed` or `max` is 0). `None` if there is no unexpired blob with
    /// this id. Anyone may read: the caller decides who may ask.
    fn blob_read(
        &self,
        blob: &BlobId,
        offset: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Option<(BlobMeta, Vec<u8>)>, StoreError>;

    /// Delete blobs with `expires_at_ms ≤ now_ms` and all their bytes,
    /// oldest expiry first, at most `max` blobs per call; returns how many.
    fn purge_blobs(&self, now_ms: u64, max: usize) -> Result<u64, StoreError>;

    /// Note that `device` authenticated at `now_ms`: its last-seen time is
    /// written only if the stored one is at least `granularity_ms` older
    /// (so most connects cost a read, not a durable write). Returns the
    /// last-seen time stored before this call — the registration time if
    /// it never authenticated since — or `None` if the device is not
    /// registered (nothing is written then).
    fn touch_device(
        &self,
        device: &DeviceId,
        now_ms: u64,
        granularity_ms: u64,
    ) -> Result<Option<u64>, StoreError>;

    /// A registered device's last-seen time (see [`Store::touch_device`]).
    fn device_last_seen(&self, device: &DeviceId) -> Result<Option<u64>, StoreError>;

    /// Remove a device for good, in one durable transaction: delete its
    /// inbox (envelopes, tombstones, counters), its prekeys, its last-seen
    /// time and its registration (freeing its slot in its user's device
    /// count), and remember its id as removed at `now_ms`. From then on
    /// [`Store::register_device`] of that id fails with
    /// [`StoreError::DeviceRemoved`] and commits to it are refused as
    /// [`Refusal::UnknownRecipient`]. Returns whether a registered device
    /// was removed now (false if it was unknown or removed already).
    fn remove_device(&self, device: &DeviceId, now_ms: u64) -> Result<bool, StoreError>;

    /// Store a user's newer signed device list (as
    /// [`Store::publish_device_list`]) and, in the same durable transaction,
    /// remove (as [`Store::remove_device`]) every device the previously
    /// stored list named that this one drops and that is registered to the
    /// list's user. Returns the version and the devices removed now. A crash
    /// leaves both done or neither, so a dropped device is never left
    /// registered under a stored list that drops it. (A sharded store whose
    /// devices live on other shards than their user's list removes them
    /// first and stores the list last: see `ShardedStore`.)
    fn publish_device_list_removing(
        &self,
        list: &SignedDeviceList,
        now_ms: u64,
    ) -> Result<(u64, Vec<DeviceId>), StoreError>;

    /// When `device` was removed, if it was.
    fn device_removed(&self, device: &DeviceId) -> Result<Option<u64>, StoreError>;

    /// Registered devices last seen before `stale_before_ms`, and removed
    /// devices, counting only ids `owns` accepts (a sharded store counts
    /// each device on its own shard once). Walks the devices: the caller
    /// runs it from the periodic maintenance loop, never per request or per
    /// scrape.
    fn lease_counts(
        &self,
        stale_before_ms: u64,
        owns: &(dyn Fn(&DeviceId) -> bool + Sync),
    ) -> Result<LeaseCounts, StoreError>;

    /// One small step of segment compaction (see `docs/STORAGE.md` §4):
    /// move at most about `budget` bytes of live records out of a mostly
    /// dead sealed segment. Returns whether there is more to do. Stores
    /// without segments have nothing to compact.
    fn compact_step(&self, budget: u64) -> Result<bool, StoreError> {
        let _ = budget;
        Ok(false)
    }

    /// Make every commit so far durable in the store's own index, so the
    /// next open has nothing to recover (the redb store's envelope commits
    /// sync only their segment log; see `docs/STORAGE.md` §5). Called when
    /// the relay stops; stores whose every commit is durable have nothing
    /// to do.
    fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether a [`Store::checkpoint`] is due, for the relay's writer to
    /// take one on another thread (the redb store goes on committing sends
    /// to its segment log meanwhile). Stores whose every commit is durable
    /// never need one.
    fn checkpoint_due(&self) -> bool {
        false
    }

    /// Whether a page is read from this machine's memory or files, normally
    /// in well under a millisecond: the connection driver then reads a
    /// catch-up's next page on the connection's own task rather than on a
    /// blocking thread. Stores that read over the network keep `false`.
    fn local_reads(&self) -> bool {
        false
    }

    /// Why this store refuses every commit until the relay restarts, if it
    /// does: after a failed write or sync of its log nothing it writes can
    /// be trusted to be durable, and only the replay at the next open puts
    /// the log and the index back in order (docs/STORAGE.md §5). Reported by
    /// `GET /healthz` (503) and the `hush_store_failed` gauge, so that a
    /// supervisor restarts the relay instead of leaving it refusing sends.
    /// Stores that recover by themselves keep `None`.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// The devices `previous` names that `list` does not (in `previous`'s order).
pub(crate) fn dropped_devices(
    previous: Option<&SignedDeviceList>,
    list: &SignedDeviceList,
) -> Vec<DeviceId> {
    previous
        .map(|p| {
            p.list
                .devices
                .iter()
                .map(|e| e.device)
                .filter(|d| !list.list.devices.iter().any(|e| e.device == *d))
                .collect()
        })
        .unwrap_or_default()
}
