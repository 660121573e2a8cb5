//! Real `hush-relay` processes as a cluster on one PostgreSQL database
//! (`--store postgres://…`): each node joins the database's cluster bus by
//! itself, so a device connected to node B gets what node A committed
//! live, and a device's newer connection on one node replaces its older
//! one on the other.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{ErrorCode, ServerFrame};
use hush_tests::pg::PgCluster;
use hush_tests::{
    DeviceIdentity, RelayProcess, TestDevice, conversation, make_envelope, stored, wait_until_async,
};
use std::time::{Duration, Instant};

/// The generous bound a live push across nodes must meet.
const PUSH_BOUND: Duration = Duration::from_secs(5);
const PROMPT: Duration = Duration::from_secs(10);

/// Senders on node A, the receiver on node B (live), then offline and back
/// on node A: every message once, in order; each live one pushed within
/// the bound. Then the receiver connects to node A while still on node B:
/// the older connection, on B, is closed with `Replaced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relay_processes_push_across_nodes_and_the_newest_connection_wins() {
    let cluster = PgCluster::primary_only().unwrap();
    let db = cluster.create_database().unwrap();
    let url = cluster.url(&db);
    let args = [
        "--send-rate",
        "0",
        "--store",
        url.as_str(),
        "--allow-unreplicated",
    ];
    let node_a = RelayProcess::spawn_temp(&args).await.unwrap();
    let node_b = RelayProcess::spawn_temp(&args).await.unwrap();
    let (alice, bob) = (DeviceIdentity::from_seed(1), DeviceIdentity::from_seed(2));
    let mut sender = TestDevice::register_new(&alice, node_a.target())
        .await
        .unwrap();
    let mut receiver = TestDevice::register_new(&bob, node_b.target())
        .await
        .unwrap();
    assert!(receiver.read_inbox(0).await.unwrap().is_empty(), "live now");

    let conv = conversation(1);
    let mut worst = Duration::ZERO;
    for seq in 1..=10u64 {
        let env = make_envelope(alice.device(), bob.device(), conv, seq, b"live");
        let sent = Instant::now();
        assert_eq!(
            stored(&sender.send_one(env.clone()).await.unwrap()),
            Some((seq, false))
        );
        let pushed = receiver
            .next_push(PUSH_BOUND)
            .await
            .unwrap_or_else(|e| panic!("message {seq} not pushed across nodes: {e}"));
        worst = worst.max(sent.elapsed());
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].seq, seq);
        assert_eq!(pushed[0].envelope, env);
    }
    receiver.ack(10).await.unwrap();
    println!("slowest send-to-push across relay processes: {worst:?}");

    // The receiver connects to node A as well: its connection on B goes.
    let mut newer = TestDevice::login(&bob, node_a.target()).await.unwrap();
    match receiver.next_frame(PROMPT).await {
        Ok(ServerFrame::Closing { code, .. }) => assert_eq!(code, ErrorCode::Replaced),
        other => panic!("expected Closing{{Replaced}} on node B, got {other:?}"),
    }
    assert!(newer.ping().await.is_ok(), "the newer connection stays");
    newer.close();

    // Offline, then back: the rest arrives once, in order.
    for seq in 11..=15u64 {
        let env = make_envelope(alice.device(), bob.device(), conv, seq, b"offline");
        assert!(stored(&sender.send_one(env).await.unwrap()).is_some());
    }
    let mut back = TestDevice::login(&bob, node_b.target()).await.unwrap();
    let seqs: Vec<u64> = back
        .read_inbox(10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(seqs, (11..=15).collect::<Vec<u64>>());
}

/// How long the nodes may take to find the promoted standby.
const FAILOVER_BOUND: Duration = Duration::from_secs(60);

/// The primary is killed (`kill -9`) and the standby promoted: both relay
/// processes find the new primary through the multi-host URL, a send
/// retried with the same id is stored once, what was acknowledged before
/// is all there, and live push across the nodes works again (each node's
/// bus listens on the new primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_promotion_the_nodes_reconnect_and_push_across_again() {
    let mut cluster = PgCluster::with_sync_standby().unwrap();
    let db = cluster.create_database().unwrap();
    let url = cluster.url(&db);
    // The promoted standby has no standby of its own.
    let args = [
        "--send-rate",
        "0",
        "--store",
        url.as_str(),
        "--allow-unreplicated",
    ];
    let node_a = RelayProcess::spawn_temp(&args).await.unwrap();
    let node_b = RelayProcess::spawn_temp(&args).await.unwrap();
    let (alice, bob) = (DeviceIdentity::from_seed(11), DeviceIdentity::from_seed(12));
    let mut sender = TestDevice::register_new(&alice, node_a.target())
        .await
        .unwrap();
    TestDevice::register_new(&bob, node_b.target())
        .await
        .unwrap();
    let conv = conversation(3);
    let env = |seq: u64| make_envelope(alice.device(), bob.device(), conv, seq, b"failover");
    for seq in 1..=3u64 {
        assert_eq!(
            stored(&sender.send_one(env(seq)).await.unwrap()),
            Some((seq, false))
        );
    }

    cluster.kill_primary().unwrap();
    cluster.promote_standby().unwrap();

    // The client retries its send (same id) until a node can store it.
    let again = std::sync::Mutex::new(None);
    wait_until_async(
        FAILOVER_BOUND,
        "a send through node A after the promotion",
        || {
            let (alice, target, envelope, again) = (&alice, node_a.target(), env(4), &again);
            async move {
                let Ok(mut d) = TestDevice::login(alice, target).await else {
                    return false;
                };
                match d.send_one(envelope).await {
                    Ok(o) if stored(&o).is_some() => {
                        *again.lock().unwrap() = Some((d, stored(&o)));
                        true
                    }
                    _ => false,
                }
            }
        },
    )
    .await
    .unwrap();
    let (mut sender, outcome) = again.into_inner().unwrap().unwrap();
    assert_eq!(outcome.map(|(seq, _)| seq), Some(4));

    let mut receiver = TestDevice::login(&bob, node_b.target()).await.unwrap();
    let seqs: Vec<u64> = receiver
        .read_inbox(0)
        .await
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4],
        "everything acknowledged is there, once"
    );
    // Node B's bus listens on the new primary once it has reconnected
    // (and then wakes its devices): a send through node A is pushed to the
    // device on node B. Each try waits for a push within the bound.
    let mut pushed = None;
    for seq in 5..=16u64 {
        assert!(stored(&sender.send_one(env(seq)).await.unwrap()).is_some());
        if let Ok(p) = receiver.next_push(PUSH_BOUND).await {
            pushed = p.first().map(|d| d.seq);
            break;
        }
    }
    assert_eq!(
        pushed,
        Some(5),
        "live push across nodes after the promotion, in order"
    );
}
