//! Identities, domain-separated signatures, relay auth, device lists, persistence.
// Test helpers outside #[test] fns may unwrap too (clippy.toml only covers #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::rng;
use hush_crypto::*;

#[test]
fn generic_sign_verify() {
    let mut r = rng(1);
    let d = DeviceIdentity::generate(&mut r);
    let sig = d.sign(b"message");
    verify(&d.public().signing, b"message", &sig).unwrap();
    assert_eq!(
        verify(&d.public().signing, b"messagf", &sig),
        Err(CryptoError::BadSignature)
    );
    let other = DeviceIdentity::generate(&mut r);
    assert_eq!(
        verify(&other.public().signing, b"message", &sig),
        Err(CryptoError::BadSignature)
    );
    let mut bad = sig;
    bad[10] ^= 1;
    assert_eq!(
        verify(&d.public().signing, b"message", &bad),
        Err(CryptoError::BadSignature)
    );
}

#[test]
fn auth_challenge_round_trip_and_binding() {
    let mut r = rng(2);
    let d = DeviceIdentity::generate(&mut r);
    let pk = d.public().signing;
    let challenge = [7u8; 32];
    let id = [9u8; 16];
    let sig = d.sign_auth_challenge(&challenge, &id);
    verify_auth_challenge(&pk, &challenge, &id, &sig).unwrap();
    assert_eq!(
        verify_auth_challenge(&pk, &[8u8; 32], &id, &sig),
        Err(CryptoError::BadSignature)
    );
    assert_eq!(
        verify_auth_challenge(&pk, &challenge, &[1u8; 16], &sig),
        Err(CryptoError::BadSignature)
    );
}

#[test]
fn signatures_are_domain_separated() {
    let mut r = rng(3);
    let d = DeviceIdentity::generate(&mut r);
    let pk = d.public().signing;
    let challenge = [7u8; 32];
    let id = [9u8; 16];
    // A generic signature over the same bytes an auth response covers is not an auth response...
    let mut bytes = id.to_vec();
    bytes.extend_from_slice(&challenge);
    let generic = d.sign(&bytes);
    assert_eq!(
        verify_auth_challenge(&pk, &challenge, &id, &generic),
        Err(CryptoError::BadSignature)
    );
    // ...and an auth response is not a generic signature.
    let auth = d.sign_auth_challenge(&challenge, &id);
    assert_eq!(verify(&pk, &bytes, &auth), Err(CryptoError::BadSignature));
    // A generic signature cannot pose as a prekey signature either.
    let mut pk_msg = d.public().agreement.to_vec();
    pk_msg.extend_from_slice(&1u32.to_be_bytes());
    pk_msg.extend_from_slice(&[5u8; 32]);
    let forged = PrekeyBundle {
        identity: d.public(),
        signed_prekey_id: 1,
        signed_prekey: [5u8; 32],
        signed_prekey_sig: d.sign(&pk_msg),
        one_time_prekey: None,
    };
    assert_eq!(forged.verify(), Err(CryptoError::BadSignature));
}

#[test]
fn invalid_public_key_is_bad_key() {
    // y = 2 is not the encoding of a curve point.
    let mut pk = [0u8; 32];
    pk[0] = 2;
    let r = verify(&pk, b"x", &[0u8; 64]);
    assert!(matches!(
        r,
        Err(CryptoError::BadKey) | Err(CryptoError::BadSignature)
    ));
}

#[test]
fn device_list_sign_verify_lookup() {
    let mut r = rng(4);
    let user = UserIdentity::generate(&mut r);
    let devs: Vec<DeviceEntry> = (0..3u8)
        .rev()
        .map(|i| DeviceEntry {
            device_id: [i; 16],
            public: DeviceIdentity::generate(&mut r).public(),
        })
        .collect();
    let list = user.sign_device_list(5, devs.clone()).unwrap();
    list.verify(&user.public()).unwrap();
    assert_eq!(list.devices[0].device_id, [0u8; 16], "sorted canonically");
    assert_eq!(list.device(&[2u8; 16]), Some(&devs[0].public));
    assert_eq!(list.device(&[7u8; 16]), None);

    let other = UserIdentity::generate(&mut r);
    assert_eq!(
        list.verify(&other.public()),
        Err(CryptoError::IdentityMismatch)
    );

    let mut t = list.clone();
    t.version = 6;
    assert_eq!(t.verify(&user.public()), Err(CryptoError::BadSignature));
    let mut t = list.clone();
    t.devices[1].public.agreement[0] ^= 1;
    assert_eq!(t.verify(&user.public()), Err(CryptoError::BadSignature));
    let mut t = list.clone();
    t.devices.swap(0, 1);
    assert_eq!(
        t.verify(&user.public()),
        Err(CryptoError::MalformedDeviceList)
    );
    let mut t = list.clone();
    t.devices.pop();
    assert_eq!(t.verify(&user.public()), Err(CryptoError::BadSignature));

    let dup = vec![devs[0], devs[0]];
    assert_eq!(
        user.sign_device_list(1, dup),
        Err(CryptoError::MalformedDeviceList)
    );
}

#[test]
fn identities_persist_and_keep_working() {
    let mut r = rng(5);
    let d = DeviceIdentity::generate(&mut r);
    let restored = DeviceIdentity::from_bytes(&d.to_bytes().unwrap()).unwrap();
    assert_eq!(restored.public(), d.public());
    verify(&d.public().signing, b"m", &restored.sign(b"m")).unwrap();

    let u = UserIdentity::generate(&mut r);
    let restored = UserIdentity::from_bytes(&u.to_bytes().unwrap()).unwrap();
    assert_eq!(restored.public(), u.public());

    assert!(matches!(
        DeviceIdentity::from_bytes(&[1, 2, 3]),
        Err(CryptoError::MalformedState(_))
    ));
    assert!(matches!(
        UserIdentity::from_bytes(&[]),
        Err(CryptoError::MalformedState(_))
    ));
}

#[test]
fn signed_device_list_serde_round_trip() {
    let mut r = rng(6);
    let user = UserIdentity::generate(&mut r);
    let list = user
        .sign_device_list(
            1,
            vec![DeviceEntry {
                device_id: [3; 16],
                public: DeviceIdentity::generate(&mut r).public(),
            }],
        )
        .unwrap();
    let bytes = postcard::to_allocvec(&list).unwrap();
    let back: SignedDeviceList = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, list);
    back.verify(&user.public()).unwrap();
}

#[test]
fn generation_is_deterministic_for_a_seeded_rng() {
    let a = DeviceIdentity::generate(&mut rng(7)).public();
    let b = DeviceIdentity::generate(&mut rng(7)).public();
    assert_eq!(a, b);
    assert_ne!(a, DeviceIdentity::generate(&mut rng(8)).public());
}

#[test]
fn os_rng_works() {
    let mut r = checked_os_rng().unwrap();
    let a = DeviceIdentity::generate(&mut r).public();
    let b = DeviceIdentity::generate(&mut os_rng()).public();
    assert_ne!(a, b);
}

#[test]
fn auth_challenge_signature_uses_the_wire_protocol_layout() {
    // "hush-auth-v1" ‖ challenge ‖ device id: what the relay verifies.
    let mut rng = rng(11);
    let d = hush_crypto::DeviceIdentity::generate(&mut rng);
    let (challenge, id) = ([3u8; 32], [4u8; 16]);
    let sig = d.sign_auth_challenge(&challenge, &id);
    let mut layout = b"hush-auth-v1".to_vec();
    layout.extend_from_slice(&challenge);
    layout.extend_from_slice(&id);
    hush_crypto::verify_prefixed(&d.public().signing, &layout, &sig).unwrap();
    assert_eq!(sig, d.sign_prefixed(&layout));
}
