//! A real `hush-relay` process on 127.0.0.1.
//!
//! The harness starts the binary with ephemeral ports and a development
//! certificate, learns its addresses and certificate hash from the three lines
//! it prints on stdout once listening, and copies everything it writes (stdout
//! and stderr) into a log file beside the data directory: for post-mortems, and
//! so tests can check that the relay never logs plaintext.

use crate::device::RelayTarget;
use crate::wait::{wait_until, within};
use crate::{HarnessError, Result, bin_path};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a relay may take from spawn to printing its addresses.
pub const STARTUP_BOUND: Duration = Duration::from_secs(20);

/// How long a relay may take to exit after SIGTERM.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(15);

/// Bound on one HTTP request to the relay.
const HTTP_BOUND: Duration = Duration::from_secs(5);

/// Attempts to rebind the previous port on restart before taking a new one.
const SAME_PORT_ATTEMPTS: u32 = 3;

/// What the stdout reader learned.
enum StartupLine {
    Quic(SocketAddr),
    Http(SocketAddr),
    CertHash([u8; 32]),
    Ws(SocketAddr),
    Eof,
}

/// A running (or stopped) relay process. Dropping it kills the process.
pub struct RelayProcess {
    bin: PathBuf,
    data_dir: PathBuf,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    child: Option<Child>,
    /// The thread copying the child's stderr into the log: joined before a
    /// failed start reads the log, so the relay's last words are in it.
    stderr_copier: Option<std::thread::JoinHandle<()>>,
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    cert_sha256: [u8; 32],
    starts: u32,
    // Declared last: removed only after `Drop` has killed the process.
    temp: Option<tempfile::TempDir>,
    /// `RLIMIT_FSIZE` for the process, in bytes, if any (see
    /// [`RelayProcess::spawn_temp_with_file_size_limit`]).
    file_size_limit: Option<u64>,
}

impl std::fmt::Debug for RelayProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayProcess")
            .field("data_dir", &self.data_dir)
            .field("quic_addr", &self.quic_addr)
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("starts", &self.starts)
            .finish()
    }
}

impl RelayProcess {
    /// Start `hush-relay --listen 127.0.0.1:0 --data DATA_DIR --http
    /// 127.0.0.1:0 --dev-cert EXTRA_ARGS…` with `RUST_LOG=info`.
    pub async fn spawn(data_dir: &Path, extra_args: &[&str]) -> Result<RelayProcess> {
        Self::spawn_with_env(data_dir, extra_args, &[]).await
    }

    /// [`RelayProcess::spawn`] with extra environment variables (they win
    /// over the harness defaults, e.g. `("RUST_LOG", "trace")`). Inherited
    /// `HUSH_*` variables are removed so a developer's shell cannot change
    /// what a test runs.
    pub async fn spawn_with_env(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<RelayProcess> {
        let mut relay = Self::unstarted(data_dir, extra_args, env)?;
        relay.start(([127, 0, 0, 1], 0).into()).await?;
        Ok(relay)
    }

    /// The process's settings, before its first start.
    fn unstarted(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<RelayProcess> {
        std::fs::create_dir_all(data_dir)?;
        let unspecified: SocketAddr = ([127, 0, 0, 1], 0).into();
        Ok(RelayProcess {
            bin: bin_path("hush-relay")?,
            data_dir: data_dir.to_path_buf(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log_path: data_dir.with_extension("log"),
            child: None,
            stderr_copier: None,
            quic_addr: unspecified,
            http_addr: unspecified,
            ws_addr: None,
            cert_sha256: [0; 32],
            starts: 0,
            temp: None,
            file_size_limit: None,
        })
    }

    /// Start a relay in a fresh temporary directory (data in `data/`, log in
    /// `data.log`), removed when the process is dropped. Every test relay
    /// should get its own.
    pub async fn spawn_temp(extra_args: &[&str]) -> Result<RelayProcess> {
        Self::spawn_temp_with_env(extra_args, &[]).await
    }

    /// [`RelayProcess::spawn_temp`] with extra environment variables.
    pub async fn spawn_temp_with_env(
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<RelayProcess> {
        let temp = tempfile::Builder::new()
            .prefix("hush-relay-test")
            .tempdir()?;
        let mut relay = Self::spawn_with_env(&temp.path().join("data"), extra_args, env).await?;
        relay.temp = Some(temp);
        Ok(relay)
    }

    /// [`RelayProcess::spawn_temp`] of another binary that takes the relay's
    /// flags and prints its lines (the benchmarks' `relay_memory`).
    pub async fn spawn_temp_of(bin: &Path, extra_args: &[&str]) -> Result<RelayProcess> {
        let temp = tempfile::Builder::new()
            .prefix("hush-relay-test")
            .tempdir()?;
        let mut relay = Self::unstarted(&temp.path().join("data"), extra_args, &[])?;
        relay.bin = bin.to_path_buf();
        relay.temp = Some(temp);
        relay.start(([127, 0, 0, 1], 0).into()).await?;
        Ok(relay)
    }

    /// [`RelayProcess::spawn_temp`] for a relay that may write no file past
    /// about `bytes` (its `RLIMIT_FSIZE`, set by `sh`'s `ulimit -f`, with
    /// `SIGXFSZ` ignored): a write beyond it fails with `EFBIG`, as a full
    /// disk fails one with `ENOSPC`, while the rest of the machine goes on.
    /// [`RelayProcess::clear_file_size_limit`] lifts it for the next start.
    pub async fn spawn_temp_with_file_size_limit(
        extra_args: &[&str],
        bytes: u64,
    ) -> Result<RelayProcess> {
        let temp = tempfile::Builder::new()
            .prefix("hush-relay-test")
            .tempdir()?;
        let mut relay = Self::unstarted(&temp.path().join("data"), extra_args, &[])?;
        relay.temp = Some(temp);
        relay.file_size_limit = Some(bytes);
        relay.start(([127, 0, 0, 1], 0).into()).await?;
        Ok(relay)
    }

    /// Start later processes without the file size limit.
    pub fn clear_file_size_limit(&mut self) {
        self.file_size_limit = None;
    }

    /// Keep the temporary directory (data and log) after the test, for a
    /// post-mortem; returns its path.
    pub fn keep_files(&mut self) -> Option<PathBuf> {
        self.temp.take().map(|t| t.keep())
    }

    /// `GET path` on the HTTP listener: status code and body (bounded by a
    /// 5 s socket timeout).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let mut stream = std::net::TcpStream::connect_timeout(&self.http_addr, HTTP_BOUND)?;
        stream.set_read_timeout(Some(HTTP_BOUND))?;
        stream.set_write_timeout(Some(HTTP_BOUND))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HarnessError::Process(format!("bad HTTP response: {text:.80}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// The QUIC address (`hush/1` and `h3`).
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The HTTP address (demo page, metrics, certificate hash).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The TCP address of the TLS WebSocket listener (`wss://ADDR/ws`), if on.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// SHA-256 of the relay's certificate (DER), as printed at startup.
    pub fn cert_sha256(&self) -> [u8; 32] {
        self.cert_sha256
    }

    /// Where and whom a client connects to.
    pub fn target(&self) -> RelayTarget {
        RelayTarget {
            addr: self.quic_addr,
            cert_sha256: self.cert_sha256,
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file holding everything the relay printed, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log's raw bytes.
    pub fn log_bytes(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(&self.log_path)?)
    }

    /// How many times the process was started (1 after `spawn`).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The OS process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kill the process with SIGKILL (no chance to flush or clean up) and
    /// reap it.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine: kill() then reports an error we ignore.
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// Ask the process to shut down gracefully (SIGTERM) and wait for it to
    /// exit, at most [`SHUTDOWN_BOUND`].
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        let Some(child) = self.child.as_ref() else {
            return Err(HarnessError::Process("relay is not running".into()));
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        if !status.success() {
            return Err(HarnessError::Process(format!(
                "kill -TERM failed: {status}"
            )));
        }
        self.wait_exit(SHUTDOWN_BOUND, "relay exit after SIGTERM")
            .await
    }

    /// Wait for the process to exit by itself, at most `bound` (then it is
    /// killed and `what` names the timeout in the error).
    pub async fn wait_exit(&mut self, bound: Duration, what: &str) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(HarnessError::Process("relay is not running".into()));
        };
        let mut exit = None;
        let waited = wait_until(bound, what, || match child.try_wait() {
            Ok(Some(s)) => {
                exit = Some(s);
                true
            }
            Ok(None) => false,
            Err(_) => true,
        })
        .await;
        if let Err(e) = waited {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        match exit {
            Some(s) => Ok(s),
            None => Ok(child.wait()?),
        }
    }

    /// Start the process again on the same data directory, on the same QUIC
    /// port if it can be rebound (after SIGKILL it normally can at once), else
    /// on a fresh one. Kills the running process first if there is one.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        let previous = self.quic_addr;
        let mut last_err = None;
        for _ in 0..SAME_PORT_ATTEMPTS {
            match self.start(previous).await {
                Ok(()) => return Ok(()),
                Err(e) => last_err = Some(e),
            }
        }
        let fresh: SocketAddr = ([127, 0, 0, 1], 0).into();
        match self.start(fresh).await {
            Ok(()) => Ok(()),
            Err(e) => Err(last_err.unwrap_or(e)),
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    async fn start(&mut self, listen: SocketAddr) -> Result<()> {
        self.starts += 1;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let log = Arc::new(Mutex::new(log));
        let mut args: Vec<String> = vec![
            "--listen".into(),
            listen.to_string(),
            "--data".into(),
            self.data_dir.display().to_string(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--dev-cert".into(),
        ];
        args.extend(self.extra_args.iter().cloned());
        if let Ok(mut f) = log.lock() {
            writeln!(f, "=== harness: start #{}: {}", self.starts, args.join(" "))?;
        }
        let mut cmd = match self.file_size_limit {
            None => Command::new(&self.bin),
            Some(bytes) => {
                // `exec` keeps the pid: signals and waits reach the relay.
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!(
                        "trap '' XFSZ; ulimit -f {}; exec \"$0\" \"$@\"",
                        bytes.div_ceil(512).max(1)
                    ))
                    .arg(&self.bin);
                sh
            }
        };
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HUSH_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("RUST_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            let log = log.clone();
            std::thread::spawn(move || copy_stdout(out, log, tx));
        }
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            self.stderr_copier = Some(std::thread::spawn(move || copy_stderr(err, log)));
        }
        self.child = Some(child);

        let mut quic = None;
        let mut http = None;
        let mut hash = None;
        let mut ws = None;
        let waited = within(STARTUP_BOUND, "relay startup lines on stdout", async {
            while quic.is_none() || http.is_none() || hash.is_none() {
                match rx.recv().await {
                    Some(StartupLine::Quic(a)) => quic = Some(a),
                    Some(StartupLine::Http(a)) => http = Some(a),
                    Some(StartupLine::CertHash(h)) => hash = Some(h),
                    Some(StartupLine::Ws(a)) => ws = Some(a),
                    Some(StartupLine::Eof) | None => return false,
                }
            }
            true
        })
        .await;
        match (waited, quic, http, hash) {
            (Ok(true), Some(q), Some(h), Some(c)) => {
                self.quic_addr = q;
                self.http_addr = h;
                self.ws_addr = ws;
                self.cert_sha256 = c;
                Ok(())
            }
            (waited, ..) => {
                self.kill9()?;
                // The process is gone, so its stderr reaches EOF: wait for
                // the copy, or the log tail may miss why it exited.
                if let Some(copier) = self.stderr_copier.take() {
                    let _ = copier.join();
                }
                let why = match waited {
                    Err(e) => e.to_string(),
                    Ok(_) => "relay exited before it was listening".to_string(),
                };
                Err(HarnessError::Process(format!(
                    "{why}; log tail:\n{}",
                    self.log_tail(40)
                )))
            }
        }
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
        // A failing test keeps the relay's data and log for a post-mortem.
        if std::thread::panicking()
            && let Some(path) = self.keep_files()
        {
            eprintln!(
                "relay data and log kept for post-mortem: {} (log: {})",
                path.display(),
                self.log_path.display()
            );
        }
    }
}

fn append(log: &Mutex<File>, line: &[u8]) {
    if let Ok(mut f) = log.lock() {
        let _ = f.write_all(line);
        if !line.ends_with(b"\n") {
            let _ = f.write_all(b"\n");
        }
    }
}

fn copy_stdout(out: impl Read, log: Arc<Mutex<File>>, tx: mpsc::UnboundedSender<StartupLine>) {
    let mut reader = BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                append(&log, &line);
                if let Some(parsed) = parse_startup_line(&String::from_utf8_lossy(&line)) {
                    let _ = tx.send(parsed);
                }
            }
        }
    }
    let _ = tx.send(StartupLine::Eof);
}

fn copy_stderr(err: impl Read, log: Arc<Mutex<File>>) {
    let mut reader = BufReader::new(err);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => append(&log, &line),
        }
    }
}

fn first_token(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

fn parse_startup_line(line: &str) -> Option<StartupLine> {
    if let Some(i) = line.find("listening on ") {
        return first_token(&line[i + "listening on ".len()..])
            .trim_end_matches(',')
            .parse()
            .ok()
            .map(StartupLine::Quic);
    }
    if let Some(i) = line.find("websocket on ") {
        return first_token(&line[i + "websocket on ".len()..])
            .parse()
            .ok()
            .map(StartupLine::Ws);
    }
    if let Some(i) = line.find("http on ") {
        let token = first_token(&line[i + "http on ".len()..]);
        let token = token.trim_start_matches("http://").trim_end_matches('/');
        return token.parse().ok().map(StartupLine::Http);
    }
    if let Some(i) = line.find("sha256: ") {
        let token = first_token(&line[i + "sha256: ".len()..]).replace(':', "");
        let mut hash = [0u8; 32];
        return hex::decode_to_slice(token, &mut hash)
            .ok()
            .map(|()| StartupLine::CertHash(hash));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_startup_lines() {
        match parse_startup_line("hush-relay listening on 127.0.0.1:4433\n") {
            Some(StartupLine::Quic(a)) => assert_eq!(a.port(), 4433),
            _ => panic!("quic line not parsed"),
        }
        match parse_startup_line("http on 127.0.0.1:8080") {
            Some(StartupLine::Http(a)) => assert_eq!(a.port(), 8080),
            _ => panic!("http line not parsed"),
        }
        let hex = "ab".repeat(32);
        match parse_startup_line(&format!("certificate sha256: {hex}")) {
            Some(StartupLine::CertHash(h)) => assert_eq!(h, [0xab; 32]),
            _ => panic!("hash line not parsed"),
        }
        assert!(parse_startup_line("something else").is_none());
        assert!(parse_startup_line("certificate sha256: nothex").is_none());
    }
}
