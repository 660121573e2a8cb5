//! The native transports: one QUIC connection to the relay with ALPN
//! `hush/1` and one bidirectional stream, or a WebSocket over TLS on TCP
//! (`wss://HOST:PORT/ws`, the same port number) — length-prefixed frames both
//! ways either way (over the WebSocket, the concatenated payloads of the
//! binary messages are that same byte stream).
//!
//! `--transport` ([`Transport`]) picks: `quic`, `ws`, or `auto` (the
//! default): QUIC first; the WebSocket starts too if QUIC has not connected
//! within [`WS_HEAD_START`] or as soon as it fails; the first to connect is
//! used and the other attempt is dropped. A certificate problem on either
//! ends the attempt at once (the other transport presents the same
//! certificate).
//!
//! Certificates are checked in one of two ways:
//!
//! - **pinned** (`--cert-hash HEX`): exactly the certificate whose DER hashes
//!   to that SHA-256 is accepted — what a relay with a self-signed
//!   development certificate needs. The handshake signature is still
//!   verified with the certificate's key, so holding a copy of the
//!   certificate is not enough to impersonate the relay. A different
//!   certificate is reported with both hashes, so the user can tell a
//!   renewed certificate from an impostor.
//! - **system roots**: ordinary WebPKI verification against the operating
//!   system's trust store, for relays with a CA-issued certificate.
//!
//! Frames are read by a separate task that decodes them and hands them over
//! a bounded channel: decoding overlaps with the engine's work, and when
//! the engine falls behind the channel fills, the task stops reading and
//! QUIC flow control slows the relay down.

use crate::error::CliError;
use futures_util::{SinkExt as _, StreamExt as _};
use hush_protocol::limits::MAX_UDP_PAYLOAD;
use hush_protocol::{ALPN_HUSH, FrameBuffer, ServerFrame};
use rustls::DigitallySignedStruct;
use rustls::SignatureScheme;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// A quiet connection is given up after this long (the relay's own idle
/// timeout is the same, and the shorter of the two applies).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// QUIC keep-alive interval: a PING after this long without sending keeps a
/// healthy idle `listen` connection open and the NAT binding in front of
/// this client fresh. 15 s stays under the 30 s UDP binding timeout common
/// in home and carrier NATs, with room for a lost ping to be retransmitted,
/// while costing an idle relay a quarter of what a ping every 3.3 s did.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A write that makes no progress for this long means the connection is dead.
const WRITE_BOUND: Duration = Duration::from_secs(10);
/// Frames buffered between the reader task and the engine.
const FRAME_QUEUE: usize = 64;
/// Bytes asked of the stream per read.
const READ_CHUNK: usize = 256 * 1024;
/// In `auto` mode, how long QUIC has to connect before the WebSocket
/// attempt starts alongside it.
pub const WS_HEAD_START: Duration = Duration::from_millis(300);
/// A WebSocket from which nothing (not even the relay's pings, every 10 s)
/// arrives for this long is dead.
const WS_IDLE_TIMEOUT: Duration = Duration::from_secs(25);
/// The relay's WebSocket path.
pub const WS_PATH: &str = "/ws";

/// Which transport to reach the relay over (`--transport`, `HUSH_TRANSPORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// QUIC only.
    Quic,
    /// The TLS WebSocket only.
    Ws,
    /// QUIC first, the WebSocket after [`WS_HEAD_START`] or when QUIC fails.
    #[default]
    Auto,
}

impl Transport {
    /// Parse `quic`, `ws` (or `websocket`) or `auto`.
    pub fn parse(text: &str) -> Result<Transport, CliError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "quic" => Ok(Transport::Quic),
            "ws" | "websocket" => Ok(Transport::Ws),
            "auto" => Ok(Transport::Auto),
            other => Err(CliError::Invalid {
                what: "transport",
                reason: format!("{other:?} (expected quic, ws or auto)"),
            }),
        }
    }

    /// The name [`Transport::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Ws => "ws",
            Transport::Auto => "auto",
        }
    }

    /// The process-wide choice (set once by the `hush` binary from
    /// `--transport`; `auto` when never set).
    pub fn configured() -> Transport {
        CONFIGURED.get().copied().unwrap_or_default()
    }

    /// Set the process-wide choice; only the first call counts.
    pub fn configure(t: Transport) {
        let _ = CONFIGURED.set(t);
    }
}

static CONFIGURED: OnceLock<Transport> = OnceLock::new();

/// The transport a connection actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// QUIC (`hush/1`).
    Quic,
    /// WebSocket over TLS.
    WebSocket,
}

impl Link {
    /// `quic` or `websocket`.
    pub fn name(self) -> &'static str {
        match self {
            Link::Quic => "quic",
            Link::WebSocket => "websocket",
        }
    }
}

/// How the relay's certificate is checked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CertCheck {
    /// Accept exactly the certificate with this DER SHA-256.
    Pinned([u8; 32]),
    /// Verify against the operating system's trust roots.
    SystemRoots,
}

impl std::fmt::Debug for CertCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertCheck::Pinned(h) => write!(f, "Pinned({})", hex::encode(h)),
            CertCheck::SystemRoots => f.write_str("SystemRoots"),
        }
    }
}

impl CertCheck {
    /// Parse `--cert-hash`: 64 hex digits, optionally with `:` separators.
    pub fn parse_hash(text: &str) -> Result<[u8; 32], CliError> {
        let clean: String = text.trim().chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&clean, &mut out).map_err(|e| CliError::Invalid {
            what: "certificate hash",
            reason: format!("{e} (expected 64 hex digits, the SHA-256 of the relay's certificate)"),
        })?;
        Ok(out)
    }
}

/// Where the relay is and how to trust it.
#[derive(Debug, Clone)]
pub struct RelayTarget {
    /// `HOST:PORT`.
    pub addr: String,
    /// Certificate check.
    pub cert: CertCheck,
    /// Which transport to use.
    pub transport: Transport,
}

/// Split `HOST:PORT` (IPv6 hosts in brackets) into the TLS server name and
/// the address to resolve.
fn server_name(addr: &str) -> Result<String, CliError> {
    let invalid = |reason: &str| CliError::Invalid {
        what: "relay address",
        reason: format!("{addr:?}: {reason} (expected HOST:PORT)"),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
    port.parse::<u16>().map_err(|_| invalid("bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    Ok(host.to_string())
}

/// Check a relay address without connecting.
pub fn validate_addr(addr: &str) -> Result<(), CliError> {
    server_name(addr).map(|_| ())
}

/// Accepts exactly one certificate (by DER SHA-256) and remembers what a
/// mismatching relay presented. Handshake signatures are still verified.
#[derive(Debug)]
pub struct PinnedVerifier {
    expected: [u8; 32],
    presented: Arc<Mutex<Option<[u8; 32]>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    /// A verifier pinned to the certificate whose DER has SHA-256 `expected`,
    /// checking handshake signatures with the algorithms of `provider`.
    pub fn new(expected: [u8; 32], provider: &CryptoProvider) -> Self {
        Self::reporting(expected, provider, Arc::default())
    }

    /// Like [`PinnedVerifier::new`], writing the hash a mismatching relay
    /// presented into `presented` (for the error message).
    pub fn reporting(
        expected: [u8; 32],
        provider: &CryptoProvider,
        presented: Arc<Mutex<Option<[u8; 32]>>>,
    ) -> Self {
        PinnedVerifier {
            expected,
            presented,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut got = [0u8; 32];
        got.copy_from_slice(Sha256::digest(end_entity.as_ref()).as_slice());
        if got == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        if let Ok(mut slot) = self.presented.lock() {
            *slot = Some(got);
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn system_roots() -> Result<rustls::RootCertStore, CliError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(CliError::Transport(
            "no trust roots found in the system store; pass --cert-hash to pin the relay's certificate"
                .into(),
        ));
    }
    Ok(roots)
}

/// The TLS client settings for `cert` (no ALPN yet).
fn tls_config(
    cert: CertCheck,
    presented: Arc<Mutex<Option<[u8; 32]>>>,
) -> Result<rustls::ClientConfig, CliError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CliError::Transport(format!("TLS: {e}")))?;
    let tls = match cert {
        CertCheck::Pinned(expected) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier::reporting(
                expected, &provider, presented,
            )))
            .with_no_client_auth(),
        CertCheck::SystemRoots => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
    };
    Ok(tls)
}

fn client_config(
    cert: CertCheck,
    presented: Arc<Mutex<Option<[u8; 32]>>>,
) -> Result<quinn::ClientConfig, CliError> {
    let mut tls = tls_config(cert, presented)?;
    tls.alpn_protocols = vec![ALPN_HUSH.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| CliError::Transport(format!("QUIC TLS: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
        .map_err(|e| CliError::Transport(format!("idle timeout: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A client endpoint on `local` that receives datagrams up to
/// [`MAX_UDP_PAYLOAD`], as the relay does.
fn endpoint(local: SocketAddr) -> Result<quinn::Endpoint, CliError> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| CliError::Transport(format!("largest UDP payload: {e}")))?;
    let socket = std::net::UdpSocket::bind(local)
        .map_err(|e| CliError::Transport(format!("UDP socket: {e}")))?;
    quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime))
        .map_err(|e| CliError::Transport(format!("UDP socket: {e}")))
}

/// What the reader task hands the driver.
#[derive(Debug)]
pub enum Incoming {
    /// A decoded frame from the relay (boxed: frames are large, closes small).
    Frame(Box<ServerFrame>),
    /// The stream ended or failed (the reason, for diagnostics).
    Closed(String),
}

/// Any byte stream a WebSocket runs on (TLS over TCP, or plain TCP).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A client WebSocket to the relay.
pub type WsStream = WebSocketStream<Box<dyn Io>>;
type WsSink = futures_util::stream::SplitSink<WsStream, Message>;

/// The sending side of a connection.
enum Sender {
    Quic {
        endpoint: quinn::Endpoint,
        connection: quinn::Connection,
        send: quinn::SendStream,
    },
    Ws(WsSink),
}

/// One open connection to the relay.
pub struct Conn {
    sender: Sender,
    frames: mpsc::Receiver<Incoming>,
    reader: JoinHandle<()>,
    /// Bytes read from the stream so far (frames as the relay encoded them).
    received: Arc<AtomicU64>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("link", &self.link())
            .finish_non_exhaustive()
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| "name resolves to no address".to_string())
}

/// Open a connection within `bound` over the target's [`Transport`].
///
/// A certificate problem is its own error (retrying cannot fix it); every
/// other failure is [`CliError::Unreachable`].
pub async fn connect(target: &RelayTarget, bound: Duration) -> Result<Conn, CliError> {
    match target.transport {
        Transport::Quic => connect_quic(target, bound).await,
        Transport::Ws => connect_ws(target, bound).await,
        Transport::Auto => connect_auto(target, bound).await,
    }
}

/// Whether an error ends every attempt (the other transport cannot fix it).
fn is_fatal(e: &CliError) -> bool {
    !matches!(e, CliError::Unreachable { .. })
}

/// QUIC first; the WebSocket after [`WS_HEAD_START`] or once QUIC failed;
/// the first connection wins.
async fn connect_auto(target: &RelayTarget, bound: Duration) -> Result<Conn, CliError> {
    let deadline = tokio::time::Instant::now() + bound;
    let quic = connect_quic(target, bound);
    tokio::pin!(quic);
    let head_start = tokio::time::sleep(WS_HEAD_START.min(bound));
    tokio::pin!(head_start);
    let quic_error = tokio::select! {
        r = &mut quic => match r {
            Ok(conn) => return Ok(conn),
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => Some(e),
        },
        () = &mut head_start => None,
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let ws = connect_ws(target, left);
    tokio::pin!(ws);
    if let Some(quic_error) = quic_error {
        return ws.await.map_err(|e| {
            if is_fatal(&e) {
                e
            } else {
                both_failed(target, &quic_error, &e)
            }
        });
    }
    tokio::select! {
        r = &mut quic => match r {
            Ok(conn) => Ok(conn),
            Err(e) if is_fatal(&e) => Err(e),
            Err(quic_error) => ws.await.map_err(|e| if is_fatal(&e) { e } else { both_failed(target, &quic_error, &e) }),
        },
        r = &mut ws => match r {
            Ok(conn) => Ok(conn),
            Err(e) if is_fatal(&e) => Err(e),
            Err(ws_error) => quic.await.map_err(|e| if is_fatal(&e) { e } else { both_failed(target, &e, &ws_error) }),
        },
    }
}

fn both_failed(target: &RelayTarget, quic: &CliError, ws: &CliError) -> CliError {
    let reason = |e: &CliError| match e {
        CliError::Unreachable { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    CliError::Unreachable {
        addr: target.addr.clone(),
        reason: format!("QUIC: {}; WebSocket: {}", reason(quic), reason(ws)),
    }
}

/// Open a WebSocket to `wss://ADDR/ws` (TLS checked as `cert` says) within
/// `bound`. Test harnesses use it too.
pub async fn open_websocket(
    addr: &str,
    cert: CertCheck,
    bound: Duration,
) -> Result<WsStream, CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let host = server_name(addr)?;
    let presented = Arc::new(Mutex::new(None));
    let mut tls = tls_config(cert, presented.clone())?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.clone())
        .map_err(|e| unreachable(format!("bad server name: {e}")))?;
    let url = format!("wss://{addr}{WS_PATH}");
    let attempt = async {
        let remote = resolve(addr).await.map_err(unreachable)?;
        let tcp = tokio::net::TcpStream::connect(remote)
            .await
            .map_err(|e| unreachable(format!("TCP: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let stream = match connector.connect(name, tcp).await {
            Ok(s) => s,
            Err(e) => {
                let pinned = presented.lock().ok().and_then(|g| *g);
                return Err(match (pinned, cert) {
                    (Some(got), CertCheck::Pinned(expected)) => CliError::CertMismatch {
                        presented: hex::encode(got),
                        expected: hex::encode(expected),
                    },
                    (None, CertCheck::SystemRoots)
                        if e.to_string().to_ascii_lowercase().contains("certificate") =>
                    {
                        CliError::CertUntrusted {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        }
                    }
                    _ => unreachable(format!("TLS: {e}")),
                });
            }
        };
        let boxed: Box<dyn Io> = Box::new(stream);
        let (ws, _response) = tokio_tungstenite::client_async(url.as_str(), boxed)
            .await
            .map_err(|e| unreachable(format!("WebSocket upgrade: {e}")))?;
        Ok(ws)
    };
    match tokio::time::timeout(bound, attempt).await {
        Ok(r) => r,
        Err(_) => Err(unreachable("no answer to the WebSocket handshake".into())),
    }
}

/// Connect over the TLS WebSocket.
async fn connect_ws(target: &RelayTarget, bound: Duration) -> Result<Conn, CliError> {
    let ws = open_websocket(&target.addr, target.cert, bound).await?;
    let (sink, stream) = ws.split();
    let (tx, frames) = mpsc::channel(FRAME_QUEUE);
    let received = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(read_ws_frames(stream, tx, received.clone()));
    Ok(Conn {
        sender: Sender::Ws(sink),
        frames,
        reader,
        received,
    })
}

/// Read binary messages, decode the frames their concatenation carries,
/// until the WebSocket ends; report why it ended.
async fn read_ws_frames(
    mut stream: futures_util::stream::SplitStream<WsStream>,
    tx: mpsc::Sender<Incoming>,
    received: Arc<AtomicU64>,
) {
    let mut buffer = FrameBuffer::new();
    let reason = loop {
        let next = match tokio::time::timeout(WS_IDLE_TIMEOUT, stream.next()).await {
            Ok(next) => next,
            Err(_) => break "connection lost: the relay went silent".to_string(),
        };
        match next {
            Some(Ok(Message::Binary(bytes))) => {
                received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                buffer.extend(&bytes);
                loop {
                    match buffer.next_server_frame() {
                        Ok(Some(frame)) => {
                            if tx.send(Incoming::Frame(Box::new(frame))).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx
                                .send(Incoming::Closed(format!(
                                    "undecodable frame from the relay: {e}"
                                )))
                                .await;
                            return;
                        }
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                break match frame {
                    Some(f) => format!(
                        "the relay closed the WebSocket ({} {})",
                        u16::from(f.code),
                        f.reason
                    ),
                    None => "the relay closed the WebSocket".to_string(),
                };
            }
            Some(Ok(Message::Text(_))) => break "the relay sent a text message".to_string(),
            // Pings are answered by the WebSocket layer.
            Some(Ok(_)) => {}
            Some(Err(e)) => break format!("connection lost: {e}"),
            None => break "the relay closed the connection".to_string(),
        }
    };
    let _ = tx.send(Incoming::Closed(reason)).await;
}

/// Connect over QUIC.
async fn connect_quic(target: &RelayTarget, bound: Duration) -> Result<Conn, CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        addr: target.addr.clone(),
        reason,
    };
    let host = server_name(&target.addr)?;
    let presented = Arc::new(Mutex::new(None));
    let config = client_config(target.cert, presented.clone())?;
    let attempt = async {
        let remote = resolve(&target.addr).await.map_err(unreachable)?;
        let local: SocketAddr = if remote.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = endpoint(local)?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint
            .connect(remote, &host)
            .map_err(|e| unreachable(e.to_string()))?;
        let connection = match connecting.await {
            Ok(c) => c,
            Err(e) => {
                let pinned = presented.lock().ok().and_then(|g| *g);
                return Err(match (pinned, target.cert) {
                    (Some(got), CertCheck::Pinned(expected)) => CliError::CertMismatch {
                        presented: hex::encode(got),
                        expected: hex::encode(expected),
                    },
                    (None, CertCheck::SystemRoots) if is_cert_error(&e) => {
                        CliError::CertUntrusted {
                            addr: target.addr.clone(),
                            reason: e.to_string(),
                        }
                    }
                    _ => unreachable(e.to_string()),
                });
            }
        };
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| unreachable(format!("opening a stream: {e}")))?;
        Ok((endpoint, connection, send, recv))
    };
    let (endpoint, connection, send, recv) = match tokio::time::timeout(bound, attempt).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(unreachable("no answer to the QUIC handshake".into()));
        }
    };
    let (tx, frames) = mpsc::channel(FRAME_QUEUE);
    let received = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(read_frames(recv, tx, received.clone()));
    Ok(Conn {
        sender: Sender::Quic {
            endpoint,
            connection,
            send,
        },
        frames,
        reader,
        received,
    })
}

fn is_cert_error(e: &quinn::ConnectionError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("certificate")
        || text.contains("unknownissuer")
        || text.contains("unknown issuer")
}

/// Read and decode frames until the stream ends; report why it ended.
async fn read_frames(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Incoming>,
    received: Arc<AtomicU64>,
) {
    let mut buffer = FrameBuffer::new();
    let reason = loop {
        // quinn's own buffers, in order: copied once, into the frame buffer.
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                received.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                buffer.extend(&chunk.bytes);
                loop {
                    match buffer.next_server_frame() {
                        Ok(Some(frame)) => {
                            if tx.send(Incoming::Frame(Box::new(frame))).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx
                                .send(Incoming::Closed(format!(
                                    "undecodable frame from the relay: {e}"
                                )))
                                .await;
                            return;
                        }
                    }
                }
            }
            Ok(None) => break "the relay closed the stream".to_string(),
            Err(e) => break format!("connection lost: {e}"),
        }
    };
    let _ = tx.send(Incoming::Closed(reason)).await;
}

impl Conn {
    /// The transport this connection runs on.
    pub fn link(&self) -> Link {
        match self.sender {
            Sender::Quic { .. } => Link::Quic,
            Sender::Ws(_) => Link::WebSocket,
        }
    }

    /// Write bytes (whole frames) to the stream (one binary message on a
    /// WebSocket).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let written = match &mut self.sender {
            Sender::Quic { send, .. } => tokio::time::timeout(WRITE_BOUND, send.write_all(bytes))
                .await
                .map(|r| r.map_err(|e| e.to_string())),
            Sender::Ws(sink) => tokio::time::timeout(
                WRITE_BOUND,
                sink.send(Message::Binary(bytes.to_vec().into())),
            )
            .await
            .map(|r| r.map_err(|e| e.to_string())),
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err("write stalled".into()),
        }
    }

    /// The next frame (or the end of the stream). Cancel-safe.
    pub async fn next(&mut self) -> Incoming {
        self.frames
            .recv()
            .await
            .unwrap_or_else(|| Incoming::Closed("reader stopped".into()))
    }

    /// Bytes of frames read from the relay on this connection so far.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// A frame that is already waiting, if any.
    pub fn try_next(&mut self) -> Option<Incoming> {
        self.frames.try_recv().ok()
    }

    /// Close the connection and give the close a moment to reach the relay.
    pub async fn close(mut self) {
        self.reader.abort();
        match &mut self.sender {
            Sender::Quic {
                endpoint,
                connection,
                send,
            } => {
                let _ = send.finish();
                connection.close(0u32.into(), b"bye");
                let _ =
                    tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
            }
            Sender::Ws(sink) => {
                let _ = tokio::time::timeout(Duration::from_millis(300), sink.close()).await;
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_parse_with_or_without_colons() {
        let h = "ab".repeat(32);
        assert_eq!(CertCheck::parse_hash(&h).unwrap(), [0xab; 32]);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(CertCheck::parse_hash(&colons).unwrap(), [0xab; 32]);
        assert!(CertCheck::parse_hash("abcd").is_err());
        assert!(CertCheck::parse_hash(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn addresses_need_host_and_port() {
        assert_eq!(server_name("127.0.0.1:4433").unwrap(), "127.0.0.1");
        assert_eq!(server_name("relay.example:443").unwrap(), "relay.example");
        assert_eq!(server_name("[::1]:4433").unwrap(), "::1");
        assert!(server_name("127.0.0.1").is_err());
        assert!(server_name(":4433").is_err());
        assert!(server_name("host:99999").is_err());
    }
}
