//! Pull, ack and the counters.
//!
//! An inbox's stored envelopes are always the contiguous seqs
//! `head − depth + 1 ..= head`: commits append at `head + 1`, and acks and
//! purges remove prefixes. So `remaining` and the oldest retained seq follow
//! from the counters in O(1), read in the same snapshot as the page.

use super::super::rules::{self, PageBudget};
use super::super::tombstones::{self, Tombstone};
use super::super::{InboxPage, InboxState, StoreError, StoredEnvelope, stored_cost};
use super::pool::TxError;
use super::{PgStore, bits_from_db, db_u64, from_db};
use hush_protocol::{ConversationId, DeviceId};
use tokio_postgres::{IsolationLevel, Row};

fn state_of(row: &Row) -> InboxState {
    InboxState {
        head: from_db(row.get(0)),
        acked: from_db(row.get(1)),
        depth: from_db(row.get(2)),
        bytes: from_db(row.get(3)),
    }
}

const STATE_QUERY: &str = "SELECT head, acked, depth, bytes FROM hush_inboxes WHERE device = $1";

impl PgStore {
    pub(super) async fn pull_async(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        let d = device.as_bytes().as_slice();
        let after_db = db_u64(after);
        let limit_db = db_u64(limit as u64);
        let max_bytes_db = db_u64(max_bytes as u64);
        // One snapshot for the counters, the page and the tombstones.
        self.pool
            .transaction(IsolationLevel::RepeatableRead, true, async |tx| {
                let state = tx
                    .query_opt(STATE_QUERY, &[&d])
                    .await?
                    .map(|r| state_of(&r))
                    .unwrap_or_default();
                let mut envelopes = Vec::new();
                let mut dropped = Vec::new();
                if after < u64::MAX {
                    // The running byte total lets the server leave out the
                    // bodies that cannot fit.
                    let rows = tx
                        .query(
                            "SELECT seq, CASE WHEN n = 1 OR total <= $4 THEN body END FROM ( \
                             SELECT seq, body, \
                             row_number() OVER w AS n, sum(octet_length(body)) OVER w AS total \
                             FROM hush_envelopes WHERE device = $1 AND seq > $2 \
                             WINDOW w AS (ORDER BY seq ROWS UNBOUNDED PRECEDING) \
                             ORDER BY seq LIMIT $3) AS page ORDER BY seq",
                            &[&d, &after_db, &limit_db, &max_bytes_db],
                        )
                        .await?;
                    let mut budget = PageBudget::new(limit, max_bytes);
                    for row in rows {
                        let Some(bytes) = row.get::<_, Option<Vec<u8>>>(1) else {
                            break;
                        };
                        if !budget.take(bytes.len()) {
                            break;
                        }
                        envelopes.push(StoredEnvelope {
                            seq: from_db(row.get(0)),
                            bytes: bytes.into(),
                        });
                    }
                    for row in tx
                        .query(
                            "SELECT sender, conversation, sender_seq FROM hush_tombstones \
                             WHERE device = $1 AND seq > $2",
                            &[&d, &after_db],
                        )
                        .await?
                    {
                        dropped.push(Tombstone {
                            sender: DeviceId(super::array(row.get(0), "tombstone sender")?),
                            conversation: ConversationId(super::array(
                                row.get(1),
                                "tombstone conversation",
                            )?),
                            sender_seq: bits_from_db(row.get(2)),
                        });
                    }
                }
                // Stored seqs are `lowest ..= head` (none if depth is 0).
                let lowest = state.head.saturating_sub(state.depth).saturating_add(1);
                let boundary = envelopes.last().map_or(after, |e| e.seq);
                let remaining = if state.depth == 0 {
                    0
                } else {
                    state.head.saturating_sub(boundary.max(lowest - 1))
                };
                let first_after = after.saturating_add(1).max(lowest);
                let oldest = if state.depth > 0 && first_after <= state.head {
                    first_after
                } else {
                    state.head.saturating_add(1)
                };
                Ok::<_, TxError>(InboxPage {
                    envelopes,
                    remaining,
                    truncated: tombstones::truncation(oldest, dropped),
                })
            })
            .await
    }

    pub(super) async fn ack_async(&self, device: &DeviceId, up_to: u64) -> Result<u64, StoreError> {
        let d = device.as_bytes().as_slice();
        let stripe = self.next_stripe();
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                let Some(row) = tx
                    .query_opt(
                        "SELECT head, acked, depth, bytes FROM hush_inboxes WHERE device = $1 \
                         FOR UPDATE",
                        &[&d],
                    )
                    .await?
                else {
                    // No inbox: nothing to acknowledge (as for an empty one).
                    return Ok(0);
                };
                let mut state = state_of(&row);
                let target = up_to.min(state.head);
                if target <= state.acked {
                    return Ok(state.acked);
                }
                let target_db = db_u64(target);
                let gone = tx
                    .query_one(
                        "WITH d AS (DELETE FROM hush_envelopes WHERE device = $1 AND seq <= $2 \
                         RETURNING octet_length(body) AS len) \
                         SELECT count(*), coalesce(sum(len), 0)::bigint FROM d",
                        &[&d, &target_db],
                    )
                    .await?;
                let (count, bytes) = (from_db(gone.get(0)), from_db(gone.get(1)));
                tx.execute(
                    "DELETE FROM hush_tombstones WHERE device = $1 AND seq <= $2",
                    &[&d, &target_db],
                )
                .await?;
                rules::release_many(&mut state, count, bytes);
                state.acked = target;
                tx.execute(
                    "UPDATE hush_inboxes SET acked = $2, depth = $3, bytes = $4, \
                     purge_at = (SELECT expires_at_ms FROM hush_envelopes \
                                 WHERE device = $1 ORDER BY seq LIMIT 1) \
                     WHERE device = $1",
                    &[&d, &target_db, &db_u64(state.depth), &db_u64(state.bytes)],
                )
                .await?;
                if count > 0 {
                    let cost = bytes.saturating_add(count.saturating_mul(stored_cost(0)));
                    tx.execute(
                        "UPDATE hush_totals SET depth = depth - $2, stored = stored - $3 \
                         WHERE stripe = $1",
                        &[&stripe, &db_u64(count), &db_u64(cost)],
                    )
                    .await?;
                }
                Ok::<_, TxError>(target)
            })
            .await
    }

    pub(super) async fn inbox_state_async(
        &self,
        device: &DeviceId,
    ) -> Result<InboxState, StoreError> {
        let d = device.as_bytes().as_slice();
        self.pool
            .with_client(async |c| {
                Ok(c.query_opt(STATE_QUERY, &[&d])
                    .await?
                    .map(|r| state_of(&r))
                    .unwrap_or_default())
            })
            .await
    }

    /// (envelopes, bytes counted against the store cap), summed over the
    /// `hush_totals` stripes.
    pub(super) async fn totals_async(&self) -> Result<(u64, u64), StoreError> {
        self.pool
            .with_client(async |c| {
                let row = c
                    .query_one(
                        "SELECT coalesce(sum(depth), 0)::bigint, coalesce(sum(stored), 0)::bigint \
                         FROM hush_totals",
                        &[],
                    )
                    .await?;
                Ok((from_db(row.get(0)), from_db(row.get(1))))
            })
            .await
    }
}
