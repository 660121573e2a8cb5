//! `peer_load`: the same two jobs against Redis, NATS JetStream and Hush,
//! from the same client process shape for all three.
//!
//! ```text
//! peer_load --system redis|nats|hush --job ingest|catchup [options]
//! ```
//!
//! Run by `cargo xtask bench --peers`, which installs the servers, builds
//! this binary and the release relay, runs every row and prints the table.
//! Each invocation starts its own server as a child process on 127.0.0.1
//! with a data directory in a fresh temporary directory, and stops it on the
//! way out (also on error: the child is killed when its guard drops).
//!
//! - Job `ingest` (durable ingest): `--producers` (64) producers, each on its
//!   own connection, keep `--inflight` messages of 1 KiB in flight for
//!   `--secs` seconds; a message counts when its durable ack arrives. One
//!   message per request (Redis `XADD`, JetStream publish awaiting its
//!   `PubAck`, Hush `Send` of one envelope); `--batched` makes Hush send
//!   `Send`s of 32 envelopes instead (`--inflight` of them in flight). Prints
//!   acked msgs/s and ack p50/p99/p99.9. Checks afterwards that the server
//!   holds exactly the acked messages.
//! - Job `catchup` (offline catch-up): `--count` (100,000) × 1 KiB queued for
//!   one consumer that is offline, then drained with acks in pages of 200
//!   (Redis `XREADGROUP COUNT 200` + one `XACK` per page; JetStream pull
//!   consumer `fetch(200)` + one double-acked `AckAll` per page; Hush `Pull`
//!   of 200 whose `ack` field acknowledges the previous page). `--runs` (3)
//!   times; prints the median drain rate. Checks that every message was
//!   drained exactly once and nothing is left unacknowledged. With
//!   `--batched`, Hush drains as its client syncs a backlog instead (a
//!   labelled extra row): pulls of `MAX_PAGE` envelopes, up to
//!   `CLIENT_PULL_DEPTH` in flight, each acknowledging what came before it.
//!
//! The catch-up job's load generator runs on a single-threaded runtime (one
//! consumer, one connection), the ingest job's on a multi-threaded one; see
//! [`runtime_for`]. `--readers N` (Hush only, not in the peer table) queues
//! the catch-up's messages for N offline devices instead of one and drains
//! them all at once, each on its own connection (then on a multi-threaded
//! runtime): how a relay serves many devices coming back together.
//!
//! `--mark-drains` prints each drain's start and end on `CLOCK_MONOTONIC` to
//! stderr (`DRAIN <start> <end>`), to cut a `perf record -k CLOCK_MONOTONIC`
//! profile down to the drains. `--relay-arg ARG` (repeatable) hands ARG to
//! the relay after the benchmark's own flags, to compare its settings (for
//! example `--relay-arg --workers --relay-arg 1`); the flags are printed with
//! the results. `--relay-metrics` prints, after a Hush run, the relay's
//! group-commit counters from its `/metrics` to stderr (commits, envelopes,
//! time in commits, time from queueing to durable), to see whether the
//! writer is the bound.
//!
//! `--memory-store` (Hush only) runs the relay with its store replaced by
//! the in-memory one (the `relay_memory` binary beside this one): nothing
//! durable, a labelled extra row that shows what the durable store costs
//! and what any store could reach on this host.
//!
//! The last line of stdout is `RESULT {json}` with the numbers, the server's
//! version and configuration, and what the host did meanwhile (CPU steal,
//! CPU and I/O pressure). It also gives the CPU time per message of the
//! server (all its threads) and of this load generator over the measured
//! interval, and the server's peak resident memory over its run: on two
//! cores shared by both sides, a rate alone does not say which side's CPU
//! bounds it, nor what holding the messages cost the server.

use async_nats::jetstream;
use futures_util::StreamExt;
use hush_protocol::{DeviceId, Envelope, MessageId, Request, Response, SendOutcome, ServerFrame};
use hush_tests::host::{process_cpu_secs, process_status_kib};
use hush_tests::{DeviceIdentity, RelayProcess, TestDevice, conversation, make_envelope_sized};
use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Payload size of every message (Hush: the encoded envelope).
const PAYLOAD: usize = 1024;
/// Streams / subjects / inboxes the ingest job spreads its messages over.
const TARGETS: usize = 16;
/// Messages per page in the catch-up job.
const PAGE: usize = 200;
/// Envelopes per `Send` in Hush's batched ingest row.
const HUSH_BATCH: usize = 32;
/// Pulls in flight in Hush's client-sync catch-up row (the client's
/// default `EngineConfig::pull_depth`).
const CLIENT_PULL_DEPTH: usize = 3;
/// Bound on a server's start-up.
const STARTUP: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Redis,
    Nats,
    Hush,
}

#[derive(Debug, Clone)]
struct Args {
    system: System,
    job: String,
    producers: usize,
    inflight: usize,
    batched: bool,
    secs: f64,
    count: u64,
    runs: usize,
    redis_bin: PathBuf,
    nats_bin: PathBuf,
    /// Print each catch-up drain's start and end ([`Drain`]).
    mark_drains: bool,
    /// Flags given to the relay after [`HUSH_FLAGS`] (`--relay-arg`, repeated),
    /// to compare its settings; printed with the results.
    relay_args: Vec<String>,
    /// Print the relay's group-commit metrics after a Hush run.
    relay_metrics: bool,
    /// Offline devices draining their inboxes at once in Hush's catch-up
    /// job (`--readers N`, default 1, the peer table's job B).
    readers: usize,
    /// Run Hush on the in-memory store (`relay_memory`): a ceiling, not
    /// durable.
    memory_store: bool,
}

impl Args {
    fn parse() -> BenchResult<Args> {
        let mut args = Args {
            system: System::Hush,
            job: "ingest".into(),
            producers: 64,
            inflight: 1,
            batched: false,
            secs: 10.0,
            count: 100_000,
            runs: 3,
            redis_bin: PathBuf::from("redis-server"),
            nats_bin: PathBuf::from("nats-server"),
            mark_drains: false,
            relay_args: Vec::new(),
            relay_metrics: false,
            readers: 1,
            memory_store: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--system" => {
                    args.system = match value()?.as_str() {
                        "redis" => System::Redis,
                        "nats" => System::Nats,
                        "hush" => System::Hush,
                        other => return Err(format!("unknown system {other}").into()),
                    }
                }
                "--job" => args.job = value()?,
                "--producers" => args.producers = value()?.parse()?,
                "--inflight" => args.inflight = value()?.parse()?,
                "--batched" => args.batched = true,
                "--secs" => args.secs = value()?.parse()?,
                "--count" => args.count = value()?.parse()?,
                "--runs" => args.runs = value()?.parse()?,
                "--redis-server" => args.redis_bin = PathBuf::from(value()?),
                "--nats-server" => args.nats_bin = PathBuf::from(value()?),
                "--mark-drains" => args.mark_drains = true,
                "--relay-arg" => args.relay_args.push(value()?),
                "--relay-metrics" => args.relay_metrics = true,
                "--memory-store" => args.memory_store = true,
                "--readers" => {
                    args.readers = value()?.parse()?;
                    if !(1..=64).contains(&args.readers) {
                        return Err("--readers takes 1 to 64".into());
                    }
                }
                "-h" | "--help" => {
                    println!(
                        "peer_load --system redis|nats|hush --job ingest|catchup [--producers N] \
                         [--inflight N] [--batched] [--secs S] [--count N] [--runs N] \
                         [--redis-server PATH] [--nats-server PATH] [--mark-drains] \
                         [--relay-arg ARG]... [--relay-metrics] [--readers N] [--memory-store]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other}").into()),
            }
        }
        if args.producers == 0 || args.inflight == 0 || args.runs == 0 || args.count == 0 {
            return Err("--producers, --inflight, --runs and --count must be at least 1".into());
        }
        if args.batched && args.system != System::Hush {
            return Err("--batched is for Hush only (batched Send, or the client's sync)".into());
        }
        if args.memory_store && args.system != System::Hush {
            return Err("--memory-store is for Hush only".into());
        }
        if args.readers > 1 && (args.system != System::Hush || args.job != "catchup") {
            return Err("--readers is for --system hush --job catchup".into());
        }
        Ok(args)
    }
}

/// The clock of one catch-up drain. With `--mark-drains` it also prints
/// `DRAIN <start> <end>` to stderr, in seconds of `CLOCK_MONOTONIC`, the
/// clock `perf record -k CLOCK_MONOTONIC` stamps its samples with: so a
/// profile of the whole run can be cut down to the drains with
/// `perf report --time <start>,<end>` (the queue filling is left out).
struct Drain {
    start: Instant,
    mark: Option<String>,
}

impl Drain {
    fn start(mark: bool) -> Drain {
        Drain {
            start: Instant::now(),
            mark: mark.then(monotonic),
        }
    }

    /// Seconds since the start.
    fn finish(self) -> f64 {
        let secs = self.start.elapsed().as_secs_f64();
        if let Some(start) = self.mark {
            eprintln!("DRAIN {start} {}", monotonic());
        }
        secs
    }
}

/// `CLOCK_MONOTONIC` now, as seconds with nanoseconds.
fn monotonic() -> String {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    format!("{}.{:09}", t.tv_sec, t.tv_nsec)
}

fn main() -> ExitCode {
    match Args::parse().and_then(|args| runtime_for(&args.job, args.readers)?.block_on(run(args))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer_load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The load generator's runtime, the same for all three systems.
///
/// The catch-up job has one consumer on one connection: it runs on a
/// single thread, as a consumer would. On a multi-threaded runtime its
/// connection driver, socket reads and page handling hop between worker
/// threads, and each hop is a wake-up on the two cores the server shares.
/// That overhead was in every system's drain rate (by hand, single-threaded
/// drains went ~14% faster for NATS and ~17% for Hush, unchanged for
/// Redis; BENCHMARKS.md, "Peers"). The
/// ingest job's 64 producers keep the multi-threaded runtime, and so do
/// several catch-up readers (`--readers`).
fn runtime_for(job: &str, readers: usize) -> BenchResult<tokio::runtime::Runtime> {
    let mut builder = if job == "catchup" && readers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    Ok(builder.enable_all().build()?)
}

/// What the host did over a measured interval: CPU steal (`/proc/stat`) and
/// the shares of wall time in which some task waited for a CPU or for I/O
/// (`/proc/pressure/{cpu,io}`, "some").
///
/// It also reads the CPU time of the server under test (all its threads)
/// and of this load generator over the same interval: on two shared cores
/// that is where each message's CPU went, on either side of the socket.
#[derive(Debug, Clone, Copy)]
struct Host {
    ticks: [u64; 8],
    cpu_us: u64,
    io_us: u64,
    /// CPU seconds so far of the server ([`SERVER_PID`]) and of this
    /// process.
    server_cpu: Option<f64>,
    own_cpu: Option<f64>,
    at: Instant,
}

/// The server under test, once it runs (one server per `peer_load` run).
static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// What the host did over a measured interval ([`Host::since`]).
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    steal_pct: f64,
    cpu_pressure_pct: f64,
    io_pressure_pct: f64,
    /// CPU seconds the server used meanwhile (all threads).
    server_cpu_s: Option<f64>,
    /// CPU seconds the load generator used meanwhile.
    client_cpu_s: Option<f64>,
}

impl Reading {
    /// Microseconds of CPU per message of `cpu_s`, over `msgs` messages.
    fn per_msg_us(cpu_s: Option<f64>, msgs: u64) -> Option<f64> {
        cpu_s.filter(|_| msgs > 0).map(|s| s * 1e6 / msgs as f64)
    }
}

fn psi_total(kind: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/pressure/{kind}"))
        .ok()
        .and_then(|psi| {
            psi.lines()
                .find_map(|l| l.strip_prefix("some "))?
                .split_whitespace()
                .find_map(|f| f.strip_prefix("total="))?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

impl Host {
    fn now() -> Host {
        let mut ticks = [0u64; 8];
        if let Ok(stat) = std::fs::read_to_string("/proc/stat")
            && let Some(cpu) = stat.lines().next().and_then(|l| l.strip_prefix("cpu "))
        {
            for (slot, field) in ticks.iter_mut().zip(cpu.split_whitespace()) {
                *slot = field.parse().unwrap_or(0);
            }
        }
        Host {
            ticks,
            cpu_us: psi_total("cpu"),
            io_us: psi_total("io"),
            server_cpu: SERVER_PID.get().and_then(|&pid| process_cpu_secs(pid).ok()),
            own_cpu: process_cpu_secs(std::process::id()).ok(),
            at: Instant::now(),
        }
    }

    /// What happened since `self`.
    fn since(&self) -> Reading {
        let later = Host::now();
        let d: Vec<u64> = later
            .ticks
            .iter()
            .zip(&self.ticks)
            .map(|(b, a)| b.saturating_sub(*a))
            .collect();
        let total: u64 = d.iter().sum();
        let steal = if total == 0 {
            0.0
        } else {
            100.0 * d[7] as f64 / total as f64
        };
        let wall = later.at.duration_since(self.at).as_micros().max(1) as f64;
        let cpu = 100.0 * later.cpu_us.saturating_sub(self.cpu_us) as f64 / wall;
        let io = 100.0 * later.io_us.saturating_sub(self.io_us) as f64 / wall;
        let spent = |a: Option<f64>, b: Option<f64>| Some((b? - a?).max(0.0));
        Reading {
            steal_pct: steal,
            cpu_pressure_pct: cpu,
            io_pressure_pct: io,
            server_cpu_s: spent(self.server_cpu, later.server_cpu),
            client_cpu_s: spent(self.own_cpu, later.own_cpu),
        }
    }
}

/// A server process killed (and reaped) when dropped, also on error paths.
struct ServerGuard {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> BenchResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Wait (bounded) until `addr` accepts TCP connections.
async fn wait_listening(port: u16, child: &mut Child) -> BenchResult<()> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!("server exited at start-up: {status}").into());
        }
        if start.elapsed() > STARTUP {
            return Err(format!("server not listening on {port} after {STARTUP:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Start `redis-server` with an append-only file fsynced before every reply.
async fn start_redis(bin: &Path) -> BenchResult<(ServerGuard, u16, String)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = format!(
        "bind 127.0.0.1\nport {port}\nprotected-mode yes\ndir {}\nappendonly yes\n\
         appendfsync always\nsave \"\"\ndaemonize no\nlogfile {}\n",
        dir.path().display(),
        dir.path().join("redis.log").display()
    );
    let conf_path = dir.path().join("redis.conf");
    std::fs::write(&conf_path, &config)?;
    let child = Command::new(bin)
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let mut guard = ServerGuard { child, _dir: dir };
    wait_listening(port, &mut guard.child).await?;
    let described = format!(
        "{} | {}",
        version_of(bin),
        config.trim().replace('\n', "; ")
    );
    Ok((guard, port, described))
}

/// Start `nats-server` with JetStream on a file store, fsync on every write.
async fn start_nats(bin: &Path) -> BenchResult<(ServerGuard, u16, String)> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
        dir.path().join("js").display()
    );
    let conf_path = dir.path().join("nats.conf");
    std::fs::write(&conf_path, &config)?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("nats.log"))?)
        .spawn()?;
    let mut guard = ServerGuard { child, _dir: dir };
    wait_listening(port, &mut guard.child).await?;
    let described = format!(
        "{} | {}",
        version_of(bin),
        config.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    Ok((guard, port, described))
}

/// Relay flags for the benchmark: no per-connection send rate, room for
/// 100,000+ queued envelopes per inbox, every producer from 127.0.0.1.
const HUSH_FLAGS: &[&str] = &[
    "--send-rate",
    "0",
    "--inbox-max-messages",
    "100000000",
    "--inbox-max-bytes",
    "64GiB",
    "--max-connections-per-ip",
    "4096",
    "--max-registrations-per-ip-hour",
    "0",
];

/// Start the release relay (or, with `memory_store`, `relay_memory`: the
/// same relay on the in-memory store) with [`HUSH_FLAGS`] and `extra`.
async fn start_hush(extra: &[String], memory_store: bool) -> BenchResult<(RelayProcess, String)> {
    let flags: Vec<&str> = HUSH_FLAGS
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .collect();
    let relay_bin = hush_tests::bin_path("hush-relay")?;
    let (relay, store) = if memory_store {
        let bin = std::env::current_exe()?.with_file_name("relay_memory");
        if !bin.exists() {
            return Err(format!(
                "--memory-store needs {} (cargo build --release -p hush-tests --bin relay_memory)",
                bin.display()
            )
            .into());
        }
        (
            RelayProcess::spawn_temp_of(&bin, &flags).await?,
            "in-memory store (MemoryStore: nothing written, nothing synced; a ceiling, never a relay to run)",
        )
    } else {
        (
            RelayProcess::spawn_temp(&flags).await?,
            "default store (redb index + segment files, group commit, fdatasync before every ack)",
        )
    };
    let described = format!(
        "{} | {store}; flags: {}",
        version_of(&relay_bin),
        flags.join(" ")
    );
    Ok((relay, described))
}

/// The relay's group-commit sums and counts (no histogram buckets), to
/// stderr.
fn print_commit_metrics(relay: &RelayProcess) {
    match relay.http_get("/metrics") {
        Ok((_, text)) => text
            .lines()
            .filter(|l| {
                (l.starts_with("hush_commit") || l.starts_with("hush_send_durable"))
                    && !l.contains("_bucket")
            })
            .for_each(|l| eprintln!("{l}")),
        Err(e) => eprintln!("peer_load: no relay metrics: {e}"),
    }
}

/// Latency percentiles in ms of unsorted samples in µs.
fn percentiles(mut us: Vec<u32>) -> (f64, f64, f64) {
    us.sort_unstable();
    let p = |q: f64| {
        if us.is_empty() {
            0.0
        } else {
            let i = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1;
            f64::from(us[i]) / 1000.0
        }
    };
    (p(0.50), p(0.99), p(0.999))
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Per-producer result of an ingest: acked messages and ack latencies (µs).
type Acks = (u64, Vec<u32>);

async fn join_all(tasks: Vec<tokio::task::JoinHandle<BenchResult<Acks>>>) -> BenchResult<Acks> {
    let mut acked = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (n, l) = t.await??;
        acked += n;
        lat.extend(l);
    }
    Ok((acked, lat))
}

/// When a producer stops: at a deadline (ingest) or after a budget (preload).
#[derive(Debug, Clone, Copy)]
enum Stop {
    At(Instant),
    After(u64),
}

/// How many messages one of `lanes` lanes sends under `stop`: `None` until the deadline.
fn lane_budget(stop: Stop, lane: usize, lanes: usize) -> Option<u64> {
    match stop {
        Stop::At(_) => None,
        Stop::After(n) => Some(n / lanes as u64 + u64::from((lane as u64) < n % lanes as u64)),
    }
}

fn go_on(stop: Stop, sent: u64, budget: Option<u64>) -> bool {
    match stop {
        Stop::At(t) => Instant::now() < t,
        Stop::After(_) => budget.is_some_and(|b| sent < b),
    }
}

// ---------------------------------------------------------------- Redis

fn redis_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)))
}

async fn redis_conn(client: &redis::Client) -> BenchResult<redis::aio::MultiplexedConnection> {
    Ok(client
        .get_multiplexed_async_connection_with_config(&redis_config())
        .await?)
}

/// `producers` connections, `inflight` XADDs in flight on each, to the
/// streams `keys` (producer i to `keys[i % len]`).
async fn redis_produce(
    client: &redis::Client,
    producers: usize,
    inflight: usize,
    keys: &[String],
    stop_in: Duration,
    count: Option<u64>,
) -> BenchResult<(Acks, f64)> {
    let payload = vec![0x3cu8; PAYLOAD];
    let mut conns = Vec::with_capacity(producers);
    for _ in 0..producers {
        conns.push(redis_conn(client).await?);
    }
    let lanes = producers * inflight;
    let start = Instant::now();
    let stop = match count {
        Some(n) => Stop::After(n),
        None => Stop::At(start + stop_in),
    };
    let mut tasks = Vec::with_capacity(lanes);
    for (p, conn) in conns.into_iter().enumerate() {
        for l in 0..inflight {
            let mut conn = conn.clone();
            let key = keys[p % keys.len()].clone();
            let payload = payload.clone();
            let budget = lane_budget(stop, p * inflight + l, lanes);
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                let mut lat = Vec::new();
                while go_on(stop, sent, budget) {
                    let t0 = Instant::now();
                    let _id: String = redis::cmd("XADD")
                        .arg(&key)
                        .arg("*")
                        .arg("d")
                        .arg(&payload[..])
                        .query_async(&mut conn)
                        .await?;
                    lat.push(micros(t0.elapsed()));
                    sent += 1;
                }
                Ok((sent, lat))
            }));
        }
    }
    let acks = join_all(tasks).await?;
    Ok((acks, start.elapsed().as_secs_f64()))
}

async fn redis_ingest(args: &Args, client: &redis::Client) -> BenchResult<Measured> {
    let keys: Vec<String> = (0..TARGETS).map(|i| format!("ingest{i}")).collect();
    let host = Host::now();
    let ((acked, lat), secs) = redis_produce(
        client,
        args.producers,
        args.inflight,
        &keys,
        Duration::from_secs_f64(args.secs),
        None,
    )
    .await?;
    let host = host.since();
    let mut conn = redis_conn(client).await?;
    let mut stored = 0u64;
    for k in &keys {
        let n: u64 = redis::cmd("XLEN").arg(k).query_async(&mut conn).await?;
        stored += n;
    }
    if stored != acked {
        return Err(format!("redis: {acked} acked but {stored} stored").into());
    }
    Ok(Measured::ingest(acked, secs, lat, host))
}

async fn redis_catchup(args: &Args, client: &redis::Client) -> BenchResult<Measured> {
    let mut conn = redis_conn(client).await?;
    let key = "catchup".to_string();
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
        let _: String = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg("g")
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await?;
        let ((queued, _), _) = redis_produce(
            client,
            args.producers,
            16,
            std::slice::from_ref(&key),
            Duration::ZERO,
            Some(args.count),
        )
        .await?;
        if queued != args.count {
            return Err(format!("redis: queued {queued} of {}", args.count).into());
        }
        // The consumer connects only now: it was offline while the queue filled.
        let mut consumer = redis_conn(client).await?;
        let host = Host::now();
        let drain = Drain::start(args.mark_drains);
        let mut drained = 0u64;
        let mut last = (0u64, 0u64);
        loop {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("COUNT")
                .arg(PAGE)
                .arg("STREAMS")
                .arg(&key)
                .arg(">")
                .query_async(&mut consumer)
                .await?;
            let ids: Vec<String> = reply
                .keys
                .into_iter()
                .flat_map(|k| k.ids.into_iter().map(|i| i.id))
                .collect();
            if ids.is_empty() {
                break;
            }
            for id in &ids {
                let parsed = parse_redis_id(id)?;
                if parsed <= last {
                    return Err(format!("redis: id {id} not after the previous one").into());
                }
                last = parsed;
            }
            drained += ids.len() as u64;
            let acked: u64 = redis::cmd("XACK")
                .arg(&key)
                .arg("g")
                .arg(&ids)
                .query_async(&mut consumer)
                .await?;
            if acked != ids.len() as u64 {
                return Err(format!("redis: XACK acked {acked} of {}", ids.len()).into());
            }
        }
        let secs = drain.finish();
        let host = host.since();
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&key)
            .arg("g")
            .query_async(&mut consumer)
            .await?;
        let pending_count = match pending {
            redis::Value::Array(ref v) => match v.first() {
                Some(redis::Value::Int(n)) => *n,
                _ => -1,
            },
            _ => -1,
        };
        if drained != args.count || pending_count != 0 {
            return Err(format!(
                "redis: drained {drained} of {}, {pending_count} pending",
                args.count
            )
            .into());
        }
        runs.push((drained, secs, host));
    }
    Ok(Measured::catchup(runs))
}

fn parse_redis_id(id: &str) -> BenchResult<(u64, u64)> {
    let (ms, seq) = id
        .split_once('-')
        .ok_or_else(|| format!("bad stream id {id}"))?;
    Ok((ms.parse()?, seq.parse()?))
}

// ---------------------------------------------------------------- NATS

async fn nats_produce(
    url: &str,
    producers: usize,
    inflight: usize,
    subjects: &[String],
    stop_in: Duration,
    count: Option<u64>,
) -> BenchResult<(Acks, f64)> {
    let payload = bytes_payload();
    let mut contexts = Vec::with_capacity(producers);
    for _ in 0..producers {
        let client = async_nats::connect(url).await?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(60));
        contexts.push(js);
    }
    let lanes = producers * inflight;
    let start = Instant::now();
    let stop = match count {
        Some(n) => Stop::After(n),
        None => Stop::At(start + stop_in),
    };
    let mut tasks = Vec::with_capacity(lanes);
    for (p, js) in contexts.into_iter().enumerate() {
        for l in 0..inflight {
            let js = js.clone();
            let subject = subjects[p % subjects.len()].clone();
            let payload = payload.clone();
            let budget = lane_budget(stop, p * inflight + l, lanes);
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u64;
                let mut lat = Vec::new();
                while go_on(stop, sent, budget) {
                    let t0 = Instant::now();
                    let ack = js.publish(subject.clone(), payload.clone()).await?.await?;
                    if ack.duplicate {
                        return Err("nats: a publish was reported as a duplicate".into());
                    }
                    lat.push(micros(t0.elapsed()));
                    sent += 1;
                }
                Ok((sent, lat))
            }));
        }
    }
    let acks = join_all(tasks).await?;
    Ok((acks, start.elapsed().as_secs_f64()))
}

fn bytes_payload() -> bytes::Bytes {
    bytes::Bytes::from(vec![0x3cu8; PAYLOAD])
}

async fn nats_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: Vec<String>,
) -> BenchResult<jetstream::stream::Stream> {
    let _ = js.delete_stream(name).await;
    Ok(js
        .create_stream(jetstream::stream::Config {
            name: name.to_string(),
            subjects,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

async fn nats_ingest(args: &Args, url: &str) -> BenchResult<Measured> {
    let admin = jetstream::new(async_nats::connect(url).await?);
    let subjects: Vec<String> = (0..TARGETS).map(|i| format!("ingest.{i}")).collect();
    let mut stream = nats_stream(&admin, "INGEST", vec!["ingest.>".into()]).await?;
    let host = Host::now();
    let ((acked, lat), secs) = nats_produce(
        url,
        args.producers,
        args.inflight,
        &subjects,
        Duration::from_secs_f64(args.secs),
        None,
    )
    .await?;
    let host = host.since();
    let stored = stream.info().await?.state.messages;
    if stored != acked {
        return Err(format!("nats: {acked} acked but {stored} stored").into());
    }
    Ok(Measured::ingest(acked, secs, lat, host))
}

async fn nats_catchup(args: &Args, url: &str) -> BenchResult<Measured> {
    let admin = jetstream::new(async_nats::connect(url).await?);
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        let stream = nats_stream(&admin, "CATCHUP", vec!["catchup".into()]).await?;
        stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("c".into()),
                ack_policy: jetstream::consumer::AckPolicy::All,
                ..Default::default()
            })
            .await?;
        let ((queued, _), _) = nats_produce(
            url,
            args.producers,
            16,
            &["catchup".to_string()],
            Duration::ZERO,
            Some(args.count),
        )
        .await?;
        if queued != args.count {
            return Err(format!("nats: queued {queued} of {}", args.count).into());
        }
        // The consumer connects only now: it was offline while the queue filled.
        let js = jetstream::new(async_nats::connect(url).await?);
        let mut consumer: jetstream::consumer::PullConsumer =
            js.get_stream("CATCHUP").await?.get_consumer("c").await?;
        let host = Host::now();
        let drain = Drain::start(args.mark_drains);
        let mut drained = 0u64;
        let mut last_seq = 0u64;
        loop {
            let mut batch = consumer.fetch().max_messages(PAGE).messages().await?;
            let mut last = None;
            let mut n = 0u64;
            while let Some(m) = batch.next().await {
                let m = m?;
                let seq = m.info()?.stream_sequence;
                if seq <= last_seq {
                    return Err(format!("nats: seq {seq} after {last_seq}").into());
                }
                last_seq = seq;
                n += 1;
                last = Some(m);
            }
            match last {
                // AckAll: acknowledging the page's last message acknowledges
                // the page; double ack waits for the server's confirmation.
                Some(m) => m.double_ack().await?,
                None => break,
            }
            drained += n;
        }
        let secs = drain.finish();
        let host = host.since();
        let info = consumer.info().await?;
        if drained != args.count || info.num_ack_pending != 0 || info.num_pending != 0 {
            return Err(format!(
                "nats: drained {drained} of {}, {} unacked, {} pending",
                args.count, info.num_ack_pending, info.num_pending
            )
            .into());
        }
        runs.push((drained, secs, host));
    }
    Ok(Measured::catchup(runs))
}

// ---------------------------------------------------------------- Hush

/// 1 KiB envelopes from one sender: one template, fresh ids stamped with the
/// time of sending (as the client's `mint_id` does).
struct Envelopes {
    template: Envelope,
    index: u16,
    counter: u64,
    seqs: HashMap<DeviceId, u64>,
}

impl Envelopes {
    fn new(sender: &DeviceIdentity, index: u16) -> Self {
        Envelopes {
            template: make_envelope_sized(
                sender.device(),
                sender.device(),
                conversation(u64::from(index)),
                0,
                PAYLOAD,
                0x3c,
            ),
            index,
            counter: 0,
            seqs: HashMap::new(),
        }
    }

    fn make(&mut self, recipient: DeviceId) -> Envelope {
        self.counter += 1;
        let seq = self.seqs.entry(recipient).or_insert(0);
        *seq += 1;
        let mut random = [0u8; 10];
        random[..2].copy_from_slice(&self.index.to_be_bytes());
        random[2..].copy_from_slice(&self.counter.to_be_bytes());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut e = self.template.clone();
        e.header.sent_at_ms = now_ms;
        e.header.message_id = MessageId::new(now_ms, random);
        e.header.recipient_device = recipient;
        e.header.sender_seq = *seq;
        e
    }
}

/// One producer connection keeping `window` `Send`s of `per_request`
/// envelopes in flight; every envelope's latency is its request's.
async fn hush_producer(
    dev: TestDevice,
    mut envelopes: Envelopes,
    recipient: DeviceId,
    window: usize,
    per_request: usize,
    stop: Stop,
    budget: Option<u64>,
) -> BenchResult<Acks> {
    let (mut writer, mut reader, _conn, _endpoint) = dev.into_split();
    let mut in_flight: HashMap<u32, (Instant, usize)> = HashMap::new();
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut lat = Vec::new();
    loop {
        while in_flight.len() < window && go_on(stop, sent, budget) {
            let n = match budget {
                Some(b) => (b - sent).min(per_request as u64) as usize,
                None => per_request,
            };
            let batch: Vec<Envelope> = (0..n).map(|_| envelopes.make(recipient)).collect();
            let t0 = Instant::now();
            let id = writer
                .write_request(Request::Send { envelopes: batch })
                .await?;
            in_flight.insert(id, (t0, n));
            sent += n as u64;
        }
        if in_flight.is_empty() {
            return Ok((acked, lat));
        }
        match reader.next_frame().await? {
            ServerFrame::Response {
                request_id,
                response: Response::Sent { outcomes },
            } => {
                let (t0, n) = in_flight
                    .remove(&request_id)
                    .ok_or_else(|| format!("hush: answer to unknown request {request_id}"))?;
                let us = micros(t0.elapsed());
                for o in &outcomes {
                    match o {
                        SendOutcome::Stored { .. } => {
                            acked += 1;
                            lat.push(us);
                        }
                        SendOutcome::Refused { error, .. } => {
                            return Err(format!("hush: refused: {error}").into());
                        }
                    }
                }
                if outcomes.len() != n {
                    return Err(
                        format!("hush: {} outcomes for {n} envelopes", outcomes.len()).into(),
                    );
                }
            }
            other => return Err(format!("hush: unexpected frame {other:?}").into()),
        }
    }
}

async fn register(
    relay: &RelayProcess,
    seeds: std::ops::Range<u64>,
) -> BenchResult<Vec<(DeviceIdentity, TestDevice)>> {
    let mut out = Vec::new();
    for seed in seeds {
        let id = DeviceIdentity::from_seed(seed);
        let dev = TestDevice::register_new(&id, relay.target()).await?;
        out.push((id, dev));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn hush_produce(
    producers: Vec<(DeviceIdentity, TestDevice)>,
    recipients: &[DeviceId],
    window: usize,
    per_request: usize,
    stop_in: Duration,
    count: Option<u64>,
) -> BenchResult<(Acks, f64)> {
    let n = producers.len();
    let start = Instant::now();
    let stop = match count {
        Some(c) => Stop::After(c),
        None => Stop::At(start + stop_in),
    };
    let mut tasks = Vec::with_capacity(n);
    for (i, (id, dev)) in producers.into_iter().enumerate() {
        let envelopes = Envelopes::new(&id, i as u16);
        let recipient = recipients[i % recipients.len()];
        tasks.push(tokio::spawn(hush_producer(
            dev,
            envelopes,
            recipient,
            window,
            per_request,
            stop,
            lane_budget(stop, i, n),
        )));
    }
    let acks = join_all(tasks).await?;
    Ok((acks, start.elapsed().as_secs_f64()))
}

/// Count (read-only) what `id`'s inbox holds.
async fn hush_count(relay: &RelayProcess, id: &DeviceIdentity) -> BenchResult<u64> {
    let mut dev = TestDevice::login(id, relay.target()).await?;
    let mut after = 0;
    let mut n = 0u64;
    loop {
        let page = dev.pull(after, PAGE as u16, 0).await?;
        n += page.envelopes.len() as u64;
        match page.envelopes.last() {
            Some(last) => after = last.seq,
            None => break,
        }
        if page.remaining == 0 {
            break;
        }
    }
    dev.close();
    Ok(n)
}

async fn hush_ingest(args: &Args, relay: &RelayProcess) -> BenchResult<Measured> {
    let recipients = register(relay, 10_000..10_000 + TARGETS as u64).await?;
    let recipient_ids: Vec<DeviceIdentity> = recipients
        .into_iter()
        .map(|(id, dev)| {
            dev.close();
            id
        })
        .collect();
    let devices: Vec<DeviceId> = recipient_ids.iter().map(DeviceIdentity::device).collect();
    let producers = register(relay, 20_000..20_000 + args.producers as u64).await?;
    let per_request = if args.batched { HUSH_BATCH } else { 1 };
    let host = Host::now();
    let ((acked, lat), secs) = hush_produce(
        producers,
        &devices,
        args.inflight,
        per_request,
        Duration::from_secs_f64(args.secs),
        None,
    )
    .await?;
    let host = host.since();
    let mut stored = 0;
    for id in &recipient_ids {
        stored += hush_count(relay, id).await?;
    }
    if stored != acked {
        return Err(format!("hush: {acked} acked but {stored} stored").into());
    }
    Ok(Measured::ingest(acked, secs, lat, host))
}

async fn hush_catchup(args: &Args, relay: &RelayProcess) -> BenchResult<Measured> {
    let readers: Vec<DeviceIdentity> = (0..args.readers as u64)
        .map(|i| DeviceIdentity::from_seed(40_000 + i))
        .collect();
    register(relay, 40_000..40_000 + args.readers as u64).await?;
    let inboxes: Vec<DeviceId> = readers.iter().map(DeviceIdentity::device).collect();
    let senders: Vec<DeviceIdentity> = (0..args.producers as u64)
        .map(|i| DeviceIdentity::from_seed(41_000 + i))
        .collect();
    for s in &senders {
        TestDevice::register_new(s, relay.target()).await?.close();
    }
    let mut runs = Vec::new();
    let mut after = vec![0u64; readers.len()];
    for _ in 0..args.runs {
        let mut producers = Vec::new();
        for s in &senders {
            producers.push((s.clone(), TestDevice::login(s, relay.target()).await?));
        }
        let ((queued, _), _) =
            hush_produce(producers, &inboxes, 16, 1, Duration::ZERO, Some(args.count)).await?;
        if queued != args.count {
            return Err(format!("hush: queued {queued} of {}", args.count).into());
        }
        // What each inbox holds (the producers spread the count over them).
        let mut expected = Vec::with_capacity(readers.len());
        for r in &readers {
            expected.push(hush_count(relay, r).await?);
        }
        // The readers connect only now: they were offline while the queues
        // filled. Each drains its own inbox, all at once.
        let mut devs = Vec::with_capacity(readers.len());
        for r in &readers {
            devs.push(TestDevice::login(r, relay.target()).await?);
        }
        let host = Host::now();
        let drain = Drain::start(args.mark_drains);
        let tasks: Vec<_> = devs
            .into_iter()
            .zip(after.iter().copied())
            .map(|(dev, from)| tokio::spawn(hush_drain(dev, from, args.batched)))
            .collect();
        let mut drained = 0u64;
        for (i, task) in tasks.into_iter().enumerate() {
            let (n, last) = task.await.map_err(|e| format!("hush: drain task: {e}"))??;
            if n != expected[i] {
                return Err(format!("hush: reader {i} drained {n} of {}", expected[i]).into());
            }
            drained += n;
            after[i] = last;
        }
        let secs = drain.finish();
        let host = host.since();
        let mut left = 0;
        for r in &readers {
            left += hush_count(relay, r).await?;
        }
        if drained != args.count || left != 0 {
            return Err(format!("hush: drained {drained} of {}, {left} left", args.count).into());
        }
        runs.push((drained, secs, host));
    }
    Ok(Measured::catchup(runs))
}

/// Drain one inbox past `after`, acknowledging as it goes; returns how many
/// envelopes came and the last seq. Every page is checked for contiguous,
/// ordered seqs.
async fn hush_drain(mut dev: TestDevice, mut after: u64, batched: bool) -> BenchResult<(u64, u64)> {
    let mut drained = 0u64;
    if batched {
        // As the client syncs: several pulls in flight, each checked
        // for contiguous, ordered seqs. The last page's ack follows.
        drained = dev
            .drain_pipelined(after, hush_protocol::limits::MAX_PAGE, CLIENT_PULL_DEPTH)
            .await?;
        after += drained;
        dev.ack(after).await?;
    } else {
        loop {
            // `ack` acknowledges (and deletes) everything up to the
            // previous page's last seq, in the same request.
            let page = dev.pull(after, PAGE as u16, after).await?;
            let Some(last) = page.envelopes.last().map(|d| d.seq) else {
                break;
            };
            for d in &page.envelopes {
                if d.seq != after + 1 {
                    return Err(format!("hush: seq {} after {after}", d.seq).into());
                }
                after = d.seq;
            }
            drained += page.envelopes.len() as u64;
            if last != after {
                return Err("hush: page out of order".into());
            }
        }
    }
    dev.close();
    Ok((drained, after))
}

// ---------------------------------------------------------------- results

#[derive(Debug)]
struct Measured {
    msgs: u64,
    secs: f64,
    rate: f64,
    latency_ms: Option<(f64, f64, f64)>,
    /// Catch-up: every run's msgs/s.
    rates: Vec<f64>,
    host: Reading,
}

impl Measured {
    fn ingest(acked: u64, secs: f64, lat: Vec<u32>, host: Reading) -> Self {
        Measured {
            msgs: acked,
            secs,
            rate: acked as f64 / secs.max(1e-9),
            latency_ms: Some(percentiles(lat)),
            rates: Vec::new(),
            host,
        }
    }

    /// The median run by rate.
    fn catchup(runs: Vec<(u64, f64, Reading)>) -> Self {
        let mut rates: Vec<(f64, usize)> = runs
            .iter()
            .enumerate()
            .map(|(i, (n, s, _))| (*n as f64 / s.max(1e-9), i))
            .collect();
        rates.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (rate, i) = rates[rates.len() / 2];
        let (msgs, secs, host) = runs[i];
        Measured {
            msgs,
            secs,
            rate,
            latency_ms: None,
            rates: runs
                .iter()
                .map(|(n, s, _)| *n as f64 / s.max(1e-9))
                .collect(),
            host,
        }
    }
}

async fn run(args: Args) -> BenchResult<()> {
    let label = match (args.system, args.batched) {
        (System::Hush, _) if args.memory_store => format!(
            "hush{} on the in-memory store (ceiling, not durable)",
            if args.batched { ", batched" } else { "" }
        ),
        (System::Redis, _) => "redis".to_string(),
        (System::Nats, _) => "nats".to_string(),
        (System::Hush, false) => "hush".to_string(),
        (System::Hush, true) if args.job == "catchup" => format!(
            "hush (client sync: pulls of {}, {CLIENT_PULL_DEPTH} in flight)",
            hush_protocol::limits::MAX_PAGE
        ),
        (System::Hush, true) => format!("hush (batched Send, {HUSH_BATCH}/request)"),
    };
    // The server's peak resident memory over the whole run, read before it
    // stops: what holding the job's messages cost it.
    let peak_rss = |pid: u32| process_status_kib(pid, "VmHWM").ok();
    let (measured, server, peak_rss_kib) = match args.system {
        System::Redis => {
            let (guard, port, described) = start_redis(&args.redis_bin).await?;
            let _ = SERVER_PID.set(guard.child.id());
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
            let m = match args.job.as_str() {
                "ingest" => redis_ingest(&args, &client).await?,
                "catchup" => redis_catchup(&args, &client).await?,
                other => return Err(format!("unknown job {other}").into()),
            };
            (m, described, peak_rss(guard.child.id()))
        }
        System::Nats => {
            let (guard, port, described) = start_nats(&args.nats_bin).await?;
            let _ = SERVER_PID.set(guard.child.id());
            let url = format!("nats://127.0.0.1:{port}");
            let m = match args.job.as_str() {
                "ingest" => nats_ingest(&args, &url).await?,
                "catchup" => nats_catchup(&args, &url).await?,
                other => return Err(format!("unknown job {other}").into()),
            };
            (m, described, peak_rss(guard.child.id()))
        }
        System::Hush => {
            let (mut relay, described) = start_hush(&args.relay_args, args.memory_store).await?;
            if let Some(pid) = relay.pid() {
                let _ = SERVER_PID.set(pid);
            }
            let m = match args.job.as_str() {
                "ingest" => hush_ingest(&args, &relay).await,
                "catchup" => hush_catchup(&args, &relay).await,
                other => Err(format!("unknown job {other}").into()),
            };
            if let Err(e) = &m {
                // What the relay said about it, before its log goes with
                // its temp dir.
                eprintln!(
                    "peer_load: hush run failed ({e}); the relay's log ends with:\n{}",
                    relay.log_tail(40)
                );
            }
            if args.relay_metrics {
                print_commit_metrics(&relay);
            }
            let rss = relay.pid().and_then(peak_rss);
            relay.terminate().await?;
            (m?, described, rss)
        }
    };
    let (p50, p99, p999) = measured.latency_ms.unwrap_or((0.0, 0.0, 0.0));
    let result = serde_json::json!({
        "system": label,
        "job": args.job,
        "inflight": args.inflight,
        "producers": args.producers,
        "msgs": measured.msgs,
        "secs": measured.secs,
        "rate": measured.rate,
        "rates": measured.rates,
        "latency": measured.latency_ms.is_some(),
        "p50_ms": p50,
        "p99_ms": p99,
        "p999_ms": p999,
        "steal_pct": measured.host.steal_pct,
        "cpu_pressure_pct": measured.host.cpu_pressure_pct,
        "io_pressure_pct": measured.host.io_pressure_pct,
        "server_cpu_us_per_msg": Reading::per_msg_us(measured.host.server_cpu_s, measured.msgs),
        "client_cpu_us_per_msg": Reading::per_msg_us(measured.host.client_cpu_s, measured.msgs),
        "server_peak_rss_mib": peak_rss_kib.map(|k| k as f64 / 1024.0),
        "server": server,
    });
    println!("RESULT {result}");
    Ok(())
}
