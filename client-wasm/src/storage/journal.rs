//! The native store's journal: a small batch is durable once it is appended
//! here and synced, before the redb file has it durably.
//!
//! A durable redb commit rewrites, at new places in the file, every B-tree
//! page the batch touched plus their parents and redb's own allocator
//! state, then syncs: 5–10 scattered 4 KiB pages for the one-message batch
//! of a send or a receipt, and on the reference disk such a sync costs
//! 0.30–0.38 ms against 0.14 ms for one record appended into zeroed space
//! (docs/CLIENT.md, "Storage"). So [`super::file::FileStorage`] appends each
//! small batch to this file (one record, already sealed) and syncs it,
//! then commits it to redb without a sync; every so many batches it makes
//! redb durable (a checkpoint) and empties the journal. Opening the store
//! replays the records redb does not have durably.
//!
//! # Format
//!
//! A sequence of records, all integers little-endian:
//!
//! ```text
//! magic    u32   0x314A5348 ("HSJ1")
//! body_len u32   bytes of `seq ‖ body` that follow the crc
//! crc      u32   CRC-32 (IEEE) of `seq ‖ body`
//! seq      u64   the batch's number: 1, 2, 3, … for the life of the store
//! body     count u32, then per write: tag u8 (1 put, 2 delete),
//!          key_len u32, key, and for a put: value_len u32, value
//! ```
//!
//! Values are the sealed bytes redb stores ([`super::seal`]); keys are the
//! same clear keys as in redb. A record is appended and synced before the
//! next one starts, so a crash can tear only the last record: reading stops
//! at the first record that is cut short or fails its checks, and the next
//! append is written over it. Reading also stops at a record whose seq is
//! not above the one before it: emptying the journal starts writing at the
//! beginning again without erasing what the last pass left (see
//! [`Journal::clear`]), and those records all have lower seqs than the new
//! ones. A seq that jumps ahead is read, and the store reports the gap.
//! So nothing after the last whole record needs erasing, at an open or
//! when the journal is emptied: what lies there is either torn or older.
//!
//! The file is kept longer than its records, zero-filled past them
//! ([`PREALLOC`] at a time): an append that does not change the file's
//! length needs no metadata written with its sync (on the reference host a
//! synced 3 KB write costs 0.14 ms inside the file against 0.20 ms at its
//! end). Zeros are no record (the magic is not zero), so reading stops
//! there. Emptying the journal zeroes only the first record's head.

use crate::error::StorageError;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};

const MAGIC: u32 = 0x314A_5348;
const HEAD_LEN: usize = 12;
const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
/// The file is extended by this much zero-filled space at a time.
pub(crate) const PREALLOC: u64 = 1 << 20;
/// A file grown past this by a run of large records is cut back to
/// [`PREALLOC`] when the journal is emptied.
const KEEP_AT_MOST: u64 = 8 << 20;
/// A record body larger than this is not one this store wrote (batches this
/// large are committed to redb directly); read as the end of the journal.
const MAX_BODY: usize = 64 << 20;

/// One write of a journal record: a key and its sealed value, or `None`
/// to delete it.
pub(crate) type Write = (Vec<u8>, Option<Vec<u8>>);

/// One batch read back from the journal.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) writes: Vec<Write>,
}

/// The journal file, open for appending.
pub(crate) struct Journal {
    file: Arc<File>,
    /// Bytes of whole records.
    len: u64,
    /// The file's length: zeros from `len` to here.
    allocated: u64,
    /// The thread that syncs appended records while the caller goes on
    /// (started with the first append; `None` if it could not be).
    syncer: Option<Syncer>,
    /// Tests: report the next sync as failed.
    #[cfg(test)]
    pub(crate) fail_next_sync: bool,
}

/// A thread that syncs the journal on request, so that the caller's own
/// work on a batch (its redb commit) overlaps the device's flush instead
/// of following it. On the reference host the sync of a one-message
/// record is 0.14–0.17 ms of waiting on the disk and the redb commit
/// 0.045 ms of CPU; a wake-up each way costs a few microseconds.
struct Syncer {
    /// One slot per sync wanted; dropped to stop the thread.
    start: Option<mpsc::SyncSender<Arc<SyncSlot>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    fn spawn(file: Arc<File>) -> std::io::Result<Syncer> {
        let (start, wanted) = mpsc::sync_channel::<Arc<SyncSlot>>(1);
        let thread = std::thread::Builder::new()
            .name("hush-journal-sync".into())
            .spawn(move || {
                while let Ok(slot) = wanted.recv() {
                    slot.finish(file.sync_data());
                }
            })?;
        Ok(Syncer {
            start: Some(start),
            thread: Some(thread),
        })
    }

    /// Ask the thread to sync and fill `slot`; false if the thread is gone.
    fn request(&self, slot: &Arc<SyncSlot>) -> bool {
        self.start
            .as_ref()
            .is_some_and(|s| s.send(Arc::clone(slot)).is_ok())
    }
}

/// The outcome of one sync, filled in by whoever ran it.
#[derive(Debug)]
struct SyncSlot {
    result: Mutex<SlotState>,
    filled: Condvar,
    /// Tests: report the sync as failed whatever it returned.
    #[cfg(test)]
    fail: bool,
}

/// A sync's result once it ended, and who to call then.
#[derive(Default)]
struct SlotState {
    result: Option<Result<(), String>>,
    then: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotState")
            .field("result", &self.result)
            .field("then", &self.then.len())
            .finish()
    }
}

impl SyncSlot {
    fn finish(&self, synced: std::io::Result<()>) {
        #[cfg(test)]
        let synced = if self.fail {
            Err(std::io::Error::other("injected sync failure"))
        } else {
            synced
        };
        let mut state = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        state.result = Some(synced.map_err(|e| e.to_string()));
        let then = std::mem::take(&mut state.then);
        drop(state);
        self.filled.notify_all();
        for call in then {
            call();
        }
    }
}

/// A record appended and handed to the sync: [`SyncWait::wait`] returns
/// once it is durable (or the sync failed). Clones wait for the same sync.
#[derive(Debug, Clone)]
pub(crate) struct SyncWait(Arc<SyncSlot>);

impl SyncWait {
    /// Block until the sync ended; its result.
    pub(crate) fn wait(&self) -> Result<(), StorageError> {
        let mut state = self.0.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(done) = state.result.as_ref() {
                return done.clone().map_err(syncing);
            }
            state = self
                .0
                .filled
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Tests: a sync that never ends.
    #[cfg(test)]
    pub(crate) fn pending_for_tests() -> SyncWait {
        SyncWait(Arc::new(SyncSlot {
            result: Mutex::new(SlotState::default()),
            filled: Condvar::new(),
            fail: false,
        }))
    }

    /// The sync ended, well or not (without waiting).
    pub(crate) fn ended(&self) -> bool {
        let state = self.0.result.lock().unwrap_or_else(PoisonError::into_inner);
        state.result.is_some()
    }

    /// Call `then` once the sync has ended (now, if it has): on the thread
    /// that ran it, so `then` must only hand the news on.
    pub(crate) fn when_ended(&self, then: Box<dyn FnOnce() + Send>) {
        let mut state = self.0.result.lock().unwrap_or_else(PoisonError::into_inner);
        if state.result.is_none() {
            state.then.push(then);
            return;
        }
        drop(state);
        then();
    }

    /// The sync ended and failed (without waiting).
    pub(crate) fn failed(&self) -> bool {
        let state = self.0.result.lock().unwrap_or_else(PoisonError::into_inner);
        matches!(state.result.as_ref(), Some(Err(_)))
    }
}

fn syncing(e: String) -> StorageError {
    StorageError::Backend(format!("journal: syncing: {e}"))
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.start = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn io(what: &str, e: std::io::Error) -> StorageError {
    StorageError::Backend(format!("journal: {what}: {e}"))
}

/// Where the journal of the store at `db` lives: beside it, named after it.
pub fn path_for(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push("-journal");
    PathBuf::from(name)
}

impl Journal {
    /// Open (or create) the journal at `path` and read the records it
    /// holds. The next append follows the last whole record, over whatever
    /// lies after it (a torn record, or older ones), which is never read.
    pub(crate) fn open(path: &Path) -> Result<(Journal, Vec<Entry>), StorageError> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| io("opening", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io("reading", e))?;
        let (entries, whole) = decode_all(&bytes);
        let journal = Journal {
            file: Arc::new(file),
            len: whole as u64,
            allocated: bytes.len() as u64,
            syncer: None,
            #[cfg(test)]
            fail_next_sync: false,
        };
        Ok((journal, entries))
    }

    /// Write zeros over `from..to`.
    fn zero(&self, from: u64, to: u64) -> std::io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut at = from;
        while at < to {
            let n = usize::try_from(to - at).map_or(ZEROS.len(), |n| n.min(ZEROS.len()));
            write_all_at(&self.file, &ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Bytes the journal holds.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Append batch `seq` and sync it: when this returns, the batch is
    /// durable.
    #[cfg(test)]
    pub(crate) fn append(
        &mut self,
        seq: u64,
        writes: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), StorageError> {
        self.append_started(seq, writes, || ()).0?.wait()
    }

    /// Append batch `seq` and start its sync, running `meanwhile` while the
    /// sync is under way; returns without waiting for the sync: the
    /// [`SyncWait`] says when the batch is durable. `meanwhile` runs only
    /// if the record was written: if the append fails before its sync, it
    /// is `None`. The record counts as appended from here on (the next one
    /// follows it); should its sync fail, the caller must use the file no
    /// more (see [`super::file::FileStorage`]'s poisoning).
    pub(crate) fn append_started<T>(
        &mut self,
        seq: u64,
        writes: &[(&[u8], Option<&[u8]>)],
        meanwhile: impl FnOnce() -> T,
    ) -> (Result<SyncWait, StorageError>, Option<T>) {
        let record = match encode(seq, writes) {
            Ok(r) => r,
            Err(e) => return (Err(e), None),
        };
        let end = self.len + record.len() as u64;
        // Past the zeroed space: zero some more in the same sync.
        let allocated = if end > self.allocated {
            end.div_ceil(PREALLOC).saturating_add(1) * PREALLOC
        } else {
            self.allocated
        };
        if let Err(e) = write_all_at(&self.file, &record, self.len)
            .and_then(|()| self.zero(end.max(self.allocated), allocated))
        {
            return (Err(io("appending", e)), None);
        }
        self.len = end;
        self.allocated = allocated;
        let slot = Arc::new(SyncSlot {
            result: Mutex::new(SlotState::default()),
            filled: Condvar::new(),
            #[cfg(test)]
            fail: std::mem::take(&mut self.fail_next_sync),
        });
        if self.syncer.is_none() {
            self.syncer = Syncer::spawn(Arc::clone(&self.file)).ok();
        }
        let requested = self.syncer.as_ref().is_some_and(|s| s.request(&slot));
        if !requested {
            // Without the thread, the sync runs here, after `meanwhile`.
            self.syncer = None;
        }
        let out = meanwhile();
        if !requested {
            slot.finish(self.file.sync_data());
        }
        (Ok(SyncWait(slot)), Some(out))
    }

    /// Empty the journal (everything in it is durable in redb now): the
    /// next record is written at the start again, over the old ones.
    ///
    /// Only the first record's head is zeroed, and not synced: the records
    /// left behind are already in redb durably, so a reader that still
    /// finds them replays nothing (the store skips every record at or
    /// below its durable position), and one that finds new records
    /// followed by old ones stops at the first whose seq does not rise
    /// ([`decode_all`]). Zeroing all of them, with a sync, cost a stall of
    /// several milliseconds at every checkpoint (up to 4 MiB written).
    pub(crate) fn clear(&mut self) -> Result<(), StorageError> {
        if self.allocated > KEEP_AT_MOST {
            self.file
                .set_len(0)
                .and_then(|()| self.file.set_len(PREALLOC))
                .and_then(|()| self.file.sync_data())
                .map_err(|e| io("emptying", e))?;
            self.allocated = PREALLOC;
        } else if self.len > 0 {
            self.zero(0, (HEAD_LEN as u64).min(self.allocated))
                .map_err(|e| io("emptying", e))?;
        }
        self.len = 0;
        Ok(())
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_write(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

fn too_large() -> StorageError {
    StorageError::Backend("journal: a write is too large for a record".into())
}

fn len_u32(n: usize) -> Result<[u8; 4], StorageError> {
    u32::try_from(n)
        .map(u32::to_le_bytes)
        .map_err(|_| too_large())
}

/// One record: head, `seq`, body.
pub(crate) fn encode(seq: u64, writes: &[(&[u8], Option<&[u8]>)]) -> Result<Vec<u8>, StorageError> {
    let body_len = 8
        + 4
        + writes
            .iter()
            .map(|(k, v)| 1 + 4 + k.len() + v.map_or(0, |v| 4 + v.len()))
            .sum::<usize>();
    if body_len > MAX_BODY {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(HEAD_LEN + body_len);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&len_u32(body_len)?);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len_u32(writes.len())?);
    for (key, value) in writes {
        out.push(if value.is_some() { TAG_PUT } else { TAG_DELETE });
        out.extend_from_slice(&len_u32(key.len())?);
        out.extend_from_slice(key);
        if let Some(v) = value {
            out.extend_from_slice(&len_u32(v.len())?);
            out.extend_from_slice(v);
        }
    }
    let crc = crc32fast::hash(&out[HEAD_LEN..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Every whole record from the start of `bytes`, and how many bytes they
/// take: reading stops at the first record that is cut short or fails a
/// check.
pub(crate) fn decode_all(bytes: &[u8]) -> (Vec<Entry>, usize) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut at = 0;
    while let Some((entry, used)) = bytes.get(at..).and_then(decode_one) {
        if entries.last().is_some_and(|last| entry.seq <= last.seq) {
            // Left by the pass before the last emptying: the end.
            break;
        }
        entries.push(entry);
        at += used;
    }
    (entries, at)
}

/// A little-endian reader over a record body that fails (`None`) rather
/// than reading past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.u32()?).ok()?;
        Some(self.take(n)?.to_vec())
    }
}

fn decode_one(bytes: &[u8]) -> Option<(Entry, usize)> {
    let mut head = Reader(bytes.get(..HEAD_LEN)?);
    if head.u32()? != MAGIC {
        return None;
    }
    let body_len = usize::try_from(head.u32()?).ok()?;
    let crc = head.u32()?;
    if body_len > MAX_BODY {
        return None;
    }
    let body = bytes.get(HEAD_LEN..HEAD_LEN.checked_add(body_len)?)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let mut r = Reader(body);
    let seq = r.u64()?;
    let count = r.u32()?;
    let mut writes = Vec::new();
    for _ in 0..count {
        let tag = r.u8()?;
        let key = r.bytes()?;
        let value = match tag {
            TAG_PUT => Some(r.bytes()?),
            TAG_DELETE => None,
            _ => return None,
        };
        writes.push((key, value));
    }
    if !r.0.is_empty() {
        return None;
    }
    Some((Entry { seq, writes }, HEAD_LEN + body_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> Vec<u8> {
        let value = vec![seq as u8; 40];
        encode(
            seq,
            &[(b"s/a".as_slice(), Some(value.as_slice())), (b"s/b", None)],
        )
        .unwrap()
    }

    #[test]
    fn records_read_back_as_written() {
        let mut bytes = record(1);
        bytes.extend(record(2));
        let (entries, used) = decode_all(&bytes);
        assert_eq!(used, bytes.len());
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].seq, 2);
        assert_eq!(
            entries[1].writes,
            vec![
                (b"s/a".to_vec(), Some(vec![2; 40])),
                (b"s/b".to_vec(), None)
            ]
        );
    }

    #[test]
    fn reading_stops_at_a_torn_or_damaged_record() {
        let one = record(1);
        let mut bytes = one.clone();
        bytes.extend(record(2));
        // Every cut inside the second record leaves the first alone.
        for cut in one.len()..bytes.len() {
            let (entries, used) = decode_all(&bytes[..cut]);
            assert_eq!((entries.len(), used), (1, one.len()), "cut at {cut}");
        }
        // So does any flipped byte in it (head, crc, seq or body).
        for i in one.len()..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x41;
            let (entries, used) = decode_all(&damaged);
            assert_eq!((entries.len(), used), (1, one.len()), "byte {i}");
        }
        // Zeros (a file extended but never written) are no record.
        let mut zeros = one.clone();
        zeros.extend([0u8; 64]);
        assert_eq!(decode_all(&zeros).1, one.len());
    }

    /// Emptying starts writing at the beginning again, over the old
    /// records, without erasing them or syncing: a reader stops at the
    /// first old record after the new ones (its seq is lower), and reads
    /// nothing where no new record was written yet.
    #[test]
    fn emptying_starts_over_and_old_records_after_new_ones_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path).unwrap();
        for seq in 1..=3u64 {
            j.append(seq, &[(b"key".as_slice(), Some(b"old".as_slice()))])
                .unwrap();
        }
        let one = encode(1, &[(b"key".as_slice(), Some(b"old".as_slice()))])
            .unwrap()
            .len();
        j.clear().unwrap();
        assert_eq!(j.len(), 0);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, PREALLOC * 2, "the space is kept");
        assert_eq!(decode_all(&bytes).0.len(), 0, "reads as empty");
        // The old records 2 and 3 are still there, whole.
        assert_eq!(decode_all(&bytes[one..]).0.len(), 2);
        // A new record of the same length lands exactly on old record 1,
        // so old record 2 follows it whole: the reader must stop there.
        j.append(4, &[(b"key".as_slice(), Some(b"new".as_slice()))])
            .unwrap();
        drop(j);
        let (_, entries) = Journal::open(&path).unwrap();
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4]);
        // A seq that jumps ahead is still read: the store reports the gap.
        let mut gap = encode(5, &[]).unwrap();
        gap.extend(encode(7, &[]).unwrap());
        gap.extend(encode(6, &[]).unwrap());
        let seqs: Vec<u64> = decode_all(&gap).0.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![5, 7]);
    }

    #[test]
    fn a_torn_tail_is_not_read_and_the_next_append_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (mut j, entries) = Journal::open(&path).unwrap();
            assert!(entries.is_empty());
            j.append(1, &[(b"k1".as_slice(), Some(b"v1".as_slice()))])
                .unwrap();
            j.append(2, &[(b"k2".as_slice(), None)]).unwrap();
        }
        // The second record torn: its last 3 bytes never written.
        let bytes = std::fs::read(&path).unwrap();
        let (_, whole) = decode_all(&bytes);
        assert_eq!(bytes.len() as u64, PREALLOC * 2, "zeroed ahead");
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(whole as u64 - 3).unwrap();
        drop(file);
        let (mut j, entries) = Journal::open(&path).unwrap();
        assert_eq!(entries.len(), 1);
        // The next record goes right after the last whole one, over the
        // torn bytes, which the open left as they were.
        let first = usize::try_from(j.len()).unwrap();
        assert!(first > 0);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[first..].iter().any(|&b| b != 0));
        j.append(2, &[(b"k3".as_slice(), None)]).unwrap();
        drop(j);
        let (_, entries) = Journal::open(&path).unwrap();
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(entries[1].writes, vec![(b"k3".to_vec(), None)]);
    }

    #[test]
    fn work_done_during_the_sync_sees_the_record_written_and_its_result_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path).unwrap();
        for seq in 1..=3u64 {
            let key = seq.to_le_bytes();
            let (done, out) =
                j.append_started(seq, &[(key.as_slice(), Some(b"v".as_slice()))], || {
                    // The record is in the file (written before the sync began).
                    let (entries, _) = decode_all(&std::fs::read(&path).unwrap());
                    entries.len()
                });
            done.unwrap().wait().unwrap();
            assert_eq!(out, Some(seq as usize));
        }
        // The sync thread stops with the journal.
        drop(j);
        let (_, entries) = Journal::open(&path).unwrap();
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }
}
