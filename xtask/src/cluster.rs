//! `cargo xtask cluster`: a local Hush cluster for trying things out — a
//! PostgreSQL primary with a synchronous streaming standby, and two relay
//! nodes on it serving the demo page. Prints the URLs; Ctrl-C stops
//! everything (the data lives in ./hush-cluster until then and is removed).

use crate::Result;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the cluster's files go.
const CLUSTER_DIR: &str = "hush-cluster";
/// Relay nodes: (QUIC port, HTTP port).
const NODES: &[(u16, u16)] = &[(4433, 8080), (4434, 8081)];

/// Children stopped (PostgreSQL with a fast shutdown, relays with SIGTERM)
/// when this is dropped, also on error.
struct Running {
    relays: Vec<Child>,
    pg_ctl: PathBuf,
    pg_dirs: Vec<PathBuf>,
    as_postgres: Option<(u32, u32)>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.relays {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        for dir in self.pg_dirs.iter().rev() {
            let mut stop = Command::new(&self.pg_ctl);
            stop.args(["-D", &dir.to_string_lossy(), "-m", "fast", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            as_user(&mut stop, self.as_postgres);
            let _ = stop.status();
        }
    }
}

fn pg_bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// PostgreSQL refuses to run as root: run it as `postgres` then.
fn postgres_account() -> Result<Option<(u32, u32)>> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"));
    if !root {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.first() == Some(&"postgres") && f.len() > 3 {
            return Ok(Some((f[2].parse()?, f[3].parse()?)));
        }
    }
    Err("running as root and there is no `postgres` account to run PostgreSQL as".into())
}

fn as_user(cmd: &mut Command, account: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt as _;
    if let Some((uid, gid)) = account {
        cmd.uid(uid).gid(gid);
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn check(cmd: &mut Command, what: &str) -> Result {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn wait_ready(port: u16) -> Result {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let ok = Command::new(pg_bin("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("PostgreSQL on port {port} did not become ready in 30 s").into())
}

/// `cargo xtask cluster`.
pub fn cluster(args: &[String]) -> Result {
    if let Some(extra) = args.first() {
        return Err(format!("`cluster` takes no arguments (got `{extra}`)").into());
    }
    let root = std::env::current_dir()?.join(CLUSTER_DIR);
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    let account = postgres_account()?;
    if let Some((uid, gid)) = account {
        std::os::unix::fs::chown(&root, Some(uid), Some(gid))?;
    }
    let primary = root.join("primary");
    let standby = root.join("standby");
    let (p_port, s_port) = (free_port()?, free_port()?);
    let mut running = Running {
        relays: Vec::new(),
        pg_ctl: pg_bin("pg_ctl"),
        pg_dirs: Vec::new(),
        as_postgres: account,
    };

    println!("==> cluster: PostgreSQL primary on 127.0.0.1:{p_port}");
    let mut initdb = Command::new(pg_bin("initdb"));
    initdb
        .args([
            "-D",
            &primary.to_string_lossy(),
            "-U",
            "hush",
            "--auth=trust",
        ])
        .args(["-E", "UTF8", "--locale=C"]);
    as_user(&mut initdb, account);
    check(&mut initdb, "initdb")?;
    let conf = format!(
        "\nlisten_addresses = '127.0.0.1'\nport = {p_port}\nunix_socket_directories = '{}'\n\
         wal_level = replica\nmax_wal_senders = 4\nsynchronous_commit = on\n\
         wal_init_zero = off\nmin_wal_size = 2GB\nmax_wal_size = 8GB\n\
         synchronous_standby_names = 'FIRST 1 (standby1)'\n",
        root.display()
    );
    append(&primary.join("postgresql.conf"), &conf)?;
    append(
        &primary.join("pg_hba.conf"),
        "host replication hush 127.0.0.1/32 trust\n",
    )?;
    start_pg(&mut running, &primary, &root)?;
    wait_ready(p_port)?;

    println!("==> cluster: synchronous standby on 127.0.0.1:{s_port}");
    let mut backup = Command::new(pg_bin("pg_basebackup"));
    backup
        .args(["-h", "127.0.0.1", "-p", &p_port.to_string(), "-U", "hush"])
        .args(["-D", &standby.to_string_lossy(), "-R", "-X", "stream"]);
    as_user(&mut backup, account);
    check(&mut backup, "pg_basebackup")?;
    append(
        &standby.join("postgresql.conf"),
        &format!("\nport = {s_port}\n"),
    )?;
    // After the line `-R` wrote, so it wins: the primary names its
    // synchronous standby by this application_name.
    append(
        &standby.join("postgresql.auto.conf"),
        &format!(
            "primary_conninfo = 'host=127.0.0.1 port={p_port} user=hush application_name=standby1'\n"
        ),
    )?;
    start_pg(&mut running, &standby, &root)?;
    wait_ready(s_port)?;

    let url = format!(
        "postgres://hush@127.0.0.1:{p_port},127.0.0.1:{s_port}/postgres?target_session_attrs=read-write"
    );
    println!("==> cluster: building the relay (release)");
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "hush-relay",
        "--bin",
        "hush-relay",
    ]))?;
    let relay_bin = PathBuf::from("target/release/hush-relay");
    let help = Command::new(&relay_bin).arg("--help").output()?;
    if !String::from_utf8_lossy(&help.stdout).contains("--store") {
        return Err("this relay has no `--store` flag: it cannot run on PostgreSQL yet".into());
    }
    for (i, (quic, http)) in NODES.iter().enumerate() {
        let data = root.join(format!("relay{i}"));
        let child = Command::new(&relay_bin)
            .args(["--listen", &format!("127.0.0.1:{quic}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args(["--data", &data.to_string_lossy(), "--dev-cert", "--demo"])
            .args(["--store", &url])
            .spawn()?;
        running.relays.push(child);
        println!("    relay node {i}: demo on http://127.0.0.1:{http} (QUIC 127.0.0.1:{quic})");
    }
    println!("    database: {url}");
    println!("    Ctrl-C stops everything");
    // The relays stop on the terminal's Ctrl-C too; when they are gone,
    // stop PostgreSQL (Running's drop).
    for child in &mut running.relays {
        let _ = child.wait();
    }
    Ok(())
}

fn start_pg(running: &mut Running, dir: &Path, root: &Path) -> Result {
    let log = root.join(format!(
        "{}.log",
        dir.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut start = Command::new(&running.pg_ctl);
    start
        .args([
            "-D",
            &dir.to_string_lossy(),
            "-l",
            &log.to_string_lossy(),
            "-w",
            "start",
        ])
        .stdout(Stdio::null());
    as_user(&mut start, running.as_postgres);
    check(&mut start, "pg_ctl start")?;
    running.pg_dirs.push(dir.to_path_buf());
    Ok(())
}

fn append(path: &Path, text: &str) -> Result {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// `cargo xtask bench --cluster [-- ARGS]`: the cluster benchmark
/// (`tests/src/bin/cluster_bench.rs`: redb, PostgreSQL without and with a
/// synchronous standby, two relay nodes) in release, ARGS passed on.
pub fn bench_cluster(args: &[String]) -> Result {
    crate::run(
        crate::cargo()
            .args([
                "run",
                "--release",
                "-p",
                "hush-tests",
                "--bin",
                "cluster_bench",
                "--",
            ])
            .args(args),
    )?;
    println!("xtask: record the numbers, with the machine and the command, in BENCHMARKS.md.");
    Ok(())
}
