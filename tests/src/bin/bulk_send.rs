//! Bulk sender for the browser catch-up benchmark (`web-demo/bench/catchup.mjs`).
//!
//! K fresh users (the native driver of the `hush` CLI, in-memory store) on a
//! running relay send N texts of a given size in total (N / K each, one
//! sender after the other) to one contact as fast as the relay stores them,
//! with a bounded window of unconfirmed messages. Several senders, because a
//! sender's engine slows down as its own history grows (one sender of
//! 100,000 is far slower than ten of 10,000).
//!
//! It talks to the benchmark script over stdio, because both sides must know
//! each other before the burst:
//!
//! 1. prints `code <hush-contact:…>` for each sender (its contact code);
//! 2. reads one line from stdin: the recipient's contact code;
//! 3. each sender adds the recipient and sends its share; prints `stored <N> <seconds>` once the
//!    relay has stored every message, then exits.
//!
//! ```text
//! cargo run --release -p hush-tests --bin bulk_send -- --relay HOST:PORT --cert-hash HEX [--messages N] [--senders K] [--size BYTES] [--window W]
//! ```

use hush_cli::driver::{Discard, Driver, Outcome, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, CliError, RelayTarget};
use hush_client::{Command, ContactCode, Engine, MemoryStorage};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

type Dev = Driver<MemoryStorage>;

struct Args {
    relay: String,
    cert_hash: String,
    messages: usize,
    size: usize,
    window: usize,
    senders: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        relay: String::new(),
        cert_hash: String::new(),
        messages: 100_000,
        size: 1024,
        window: 256,
        senders: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut text = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--relay" => a.relay = text("--relay")?,
            "--cert-hash" => a.cert_hash = text("--cert-hash")?,
            "--messages" => a.messages = number(&text("--messages")?)?,
            "--size" => a.size = number(&text("--size")?)?,
            "--window" => a.window = number(&text("--window")?)?.max(1),
            "--senders" => a.senders = number(&text("--senders")?)?.max(1),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.relay.is_empty() || a.cert_hash.is_empty() {
        return Err("--relay and --cert-hash are required".into());
    }
    Ok(a)
}

fn number(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("not a number: {s}"))
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
        Err(bench_err("sender did not settle in time"))
    }
}

fn say(line: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(bench_err)
}

async fn run() -> Result<(), CliError> {
    let args = parse_args().map_err(|e| CliError::Invalid {
        what: "arguments",
        reason: e,
    })?;
    let target = RelayTarget {
        addr: args.relay.clone(),
        cert: CertCheck::Pinned(CertCheck::parse_hash(&args.cert_hash)?),
        transport: hush_cli::Transport::Quic,
    };
    let mut devices = Vec::with_capacity(args.senders);
    for i in 0..args.senders {
        let cfg = cli_engine_config();
        let name = format!("sender{i}");
        let (engine, step) =
            Engine::create(now_ms(), os_seed()?, &target.addr, &name, cfg.clone())?;
        let mut d = Driver::new(engine, MemoryStorage::new(), cfg, target.clone());
        d.start(step, &mut Discard).await?;
        settle(&mut d, Duration::from_secs(20)).await?;
        let mut own = d.engine().contact_code();
        own.name = name;
        say(&format!("code {}", own.to_text()?))?;
        devices.push(d);
    }

    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(bench_err)?;
    let code = ContactCode::parse(line.trim())?;
    let user = code.user;
    let body = "x".repeat(args.size.saturating_sub(10));
    let share = args.messages / args.senders;
    let started = Instant::now();
    for (i, mut d) in devices.into_iter().enumerate() {
        d.command(Command::AddContact { code: code.clone() }, &mut Discard)
            .await?;
        settle(&mut d, Duration::from_secs(20)).await?;
        let conversation = d.engine().conversation_with(&user);
        let count = if i + 1 == args.senders {
            args.messages - share * i
        } else {
            share
        };
        hush_tests::bench_send::send_all(&mut d, conversation, count, "", &body, args.window)
            .await?;
        d.shutdown().await;
    }
    let secs = started.elapsed().as_secs_f64();
    say(&format!("stored {} {secs:.3}", args.messages))?;
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
            eprintln!("bulk_send: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulk_send: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
