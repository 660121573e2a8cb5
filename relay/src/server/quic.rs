//! The QUIC endpoint: one UDP port, protocol chosen by ALPN.
//!
//! TLS offers `h3` and `hush/1`. The negotiated protocol is read from the
//! handshake data as soon as the TLS handshake has produced it — before the
//! connection is fully established — and the still-connecting connection is
//! dispatched: `hush/1` to the native handler (one bidirectional stream,
//! frames both ways), `h3` to the WebTransport handler
//! ([`super::webtransport`]: one session on path `/`, one bidirectional
//! stream, the same frames). Handing over the `Connecting` rather than a
//! `Connection` is what the WebTransport library needs
//! (`IncomingSessionFuture::with_quic_connecting`).

use super::Shared;
use super::driver::{DriverEnd, Peer, drive};
use super::guard::{ConnPermit, ConnRefusal};
use crate::error::RelayError;
use crate::tls::CertMaterial;
use hush_protocol::limits::MAX_UDP_PAYLOAD;
use hush_protocol::{ALPN_H3, ALPN_HUSH};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// QUIC idle timeout: a device whose connection shows no sign of life for
/// this long is gone (its lease on presence expires).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval of the WebSocket transport (the relay's pings; a
/// WebSocket client counts on them to tell a quiet relay from a dead one).
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// QUIC keep-alive interval of the relay: a backstop for clients that send
/// no keep-alives of their own, well inside [`IDLE_TIMEOUT`].
///
/// quinn restarts this timer on every packet received, so it fires only on
/// a connection that has been silent this long. It is deliberately longer
/// than the clients' own interval (the CLI and the harness ping every
/// 15 s): the party behind a NAT is the client, and it is the client's
/// outbound packets that keep a NAT binding alive, so the client pings and
/// the relay only answers with an ACK. A relay interval at or below the
/// client's would make the relay ping every connection instead (each ping
/// restarts the peer's timer too), which at 10,000 idle devices was most of
/// the relay's idle CPU.
pub const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Flow-control window of one whole authenticated connection, bytes.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 2 * hush_protocol::limits::MAX_FRAME_LEN as u32;
/// Flow-control window of a connection until it authenticates: what an
/// anonymous peer can make the relay buffer, on all its streams together
/// (the handshake of either protocol and `Hello`/`Register` need far less).
pub const PREAUTH_RECEIVE_WINDOW: u32 = 64 * 1024;
/// A native client must open its stream within this time.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Application close codes of the QUIC connection.
pub mod close_code {
    /// Normal end (the peer closed its stream).
    pub const OK: u32 = 0;
    /// A newer connection of the same device took over.
    pub const REPLACED: u32 = 1;
    /// The relay is shutting down.
    pub const SHUTTING_DOWN: u32 = 2;
    /// The peer violated the protocol (malformed frame, …).
    pub const PROTOCOL: u32 = 3;
    /// The peer did not authenticate in time.
    pub const AUTH_TIMEOUT: u32 = 4;
    /// The peer opened no stream in time.
    pub const NO_STREAM: u32 = 5;
    /// The device was removed by its user while connected.
    pub const REMOVED: u32 = 6;
    /// No application protocol was negotiated.
    pub const UNSUPPORTED_ALPN: u32 = 0x10;
}

/// The transport settings shared by both protocols.
pub fn transport_config() -> Result<quinn::TransportConfig, RelayError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
        .map_err(|e| RelayError::Config(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(QUIC_KEEP_ALIVE));
    // Bound what one connection can make the relay buffer, including data
    // on streams it never reads (a native client may open only one): a
    // small window until the peer authenticates, then two maximal frames'
    // worth (the driver raises it).
    t.receive_window(quinn::VarInt::from_u32(PREAUTH_RECEIVE_WINDOW));
    t.mtu_discovery_config(Some(mtu_discovery()));
    Ok(t)
}

/// Path MTU discovery up to [`MAX_UDP_PAYLOAD`] (quinn's default stops at
/// 1,452 bytes, one 1 KiB envelope per packet even on loopback).
pub fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    mtu
}

/// The endpoint settings of the relay (and of the test harness's clients):
/// datagrams up to [`MAX_UDP_PAYLOAD`] are received, and the peer is told so.
pub fn endpoint_config() -> Result<quinn::EndpointConfig, RelayError> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| RelayError::Config(format!("largest UDP payload: {e}")))?;
    Ok(config)
}

/// The file in the data directory that keeps the key of the relay's
/// stateless resets across restarts (32 random bytes, mode 0600).
pub const RESET_KEY_FILE: &str = "quic-reset.key";

/// [`endpoint_config`] for the relay, with the key of its stateless resets
/// kept in `data_dir` ([`RESET_KEY_FILE`]).
///
/// Why: after a crash, the restarted relay no longer knows its clients'
/// connections. With a fresh key (quinn's default), the packets clients
/// send on them get a reset the clients cannot verify, so each client waits
/// out its idle timeout (30 s) before it reconnects, and meanwhile nothing
/// it sends or is sent gets through. With the same key the reset carries the
/// token the client was given when it connected: its next packet (a send,
/// or at the latest its keep-alive) ends the connection at once, and it
/// reconnects. If the key cannot be read or stored, the relay warns and
/// uses a fresh one, as before.
pub fn relay_endpoint_config(
    data_dir: &std::path::Path,
) -> Result<quinn::EndpointConfig, RelayError> {
    let key = match reset_key(data_dir) {
        Ok(key) => key,
        Err(e) => {
            tracing::warn!("stateless reset key not kept across restarts: {e}");
            return endpoint_config();
        }
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    // Connection ids carry a keyed check that a relay verifies before it
    // answers a packet it has no connection for: with a key of its own per
    // process, the restarted relay would drop the old ids' packets
    // unanswered. Derived from the same secret.
    let tag = ring::hmac::sign(&reset, b"hush relay connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(tag.as_ref().get(..8).unwrap_or(&[0; 8]));
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(std::sync::Arc::new(reset));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            as Box<dyn quinn::ConnectionIdGenerator>
    });
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| RelayError::Config(format!("largest UDP payload: {e}")))?;
    Ok(config)
}

/// The stored reset key, or a new one stored now. A file of the wrong size
/// is replaced (the clients' connections of the last run then time out, as
/// they would have without a stored key).
fn reset_key(data_dir: &std::path::Path) -> Result<[u8; 32], RelayError> {
    let path = data_dir.join(RESET_KEY_FILE);
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        return Ok(key);
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| RelayError::Internal(format!("randomness: {e}")))?;
    std::fs::create_dir_all(data_dir).map_err(|source| RelayError::File {
        what: "data directory",
        path: data_dir.to_path_buf(),
        source,
    })?;
    crate::tls::write_file(&path, &key, true)?;
    Ok(key)
}

/// A quinn server config for `material`.
pub fn server_config(material: &CertMaterial) -> Result<quinn::ServerConfig, RelayError> {
    let crypto = crate::tls::quic_server_config(material)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()?));
    Ok(config)
}

/// How many refused connection attempts [`RecentRefusals`] remembers.
const RECENT_REFUSALS: usize = 1024;

/// The connection attempts refused most recently, so that each attempt is
/// counted once.
///
/// A client whose refusal reaches it later than its retransmission timer
/// sends its Initial packet again, and each copy arrives as a new
/// `Incoming` with the same address and original destination connection
/// id. Counting every copy would make the refusal metrics count packets,
/// inflated by exactly the load that makes refusals slow. The set is
/// bounded (oldest forgotten first), so a flood cannot grow it; a copy
/// arriving after more than [`RECENT_REFUSALS`] other refusals is counted
/// again.
struct RecentRefusals {
    order: std::collections::VecDeque<(SocketAddr, quinn::ConnectionId)>,
    seen: std::collections::HashSet<(SocketAddr, quinn::ConnectionId)>,
    capacity: usize,
}

impl RecentRefusals {
    fn new(capacity: usize) -> Self {
        Self {
            order: std::collections::VecDeque::with_capacity(capacity),
            seen: std::collections::HashSet::with_capacity(capacity),
            capacity,
        }
    }

    /// Records a refusal of the attempt `(remote, cid)`; true when that
    /// attempt was not refused recently.
    fn first(&mut self, remote: SocketAddr, cid: quinn::ConnectionId) -> bool {
        if !self.seen.insert((remote, cid)) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back((remote, cid));
        true
    }
}

/// Accept connections until shutdown, then give the open ones `grace` to
/// finish their pending work and say goodbye.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut connections = JoinSet::new();
    let mut refusals = RecentRefusals::new(RECENT_REFUSALS);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    // Refused before the handshake: a refusal costs one
                    // small packet, no TLS and no connection state.
                    let permit = match shared.connections.try_admit(incoming.remote_address().ip()) {
                        Ok(permit) => permit,
                        Err(limit) => {
                            let counter = match limit {
                                ConnRefusal::Total => &shared.metrics.connections_refused_total,
                                ConnRefusal::PerAddress => &shared.metrics.connections_refused_per_ip_total,
                            };
                            if refusals.first(incoming.remote_address(), incoming.orig_dst_cid()) {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            incoming.refuse();
                            continue;
                        }
                    };
                    connections.spawn(serve_incoming(incoming, Arc::clone(&shared), permit));
                }
                None => break,
            },
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Refuse new connections; the open ones see the shutdown signal.
    endpoint.set_server_config(None);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections did not close within the grace period"
        );
        connections.abort_all();
    }
}

/// Counts an open connection for as long as it lives.
pub(crate) struct ConnectionGauge(Arc<crate::Metrics>);

impl ConnectionGauge {
    pub(crate) fn new(m: Arc<crate::Metrics>) -> Self {
        m.connections.fetch_add(1, Ordering::Relaxed);
        m.connections_total.fetch_add(1, Ordering::Relaxed);
        ConnectionGauge(m)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_incoming(incoming: quinn::Incoming, shared: Arc<Shared>, permit: ConnPermit) {
    // Holds the connection's place in the limits until it ends.
    let _permit = permit;
    let remote = incoming.remote_address();
    let mut connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%remote, "connection refused: {e}");
            return;
        }
    };
    let mut shutdown = shared.shutdown.clone();
    let handshake = tokio::select! {
        h = connecting.handshake_data() => h.map(negotiated_alpn),
        _ = shutdown.wait_for(|stop| *stop) => return,
    };
    let protocol = match handshake {
        Ok(protocol) => protocol,
        Err(e) => {
            tracing::debug!(%remote, "handshake failed: {e}");
            return;
        }
    };
    let _gauge = ConnectionGauge::new(Arc::clone(&shared.metrics));
    match protocol.as_deref() {
        Some(p) if p == ALPN_HUSH => serve_native(connecting, shared, remote).await,
        Some(p) if p == ALPN_H3 => super::webtransport::serve(connecting, shared, remote).await,
        _ => {
            // TLS only completes with an offered ALPN, so this is a peer
            // that negotiated none at all.
            if let Ok(conn) = connecting.await {
                conn.close(
                    close_code::UNSUPPORTED_ALPN.into(),
                    b"no application protocol",
                );
            }
        }
    }
}

/// The ALPN protocol the TLS handshake settled on.
fn negotiated_alpn(data: Box<dyn std::any::Any>) -> Option<Vec<u8>> {
    data.downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()
        .and_then(|d| d.protocol)
}

/// The native protocol: the client opens one bidirectional stream and the
/// framed conversation runs on it.
async fn serve_native(connecting: quinn::Connecting, shared: Arc<Shared>, remote: SocketAddr) {
    let conn = match connecting.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("connection failed: {e}");
            return;
        }
    };
    let mut shutdown = shared.shutdown.clone();
    let opened = tokio::select! {
        opened = tokio::time::timeout(STREAM_TIMEOUT, conn.accept_bi()) => opened,
        _ = shutdown.wait_for(|stop| *stop) => {
            conn.close(close_code::SHUTTING_DOWN.into(), b"relay shutting down");
            return;
        }
    };
    let (mut send, mut recv) = match opened {
        Ok(Ok(streams)) => streams,
        Ok(Err(_)) => return,
        Err(_) => {
            conn.close(close_code::NO_STREAM.into(), b"no stream opened");
            return;
        }
    };
    let peer = Peer {
        addr: remote,
        connection: Some(conn.clone()),
    };
    let end = drive(shared, peer, &mut recv, &mut send).await;
    let Some((code, reason)) = close_for(&end) else {
        return;
    };
    // The driver finished the stream; give the last frames a moment to be
    // acknowledged before the close discards anything unsent.
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    conn.close(code.into(), reason);
}

/// The application close (code, reason) of a connection whose driver ended
/// with `end`; `None` when the transport is already gone.
pub(crate) fn close_for(end: &DriverEnd) -> Option<(u32, &'static [u8])> {
    Some(match end {
        DriverEnd::PeerClosed => (close_code::OK, b"bye"),
        DriverEnd::Replaced => (close_code::REPLACED, b"replaced by a newer connection"),
        DriverEnd::Removed => (close_code::REMOVED, b"device removed by its user"),
        DriverEnd::ShuttingDown => (close_code::SHUTTING_DOWN, b"relay shutting down"),
        DriverEnd::Refused { .. } => (close_code::PROTOCOL, b"protocol violation"),
        DriverEnd::AuthTimeout => (close_code::AUTH_TIMEOUT, b"authentication timed out"),
        DriverEnd::Transport(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retransmitted_initial_is_counted_once_within_the_window() {
        let mut recent = RecentRefusals::new(2);
        let a: SocketAddr = ([127, 0, 0, 1], 1000).into();
        let b: SocketAddr = ([127, 0, 0, 1], 1001).into();
        let cid = |n: u8| quinn::ConnectionId::new(&[n; 8]);
        assert!(recent.first(a, cid(1)));
        assert!(!recent.first(a, cid(1)), "the same attempt again");
        assert!(recent.first(b, cid(1)), "another address");
        assert!(recent.first(a, cid(2)), "another attempt");
        // Capacity 2: the first attempt has been forgotten, and only it.
        assert!(!recent.first(a, cid(2)));
        assert!(recent.first(a, cid(1)));
        assert_eq!(recent.order.len(), 2);
        assert_eq!(recent.seen.len(), 2);
    }
}
