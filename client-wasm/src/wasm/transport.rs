//! WebTransport to the relay: one session, one bidirectional stream, the
//! same length-prefixed frames as the native `hush/1` QUIC transport.
//!
//! A self-signed development relay is reached by pinning its certificate's
//! SHA-256 (`serverCertificateHashes`); a relay with a publicly trusted
//! certificate needs no hash. The reader side feeds a
//! [`hush_protocol::FrameBuffer`], so frames split across or packed into
//! stream chunks come out whole.

use futures_util::future::{Either, select};
use gloo_timers::future::TimeoutFuture;
use hush_protocol::{FrameBuffer, ServerFrame};
use js_sys::{Reflect, Uint8Array};
use std::future::IntoFuture;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{
    ReadableStreamDefaultReader, WebTransport, WebTransportBidirectionalStream, WebTransportHash,
    WebTransportOptions, WritableStreamDefaultWriter,
};

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

/// Open a session to `url`, wait until it is ready (bounded by
/// [`CONNECT_TIMEOUT_MS`]) and open the frame stream.
pub(crate) async fn connect(
    url: &str,
    cert_hash: Option<[u8; 32]>,
) -> Result<(Connection, ReadableStreamDefaultReader), String> {
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
    let reader = match stream
        .readable()
        .get_reader()
        .dyn_into::<ReadableStreamDefaultReader>()
    {
        Ok(r) => r,
        Err(_) => {
            session.close();
            return Err("the stream has no default reader".into());
        }
    };
    Ok((Connection { session, writer }, reader))
}

/// Read frames until the stream ends, handing each to `on_frame`; returns
/// why it ended. `on_frame` returning `false` stops reading.
pub(crate) async fn read_frames(
    reader: ReadableStreamDefaultReader,
    mut on_frame: impl FnMut(ServerFrame) -> bool,
) -> String {
    let mut buffer = FrameBuffer::new();
    loop {
        let chunk = match reader.read().await {
            Ok(r) => r,
            Err(e) => return format!("stream failed: {}", describe(&e)),
        };
        let done = Reflect::get(&chunk, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            return "the relay closed the stream".into();
        }
        let value = Reflect::get(&chunk, &"value".into()).unwrap_or(JsValue::UNDEFINED);
        let Some(bytes) = value.dyn_ref::<Uint8Array>() else {
            settle(reader.cancel());
            return "the stream delivered something other than bytes".into();
        };
        buffer.extend(&bytes.to_vec());
        loop {
            match buffer.next_server_frame() {
                Ok(Some(frame)) => {
                    if !on_frame(frame) {
                        settle(reader.cancel());
                        return "reading stopped".into();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    settle(reader.cancel());
                    return format!("undecodable frame from the relay: {e}");
                }
            }
        }
    }
}
