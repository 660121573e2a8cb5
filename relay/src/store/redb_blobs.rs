//! Blobs in the redb file (`docs/STORAGE.md`, "Blobs"): four small tables,
//! the bytes in `blob_chunks` rows of at most one chunk each. Blobs do not
//! use the envelope segments: they are written once, read a few times and
//! deleted whole, which B-tree rows handle without compaction.

use super::super::blobs::{StoreRoom, live, plan_put, read_range};
use super::super::tables::{BLOB_CHUNKS, BLOB_EXPIRY, BLOB_OWNERS, BLOBS};
use super::super::{BlobLimits, BlobMeta, BlobWrite, StoreError, blob_cost};
use super::Changed;
use hush_protocol::{BlobId, DeviceId};
use redb::{ReadTransaction, ReadableTable, WriteTransaction};

const META_LEN: usize = 48;

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("corrupt {what}"))
}

fn be(bytes: &[u8], at: usize) -> Result<u64, StoreError> {
    let mut b = [0u8; 8];
    b.copy_from_slice(bytes.get(at..at + 8).ok_or_else(|| corrupt("blob row"))?);
    Ok(u64::from_be_bytes(b))
}

fn encode_meta(m: &BlobMeta) -> [u8; META_LEN] {
    let mut out = [0u8; META_LEN];
    out[..16].copy_from_slice(m.owner.as_bytes());
    out[16..24].copy_from_slice(&m.total_len.to_be_bytes());
    out[24..32].copy_from_slice(&m.committed.to_be_bytes());
    out[32..40].copy_from_slice(&m.created_at_ms.to_be_bytes());
    out[40..48].copy_from_slice(&m.expires_at_ms.to_be_bytes());
    out
}

fn decode_meta(v: &[u8]) -> Result<BlobMeta, StoreError> {
    if v.len() != META_LEN {
        return Err(corrupt("blob row"));
    }
    let mut owner = [0u8; 16];
    owner.copy_from_slice(&v[..16]);
    Ok(BlobMeta {
        owner: DeviceId(owner),
        total_len: be(v, 16)?,
        committed: be(v, 24)?,
        created_at_ms: be(v, 32)?,
        expires_at_ms: be(v, 40)?,
    })
}

fn chunk_key(blob: &BlobId, offset: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(blob.as_bytes());
    k[16..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn owner_key(owner: &DeviceId, blob: &BlobId) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(owner.as_bytes());
    k[16..].copy_from_slice(blob.as_bytes());
    k
}

fn expiry_key(expires_at_ms: u64, blob: &BlobId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    k[8..].copy_from_slice(blob.as_bytes());
    k
}

/// Bytes `[a, b)` of a blob from its chunk rows.
fn read_bytes<T>(chunks: &T, blob: &BlobId, a: u64, b: u64) -> Result<Vec<u8>, StoreError>
where
    T: ReadableTable<&'static [u8; 24], &'static [u8]>,
{
    let mut out = Vec::new();
    if a >= b {
        return Ok(out);
    }
    // The row holding byte `a` starts at or below it.
    let first = chunks
        .range::<&[u8; 24]>(&chunk_key(blob, 0)..=&chunk_key(blob, a))?
        .next_back()
        .transpose()?
        .map_or(0, |(k, _)| {
            u64::from_be_bytes(k.value()[16..].try_into().unwrap_or([0; 8]))
        });
    for item in chunks.range::<&[u8; 24]>(&chunk_key(blob, first)..=&chunk_key(blob, u64::MAX))? {
        let (k, v) = item?;
        let start = u64::from_be_bytes(k.value()[16..].try_into().unwrap_or([0; 8]));
        if start >= b {
            break;
        }
        let v = v.value();
        let end = start + v.len() as u64;
        let from = a.max(start) - start;
        let to = b.min(end).saturating_sub(start);
        if from < to {
            out.extend_from_slice(
                v.get(from as usize..to as usize)
                    .ok_or_else(|| corrupt("blob chunk"))?,
            );
        }
    }
    if out.len() as u64 != b - a {
        return Err(corrupt("blob chunks (missing bytes)"));
    }
    Ok(out)
}

/// Remove a blob and everything of it.
fn delete(txn: &WriteTransaction, blob: &BlobId, meta: &BlobMeta) -> Result<(), StoreError> {
    txn.open_table(BLOBS)?.remove(blob.as_bytes())?;
    txn.open_table(BLOB_OWNERS)?
        .remove(&owner_key(&meta.owner, blob))?;
    txn.open_table(BLOB_EXPIRY)?
        .remove(&expiry_key(meta.expires_at_ms, blob))?;
    let mut chunks = txn.open_table(BLOB_CHUNKS)?;
    chunks
        .retain_in::<&[u8; 24], _>(&chunk_key(blob, 0)..=&chunk_key(blob, u64::MAX), |_, _| {
            false
        })?;
    Ok(())
}

/// What a put did to the store-cap count.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CostChange {
    /// Charged for a blob the put created.
    pub added: u64,
    /// Released by an expired blob the put replaced.
    pub freed: u64,
}

/// Sum of [`blob_cost`] over every stored blob, expired or not (until
/// purged, its bytes are on disk): the blobs' share of the store-cap count
/// when the store opens.
pub(super) fn counted(txn: &ReadTransaction) -> Result<u64, StoreError> {
    let mut sum = 0u64;
    for item in txn.open_table(BLOBS)?.iter()? {
        let (_, v) = item?;
        sum = sum.saturating_add(blob_cost(decode_meta(v.value())?.total_len));
    }
    Ok(sum)
}

/// Apply one put. `room` is the store-cap count and cap before the put.
pub(super) fn put(
    txn: &WriteTransaction,
    put: &BlobWrite<'_>,
    limits: &BlobLimits,
    now_ms: u64,
    room: StoreRoom,
) -> Result<((BlobMeta, CostChange), Changed), StoreError> {
    let stored = txn
        .open_table(BLOBS)?
        .get(put.blob.as_bytes())?
        .map(|g| decode_meta(g.value()))
        .transpose()?;
    let existing = live(stored, now_ms);
    let mut cost = CostChange::default();
    if let (Some(old), None) = (stored, existing) {
        // Expired but not purged yet: it is gone.
        delete(txn, &put.blob, &old)?;
        cost.freed = blob_cost(old.total_len);
    }
    let room = StoreRoom {
        stored: room.stored.saturating_sub(cost.freed),
        ..room
    };
    let plan = plan_put(
        existing,
        put,
        limits,
        now_ms,
        || {
            let owners = txn.open_table(BLOB_OWNERS)?;
            let blobs = txn.open_table(BLOBS)?;
            let mut usage = (0u64, 0u64);
            let from = owner_key(&put.owner, &BlobId([0; 16]));
            let to = owner_key(&put.owner, &BlobId([0xff; 16]));
            for item in owners.range::<&[u8; 32]>(&from..=&to)? {
                let (k, _) = item?;
                let mut id = [0u8; 16];
                id.copy_from_slice(&k.value()[16..]);
                if let Some(m) = blobs
                    .get(&id)?
                    .map(|g| decode_meta(g.value()))
                    .transpose()?
                    && m.expires_at_ms > now_ms
                {
                    usage.0 += 1;
                    usage.1 = usage.1.saturating_add(m.total_len);
                }
            }
            Ok(usage)
        },
        || Ok(room),
    )?;
    let mut chunks = txn.open_table(BLOB_CHUNKS)?;
    let start = put.offset + plan.overlap as u64;
    if plan.overlap > 0 {
        let stored = read_bytes(&chunks, &put.blob, put.offset, start)?;
        if put.bytes.get(..plan.overlap) != Some(stored.as_slice()) {
            return Err(StoreError::BlobForbidden(
                "the bytes differ from the committed ones",
            ));
        }
    }
    let rest = put.bytes.get(plan.overlap..).unwrap_or_default();
    if rest.is_empty() && !plan.create {
        return Ok(((plan.meta, cost), Changed::No));
    }
    if !rest.is_empty() {
        chunks.insert(&chunk_key(&put.blob, start), rest)?;
    }
    if plan.create {
        cost.added = blob_cost(plan.meta.total_len);
        txn.open_table(BLOB_OWNERS)?
            .insert(&owner_key(&put.owner, &put.blob), ())?;
        txn.open_table(BLOB_EXPIRY)?
            .insert(&expiry_key(plan.meta.expires_at_ms, &put.blob), ())?;
    }
    txn.open_table(BLOBS)?
        .insert(put.blob.as_bytes(), encode_meta(&plan.meta).as_slice())?;
    Ok(((plan.meta, cost), Changed::Yes))
}

pub(super) fn read(
    txn: &ReadTransaction,
    blob: &BlobId,
    offset: u64,
    max: usize,
    now_ms: u64,
) -> Result<Option<(BlobMeta, Vec<u8>)>, StoreError> {
    let stored = txn
        .open_table(BLOBS)?
        .get(blob.as_bytes())?
        .map(|g| decode_meta(g.value()))
        .transpose()?;
    let Some(meta) = live(stored, now_ms) else {
        return Ok(None);
    };
    let (a, b) = read_range(&meta, offset, max);
    let bytes = read_bytes(&txn.open_table(BLOB_CHUNKS)?, blob, a, b)?;
    Ok(Some((meta, bytes)))
}

/// Delete up to `max` expired blobs; returns how many and the
/// [`blob_cost`] they released.
pub(super) fn purge(
    txn: &WriteTransaction,
    now_ms: u64,
    max: usize,
) -> Result<((u64, u64), Changed), StoreError> {
    let mut freed = 0u64;
    let due: Vec<BlobId> = {
        let expiry = txn.open_table(BLOB_EXPIRY)?;
        let upper = expiry_key(now_ms, &BlobId([0xff; 16]));
        let mut out = Vec::new();
        for item in expiry.range::<&[u8; 24]>(..=&upper)?.take(max) {
            let (k, _) = item?;
            let mut id = [0u8; 16];
            id.copy_from_slice(&k.value()[8..]);
            out.push(BlobId(id));
        }
        out
    };
    for blob in &due {
        let meta = txn
            .open_table(BLOBS)?
            .get(blob.as_bytes())?
            .map(|g| decode_meta(g.value()))
            .transpose()?;
        match meta {
            Some(m) => {
                delete(txn, blob, &m)?;
                freed = freed.saturating_add(blob_cost(m.total_len));
            }
            None => return Err(corrupt("blob_expiry row without its blob")),
        }
    }
    let changed = if due.is_empty() {
        Changed::No
    } else {
        Changed::Yes
    };
    Ok(((due.len() as u64, freed), changed))
}
