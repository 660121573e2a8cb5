//! Browsers: WebTransport over HTTP/3 on the relay's one QUIC port.
//!
//! [`super::quic`] hands every connection that negotiated ALPN `h3` here,
//! still connecting. `wtransport` completes it, exchanges the HTTP/3
//! settings and reads the extended-CONNECT request. A session on path `/` is
//! accepted (any other path gets `404`); the browser then opens one
//! bidirectional stream and the very same framed conversation as native
//! `hush/1` runs on it, through the same driver ([`super::driver`]) — so
//! authentication, presence, replacement by a newer connection of the same
//! device (whatever its transport), backpressure and shutdown behave alike.
//!
//! The `quinn::Connecting` given to `wtransport` is the type of the one
//! quinn 0.11 crate in the build: `wtransport` 0.7 with its `quinn` feature
//! depends on quinn 0.11 and Cargo unifies both requirements to a single
//! crate instance (`wtransport::quinn` re-exports it). The `_SAME_QUINN`
//! check below fails to compile if that ever stops being true.
//!
//! A browser ends a session with `WebTransport.close()`: `wtransport` then
//! closes the QUIC connection, the stream read fails and the driver ends
//! (releasing the device's presence) like any lost native connection.
//! `wtransport` 0.7 has no server-side session close (no
//! `CLOSE_WEBTRANSPORT_SESSION` capsule), so when the relay ends a session it
//! finishes the stream — the reason has been said in-band by the last frame
//! (`Closing{Replaced}`, `Closing{ShuttingDown}`, an error) — waits up to
//! [`CLOSE_LINGER`] for the page to close the session, and otherwise closes
//! the QUIC connection with the same application codes as native
//! connections (a browser reports that as a lost connection).

use super::Shared;
use super::driver::{Peer, drive};
use super::quic::{STREAM_TIMEOUT, close_code, close_for};
use std::sync::Arc;
use std::time::Duration;
use wtransport::endpoint::{IncomingSessionFuture, SessionRequest};

/// The only WebTransport path served.
pub const SESSION_PATH: &str = "/";
/// Time for the HTTP/3 handshake and the session request (CONNECT) to arrive.
pub const SESSION_TIMEOUT: Duration = STREAM_TIMEOUT;
/// After the relay ends a session, how long it waits for the browser to
/// close the session (having read the last frame) before closing the
/// connection itself.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Bound on delivering a rejection (`404`) before the connection is closed.
const REJECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Compile-time proof that `wtransport` takes our quinn's `Connecting`.
const _SAME_QUINN: fn(quinn::Connecting) -> wtransport::quinn::Connecting = |c| c;

/// Whether a request's `:path` names the served session (a query is ignored).
pub fn path_is_served(path: &str) -> bool {
    path.split(['?', '#']).next() == Some(SESSION_PATH)
}

/// Serve one `h3` connection: one WebTransport session, one stream.
pub(crate) async fn serve(
    connecting: quinn::Connecting,
    shared: Arc<Shared>,
    remote: std::net::SocketAddr,
) {
    let mut shutdown = shared.shutdown.clone();
    let incoming = IncomingSessionFuture::with_quic_connecting(connecting);
    // Dropping the future (timeout, shutdown) drops the last handle of the
    // QUIC connection, which closes it.
    let request = tokio::select! {
        r = tokio::time::timeout(SESSION_TIMEOUT, incoming) => r,
        _ = shutdown.wait_for(|stop| *stop) => return,
    };
    let request = match request {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            tracing::debug!("WebTransport session setup failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("no WebTransport session request in time");
            return;
        }
    };
    let Some(conn) = accept_session(request).await else {
        return;
    };
    let opened = tokio::select! {
        opened = tokio::time::timeout(STREAM_TIMEOUT, conn.accept_bi()) => opened,
        _ = shutdown.wait_for(|stop| *stop) => {
            conn.close(close_code::SHUTTING_DOWN.into(), b"relay shutting down");
            return;
        }
    };
    let (mut send, mut recv) = match opened {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!("WebTransport session ended before a stream: {e}");
            return;
        }
        Err(_) => {
            conn.close(close_code::NO_STREAM.into(), b"no stream opened");
            return;
        }
    };
    let peer = Peer {
        addr: remote,
        connection: Some(conn.quic_connection().clone()),
    };
    let end = drive(shared, peer, &mut recv, &mut send).await;
    let Some((code, reason)) = close_for(&end) else {
        // Transport failure, including the browser closing the session.
        return;
    };
    // Let the last frames be acknowledged before the close discards them,
    // then give the page a moment to close the session itself: its
    // `WebTransport.closed` then resolves instead of reporting a lost
    // connection.
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    if tokio::time::timeout(CLOSE_LINGER, conn.closed())
        .await
        .is_err()
    {
        conn.close(code.into(), reason);
    }
}

/// Accept a session on [`SESSION_PATH`]; answer `404` to any other path.
async fn accept_session(request: SessionRequest) -> Option<wtransport::Connection> {
    // The relay authenticates devices by signature, not by where the page
    // came from: any origin may connect. The origin is logged for operators.
    tracing::debug!(
        path = request.path(),
        origin = request.origin().unwrap_or("-"),
        "WebTransport session request"
    );
    if !path_is_served(request.path()) {
        // `not_found` returns once the peer acknowledged the response; the
        // request (and with it the last handle of the QUIC connection) is
        // then dropped, which closes the connection.
        let _ = tokio::time::timeout(REJECT_TIMEOUT, request.not_found()).await;
        return None;
    }
    match request.accept().await {
        Ok(conn) => Some(conn),
        Err(e) => {
            tracing::debug!("WebTransport session accept failed: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_root_path_is_served() {
        assert!(path_is_served("/"));
        assert!(path_is_served("/?v=1"));
        assert!(!path_is_served(""));
        assert!(!path_is_served("/chat"));
        assert!(!path_is_served("//"));
        assert!(!path_is_served("/index.html"));
    }
}
