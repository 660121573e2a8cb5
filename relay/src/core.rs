//! The relay's protocol logic as a state machine, with no sockets, tasks or
//! clocks.
//!
//! One [`Session`] per connection holds where that connection stands
//! (unauthenticated → challenged → authenticated, live or not, what it was
//! sent). [`RelayCore::handle`] takes one decoded request plus the current
//! time and a fresh random challenge, reads or writes the [`Store`], and
//! returns [`Action`]s: frames to send, envelopes to commit, "this device
//! authenticated", "this session is now live", "close". The async server
//! executes those actions; the deterministic simulator executes them over a
//! `MemoryStore` with virtual time. Everything that decides *what* the relay
//! answers lives here; only *when* and *over what* lives in `server/`.
//!
//! Sends are split in two so that group commit can batch across connections:
//! `handle` validates a `Send` and returns [`Action::Commit`] with the
//! envelopes that passed; whoever commits them calls
//! [`RelayCore::finish_send`] with the store's outcomes to get the reply.

use crate::metrics::Metrics;
use crate::store::{BlobLimits, BlobWrite, CommitOutcome, NewEnvelope, Refusal, Store, StoreError};
use ed25519_dalek::{Signature, VerifyingKey};
use hush_protocol::limits::{MAX_BLOB_CHUNK, MAX_PAGE, MAX_PAGE_BYTES};
use hush_protocol::{
    AuthOk, ClientFrame, DeviceId, Envelope, ErrorCode, MessageId, Page, ProtocolError,
    RawDelivered, Request, Response, SendOutcome, ServerFrame, SignedDeviceList, Truncation,
    WireError, auth_challenge_bytes,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Default push window: pushed-but-unacknowledged envelopes a live session
/// may have outstanding before the relay waits for an `Ack`.
pub const DEFAULT_PUSH_WINDOW: u64 = 1024;

/// Per-relay settings of the protocol logic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreConfig {
    /// Largest envelope accepted, bytes.
    pub max_envelope: usize,
    /// Lifetime of an unacknowledged envelope, ms.
    pub retention_ms: u64,
    /// Lifetime of an unacknowledged envelope flagged important, ms
    /// (at least `retention_ms`).
    pub retention_important_ms: u64,
    /// Envelopes per second per connection (0 = unlimited).
    pub send_rate: u32,
    /// Envelopes a connection may send in one burst.
    pub send_burst: u32,
    /// Pushed-but-unacknowledged envelopes allowed per live session.
    pub push_window: u64,
    /// Blob (history archive) limits and lifetime.
    pub blobs: BlobLimits,
    /// A device not seen (authenticated) for this long is stale, ms.
    pub stale_after_ms: u64,
}

/// Default of [`CoreConfig::stale_after_ms`]: 30 days.
pub const DEFAULT_STALE_AFTER_MS: u64 = 30 * 24 * 60 * 60 * 1000;

impl CoreConfig {
    /// How coarsely last-seen times are written: an hour
    /// ([`crate::store::LAST_SEEN_GRANULARITY_MS`]), or an eighth of the
    /// stale period if that is shorter, so that a device in use never
    /// looks stale.
    pub fn last_seen_granularity_ms(&self) -> u64 {
        crate::store::LAST_SEEN_GRANULARITY_MS
            .min(self.stale_after_ms / 8)
            .max(1)
    }
}

impl CoreConfig {
    /// Settings derived from the relay configuration; the burst allows two
    /// seconds' worth of sends and at least one full batch.
    pub fn from_config(c: &crate::Config) -> CoreConfig {
        CoreConfig {
            max_envelope: c.max_envelope,
            retention_ms: c.retention_ms(),
            retention_important_ms: c.retention_important_ms(),
            send_rate: c.send_rate,
            send_burst: c
                .send_rate
                .saturating_mul(2)
                .max(hush_protocol::limits::MAX_BATCH as u32),
            push_window: DEFAULT_PUSH_WINDOW,
            blobs: c.blob_limits(),
            stale_after_ms: c.stale_after_ms(),
        }
    }
}

/// Where a connection stands in authentication.
#[derive(Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Nothing yet (or the last challenge was used up).
    Start,
    /// `Hello` answered; the next `Auth`/`Register` must sign this challenge.
    Challenged {
        /// The device that said hello.
        device: DeviceId,
        /// The single-use challenge.
        challenge: [u8; 32],
    },
    /// Proven: the connection acts as this device.
    Authenticated {
        /// The device.
        device: DeviceId,
    },
}

impl std::fmt::Debug for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Challenges are never printed.
        match self {
            SessionState::Start => f.write_str("Start"),
            SessionState::Challenged { device, .. } => {
                write!(f, "Challenged({})", short_id(device))
            }
            SessionState::Authenticated { device } => {
                write!(f, "Authenticated({})", short_id(device))
            }
        }
    }
}

/// A device id cut to 8 hex digits: enough to correlate log lines, not
/// enough to be the id.
pub fn short_id(device: &DeviceId) -> String {
    let mut s = device.to_hex();
    s.truncate(8);
    s
}

/// A token bucket in milli-envelopes, refilled from the caller's clock.
#[derive(Debug, Clone)]
struct TokenBucket {
    /// Envelopes per second (0 = unlimited).
    rate: u64,
    capacity_milli: u64,
    tokens_milli: u64,
    last_ms: u64,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32, now_ms: u64) -> Self {
        let capacity_milli = u64::from(burst.max(1)) * 1000;
        TokenBucket {
            rate: u64::from(rate),
            capacity_milli,
            tokens_milli: capacity_milli,
            last_ms: now_ms,
        }
    }

    /// Take one token, or say how long until one is available.
    fn take(&mut self, now_ms: u64) -> Result<(), u32> {
        if self.rate == 0 {
            return Ok(());
        }
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        // rate envelopes/s = rate milli-envelopes/ms.
        self.tokens_milli = self
            .tokens_milli
            .saturating_add(elapsed.saturating_mul(self.rate))
            .min(self.capacity_milli);
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            Ok(())
        } else {
            let missing = 1000 - self.tokens_milli;
            let wait = missing.div_ceil(self.rate);
            Err(u32::try_from(wait).unwrap_or(u32::MAX))
        }
    }
}

/// One connection's protocol state.
#[derive(Debug, Clone)]
pub struct Session {
    state: SessionState,
    /// Pushing new envelopes as they are committed.
    live: bool,
    /// Highest relay seq sent to this connection (page or push).
    delivered: u64,
    /// Highest seq acknowledged (by this connection or before it).
    acked: u64,
    /// The last push stopped because the window was full.
    window_full: bool,
    /// The device asked for early pushes (`Request::EarlyPushes`).
    early: bool,
    /// Highest relay seq pushed early on this connection (0: none).
    early_through: u64,
    /// Highest relay seq this connection was told is durable.
    durable_told: u64,
    bucket: TokenBucket,
    /// When the connection opened (relay clock), for the sync histogram.
    opened_at_ms: u64,
    /// Sync progress for the metrics: authenticated (a sync started), and
    /// caught up (its first page with nothing remaining).
    sync_started: bool,
    sync_finished: bool,
    /// The page a catching-up device will most likely ask for next: set by
    /// a page that left envelopes behind, taken by the caller that reads it
    /// ahead (see [`ReadAhead`]).
    next_page: Option<NextPage>,
}

/// Where the next page of a catch-up starts, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextPage {
    /// The device whose inbox it is.
    pub device: DeviceId,
    /// The last seq of the page just served.
    pub after: u64,
    /// The page size that was asked for (clamped to the protocol's limit).
    pub limit: usize,
}

impl NextPage {
    /// The page an authenticated `Pull { after, limit, ack }` of `device`
    /// reads: its merged ack deletes everything up to `ack` first.
    pub fn of_pull(device: DeviceId, after: u64, limit: u16, ack: u64) -> NextPage {
        NextPage {
            device,
            after: after.max(ack),
            limit: usize::from(limit.clamp(1, MAX_PAGE)),
        }
    }
}

/// A page read before it was asked for.
///
/// A device catching up asks for one page, acknowledges it and asks for the
/// next one: without reading ahead, the store read of page n+1 starts only
/// once page n crossed the network and the device answered, so every round
/// trip pays it in full. The caller reads the [`NextPage`] a page leaves
/// behind while that page is on its way, and hands the result to
/// [`RelayCore::handle_deferring_ack`] with the next request.
///
/// It is used only for a `Pull` of exactly that device, start and size, and
/// only if more envelopes followed it when it was read. An inbox only gains
/// envelopes above its head, and loses envelopes only to acks at or below
/// the page's start, to expiry and to the device's removal; so such a page
/// is what a read now would return, save envelopes that expired or a
/// removal that happened in the time between (the page then reaches the
/// device that was entitled to it a moment earlier). Its `remaining` may
/// undercount what arrived meanwhile; it is progress information, and the
/// next page counts again. A page that ended the inbox is read again
/// instead: new envelopes may belong in it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadAhead {
    /// Which page this is.
    pub at: NextPage,
    /// The page, in the form it was stored in.
    envelopes: Vec<RawDelivered>,
    remaining: u64,
    truncated: Option<hush_protocol::Truncation>,
}

impl ReadAhead {
    /// Whether a `Pull` reading the page `at` (see [`NextPage::of_pull`])
    /// gets exactly this page.
    pub fn answers(&self, at: NextPage) -> bool {
        self.at == at && self.remaining > 0
    }
}

impl Session {
    /// A fresh, unauthenticated session.
    pub fn new(config: &CoreConfig, now_ms: u64) -> Session {
        Session {
            state: SessionState::Start,
            live: false,
            delivered: 0,
            acked: 0,
            window_full: false,
            early: false,
            early_through: 0,
            durable_told: 0,
            bucket: TokenBucket::new(config.send_rate, config.send_burst, now_ms),
            opened_at_ms: now_ms,
            sync_started: false,
            sync_finished: false,
            next_page: None,
        }
    }

    /// Take the page this session will most likely ask for next, if its
    /// last page left envelopes behind (see [`ReadAhead`]).
    pub fn take_next_page(&mut self) -> Option<NextPage> {
        self.next_page.take()
    }

    /// The authentication state.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// The authenticated device, if any.
    pub fn device(&self) -> Option<DeviceId> {
        match self.state {
            SessionState::Authenticated { device } => Some(device),
            _ => None,
        }
    }

    /// Whether newly committed envelopes are pushed to this session.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Highest relay seq acknowledged (on this connection or before it).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest relay seq delivered on this connection.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Whether the device asked for early pushes.
    pub fn wants_early(&self) -> bool {
        self.early
    }

    /// Whether everything the inbox holds up to `head` was already pushed
    /// early on this connection, so that a wake-up for `head` needs no read
    /// of the store.
    pub fn pushed_early_through(&self, head: u64) -> bool {
        self.early_through >= head && self.delivered >= head
    }
}

/// A frame for one connection.
///
/// Pages and pushes keep their envelopes as the bytes the store holds
/// ([`RawDelivered`], checked to decode) and are encoded straight from them
/// (`hush_protocol::raw`): the relay never decodes an envelope only to
/// encode it again. Everything else is a [`ServerFrame`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// Any frame, as a value.
    Frame(ServerFrame),
    /// `ServerFrame::Response` carrying `Response::Page`.
    Page {
        /// Echo of the `Pull`'s request id.
        request_id: u32,
        /// The page, as stored.
        page: RawPage,
    },
    /// `ServerFrame::Push`, as stored.
    Push(Vec<RawDelivered>),
    /// `ServerFrame::EarlyPush`, as written (its commit not yet durable).
    EarlyPush(Vec<RawDelivered>),
}

/// A page read from an inbox, its envelopes as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPage {
    /// In relay-seq order.
    pub envelopes: Vec<RawDelivered>,
    /// Envelopes still stored after this page.
    pub remaining: u64,
    /// Tombstones of envelopes purged unread above the page's start.
    pub truncated: Option<Truncation>,
}

impl Outbound {
    /// The complete frame, length prefix included.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        match self {
            Outbound::Frame(frame) => hush_protocol::encode_server_frame(frame),
            Outbound::Page { request_id, page } => hush_protocol::encode_page_frame(
                *request_id,
                &page.envelopes,
                page.remaining,
                page.truncated.as_ref(),
            ),
            Outbound::Push(envelopes) => hush_protocol::encode_push_frame(envelopes),
            Outbound::EarlyPush(envelopes) => hush_protocol::encode_early_push_frame(envelopes),
        }
    }

    /// The frame as a value, its envelopes decoded: what a client decodes
    /// from [`Outbound::encode`]'s bytes (the simulator and tests use it).
    pub fn to_frame(&self) -> Result<ServerFrame, ProtocolError> {
        let decode = |raw: &[RawDelivered]| {
            raw.iter()
                .map(RawDelivered::decode)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match self {
            Outbound::Frame(frame) => frame.clone(),
            Outbound::Page { request_id, page } => ServerFrame::Response {
                request_id: *request_id,
                response: Response::Page(Page {
                    envelopes: decode(&page.envelopes)?,
                    remaining: page.remaining,
                    truncated: page.truncated.clone(),
                }),
            },
            Outbound::Push(envelopes) => ServerFrame::Push {
                envelopes: decode(envelopes)?,
            },
            Outbound::EarlyPush(envelopes) => ServerFrame::EarlyPush {
                envelopes: decode(envelopes)?,
            },
        })
    }
}

impl From<ServerFrame> for Outbound {
    fn from(frame: ServerFrame) -> Outbound {
        Outbound::Frame(frame)
    }
}

/// What the caller must do after [`RelayCore::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this frame to the connection.
    Send(Outbound),
    /// Commit these envelopes (possibly batched with other connections'),
    /// then pass the outcome to [`RelayCore::finish_send`] and send its frame.
    Commit(PendingSend),
    /// The connection now acts as this device (a newer connection of the
    /// same device replaces older ones). Comes before the `AuthOk` it
    /// answers, so the connection claims the device before the client
    /// hears it is in.
    Authenticated(DeviceId),
    /// The session drained its inbox: from now on, call [`RelayCore::pump`]
    /// whenever this device's inbox gains envelopes.
    Live(DeviceId),
    /// The device asked for early pushes: from now on, hand this session
    /// the envelopes of its inbox as soon as their commit has written them
    /// ([`RelayCore::push_fresh`] with `early`), and follow them with
    /// [`RelayCore::durable_notice`].
    EarlyPushes(DeviceId),
    /// This device was removed by its user (an accepted device list
    /// dropped it): close its open connection on this node, telling it
    /// `DeviceRemoved`.
    Evict(DeviceId),
    /// Close the connection after sending what precedes this action.
    Close {
        /// Why.
        code: ErrorCode,
        /// For people.
        reason: String,
    },
}

/// The merged acknowledgement of a `Pull`, to apply after its reply was
/// sent (see [`RelayCore::handle_deferring_ack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeferredAck {
    /// The acknowledging device.
    pub device: DeviceId,
    /// Cumulative: every envelope with seq ≤ this goes.
    pub up_to: u64,
}

/// Envelopes of one `Send` that passed validation, waiting to be committed.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingSend {
    /// What to commit.
    pub envelopes: Vec<NewEnvelope>,
    /// How to turn the commit outcomes into the reply.
    pub ticket: SendTicket,
}

/// The bookkeeping needed to answer a `Send` once its envelopes are committed.
#[derive(Debug, Clone, PartialEq)]
pub struct SendTicket {
    request_id: u32,
    slots: Vec<Slot>,
    batch_len: usize,
}

impl SendTicket {
    /// The request this answers.
    pub fn request_id(&self) -> u32 {
        self.request_id
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// Refused before commit.
    Done(SendOutcome),
    /// The `index`-th envelope of the commit batch.
    Batch {
        message_id: MessageId,
        recipient: DeviceId,
    },
}

/// The relay's request logic over a [`Store`].
pub struct RelayCore<S: Store + ?Sized> {
    store: Arc<S>,
    config: CoreConfig,
    metrics: Arc<Metrics>,
}

impl<S: Store + ?Sized> std::fmt::Debug for RelayCore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A refusal of a whole request.
struct Refuse(ErrorCode, String);

impl From<StoreError> for Refuse {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyRegistered => Refuse(
                ErrorCode::AlreadyRegistered,
                "device already registered with different keys".into(),
            ),
            StoreError::UnknownDevice => Refuse(ErrorCode::UnknownDevice, "unknown device".into()),
            StoreError::DeviceLimit { max } => Refuse(
                ErrorCode::DeviceLimit,
                format!("this user already has {max} registered devices"),
            ),
            StoreError::StaleDeviceList { stored } => Refuse(
                ErrorCode::Forbidden,
                format!("stale device list: version {stored} is already stored"),
            ),
            StoreError::Backend(msg) => {
                tracing::error!("store failure: {msg}");
                Refuse(ErrorCode::Internal, "storage failure; retry later".into())
            }
            StoreError::BlobForbidden(msg) => Refuse(ErrorCode::Forbidden, msg.into()),
            StoreError::BlobMismatch(msg) => Refuse(ErrorCode::BadFrame, msg.into()),
            StoreError::BlobLimit(msg) => Refuse(ErrorCode::BlobLimit, msg),
            StoreError::UnknownBlob => Refuse(ErrorCode::UnknownBlob, "no such blob".into()),
            StoreError::StoreFull => {
                Refuse(ErrorCode::StoreFull, "the relay's store is full".into())
            }
            StoreError::DeviceRemoved => Refuse(
                ErrorCode::DeviceRemoved,
                "this device was removed by its user".into(),
            ),
        }
    }
}

fn refuse<T>(code: ErrorCode, msg: impl Into<String>) -> Result<T, Refuse> {
    Err(Refuse(code, msg.into()))
}

/// Verify an Ed25519 signature strictly (no malleable or small-order keys).
fn verify(public: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    match VerifyingKey::from_bytes(public) {
        Ok(key) => key
            .verify_strict(message, &Signature::from_bytes(signature))
            .is_ok(),
        Err(_) => false,
    }
}

impl<S: Store + ?Sized> RelayCore<S> {
    /// Logic over `store`, counting into `metrics`.
    pub fn new(store: Arc<S>, config: CoreConfig, metrics: Arc<Metrics>) -> Self {
        RelayCore {
            store,
            config,
            metrics,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A new connection's session.
    pub fn new_session(&self, now_ms: u64) -> Session {
        Session::new(&self.config, now_ms)
    }

    /// Handle one request. `challenge` must be fresh random bytes (it is used
    /// only if the request is a `Hello`).
    pub fn handle(
        &self,
        session: &mut Session,
        frame: ClientFrame,
        now_ms: u64,
        challenge: [u8; 32],
    ) -> Vec<Action> {
        let id = frame.request_id;
        let mut actions = Vec::new();
        let result = match (frame.request, session.device()) {
            (Request::Ping, _) => Ok(Response::Pong {
                relay_time_ms: now_ms,
            }),
            (Request::Hello { device }, None) => {
                session.state = SessionState::Challenged { device, challenge };
                Ok(Response::Challenge { challenge })
            }
            (Request::Auth { signature }, None) => {
                self.auth(session, &signature, now_ms, &mut actions)
            }
            (
                Request::Register {
                    registration,
                    signature,
                },
                None,
            ) => self.register(session, registration, &signature, now_ms, &mut actions),
            (Request::Hello { .. } | Request::Auth { .. } | Request::Register { .. }, Some(_)) => {
                refuse(ErrorCode::Forbidden, "already authenticated")
            }
            (_, None) => refuse(ErrorCode::NotAuthenticated, "authenticate first"),
            (Request::Send { envelopes }, Some(device)) => {
                match self.send(session, device, id, envelopes, now_ms) {
                    Ok(action) => {
                        actions.push(action);
                        return actions;
                    }
                    Err(e) => Err(e),
                }
            }
            (Request::Pull { after, limit, ack }, Some(device)) => {
                let r = self.pull(session, device, after, limit, ack, &mut actions);
                self.note_sync(session, now_ms);
                match r {
                    Ok(page) => {
                        actions.insert(
                            0,
                            Action::Send(Outbound::Page {
                                request_id: id,
                                page,
                            }),
                        );
                        return actions;
                    }
                    Err(e) => Err(e),
                }
            }
            (Request::Ack { up_to }, Some(device)) => match self.store.ack(&device, up_to) {
                Ok(cursor) => {
                    session.acked = session.acked.max(cursor);
                    let frame = ServerFrame::Response {
                        request_id: id,
                        response: Response::Acked { up_to: cursor },
                    };
                    actions.push(Action::Send(frame.into()));
                    if session.live && session.window_full {
                        actions.extend(self.pump(session));
                    }
                    return actions;
                }
                Err(e) => Err(e.into()),
            },
            (
                Request::PublishPrekeys {
                    signed_prekey,
                    one_time_prekeys,
                },
                Some(device),
            ) => self
                .store
                .publish_prekeys(&device, &signed_prekey, &one_time_prekeys)
                .map(|left| Response::PrekeysPublished {
                    one_time_prekeys_left: left,
                })
                .map_err(Refuse::from),
            (Request::FetchPrekeys { device: target }, Some(_)) => self.fetch_prekeys(&target),
            (Request::PublishDeviceList { list }, Some(device)) => {
                self.publish_device_list(&device, &list, now_ms, &mut actions)
            }
            (Request::FetchDeviceLeases { user }, Some(_)) => self.device_leases(&user, now_ms),
            (Request::EarlyPushes, Some(device)) => {
                session.early = true;
                actions.push(Action::EarlyPushes(device));
                Ok(Response::EarlyPushes)
            }
            (
                request @ (Request::BlobPut { .. }
                | Request::BlobStatus { .. }
                | Request::BlobGet { .. }),
                Some(device),
            ) => self.blob_request(device, request, now_ms),
            (Request::FetchDeviceList { user }, Some(_)) => match self.store.device_list(&user) {
                Ok(Some(list)) => Ok(Response::DeviceList(list)),
                Ok(None) => refuse(ErrorCode::UnknownDevice, "no device list for this user"),
                Err(e) => Err(e.into()),
            },
        };
        match result {
            // The answer goes first, after only the claim of a device just
            // authenticated: the connection owns the device (and adopted
            // the acks of the one it displaced) before `AuthOk` reports its
            // cursor.
            Ok(response) => actions.insert(
                usize::from(matches!(actions.first(), Some(Action::Authenticated(_)))),
                Action::Send(
                    ServerFrame::Response {
                        request_id: id,
                        response,
                    }
                    .into(),
                ),
            ),
            Err(Refuse(code, message)) => {
                self.metrics.refused(code);
                actions.insert(
                    0,
                    Action::Send(ServerFrame::error(id, code, message).into()),
                );
            }
        }
        actions
    }

    /// The reply to a frame that could not be decoded: an error, then close.
    /// Other connections are unaffected.
    pub fn malformed(&self, err: &ProtocolError) -> Vec<Action> {
        let code = err.code();
        self.metrics.refused(code);
        vec![
            Action::Send(ServerFrame::error(0, code, err.to_string()).into()),
            Action::Close {
                code,
                reason: "malformed frame".into(),
            },
        ]
    }

    fn auth(
        &self,
        session: &mut Session,
        signature: &[u8; 64],
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<Response, Refuse> {
        // The challenge is single-use whatever happens next.
        let SessionState::Challenged { device, challenge } =
            std::mem::replace(&mut session.state, SessionState::Start)
        else {
            return refuse(ErrorCode::BadAuth, "no challenge: send Hello first");
        };
        let Some(record) = self.store.device(&device)? else {
            return self.unknown_or_removed(&device);
        };
        let message = auth_challenge_bytes(&challenge, &device);
        if !verify(&record.registration.signing_key, &message, signature) {
            tracing::debug!(device = %short_id(&device), "authentication failed");
            return refuse(ErrorCode::BadAuth, "bad signature");
        }
        self.authenticated(session, device, now_ms, actions)
    }

    fn register(
        &self,
        session: &mut Session,
        registration: hush_protocol::DeviceRegistration,
        signature: &[u8; 64],
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<Response, Refuse> {
        let SessionState::Challenged { device, challenge } =
            std::mem::replace(&mut session.state, SessionState::Start)
        else {
            return refuse(ErrorCode::BadAuth, "no challenge: send Hello first");
        };
        if registration.device != device {
            return refuse(
                ErrorCode::BadAuth,
                "registration is for another device than Hello",
            );
        }
        if !verify(
            registration.user.as_bytes(),
            &registration.certificate_bytes(),
            &registration.user_signature,
        ) {
            return refuse(ErrorCode::BadAuth, "bad device certificate signature");
        }
        let message = auth_challenge_bytes(&challenge, &device);
        if !verify(&registration.signing_key, &message, signature) {
            return refuse(ErrorCode::BadAuth, "bad signature");
        }
        self.store.register_device(&registration, now_ms)?;
        tracing::info!(device = %short_id(&device), "device registered");
        self.authenticated(session, device, now_ms, actions)
    }

    fn authenticated(
        &self,
        session: &mut Session,
        device: DeviceId,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<Response, Refuse> {
        let inbox = self.store.inbox_state(&device)?;
        let left = self.store.one_time_prekeys_left(&device)?;
        // The lease: a read, and a write at most once per granularity.
        let previous =
            self.store
                .touch_device(&device, now_ms, self.config.last_seen_granularity_ms())?;
        if let Some(last_seen_ms) = previous
            && now_ms.saturating_sub(last_seen_ms) >= self.config.stale_after_ms
        {
            // Sent after the Authenticated answer (that goes first).
            actions.push(Action::Send(ServerFrame::Retired { last_seen_ms }.into()));
        }
        session.state = SessionState::Authenticated { device };
        session.acked = inbox.acked;
        session.delivered = inbox.acked;
        session.live = false;
        if !session.sync_started {
            session.sync_started = true;
            Metrics::add(&self.metrics.sync_sessions_started_total, 1);
        }
        actions.insert(0, Action::Authenticated(device));
        Ok(Response::Authenticated(AuthOk {
            device,
            inbox_head: inbox.head,
            acked: inbox.acked,
            one_time_prekeys_left: left,
            relay_time_ms: now_ms,
        }))
    }

    fn send(
        &self,
        session: &mut Session,
        device: DeviceId,
        request_id: u32,
        envelopes: Vec<Envelope>,
        now_ms: u64,
    ) -> Result<Action, Refuse> {
        Metrics::add(&self.metrics.sends_total, envelopes.len() as u64);
        let normal_expiry = now_ms.saturating_add(self.config.retention_ms);
        let important_expiry = now_ms.saturating_add(
            self.config
                .retention_important_ms
                .max(self.config.retention_ms),
        );
        let mut slots = Vec::with_capacity(envelopes.len());
        let mut batch = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            let h = &env.header;
            let refused = |code, msg: String, retry: Option<u32>| {
                self.metrics.refused(code);
                let mut error = WireError::new(code, msg);
                error.retry_after_ms = retry;
                Slot::Done(SendOutcome::Refused {
                    message_id: h.message_id,
                    recipient: h.recipient_device,
                    error,
                })
            };
            if h.sender_device != device {
                slots.push(refused(
                    ErrorCode::Forbidden,
                    "sender device is not the authenticated device".into(),
                    None,
                ));
                continue;
            }
            let len = env.encoded_len();
            if len > self.config.max_envelope {
                slots.push(refused(
                    ErrorCode::TooLarge,
                    format!(
                        "envelope of {len} bytes exceeds {}",
                        self.config.max_envelope
                    ),
                    None,
                ));
                continue;
            }
            if let Err(wait) = session.bucket.take(now_ms) {
                slots.push(refused(
                    ErrorCode::RateLimited,
                    format!("over {} envelopes/s", self.config.send_rate),
                    Some(wait),
                ));
                continue;
            }
            let bytes = match env.to_bytes() {
                Ok(b) => b,
                Err(e) => {
                    slots.push(refused(ErrorCode::BadFrame, e.to_string(), None));
                    continue;
                }
            };
            slots.push(Slot::Batch {
                message_id: h.message_id,
                recipient: h.recipient_device,
            });
            batch.push(NewEnvelope {
                recipient: h.recipient_device,
                sender: h.sender_device,
                message_id: h.message_id,
                conversation: h.conversation_id,
                sender_seq: h.sender_seq,
                bytes,
                expires_at_ms: if h.important {
                    important_expiry
                } else {
                    normal_expiry
                },
            });
        }
        let ticket = SendTicket {
            request_id,
            slots,
            batch_len: batch.len(),
        };
        if batch.is_empty() {
            return Ok(Action::Send(
                self.finish_send(ticket, Ok(Vec::new())).into(),
            ));
        }
        Ok(Action::Commit(PendingSend {
            envelopes: batch,
            ticket,
        }))
    }

    /// After a page: the first time the session is live (caught up), its
    /// sync counts as finished, with its time from connect.
    fn note_sync(&self, session: &mut Session, now_ms: u64) {
        if session.live && session.sync_started && !session.sync_finished {
            session.sync_finished = true;
            Metrics::add(&self.metrics.sync_sessions_finished_total, 1);
            let ms = now_ms.saturating_sub(session.opened_at_ms);
            self.metrics
                .sync_catch_up_seconds
                .observe(ms as f64 / 1000.0);
        }
    }

    /// A `session` just authenticated, whose device acknowledged up to
    /// `up_to` on an earlier connection that may not have applied it yet:
    /// apply it, and move the session and the `AuthOk` still queued in
    /// `actions` to the cursor. Without this a device that reconnects at
    /// once would be told, and sent again, what it acknowledged on the
    /// connection it just left.
    pub fn adopt_ack(
        &self,
        session: &mut Session,
        up_to: u64,
        actions: &mut [Action],
    ) -> Result<(), StoreError> {
        let Some(device) = session.device() else {
            return Ok(());
        };
        self.store.ack(&device, up_to)?;
        let inbox = self.store.inbox_state(&device)?;
        session.acked = session.acked.max(inbox.acked);
        session.delivered = session.delivered.max(inbox.acked);
        for action in actions.iter_mut() {
            if let Action::Send(Outbound::Frame(ServerFrame::Response {
                response: Response::Authenticated(ok),
                ..
            })) = action
                && ok.device == device
            {
                ok.acked = ok.acked.max(session.acked);
                ok.inbox_head = ok.inbox_head.max(inbox.head);
            }
        }
        Ok(())
    }

    /// The connection of `session` ended: a sync that started but never
    /// caught up counts as failed.
    pub fn end_session(&self, session: &Session) {
        if session.sync_started && !session.sync_finished {
            Metrics::add(&self.metrics.sync_sessions_failed_total, 1);
        }
    }

    /// The `Sent` reply for a committed (or failed) batch: one outcome per
    /// envelope of the original request, in order.
    pub fn finish_send(
        &self,
        ticket: SendTicket,
        result: Result<Vec<CommitOutcome>, StoreError>,
    ) -> ServerFrame {
        let failure = match &result {
            Err(e) => {
                tracing::error!("commit failed: {e}");
                Some("storage failure; retry later")
            }
            Ok(v) if v.len() != ticket.batch_len => {
                tracing::error!(
                    "commit returned {} outcomes for {}",
                    v.len(),
                    ticket.batch_len
                );
                Some("storage failure; retry later")
            }
            Ok(_) => None,
        };
        let mut committed = result.unwrap_or_default().into_iter();
        let mut outcomes = Vec::with_capacity(ticket.slots.len());
        for slot in ticket.slots {
            let (message_id, recipient) = match slot {
                Slot::Done(o) => {
                    outcomes.push(o);
                    continue;
                }
                Slot::Batch {
                    message_id,
                    recipient,
                } => (message_id, recipient),
            };
            let refused = |code, msg: &str| {
                self.metrics.refused(code);
                SendOutcome::Refused {
                    message_id,
                    recipient,
                    error: WireError::new(code, msg),
                }
            };
            let outcome = match (failure, committed.next()) {
                (Some(msg), _) => refused(ErrorCode::Internal, msg),
                (None, None) => refused(ErrorCode::Internal, "storage failure; retry later"),
                (None, Some(CommitOutcome::Stored { seq })) => {
                    Metrics::add(&self.metrics.envelopes_stored_total, 1);
                    SendOutcome::Stored {
                        message_id,
                        recipient,
                        seq,
                        duplicate: false,
                    }
                }
                (None, Some(CommitOutcome::Duplicate { seq })) => {
                    Metrics::add(&self.metrics.duplicate_sends_total, 1);
                    SendOutcome::Stored {
                        message_id,
                        recipient,
                        seq,
                        duplicate: true,
                    }
                }
                (None, Some(CommitOutcome::Refused(r))) => match r {
                    Refusal::UnknownRecipient => refused(
                        ErrorCode::UnknownDevice,
                        "recipient device is not registered",
                    ),
                    Refusal::QuotaMessages => {
                        refused(ErrorCode::Quota, "recipient inbox is full (messages)")
                    }
                    Refusal::QuotaBytes => {
                        refused(ErrorCode::Quota, "recipient inbox is full (bytes)")
                    }
                    Refusal::StoreFull => {
                        refused(ErrorCode::StoreFull, "the relay's store is full")
                    }
                },
            };
            outcomes.push(outcome);
        }
        ServerFrame::Response {
            request_id: ticket.request_id,
            response: Response::Sent { outcomes },
        }
    }

    fn pull(
        &self,
        session: &mut Session,
        device: DeviceId,
        after: u64,
        limit: u16,
        ack: u64,
        actions: &mut Vec<Action>,
    ) -> Result<RawPage, Refuse> {
        if ack > 0 {
            let cursor = self.store.ack(&device, ack)?;
            session.acked = session.acked.max(cursor);
        }
        self.read_page(
            session,
            NextPage::of_pull(device, after, limit, 0),
            after,
            actions,
            None,
        )
    }

    /// The page of a `Pull`: envelopes above `at.after`, with `after` as
    /// the delivered cursor if the page is empty.
    fn read_page(
        &self,
        session: &mut Session,
        at: NextPage,
        after: u64,
        actions: &mut Vec<Action>,
        ahead: Option<ReadAhead>,
    ) -> Result<RawPage, Refuse> {
        let device = at.device;
        let page = match ahead {
            Some(ahead) if ahead.answers(at) => {
                Metrics::add(&self.metrics.read_ahead_used_total, 1);
                ahead
            }
            other => {
                if other.is_some() {
                    Metrics::add(&self.metrics.read_ahead_wasted_total, 1);
                }
                self.read_page_at(at)?
            }
        };
        if page.truncated.is_some() {
            Metrics::add(&self.metrics.truncations_total, 1);
        }
        session.delivered = page.envelopes.last().map_or(after, RawDelivered::seq);
        // A page is read from the store, so all of it is durable; the
        // device forgets what was pushed early when it pulls (see
        // docs/PROTOCOL.md §8.5), and the pushes start again from here.
        session.early_through = 0;
        session.durable_told = session.delivered;
        session.window_full = false;
        session.next_page = match page.envelopes.last() {
            Some(last) if page.remaining > 0 => Some(NextPage {
                after: last.seq(),
                ..at
            }),
            _ => None,
        };
        let was_live = session.live;
        session.live = page.remaining == 0;
        if session.live && !was_live {
            actions.push(Action::Live(device));
        }
        Ok(RawPage {
            envelopes: page.envelopes,
            remaining: page.remaining,
            truncated: page.truncated,
        })
    }

    /// Read the page `at` describes ahead of its `Pull` (see [`ReadAhead`]);
    /// `None` if the read failed (the `Pull` then reads again and reports
    /// the failure).
    pub fn read_ahead(&self, at: NextPage) -> Option<ReadAhead> {
        self.read_page_at(at).ok()
    }

    /// Read the page `at` describes, as a `Pull` does.
    fn read_page_at(&self, at: NextPage) -> Result<ReadAhead, Refuse> {
        let page = self
            .store
            .pull(&at.device, at.after, at.limit, MAX_PAGE_BYTES)?;
        Ok(ReadAhead {
            at,
            envelopes: check_stored(page.envelopes)?,
            remaining: page.remaining,
            truncated: page.truncated,
        })
    }

    /// [`RelayCore::handle`], except that the merged acknowledgement of an
    /// authenticated `Pull` is not applied but returned, for the caller to
    /// apply with [`RelayCore::apply_ack`] after sending the reply: the page
    /// does not depend on the deletion, so the deletion need not delay it.
    ///
    /// The reply is the one `handle` gives. Acking first would delete every
    /// envelope and tombstone up to the ack before reading, so the page is
    /// read above `max(after, ack)` instead, which skips exactly those; the
    /// session's acknowledged cursor moves as the ack will move it. Other
    /// requests go to `handle` unchanged.
    ///
    /// `ahead` is a page read ahead for this session; an authenticated
    /// `Pull` it answers (see [`ReadAhead::answers`]) is served from it
    /// without touching the store, so a caller may run that on an async
    /// thread. Otherwise it is dropped.
    pub fn handle_deferring_ack(
        &self,
        session: &mut Session,
        frame: ClientFrame,
        now_ms: u64,
        challenge: [u8; 32],
        ahead: Option<ReadAhead>,
    ) -> (Vec<Action>, Option<DeferredAck>) {
        let (Request::Pull { after, limit, ack }, Some(device)) =
            (&frame.request, session.device())
        else {
            if ahead.is_some() {
                Metrics::add(&self.metrics.read_ahead_wasted_total, 1);
            }
            return (self.handle(session, frame, now_ms, challenge), None);
        };
        let (after, limit, ack) = (*after, *limit, *ack);
        let at = NextPage::of_pull(device, after, limit, ack);
        let ahead = match ahead {
            Some(ahead) if ahead.answers(at) => Some(ahead),
            Some(_) => {
                Metrics::add(&self.metrics.read_ahead_wasted_total, 1);
                None
            }
            None => None,
        };
        if ack == 0 && ahead.is_none() {
            return (self.handle(session, frame, now_ms, challenge), None);
        }
        let id = frame.request_id;
        let mut actions = Vec::new();
        // The cursor the ack will leave (the head only grows meanwhile). A
        // page read ahead holds envelopes above `at.after`, which is at
        // least the ack, so the head is above the ack and the ack itself is
        // that cursor: served from memory, this touches no store.
        let acked = match ahead {
            Some(_) => Ok(ack),
            None => self
                .store
                .inbox_state(&device)
                .map(|state| state.acked.max(ack.min(state.head)))
                .map_err(Refuse::from),
        };
        let result = acked.and_then(|acked| {
            session.acked = session.acked.max(acked);
            let r = self.read_page(session, at, after, &mut actions, ahead);
            self.note_sync(session, now_ms);
            r
        });
        match result {
            Ok(page) => {
                actions.insert(
                    0,
                    Action::Send(Outbound::Page {
                        request_id: id,
                        page,
                    }),
                );
                let deferred = (ack > 0).then_some(DeferredAck { device, up_to: ack });
                (actions, deferred)
            }
            Err(Refuse(code, message)) => {
                // Nothing was sent: apply nothing either, as `handle` would
                // have failed before or at the ack.
                self.metrics.refused(code);
                (
                    vec![Action::Send(ServerFrame::error(id, code, message).into())],
                    None,
                )
            }
        }
    }

    /// Apply an acknowledgement deferred by
    /// [`RelayCore::handle_deferring_ack`]; returns the cursor now in force.
    pub fn apply_ack(&self, ack: DeferredAck) -> Result<u64, StoreError> {
        self.store.ack(&ack.device, ack.up_to)
    }

    /// Push `fresh` — envelopes just committed to the session's inbox, in
    /// seq order, the first one right after what it was last sent — as
    /// [`RelayCore::pump`] would have read them from the store, without
    /// reading the store. `None` if that is not exactly what `pump` would
    /// do (not live, not contiguous, more than the push window takes):
    /// then call `pump`. With `early`, `fresh` was written but its commit
    /// may not be durable yet: it goes out as `EarlyPush`, and only to a
    /// session that asked for early pushes.
    pub fn push_fresh(
        &self,
        session: &mut Session,
        fresh: Vec<RawDelivered>,
        early: bool,
    ) -> Option<Vec<Action>> {
        session.device()?;
        if early && !session.early {
            return None;
        }
        let first = fresh.first()?.seq();
        let contiguous = fresh.iter().zip(first..).all(|(e, seq)| e.seq() == seq);
        let outstanding = session.delivered.saturating_sub(session.acked);
        let room = self.config.push_window.saturating_sub(outstanding);
        if !session.live
            || first != session.delivered.saturating_add(1)
            || !contiguous
            || fresh.len() as u64 > room.min(u64::from(MAX_PAGE))
        {
            return None;
        }
        let bytes: usize = fresh.iter().map(|e| e.bytes().len()).sum();
        if bytes > MAX_PAGE_BYTES {
            return None;
        }
        session.window_full = false;
        session.delivered = fresh.last()?.seq();
        if early {
            session.early_through = session.delivered;
            return Some(vec![Action::Send(Outbound::EarlyPush(fresh))]);
        }
        Some(vec![Action::Send(Outbound::Push(fresh))])
    }

    /// Tell a session that asked for early pushes how far what it was
    /// pushed early is durable, now that the inbox's durable head is
    /// `head`: `Some(Durable)` when that moved. Never claims more than was
    /// pushed on this connection.
    pub fn durable_notice(&self, session: &mut Session, head: u64) -> Option<Action> {
        if !session.early || session.early_through <= session.durable_told {
            return None;
        }
        let through = head.min(session.early_through).min(session.delivered);
        if through <= session.durable_told {
            return None;
        }
        session.durable_told = through;
        Some(Action::Send(ServerFrame::Durable { through }.into()))
    }

    /// Push what was committed to a live session's inbox since it was last
    /// served, in relay-seq order, up to the push window. Call it whenever
    /// the device's inbox gains envelopes; it is cheap and idempotent.
    pub fn pump(&self, session: &mut Session) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(device) = session.device() else {
            return actions;
        };
        while session.live {
            let outstanding = session.delivered.saturating_sub(session.acked);
            let room = self.config.push_window.saturating_sub(outstanding);
            if room == 0 {
                session.window_full = true;
                break;
            }
            session.window_full = false;
            let limit = usize::try_from(room.min(u64::from(MAX_PAGE))).unwrap_or(1);
            let page = match self
                .store
                .pull(&device, session.delivered, limit, MAX_PAGE_BYTES)
            {
                Ok(p) => p,
                Err(e) => {
                    let Refuse(code, msg) = Refuse::from(e);
                    self.metrics.refused(code);
                    actions.push(Action::Send(ServerFrame::error(0, code, msg).into()));
                    session.live = false;
                    break;
                }
            };
            if page.truncated.is_some() {
                // Envelopes expired before they could be pushed: the client
                // must see the tombstones, which only a Pull carries.
                session.live = false;
                self.metrics.refused(ErrorCode::ExpiredCursor);
                actions.push(Action::Send(
                    ServerFrame::error(
                        0,
                        ErrorCode::ExpiredCursor,
                        "envelopes expired before delivery; pull to resynchronise",
                    )
                    .into(),
                ));
                break;
            }
            let envelopes = match check_stored(page.envelopes) {
                Ok(e) => e,
                Err(Refuse(code, msg)) => {
                    self.metrics.refused(code);
                    actions.push(Action::Send(ServerFrame::error(0, code, msg).into()));
                    session.live = false;
                    break;
                }
            };
            let Some(last) = envelopes.last() else {
                break;
            };
            session.delivered = last.seq();
            actions.push(Action::Send(Outbound::Push(envelopes)));
            if page.remaining == 0 {
                break;
            }
        }
        actions
    }

    /// `BlobPut`, `BlobStatus` and `BlobGet` (docs/PROTOCOL.md §8.6).
    fn blob_request(
        &self,
        device: DeviceId,
        request: Request,
        now_ms: u64,
    ) -> Result<Response, Refuse> {
        match request {
            Request::BlobPut {
                blob,
                offset,
                total_len,
                bytes,
            } => {
                let put = BlobWrite {
                    owner: device,
                    blob,
                    offset,
                    total_len,
                    bytes: &bytes,
                };
                let meta = self.store.blob_put(&put, &self.config.blobs, now_ms)?;
                Metrics::add(&self.metrics.blob_bytes_received_total, bytes.len() as u64);
                Ok(Response::BlobStored {
                    blob,
                    committed: meta.committed,
                })
            }
            Request::BlobStatus { blob } => match self.store.blob_read(&blob, 0, 0, now_ms)? {
                Some((meta, _)) => Ok(Response::BlobState {
                    blob,
                    total_len: meta.total_len,
                    committed: meta.committed,
                    expires_at_ms: meta.expires_at_ms,
                }),
                None => refuse(ErrorCode::UnknownBlob, "no such blob"),
            },
            Request::BlobGet { blob, offset, max } => {
                let max = usize::try_from(max).unwrap_or(MAX_BLOB_CHUNK);
                match self.store.blob_read(&blob, offset, max, now_ms)? {
                    Some((meta, _)) if offset > meta.committed => {
                        refuse(ErrorCode::UnknownBlob, "offset past the committed bytes")
                    }
                    Some((meta, bytes)) => {
                        Metrics::add(&self.metrics.blob_bytes_sent_total, bytes.len() as u64);
                        Ok(Response::BlobChunk {
                            blob,
                            offset,
                            total_len: meta.total_len,
                            committed: meta.committed,
                            bytes,
                        })
                    }
                    None => refuse(ErrorCode::UnknownBlob, "no such blob"),
                }
            }
            _ => refuse(ErrorCode::BadFrame, "not a blob request"),
        }
    }

    /// The refusal for a device with no registration: removed, or unknown.
    fn unknown_or_removed<T>(&self, device: &DeviceId) -> Result<T, Refuse> {
        if self.store.device_removed(device)?.is_some() {
            return refuse(
                ErrorCode::DeviceRemoved,
                "this device was removed by its user",
            );
        }
        refuse(ErrorCode::UnknownDevice, "device is not registered")
    }

    fn fetch_prekeys(&self, target: &DeviceId) -> Result<Response, Refuse> {
        if self.store.device(target)?.is_none() {
            return self.unknown_or_removed(target);
        }
        match self.store.take_prekey_bundle(target)? {
            Some(bundle) => Ok(Response::Prekeys(bundle)),
            None => refuse(ErrorCode::NoPrekeys, "device has published no prekeys"),
        }
    }

    fn publish_device_list(
        &self,
        publisher: &DeviceId,
        list: &SignedDeviceList,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<Response, Refuse> {
        let Some(record) = self.store.device(publisher)? else {
            return refuse(ErrorCode::UnknownDevice, "device is not registered");
        };
        if record.registration.user != list.list.user {
            return refuse(
                ErrorCode::Forbidden,
                "only a device of this user may publish its device list",
            );
        }
        let bytes = list
            .list
            .signing_bytes()
            .map_err(|e| Refuse(ErrorCode::BadFrame, e.to_string()))?;
        if !verify(list.list.user.as_bytes(), &bytes, &list.signature) {
            return refuse(ErrorCode::BadAuth, "bad device list signature");
        }
        // The user key vouches for the list, each device for its own entry:
        // without the device's proof any user could list another's device.
        for (i, entry) in list.list.devices.iter().enumerate() {
            let proof = entry.membership_bytes(&list.list.user);
            if !verify(&entry.signing_key, &proof, &entry.membership_signature) {
                return refuse(
                    ErrorCode::BadAuth,
                    format!("device list entry {i} has no valid membership proof by its device"),
                );
            }
        }
        // The list and the removal of the devices it drops, in one
        // transaction (see `Store::publish_device_list_removing`).
        let (version, removed) = self.store.publish_device_list_removing(list, now_ms)?;
        for device in removed {
            Metrics::add(&self.metrics.devices_removed_total, 1);
            tracing::info!(device = %short_id(&device), "device removed by its user");
            actions.push(Action::Evict(device));
        }
        Ok(Response::DeviceListPublished { version })
    }

    /// `FetchDeviceLeases`: the stored signed list and the relay's lease of
    /// each listed device (one read per entry, at most
    /// `MAX_DEVICES_PER_USER`).
    fn device_leases(
        &self,
        user: &hush_protocol::UserKey,
        now_ms: u64,
    ) -> Result<Response, Refuse> {
        let Some(list) = self.store.device_list(user)? else {
            return refuse(ErrorCode::UnknownDevice, "no device list for this user");
        };
        let mut leases = Vec::with_capacity(list.list.devices.len());
        for entry in &list.list.devices {
            let seen = self.store.device_last_seen(&entry.device)?;
            leases.push(hush_protocol::DeviceLease {
                device: entry.device,
                last_seen_ms: seen.unwrap_or(0),
                // Not registered here (or removed): nothing will read it.
                stale: seen.is_none_or(|t| now_ms.saturating_sub(t) >= self.config.stale_after_ms),
            });
        }
        Ok(Response::DeviceLeases { list, leases })
    }

    /// Count stale and removed devices into their gauges. Walks the
    /// devices: called from the retention loop, never per scrape.
    pub fn refresh_leases(&self, now_ms: u64) {
        let before = now_ms.saturating_sub(self.config.stale_after_ms);
        match self.store.lease_counts(before, &|_| true) {
            Ok(c) => {
                self.metrics.devices_stale.store(c.stale, Ordering::Relaxed);
                self.metrics
                    .devices_removed
                    .store(c.removed, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("counting device leases failed: {e}"),
        }
    }

    /// Sample the stored-envelope total into the inbox-depth gauge.
    pub fn refresh_depth(&self) {
        if let Ok(depth) = self.store.total_depth() {
            self.metrics.inbox_depth.store(depth, Ordering::Relaxed);
        }
        self.store_failure();
    }

    /// Why the store refuses every commit until a restart, if it does
    /// ([`Store::failure`]); also sets `hush_store_failed`.
    pub fn store_failure(&self) -> Option<String> {
        let failure = self.store.failure();
        self.metrics
            .store_failed
            .store(i64::from(failure.is_some()), Ordering::Relaxed);
        failure
    }
}

/// Check that stored envelopes decode, keeping their bytes as they are.
/// They were validated on the way in, so a failure means the store returned
/// something it was never given: refused here rather than sent on.
fn check_stored(stored: Vec<crate::store::StoredEnvelope>) -> Result<Vec<RawDelivered>, Refuse> {
    stored
        .into_iter()
        .map(|s| {
            RawDelivered::new(s.seq, s.bytes).map_err(|e| {
                tracing::error!(seq = s.seq, "stored envelope does not decode: {e}");
                Refuse(ErrorCode::Internal, "stored envelope unreadable".into())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
