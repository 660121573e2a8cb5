//! Group benchmark: one message to a group whose members have two devices
//! each, and its catch-up by a member who was offline, with the native
//! driver of the `hush` CLI against an in-process relay (real QUIC on
//! 127.0.0.1, real encryption).
//!
//! For each group size N (members, the sender included; every member has
//! two devices, so one message is sealed for 2·N − 1 devices):
//!
//! 1. **send** — the sender's device (the CLI's durable redb store) seals
//!    one message of `--size` bytes for every other device of every member
//!    and of the sender, stores it in its outbox, and the relay
//!    acknowledges every envelope ("stored"). Time, and the frame bytes
//!    written to and read from the relay meanwhile.
//! 2. **catch-up** — one member's device (durable store too) that was
//!    offline during the send starts as a new process would (engine loaded
//!    from its store), connects, pulls the message, decrypts, orders, stores
//!    it and acknowledges. Time and frame bytes.
//!
//! Set-up (users, linked second devices, contacts, the group) is not timed.
//! Bytes are encoded frames (`DriverStats`), without QUIC, TLS and UDP
//! overhead.
//!
//! ```text
//! cargo run --release -p hush-tests --bin group_bench -- [--members 10,25,50,100] [--size BYTES] [--rounds R]
//! ```
//!
//! Prints the host's CPU steal and I/O pressure (`/proc/stat`,
//! `/proc/pressure/io`) over each size beside its row.
//!
//! Timed here, never in tests.

use hush_cli::driver::{Discard, Driver, Outcome, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, CliError, RelayTarget};
use hush_client::{
    Command, ContactCode, Engine, FileStorage, LinkCode, MemoryStorage, MessageState, Reply,
    Storage, StoreKey, Unlock,
};
use hush_protocol::ConversationId;
use hush_relay::{Config, RelayHandle, SystemClock};
use hush_tests::host::{HostSample, since};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The relay binary's allocator, so the in-process relay behaves as deployed.
#[global_allocator]
static ALLOC: hush_relay::Allocator = hush_relay::Allocator;

/// Longest any set-up step may take.
const STEP: Duration = Duration::from_secs(60);

struct Args {
    members: Vec<usize>,
    size: usize,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        members: vec![10, 25, 50, 100],
        size: 1024,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--members" => {
                a.members = value
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--members: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
                if a.members.iter().any(|&n| !(2..=100).contains(&n)) {
                    return Err("--members: each size must be 2 to 100".into());
                }
            }
            "--size" => a.size = value.parse().map_err(|e| format!("--size: {e}"))?,
            "--rounds" => {
                a.rounds = value
                    .parse::<usize>()
                    .map_err(|e| format!("--rounds: {e}"))?
                    .max(1)
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn bench_err(e: impl std::fmt::Display) -> CliError {
    CliError::Transport(e.to_string())
}

async fn settle<S: Storage + Send + 'static>(d: &mut Driver<S>) -> Result<(), CliError> {
    let mut stop = None;
    let outcome = d
        .run_until(
            tokio::time::Instant::now() + STEP,
            &mut stop,
            &mut Discard,
            |v| v.settled(),
        )
        .await?;
    if outcome == Outcome::Done {
        Ok(())
    } else {
        Err(bench_err("a device did not settle in time"))
    }
}

/// A new user's first device on `storage`.
async fn new_user<S: Storage + Send + 'static>(
    storage: S,
    name: &str,
    target: &RelayTarget,
) -> Result<Driver<S>, CliError> {
    let cfg = cli_engine_config();
    let (engine, step) = Engine::create(now_ms(), os_seed()?, &target.addr, name, cfg.clone())?;
    let mut d = Driver::new(engine, storage, cfg, target.clone());
    d.start(step, &mut Discard).await?;
    settle(&mut d).await?;
    Ok(d)
}

/// A second device of `first`'s user (it publishes the two-device list).
async fn link(
    first: &mut Driver<impl Storage + Send + 'static>,
    target: &RelayTarget,
) -> Result<Driver<MemoryStorage>, CliError> {
    let Some(Reply::LinkCode(text)) = first.command(Command::CreateLinkCode, &mut Discard).await?
    else {
        return Err(bench_err("no link code"));
    };
    settle(first).await?;
    let code = LinkCode::parse(&text)?;
    let cfg = cli_engine_config();
    let (engine, step) = Engine::join(now_ms(), os_seed()?, &code, cfg.clone())?;
    let mut d = Driver::new(engine, MemoryStorage::new(), cfg, target.clone());
    d.start(step, &mut Discard).await?;
    settle(&mut d).await?;
    Ok(d)
}

async fn add_contact<S: Storage + Send + 'static>(
    d: &mut Driver<S>,
    code: ContactCode,
) -> Result<(), CliError> {
    d.command(Command::AddContact { code }, &mut Discard)
        .await?;
    settle(d).await
}

fn file_store(dir: &std::path::Path, name: &str) -> Result<FileStorage, CliError> {
    Ok(FileStorage::open(
        dir.join(format!("{name}.redb")),
        &Unlock::Key(StoreKey::generate()?),
    )?)
}

/// Reconnect as a new process would: load the engine from the store.
async fn restart(
    d: Driver<FileStorage>,
    target: &RelayTarget,
) -> Result<Driver<FileStorage>, CliError> {
    let mut d = d;
    d.shutdown().await;
    Driver::load(d.into_storage()?, cli_engine_config(), target.clone())
}

struct Sample {
    send_ms: f64,
    send_out: u64,
    send_in: u64,
    catch_ms: f64,
    catch_out: u64,
    catch_in: u64,
}

async fn one_size(n: usize, args: &Args, tmp: &std::path::Path) -> Result<Vec<Sample>, CliError> {
    let dir = tmp.join(format!("n{n}"));
    std::fs::create_dir_all(&dir).map_err(|source| CliError::Io {
        what: "cannot create",
        path: dir.clone(),
        source,
    })?;
    let mut config = Config::default_for(dir.join("relay"));
    config.http = None;
    config.send_rate = 0;
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

    // The sender and the watched member keep the CLI's durable store; the
    // other devices keep theirs in memory (they are not measured).
    let mut sender = new_user(file_store(&dir, "sender")?, "sender", &target).await?;
    let mut sender2 = link(&mut sender, &target).await?;
    sender2.shutdown().await;
    let mut sender_code = sender.engine().contact_code();
    sender_code.name = "sender".into();
    let mut watcher = new_user(file_store(&dir, "watcher")?, "watcher", &target).await?;
    let mut watcher2 = link(&mut watcher, &target).await?;
    watcher2.shutdown().await;
    let mut member_keys = vec![watcher.engine().user_key()];
    let mut code = watcher.engine().contact_code();
    code.name = "watcher".into();
    add_contact(&mut sender, code).await?;
    add_contact(&mut watcher, sender_code.clone()).await?;
    for i in 2..n {
        let name = format!("member{i}");
        let mut first = new_user(MemoryStorage::new(), &name, &target).await?;
        let mut second = link(&mut first, &target).await?;
        second.shutdown().await;
        add_contact(&mut first, sender_code.clone()).await?;
        first.shutdown().await;
        let mut code = first.engine().contact_code();
        code.name = name;
        member_keys.push(code.user);
        add_contact(&mut sender, code).await?;
    }

    let reply = sender
        .command(
            Command::CreateGroup {
                name: format!("bench {n}"),
                members: member_keys,
            },
            &mut Discard,
        )
        .await?;
    let Some(Reply::Group(group)) = reply else {
        return Err(bench_err("no group id"));
    };
    settle(&mut sender).await?;
    // The watcher learns of the group, then goes offline.
    let mut stop = None;
    watcher
        .run_until(
            tokio::time::Instant::now() + STEP,
            &mut stop,
            &mut Discard,
            |v| v.settled() && v.engine.group(&group).is_some(),
        )
        .await?;
    if watcher.engine().group(&group).is_none() {
        return Err(bench_err("the watcher never joined the group"));
    }
    watcher.shutdown().await;
    let mut watcher_storage = Some(watcher.into_storage()?);
    let mut sender = restart(sender, &target).await?;
    settle(&mut sender).await?;

    let body = "x".repeat(args.size);
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        // 1. Send: sealed for every other device, stored, relay-acked.
        let before = sender.stats();
        let started = Instant::now();
        let reply = sender
            .command(
                Command::SendText {
                    conversation: group,
                    text: format!("{round:03}{}", &body[3.min(body.len())..]),
                },
                &mut Discard,
            )
            .await?;
        let Some(Reply::Message(id)) = reply else {
            return Err(bench_err("no message id"));
        };
        let mut stop = None;
        sender
            .run_until(
                tokio::time::Instant::now() + STEP,
                &mut stop,
                &mut Discard,
                |v| {
                    matches!(
                        v.engine.message_state(&id),
                        Some(MessageState::Stored | MessageState::Delivered | MessageState::Read)
                    ) && v.outstanding == 0
                },
            )
            .await?;
        let send_ms = started.elapsed().as_secs_f64() * 1000.0;
        let after = sender.stats();
        if !matches!(
            sender.engine().message_state(&id),
            Some(MessageState::Stored | MessageState::Delivered | MessageState::Read)
        ) {
            return Err(bench_err("the relay did not store the message"));
        }

        // 2. Catch-up by the offline member, as a new process.
        let storage = watcher_storage
            .take()
            .ok_or_else(|| bench_err("no watcher store"))?;
        let had = history_len(&storage, &group)?;
        let started = Instant::now();
        let mut w = Driver::load(storage, cli_engine_config(), target.clone())?;
        let mut stop = None;
        w.run_until(
            tokio::time::Instant::now() + STEP,
            &mut stop,
            &mut Discard,
            |v| v.settled(),
        )
        .await?;
        let catch_ms = started.elapsed().as_secs_f64() * 1000.0;
        let ws = w.stats();
        w.shutdown().await;
        let storage = w.into_storage()?;
        let has = history_len(&storage, &group)?;
        if has != had + 1 {
            return Err(bench_err(format!(
                "the watcher's history went from {had} to {has} messages, not one more"
            )));
        }
        watcher_storage = Some(storage);
        samples.push(Sample {
            send_ms,
            send_out: after.sent_bytes - before.sent_bytes,
            send_in: after.received_bytes - before.received_bytes,
            catch_ms,
            catch_out: ws.sent_bytes,
            catch_in: ws.received_bytes,
        });
        // The sender takes in the receipts before the next round.
        settle(&mut sender).await?;
    }
    sender.shutdown().await;
    relay.shutdown().await.map_err(bench_err)?;
    Ok(samples)
}

fn history_len(storage: &FileStorage, group: &ConversationId) -> Result<usize, CliError> {
    Ok(hush_client::history(storage, group, None, 100_000)?.len())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn run() -> Result<(), CliError> {
    let args = parse_args().map_err(|e| CliError::Invalid {
        what: "arguments",
        reason: e,
    })?;
    let tmp = std::env::temp_dir().join(format!("hush-group-bench-{}", std::process::id()));
    let result = async {
        println!(
            "one {} B message to a group, every member with 2 devices; median of {} round(s); bytes are encoded frames",
            args.size, args.rounds
        );
        println!(
            "{:>7} {:>8} {:>10} {:>12} {:>11} {:>13} {:>12} {:>11}",
            "members", "devices", "send ms", "send out B", "send in B", "catch-up ms", "catch out B", "catch in B"
        );
        for &n in &args.members {
            let host = HostSample::now();
            let s = one_size(n, &args, &tmp).await?;
            let host = since(host);
            let med = |f: &dyn Fn(&Sample) -> f64| median(s.iter().map(f).collect());
            println!(
                "{:>7} {:>8} {:>10.1} {:>12.0} {:>11.0} {:>13.1} {:>12.0} {:>11.0}",
                n,
                2 * n - 1,
                med(&|x| x.send_ms),
                med(&|x| x.send_out as f64),
                med(&|x| x.send_in as f64),
                med(&|x| x.catch_ms),
                med(&|x| x.catch_out as f64),
                med(&|x| x.catch_in as f64),
            );
            println!("{:>7}   {host} (over this size's set-up and rounds)", "");
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("group_bench: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("group_bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
