//! Packed history for IndexedDB: the shared codec of
//! [`crate::storage::pack`] with the browser's pack size bound.
//!
//! Chromium stores values above 64 KiB as separate blob files, which costs
//! more than several records below it (measured: 100,000 × 1 KiB in 500
//! transactions, one 230 KB pack each 0.59–0.66 s, four 57 KB packs each
//! 0.42–0.44 s), so a browser pack is closed before it grows past 60 KiB.

use crate::storage::StorageOp;
pub(crate) use crate::storage::pack::Write;

/// A pack is closed before it grows past this (below the blob threshold).
pub(crate) const PACK_MAX_BYTES: usize = 60 * 1024;

/// The IndexedDB writes for one batch (see [`crate::storage::pack::pack_batch`]).
pub(crate) fn pack_batch(batch: &[StorageOp]) -> Vec<Write<'_>> {
    crate::storage::pack::pack_batch(batch, PACK_MAX_BYTES)
}
