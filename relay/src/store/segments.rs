//! Envelope bodies in append-only segment files.
//!
//! The redb file keeps only a small index row per envelope (`inbox`); the
//! envelope bytes go to numbered segment files next to it, appended
//! sequentially by the commit and synced once per batch before the redb
//! transaction that references them commits. Inserting 1 KiB values into a
//! B-tree (page allocation, copy-on-write of half-full leaves, checksums) was
//! the relay's ingest bottleneck; appending them to a file is a `memcpy`, a
//! checksum and one `pwrite` per batch.
//!
//! The segments are also the log of envelope commits: each batch ends with a
//! trailer (magic, record count, the batch's start offset, CRC, and per
//! record what the index needs besides the record), so a batch is whole or
//! it is not, and the redb commit of a batch need not be synced. Rules that
//! keep this crash-safe (`docs/STORAGE.md` §5):
//!
//! - bytes are written and `fdatasync`ed **before** the redb commit that
//!   points at them, so a committed index row never points at lost bytes,
//!   and a batch is acknowledged only after both;
//! - the committed length of every segment is kept in redb (`segments` table):
//!   on open, the whole batches past the durable length are committed again
//!   ([`parse_log`], [`Segments::read_log`]), and what follows the last of
//!   them (a batch whose sync never finished) is cut off and never read;
//! - a batch whose redb commit failed is cut off at once ([`Append::abandon`]),
//!   and a failed write or sync stops all further commits until a reopen;
//! - a segment file is deleted only after a **durable** commit removed its
//!   last index row, so a crash can never bring back rows whose file is gone.
//!
//! Every record carries its device, seq, length and a CRC-32, so a damaged or
//! misplaced record is reported as a [`StoreError`], never read as something
//! else and never a panic.
//!
//! The active segment is kept zero-filled a little way past its end by the
//! small batches of a quiet relay ([`ZERO_AHEAD`], [`ZERO_AHEAD_BATCH`]), so
//! their syncs write no new file length; zeros are no record, so the log ends
//! at them.

use super::StoreError;
use super::tables::{SegmentInfo, corrupt};
use bytes::Bytes;
use hush_protocol::{ConversationId, DeviceId, MessageId};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// Size at which the active segment is closed and a new one started (a
/// segment holds at least one whole batch, so a very large batch can make one
/// longer).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// First bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"HUSHSEGM";
/// Bytes of the segment file header: magic ‖ format u32 ‖ segment id u32.
pub(crate) const SEGMENT_HEADER_LEN: u64 = 16;
/// First bytes of every record.
pub(crate) const RECORD_MAGIC: [u8; 4] = *b"HENV";
/// Bytes of a record before the envelope: magic 4 ‖ len u32 ‖ device 16 ‖
/// seq u64 ‖ crc32 u32.
pub(crate) const RECORD_HEADER_LEN: usize = 36;
/// Where the checksum sits in a record header (it covers the 32 bytes before
/// it and the envelope after it).
const CRC_AT: usize = 32;
/// First bytes of a batch trailer: the commit record that closes each
/// batch of envelopes appended by [`Append::seal_batch`].
pub(crate) const BATCH_MAGIC: [u8; 4] = *b"HBAT";
/// Bytes of a batch trailer before its entries: magic 4 ‖ count u32 ‖
/// start u64 ‖ crc32 u32.
pub(crate) const BATCH_HEADER_LEN: usize = 20;
/// Bytes of one trailer entry: sender 16 ‖ message id 16 ‖ conversation 16
/// ‖ sender seq u64 ‖ expires_at_ms u64.
pub(crate) const BATCH_ENTRY_LEN: usize = 64;
/// Largest gap between two records that [`Segments::read_many`] reads over
/// rather than issuing another read: copying a page more costs about what a
/// system call does, copying the other inboxes' records between two of one
/// inbox's (16 KiB when 16 inboxes share the traffic) costs more.
const MAX_READ_GAP: u64 = 4 * 1024;
/// Largest single read of [`Segments::read_many`].
const MAX_READ_SPAN: u64 = 1024 * 1024;
/// Segment files kept open for reading at most (besides those in use).
const MAX_OPEN_SEGMENTS: usize = 256;
/// Largest batch buffer kept for the next commit.
const SPARE_MAX: usize = 32 * 1024 * 1024;
/// The active segment is kept zero-filled this far ahead of its end, a
/// step at a time, by batches of at most [`ZERO_AHEAD_BATCH`] bytes. Small
/// steps keep each step's extra write small: in a synthetic test of 9 KB
/// writes each synced (a relay at 10,000 sends/s), 64 KiB steps gave a sync p50 /
/// p99 / max of 0.17 / 0.81 / 1.3 ms on the reference host, 1 MiB steps
/// 0.19 / 0.69 / 3.3 ms (and a worse ack latency p99), and no zeros
/// 0.34 / 1.26 / 2.1 ms.
const ZERO_AHEAD: u64 = 64 * 1024;
/// Batches up to this size write into zeroed space: their `fdatasync` then
/// writes no new file length and allocates no block, so it commits no
/// file system metadata (which waits on every other file's). In the relay
/// the write and sync of a one-envelope batch took 0.163–0.169 ms at the
/// p50 that way against 0.200–0.210 ms at the end of the file. (A hole
/// made by `ftruncate` gained nothing there: the blocks are allocated at
/// the sync.) Larger batches, which come only under load, extend the file
/// as they go, so the zeros never add to the bytes written at high rates.
const ZERO_AHEAD_BATCH: usize = 64 * 1024;
/// File name extension of segment files.
const SEGMENT_EXT: &str = "seg";

/// Where one envelope's record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyRef {
    /// Segment id (file `{id:06}.seg`).
    pub segment: u32,
    /// Offset of the record (its header) in the file.
    pub offset: u64,
    /// Envelope length (the record is `RECORD_HEADER_LEN` longer).
    pub len: u32,
}

impl BodyRef {
    /// Bytes the whole record occupies.
    pub(crate) fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.len)
    }

    /// One past the record's last byte.
    pub(crate) fn record_end(&self) -> u64 {
        self.offset.saturating_add(self.record_len())
    }
}

/// A record found by [`Segments::scan`].
#[derive(Debug)]
pub(crate) struct ScannedRecord {
    /// Its inbox.
    pub device: DeviceId,
    /// Its seq.
    pub seq: u64,
    /// Where it is.
    pub body: BodyRef,
    /// The envelope, checked against the record's CRC.
    pub envelope: Vec<u8>,
}

/// What the index needs of an envelope besides its record: the fields of a
/// [`super::NewEnvelope`] that the record header does not carry. A batch
/// trailer lists one per record, so a batch whose index commit was lost in a
/// crash can be committed again from the segment alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoggedFields {
    /// Sending device.
    pub sender: DeviceId,
    /// The envelope's message id.
    pub message_id: MessageId,
    /// Its conversation.
    pub conversation: ConversationId,
    /// Its sender seq.
    pub sender_seq: u64,
    /// When it is purged if still unacknowledged.
    pub expires_at_ms: u64,
}

/// One envelope of a [`LoggedBatch`].
#[derive(Debug)]
pub(crate) struct LoggedRecord {
    /// Its inbox.
    pub device: DeviceId,
    /// Its seq.
    pub seq: u64,
    /// Where its record is.
    pub body: BodyRef,
    /// The envelope.
    pub envelope: Vec<u8>,
    /// The rest of what its index row and dedup entry need.
    pub fields: LoggedFields,
}

/// A whole batch found past a segment's durably committed end: its records
/// and trailer are all intact, and the trailer names where the batch began.
#[derive(Debug)]
pub(crate) struct LoggedBatch {
    /// Where its first record begins.
    pub start: u64,
    /// One past its trailer.
    pub end: u64,
    /// Its envelopes, in the order they were appended.
    pub records: Vec<LoggedRecord>,
}

/// Why a record could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The segment file was deleted: the reader's snapshot predates the
    /// commit that dropped its last rows, so a fresh snapshot will not
    /// reference it any more.
    Gone(u32),
    /// IO failure or a damaged record.
    Store(StoreError),
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        ReadError::Store(e)
    }
}

impl From<ReadError> for StoreError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Gone(id) => StoreError::Backend(format!("segment {id} is missing")),
            ReadError::Store(e) => e,
        }
    }
}

fn io(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{what}: {e}"))
}

/// The segment being appended to.
#[derive(Debug, Clone)]
struct Active {
    id: u32,
    file: Arc<File>,
    /// Committed length.
    end: u64,
    /// The file is zeros from `end` up to here (at least `end`).
    zeroed: u64,
}

/// The segment files of one store.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    max_bytes: u64,
    /// Open handles by id (the active segment's always, others as readers
    /// need them, at most `MAX_OPEN_SEGMENTS`); readers keep using a handle
    /// after its file is unlinked.
    handles: RwLock<HashMap<u32, Arc<File>>>,
    /// Changed only by the commit (under `commit_lock`) and by replays at
    /// open: a replay during a checkpoint's drain lies behind it and leaves
    /// it alone ([`Segments::finish_append`]).
    active: Mutex<Option<Active>>,
    /// Held by a commit from choosing where its batch goes until the active
    /// segment's new end is recorded, which outlasts redb's write lock.
    commit_lock: Mutex<()>,
    /// Segments whose last rows were removed by a commit that was not yet
    /// durable: deleted after the next durable commit.
    pending: Mutex<Vec<u32>>,
    /// The last batch's buffer, reused so a commit does not fault in
    /// megabytes of fresh memory.
    spare: Mutex<Vec<u8>>,
    /// Raised when a batch's bytes may be on disk in a state the store
    /// cannot vouch for (see [`Append::write_and_sync`]): every later
    /// commit fails until a restart recovers the log.
    poisoned: Arc<std::sync::atomic::AtomicBool>,
}

/// A segment whose bytes past `from` may hold batches that were synced but
/// whose index commit was not durable when the store last closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogTail {
    /// The segment.
    pub id: u32,
    /// Its durably committed end (the header's end for a segment that has
    /// no `segments` row yet).
    pub from: u64,
    /// Whether it has no `segments` row (a roll whose commit was not
    /// durable).
    pub unlisted: bool,
}

/// Path of segment `id` in `dir`.
pub(crate) fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:06}.{SEGMENT_EXT}"))
}

/// The id of a segment file name, if it is one.
fn segment_id(name: &std::ffi::OsStr) -> Option<u32> {
    let name = name.to_str()?;
    let stem = name.strip_suffix(".seg")?;
    if stem.is_empty() || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

fn segment_header(id: u32, format: u32) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&format.to_be_bytes());
    h[12..].copy_from_slice(&id.to_be_bytes());
    h
}

/// Append one record (`RECORD_HEADER_LEN` + envelope) to `buf`.
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    device: &DeviceId,
    seq: u64,
    envelope: &[u8],
) -> Result<u32, StoreError> {
    let len = u32::try_from(envelope.len())
        .map_err(|_| StoreError::Backend("envelope too large for a segment record".into()))?;
    let mut head = [0u8; RECORD_HEADER_LEN];
    head[..4].copy_from_slice(&RECORD_MAGIC);
    head[4..8].copy_from_slice(&len.to_be_bytes());
    head[8..24].copy_from_slice(device.as_bytes());
    head[24..32].copy_from_slice(&seq.to_be_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[..CRC_AT]);
    crc.update(envelope);
    head[CRC_AT..].copy_from_slice(&crc.finalize().to_be_bytes());
    buf.extend_from_slice(&head);
    buf.extend_from_slice(envelope);
    Ok(len)
}

/// Check a record read from disk against what its index row says and return
/// the envelope. `record` is exactly the record's bytes.
pub(crate) fn decode_record(
    record: &[u8],
    device: &DeviceId,
    seq: u64,
    len: u32,
) -> Result<Vec<u8>, StoreError> {
    check_record(record, device, seq, len)?;
    Ok(record.get(RECORD_HEADER_LEN..).unwrap_or_default().to_vec())
}

/// Check the record of `(device, seq)` with an envelope of `len` bytes
/// (magic, length, device, seq, CRC): on success the envelope is
/// `record[RECORD_HEADER_LEN..]`.
fn check_record(record: &[u8], device: &DeviceId, seq: u64, len: u32) -> Result<(), StoreError> {
    let bad = || corrupt(&format!("envelope record (seq {seq})"));
    let head: [u8; RECORD_HEADER_LEN] = record
        .get(..RECORD_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(bad)?;
    let body = record.get(RECORD_HEADER_LEN..).ok_or_else(bad)?;
    let field = |at: usize| -> [u8; 8] {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[at..at + 8]);
        b
    };
    let stored_len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let stored_crc = u32::from_be_bytes([head[32], head[33], head[34], head[35]]);
    if head[..4] != RECORD_MAGIC
        || stored_len != len
        || body.len() != len as usize
        || head[8..24] != device.as_bytes()[..]
        || u64::from_be_bytes(field(24)) != seq
    {
        return Err(bad());
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[..CRC_AT]);
    crc.update(body);
    if crc.finalize() != stored_crc {
        return Err(bad());
    }
    Ok(())
}

/// One batch's records, built inside the commit transaction and written by
/// [`Append::write_and_sync`] before it commits.
#[derive(Debug)]
pub(crate) struct Append {
    /// Segment the batch goes to.
    pub id: u32,
    file: Arc<File>,
    /// Where the batch starts (the segment's committed end).
    start: u64,
    buf: Vec<u8>,
    /// The previous active segment, when this batch starts a new one.
    pub rolled_from: Option<u32>,
    /// Trailer entries of the records pushed with [`Append::push_logged`].
    entries: Vec<LoggedFields>,
    /// Bytes of the records pushed (headers and envelopes, no trailer).
    record_bytes: u64,
    /// Records of a batch being replayed from the log (already on disk, in
    /// order): pushes check against them instead of writing.
    replay: Option<std::collections::VecDeque<(DeviceId, u64, BodyRef)>>,
    /// End of the replayed batch (its trailer's end).
    replay_end: u64,
    /// The store's poison flag, raised when the batch's bytes cannot be
    /// taken back after a failed commit.
    poisoned: Arc<std::sync::atomic::AtomicBool>,
    /// The file is zeros from `start` up to here; [`Append::write_and_sync`]
    /// moves it on.
    zeroed: u64,
    /// How far zeros may go ahead: the segment's roll size.
    zero_limit: u64,
}

impl Append {
    /// Add an envelope's record; returns where it will be.
    pub(crate) fn push(
        &mut self,
        device: &DeviceId,
        seq: u64,
        envelope: &[u8],
    ) -> Result<BodyRef, StoreError> {
        if let Some(expected) = self.replay.as_mut() {
            // Replaying: the record is on disk already and must be the
            // next one of the batch, under the seq the index assigns again.
            return match expected.pop_front() {
                Some((d, s, body))
                    if d == *device && s == seq && body.len as usize == envelope.len() =>
                {
                    self.record_bytes += body.record_len();
                    Ok(body)
                }
                _ => Err(corrupt(&format!(
                    "segment {} log (a replayed envelope for seq {seq} does not match its record)",
                    self.id
                ))),
            };
        }
        let offset = self.end();
        let len = encode_record(&mut self.buf, device, seq, envelope)?;
        let body = BodyRef {
            segment: self.id,
            offset,
            len,
        };
        self.record_bytes += body.record_len();
        Ok(body)
    }

    /// [`Append::push`] for an envelope of a new batch, noting what its
    /// trailer needs to replay it.
    pub(crate) fn push_logged(
        &mut self,
        device: &DeviceId,
        seq: u64,
        envelope: &[u8],
        fields: LoggedFields,
    ) -> Result<BodyRef, StoreError> {
        let body = self.push(device, seq, envelope)?;
        if self.replay.is_none() {
            self.entries.push(fields);
        }
        Ok(body)
    }

    /// Close the batch with its trailer (when it has logged records). Call
    /// after the last push, before [`Append::end`] is recorded.
    pub(crate) fn seal_batch(&mut self) {
        if self.replay.is_some() || self.entries.is_empty() {
            return;
        }
        encode_trailer(&mut self.buf, self.start, &self.entries);
        self.entries.clear();
    }

    /// The segment's length once this batch is written.
    pub(crate) fn end(&self) -> u64 {
        if self.replay.is_some() {
            return self.replay_end;
        }
        self.start + self.buf.len() as u64
    }

    /// Where the batch begins in its segment.
    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// Bytes of the batch's records (what their index rows count as live;
    /// the trailer is never live).
    pub(crate) fn record_bytes(&self) -> u64 {
        self.record_bytes
    }

    /// Write the batch at the segment's committed end and make it (and the
    /// file's new length) durable. A replayed batch is on disk already.
    /// A small batch past the zeroed space zeroes the next
    /// [`ZERO_AHEAD`] in the same sync (see [`ZERO_AHEAD_BATCH`]).
    pub(crate) fn write_and_sync(&mut self) -> Result<(), StoreError> {
        self.write()?;
        self.sync()
    }

    /// Whether this batch is a replay of records already in the log (its
    /// write and sync do nothing).
    pub(crate) fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// The first half of [`Append::write_and_sync`]: the batch's bytes (and
    /// any zeros ahead) into the file, not yet durable.
    pub(crate) fn write(&mut self) -> Result<(), StoreError> {
        if self.replay.is_some() {
            return Ok(());
        }
        let end = self.end();
        let zero_to = if self.buf.len() <= ZERO_AHEAD_BATCH && end > self.zeroed {
            (end.div_ceil(ZERO_AHEAD).saturating_add(1) * ZERO_AHEAD).min(self.zero_limit.max(end))
        } else {
            end
        };
        let done = write_all_at(&self.file, &self.buf, self.start)
            .and_then(|()| write_zeros(&self.file, end.max(self.zeroed), zero_to))
            .map_err(|e| io("writing envelope segment", e));
        match done {
            Ok(()) => self.zeroed = self.zeroed.max(zero_to),
            Err(_) => self.poison(),
        }
        done
    }

    /// The second half of [`Append::write_and_sync`]: make what
    /// [`Append::write`] wrote durable. Takes `&self` and touches only the
    /// file, so it may run on another thread while the commit's index rows
    /// are built (`RedbStore::commit_batch`).
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        if self.replay.is_some() {
            return Ok(());
        }
        self.sync_later().sync()
    }

    /// What [`Append::sync`] needs, to sync the batch after its index
    /// commit on another thread (`redb_store::behind`).
    pub(crate) fn sync_later(&self) -> LaterSync {
        LaterSync {
            file: Arc::clone(&self.file),
            poisoned: Arc::clone(&self.poisoned),
        }
    }

    /// After a failed write or fdatasync the kernel may have dropped the
    /// pages and will not report it again: nothing written from now on
    /// could be trusted to be durable.
    fn poison(&self) {
        mark_failed(&self.poisoned, "a segment write or sync failed");
    }

    /// The batch's index commit failed after its bytes were written: cut
    /// them off, so a replay after a crash does not find a batch whose seqs
    /// were handed out again. If that fails too, the store refuses further
    /// commits (a restart replays the batch, which is harmless then: its
    /// senders retry, and the retries are duplicates).
    pub(crate) fn abandon(&self) {
        if self.replay.is_some() {
            return;
        }
        let undone = self
            .file
            .set_len(self.start)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = undone {
            tracing::error!(segment = self.id, "could not cut off a failed batch: {e}");
            self.poison();
        }
    }
}

/// A written batch's segment file, to be made durable later
/// ([`Append::sync_later`]).
#[derive(Debug, Clone)]
pub(crate) struct LaterSync {
    file: Arc<File>,
    poisoned: Arc<std::sync::atomic::AtomicBool>,
}

impl LaterSync {
    /// Whether `other` syncs the same file (one `fdatasync` serves both).
    pub(crate) fn same_file(&self, other: &LaterSync) -> bool {
        Arc::ptr_eq(&self.file, &other.file)
    }

    /// `fdatasync` the file: everything written to it before this call is
    /// durable when it returns `Ok`. A failure poisons the log, as
    /// [`Append::sync`]'s does.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        let done = self
            .file
            .sync_data()
            .map_err(|e| io("syncing envelope segment", e));
        if done.is_err() {
            mark_failed(&self.poisoned, "a segment write or sync failed");
        }
        done
    }
}

/// A [`LaterSync`] of a new file at `path` (for tests of the sync thread).
#[cfg(test)]
pub(crate) fn later_sync_for_test(path: &Path) -> LaterSync {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("test file");
    LaterSync {
        file: Arc::new(file),
        poisoned: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    }
}

/// A [`LaterSync`] whose sync fails (a pipe cannot be synced), and the
/// poison flag it raises (for tests of the sync thread).
#[cfg(test)]
pub(crate) fn failing_sync_for_test(
    _dir: &Path,
) -> (LaterSync, Arc<std::sync::atomic::AtomicBool>) {
    let (reader, _writer) = std::io::pipe().expect("pipe");
    let fd: std::os::fd::OwnedFd = reader.into();
    let poisoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (
        LaterSync {
            file: Arc::new(File::from(fd)),
            poisoned: Arc::clone(&poisoned),
        },
        poisoned,
    )
}

/// Set the log's failed flag; the first time, say so in the relay's log
/// (once: every later commit is refused with the same error, and
/// `/healthz` and `hush_store_failed` report it).
fn mark_failed(flag: &std::sync::atomic::AtomicBool, why: &str) {
    if !flag.swap(true, std::sync::atomic::Ordering::AcqRel) {
        tracing::error!(
            "envelope segments failed ({why}): refusing sends until the relay is restarted, \
             which recovers every acknowledged envelope from the log"
        );
    }
}

/// Append a batch trailer for a batch that began at `start` with one entry
/// per record.
fn encode_trailer(buf: &mut Vec<u8>, start: u64, entries: &[LoggedFields]) {
    let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
    let mut head = [0u8; BATCH_HEADER_LEN];
    head[..4].copy_from_slice(&BATCH_MAGIC);
    head[4..8].copy_from_slice(&count.to_be_bytes());
    head[8..16].copy_from_slice(&start.to_be_bytes());
    let at = buf.len();
    buf.extend_from_slice(&head);
    for e in entries.iter().take(count as usize) {
        buf.extend_from_slice(e.sender.as_bytes());
        buf.extend_from_slice(e.message_id.as_bytes());
        buf.extend_from_slice(e.conversation.as_bytes());
        buf.extend_from_slice(&e.sender_seq.to_be_bytes());
        buf.extend_from_slice(&e.expires_at_ms.to_be_bytes());
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[at..at + 16]);
    crc.update(&buf[at + BATCH_HEADER_LEN..]);
    let sum = crc.finalize().to_be_bytes();
    buf[at + 16..at + BATCH_HEADER_LEN].copy_from_slice(&sum);
}

/// Bytes of a trailer with `count` entries.
fn trailer_len(count: u32) -> u64 {
    BATCH_HEADER_LEN as u64 + u64::from(count) * BATCH_ENTRY_LEN as u64
}

/// Parse the whole batches in `bytes`, which are a segment's contents from
/// offset `base` (a batch boundary) to its end. Stops at the first thing
/// that is not a whole, intact batch whose trailer names where it began:
/// bytes of a batch whose write a crash interrupted, or the leftover of a
/// batch that a later, shorter one overwrote. Returns the batches and where
/// the last one ends (`base` if none).
pub(crate) fn parse_log(segment: u32, base: u64, bytes: &[u8]) -> (Vec<LoggedBatch>, u64) {
    let mut batches = Vec::new();
    let mut at = 0usize;
    let mut valid = base;
    'batches: loop {
        let start = base + at as u64;
        let mut pending: Vec<(DeviceId, u64, BodyRef, Vec<u8>)> = Vec::new();
        loop {
            let Some(magic) = bytes.get(at..at + 4) else {
                break 'batches;
            };
            if magic == RECORD_MAGIC {
                let Some(head) = bytes.get(at..at + RECORD_HEADER_LEN) else {
                    break 'batches;
                };
                let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                let mut device = [0u8; 16];
                device.copy_from_slice(&head[8..24]);
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&head[24..32]);
                let (device, seq) = (DeviceId(device), u64::from_be_bytes(seq));
                let Some(record) = bytes.get(at..at + RECORD_HEADER_LEN + len as usize) else {
                    break 'batches;
                };
                let Ok(envelope) = decode_record(record, &device, seq, len) else {
                    break 'batches;
                };
                let body = BodyRef {
                    segment,
                    offset: base + at as u64,
                    len,
                };
                pending.push((device, seq, body, envelope));
                at += record.len();
            } else if magic == BATCH_MAGIC {
                let Some(head) = bytes.get(at..at + BATCH_HEADER_LEN) else {
                    break 'batches;
                };
                let count = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                let mut from = [0u8; 8];
                from.copy_from_slice(&head[8..16]);
                let stored_crc = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
                let total = trailer_len(count) as usize;
                let Some(entries) = bytes.get(at + BATCH_HEADER_LEN..at + total) else {
                    break 'batches;
                };
                let mut crc = crc32fast::Hasher::new();
                crc.update(&head[..16]);
                crc.update(entries);
                if crc.finalize() != stored_crc
                    || u64::from_be_bytes(from) != start
                    || count as usize != pending.len()
                    || pending.is_empty()
                {
                    break 'batches;
                }
                let records = pending
                    .drain(..)
                    .zip(entries.chunks_exact(BATCH_ENTRY_LEN))
                    .map(|((device, seq, body, envelope), e)| LoggedRecord {
                        device,
                        seq,
                        body,
                        envelope,
                        fields: decode_entry(e),
                    })
                    .collect();
                at += total;
                valid = base + at as u64;
                batches.push(LoggedBatch {
                    start,
                    end: valid,
                    records,
                });
                continue 'batches;
            } else {
                break 'batches;
            }
        }
    }
    (batches, valid)
}

/// One trailer entry (exactly [`BATCH_ENTRY_LEN`] bytes).
fn decode_entry(e: &[u8]) -> LoggedFields {
    let mut ids = [[0u8; 16]; 3];
    for (i, id) in ids.iter_mut().enumerate() {
        if let Some(b) = e.get(i * 16..i * 16 + 16) {
            id.copy_from_slice(b);
        }
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        if let Some(src) = e.get(at..at + 8) {
            b.copy_from_slice(src);
        }
        u64::from_be_bytes(b)
    };
    LoggedFields {
        sender: DeviceId(ids[0]),
        message_id: MessageId(ids[1]),
        conversation: ConversationId(ids[2]),
        sender_seq: word(48),
        expires_at_ms: word(56),
    }
}

impl Segments {
    /// Open the segment directory `dir` (creating it), given the durably
    /// committed `segments` rows: remove segment files no row mentions that
    /// cannot be part of the log (a dead segment whose deletion a crash
    /// interrupted), check each remaining file's header, and cut every
    /// sealed segment back to its committed end (bytes past it were never
    /// acknowledged). The active segment and the files after it (rolls whose
    /// commit was not durable) are returned as the [`LogTail`] to replay:
    /// the store commits their whole batches again and then calls
    /// [`Segments::cut_log`].
    /// A file's header may name any of `formats` (segments written before
    /// an in-place format upgrade keep the version they were written with).
    pub(crate) fn open(
        dir: PathBuf,
        max_bytes: u64,
        formats: &[u32],
        rows: &BTreeMap<u32, SegmentInfo>,
    ) -> Result<(Segments, Vec<LogTail>), StoreError> {
        std::fs::create_dir_all(&dir).map_err(|e| io("creating the segment directory", e))?;
        let last_row = rows.last_key_value().map(|(&id, _)| id);
        let entries = std::fs::read_dir(&dir).map_err(|e| io("listing segments", e))?;
        let mut unlisted = std::collections::BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| io("listing segments", e))?;
            if let Some(id) = segment_id(&entry.file_name())
                && !rows.contains_key(&id)
            {
                if last_row.is_none_or(|last| id > last) {
                    unlisted.insert(id);
                } else {
                    std::fs::remove_file(entry.path())
                        .map_err(|e| io("removing an unreferenced segment", e))?;
                }
            }
        }
        let mut handles = HashMap::new();
        let mut tail = Vec::new();
        for (&id, info) in rows {
            let file = open_checked(&dir, id, formats)?;
            let len = file
                .metadata()
                .map_err(|e| io(&format!("reading segment {id}"), e))?
                .len();
            if len < info.end || info.end < SEGMENT_HEADER_LEN {
                return Err(corrupt(&format!(
                    "segment {id} ({len} bytes, committed end {})",
                    info.end
                )));
            }
            if Some(id) == last_row {
                // Only the active segment stays open; readers open the
                // others on demand (a relay may hold more segments than it
                // may open files).
                handles.insert(id, Arc::new(file));
                tail.push(LogTail {
                    id,
                    from: info.end,
                    unlisted: false,
                });
            } else if len > info.end {
                file.set_len(info.end)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io(&format!("truncating segment {id}"), e))?;
            }
        }
        // The rolls after the last row, as long as their ids follow on; a
        // file past a gap cannot hold anything that was acknowledged (a
        // segment is created only after the one before it).
        // A roll's file whose header is not all there was cut short by the
        // crash before any batch in it was synced (a batch's sync covers the
        // header written before it), so it holds nothing acknowledged: it
        // ends the log like a gap.
        let mut next = last_row.map_or(Some(1), |l| l.checked_add(1));
        for id in unlisted {
            let opened = if Some(id) == next {
                open_checked(&dir, id, formats).ok()
            } else {
                None
            };
            match opened {
                Some(file) => {
                    handles.insert(id, Arc::new(file));
                    tail.push(LogTail {
                        id,
                        from: SEGMENT_HEADER_LEN,
                        unlisted: true,
                    });
                    next = id.checked_add(1);
                }
                None => {
                    tracing::warn!(
                        segment = id,
                        "removing a segment file without a row that cannot hold a whole batch"
                    );
                    std::fs::remove_file(segment_path(&dir, id))
                        .map_err(|e| io("removing an unreferenced segment", e))?;
                    next = None;
                }
            }
        }
        let active = match rows.last_key_value() {
            Some((&id, info)) => {
                let file = handles
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| corrupt("segment table"))?;
                // What lies past the end is unknown until the replay cuts
                // it off: zero again from the end.
                Some(Active {
                    id,
                    file,
                    end: info.end,
                    zeroed: info.end,
                })
            }
            None => None,
        };
        Ok((
            Segments {
                dir,
                max_bytes: max_bytes.max(SEGMENT_HEADER_LEN + 1),
                handles: RwLock::new(handles),
                active: Mutex::new(active),
                commit_lock: Mutex::new(()),
                pending: Mutex::new(Vec::new()),
                spare: Mutex::new(Vec::new()),
                poisoned: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            },
            tail,
        ))
    }

    /// The whole batches in `tail`'s segment past its durable end, and
    /// where the last of them ends.
    pub(crate) fn read_log(&self, tail: &LogTail) -> Result<(Vec<LoggedBatch>, u64), StoreError> {
        let file = self.handle(tail.id).map_err(StoreError::from)?;
        let len = file
            .metadata()
            .map_err(|e| io(&format!("reading segment {}", tail.id), e))?
            .len();
        let size = usize::try_from(len.saturating_sub(tail.from))
            .map_err(|_| corrupt(&format!("segment {} (length)", tail.id)))?;
        let mut bytes = vec![0u8; size];
        read_exact_at(&file, &mut bytes, tail.from)
            .map_err(|e| io(&format!("reading segment {}", tail.id), e))?;
        Ok(parse_log(tail.id, tail.from, &bytes))
    }

    /// Start replaying a batch of segment `id` whose records (inbox, seq,
    /// where) are on disk already:
    /// the next batch of the log past the index's end, found at open or
    /// appended while a checkpoint held the index, from `start` to `end`.
    /// `rolled_from` is the
    /// segment before it when the batch is the first of an unlisted one.
    pub(crate) fn begin_replay(
        &self,
        id: u32,
        records: std::collections::VecDeque<(DeviceId, u64, BodyRef)>,
        (start, end): (u64, u64),
        rolled_from: Option<u32>,
    ) -> Result<Append, StoreError> {
        let file = self.handle(id).map_err(StoreError::from)?;
        Ok(Append {
            id,
            file,
            start,
            buf: Vec::new(),
            rolled_from,
            entries: Vec::new(),
            record_bytes: 0,
            replay: Some(records),
            replay_end: end,
            poisoned: Arc::clone(&self.poisoned),
            zeroed: end,
            zero_limit: end,
        })
    }

    /// Refuse every later commit until a restart: a batch that was
    /// acknowledged from the log could not be committed to the index, and
    /// only the replay at the next open can put it back in order.
    pub(crate) fn poison(&self) {
        mark_failed(
            &self.poisoned,
            "an acknowledged batch could not be committed to the index",
        );
    }

    /// Whether commits are refused until a restart (see
    /// [`Segments::poison`] and `Append::poison`).
    pub(crate) fn failed(&self) -> bool {
        self.poisoned.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The replay is over: cut `id` back to `end` (what lies past it is not
    /// a whole batch), or remove it if it is an unlisted segment that held
    /// none.
    pub(crate) fn cut_log(&self, id: u32, end: u64, remove: bool) -> Result<(), StoreError> {
        if remove {
            self.handles
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            return std::fs::remove_file(segment_path(&self.dir, id))
                .map_err(|e| io("removing an empty segment", e));
        }
        let file = self.handle(id).map_err(StoreError::from)?;
        let len = file
            .metadata()
            .map_err(|e| io(&format!("reading segment {id}"), e))?
            .len();
        if len > end {
            file.set_len(end)
                .and_then(|()| file.sync_data())
                .map_err(|e| io(&format!("truncating segment {id}"), e))?;
        }
        Ok(())
    }

    /// Serialise commits (see `commit_lock`); hold the guard until after
    /// [`Segments::finish_append`].
    pub(crate) fn lock_commits(&self) -> std::sync::MutexGuard<'_, ()> {
        self.commit_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The directory holding the segment files.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Start the append of a batch whose records take at most `upper`
    /// bytes. Only the commit calls this, holding [`Segments::lock_commits`].
    /// Starts a new segment when the active one is full (or none exists); the
    /// new file has its header and directory entry synced, but no `segments`
    /// row until the commit adds it.
    pub(crate) fn begin_append(&self, upper: u64, format: u32) -> Result<Append, StoreError> {
        if self.poisoned.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Backend(
                "envelope segments are in an unknown state after a failed write or sync; \
                 restart the relay to recover them from the log"
                    .into(),
            ));
        }
        let active = self
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut buf =
            std::mem::take(&mut *self.spare.lock().unwrap_or_else(PoisonError::into_inner));
        buf.clear();
        buf.reserve(usize::try_from(upper).unwrap_or(0));
        match active {
            Some(a)
                if a.end <= SEGMENT_HEADER_LEN || a.end.saturating_add(upper) <= self.max_bytes =>
            {
                Ok(Append {
                    id: a.id,
                    file: a.file,
                    start: a.end,
                    buf,
                    rolled_from: None,
                    entries: Vec::new(),
                    record_bytes: 0,
                    replay: None,
                    replay_end: 0,
                    poisoned: Arc::clone(&self.poisoned),
                    zeroed: a.zeroed.max(a.end),
                    zero_limit: self.max_bytes,
                })
            }
            other => {
                if let Some(a) = other.as_ref().filter(|a| a.zeroed > a.end) {
                    // The sealed segment keeps no zeros past its end (a
                    // crash before this lands is cut back at open).
                    let _ = a.file.set_len(a.end);
                }
                let previous = other.map(|a| a.id);
                let id = match previous {
                    Some(p) => p
                        .checked_add(1)
                        .ok_or_else(|| StoreError::Backend("segment ids exhausted".into()))?,
                    None => 1,
                };
                let file = self.create(id, format)?;
                Ok(Append {
                    id,
                    file,
                    start: SEGMENT_HEADER_LEN,
                    buf,
                    rolled_from: previous,
                    entries: Vec::new(),
                    record_bytes: 0,
                    replay: None,
                    replay_end: 0,
                    poisoned: Arc::clone(&self.poisoned),
                    zeroed: SEGMENT_HEADER_LEN,
                    zero_limit: self.max_bytes,
                })
            }
        }
    }

    /// The batch's transaction committed: its segment is the active one now,
    /// committed up to the batch's end. The caller holds the lock that
    /// serialises commits from [`Segments::begin_append`] to here.
    pub(crate) fn finish_append(&self, append: Append) {
        let end = append.end();
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        // A replayed batch may lie behind batches already appended past it
        // (those acknowledged while a checkpoint held the index): the end
        // never moves back.
        let behind = append.replay.is_some()
            && active
                .as_ref()
                .is_some_and(|a| (a.id, a.end) >= (append.id, end));
        if !behind {
            // A replayed batch says nothing of what lies past it.
            let zeroed = if append.replay.is_some() {
                end
            } else {
                append.zeroed.max(end)
            };
            *active = Some(Active {
                id: append.id,
                file: append.file,
                end,
                zeroed,
            });
        }
        drop(active);
        // Keep the buffer unless one huge batch made it unusually large (a
        // replay has none: it must not replace the appends' buffer).
        if append.replay.is_none() && append.buf.capacity() <= SPARE_MAX {
            *self.spare.lock().unwrap_or_else(PoisonError::into_inner) = append.buf;
        }
    }

    /// Create (or recreate, after a roll whose commit failed) segment `id`
    /// with its header, and make its directory entry durable.
    fn create(&self, id: u32, format: u32) -> Result<Arc<File>, StoreError> {
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io(&format!("creating segment {id}"), e))?;
        write_all_at(&file, &segment_header(id, format), 0)
            .map_err(|e| io(&format!("creating segment {id}"), e))?;
        sync_dir(&self.dir)?;
        let file = Arc::new(file);
        // Readers find the handle as soon as the commit's rows are visible
        // (a commit that fails leaves a handle no row refers to).
        self.handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&file));
        Ok(file)
    }

    /// Read and check the record `body` of `(device, seq)`.
    pub(crate) fn read(
        &self,
        body: &BodyRef,
        device: &DeviceId,
        seq: u64,
    ) -> Result<Bytes, ReadError> {
        let mut out = self.read_many(device, &[(seq, *body)])?;
        out.pop()
            .ok_or_else(|| ReadError::Store(corrupt("envelope record")))
    }

    /// Read and check the records of `device`'s envelopes `items` (seq and
    /// where its record is), in order. Records that lie close together in
    /// one segment (an inbox's envelopes are appended in seq order, mixed
    /// with other inboxes') are fetched with one positional read, so a page
    /// costs a few system calls rather than one per envelope. Each envelope
    /// is a slice of its run's buffer: nothing is copied after the read.
    pub(crate) fn read_many(
        &self,
        device: &DeviceId,
        items: &[(u64, BodyRef)],
    ) -> Result<Vec<Bytes>, ReadError> {
        let mut out = Vec::with_capacity(items.len());
        let mut i = 0;
        while let Some(&(_, first)) = items.get(i) {
            // Extend the run while the next record follows closely.
            let mut j = i + 1;
            let mut end = first.record_end();
            while let Some(&(_, next)) = items.get(j) {
                let close = next.segment == first.segment
                    && next.offset >= end
                    && next.offset - end <= MAX_READ_GAP
                    && next.record_end() - first.offset <= MAX_READ_SPAN;
                if !close {
                    break;
                }
                end = next.record_end();
                j += 1;
            }
            let file = self.handle(first.segment)?;
            let len = usize::try_from(end - first.offset)
                .map_err(|_| corrupt("inbox row (record length)"))?;
            let mut span = vec![0; len];
            read_exact_at(&file, &mut span, first.offset).map_err(|e| {
                if e.kind() == ErrorKind::UnexpectedEof {
                    corrupt("envelope record past the end of its segment")
                } else {
                    io("reading envelopes", e)
                }
            })?;
            let span = Bytes::from(span);
            for &(seq, body) in items.get(i..j).unwrap_or_default() {
                let at = usize::try_from(body.offset - first.offset)
                    .map_err(|_| corrupt("inbox row (offset)"))?;
                let rec_len = usize::try_from(body.record_len())
                    .map_err(|_| corrupt("inbox row (record length)"))?;
                let end = at.saturating_add(rec_len);
                let record = span
                    .get(at..end)
                    .ok_or_else(|| corrupt("envelope record"))?;
                check_record(record, device, seq, body.len)?;
                out.push(span.slice(at + RECORD_HEADER_LEN..end));
            }
            i = j;
        }
        Ok(out)
    }

    /// The open handle of segment `id`.
    fn handle(&self, id: u32) -> Result<Arc<File>, ReadError> {
        if let Some(f) = self
            .handles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            return Ok(Arc::clone(f));
        }
        // Opened under the write lock, so a concurrent `delete` (which takes
        // it too) cannot leave a handle of a deleted file in the cache.
        let mut handles = self.handles.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = handles.get(&id) {
            return Ok(Arc::clone(f));
        }
        let file = match File::open(segment_path(&self.dir, id)) {
            Ok(f) => Arc::new(f),
            // Its last rows were removed after the reader's snapshot.
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(ReadError::Gone(id)),
            Err(e) => return Err(ReadError::Store(io(&format!("opening segment {id}"), e))),
        };
        if handles.len() >= MAX_OPEN_SEGMENTS {
            // Close one that nobody is reading, never the newest (the
            // active segment, appended to by the commit).
            let newest = handles.keys().max().copied();
            let idle = handles
                .iter()
                .find(|(k, f)| Some(**k) != newest && Arc::strong_count(f) == 1)
                .map(|(k, _)| *k);
            if let Some(k) = idle {
                handles.remove(&k);
            }
        }
        handles.insert(id, Arc::clone(&file));
        Ok(file)
    }

    /// Read the records of segment `id` from `from` (a record boundary) up
    /// to about `budget` bytes (at least one record), not past the
    /// committed `end`, checking each one and stepping over batch trailers. Returns them and the offset of
    /// the next record.
    pub(crate) fn scan(
        &self,
        id: u32,
        from: u64,
        end: u64,
        budget: u64,
    ) -> Result<(Vec<ScannedRecord>, u64), StoreError> {
        let file = self.handle(id).map_err(StoreError::from)?;
        let mut out = Vec::new();
        let mut at = from;
        let stop = from.saturating_add(budget.max(1)).min(end);
        while at < stop {
            let mut head = [0u8; RECORD_HEADER_LEN];
            if at.saturating_add(RECORD_HEADER_LEN as u64) > end {
                return Err(corrupt(&format!("segment {id} (record at {at})")));
            }
            read_exact_at(&file, &mut head, at).map_err(|e| io("reading a segment", e))?;
            if head[..4] == BATCH_MAGIC {
                // A batch trailer: nothing an index row points at.
                let count = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                let next = at.saturating_add(trailer_len(count));
                if next > end {
                    return Err(corrupt(&format!("segment {id} (trailer at {at})")));
                }
                at = next;
                continue;
            }
            let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let mut device = [0u8; 16];
            device.copy_from_slice(&head[8..24]);
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&head[24..32]);
            let (device, seq) = (DeviceId(device), u64::from_be_bytes(seq));
            let body = BodyRef {
                segment: id,
                offset: at,
                len,
            };
            if head[..4] != RECORD_MAGIC || body.record_end() > end {
                return Err(corrupt(&format!("segment {id} (record at {at})")));
            }
            let mut record = vec![0u8; RECORD_HEADER_LEN + len as usize];
            read_exact_at(&file, &mut record, at).map_err(|e| io("reading a segment", e))?;
            let envelope = decode_record(&record, &device, seq, len)?;
            out.push(ScannedRecord {
                device,
                seq,
                body,
                envelope,
            });
            at = body.record_end();
        }
        Ok((out, at))
    }

    /// The length of segment `id`'s file on disk (for consistency checks).
    pub(crate) fn file_len(&self, id: u32) -> Result<u64, StoreError> {
        std::fs::metadata(segment_path(&self.dir, id))
            .map(|m| m.len())
            .map_err(|e| io(&format!("segment {id}"), e))
    }

    /// Take the segments waiting for a durable commit. Called inside a write
    /// transaction: every id in the list was freed by a transaction that
    /// committed before this one began, so this one's durable commit makes
    /// that freeing durable too.
    pub(crate) fn take_pending(&self) -> Vec<u32> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Put segments back in the waiting list (their transaction was not
    /// durable, or the one that took them failed).
    pub(crate) fn defer(&self, ids: Vec<u32>) {
        if !ids.is_empty() {
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(ids);
        }
    }

    /// Delete segment files whose rows are durably gone. A failure only
    /// leaves a file that the next open removes.
    pub(crate) fn delete(&self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        let mut handles = self.handles.write().unwrap_or_else(PoisonError::into_inner);
        for &id in ids {
            handles.remove(&id);
            match std::fs::remove_file(segment_path(&self.dir, id)) {
                Ok(()) => tracing::debug!(segment = id, "deleted a dead envelope segment"),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(segment = id, "could not delete a dead segment: {e}"),
            }
        }
    }
}

/// Open segment `id` in `dir` for reading and writing and check that its
/// header names it and one of `formats`.
fn open_checked(dir: &Path, id: u32, formats: &[u32]) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_path(dir, id))
        .map_err(|e| io(&format!("opening segment {id}"), e))?;
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    read_exact_at(&file, &mut header, 0).map_err(|_| corrupt(&format!("segment {id} header")))?;
    if !formats.iter().any(|&f| header == segment_header(id, f)) {
        return Err(corrupt(&format!("segment {id} header")));
    }
    Ok(file)
}

/// Make the directory's entries (a new segment file) durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the segment directory", e))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

/// Write zeros over `from..to` (nothing if `to <= from`).
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).map_or(ZEROS.len(), |n| n.min(ZEROS.len()));
        write_all_at(file, &ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(windows)]
fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, offset)? {
            0 => return Err(ErrorKind::WriteZero.into()),
            n => {
                buf = &buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_check_everything() {
        let d = DeviceId([7; 16]);
        let mut buf = Vec::new();
        assert_eq!(encode_record(&mut buf, &d, 9, b"ciphertext").unwrap(), 10);
        assert_eq!(buf.len(), RECORD_HEADER_LEN + 10);
        // §2.13 layout.
        assert_eq!(&buf[..4], b"HENV");
        assert_eq!(&buf[4..8], &10u32.to_be_bytes());
        assert_eq!(&buf[8..24], &[7; 16]);
        assert_eq!(&buf[24..32], &9u64.to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[..32]);
        crc.update(b"ciphertext");
        assert_eq!(&buf[32..36], &crc.finalize().to_be_bytes());
        assert_eq!(decode_record(&buf, &d, 9, 10).unwrap(), b"ciphertext");
        // Wrong device, seq or length, a flipped bit anywhere, a short read.
        assert!(decode_record(&buf, &DeviceId([8; 16]), 9, 10).is_err());
        assert!(decode_record(&buf, &d, 10, 10).is_err());
        assert!(decode_record(&buf, &d, 9, 11).is_err());
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            assert!(decode_record(&b, &d, 9, 10).is_err(), "flip at {i}");
        }
        assert!(decode_record(&buf[..20], &d, 9, 10).is_err());
    }

    #[test]
    fn segment_names_parse() {
        assert_eq!(segment_id(std::ffi::OsStr::new("000012.seg")), Some(12));
        assert_eq!(segment_id(std::ffi::OsStr::new("12.seg.tmp")), None);
        assert_eq!(segment_id(std::ffi::OsStr::new("x.seg")), None);
        assert_eq!(segment_id(std::ffi::OsStr::new(".seg")), None);
        let p = segment_path(Path::new("d"), 3);
        assert_eq!(segment_id(p.file_name().unwrap()), Some(3));
    }

    fn fields(n: u8) -> LoggedFields {
        LoggedFields {
            sender: DeviceId([n; 16]),
            message_id: MessageId([n.wrapping_add(1); 16]),
            conversation: ConversationId([n.wrapping_add(2); 16]),
            sender_seq: u64::from(n) << 40 | 7,
            expires_at_ms: u64::from(n) << 20 | 9,
        }
    }

    /// A batch of `seqs` for device 7 at `start`, each with an envelope of
    /// `len` bytes, closed with its trailer.
    fn batch(start: u64, seqs: &[u64], len: usize) -> Vec<u8> {
        let d = DeviceId([7; 16]);
        let mut buf = Vec::new();
        let mut entries = Vec::new();
        for &seq in seqs {
            encode_record(&mut buf, &d, seq, &vec![seq as u8; len]).unwrap();
            entries.push(fields(seq as u8));
        }
        encode_trailer(&mut buf, start, &entries);
        buf
    }

    #[test]
    fn the_log_parses_whole_batches_and_stops_at_anything_else() {
        let base = SEGMENT_HEADER_LEN;
        let first = batch(base, &[1, 2], 30);
        let second_at = base + first.len() as u64;
        // A batch whose commit failed, then overwritten by a shorter one at
        // the same place: the leftover's trailer names the same start, not
        // where the leftover begins.
        let long = batch(second_at, &[3, 4, 5], 30);
        let short = batch(second_at, &[3], 30);
        let mut log = first.clone();
        log.extend_from_slice(&long);
        log[first.len()..first.len() + short.len()].copy_from_slice(&short);
        let (batches, end) = parse_log(4, base, &log);
        assert_eq!(batches.len(), 2);
        assert_eq!(end, second_at + short.len() as u64);
        assert_eq!(batches[0].start, base);
        assert_eq!(batches[1].start, second_at);
        let seqs: Vec<u64> = batches[0].records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        let r = &batches[1].records[0];
        assert_eq!((r.seq, r.envelope.clone()), (3, vec![3u8; 30]));
        assert_eq!(r.fields, fields(3));
        assert_eq!(
            r.body,
            BodyRef {
                segment: 4,
                offset: second_at,
                len: 30
            }
        );
        // A flipped bit anywhere in the second batch ends the log after the
        // first; anywhere in the first, before it.
        let two = [first.clone(), short.clone()].concat();
        for i in 0..two.len() {
            let mut bad = two.clone();
            bad[i] ^= 0x04;
            let (batches, end) = parse_log(4, base, &bad);
            if i < first.len() {
                assert!(batches.is_empty(), "flip at {i}");
                assert_eq!(end, base);
            } else {
                assert_eq!(batches.len(), 1, "flip at {i}");
                assert_eq!(end, second_at);
            }
        }
        // Cut anywhere: only whole batches count.
        for cut in 0..two.len() {
            let (batches, _) = parse_log(4, base, &two[..cut]);
            let whole = usize::from(cut >= first.len()) + usize::from(cut == two.len());
            assert_eq!(batches.len(), whole, "cut at {cut}");
        }
        // A trailer that names another start, or counts other records.
        let moved = [first.clone(), batch(second_at + 1, &[3], 30)].concat();
        assert_eq!(parse_log(4, base, &moved).0.len(), 1);
        let mut miscounted = first.clone();
        let mut records = Vec::new();
        encode_record(&mut records, &DeviceId([7; 16]), 3, &[3u8; 30]).unwrap();
        miscounted.extend_from_slice(&records);
        encode_trailer(&mut miscounted, second_at, &[fields(3), fields(4)]);
        assert_eq!(parse_log(4, base, &miscounted).0.len(), 1);
        // Records without a trailer (a compaction copy whose commit failed)
        // are not a batch either.
        assert_eq!(parse_log(4, base, &records).0.len(), 0);
    }

    #[test]
    fn an_abandoned_batch_is_cut_off_and_a_poisoned_log_refuses_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (segs, tail) =
            Segments::open(dir.path().join("e"), 1 << 20, &[6], &BTreeMap::new()).unwrap();
        assert!(tail.is_empty());
        let mut append = segs.begin_append(1000, 6).unwrap();
        let body = append
            .push_logged(&DeviceId([7; 16]), 1, b"ciphertext", fields(1))
            .unwrap();
        append.seal_batch();
        append.write_and_sync().unwrap();
        let path = segment_path(segs.dir(), append.id);
        let len = || std::fs::metadata(&path).unwrap().len();
        // A small batch: the file is zero-filled ahead of it, to the step
        // after the next.
        assert_eq!(len(), 2 * ZERO_AHEAD);
        let bytes = std::fs::read(&path).unwrap();
        let end = usize::try_from(append.end()).unwrap();
        assert!(bytes[end..].iter().all(|&b| b == 0));
        assert_eq!(append.record_bytes(), body.record_len());
        assert_eq!(
            append.end(),
            SEGMENT_HEADER_LEN + body.record_len() + trailer_len(1)
        );
        // Its index commit failed: the batch is cut off, so a replay after
        // a crash cannot find it.
        append.abandon();
        assert_eq!(len(), SEGMENT_HEADER_LEN);
        let (batches, end) = segs
            .read_log(&LogTail {
                id: append.id,
                from: SEGMENT_HEADER_LEN,
                unlisted: true,
            })
            .unwrap();
        assert!(batches.is_empty());
        assert_eq!(end, SEGMENT_HEADER_LEN);
        // A log in an unknown state refuses every further batch, and says
        // so (what `/healthz` reports).
        assert!(!segs.failed());
        append.poison();
        assert!(segs.failed());
        let refused = segs.begin_append(10, 6).unwrap_err();
        assert!(refused.to_string().contains("restart"), "{refused}");
    }

    /// Small batches write into the zeros ahead of the end and move them
    /// on a step at a time; a large batch extends the file by itself; a
    /// roll leaves the sealed segment without zeros; and the log parses
    /// the batches and stops at the zeros.
    #[test]
    fn small_batches_write_into_zeros_kept_ahead_of_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (segs, _) =
            Segments::open(dir.path().join("z"), 8 << 20, &[6], &BTreeMap::new()).unwrap();
        let d = DeviceId([7; 16]);
        let seq = std::cell::Cell::new(0u64);
        let batch = |size: usize| {
            let mut append = segs.begin_append(size as u64 + 200, 6).unwrap();
            seq.set(seq.get() + 1);
            let n = seq.get();
            append
                .push_logged(&d, n, &vec![9u8; size], fields(n as u8))
                .unwrap();
            append.seal_batch();
            append.write_and_sync().unwrap();
            let (id, end) = (append.id, append.end());
            segs.finish_append(append);
            (id, end)
        };
        let len = |id: u32| {
            std::fs::metadata(segment_path(segs.dir(), id))
                .unwrap()
                .len()
        };
        // Zeros from the end of the batch to the step after the next.
        let (id, first) = batch(16_000);
        assert_eq!(len(id), 2 * ZERO_AHEAD);
        // Small batches inside the zeroed space leave the length alone.
        // A batch of 16,000 bytes takes 16,120 (record header and trailer).
        let mut end = first;
        while end + 16_120 <= 2 * ZERO_AHEAD {
            end = batch(16_000).1;
            assert_eq!(len(id), 2 * ZERO_AHEAD);
        }
        // Past it, the next steps are zeroed.
        end = batch(16_000).1;
        assert!(end > 2 * ZERO_AHEAD);
        assert_eq!(len(id), end.div_ceil(ZERO_AHEAD) * ZERO_AHEAD + ZERO_AHEAD);
        // A large batch past the zeros writes no zeros after itself.
        let before = len(id);
        let big = usize::try_from(before - end).unwrap() + ZERO_AHEAD_BATCH;
        let (same, big_end) = batch(big);
        assert_eq!(same, id);
        assert_eq!(len(id), big_end);
        // The log: every batch, then the zeros end it.
        let (batches, parsed_end) = segs
            .read_log(&LogTail {
                id,
                from: SEGMENT_HEADER_LEN,
                unlisted: false,
            })
            .unwrap();
        assert_eq!(batches.len() as u64, seq.get());
        assert_eq!(parsed_end, big_end);
        // A batch that rolls cuts the sealed segment back to its end.
        let small_end = batch(16_000).1;
        assert!(len(id) > small_end);
        let (next, _) = batch(8 << 20);
        assert_eq!(next, id + 1);
        assert_eq!(len(id), small_end);
    }
}
