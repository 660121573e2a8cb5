//! The native file-backed [`Storage`]: one redb database file.
//!
//! redb gives exactly the contract the engine needs: a batch is one write
//! transaction committed with immediate durability (fsync before `apply`
//! returns), pages are checksummed, and a file left by a crash mid-commit is
//! repaired on the next open (the last committed transaction wins; a torn
//! tail is discarded). A file that is not a redb database, or holds a
//! different format, is a typed [`StorageError`], never a panic.

use super::{Storage, StorageOp};
use crate::error::StorageError;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const INFO: TableDefinition<&str, u32> = TableDefinition::new("info");
const FORMAT_KEY: &str = "format";
/// Version of the file layout this build reads and writes.
pub const FILE_FORMAT: u32 = 1;

fn backend<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Backend(format!("redb: {e}"))
}

/// A redb-backed store at a path.
pub struct FileStorage {
    db: Database,
}

impl std::fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorage").finish_non_exhaustive()
    }
}

impl FileStorage {
    /// Open (or create) the database at `path`. Fails with a typed error if the
    /// file is not a Hush client store, is corrupt beyond repair, or is open
    /// in another process.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let db = Database::create(path).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(RECORDS).map_err(backend)?;
            let mut info = txn.open_table(INFO).map_err(backend)?;
            let stored = info.get(FORMAT_KEY).map_err(backend)?.map(|g| g.value());
            match stored {
                Some(FILE_FORMAT) => {}
                Some(other) => {
                    return Err(StorageError::Backend(format!(
                        "unsupported client store format {other} (this build reads {FILE_FORMAT})"
                    )));
                }
                None => {
                    info.insert(FORMAT_KEY, FILE_FORMAT).map_err(backend)?;
                }
            }
        }
        txn.commit().map_err(backend)?;
        Ok(FileStorage { db })
    }
}

impl Storage for FileStorage {
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<super::Record>, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let mut out = Vec::new();
        for row in table.range(prefix..).map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn scan_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<super::Record>, StorageError> {
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
                out.push((k.value().to_vec(), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        Ok(table.get(key).map_err(backend)?.map(|g| g.value().to_vec()))
    }

    fn apply(&mut self, batch: &[StorageOp]) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(backend)?;
        txn.set_durability(Durability::Immediate).map_err(backend)?;
        {
            let mut table = txn.open_table(RECORDS).map_err(backend)?;
            // In key order: neighbouring inserts land in the same B-tree
            // pages (a page of history is 200 appends spread over a few
            // conversations). The sort is stable, so several ops on one key
            // keep their order and the last one wins, as in batch order.
            let mut ordered: Vec<&StorageOp> = batch.iter().collect();
            ordered.sort_by(|a, b| a.key().cmp(b.key()));
            for op in ordered {
                match op {
                    StorageOp::Put { key, value } => {
                        table
                            .insert(key.as_slice(), value.as_slice())
                            .map_err(backend)?;
                    }
                    StorageOp::Delete { key } => {
                        table.remove(key.as_slice()).map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_survive_reopen_and_scans_respect_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.redb");
        {
            let mut s = FileStorage::open(&path).unwrap();
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
        let s = FileStorage::open(&path).unwrap();
        assert_eq!(s.load_state().unwrap(), vec![(b"s/x".to_vec(), vec![9])]);
        let back = s.scan_back(b"h/", Some(&[b'h', b'/', 4]), 2).unwrap();
        let keys: Vec<u8> = back.iter().map(|(k, _)| k[2]).collect();
        assert_eq!(keys, vec![3, 1]);
        assert_eq!(s.get(&[b'h', b'/', 2]).unwrap(), None);
    }

    #[test]
    fn the_last_op_on_a_key_wins_within_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStorage::open(dir.path().join("client.redb")).unwrap();
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
            let mut s = FileStorage::open(&path).unwrap();
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
            if let Ok(s) = FileStorage::open(&torn) {
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
            FileStorage::open(&path),
            Err(StorageError::Backend(_))
        ));
    }
}
