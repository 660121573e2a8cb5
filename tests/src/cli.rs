//! Driving the real `hush` binary from tests.
//!
//! [`Hush`] is one device: a home directory and the binary. Every run is a
//! child process with captured output and a bound on its running time (a
//! hung command is killed and reported as a timeout, never waited on
//! forever). [`Background`] is a long-running command (`listen`) whose
//! output lines are collected as they arrive and which is stopped with
//! SIGTERM.

use crate::binaries::bin_path_in;
use crate::process::RelayProcess;
use crate::wait::wait_until;
use crate::{HarnessError, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest any one `hush` command may run in a test.
pub const RUN_BOUND: Duration = Duration::from_secs(90);
/// How long a background command may take to exit after SIGTERM.
const STOP_BOUND: Duration = Duration::from_secs(15);

/// The `hush` binary (package `hush-cli`), built if needed.
pub fn hush_bin() -> Result<PathBuf> {
    bin_path_in("hush-cli", "hush")
}

/// What one finished command printed.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Exited 0.
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// The exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stdout parsed as JSON lines (lines that do not parse are skipped).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        json_lines(self.stdout.lines())
    }

    /// The `"type": "message"` objects of stdout.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        of_type(&self.json_lines(), "message")
    }
}

/// Parse lines as JSON, skipping those that are not.
pub fn json_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<serde_json::Value> {
    lines
        .into_iter()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect()
}

/// The objects with this `type`.
pub fn of_type(values: &[serde_json::Value], kind: &str) -> Vec<serde_json::Value> {
    values
        .iter()
        .filter(|v| v.get("type").and_then(|t| t.as_str()) == Some(kind))
        .cloned()
        .collect()
}

/// The `text` field of each message.
pub fn texts(messages: &[serde_json::Value]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| m.get("text").and_then(|t| t.as_str()).map(str::to_string))
        .collect()
}

fn collect(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// One device: a home directory used with the `hush` binary.
#[derive(Debug, Clone)]
pub struct Hush {
    bin: PathBuf,
    home: PathBuf,
}

impl Hush {
    /// A device whose home is `dir/name` (not created until `init`).
    pub fn new(dir: &Path, name: &str) -> Result<Hush> {
        Ok(Hush {
            bin: hush_bin()?,
            home: dir.join(name),
        })
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--home")
            .arg(&self.home)
            .args(args)
            .env_remove("HUSH_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Run `hush --home HOME ARGS…` to completion (at most [`RUN_BOUND`]).
    pub async fn run(&self, args: &[&str]) -> Result<CliOutput> {
        let mut child = self.command(args).spawn()?;
        let out = child.stdout.take().map(collect);
        let err = child.stderr.take().map(collect);
        let mut status = None;
        let what = format!("hush {}", args.join(" "));
        let waited = wait_until(RUN_BOUND, &what, || match child.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
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
        let status = match status {
            Some(s) => s,
            None => child.wait()?,
        };
        let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
        Ok(CliOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// [`Hush::run`], failing unless the command exits 0.
    pub async fn run_ok(&self, args: &[&str]) -> Result<CliOutput> {
        let out = self.run(args).await?;
        if out.ok() {
            Ok(out)
        } else {
            Err(HarnessError::Process(format!(
                "hush {} exited {:?}\nstdout: {}\nstderr: {}",
                args.join(" "),
                out.code(),
                out.stdout,
                out.stderr
            )))
        }
    }

    /// `init` a new user on `relay` (pinning its certificate).
    pub async fn init(&self, relay: &RelayProcess, name: &str) -> Result<CliOutput> {
        let addr = relay.quic_addr().to_string();
        let hash = hex::encode(relay.cert_sha256());
        self.run_ok(&[
            "init",
            "--relay",
            &addr,
            "--cert-hash",
            &hash,
            "--name",
            name,
        ])
        .await
    }

    /// `init --link CODE`: another device of an existing user.
    pub async fn init_linked(&self, relay: &RelayProcess, code: &str) -> Result<CliOutput> {
        let addr = relay.quic_addr().to_string();
        let hash = hex::encode(relay.cert_sha256());
        self.run_ok(&[
            "init",
            "--relay",
            &addr,
            "--cert-hash",
            &hash,
            "--link",
            code,
            "--wait",
            "0",
        ])
        .await
    }

    /// This user's contact code.
    pub async fn code(&self) -> Result<String> {
        Ok(self.run_ok(&["code"]).await?.stdout.trim().to_string())
    }

    /// A one-time link code.
    pub async fn link_code(&self) -> Result<String> {
        let out = self.run_ok(&["link-code"]).await?;
        out.stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("hush-link:"))
            .map(str::to_string)
            .ok_or_else(|| HarnessError::Process(format!("no link code in {:?}", out.stdout)))
    }

    /// `contact add NAME CODE`.
    pub async fn add_contact(&self, name: &str, code: &str) -> Result<()> {
        self.run_ok(&["contact", "add", name, code])
            .await
            .map(|_| ())
    }

    /// `sync --json` to completion; the message objects it printed.
    pub async fn sync_messages(&self) -> Result<Vec<serde_json::Value>> {
        Ok(self.run_ok(&["sync", "--json"]).await?.messages())
    }

    /// `history NAME --json --limit N`.
    pub async fn history(&self, name: &str, limit: usize) -> Result<Vec<serde_json::Value>> {
        let limit = limit.to_string();
        Ok(self
            .run_ok(&["history", name, "--json", "--limit", &limit])
            .await?
            .messages())
    }

    /// `status --json` as one object.
    pub async fn status(&self) -> Result<serde_json::Value> {
        let out = self.run_ok(&["status", "--json"]).await?;
        out.json_lines()
            .into_iter()
            .next()
            .ok_or_else(|| HarnessError::Process(format!("no status JSON in {:?}", out.stdout)))
    }

    /// Start a long-running command (e.g. `listen --json`).
    pub fn spawn(&self, args: &[&str]) -> Result<Background> {
        let mut child = self.command(args).spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().map(|o| {
            let lines = lines.clone();
            std::thread::spawn(move || {
                let reader = BufReader::new(o);
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut l) = lines.lock() {
                        l.push(line);
                    }
                }
            })
        });
        let err = child.stderr.take().map(collect);
        Ok(Background {
            child: Some(child),
            lines,
            out,
            err,
        })
    }
}

/// A running `hush` command. Dropping it kills the process.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    out: Option<std::thread::JoinHandle<()>>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Background {
    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Stdout lines so far, parsed as JSON.
    pub fn json(&self) -> Vec<serde_json::Value> {
        let lines = self.lines();
        json_lines(lines.iter().map(String::as_str))
    }

    /// Wait (bounded) until `cond` holds for the JSON lines printed so far.
    pub async fn wait_for(
        &self,
        bound: Duration,
        what: &str,
        mut cond: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Result<()> {
        wait_until(bound, what, || cond(&self.json())).await
    }

    /// Wait (bounded) for the command to exit on its own; returns the
    /// status and stderr. On timeout it is killed and an error returned.
    pub async fn wait_exit(&mut self, bound: Duration) -> Result<(ExitStatus, String)> {
        let Some(mut child) = self.child.take() else {
            return Err(HarnessError::Process("not running".into()));
        };
        let mut status = None;
        let waited = wait_until(bound, "hush to exit", || match child.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
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
        let status = match status {
            Some(s) => s,
            None => child.wait()?,
        };
        if let Some(h) = self.out.take() {
            let _ = h.join();
        }
        let stderr = self
            .err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ok((status, stderr))
    }

    /// SIGTERM, wait for the exit (bounded); returns the status and stderr.
    pub async fn stop(&mut self) -> Result<(ExitStatus, String)> {
        let Some(mut child) = self.child.take() else {
            return Err(HarnessError::Process("not running".into()));
        };
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        if !sent.success() {
            let _ = child.kill();
        }
        let mut status = None;
        let waited = wait_until(STOP_BOUND, "hush to exit after SIGTERM", || {
            match child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    true
                }
                Ok(None) => false,
                Err(_) => true,
            }
        })
        .await;
        if let Err(e) = waited {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let status = match status {
            Some(s) => s,
            None => child.wait()?,
        };
        if let Some(h) = self.out.take() {
            let _ = h.join();
        }
        let stderr = self
            .err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ok((status, stderr))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two new users on `relay`, `alice` and `bob`, who added each other as
/// contacts under those names.
pub async fn pair(relay: &RelayProcess, dir: &Path) -> Result<(Hush, Hush)> {
    let alice = Hush::new(dir, "alice")?;
    let bob = Hush::new(dir, "bob")?;
    alice.init(relay, "alice").await?;
    bob.init(relay, "bob").await?;
    alice.add_contact("bob", &bob.code().await?).await?;
    bob.add_contact("alice", &alice.code().await?).await?;
    Ok((alice, bob))
}

/// A Prometheus sample from the relay's `/metrics` (the first line whose
/// name matches exactly).
pub fn metric(relay: &RelayProcess, name: &str) -> Result<Option<f64>> {
    let (status, body) = relay.http_get("/metrics")?;
    if status != 200 {
        return Err(HarnessError::Process(format!("/metrics answered {status}")));
    }
    Ok(body.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    }))
}
