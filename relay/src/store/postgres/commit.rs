//! Group commit: one transaction per batch.
//!
//! 1. Lock the inbox rows of the batch's recipients in device-id order
//!    (`SELECT … ORDER BY device FOR UPDATE`). Only registered devices have an
//!    inbox row, so this also tells unknown recipients apart. Two nodes
//!    committing to the same inbox queue here, and the second one then sees
//!    the first one's seqs and dedup rows (`READ COMMITTED` takes a fresh
//!    snapshot per statement).
//! 2. Read the dedup rows of the batch's keys and, when a store cap is set,
//!    the store-wide byte total.
//! 3. Decide each envelope in order with the rules the other stores use.
//! 4. Write: one multi-row `INSERT … SELECT FROM unnest(…)` each for
//!    envelopes and dedup rows, one `UPDATE … FROM unnest(…)` for the inbox
//!    counters, one `UPDATE` of a `hush_totals` stripe.

use super::super::rules;
use super::super::{CommitOutcome, InboxState, NewEnvelope, Refusal, StoreError, stored_cost};
use super::pool::TxError;
use super::{PgStore, bits_to_db, db_u64, from_db};
use hush_protocol::{DeviceId, MessageId};
use std::collections::BTreeMap;
use tokio_postgres::IsolationLevel;

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

impl PgStore {
    pub(super) async fn commit_async(
        &self,
        batch: &[NewEnvelope],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let mut recipients: Vec<&[u8]> = batch
            .iter()
            .map(|e| e.recipient.as_bytes().as_slice())
            .collect();
        recipients.sort_unstable();
        recipients.dedup();
        let senders: Vec<&[u8]> = batch
            .iter()
            .map(|e| e.sender.as_bytes().as_slice())
            .collect();
        let to: Vec<&[u8]> = batch
            .iter()
            .map(|e| e.recipient.as_bytes().as_slice())
            .collect();
        let ids: Vec<&[u8]> = batch
            .iter()
            .map(|e| e.message_id.as_bytes().as_slice())
            .collect();
        let stripe = self.next_stripe();
        let limits = self.limits;
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                let mut inboxes: BTreeMap<DeviceId, Locked> = BTreeMap::new();
                for row in tx
                    .query(
                        "SELECT device, head, acked, depth, bytes, purge_at FROM hush_inboxes \
                         WHERE device = ANY($1) ORDER BY device FOR UPDATE",
                        &[&recipients],
                    )
                    .await?
                {
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
                for row in tx
                    .query(
                        "SELECT d.message_id, d.sender, d.recipient, d.seq FROM hush_dedup d \
                         JOIN unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS k(r, s, m) \
                         ON d.recipient = k.r AND d.sender = k.s AND d.message_id = k.m",
                        &[&to, &senders, &ids],
                    )
                    .await?
                {
                    let key = (
                        MessageId(super::array(row.get(0), "dedup message id")?),
                        DeviceId(super::array(row.get(1), "dedup sender")?),
                        DeviceId(super::array(row.get(2), "dedup recipient")?),
                    );
                    dedup.insert(key, from_db(row.get(3)));
                }
                let mut stored = if limits.max_store_bytes == u64::MAX {
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

                let mut outcomes = Vec::with_capacity(batch.len());
                let mut ins = Inserts::default();
                let (mut added_depth, mut added_cost) = (0u64, 0u64);
                for env in batch {
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
                    return Ok(outcomes);
                }
                tx.execute(
                    "INSERT INTO hush_envelopes \
                     (device, seq, expires_at_ms, sender, conversation, sender_seq, body) \
                     SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bytea[], \
                     $5::bytea[], $6::bigint[], $7::bytea[])",
                    &[
                        &ins.device,
                        &ins.seq,
                        &ins.expires,
                        &ins.sender,
                        &ins.conversation,
                        &ins.sender_seq,
                        &ins.body,
                    ],
                )
                .await?;
                tx.execute(
                    "INSERT INTO hush_dedup (recipient, sender, message_id, seq, expires_at_ms) \
                     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bigint[], \
                     $5::bigint[])",
                    &[
                        &ins.device,
                        &ins.sender,
                        &ins.message_id,
                        &ins.seq,
                        &ins.expires,
                    ],
                )
                .await?;
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
                tx.execute(
                    "UPDATE hush_inboxes AS i SET head = u.head, depth = u.depth, \
                     bytes = u.bytes, purge_at = u.purge_at \
                     FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[], \
                     $5::bigint[]) AS u(device, head, depth, bytes, purge_at) \
                     WHERE i.device = u.device",
                    &[&devices, &heads, &depths, &bytes, &purge],
                )
                .await?;
                tx.execute(
                    "UPDATE hush_totals SET depth = depth + $2, stored = stored + $3 \
                     WHERE stripe = $1",
                    &[&stripe, &db_u64(added_depth), &db_u64(added_cost)],
                )
                .await?;
                Ok::<_, TxError>(outcomes)
            })
            .await
    }
}
