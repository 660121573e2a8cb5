//! Packed history for IndexedDB: the shared codec of
//! [`crate::storage::pack`] with the browser's pack size bound.
//!
//! Chromium stores a value above 64 KiB as a file of its own (a blob, written
//! and synced before the transaction commits) instead of inside its LevelDB.
//! For the catch-up's large packs that is the cheaper path: a record costs
//! the browser process per `put` and LevelDB per byte, a blob file neither.
//! Measured in Chromium 156 (catch-up of 100,000 × 1 KiB, pages of 1,000):
//! packs of up to 256 KiB took the browser process's CPU from 0.72 s to
//! 0.40 s against packs below 60 KiB, and the catch-up from 4.2 s to 3.2 s;
//! packs of up to 1 MiB were slower again (3.7 s). The native store uses the
//! same bound.

use crate::storage::StorageOp;
pub(crate) use crate::storage::pack::Write;

/// A pack is closed before it grows past this (unless it holds one message).
pub(crate) const PACK_MAX_BYTES: usize = 256 * 1024;

/// The IndexedDB writes for one batch (see [`crate::storage::pack::pack_batch`]).
pub(crate) fn pack_batch(batch: &[StorageOp]) -> Vec<Write<'_>> {
    crate::storage::pack::pack_batch(batch, PACK_MAX_BYTES)
}
