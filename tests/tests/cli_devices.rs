//! `hush` end to end with linked devices: a message fans out to every
//! device of the recipient and to the sender's own other device, and read
//! state made on one device reaches the others (and the sender).

use hush_tests::RelayProcess;
use hush_tests::cli::{Hush, of_type, pair, texts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_devices_receive_fan_out_and_sync_read_state() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();

    // bob links a second device: the first one welcomes it on its next sync.
    let bob2 = Hush::new(dir.path(), "bob2").unwrap();
    let code = bob.link_code().await.unwrap();
    bob2.init_linked(&relay, &code).await.unwrap();
    let out = bob.run_ok(&["sync", "--json"]).await.unwrap();
    assert_eq!(
        of_type(&out.json_lines(), "device_linked").len(),
        1,
        "bob: {}",
        out.stdout
    );
    let out = bob2.run_ok(&["sync", "--json"]).await.unwrap();
    assert_eq!(
        of_type(&out.json_lines(), "linked").len(),
        1,
        "bob2: {}",
        out.stdout
    );
    let contacts = bob2
        .run_ok(&["contact", "list", "--json"])
        .await
        .unwrap()
        .json_lines();
    assert_eq!(contacts.len(), 1);
    assert_eq!(
        contacts[0]["name"], "alice",
        "the contact came with the welcome"
    );

    // alice links a second device too.
    let alice2 = Hush::new(dir.path(), "alice2").unwrap();
    let code = alice.link_code().await.unwrap();
    alice2.init_linked(&relay, &code).await.unwrap();
    alice.run_ok(&["sync"]).await.unwrap();
    alice2.run_ok(&["sync"]).await.unwrap();
    let status = alice.status().await.unwrap();
    assert_eq!(status["devices"].as_array().unwrap().len(), 2);

    // One message reaches both of bob's devices and alice's other device.
    let sent = alice
        .run_ok(&["send", "bob", "hello, all of you"])
        .await
        .unwrap();
    let id = sent
        .stdout
        .trim()
        .strip_prefix("stored ")
        .unwrap()
        .to_string();
    let on_bob = bob.sync_messages().await.unwrap();
    let on_bob2 = bob2.sync_messages().await.unwrap();
    let on_alice2 = alice2.sync_messages().await.unwrap();
    let want = vec!["hello, all of you".to_string()];
    assert_eq!(texts(&on_bob), want);
    assert_eq!(texts(&on_bob2), want);
    assert_eq!(texts(&on_alice2), want);
    for m in on_bob.iter().chain(&on_bob2).chain(&on_alice2) {
        assert_eq!(m["id"], id.as_str(), "one logical message id everywhere");
    }
    assert_eq!(on_alice2[0]["outgoing"], true);
    assert_eq!(on_alice2[0]["from"], "me");
    assert_eq!(on_alice2[0]["conversation"], "bob");
    assert_eq!(on_bob2[0]["from"], "alice");

    // bob reads on device 1; device 2 learns it.
    let out = bob.run_ok(&["read", "alice"]).await.unwrap();
    assert!(
        out.stdout.contains("marked 1 message"),
        "read: {}",
        out.stdout
    );
    let before = bob2.history("alice", 10).await.unwrap();
    assert_eq!(before[0]["read"], false);
    let out = bob2.run_ok(&["sync", "--json"]).await.unwrap();
    let reads = of_type(&out.json_lines(), "read");
    assert_eq!(reads.len(), 1, "bob2 sync: {}", out.stdout);
    assert_eq!(reads[0]["conversation"], "alice");
    assert_eq!(reads[0]["ids"][0], id.as_str());
    let after = bob2.history("alice", 10).await.unwrap();
    assert_eq!(after[0]["read"], true);
    let status = bob2.status().await.unwrap();
    assert_eq!(status["contacts"][0]["unread"], 0);

    // alice (the author device) sees the message read.
    alice.run_ok(&["sync"]).await.unwrap();
    let history = alice.history("bob", 10).await.unwrap();
    assert_eq!(history[0]["state"], "read", "alice's view: {history:?}");
}
