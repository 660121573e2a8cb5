//! `hush` state at rest: the home is private to the user, and nothing in it
//! gives away message text or opens without the store's key.
//!
//! Real relay process, real `hush` processes, 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_tests::RelayProcess;
use hush_tests::cli::{CliOutput, Hush, hush_bin, pair, texts};
use hush_tests::wait::wait_until;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

#[cfg(unix)]
fn assert_private(home: &Path) {
    assert_eq!(mode(home), 0o700, "{}", home.display());
    for f in files_under(home) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_home_and_its_files_are_tightened_on_every_open() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alice = Hush::new(dir.path(), "alice").unwrap();
    // The home exists already, world-readable, with a world-readable file.
    std::fs::create_dir(alice.home()).unwrap();
    set_mode(alice.home(), 0o755);
    let notes = alice.home().join("notes.txt");
    std::fs::write(&notes, "x").unwrap();
    set_mode(&notes, 0o644);

    alice.init(&relay, "alice").await.unwrap();
    for f in [
        "client.redb",
        "client.redb-journal",
        "relay.json",
        "store.key",
    ] {
        assert!(alice.home().join(f).is_file(), "{f}");
    }
    assert_private(alice.home());

    // Loosened again (a restore from a backup, a careless chmod): any
    // command tightens it back.
    set_mode(alice.home(), 0o755);
    set_mode(&alice.home().join("client.redb"), 0o644);
    set_mode(&alice.home().join("store.key"), 0o644);
    set_mode(&notes, 0o666);
    alice.status().await.unwrap();
    assert_private(alice.home());
}

/// `needle` as UTF-8, UTF-16LE and UTF-16BE.
fn encodings(needle: &str) -> Vec<Vec<u8>> {
    let le: Vec<u8> = needle.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let be: Vec<u8> = needle.encode_utf16().flat_map(u16::to_be_bytes).collect();
    vec![needle.as_bytes().to_vec(), le, be]
}

fn find_in(home: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for f in files_under(home) {
        let bytes = std::fs::read(&f).unwrap();
        for (i, enc) in encodings(needle).iter().enumerate() {
            if bytes.windows(enc.len()).any(|w| w == enc.as_slice()) {
                hits.push(format!("{} (encoding {i})", f.display()));
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_text_is_found_in_either_home() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    let sent = "Quixotic-Zephyr-7731 meets the walrus at dawn";
    let reply = "Xylophone-Umbra-5512 says the walrus is late";
    alice.run_ok(&["send", "bob", sent]).await.unwrap();
    assert_eq!(texts(&bob.sync_messages().await.unwrap()), vec![sent]);
    bob.run_ok(&["send", "alice", reply]).await.unwrap();
    assert_eq!(texts(&alice.sync_messages().await.unwrap()), vec![reply]);
    // Both texts are in both histories (so they were stored)…
    for (who, peer) in [(&alice, "bob"), (&bob, "alice")] {
        let h = texts(&who.history(peer, 10).await.unwrap());
        assert_eq!(h, vec![sent, reply], "{}", who.home().display());
    }
    // …and no file of either home holds them, in any common encoding. The
    // needles are checked to be findable: the same search over a file
    // holding them must hit.
    let probe = dir.path().join("probe");
    std::fs::create_dir(&probe).unwrap();
    let mut bytes = Vec::new();
    for enc in encodings(sent) {
        bytes.extend(enc);
    }
    std::fs::write(probe.join("p"), bytes).unwrap();
    assert_eq!(find_in(&probe, sent).len(), 3);
    for home in [alice.home(), bob.home()] {
        for needle in [sent, reply, "Quixotic-Zephyr", "Xylophone-Umbra"] {
            let hits = find_in(home, needle);
            assert!(hits.is_empty(), "{needle:?} found in {hits:?}");
        }
    }
}

/// Run `hush --home HOME ARGS…` with extra environment variables, bounded.
async fn run_env(home: &Path, env: &[(&str, &str)], args: &[&str]) -> CliOutput {
    let mut cmd = Command::new(hush_bin().unwrap());
    cmd.arg("--home")
        .arg(home)
        .args(args)
        .env_remove("HUSH_HOME")
        .env_remove("HUSH_PASSPHRASE")
        .env_remove("HUSH_KEY_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut status = None;
    let waited = wait_until(Duration::from_secs(90), "hush", || {
        status = child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    if waited.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_opens_only_with_its_passphrase_or_key_file() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = relay.quic_addr().to_string();
    let hash = hex::encode(relay.cert_sha256());
    let init = [
        "init",
        "--relay",
        &addr,
        "--cert-hash",
        &hash,
        "--name",
        "carol",
    ];

    // Sealed with a passphrase: no key file is written anywhere.
    let carol = dir.path().join("carol");
    let pass = [("HUSH_PASSPHRASE", "correct horse battery staple")];
    let out = run_env(&carol, &pass, &init).await;
    assert!(out.ok(), "{}", out.stderr);
    assert!(!carol.join("store.key").exists());
    assert!(run_env(&carol, &pass, &["code"]).await.ok());
    // A wrong passphrase: a clear error, exit 1, nothing opened.
    let wrong = [("HUSH_PASSPHRASE", "correct horse battery stable")];
    let out = run_env(&carol, &wrong, &["code"]).await;
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("wrong passphrase"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    // No passphrase at all: refused, and no stray key file is left behind.
    let out = run_env(&carol, &[], &["code"]).await;
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("HUSH_PASSPHRASE"), "{}", out.stderr);
    assert!(!carol.join("store.key").exists());

    // A key file kept outside the home.
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key_file = keys.join("dave.key");
    let kf = key_file.to_str().unwrap();
    let dave = dir.path().join("dave");
    let out = run_env(&dave, &[("HUSH_KEY_FILE", kf)], &init).await;
    assert!(out.ok(), "{}", out.stderr);
    assert!(key_file.is_file());
    assert!(!dave.join("store.key").exists());
    assert!(
        run_env(&dave, &[("HUSH_KEY_FILE", kf)], &["code"])
            .await
            .ok()
    );
    // Without it (the store copied away alone): refused, by name.
    let out = run_env(&dave, &[], &["code"]).await;
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("store.key is missing"),
        "{}",
        out.stderr
    );
    assert!(!dave.join("store.key").exists());
    // Another key: the wrong key, refused.
    let other = keys.join("other.key");
    std::fs::write(&other, format!("{}\n", "ab".repeat(32))).unwrap();
    #[cfg(unix)]
    set_mode(&other, 0o600);
    let out = run_env(
        &dave,
        &[("HUSH_KEY_FILE", other.to_str().unwrap())],
        &["code"],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("wrong key"), "{}", out.stderr);
    #[cfg(unix)]
    {
        // A key file others can read is refused rather than used.
        set_mode(&key_file, 0o644);
        let out = run_env(&dave, &[("HUSH_KEY_FILE", kf)], &["code"]).await;
        assert_eq!(out.code(), Some(1), "{}", out.stderr);
        assert!(out.stderr.contains("readable by others"), "{}", out.stderr);
        set_mode(&key_file, 0o600);
        assert!(
            run_env(&dave, &[("HUSH_KEY_FILE", kf)], &["code"])
                .await
                .ok()
        );
    }
}
