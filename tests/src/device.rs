//! A test device: one QUIC connection to the relay speaking `hush/1`.
//!
//! The protocol runs over a single bidirectional stream: the device writes
//! length-prefixed [`ClientFrame`]s and reads [`ServerFrame`]s, each reply
//! echoing its request id. Pushes may arrive between replies; [`TestDevice`]
//! queues them so request helpers and [`TestDevice::next_push`] never lose one.
//! Every wait is bounded by [`ConnectOptions`].

use crate::identity::DeviceIdentity;
use crate::tls::client_config;
use crate::wait::within;
use crate::{HarnessError, Result};
use hush_protocol::{
    ALPN_HUSH, AuthOk, ClientFrame, Delivered, DeviceId, DeviceRegistration, Envelope, ErrorCode,
    FrameBuffer, OneTimePrekey, Page, PrekeyBundle, Request, Response, SendOutcome, ServerFrame,
    SignedDeviceList, SignedPrekey, UserKey, auth_challenge_bytes, encode_client_frame,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

/// Where a relay listens and which certificate it must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayTarget {
    /// The QUIC address.
    pub addr: SocketAddr,
    /// SHA-256 of the relay certificate's DER encoding.
    pub cert_sha256: [u8; 32],
}

impl RelayTarget {
    /// The target for a relay at `addr` serving the certificate `cert_der`
    /// (e.g. an in-process `RelayHandle`'s `quic_addr()` and `cert_der()`).
    pub fn from_cert_der(addr: SocketAddr, cert_der: &[u8]) -> Self {
        RelayTarget {
            addr,
            cert_sha256: crate::tls::cert_sha256(cert_der),
        }
    }
}

/// Timeouts and protocol choice of a test connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Bound on the QUIC handshake.
    pub connect_timeout: Duration,
    /// Bound on waiting for any one reply.
    pub request_timeout: Duration,
    /// QUIC idle timeout: how long a silent (e.g. killed) relay takes to be
    /// noticed when no reply is awaited.
    pub idle_timeout: Duration,
    /// ALPN to offer.
    pub alpn: Vec<u8>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(10),
            alpn: ALPN_HUSH.to_vec(),
        }
    }
}

/// The sending half of a device's stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
    next_request_id: u32,
}

impl FrameWriter {
    /// Encode and write a request; returns its request id.
    pub async fn write_request(&mut self, request: Request) -> Result<u32> {
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        let id = self.next_request_id;
        let bytes = encode_client_frame(&ClientFrame {
            request_id: id,
            request,
        })?;
        self.write_raw(&bytes).await?;
        Ok(id)
    }

    /// Write arbitrary bytes on the stream (for malformed-frame tests).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|e| HarnessError::Connection(format!("write: {}", with_causes(&e))))
    }
}

/// The receiving half of a device's stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: FrameBuffer,
}

/// Most bytes taken from quinn in one read.
const READ_CHUNK: usize = 256 * 1024;

impl FrameReader {
    /// The next frame from the relay (unbounded: wrap it in
    /// [`crate::within`]).
    pub async fn next_frame(&mut self) -> Result<ServerFrame> {
        loop {
            if let Some(frame) = self.buf.next_server_frame()? {
                return Ok(frame);
            }
            // quinn's own buffers, in order: copied once, into the frame buffer.
            match self.recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => self.buf.extend(&chunk.bytes),
                Ok(None) => {
                    return Err(HarnessError::Connection("relay finished the stream".into()));
                }
                Err(e) => {
                    return Err(HarnessError::Connection(format!(
                        "read: {}",
                        with_causes(&e)
                    )));
                }
            }
        }
    }
}

/// An error and its sources ("connection lost: timed out"): quinn's stream
/// errors name the connection's fate only in their source.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A device connected to a relay over QUIC.
pub struct TestDevice {
    identity: DeviceIdentity,
    options: ConnectOptions,
    /// Kept so the client socket lives as long as the connection.
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    writer: FrameWriter,
    reader: FrameReader,
    pushes: VecDeque<Vec<Delivered>>,
    /// `PrekeysLow` notices received while waiting for something else.
    prekeys_low: VecDeque<u32>,
    auth: Option<AuthOk>,
}

impl std::fmt::Debug for TestDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDevice")
            .field("device", &self.identity.device())
            .field("remote", &self.connection.remote_address())
            .finish_non_exhaustive()
    }
}

impl TestDevice {
    /// Connect (not yet authenticated) with default options.
    pub async fn connect(identity: &DeviceIdentity, target: RelayTarget) -> Result<TestDevice> {
        Self::connect_with(identity, target, ConnectOptions::default()).await
    }

    /// Connect and register the device (`Hello` + `Register`).
    pub async fn register_new(
        identity: &DeviceIdentity,
        target: RelayTarget,
    ) -> Result<TestDevice> {
        let mut d = Self::connect(identity, target).await?;
        d.register().await?;
        Ok(d)
    }

    /// Connect and authenticate an already registered device (`Hello` + `Auth`).
    pub async fn login(identity: &DeviceIdentity, target: RelayTarget) -> Result<TestDevice> {
        let mut d = Self::connect(identity, target).await?;
        d.auth().await?;
        Ok(d)
    }

    /// Connect with explicit options.
    pub async fn connect_with(
        identity: &DeviceIdentity,
        target: RelayTarget,
        options: ConnectOptions,
    ) -> Result<TestDevice> {
        let config = client_config(target.cert_sha256, &options.alpn, options.idle_timeout)?;
        let bind: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut endpoint = crate::tls::client_endpoint(bind)?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint
            .connect(target.addr, "localhost")
            .map_err(|e| HarnessError::Connect(e.to_string()))?;
        let connection = within(options.connect_timeout, "QUIC handshake", connecting)
            .await?
            .map_err(|e| HarnessError::Connect(e.to_string()))?;
        let (send, recv) = within(options.connect_timeout, "open stream", connection.open_bi())
            .await?
            .map_err(|e| HarnessError::Connect(e.to_string()))?;
        Ok(TestDevice {
            identity: identity.clone(),
            options,
            endpoint,
            connection,
            writer: FrameWriter {
                send,
                next_request_id: 0,
            },
            reader: FrameReader {
                recv,
                buf: FrameBuffer::new(),
            },
            pushes: VecDeque::new(),
            prekeys_low: VecDeque::new(),
            auth: None,
        })
    }

    /// The device's identity.
    pub fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    /// The device id.
    pub fn device(&self) -> DeviceId {
        self.identity.device()
    }

    /// What the relay said when this connection authenticated.
    pub fn auth_ok(&self) -> Option<&AuthOk> {
        self.auth.as_ref()
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// Split into the raw halves (for benchmarks that pipeline requests).
    /// Keep the connection alive as long as the halves are used.
    pub fn into_split(self) -> (FrameWriter, FrameReader, quinn::Connection, quinn::Endpoint) {
        (self.writer, self.reader, self.connection, self.endpoint)
    }

    /// Write a request and return its id without waiting for the reply.
    pub async fn write_request(&mut self, request: Request) -> Result<u32> {
        self.writer.write_request(request).await
    }

    /// Write arbitrary bytes on the stream (for malformed-frame tests).
    pub async fn raw_write(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_raw(bytes).await
    }

    /// The next frame from the wire, whatever it is, within `bound`.
    pub async fn next_frame(&mut self, bound: Duration) -> Result<ServerFrame> {
        within(bound, "a frame from the relay", self.reader.next_frame()).await?
    }

    /// Send `request` and return the relay's reply frame to it (a
    /// `Response` or an `Error`). Pushes that arrive meanwhile are queued.
    pub async fn request_frame(&mut self, request: Request) -> Result<ServerFrame> {
        let what = format!("reply to {}", request_name(&request));
        let id = self.writer.write_request(request).await?;
        let bound = self.options.request_timeout;
        let reader = &mut self.reader;
        let pushes = &mut self.pushes;
        let notices = &mut self.prekeys_low;
        within(bound, &what, async move {
            loop {
                match reader.next_frame().await? {
                    ServerFrame::Push { envelopes } => pushes.push_back(envelopes),
                    ServerFrame::PrekeysLow {
                        one_time_prekeys_left,
                    } => notices.push_back(one_time_prekeys_left),
                    ServerFrame::Closing { code, reason } => {
                        return Err(HarnessError::Closing { code, reason });
                    }
                    f @ ServerFrame::Response { request_id, .. } if request_id == id => {
                        return Ok(f);
                    }
                    f @ ServerFrame::Error { request_id, .. }
                        if request_id == id || request_id == 0 =>
                    {
                        return Ok(f);
                    }
                    other => return Err(HarnessError::Unexpected(Box::new(other))),
                }
            }
        })
        .await?
    }

    /// Send `request` and return its response; an error frame becomes
    /// [`HarnessError::Refused`].
    pub async fn request(&mut self, request: Request) -> Result<Response> {
        match self.request_frame(request).await? {
            ServerFrame::Response { response, .. } => Ok(response),
            ServerFrame::Error { error, .. } => Err(HarnessError::Refused(error)),
            other => Err(HarnessError::Unexpected(Box::new(other))),
        }
    }

    /// `Hello`: returns this connection's challenge.
    pub async fn hello(&mut self) -> Result<[u8; 32]> {
        let device = self.identity.device();
        match self.request(Request::Hello { device }).await? {
            Response::Challenge { challenge } => Ok(challenge),
            other => Err(unexpected(other)),
        }
    }

    /// `Hello` + `Register` with this identity's registration.
    pub async fn register(&mut self) -> Result<AuthOk> {
        let challenge = self.hello().await?;
        let registration = self.identity.registration();
        let signature = self.identity.sign_challenge(&challenge);
        let ok = authenticated(
            self.request(Request::Register {
                registration,
                signature,
            })
            .await?,
        )?;
        self.auth = Some(ok.clone());
        Ok(ok)
    }

    /// `Hello` + `Auth`.
    pub async fn auth(&mut self) -> Result<AuthOk> {
        let challenge = self.hello().await?;
        let signature = self.identity.sign_challenge(&challenge);
        let ok = authenticated(self.request(Request::Auth { signature }).await?)?;
        self.auth = Some(ok.clone());
        Ok(ok)
    }

    /// `Hello` + `Register` with keys held elsewhere (e.g. `hush-crypto`
    /// identities): `sign` receives the bytes to sign
    /// ([`hush_protocol::auth_challenge_bytes`] of this connection's challenge).
    pub async fn register_with(
        &mut self,
        registration: DeviceRegistration,
        sign: impl FnOnce(&[u8]) -> [u8; 64],
    ) -> Result<AuthOk> {
        let challenge = self.hello().await?;
        let signature = sign(&auth_challenge_bytes(&challenge, &registration.device));
        let ok = authenticated(
            self.request(Request::Register {
                registration,
                signature,
            })
            .await?,
        )?;
        self.auth = Some(ok.clone());
        Ok(ok)
    }

    /// `Hello` + `Auth` with a key held elsewhere; see [`TestDevice::register_with`].
    pub async fn auth_with(&mut self, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Result<AuthOk> {
        let challenge = self.hello().await?;
        let signature = sign(&auth_challenge_bytes(&challenge, &self.identity.device()));
        let ok = authenticated(self.request(Request::Auth { signature }).await?)?;
        self.auth = Some(ok.clone());
        Ok(ok)
    }

    /// `Send`: one outcome per envelope, in order.
    pub async fn send(&mut self, envelopes: Vec<Envelope>) -> Result<Vec<SendOutcome>> {
        match self.request(Request::Send { envelopes }).await? {
            Response::Sent { outcomes } => Ok(outcomes),
            other => Err(unexpected(other)),
        }
    }

    /// `Send` of one envelope.
    pub async fn send_one(&mut self, envelope: Envelope) -> Result<SendOutcome> {
        let mut outcomes = self.send(vec![envelope]).await?;
        match (outcomes.pop(), outcomes.is_empty()) {
            (Some(o), true) => Ok(o),
            _ => Err(HarnessError::Connection(
                "relay returned a wrong number of outcomes".into(),
            )),
        }
    }

    /// `Pull{after, limit, ack}`.
    pub async fn pull(&mut self, after: u64, limit: u16, ack: u64) -> Result<Page> {
        match self.request(Request::Pull { after, limit, ack }).await? {
            Response::Page(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// Drain the inbox after `after` the way the client syncs a backlog:
    /// up to `depth` merged-ack pulls of `limit` in flight, each asking for
    /// the next range while earlier pages are still on the way, each
    /// acknowledging what arrived before it was written. Checks that seqs
    /// arrive contiguous and in order; returns how many envelopes came.
    /// The caller must not expect pushes meanwhile (drain offline inboxes).
    pub async fn drain_pipelined(
        &mut self,
        mut after: u64,
        limit: u16,
        depth: usize,
    ) -> Result<u64> {
        let span = u64::from(limit.max(1));
        let mut in_flight: std::collections::VecDeque<(u32, u64)> = Default::default();
        let id = self
            .write_request(Request::Pull {
                after,
                limit,
                ack: after,
            })
            .await?;
        in_flight.push_back((id, after));
        let mut frontier = after + span;
        let mut got = 0u64;
        while let Some((want, asked)) = in_flight.pop_front() {
            let page = match self.next_frame(Duration::from_secs(30)).await? {
                ServerFrame::Response {
                    request_id,
                    response: Response::Page(page),
                } if request_id == want => page,
                other => return Err(HarnessError::Unexpected(Box::new(other))),
            };
            if asked != after {
                return Err(HarnessError::Connection(format!(
                    "page for seqs after {asked} arrived at cursor {after}"
                )));
            }
            for d in &page.envelopes {
                if d.seq != after + 1 {
                    return Err(HarnessError::Connection(format!(
                        "seq {} arrived after {after}",
                        d.seq
                    )));
                }
                after = d.seq;
            }
            got += page.envelopes.len() as u64;
            let end = after + page.remaining;
            while in_flight.len() < depth.max(1) && frontier < end {
                let id = self
                    .write_request(Request::Pull {
                        after: frontier,
                        limit,
                        ack: after,
                    })
                    .await?;
                in_flight.push_back((id, frontier));
                frontier += span;
            }
        }
        Ok(got)
    }

    /// Read the whole inbox after `after` without acknowledging anything.
    pub async fn read_inbox(&mut self, after: u64) -> Result<Vec<Delivered>> {
        let mut out: Vec<Delivered> = Vec::new();
        let mut cursor = after;
        loop {
            let page = self
                .pull(cursor, hush_protocol::limits::MAX_PAGE, 0)
                .await?;
            if let Some(last) = page.envelopes.last() {
                cursor = last.seq;
            }
            let empty = page.envelopes.is_empty();
            out.extend(page.envelopes);
            if page.remaining == 0 || empty {
                return Ok(out);
            }
        }
    }

    /// Cumulative `Ack`; returns the acknowledged cursor now in force.
    pub async fn ack(&mut self, up_to: u64) -> Result<u64> {
        match self.request(Request::Ack { up_to }).await? {
            Response::Acked { up_to } => Ok(up_to),
            other => Err(unexpected(other)),
        }
    }

    /// `Ping`: returns the relay's clock.
    pub async fn ping(&mut self) -> Result<u64> {
        match self.request(Request::Ping).await? {
            Response::Pong { relay_time_ms } => Ok(relay_time_ms),
            other => Err(unexpected(other)),
        }
    }

    /// `PublishPrekeys`: returns the one-time prekeys now available.
    pub async fn publish_prekeys(
        &mut self,
        signed_prekey: SignedPrekey,
        one_time_prekeys: Vec<OneTimePrekey>,
    ) -> Result<u32> {
        let request = Request::PublishPrekeys {
            signed_prekey,
            one_time_prekeys,
        };
        match self.request(request).await? {
            Response::PrekeysPublished {
                one_time_prekeys_left,
            } => Ok(one_time_prekeys_left),
            other => Err(unexpected(other)),
        }
    }

    /// `FetchPrekeys` of another device.
    pub async fn fetch_prekeys(&mut self, device: DeviceId) -> Result<PrekeyBundle> {
        match self.request(Request::FetchPrekeys { device }).await? {
            Response::Prekeys(bundle) => Ok(bundle),
            other => Err(unexpected(other)),
        }
    }

    /// `PublishDeviceList`: returns the stored version.
    pub async fn publish_device_list(&mut self, list: SignedDeviceList) -> Result<u64> {
        match self.request(Request::PublishDeviceList { list }).await? {
            Response::DeviceListPublished { version } => Ok(version),
            other => Err(unexpected(other)),
        }
    }

    /// `FetchDeviceList`.
    pub async fn fetch_device_list(&mut self, user: UserKey) -> Result<SignedDeviceList> {
        match self.request(Request::FetchDeviceList { user }).await? {
            Response::DeviceList(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }

    /// The next pushed batch, queued or from the wire, within `bound`.
    pub async fn next_push(&mut self, bound: Duration) -> Result<Vec<Delivered>> {
        if let Some(p) = self.pushes.pop_front() {
            return Ok(p);
        }
        let reader = &mut self.reader;
        let notices = &mut self.prekeys_low;
        within(bound, "a push from the relay", async move {
            loop {
                match reader.next_frame().await? {
                    ServerFrame::Push { envelopes } => return Ok(envelopes),
                    ServerFrame::PrekeysLow {
                        one_time_prekeys_left,
                    } => notices.push_back(one_time_prekeys_left),
                    ServerFrame::Closing { code, reason } => {
                        return Err(HarnessError::Closing { code, reason });
                    }
                    other => return Err(HarnessError::Unexpected(Box::new(other))),
                }
            }
        })
        .await?
    }

    /// The next `PrekeysLow` notice (its `one_time_prekeys_left`), queued or
    /// from the wire, within `bound`. Pushes that arrive meanwhile are queued.
    pub async fn next_prekeys_low(&mut self, bound: Duration) -> Result<u32> {
        if let Some(left) = self.prekeys_low.pop_front() {
            return Ok(left);
        }
        let reader = &mut self.reader;
        let pushes = &mut self.pushes;
        within(bound, "a PrekeysLow notice from the relay", async move {
            loop {
                match reader.next_frame().await? {
                    ServerFrame::PrekeysLow {
                        one_time_prekeys_left,
                    } => return Ok(one_time_prekeys_left),
                    ServerFrame::Push { envelopes } => pushes.push_back(envelopes),
                    ServerFrame::Closing { code, reason } => {
                        return Err(HarnessError::Closing { code, reason });
                    }
                    other => return Err(HarnessError::Unexpected(Box::new(other))),
                }
            }
        })
        .await?
    }

    /// `PrekeysLow` notices queued while waiting for replies, not yet taken.
    pub fn queued_prekeys_low(&self) -> usize {
        self.prekeys_low.len()
    }

    /// Collect pushes until `count` envelopes arrived, within `bound` overall.
    pub async fn collect_pushes(
        &mut self,
        count: usize,
        bound: Duration,
    ) -> Result<Vec<Delivered>> {
        let deadline = tokio::time::Instant::now() + bound;
        let mut out = Vec::new();
        while out.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout {
                    what: format!("{count} pushed envelopes (got {})", out.len()),
                    after: bound,
                });
            }
            out.extend(self.next_push(left).await?);
        }
        Ok(out)
    }

    /// Pushes queued while waiting for replies, not yet taken.
    pub fn queued_pushes(&self) -> usize {
        self.pushes.len()
    }

    /// Wait (within `bound`) for the relay to close the connection and
    /// return the QUIC-level reason.
    pub async fn closed(&self, bound: Duration) -> Result<quinn::ConnectionError> {
        within(
            bound,
            "the relay to close the connection",
            self.connection.closed(),
        )
        .await
    }

    /// Close the connection from this side.
    pub fn close(&self) {
        self.connection.close(0u32.into(), b"test done");
    }
}

fn authenticated(response: Response) -> Result<AuthOk> {
    match response {
        Response::Authenticated(ok) => Ok(ok),
        other => Err(unexpected(other)),
    }
}

fn unexpected(response: Response) -> HarnessError {
    HarnessError::Unexpected(Box::new(ServerFrame::Response {
        request_id: 0,
        response,
    }))
}

fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Hello { .. } => "Hello",
        Request::Auth { .. } => "Auth",
        Request::Register { .. } => "Register",
        Request::Send { .. } => "Send",
        Request::Pull { .. } => "Pull",
        Request::Ack { .. } => "Ack",
        Request::PublishPrekeys { .. } => "PublishPrekeys",
        Request::FetchPrekeys { .. } => "FetchPrekeys",
        Request::PublishDeviceList { .. } => "PublishDeviceList",
        Request::FetchDeviceList { .. } => "FetchDeviceList",
        Request::Ping => "Ping",
        Request::BlobPut { .. } => "BlobPut",
        Request::BlobStatus { .. } => "BlobStatus",
        Request::BlobGet { .. } => "BlobGet",
        Request::FetchDeviceLeases { .. } => "FetchDeviceLeases",
        Request::EarlyPushes => "EarlyPushes",
    }
}

/// The error code of a refusal, for assertions: `Some(code)` if `result` is
/// a [`HarnessError::Refused`] or [`HarnessError::Closing`].
pub fn refusal_code<T>(result: &Result<T>) -> Option<ErrorCode> {
    match result {
        Ok(_) => None,
        Err(e) => e.code(),
    }
}

/// `(seq, duplicate)` if the outcome is `Stored`.
pub fn stored(outcome: &SendOutcome) -> Option<(u64, bool)> {
    match outcome {
        SendOutcome::Stored { seq, duplicate, .. } => Some((*seq, *duplicate)),
        SendOutcome::Refused { .. } => None,
    }
}

/// The refusal's error if the outcome is `Refused`.
pub fn refused(outcome: &SendOutcome) -> Option<&hush_protocol::WireError> {
    match outcome {
        SendOutcome::Refused { error, .. } => Some(error),
        SendOutcome::Stored { .. } => None,
    }
}
