//! The WebSocket transport: the same framed conversation as `hush/1`, over
//! a WebSocket (RFC 6455) on TCP — for networks that block UDP and browsers
//! whose WebTransport is missing or unreliable.
//!
//! Two ways in, one code path:
//!
//! - **TLS** (`wss://HOST:PORT/ws`): a TCP listener, by default on the QUIC
//!   endpoint's own port number (TCP and UDP ports are separate), with the
//!   relay's certificate (ALPN `http/1.1`). See `--ws-listen`.
//! - **plain** (`ws://HOST:HTTP_PORT/ws`): the HTTP listener hands a
//!   `GET /ws` upgrade request here (see [`crate::http`]): always on a
//!   loopback HTTP listener, elsewhere only with `--http-ws`. This is what a
//!   browser uses against a relay whose self-signed development certificate
//!   it cannot pin for a WebSocket.
//!
//! The byte stream is exactly that of a native QUIC stream: the payloads of
//! the binary messages, concatenated in order, are the length-prefixed
//! frames (`docs/PROTOCOL.md`, "WebSocket transport"). The relay does not
//! buffer messages: it decodes the WebSocket framing as bytes arrive and
//! streams the payload to the connection driver ([`super::driver`]) through
//! an in-memory pipe of [`PIPE_CAPACITY`] bytes, so the driver's own
//! pre-authentication limits (a frame's declared length is checked as soon
//! as its prefix arrives, reads of one maximal pre-auth frame at a time, the
//! authentication deadline) apply unchanged, and a full pipe stops the relay
//! reading the socket (TCP flow control then slows the peer), as QUIC flow
//! control does. What the driver writes goes out as binary messages.
//!
//! Bad WebSocket input ends the connection with a WebSocket close code
//! ([`close_code`]): a text message `1003`, broken framing (unmasked client
//! frame, reserved bits, a bad control frame or continuation) `1002`. A
//! connection silent for [`IDLE_TIMEOUT`] (the relay pings every
//! [`KEEP_ALIVE`]; browsers and clients answer pings by themselves) is
//! closed with `1001`. When the driver ends a connection, the close code is
//! `4000` + the QUIC application close code ([`super::quic::close_code`]),
//! except a normal end (`1000`).

use super::Shared;
use super::driver::{DriverEnd, Peer, drive};
use super::guard::{ConnPermit, ConnRefusal};
use super::quic::{ConnectionGauge, close_for};
use crate::error::RelayError;
use crate::metrics::Metrics;
use crate::tls::CertMaterial;
use base64::Engine as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// The request path of the WebSocket (either listener).
pub const WS_PATH: &str = "/ws";
/// Time for the TLS handshake and the upgrade request to arrive.
pub const HANDSHAKE_TIMEOUT: Duration = super::quic::STREAM_TIMEOUT;
/// Longest upgrade request head.
pub const MAX_HEAD: usize = 8 * 1024;
/// Bytes in flight between the WebSocket framing and the driver, each way.
pub const PIPE_CAPACITY: usize = 64 * 1024;
/// A connection from which nothing (no frame, no pong) arrives for this long is gone.
pub const IDLE_TIMEOUT: Duration = super::quic::IDLE_TIMEOUT;
/// The relay pings a connection this often.
pub const KEEP_ALIVE: Duration = super::quic::KEEP_ALIVE;
/// Largest binary message the relay sends (the driver's output is cut here).
pub const MAX_OUT_MESSAGE: usize = 16 * 1024;
/// A write to the socket that makes no progress for this long ends the connection.
const WRITE_TIMEOUT: Duration = IDLE_TIMEOUT;
/// Bound on saying goodbye (the close frame) at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Plain upgrades the HTTP listener may hand over before the relay takes them.
pub const UPGRADE_QUEUE: usize = 64;

/// WebSocket close codes the relay sends.
pub mod close_code {
    /// Normal end.
    pub const NORMAL: u16 = 1000;
    /// The connection went idle ([`super::IDLE_TIMEOUT`]).
    pub const GOING_AWAY: u16 = 1001;
    /// Broken WebSocket framing.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message (Hush speaks binary only).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Base of the codes mirroring the QUIC application close codes
    /// (`4000 + code`): 4001 replaced, 4002 shutting down, 4003 protocol
    /// violation, 4004 authentication timeout.
    pub const APP_BASE: u16 = 4000;
}

/// The TLS configuration new WebSocket connections get; swapped when the
/// certificate is renewed or replaced (open connections keep theirs).
pub(crate) struct TlsSlot(RwLock<tokio_rustls::TlsAcceptor>);

impl TlsSlot {
    pub(crate) fn new(material: &CertMaterial) -> Result<Arc<TlsSlot>, RelayError> {
        Ok(Arc::new(TlsSlot(RwLock::new(acceptor(material)?))))
    }

    pub(crate) fn set(&self, material: &CertMaterial) -> Result<(), RelayError> {
        let next = acceptor(material)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    fn get(&self) -> tokio_rustls::TlsAcceptor {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// TLS 1.3 over TCP with the relay's certificate, ALPN `http/1.1`.
fn acceptor(material: &CertMaterial) -> Result<tokio_rustls::TlsAcceptor, RelayError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| RelayError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|e| RelayError::Tls(format!("certificate and key: {e}")))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// A plain upgrade request the HTTP listener read and hands over.
pub struct PlainUpgrade {
    /// The connection, positioned after the request head.
    pub stream: TcpStream,
    /// The peer's address.
    pub remote: SocketAddr,
    /// The request head (request line and headers, without the blank line).
    pub head: String,
}

impl std::fmt::Debug for PlainUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainUpgrade")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// Whether a request head asks for the WebSocket path (any method; the
/// upgrade checks the rest).
pub fn is_ws_request(head: &str) -> bool {
    let line = head.lines().next().unwrap_or_default();
    line.split(' ')
        .nth(1)
        .and_then(|target| target.split(['?', '#']).next())
        == Some(WS_PATH)
}

/// The value of the first `name` header of a request head (case-insensitive).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// Whether a comma-separated header value contains `token` (case-insensitive).
fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Check an upgrade request; the `101` response to send, or the refusal.
pub fn upgrade_response(head: &str) -> Result<String, String> {
    let refuse = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(_), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse("400 Bad Request", "", "bad request line\n"));
    };
    if !is_ws_request(head) {
        return Err(refuse("404 Not Found", "", "not found\n"));
    }
    if method != "GET" || version != "HTTP/1.1" {
        return Err(refuse(
            "400 Bad Request",
            "",
            "a WebSocket upgrade is a GET over HTTP/1.1\n",
        ));
    }
    if !has_token(header(head, "upgrade"), "websocket")
        || !has_token(header(head, "connection"), "upgrade")
    {
        return Err(refuse(
            "426 Upgrade Required",
            "Upgrade: websocket\r\n",
            "this path only speaks WebSocket\n",
        ));
    }
    if header(head, "sec-websocket-version") != Some("13") {
        return Err(refuse(
            "426 Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
            "WebSocket version 13 only\n",
        ));
    }
    let key = header(head, "sec-websocket-key").unwrap_or_default();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap_or_default();
    if decoded.len() != 16 {
        return Err(refuse("400 Bad Request", "", "bad Sec-WebSocket-Key\n"));
    }
    Ok(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    ))
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455, 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// Read a request head (up to the blank line) of at most [`MAX_HEAD`]
/// bytes. Reads byte-wise past nothing: it stops at the blank line, so the
/// WebSocket bytes after it stay in the stream.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    loop {
        let byte = stream.read_u8().await.ok()?;
        buf.push(byte);
        if buf.ends_with(b"\r\n\r\n") {
            buf.truncate(buf.len() - 4);
            return String::from_utf8(buf).ok();
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
    }
}

/// Accept TLS WebSocket connections (if `listener`) and plain upgrades from
/// the HTTP listener until shutdown, then give the open ones `grace` to
/// finish.
pub(crate) async fn accept_loop(
    listener: Option<TcpListener>,
    tls: Arc<TlsSlot>,
    mut plain: Option<mpsc::Receiver<PlainUpgrade>>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = accept(listener.as_ref()) => {
                let (stream, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off briefly.
                        tracing::warn!("WebSocket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(permit) = admit(&shared, remote) else { continue };
                let _ = stream.set_nodelay(true);
                let acceptor = tls.get();
                connections.spawn(serve_tls(stream, remote, acceptor, Arc::clone(&shared), permit));
            }
            upgrade = next_upgrade(&mut plain) => match upgrade {
                Some(up) => {
                    let Some(permit) = admit(&shared, up.remote) else { continue };
                    let _ = up.stream.set_nodelay(true);
                    connections.spawn(serve_plain(up, Arc::clone(&shared), permit));
                }
                None => plain = None,
            },
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "WebSocket connections did not close within the grace period"
        );
        connections.abort_all();
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn next_upgrade(rx: &mut Option<mpsc::Receiver<PlainUpgrade>>) -> Option<PlainUpgrade> {
    match rx.as_mut() {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The connection limits, as for QUIC (a refused TCP connection is closed
/// at once).
fn admit(shared: &Shared, remote: SocketAddr) -> Option<ConnPermit> {
    match shared.connections.try_admit(remote.ip()) {
        Ok(permit) => Some(permit),
        Err(limit) => {
            let counter = match limit {
                ConnRefusal::Total => &shared.metrics.connections_refused_total,
                ConnRefusal::PerAddress => &shared.metrics.connections_refused_per_ip_total,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

async fn serve_tls(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    permit: ConnPermit,
) {
    let _permit = permit;
    let mut shutdown = shared.shutdown.clone();
    let handshake = async {
        let mut tls = acceptor.accept(stream).await.ok()?;
        let head = read_head(&mut tls).await?;
        Some((tls, head))
    };
    let opened = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => r,
        _ = shutdown.wait_for(|stop| *stop) => return,
    };
    let Ok(Some((mut tls, head))) = opened else {
        tracing::debug!(%remote, "WebSocket TLS handshake or upgrade request failed");
        return;
    };
    if answer_upgrade(&mut tls, &head).await {
        serve_ws(tls, remote, shared).await;
    }
}

async fn serve_plain(up: PlainUpgrade, shared: Arc<Shared>, permit: ConnPermit) {
    let _permit = permit;
    let mut stream = up.stream;
    if answer_upgrade(&mut stream, &up.head).await {
        serve_ws(stream, up.remote, shared).await;
    }
}

/// Answer the upgrade request; true when the connection is now a WebSocket.
async fn answer_upgrade<S: AsyncWrite + Unpin>(stream: &mut S, head: &str) -> bool {
    let (response, upgraded) = match upgrade_response(head) {
        Ok(r) => (r, true),
        Err(r) => (r, false),
    };
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.flush().await?;
        if !upgraded {
            stream.shutdown().await?;
        }
        std::io::Result::Ok(())
    };
    matches!(tokio::time::timeout(CLOSE_TIMEOUT, write).await, Ok(Ok(()))) && upgraded
}

/// What the frame reader tells the frame writer.
enum Ctl {
    /// Answer a ping.
    Pong(Vec<u8>),
    /// Close with this code and reason (a violation, idleness, or an echo of
    /// the peer's close), then stop.
    Close(u16, &'static str),
}

/// Why reading WebSocket frames stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// The peer sent a close frame.
    PeerClose,
    /// The peer broke the protocol; closed with this code.
    Violation(u16, &'static str),
    /// Nothing arrived for [`IDLE_TIMEOUT`].
    Idle,
    /// The socket ended or failed, or the driver stopped reading.
    Gone,
}

/// Run a WebSocket connection: framing on one side, the driver on the other.
async fn serve_ws<S>(stream: S, remote: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _gauge = ConnectionGauge::new(Arc::clone(&shared.metrics));
    Metrics::add(&shared.metrics.websocket_connections_total, 1);
    let (mut sock_r, mut sock_w) = tokio::io::split(stream);
    let (driver_pipe, pump_pipe) = tokio::io::duplex(PIPE_CAPACITY);
    let (mut drv_r, mut drv_w) = tokio::io::split(driver_pipe);
    let (mut pipe_r, mut pipe_w) = tokio::io::split(pump_pipe);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Ctl>(4);
    let (end_tx, end_rx) = oneshot::channel::<(u16, &'static str)>();
    let metrics = Arc::clone(&shared.metrics);

    let driver = async {
        let peer = Peer {
            addr: remote,
            connection: None,
        };
        let end = drive(shared, peer, &mut drv_r, &mut drv_w).await;
        let _ = end_tx.send(ws_close_for(&end));
    };
    let pump = async move {
        {
            let inbound = read_then_stop(&mut sock_r, &mut pipe_w, &ctl_tx);
            let outbound = write_frames(&mut sock_w, &mut pipe_r, ctl_rx, end_rx);
            tokio::pin!(inbound, outbound);
            tokio::select! {
                () = &mut outbound => {}
                end = &mut inbound => {
                    if let ReadEnd::Violation(code, reason) = end {
                        tracing::debug!(%remote, code, reason, "WebSocket protocol violation");
                        Metrics::add(&metrics.websocket_violations_total, 1);
                    }
                    let ctl = match end {
                        ReadEnd::PeerClose => Some(Ctl::Close(close_code::NORMAL, "bye")),
                        ReadEnd::Violation(code, reason) => Some(Ctl::Close(code, reason)),
                        ReadEnd::Idle => Some(Ctl::Close(close_code::GOING_AWAY, "idle")),
                        ReadEnd::Gone => None,
                    };
                    if let Some(ctl) = ctl {
                        let _ = ctl_tx.send(ctl).await;
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut outbound).await;
                    }
                }
            }
        }
        // Dropping the pump's end of the pipe ends the driver's stream both ways.
        drop(pipe_w);
        drop(pipe_r);
        (sock_r, sock_w)
    };
    let ((), (sock_r, sock_w)) = tokio::join!(driver, pump);
    let mut stream = sock_r.unsplit(sock_w);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
}

/// [`read_frames`], then end the driver's input (it sees the end of its stream).
async fn read_then_stop<R, W>(sock: &mut R, pipe: &mut W, ctl: &mpsc::Sender<Ctl>) -> ReadEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let end = read_frames(sock, pipe, ctl).await;
    let _ = pipe.shutdown().await;
    end
}

/// The close code and reason of a connection whose driver ended with `end`.
fn ws_close_for(end: &DriverEnd) -> (u16, &'static str) {
    match close_for(end) {
        Some((0, _)) | None => (close_code::NORMAL, "bye"),
        Some((code, reason)) => {
            let code = u16::try_from(code)
                .ok()
                .and_then(|c| close_code::APP_BASE.checked_add(c))
                .unwrap_or(close_code::APP_BASE);
            (code, std::str::from_utf8(reason).unwrap_or("closed"))
        }
    }
}

/// Opcodes.
mod op {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Decode client frames and stream binary payloads into the driver's pipe.
async fn read_frames<R, W>(sock: &mut R, pipe: &mut W, ctl: &mpsc::Sender<Ctl>) -> ReadEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut sock = BufReader::with_capacity(16 * 1024, sock);
    let mut chunk = vec![0u8; 16 * 1024];
    // Inside a fragmented binary message.
    let mut in_message = false;
    loop {
        let mut head = [0u8; 2];
        match tokio::time::timeout(IDLE_TIMEOUT, sock.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return ReadEnd::Gone,
            Err(_) => return ReadEnd::Idle,
        }
        let [b0, b1] = head;
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        if b0 & 0x70 != 0 {
            return ReadEnd::Violation(close_code::PROTOCOL_ERROR, "reserved bits set");
        }
        if b1 & 0x80 == 0 {
            return ReadEnd::Violation(close_code::PROTOCOL_ERROR, "unmasked client frame");
        }
        let len = match b1 & 0x7F {
            126 => match sock.read_u16().await {
                Ok(n) => u64::from(n),
                Err(_) => return ReadEnd::Gone,
            },
            127 => match sock.read_u64().await {
                Ok(n) if n >> 63 == 0 => n,
                Ok(_) => {
                    return ReadEnd::Violation(close_code::PROTOCOL_ERROR, "bad payload length");
                }
                Err(_) => return ReadEnd::Gone,
            },
            n => u64::from(n),
        };
        let mut mask = [0u8; 4];
        if sock.read_exact(&mut mask).await.is_err() {
            return ReadEnd::Gone;
        }
        match opcode {
            op::CLOSE | op::PING | op::PONG => {
                if !fin || len > 125 {
                    return ReadEnd::Violation(close_code::PROTOCOL_ERROR, "bad control frame");
                }
                let mut payload = vec![0u8; len as usize];
                if sock.read_exact(&mut payload).await.is_err() {
                    return ReadEnd::Gone;
                }
                unmask(&mut payload, mask, 0);
                match opcode {
                    op::CLOSE => return ReadEnd::PeerClose,
                    op::PING => {
                        // A full queue means pongs are already owed: skip this one.
                        let _ = ctl.try_send(Ctl::Pong(payload));
                    }
                    _ => {}
                }
                continue;
            }
            op::TEXT => {
                return ReadEnd::Violation(
                    close_code::UNSUPPORTED_DATA,
                    "text messages are not part of the protocol",
                );
            }
            op::BINARY if in_message => {
                return ReadEnd::Violation(close_code::PROTOCOL_ERROR, "unfinished message");
            }
            op::CONTINUATION if !in_message => {
                return ReadEnd::Violation(close_code::PROTOCOL_ERROR, "stray continuation");
            }
            op::BINARY | op::CONTINUATION => {}
            _ => return ReadEnd::Violation(close_code::PROTOCOL_ERROR, "unknown opcode"),
        }
        in_message = !fin;
        // Stream the payload through; a full pipe stops reading the socket.
        let mut left = len;
        let mut offset = 0usize;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            let Some(buf) = chunk.get_mut(..want) else {
                return ReadEnd::Gone;
            };
            let n = match tokio::time::timeout(IDLE_TIMEOUT, sock.read(buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return ReadEnd::Gone,
                Ok(Ok(n)) => n,
                Err(_) => return ReadEnd::Idle,
            };
            let Some(data) = buf.get_mut(..n) else {
                return ReadEnd::Gone;
            };
            unmask(data, mask, offset);
            if pipe.write_all(data).await.is_err() {
                // The driver has finished.
                return ReadEnd::Gone;
            }
            offset = offset.wrapping_add(n);
            left -= n as u64;
        }
    }
}

fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(offset.wrapping_add(i)) % 4];
    }
}

/// One unmasked server frame.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    // Control payloads are at most 125 bytes.
    payload.extend(reason.bytes().take(123));
    frame(op::CLOSE, &payload)
}

async fn send<W: AsyncWrite + Unpin>(sock: &mut W, bytes: &[u8]) -> bool {
    let write = async {
        sock.write_all(bytes).await?;
        sock.flush().await
    };
    matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(())))
}

/// Send what the driver writes as binary messages, pongs and keep-alive
/// pings, and the close frame at the end.
async fn write_frames<W, R>(
    sock: &mut W,
    pipe: &mut R,
    mut ctl: mpsc::Receiver<Ctl>,
    end: oneshot::Receiver<(u16, &'static str)>,
) where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; MAX_OUT_MESSAGE];
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    loop {
        tokio::select! {
            biased;
            c = ctl.recv() => match c {
                Some(Ctl::Pong(payload)) => {
                    if !send(sock, &frame(op::PONG, &payload)).await {
                        return;
                    }
                }
                Some(Ctl::Close(code, reason)) => {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, send(sock, &close_frame(code, reason))).await;
                    return;
                }
                None => return,
            },
            read = pipe.read(&mut buf) => match read {
                Ok(n) if n > 0 => {
                    if !send(sock, &frame(op::BINARY, buf.get(..n).unwrap_or_default())).await {
                        return;
                    }
                }
                _ => {
                    // The driver finished (its last frames are sent): close
                    // with its reason.
                    let (code, reason) = tokio::time::timeout(CLOSE_TIMEOUT, end)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or((close_code::NORMAL, "bye"));
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, send(sock, &close_frame(code, reason))).await;
                    return;
                }
            },
            _ = ping.tick() => {
                if !send(sock, &frame(op::PING, b"")).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn request(extra: &str) -> String {
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}"
        )
        .trim_end()
        .to_string()
    }

    #[test]
    fn upgrade_requests_are_checked() {
        let ok = upgrade_response(&request("")).unwrap();
        assert!(ok.starts_with("HTTP/1.1 101 "));
        assert!(ok.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        let other_path = request("").replace("/ws", "/chat");
        assert!(
            upgrade_response(&other_path)
                .unwrap_err()
                .starts_with("HTTP/1.1 404")
        );
        let no_upgrade = request("").replace("Upgrade: websocket\r\n", "");
        assert!(
            upgrade_response(&no_upgrade)
                .unwrap_err()
                .starts_with("HTTP/1.1 426")
        );
        let old = request("").replace("Version: 13", "Version: 8");
        assert!(
            upgrade_response(&old)
                .unwrap_err()
                .starts_with("HTTP/1.1 426")
        );
        let bad_key = request("").replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
        assert!(
            upgrade_response(&bad_key)
                .unwrap_err()
                .starts_with("HTTP/1.1 400")
        );
        let post = request("").replace("GET", "POST");
        assert!(
            upgrade_response(&post)
                .unwrap_err()
                .starts_with("HTTP/1.1 400")
        );
        assert!(is_ws_request("GET /ws?x=1 HTTP/1.1"));
        assert!(!is_ws_request("GET /wsx HTTP/1.1"));
    }

    #[test]
    fn frames_encode_lengths() {
        assert_eq!(frame(op::BINARY, &[1, 2]), vec![0x82, 2, 1, 2]);
        let mid = frame(op::BINARY, &[0; 300]);
        assert_eq!(&mid[..4], &[0x82, 126, 1, 44]);
        let big = frame(op::BINARY, &[0; 70_000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 70_000 + 10);
        let close = close_frame(4001, "replaced");
        assert_eq!(&close[..4], &[0x88, 10, 0x0F, 0xA1]);
    }

    #[test]
    fn driver_ends_map_to_close_codes() {
        assert_eq!(ws_close_for(&DriverEnd::PeerClosed).0, 1000);
        assert_eq!(ws_close_for(&DriverEnd::Replaced).0, 4001);
        assert_eq!(ws_close_for(&DriverEnd::ShuttingDown).0, 4002);
        assert_eq!(ws_close_for(&DriverEnd::AuthTimeout).0, 4004);
        assert_eq!(ws_close_for(&DriverEnd::Transport("x".into())).0, 1000);
    }
}
