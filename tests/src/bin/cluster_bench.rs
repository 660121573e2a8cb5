//! `cluster_bench`: the relay benchmark's jobs on every kind of deployment,
//! in one run.
//!
//! ```text
//! cargo run --release -p hush-tests --bin cluster_bench [-- --quick] [--setups LIST]
//! cargo xtask bench --cluster [-- ARGS]
//! ```
//!
//! Setups (`--setups redb,pg,pg-sync,two-nodes`, all by default):
//!
//! - `redb`: one in-process relay on the redb store (durable commits);
//! - `pg`: one relay on a PostgreSQL primary without a standby
//!   (`--allow-unreplicated`);
//! - `pg-sync`: one relay on a PostgreSQL primary whose every commit waits
//!   for a synchronous streaming standby;
//! - `two-nodes`: two relays (each with its own cluster bus) on one primary
//!   with a synchronous standby; clients spread over both.
//!
//! PostgreSQL servers are private throwaway clusters on loopback
//! (`hush_tests::pg`) with `fsync = on` and `full_page_writes = on`, as
//! deployed. Jobs, as in `relay_bench`: durable ingest of 1 KiB envelopes
//! from 64 pipelined senders; ack latency of single-envelope sends at
//! 10,000/s and at 5,000/s offered (p50/p99/p99.9/max); one device pulling
//! 100,000 stored envelopes with merged acks (pages of 200, one in flight,
//! then three in flight as the client syncs). Beside each result: the
//! relay's mean commit batch and commit duration (timed around the store's
//! commit), CPU steal and iowait from `/proc/stat`, and CPU and I/O pressure
//! from `/proc/pressure`. Numbers go into BENCHMARKS.md ("## Cluster").

use hush_protocol::{
    ClientFrame, DeviceId, Envelope, MessageId, Request, Response, SendOutcome, ServerFrame,
    encode_client_frame,
};
use hush_relay::store::StoreSpec;
use hush_relay::{Config, RelayHandle, SystemClock};
use hush_tests::host::HostSample;
use hush_tests::pg::PgCluster;
use hush_tests::{DeviceIdentity, RelayTarget, TestDevice, conversation, make_envelope_sized};
use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The relay binary's allocator, so the in-process relays behave as deployed.
#[global_allocator]
static ALLOC: hush_relay::Allocator = hush_relay::Allocator;

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Size of every benchmark envelope, encoded.
const ENVELOPE_LEN: usize = 1024;
/// Envelopes per `Send` in the ingest and preload phases (the protocol maximum).
const BATCH: usize = 32;
/// `Send`s each ingest connection keeps in flight.
const WINDOW: usize = 4;
/// Inboxes the ingest phase spreads envelopes over.
const INGEST_RECIPIENTS: usize = 16;
/// Connections carrying the latency phase's load.
const LATENCY_CONNECTIONS: usize = 16;
/// Pull page size.
const PAGE: u16 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Redb,
    Pg,
    PgSync,
    TwoNodes,
}

impl Setup {
    fn parse(s: &str) -> BenchResult<Setup> {
        Ok(match s {
            "redb" => Setup::Redb,
            "pg" => Setup::Pg,
            "pg-sync" => Setup::PgSync,
            "two-nodes" => Setup::TwoNodes,
            other => return Err(format!("unknown setup {other}").into()),
        })
    }

    fn describe(self) -> &'static str {
        match self {
            Setup::Redb => "redb, one node",
            Setup::Pg => "PostgreSQL without a standby, one node",
            Setup::PgSync => "PostgreSQL with a synchronous standby, one node",
            Setup::TwoNodes => "PostgreSQL with a synchronous standby, two relay nodes",
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    setups: Vec<Setup>,
    senders: usize,
    ingest: Duration,
    latency_rates: Vec<u64>,
    latency: Duration,
    pull_count: u64,
}

impl Args {
    fn parse() -> BenchResult<Args> {
        let mut args = Args {
            setups: vec![Setup::Redb, Setup::Pg, Setup::PgSync, Setup::TwoNodes],
            senders: 64,
            ingest: Duration::from_secs(8),
            latency_rates: vec![10_000, 5_000],
            latency: Duration::from_secs(5),
            pull_count: 100_000,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--quick" => {
                    args.ingest = Duration::from_secs(2);
                    args.latency = Duration::from_secs(2);
                    args.pull_count = 10_000;
                }
                "--setups" => {
                    args.setups = value()?
                        .split(',')
                        .map(Setup::parse)
                        .collect::<BenchResult<_>>()?;
                }
                "--senders" => args.senders = value()?.parse()?,
                "--ingest-secs" => args.ingest = Duration::from_secs_f64(value()?.parse()?),
                "--latency-rates" => {
                    args.latency_rates = value()?
                        .split(',')
                        .map(|r| r.parse::<u64>())
                        .collect::<Result<_, _>>()?;
                }
                "--latency-secs" => args.latency = Duration::from_secs_f64(value()?.parse()?),
                "--pull-count" => args.pull_count = value()?.parse()?,
                "-h" | "--help" => {
                    println!(
                        "cluster_bench [--quick] [--setups redb,pg,pg-sync,two-nodes] \
                         [--senders N] [--ingest-secs S] [--latency-rates N,N] \
                         [--latency-secs S] [--pull-count N]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other}").into()),
            }
        }
        Ok(args)
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Microseconds some task stalled on the CPU (`/proc/pressure/cpu`, "some").
fn cpu_stall_us() -> Option<u64> {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// The host's load over one measurement.
struct HostMark {
    sample: Option<HostSample>,
    cpu_stall: Option<u64>,
    at: Instant,
}

impl HostMark {
    fn now() -> HostMark {
        HostMark {
            sample: HostSample::now(),
            cpu_stall: cpu_stall_us(),
            at: Instant::now(),
        }
    }

    fn report(&self) -> String {
        let base = match (self.sample, HostSample::now()) {
            (Some(a), Some(b)) => a.until(&b),
            _ => "host: counters unavailable".into(),
        };
        let wall = self.at.elapsed().as_micros().max(1) as f64;
        match (self.cpu_stall, cpu_stall_us()) {
            (Some(a), Some(b)) => format!(
                "{base}, CPU pressure {:.0}%",
                100.0 * b.saturating_sub(a) as f64 / wall
            ),
            _ => base,
        }
    }
}

/// A running deployment: its relays and their databases.
struct Deployment {
    relays: Vec<RelayHandle>,
    targets: Vec<RelayTarget>,
}

impl Deployment {
    async fn shutdown(self) -> BenchResult<()> {
        for r in self.relays {
            r.shutdown().await?;
        }
        Ok(())
    }

    /// Commits so far over all nodes: (count, batch sum, seconds sum).
    fn commits(&self) -> (u64, f64, f64) {
        self.relays.iter().fold((0, 0.0, 0.0), |(c, b, t), r| {
            let m = r.metrics();
            (
                c + m.commit_batch_size.count(),
                b + m.commit_batch_size.sum(),
                t + m.commit_latency_seconds.sum(),
            )
        })
    }

    fn commit_line(&self, before: (u64, f64, f64)) -> String {
        let now = self.commits();
        let commits = now.0 - before.0;
        let batch = (now.1 - before.1) / commits.max(1) as f64;
        let ms = (now.2 - before.2) * 1000.0 / commits.max(1) as f64;
        format!(
            "{commits} commits, mean batch {batch:.1} envelopes, mean commit {ms:.2} ms \
             ({:.1} µs/envelope)",
            ms * 1000.0 / batch.max(1.0)
        )
    }
}

/// Per setup: the PostgreSQL cluster (if any) kept for all its phases.
struct SetupState {
    setup: Setup,
    pg: Option<PgCluster>,
    root: PathBuf,
    phases: u32,
}

impl SetupState {
    fn new(setup: Setup, root: &Path) -> BenchResult<SetupState> {
        let pg = match setup {
            Setup::Redb => None,
            Setup::Pg => Some(PgCluster::start_durable(false)?),
            Setup::PgSync | Setup::TwoNodes => Some(PgCluster::start_durable(true)?),
        };
        Ok(SetupState {
            setup,
            pg,
            root: root.to_path_buf(),
            phases: 0,
        })
    }

    /// Fresh relays (and a fresh database) for one phase.
    async fn deploy(&mut self) -> BenchResult<Deployment> {
        self.phases += 1;
        let dir = self.root.join(format!("{:?}-{}", self.setup, self.phases));
        let store = match &self.pg {
            None => Vec::new(),
            Some(pg) => vec![StoreSpec::Postgres(pg.url(&pg.create_database()?))],
        };
        let nodes = if self.setup == Setup::TwoNodes { 2 } else { 1 };
        let mut relays = Vec::new();
        let mut targets = Vec::new();
        for n in 0..nodes {
            let mut config = Config::default_for(dir.join(format!("node{n}")));
            config.store = store.clone();
            config.allow_unreplicated = self.setup == Setup::Pg;
            config.send_rate = 0;
            config.http = None;
            config.inbox_max_messages = 100_000_000;
            config.inbox_max_bytes = 1 << 40;
            config.max_connections_per_ip = config.max_connections;
            config.max_registrations_per_ip_hour = 0;
            config.prekey_fetches_per_device_minute = 0;
            config.prekey_fetches_per_target_minute = 0;
            let relay = RelayHandle::start(config, Arc::new(SystemClock)).await?;
            targets.push(RelayTarget::from_cert_der(
                relay.quic_addr(),
                &relay.cert_der(),
            ));
            relays.push(relay);
        }
        Ok(Deployment { relays, targets })
    }
}

async fn run() -> BenchResult<()> {
    let args = Args::parse()?;
    let temp = tempfile::Builder::new().prefix("cluster-bench").tempdir()?;
    println!(
        "cluster_bench: {} cores; data under {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        temp.path().display()
    );
    for setup in &args.setups {
        println!("\n## {}", setup.describe());
        let mut state = SetupState::new(*setup, temp.path())?;

        let host = HostMark::now();
        let d = state.deploy().await?;
        let before = d.commits();
        let (stored, secs) = ingest_phase(&d, &args).await?;
        println!(
            "ingest: {:.0} envelopes/s ({stored} in {secs:.2} s, {} senders); {}",
            stored as f64 / secs,
            args.senders,
            d.commit_line(before)
        );
        d.shutdown().await?;
        println!("  {}", host.report());

        for rate in &args.latency_rates {
            let host = HostMark::now();
            let d = state.deploy().await?;
            let (lat, before) = latency_phase(&d, &args, *rate).await?;
            println!(
                "latency at {rate}/s: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms \
                 over {} sends (achieved {:.0}/s{}); {}",
                lat.p50_ms,
                lat.p99_ms,
                lat.p999_ms,
                lat.max_ms,
                lat.samples,
                lat.achieved_rate,
                if lat.unanswered > 0 {
                    format!(", {} unanswered", lat.unanswered)
                } else {
                    String::new()
                },
                d.commit_line(before)
            );
            d.shutdown().await?;
            println!("  {}", host.report());
        }

        let host = HostMark::now();
        let d = state.deploy().await?;
        let pull = pull_phase(&d, &args).await?;
        println!(
            "pull of {} with merged acks: {:.0} envelopes/s one page in flight ({:.2} s), \
             {:.0} envelopes/s three in flight ({:.2} s); preload {:.0} envelopes/s",
            pull.count,
            pull.count as f64 / pull.ack_secs,
            pull.ack_secs,
            pull.count as f64 / pull.pipelined_secs,
            pull.pipelined_secs,
            pull.count as f64 / pull.preload_secs
        );
        d.shutdown().await?;
        println!("  {}", host.report());
    }
    Ok(())
}

async fn register_all(
    targets: &[RelayTarget],
    ids: &[DeviceIdentity],
) -> BenchResult<Vec<TestDevice>> {
    let mut out = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        out.push(TestDevice::register_new(id, targets[i % targets.len()]).await?);
    }
    Ok(out)
}

/// Makes 1 KiB envelopes for one sender cheaply: one template, fresh ids.
struct EnvelopeFactory {
    template: Envelope,
    sender_index: u16,
    counter: u64,
    seqs: HashMap<DeviceId, u64>,
}

impl EnvelopeFactory {
    fn new(sender: &DeviceIdentity, sender_index: u16) -> Self {
        let template = make_envelope_sized(
            sender.device(),
            sender.device(),
            conversation(u64::from(sender_index)),
            0,
            ENVELOPE_LEN,
            0x3c,
        );
        EnvelopeFactory {
            template,
            sender_index,
            counter: 0,
            seqs: HashMap::new(),
        }
    }

    fn make(&mut self, recipient: DeviceId) -> Envelope {
        self.counter += 1;
        let seq = self.seqs.entry(recipient).or_insert(0);
        *seq += 1;
        let mut random = [0u8; 10];
        random[..2].copy_from_slice(&self.sender_index.to_be_bytes());
        random[2..].copy_from_slice(&self.counter.to_be_bytes());
        let mut e = self.template.clone();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        e.header.sent_at_ms = now_ms;
        e.header.message_id = MessageId::new(now_ms, random);
        e.header.recipient_device = recipient;
        e.header.sender_seq = *seq;
        e
    }
}

fn count_stored(outcomes: &[SendOutcome]) -> BenchResult<u64> {
    let mut n = 0;
    for o in outcomes {
        match o {
            SendOutcome::Stored { .. } => n += 1,
            SendOutcome::Refused { error, .. } => return Err(format!("refused: {error}").into()),
        }
    }
    Ok(n)
}

/// One sender keeping `WINDOW` batches in flight until `deadline` or until
/// `budget` envelopes were sent; returns how many were stored.
async fn pipelined_sender(
    dev: TestDevice,
    mut factory: EnvelopeFactory,
    recipients: Vec<DeviceId>,
    deadline: Option<Instant>,
    mut budget: u64,
) -> BenchResult<u64> {
    let (mut writer, mut reader, _conn, _endpoint) = dev.into_split();
    let mut inflight = 0usize;
    let mut stored = 0u64;
    let mut next_recipient = 0usize;
    loop {
        while inflight < WINDOW && budget > 0 && deadline.is_none_or(|d| Instant::now() < d) {
            let n = budget.min(BATCH as u64) as usize;
            let mut envelopes = Vec::with_capacity(n);
            for _ in 0..n {
                let r = recipients[next_recipient % recipients.len()];
                next_recipient += 1;
                envelopes.push(factory.make(r));
            }
            budget -= n as u64;
            writer.write_request(Request::Send { envelopes }).await?;
            inflight += 1;
        }
        if inflight == 0 {
            return Ok(stored);
        }
        match reader.next_frame().await? {
            ServerFrame::Response {
                response: Response::Sent { outcomes },
                ..
            } => {
                stored += count_stored(&outcomes)?;
                inflight -= 1;
            }
            ServerFrame::Push { .. } => {}
            other => return Err(format!("unexpected frame {other:?}").into()),
        }
    }
}

/// Durable ingest from `args.senders` pipelined senders (spread over the
/// nodes) into 16 inboxes: (stored, seconds).
async fn ingest_phase(d: &Deployment, args: &Args) -> BenchResult<(u64, f64)> {
    let recipient_ids: Vec<_> = (0..INGEST_RECIPIENTS)
        .map(|i| DeviceIdentity::from_seed(10_000 + i as u64))
        .collect();
    for dev in register_all(&d.targets, &recipient_ids).await? {
        dev.close();
    }
    let recipients: Vec<DeviceId> = recipient_ids.iter().map(DeviceIdentity::device).collect();
    let sender_ids: Vec<_> = (0..args.senders)
        .map(|i| DeviceIdentity::from_seed(20_000 + i as u64))
        .collect();
    let senders = register_all(&d.targets, &sender_ids).await?;
    let start = Instant::now();
    let deadline = start + args.ingest;
    let mut tasks = Vec::new();
    for (i, (dev, id)) in senders.into_iter().zip(&sender_ids).enumerate() {
        let mut rs = recipients.clone();
        rs.rotate_left(i % INGEST_RECIPIENTS);
        let factory = EnvelopeFactory::new(id, i as u16);
        tasks.push(tokio::spawn(pipelined_sender(
            dev,
            factory,
            rs,
            Some(deadline),
            u64::MAX,
        )));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await??;
    }
    Ok((stored, start.elapsed().as_secs_f64()))
}

struct LatencyStats {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    samples: usize,
    achieved_rate: f64,
    unanswered: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Ack latency (request written → `Sent` decoded) of single-envelope sends
/// at `rate`/s offered over 16 connections (spread over the nodes) to one
/// recipient, after a 0.5 s warm-up. Returns the stats and the commit
/// counters at the end of the warm-up.
async fn latency_phase(
    d: &Deployment,
    args: &Args,
    rate: u64,
) -> BenchResult<(LatencyStats, (u64, f64, f64))> {
    let recipient = DeviceIdentity::from_seed(30_000);
    register_all(&d.targets, std::slice::from_ref(&recipient)).await?;
    let ids: Vec<_> = (0..LATENCY_CONNECTIONS)
        .map(|i| DeviceIdentity::from_seed(31_000 + i as u64))
        .collect();
    let devices = register_all(&d.targets, &ids).await?;
    let warmup = Duration::from_millis(500);
    let total = warmup + args.latency;

    let samples: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    let mut factories = Vec::new();
    let mut readers = Vec::new();
    let mut keep = Vec::new();
    let bench_start = Instant::now();
    for (i, (dev, id)) in devices.into_iter().zip(&ids).enumerate() {
        let (writer, mut reader, conn, endpoint) = dev.into_split();
        keep.push((conn, endpoint));
        let started: Arc<Mutex<HashMap<u32, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
        writers.push((writer, Arc::clone(&started), 0u32));
        factories.push(EnvelopeFactory::new(id, i as u16));
        let samples = Arc::clone(&samples);
        let answered = Arc::clone(&answered);
        readers.push(tokio::spawn(async move {
            loop {
                let Ok(frame) = reader.next_frame().await else {
                    return;
                };
                let now = Instant::now();
                if let ServerFrame::Response { request_id, .. } = frame {
                    let t0 = started
                        .lock()
                        .map(|mut m| m.remove(&request_id))
                        .unwrap_or(None);
                    if let Some(t0) = t0 {
                        answered.fetch_add(1, Ordering::Relaxed);
                        if t0.duration_since(bench_start) >= warmup
                            && let Ok(mut s) = samples.lock()
                        {
                            s.push(now - t0);
                        }
                    }
                }
            }
        }));
    }

    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut measured_sent = 0u64;
    let mut mark = None;
    let recipient_id = recipient.device();
    loop {
        ticker.tick().await;
        let elapsed = bench_start.elapsed();
        if elapsed >= total {
            break;
        }
        if mark.is_none() && elapsed >= warmup {
            mark = Some(d.commits());
        }
        let due = (elapsed.as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let c = (sent as usize) % LATENCY_CONNECTIONS;
            let (writer, started, next_id) = &mut writers[c];
            *next_id += 1;
            let frame = encode_client_frame(&ClientFrame {
                request_id: *next_id,
                request: Request::Send {
                    envelopes: vec![factories[c].make(recipient_id)],
                },
            })?;
            if let Ok(mut m) = started.lock() {
                m.insert(*next_id, Instant::now());
            }
            writer.write_raw(&frame).await?;
            sent += 1;
            if mark.is_some() {
                measured_sent += 1;
            }
        }
    }
    let mark = mark.unwrap_or_else(|| d.commits());
    // Let the last answers arrive (bounded).
    let _ = hush_tests::wait_until(Duration::from_secs(10), "last answers", || {
        answered.load(Ordering::Relaxed) >= sent
    })
    .await;
    for r in readers {
        r.abort();
    }
    drop(writers);
    drop(keep);
    let mut s = samples.lock().map(|s| s.clone()).unwrap_or_default();
    s.sort();
    Ok((
        LatencyStats {
            p50_ms: percentile(&s, 0.50),
            p99_ms: percentile(&s, 0.99),
            p999_ms: percentile(&s, 0.999),
            max_ms: s.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            samples: s.len(),
            achieved_rate: measured_sent as f64 / args.latency.as_secs_f64(),
            unanswered: measured_sent.saturating_sub(s.len() as u64),
        },
        mark,
    ))
}

struct PullStats {
    count: u64,
    preload_secs: f64,
    ack_secs: f64,
    pipelined_secs: f64,
}

/// Store `args.pull_count` envelopes for `reader` from `senders`; returns
/// how many were stored.
async fn preload(
    senders: Vec<TestDevice>,
    sender_ids: &[DeviceIdentity],
    reader: DeviceId,
    args: &Args,
) -> BenchResult<u64> {
    let per = args.pull_count / args.senders as u64;
    let extra = args.pull_count % args.senders as u64;
    let mut tasks = Vec::new();
    for (i, (dev, id)) in senders.into_iter().zip(sender_ids).enumerate() {
        let budget = per + u64::from((i as u64) < extra);
        let factory = EnvelopeFactory::new(id, i as u16);
        tasks.push(tokio::spawn(pipelined_sender(
            dev,
            factory,
            vec![reader],
            None,
            budget,
        )));
    }
    let mut stored = 0;
    for t in tasks {
        stored += t.await??;
    }
    Ok(stored)
}

/// One device (on the last node) pulls what senders (spread over the nodes)
/// stored for it, with merged acks: one page in flight, then (refilled)
/// three in flight.
async fn pull_phase(d: &Deployment, args: &Args) -> BenchResult<PullStats> {
    let reader_id = DeviceIdentity::from_seed(40_000);
    let reader_target = d.targets[d.targets.len() - 1];
    TestDevice::register_new(&reader_id, reader_target)
        .await?
        .close();
    let sender_ids: Vec<_> = (0..args.senders)
        .map(|i| DeviceIdentity::from_seed(41_000 + i as u64))
        .collect();
    let senders = register_all(&d.targets, &sender_ids).await?;
    let start = Instant::now();
    let stored = preload(senders, &sender_ids, reader_id.device(), args).await?;
    let preload_secs = start.elapsed().as_secs_f64();
    if stored != args.pull_count {
        return Err(format!("preloaded {stored} of {}", args.pull_count).into());
    }

    let mut dev = TestDevice::login(&reader_id, reader_target).await?;
    let start = Instant::now();
    let mut after = 0;
    let mut got = 0u64;
    loop {
        let page = dev.pull(after, PAGE, after).await?;
        got += page.envelopes.len() as u64;
        match page.envelopes.last() {
            Some(last) => after = last.seq,
            None => break,
        }
    }
    let ack_secs = start.elapsed().as_secs_f64();
    if got != stored {
        return Err(format!("acking pull got {got} of {stored}").into());
    }
    dev.close();

    let mut senders = Vec::with_capacity(sender_ids.len());
    for (i, id) in sender_ids.iter().enumerate() {
        senders.push(TestDevice::login(id, d.targets[i % d.targets.len()]).await?);
    }
    let refilled = preload(senders, &sender_ids, reader_id.device(), args).await?;
    let mut dev = TestDevice::login(&reader_id, reader_target).await?;
    let start = Instant::now();
    let got = pipelined_drain(&mut dev, after, 3).await?;
    let pipelined_secs = start.elapsed().as_secs_f64();
    if got != refilled {
        return Err(format!("pipelined pull got {got} of {refilled}").into());
    }
    dev.close();
    Ok(PullStats {
        count: stored,
        preload_secs,
        ack_secs,
        pipelined_secs,
    })
}

/// Drain the inbox after `after` with `depth` merged-ack pulls in flight;
/// returns the envelopes received. Fails if a page is not the contiguous
/// continuation.
async fn pipelined_drain(dev: &mut TestDevice, mut after: u64, depth: usize) -> BenchResult<u64> {
    let mut in_flight: std::collections::VecDeque<(u32, u64)> = Default::default();
    let id = dev
        .write_request(Request::Pull {
            after,
            limit: PAGE,
            ack: after,
        })
        .await?;
    in_flight.push_back((id, after));
    let mut frontier = after + u64::from(PAGE);
    let mut got = 0u64;
    while let Some((want, asked)) = in_flight.pop_front() {
        let page = loop {
            match dev.next_frame(Duration::from_secs(30)).await? {
                ServerFrame::Response {
                    request_id,
                    response: Response::Page(page),
                } if request_id == want => break page,
                // A push of what arrived while the reader logged in.
                ServerFrame::Push { .. } => {}
                _ => return Err("unexpected frame during a pull".into()),
            }
        };
        if asked != after {
            return Err(format!("page for {asked} arrived at cursor {after}").into());
        }
        for e in &page.envelopes {
            if e.seq != after + 1 {
                return Err(format!("seq {} after {after}", e.seq).into());
            }
            after = e.seq;
        }
        got += page.envelopes.len() as u64;
        let end = after + page.remaining;
        while in_flight.len() < depth && frontier < end {
            let id = dev
                .write_request(Request::Pull {
                    after: frontier,
                    limit: PAGE,
                    ack: after,
                })
                .await?;
            in_flight.push_back((id, frontier));
            frontier += u64::from(PAGE);
        }
    }
    Ok(got)
}
