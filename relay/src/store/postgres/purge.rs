//! Retention purge, in one transaction per call.
//!
//! `hush_inboxes.purge_at` holds the expiry of each non-empty inbox's oldest
//! envelope (the redb store's purge queue), indexed by `(purge_at, device)`.
//! A pass takes inboxes in that order, removes each one's expired prefix into
//! tombstones, and moves its `purge_at` to the next envelope. Inboxes another
//! node is purging or writing are skipped (`FOR UPDATE SKIP LOCKED`), never
//! waited for. Then it drops expired dedup rows, oldest expiry first.

use super::super::{PurgeStats, StoreError, stored_cost};
use super::pool::TxError;
use super::{PgStore, db_u64, from_db};
use tokio_postgres::IsolationLevel;

impl PgStore {
    pub(super) async fn purge_async(
        &self,
        now_ms: u64,
        max: usize,
    ) -> Result<PurgeStats, StoreError> {
        let now = db_u64(now_ms);
        let max = max as u64;
        let stripe = self.next_stripe();
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                let mut stats = PurgeStats::default();
                let (mut gone_depth, mut gone_cost) = (0u64, 0u64);
                // Inboxes this pass already went through and left locked.
                let mut seen: Vec<Vec<u8>> = Vec::new();
                while stats.expired < max {
                    let Some(row) = tx
                        .query_opt(
                            "SELECT device, head, depth FROM hush_inboxes \
                             WHERE purge_at IS NOT NULL AND purge_at <= $1 \
                             AND NOT (device = ANY($2)) \
                             ORDER BY purge_at, device LIMIT 1 FOR UPDATE SKIP LOCKED",
                            &[&now, &seen],
                        )
                        .await?
                    else {
                        break;
                    };
                    let device: Vec<u8> = row.get(0);
                    let (head, depth) = (from_db(row.get(1)), from_db(row.get(2)));
                    let budget = max - stats.expired;
                    // The expired prefix ends at the first unexpired envelope.
                    let stop = tx
                        .query_opt(
                            "SELECT seq FROM hush_envelopes \
                             WHERE device = $1 AND expires_at_ms > $2 ORDER BY seq LIMIT 1",
                            &[&device, &now],
                        )
                        .await?
                        .map_or(head.saturating_add(1), |r| from_db(r.get(0)));
                    let lowest = head.saturating_sub(depth).saturating_add(1);
                    let cut = stop.min(lowest.saturating_add(budget));
                    let gone = tx
                        .query_one(
                            "WITH d AS (DELETE FROM hush_envelopes WHERE device = $1 AND seq < $2 \
                             RETURNING device, seq, sender, conversation, sender_seq, \
                             octet_length(body) AS len), \
                             t AS (INSERT INTO hush_tombstones \
                             (device, seq, sender, conversation, sender_seq) \
                             SELECT device, seq, sender, conversation, sender_seq FROM d) \
                             SELECT count(*), coalesce(sum(len), 0)::bigint FROM d",
                            &[&device, &db_u64(cut)],
                        )
                        .await?;
                    let (count, bytes) = (from_db(gone.get(0)), from_db(gone.get(1)));
                    tx.execute(
                        "UPDATE hush_inboxes SET depth = depth - $2, bytes = bytes - $3, \
                         purge_at = (SELECT expires_at_ms FROM hush_envelopes \
                                     WHERE device = $1 ORDER BY seq LIMIT 1) \
                         WHERE device = $1",
                        &[&device, &db_u64(count), &db_u64(bytes)],
                    )
                    .await?;
                    stats.expired += count;
                    gone_depth += count;
                    gone_cost = gone_cost
                        .saturating_add(bytes.saturating_add(count.saturating_mul(stored_cost(0))));
                    seen.push(device);
                }
                if gone_depth > 0 {
                    tx.execute(
                        "UPDATE hush_totals SET depth = depth - $2, stored = stored - $3 \
                         WHERE stripe = $1",
                        &[&stripe, &db_u64(gone_depth), &db_u64(gone_cost)],
                    )
                    .await?;
                }
                let removed: i64 = tx
                    .query_one(
                        "WITH d AS (DELETE FROM hush_dedup WHERE ctid IN ( \
                         SELECT ctid FROM hush_dedup WHERE expires_at_ms <= $1 \
                         ORDER BY expires_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING 1) \
                         SELECT count(*) FROM d",
                        &[&now, &db_u64(max)],
                    )
                    .await?
                    .get(0);
                stats.dedup_removed = from_db(removed);
                Ok::<_, TxError>(stats)
            })
            .await
    }
}
