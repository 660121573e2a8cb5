//! Throwaway PostgreSQL servers for the PostgreSQL store's tests.
//!
//! [`PgCluster::start`] runs `initdb` in a temporary directory and starts a
//! primary on a free 127.0.0.1 port (its Unix socket in that directory too,
//! so no system-wide instance or directory is touched), optionally with a
//! streaming standby made with `pg_basebackup -R` that the primary waits for
//! on every commit (`synchronous_standby_names = '*'`). Tests get a fresh
//! database each from [`PgCluster::create_database`] and connect with
//! [`PgCluster::url`] (multi-host with `target_session_attrs=read-write` when
//! there is a standby). [`PgCluster::kill_primary`] sends SIGKILL to the
//! primary's postmaster and [`PgCluster::promote_standby`] promotes the
//! standby, for failover tests.
//!
//! Servers never outlive the test process: [`Drop`] stops them, and a small
//! reaper shell started with the cluster stops them (and removes the
//! directory) within a second of the test process exiting, however it exits —
//! a `static` cluster shared by a test binary is never dropped.
//!
//! The PostgreSQL binaries come from `pg_config --bindir` or
//! `/usr/lib/postgresql/*/bin` (`cargo xtask test` installs Debian's
//! `postgresql` when `initdb` is missing). `initdb` refuses to run as root,
//! so as root every server command runs as the `postgres` user through
//! `runuser -u postgres --`, and the directory is given to that user.

use crate::wait::wait_until_blocking;
use crate::{HarnessError, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long a server may take to start, stop or promote.
const SERVER_BOUND: Duration = Duration::from_secs(60);
/// How long the standby may take to become synchronous.
const SYNC_BOUND: Duration = Duration::from_secs(30);

/// Settings appended to every server's `postgresql.conf`. Durability against
/// power loss does not matter for throwaway servers (`fsync = off`); commit
/// waiting for the synchronous standby does, and is unaffected.
const TEST_SETTINGS: &str = "
listen_addresses = '127.0.0.1'
fsync = off
full_page_writes = off
wal_level = replica
max_wal_senders = 8
wal_keep_size = 128MB
shared_buffers = 32MB
max_connections = 200
logging_collector = off
log_min_messages = warning
";

/// Settings added for benchmarks ([`PgCluster::start_durable`]): flushes as
/// deployed, the WAL settings `docs/OPERATING.md` recommends for a cluster
/// behind Hush (new WAL segments created without writing 16 MB of zeros on
/// the commit path, a burst's worth kept for reuse, no checkpoint forced in
/// the middle of a burst), and a server log that says when checkpoints and
/// autovacuum ran (timestamps in UTC to the millisecond), so a latency stall
/// can be matched with what the servers were doing.
const DURABLE_SETTINGS: &str = "
fsync = on
full_page_writes = on
wal_init_zero = off
min_wal_size = 2GB
max_wal_size = 8GB
shared_buffers = 256MB
log_checkpoints = on
log_autovacuum_min_duration = 0
log_line_prefix = '%m [%b] '
log_timezone = 'UTC'
";

/// Where the PostgreSQL server binaries are, if anywhere.
pub fn find_bindir() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(dir) = from_pg_config
        && dir.join("initdb").is_file()
    {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether this process runs as root (then servers run as `postgres`).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn pg_err(what: impl std::fmt::Display) -> HarnessError {
    HarnessError::Postgres(what.to_string())
}

/// One server of the cluster.
#[derive(Debug)]
struct Server {
    data: PathBuf,
    log: PathBuf,
    port: u16,
}

/// A primary and, optionally, a synchronous standby.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    as_postgres: bool,
    /// The current primary (the promoted standby after a failover).
    primary: Server,
    standby: Option<Server>,
    /// Servers that were primary and were killed.
    dead: Vec<Server>,
    reaper: Option<Child>,
    databases: AtomicU32,
    /// `fsync = on` (benchmarks) instead of the tests' `fsync = off`.
    durable: bool,
    /// More `postgresql.conf` lines for every server (benchmarks).
    extra: String,
    // Last: removed after the servers stopped.
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// Whether PostgreSQL's server binaries are installed.
    pub fn available() -> bool {
        find_bindir().is_some()
    }

    /// A primary alone: commits are not replicated (for the relay's
    /// refusal to start, and `--allow-unreplicated`).
    pub fn primary_only() -> Result<PgCluster> {
        PgCluster::start(false)
    }

    /// A primary whose every commit waits for a streaming standby.
    pub fn with_sync_standby() -> Result<PgCluster> {
        PgCluster::start(true)
    }

    /// Start a primary, and a synchronous standby if `sync_standby`.
    pub fn start(sync_standby: bool) -> Result<PgCluster> {
        PgCluster::start_with(sync_standby, false, &[])
    }

    /// [`PgCluster::start`] with `fsync = on` and `full_page_writes = on`
    /// on every server, as a deployment runs: for benchmarks, whose
    /// numbers must include the flushes.
    pub fn start_durable(sync_standby: bool) -> Result<PgCluster> {
        PgCluster::start_with(sync_standby, true, &[])
    }

    /// [`PgCluster::start_durable`] with more settings (`name = value`
    /// lines) for every server, after the harness's own.
    pub fn start_durable_with(sync_standby: bool, settings: &[String]) -> Result<PgCluster> {
        PgCluster::start_with(sync_standby, true, settings)
    }

    fn start_with(sync_standby: bool, durable: bool, settings: &[String]) -> Result<PgCluster> {
        let bin =
            find_bindir().ok_or_else(|| pg_err("PostgreSQL server binaries not found (initdb)"))?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new().prefix("hush-pg-").tempdir()?;
        if as_postgres {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()))?;
        }
        let primary = Server {
            data: dir.path().join("primary"),
            log: dir.path().join("primary.log"),
            port: free_port()?,
        };
        let mut cluster = PgCluster {
            bin,
            as_postgres,
            primary,
            standby: None,
            dead: Vec::new(),
            reaper: None,
            databases: AtomicU32::new(0),
            durable,
            extra: settings.iter().map(|l| format!("{l}\n")).collect(),
            dir,
        };
        cluster.start_reaper()?;
        let data = cluster.primary.data.clone();
        cluster.server_cmd(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        cluster.configure(&cluster.primary)?;
        cluster.start_server(&cluster.primary)?;
        if sync_standby {
            cluster.add_sync_standby()?;
        }
        if durable {
            // `initdb` and `pg_basebackup` ran with `--no-sync`: without
            // this, the kernel writes their ~100 MB of files back about 30 s
            // later (`vm.dirty_expire_centisecs`), in the middle of a
            // benchmark, where WAL flushes can queue behind that writeback.
            // A deployed server's files were flushed long ago.
            run(&mut Command::new("sync"))?;
        }
        Ok(cluster)
    }

    /// Port of the current primary.
    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// Port of the standby, if any.
    pub fn standby_port(&self) -> Option<u16> {
        self.standby.as_ref().map(|s| s.port)
    }

    /// Where the servers' data and logs live.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// URL of `db` on the current primary alone.
    pub fn primary_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.primary.port)
    }

    /// URL of `db` naming every live server, for relays: multi-host with
    /// `target_session_attrs=read-write`, so a client finds whichever is
    /// primary.
    pub fn url(&self, db: &str) -> String {
        let mut hosts = format!("127.0.0.1:{}", self.primary.port);
        if let Some(s) = &self.standby {
            hosts.push_str(&format!(",127.0.0.1:{}", s.port));
        }
        format!(
            "postgres://postgres@{hosts}/{db}?target_session_attrs=read-write&connect_timeout=5"
        )
    }

    /// Create a fresh, empty database on the primary and return its name.
    pub fn create_database(&self) -> Result<String> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("hush_test_{n}");
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(name)
    }

    /// A `psql` command connected to `db` on the primary (quiet, unaligned,
    /// stopping at the first error); add `-c SQL` and run it.
    pub fn psql_command(&self, db: &str) -> Command {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .arg("-p")
        .arg(self.primary.port.to_string())
        .args(["-U", "postgres", "-d", db])
        .stdin(Stdio::null());
        cmd
    }

    /// [`PgCluster::psql_command`] connected to the server on `port`
    /// (the standby's, say).
    pub fn psql_command_on(&self, port: u16, db: &str) -> Command {
        let mut cmd = self.psql_command(db);
        // The last `-p` wins.
        cmd.arg("-p").arg(port.to_string());
        cmd
    }

    /// Run `sql` in `db` on the primary; returns the unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        self.psql_on(self.primary.port, db, sql)
    }

    /// Run `sql` in `db` on the server on `port`; returns the unaligned
    /// output.
    pub fn psql_on(&self, port: u16, db: &str, sql: &str) -> Result<String> {
        let out = self.psql_command_on(port, db).args(["-c", sql]).output()?;
        if !out.status.success() {
            return Err(pg_err(format!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The primary's and (if any) the standby's server logs, in that order.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        std::iter::once(&self.primary)
            .chain(self.standby.as_ref())
            .map(|s| s.log.clone())
            .collect()
    }

    /// Let the servers settle: wait (up to `bound`) until the standby has
    /// received, flushed and replayed everything the primary wrote, then
    /// `CHECKPOINT` the primary and the standby (a restartpoint there), so
    /// the next measurement starts without a backlog of replay or dirty
    /// pages from earlier work. Returns how long it took. A benchmark that
    /// settles measures the servers at rest, and must say so.
    pub fn settle(&self, bound: Duration) -> Result<Duration> {
        let start = std::time::Instant::now();
        if let Some(standby) = &self.standby {
            let caught_up = "SELECT count(*) FROM pg_stat_replication \
                 WHERE flush_lsn = pg_current_wal_lsn() AND replay_lsn = pg_current_wal_lsn()";
            wait_until_blocking(bound, "standby to replay everything", || {
                self.psql("postgres", caught_up).is_ok_and(|n| n == "1")
            })?;
            self.psql("postgres", "CHECKPOINT")?;
            // A standby's restartpoint can only start from a checkpoint
            // record it replayed: the primary's, just written.
            wait_until_blocking(bound, "standby to replay the checkpoint", || {
                self.psql("postgres", caught_up).is_ok_and(|n| n == "1")
            })?;
            self.psql_on(standby.port, "postgres", "CHECKPOINT")?;
        } else {
            self.psql("postgres", "CHECKPOINT")?;
        }
        Ok(start.elapsed())
    }

    /// Run the servers in as a deployment that has been through its first
    /// checkpoints: write `segments` WAL segments' worth of WAL (a small
    /// logical message and a segment switch each), then [`PgCluster::settle`],
    /// whose checkpoint and restartpoint keep those segments for reuse (up
    /// to `min_wal_size`). A freshly initialised server has none, so every
    /// segment it fills until its first checkpoint is created on the commit
    /// path of some transaction; a server that has run for a while renames
    /// an old one instead. Returns how long it took and how many segment
    /// files each server (primary, then standby) then holds.
    pub fn run_in(&self, segments: u32, bound: Duration) -> Result<(Duration, Vec<usize>)> {
        let start = std::time::Instant::now();
        self.psql(
            "postgres",
            &format!(
                "DO $$ BEGIN FOR i IN 1..{segments} LOOP \
                 PERFORM pg_logical_emit_message(false, 'hush', 'run-in'); \
                 PERFORM pg_switch_wal(); END LOOP; END $$"
            ),
        )?;
        self.settle(bound.saturating_sub(start.elapsed()))?;
        let took = start.elapsed();
        let mut files = Vec::new();
        for server in std::iter::once(&self.primary).chain(self.standby.as_ref()) {
            let segment_files = std::fs::read_dir(server.data.join("pg_wal"))?
                .filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
                })
                .count();
            files.push(segment_files);
        }
        Ok((took, files))
    }

    /// SIGKILL the primary's postmaster (its backends exit on their own).
    /// The standby, if any, keeps running, unpromoted.
    pub fn kill_primary(&mut self) -> Result<()> {
        let pid = postmaster_pid(&self.primary.data)?;
        run(Command::new("kill").arg("-9").arg(pid.to_string()))?;
        wait_until_blocking(SERVER_BOUND, "killed primary to exit", || {
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        })
    }

    /// Promote the standby: it becomes the primary (and has no standby).
    pub fn promote_standby(&mut self) -> Result<()> {
        let standby = self
            .standby
            .take()
            .ok_or_else(|| pg_err("no standby to promote"))?;
        let data = standby.data.clone();
        let old = std::mem::replace(&mut self.primary, standby);
        self.dead.push(old);
        self.server_cmd(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "promote".as_ref(),
            ],
        )?;
        wait_until_blocking(SERVER_BOUND, "promoted standby to accept writes", || {
            self.psql("postgres", "SELECT pg_is_in_recovery()")
                .is_ok_and(|s| s == "f")
        })
    }

    /// Stop every server now (Drop does it too).
    pub fn stop(&mut self) {
        let servers: Vec<PathBuf> = self
            .standby
            .iter()
            .chain(std::iter::once(&self.primary))
            .chain(self.dead.iter())
            .map(|s| s.data.clone())
            .collect();
        for data in servers {
            if data.join("postmaster.pid").exists() {
                let _ = self.server_cmd(
                    "pg_ctl",
                    &[
                        "-D".as_ref(),
                        data.as_os_str(),
                        "-m".as_ref(),
                        "immediate".as_ref(),
                        "-w".as_ref(),
                        "stop".as_ref(),
                    ],
                );
            }
        }
    }

    fn add_sync_standby(&mut self) -> Result<()> {
        let standby = Server {
            data: self.dir.path().join("standby"),
            log: self.dir.path().join("standby.log"),
            port: free_port()?,
        };
        let port = self.primary.port.to_string();
        self.server_cmd(
            "pg_basebackup",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-D".as_ref(),
                standby.data.as_os_str(),
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "-c".as_ref(),
                "fast".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        self.configure(&standby)?;
        self.start_server(&standby)?;
        self.standby = Some(standby);
        self.psql(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        )?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        wait_until_blocking(SYNC_BOUND, "standby to be synchronous", || {
            self.psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            )
            .is_ok_and(|n| n == "1")
        })
    }

    /// Append the test settings (port, socket directory) to a server's
    /// configuration.
    fn configure(&self, server: &Server) -> Result<()> {
        let durable = if self.durable { DURABLE_SETTINGS } else { "" };
        let conf = format!(
            "{TEST_SETTINGS}{durable}{}port = {}\nunix_socket_directories = '{}'\n",
            self.extra,
            server.port,
            self.dir.path().display()
        );
        let path = server.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path)?;
        text.push_str(&conf);
        std::fs::write(&path, text)?;
        Ok(())
    }

    fn start_server(&self, server: &Server) -> Result<()> {
        let result = self.server_cmd(
            "pg_ctl",
            &[
                "-D".as_ref(),
                server.data.as_os_str(),
                "-l".as_ref(),
                server.log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        );
        result.map_err(|e| {
            let log = std::fs::read_to_string(&server.log).unwrap_or_default();
            pg_err(format!("{e}; server log:\n{log}"))
        })
    }

    /// Start the reaper: once this process is gone, stop every server and
    /// remove the directory.
    fn start_reaper(&mut self) -> Result<()> {
        let pg_ctl = self.bin.join("pg_ctl");
        let dir = self.dir.path();
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \
             for d in '{dir}'/primary '{dir}'/standby; do \
               [ -f \"$d/postmaster.pid\" ] && '{pg_ctl}' -D \"$d\" -m immediate stop; \
             done; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = dir.display(),
            pg_ctl = pg_ctl.display(),
        );
        let mut cmd = self.as_user("sh");
        cmd.arg("-c").arg(script);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.reaper = Some(child);
        Ok(())
    }

    /// A command run as the `postgres` user when this process is root.
    fn as_user(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Run one of the server binaries (as `postgres` if root), its output
    /// kept out of the test's (the server it starts must not hold our pipes).
    fn server_cmd(&self, name: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
        let log = self.dir.path().join("commands.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let err = out.try_clone()?;
        let status = self
            .as_user(self.bin.join(name))
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()?;
        if status.success() {
            Ok(())
        } else {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Err(pg_err(format!("{name} failed ({status}):\n{text}")))
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut reaper) = self.reaper.take() {
            // The reaper runs as another user when we are root; it ends by
            // itself once this process exits. Reap it if it already did.
            let _ = reaper.try_wait();
        }
    }
}

/// The postmaster's pid: the first line of `postmaster.pid`.
fn postmaster_pid(data: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid"))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| pg_err("unreadable postmaster.pid"))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(pg_err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
