//! wasm32 benchmark for `hush-crypto`: the same workload as
//! `crypto/benches/seal_open.rs` (seal+open of 1 KiB messages on an established
//! session), exported as a plain `extern "C"` function so node can run it without
//! wasm-bindgen. The only `unsafe` in the workspace's crypto path lives here: the
//! imported clock (`env.now_ms`, backed by `performance.now()` in `run.mjs`).
//!
//! Build: `cargo build --release -p hush-crypto-bench-wasm --target wasm32-unknown-unknown`
//! Run:   `node crypto/bench-wasm/run.mjs`

#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chacha20::ChaCha20Rng;
use hush_crypto::{DeviceIdentity, PrekeySecrets, Session, initiate, respond};
use rand_core::SeedableRng;
use std::hint::black_box;

/// Plaintext size of every benchmarked message.
pub const MSG_LEN: usize = 1024;

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    /// Milliseconds from a monotonic clock (JS `performance.now()`).
    fn now_ms() -> f64;
}

#[cfg(target_arch = "wasm32")]
fn clock_ms() -> f64 {
    // SAFETY: the import takes no arguments and returns a plain f64.
    unsafe { now_ms() }
}

#[cfg(not(target_arch = "wasm32"))]
fn clock_ms() -> f64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

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

fn run(a: &mut Session, b: &mut Session, rng: &mut ChaCha20Rng, n: u32) -> f64 {
    let msg = vec![0x5au8; MSG_LEN];
    let start = clock_ms();
    for i in 0..n {
        let (h, ct) = a
            .seal(rng, u64::from(i), &msg, |h| h.to_bytes().to_vec())
            .unwrap();
        let pt = b.open(rng, u64::from(i), &h, &h.to_bytes(), &ct).unwrap();
        black_box(pt);
    }
    (clock_ms() - start) / 1000.0
}

/// Runs `n` seal+open round trips (after a 2,000-message warm-up) on a fresh
/// session and returns messages per second.
#[unsafe(no_mangle)]
pub extern "C" fn bench(n: u32) -> f64 {
    let mut rng = ChaCha20Rng::from_seed([7u8; 32]);
    let (mut a, mut b) = established(&mut rng);
    run(&mut a, &mut b, &mut rng, 2_000);
    f64::from(n) / run(&mut a, &mut b, &mut rng, n)
}
