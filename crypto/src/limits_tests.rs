//! Forged headers are rejected before any key derivation, and a rolled-back
//! sender never repeats a (message key, nonce) pair.
//!
//! These run inside the crate so they can read the test-only work counter
//! (`kdf::work`), which counts every chain step, seed step, root step and
//! X25519 operation on this thread.

use crate::kdf::work;
use crate::*;
use chacha20::ChaCha20Rng;
use rand_core::SeedableRng;

fn rng(seed: u64) -> ChaCha20Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    ChaCha20Rng::from_seed(s)
}

fn ad(h: &RatchetHeader) -> Vec<u8> {
    h.to_bytes().to_vec()
}

/// Alice and Bob with Alice's first message opened by Bob; returns that message.
fn established(seed: u64) -> (Session, Session, ChaCha20Rng, RatchetHeader, Vec<u8>) {
    let mut rng = rng(seed);
    let alice = DeviceIdentity::generate(&mut rng);
    let bob = DeviceIdentity::generate(&mut rng);
    let mut prekeys = PrekeySecrets::new(&bob, &mut rng, 0);
    let otk = prekeys.generate_one_time_prekeys(&mut rng, 1).unwrap();
    let bundle = prekeys.bundle(Some(otk[0].0)).unwrap();
    let (mut a, init) = initiate(&alice, &bundle, &mut rng).unwrap();
    let (h, ct) = a.seal(&mut rng, 0, b"hello", ad).unwrap();
    let mut b = respond(&bob, &mut prekeys, &init, &alice.public()).unwrap();
    assert_eq!(b.open(&mut rng, 0, &h, &ad(&h), &ct).unwrap(), b"hello");
    (a, b, rng, h, ct)
}

/// Runs `open` and returns its result with the work it did.
fn open_counting(
    s: &mut Session,
    rng: &mut ChaCha20Rng,
    h: &RatchetHeader,
    ct: &[u8],
) -> (Result<Vec<u8>, CryptoError>, u64) {
    let before = work::count();
    let r = s.open(rng, 0, h, &ad(h), ct);
    (r, work::count() - before)
}

#[test]
fn far_future_index_is_rejected_before_any_derivation() {
    let (_, mut b, mut rng, h, ct) = established(1);
    let before = b.to_bytes().unwrap();
    for index in [MAX_MESSAGES_PER_CHAIN, 25_000, u32::MAX] {
        // On the known chain, and on a brand-new ratchet key.
        for dh in [h.dh, DeviceIdentity::generate(&mut rng).public().agreement] {
            let mut f = h;
            f.dh = dh;
            f.index = index;
            let (r, cost) = open_counting(&mut b, &mut rng, &f, &ct);
            assert_eq!(r, Err(CryptoError::MalformedHeader), "index {index}");
            assert_eq!(cost, 0, "index {index}: derived keys before rejecting");
        }
    }
    let mut f = h;
    f.previous_chain_len = MAX_MESSAGES_PER_CHAIN + 1;
    let (r, cost) = open_counting(&mut b, &mut rng, &f, &ct);
    assert_eq!(r, Err(CryptoError::MalformedHeader));
    assert_eq!(cost, 0);
    assert_eq!(
        *b.to_bytes().unwrap(),
        *before,
        "a rejected open changes nothing"
    );
}

#[test]
fn far_generation_is_rejected_before_any_derivation() {
    let (_, mut b, mut rng, h, ct) = established(2);
    let mut f = h;
    f.generation = MAX_GENERATION_JUMP + 2;
    f.reseed = DeviceIdentity::generate(&mut rng).public().agreement;
    let (r, cost) = open_counting(&mut b, &mut rng, &f, &ct);
    assert!(
        matches!(r, Err(CryptoError::TooManySkipped { .. })),
        "{r:?}"
    );
    assert_eq!(cost, 0);
}

#[test]
fn the_largest_legitimate_jump_costs_at_most_one_chain_of_steps() {
    // The worst header that passes the checks on a new ratchet key at
    // generation 0: one X25519, one root step and MAX_MESSAGES_PER_CHAIN
    // chain steps, then the AEAD fails and nothing is kept.
    let (_, mut b, mut rng, h, ct) = established(3);
    let before = b.to_bytes().unwrap();
    let mut f = h;
    f.dh = DeviceIdentity::generate(&mut rng).public().agreement;
    f.index = MAX_MESSAGES_PER_CHAIN - 1;
    let (r, cost) = open_counting(&mut b, &mut rng, &f, &ct);
    assert_eq!(r, Err(CryptoError::DecryptFailed));
    assert!(
        cost <= 2 + u64::from(MAX_MESSAGES_PER_CHAIN),
        "forged header cost {cost} derivations"
    );
    assert_eq!(*b.to_bytes().unwrap(), *before);
}

#[test]
fn consumed_one_time_prekey_is_refused_before_any_dh() {
    let mut rng = rng(4);
    let alice = DeviceIdentity::generate(&mut rng);
    let carol = DeviceIdentity::generate(&mut rng);
    let bob = DeviceIdentity::generate(&mut rng);
    let mut prekeys = PrekeySecrets::new(&bob, &mut rng, 0);
    let otk = prekeys.generate_one_time_prekeys(&mut rng, 1).unwrap();
    // A relay hands the same bundle (same one-time prekey) to two initiators.
    let bundle = prekeys.bundle(Some(otk[0].0)).unwrap();
    let (_, init_a) = initiate(&alice, &bundle, &mut rng).unwrap();
    let (_, init_c) = initiate(&carol, &bundle, &mut rng).unwrap();
    respond(&bob, &mut prekeys, &init_a, &alice.public()).unwrap();
    let before = work::count();
    let r = respond(&bob, &mut prekeys, &init_c, &carol.public());
    assert_eq!(r.err(), Some(CryptoError::NoPrekey));
    assert_eq!(
        work::count() - before,
        0,
        "X25519 work before the prekey check"
    );
}

#[test]
fn rolled_back_sender_never_reuses_key_and_nonce() {
    let (mut a, mut b, mut rng, _, _) = established(5);
    // A backup of Alice's state, restored after she sent one message.
    let backup = a.clone();
    let p1 = b"meet at the north gate at nine".to_vec();
    let p2 = b"the password is swordfish-2041".to_vec();
    assert_eq!(p1.len(), p2.len());
    let (h1, c1) = a.seal(&mut rng, 0, &p1, ad).unwrap();
    let mut a = backup;
    let (h2, c2) = a.seal(&mut rng, 0, &p2, ad).unwrap();
    // Same chain position: the rolled-back state derives the same message key...
    assert_eq!(
        (h1.dh, h1.index, h1.generation),
        (h2.dh, h2.index, h2.generation)
    );
    // ...but the nonces differ, so the keystreams do too.
    assert_eq!(c1.len(), c2.len());
    assert_ne!(
        c1[..MESSAGE_NONCE_LEN],
        c2[..MESSAGE_NONCE_LEN],
        "nonce reused"
    );
    let padded1 = pad(&p1);
    let padded2 = pad(&p2);
    let body1 = &c1[MESSAGE_NONCE_LEN..c1.len() - TAG_LEN];
    let body2 = &c2[MESSAGE_NONCE_LEN..c2.len() - TAG_LEN];
    let xor_ct: Vec<u8> = body1.iter().zip(body2).map(|(x, y)| x ^ y).collect();
    let xor_pt: Vec<u8> = padded1.iter().zip(&padded2).map(|(x, y)| x ^ y).collect();
    assert_eq!(xor_ct.len(), xor_pt.len());
    assert_ne!(xor_ct, xor_pt, "ciphertext XOR reveals plaintext XOR");
    // The receiver: a fresh copy opens either; a receiver that opened the
    // first refuses the second as a duplicate of that chain position.
    let mut b2 = b.clone();
    assert_eq!(b.open(&mut rng, 0, &h1, &ad(&h1), &c1).unwrap(), p1);
    assert_eq!(b2.open(&mut rng, 0, &h2, &ad(&h2), &c2).unwrap(), p2);
    assert_eq!(
        b.open(&mut rng, 0, &h2, &ad(&h2), &c2),
        Err(CryptoError::Duplicate)
    );
}

#[test]
fn message_key_is_not_tied_to_a_fixed_nonce() {
    // The AEAD key is MK; the nonce must come from the ciphertext, so
    // tampering with it is detected like any other byte.
    let (mut a, mut b, mut rng, _, _) = established(6);
    let (h, mut c) = a.seal(&mut rng, 0, b"x", ad).unwrap();
    c[0] ^= 1;
    let before = b.to_bytes().unwrap();
    assert_eq!(
        b.open(&mut rng, 0, &h, &ad(&h), &c),
        Err(CryptoError::DecryptFailed)
    );
    assert_eq!(*b.to_bytes().unwrap(), *before);
    c[0] ^= 1;
    assert_eq!(b.open(&mut rng, 0, &h, &ad(&h), &c).unwrap(), b"x");
    // Too short to hold a nonce and a tag.
    let mut f = h;
    f.index += 1;
    assert_eq!(
        b.open(
            &mut rng,
            0,
            &f,
            &ad(&f),
            &c[..MESSAGE_NONCE_LEN + TAG_LEN - 1]
        ),
        Err(CryptoError::DecryptFailed)
    );
}
