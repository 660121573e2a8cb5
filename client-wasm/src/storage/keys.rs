//! The key layout. Every key is an ASCII prefix followed by fixed-size binary
//! ids (big-endian integers), so prefixes group records and byte order is the
//! order the engine wants (by seq, by delivery order).
//!
//! | key | value | what |
//! |---|---|---|
//! | `s/device` | `DeviceRecord` | device and user identity secrets, relay, name, registration flag, at-rest key |
//! | `s/prekeys` | `PrekeyRecord` | prekey secrets and what was last published |
//! | `s/cursor` | `Cursor` | highest relay seq whose envelope is durably handled |
//! | `s/counters` | `Counters` | duplicates, out-of-order, gaps, history order counter |
//! | `s/own` | `OwnDevices` | this user's verified device list (and one to publish) |
//! | `s/contact/<user 32>` | `Contact` | contact code fields and verified device list |
//! | `s/session/<device 16>` | `SessionSlot` | double-ratchet session(s) with that device |
//! | `s/out/<device 16><conv 16>` | `OutStream` | next sender seq, receipted seq, seq→message map, probe timer |
//! | `s/in/<device 16><conv 16>` | `InStream` | delivered seq, seqs received above it, gap-repair state |
//! | `s/held/<device 16><conv 16><seq 8>` | `HeldItem` | decrypted chat item waiting for a gap to fill |
//! | `s/outbox/<msg 16>` | `OutboxEntry` | sealed-at-rest payload, targets, per-target seq/transmission |
//! | `s/tomb/<msg 16>` | `Tombstone` | recalled or deleted message (applies if it arrives later) |
//! | `s/link/<token 16>` | `LinkToken` | one-time link token issued by this device |
//! | `s/parked/<relay seq 8>` | `ParkedEnvelope` | envelope from a device not yet in a verified list |
//! | `s/receipts/<device 16>` | `PendingReceipt` | receipt content not yet sent to that device |
//! | `s/group/<group 16>` | `GroupRecord` | a group's name, members, base snapshot, change log, heads (`engine::group`) |
//! | `s/gmsg/<group 16><msg 16>` | `Known` | a group message known here: depth, author, device |
//! | `s/gheld/<group 16><msg 16>` | `Held` | a group message waiting for its predecessors |
//! | `s/gread/<msg 16>` | `BTreeSet<UserKey>` | members who read one's group message |
//! | `s/gcount` | `GroupCounters` | group counters |
//! | `h/msg/<conv 16><msg 16>` | `HistoryRecord` | a delivered or sent message |
//! | `h/order/<conv 16><order 8>` | `MessageId` | delivery order of the conversation |
//! | `h/read/<msg 16>` | `()` | read marker |
//! | `h/state/<msg 16>` | `MessageState` | delivery state of a message this user sent |
//! | `h/gorder/<group 16><depth 8><msg 16>` | `()` | group order: byte order is the display order |

use hush_protocol::{ConversationId, DeviceId, MessageId, UserKey};

/// Namespace of engine state (loaded at start).
pub const STATE: &[u8] = b"s/";
/// Namespace of history (read by the app only).
pub const HISTORY: &[u8] = b"h/";

pub(crate) const DEVICE: &[u8] = b"s/device";
pub(crate) const PREKEYS: &[u8] = b"s/prekeys";
pub(crate) const CURSOR: &[u8] = b"s/cursor";
pub(crate) const COUNTERS: &[u8] = b"s/counters";
pub(crate) const OWN: &[u8] = b"s/own";
pub(crate) const CONTACT: &[u8] = b"s/contact/";
pub(crate) const SESSION: &[u8] = b"s/session/";
pub(crate) const OUT: &[u8] = b"s/out/";
pub(crate) const IN: &[u8] = b"s/in/";
pub(crate) const HELD: &[u8] = b"s/held/";
pub(crate) const OUTBOX: &[u8] = b"s/outbox/";
pub(crate) const TOMB: &[u8] = b"s/tomb/";
pub(crate) const LINK: &[u8] = b"s/link/";
pub(crate) const PARKED: &[u8] = b"s/parked/";
pub(crate) const RECEIPTS: &[u8] = b"s/receipts/";
const H_MSG: &[u8] = b"h/msg/";
const H_ORDER: &[u8] = b"h/order/";
const H_READ: &[u8] = b"h/read/";
const H_STATE: &[u8] = b"h/state/";

fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    k.extend_from_slice(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub(crate) fn contact(user: &UserKey) -> Vec<u8> {
    key(CONTACT, &[user.as_bytes()])
}
pub(crate) fn session(device: &DeviceId) -> Vec<u8> {
    key(SESSION, &[device.as_bytes()])
}
pub(crate) fn out_stream(device: &DeviceId, conv: &ConversationId) -> Vec<u8> {
    key(OUT, &[device.as_bytes(), conv.as_bytes()])
}
pub(crate) fn in_stream(device: &DeviceId, conv: &ConversationId) -> Vec<u8> {
    key(IN, &[device.as_bytes(), conv.as_bytes()])
}
pub(crate) fn held(device: &DeviceId, conv: &ConversationId, seq: u64) -> Vec<u8> {
    key(
        HELD,
        &[device.as_bytes(), conv.as_bytes(), &seq.to_be_bytes()],
    )
}
pub(crate) fn outbox(id: &MessageId) -> Vec<u8> {
    key(OUTBOX, &[id.as_bytes()])
}
/// Key of a message's tombstone.
pub fn tombstone(id: &MessageId) -> Vec<u8> {
    key(TOMB, &[id.as_bytes()])
}
pub(crate) fn link(token: &[u8; 16]) -> Vec<u8> {
    key(LINK, &[token])
}
pub(crate) fn parked(relay_seq: u64) -> Vec<u8> {
    key(PARKED, &[&relay_seq.to_be_bytes()])
}
pub(crate) fn receipts(device: &DeviceId) -> Vec<u8> {
    key(RECEIPTS, &[device.as_bytes()])
}
/// Key of a history message.
pub fn history_message(conv: &ConversationId, id: &MessageId) -> Vec<u8> {
    key(H_MSG, &[conv.as_bytes(), id.as_bytes()])
}
/// Prefix of a conversation's order records.
pub fn history_order_prefix(conv: &ConversationId) -> Vec<u8> {
    key(H_ORDER, &[conv.as_bytes()])
}
/// Key of one order record.
pub fn history_order(conv: &ConversationId, order: u64) -> Vec<u8> {
    key(H_ORDER, &[conv.as_bytes(), &order.to_be_bytes()])
}
/// Key of a read marker.
pub fn history_read(id: &MessageId) -> Vec<u8> {
    key(H_READ, &[id.as_bytes()])
}
/// Key of an outgoing message's state.
pub fn history_state(id: &MessageId) -> Vec<u8> {
    key(H_STATE, &[id.as_bytes()])
}

/// The order number at the end of an order key.
pub(crate) fn order_of(k: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = k.get(k.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// Split the fixed-size ids off a key with a known prefix.
pub(crate) fn ids_after<'a>(k: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    k.strip_prefix(prefix)
}

pub(crate) fn arr<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The smallest key above every key starting with `prefix` (`None` if the
/// prefix is all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A printable form of a key for errors and logs: the ASCII prefix, then hex.
pub fn printable(k: &[u8]) -> String {
    let cut = k
        .iter()
        .rposition(|&b| b == b'/')
        .map(|i| i + 1)
        .unwrap_or(0);
    let (p, rest) = k.split_at(cut);
    format!("{}{}", String::from_utf8_lossy(p), hex::encode(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_seq_and_print_without_values() {
        let d = DeviceId([1; 16]);
        let c = ConversationId([2; 16]);
        assert!(held(&d, &c, 2) < held(&d, &c, 10));
        assert!(held(&d, &c, 10) < held(&d, &c, 256));
        assert_eq!(order_of(&history_order(&c, 77)), Some(77));
        assert!(printable(&outbox(&MessageId([0xab; 16]))).starts_with("s/outbox/abab"));
        assert!(history_message(&c, &MessageId([0; 16])).starts_with(HISTORY));
        assert!(outbox(&MessageId([0; 16])).starts_with(STATE));
    }
}
