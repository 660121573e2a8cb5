//! Benchmark: throughput of `Session::seal` + `Session::open` for 1 KiB messages on an
//! established session (one direction, house rotation policy, so a reseed with
//! a fresh X25519 DH happens every 100 messages and is included in the cost).
//!
//! Plain `harness = false` binary, no criterion: `cargo bench -p hush-crypto --bench seal_open`.
//! The same workload runs under wasm32 in `crypto/bench-wasm/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chacha20::ChaCha20Rng;
use hush_crypto::{
    DeviceIdentity, PrekeySecrets, Session, initiate, open_at_rest, respond, seal_at_rest,
};
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

/// Nanoseconds this thread has run on a CPU (Linux schedstat), if available:
/// on a shared, loaded machine it distorts the rate less than wall time does.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// Seals and opens `n` messages; returns elapsed (wall, on-CPU) seconds; the
/// on-CPU time falls back to wall time where schedstat is unavailable.
fn run(a: &mut Session, b: &mut Session, rng: &mut ChaCha20Rng, n: u32) -> (f64, f64) {
    let msg = vec![0x5au8; MSG_LEN];
    let cpu_start = cpu_ns();
    let start = Instant::now();
    for i in 0..n {
        let (h, ct) = a
            .seal(rng, u64::from(i), &msg, |h| h.to_bytes().to_vec())
            .unwrap();
        let pt = b.open(rng, u64::from(i), &h, &h.to_bytes(), &ct).unwrap();
        black_box(pt);
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu_start, cpu_ns()) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e9,
        _ => wall,
    };
    (wall, cpu)
}

/// Seals and opens `n` padded 1 KiB messages (1,088 bytes, 300 bytes of
/// associated data) with the at-rest helpers (same AEAD backend as the
/// ratchet); returns round trips per on-CPU second.
fn aead_only(rng: &mut ChaCha20Rng, n: u32) -> f64 {
    let key = [0x42u8; 32];
    let msg = vec![0x5au8; 1088];
    let ad = [0x17u8; 300];
    let mut round = |count: u32| {
        let cpu_start = cpu_ns();
        let start = Instant::now();
        for _ in 0..count {
            let sealed = seal_at_rest(&key, rng, &msg, &ad).unwrap();
            black_box(open_at_rest(&key, &sealed, &ad).unwrap());
        }
        match (cpu_start, cpu_ns()) {
            (Some(a), Some(b)) => (b - a) as f64 / 1e9,
            _ => start.elapsed().as_secs_f64(),
        }
    };
    round(2_000);
    f64::from(n) / round(n)
}

fn main() {
    let n: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let mut rng = ChaCha20Rng::from_seed([7u8; 32]);
    let (mut a, mut b) = established(&mut rng);
    run(&mut a, &mut b, &mut rng, 2_000); // warm-up
    let (mut rates, mut cpu_rates): (Vec<f64>, Vec<f64>) = (0..5)
        .map(|_| {
            let (wall, cpu) = run(&mut a, &mut b, &mut rng, n);
            (f64::from(n) / wall, f64::from(n) / cpu)
        })
        .unzip();
    rates.sort_by(f64::total_cmp);
    cpu_rates.sort_by(f64::total_cmp);
    let mib = |rate: f64| rate * MSG_LEN as f64 / (1024.0 * 1024.0);
    let median = rates[2];
    println!(
        "seal+open 1 KiB (native, {} x {n} msgs, median of 5): {median:.0} messages/s, {:.2} MiB/s",
        std::env::consts::ARCH,
        mib(median)
    );
    let rounded = |r: &[f64]| r.iter().map(|r| r.round()).collect::<Vec<_>>();
    println!("  all runs (msg/s): {:?}", rounded(&rates));
    println!(
        "  per on-CPU second (less sensitive to a loaded machine): median {:.0} messages/s, {:.2} MiB/s; all runs {:?}",
        cpu_rates[2],
        mib(cpu_rates[2]),
        rounded(&cpu_rates)
    );
    let mut aead: Vec<f64> = (0..5).map(|_| aead_only(&mut rng, n)).collect();
    aead.sort_by(f64::total_cmp);
    println!(
        "  AEAD only (seal_at_rest + open_at_rest, 1,088 B + 300 B AD), per on-CPU second: median {:.0} round trips/s; all runs {:?}",
        aead[2],
        rounded(&aead)
    );
}
