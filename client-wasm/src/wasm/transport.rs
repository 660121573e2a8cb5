//! WebTransport to the relay: one session, one bidirectional stream, the
//! same length-prefixed frames as the native `hush/1` QUIC transport — or,
//! where WebTransport is missing or does not connect, a WebSocket carrying
//! the same byte stream in binary messages.
//!
//! [`connect_race`] races them: WebTransport first, the WebSocket after
//! [`WS_HEAD_START_MS`] (at once if the browser has no `WebTransport`, or
//! as soon as WebTransport fails); the first connection wins and the other
//! is closed as soon as it settles.
//!
//! A self-signed development relay is reached by pinning its certificate's
//! SHA-256 (`serverCertificateHashes`); a relay with a publicly trusted
//! certificate needs no hash.
//!
//! The reading side is on the page's thread for every byte of a backlog
//! (about 110 MB for 100,000 messages), so it is built to cross between
//! JavaScript and wasm as little as possible: where the browser offers a
//! BYOB reader it asks for at least the rest of the frame being assembled
//! (`read(view, { min })`), so a 230 KB page arrives in one or two reads
//! instead of dozens of stream chunks, and each chunk is copied once, from
//! the JS buffer straight into the frame's body. Frames split across or
//! packed into chunks come out whole either way.

use futures_channel::mpsc;
use futures_util::StreamExt as _;
use futures_util::future::{Either, select};
use gloo_timers::future::TimeoutFuture;
use hush_protocol::ServerFrame;
use hush_protocol::frame::decode_server_body;
use hush_protocol::limits::MAX_FRAME_LEN;
use js_sys::{ArrayBuffer, Object, Promise, Reflect, Uint8Array};
use std::cell::Cell;
use std::future::IntoFuture;
use std::rc::Rc;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    BinaryType, CloseEvent, MessageEvent, ReadableStream, ReadableStreamDefaultReader, WebSocket,
    WebTransport, WebTransportBidirectionalStream, WebTransportHash, WebTransportOptions,
    WritableStreamDefaultWriter,
};

/// How long WebTransport has to connect before the WebSocket starts too.
pub(crate) const WS_HEAD_START_MS: u32 = 300;

/// Which transport a connection runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    WebTransport,
    WebSocket,
}

impl Link {
    /// `"webtransport"` or `"websocket"` (what `status().transport` says).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Link::WebTransport => "webtransport",
            Link::WebSocket => "websocket",
        }
    }
}

/// Size of the buffer a BYOB read fills: a whole 200-envelope page of 1 KiB
/// messages (about 230 KB) fits, larger frames take several reads.
const READ_BUFFER: u32 = 256 * 1024;

#[wasm_bindgen]
extern "C" {
    /// `ReadableStreamBYOBReader`, declared here for `read(view, { min })`
    /// (not in web-sys). Only obtained from `getReader({ mode: "byob" })`.
    #[wasm_bindgen(js_name = ReadableStreamBYOBReader)]
    pub(crate) type ByobReader;

    /// Fill `view` with at least `options.min` bytes (fewer only at the
    /// end of the stream); the result's `value` is a view over the same
    /// memory, which moves to a new `ArrayBuffer`.
    #[wasm_bindgen(method, js_name = read)]
    fn read_into(this: &ByobReader, view: &Uint8Array, options: &Object) -> Promise;

    #[wasm_bindgen(method)]
    fn cancel(this: &ByobReader) -> Promise;

    /// `ReadableStream`, declared again for `getReader(options)`.
    #[wasm_bindgen(js_name = ReadableStream)]
    type ReaderSource;

    /// Throws where the stream is not a byte stream (no BYOB reader).
    #[wasm_bindgen(method, catch, js_name = getReader)]
    fn get_reader_with(this: &ReaderSource, options: &Object) -> Result<JsValue, JsValue>;
}

/// How long a session may take to become ready before the attempt counts
/// as failed (the engine then backs off and the driver dials again).
pub(crate) const CONNECT_TIMEOUT_MS: u32 = 10_000;

/// A readable description of a JS failure value.
pub(crate) fn describe(e: &JsValue) -> String {
    if let Some(err) = e.dyn_ref::<js_sys::Error>() {
        let name = String::from(err.name());
        let message = String::from(err.message());
        return if message.is_empty() {
            name
        } else {
            format!("{name}: {message}")
        };
    }
    e.as_string()
        .unwrap_or_else(|| "unknown transport error".into())
}

/// Let a promise settle unobserved without an "unhandled rejection" report.
fn settle(p: js_sys::Promise) {
    wasm_bindgen_futures::spawn_local(async move {
        let _ = wasm_bindgen_futures::JsFuture::from(p).await;
    });
}

/// An open connection: a WebTransport session and the writing half of its
/// stream, or a WebSocket.
pub(crate) enum Connection {
    Wt {
        session: WebTransport,
        writer: WritableStreamDefaultWriter,
    },
    Ws(WsConn),
}

/// A WebSocket and the handlers that feed its reader (kept alive with it).
pub(crate) struct WsConn {
    socket: WebSocket,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
    _on_error: Closure<dyn FnMut(web_sys::Event)>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Connection {
    /// The transport.
    pub fn link(&self) -> Link {
        match self {
            Connection::Wt { .. } => Link::WebTransport,
            Connection::Ws(_) => Link::WebSocket,
        }
    }

    /// Queue one complete frame. The stream keeps queued writes in order;
    /// the returned promise rejects if the stream broke.
    pub fn send(&self, frame: &[u8]) -> js_sys::Promise {
        match self {
            Connection::Wt { writer, .. } => {
                writer.write_with_chunk(&Uint8Array::from(frame).into())
            }
            // One frame, one binary message; a closed socket throws.
            Connection::Ws(ws) => match ws.socket.send_with_u8_array(frame) {
                Ok(()) => Promise::resolve(&JsValue::UNDEFINED),
                Err(e) => Promise::reject(&e),
            },
        }
    }

    /// Resolves (or rejects) when the session ends, for whatever reason.
    /// (A WebSocket's end is reported by its reader instead: never settles.)
    pub fn closed(&self) -> js_sys::Promise {
        match self {
            Connection::Wt { session, .. } => session.closed().unchecked_into(),
            Connection::Ws(_) => Promise::new(&mut |_, _| {}),
        }
    }

    /// Close the session (idempotent).
    pub fn close(&self) {
        match self {
            Connection::Wt { session, .. } => session.close(),
            Connection::Ws(ws) => {
                let _ = ws.socket.close_with_code(1000);
            }
        }
    }
}

/// The reading half of the frame stream, as the browser offers it.
pub(crate) enum Incoming {
    /// A byte stream: reads fill a buffer of ours, at least to a minimum.
    Byob(ByobReader),
    /// Chunks as the stream delivers them.
    Chunks(ReadableStreamDefaultReader),
    /// A WebSocket's binary messages, then why it ended.
    Ws(mpsc::UnboundedReceiver<WsEvent>),
}

/// What a WebSocket's handlers hand the reader.
pub(crate) enum WsEvent {
    Bytes(Uint8Array),
    Ended(String),
}

impl Incoming {
    /// A BYOB reader where the stream supports one, else a default reader.
    fn of(stream: &ReadableStream) -> Result<Incoming, String> {
        let options = Object::new();
        // Setting a property on a fresh plain object cannot fail.
        let _ = Reflect::set(&options, &"mode".into(), &"byob".into());
        let source: &ReaderSource = stream.unchecked_ref();
        if let Ok(reader) = source.get_reader_with(&options) {
            return Ok(Incoming::Byob(reader.unchecked_into()));
        }
        stream
            .get_reader()
            .dyn_into::<ReadableStreamDefaultReader>()
            .map(Incoming::Chunks)
            .map_err(|_| "the stream has no default reader".to_owned())
    }

    fn cancel(&self) {
        settle(match self {
            Incoming::Byob(r) => r.cancel(),
            Incoming::Chunks(r) => r.cancel(),
            Incoming::Ws(_) => return,
        });
    }
}

/// Open a session to `url`, wait until it is ready (bounded by
/// [`CONNECT_TIMEOUT_MS`]) and open the frame stream.
pub(crate) async fn connect(
    url: &str,
    cert_hash: Option<[u8; 32]>,
) -> Result<(Connection, Incoming), String> {
    let options = WebTransportOptions::new();
    if let Some(hash) = cert_hash {
        let pin = WebTransportHash::new();
        pin.set_algorithm("sha-256");
        pin.set_value_u8_array(&Uint8Array::from(&hash[..]));
        options.set_server_certificate_hashes(&[pin]);
    }
    let session = WebTransport::new_with_options(url, &options).map_err(|e| describe(&e))?;
    // `closed` rejects when the session fails; observe it so a failed
    // attempt is not reported as an unhandled rejection.
    let closed = session.closed();
    wasm_bindgen_futures::spawn_local(async move {
        let _ = closed.await;
    });
    let ready = session.ready().into_future();
    let timeout = TimeoutFuture::new(CONNECT_TIMEOUT_MS);
    match select(ready, timeout).await {
        Either::Left((Ok(_), _)) => {}
        Either::Left((Err(e), _)) => {
            session.close();
            return Err(describe(&e));
        }
        Either::Right(_) => {
            session.close();
            return Err(format!(
                "the relay did not answer within {} s",
                CONNECT_TIMEOUT_MS / 1000
            ));
        }
    }
    let stream: WebTransportBidirectionalStream = match session.create_bidirectional_stream().await
    {
        Ok(s) => s,
        Err(e) => {
            session.close();
            return Err(describe(&e));
        }
    };
    let writer = match stream.writable().get_writer() {
        Ok(w) => w,
        Err(e) => {
            session.close();
            return Err(describe(&e));
        }
    };
    let reader = match Incoming::of(&stream.readable()) {
        Ok(r) => r,
        Err(e) => {
            session.close();
            return Err(e);
        }
    };
    Ok((Connection::Wt { session, writer }, reader))
}

/// Whether this browser has `WebTransport` at all.
fn has_webtransport() -> bool {
    Reflect::has(&js_sys::global(), &JsValue::from_str("WebTransport")).unwrap_or(false)
}

/// Open a WebSocket to `url` (binary messages as `ArrayBuffer`s) and wait
/// until it is open, bounded by [`CONNECT_TIMEOUT_MS`].
pub(crate) async fn connect_ws(url: &str) -> Result<(Connection, Incoming), String> {
    let socket = WebSocket::new(url).map_err(|e| describe(&e))?;
    socket.set_binary_type(BinaryType::Arraybuffer);
    let (tx, rx) = mpsc::unbounded::<WsEvent>();
    let (open_tx, mut open_rx) = mpsc::unbounded::<Result<(), String>>();
    let on_message = {
        let tx = tx.clone();
        Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
            let data = ev.data();
            if let Some(buf) = data.dyn_ref::<ArrayBuffer>() {
                let _ = tx.unbounded_send(WsEvent::Bytes(Uint8Array::new(buf)));
            } else {
                let _ = tx.unbounded_send(WsEvent::Ended("the relay sent a text message".into()));
            }
        })
    };
    let on_close = {
        let tx = tx.clone();
        let open_tx = open_tx.clone();
        Closure::<dyn FnMut(CloseEvent)>::new(move |ev: CloseEvent| {
            let why = format!("the WebSocket closed ({} {})", ev.code(), ev.reason());
            let _ = open_tx.unbounded_send(Err(why.clone()));
            let _ = tx.unbounded_send(WsEvent::Ended(why));
        })
    };
    let on_error = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
        let _ = open_tx.unbounded_send(Err("the WebSocket failed".into()));
    });
    let opened = {
        let (tx_open, rx_open) = futures_channel::oneshot::channel::<()>();
        let tx_open = Rc::new(Cell::new(Some(tx_open)));
        let on_open = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
            if let Some(t) = tx_open.take() {
                let _ = t.send(());
            }
        });
        socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        socket.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        let failed = async { open_rx.next().await };
        let timeout = TimeoutFuture::new(CONNECT_TIMEOUT_MS);
        let result = match select(rx_open, select(Box::pin(failed), timeout)).await {
            Either::Left((Ok(()), _)) => Ok(()),
            Either::Left((Err(_), _)) => Err("the WebSocket failed".to_owned()),
            Either::Right((Either::Left((why, _)), _)) => Err(why
                .and_then(Result::err)
                .unwrap_or_else(|| "the WebSocket failed".into())),
            Either::Right((Either::Right(_), _)) => Err(format!(
                "the relay did not answer within {} s",
                CONNECT_TIMEOUT_MS / 1000
            )),
        };
        socket.set_onopen(None);
        drop(on_open);
        result
    };
    if let Err(e) = opened {
        let _ = socket.close();
        return Err(e);
    }
    Ok((
        Connection::Ws(WsConn {
            socket,
            _on_message: on_message,
            _on_close: on_close,
            _on_error: on_error,
        }),
        Incoming::Ws(rx),
    ))
}

/// One attempt's outcome, for the race.
type Attempt = (Link, Result<(Connection, Incoming), String>);

/// Race WebTransport to `wt_url` against a WebSocket to `ws_url` (see the
/// module doc); the winner, or both failures.
pub(crate) async fn connect_race(
    wt_url: &str,
    cert_hash: Option<[u8; 32]>,
    ws_url: Option<&str>,
) -> Result<(Connection, Incoming), String> {
    let with_wt = has_webtransport();
    let Some(ws_url) = ws_url else {
        return connect(wt_url, cert_hash).await;
    };
    if !with_wt {
        return connect_ws(ws_url).await;
    }
    let (tx, mut rx) = mpsc::unbounded::<Attempt>();
    // Set once a winner is chosen: a WebSocket not started yet never is.
    let decided = Rc::new(Cell::new(false));
    // Set when WebTransport failed: the WebSocket starts at once.
    let (wt_failed_tx, wt_failed_rx) = futures_channel::oneshot::channel::<()>();
    {
        let tx = tx.clone();
        let url = wt_url.to_owned();
        wasm_bindgen_futures::spawn_local(async move {
            let result = connect(&url, cert_hash).await;
            if result.is_err() {
                let _ = wt_failed_tx.send(());
            }
            let _ = tx.unbounded_send((Link::WebTransport, result));
        });
    }
    {
        let decided = Rc::clone(&decided);
        let url = ws_url.to_owned();
        wasm_bindgen_futures::spawn_local(async move {
            let _ = select(wt_failed_rx, TimeoutFuture::new(WS_HEAD_START_MS)).await;
            if decided.get() {
                return;
            }
            let result = connect_ws(&url).await;
            let _ = tx.unbounded_send((Link::WebSocket, result));
        });
    }
    let mut failures = Vec::new();
    while let Some((link, result)) = rx.next().await {
        match result {
            Ok(won) => {
                decided.set(true);
                // Close the loser whenever it settles.
                wasm_bindgen_futures::spawn_local(async move {
                    while let Some((_, late)) = rx.next().await {
                        if let Ok((conn, reader)) = late {
                            reader.cancel();
                            conn.close();
                        }
                    }
                });
                return Ok(won);
            }
            Err(e) => {
                failures.push(format!("{}: {e}", link.name()));
                if failures.len() == 2 {
                    break;
                }
            }
        }
    }
    Err(failures.join("; "))
}

/// Reassembles length-prefixed frames from stream chunks, copying each
/// byte once, from the JS chunk into the body of the frame it belongs to.
#[derive(Default)]
struct Assembler {
    /// The length prefix, as far as it arrived.
    head: [u8; 4],
    head_len: usize,
    /// The body of the frame in progress (allocated at its full length
    /// once the prefix is complete) and how much of it arrived.
    body: Vec<u8>,
    filled: usize,
}

impl Assembler {
    /// Bytes still missing before the frame in progress is complete.
    fn wanted(&self) -> usize {
        if self.head_len < 4 {
            4 - self.head_len
        } else {
            self.body.len() - self.filled
        }
    }

    /// Take in one chunk, handing each completed frame to `on_frame`.
    /// `Ok(false)`: `on_frame` asked to stop.
    fn push(
        &mut self,
        chunk: &Uint8Array,
        on_frame: &mut impl FnMut(ServerFrame) -> bool,
    ) -> Result<bool, String> {
        let n = chunk.length();
        let mut at = 0u32;
        while at < n {
            let left = (n - at) as usize;
            if self.head_len < 4 {
                let k = (4 - self.head_len).min(left);
                chunk
                    .subarray(at, at + k as u32)
                    .copy_to(&mut self.head[self.head_len..self.head_len + k]);
                self.head_len += k;
                at += k as u32;
                if self.head_len == 4 {
                    let len = u32::from_be_bytes(self.head) as usize;
                    if len == 0 || len > MAX_FRAME_LEN {
                        return Err(format!("undecodable frame from the relay: length {len}"));
                    }
                    self.body = vec![0; len];
                    self.filled = 0;
                }
                continue;
            }
            let k = (self.body.len() - self.filled).min(left);
            chunk
                .subarray(at, at + k as u32)
                .copy_to(&mut self.body[self.filled..self.filled + k]);
            self.filled += k;
            at += k as u32;
            if self.filled == self.body.len() {
                let body = std::mem::take(&mut self.body);
                self.head_len = 0;
                self.filled = 0;
                let frame = decode_server_body(&body)
                    .map_err(|e| format!("undecodable frame from the relay: {e}"))?;
                if !on_frame(frame) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// `{ done, value }` of a stream read.
fn read_result(result: &JsValue) -> (bool, JsValue) {
    let done = Reflect::get(result, &"done".into())
        .ok()
        .and_then(|d| d.as_bool())
        .unwrap_or(true);
    let value = Reflect::get(result, &"value".into()).unwrap_or(JsValue::UNDEFINED);
    (done, value)
}

/// Read frames until the stream ends, handing each to `on_frame`; returns
/// why it ended. `on_frame` returning `false` stops reading.
pub(crate) async fn read_frames(
    mut reader: Incoming,
    mut on_frame: impl FnMut(ServerFrame) -> bool,
) -> String {
    let mut frames = Assembler::default();
    // The BYOB path's buffer: each read hands it to the stream and gets it
    // back (as a new `ArrayBuffer`) in the result.
    let mut buffer = ArrayBuffer::new(READ_BUFFER);
    let options = Object::new();
    let min_key = JsValue::from_str("min");
    loop {
        if let Incoming::Ws(rx) = &mut reader {
            match rx.next().await {
                Some(WsEvent::Bytes(bytes)) => match frames.push(&bytes, &mut on_frame) {
                    Ok(true) => continue,
                    Ok(false) => return "reading stopped".into(),
                    Err(e) => return e,
                },
                Some(WsEvent::Ended(why)) => return why,
                None => return "the WebSocket ended".into(),
            }
        }
        let read = match &reader {
            Incoming::Byob(r) => {
                let min = frames.wanted().clamp(1, READ_BUFFER as usize);
                // Setting a property on a plain object of ours cannot fail.
                let _ = Reflect::set(&options, &min_key, &JsValue::from(min as u32));
                let view = Uint8Array::new_with_byte_offset_and_length(&buffer, 0, READ_BUFFER);
                r.read_into(&view, &options)
            }
            Incoming::Chunks(r) => r.read().unchecked_into(),
            Incoming::Ws(_) => return "unreachable".into(),
        };
        let result = match JsFuture::from(read).await {
            Ok(r) => r,
            Err(e) => return format!("stream failed: {}", describe(&e)),
        };
        let (done, value) = read_result(&result);
        if done {
            return "the relay closed the stream".into();
        }
        let Some(bytes) = value.dyn_ref::<Uint8Array>() else {
            reader.cancel();
            return "the stream delivered something other than bytes".into();
        };
        if matches!(reader, Incoming::Byob(_)) {
            match bytes.buffer().dyn_into::<ArrayBuffer>() {
                Ok(b) if b.byte_length() >= READ_BUFFER => buffer = b,
                _ => buffer = ArrayBuffer::new(READ_BUFFER),
            }
        }
        match frames.push(bytes, &mut on_frame) {
            Ok(true) => {}
            Ok(false) => {
                reader.cancel();
                return "reading stopped".into();
            }
            Err(e) => {
                reader.cancel();
                return e;
            }
        }
    }
}
