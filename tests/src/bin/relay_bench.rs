//! `relay_bench`: throughput and latency of the Hush relay on this machine.
//!
//! ```text
//! cargo run --release -p hush-tests --bin relay_bench [-- --quick] [--dir DIR]
//! ```
//!
//! Everything runs in one process on 127.0.0.1: an in-process relay
//! (`RelayHandle`, real redb store with durable commits, real QUIC) and the
//! clients that load it, so relay and clients share the machine's cores. It
//! prints, in one run:
//!
//! 1. the machine's raw limits: fsyncs/s (1 KiB write + `sync_data` in a loop)
//!    and plain redb inserts/s of 1 KiB values at several batch sizes per
//!    durable transaction, in the same filesystem as the relay's data;
//! 2. durable ingest of 1 KiB envelopes from 64 concurrent senders (each
//!    keeping a few 32-envelope `Send`s in flight; every ack comes after the
//!    group commit's fsync): envelopes/s and mean envelopes per commit;
//! 3. ack latency (request written → `Sent` decoded) at a fixed offered load
//!    of single-envelope sends (default 10,000/s), p50/p99/p99.9/max;
//! 4. one device pulling 100,000 stored envelopes in pages of 200, read-only
//!    and then with merged acknowledgements (each pull deletes the previous
//!    page): envelopes/s;
//! 5. (`--phases store`, not run by default) the store alone, no network:
//!    `RedbStore::commit` of 4096-envelope batches (the ingest phase's group
//!    size), of 16-envelope batches spread over 16 inboxes, and of
//!    8-envelope batches into one inbox (the latency phase's shape), with the
//!    distribution of the durable commit's duration and the committing
//!    thread's CPU time per envelope (envelope bodies go to the store's
//!    segment files, the index to redb); then reading everything back with
//!    `pull` in pages of 200.
//!
//! Numbers, targets and the command go into BENCHMARKS.md ("## Relay").

use hush_protocol::{
    ClientFrame, DeviceId, Envelope, MessageId, Request, Response, SendOutcome, ServerFrame,
    encode_client_frame,
};
use hush_relay::{Config, RelayHandle, SystemClock};
use hush_tests::host::{HostSample, ThreadTimes, since, this_thread_cpu_ns};
use hush_tests::{DeviceIdentity, RelayTarget, TestDevice, conversation, make_envelope_sized};
use std::collections::HashMap;
use std::error::Error;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The relay binary's allocator, so the in-process relay behaves as deployed.
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

#[derive(Debug, Clone)]
struct Args {
    dir: Option<PathBuf>,
    senders: usize,
    ingest: Duration,
    latency_rate: u64,
    latency: Duration,
    pull_count: u64,
    fsync_probe: Duration,
    redb_values: usize,
    phases: Vec<String>,
}

impl Args {
    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }

    fn parse() -> BenchResult<Args> {
        let mut args = Args {
            dir: None,
            senders: 64,
            ingest: Duration::from_secs(10),
            latency_rate: 10_000,
            latency: Duration::from_secs(10),
            pull_count: 100_000,
            fsync_probe: Duration::from_secs(3),
            redb_values: 20_000,
            phases: ["raw", "ingest", "latency", "pull"]
                .map(String::from)
                .to_vec(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--quick" => {
                    args.ingest = Duration::from_secs(2);
                    args.latency = Duration::from_secs(2);
                    args.pull_count = 10_000;
                    args.fsync_probe = Duration::from_millis(500);
                    args.redb_values = 4_000;
                }
                "--dir" => args.dir = Some(PathBuf::from(value()?)),
                "--senders" => args.senders = value()?.parse()?,
                "--ingest-secs" => args.ingest = Duration::from_secs_f64(value()?.parse()?),
                "--latency-rate" => args.latency_rate = value()?.parse()?,
                "--latency-secs" => args.latency = Duration::from_secs_f64(value()?.parse()?),
                "--pull-count" => args.pull_count = value()?.parse()?,
                "--phases" => {
                    args.phases = value()?.split(',').map(String::from).collect();
                }
                "-h" | "--help" => {
                    println!(
                        "relay_bench [--quick] [--dir DIR] [--senders N] [--ingest-secs S] \
                         [--latency-rate N] [--latency-secs S] [--pull-count N] \
                         [--phases raw,ingest,latency,pull,store]"
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
            eprintln!("relay_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> BenchResult<()> {
    let args = Args::parse()?;
    let temp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::Builder::new()
                .prefix("relay-bench")
                .tempdir_in(d)?
        }
        None => tempfile::Builder::new().prefix("relay-bench").tempdir()?,
    };
    let root = temp.path().to_path_buf();
    println!("relay_bench: data under {}", root.display());
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if args.runs("raw") {
        raw_phase(&root, &args)?;
    }
    if args.runs("ingest") {
        println!(
            "\n## 2. durable ingest, {} senders, 1 KiB envelopes",
            args.senders
        );
        let host = HostSample::now();
        let ingest = ingest_phase(&root.join("ingest"), &args).await?;
        let host = since(host);
        println!(
            "ingest: {:.0} envelopes/s ({} stored in {:.2} s), mean commit batch {:.1} envelopes \
             ({} commits, mean commit {:.2} ms = {:.1} µs/envelope; commit writer busy {:.0}% of the run)",
            ingest.stored as f64 / ingest.secs,
            ingest.stored,
            ingest.secs,
            ingest.mean_batch,
            ingest.commits,
            ingest.mean_commit_ms,
            ingest.mean_commit_ms * 1000.0 / ingest.mean_batch.max(1.0),
            ingest.mean_commit_ms * ingest.commits as f64 / 10.0 / ingest.secs
        );
        println!("{host}");
    }
    if args.runs("latency") {
        println!("\n## 3. ack latency at {}/s offered", args.latency_rate);
        let host = HostSample::now();
        let lat = latency_phase(&root.join("latency"), &args).await?;
        let host = since(host);
        println!(
            "latency: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms over {} sends \
             (achieved {:.0}/s; mean commit batch {:.1}, mean commit {:.3} ms; commits within \
             0.5 / 1 / 2.5 ms: {:.0}% / {:.0}% / {:.1}%)",
            lat.p50_ms,
            lat.p99_ms,
            lat.p999_ms,
            lat.max_ms,
            lat.samples,
            lat.achieved_rate,
            lat.mean_batch,
            lat.mean_commit_ms,
            lat.commit_shares[0],
            lat.commit_shares[1],
            lat.commit_shares[2]
        );
        println!(
            "relay side: sends durable within 1 / 2.5 / 5 ms of reaching the writer's queue: \
             {:.1}% / {:.2}% / {:.2}%",
            lat.durable_shares[0], lat.durable_shares[1], lat.durable_shares[2]
        );
        println!("{}", thread_line(&lat));
        println!("{host}");
    }
    if args.runs("store") {
        let host = HostSample::now();
        store_phase(&root.join("store"), &args)?;
        println!("{}", since(host));
    }
    if args.runs("pull") {
        println!(
            "\n## 4. pull of {} stored envelopes by one device",
            args.pull_count
        );
        let host = HostSample::now();
        let pull = pull_phase(&root.join("pull"), &args).await?;
        let host = since(host);
        println!(
            "pull read-only: {:.0} envelopes/s ({:.2} s); pull with merged acks: {:.0} envelopes/s \
             ({:.2} s; per page: {:.2} ms round trip, {:.2} ms in the relay's read, the ack follows the reply); \
             preload took {:.2} s",
            pull.count as f64 / pull.read_secs,
            pull.read_secs,
            pull.count as f64 / pull.ack_secs,
            pull.ack_secs,
            pull.client_ms,
            pull.server_ms,
            pull.preload_secs
        );
        println!(
            "pull with merged acks, 3 pulls of 200 in flight: {:.0} envelopes/s ({:.2} s)",
            pull.count as f64 / pull.pipelined_secs,
            pull.pipelined_secs
        );
        println!("{host}");
    }
    Ok(())
}

fn raw_phase(root: &Path, args: &Args) -> BenchResult<()> {
    println!("\n## 1. raw limits (same filesystem)");
    let (fsyncs, fsync_secs) = fsync_rate(root, args.fsync_probe)?;
    println!(
        "fsync: {:.0}/s ({} × [1 KiB write + sync_data], mean {:.3} ms)",
        fsyncs as f64 / fsync_secs,
        fsyncs,
        fsync_secs * 1000.0 / fsyncs.max(1) as f64
    );
    for per_txn in [1usize, 32, 512, 4096] {
        let total = if per_txn == 1 {
            (args.redb_values / 10).max(200)
        } else {
            args.redb_values.max(per_txn * 4)
        };
        let rate = redb_rate(root, per_txn, total)?;
        println!("redb: {rate:.0} inserts/s of 1 KiB values, {per_txn} per durable transaction");
    }
    Ok(())
}

fn fsync_rate(dir: &Path, probe: Duration) -> BenchResult<(u64, f64)> {
    let path = dir.join("fsync-probe");
    let mut f = File::create(&path)?;
    let block = [0x5au8; 1024];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < probe {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok((n, secs))
}

const PROBE_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("probe");

fn redb_rate(dir: &Path, per_txn: usize, total: usize) -> BenchResult<f64> {
    let path = dir.join(format!("probe-{per_txn}.redb"));
    let db = redb::Database::create(&path)?;
    let value = vec![0xa5u8; 1024];
    let start = Instant::now();
    let mut key = 0u64;
    while (key as usize) < total {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(PROBE_TABLE)?;
            for _ in 0..per_txn {
                table.insert(key, value.as_slice())?;
                key += 1;
            }
        }
        txn.commit()?;
    }
    let rate = key as f64 / start.elapsed().as_secs_f64();
    drop(db);
    std::fs::remove_file(path)?;
    Ok(rate)
}

async fn start_relay(dir: &Path) -> BenchResult<(RelayHandle, RelayTarget)> {
    let mut config = Config::default_for(dir.to_path_buf());
    config.send_rate = 0;
    config.http = None;
    config.inbox_max_messages = 100_000_000;
    config.inbox_max_bytes = 1 << 40;
    // Every simulated device connects and registers from 127.0.0.1.
    config.max_connections_per_ip = config.max_connections;
    config.max_registrations_per_ip_hour = 0;
    config.prekey_fetches_per_device_minute = 0;
    config.prekey_fetches_per_target_minute = 0;
    let relay = RelayHandle::start(config, Arc::new(SystemClock)).await?;
    let target = RelayTarget::from_cert_der(relay.quic_addr(), &relay.cert_der());
    Ok((relay, target))
}

async fn register_all(target: RelayTarget, ids: &[DeviceIdentity]) -> BenchResult<Vec<TestDevice>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(TestDevice::register_new(id, target).await?);
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
        // Stamped with the time of sending, as the client's `mint_id` does:
        // ids then ascend with time, which is what puts one commit's dedup
        // entries next to each other in the relay's `dedup` table.
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
            other => return Err(format!("unexpected frame {other:?}").into()),
        }
    }
}

struct IngestStats {
    stored: u64,
    secs: f64,
    mean_batch: f64,
    commits: u64,
    mean_commit_ms: f64,
}

async fn ingest_phase(dir: &Path, args: &Args) -> BenchResult<IngestStats> {
    let (relay, target) = start_relay(dir).await?;
    let recipient_ids: Vec<_> = (0..INGEST_RECIPIENTS)
        .map(|i| DeviceIdentity::from_seed(10_000 + i as u64))
        .collect();
    for d in register_all(target, &recipient_ids).await? {
        d.close();
    }
    let recipients: Vec<DeviceId> = recipient_ids.iter().map(DeviceIdentity::device).collect();
    let sender_ids: Vec<_> = (0..args.senders)
        .map(|i| DeviceIdentity::from_seed(20_000 + i as u64))
        .collect();
    let senders = register_all(target, &sender_ids).await?;
    let metrics = relay.metrics();
    let batches_before = metrics.commit_batch_size.count();
    let sum_before = metrics.commit_batch_size.sum();
    let commit_time_before = metrics.commit_latency_seconds.sum();

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
    let secs = start.elapsed().as_secs_f64();
    let commits = metrics.commit_batch_size.count() - batches_before;
    let mean_batch = (metrics.commit_batch_size.sum() - sum_before) / commits.max(1) as f64;
    let mean_commit_ms = (metrics.commit_latency_seconds.sum() - commit_time_before) * 1000.0
        / commits.max(1) as f64;
    relay.shutdown().await?;
    Ok(IngestStats {
        stored,
        secs,
        mean_batch,
        commits,
        mean_commit_ms,
    })
}

/// Commit durations (s) the latency phase reports the share of commits
/// within; bounds of the relay's commit latency histogram.
const COMMIT_BOUNDS: [f64; 3] = [0.0005, 0.001, 0.0025];
/// Durations (s) the latency phase reports the share of sends within, as
/// the relay measured them from queueing to durable outcome.
const DURABLE_BOUNDS: [f64; 3] = [0.001, 0.0025, 0.005];

/// Snapshot of a histogram's counts at `bounds`.
fn counts_at_most(h: &hush_relay::metrics::Histogram, bounds: [f64; 3]) -> [u64; 3] {
    bounds.map(|b| h.count_at_most(b))
}

/// Shares (%) of the `total` observations since `before` that were within
/// each of `bounds`.
fn shares_since(
    h: &hush_relay::metrics::Histogram,
    before: [u64; 3],
    bounds: [f64; 3],
    total: u64,
) -> [f64; 3] {
    let now = counts_at_most(h, bounds);
    [0, 1, 2].map(|i| 100.0 * now[i].saturating_sub(before[i]) as f64 / total.max(1) as f64)
}

/// The relay's counters and this process's thread times at the end of the
/// latency phase's warm-up.
struct Mark {
    batches: u64,
    batch_sum: f64,
    commit_time: f64,
    commits_at_most: [u64; 3],
    durable_at_most: [u64; 3],
    durable_count: u64,
    threads: ThreadTimes,
    at: Instant,
}

impl Mark {
    fn take(metrics: &hush_relay::Metrics) -> Mark {
        Mark {
            batches: metrics.commit_batch_size.count(),
            batch_sum: metrics.commit_batch_size.sum(),
            commit_time: metrics.commit_latency_seconds.sum(),
            commits_at_most: counts_at_most(&metrics.commit_latency_seconds, COMMIT_BOUNDS),
            durable_at_most: counts_at_most(&metrics.send_durable_seconds, DURABLE_BOUNDS),
            durable_count: metrics.send_durable_seconds.count(),
            threads: ThreadTimes::now(),
            at: Instant::now(),
        }
    }
}

struct LatencyStats {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    samples: usize,
    achieved_rate: f64,
    mean_batch: f64,
    mean_commit_ms: f64,
    /// Shares of the measured commits that took at most 0.5, 1 and 2.5 ms
    /// (the metrics histogram's bounds): whether the tail of the ack
    /// latency is the commit's own tail or time outside it.
    commit_shares: [f64; 3],
    /// Shares of the measured sends the relay made durable within 1, 2.5
    /// and 5 ms of queueing them (`send_durable_seconds`): the relay's part
    /// of the ack latency, without the network and the QUIC stacks.
    durable_shares: [f64; 3],
    /// Per thread name over the measured interval: (ns on a CPU, ns
    /// waiting for one).
    threads: Vec<(String, u64, u64)>,
    /// Length of the measured interval the thread times cover.
    threads_secs: f64,
    /// Commits in the measured interval.
    commits: u64,
}

/// Where the latency phase's CPU went, per thread name: share of one core
/// on a CPU / waiting for one, and the writer's CPU per commit.
fn thread_line(lat: &LatencyStats) -> String {
    let wall_ns = (lat.threads_secs * 1e9).max(1.0);
    let mut parts = Vec::new();
    let (mut cpu_total, mut wait_total) = (0u64, 0u64);
    for (name, cpu, wait) in &lat.threads {
        cpu_total += cpu;
        wait_total += wait;
        let mut part = format!(
            "{name} {:.0}% / {:.0}%",
            100.0 * *cpu as f64 / wall_ns,
            100.0 * *wait as f64 / wall_ns
        );
        if name == "hush-writer" {
            part.push_str(&format!(
                " ({:.0} µs CPU per commit)",
                *cpu as f64 / 1000.0 / lat.commits.max(1) as f64
            ));
        }
        parts.push(part);
    }
    format!(
        "threads, CPU / waiting for a CPU, in % of one core: {}; all {:.0}% / {:.0}%",
        parts.join(", "),
        100.0 * cpu_total as f64 / wall_ns,
        100.0 * wait_total as f64 / wall_ns
    )
}

/// Bytes this process caused to be written to storage (Linux
/// `/proc/self/io`; `None` elsewhere).
fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

async fn latency_phase(dir: &Path, args: &Args) -> BenchResult<LatencyStats> {
    let (relay, target) = start_relay(dir).await?;
    let recipient = DeviceIdentity::from_seed(30_000);
    register_all(target, std::slice::from_ref(&recipient)).await?;
    let ids: Vec<_> = (0..LATENCY_CONNECTIONS)
        .map(|i| DeviceIdentity::from_seed(31_000 + i as u64))
        .collect();
    let devices = register_all(target, &ids).await?;
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
                let frame = match reader.next_frame().await {
                    Ok(f) => f,
                    Err(_) => return,
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

    let metrics = relay.metrics();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut measured_sent = 0u64;
    // Taken when the warm-up ends; everything reported is measured from it.
    let mut mark: Option<Mark> = None;
    let recipient_id = recipient.device();
    loop {
        ticker.tick().await;
        let elapsed = bench_start.elapsed();
        if elapsed >= total {
            break;
        }
        if mark.is_none() && elapsed >= warmup {
            mark = Some(Mark::take(&metrics));
        }
        let due = (elapsed.as_secs_f64() * args.latency_rate as f64) as u64;
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
    let mark = mark.unwrap_or_else(|| Mark::take(&metrics));
    let threads = mark.threads.until(&ThreadTimes::now());
    let threads_secs = mark.at.elapsed().as_secs_f64();
    // Let the last answers arrive (bounded).
    let _ = hush_tests::wait_until(Duration::from_secs(10), "last answers", || {
        answered.load(Ordering::Relaxed) >= sent
    })
    .await;
    let commits = metrics.commit_batch_size.count() - mark.batches;
    let mean_batch = (metrics.commit_batch_size.sum() - mark.batch_sum) / commits.max(1) as f64;
    let mean_commit_ms =
        (metrics.commit_latency_seconds.sum() - mark.commit_time) * 1000.0 / commits.max(1) as f64;
    let commit_shares = shares_since(
        &metrics.commit_latency_seconds,
        mark.commits_at_most,
        COMMIT_BOUNDS,
        commits,
    );
    let durable_shares = shares_since(
        &metrics.send_durable_seconds,
        mark.durable_at_most,
        DURABLE_BOUNDS,
        metrics.send_durable_seconds.count() - mark.durable_count,
    );
    for r in readers {
        r.abort();
    }
    drop(writers);
    drop(keep);
    relay.shutdown().await?;

    let mut s = samples.lock().map(|s| s.clone()).unwrap_or_default();
    s.sort();
    if (s.len() as u64) < measured_sent {
        println!(
            "warning: {} of {} measured sends were not answered in time",
            measured_sent - s.len() as u64,
            measured_sent
        );
    }
    Ok(LatencyStats {
        p50_ms: percentile(&s, 0.50),
        p99_ms: percentile(&s, 0.99),
        p999_ms: percentile(&s, 0.999),
        max_ms: s.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        samples: s.len(),
        achieved_rate: measured_sent as f64 / args.latency.as_secs_f64(),
        mean_batch,
        mean_commit_ms,
        commit_shares,
        durable_shares,
        threads,
        threads_secs,
        commits,
    })
}

struct PullStats {
    count: u64,
    preload_secs: f64,
    read_secs: f64,
    ack_secs: f64,
    /// Mean relay-side time of one merged-ack pull (the read on the blocking
    /// pool; the relay applies the ack after sending the page).
    server_ms: f64,
    /// Mean round trip of one merged-ack pull as the client sees it.
    client_ms: f64,
    /// The same count drained with three merged-ack pulls in flight.
    pipelined_secs: f64,
}

async fn pull_phase(dir: &Path, args: &Args) -> BenchResult<PullStats> {
    let (relay, target) = start_relay(dir).await?;
    let reader_id = DeviceIdentity::from_seed(40_000);
    register_all(target, std::slice::from_ref(&reader_id)).await?;
    let sender_ids: Vec<_> = (0..args.senders)
        .map(|i| DeviceIdentity::from_seed(41_000 + i as u64))
        .collect();
    let senders = register_all(target, &sender_ids).await?;
    let start = Instant::now();
    let stored = preload(senders, &sender_ids, reader_id.device(), args).await?;
    let preload_secs = start.elapsed().as_secs_f64();
    if stored != args.pull_count {
        return Err(format!("preloaded {stored} of {}", args.pull_count).into());
    }

    let mut dev = TestDevice::login(&reader_id, target).await?;
    // Read-only pass: pages of 200, nothing acknowledged.
    let start = Instant::now();
    let mut after = 0;
    let mut got = 0u64;
    loop {
        let page = dev.pull(after, 200, 0).await?;
        got += page.envelopes.len() as u64;
        if let Some(last) = page.envelopes.last() {
            after = last.seq;
        }
        if page.remaining == 0 || page.envelopes.is_empty() {
            break;
        }
    }
    let read_secs = start.elapsed().as_secs_f64();
    if got != stored {
        return Err(format!("read-only pull got {got} of {stored}").into());
    }

    // Merged-ack pass: every pull deletes the previous page.
    let metrics = relay.metrics();
    let (pulls_before, pull_time_before) = (
        metrics.pull_latency_seconds.count(),
        metrics.pull_latency_seconds.sum(),
    );
    let start = Instant::now();
    let mut after = 0;
    let mut got = 0u64;
    loop {
        let page = dev.pull(after, 200, after).await?;
        got += page.envelopes.len() as u64;
        match page.envelopes.last() {
            Some(last) => after = last.seq,
            None => break,
        }
    }
    let ack_secs = start.elapsed().as_secs_f64();
    let pulls = metrics.pull_latency_seconds.count() - pulls_before;
    let server_ms =
        (metrics.pull_latency_seconds.sum() - pull_time_before) * 1000.0 / pulls.max(1) as f64;
    let client_ms = ack_secs * 1000.0 / pulls.max(1) as f64;
    if got != stored {
        return Err(format!("acking pull got {got} of {stored}").into());
    }

    // Pipelined pass: refill (with the reader offline, so nothing is
    // pushed to it), then a new connection drains with three merged-ack
    // pulls in flight.
    drop(dev);
    let mut senders = Vec::with_capacity(sender_ids.len());
    for id in &sender_ids {
        senders.push(TestDevice::login(id, target).await?);
    }
    let refilled = preload(senders, &sender_ids, reader_id.device(), args).await?;
    let mut dev = TestDevice::login(&reader_id, target).await?;
    let start = Instant::now();
    let got = dev.drain_pipelined(after, 200, 3).await?;
    let pipelined_secs = start.elapsed().as_secs_f64();
    if got != refilled {
        return Err(format!("pipelined pull got {got} of {refilled}").into());
    }
    drop(dev);
    relay.shutdown().await?;
    Ok(PullStats {
        count: stored,
        preload_secs,
        read_secs,
        ack_secs,
        server_ms,
        client_ms,
        pipelined_secs,
    })
}

/// Store `args.pull_count` envelopes for `reader` from `senders`; returns how
/// many were stored.
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

/// The store's commit alone (no network, no other threads): what one group
/// commit costs per envelope at the ingest phase's and the latency phase's
/// batch sizes.
fn store_phase(dir: &Path, args: &Args) -> BenchResult<()> {
    use hush_protocol::{ConversationId, DeviceRegistration, UserKey};
    use hush_relay::store::redb_store::RedbStore;
    use hush_relay::store::{NewEnvelope, Store, StoreLimits};
    println!("\n## 5. store commit alone (RedbStore, 1 KiB envelopes)");
    std::fs::create_dir_all(dir)?;
    let limits = StoreLimits {
        max_inbox_messages: u64::MAX,
        max_inbox_bytes: u64::MAX,
        max_one_time_prekeys: 1,
        ..StoreLimits::default()
    };
    let store = RedbStore::open(dir.join("store.redb"), limits)?;
    let recipients: Vec<DeviceId> = (0..INGEST_RECIPIENTS)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            DeviceId(id)
        })
        .collect();
    for (i, d) in recipients.iter().enumerate() {
        let reg = DeviceRegistration {
            device: *d,
            user: UserKey([i as u8; 32]),
            signing_key: [1; 32],
            agreement_key: [2; 32],
            user_signature: [3; 64],
        };
        store.register_device(&reg, 0)?;
    }
    let mut counter = 0u64;
    // `one_inbox`: every envelope of the batch goes to the first recipient,
    // as in the latency phase (many senders, one reader).
    let mut make_batch = |n: usize, one_inbox: bool| -> Vec<NewEnvelope> {
        (0..n)
            .map(|_| {
                counter += 1;
                let mut sender = [0u8; 16];
                sender[0] = 0xEE;
                sender[1] = (counter % args.senders.max(1) as u64) as u8;
                let mut random = [0u8; 10];
                random[2..].copy_from_slice(&counter.to_be_bytes());
                NewEnvelope {
                    recipient: if one_inbox {
                        recipients[0]
                    } else {
                        recipients[(counter as usize) % recipients.len()]
                    },
                    sender: DeviceId(sender),
                    message_id: MessageId::new(1_700_000_000_000 + counter, random),
                    conversation: ConversationId([4; 16]),
                    sender_seq: counter,
                    bytes: vec![0x5a; ENVELOPE_LEN],
                    expires_at_ms: 1_800_000_000_000 + counter,
                }
            })
            .collect()
    };
    let quick = args.pull_count < 100_000;
    for (size, one_inbox, rounds) in [
        (4096usize, false, if quick { 8 } else { 40 }),
        (16, false, if quick { 300 } else { 2000 }),
        (8, true, if quick { 300 } else { 4000 }),
    ] {
        let batches: Vec<_> = (0..rounds).map(|_| make_batch(size, one_inbox)).collect();
        let mut times = Vec::with_capacity(rounds);
        let cpu_before = this_thread_cpu_ns();
        let io_before = process_write_bytes();
        let start = Instant::now();
        for b in &batches {
            let t = Instant::now();
            store.commit(b)?;
            times.push(t.elapsed());
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = this_thread_cpu_ns()
            .zip(cpu_before)
            .map(|(a, b)| a.saturating_sub(b));
        let written = process_write_bytes()
            .zip(io_before)
            .map(|(a, b)| a.saturating_sub(b));
        times.sort();
        let n = (size * rounds) as f64;
        let cpu = cpu.map_or("n/a".to_string(), |ns| {
            format!("{:.2}", ns as f64 / 1e3 / n)
        });
        let written = written.map_or("n/a".to_string(), |b| format!("{:.0}", b as f64 / n));
        println!(
            "store: {size}-envelope batches{}: {:.0} envelopes/s, {:.2} µs/envelope ({cpu} µs CPU, \
             {written} bytes written); commit p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms \
             ({rounds} commits)",
            if one_inbox { " to one inbox" } else { "" },
            n / secs,
            secs * 1e6 / n,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        );
    }
    // Reading it all back, inbox by inbox in pages of 200 (each inbox's
    // envelopes are interleaved with the 15 others' in commit order).
    let cpu_before = this_thread_cpu_ns();
    let start = Instant::now();
    let mut read = 0u64;
    for d in &recipients {
        let mut after = 0;
        loop {
            let page = store.pull(d, after, 200, usize::MAX)?;
            let Some(last) = page.envelopes.last() else {
                break;
            };
            after = last.seq;
            read += page.envelopes.len() as u64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = this_thread_cpu_ns()
        .zip(cpu_before)
        .map_or("n/a".to_string(), |(a, b)| {
            format!(
                "{:.2}",
                a.saturating_sub(b) as f64 / 1e3 / read.max(1) as f64
            )
        });
    println!(
        "store: pull of {read} envelopes, pages of 200: {:.0} envelopes/s ({cpu} µs CPU/envelope)",
        read as f64 / secs
    );
    Ok(())
}
