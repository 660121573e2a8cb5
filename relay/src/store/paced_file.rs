//! The redb file, written out in slices: a checkpoint's sync no longer
//! holds up the sends' segment syncs for its whole length.
//!
//! Envelope commits reach redb without a sync (`docs/STORAGE.md` §2), so
//! redb keeps the index pages they change in its write buffer and writes
//! them all at the next durable commit, a checkpoint: several MB at once,
//! then one `fdatasync`. That sync shares the disk with the writer's
//! segment syncs, and on a disk with a volatile write cache a segment sync
//! issued meanwhile waits for the whole checkpoint to reach the disk
//! (measured: ~17 ms for 2 s of sends at 10,000/s, five times a run,
//! which set the ack-latency p99; `BENCHMARKS.md`). [`PacedFile`] is
//! redb's own [`FileBackend`] with one change: after every
//! [`SYNC_SLICE_BYTES`] written it syncs what it has written so far, so a
//! segment sync waits for at most one slice. The store turns slicing off
//! for a large checkpoint (heavy ingest, see [`Pacing`]).
//!
//! Syncing early never weakens redb's commit protocol: redb still issues
//! its own syncs where it needs them, and an extra sync only makes pages
//! durable sooner. The slices add a few syncs to each checkpoint, which
//! runs on a thread of its own while sends go on (`RedbStore::checkpoint`).
//!
//! Measured at 10,000 sends/s on a slow disk (`relay_bench --phases
//! latency`, ten runs): ack p99 1.97–2.37 ms and p99.9 3.4–7.6 ms, where one
//! sync per checkpoint gave 2.2–4.2 ms and 17–19 ms.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Bytes written between two syncs while slicing is on. Small enough
/// that a segment sync waiting behind one slice stays well inside the
/// ack-latency target (~1 ms at 300 MB/s). Measured at 10,000 sends/s on
/// a slow disk: 256 KiB gave an ack p99 of 2.0–2.4 ms, 1 MiB 4.0–5.1 ms.
pub const SYNC_SLICE_BYTES: u64 = 256 * 1024;

/// Whether [`PacedFile`] writes in slices: shared between the file (inside
/// redb) and the store, which turns slicing off for a large checkpoint.
///
/// Slices are for a disk with time to spare. Under heavy ingest the disk is
/// busy with the sends' own segment writes, every slice's sync waits for
/// them, and a 40 MB checkpoint in 256 KiB slices took ~1 s instead of
/// ~0.15 s: the sends logged while it ran outgrew what the next checkpoint
/// could take, and sends stalled for up to 2 s. There the sends' latency
/// is queueing in any case, and one sync per checkpoint is cheapest.
#[derive(Debug)]
pub struct Pacing {
    /// Current slice in bytes; `u64::MAX` when slicing is off.
    slice: AtomicU64,
}

impl Pacing {
    /// Slicing on, at [`SYNC_SLICE_BYTES`].
    pub fn new() -> Arc<Pacing> {
        Arc::new(Pacing {
            slice: AtomicU64::new(SYNC_SLICE_BYTES),
        })
    }

    /// Turn slicing on (`true`) or off.
    pub fn slice(&self, on: bool) {
        let bytes = if on { SYNC_SLICE_BYTES } else { u64::MAX };
        self.slice.store(bytes, Ordering::Release);
    }
}

/// redb's [`FileBackend`], syncing every [`SYNC_SLICE_BYTES`] it writes.
#[derive(Debug)]
pub struct PacedFile {
    inner: FileBackend,
    /// Bytes written since the last sync.
    unsynced: AtomicU64,
    /// Whether to write in slices (shared with the store).
    pacing: Arc<Pacing>,
    /// Syncs this backend started by itself, between redb's own.
    slice_syncs: AtomicU64,
}

impl PacedFile {
    /// Open (or create) the file at `path` as redb's own `Database::create`
    /// would, slicing its writes as `pacing` says.
    pub fn open(path: &Path, pacing: Arc<Pacing>) -> Result<PacedFile, redb::DatabaseError> {
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(PacedFile {
            inner: FileBackend::new(file)?,
            unsynced: AtomicU64::new(0),
            pacing,
            slice_syncs: AtomicU64::new(0),
        })
    }

    /// How many syncs this file took by itself, one per slice written.
    #[cfg(test)]
    fn slice_syncs(&self) -> u64 {
        self.slice_syncs.load(Ordering::Acquire)
    }
}

impl PacedFile {
    /// Sync what was written so far.
    fn sync_written(&self) -> Result<(), io::Error> {
        // Whatever was written before this point is covered by this sync.
        self.unsynced.store(0, Ordering::Release);
        self.inner.sync_data()
    }
}

impl StorageBackend for PacedFile {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.sync_written()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.inner.write(offset, data)?;
        let len = data.len() as u64;
        let before = self.unsynced.fetch_add(len, Ordering::AcqRel);
        if before.saturating_add(len) >= self.pacing.slice.load(Ordering::Acquire) {
            self.slice_syncs.fetch_add(1, Ordering::AcqRel);
            self.sync_written()?;
        }
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slice_written_is_synced_and_reads_back() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let pacing = Pacing::new();
        let file = PacedFile::open(&dir.path().join("paced"), pacing.clone())?;
        let page = vec![0xA5u8; 4096];
        let pages = 3 * SYNC_SLICE_BYTES / 4096;
        file.set_len(pages * 4096)?;
        for i in 0..pages {
            file.write(i * 4096, &page)?;
        }
        assert_eq!(file.slice_syncs(), 3, "one sync per slice written");
        // A sync of redb's own starts the next slice afresh.
        file.write(0, &page)?;
        file.sync_data()?;
        for i in 0..(SYNC_SLICE_BYTES / 4096 - 1) {
            file.write(i * 4096, &page)?;
        }
        assert_eq!(file.slice_syncs(), 3, "less than a slice since redb's sync");
        // Slicing off: no sync of its own, however much is written.
        pacing.slice(false);
        for i in 0..pages {
            file.write(i * 4096, &page)?;
        }
        assert_eq!(file.slice_syncs(), 3, "slicing is off");
        pacing.slice(true);
        file.write(0, &page)?;
        assert_eq!(file.slice_syncs(), 4, "slicing is on again");
        let mut back = vec![0u8; 4096];
        file.read((pages - 1) * 4096, &mut back)?;
        assert_eq!(back, page);
        assert_eq!(file.len()?, pages * 4096);
        Ok(())
    }

    #[test]
    fn a_redb_database_on_it_keeps_its_commits() -> Result<(), Box<dyn std::error::Error>> {
        const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db.redb");
        let row = vec![7u8; 1000];
        {
            let file = PacedFile::open(&path, Pacing::new())?;
            let db = redb::Database::builder().create_with_backend(file)?;
            // Enough rows that the durable commit writes several slices.
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(T)?;
                for k in 0..4_000u64 {
                    t.insert(k, row.as_slice())?;
                }
            }
            txn.commit()?;
        }
        let file = PacedFile::open(&path, Pacing::new())?;
        let db = redb::Database::builder().create_with_backend(file)?;
        let txn = redb::ReadableDatabase::begin_read(&db)?;
        let t = txn.open_table(T)?;
        assert_eq!(redb::ReadableTableMetadata::len(&t)?, 4_000);
        assert_eq!(t.get(3_999)?.map(|v| v.value().to_vec()), Some(row));
        Ok(())
    }
}
