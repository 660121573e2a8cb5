//! The sync engine: a deterministic state machine.
//!
//! [`Engine::handle`] takes the current time and one [`Input`] and returns a
//! [`Step`]. Nothing inside reads a clock, opens a socket, touches a disk or
//! draws OS randomness: the RNG is a ChaCha20 generator seeded by the driver,
//! so one seed and one input sequence always produce the same outputs.
//!
//! Submodules: [`conn`](self) (connection, auth, relay requests, device lists,
//! prekeys), `send` (outbox, fan-out, sealing, retries, re-sends, tail
//! probes), `outbox_index` (which outbox entries an input must look at, so
//! an input's cost does not grow with the messages in flight), `timers`
//! (the stream records' timers by due time), `recv`
//! (pull/push, decryption, dedup, ordering, control items, receipts, gap
//! repair) and `commands` (what the app asks for).

mod commands;
mod conn;
mod group;
pub mod history_transfer;
mod inspect;
mod lifecycle;
mod outbox_index;
mod pull;
mod recv;
mod send;
#[cfg(test)]
mod tests;
mod timers;

use crate::codes::{ContactCode, LinkCode, conversation_between};
use crate::error::ClientError;
use crate::state::*;
use crate::storage::{self, StorageOp, keys};
use chacha20::ChaCha20Rng;
use hush_crypto::{DeviceIdentity, PrekeySecrets, UserIdentity};
use hush_protocol::{
    ClientFrame, ConversationId, DeviceEntry, DeviceId, DeviceList, MessageId, ServerFrame, UserKey,
};
use rand_core::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use zeroize::Zeroizing;

pub use crate::state::{Counters, MessageState, Removal};
pub use group::{
    GroupCounters, GroupInfo, GroupPosition, MAX_HELD_PER_DEVICE, MAX_HELD_TOTAL,
    MAX_UNKNOWN_GROUP_STREAMS, group_history, group_order_key, group_order_prefix, group_stream,
};
pub use inspect::{Backlog, OpenGap};
pub use lifecycle::DeviceInfo;

/// Timing and size knobs. The defaults are the product's; tests and the
/// simulator shorten some of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// How long sent messages stay in the outbox to answer resend requests.
    pub outbox_retention_ms: u64,
    /// How long recall/delete tombstones are kept (a recalled message that
    /// arrives later than this would show again).
    pub tombstone_ttl_ms: u64,
    /// A message not stored by the relay within this time becomes `Failed`.
    pub send_deadline_ms: u64,
    /// First retry delay of a transmission (doubles per attempt).
    pub retry_base_ms: u64,
    /// Largest retry delay.
    pub retry_max_ms: u64,
    /// First reconnect delay (doubles per failed attempt).
    pub reconnect_base_ms: u64,
    /// Largest reconnect delay.
    pub reconnect_max_ms: u64,
    /// Live pushes are acknowledged at most this long after they were stored.
    pub ack_window_ms: u64,
    /// …or as soon as this many are stored and unacknowledged.
    pub ack_batch: u64,
    /// Receipts to one device are batched over this window.
    pub receipt_window_ms: u64,
    /// A hole in a stream waits this long (in case the missing envelopes are
    /// merely late) before a resend request goes out.
    pub gap_grace_ms: u64,
    /// First delay before repeating an unanswered resend request.
    pub resend_retry_ms: u64,
    /// Largest delay between repeated resend requests.
    pub resend_retry_max_ms: u64,
    /// A stream tail not covered by a receipt is re-sent after this delay…
    pub probe_base_ms: u64,
    /// …doubling up to this.
    pub probe_max_ms: u64,
    /// Every device list (this user's and each contact's) is re-fetched at
    /// least this often, whether or not anything is sent.
    pub device_list_max_age_ms: u64,
    /// Before a message fans out, the recipient's and this user's lists are
    /// re-fetched if the cached copy is older than this, so a newly linked
    /// device gets the message.
    pub device_list_fresh_ms: u64,
    /// How long a fan-out waits for that refresh. If the relay has not
    /// answered by then, the message goes to the devices already known.
    pub device_list_wait_ms: u64,
    /// A contact with no known devices (not registered yet, or the fetch was
    /// refused) is asked again after `retry_base_ms`, doubling up to this.
    pub device_list_retry_max_ms: u64,
    /// A link code is valid this long.
    pub link_code_ttl_ms: u64,
    /// Envelopes per pulled page (at most 200).
    pub page_limit: u16,
    /// Most `Pull`s in flight during a backlog sync (at least 1). Once a
    /// page says how many envelopes remain, the pages after it are asked for
    /// at once, so the relay and the network work while this device decrypts
    /// and commits (see `docs/PROTOCOL.md` §8.2, "Several pulls in flight").
    pub pull_depth: u16,
    /// Most envelopes kept parked from one unknown sender device (the
    /// oldest of its envelopes is dropped beyond this).
    pub parked_per_device: usize,
    /// Most envelopes kept parked in all (the oldest is dropped beyond this).
    pub parked_max: usize,
    /// Most envelope bytes kept parked in all (the oldest is dropped beyond
    /// this).
    pub parked_max_bytes: usize,
    /// Publish more one-time prekeys when the relay holds fewer than this.
    pub one_time_prekeys_low: u32,
    /// How many one-time prekeys to add at a time.
    pub one_time_prekeys_batch: u32,
    /// Failed *expensive* decryption attempts allowed per sender device
    /// before its envelopes that need expensive work are dropped unopened
    /// (counted in `Counters::undecryptable_skipped`). Expensive: a ratchet
    /// key or generation this device has not opened a message on, a skip of
    /// more than `open_cheap_skip` keys, or a new X3DH. A successful open
    /// costs nothing; cheap attempts are always made. In memory only: a
    /// restart refills every budget.
    pub open_budget: u32,
    /// One spent attempt comes back per this interval (at least 1 ms).
    pub open_budget_refill_ms: u64,
    /// Largest forward skip, on a chain this device has already opened a
    /// message on, that counts as cheap (each skipped key is a chain step).
    pub open_cheap_skip: u32,
    /// Bytes per blob request of a history transfer (upload and download;
    /// at most `MAX_BLOB_CHUNK`).
    pub history_piece_bytes: u32,
    /// Ask the relay for early pushes on every connection: a message to
    /// this device, while it is connected, arrives while the relay is still
    /// syncing it, so this device stores it during that sync instead of
    /// after it (docs/PROTOCOL.md §8.5). Nothing is acknowledged or counted
    /// in the cursor before the relay says it is durable.
    pub early_pushes: bool,
}

/// A day in ms.
pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            outbox_retention_ms: 14 * DAY_MS,
            tombstone_ttl_ms: 60 * DAY_MS,
            send_deadline_ms: 5 * 60 * 1000,
            retry_base_ms: 1_000,
            retry_max_ms: 32_000,
            reconnect_base_ms: 1_000,
            reconnect_max_ms: 30_000,
            ack_window_ms: 500,
            ack_batch: 64,
            receipt_window_ms: 1_000,
            gap_grace_ms: 3_000,
            resend_retry_ms: 60_000,
            resend_retry_max_ms: 3_600_000,
            probe_base_ms: 30_000,
            probe_max_ms: 6 * 3_600_000,
            device_list_max_age_ms: 3_600_000,
            device_list_fresh_ms: 30_000,
            device_list_wait_ms: 5_000,
            device_list_retry_max_ms: 60_000,
            link_code_ttl_ms: 10 * 60 * 1000,
            page_limit: hush_protocol::limits::MAX_PAGE,
            pull_depth: 3,
            parked_per_device: 64,
            parked_max: 1_000,
            parked_max_bytes: 4 << 20,
            one_time_prekeys_low: 20,
            one_time_prekeys_batch: 50,
            open_budget: 16,
            open_budget_refill_ms: 15_000,
            open_cheap_skip: 4,
            history_piece_bytes: history_transfer::PIECE_BYTES as u32,
            early_pushes: true,
        }
    }
}

/// What happened, for the engine to react to.
// Inputs live for one `handle` call; on wasm32 (4-byte pointers) `Frame` is
// over clippy's size-difference limit, which a `Box` would not pay back.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Input {
    /// The transport to the relay is up (a fresh connection).
    Connected,
    /// The transport is down, or a connection attempt failed.
    Disconnected,
    /// A frame arrived from the relay.
    Frame(ServerFrame),
    /// A timer fired (or the driver just wants timers checked).
    Tick,
    /// The app asks for something.
    Command(Command),
}

/// What the app can ask.
#[derive(Debug, Clone)]
pub enum Command {
    /// Send a text message in a conversation (see [`Engine::conversation_with`]).
    SendText {
        /// The conversation.
        conversation: ConversationId,
        /// The text (at most [`crate::payload::MAX_TEXT_BYTES`] bytes).
        text: String,
    },
    /// Mark received messages read: syncs to this user's other devices and
    /// sends read receipts to the authors' devices.
    MarkRead {
        /// The conversation.
        conversation: ConversationId,
        /// `(message id, author device)` of each message read.
        messages: Vec<(MessageId, DeviceId)>,
    },
    /// Delete messages for this user (on all of their devices).
    Delete {
        /// The conversation.
        conversation: ConversationId,
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// Recall (delete for everyone) a message this user sent.
    Recall {
        /// The conversation.
        conversation: ConversationId,
        /// The message.
        id: MessageId,
    },
    /// Add a contact from their contact code.
    AddContact {
        /// The code.
        code: ContactCode,
    },
    /// Issue a one-time code for linking a new device to this user.
    CreateLinkCode,
    /// Send a `Failed` message again (same id, so never a duplicate).
    Retry {
        /// The message.
        id: MessageId,
    },
    /// Create a group with this user and `members` (contacts; at most 100
    /// members in all). Answered by [`Reply::Group`].
    CreateGroup {
        /// Its name (at most [`crate::payload::MAX_GROUP_NAME_BYTES`] bytes).
        name: String,
        /// Contacts to add.
        members: Vec<UserKey>,
    },
    /// Add contacts to a group this user is a member of.
    AddMembers {
        /// The group.
        group: ConversationId,
        /// Contacts to add.
        members: Vec<UserKey>,
    },
    /// Remove members from a group (any member may).
    RemoveMembers {
        /// The group.
        group: ConversationId,
        /// Members to remove (not this user: see `LeaveGroup`).
        members: Vec<UserKey>,
    },
    /// Leave a group.
    LeaveGroup {
        /// The group.
        group: ConversationId,
    },
    /// Rename a group.
    RenameGroup {
        /// The group.
        group: ConversationId,
        /// The new name.
        name: String,
    },
    /// [`Command::SendText`] in the relay's important retention class: every
    /// envelope of it carries the header's important flag, so the relay
    /// keeps it unread up to its `--retention-important`.
    SendImportantText {
        /// The conversation.
        conversation: ConversationId,
        /// The text (at most [`crate::payload::MAX_TEXT_BYTES`] bytes).
        text: String,
    },
    /// Remove another device of this user: publish a signed list without
    /// it. Peers stop encrypting to it once they hold the list, and the
    /// relay frees its inbox and refuses it (see docs/CLIENT.md "Device
    /// lifecycle"). [`Event::DevicesChanged`] follows once the relay
    /// stored the list.
    RemoveDevice {
        /// The device (not this one).
        device: DeviceId,
    },
}

/// The direct answer to a command.
#[derive(Clone)]
pub enum Reply {
    /// The id of the message just queued (`SendText`, `Recall`).
    Message(MessageId),
    /// The conversation with the contact just added.
    Contact(ConversationId),
    /// A link code (secret: show it to the user only).
    LinkCode(Zeroizing<String>),
    /// The group just created (`CreateGroup`).
    Group(ConversationId),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Message(id) => write!(f, "Message({id})"),
            Reply::Contact(c) => write!(f, "Contact({c})"),
            Reply::LinkCode(_) => f.write_str("LinkCode([redacted])"),
            Reply::Group(c) => write!(f, "Group({c})"),
        }
    }
}

/// Where the engine stands with the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// No transport; the driver should dial at [`Step::connect_at`].
    Offline,
    /// Transport up, authenticating.
    Connecting,
    /// Authenticated, pulling the backlog.
    Syncing,
    /// Backlog drained; new envelopes are pushed live.
    Live,
}

/// Something the app shows or reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message was stored and can be shown (in sender order per stream).
    Message(HistoryRecord),
    /// The delivery state of a message this user sent changed.
    MessageState {
        /// The message.
        id: MessageId,
        /// Its conversation.
        conversation: ConversationId,
        /// The new state.
        state: MessageState,
    },
    /// A message was recalled or deleted (remove it if shown; it may be one
    /// that never arrived here, in which case it never will be shown).
    MessageRemoved {
        /// The message.
        id: MessageId,
        /// Its conversation.
        conversation: ConversationId,
        /// How.
        reason: Removal,
    },
    /// Messages were marked read on another device of this user.
    ReadSynced {
        /// The conversation.
        conversation: ConversationId,
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// Backlog sync progress ("N of M"): envelopes handled so far in this
    /// sync and the total known.
    SyncProgress {
        /// Handled.
        done: u64,
        /// Total.
        total: u64,
    },
    /// Missing messages were detected and requested from their sender.
    GapDetected {
        /// The conversation.
        conversation: ConversationId,
        /// The sending device.
        from_device: DeviceId,
        /// How many sender seqs are missing.
        count: u64,
    },
    /// Previously missing messages arrived.
    GapRecovered {
        /// The conversation.
        conversation: ConversationId,
        /// The sending device.
        from_device: DeviceId,
        /// How many.
        count: u64,
    },
    /// The relay reported seqs of a stream as expired that their sender says
    /// it never wrote (the sender's answer is authenticated; the relay's
    /// report is not). Nothing was skipped because of it.
    RelayMisbehaviour {
        /// The conversation.
        conversation: ConversationId,
        /// The sending device.
        from_device: DeviceId,
        /// How many claimed seqs the sender refuted.
        count: u64,
    },
    /// "N messages could not be recovered": the sender no longer has them.
    Unrecoverable {
        /// The conversation.
        conversation: ConversationId,
        /// The sending device.
        from_device: DeviceId,
        /// How many.
        count: u64,
    },
    /// The ratchet with a peer device advanced to a new epoch (a DH step or a
    /// forced reseed): fresh keys from here on.
    KeyRotation {
        /// The peer device.
        device: DeviceId,
        /// The session's epoch.
        epoch: u64,
    },
    /// Connection state changed.
    Connection(ConnectionState),
    /// A contact was added (here or on another device of this user).
    ContactAdded {
        /// Their identity.
        user: UserKey,
        /// Display name.
        name: String,
        /// The conversation with them.
        conversation: ConversationId,
    },
    /// A user's verified device list changed.
    DevicesChanged {
        /// The user.
        user: UserKey,
        /// Devices now listed.
        devices: Vec<DeviceId>,
    },
    /// A new device joined this user through a link code issued here.
    DeviceLinked {
        /// The new device.
        device: DeviceId,
    },
    /// This (new) device was welcomed by the device that issued the link code.
    Linked,
    /// The relay refused something in a way the user may need to know.
    Warning(String),
    /// A group was created or joined, or its members or name changed, or
    /// this user left or was removed (see [`Engine::group`]).
    GroupChanged {
        /// The group.
        group: ConversationId,
    },
    /// History import progress on a newly linked device ("importing N of
    /// M"): messages imported so far and in the archive.
    HistoryImport {
        /// Imported.
        done: u64,
        /// In the archive.
        total: u64,
    },
    /// A newly linked device asked for the history: the driver exports it
    /// ([`history_transfer::export_history`]) and passes it to
    /// [`Engine::start_history_export`] (also whenever
    /// [`Engine::history_export_wanted`] names a device, e.g. after a restart).
    HistoryExportWanted {
        /// The new device.
        device: DeviceId,
    },
    /// The history archive for a new device is uploaded and offered to it.
    HistoryExported {
        /// The new device.
        device: DeviceId,
        /// Messages in the archive.
        messages: u64,
    },
    /// This device was removed by its user: the relay refuses it from now
    /// on and nothing new is encrypted to it. The app should stop using it.
    Removed,
    /// The relay says this device had not been seen for its stale period:
    /// peers stopped encrypting to it meanwhile, so messages sent then
    /// never reached it. It syncs what its inbox still holds.
    Retired {
        /// When the relay had last seen it (ms since the Unix epoch).
        last_seen_ms: u64,
    },
}

/// Everything one call of [`Engine::handle`] asks the driver to do, in this
/// order: send `early_frames` (once every earlier step is durable), make
/// `storage` durable (one atomic batch), then send `frames`, then deliver
/// `events` (and `reply`); sleep until `wake_at` (or the next input); dial
/// at `connect_at` while offline; drop the connection if `close`.
#[derive(Debug, Default)]
pub struct Step {
    /// One atomic batch; durable before `frames`, `events` and `reply`.
    pub storage: Vec<StorageOp>,
    /// Frames that do not depend on this step's `storage`: the driver may
    /// send them before this step's `storage` is durable, as soon as the
    /// storage of every earlier step is durable. A driver that commits each
    /// step before handling the next input sends them first, then commits,
    /// then sends `frames`.
    ///
    /// During a backlog sync this holds the `Pull`s of the next pages (up
    /// to [`EngineConfig::pull_depth`] in flight), whose acknowledgement
    /// covers only what earlier steps stored: the relay serves the next
    /// pages while this one is decrypted and committed.
    pub early_frames: Vec<ClientFrame>,
    /// Frames to send, in order, once `storage` is durable.
    pub frames: Vec<ClientFrame>,
    /// Events for the app, in order. A driver may deliver them once
    /// `storage` is *stored* (readable, kept through a crash of the app)
    /// rather than durable when the step handled a relay frame and they are
    /// only [`Event::Message`], [`Event::MessageState`],
    /// [`Event::KeyRotation`] and [`Event::SyncProgress`]: the `frames`,
    /// acknowledgements included, still wait for durability, so a power
    /// loss makes the relay deliver those envelopes again. The native
    /// driver does ([`crate::Storage::apply_stored`]).
    pub events: Vec<Event>,
    /// The answer to a command.
    pub reply: Option<Reply>,
    /// Call `handle(now, Input::Tick)` at this time at the latest.
    pub wake_at: Option<u64>,
    /// While offline: open a connection at this time.
    pub connect_at: Option<u64>,
    /// Close the current connection (the engine saw a protocol violation).
    pub close: bool,
}

impl Step {
    /// Nothing that waits on this step's commit is urgent: its only outputs
    /// are delivery-state changes of sent messages (`MessageState` events),
    /// ratchet epochs (`KeyRotation`: a contact's receipt usually turns the
    /// ratchet) and cumulative acknowledgements to the relay (`Ack`
    /// frames). A
    /// driver may hold such a step back for a few milliseconds and commit
    /// it with the next step that has something urgent (a message to send
    /// or to show, a reply), saving it a sync of its own: while a user
    /// sends, each message's `Stored` notice arrives about when the next
    /// message is sent. Holding it back is as safe as a crash before its
    /// commit: the notice is not shown and the acknowledgement not sent
    /// until the commit, so the relay delivers again what the engine then
    /// drops as a repeat, and an unconfirmed send is confirmed again when
    /// it is retransmitted.
    pub fn is_lazy(&self) -> bool {
        self.reply.is_none()
            && !self.close
            && self.early_frames.is_empty()
            && self
                .frames
                .iter()
                .all(|f| matches!(f.request, hush_protocol::Request::Ack { .. }))
            && self
                .events
                .iter()
                .all(|e| matches!(e, Event::MessageState { .. } | Event::KeyRotation { .. }))
    }
}

/// Records changed during a step (written at its end).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Dirty {
    Device,
    Prekeys,
    Cursor,
    Counters,
    Own,
    Contact(UserKey),
    Session(DeviceId),
    Out(DeviceId, ConversationId),
    In(DeviceId, ConversationId),
    Held(DeviceId, ConversationId, u64),
    Outbox(MessageId),
    Tomb(MessageId),
    Recall(ConversationId, UserKey, MessageId),
    Mine(ConversationId, MessageId),
    Link([u8; 16]),
    Parked(u64),
    Receipt(DeviceId),
    Xfer,
}

/// A request in flight and what its answer is for.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Hello,
    Auth,
    Register,
    Send(Vec<(MessageId, DeviceId)>),
    /// A page request, and the relay seq it asked to read after.
    Pull {
        after: u64,
    },
    Ack,
    PublishPrekeys {
        signed: u32,
        one_time: Vec<u32>,
    },
    FetchPrekeys(DeviceId),
    PublishDeviceList(u64),
    FetchDeviceList(UserKey),
    BlobPut,
    BlobStatus,
    BlobGet,
    EarlyPushes,
}

/// Transient per-connection state (lost on disconnect, rebuilt on connect).
#[derive(Debug, Default)]
pub(crate) struct Link {
    pub connected: bool,
    pub ready: bool,
    pub live: bool,
    /// Pulls in flight, oldest first: (request id, `after`). Their pages are
    /// used only in this order and only if `after` is the cursor then.
    pub pulls: std::collections::VecDeque<(u32, u64)>,
    /// The end of the seq range the newest pull in flight asked for
    /// (`after + limit`): where a further pipelined pull starts.
    pub pull_frontier: u64,
    /// Seqs one page is expected to span (the last full page's span, at
    /// most the page limit): the stride between pipelined pulls.
    pub pull_stride: u64,
    /// The highest relay seq the last usable page said exists
    /// (`last seq + remaining`): pulls are pipelined only below it.
    pub sync_end: u64,
    /// Pulls sent on this connection (diagnostics).
    pub pulls_sent: u64,
    /// Pages dropped because they would have skipped seqs (diagnostics).
    pub stale_pages: u64,
    /// Most pulls that were in flight at once (diagnostics).
    pub max_pulls_in_flight: usize,
    pub next_request: u32,
    pub requests: BTreeMap<u32, Pending>,
    /// Highest relay seq acknowledged to the relay on this connection.
    pub acked_sent: u64,
    pub ack_due: Option<u64>,
    pub sync_done: u64,
    pub sync_total: u64,
    /// Transmissions waiting for a `Sent` answer.
    pub in_flight: BTreeSet<(MessageId, DeviceId)>,
    pub fetching_prekeys: BTreeSet<DeviceId>,
    pub fetching_lists: BTreeSet<UserKey>,
    pub publishing_list: bool,
    pub publishing_prekeys: bool,
    /// One-time prekeys the relay reported left.
    pub one_time_left: u32,
    /// Devices whose prekey fetch failed: when to ask again, and how many
    /// times it failed in a row.
    pub prekey_failures: BTreeMap<DeviceId, (u64, u32)>,
    /// When each running device-list fetch was sent (bounds how long a
    /// fan-out waits for it).
    pub list_fetch_sent: BTreeMap<UserKey, u64>,
    /// Users whose list must be fetched again once the running fetch
    /// answers (that answer may predate what made us ask).
    pub refetch_lists: BTreeSet<UserKey>,
    /// When this connection was opened (for the sync latency counters).
    pub connected_at_ms: u64,
    /// This connection has caught up once (counted in `Counters::syncs`).
    pub caught_up: bool,
    /// Highest relay seq taken from an `EarlyPush` on this connection
    /// since its last pull (0: none): above the cursor until a `Durable`
    /// (or a plain push) covers it. Forgotten with the connection, and at
    /// every pull: what was stored early comes again and is a duplicate.
    pub early_through: u64,
}

/// The engine. See the crate docs for the driver contract.
pub struct Engine {
    pub(crate) cfg: EngineConfig,
    pub(crate) rng: ChaCha20Rng,
    pub(crate) device: DeviceRecord,
    pub(crate) prekeys: PrekeyRecord,
    pub(crate) cursor: Cursor,
    pub(crate) counters: Counters,
    pub(crate) own: OwnDevices,
    pub(crate) contacts: BTreeMap<UserKey, Contact>,
    pub(crate) conversations: BTreeMap<ConversationId, UserKey>,
    pub(crate) sessions: BTreeMap<DeviceId, SessionSlot>,
    pub(crate) out_streams: BTreeMap<(DeviceId, ConversationId), OutStream>,
    pub(crate) in_streams: BTreeMap<(DeviceId, ConversationId), InStream>,
    pub(crate) held: BTreeMap<(DeviceId, ConversationId, u64), HeldItem>,
    pub(crate) outbox: BTreeMap<MessageId, OutboxEntry>,
    /// Outbox entries that still need work, in creation order.
    pub(crate) active: BTreeSet<(u64, MessageId)>,
    /// Which of `active` an input must look at, and their timers (derived;
    /// rebuilt at load).
    pub(crate) outbox_index: outbox_index::OutboxIndex,
    /// The stream records' timers by due time (derived; rebuilt at load).
    pub(crate) stream_timers: timers::StreamTimers,
    pub(crate) tombs: BTreeMap<MessageId, Tombstone>,
    /// Recalls by (conversation, author user, message): when applied (ms).
    pub(crate) recalls: BTreeMap<(ConversationId, UserKey, MessageId), u64>,
    /// Messages this user wrote, by (conversation, message): when noted (ms).
    pub(crate) mine: BTreeMap<(ConversationId, MessageId), u64>,
    pub(crate) links: BTreeMap<[u8; 16], LinkToken>,
    pub(crate) parked: BTreeMap<u64, Parked>,
    /// Parked envelopes by sender device (derived; rebuilt at load).
    pub(crate) parked_by_device: BTreeMap<DeviceId, BTreeSet<u64>>,
    /// Envelopes taken from early pushes since this engine was loaded
    /// (diagnostics, not stored).
    pub(crate) early_taken: u64,
    /// Envelope bytes parked now (derived; rebuilt at load).
    pub(crate) parked_bytes: usize,
    pub(crate) receipts: BTreeMap<DeviceId, PendingReceipt>,
    // Transient.
    pub(crate) link: Link,
    pub(crate) reconnect_attempts: u32,
    pub(crate) reconnect_at: u64,
    pub(crate) housekeeping_at: u64,
    pub(crate) lists_refreshed_at: Option<u64>,
    pub(crate) unknown_refreshed_at: Option<u64>,
    /// List refreshes made for the envelopes parked now (spaces the next).
    pub(crate) parked_refreshes: u32,
    /// Contacts with no known devices: when to fetch their list again and
    /// how many fetches in a row found none.
    pub(crate) list_retry: BTreeMap<UserKey, (u64, u32)>,
    pub(crate) dirty: BTreeSet<Dirty>,
    pub(crate) step: Step,
    pub(crate) history_ops: Vec<StorageOp>,
    pub(crate) last_state: Option<ConnectionState>,
    /// The relay cursor as written by earlier steps (the value at the start
    /// of the current `handle`): what an early frame may acknowledge.
    pub(crate) durable_cursor: u64,
    /// Sessions being re-established because the peer's could not be
    /// answered (in memory only; see `recv::SessionRepair`).
    pub(crate) session_repair: recv::SessionRepair,
    /// Per sender device: the budget for failed expensive decryption
    /// attempts (in memory only; see `recv::OpenBudgets`).
    pub(crate) open_budgets: recv::OpenBudgets,
    /// Groups (see `group`).
    pub(crate) groups: group::GroupState,
    /// History transfer to or from a newly linked device.
    pub(crate) history: history_transfer::Transfer,
    /// Leases, removal, retirement (in memory; see `lifecycle`).
    pub(crate) lifecycle: lifecycle::Lifecycle,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("device", &self.device.device)
            .field("user", &self.user_key())
            .field("contacts", &self.contacts.len())
            .field("outbox", &self.outbox.len())
            .finish_non_exhaustive()
    }
}

fn random_array<const N: usize>(rng: &mut ChaCha20Rng) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill_bytes(&mut out);
    out
}

impl Engine {
    fn blank(
        cfg: EngineConfig,
        rng: ChaCha20Rng,
        device: DeviceRecord,
        prekeys: PrekeyRecord,
    ) -> Self {
        Engine {
            cfg,
            rng,
            device,
            prekeys,
            cursor: Cursor::default(),
            counters: Counters::default(),
            own: OwnDevices::default(),
            contacts: BTreeMap::new(),
            conversations: BTreeMap::new(),
            sessions: BTreeMap::new(),
            out_streams: BTreeMap::new(),
            in_streams: BTreeMap::new(),
            held: BTreeMap::new(),
            outbox: BTreeMap::new(),
            active: BTreeSet::new(),
            outbox_index: outbox_index::OutboxIndex::default(),
            stream_timers: timers::StreamTimers::default(),
            tombs: BTreeMap::new(),
            recalls: BTreeMap::new(),
            mine: BTreeMap::new(),
            links: BTreeMap::new(),
            parked: BTreeMap::new(),
            parked_by_device: BTreeMap::new(),
            early_taken: 0,
            parked_bytes: 0,
            receipts: BTreeMap::new(),
            link: Link::default(),
            reconnect_attempts: 0,
            reconnect_at: 0,
            housekeeping_at: 0,
            lists_refreshed_at: None,
            unknown_refreshed_at: None,
            parked_refreshes: 0,
            list_retry: BTreeMap::new(),
            dirty: BTreeSet::new(),
            step: Step::default(),
            history_ops: Vec::new(),
            last_state: None,
            durable_cursor: 0,
            session_repair: recv::SessionRepair::default(),
            open_budgets: recv::OpenBudgets::default(),
            groups: group::GroupState::default(),
            history: history_transfer::Transfer::default(),
            lifecycle: lifecycle::Lifecycle::default(),
        }
    }

    fn new_device(
        now_ms: u64,
        rng: &mut ChaCha20Rng,
        user: UserIdentity,
        relay: String,
        name: String,
    ) -> (DeviceRecord, PrekeyRecord) {
        let identity = DeviceIdentity::generate(rng);
        let prekeys = PrekeySecrets::new(&identity, rng, now_ms);
        let device = DeviceRecord {
            device: DeviceId(random_array(rng)),
            identity,
            user,
            relay,
            name,
            registered: false,
            at_rest: SecretKey(random_array(rng)),
            link: None,
        };
        let prekeys = PrekeyRecord {
            secrets: prekeys,
            published_signed: None,
            unpublished: Vec::new(),
        };
        (device, prekeys)
    }

    /// Create a new user with this as its first device. The returned step
    /// holds the storage batch to persist (and asks the driver to connect).
    pub fn create(
        now_ms: u64,
        seed: [u8; 32],
        relay: &str,
        name: &str,
        cfg: EngineConfig,
    ) -> Result<(Engine, Step), ClientError> {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let user = UserIdentity::generate(&mut rng);
        let (device, prekeys) = Self::new_device(now_ms, &mut rng, user, relay.into(), name.into());
        let mut engine = Self::blank(cfg, rng, device, prekeys);
        let entry = engine.own_entry();
        let list = DeviceList {
            user: engine.user_key(),
            version: 1,
            devices: vec![entry],
        };
        let signed = crate::sig::sign_device_list(&engine.device.user, list)?;
        engine.own.known.list = Some(signed.clone());
        engine.own.to_publish = Some(signed);
        engine.mark_all_dirty();
        let step = engine.finish(now_ms)?;
        Ok((engine, step))
    }

    /// Create a new device of an existing user from a link code made on one
    /// of its devices; it asks that device for the user's history.
    pub fn join(
        now_ms: u64,
        seed: [u8; 32],
        code: &LinkCode,
        cfg: EngineConfig,
    ) -> Result<(Engine, Step), ClientError> {
        Self::join_with_history(now_ms, seed, code, cfg, true)
    }

    /// [`Engine::join`], asking for the history only if `history` is set.
    pub fn join_with_history(
        now_ms: u64,
        seed: [u8; 32],
        code: &LinkCode,
        cfg: EngineConfig,
        history: bool,
    ) -> Result<(Engine, Step), ClientError> {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let user = code.user_identity()?;
        let (mut device, prekeys) = Self::new_device(
            now_ms,
            &mut rng,
            user,
            code.relay.clone(),
            code.name.clone(),
        );
        device.link = Some(PendingLink {
            inviter: code.inviter,
            token: code.token,
            hello_sent: false,
        });
        let mut engine = Self::blank(cfg, rng, device, prekeys);
        engine.mark_all_dirty();
        engine.history_init_join(now_ms, history);
        let step = engine.finish(now_ms)?;
        Ok((engine, step))
    }

    /// Rebuild an engine from the records of [`crate::Storage::load_state`]
    /// (after a restart or a crash). `seed` must be fresh randomness.
    pub fn load(
        records: Vec<crate::storage::Record>,
        seed: [u8; 32],
        cfg: EngineConfig,
    ) -> Result<Engine, ClientError> {
        let rng = ChaCha20Rng::from_seed(seed);
        let mut device = None;
        let mut prekeys = None;
        let mut rest = Vec::new();
        for (k, v) in records {
            if k == keys::DEVICE {
                device = Some(storage::decode::<DeviceRecord>(&k, &v)?);
            } else if k == keys::PREKEYS {
                prekeys = Some(storage::decode::<PrekeyRecord>(&k, &v)?);
            } else {
                rest.push((k, v));
            }
        }
        let (Some(device), Some(prekeys)) = (device, prekeys) else {
            return Err(ClientError::NoDevice);
        };
        let mut e = Self::blank(cfg, rng, device, prekeys);
        for (k, v) in rest {
            e.load_record(&k, &v)?;
        }
        for (local, id) in e
            .outbox
            .values()
            .filter(|o| send::needs_work(o))
            .map(|o| (o.local_seq, o.id))
            .collect::<Vec<_>>()
        {
            // Indexed at the first input (see `outbox_index`).
            e.activate((local, id));
        }
        e.rebuild_sent_index();
        // The streams' timers, indexed at the first input.
        let t = &mut e.stream_timers;
        t.touched_in.extend(e.in_streams.keys().copied());
        t.touched_out.extend(e.out_streams.keys().copied());
        // A removed device stays removed across restarts.
        e.lifecycle.removed = e.counters.removed > 0;
        // Written before parking was bounded, or under larger bounds: the
        // excess goes with the first step's batch.
        e.rebuild_parked_index();
        e.enforce_parked_bounds();
        Ok(e)
    }

    fn load_record(&mut self, k: &[u8], v: &[u8]) -> Result<(), ClientError> {
        let corrupt = || crate::error::StorageError::Corrupt {
            key: keys::printable(k),
        };
        let ids = |prefix: &[u8]| keys::ids_after(k, prefix).ok_or_else(corrupt);
        if self.load_group_record(k, v)? {
            return Ok(());
        }
        if k == keys::CURSOR {
            self.cursor = storage::decode(k, v)?;
        } else if k == keys::COUNTERS {
            self.counters = Counters::decode(k, v)?;
        } else if k == keys::OWN {
            self.own = storage::decode(k, v)?;
        } else if k.starts_with(keys::CONTACT) {
            let c: Contact = storage::decode(k, v)?;
            self.conversations.insert(c.conversation, c.user);
            self.contacts.insert(c.user, c);
        } else if k.starts_with(keys::SESSION) {
            let b = ids(keys::SESSION)?;
            let d = DeviceId(keys::arr(b, 0).ok_or_else(corrupt)?);
            self.sessions.insert(d, storage::decode(k, v)?);
        } else if k.starts_with(keys::OUT) {
            let b = ids(keys::OUT)?;
            let d = DeviceId(keys::arr(b, 0).ok_or_else(corrupt)?);
            let c = ConversationId(keys::arr(b, 16).ok_or_else(corrupt)?);
            self.out_streams.insert((d, c), storage::decode(k, v)?);
        } else if k.starts_with(keys::IN) {
            let b = ids(keys::IN)?;
            let d = DeviceId(keys::arr(b, 0).ok_or_else(corrupt)?);
            let c = ConversationId(keys::arr(b, 16).ok_or_else(corrupt)?);
            self.in_streams.insert((d, c), storage::decode(k, v)?);
        } else if k.starts_with(keys::HELD) {
            let b = ids(keys::HELD)?;
            let d = DeviceId(keys::arr(b, 0).ok_or_else(corrupt)?);
            let c = ConversationId(keys::arr(b, 16).ok_or_else(corrupt)?);
            let s = u64::from_be_bytes(keys::arr(b, 32).ok_or_else(corrupt)?);
            self.held.insert((d, c, s), storage::decode(k, v)?);
        } else if k.starts_with(keys::OUTBOX) {
            let o = OutboxEntry::decode(k, v)?;
            self.outbox.insert(o.id, o);
        } else if k.starts_with(keys::TOMB) {
            let b = ids(keys::TOMB)?;
            let id = MessageId(keys::arr(b, 0).ok_or_else(corrupt)?);
            self.tombs.insert(id, storage::decode(k, v)?);
        } else if k.starts_with(RECALL) {
            let b = ids(RECALL)?;
            let c = ConversationId(keys::arr(b, 0).ok_or_else(corrupt)?);
            let u = UserKey(keys::arr(b, 16).ok_or_else(corrupt)?);
            let id = MessageId(keys::arr(b, 48).ok_or_else(corrupt)?);
            self.recalls.insert((c, u, id), storage::decode(k, v)?);
        } else if k.starts_with(MINE) {
            let b = ids(MINE)?;
            let c = ConversationId(keys::arr(b, 0).ok_or_else(corrupt)?);
            let id = MessageId(keys::arr(b, 16).ok_or_else(corrupt)?);
            self.mine.insert((c, id), storage::decode(k, v)?);
        } else if k.starts_with(keys::LINK) {
            let b = ids(keys::LINK)?;
            self.links
                .insert(keys::arr(b, 0).ok_or_else(corrupt)?, storage::decode(k, v)?);
        } else if k.starts_with(keys::PARKED) {
            let b = ids(keys::PARKED)?;
            let s = u64::from_be_bytes(keys::arr(b, 0).ok_or_else(corrupt)?);
            self.parked.insert(s, storage::decode(k, v)?);
        } else if k == history_transfer::XFER {
            self.history_load(k, v)?;
        } else if k.starts_with(keys::RECEIPTS) {
            let b = ids(keys::RECEIPTS)?;
            let d = DeviceId(keys::arr(b, 0).ok_or_else(corrupt)?);
            self.receipts.insert(d, storage::decode(k, v)?);
        }
        // Unknown keys are ignored: a newer version may have written them.
        Ok(())
    }

    fn mark_all_dirty(&mut self) {
        self.dirty.insert(Dirty::Device);
        self.dirty.insert(Dirty::Prekeys);
        self.dirty.insert(Dirty::Cursor);
        self.dirty.insert(Dirty::Counters);
        self.dirty.insert(Dirty::Own);
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.device.device
    }

    /// This user's identity key.
    pub fn user_key(&self) -> UserKey {
        UserKey(self.device.user.public())
    }

    /// The code others use to add this user as a contact.
    pub fn contact_code(&self) -> ContactCode {
        ContactCode {
            user: self.user_key(),
            relay: self.device.relay.clone(),
            name: self.device.name.clone(),
        }
    }

    /// The relay address this device uses.
    pub fn relay(&self) -> &str {
        &self.device.relay
    }

    /// The conversation with a contact (whether or not it has messages yet).
    pub fn conversation_with(&self, user: &UserKey) -> ConversationId {
        conversation_between(&self.user_key(), user)
    }

    /// The contacts: (identity, display name, conversation).
    pub fn contacts(&self) -> Vec<(UserKey, String, ConversationId)> {
        self.contacts
            .values()
            .map(|c| (c.user, c.name.clone(), c.conversation))
            .collect()
    }

    /// Devices currently listed for a user (this user included).
    pub fn devices_of(&self, user: &UserKey) -> Vec<DeviceId> {
        let known = if *user == self.user_key() {
            Some(&self.own.known)
        } else {
            self.contacts.get(user).map(|c| &c.known)
        };
        known
            .map(|k| k.devices().map(|e| e.device).collect())
            .unwrap_or_default()
    }

    /// The quality counters (duplicates, out-of-order, gaps…).
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Envelopes taken from the relay's early pushes since this engine was
    /// created or loaded (diagnostics; see `EngineConfig::early_pushes`).
    pub fn early_pushes_taken(&self) -> u64 {
        self.early_taken
    }

    /// The first time a connection catches up (its backlog drained): count
    /// one sync and its latency from connect.
    pub(crate) fn note_caught_up(&mut self, now: u64) {
        if self.link.caught_up {
            return;
        }
        self.link.caught_up = true;
        let latency = now.saturating_sub(self.link.connected_at_ms);
        let c = &mut self.counters;
        c.syncs = c.syncs.saturating_add(1);
        c.sync_latency_ms_total = c.sync_latency_ms_total.saturating_add(latency);
        c.last_sync_latency_ms = latency;
        self.touch(Dirty::Counters);
    }

    /// The state of a message this device still has in its outbox.
    pub fn message_state(&self, id: &MessageId) -> Option<MessageState> {
        self.outbox.get(id).map(|o| o.state)
    }

    /// Messages in the outbox that are not yet stored by the relay.
    pub fn unsent(&self) -> usize {
        // `Sending` entries have work left: they are all in `active`.
        self.active
            .iter()
            .filter_map(|(_, id)| self.outbox.get(id))
            .filter(|o| o.kind == EntryKind::Chat && o.state == MessageState::Sending)
            .count()
    }

    /// Where the engine stands with the relay.
    pub fn connection_state(&self) -> ConnectionState {
        if !self.link.connected {
            ConnectionState::Offline
        } else if !self.link.ready {
            ConnectionState::Connecting
        } else if self.link.live {
            ConnectionState::Live
        } else {
            ConnectionState::Syncing
        }
    }

    /// While offline, when the driver should dial. Never once this device
    /// was removed by its user: the relay refuses it for good.
    pub fn connect_at(&self) -> Option<u64> {
        (!self.link.connected && !self.lifecycle.removed).then_some(self.reconnect_at)
    }

    /// Handle one input at time `now_ms` (ms since the Unix epoch, the
    /// driver's clock). See [`Step`] for what the driver must do with the result.
    ///
    /// On `Err` the engine may be ahead of storage: the driver must drop it
    /// and rebuild it with [`Engine::load`] (as after a crash).
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Result<Step, ClientError> {
        // Every change of the cursor is written by the step that makes it, so
        // its value now is in the storage of earlier steps.
        self.durable_cursor = self.cursor.through;
        match input {
            Input::Connected => self.on_connected(now_ms)?,
            Input::Disconnected => self.on_disconnected(now_ms),
            Input::Frame(frame) => self.on_frame(now_ms, frame)?,
            Input::Tick => {}
            Input::Command(c) => self.on_command(now_ms, c)?,
        }
        self.run_timers(now_ms)?;
        self.finish(now_ms)
    }

    /// Everything time-driven: retries, receipts, acks, gap requests, probes,
    /// failure deadlines, expiry.
    fn run_timers(&mut self, now: u64) -> Result<(), ClientError> {
        if now >= self.housekeeping_at {
            self.housekeeping(now);
            self.housekeeping_at = now.saturating_add(60_000);
        }
        self.reindex_touched(now);
        let due = self.outbox_index.pop_due(now);
        self.check_deadlines(now, &due);
        if self.link.ready {
            self.maybe_refresh_lists(now);
            if self.parked_refresh_at().is_some_and(|t| now >= t) {
                self.refresh_for_unknown_sender(now);
            }
            self.maybe_link_hello(now)?;
            self.pump_outbox(now)?;
            self.flush_receipts(now)?;
            self.request_gaps(now)?;
            self.group_timers(now)?;
            self.run_probes(now)?;
            self.pump_outbox(now)?;
            self.pump_history(now)?;
            if self.link.ack_due.is_some_and(|t| now >= t) {
                self.send_ack();
            }
        }
        Ok(())
    }

    /// Turn dirty records into the step's storage batch and compute timers.
    fn finish(&mut self, now: u64) -> Result<Step, ClientError> {
        let mut ops = std::mem::take(&mut self.history_ops);
        for d in std::mem::take(&mut self.dirty) {
            ops.push(self.op_for(&d)?);
        }
        ops.extend(self.group_ops()?);
        let mut step = std::mem::take(&mut self.step);
        step.storage = ops;
        let state = self.connection_state();
        if self.last_state != Some(state) {
            self.last_state = Some(state);
            step.events.push(Event::Connection(state));
        }
        self.reindex_touched(now);
        self.reindex_streams();
        self.reindex_held();
        step.wake_at = self.next_wake(now);
        step.connect_at = self.connect_at();
        Ok(step)
    }

    fn op_for(&self, d: &Dirty) -> Result<StorageOp, ClientError> {
        fn put<T: serde::Serialize>(key: Vec<u8>, v: &T) -> Result<StorageOp, ClientError> {
            Ok(StorageOp::Put {
                key,
                value: storage::encode(v)?,
            })
        }
        fn put_or_delete<T: serde::Serialize>(
            key: Vec<u8>,
            v: Option<&T>,
        ) -> Result<StorageOp, ClientError> {
            match v {
                Some(v) => put(key, v),
                None => Ok(StorageOp::Delete { key }),
            }
        }
        match d {
            Dirty::Device => put(keys::DEVICE.to_vec(), &self.device),
            Dirty::Prekeys => put(keys::PREKEYS.to_vec(), &self.prekeys),
            Dirty::Cursor => put(keys::CURSOR.to_vec(), &self.cursor),
            Dirty::Counters => put(keys::COUNTERS.to_vec(), &self.counters),
            Dirty::Own => put(keys::OWN.to_vec(), &self.own),
            Dirty::Contact(u) => put_or_delete(keys::contact(u), self.contacts.get(u)),
            Dirty::Session(d) => put_or_delete(keys::session(d), self.sessions.get(d)),
            Dirty::Out(d, c) => {
                put_or_delete(keys::out_stream(d, c), self.out_streams.get(&(*d, *c)))
            }
            Dirty::In(d, c) => put_or_delete(keys::in_stream(d, c), self.in_streams.get(&(*d, *c))),
            Dirty::Held(d, c, s) => {
                put_or_delete(keys::held(d, c, *s), self.held.get(&(*d, *c, *s)))
            }
            Dirty::Outbox(id) => put_or_delete(keys::outbox(id), self.outbox.get(id)),
            Dirty::Tomb(id) => put_or_delete(keys::tombstone(id), self.tombs.get(id)),
            Dirty::Recall(c, u, id) => {
                put_or_delete(recall_key(c, u, id), self.recalls.get(&(*c, *u, *id)))
            }
            Dirty::Mine(c, id) => put_or_delete(mine_key(c, id), self.mine.get(&(*c, *id))),
            Dirty::Link(t) => put_or_delete(keys::link(t), self.links.get(t)),
            Dirty::Parked(s) => put_or_delete(keys::parked(*s), self.parked.get(s)),
            Dirty::Receipt(d) => put_or_delete(keys::receipts(d), self.receipts.get(d)),
            Dirty::Xfer => self.history_record(),
        }
    }

    fn next_wake(&self, now: u64) -> Option<u64> {
        // Only future times: a timer that is due but could not act yet (e.g.
        // a gap request before the sync drained) is retried at the next
        // input or the next future timer, never in a busy loop.
        let mut times: Vec<u64> = vec![self.housekeeping_at];
        // Deadlines of messages still sending, and retry times while
        // connected: the first ahead, from the index (not a walk of
        // everything unconfirmed; see `outbox_index`).
        times.extend(self.outbox_index.next_after(now, self.link.ready));
        if self.link.ready {
            times.extend(self.link.ack_due);
            times.extend(self.receipts.values().map(|r| r.due_ms));
            // From the timer index, not a walk of every stream.
            times.extend(self.stream_timers.gaps.next_after(now));
            times.extend(self.stream_timers.probes.next_after(now));
            times.extend(
                self.lists_refreshed_at
                    .map(|t| t.saturating_add(self.cfg.device_list_max_age_ms)),
            );
            times.extend(self.parked_refresh_at());
            times.extend(self.list_retry.values().map(|r| r.0));
            // A fan-out waiting for a list fetch goes ahead when the wait ends.
            times.extend(
                self.link
                    .list_fetch_sent
                    .values()
                    .map(|t| t.saturating_add(self.cfg.device_list_wait_ms)),
            );
            times.extend(self.link.prekey_failures.values().map(|f| f.0));
            times.extend(self.group_wake(now));
        } else if !self.link.connected {
            times.push(self.reconnect_at);
        }
        times.into_iter().filter(|&t| t > now).min()
    }

    /// Bring the stream timers up to date with the streams changed since
    /// they were last read (see `timers`).
    pub(crate) fn reindex_streams(&mut self) {
        for k in std::mem::take(&mut self.stream_timers.touched_in) {
            let at = self.in_streams.get(&k).and_then(|s| s.request_at);
            self.stream_timers.gaps.set(k, at);
        }
        for k in std::mem::take(&mut self.stream_timers.touched_out) {
            let at = self.out_streams.get(&k).and_then(|s| s.probe_at);
            self.stream_timers.probes.set(k, at);
        }
    }

    /// Mark a record to be written at the end of the step.
    pub(crate) fn touch(&mut self, d: Dirty) {
        match d {
            Dirty::Outbox(id) => self.outbox_index.touch(id),
            Dirty::In(dev, conv) => {
                self.stream_timers.touched_in.insert((dev, conv));
            }
            Dirty::Out(dev, conv) => {
                self.stream_timers.touched_out.insert((dev, conv));
            }
            _ => {}
        }
        self.dirty.insert(d);
    }

    pub(crate) fn event(&mut self, e: Event) {
        self.step.events.push(e);
    }

    /// Jittered exponential delay: `base · 2^attempt` capped at `max`, then
    /// ±20 % from the engine's RNG.
    pub(crate) fn backoff(&mut self, base: u64, max: u64, attempt: u32) -> u64 {
        let d = base.saturating_mul(1u64 << attempt.min(30)).min(max);
        let spread = d / 5;
        if spread == 0 {
            return d;
        }
        let r = self.rng.next_u64() % (2 * spread + 1);
        d - spread + r
    }

    /// Double a delay (starting from `base`) up to `max`, with jitter.
    pub(crate) fn next_delay(&mut self, current: u64, base: u64, max: u64) -> u64 {
        let d = if current == 0 {
            base
        } else {
            current.saturating_mul(2).min(max)
        };
        let spread = d / 5;
        if spread == 0 {
            return d;
        }
        let r = self.rng.next_u64() % (2 * spread + 1);
        d - spread + r
    }

    /// This device's entry in its user's list, with the device's own
    /// membership proof (other entries of a merged list keep theirs).
    pub(crate) fn own_entry(&self) -> DeviceEntry {
        crate::sig::device_entry(&self.device.identity, &self.user_key(), self.device.device)
    }

    pub(crate) fn mint_id(&mut self, now: u64) -> MessageId {
        MessageId::new(now, random_array(&mut self.rng))
    }

    /// The user a device belongs to and its listed keys, from verified lists.
    ///
    /// A device named by the lists of two users is attributed to neither:
    /// membership proofs make that impossible unless the device itself signed
    /// for both (a hostile device), and guessing would let one user's
    /// messages pass as the other's, or one conversation be encrypted to the
    /// other user's device. [`Engine::claimants`] reports such devices.
    pub(crate) fn peer(&self, d: &DeviceId) -> Option<(UserKey, DeviceEntry)> {
        let mut found = None;
        let me = self.user_key();
        let own = self.own.known.devices().map(|e| (me, e));
        let theirs = self
            .contacts
            .values()
            .filter(|c| c.user != me)
            .flat_map(|c| c.known.devices().map(move |e| (c.user, e)));
        for (user, e) in own.chain(theirs).filter(|(_, e)| e.device == *d) {
            if found.is_some() {
                return None;
            }
            found = Some((user, e.clone()));
        }
        found
    }

    /// Every user whose verified list names device `d` (more than one means
    /// the device is attributed to nobody, see [`Engine::peer`]).
    pub(crate) fn claimants(&self, d: &DeviceId) -> Vec<UserKey> {
        let mut users = Vec::new();
        if self.own.known.contains(d) {
            users.push(self.user_key());
        }
        users.extend(
            self.contacts
                .values()
                .filter(|c| c.user != self.user_key() && c.known.contains(d))
                .map(|c| c.user),
        );
        users
    }
}
