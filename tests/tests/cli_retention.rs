//! `hush` end to end past the relay's retention: envelopes for an offline
//! recipient expire on the relay; the recipient's next sync learns which
//! sender seqs were dropped, asks the sender (whose `listen` answers from
//! its outbox) and ends with the complete history, in order.

use hush_tests::cli::{metric, of_type, pair, texts};
use hush_tests::{RelayProcess, wait_until};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_recovered_from_the_sender() {
    let relay = RelayProcess::spawn_temp(&["--retention", "2s"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();

    alice.run_ok(&["send", "bob", "one"]).await.unwrap();
    alice.run_ok(&["send", "bob", "two"]).await.unwrap();
    assert_eq!(texts(&bob.sync_messages().await.unwrap()), ["one", "two"]);

    // bob is offline past the retention: these two expire on the relay.
    alice.run_ok(&["send", "bob", "three"]).await.unwrap();
    alice.run_ok(&["send", "bob", "four"]).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the relay to expire everything",
        || {
            let depth = metric(&relay, "hush_inbox_depth").ok().flatten();
            let expired = metric(&relay, "hush_expired_total").ok().flatten();
            depth == Some(0.0) && expired.is_some_and(|e| e >= 2.0)
        },
    )
    .await
    .unwrap();
    alice.run_ok(&["send", "bob", "five"]).await.unwrap();

    // alice stays online to answer the resend request.
    let mut listen = alice.spawn(&["listen", "--json"]).unwrap();
    listen
        .wait_for(Duration::from_secs(30), "alice's listen to be live", |v| {
            of_type(v, "connection")
                .iter()
                .any(|c| c["state"] == "live")
        })
        .await
        .unwrap();

    let out = bob
        .run_ok(&["sync", "--json", "--wait", "30"])
        .await
        .unwrap();
    let lines = out.json_lines();
    assert_eq!(
        texts(&of_type(&lines, "message")),
        ["three", "four", "five"],
        "{}",
        out.stdout
    );
    let gaps = of_type(&lines, "gap");
    assert!(
        gaps.iter()
            .any(|g| g["status"] == "detected" && g["count"] == 2),
        "gap detected: {gaps:?}"
    );
    assert!(
        gaps.iter().any(|g| g["status"] == "recovered"),
        "gap recovered: {gaps:?}"
    );
    assert!(
        !gaps
            .iter()
            .any(|g| g["status"] == "pending" || g["status"] == "unrecoverable")
    );

    let (status, _) = listen.stop().await.unwrap();
    assert!(status.success());

    let history = bob.history("alice", 100).await.unwrap();
    assert_eq!(texts(&history), ["one", "two", "three", "four", "five"]);
    let seqs: Vec<u64> = history
        .iter()
        .map(|m| m["sender_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let st = bob.status().await.unwrap();
    assert_eq!(st["gaps"].as_array().unwrap().len(), 0);
    assert!(st["counters"]["recovered"].as_u64().unwrap() >= 2);
    // An honest relay's expiry report is never refuted as misbehaviour.
    assert_eq!(st["counters"]["relay_claims_refuted"].as_u64(), Some(0));
}
