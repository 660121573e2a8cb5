//! The blob rules both stores share (see [`super::Store::blob_put`]).

use super::{BlobLimits, BlobMeta, BlobWrite, StoreError};

/// What a put does once [`plan_put`] accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PutPlan {
    /// The blob's state after the put.
    pub meta: BlobMeta,
    /// The blob is new (create its rows).
    pub create: bool,
    /// Leading bytes of the put that lie below the committed length: the
    /// caller compares them with the stored ones before writing anything.
    pub overlap: usize,
}

/// The store-wide cap a new blob must fit under: bytes already counted
/// against `max_store_bytes` (envelopes and blobs, including what the put
/// frees by replacing an expired blob), and the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoreRoom {
    /// Bytes counted now, after anything the put frees.
    pub stored: u64,
    /// `StoreLimits::max_store_bytes`.
    pub max: u64,
}

/// Whether a new blob of declared size `total_len` fits under the cap.
pub(crate) fn admit_store(room: StoreRoom, total_len: u64) -> Result<(), StoreError> {
    match room.stored.checked_add(super::blob_cost(total_len)) {
        Some(total) if total <= room.max => Ok(()),
        _ => Err(StoreError::StoreFull),
    }
}

/// Decide a put against the stored blob (`existing`, already `None` if
/// expired). `usage` gives the owner's unexpired blobs (count, declared
/// bytes) and `room` the store-wide count; both are asked only when a
/// blob is created, which is also when its [`super::blob_cost`] is charged.
pub(crate) fn plan_put(
    existing: Option<BlobMeta>,
    put: &BlobWrite<'_>,
    limits: &BlobLimits,
    now_ms: u64,
    usage: impl FnOnce() -> Result<(u64, u64), StoreError>,
    room: impl FnOnce() -> Result<StoreRoom, StoreError>,
) -> Result<PutPlan, StoreError> {
    let len = put.bytes.len() as u64;
    let Some(meta) = existing else {
        if put.offset != 0 {
            return Err(StoreError::UnknownBlob);
        }
        if put.total_len > limits.max_blob_bytes {
            return Err(StoreError::BlobLimit(format!(
                "blob of {} bytes exceeds {}",
                put.total_len, limits.max_blob_bytes
            )));
        }
        let (count, bytes) = usage()?;
        if count >= u64::from(limits.max_blobs_per_device) {
            return Err(StoreError::BlobLimit(format!(
                "this device already has {count} open blobs"
            )));
        }
        if bytes.saturating_add(put.total_len) > limits.max_blob_bytes_per_device {
            return Err(StoreError::BlobLimit(format!(
                "this device's open blobs would exceed {} bytes",
                limits.max_blob_bytes_per_device
            )));
        }
        admit_store(room()?, put.total_len)?;
        return Ok(PutPlan {
            meta: BlobMeta {
                owner: put.owner,
                total_len: put.total_len,
                committed: len,
                created_at_ms: now_ms,
                expires_at_ms: now_ms.saturating_add(limits.ttl_ms),
            },
            create: true,
            overlap: 0,
        });
    };
    if meta.owner != put.owner {
        return Err(StoreError::BlobForbidden(
            "the blob belongs to another device",
        ));
    }
    if meta.total_len != put.total_len {
        return Err(StoreError::BlobMismatch(
            "total_len differs from the blob's",
        ));
    }
    if put.offset > meta.committed {
        return Err(StoreError::BlobMismatch("offset past the committed length"));
    }
    let overlap = (meta.committed - put.offset).min(len);
    let end = put.offset + len;
    Ok(PutPlan {
        meta: BlobMeta {
            committed: meta.committed.max(end),
            ..meta
        },
        create: false,
        overlap: usize::try_from(overlap).unwrap_or(usize::MAX),
    })
}

/// A stored blob, unless it has expired.
pub(crate) fn live(meta: Option<BlobMeta>, now_ms: u64) -> Option<BlobMeta> {
    meta.filter(|m| m.expires_at_ms > now_ms)
}

/// The `[offset, offset + max) ∩ [0, committed)` range of a read.
pub(crate) fn read_range(meta: &BlobMeta, offset: u64, max: usize) -> (u64, u64) {
    let end = offset.saturating_add(max as u64).min(meta.committed);
    (offset, end.max(offset))
}
