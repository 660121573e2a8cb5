//! Prekey management and the X3DH handshake.
// Test helpers outside #[test] fns may unwrap too (clippy.toml only covers #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::{envelope_ad, recv, rng, send};
use hush_crypto::*;

fn setup(
    seed: u64,
) -> (
    rand_chacha_like::R,
    DeviceIdentity,
    DeviceIdentity,
    PrekeySecrets,
) {
    let mut r = rng(seed);
    let alice = DeviceIdentity::generate(&mut r);
    let bob = DeviceIdentity::generate(&mut r);
    let pre = PrekeySecrets::new(&bob, &mut r, 1_000);
    (r, alice, bob, pre)
}

mod rand_chacha_like {
    pub type R = chacha20::ChaCha20Rng;
}

fn handshake_and_talk(
    r: &mut rand_chacha_like::R,
    alice: &DeviceIdentity,
    bob: &DeviceIdentity,
    pre: &mut PrekeySecrets,
    bundle: &PrekeyBundle,
) {
    let (mut a, init) = initiate(alice, bundle, r).unwrap();
    assert_eq!(a.needs_init_header(), Some(&init));
    let m = send(&mut a, r, 0, b"first");
    let mut b = respond(bob, pre, &init, &alice.public()).unwrap();
    assert_eq!(recv(&mut b, r, &m).unwrap(), b"first");
    let reply = send(&mut b, r, 0, b"reply");
    assert_eq!(recv(&mut a, r, &reply).unwrap(), b"reply");
    assert_eq!(a.needs_init_header(), None);
    assert_eq!(b.needs_init_header(), None);
    assert_eq!(a.remote_identity(), &bob.public());
    assert_eq!(b.remote_identity(), &alice.public());
}

#[test]
fn x3dh_with_one_time_prekey() {
    let (mut r, alice, bob, mut pre) = setup(10);
    let otks = pre.generate_one_time_prekeys(&mut r, 2).unwrap();
    let bundle = pre.bundle(Some(otks[1].0)).unwrap();
    assert_eq!(bundle.one_time_prekey, Some(otks[1]));
    bundle.verify().unwrap();
    handshake_and_talk(&mut r, &alice, &bob, &mut pre, &bundle);
    assert_eq!(pre.one_time_count(), 1, "one-time prekey consumed");
}

#[test]
fn x3dh_without_one_time_prekey() {
    let (mut r, alice, bob, mut pre) = setup(11);
    let bundle = pre.bundle(None).unwrap();
    handshake_and_talk(&mut r, &alice, &bob, &mut pre, &bundle);
}

#[test]
fn one_time_prekey_reuse_is_refused() {
    let (mut r, alice, bob, mut pre) = setup(12);
    let otks = pre.generate_one_time_prekeys(&mut r, 1).unwrap();
    let bundle = pre.bundle(Some(otks[0].0)).unwrap();
    let (_, init) = initiate(&alice, &bundle, &mut r).unwrap();
    respond(&bob, &mut pre, &init, &alice.public()).unwrap();
    assert_eq!(
        respond(&bob, &mut pre, &init, &alice.public()).unwrap_err(),
        CryptoError::NoPrekey
    );
    // A second initiator holding the same stale bundle is refused too.
    let carol = DeviceIdentity::generate(&mut r);
    let (_, init2) = initiate(&carol, &bundle, &mut r).unwrap();
    assert_eq!(
        respond(&bob, &mut pre, &init2, &carol.public()).unwrap_err(),
        CryptoError::NoPrekey
    );
    assert_eq!(
        pre.bundle(Some(otks[0].0)).unwrap_err(),
        CryptoError::NoPrekey
    );
}

#[test]
fn bad_signed_prekey_signature_is_refused() {
    let (mut r, alice, _bob, pre) = setup(13);
    let good = pre.bundle(None).unwrap();
    let mut bad = good.clone();
    bad.signed_prekey_sig[0] ^= 1;
    assert_eq!(
        initiate(&alice, &bad, &mut r).unwrap_err(),
        CryptoError::BadSignature
    );
    let mut swapped = good.clone();
    swapped.signed_prekey[3] ^= 1;
    assert_eq!(
        initiate(&alice, &swapped, &mut r).unwrap_err(),
        CryptoError::BadSignature
    );
    // The signature binds the agreement identity key too.
    let mut other_ik = good.clone();
    other_ik.identity.agreement = DeviceIdentity::generate(&mut r).public().agreement;
    assert_eq!(
        initiate(&alice, &other_ik, &mut r).unwrap_err(),
        CryptoError::BadSignature
    );
    let mut other_id = good.clone();
    other_id.signed_prekey_id += 1;
    assert_eq!(
        initiate(&alice, &other_id, &mut r).unwrap_err(),
        CryptoError::BadSignature
    );
}

#[test]
fn respond_checks_identities() {
    let (mut r, alice, bob, mut pre) = setup(14);
    let bundle = pre.bundle(None).unwrap();
    let (_, init) = initiate(&alice, &bundle, &mut r).unwrap();
    let mallory = DeviceIdentity::generate(&mut r);
    assert_eq!(
        respond(&bob, &mut pre, &init, &mallory.public()).unwrap_err(),
        CryptoError::IdentityMismatch
    );
    assert_eq!(
        respond(&mallory, &mut pre, &init, &alice.public()).unwrap_err(),
        CryptoError::IdentityMismatch
    );
}

#[test]
fn wrong_initiator_keys_cannot_open() {
    // Mallory copies Alice's SessionInit but not her identity secret: the
    // responder derives a different SK, so Mallory's message does not open.
    let (mut r, alice, bob, mut pre) = setup(15);
    let bundle = pre.bundle(None).unwrap();
    let mallory = DeviceIdentity::generate(&mut r);
    let (mut m_sess, mut init) = initiate(&mallory, &bundle, &mut r).unwrap();
    init.initiator_identity = alice.public().agreement;
    let msg = send(&mut m_sess, &mut r, 0, b"i am alice");
    let mut b = respond(&bob, &mut pre, &init, &alice.public()).unwrap();
    assert_eq!(
        recv(&mut b, &mut r, &msg).unwrap_err(),
        CryptoError::DecryptFailed
    );
}

#[test]
fn unknown_prekey_ids_are_refused() {
    let (mut r, alice, bob, mut pre) = setup(16);
    let bundle = pre.bundle(None).unwrap();
    let (_, mut init) = initiate(&alice, &bundle, &mut r).unwrap();
    init.signed_prekey_id = 99;
    assert_eq!(
        respond(&bob, &mut pre, &init, &alice.public()).unwrap_err(),
        CryptoError::NoPrekey
    );
    let (_, mut init) = initiate(&alice, &bundle, &mut r).unwrap();
    init.one_time_prekey_id = Some(1234);
    assert_eq!(
        respond(&bob, &mut pre, &init, &alice.public()).unwrap_err(),
        CryptoError::NoPrekey
    );
    assert_eq!(pre.bundle(Some(5)).unwrap_err(), CryptoError::NoPrekey);
}

#[test]
fn signed_prekey_rotation_with_grace_period() {
    let (mut r, alice, bob, mut pre) = setup(17);
    let t0 = 1_000;
    assert!(!pre.needs_rotation(t0 + SIGNED_PREKEY_ROTATION_MS - 1));
    assert!(pre.needs_rotation(t0 + SIGNED_PREKEY_ROTATION_MS));
    let old_bundle = pre.bundle(None).unwrap();
    let t1 = t0 + SIGNED_PREKEY_ROTATION_MS;
    pre.rotate_signed_prekey(&bob, &mut r, t1).unwrap();
    assert!(!pre.needs_rotation(t1));
    let new_bundle = pre.bundle(None).unwrap();
    assert_ne!(new_bundle.signed_prekey_id, old_bundle.signed_prekey_id);
    assert_ne!(new_bundle.signed_prekey, old_bundle.signed_prekey);

    // In-flight first message built from the old bundle still opens during the grace period.
    let (mut a, init) = initiate(&alice, &old_bundle, &mut r).unwrap();
    let m = send(&mut a, &mut r, 0, b"late first message");
    pre.prune_expired(t1 + SIGNED_PREKEY_GRACE_MS - 1);
    let mut b = respond(&bob, &mut pre, &init, &alice.public()).unwrap();
    assert_eq!(recv(&mut b, &mut r, &m).unwrap(), b"late first message");

    // After the grace period the old signed prekey is gone.
    pre.prune_expired(t1 + SIGNED_PREKEY_GRACE_MS);
    assert_eq!(
        respond(&bob, &mut pre, &init, &alice.public()).unwrap_err(),
        CryptoError::NoPrekey
    );
    // The new one keeps working.
    let (_, init) = initiate(&alice, &new_bundle, &mut r).unwrap();
    respond(&bob, &mut pre, &init, &alice.public()).unwrap();

    let stranger = DeviceIdentity::generate(&mut r);
    assert_eq!(
        pre.rotate_signed_prekey(&stranger, &mut r, t1).unwrap_err(),
        CryptoError::IdentityMismatch
    );
}

#[test]
fn one_time_prekey_batches_are_bounded_and_unique() {
    let (mut r, _alice, _bob, mut pre) = setup(18);
    let a = pre.generate_one_time_prekeys(&mut r, 100).unwrap();
    let b = pre.generate_one_time_prekeys(&mut r, 100).unwrap();
    let mut ids: Vec<u32> = a.iter().chain(b.iter()).map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    assert_eq!(pre.one_time_count(), 200);
    assert_eq!(
        pre.generate_one_time_prekeys(&mut r, (MAX_ONE_TIME_PREKEYS - 199) as u32)
            .unwrap_err(),
        CryptoError::TooManyPrekeys {
            limit: MAX_ONE_TIME_PREKEYS
        }
    );
    assert_eq!(pre.one_time_count(), 200, "failed batch stores nothing");
}

#[test]
fn prekey_secrets_persist_and_still_respond() {
    let (mut r, alice, bob, mut pre) = setup(19);
    let otks = pre.generate_one_time_prekeys(&mut r, 4).unwrap();
    let bundle = pre.bundle(Some(otks[2].0)).unwrap();
    let mut restored = PrekeySecrets::from_bytes(&pre.to_bytes().unwrap()).unwrap();
    assert_eq!(restored.one_time_count(), 4);
    assert_eq!(restored.bundle(Some(otks[2].0)).unwrap(), bundle);
    handshake_and_talk(&mut r, &alice, &bob, &mut restored, &bundle);
    assert!(matches!(
        PrekeySecrets::from_bytes(&[0xff; 10]),
        Err(CryptoError::MalformedState(_))
    ));
}

#[test]
fn bundle_and_init_wire_formats_round_trip() {
    let (mut r, alice, _bob, mut pre) = setup(20);
    let otks = pre.generate_one_time_prekeys(&mut r, 1).unwrap();
    let bundle = pre.bundle(Some(otks[0].0)).unwrap();
    let bytes = postcard::to_allocvec(&bundle).unwrap();
    let back: PrekeyBundle = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, bundle);
    back.verify().unwrap();
    let (_, init) = initiate(&alice, &bundle, &mut r).unwrap();
    assert_eq!(SessionInit::from_bytes(&init.to_bytes()).unwrap(), init);
    assert_eq!(init.to_bytes().len(), SESSION_INIT_LEN);
}

#[test]
fn first_message_lost_second_still_bootstraps() {
    let (mut r, alice, bob, mut pre) = setup(21);
    let bundle = pre.bundle(None).unwrap();
    let (mut a, init) = initiate(&alice, &bundle, &mut r).unwrap();
    let _lost = send(&mut a, &mut r, 0, b"one");
    let m2 = send(&mut a, &mut r, 0, b"two");
    assert_eq!(
        a.needs_init_header(),
        Some(&init),
        "still attached to every envelope"
    );
    let mut b = respond(&bob, &mut pre, &init, &alice.public()).unwrap();
    assert_eq!(recv(&mut b, &mut r, &m2).unwrap(), b"two");
}

#[test]
fn responder_cannot_send_before_first_open() {
    let (mut r, alice, bob, mut pre) = setup(22);
    let bundle = pre.bundle(None).unwrap();
    let (_, init) = initiate(&alice, &bundle, &mut r).unwrap();
    let mut b = respond(&bob, &mut pre, &init, &alice.public()).unwrap();
    let before = b.to_bytes().unwrap().to_vec();
    assert_eq!(
        b.seal(&mut r, 0, b"too early", envelope_ad).unwrap_err(),
        CryptoError::NotReady
    );
    assert_eq!(b.to_bytes().unwrap().to_vec(), before);
}
