//! Envelope commits that go on while a checkpoint holds the index.
//!
//! A checkpoint (a durable redb commit, [`RedbStore::checkpoint`]) writes
//! out every index page that the commits since the last one changed: about
//! 300 bytes per envelope, ~50 ms after 100,000 envelopes on the reference
//! host (`BENCHMARKS.md`), and redb's one write lock is held all that time.
//! A send does not need that lock to be durable: its batch and the batch's
//! trailer in the segment log are the durable copy, from which an open after
//! a crash commits the index rows again (`docs/STORAGE.md` §5).
//!
//! So while a checkpoint runs, a send commit is decided here against a read
//! snapshot of the index plus what was appended meanwhile (dedup, known
//! recipient, quotas, the next seq of each inbox), appended with its trailer
//! and synced, and acknowledged: the log is **ahead** of the index. When the
//! checkpoint has committed, the batches are committed to the index by the
//! same replay path the open uses, each envelope under the seq its record
//! carries. A pull (or inbox count) of an inbox that has envelopes in the
//! log alone waits until they are indexed, so a read never misses what was
//! acknowledged; reads of other inboxes and sends do not wait. Nothing else
//! commits envelopes or moves a segment's end meanwhile: the normal send
//! path and compaction hold [`Ahead`]'s lock for their whole commit, and the
//! checkpoint takes it to start and then once per batch it indexes.
//!
//! A crash at any point leaves what a crash between two log-synced commits
//! leaves: whole batches past the index's durable end, which the next open
//! replays. If committing a batch to the index fails after its ack, the log
//! is poisoned: every later commit fails until a restart, whose replay puts
//! the batch back in order.

use super::*;
use std::collections::VecDeque;

/// What was appended to the log while a checkpoint held the index.
#[derive(Default)]
pub(super) struct Ahead {
    /// A checkpoint holds (or is about to take) redb's write lock: send
    /// commits go to the log alone.
    pub(super) checkpointing: bool,
    /// Batches appended and synced meanwhile, in log order.
    pending: VecDeque<Pending>,
    /// The inbox states those batches leave.
    states: HashMap<DeviceId, InboxState>,
    /// Their dedup keys, with the seq each got.
    dedup: HashMap<DedupKey, u64>,
    /// What they count against the store cap.
    added: u64,
    /// Envelopes acknowledged from the log alone since the store opened.
    total: u64,
}

/// Runs of batches ([`take_run`]) the drain indexes one lock at a time
/// before it holds the lock for the rest (see [`RedbStore::drain_ahead`]).
const DRAIN_TURNS: usize = 4096;

impl Ahead {
    /// What the batches in the log alone count against the store cap.
    pub(super) fn added(&self) -> u64 {
        self.added
    }

    /// The log is drained (or poisoned): sends commit to the index again.
    fn close(&mut self) {
        self.pending.clear();
        self.states.clear();
        self.dedup.clear();
        self.added = 0;
        self.checkpointing = false;
    }
}

impl std::fmt::Debug for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead")
            .field("checkpointing", &self.checkpointing)
            .field("pending_batches", &self.pending.len())
            .field("pending_envelopes", &self.dedup.len())
            .finish()
    }
}

/// One batch in the log that the index does not have yet.
struct Pending {
    replay: Replay,
    envelopes: Vec<NewEnvelope>,
    /// What it counts against the store cap (part of [`Ahead::added`]
    /// until it is indexed).
    added: u64,
}

impl RedbStore {
    /// The lock over [`Ahead`].
    pub(super) fn ahead(&self) -> std::sync::MutexGuard<'_, Ahead> {
        self.ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Store::commit`] while a checkpoint holds the index: decide each
    /// envelope as the index commit would, append the stored ones with
    /// their trailer and sync them, and queue the batch for the index.
    pub(super) fn commit_ahead(
        &self,
        ahead: &mut Ahead,
        batch: &[NewEnvelope],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let _commit = self.segments.lock_commits();
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let dedup = txn.open_table(DEDUP_RUNS)?;
        let legacy = LegacyDedup::new(txn.open_table(DEDUP)?)?;
        let meta = txn.open_table(INBOX_META)?;
        let stored = self
            .stored
            .load(Ordering::Acquire)
            .saturating_add(ahead.added);
        let mut append = self
            .segments
            .begin_append(batch_upper_bound(batch), FORMAT_VERSION)?;
        // This batch's changes, merged into `ahead` only once it is synced.
        let mut states: HashMap<DeviceId, InboxState> = HashMap::new();
        let mut keys: HashMap<DedupKey, u64> = HashMap::new();
        let mut known: HashMap<DeviceId, bool> = HashMap::new();
        let mut added = 0u64;
        let mut records = VecDeque::new();
        let mut kept = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for env in batch {
            let dk = dedup_key(&env.sender, &env.recipient, &env.message_id);
            let earlier = match keys.get(&dk).or_else(|| ahead.dedup.get(&dk)) {
                Some(&seq) => Some(seq),
                None => {
                    match dedup_runs::lookup(&dedup, &env.sender, &env.recipient, &env.message_id)?
                    {
                        Some(seq) => Some(seq),
                        None => legacy.lookup(&dk)?,
                    }
                }
            };
            if let Some(seq) = earlier {
                outcomes.push(CommitOutcome::Duplicate { seq });
                continue;
            }
            let is_known = match known.get(&env.recipient) {
                Some(&k) => k,
                None => {
                    let k = devices.get(env.recipient.as_bytes())?.is_some();
                    known.insert(env.recipient, k);
                    k
                }
            };
            if !is_known {
                outcomes.push(CommitOutcome::Refused(Refusal::UnknownRecipient));
                continue;
            }
            let state = match states.entry(env.recipient) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let s = match ahead.states.get(&env.recipient) {
                        Some(&s) => s,
                        None => load_state(&meta, &env.recipient)?,
                    };
                    v.insert(s)
                }
            };
            let len = env.bytes.len() as u64;
            if let Err(refusal) = rules::admit(state, len, &self.limits)
                .and_then(|()| rules::admit_store(stored.saturating_add(added), len, &self.limits))
            {
                outcomes.push(CommitOutcome::Refused(refusal));
                continue;
            }
            let seq = rules::assign(state, len)
                .ok_or_else(|| StoreError::Backend("inbox seq space exhausted".into()))?;
            let body = append.push_logged(
                &env.recipient,
                seq,
                &env.bytes,
                LoggedFields {
                    sender: env.sender,
                    message_id: env.message_id,
                    conversation: env.conversation,
                    sender_seq: env.sender_seq,
                    expires_at_ms: env.expires_at_ms,
                },
            )?;
            records.push_back((env.recipient, seq, body));
            kept.push(env.clone());
            keys.insert(dk, seq);
            added = added.saturating_add(stored_cost(len));
            outcomes.push(CommitOutcome::Stored { seq });
        }
        if kept.is_empty() {
            // Nothing appended: a segment the append may have created is
            // created again by the next one.
            return Ok(outcomes);
        }
        append.seal_batch();
        // A failed write or sync poisons the log (see
        // `Append::write_and_sync`): nothing of this batch was acknowledged.
        append.write_and_sync()?;
        let replay = Replay {
            id: append.id,
            records,
            span: (append.start(), append.end()),
            rolled_from: append.rolled_from,
        };
        self.segments.finish_append(append);
        ahead.pending.push_back(Pending {
            replay,
            envelopes: kept,
            added,
        });
        ahead.states.extend(states);
        ahead.dedup.extend(keys);
        ahead.added = ahead.added.saturating_add(added);
        ahead.total = ahead.total.saturating_add(ahead_count(&outcomes));
        Ok(outcomes)
    }

    /// The checkpoint has committed: commit the batches appended meanwhile
    /// to the index, in log order, with the seqs their records carry, then
    /// let sends commit to the index again.
    ///
    /// Batches that lie back to back in one segment are indexed together,
    /// in one transaction ([`take_run`]). The lock over [`Ahead`] is taken
    /// for one such run at a time, so sends go on to the log meanwhile
    /// instead of waiting for the whole backlog.
    /// A replay does not take the segments' commit lock either (it chooses
    /// no offset and moves no end; see `RedbStore::commit_batch`), so a
    /// send's append and sync run while a batch is indexed. The overlay of states and dedup keys stays until the
    /// log is drained: what it holds is in the index or in the log, and it
    /// is the newer of the two. Indexing a batch costs no sync, so the drain
    /// outpaces sends, which each wait for one; should it not, it holds the
    /// lock for the rest after [`DRAIN_TURNS`] runs.
    ///
    /// A failure poisons the log (the batches' senders hold acks; the next
    /// open replays them).
    pub(super) fn drain_ahead(&self) -> Result<(), StoreError> {
        let mut turns = 0usize;
        loop {
            let mut ahead = self.ahead();
            let Some(next) = take_run(&mut ahead.pending) else {
                ahead.close();
                self.indexed.notify_all();
                return Ok(());
            };
            turns += 1;
            let result = if turns > DRAIN_TURNS {
                // Hold the lock to the end: no send is appended meanwhile.
                let mut result = self.commit_batch(&next.envelopes, Some(next.replay), None);
                while result.is_ok()
                    && let Some(p) = take_run(&mut ahead.pending)
                {
                    result = self.commit_batch(&p.envelopes, Some(p.replay), None);
                }
                result
            } else {
                drop(ahead);
                let added = next.added;
                let result = self.commit_batch(&next.envelopes, Some(next.replay), None);
                if result.is_ok() {
                    // Counted by the store now.
                    let mut ahead = self.ahead();
                    ahead.added = ahead.added.saturating_sub(added);
                }
                result
            };
            if let Err(e) = result {
                self.segments.poison();
                self.ahead().close();
                self.indexed.notify_all();
                tracing::error!(
                    "acknowledged envelopes could not be committed to the index ({e}); \
                     refusing commits until a restart recovers them from the log"
                );
                return Err(e);
            }
        }
    }

    /// Wait until no envelope of `device`'s inbox is in the log alone, so a
    /// read sees everything acknowledged to its senders. Only reads of an
    /// inbox that received sends during a checkpoint wait, for at most the
    /// rest of that checkpoint and its drain.
    pub(super) fn wait_indexed(&self, device: &DeviceId) {
        let mut ahead = self.ahead();
        while ahead.states.contains_key(device) {
            ahead = self
                .indexed
                .wait(ahead)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Envelopes the log holds that the index does not have yet (sends
    /// acknowledged while a checkpoint runs).
    pub fn ahead_of_index(&self) -> u64 {
        self.ahead().dedup.len() as u64
    }

    /// Envelopes acknowledged from the log alone (while a checkpoint held
    /// the index) since the store opened.
    pub fn logged_ahead_total(&self) -> u64 {
        self.ahead().total
    }
}

/// The next batches of `pending` that lie back to back in one segment, as
/// one batch of at most [`RUN_ENVELOPES`] envelopes (or one larger batch):
/// indexing them in one transaction copies each index page they touch
/// once, where a transaction per batch copied it once per batch. A replay
/// checks each record against the log in order, so records taken in log
/// order from adjacent batches replay as they would one by one; the
/// segment row ends up at the last one's end either way.
fn take_run(pending: &mut VecDeque<Pending>) -> Option<Pending> {
    take_run_of(pending, RUN_ENVELOPES)
}

/// [`take_run`] with its bound as a parameter (for tests).
fn take_run_of(pending: &mut VecDeque<Pending>, max: usize) -> Option<Pending> {
    let mut run = pending.pop_front()?;
    while let Some(next) = pending.front() {
        let adjacent = next.replay.id == run.replay.id
            && next.replay.span.0 == run.replay.span.1
            && next.replay.rolled_from.is_none();
        if !adjacent || run.envelopes.len() + next.envelopes.len() > max {
            break;
        }
        let Some(next) = pending.pop_front() else {
            break;
        };
        run.replay.records.extend(next.replay.records);
        run.replay.span.1 = next.replay.span.1;
        run.envelopes.extend(next.envelopes);
        run.added = run.added.saturating_add(next.added);
    }
    Some(run)
}

/// Most envelopes [`take_run`] joins into one index transaction: a few
/// milliseconds of indexing, so the drain still gives up the lock over
/// [`Ahead`] often.
const RUN_ENVELOPES: usize = 4096;

fn ahead_count(outcomes: &[CommitOutcome]) -> u64 {
    outcomes
        .iter()
        .filter(|o| matches!(o, CommitOutcome::Stored { .. }))
        .count() as u64
}

/// An upper bound of a batch's bytes in the log (records and trailer), to
/// decide whether it still fits in the active segment.
pub(super) fn batch_upper_bound(batch: &[NewEnvelope]) -> u64 {
    batch
        .iter()
        .map(|e| (RECORD_HEADER_LEN + BATCH_ENTRY_LEN) as u64 + e.bytes.len() as u64)
        .sum::<u64>()
        + BATCH_HEADER_LEN as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::segments::BodyRef;
    use hush_protocol::{ConversationId, MessageId};

    /// A batch of `n` envelopes of segment `id` from `start` to `end`.
    fn batch(id: u32, (start, end): (u64, u64), rolled_from: Option<u32>, n: u8) -> Pending {
        let device = DeviceId([n; 16]);
        let records = (0..n)
            .map(|i| {
                let body = BodyRef {
                    segment: id,
                    offset: start + u64::from(i),
                    len: 1,
                };
                (device, u64::from(i), body)
            })
            .collect();
        let envelopes = (0..n)
            .map(|i| NewEnvelope {
                recipient: device,
                sender: device,
                message_id: MessageId([i; 16]),
                conversation: ConversationId([0; 16]),
                sender_seq: u64::from(i),
                bytes: vec![i],
                expires_at_ms: 0,
            })
            .collect();
        Pending {
            replay: Replay {
                id,
                records,
                span: (start, end),
                rolled_from,
            },
            envelopes,
            added: u64::from(n),
        }
    }

    fn spans(runs: &[Pending]) -> Vec<(u32, (u64, u64), usize, u64)> {
        runs.iter()
            .map(|r| (r.replay.id, r.replay.span, r.envelopes.len(), r.added))
            .collect()
    }

    #[test]
    fn batches_back_to_back_in_one_segment_are_indexed_as_one() {
        let mut pending: VecDeque<Pending> = [
            batch(1, (100, 200), None, 2),
            batch(1, (200, 300), None, 3),
            // A roll: the next segment starts a run of its own.
            batch(2, (32, 90), Some(1), 1),
            batch(2, (90, 150), None, 2),
            // A gap (not the next batch of the log) ends a run.
            batch(2, (160, 170), None, 1),
            // So does the bound on envelopes per run.
            batch(2, (170, 180), None, 4),
            batch(2, (180, 190), None, 3),
        ]
        .into_iter()
        .collect();
        let mut runs = Vec::new();
        while let Some(run) = take_run_of(&mut pending, 6) {
            runs.push(run);
        }
        assert_eq!(
            spans(&runs),
            vec![
                (1, (100, 300), 5, 5),
                (2, (32, 150), 3, 3),
                (2, (160, 180), 5, 5),
                (2, (180, 190), 3, 3),
            ]
        );
        // The records and envelopes stay in log order, and a run keeps the
        // roll of its first batch.
        let first: Vec<u64> = runs[0].replay.records.iter().map(|r| r.1).collect();
        assert_eq!(first, vec![0, 1, 0, 1, 2]);
        let senders: Vec<u8> = runs[0].envelopes.iter().map(|e| e.sender.0[0]).collect();
        assert_eq!(senders, vec![2, 2, 3, 3, 3]);
        assert_eq!(runs[1].replay.rolled_from, Some(1));
        assert_eq!(runs[0].replay.rolled_from, None);
    }
}
