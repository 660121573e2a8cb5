//! The native file-backed [`Storage`]: one redb database file and its
//! [`journal`](super::journal).
//!
//! redb gives the contract the engine needs: a batch is one write
//! transaction, pages are checksummed, and a file left by a crash mid-commit
//! is repaired on the next open (the last durable transaction wins). A
//! batch is durable before `apply` returns in one of two ways:
//!
//! - a small batch (a send, a receipt, a message: almost every batch) is
//!   appended to the journal and synced, and committed to redb without a
//!   sync of its own while that sync runs (on the journal's sync thread:
//!   the device's flush and the commit's CPU overlap). One synced append
//!   costs about half of a durable redb commit, which rewrites and syncs
//!   5–10 scattered pages for even a one-message batch. A failed sync or
//!   commit poisons the store, reads included, until it is opened again.
//!   Every [`CHECKPOINT_BATCHES`] batches or
//!   [`CHECKPOINT_BYTES`] of journal, and when the store is closed, redb is
//!   committed durably (a checkpoint) and the journal emptied;
//! - a large batch (a catch-up page) is committed to redb durably, as it
//!   would gain nothing from being written twice; that commit is a
//!   checkpoint too.
//!
//! Every commit records in redb the number of the last journal record it
//! includes (`meta` key `journal`), so opening the store replays exactly
//! the records after the last durable commit, in order, and a record
//! missing from that order is [`StorageError::Corrupt`]. A file that is not
//! a redb database, or holds a different format, is a typed
//! [`StorageError`], never a panic.
//!
//! Every value is sealed ([`super::seal`]) under the store's data key; the
//! `meta` table holds the seal header (what seals the key, and a check
//! value), so a wrong key or passphrase is [`StorageError::WrongKey`] at
//! open.

use super::journal::{self, Journal};
use super::pack::{self, Write};
use super::seal::{self, Header, StoreKey, Unlock};
use super::{Storage, StorageOp, Syncing};
use crate::error::StorageError;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const INFO: TableDefinition<&str, u32> = TableDefinition::new("info");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FORMAT_KEY: &str = "format";
const SEAL_KEY: &str = "seal";
/// `meta` key of the last journal record the redb file includes (u64 LE).
const JOURNAL_KEY: &str = "journal";
/// Batches journaled between two checkpoints at most.
pub const CHECKPOINT_BATCHES: u32 = 1024;
/// Journal bytes past which the next batch is followed by a checkpoint.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;
/// A batch whose sealed values take more than this is committed to redb
/// durably instead of journaled: its pages are many anyway, and it would
/// be written twice.
pub const JOURNAL_MAX_BATCH: usize = 64 * 1024;
/// Version of the file layout this build reads and writes. 2: history is
/// packed (see [`super::pack`]). 3: every value is sealed and `meta` holds
/// the seal header. A format-1 or -2 file (plaintext values) is upgraded on
/// open: every record is sealed in the same transaction that raises the
/// version, so a crash leaves either the old plaintext store or the sealed
/// one, never a mix. A format-1 file's per-key history records stay per key
/// and are read alongside packs. 4: the store has a journal beside it, which
/// a build that does not know it would ignore (losing the batches in it), so
/// the version is raised; a format-3 file is upgraded by raising it.
pub const FILE_FORMAT: u32 = 4;
/// The oldest format this build opens (and migrates).
const OLDEST_FORMAT: u32 = 1;
/// A native pack is closed before it grows past this: a 200-message page of
/// 1 KiB messages in one conversation is one pack.
pub const PACK_MAX_BYTES: usize = 256 * 1024;
/// redb's page cache for this store. redb keeps every page a commit writes
/// in its cache up to this bound (its default is 1 GiB), so with the default
/// a catch-up of 100,000 messages grows the process by every page it writes,
/// each one memory fresh from the operating system (a page fault and a
/// zeroed page per 4 KiB or 2 MiB): on a small virtual machine that was the
/// largest cost of a commit. Bounded, the pages written past the bound are
/// dropped after their commit and their memory is reused by the next one.
/// Reads are of the engine state (loaded once) and of recent history pages,
/// which fit many times over.
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

fn backend<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Backend(format!("redb: {e}"))
}

/// A redb-backed store at a path, every value sealed.
pub struct FileStorage {
    db: Database,
    key: StoreKey,
    rng: hush_crypto::OsRng,
    journal: Journal,
    /// The last journal record number used (in redb, durably or not).
    seq: u64,
    /// Batches journaled since the last checkpoint.
    journaled: u32,
    /// A journaled batch could not be committed to redb, its sync failed,
    /// or a checkpoint failed: every later call fails until the store is
    /// opened again, which replays the journal.
    poisoned: bool,
    /// The sync of the last journaled batch, if nobody waited for it yet
    /// ([`Storage::apply_stored`] returns before it ends).
    syncing: Option<journal::SyncWait>,
}

impl std::fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorage").finish_non_exhaustive()
    }
}

impl FileStorage {
    /// Open (or create) the database at `path`, unlocked by `unlock`. Fails
    /// with a typed error if the file is not a Hush client store, is corrupt
    /// beyond repair, is open in another process, or `unlock` is not its key
    /// ([`StorageError::WrongKey`]). A store of an older, unsealed format is
    /// sealed under `unlock` in one transaction.
    pub fn open(path: impl AsRef<Path>, unlock: &Unlock) -> Result<Self, StorageError> {
        let path = path.as_ref();
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(backend)?;
        let mut rng = seal::rng()?;
        let txn = db.begin_write().map_err(backend)?;
        let key = {
            let mut records = txn.open_table(RECORDS).map_err(backend)?;
            let mut info = txn.open_table(INFO).map_err(backend)?;
            let mut meta = txn.open_table(META).map_err(backend)?;
            let stored = info.get(FORMAT_KEY).map_err(backend)?.map(|g| g.value());
            let header = meta
                .get(SEAL_KEY)
                .map_err(backend)?
                .map(|g| Header::decode(g.value()))
                .transpose()?;
            match (stored, header) {
                (Some(FILE_FORMAT), Some(header)) => unlock.open(&header)?,
                (Some(3), Some(header)) => {
                    // Sealed already: only the journal is new.
                    let key = unlock.open(&header)?;
                    info.insert(FORMAT_KEY, FILE_FORMAT).map_err(backend)?;
                    key
                }
                (Some(3 | FILE_FORMAT), None) => {
                    return Err(StorageError::Corrupt {
                        key: "store seal header (missing)".into(),
                    });
                }
                (Some(old), _) if (OLDEST_FORMAT..3).contains(&old) => {
                    let (key, header) = unlock.create(&mut rng)?;
                    let mut plain = Vec::new();
                    for row in records.iter().map_err(backend)? {
                        let (k, v) = row.map_err(backend)?;
                        plain.push((
                            k.value().to_vec(),
                            zeroize::Zeroizing::new(v.value().to_vec()),
                        ));
                    }
                    for (k, v) in &plain {
                        let sealed = seal::seal(&key, &mut rng, k, v)?;
                        records
                            .insert(k.as_slice(), sealed.as_slice())
                            .map_err(backend)?;
                    }
                    meta.insert(SEAL_KEY, header.encode().as_slice())
                        .map_err(backend)?;
                    info.insert(FORMAT_KEY, FILE_FORMAT).map_err(backend)?;
                    key
                }
                (Some(other), _) => {
                    return Err(StorageError::Backend(format!(
                        "unsupported client store format {other} (this build reads {FILE_FORMAT})"
                    )));
                }
                (None, _) => {
                    let (key, header) = unlock.create(&mut rng)?;
                    meta.insert(SEAL_KEY, header.encode().as_slice())
                        .map_err(backend)?;
                    info.insert(FORMAT_KEY, FILE_FORMAT).map_err(backend)?;
                    key
                }
            }
        };
        let durable = journal_seq(&txn)?;
        txn.commit().map_err(backend)?;
        let (journal, entries) = Journal::open(&journal::path_for(path))?;
        let mut storage = FileStorage {
            db,
            key,
            rng,
            journal,
            seq: durable,
            journaled: 0,
            poisoned: false,
            syncing: None,
        };
        storage.replay(durable, entries)?;
        Ok(storage)
    }

    /// Commit the journal's records after `durable` (the last one the redb
    /// file has), in order, in one durable transaction, and empty the
    /// journal.
    fn replay(&mut self, durable: u64, entries: Vec<journal::Entry>) -> Result<(), StorageError> {
        if entries.iter().all(|e| e.seq <= durable) {
            // Nothing redb lacks (a checkpoint whose emptying failed).
            if self.journal.len() > 0 {
                self.journal.clear()?;
            }
            return Ok(());
        }
        let mut next = durable.saturating_add(1);
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut table = txn.open_table(RECORDS).map_err(backend)?;
            for entry in entries.iter().filter(|e| e.seq > durable) {
                if entry.seq != next {
                    return Err(StorageError::Corrupt {
                        key: format!(
                            "journal (record {} where {next} was due; the store holds {durable})",
                            entry.seq
                        ),
                    });
                }
                for (key, value) in &entry.writes {
                    match value {
                        Some(v) => table.insert(key.as_slice(), v.as_slice()),
                        None => table.remove(key.as_slice()),
                    }
                    .map_err(backend)?;
                }
                next = next.saturating_add(1);
            }
        }
        self.seq = next.saturating_sub(1);
        set_journal_seq(&txn, self.seq)?;
        txn.commit().map_err(backend)?;
        if self.journal.len() > 0 {
            self.journal.clear()?;
        }
        Ok(())
    }

    /// Make every journaled batch durable in redb and empty the journal.
    /// `apply` does this by itself every so often and the store does it
    /// when dropped; a caller may do it before copying the file.
    pub fn checkpoint(&mut self) -> Result<(), StorageError> {
        self.synced()?;
        if self.journaled == 0 && self.journal.len() == 0 {
            return Ok(());
        }
        // An empty transaction committed durably makes every commit before
        // it durable with it.
        let mut txn = self.db.begin_write().map_err(backend)?;
        txn.set_durability(Durability::Immediate).map_err(backend)?;
        set_journal_seq(&txn, self.seq)?;
        if let Err(e) = txn.commit() {
            self.poisoned = true;
            return Err(backend(e));
        }
        self.journaled = 0;
        // Should this fail, the records stay, and a replay skips them.
        self.journal.clear()
    }

    /// The journal beside a store at `db` (to remove it with the store).
    pub fn journal_path(db: impl AsRef<Path>) -> std::path::PathBuf {
        journal::path_for(db.as_ref())
    }

    /// Wait for the sync of the last batch, if it is still running; a
    /// failed one poisons the store.
    fn synced(&mut self) -> Result<(), StorageError> {
        self.usable()?;
        if let Some(wait) = self.syncing.take()
            && let Err(e) = wait.wait()
        {
            // After a failed sync the kernel may have dropped the pages and
            // will not say so again: trust nothing more of this file.
            self.poisoned = true;
            return Err(e);
        }
        Ok(())
    }

    /// Time to fold the journal into redb durably (see the module docs).
    fn checkpoint_due(&self) -> bool {
        self.journaled >= CHECKPOINT_BATCHES || self.journal.len() >= CHECKPOINT_BYTES
    }

    fn usable(&self) -> Result<(), StorageError> {
        if self.poisoned || self.syncing.as_ref().is_some_and(journal::SyncWait::failed) {
            return Err(StorageError::Backend(
                "an earlier commit failed (its journal sync or its redb commit); \
                 open the store again to recover what is durable"
                    .into(),
            ));
        }
        Ok(())
    }

    fn open_value(&self, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, StorageError> {
        seal::open(&self.key, key, sealed)
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Leaves a file that needs no replay; a failure here is what a
        // crash leaves, which the next open recovers from.
        let _ = self.checkpoint();
    }
}

fn journal_seq(txn: &redb::WriteTransaction) -> Result<u64, StorageError> {
    let meta = txn.open_table(META).map_err(backend)?;
    let seq = meta.get(JOURNAL_KEY).map_err(backend)?;
    match seq {
        None => Ok(0),
        Some(g) => <[u8; 8]>::try_from(g.value())
            .map(u64::from_le_bytes)
            .map_err(|_| StorageError::Corrupt {
                key: "store journal position".into(),
            }),
    }
}

fn set_journal_seq(txn: &redb::WriteTransaction, seq: u64) -> Result<(), StorageError> {
    txn.open_table(META)
        .map_err(backend)?
        .insert(JOURNAL_KEY, seq.to_le_bytes().as_slice())
        .map_err(backend)?;
    Ok(())
}

impl Storage for FileStorage {
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<super::Record>, StorageError> {
        self.usable()?;
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let mut out = Vec::new();
        for row in table.range(prefix..).map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), self.open_value(k.value(), v.value())?));
        }
        Ok(out)
    }

    fn scan_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<super::Record>, StorageError> {
        self.usable()?;
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let upper = match (before, super::keys::prefix_end(prefix)) {
            (Some(b), Some(end)) => Some(b.to_vec().min(end)),
            (Some(b), None) => Some(b.to_vec()),
            (None, end) => end,
        };
        let range = match &upper {
            Some(u) => table.range(prefix..u.as_slice()).map_err(backend)?,
            None => table.range(prefix..).map_err(backend)?,
        };
        let mut out = Vec::new();
        for row in range.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row.map_err(backend)?;
            if k.value().starts_with(prefix) {
                out.push((k.value().to_vec(), self.open_value(k.value(), v.value())?));
            }
        }
        Ok(out)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.usable()?;
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        table
            .get(key)
            .map_err(backend)?
            .map(|g| self.open_value(key, g.value()))
            .transpose()
    }

    fn apply(&mut self, batch: &[StorageOp]) -> Result<(), StorageError> {
        // Dropping the `Syncing` is fine: `synced` waits for the same sync.
        let _stored = self.apply_stored(batch)?;
        self.synced()?;
        if self.checkpoint_due() {
            // The batch is durable whatever happens here; a failed
            // checkpoint fails the next call instead.
            let _ = self.checkpoint();
        }
        Ok(())
    }

    /// Seal the batch, append it to the journal, start the journal's sync,
    /// and commit the batch to redb (without a sync of its own) while the
    /// sync runs; return then. The batch is readable and kept by a crash of
    /// the process from here; it survives a power loss once the returned
    /// [`Syncing`] says so. Should that sync fail, the store is poisoned,
    /// reads included, until it is opened again (which replays what is
    /// durable). A batch waits for the sync of the one before it.
    fn apply_stored(&mut self, batch: &[StorageOp]) -> Result<Syncing, StorageError> {
        self.synced()?;
        if batch.is_empty() {
            return Ok(Syncing::done());
        }
        if self.checkpoint_due() {
            // Due since the last batch (whose sync nobody waited for then).
            // A failure that leaves the store unusable is caught below.
            let _ = self.checkpoint();
            self.usable()?;
        }
        // History pairs become one pack per conversation (see `pack`).
        // In key order: neighbouring inserts land in the same B-tree
        // pages. The sort is stable, so several writes of one key keep
        // their order; only the last one is applied, as it alone would
        // count (a batch of several steps rewrites the cursor, sessions
        // and streams once per step).
        let mut ordered = pack::pack_batch(batch, PACK_MAX_BYTES);
        ordered.sort_by(|a, b| a.key().cmp(b.key()));
        let mut writes: Vec<(&[u8], Option<Vec<u8>>)> = Vec::with_capacity(ordered.len());
        for (i, write) in ordered.iter().enumerate() {
            let last_of_key = ordered
                .get(i + 1)
                .is_none_or(|next| next.key() != write.key());
            if !last_of_key {
                continue;
            }
            writes.push(match write {
                Write::Put(key, value) => (
                    *key,
                    Some(seal::seal(&self.key, &mut self.rng, key, value)?),
                ),
                Write::PutOwned(key, value) => (
                    key.as_slice(),
                    Some(seal::seal(&self.key, &mut self.rng, key, value)?),
                ),
                Write::Delete(key) => (*key, None),
            });
        }
        let size: usize = writes
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        if size > JOURNAL_MAX_BATCH {
            self.commit(&writes, Durability::Immediate)?;
            return Ok(Syncing::done());
        }
        let seq = self.seq.saturating_add(1);
        let refs: Vec<(&[u8], Option<&[u8]>)> =
            writes.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        let db = &self.db;
        let (appended, indexed) = self.journal.append_started(seq, &refs, || {
            commit_rows(db, &writes, seq, Durability::None)
        });
        let wait = match appended {
            Ok(wait) => wait,
            Err(e) => {
                // A record may be half written: trust nothing more of it.
                self.poisoned = true;
                return Err(e);
            }
        };
        self.seq = seq;
        self.journaled = self.journaled.saturating_add(1);
        self.syncing = Some(wait.clone());
        if let Some(Err(e)) = indexed {
            // In the journal but not in redb: only a replay can put the
            // two back in step.
            self.poisoned = true;
            return Err(e);
        }
        let notify = wait.clone();
        Ok(Syncing::notifying(
            move || wait.wait(),
            move |call| notify.when_ended(call),
        ))
    }

    /// Stores now when that waits for nothing: the previous batch's sync
    /// has ended, no checkpoint is due, and the batch (sealed, so each
    /// value grows by [`seal::OVERHEAD`]) goes to the journal.
    fn try_apply_stored(&mut self, batch: &[StorageOp]) -> Option<Result<Syncing, StorageError>> {
        if self.syncing.as_ref().is_some_and(|w| !w.ended()) || self.checkpoint_due() {
            return None;
        }
        let sealed: usize = batch
            .iter()
            .map(|op| match op {
                StorageOp::Put { key, value } => key.len() + value.len() + seal::OVERHEAD,
                StorageOp::Delete { key } => key.len(),
            })
            .sum();
        // Packing adds a little per message: stay well clear of the bound
        // past which `apply_stored` commits to redb durably instead.
        if sealed > JOURNAL_MAX_BATCH / 2 {
            return None;
        }
        Some(self.apply_stored(batch))
    }
}

impl FileStorage {
    /// One redb transaction with `writes` and the journal position.
    fn commit(
        &mut self,
        writes: &[(&[u8], Option<Vec<u8>>)],
        durability: Durability,
    ) -> Result<(), StorageError> {
        commit_rows(&self.db, writes, self.seq, durability)?;
        if matches!(durability, Durability::Immediate) {
            // Everything journaled so far is durable in redb now.
            self.journaled = 0;
            if self.journal.len() > 0 {
                // The batch is durable: should this fail, the records stay
                // and a replay skips them.
                let _ = self.journal.clear();
            }
        }
        Ok(())
    }
}

/// One redb transaction with `writes` and journal position `seq`.
fn commit_rows(
    db: &Database,
    writes: &[(&[u8], Option<Vec<u8>>)],
    seq: u64,
    durability: Durability,
) -> Result<(), StorageError> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_durability(durability).map_err(backend)?;
    {
        let mut table = txn.open_table(RECORDS).map_err(backend)?;
        for (key, value) in writes {
            match value {
                Some(v) => table.insert(*key, v.as_slice()).map(|_| ()),
                None => table.remove(*key).map(|_| ()),
            }
            .map_err(backend)?;
        }
    }
    set_journal_seq(&txn, seq)?;
    txn.commit().map_err(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test stores' key (fixed, so a store reopens).
    fn unlock() -> Unlock {
        Unlock::Key(StoreKey::from_bytes([3; 32]))
    }

    #[test]
    fn batches_survive_reopen_and_scans_respect_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        {
            let mut s = FileStorage::open(&path, &unlock()).unwrap();
            let ops: Vec<StorageOp> = (0u8..5)
                .map(|i| StorageOp::Put {
                    key: vec![b'h', b'/', i],
                    value: vec![i],
                })
                .chain([StorageOp::Put {
                    key: b"s/x".to_vec(),
                    value: vec![9],
                }])
                .collect();
            s.apply(&ops).unwrap();
            s.apply(&[StorageOp::Delete {
                key: vec![b'h', b'/', 2],
            }])
            .unwrap();
        }
        let s = FileStorage::open(&path, &unlock()).unwrap();
        assert_eq!(s.load_state().unwrap(), vec![(b"s/x".to_vec(), vec![9])]);
        let back = s.scan_back(b"h/", Some(&[b'h', b'/', 4]), 2).unwrap();
        let keys: Vec<u8> = back.iter().map(|(k, _)| k[2]).collect();
        assert_eq!(keys, vec![3, 1]);
        assert_eq!(s.get(&[b'h', b'/', 2]).unwrap(), None);
    }

    #[test]
    fn the_last_op_on_a_key_wins_within_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStorage::open(dir.path().join("client.redb"), &unlock()).unwrap();
        let put = |k: &[u8], v: u8| StorageOp::Put {
            key: k.to_vec(),
            value: vec![v],
        };
        let del = |k: &[u8]| StorageOp::Delete { key: k.to_vec() };
        s.apply(&[
            put(b"s/b", 1),
            put(b"s/a", 1),
            del(b"s/b"),
            put(b"s/c", 1),
            put(b"s/a", 2),
            del(b"s/c"),
            put(b"s/c", 3),
        ])
        .unwrap();
        assert_eq!(s.get(b"s/a").unwrap(), Some(vec![2]));
        assert_eq!(s.get(b"s/b").unwrap(), None);
        assert_eq!(s.get(b"s/c").unwrap(), Some(vec![3]));
    }

    #[test]
    fn torn_file_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        {
            let mut s = FileStorage::open(&path, &unlock()).unwrap();
            for i in 0u8..20 {
                s.apply(&[StorageOp::Put {
                    key: vec![b's', b'/', i],
                    value: vec![i; 300],
                }])
                .unwrap();
            }
        }
        let len = std::fs::metadata(&path).unwrap().len();
        for cut in [len / 2, len - 1, 100] {
            let torn = dir.path().join(format!("torn-{cut}.redb"));
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&torn, &bytes[..cut as usize]).unwrap();
            // Either redb repairs it (and the store reads back consistently)
            // or it is a typed error; never a panic.
            if let Ok(s) = FileStorage::open(&torn, &unlock()) {
                let _ = s.load_state();
            }
        }
    }

    #[test]
    fn garbage_file_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(matches!(
            FileStorage::open(&path, &unlock()),
            Err(StorageError::Backend(_))
        ));
    }

    use crate::state::HistoryRecord;
    use crate::storage::{encode, history, history_message, keys};
    use hush_protocol::{ConversationId, DeviceId, MessageId, UserKey};

    fn record(conv: ConversationId, n: u8) -> HistoryRecord {
        HistoryRecord {
            id: MessageId([n; 16]),
            conversation: conv,
            from_user: UserKey([7; 32]),
            from_device: DeviceId([8; 16]),
            sender_seq: u64::from(n),
            sent_at_ms: 1,
            stored_at_ms: 2,
            text: format!("text {n}"),
            outgoing: false,
        }
    }

    /// The two records the engine writes for a message.
    fn message_ops(conv: ConversationId, n: u8, order: u64) -> Vec<StorageOp> {
        let r = record(conv, n);
        vec![
            StorageOp::Put {
                key: keys::history_message(&conv, &r.id),
                value: encode(&r).unwrap(),
            },
            StorageOp::Put {
                key: keys::history_order(&conv, order),
                value: encode(&r.id).unwrap(),
            },
        ]
    }

    fn texts(s: &FileStorage, conv: &ConversationId, before: Option<u64>, n: usize) -> Vec<String> {
        history(s, conv, before, n)
            .unwrap()
            .into_iter()
            .map(|e| e.record.text)
            .collect()
    }

    #[test]
    fn history_is_packed_and_pages_backwards_across_packs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStorage::open(dir.path().join("client.redb"), &unlock()).unwrap();
        let (c1, c2) = (ConversationId([1; 16]), ConversationId([2; 16]));
        // Three batches, two conversations interleaved: orders 0..30.
        for b in 0u8..3 {
            let mut ops = Vec::new();
            for k in 0u8..10 {
                let n = b * 10 + k;
                let conv = if k % 3 == 0 { c2 } else { c1 };
                ops.extend(message_ops(conv, n, u64::from(n)));
            }
            s.apply(&ops).unwrap();
        }
        // One pack per conversation per batch, no per-key records.
        assert_eq!(s.scan_prefix(pack::PACK).unwrap().len(), 6);
        assert!(s.scan_prefix(b"h/msg/").unwrap().is_empty());
        assert!(s.scan_prefix(b"h/order/").unwrap().is_empty());
        let all: Vec<String> = (0u8..30)
            .filter(|n| n % 10 % 3 != 0)
            .map(|n| format!("text {n}"))
            .collect();
        assert_eq!(texts(&s, &c1, None, 100), all);
        // Paging backwards: pages of 4 from the newest, across pack borders.
        let mut before = None;
        let mut pages = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        loop {
            let page = history(&s, &c1, before, 4).unwrap();
            let Some(first) = page.first() else { break };
            before = Some(first.order);
            pages.push(page.len());
            let mut t: Vec<String> = page.into_iter().map(|e| e.record.text).collect();
            t.append(&mut seen);
            seen = t;
        }
        assert_eq!(seen, all);
        assert!(
            pages[..pages.len() - 1].iter().all(|&n| n == 4),
            "{pages:?}"
        );
        // The middle of a pack as the bound.
        assert_eq!(
            texts(&s, &c1, Some(15), 3),
            vec!["text 11", "text 12", "text 14"]
        );
        // Found by id, packed.
        let r = history_message(&s, &c1, &MessageId([14; 16])).unwrap();
        assert_eq!(r.map(|r| r.text), Some("text 14".to_string()));
        assert_eq!(
            history_message(&s, &c1, &MessageId([99; 16])).unwrap(),
            None
        );
    }

    #[test]
    fn an_erased_packed_message_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStorage::open(dir.path().join("client.redb"), &unlock()).unwrap();
        let c = ConversationId([1; 16]);
        let mut ops = Vec::new();
        for n in 0u8..5 {
            ops.extend(message_ops(c, n, u64::from(n)));
        }
        s.apply(&ops).unwrap();
        // The engine erases by deleting the message record.
        s.apply(&[StorageOp::Delete {
            key: keys::history_message(&c, &MessageId([2; 16])),
        }])
        .unwrap();
        assert_eq!(
            texts(&s, &c, None, 10),
            vec!["text 0", "text 1", "text 3", "text 4"]
        );
        // A page of 2 before the erased one skips it and still fills.
        assert_eq!(texts(&s, &c, Some(3), 2), vec!["text 0", "text 1"]);
        assert_eq!(history_message(&s, &c, &MessageId([2; 16])).unwrap(), None);
    }

    #[test]
    fn a_corrupt_pack_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let c = ConversationId([1; 16]);
        {
            let mut s = FileStorage::open(&path, &unlock()).unwrap();
            s.apply(&message_ops(c, 1, 1)).unwrap();
        }
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(RECORDS).unwrap();
                t.insert(pack::pack_key(&c, 1).as_slice(), [1u8, 0, 0].as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let s = FileStorage::open(&path, &unlock()).unwrap();
        assert!(matches!(
            history(&s, &c, None, 10),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_format_1_store_is_migrated_and_its_history_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let c = ConversationId([1; 16]);
        {
            // A store as format 1 wrote it: per-key history records.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut info = txn.open_table(INFO).unwrap();
                info.insert(FORMAT_KEY, 1).unwrap();
                let mut t = txn.open_table(RECORDS).unwrap();
                for n in 0u8..3 {
                    for op in message_ops(c, n, u64::from(n)) {
                        if let StorageOp::Put { key, value } = op {
                            t.insert(key.as_slice(), value.as_slice()).unwrap();
                        }
                    }
                }
            }
            txn.commit().unwrap();
        }
        let mut s = FileStorage::open(&path, &unlock()).unwrap();
        let mut ops = Vec::new();
        for n in 3u8..6 {
            ops.extend(message_ops(c, n, u64::from(n)));
        }
        s.apply(&ops).unwrap();
        let want: Vec<String> = (0..6).map(|n| format!("text {n}")).collect();
        assert_eq!(texts(&s, &c, None, 10), want);
        assert_eq!(texts(&s, &c, Some(4), 2), vec!["text 2", "text 3"]);
        drop(s);
        // Upgraded: the format is raised and every value, the old plaintext
        // ones included, is sealed under the store's key.
        assert_eq!(raw_rows(&path).0, Some(FILE_FORMAT));
        let rows = raw_rows(&path).1;
        assert_eq!(rows.len(), 7);
        let key = StoreKey::from_bytes([3; 32]);
        for (k, v) in &rows {
            assert!(!contains(v, b"text "), "{}", keys::printable(k));
            seal::open(&key, k, v).unwrap();
        }
        assert!(!contains(&std::fs::read(&path).unwrap(), b"text 1"));
    }

    /// The format and the raw (sealed) rows of a store file.
    fn raw_rows(path: &Path) -> (Option<u32>, Vec<crate::storage::Record>) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_read().unwrap();
        let info = txn.open_table(INFO).unwrap();
        let format = info.get(FORMAT_KEY).unwrap().map(|g| g.value());
        let t = txn.open_table(RECORDS).unwrap();
        let rows = t
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value().to_vec(), v.value().to_vec())
            })
            .collect();
        (format, rows)
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// A batch whose journal sync fails was already committed to redb
    /// (the commit runs during the sync): the store refuses reads as well
    /// as writes from then on, so those rows are never read as durable,
    /// and opening it again recovers what is durable.
    #[test]
    fn a_failed_sync_poisons_reads_too_until_the_store_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        {
            let mut s = FileStorage::open(&path, &unlock()).unwrap();
            s.apply(&[StorageOp::Put {
                key: b"s/a".to_vec(),
                value: b"kept".to_vec(),
            }])
            .unwrap();
            s.journal.fail_next_sync = true;
            let failed = s.apply(&[StorageOp::Put {
                key: b"s/b".to_vec(),
                value: b"unsure".to_vec(),
            }]);
            assert!(failed.is_err());
            for read in [
                s.get(b"s/a").map(|_| ()),
                s.get(b"s/b").map(|_| ()),
                s.scan_prefix(b"s/").map(|_| ()),
                s.scan_back(b"s/", None, 10).map(|_| ()),
            ] {
                let e = read.unwrap_err();
                assert!(e.to_string().contains("open the store again"), "{e}");
            }
            let later = s.apply(&[StorageOp::Put {
                key: b"s/c".to_vec(),
                value: b"refused".to_vec(),
            }]);
            assert!(later.is_err());
        }
        let mut s = FileStorage::open(&path, &unlock()).unwrap();
        assert_eq!(s.get(b"s/a").unwrap(), Some(b"kept".to_vec()));
        assert_eq!(s.get(b"s/c").unwrap(), None);
        s.apply(&[StorageOp::Put {
            key: b"s/d".to_vec(),
            value: b"works".to_vec(),
        }])
        .unwrap();
        assert_eq!(s.get(b"s/d").unwrap(), Some(b"works".to_vec()));
    }

    /// `apply_stored` returns with the batch readable and its sync under
    /// way; `wait` reports the sync. A failed sync refuses reads from then
    /// on, whoever waits for it, and a reopen recovers what is durable.
    #[test]
    fn a_stored_batch_is_readable_at_once_and_a_failed_sync_still_poisons() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        {
            let mut s = FileStorage::open(&path, &unlock()).unwrap();
            let stored = s
                .apply_stored(&[StorageOp::Put {
                    key: b"s/a".to_vec(),
                    value: b"first".to_vec(),
                }])
                .unwrap();
            assert_eq!(s.get(b"s/a").unwrap(), Some(b"first".to_vec()));
            stored.wait().unwrap();
            s.journal.fail_next_sync = true;
            let stored = s
                .apply_stored(&[StorageOp::Put {
                    key: b"s/b".to_vec(),
                    value: b"unsure".to_vec(),
                }])
                .unwrap();
            let e = stored.wait().unwrap_err();
            assert!(e.to_string().contains("syncing"), "{e}");
            let e = s.get(b"s/a").unwrap_err();
            assert!(e.to_string().contains("open the store again"), "{e}");
            assert!(
                s.apply_stored(&[StorageOp::Delete {
                    key: b"s/a".to_vec()
                }])
                .is_err()
            );
        }
        let s = FileStorage::open(&path, &unlock()).unwrap();
        assert_eq!(s.get(b"s/a").unwrap(), Some(b"first".to_vec()));
    }

    /// `try_apply_stored` stores only what waits for nothing: not while
    /// the previous batch's sync runs, not when a checkpoint is due, not a
    /// batch too large for the journal; what it stores is readable at once
    /// and its `Syncing` calls back once the sync has ended.
    #[test]
    fn storing_without_waiting_refuses_what_would_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let put = |key: &[u8], len: usize| StorageOp::Put {
            key: key.to_vec(),
            value: vec![7; len],
        };
        let mut s = FileStorage::open(&path, &unlock()).unwrap();
        let mut syncing = s.try_apply_stored(&[put(b"s/a", 10)]).unwrap().unwrap();
        assert_eq!(s.get(b"s/a").unwrap(), Some(vec![7; 10]));
        let (tx, rx) = std::sync::mpsc::channel();
        assert!(syncing.when_ended(Box::new(move || {
            let _ = tx.send(());
        })));
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        syncing.wait().unwrap();
        // Still running: the next batch would wait for it.
        s.syncing = Some(journal::SyncWait::pending_for_tests());
        assert!(s.try_apply_stored(&[put(b"s/b", 10)]).is_none());
        s.syncing = None;
        // Too large for the journal: redb commits it durably, a wait.
        assert!(
            s.try_apply_stored(&[put(b"s/big", JOURNAL_MAX_BATCH)])
                .is_none()
        );
        // A checkpoint is due: a wait too.
        s.journaled = CHECKPOINT_BATCHES;
        assert!(s.try_apply_stored(&[put(b"s/c", 10)]).is_none());
        assert_eq!(s.get(b"s/b").unwrap(), None);
        assert_eq!(s.get(b"s/big").unwrap(), None);
        assert_eq!(s.get(b"s/c").unwrap(), None);
        // What the blocking call then does: checkpoint, store, sync.
        s.apply_stored(&[put(b"s/c", 10)]).unwrap().wait().unwrap();
        assert_eq!(s.journaled, 1);
        let mut syncing = s.try_apply_stored(&[put(b"s/d", 10)]).unwrap().unwrap();
        syncing.wait().unwrap();
        // An ended sync calls back at once.
        let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = std::sync::Arc::clone(&called);
        syncing = s.try_apply_stored(&[put(b"s/e", 10)]).unwrap().unwrap();
        s.syncing.clone().unwrap().wait().unwrap();
        assert!(syncing.when_ended(Box::new(move || {
            c.store(true, std::sync::atomic::Ordering::SeqCst);
        })));
        assert!(called.load(std::sync::atomic::Ordering::SeqCst));
        drop(s);
        let s = FileStorage::open(&path, &unlock()).unwrap();
        for key in [b"s/a".as_slice(), b"s/c", b"s/d", b"s/e"] {
            assert_eq!(s.get(key).unwrap(), Some(vec![7; 10]), "{key:?}");
        }
    }

    #[test]
    fn the_file_holds_no_secret_and_no_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let c = ConversationId([1; 16]);
        let secret = [0x5eu8; 32];
        {
            let mut s = FileStorage::open(&path, &unlock()).unwrap();
            let mut r = record(c, 1);
            r.text = "zebra-quartz-marmalade".into();
            let mut ops = vec![
                StorageOp::Put {
                    key: keys::history_message(&c, &r.id),
                    value: encode(&r).unwrap(),
                },
                StorageOp::Put {
                    key: keys::history_order(&c, 1),
                    value: encode(&r.id).unwrap(),
                },
                StorageOp::Put {
                    key: b"s/identity".to_vec(),
                    value: secret.to_vec(),
                },
            ];
            s.apply(&ops).unwrap();
            // A second, unpacked write of the text (a lone message record).
            ops.truncate(1);
            s.apply(&ops).unwrap();
            assert_eq!(texts(&s, &c, None, 10), vec!["zebra-quartz-marmalade"]);
            assert_eq!(s.get(b"s/identity").unwrap(), Some(secret.to_vec()));
            // Both batches are in the journal too, sealed as in redb.
            let journal = std::fs::read(FileStorage::journal_path(&path)).unwrap();
            assert!(journal.len() > 100, "{}", journal.len());
            assert!(!contains(&journal, b"zebra-quartz"));
            assert!(!contains(&journal, &secret[..16]));
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(!contains(&bytes, b"zebra-quartz"));
        assert!(!contains(&bytes, &secret[..16]));
        // Reopened with its key, everything reads back.
        let s = FileStorage::open(&path, &unlock()).unwrap();
        assert_eq!(
            s.load_state().unwrap(),
            vec![(b"s/identity".to_vec(), secret.to_vec())]
        );
    }

    #[test]
    fn a_wrong_key_or_passphrase_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        FileStorage::open(&path, &unlock())
            .unwrap()
            .apply(&[StorageOp::Put {
                key: b"s/x".to_vec(),
                value: vec![1],
            }])
            .unwrap();
        let other = Unlock::Key(StoreKey::from_bytes([4; 32]));
        assert!(matches!(
            FileStorage::open(&path, &other),
            Err(StorageError::WrongKey(_))
        ));
        assert!(matches!(
            FileStorage::open(&path, &Unlock::passphrase("guess")),
            Err(StorageError::WrongKey(_))
        ));
        // A passphrase store (cheap parameters: the plumbing is tested here).
        let pass = |p: &str| Unlock::Passphrase {
            passphrase: zeroize::Zeroizing::new(p.into()),
            params: seal::KdfParams {
                m_kib: 256,
                t: 1,
                p: 1,
            },
        };
        let ppath = dir.path().join("p.redb");
        FileStorage::open(&ppath, &pass("open sesame"))
            .unwrap()
            .apply(&[StorageOp::Put {
                key: b"s/x".to_vec(),
                value: vec![2],
            }])
            .unwrap();
        let err = FileStorage::open(&ppath, &pass("open sesane")).unwrap_err();
        assert!(
            matches!(&err, StorageError::WrongKey(m) if m.contains("wrong passphrase")),
            "{err}"
        );
        assert!(matches!(
            FileStorage::open(&ppath, &unlock()),
            Err(StorageError::WrongKey(_))
        ));
        let s = FileStorage::open(&ppath, &pass("open sesame")).unwrap();
        assert_eq!(s.get(b"s/x").unwrap(), Some(vec![2]));
    }

    #[test]
    fn a_value_moved_to_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let c1 = ConversationId([1; 16]);
        let c2 = ConversationId([2; 16]);
        {
            let mut s = FileStorage::open(&path, &unlock()).unwrap();
            s.apply(&message_ops(c1, 1, 1)).unwrap();
            s.apply(&message_ops(c2, 2, 2)).unwrap();
            s.apply(&[
                StorageOp::Put {
                    key: b"s/session/old".to_vec(),
                    value: vec![1],
                },
                StorageOp::Put {
                    key: b"s/session/new".to_vec(),
                    value: vec![2],
                },
            ])
            .unwrap();
        }
        // Someone with write access to the file copies sealed values over
        // other keys: c1's pack into c2's, an old session over a new one.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(RECORDS).unwrap();
                let pack1 = t
                    .get(pack::pack_key(&c1, 1).as_slice())
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                t.insert(pack::pack_key(&c2, 2).as_slice(), pack1.as_slice())
                    .unwrap();
                let old = t
                    .get(b"s/session/old".as_slice())
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                t.insert(b"s/session/new".as_slice(), old.as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let s = FileStorage::open(&path, &unlock()).unwrap();
        assert_eq!(texts(&s, &c1, None, 10), vec!["text 1"]);
        assert!(matches!(
            history(&s, &c2, None, 10),
            Err(StorageError::Corrupt { .. })
        ));
        assert!(matches!(
            s.get(b"s/session/new"),
            Err(StorageError::Corrupt { key }) if key == keys::printable(b"s/session/new")
        ));
        assert!(matches!(s.load_state(), Err(StorageError::Corrupt { .. })));
    }

    fn put(key: &str, value: &str) -> StorageOp {
        StorageOp::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn delete(key: &str) -> StorageOp {
        StorageOp::Delete {
            key: key.as_bytes().to_vec(),
        }
    }

    /// Bytes of whole records in the journal of the store at `db`.
    fn journal_len(db: &Path) -> u64 {
        let bytes = std::fs::read(FileStorage::journal_path(db)).unwrap();
        super::journal::decode_all(&bytes).1 as u64
    }

    /// A store with `s/a` = 1 made durable, the redb file as that left it,
    /// then three journaled batches: returns the file, the store and what
    /// it holds.
    fn journaled_past_a_checkpoint(
        path: &Path,
    ) -> (Vec<u8>, FileStorage, Vec<crate::storage::Record>) {
        let mut s = FileStorage::open(path, &unlock()).unwrap();
        s.apply(&[put("s/a", "1")]).unwrap();
        s.checkpoint().unwrap();
        assert_eq!(journal_len(path), 0);
        let then = std::fs::read(path).unwrap();
        s.apply(&[put("s/a", "2"), put("s/b", "x")]).unwrap();
        s.apply(&[delete("s/b"), put("s/c", "y")]).unwrap();
        s.apply(&[put("s/d", "z")]).unwrap();
        assert!(journal_len(path) > 0);
        let want = s.load_state().unwrap();
        assert_eq!(want.len(), 3, "{want:?}");
        (then, s, want)
    }

    /// What a crash right after the last durable commit can leave: the redb
    /// file as it was then, and the journal (each batch synced in it before
    /// `apply` returned) as `journal` holds it.
    fn crash_image(then: &[u8], journal: &[u8], dir: &Path) -> std::path::PathBuf {
        let path = dir.join("crashed.redb");
        std::fs::write(&path, then).unwrap();
        std::fs::write(FileStorage::journal_path(&path), journal).unwrap();
        path
    }

    #[test]
    fn journaled_batches_come_back_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let (then, s, want) = journaled_past_a_checkpoint(&path);
        let journal = std::fs::read(FileStorage::journal_path(&path)).unwrap();
        let crashed = crash_image(&then, &journal, dir.path());
        // The redb file alone holds only what the checkpoint made durable.
        let alone = dir.path().join("alone.redb");
        std::fs::write(&alone, &then).unwrap();
        assert_eq!(raw_rows(&alone).1.len(), 1);
        let reopened = FileStorage::open(&crashed, &unlock()).unwrap();
        assert_eq!(reopened.load_state().unwrap(), want);
        // The replay is durable in redb, and the journal empty.
        assert_eq!(journal_len(&crashed), 0);
        drop(reopened);
        assert_eq!(raw_rows(&crashed).1.len(), 3);
        drop(s);
    }

    #[test]
    fn a_torn_last_batch_is_dropped_and_the_ones_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let (then, mut s, _) = journaled_past_a_checkpoint(&path);
        let two = journal_len(&path) as usize;
        let before = s.load_state().unwrap();
        s.apply(&[put("s/e", "torn")]).unwrap();
        let three = std::fs::read(FileStorage::journal_path(&path)).unwrap();
        let whole = super::journal::decode_all(&three).1;
        assert!(whole > two + 1);
        // The third record cut short, or its end zeros (never written in
        // the space the journal had zeroed ahead).
        let mut zeroed = three.clone();
        zeroed[whole - 5..whole].fill(0);
        for image in [
            three[..two + 1].to_vec(),
            three[..whole - 1].to_vec(),
            zeroed,
        ] {
            let crashed = crash_image(&then, &image, dir.path());
            let mut reopened = FileStorage::open(&crashed, &unlock()).unwrap();
            assert_eq!(reopened.load_state().unwrap(), before);
            // The store goes on from there: the next batch gets the torn
            // one's number, and is kept.
            reopened.apply(&[put("s/f", "after")]).unwrap();
            drop(reopened);
            let again = FileStorage::open(&crashed, &unlock()).unwrap();
            assert_eq!(again.get(b"s/f").unwrap(), Some(b"after".to_vec()));
            assert_eq!(again.get(b"s/e").unwrap(), None);
        }
        drop(s);
    }

    #[test]
    fn a_journal_with_a_batch_missing_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let (then, s, _) = journaled_past_a_checkpoint(&path);
        drop(s);
        // Durable up to record 1: records 2 and 4, without 3.
        let mut journal = super::journal::encode(2, &[(b"s/x", Some(b"sealed?"))]).unwrap();
        journal.extend(super::journal::encode(4, &[(b"s/y", None)]).unwrap());
        let crashed = crash_image(&then, &journal, dir.path());
        match FileStorage::open(&crashed, &unlock()) {
            Err(StorageError::Corrupt { key }) => assert!(key.contains("journal"), "{key}"),
            other => panic!("expected a corrupt journal, got {other:?}"),
        }
    }

    /// After a checkpoint the journal is written from its start again,
    /// over records redb already has; a crash then leaves new records
    /// followed by old ones, and a reopen replays the new ones only.
    #[test]
    fn batches_written_over_an_emptied_journal_come_back_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let mut s = FileStorage::open(&path, &unlock()).unwrap();
        // Values of one length: every record has the same size, so the new
        // records end exactly where an old, whole one begins.
        for i in 0..CHECKPOINT_BATCHES {
            s.apply(&[put("s/n", &format!("{i:05}"))]).unwrap();
        }
        assert_eq!(journal_len(&path), 0, "the last one was a checkpoint");
        let old = std::fs::read(FileStorage::journal_path(&path)).unwrap();
        // redb as that checkpoint left it.
        let then = std::fs::read(&path).unwrap();
        s.apply(&[put("s/n", "10000")]).unwrap();
        s.apply(&[put("s/n", "10001")]).unwrap();
        s.apply(&[put("s/m", "later")]).unwrap();
        let journal = std::fs::read(FileStorage::journal_path(&path)).unwrap();
        let (entries, whole) = super::journal::decode_all(&journal);
        assert_eq!(entries.len(), 3, "the new records only");
        assert_ne!(
            journal[whole..whole + 64],
            [0u8; 64],
            "old records follow the new ones"
        );
        assert_eq!(journal[whole..whole + 64], old[whole..whole + 64]);
        drop(s);
        let crashed = crash_image(&then, &journal, dir.path());
        let s = FileStorage::open(&crashed, &unlock()).unwrap();
        assert_eq!(s.get(b"s/n").unwrap(), Some(b"10001".to_vec()));
        assert_eq!(s.get(b"s/m").unwrap(), Some(b"later".to_vec()));
    }

    #[test]
    fn checkpoints_empty_the_journal_and_large_batches_skip_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        let mut s = FileStorage::open(&path, &unlock()).unwrap();
        for i in 0..CHECKPOINT_BATCHES - 1 {
            s.apply(&[put("s/n", &i.to_string())]).unwrap();
        }
        assert!(journal_len(&path) > 0);
        s.apply(&[put("s/n", "last")]).unwrap();
        assert_eq!(
            journal_len(&path),
            0,
            "a checkpoint every {CHECKPOINT_BATCHES}"
        );
        s.apply(&[put("s/small", "1")]).unwrap();
        assert!(journal_len(&path) > 0);
        let big = "b".repeat(JOURNAL_MAX_BATCH + 1);
        s.apply(&[put("h/big", &big)]).unwrap();
        assert_eq!(journal_len(&path), 0, "a large batch is a checkpoint");
        s.apply(&[put("s/small", "2")]).unwrap();
        drop(s);
        assert_eq!(journal_len(&path), 0, "closing is a checkpoint");
        let rows = raw_rows(&path).1;
        assert_eq!(rows.len(), 3);
        let s = FileStorage::open(&path, &unlock()).unwrap();
        assert_eq!(s.get(b"s/small").unwrap(), Some(b"2".to_vec()));
        assert_eq!(s.get(b"s/n").unwrap(), Some(b"last".to_vec()));
        assert_eq!(s.get(b"h/big").unwrap(), Some(big.into_bytes()));
    }

    #[test]
    fn a_format_3_store_opens_without_sealing_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        {
            let mut s = FileStorage::open(&path, &unlock()).unwrap();
            s.apply(&[put("s/a", "kept")]).unwrap();
        }
        let sealed_before = raw_rows(&path).1;
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(INFO).unwrap().insert(FORMAT_KEY, 3).unwrap();
            txn.commit().unwrap();
        }
        {
            let s = FileStorage::open(&path, &unlock()).unwrap();
            assert_eq!(s.get(b"s/a").unwrap(), Some(b"kept".to_vec()));
        }
        let (format, rows) = raw_rows(&path);
        assert_eq!(format, Some(FILE_FORMAT));
        assert_eq!(rows, sealed_before);
    }

    #[test]
    fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(INFO)
                .unwrap()
                .insert(FORMAT_KEY, FILE_FORMAT + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = FileStorage::open(&path, &unlock()).unwrap_err();
        assert!(
            err.to_string().contains("unsupported client store format"),
            "{err}"
        );
    }
}
