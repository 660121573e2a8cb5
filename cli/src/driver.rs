//! The native driver: runs a [`hush_client::Engine`] against a real relay
//! connection, a durable [`Storage`] and the system clock.
//!
//! It implements the engine's driver contract exactly. Every input goes
//! through [`Engine::handle`]; of each resulting [`Step`]:
//!
//! 1. `storage` is applied first, as one atomic, durable batch;
//! 2. only then are `frames` written to the relay;
//! 3. only then are `events` (and the command's reply) handed to the caller.
//!
//! When several inputs are ready at once (a burst of frames from the relay),
//! they are handled one after another and their storage batches applied as
//! **one** transaction before any of their frames or events go out. That is
//! the same contract at a coarser grain — nothing of any of those steps is
//! visible outside before all of them are durable — and it costs one fsync
//! instead of one per frame.
//!
//! If `storage.apply` or `Engine::handle` fails, nothing of the step is
//! performed: the connection is dropped and the engine is rebuilt from
//! storage, exactly as after a crash (the relay redelivers what was not
//! acknowledged; sender seqs drop repeats).
//!
//! Timers come from `Step::wake_at`, reconnects from `Step::connect_at`
//! (the engine's backoff, 1 s → 30 s with jitter). The engine's RNG is
//! seeded from the OS.

use crate::error::CliError;
use crate::transport::{self, Conn, Incoming, RelayTarget};
use hush_client::{
    Command, ConnectionState, Engine, EngineConfig, Event, Input, Reply, Step, Storage, StorageOp,
};
use hush_protocol::{ClientFrame, ServerFrame, encode_client_frame};
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Longest single connection attempt (QUIC handshake and stream).
pub const CONNECT_ATTEMPT: Duration = Duration::from_secs(3);
/// Most inputs handled before their batches are committed together.
const MAX_BATCH_INPUTS: usize = 64;
/// Consecutive rebuilds from storage (no successful commit in between)
/// before giving up.
const MAX_REBUILDS: u32 = 5;

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
    }
}

/// Events of one committed batch, for the caller to show. Storage is
/// already durable when this is delivered.
pub struct Batch<'a, S> {
    /// The engine after the batch.
    pub engine: &'a Engine,
    /// The store (e.g. to read history for display, or record what was shown).
    pub storage: &'a mut S,
    /// The events, in order.
    pub events: &'a [Event],
}

/// Receives each batch's events.
pub trait Sink<S> {
    /// Called after the batch's storage is durable and its frames are sent.
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
    /// Storage batches committed.
    pub commits: u64,
    /// Time inside `Storage::apply`.
    pub apply: Duration,
    /// Time writing frames.
    pub write: Duration,
    /// Time handing events to the sink.
    pub sink: Duration,
    /// Times the engine was rebuilt from storage after a failure.
    pub rebuilds: u64,
}

/// The engine, its store and its relay connection.
pub struct Driver<S: Storage> {
    engine: Engine,
    storage: S,
    cfg: EngineConfig,
    target: RelayTarget,
    conn: Option<Conn>,
    outstanding: BTreeSet<u32>,
    wake_at: Option<u64>,
    connect_at: Option<u64>,
    ever_connected: bool,
    last_failure: Option<CliError>,
    rebuilds: u32,
    stats: DriverStats,
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

impl<S: Storage> Driver<S> {
    /// Wrap an engine loaded from `storage` (or just created: then hand its
    /// first step to [`Driver::start`]).
    pub fn new(engine: Engine, storage: S, cfg: EngineConfig, target: RelayTarget) -> Driver<S> {
        let connect_at = engine.connect_at();
        Driver {
            engine,
            storage,
            cfg,
            target,
            conn: None,
            outstanding: BTreeSet::new(),
            wake_at: None,
            connect_at,
            ever_connected: false,
            last_failure: None,
            rebuilds: 0,
            stats: DriverStats::default(),
        }
    }

    /// Load the engine from `storage` (fresh OS seed) and wrap it.
    pub fn load(storage: S, cfg: EngineConfig, target: RelayTarget) -> Result<Driver<S>, CliError> {
        let engine = Engine::load(storage.load_state()?, os_seed()?, cfg.clone())?;
        Ok(Driver::new(engine, storage, cfg, target))
    }

    /// Where the time went so far.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// The engine (read-only).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The store.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The store, for records the app keeps beside the engine's.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
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
        self.storage.apply(&step.storage)?;
        self.wake_at = step.wake_at;
        self.connect_at = step.connect_at;
        let frames = step.frames;
        let events = step.events;
        let lost = self.write_frames(&frames).await;
        sink.batch(Batch {
            engine: &self.engine,
            storage: &mut self.storage,
            events: &events,
        })?;
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
    /// each command's reply. A refused command is an error and nothing of
    /// the batch happens.
    pub async fn commands(
        &mut self,
        commands: Vec<Command>,
        sink: &mut dyn Sink<S>,
    ) -> Result<Vec<Option<Reply>>, CliError> {
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
        match self.perform(steps, sink).await? {
            None => Ok(replies),
            // Nothing of the commands was stored: report it, do not pretend.
            Some(failure) => Err(CliError::Storage(hush_client::StorageError::Backend(
                failure,
            ))),
        }
    }

    /// Handle inputs, then perform their steps.
    async fn feed(&mut self, inputs: Vec<Input>, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        let now = now_ms();
        let mut steps = Vec::with_capacity(inputs.len());
        let started = std::time::Instant::now();
        self.stats.inputs += inputs.len() as u64;
        for input in inputs {
            match self.engine.handle(now, input) {
                Ok(step) => {
                    let close = step.close;
                    steps.push(step);
                    if close {
                        // The rest arrived on a connection the engine gave up.
                        break;
                    }
                }
                Err(e) => {
                    // The engine may be ahead of storage: start over from it.
                    self.rebuild(&e.to_string()).await?;
                    return Ok(());
                }
            }
        }
        self.stats.handle += started.elapsed();
        self.perform(steps, sink).await.map(|_| ())
    }

    /// Storage, then frames, then events — for a batch of steps. Returns
    /// the storage failure if the batch could not be made durable (then
    /// nothing else of it was performed and the engine was rebuilt).
    async fn perform(
        &mut self,
        steps: Vec<Step>,
        sink: &mut dyn Sink<S>,
    ) -> Result<Option<String>, CliError> {
        let Some(last) = steps.last() else {
            return Ok(None);
        };
        self.wake_at = last.wake_at;
        self.connect_at = last.connect_at;
        let close = steps.iter().any(|s| s.close);
        // 1. Durable first.
        let started = std::time::Instant::now();
        let applied = if steps.len() == 1 {
            self.storage.apply(&steps[0].storage)
        } else {
            let ops: Vec<StorageOp> = steps
                .iter()
                .flat_map(|s| s.storage.iter().cloned())
                .collect();
            self.storage.apply(&ops)
        };
        self.stats.apply += started.elapsed();
        self.stats.commits += 1;
        if let Err(e) = applied {
            let failure = e.to_string();
            self.rebuild(&failure).await?;
            return Ok(Some(failure));
        }
        self.rebuilds = 0;
        // 2. Frames.
        let mut frames = Vec::new();
        let mut events = Vec::new();
        for step in steps {
            frames.extend(step.frames);
            events.extend(step.events);
        }
        let started = std::time::Instant::now();
        let mut lost = None;
        if !close {
            lost = self.write_frames(&frames).await;
        } else if let Some(conn) = self.conn.take() {
            // The engine already considers itself disconnected.
            self.outstanding.clear();
            conn.close().await;
        }
        self.stats.write += started.elapsed();
        // 3. Events.
        if !events.is_empty() {
            let started = std::time::Instant::now();
            sink.batch(Batch {
                engine: &self.engine,
                storage: &mut self.storage,
                events: &events,
            })?;
            self.stats.sink += started.elapsed();
        }
        if let Some(reason) = lost {
            self.lost(reason, sink).await?;
        }
        Ok(None)
    }

    /// Encode and write frames; returns why the connection is lost if it is.
    async fn write_frames(&mut self, frames: &[ClientFrame]) -> Option<String> {
        if frames.is_empty() {
            return None;
        }
        let conn = self.conn.as_mut()?;
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
        conn.write(&bytes).await.err()
    }

    /// The connection failed under us: tell the engine.
    async fn lost(&mut self, _reason: String, sink: &mut dyn Sink<S>) -> Result<(), CliError> {
        self.outstanding.clear();
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        Box::pin(self.feed(vec![Input::Disconnected], sink)).await?;
        Ok(())
    }

    /// Drop the engine and the connection; rebuild from storage.
    async fn rebuild(&mut self, why: &str) -> Result<(), CliError> {
        self.rebuilds += 1;
        self.stats.rebuilds += 1;
        self.outstanding.clear();
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
        if self.rebuilds > MAX_REBUILDS {
            return Err(CliError::Storage(hush_client::StorageError::Backend(
                format!(
                    "stopped after {MAX_REBUILDS} restarts from the local store; last failure: {why}"
                ),
            )));
        }
        let records = self.storage.load_state()?;
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
        match transport::connect(&self.target, bound).await {
            Ok(conn) => {
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
        }
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
    pub async fn run_until(
        &mut self,
        deadline: Instant,
        stop: &mut Option<StopSignal>,
        sink: &mut dyn Sink<S>,
        mut done: impl FnMut(&View<'_>) -> bool,
    ) -> Result<Outcome, CliError> {
        loop {
            if done(&self.view()) {
                return Ok(Outcome::Done);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Outcome::Deadline);
            }
            if self.conn.is_none() && self.connect_at.is_some_and(|t| t <= now_ms()) {
                let bound = CONNECT_ATTEMPT.min(deadline - now);
                let attempt = async { self.connect_once(bound, sink).await };
                match stop.as_mut() {
                    Some(s) => {
                        tokio::select! {
                            r = attempt => { r?; }
                            _ = s => return Ok(Outcome::Stopped),
                        }
                    }
                    None => {
                        attempt.await?;
                    }
                }
                continue;
            }
            let wake = self.next_wake(deadline);
            let next = {
                let conn = self.conn.as_mut();
                let incoming = async {
                    match conn {
                        Some(c) => c.next().await,
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
                    i = incoming => Wake::Incoming(i),
                    _ = tokio::time::sleep_until(wake) => Wake::Timer,
                    _ = stopped => Wake::Stop,
                }
            };
            match next {
                Wake::Stop => return Ok(Outcome::Stopped),
                Wake::Timer => {
                    self.feed(vec![Input::Tick], sink).await?;
                }
                Wake::Incoming(first) => self.incoming(first, sink).await?,
            }
        }
    }

    /// Handle a frame and whatever else is already waiting, as one batch.
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
            ServerFrame::Push { .. } | ServerFrame::Closing { .. } => {}
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
        self.outstanding.clear();
        if let Some(conn) = self.conn.take() {
            conn.close().await;
            // Best effort: the process is about to stop using this engine.
            let _ = self.feed(vec![Input::Disconnected], &mut Discard).await;
        }
    }

    /// Give the store back (after [`Driver::shutdown`]).
    pub fn into_storage(self) -> S {
        self.storage
    }
}

enum Wake {
    Incoming(Incoming),
    Timer,
    Stop,
}
