//! Segment syncs that run behind the envelope commits.
//!
//! A send commit writes its batch to the segment log, commits the batch's
//! index rows (without a sync of the index: the log is the durable copy,
//! `docs/STORAGE.md` §5), and may be answered only once the batch's bytes
//! are durable: after an `fdatasync` of the segment. Done in line, the
//! commit writer sat idle through every one of those syncs, and under heavy
//! ingest they were most of each group commit (`BENCHMARKS.md`). Here the
//! writer hands the sync to a standing thread as soon as the batch is
//! written, indexes and commits it meanwhile, and goes on with the next
//! group at once; the thread takes every sync queued meanwhile and issues
//! one `fdatasync` per file for all of them (each was queued after its
//! batch was written, so one sync covers them all), and answers each group,
//! in commit order, once both its sync and its commit are done.
//!
//! Each such commit gets a generation before its index rows become
//! visible, and the thread marks generations durable in order. What was
//! safe because the rows committed only after their bytes were durable is
//! kept so by waiting for the generations in flight:
//! - a read that hands out envelopes or seqs (a pull, an inbox's counters)
//!   waits until every generation issued when its snapshot began is
//!   durable ([`Behind::settle`]), so no device sees an envelope that a
//!   crash could still take back;
//! - a durable commit of the index (a checkpoint, the periodic durable ack,
//!   a registration, compaction) waits for them all first
//!   ([`Behind::drain`]), so the index is never durable ahead of the bytes
//!   its rows point at;
//! - a batch that starts a new segment waits for them too, so the log never
//!   holds a whole batch in a newer segment behind a torn one in an older
//!   segment (which an open could not replay);
//! - a checkpoint lets sends go to the log alone only once they are
//!   drained (`ahead`), whose answers then never rest on bytes in flight.
//!
//! A failed sync fails its generation and every one after it, poisons the
//! log (every later send is refused until a restart, whose replay recovers
//! every envelope that was acknowledged), and makes the waits above fail.

use crate::store::StoreError;
use crate::store::segments::LaterSync;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// What runs once a generation's bytes are durable (`Ok`) or its sync or
/// commit failed (`Err`): the answers to its senders.
pub(crate) type Job = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Generations issued and not yet answered, at most, before a commit waits
/// for the syncs to catch up. One sync covers every generation queued when
/// it starts, so a few in flight are enough to keep the writer busy; the
/// bound keeps what waits for answers small (each group holds up to the
/// writer's 4,096 envelopes) when the disk stalls.
pub const MAX_BEHIND: u64 = 8;

#[derive(Default)]
struct State {
    /// The last generation handed out.
    issued: u64,
    /// Every generation up to this one is durable (synced, or had nothing
    /// to sync): what reads and durable commits wait for.
    durable: u64,
    /// Every generation up to this one was answered.
    answered: u64,
    /// Generations whose batches were written, with the segment to sync
    /// (`None`: nothing to sync, as for a commit that failed first).
    syncs: BTreeMap<u64, Option<LaterSync>>,
    /// Generations whose commits are done, with their answers.
    jobs: BTreeMap<u64, Job>,
    /// The first generation whose sync failed: it and every one after it
    /// fail.
    failed_from: Option<u64>,
    /// The store is closing: the thread ends once nothing more can move.
    closing: bool,
    /// Tests hold the syncs back, to act while commits are in flight.
    #[cfg(test)]
    held: bool,
}

impl State {
    fn failed(&self) -> bool {
        self.failed_from.is_some()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the sync thread: a sync or an answer was queued, or closing.
    work: Condvar,
    /// Wakes waiters: `durable` or `answered` moved.
    settled: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The standing sync thread and its queue.
pub(crate) struct Behind {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Behind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Behind")
            .field("issued", &st.issued)
            .field("durable", &st.durable)
            .field("answered", &st.answered)
            .field("failed", &st.failed())
            .finish_non_exhaustive()
    }
}

/// A generation handed out to a commit. Dropped without
/// [`Ticket::queue`] (the commit failed), it passes as failed.
pub(crate) struct Ticket<'a> {
    behind: &'a Behind,
    generation: Option<u64>,
    /// Its sync was queued ([`Ticket::sync_now`]).
    syncing: bool,
}

impl Ticket<'_> {
    /// The batch is written: its sync may start now, while the commit
    /// indexes it. Its answer still waits for [`Ticket::queue`].
    pub(crate) fn sync_now(&mut self, sync: LaterSync) {
        if let (Some(g), false) = (self.generation, self.syncing) {
            self.syncing = true;
            self.behind.push(g, Some(Some(sync)), None);
        }
    }

    /// The commit is done: sync `sync` (if any, and unless
    /// [`Ticket::sync_now`] did), then run `job`, after the jobs of every
    /// earlier generation.
    pub(crate) fn queue(mut self, sync: Option<LaterSync>, job: Job) {
        if let Some(g) = self.generation.take() {
            let sync = (!self.syncing).then_some(sync);
            self.behind.push(g, sync, Some(job));
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.generation.take() {
            let sync = (!self.syncing).then_some(None);
            self.behind.push(g, sync, Some(Box::new(|_| {})));
        }
    }
}

impl Behind {
    /// Start the sync thread; `None` if no thread could be had (commits
    /// then sync in line, as before).
    pub(crate) fn start() -> Option<Behind> {
        let shared = Arc::new(Shared::default());
        let mine = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("hush-sync".into())
            .spawn(move || run(&mine))
            .map_err(|e| tracing::warn!("no sync thread ({e}): sends sync in line"))
            .ok()?;
        Some(Behind {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hand out the next generation. Call inside the commit's write
    /// transaction, after its batch was written and before it commits:
    /// a read whose snapshot holds the commit then sees the generation.
    pub(crate) fn issue(&self) -> Result<Ticket<'_>, StoreError> {
        let mut st = self.shared.lock();
        if st.failed() {
            return Err(failed());
        }
        st.issued += 1;
        Ok(Ticket {
            behind: self,
            generation: Some(st.issued),
            syncing: false,
        })
    }

    fn push(&self, generation: u64, sync: Option<Option<LaterSync>>, job: Option<Job>) {
        let mut st = self.shared.lock();
        if let Some(sync) = sync {
            st.syncs.insert(generation, sync);
        }
        if let Some(job) = job {
            st.jobs.insert(generation, job);
        }
        drop(st);
        self.shared.work.notify_one();
    }

    /// Wait until fewer than [`MAX_BEHIND`] generations are unanswered.
    pub(crate) fn wait_room(&self) {
        let mut st = self.shared.lock();
        while st.issued.saturating_sub(st.answered) >= MAX_BEHIND && !st.failed() {
            st = self
                .shared
                .settled
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Wait until every generation issued so far is durable. Call after a
    /// read transaction began: what its snapshot holds is durable then.
    pub(crate) fn settle(&self) -> Result<(), StoreError> {
        let mut st = self.shared.lock();
        let target = st.issued;
        while st.durable < target && !st.failed() {
            st = self
                .shared
                .settled
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if st.failed() { Err(failed()) } else { Ok(()) }
    }

    /// [`Behind::settle`] for a durable commit: called holding redb's
    /// write lock, so no generation can be issued meanwhile, and nothing
    /// is in flight once it returns `Ok`.
    pub(crate) fn drain(&self) -> Result<(), StoreError> {
        self.settle()
    }

    /// Hold the syncs back (`true`) or let them run again (tests).
    #[cfg(test)]
    pub(crate) fn hold(&self, held: bool) {
        self.shared.lock().held = held;
        self.shared.work.notify_one();
    }

    /// Generations issued and not yet answered (tests).
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> u64 {
        let st = self.shared.lock();
        st.issued.saturating_sub(st.answered)
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("the sync thread panicked");
        }
    }
}

fn failed() -> StoreError {
    StoreError::Backend(
        "a sync of the envelope log failed: sends are refused until the relay is restarted, \
         which recovers every acknowledged envelope from the log"
            .into(),
    )
}

/// Sync each file in `syncs` once; whether all succeeded.
fn sync_files(syncs: &[Option<LaterSync>]) -> bool {
    let mut done: Vec<&LaterSync> = Vec::new();
    for s in syncs.iter().flatten() {
        if done.iter().any(|d| d.same_file(s)) {
            continue;
        }
        if s.sync().is_err() {
            return false;
        }
        done.push(s);
    }
    true
}

/// The sync thread. Two steps, as long as either can move: take the run
/// of written generations that come next and sync each file they wrote
/// once (they are durable then); answer, in order, the durable
/// generations whose commits are done.
fn run(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        #[cfg(test)]
        if st.held && !st.closing {
            st = shared.work.wait(st).unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        let mut syncs = Vec::new();
        let mut next = st.durable;
        while let Some(sync) = st.syncs.remove(&(next + 1)) {
            syncs.push(sync);
            next += 1;
        }
        if !syncs.is_empty() {
            let first = st.durable + 1;
            let already_failed = st.failed();
            drop(st);
            let ok = !already_failed && sync_files(&syncs);
            st = shared.lock();
            st.durable = next;
            if !ok && st.failed_from.is_none() {
                st.failed_from = Some(first);
            }
            shared.settled.notify_all();
        }
        let mut jobs = Vec::new();
        while st.answered < st.durable {
            let turn = st.answered + 1;
            match st.jobs.remove(&turn) {
                Some(job) => {
                    st.answered += 1;
                    jobs.push((st.answered, job));
                }
                None => break,
            }
        }
        if !jobs.is_empty() {
            let failed_from = st.failed_from;
            drop(st);
            shared.settled.notify_all();
            for (generation, job) in jobs {
                let result = match failed_from {
                    Some(f) if generation >= f => Err(failed()),
                    _ => Ok(()),
                };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || job(result)))
                    .is_err()
                {
                    tracing::error!("answering a synced commit panicked");
                }
            }
            st = shared.lock();
            continue;
        }
        if syncs.is_empty() {
            if st.closing {
                break;
            }
            st = shared.work.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
    // Closing with generations whose turn never came (one before them was
    // never queued): they are not known durable.
    let left = std::mem::take(&mut st.jobs);
    st.syncs.clear();
    let after = st.durable + 1;
    st.failed_from.get_or_insert(after);
    drop(st);
    shared.settled.notify_all();
    for (_, job) in left {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            job(Err(StoreError::Backend(
                "the store closed before this commit was synced".into(),
            )))
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn job(tx: &mpsc::Sender<(u64, bool)>, n: u64) -> Job {
        let tx = tx.clone();
        Box::new(move |r| {
            let _ = tx.send((n, r.is_ok()));
        })
    }

    fn file_sync(dir: &std::path::Path, name: &str) -> LaterSync {
        crate::store::segments::later_sync_for_test(&dir.join(name))
    }

    #[test]
    fn generations_are_answered_in_order_whatever_order_they_are_queued_in() {
        let dir = tempfile::tempdir().unwrap();
        let behind = Behind::start().unwrap();
        let (tx, rx) = mpsc::channel();
        let t1 = behind.issue().unwrap();
        let t2 = behind.issue().unwrap();
        let t3 = behind.issue().unwrap();
        assert_eq!(behind.in_flight(), 3);
        t3.queue(Some(file_sync(dir.path(), "a")), job(&tx, 3));
        t2.queue(Some(file_sync(dir.path(), "b")), job(&tx, 2));
        // Nothing can be answered before generation 1.
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(50))
                .is_err()
        );
        // A commit that failed passes as failed, in its turn.
        drop(t1);
        let got: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(got, vec![(2, true), (3, true)]);
        behind.settle().unwrap();
        assert_eq!(behind.in_flight(), 0);
    }

    #[test]
    fn settle_waits_for_what_was_issued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let behind = Arc::new(Behind::start().unwrap());
        let ticket = behind.issue().unwrap();
        let waiter = {
            let behind = Arc::clone(&behind);
            std::thread::spawn(move || behind.settle())
        };
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!waiter.is_finished(), "settle returned before the sync");
        ticket.queue(Some(file_sync(dir.path(), "a")), Box::new(|_| {}));
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn a_failed_sync_fails_its_generation_everything_after_and_every_wait() {
        let dir = tempfile::tempdir().unwrap();
        let behind = Behind::start().unwrap();
        let (tx, rx) = mpsc::channel();
        let t1 = behind.issue().unwrap();
        let t2 = behind.issue().unwrap();
        let (bad, poisoned) = crate::store::segments::failing_sync_for_test(dir.path());
        t1.queue(Some(bad), job(&tx, 1));
        t2.queue(Some(file_sync(dir.path(), "a")), job(&tx, 2));
        let got: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(got, vec![(1, false), (2, false)]);
        assert!(poisoned.load(std::sync::atomic::Ordering::Acquire));
        assert!(behind.settle().is_err());
        assert!(behind.drain().is_err());
        assert!(behind.issue().is_err());
    }

    use crate::store::redb_store::RedbStore;
    use crate::store::redb_store::tests::registration;
    use crate::store::{CommitOutcome, NewEnvelope, Store, StoreLimits};
    use hush_protocol::{ConversationId, DeviceId, MessageId};
    use std::time::Duration;

    /// Long enough that a thread that could go on would have.
    const BLOCKED: Duration = Duration::from_millis(100);

    fn envelope(n: u32, len: usize) -> NewEnvelope {
        let mut id = [0u8; 10];
        id[6..].copy_from_slice(&n.to_be_bytes());
        NewEnvelope {
            recipient: DeviceId([1; 16]),
            sender: DeviceId([9; 16]),
            message_id: MessageId::new(1_700_000_000_000, id),
            conversation: ConversationId([4; 16]),
            sender_seq: u64::from(n),
            bytes: vec![7; len],
            expires_at_ms: u64::MAX,
        }
    }

    fn store(dir: &std::path::Path, segment_bytes: u64) -> Arc<RedbStore> {
        let store = RedbStore::open_with_segment_size(
            dir.join("s.redb"),
            StoreLimits::default(),
            segment_bytes,
        )
        .unwrap();
        store.register_device(&registration(1), 0).unwrap();
        Arc::new(store)
    }

    /// Commit `batch` through `commit_then`; its answer comes on the channel.
    fn send(
        store: &RedbStore,
        batch: Vec<NewEnvelope>,
    ) -> mpsc::Receiver<Result<Vec<CommitOutcome>, StoreError>> {
        let (tx, rx) = mpsc::channel();
        store.commit_then(
            batch,
            None,
            Box::new(move |_, result| {
                let _ = tx.send(result);
            }),
        );
        rx
    }

    fn pipe(store: &RedbStore) -> &Behind {
        store.behind.as_ref().expect("sync thread")
    }

    /// A commit whose sync is in flight is not answered, and no read hands
    /// its envelope out, until the sync is done.
    #[test]
    fn nothing_is_answered_or_read_before_the_sync_behind_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), crate::store::segments::DEFAULT_SEGMENT_BYTES);
        pipe(&store).hold(true);
        let answer = send(&store, vec![envelope(1, 100)]);
        assert_eq!(pipe(&store).in_flight(), 1);
        assert!(
            answer.recv_timeout(BLOCKED).is_err(),
            "answered before its sync"
        );
        let device = DeviceId([1; 16]);
        let pull = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.pull(&device, 0, 100, usize::MAX))
        };
        let state = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.inbox_state(&device))
        };
        std::thread::sleep(BLOCKED);
        assert!(
            !pull.is_finished(),
            "a pull read an envelope not yet durable"
        );
        assert!(
            !state.is_finished(),
            "an inbox's counters ran ahead of its syncs"
        );
        pipe(&store).hold(false);
        assert_eq!(
            answer.recv().unwrap().unwrap(),
            vec![CommitOutcome::Stored { seq: 1 }]
        );
        assert_eq!(pull.join().unwrap().unwrap().envelopes.len(), 1);
        assert_eq!(state.join().unwrap().unwrap().head, 1);
    }

    /// A durable commit of the index (a checkpoint, a registration) would
    /// persist rows whose bytes may still be lost: it waits for the syncs.
    #[test]
    fn durable_index_commits_wait_for_the_syncs_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), crate::store::segments::DEFAULT_SEGMENT_BYTES);
        pipe(&store).hold(true);
        let answer = send(&store, vec![envelope(1, 100), envelope(2, 100)]);
        let checkpoint = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.checkpoint())
        };
        let register = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.register_device(&registration(2), 0))
        };
        std::thread::sleep(BLOCKED);
        assert!(
            !checkpoint.is_finished(),
            "a checkpoint ran ahead of the syncs"
        );
        assert!(
            !register.is_finished(),
            "a durable commit ran ahead of the syncs"
        );
        assert!(store.needs_checkpoint());
        pipe(&store).hold(false);
        checkpoint.join().unwrap().unwrap();
        register.join().unwrap().unwrap();
        assert_eq!(answer.recv().unwrap().unwrap().len(), 2);
        assert_eq!(pipe(&store).in_flight(), 0);
    }

    /// A batch that starts a new segment is not written while the last
    /// segment's syncs are in flight: a crash could otherwise leave it
    /// whole behind a torn batch, which no open could replay.
    #[test]
    fn a_new_segment_waits_for_the_last_ones_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), crate::config::MIN_SEGMENT_BYTES);
        let segments = || std::fs::read_dir(store.segment_dir()).unwrap().count();
        pipe(&store).hold(true);
        // Two batches of ~400 KiB fill most of a 1 MiB segment.
        let first = send(&store, (0..100).map(|n| envelope(n, 4000)).collect());
        let second = send(&store, (100..200).map(|n| envelope(n, 4000)).collect());
        assert_eq!(pipe(&store).in_flight(), 2);
        assert_eq!(segments(), 1);
        let third = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                send(&store, (200..300).map(|n| envelope(n, 4000)).collect())
                    .recv()
                    .unwrap()
            })
        };
        std::thread::sleep(BLOCKED);
        assert!(!third.is_finished());
        assert_eq!(
            pipe(&store).in_flight(),
            2,
            "the new segment's batch was written"
        );
        pipe(&store).hold(false);
        assert_eq!(first.recv().unwrap().unwrap().len(), 100);
        assert_eq!(second.recv().unwrap().unwrap().len(), 100);
        let third = third.join().unwrap().unwrap();
        assert_eq!(third.last(), Some(&CommitOutcome::Stored { seq: 300 }));
        assert_eq!(segments(), 2);
        // And all of it survives a reopen.
        drop(store);
        let again = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        assert_eq!(again.inbox_state(&DeviceId([1; 16])).unwrap().head, 300);
    }

    /// Answers come in commit order, also for a batch synced in line (a
    /// duplicate-only one writes nothing) behind one still syncing.
    #[test]
    fn answers_keep_commit_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), crate::store::segments::DEFAULT_SEGMENT_BYTES);
        pipe(&store).hold(true);
        let (tx, rx) = mpsc::channel();
        for (n, batch) in [
            vec![envelope(1, 10)],
            vec![envelope(1, 10)],
            vec![envelope(2, 10)],
        ]
        .into_iter()
        .enumerate()
        {
            let tx = tx.clone();
            store.commit_then(
                batch,
                None,
                Box::new(move |_, r| {
                    let _ = tx.send((n, r.unwrap()));
                }),
            );
        }
        assert!(rx.recv_timeout(BLOCKED).is_err());
        pipe(&store).hold(false);
        let got: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(
            got,
            vec![
                (0, vec![CommitOutcome::Stored { seq: 1 }]),
                (1, vec![CommitOutcome::Duplicate { seq: 1 }]),
                (2, vec![CommitOutcome::Stored { seq: 2 }]),
            ]
        );
    }

    /// A disk that stalls holds at most [`MAX_BEHIND`] groups waiting for
    /// answers: the next commit waits for room.
    #[test]
    fn commits_wait_once_max_behind_are_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), crate::store::segments::DEFAULT_SEGMENT_BYTES);
        pipe(&store).hold(true);
        let sender = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let answers: Vec<_> = (0..=MAX_BEHIND)
                    .map(|n| send(&store, vec![envelope(n as u32, 10)]))
                    .collect();
                answers
                    .into_iter()
                    .filter(|a| a.recv().unwrap().is_ok())
                    .count()
            })
        };
        std::thread::sleep(BLOCKED);
        assert!(!sender.is_finished());
        assert_eq!(pipe(&store).in_flight(), MAX_BEHIND);
        pipe(&store).hold(false);
        assert_eq!(sender.join().unwrap(), MAX_BEHIND as usize + 1);
    }

    #[test]
    fn closing_answers_what_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let behind = Behind::start().unwrap();
        let (tx, rx) = mpsc::channel();
        for n in 1..=5 {
            behind
                .issue()
                .unwrap()
                .queue(Some(file_sync(dir.path(), "a")), job(&tx, n));
        }
        drop(behind);
        let got: Vec<_> = rx.try_iter().collect();
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(|&(_, ok)| ok));
    }
}
