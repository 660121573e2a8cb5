//! `hush device` end to end: removing a device, and a stale device.
//!
//! Removal: alice has three devices and removes one with `hush device
//! remove`. Nothing sent afterwards is sealed to it (the relay would refuse
//! such an envelope as `UnknownDevice`, counted in its refusal metric, and
//! the inbox depth shows its queued envelopes freed), and its
//! authentication is refused with `DeviceRemoved`.
//!
//! At once: a contact running a long-lived client whose copy of alice's
//! list is still fresh (it will not re-fetch it for minutes) gets the new
//! list from alice herself when she removes a device, and its next send
//! seals nothing to the removed device. A removed device's `hush listen`
//! is cut by the relay and exits with "removed".
//!
//! Stale: on a relay with a 3 s `--stale-after`, a device not seen for
//! longer is listed stale, senders stop encrypting to it, and when it
//! returns it is told it was retired.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_cli::driver::{Discard, Driver, cli_engine_config, now_ms, os_seed};
use hush_cli::{CertCheck, RelayTarget};
use hush_client::{Command, ContactCode, Engine, MemoryStorage, MessageState, Reply};
use hush_tests::RelayProcess;
use hush_tests::cli::{Hush, metric, of_type, pair, texts};
use hush_tests::wait::{wait_until, wait_until_async};
use std::time::Duration;
use tokio::time::Instant;

/// Bound of every wait of the in-process client.
const BOUND: Duration = Duration::from_secs(30);

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
    // The relay freed its inbox: the removal counted, and once every
    // remaining device has read what it was sent (the removal notices,
    // their receipts) nothing is left anywhere: alice3's queued envelope
    // is gone with its inbox.
    assert_eq!(
        metric(&relay, "hush_devices_removed_total").unwrap(),
        Some(1.0)
    );
    // (In this order: each one's receipts go to those that sync after it;
    // receipts themselves are not receipted. alice2 passes the notice on to
    // bob and alice when it learns the new list, so it syncs once more at
    // the end to read their receipts.)
    alice2.run_ok(&["sync"]).await.unwrap();
    bob.run_ok(&["sync"]).await.unwrap();
    alice.run_ok(&["sync"]).await.unwrap();
    alice2.run_ok(&["sync"]).await.unwrap();
    wait_until(Duration::from_secs(20), "every inbox empty", || {
        metric(&relay, "hush_inbox_depth").ok().flatten() == Some(0.0)
    })
    .await
    .unwrap_or_else(|e| panic!("inbox not freed (depth was {depth_before}): {e}"));

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

/// Run the in-process client until `cond` holds (bounded); panics if not.
async fn drive_until(
    d: &mut Driver<MemoryStorage>,
    what: &str,
    cond: impl FnMut(&hush_cli::driver::View<'_>) -> bool,
) {
    let mut stop = None;
    let outcome = d
        .run_until(Instant::now() + BOUND, &mut stop, &mut Discard, cond)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        hush_cli::driver::Outcome::Done,
        "in-process client: {what}"
    );
}

/// Attack setting: bob runs a long-lived client whose copy of alice's list
/// is fresh and stays so (he would not re-fetch it for ten minutes), so a
/// relay hiding the removal would have him keep sealing to alice3. alice
/// removes alice3 with `hush device remove`, which hands the new signed list
/// to bob's device at once: his next send seals nothing to alice3 (the relay
/// would refuse such an envelope as `UnknownDevice`, counted), with no
/// refresh period waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_that_has_not_refreshed_seals_nothing_to_a_removed_device() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alice = Hush::new(dir.path(), "alice").unwrap();
    alice.init(&relay, "alice").await.unwrap();
    let alice3 = link(dir.path(), &relay, &alice, "alice3").await;
    let alice3_id = alice3.status().await.unwrap()["device"]
        .as_str()
        .unwrap()
        .to_string();

    let target = RelayTarget {
        addr: relay.quic_addr().to_string(),
        cert: CertCheck::Pinned(CertCheck::parse_hash(&hex::encode(relay.cert_sha256())).unwrap()),
        transport: hush_cli::Transport::Quic,
    };
    let cfg = hush_client::EngineConfig {
        device_list_fresh_ms: 600_000,
        device_list_max_age_ms: 600_000,
        ..cli_engine_config()
    };
    let (engine, step) = Engine::create(
        now_ms(),
        os_seed().unwrap(),
        &target.addr,
        "bob",
        cfg.clone(),
    )
    .unwrap();
    let mut bob = Driver::new(engine, MemoryStorage::new(), cfg, target);
    bob.start(step, &mut Discard).await.unwrap();
    drive_until(&mut bob, "bob settles", |v| v.settled()).await;
    let mut bob_code = bob.engine().contact_code();
    bob_code.name = "bob".into();
    alice
        .add_contact("bob", &bob_code.to_text().unwrap())
        .await
        .unwrap();
    let alice_code = ContactCode::parse(&alice.code().await.unwrap()).unwrap();
    let alice_user = alice_code.user;
    bob.command(Command::AddContact { code: alice_code }, &mut Discard)
        .await
        .unwrap();
    let conversation = bob.engine().conversation_with(&alice_user);

    // bob writes alice (both her devices), which fetches her list once.
    let send = |text: &str| Command::SendText {
        conversation,
        text: text.into(),
    };
    let Some(Reply::Message(first)) = bob
        .command(send("before removal"), &mut Discard)
        .await
        .unwrap()
    else {
        panic!("no message id");
    };
    drive_until(&mut bob, "the first message stored", |v| {
        v.engine.message_state(&first) == Some(MessageState::Stored)
    })
    .await;
    let alice3_dev = hush_protocol::DeviceId::from_hex(&alice3_id).unwrap();
    assert!(bob.engine().devices_of(&alice_user).contains(&alice3_dev));
    // alice reads it (and so holds a session with bob's device).
    assert!(texts(&alice.sync_messages().await.unwrap()).contains(&"before removal".to_string()));

    let unknown_before = refusals(&relay, "unknown_device");
    alice
        .run_ok(&["device", "remove", &alice3_id])
        .await
        .unwrap();
    // bob, connected all along, learns it from alice's notice.
    drive_until(&mut bob, "bob gets alice's new list", |v| {
        !v.engine.devices_of(&alice_user).contains(&alice3_dev)
    })
    .await;
    assert_eq!(bob.engine().counters().list_notices, 1);

    let Some(Reply::Message(second)) = bob
        .command(send("after removal"), &mut Discard)
        .await
        .unwrap()
    else {
        panic!("no message id");
    };
    drive_until(&mut bob, "the second message stored", |v| {
        v.engine.message_state(&second) == Some(MessageState::Stored) && v.settled()
    })
    .await;
    assert_eq!(
        refusals(&relay, "unknown_device"),
        unknown_before,
        "bob sealed to the removed device"
    );
    assert!(texts(&alice.sync_messages().await.unwrap()).contains(&"after removal".to_string()));
    bob.shutdown().await;
}

/// A removed device with an open session (`hush listen`) is cut at once by
/// the relay (`Closing` with `DeviceRemoved`), and `listen` exits non-zero
/// saying it was removed, rather than reconnecting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_devices_listen_is_cut_and_exits() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alice = Hush::new(dir.path(), "alice").unwrap();
    alice.init(&relay, "alice").await.unwrap();
    let alice3 = link(dir.path(), &relay, &alice, "alice3").await;
    let alice3_id = alice3.status().await.unwrap()["device"]
        .as_str()
        .unwrap()
        .to_string();
    let synced = || {
        metric(&relay, "hush_sync_sessions_finished_total")
            .unwrap()
            .unwrap_or(0.0)
    };
    let before = synced();
    let mut listen = alice3.spawn(&["listen", "--json"]).unwrap();
    wait_until(BOUND, "alice3's listen caught up", || synced() > before)
        .await
        .unwrap();

    alice
        .run_ok(&["device", "remove", &alice3_id])
        .await
        .unwrap();
    let (status, stderr) = listen.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(!status.success(), "listen exited successfully: {stderr}");
    assert!(stderr.contains("removed"), "{stderr}");
    // It was cut, not refused at a reconnection: no `DeviceRemoved`
    // refusal of an authentication was needed.
    assert_eq!(refusals(&relay, "device_removed"), 0.0);
    let status = alice3.run(&["status", "--json"]).await.unwrap();
    assert!(status.stdout.contains("\"removed\":1"), "{}", status.stdout);
}
