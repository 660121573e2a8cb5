//! Durable client state behind a small transactional key-value interface.
//!
//! The engine never calls storage. It *emits* a batch of [`StorageOp`]s per
//! step, and the driver makes the batch durable (atomically) before it
//! performs any other output of that step. At start-up the driver reads every
//! engine record with [`Storage::load_state`] and hands them to
//! [`crate::Engine::load`]. That keeps the engine synchronous and sans-IO,
//! and lets an asynchronous backend (IndexedDB in the browser) implement the
//! same two operations with `await`s in the driver.
//!
//! Keys live in two namespaces (see [`keys`] for the full layout):
//!
//! - `s/…` — engine state, loaded at start: identity, prekeys, sessions,
//!   contacts, device lists, stream states, outbox, held out-of-order
//!   messages, tombstones, counters, relay cursor.
//! - `h/…` — history, written by the engine and only read by the app through
//!   [`history`], never loaded into the engine.
//!
//! Values are one format byte ([`RECORD_VERSION`]) then postcard. The
//! persistent stores seal every value at their boundary ([`seal`]): on disk
//! and in IndexedDB only keys (ids and positions) are in the clear.
//! Implementations: [`memory::MemoryStorage`] (tests, simulator) and, natively,
//! [`file::FileStorage`] (a redb database: crash-safe, checksummed pages,
//! repaired on open after a crash; small batches are made durable in a
//! [`journal`] beside it first).

pub mod keys;
pub mod memory;
pub mod pack;
pub mod seal;

#[cfg(not(target_arch = "wasm32"))]
pub mod file;
#[cfg(not(target_arch = "wasm32"))]
pub mod journal;

use crate::error::StorageError;
use crate::state::{HistoryRecord, MessageState, Tombstone};
use hush_protocol::{ConversationId, MessageId};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// One stored record: key and encoded value.
pub type Record = (Vec<u8>, Vec<u8>);

/// Format byte in front of every stored value.
pub const RECORD_VERSION: u8 = 1;

/// One write of a batch.
#[derive(Clone, PartialEq, Eq)]
pub enum StorageOp {
    /// Insert or replace a record.
    Put {
        /// The key (see [`keys`]).
        key: Vec<u8>,
        /// The encoded value.
        value: Vec<u8>,
    },
    /// Remove a record (no-op if absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl StorageOp {
    /// The key this op writes.
    pub fn key(&self) -> &[u8] {
        match self {
            StorageOp::Put { key, .. } | StorageOp::Delete { key } => key,
        }
    }
}

impl std::fmt::Debug for StorageOp {
    // Values hold secrets and message text: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageOp::Put { key, value } => {
                write!(f, "Put({}, {} bytes)", keys::printable(key), value.len())
            }
            StorageOp::Delete { key } => write!(f, "Delete({})", keys::printable(key)),
        }
    }
}

/// A transactional key-value store.
///
/// Contract: [`Storage::apply`] is atomic (all ops or none) and durable when
/// it returns `Ok` (after a crash, either the whole batch is there or none of
/// it). If `apply` fails the driver must not perform the step's other outputs;
/// it drops the engine and rebuilds it from storage, exactly as after a crash.
pub trait Storage {
    /// Every record whose key starts with `prefix`, ascending by key.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Record>, StorageError>;

    /// Up to `limit` records whose key starts with `prefix` and is strictly
    /// below `before` (when given), in *descending* key order.
    fn scan_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Record>, StorageError>;

    /// One record.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Apply a batch atomically and durably.
    fn apply(&mut self, batch: &[StorageOp]) -> Result<(), StorageError>;

    /// Apply a batch atomically and return once it is *stored*: readable
    /// here and kept if the app crashes, though a power loss or an OS
    /// crash may still undo it until [`Syncing::wait`] returns `Ok`. A
    /// failed wait counts as a failed `apply` (the driver rebuilds the
    /// engine from storage), and the store may refuse every call until it
    /// is opened again.
    ///
    /// Why: a driver may show what a batch stored that the relay will
    /// deliver again unless it is acknowledged — incoming messages — as
    /// soon as it is stored, and send the acknowledgement once it is
    /// durable; a power loss in between costs a redelivery, not a message.
    /// The default is [`Storage::apply`], durable at once.
    fn apply_stored(&mut self, batch: &[StorageOp]) -> Result<Syncing, StorageError> {
        self.apply(batch).map(|()| Syncing::done())
    }

    /// [`Storage::apply_stored`], but only if storing needs no wait: not for
    /// an earlier batch's sync, a checkpoint, or a write too large for the
    /// journal. `None` (the default) when it might, and nothing was done:
    /// call `apply_stored` where blocking is allowed.
    ///
    /// Why: an async driver can then store a small batch on its own task,
    /// and show what it holds at once, instead of handing it to a thread
    /// and being woken back: two thread hand-offs on the path of every
    /// incoming message.
    fn try_apply_stored(&mut self, batch: &[StorageOp]) -> Option<Result<Syncing, StorageError>> {
        let _ = batch;
        None
    }

    /// Every engine record (the `s/` namespace), for [`crate::Engine::load`].
    fn load_state(&self) -> Result<Vec<Record>, StorageError> {
        self.scan_prefix(keys::STATE)
    }
}

/// The durability of a batch [`Storage::apply_stored`] stored: wait for it
/// before doing anything that must outlive a power loss (acknowledging
/// envelopes to the relay, sending, answering a command).
#[must_use = "a stored batch is not durable until `wait` returns"]
pub struct Syncing {
    wait: Option<Box<dyn FnOnce() -> Result<(), StorageError> + Send>>,
    notify: Option<Notify>,
}

/// Registers a call for when a sync has ended (see [`Syncing::when_ended`]).
type Notify = Box<dyn FnOnce(Box<dyn FnOnce() + Send>) + Send>;

impl Syncing {
    /// Already durable.
    pub fn done() -> Syncing {
        Syncing {
            wait: None,
            notify: None,
        }
    }

    /// Durable once `wait` returns `Ok` (it blocks until the sync ends).
    pub fn new(wait: impl FnOnce() -> Result<(), StorageError> + Send + 'static) -> Syncing {
        Syncing {
            wait: Some(Box::new(wait)),
            notify: None,
        }
    }

    /// Like [`Syncing::new`], and `notify(call)` calls `call` once the
    /// sync has ended (at once if it has), so that a caller need not block
    /// a thread in `wait` to learn of it.
    pub fn notifying(
        wait: impl FnOnce() -> Result<(), StorageError> + Send + 'static,
        notify: impl FnOnce(Box<dyn FnOnce() + Send>) + Send + 'static,
    ) -> Syncing {
        Syncing {
            wait: Some(Box::new(wait)),
            notify: Some(Box::new(notify)),
        }
    }

    /// Have `call` called once the sync has ended, on whichever thread
    /// ends it (so `call` must only hand the news on); [`Syncing::wait`]
    /// then returns without blocking. False, and `call` dropped, if this
    /// sync cannot notify: wait for it on a thread instead.
    pub fn when_ended(&mut self, call: Box<dyn FnOnce() + Send>) -> bool {
        if self.wait.is_none() {
            call();
            return true;
        }
        match self.notify.take() {
            Some(notify) => {
                notify(call);
                true
            }
            None => false,
        }
    }

    /// Durable already: [`Syncing::wait`] would return `Ok` at once.
    pub fn is_done(&self) -> bool {
        self.wait.is_none()
    }

    /// Block until the batch is durable, or its sync failed.
    pub fn wait(self) -> Result<(), StorageError> {
        self.wait.map_or(Ok(()), |wait| wait())
    }
}

impl std::fmt::Debug for Syncing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.wait.is_some() {
            "Syncing(pending)"
        } else {
            "Syncing(done)"
        })
    }
}

/// Encode a record: format byte then postcard. The buffer is sized first
/// (a pass that only counts), so a message record is one allocation rather
/// than a doubling series of them with a copy each.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    let failed = |_| StorageError::Backend("record does not encode".into());
    let size = postcard::experimental::serialized_size(value).map_err(failed)?;
    let mut out = Vec::with_capacity(1 + size);
    out.push(RECORD_VERSION);
    postcard::to_extend(value, out).map_err(failed)
}

/// Decode a record, reporting the key on failure.
pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StorageError> {
    let corrupt = || StorageError::Corrupt {
        key: keys::printable(key),
    };
    match bytes.split_first() {
        Some((&RECORD_VERSION, rest)) => postcard::from_bytes(rest).map_err(|_| corrupt()),
        _ => Err(corrupt()),
    }
}

/// One message of a conversation's history, as the app shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Position in this device's history of the conversation (ascending in
    /// delivery order; pass it as `before` to page backwards).
    pub order: u64,
    /// The stored message.
    pub record: HistoryRecord,
    /// Marked read on this device or another device of the user.
    pub read: bool,
    /// For messages this user sent: the delivery state.
    pub state: Option<MessageState>,
}

/// A message position found while paging: from a pack (with its record)
/// or from an order record written one per key. The position-finding steps
/// below are shared with the browser's asynchronous history reader; only
/// the scans differ.
pub(crate) struct Slot {
    pub(crate) order: u64,
    pub(crate) id: MessageId,
    /// The encoded record when it came from a pack.
    pub(crate) packed: Option<Vec<u8>>,
}

/// Positions from per-key order records (`h/order/…` rows).
pub(crate) fn order_slots(rows: Vec<Record>) -> Result<Vec<Slot>, StorageError> {
    rows.into_iter()
        .map(|(k, v)| {
            let order = keys::order_of(&k).ok_or_else(|| StorageError::Corrupt {
                key: keys::printable(&k),
            })?;
            Ok(Slot {
                order,
                id: decode(&k, &v)?,
                packed: None,
            })
        })
        .collect()
}

/// Add the positions of one pack that lie strictly below `before` to
/// `slots`, newest first; returns how many were added.
pub(crate) fn pack_slots(
    key: &[u8],
    value: &[u8],
    before: Option<u64>,
    slots: &mut Vec<Slot>,
) -> Result<usize, StorageError> {
    let mut added = 0;
    for e in pack::unpack(key, value)?.into_iter().rev() {
        if before.is_none_or(|b| e.order < b) {
            added += 1;
            slots.push(Slot {
                order: e.order,
                id: e.id,
                packed: Some(e.record.to_vec()),
            });
        }
    }
    Ok(added)
}

/// The newest `want` of the merged positions, newest first.
pub(crate) fn newest_slots(mut slots: Vec<Slot>, want: usize) -> Vec<Slot> {
    slots.sort_unstable_by_key(|s| std::cmp::Reverse(s.order));
    slots.truncate(want);
    slots
}

/// Up to `want` positions of a conversation strictly below `before`,
/// newest first, merged from packs and per-key order records.
fn positions<S: Storage + ?Sized>(
    storage: &S,
    conversation: &ConversationId,
    before: Option<u64>,
    want: usize,
) -> Result<Vec<Slot>, StorageError> {
    let prefix = keys::history_order_prefix(conversation);
    let cursor = before.map(|o| keys::history_order(conversation, o));
    let mut slots = order_slots(storage.scan_back(&prefix, cursor.as_deref(), want)?)?;
    // Packs cover disjoint, ascending order ranges: walk them backwards
    // until `want` positions below `before` are found.
    let pack_prefix = pack::pack_prefix(conversation);
    let mut pack_cursor = before.map(|o| pack::pack_key(conversation, o));
    let mut from_packs = 0usize;
    while from_packs < want {
        let rows = storage.scan_back(&pack_prefix, pack_cursor.as_deref(), 1)?;
        let Some((k, v)) = rows.into_iter().next() else {
            break;
        };
        from_packs += pack_slots(&k, &v, before, &mut slots)?;
        pack_cursor = Some(k);
    }
    Ok(newest_slots(slots, want))
}

/// Page backwards through a conversation's history: up to `limit` messages
/// delivered before position `before` (or the newest ones), returned oldest
/// first. Deleted and recalled messages are left out. Reads packed history
/// (see [`pack`]) and records written one per key alike.
pub fn history<S: Storage + ?Sized>(
    storage: &S,
    conversation: &ConversationId,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<HistoryEntry>, StorageError> {
    let mut out = Vec::new();
    let mut cursor = before;
    // Erased messages leave positions behind; keep paging until `limit`
    // live messages are found or the conversation's start is reached.
    while out.len() < limit {
        let slots = positions(storage, conversation, cursor, limit - out.len())?;
        let Some(last) = slots.last() else {
            break;
        };
        cursor = Some(last.order);
        for slot in slots {
            if storage.get(&keys::tombstone(&slot.id))?.is_some() {
                continue;
            }
            let mkey = keys::history_message(conversation, &slot.id);
            // A packed message is live unless marked gone; a per-key one
            // unless its record was deleted.
            let raw = match slot.packed {
                Some(raw) => {
                    if storage
                        .get(&pack::gone_key(conversation, &slot.id))?
                        .is_some()
                    {
                        continue;
                    }
                    raw
                }
                None => match storage.get(&mkey)? {
                    Some(raw) => raw,
                    None => continue,
                },
            };
            let record: HistoryRecord = decode(&mkey, &raw)?;
            let read = storage.get(&keys::history_read(&slot.id))?.is_some();
            let skey = keys::history_state(&slot.id);
            let state = match storage.get(&skey)? {
                Some(raw) => Some(decode::<MessageState>(&skey, &raw)?),
                None => None,
            };
            out.push(HistoryEntry {
                order: slot.order,
                record,
                read,
                state,
            });
        }
    }
    out.reverse();
    Ok(out)
}

/// One message of a conversation's history by id, packed or not (`None` if
/// it is not there or was erased). A per-key record is one look-up; a
/// packed one is found by walking the conversation's packs from the newest.
pub fn history_message<S: Storage + ?Sized>(
    storage: &S,
    conversation: &ConversationId,
    id: &MessageId,
) -> Result<Option<HistoryRecord>, StorageError> {
    let mkey = keys::history_message(conversation, id);
    if let Some(raw) = storage.get(&mkey)? {
        return decode(&mkey, &raw).map(Some);
    }
    if storage.get(&pack::gone_key(conversation, id))?.is_some() {
        return Ok(None);
    }
    let prefix = pack::pack_prefix(conversation);
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let rows = storage.scan_back(&prefix, cursor.as_deref(), 8)?;
        if rows.is_empty() {
            return Ok(None);
        }
        for (k, v) in &rows {
            if let Some(e) = pack::unpack(k, v)?.into_iter().find(|e| e.id == *id) {
                return decode(&mkey, e.record).map(Some);
            }
        }
        cursor = rows.last().map(|(k, _)| k.clone());
    }
}

/// Whether a message was removed (recalled or deleted), and how.
pub fn tombstone<S: Storage + ?Sized>(
    storage: &S,
    id: &MessageId,
) -> Result<Option<Tombstone>, StorageError> {
    let key = keys::tombstone(id);
    storage.get(&key)?.map(|v| decode(&key, &v)).transpose()
}
