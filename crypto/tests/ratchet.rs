//! Double ratchet behaviour: ordering, replay, tampering, forward secrecy,
//! post-compromise security, forced rotation, limits, persistence.
// Test helpers outside #[test] fns may unwrap too (clippy.toml only covers #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use hush_crypto::*;

#[test]
fn ping_pong_conversation_and_epochs() {
    let mut p = established(100);
    assert!(p.a.needs_init_header().is_some(), "no reply yet");
    let mut last_a = p.a.epoch();
    let mut last_b = p.b.epoch();
    for turn in 0..10u32 {
        let m = send(&mut p.b, &mut p.rng, 0, format!("b{turn}").as_bytes());
        assert_eq!(recv(&mut p.a, &mut p.rng, &m).unwrap(), m.pt);
        let m = send(&mut p.a, &mut p.rng, 0, format!("a{turn}").as_bytes());
        assert_eq!(recv(&mut p.b, &mut p.rng, &m).unwrap(), m.pt);
        assert!(
            p.a.epoch() > last_a && p.b.epoch() > last_b,
            "every turn is a DH step"
        );
        last_a = p.a.epoch();
        last_b = p.b.epoch();
    }
    assert!(p.a.needs_init_header().is_none());
}

#[test]
fn every_turn_uses_a_new_ratchet_key() {
    let mut p = established(101);
    let mut keys = std::collections::HashSet::new();
    for _ in 0..5 {
        let m = send(&mut p.b, &mut p.rng, 0, b"x");
        recv(&mut p.a, &mut p.rng, &m).unwrap();
        assert!(keys.insert(m.header.dh));
        let m = send(&mut p.a, &mut p.rng, 0, b"y");
        recv(&mut p.b, &mut p.rng, &m).unwrap();
        assert!(keys.insert(m.header.dh));
    }
}

#[test]
fn out_of_order_within_a_chain() {
    let mut p = established(102);
    let msgs: Vec<Msg> = (0..20u8)
        .map(|i| send(&mut p.a, &mut p.rng, 0, &[i; 3]))
        .collect();
    for m in msgs.iter().rev() {
        assert_eq!(recv(&mut p.b, &mut p.rng, m).unwrap(), m.pt);
    }
    assert_eq!(p.b.skipped_key_count(), 0, "all skipped keys consumed");
}

#[test]
fn out_of_order_across_dh_steps() {
    let mut p = established(103);
    let a1: Vec<Msg> = (0..3u8)
        .map(|i| send(&mut p.a, &mut p.rng, 0, &[i]))
        .collect();
    recv(&mut p.b, &mut p.rng, &a1[2]).unwrap();
    let b1 = send(&mut p.b, &mut p.rng, 0, b"b1");
    recv(&mut p.a, &mut p.rng, &b1).unwrap();
    let a2 = send(&mut p.a, &mut p.rng, 0, b"a2");
    assert_ne!(a2.header.dh, a1[0].header.dh);
    assert_eq!(
        a2.header.previous_chain_len, 4,
        "hello + 3 messages on the first chain"
    );
    assert_eq!(recv(&mut p.b, &mut p.rng, &a2).unwrap(), b"a2");
    // Old-chain messages arriving after the DH step still open, once.
    for m in &a1[..2] {
        assert_eq!(recv(&mut p.b, &mut p.rng, m).unwrap(), m.pt);
        assert_eq!(
            recv(&mut p.b, &mut p.rng, m).unwrap_err(),
            CryptoError::Duplicate
        );
    }
}

#[test]
fn replays_are_rejected_with_typed_error() {
    let mut p = established(104);
    let m = send(&mut p.a, &mut p.rng, 0, b"once");
    recv(&mut p.b, &mut p.rng, &m).unwrap();
    let before = state(&p.b);
    assert_eq!(
        recv(&mut p.b, &mut p.rng, &m).unwrap_err(),
        CryptoError::Duplicate
    );
    assert_eq!(state(&p.b), before);
    // Replay of a message that was opened from the skipped store.
    let x = send(&mut p.a, &mut p.rng, 0, b"x");
    let y = send(&mut p.a, &mut p.rng, 0, b"y");
    recv(&mut p.b, &mut p.rng, &y).unwrap();
    recv(&mut p.b, &mut p.rng, &x).unwrap();
    assert_eq!(
        recv(&mut p.b, &mut p.rng, &x).unwrap_err(),
        CryptoError::Duplicate
    );
    assert_eq!(
        recv(&mut p.b, &mut p.rng, &y).unwrap_err(),
        CryptoError::Duplicate
    );
}

#[test]
fn tampering_any_byte_is_rejected_and_state_is_unchanged() {
    let mut p = established(105);
    let m = send(&mut p.a, &mut p.rng, 0, b"integrity matters");
    let before = state(&p.b);
    let hb = m.header.to_bytes();
    for i in 0..hb.len() {
        let mut t = hb;
        t[i] ^= 0x01;
        if let Ok(h) = RatchetHeader::from_bytes(&t) {
            let r = p.b.open(&mut p.rng, 0, &h, &m.ad, &m.ct);
            assert!(r.is_err(), "header byte {i}");
            // Also with the caller AD matching the tampered header.
            let r = p.b.open(&mut p.rng, 0, &h, &envelope_ad(&h), &m.ct);
            assert!(r.is_err(), "header byte {i} (consistent ad)");
        }
        assert_eq!(state(&p.b), before, "header byte {i}");
    }
    for i in 0..m.ad.len() {
        let mut ad = m.ad.clone();
        ad[i] ^= 0x80;
        let r = p.b.open(&mut p.rng, 0, &m.header, &ad, &m.ct);
        assert_eq!(r.unwrap_err(), CryptoError::DecryptFailed, "ad byte {i}");
    }
    for i in 0..m.ct.len() {
        let mut ct = m.ct.clone();
        ct[i] ^= 0x01;
        let r = p.b.open(&mut p.rng, 0, &m.header, &m.ad, &ct);
        assert_eq!(r.unwrap_err(), CryptoError::DecryptFailed, "ct byte {i}");
    }
    assert!(
        p.b.open(&mut p.rng, 0, &m.header, &m.ad, &m.ct[..10])
            .is_err()
    );
    assert!(
        p.b.open(&mut p.rng, 0, &m.header, &m.ad[..5], &m.ct)
            .is_err()
    );
    assert_eq!(state(&p.b), before);
    assert_eq!(recv(&mut p.b, &mut p.rng, &m).unwrap(), m.pt);
}

#[test]
fn failed_open_on_a_new_chain_leaves_state_unchanged() {
    let mut p = established(106);
    let b1 = send(&mut p.b, &mut p.rng, 0, b"new chain for alice");
    let before = state(&p.a);
    let mut ct = b1.ct.clone();
    ct[0] ^= 1;
    let bad = Msg { ct, ..b1.clone() };
    assert_eq!(
        recv(&mut p.a, &mut p.rng, &bad).unwrap_err(),
        CryptoError::DecryptFailed
    );
    assert_eq!(state(&p.a), before, "no root step committed");
    assert_eq!(recv(&mut p.a, &mut p.rng, &b1).unwrap(), b1.pt);
}

#[test]
fn forward_secrecy_clone_after_open_cannot_reopen() {
    let mut p = established(107);
    let msgs: Vec<Msg> = (0..5u8)
        .map(|i| send(&mut p.a, &mut p.rng, 0, &[i]))
        .collect();
    for m in &msgs {
        recv(&mut p.b, &mut p.rng, m).unwrap();
    }
    // An attacker steals Bob's state after message N=4 was opened.
    let mut stolen = p.b.clone();
    for m in &msgs {
        assert_eq!(
            recv(&mut stolen, &mut p.rng, m).unwrap_err(),
            CryptoError::Duplicate
        );
    }
    // Same through persistence (what a disk thief would get).
    let mut from_disk = Session::from_bytes(&state(&p.b)).unwrap();
    for m in &msgs {
        assert!(recv(&mut from_disk, &mut p.rng, m).is_err());
    }
}

#[test]
fn forward_secrecy_across_a_dh_step() {
    let mut p = established(108);
    let early = send(&mut p.a, &mut p.rng, 0, b"early");
    recv(&mut p.b, &mut p.rng, &early).unwrap();
    let r = send(&mut p.b, &mut p.rng, 0, b"reply");
    recv(&mut p.a, &mut p.rng, &r).unwrap();
    let later = send(&mut p.a, &mut p.rng, 0, b"later");
    recv(&mut p.b, &mut p.rng, &later).unwrap();
    let mut stolen = p.b.clone();
    assert!(recv(&mut stolen, &mut p.rng, &early).is_err());
    assert!(recv(&mut stolen, &mut p.rng, &later).is_err());
}

#[test]
fn post_compromise_security_after_a_turn() {
    let mut p = established(109);
    // Attacker copies Bob's entire state.
    let mut leaked_b = p.b.clone();
    // While nothing changes, the leaked copy reads Alice's messages (expected).
    let m = send(&mut p.a, &mut p.rng, 0, b"readable by the thief");
    assert!(recv(&mut leaked_b.clone(), &mut p.rng, &m).is_ok());
    recv(&mut p.b, &mut p.rng, &m).unwrap();
    // One turn: Bob replies with a fresh ratchet key, Alice answers on a new chain.
    let r = send(&mut p.b, &mut p.rng, 0, b"turn");
    recv(&mut p.a, &mut p.rng, &r).unwrap();
    let secret = send(&mut p.a, &mut p.rng, 0, b"healed");
    assert_eq!(recv(&mut p.b, &mut p.rng, &secret).unwrap(), b"healed");
    // The leaked copy cannot follow: it lacks Bob's new ratchet private key.
    assert!(recv(&mut leaked_b, &mut p.rng, &secret).is_err());
    // Nor can a copy of Alice's old state read Bob's new messages after her turn.
    let leaked_a = p.a.clone();
    let r2 = send(&mut p.b, &mut p.rng, 0, b"b2");
    recv(&mut p.a, &mut p.rng, &r2).unwrap();
    let a3 = send(&mut p.a, &mut p.rng, 0, b"a3");
    recv(&mut p.b, &mut p.rng, &a3).unwrap();
    let b3 = send(&mut p.b, &mut p.rng, 0, b"b3");
    assert!(recv(&mut leaked_a.clone(), &mut p.rng, &b3).is_err());
    assert_eq!(recv(&mut p.a, &mut p.rng, &b3).unwrap(), b"b3");
}

#[test]
fn forced_rotation_at_exactly_100_messages_without_reply() {
    let mut p = established(110);
    // Bob sends one-sidedly. Alice never replies.
    let first = send(&mut p.b, &mut p.rng, 0, b"0");
    let epoch0 = p.b.epoch();
    recv(&mut p.a, &mut p.rng, &first).unwrap();
    let mut msgs = vec![first];
    for i in 1..MAX_MESSAGES_PER_CHAIN {
        msgs.push(send(&mut p.b, &mut p.rng, 0, i.to_string().as_bytes()));
        assert_eq!(p.b.epoch(), epoch0, "no rotation before 100 messages");
    }
    assert!(
        msgs.iter()
            .all(|m| m.header.generation == 0 && m.header.reseed == [0; 32])
    );
    assert_eq!(msgs.last().unwrap().header.index, 99);
    let m101 = send(&mut p.b, &mut p.rng, 0, b"100");
    assert_eq!(p.b.epoch(), epoch0 + 1, "rotation on message 101");
    assert_eq!(m101.header.generation, 1);
    assert_eq!(m101.header.index, 0);
    assert_eq!(m101.header.previous_chain_len, 100);
    assert_ne!(m101.header.reseed, [0u8; 32], "header shows the new key");
    assert_eq!(
        m101.header.dh, msgs[0].header.dh,
        "ratchet key unchanged: no root fork"
    );

    let a_epoch = p.a.epoch();
    for m in &msgs[1..] {
        assert_eq!(recv(&mut p.a, &mut p.rng, m).unwrap(), m.pt);
    }
    assert_eq!(recv(&mut p.a, &mut p.rng, &m101).unwrap(), b"100");
    assert_eq!(p.a.epoch(), a_epoch + 1, "receiver follows the reseed");
    // 100 more: one more rotation, and so on.
    let mut gens = vec![];
    for _ in 0..250 {
        let m = send(&mut p.b, &mut p.rng, 0, b"z");
        gens.push(m.header.generation);
        recv(&mut p.a, &mut p.rng, &m).unwrap();
    }
    assert_eq!(gens.iter().filter(|g| **g == 1).count(), 99);
    assert_eq!(gens.iter().filter(|g| **g == 2).count(), 100);
    assert_eq!(*gens.last().unwrap(), 3);
}

#[test]
fn forced_rotation_after_seven_days() {
    let mut p = established(111);
    let t0 = 1_700_000_000_000u64;
    let m0 = send(&mut p.a, &mut p.rng, t0, b"monday");
    let e = p.a.epoch();
    let m1 = send(
        &mut p.a,
        &mut p.rng,
        t0 + MAX_CHAIN_AGE_MS - 1,
        b"almost a week",
    );
    assert_eq!(
        (m1.header.generation, p.a.epoch()),
        (m0.header.generation, e)
    );
    let m2 = send(&mut p.a, &mut p.rng, t0 + MAX_CHAIN_AGE_MS, b"a week later");
    assert_eq!(m2.header.generation, m0.header.generation + 1);
    assert_eq!(p.a.epoch(), e + 1);
    // Clock going backwards never panics or rotates.
    let m3 = send(&mut p.a, &mut p.rng, 0, b"clock skew");
    assert_eq!(m3.header.generation, m2.header.generation);
    for m in [&m2, &m0, &m3, &m1] {
        assert_eq!(recv(&mut p.b, &mut p.rng, m).unwrap(), m.pt);
    }
}

#[test]
fn rotation_policy_limits() {
    assert_eq!(RotationPolicy::new(101, 1), Err(CryptoError::BadPolicy));
    assert_eq!(RotationPolicy::new(0, 1), Err(CryptoError::BadPolicy));
    assert_eq!(
        RotationPolicy::new(5, MAX_CHAIN_AGE_MS + 1),
        Err(CryptoError::BadPolicy)
    );
    assert_eq!(RotationPolicy::new(5, 0), Err(CryptoError::BadPolicy));
    assert_eq!(
        RotationPolicy::default(),
        RotationPolicy::new(100, MAX_CHAIN_AGE_MS).unwrap()
    );
    let mut p = established(112);
    p.a.set_rotation_policy(RotationPolicy::new(1, 1000).unwrap());
    let ms: Vec<Msg> = (0..5u8)
        .map(|i| send(&mut p.a, &mut p.rng, 0, &[i]))
        .collect();
    // hello used index 0 of generation 0, so every new message is a new generation.
    let gens: Vec<u32> = ms.iter().map(|m| m.header.generation).collect();
    assert_eq!(gens, vec![1, 2, 3, 4, 5]);
    for m in ms.iter().rev() {
        assert_eq!(recv(&mut p.b, &mut p.rng, m).unwrap(), m.pt);
    }
}

#[test]
fn concurrent_reseeds_on_both_sides_do_not_fork() {
    let mut p = established(113);
    let policy = RotationPolicy::new(2, MAX_CHAIN_AGE_MS).unwrap();
    p.a.set_rotation_policy(policy);
    p.b.set_rotation_policy(policy);
    // Bob needs one message to be able to send; then both send many without hearing each other.
    let a_msgs: Vec<Msg> = (0..9u8)
        .map(|i| send(&mut p.a, &mut p.rng, 0, &[b'a', i]))
        .collect();
    let b_msgs: Vec<Msg> = (0..9u8)
        .map(|i| send(&mut p.b, &mut p.rng, 0, &[b'b', i]))
        .collect();
    assert!(a_msgs.last().unwrap().header.generation >= 4);
    assert!(b_msgs.last().unwrap().header.generation >= 4);
    // Cross-deliver interleaved, newest first.
    for i in (0..9).rev() {
        assert_eq!(
            recv(&mut p.b, &mut p.rng, &a_msgs[i]).unwrap(),
            a_msgs[i].pt
        );
        assert_eq!(
            recv(&mut p.a, &mut p.rng, &b_msgs[i]).unwrap(),
            b_msgs[i].pt
        );
    }
    // And the conversation continues with DH steps on both sides.
    for _ in 0..3 {
        let m = send(&mut p.a, &mut p.rng, 0, b"x");
        recv(&mut p.b, &mut p.rng, &m).unwrap();
        let m = send(&mut p.b, &mut p.rng, 0, b"y");
        recv(&mut p.a, &mut p.rng, &m).unwrap();
    }
}

#[test]
fn reseed_opens_after_receiver_replaced_its_ratchet_key() {
    let mut p = established(114);
    p.a.set_rotation_policy(RotationPolicy::new(3, MAX_CHAIN_AGE_MS).unwrap());
    // Bob replies (new Bob ratchet key B1); Alice learns it, steps to A2; Bob
    // receives A2 and steps to B2, replacing B1's private key in his current slot.
    let b1 = send(&mut p.b, &mut p.rng, 0, b"b1");
    // Meanwhile Alice (who has not yet seen b1) keeps sending on her first chain,
    // reseeding against Bob's *signed prekey* ratchet key.
    let held: Vec<Msg> = (0..7u8)
        .map(|i| send(&mut p.a, &mut p.rng, 0, &[i]))
        .collect();
    assert!(held.last().unwrap().header.generation >= 2);
    recv(&mut p.a, &mut p.rng, &b1).unwrap();
    let a2 = send(&mut p.a, &mut p.rng, 0, b"a2");
    recv(&mut p.b, &mut p.rng, &a2).unwrap();
    let b2 = send(&mut p.b, &mut p.rng, 0, b"b2");
    recv(&mut p.a, &mut p.rng, &b2).unwrap();
    // Now the held, reseeded old-chain messages arrive.
    for m in held.iter().rev() {
        assert_eq!(recv(&mut p.b, &mut p.rng, m).unwrap(), m.pt);
    }
}

#[test]
fn lost_generation_does_not_block_later_ones() {
    let mut p = established(115);
    p.a.set_rotation_policy(RotationPolicy::new(2, MAX_CHAIN_AGE_MS).unwrap());
    let ms: Vec<Msg> = (0..10u8)
        .map(|i| send(&mut p.a, &mut p.rng, 0, &[i]))
        .collect();
    // Drop every message of generations 1..=3; deliver the rest.
    for m in &ms {
        if (1..=3).contains(&m.header.generation) {
            continue;
        }
        assert_eq!(recv(&mut p.b, &mut p.rng, m).unwrap(), m.pt);
    }
}

#[test]
fn jump_too_far_is_typed_and_allocation_free() {
    let mut p = established(116);
    let m = send(&mut p.a, &mut p.rng, 0, b"x");
    let before = state(&p.b);
    let mut h = m.header;
    // Chains reseed after MAX_MESSAGES_PER_CHAIN messages, so no sender
    // produces an index at or above it: refused as malformed, whatever the jump.
    for index in [MAX_MESSAGES_PER_CHAIN, 1 + MAX_SKIP + 1, 25_000, u32::MAX] {
        h.index = index;
        assert_eq!(
            p.b.open(&mut p.rng, 0, &h, &envelope_ad(&h), &m.ct),
            Err(CryptoError::MalformedHeader),
            "index {index}"
        );
    }
    // A forged header on a brand-new ratchet key is bounded the same way.
    let mut h2 = m.header;
    h2.dh = DeviceIdentity::generate(&mut p.rng).public().agreement;
    h2.index = MAX_SKIP + 1;
    assert_eq!(
        p.b.open(&mut p.rng, 0, &h2, &envelope_ad(&h2), &m.ct),
        Err(CryptoError::MalformedHeader)
    );
    // The largest jump a chain allows is processed (then fails
    // authentication) and leaves the store untouched.
    h.index = MAX_MESSAGES_PER_CHAIN - 1;
    assert_eq!(
        p.b.open(&mut p.rng, 0, &h, &envelope_ad(&h), &m.ct)
            .unwrap_err(),
        CryptoError::DecryptFailed
    );
    assert_eq!(state(&p.b), before);
    assert_eq!(recv(&mut p.b, &mut p.rng, &m).unwrap(), b"x");
}

#[test]
fn generation_jump_limit_is_typed() {
    let mut p = established(117);
    p.a.set_rotation_policy(RotationPolicy::new(1, MAX_CHAIN_AGE_MS).unwrap());
    let m = send(&mut p.a, &mut p.rng, 0, b"x");
    assert_eq!(m.header.generation, 1);
    let mut h = m.header;
    h.generation = MAX_GENERATION_JUMP + 2;
    assert_eq!(
        p.b.open(&mut p.rng, 0, &h, &envelope_ad(&h), &m.ct)
            .unwrap_err(),
        CryptoError::TooManySkipped {
            requested: u64::from(MAX_GENERATION_JUMP) + 1,
            limit: MAX_GENERATION_JUMP
        }
    );
    assert_eq!(recv(&mut p.b, &mut p.rng, &m).unwrap(), b"x");
}

#[test]
fn skipped_key_store_is_bounded_and_evicts_oldest() {
    let mut p = established(118);
    // 22 generations of 100 messages each (hello was index 0 of generation 0).
    let mut all = Vec::new();
    for i in 0..2200u32 {
        all.push(send(&mut p.a, &mut p.rng, 0, &i.to_be_bytes()));
    }
    // Deliver only the first message of each generation, in order: each one
    // closes the previous generation, storing its 99 unread keys.
    for m in all.iter().filter(|m| m.header.index == 0) {
        recv(&mut p.b, &mut p.rng, m).unwrap();
    }
    assert_eq!(p.b.skipped_key_count(), MAX_SKIPPED_KEYS);
    // The oldest keys were evicted: typed error, not a panic or a silent accept.
    let oldest = &all[0];
    assert_eq!(oldest.header.generation, 0);
    assert_eq!(
        recv(&mut p.b, &mut p.rng, oldest).unwrap_err(),
        CryptoError::Duplicate
    );
    // Newer skipped ones still open.
    let recent = all
        .iter()
        .rev()
        .find(|m| m.header.index == 50 && m.header.generation < 21)
        .unwrap();
    assert_eq!(recv(&mut p.b, &mut p.rng, recent).unwrap(), recent.pt);
}

#[test]
fn messages_from_evicted_chains_get_unknown_chain() {
    let mut p = established(119);
    let held = send(&mut p.a, &mut p.rng, 0, b"very late");
    let held_next = send(&mut p.a, &mut p.rng, 0, b"very late 2");
    recv(&mut p.b, &mut p.rng, &held_next).unwrap(); // so `held` is a stored skipped key
    for _ in 0..(MAX_RECEIVING_DH_CHAINS + 2) {
        let m = send(&mut p.b, &mut p.rng, 0, b"b");
        recv(&mut p.a, &mut p.rng, &m).unwrap();
        let m = send(&mut p.a, &mut p.rng, 0, b"a");
        recv(&mut p.b, &mut p.rng, &m).unwrap();
    }
    // Skipped keys outlive chain eviction (they are bounded separately)...
    assert_eq!(recv(&mut p.b, &mut p.rng, &held).unwrap(), b"very late");
    // ...but new positions on an evicted chain are refused with a typed error.
    let mut h = held.header;
    h.index = 5;
    assert_eq!(
        p.b.open(&mut p.rng, 0, &h, &envelope_ad(&h), &held.ct)
            .unwrap_err(),
        CryptoError::UnknownChain
    );
}

#[test]
fn session_persistence_round_trip_continues_conversation() {
    let mut p = established(120);
    p.a.set_rotation_policy(RotationPolicy::new(4, MAX_CHAIN_AGE_MS).unwrap());
    let pending: Vec<Msg> = (0..9u8)
        .map(|i| send(&mut p.a, &mut p.rng, 0, &[i]))
        .collect();
    recv(&mut p.b, &mut p.rng, &pending[8]).unwrap(); // leaves skipped keys and seeds
    let a_bytes = p.a.to_bytes().unwrap();
    let b_bytes = p.b.to_bytes().unwrap();
    let mut a2 = Session::from_bytes(&a_bytes).unwrap();
    let mut b2 = Session::from_bytes(&b_bytes).unwrap();
    assert_eq!(a2.epoch(), p.a.epoch());
    assert_eq!(a2.needs_init_header(), p.a.needs_init_header());
    assert_eq!(a2.rotation_policy(), p.a.rotation_policy());
    assert_eq!(b2.skipped_key_count(), p.b.skipped_key_count());
    for m in &pending[..8] {
        assert_eq!(recv(&mut b2, &mut p.rng, m).unwrap(), m.pt);
    }
    for i in 0..5u8 {
        let m = send(&mut b2, &mut p.rng, 0, &[b'b', i]);
        assert_eq!(recv(&mut a2, &mut p.rng, &m).unwrap(), m.pt);
        let m = send(&mut a2, &mut p.rng, 0, &[b'a', i]);
        assert_eq!(recv(&mut b2, &mut p.rng, &m).unwrap(), m.pt);
    }
    // Restoring is exact: the same RNG yields the same ciphertext from original and copy.
    let mut orig = Session::from_bytes(&a_bytes).unwrap();
    let mut copy = Session::from_bytes(&a_bytes).unwrap();
    let x = send(&mut orig, &mut rng(1), 5, b"same");
    let y = send(&mut copy, &mut rng(1), 5, b"same");
    assert_eq!((x.header, x.ct), (y.header, y.ct));
}

#[test]
fn corrupt_session_records_are_rejected() {
    let p = established(121);
    let bytes = p.a.to_bytes().unwrap();
    assert!(matches!(
        Session::from_bytes(&bytes[..bytes.len() / 2]),
        Err(CryptoError::MalformedState(_))
    ));
    assert!(matches!(
        Session::from_bytes(&[]),
        Err(CryptoError::MalformedState(_))
    ));
    let mut wrong_version = bytes.to_vec();
    wrong_version[0] = 7;
    assert!(matches!(
        Session::from_bytes(&wrong_version),
        Err(CryptoError::MalformedState(_))
    ));
    // Flipping bytes never panics.
    for i in 0..bytes.len() {
        let mut b = bytes.to_vec();
        b[i] ^= 0xff;
        let _ = Session::from_bytes(&b);
    }
}

#[test]
fn same_seed_same_transcript() {
    let run = || {
        let mut p = established(122);
        let mut out = Vec::new();
        for i in 0..5u8 {
            let m = send(&mut p.a, &mut p.rng, u64::from(i), &[i]);
            recv(&mut p.b, &mut p.rng, &m).unwrap();
            out.push(m.ct);
            let m = send(&mut p.b, &mut p.rng, u64::from(i), &[i]);
            recv(&mut p.a, &mut p.rng, &m).unwrap();
            out.push(m.ct);
        }
        (out, state(&p.a), state(&p.b))
    };
    assert_eq!(run(), run());
}

#[test]
fn messages_do_not_open_in_another_session() {
    let mut p = established(123);
    let mut q = established(124);
    let m = send(&mut p.a, &mut p.rng, 0, b"for p.b only");
    assert!(recv(&mut q.b, &mut q.rng, &m).is_err());
    assert_eq!(recv(&mut p.b, &mut p.rng, &m).unwrap(), m.pt);
}

#[test]
fn ciphertext_lengths_are_bucketed() {
    let mut p = established(125);
    let lens: Vec<usize> = [0usize, 1, 40, 63, 64, 500, 1024, 5000]
        .iter()
        .map(|n| send(&mut p.a, &mut p.rng, 0, &vec![1u8; *n]).ct.len())
        .collect();
    // Powers of two up to 512 bytes, Padmé buckets above (1 KiB costs 1,088),
    // plus the 12-byte nonce and the 16-byte tag.
    assert_eq!(lens, vec![92, 92, 92, 92, 156, 540, 1116, 5148]);
    let big = send(&mut p.a, &mut p.rng, 0, &vec![9u8; 40_000]);
    assert_eq!(big.ct.len(), MESSAGE_NONCE_LEN + 40_960 + TAG_LEN);
}

#[test]
fn header_wire_layout_is_fixed() {
    let mut p = established(126);
    let m = send(&mut p.a, &mut p.rng, 0, b"x");
    let bytes = m.header.to_bytes();
    assert_eq!(bytes.len(), RATCHET_HEADER_LEN);
    assert_eq!(RatchetHeader::from_bytes(&bytes).unwrap(), m.header);
    assert_eq!(&bytes[..32], &m.header.dh);
    assert_eq!(&bytes[36..40], &m.header.index.to_be_bytes());
}

#[test]
fn thousands_of_in_order_generations() {
    // Regression: long one-way runs cross MAX_GENERATION_JUMP generations in total.
    let mut p = established(127);
    p.a.set_rotation_policy(RotationPolicy::new(2, MAX_CHAIN_AGE_MS).unwrap());
    for i in 0..(2 * MAX_GENERATION_JUMP + 200) {
        let m = send(&mut p.a, &mut p.rng, 0, &i.to_be_bytes());
        assert_eq!(
            recv(&mut p.b, &mut p.rng, &m),
            Ok(m.pt.clone()),
            "message {i}"
        );
    }
}
