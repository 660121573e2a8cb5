//! `hush device` end to end: removing a device, and a stale device.
//!
//! Removal: alice has three devices and removes one with `hush device
//! remove`. Nothing sent afterwards is sealed to it (the relay would refuse
//! such an envelope as `UnknownDevice`, counted in its refusal metric, and
//! the inbox depth shows its queued envelopes freed), and its
//! authentication is refused with `DeviceRemoved`.
//!
//! Stale: on a relay with a 3 s `--stale-after`, a device not seen for
//! longer is listed stale, senders stop encrypting to it, and when it
//! returns it is told it was retired.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_tests::RelayProcess;
use hush_tests::cli::{Hush, metric, of_type, pair, texts};
use hush_tests::wait::{wait_until, wait_until_async};
use std::time::Duration;

fn refusals(relay: &RelayProcess, kind: &str) -> f64 {
    metric(relay, &format!("hush_refusals_total{{kind=\"{kind}\"}}"))
        .unwrap()
        .unwrap_or(0.0)
}

/// A linked device of `of`, welcomed and synced.
async fn link(dir: &std::path::Path, relay: &RelayProcess, of: &Hush, name: &str) -> Hush {
    let new = Hush::new(dir, name).unwrap();
    let code = of.link_code().await.unwrap();
    new.init_linked(relay, &code).await.unwrap();
    of.run_ok(&["sync"]).await.unwrap();
    new.run_ok(&["sync"]).await.unwrap();
    new
}

fn device_lines(out: &hush_tests::cli::CliOutput) -> Vec<serde_json::Value> {
    of_type(&out.json_lines(), "device")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_gets_nothing_and_is_refused() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    let alice2 = link(dir.path(), &relay, &alice, "alice2").await;
    let alice3 = link(dir.path(), &relay, &alice, "alice3").await;
    alice.run_ok(&["sync"]).await.unwrap();

    let listed = device_lines(&alice.run_ok(&["device", "list", "--json"]).await.unwrap());
    assert_eq!(listed.len(), 3, "{listed:?}");
    let alice3_id = alice3.status().await.unwrap()["device"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(listed.iter().any(|d| d["device"] == alice3_id.as_str()));
    assert!(listed.iter().all(|d| d["stale"] == false));

    // Something waits in alice3's inbox when it is removed.
    bob.run_ok(&["sync"]).await.unwrap();
    bob.run_ok(&["send", "alice", "before removal"])
        .await
        .unwrap();
    let depth_before = metric(&relay, "hush_inbox_depth").unwrap().unwrap();
    assert!(depth_before >= 1.0);

    let out = alice
        .run_ok(&["device", "remove", &alice3_id])
        .await
        .unwrap();
    assert!(out.stdout.contains("removed"), "{}", out.stdout);
    let listed = device_lines(&alice.run_ok(&["device", "list", "--json"]).await.unwrap());
    assert_eq!(listed.len(), 2);
    assert!(!listed.iter().any(|d| d["device"] == alice3_id.as_str()));
    // The relay freed its inbox: the removal counted, the depth went down.
    assert_eq!(
        metric(&relay, "hush_devices_removed_total").unwrap(),
        Some(1.0)
    );
    let depth_after = metric(&relay, "hush_inbox_depth").unwrap().unwrap();
    assert!(
        depth_after < depth_before,
        "inbox not freed: {depth_before} → {depth_after}"
    );

    // Messages after the removal: none is sealed to alice3 (the relay
    // would refuse it as UnknownDevice), every other device gets them.
    let unknown_before = refusals(&relay, "unknown_device");
    bob.run_ok(&["send", "alice", "after removal"])
        .await
        .unwrap();
    alice2
        .run_ok(&["send", "bob", "alice2 after removal"])
        .await
        .unwrap();
    assert_eq!(refusals(&relay, "unknown_device"), unknown_before);
    assert!(texts(&alice.sync_messages().await.unwrap()).contains(&"after removal".to_string()));
    assert!(
        texts(&bob.sync_messages().await.unwrap()).contains(&"alice2 after removal".to_string())
    );

    // alice3 is refused, with a typed error it reports.
    let removed_before = refusals(&relay, "device_removed");
    let out = alice3.run(&["sync", "--json"]).await.unwrap();
    assert!(!out.ok(), "a removed device synced: {}", out.stdout);
    assert!(out.stderr.contains("removed"), "{}", out.stderr);
    assert!(refusals(&relay, "device_removed") > removed_before);
    assert!(
        !texts(&out.messages()).contains(&"after removal".to_string()),
        "the removed device read a message sent after its removal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_device_is_skipped_and_told_it_was_retired() {
    let relay = RelayProcess::spawn_temp(&["--stale-after", "3s"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    let alice2 = link(dir.path(), &relay, &alice, "alice2").await;
    let alice2_id = alice2.status().await.unwrap()["device"]
        .as_str()
        .unwrap()
        .to_string();

    // alice2 stays away past the stale period. The gauge, refreshed by the
    // retention loop, counts stale devices (bob, idle too, may be the first
    // it counts), and alice's list marks alice2 stale.
    wait_until(Duration::from_secs(20), "the stale-device gauge", || {
        metric(&relay, "hush_devices_stale")
            .ok()
            .flatten()
            .is_some_and(|v| v >= 1.0)
    })
    .await
    .unwrap();
    let listed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    wait_until_async(Duration::from_secs(20), "alice2 listed stale", || {
        let (alice, listed, alice2_id) = (&alice, listed.clone(), alice2_id.clone());
        async move {
            let Ok(out) = alice.run_ok(&["device", "list", "--json"]).await else {
                return false;
            };
            let lines = device_lines(&out);
            let stale = lines
                .iter()
                .any(|d| d["device"] == alice2_id.as_str() && d["stale"] == true);
            *listed.lock().unwrap() = lines;
            stale
        }
    })
    .await
    .unwrap();
    let listed = listed.lock().unwrap().clone();
    let me = listed.iter().find(|d| d["this_device"] == true).unwrap();
    assert_eq!(me["stale"], false);

    // alice writes bob: her stale other device gets no copy.
    alice.run_ok(&["send", "bob", "while away"]).await.unwrap();
    assert_eq!(
        texts(&bob.sync_messages().await.unwrap()),
        vec!["while away".to_string()]
    );

    // alice2 returns: told it was retired, and the message never reached it.
    let out = alice2.run_ok(&["sync", "--json"]).await.unwrap();
    assert_eq!(
        of_type(&out.json_lines(), "retired").len(),
        1,
        "{}",
        out.stdout
    );
    assert!(
        !texts(&out.messages()).contains(&"while away".to_string()),
        "a stale device was encrypted to"
    );
}
