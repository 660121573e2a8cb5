//! Blobs (history-transfer archives): one `hush_blobs` row per blob and one
//! `hush_blob_chunks` row per appended piece, keyed by its offset.
//!
//! The rules are the shared ones of [`crate::store::blobs`]; what this file
//! adds is how they hold with several nodes writing at once:
//! - a put locks the blob's row (`FOR UPDATE`), so two puts to one blob are
//!   applied one after the other and `committed` only ever grows by appended
//!   pieces that never overlap;
//! - creating a blob first takes a transaction-scoped advisory lock derived
//!   from the owner's id, so two nodes creating blobs for one device at once
//!   cannot both pass the per-device count and byte limits.

use super::super::blobs;
use super::super::{BlobLimits, BlobMeta, BlobWrite, StoreError, blob_cost};
use super::pool::TxError;
use super::{PgStore, array, db_u64, from_db};
use hush_protocol::{BlobId, DeviceId};
use tokio_postgres::{IsolationLevel, Transaction};

/// Columns of `hush_blobs` read back into a [`BlobMeta`], in order.
const META_COLUMNS: &str = "owner, total_len, committed, created_at_ms, expires_at_ms";

/// Advisory-lock namespace of blob creation (`blob` in ASCII), combined with
/// the owner's id so different owners never wait for each other.
const BLOB_LOCK: i64 = 0x626c_6f62;

fn meta_of(row: &tokio_postgres::Row) -> Result<BlobMeta, StoreError> {
    let owner: Vec<u8> = row.get(0);
    Ok(BlobMeta {
        owner: DeviceId(array::<16>(&owner, "blob owner")?),
        total_len: from_db(row.get(1)),
        committed: from_db(row.get(2)),
        created_at_ms: from_db(row.get(3)),
        expires_at_ms: from_db(row.get(4)),
    })
}

/// The stored bytes `[start, end)` of a blob, assembled from the pieces that
/// overlap the range. Pieces never overlap each other, and the committed
/// prefix has no holes, so the result has exactly `end - start` bytes unless
/// the rows were damaged.
async fn read_bytes(
    tx: &Transaction<'_>,
    blob: &[u8],
    start: u64,
    end: u64,
) -> Result<Vec<u8>, TxError> {
    let mut out = Vec::with_capacity(usize::try_from(end - start).unwrap_or(0));
    if end <= start {
        return Ok(out);
    }
    let rows = tx
        .query(
            "SELECT \"offset\", bytes FROM hush_blob_chunks \
             WHERE blob = $1 AND \"offset\" < $3 \
             AND \"offset\" + octet_length(bytes) > $2 ORDER BY \"offset\"",
            &[&blob, &db_u64(start), &db_u64(end)],
        )
        .await?;
    let mut at = start;
    for row in rows {
        let offset = from_db(row.get(0));
        let bytes: Vec<u8> = row.get(1);
        if offset > at {
            break;
        }
        let from = usize::try_from(at - offset).unwrap_or(usize::MAX);
        let to = usize::try_from(end.min(offset + bytes.len() as u64) - offset).unwrap_or(0);
        let piece = bytes.get(from..to).unwrap_or_default();
        out.extend_from_slice(piece);
        at += piece.len() as u64;
    }
    if at != end {
        return Err(TxError::Store(StoreError::Backend(
            "postgres store: a blob's committed bytes have a hole".into(),
        )));
    }
    Ok(out)
}

impl PgStore {
    pub(super) async fn blob_put_async(
        &self,
        put: &BlobWrite<'_>,
        limits: &BlobLimits,
        now_ms: u64,
    ) -> Result<BlobMeta, StoreError> {
        let blob = put.blob.as_bytes().as_slice();
        let owner = put.owner.as_bytes().as_slice();
        let now = db_u64(now_ms);
        let stripe = self.next_stripe();
        let max_store_bytes = self.limits.max_store_bytes;
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                let row = tx
                    .query_opt(
                        &format!("SELECT {META_COLUMNS} FROM hush_blobs WHERE blob = $1 FOR UPDATE"),
                        &[&blob],
                    )
                    .await?;
                let stored = row.as_ref().map(meta_of).transpose()?;
                let existing = blobs::live(stored, now_ms);
                let mut usage = None;
                let mut room = None;
                // An expired blob with this id is replaced: its bytes are freed.
                let freed = match (stored, existing) {
                    (Some(old), None) => blob_cost(old.total_len),
                    _ => 0,
                };
                if existing.is_none() && put.offset == 0 {
                    let mut key = [0u8; 8];
                    key.copy_from_slice(put.owner.as_bytes().get(..8).unwrap_or(&[0; 8]));
                    let lock = i64::from_be_bytes(key) ^ BLOB_LOCK;
                    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
                        .await?;
                    let u = tx
                        .query_one(
                            "SELECT count(*), coalesce(sum(total_len), 0)::bigint FROM hush_blobs \
                             WHERE owner = $1 AND expires_at_ms > $2 AND blob <> $3",
                            &[&owner, &now, &blob],
                        )
                        .await?;
                    usage = Some((from_db(u.get(0)), from_db(u.get(1))));
                    let counted = if max_store_bytes == u64::MAX {
                        0
                    } else {
                        let total: i64 = tx
                            .query_one(
                                "SELECT coalesce(sum(stored), 0)::bigint FROM hush_totals",
                                &[],
                            )
                            .await?
                            .get(0);
                        from_db(total)
                    };
                    room = Some(blobs::StoreRoom {
                        stored: counted.saturating_sub(freed),
                        max: max_store_bytes,
                    });
                }
                let plan = blobs::plan_put(
                    existing,
                    put,
                    limits,
                    now_ms,
                    || usage.ok_or_else(|| StoreError::Backend("blob usage was not read".into())),
                    || room.ok_or_else(|| StoreError::Backend("store total was not read".into())),
                )?;
                if plan.create {
                    // An expired blob with this id is replaced.
                    if stored.is_some() {
                        tx.execute("DELETE FROM hush_blob_chunks WHERE blob = $1", &[&blob])
                            .await?;
                        tx.execute("DELETE FROM hush_blobs WHERE blob = $1", &[&blob])
                            .await?;
                    }
                    tx.execute(
                        "INSERT INTO hush_blobs (blob, owner, total_len, committed, \
                         created_at_ms, expires_at_ms) VALUES ($1, $2, $3, 0, $4, $5)",
                        &[
                            &blob,
                            &owner,
                            &db_u64(plan.meta.total_len),
                            &db_u64(plan.meta.created_at_ms),
                            &db_u64(plan.meta.expires_at_ms),
                        ],
                    )
                    .await?;
                    // Charge the new blob, release the replaced one.
                    let delta = i64::try_from(blob_cost(plan.meta.total_len))
                        .unwrap_or(i64::MAX)
                        .saturating_sub(i64::try_from(freed).unwrap_or(i64::MAX));
                    tx.execute(
                        "UPDATE hush_totals SET stored = stored + $2 WHERE stripe = $1",
                        &[&stripe, &delta],
                    )
                    .await?;
                } else if plan.overlap > 0 {
                    let end = put.offset + plan.overlap as u64;
                    let have = read_bytes(tx, blob, put.offset, end).await?;
                    if have.as_slice() != put.bytes.get(..plan.overlap).unwrap_or_default() {
                        return Err(TxError::Store(StoreError::BlobForbidden(
                            "the bytes differ from the committed ones",
                        )));
                    }
                }
                let fresh = put.bytes.get(plan.overlap..).unwrap_or_default();
                if !fresh.is_empty() {
                    tx.execute(
                        "INSERT INTO hush_blob_chunks (blob, \"offset\", bytes) VALUES ($1, $2, $3)",
                        &[&blob, &db_u64(put.offset + plan.overlap as u64), &fresh],
                    )
                    .await?;
                    tx.execute(
                        "UPDATE hush_blobs SET committed = $2 WHERE blob = $1",
                        &[&blob, &db_u64(plan.meta.committed)],
                    )
                    .await?;
                }
                Ok::<_, TxError>(plan.meta)
            })
            .await
    }

    pub(super) async fn blob_read_async(
        &self,
        blob: &BlobId,
        offset: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Option<(BlobMeta, Vec<u8>)>, StoreError> {
        let blob = blob.as_bytes().as_slice();
        self.pool
            .transaction(IsolationLevel::RepeatableRead, true, async |tx| {
                let row = tx
                    .query_opt(
                        &format!("SELECT {META_COLUMNS} FROM hush_blobs WHERE blob = $1"),
                        &[&blob],
                    )
                    .await?;
                let Some(meta) = blobs::live(row.as_ref().map(meta_of).transpose()?, now_ms) else {
                    return Ok(None);
                };
                let (a, b) = blobs::read_range(&meta, offset, max);
                let bytes = read_bytes(tx, blob, a, b).await?;
                Ok::<_, TxError>(Some((meta, bytes)))
            })
            .await
    }

    pub(super) async fn purge_blobs_async(
        &self,
        now_ms: u64,
        max: usize,
    ) -> Result<u64, StoreError> {
        let now = db_u64(now_ms);
        let max = db_u64(max as u64);
        let stripe = self.next_stripe();
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                let gone = tx
                    .query_one(
                        "WITH v AS (SELECT blob FROM hush_blobs WHERE expires_at_ms <= $1 \
                         ORDER BY expires_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED), \
                         c AS (DELETE FROM hush_blob_chunks WHERE blob IN (SELECT blob FROM v)), \
                         d AS (DELETE FROM hush_blobs WHERE blob IN (SELECT blob FROM v) \
                         RETURNING total_len) \
                         SELECT count(*), coalesce(sum(total_len), 0)::bigint FROM d",
                        &[&now, &max],
                    )
                    .await?;
                let count: u64 = from_db(gone.get(0));
                let bytes: u64 = from_db(gone.get(1));
                if count > 0 {
                    // The blobs' share of the store-cap count (see `blob_cost`).
                    let freed = bytes.saturating_add(count.saturating_mul(blob_cost(0)));
                    tx.execute(
                        "UPDATE hush_totals SET stored = stored - $2 WHERE stripe = $1",
                        &[&stripe, &db_u64(freed)],
                    )
                    .await?;
                }
                Ok::<_, TxError>(count)
            })
            .await
    }
}
