//! An in-memory [`Storage`]: for tests and the simulator.
//!
//! Cloning it snapshots the whole store, which is how the simulator models a
//! crash: the engine is dropped, the storage (holding exactly the batches the
//! driver applied) survives.

use super::{Storage, StorageOp};
use crate::error::StorageError;
use std::collections::BTreeMap;

/// A `BTreeMap` behind the [`Storage`] trait. Batches apply atomically
/// (they cannot fail).
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    batches: u64,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// How many batches were applied (tests check that steps write once).
    pub fn batches_applied(&self) -> u64 {
        self.batches
    }

    /// Every record (tests scan them, e.g. for plaintext).
    pub fn records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.records
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }
}

impl Storage for MemoryStorage {
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<super::Record>, StorageError> {
        Ok(self
            .records
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<super::Record>, StorageError> {
        let upper = match (before, super::keys::prefix_end(prefix)) {
            (Some(b), Some(end)) => Some(b.to_vec().min(end)),
            (Some(b), None) => Some(b.to_vec()),
            (None, end) => end,
        };
        let iter: Box<dyn DoubleEndedIterator<Item = (&Vec<u8>, &Vec<u8>)>> = match upper {
            Some(u) => Box::new(self.records.range(prefix.to_vec()..u)),
            None => Box::new(self.records.range(prefix.to_vec()..)),
        };
        Ok(iter
            .rev()
            .filter(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.records.get(key).cloned())
    }

    fn apply(&mut self, batch: &[StorageOp]) -> Result<(), StorageError> {
        for op in batch {
            match op {
                StorageOp::Put { key, value } => {
                    self.records.insert(key.clone(), value.clone());
                }
                StorageOp::Delete { key } => {
                    self.records.remove(key);
                }
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// Memory never waits.
    fn try_apply_stored(
        &mut self,
        batch: &[StorageOp],
    ) -> Option<Result<super::Syncing, StorageError>> {
        Some(self.apply(batch).map(|()| super::Syncing::done()))
    }
}
