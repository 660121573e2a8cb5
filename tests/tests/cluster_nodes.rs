//! Real `hush-relay` processes as a cluster on one PostgreSQL database
//! (`--store postgres://…`): each node joins the database's cluster bus by
//! itself, so a device connected to node B gets what node A committed
//! live, and a device's newer connection on one node replaces its older
//! one on the other.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{Delivered, DeviceId, Envelope, ErrorCode, ServerFrame};
use hush_tests::pg::PgCluster;
use hush_tests::{
    ConnectOptions, DeviceIdentity, RelayProcess, RelayTarget, TestDevice, conversation,
    make_envelope, refusal_code, stored, wait_until, wait_until_async,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// A device list published on node A removes a device whose connection is
/// on node B: B closes it at once with `DeviceRemoved` (word travels on the
/// cluster bus), not only at its next authentication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_on_one_node_closes_the_devices_connection_on_another() {
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
    let a1 = DeviceIdentity::from_seed(41);
    let a2 = a1.another_device(42);
    let mut phone = TestDevice::register_new(&a1, node_a.target())
        .await
        .unwrap();
    let mut laptop = TestDevice::register_new(&a2, node_b.target())
        .await
        .unwrap();
    let both = a1.signed_device_list(1, vec![a1.device_entry(), a2.device_entry()]);
    assert_eq!(phone.publish_device_list(both).await.unwrap(), 1);
    assert!(laptop.ping().await.is_ok());

    let without = a1.signed_device_list(2, vec![a1.device_entry()]);
    assert_eq!(phone.publish_device_list(without).await.unwrap(), 2);
    match laptop.next_frame(PROMPT).await {
        Ok(ServerFrame::Closing { code, .. }) => assert_eq!(code, ErrorCode::DeviceRemoved),
        other => panic!("expected Closing{{DeviceRemoved}} on node B, got {other:?}"),
    }
    laptop
        .closed(PROMPT)
        .await
        .expect("the removed device's connection on node B closes");
    assert!(phone.ping().await.is_ok(), "the publisher stays");
    let again = TestDevice::login(&a2, node_b.target()).await;
    assert_eq!(
        refusal_code(&again),
        Some(ErrorCode::DeviceRemoved),
        "{again:?}"
    );
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

/// Connection timeouts for devices that must notice a killed node quickly.
fn failover_options() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(4),
        idle_timeout: Duration::from_secs(2),
        ..ConnectOptions::default()
    }
}

/// The nodes' current addresses (a restarted node may get a new port).
type Targets = Arc<Mutex<Vec<RelayTarget>>>;

/// A device keeping one connection to one of the nodes; after any failure
/// it drops the connection and tries the other node next.
struct Roaming {
    identity: DeviceIdentity,
    targets: Targets,
    node: usize,
    conn: Option<TestDevice>,
    failovers: u32,
}

impl Roaming {
    fn new(identity: DeviceIdentity, targets: Targets, node: usize) -> Roaming {
        Roaming {
            identity,
            targets,
            node,
            conn: None,
            failovers: 0,
        }
    }

    async fn connection(&mut self) -> Option<&mut TestDevice> {
        if self.conn.is_none() {
            let target = self.targets.lock().unwrap()[self.node];
            let mut d = TestDevice::connect_with(&self.identity, target, failover_options())
                .await
                .ok();
            if let Some(dev) = d.as_mut()
                && dev.auth().await.is_err()
            {
                d = None;
            }
            match d {
                Some(dev) => self.conn = Some(dev),
                None => {
                    self.fail_over();
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    fn fail_over(&mut self) {
        if let Some(c) = self.conn.take() {
            c.close();
        }
        self.node = 1 - self.node;
        self.failovers += 1;
        FAILOVERS.fetch_add(1, Ordering::SeqCst);
    }

    /// One attempt to get `batch` stored; `Some(seqs)` once every envelope
    /// of it has a "stored" ack.
    async fn try_send(&mut self, batch: &[Envelope]) -> Option<Vec<u64>> {
        let conn = self.connection().await?;
        match conn.send(batch.to_vec()).await {
            Ok(outcomes) => {
                let seqs: Option<Vec<u64>> =
                    outcomes.iter().map(|o| stored(o).map(|(s, _)| s)).collect();
                if seqs.is_none() || outcomes.len() != batch.len() {
                    // A store error while the database fails over: retry.
                    self.fail_over();
                }
                seqs.filter(|s| s.len() == batch.len())
            }
            Err(_) => {
                self.fail_over();
                None
            }
        }
    }

    /// One pull after `after`, acknowledging `after` on the way.
    async fn try_pull(&mut self, after: u64) -> Option<Vec<Delivered>> {
        let conn = self.connection().await?;
        match conn.pull(after, 64, after).await {
            Ok(page) => Some(page.envelopes),
            Err(_) => {
                self.fail_over();
                None
            }
        }
    }
}

/// Failovers of every roaming device so far (for the progress log).
static FAILOVERS: AtomicU64 = AtomicU64::new(0);

/// How long one batch may take to be stored, failovers included.
const BATCH_BOUND: Duration = Duration::from_secs(40);
/// Acknowledged batches between two kills (and while a node is down).
const PROGRESS: u64 = 3;

/// Under load, relay nodes are killed with SIGKILL ten times (alternately,
/// each restarted at once), then the PostgreSQL primary is killed and the
/// standby promoted. Senders and receivers keep working through whichever
/// node answers, failing over when theirs dies and retrying a batch with
/// the same message ids until it has a "stored" ack. Afterwards every
/// acknowledged envelope has reached its recipient exactly once, and each
/// recipient saw each sender's envelopes in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_node_kills_and_a_promotion_under_load_lose_and_duplicate_nothing() {
    let started = Instant::now();
    let mut cluster = PgCluster::with_sync_standby().unwrap();
    let db = cluster.create_database().unwrap();
    let url = cluster.url(&db);
    // Nodes restarted after the promotion find no standby.
    let args = [
        "--send-rate",
        "0",
        "--store",
        url.as_str(),
        "--allow-unreplicated",
    ];
    let mut nodes = [
        RelayProcess::spawn_temp(&args).await.unwrap(),
        RelayProcess::spawn_temp(&args).await.unwrap(),
    ];
    let targets: Targets = Arc::new(Mutex::new(nodes.iter().map(|n| n.target()).collect()));
    let senders: Vec<DeviceIdentity> = (0..3).map(|i| DeviceIdentity::from_seed(100 + i)).collect();
    let receivers: Vec<DeviceIdentity> =
        (0..2).map(|i| DeviceIdentity::from_seed(200 + i)).collect();
    for (i, id) in senders.iter().chain(&receivers).enumerate() {
        TestDevice::register_new(id, nodes[i % 2].target())
            .await
            .unwrap();
    }

    let acked_batches = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let conv = conversation(9);
    // Senders: one batch per round, one envelope to each receiver.
    let mut sender_tasks = Vec::new();
    for (k, s) in senders.iter().enumerate() {
        let (s, receivers, targets) = (s.clone(), receivers.clone(), Arc::clone(&targets));
        let (acked_batches, stop) = (Arc::clone(&acked_batches), Arc::clone(&stop));
        sender_tasks.push(tokio::spawn(async move {
            let roaming = tokio::sync::Mutex::new(Roaming::new(s.clone(), targets, k % 2));
            let mut acked: Vec<Envelope> = Vec::new();
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                let batch: Vec<Envelope> = receivers
                    .iter()
                    .map(|r| make_envelope(s.device(), r.device(), conv, round, b"under kills"))
                    .collect();
                let (roaming_ref, batch_ref) = (&roaming, &batch);
                wait_until_async(
                    BATCH_BOUND,
                    "a batch stored through either node",
                    || async move { roaming_ref.lock().await.try_send(batch_ref).await.is_some() },
                )
                .await
                .unwrap_or_else(|e| panic!("sender {k} round {round}: {e}"));
                acked.extend(batch);
                acked_batches.fetch_add(1, Ordering::SeqCst);
            }
            let roaming = roaming.into_inner();
            (acked, roaming.failovers)
        }));
    }

    // Receivers: pull (acknowledging what they have) through either node.
    let expected: Arc<Vec<AtomicU64>> = Arc::new(
        (0..receivers.len())
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
    );
    let mut receiver_tasks = Vec::new();
    for (j, r) in receivers.iter().enumerate() {
        let (r, targets, expected) = (r.clone(), Arc::clone(&targets), Arc::clone(&expected));
        receiver_tasks.push(tokio::spawn(async move {
            let roaming = tokio::sync::Mutex::new(Roaming::new(r, targets, j % 2));
            let got: tokio::sync::Mutex<Vec<Delivered>> = tokio::sync::Mutex::new(Vec::new());
            let (roaming_ref, got_ref, expected) = (&roaming, &got, &expected);
            wait_until_async(
                Duration::from_secs(85),
                "the receiver has everything",
                || async move {
                    let mut got = got_ref.lock().await;
                    let after = got.last().map_or(0, |d| d.seq);
                    if let Some(page) = roaming_ref.lock().await.try_pull(after).await {
                        got.extend(page);
                    }
                    got.len() as u64 >= expected[j].load(Ordering::SeqCst)
                },
            )
            .await
            .unwrap_or_else(|e| panic!("receiver {j}: {e}"));
            // The final ack.
            let got = got.into_inner();
            let last = got.last().map_or(0, |d| d.seq);
            wait_until_async(PROMPT, "the final ack", || async move {
                roaming_ref.lock().await.try_pull(last).await.is_some()
            })
            .await
            .unwrap();
            let roaming = roaming.into_inner();
            (got, roaming.failovers)
        }));
    }

    // Ten kills, alternating nodes; each waits for progress before the
    // kill and while the node is down.
    let progress = |from: u64, what: &'static str| {
        let acked_batches = Arc::clone(&acked_batches);
        async move {
            wait_until(BATCH_BOUND, what, || {
                acked_batches.load(Ordering::SeqCst) >= from + PROGRESS
            })
            .await
            .unwrap();
        }
    };
    for kill in 0..10usize {
        progress(
            acked_batches.load(Ordering::SeqCst),
            "progress before a kill",
        )
        .await;
        let node = kill % 2;
        nodes[node].kill9().unwrap();
        progress(
            acked_batches.load(Ordering::SeqCst),
            "progress with a node down",
        )
        .await;
        nodes[node].restart().await.unwrap();
        targets.lock().unwrap()[node] = nodes[node].target();
        println!(
            "{:?}: kill {kill} of node {node} done: {} batches acknowledged, {} failovers so far",
            started.elapsed(),
            acked_batches.load(Ordering::SeqCst),
            FAILOVERS.load(Ordering::SeqCst)
        );
    }
    progress(
        acked_batches.load(Ordering::SeqCst),
        "progress after the kills",
    )
    .await;
    cluster.kill_primary().unwrap();
    cluster.promote_standby().unwrap();
    progress(
        acked_batches.load(Ordering::SeqCst),
        "progress after the promotion",
    )
    .await;
    stop.store(true, Ordering::SeqCst);

    let mut sent: BTreeMap<(DeviceId, DeviceId), Vec<Envelope>> = BTreeMap::new();
    let mut sender_failovers = 0;
    for t in sender_tasks {
        let (acked, failovers) = t.await.unwrap();
        sender_failovers += failovers;
        for e in acked {
            sent.entry((e.header.sender_device, e.header.recipient_device))
                .or_default()
                .push(e);
        }
    }
    for (j, r) in receivers.iter().enumerate() {
        let n: usize = sent
            .iter()
            .filter(|((_, to), _)| *to == r.device())
            .map(|(_, v)| v.len())
            .sum();
        expected[j].store(n as u64, Ordering::SeqCst);
    }
    let mut receiver_failovers = 0;
    for (j, t) in receiver_tasks.into_iter().enumerate() {
        let (got, failovers) = t.await.unwrap();
        receiver_failovers += failovers;
        let r = receivers[j].device();
        let seqs: Vec<u64> = got.iter().map(|d| d.seq).collect();
        assert_eq!(
            seqs,
            (1..=got.len() as u64).collect::<Vec<u64>>(),
            "receiver {j}: every seq once, none skipped"
        );
        for s in &senders {
            let from_s: Vec<&Envelope> = got
                .iter()
                .map(|d| &d.envelope)
                .filter(|e| e.header.sender_device == s.device())
                .collect();
            let want: Vec<&Envelope> = sent[&(s.device(), r)].iter().collect();
            assert_eq!(
                from_s, want,
                "receiver {j}: each acknowledged envelope once, in order"
            );
        }
    }
    // Nothing left behind: the final acks (applied by the relay after it
    // answered the pull) empty the inboxes.
    wait_until(PROMPT, "the final acks applied", || {
        cluster
            .psql(&db, "SELECT count(*) FROM hush_envelopes")
            .is_ok_and(|n| n == "0")
    })
    .await
    .unwrap();
    let total: usize = sent.values().map(Vec::len).sum();
    println!(
        "{total} envelopes acknowledged across 10 node kills and a promotion in {:?}; \
         failovers: senders {sender_failovers}, receivers {receiver_failovers}",
        started.elapsed()
    );
    assert!(
        sender_failovers >= 10,
        "the senders did fail over ({sender_failovers})"
    );
}
