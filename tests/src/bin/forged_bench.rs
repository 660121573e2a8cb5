//! Forged-envelope benchmark: what undecryptable envelopes from a known
//! contact device cost the receiving engine.
//!
//! A two-user world from the deterministic simulator (in-memory relay core,
//! real engines, real encryption) exchanges a few messages, so bob holds a
//! working session with alice's device. Then a hostile relay pushes bob
//! `--count` envelopes per kind that name alice's device, bob's device and
//! their conversation, with a fresh random ratchet key each and garbage
//! ciphertext, straight into bob's engine (`Engine::handle`, a `Push`
//! frame: the real receive path). Kinds:
//!
//! - `far-index`: message index 25,000 (within the old skip limit);
//! - `max-index`: index 99, the largest a chain can reach before its reseed;
//! - `far-generation`: index 99 of reseed generation 1,000.
//!
//! Every forged envelope must be rejected; the time per kind is printed.
//!
//! ```text
//! cargo run --release -p hush-tests --bin forged_bench -- [--count N]
//! ```
//!
//! Timed here, never in tests.

use hush_client::{Engine, Input};
use hush_crypto::RatchetHeader;
use hush_protocol::{
    ConversationId, Delivered, DeviceId, Envelope, EnvelopeHeader, MessageId, ServerFrame,
};
use hush_tests::sim::{Scenario, World};
use std::time::Instant;

struct Kind {
    name: &'static str,
    index: u32,
    generation: u32,
}

const KINDS: [Kind; 3] = [
    Kind {
        name: "far-index",
        index: 25_000,
        generation: 0,
    },
    Kind {
        name: "max-index",
        index: 99,
        generation: 0,
    },
    Kind {
        name: "far-generation",
        index: 99,
        generation: 1_000,
    },
];

/// Envelopes per `Push` frame.
const PER_PUSH: usize = 64;

/// A small deterministic generator for forged bytes (not cryptographic: the
/// forger's keys need only be distinct).
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn scenario() -> Scenario {
    let mut s = Scenario::from_seed(6);
    s.devices = vec![1, 1];
    s.messages = 12;
    s.workload_ms = 60_000;
    s.heal_ms = 10 * 60_000;
    s.withhold_bp = 0;
    s.dup_bp = 0;
    s.reorder_bp = 0;
    s.cut_every_ms = 0;
    s.relay_restarts = 0;
    s.crash_bp = 0;
    s.offline_spells = 0;
    s.late_user = false;
    s.extras = false;
    s
}

struct Target {
    from: DeviceId,
    to: DeviceId,
    conversation: ConversationId,
    now: u64,
}

fn forged(rng: &mut Xorshift, t: &Target, kind: &Kind, n: u64) -> Result<Envelope, String> {
    let mut dh = [0u8; 32];
    rng.fill(&mut dh);
    let mut reseed = [0u8; 32];
    if kind.generation > 0 {
        rng.fill(&mut reseed);
    }
    let rh = RatchetHeader {
        dh,
        previous_chain_len: 0,
        index: kind.index,
        generation: kind.generation,
        reseed,
    };
    let mut id = [0u8; 16];
    rng.fill(&mut id);
    let mut ciphertext = vec![0u8; 12 + 64 + 16];
    rng.fill(&mut ciphertext);
    Ok(Envelope {
        header: EnvelopeHeader {
            message_id: MessageId(id),
            sender_device: t.from,
            recipient_device: t.to,
            conversation_id: t.conversation,
            sender_seq: 1_000_000 + n,
            sent_at_ms: t.now,
            ratchet: rh.to_bytes().to_vec(),
            session_init: None,
        },
        ciphertext,
    })
}

fn push(bob: &mut Engine, now: u64, envelopes: Vec<Delivered>) -> Result<(), String> {
    bob.handle(now, Input::Frame(ServerFrame::Push { envelopes }))
        .map(|_| ())
        .map_err(|e| format!("engine: {e}"))
}

/// The relay seq bob expects next: pushes at or below its cursor count as
/// duplicates, the first one above is handled.
fn next_relay_seq(
    bob: &mut Engine,
    rng: &mut Xorshift,
    t: &Target,
    kind: &Kind,
) -> Result<u64, String> {
    for seq in 1..1_000_000u64 {
        let before = bob.counters().duplicates_dropped;
        let envelope = forged(rng, t, kind, 999_000 + seq)?;
        push(bob, t.now, vec![Delivered { seq, envelope }])?;
        if bob.counters().duplicates_dropped == before {
            return Ok(seq + 1);
        }
    }
    Err("bob's cursor not found".into())
}

fn main() -> Result<(), String> {
    let mut count: u64 = 10_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--count" => {
                count = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--count needs a number")?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let mut w = World::new(6, scenario()).map_err(|v| format!("setup: {v:?}"))?;
    w.run().map_err(|v| format!("run: {v:?}"))?;
    let a = *w.user_nodes(0).first().ok_or("no alice")?;
    let b = *w.user_nodes(1).first().ok_or("no bob")?;
    let alice_user = w.user_key(0).ok_or("no alice key")?;
    let now = w.now;
    let from = w.nodes[a].engine.device_id();
    let bob = &mut w.nodes[b].engine;
    let t = Target {
        from,
        to: bob.device_id(),
        conversation: bob.conversation_with(&alice_user),
        now,
    };
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut seq = next_relay_seq(bob, &mut rng, &t, &KINDS[0])?;
    println!("forged envelopes from a known contact device, {count} per kind, release engine:");
    let mut total = 0.0f64;
    for kind in &KINDS {
        let batch: Vec<Envelope> = (0..count)
            .map(|n| forged(&mut rng, &t, kind, n))
            .collect::<Result<_, _>>()?;
        let rejected = bob.counters().rejected;
        let start = Instant::now();
        let mut it = batch.into_iter().peekable();
        while it.peek().is_some() {
            let envelopes: Vec<Delivered> = it
                .by_ref()
                .take(PER_PUSH)
                .map(|envelope| {
                    let d = Delivered { seq, envelope };
                    seq += 1;
                    d
                })
                .collect();
            push(bob, now, envelopes)?;
        }
        let secs = start.elapsed().as_secs_f64();
        total += secs;
        let got = bob.counters().rejected - rejected;
        if got != count {
            return Err(format!("{}: {got} of {count} rejected", kind.name));
        }
        println!(
            "  {:<15} {:>9.3} s total  {:>8.1} µs per envelope",
            kind.name,
            secs,
            secs * 1e6 / count as f64
        );
    }
    println!("  all kinds       {total:>9.3} s");
    Ok(())
}
