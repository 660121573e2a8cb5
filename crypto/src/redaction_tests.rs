//! Proves that `Debug` of every secret-holding type leaks no secret bytes.

use crate::secret::Secret32;
use crate::*;
use chacha20::ChaCha20Rng;
use rand_core::SeedableRng;

/// Fails if `rendered` contains `secret` as hex (either case), as Rust's
/// decimal-array `Debug`, or any 8-byte window of it in decimal-array form.
fn assert_hidden(what: &str, rendered: &str, secret: &[u8; 32]) {
    let lower = hex::encode(secret);
    assert!(!rendered.contains(&lower), "{what}: hex secret leaked");
    assert!(
        !rendered.contains(&lower.to_uppercase()),
        "{what}: HEX secret leaked"
    );
    assert!(
        !rendered.contains(&format!("{secret:?}")),
        "{what}: array leaked"
    );
    for w in secret.windows(8) {
        let frag = format!("{w:?}");
        let frag = &frag[1..frag.len() - 1]; // "a, b, c, ..."
        assert!(
            !rendered.contains(frag),
            "{what}: decimal fragment leaked: {frag}"
        );
    }
}

fn check(what: &str, rendered: String, secrets: &[[u8; 32]]) {
    assert!(!secrets.is_empty(), "{what}: nothing to check");
    for s in secrets {
        assert_hidden(what, &rendered, s);
    }
    // Pretty form too.
    assert!(
        rendered.contains("redacted") || what == "skip-marker",
        "{what}: {rendered}"
    );
}

#[test]
fn debug_output_never_contains_secret_bytes() {
    let mut rng = ChaCha20Rng::from_seed([42u8; 32]);

    let s = Secret32([0xA5; 32]);
    assert_eq!(format!("{s:?}"), "[redacted]");
    assert_eq!(format!("{s:#?}"), "[redacted]");

    let alice = DeviceIdentity::generate(&mut rng);
    let bob = DeviceIdentity::generate(&mut rng);
    check(
        "DeviceIdentity",
        format!("{alice:?}"),
        &alice.debug_secrets(),
    );
    check(
        "DeviceIdentity#",
        format!("{alice:#?}"),
        &alice.debug_secrets(),
    );

    let user = UserIdentity::generate(&mut rng);
    check(
        "UserIdentity",
        format!("{user:?} {user:#?}"),
        &user.debug_secrets(),
    );

    let mut prekeys = PrekeySecrets::new(&bob, &mut rng, 0);
    prekeys.generate_one_time_prekeys(&mut rng, 5).unwrap();
    prekeys
        .rotate_signed_prekey(&bob, &mut rng, SIGNED_PREKEY_ROTATION_MS)
        .unwrap();
    check(
        "PrekeySecrets",
        format!("{prekeys:?} {prekeys:#?}"),
        &prekeys.debug_secrets(),
    );

    // Sessions with every kind of stored secret: chains, reseed seeds, skipped keys.
    let bundle = prekeys.bundle(Some(1)).unwrap();
    let (mut a, init) = initiate(&alice, &bundle, &mut rng).unwrap();
    let mut b = respond(&bob, &mut prekeys, &init, &alice.public()).unwrap();
    a.set_rotation_policy(RotationPolicy::new(2, MAX_CHAIN_AGE_MS).unwrap());
    let mut msgs = Vec::new();
    for i in 0..7u8 {
        msgs.push(
            a.seal(&mut rng, 0, &[i], |h| h.to_bytes().to_vec())
                .unwrap(),
        );
    }
    // Deliver out of order so skipped keys and skipped seeds exist.
    for idx in [6usize, 1] {
        let (h, ct) = &msgs[idx];
        b.open(&mut rng, 0, h, &h.to_bytes(), ct).unwrap();
    }
    let (h, ct) = b
        .seal(&mut rng, 0, b"reply", |h| h.to_bytes().to_vec())
        .unwrap();
    a.open(&mut rng, 0, &h, &h.to_bytes(), &ct).unwrap();
    assert!(b.skipped_key_count() > 0);
    for (name, sess) in [("Session(a)", &a), ("Session(b)", &b)] {
        check(name, format!("{sess:?} {sess:#?}"), &sess.debug_secrets());
    }
}
