//! Identifiers: message-id time ordering and hex forms.
// Test code: a failed expectation should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{ConversationId, DeviceId, MessageId, ProtocolError, UserKey};
use proptest::prelude::*;

const MAX_TS: u64 = (1 << 48) - 1;

proptest! {
    #[test]
    fn message_ids_sort_by_creation_time(
        t1 in 0..=MAX_TS,
        t2 in 0..=MAX_TS,
        r1 in any::<[u8; 10]>(),
        r2 in any::<[u8; 10]>(),
    ) {
        let (a, b) = (MessageId::new(t1, r1), MessageId::new(t2, r2));
        if t1 < t2 {
            prop_assert!(a < b);
        } else if t1 > t2 {
            prop_assert!(a > b);
        } else {
            // Same millisecond: the random part decides.
            prop_assert_eq!(a.cmp(&b), r1.cmp(&r2));
        }
    }

    #[test]
    fn message_id_keeps_its_parts(t in 0..=MAX_TS, r in any::<[u8; 10]>()) {
        let id = MessageId::new(t, r);
        prop_assert_eq!(id.timestamp_ms(), t);
        prop_assert_eq!(&id.as_bytes()[6..], &r[..]);
        prop_assert_eq!(&id.as_bytes()[..6], &t.to_be_bytes()[2..]);
    }

    #[test]
    fn message_id_timestamp_wraps_at_48_bits(t in any::<u64>(), r in any::<[u8; 10]>()) {
        prop_assert_eq!(MessageId::new(t, r).timestamp_ms(), t & MAX_TS);
    }

    #[test]
    fn ids_hex_round_trip(d in any::<[u8; 16]>(), u in any::<[u8; 32]>()) {
        let (dev, conv, msg, user) = (DeviceId(d), ConversationId(d), MessageId(d), UserKey(u));
        prop_assert_eq!(DeviceId::from_hex(&dev.to_hex()), Ok(dev));
        prop_assert_eq!(ConversationId::from_hex(&conv.to_hex()), Ok(conv));
        prop_assert_eq!(MessageId::from_hex(&msg.to_hex()), Ok(msg));
        prop_assert_eq!(UserKey::from_hex(&user.to_hex()), Ok(user));
        prop_assert_eq!(UserKey::from_hex(&user.to_hex().to_uppercase()), Ok(user));
        prop_assert_eq!(dev.to_string(), dev.to_hex());
        prop_assert_eq!(dev.to_hex().len(), 2 * DeviceId::LEN);
        prop_assert_eq!(format!("{user:?}"), format!("UserKey({})", user.to_hex()));
    }

    #[test]
    fn hex_of_the_wrong_length_is_refused(len in 0usize..80) {
        prop_assume!(len != 32);
        let s = "a".repeat(len);
        prop_assert_eq!(DeviceId::from_hex(&s), Err(ProtocolError::Malformed("DeviceId")));
    }
}

#[test]
fn non_hex_is_refused_with_the_type_name() {
    let bad = format!("{}zz", "00".repeat(15));
    assert_eq!(
        DeviceId::from_hex(&bad),
        Err(ProtocolError::Malformed("DeviceId"))
    );
    assert_eq!(
        ConversationId::from_hex(&bad),
        Err(ProtocolError::Malformed("ConversationId"))
    );
    assert_eq!(
        MessageId::from_hex(&bad),
        Err(ProtocolError::Malformed("MessageId"))
    );
    assert_eq!(
        UserKey::from_hex("xyz"),
        Err(ProtocolError::Malformed("UserKey"))
    );
}

#[test]
fn message_ids_of_the_same_millisecond_still_differ_by_their_random_part() {
    let a = MessageId::new(1_700_000_000_000, [0; 10]);
    let b = MessageId::new(1_700_000_000_000, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    assert_ne!(a, b);
    assert!(a < b);
    assert_eq!(a.timestamp_ms(), b.timestamp_ms());
}
