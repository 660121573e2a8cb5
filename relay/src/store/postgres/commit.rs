//! Group commit: one batch, committed in one transaction per lane.
//!
//! **Lanes.** A large batch (at least [`SPLIT_MIN`] envelopes for at least
//! two recipients, and no store-wide byte cap) is split by recipient into up
//! to [`LANES`] disjoint parts, each committed in its own transaction on its
//! own connection, all at once. Every envelope of one recipient is in one
//! lane, in batch order, so per-inbox seqs stay contiguous and in order; the
//! lanes lock disjoint inbox rows, so they never wait for each other, and
//! PostgreSQL flushes (and the standby confirms) their commits together.
//! `commit` returns only after every lane committed; if a lane fails, the
//! whole call fails (other lanes may have committed: their envelopes come
//! back as `Duplicate` with their seqs when the senders retry, exactly as
//! after a commit whose reply was lost).
//!
//! **One lane's transaction**, in two round trips:
//!
//! 1. Pipelined: `BEGIN` (nested-loop joins only, see [`BEGIN`]); lock the
//!    inbox rows of the lane's recipients in device-id order (one
//!    `SELECT … FOR UPDATE` probe per device, in sorted order); read the
//!    dedup rows of its keys (one primary-key probe per key); and, when a
//!    store cap is set, the store-wide byte total. Only registered devices
//!    have an inbox row, so the lock also tells unknown recipients apart.
//!    Two transactions (lanes of other nodes) committing to the same inbox
//!    queue on its row, and the second then sees the first one's seqs and
//!    dedup rows (`READ COMMITTED` takes a fresh snapshot per statement;
//!    the dedup read runs after the lock).
//! 2. Decide each envelope in order with the rules the other stores use.
//! 3. Pipelined: one multi-row `INSERT … SELECT FROM unnest(…)` each for
//!    envelopes and dedup rows, one `UPDATE … FROM unnest(…)` for the inbox
//!    counters, one `UPDATE` of a `hush_totals` stripe, and `COMMIT`. A
//!    statement that fails aborts the transaction, so the `COMMIT` behind it
//!    rolls back; the failure is reported and nothing is acknowledged.
//!
//! The statements are prepared once per connection when it opens
//! ([`PREPARED`]), so a commit neither parses nor plans them again, and
//! none costs a prepare round trip.

use super::super::rules;
use super::super::{CommitOutcome, InboxState, NewEnvelope, Refusal, StoreError, stored_cost};
use super::pool::{Conn, Prepare, TxError};
use super::{PgStore, bits_to_db, db_u64, from_db};
use hush_protocol::{DeviceId, MessageId};
use std::collections::BTreeMap;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

/// Most transactions one commit runs at once (each on its own connection).
pub(crate) const LANES: usize = 4;

/// Batches smaller than this are committed in one transaction: a lane
/// costs a connection and a commit record, which only pays off when the
/// per-envelope work dominates.
pub(crate) const SPLIT_MIN: usize = 256;

/// Starts a lane's transaction. Joins are nested loops over the primary
/// keys: for a batch of a few thousand rows the planner would otherwise
/// hash the whole `hush_inboxes` table to update a few thousand of its
/// rows, a cost that grows with every registered device.
pub const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED; \
     SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";
/// Locks the inbox rows of `$1` (sorted device ids) in that order, one
/// primary-key probe each (`device = ANY($1)` becomes a sequential scan of
/// the table for a few thousand ids).
pub const LOCK_INBOXES: &str = "SELECT i.device, i.head, i.acked, i.depth, i.bytes, i.purge_at \
     FROM unnest($1::bytea[]) AS k(device) \
     CROSS JOIN LATERAL (SELECT x.device, x.head, x.acked, x.depth, x.bytes, x.purge_at \
     FROM hush_inboxes x WHERE x.device = k.device LIMIT 1 FOR UPDATE) AS i";
/// One primary-key probe per key. The `LIMIT 1` subquery (the key is
/// unique, so it changes no result) keeps the planner from turning a large
/// batch's lookup into a hash join over a sequential scan of the whole
/// table, which it prefers for a few thousand keys and which grows with
/// the table.
pub const READ_DEDUP: &str = "SELECT d.message_id, d.sender, d.recipient, d.seq \
     FROM unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS k(r, s, m) \
     CROSS JOIN LATERAL (SELECT x.message_id, x.sender, x.recipient, x.seq FROM hush_dedup x \
     WHERE x.recipient = k.r AND x.sender = k.s AND x.message_id = k.m LIMIT 1) AS d";
const READ_STORED: &str = "SELECT coalesce(sum(stored), 0)::bigint FROM hush_totals";
const INSERT_ENVELOPES: &str = "INSERT INTO hush_envelopes \
     (device, seq, expires_at_ms, sender, conversation, sender_seq, body) \
     SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bytea[], \
     $5::bytea[], $6::bigint[], $7::bytea[])";
const INSERT_DEDUP: &str = "INSERT INTO hush_dedup (recipient, sender, message_id, seq, expires_at_ms) \
     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bigint[], $5::bigint[])";
/// Writes the new counters of the changed inboxes (one primary-key probe
/// each: [`BEGIN`] rules out hash and merge joins).
pub const UPDATE_INBOXES: &str = "UPDATE hush_inboxes AS i SET head = u.head, depth = u.depth, \
     bytes = u.bytes, purge_at = u.purge_at \
     FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
     AS u(device, head, depth, bytes, purge_at) WHERE i.device = u.device";
const UPDATE_TOTALS: &str =
    "UPDATE hush_totals SET depth = depth + $2, stored = stored + $3 WHERE stripe = $1";

/// The statements every commit runs, prepared on each connection of the
/// store's pool when it opens.
pub(crate) const PREPARED: &[Prepare] = &[
    (LOCK_INBOXES, &[Type::BYTEA_ARRAY]),
    (
        READ_DEDUP,
        &[Type::BYTEA_ARRAY, Type::BYTEA_ARRAY, Type::BYTEA_ARRAY],
    ),
    (
        INSERT_ENVELOPES,
        &[
            Type::BYTEA_ARRAY,
            Type::INT8_ARRAY,
            Type::INT8_ARRAY,
            Type::BYTEA_ARRAY,
            Type::BYTEA_ARRAY,
            Type::INT8_ARRAY,
            Type::BYTEA_ARRAY,
        ],
    ),
    (
        INSERT_DEDUP,
        &[
            Type::BYTEA_ARRAY,
            Type::BYTEA_ARRAY,
            Type::BYTEA_ARRAY,
            Type::INT8_ARRAY,
            Type::INT8_ARRAY,
        ],
    ),
    (
        UPDATE_INBOXES,
        &[
            Type::BYTEA_ARRAY,
            Type::INT8_ARRAY,
            Type::INT8_ARRAY,
            Type::INT8_ARRAY,
            Type::INT8_ARRAY,
        ],
    ),
    (UPDATE_TOTALS, &[Type::INT2, Type::INT8, Type::INT8]),
];

/// Parameters with their types, as `query_typed` takes them.
type Typed<'a> = (&'a (dyn ToSql + Sync), Type);

/// Run `sql` with `params`: as the connection's prepared statement when it
/// has one (no parse, no planning), else as an unnamed typed statement.
async fn query(
    client: &Conn,
    sql: &'static str,
    params: &[Typed<'_>],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    match client.prepared(sql) {
        Some(statement) => {
            let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
            client.query(statement, &values).await
        }
        None => client.query_typed(sql, params).await,
    }
}

/// [`query`] for a statement that returns no rows: the rows it changed.
async fn execute(
    client: &Conn,
    sql: &'static str,
    params: &[Typed<'_>],
) -> Result<u64, tokio_postgres::Error> {
    match client.prepared(sql) {
        Some(statement) => {
            let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
            client.execute(statement, &values).await
        }
        None => client.execute_typed(sql, params).await,
    }
}

/// The counters of one locked inbox plus its purge queue position.
#[derive(Debug, Clone, Copy)]
struct Locked {
    state: InboxState,
    purge_at: Option<i64>,
    changed: bool,
}

/// Columns of the rows one commit inserts.
#[derive(Debug, Default)]
struct Inserts<'a> {
    device: Vec<&'a [u8]>,
    seq: Vec<i64>,
    expires: Vec<i64>,
    sender: Vec<&'a [u8]>,
    conversation: Vec<&'a [u8]>,
    sender_seq: Vec<i64>,
    body: Vec<&'a [u8]>,
    message_id: Vec<&'a [u8]>,
}

/// Which envelopes (indexes into the batch, in batch order) each lane
/// commits: all of one recipient's in one lane, lanes balanced by envelope
/// count. One lane unless the batch is worth splitting.
pub(crate) fn lanes(batch: &[NewEnvelope], split: bool) -> Vec<Vec<usize>> {
    let all = || vec![(0..batch.len()).collect::<Vec<_>>()];
    if !split || batch.len() < SPLIT_MIN {
        return all();
    }
    let mut per_recipient: BTreeMap<DeviceId, usize> = BTreeMap::new();
    for env in batch {
        *per_recipient.entry(env.recipient).or_insert(0) += 1;
    }
    let n = per_recipient.len().min(LANES);
    if n < 2 {
        return all();
    }
    // Largest inboxes first, each to the lightest lane so far.
    let mut by_size: Vec<(DeviceId, usize)> = per_recipient.into_iter().collect();
    by_size.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut load = vec![0usize; n];
    let mut lane_of: BTreeMap<DeviceId, usize> = BTreeMap::new();
    for (device, count) in by_size {
        let lightest = (0..n).min_by_key(|&l| (load[l], l)).unwrap_or(0);
        load[lightest] += count;
        lane_of.insert(device, lightest);
    }
    let mut out = vec![Vec::new(); n];
    for (i, env) in batch.iter().enumerate() {
        let lane = lane_of.get(&env.recipient).copied().unwrap_or(0);
        out[lane].push(i);
    }
    out
}

/// `fut`'s output, or `None` without a future (a lane that does not exist).
async fn maybe<F: Future>(fut: Option<F>) -> Option<F::Output> {
    match fut {
        Some(f) => Some(f.await),
        None => None,
    }
}

impl PgStore {
    pub(super) async fn commit_async(
        &self,
        batch: &[NewEnvelope],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        // A store-wide cap is checked against the total each transaction
        // reads; lanes of one batch would not see each other's bytes.
        let lanes = lanes(batch, self.limits.max_store_bytes == u64::MAX);
        if let [only] = lanes.as_slice() {
            return self.commit_lane(batch, only).await;
        }
        let lane = |i: usize| lanes.get(i).map(|l| self.commit_lane(batch, l));
        let (a, b, c, d) = tokio::join!(
            maybe(lane(0)),
            maybe(lane(1)),
            maybe(lane(2)),
            maybe(lane(3))
        );
        let mut outcomes: Vec<Option<CommitOutcome>> = vec![None; batch.len()];
        // Every lane has finished: report the first failure.
        for (indexes, result) in lanes.iter().zip([a, b, c, d].into_iter().flatten()) {
            for (&i, outcome) in indexes.iter().zip(result?) {
                if let Some(slot) = outcomes.get_mut(i) {
                    *slot = Some(outcome);
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| StoreError::Backend("commit lane lost an envelope".into())))
            .collect()
    }

    /// Commit the envelopes `indexes` of `batch` in one transaction; their
    /// outcomes in the same order.
    async fn commit_lane(
        &self,
        batch: &[NewEnvelope],
        indexes: &[usize],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let envs: Vec<&NewEnvelope> = indexes.iter().filter_map(|&i| batch.get(i)).collect();
        let mut recipients: Vec<&[u8]> = envs
            .iter()
            .map(|e| e.recipient.as_bytes().as_slice())
            .collect();
        recipients.sort_unstable();
        recipients.dedup();
        let senders: Vec<&[u8]> = envs
            .iter()
            .map(|e| e.sender.as_bytes().as_slice())
            .collect();
        let to: Vec<&[u8]> = envs
            .iter()
            .map(|e| e.recipient.as_bytes().as_slice())
            .collect();
        let ids: Vec<&[u8]> = envs
            .iter()
            .map(|e| e.message_id.as_bytes().as_slice())
            .collect();
        let limits = self.limits;
        let capped = limits.max_store_bytes != u64::MAX;
        let stripe = self.next_stripe();
        self.pool
            .pipelined(async |client: &Conn| {
                // Round trip 1: begin, lock, read.
                let lock: [Typed; 1] = [(&recipients, Type::BYTEA_ARRAY)];
                let keys: [Typed; 3] = [
                    (&to, Type::BYTEA_ARRAY),
                    (&senders, Type::BYTEA_ARRAY),
                    (&ids, Type::BYTEA_ARRAY),
                ];
                let (begun, locked, known, total) = tokio::join!(
                    client.batch_execute(BEGIN),
                    query(client, LOCK_INBOXES, &lock),
                    query(client, READ_DEDUP, &keys),
                    maybe(capped.then(|| client.query_typed_one(READ_STORED, &[]))),
                );
                begun?;
                let (locked, known) = (locked?, known?);
                let mut stored = match total {
                    Some(row) => from_db(row?.get(0)),
                    None => 0,
                };
                let mut inboxes: BTreeMap<DeviceId, Locked> = BTreeMap::new();
                for row in locked {
                    let device = DeviceId(super::array(row.get(0), "inbox device")?);
                    inboxes.insert(
                        device,
                        Locked {
                            state: InboxState {
                                head: from_db(row.get(1)),
                                acked: from_db(row.get(2)),
                                depth: from_db(row.get(3)),
                                bytes: from_db(row.get(4)),
                            },
                            purge_at: row.get(5),
                            changed: false,
                        },
                    );
                }
                let mut dedup: BTreeMap<(MessageId, DeviceId, DeviceId), u64> = BTreeMap::new();
                for row in known {
                    let key = (
                        MessageId(super::array(row.get(0), "dedup message id")?),
                        DeviceId(super::array(row.get(1), "dedup sender")?),
                        DeviceId(super::array(row.get(2), "dedup recipient")?),
                    );
                    dedup.insert(key, from_db(row.get(3)));
                }

                // Decide, in batch order.
                let mut outcomes = Vec::with_capacity(envs.len());
                let mut ins = Inserts::default();
                let (mut added_depth, mut added_cost) = (0u64, 0u64);
                for env in &envs {
                    let key = (env.message_id, env.sender, env.recipient);
                    if let Some(&seq) = dedup.get(&key) {
                        outcomes.push(CommitOutcome::Duplicate { seq });
                        continue;
                    }
                    let Some(inbox) = inboxes.get_mut(&env.recipient) else {
                        outcomes.push(CommitOutcome::Refused(Refusal::UnknownRecipient));
                        continue;
                    };
                    let len = env.bytes.len() as u64;
                    if let Err(refusal) = rules::admit(&inbox.state, len, &limits)
                        .and_then(|()| rules::admit_store(stored, len, &limits))
                    {
                        outcomes.push(CommitOutcome::Refused(refusal));
                        continue;
                    }
                    let was_empty = inbox.state.depth == 0;
                    let seq = rules::assign(&mut inbox.state, len)
                        .ok_or_else(|| StoreError::Backend("inbox seq space exhausted".into()))?;
                    if was_empty {
                        inbox.purge_at = Some(db_u64(env.expires_at_ms));
                    }
                    inbox.changed = true;
                    dedup.insert(key, seq);
                    stored = stored.saturating_add(stored_cost(len));
                    added_depth += 1;
                    added_cost = added_cost.saturating_add(stored_cost(len));
                    ins.device.push(env.recipient.as_bytes().as_slice());
                    ins.seq.push(db_u64(seq));
                    ins.expires.push(db_u64(env.expires_at_ms));
                    ins.sender.push(env.sender.as_bytes().as_slice());
                    ins.conversation
                        .push(env.conversation.as_bytes().as_slice());
                    ins.sender_seq.push(bits_to_db(env.sender_seq));
                    ins.body.push(&env.bytes);
                    ins.message_id.push(env.message_id.as_bytes().as_slice());
                    outcomes.push(CommitOutcome::Stored { seq });
                }
                if ins.seq.is_empty() {
                    // Nothing written: end the transaction (and its locks).
                    client.batch_execute("COMMIT").await?;
                    return Ok(outcomes);
                }
                let changed: Vec<(&DeviceId, &Locked)> =
                    inboxes.iter().filter(|(_, l)| l.changed).collect();
                let devices: Vec<&[u8]> = changed
                    .iter()
                    .map(|(d, _)| d.as_bytes().as_slice())
                    .collect();
                let heads: Vec<i64> = changed.iter().map(|(_, l)| db_u64(l.state.head)).collect();
                let depths: Vec<i64> = changed.iter().map(|(_, l)| db_u64(l.state.depth)).collect();
                let bytes: Vec<i64> = changed.iter().map(|(_, l)| db_u64(l.state.bytes)).collect();
                let purge: Vec<Option<i64>> = changed.iter().map(|(_, l)| l.purge_at).collect();
                let (added_depth, added_cost) = (db_u64(added_depth), db_u64(added_cost));

                // Round trip 2: write and commit.
                let envelopes: [Typed; 7] = [
                    (&ins.device, Type::BYTEA_ARRAY),
                    (&ins.seq, Type::INT8_ARRAY),
                    (&ins.expires, Type::INT8_ARRAY),
                    (&ins.sender, Type::BYTEA_ARRAY),
                    (&ins.conversation, Type::BYTEA_ARRAY),
                    (&ins.sender_seq, Type::INT8_ARRAY),
                    (&ins.body, Type::BYTEA_ARRAY),
                ];
                let dedup_rows: [Typed; 5] = [
                    (&ins.device, Type::BYTEA_ARRAY),
                    (&ins.sender, Type::BYTEA_ARRAY),
                    (&ins.message_id, Type::BYTEA_ARRAY),
                    (&ins.seq, Type::INT8_ARRAY),
                    (&ins.expires, Type::INT8_ARRAY),
                ];
                let counters: [Typed; 5] = [
                    (&devices, Type::BYTEA_ARRAY),
                    (&heads, Type::INT8_ARRAY),
                    (&depths, Type::INT8_ARRAY),
                    (&bytes, Type::INT8_ARRAY),
                    (&purge, Type::INT8_ARRAY),
                ];
                let totals: [Typed; 3] = [
                    (&stripe, Type::INT2),
                    (&added_depth, Type::INT8),
                    (&added_cost, Type::INT8),
                ];
                let (e, d, c, t, committed) = tokio::join!(
                    execute(client, INSERT_ENVELOPES, &envelopes),
                    execute(client, INSERT_DEDUP, &dedup_rows),
                    execute(client, UPDATE_INBOXES, &counters),
                    execute(client, UPDATE_TOTALS, &totals),
                    client.batch_execute("COMMIT"),
                );
                // A failed statement made the COMMIT a rollback: report the
                // statement's error, not the COMMIT's success.
                e?;
                d?;
                c?;
                t?;
                committed?;
                Ok::<_, TxError>(outcomes)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hush_protocol::ConversationId;

    fn env(to: u8, msg: u8) -> NewEnvelope {
        NewEnvelope {
            recipient: DeviceId([to; 16]),
            sender: DeviceId([1; 16]),
            message_id: MessageId([msg; 16]),
            conversation: ConversationId([1; 16]),
            sender_seq: u64::from(msg),
            bytes: vec![msg; 8],
            expires_at_ms: 1,
        }
    }

    #[test]
    fn small_or_single_recipient_batches_stay_in_one_lane() {
        let small: Vec<_> = (0..10).map(|i| env(i, i)).collect();
        assert_eq!(lanes(&small, true), vec![(0..10).collect::<Vec<_>>()]);
        let one: Vec<_> = (0..SPLIT_MIN).map(|i| env(7, i as u8)).collect();
        assert_eq!(lanes(&one, true).len(), 1);
        let big: Vec<_> = (0..SPLIT_MIN).map(|i| env(i as u8 % 8, i as u8)).collect();
        assert_eq!(lanes(&big, false).len(), 1);
    }

    #[test]
    fn lanes_keep_each_recipient_whole_and_in_order_and_cover_the_batch() {
        // 16 recipients with uneven shares, interleaved.
        let batch: Vec<_> = (0..2000usize)
            .map(|i| env((i * i % 16) as u8, (i % 251) as u8))
            .collect();
        let lanes = lanes(&batch, true);
        assert_eq!(lanes.len(), LANES);
        let mut seen: Vec<usize> = lanes.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..batch.len()).collect::<Vec<_>>());
        for lane in &lanes {
            assert!(lane.windows(2).all(|w| w[0] < w[1]), "batch order kept");
            for other in &lanes {
                if std::ptr::eq(lane, other) {
                    continue;
                }
                for &i in lane {
                    assert!(
                        other
                            .iter()
                            .all(|&j| batch[j].recipient != batch[i].recipient),
                        "a recipient split over two lanes"
                    );
                }
            }
        }
    }
}
