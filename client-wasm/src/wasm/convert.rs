//! Conversions at the JavaScript boundary: engine events and history entries
//! become plain JS objects, failures become JS `Error`s, option objects are
//! read field by field.
//!
//! Plain objects (not wasm-bindgen classes) keep the JS side idiomatic:
//! events can be logged, spread, compared and sent through `postMessage`,
//! and nothing has to be `free()`d.

use crate::{ClientError, ConnectionState, Counters, Event, HistoryEntry, MessageState, Removal};
use crate::{GroupInfo, HistoryRecord, StorageError};
use hush_protocol::{ConversationId, UserKey};
use js_sys::{Array, Object, Reflect};
use std::cell::RefCell;
use std::collections::HashMap;
use wasm_bindgen::{JsCast, JsValue};

/// A failure as JavaScript sees it: a stable machine-readable `code` and a
/// message for people. Thrown as an `Error` named `HushError` carrying `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub code: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// An argument or option the caller passed is missing or malformed.
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new("invalid_argument", message)
    }

    /// The client was closed (or failed for good) before the call.
    pub fn closed() -> Self {
        Failure::new("closed", "the client is closed")
    }

    /// The JS `Error` to throw.
    pub fn to_js(&self) -> JsValue {
        let err = js_sys::Error::new(&self.message);
        err.set_name("HushError");
        // Setting a property on a fresh Error object cannot fail.
        let _ = Reflect::set(&err, &"code".into(), &self.code.into());
        err.into()
    }
}

impl From<Failure> for JsValue {
    fn from(f: Failure) -> JsValue {
        f.to_js()
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Storage(_) => "storage",
            ClientError::Crypto(_) => "crypto",
            ClientError::Protocol(_) => "protocol",
            ClientError::BadCode(_) => "bad_code",
            ClientError::Unknown(_) => "unknown",
            ClientError::NotAllowed(_) => "not_allowed",
            ClientError::TooLarge { .. } => "too_large",
            ClientError::NoDevice => "no_device",
            ClientError::SelfTest(_) => "self_test",
            ClientError::Archive(_) => "archive",
        };
        Failure::new(code, e.to_string())
    }
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        Failure::from(ClientError::from(e))
    }
}

thread_local! {
    /// Field names as JS strings, made once.
    static KEYS: RefCell<HashMap<&'static str, JsValue>> = RefCell::new(HashMap::new());
}

/// Builds a plain object field by field.
pub(crate) struct Obj(Object);

impl Obj {
    pub fn new() -> Self {
        Obj(Object::new())
    }

    /// A typed event object: `{ type, ... }`.
    pub fn event(kind: &str) -> Self {
        Obj::new().set("type", kind)
    }

    pub fn set(self, key: &'static str, value: impl Into<JsValue>) -> Self {
        self.set_ref(key, &value.into())
    }

    /// Set a field to a value the caller keeps (a cached string).
    pub fn set_ref(self, key: &'static str, value: &JsValue) -> Self {
        // Field names become JS strings once per page, not once per object
        // (a 100,000-message backlog builds a million fields).
        KEYS.with(|keys| {
            let mut keys = keys.borrow_mut();
            let key = keys.entry(key).or_insert_with(|| JsValue::from_str(key));
            // Defining a data property on a plain, non-frozen object cannot fail.
            let _ = Reflect::set(&self.0, key, value);
        });
        self
    }

    /// u64 values as JS numbers: seqs, counters and timestamps stay far below
    /// 2^53 in practice, and numbers are what JS code compares and sorts.
    pub fn num(self, key: &'static str, value: u64) -> Self {
        self.set(key, value as f64)
    }

    pub fn build(self) -> JsValue {
        self.0.into()
    }
}

pub(crate) fn state_name(s: MessageState) -> &'static str {
    match s {
        MessageState::Sending => "sending",
        MessageState::Stored => "stored",
        MessageState::Delivered => "delivered",
        MessageState::Read => "read",
        MessageState::Failed => "failed",
        MessageState::RecipientInboxFull => "recipient-inbox-full",
    }
}

pub(crate) fn connection_name(s: ConnectionState) -> &'static str {
    match s {
        ConnectionState::Offline => "offline",
        ConnectionState::Connecting => "connecting",
        ConnectionState::Syncing => "syncing",
        ConnectionState::Live => "live",
    }
}

fn removal_name(r: Removal) -> &'static str {
    match r {
        Removal::Recalled => "recalled",
        Removal::Deleted => "deleted",
    }
}

/// Looks up the display name of the contact a conversation is with, and
/// the groups.
pub(crate) trait ContactNames {
    fn contact_of(&self, conversation: &ConversationId) -> Option<String>;
    fn name_of(&self, user: &UserKey) -> Option<String>;
    /// The group a conversation is, if it is one.
    fn group_of(&self, conversation: &ConversationId) -> Option<GroupInfo>;
    /// This user.
    fn me(&self) -> Option<UserKey>;
}

impl ContactNames for crate::Engine {
    fn contact_of(&self, conversation: &ConversationId) -> Option<String> {
        self.contacts()
            .into_iter()
            .find(|(_, _, c)| c == conversation)
            .map(|(_, name, _)| name)
    }

    fn name_of(&self, user: &UserKey) -> Option<String> {
        self.contacts()
            .into_iter()
            .find(|(u, _, _)| u == user)
            .map(|(_, name, _)| name)
    }

    fn group_of(&self, conversation: &ConversationId) -> Option<GroupInfo> {
        self.group(conversation)
    }

    fn me(&self) -> Option<UserKey> {
        Some(self.user_key())
    }
}

/// How a user is shown: "me", the contact's name, or null.
pub(crate) fn user_name(user: &UserKey, names: &dyn ContactNames) -> JsValue {
    if names.me().as_ref() == Some(user) {
        return JsValue::from_str("me");
    }
    opt_str(names.name_of(user))
}

/// `[{ user, name }]` of a group's members.
fn members(g: &GroupInfo, names: &dyn ContactNames) -> Array {
    g.members
        .iter()
        .map(|u| {
            Obj::new()
                .set("user", u.to_hex())
                .set("name", user_name(u, names))
                .build()
        })
        .collect()
}

/// A `GroupInfo` (`kind` None) or `GroupEvent` (`kind` "group") object.
pub(crate) fn group_obj(event: bool, g: &GroupInfo, names: &dyn ContactNames) -> JsValue {
    let obj = if event {
        Obj::event("group")
    } else {
        Obj::new()
    };
    obj.set("group", g.id.to_hex())
        .set("name", g.name.as_str())
        .set("members", members(g, names))
        .set("active", g.active)
        .build()
}

fn opt_str(v: Option<String>) -> JsValue {
    v.map(JsValue::from).unwrap_or(JsValue::NULL)
}

fn record_fields(obj: Obj, r: &HistoryRecord, names: &dyn ContactNames) -> Obj {
    obj.set("id", r.id.to_hex())
        .set("conversation", r.conversation.to_hex())
        .set("contact", opt_str(names.contact_of(&r.conversation)))
        .set(
            "group",
            opt_str(names.group_of(&r.conversation).map(|g| g.name)),
        )
        .set("from", user_name(&r.from_user, names))
        .set("fromUser", r.from_user.to_hex())
        .set("fromDevice", r.from_device.to_hex())
        .num("senderSeq", r.sender_seq)
        .num("sentAt", r.sent_at_ms)
        .num("storedAt", r.stored_at_ms)
        .set("text", r.text.as_str())
        .set("outgoing", r.outgoing)
}

/// One history entry as `{ id, conversation, contact, ..., order, read, state }`.
pub(crate) fn history_entry(e: &HistoryEntry, names: &dyn ContactNames) -> JsValue {
    record_fields(Obj::new(), &e.record, names)
        .num("order", e.order)
        .set("read", e.read)
        .set(
            "state",
            e.state
                .map(|s| JsValue::from_str(state_name(s)))
                .unwrap_or(JsValue::NULL),
        )
        .build()
}

/// Contact names looked up once for a whole step's events, rather than
/// once per message, and the JS strings that repeat from message to message
/// (conversation, contact, author user and device) made once per step.
pub(crate) struct NameCache {
    me: UserKey,
    contacts: Vec<(UserKey, String, ConversationId)>,
    groups: Vec<GroupInfo>,
    /// conversation → (hex, contact name or null, group name or null)
    conversations: RefCell<HashMap<ConversationId, (JsValue, JsValue, JsValue)>>,
    users: RefCell<HashMap<UserKey, JsValue>>,
    devices: RefCell<HashMap<hush_protocol::DeviceId, JsValue>>,
}

impl NameCache {
    pub fn new(engine: &crate::Engine) -> Self {
        NameCache {
            me: engine.user_key(),
            contacts: engine.contacts(),
            groups: engine.groups(),
            conversations: RefCell::default(),
            users: RefCell::default(),
            devices: RefCell::default(),
        }
    }

    /// A `message` event, with the repeating strings from the cache.
    fn message(&self, r: &HistoryRecord) -> JsValue {
        let mut convs = self.conversations.borrow_mut();
        let (conv_hex, contact, group) = convs.entry(r.conversation).or_insert_with(|| {
            (
                JsValue::from(r.conversation.to_hex()),
                opt_str(self.contact_of(&r.conversation)),
                opt_str(self.group_of(&r.conversation).map(|g| g.name)),
            )
        });
        let mut users = self.users.borrow_mut();
        let user = users
            .entry(r.from_user)
            .or_insert_with(|| JsValue::from(r.from_user.to_hex()));
        let mut devices = self.devices.borrow_mut();
        let device = devices
            .entry(r.from_device)
            .or_insert_with(|| JsValue::from(r.from_device.to_hex()));
        Obj::event("message")
            .set("id", r.id.to_hex())
            .set_ref("conversation", conv_hex)
            .set_ref("contact", contact)
            .set_ref("group", group)
            .set("from", user_name(&r.from_user, self))
            .set_ref("fromUser", user)
            .set_ref("fromDevice", device)
            .num("senderSeq", r.sender_seq)
            .num("sentAt", r.sent_at_ms)
            .num("storedAt", r.stored_at_ms)
            .set("text", r.text.as_str())
            .set("outgoing", r.outgoing)
            .build()
    }
}

impl ContactNames for NameCache {
    fn contact_of(&self, conversation: &ConversationId) -> Option<String> {
        self.contacts
            .iter()
            .find(|(_, _, c)| c == conversation)
            .map(|(_, name, _)| name.clone())
    }

    fn name_of(&self, user: &UserKey) -> Option<String> {
        self.contacts
            .iter()
            .find(|(u, _, _)| u == user)
            .map(|(_, name, _)| name.clone())
    }

    fn group_of(&self, conversation: &ConversationId) -> Option<GroupInfo> {
        self.groups.iter().find(|g| g.id == *conversation).cloned()
    }

    fn me(&self) -> Option<UserKey> {
        Some(self.me)
    }
}

/// A step's events as `(channel, object)` pairs, in order, for the
/// listeners there are.
///
/// A `message` object (ten fields, four hex ids) is only built when someone
/// listens to `message` or `*`. A step that delivered messages also ends
/// with one `messages` summary — how many per conversation — which is what
/// a page showing a large backlog needs: it reads the messages it actually
/// shows from history.
pub(crate) fn events(
    events: &[Event],
    engine: &crate::Engine,
    listeners: &super::driver::Listeners,
) -> Vec<(&'static str, JsValue)> {
    let names = NameCache::new(engine);
    let each_message = listeners.has("message");
    let summary = listeners.has("messages");
    let mut out = Vec::with_capacity(if each_message { events.len() } else { 4 });
    // (conversation, messages, of which received)
    let mut counts: Vec<(ConversationId, u64, u64)> = Vec::new();
    for e in events {
        if let Event::Message(r) = e {
            if summary {
                match counts.iter_mut().find(|(c, _, _)| *c == r.conversation) {
                    Some((_, n, incoming)) => {
                        *n += 1;
                        *incoming += u64::from(!r.outgoing);
                    }
                    None => counts.push((r.conversation, 1, u64::from(!r.outgoing))),
                }
            }
            if each_message {
                out.push(("message", names.message(r)));
            }
            continue;
        }
        out.push(event(e, &names));
    }
    if !counts.is_empty() {
        let total: u64 = counts.iter().map(|(_, n, _)| n).sum();
        let per = counts
            .iter()
            .map(|(c, n, incoming)| {
                Obj::new()
                    .set("conversation", c.to_hex())
                    .set("contact", opt_str(names.contact_of(c)))
                    .set("group", opt_str(names.group_of(c).map(|g| g.name)))
                    .num("count", *n)
                    .num("incoming", *incoming)
                    .build()
            })
            .collect::<Array>();
        out.push((
            "messages",
            Obj::event("messages")
                .num("count", total)
                .set("conversations", per)
                .build(),
        ));
    }
    out
}

/// The listener channel an event goes to and its object.
pub(crate) fn event(e: &Event, names: &dyn ContactNames) -> (&'static str, JsValue) {
    match e {
        Event::Message(r) => (
            "message",
            record_fields(Obj::event("message"), r, names).build(),
        ),
        Event::MessageState {
            id,
            conversation,
            state,
        } => (
            "state",
            Obj::event("state")
                .set("id", id.to_hex())
                .set("conversation", conversation.to_hex())
                .set("state", state_name(*state))
                .build(),
        ),
        Event::MessageRemoved {
            id,
            conversation,
            reason,
        } => (
            "removed",
            Obj::event("removed")
                .set("id", id.to_hex())
                .set("conversation", conversation.to_hex())
                .set("reason", removal_name(*reason))
                .build(),
        ),
        Event::ReadSynced { conversation, ids } => (
            "read",
            Obj::event("read")
                .set("conversation", conversation.to_hex())
                .set("ids", hex_array(ids.iter().map(|i| i.to_hex())))
                .build(),
        ),
        Event::SyncProgress { done, total } => (
            "progress",
            Obj::event("progress")
                .num("done", *done)
                .num("total", *total)
                .build(),
        ),
        Event::GapDetected {
            conversation,
            from_device,
            count,
        } => gap("detected", conversation, from_device, *count, names),
        Event::GapRecovered {
            conversation,
            from_device,
            count,
        } => gap("recovered", conversation, from_device, *count, names),
        Event::Unrecoverable {
            conversation,
            from_device,
            count,
        } => gap("unrecoverable", conversation, from_device, *count, names),
        Event::RelayMisbehaviour {
            conversation,
            from_device,
            count,
        } => (
            "relayMisbehaviour",
            Obj::event("relayMisbehaviour")
                .set("conversation", conversation.to_hex())
                .set("contact", opt_str(names.contact_of(conversation)))
                .set("fromDevice", from_device.to_hex())
                .num("count", *count)
                .build(),
        ),
        Event::KeyRotation { device, epoch } => (
            "rotation",
            Obj::event("rotation")
                .set("device", device.to_hex())
                .num("epoch", *epoch)
                .build(),
        ),
        Event::Connection(s) => (
            "connection",
            Obj::event("connection")
                .set("state", connection_name(*s))
                .build(),
        ),
        Event::ContactAdded {
            user,
            name,
            conversation,
        } => (
            "contact",
            Obj::event("contact")
                .set("user", user.to_hex())
                .set("name", name.as_str())
                .set("conversation", conversation.to_hex())
                .build(),
        ),
        Event::DevicesChanged { user, devices } => (
            "devices",
            Obj::event("devices")
                .set("user", user.to_hex())
                .set("contact", opt_str(names.name_of(user)))
                .set("devices", hex_array(devices.iter().map(|d| d.to_hex())))
                .build(),
        ),
        Event::DeviceLinked { device } => (
            "linked",
            Obj::event("linked")
                .set("device", device.to_hex())
                .set("self", false)
                .build(),
        ),
        Event::Linked => ("linked", Obj::event("linked").set("self", true).build()),
        Event::GroupChanged { group } => (
            "group",
            match names.group_of(group) {
                Some(g) => group_obj(true, &g, names),
                // A group this device no longer keeps: its id only.
                None => Obj::event("group")
                    .set("group", group.to_hex())
                    .set("active", false)
                    .build(),
            },
        ),
        Event::HistoryImport { done, total } => (
            "history",
            Obj::event("history")
                .num("done", *done)
                .num("total", *total)
                .build(),
        ),
        Event::HistoryExportWanted { device } => (
            "history_export",
            Obj::event("history_export")
                .set("device", device.to_hex())
                .build(),
        ),
        Event::HistoryExported { device, messages } => (
            "history_exported",
            Obj::event("history_exported")
                .set("device", device.to_hex())
                .num("messages", *messages)
                .build(),
        ),
        Event::Removed => ("device_removed", Obj::event("device_removed").build()),
        Event::Retired { last_seen_ms } => (
            "retired",
            Obj::event("retired")
                .num("lastSeenMs", *last_seen_ms)
                .build(),
        ),
        Event::Warning(message) => (
            "warning",
            Obj::event("warning")
                .set("message", message.as_str())
                .build(),
        ),
    }
}

fn gap(
    kind: &'static str,
    conversation: &ConversationId,
    from_device: &hush_protocol::DeviceId,
    count: u64,
    names: &dyn ContactNames,
) -> (&'static str, JsValue) {
    (
        "gap",
        Obj::event("gap")
            .set("kind", kind)
            .set("conversation", conversation.to_hex())
            .set("contact", opt_str(names.contact_of(conversation)))
            .set("fromDevice", from_device.to_hex())
            .num("count", count)
            .build(),
    )
}

/// A warning from the driver itself (connection attempts, storage rebuilds).
pub(crate) fn warning(message: &str) -> JsValue {
    Obj::event("warning").set("message", message).build()
}

/// A failure the driver recovered from by rebuilding the engine from
/// storage (or could not recover from, when `fatal`).
pub(crate) fn error_event(f: &Failure, fatal: bool) -> JsValue {
    Obj::event("error")
        .set("code", f.code)
        .set("message", f.message.as_str())
        .set("fatal", fatal)
        .build()
}

pub(crate) fn counters(c: &Counters) -> JsValue {
    Obj::new()
        .num("duplicatesDropped", c.duplicates_dropped)
        .num("outOfOrder", c.out_of_order)
        .num("gapsDetected", c.gaps_detected)
        .num("recovered", c.recovered)
        .num("unrecoverable", c.unrecoverable)
        .num("rejected", c.rejected)
        .num("resent", c.resent)
        .num("probes", c.probes)
        .num("suppressed", c.suppressed)
        .num("relayClaimsIgnored", c.relay_claims_ignored)
        .num("relayClaimsRefuted", c.relay_claims_refuted)
        .num("peerClaimsIgnored", c.peer_claims_ignored)
        .num("parkedDropped", c.parked_dropped)
        .num("recallsRefused", c.recalls_refused)
        .num("undecryptableSkipped", c.undecryptable_skipped)
        .num("inboxFullRefusals", c.inbox_full_refusals)
        .num("syncs", c.syncs)
        .num("syncLatencyMsTotal", c.sync_latency_ms_total)
        .num("lastSyncLatencyMs", c.last_sync_latency_ms)
        .num("listNotices", c.list_notices)
        .num("oldListsIgnored", c.old_lists_ignored)
        .num("retired", c.retired)
        .num("removed", c.removed)
        .build()
}

pub(crate) fn hex_array(items: impl Iterator<Item = String>) -> JsValue {
    items.map(JsValue::from).collect::<Array>().into()
}

/// Reads optional fields of an options object.
pub(crate) struct Options<'a>(&'a JsValue);

impl<'a> Options<'a> {
    /// `undefined`/`null` read as an empty options object; anything else
    /// that is not an object is an error.
    pub fn new(value: &'a JsValue, what: &str) -> Result<Self, Failure> {
        if value.is_undefined() || value.is_null() || value.is_object() {
            Ok(Options(value))
        } else {
            Err(Failure::invalid(format!("{what} must be an object")))
        }
    }

    fn raw(&self, key: &str) -> Option<JsValue> {
        if !self.0.is_object() {
            return None;
        }
        Reflect::get(self.0, &JsValue::from_str(key))
            .ok()
            .filter(|v| !v.is_undefined() && !v.is_null())
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, Failure> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v
                .as_string()
                .map(Some)
                .ok_or_else(|| Failure::invalid(format!("option `{key}` must be a string"))),
        }
    }

    pub fn boolean(&self, key: &str) -> Result<Option<bool>, Failure> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Failure::invalid(format!("option `{key}` must be a boolean"))),
        }
    }

    /// A whole, non-negative number (or a BigInt within u64).
    pub fn whole(&self, key: &str) -> Result<Option<u64>, Failure> {
        let Some(v) = self.raw(key) else {
            return Ok(None);
        };
        let bad = || Failure::invalid(format!("option `{key}` must be a whole number ≥ 0"));
        if let Some(f) = v.as_f64() {
            if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= 9_007_199_254_740_991.0 {
                return Ok(Some(f as u64));
            }
            return Err(bad());
        }
        if let Some(b) = v.dyn_ref::<js_sys::BigInt>() {
            return u64::try_from(b.clone()).map(Some).map_err(|_| bad());
        }
        Err(bad())
    }
}

/// A 32-byte SHA-256 certificate hash from hex (colons and whitespace allowed,
/// as tools print them).
pub(crate) fn cert_hash(text: &str) -> Result<[u8; 32], Failure> {
    let clean: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&clean, &mut out).map_err(|_| {
        Failure::invalid("certHash must be the 64 hex digits of the certificate's SHA-256")
    })?;
    Ok(out)
}

/// The engine's relay address (`host:port`, what contact codes carry) from a
/// WebTransport URL such as `https://127.0.0.1:4433/`.
pub(crate) fn relay_address(url: &str) -> Result<String, Failure> {
    let bad = || Failure::invalid(format!("relayUrl `{url}` is not an https:// URL"));
    let rest = url.trim().strip_prefix("https://").ok_or_else(bad)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    // IPv6 literals keep their brackets: `[::1]:4433`.
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    Ok(if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    })
}

/// The WebTransport URL for a stored `host:port` relay address.
pub(crate) fn relay_url(address: &str) -> String {
    format!("https://{address}/")
}
