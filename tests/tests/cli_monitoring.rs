//! `hush` end to end for what users watch: a sender sees that the
//! recipient's inbox is full (and delivery once it drains), the relay's
//! `/metrics` carries the sync-session series, and `hush status --json`
//! carries the client's sync counters.

use hush_tests::RelayProcess;
use hush_tests::cli::{metric, of_type, pair, texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_sees_a_full_recipient_inbox_then_delivery() {
    let relay = RelayProcess::spawn_temp(&["--inbox-max-messages", "3"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    bob.run_ok(&["sync"]).await.unwrap();

    // bob stays offline: alice fills his inbox until the relay refuses.
    let mut full = None;
    let mut stored = Vec::new();
    for i in 0..6 {
        let text = format!("m{i}");
        let out = alice.run(&["send", "bob", &text]).await.unwrap();
        if out.ok() {
            stored.push(text);
            continue;
        }
        assert_eq!(out.code(), Some(5), "{}\n{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains("recipient's inbox is full, will retry"),
            "{}",
            out.stderr
        );
        full = Some(text);
        break;
    }
    let full = full.expect("the relay refused a send to bob's full inbox");
    assert!(!stored.is_empty() && stored.len() <= 3, "{stored:?}");

    // history (JSON and text) and status show the state, not "failed".
    let out = alice.run_ok(&["history", "bob", "--json"]).await.unwrap();
    let lines = out.json_lines();
    let last = of_type(&lines, "message").pop().expect("a message");
    assert_eq!(last["text"], full.as_str());
    assert_eq!(last["state"], "recipient-inbox-full", "{}", out.stdout);
    let out = alice.run_ok(&["history", "bob"]).await.unwrap();
    assert!(
        out.stdout.contains("(recipient-inbox-full)"),
        "{}",
        out.stdout
    );
    let out = alice.run_ok(&["status", "--json"]).await.unwrap();
    let status = &of_type(&out.json_lines(), "status")[0];
    assert!(
        status["counters"]["inbox_full_refusals"].as_u64() >= Some(1),
        "{status}"
    );

    // bob drains his inbox; alice's next sync delivers the waiting message.
    let got = bob.sync_messages().await.unwrap();
    assert_eq!(texts(&got), stored);
    alice.run_ok(&["sync", "--wait", "10"]).await.unwrap();
    let out = alice.run_ok(&["history", "bob", "--json"]).await.unwrap();
    let lines = out.json_lines();
    let last = of_type(&lines, "message").pop().expect("a message");
    assert_eq!(last["text"], full.as_str());
    assert!(
        matches!(
            last["state"].as_str(),
            Some("stored" | "delivered" | "read")
        ),
        "{}",
        out.stdout
    );
    let got = bob.sync_messages().await.unwrap();
    assert_eq!(texts(&got), [full]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_series_move_on_the_relay_and_in_status() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    let started = metric(&relay, "hush_sync_sessions_started_total")
        .unwrap()
        .expect("series present");
    let finished = metric(&relay, "hush_sync_sessions_finished_total")
        .unwrap()
        .expect("series present");
    let caught_up = metric(&relay, "hush_sync_catch_up_seconds_count")
        .unwrap()
        .expect("series present");
    assert!(
        metric(&relay, "hush_sync_sessions_failed_total")
            .unwrap()
            .is_some()
    );

    alice.run_ok(&["send", "bob", "hello"]).await.unwrap();
    assert_eq!(texts(&bob.sync_messages().await.unwrap()), ["hello"]);

    let started2 = metric(&relay, "hush_sync_sessions_started_total")
        .unwrap()
        .unwrap();
    let finished2 = metric(&relay, "hush_sync_sessions_finished_total")
        .unwrap()
        .unwrap();
    let caught_up2 = metric(&relay, "hush_sync_catch_up_seconds_count")
        .unwrap()
        .unwrap();
    assert!(started2 >= started + 2.0, "{started} → {started2}");
    assert!(finished2 >= finished + 1.0, "{finished} → {finished2}");
    assert!(caught_up2 >= caught_up + 1.0, "{caught_up} → {caught_up2}");
    assert!(
        metric(&relay, "hush_duplicate_sends_total")
            .unwrap()
            .is_some()
    );

    let out = bob.run_ok(&["status", "--json"]).await.unwrap();
    let status = &of_type(&out.json_lines(), "status")[0];
    let c = &status["counters"];
    assert!(c["syncs"].as_u64() >= Some(1), "{status}");
    assert!(c["sync_latency_ms_total"].as_u64().is_some(), "{status}");
    assert!(c["last_sync_latency_ms"].as_u64().is_some(), "{status}");
    assert!(c["average_sync_latency_ms"].as_u64().is_some(), "{status}");
    assert!(c["inbox_full_refusals"].as_u64() == Some(0), "{status}");
    let out = bob.run_ok(&["status"]).await.unwrap();
    assert!(out.stdout.contains("sync: "), "{}", out.stdout);
    assert!(
        out.stdout.contains("inbox-full refusal(s)"),
        "{}",
        out.stdout
    );
}
