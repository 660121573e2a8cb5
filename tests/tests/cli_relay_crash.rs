//! `hush` end to end across a relay crash: the relay is killed with SIGKILL
//! in the middle of a burst of `hush send` commands and restarted on the
//! same data directory and port.
//!
//! Every send that exited 0 must reach the recipient exactly once, in order;
//! every send that failed must be in the outbox (state "sending") and go out
//! with the next command that connects.

use hush_tests::cli::{pair, texts};
use hush_tests::{RelayProcess, wait_until};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Sends before the relay comes back.
const BURST: usize = 12;
/// Sends after it is back.
const AFTER: usize = 6;
/// Kill once this many sends have finished.
const KILL_AFTER: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_during_a_send_burst_loses_and_duplicates_nothing() {
    let mut relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    let addr = relay.quic_addr();

    let text = |i: usize| format!("burst message {i:02}");
    let finished = Arc::new(AtomicUsize::new(0));
    let burst = {
        let alice = alice.clone();
        let finished = finished.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..BURST {
                let out = alice
                    .run(&["send", "bob", &text(i), "--wait", "1.5"])
                    .await
                    .unwrap();
                results.push(out);
                finished.fetch_add(1, Ordering::SeqCst);
            }
            results
        })
    };
    // Kill while the burst is running (a send is usually in flight).
    wait_until(Duration::from_secs(60), "the first sends", || {
        finished.load(Ordering::SeqCst) >= KILL_AFTER
    })
    .await
    .unwrap();
    relay.kill9().unwrap();
    let results = burst.await.unwrap();

    let ok: Vec<usize> = (0..BURST).filter(|&i| results[i].ok()).collect();
    let failed: Vec<usize> = (0..BURST).filter(|&i| !results[i].ok()).collect();
    assert!(
        ok.len() >= KILL_AFTER - 1,
        "sends before the kill succeed: {ok:?}"
    );
    assert!(
        failed.len() >= BURST - KILL_AFTER - 1,
        "sends after the kill fail: {failed:?}"
    );
    for &i in &failed {
        let r = &results[i];
        assert!(
            matches!(r.code(), Some(3 | 5)),
            "send {i} exit {:?}: {}",
            r.code(),
            r.stderr
        );
        assert!(r.stderr.contains("outbox"), "send {i}: {}", r.stderr);
    }
    // Every failed send is waiting in the outbox.
    let status = alice.status().await.unwrap();
    let waiting: Vec<String> = status["outbox"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["state"] == "sending")
        .map(|o| o["text"].as_str().unwrap().to_string())
        .collect();
    for &i in &failed {
        assert!(
            waiting.contains(&text(i)),
            "{} not in outbox {waiting:?}",
            text(i)
        );
    }

    // Back on the same port; the next sends flush the outbox first.
    relay.restart().await.unwrap();
    assert_eq!(relay.quic_addr(), addr);
    for i in BURST..BURST + AFTER {
        alice.run_ok(&["send", "bob", &text(i)]).await.unwrap();
    }
    let status = alice.status().await.unwrap();
    assert_eq!(status["unsent"], 0, "outbox flushed: {status}");

    let got = bob.sync_messages().await.unwrap();
    let all: Vec<String> = (0..BURST + AFTER).map(text).collect();
    assert_eq!(texts(&got), all, "each message once, in send order");
    let seqs: Vec<u64> = got
        .iter()
        .map(|m| m["sender_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=(BURST + AFTER) as u64).collect::<Vec<_>>());
    assert!(bob.sync_messages().await.unwrap().is_empty());
}
