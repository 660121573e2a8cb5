//! Packed history: many messages in one IndexedDB record.
//!
//! IndexedDB in Chromium costs about 50–100 µs per `put` whatever its size
//! (each request crosses to the browser process and becomes one database
//! row), while bytes are cheap: one 230 KB record costs about as much as
//! three 1 KB ones. The engine stores every message as two records
//! (`h/msg/<conv><id>` with the text, `h/order/<conv><order>` with its
//! position), so a 200-message page would be 400 puts. This module turns
//! those pairs into one record per conversation and batch (several when
//! they would exceed 60 KB):
//!
//! - `h/pack/<conv><first order>` — consecutive messages of the batch in
//!   that conversation, ascending by order: `(order, id, record)` each.
//!
//! A batch's orders are above every earlier batch's (the engine's order
//! counter only grows), so the packs of a conversation cover disjoint,
//! ascending order ranges and paging backwards by pack key pages backwards
//! by order. Erasing a packed message (delete, recall) cannot remove it from
//! its pack without rewriting the pack, so the engine's `Delete` of
//! `h/msg/<conv><id>` also writes the marker
//!
//! - `h/gone/<conv><id>` — the message was erased; readers skip it.
//!
//! Everything else (engine state `s/…`, read markers, delivery states) is
//! written one record per key as before, and records written one per key
//! by earlier versions are still read (history reads merge both).

use crate::StorageError;
use crate::storage::{StorageOp, decode, keys};
use hush_protocol::{ConversationId, MessageId};

/// Key prefix of packs.
const PACK: &[u8] = b"h/pack/";
/// Key prefix of erase markers.
const GONE: &[u8] = b"h/gone/";
/// Format byte in front of a pack.
const PACK_FORMAT: u8 = 1;
/// Bytes in front of each packed record: order, id, record length.
const ENTRY_HEADER: usize = 8 + MessageId::LEN + 4;
/// A pack is closed before it grows past this. Chromium stores values above
/// 64 KiB as separate blob files, which costs more than several records
/// below it (measured: 100,000 × 1 KiB in 500 transactions, one 230 KB pack
/// each 0.59–0.66 s, four 57 KB packs each 0.42–0.44 s).
const PACK_MAX_BYTES: usize = 60 * 1024;

/// The prefix of one conversation's packs.
pub(crate) fn pack_prefix(conv: &ConversationId) -> Vec<u8> {
    let mut k = Vec::with_capacity(PACK.len() + ConversationId::LEN);
    k.extend_from_slice(PACK);
    k.extend_from_slice(conv.as_bytes());
    k
}

/// The key of the pack whose first message has position `order` (also the
/// exclusive upper bound for "packs starting before `order`").
pub(crate) fn pack_key(conv: &ConversationId, order: u64) -> Vec<u8> {
    let mut k = pack_prefix(conv);
    k.extend_from_slice(&order.to_be_bytes());
    k
}

/// The erase marker of a message.
pub(crate) fn gone_key(conv: &ConversationId, id: &MessageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(GONE.len() + ConversationId::LEN + MessageId::LEN);
    k.extend_from_slice(GONE);
    k.extend_from_slice(conv.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// One IndexedDB write after packing.
#[derive(Debug)]
pub(crate) enum Write<'a> {
    /// A record written as the engine gave it.
    Put(&'a [u8], &'a [u8]),
    /// A record the driver built (a pack or an erase marker).
    PutOwned(Vec<u8>, Vec<u8>),
    /// A removal.
    Delete(&'a [u8]),
}

/// `(conversation, id)` of an `h/msg/<conv><id>` key.
fn message_key(key: &[u8]) -> Option<(ConversationId, MessageId)> {
    let n = key.len();
    let id: [u8; MessageId::LEN] = key.get(n.checked_sub(MessageId::LEN)?..)?.try_into().ok()?;
    let conv_at = n.checked_sub(MessageId::LEN + ConversationId::LEN)?;
    let conv: [u8; ConversationId::LEN] = key
        .get(conv_at..conv_at + ConversationId::LEN)?
        .try_into()
        .ok()?;
    let (conv, id) = (ConversationId(conv), MessageId(id));
    (keys::history_message(&conv, &id) == key).then_some((conv, id))
}

/// The order of an `h/order/<conv><order>` key for conversation `conv`.
fn order_key(key: &[u8], conv: &ConversationId) -> Option<u64> {
    let order = u64::from_be_bytes(key.get(key.len().checked_sub(8)?..)?.try_into().ok()?);
    (keys::history_order(conv, order) == key).then_some(order)
}

/// A pack being filled: its conversation, first order and bytes.
struct Building {
    conv: ConversationId,
    first: u64,
    bytes: Vec<u8>,
}

/// The writes for one batch: message/order pairs packed per conversation,
/// erases marked, everything else unchanged and in its original order.
pub(crate) fn pack_batch(batch: &[StorageOp]) -> Vec<Write<'_>> {
    let mut out = Vec::with_capacity(batch.len().min(64));
    let mut packs: Vec<Building> = Vec::new();
    let mut i = 0;
    while i < batch.len() {
        if let (
            StorageOp::Put {
                key: mkey,
                value: record,
            },
            Some(StorageOp::Put {
                key: okey,
                value: oval,
            }),
        ) = (&batch[i], batch.get(i + 1))
            && let Some((conv, id)) = message_key(mkey)
            && let Some(order) = order_key(okey, &conv)
            && decode::<MessageId>(okey, oval).ok() == Some(id)
            && let Ok(len) = u32::try_from(record.len())
        {
            let entry = ENTRY_HEADER + record.len();
            let open = packs.iter().rposition(|p| {
                p.conv == conv && (p.bytes.len() == 1 || p.bytes.len() + entry <= PACK_MAX_BYTES)
            });
            let pack = match open {
                Some(at) => &mut packs[at],
                None => {
                    let mut bytes = Vec::with_capacity(PACK_MAX_BYTES.min(1 + 64 * entry));
                    bytes.push(PACK_FORMAT);
                    packs.push(Building {
                        conv,
                        first: order,
                        bytes,
                    });
                    let last = packs.len() - 1;
                    &mut packs[last]
                }
            };
            pack.first = pack.first.min(order);
            pack.bytes.extend_from_slice(&order.to_be_bytes());
            pack.bytes.extend_from_slice(id.as_bytes());
            pack.bytes.extend_from_slice(&len.to_le_bytes());
            pack.bytes.extend_from_slice(record);
            i += 2;
            continue;
        }
        match &batch[i] {
            StorageOp::Put { key, value } => out.push(Write::Put(key, value)),
            StorageOp::Delete { key } => {
                out.push(Write::Delete(key));
                if let Some((conv, id)) = message_key(key) {
                    out.push(Write::PutOwned(gone_key(&conv, &id), vec![PACK_FORMAT]));
                }
            }
        }
        i += 1;
    }
    for p in packs {
        out.push(Write::PutOwned(pack_key(&p.conv, p.first), p.bytes));
    }
    out
}

/// One message read from a pack.
#[derive(Debug)]
pub(crate) struct Packed<'a> {
    pub order: u64,
    pub id: MessageId,
    /// The encoded `HistoryRecord`, as the engine wrote it.
    pub record: &'a [u8],
}

/// The messages of a pack, ascending by order.
pub(crate) fn unpack<'a>(key: &[u8], bytes: &'a [u8]) -> Result<Vec<Packed<'a>>, StorageError> {
    let corrupt = || StorageError::Corrupt {
        key: keys::printable(key),
    };
    let Some((&PACK_FORMAT, mut rest)) = bytes.split_first() else {
        return Err(corrupt());
    };
    let mut out = Vec::new();
    while !rest.is_empty() {
        let header = rest.get(..ENTRY_HEADER).ok_or_else(corrupt)?;
        let order = u64::from_be_bytes(header[..8].try_into().map_err(|_| corrupt())?);
        let id: [u8; MessageId::LEN] = header[8..8 + MessageId::LEN]
            .try_into()
            .map_err(|_| corrupt())?;
        let len = u32::from_le_bytes(
            header[8 + MessageId::LEN..]
                .try_into()
                .map_err(|_| corrupt())?,
        ) as usize;
        let end = ENTRY_HEADER.checked_add(len).ok_or_else(corrupt)?;
        let record = rest.get(ENTRY_HEADER..end).ok_or_else(corrupt)?;
        out.push(Packed {
            order,
            id: MessageId(id),
            record,
        });
        rest = &rest[end..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::encode;

    fn pair(conv: u8, id: u8, order: u64, text: &[u8]) -> [StorageOp; 2] {
        let c = ConversationId([conv; 16]);
        let m = MessageId([id; 16]);
        [
            StorageOp::Put {
                key: keys::history_message(&c, &m),
                value: text.to_vec(),
            },
            StorageOp::Put {
                key: keys::history_order(&c, order),
                value: encode(&m).unwrap(),
            },
        ]
    }

    #[test]
    fn pairs_become_one_pack_per_conversation() {
        let mut batch = Vec::new();
        batch.extend(pair(1, 10, 5, b"a"));
        batch.push(StorageOp::Put {
            key: b"s/cursor".to_vec(),
            value: vec![1, 2],
        });
        batch.extend(pair(2, 11, 6, b"bb"));
        batch.extend(pair(1, 12, 7, b"ccc"));
        let writes = pack_batch(&batch);
        assert_eq!(writes.len(), 3);
        assert!(matches!(writes[0], Write::Put(k, _) if k == b"s/cursor"));
        let Write::PutOwned(k, v) = &writes[1] else {
            panic!("pack expected")
        };
        assert_eq!(*k, pack_key(&ConversationId([1; 16]), 5));
        let entries = unpack(k, v).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].order, entries[0].record), (5, &b"a"[..]));
        assert_eq!((entries[1].order, entries[1].id), (7, MessageId([12; 16])));
        assert_eq!(entries[1].record, b"ccc");
    }

    #[test]
    fn large_batches_are_split_below_the_blob_threshold() {
        let text = vec![7u8; 1100];
        let mut batch = Vec::new();
        for i in 0..200u8 {
            batch.extend(pair(1, i, 1000 + u64::from(i), &text));
        }
        let writes = pack_batch(&batch);
        let mut orders = Vec::new();
        for w in &writes {
            let Write::PutOwned(k, v) = w else {
                panic!("pack expected")
            };
            assert!(v.len() <= PACK_MAX_BYTES, "{} bytes", v.len());
            let entries = unpack(k, v).unwrap();
            assert_eq!(*k, pack_key(&ConversationId([1; 16]), entries[0].order));
            orders.extend(entries.iter().map(|e| e.order));
        }
        assert!(writes.len() >= 4);
        assert_eq!(orders, (1000..1200).collect::<Vec<u64>>());
    }

    #[test]
    fn a_message_delete_also_marks_it_gone() {
        let c = ConversationId([3; 16]);
        let m = MessageId([4; 16]);
        let batch = [StorageOp::Delete {
            key: keys::history_message(&c, &m),
        }];
        let writes = pack_batch(&batch);
        assert_eq!(writes.len(), 2);
        assert!(matches!(&writes[1], Write::PutOwned(k, _) if *k == gone_key(&c, &m)));
    }

    #[test]
    fn an_order_record_for_another_message_is_not_packed() {
        let mut batch = pair(1, 10, 5, b"a").to_vec();
        batch[1] = StorageOp::Put {
            key: keys::history_order(&ConversationId([1; 16]), 5),
            value: encode(&MessageId([99; 16])).unwrap(),
        };
        let writes = pack_batch(&batch);
        assert!(writes.iter().all(|w| matches!(w, Write::Put(..))));
    }

    #[test]
    fn truncated_packs_are_corrupt_not_panics() {
        let c = ConversationId([1; 16]);
        let batch = pair(1, 10, 5, b"hello");
        let writes = pack_batch(&batch);
        let Write::PutOwned(k, v) = &writes[0] else {
            panic!("pack expected")
        };
        for cut in 2..v.len() {
            assert!(unpack(k, &v[..cut]).is_err(), "cut at {cut}");
        }
        assert!(unpack(&pack_key(&c, 5), &[]).is_err());
    }
}
