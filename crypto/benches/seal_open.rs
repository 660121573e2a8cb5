//! Benchmark: throughput of `Session::seal` + `Session::open` for 1 KiB messages on an
//! established session (one direction, house rotation policy, so a reseed with
//! a fresh X25519 DH happens every 100 messages and is included in the cost).
//!
//! Plain `harness = false` binary, no criterion: `cargo bench -p hush-crypto --bench seal_open`.
//! The same workload runs under wasm32 in `crypto/bench-wasm/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chacha20::ChaCha20Rng;
use hush_crypto::{DeviceIdentity, PrekeySecrets, Session, initiate, respond};
use rand_core::SeedableRng;
use std::hint::black_box;
use std::time::Instant;

const MSG_LEN: usize = 1024;

fn established(rng: &mut ChaCha20Rng) -> (Session, Session) {
    let alice = DeviceIdentity::generate(rng);
    let bob = DeviceIdentity::generate(rng);
    let mut pre = PrekeySecrets::new(&bob, rng, 0);
    let bundle = pre.bundle(None).unwrap();
    let (mut a, init) = initiate(&alice, &bundle, rng).unwrap();
    let mut b = respond(&bob, &mut pre, &init, &alice.public()).unwrap();
    let (h, ct) = a.seal(rng, 0, b"hi", |h| h.to_bytes().to_vec()).unwrap();
    b.open(rng, 0, &h, &h.to_bytes(), &ct).unwrap();
    (a, b)
}

/// Seals and opens `n` messages; returns elapsed seconds.
fn run(a: &mut Session, b: &mut Session, rng: &mut ChaCha20Rng, n: u32) -> f64 {
    let msg = vec![0x5au8; MSG_LEN];
    let start = Instant::now();
    for i in 0..n {
        let (h, ct) = a
            .seal(rng, u64::from(i), &msg, |h| h.to_bytes().to_vec())
            .unwrap();
        let pt = b.open(rng, u64::from(i), &h, &h.to_bytes(), &ct).unwrap();
        black_box(pt);
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    let n: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let mut rng = ChaCha20Rng::from_seed([7u8; 32]);
    let (mut a, mut b) = established(&mut rng);
    run(&mut a, &mut b, &mut rng, 2_000); // warm-up
    let mut rates: Vec<f64> = (0..5)
        .map(|_| f64::from(n) / run(&mut a, &mut b, &mut rng, n))
        .collect();
    rates.sort_by(f64::total_cmp);
    let median = rates[2];
    let mib = median * MSG_LEN as f64 / (1024.0 * 1024.0);
    println!(
        "seal+open 1 KiB (native, {} x {n} msgs, median of 5): {median:.0} messages/s, {mib:.2} MiB/s",
        std::env::consts::ARCH
    );
    println!(
        "  all runs (msg/s): {:?}",
        rates.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
}
