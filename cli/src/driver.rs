//! The native driver: runs a [`hush_client::Engine`] against a real relay
//! connection, a durable [`Storage`] and the system clock.
//!
//! It implements the engine's driver contract. Of each step:
//!
//! 1. `early_frames` are written as soon as every earlier step's storage is
//!    durable — before the step's own commit (during a backlog sync these
//!    are the pulls of the next pages: the relay serves them while page n is
//!    being committed);
//! 2. `storage` is committed on a blocking thread, as one atomic, durable
//!    batch;
//! 3. only once that batch is durable are its `frames` written and its
//!    `events` (and the command's reply) handed to the caller — except
//!    that a step which handled a frame from the relay and shows only what
//!    envelopes carry (incoming messages, delivery states) has its events
//!    shown as soon as the batch is *stored*, readable and kept through a
//!    crash of the app, while its sync still runs ([`Storage::apply_stored`]).
//!    Its acknowledgement to the relay still waits for durability, so a
//!    power loss in between costs a redelivery, never a message (see
//!    `shown_once_stored`).
//!
//! By default the driver keeps reading frames and handling them with the
//! engine while a commit runs (decrypting page n+1 during the commit of page
//! n); steps handled meanwhile are committed together as one transaction
//! when the running commit ends, and each step's early frames still wait for
//! every step before it. Replies, and events other than those above, still
//! wait for their commit. A step that only changes a sent message's
//! delivery state and acknowledges envelopes to the relay is lazy: it waits
//! up to [`LAZY_COMMIT`] for a step with something urgent and is committed
//! with it, instead of costing a sync of its own.
//! [`Driver::set_pipelined`]`(false)` makes it wait for each commit before
//! the next input instead: on a 2-core machine a catch-up of 100,000
//! messages took 0.92–0.96 s that way against 0.81–0.85 s pipelined
//! (`client_bench --serial`).
//!
//! If a commit or `Engine::handle` fails, nothing more of the affected steps
//! is performed: the connection is dropped and the engine is rebuilt from
//! storage, exactly as after a crash (the relay redelivers what was not
//! acknowledged; sender seqs drop repeats). Before a new connection is
//! dialled every pending step is finished, so no frame of an old connection
//! reaches a new one.
//!
//! Timers come from `Step::wake_at`, reconnects from `Step::connect_at`
//! (the engine's backoff, 1 s → 30 s with jitter). The engine's RNG is
//! seeded from the OS.

use crate::error::CliError;
use crate::transport::{self, Conn, Incoming, RelayTarget};
use hush_client::{
    Command, ConnectionState, Engine, EngineConfig, Event, Input, Reply, Step, Storage,
    StorageError, StorageOp,
};
use hush_protocol::{ClientFrame, ServerFrame, encode_client_frame};
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Longest single connection attempt (QUIC handshake and stream).
pub const CONNECT_ATTEMPT: Duration = Duration::from_secs(3);
/// Most frames already waiting that are handled in one go.
const MAX_BATCH_INPUTS: usize = 64;
/// Consecutive rebuilds from storage (no successful commit in between)
/// before giving up.
const MAX_REBUILDS: u32 = 5;
/// Longest a lazy step ([`Step::is_lazy`]: only delivery-state notices, ratchet epochs and
/// acknowledgements to the relay wait on it) waits for a step with
/// something urgent, whose commit it then joins, before it is committed
/// alone. While sending, that halves the syncs: a message's `Stored`
/// notice arrives about when the next message is sent, and its own commit
/// would hold that message back.
pub const LAZY_COMMIT: Duration = Duration::from_millis(20);

/// Milliseconds since the Unix epoch (the engine's clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// 32 bytes of OS randomness, to seed an engine.
pub fn os_seed() -> Result<[u8; 32], CliError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| CliError::Random(e.to_string()))?;
    Ok(seed)
}

/// Engine settings for the CLI: the product defaults, with receipts batched
/// over a shorter window and a shorter grace before resend requests, because
/// a one-shot command should hand its receipts and requests to the relay
/// before it exits rather than leave them for the next run.
pub fn cli_engine_config() -> EngineConfig {
    EngineConfig {
        receipt_window_ms: 200,
        gap_grace_ms: 1_000,
        ..EngineConfig::default()
    }
}

/// A future that ends the run when it completes (SIGINT/SIGTERM for `listen`).
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Why [`Driver::run_until`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The caller's condition held.
    Done,
    /// The deadline passed first.
    Deadline,
    /// The stop signal fired.
    Stopped,
}

/// What a caller's completion condition can look at.
#[derive(Debug)]
pub struct View<'a> {
    /// The engine (read-only).
    pub engine: &'a Engine,
    /// A transport connection is open.
    pub connected: bool,
    /// Requests written and not yet answered on this connection.
    pub outstanding: usize,
    /// A connection was established at least once in this run.
    pub ever_connected: bool,
}

impl View<'_> {
    /// Authenticated, backlog drained, every request answered and nothing
    /// owed to the relay: a one-shot command may exit.
    pub fn settled(&self) -> bool {
        self.connected
            && self.engine.connection_state() == ConnectionState::Live
            && self.outstanding == 0
            && self.engine.backlog().is_empty()
            && !self.engine.history_busy()
    }
}

/// Events of one committed batch, for the caller to show. Storage is
/// already durable when this is delivered.
pub struct Batch<'a, S> {
    /// The engine: after the batch, and possibly past it (inputs that
    /// arrived while the batch was committed may already be handled).
    pub engine: &'a Engine,
    /// The store (e.g. to read history for display, or record what was shown).
    pub storage: &'a mut S,
    /// The events, in order.
    pub events: &'a [Event],
}

/// Receives each batch's events.
pub trait Sink<S> {
    /// Called after the batch's storage is durable and its frames are sent,
    /// or, for events that may be shown then, once it is stored (see the
    /// module docs).
    fn batch(&mut self, batch: Batch<'_, S>) -> Result<(), CliError>;
}

/// A sink that ignores everything.
#[derive(Debug, Default)]
pub struct Discard;

impl<S> Sink<S> for Discard {
    fn batch(&mut self, _batch: Batch<'_, S>) -> Result<(), CliError> {
        Ok(())
    }
}

/// Where the driver's time went (for benchmarks and diagnostics).
#[derive(Debug, Clone, Copy, Default)]
pub struct DriverStats {
    /// Inputs handled by the engine.
    pub inputs: u64,
    /// Time inside `Engine::handle`.
    pub handle: Duration,
    /// Storage batches committed (a batch with nothing to store skips
    /// the store and is not counted).
    pub commits: u64,
    /// Of `commits`, those stored on the driver's own task (they waited
    /// for nothing; see `Storage::try_apply_stored`).
    pub stored_inline: u64,
    /// Time inside `Storage::apply` (on the commit thread: it overlaps
    /// with the engine's work and the relay's).
    pub apply: Duration,
    /// Of `apply`, the time until the batch was stored (readable, kept if
    /// the app crashes; the rest is its sync).
    pub stored: Duration,
    /// Time the driver waited with nothing to do but a commit.
    pub commit_wait: Duration,
    /// Bytes of keys and values committed.
    pub bytes: u64,
    /// Time writing frames.
    pub write: Duration,
    /// Time handing events to the sink.
    pub sink: Duration,
    /// Times the engine was rebuilt from storage after a failure.
    pub rebuilds: u64,
    /// Bytes of frames written to the relay (encoded frames, without the
    /// QUIC, TLS and UDP overhead).
    pub sent_bytes: u64,
    /// Bytes of frames read from the relay (likewise).
    pub received_bytes: u64,
    /// From a step's handling to its events handed to the sink.
    pub shown_after: Latencies,
    /// From a step's handling to its frames written to the relay (after
    /// its batch is durable).
    pub sent_after: Latencies,
}

/// A latency histogram in steps of [`Latencies::STEP_US`] µs, the last
/// bucket holding everything beyond: enough to read a p50 or p90 off a
/// benchmark run without keeping every sample.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    buckets: [u32; Latencies::BUCKETS],
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: [0; Latencies::BUCKETS],
        }
    }
}

impl Latencies {
    /// Width of a bucket.
    pub const STEP_US: u64 = 5;
    const BUCKETS: usize = 400;

    fn record(&mut self, d: Duration) {
        let i = (d.as_micros() / u128::from(Self::STEP_US)).min(Self::BUCKETS as u128 - 1) as usize;
        if let Some(b) = self.buckets.get_mut(i) {
            *b = b.saturating_add(1);
        }
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|&b| u64::from(b)).sum()
    }

    /// The upper edge of the bucket holding quantile `q` (0.0–1.0); `None`
    /// without samples. The last bucket reads as its lower edge.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &b) in self.buckets.iter().enumerate() {
            seen += u64::from(b);
            if seen >= rank {
                let edge = (i as u64 + 1).min(Self::BUCKETS as u64 - 1);
                return Some(Duration::from_micros(edge * Self::STEP_US));
            }
        }
        None
    }
}

/// A handled step whose storage is not durable yet.
struct Pending {
    storage: Vec<StorageOp>,
    /// Not written yet (emptied once written).
    early: Vec<ClientFrame>,
    frames: Vec<ClientFrame>,
    events: Vec<Event>,
    /// Nothing waits on this step but delivery-state notices and
    /// acknowledgements to the relay (see [`LAZY_COMMIT`]).
    lazy: bool,
    /// Its events may be shown once its batch is stored, before it is
    /// durable (see [`shown_once_stored`]).
    show_stored: bool,
    /// When the engine handed it over.
    at: Instant,
}

impl Pending {
    fn new(step: Step, from_relay: bool) -> Pending {
        let lazy = step.is_lazy();
        let show_stored = shown_once_stored(&step, from_relay);
        Pending {
            storage: step.storage,
            early: step.early_frames,
            frames: step.frames,
            events: step.events,
            lazy,
            show_stored,
            at: Instant::now(),
        }
    }
}

/// Whether a step's events may be shown as soon as its batch is stored
/// (readable, kept if the app crashes) rather than once it is durable
/// (kept through a power loss as well): true for a step that handled a
/// frame from the relay and shows only what envelopes carry — messages,
/// delivery states, ratchet epochs, sync progress.
///
/// Why it is safe: the step's frames, its acknowledgement to the relay
/// among them, still wait for durability. If a power loss undoes the batch,
/// the relay still holds the envelopes, delivers them again, and the app is
/// shown the same messages (same ids) again: a repeat, never a loss. A
/// delivery state shown early is confirmed again when the send is retried,
/// as for a lazy step. Steps of the user's own commands (a message sent, a
/// contact added) and anything else wait for durability, since nothing
/// would bring them back. On the reference host this takes the recipient's
/// sync, about 0.17 ms, off the time a message takes to appear.
fn shown_once_stored(step: &Step, from_relay: bool) -> bool {
    from_relay
        && step.reply.is_none()
        && !step.close
        && step.events.iter().all(|e| {
            matches!(
                e,
                Event::Message(_)
                    | Event::MessageState { .. }
                    | Event::KeyRotation { .. }
                    | Event::SyncProgress { .. }
            )
        })
}

/// What a commit thread returns: the result, the time until the batch was
/// stored and the time until it was durable.
type CommitResult = (Result<(), StorageError>, Duration, Duration);

/// A commit running on the blocking pool and the steps it makes durable.
struct Commit {
    task: JoinHandle<CommitResult>,
    steps: Vec<Pending>,
    /// Fires when the batch is stored (not yet durable), if the steps'
    /// events may be shown then ([`shown_once_stored`]).
    stored: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Lock the store. A poisoned lock (a commit thread panicked) still holds
/// a consistent store: redb commits are atomic.
fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The engine, its store and its relay connection.
pub struct Driver<S: Storage> {
    engine: Engine,
    storage: Arc<Mutex<S>>,
    cfg: EngineConfig,
    target: RelayTarget,
    conn: Option<Conn>,
    outstanding: BTreeSet<u32>,
    /// The commit in flight, if any.
    commit: Option<Commit>,
    /// Steps handled while a commit was in flight, oldest first.
    queued: VecDeque<Pending>,
    /// When the queued steps, all lazy, are committed without company.
    lazy_due: Option<Instant>,
    /// How long lazy steps wait for company ([`LAZY_COMMIT`]).
    lazy_wait: Duration,
    /// The connection failed while early frames were written; the engine
    /// is told at the next opportunity (see `notice_broken`).
    broken: Option<String>,
    /// Handle further inputs while a commit runs (the default); when off,
    /// each batch is committed before the next input.
    pipelined: bool,
    wake_at: Option<u64>,
    connect_at: Option<u64>,
    ever_connected: bool,
    last_failure: Option<CliError>,
    /// Where the transport of each new connection is written (for
    /// `hush status`), and what was written last.
    link_file: Option<(std::path::PathBuf, Option<transport::Link>)>,
    rebuilds: u32,
    stats: DriverStats,
}

impl<S: Storage> Driver<S> {
    /// Take the connection, counting what was read on it.
    fn take_conn(&mut self) -> Option<Conn> {
        let conn = self.conn.take()?;
        self.stats.received_bytes += conn.received_bytes();
        Some(conn)
    }
}

impl<S: Storage> std::fmt::Debug for Driver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("engine", &self.engine)
            .field("target", &self.target)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Storage + Send + 'static> Driver<S> {
    /// Wrap an engine loaded from `storage` (or just created: then hand its
    /// first step to [`Driver::start`]).
    pub fn new(engine: Engine, storage: S, cfg: EngineConfig, target: RelayTarget) -> Driver<S> {
        let connect_at = engine.connect_at();
        Driver {
            engine,
            storage: Arc::new(Mutex::new(storage)),
            cfg,
            target,
            conn: None,
            outstanding: BTreeSet::new(),
            commit: None,
            queued: VecDeque::new(),
            lazy_due: None,
            lazy_wait: LAZY_COMMIT,
            broken: None,
            pipelined: true,
            wake_at: None,
            connect_at,
            ever_connected: false,
            last_failure: None,
            link_file: None,
            rebuilds: 0,
            stats: DriverStats::default(),
        }
    }

    /// Write the transport of every new connection (`quic`, `websocket`)
    /// to `path`, for `hush status`.
    pub fn record_link_in(&mut self, path: std::path::PathBuf) {
        self.link_file = Some((path, None));
    }

    /// The transport of the open connection, if any.
    pub fn link(&self) -> Option<transport::Link> {
        self.conn.as_ref().map(Conn::link)
    }

    /// Load the engine from `storage` (fresh OS seed) and wrap it.
    pub fn load(storage: S, cfg: EngineConfig, target: RelayTarget) -> Result<Driver<S>, CliError> {
        let engine = Engine::load(storage.load_state()?, os_seed()?, cfg.clone())?;
        Ok(Driver::new(engine, storage, cfg, target))
    }

    /// Keep handling inputs while a commit runs (`true`, the default), or
    /// wait for each commit before the next input (`false`). Early frames
    /// leave before their step's commit either way.
    pub fn set_pipelined(&mut self, on: bool) {
        self.pipelined = on;
    }

    /// How long a lazy step waits for a step with something urgent before
    /// it is committed alone ([`LAZY_COMMIT`] by default; zero commits
    /// every step at once).
    pub fn set_lazy_commit(&mut self, wait: Duration) {
        self.lazy_wait = wait;
    }

    /// Lazy steps handled and waiting for company, not committed yet.
    pub fn lazy_pending(&self) -> usize {
        if self.commit.is_some() {
            return 0;
        }
        self.queued.iter().filter(|p| p.lazy).count()
    }

    /// Where the time went so far (and the bytes on the wire).
    pub fn stats(&self) -> DriverStats {
        let mut stats = self.stats;
        if let Some(c) = &self.conn {
            stats.received_bytes += c.received_bytes();
        }
        stats
    }

    /// The engine (read-only).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The store. Every public method of the driver returns with all its
    /// commits finished (lazy steps may still be queued, not committing),
    /// so this never waits for one.
    pub fn storage(&self) -> MutexGuard<'_, S> {
        lock(&self.storage)
    }

    /// The store, for records the app keeps beside the engine's.
    pub fn storage_mut(&mut self) -> MutexGuard<'_, S> {
        lock(&self.storage)
    }

    /// The relay this driver connects to.
    pub fn target(&self) -> &RelayTarget {
        &self.target
    }

    /// A connection was established at least once.
    pub fn ever_connected(&self) -> bool {
        self.ever_connected
    }

    /// The last failed connection attempt, as an error to report.
    pub fn unreachable_error(&self) -> CliError {
        match &self.last_failure {
            Some(CliError::Unreachable { addr, reason }) => CliError::Unreachable {
                addr: addr.clone(),
                reason: reason.clone(),
            },
            Some(other) => CliError::Unreachable {
                addr: self.target.addr.clone(),
                reason: other.to_string(),
            },
            None => CliError::Unreachable {
                addr: self.target.addr.clone(),
                reason: "no connection was established in time".into(),
            },
        }
    }

    /// Apply the step returned by `Engine::create`/`Engine::join` (storage
    /// first, then its frames and events as for any step).
    pub async fn start(&mut self, step: Step, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        // There is no engine state to fall back to yet: a failure here is fatal.
        self.flush(sink).await?;
        lock(&self.storage).apply(&step.storage)?;
        self.wake_at = step.wake_at;
        self.connect_at = step.connect_at;
        let mut frames = step.early_frames;
        frames.extend(step.frames);
        let lost = self.write_frames(&frames).await;
        self.deliver(&step.events, sink)?;
        if let Some(reason) = lost {
            self.lost(reason, sink).await?;
        }
        Ok(())
    }

    /// Handle one app command; returns the engine's reply.
    pub async fn command(
        &mut self,
        command: Command,
        sink: &mut dyn Sink<S>,
    ) -> Result<Option<Reply>, CliError> {
        let mut replies = self.commands(vec![command], sink).await?;
        Ok(replies.pop().flatten())
    }

    /// Handle several commands as one batch (one storage commit); returns
    /// each command's reply once that commit is durable. A refused command
    /// is an error and nothing of the batch happens.
    pub async fn commands(
        &mut self,
        commands: Vec<Command>,
        sink: &mut dyn Sink<S>,
    ) -> Result<Vec<Option<Reply>>, CliError> {
        // Earlier steps first, so a failure below is this batch's own;
        // lazy ones join this batch's commit.
        self.flush_urgent(sink).await?;
        let now = now_ms();
        let mut steps = Vec::with_capacity(commands.len());
        for c in commands {
            match self.engine.handle(now, Input::Command(c)) {
                Ok(step) => steps.push(step),
                Err(e) => {
                    self.rebuild(&e.to_string()).await?;
                    return Err(CliError::Client(e));
                }
            }
        }
        let replies: Vec<Option<Reply>> = steps.iter_mut().map(|s| s.reply.take()).collect();
        self.enqueue(steps.into_iter().map(|s| Pending::new(s, false)))
            .await;
        match self.flush(sink).await? {
            None => Ok(replies),
            // Nothing of the commands was stored: report it, do not pretend.
            Some(failure) => Err(CliError::Storage(StorageError::Backend(failure))),
        }
    }

    /// Handle inputs and queue their steps for commit.
    async fn feed(&mut self, inputs: Vec<Input>, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        let now = now_ms();
        let mut steps = Vec::with_capacity(inputs.len());
        let mut relayed = Vec::with_capacity(inputs.len());
        let started = std::time::Instant::now();
        self.stats.inputs += inputs.len() as u64;
        let mut failed = None;
        for input in inputs {
            let from_relay = matches!(input, Input::Frame(_));
            match self.engine.handle(now, input) {
                Ok(step) => {
                    let close = step.close;
                    relayed.push(from_relay);
                    steps.push(step);
                    if close {
                        // The rest arrived on a connection the engine gave up.
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        self.stats.handle += started.elapsed();
        if steps.iter().any(|s| s.close)
            && let Some(conn) = self.take_conn()
        {
            // Closing needs nothing durable; what earlier steps still had
            // to say on this connection is dropped with it.
            self.outstanding.clear();
            conn.close().await;
        }
        if let Some(last) = steps.last() {
            self.wake_at = last.wake_at;
            self.connect_at = last.connect_at;
        }
        self.enqueue(
            steps
                .into_iter()
                .zip(relayed)
                .map(|(step, from_relay)| Pending::new(step, from_relay)),
        )
        .await;
        if let Some(why) = failed {
            // The engine may be ahead of storage: finish what was handled
            // before the failure, then start over from storage.
            self.flush(sink).await?;
            self.rebuild(&why).await?;
        } else if !self.pipelined {
            self.flush(sink).await?;
        }
        Ok(())
    }

    /// Queue steps for commit; start a commit if none is running.
    async fn enqueue(&mut self, steps: impl IntoIterator<Item = Pending>) {
        self.queued.extend(steps);
        self.commit_unless_lazy().await;
    }

    /// Start a commit of the queued steps if none is running, unless all
    /// of them are lazy and their wait ([`LAZY_COMMIT`]) is not over.
    async fn commit_unless_lazy(&mut self) {
        if self.commit.is_some() || self.queued.is_empty() {
            return;
        }
        if self.pipelined && self.queued.iter().all(|p| p.lazy) {
            let due = *self
                .lazy_due
                .get_or_insert_with(|| Instant::now() + self.lazy_wait);
            if Instant::now() < due {
                return;
            }
        }
        self.start_commit().await;
    }

    /// Wait for the commit in flight and commit every queued step that is
    /// not lazy (with the lazy ones before it), so that everything but lazy
    /// steps is durable and performed.
    async fn flush_urgent(&mut self, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        loop {
            self.notice_broken(sink).await?;
            if self.commit.is_none() {
                if self.queued.iter().all(|p| p.lazy) {
                    return Ok(());
                }
                self.start_commit().await;
            }
            let Some(commit) = self.commit.as_mut() else {
                continue;
            };
            let started = std::time::Instant::now();
            let joined = (&mut commit.task).await;
            self.stats.commit_wait += started.elapsed();
            self.finish_commit(joined, sink).await?;
        }
    }

    /// Commit every queued step as one batch. Every step before them is
    /// durable, so the first one's early frames leave now; the others'
    /// wait for this commit.
    async fn start_commit(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        self.lazy_due = None;
        let mut early = Vec::new();
        if let Some(first) = self.queued.front_mut() {
            early = std::mem::take(&mut first.early);
        }
        let mut steps: Vec<Pending> = self.queued.drain(..).collect();
        let mut ops = Vec::new();
        for p in &mut steps {
            ops.append(&mut p.storage);
        }
        self.stats.bytes += ops
            .iter()
            .map(|op| match op {
                StorageOp::Put { key, value } => key.len() + value.len(),
                StorageOp::Delete { key } => key.len(),
            } as u64)
            .sum::<u64>();
        let storage = self.storage.clone();
        let show_stored =
            steps.iter().all(|p| p.show_stored) && steps.iter().any(|p| !p.events.is_empty());
        let (stored_tx, stored) = if show_stored {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // A batch whose events may be shown once stored (most incoming
        // messages) is stored here when that waits for nothing: shown on
        // this turn, without a trip to the blocking pool and back (25 µs
        // at the p50 on the reference host). Its sync, if any, runs on
        // the store's sync thread, which wakes this driver when it ends.
        // Other batches (the user's own sends among them) keep the
        // blocking pool: their work is longer and nothing is shown early.
        let started = std::time::Instant::now();
        let ops_empty = ops.is_empty();
        let inline = if show_stored && !ops_empty {
            lock(&storage).try_apply_stored(&ops)
        } else {
            None
        };
        let task = if ops_empty {
            // Nothing to store (an idle turn's tick, say): every earlier
            // batch is durable already, as commits run one at a time, so
            // the steps are performed on the next turn without a trip to
            // the blocking pool.
            if let Some(tx) = stored_tx {
                let _ = tx.send(());
            }
            tokio::spawn(async { (Ok(()), Duration::ZERO, Duration::ZERO) })
        } else if let Some(applied) = inline {
            self.stats.stored_inline += 1;
            let stored_in = started.elapsed();
            match applied {
                Ok(mut syncing) => {
                    if let Some(tx) = stored_tx {
                        let _ = tx.send(());
                    }
                    // Woken by the thread that ran the sync, rather than
                    // by one more thread blocked waiting for it.
                    let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
                    let call = Box::new(move || {
                        let _ = ended_tx.send(());
                    });
                    if syncing.when_ended(call) {
                        tokio::spawn(async move {
                            let _ = ended.await;
                            (syncing.wait(), stored_in, started.elapsed())
                        })
                    } else {
                        tokio::task::spawn_blocking(move || {
                            (syncing.wait(), stored_in, started.elapsed())
                        })
                    }
                }
                Err(e) => tokio::spawn(async move { (Err(e), stored_in, stored_in) }),
            }
        } else {
            self.spawn_stored(ops, stored_tx)
        };
        self.commit = Some(Commit {
            task,
            steps,
            stored,
        });
        if !ops_empty {
            self.stats.commits += 1;
        }
        if let Some(reason) = self.write_frames(&early).await {
            // The connection is gone; the engine is told by the caller's
            // loop (this runs inside input handling).
            self.drop_conn().await;
            self.broken = Some(reason);
        }
    }

    /// Store and sync `ops` on the blocking pool (storing may wait for an
    /// earlier sync or a checkpoint); `stored_tx` fires once it is stored.
    fn spawn_stored(
        &self,
        ops: Vec<StorageOp>,
        stored_tx: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> JoinHandle<CommitResult> {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            // The store is unlocked once the batch is stored: the sink may
            // read it while the sync runs.
            let applied = lock(&storage).apply_stored(&ops);
            let stored = started.elapsed();
            let result = applied.and_then(|syncing| {
                if let Some(tx) = stored_tx {
                    let _ = tx.send(());
                }
                syncing.wait()
            });
            (result, stored, started.elapsed())
        })
    }

    /// Tell the engine about a connection that failed while early frames
    /// were written.
    async fn notice_broken(&mut self, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        if let Some(reason) = self.broken.take() {
            self.lost(reason, sink).await?;
        }
        Ok(())
    }

    /// A commit ended: perform its steps (frames, then events), then commit
    /// what queued up meanwhile. Returns the failure if the commit failed
    /// (then nothing of its steps was performed and the engine was rebuilt).
    async fn finish_commit(
        &mut self,
        joined: Result<CommitResult, tokio::task::JoinError>,
        sink: &mut dyn Sink<S>,
    ) -> Result<Option<String>, CliError> {
        let Some(commit) = self.commit.take() else {
            return Ok(None);
        };
        let failure = match joined {
            Ok((Ok(()), stored, took)) => {
                self.stats.stored += stored;
                self.stats.apply += took;
                None
            }
            Ok((Err(e), stored, took)) => {
                self.stats.stored += stored;
                self.stats.apply += took;
                Some(e.to_string())
            }
            Err(e) => Some(format!("commit thread: {e}")),
        };
        if let Some(failure) = failure {
            self.rebuild(&failure).await?;
            return Ok(Some(failure));
        }
        self.rebuilds = 0;
        let started = std::time::Instant::now();
        let mut frames = Vec::new();
        let mut events = Vec::new();
        let mut sent_at = Vec::new();
        let mut shown_at = Vec::new();
        for step in commit.steps {
            if !step.early.is_empty() || !step.frames.is_empty() {
                sent_at.push(step.at);
            }
            if !step.events.is_empty() {
                shown_at.push(step.at);
            }
            frames.extend(step.early);
            frames.extend(step.frames);
            events.extend(step.events);
        }
        let lost = self.write_frames(&frames).await;
        self.stats.write += started.elapsed();
        for at in sent_at {
            self.stats.sent_after.record(at.elapsed());
        }
        self.deliver(&events, sink)?;
        for at in shown_at {
            self.stats.shown_after.record(at.elapsed());
        }
        if let Some(reason) = lost {
            self.lost(reason, sink).await?;
        }
        self.commit_unless_lazy().await;
        Ok(None)
    }

    /// Wait for the commit in flight and commit whatever is queued, until
    /// everything handled is durable and performed. Returns the last
    /// commit failure, if any.
    async fn flush(&mut self, sink: &mut dyn Sink<S>) -> Result<Option<String>, CliError> {
        let mut failure = None;
        loop {
            self.notice_broken(sink).await?;
            if self.commit.is_none() {
                if self.queued.is_empty() {
                    return Ok(failure);
                }
                self.start_commit().await;
            }
            let Some(commit) = self.commit.as_mut() else {
                continue;
            };
            let started = std::time::Instant::now();
            let joined = (&mut commit.task).await;
            self.stats.commit_wait += started.elapsed();
            if let Some(f) = self.finish_commit(joined, sink).await? {
                failure = Some(f);
            }
        }
    }

    /// The running commit's batch is stored: show its events now if they
    /// may be shown before it is durable ([`shown_once_stored`]); its
    /// frames still wait for durability.
    fn show_stored(&mut self, stored: bool, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        let Some(commit) = self.commit.as_mut() else {
            return Ok(());
        };
        commit.stored = None;
        if !stored {
            // The commit failed; `finish_commit` deals with it.
            return Ok(());
        }
        let shown_at: Vec<Instant> = commit
            .steps
            .iter()
            .filter(|p| !p.events.is_empty())
            .map(|p| p.at)
            .collect();
        let events: Vec<Event> = commit
            .steps
            .iter_mut()
            .flat_map(|p| std::mem::take(&mut p.events))
            .collect();
        self.deliver(&events, sink)?;
        for at in shown_at {
            self.stats.shown_after.record(at.elapsed());
        }
        Ok(())
    }

    /// Nothing handled is waiting to be committed or performed.
    fn idle(&self) -> bool {
        self.commit.is_none() && self.queued.is_empty()
    }

    /// Hand events to the caller.
    fn deliver(&mut self, events: &[Event], sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        if events.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut storage = lock(&self.storage);
        let result = sink.batch(Batch {
            engine: &self.engine,
            storage: &mut storage,
            events,
        });
        drop(storage);
        self.stats.sink += started.elapsed();
        result
    }

    /// Encode and write frames; returns why the connection is lost if it is.
    async fn write_frames(&mut self, frames: &[ClientFrame]) -> Option<String> {
        if frames.is_empty() || self.conn.is_none() {
            return None;
        }
        let mut bytes = Vec::new();
        for f in frames {
            match encode_client_frame(f) {
                Ok(b) => {
                    bytes.extend_from_slice(&b);
                    self.outstanding.insert(f.request_id);
                }
                // The engine built a frame the protocol rejects: the request
                // would never be answered, so start a fresh connection.
                Err(e) => return Some(format!("unencodable request: {e}")),
            }
        }
        let conn = self.conn.as_mut()?;
        self.stats.sent_bytes += bytes.len() as u64;
        conn.write(&bytes).await.err()
    }

    /// Close the connection (it failed under us) without telling the engine.
    async fn drop_conn(&mut self) {
        self.outstanding.clear();
        if let Some(conn) = self.take_conn() {
            conn.close().await;
        }
    }

    /// The connection failed under us: tell the engine.
    async fn lost(&mut self, _reason: String, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        self.drop_conn().await;
        Box::pin(self.feed(vec![Input::Disconnected], sink)).await?;
        Ok(())
    }

    /// Drop the engine, the connection and every step not yet durable;
    /// rebuild from storage. No commit is running when this is called.
    async fn rebuild(&mut self, why: &str) -> Result<(), CliError> {
        self.rebuilds += 1;
        self.stats.rebuilds += 1;
        self.outstanding.clear();
        self.queued.clear();
        self.lazy_due = None;
        self.broken = None;
        if let Some(conn) = self.take_conn() {
            conn.close().await;
        }
        if self.rebuilds > MAX_REBUILDS {
            return Err(CliError::Storage(StorageError::Backend(format!(
                "stopped after {MAX_REBUILDS} restarts from the local store; last failure: {why}"
            ))));
        }
        let records = lock(&self.storage).load_state()?;
        self.engine = Engine::load(records, os_seed()?, self.cfg.clone())?;
        self.wake_at = None;
        self.connect_at = self.engine.connect_at();
        Ok(())
    }

    /// Try once to connect (within `bound`). A certificate problem is fatal;
    /// any other failure is remembered and the engine told, so it schedules
    /// the next attempt with backoff.
    pub async fn connect_once(
        &mut self,
        bound: Duration,
        sink: &mut dyn Sink<S>,
    ) -> Result<bool, CliError> {
        // Nothing of an earlier connection may reach this one.
        self.flush(sink).await?;
        let result = match transport::connect(&self.target, bound).await {
            Ok(conn) => {
                let link = conn.link();
                if let Some((path, last)) = &mut self.link_file
                    && *last != Some(link)
                {
                    // Informational only: a failed write changes nothing else.
                    let _ = std::fs::write(&*path, link.name());
                    *last = Some(link);
                }
                self.conn = Some(conn);
                self.outstanding.clear();
                self.ever_connected = true;
                self.feed(vec![Input::Connected], sink).await?;
                Ok(true)
            }
            Err(e @ (CliError::CertMismatch { .. } | CliError::CertUntrusted { .. })) => Err(e),
            Err(e @ (CliError::Invalid { .. } | CliError::Transport(_))) => Err(e),
            Err(e) => {
                self.last_failure = Some(e);
                self.feed(vec![Input::Disconnected], sink).await?;
                Ok(false)
            }
        };
        self.flush(sink).await?;
        result
    }

    fn view(&self) -> View<'_> {
        View {
            engine: &self.engine,
            connected: self.conn.is_some(),
            outstanding: self.outstanding.len(),
            ever_connected: self.ever_connected,
        }
    }

    /// Run the engine (connecting, reconnecting, handling frames and
    /// timers) until `done` holds, `deadline` passes or `stop` fires.
    /// `done` is asked only when every handled step is durable and
    /// performed; whatever the outcome, that holds on return.
    pub async fn run_until(
        &mut self,
        deadline: Instant,
        stop: &mut Option<StopSignal>,
        sink: &mut dyn Sink<S>,
        mut done: impl FnMut(&View<'_>) -> bool,
    ) -> Result<Outcome, CliError> {
        loop {
            self.notice_broken(sink).await?;
            if self.idle() && self.export_history(sink).await? {
                continue;
            }
            if self.idle() && done(&self.view()) {
                return Ok(Outcome::Done);
            }
            if self.commit.is_none() && !self.queued.is_empty() && done(&self.view()) {
                // Only lazy steps are left, and the caller waits for them:
                // what it sees must be durable.
                self.start_commit().await;
            }
            let now = Instant::now();
            if now >= deadline {
                self.flush_urgent(sink).await?;
                return Ok(Outcome::Deadline);
            }
            self.commit_unless_lazy().await;
            if self.conn.is_none() && self.connect_at.is_some_and(|t| t <= now_ms()) {
                let bound = CONNECT_ATTEMPT.min(deadline - now);
                let attempt = async { self.connect_once(bound, sink).await };
                match stop.as_mut() {
                    Some(s) => {
                        tokio::select! {
                            r = attempt => { r?; }
                            _ = s => {
                                self.flush(sink).await?;
                                return Ok(Outcome::Stopped);
                            }
                        }
                    }
                    None => {
                        attempt.await?;
                    }
                }
                continue;
            }
            let lazy = self.lazy_due.filter(|_| self.commit.is_none());
            let wake = self.next_wake(deadline);
            let lazy_wake = lazy.map_or(wake, |l| l.min(wake));
            let next = {
                let conn = self.conn.as_mut();
                let incoming = async {
                    match conn {
                        Some(c) => c.next().await,
                        None => std::future::pending().await,
                    }
                };
                let (commit, stored) = match self.commit.as_mut() {
                    Some(c) => (Some(&mut c.task), c.stored.as_mut()),
                    None => (None, None),
                };
                let committed = async {
                    match commit {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                };
                let stored = async {
                    match stored {
                        Some(rx) => rx.await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let stopped = async {
                    match stop.as_mut() {
                        Some(s) => s.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    j = committed => Wake::Committed(j),
                    ok = stored => Wake::Stored(ok),
                    i = incoming => Wake::Incoming(i),
                    _ = tokio::time::sleep_until(lazy_wake) => {
                        if Instant::now() >= wake { Wake::Timer } else { Wake::Lazy }
                    }
                    _ = stopped => Wake::Stop,
                }
            };
            match next {
                Wake::Stop => {
                    self.flush(sink).await?;
                    return Ok(Outcome::Stopped);
                }
                Wake::Committed(joined) => {
                    self.finish_commit(joined, sink).await?;
                }
                Wake::Stored(ok) => self.show_stored(ok, sink)?,
                Wake::Timer => {
                    self.feed(vec![Input::Tick], sink).await?;
                }
                // The loop's next turn commits the lazy steps.
                Wake::Lazy => {}
                Wake::Incoming(first) => self.incoming(first, sink).await?,
            }
        }
    }

    /// A newly linked device asked for the history: read it from storage
    /// and hand it to the engine, which uploads it. True if it did.
    async fn export_history(&mut self, sink: &mut dyn Sink<S>) -> Result<bool, CliError> {
        let Some(device) = self.engine.history_export_wanted() else {
            return Ok(false);
        };
        let conversations: Vec<_> = self
            .engine
            .contacts()
            .into_iter()
            .map(|(_, _, c)| c)
            .collect();
        let messages = {
            let storage = lock(&self.storage);
            hush_client::engine::history_transfer::export_history(&*storage, &conversations)?
        };
        match self.engine.start_history_export(now_ms(), device, messages) {
            Ok(step) => {
                self.wake_at = step.wake_at;
                self.connect_at = step.connect_at;
                self.enqueue([Pending::new(step, false)]).await;
                self.flush(sink).await?;
                Ok(true)
            }
            Err(e) => {
                self.rebuild(&e.to_string()).await?;
                Err(CliError::Client(e))
            }
        }
    }

    /// Handle a frame and whatever else is already waiting.
    async fn incoming(&mut self, first: Incoming, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        let mut inputs = Vec::new();
        let mut closed = None;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Incoming::Frame(frame) => {
                    self.answered(&frame);
                    inputs.push(Input::Frame(*frame));
                }
                Incoming::Closed(reason) => {
                    closed = Some(reason);
                    break;
                }
            }
            if inputs.len() >= MAX_BATCH_INPUTS {
                break;
            }
            next = self.conn.as_mut().and_then(Conn::try_next);
        }
        if !inputs.is_empty() {
            self.feed(inputs, sink).await?;
        }
        if let Some(reason) = closed
            && self.conn.is_some()
        {
            self.lost(reason, sink).await?;
        }
        Ok(())
    }

    fn answered(&mut self, frame: &ServerFrame) {
        match frame {
            ServerFrame::Response { request_id, .. } | ServerFrame::Error { request_id, .. } => {
                self.outstanding.remove(request_id);
            }
            ServerFrame::Push { .. }
            | ServerFrame::EarlyPush { .. }
            | ServerFrame::Durable { .. }
            | ServerFrame::Closing { .. }
            | ServerFrame::PrekeysLow { .. }
            | ServerFrame::Retired { .. } => {}
        }
    }

    /// When to wake for the engine's timers or the next dial.
    fn next_wake(&self, deadline: Instant) -> Instant {
        let mut at_ms = self.wake_at;
        if self.conn.is_none()
            && let Some(c) = self.connect_at
        {
            at_ms = Some(at_ms.map_or(c, |w| w.min(c)));
        }
        match at_ms {
            Some(t) => {
                let wait = Duration::from_millis(t.saturating_sub(now_ms()));
                (Instant::now() + wait).min(deadline)
            }
            None => deadline,
        }
    }

    /// Close the connection politely (before the process exits) and tell
    /// the engine it is offline.
    pub async fn shutdown(&mut self) {
        // Best effort: the process is about to stop using this engine.
        let _ = self.flush(&mut Discard).await;
        self.outstanding.clear();
        if let Some(conn) = self.take_conn() {
            conn.close().await;
            let _ = self.feed(vec![Input::Disconnected], &mut Discard).await;
            let _ = self.flush(&mut Discard).await;
        }
    }

    /// Give the store back (after [`Driver::shutdown`]). Fails only if a
    /// commit is still running (a driver future was dropped mid-commit).
    pub fn into_storage(self) -> Result<S, CliError> {
        drop(self.commit);
        match Arc::try_unwrap(self.storage) {
            Ok(m) => Ok(m.into_inner().unwrap_or_else(PoisonError::into_inner)),
            Err(_) => Err(CliError::Storage(StorageError::Backend(
                "the store is still being committed".into(),
            ))),
        }
    }
}

enum Wake {
    Committed(Result<CommitResult, tokio::task::JoinError>),
    /// The running commit's batch is stored (true) or failed (false).
    Stored(bool),
    Incoming(Incoming),
    Timer,
    /// Lazy steps waited long enough ([`LAZY_COMMIT`]).
    Lazy,
    Stop,
}
