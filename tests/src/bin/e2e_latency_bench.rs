//! `e2e_latency_bench`: online end-to-end delivery latency.
//!
//! Two users on the `hush` CLI's native driver (real QUIC on 127.0.0.1, real
//! encryption, durable sealed file stores), both connected to an in-process
//! relay (real redb store, fsync per group commit). alice sends texts to bob
//! at a fixed rate (default 1,000/s for 10 s); for each, the latency is from
//! just before alice's `SendText` command to the moment bob's driver hands
//! the `Event::Message` to its sink (once bob's store holds it: the native
//! driver shows an incoming message once stored and acknowledges it once
//! durable).
//! Prints p50/p99/p99.9/max and the host's CPU steal and I/O pressure, and
//! for a stall (messages over 100 ms) when they were sent and how many of
//! the relay's commits took over 10 ms, 100 ms and 1 s.
//!
//! ```text
//! cargo run --release -p hush-tests --bin e2e_latency_bench -- [--rate N] [--secs S]
//!     [--relay-dir DIR] [--client-dir DIR] [--early on|off]
//! ```
//!
//! `--early off` has the clients not ask for early pushes (docs/PROTOCOL.md
//! §8.5), so the relay pushes each message only once its commit is durable:
//! the same binary measures both ways.
//!
//! `--relay-dir` and `--client-dir` put the relay's store or the two
//! clients' stores in a fresh directory under `DIR` instead of under
//! `$TMPDIR` (e.g. one side on tmpfs, to see what its syncs cost).
//!
//! Targets (BENCHMARKS.md): p50 ≤ 1 ms, p99 ≤ 5 ms. Timed here, never in tests.

use hush_cli::driver::{Batch, Discard, Driver, Outcome, Sink, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, CliError, RelayTarget};
use hush_client::{Command, ContactCode, Engine, Event, FileStorage, StoreKey, Unlock};
use hush_relay::{Config, RelayHandle, SystemClock};
use hush_tests::host::{HostSample, since};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The relay binary's allocator, so the in-process relay behaves as deployed.
#[global_allocator]
static ALLOC: hush_relay::Allocator = hush_relay::Allocator;

type Dev = Driver<FileStorage>;

fn bench_err(e: impl std::fmt::Display) -> CliError {
    CliError::Transport(e.to_string())
}

async fn settle(d: &mut Dev) -> Result<(), CliError> {
    let mut stop = None;
    let by = tokio::time::Instant::now() + Duration::from_secs(20);
    match d
        .run_until(by, &mut stop, &mut Discard, |v| v.settled())
        .await?
    {
        Outcome::Done => Ok(()),
        _ => Err(bench_err("device did not settle in time")),
    }
}

async fn new_user(
    dir: &std::path::Path,
    name: &str,
    target: &RelayTarget,
    early: bool,
) -> Result<Dev, CliError> {
    let mut cfg = cli_engine_config();
    cfg.early_pushes = early;
    let storage = FileStorage::open(
        dir.join(format!("{name}.redb")),
        &Unlock::Key(StoreKey::generate()?),
    )?;
    let (engine, step) = Engine::create(now_ms(), os_seed()?, &target.addr, name, cfg.clone())?;
    let mut d = Driver::new(engine, storage, cfg, target.clone());
    d.start(step, &mut Discard).await?;
    settle(&mut d).await?;
    Ok(d)
}

async fn add_contact(d: &mut Dev, code: ContactCode) -> Result<(), CliError> {
    d.command(Command::AddContact { code }, &mut Discard)
        .await?;
    settle(d).await
}

/// Send times by message number, shared between alice's loop and bob's sink.
type Sent = Arc<Mutex<Vec<Option<Instant>>>>;

/// bob's sink: the latency of every message event whose text names a sent
/// message.
struct Receiver {
    sent: Sent,
    latencies: Vec<Duration>,
    unknown: usize,
    /// When the run started, and the messages slower than [`SLOW`]: when
    /// each was sent (seconds into the run), to place a stall in time.
    start: Instant,
    slow: Vec<f64>,
}

/// A message slower than this is a stall, not queueing behind syncs.
const SLOW: Duration = Duration::from_millis(100);

impl Sink<FileStorage> for Receiver {
    fn batch(&mut self, b: Batch<'_, FileStorage>) -> Result<(), CliError> {
        let now = Instant::now();
        let sent = self
            .sent
            .lock()
            .map_err(|_| bench_err("send-time table poisoned"))?;
        for e in b.events {
            if let Event::Message(record) = e
                && !record.outgoing
            {
                let n: Option<usize> = record.text.get(..8).and_then(|s| s.parse().ok());
                match n.and_then(|n| sent.get(n).copied().flatten()) {
                    Some(t0) => {
                        let took = now.duration_since(t0);
                        if took > SLOW {
                            self.slow
                                .push(t0.saturating_duration_since(self.start).as_secs_f64());
                        }
                        self.latencies.push(took);
                    }
                    None => self.unknown += 1,
                }
            }
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn bench(
    rate: u64,
    secs: f64,
    early: bool,
    relay_dir: &std::path::Path,
    client_dir: &std::path::Path,
) -> Result<(), CliError> {
    let mut config = Config::default_for(relay_dir.join("relay"));
    config.http = None;
    config.send_rate = 0;
    let relay = RelayHandle::start(config, Arc::new(SystemClock))
        .await
        .map_err(bench_err)?;
    let target = RelayTarget {
        addr: relay.quic_addr().to_string(),
        cert: CertCheck::Pinned(CertCheck::parse_hash(&relay.cert_sha256_hex())?),
        transport: hush_cli::Transport::Quic,
    };
    let mut alice = new_user(client_dir, "alice", &target, early).await?;
    let mut bob = new_user(client_dir, "bob", &target, early).await?;
    let mut alice_code = alice.engine().contact_code();
    alice_code.name = "alice".into();
    let mut bob_code = bob.engine().contact_code();
    bob_code.name = "bob".into();
    add_contact(&mut alice, bob_code.clone()).await?;
    add_contact(&mut bob, alice_code).await?;
    let conversation = alice.engine().conversation_with(&bob_code.user);

    let total = ((rate as f64) * secs).round() as usize;
    let sent: Sent = Arc::new(Mutex::new(vec![None; total]));
    let mut receiver = Receiver {
        sent: sent.clone(),
        latencies: Vec::with_capacity(total),
        unknown: 0,
        start: Instant::now(),
        slow: Vec::new(),
    };
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let body = "x".repeat(100);
    let host = HostSample::now();
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs_f64(secs) + Duration::from_secs(10);

    // bob handles frames that arrive while his store commits, and commits
    // them together next.
    bob.set_pipelined(true);
    let mut batches = 0usize;
    // alice: each message at its slot, driving her connection in between.
    // Every message already due when she gets to it (she fell behind while
    // a commit ran) goes into one `commands` batch: one durable commit of
    // her store for all of them, then their sends (group commit on the
    // client; nothing leaves before its commit).
    let sender = async {
        let mut stop = None;
        let mut i = 0;
        while i < total {
            let due = start + interval * i as u32;
            if tokio::time::Instant::now() < due {
                alice
                    .run_until(due, &mut stop, &mut Discard, |_| false)
                    .await?;
            }
            let now = tokio::time::Instant::now();
            let mut batch = Vec::new();
            while i < total && (batch.is_empty() || start + interval * i as u32 <= now) {
                if let Ok(mut s) = sent.lock() {
                    s[i] = Some(Instant::now());
                }
                batch.push(Command::SendText {
                    conversation,
                    text: format!("{i:08} {body}"),
                });
                i += 1;
            }
            batches += 1;
            alice.commands(batch, &mut Discard).await?;
        }
        alice
            .run_until(end, &mut stop, &mut Discard, |v| v.settled())
            .await?;
        Ok::<(), CliError>(())
    };
    // bob: connected throughout, until every message has arrived.
    let counted = async {
        let mut stop = None;
        let mut seen = 0usize;
        while seen < total && tokio::time::Instant::now() < end {
            let step = tokio::time::Instant::now() + Duration::from_millis(100);
            bob.run_until(step.min(end), &mut stop, &mut receiver, |_| false)
                .await?;
            seen = receiver.latencies.len() + receiver.unknown;
        }
        Ok::<(), CliError>(())
    };
    let (a, b) = tokio::join!(sender, counted);
    a?;
    b?;
    let host = since(host);
    let mut lat = std::mem::take(&mut receiver.latencies);
    lat.sort_unstable();
    println!(
        "e2e: {} of {total} messages at {rate}/s delivered (send command → recipient event once its store holds it): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        lat.len(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    );
    println!(
        "alice: {total} sends in {batches} command batches (one store commit each); stores: alice {} commits, bob {} commits",
        alice.stats().commits,
        bob.stats().commits,
    );
    println!(
        "bob: early pushes {}, {} envelopes taken from them (before the relay's commit was durable)",
        if early { "asked for" } else { "off" },
        bob.engine().early_pushes_taken(),
    );
    // Where a message's time goes: each side's store commits (durable,
    // one fsync each) run in series with the relay's.
    for (name, st) in [("alice", alice.stats()), ("bob", bob.stats())] {
        let per = |d: Duration, n: u64| d.as_secs_f64() * 1000.0 / n.max(1) as f64;
        println!(
            "{name}: {} inputs, engine {:.3} ms per input; {} store commits ({} stored on the driver's task) of {:.3} ms each, stored after {:.3} ms",
            st.inputs,
            per(st.handle, st.inputs),
            st.commits,
            st.stored_inline,
            per(st.apply, st.commits),
            per(st.stored, st.commits),
        );
        let q = |l: &hush_cli::driver::Latencies, q: f64| {
            l.quantile(q).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "{name}: from the engine's step, events shown after p50 {:.3} / p90 {:.3} ms ({} steps), frames sent after p50 {:.3} / p90 {:.3} ms ({} steps)",
            q(&st.shown_after, 0.5),
            q(&st.shown_after, 0.9),
            st.shown_after.count(),
            q(&st.sent_after, 0.5),
            q(&st.sent_after, 0.9),
            st.sent_after.count(),
        );
    }
    // A stall (seconds, not milliseconds): was it the relay's store?
    let m = relay.metrics();
    let commits = m.commit_latency_seconds.count();
    let over = |s: f64| commits.saturating_sub(m.commit_latency_seconds.count_at_most(s));
    let first = receiver.slow.iter().copied().fold(f64::INFINITY, f64::min);
    let last = receiver.slow.iter().copied().fold(0.0, f64::max);
    println!(
        "stalls: {} messages over {} ms{}; relay: {commits} commits, over 10 ms {}, over 100 ms {}, over 1 s {}",
        receiver.slow.len(),
        SLOW.as_millis(),
        if receiver.slow.is_empty() {
            String::new()
        } else {
            format!(" (sent {first:.1}–{last:.1} s into the run)")
        },
        over(0.01),
        over(0.1),
        over(1.0),
    );
    println!("{host}");
    if lat.len() != total || receiver.unknown != 0 {
        return Err(bench_err(format!(
            "bob received {} of {total} ({} unknown)",
            lat.len(),
            receiver.unknown
        )));
    }
    alice.shutdown().await;
    bob.shutdown().await;
    relay.shutdown().await.map_err(bench_err)?;
    Ok(())
}

/// The command line.
struct Args {
    rate: u64,
    secs: f64,
    relay_dir: Option<std::path::PathBuf>,
    client_dir: Option<std::path::PathBuf>,
    early: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rate: 1_000,
        secs: 10.0,
        relay_dir: None,
        client_dir: None,
        early: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rate" => args.rate = value.parse().map_err(|_| "--rate needs a number")?,
            "--secs" => args.secs = value.parse().map_err(|_| "--secs needs a number")?,
            "--relay-dir" => args.relay_dir = Some(value.into()),
            "--client-dir" => args.client_dir = Some(value.into()),
            "--early" => {
                args.early = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => return Err("--early needs on or off".into()),
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.rate == 0 || args.secs <= 0.0 {
        return Err("--rate and --secs must be positive".into());
    }
    Ok(args)
}

/// A fresh directory under `parent`, or under `$TMPDIR`.
fn fresh_dir(parent: Option<&std::path::Path>) -> std::io::Result<tempfile::TempDir> {
    match parent {
        Some(p) => tempfile::tempdir_in(p),
        None => tempfile::tempdir(),
    }
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("e2e_latency_bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("e2e_latency_bench: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let dirs = fresh_dir(args.relay_dir.as_deref())
        .and_then(|r| fresh_dir(args.client_dir.as_deref()).map(|c| (r, c)));
    let result = match dirs {
        Ok((relay, client)) => runtime.block_on(bench(
            args.rate,
            args.secs,
            args.early,
            relay.path(),
            client.path(),
        )),
        Err(e) => Err(bench_err(e)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e_latency_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
