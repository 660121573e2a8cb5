//! Group commit: the one thread that writes envelopes to the store.
//!
//! redb runs one write transaction at a time and every commit of sends costs
//! a sync (the envelope segment's `fdatasync`; see `docs/STORAGE.md` §4), so
//! committing each `Send` separately would cap the relay at a few thousand
//! sends per second whatever the number of clients.
//! Instead connections queue their validated envelopes here; the writer
//! takes the first request, drains whatever else is already queued (up to
//! [`MAX_GROUP_ENVELOPES`]), and commits all of it in ONE transaction
//! ([`Store::commit_then`]). Once that commit is durable, every request is
//! answered and the live sessions of the inboxes that grew are woken (while
//! a checkpoint runs, once it is done; see `run`). Nobody is acknowledged
//! before the commit is durable. The redb store makes it durable behind
//! the commit, on its sync thread, which also sends the answers: the writer
//! commits the next group meanwhile. There is no artificial delay: while
//! one group is being synced, the next accumulates by itself.
//!
//! The writer is a dedicated OS thread, not an async task that hands each
//! commit to the blocking pool: a handoff costs two cross-thread wake-ups
//! per commit (to the pool thread and back to the task), which at the small
//! batches of a lightly loaded relay was a sizeable part of a send's
//! latency. The thread blocks on the queue, commits, and answers through the
//! requests' oneshot channels, which wake the connections directly.

use super::hub::DeviceHub;
use crate::metrics::Metrics;
use crate::store::redb_store::COMPACT_STEP_BYTES;
use crate::store::{CommitOutcome, NewEnvelope, Store, StoreError, Then};
use hush_protocol::DeviceId;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Most envelopes gathered into one transaction (a group may exceed it by
/// at most one request's batch).
pub const MAX_GROUP_ENVELOPES: usize = 4096;

/// Requests that may wait for the writer before senders are slowed down.
pub const QUEUE_DEPTH: usize = 1024;

/// The result of committing one request's envelopes.
pub type CommitResult = Result<Vec<CommitOutcome>, StoreError>;

/// One connection's envelopes, and where to send their outcomes.
///
/// A connection hands over the `Send`s of one read together (one queue
/// message, one wake-up of this thread, one answer): `envelopes` is theirs
/// in order, and the answer carries one outcome per envelope in the same
/// order, for the connection to split among its requests.
#[derive(Debug)]
pub struct CommitRequest {
    /// Validated envelopes of one or more `Send`s, in request order.
    pub envelopes: Vec<NewEnvelope>,
    /// How many `Send` requests they came from (for
    /// [`Metrics::send_durable_seconds`], which counts requests).
    pub sends: usize,
    /// Receives one outcome per envelope, after the commit is durable.
    pub reply: oneshot::Sender<CommitResult>,
    /// When the request was queued for the writer (for
    /// [`Metrics::send_durable_seconds`]).
    pub queued_at: Instant,
}

/// What the writer's queue carries.
#[derive(Debug)]
pub enum WriterMsg {
    /// Commit these envelopes.
    Commit(CommitRequest),
    /// Stop taking requests; commit and answer those already queued, then
    /// end.
    Stop,
    /// Look again whether compaction may run (sent by the clock task of
    /// [`start`] while the `CompactionPacer` holds compaction back).
    Wake,
}

/// Start the writer thread on `rx`; `wake` is a sender of the same queue,
/// for the [`WriterMsg::Wake`]s of held-back compaction. The returned task
/// ends when the thread has ended: after a [`WriterMsg::Stop`] and the
/// requests queued before it were answered, or once every sender is gone.
/// Until then it is the writer's clock: the thread itself never waits on a
/// timer.
pub fn start(
    rx: mpsc::Receiver<WriterMsg>,
    wake: mpsc::WeakSender<WriterMsg>,
    store: Arc<dyn Store>,
    hub: Arc<DeviceHub>,
    metrics: Arc<Metrics>,
) -> std::io::Result<JoinHandle<()>> {
    let (done_tx, mut done_rx) = oneshot::channel::<()>();
    let held_back = Arc::new(AtomicBool::new(false));
    let held = Arc::clone(&held_back);
    std::thread::Builder::new()
        .name("hush-writer".into())
        .spawn(move || {
            // Locals drop in reverse order, also when unwinding: the store,
            // hub and metrics are released before `done_tx` tells the waiter
            // the writer has ended. Otherwise a caller could reopen the
            // database while this thread still held it ("already open").
            let done_tx = done_tx;
            let (rx, store, hub, metrics) = (rx, store, hub, metrics);
            run(rx, &store, &hub, &metrics, &held);
            drop((store, hub, metrics));
            let _ = done_tx.send(());
        })?;
    // A panicking thread drops `done_tx`, which ends the wait as well.
    Ok(tokio::spawn(async move {
        let mut clock = tokio::time::interval(COMPACT_QUIET);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = &mut done_rx => break,
                _ = clock.tick() => {
                    if held_back.swap(false, Ordering::AcqRel)
                        && let Some(tx) = wake.upgrade()
                    {
                        // A full queue wakes the writer anyway.
                        let _ = tx.try_send(WriterMsg::Wake);
                    }
                }
            }
        }
    }))
}

/// How long the relay must have served no send and no pull before
/// compaction steps run back to back.
pub const COMPACT_QUIET: Duration = Duration::from_millis(50);

/// While the relay is busy, compaction still gets one step whenever this
/// long has passed since its last one, so a relay that is never quiet
/// reclaims space all the same (at least 256 KiB of records looked at per
/// interval).
pub const COMPACT_AT_LEAST_EVERY: Duration = Duration::from_millis(100);

/// When segment compaction may take a step.
///
/// Compaction is background work that competes with the relay's traffic
/// for the CPU and the disk: on a small machine, compacting back to back
/// while a device drains its backlog (each page's ack makes segments
/// sparse) slowed that catch-up by a tenth. So it yields to traffic: steps
/// run back to back only once no send or pull has been served for
/// [`COMPACT_QUIET`], and otherwise one every [`COMPACT_AT_LEAST_EVERY`].
/// Pure bookkeeping over a traffic counter and the caller's clock, so it is
/// tested without threads or sleeps.
#[derive(Debug)]
struct CompactionPacer {
    /// The traffic counter when last looked at, and since when it has had
    /// that value.
    seen: u64,
    unchanged_since: Instant,
    last_step: Option<Instant>,
}

impl CompactionPacer {
    /// A pacer for a relay that has just started: it counts as quiet.
    fn new(now: Instant, traffic: u64) -> CompactionPacer {
        CompactionPacer {
            seen: traffic,
            unchanged_since: now.checked_sub(COMPACT_QUIET).unwrap_or(now),
            last_step: None,
        }
    }

    /// Whether a compaction step may run now, given the traffic counter
    /// (sends and pulls served so far).
    fn may_step(&mut self, now: Instant, traffic: u64) -> bool {
        let quiet = self.is_quiet(now, traffic);
        let overdue = self
            .last_step
            .is_none_or(|at| now.saturating_duration_since(at) >= COMPACT_AT_LEAST_EVERY);
        quiet || overdue
    }

    /// Whether no send and no pull has been served for [`COMPACT_QUIET`],
    /// given the traffic counter now. Also when the writer may take a
    /// checkpoint: it blocks sends while it writes out the store's index.
    fn is_quiet(&mut self, now: Instant, traffic: u64) -> bool {
        if traffic != self.seen {
            self.seen = traffic;
            self.unchanged_since = now;
        }
        now.saturating_duration_since(self.unchanged_since) >= COMPACT_QUIET
    }

    /// A step ran at `now`.
    fn stepped(&mut self, now: Instant) {
        self.last_step = Some(now);
    }
}

/// Sends and pulls the relay has served: what [`CompactionPacer`] watches.
fn traffic(metrics: &Metrics) -> u64 {
    Metrics::get(&metrics.sends_total).wrapping_add(metrics.pull_latency_seconds.count())
}

/// The writer's loop. Between commit groups, while no request is waiting
/// and the [`CompactionPacer`] allows it, it runs segment compaction in
/// small steps ([`Store::compact_step`]): a send that arrives meanwhile
/// waits for at most one step. Compaction is looked for at start and after
/// every group (acks make segments sparse; a relay that receives no sends
/// does not grow, and compacts at its next send); a group after which the
/// pacer holds compaction back raises `held_back`, and the clock task of
/// [`start`] answers with a [`WriterMsg::Wake`] at its next tick.
///
/// Store checkpoints ([`Store::checkpoint`]): the redb store commits sends
/// without syncing its index (the segment log is the durable copy), and a
/// checkpoint writes that index out. Once the store says one is due
/// ([`Store::checkpoint_due`]), a thread of its own takes it while this one
/// goes on committing: the store sends those batches to its log alone
/// meanwhile and indexes them when the checkpoint is done, so their inboxes'
/// live sessions are woken then, not before (a pull would not see them
/// yet). And once compaction has nothing to do, the first quiet moment after
/// a commit group takes one here, so the log an open would replay stays
/// short.
fn run(
    mut rx: mpsc::Receiver<WriterMsg>,
    store: &Arc<dyn Store>,
    hub: &Arc<DeviceHub>,
    metrics: &Arc<Metrics>,
    held_back: &AtomicBool,
) {
    let mut background = Background::default();
    let unanswered = Arc::new(Unanswered::default());
    let mut compacting = true;
    // Commit groups since the last checkpoint.
    let mut dirty = false;
    let mut stopping = false;
    let mut pacer = CompactionPacer::new(Instant::now(), traffic(metrics));
    // Set once a commit failed after its envelopes were pushed early and
    // the store itself does not refuse commits: every later one is refused.
    let mut halted = Halt::default();
    loop {
        let ready = if (compacting || dirty) && !stopping {
            match rx.try_recv() {
                Ok(msg) => Some(msg),
                Err(mpsc::error::TryRecvError::Empty) => {
                    let now = Instant::now();
                    let seen = traffic(metrics);
                    if compacting {
                        if pacer.may_step(now, seen) {
                            compacting = compact_step(store.as_ref());
                            pacer.stepped(now);
                        } else {
                            compacting = false;
                            held_back.store(true, Ordering::Release);
                        }
                        continue;
                    }
                    if pacer.is_quiet(now, seen) && !background.running() {
                        checkpoint(store.as_ref());
                        dirty = false;
                        continue;
                    }
                    // Not quiet yet: look again at the clock's next tick.
                    held_back.store(true, Ordering::Release);
                    None
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            None
        };
        let msg = match ready {
            Some(msg) => msg,
            None => match rx.blocking_recv() {
                Some(msg) => msg,
                None => break,
            },
        };
        let first = match msg {
            WriterMsg::Commit(r) => r,
            WriterMsg::Stop => {
                // No new requests; the queued ones are still answered.
                rx.close();
                stopping = true;
                continue;
            }
            WriterMsg::Wake => {
                compacting = true;
                continue;
            }
        };
        let mut count = first.envelopes.len();
        let mut group = vec![first];
        while count < MAX_GROUP_ENVELOPES {
            match rx.try_recv() {
                Ok(WriterMsg::Commit(r)) => {
                    count += r.envelopes.len();
                    group.push(r);
                }
                Ok(WriterMsg::Stop) => {
                    rx.close();
                    stopping = true;
                }
                Ok(WriterMsg::Wake) => {}
                Err(_) => break,
            }
        }
        let answer = Answer {
            hub: Arc::clone(hub),
            metrics: Arc::clone(metrics),
            deferred: Arc::clone(&background.deferred),
            unanswered: Arc::clone(&unanswered),
        };
        commit_group(group, count, store.as_ref(), answer, &mut halted);
        compacting = true;
        dirty = true;
        if !background.running() && store.checkpoint_due() {
            background.start(store, hub);
        }
    }
    background.wait();
    checkpoint(store.as_ref());
    // Groups whose syncs run behind their commits are answered by the
    // store's sync thread: the writer has ended once they all were.
    unanswered.wait();
    tracing::debug!("commit writer stopped");
}

/// Commit groups whose answers are still owed (the store answers them once
/// their syncs are done, [`Store::commit_then`]).
#[derive(Default)]
struct Unanswered {
    count: std::sync::Mutex<usize>,
    zero: std::sync::Condvar,
}

impl Unanswered {
    fn add(&self) {
        *self
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
    }

    fn done(&self) {
        let mut n = self
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.zero.notify_all();
        }
    }

    fn wait(&self) {
        let mut n = self
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n > 0 {
            n = self
                .zero
                .wait(n)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// Whether the writer refuses every commit: set once a commit failed after
/// its envelopes were pushed early while the store itself goes on taking
/// commits (it broke its promise to refuse them; see
/// [`Store::commit_early`]).
#[derive(Default)]
struct Halt {
    why: Option<String>,
    /// Raised by a group's answer: it failed after its early push.
    failed_early: Arc<AtomicBool>,
}

/// What answering a commit group needs: it may happen on the store's sync
/// thread, after the writer has gone on to the next group.
struct Answer {
    hub: Arc<DeviceHub>,
    metrics: Arc<Metrics>,
    deferred: Arc<Deferred>,
    unanswered: Arc<Unanswered>,
}

/// The requests of one commit group, to be answered once. Dropped
/// unanswered (the store panicked, or dropped the group), each gets an
/// error rather than silence.
struct Replies {
    replies: Vec<(usize, oneshot::Sender<CommitResult>)>,
    unanswered: Arc<Unanswered>,
}

impl Replies {
    fn error(&mut self, msg: &str) {
        for (_, reply) in self.replies.drain(..) {
            let _ = reply.send(Err(StoreError::Backend(msg.to_owned())));
        }
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.error("the commit ended without an answer");
        self.unanswered.done();
    }
}

/// Inbox heads that commits moved, held back while a checkpoint runs on
/// its thread (`Some`), to be announced when it is done.
type Deferred = std::sync::Mutex<Option<Vec<(DeviceId, u64)>>>;

/// The checkpoint thread, if one was started.
#[derive(Default)]
struct Background {
    thread: Option<std::thread::JoinHandle<()>>,
    deferred: Arc<Deferred>,
}

impl Background {
    /// Whether a checkpoint is still running.
    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Take a checkpoint on a thread of its own; the inbox heads committed
    /// meanwhile are announced when it is done.
    fn start(&mut self, store: &Arc<dyn Store>, hub: &Arc<DeviceHub>) {
        self.wait();
        *lock(&self.deferred) = Some(Vec::new());
        let (store, waker, deferred) = (
            Arc::clone(store),
            Arc::clone(hub),
            Arc::clone(&self.deferred),
        );
        let spawned = std::thread::Builder::new()
            .name("hush-checkpoint".into())
            .spawn(move || {
                checkpoint(store.as_ref());
                let heads = lock(&deferred).take().unwrap_or_default();
                if !heads.is_empty() {
                    waker.committed(&heads);
                }
            });
        match spawned {
            Ok(t) => self.thread = Some(t),
            Err(e) => {
                // The store takes an overdue checkpoint by itself.
                tracing::warn!("could not start a checkpoint thread: {e}");
                if let Some(heads) = lock(&self.deferred).take() {
                    hub.committed(&heads);
                }
            }
        }
    }

    /// Wait for a running checkpoint to end.
    fn wait(&mut self) {
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the checkpoint thread panicked");
        }
    }
}

fn lock(d: &Deferred) -> std::sync::MutexGuard<'_, Option<Vec<(DeviceId, u64)>>> {
    d.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Take a store checkpoint; a failure is logged and loses nothing (the next
/// open replays the segment log, and the store takes another at its bound).
fn checkpoint(store: &dyn Store) {
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.checkpoint()));
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("store checkpoint failed: {e}"),
        Err(_) => tracing::error!("store checkpoint panicked"),
    }
}

/// One compaction step; whether to try another. A failure is logged and
/// ends compaction until the next commit group (the store is unchanged by a
/// failed step).
fn compact_step(store: &dyn Store) -> bool {
    let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.compact_step(COMPACT_STEP_BYTES)
    }));
    match step {
        Ok(Ok(more)) => more,
        Ok(Err(e)) => {
            tracing::warn!("segment compaction failed: {e}");
            false
        }
        Err(_) => {
            tracing::error!("segment compaction panicked");
            false
        }
    }
}

fn commit_group(
    group: Vec<CommitRequest>,
    count: usize,
    store: &dyn Store,
    answer: Answer,
    halted: &mut Halt,
) {
    if halted.why.is_none()
        && halted.failed_early.load(Ordering::Acquire)
        && store.failure().is_none()
    {
        halted.why = Some("a commit failed after its envelopes were pushed early".into());
    }
    answer.unanswered.add();
    let mut replies = Replies {
        replies: Vec::with_capacity(group.len()),
        unanswered: Arc::clone(&answer.unanswered),
    };
    if let Some(why) = halted.why.as_ref() {
        for r in group {
            replies.replies.push((r.envelopes.len(), r.reply));
        }
        replies.error(why);
        return;
    }
    let mut batch = Vec::new();
    let mut queued = Vec::with_capacity(group.len());
    for mut r in group {
        replies.replies.push((r.envelopes.len(), r.reply));
        queued.push((r.queued_at, r.sends));
        if batch.is_empty() {
            // The first request's vector becomes the batch: no copy.
            batch = std::mem::take(&mut r.envelopes);
            batch.reserve(count.saturating_sub(batch.len()));
        } else {
            batch.append(&mut r.envelopes);
        }
    }
    let started = Instant::now();
    let hub = Arc::clone(&answer.hub);
    let metrics = Arc::clone(&answer.metrics);
    // Live recipients that asked for early pushes get the envelopes once
    // they are written, while the store syncs them (docs/PROTOCOL.md §8.5).
    let announced = Arc::new(AtomicBool::new(false));
    let then: Then = {
        let announced = Arc::clone(&announced);
        let failed_early = Arc::clone(&halted.failed_early);
        Box::new(move |batch, result| {
            if announced.load(Ordering::Acquire) && result.is_err() {
                failed_early.store(true, Ordering::Release);
            }
            answer.finish(batch, result, count, replies, queued);
        })
    };
    // A panic in the store must not take the writer (and every later send)
    // down with it: the group's requests get an error (`Replies`).
    let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if hub.any_early() {
            let mut tell = |batch: &[NewEnvelope], outcomes: &[CommitOutcome]| {
                announced.store(true, Ordering::Release);
                hub.written_early(batch.iter().zip(outcomes).filter_map(|(e, o)| match o {
                    CommitOutcome::Stored { seq } => Some((e.recipient, *seq, e.bytes.as_slice())),
                    _ => None,
                }));
            };
            store.commit_then(batch, Some(&mut tell), then);
        } else {
            store.commit_then(batch, None, then);
        }
    }));
    if committed.is_err() {
        tracing::error!("group commit of {count} envelopes panicked");
        if announced.load(Ordering::Acquire) {
            halted.failed_early.store(true, Ordering::Release);
        }
    }
    metrics
        .commit_latency_seconds
        .observe_duration(started.elapsed());
    Metrics::add(&metrics.commit_batches_total, 1);
    metrics.commit_batch_size.observe(count as f64);
}

impl Answer {
    /// Answer a group once its outcomes are final (durable, or failed):
    /// wake the live sessions of the inboxes that grew, then the senders.
    fn finish(
        self,
        batch: Vec<NewEnvelope>,
        result: CommitResult,
        count: usize,
        mut replies: Replies,
        queued: Vec<(Instant, usize)>,
    ) {
        let done = Instant::now();
        for (at, sends) in queued {
            let waited = done.saturating_duration_since(at);
            for _ in 0..sends {
                self.metrics.send_durable_seconds.observe_duration(waited);
            }
        }
        match result {
            Ok(outcomes) if outcomes.len() == count => {
                // Wake the live sessions first: the commit is durable already.
                let mut heads: HashMap<DeviceId, u64> = HashMap::new();
                for (env, outcome) in batch.iter().zip(&outcomes) {
                    if let CommitOutcome::Stored { seq } = outcome {
                        let head = heads.entry(env.recipient).or_insert(0);
                        *head = (*head).max(*seq);
                    }
                }
                let heads: Vec<(DeviceId, u64)> = heads.into_iter().collect();
                // While a checkpoint runs, the store may hold these envelopes
                // in its log alone: their sessions are woken when it is done.
                let mut held = lock(&self.deferred);
                match held.as_mut() {
                    Some(later) => later.extend(heads),
                    None => {
                        drop(held);
                        // The envelopes go along, so a live recipient's push
                        // need not read them back from the store.
                        let fresh = batch
                            .into_iter()
                            .zip(&outcomes)
                            .filter_map(|(e, o)| match o {
                                CommitOutcome::Stored { seq } => Some((e.recipient, *seq, e.bytes)),
                                _ => None,
                            });
                        self.hub.committed_fresh(&heads, fresh);
                    }
                }
                let mut rest = outcomes.into_iter();
                for (n, reply) in replies.replies.drain(..) {
                    let mine: Vec<CommitOutcome> = rest.by_ref().take(n).collect();
                    // A connection that went away no longer needs its answer.
                    let _ = reply.send(Ok(mine));
                }
            }
            Ok(outcomes) => {
                let msg = format!("store returned {} outcomes for {count}", outcomes.len());
                tracing::error!("{msg}");
                replies.error(&msg);
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!("group commit of {count} envelopes failed: {msg}");
                replies.error(&msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use hush_protocol::{ConversationId, DeviceRegistration, MessageId, UserKey};

    fn envelope(recipient: DeviceId, n: u8) -> NewEnvelope {
        NewEnvelope {
            recipient,
            sender: DeviceId([9; 16]),
            message_id: MessageId::new(1_700_000_000_000, [n; 10]),
            conversation: ConversationId([4; 16]),
            sender_seq: u64::from(n),
            bytes: vec![n; 64],
            expires_at_ms: u64::MAX,
        }
    }

    fn request(env: NewEnvelope) -> (WriterMsg, oneshot::Receiver<CommitResult>) {
        let (reply, rx) = oneshot::channel();
        let msg = WriterMsg::Commit(CommitRequest {
            envelopes: vec![env],
            sends: 1,
            reply,
            queued_at: Instant::now(),
        });
        (msg, rx)
    }

    #[tokio::test]
    async fn stop_answers_what_was_queued_and_refuses_what_follows() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(Default::default()));
        let recipient = DeviceId([1; 16]);
        store
            .register_device(
                &DeviceRegistration {
                    device: recipient,
                    user: UserKey([2; 32]),
                    signing_key: [3; 32],
                    agreement_key: [4; 32],
                    user_signature: [5; 64],
                },
                0,
            )
            .expect("register");
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        // Queued before the writer runs: two sends, then the stop.
        let (first, first_rx) = request(envelope(recipient, 1));
        let (second, second_rx) = request(envelope(recipient, 2));
        for msg in [first, second, WriterMsg::Stop] {
            tx.try_send(msg).expect("queue has room");
        }
        let metrics = Arc::new(Metrics::new());
        let writer = start(
            rx,
            tx.downgrade(),
            Arc::clone(&store),
            Arc::new(DeviceHub::default()),
            Arc::clone(&metrics),
        )
        .expect("writer thread starts");
        writer.await.expect("writer ends after the stop");
        // The thread let go of the store before it said it had ended, so
        // the database can be reopened at once.
        assert_eq!(Arc::strong_count(&store), 1);
        // One durable-wait observation per answered send, none for the stop.
        assert_eq!(metrics.send_durable_seconds.count(), 2);

        let seqs: Vec<_> = [first_rx.await, second_rx.await]
            .into_iter()
            .map(|r| r.expect("answered").expect("committed"))
            .collect();
        assert_eq!(
            seqs,
            vec![
                vec![CommitOutcome::Stored { seq: 1 }],
                vec![CommitOutcome::Stored { seq: 2 }]
            ]
        );
        let (late, _late_rx) = request(envelope(recipient, 3));
        assert!(
            tx.send(late).await.is_err(),
            "a stopped writer takes no more requests"
        );
        let page = store.pull(&recipient, 0, 10, usize::MAX).expect("pull");
        assert_eq!(page.envelopes.len(), 2);
    }

    #[tokio::test]
    async fn a_quiet_writer_checkpoints_the_store_by_itself() {
        let dir = tempfile::tempdir().expect("temp dir");
        let redb = Arc::new(
            crate::store::redb_store::RedbStore::open(
                dir.path().join("s.redb"),
                Default::default(),
            )
            .expect("open"),
        );
        let store: Arc<dyn Store> = redb.clone();
        let recipient = DeviceId([1; 16]);
        store
            .register_device(
                &DeviceRegistration {
                    device: recipient,
                    user: UserKey([2; 32]),
                    signing_key: [3; 32],
                    agreement_key: [4; 32],
                    user_signature: [5; 64],
                },
                0,
            )
            .expect("register");
        assert!(!redb.needs_checkpoint());
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = start(
            rx,
            tx.downgrade(),
            Arc::clone(&store),
            Arc::new(DeviceHub::default()),
            Arc::new(Metrics::new()),
        )
        .expect("writer thread starts");
        let (msg, reply) = request(envelope(recipient, 1));
        tx.send(msg).await.expect("writer takes requests");
        assert!(matches!(
            reply.await.expect("answered").expect("committed")[..],
            [CommitOutcome::Stored { seq: 1 }]
        ));
        // The send's index commit was not durable; with no traffic after
        // it, the writer makes it so (the store alone would wait for its
        // next send past the bound).
        let deadline = Instant::now() + Duration::from_secs(10);
        while redb.needs_checkpoint() {
            assert!(Instant::now() < deadline, "no checkpoint while quiet");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx.send(WriterMsg::Stop)
            .await
            .expect("writer takes the stop");
        writer.await.expect("writer ends after the stop");
    }

    /// Commit one envelope as the writer does, and wait for its answer.
    fn commit_one(
        store: &dyn Store,
        hub: &Arc<DeviceHub>,
        deferred: &Arc<Deferred>,
        env: NewEnvelope,
    ) {
        let (reply, answer) = oneshot::channel();
        let request = CommitRequest {
            envelopes: vec![env],
            sends: 1,
            reply,
            queued_at: Instant::now(),
        };
        let answer_to = Answer {
            hub: Arc::clone(hub),
            metrics: Arc::new(Metrics::new()),
            deferred: Arc::clone(deferred),
            unanswered: Arc::new(Unanswered::default()),
        };
        commit_group(vec![request], 1, store, answer_to, &mut Halt::default());
        answer
            .blocking_recv()
            .expect("answered")
            .expect("committed");
    }

    /// A redb store in a temporary directory, with one registered device.
    fn store_with_recipient() -> (tempfile::TempDir, Arc<dyn Store>, DeviceId) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(
            crate::store::redb_store::RedbStore::open(
                dir.path().join("s.redb"),
                Default::default(),
            )
            .expect("open"),
        );
        let recipient = DeviceId([1; 16]);
        store
            .register_device(
                &DeviceRegistration {
                    device: recipient,
                    user: UserKey([2; 32]),
                    signing_key: [3; 32],
                    agreement_key: [4; 32],
                    user_signature: [5; 64],
                },
                0,
            )
            .expect("register");
        (dir, store, recipient)
    }

    /// A commit hands what it wrote to the hub for an owner that asked for
    /// early pushes, then moves the durable head; without one asking, the
    /// hub keeps nothing.
    #[test]
    fn a_commit_hands_its_envelopes_to_owners_that_asked_for_early_pushes() {
        let (_dir, store, recipient) = store_with_recipient();
        let valid = |n: u8| {
            let mut e = envelope(recipient, n);
            e.bytes = hush_protocol::Envelope {
                header: hush_protocol::EnvelopeHeader {
                    message_id: e.message_id,
                    sender_device: e.sender,
                    recipient_device: recipient,
                    conversation_id: e.conversation,
                    sender_seq: e.sender_seq,
                    sent_at_ms: 1_700_000_000_000,
                    ratchet: vec![1; 40],
                    session_init: None,
                    important: false,
                },
                ciphertext: vec![n; 64],
            }
            .to_bytes()
            .expect("encodes");
            e
        };
        let hub = Arc::new(DeviceHub::default());
        let mut session = hub.claim(recipient, 1);
        let none: Arc<Deferred> = Arc::new(std::sync::Mutex::new(None));
        commit_one(store.as_ref(), &hub, &none, valid(1));
        assert_eq!(*session.inbox.borrow_and_update(), 1);
        assert!(hub.early_after(&recipient, 0).is_none(), "nobody asked");
        assert!(hub.enable_early(&recipient, 1));
        commit_one(store.as_ref(), &hub, &none, valid(2));
        let early = hub.early_after(&recipient, 1).expect("handed over");
        assert_eq!(early.iter().map(|e| e.seq()).collect::<Vec<_>>(), vec![2]);
        assert_eq!(*session.inbox.borrow_and_update(), 2, "then durable");
    }

    #[test]
    fn sessions_hear_of_commits_made_during_a_checkpoint_when_it_ends() {
        let (_dir, store, recipient) = store_with_recipient();
        let hub = Arc::new(DeviceHub::default());
        let mut session = hub.claim(recipient, 1);
        // While a checkpoint runs, a commit's heads wait.
        let held: Arc<Deferred> = Arc::new(std::sync::Mutex::new(Some(Vec::new())));
        commit_one(store.as_ref(), &hub, &held, envelope(recipient, 1));
        assert!(!session.inbox.has_changed().expect("hub alive"));
        assert_eq!(lock(&held).as_deref(), Some(&[(recipient, 1)][..]));
        // A checkpoint thread announces them when it is done, or, if it
        // ended before the commit looked, the commit does: in both orders
        // the session hears of seq 2.
        for n in 2..=40u8 {
            let mut background = Background::default();
            background.start(&store, &hub);
            commit_one(
                store.as_ref(),
                &hub,
                &background.deferred,
                envelope(recipient, n),
            );
            background.wait();
            assert!(lock(&background.deferred).is_none());
            assert!(session.inbox.has_changed().expect("hub alive"));
            assert_eq!(*session.inbox.borrow_and_update(), u64::from(n));
        }
        assert_eq!(
            store
                .pull(&recipient, 0, 100, usize::MAX)
                .expect("pull")
                .envelopes
                .len(),
            40
        );
    }

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_quiet_relay_compacts_back_to_back() {
        let t0 = Instant::now();
        let mut pacer = CompactionPacer::new(t0, 7);
        // Just started: quiet, and never stepped.
        for ms in [0, 1, 2, 3] {
            assert!(pacer.may_step(at(t0, ms), 7));
            pacer.stepped(at(t0, ms));
        }
    }

    #[test]
    fn traffic_holds_compaction_to_one_step_per_interval() {
        let t0 = Instant::now();
        let mut pacer = CompactionPacer::new(t0, 0);
        assert!(pacer.may_step(t0, 0));
        pacer.stepped(t0);
        // A pull every 10 ms: no step until the interval has passed.
        let every = COMPACT_AT_LEAST_EVERY.as_millis() as u64;
        let mut traffic = 0;
        let mut steps = Vec::new();
        for ms in (10..=3 * every).step_by(10) {
            traffic += 1;
            if pacer.may_step(at(t0, ms), traffic) {
                pacer.stepped(at(t0, ms));
                steps.push(ms);
            }
        }
        assert_eq!(steps, vec![every, 2 * every, 3 * every]);
    }

    #[test]
    fn compaction_resumes_back_to_back_once_traffic_stops() {
        let t0 = Instant::now();
        let mut pacer = CompactionPacer::new(t0, 0);
        pacer.stepped(t0);
        // Traffic seen at 10 ms, then none.
        assert!(!pacer.may_step(at(t0, 10), 1));
        let quiet = COMPACT_QUIET.as_millis() as u64;
        assert!(!pacer.may_step(at(t0, 10 + quiet - 1), 1));
        let resumed = at(t0, 10 + quiet);
        assert!(pacer.may_step(resumed, 1));
        pacer.stepped(resumed);
        // Still quiet: the next step need not wait for the interval.
        assert!(pacer.may_step(resumed + Duration::from_millis(1), 1));
    }
}
