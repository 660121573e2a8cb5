//! At-rest sealing helper and public padding API.
// Test helpers outside #[test] fns may unwrap too (clippy.toml only covers #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::rng;
use hush_crypto::*;
use proptest::prelude::*;

#[test]
fn at_rest_round_trip_and_layout() {
    let mut r = rng(300);
    let key = [3u8; 32];
    let sealed = seal_at_rest(&key, &mut r, b"outbox entry", b"outbox-v1").unwrap();
    assert_eq!(sealed.len(), AT_REST_NONCE_LEN + 12 + TAG_LEN);
    assert_eq!(
        open_at_rest(&key, &sealed, b"outbox-v1").unwrap(),
        b"outbox entry"
    );
}

#[test]
fn at_rest_rejects_wrong_key_ad_tampering_truncation() {
    let mut r = rng(301);
    let key = [3u8; 32];
    let sealed = seal_at_rest(&key, &mut r, b"secret", b"ad").unwrap();
    assert_eq!(
        open_at_rest(&[4u8; 32], &sealed, b"ad"),
        Err(CryptoError::DecryptFailed)
    );
    assert_eq!(
        open_at_rest(&key, &sealed, b"ae"),
        Err(CryptoError::DecryptFailed)
    );
    for i in 0..sealed.len() {
        let mut t = sealed.clone();
        t[i] ^= 0x40;
        assert_eq!(
            open_at_rest(&key, &t, b"ad"),
            Err(CryptoError::DecryptFailed),
            "byte {i}"
        );
    }
    assert_eq!(
        open_at_rest(&key, &sealed[..27], b"ad"),
        Err(CryptoError::Truncated)
    );
    assert_eq!(open_at_rest(&key, &[], b"ad"), Err(CryptoError::Truncated));
    // Empty plaintext is fine.
    let e = seal_at_rest(&key, &mut r, b"", b"").unwrap();
    assert_eq!(open_at_rest(&key, &e, b"").unwrap(), b"");
}

#[test]
fn at_rest_nonces_are_fresh() {
    let mut r = rng(302);
    let key = [3u8; 32];
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        let s = seal_at_rest(&key, &mut r, b"same", b"").unwrap();
        assert!(seen.insert(s[..AT_REST_NONCE_LEN].to_vec()));
    }
}

proptest! {
    #[test]
    fn pad_unpad_round_trip(pt in prop::collection::vec(any::<u8>(), 0..20_000)) {
        let p = pad(&pt);
        prop_assert_eq!(p.len(), padded_len(pt.len()));
        prop_assert!(p.len() > pt.len());
        prop_assert_eq!(unpad(&p).unwrap(), pt);
    }

    #[test]
    fn unpad_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
        if let Ok(pt) = unpad(&bytes) {
            prop_assert_eq!(pad(&pt), bytes);
        }
    }

    #[test]
    fn header_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
        if let Ok(h) = RatchetHeader::from_bytes(&bytes) {
            prop_assert_eq!(h.to_bytes().to_vec(), bytes.clone());
        }
        if let Ok(i) = SessionInit::from_bytes(&bytes) {
            prop_assert_eq!(i.to_bytes().to_vec(), bytes);
        }
    }
}
