//! WebTransport to the relay: one session, one bidirectional stream, the
//! same length-prefixed frames as the native `hush/1` QUIC transport.
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

use futures_util::future::{Either, select};
use gloo_timers::future::TimeoutFuture;
use hush_protocol::ServerFrame;
use hush_protocol::frame::decode_server_body;
use hush_protocol::limits::MAX_FRAME_LEN;
use js_sys::{ArrayBuffer, Object, Promise, Reflect, Uint8Array};
use std::future::IntoFuture;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    ReadableStream, ReadableStreamDefaultReader, WebTransport, WebTransportBidirectionalStream,
    WebTransportHash, WebTransportOptions, WritableStreamDefaultWriter,
};

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

/// An open session and the writing half of its stream.
pub(crate) struct Connection {
    session: WebTransport,
    writer: WritableStreamDefaultWriter,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Connection {
    /// Queue one complete frame. The stream keeps queued writes in order;
    /// the returned promise rejects if the stream broke.
    pub fn send(&self, frame: &[u8]) -> js_sys::Promise {
        self.writer
            .write_with_chunk(&Uint8Array::from(frame).into())
    }

    /// Resolves (or rejects) when the session ends, for whatever reason.
    pub fn closed(&self) -> js_sys::Promise<web_sys::WebTransportCloseInfo> {
        self.session.closed()
    }

    /// Close the session (idempotent).
    pub fn close(&self) {
        self.session.close();
    }
}

/// The reading half of the frame stream, as the browser offers it.
pub(crate) enum Incoming {
    /// A byte stream: reads fill a buffer of ours, at least to a minimum.
    Byob(ByobReader),
    /// Chunks as the stream delivers them.
    Chunks(ReadableStreamDefaultReader),
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
    Ok((Connection { session, writer }, reader))
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
    reader: Incoming,
    mut on_frame: impl FnMut(ServerFrame) -> bool,
) -> String {
    let mut frames = Assembler::default();
    // The BYOB path's buffer: each read hands it to the stream and gets it
    // back (as a new `ArrayBuffer`) in the result.
    let mut buffer = ArrayBuffer::new(READ_BUFFER);
    let options = Object::new();
    let min_key = JsValue::from_str("min");
    loop {
        let read = match &reader {
            Incoming::Byob(r) => {
                let min = frames.wanted().clamp(1, READ_BUFFER as usize);
                // Setting a property on a plain object of ours cannot fail.
                let _ = Reflect::set(&options, &min_key, &JsValue::from(min as u32));
                let view = Uint8Array::new_with_byte_offset_and_length(&buffer, 0, READ_BUFFER);
                r.read_into(&view, &options)
            }
            Incoming::Chunks(r) => r.read().unchecked_into(),
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
