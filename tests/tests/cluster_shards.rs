//! Real `hush-relay` processes on two PostgreSQL shards (`--store
//! postgres://A --store postgres://B`, two separate PostgreSQL clusters):
//! devices are spread over both databases by their ids, messages between
//! devices on different shards (sent through either node, one batch
//! spanning both shards) arrive once and in order, live across nodes too;
//! and a node given the shards in another order refuses to start instead
//! of looking for devices in the wrong database.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{DeviceId, Envelope};
use hush_relay::cluster::shard::ShardMap;
use hush_tests::pg::PgCluster;
use hush_tests::{DeviceIdentity, RelayProcess, TestDevice, conversation, make_envelope, stored};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const PUSH_BOUND: Duration = Duration::from_secs(5);

fn hex(d: &DeviceId) -> String {
    d.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The first `n` identities (from seed `from` on) whose device lives on `shard`.
fn identities_on(map: &ShardMap, shard: u32, from: u64, n: usize) -> Vec<DeviceIdentity> {
    (from..)
        .map(DeviceIdentity::from_seed)
        .filter(|i| map.device_shard(&i.device()) == shard)
        .take(n)
        .collect()
}

/// The devices (hex) that have envelopes in `db` of `cluster`, with counts.
fn envelopes_per_device(cluster: &PgCluster, db: &str) -> BTreeMap<String, u64> {
    let out = cluster
        .psql(
            db,
            "SELECT encode(device, 'hex') || ' ' || count(*) FROM hush_envelopes GROUP BY device",
        )
        .unwrap();
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (d, n) = l.split_once(' ').unwrap();
            (d.to_string(), n.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_shards_spread_devices_and_deliver_across_them_once_in_order() {
    let pg = [
        PgCluster::primary_only().unwrap(),
        PgCluster::primary_only().unwrap(),
    ];
    let dbs = [
        pg[0].create_database().unwrap(),
        pg[1].create_database().unwrap(),
    ];
    let urls = [pg[0].url(&dbs[0]), pg[1].url(&dbs[1])];
    let args = [
        "--send-rate",
        "0",
        "--store",
        urls[0].as_str(),
        "--store",
        urls[1].as_str(),
        "--allow-unreplicated",
    ];
    let node_a = RelayProcess::spawn_temp(&args).await.unwrap();
    let node_b = RelayProcess::spawn_temp(&args).await.unwrap();

    let map = ShardMap::numbered(2);
    // Two senders and two receivers on each shard.
    let on0 = identities_on(&map, 0, 1, 4);
    let on1 = identities_on(&map, 1, 1, 4);
    let senders: Vec<&DeviceIdentity> = vec![&on0[0], &on0[1], &on1[0], &on1[1]];
    let receivers: Vec<&DeviceIdentity> = vec![&on0[2], &on0[3], &on1[2], &on1[3]];
    // Receivers register through node B, senders through node A.
    for r in &receivers {
        TestDevice::register_new(r, node_b.target()).await.unwrap();
    }
    // Senders 0 and 2 send through node A, 1 and 3 through node B (a
    // device's newest connection wins cluster-wide, so each keeps one).
    let mut sending = Vec::new();
    for (k, s) in senders.iter().enumerate() {
        let node = if k % 2 == 0 { &node_a } else { &node_b };
        sending.push(TestDevice::register_new(s, node.target()).await.unwrap());
    }
    // Each shard's database holds the inboxes of its own devices.
    for (shard, db) in dbs.iter().enumerate() {
        let inboxes: BTreeSet<String> = pg[shard]
            .psql(db, "SELECT encode(device, 'hex') FROM hush_inboxes")
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let own = if shard == 0 { &on0 } else { &on1 };
        for i in own {
            assert!(
                inboxes.contains(&hex(&i.device())),
                "shard {shard} holds the inbox of its device"
            );
        }
    }

    // A live receiver on shard 1, connected to node B, before the sends.
    let mut live = TestDevice::login(receivers[2], node_b.target())
        .await
        .unwrap();
    assert!(live.read_inbox(0).await.unwrap().is_empty());

    // Every sender sends 5 rounds; each round is one batch to all four
    // receivers, so each batch spans both shards.
    let conv = conversation(7);
    let rounds = 5u64;
    let mut sent: BTreeMap<(DeviceId, DeviceId), Vec<Envelope>> = BTreeMap::new();
    for round in 1..=rounds {
        for (k, s) in senders.iter().enumerate() {
            let batch: Vec<Envelope> = receivers
                .iter()
                .map(|r| make_envelope(s.device(), r.device(), conv, round, b"across shards"))
                .collect();
            let outcomes = sending[k].send(batch.clone()).await.unwrap();
            for (o, e) in outcomes.iter().zip(&batch) {
                assert!(matches!(stored(o), Some((_, false))), "stored: {o:?}");
                sent.entry((e.header.sender_device, e.header.recipient_device))
                    .or_default()
                    .push(e.clone());
            }
        }
    }
    // The live receiver (shard 1, node B) got the first round's first
    // message pushed: sender 0's batch went through node A.
    let pushed = live.next_push(PUSH_BOUND).await.unwrap();
    assert!(!pushed.is_empty(), "a push across nodes and shards");
    assert_eq!(pushed[0].seq, 1);

    // Envelopes are stored on their recipient's shard only.
    let per_db = [
        envelopes_per_device(&pg[0], &dbs[0]),
        envelopes_per_device(&pg[1], &dbs[1]),
    ];
    let expected_each = rounds * senders.len() as u64;
    for r in &receivers {
        let shard = map.device_shard(&r.device()) as usize;
        assert_eq!(
            per_db[shard].get(&hex(&r.device())),
            Some(&expected_each),
            "all of a receiver's envelopes on its own shard"
        );
        assert_eq!(
            per_db[1 - shard].get(&hex(&r.device())),
            None,
            "none on the other shard"
        );
    }

    // Every receiver reads its inbox (half through each node): each
    // sender's envelopes once, in the order sent, byte for byte.
    for (j, r) in receivers.iter().enumerate() {
        let node = if j % 2 == 0 { &node_a } else { &node_b };
        let mut d = TestDevice::login(r, node.target()).await.unwrap();
        let inbox = d.read_inbox(0).await.unwrap();
        let seqs: Vec<u64> = inbox.iter().map(|x| x.seq).collect();
        assert_eq!(seqs, (1..=expected_each).collect::<Vec<u64>>());
        for s in &senders {
            let got: Vec<&Envelope> = inbox
                .iter()
                .map(|x| &x.envelope)
                .filter(|e| e.header.sender_device == s.device())
                .collect();
            let want: Vec<&Envelope> = sent[&(s.device(), r.device())].iter().collect();
            assert_eq!(got, want, "once, in order");
        }
        assert_eq!(d.ack(expected_each).await.unwrap(), expected_each);
    }
    assert_eq!(
        pg[0]
            .psql(&dbs[0], "SELECT count(*) FROM hush_envelopes")
            .unwrap(),
        "0"
    );
    assert_eq!(
        pg[1]
            .psql(&dbs[1], "SELECT count(*) FROM hush_envelopes")
            .unwrap(),
        "0"
    );

    // A node given the shards the other way round refuses to start.
    let swapped = [
        "--send-rate",
        "0",
        "--store",
        urls[1].as_str(),
        "--store",
        urls[0].as_str(),
        "--allow-unreplicated",
    ];
    let err = match RelayProcess::spawn_temp(&swapped).await {
        Ok(_) => panic!("a node with the shards swapped must not start"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("is shard 1 of 2") && err.contains("same order"),
        "{err}"
    );
    // So does one given one shard of the two as its only store.
    let err = match RelayProcess::spawn_temp(&["--store", urls[1].as_str(), "--allow-unreplicated"])
        .await
    {
        Ok(_) => panic!("a node on one shard of two must not start"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("is shard 1 of 2"), "{err}");
    // And one given a third shard without the procedure.
    let err = match RelayProcess::spawn_temp(&[
        "--store",
        urls[0].as_str(),
        "--store",
        urls[1].as_str(),
        "--store",
        pg[0].url(&pg[0].create_database().unwrap()).as_str(),
        "--allow-unreplicated",
    ])
    .await
    {
        Ok(_) => panic!("a node with three shards over a two-shard cluster must not start"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("of 2") && err.contains("Adding a shard"),
        "{err}"
    );
}
