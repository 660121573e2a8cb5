//! The browser driver: one single-threaded async loop around the [`Engine`].
//!
//! Everything that can happen arrives as a [`Msg`] on one channel: app
//! commands (with a reply slot), a finished connection attempt, frames and
//! the end of a connection (from the reader task), timers, the browser's
//! `online`/`offline` events and the app's `setOnline`. The loop handles one
//! message at a time, so engine steps never interleave, and for every step
//! it keeps the driver contract:
//!
//! 1. the step's `early_frames` leave once every earlier step is durable;
//! 2. its storage batch is committed in an IndexedDB transaction;
//! 3. only when that transaction completed do its `frames` leave, in order,
//!    and its events reach the listeners (and the reply the caller).
//!
//! Commits are pipelined (group commit): the loop does not wait for a
//! transaction before handling the next input. Steps handled while one
//! transaction is in flight wait together and are committed as ONE
//! transaction as soon as it completes; at most one transaction is in flight,
//! so a transaction never commits after an earlier one failed. During a
//! backlog sync the engine puts the next page's `Pull` in `early_frames`:
//! the relay serves page n+1 and the loop decrypts it while page n commits.
//! A lazy step ([`Step::is_lazy`]: only delivery-state notices, ratchet epochs and
//! acknowledgements to the relay wait on it) that finds nothing in flight
//! waits up to [`LAZY_COMMIT_MS`] for a step with something urgent and
//! joins its transaction, instead of costing one of its own.
//!
//! If the engine or the storage fails, nothing more of the affected steps
//! is performed: the connection is dropped and the engine is rebuilt from
//! IndexedDB, exactly as after a crash, and listeners get an `error` event.
//! Connections are generation-numbered so that late news from an old
//! connection (a frame still queued, its `closed` promise) is ignored, and
//! frames of a step are only ever sent on the connection it ran on.

use super::convert::{self, Failure};
use super::idb_store::{self, Commit, IdbStore};
use super::lock::StorageLock;
use super::transport::{self, Connection, Incoming, describe};
use crate::{Command, ConnectionState, Engine, EngineConfig, Event, Input, Reply, Step, StorageOp};
use futures_channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures_channel::oneshot;
use futures_util::StreamExt;
use futures_util::future::{Either, select};
use gloo_timers::callback::Timeout;
use hush_protocol::{ClientFrame, ServerFrame, encode_client_frame};
use js_sys::Function;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::spawn_local;

/// The longest delay `setTimeout` accepts (2^31 − 1 ms, about 24.8 days).
const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;
/// Longest a lazy step ([`Step::is_lazy`]) waits for a step with something
/// urgent, whose transaction it then joins, before it is committed alone:
/// while the user sends, a message's `Stored` notice no longer costs an
/// IndexedDB transaction of its own ahead of the next message.
const LAZY_COMMIT_MS: u32 = 20;
/// Consecutive engine rebuilds after which the client gives up (storage
/// that fails every write, e.g. an exhausted quota, would otherwise loop).
const MAX_REBUILDS: u32 = 6;

/// Milliseconds since the Unix epoch: the engine's clock.
pub(crate) fn now_ms() -> u64 {
    let t = js_sys::Date::now();
    if t.is_finite() && t > 0.0 {
        t as u64
    } else {
        0
    }
}

/// 32 bytes from the browser's CSPRNG (`crypto.getRandomValues`).
pub(crate) fn seed() -> Result<[u8; 32], Failure> {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| {
        Failure::new(
            "unsupported",
            format!("no secure random source (crypto.getRandomValues): {e}"),
        )
    })?;
    Ok(s)
}

/// A command's answer as the driver hands it back.
pub(crate) type CommandResult = Result<Option<Reply>, Failure>;

/// Everything the loop reacts to.
pub(crate) enum Msg {
    /// An app command and where its answer goes.
    Command(Command, oneshot::Sender<CommandResult>),
    /// A connection attempt finished.
    Dialed(u64, Result<(Connection, Incoming), String>),
    /// A frame arrived on connection generation `g`.
    Frame(u64, Box<ServerFrame>),
    /// Connection generation `g` ended (reader finished, write failed, session closed).
    Lost(u64, String),
    /// Timer generation `g` fired.
    Timer(u64),
    /// The browser's `online` (true) / `offline` (false) event.
    BrowserOnline(bool),
    /// The app's `setOnline`.
    SetOnline(bool),
    /// Stop: close the connection and the database, then acknowledge.
    Close(oneshot::Sender<()>),
    /// Lazy steps waited long enough ([`LAZY_COMMIT_MS`]).
    LazyDue,
}

/// Event listeners: `(type, function)`; type `"*"` receives every event.
#[derive(Default)]
pub(crate) struct Listeners {
    list: RefCell<Vec<(String, Function)>>,
}

impl Listeners {
    pub fn add(&self, kind: &str, f: Function) {
        let mut list = self.list.borrow_mut();
        if !list.iter().any(|(k, g)| k == kind && *g == f) {
            list.push((kind.to_owned(), f));
        }
    }

    pub fn remove(&self, kind: &str, f: &Function) {
        self.list
            .borrow_mut()
            .retain(|(k, g)| !(k == kind && g == f));
    }

    pub fn clear(&self) {
        self.list.borrow_mut().clear();
    }

    /// Whether anything listens to `kind` (directly or through `"*"`).
    pub fn has(&self, kind: &str) -> bool {
        self.list
            .borrow()
            .iter()
            .any(|(k, _)| k == kind || k == "*")
    }

    /// Call every listener of `kind` (and of `"*"`). A listener may add or
    /// remove listeners or call the client while it runs: the list is
    /// copied first and no borrow is held during calls. A listener that
    /// throws is reported on the console and does not stop the others.
    pub fn emit(&self, kind: &str, event: &JsValue) {
        let targets: Vec<Function> = self
            .list
            .borrow()
            .iter()
            .filter(|(k, _)| k == kind || k == "*")
            .map(|(_, f)| f.clone())
            .collect();
        for f in targets {
            if let Err(e) = f.call1(&JsValue::UNDEFINED, event) {
                web_sys::console::error_2(&JsValue::from_str("hush-client: a listener threw"), &e);
            }
        }
    }
}

/// State shared by the JS-facing [`super::Client`] and the loop. The engine
/// is only borrowed for synchronous moments (a step, a getter), never across
/// an `await` or a listener call.
pub(crate) struct Shared {
    pub engine: RefCell<Option<Engine>>,
    pub store: IdbStore,
    pub listeners: Listeners,
    pub storage: String,
    pub relay_url: String,
    /// The WebSocket fallback (`ws://…/ws` or `wss://…/ws`), if any.
    pub ws_url: Option<String>,
    /// The transport of the open connection (`status().transport`).
    pub link: Cell<Option<transport::Link>>,
    /// The app wants a connection (`setOnline`).
    pub online: Cell<bool>,
    pub closed: Cell<bool>,
    /// Set when the client failed for good; every call reports it.
    pub fatal: RefCell<Option<Failure>>,
}

impl Shared {
    /// Why calls cannot proceed, if they cannot.
    pub fn unusable(&self) -> Option<Failure> {
        if self.closed.get() {
            return Some(Failure::closed());
        }
        self.fatal.borrow().clone()
    }
}

/// An event name on the global object and the closure listening to it.
type EventListener = (&'static str, Closure<dyn FnMut(web_sys::Event)>);

/// The browser's `online`/`offline` events, forwarded to the loop.
pub(crate) struct NetworkListeners {
    installed: Vec<EventListener>,
}

impl NetworkListeners {
    /// Listen on the global object (window or worker scope).
    pub fn install(tx: &UnboundedSender<Msg>) -> Self {
        let global: web_sys::EventTarget = js_sys::global().unchecked_into();
        let mut installed = Vec::new();
        for (name, up) in [("online", true), ("offline", false)] {
            let tx = tx.clone();
            let closure = Closure::<dyn FnMut(web_sys::Event)>::new(move |_e: web_sys::Event| {
                let _ = tx.unbounded_send(Msg::BrowserOnline(up));
            });
            if global
                .add_event_listener_with_callback(name, closure.as_ref().unchecked_ref())
                .is_ok()
            {
                installed.push((name, closure));
            }
        }
        NetworkListeners { installed }
    }

    /// Stop listening (before the closures are dropped: a dropped closure
    /// that is still registered would throw when the event fires).
    fn remove(&mut self) {
        let global: web_sys::EventTarget = js_sys::global().unchecked_into();
        for (name, closure) in self.installed.drain(..) {
            let _ =
                global.remove_event_listener_with_callback(name, closure.as_ref().unchecked_ref());
        }
    }
}

/// What the loop holds for the client's lifetime and gives back at close.
pub(crate) struct Held {
    pub lock: StorageLock,
    pub network: NetworkListeners,
}

/// A handled step that still owes the relay frames and the app its events
/// and reply: performed once its storage (and every earlier step's) is
/// durable.
struct Owed {
    /// Connection generation the step ran on: its frames go there or nowhere.
    generation: Option<u64>,
    /// `early_frames` not sent yet (an earlier step was not durable).
    early: Vec<ClientFrame>,
    frames: Vec<ClientFrame>,
    events: Vec<Event>,
    reply: Option<Reply>,
    /// Where a command's answer goes.
    answer: Option<oneshot::Sender<CommandResult>>,
    close: bool,
    /// Nothing urgent waits on this step ([`Step::is_lazy`]).
    lazy: bool,
}

impl Owed {
    /// Tell a waiting caller that its step will never be performed.
    fn abandon(self, why: &Failure) {
        if let Some(answer) = self.answer {
            let _ = answer.send(Err(why.clone()));
        }
    }
}

/// Steps handled while a transaction was in flight, with their storage:
/// committed together in the next transaction.
#[derive(Default)]
struct Waiting {
    steps: Vec<(Owed, Vec<StorageOp>)>,
}

/// The loop's own state.
pub(crate) struct Driver {
    shared: Rc<Shared>,
    tx: UnboundedSender<Msg>,
    cert_hash: Option<[u8; 32]>,
    cfg: EngineConfig,
    /// The open connection and its generation.
    conn: Option<(u64, Connection)>,
    /// Generation of the attempt in progress.
    dialing: Option<u64>,
    next_gen: u64,
    /// The armed timer and the time it fires at.
    timer: Option<(Timeout, u64)>,
    timer_gen: u64,
    wake_at: Option<u64>,
    /// No dialing before this (after rebuilds).
    not_before: u64,
    rebuilds: u32,
    held: Option<Held>,
    /// The transaction in flight, if any, and the steps it makes durable
    /// (in order).
    inflight: Option<Commit>,
    committing: Vec<Owed>,
    /// Steps handled since `inflight` began, or lazy steps waiting for
    /// company while nothing is in flight.
    waiting: Waiting,
    /// Commits the waiting lazy steps alone when it fires.
    lazy_timer: Option<Timeout>,
    /// Devices whose history export failed in this session (not retried
    /// until the client is opened again).
    export_failed: std::collections::BTreeSet<hush_protocol::DeviceId>,
}

/// What woke the loop.
enum Wake {
    Msg(Option<Msg>),
    Committed(Result<(), crate::StorageError>),
}

impl Driver {
    pub fn new(
        shared: Rc<Shared>,
        tx: UnboundedSender<Msg>,
        cert_hash: Option<[u8; 32]>,
        cfg: EngineConfig,
        held: Held,
    ) -> Self {
        Driver {
            shared,
            tx,
            cert_hash,
            cfg,
            conn: None,
            dialing: None,
            next_gen: 0,
            timer: None,
            timer_gen: 0,
            wake_at: None,
            not_before: 0,
            rebuilds: 0,
            held: Some(held),
            inflight: None,
            committing: Vec::new(),
            waiting: Waiting::default(),
            lazy_timer: None,
            export_failed: std::collections::BTreeSet::new(),
        }
    }

    /// Run until [`Msg::Close`] (or until every sender is gone).
    pub async fn run(mut self, mut rx: UnboundedReceiver<Msg>) {
        // The first step: timers, and `connect_at` for the first dial.
        self.input(Input::Tick, None).await;
        self.schedule();
        loop {
            // A finished commit is looked at first, so its frames (the
            // acknowledgements) and events leave as early as possible.
            let wake = match self.inflight.as_mut() {
                Some(commit) => match select(commit, rx.next()).await {
                    Either::Left((result, _)) => Wake::Committed(result),
                    Either::Right((msg, _)) => Wake::Msg(msg),
                },
                None => Wake::Msg(rx.next().await),
            };
            let msg = match wake {
                Wake::Committed(result) => {
                    self.inflight = None;
                    self.committed(result).await;
                    self.export_history().await;
                    self.schedule();
                    continue;
                }
                Wake::Msg(None) => break,
                Wake::Msg(Some(msg)) => msg,
            };
            match msg {
                Msg::Command(cmd, reply) => self.command(cmd, reply).await,
                Msg::Dialed(generation, result) => self.on_dialed(generation, result).await,
                Msg::Frame(generation, frame) => {
                    if self.is_current(generation) {
                        self.input(Input::Frame(*frame), None).await;
                    }
                }
                Msg::Lost(generation, why) => {
                    if self.is_current(generation) {
                        self.drop_connection();
                        self.warn(&format!("connection to the relay lost: {why}"));
                        self.input(Input::Disconnected, None).await;
                    }
                }
                Msg::Timer(generation) => {
                    if generation == self.timer_gen {
                        self.timer = None;
                        self.on_timer().await;
                    }
                }
                Msg::BrowserOnline(true) => {
                    // The network is back: try now instead of waiting out
                    // the engine's backoff.
                    if self.shared.online.get() && self.conn.is_none() && self.dialing.is_none() {
                        self.dial();
                    }
                }
                Msg::BrowserOnline(false) => {
                    // The session is most likely dead; say so now rather
                    // than after QUIC's idle timeout.
                    if self.conn.is_some() {
                        self.drop_connection();
                        self.warn("the browser went offline");
                        self.input(Input::Disconnected, None).await;
                    }
                }
                Msg::SetOnline(on) => self.set_online(on).await,
                Msg::LazyDue => {
                    self.lazy_timer = None;
                    if self.inflight.is_none() && !self.waiting.steps.is_empty() {
                        self.begin_waiting().await;
                    }
                }
                Msg::Close(done) => {
                    // Everything handled so far is committed (or failed)
                    // and its events delivered before the database closes.
                    self.settle().await;
                    self.shutdown();
                    let _ = done.send(());
                    return;
                }
            }
            self.export_history().await;
            self.schedule();
        }
        self.settle().await;
        self.shutdown();
    }

    /// A newly linked device asked for the history (docs/CLIENT.md,
    /// "History transfer"): once every handled step is durable, read the
    /// contacts' conversations from IndexedDB and hand them to the engine,
    /// which seals and uploads them. An export that fails is reported and
    /// not retried in this session (the new device then imports nothing,
    /// as with `--no-history`).
    async fn export_history(&mut self) {
        let wanted = {
            let engine = self.shared.engine.borrow();
            engine.as_ref().and_then(Engine::history_export_wanted)
        };
        let Some(device) = wanted.filter(|d| !self.export_failed.contains(d)) else {
            return;
        };
        // The export must see every message stored so far.
        self.settle().await;
        let conversations: Vec<_> = {
            let engine = self.shared.engine.borrow();
            match engine.as_ref() {
                Some(e) => e.contacts().into_iter().map(|(_, _, c)| c).collect(),
                None => return,
            }
        };
        let messages = match super::history::export(&self.shared.store, &conversations).await {
            Ok(m) => m,
            Err(e) => {
                self.export_failed.insert(device);
                self.warn(&format!("history export failed: {e}"));
                return;
            }
        };
        let result = {
            let mut engine = self.shared.engine.borrow_mut();
            match engine.as_mut() {
                Some(e) => e.start_history_export(now_ms(), device, messages),
                None => return,
            }
        };
        match result {
            Ok(step) => self.accept(step, None).await,
            Err(e) => {
                self.export_failed.insert(device);
                self.warn(&format!("history export failed: {e}"));
            }
        }
    }

    fn is_current(&self, generation: u64) -> bool {
        self.conn.as_ref().is_some_and(|(g, _)| *g == generation)
    }

    fn generation(&self) -> Option<u64> {
        self.conn.as_ref().map(|(g, _)| *g)
    }

    async fn command(&mut self, cmd: Command, answer: oneshot::Sender<CommandResult>) {
        if let Some(f) = self.shared.unusable() {
            let _ = answer.send(Err(f));
            return;
        }
        self.input(Input::Command(cmd), Some(answer)).await;
    }

    /// One engine step. Its outputs are performed in contract order, now or
    /// when the storage they depend on is durable; a command's answer goes
    /// to `answer` at that point.
    async fn input(&mut self, input: Input, answer: Option<oneshot::Sender<CommandResult>>) {
        let is_command = matches!(input, Input::Command(_));
        let now = now_ms();
        let result = {
            let mut engine = self.shared.engine.borrow_mut();
            match engine.as_mut() {
                Some(e) => e.handle(now, input),
                None => {
                    drop(engine);
                    if let Some(answer) = answer {
                        let f = self.shared.unusable().unwrap_or_else(Failure::closed);
                        let _ = answer.send(Err(f));
                    }
                    return;
                }
            }
        };
        let step = match result {
            Ok(step) => step,
            // A refused command changed nothing (commands are validated
            // before they touch state): just report it.
            Err(e) if is_command && is_refusal(&e) => {
                if let Some(answer) = answer {
                    let _ = answer.send(Err(e.into()));
                }
                return;
            }
            Err(e) => {
                let f = Failure::from(e);
                // What earlier steps produced is sound: perform it first.
                self.settle().await;
                self.rebuild(&f).await;
                if let Some(answer) = answer {
                    let _ = answer.send(Err(f));
                }
                return;
            }
        };
        self.accept(step, answer).await;
    }

    /// Queue a handled step behind the steps before it.
    async fn accept(&mut self, step: Step, answer: Option<oneshot::Sender<CommandResult>>) {
        let lazy = step.is_lazy();
        let Step {
            storage,
            early_frames,
            frames,
            events,
            reply,
            wake_at,
            connect_at: _,
            close,
        } = step;
        self.wake_at = wake_at;
        let owed = Owed {
            generation: self.generation(),
            early: early_frames,
            frames,
            events,
            reply,
            answer,
            close,
            lazy,
        };
        self.waiting.steps.push((owed, storage));
        if self.inflight.is_none() {
            self.begin_unless_lazy().await;
        }
        if close {
            // The engine counts the connection as gone: perform this step
            // (and everything before it) now, which drops the connection.
            self.settle().await;
        }
    }

    /// Nothing is in flight: commit the waiting steps, unless all of them
    /// are lazy; then they wait for company, at most [`LAZY_COMMIT_MS`].
    async fn begin_unless_lazy(&mut self) {
        if self.waiting.steps.iter().all(|(owed, _)| owed.lazy) {
            if self.lazy_timer.is_none() && !self.waiting.steps.is_empty() {
                let tx = self.tx.clone();
                self.lazy_timer = Some(Timeout::new(LAZY_COMMIT_MS, move || {
                    let _ = tx.unbounded_send(Msg::LazyDue);
                }));
            }
            return;
        }
        self.begin_waiting().await;
    }

    /// Nothing is in flight (every step before the waiting ones is
    /// durable): perform the waiting steps that wrote nothing, and commit
    /// the rest in one transaction.
    async fn begin_waiting(&mut self) {
        debug_assert!(self.inflight.is_none());
        self.lazy_timer = None; // cancels it: the steps go now
        let mut steps = std::mem::take(&mut self.waiting.steps).into_iter();
        let mut batch: Vec<StorageOp> = Vec::new();
        let mut covered = Vec::new();
        for (mut owed, storage) in steps.by_ref() {
            // Every earlier step is durable: its early frames may leave.
            let early = std::mem::take(&mut owed.early);
            self.send_frames(owed.generation, &early);
            if storage.is_empty() {
                self.perform(owed);
                continue;
            }
            batch = storage;
            covered.push(owed);
            break;
        }
        // Steps after the first that writes share its transaction; their
        // early frames wait for it (an earlier step is not durable yet).
        for (owed, storage) in steps {
            batch.extend(storage);
            covered.push(owed);
        }
        if covered.is_empty() {
            return;
        }
        if covered.len() > 1 {
            batch = idb_store::last_writes(batch);
        }
        match self.shared.store.begin(&batch) {
            Ok(Some(commit)) => {
                self.inflight = Some(commit);
                self.committing = covered;
            }
            Ok(None) => {
                for owed in covered {
                    self.perform(owed);
                }
            }
            Err(e) => {
                let f = Failure::from(e);
                for owed in covered {
                    owed.abandon(&f);
                }
                self.rebuild(&f).await;
            }
        }
    }

    /// The transaction in flight finished.
    async fn committed(&mut self, result: Result<(), crate::StorageError>) {
        let covered = std::mem::take(&mut self.committing);
        match result {
            Ok(()) => {
                self.rebuilds = 0;
                for owed in covered {
                    self.perform(owed);
                }
                if !self.waiting.steps.is_empty() {
                    self.begin_unless_lazy().await;
                }
            }
            Err(e) => {
                let f = Failure::from(e);
                for owed in covered {
                    owed.abandon(&f);
                }
                self.rebuild(&f).await;
            }
        }
    }

    /// Wait until every handled step is committed and performed (or
    /// abandoned by a failure).
    async fn settle(&mut self) {
        loop {
            if self.inflight.is_none() {
                if self.waiting.steps.is_empty() {
                    return;
                }
                // Lazy steps too: everything handled is committed.
                self.begin_waiting().await;
            }
            if let Some(commit) = self.inflight.take() {
                let result = commit.await;
                self.committed(result).await;
            }
        }
    }

    /// A durable step's outputs, in contract order: frames, events, reply,
    /// then the connection drop the engine asked for.
    fn perform(&mut self, owed: Owed) {
        self.send_frames(owed.generation, owed.early.iter().chain(&owed.frames));
        self.emit_events(&owed.events);
        if let Some(answer) = owed.answer {
            let _ = answer.send(Ok(owed.reply));
        }
        if owed.close && owed.generation.is_some() && owed.generation == self.generation() {
            // The engine already counts the connection as gone.
            self.drop_connection();
        }
    }

    /// Queue frames on connection `generation`, if it is still the open
    /// one (after a loss the engine resends whatever needs it once
    /// connected again).
    fn send_frames<'a>(
        &self,
        generation: Option<u64>,
        frames: impl IntoIterator<Item = &'a ClientFrame>,
    ) {
        let Some((current, conn)) = &self.conn else {
            return;
        };
        if generation != Some(*current) {
            return;
        }
        // One write for all of them: the frames are length-prefixed, so
        // the stream carries the same bytes, and each write costs a call
        // into the browser and a promise.
        let mut bytes = Vec::new();
        for frame in frames {
            match encode_client_frame(frame) {
                Ok(encoded) => bytes.extend_from_slice(&encoded),
                Err(e) => self.warn(&format!("a frame could not be encoded: {e}")),
            }
        }
        if bytes.is_empty() {
            return;
        }
        let written = conn.send(&bytes);
        let tx = self.tx.clone();
        let generation = *current;
        spawn_local(async move {
            if let Err(e) = wasm_bindgen_futures::JsFuture::from(written).await {
                let _ = tx.unbounded_send(Msg::Lost(
                    generation,
                    format!("write failed: {}", describe(&e)),
                ));
            }
        });
    }

    fn emit_events(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let converted: Vec<(&'static str, JsValue)> = {
            let engine = self.shared.engine.borrow();
            match engine.as_ref() {
                Some(e) => convert::events(events, e, &self.shared.listeners),
                None => return,
            }
        };
        for (kind, obj) in converted {
            self.shared.listeners.emit(kind, &obj);
        }
    }

    fn warn(&self, message: &str) {
        self.shared
            .listeners
            .emit("warning", &convert::warning(message));
    }

    /// The contract's failure path: drop the connection and the engine,
    /// rebuild it from storage as after a crash, and hold off dialing a
    /// little longer after each consecutive rebuild.
    async fn rebuild(&mut self, why: &Failure) {
        self.abandon_pending(why);
        self.drop_connection();
        self.dialing = None;
        *self.shared.engine.borrow_mut() = None;
        self.rebuilds += 1;
        if self.rebuilds > MAX_REBUILDS {
            self.fail(why.clone());
            return;
        }
        self.shared
            .listeners
            .emit("error", &convert::error_event(why, false));
        let loaded = match self.shared.store.load_state().await {
            Ok(records) => seed()
                .and_then(|s| Engine::load(records, s, self.cfg.clone()).map_err(Failure::from)),
            Err(e) => Err(Failure::from(e)),
        };
        match loaded {
            Ok(engine) => {
                *self.shared.engine.borrow_mut() = Some(engine);
                let delay = 1_000u64 << self.rebuilds.min(5);
                self.not_before = now_ms().saturating_add(delay);
                // A Tick then, which also restores `connect_at`.
                self.wake_at = Some(self.not_before);
            }
            Err(f) => self.fail(f),
        }
    }

    /// Forget every step not performed yet: none of their outputs may
    /// happen (their storage is not, or may not be, durable). A transaction
    /// still in flight settles on its own; the rebuild's read of the
    /// database is ordered after it.
    fn abandon_pending(&mut self, why: &Failure) {
        self.inflight = None;
        for owed in std::mem::take(&mut self.committing) {
            owed.abandon(why);
        }
        for (owed, _) in std::mem::take(&mut self.waiting.steps) {
            owed.abandon(why);
        }
    }

    /// Give up for good: every later call reports `f`.
    fn fail(&mut self, f: Failure) {
        self.abandon_pending(&f);
        self.drop_connection();
        self.dialing = None;
        *self.shared.engine.borrow_mut() = None;
        self.wake_at = None;
        self.shared
            .listeners
            .emit("error", &convert::error_event(&f, true));
        *self.shared.fatal.borrow_mut() = Some(f);
    }

    fn drop_connection(&mut self) {
        if let Some((_, conn)) = self.conn.take() {
            conn.close();
        }
        self.shared.link.set(None);
    }

    /// When to dial next, if a dial is wanted at all.
    fn dial_at(&self) -> Option<u64> {
        if !self.shared.online.get() || self.conn.is_some() || self.dialing.is_some() {
            return None;
        }
        let at = self.shared.engine.borrow().as_ref()?.connect_at()?;
        Some(at.max(self.not_before))
    }

    /// One timer for the earlier of the engine's wake-up and the next dial.
    fn schedule(&mut self) {
        let at = [self.wake_at, self.dial_at()].into_iter().flatten().min();
        // Most inputs leave the time unchanged (during a backlog sync every
        // page would otherwise clear and set a browser timer).
        if at.is_some() && self.timer.as_ref().map(|(_, t)| *t) == at {
            return;
        }
        self.timer = None; // cancels the previous one
        if let Some(at) = at {
            self.timer_gen += 1;
            let generation = self.timer_gen;
            let tx = self.tx.clone();
            let delay = at.saturating_sub(now_ms()).min(MAX_TIMEOUT_MS) as u32;
            let timeout = Timeout::new(delay, move || {
                let _ = tx.unbounded_send(Msg::Timer(generation));
            });
            self.timer = Some((timeout, at));
        }
    }

    async fn on_timer(&mut self) {
        let now = now_ms();
        if self.dial_at().is_some_and(|t| t <= now) {
            self.dial();
        }
        if self.wake_at.is_some_and(|t| t <= now) {
            self.wake_at = None;
            self.input(Input::Tick, None).await;
        }
    }

    fn dial(&mut self) {
        if self.shared.engine.borrow().is_none() {
            return;
        }
        self.next_gen += 1;
        let generation = self.next_gen;
        self.dialing = Some(generation);
        let url = self.shared.relay_url.clone();
        let ws_url = self.shared.ws_url.clone();
        let hash = self.cert_hash;
        let tx = self.tx.clone();
        spawn_local(async move {
            let result = transport::connect_race(&url, hash, ws_url.as_deref()).await;
            if let Err(unsent) = tx.unbounded_send(Msg::Dialed(generation, result)) {
                // The client is gone: do not leave the session open.
                if let Msg::Dialed(_, Ok((conn, _))) = unsent.into_inner() {
                    conn.close();
                }
            }
        });
    }

    async fn on_dialed(&mut self, generation: u64, result: Result<(Connection, Incoming), String>) {
        if self.dialing != Some(generation) {
            // Superseded (setOnline(false), a rebuild, close).
            if let Ok((conn, _)) = result {
                conn.close();
            }
            return;
        }
        self.dialing = None;
        match result {
            Ok((conn, reader)) => {
                let tx = self.tx.clone();
                spawn_local(async move {
                    let frames = tx.clone();
                    let why = transport::read_frames(reader, move |frame| {
                        frames
                            .unbounded_send(Msg::Frame(generation, Box::new(frame)))
                            .is_ok()
                    })
                    .await;
                    let _ = tx.unbounded_send(Msg::Lost(generation, why));
                });
                let closed = conn.closed();
                let tx = self.tx.clone();
                spawn_local(async move {
                    let why = match closed.await {
                        Ok(_) => "the session was closed".to_owned(),
                        Err(e) => format!("the session failed: {}", describe(&e)),
                    };
                    let _ = tx.unbounded_send(Msg::Lost(generation, why));
                });
                self.shared.link.set(Some(conn.link()));
                self.conn = Some((generation, conn));
                self.input(Input::Connected, None).await;
            }
            Err(why) => {
                self.warn(&format!(
                    "could not connect to {}: {why}",
                    self.shared.relay_url
                ));
                self.input(Input::Disconnected, None).await;
            }
        }
    }

    async fn set_online(&mut self, on: bool) {
        self.shared.online.set(on);
        if on {
            if self.conn.is_none() && self.dialing.is_none() {
                self.dial();
            }
            return;
        }
        self.dialing = None;
        let engine_connected = self
            .shared
            .engine
            .borrow()
            .as_ref()
            .is_some_and(|e| e.connection_state() != ConnectionState::Offline);
        self.drop_connection();
        if engine_connected {
            self.input(Input::Disconnected, None).await;
        }
    }

    fn shutdown(&mut self) {
        self.timer = None;
        self.dialing = None;
        self.drop_connection();
        self.shared.closed.set(true);
        *self.shared.engine.borrow_mut() = None;
        self.shared.store.close();
        self.shared.listeners.clear();
        if let Some(mut held) = self.held.take() {
            held.network.remove();
            held.lock.release();
        }
    }
}

/// Command refusals the engine documents as leaving its state untouched.
fn is_refusal(e: &crate::ClientError) -> bool {
    use crate::ClientError as E;
    matches!(
        e,
        E::BadCode(_) | E::Unknown(_) | E::NotAllowed(_) | E::TooLarge { .. }
    )
}
