//! Composite keys of the redb tables.
//!
//! Every key is a fixed-width byte array made of fixed-width ids and
//! big-endian integers, concatenated without separators. Because redb compares
//! such keys bytewise, byte order equals the logical order of the tuple
//! (`(device, seq)`, `(expires_at, device)`, …): a range scan over a
//! device prefix walks its seqs in ascending order and the time-ordered
//! tables walk oldest first. The layouts are specified in `docs/STORAGE.md`.

use hush_protocol::{DeviceId, MessageId};

/// `device ‖ seq`: the inbox and tombstone tables.
pub(crate) type InboxKey = [u8; 24];
/// `message id ‖ sender ‖ recipient`: the dedup table.
pub(crate) type DedupKey = [u8; 48];
/// `expires_at ‖ message id ‖ sender ‖ recipient`: the dedup batch lists
/// (keyed by their first entry).
pub(crate) type DedupExpiryKey = [u8; 56];
/// `expires_at ‖ device`: the purge queue (one entry per non-empty inbox).
pub(crate) type QueueKey = [u8; 24];
/// `device ‖ one-time prekey id`: the one-time prekey table.
pub(crate) type OtkKey = [u8; 20];

/// Copy `N` bytes of a fixed-width key starting at `at`. Only called with
/// constant offsets that lie inside the key, so the slice is always `N` long.
fn field<const N: usize>(key: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&key[at..at + N]);
    out
}

fn u64_at(key: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(field(key, at))
}

/// Inbox (and tombstone) key of `seq` in `device`'s inbox.
pub(crate) fn inbox_key(device: &DeviceId, seq: u64) -> InboxKey {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(device.as_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Inverse of [`inbox_key`].
pub(crate) fn split_inbox_key(k: &InboxKey) -> (DeviceId, u64) {
    (DeviceId(field(k, 0)), u64_at(k, 16))
}

/// Dedup key of one (sender, recipient, message id). The message id comes
/// first because it begins with its creation time (`MessageId::new`): new
/// entries then land next to each other at the end of the B-tree instead of
/// dirtying one leaf per (sender, recipient) pair in every commit. A client
/// that makes up its timestamps only scatters its own entries; the key's
/// meaning is the same triple either way.
pub(crate) fn dedup_key(sender: &DeviceId, recipient: &DeviceId, id: &MessageId) -> DedupKey {
    let mut k = [0u8; 48];
    k[..16].copy_from_slice(id.as_bytes());
    k[16..32].copy_from_slice(sender.as_bytes());
    k[32..].copy_from_slice(recipient.as_bytes());
    k
}

/// Inverse of [`dedup_key`] (the stores never need it; it pins the layout).
#[cfg(test)]
pub(crate) fn split_dedup_key(k: &DedupKey) -> (DeviceId, DeviceId, MessageId) {
    (
        DeviceId(field(k, 16)),
        DeviceId(field(k, 32)),
        MessageId(field(k, 0)),
    )
}

/// Key of a dedup batch list: its first dedup key prefixed with its expiry
/// time (also the layout of each list entry).
pub(crate) fn dedup_expiry_key(expires_at_ms: u64, dedup: &DedupKey) -> DedupExpiryKey {
    let mut k = [0u8; 56];
    k[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    k[8..].copy_from_slice(dedup);
    k
}

/// Inverse of [`dedup_expiry_key`].
pub(crate) fn split_dedup_expiry_key(k: &DedupExpiryKey) -> (u64, DedupKey) {
    (u64_at(k, 0), field(k, 8))
}

/// The greatest dedup batch key whose time is `expires_at_ms`: the inclusive
/// upper bound of a scan for everything expired at that time.
pub(crate) fn dedup_expiry_upper(expires_at_ms: u64) -> DedupExpiryKey {
    dedup_expiry_key(expires_at_ms, &[0xFF; 48])
}

/// Purge queue key of `device`, whose oldest stored envelope expires at
/// `expires_at_ms`.
pub(crate) fn queue_key(expires_at_ms: u64, device: &DeviceId) -> QueueKey {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    k[8..].copy_from_slice(device.as_bytes());
    k
}

/// Inverse of [`queue_key`].
pub(crate) fn split_queue_key(k: &QueueKey) -> (u64, DeviceId) {
    (u64_at(k, 0), DeviceId(field(k, 8)))
}

/// The greatest purge queue key whose time is `expires_at_ms`.
pub(crate) fn queue_upper(expires_at_ms: u64) -> QueueKey {
    queue_key(expires_at_ms, &DeviceId([0xFF; 16]))
}

/// One-time prekey key.
pub(crate) fn otk_key(device: &DeviceId, id: u32) -> OtkKey {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(device.as_bytes());
    k[16..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Inverse of [`otk_key`].
pub(crate) fn split_otk_key(k: &OtkKey) -> (DeviceId, u32) {
    (DeviceId(field(k, 0)), u32::from_be_bytes(field(k, 16)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn device() -> impl Strategy<Value = DeviceId> {
        any::<[u8; 16]>().prop_map(DeviceId)
    }

    fn message_id() -> impl Strategy<Value = MessageId> {
        any::<[u8; 16]>().prop_map(MessageId)
    }

    proptest! {
        #[test]
        fn inbox_key_round_trips_and_orders(a in device(), s in any::<u64>(), b in device(), t in any::<u64>()) {
            let (ka, kb) = (inbox_key(&a, s), inbox_key(&b, t));
            prop_assert_eq!(split_inbox_key(&ka), (a, s));
            prop_assert_eq!(ka.cmp(&kb), (a, s).cmp(&(b, t)));
        }

        #[test]
        fn same_device_seqs_order_numerically(a in device(), s in any::<u64>(), t in any::<u64>()) {
            prop_assert_eq!(inbox_key(&a, s).cmp(&inbox_key(&a, t)), s.cmp(&t));
        }

        #[test]
        fn queue_key_round_trips_and_orders(
            e in any::<u64>(), a in device(), f in any::<u64>(), b in device(),
        ) {
            let (ka, kb) = (queue_key(e, &a), queue_key(f, &b));
            prop_assert_eq!(split_queue_key(&ka), (e, a));
            prop_assert_eq!(ka.cmp(&kb), (e, a).cmp(&(f, b)));
            prop_assert!(ka <= queue_upper(e));
            prop_assert_eq!(ka <= queue_upper(f), e <= f);
        }

        #[test]
        fn dedup_keys_round_trip_and_order(
            e in any::<u64>(), s1 in device(), r1 in device(), m1 in message_id(),
            f in any::<u64>(), s2 in device(), r2 in device(), m2 in message_id(),
        ) {
            let (d1, d2) = (dedup_key(&s1, &r1, &m1), dedup_key(&s2, &r2, &m2));
            prop_assert_eq!(split_dedup_key(&d1), (s1, r1, m1));
            prop_assert_eq!(d1.cmp(&d2), (m1, s1, r1).cmp(&(m2, s2, r2)));
            let (x1, x2) = (dedup_expiry_key(e, &d1), dedup_expiry_key(f, &d2));
            prop_assert_eq!(split_dedup_expiry_key(&x1), (e, d1));
            prop_assert_eq!(x1.cmp(&x2), (e, m1, s1, r1).cmp(&(f, m2, s2, r2)));
            prop_assert_eq!(x1 <= dedup_expiry_upper(f), e <= f);
        }

        #[test]
        fn otk_key_round_trips_and_orders(a in device(), i in any::<u32>(), b in device(), j in any::<u32>()) {
            let (ka, kb) = (otk_key(&a, i), otk_key(&b, j));
            prop_assert_eq!(split_otk_key(&ka), (a, i));
            prop_assert_eq!(ka.cmp(&kb), (a, i).cmp(&(b, j)));
        }
    }

    /// Decode spaced hex from the examples in `docs/STORAGE.md`.
    fn unhex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn layouts_match_the_spec() {
        // §2.4 example.
        let k = inbox_key(&DeviceId([0x11; 16]), 258);
        assert_eq!(
            k.to_vec(),
            unhex("11111111111111111111111111111111 0000000000000102")
        );
        // §2.5: expires_at ‖ device.
        let k = queue_key(0x0102, &DeviceId([0xAB; 16]));
        assert_eq!(
            k.to_vec(),
            unhex("0000000000000102 abababababababababababababababab")
        );
        // §2.7 and §2.8: message id ‖ sender ‖ recipient, prefixed by time.
        let d = dedup_key(&DeviceId([1; 16]), &DeviceId([2; 16]), &MessageId([3; 16]));
        assert_eq!(
            (&d[..16], &d[16..32], &d[32..]),
            (&[3u8; 16][..], &[1u8; 16][..], &[2u8; 16][..])
        );
        let x = dedup_expiry_key(9, &d);
        assert_eq!((&x[..8], &x[8..]), (&9u64.to_be_bytes()[..], &d[..]));
        // §2.10: device ‖ id.
        let k = otk_key(&DeviceId([5; 16]), 0x0A0B_0C0D);
        assert_eq!(&k[16..], &[0x0A, 0x0B, 0x0C, 0x0D]);
    }

    #[test]
    fn seq_is_big_endian_at_the_end() {
        let k = inbox_key(&DeviceId([1; 16]), 0x0102_0304_0506_0708);
        assert_eq!(&k[..16], &[1u8; 16]);
        assert_eq!(&k[16..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        // Numeric order differs from little-endian byte order here:
        assert!(inbox_key(&DeviceId([1; 16]), 255) < inbox_key(&DeviceId([1; 16]), 256));
    }
}
