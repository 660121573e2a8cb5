//! History reads for the app, straight from IndexedDB.
//!
//! The engine writes history (`h/…`) but never reads it back, and
//! [`crate::storage::history`] is written against the synchronous
//! [`crate::Storage`] trait, which IndexedDB cannot implement. This is the
//! same algorithm over an asynchronous [`Reader`]: page backwards through a
//! conversation's order records, skip messages that were deleted or
//! recalled (tombstones) or are missing, attach read markers and delivery
//! states. All reads of one page share one read-only transaction, so a page
//! is a consistent snapshot even while the driver commits new steps.

use super::idb_store::{IdbStore, Reader};
use crate::StorageError;
use crate::state::{HistoryRecord, MessageState};
use crate::storage::{HistoryEntry, decode, keys};
use hush_protocol::{ConversationId, DeviceId, MessageId};

/// The order number at the end of an order key.
fn order_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
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

/// [`page`] inside an open reader, newest first.
async fn page_in(
    reader: &Reader,
    conversation: &ConversationId,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<HistoryEntry>, StorageError> {
    let prefix = keys::history_order_prefix(conversation);
    let mut cursor = before.map(|o| keys::history_order(conversation, o));
    let mut out = Vec::new();
    // Erased messages leave order records behind: keep paging until `limit`
    // live messages are found or the conversation's start is reached.
    while out.len() < limit {
        let rows = reader
            .scan_back(&prefix, cursor.as_deref(), limit - out.len())
            .await?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        cursor = Some(last.clone());
        // Ask for every record of the page before awaiting any answer.
        let mut pending = Vec::with_capacity(rows.len());
        for (k, v) in &rows {
            let order = order_of(k).ok_or_else(|| StorageError::Corrupt {
                key: keys::printable(k),
            })?;
            let id: MessageId = decode(k, v)?;
            let msg_key = keys::history_message(conversation, &id);
            let state_key = keys::history_state(&id);
            pending.push((
                order,
                reader.start_get(&keys::tombstone(&id))?,
                reader.start_get(&msg_key)?,
                reader.start_get(&keys::history_read(&id))?,
                reader.start_get(&state_key)?,
                msg_key,
                state_key,
            ));
        }
        for (order, tomb, msg, read, state, msg_key, state_key) in pending {
            let tomb = tomb.value().await?;
            let msg = msg.value().await?;
            let read = read.value().await?.is_some();
            let state = state.value().await?;
            if tomb.is_some() {
                continue;
            }
            let Some(raw) = msg else {
                continue;
            };
            let record: HistoryRecord = decode(&msg_key, &raw)?;
            let state = match state {
                Some(raw) => Some(decode::<MessageState>(&state_key, &raw)?),
                None => None,
            };
            out.push(HistoryEntry {
                order,
                record,
                read,
                state,
            });
        }
    }
    Ok(out)
}

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
pub(crate) async fn conversation_of(
    store: &IdbStore,
    conversations: &[ConversationId],
    id: &MessageId,
) -> Result<Option<ConversationId>, StorageError> {
    let reader = store.reader()?;
    let mut pending = Vec::with_capacity(conversations.len());
    for c in conversations {
        pending.push((*c, reader.start_get(&keys::history_message(c, id))?));
    }
    let mut hit = None;
    for (c, p) in pending {
        if p.value().await?.is_some() && hit.is_none() {
            hit = Some(c);
        }
    }
    Ok(hit)
}
