//! Setting the relay up: configuration precedence (through the real
//! binary, so the real environment is read), retention parsing, the dev
//! certificate's lifetime and reuse, and the binary's startup lines and
//! graceful exit on SIGTERM.

// Helpers below fail the test by panicking, as test code does.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{http_get, within};
use hush_relay::config::{format_duration, parse_retention};
use hush_relay::tls::{
    BROWSER_MAX_SPAN_SECS, DEV_KEY_FILE, DevCertStatus, der_validity, generate_dev_cert,
    load_or_create_dev_cert, parse_pem,
};
use hush_relay::{Config, ManualClock, RelayHandle};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_hush-relay");

/// Run the binary with `args` and `env` (nothing else from the environment
/// that starts with HUSH_); returns (exit code, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HUSH_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn config_file_rejects_an_unknown_key_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, "dev-cert = true\nretension = \"7d\"\n").unwrap();
    let (code, _, err) = run(&["--config", file.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("retension"), "{err}");
    assert!(err.contains("relay.toml"), "{err}");
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "dev-cert = true\nlisten = \"127.0.0.1:1111\"\nretention = \"1d\"\nsend-rate = 5\ndata = \"store\"\n",
    )
    .unwrap();
    let (code, out, err) = run(
        &[
            "--config",
            file.to_str().unwrap(),
            "--retention",
            "3d",
            "--print-config",
        ],
        &[("HUSH_LISTEN", "127.0.0.1:2222"), ("HUSH_RETENTION", "2d")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("listen = \"127.0.0.1:2222\""),
        "env over file:\n{out}"
    );
    assert!(out.contains("retention = \"3d\""), "flag over env:\n{out}");
    assert!(out.contains("send-rate = 5"), "file over default:\n{out}");
    assert!(out.contains("max-envelope = 65536"), "default:\n{out}");
    // Relative paths in the file are relative to the file.
    let data = dir.path().join("store");
    assert!(
        out.contains(&format!("data = \"{}\"", data.display())),
        "{out}"
    );

    // Without a certificate choice the relay refuses to start.
    let (code, _, err) = run(&["--print-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--dev-cert"), "{err}");
}

#[test]
fn help_documents_every_option_and_its_variable() {
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for (flag, var) in [
        ("--listen", "HUSH_LISTEN"),
        ("--data", "HUSH_DATA"),
        ("--http", "HUSH_HTTP"),
        ("--dev-cert", "HUSH_DEV_CERT"),
        ("--cert", "HUSH_CERT"),
        ("--key", "HUSH_KEY"),
        ("--retention", "HUSH_RETENTION"),
        ("--max-envelope", "HUSH_MAX_ENVELOPE"),
        ("--inbox-max-messages", "HUSH_INBOX_MAX_MESSAGES"),
        ("--inbox-max-bytes", "HUSH_INBOX_MAX_BYTES"),
        ("--send-rate", "HUSH_SEND_RATE"),
        ("--demo", "HUSH_DEMO"),
        ("--config", "HUSH_CONFIG"),
        ("--workers", "HUSH_WORKERS"),
    ] {
        assert!(out.contains(flag), "{flag} missing from --help");
        assert!(out.contains(var), "{var} missing from --help");
    }
}

#[test]
fn retention_takes_units() {
    assert_eq!(parse_retention("30d"), Ok(Duration::from_secs(30 * 86_400)));
    assert_eq!(parse_retention("36h"), Ok(Duration::from_secs(36 * 3600)));
    assert_eq!(parse_retention("10m"), Ok(Duration::from_secs(600)));
    assert_eq!(parse_retention("90s"), Ok(Duration::from_secs(90)));
    assert!(parse_retention("30").is_err());
    assert!(parse_retention("30y").is_err());
    assert!(parse_retention("0s").is_err());
    assert_eq!(format_duration(parse_retention("48h").unwrap()), "2d");
    let (code, _, err) = run(&["--dev-cert", "--retention", "30", "--print-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("add a unit"), "{err}");
}

#[test]
fn dev_cert_is_short_lived_reused_and_renewed_near_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_unix();
    let (first, status) = load_or_create_dev_cert(dir.path(), now).unwrap();
    assert_eq!(status, DevCertStatus::Generated);
    let (nb, na) = der_validity(&first.info.der).unwrap();
    assert!(nb <= now && now < na);
    assert!(
        na - nb < BROWSER_MAX_SPAN_SECS,
        "browsers reject 14 days or more"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(DEV_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let (again, status) = load_or_create_dev_cert(dir.path(), now + 3600).unwrap();
    assert_eq!(status, DevCertStatus::Reused);
    assert_eq!(again.info.sha256_hex, first.info.sha256_hex);

    // Less than two days left: a new one, valid from then on.
    let later = na - 86_400;
    let (renewed, status) = load_or_create_dev_cert(dir.path(), later).unwrap();
    assert_eq!(status, DevCertStatus::Generated);
    assert_ne!(renewed.info.sha256_hex, first.info.sha256_hex);
    let (nb2, na2) = der_validity(&renewed.info.der).unwrap();
    assert!(nb2 <= later && later + 2 * 86_400 < na2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cert_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let config = Config::default_for(dir.path().to_path_buf());
    let relay = RelayHandle::start(config.clone(), clock.clone())
        .await
        .unwrap();
    let hash = relay.cert_sha256_hex();
    assert_eq!(hash.len(), 64);
    relay.shutdown().await.unwrap();
    let relay = RelayHandle::start(config, clock).await.unwrap();
    assert_eq!(relay.cert_sha256_hex(), hash);
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_certificate_files_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) = generate_dev_cert(now_unix()).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    let expected = parse_pem(cert_pem.as_bytes(), key_pem.as_bytes())
        .unwrap()
        .info;

    let mut config = Config::default_for(dir.path().join("data"));
    config.dev_cert = false;
    config.cert = Some(cert);
    config.key = Some(key);
    let relay = RelayHandle::start(config, Arc::new(ManualClock::new(1)))
        .await
        .unwrap();
    assert_eq!(relay.cert_sha256_hex(), expected.sha256_hex);
    assert_eq!(relay.cert_der(), expected.der);
    let mut client = common::Client::connect(relay.quic_addr(), &relay.cert_der()).await;
    let reply = client.request(hush_protocol::Request::Ping).await;
    assert!(matches!(
        reply,
        hush_protocol::ServerFrame::Response {
            response: hush_protocol::Response::Pong { relay_time_ms: 1 },
            ..
        }
    ));
    assert!(
        !dir.path()
            .join("data")
            .join(hush_relay::tls::DEV_CERT_FILE)
            .exists(),
        "no dev certificate is made when files are given"
    );
    relay.shutdown().await.unwrap();
}

/// Start the binary on loopback with a development certificate, an HTTP
/// listener and `extra` flags, in `dir`; returns it with its four startup
/// lines (QUIC, HTTP and WebSocket addresses, certificate hash).
async fn start_binary(dir: &std::path::Path, extra: &[&str]) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--dev-cert",
        ])
        .args(extra)
        .arg("--data")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = within(
        "the startup lines",
        tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .take(4)
                .map(|l| l.unwrap())
                .collect::<Vec<_>>()
        }),
    )
    .await
    .unwrap();
    (child, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_its_addresses_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, lines) = start_binary(dir.path(), &[]).await;
    assert!(
        lines[0].starts_with("hush-relay listening on 127.0.0.1:"),
        "{lines:?}"
    );
    let field = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:?}"))
            .to_string()
    };
    let http: std::net::SocketAddr = field("http on ").parse().unwrap();
    // The WebSocket listener shares the QUIC port number (over TCP).
    let quic_port = lines[0].rsplit(':').next().unwrap().to_string();
    assert_eq!(
        field("websocket on ").rsplit(':').next(),
        Some(quic_port.as_str())
    );
    let hash = field("certificate sha256: ");
    assert_eq!(hash.len(), 64);
    let (status, _, body) = http_get(http, "GET /certificate.sha256 HTTP/1.1").await;
    assert_eq!((status, body.trim()), (200, hash.as_str()));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = within(
        "the relay to exit",
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `--workers N` sets how many threads run the connections: the binary's
/// runtime reports exactly N in `/metrics`, and the relay answers on them.
/// Without the flag it runs one per core but one (at least one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_flag_sets_the_connection_threads() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (flag, n) in [
        (None, cores.saturating_sub(1).max(1)),
        (Some(1), 1),
        (Some(3), 3),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let count = flag.map(|f: usize| f.to_string());
        let extra: Vec<&str> = match &count {
            Some(c) => vec!["--workers", c],
            None => Vec::new(),
        };
        let (mut child, lines) = start_binary(dir.path(), &extra).await;
        let http: std::net::SocketAddr = lines[1]
            .strip_prefix("http on ")
            .unwrap_or_else(|| panic!("no http line in {lines:?}"))
            .parse()
            .unwrap();
        let (status, _, body) = http_get(http, "GET /metrics HTTP/1.1").await;
        assert_eq!(status, 200, "the relay answers with --workers {flag:?}");
        assert!(
            body.lines()
                .any(|l| l == format!("hush_runtime_workers {n}")),
            "--workers {flag:?} on {cores} cores: {body}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
