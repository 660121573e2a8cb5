//! Groups: small encrypted group conversations over the pairwise sessions.
//!
//! A group message is one outbox entry fanned out to every device of every
//! member (and this user's other devices), each copy sealed by the pairwise
//! double ratchet and carried in that device pair's stream for the group,
//! so sender seqs, gap repair, re-sends and tail probes work exactly as in a
//! one-to-one conversation. The relay sees envelopes to devices, never who
//! is in a group or what changed: a group stream's clear conversation id is
//! a pseudonym, [`group_stream`] of (group, sender device, recipient
//! device), which only holders of the group id can compute or link, and
//! every group stream item names its group inside the ciphertext
//! (`GroupMessage`, `GroupChange`, `GroupRecall`). Streams (seqs, receipts,
//! resend requests, the relay's expiry notices) are keyed by the pseudonym;
//! the outbox, history and the group state by the group id.
//!
//! On top of the per-stream order, every group message carries a causal
//! position `(depth, id)`: `refs` names the heads the sender had displayed
//! and `depth` is one more than the deepest of them (Lamport). A received
//! message is held until every message it names is known here (displayed,
//! or declared unavailable by its author device); missing ones are asked of
//! their author device by id (`GroupResend`). Sorting by `(depth, id)` gives
//! the same order on every device, because the position travels inside the
//! authenticated message and never depends on arrival. See docs/CLIENT.md
//! "Groups".
//!
//! Membership is the fold, in position order, of the changes (`GroupOp`)
//! over the snapshot a device joined with; a change by someone who is not a
//! member at its position is skipped. A message counts only if its author is
//! a member at its position.

use super::timers::Timers;
use super::{Command, Engine, Event, Reply, send};
use crate::error::ClientError;
use crate::payload::{
    Body, ContactInfo, GroupOp, GroupRef, GroupSnapshot, MAX_GROUP_MEMBERS, MAX_GROUP_NAME_BYTES,
    MAX_GROUP_REFS, MAX_LIST, MAX_TEXT_BYTES, Payload,
};
use crate::state::{EntryKind, HistoryRecord, MessageState};
use crate::storage::{self, StorageOp, keys};
use hush_protocol::{ConversationId, DeviceId, MessageId, UserKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most messages held (waiting for predecessors) per group and sender
/// device; beyond it the newest is dropped and counted.
pub const MAX_HELD_PER_DEVICE: usize = 256;
/// Most held group messages in all.
pub const MAX_HELD_TOTAL: usize = 4_096;
/// Most incoming streams of groups this device does not know yet (a
/// message of a group can overtake the invitation to it).
pub const MAX_UNKNOWN_GROUP_STREAMS: usize = 64;
/// Most membership changes kept per group; older ones are folded into the
/// base snapshot.
const MAX_OPS: usize = 1_000;
/// A held message whose predecessors never come is released (or dropped,
/// if its group never became known) after this many resend intervals.
const GIVE_UP_ROUNDS: u64 = 10;

const GROUP: &[u8] = b"s/group/";
const GKNOWN: &[u8] = b"s/gmsg/";
const GHELD: &[u8] = b"s/gheld/";
const GREAD: &[u8] = b"s/gread/";
const GCOUNT: &[u8] = b"s/gcount";
const GSTREAM: &[u8] = b"s/gstream/";
const H_GORDER: &[u8] = b"h/gorder/";

/// A group as the app sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group's conversation id.
    pub id: ConversationId,
    /// Its name.
    pub name: String,
    /// Current members (this user included while a member).
    pub members: Vec<UserKey>,
    /// False after this user left or was removed.
    pub active: bool,
}

/// A group message's place in the group order. Sorting a group's messages
/// by it (derived `Ord`: depth, then id) gives the same order on every
/// device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupPosition {
    /// Lamport depth (one more than the deepest message it follows).
    pub depth: u64,
    /// The message id (breaks ties).
    pub id: MessageId,
}

/// Group quality counters (`Engine::group_counters`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCounters {
    /// Messages that arrived before one they follow and were held.
    pub held: u64,
    /// Held messages dropped because the bound on held messages was full
    /// (per sender device and group, or in all).
    pub held_dropped: u64,
    /// Group messages dropped because their author was not a member at
    /// their position (or this user was not).
    pub non_member_dropped: u64,
    /// Group messages dropped as malformed (a depth not above the ones they
    /// name, a plain text in a group stream, a group that never came).
    pub invalid_dropped: u64,
    /// Missing predecessors asked of their author device.
    pub refs_requested: u64,
    /// Predecessors declared unavailable (by their author, or given up).
    pub refs_unavailable: u64,
    /// Recalls refused because the recaller did not write the message.
    pub recalls_refused: u64,
}

/// One membership change in a group's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OpEntry {
    pub pos: GroupPosition,
    pub author: UserKey,
    pub op: GroupOp,
}

/// `s/group/<group 16>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupRecord {
    /// Current name and members (the fold of `ops` over the base).
    pub name: String,
    pub members: BTreeSet<UserKey>,
    pub active: bool,
    /// The state this device joined with, and where.
    pub base_name: String,
    pub base_members: BTreeSet<UserKey>,
    pub base_pos: GroupPosition,
    /// Changes after the base, in position order.
    pub ops: Vec<OpEntry>,
    /// Displayed messages nothing displayed follows yet (depth, id, device).
    pub heads: BTreeSet<(u64, MessageId, DeviceId)>,
}

/// `s/gmsg/<group 16><msg 16>`: a group message known here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Known {
    pub depth: u64,
    pub author: UserKey,
    pub device: DeviceId,
    /// Applied here (displayed, or a change applied); false if declared
    /// unavailable or dropped.
    pub shown: bool,
    /// A text message (shown in history) rather than a change.
    pub text: bool,
}

/// `s/gheld/<group 16><msg 16>`: a group message waiting for predecessors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Held {
    pub payload: Payload,
    pub from_user: UserKey,
    pub from_device: DeviceId,
    pub seq: u64,
    pub since_ms: u64,
    pub request_at: u64,
    pub request_delay_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum GDirty {
    Group(ConversationId),
    Known(ConversationId, MessageId),
    Held(ConversationId, MessageId),
    Read(MessageId),
    Stream(DeviceId, ConversationId),
    Counters,
}

/// Everything groups keep (loaded at start).
#[derive(Debug, Default)]
pub(crate) struct GroupState {
    pub records: BTreeMap<ConversationId, GroupRecord>,
    pub known: BTreeMap<(ConversationId, MessageId), Known>,
    pub held: BTreeMap<(ConversationId, MessageId), Held>,
    /// `held`'s request times by due time (derived; see `super::timers`),
    /// and the held messages changed since they were last indexed.
    pub held_timers: Timers<(ConversationId, MessageId)>,
    pub held_touched: BTreeSet<(ConversationId, MessageId)>,
    /// Per own group message: members whose user read it.
    pub reads: BTreeMap<MessageId, BTreeSet<UserKey>>,
    pub counters: GroupCounters,
    /// Incoming group streams: (sender device, pseudonym) → group.
    pub streams: BTreeMap<(DeviceId, ConversationId), ConversationId>,
    pub dirty: BTreeSet<GDirty>,
}

/// The clear conversation id of `group`'s stream from device `from` to
/// device `to` (docs/PROTOCOL.md, "Group streams").
pub fn group_stream(
    group: &ConversationId,
    from: &DeviceId,
    to: &DeviceId,
) -> Result<ConversationId, ClientError> {
    Ok(ConversationId(hush_crypto::group_stream_id(
        group.as_bytes(),
        from.as_bytes(),
        to.as_bytes(),
    )?))
}

fn gkey(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// Key of a group message's order record: `h/gorder/<group 16><depth 8
/// BE><msg 16>`, so a prefix scan returns the group's messages in the group
/// order.
pub fn group_order_key(group: &ConversationId, pos: &GroupPosition) -> Vec<u8> {
    gkey(
        H_GORDER,
        &[
            group.as_bytes(),
            &pos.depth.to_be_bytes(),
            pos.id.as_bytes(),
        ],
    )
}

/// Prefix of a group's order records.
pub fn group_order_prefix(group: &ConversationId) -> Vec<u8> {
    gkey(H_GORDER, &[group.as_bytes()])
}

/// A group's history in the group order, read from storage alone (no
/// engine): every message listed under [`group_order_prefix`] that is still
/// in history (not deleted or recalled), oldest first. `HistoryEntry::order`
/// is the message's index in this list.
pub fn group_history<S: crate::storage::Storage + ?Sized>(
    storage: &S,
    group: &ConversationId,
) -> Result<Vec<crate::storage::HistoryEntry>, crate::error::StorageError> {
    let mut out = Vec::new();
    for (k, _) in storage.scan_prefix(&group_order_prefix(group))? {
        let id = MessageId(
            k.get(k.len().saturating_sub(16)..)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .ok_or_else(|| corrupt(&k))?,
        );
        if storage.get(&keys::tombstone(&id))?.is_some() {
            continue;
        }
        let Some(record) = crate::storage::history_message(storage, group, &id)? else {
            continue;
        };
        let read = storage.get(&keys::history_read(&id))?.is_some();
        let skey = keys::history_state(&id);
        let state = match storage.get(&skey)? {
            Some(raw) => Some(storage::decode::<MessageState>(&skey, &raw)?),
            None => None,
        };
        out.push(crate::storage::HistoryEntry {
            order: out.len() as u64,
            record,
            read,
            state,
        });
    }
    Ok(out)
}

fn corrupt(k: &[u8]) -> crate::error::StorageError {
    crate::error::StorageError::Corrupt {
        key: keys::printable(k),
    }
}

/// Name and members after applying `ops` (in order) over a base; a change
/// whose author is not a member at that point is skipped.
fn fold<'a>(
    name: &str,
    members: &BTreeSet<UserKey>,
    ops: impl Iterator<Item = &'a OpEntry>,
) -> (String, BTreeSet<UserKey>) {
    let mut name = name.to_string();
    let mut members = members.clone();
    for o in ops {
        if !members.contains(&o.author) {
            continue;
        }
        match &o.op {
            GroupOp::Create => {}
            GroupOp::Add { members: m } => {
                for u in m {
                    if members.len() < MAX_GROUP_MEMBERS {
                        members.insert(UserKey(*u));
                    }
                }
            }
            GroupOp::Remove { members: m } => {
                for u in m {
                    members.remove(&UserKey(*u));
                }
            }
            GroupOp::Leave => {
                members.remove(&o.author);
            }
            GroupOp::Rename { name: n } => name = n.clone(),
        }
    }
    (name, members)
}

impl GroupRecord {
    fn members_at(&self, pos: &GroupPosition) -> BTreeSet<UserKey> {
        if *pos <= self.base_pos {
            return self.base_members.clone();
        }
        fold(
            &self.base_name,
            &self.base_members,
            self.ops.iter().take_while(|o| o.pos < *pos),
        )
        .1
    }

    fn refold(&mut self, me: &UserKey) {
        while self.ops.len() > MAX_OPS {
            let first = self.ops.remove(0);
            let (n, m) = fold(&self.base_name, &self.base_members, std::iter::once(&first));
            self.base_name = n;
            self.base_members = m;
            self.base_pos = first.pos;
        }
        let (n, m) = fold(&self.base_name, &self.base_members, self.ops.iter());
        self.name = n;
        self.members = m;
        self.active = self.members.contains(me);
    }

    fn add_head(&mut self, depth: u64, id: MessageId, device: DeviceId, refs: &[GroupRef]) {
        self.heads
            .retain(|(_, h, _)| !refs.iter().any(|r| r.id == *h));
        self.heads.insert((depth, id, device));
        while self.heads.len() > MAX_GROUP_REFS {
            self.heads.pop_first();
        }
    }
}

/// A payload as the engine keeps group items: the group named inside split
/// off (see [`Body::split_group`]).
fn split(p: Payload) -> (Option<ConversationId>, Payload) {
    let (group, body) = p.body.split_group();
    (group, Payload { id: p.id, body })
}

fn position(p: &Payload) -> Option<(GroupPosition, &[GroupRef])> {
    match &p.body {
        Body::GroupText { depth, refs, .. } | Body::GroupControl { depth, refs, .. } => Some((
            GroupPosition {
                depth: *depth,
                id: p.id,
            },
            refs,
        )),
        _ => None,
    }
}

impl Engine {
    // ----- public views -----

    /// Every group this device knows (also the ones it left).
    pub fn groups(&self) -> Vec<GroupInfo> {
        self.groups
            .records
            .iter()
            .map(|(id, r)| info(id, r))
            .collect()
    }

    /// One group.
    pub fn group(&self, id: &ConversationId) -> Option<GroupInfo> {
        self.groups.records.get(id).map(|r| info(id, r))
    }

    /// The group order: ids of the group's displayed messages (not
    /// recalled or deleted), sorted by [`GroupPosition`]. Every member
    /// device that displayed the same messages returns them in the same
    /// order. (Storage holds the same order under
    /// [`group_order_prefix`], for apps reading history without an engine.)
    pub fn group_order(&self, group: &ConversationId) -> Vec<MessageId> {
        let mut v: Vec<(GroupPosition, MessageId)> = self
            .groups
            .known
            .range((*group, MessageId([0; 16]))..=(*group, MessageId([0xff; 16])))
            .filter(|(_, k)| k.shown && k.text)
            .filter(|((c, id), k)| {
                !self.recalls.contains_key(&(*c, k.author, *id))
                    && self.tombs.get(id).is_none_or(|t| t.conversation != *c)
            })
            .map(|((_, id), k)| {
                (
                    GroupPosition {
                        depth: k.depth,
                        id: *id,
                    },
                    *id,
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// A group message's position (for inserting a live `Event::Message`
    /// into a displayed list).
    pub fn group_position(&self, group: &ConversationId, id: &MessageId) -> Option<GroupPosition> {
        self.groups
            .known
            .get(&(*group, *id))
            .filter(|k| k.shown)
            .map(|k| GroupPosition {
                depth: k.depth,
                id: *id,
            })
    }

    /// Per member, the delivery state of a group message this device sent
    /// (while it is in the outbox): `Read` if a device of the member read
    /// it, `Delivered` if one stored it, `Stored` once the relay holds it
    /// for all of the member's devices.
    pub fn member_states(&self, id: &MessageId) -> Vec<(UserKey, MessageState)> {
        let Some(o) = self.outbox.get(id) else {
            return Vec::new();
        };
        if o.kind != EntryKind::Chat || !self.groups.records.contains_key(&o.conversation) {
            return Vec::new();
        }
        let mut per: BTreeMap<UserKey, (bool, bool)> = BTreeMap::new();
        for t in o.targets.iter().filter(|t| t.recipient && !t.gone) {
            let Some((u, _)) = self.peer(&t.device) else {
                continue;
            };
            let e = per.entry(u).or_insert((false, true));
            e.0 |= t.delivered;
            e.1 &= t.stored || t.delivered;
        }
        let reads = self.groups.reads.get(id);
        per.into_iter()
            .map(|(u, (delivered, stored))| {
                let s = if reads.is_some_and(|r| r.contains(&u)) {
                    MessageState::Read
                } else if delivered {
                    MessageState::Delivered
                } else if stored {
                    MessageState::Stored
                } else if o.state == MessageState::Failed {
                    MessageState::Failed
                } else {
                    MessageState::Sending
                };
                (u, s)
            })
            .collect()
    }

    /// Group quality counters.
    pub fn group_counters(&self) -> GroupCounters {
        self.groups.counters
    }

    // ----- hooks -----

    pub(crate) fn is_group(&self, c: &ConversationId) -> bool {
        self.groups.records.contains_key(c)
    }

    /// The stream an item of chat conversation `conv` travels in to device
    /// `d`: a group's pseudonym, else the conversation itself.
    pub(crate) fn chat_stream(
        &self,
        conv: &ConversationId,
        d: &DeviceId,
    ) -> Result<ConversationId, ClientError> {
        if self.is_group(conv) {
            group_stream(conv, &self.device.device, d)
        } else {
            Ok(*conv)
        }
    }

    /// The group whose stream from this device to `d` is `wire`.
    pub(crate) fn out_group(&self, d: &DeviceId, wire: &ConversationId) -> Option<ConversationId> {
        let me = self.device.device;
        self.groups
            .records
            .keys()
            .find(|g| group_stream(g, &me, d).is_ok_and(|c| c == *wire))
            .copied()
    }

    /// The group whose stream from `d` to this device is `wire`, if known.
    pub(crate) fn in_group(&self, d: &DeviceId, wire: &ConversationId) -> Option<ConversationId> {
        if let Some(g) = self.groups.streams.get(&(*d, *wire)) {
            return Some(*g);
        }
        let me = self.device.device;
        self.groups
            .records
            .keys()
            .find(|g| group_stream(g, d, &me).is_ok_and(|c| c == *wire))
            .copied()
    }

    /// Remember that `wire` from `d` is a stream of a known group (checked
    /// for every envelope of a stream not mapped yet that is not a
    /// one-to-one conversation).
    pub(crate) fn map_group_stream(&mut self, d: &DeviceId, wire: &ConversationId) {
        if self.groups.streams.contains_key(&(*d, *wire)) || self.conversations.contains_key(wire) {
            return;
        }
        if let Some(g) = self.in_group(d, wire) {
            self.groups.streams.insert((*d, *wire), g);
            self.gtouch(GDirty::Stream(*d, *wire));
        }
    }

    /// For the app and diagnostics: a group stream's group, else `wire`.
    pub(crate) fn stream_conversation(&self, d: &DeviceId, wire: ConversationId) -> ConversationId {
        self.groups
            .streams
            .get(&(*d, wire))
            .copied()
            .unwrap_or(wire)
    }

    fn gtouch(&mut self, d: GDirty) {
        if let GDirty::Held(conv, id) = d {
            self.groups.held_touched.insert((conv, id));
        }
        self.groups.dirty.insert(d);
    }

    /// Bring `held_timers` up to date with the held messages changed since
    /// they were last read.
    pub(crate) fn reindex_held(&mut self) {
        for k in std::mem::take(&mut self.groups.held_touched) {
            let at = self.groups.held.get(&k).map(|h| h.request_at);
            self.groups.held_timers.set(k, at);
        }
    }

    fn gcount(&mut self, f: impl FnOnce(&mut GroupCounters)) {
        f(&mut self.groups.counters);
        self.gtouch(GDirty::Counters);
    }

    /// Storage ops for the group records changed in this step.
    pub(crate) fn group_ops(&mut self) -> Result<Vec<StorageOp>, ClientError> {
        let mut ops = Vec::new();
        for d in std::mem::take(&mut self.groups.dirty) {
            let (key, value) = match &d {
                GDirty::Group(c) => (
                    gkey(GROUP, &[c.as_bytes()]),
                    self.groups
                        .records
                        .get(c)
                        .map(storage::encode)
                        .transpose()?,
                ),
                GDirty::Known(c, id) => (
                    gkey(GKNOWN, &[c.as_bytes(), id.as_bytes()]),
                    self.groups
                        .known
                        .get(&(*c, *id))
                        .map(storage::encode)
                        .transpose()?,
                ),
                GDirty::Held(c, id) => (
                    gkey(GHELD, &[c.as_bytes(), id.as_bytes()]),
                    self.groups
                        .held
                        .get(&(*c, *id))
                        .map(storage::encode)
                        .transpose()?,
                ),
                GDirty::Read(id) => (
                    gkey(GREAD, &[id.as_bytes()]),
                    self.groups.reads.get(id).map(storage::encode).transpose()?,
                ),
                GDirty::Stream(d, c) => (
                    gkey(GSTREAM, &[d.as_bytes(), c.as_bytes()]),
                    self.groups
                        .streams
                        .get(&(*d, *c))
                        .map(storage::encode)
                        .transpose()?,
                ),
                GDirty::Counters => (
                    GCOUNT.to_vec(),
                    Some(storage::encode(&self.groups.counters)?),
                ),
            };
            ops.push(match value {
                Some(value) => StorageOp::Put { key, value },
                None => StorageOp::Delete { key },
            });
        }
        Ok(ops)
    }

    /// Load one group record; false if the key is not a group key.
    pub(crate) fn load_group_record(&mut self, k: &[u8], v: &[u8]) -> Result<bool, ClientError> {
        if k == GCOUNT {
            self.groups.counters = storage::decode(k, v)?;
        } else if let Some(b) = k.strip_prefix(GROUP) {
            let c = ConversationId(keys::arr(b, 0).ok_or_else(|| corrupt(k))?);
            self.groups.records.insert(c, storage::decode(k, v)?);
        } else if let Some(b) = k.strip_prefix(GKNOWN) {
            let c = ConversationId(keys::arr(b, 0).ok_or_else(|| corrupt(k))?);
            let id = MessageId(keys::arr(b, 16).ok_or_else(|| corrupt(k))?);
            self.groups.known.insert((c, id), storage::decode(k, v)?);
        } else if let Some(b) = k.strip_prefix(GHELD) {
            let c = ConversationId(keys::arr(b, 0).ok_or_else(|| corrupt(k))?);
            let id = MessageId(keys::arr(b, 16).ok_or_else(|| corrupt(k))?);
            self.groups.held.insert((c, id), storage::decode(k, v)?);
            self.groups.held_touched.insert((c, id));
        } else if let Some(b) = k.strip_prefix(GSTREAM) {
            let d = DeviceId(keys::arr(b, 0).ok_or_else(|| corrupt(k))?);
            let c = ConversationId(keys::arr(b, 16).ok_or_else(|| corrupt(k))?);
            self.groups.streams.insert((d, c), storage::decode(k, v)?);
        } else if let Some(b) = k.strip_prefix(GREAD) {
            let id = MessageId(keys::arr(b, 0).ok_or_else(|| corrupt(k))?);
            self.groups.reads.insert(id, storage::decode(k, v)?);
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// Whether an envelope from `user`'s device `d` may open a stream in
    /// `conv`: `Some` for a group or a possible new group, `None` for other
    /// conversations (decided by the caller). Membership itself is checked
    /// per message at its position.
    pub(crate) fn group_stream_allowed(
        &self,
        d: &DeviceId,
        user: &UserKey,
        conv: &ConversationId,
    ) -> Option<bool> {
        let me = self.user_key();
        let peer_ok = *user == me || self.contacts.contains_key(user);
        if self.groups.streams.contains_key(&(*d, *conv)) {
            return Some(peer_ok);
        }
        if self.conversations.contains_key(conv) {
            return None;
        }
        if !peer_ok {
            return Some(false);
        }
        if self.in_streams.contains_key(&(*d, *conv)) {
            return Some(true);
        }
        let my_device = self.device.device;
        let unknown: BTreeSet<&ConversationId> = self
            .in_streams
            .keys()
            .filter(|(dev, c)| {
                !self.conversations.contains_key(c)
                    && !self.groups.streams.contains_key(&(*dev, *c))
                    && *c != crate::codes::control_conversation(&my_device, dev)
            })
            .map(|(_, c)| c)
            .collect();
        Some(unknown.len() < MAX_UNKNOWN_GROUP_STREAMS)
    }

    /// A chat item of a stream that is not a one-to-one conversation, in
    /// sender-seq order. `wire` is the stream's clear conversation id; the
    /// group comes from inside the item, and must be the one `wire` is
    /// derived from (a stream belongs to one group for good).
    pub(crate) fn group_deliver(
        &mut self,
        now: u64,
        d: DeviceId,
        user: UserKey,
        wire: ConversationId,
        seq: u64,
        payload: Payload,
    ) -> Result<(), ClientError> {
        let (named, payload) = split(payload);
        let mapped = self.groups.streams.get(&(d, wire)).copied();
        let conv = match (named, mapped) {
            (Some(g), Some(m)) if g == m => g,
            (Some(g), None) => {
                let me = self.device.device;
                if group_stream(&g, &d, &me)? != wire {
                    self.gcount(|c| c.invalid_dropped += 1);
                    return Ok(());
                }
                self.groups.streams.insert((d, wire), g);
                self.gtouch(GDirty::Stream(d, wire));
                g
            }
            (None, Some(m)) => m,
            // An item kept from before group streams had pseudonyms, whose
            // stream was the group id itself.
            (None, None) if self.groups.records.contains_key(&wire) => wire,
            _ => {
                self.gcount(|c| c.invalid_dropped += 1);
                return Ok(());
            }
        };
        match &payload.body {
            Body::GroupText { .. } | Body::GroupControl { .. } => {}
            Body::Recall { target } => {
                let target = *target;
                match self.groups.known.get(&(conv, target)) {
                    Some(k) if k.shown && k.author != user => {
                        self.gcount(|c| c.recalls_refused += 1);
                    }
                    _ => self.apply_recall(now, conv, user, target),
                }
                return Ok(());
            }
            _ => {
                self.gcount(|c| c.invalid_dropped += 1);
                return Ok(());
            }
        }
        let key = (conv, payload.id);
        if self.groups.known.get(&key).is_some_and(|k| k.shown)
            || self.groups.held.contains_key(&key)
        {
            return Ok(());
        }
        let per_device = self
            .groups
            .held
            .iter()
            .filter(|((c, _), h)| *c == conv && h.from_device == d)
            .count();
        if per_device >= MAX_HELD_PER_DEVICE || self.groups.held.len() >= MAX_HELD_TOTAL {
            self.gcount(|c| c.held_dropped += 1);
            return Ok(());
        }
        let at = now.saturating_add(self.cfg.gap_grace_ms);
        self.groups.held.insert(
            key,
            Held {
                payload,
                from_user: user,
                from_device: d,
                seq,
                since_ms: now,
                request_at: at,
                request_delay_ms: 0,
            },
        );
        self.gtouch(GDirty::Held(key.0, key.1));
        let released = self.group_release(now, conv)?;
        if !released.contains(&key.1) && self.groups.held.contains_key(&key) {
            self.gcount(|c| c.held += 1);
        }
        Ok(())
    }

    /// Apply every held message of `conv` whose predecessors are all known,
    /// lowest position first, until none is ready. Returns the ids applied.
    fn group_release(
        &mut self,
        now: u64,
        conv: ConversationId,
    ) -> Result<Vec<MessageId>, ClientError> {
        let me = self.user_key();
        let mut applied = Vec::new();
        loop {
            let mut ready: Option<(GroupPosition, MessageId)> = None;
            for ((_, id), h) in self
                .groups
                .held
                .range((conv, MessageId([0; 16]))..=(conv, MessageId([0xff; 16])))
            {
                let Some((pos, refs)) = position(&h.payload) else {
                    continue;
                };
                let group_ok = self.groups.records.contains_key(&conv)
                    || matches!(&h.payload.body, Body::GroupControl { snapshot: Some(s), .. }
                        if s.members.iter().any(|m| UserKey(m.user) == me));
                let refs_ok = refs
                    .iter()
                    .all(|r| self.groups.known.contains_key(&(conv, r.id)));
                if group_ok && refs_ok && ready.is_none_or(|(p, _)| pos < p) {
                    ready = Some((pos, *id));
                }
            }
            let Some((_, id)) = ready else {
                break;
            };
            let Some(h) = self.groups.held.remove(&(conv, id)) else {
                break;
            };
            self.gtouch(GDirty::Held(conv, id));
            self.group_apply(now, conv, h)?;
            applied.push(id);
        }
        Ok(applied)
    }

    /// Apply one received group message whose predecessors are known.
    fn group_apply(&mut self, now: u64, conv: ConversationId, h: Held) -> Result<(), ClientError> {
        let me = self.user_key();
        let Some((pos, refs)) = position(&h.payload) else {
            return Ok(());
        };
        let refs = refs.to_vec();
        // The depth must be above every predecessor known here.
        let deepest = refs
            .iter()
            .filter_map(|r| self.groups.known.get(&(conv, r.id)))
            .filter(|k| k.shown)
            .map(|k| k.depth)
            .max()
            .unwrap_or(0);
        if pos.depth <= deepest {
            self.gcount(|c| c.invalid_dropped += 1);
            return Ok(());
        }
        let author = h.from_user;
        let device = h.from_device;
        let id = h.payload.id;
        let joins = match &h.payload.body {
            Body::GroupControl {
                op,
                snapshot: Some(s),
                ..
            } => {
                let in_snapshot = s.members.iter().any(|m| UserKey(m.user) == me);
                let adds_me = match op {
                    GroupOp::Create => true,
                    GroupOp::Add { members } => members.contains(&me.0),
                    _ => false,
                };
                let known_active = self.groups.records.get(&conv).is_some_and(|r| r.active);
                in_snapshot && adds_me && !known_active
            }
            _ => false,
        };
        if joins {
            if let Body::GroupControl {
                snapshot: Some(s), ..
            } = &h.payload.body
            {
                // Join (or re-join): start from the author's snapshot.
                if !s.members.iter().any(|m| UserKey(m.user) == author) {
                    self.gcount(|c| c.non_member_dropped += 1);
                    return Ok(());
                }
                let members: BTreeSet<UserKey> = s
                    .members
                    .iter()
                    .take(MAX_GROUP_MEMBERS)
                    .map(|m| UserKey(m.user))
                    .collect();
                let kept_ops: Vec<OpEntry> = self
                    .groups
                    .records
                    .get(&conv)
                    .map(|r| r.ops.iter().filter(|o| o.pos > pos).cloned().collect())
                    .unwrap_or_default();
                let heads = self
                    .groups
                    .records
                    .get(&conv)
                    .map(|r| r.heads.clone())
                    .unwrap_or_default();
                let mut rec = GroupRecord {
                    name: s.name.clone(),
                    members: members.clone(),
                    active: true,
                    base_name: s.name.clone(),
                    base_members: members,
                    base_pos: pos,
                    ops: kept_ops,
                    heads,
                };
                rec.refold(&me);
                rec.add_head(pos.depth, id, device, &refs);
                self.groups.records.insert(conv, rec);
                self.gtouch(GDirty::Group(conv));
                for m in s.members.clone() {
                    let u = UserKey(m.user);
                    if u != me && !self.contacts.contains_key(&u) {
                        self.add_contact(now, u, m.relay, m.name);
                    }
                }
                self.note_known(conv, id, pos.depth, author, device, false);
                self.event(Event::GroupChanged { group: conv });
            }
            return Ok(());
        }
        let Some(rec) = self.groups.records.get(&conv) else {
            self.gcount(|c| c.invalid_dropped += 1);
            return Ok(());
        };
        let members = rec.members_at(&pos);
        if !members.contains(&author) || !members.contains(&me) {
            self.gcount(|c| c.non_member_dropped += 1);
            // Still known, so what follows it is not held for it forever.
            self.groups.known.insert(
                (conv, id),
                Known {
                    depth: pos.depth,
                    author,
                    device,
                    shown: false,
                    text: false,
                },
            );
            self.gtouch(GDirty::Known(conv, id));
            return Ok(());
        }
        match h.payload.body {
            Body::GroupText {
                text, sent_at_ms, ..
            } => {
                self.note_known(conv, id, pos.depth, author, device, true);
                if let Some(r) = self.groups.records.get_mut(&conv) {
                    r.add_head(pos.depth, id, device, &refs);
                }
                self.gtouch(GDirty::Group(conv));
                let recalled = self.recalls.contains_key(&(conv, author, id));
                let removed = self.tombs.get(&id).is_some_and(|t| t.conversation == conv);
                if recalled || removed {
                    self.counters.suppressed = self.counters.suppressed.saturating_add(1);
                    self.touch(super::Dirty::Counters);
                    return Ok(());
                }
                let record = HistoryRecord {
                    id,
                    conversation: conv,
                    from_user: author,
                    from_device: device,
                    sender_seq: h.seq,
                    sent_at_ms,
                    stored_at_ms: now,
                    text,
                    outgoing: author == me,
                };
                self.store_history(&record)?;
                self.history_ops.push(StorageOp::Put {
                    key: group_order_key(&conv, &pos),
                    value: storage::encode(&())?,
                });
                self.event(Event::Message(record));
            }
            Body::GroupControl { op, .. } => {
                self.note_known(conv, id, pos.depth, author, device, false);
                self.apply_op(now, conv, pos, author, op, &refs, device)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn note_known(
        &mut self,
        conv: ConversationId,
        id: MessageId,
        depth: u64,
        author: UserKey,
        device: DeviceId,
        text: bool,
    ) {
        self.groups.known.insert(
            (conv, id),
            Known {
                depth,
                author,
                device,
                shown: true,
                text,
            },
        );
        self.gtouch(GDirty::Known(conv, id));
    }

    /// Insert a change into the log and refold.
    #[allow(clippy::too_many_arguments)]
    fn apply_op(
        &mut self,
        now: u64,
        conv: ConversationId,
        pos: GroupPosition,
        author: UserKey,
        op: GroupOp,
        refs: &[GroupRef],
        device: DeviceId,
    ) -> Result<(), ClientError> {
        let me = self.user_key();
        let Some(rec) = self.groups.records.get_mut(&conv) else {
            return Ok(());
        };
        let before = rec.members.clone();
        let at = rec.ops.partition_point(|o| o.pos < pos);
        rec.ops.insert(at, OpEntry { pos, author, op });
        rec.refold(&me);
        rec.add_head(pos.depth, pos.id, device, refs);
        let after = rec.members.clone();
        self.gtouch(GDirty::Group(conv));
        // Members this device does not know yet become contacts (their
        // relay and name come with the snapshot of the change that added
        // them, when there is one; otherwise only the key is known and the
        // contact's list is fetched from this relay).
        let relay = self.device.relay.clone();
        for u in after.difference(&before) {
            if *u != me && !self.contacts.contains_key(u) {
                self.add_contact(now, *u, relay.clone(), String::new());
            }
        }
        if before != after {
            self.drop_removed_targets(conv);
        }
        self.event(Event::GroupChanged { group: conv });
        Ok(())
    }

    /// Unsealed targets of group entries on devices of users no longer in
    /// the group are dropped (a removed member gets nothing new); the
    /// change telling them so is kept.
    fn drop_removed_targets(&mut self, conv: ConversationId) {
        let Some(members) = self.groups.records.get(&conv).map(|r| r.members.clone()) else {
            return;
        };
        let me = self.user_key();
        let ids: Vec<MessageId> = self.active.iter().map(|(_, id)| *id).collect();
        for id in ids {
            let Some(o) = self.outbox.get(&id) else {
                continue;
            };
            if o.kind != EntryKind::Chat || o.conversation != conv || !o.resolved {
                continue;
            }
            let is_change = crate::payload::Payload::decode(
                &hush_crypto::open_at_rest(&self.device.at_rest.0, &o.sealed, id.as_bytes())
                    .unwrap_or_default(),
            )
            .is_ok_and(|p| matches!(p.body, Body::GroupControl { .. } | Body::GroupChange { .. }));
            if is_change {
                continue;
            }
            let gone: Vec<usize> = o
                .targets
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.gone && t.seq.is_none())
                .filter(|(_, t)| {
                    self.peer(&t.device)
                        .is_none_or(|(u, _)| u != me && !members.contains(&u))
                })
                .map(|(i, _)| i)
                .collect();
            if gone.is_empty() {
                continue;
            }
            if let Some(o) = self.outbox.get_mut(&id) {
                for i in gone {
                    if let Some(t) = o.targets.get_mut(i) {
                        t.gone = true;
                    }
                }
            }
            self.touch(super::Dirty::Outbox(id));
        }
    }

    /// Decide a group entry's targets: every device of every member (and of
    /// the members a change removes, so they learn it) and this user's
    /// other devices, once the lists are fresh enough.
    pub(crate) fn resolve_group(&mut self, now: u64, id: &MessageId) -> bool {
        let Some(entry) = self.outbox.get(id) else {
            return false;
        };
        let conv = entry.conversation;
        let Some(rec) = self.groups.records.get(&conv) else {
            return false;
        };
        // The members at the message's position that are still members
        // (a member added by a change this device saw only after writing
        // the message does not get it; one removed since does not either),
        // plus whom the change itself adds or removes.
        let mut users = rec.members.clone();
        if let Ok(pt) =
            hush_crypto::open_at_rest(&self.device.at_rest.0, &entry.sealed, id.as_bytes())
            && let Ok(p) = Payload::decode(&pt).map(|p| split(p).1)
            && let Some((pos, _)) = position(&p)
        {
            let at = rec.members_at(&pos);
            users.retain(|u| at.contains(u));
            if let Body::GroupControl {
                op: GroupOp::Remove { members } | GroupOp::Add { members },
                ..
            } = p.body
            {
                users.extend(members.into_iter().map(UserKey));
            }
        }
        let me = self.user_key();
        users.remove(&me);
        let mut ready = true;
        for u in &users {
            let has_devices = self
                .contacts
                .get(u)
                .is_some_and(|c| c.known.devices().next().is_some());
            // A member with no known device yet does not hold the others up.
            let ok = self.list_gate(now, *u);
            if has_devices {
                ready &= ok;
            }
        }
        ready &= self.list_gate(now, me);
        if !ready {
            return false;
        }
        let mut targets = Vec::new();
        for u in &users {
            if let Some(c) = self.contacts.get(u) {
                // Devices the relay reports stale get nothing new.
                let stale = self.stale_targets(u);
                targets.extend(
                    c.known
                        .devices()
                        .filter(|e| !stale.contains(&e.device))
                        .map(|e| send::new_target(e.device, true)),
                );
            }
        }
        let my_device = self.device.device;
        let stale_mine = self.stale_targets(&me);
        targets.extend(
            self.own
                .known
                .devices()
                .filter(|e| e.device != my_device && !stale_mine.contains(&e.device))
                .map(|e| send::new_target(e.device, false)),
        );
        if let Some(entry) = self.outbox.get_mut(id) {
            entry.targets = targets;
            entry.resolved = true;
        }
        self.touch(super::Dirty::Outbox(*id));
        true
    }

    /// A device read our message `id` (hook of `on_receipt`); true if its
    /// user is a new reader of this group message.
    pub(crate) fn group_note_read(&mut self, d: DeviceId, id: &MessageId) -> bool {
        let Some(o) = self.outbox.get(id) else {
            return false;
        };
        if !self.groups.records.contains_key(&o.conversation)
            || !o.targets.iter().any(|t| t.device == d && t.recipient)
        {
            return false;
        }
        let Some((u, _)) = self.peer(&d) else {
            return false;
        };
        if self.groups.reads.entry(*id).or_default().insert(u) {
            self.gtouch(GDirty::Read(*id));
            return true;
        }
        false
    }

    /// A member's state of our group message `id` changed (a device of
    /// theirs stored or read it). The overall state moves only with the
    /// first member, so when it did not move (`before` is the state now)
    /// the app is told with a `MessageState` event of the unchanged state,
    /// to re-read [`Engine::member_states`].
    pub(crate) fn group_member_state_changed(
        &mut self,
        id: &MessageId,
        before: Option<MessageState>,
    ) {
        let Some(o) = self.outbox.get(id) else {
            return;
        };
        if o.kind != EntryKind::Chat
            || !self.groups.records.contains_key(&o.conversation)
            || Some(o.state) != before
        {
            return;
        }
        let (conversation, state) = (o.conversation, o.state);
        self.event(Event::MessageState {
            id: *id,
            conversation,
            state,
        });
    }

    // ----- commands -----

    /// Commands about groups; `SendText` in a group comes here too.
    pub(crate) fn group_command(&mut self, now: u64, c: Command) -> Result<(), ClientError> {
        match c {
            Command::CreateGroup { name, members } => {
                check_name(&name)?;
                let me = self.user_key();
                let mut set = BTreeSet::new();
                for u in members {
                    if u == me {
                        continue;
                    }
                    if !self.contacts.contains_key(&u) {
                        return Err(ClientError::Unknown("contact"));
                    }
                    set.insert(u);
                }
                if set.len() + 1 > MAX_GROUP_MEMBERS {
                    return Err(ClientError::NotAllowed("a group has at most 100 members"));
                }
                set.insert(me);
                let id = ConversationId(super::random_array(&mut self.rng));
                let msg = self.mint_id(now);
                let pos = GroupPosition { depth: 1, id: msg };
                let mut rec = GroupRecord {
                    name: name.clone(),
                    members: set.clone(),
                    active: true,
                    base_name: name.clone(),
                    base_members: set,
                    base_pos: pos,
                    ops: Vec::new(),
                    heads: BTreeSet::new(),
                };
                rec.add_head(1, msg, self.device.device, &[]);
                self.groups.records.insert(id, rec);
                self.gtouch(GDirty::Group(id));
                let me_dev = self.device.device;
                self.note_known(id, msg, 1, me, me_dev, false);
                let snapshot = self.snapshot(&id);
                self.queue(
                    now,
                    msg,
                    id,
                    Body::GroupControl {
                        op: GroupOp::Create,
                        snapshot,
                        sent_at_ms: now,
                        depth: 1,
                        refs: Vec::new(),
                    },
                    None,
                )?;
                self.event(Event::GroupChanged { group: id });
                self.step.reply = Some(Reply::Group(id));
            }
            Command::AddMembers { group, members } => {
                let rec = self.active_group(&group)?;
                let mut new = BTreeSet::new();
                for u in members {
                    if rec.members.contains(&u) {
                        continue;
                    }
                    if !self.contacts.contains_key(&u) {
                        return Err(ClientError::Unknown("contact"));
                    }
                    new.insert(u.0);
                }
                if new.is_empty() {
                    return Err(ClientError::NotAllowed("no new members"));
                }
                if rec.members.len() + new.len() > MAX_GROUP_MEMBERS {
                    return Err(ClientError::NotAllowed("a group has at most 100 members"));
                }
                let members = new.into_iter().collect();
                self.local_op(now, group, GroupOp::Add { members }, true)?;
            }
            Command::RemoveMembers { group, members } => {
                let rec = self.active_group(&group)?;
                let me = self.user_key();
                let mut gone = BTreeSet::new();
                for u in members {
                    if u == me {
                        return Err(ClientError::NotAllowed("use LeaveGroup to leave"));
                    }
                    if !rec.members.contains(&u) {
                        return Err(ClientError::Unknown("member"));
                    }
                    gone.insert(u.0);
                }
                if gone.is_empty() {
                    return Err(ClientError::NotAllowed("no members named"));
                }
                let members = gone.into_iter().collect();
                self.local_op(now, group, GroupOp::Remove { members }, false)?;
            }
            Command::LeaveGroup { group } => {
                self.active_group(&group)?;
                self.local_op(now, group, GroupOp::Leave, false)?;
            }
            Command::RenameGroup { group, name } => {
                check_name(&name)?;
                self.active_group(&group)?;
                self.local_op(now, group, GroupOp::Rename { name }, false)?;
            }
            Command::SendText { conversation, text } => {
                self.active_group(&conversation)?;
                if text.len() > MAX_TEXT_BYTES {
                    return Err(ClientError::TooLarge {
                        len: text.len(),
                        max: MAX_TEXT_BYTES,
                    });
                }
                let me = self.user_key();
                let me_dev = self.device.device;
                let (depth, refs) = self.next_position(&conversation);
                let id = self.mint_id(now);
                let pos = GroupPosition { depth, id };
                let record = HistoryRecord {
                    id,
                    conversation,
                    from_user: me,
                    from_device: me_dev,
                    sender_seq: 0,
                    sent_at_ms: now,
                    stored_at_ms: now,
                    text: text.clone(),
                    outgoing: true,
                };
                self.queue(
                    now,
                    id,
                    conversation,
                    Body::GroupText {
                        text,
                        sent_at_ms: now,
                        depth,
                        refs: refs.clone(),
                    },
                    None,
                )?;
                self.note_known(conversation, id, depth, me, me_dev, true);
                if let Some(r) = self.groups.records.get_mut(&conversation) {
                    r.add_head(depth, id, me_dev, &refs);
                }
                self.gtouch(GDirty::Group(conversation));
                self.store_history(&record)?;
                self.history_ops.push(StorageOp::Put {
                    key: group_order_key(&conversation, &pos),
                    value: storage::encode(&())?,
                });
                self.history_ops.push(StorageOp::Put {
                    key: keys::history_state(&id),
                    value: storage::encode(&MessageState::Sending)?,
                });
                self.event(Event::MessageState {
                    id,
                    conversation,
                    state: MessageState::Sending,
                });
                self.step.reply = Some(Reply::Message(id));
            }
            _ => return Err(ClientError::NotAllowed("not a group command")),
        }
        Ok(())
    }

    fn active_group(&self, group: &ConversationId) -> Result<GroupRecord, ClientError> {
        match self.groups.records.get(group) {
            None => Err(ClientError::Unknown("group")),
            Some(r) if !r.active => Err(ClientError::NotAllowed("not a member of this group")),
            Some(r) => Ok(r.clone()),
        }
    }

    /// The heads to name and the depth of the next message in `group`.
    pub(crate) fn next_position(&self, group: &ConversationId) -> (u64, Vec<GroupRef>) {
        let Some(r) = self.groups.records.get(group) else {
            return (1, Vec::new());
        };
        let depth = r
            .heads
            .iter()
            .map(|(d, _, _)| *d)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let refs = r
            .heads
            .iter()
            .rev()
            .take(MAX_GROUP_REFS)
            .map(|(_, id, device)| GroupRef {
                id: *id,
                device: *device,
            })
            .collect();
        (depth, refs)
    }

    /// Name and members (with how to reach them) as this device sees them.
    fn snapshot(&self, group: &ConversationId) -> Option<GroupSnapshot> {
        let r = self.groups.records.get(group)?;
        let me = self.user_key();
        let members = r
            .members
            .iter()
            .map(|u| {
                if *u == me {
                    ContactInfo {
                        user: u.0,
                        relay: self.device.relay.clone(),
                        name: self.device.name.clone(),
                    }
                } else {
                    let c = self.contacts.get(u);
                    ContactInfo {
                        user: u.0,
                        relay: c.map_or_else(|| self.device.relay.clone(), |c| c.relay.clone()),
                        name: c.map(|c| c.name.clone()).unwrap_or_default(),
                    }
                }
            })
            .collect();
        Some(GroupSnapshot {
            name: r.name.clone(),
            members,
        })
    }

    /// Make a change here, then send it (with a snapshot if it adds members).
    fn local_op(
        &mut self,
        now: u64,
        group: ConversationId,
        op: GroupOp,
        with_snapshot: bool,
    ) -> Result<(), ClientError> {
        let me = self.user_key();
        let me_dev = self.device.device;
        let (depth, refs) = self.next_position(&group);
        let id = self.mint_id(now);
        let pos = GroupPosition { depth, id };
        self.note_known(group, id, depth, me, me_dev, false);
        self.apply_op(now, group, pos, me, op.clone(), &refs, me_dev)?;
        let snapshot = if with_snapshot {
            self.snapshot(&group)
        } else {
            None
        };
        self.queue(
            now,
            id,
            group,
            Body::GroupControl {
                op,
                snapshot,
                sent_at_ms: now,
                depth,
                refs,
            },
            None,
        )?;
        Ok(())
    }

    // ----- repair -----

    /// Control items about groups (hook of `apply_control`).
    pub(crate) fn group_control(
        &mut self,
        now: u64,
        d: DeviceId,
        body: Body,
    ) -> Result<(), ClientError> {
        match body {
            Body::GroupResend { group, ids } => {
                let mut unavailable = Vec::new();
                for id in ids.into_iter().take(MAX_LIST) {
                    let seq = self
                        .outbox
                        .get(&id)
                        .filter(|o| o.kind == EntryKind::Chat && o.conversation == group)
                        .and_then(|o| o.targets.iter().find(|t| t.device == d && !t.gone))
                        .and_then(|t| t.seq);
                    let sent = match seq {
                        Some(s) => {
                            let wire = self.chat_stream(&group, &d)?;
                            self.resend(now, d, wire, s)?
                        }
                        None => false,
                    };
                    if !sent {
                        unavailable.push(id);
                    }
                }
                if !unavailable.is_empty() {
                    self.queue_control(
                        now,
                        d,
                        Body::GroupUnavailable {
                            group,
                            ids: unavailable,
                        },
                    )?;
                }
            }
            Body::GroupUnavailable { group, ids } => {
                let mut any = false;
                for id in ids.into_iter().take(MAX_LIST) {
                    // Only the device a held message names for `id` can
                    // declare it unavailable.
                    let named = self
                        .groups
                        .held
                        .range((group, MessageId([0; 16]))..=(group, MessageId([0xff; 16])))
                        .any(|(_, h)| {
                            position(&h.payload).is_some_and(|(_, refs)| {
                                refs.iter().any(|r| r.id == id && r.device == d)
                            })
                        });
                    // One held here is no longer the author's to declare
                    // lost (it waits for its own predecessors).
                    let have = self.groups.known.contains_key(&(group, id))
                        || self.groups.held.contains_key(&(group, id));
                    if named && !have {
                        self.mark_unavailable(group, id, d);
                        any = true;
                    }
                }
                if any {
                    self.group_release(now, group)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// `id` is held here below `depth`: a message at `depth` that names it
    /// waits for it to be released rather than asking for it or giving up
    /// on it. Depths strictly fall along such waits, so no set of held
    /// messages can wait for one another in a cycle; a held "predecessor"
    /// at or above `depth` is not a real one and is treated as missing.
    fn waits_here(&self, group: ConversationId, id: MessageId, depth: u64) -> bool {
        self.groups
            .held
            .get(&(group, id))
            .and_then(|h| position(&h.payload))
            .is_some_and(|(p, _)| p.depth < depth)
    }

    fn mark_unavailable(&mut self, group: ConversationId, id: MessageId, d: DeviceId) {
        let author = self.peer(&d).map_or(UserKey([0; 32]), |(u, _)| u);
        self.groups.known.insert(
            (group, id),
            Known {
                depth: 0,
                author,
                device: d,
                shown: false,
                text: false,
            },
        );
        self.gtouch(GDirty::Known(group, id));
        self.gcount(|c| c.refs_unavailable += 1);
    }

    /// Ask author devices for the predecessors held messages wait for;
    /// give up on the ones that never come.
    pub(crate) fn group_timers(&mut self, now: u64) -> Result<(), ClientError> {
        // The due ones from the timer index, not a walk of every held one.
        self.reindex_held();
        let due = self.groups.held_timers.due(now);
        if due.is_empty() {
            return Ok(());
        }
        let give_up = self.cfg.resend_retry_ms.saturating_mul(GIVE_UP_ROUNDS);
        let my_device = self.device.device;
        let mut asks: BTreeMap<(DeviceId, ConversationId), BTreeSet<MessageId>> = BTreeMap::new();
        let mut touched: BTreeSet<ConversationId> = BTreeSet::new();
        for (conv, id) in due {
            let Some(h) = self.groups.held.get(&(conv, id)) else {
                self.groups.held_timers.set((conv, id), None);
                continue;
            };
            // A predecessor held here is not missing: it waits for its own
            // predecessors, and its own timer asks for them. Asking its
            // author again would only bring an "unavailable" once our
            // receipt has covered it, and that answer would drop it.
            let missing: Vec<GroupRef> = position(&h.payload)
                .map(|(pos, refs)| {
                    refs.iter()
                        .filter(|r| {
                            !self.groups.known.contains_key(&(conv, r.id))
                                && !self.waits_here(conv, r.id, pos.depth)
                        })
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            // A group not known yet waits as long as its invitation can
            // still be re-sent (the inviter's outbox retention); the held
            // bounds cap what waits.
            let known_group = self.groups.records.contains_key(&conv);
            let wait = if known_group {
                give_up
            } else {
                self.cfg.outbox_retention_ms.max(give_up)
            };
            let expired = now >= h.since_ms.saturating_add(wait);
            let delay = h.request_delay_ms;
            if expired && !known_group {
                // Its group never became known here.
                touched.insert(conv);
                self.groups.held.remove(&(conv, id));
                self.gtouch(GDirty::Held(conv, id));
                self.gcount(|c| c.invalid_dropped += 1);
                continue;
            }
            for r in missing {
                if expired || r.device == my_device || self.peer(&r.device).is_none() {
                    self.mark_unavailable(conv, r.id, r.device);
                    touched.insert(conv);
                } else {
                    asks.entry((r.device, conv)).or_default().insert(r.id);
                }
            }
            // Released below once nothing it names is missing. Until then,
            // and past its give-up while it waits for predecessors held
            // here (which have give-ups of their own), it looks again after
            // the next delay, not on every step.
            if expired {
                touched.insert(conv);
            }
            let next = self.next_delay(
                delay,
                self.cfg.resend_retry_ms,
                self.cfg.resend_retry_max_ms,
            );
            if let Some(h) = self.groups.held.get_mut(&(conv, id)) {
                h.request_delay_ms = next;
                h.request_at = now.saturating_add(next);
            }
            self.gtouch(GDirty::Held(conv, id));
        }
        if self.link.ready {
            for ((d, group), ids) in asks {
                let n = ids.len() as u64;
                self.gcount(|c| c.refs_requested += n);
                self.queue_control(
                    now,
                    d,
                    Body::GroupResend {
                        group,
                        ids: ids.into_iter().take(MAX_LIST).collect(),
                    },
                )?;
            }
        }
        for conv in touched {
            self.group_release(now, conv)?;
        }
        Ok(())
    }

    /// The next time after `now` a held message wants a request.
    pub(crate) fn group_wake(&self, now: u64) -> Option<u64> {
        self.groups.held_timers.next_after(now)
    }
}

fn info(id: &ConversationId, r: &GroupRecord) -> GroupInfo {
    GroupInfo {
        id: *id,
        name: r.name.clone(),
        members: r.members.iter().copied().collect(),
        active: r.active,
    }
}

fn check_name(name: &str) -> Result<(), ClientError> {
    if name.len() > MAX_GROUP_NAME_BYTES {
        return Err(ClientError::TooLarge {
            len: name.len(),
            max: MAX_GROUP_NAME_BYTES,
        });
    }
    Ok(())
}
