//! Composite keys of the redb tables.
//!
//! Every key is a fixed-width byte array made of fixed-width ids and
//! big-endian integers, concatenated without separators. Because redb compares
//! such keys bytewise, byte order equals the logical order of the tuple
//! (`(device, seq)`, `(expires_at, device, seq)`, …): a range scan over a
//! device prefix walks its seqs in ascending order and the expiry index walks
//! oldest first. The layouts are specified in `docs/STORAGE.md`.

use hush_protocol::{DeviceId, MessageId};

/// `device ‖ seq`: the inbox and tombstone tables.
pub(crate) type InboxKey = [u8; 24];
/// `sender ‖ recipient ‖ message id`: the dedup table.
pub(crate) type DedupKey = [u8; 48];
/// `expires_at ‖ sender ‖ recipient ‖ message id`: the dedup expiry index.
pub(crate) type DedupExpiryKey = [u8; 56];
/// `expires_at ‖ device ‖ seq`: the inbox expiry index.
pub(crate) type ExpiryKey = [u8; 32];
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

/// Dedup key of one (sender, recipient, message id).
pub(crate) fn dedup_key(sender: &DeviceId, recipient: &DeviceId, id: &MessageId) -> DedupKey {
    let mut k = [0u8; 48];
    k[..16].copy_from_slice(sender.as_bytes());
    k[16..32].copy_from_slice(recipient.as_bytes());
    k[32..].copy_from_slice(id.as_bytes());
    k
}

/// Inverse of [`dedup_key`] (the stores never need it; it pins the layout).
#[cfg(test)]
pub(crate) fn split_dedup_key(k: &DedupKey) -> (DeviceId, DeviceId, MessageId) {
    (
        DeviceId(field(k, 0)),
        DeviceId(field(k, 16)),
        MessageId(field(k, 32)),
    )
}

/// Dedup expiry index key: the dedup key prefixed with its expiry time.
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

/// The greatest dedup expiry key whose time is `expires_at_ms`: the inclusive
/// upper bound of a scan for everything expired at that time.
pub(crate) fn dedup_expiry_upper(expires_at_ms: u64) -> DedupExpiryKey {
    dedup_expiry_key(expires_at_ms, &[0xFF; 48])
}

/// Inbox expiry index key.
pub(crate) fn expiry_key(expires_at_ms: u64, device: &DeviceId, seq: u64) -> ExpiryKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&expires_at_ms.to_be_bytes());
    k[8..24].copy_from_slice(device.as_bytes());
    k[24..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Inverse of [`expiry_key`].
pub(crate) fn split_expiry_key(k: &ExpiryKey) -> (u64, DeviceId, u64) {
    (u64_at(k, 0), DeviceId(field(k, 8)), u64_at(k, 24))
}

/// The greatest expiry index key whose time is `expires_at_ms`.
pub(crate) fn expiry_upper(expires_at_ms: u64) -> ExpiryKey {
    expiry_key(expires_at_ms, &DeviceId([0xFF; 16]), u64::MAX)
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
        fn expiry_key_round_trips_and_orders(
            e in any::<u64>(), a in device(), s in any::<u64>(),
            f in any::<u64>(), b in device(), t in any::<u64>(),
        ) {
            let (ka, kb) = (expiry_key(e, &a, s), expiry_key(f, &b, t));
            prop_assert_eq!(split_expiry_key(&ka), (e, a, s));
            prop_assert_eq!(ka.cmp(&kb), (e, a, s).cmp(&(f, b, t)));
            prop_assert!(ka <= expiry_upper(e));
            prop_assert_eq!(ka <= expiry_upper(f), e <= f);
        }

        #[test]
        fn dedup_keys_round_trip_and_order(
            e in any::<u64>(), s1 in device(), r1 in device(), m1 in message_id(),
            f in any::<u64>(), s2 in device(), r2 in device(), m2 in message_id(),
        ) {
            let (d1, d2) = (dedup_key(&s1, &r1, &m1), dedup_key(&s2, &r2, &m2));
            prop_assert_eq!(split_dedup_key(&d1), (s1, r1, m1));
            prop_assert_eq!(d1.cmp(&d2), (s1, r1, m1).cmp(&(s2, r2, m2)));
            let (x1, x2) = (dedup_expiry_key(e, &d1), dedup_expiry_key(f, &d2));
            prop_assert_eq!(split_dedup_expiry_key(&x1), (e, d1));
            prop_assert_eq!(x1.cmp(&x2), (e, s1, r1, m1).cmp(&(f, s2, r2, m2)));
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
        // §2.5: expires_at ‖ device ‖ seq.
        let k = expiry_key(0x0102, &DeviceId([0xAB; 16]), 7);
        assert_eq!(&k[..8], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&k[8..24], &[0xAB; 16]);
        assert_eq!(&k[24..], &7u64.to_be_bytes());
        // §2.7 and §2.8: sender ‖ recipient ‖ message id, prefixed by time.
        let d = dedup_key(&DeviceId([1; 16]), &DeviceId([2; 16]), &MessageId([3; 16]));
        assert_eq!(
            (&d[..16], &d[16..32], &d[32..]),
            (&[1u8; 16][..], &[2u8; 16][..], &[3u8; 16][..])
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
