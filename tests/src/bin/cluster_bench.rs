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
//!
//! Before the setups, a disk probe times 2,000 single 8 KiB writes each
//! followed by `fdatasync` in the data directory, then 1,000 pairs of them
//! in series on two files (`--disk-probe N`, 0 to skip): the floor under
//! every commit that waits for a flush, and for two.
//!
//! `--trace` samples `pg_stat_replication` on the primary every 100 ms (how
//! far the standby's flush and replay are behind the primary's WAL) and
//! which tables autovacuum is processing, and prints per phase the worst of
//! it, the checkpoints, restartpoints and autovacuum runs the servers
//! logged, and the slow acks (over 20 ms) with their UTC times.
//! Each PostgreSQL cluster is run in before it is measured
//! ([`PgCluster::run_in`]: [`RUN_IN_SEGMENTS`] WAL segments written, then a
//! checkpoint on both servers), so that, as on servers that have been
//! running, the WAL segments the benchmark fills are recycled ones rather
//! than files created on the commit path; `--fresh` measures servers just
//! out of `initdb` instead (BENCHMARKS.md has both).
//! `--settle` waits before each latency phase until the standby has
//! replayed everything, then runs `CHECKPOINT` on both servers: it measures
//! the servers at rest and is reported as such. `--pg-setting 'NAME =
//! VALUE'` (repeatable) adds a line to every server's `postgresql.conf`.

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
/// WAL segments (16 MiB each) a cluster is run in with: more than one
/// setup's phases fill (~600 MiB of ingest, the latency phases and the
/// pull's preload), fewer than `min_wal_size = 2GB` keeps for reuse.
const RUN_IN_SEGMENTS: u32 = 96;

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
    disk_probe: usize,
    trace: bool,
    settle: bool,
    fresh: bool,
    pg_settings: Vec<String>,
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
            disk_probe: 2_000,
            trace: false,
            settle: false,
            fresh: false,
            pg_settings: Vec::new(),
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
                "--disk-probe" => args.disk_probe = value()?.parse()?,
                "--trace" => args.trace = true,
                "--settle" => args.settle = true,
                "--fresh" => args.fresh = true,
                "--pg-setting" => args.pg_settings.push(value()?),
                "-h" | "--help" => {
                    println!(
                        "cluster_bench [--quick] [--setups redb,pg,pg-sync,two-nodes] \
                         [--senders N] [--ingest-secs S] [--latency-rates N,N] \
                         [--latency-secs S] [--pull-count N] [--disk-probe N] [--trace] \
                         [--settle] [--fresh] [--pg-setting 'NAME = VALUE']..."
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

/// `t` as `YYYY-MM-DD HH:MM:SS.mmm` in UTC, the servers' log format.
fn utc_stamp(t: std::time::SystemTime) -> String {
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1_000 % 60,
        rem % 1_000
    )
}

/// Latency of single 8 KiB writes each followed by `fdatasync`, in `dir`:
/// the disk's own flush, which every commit waits for; then of two such
/// flushes in series on two files, as a commit with a synchronous standby
/// waits for the primary's WAL and then the standby's.
fn disk_probe(dir: &Path, n: usize) -> BenchResult<String> {
    use std::os::unix::fs::FileExt;
    let pages = 2_048u64;
    let open = |name: &str| -> BenchResult<(std::fs::File, PathBuf)> {
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        // Preallocated and flushed first, as a WAL segment is reused.
        file.set_len(pages * 8_192)?;
        file.sync_all()?;
        Ok((file, path))
    };
    let (a, a_path) = open("disk-probe-a")?;
    let (b, b_path) = open("disk-probe-b")?;
    let page = [0x5au8; 8_192];
    let flush = |file: &std::fs::File, i: u64| -> BenchResult<()> {
        file.write_all_at(&page, (i % pages) * 8_192)?;
        file.sync_data()?;
        Ok(())
    };
    let mut one = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t = Instant::now();
        flush(&a, i)?;
        one.push(t.elapsed());
    }
    let mut two = Vec::with_capacity(n / 2);
    for i in 0..(n / 2) as u64 {
        let t = Instant::now();
        flush(&a, i)?;
        flush(&b, i)?;
        two.push(t.elapsed());
    }
    drop((a, b));
    std::fs::remove_file(&a_path)?;
    std::fs::remove_file(&b_path)?;
    let line = |lat: &mut Vec<Duration>| {
        lat.sort();
        let mean =
            lat.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / lat.len().max(1) as f64;
        format!(
            "mean {mean:.3} ms, p50 {:.3}, p90 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3} ms",
            percentile(lat, 0.50),
            percentile(lat, 0.90),
            percentile(lat, 0.99),
            percentile(lat, 0.999),
            lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        )
    };
    Ok(format!(
        "disk: {n} × (8 KiB write + fdatasync): {}\n\
         disk: {} × two of them in series on two files: {}",
        line(&mut one),
        n / 2,
        line(&mut two)
    ))
}

/// What the servers did, sampled every 100 ms by one `psql \watch` on the
/// primary: UTC time; bytes of WAL the standby has not yet flushed and not
/// yet replayed; autovacuum workers and the tables they process; the WAL
/// segment the primary is writing.
const TRACE_QUERY: &str = "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', \
     'YYYY-MM-DD HH24:MI:SS.MS'), \
     coalesce((SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint \
     FROM pg_stat_replication LIMIT 1), -1), \
     coalesce((SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint \
     FROM pg_stat_replication LIMIT 1), -1), \
     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'), \
     (SELECT coalesce(string_agg(datname || '/' || relid || ':' || phase, ' '), '') \
     FROM pg_stat_progress_vacuum), \
     pg_walfile_name(pg_current_wal_lsn())";

/// A running `--trace` sampler and where it writes.
struct Tracer {
    child: std::process::Child,
    out: PathBuf,
    logs: Vec<PathBuf>,
}

/// One sample of [`TRACE_QUERY`].
struct TraceSample {
    at: String,
    unflushed: i64,
    unreplayed: i64,
    autovacuum: u32,
    vacuuming: String,
    segment: String,
}

impl Tracer {
    fn start(pg: &PgCluster, dir: &Path) -> BenchResult<Tracer> {
        use std::io::Write;
        let out = dir.join("trace.txt");
        let mut child = pg
            .psql_command("postgres")
            .stdin(std::process::Stdio::piped())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::process::Stdio::null())
            .spawn()?;
        if let Some(stdin) = child.stdin.as_mut() {
            writeln!(stdin, "{TRACE_QUERY};")?;
            writeln!(stdin, "\\watch 0.1")?;
        }
        Ok(Tracer {
            child,
            out,
            logs: pg.log_paths(),
        })
    }

    fn samples(&self, from: &str, to: &str) -> Vec<TraceSample> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                if f.len() != 6 {
                    return None;
                }
                Some(TraceSample {
                    at: f[0].to_string(),
                    unflushed: f[1].parse().ok()?,
                    unreplayed: f[2].parse().ok()?,
                    autovacuum: f[3].parse().ok()?,
                    vacuuming: f[4].to_string(),
                    segment: f[5].to_string(),
                })
            })
            .filter(|s| s.at.as_str() >= from && s.at.as_str() <= to)
            .collect()
    }

    /// What the servers did between the UTC stamps `from` and `to`.
    fn report(&self, from: &str, to: &str) -> String {
        let samples = self.samples(from, to);
        let mut out = String::new();
        if !samples.is_empty() {
            let max_unflushed = samples.iter().map(|s| s.unflushed).max().unwrap_or(0);
            let max_unreplayed = samples.iter().map(|s| s.unreplayed).max().unwrap_or(0);
            let start_unreplayed = samples.first().map_or(0, |s| s.unreplayed);
            let caught_up = samples
                .iter()
                .find(|s| s.unreplayed == 0)
                .map_or("never".to_string(), |s| s.at[11..].to_string());
            let vacuum = samples.iter().filter(|s| s.autovacuum > 0).count();
            let mut tables: Vec<&str> = samples
                .iter()
                .flat_map(|s| s.vacuuming.split(' '))
                .filter(|t| !t.is_empty())
                .collect();
            tables.sort();
            tables.dedup();
            // When the primary moved to a new WAL segment (to within a
            // sample): the standby's walreceiver opens the same segment as
            // it receives it.
            let switches: Vec<&str> = samples
                .windows(2)
                .filter(|w| w[0].segment != w[1].segment)
                .map(|w| &w[1].at[11..])
                .collect();
            out.push_str(&format!(
                "  trace ({} samples): standby unflushed WAL max {:.1} KiB; unreplayed WAL \
                 {:.1} MiB at start, max {:.1} MiB, first zero at {caught_up}; autovacuum \
                 running in {vacuum} samples [{}]; new WAL segment by {}\n",
                samples.len(),
                max_unflushed as f64 / 1024.0,
                start_unreplayed as f64 / 1048576.0,
                max_unreplayed as f64 / 1048576.0,
                tables.join(" "),
                switches.join(", ")
            ));
        }
        for log in &self.logs {
            let name = log
                .file_name()
                .map_or("log".into(), |n| n.to_string_lossy());
            let text = std::fs::read_to_string(log).unwrap_or_default();
            for line in text.lines() {
                let logged = line.len() >= 23 && &line[..23] >= from && &line[..23] <= to;
                let wanted = [
                    "checkpoint",
                    "restartpoint",
                    "automatic vacuum",
                    "automatic analyze",
                ]
                .iter()
                .any(|w| line.contains(w));
                if logged && wanted {
                    let short: String = line.chars().take(220).collect();
                    out.push_str(&format!("  {name}: {short}\n"));
                }
            }
        }
        out
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Slow acks grouped into stalls (sends less than 100 ms apart): UTC time of
/// the first send, how many, the worst latency.
fn stall_report(slow: &[(std::time::SystemTime, Duration)]) -> String {
    let mut slow = slow.to_vec();
    slow.sort();
    let mut groups: Vec<(
        std::time::SystemTime,
        std::time::SystemTime,
        usize,
        Duration,
    )> = Vec::new();
    for (t, lat) in slow {
        match groups.last_mut() {
            Some(g) if t.duration_since(g.1).unwrap_or_default() < Duration::from_millis(100) => {
                g.1 = t;
                g.2 += 1;
                g.3 = g.3.max(lat);
            }
            _ => groups.push((t, t, 1, lat)),
        }
    }
    let n = groups.len();
    let shown: Vec<String> = groups
        .iter()
        .take(30)
        .map(|(first, _, count, worst)| {
            format!(
                "{} ({count} sends, worst {:.1} ms)",
                &utc_stamp(*first)[11..],
                worst.as_secs_f64() * 1000.0
            )
        })
        .collect();
    format!(
        "  acks over 20 ms: {n} stalls{}{}",
        if n > 0 { ": " } else { "" },
        shown.join(", ")
    )
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

    /// Commits so far over all nodes: count, batch sum, seconds sum, and
    /// how many took at most each of [`COMMIT_BOUNDS`].
    fn commits(&self) -> Commits {
        self.relays.iter().fold(Commits::default(), |mut c, r| {
            let m = r.metrics();
            c.count += m.commit_batch_size.count();
            c.batch += m.commit_batch_size.sum();
            c.secs += m.commit_latency_seconds.sum();
            for (n, b) in c.at_most.iter_mut().zip(COMMIT_BOUNDS) {
                *n += m.commit_latency_seconds.count_at_most(b);
            }
            c
        })
    }

    fn commit_line(&self, before: Commits) -> String {
        let now = self.commits();
        let commits = now.count - before.count;
        let batch = (now.batch - before.batch) / commits.max(1) as f64;
        let ms = (now.secs - before.secs) * 1000.0 / commits.max(1) as f64;
        let over: Vec<String> = COMMIT_BOUNDS
            .iter()
            .zip(now.at_most.iter().zip(before.at_most))
            .map(|(b, (n, m))| {
                let over = commits.saturating_sub(n - m);
                format!(
                    "{:.1}% over {} ms",
                    100.0 * over as f64 / commits.max(1) as f64,
                    b * 1000.0
                )
            })
            .collect();
        format!(
            "{commits} commits, mean batch {batch:.1} envelopes, mean commit {ms:.2} ms \
             ({:.1} µs/envelope; {})",
            ms * 1000.0 / batch.max(1.0),
            over.join(", ")
        )
    }
}

/// Commit durations counted in the relay's histogram (bucket bounds), in
/// seconds.
const COMMIT_BOUNDS: [f64; 4] = [0.0025, 0.005, 0.01, 0.025];

/// Commit counters summed over a deployment's nodes.
#[derive(Debug, Clone, Copy, Default)]
struct Commits {
    count: u64,
    batch: f64,
    secs: f64,
    at_most: [u64; 4],
}

/// Per setup: the PostgreSQL cluster (if any) kept for all its phases.
struct SetupState {
    setup: Setup,
    pg: Option<PgCluster>,
    root: PathBuf,
    phases: u32,
}

impl SetupState {
    fn new(setup: Setup, root: &Path, settings: &[String]) -> BenchResult<SetupState> {
        let pg = match setup {
            Setup::Redb => None,
            Setup::Pg => Some(PgCluster::start_durable_with(false, settings)?),
            Setup::PgSync | Setup::TwoNodes => Some(PgCluster::start_durable_with(true, settings)?),
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
    if args.disk_probe > 0 && args.setups.iter().any(|s| *s != Setup::Redb) {
        let host = HostMark::now();
        println!("{}", disk_probe(temp.path(), args.disk_probe)?);
        println!("  {}", host.report());
    }
    for setup in &args.setups {
        println!("\n## {}", setup.describe());
        let mut state = SetupState::new(*setup, temp.path(), &args.pg_settings)?;
        if !args.pg_settings.is_empty() && state.pg.is_some() {
            println!("PostgreSQL settings added: {}", args.pg_settings.join("; "));
        }
        if let Some(pg) = &state.pg {
            if args.fresh {
                println!("servers fresh from initdb (--fresh): no WAL segment to reuse yet");
            } else {
                let (took, files) = pg.run_in(RUN_IN_SEGMENTS, Duration::from_secs(300))?;
                let files: Vec<String> = files.iter().map(|n| n.to_string()).collect();
                println!(
                    "servers run in: {RUN_IN_SEGMENTS} WAL segments written, then a checkpoint \
                     on each server ({:.1} s); segment files in pg_wal: {}",
                    took.as_secs_f64(),
                    files.join(" / ")
                );
            }
        }
        let tracer = match (&state.pg, args.trace) {
            (Some(pg), true) => Some(Tracer::start(pg, temp.path())?),
            _ => None,
        };
        let trace = |from: &str| {
            if let Some(t) = &tracer {
                print!(
                    "{}",
                    t.report(from, &utc_stamp(std::time::SystemTime::now()))
                );
            }
        };

        let host = HostMark::now();
        let from = utc_stamp(std::time::SystemTime::now());
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
        trace(&from);

        for rate in &args.latency_rates {
            if args.settle
                && let Some(pg) = &state.pg
            {
                let from = utc_stamp(std::time::SystemTime::now());
                let took = pg.settle(Duration::from_secs(120))?;
                println!(
                    "settled in {:.2} s (standby replayed everything; CHECKPOINT on both)",
                    took.as_secs_f64()
                );
                trace(&from);
            }
            let host = HostMark::now();
            let from = utc_stamp(std::time::SystemTime::now());
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
            if tracer.is_some() {
                println!("{}", stall_report(&lat.slow));
            }
            trace(&from);
        }

        let host = HostMark::now();
        let from = utc_stamp(std::time::SystemTime::now());
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
        trace(&from);
        if let Some(t) = tracer {
            t.stop();
        }
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
    /// Sends whose ack took over 20 ms: when sent, and the latency.
    slow: Vec<(std::time::SystemTime, Duration)>,
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
) -> BenchResult<(LatencyStats, Commits)> {
    let recipient = DeviceIdentity::from_seed(30_000);
    register_all(&d.targets, std::slice::from_ref(&recipient)).await?;
    let ids: Vec<_> = (0..LATENCY_CONNECTIONS)
        .map(|i| DeviceIdentity::from_seed(31_000 + i as u64))
        .collect();
    let devices = register_all(&d.targets, &ids).await?;
    let warmup = Duration::from_millis(500);
    let total = warmup + args.latency;

    let samples: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let slow: Arc<Mutex<Vec<(std::time::SystemTime, Duration)>>> = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    let mut factories = Vec::new();
    let mut readers = Vec::new();
    let mut keep = Vec::new();
    let bench_start = Instant::now();
    let bench_start_wall = std::time::SystemTime::now();
    for (i, (dev, id)) in devices.into_iter().zip(&ids).enumerate() {
        let (writer, mut reader, conn, endpoint) = dev.into_split();
        keep.push((conn, endpoint));
        let started: Arc<Mutex<HashMap<u32, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
        writers.push((writer, Arc::clone(&started), 0u32));
        factories.push(EnvelopeFactory::new(id, i as u16));
        let samples = Arc::clone(&samples);
        let slow = Arc::clone(&slow);
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
                            if now - t0 > Duration::from_millis(20)
                                && let Ok(mut slow) = slow.lock()
                            {
                                slow.push((bench_start_wall + (t0 - bench_start), now - t0));
                            }
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
            slow: slow.lock().map(|s| s.clone()).unwrap_or_default(),
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
    let got = dev.drain_pipelined(after, 200, 3).await?;
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
