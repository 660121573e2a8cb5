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
//! Rules that keep this crash-safe (`docs/STORAGE.md` §5):
//!
//! - bytes are written and `fdatasync`ed **before** the redb commit that
//!   points at them, so a committed index row never points at lost bytes;
//! - the committed length of every segment is kept in redb (`segments` table),
//!   so bytes past it (a batch whose commit never happened) are cut off when
//!   the store opens, and nothing ever reads them;
//! - a segment file is deleted only after a **durable** commit removed its
//!   last index row, so a crash can never bring back rows whose file is gone.
//!
//! Every record carries its device, seq, length and a CRC-32, so a damaged or
//! misplaced record is reported as a [`StoreError`], never read as something
//! else and never a panic.

use super::StoreError;
use super::tables::{SegmentInfo, corrupt};
use hush_protocol::DeviceId;
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
    /// Changed only by the commit (under `commit_lock`).
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
    Ok(body.to_vec())
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
}

impl Append {
    /// Add an envelope's record; returns where it will be.
    pub(crate) fn push(
        &mut self,
        device: &DeviceId,
        seq: u64,
        envelope: &[u8],
    ) -> Result<BodyRef, StoreError> {
        let offset = self.end();
        let len = encode_record(&mut self.buf, device, seq, envelope)?;
        Ok(BodyRef {
            segment: self.id,
            offset,
            len,
        })
    }

    /// The segment's length once this batch is written.
    pub(crate) fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Bytes of the batch's records.
    pub(crate) fn bytes(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Write the batch at the segment's committed end and make it (and the
    /// file's new length) durable.
    pub(crate) fn write_and_sync(&self) -> Result<(), StoreError> {
        write_all_at(&self.file, &self.buf, self.start)
            .map_err(|e| io("writing envelope segment", e))?;
        self.file
            .sync_data()
            .map_err(|e| io("syncing envelope segment", e))
    }
}

impl Segments {
    /// Open the segment directory `dir` (creating it), given the committed
    /// `segments` rows: remove segment files no row mentions (a roll that
    /// never committed, or a dead segment whose deletion a crash interrupted),
    /// check each remaining file's header, and cut every file back to its
    /// committed end (bytes past it were never acknowledged).
    /// A file's header may name any of `formats` (segments written before
    /// an in-place format upgrade keep the version they were written with).
    pub(crate) fn open(
        dir: PathBuf,
        max_bytes: u64,
        formats: &[u32],
        rows: &BTreeMap<u32, SegmentInfo>,
    ) -> Result<Segments, StoreError> {
        std::fs::create_dir_all(&dir).map_err(|e| io("creating the segment directory", e))?;
        let entries = std::fs::read_dir(&dir).map_err(|e| io("listing segments", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io("listing segments", e))?;
            if let Some(id) = segment_id(&entry.file_name())
                && !rows.contains_key(&id)
            {
                std::fs::remove_file(entry.path())
                    .map_err(|e| io("removing an unreferenced segment", e))?;
            }
        }
        let mut handles = HashMap::new();
        for (&id, info) in rows {
            let path = segment_path(&dir, id);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io(&format!("opening segment {id}"), e))?;
            let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
            read_exact_at(&file, &mut header, 0)
                .map_err(|_| corrupt(&format!("segment {id} header")))?;
            if !formats.iter().any(|&f| header == segment_header(id, f)) {
                return Err(corrupt(&format!("segment {id} header")));
            }
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
            if len > info.end {
                file.set_len(info.end)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io(&format!("truncating segment {id}"), e))?;
            }
            // Only the active segment stays open; readers open the others
            // on demand (a relay may hold more segments than it may open
            // files).
            if rows.last_key_value().map(|(&last, _)| last) == Some(id) {
                handles.insert(id, Arc::new(file));
            }
        }
        let active = match rows.last_key_value() {
            Some((&id, info)) => {
                let file = handles
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| corrupt("segment table"))?;
                Some(Active {
                    id,
                    file,
                    end: info.end,
                })
            }
            None => None,
        };
        Ok(Segments {
            dir,
            max_bytes: max_bytes.max(SEGMENT_HEADER_LEN + 1),
            handles: RwLock::new(handles),
            active: Mutex::new(active),
            commit_lock: Mutex::new(()),
            pending: Mutex::new(Vec::new()),
            spare: Mutex::new(Vec::new()),
        })
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
                })
            }
            other => {
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
                })
            }
        }
    }

    /// The batch's transaction committed: its segment is the active one now,
    /// committed up to the batch's end. The caller holds the lock that
    /// serialises commits from [`Segments::begin_append`] to here.
    pub(crate) fn finish_append(&self, append: Append) {
        let end = append.end();
        *self.active.lock().unwrap_or_else(PoisonError::into_inner) = Some(Active {
            id: append.id,
            file: append.file,
            end,
        });
        // Keep the buffer unless one huge batch made it unusually large.
        if append.buf.capacity() <= SPARE_MAX {
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
    ) -> Result<Vec<u8>, ReadError> {
        let mut out = self.read_many(device, &[(seq, *body)])?;
        out.pop()
            .ok_or_else(|| ReadError::Store(corrupt("envelope record")))
    }

    /// Read and check the records of `device`'s envelopes `items` (seq and
    /// where its record is), in order. Records that lie close together in
    /// one segment (an inbox's envelopes are appended in seq order, mixed
    /// with other inboxes') are fetched with one positional read, so a page
    /// costs a few system calls rather than one per envelope.
    pub(crate) fn read_many(
        &self,
        device: &DeviceId,
        items: &[(u64, BodyRef)],
    ) -> Result<Vec<Vec<u8>>, ReadError> {
        let mut out = Vec::with_capacity(items.len());
        let mut span = Vec::new();
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
            span.clear();
            span.resize(len, 0);
            read_exact_at(&file, &mut span, first.offset).map_err(|e| {
                if e.kind() == ErrorKind::UnexpectedEof {
                    corrupt("envelope record past the end of its segment")
                } else {
                    io("reading envelopes", e)
                }
            })?;
            for &(seq, body) in items.get(i..j).unwrap_or_default() {
                let at = usize::try_from(body.offset - first.offset)
                    .map_err(|_| corrupt("inbox row (offset)"))?;
                let rec_len = usize::try_from(body.record_len())
                    .map_err(|_| corrupt("inbox row (record length)"))?;
                let record = span
                    .get(at..at.saturating_add(rec_len))
                    .ok_or_else(|| corrupt("envelope record"))?;
                out.push(decode_record(record, device, seq, body.len)?);
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
    /// committed `end`, checking each one. Returns them and the offset of
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
}
