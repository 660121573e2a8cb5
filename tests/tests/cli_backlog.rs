//! `hush` end to end: a recipient that was not running gets the whole
//! backlog from the relay, in sender order, exactly once.
//!
//! Real relay process, real `hush` processes, 127.0.0.1.

use hush_tests::RelayProcess;
use hush_tests::cli::{pair, texts};

const MESSAGES: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_receives_backlog_in_order_exactly_once() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();

    // bob is not running while alice sends.
    let sent: Vec<String> = (0..MESSAGES)
        .map(|i| format!("backlog message {i:02}"))
        .collect();
    for text in &sent {
        let out = alice.run_ok(&["send", "bob", text]).await.unwrap();
        assert!(
            out.stdout.starts_with("stored "),
            "send output: {}",
            out.stdout
        );
    }

    let got = bob.sync_messages().await.unwrap();
    assert_eq!(texts(&got), sent, "every message once, in the order sent");
    let seqs: Vec<u64> = got
        .iter()
        .map(|m| m["sender_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=MESSAGES as u64).collect::<Vec<_>>(),
        "sender seqs 1..=N in order"
    );
    for m in &got {
        assert_eq!(m["from"], "alice");
        assert_eq!(m["conversation"], "alice");
        assert_eq!(m["outgoing"], false);
        assert!(m["id"].as_str().is_some_and(|id| id.len() == 32));
        assert!(m["sent_at"].as_u64().is_some_and(|t| t > 1_600_000_000_000));
    }

    // Nothing new on a second sync.
    let again = bob.sync_messages().await.unwrap();
    assert!(again.is_empty(), "second sync printed {again:?}");

    // The history holds each message once, in order.
    let history = bob.history("alice", 1000).await.unwrap();
    assert_eq!(texts(&history), sent);

    // alice learns they were delivered (bob's receipts).
    alice.run_ok(&["sync"]).await.unwrap();
    let status = alice.status().await.unwrap();
    let outbox = status["outbox"].as_array().unwrap();
    assert_eq!(outbox.len(), MESSAGES);
    assert!(
        outbox.iter().all(|o| o["state"] == "delivered"),
        "alice's outbox after bob's receipts: {outbox:?}"
    );
    assert_eq!(status["unsent"], 0);
}
