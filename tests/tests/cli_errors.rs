//! `hush` error cases: each names its cause and exits non-zero with the
//! documented status.

use hush_tests::RelayProcess;
use hush_tests::cli::{Hush, pair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_contact_is_refused_by_name() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, _bob) = pair(&relay, dir.path()).await.unwrap();
    let out = alice.run(&["send", "carol", "hello?"]).await.unwrap();
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("unknown contact \"carol\""),
        "stderr: {}",
        out.stderr
    );
    // Nothing was queued.
    let status = alice.status().await.unwrap();
    assert_eq!(status["outbox"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_relay_is_reported_and_the_message_stays_in_the_outbox() {
    // A bound UDP socket that never answers: the handshake can only time out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();

    // init fails cleanly and leaves nothing behind.
    let carol = Hush::new(dir.path(), "carol").unwrap();
    let out = carol
        .run(&["init", "--relay", &addr, "--cert-hash", &"00".repeat(32)])
        .await
        .unwrap();
    assert_eq!(out.code(), Some(3), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains(&format!("relay unreachable at {addr}")),
        "stderr: {}",
        out.stderr
    );
    assert!(!carol.home().join("client.redb").exists());
    assert!(!carol.home().join("client.redb-journal").exists());

    // A device whose relay went away: send fails, the message is kept.
    let mut relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    relay.kill9().unwrap();
    let out = alice
        .run(&["send", "bob", "kept for later", "--wait", "2"])
        .await
        .unwrap();
    assert_eq!(out.code(), Some(3), "stderr: {}", out.stderr);
    let quic = relay.quic_addr().to_string();
    assert!(
        out.stderr.contains(&format!("relay unreachable at {quic}")),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("stays in the outbox"),
        "stderr: {}",
        out.stderr
    );
    let status = alice.status().await.unwrap();
    let outbox = status["outbox"].as_array().unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0]["state"], "sending");
    assert_eq!(outbox[0]["text"], "kept for later");

    // It goes out with the next command that connects.
    relay.restart().await.unwrap();
    assert_eq!(
        relay.quic_addr().to_string(),
        quic,
        "relay came back on its port"
    );
    alice.run_ok(&["sync"]).await.unwrap();
    let got = bob.sync_messages().await.unwrap();
    assert_eq!(
        hush_tests::cli::texts(&got),
        vec!["kept for later".to_string()]
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_hash_is_a_mismatch_naming_both_hashes() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dave = Hush::new(dir.path(), "dave").unwrap();
    let wrong = "ab".repeat(32);
    let addr = relay.quic_addr().to_string();
    let out = dave
        .run(&["init", "--relay", &addr, "--cert-hash", &wrong])
        .await
        .unwrap();
    assert_eq!(out.code(), Some(4), "stderr: {}", out.stderr);
    let expected = format!(
        "certificate mismatch: relay presented sha256 {}, expected {wrong}",
        hex::encode(relay.cert_sha256())
    );
    assert!(out.stderr.contains(&expected), "stderr: {}", out.stderr);
    assert!(!dave.home().join("client.redb").exists());
    assert!(!dave.home().join("client.redb-journal").exists());

    // A malformed hash is a usage error, not a connection attempt.
    let out = dave
        .run(&["init", "--relay", &addr, "--cert-hash", "xyz"])
        .await
        .unwrap();
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("invalid certificate hash"),
        "stderr: {}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialisation_state_errors() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let erin = Hush::new(dir.path(), "erin").unwrap();

    let out = erin.run(&["code"]).await.unwrap();
    assert_eq!(out.code(), Some(6));
    assert!(
        out.stderr.contains("not initialised"),
        "stderr: {}",
        out.stderr
    );

    erin.init(&relay, "erin").await.unwrap();
    let out = erin
        .run(&[
            "init",
            "--relay",
            &relay.quic_addr().to_string(),
            "--cert-hash",
            &hex::encode(relay.cert_sha256()),
        ])
        .await
        .unwrap();
    assert_eq!(out.code(), Some(6));
    assert!(
        out.stderr.contains("already initialised"),
        "stderr: {}",
        out.stderr
    );

    let out = erin
        .run(&["contact", "add", "x", "hush-contact:garbage"])
        .await
        .unwrap();
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("invalid contact code"),
        "stderr: {}",
        out.stderr
    );
}
