//! A test device over the relay's WebSocket transport.
//!
//! [`WsDevice`] speaks the same frames as [`crate::TestDevice`], carried in
//! binary WebSocket messages: over TLS to the relay's WebSocket listener
//! (`wss://ADDR/ws`, the certificate pinned like QUIC's), or in the clear
//! to the HTTP listener's `/ws` (`ws://ADDR/ws`, what a browser uses with a
//! development certificate). It can also send what a hostile peer would:
//! text messages, raw bytes, frames the protocol does not allow. Every wait
//! is bounded.

use crate::identity::DeviceIdentity;
use crate::wait::within;
use crate::{HarnessError, Result};
use futures_util::{SinkExt as _, StreamExt as _};
use hush_cli::CertCheck;
use hush_cli::transport::{Io, WsStream, open_websocket};
use hush_protocol::{
    AuthOk, ClientFrame, Delivered, Envelope, FrameBuffer, Page, Request, Response, SendOutcome,
    ServerFrame, encode_client_frame,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Bound on connecting and on each awaited reply.
pub const WS_BOUND: Duration = Duration::from_secs(10);

/// What arrived from the relay.
#[derive(Debug)]
pub enum WsEvent {
    /// A decoded frame.
    Frame(Box<ServerFrame>),
    /// The relay closed the WebSocket: its close code (if any) and reason.
    Closed(Option<u16>, String),
}

/// A device connected over a WebSocket.
pub struct WsDevice {
    identity: DeviceIdentity,
    ws: WsStream,
    buf: FrameBuffer,
    next_request_id: u32,
    pushes: VecDeque<Vec<Delivered>>,
}

impl std::fmt::Debug for WsDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsDevice")
            .field("device", &self.identity.device())
            .finish_non_exhaustive()
    }
}

impl WsDevice {
    /// Connect over TLS to `wss://ADDR/ws`, pinning `cert_sha256`.
    pub async fn connect_tls(
        identity: &DeviceIdentity,
        addr: SocketAddr,
        cert_sha256: [u8; 32],
    ) -> Result<WsDevice> {
        let ws = open_websocket(&addr.to_string(), CertCheck::Pinned(cert_sha256), WS_BOUND)
            .await
            .map_err(|e| HarnessError::Connect(e.to_string()))?;
        Ok(Self::wrap(identity, ws))
    }

    /// Connect in the clear to the HTTP listener's `ws://ADDR/ws`.
    pub async fn connect_plain(identity: &DeviceIdentity, addr: SocketAddr) -> Result<WsDevice> {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let boxed: Box<dyn Io> = Box::new(tcp);
            let url = format!("ws://{addr}/ws");
            tokio_tungstenite::client_async(url.as_str(), boxed)
                .await
                .map(|(ws, _)| ws)
                .map_err(|e| HarnessError::Connect(e.to_string()))
        };
        let ws = within(WS_BOUND, "plain WebSocket handshake", attempt).await??;
        Ok(Self::wrap(identity, ws))
    }

    fn wrap(identity: &DeviceIdentity, ws: WsStream) -> WsDevice {
        WsDevice {
            identity: identity.clone(),
            ws,
            buf: FrameBuffer::new(),
            next_request_id: 0,
            pushes: VecDeque::new(),
        }
    }

    /// Send one WebSocket message as is (text, binary, anything).
    pub async fn send_message(&mut self, message: Message) -> Result<()> {
        within(WS_BOUND, "WebSocket write", self.ws.send(message))
            .await?
            .map_err(|e| HarnessError::Connection(e.to_string()))
    }

    /// Send `bytes` as one binary message.
    pub async fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.send_message(Message::Binary(bytes.to_vec().into()))
            .await
    }

    /// Encode and send a request in one binary message; returns its id.
    pub async fn write_request(&mut self, request: Request) -> Result<u32> {
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        let id = self.next_request_id;
        let bytes = encode_client_frame(&ClientFrame {
            request_id: id,
            request,
        })?;
        self.write_bytes(&bytes).await?;
        Ok(id)
    }

    /// The next frame or the close, within `bound`.
    pub async fn next_event(&mut self, bound: Duration) -> Result<WsEvent> {
        let ws = &mut self.ws;
        let buf = &mut self.buf;
        within(bound, "a WebSocket event from the relay", async move {
            loop {
                if let Some(frame) = buf.next_server_frame()? {
                    return Ok(WsEvent::Frame(Box::new(frame)));
                }
                match ws.next().await {
                    Some(Ok(Message::Binary(bytes))) => buf.extend(&bytes),
                    Some(Ok(Message::Close(frame))) => {
                        return Ok(match frame {
                            Some(f) => {
                                WsEvent::Closed(Some(u16::from(f.code)), f.reason.to_string())
                            }
                            None => WsEvent::Closed(None, String::new()),
                        });
                    }
                    Some(Ok(Message::Text(_))) => {
                        return Err(HarnessError::Connection("relay sent text".into()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(HarnessError::Connection(e.to_string())),
                    None => return Ok(WsEvent::Closed(None, "stream ended".into())),
                }
            }
        })
        .await?
    }

    /// Read until the relay closes the WebSocket; the frames before the
    /// close and its code.
    pub async fn until_closed(
        &mut self,
        bound: Duration,
    ) -> Result<(Vec<ServerFrame>, Option<u16>)> {
        let deadline = tokio::time::Instant::now() + bound;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await? {
                WsEvent::Frame(f) => frames.push(*f),
                WsEvent::Closed(code, _) => return Ok((frames, code)),
            }
        }
    }

    /// Send `request` and return the reply frame (pushes are queued).
    pub async fn request_frame(&mut self, request: Request) -> Result<ServerFrame> {
        let id = self.write_request(request).await?;
        loop {
            match self.next_event(WS_BOUND).await? {
                WsEvent::Frame(frame) => match *frame {
                    ServerFrame::Push { envelopes } => self.pushes.push_back(envelopes),
                    ServerFrame::PrekeysLow { .. } => {}
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
                },
                WsEvent::Closed(code, reason) => {
                    return Err(HarnessError::Connection(format!(
                        "WebSocket closed ({code:?} {reason})"
                    )));
                }
            }
        }
    }

    /// Send `request`; an error frame becomes [`HarnessError::Refused`].
    pub async fn request(&mut self, request: Request) -> Result<Response> {
        match self.request_frame(request).await? {
            ServerFrame::Response { response, .. } => Ok(response),
            ServerFrame::Error { error, .. } => Err(HarnessError::Refused(error)),
            other => Err(HarnessError::Unexpected(Box::new(other))),
        }
    }

    /// `Hello`: this connection's challenge.
    pub async fn hello(&mut self) -> Result<[u8; 32]> {
        let device = self.identity.device();
        match self.request(Request::Hello { device }).await? {
            Response::Challenge { challenge } => Ok(challenge),
            other => Err(unexpected(other)),
        }
    }

    /// `Hello` + `Register`.
    pub async fn register(&mut self) -> Result<AuthOk> {
        let challenge = self.hello().await?;
        let registration = self.identity.registration();
        let signature = self.identity.sign_challenge(&challenge);
        authenticated(
            self.request(Request::Register {
                registration,
                signature,
            })
            .await?,
        )
    }

    /// `Hello` + `Auth`.
    pub async fn auth(&mut self) -> Result<AuthOk> {
        let challenge = self.hello().await?;
        let signature = self.identity.sign_challenge(&challenge);
        authenticated(self.request(Request::Auth { signature }).await?)
    }

    /// `Send` of one envelope.
    pub async fn send_one(&mut self, envelope: Envelope) -> Result<SendOutcome> {
        match self
            .request(Request::Send {
                envelopes: vec![envelope],
            })
            .await?
        {
            Response::Sent { mut outcomes } if outcomes.len() == 1 => outcomes
                .pop()
                .ok_or_else(|| HarnessError::Connection("no outcome".into())),
            other => Err(unexpected(other)),
        }
    }

    /// `Pull{after, limit, ack}`.
    pub async fn pull(&mut self, after: u64, limit: u16, ack: u64) -> Result<Page> {
        match self.request(Request::Pull { after, limit, ack }).await? {
            Response::Page(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// Cumulative `Ack`.
    pub async fn ack(&mut self, up_to: u64) -> Result<u64> {
        match self.request(Request::Ack { up_to }).await? {
            Response::Acked { up_to } => Ok(up_to),
            other => Err(unexpected(other)),
        }
    }

    /// The next pushed batch, queued or from the wire, within `bound`.
    pub async fn next_push(&mut self, bound: Duration) -> Result<Vec<Delivered>> {
        if let Some(p) = self.pushes.pop_front() {
            return Ok(p);
        }
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await? {
                WsEvent::Frame(frame) => match *frame {
                    ServerFrame::Push { envelopes } => return Ok(envelopes),
                    ServerFrame::PrekeysLow { .. } => {}
                    ServerFrame::Closing { code, reason } => {
                        return Err(HarnessError::Closing { code, reason });
                    }
                    other => return Err(HarnessError::Unexpected(Box::new(other))),
                },
                WsEvent::Closed(code, reason) => {
                    return Err(HarnessError::Connection(format!(
                        "WebSocket closed ({code:?} {reason})"
                    )));
                }
            }
        }
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
