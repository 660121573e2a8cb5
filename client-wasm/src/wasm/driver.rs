//! The browser driver: one single-threaded async loop around the [`Engine`].
//!
//! Everything that can happen arrives as a [`Msg`] on one channel: app
//! commands (with a reply slot), a finished connection attempt, frames and
//! the end of a connection (from the reader task), timers, the browser's
//! `online`/`offline` events and the app's `setOnline`. The loop handles one
//! message at a time, so engine steps never interleave, and for every step
//! it follows the driver contract exactly:
//!
//! 1. `await` the step's storage batch in one IndexedDB transaction
//!    (durable before anything else happens);
//! 2. then queue the step's frames on the stream, in order;
//! 3. then deliver its events to the listeners, and the reply to the caller.
//!
//! If the engine or the storage fails, the rest of the step is not
//! performed: the connection is dropped and the engine is rebuilt from
//! IndexedDB, exactly as after a crash, and listeners get an `error` event.
//! Connections are generation-numbered so that late news from an old
//! connection (a frame still queued, its `closed` promise) is ignored.

use super::convert::{self, Failure};
use super::idb_store::IdbStore;
use super::lock::StorageLock;
use super::transport::{self, Connection, describe};
use crate::{Command, ConnectionState, Engine, EngineConfig, Event, Input, Reply};
use futures_channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures_channel::oneshot;
use futures_util::StreamExt;
use gloo_timers::callback::Timeout;
use hush_protocol::{ClientFrame, ServerFrame, encode_client_frame};
use js_sys::Function;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::spawn_local;
use web_sys::ReadableStreamDefaultReader;

/// The longest delay `setTimeout` accepts (2^31 − 1 ms, about 24.8 days).
const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;
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
    Dialed(
        u64,
        Result<(Connection, ReadableStreamDefaultReader), String>,
    ),
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
    timer: Option<Timeout>,
    timer_gen: u64,
    wake_at: Option<u64>,
    /// No dialing before this (after rebuilds).
    not_before: u64,
    rebuilds: u32,
    held: Option<Held>,
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
        }
    }

    /// Run until [`Msg::Close`] (or until every sender is gone).
    pub async fn run(mut self, mut rx: UnboundedReceiver<Msg>) {
        // The first step: timers, and `connect_at` for the first dial.
        let _ = self.input(Input::Tick).await;
        self.schedule();
        while let Some(msg) = rx.next().await {
            match msg {
                Msg::Command(cmd, reply) => {
                    let result = self.command(cmd).await;
                    let _ = reply.send(result);
                }
                Msg::Dialed(generation, result) => self.on_dialed(generation, result).await,
                Msg::Frame(generation, frame) => {
                    if self.is_current(generation) {
                        let _ = self.input(Input::Frame(*frame)).await;
                    }
                }
                Msg::Lost(generation, why) => {
                    if self.is_current(generation) {
                        self.drop_connection();
                        self.warn(&format!("connection to the relay lost: {why}"));
                        let _ = self.input(Input::Disconnected).await;
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
                        let _ = self.input(Input::Disconnected).await;
                    }
                }
                Msg::SetOnline(on) => self.set_online(on).await,
                Msg::Close(done) => {
                    self.shutdown();
                    let _ = done.send(());
                    return;
                }
            }
            self.schedule();
        }
        self.shutdown();
    }

    fn is_current(&self, generation: u64) -> bool {
        self.conn.as_ref().is_some_and(|(g, _)| *g == generation)
    }

    async fn command(&mut self, cmd: Command) -> CommandResult {
        if let Some(f) = self.shared.unusable() {
            return Err(f);
        }
        self.input(Input::Command(cmd)).await
    }

    /// One engine step (plus the follow-up when the engine closes the
    /// connection), performed in contract order.
    async fn input(&mut self, input: Input) -> CommandResult {
        let is_command = matches!(input, Input::Command(_));
        let now = now_ms();
        let result = {
            let mut engine = self.shared.engine.borrow_mut();
            match engine.as_mut() {
                Some(e) => e.handle(now, input),
                None => {
                    drop(engine);
                    return Err(self.shared.unusable().unwrap_or_else(Failure::closed));
                }
            }
        };
        let step = match result {
            Ok(step) => step,
            // A refused command changed nothing (commands are validated
            // before they touch state): just report it.
            Err(e) if is_command && is_refusal(&e) => return Err(e.into()),
            Err(e) => {
                let f = Failure::from(e);
                self.rebuild(&f).await;
                return Err(f);
            }
        };
        // 1. Durable first.
        if let Err(e) = self.shared.store.apply(&step.storage).await {
            let f = Failure::from(e);
            self.rebuild(&f).await;
            return Err(f);
        }
        if !step.storage.is_empty() {
            self.rebuilds = 0;
        }
        // 2. Frames.
        self.send_frames(&step.frames);
        // 3. Events (the reply follows when the caller gets the result).
        self.emit_events(&step.events);
        self.wake_at = step.wake_at;
        if step.close {
            // The engine already counts the connection as gone.
            self.drop_connection();
        }
        Ok(step.reply)
    }

    fn send_frames(&self, frames: &[ClientFrame]) {
        let Some((generation, conn)) = &self.conn else {
            // Not connected (the loss is still queued): the engine resends
            // whatever needs it after the next `Connected`.
            return;
        };
        for frame in frames {
            match encode_client_frame(frame) {
                Ok(bytes) => {
                    let written = conn.send(&bytes);
                    let tx = self.tx.clone();
                    let generation = *generation;
                    spawn_local(async move {
                        if let Err(e) = wasm_bindgen_futures::JsFuture::from(written).await {
                            let _ = tx.unbounded_send(Msg::Lost(
                                generation,
                                format!("write failed: {}", describe(&e)),
                            ));
                        }
                    });
                }
                Err(e) => self.warn(&format!("a frame could not be encoded: {e}")),
            }
        }
    }

    fn emit_events(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let converted: Vec<(&'static str, JsValue)> = {
            let engine = self.shared.engine.borrow();
            match engine.as_ref() {
                Some(e) => events.iter().map(|ev| convert::event(ev, e)).collect(),
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

    /// Give up for good: every later call reports `f`.
    fn fail(&mut self, f: Failure) {
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
        self.timer = None; // cancels the previous one
        if let Some(at) = at {
            self.timer_gen += 1;
            let generation = self.timer_gen;
            let tx = self.tx.clone();
            let delay = at.saturating_sub(now_ms()).min(MAX_TIMEOUT_MS) as u32;
            self.timer = Some(Timeout::new(delay, move || {
                let _ = tx.unbounded_send(Msg::Timer(generation));
            }));
        }
    }

    async fn on_timer(&mut self) {
        let now = now_ms();
        if self.dial_at().is_some_and(|t| t <= now) {
            self.dial();
        }
        if self.wake_at.is_some_and(|t| t <= now) {
            self.wake_at = None;
            let _ = self.input(Input::Tick).await;
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
        let hash = self.cert_hash;
        let tx = self.tx.clone();
        spawn_local(async move {
            let result = transport::connect(&url, hash).await;
            if let Err(unsent) = tx.unbounded_send(Msg::Dialed(generation, result)) {
                // The client is gone: do not leave the session open.
                if let Msg::Dialed(_, Ok((conn, _))) = unsent.into_inner() {
                    conn.close();
                }
            }
        });
    }

    async fn on_dialed(
        &mut self,
        generation: u64,
        result: Result<(Connection, ReadableStreamDefaultReader), String>,
    ) {
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
                self.conn = Some((generation, conn));
                let _ = self.input(Input::Connected).await;
            }
            Err(why) => {
                self.warn(&format!(
                    "could not connect to {}: {why}",
                    self.shared.relay_url
                ));
                let _ = self.input(Input::Disconnected).await;
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
            let _ = self.input(Input::Disconnected).await;
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
