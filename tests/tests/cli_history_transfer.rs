//! History transfer end to end with the `hush` CLI: a user with 1,000
//! messages in two conversations links a new device with `hush init --link`;
//! the old device (running `hush listen`) uploads the encrypted history, and
//! the new device shows every message in the same order, with the same read
//! marks and delivery states. `--no-history` gets none.
//!
//! The contacts are in-process drivers of the CLI (in memory), so the
//! history is generated in seconds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_cli::driver::{Discard, Driver, Outcome, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, RelayTarget};
use hush_client::{Command, ContactCode, Engine, MemoryStorage};
use hush_tests::RelayProcess;
use hush_tests::cli::Hush;
use std::time::Duration;
use tokio::time::Instant;

const BOUND: Duration = Duration::from_secs(60);

async fn settle(d: &mut Driver<MemoryStorage>) {
    let mut stop = None;
    let out = d
        .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, |v| {
            v.settled()
        })
        .await
        .unwrap();
    assert_eq!(out, Outcome::Done);
}

async fn contact(target: &RelayTarget, name: &str, alice_code: &str) -> Driver<MemoryStorage> {
    let cfg = cli_engine_config();
    let (engine, step) = Engine::create(
        now_ms(),
        os_seed().unwrap(),
        &target.addr,
        name,
        cfg.clone(),
    )
    .unwrap();
    let mut d = Driver::new(engine, MemoryStorage::new(), cfg, target.clone());
    d.start(step, &mut Discard).await.unwrap();
    let code = ContactCode::parse(alice_code).unwrap();
    d.command(Command::AddContact { code }, &mut Discard)
        .await
        .unwrap();
    settle(&mut d).await;
    d
}

async fn send_many(d: &mut Driver<MemoryStorage>, n: usize, tag: &str) {
    let conversation = d.engine().contacts()[0].2;
    let commands = (0..n)
        .map(|i| Command::SendText {
            conversation,
            text: format!("{tag} {i}"),
        })
        .collect();
    d.commands(commands, &mut Discard).await.unwrap();
    settle(d).await;
}

/// What a user sees of a message in `hush history --json`.
fn shown(history: &[serde_json::Value]) -> Vec<(String, String, bool, bool, serde_json::Value)> {
    history
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["text"].as_str().unwrap().to_string(),
                m["outgoing"].as_bool().unwrap(),
                m["read"].as_bool().unwrap(),
                m["state"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_imports_1000_messages_in_order_with_read_marks_and_states() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alice = Hush::new(dir.path(), "alice").unwrap();
    alice.init(&relay, "alice").await.unwrap();
    let target = RelayTarget {
        addr: relay.quic_addr().to_string(),
        cert: CertCheck::Pinned(relay.cert_sha256()),
        transport: hush_cli::Transport::Quic,
    };
    let alice_code = alice.code().await.unwrap();
    let mut bob = contact(&target, "bob", &alice_code).await;
    let mut carol = contact(&target, "carol", &alice_code).await;
    for (name, d) in [("bob", &bob), ("carol", &carol)] {
        let code = d.engine().contact_code().to_text().unwrap();
        alice.add_contact(name, &code).await.unwrap();
    }

    // 1,000 messages: alice writes some, then both contacts many, then alice again.
    for name in ["bob", "carol"] {
        for i in 0..3 {
            alice
                .run_ok(&["send", name, &format!("alice to {name} {i}")])
                .await
                .unwrap();
        }
    }
    send_many(&mut bob, 495, "bob").await;
    send_many(&mut carol, 495, "carol").await;
    alice.run_ok(&["sync"]).await.unwrap();
    for name in ["bob", "carol"] {
        for i in 3..5 {
            alice
                .run_ok(&["send", name, &format!("alice to {name} {i}")])
                .await
                .unwrap();
        }
    }
    // alice reads bob's messages; the contacts' receipts come back.
    alice.run_ok(&["read", "bob"]).await.unwrap();
    settle(&mut bob).await;
    settle(&mut carol).await;
    alice.run_ok(&["sync"]).await.unwrap();
    let old_bob = alice.history("bob", 5000).await.unwrap();
    let old_carol = alice.history("carol", 5000).await.unwrap();
    assert_eq!(old_bob.len() + old_carol.len(), 1000);
    assert!(
        old_bob
            .iter()
            .all(|m| m["outgoing"] == true || m["read"] == true)
    );
    assert!(old_carol.iter().any(|m| m["read"] == false));
    assert!(
        old_bob
            .iter()
            .any(|m| m["state"] == "delivered" || m["state"] == "read"),
        "receipts: {:?}",
        &old_bob[..3]
    );

    // Link a new device while the old one listens.
    let code = alice.link_code().await.unwrap();
    let mut listener = alice.spawn(&["listen", "--json"]).unwrap();
    let alice2 = Hush::new(dir.path(), "alice2").unwrap();
    let addr = relay.quic_addr().to_string();
    let hash = hex::encode(relay.cert_sha256());
    let out = alice2
        .run_ok(&[
            "init",
            "--relay",
            &addr,
            "--cert-hash",
            &hash,
            "--link",
            &code,
            "--wait",
            "60",
        ])
        .await
        .unwrap();
    assert!(
        out.stdout.contains("history imported"),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("importing 1000 of 1000"),
        "{}",
        out.stderr
    );
    listener
        .wait_for(Duration::from_secs(10), "history_exported", |lines| {
            lines
                .iter()
                .any(|l| l["type"] == "history_exported" && l["messages"] == 1000)
        })
        .await
        .unwrap();
    listener.stop().await.unwrap();

    assert_eq!(
        shown(&alice2.history("bob", 5000).await.unwrap()),
        shown(&old_bob)
    );
    assert_eq!(
        shown(&alice2.history("carol", 5000).await.unwrap()),
        shown(&old_carol)
    );

    // A message arriving after the import follows the imported history once
    // (bob reconnects, which refreshes alice's device list).
    bob.shutdown().await;
    settle(&mut bob).await;
    send_many(&mut bob, 1, "after the link").await;
    alice2.run_ok(&["sync"]).await.unwrap();
    let new_bob = alice2.history("bob", 5000).await.unwrap();
    assert_eq!(new_bob.len(), old_bob.len() + 1);
    assert_eq!(new_bob.last().unwrap()["text"], "after the link 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_history_links_without_importing() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, _bob) = hush_tests::cli::pair(&relay, dir.path()).await.unwrap();
    alice
        .run_ok(&["send", "bob", "before the link"])
        .await
        .unwrap();
    let code = alice.link_code().await.unwrap();
    let mut listener = alice.spawn(&["listen", "--json"]).unwrap();
    let alice2 = Hush::new(dir.path(), "alice2").unwrap();
    let addr = relay.quic_addr().to_string();
    let hash = hex::encode(relay.cert_sha256());
    let out = alice2
        .run_ok(&[
            "init",
            "--relay",
            &addr,
            "--cert-hash",
            &hash,
            "--link",
            &code,
            "--wait",
            "60",
            "--no-history",
        ])
        .await
        .unwrap();
    assert!(out.stdout.contains("linked"), "{}", out.stdout);
    listener.stop().await.unwrap();
    assert!(alice2.history("bob", 10).await.unwrap().is_empty());
    assert!(!out.stderr.contains("importing"), "{}", out.stderr);
}
