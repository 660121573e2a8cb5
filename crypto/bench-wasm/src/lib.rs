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
    /// Milliseconds this thread has run on a CPU (Linux schedstat in `run.mjs`),
    /// so a shared, loaded machine distorts the rate less than wall time does.
    fn cpu_ms() -> f64;
}

#[cfg(target_arch = "wasm32")]
fn clock_ms() -> f64 {
    // SAFETY: the import takes no arguments and returns a plain f64.
    unsafe { now_ms() }
}

#[cfg(target_arch = "wasm32")]
fn cpu_clock_ms() -> f64 {
    // SAFETY: the import takes no arguments and returns a plain f64.
    unsafe { cpu_ms() }
}

#[cfg(not(target_arch = "wasm32"))]
fn cpu_clock_ms() -> f64 {
    clock_ms()
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

/// Seals and opens `n` messages; returns elapsed (wall, on-CPU) seconds.
fn run(a: &mut Session, b: &mut Session, rng: &mut ChaCha20Rng, n: u32) -> (f64, f64) {
    let msg = vec![0x5au8; MSG_LEN];
    let start = clock_ms();
    let cpu_start = cpu_clock_ms();
    for i in 0..n {
        let (h, ct) = a
            .seal(rng, u64::from(i), &msg, |h| h.to_bytes().to_vec())
            .unwrap();
        let pt = b.open(rng, u64::from(i), &h, &h.to_bytes(), &ct).unwrap();
        black_box(pt);
    }
    let cpu = (cpu_clock_ms() - cpu_start) / 1000.0;
    ((clock_ms() - start) / 1000.0, cpu)
}

/// On-CPU rate (messages per on-CPU second) of the last [`bench`] call.
static LAST_CPU_RATE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs [`hush_crypto::self_test`] (known answers through the AEAD backend this
/// build uses); returns 0 on success, 1 on failure. `run.mjs` refuses to
/// benchmark a build that fails it.
#[unsafe(no_mangle)]
pub extern "C" fn self_check() -> u32 {
    u32::from(hush_crypto::self_test().is_err())
}

/// Runs `n` seal+open round trips (after a 2,000-message warm-up) on a fresh
/// session and returns messages per second (wall clock); the on-CPU rate of
/// the same run is then available from [`last_cpu_rate`].
#[unsafe(no_mangle)]
pub extern "C" fn bench(n: u32) -> f64 {
    let mut rng = ChaCha20Rng::from_seed([7u8; 32]);
    let (mut a, mut b) = established(&mut rng);
    run(&mut a, &mut b, &mut rng, 2_000);
    let (wall, cpu) = run(&mut a, &mut b, &mut rng, n);
    let cpu_rate = f64::from(n) / cpu;
    LAST_CPU_RATE.store(cpu_rate.to_bits(), std::sync::atomic::Ordering::Relaxed);
    f64::from(n) / wall
}

/// Messages per second of on-CPU time in the last [`bench`] call.
#[unsafe(no_mangle)]
pub extern "C" fn last_cpu_rate() -> f64 {
    f64::from_bits(LAST_CPU_RATE.load(std::sync::atomic::Ordering::Relaxed))
}

/// Seals and opens `n` padded 1 KiB messages (1,088 bytes, 300 bytes of
/// associated data) with the at-rest helpers, which use the same AEAD backend
/// as the ratchet; returns round trips per on-CPU second. Isolates the
/// ChaCha20-Poly1305 cost from the key schedule and X25519.
#[unsafe(no_mangle)]
pub extern "C" fn bench_aead(n: u32) -> f64 {
    let mut rng = ChaCha20Rng::from_seed([9u8; 32]);
    let key = [0x42u8; 32];
    let msg = vec![0x5au8; 1088];
    let ad = [0x17u8; 300];
    let mut round = |count: u32| {
        let start = cpu_clock_ms();
        for _ in 0..count {
            let sealed = hush_crypto::seal_at_rest(&key, &mut rng, &msg, &ad).unwrap();
            black_box(hush_crypto::open_at_rest(&key, &sealed, &ad).unwrap());
        }
        (cpu_clock_ms() - start) / 1000.0
    };
    round(2_000);
    f64::from(n) / round(n)
}
