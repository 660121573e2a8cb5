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
//! The relay sees ratchet headers, so it can also forge on a ratchet key
//! bob already holds a chain for (alice's latest, taken from a real message
//! of hers pushed to bob first):
//!
//! - `known-max-index`: that key, index 99;
//! - `known-next-generation`: that key, index 0 of the next generation;
//! - `known-small-skip`: that key, 3 past the next index (cheap: always tried).
//!
//! Every forged envelope must be rejected; the time per kind is printed,
//! with how many were dropped unopened because alice's device had spent its
//! budget for failed expensive attempts (`EngineConfig::open_budget`). Each
//! kind runs on a fresh world, so its budget starts full; bob's clock
//! stands still during a kind, so it never refills.
//!
//! ```text
//! cargo run --release -p hush-tests --bin forged_bench -- [--count N]
//! ```
//!
//! Timed here, never in tests.

use hush_client::{Command, Engine, Input};
use hush_crypto::RatchetHeader;
use hush_protocol::{
    ConversationId, Delivered, DeviceId, Envelope, EnvelopeHeader, MessageId, Request, ServerFrame,
};
use hush_tests::sim::{Scenario, World};
use std::time::Instant;

struct Kind {
    name: &'static str,
    index: u32,
    generation: u32,
    /// On alice's real ratchet key: `index` and `generation` are added to
    /// her real header's next index and generation.
    known: bool,
}

const KINDS: [Kind; 6] = [
    Kind {
        name: "far-index",
        index: 25_000,
        generation: 0,
        known: false,
    },
    Kind {
        name: "max-index",
        index: 99,
        generation: 0,
        known: false,
    },
    Kind {
        name: "far-generation",
        index: 99,
        generation: 1_000,
        known: false,
    },
    Kind {
        name: "known-max-index",
        index: 99,
        generation: 0,
        known: true,
    },
    Kind {
        name: "known-next-generation",
        index: 0,
        generation: 1,
        known: true,
    },
    Kind {
        name: "known-small-skip",
        index: 3,
        generation: 0,
        known: true,
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
    /// The header of alice's real message that bob opened.
    real: Option<RatchetHeader>,
}

fn forged(rng: &mut Xorshift, t: &Target, kind: &Kind, n: u64) -> Result<Envelope, String> {
    let mut dh = [0u8; 32];
    rng.fill(&mut dh);
    let mut reseed = [0u8; 32];
    if kind.generation > 0 {
        rng.fill(&mut reseed);
    }
    let (mut index, mut generation) = (kind.index, kind.generation);
    if kind.known {
        let real = t.real.ok_or("no real header")?;
        dh = real.dh;
        generation = real.generation + kind.generation;
        if kind.generation == 0 {
            reseed = real.reseed;
            index = (real.index + 1 + kind.index).min(99);
        }
    }
    let rh = RatchetHeader {
        dh,
        previous_chain_len: 0,
        index,
        generation,
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
            important: false,
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

/// Alice seals one real message to bob (waiting out a device-list refresh
/// if the send asks for one); returns the envelope for bob.
fn real_message(
    alice: &mut Engine,
    now: u64,
    conversation: ConversationId,
    to: DeviceId,
) -> Result<Envelope, String> {
    let mut frames = Vec::new();
    let step = alice
        .handle(
            now,
            Input::Command(Command::SendText {
                conversation,
                text: "real".into(),
            }),
        )
        .map_err(|e| format!("alice: {e}"))?;
    frames.extend(step.early_frames);
    frames.extend(step.frames);
    for wait in [6_000, 60_000] {
        let step = alice
            .handle(now + wait, Input::Tick)
            .map_err(|e| format!("alice: {e}"))?;
        frames.extend(step.early_frames);
        frames.extend(step.frames);
    }
    frames
        .into_iter()
        .filter_map(|f| match f.request {
            Request::Send { envelopes } => Some(envelopes),
            _ => None,
        })
        .flatten()
        .find(|e| e.header.recipient_device == to && e.header.session_init.is_none())
        .ok_or_else(|| "alice sealed nothing for bob".to_string())
}

/// A fresh world in which bob has opened alice's latest message: bob's
/// budget for alice's device is full. Returns the world, bob's node, the
/// target and the next relay seq bob expects.
fn setup(rng: &mut Xorshift) -> Result<(World, usize, Target, u64), String> {
    let mut w = World::new(6, scenario()).map_err(|v| format!("setup: {v:?}"))?;
    w.run().map_err(|v| format!("run: {v:?}"))?;
    let a = *w.user_nodes(0).first().ok_or("no alice")?;
    let b = *w.user_nodes(1).first().ok_or("no bob")?;
    let alice_user = w.user_key(0).ok_or("no alice key")?;
    let now = w.now;
    let from = w.nodes[a].engine.device_id();
    let to = w.nodes[b].engine.device_id();
    let bob_user = w.user_key(1).ok_or("no bob key")?;
    let to_bob = w.nodes[a].engine.conversation_with(&bob_user);
    let real = real_message(&mut w.nodes[a].engine, now, to_bob, to)?;
    let real_header = RatchetHeader::from_bytes(&real.header.ratchet).map_err(|e| e.to_string())?;
    let bob = &mut w.nodes[b].engine;
    let mut t = Target {
        from,
        to,
        conversation: bob.conversation_with(&alice_user),
        now,
        real: None,
    };
    let mut seq = next_relay_seq(bob, rng, &t, &KINDS[0])?;
    // Bob opens alice's real message: he now holds a chain for its key.
    let delivered = bob.counters().rejected;
    push(
        bob,
        now,
        vec![Delivered {
            seq,
            envelope: real,
        }],
    )?;
    seq += 1;
    if bob.counters().rejected != delivered {
        return Err("bob did not open alice's real message".into());
    }
    t.real = Some(real_header);
    Ok((w, b, t, seq))
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
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    println!("forged envelopes from a known contact device, {count} per kind, release engine:");
    let mut total = 0.0f64;
    for kind in &KINDS {
        // Each kind on a fresh world: the budget starts full.
        let (mut w, b, t, mut seq) = setup(&mut rng)?;
        let now = t.now;
        let bob = &mut w.nodes[b].engine;
        let batch: Vec<Envelope> = (0..count)
            .map(|n| forged(&mut rng, &t, kind, n))
            .collect::<Result<_, _>>()?;
        let rejected = bob.counters().rejected;
        let skipped = bob.counters().undecryptable_skipped;
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
        let unopened = bob.counters().undecryptable_skipped - skipped;
        println!(
            "  {:<22} {:>7.3} s total  {:>7.1} µs per envelope  {:>6} tried  {:>6} unopened",
            kind.name,
            secs,
            secs * 1e6 / count as f64,
            count - unopened,
            unopened
        );
    }
    println!("  all kinds              {total:>7.3} s");
    Ok(())
}
