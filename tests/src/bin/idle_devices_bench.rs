//! `idle_devices_bench`: what many idle authenticated devices cost a relay.
//!
//! ```text
//! cargo run --release -p hush-tests --bin idle_devices_bench -- [--devices N] [--workers K] [--idle-secs S] [--keep-alive-secs K]
//! ```
//!
//! Each device sends a QUIC keep-alive after `--keep-alive-secs` (default
//! 15, the `hush` CLI's interval) without traffic; the relay's own
//! keep-alive (20 s) is longer, so it only answers with ACKs.
//!
//! Starts the release relay as its own process (`RelayProcess`, 127.0.0.1,
//! data in a temp dir) with connection limits above `--devices`, then `K`
//! worker processes (this binary with `--worker`), each registering its
//! share of devices on their own QUIC connections and keeping them open and
//! silent. Once every device is authenticated, it reads the relay's resident
//! memory (`VmRSS`) and its CPU time (`/proc/PID/stat`) over `--idle-secs`
//! of idleness: only keep-alives flow then. Prints RSS, RSS per device and
//! the relay's CPU as a share of one core, with the host line. Raises the
//! open-file limit (setrlimit) to its hard limit first. Every wait is
//! bounded; workers and relay are stopped at the end and on error.
//!
//! Targets (BENCHMARKS.md): 10,000 devices, relay RSS ≤ 1 GiB, keep-alive
//! CPU ≤ 5% of a core.

use hush_tests::device::ConnectOptions;
use hush_tests::host::{HostSample, process_cpu_secs, process_status_kib, since};
use hush_tests::{DeviceIdentity, RelayProcess, RelayTarget, TestDevice};
use std::error::Error;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Bound on all workers' registrations.
const READY_BOUND: Duration = Duration::from_secs(600);
/// Registrations a worker runs at once.
const CONCURRENT: usize = 32;

fn raise_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn arg<T: std::str::FromStr>(name: &str, default: T) -> BenchResult<T> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a value").into()),
        None => Ok(default),
    }
}

fn main() -> ExitCode {
    let worker = std::env::args().any(|a| a == "--worker");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("idle_devices_bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if worker {
        runtime.block_on(run_worker())
    } else {
        runtime.block_on(run())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idle_devices_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Worker: register `--count` devices from seed `--from`, report `ready`,
/// hold them open until stdin closes.
async fn run_worker() -> BenchResult<()> {
    raise_nofile();
    let from: u64 = arg("--from", 0)?;
    let count: u64 = arg("--count", 0)?;
    let addr: std::net::SocketAddr = arg("--addr", "127.0.0.1:0".parse()?)?;
    let cert: String = arg("--cert", String::new())?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(cert.trim(), &mut hash)?;
    let target = RelayTarget {
        addr,
        cert_sha256: hash,
    };
    // The harness pings at a third of the idle timeout: ask for three
    // keep-alive intervals (the relay's shorter 30 s idle timeout applies).
    let keep_alive = Duration::from_secs_f64(arg("--keep-alive-secs", 15.0)?);
    let options = ConnectOptions {
        idle_timeout: keep_alive * 3,
        // Handshakes queue behind thousands of others on a busy host.
        connect_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(60),
        ..ConnectOptions::default()
    };
    let mut devices = Vec::with_capacity(count as usize);
    let mut next = from;
    while next < from + count {
        let end = (next + CONCURRENT as u64).min(from + count);
        let mut tasks = Vec::new();
        for seed in next..end {
            let options = options.clone();
            tasks.push(tokio::spawn(async move {
                let mut d =
                    TestDevice::connect_with(&DeviceIdentity::from_seed(seed), target, options)
                        .await?;
                d.register().await?;
                Ok::<_, hush_tests::HarnessError>(d)
            }));
        }
        for t in tasks {
            devices.push(t.await??);
        }
        next = end;
    }
    println!("ready {}", devices.len());
    // Hold every connection, silent, until the coordinator closes stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
    let open = devices
        .iter()
        .filter(|d| d.connection().close_reason().is_none())
        .count();
    println!("open {open}");
    Ok(())
}

/// Kills the workers when dropped (also on error paths).
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn run() -> BenchResult<()> {
    let devices: u64 = arg("--devices", 10_000)?;
    let workers: u64 = arg("--workers", 4)?.max(1);
    let idle = Duration::from_secs_f64(arg("--idle-secs", 30.0)?);
    let keep_alive: f64 = arg("--keep-alive-secs", 15.0)?;
    let nofile = raise_nofile();
    let limit = (devices + 1_000).to_string();
    let mut relay = RelayProcess::spawn_temp(&[
        "--max-connections",
        &limit,
        "--max-connections-per-ip",
        &limit,
        "--max-registrations-per-ip-hour",
        "0",
    ])
    .await?;
    let pid = relay.pid().ok_or("relay has no pid")?;
    let rss_empty = process_status_kib(pid, "VmRSS")?;
    let target = relay.target();
    let exe = std::env::current_exe()?;
    let cert = hex::encode(target.cert_sha256);
    let started = Instant::now();
    let mut children = Workers(Vec::new());
    let per = devices / workers;
    for w in 0..workers {
        let count = per + u64::from(w < devices % workers);
        let child = Command::new(&exe)
            .args([
                "--worker",
                "--addr",
                &target.addr.to_string(),
                "--cert",
                &cert,
                "--keep-alive-secs",
                &keep_alive.to_string(),
            ])
            .args(["--from", &(1_000_000 + w * 1_000_000).to_string()])
            .args(["--count", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        children.0.push(child);
    }
    // Every worker prints `ready N` once its devices are authenticated.
    let (tx, rx) = std::sync::mpsc::channel();
    for c in &mut children.0 {
        let out = c.stdout.take().ok_or("worker without stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let mut ready = 0u64;
    let mut reported = 0;
    while reported < workers {
        let left = READY_BOUND.saturating_sub(started.elapsed());
        let line = rx
            .recv_timeout(left)
            .map_err(|_| format!("workers not ready after {READY_BOUND:?} ({ready} devices)"))?;
        if let Some(n) = line.strip_prefix("ready ") {
            ready += n.trim().parse::<u64>()?;
            reported += 1;
        }
        for c in &mut children.0 {
            if let Some(status) = c.try_wait()? {
                return Err(format!("a worker exited early: {status}").into());
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    if ready != devices {
        return Err(format!("{ready} of {devices} devices ready").into());
    }
    // Idle window: only keep-alives flow.
    let host = HostSample::now();
    let t0 = Instant::now();
    let cpu0 = process_cpu_secs(pid)?;
    tokio::time::sleep(idle).await;
    let cpu1 = process_cpu_secs(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let host = since(host);
    let rss = process_status_kib(pid, "VmRSS")?;
    let cpu_share = 100.0 * (cpu1 - cpu0) / wall;
    // Every device must still be connected at the end of the window.
    for c in &mut children.0 {
        drop(c.stdin.take());
    }
    let mut open = 0u64;
    let by = Instant::now() + Duration::from_secs(60);
    let mut answered = 0;
    while answered < workers {
        let line = rx
            .recv_timeout(by.saturating_duration_since(Instant::now()))
            .map_err(|_| "workers did not report their open connections")?;
        if let Some(n) = line.strip_prefix("open ") {
            open += n.trim().parse::<u64>()?;
            answered += 1;
        }
    }
    println!(
        "idle devices: {devices} authenticated connections from {workers} processes (open-file limit {nofile}), all up in {connect_secs:.1} s; client keep-alive {keep_alive} s"
    );
    println!(
        "relay CPU while idle: {:.2} s over {wall:.1} s ({:.1} µs per device per second)",
        cpu1 - cpu0,
        1e6 * (cpu1 - cpu0) / wall / devices.max(1) as f64,
    );
    println!(
        "relay RSS: {:.1} MiB with {devices} idle devices ({:.1} MiB before any; {:.1} KiB per device); CPU while idle {cpu_share:.2}% of a core over {wall:.0} s",
        rss as f64 / 1024.0,
        rss_empty as f64 / 1024.0,
        rss.saturating_sub(rss_empty) as f64 / devices.max(1) as f64,
    );
    println!(
        "targets: RSS <= 1 GiB {}, idle CPU <= 5% {}",
        if rss <= 1 << 20 { "met" } else { "NOT met" },
        if cpu_share <= 5.0 { "met" } else { "NOT met" }
    );
    println!("{host}");
    drop(children);
    relay.terminate().await?;
    if open != devices {
        return Err(format!(
            "only {open} of {devices} connections still open after the idle window"
        )
        .into());
    }
    Ok(())
}
