//! The records the engine persists (one per storage key, see
//! [`crate::storage::keys`]) and the public types the app reads back.
//!
//! Everything here derives serde and is written with postcard. Records that
//! hold secrets implement `Debug` by hand and never print them.

use hush_crypto::{DeviceIdentity, PrekeySecrets, Session, UserIdentity};
use hush_protocol::{ConversationId, DeviceId, MessageId, SignedDeviceList, UserKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use crate::payload::Payload;

/// Delivery state of a message this user sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MessageState {
    /// Written to the outbox; not yet confirmed by the relay for every device.
    Sending,
    /// The relay durably stored it for every target device.
    Stored,
    /// At least one device of the recipient stored it.
    Delivered,
    /// The recipient read it.
    Read,
    /// The relay did not confirm it within the retry budget (~5 minutes);
    /// `Command::Retry` sends it again with the same id.
    Failed,
    /// The relay refused it because a recipient device's inbox is full
    /// (`ErrorCode::Quota`); it is retried automatically with backoff and
    /// becomes `Stored` once the relay takes it. Never turns `Failed` on
    /// its own: it waits for the recipient to drain its inbox.
    RecipientInboxFull,
}

/// Why a message disappeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Removal {
    /// Its sender recalled it (delete for everyone).
    Recalled,
    /// This user deleted it (on this or another of their devices).
    Deleted,
}

/// A removed message. Kept so that the removal also applies if the message
/// itself arrives later (a recall overtaking its target is never an orphan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// How it was removed.
    pub reason: Removal,
    /// Its conversation.
    pub conversation: ConversationId,
    /// When the removal was applied here (ms).
    pub at_ms: u64,
}

/// `s/recall/<conv 16><author user 32><msg 16>`: a recall, keyed by who
/// may make it. It removes only the message with that id in that
/// conversation written by that user (on any of their devices), whether
/// the message came before or comes after it. (Tombstones under `s/tomb/`
/// are keyed by id alone: only this user's own deletes, and recalls
/// written by earlier versions, are kept there.)
pub(crate) const RECALL: &[u8] = b"s/recall/";
/// `s/mine/<conv 16><msg 16>`: a message this user wrote (here or on another
/// of their devices), kept as long as recalls are honoured, so a contact's
/// recall naming it is refused.
pub(crate) const MINE: &[u8] = b"s/mine/";

pub(crate) fn recall_key(conv: &ConversationId, author: &UserKey, id: &MessageId) -> Vec<u8> {
    let mut k = RECALL.to_vec();
    k.extend_from_slice(conv.as_bytes());
    k.extend_from_slice(author.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn mine_key(conv: &ConversationId, id: &MessageId) -> Vec<u8> {
    let mut k = MINE.to_vec();
    k.extend_from_slice(conv.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// One message in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Logical message id.
    pub id: MessageId,
    /// Its conversation.
    pub conversation: ConversationId,
    /// The user who wrote it.
    pub from_user: UserKey,
    /// The device that wrote it.
    pub from_device: DeviceId,
    /// Its sender seq in the stream it reached this device by (0 for messages
    /// written on this device).
    pub sender_seq: u64,
    /// The author's clock when written (display only; never used for order).
    pub sent_at_ms: u64,
    /// This device's clock when it was stored.
    pub stored_at_ms: u64,
    /// The text.
    pub text: String,
    /// Written by this user (on this or another of their devices).
    pub outgoing: bool,
}

/// A 32-byte key that never shows in `Debug`.
#[derive(Clone, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub(crate) struct SecretKey(pub [u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `s/device`: who this device is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DeviceRecord {
    pub device: DeviceId,
    pub identity: DeviceIdentity,
    pub user: UserIdentity,
    pub relay: String,
    pub name: String,
    /// The relay confirmed our registration.
    pub registered: bool,
    /// Key sealing outbox payloads at rest.
    pub at_rest: SecretKey,
    /// When set, a new device still has to introduce itself to this inviter.
    pub link: Option<PendingLink>,
}

/// A new device's pending introduction to the device that made its code.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct PendingLink {
    pub inviter: DeviceId,
    pub token: [u8; 16],
    /// The LinkHello was queued in the outbox.
    pub hello_sent: bool,
}

impl std::fmt::Debug for PendingLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLink")
            .field("inviter", &self.inviter)
            .field("hello_sent", &self.hello_sent)
            .finish_non_exhaustive()
    }
}

/// `s/prekeys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PrekeyRecord {
    pub secrets: PrekeySecrets,
    /// Signed prekey id the relay confirmed last.
    pub published_signed: Option<u32>,
    /// One-time prekeys generated but not yet confirmed by the relay.
    pub unpublished: Vec<(u32, [u8; 32])>,
}

/// `s/cursor`: every relay seq up to `through` is durably handled here.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Cursor {
    pub through: u64,
}

/// `s/counters`: what the app can read through `Engine::counters`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Envelopes dropped because their sender seq was already handled.
    pub duplicates_dropped: u64,
    /// Chat messages that arrived ahead of a missing predecessor and were held.
    pub out_of_order: u64,
    /// Missing sender seqs detected (each counted once).
    pub gaps_detected: u64,
    /// Missing sender seqs that later arrived.
    pub recovered: u64,
    /// Missing chat messages their sender could not re-send.
    pub unrecoverable: u64,
    /// Envelopes that could not be decrypted or made no sense (dropped).
    pub rejected: u64,
    /// Resend requests answered by re-sending from the outbox.
    pub resent: u64,
    /// Tail probes sent (re-sends of an unreceipted stream tail).
    pub probes: u64,
    /// Chat messages suppressed because a recall or delete arrived first.
    pub suppressed: u64,
    /// Next history order number (internal).
    pub next_order: u64,
    /// Next outbox creation number (internal).
    pub next_local: u64,
    /// Relay claims not taken on the relay's word: "expired" sender seqs
    /// above what that sender ever authenticated to this device (a hostile
    /// relay, or the honest expiry of a stream's whole tail). They are only
    /// asked of the sender.
    pub relay_claims_ignored: u64,
    /// Peer control items not acted on: resend requests for seqs this device
    /// never sent, "unavailable" answers for seqs the peer never sent.
    pub peer_claims_ignored: u64,
    /// Envelopes from unknown sender devices dropped because the parking
    /// space (per device or in total) was full.
    pub parked_dropped: u64,
    /// Recalls not applied because the recalling user is not the author of
    /// the message they named.
    pub recalls_refused: u64,
    /// Of the rejected envelopes, those dropped unopened because opening
    /// them would have needed expensive work (a new ratchet key, a new
    /// generation, a large skip) and their sender device's budget for
    /// failed attempts was spent (`EngineConfig::open_budget`). Their seqs
    /// are not recorded, so a real one is requested again as a gap.
    pub undecryptable_skipped: u64,
    /// Seqs a relay reported expired that their sender then said it never
    /// wrote: proven relay misbehaviour (each raised a `RelayMisbehaviour`
    /// event).
    pub relay_claims_refuted: u64,
    /// Sends the relay refused because a recipient device's inbox was full
    /// (each refused transmission counts; they are retried).
    pub inbox_full_refusals: u64,
    /// Connections that caught up with the relay (backlog drained, live).
    pub syncs: u64,
    /// Sum over `syncs` of the time from connect to caught up, ms: the
    /// average sync latency is `sync_latency_ms_total / syncs`.
    pub sync_latency_ms_total: u64,
    /// Connect → caught up of the latest sync, ms.
    pub last_sync_latency_ms: u64,
    /// Device lists a contact (or this user's other device) sent after
    /// removing a device that were newer than the one held, and kept.
    pub list_notices: u64,
    /// Device lists the relay served that were older than the one held
    /// (a relay hiding a removal, or lagging): ignored.
    pub old_lists_ignored: u64,
    /// `Retired` notices: the relay had counted this device stale.
    pub retired: u64,
    /// Times this device learned its user had removed it (0 or 1).
    pub removed: u64,
}

/// Counters added after the first release, all at the end: a record written
/// by an older build lacks them.
const COUNTERS_ADDED: usize = 14;

impl Counters {
    /// Decode `s/counters`, also as written by an older build with fewer
    /// (trailing) counters: each counter is one postcard varint, a missing
    /// one reads as a zero byte, and bytes past the last field are ignored.
    pub(crate) fn decode(key: &[u8], bytes: &[u8]) -> Result<Self, crate::error::StorageError> {
        let mut padded = Vec::with_capacity(bytes.len() + COUNTERS_ADDED);
        padded.extend_from_slice(bytes);
        padded.resize(bytes.len() + COUNTERS_ADDED, 0);
        crate::storage::decode(key, &padded)
    }
}

/// A verified device list plus bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct KnownDevices {
    /// Highest verified list seen (never replaced by a lower version).
    pub list: Option<SignedDeviceList>,
    /// When it was last fetched (or confirmed unchanged).
    pub fetched_ms: Option<u64>,
}

impl KnownDevices {
    pub fn devices(&self) -> impl Iterator<Item = &hush_protocol::DeviceEntry> {
        self.list.iter().flat_map(|l| l.list.devices.iter())
    }

    pub fn contains(&self, d: &DeviceId) -> bool {
        self.devices().any(|e| e.device == *d)
    }

    pub fn version(&self) -> u64 {
        self.list.as_ref().map_or(0, |l| l.list.version)
    }
}

/// `s/own`: this user's devices.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct OwnDevices {
    pub known: KnownDevices,
    /// A list we signed that the relay has not confirmed yet.
    pub to_publish: Option<SignedDeviceList>,
}

/// `s/contact/<user>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Contact {
    pub user: UserKey,
    pub relay: String,
    pub name: String,
    pub conversation: ConversationId,
    pub known: KnownDevices,
}

/// One ratchet session with a peer device and how it started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SessionEntry {
    pub session: Session,
    /// The device that ran X3DH as initiator.
    pub initiator: DeviceId,
    /// The X3DH ephemeral key: identifies the session in `SessionInit` headers.
    pub ephemeral: [u8; 32],
}

/// `s/session/<device>`: sessions with one peer device; the first sends.
/// Several exist only after both sides initiated at once; both then converge
/// on the one initiated by the lower device id and keep the other for
/// opening messages already sealed under it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SessionSlot {
    pub entries: Vec<SessionEntry>,
}

/// `s/out/<device><conv>`: our stream to one device in one conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutStream {
    /// Next sender seq to assign (seqs start at 1).
    pub next_seq: u64,
    /// The peer's receipt: it stored every seq up to this one.
    pub receipted: u64,
    /// Seq → outbox entry, for ack-eliciting entries still in the outbox
    /// and not yet receipted (re-sends and tail probes). Written empty and
    /// rebuilt from the outbox at load (`Engine::load`): sealing a message
    /// must not rewrite a record that grows with the unreceipted backlog.
    /// (Records written before carry the map; it is read and merged.)
    #[serde(serialize_with = "empty_map")]
    pub sent: BTreeMap<u64, MessageId>,
    /// When to re-send the tail if no receipt covers it.
    pub probe_at: Option<u64>,
    /// Current probe delay (doubles up to the cap).
    pub probe_delay_ms: u64,
}

/// Serialize a map as an empty one (its content is derived at load).
fn empty_map<S: serde::Serializer>(_: &BTreeMap<u64, MessageId>, s: S) -> Result<S::Ok, S::Error> {
    BTreeMap::<u64, MessageId>::new().serialize(s)
}

impl Default for OutStream {
    fn default() -> Self {
        OutStream {
            next_seq: 1,
            receipted: 0,
            sent: BTreeMap::new(),
            probe_at: None,
            probe_delay_ms: 0,
        }
    }
}

/// `s/in/<device><conv>`: a peer device's stream to us in one conversation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct InStream {
    /// Every seq up to this one is delivered (or declared unrecoverable).
    pub delivered: u64,
    /// Seqs above `delivered` already received (held chat items, applied
    /// control items, or declared unrecoverable).
    pub above: BTreeSet<u64>,
    /// Highest seq seen in an envelope from the sender that opened here.
    /// Relay expiry claims never raise it (a relay cannot make this device
    /// expect, request and then skip seqs the sender has not written).
    pub highest: u64,
    /// When the current hole was first noticed.
    pub gap_since: Option<u64>,
    /// Next time to send a resend request for the hole.
    pub request_at: Option<u64>,
    /// Current re-request delay.
    pub request_delay_ms: u64,
    /// Seqs requested and not yet received (to count recoveries).
    pub requested: BTreeSet<u64>,
}

impl InStream {
    /// Seqs missing below `highest`.
    pub fn missing(&self) -> impl Iterator<Item = u64> + '_ {
        (self.delivered.saturating_add(1)..=self.highest).filter(|s| !self.above.contains(s))
    }

    pub fn has_gap(&self) -> bool {
        self.missing().next().is_some()
    }
}

/// `s/held/<device><conv><seq>`: a decrypted chat item waiting for its
/// predecessors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HeldItem {
    pub payload: Payload,
    pub from_user: UserKey,
}

/// What an outbox entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum EntryKind {
    /// A chat item (text or recall) fanned out to a conversation.
    Chat,
    /// A control item to one device.
    Control,
}

/// One sealed envelope waiting for the relay's confirmation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Transmission {
    pub transport_id: MessageId,
    pub envelope: Vec<u8>,
}

/// One device an outbox entry goes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Target {
    pub device: DeviceId,
    /// A device of the recipient user (its receipts change the state), as
    /// opposed to one of our own devices.
    pub recipient: bool,
    /// Assigned when first sealed.
    pub seq: Option<u64>,
    /// The envelope in flight (until the relay stores it).
    pub tx: Option<Transmission>,
    /// The relay stored the current transmission.
    pub stored: bool,
    /// Covered by the device's receipt.
    pub delivered: bool,
    /// Unreachable for good (unregistered device): ignored for the state.
    pub gone: bool,
}

/// `s/outbox/<id>`: a message or control item we send.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutboxEntry {
    pub id: MessageId,
    /// Creation order on this device (entries are sealed per stream in it).
    pub local_seq: u64,
    pub conversation: ConversationId,
    pub kind: EntryKind,
    /// `seal_at_rest` of the encoded payload.
    pub sealed: Vec<u8>,
    pub ack_eliciting: bool,
    pub created_ms: u64,
    /// Give up automatic retries (state `Failed`) at this time.
    pub deadline_ms: u64,
    pub state: MessageState,
    /// Targets decided (fan-out needs the device lists).
    pub resolved: bool,
    pub targets: Vec<Target>,
    /// Next automatic transmission attempt.
    pub retry_at: u64,
    pub retry_delay_ms: u64,
    /// Sealed with the envelope header's important flag (the relay's long
    /// retention class). Appended: a record of an older build lacks it.
    pub important: bool,
}

impl OutboxEntry {
    /// Decode `s/outbox/…`, also as written by an older build without the
    /// trailing `important` flag (read as `false`): postcard ignores bytes
    /// past the last field, so one zero byte is appended first.
    pub(crate) fn decode(key: &[u8], bytes: &[u8]) -> Result<Self, crate::error::StorageError> {
        let mut padded = Vec::with_capacity(bytes.len() + 1);
        padded.extend_from_slice(bytes);
        padded.push(0);
        crate::storage::decode(key, &padded)
    }
}

/// `s/link/<token>`: a link code this device issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LinkToken {
    pub expires_ms: u64,
}

/// `s/parked/<relay seq>`: an envelope from a device we cannot place yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Parked {
    pub envelope: Vec<u8>,
    pub parked_ms: u64,
}

/// `s/receipts/<device>`: receipt content queued for one device.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PendingReceipt {
    pub delivered: BTreeSet<ConversationId>,
    pub read: Vec<MessageId>,
    pub due_ms: u64,
}
