//! Shared harness of the relay's own integration tests: a tiny client over
//! native QUIC (`hush/1`) or WebTransport (`h3`, as a browser connects),
//! device keys, a raw HTTP GET, and one bounded wait for everything.
#![allow(dead_code)]
// Test harness: a failed expectation is a failed test, by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::{Signer, SigningKey};
use hush_protocol::{
    ClientFrame, ConversationId, DeviceId, DeviceRegistration, Envelope, EnvelopeHeader,
    FrameBuffer, MessageId, Request, Response, ServerFrame, UserKey, auth_challenge_bytes,
    encode_client_frame,
};
use rustls::pki_types::CertificateDer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The one bound on every wait in these tests.
pub const STEP: Duration = Duration::from_secs(10);

/// Await `fut`, failing the test if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A QUIC client endpoint trusting exactly `cert_der`, offering `alpn`.
pub fn client_endpoint(cert_der: &[u8], alpn: &[u8]) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert_der.to_vec()))
        .expect("relay certificate is a valid trust anchor");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// The connection under a [`Client`]'s stream (kept alive with it).
pub enum Transport {
    /// Raw QUIC, ALPN `hush/1`.
    Native {
        endpoint: quinn::Endpoint,
        conn: quinn::Connection,
    },
    /// A WebTransport session, ALPN `h3`.
    WebTransport {
        endpoint: wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
        conn: wtransport::Connection,
    },
}

/// One connection with its one bidirectional stream.
pub struct Client {
    pub transport: Transport,
    send: Box<dyn AsyncWrite + Unpin + Send>,
    recv: Box<dyn AsyncRead + Unpin + Send>,
    frames: FrameBuffer,
    next_id: u32,
}

/// A WebTransport client endpoint that accepts exactly the certificate
/// whose SHA-256 is `cert_sha256_hex`, as a browser's `serverCertificateHashes`.
pub fn webtransport_endpoint(
    cert_sha256_hex: &str,
) -> wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client> {
    let hash: [u8; 32] = hex::decode(cert_sha256_hex).unwrap().try_into().unwrap();
    let config = wtransport::ClientConfig::builder()
        .with_bind_address("127.0.0.1:0".parse().unwrap())
        .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(hash)])
        .build();
    wtransport::Endpoint::client(config).unwrap()
}

impl Client {
    /// A native `hush/1` connection.
    pub async fn connect(addr: SocketAddr, cert_der: &[u8]) -> Client {
        let endpoint = client_endpoint(cert_der, hush_protocol::ALPN_HUSH);
        let conn = within("QUIC connect", endpoint.connect(addr, "localhost").unwrap())
            .await
            .expect("connected");
        let (send, recv) = within("open stream", conn.open_bi()).await.unwrap();
        Client {
            transport: Transport::Native { endpoint, conn },
            send: Box::new(send),
            recv: Box::new(recv),
            frames: FrameBuffer::new(),
            next_id: 1,
        }
    }

    /// A WebTransport session to `https://ADDR/` (as a browser opens it)
    /// with one bidirectional stream.
    pub async fn connect_webtransport(addr: SocketAddr, cert_sha256_hex: &str) -> Client {
        let endpoint = webtransport_endpoint(cert_sha256_hex);
        let conn = within(
            "WebTransport session",
            endpoint.connect(format!("https://{addr}/")),
        )
        .await
        .expect("session accepted");
        let (send, recv) = within("open stream", async {
            conn.open_bi().await.unwrap().await.unwrap()
        })
        .await;
        Client {
            transport: Transport::WebTransport { endpoint, conn },
            send: Box::new(send),
            recv: Box::new(recv),
            frames: FrameBuffer::new(),
            next_id: 1,
        }
    }

    pub async fn write_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
        self.send.flush().await.unwrap();
    }

    /// End this side of the stream (the peer reads end-of-stream).
    pub async fn finish(&mut self) {
        self.send.shutdown().await.unwrap();
    }

    pub async fn send_request(&mut self, request: Request) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = encode_client_frame(&ClientFrame {
            request_id: id,
            request,
        })
        .unwrap();
        self.write_raw(&bytes).await;
        id
    }

    /// The next frame from the relay, or `None` once the stream ended.
    pub async fn next_frame(&mut self) -> Option<ServerFrame> {
        within("a frame from the relay", async {
            loop {
                if let Some(f) = self.frames.next_server_frame().unwrap() {
                    return Some(f);
                }
                let mut buf = [0u8; 8192];
                match self.recv.read(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.frames.extend(&buf[..n]),
                }
            }
        })
        .await
    }

    /// Send a request and return its reply (pushes before it are skipped).
    pub async fn request(&mut self, request: Request) -> ServerFrame {
        let id = self.send_request(request).await;
        loop {
            match self.next_frame().await.expect("a reply") {
                f @ (ServerFrame::Response { request_id, .. }
                | ServerFrame::Error { request_id, .. })
                    if request_id == id =>
                {
                    return f;
                }
                _ => continue,
            }
        }
    }

    pub async fn challenge(&mut self, device: DeviceId) -> [u8; 32] {
        match self.request(Request::Hello { device }).await {
            ServerFrame::Response {
                response: Response::Challenge { challenge },
                ..
            } => challenge,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }
}

/// A device with its user identity.
pub struct Device {
    pub id: DeviceId,
    pub user: SigningKey,
    pub key: SigningKey,
}

impl Device {
    pub fn new(n: u8) -> Device {
        Device {
            id: DeviceId([n; 16]),
            user: SigningKey::from_bytes(&[n.wrapping_add(1); 32]),
            key: SigningKey::from_bytes(&[n.wrapping_add(2); 32]),
        }
    }

    pub fn registration(&self) -> DeviceRegistration {
        let mut r = DeviceRegistration {
            device: self.id,
            user: UserKey(self.user.verifying_key().to_bytes()),
            signing_key: self.key.verifying_key().to_bytes(),
            agreement_key: [9; 32],
            user_signature: [0; 64],
        };
        r.user_signature = self.user.sign(&r.certificate_bytes()).to_bytes();
        r
    }

    pub fn sign(&self, challenge: &[u8; 32]) -> [u8; 64] {
        self.key
            .sign(&auth_challenge_bytes(challenge, &self.id))
            .to_bytes()
    }

    /// Register on `client` (which becomes authenticated as this device).
    pub async fn register(&self, client: &mut Client) {
        let c = client.challenge(self.id).await;
        let reply = client
            .request(Request::Register {
                registration: self.registration(),
                signature: self.sign(&c),
            })
            .await;
        assert!(
            matches!(
                reply,
                ServerFrame::Response {
                    response: Response::Authenticated(_),
                    ..
                }
            ),
            "{reply:?}"
        );
    }

    /// Authenticate an already registered device on `client`.
    pub async fn auth(&self, client: &mut Client) -> ServerFrame {
        let c = client.challenge(self.id).await;
        client
            .request(Request::Auth {
                signature: self.sign(&c),
            })
            .await
    }

    pub fn envelope_to(&self, to: &Device, seq: u64) -> Envelope {
        Envelope {
            header: EnvelopeHeader {
                message_id: MessageId::new(1_800_000_000_000 + seq, [seq as u8; 10]),
                sender_device: self.id,
                recipient_device: to.id,
                conversation_id: ConversationId([3; 16]),
                sender_seq: seq,
                sent_at_ms: 1_800_000_000_000,
                ratchet: vec![1; 40],
                session_init: None,
                important: false,
            },
            ciphertext: vec![0xCD; 64],
        }
    }
}

/// `GET path` over plain HTTP/1.1; returns (status code, headers, body).
pub async fn http_get(addr: SocketAddr, request_line: &str) -> (u16, String, String) {
    within("HTTP response", async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{request_line}\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        // Binary bodies (wasm) are compared by length and type only.
        let out = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = out.split_once("\r\n\r\n").expect("a complete response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status code");
        (status, head.to_string(), body.to_string())
    })
    .await
}

/// Poll `check` until it returns `Some`, every 20 ms, for at most [`STEP`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
