//! What only the PostgreSQL store has to get right: several relay nodes (here,
//! several `PgStore`s with their own connections) racing on one database, a
//! connection killed in the middle of a commit, and the refusal to run on a
//! primary whose commits no synchronous standby confirms. The servers are
//! real PostgreSQL started by `hush_tests::pg`; the shared cluster of this
//! binary has a synchronous standby, so every commit here waits for it.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{
    ConversationId, DeviceId, DeviceRegistration, MessageId, OneTimePrekey, SignedPrekey, UserKey,
};
use hush_relay::store::postgres::commit_statements::{
    BEGIN, LOCK_INBOXES, READ_DEDUP, UPDATE_INBOXES,
};
use hush_relay::store::postgres::{PgOptions, PgStore};
use hush_relay::store::{CommitOutcome, NewEnvelope, Store, StoreError, StoreLimits};
use hush_tests::pg::PgCluster;
use hush_tests::wait_until_blocking;
use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;
use tokio_postgres::types::{ToSql, Type};

/// A statement parameter with its type, as `query_typed` takes it.
type Typed<'a> = (&'a (dyn ToSql + Sync), Type);

/// The replicated cluster of this binary (stopped by its reaper at exit).
fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| PgCluster::with_sync_standby().expect("start PostgreSQL"))
}

/// A fresh database and `nodes` stores on it, as `nodes` relays would have.
fn nodes(n: usize) -> (String, Vec<PgStore>) {
    let c = cluster();
    let db = c.create_database().unwrap();
    let stores = (0..n)
        .map(|_| {
            let s =
                PgStore::open(&c.url(&db), StoreLimits::default(), PgOptions::default()).unwrap();
            assert!(s.replicated(), "{:?}", s.replication());
            s
        })
        .collect();
    (db, stores)
}

fn reg(n: u8) -> DeviceRegistration {
    DeviceRegistration {
        device: DeviceId([n; 16]),
        user: UserKey([n; 32]),
        signing_key: [n; 32],
        agreement_key: [n.wrapping_add(100); 32],
        user_signature: [n; 64],
    }
}

fn env(from: u8, to: u8, msg: u64) -> NewEnvelope {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&msg.to_be_bytes());
    id[8] = from;
    NewEnvelope {
        recipient: DeviceId([to; 16]),
        sender: DeviceId([from; 16]),
        message_id: MessageId(id),
        conversation: ConversationId([1; 16]),
        sender_seq: msg,
        bytes: msg.to_be_bytes().repeat(4),
        expires_at_ms: 1_000_000,
    }
}

/// Eight threads on two nodes fetch bundles of one device at once: every
/// one-time prekey is handed out exactly once, and all of them are.
#[test]
fn racing_bundle_fetches_on_two_nodes_hand_out_each_one_time_prekey_once() {
    const KEYS: u32 = 60;
    let (_db, stores) = nodes(2);
    let target = reg(7);
    stores[0].register_device(&target, 1).unwrap();
    let spk = SignedPrekey {
        id: 1,
        public: [1; 32],
        signature: [2; 64],
    };
    let otks: Vec<_> = (1..=KEYS)
        .map(|id| OneTimePrekey {
            id,
            public: [id as u8; 32],
        })
        .collect();
    assert_eq!(
        stores[1]
            .publish_prekeys(&target.device, &spk, &otks)
            .unwrap(),
        KEYS
    );
    let handed: Vec<Vec<u32>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = &stores[t % 2];
                s.spawn(move || {
                    let mut got = Vec::new();
                    // Each thread asks until the pool is empty for it.
                    loop {
                        let bundle = store.take_prekey_bundle(&target.device).unwrap().unwrap();
                        match bundle.one_time_prekey {
                            Some(k) => got.push(k.id),
                            None => return got,
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let all: Vec<u32> = handed.iter().flatten().copied().collect();
    let distinct: BTreeSet<u32> = all.iter().copied().collect();
    assert_eq!(all.len(), KEYS as usize, "some key was handed out twice");
    assert_eq!(distinct, (1..=KEYS).collect());
    assert!(
        handed.iter().filter(|h| !h.is_empty()).count() >= 2,
        "the fetches did not race: {handed:?}"
    );
    assert_eq!(stores[0].one_time_prekeys_left(&target.device).unwrap(), 0);
}

/// Two nodes commit batches to the same inbox at once: the seqs are unique
/// and contiguous, every envelope is stored once, and the counters agree.
#[test]
fn concurrent_commits_from_two_nodes_to_one_inbox_get_contiguous_unique_seqs() {
    const BATCHES: u64 = 20;
    const PER_BATCH: u64 = 5;
    let (_db, stores) = nodes(2);
    for n in [1, 2, 9] {
        stores[0].register_device(&reg(n), 1).unwrap();
    }
    let seqs: Vec<Vec<u64>> = std::thread::scope(|s| {
        let threads: Vec<_> = [1u8, 2]
            .into_iter()
            .enumerate()
            .map(|(i, from)| {
                let store = &stores[i];
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for b in 0..BATCHES {
                        // Each batch also touches the sender's own inbox, so
                        // the two nodes lock two inboxes in opposite input
                        // orders (a deadlock if they were not sorted).
                        let mut batch: Vec<_> = (0..PER_BATCH)
                            .map(|i| env(from, 9, b * PER_BATCH + i))
                            .collect();
                        batch.insert(0, env(from, 3 - from, 10_000 + b));
                        batch.push(env(from, from, 20_000 + b));
                        for (o, e) in store.commit(&batch).unwrap().into_iter().zip(&batch) {
                            match o {
                                CommitOutcome::Stored { seq } if e.recipient.0[0] == 9 => {
                                    mine.push(seq)
                                }
                                CommitOutcome::Stored { .. } => {}
                                other => panic!("unexpected {other:?}"),
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let total = 2 * BATCHES * PER_BATCH;
    let all: BTreeSet<u64> = seqs.iter().flatten().copied().collect();
    assert_eq!(all.len() as u64, total, "a seq was assigned twice");
    assert_eq!(all, (1..=total).collect());
    // Within a batch, consecutive seqs in input order.
    for mine in &seqs {
        for batch in mine.chunks(PER_BATCH as usize) {
            assert!(batch.windows(2).all(|w| w[1] == w[0] + 1), "{batch:?}");
        }
    }
    let page = stores[1]
        .pull(&DeviceId([9; 16]), 0, usize::MAX, usize::MAX)
        .unwrap();
    assert_eq!(
        page.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let state = stores[0].inbox_state(&DeviceId([9; 16])).unwrap();
    assert_eq!((state.head, state.depth), (total, total));
    assert_eq!(stores[1].total_depth().unwrap(), total + 4 * BATCHES);
}

/// Two nodes commit large batches to the same 12 inboxes at once. Each batch
/// is big enough to be split over several transactions (lanes) on several
/// connections, so up to eight transactions for overlapping inboxes are in
/// flight together. Per inbox the seqs are unique and gap-free, each batch's
/// envelopes to one inbox got consecutive seqs in batch order, a pull returns
/// every envelope once in seq order, and a retry of every batch is recognised
/// as duplicates with the original seqs.
#[test]
fn concurrent_split_batches_from_two_nodes_keep_each_inbox_ordered_and_complete() {
    const BATCHES: u64 = 6;
    const PER_BATCH: u64 = 600;
    const INBOXES: u8 = 12;
    let (_db, stores) = nodes(2);
    for n in 1..=2 {
        stores[0].register_device(&reg(n), 1).unwrap();
    }
    for n in 0..INBOXES {
        stores[0].register_device(&reg(20 + n), 1).unwrap();
    }
    // Uneven shares: inbox 20 gets a third of each batch.
    let batch_of = |from: u8, b: u64| -> Vec<NewEnvelope> {
        (0..PER_BATCH)
            .map(|i| {
                let to = if i % 3 == 0 {
                    20
                } else {
                    20 + (i % u64::from(INBOXES)) as u8
                };
                env(from, to, b * PER_BATCH + i)
            })
            .collect()
    };
    let results: Vec<Vec<(Vec<NewEnvelope>, Vec<CommitOutcome>)>> = std::thread::scope(|s| {
        let threads: Vec<_> = [1u8, 2]
            .into_iter()
            .enumerate()
            .map(|(i, from)| {
                let store = &stores[i];
                s.spawn(move || {
                    (0..BATCHES)
                        .map(|b| {
                            let batch = batch_of(from, b);
                            let outcomes = store.commit(&batch).unwrap();
                            (batch, outcomes)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut per_inbox: std::collections::BTreeMap<DeviceId, Vec<u64>> = Default::default();
    for (batch, outcomes) in results.iter().flatten() {
        assert_eq!(batch.len(), outcomes.len());
        // Within the batch, per inbox: consecutive seqs in batch order.
        let mut last: std::collections::BTreeMap<DeviceId, u64> = Default::default();
        for (e, o) in batch.iter().zip(outcomes) {
            let CommitOutcome::Stored { seq } = *o else {
                panic!("unexpected {o:?}");
            };
            if let Some(prev) = last.insert(e.recipient, seq) {
                assert_eq!(seq, prev + 1, "batch order broken in {:?}", e.recipient);
            }
            per_inbox.entry(e.recipient).or_default().push(seq);
        }
    }
    let mut total = 0;
    for (device, mut seqs) in per_inbox {
        seqs.sort_unstable();
        let n = seqs.len() as u64;
        total += n;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "seqs of {device:?}");
        let page = stores[1].pull(&device, 0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(
            page.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>()
        );
        let state = stores[0].inbox_state(&device).unwrap();
        assert_eq!((state.head, state.depth), (n, n));
    }
    assert_eq!(total, 2 * BATCHES * PER_BATCH);
    assert_eq!(stores[1].total_depth().unwrap(), total);
    // Retries (on the other node) change nothing and get the original seqs.
    for (i, runs) in results.iter().enumerate() {
        for (batch, outcomes) in runs {
            let again = stores[1 - i].commit(batch).unwrap();
            let expected: Vec<_> = outcomes
                .iter()
                .map(|o| match *o {
                    CommitOutcome::Stored { seq } => CommitOutcome::Duplicate { seq },
                    other => other,
                })
                .collect();
            assert_eq!(again, expected);
        }
    }
    assert_eq!(stores[0].total_depth().unwrap(), total);
}

/// The connection of a commit in flight is terminated by the server: the
/// commit fails with a typed error (no panic, nothing acknowledged), the store
/// reconnects by itself, and the client's retry with the same ids stores each
/// envelope once; a second retry is recognised as a duplicate.
#[test]
fn a_commit_whose_connection_is_killed_fails_and_its_retry_does_not_duplicate() {
    let c = cluster();
    let (db, stores) = nodes(1);
    let store = &stores[0];
    store.register_device(&reg(9), 1).unwrap();
    let batch: Vec<_> = (1..=4).map(|m| env(1, 9, m)).collect();

    // Hold the inbox row so the commit blocks inside its transaction.
    let locker = c
        .psql_command(&db)
        .env("PGAPPNAME", "hush-test-locker")
        .arg("-c")
        .arg("BEGIN; SELECT 1 FROM hush_inboxes FOR UPDATE; SELECT pg_sleep(30); COMMIT;")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut locker = KillOnDrop(locker);
    wait_until_blocking(
        Duration::from_secs(20),
        "the locker to hold the row",
        || {
            c.psql(
                &db,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hush-test-locker' \
             AND wait_event = 'PgSleep' AND datname = current_database()",
            )
            .is_ok_and(|n| n == "1")
        },
    )
    .unwrap();
    let blocked_commit = "SELECT count(*) FROM pg_stat_activity WHERE application_name = \
                          'hush-relay' AND wait_event_type = 'Lock' AND datname = current_database()";
    let result = std::thread::scope(|s| {
        let commit = s.spawn(|| store.commit(&batch));
        wait_until_blocking(
            Duration::from_secs(20),
            "the commit to wait on the lock",
            || c.psql(&db, blocked_commit).is_ok_and(|n| n == "1"),
        )
        .unwrap();
        let killed = c
            .psql(
                &db,
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'hush-relay' AND wait_event_type = 'Lock' \
                 AND datname = current_database()) t",
            )
            .unwrap();
        assert_eq!(killed, "1");
        commit.join().unwrap()
    });
    match result {
        Err(StoreError::Backend(msg)) => assert!(msg.contains("postgres"), "{msg}"),
        other => panic!("the killed commit must fail, got {other:?}"),
    }
    c.psql(
        &db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'hush-test-locker' AND datname = current_database()",
    )
    .unwrap();
    let _ = locker.0.wait();
    // Nothing of the failed commit is visible.
    assert_eq!(store.inbox_state(&DeviceId([9; 16])).unwrap().head, 0);
    // The retry (same ids) reconnects and stores each envelope once.
    let retry = store.commit(&batch).unwrap();
    assert_eq!(
        retry,
        (1..=4)
            .map(|seq| CommitOutcome::Stored { seq })
            .collect::<Vec<_>>()
    );
    let again = store.commit(&batch).unwrap();
    assert_eq!(
        again,
        (1..=4)
            .map(|seq| CommitOutcome::Duplicate { seq })
            .collect::<Vec<_>>()
    );
    let state = store.inbox_state(&DeviceId([9; 16])).unwrap();
    assert_eq!((state.head, state.depth), (4, 4));
}

/// A large batch is split over several transactions; the one for inbox 30 is
/// held on its row lock and its connection is killed while the others
/// commit. The commit fails as a whole (nobody is acknowledged), and the
/// retry stores the killed lane's envelopes once and answers the others,
/// which had committed, as duplicates with their original seqs: nothing is
/// lost or stored twice.
#[test]
fn a_split_commit_with_one_lane_killed_fails_and_its_retry_loses_and_duplicates_nothing() {
    const PER_INBOX: u64 = 100;
    let c = cluster();
    let (db, stores) = nodes(1);
    let store = &stores[0];
    for n in 30..34 {
        store.register_device(&reg(n), 1).unwrap();
    }
    let batch: Vec<_> = (0..4 * PER_INBOX)
        .map(|i| env(1, 30 + (i % 4) as u8, i))
        .collect();
    let locker = c
        .psql_command(&db)
        .env("PGAPPNAME", "hush-test-locker")
        .arg("-c")
        .arg(
            "BEGIN; SELECT 1 FROM hush_inboxes WHERE device = '\\x1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e' \
             FOR UPDATE; SELECT pg_sleep(30); COMMIT;",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut locker = KillOnDrop(locker);
    wait_until_blocking(
        Duration::from_secs(20),
        "the locker to hold the row",
        || {
            c.psql(
                &db,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'hush-test-locker' \
             AND wait_event = 'PgSleep' AND datname = current_database()",
            )
            .is_ok_and(|n| n == "1")
        },
    )
    .unwrap();
    let blocked = "SELECT count(*) FROM pg_stat_activity WHERE application_name = \
                   'hush-relay' AND wait_event_type = 'Lock' AND datname = current_database()";
    let result = std::thread::scope(|s| {
        let commit = s.spawn(|| store.commit(&batch));
        wait_until_blocking(
            Duration::from_secs(20),
            "one lane to wait on the lock",
            || c.psql(&db, blocked).is_ok_and(|n| n == "1"),
        )
        .unwrap();
        // The other lanes commit meanwhile.
        wait_until_blocking(Duration::from_secs(20), "the other lanes to commit", || {
            (31..34).all(|n| {
                store
                    .inbox_state(&DeviceId([n; 16]))
                    .is_ok_and(|s| s.head == PER_INBOX)
            })
        })
        .unwrap();
        let killed = c
            .psql(
                &db,
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'hush-relay' AND wait_event_type = 'Lock' \
                 AND datname = current_database()) t",
            )
            .unwrap();
        assert_eq!(killed, "1");
        commit.join().unwrap()
    });
    match result {
        Err(StoreError::Backend(msg)) => assert!(msg.contains("postgres"), "{msg}"),
        other => panic!("the commit with a killed lane must fail, got {other:?}"),
    }
    c.psql(
        &db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'hush-test-locker' AND datname = current_database()",
    )
    .unwrap();
    let _ = locker.0.wait();
    assert_eq!(store.inbox_state(&DeviceId([30; 16])).unwrap().head, 0);
    let retry = store.commit(&batch).unwrap();
    for (i, (e, o)) in batch.iter().zip(&retry).enumerate() {
        let seq = i as u64 / 4 + 1;
        let expected = if e.recipient == DeviceId([30; 16]) {
            CommitOutcome::Stored { seq }
        } else {
            CommitOutcome::Duplicate { seq }
        };
        assert_eq!(*o, expected, "envelope {i}");
    }
    for n in 30..34 {
        let state = store.inbox_state(&DeviceId([n; 16])).unwrap();
        assert_eq!((state.head, state.depth), (PER_INBOX, PER_INBOX));
    }
    assert_eq!(store.total_depth().unwrap(), 4 * PER_INBOX);
}

/// A primary without a synchronous standby is refused unless explicitly
/// allowed, and the store reports it as unreplicated.
#[test]
fn a_primary_without_a_synchronous_standby_is_refused_unless_allowed() {
    let lone = PgCluster::primary_only().unwrap();
    let db = lone.create_database().unwrap();
    let url = lone.url(&db);
    let err = PgStore::open(&url, StoreLimits::default(), PgOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("no synchronous standby") && msg.contains("--allow-unreplicated"),
        "{msg}"
    );
    let allowed = PgStore::open(
        &url,
        StoreLimits::default(),
        PgOptions {
            allow_unreplicated: true,
            ..PgOptions::default()
        },
    )
    .unwrap();
    assert!(!allowed.replicated());
    // The replicated cluster passes the same check.
    let (_db, stores) = nodes(1);
    assert!(stores[0].replicated());
    assert_eq!(stores[0].replication().sync_standbys, 1);
}

/// A large commit (a few thousand envelopes for a few thousand recipients)
/// probes the primary keys once per row: its inbox lock, dedup lookup and
/// counter update must not become hash joins over sequential scans of the
/// whole `hush_inboxes` or `hush_dedup` table, which the planner prefers
/// for arrays this large and whose cost grows with every registered device
/// and every stored envelope. The statements run as a commit runs them:
/// after its `BEGIN`, with binary arrays and their types, unnamed (planned
/// with the values).
#[test]
fn a_large_commits_statements_probe_the_indexes_not_whole_tables() {
    const ROWS: usize = 3500;
    let c = cluster();
    let (db, _stores) = nodes(1);
    c.psql(
        &db,
        "INSERT INTO hush_inboxes (device) SELECT decode(md5(i::text), 'hex') \
         FROM generate_series(1, 50000) AS i; \
         INSERT INTO hush_dedup SELECT decode(md5((i % 16)::text), 'hex'), \
         decode(md5((i % 64)::text), 'hex'), decode(md5(i::text), 'hex'), i, i \
         FROM generate_series(1, 60000) AS i; ANALYZE hush_inboxes; ANALYZE hush_dedup",
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let plans: Vec<String> = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&c.primary_url(&db), tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let keys = client
            .query_one(
                "SELECT array_agg(recipient ORDER BY seq), array_agg(sender ORDER BY seq), \
                 array_agg(message_id ORDER BY seq) FROM hush_dedup WHERE seq > 56500",
                &[],
            )
            .await
            .unwrap();
        let to: Vec<Vec<u8>> = keys.get(0);
        let from: Vec<Vec<u8>> = keys.get(1);
        let ids: Vec<Vec<u8>> = keys.get(2);
        assert_eq!(ids.len(), ROWS);
        let devices: Vec<Vec<u8>> = client
            .query_one(
                "SELECT array_agg(device ORDER BY device) FROM \
                 (SELECT device FROM hush_inboxes ORDER BY device LIMIT 3500) AS d",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let zeros = vec![0i64; ROWS];
        let purge: Vec<Option<i64>> = vec![None; ROWS];
        let explain = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)";
        client.batch_execute(BEGIN).await.unwrap();
        let lock: [Typed; 1] = [(&devices, Type::BYTEA_ARRAY)];
        let dedup: [Typed; 3] = [
            (&to, Type::BYTEA_ARRAY),
            (&from, Type::BYTEA_ARRAY),
            (&ids, Type::BYTEA_ARRAY),
        ];
        let update: [Typed; 5] = [
            (&devices, Type::BYTEA_ARRAY),
            (&zeros, Type::INT8_ARRAY),
            (&zeros, Type::INT8_ARRAY),
            (&zeros, Type::INT8_ARRAY),
            (&purge, Type::INT8_ARRAY),
        ];
        let statements: [(&str, &[Typed]); 3] = [
            (LOCK_INBOXES, &lock),
            (READ_DEDUP, &dedup),
            (UPDATE_INBOXES, &update),
        ];
        let mut plans = Vec::new();
        // As an unnamed statement (planned for its values), then as the
        // relay runs them, prepared, with the plan PostgreSQL may switch to
        // after five executions: the generic one, made without the values.
        for (n, (sql, params)) in statements.iter().enumerate() {
            let rows = client
                .query_typed(&format!("{explain} {sql}"), params)
                .await
                .unwrap();
            let lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            plans.push(lines.join("\n"));
            client
                .batch_execute(&format!(
                    "SET LOCAL plan_cache_mode = force_generic_plan; PREPARE generic{n} AS {sql}"
                ))
                .await
                .unwrap();
            // A generic plan does not depend on the values, so any will do
            // (EXECUTE takes no bind parameters, and without ANALYZE nothing
            // runs).
            let nulls = vec!["NULL"; params.len()].join(", ");
            let rows = client
                .simple_query(&format!("EXPLAIN (COSTS OFF) EXECUTE generic{n}({nulls})"))
                .await
                .unwrap();
            let lines: Vec<String> = rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                })
                .collect();
            plans.push(lines.join("\n"));
            client
                .batch_execute("SET LOCAL plan_cache_mode = auto")
                .await
                .unwrap();
        }
        client.batch_execute("ROLLBACK").await.unwrap();
        drop(client);
        let _ = conn.await;
        plans
    });
    // Plans with their long array constants cut, for the failure message.
    let short: Vec<String> = plans
        .iter()
        .map(|p| {
            p.lines()
                .map(|l| l.chars().take(120).collect::<String>())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let [lock, lock_g, dedup, dedup_g, update, update_g] = short.as_slice() else {
        panic!("six plans: {short:?}");
    };
    let mut wrong = Vec::new();
    for (name, plan, table) in [
        ("inbox lock", lock, "hush_inboxes"),
        ("inbox lock (generic plan)", lock_g, "hush_inboxes"),
        ("dedup lookup", dedup, "hush_dedup"),
        ("dedup lookup (generic plan)", dedup_g, "hush_dedup"),
        ("inbox update", update, "hush_inboxes"),
        ("inbox update (generic plan)", update_g, "hush_inboxes"),
    ] {
        if plan.contains(&format!("Seq Scan on {table}"))
            || !plan.contains(&format!("Index Scan using {table}_pkey"))
        {
            wrong.push(format!("{name} does not probe {table}_pkey:\n{plan}"));
        }
    }
    // And the reads found every row (the top node's row count; the generic
    // plans were not run).
    for (name, plan) in [("inbox lock", lock), ("dedup lookup", dedup)] {
        let top = plan.lines().next().unwrap_or_default();
        if !top.contains("actual rows=3500 ") {
            wrong.push(format!("{name} did not find all 3500 rows:\n{plan}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// A database written by a newer relay (higher schema version) is refused.
#[test]
fn a_newer_schema_version_is_refused() {
    let c = cluster();
    let (db, _stores) = nodes(1);
    c.psql(
        &db,
        "UPDATE hush_meta SET value = value + 1 WHERE key = 'schema_version'",
    )
    .unwrap();
    let err = PgStore::open(&c.url(&db), StoreLimits::default(), PgOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("newer than this relay"), "{err}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
