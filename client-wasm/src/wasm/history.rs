//! History reads for the app, straight from IndexedDB.
//!
//! The engine writes history (`h/…`) but never reads it back, and
//! [`crate::storage::history`] is written against the synchronous
//! [`crate::Storage`] trait, which IndexedDB cannot implement. This is the
//! same algorithm over an asynchronous [`Reader`]: page backwards through a
//! conversation's positions — packs (see [`crate::storage::pack`]) merged with order records
//! written one per key — skip messages that were deleted or
//! recalled (tombstones) or are missing, attach read markers and delivery
//! states. All reads of one page share one read-only transaction, so a page
//! is a consistent snapshot even while the driver commits new steps.

use super::idb_store::{IdbStore, Reader};
use crate::StorageError;
use crate::engine::history_transfer::ArchivedMessage;
use crate::state::{HistoryRecord, MessageState};
use crate::storage::{
    HistoryEntry, Slot, decode, keys, newest_slots, order_slots, pack, pack_slots,
};
use hush_protocol::{ConversationId, DeviceId, MessageId};

/// Messages read per page while exporting.
const EXPORT_PAGE: usize = 500;

/// Every message of `conversations`, each conversation in its history
/// order: what this device exports for a newly linked one (the
/// asynchronous [`crate::engine::history_transfer::export_history`]).
pub(crate) async fn export(
    store: &IdbStore,
    conversations: &[ConversationId],
) -> Result<Vec<ArchivedMessage>, StorageError> {
    let mut out = Vec::new();
    for c in conversations {
        // Pages come newest first; each page is oldest first.
        let mut pages = Vec::new();
        let mut before = None;
        loop {
            let entries = page(store, c, before, EXPORT_PAGE).await?;
            let Some(first) = entries.first() else {
                break;
            };
            before = Some(first.order);
            let full = entries.len() == EXPORT_PAGE;
            pages.push(entries);
            if !full {
                break;
            }
        }
        for entries in pages.into_iter().rev() {
            out.extend(entries.into_iter().map(ArchivedMessage::from));
        }
    }
    Ok(out)
}

/// Up to `limit` messages delivered before position `before` (or the newest
/// ones), oldest first; deleted and recalled messages are left out.
pub(crate) async fn page(
    store: &IdbStore,
    conversation: &ConversationId,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<HistoryEntry>, StorageError> {
    let reader = store.reader()?;
    let mut out = page_in(&reader, conversation, before, limit).await?;
    out.reverse();
    Ok(out)
}

/// Up to `want` positions of a conversation strictly below `before`,
/// newest first, merged from packs and per-key order records (the steps
/// of [`crate::storage::history`], over asynchronous scans).
async fn positions(
    reader: &Reader,
    conversation: &ConversationId,
    before: Option<u64>,
    want: usize,
) -> Result<Vec<Slot>, StorageError> {
    // Per-key order records (written before history was packed).
    let prefix = keys::history_order_prefix(conversation);
    let cursor = before.map(|o| keys::history_order(conversation, o));
    let mut slots = order_slots(reader.scan_back(&prefix, cursor.as_deref(), want).await?)?;
    // Packs cover disjoint, ascending order ranges: walk them backwards
    // until `want` positions below `before` are found.
    let pack_prefix = pack::pack_prefix(conversation);
    let mut pack_cursor = before.map(|o| pack::pack_key(conversation, o));
    let mut from_packs = 0usize;
    while from_packs < want {
        let rows = reader
            .scan_back(&pack_prefix, pack_cursor.as_deref(), 1)
            .await?;
        let Some((k, v)) = rows.into_iter().next() else {
            break;
        };
        from_packs += pack_slots(&k, &v, before, &mut slots)?;
        pack_cursor = Some(k);
    }
    Ok(newest_slots(slots, want))
}

/// [`page`] inside an open reader, newest first.
async fn page_in(
    reader: &Reader,
    conversation: &ConversationId,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<HistoryEntry>, StorageError> {
    let mut cursor = before;
    let mut out = Vec::new();
    // Erased messages leave order records behind: keep paging until `limit`
    // live messages are found or the conversation's start is reached.
    while out.len() < limit {
        let slots = positions(reader, conversation, cursor, limit - out.len()).await?;
        let Some(last) = slots.last() else {
            break;
        };
        cursor = Some(last.order);
        // Ask for every record of the page before awaiting any answer.
        let mut pending = Vec::with_capacity(slots.len());
        for slot in slots {
            let msg_key = keys::history_message(conversation, &slot.id);
            let state_key = keys::history_state(&slot.id);
            // A packed message is live unless marked gone; a per-key one
            // unless its record was deleted.
            let record = match &slot.packed {
                Some(_) => reader.start_get(&pack::gone_key(conversation, &slot.id))?,
                None => reader.start_get(&msg_key)?,
            };
            pending.push((
                reader.start_get(&keys::tombstone(&slot.id))?,
                record,
                reader.start_get(&keys::history_read(&slot.id))?,
                reader.start_get(&state_key)?,
                slot,
                msg_key,
                state_key,
            ));
        }
        for (tomb, record, read, state, slot, msg_key, state_key) in pending {
            let tomb = tomb.value().await?;
            let record = record.value().await?;
            let read = read.value().await?.is_some();
            let state = state.value().await?;
            if tomb.is_some() {
                continue;
            }
            let raw = match (slot.packed, record) {
                (Some(_), Some(_gone)) => continue,
                (Some(packed), None) => packed,
                (None, Some(raw)) => raw,
                (None, None) => continue,
            };
            let record: HistoryRecord = decode(&msg_key, &raw)?;
            let state = match state {
                Some(raw) => Some(decode::<MessageState>(&state_key, &raw)?),
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
    Ok(out)
}

/// The history entries of these messages of a conversation, in the order
/// of `ids` (a group's page in the group order); ids not (or no longer) in
/// history are left out. The messages are found by paging back through the
/// conversation's arrival order from the newest until every id is found or
/// the start is reached, in one read-only transaction. Arrival order follows
/// the group order closely, so reading page k of a group costs about k
/// pages of arrival order.
pub(crate) async fn by_ids(
    store: &IdbStore,
    conversation: &ConversationId,
    ids: &[MessageId],
) -> Result<Vec<HistoryEntry>, StorageError> {
    let index: std::collections::HashMap<MessageId, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut found: Vec<Option<HistoryEntry>> = (0..ids.len()).map(|_| None).collect();
    let mut missing = index.len();
    let reader = store.reader()?;
    let mut before = None;
    while missing > 0 {
        let entries = page_in(&reader, conversation, before, BY_IDS_PAGE).await?;
        let Some(oldest) = entries.last() else {
            break;
        };
        before = Some(oldest.order);
        let full = entries.len() == BY_IDS_PAGE;
        for e in entries {
            if let Some(&i) = index.get(&e.record.id)
                && let Some(slot) = found.get_mut(i)
                && slot.is_none()
            {
                *slot = Some(e);
                missing -= 1;
            }
        }
        if !full {
            break;
        }
    }
    Ok(found.into_iter().flatten().collect())
}

/// Arrival-order page size of [`by_ids`].
const BY_IDS_PAGE: usize = 200;

/// How far back "mark read up to" looks for unread messages.
pub(crate) const MARK_READ_SCAN: usize = 2_000;

/// The received, unread messages of a conversation at or before `up_to`
/// (the newest message when `None`), as `(id, author device)`, newest
/// first. The walk stops at the first received message that is already
/// read (everything before it was marked with it) or after
/// [`MARK_READ_SCAN`] messages. `Ok(None)` when `up_to` is not in the
/// conversation's history.
pub(crate) async fn unread_up_to(
    store: &IdbStore,
    conversation: &ConversationId,
    up_to: Option<MessageId>,
) -> Result<Option<Vec<(MessageId, DeviceId)>>, StorageError> {
    let reader = store.reader()?;
    let mut found = up_to.is_none();
    let mut before = None;
    let mut seen = 0usize;
    let mut out = Vec::new();
    'pages: while seen < MARK_READ_SCAN {
        let entries = page_in(&reader, conversation, before, 100).await?;
        let Some(oldest) = entries.last() else {
            break;
        };
        before = Some(oldest.order);
        for e in entries {
            seen += 1;
            if !found {
                found = Some(e.record.id) == up_to;
                if !found {
                    continue;
                }
            }
            if e.record.outgoing {
                continue;
            }
            if e.read {
                break 'pages;
            }
            out.push((e.record.id, e.record.from_device));
        }
    }
    Ok(found.then_some(out))
}

/// Which of `conversations` holds message `id` in this device's history.
///
/// Per-key records are one look-up each; packed messages are found by
/// walking each conversation's packs from the newest, so finding an old
/// message in a long history reads that much of it (the app asks for
/// messages it shows, which are usually recent).
pub(crate) async fn conversation_of(
    store: &IdbStore,
    conversations: &[ConversationId],
    id: &MessageId,
) -> Result<Option<ConversationId>, StorageError> {
    let reader = store.reader()?;
    let mut pending = Vec::with_capacity(conversations.len());
    for c in conversations {
        pending.push((
            *c,
            reader.start_get(&keys::history_message(c, id))?,
            reader.start_get(&pack::gone_key(c, id))?,
        ));
    }
    let mut hit = None;
    let mut live = Vec::new();
    for (c, p, gone) in pending {
        let found = p.value().await?.is_some();
        if gone.value().await?.is_some() {
            continue;
        }
        if found && hit.is_none() {
            hit = Some(c);
        }
        live.push(c);
    }
    if hit.is_some() {
        return Ok(hit);
    }
    for c in live {
        let prefix = pack::pack_prefix(&c);
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let rows = reader.scan_back(&prefix, cursor.as_deref(), 8).await?;
            if rows.is_empty() {
                break;
            }
            for (k, v) in &rows {
                if pack::unpack(k, v)?.iter().any(|e| e.id == *id) {
                    return Ok(Some(c));
                }
            }
            cursor = rows.last().map(|(k, _)| k.clone());
        }
    }
    Ok(None)
}
