//! Client benchmark: the native driver of the `hush` CLI against an
//! in-process relay, with real QUIC on 127.0.0.1, real encryption and the
//! durable file store (redb, fsync per commit).
//!
//! Measures:
//!
//! 1. **sender throughput** — messages per second that a sender's device
//!    seals (one envelope per device of bob, who has two), stores in its
//!    outbox and has acknowledged ("stored") by the relay, with a bounded
//!    window of unconfirmed messages. The backlog comes from `--senders`
//!    users in turn (each sends `messages / senders`);
//! 2. **catch-up** — bob's freshly linked second device, offline during the
//!    burst, starts as a new process would (engine loaded from its store),
//!    connects and drains the whole backlog: pull, decrypt, order, store in
//!    history, acknowledge. Each page's arrival sends the next pull before
//!    the page is committed (an early frame), so the relay serves the next
//!    page during the commit, and the driver decrypts the next page during
//!    the commit, as the CLI does (`--serial`: each commit awaited before
//!    the next input instead). A breakdown shows engine, storage and relay
//!    time.
//!
//! ```text
//! cargo run --release -p hush-tests --bin client_bench -- [--messages N] [--size BYTES] [--window W] [--senders K] [--pause S] [--serial] [--pull-depth D] [--page-limit P]
//! ```
//!
//! Timed here, never in tests.

use hush_cli::driver::{Batch, Discard, Driver, Outcome, Sink, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, CliError, RelayTarget};
use hush_client::{
    Command, ContactCode, Engine, Event, FileStorage, LinkCode, Reply, StoreKey, Unlock,
};
use hush_relay::{Config, RelayHandle, SystemClock};
use hush_tests::host::{HostSample, since};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The relay binary's allocator, so the in-process relay behaves as deployed.
#[global_allocator]
static ALLOC: hush_relay::Allocator = hush_relay::Allocator;

type Dev = Driver<FileStorage>;

struct Args {
    messages: usize,
    size: usize,
    window: usize,
    /// Users sending the backlog (each sends messages / senders).
    senders: usize,
    /// Seconds to pause before the catch-up (to attach a profiler).
    pause: usize,
    /// Catch up handling further frames while a commit runs (the CLI's
    /// default); `--serial` awaits each commit before the next input.
    pipelined: bool,
    /// Most pulls in flight during the catch-up (`EngineConfig::pull_depth`).
    pull_depth: u16,
    /// Most envelopes per pulled page (`EngineConfig::page_limit`).
    page_limit: u16,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        messages: 100_000,
        size: 1024,
        window: 32,
        senders: 10,
        pause: 0,
        pipelined: true,
        pull_depth: cli_engine_config().pull_depth,
        page_limit: cli_engine_config().page_limit,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--messages" => a.messages = value("--messages")?,
            "--size" => a.size = value("--size")?,
            "--window" => a.window = value("--window")?.max(1),
            "--pause" => a.pause = value("--pause")?,
            "--senders" => a.senders = value("--senders")?.max(1),
            "--serial" => a.pipelined = false,
            "--pull-depth" => {
                a.pull_depth = u16::try_from(value("--pull-depth")?.max(1))
                    .map_err(|_| "--pull-depth is too large".to_string())?
            }
            "--page-limit" => {
                a.page_limit = u16::try_from(value("--page-limit")?.max(1))
                    .map_err(|_| "--page-limit is too large".to_string())?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn bench_err(e: impl std::fmt::Display) -> CliError {
    CliError::Transport(e.to_string())
}

async fn settle(d: &mut Dev, bound: Duration) -> Result<(), CliError> {
    let mut stop = None;
    let outcome = d
        .run_until(
            tokio::time::Instant::now() + bound,
            &mut stop,
            &mut Discard,
            |v| v.settled(),
        )
        .await?;
    if outcome == Outcome::Done {
        Ok(())
    } else {
        Err(bench_err("device did not settle in time"))
    }
}

/// A fresh key for a new device's store (every value sealed, as the CLI's).
fn sealed() -> Result<Unlock, CliError> {
    Ok(Unlock::Key(StoreKey::generate()?))
}

async fn new_user(
    dir: &std::path::Path,
    name: &str,
    target: &RelayTarget,
) -> Result<Dev, CliError> {
    let cfg = cli_engine_config();
    let storage = FileStorage::open(dir.join(format!("{name}.redb")), &sealed()?)?;
    let (engine, step) = Engine::create(now_ms(), os_seed()?, &target.addr, name, cfg.clone())?;
    let mut d = Driver::new(engine, storage, cfg, target.clone());
    d.start(step, &mut Discard).await?;
    settle(&mut d, Duration::from_secs(20)).await?;
    Ok(d)
}

async fn add_contact(d: &mut Dev, code: ContactCode) -> Result<(), CliError> {
    d.command(Command::AddContact { code }, &mut Discard)
        .await?;
    settle(d, Duration::from_secs(20)).await
}

/// Records whether a device was linked.
struct Linked(Arc<AtomicBool>);

impl Sink<FileStorage> for Linked {
    fn batch(&mut self, b: Batch<'_, FileStorage>) -> Result<(), CliError> {
        if b.events
            .iter()
            .any(|e| matches!(e, Event::DeviceLinked { .. }))
        {
            self.0.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

async fn run() -> Result<(), CliError> {
    let args = parse_args().map_err(|e| CliError::Invalid {
        what: "arguments",
        reason: e,
    })?;
    let tmp = std::env::temp_dir().join(format!("hush-client-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|source| CliError::Io {
        what: "cannot create",
        path: tmp.clone(),
        source,
    })?;
    let result = bench(&args, &tmp).await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

async fn bench(args: &Args, tmp: &std::path::Path) -> Result<(), CliError> {
    let mut config = Config::default_for(tmp.join("relay"));
    config.http = None;
    config.send_rate = 0;
    config.inbox_max_messages = 10_000_000;
    config.inbox_max_bytes = 16 * 1024 * 1024 * 1024;
    // Every simulated device connects and registers from 127.0.0.1.
    config.max_connections_per_ip = config.max_connections;
    config.max_registrations_per_ip_hour = 0;
    config.prekey_fetches_per_device_minute = 0;
    config.prekey_fetches_per_target_minute = 0;
    let relay = RelayHandle::start(config, Arc::new(SystemClock))
        .await
        .map_err(bench_err)?;
    let target = RelayTarget {
        addr: relay.quic_addr().to_string(),
        cert: CertCheck::Pinned(CertCheck::parse_hash(&relay.cert_sha256_hex())?),
        transport: hush_cli::Transport::Quic,
    };

    // bob (first device) and the senders, who all know each other.
    let mut bob = new_user(tmp, "bob", &target).await?;
    let mut bob_code = bob.engine().contact_code();
    bob_code.name = "bob".into();
    let mut senders = Vec::with_capacity(args.senders);
    for i in 0..args.senders {
        let name = format!("sender{i}");
        let mut d = new_user(tmp, &name, &target).await?;
        add_contact(&mut d, bob_code.clone()).await?;
        let mut code = d.engine().contact_code();
        code.name = name;
        add_contact(&mut bob, code).await?;
        senders.push(d);
    }

    // bob links a second device, which receives the contact list, then goes offline.
    let Some(Reply::LinkCode(text)) = bob.command(Command::CreateLinkCode, &mut Discard).await?
    else {
        return Err(bench_err("no link code"));
    };
    let code = LinkCode::parse(&text)?;
    let cfg = cli_engine_config();
    let storage = FileStorage::open(tmp.join("bob2.redb"), &sealed()?)?;
    let (engine, step) = Engine::join(now_ms(), os_seed()?, &code, cfg.clone())?;
    let mut bob2 = Driver::new(engine, storage, cfg, target.clone());
    bob2.start(step, &mut Discard).await?;
    settle(&mut bob2, Duration::from_secs(20)).await?;
    // bob's first device answers the new device's introduction (on a new
    // connection, as its next command would: that fetches the new device list).
    bob.shutdown().await;
    let mut bob = Driver::load(bob.into_storage()?, cli_engine_config(), target.clone())?;
    let flag = Arc::new(AtomicBool::new(false));
    let mut seen = Linked(flag.clone());
    let mut stop = None;
    let by = tokio::time::Instant::now() + Duration::from_secs(20);
    bob.run_until(by, &mut stop, &mut seen, |_| flag.load(Ordering::Relaxed))
        .await?;
    if !flag.load(Ordering::Relaxed) {
        return Err(bench_err("the first device never saw the new device"));
    }
    settle(&mut bob, Duration::from_secs(20)).await?;
    let mut stop = None;
    let linked_by = tokio::time::Instant::now() + Duration::from_secs(20);
    let want = args.senders;
    bob2.run_until(linked_by, &mut stop, &mut Discard, |v| {
        v.engine.contacts().len() == want && v.settled()
    })
    .await?;
    if bob2.engine().contacts().len() != want {
        return Err(bench_err("linked device did not receive the contact list"));
    }
    bob2.shutdown().await;
    bob.shutdown().await;
    let bob2_storage = bob2.into_storage()?;

    // 1. Sender throughput: each sender in turn sends its share to bob
    //    (two devices: one envelope each).
    let per_sender = args.messages / args.senders.max(1);
    let body: String = "x".repeat(args.size.saturating_sub(16));
    let mut total_secs = 0.0;
    let mut sender_ids = Vec::new();
    for (n, d) in senders.into_iter().enumerate() {
        // A fresh connection (as a new process would make) fetches bob's
        // device list, now two devices.
        let mut d = d;
        d.shutdown().await;
        let mut d = Driver::load(d.into_storage()?, cli_engine_config(), target.clone())?;
        settle(&mut d, Duration::from_secs(20)).await?;
        let conversation = d.engine().conversation_with(&bob_code.user);
        let started = Instant::now();
        let label = format!("{n:03}:");
        hush_tests::bench_send::send_all(
            &mut d,
            conversation,
            per_sender,
            &label,
            &body,
            args.window,
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        if n == 0 {
            let devices = d.engine().devices_of(&bob_code.user).len();
            println!(
                "sender: {per_sender} messages × {} B to {devices} device(s) sealed + stored + relay-acked in {secs:.2} s = {:.0} messages/s ({:.0} envelopes/s)",
                args.size,
                per_sender as f64 / secs,
                (per_sender * devices) as f64 / secs
            );
        }
        total_secs += secs;
        sender_ids.push((d.engine().device_id(), d.engine().user_key()));
        d.shutdown().await;
    }
    let total = per_sender * args.senders;
    println!(
        "backlog: {total} messages from {} senders in {total_secs:.1} s sending time ({:.0} messages/s overall)",
        args.senders,
        total as f64 / total_secs
    );

    // 2. Catch-up by the linked device, started as a new process would:
    // load the engine from its store, connect, drain.
    if args.pause > 0 {
        eprintln!(
            "pid {}: pausing {} s before the catch-up",
            std::process::id(),
            args.pause
        );
        tokio::time::sleep(Duration::from_secs(args.pause as u64)).await;
    }
    let host = HostSample::now();
    let started = Instant::now();
    let catch_up_cfg = hush_client::EngineConfig {
        pull_depth: args.pull_depth,
        page_limit: args.page_limit,
        ..cli_engine_config()
    };
    let mut bob2 = Driver::load(bob2_storage, catch_up_cfg, target.clone())?;
    bob2.set_pipelined(args.pipelined);
    let streams: Vec<_> = sender_ids
        .iter()
        .map(|(device, user)| (*device, bob2.engine().conversation_with(user)))
        .collect();
    let goal = per_sender as u64;
    let mut stop = None;
    let outcome = bob2
        .run_until(
            tokio::time::Instant::now() + Duration::from_secs(600),
            &mut stop,
            &mut Discard,
            |v| {
                v.settled()
                    && streams
                        .iter()
                        .all(|(d, c)| v.engine.delivered_through(d, c) >= goal)
            },
        )
        .await?;
    let catch_secs = started.elapsed().as_secs_f64();
    let host = since(host);
    if outcome != Outcome::Done {
        return Err(bench_err("catch-up did not finish"));
    }
    let mut stored = 0usize;
    for (_, c) in &streams {
        stored += hush_client::history(&*bob2.storage(), c, None, per_sender + 1)?.len();
    }
    println!(
        "catch-up: {total} messages × {} B pulled, decrypted, stored and acknowledged by a linked device in {catch_secs:.3} s = {:.0} messages/s ({stored} in history)",
        args.size,
        total as f64 / catch_secs
    );
    let st = bob2.stats();
    println!(
        "catch-up breakdown ({} commits, pull depth {}, pages of up to {}): {} inputs, engine {:.3} s; {} commits ({:.0} KiB each), storage {:.3} s on the commit thread, of which the driver waited {:.3} s; frame writes {:.3} s; rest (network, relay, waiting for frames) {:.3} s",
        if args.pipelined {
            "pipelined"
        } else {
            "serial"
        },
        args.pull_depth,
        args.page_limit,
        st.inputs,
        st.handle.as_secs_f64(),
        st.commits,
        st.bytes as f64 / 1024.0 / st.commits.max(1) as f64,
        st.apply.as_secs_f64(),
        st.commit_wait.as_secs_f64(),
        st.write.as_secs_f64(),
        catch_secs
            - st.handle.as_secs_f64()
            - st.commit_wait.as_secs_f64()
            - st.write.as_secs_f64()
    );
    println!("{host}");
    if stored != total {
        return Err(bench_err(format!(
            "history holds {stored} of {total} messages"
        )));
    }
    bob2.shutdown().await;
    relay.shutdown().await.map_err(bench_err)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("client_bench: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
