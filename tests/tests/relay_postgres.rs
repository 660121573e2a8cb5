//! Real `hush-relay` processes on the PostgreSQL store (`--store
//! postgres://…`), against real PostgreSQL servers started by
//! `hush_tests::pg`: two relay nodes share one database whose primary waits
//! for a synchronous standby, devices send through one node and pull and
//! acknowledge through the other over QUIC, a killed node loses nothing, and
//! a relay refuses to start on a primary without a synchronous standby
//! unless `--allow-unreplicated` is given.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_tests::cli::metric;
use hush_tests::pg::PgCluster;
use hush_tests::{DeviceIdentity, RelayProcess, TestDevice, conversation, make_envelope, stored};

/// Two stateless relay nodes on one replicated database: what one node
/// stored the other serves, retries through the other node are recognised
/// as duplicates, acks delete the rows, and killing a node loses nothing.
#[tokio::test]
async fn two_relays_share_a_replicated_postgres_database() {
    let cluster = PgCluster::with_sync_standby().unwrap();
    let db = cluster.create_database().unwrap();
    let url = cluster.url(&db);
    let args = ["--send-rate", "0", "--store", url.as_str()];
    let mut node1 = RelayProcess::spawn_temp(&args).await.unwrap();
    let node2 = RelayProcess::spawn_temp(&args).await.unwrap();
    assert_eq!(metric(&node1, "hush_store_replicated").unwrap(), Some(1.0));

    let a = DeviceIdentity::from_seed(1);
    let b = DeviceIdentity::from_seed(2);
    let mut alice = TestDevice::register_new(&a, node1.target()).await.unwrap();
    // Bob registers through the other node: the registry is shared.
    let mut bob = TestDevice::register_new(&b, node2.target()).await.unwrap();
    let conv = conversation(1);
    let envelopes: Vec<_> = (1..=5u64)
        .map(|seq| make_envelope(a.device(), b.device(), conv, seq, b"to bob"))
        .collect();
    let outcomes = alice.send(envelopes.clone()).await.unwrap();
    let seqs: Vec<u64> = outcomes.iter().map(|o| stored(o).unwrap().0).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        cluster
            .psql(&db, "SELECT count(*) FROM hush_envelopes")
            .unwrap(),
        "5"
    );

    // Node 1 dies; Alice retries the same envelopes through node 2: the
    // shared dedup table answers with the original seqs.
    node1.kill9().unwrap();
    let mut alice2 = TestDevice::login(&a, node2.target()).await.unwrap();
    let again = alice2.send(envelopes.clone()).await.unwrap();
    let again: Vec<(u64, bool)> = again.iter().map(|o| stored(o).unwrap()).collect();
    assert_eq!(again, seqs.iter().map(|&s| (s, true)).collect::<Vec<_>>());

    // Bob reads everything through node 2, byte for byte, and acks.
    let inbox = bob.read_inbox(0).await.unwrap();
    assert_eq!(inbox.len(), 5);
    for (d, sent) in inbox.iter().zip(&envelopes) {
        assert_eq!(&d.envelope, sent);
    }
    assert_eq!(bob.ack(5).await.unwrap(), 5);
    assert_eq!(
        cluster
            .psql(&db, "SELECT count(*) FROM hush_envelopes")
            .unwrap(),
        "0"
    );
    // Node 1 comes back (same database, nothing of its own) and agrees.
    node1.restart().await.unwrap();
    let mut bob1 = TestDevice::login(&b, node1.target()).await.unwrap();
    assert!(bob1.read_inbox(5).await.unwrap().is_empty());
    assert_eq!(
        cluster
            .psql(
                &db,
                "SELECT head, acked, depth FROM hush_inboxes WHERE depth = 0 AND head = 5"
            )
            .unwrap(),
        "5|5|0"
    );
}

/// On a primary without a synchronous standby the relay refuses to start,
/// saying why and how to override; with `--allow-unreplicated` it starts,
/// warns in its log and reports `hush_store_replicated 0`.
#[tokio::test]
async fn a_relay_refuses_a_primary_without_a_synchronous_standby_unless_allowed() {
    let cluster = PgCluster::primary_only().unwrap();
    let db = cluster.create_database().unwrap();
    let url = cluster.url(&db);
    let err = match RelayProcess::spawn_temp(&["--store", url.as_str()]).await {
        Ok(_) => panic!("the relay must refuse an unreplicated primary"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("no synchronous standby") && err.contains("--allow-unreplicated"),
        "{err}"
    );

    let relay = RelayProcess::spawn_temp(&["--store", url.as_str(), "--allow-unreplicated"])
        .await
        .unwrap();
    assert_eq!(metric(&relay, "hush_store_replicated").unwrap(), Some(0.0));
    let log = String::from_utf8_lossy(&relay.log_bytes().unwrap()).to_string();
    assert!(log.contains("WITHOUT a synchronous standby"), "{log}");
    // It works, unreplicated.
    let a = DeviceIdentity::from_seed(3);
    let mut dev = TestDevice::register_new(&a, relay.target()).await.unwrap();
    let env = make_envelope(a.device(), a.device(), conversation(2), 1, b"note");
    assert_eq!(stored(&dev.send_one(env).await.unwrap()).unwrap().0, 1);
}
