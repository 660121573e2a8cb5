//! Shared helpers for the integration tests.
// Test helpers outside #[test] fns may unwrap too (clippy.toml only covers #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use chacha20::ChaCha20Rng;
use hush_crypto::*;
use rand_core::SeedableRng;

pub fn rng(seed: u64) -> ChaCha20Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    ChaCha20Rng::from_seed(s)
}

/// The caller-side associated data: a stand-in envelope header that embeds the
/// ratchet header bytes, like the protocol crate does.
pub fn envelope_ad(h: &RatchetHeader) -> Vec<u8> {
    let mut v = b"envelope-v1:".to_vec();
    v.extend_from_slice(&h.to_bytes());
    v
}

#[derive(Clone, Debug)]
pub struct Msg {
    pub header: RatchetHeader,
    pub ad: Vec<u8>,
    pub ct: Vec<u8>,
    pub pt: Vec<u8>,
}

pub fn send(s: &mut Session, rng: &mut ChaCha20Rng, now_ms: u64, pt: &[u8]) -> Msg {
    let (header, ct) = s.seal(rng, now_ms, pt, envelope_ad).unwrap();
    Msg {
        header,
        ad: envelope_ad(&header),
        ct,
        pt: pt.to_vec(),
    }
}

pub fn recv(s: &mut Session, rng: &mut ChaCha20Rng, m: &Msg) -> Result<Vec<u8>, CryptoError> {
    s.open(rng, 0, &m.header, &m.ad, &m.ct)
}

pub fn state(s: &Session) -> Vec<u8> {
    s.to_bytes().unwrap().to_vec()
}

pub struct Pair {
    pub alice: DeviceIdentity,
    pub bob: DeviceIdentity,
    pub bob_prekeys: PrekeySecrets,
    pub a: Session,
    pub b: Session,
    pub rng: ChaCha20Rng,
}

/// Alice initiates against Bob's bundle (with a one-time prekey); Bob responds.
/// No message has been exchanged yet.
pub fn pair(seed: u64) -> Pair {
    let mut rng = rng(seed);
    let alice = DeviceIdentity::generate(&mut rng);
    let bob = DeviceIdentity::generate(&mut rng);
    let mut bob_prekeys = PrekeySecrets::new(&bob, &mut rng, 0);
    let otks = bob_prekeys.generate_one_time_prekeys(&mut rng, 3).unwrap();
    let bundle = bob_prekeys.bundle(Some(otks[0].0)).unwrap();
    let (a, init) = initiate(&alice, &bundle, &mut rng).unwrap();
    let b = respond(&bob, &mut bob_prekeys, &init, &alice.public()).unwrap();
    Pair {
        alice,
        bob,
        bob_prekeys,
        a,
        b,
        rng,
    }
}

/// A pair where Alice's first message has been opened by Bob.
pub fn established(seed: u64) -> Pair {
    let mut p = pair(seed);
    let m = send(&mut p.a, &mut p.rng, 0, b"hello");
    assert_eq!(recv(&mut p.b, &mut p.rng, &m).unwrap(), b"hello");
    p
}
