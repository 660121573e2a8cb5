//! The relay's durable [`Store`]: one redb file for the index and metadata,
//! plus append-only segment files for the envelope bodies.
//!
//! Every mutating call is exactly one write transaction: when it returns
//! `Ok`, the change survives `kill -9` and power loss; when it fails, nothing
//! of it is visible. A commit first appends the batch's envelopes and a
//! trailer (its commit record) to the active segment file and syncs it, then
//! commits the redb transaction whose small `inbox` rows point at them (see
//! the private `segments` module for why and how). That redb commit is made
//! without a sync of its own ([`Durability::None`]): the synced batch is the
//! durable copy, and opening the store commits again any batch whose index
//! commit a crash undid ([`RedbStore::recovered_at_open`]). One sync per
//! send, not two; a durable redb commit (a checkpoint) every
//! [`CHECKPOINT_ENVELOPES`] or [`CHECKPOINT_INTERVAL`] bounds that replay.
//! Other writes commit with [`Durability::Immediate`]. Reads run in read
//! transactions on an MVCC snapshot and never wait for the writer. redb
//! allows one writer at a time, which is why [`Store::commit`] takes a whole
//! batch: the caller's group commit turns many concurrent sends into one
//! segment sync and one redb commit. Through [`Store::commit_then`] that
//! sync runs behind the commit on a thread of its own, and the batch is
//! answered once it is done, while the writer commits the next one (the
//! private `behind` module says what waits for it meanwhile). The tables, the segment files and their
//! byte layouts are specified in `docs/STORAGE.md` (see also the private
//! `tables` module).

use super::keys::{
    DedupExpiryKey, DedupKey, InboxKey, OtkKey, QueueKey, dedup_expiry_key, dedup_expiry_upper,
    dedup_key, inbox_key, otk_key, queue_key, queue_upper, split_inbox_key, split_otk_key,
    split_queue_key,
};
use super::paced_file::{PacedFile, Pacing};
use super::rules::{self, PageBudget};
pub use super::segments::DEFAULT_SEGMENT_BYTES;
use super::segments::{
    Append, BATCH_ENTRY_LEN, BATCH_HEADER_LEN, BodyRef, LogTail, LoggedFields, RECORD_HEADER_LEN,
    ReadError, SEGMENT_HEADER_LEN, Segments,
};
use super::tables::SegmentInfo;
use super::tables::*;
use super::tombstones;
use super::{
    CommitOutcome, DeviceRecord, INDEX_BYTES_PER_ENVELOPE, InboxPage, InboxState, NewEnvelope,
    PurgeStats, Refusal, Store, StoreError, StoreLimits, StoredEnvelope, stored_cost,
};
use hush_protocol::{
    DeviceId, DeviceRegistration, OneTimePrekey, PrekeyBundle, SignedDeviceList, SignedPrekey,
    UserKey,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redb::{Table, WriteTransaction};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[path = "redb_blobs.rs"]
mod blobs;

macro_rules! backend_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Backend(format!("redb: {e}"))
            }
        }
    )*};
}

backend_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
);

/// Whether a write transaction changed anything: unchanged ones are aborted
/// instead of committed, which saves an fsync on no-op calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Changed {
    Yes,
    No,
}

/// The redb-backed store. Cheap to share behind an `Arc`; all methods take
/// `&self` and are safe to call from many threads.
pub struct RedbStore {
    /// The segment syncs of send commits, run behind them on a thread of
    /// their own ([`behind`]); `None` if that thread could not be started
    /// (sends then sync in line). First, so that it finishes what is
    /// queued before anything else is released.
    behind: Option<behind::Behind>,
    db: Database,
    /// Whether `hush.redb` is written in synced slices (off for large
    /// checkpoints).
    pacing: std::sync::Arc<Pacing>,
    limits: StoreLimits,
    /// The envelope bodies.
    segments: Segments,
    /// Acks handled so far; picks which ones commit durably.
    acks: std::sync::atomic::AtomicU64,
    /// Sum of [`stored_cost`] over the committed `inbox` rows: the live
    /// record bytes of the segment rows plus [`INDEX_BYTES_PER_ENVELOPE`]
    /// per live row; plus [`super::blob_cost`] over the `blobs` rows.
    /// Counted at open and kept up to date by every commit (raised under
    /// the segments' commit lock, or by a checkpoint's drain of batches
    /// already counted in [`ahead::Ahead`]'s `added`, which it lowers right
    /// after: the sum is never undercounted; lowered after a commit).
    stored: AtomicU64,
    /// Progress of segment compaction.
    compaction: std::sync::Mutex<Compaction>,
    /// Envelopes the open recovered from the segment log.
    recovered: AtomicU64,
    /// When the index was last committed durably.
    checkpoint: std::sync::Mutex<Checkpoint>,
    /// Send batches in the log that a running checkpoint keeps out of the
    /// index for now ([`ahead`]).
    ahead: std::sync::Mutex<ahead::Ahead>,
    /// Signalled when the log's backlog has been indexed.
    indexed: std::sync::Condvar,
    /// A transaction of the index failed on the file (an I/O error): redb
    /// then refuses every later operation on it until it is opened again,
    /// so the store reports a [`Store::failure`].
    index_failed: std::sync::atomic::AtomicBool,
}

mod ahead;
mod behind;
mod dedup_runs;
mod runs;

/// Where segment compaction stands (in memory only: after a restart it
/// starts over, and records already moved are simply no longer live).
#[derive(Debug, Default)]
struct Compaction {
    /// The segment being compacted and the offset of the next record to
    /// look at.
    cursor: Option<(u32, u64)>,
    /// Segments not tried again: a whole pass did not empty them (their live
    /// count disagrees with their records; `check_consistency` reports
    /// that), or one of their records is damaged.
    skip: std::collections::BTreeSet<u32>,
}

/// A sealed segment is compacted once its live record bytes are below this
/// percentage of its record bytes.
pub const COMPACT_BELOW_PERCENT: u64 = 50;

/// Record bytes one [`Store::compact_step`] of the writer looks at.
pub const COMPACT_STEP_BYTES: u64 = 256 * 1024;

/// Whether a sealed segment is sparse enough to compact.
fn worth_compacting(info: &SegmentInfo) -> bool {
    let records = info.end.saturating_sub(SEGMENT_HEADER_LEN);
    info.live > 0
        && u128::from(info.live_bytes) * 100
            < u128::from(records) * u128::from(COMPACT_BELOW_PERCENT)
}

/// One ack in this many is committed with an fsync (see `RedbStore::write_with`).
/// Few, because a durable commit also writes out every index page the sends
/// since the last one changed (their commits are not synced, §5 of
/// `docs/STORAGE.md`): an ack early in a catch-up that did that held the
/// drain for the checkpoint of the whole backlog. The relay's writer
/// checkpoints when quiet, so acks rarely need to.
pub const DURABLE_ACK_EVERY: u64 = 1024;

/// Envelopes whose index rows are committed without a sync, at most, before
/// an envelope commit is made durable (a checkpoint). Their batches are
/// durable in the segment log all along; this bounds what the next open
/// replays, and what a checkpoint writes: redb writes every page the commits
/// since the last durable one changed, about 300 bytes per envelope, while
/// sends wait (`BENCHMARKS.md`: a checkpoint after 100,000 took ~50 ms).
pub const CHECKPOINT_ENVELOPES: u64 = 131_072;

/// Longest time between two durable commits while envelopes arrive (see
/// [`CHECKPOINT_ENVELOPES`]).
///
/// A checkpoint runs beside the sends, but its writes of every index page
/// since the last one share the disk with the sends' segment syncs, which
/// wait behind what was written before them: at 10,000 sends/s a
/// checkpoint every 10 s (~30 MB) held them 70–170 ms once a run on a
/// slower disk, every 2 s about 20 ms (`BENCHMARKS.md`, "Peers"), and
/// written in synced slices ([`PACED_CHECKPOINT_ENVELOPES`]) about 1 ms.
/// Fast ingest reaches [`CHECKPOINT_ENVELOPES`] first either way.
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Checkpoints of fewer envelopes than this (about 10 MB of index pages:
/// below ~16,000 sends/s with [`CHECKPOINT_INTERVAL`]) write `hush.redb`
/// in synced slices, so the sends' segment syncs never wait behind the
/// whole checkpoint; larger ones, under heavy ingest, in one go (see the
/// private `paced_file` module for both measurements).
pub const PACED_CHECKPOINT_ENVELOPES: u64 = 32_768;

/// Batches of at least this many envelopes build their index rows on the
/// writer's thread while another thread waits for the segment's
/// `fdatasync` ([`beside_sync`]). Below it the rows take less time than
/// starting that thread saves.
pub const SYNC_BESIDE_ENVELOPES: usize = 64;

/// Run `work` (the rest of a commit's index writes) and `append`'s sync,
/// side by side when the batch has [`SYNC_BESIDE_ENVELOPES`] or more
/// envelopes. The sync is disk time, not CPU time: under heavy ingest it
/// was a third of each group commit, with the writer idle. The transaction
/// commits only after both, so no row is visible before its body is durable.
fn beside_sync<R>(
    append: &Append,
    envelopes: usize,
    work: impl FnOnce() -> R,
) -> (Result<(), StoreError>, R) {
    if envelopes < SYNC_BESIDE_ENVELOPES || append.replaying() {
        let out = work();
        return (append.sync(), out);
    }
    std::thread::scope(|scope| {
        let syncer = std::thread::Builder::new()
            .name("hush-sync".into())
            .spawn_scoped(scope, || append.sync());
        let out = work();
        let synced = match syncer {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(StoreError::Backend("segment sync thread failed".into()))),
            // No thread to be had: sync here, after the work.
            Err(_) => append.sync(),
        };
        (synced, out)
    })
}

/// Format 6's per-envelope dedup table, read while it still holds entries:
/// a format 6 file's entries stay in it until they expire (purged as
/// before), and format 7 writes only `dedup_runs`. Empty (every new file,
/// and every upgraded one after one retention period), it costs no lookup.
struct LegacyDedup<T> {
    table: Option<T>,
}

impl<T> LegacyDedup<T>
where
    T: ReadableTable<&'static DedupKey, &'static [u8]> + ReadableTableMetadata,
{
    fn new(table: T) -> Result<Self, StoreError> {
        let live = table.len()? > 0;
        Ok(LegacyDedup {
            table: live.then_some(table),
        })
    }

    /// The seq of a format 6 dedup entry.
    fn lookup(&self, dk: &DedupKey) -> Result<Option<u64>, StoreError> {
        match &self.table {
            Some(t) => Ok(t
                .get(dk)?
                .map(|g| decode_dedup(g.value()))
                .transpose()?
                .map(|e| e.seq)),
            None => Ok(None),
        }
    }
}

impl<'t> LegacyDedup<Table<'t, &'static DedupKey, &'static [u8]>> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        LegacyDedup::new(txn.open_table(DEDUP)?)
    }
}

/// A batch in the segment log past the index's end, being committed to the
/// index with the seqs its records carry: found at open (§5 of
/// `docs/STORAGE.md`), or appended while a checkpoint held the index
/// ([`ahead`]).
struct Replay {
    /// Its segment.
    id: u32,
    /// Its records (inbox, seq, where), in order.
    records: std::collections::VecDeque<(DeviceId, u64, BodyRef)>,
    /// Where its first record begins, and one past its trailer.
    span: (u64, u64),
    /// The segment before `id`, when this batch is the first of a segment
    /// that has no row yet.
    rolled_from: Option<u32>,
}

/// Envelopes committed since the last durable commit.
#[derive(Debug)]
struct Checkpoint {
    /// Envelopes stored by commits without a sync since then.
    envelopes: u64,
    /// Whether any commit without a sync happened since then.
    dirty: bool,
    /// When the last durable commit finished.
    at: std::time::Instant,
}

/// A send commit whose sync runs behind it: its generation.
type Behind<'a> = behind::Ticket<'a>;

/// Snapshots a pull tries before a missing segment is an error.
const PULL_ATTEMPTS: usize = 3;

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

type InboxTable<'t> = Table<'t, &'static [u8; 24], &'static [u8]>;
type MetaTable<'t> = Table<'t, &'static [u8; 16], &'static [u8]>;
type QueueTable<'t> = Table<'t, &'static QueueKey, ()>;
type BatchTable<'t> = Table<'t, &'static DedupExpiryKey, &'static [u8]>;
type SegmentTable<'t> = Table<'t, &'static SegmentKey, &'static [u8]>;

/// Rows removed from each segment by one transaction: (rows, record bytes).
type Released = BTreeMap<u32, (u64, u64)>;

/// Where the envelope segments of the database at `path` live: a directory
/// next to it, named after it with the extension `envelopes`
/// (`hush.redb` → `hush.envelopes/`).
pub fn segment_dir(path: &Path) -> PathBuf {
    path.with_extension("envelopes")
}

/// The default `max_store_bytes` for a store at `path`: a quarter of the
/// space available (to unprivileged users) on the filesystem holding it,
/// plus what its redb file and segment files already take. A quarter,
/// because the cap counts live envelopes, and the disk holds more than
/// that: the dead bytes of segments not yet compacted (compaction keeps a
/// sealed segment at least half live, so at most as much again), redb's
/// free pages, and the rest of the machine. On platforms without `statvfs`
/// there is no default cap.
pub fn default_max_store_bytes(path: &Path) -> Result<u64, StoreError> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let vfs = rustix::fs::statvfs(dir)
            .map_err(|e| StoreError::Backend(format!("statvfs of {}: {e}", dir.display())))?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let mut used = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if let Ok(entries) = std::fs::read_dir(segment_dir(path)) {
            for entry in entries.flatten() {
                used = used.saturating_add(entry.metadata().map(|m| m.len()).unwrap_or(0));
            }
        }
        Ok(free.saturating_add(used) / 4)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(u64::MAX)
    }
}

/// Check the format version of a freshly opened database and create every
/// table. A file of another version is refused before anything is created
/// in it (and before its segment directory is touched), except the previous
/// format, which is upgraded in the same transaction (see
/// [`FORMAT_VERSION_UPGRADABLE`]).
fn init_tables(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    let stored = {
        let mut info = txn.open_table(INFO)?;
        let stored = info
            .get(FORMAT_KEY)?
            .map(|g| decode_format(g.value()))
            .transpose()?;
        if let Some(other) = stored
            && other != FORMAT_VERSION
            && other != FORMAT_VERSION_SINGLE_ROWS
            && other != FORMAT_VERSION_PREVIOUS
            && other != FORMAT_VERSION_OLDER
            && other != FORMAT_VERSION_UPGRADABLE
        {
            return Err(StoreError::Backend(format!(
                "unsupported store format {other} (this relay reads format \
                 {FORMAT_VERSION} and upgrades format {FORMAT_VERSION_SINGLE_ROWS}, format \
                 {FORMAT_VERSION_PREVIOUS}, format {FORMAT_VERSION_OLDER} and format \
                 {FORMAT_VERSION_UPGRADABLE}; there is no \
                 conversion from others: start from an empty data directory)"
            )));
        }
        if stored != Some(FORMAT_VERSION) {
            info.insert(FORMAT_KEY, FORMAT_VERSION.to_be_bytes().as_slice())?;
        }
        stored
    };
    // Opening a table in a write transaction creates it, so read
    // transactions can always open every table afterwards.
    txn.open_table(INBOX)?;
    txn.open_table(SEGMENTS)?;
    txn.open_table(DEDUP)?;
    txn.open_table(DEDUP_BATCHES)?;
    txn.open_table(DEDUP_RUNS)?;
    txn.open_table(DEDUP_RUN_QUEUE)?;
    txn.open_table(INBOX_META)?;
    let devices = txn.open_table(DEVICES)?;
    let mut user_devices = txn.open_table(USER_DEVICES)?;
    txn.open_table(SIGNED_PREKEYS)?;
    txn.open_table(ONE_TIME_PREKEYS)?;
    let mut lists = txn.open_table(DEVICE_LISTS)?;
    txn.open_table(PURGE_QUEUE)?;
    txn.open_table(TOMBSTONES)?;
    txn.open_table(BLOBS)?;
    txn.open_table(BLOB_CHUNKS)?;
    txn.open_table(BLOB_OWNERS)?;
    txn.open_table(BLOB_EXPIRY)?;
    let mut seen = txn.open_table(DEVICE_SEEN)?;
    txn.open_table(REMOVED_DEVICES)?;
    if stored.is_some_and(|v| v == FORMAT_VERSION_OLDER || v == FORMAT_VERSION_UPGRADABLE) {
        // Formats 3 and 4 kept no last-seen time: every device counts as
        // seen when it registered until it authenticates again.
        for item in devices.range::<&[u8; 16]>(..)? {
            let (k, v) = item?;
            let record = decode_device(DeviceId(*k.value()), v.value())?;
            seen.insert(k.value(), record.registered_at_ms)?;
        }
    }
    if stored == Some(FORMAT_VERSION_UPGRADABLE) {
        for item in devices.range::<&[u8; 16]>(..)? {
            let (k, v) = item?;
            let device = DeviceId(*k.value());
            let record = decode_device(device, v.value())?;
            user_devices.insert(&user_device_key(&record.registration.user, &device), ())?;
        }
        // Format 3 stored device lists whose entries carry no membership
        // proof; no such list is valid any more, and its rows would read as
        // corrupt. Dropping them is safe: every device re-publishes its
        // user's list (version + 1, with proofs) when a fetch finds none.
        lists.retain(|_, _| false)?;
    }
    drop((devices, user_devices, lists, seen));
    if stored == Some(FORMAT_VERSION) {
        txn.abort()?;
    } else {
        txn.commit()?;
    }
    Ok(())
}

/// Every committed `segments` row.
fn segment_rows<T>(table: &T) -> Result<BTreeMap<u32, SegmentInfo>, StoreError>
where
    T: ReadableTable<&'static SegmentKey, &'static [u8]>,
{
    let mut rows = BTreeMap::new();
    for item in table.range::<&SegmentKey>(..)? {
        let (k, v) = item?;
        rows.insert(u32::from_be_bytes(*k.value()), decode_segment(v.value())?);
    }
    Ok(rows)
}

/// The active segment: the highest id with a row.
fn active_segment(segs: &SegmentTable<'_>) -> Result<Option<u32>, StoreError> {
    Ok(segs.last()?.map(|(k, _)| u32::from_be_bytes(*k.value())))
}

/// Take the released rows off their segments' live counts. A segment left
/// with no live rows that is not the active one loses its row here and is
/// listed in `freed`, to be deleted once this transaction is durable.
/// Returns what the released rows counted against the store cap.
fn release_segments(
    segs: &mut SegmentTable<'_>,
    released: &Released,
    freed: &mut Vec<u32>,
) -> Result<u64, StoreError> {
    if released.is_empty() {
        return Ok(0);
    }
    let cost = released.values().fold(0u64, |sum, &(rows, bytes)| {
        sum.saturating_add(bytes)
            .saturating_add(rows.saturating_mul(INDEX_BYTES_PER_ENVELOPE))
    });
    let active = active_segment(segs)?;
    for (&id, &(rows, bytes)) in released {
        let key = id.to_be_bytes();
        let mut info = segs
            .get(&key)?
            .map(|g| decode_segment(g.value()))
            .transpose()?
            .ok_or_else(|| corrupt(&format!("segment row {id} (missing)")))?;
        if info.live < rows || info.live_bytes < bytes {
            return Err(corrupt(&format!("segment row {id} (live count)")));
        }
        info.live -= rows;
        info.live_bytes -= bytes;
        if info.live == 0 && Some(id) != active {
            segs.remove(&key)?;
            freed.push(id);
        } else {
            segs.insert(&key, encode_segment(&info).as_slice())?;
        }
    }
    Ok(cost)
}

/// Count an index row's record as released.
fn note_release(released: &mut Released, body: &BodyRef) {
    let e = released.entry(body.segment).or_insert((0, 0));
    e.0 += 1;
    e.1 += body.record_len();
}

impl RedbStore {
    /// Open the database at `path`, creating the file and its tables if
    /// missing. After an unclean shutdown redb repairs the file here, so the
    /// first open after a crash may take longer. Fails if another process (or
    /// another `RedbStore` in this one) has the file open, or if it holds a
    /// different format version.
    pub fn open(path: impl AsRef<Path>, limits: StoreLimits) -> Result<RedbStore, StoreError> {
        RedbStore::open_with_segment_size(path, limits, DEFAULT_SEGMENT_BYTES)
    }

    /// [`RedbStore::open`] with segments rolled at `segment_bytes` instead of
    /// [`DEFAULT_SEGMENT_BYTES`] (the relay's `--segment-bytes`; small
    /// segments also let tests exercise rolling and deletion). The segment files live in [`segment_dir`]`(path)`.
    /// Bytes past a segment's committed end (a batch that was being written
    /// when the relay died, never acknowledged) are cut off here, and segment
    /// files that no row references any more are deleted.
    pub fn open_with_segment_size(
        path: impl AsRef<Path>,
        limits: StoreLimits,
        segment_bytes: u64,
    ) -> Result<RedbStore, StoreError> {
        let path = path.as_ref();
        let pacing = Pacing::new();
        let db = Database::builder().create_with_backend(PacedFile::open(path, pacing.clone())?)?;
        init_tables(&db)?;
        let rows = {
            let txn = db.begin_read()?;
            segment_rows(&txn.open_table(SEGMENTS)?)?
        };
        let (segments, tail) = Segments::open(
            segment_dir(path),
            segment_bytes,
            &[
                FORMAT_VERSION,
                FORMAT_VERSION_SINGLE_ROWS,
                FORMAT_VERSION_PREVIOUS,
                FORMAT_VERSION_OLDER,
                FORMAT_VERSION_UPGRADABLE,
            ],
            &rows,
        )?;
        let blob_bytes = blobs::counted(&db.begin_read()?)?;
        let stored = rows.values().fold(blob_bytes, |sum, info| {
            sum.saturating_add(info.live_bytes)
                .saturating_add(info.live.saturating_mul(INDEX_BYTES_PER_ENVELOPE))
        });
        let store = RedbStore {
            behind: behind::Behind::start(),
            db,
            pacing,
            limits,
            segments,
            acks: AtomicU64::new(0),
            stored: AtomicU64::new(stored),
            compaction: std::sync::Mutex::new(Compaction::default()),
            recovered: AtomicU64::new(0),
            checkpoint: std::sync::Mutex::new(Checkpoint {
                envelopes: 0,
                dirty: false,
                at: std::time::Instant::now(),
            }),
            ahead: std::sync::Mutex::new(ahead::Ahead::default()),
            indexed: std::sync::Condvar::new(),
            index_failed: std::sync::atomic::AtomicBool::new(false),
        };
        store.replay_log(&tail, rows.last_key_value().map(|(&id, _)| id))?;
        Ok(store)
    }

    /// Commit again the batches that the segment log holds past the durable
    /// end (`docs/STORAGE.md` §5): envelope commits sync only their
    /// segment, so after a crash the index may lack the last of them. Each
    /// whole batch is committed again with the seqs its records carry, and
    /// a checkpoint makes them durable;
    /// what follows the last whole batch was never acknowledged and is cut
    /// off, and an unlisted segment without a whole batch is removed.
    fn replay_log(&self, tail: &[LogTail], last_row: Option<u32>) -> Result<(), StoreError> {
        let mut previous = last_row;
        let mut replayed = 0usize;
        for (i, t) in tail.iter().enumerate() {
            let (batches, end) = self.segments.read_log(t)?;
            if t.unlisted && batches.is_empty() {
                // Nothing whole in it, so nothing after it either.
                for rest in tail.get(i..).unwrap_or_default() {
                    self.segments.cut_log(rest.id, SEGMENT_HEADER_LEN, true)?;
                }
                break;
            }
            for (n, batch) in batches.iter().enumerate() {
                let envelopes: Vec<NewEnvelope> = batch
                    .records
                    .iter()
                    .map(|r| NewEnvelope {
                        recipient: r.device,
                        sender: r.fields.sender,
                        message_id: r.fields.message_id,
                        conversation: r.fields.conversation,
                        sender_seq: r.fields.sender_seq,
                        bytes: r.envelope.clone(),
                        expires_at_ms: r.fields.expires_at_ms,
                    })
                    .collect();
                let rolled_from = if t.unlisted && n == 0 { previous } else { None };
                let replay = Replay {
                    id: t.id,
                    records: batch
                        .records
                        .iter()
                        .map(|r| (r.device, r.seq, r.body))
                        .collect(),
                    span: (batch.start, batch.end),
                    rolled_from,
                };
                self.commit_batch(&envelopes, Some(replay), None)?;
                replayed += envelopes.len();
            }
            self.segments.cut_log(t.id, end, false)?;
            previous = Some(t.id);
        }
        self.recovered.store(replayed as u64, Ordering::Release);
        if replayed > 0 {
            self.checkpoint()?;
            tracing::info!(
                envelopes = replayed,
                "recovered envelopes from the segment log that the index had not durably committed"
            );
        }
        Ok(())
    }

    /// How many envelopes opening the store recovered from the segment log
    /// (their batches were synced, but the index commits naming them had not
    /// been made durable when the store last closed; `docs/STORAGE.md` §5).
    pub fn recovered_at_open(&self) -> u64 {
        self.recovered.load(Ordering::Acquire)
    }

    /// Whether commits made since the last durable one wait for a
    /// checkpoint (their batches are durable in the segment log meanwhile).
    pub fn needs_checkpoint(&self) -> bool {
        self.checkpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .dirty
    }

    /// Commit the index durably now, so the next open has nothing to
    /// replay and segments freed since the last durable commit are deleted.
    /// Sends are not held up meanwhile: while it runs, their batches go to
    /// the segment log alone and are committed to the index once it is done
    /// (`docs/STORAGE.md` §4). The relay's writer takes one on another thread when
    /// [`RedbStore::checkpoint_due`], when it is quiet, and when it stops.
    /// Returns at once if another checkpoint is running.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        {
            let mut ahead = self.ahead();
            if ahead.checkpointing || !self.needs_checkpoint() {
                // Everything is durable already (a durable commit also
                // deletes the segments waiting for one), or about to be.
                return Ok(());
            }
            // Sends decided against the index while it runs (`ahead`) must
            // not rest on bytes whose sync is still in flight.
            self.drain_behind()?;
            ahead.checkpointing = true;
        }
        // A large checkpoint (heavy ingest) is written in one go: see
        // `Pacing`.
        let envelopes = self
            .checkpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .envelopes;
        let sliced = envelopes < PACED_CHECKPOINT_ENVELOPES;
        self.pacing.slice(sliced);
        // An empty transaction, committed durably: redb persists every
        // commit before it with it.
        let done = self.write_with(Durability::Immediate, |_, _| Ok(((), Changed::Yes)));
        self.pacing.slice(true);
        let drained = self.drain_ahead();
        done.and(drained)
    }

    /// Whether a checkpoint is due: [`CHECKPOINT_ENVELOPES`] envelopes or
    /// [`CHECKPOINT_INTERVAL`] since the last one. If nobody takes it, the
    /// envelope commit at twice the bound does, holding sends meanwhile.
    pub fn checkpoint_due(&self) -> bool {
        let c = self
            .checkpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.dirty && (c.envelopes >= CHECKPOINT_ENVELOPES || c.at.elapsed() >= CHECKPOINT_INTERVAL)
    }

    /// Wait until what a read transaction begun before this call sees is
    /// durable: send commits whose syncs run behind them ([`behind`]) are
    /// visible before that.
    fn settle(&self) -> Result<(), StoreError> {
        self.behind.as_ref().map_or(Ok(()), behind::Behind::settle)
    }

    /// Wait until no sync runs behind a commit (call holding redb's write
    /// lock, so none starts meanwhile).
    fn drain_behind(&self) -> Result<(), StoreError> {
        self.behind.as_ref().map_or(Ok(()), behind::Behind::drain)
    }

    /// The durability of the next envelope commit: none (its batch is
    /// synced in the segment log) unless a checkpoint is overdue (twice
    /// the bound: nobody took it, as the relay's writer does on time).
    fn envelope_durability(&self) -> Durability {
        let c = self
            .checkpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.envelopes >= 2 * CHECKPOINT_ENVELOPES || c.at.elapsed() >= 2 * CHECKPOINT_INTERVAL {
            Durability::Immediate
        } else {
            Durability::None
        }
    }

    /// Take `cost` off the running store-cap count once the transaction
    /// that released it has committed.
    fn uncount(&self, cost: u64) {
        if cost > 0 {
            let _ = self
                .stored
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    Some(v.saturating_sub(cost))
                });
        }
    }

    /// One step of segment compaction (`docs/STORAGE.md` §4.7): look at
    /// the records of about `budget` bytes of the sealed segment being
    /// compacted (choosing one whose live bytes fell below
    /// [`COMPACT_BELOW_PERCENT`] if none is), copy those an `inbox` row
    /// still points at to the end of the active segment, sync them, and
    /// repoint the rows in one durable transaction. The old segment loses
    /// its row when its last live record has moved, and its file is deleted
    /// after that commit, as for any dead segment. Holds the commit lock for
    /// the step, so sends wait for at most one step. Returns whether
    /// anything was done (call again until it returns `false`).
    pub fn compact(&self, budget: u64) -> Result<bool, StoreError> {
        // Compaction appends to the active segment and moves its end: not
        // while batches are in the log ahead of the index (see [`ahead`]).
        let ahead = self.ahead();
        if ahead.checkpointing {
            return Ok(false);
        }
        let _commit = self.segments.lock_commits();
        let mut state = self
            .compaction
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rows = {
            let txn = self.db.begin_read()?;
            segment_rows(&txn.open_table(SEGMENTS)?)?
        };
        let active = rows.last_key_value().map(|(&id, _)| id);
        let (id, from) = match state.cursor {
            Some((id, from)) if rows.contains_key(&id) && Some(id) != active => (id, from),
            _ => {
                let skip = &state.skip;
                let pick = rows
                    .iter()
                    .find(|&(&id, info)| {
                        Some(id) != active && !skip.contains(&id) && worth_compacting(info)
                    })
                    .map(|(&id, _)| id);
                match pick {
                    Some(id) => (id, SEGMENT_HEADER_LEN),
                    None => {
                        state.cursor = None;
                        return Ok(false);
                    }
                }
            }
        };
        let end = rows.get(&id).map_or(SEGMENT_HEADER_LEN, |info| info.end);
        let (records, next) = match self.segments.scan(id, from, end, budget) {
            Ok(found) => found,
            Err(e) => {
                // A damaged record cannot be moved (pulls of it fail too):
                // leave this segment to expiry rather than retry it after
                // every commit.
                state.skip.insert(id);
                state.cursor = None;
                return Err(e);
            }
        };
        let mut written: Option<Append> = None;
        let mut emptied = false;
        self.write_with(Durability::Immediate, |txn, freed| {
            let mut inbox = txn.open_table(INBOX)?;
            // The records an index entry still points at; each run is read
            // and written back once.
            let mut edits = runs::Edits::default();
            let mut live = Vec::new();
            for rec in &records {
                if let Some(row) = edits.get(&inbox, &rec.device, rec.seq)?
                    && row.body == rec.body
                {
                    live.push((rec, row.header));
                }
            }
            if live.is_empty() {
                return Ok(((), Changed::No));
            }
            let upper: u64 = live.iter().map(|(r, _)| r.body.record_len()).sum();
            let mut append = self.segments.begin_append(upper, FORMAT_VERSION)?;
            let mut moved = (0u64, 0u64);
            for (rec, header) in live {
                let body = append.push(&rec.device, rec.seq, &rec.envelope)?;
                let row = encode_inbox_row(&InboxRow { header, body });
                edits.set(&inbox, &rec.device, rec.seq, &row)?;
                moved.0 += 1;
                moved.1 += rec.body.record_len();
            }
            edits.write(&mut inbox)?;
            let mut segs = txn.open_table(SEGMENTS)?;
            let mut released = Released::new();
            released.insert(id, moved);
            // The old segment's row goes with its last live record; the
            // active segment is never the one compacted.
            release_segments(&mut segs, &released, freed)?;
            emptied = freed.contains(&id);
            let key = append.id.to_be_bytes();
            let mut info = segs
                .get(&key)?
                .map(|g| decode_segment(g.value()))
                .transpose()?
                .unwrap_or_default();
            info.live += moved.0;
            info.live_bytes += moved.1;
            info.end = append.end();
            segs.insert(&key, encode_segment(&info).as_slice())?;
            if let Some(previous) = append.rolled_from {
                let pk = previous.to_be_bytes();
                let dead = segs
                    .get(&pk)?
                    .map(|g| decode_segment(g.value()))
                    .transpose()?
                    .is_some_and(|p| p.live == 0);
                if dead {
                    segs.remove(&pk)?;
                    freed.push(previous);
                }
            }
            // The copies are durable before the rows that point at them.
            append.write_and_sync()?;
            written = Some(append);
            Ok(((), Changed::Yes))
        })?;
        if let Some(append) = written {
            self.segments.finish_append(append);
        }
        if emptied {
            state.cursor = None;
        } else if next >= end {
            // A whole pass should have emptied it.
            tracing::warn!(segment = id, "segment compaction left live rows behind");
            state.skip.insert(id);
            state.cursor = None;
        } else {
            state.cursor = Some((id, next));
        }
        Ok(true)
    }

    /// The directory holding this store's envelope segments.
    pub fn segment_dir(&self) -> &Path {
        self.segments.dir()
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// Check the invariants of `docs/STORAGE.md` §3 that tie the tables
    /// together (contiguous inboxes that match their counters, one purge
    /// queue entry per non-empty inbox at its oldest envelope, tombstones
    /// below the stored range, dedup rows and batch lists in one-to-one
    /// correspondence). Reads the whole file in one snapshot: meant for tests
    /// and for inspecting a file after a crash, not for serving.
    pub fn check_consistency(&self) -> Result<(), StoreError> {
        let broken = |what: String| Err(StoreError::Backend(format!("inconsistent store: {what}")));
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(INBOX_META)?;
        let inbox = txn.open_table(INBOX)?;
        let queue = txn.open_table(PURGE_QUEUE)?;
        let tombs = txn.open_table(TOMBSTONES)?;
        let seg_rows = segment_rows(&txn.open_table(SEGMENTS)?)?;
        let mut seg_tally: Released = BTreeMap::new();
        let mut expected_queue = Vec::new();
        let mut rows_total = 0u64;
        for item in meta.range::<&[u8; 16]>(..)? {
            let (k, v) = item?;
            let device = DeviceId(*k.value());
            let state = decode_state(v.value())?;
            let base = inbox_base(&state);
            if state.acked > base {
                return broken(format!("acked {} above base {base}", state.acked));
            }
            let (lo, hi) = (inbox_key(&device, 0), inbox_key(&device, u64::MAX));
            let (mut next, mut bytes) = (base.saturating_add(1), 0u64);
            let mut entries = Vec::new();
            runs::visit(&inbox, &device, 0, u64::MAX, |seq, row| {
                entries.push((seq, row));
                Ok(true)
            })?;
            for (seq, row) in entries {
                if seq != next {
                    return broken(format!("inbox row {seq} where {next} was due"));
                }
                if seq == base.saturating_add(1) {
                    expected_queue.push(queue_key(row.header.expires_at_ms, &device));
                }
                next = seq.saturating_add(1);
                bytes += u64::from(row.body.len);
                // The row points inside the committed part of a segment
                // that has a row, at a record that checks out.
                let body = row.body;
                let inside = seg_rows.get(&body.segment).is_some_and(|info| {
                    body.offset >= SEGMENT_HEADER_LEN && body.record_end() <= info.end
                });
                if !inside {
                    return broken(format!(
                        "inbox row {seq} points outside the committed segments ({body:?})"
                    ));
                }
                if let Err(e) = self.segments.read(&body, &device, seq) {
                    return broken(format!("inbox row {seq}: {}", StoreError::from(e)));
                }
                note_release(&mut seg_tally, &body);
            }
            if next.saturating_sub(1) != state.head && state.depth > 0 {
                return broken(format!(
                    "inbox ends at {} below head {}",
                    next - 1,
                    state.head
                ));
            }
            if next.saturating_sub(base.saturating_add(1)) != state.depth || bytes != state.bytes {
                return broken("inbox counters differ from the rows".into());
            }
            rows_total += state.depth;
            for t in tombs.range::<&InboxKey>(&lo..=&hi)? {
                let (k, _) = t?;
                let (_, seq) = split_inbox_key(k.value());
                if seq <= state.acked || seq > base {
                    return broken(format!("tombstone {seq} outside ({}, {base}]", state.acked));
                }
            }
        }
        if rows_total != runs::count_all(&inbox)? {
            return broken("inbox rows without counters".into());
        }
        // Live counts match the rows; only the active segment may be empty;
        // every segment's file holds its committed part.
        let active = seg_rows.last_key_value().map(|(&id, _)| id);
        for (&id, info) in &seg_rows {
            let (live, live_bytes) = seg_tally.remove(&id).unwrap_or((0, 0));
            if (info.live, info.live_bytes) != (live, live_bytes) {
                return broken(format!(
                    "segment {id} counts {} rows / {} bytes, the index {live} / {live_bytes}",
                    info.live, info.live_bytes
                ));
            }
            if info.live == 0 && Some(id) != active {
                return broken(format!("dead segment {id} still has a row"));
            }
            if self.segments.file_len(id)? < info.end {
                return broken(format!("segment {id} is shorter than its committed end"));
            }
        }
        if let Some(id) = seg_tally.keys().next() {
            return broken(format!(
                "inbox rows point into segment {id}, which has no row"
            ));
        }
        expected_queue.sort_unstable();
        let mut actual_queue = Vec::new();
        for item in queue.range::<&QueueKey>(..)? {
            actual_queue.push(*item?.0.value());
        }
        if actual_queue != expected_queue {
            return broken("purge queue differs from the oldest envelopes".into());
        }
        if let Err(what) = dedup_runs::check(
            &txn.open_table(DEDUP_RUNS)?,
            &txn.open_table(DEDUP_RUN_QUEUE)?,
        )? {
            return broken(what);
        }
        let dedup = txn.open_table(DEDUP)?;
        let batches = txn.open_table(DEDUP_BATCHES)?;
        let mut listed = 0u64;
        for item in batches.range::<&DedupExpiryKey>(..)? {
            let (k, v) = item?;
            let list = decode_dedup_batch(v.value())?;
            if list.first().map(|&(e, dk)| dedup_expiry_key(e, &dk)) != Some(*k.value()) {
                return broken("dedup list keyed by another entry than its first".into());
            }
            for (expires_at_ms, dk) in list {
                let entry = dedup
                    .get(&dk)?
                    .map(|g| decode_dedup(g.value()))
                    .transpose()?;
                if entry.map(|e| e.expires_at_ms) != Some(expires_at_ms) {
                    return broken("dedup list entry without its dedup row".into());
                }
                listed += 1;
            }
        }
        if listed != dedup.len()? {
            return broken("dedup rows missing from the lists".into());
        }
        Ok(())
    }

    /// Run `f` in one write transaction; commit it durably if `f` reports a
    /// change, abort it otherwise or on error.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<(T, Changed), StoreError>,
    ) -> Result<T, StoreError> {
        self.write_with(Durability::Immediate, |txn, _| f(txn))
    }

    /// [`RedbStore::write`] with a chosen durability, for transactions that
    /// may free segments: `f` lists in its second argument the segments whose
    /// rows it removed. Envelope commits use [`Durability::None`] (their
    /// batches are synced in the segment log, replayed on open), and so do
    /// acknowledgements: losing
    /// one in a crash re-delivers envelopes the device already has, which
    /// clients drop by sender seq, so an ack need not wait for an fsync. Every
    /// [`DURABLE_ACK_EVERY`]th ack (and any other write) is durable, which
    /// also persists the acks before it and lets redb reclaim the pages they
    /// freed.
    ///
    /// A freed segment's file is deleted only after a durable commit: right
    /// after this one if it is durable, otherwise after the next durable one
    /// (which persists this one too). Were the file deleted earlier, a crash
    /// could revert the transaction and leave rows pointing at nothing.
    /// Note a failure of the index file: after an I/O error redb answers
    /// every later operation with `PreviousIo` until it is opened again.
    fn note_index_error(&self, e: &redb::StorageError) {
        if matches!(
            e,
            redb::StorageError::Io(_) | redb::StorageError::PreviousIo
        ) && !self.index_failed.swap(true, Ordering::AcqRel)
        {
            tracing::error!(
                "the index file failed ({e}): refusing sends until the relay is restarted, \
                 which recovers every acknowledged envelope from the segment log"
            );
        }
    }

    fn write_with<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction, &mut Vec<u32>) -> Result<(T, Changed), StoreError>,
    ) -> Result<T, StoreError> {
        let durable = !matches!(durability, Durability::None);
        let mut txn = self.db.begin_write().map_err(|e| {
            if let redb::TransactionError::Storage(s) = &e {
                self.note_index_error(s);
            }
            StoreError::from(e)
        })?;
        txn.set_durability(durability)?;
        // Taken inside the transaction: whatever was freed before it began
        // becomes durable with it.
        let mut earlier = if durable {
            self.segments.take_pending()
        } else {
            Vec::new()
        };
        let mut freed = Vec::new();
        // On error `txn` is dropped here, which aborts it.
        let (out, changed) = match f(&txn, &mut freed) {
            Ok(v) => v,
            Err(e) => {
                self.segments.defer(earlier);
                return Err(e);
            }
        };
        // A durable commit persists every commit before it: their
        // batches' syncs, run behind them, must be done first.
        if durable
            && changed == Changed::Yes
            && let Err(e) = self.drain_behind()
        {
            self.segments.defer(earlier);
            return Err(e);
        }
        let done = match changed {
            Changed::Yes => txn.commit().map_err(|e| {
                if let redb::CommitError::Storage(s) = &e {
                    self.note_index_error(s);
                }
                StoreError::from(e)
            }),
            Changed::No => txn.abort().map_err(StoreError::from),
        };
        if let Err(e) = done {
            self.segments.defer(earlier);
            return Err(e);
        }
        earlier.append(&mut freed);
        if changed == Changed::Yes {
            let mut c = self
                .checkpoint
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if durable {
                c.envelopes = 0;
                c.dirty = false;
                c.at = std::time::Instant::now();
            } else {
                c.dirty = true;
            }
        }
        if durable && changed == Changed::Yes {
            self.segments.delete(&earlier);
        } else {
            self.segments.defer(earlier);
        }
        Ok(out)
    }

    /// Commit `batch` as [`Store::commit`] does, or, with `replay`, commit
    /// again a batch found whole in the segment log past the durable end
    /// (its records are on disk: each must get the seq its record carries,
    /// and the store's limits do not apply, as they did when it was first
    /// stored). A fresh batch is appended with its trailer and synced, and
    /// its index is committed without a sync of its own unless a checkpoint
    /// is due ([`RedbStore::envelope_durability`]); a replayed one is
    /// committed without a sync, and the replay ends with a checkpoint.
    ///
    /// `written`, if given, hears the outcomes once the batch's bytes are
    /// written and before their sync ([`Store::commit_early`]); a failure
    /// after that refuses every later commit.
    fn commit_batch(
        &self,
        batch: &[NewEnvelope],
        replay: Option<Replay>,
        written: Option<super::Written<'_>>,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        self.commit_batch_behind(batch, replay, written, false)
            .map(|(outcomes, _)| outcomes)
    }

    /// [`RedbStore::commit_batch`]; with `behind`, a fresh batch committed
    /// without a sync of the index is not synced here either: [`behind`]
    /// syncs it from the moment it is written, it comes back with the
    /// generation its commit got, and its outcomes hold only once the sync
    /// is done.
    /// (A batch that cannot go that way, such as one during a checkpoint,
    /// is synced here and comes back with `None`.)
    fn commit_batch_behind(
        &self,
        batch: &[NewEnvelope],
        replay: Option<Replay>,
        written: Option<super::Written<'_>>,
        behind: bool,
    ) -> Result<(Vec<CommitOutcome>, Option<Behind<'_>>), StoreError> {
        if batch.is_empty() {
            return Ok((Vec::new(), None));
        }
        let replaying = replay.is_some();
        let limits = if replaying {
            StoreLimits {
                max_inbox_messages: u64::MAX,
                max_inbox_bytes: u64::MAX,
                max_store_bytes: u64::MAX,
                ..self.limits
            }
        } else {
            self.limits
        };
        // A fresh batch waits for no checkpoint: while one runs, it goes to
        // the log alone. Otherwise no checkpoint starts before this commit
        // is done (the lock is held to the end).
        let _ahead = if replaying {
            None
        } else {
            let mut ahead = self.ahead();
            if ahead.checkpointing {
                return self.commit_ahead(&mut ahead, batch).map(|o| (o, None));
            }
            Some(ahead)
        };
        let upper = ahead::batch_upper_bound(batch);
        let mut announce = written;
        let mut announced = false;
        let mut written: Option<Append> = None;
        // One commit at a time from the choice of segment offset to the
        // recording of the new end (redb's write lock ends at its commit).
        // A replay chooses no offset and moves no end: its records are in
        // the log already, behind whatever was appended since. During a
        // checkpoint's drain the sends appended to the log meanwhile
        // (`commit_ahead`, which holds the commit lock) need not wait for
        // it to index a batch: under heavy ingest they did, about a third
        // of each of their commits. Nothing else that takes the lock runs
        // then (compaction waits for the drain; normal commits go to the
        // log; see `ahead`).
        let _commit = (!replaying).then(|| self.segments.lock_commits());
        // Only commits (under the lock) add to the count; acks and purges
        // may lower it meanwhile, which only makes this check stricter.
        let stored = self.stored.load(Ordering::Acquire);
        let mut added = 0u64;
        // A replayed batch needs no sync either: until the replay's final
        // checkpoint, the log still holds it.
        let durability = if replaying {
            Durability::None
        } else {
            self.envelope_durability()
        };
        // The sync runs behind the commit, or here.
        let pipe = self
            .behind
            .as_ref()
            .filter(|_| behind && !replaying && matches!(durability, Durability::None));
        let mut ticket = None;
        let outcomes = self.write_with(durability, |txn, freed| {
            let mut append = match replay {
                Some(r) => self
                    .segments
                    .begin_replay(r.id, r.records, r.span, r.rolled_from)?,
                None => self.segments.begin_append(upper, FORMAT_VERSION)?,
            };
            if append.rolled_from.is_some() && !replaying {
                // A whole batch in this new segment behind a torn one in
                // the last (a crash before its sync) could not be
                // replayed: the last one's syncs finish first.
                self.drain_behind()?;
            }
            let devices = txn.open_table(DEVICES)?;
            let mut inbox = txn.open_table(INBOX)?;
            let mut dedup = dedup_runs::Tables::open(txn)?;
            let legacy = LegacyDedup::open(txn)?;
            let mut queue = txn.open_table(PURGE_QUEUE)?;
            let mut meta = txn.open_table(INBOX_META)?;
            let mut states = StateCache::new(&mut meta);
            // Devices are never deleted: one lookup per recipient per batch.
            let mut known: HashMap<DeviceId, bool> = HashMap::new();
            // The dedup entries this batch adds (see `dedup_runs`).
            let mut created = dedup_runs::Batch::default();
            // Index entries are inserted while the batch's bytes are synced,
            // one run per recipient: its envelopes of this batch have
            // consecutive seqs (see `runs`).
            let mut rows: BTreeMap<DeviceId, (u64, Vec<u8>)> = BTreeMap::new();
            let mut outcomes = Vec::with_capacity(batch.len());
            for env in batch {
                let is_known = match known.get(&env.recipient) {
                    Some(&k) => k,
                    None => {
                        let k = devices.get(env.recipient.as_bytes())?.is_some();
                        known.insert(env.recipient, k);
                        k
                    }
                };
                // The seq this envelope gets if it is stored.
                let tentative = if is_known {
                    states.get(env.recipient)?.state.head.saturating_add(1)
                } else {
                    0
                };
                let earlier = match created.find(
                    dedup.runs(),
                    &env.sender,
                    &env.recipient,
                    &env.message_id,
                )? {
                    Some(seq) => Some(seq),
                    None => {
                        legacy.lookup(&dedup_key(&env.sender, &env.recipient, &env.message_id))?
                    }
                };
                if let Some(seq) = earlier {
                    outcomes.push(CommitOutcome::Duplicate { seq });
                    continue;
                }
                if !is_known {
                    outcomes.push(CommitOutcome::Refused(Refusal::UnknownRecipient));
                    continue;
                }
                let len = env.bytes.len() as u64;
                let cached = states.get(env.recipient)?;
                if let Err(refusal) = rules::admit(&cached.state, len, &limits)
                    .and_then(|()| rules::admit_store(stored.saturating_add(added), len, &limits))
                {
                    outcomes.push(CommitOutcome::Refused(refusal));
                    continue;
                }
                let seq = rules::assign(&mut cached.state, len)
                    .filter(|&seq| seq == tentative)
                    .ok_or_else(|| StoreError::Backend("inbox seq space exhausted".into()))?;
                cached.first_expiry.get_or_insert(env.expires_at_ms);
                let header = InboxRowHeader {
                    expires_at_ms: env.expires_at_ms,
                    sender: env.sender,
                    conversation: env.conversation,
                    sender_seq: env.sender_seq,
                };
                let body = append.push_logged(
                    &env.recipient,
                    seq,
                    &env.bytes,
                    LoggedFields {
                        sender: env.sender,
                        message_id: env.message_id,
                        conversation: env.conversation,
                        sender_seq: env.sender_seq,
                        expires_at_ms: env.expires_at_ms,
                    },
                )?;
                let (first, entries) = rows
                    .entry(env.recipient)
                    .or_insert_with(|| (seq, Vec::new()));
                if first.saturating_add((entries.len() / INBOX_ROW_LEN) as u64) != seq {
                    return Err(StoreError::Backend("inbox run with a gap".into()));
                }
                entries.extend_from_slice(&encode_inbox_row(&InboxRow { header, body }));
                created.push(
                    &env.sender,
                    &env.recipient,
                    dedup_runs::Entry {
                        id: *env.message_id.as_bytes(),
                        seq,
                        expires_at_ms: env.expires_at_ms,
                    },
                );
                added = added.saturating_add(stored_cost(len));
                outcomes.push(CommitOutcome::Stored { seq });
            }
            if created.is_empty() {
                return Ok((outcomes, Changed::No));
            }
            // The segment's row: its new live rows and committed end. A
            // previous active segment that no row references any more goes.
            let mut segs = txn.open_table(SEGMENTS)?;
            let key = append.id.to_be_bytes();
            let mut info = segs
                .get(&key)?
                .map(|g| decode_segment(g.value()))
                .transpose()?
                .unwrap_or_default();
            // The trailer closes the batch: a replay takes only whole ones.
            append.seal_batch();
            info.live += created.len() as u64;
            info.live_bytes += append.record_bytes();
            info.end = append.end();
            segs.insert(&key, encode_segment(&info).as_slice())?;
            if let Some(previous) = append.rolled_from {
                let pk = previous.to_be_bytes();
                let dead = segs
                    .get(&pk)?
                    .map(|g| decode_segment(g.value()))
                    .transpose()?
                    .is_some_and(|p| p.live == 0);
                if dead {
                    segs.remove(&pk)?;
                    freed.push(previous);
                }
            }
            // The bodies are durable before the rows that point at them
            // commit (the transaction commits after this closure): a crash
            // in between leaves only bytes past the committed end, which the
            // next open cuts off. The rows are built meanwhile.
            append.write()?;
            if let Some(tell) = announce.take() {
                announced = true;
                tell(batch, &outcomes);
            }
            if let Some(pipe) = pipe {
                // Visible once committed, durable once `pipe` synced it:
                // reads wait for its generation meanwhile (`behind`).
                let mut t = pipe.issue()?;
                // The sync starts now, while the rows are inserted; the
                // answer waits for the commit as well.
                t.sync_now(append.sync_later());
                ticket = Some(t);
                written = Some(append);
                for (device, (first, entries)) in &rows {
                    runs::insert(&mut inbox, device, *first, entries)?;
                }
                states.flush(&mut queue)?;
                created.write(&mut dedup)?;
                return Ok((outcomes, Changed::Yes));
            }
            let (synced, indexed) = beside_sync(&append, created.len(), || {
                for (device, (first, entries)) in &rows {
                    runs::insert(&mut inbox, device, *first, entries)?;
                }
                states.flush(&mut queue)?;
                created.write(&mut dedup)
            });
            synced?;
            // From here on a failure must cut the written batch off again.
            written = Some(append);
            indexed?;
            Ok((outcomes, Changed::Yes))
        });
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(e) => {
                if let Some(append) = written {
                    append.abandon();
                }
                if announced {
                    // Its seqs were announced: they must not go to other
                    // envelopes while this process runs.
                    self.segments.poison();
                }
                return Err(e);
            }
        };
        let mut queued = None;
        if let Some(append) = written {
            queued = ticket.take();
            self.segments.finish_append(append);
            self.stored.fetch_add(added, Ordering::AcqRel);
            if matches!(durability, Durability::None) {
                let stored = outcomes
                    .iter()
                    .filter(|o| matches!(o, CommitOutcome::Stored { .. }))
                    .count() as u64;
                let mut c = self
                    .checkpoint
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                c.envelopes = c.envelopes.saturating_add(stored);
            }
        }
        if replaying
            && outcomes
                .iter()
                .any(|o| !matches!(o, CommitOutcome::Stored { .. }))
        {
            return Err(corrupt(
                "envelope log (a replayed envelope was not stored again)",
            ));
        }
        Ok((outcomes, queued))
    }

    /// One attempt at [`Store::pull`]; `None` if a segment the snapshot
    /// references was deleted meanwhile (the snapshot is older than the
    /// commit that dropped those rows, so a new one will not see them).
    fn pull_once(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Option<InboxPage>, StoreError> {
        let txn = self.db.begin_read()?;
        // Nothing a device is handed may be taken back by a crash.
        self.settle()?;
        let meta = txn.open_table(INBOX_META)?;
        let inbox = txn.open_table(INBOX)?;
        let state = load_state(&meta, device)?;
        let base = inbox_base(&state);

        // Stored seqs are exactly (base, head]: the page starts at the first
        // of them above `after`.
        let start = after.max(base);
        let mut envelopes = Vec::new();
        if start < state.head {
            let mut budget = PageBudget::new(limit, max_bytes);
            let mut refs = Vec::new();
            runs::visit(&inbox, device, start + 1, state.head, |seq, row| {
                if !budget.take(row.body.len as usize) {
                    return Ok(false);
                }
                refs.push((seq, row.body));
                Ok(true)
            })?;
            let bodies = match self.segments.read_many(device, &refs) {
                Ok(b) => b,
                Err(ReadError::Gone(_)) => return Ok(None),
                Err(ReadError::Store(e)) => return Err(e),
            };
            envelopes = refs
                .iter()
                .zip(bodies)
                .map(|(&(seq, _), bytes)| StoredEnvelope { seq, bytes })
                .collect();
        }
        let boundary = envelopes.last().map_or(after, |e| e.seq);
        // O(1): the stored seqs above the page are (max(boundary, base), head].
        let remaining = state.head.saturating_sub(boundary.max(base));
        let oldest = start.saturating_add(1).min(state.head.saturating_add(1));

        // Tombstones lie in (acked, base]: only a cursor below `base` can
        // have any above it.
        let mut dropped = Vec::new();
        if after < base {
            let tombs = txn.open_table(TOMBSTONES)?;
            let (lo, hi) = (inbox_key(device, after + 1), inbox_key(device, u64::MAX));
            for item in tombs.range::<&InboxKey>(&lo..=&hi)? {
                let (_, v) = item?;
                dropped.push(decode_tombstone(v.value())?);
            }
        }
        Ok(Some(InboxPage {
            envelopes,
            remaining,
            truncated: tombstones::truncation(oldest, dropped),
        }))
    }
}

/// The counters of `device`'s inbox (zeros if it has none yet).
fn load_state<T>(meta: &T, device: &DeviceId) -> Result<InboxState, StoreError>
where
    T: ReadableTable<&'static [u8; 16], &'static [u8]>,
{
    Ok(meta
        .get(device.as_bytes())?
        .map(|g| decode_state(g.value()))
        .transpose()?
        .unwrap_or_default())
}

/// The seq below `device`'s oldest stored envelope: its stored envelopes are
/// exactly the seqs in `(base, head]`.
///
/// This holds because seqs are assigned contiguously at the head and every
/// deletion (ack or purge) removes a prefix of the inbox, so `depth` rows
/// below and including `head` are stored and nothing else.
fn inbox_base(state: &InboxState) -> u64 {
    state.head.saturating_sub(state.depth)
}

/// Expiry of `device`'s oldest stored envelope, if it has any.
fn oldest_expiry<T>(inbox: &T, device: &DeviceId) -> Result<Option<u64>, StoreError>
where
    T: ReadableTable<&'static [u8; 24], &'static [u8]>,
{
    let mut oldest = None;
    runs::visit(inbox, device, 0, u64::MAX, |_, row| {
        oldest = Some(row.header.expires_at_ms);
        Ok(false)
    })?;
    Ok(oldest)
}

/// One inbox as a commit batch sees it.
struct CachedState {
    state: InboxState,
    /// The inbox was empty when the batch began.
    was_empty: bool,
    /// Expiry of the first envelope the batch stored in it.
    first_expiry: Option<u64>,
}

/// The batch's view of inbox counters: loaded on first use, written back once
/// at the end of the transaction.
struct StateCache<'m, 't> {
    meta: &'m mut MetaTable<'t>,
    states: BTreeMap<DeviceId, CachedState>,
}

impl<'m, 't> StateCache<'m, 't> {
    fn new(meta: &'m mut MetaTable<'t>) -> Self {
        StateCache {
            meta,
            states: BTreeMap::new(),
        }
    }

    fn get(&mut self, device: DeviceId) -> Result<&mut CachedState, StoreError> {
        use std::collections::btree_map::Entry;
        match self.states.entry(device) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let state = load_state(&*self.meta, &device)?;
                Ok(e.insert(CachedState {
                    state,
                    was_empty: state.depth == 0,
                    first_expiry: None,
                }))
            }
        }
    }

    /// Write the counters back and queue the inboxes that were empty and now
    /// hold envelopes.
    fn flush(self, queue: &mut QueueTable<'_>) -> Result<(), StoreError> {
        for (device, cached) in &self.states {
            self.meta
                .insert(device.as_bytes(), encode_state(&cached.state).as_slice())?;
            if cached.was_empty
                && let Some(expiry) = cached.first_expiry
            {
                queue.insert(&queue_key(expiry, device), ())?;
            }
        }
        Ok(())
    }
}

/// Remove `device`'s inbox rows with seq ≤ `up_to` (a prefix of the inbox),
/// updating `state` and the device's purge queue entry.
fn delete_acked(
    inbox: &mut InboxTable<'_>,
    queue: &mut QueueTable<'_>,
    device: &DeviceId,
    up_to: u64,
    state: &mut InboxState,
    released: &mut Released,
) -> Result<(), StoreError> {
    let mut first_expiry = None;
    let (mut count, mut bytes) = (0u64, 0u64);
    runs::remove_through(inbox, device, up_to, |_, row| {
        first_expiry.get_or_insert(row.header.expires_at_ms);
        count += 1;
        bytes += u64::from(row.body.len);
        note_release(released, &row.body);
    })?;
    rules::release_many(state, count, bytes);
    // The oldest row changed: move the inbox in the purge queue.
    if let Some(old) = first_expiry {
        queue.remove(&queue_key(old, device))?;
        if let Some(new) = oldest_expiry(&*inbox, device)? {
            queue.insert(&queue_key(new, device), ())?;
        }
    }
    Ok(())
}

/// Purge the expired prefix of `device`'s inbox, at most `budget` envelopes,
/// writing tombstones; re-queue the inbox at its new oldest expiry. Returns
/// how many envelopes went.
fn purge_inbox(
    tables: &mut PurgeTables<'_, '_>,
    device: &DeviceId,
    now_ms: u64,
    budget: u64,
) -> Result<u64, StoreError> {
    let mut due = Vec::new();
    let mut next_expiry = None;
    runs::visit(&*tables.inbox, device, 0, u64::MAX, |seq, row| {
        if row.header.expires_at_ms > now_ms || due.len() as u64 >= budget {
            next_expiry = Some(row.header.expires_at_ms);
            return Ok(false);
        }
        due.push((seq, row));
        Ok(true)
    })?;
    let mut state = load_state(&*tables.meta, device)?;
    let purged = due.len() as u64;
    if let Some(&(last, _)) = due.last() {
        let mut removed = 0u64;
        runs::remove_through(tables.inbox, device, last, |_, _| removed += 1)?;
        if removed != purged {
            return Err(corrupt("inbox runs (purge)"));
        }
    }
    for (seq, row) in due {
        let key = inbox_key(device, seq);
        tables
            .tombs
            .insert(&key, encode_tombstone(&row.header.tombstone()).as_slice())?;
        rules::release(&mut state, u64::from(row.body.len));
        note_release(tables.released, &row.body);
    }
    if purged > 0 {
        tables
            .meta
            .insert(device.as_bytes(), encode_state(&state).as_slice())?;
    }
    if let Some(expiry) = next_expiry {
        tables.queue.insert(&queue_key(expiry, device), ())?;
    }
    Ok(purged)
}

/// The first purge queue key at or below `hi`.
fn first_due(queue: &QueueTable<'_>, hi: &QueueKey) -> Result<Option<QueueKey>, StoreError> {
    match queue.range::<&QueueKey>(..=hi)?.next() {
        Some(item) => Ok(Some(*item?.0.value())),
        None => Ok(None),
    }
}

/// The first dedup batch list whose key is at or below `hi`, decoded.
fn first_due_batch(
    batches: &BatchTable<'_>,
    hi: &DedupExpiryKey,
) -> Result<Option<(DedupExpiryKey, DedupBatch)>, StoreError> {
    match batches.range::<&DedupExpiryKey>(..=hi)?.next() {
        Some(item) => {
            let (k, v) = item?;
            Ok(Some((*k.value(), decode_dedup_batch(v.value())?)))
        }
        None => Ok(None),
    }
}

/// The tables an inbox purge writes.
struct PurgeTables<'a, 't> {
    inbox: &'a mut InboxTable<'t>,
    tombs: &'a mut InboxTable<'t>,
    meta: &'a mut MetaTable<'t>,
    queue: &'a mut QueueTable<'t>,
    /// Rows taken off each segment so far.
    released: &'a mut Released,
}

/// Drop the expired entries of one dedup batch list (at most `budget`), and
/// store what is left of it under its new first entry. Returns (entries
/// looked at, dedup rows removed).
fn purge_dedup_batch(
    dedup: &mut Table<'_, &'static DedupKey, &'static [u8]>,
    batches: &mut BatchTable<'_>,
    list: DedupBatch,
    now_ms: u64,
    budget: u64,
) -> Result<(u64, u64), StoreError> {
    let (due, rest) = rules::split_due_dedup(list, now_ms, budget);
    let looked = due.len() as u64;
    let mut removed = 0u64;
    for (expires_at_ms, dk) in due {
        let gone = dedup
            .remove(&dk)?
            .map(|g| g.value().to_vec())
            .map(|v| decode_dedup(&v).map(|e| (e, v)))
            .transpose()?;
        match gone {
            Some((entry, _)) if entry.expires_at_ms == expires_at_ms => removed += 1,
            // Not this list's entry (cannot happen while the lists and the
            // dedup table agree): put it back untouched.
            Some((_, v)) => {
                dedup.insert(&dk, v.as_slice())?;
            }
            None => {}
        }
    }
    if let Some(&(expires_at_ms, dk)) = rest.first() {
        batches.insert(
            &dedup_expiry_key(expires_at_ms, &dk),
            encode_dedup_batch(&rest).as_slice(),
        )?;
    }
    Ok((looked, removed))
}

impl Store for RedbStore {
    fn register_device(
        &self,
        registration: &DeviceRegistration,
        now_ms: u64,
    ) -> Result<DeviceRecord, StoreError> {
        let max = self.limits.max_devices_per_user;
        self.write(|txn| {
            let key = registration.device.as_bytes();
            if txn.open_table(REMOVED_DEVICES)?.get(key)?.is_some() {
                return Err(StoreError::DeviceRemoved);
            }
            let mut devices = txn.open_table(DEVICES)?;
            let existing = devices
                .get(key)?
                .map(|g| decode_device(registration.device, g.value()))
                .transpose()?;
            match existing {
                Some(record) if record.registration == *registration => Ok((record, Changed::No)),
                Some(_) => Err(StoreError::AlreadyRegistered),
                None => {
                    // The user's devices, counted in the same transaction
                    // that adds this one: at most `max` keys are looked at.
                    let user = &registration.user;
                    let mut user_devices = txn.open_table(USER_DEVICES)?;
                    let lo = user_device_key(user, &DeviceId([0; 16]));
                    let hi = user_device_key(user, &DeviceId([0xff; 16]));
                    let mut count = 0u32;
                    for item in user_devices.range::<&UserDeviceKey>(&lo..=&hi)? {
                        item?;
                        count += 1;
                        if count >= max {
                            return Err(StoreError::DeviceLimit { max });
                        }
                    }
                    if max == 0 {
                        return Err(StoreError::DeviceLimit { max });
                    }
                    let record = DeviceRecord {
                        registration: registration.clone(),
                        registered_at_ms: now_ms,
                    };
                    devices.insert(key, encode_device(&record).as_slice())?;
                    user_devices.insert(&user_device_key(user, &registration.device), ())?;
                    txn.open_table(DEVICE_SEEN)?.insert(key, now_ms)?;
                    Ok((record, Changed::Yes))
                }
            }
        })
    }

    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let found = devices
            .get(device.as_bytes())?
            .map(|g| decode_device(*device, g.value()))
            .transpose()?;
        Ok(found)
    }

    fn commit(&self, batch: &[NewEnvelope]) -> Result<Vec<CommitOutcome>, StoreError> {
        self.commit_batch(batch, None, None)
    }

    fn commit_early(
        &self,
        batch: &[NewEnvelope],
        written: super::Written<'_>,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        self.commit_batch(batch, None, Some(written))
    }

    fn commit_then(
        &self,
        batch: Vec<NewEnvelope>,
        written: Option<super::Written<'_>>,
        then: super::Then,
    ) {
        let Some(pipe) = self.behind.as_ref() else {
            let result = match written {
                Some(w) => self.commit_early(&batch, w),
                None => self.commit(&batch),
            };
            return then(batch, result);
        };
        pipe.wait_room();
        let (result, queued) = match self.commit_batch_behind(&batch, None, written, true) {
            Ok((outcomes, queued)) => (Ok(outcomes), queued),
            Err(e) => (Err(e), None),
        };
        match queued {
            Some(ticket) => ticket.queue(
                None,
                Box::new(move |synced| then(batch, synced.and(result))),
            ),
            // Synced in line (or failed): answered in turn all the same,
            // after the commits still syncing before it.
            None => match pipe.issue() {
                Ok(ticket) => ticket.queue(None, Box::new(move |_| then(batch, result))),
                Err(_) => then(batch, result),
            },
        }
    }

    fn pull(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        // Read what was acknowledged: envelopes of this inbox still in the
        // log alone are indexed first.
        self.wait_indexed(device);
        // A segment vanishes only after a commit removed every row pointing
        // into it; a snapshot that still saw those rows is simply retried.
        for _ in 0..PULL_ATTEMPTS {
            if let Some(page) = self.pull_once(device, after, limit, max_bytes)? {
                return Ok(page);
            }
        }
        Err(StoreError::Backend(
            "a segment referenced by the inbox is missing".into(),
        ))
    }

    fn ack(&self, device: &DeviceId, up_to: u64) -> Result<u64, StoreError> {
        let n = self.acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let durability = if n % DURABLE_ACK_EVERY == DURABLE_ACK_EVERY - 1 {
            Durability::Immediate
        } else {
            Durability::None
        };
        let mut cost = 0u64;
        let acked = self.write_with(durability, |txn, freed| {
            let mut meta = txn.open_table(INBOX_META)?;
            let mut state = load_state(&meta, device)?;
            let target = up_to.min(state.head);
            if target <= state.acked {
                return Ok((state.acked, Changed::No));
            }
            let mut inbox = txn.open_table(INBOX)?;
            let mut queue = txn.open_table(PURGE_QUEUE)?;
            let mut released = Released::new();
            delete_acked(
                &mut inbox,
                &mut queue,
                device,
                target,
                &mut state,
                &mut released,
            )?;
            cost = release_segments(&mut txn.open_table(SEGMENTS)?, &released, freed)?;
            let mut tombs = txn.open_table(TOMBSTONES)?;
            let (lo, hi) = (inbox_key(device, 0), inbox_key(device, target));
            tombs.retain_in::<&InboxKey, _>(&lo..=&hi, |_, _| false)?;
            state.acked = target;
            meta.insert(device.as_bytes(), encode_state(&state).as_slice())?;
            Ok((target, Changed::Yes))
        })?;
        self.uncount(cost);
        Ok(acked)
    }

    fn inbox_state(&self, device: &DeviceId) -> Result<InboxState, StoreError> {
        self.wait_indexed(device);
        let txn = self.db.begin_read()?;
        self.settle()?;
        let meta = txn.open_table(INBOX_META)?;
        load_state(&meta, device)
    }

    fn touch_device(
        &self,
        device: &DeviceId,
        now_ms: u64,
        granularity_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        // A read first: most connects find a recent value and write nothing.
        let Some(previous) = self.device_last_seen(device)? else {
            return Ok(None);
        };
        if now_ms < previous.saturating_add(granularity_ms) {
            return Ok(Some(previous));
        }
        self.write(|txn| {
            let key = device.as_bytes();
            if txn.open_table(DEVICES)?.get(key)?.is_none() {
                // Removed since the read.
                return Ok((None, Changed::No));
            }
            let mut seen = txn.open_table(DEVICE_SEEN)?;
            let stored = seen.get(key)?.map(|g| g.value()).unwrap_or(previous);
            if now_ms < stored.saturating_add(granularity_ms) {
                return Ok((Some(stored), Changed::No));
            }
            seen.insert(key, now_ms)?;
            Ok((Some(stored), Changed::Yes))
        })
    }

    fn device_last_seen(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let key = device.as_bytes();
        if let Some(g) = txn.open_table(DEVICE_SEEN)?.get(key)? {
            return Ok(Some(g.value()));
        }
        let devices = txn.open_table(DEVICES)?;
        let found = devices
            .get(key)?
            .map(|g| decode_device(*device, g.value()))
            .transpose()?;
        Ok(found.map(|r| r.registered_at_ms))
    }

    fn remove_device(&self, device: &DeviceId, now_ms: u64) -> Result<bool, StoreError> {
        let mut cost = 0u64;
        let removed = self.write_with(Durability::Immediate, |txn, freed| {
            let removed = remove_in(txn, device, None, now_ms, freed, &mut cost)?;
            let changed = if removed { Changed::Yes } else { Changed::No };
            Ok((removed, changed))
        })?;
        self.uncount(cost);
        Ok(removed)
    }

    fn publish_device_list_removing(
        &self,
        list: &SignedDeviceList,
        now_ms: u64,
    ) -> Result<(u64, Vec<DeviceId>), StoreError> {
        let user = list.list.user;
        let version = list.list.version;
        let encoded = encode_device_list(list)?;
        let mut cost = 0u64;
        let done = self.write_with(Durability::Immediate, |txn, freed| {
            let previous = {
                let mut lists = txn.open_table(DEVICE_LISTS)?;
                let stored = lists
                    .get(user.as_bytes())?
                    .map(|g| decode_device_list(user, g.value()))
                    .transpose()?;
                if let Some(stored) = &stored
                    && stored.list.version >= version
                {
                    return Err(StoreError::StaleDeviceList {
                        stored: stored.list.version,
                    });
                }
                lists.insert(user.as_bytes(), encoded.as_slice())?;
                stored
            };
            let mut removed = Vec::new();
            for d in super::dropped_devices(previous.as_ref(), list) {
                if remove_in(txn, &d, Some(&user), now_ms, freed, &mut cost)? {
                    removed.push(d);
                }
            }
            Ok(((version, removed), Changed::Yes))
        })?;
        self.uncount(cost);
        Ok(done)
    }

    fn device_removed(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let found = txn
            .open_table(REMOVED_DEVICES)?
            .get(device.as_bytes())?
            .map(|g| g.value());
        Ok(found)
    }

    fn lease_counts(
        &self,
        stale_before_ms: u64,
        owns: &(dyn Fn(&DeviceId) -> bool + Sync),
    ) -> Result<super::LeaseCounts, StoreError> {
        let txn = self.db.begin_read()?;
        let mut counts = super::LeaseCounts::default();
        for item in txn.open_table(DEVICE_SEEN)?.iter()? {
            let (k, v) = item?;
            if v.value() < stale_before_ms && owns(&DeviceId(*k.value())) {
                counts.stale += 1;
            }
        }
        for item in txn.open_table(REMOVED_DEVICES)?.iter()? {
            let (k, _) = item?;
            if owns(&DeviceId(*k.value())) {
                counts.removed += 1;
            }
        }
        Ok(counts)
    }

    fn purge_expired(&self, now_ms: u64, max: usize) -> Result<PurgeStats, StoreError> {
        if max == 0 {
            return Ok(PurgeStats::default());
        }
        let max = max as u64;
        let mut cost = 0u64;
        let stats = self.write_with(Durability::Immediate, |txn, freed| {
            let mut stats = PurgeStats::default();
            let mut released = Released::new();
            let mut changed = Changed::No;

            // Inboxes in the order of their oldest envelope's expiry; each
            // loses its expired prefix.
            let mut inbox = txn.open_table(INBOX)?;
            let mut tombs = txn.open_table(TOMBSTONES)?;
            let mut meta = txn.open_table(INBOX_META)?;
            let mut queue = txn.open_table(PURGE_QUEUE)?;
            let hi = queue_upper(now_ms);
            while stats.expired < max {
                let Some(key) = first_due(&queue, &hi)? else {
                    break;
                };
                changed = Changed::Yes;
                queue.remove(&key)?;
                let (_, device) = split_queue_key(&key);
                let mut tables = PurgeTables {
                    inbox: &mut inbox,
                    tombs: &mut tombs,
                    meta: &mut meta,
                    queue: &mut queue,
                    released: &mut released,
                };
                stats.expired += purge_inbox(&mut tables, &device, now_ms, max - stats.expired)?;
            }
            cost = release_segments(&mut txn.open_table(SEGMENTS)?, &released, freed)?;

            // Dedup entries: by their runs, then format 6's by the lists
            // their commits wrote.
            let (removed, mut looked) = dedup_runs::Tables::open(txn)?.purge(now_ms, max)?;
            if looked > 0 {
                changed = Changed::Yes;
            }
            stats.dedup_removed += removed;
            let mut dedup = txn.open_table(DEDUP)?;
            let mut batches = txn.open_table(DEDUP_BATCHES)?;
            let hi = dedup_expiry_upper(now_ms);
            while looked < max {
                let Some((key, list)) = first_due_batch(&batches, &hi)? else {
                    break;
                };
                changed = Changed::Yes;
                batches.remove(&key)?;
                let (l, removed) =
                    purge_dedup_batch(&mut dedup, &mut batches, list, now_ms, max - looked)?;
                looked += l;
                stats.dedup_removed += removed;
            }
            Ok((stats, changed))
        })?;
        self.uncount(cost);
        Ok(stats)
    }

    fn publish_prekeys(
        &self,
        device: &DeviceId,
        signed_prekey: &SignedPrekey,
        one_time: &[OneTimePrekey],
    ) -> Result<u32, StoreError> {
        let cap = u64::from(self.limits.max_one_time_prekeys);
        self.write(|txn| {
            let devices = txn.open_table(DEVICES)?;
            if devices.get(device.as_bytes())?.is_none() {
                return Err(StoreError::UnknownDevice);
            }
            let mut spks = txn.open_table(SIGNED_PREKEYS)?;
            spks.insert(
                device.as_bytes(),
                encode_signed_prekey(signed_prekey).as_slice(),
            )?;
            let mut otks = txn.open_table(ONE_TIME_PREKEYS)?;
            let mut count = count_otks(&otks, device)?;
            for otk in one_time {
                if count >= cap {
                    break;
                }
                let key = otk_key(device, otk.id);
                if otks.get(&key)?.is_some() {
                    continue;
                }
                otks.insert(&key, otk.public.as_slice())?;
                count += 1;
            }
            Ok((u32::try_from(count).unwrap_or(u32::MAX), Changed::Yes))
        })
    }

    fn take_prekey_bundle(&self, device: &DeviceId) -> Result<Option<PrekeyBundle>, StoreError> {
        self.write(|txn| {
            let devices = txn.open_table(DEVICES)?;
            let record = devices
                .get(device.as_bytes())?
                .map(|g| decode_device(*device, g.value()))
                .transpose()?
                .ok_or(StoreError::UnknownDevice)?;
            let spks = txn.open_table(SIGNED_PREKEYS)?;
            let spk = spks
                .get(device.as_bytes())?
                .map(|g| decode_signed_prekey(g.value()))
                .transpose()?;
            let Some(signed_prekey) = spk else {
                return Ok((None, Changed::No));
            };
            let mut otks = txn.open_table(ONE_TIME_PREKEYS)?;
            let (lo, hi) = (otk_key(device, 0), otk_key(device, u32::MAX));
            let mut one_time_prekey = None;
            // The lowest id is handed out and removed in this transaction.
            if let Some(item) = otks
                .extract_from_if::<&OtkKey, _>(&lo..=&hi, |_, _| true)?
                .next()
            {
                let (k, v) = item?;
                let (_, id) = split_otk_key(k.value());
                one_time_prekey = Some(OneTimePrekey {
                    id,
                    public: decode_otk_public(v.value())?,
                });
            }
            let changed = if one_time_prekey.is_some() {
                Changed::Yes
            } else {
                Changed::No
            };
            let reg = record.registration;
            let bundle = PrekeyBundle {
                device: *device,
                user: reg.user,
                signing_key: reg.signing_key,
                agreement_key: reg.agreement_key,
                signed_prekey,
                one_time_prekey,
            };
            Ok((Some(bundle), changed))
        })
    }

    fn one_time_prekeys_left(&self, device: &DeviceId) -> Result<u32, StoreError> {
        let txn = self.db.begin_read()?;
        let otks = txn.open_table(ONE_TIME_PREKEYS)?;
        Ok(u32::try_from(count_otks(&otks, device)?).unwrap_or(u32::MAX))
    }

    fn publish_device_list(&self, list: &SignedDeviceList) -> Result<u64, StoreError> {
        let user = list.list.user;
        let version = list.list.version;
        let encoded = encode_device_list(list)?;
        self.write(|txn| {
            let mut lists = txn.open_table(DEVICE_LISTS)?;
            let stored = lists
                .get(user.as_bytes())?
                .map(|g| decode_device_list(user, g.value()))
                .transpose()?;
            if let Some(stored) = stored
                && stored.list.version >= version
            {
                return Err(StoreError::StaleDeviceList {
                    stored: stored.list.version,
                });
            }
            lists.insert(user.as_bytes(), encoded.as_slice())?;
            Ok((version, Changed::Yes))
        })
    }

    fn device_list(&self, user: &UserKey) -> Result<Option<SignedDeviceList>, StoreError> {
        let txn = self.db.begin_read()?;
        let lists = txn.open_table(DEVICE_LISTS)?;
        let found = lists
            .get(user.as_bytes())?
            .map(|g| decode_device_list(*user, g.value()))
            .transpose()?;
        Ok(found)
    }

    fn stored_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.stored.load(Ordering::Acquire))
    }

    fn compact_step(&self, budget: u64) -> Result<bool, StoreError> {
        self.compact(budget)
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        RedbStore::checkpoint(self)
    }

    fn checkpoint_due(&self) -> bool {
        RedbStore::checkpoint_due(self)
    }

    fn local_reads(&self) -> bool {
        true
    }

    fn failure(&self) -> Option<String> {
        let what = if self.segments.failed() {
            "a write or sync of the envelope log failed"
        } else if self.index_failed.load(Ordering::Acquire) {
            "a write or read of the index file failed"
        } else {
            return None;
        };
        Some(format!(
            "{what} (disk full or an I/O error?); sends are refused until the relay is \
             restarted, which recovers every acknowledged envelope from the log"
        ))
    }

    fn blob_put(
        &self,
        put: &super::BlobWrite<'_>,
        limits: &super::BlobLimits,
        now_ms: u64,
    ) -> Result<super::BlobMeta, StoreError> {
        // Under the commit lock, like envelope commits: the store-cap count
        // does not grow between the check and the commit. It includes the
        // sends a running checkpoint keeps in the log alone (counted in
        // `ahead`, taken first as every commit does; it can only fall
        // while the commit lock is held, as the drain indexes them).
        let ahead = self.ahead();
        let _commit = self.segments.lock_commits();
        let room = super::blobs::StoreRoom {
            stored: self
                .stored
                .load(Ordering::Acquire)
                .saturating_add(ahead.added()),
            max: self.limits.max_store_bytes,
        };
        drop(ahead);
        let (meta, cost) = self.write(|txn| blobs::put(txn, put, limits, now_ms, room))?;
        if cost.added > 0 {
            self.stored.fetch_add(cost.added, Ordering::AcqRel);
        }
        self.uncount(cost.freed);
        Ok(meta)
    }

    fn blob_read(
        &self,
        blob: &hush_protocol::BlobId,
        offset: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Option<(super::BlobMeta, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        blobs::read(&txn, blob, offset, max, now_ms)
    }

    fn purge_blobs(&self, now_ms: u64, max: usize) -> Result<u64, StoreError> {
        let (n, freed) = self.write(|txn| blobs::purge(txn, now_ms, max))?;
        self.uncount(freed);
        Ok(n)
    }

    fn total_depth(&self) -> Result<u64, StoreError> {
        // The sum of the inbox counters, one small row per inbox (the
        // `inbox` table's own entry count is of runs, not envelopes).
        let txn = self.db.begin_read()?;
        self.settle()?;
        let meta = txn.open_table(INBOX_META)?;
        let mut depth = 0u64;
        for item in meta.range::<&[u8; 16]>(..)? {
            depth = depth.saturating_add(decode_state(item?.1.value())?.depth);
        }
        Ok(depth)
    }
}

/// One-time prekeys stored for `device`, at most the pool cap: a bounded
/// key-only scan.
fn count_otks<T>(otks: &T, device: &DeviceId) -> Result<u64, StoreError>
where
    T: ReadableTable<&'static [u8; 20], &'static [u8]>,
{
    let (lo, hi) = (otk_key(device, 0), otk_key(device, u32::MAX));
    let mut n = 0u64;
    for item in otks.range::<&OtkKey>(&lo..=&hi)? {
        item?;
        n += 1;
    }
    Ok(n)
}

/// Remove `device` for good inside `txn` (see `Store::remove_device`): only
/// if registered, not removed already, and (with `user`) registered to that
/// user. Freed segment bytes are added to `cost`.
fn remove_in(
    txn: &WriteTransaction,
    device: &DeviceId,
    user: Option<&UserKey>,
    now_ms: u64,
    freed: &mut Vec<u32>,
    cost: &mut u64,
) -> Result<bool, StoreError> {
    let key = device.as_bytes();
    let mut removed = txn.open_table(REMOVED_DEVICES)?;
    if removed.get(key)?.is_some() {
        return Ok(false);
    }
    let mut devices = txn.open_table(DEVICES)?;
    let Some(record) = devices
        .get(key)?
        .map(|g| decode_device(*device, g.value()))
        .transpose()?
    else {
        return Ok(false);
    };
    if user.is_some_and(|u| *u != record.registration.user) {
        return Ok(false);
    }
    // The inbox: every stored envelope and tombstone, then its counters.
    let mut meta = txn.open_table(INBOX_META)?;
    let mut state = load_state(&meta, device)?;
    if state.head > state.acked {
        let mut inbox = txn.open_table(INBOX)?;
        let mut queue = txn.open_table(PURGE_QUEUE)?;
        let mut released = Released::new();
        delete_acked(
            &mut inbox,
            &mut queue,
            device,
            state.head,
            &mut state,
            &mut released,
        )?;
        *cost = cost.saturating_add(release_segments(
            &mut txn.open_table(SEGMENTS)?,
            &released,
            freed,
        )?);
    }
    let (lo, hi) = (inbox_key(device, 0), inbox_key(device, u64::MAX));
    txn.open_table(TOMBSTONES)?
        .retain_in::<&InboxKey, _>(&lo..=&hi, |_, _| false)?;
    meta.remove(key)?;
    // Prekeys.
    txn.open_table(SIGNED_PREKEYS)?.remove(key)?;
    let (lo, hi) = (otk_key(device, 0), otk_key(device, u32::MAX));
    txn.open_table(ONE_TIME_PREKEYS)?
        .retain_in::<&OtkKey, _>(&lo..=&hi, |_, _| false)?;
    // The registration and its slot.
    devices.remove(key)?;
    txn.open_table(USER_DEVICES)?
        .remove(&user_device_key(&record.registration.user, device))?;
    txn.open_table(DEVICE_SEEN)?.remove(key)?;
    removed.insert(key, now_ms)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn registration(n: u8) -> DeviceRegistration {
        DeviceRegistration {
            device: DeviceId([n; 16]),
            user: UserKey([n; 32]),
            signing_key: [n; 32],
            agreement_key: [n; 32],
            user_signature: [n; 64],
        }
    }

    fn is_corrupt<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
        matches!(&r, Err(StoreError::Backend(m)) if m.starts_with("corrupt"))
    }

    /// Write raw bytes under a key of a table, bypassing the store's codecs.
    fn poke(store: &RedbStore, f: impl FnOnce(&WriteTransaction)) {
        let txn = store.db.begin_write().unwrap();
        f(&txn);
        txn.commit().unwrap();
    }

    /// The file says it is in the current format (an upgrade wrote it).
    fn assert_current_format(store: &RedbStore) {
        let txn = store.db.begin_read().unwrap();
        let format = txn
            .open_table(INFO)
            .unwrap()
            .get(FORMAT_KEY)
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        assert_eq!(format, FORMAT_VERSION.to_be_bytes());
    }

    /// A format-4 file (no `device_seen`, no `removed_devices`) is upgraded
    /// on open: every device counts as seen at its registration, so none is
    /// reported stale for longer than it really was away.
    #[test]
    fn format_4_files_are_upgraded_with_last_seen_from_registration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
            store.register_device(&registration(1), 7).unwrap();
            store.touch_device(&DeviceId([1; 16]), 9_000, 0).unwrap();
            poke(&store, |txn| {
                assert!(txn.delete_table(DEVICE_SEEN).unwrap());
                assert!(txn.delete_table(REMOVED_DEVICES).unwrap());
                let mut info = txn.open_table(INFO).unwrap();
                info.insert(FORMAT_KEY, 4u32.to_be_bytes().as_slice())
                    .unwrap();
            });
        }
        let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
        assert_eq!(store.device_last_seen(&DeviceId([1; 16])).unwrap(), Some(7));
        assert_eq!(store.device_removed(&DeviceId([1; 16])).unwrap(), None);
        assert!(store.remove_device(&DeviceId([1; 16]), 10).unwrap());
        assert_current_format(&store);
    }

    /// A format-5 file has format 6's tables; opening it rewrites only the
    /// version (last-seen times stay as they are), keeps its envelopes, and
    /// cuts off what a format-5 crash left past a segment's end: records
    /// without a trailer, never acknowledged.
    #[test]
    fn format_5_files_are_upgraded_by_their_version_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let d = DeviceId([1; 16]);
        let seg;
        let end;
        {
            let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
            store.register_device(&registration(1), 7).unwrap();
            store.touch_device(&d, 9_000, 0).unwrap();
            store.commit(&[envelope(d, 1, 100)]).unwrap();
            store.checkpoint().unwrap();
            seg = super::super::segments::segment_path(store.segment_dir(), 1);
            end = segment_end(&store, 1);
            poke(&store, |txn| {
                let mut info = txn.open_table(INFO).unwrap();
                info.insert(FORMAT_KEY, 5u32.to_be_bytes().as_slice())
                    .unwrap();
            });
        }
        let mut leftover = Vec::new();
        super::super::segments::encode_record(&mut leftover, &d, 2, &[2u8; 100]).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &leftover, end).unwrap();
        drop(file);
        let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
        assert_eq!(store.recovered_at_open(), 0);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), end);
        assert_eq!(bodies(&store, &d), vec![(1, vec![1u8; 100])]);
        assert_eq!(store.device_last_seen(&d).unwrap(), Some(9_000));
        store.check_consistency().unwrap();
        assert_current_format(&store);
    }

    /// A format-6 file keeps one `inbox` row per envelope, and each reads
    /// as a run of one: opening it raises only the version, and its
    /// envelopes pull, ack and purge beside the runs that new commits add.
    /// Its per-envelope dedup entries still answer retries until they
    /// expire, and are purged as before.
    #[test]
    fn format_6_files_read_their_single_rows_as_runs_of_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let d = DeviceId([1; 16]);
        let all = |ms: std::ops::RangeInclusive<u32>| -> Vec<(u64, Vec<u8>)> {
            ms.map(|m| (u64::from(m), vec![(m % 251) as u8; 100]))
                .collect()
        };
        {
            let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
            store.register_device(&registration(1), 7).unwrap();
            let batch: Vec<_> = (1..=3).map(|m| envelope(d, m, 100)).collect();
            store.commit(&batch).unwrap();
            store.checkpoint().unwrap();
            // The batch's run, split into the rows format 6 wrote.
            poke(&store, |txn| {
                let mut t = txn.open_table(INBOX).unwrap();
                let run = t
                    .remove(&inbox_key(&d, 1))
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                assert_eq!(run.len(), 3 * INBOX_ROW_LEN);
                for (i, row) in run.chunks(INBOX_ROW_LEN).enumerate() {
                    t.insert(&inbox_key(&d, 1 + i as u64), row).unwrap();
                }
                // The dedup entries as format 6 kept them: a row each, and
                // one list for the commit.
                let sender = DeviceId([0xEE; 16]);
                let runs = txn.open_table(DEDUP_RUNS).unwrap();
                let entries = dedup_runs::entries_of(&runs, &sender, &d).unwrap();
                drop(runs);
                assert_eq!(entries.len(), 3);
                txn.open_table(DEDUP_RUNS)
                    .unwrap()
                    .retain(|_, _| false)
                    .unwrap();
                txn.open_table(DEDUP_RUN_QUEUE)
                    .unwrap()
                    .retain(|_, _| false)
                    .unwrap();
                let mut dedup = txn.open_table(DEDUP).unwrap();
                let mut list = Vec::new();
                for e in entries.values() {
                    let dk = dedup_key(&sender, &d, &hush_protocol::MessageId(e.id));
                    let entry = DedupEntry {
                        seq: e.seq,
                        expires_at_ms: e.expires_at_ms,
                    };
                    dedup.insert(&dk, encode_dedup(&entry).as_slice()).unwrap();
                    list.push((e.expires_at_ms, dk));
                }
                list.sort_unstable();
                txn.open_table(DEDUP_BATCHES)
                    .unwrap()
                    .insert(
                        &dedup_expiry_key(list[0].0, &list[0].1),
                        encode_dedup_batch(&list).as_slice(),
                    )
                    .unwrap();
                let mut info = txn.open_table(INFO).unwrap();
                info.insert(FORMAT_KEY, 6u32.to_be_bytes().as_slice())
                    .unwrap();
            });
        }
        let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
        store.check_consistency().unwrap();
        assert_eq!(bodies(&store, &d), all(1..=3));
        // A retry of a format 6 envelope is still a duplicate.
        let batch: Vec<_> = [2, 4, 5].map(|m| envelope(d, m, 100)).to_vec();
        assert_eq!(
            store.commit(&batch).unwrap(),
            vec![
                CommitOutcome::Duplicate { seq: 2 },
                CommitOutcome::Stored { seq: 4 },
                CommitOutcome::Stored { seq: 5 },
            ]
        );
        assert_eq!(bodies(&store, &d), all(1..=5));
        store.ack(&d, 1).unwrap();
        // Seqs 2 and 3 expire at 1_002 and 1_003, and so do the format 6
        // dedup entries of 1, 2 and 3.
        assert_eq!(
            store.purge_expired(1_003, 10).unwrap(),
            PurgeStats {
                expired: 2,
                dedup_removed: 3,
            }
        );
        assert_eq!(
            store.commit(&[envelope(d, 2, 100)]).unwrap(),
            vec![CommitOutcome::Stored { seq: 6 }]
        );
        let mut expect = all(4..=5);
        expect.push((6, vec![2; 100]));
        assert_eq!(bodies(&store, &d), expect);
        store.check_consistency().unwrap();
        assert_current_format(&store);
        let txn = store.db.begin_read().unwrap();
        assert_eq!(txn.open_table(INBOX).unwrap().len().unwrap(), 2);
        assert_eq!(txn.open_table(DEDUP).unwrap().len().unwrap(), 0);
    }

    /// A format-3 file (no `user_devices` table) is upgraded on open: its
    /// existing devices count against the cap at once, so a user cannot
    /// slip past it by having registered before the upgrade.
    #[test]
    fn format_3_files_are_upgraded_with_their_devices_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let limits = StoreLimits {
            max_devices_per_user: 2,
            ..StoreLimits::default()
        };
        let of_user = |n: u8| DeviceRegistration {
            user: UserKey([77; 32]),
            ..registration(n)
        };
        {
            let store = RedbStore::open(&path, limits).unwrap();
            store.register_device(&of_user(1), 1).unwrap();
            store.register_device(&of_user(2), 1).unwrap();
            let env = NewEnvelope {
                recipient: DeviceId([1; 16]),
                sender: DeviceId([2; 16]),
                message_id: hush_protocol::MessageId([3; 16]),
                conversation: hush_protocol::ConversationId([4; 16]),
                sender_seq: 1,
                bytes: vec![5; 40],
                expires_at_ms: 1_000,
            };
            store.commit(&[env]).unwrap();
            // Turn the file back into format 3, its segment too.
            let seg = super::super::segments::segment_path(store.segment_dir(), 1);
            let mut bytes = std::fs::read(&seg).unwrap();
            bytes[8..12].copy_from_slice(&3u32.to_be_bytes());
            std::fs::write(&seg, bytes).unwrap();
            poke(&store, |txn| {
                assert!(txn.delete_table(USER_DEVICES).unwrap());
                let mut info = txn.open_table(INFO).unwrap();
                info.insert(FORMAT_KEY, 3u32.to_be_bytes().as_slice())
                    .unwrap();
                // A format-3 device list: one entry of 80 bytes, no proof.
                let mut lists = txn.open_table(DEVICE_LISTS).unwrap();
                lists
                    .insert(&[77; 32], vec![9u8; 76 + 80].as_slice())
                    .unwrap();
            });
        }
        let store = RedbStore::open(&path, limits).unwrap();
        // Its lists are gone (they would read as corrupt): devices re-publish.
        assert!(matches!(store.device_list(&UserKey([77; 32])), Ok(None)));
        assert!(matches!(
            store.register_device(&of_user(3), 2),
            Err(StoreError::DeviceLimit { max: 2 })
        ));
        store.register_device(&of_user(1), 2).unwrap();
        // The old segment still reads, and new ones are written beside it.
        let page = store.pull(&DeviceId([1; 16]), 0, 10, usize::MAX).unwrap();
        assert_eq!(page.envelopes[0].bytes, vec![5; 40]);
        store.check_consistency().unwrap();
        assert_current_format(&store);
        // Other formats are still refused.
        poke(&store, |txn| {
            let mut info = txn.open_table(INFO).unwrap();
            info.insert(FORMAT_KEY, 2u32.to_be_bytes().as_slice())
                .unwrap();
        });
        drop(store);
        assert!(matches!(
            RedbStore::open(&path, limits),
            Err(StoreError::Backend(m)) if m.contains("unsupported store format 2")
        ));
    }

    #[test]
    fn corrupt_values_on_disk_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let d = DeviceId([1; 16]);
        store.register_device(&registration(1), 5).unwrap();
        poke(&store, |txn| {
            let mut t = txn.open_table(DEVICES).unwrap();
            t.insert(d.as_bytes(), [1u8, 2, 3].as_slice()).unwrap();
            let mut t = txn.open_table(INBOX_META).unwrap();
            t.insert(d.as_bytes(), [0u8; 31].as_slice()).unwrap();
            let mut t = txn.open_table(INBOX).unwrap();
            t.insert(&inbox_key(&d, 1), [0u8; 10].as_slice()).unwrap();
            let mut t = txn.open_table(DEVICE_LISTS).unwrap();
            t.insert(&[1u8; 32], [0u8; 75].as_slice()).unwrap();
            let mut t = txn.open_table(TOMBSTONES).unwrap();
            t.insert(&inbox_key(&d, 2), [0u8; 41].as_slice()).unwrap();
        });
        assert!(is_corrupt(store.device(&d)));
        assert!(is_corrupt(store.register_device(&registration(1), 6)));
        assert!(is_corrupt(store.inbox_state(&d)));
        assert!(is_corrupt(store.pull(&d, 0, 10, 1000)));
        assert!(is_corrupt(store.ack(&d, 1)));
        assert!(is_corrupt(store.device_list(&UserKey([1; 32]))));
        assert!(is_corrupt(store.take_prekey_bundle(&d)));
    }

    #[test]
    fn corrupt_inbox_row_fails_pull_and_purge_without_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let d = DeviceId([2; 16]);
        poke(&store, |txn| {
            let mut t = txn.open_table(INBOX).unwrap();
            t.insert(&inbox_key(&d, 1), [0u8; 47].as_slice()).unwrap();
            let mut t = txn.open_table(INBOX_META).unwrap();
            let state = InboxState {
                head: 1,
                acked: 0,
                depth: 1,
                bytes: 0,
            };
            t.insert(d.as_bytes(), encode_state(&state).as_slice())
                .unwrap();
            let mut t = txn.open_table(PURGE_QUEUE).unwrap();
            t.insert(&queue_key(10, &d), ()).unwrap();
            let mut t = txn.open_table(DEDUP_BATCHES).unwrap();
            t.insert(&dedup_expiry_key(10, &[0; 48]), [0u8; 55].as_slice())
                .unwrap();
        });
        assert!(is_corrupt(store.pull(&d, 0, 10, 1000)));
        assert!(is_corrupt(store.purge_expired(10, 10)));
        assert!(is_corrupt(store.ack(&d, 1)));
        // The failed purge rolled back: the queue entry is still there.
        let txn = store.db.begin_read().unwrap();
        assert_eq!(txn.open_table(PURGE_QUEUE).unwrap().len().unwrap(), 1);
        drop(txn);
        // With the row repaired, the corrupt dedup list still fails the
        // purge as a whole.
        poke(&store, |txn| {
            let mut t = txn.open_table(INBOX).unwrap();
            t.insert(&inbox_key(&d, 1), [0u8; 64].as_slice()).unwrap();
            // The row points at an empty record in segment 0; give that
            // segment a row so the purge gets past it.
            let mut t = txn.open_table(SEGMENTS).unwrap();
            let info = SegmentInfo {
                live: 1,
                live_bytes: RECORD_HEADER_LEN as u64,
                end: 0,
            };
            t.insert(&0u32.to_be_bytes(), encode_segment(&info).as_slice())
                .unwrap();
        });
        assert!(is_corrupt(store.purge_expired(10, 10)));
        assert_eq!(store.inbox_state(&d).unwrap().depth, 1);
    }

    #[test]
    fn consistency_check_finds_tables_that_disagree() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let d = DeviceId([4; 16]);
        store.register_device(&registration(4), 1).unwrap();
        let env = |m: u8, expires_at_ms| NewEnvelope {
            recipient: d,
            sender: d,
            message_id: hush_protocol::MessageId([m; 16]),
            conversation: hush_protocol::ConversationId([1; 16]),
            sender_seq: u64::from(m),
            bytes: vec![m; 20],
            expires_at_ms,
        };
        store.commit(&[env(1, 10), env(2, 20), env(3, 30)]).unwrap();
        store.ack(&d, 1).unwrap();
        store.purge_expired(20, 10).unwrap();
        store.check_consistency().unwrap();
        // A queue entry at the wrong time.
        poke(&store, |txn| {
            let mut q = txn.open_table(PURGE_QUEUE).unwrap();
            q.remove(&queue_key(30, &d)).unwrap();
            q.insert(&queue_key(31, &d), ()).unwrap();
        });
        assert!(store.check_consistency().is_err());
        poke(&store, |txn| {
            let mut q = txn.open_table(PURGE_QUEUE).unwrap();
            q.remove(&queue_key(31, &d)).unwrap();
            q.insert(&queue_key(30, &d), ()).unwrap();
        });
        store.check_consistency().unwrap();
        // A hole in the inbox.
        poke(&store, |txn| {
            let mut t = txn.open_table(INBOX).unwrap();
            let row = t
                .remove(&inbox_key(&d, 3))
                .unwrap()
                .unwrap()
                .value()
                .to_vec();
            t.insert(&inbox_key(&d, 4), row.as_slice()).unwrap();
        });
        assert!(store.check_consistency().is_err());
    }

    #[test]
    fn other_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
            poke(&store, |txn| {
                let mut t = txn.open_table(INFO).unwrap();
                t.insert(FORMAT_KEY, 1u32.to_be_bytes().as_slice()).unwrap();
            });
        }
        // A version-1 file (the layout before the purge queue) is refused.
        let err = RedbStore::open(&path, StoreLimits::default()).unwrap_err();
        assert!(matches!(err, StoreError::Backend(m) if m.contains("format 1")));
        // So is a version-2 file (envelopes inside the database), naming
        // both versions, and without creating a segment directory for it.
        std::fs::remove_dir_all(segment_dir(&path)).unwrap();
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let mut t = txn.open_table(INFO).unwrap();
            t.insert(FORMAT_KEY, 2u32.to_be_bytes().as_slice()).unwrap();
            drop(t);
            txn.commit().unwrap();
        }
        let err = RedbStore::open(&path, StoreLimits::default()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Backend(m) if m.contains("format 2") && m.contains("format 3")),
            "{err}"
        );
        assert!(!segment_dir(&path).exists());
    }

    fn envelope(to: DeviceId, m: u32, len: usize) -> NewEnvelope {
        let mut id = [0u8; 16];
        id[12..].copy_from_slice(&m.to_be_bytes());
        NewEnvelope {
            recipient: to,
            sender: DeviceId([0xEE; 16]),
            message_id: hush_protocol::MessageId(id),
            conversation: hush_protocol::ConversationId([1; 16]),
            sender_seq: u64::from(m),
            bytes: vec![(m % 251) as u8; len],
            expires_at_ms: 1_000 + u64::from(m),
        }
    }

    /// Index entries of every inbox, read straight from the file's last
    /// commit (no store lock taken).
    fn inbox_rows(store: &RedbStore) -> usize {
        let txn = store.db.begin_read().unwrap();
        runs::count_all(&txn.open_table(INBOX).unwrap()).unwrap() as usize
    }

    /// `commit_early` hands over the outcomes once the batch is written and
    /// before its index commits (so before anything can read it), exactly
    /// the outcomes the commit returns; a batch that stores nothing new is
    /// not announced.
    #[test]
    fn an_early_commit_announces_its_outcomes_before_they_can_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        store.register_device(&registration(1), 7).unwrap();
        let d = DeviceId([1; 16]);
        let mut heard = Vec::new();
        let mut rows_then = None;
        let out = store
            .commit_early(&[envelope(d, 1, 100), envelope(d, 2, 100)], &mut |_, o| {
                heard = o.to_vec();
                rows_then = Some(inbox_rows(&store));
            })
            .unwrap();
        assert_eq!(
            out,
            vec![
                CommitOutcome::Stored { seq: 1 },
                CommitOutcome::Stored { seq: 2 }
            ]
        );
        assert_eq!(heard, out);
        assert_eq!(rows_then, Some(0), "announced before the index commit");
        assert_eq!(inbox_rows(&store), 2);
        assert_eq!(bodies(&store, &d).len(), 2);
        let mut called = false;
        let again = store
            .commit_early(&[envelope(d, 1, 100)], &mut |_, _| called = true)
            .unwrap();
        assert_eq!(again, vec![CommitOutcome::Duplicate { seq: 1 }]);
        assert!(!called, "a repeat writes nothing and announces nothing");
    }

    fn segment_files(store: &RedbStore) -> Vec<u32> {
        let mut ids: Vec<u32> = std::fs::read_dir(store.segment_dir())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".seg").map(|n| n.parse().unwrap())
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    fn bodies(store: &RedbStore, d: &DeviceId) -> Vec<(u64, Vec<u8>)> {
        store
            .pull(d, 0, usize::MAX, usize::MAX)
            .unwrap()
            .envelopes
            .into_iter()
            .map(|e| (e.seq, e.bytes.to_vec()))
            .collect()
    }

    /// Segment `seg`'s committed end, as the index has it (the file runs
    /// on past it: the active segment is zero-filled ahead).
    fn segment_end(store: &RedbStore, seg: u32) -> u64 {
        let txn = store.db.begin_read().unwrap();
        segment_rows(&txn.open_table(SEGMENTS).unwrap()).unwrap()[&seg].end
    }

    /// Write `bytes` into segment `seg` of `dir` at `at`, as a crash
    /// mid-write leaves them.
    fn write_at(dir: &Path, seg: u32, bytes: &[u8], at: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(super::super::segments::segment_path(dir, seg))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
    }

    /// The index row of `(d, seq)`.
    fn row_of(store: &RedbStore, d: &DeviceId, seq: u64) -> InboxRow {
        let txn = store.db.begin_read().unwrap();
        let t = txn.open_table(INBOX).unwrap();
        runs::get(&t, d, seq).unwrap().unwrap()
    }

    /// A batch large enough to build its rows while another thread syncs
    /// it ([`beside_sync`]) decides, stores and indexes exactly as a small
    /// one does, and all of it is there after a reopen.
    #[test]
    fn a_large_batch_is_indexed_beside_its_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let (a, b, unknown) = (DeviceId([5; 16]), DeviceId([6; 16]), DeviceId([7; 16]));
        let n = 2 * SYNC_BESIDE_ENVELOPES as u32;
        let mut batch: Vec<NewEnvelope> = (10..10 + n)
            .map(|m| envelope(if m % 2 == 0 { a } else { b }, m, 300))
            .collect();
        // A resend of an envelope stored before, and one for nobody.
        batch.insert(7, envelope(a, 1, 300));
        batch.insert(40, envelope(unknown, 2, 300));
        {
            let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
            store.register_device(&registration(5), 1).unwrap();
            store.register_device(&registration(6), 1).unwrap();
            assert_eq!(
                store.commit(&[envelope(a, 1, 300)]).unwrap(),
                vec![CommitOutcome::Stored { seq: 1 }]
            );
            let outcomes = store.commit(&batch).unwrap();
            assert_eq!(outcomes.len(), batch.len());
            assert_eq!(outcomes[7], CommitOutcome::Duplicate { seq: 1 });
            assert_eq!(
                outcomes[40],
                CommitOutcome::Refused(Refusal::UnknownRecipient)
            );
            // The others get the next seqs of their inbox, in batch order.
            let mut next: HashMap<DeviceId, u64> = HashMap::from([(a, 2), (b, 1)]);
            for (env, outcome) in batch.iter().zip(&outcomes) {
                if env.recipient == unknown || env.sender_seq == 1 {
                    continue;
                }
                let seq = next.get_mut(&env.recipient).unwrap();
                assert_eq!(*outcome, CommitOutcome::Stored { seq: *seq });
                *seq += 1;
            }
        }
        let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
        let expect = |d: DeviceId, first: u64, firsts: Vec<u32>| -> Vec<(u64, Vec<u8>)> {
            firsts
                .into_iter()
                .zip(first..)
                .map(|(m, seq)| (seq, envelope(d, m, 300).bytes))
                .collect()
        };
        let mut to_a = vec![1];
        to_a.extend((10..10 + n).filter(|m| m % 2 == 0));
        let to_b: Vec<u32> = (10..10 + n).filter(|m| m % 2 == 1).collect();
        assert_eq!(bodies(&store, &a), expect(a, 1, to_a));
        assert_eq!(bodies(&store, &b), expect(b, 1, to_b));
        // Its dedup entries were committed with it.
        assert_eq!(
            store.commit(&[envelope(b, 11, 300)]).unwrap(),
            vec![CommitOutcome::Duplicate { seq: 1 }]
        );
        let txn = store.db.begin_read().unwrap();
        let listed = dedup_runs::check(
            &txn.open_table(DEDUP_RUNS).unwrap(),
            &txn.open_table(DEDUP_RUN_QUEUE).unwrap(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(listed, 1 + u64::from(n));
    }

    #[test]
    fn a_batch_synced_but_never_committed_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let d = DeviceId([5; 16]);
        let (len_before, seg) = {
            let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
            store.register_device(&registration(5), 1).unwrap();
            store
                .commit(&[
                    envelope(d, 1, 100),
                    envelope(d, 2, 100),
                    envelope(d, 3, 100),
                ])
                .unwrap();
            let seg = row_of(&store, &d, 1).body.segment;
            let len = segment_end(&store, seg);
            // A crash between the segment sync and the redb commit: the next
            // batch's records (seqs 4 and 5) are on disk, durable, and no
            // index row refers to them. Then a torn half record after them.
            let mut append = store
                .segments
                .begin_append(1 << 20, FORMAT_VERSION)
                .unwrap();
            assert_eq!(append.id, seg);
            append.push(&d, 4, &[0xAB; 100]).unwrap();
            append.push(&d, 5, &[0xAB; 100]).unwrap();
            append.write_and_sync().unwrap();
            let end = append.end();
            write_at(store.segment_dir(), seg, &[0x48, 0x45, 0x4E], end);
            (len, seg)
        };
        // Reopen: the tail past the committed end is gone, the committed
        // envelopes are all there, and the uncommitted ones never appear.
        let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
        let seg_path = super::super::segments::segment_path(store.segment_dir(), seg);
        assert_eq!(std::fs::metadata(&seg_path).unwrap().len(), len_before);
        let got = bodies(&store, &d);
        assert_eq!(
            got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(got.iter().all(|(_, b)| b.len() == 100 && b[0] != 0xAB));
        store.check_consistency().unwrap();
        // The next batch takes seq 4 at the committed end.
        let out = store.commit(&[envelope(d, 4, 10)]).unwrap();
        assert_eq!(out, vec![CommitOutcome::Stored { seq: 4 }]);
        assert_eq!(bodies(&store, &d)[3], (4, vec![4u8; 10]));
        assert_eq!(row_of(&store, &d, 4).body.offset, len_before);
        store.check_consistency().unwrap();
    }

    #[test]
    fn a_roll_that_never_committed_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let d = DeviceId([6; 16]);
        {
            let store =
                RedbStore::open_with_segment_size(&path, StoreLimits::default(), 4096).unwrap();
            store.register_device(&registration(6), 1).unwrap();
            store.commit(&[envelope(d, 1, 3000)]).unwrap();
            assert_eq!(segment_files(&store), vec![1]);
            // The next batch does not fit: a new segment is created and
            // written, then the relay dies before the commit.
            let mut append = store.segments.begin_append(3036, FORMAT_VERSION).unwrap();
            assert_eq!((append.id, append.rolled_from), (2, Some(1)));
            append.push(&d, 2, &[0xCD; 3000]).unwrap();
            append.write_and_sync().unwrap();
            assert_eq!(segment_files(&store), vec![1, 2]);
        }
        let store = RedbStore::open_with_segment_size(&path, StoreLimits::default(), 4096).unwrap();
        assert_eq!(segment_files(&store), vec![1]);
        assert_eq!(bodies(&store, &d).len(), 1);
        store.check_consistency().unwrap();
        // The roll happens again, for real this time.
        store.commit(&[envelope(d, 2, 3000)]).unwrap();
        assert_eq!(segment_files(&store), vec![1, 2]);
        assert_eq!(bodies(&store, &d)[1], (2, vec![2u8; 3000]));
        store.check_consistency().unwrap();
    }

    #[test]
    fn a_corrupt_body_is_a_typed_error_and_the_store_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let (a, b) = (DeviceId([7; 16]), DeviceId([8; 16]));
        store.register_device(&registration(7), 1).unwrap();
        store.register_device(&registration(8), 1).unwrap();
        store
            .commit(&[
                envelope(a, 1, 200),
                envelope(b, 2, 200),
                envelope(a, 3, 200),
            ])
            .unwrap();
        // Flip one byte in the body of a's first envelope.
        let body = row_of(&store, &a, 1).body;
        let seg_path = super::super::segments::segment_path(store.segment_dir(), body.segment);
        let mut bytes = std::fs::read(&seg_path).unwrap();
        bytes[(body.offset + RECORD_HEADER_LEN as u64 + 17) as usize] ^= 0x01;
        std::fs::write(&seg_path, &bytes).unwrap();
        assert!(is_corrupt(store.pull(&a, 0, 10, 10_000)));
        assert!(store.check_consistency().is_err());
        // Everything else still works: the other inbox, new commits, and
        // the damaged inbox past the damaged envelope.
        assert_eq!(bodies(&store, &b), vec![(1, vec![2u8; 200])]);
        store.commit(&[envelope(b, 4, 50)]).unwrap();
        assert_eq!(
            store.pull(&a, 1, 10, 10_000).unwrap().envelopes[0].bytes,
            vec![3u8; 200]
        );
        store.ack(&a, 1).unwrap();
        assert_eq!(bodies(&store, &a), vec![(2, vec![3u8; 200])]);
        store.check_consistency().unwrap();
        // A segment cut short under a live row: an error, not a panic.
        let body = row_of(&store, &b, 2).body;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg_path)
            .unwrap()
            .set_len(body.offset + 10)
            .unwrap();
        assert!(is_corrupt(store.pull(&b, 1, 10, 10_000)));
        assert!(store.check_consistency().is_err());
    }

    #[test]
    fn dead_segments_are_deleted_once_their_freeing_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let d = DeviceId([9; 16]);
        let store = RedbStore::open_with_segment_size(&path, StoreLimits::default(), 4096).unwrap();
        store.register_device(&registration(9), 1).unwrap();
        // One 3 KiB envelope per batch: one segment each.
        for m in 1..=4 {
            store.commit(&[envelope(d, m, 3000)]).unwrap();
        }
        assert_eq!(segment_files(&store), vec![1, 2, 3, 4]);
        store.check_consistency().unwrap();
        // The first ack is not durable (see `DURABLE_ACK_EVERY`): segments
        // 1 and 2 lose their rows but their files stay until a durable
        // commit, so a crash that loses the ack loses nothing.
        store.ack(&d, 2).unwrap();
        assert_eq!(segment_files(&store), vec![1, 2, 3, 4]);
        store.check_consistency().unwrap();
        // An envelope commit syncs its segment, not the index (unless a
        // checkpoint is due), so the files stay until the next durable
        // commit.
        store.commit(&[envelope(d, 5, 10)]).unwrap();
        assert_eq!(segment_files(&store), vec![1, 2, 3, 4]);
        store.checkpoint().unwrap();
        assert_eq!(segment_files(&store), vec![3, 4]);
        store.check_consistency().unwrap();
        // The active segment (4, now also holding seq 5) is kept even when
        // empty; purging the rest frees segment 3 durably at once.
        store.ack(&d, 4).unwrap();
        store.purge_expired(u64::MAX, 100).unwrap();
        assert_eq!(segment_files(&store), vec![4]);
        assert_eq!(store.inbox_state(&d).unwrap().depth, 0);
        store.check_consistency().unwrap();
        // A leftover file no row references (a deletion a crash
        // interrupted) is removed on open.
        drop(store);
        std::fs::write(
            super::super::segments::segment_path(&segment_dir(&path), 3),
            b"leftover",
        )
        .unwrap();
        let store = RedbStore::open_with_segment_size(&path, StoreLimits::default(), 4096).unwrap();
        assert_eq!(segment_files(&store), vec![4]);
        // A new batch that does not fit rolls; the empty active segment
        // loses its row in the same commit, and its file goes with the
        // next durable one.
        store.commit(&[envelope(d, 6, 4000)]).unwrap();
        assert_eq!(segment_files(&store), vec![4, 5]);
        store.checkpoint().unwrap();
        assert_eq!(segment_files(&store), vec![5]);
        assert_eq!(bodies(&store, &d), vec![(6, vec![6u8; 4000])]);
        store.check_consistency().unwrap();
    }

    #[test]
    fn pages_are_read_across_interleaved_inboxes_and_segments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store =
            RedbStore::open_with_segment_size(&path, StoreLimits::default(), 32 * 1024).unwrap();
        let (a, b) = (DeviceId([11; 16]), DeviceId([12; 16]));
        store.register_device(&registration(11), 1).unwrap();
        store.register_device(&registration(12), 1).unwrap();
        // a's envelopes are separated by b's of growing size (small gaps are
        // read over, large ones split the read), over several segments.
        let mut m = 0;
        let mut want_a = Vec::new();
        for batch in 0..12 {
            let mut envs = Vec::new();
            for i in 0..6 {
                m += 1;
                let len = 100 + 37 * i + batch;
                envs.push(envelope(a, m, len));
                want_a.push(vec![(m % 251) as u8; len]);
                m += 1;
                envs.push(envelope(b, m, 1 << (i + batch % 4 + 6)));
            }
            store.commit(&envs).unwrap();
        }
        assert!(segment_files(&store).len() > 2);
        store.check_consistency().unwrap();
        let got: Vec<Vec<u8>> = bodies(&store, &a).into_iter().map(|(_, b)| b).collect();
        assert_eq!(got, want_a);
        // Pages of every size return the same envelopes.
        for limit in [1, 5, 13] {
            let mut after = 0;
            let mut all = Vec::new();
            loop {
                let page = store.pull(&a, after, limit, usize::MAX).unwrap();
                let Some(last) = page.envelopes.last() else {
                    break;
                };
                after = last.seq;
                all.extend(page.envelopes.into_iter().map(|e| e.bytes));
            }
            assert_eq!(all, want_a, "pages of {limit}");
        }
        assert_eq!(bodies(&store, &b).len(), 72);
    }

    #[test]
    fn pulls_racing_segment_deletion_never_fail() {
        // Every batch fills a segment and every ack frees the previous one,
        // while a reader pulls from an old cursor: a pull whose snapshot
        // still saw a segment that is deleted meanwhile retries, it never
        // fails and never returns a partial or out-of-order page.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open_with_segment_size(&path, StoreLimits::default(), 4096).unwrap();
        let d = DeviceId([13; 16]);
        store.register_device(&registration(13), 1).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let store = &store;
            let done = &done;
            let reader = scope.spawn(move || {
                let mut pulls = 0u32;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let page = store.pull(&d, 0, 10, usize::MAX).unwrap();
                    let seqs: Vec<u64> = page.envelopes.iter().map(|e| e.seq).collect();
                    if let Some(&first) = seqs.first() {
                        let want: Vec<u64> = (first..first + seqs.len() as u64).collect();
                        assert_eq!(seqs, want);
                    }
                    for e in &page.envelopes {
                        assert_eq!(e.bytes, vec![(e.seq % 251) as u8; 3000]);
                    }
                    pulls += 1;
                }
                pulls
            });
            for m in 1..=200u32 {
                store.commit(&[envelope(d, m, 3000)]).unwrap();
                store.ack(&d, u64::from(m) - 1).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Release);
            assert!(reader.join().unwrap() > 0);
        });
        store.commit(&[envelope(d, 201, 10)]).unwrap();
        store.checkpoint().unwrap();
        assert!(
            segment_files(&store).len() <= 3,
            "{:?}",
            segment_files(&store)
        );
        store.check_consistency().unwrap();
    }

    #[test]
    fn consistency_check_compares_segments_with_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let d = DeviceId([10; 16]);
        store.register_device(&registration(10), 1).unwrap();
        store
            .commit(&[envelope(d, 1, 64), envelope(d, 2, 64)])
            .unwrap();
        store.check_consistency().unwrap();
        let seg = row_of(&store, &d, 1).body.segment;
        let key = seg.to_be_bytes();
        let read = |store: &RedbStore| {
            let txn = store.db.begin_read().unwrap();
            let t = txn.open_table(SEGMENTS).unwrap();
            decode_segment(t.get(&key).unwrap().unwrap().value()).unwrap()
        };
        let good = read(&store);
        assert_eq!(good.live, 2);
        assert_eq!(good.live_bytes, 2 * (RECORD_HEADER_LEN as u64 + 64));
        // A wrong live count.
        poke(&store, |txn| {
            let mut t = txn.open_table(SEGMENTS).unwrap();
            let bad = SegmentInfo { live: 3, ..good };
            t.insert(&key, encode_segment(&bad).as_slice()).unwrap();
        });
        assert!(store.check_consistency().is_err());
        // A committed end before the last record's end (the batch's
        // trailer follows it).
        let last_end = row_of(&store, &d, 2).body.record_end();
        poke(&store, |txn| {
            let mut t = txn.open_table(SEGMENTS).unwrap();
            let bad = SegmentInfo {
                end: last_end - 1,
                ..good
            };
            t.insert(&key, encode_segment(&bad).as_slice()).unwrap();
        });
        assert!(store.check_consistency().is_err());
        // A row pointing into a segment without a row.
        poke(&store, |txn| {
            let mut t = txn.open_table(SEGMENTS).unwrap();
            t.insert(&key, encode_segment(&good).as_slice()).unwrap();
            let mut t = txn.open_table(INBOX).unwrap();
            let mut row = runs::get(&t, &d, 2).unwrap().unwrap();
            row.body.segment = seg + 7;
            let mut edits = runs::Edits::default();
            edits.set(&t, &d, 2, &encode_inbox_row(&row)).unwrap();
            edits.write(&mut t).unwrap();
        });
        assert!(store.check_consistency().is_err());
    }

    #[test]
    fn no_op_calls_do_not_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let before = store.db.begin_read().unwrap();
        store.register_device(&registration(3), 1).unwrap();
        // A repeat registration, an ack of nothing and an empty purge leave
        // the snapshot contents the same.
        store.register_device(&registration(3), 2).unwrap();
        assert_eq!(store.ack(&DeviceId([3; 16]), 5).unwrap(), 0);
        assert_eq!(
            store.purge_expired(u64::MAX, 10).unwrap(),
            PurgeStats::default()
        );
        assert_eq!(
            store
                .device(&DeviceId([3; 16]))
                .unwrap()
                .unwrap()
                .registered_at_ms,
            1
        );
        // The snapshot taken before the registration still does not see it.
        assert!(
            before
                .open_table(DEVICES)
                .unwrap()
                .get(&[3u8; 16])
                .unwrap()
                .is_none()
        );
    }

    /// A crash image in `to`: the index file as it was right after its last
    /// durable commit (`index`, read then) and the segment files as they
    /// are on disk now, which is what a power cut leaves when envelope
    /// commits have synced their segments but not the index since.
    fn crash_image(index: &[u8], store: &RedbStore, to: &Path) -> PathBuf {
        let path = to.join("crashed.redb");
        std::fs::write(&path, index).unwrap();
        let segs = segment_dir(&path);
        std::fs::create_dir_all(&segs).unwrap();
        for entry in std::fs::read_dir(store.segment_dir()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), segs.join(entry.file_name())).unwrap();
        }
        path
    }

    /// Index entries in a raw redb file, read without the store.
    fn raw_inbox_rows(path: &Path) -> u64 {
        let db = Database::create(path).unwrap();
        let txn = db.begin_read().unwrap();
        runs::count_all(&txn.open_table(INBOX).unwrap()).unwrap()
    }

    /// What [`bodies`] returns: seq and envelope of each stored envelope.
    type Inbox = Vec<(u64, Vec<u8>)>;

    /// Commits after the last durable one, with rolls into segments the
    /// index has no row for, and an ack: returns the crash image's index
    /// and what each inbox held before the ack.
    fn commits_past_a_checkpoint(
        store: &RedbStore,
        path: &Path,
        a: DeviceId,
        b: DeviceId,
    ) -> (Vec<u8>, Inbox, Inbox) {
        store
            .commit(&[envelope(a, 1, 100), envelope(b, 2, 100)])
            .unwrap();
        store.checkpoint().unwrap();
        let index = std::fs::read(path).unwrap();
        for m in 3..=10 {
            assert!(matches!(
                store.commit(&[envelope(a, m, 3000)]).unwrap()[..],
                [CommitOutcome::Stored { .. }]
            ));
        }
        store
            .commit(&[envelope(b, 11, 50), envelope(a, 12, 50)])
            .unwrap();
        let (want_a, want_b) = (bodies(store, &a), bodies(store, &b));
        assert_eq!(want_a.len(), 10);
        store.ack(&a, 3).unwrap();
        (index, want_a, want_b)
    }

    #[test]
    fn commits_the_index_lost_are_replayed_from_the_segment_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open_with_segment_size(&path, StoreLimits::default(), 8192).unwrap();
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        store.register_device(&registration(1), 1).unwrap();
        store.register_device(&registration(2), 1).unwrap();
        let (index, want_a, want_b) = commits_past_a_checkpoint(&store, &path, a, b);
        let crashed = crash_image(&index, &store, dir.path());
        let files = segment_files(&store);
        assert!(files.len() >= 4, "{files:?}");
        // The index alone knows only the two envelopes before the checkpoint.
        assert_eq!(raw_inbox_rows(&crashed), 2);
        let store =
            RedbStore::open_with_segment_size(&crashed, StoreLimits::default(), 8192).unwrap();
        // Every envelope whose commit returned is back, under its seq; the
        // ack was lost with the index, so seqs 1..3 are delivered again.
        assert_eq!(bodies(&store, &a), want_a);
        assert_eq!(bodies(&store, &b), want_b);
        assert_eq!(segment_files(&store), files);
        store.check_consistency().unwrap();
        // Dedup entries came back too: a retry is a duplicate of its
        // original seq, and new envelopes continue the inbox.
        let a5 = want_a.iter().position(|(_, body)| body[0] == 5).unwrap();
        assert_eq!(
            store.commit(&[envelope(a, 5, 3000)]).unwrap(),
            vec![CommitOutcome::Duplicate { seq: want_a[a5].0 }]
        );
        assert_eq!(
            store.commit(&[envelope(a, 13, 10)]).unwrap(),
            vec![CommitOutcome::Stored { seq: 11 }]
        );
        store.check_consistency().unwrap();
        // A second open replays nothing more (the replay was durable).
        drop(store);
        let store =
            RedbStore::open_with_segment_size(&crashed, StoreLimits::default(), 8192).unwrap();
        assert_eq!(bodies(&store, &a).len(), 11);
        store.check_consistency().unwrap();
    }

    #[test]
    fn a_roll_cut_short_before_its_header_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open_with_segment_size(&path, StoreLimits::default(), 8192).unwrap();
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        store.register_device(&registration(1), 1).unwrap();
        store.register_device(&registration(2), 1).unwrap();
        let (index, want_a, want_b) = commits_past_a_checkpoint(&store, &path, a, b);
        let crashed = crash_image(&index, &store, dir.path());
        let files = segment_files(&store);
        // The kill came between creating the next segment and writing its
        // header; a file after it cannot be part of the log either.
        let last = *files.last().unwrap();
        let segs = segment_dir(&crashed);
        let empty = super::super::segments::segment_path(&segs, last + 1);
        std::fs::write(&empty, b"").unwrap();
        let after = super::super::segments::segment_path(&segs, last + 2);
        std::fs::copy(super::super::segments::segment_path(&segs, last), &after).unwrap();
        let store =
            RedbStore::open_with_segment_size(&crashed, StoreLimits::default(), 8192).unwrap();
        assert_eq!(bodies(&store, &a), want_a);
        assert_eq!(bodies(&store, &b), want_b);
        assert_eq!(segment_files(&store), files);
        store.check_consistency().unwrap();
    }

    #[test]
    fn a_batch_torn_by_the_crash_is_cut_off_and_its_retry_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open_with_segment_size(&path, StoreLimits::default(), 8192).unwrap();
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        store.register_device(&registration(1), 1).unwrap();
        store.register_device(&registration(2), 1).unwrap();
        let (index, want_a, want_b) = commits_past_a_checkpoint(&store, &path, a, b);
        let crashed = crash_image(&index, &store, dir.path());
        // The last batch (b's 11 and a's 12) lost its last bytes: its
        // trailer is incomplete, so it was never acknowledged.
        let last = *segment_files(&store).last().unwrap();
        let seg = super::super::segments::segment_path(&segment_dir(&crashed), last);
        let len = segment_end(&store, last);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let store =
            RedbStore::open_with_segment_size(&crashed, StoreLimits::default(), 8192).unwrap();
        assert_eq!(bodies(&store, &a), want_a[..9].to_vec());
        assert_eq!(bodies(&store, &b), want_b[..1].to_vec());
        store.check_consistency().unwrap();
        // The torn batch's bytes are gone, and its retry is stored anew
        // under the seq it had.
        let row = row_of(&store, &a, 9);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            row.body.record_end() + (BATCH_HEADER_LEN + BATCH_ENTRY_LEN) as u64
        );
        assert_eq!(
            store
                .commit(&[envelope(b, 11, 50), envelope(a, 12, 50)])
                .unwrap(),
            vec![
                CommitOutcome::Stored { seq: 2 },
                CommitOutcome::Stored { seq: 10 }
            ]
        );
        assert_eq!(bodies(&store, &a), want_a);
        store.check_consistency().unwrap();
    }

    /// What a checkpoint does around the commits it lets through: raise the
    /// flag, (commit durably,) then index what the log got meanwhile. The
    /// durable commit itself is left out so the test decides what happens
    /// while it "runs".
    fn hold_index(store: &RedbStore) {
        store.ahead().checkpointing = true;
    }

    fn release_index(store: &RedbStore) {
        store.drain_ahead().unwrap();
    }

    /// The store cap counts the sends a checkpoint keeps in the log alone
    /// when it admits a blob, as it does when it admits envelopes.
    #[test]
    fn a_blob_is_refused_when_sends_ahead_of_the_index_filled_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let limits = StoreLimits {
            max_store_bytes: 64 * 1024,
            ..StoreLimits::default()
        };
        let store = RedbStore::open_with_segment_size(&path, limits, 1 << 20).unwrap();
        let a = DeviceId([1; 16]);
        store.register_device(&registration(1), 1).unwrap();
        let blob = |id: u8| super::super::BlobWrite {
            owner: a,
            blob: hush_protocol::BlobId([id; 16]),
            offset: 0,
            total_len: 16 * 1024,
            bytes: &[7; 16 * 1024],
        };
        let blob_limits = super::super::BlobLimits::default();
        hold_index(&store);
        let mut stored = 0;
        for m in 1..=12 {
            let got = store.commit(&[envelope(a, m, 4000)]).unwrap();
            if got == [CommitOutcome::Stored { seq: u64::from(m) }] {
                stored += 1;
            }
        }
        assert!(stored >= 8, "{stored} envelopes fit the cap");
        assert!(store.ahead_of_index() > 0, "they wait in the log");
        assert!(matches!(
            store.blob_put(&blob(1), &blob_limits, 1),
            Err(StoreError::StoreFull)
        ));
        // Indexed, the same envelopes count the same.
        release_index(&store);
        assert!(matches!(
            store.blob_put(&blob(1), &blob_limits, 1),
            Err(StoreError::StoreFull)
        ));
        // Acknowledged, they free the room.
        store.ack(&a, u64::MAX).unwrap();
        store.blob_put(&blob(1), &blob_limits, 1).unwrap();
        store.check_consistency().unwrap();
    }

    #[test]
    fn sends_during_a_checkpoint_are_logged_acked_and_indexed_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let limits = StoreLimits {
            max_inbox_messages: 8,
            ..StoreLimits::default()
        };
        let store = RedbStore::open_with_segment_size(&path, limits, 8192).unwrap();
        let (a, b, stranger) = (DeviceId([1; 16]), DeviceId([2; 16]), DeviceId([3; 16]));
        store.register_device(&registration(1), 1).unwrap();
        store.register_device(&registration(2), 1).unwrap();
        store
            .commit(&[envelope(a, 1, 100), envelope(b, 2, 100)])
            .unwrap();
        hold_index(&store);
        // Decided as the index would: seqs continue each inbox, a retry of
        // an indexed envelope or of one in the log is a duplicate of its
        // seq, strangers are refused, and the quota counts the log too.
        let mut got = Vec::new();
        for m in 3..=9 {
            got.extend(store.commit(&[envelope(a, m, 3000)]).unwrap());
        }
        let seqs: Vec<CommitOutcome> = (2..=8).map(|seq| CommitOutcome::Stored { seq }).collect();
        assert_eq!(got, seqs);
        assert!(segment_files(&store).len() >= 3, "the log rolled");
        assert_eq!(
            store
                .commit(&[
                    envelope(a, 1, 100),
                    envelope(a, 4, 3000),
                    envelope(stranger, 20, 10),
                    envelope(b, 21, 10),
                    envelope(b, 21, 10),
                    envelope(a, 22, 10),
                    envelope(a, 23, 10),
                ])
                .unwrap(),
            vec![
                CommitOutcome::Duplicate { seq: 1 },
                CommitOutcome::Duplicate { seq: 3 },
                CommitOutcome::Refused(Refusal::UnknownRecipient),
                CommitOutcome::Stored { seq: 2 },
                CommitOutcome::Duplicate { seq: 2 },
                CommitOutcome::Refused(Refusal::QuotaMessages),
                CommitOutcome::Refused(Refusal::QuotaMessages),
            ]
        );
        assert_eq!(store.ahead_of_index(), 8);
        // Not in the index yet: compaction waits, and so does a pull of an
        // inbox with envelopes in the log alone (it must not miss what was
        // acknowledged), while other inboxes are read at once.
        assert!(!store.compact(COMPACT_STEP_BYTES).unwrap());
        assert_eq!(bodies(&store, &stranger), vec![]);
        let store = std::sync::Arc::new(store);
        let reader = {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || bodies(&store, &b))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!reader.is_finished(), "a pull read past an unindexed send");
        release_index(&store);
        assert_eq!(
            reader.join().unwrap(),
            vec![(1, vec![2; 100]), (2, vec![21; 10])]
        );
        let store = std::sync::Arc::into_inner(store).unwrap();
        assert_eq!(store.ahead_of_index(), 0);
        let want_a: Inbox = std::iter::once((1, vec![1u8; 100]))
            .chain((3..=9u8).map(|m| (u64::from(m) - 1, vec![m; 3000])))
            .collect();
        assert_eq!(bodies(&store, &a), want_a);
        assert_eq!(
            bodies(&store, &b),
            vec![(1, vec![2; 100]), (2, vec![21; 10])]
        );
        store.check_consistency().unwrap();
        // The index continues where the log left it.
        assert_eq!(
            store
                .commit(&[envelope(b, 30, 10), envelope(a, 4, 3000)])
                .unwrap(),
            vec![
                CommitOutcome::Stored { seq: 3 },
                CommitOutcome::Duplicate { seq: 3 }
            ]
        );
        store.checkpoint().unwrap();
        drop(store);
        let store = RedbStore::open_with_segment_size(&path, limits, 8192).unwrap();
        assert_eq!(store.recovered_at_open(), 0);
        assert_eq!(bodies(&store, &a), want_a);
        store.check_consistency().unwrap();
    }

    #[test]
    fn a_crash_while_the_log_is_ahead_of_the_index_loses_no_ack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open_with_segment_size(&path, StoreLimits::default(), 8192).unwrap();
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        store.register_device(&registration(1), 1).unwrap();
        store.register_device(&registration(2), 1).unwrap();
        store
            .commit(&[envelope(a, 1, 100), envelope(b, 2, 100)])
            .unwrap();
        store.checkpoint().unwrap();
        // The index as the checkpoint left it on disk; the process dies
        // before the batches acknowledged meanwhile reach it.
        let index = std::fs::read(&path).unwrap();
        hold_index(&store);
        let mut acked = 0;
        for m in 3..=10 {
            let out = store.commit(&[envelope(a, m, 3000), envelope(b, m + 100, 10)]);
            acked += out
                .unwrap()
                .iter()
                .filter(|o| matches!(o, CommitOutcome::Stored { .. }))
                .count();
        }
        assert_eq!(acked, 16);
        let crashed = crash_image(&index, &store, dir.path());
        drop(store);
        let store =
            RedbStore::open_with_segment_size(&crashed, StoreLimits::default(), 8192).unwrap();
        assert_eq!(store.recovered_at_open(), 16);
        let got_a = bodies(&store, &a);
        assert_eq!(got_a.len(), 9);
        assert!(
            got_a
                .iter()
                .enumerate()
                .all(|(i, (seq, _))| *seq == i as u64 + 1)
        );
        assert_eq!(bodies(&store, &b).len(), 9);
        store.check_consistency().unwrap();
    }

    #[test]
    fn checkpoints_racing_sends_lose_and_repeat_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = std::sync::Arc::new(
            RedbStore::open_with_segment_size(&path, StoreLimits::default(), 64 * 1024).unwrap(),
        );
        let devices: Vec<DeviceId> = (1..=3u8).map(|n| DeviceId([n; 16])).collect();
        for n in 1..=3u8 {
            store.register_device(&registration(n), 1).unwrap();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpoints = {
            let (store, stop) = (std::sync::Arc::clone(&store), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::Acquire) {
                    store.checkpoint().unwrap();
                    n += 1;
                    std::thread::yield_now();
                }
                n
            })
        };
        let mut want: HashMap<DeviceId, u64> = HashMap::new();
        // At least 600 sends, and on until some went to the log while a
        // checkpoint held the index.
        let mut m = 0u32;
        while m < 600 || (store.logged_ahead_total() == 0 && m < 20_000) {
            m += 1;
            // Every tenth send is a retry of the one before it.
            let id = if m.is_multiple_of(10) { m - 1 } else { m };
            let to = devices[id as usize % 3];
            match store.commit(&[envelope(to, id, 200)]).unwrap()[..] {
                [CommitOutcome::Stored { seq }] => {
                    assert!(id == m, "retry {m} stored again");
                    let head = want.entry(to).or_insert(0);
                    *head += 1;
                    assert_eq!(seq, *head);
                }
                [CommitOutcome::Duplicate { .. }] => assert!(id != m),
                ref other => panic!("{other:?}"),
            }
        }
        assert!(store.logged_ahead_total() > 0);
        stop.store(true, Ordering::Release);
        let ran = checkpoints.join().unwrap();
        assert!(ran > 0);
        // Sends indexed by a drain (which takes no commit lock) and sends
        // appended meanwhile are all there, once, in order; and so they are
        // after a reopen (the last sends without the final checkpoint, as a
        // crash would leave them).
        for m in 20_001..20_010u32 {
            let to = devices[m as usize % 3];
            store.commit(&[envelope(to, m, 200)]).unwrap();
            *want.entry(to).or_insert(0) += 1;
        }
        let check = |store: &RedbStore| {
            for d in &devices {
                let got = bodies(store, d);
                assert_eq!(got.len() as u64, want[d]);
                assert!(
                    got.iter()
                        .enumerate()
                        .all(|(i, (seq, _))| *seq == i as u64 + 1)
                );
            }
            store.check_consistency().unwrap();
        };
        check(&store);
        drop(store);
        let store =
            RedbStore::open_with_segment_size(&path, StoreLimits::default(), 64 * 1024).unwrap();
        check(&store);
        store.checkpoint().unwrap();
        check(&store);
    }
}
