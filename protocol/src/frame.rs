//! Frames: the requests a device sends and the replies and pushes it gets.
//!
//! A frame on a stream is `u32` big-endian length `N`, then `N` bytes: one
//! version byte ([`crate::PROTOCOL_VERSION`]) and a postcard-encoded
//! [`ClientFrame`] or [`ServerFrame`]. Postcard was chosen over a hand-written
//! codec for everything except the envelope header: its format is specified
//! (postcard wire format 1.0), compact (varints, no field names), works on
//! wasm32 and derives from the Rust types, so the types below *are* the
//! schema. Every decoded frame is then checked against [`crate::limits`].

use crate::PROTOCOL_VERSION;
use crate::envelope::{Envelope, NO_ONE_TIME_PREKEY};
use crate::error::{ErrorCode, ProtocolError, WireError, truncate_text};
use crate::ids::{BlobId, ConversationId, DeviceId, MessageId, UserKey};
use crate::limits::*;
use serde::{Deserialize, Serialize};

/// Domain-separation prefix of the connection-authentication signature.
pub const AUTH_DOMAIN: &[u8] = b"hush-auth-v1";

/// The bytes a device signs to prove it holds its key on this connection:
/// the domain prefix, the relay's fresh 32-byte challenge and the device id.
/// The challenge is random per connection, so a captured signature is useless
/// on any other connection.
pub fn auth_challenge_bytes(challenge: &[u8; 32], device: &DeviceId) -> Vec<u8> {
    let mut m = Vec::with_capacity(AUTH_DOMAIN.len() + 48);
    m.extend_from_slice(AUTH_DOMAIN);
    m.extend_from_slice(challenge);
    m.extend_from_slice(device.as_bytes());
    m
}

/// A request from a device, tagged with an id the reply echoes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Chosen by the client; echoed in the matching [`ServerFrame::Response`]
    /// or [`ServerFrame::Error`].
    pub request_id: u32,
    /// What is asked.
    pub request: Request,
}

/// A device's public keys and its certificate from the user identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRegistration {
    /// The new device.
    pub device: DeviceId,
    /// The user this device belongs to.
    pub user: UserKey,
    /// The device's Ed25519 public key (authenticates connections).
    pub signing_key: [u8; 32],
    /// The device's X25519 public key (session agreement).
    pub agreement_key: [u8; 32],
    /// The user identity's signature over [`DeviceRegistration::certificate_bytes`].
    #[serde(with = "sig_serde")]
    pub user_signature: [u8; 64],
}

/// Domain-separation prefix of a device certificate.
pub const DEVICE_CERT_DOMAIN: &[u8] = b"hush-device-cert-v1";

impl DeviceRegistration {
    /// What the user identity signs to vouch for this device.
    pub fn certificate_bytes(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(DEVICE_CERT_DOMAIN.len() + 112);
        m.extend_from_slice(DEVICE_CERT_DOMAIN);
        m.extend_from_slice(self.device.as_bytes());
        m.extend_from_slice(self.user.as_bytes());
        m.extend_from_slice(&self.signing_key);
        m.extend_from_slice(&self.agreement_key);
        m
    }
}

/// A signed prekey: a medium-term X25519 key signed by the device key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPrekey {
    /// Identifier chosen by the device.
    pub id: u32,
    /// X25519 public key.
    pub public: [u8; 32],
    /// Device signature over the key (checked by senders, not the relay).
    #[serde(with = "sig_serde")]
    pub signature: [u8; 64],
}

/// A one-time prekey: handed out to at most one sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimePrekey {
    /// Identifier chosen by the device.
    pub id: u32,
    /// X25519 public key.
    pub public: [u8; 32],
}

/// What a sender fetches to start a session with an offline device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrekeyBundle {
    /// The device the bundle belongs to.
    pub device: DeviceId,
    /// Its user (the sender checks this against the contact code).
    pub user: UserKey,
    /// The device's Ed25519 public key.
    pub signing_key: [u8; 32],
    /// The device's X25519 identity key.
    pub agreement_key: [u8; 32],
    /// The current signed prekey.
    pub signed_prekey: SignedPrekey,
    /// One one-time prekey, removed from the relay as it is handed out.
    pub one_time_prekey: Option<OneTimePrekey>,
}

/// One device in a user's device list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The device.
    pub device: DeviceId,
    /// Its Ed25519 public key.
    pub signing_key: [u8; 32],
    /// Its X25519 identity key.
    pub agreement_key: [u8; 32],
    /// The device's own Ed25519 signature (by `signing_key`) over
    /// [`membership_bytes`] for the list's user: proof that the device itself
    /// consents to being listed by that user, so no other user can list it.
    #[serde(with = "sig_serde")]
    pub membership_signature: [u8; 64],
}

/// Domain-separation prefix of a device's membership proof in a device list.
pub const DEVICE_MEMBERSHIP_DOMAIN: &[u8] = b"hush-device-member-v1";

/// The bytes a device signs with its own signing key to prove that it belongs
/// to `user`: the domain prefix, the user key, the device id and the device's
/// two public keys (all fixed lengths, 133 bytes).
pub fn membership_bytes(
    user: &UserKey,
    device: &DeviceId,
    signing_key: &[u8; 32],
    agreement_key: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(DEVICE_MEMBERSHIP_DOMAIN.len() + 112);
    m.extend_from_slice(DEVICE_MEMBERSHIP_DOMAIN);
    m.extend_from_slice(user.as_bytes());
    m.extend_from_slice(device.as_bytes());
    m.extend_from_slice(signing_key);
    m.extend_from_slice(agreement_key);
    m
}

impl DeviceEntry {
    /// [`membership_bytes`] of this entry in a list of `user`: what
    /// `membership_signature` must verify over with `signing_key`.
    pub fn membership_bytes(&self, user: &UserKey) -> Vec<u8> {
        membership_bytes(user, &self.device, &self.signing_key, &self.agreement_key)
    }
}

/// A user's devices, versioned so that a stale list never replaces a newer one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    /// The user.
    pub user: UserKey,
    /// Strictly increasing with every change.
    pub version: u64,
    /// The devices that should receive this user's messages.
    pub devices: Vec<DeviceEntry>,
}

/// Domain-separation prefix of a device-list signature.
pub const DEVICE_LIST_DOMAIN: &[u8] = b"hush-device-list-v1";

impl DeviceList {
    /// The bytes the user identity signs: the domain prefix and the postcard
    /// encoding of the list.
    pub fn signing_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut m = DEVICE_LIST_DOMAIN.to_vec();
        let body =
            postcard::to_allocvec(self).map_err(|_| ProtocolError::Malformed("device list"))?;
        m.extend_from_slice(&body);
        Ok(m)
    }
}

/// A device list with the user identity's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDeviceList {
    /// The list.
    pub list: DeviceList,
    /// Ed25519 signature by `list.user` over [`DeviceList::signing_bytes`].
    #[serde(with = "sig_serde")]
    pub signature: [u8; 64],
}

/// The requests. Until [`Request::Auth`] or [`Request::Register`] succeeds a
/// connection may only send `Hello`, `Auth`, `Register` and `Ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Start of a connection: which device wants to authenticate. The relay
    /// answers [`Response::Challenge`].
    Hello {
        /// The device.
        device: DeviceId,
    },
    /// Proof of key possession: Ed25519 signature over
    /// [`auth_challenge_bytes`] of this connection's challenge.
    Auth {
        /// The signature.
        #[serde(with = "sig_serde")]
        signature: [u8; 64],
    },
    /// Register a new device (after `Hello`) and authenticate it at once:
    /// `signature` is over [`auth_challenge_bytes`] with the new device key.
    Register {
        /// The device's keys and certificate.
        registration: DeviceRegistration,
        /// Proof of possession of `registration.signing_key`.
        #[serde(with = "sig_serde")]
        signature: [u8; 64],
    },
    /// Store envelopes in their recipients' inboxes.
    Send {
        /// At most [`MAX_BATCH`] envelopes.
        envelopes: Vec<Envelope>,
    },
    /// Fetch the next page of this device's inbox after relay seq `after`,
    /// first deleting everything up to `ack` (the merged acknowledgement of
    /// the previous page; 0 acknowledges nothing).
    Pull {
        /// Return envelopes with relay seq strictly greater than this.
        after: u64,
        /// At most [`MAX_PAGE`].
        limit: u16,
        /// Cumulative acknowledgement: delete envelopes with seq ≤ `ack`.
        ack: u64,
    },
    /// Cumulative acknowledgement of pushed envelopes (seq ≤ `up_to`).
    Ack {
        /// Highest relay seq stored by the device.
        up_to: u64,
    },
    /// Publish this device's signed prekey and add one-time prekeys.
    PublishPrekeys {
        /// Replaces the previous signed prekey.
        signed_prekey: SignedPrekey,
        /// Appended to the pool (at most [`MAX_ONE_TIME_PREKEYS`]).
        one_time_prekeys: Vec<OneTimePrekey>,
    },
    /// Fetch a prekey bundle of another device (consumes a one-time prekey).
    FetchPrekeys {
        /// The device to start a session with.
        device: DeviceId,
    },
    /// Publish this user's signed device list (must be newer than the stored one).
    PublishDeviceList {
        /// The list.
        list: SignedDeviceList,
    },
    /// Fetch a user's latest signed device list.
    FetchDeviceList {
        /// The user.
        user: UserKey,
    },
    /// Liveness probe; the relay answers [`Response::Pong`].
    Ping,
    /// Position 11. Append `bytes` to blob `blob` at `offset` (a history
    /// archive, see docs/CLIENT.md "History transfer"). The first put
    /// creates the blob, owned by the sending device, with its final size
    /// `total_len`; later puts must name the same `total_len`. Offsets are
    /// contiguous: `offset` must not exceed the committed length. A put
    /// that overlaps committed bytes must repeat them exactly (so a retry
    /// after a lost answer is idempotent). Answer: [`Response::BlobStored`].
    BlobPut {
        /// The blob: 16 random bytes chosen by the uploader.
        blob: BlobId,
        /// Where `bytes` start in the blob.
        offset: u64,
        /// The blob's complete size (at least 1).
        total_len: u64,
        /// At most [`MAX_BLOB_CHUNK`] bytes; `offset + len ≤ total_len`.
        bytes: Vec<u8>,
    },
    /// Position 12. How much of a blob is committed (the resume point of
    /// an upload or a download). Answer: [`Response::BlobState`].
    BlobStatus {
        /// The blob.
        blob: BlobId,
    },
    /// Position 13. Read up to `max` committed bytes of a blob from
    /// `offset`. Answer: [`Response::BlobChunk`].
    BlobGet {
        /// The blob.
        blob: BlobId,
        /// First byte wanted.
        offset: u64,
        /// At most [`MAX_BLOB_CHUNK`].
        max: u32,
    },
    /// Position 14. Fetch a user's latest signed device list together with
    /// the relay's lease of each listed device (last seen, stale). Answer:
    /// [`Response::DeviceLeases`]. The leases are the relay's word, not
    /// signed by anyone (see docs/SECURITY.md "Device lifecycle").
    FetchDeviceLeases {
        /// The user.
        user: UserKey,
    },
    /// Position 15. Ask for early pushes on this connection: from now on
    /// the relay may push an envelope as soon as its commit has written it,
    /// while the commit's sync is still running ([`ServerFrame::EarlyPush`]),
    /// and says with [`ServerFrame::Durable`] once it is durable. A live
    /// recipient then stores a message while the relay syncs it, one sync
    /// sooner. Answer: [`Response::EarlyPushes`]. See docs/PROTOCOL.md §8.5.
    EarlyPushes,
}

/// The relay's lease of one listed device: when it last authenticated and
/// whether that is longer ago than the relay's stale period. Unsigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceLease {
    /// The device (an entry of the list it comes with).
    pub device: DeviceId,
    /// When it last authenticated, ms since the Unix epoch, to the relay's
    /// write granularity (an hour by default); its registration time if it
    /// never authenticated since; 0 if the relay does not know it.
    pub last_seen_ms: u64,
    /// The relay considers it stale: not seen for its `--stale-after`
    /// period (or not registered there at all). Senders stop encrypting
    /// to a stale device.
    pub stale: bool,
}

/// A frame from the relay.
// Frames live only between decode and dispatch, so the size of the largest
// variant costs nothing worth a `Box` in the public API.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The reply to request `request_id`.
    Response {
        /// Echo of [`ClientFrame::request_id`].
        request_id: u32,
        /// The reply.
        response: Response,
    },
    /// A refusal of request `request_id` (0 when not tied to a request).
    Error {
        /// Echo of [`ClientFrame::request_id`], or 0.
        request_id: u32,
        /// What went wrong.
        error: WireError,
    },
    /// Envelopes committed to this device's inbox while it was live.
    Push {
        /// In relay-seq order, contiguous with what was pulled or pushed before.
        envelopes: Vec<Delivered>,
    },
    /// The relay is closing this connection.
    Closing {
        /// Why ([`ErrorCode::Replaced`], [`ErrorCode::ShuttingDown`], …).
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// Unsolicited, to an authenticated device: its pool of one-time
    /// prekeys at the relay has fallen to a low level (or is empty) because
    /// other devices fetched bundles. The device should publish fresh ones.
    PrekeysLow {
        /// One-time prekeys the relay still holds for this device.
        one_time_prekeys_left: u32,
    },
    /// Position 5. Unsolicited, right after a successful authentication:
    /// this device had not been seen for longer than the relay's stale
    /// period, so it was reported stale to its peers and senders stopped
    /// encrypting to it. It syncs what its inbox still holds; what was sent
    /// while it was stale never reached it.
    Retired {
        /// When the relay had last seen it before this connection, ms since
        /// the Unix epoch.
        last_seen_ms: u64,
    },
    /// Position 6. Envelopes written to this device's inbox whose commit
    /// may not be durable yet (only after [`Request::EarlyPushes`]). The
    /// device may store and show them, but must not count them in its
    /// cursor or acknowledge them before a [`ServerFrame::Durable`] covers
    /// them: if the relay stops before the commit is durable, it may give
    /// the same seqs to other envelopes.
    EarlyPush {
        /// In relay-seq order, contiguous with what was pulled or pushed before.
        envelopes: Vec<Delivered>,
    },
    /// Position 7. Everything pushed to this connection up to relay seq
    /// `through` is durable (only after [`Request::EarlyPushes`]).
    Durable {
        /// Highest durable relay seq among those pushed.
        through: u64,
    },
}

/// An envelope in an inbox, with the relay seq it was committed under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Per-inbox contiguous sequence number assigned at commit.
    pub seq: u64,
    /// The envelope exactly as the sender sent it.
    pub envelope: Envelope,
}

/// The fate of one envelope of a `Send` batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendOutcome {
    /// Durably committed (or already committed earlier: `duplicate`).
    Stored {
        /// The envelope's message id.
        message_id: MessageId,
        /// The inbox it went to.
        recipient: DeviceId,
        /// Its relay seq in that inbox.
        seq: u64,
        /// True if this was a retry of an envelope already stored.
        duplicate: bool,
    },
    /// Not stored; nothing of it was written.
    Refused {
        /// The envelope's message id.
        message_id: MessageId,
        /// The inbox it was meant for.
        recipient: DeviceId,
        /// Why.
        error: WireError,
    },
}

/// A sender-seq range that expired from an inbox before it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedRange {
    /// The sending device.
    pub sender: DeviceId,
    /// The conversation.
    pub conversation: ConversationId,
    /// First dropped sender seq (inclusive).
    pub first_seq: u64,
    /// Last dropped sender seq (inclusive).
    pub last_seq: u64,
}

/// Attached to a page when the cursor predates retained data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncation {
    /// Lowest relay seq the relay still holds (or would assign next).
    pub oldest_retained: u64,
    /// How many envelopes expired unread.
    pub dropped_count: u64,
    /// What expired, from tombstones kept at purge time (at most
    /// [`MAX_DROPPED_RANGES`]; the client asks those senders to resend).
    pub dropped: Vec<DroppedRange>,
}

/// A page of an inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Envelopes in relay-seq order.
    pub envelopes: Vec<Delivered>,
    /// How many envelopes remain after this page ("syncing N of M").
    pub remaining: u64,
    /// Set when `after` was older than the oldest retained envelope.
    pub truncated: Option<Truncation>,
}

/// Result of a successful authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthOk {
    /// The authenticated device.
    pub device: DeviceId,
    /// Highest relay seq committed to this inbox so far.
    pub inbox_head: u64,
    /// Highest relay seq this device has acknowledged.
    pub acked: u64,
    /// One-time prekeys this device still has on the relay.
    pub one_time_prekeys_left: u32,
    /// The relay's clock, ms since the Unix epoch (informational).
    pub relay_time_ms: u64,
}

/// The replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Hello`: sign this with the device key.
    Challenge {
        /// 32 fresh random bytes, unique to this connection.
        challenge: [u8; 32],
    },
    /// Answer to `Auth` or `Register`.
    Authenticated(AuthOk),
    /// Answer to `Send`: one outcome per envelope, in order.
    Sent {
        /// Outcomes in the order of the request's envelopes.
        outcomes: Vec<SendOutcome>,
    },
    /// Answer to `Pull`.
    Page(Page),
    /// Answer to `Ack`.
    Acked {
        /// The cumulative ack now in force.
        up_to: u64,
    },
    /// Answer to `PublishPrekeys`.
    PrekeysPublished {
        /// One-time prekeys now available.
        one_time_prekeys_left: u32,
    },
    /// Answer to `FetchPrekeys`.
    Prekeys(PrekeyBundle),
    /// Answer to `PublishDeviceList`.
    DeviceListPublished {
        /// The version now stored.
        version: u64,
    },
    /// Answer to `FetchDeviceList`.
    DeviceList(SignedDeviceList),
    /// Answer to `Ping`.
    Pong {
        /// The relay's clock, ms since the Unix epoch.
        relay_time_ms: u64,
    },
    /// Position 10. Answer to `BlobPut`.
    BlobStored {
        /// The blob.
        blob: BlobId,
        /// Bytes of the blob now committed (durably).
        committed: u64,
    },
    /// Position 11. Answer to `BlobStatus`.
    BlobState {
        /// The blob.
        blob: BlobId,
        /// Its declared complete size.
        total_len: u64,
        /// Bytes committed so far (`committed == total_len`: complete).
        committed: u64,
        /// When the relay deletes it, ms since the Unix epoch.
        expires_at_ms: u64,
    },
    /// Position 12. Answer to `BlobGet`.
    BlobChunk {
        /// The blob.
        blob: BlobId,
        /// Where `bytes` start.
        offset: u64,
        /// Its declared complete size.
        total_len: u64,
        /// Bytes committed so far.
        committed: u64,
        /// At most [`MAX_BLOB_CHUNK`] bytes (empty at or past `committed`).
        bytes: Vec<u8>,
    },
    /// Position 13. Answer to `FetchDeviceLeases`: the signed list as stored
    /// and one lease per listed device, in list order.
    DeviceLeases {
        /// The user's latest signed device list.
        list: SignedDeviceList,
        /// At most [`MAX_DEVICES_PER_USER`] leases.
        leases: Vec<DeviceLease>,
    },
    /// Position 14. Answer to `EarlyPushes`: early pushes are on.
    EarlyPushes,
}

fn too_large(what: &'static str, len: usize, max: usize) -> Result<(), ProtocolError> {
    if len > max {
        Err(ProtocolError::TooLarge { what, len, max })
    } else {
        Ok(())
    }
}

impl ClientFrame {
    /// Check the limits postcard cannot express.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match &self.request {
            Request::Send { envelopes } => {
                too_large("send batch", envelopes.len(), MAX_BATCH)?;
                envelopes.iter().try_for_each(Envelope::check)
            }
            Request::Pull { limit, .. } => {
                too_large("page limit", usize::from(*limit), usize::from(MAX_PAGE))
            }
            Request::PublishPrekeys {
                one_time_prekeys, ..
            } => {
                too_large(
                    "one-time prekeys",
                    one_time_prekeys.len(),
                    MAX_ONE_TIME_PREKEYS,
                )?;
                if one_time_prekeys.iter().any(|k| k.id == NO_ONE_TIME_PREKEY) {
                    return Err(ProtocolError::Malformed("reserved one-time prekey id"));
                }
                Ok(())
            }
            Request::PublishDeviceList { list } => {
                too_large("device list", list.list.devices.len(), MAX_DEVICES_PER_USER)
            }
            Request::BlobPut {
                offset,
                total_len,
                bytes,
                ..
            } => {
                too_large("blob chunk", bytes.len(), MAX_BLOB_CHUNK)?;
                if *total_len == 0 {
                    return Err(ProtocolError::Malformed("empty blob"));
                }
                let end = offset.checked_add(bytes.len() as u64);
                if end.is_none_or(|end| end > *total_len) {
                    return Err(ProtocolError::Malformed("blob chunk past total_len"));
                }
                Ok(())
            }
            Request::BlobGet { max, .. } => too_large("blob read", *max as usize, MAX_BLOB_CHUNK),
            _ => Ok(()),
        }
    }
}

impl ServerFrame {
    /// Check the limits postcard cannot express.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            ServerFrame::Push { envelopes } | ServerFrame::EarlyPush { envelopes } => {
                too_large("push", envelopes.len(), usize::from(MAX_PAGE))
            }
            ServerFrame::Response { response, .. } => match response {
                Response::Page(p) => {
                    too_large("page", p.envelopes.len(), usize::from(MAX_PAGE))?;
                    if let Some(t) = &p.truncated {
                        too_large("dropped ranges", t.dropped.len(), MAX_DROPPED_RANGES)?;
                    }
                    Ok(())
                }
                Response::Sent { outcomes } => {
                    too_large("send outcomes", outcomes.len(), MAX_BATCH)?;
                    outcomes.iter().try_for_each(|o| match o {
                        SendOutcome::Refused { error, .. } => {
                            too_large("text", error.message.len(), MAX_TEXT_LEN)
                        }
                        SendOutcome::Stored { .. } => Ok(()),
                    })
                }
                Response::DeviceList(l) => {
                    too_large("device list", l.list.devices.len(), MAX_DEVICES_PER_USER)
                }
                Response::BlobChunk { bytes, .. } => {
                    too_large("blob chunk", bytes.len(), MAX_BLOB_CHUNK)
                }
                Response::DeviceLeases { list, leases } => {
                    too_large("device list", list.list.devices.len(), MAX_DEVICES_PER_USER)?;
                    too_large("device leases", leases.len(), MAX_DEVICES_PER_USER)
                }
                _ => Ok(()),
            },
            ServerFrame::Error { error, .. } => {
                too_large("text", error.message.len(), MAX_TEXT_LEN)
            }
            ServerFrame::Closing { reason, .. } => too_large("text", reason.len(), MAX_TEXT_LEN),
            ServerFrame::PrekeysLow { .. }
            | ServerFrame::Retired { .. }
            | ServerFrame::Durable { .. } => Ok(()),
        }
    }

    /// A refusal frame (message cut to the text limit).
    pub fn error(request_id: u32, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            request_id,
            error: WireError::new(code, message),
        }
    }

    /// A closing frame (reason cut to the text limit).
    pub fn closing(code: ErrorCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        truncate_text(&mut reason);
        ServerFrame::Closing { code, reason }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    // Reserve the length prefix and the version byte, then append the body
    // into a vector of the exact final size: a page of envelopes grown from
    // empty would be copied through a series of ever larger allocations.
    let size = postcard::experimental::serialized_size(value)
        .map_err(|_| ProtocolError::Malformed("unencodable value"))?;
    too_large("frame", size.saturating_add(1), MAX_FRAME_LEN)?;
    let mut out = Vec::with_capacity(5 + size);
    out.extend_from_slice(&[0, 0, 0, 0, PROTOCOL_VERSION]);
    let out_vec = postcard::to_extend(value, core::mem::take(&mut out))
        .map_err(|_| ProtocolError::Malformed("unencodable value"))?;
    out = out_vec;
    let body_len = out.len() - 4;
    too_large("frame", body_len, MAX_FRAME_LEN)?;
    let len = u32::try_from(body_len).map_err(|_| ProtocolError::TooLarge {
        what: "frame",
        len: body_len,
        max: MAX_FRAME_LEN,
    })?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Encode a request as a complete frame (length prefix included).
pub fn encode_client_frame(frame: &ClientFrame) -> Result<Vec<u8>, ProtocolError> {
    frame.validate()?;
    encode(frame)
}

/// Encode a relay frame as a complete frame (length prefix included).
pub fn encode_server_frame(frame: &ServerFrame) -> Result<Vec<u8>, ProtocolError> {
    frame.validate()?;
    encode(frame)
}

/// Split off the version byte of a frame body and decode the rest.
fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ProtocolError> {
    too_large("frame", body.len(), MAX_FRAME_LEN)?;
    let (&version, rest) = body
        .split_first()
        .ok_or(ProtocolError::Truncated { needed: 1 })?;
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(version));
    }
    let (value, extra) = postcard::take_from_bytes::<T>(rest).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => ProtocolError::Truncated { needed: 1 },
        _ => ProtocolError::Malformed("frame body"),
    })?;
    if !extra.is_empty() {
        return Err(ProtocolError::TrailingBytes(extra.len()));
    }
    Ok(value)
}

/// Decode a frame body (after the length prefix) into a request.
pub fn decode_client_body(body: &[u8]) -> Result<ClientFrame, ProtocolError> {
    let f: ClientFrame = decode_body(body)?;
    f.validate()?;
    Ok(f)
}

/// Decode a frame body (after the length prefix) into a relay frame.
pub fn decode_server_body(body: &[u8]) -> Result<ServerFrame, ProtocolError> {
    let f: ServerFrame = decode_body(body)?;
    f.validate()?;
    Ok(f)
}

/// Split a complete frame (length prefix included) into its body.
fn split_frame(bytes: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut buf = FrameBuffer::new();
    buf.extend(bytes);
    let len = buf.peek_len()?.ok_or(ProtocolError::Truncated {
        needed: 4usize.saturating_sub(bytes.len()),
    })?;
    let total = 4 + len;
    match bytes.len().cmp(&total) {
        std::cmp::Ordering::Less => Err(ProtocolError::Truncated {
            needed: total - bytes.len(),
        }),
        std::cmp::Ordering::Greater => Err(ProtocolError::TrailingBytes(bytes.len() - total)),
        std::cmp::Ordering::Equal => Ok(&bytes[4..]),
    }
}

/// Decode one complete request frame (length prefix included, nothing after).
pub fn decode_client_frame(bytes: &[u8]) -> Result<ClientFrame, ProtocolError> {
    decode_client_body(split_frame(bytes)?)
}

/// Decode one complete relay frame (length prefix included, nothing after).
pub fn decode_server_frame(bytes: &[u8]) -> Result<ServerFrame, ProtocolError> {
    decode_server_body(split_frame(bytes)?)
}

/// Incremental frame splitter for a byte stream (sans IO: feed it what the
/// transport delivered, take out complete frame bodies).
///
/// A declared length above [`MAX_FRAME_LEN`] is an error as soon as the four
/// length bytes arrive, before any of the body is buffered.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    /// Bytes of `buf` before this were already returned as frames. Taking
    /// a frame only moves this mark; the consumed prefix is dropped once,
    /// when more bytes arrive, so a read holding many frames costs one
    /// move of its incomplete tail instead of one move per frame.
    start: usize,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes received from the transport.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes not yet returned as frames.
    fn pending(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.pending().len()
    }

    fn peek_len(&self) -> Result<Option<usize>, ProtocolError> {
        let Some(prefix) = self.pending().get(..4) else {
            return Ok(None);
        };
        let mut b = [0u8; 4];
        b.copy_from_slice(prefix);
        let len = u32::from_be_bytes(b) as usize;
        too_large("frame", len, MAX_FRAME_LEN)?;
        if len == 0 {
            return Err(ProtocolError::Malformed("empty frame"));
        }
        Ok(Some(len))
    }

    /// How many more bytes are needed before the next frame is complete
    /// (a transport can read exactly that much).
    pub fn wanted(&self) -> Result<usize, ProtocolError> {
        let buffered = self.buffered();
        Ok(match self.peek_len()? {
            None => 4 - buffered,
            Some(len) => (4 + len).saturating_sub(buffered),
        })
    }

    /// The next complete frame body (version byte + payload) in place, and
    /// consumes it; `None` until it is complete.
    fn take_body(&mut self) -> Result<Option<&[u8]>, ProtocolError> {
        let Some(len) = self.peek_len()? else {
            return Ok(None);
        };
        let at = self.start;
        let Some(body) = self.buf.get(at + 4..at + 4 + len) else {
            return Ok(None);
        };
        self.start = at + 4 + len;
        Ok(Some(body))
    }

    /// The next complete frame body (version byte + payload), if any.
    pub fn next_body(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        Ok(self.take_body()?.map(<[u8]>::to_vec))
    }

    /// The next complete request, if any (decoded in place, without copying
    /// the body first).
    pub fn next_client_frame(&mut self) -> Result<Option<ClientFrame>, ProtocolError> {
        self.take_body()?.map(decode_client_body).transpose()
    }

    /// The next complete relay frame, if any.
    pub fn next_server_frame(&mut self) -> Result<Option<ServerFrame>, ProtocolError> {
        self.take_body()?.map(decode_server_body).transpose()
    }
}

/// serde for 64-byte signatures (serde derives arrays only up to 32).
/// Encoded as a byte string; accepts borrowed, owned and sequence forms so
/// the types also work with self-describing formats in client storage.
mod sig_serde {
    use serde::{Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(sig)
    }

    struct V;

    impl<'de> serde::de::Visitor<'de> for V {
        type Value = [u8; 64];
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a 64-byte signature")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<[u8; 64], E> {
            <[u8; 64]>::try_from(v).map_err(|_| E::invalid_length(v.len(), &self))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<[u8; 64], A::Error> {
            let mut out = [0u8; 64];
            for (i, b) in out.iter_mut().enumerate() {
                *b = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(i, &self))?;
            }
            if a.next_element::<u8>()?.is_some() {
                return Err(A::Error::invalid_length(65, &self));
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error as ValueError, SeqDeserializer};

    fn sig_from_seq(items: Vec<u8>) -> Result<[u8; 64], ValueError> {
        sig_serde::deserialize(SeqDeserializer::<_, ValueError>::new(items.into_iter()))
    }

    #[test]
    fn signatures_also_decode_from_sequences() {
        // Self-describing formats (client storage) may present bytes as a sequence.
        assert_eq!(sig_from_seq(vec![7; 64]), Ok([7; 64]));
        assert!(sig_from_seq(vec![7; 63]).is_err());
        assert!(sig_from_seq(vec![7; 65]).is_err());
    }

    #[test]
    fn signatures_are_length_prefixed_byte_strings() {
        let f = ClientFrame {
            request_id: 1,
            request: Request::Auth { signature: [3; 64] },
        };
        let body = postcard::to_allocvec(&f).unwrap_or_default();
        assert_eq!(&body[..3], &[1, 1, 64]);
        assert_eq!(body.len(), 3 + 64);
    }

    #[test]
    fn split_frame_reports_what_is_missing() {
        assert_eq!(
            split_frame(&[]),
            Err(ProtocolError::Truncated { needed: 4 })
        );
        assert_eq!(
            split_frame(&[0, 0]),
            Err(ProtocolError::Truncated { needed: 2 })
        );
        assert_eq!(
            split_frame(&[0, 0, 0, 3, 1]),
            Err(ProtocolError::Truncated { needed: 2 })
        );
        assert_eq!(split_frame(&[0, 0, 0, 1, 1]), Ok(&[1u8][..]));
        assert_eq!(
            split_frame(&[0, 0, 0, 1, 1, 9]),
            Err(ProtocolError::TrailingBytes(1))
        );
    }

    #[test]
    fn frame_buffer_keeps_bytes_of_the_next_frame() {
        let a = encode_client_frame(&ClientFrame {
            request_id: 1,
            request: Request::Ping,
        })
        .unwrap_or_default();
        let b = encode_client_frame(&ClientFrame {
            request_id: 2,
            request: Request::Ack { up_to: 9 },
        })
        .unwrap_or_default();
        let mut buf = FrameBuffer::new();
        buf.extend(&a);
        buf.extend(&b[..3]);
        assert_eq!(buf.next_body(), Ok(Some(a[4..].to_vec())));
        assert_eq!(buf.buffered(), 3);
        assert_eq!(buf.wanted(), Ok(1));
        assert_eq!(buf.next_body(), Ok(None));
        buf.extend(&b[3..]);
        assert_eq!(buf.next_body(), Ok(Some(b[4..].to_vec())));
        assert_eq!(buf.buffered(), 0);
    }

    #[test]
    fn auth_challenge_bytes_bind_challenge_and_device() {
        let m = auth_challenge_bytes(&[1; 32], &DeviceId([2; 16]));
        assert_eq!(m.len(), AUTH_DOMAIN.len() + 32 + 16);
        assert!(m.starts_with(AUTH_DOMAIN));
        assert_ne!(m, auth_challenge_bytes(&[1; 32], &DeviceId([3; 16])));
    }
}
