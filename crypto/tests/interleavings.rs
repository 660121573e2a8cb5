//! Property tests: any interleaving and reordering of both parties' messages,
//! with drops, replays, tampering and clock jumps, under aggressive rotation.
//!
//! Invariants checked on every step:
//! * every delivered message opens exactly once, to its own plaintext;
//! * a replay of a delivered message fails with `Duplicate`;
//! * tampering with any byte of header, associated data or ciphertext fails;
//! * a failed open leaves the serialized session byte-for-byte unchanged;
//! * epochs never decrease.
// Test helpers outside #[test] fns may unwrap too (clippy.toml only covers #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;
use hush_crypto::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Send {
        from_a: bool,
        len: u16,
    },
    Deliver {
        to_a: bool,
        pick: usize,
    },
    Drop {
        to_a: bool,
        pick: usize,
    },
    Replay {
        to_a: bool,
        pick: usize,
    },
    Tamper {
        to_a: bool,
        pick: usize,
        target: u8,
        pos: usize,
    },
    Tick {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 0u16..300).prop_map(|(from_a, len)| Op::Send { from_a, len }),
        6 => (any::<bool>(), any::<usize>()).prop_map(|(to_a, pick)| Op::Deliver { to_a, pick }),
        1 => (any::<bool>(), any::<usize>()).prop_map(|(to_a, pick)| Op::Drop { to_a, pick }),
        1 => (any::<bool>(), any::<usize>()).prop_map(|(to_a, pick)| Op::Replay { to_a, pick }),
        1 => (any::<bool>(), any::<usize>(), 0u8..3, any::<usize>())
            .prop_map(|(to_a, pick, target, pos)| Op::Tamper { to_a, pick, target, pos }),
        1 => (0u64..3 * DAY_MS).prop_map(|ms| Op::Tick { ms }),
    ]
}

struct Sim {
    p: Pair,
    now: u64,
    counter: u32,
    to_a: Vec<Msg>,
    to_b: Vec<Msg>,
    got_a: Vec<Msg>,
    got_b: Vec<Msg>,
    b_has_received: bool,
    epochs: (u64, u64),
}

impl Sim {
    fn parts(&mut self, to_a: bool) -> (&mut Session, &mut Vec<Msg>, &mut Vec<Msg>) {
        if to_a {
            (&mut self.p.a, &mut self.to_a, &mut self.got_a)
        } else {
            (&mut self.p.b, &mut self.to_b, &mut self.got_b)
        }
    }

    fn deliver(&mut self, to_a: bool, pick: usize) -> Result<(), TestCaseError> {
        let (s, inflight, got) = self.parts(to_a);
        if inflight.is_empty() {
            return Ok(());
        }
        let m = inflight.remove(pick % inflight.len());
        let pt = s.open(&mut common::rng(0), 0, &m.header, &m.ad, &m.ct);
        prop_assert_eq!(
            pt.as_ref(),
            Ok(&m.pt),
            "delivery to_a={} header={:?}",
            to_a,
            m.header
        );
        got.push(m);
        if !to_a {
            self.b_has_received = true;
        }
        Ok(())
    }

    fn check_epochs(&mut self) -> Result<(), TestCaseError> {
        let e = (self.p.a.epoch(), self.p.b.epoch());
        prop_assert!(e.0 >= self.epochs.0 && e.1 >= self.epochs.1);
        self.epochs = e;
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Send { from_a, len } => {
                self.counter += 1;
                let mut pt = self.counter.to_be_bytes().to_vec();
                pt.resize(4 + usize::from(len), (self.counter % 251) as u8);
                let now = self.now;
                let (s, queue) = if from_a {
                    (&mut self.p.a, &mut self.to_b)
                } else {
                    (&mut self.p.b, &mut self.to_a)
                };
                let before = state(s);
                match s.seal(&mut self.p.rng, now, &pt, envelope_ad) {
                    Ok((header, ct)) => queue.push(Msg {
                        header,
                        ad: envelope_ad(&header),
                        ct,
                        pt,
                    }),
                    Err(e) => {
                        prop_assert!(!from_a && !self.b_has_received, "unexpected {:?}", e);
                        prop_assert_eq!(e, CryptoError::NotReady);
                        prop_assert_eq!(state(s), before);
                    }
                }
            }
            Op::Deliver { to_a, pick } => self.deliver(to_a, pick)?,
            Op::Drop { to_a, pick } => {
                let (_, inflight, _) = self.parts(to_a);
                if !inflight.is_empty() {
                    inflight.remove(pick % inflight.len());
                }
            }
            Op::Replay { to_a, pick } => {
                let (s, _, got) = self.parts(to_a);
                if !got.is_empty() {
                    let m = got[pick % got.len()].clone();
                    let before = state(s);
                    let r = s.open(&mut common::rng(0), 0, &m.header, &m.ad, &m.ct);
                    prop_assert_eq!(r, Err(CryptoError::Duplicate));
                    prop_assert_eq!(state(s), before);
                }
            }
            Op::Tamper {
                to_a,
                pick,
                target,
                pos,
            } => {
                let (s, inflight, _) = self.parts(to_a);
                if !inflight.is_empty() {
                    let m = inflight[pick % inflight.len()].clone();
                    let before = state(s);
                    let mut header = m.header;
                    let mut ad = m.ad.clone();
                    let mut ct = m.ct.clone();
                    let mut parsed = true;
                    match target {
                        0 => ct[pos % m.ct.len()] ^= 1 << (pos % 8),
                        1 => ad[pos % m.ad.len()] ^= 1 << (pos % 8),
                        _ => {
                            let mut hb = m.header.to_bytes();
                            hb[pos % RATCHET_HEADER_LEN] ^= 1 << (pos % 8);
                            match RatchetHeader::from_bytes(&hb) {
                                Ok(h) => {
                                    header = h;
                                    ad = envelope_ad(&h); // attacker keeps AD consistent
                                }
                                Err(_) => parsed = false,
                            }
                        }
                    }
                    if parsed {
                        let r = s.open(&mut common::rng(0), 0, &header, &ad, &ct);
                        prop_assert!(r.is_err(), "tampered message accepted");
                    }
                    prop_assert_eq!(state(s), before, "failed open changed state");
                }
            }
            Op::Tick { ms } => self.now += ms,
        }
        self.check_epochs()
    }
}

fn run(seed: u64, max_a: u32, max_b: u32, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut p = pair(seed);
    p.a.set_rotation_policy(RotationPolicy::new(max_a, 5 * DAY_MS).unwrap());
    p.b.set_rotation_policy(RotationPolicy::new(max_b, 2 * DAY_MS).unwrap());
    let mut sim = Sim {
        p,
        now: 0,
        counter: 0,
        to_a: vec![],
        to_b: vec![],
        got_a: vec![],
        got_b: vec![],
        b_has_received: false,
        epochs: (0, 0),
    };
    for op in ops {
        sim.step(op)?;
    }
    // Flush: everything still in flight is delivered (in the current random order).
    while !sim.to_a.is_empty() || !sim.to_b.is_empty() {
        let to_a = sim.to_b.is_empty();
        sim.deliver(to_a, 0)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_delivers_exactly_once(
        seed in any::<u64>(),
        max_a in 1u32..6,
        max_b in 1u32..6,
        ops in prop::collection::vec(op(), 1..160),
    ) {
        run(seed, max_a, max_b, &ops)?;
    }

    #[test]
    fn any_interleaving_with_house_policy(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        run(seed, MAX_MESSAGES_PER_CHAIN, MAX_MESSAGES_PER_CHAIN, &ops)?;
    }
}
