//! Packed history: many messages in one record, for every store.
//!
//! The engine stores every message as two records (`h/msg/<conv><id>` with
//! the text, `h/order/<conv><order>` with its position), so a 200-message
//! page is 400 writes. Stores pay per record as well as per byte (IndexedDB
//! in Chromium 50–100 µs per `put` whatever its size; redb a B-tree insert
//! and its page updates per record), so a store turns those pairs into one
//! record per conversation and batch (several when they would exceed the
//! store's size bound):
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
//! written one record per key as the engine gave it, and records written
//! one per key (by earlier versions, or by stores that do not pack) are
//! still read: history reads merge both.
//!
//! This module is the pure codec: [`pack_batch`] (engine batch → writes),
//! [`unpack`] (pack → messages) and the keys. The native file store and the
//! browser's IndexedDB store both use it.

use crate::error::StorageError;
use crate::storage::{StorageOp, decode, keys};
use hush_protocol::{ConversationId, MessageId};

/// Key prefix of packs.
pub const PACK: &[u8] = b"h/pack/";
/// Key prefix of erase markers.
pub const GONE: &[u8] = b"h/gone/";
/// Format byte in front of a pack (and the value of an erase marker).
const PACK_FORMAT: u8 = 1;
/// Bytes in front of each packed record: order, id, record length.
const ENTRY_HEADER: usize = 8 + MessageId::LEN + 4;

/// The prefix of one conversation's packs.
pub fn pack_prefix(conv: &ConversationId) -> Vec<u8> {
    let mut k = Vec::with_capacity(PACK.len() + ConversationId::LEN + 8);
    k.extend_from_slice(PACK);
    k.extend_from_slice(conv.as_bytes());
    k
}

/// The key of the pack whose first message has position `order` (also the
/// exclusive upper bound for "packs starting before `order`").
pub fn pack_key(conv: &ConversationId, order: u64) -> Vec<u8> {
    let mut k = pack_prefix(conv);
    k.extend_from_slice(&order.to_be_bytes());
    k
}

/// The erase marker of a message.
pub fn gone_key(conv: &ConversationId, id: &MessageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(GONE.len() + ConversationId::LEN + MessageId::LEN);
    k.extend_from_slice(GONE);
    k.extend_from_slice(conv.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// One store write after packing.
#[derive(Debug)]
pub enum Write<'a> {
    /// A record written as the engine gave it.
    Put(&'a [u8], &'a [u8]),
    /// A record the store built (a pack or an erase marker).
    PutOwned(Vec<u8>, Vec<u8>),
    /// A removal.
    Delete(&'a [u8]),
}

impl Write<'_> {
    /// The key this write touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Write::Put(k, _) | Write::Delete(k) => k,
            Write::PutOwned(k, _) => k,
        }
    }
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

/// A pack being filled: its conversation, first and last order, bytes.
struct Building {
    conv: ConversationId,
    first: u64,
    last: u64,
    bytes: Vec<u8>,
}

/// The writes for one batch: message/order pairs packed per conversation
/// (a pack is closed before it grows past `max_bytes`, unless it holds one
/// message only), erases marked, everything else unchanged and in its
/// original order; the packs come last.
pub fn pack_batch(batch: &[StorageOp], max_bytes: usize) -> Vec<Write<'_>> {
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
            // Orders ascend inside a pack (the engine's counter only grows;
            // anything else starts a new pack rather than a corrupt one).
            let open = packs.iter().rposition(|p| {
                p.conv == conv
                    && p.last < order
                    && (p.bytes.len() == 1 || p.bytes.len() + entry <= max_bytes)
            });
            let pack = match open {
                Some(at) => &mut packs[at],
                None => {
                    let mut bytes = Vec::with_capacity(max_bytes.min(1 + 64 * entry));
                    bytes.push(PACK_FORMAT);
                    packs.push(Building {
                        conv,
                        first: order,
                        last: order,
                        bytes,
                    });
                    let last = packs.len() - 1;
                    &mut packs[last]
                }
            };
            pack.last = order;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed<'a> {
    /// Its position in the conversation.
    pub order: u64,
    /// The message.
    pub id: MessageId,
    /// The encoded `HistoryRecord`, as the engine wrote it.
    pub record: &'a [u8],
}

/// The messages of a pack, ascending by order. A pack that does not parse
/// is [`StorageError::Corrupt`] naming its key.
pub fn unpack<'a>(key: &[u8], bytes: &'a [u8]) -> Result<Vec<Packed<'a>>, StorageError> {
    let corrupt = || StorageError::Corrupt {
        key: keys::printable(key),
    };
    let Some((&PACK_FORMAT, mut rest)) = bytes.split_first() else {
        return Err(corrupt());
    };
    let mut out = Vec::new();
    while !rest.is_empty() {
        let header = rest.get(..ENTRY_HEADER).ok_or_else(corrupt)?;
        let (order, header) = header.split_at(8);
        let (id, len) = header.split_at(MessageId::LEN);
        let order = u64::from_be_bytes(order.try_into().map_err(|_| corrupt())?);
        let id: [u8; MessageId::LEN] = id.try_into().map_err(|_| corrupt())?;
        let len = u32::from_le_bytes(len.try_into().map_err(|_| corrupt())?) as usize;
        let end = ENTRY_HEADER.checked_add(len).ok_or_else(corrupt)?;
        let record = rest.get(ENTRY_HEADER..end).ok_or_else(corrupt)?;
        if out.last().is_some_and(|p: &Packed<'_>| p.order >= order) {
            return Err(corrupt());
        }
        out.push(Packed {
            order,
            id: MessageId(id),
            record,
        });
        rest = rest.get(end..).ok_or_else(corrupt)?;
    }
    Ok(out)
}

/// Whether a key is a pack of some conversation (for stores that count).
pub fn is_pack(key: &[u8]) -> bool {
    key.starts_with(PACK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::encode;

    const MAX: usize = 60 * 1024;

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
        let writes = pack_batch(&batch, MAX);
        assert_eq!(writes.len(), 3);
        assert!(matches!(writes[0], Write::Put(k, _) if k == b"s/cursor"));
        let Write::PutOwned(k, v) = &writes[1] else {
            panic!("pack expected")
        };
        assert_eq!(*k, pack_key(&ConversationId([1; 16]), 5));
        assert!(is_pack(k));
        let entries = unpack(k, v).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].order, entries[0].record), (5, &b"a"[..]));
        assert_eq!((entries[1].order, entries[1].id), (7, MessageId([12; 16])));
        assert_eq!(entries[1].record, b"ccc");
        let Write::PutOwned(k2, v2) = &writes[2] else {
            panic!("pack expected")
        };
        assert_eq!(*k2, pack_key(&ConversationId([2; 16]), 6));
        assert_eq!(unpack(k2, v2).unwrap()[0].record, b"bb");
    }

    #[test]
    fn large_batches_are_split_at_the_size_bound() {
        let text = vec![7u8; 1100];
        let mut batch = Vec::new();
        for i in 0..200u8 {
            batch.extend(pair(1, i, 1000 + u64::from(i), &text));
        }
        for max in [MAX, 256 * 1024] {
            let writes = pack_batch(&batch, max);
            let mut orders = Vec::new();
            for w in &writes {
                let Write::PutOwned(k, v) = w else {
                    panic!("pack expected")
                };
                assert!(v.len() <= max, "{} bytes", v.len());
                let entries = unpack(k, v).unwrap();
                assert_eq!(*k, pack_key(&ConversationId([1; 16]), entries[0].order));
                orders.extend(entries.iter().map(|e| e.order));
            }
            let expected = (200 * (ENTRY_HEADER + 1100)).div_ceil(max);
            assert!(writes.len() >= expected, "{} packs", writes.len());
            assert_eq!(orders, (1000..1200).collect::<Vec<u64>>());
        }
    }

    #[test]
    fn a_message_larger_than_the_bound_gets_a_pack_of_its_own() {
        let big = vec![1u8; 300];
        let mut batch = pair(1, 1, 1, &big).to_vec();
        batch.extend(pair(1, 2, 2, b"x"));
        let writes = pack_batch(&batch, 100);
        assert_eq!(writes.len(), 2);
        let sizes: Vec<usize> = writes
            .iter()
            .map(|w| match w {
                Write::PutOwned(k, v) => unpack(k, v).unwrap().len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, vec![1, 1]);
    }

    #[test]
    fn a_message_delete_also_marks_it_gone() {
        let c = ConversationId([3; 16]);
        let m = MessageId([4; 16]);
        let batch = [StorageOp::Delete {
            key: keys::history_message(&c, &m),
        }];
        let writes = pack_batch(&batch, MAX);
        assert_eq!(writes.len(), 2);
        assert!(matches!(writes[0], Write::Delete(k) if k == keys::history_message(&c, &m)));
        assert!(matches!(&writes[1], Write::PutOwned(k, _) if *k == gone_key(&c, &m)));
        // Other deletes are passed through without a marker.
        let other = [StorageOp::Delete {
            key: b"s/tomb/x".to_vec(),
        }];
        assert_eq!(pack_batch(&other, MAX).len(), 1);
    }

    #[test]
    fn an_order_record_for_another_message_is_not_packed() {
        let mut batch = pair(1, 10, 5, b"a").to_vec();
        batch[1] = StorageOp::Put {
            key: keys::history_order(&ConversationId([1; 16]), 5),
            value: encode(&MessageId([99; 16])).unwrap(),
        };
        let writes = pack_batch(&batch, MAX);
        assert!(writes.iter().all(|w| matches!(w, Write::Put(..))));
    }

    #[test]
    fn corrupt_packs_are_typed_errors_not_panics() {
        let c = ConversationId([1; 16]);
        let mut batch = pair(1, 10, 5, b"hello").to_vec();
        batch.extend(pair(1, 11, 6, b"again"));
        let writes = pack_batch(&batch, MAX);
        let Write::PutOwned(k, v) = &writes[0] else {
            panic!("pack expected")
        };
        for cut in 2..v.len() {
            let r = unpack(k, &v[..cut]);
            assert!(
                matches!(r, Err(StorageError::Corrupt { .. })) || r.is_ok_and(|e| e.len() == 1),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            unpack(&pack_key(&c, 5), &[]),
            Err(StorageError::Corrupt { .. })
        ));
        // An unknown format byte.
        let mut wrong = v.clone();
        wrong[0] = 9;
        assert!(unpack(k, &wrong).is_err());
        // A length that points past the end.
        let mut long = v.clone();
        long[1 + 8 + MessageId::LEN] = 0xff;
        assert!(unpack(k, &long).is_err());
        // Orders that do not ascend.
        let mut swapped = v.clone();
        swapped[1..9].copy_from_slice(&9u64.to_be_bytes());
        assert!(unpack(k, &swapped).is_err());
    }

    #[test]
    fn descending_orders_start_a_new_pack() {
        let mut batch = pair(1, 12, 9, b"x").to_vec();
        batch.extend(pair(1, 13, 3, b"y"));
        let writes = pack_batch(&batch, MAX);
        assert_eq!(writes.len(), 2);
        for w in &writes {
            let Write::PutOwned(k, v) = w else {
                panic!("pack expected")
            };
            assert_eq!(unpack(k, v).unwrap().len(), 1);
        }
    }
}
