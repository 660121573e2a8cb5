//! Two relay nodes sharing one store, joined by the PostgreSQL cluster bus
//! (LISTEN/NOTIFY) and sharing their rate limits in PostgreSQL.
//!
//! Both nodes run in this process over one shared store, each with its own
//! QUIC endpoint, hub and bus connections to a real PostgreSQL server on
//! 127.0.0.1, so the cross-node paths are the real ones: a commit on node A
//! reaches a connection on node B only through a NOTIFY, and a claim on
//! node B reaches node A only through one too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{ErrorCode, OneTimePrekey, ServerFrame, SignedPrekey};
use hush_relay::cluster::ClusterOptions;
use hush_relay::cluster::bus::NodeId;
use hush_relay::cluster::limits::Rates;
use hush_relay::cluster::pg::{PgBus, PgLimits};
use hush_relay::cluster::shard::ShardedStore;
use hush_relay::store::memory::MemoryStore;
use hush_relay::store::redb_store::RedbStore;
use hush_relay::store::{Store, StoreLimits};
use hush_relay::{Config, RelayHandle, StartOptions, SystemClock};
use hush_tests::{
    DeviceIdentity, RelayTarget, TestDevice, conversation, make_envelope, refusal_code, stored,
    wait_until,
};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bound on one expected event (a push, a close, a start-up).
const PROMPT: Duration = Duration::from_secs(10);
/// The generous bound a live push across nodes must meet.
const PUSH_BOUND: Duration = Duration::from_secs(5);

/// A throwaway PostgreSQL server on a free loopback port (no fsync: these
/// tests check the bus, not the database's durability).
struct Postgres {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// `(uid, gid)` of the `postgres` account, which PostgreSQL needs when
/// the tests run as root (it refuses to run as root).
fn postgres_account() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn pg_bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn as_postgres(cmd: &mut Command, account: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt as _;
    if let Some((uid, gid)) = account {
        cmd.uid(uid).gid(gid);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Postgres {
    async fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir");
        let account = if is_root() {
            Some(postgres_account().expect("a postgres account to run PostgreSQL as"))
        } else {
            None
        };
        if let Some((uid, gid)) = account {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(pg_bin("initdb"));
        initdb
            .args([
                "-D",
                path_str(&data),
                "-U",
                "hush",
                "--auth=trust",
                "--no-sync",
            ])
            .args(["-E", "UTF8", "--locale=C"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_postgres(&mut initdb, account);
        let out = initdb
            .output()
            .expect("initdb runs (is PostgreSQL installed?)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut postgres = Command::new(pg_bin("postgres"));
        postgres
            .args(["-D", path_str(&data), "-p", &port.to_string()])
            .args(["-k", path_str(dir.path())])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_postgres(&mut postgres, account);
        let child = postgres.spawn().expect("postgres starts");
        let pg = Postgres {
            child,
            port,
            _dir: dir,
        };
        wait_until(PROMPT, "PostgreSQL accepts connections", || {
            Command::new(pg_bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "hush"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .await
        .expect("PostgreSQL ready");
        pg
    }

    fn url(&self) -> String {
        format!("postgres://hush@127.0.0.1:{}/postgres", self.port)
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown: the postmaster takes its backends down.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// One relay node over `store`, on the cluster bus at `url`; with
/// `shared_limits`, its rate limits are the cluster's, else its own.
async fn node(
    store: &Arc<dyn Store>,
    url: &str,
    shared_limits: bool,
    registrations_per_hour: u32,
) -> (RelayHandle, Arc<PgBus>, tempfile::TempDir) {
    node_with(store, url, shared_limits, |c| {
        c.max_registrations_per_ip_hour = registrations_per_hour;
    })
    .await
}

/// [`node`] with the configuration adjusted by `adjust`.
async fn node_with(
    store: &Arc<dyn Store>,
    url: &str,
    shared_limits: bool,
    adjust: impl FnOnce(&mut Config),
) -> (RelayHandle, Arc<PgBus>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default_for(dir.path().join("data"));
    config.send_rate = 0;
    config.http = None;
    adjust(&mut config);
    let rates = Rates {
        registrations_per_ip_hour: config.max_registrations_per_ip_hour,
        prekey_fetches_per_device_minute: config.prekey_fetches_per_device_minute,
        prekey_fetches_per_target_minute: config.prekey_fetches_per_target_minute,
    };
    // The shared store is not PostgreSQL, so the bus announces commits.
    let bus = Arc::new(PgBus::new(&[url.to_string()], true).expect("bus"));
    let limits = if shared_limits {
        let l: Arc<dyn hush_relay::cluster::limits::RateLimits> =
            Arc::new(PgLimits::new(url, rates).expect("limits"));
        Some(l)
    } else {
        None
    };
    let options = StartOptions {
        cluster: Some(ClusterOptions {
            node: NodeId::random(),
            bus: bus.clone(),
            limits,
        }),
        ..StartOptions::default()
    };
    let relay =
        RelayHandle::start_with_store(config, Arc::new(SystemClock), Arc::clone(store), options)
            .await
            .expect("node starts");
    wait_until(PROMPT, "the node's bus is listening", || bus.is_listening())
        .await
        .expect("bus up");
    (relay, bus, dir)
}

fn target(relay: &RelayHandle) -> RelayTarget {
    RelayTarget::from_cert_der(relay.quic_addr(), &relay.cert_der())
}

fn shared_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(StoreLimits::default()))
}

/// Senders on node A, a receiver on node B: every live message is pushed
/// to B within the bound, once, in order; messages sent while the receiver
/// is offline arrive in order when it comes back (on node A this time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_on_one_node_are_pushed_live_to_a_device_on_the_other() {
    let pg = Postgres::start().await;
    let store = shared_store();
    let (a, _bus_a, _da) = node(&store, &pg.url(), true, 0).await;
    let (b, _bus_b, _db) = node(&store, &pg.url(), true, 0).await;
    let (alice, bob) = (DeviceIdentity::from_seed(1), DeviceIdentity::from_seed(2));
    let mut sender = TestDevice::register_new(&alice, target(&a)).await.unwrap();
    let mut receiver = TestDevice::register_new(&bob, target(&b)).await.unwrap();
    // An empty pull makes the receiver's session live.
    assert!(receiver.read_inbox(0).await.unwrap().is_empty());

    let conv = conversation(1);
    let mut worst = Duration::ZERO;
    for seq in 1..=20u64 {
        let env = make_envelope(alice.device(), bob.device(), conv, seq, &seq.to_be_bytes());
        let sent = Instant::now();
        let outcome = sender.send_one(env.clone()).await.unwrap();
        assert_eq!(stored(&outcome), Some((seq, false)), "stored on node A");
        let pushed = receiver.next_push(PUSH_BOUND).await.unwrap_or_else(|e| {
            panic!("message {seq} was not pushed to node B within {PUSH_BOUND:?}: {e}")
        });
        worst = worst.max(sent.elapsed());
        assert_eq!(pushed.len(), 1, "exactly one push per message");
        assert_eq!(pushed[0].seq, seq, "in order");
        assert_eq!(pushed[0].envelope, env);
        receiver.ack(seq).await.unwrap();
    }
    println!("slowest send-to-push across nodes: {worst:?}");

    // Offline: the receiver leaves, ten more arrive, it returns on node A.
    receiver.close();
    for seq in 21..=30u64 {
        let env = make_envelope(alice.device(), bob.device(), conv, seq, &seq.to_be_bytes());
        assert!(stored(&sender.send_one(env).await.unwrap()).is_some());
    }
    let mut back = TestDevice::login(&bob, target(&a)).await.unwrap();
    let got = back.read_inbox(20).await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, (21..=30).collect::<Vec<u64>>(), "once each, in order");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A device connected to node A connects again to node B: the older
/// connection, on A, is closed with `Replaced`; the newer one stays and
/// gets the pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_connection_wins_across_nodes() {
    let pg = Postgres::start().await;
    let store = shared_store();
    let (a, _bus_a, _da) = node(&store, &pg.url(), true, 0).await;
    let (b, _bus_b, _db) = node(&store, &pg.url(), true, 0).await;
    let carol = DeviceIdentity::from_seed(3);
    let mut first = TestDevice::register_new(&carol, target(&a)).await.unwrap();
    assert!(first.ping().await.is_ok());
    let mut second = TestDevice::login(&carol, target(&b)).await.unwrap();
    match first.next_frame(PROMPT).await {
        Ok(ServerFrame::Closing { code, .. }) => assert_eq!(code, ErrorCode::Replaced),
        other => panic!("expected Closing{{Replaced}} on node A, got {other:?}"),
    }
    first
        .closed(PROMPT)
        .await
        .expect("the replaced connection closes");
    assert!(second.ping().await.is_ok(), "the newer connection stays");
    // And back: a third connection on A replaces the one on B.
    let mut third = TestDevice::login(&carol, target(&a)).await.unwrap();
    match second.next_frame(PROMPT).await {
        Ok(ServerFrame::Closing { code, .. }) => assert_eq!(code, ErrorCode::Replaced),
        other => panic!("expected Closing{{Replaced}} on node B, got {other:?}"),
    }
    assert!(third.ping().await.is_ok());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The registration limit per address is the cluster's: with two per hour,
/// two registrations on node A leave none for node B. The same two nodes
/// with their own in-memory limits (the single-node limiter) let the third
/// through — which is the attack the shared limits stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_limit_holds_across_nodes() {
    let pg = Postgres::start().await;
    for shared in [true, false] {
        let store = shared_store();
        let (a, _bus_a, _da) = node(&store, &pg.url(), shared, 2).await;
        let (b, _bus_b, _db) = node(&store, &pg.url(), shared, 2).await;
        let base = if shared { 100 } else { 200 };
        for i in 0..2 {
            TestDevice::register_new(&DeviceIdentity::from_seed(base + i), target(&a))
                .await
                .expect("within the limit");
        }
        let third =
            TestDevice::register_new(&DeviceIdentity::from_seed(base + 2), target(&b)).await;
        if shared {
            assert_eq!(
                refusal_code(&third),
                Some(ErrorCode::RegistrationLimit),
                "node B must refuse the address's third registration this hour"
            );
        } else {
            assert!(third.is_ok(), "per-node limits let the third one through");
        }
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }
}

/// Two shards, each its own store and its own PostgreSQL server for the
/// bus: devices land on both (by rendezvous hashing of their ids), and
/// devices on different shards, connected to different nodes, exchange
/// messages live; each envelope is stored on its recipient's shard only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_shards_exchange_messages_across_nodes() {
    let (pg0, pg1) = (Postgres::start().await, Postgres::start().await);
    let urls = [pg0.url(), pg1.url()];
    let dir = tempfile::tempdir().expect("temp dir");
    let shards: Vec<Arc<dyn Store>> = (0..2)
        .map(|i| {
            let store = RedbStore::open(
                dir.path().join(format!("shard{i}.redb")),
                StoreLimits::default(),
            )
            .expect("shard store");
            Arc::new(store) as Arc<dyn Store>
        })
        .collect();
    let sharded = ShardedStore::new(shards.clone()).expect("two shards");
    let map = sharded.map().clone();
    let store: Arc<dyn Store> = Arc::new(sharded);
    let (a, bus_a, _da) = sharded_node(&store, &urls).await;
    let (b, bus_b, _db) = sharded_node(&store, &urls).await;
    assert!(bus_a.is_listening() && bus_b.is_listening());

    // Eight devices, alternately on node A and node B.
    let ids: Vec<DeviceIdentity> = (10..18).map(DeviceIdentity::from_seed).collect();
    let used: std::collections::BTreeSet<u32> =
        ids.iter().map(|d| map.device_shard(&d.device())).collect();
    assert_eq!(used.len(), 2, "eight devices use both shards");
    let x = ids
        .iter()
        .find(|d| map.device_shard(&d.device()) == 0)
        .expect("a device on shard 0");
    let y = ids
        .iter()
        .find(|d| map.device_shard(&d.device()) == 1)
        .expect("a device on shard 1");
    let mut on_a = TestDevice::register_new(x, target(&a)).await.unwrap();
    let mut on_b = TestDevice::register_new(y, target(&b)).await.unwrap();
    for other in ids
        .iter()
        .filter(|d| d.device() != x.device() && d.device() != y.device())
    {
        TestDevice::register_new(other, target(&a)).await.unwrap();
    }
    assert!(on_a.read_inbox(0).await.unwrap().is_empty());
    assert!(on_b.read_inbox(0).await.unwrap().is_empty());

    let conv = conversation(7);
    for seq in 1..=5u64 {
        // x (shard 0, node A) to y (shard 1, node B), and back.
        let to_y = make_envelope(x.device(), y.device(), conv, seq, b"to y");
        assert_eq!(
            stored(&on_a.send_one(to_y.clone()).await.unwrap()),
            Some((seq, false))
        );
        let got = on_b
            .next_push(PUSH_BOUND)
            .await
            .expect("pushed to y on node B");
        assert_eq!((got.len(), got[0].seq), (1, seq));
        assert_eq!(got[0].envelope, to_y);
        let to_x = make_envelope(y.device(), x.device(), conv, seq, b"to x");
        assert_eq!(
            stored(&on_b.send_one(to_x.clone()).await.unwrap()),
            Some((seq, false))
        );
        let got = on_a
            .next_push(PUSH_BOUND)
            .await
            .expect("pushed to x on node A");
        assert_eq!((got.len(), got[0].seq), (1, seq));
        assert_eq!(got[0].envelope, to_x);
    }
    assert_eq!(
        shards[1].inbox_state(&y.device()).unwrap().head,
        5,
        "y's inbox is on shard 1"
    );
    assert_eq!(shards[0].inbox_state(&y.device()).unwrap().head, 0);
    assert_eq!(
        shards[0].inbox_state(&x.device()).unwrap().head,
        5,
        "x's inbox is on shard 0"
    );
    assert_eq!(shards[1].inbox_state(&x.device()).unwrap().head, 0);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

async fn sharded_node(
    store: &Arc<dyn Store>,
    urls: &[String],
) -> (RelayHandle, Arc<PgBus>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default_for(dir.path().join("data"));
    config.send_rate = 0;
    config.http = None;
    let bus = Arc::new(PgBus::new(urls, true).expect("bus"));
    let options = StartOptions {
        cluster: Some(ClusterOptions {
            node: NodeId::random(),
            bus: bus.clone(),
            limits: None,
        }),
        ..StartOptions::default()
    };
    let relay =
        RelayHandle::start_with_store(config, Arc::new(SystemClock), Arc::clone(store), options)
            .await
            .expect("node starts");
    wait_until(PROMPT, "the node's bus is listening on both shards", || {
        bus.is_listening()
    })
    .await
    .expect("bus up");
    (relay, bus, dir)
}

fn signed_prekey(owner: &DeviceIdentity, id: u32) -> SignedPrekey {
    let public = [id as u8; 32];
    SignedPrekey {
        id,
        public,
        signature: owner.sign_as_device(&public),
    }
}

/// Strangers drain one device's one-time prekeys by fetching through both
/// nodes: the per-target limit (here 3 per minute) is the cluster's, so
/// the fourth fetch is refused on whichever node it arrives at, and only
/// three one-time prekeys left the pool. With per-node limits the same
/// fetches would take four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prekey_fetches_of_one_target_are_limited_across_nodes() {
    let pg = Postgres::start().await;
    let store = shared_store();
    let adjust = |c: &mut Config| {
        c.prekey_fetches_per_target_minute = 3;
        c.prekey_fetches_per_device_minute = 100;
    };
    let (a, _bus_a, _da) = node_with(&store, &pg.url(), true, adjust).await;
    let (b, _bus_b, _db) = node_with(&store, &pg.url(), true, adjust).await;
    let owner = DeviceIdentity::from_seed(40);
    let mut o = TestDevice::register_new(&owner, target(&a)).await.unwrap();
    let pool: Vec<OneTimePrekey> = (1..=10)
        .map(|id| OneTimePrekey {
            id,
            public: [id as u8; 32],
        })
        .collect();
    assert_eq!(
        o.publish_prekeys(signed_prekey(&owner, 1), pool)
            .await
            .unwrap(),
        10
    );
    let mut on_a = TestDevice::register_new(&DeviceIdentity::from_seed(41), target(&a))
        .await
        .unwrap();
    let mut on_b = TestDevice::register_new(&DeviceIdentity::from_seed(42), target(&b))
        .await
        .unwrap();
    assert!(on_a.fetch_prekeys(owner.device()).await.is_ok());
    assert!(on_a.fetch_prekeys(owner.device()).await.is_ok());
    assert!(on_b.fetch_prekeys(owner.device()).await.is_ok());
    let res = on_b.fetch_prekeys(owner.device()).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::RateLimited), "{res:?}");
    let res = on_a.fetch_prekeys(owner.device()).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::RateLimited), "{res:?}");
    assert_eq!(
        store.one_time_prekeys_left(&owner.device()).unwrap(),
        7,
        "three fetches in the minute, whichever node they went to"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A node whose bus never announces its commits (every inbox NOTIFY lost,
/// as when a node dies between its commit and the NOTIFY) and wakes its
/// devices every `safety_wake`.
async fn silent_node(
    store: &Arc<dyn Store>,
    url: &str,
    safety_wake: Duration,
) -> (RelayHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default_for(dir.path().join("data"));
    config.send_rate = 0;
    config.http = None;
    let bus = Arc::new(
        PgBus::new(&[url.to_string()], false)
            .expect("bus")
            .with_safety_wake(safety_wake),
    );
    let options = StartOptions {
        cluster: Some(ClusterOptions {
            node: NodeId::random(),
            bus: bus.clone(),
            limits: None,
        }),
        ..StartOptions::default()
    };
    let relay =
        RelayHandle::start_with_store(config, Arc::new(SystemClock), Arc::clone(store), options)
            .await
            .expect("node starts");
    wait_until(PROMPT, "the node's bus is listening", || bus.is_listening())
        .await
        .expect("bus up");
    (relay, dir)
}

/// Every inbox NOTIFY is lost (the nodes' buses never send one): a device
/// connected to node B still gets what node A committed, by B's periodic
/// safety wake-up, within its period (plus a margin), once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_inbox_notify_only_delays_the_push_until_the_safety_wake() {
    let pg = Postgres::start().await;
    let store = shared_store();
    let wake = Duration::from_millis(400);
    let (a, _da) = silent_node(&store, &pg.url(), wake).await;
    let (b, _db) = silent_node(&store, &pg.url(), wake).await;
    let (alice, bob) = (DeviceIdentity::from_seed(71), DeviceIdentity::from_seed(72));
    let mut sender = TestDevice::register_new(&alice, target(&a)).await.unwrap();
    let mut receiver = TestDevice::register_new(&bob, target(&b)).await.unwrap();
    assert!(receiver.read_inbox(0).await.unwrap().is_empty(), "live now");
    let conv = conversation(71);
    for seq in 1..=3u64 {
        let env = make_envelope(alice.device(), bob.device(), conv, seq, b"no notify");
        assert_eq!(
            stored(&sender.send_one(env.clone()).await.unwrap()),
            Some((seq, false))
        );
        let pushed = receiver
            .next_push(wake + PUSH_BOUND)
            .await
            .unwrap_or_else(|e| panic!("message {seq} never reached node B's device: {e}"));
        assert_eq!(pushed.len(), 1, "once");
        assert_eq!(pushed[0].seq, seq, "in order");
        assert_eq!(pushed[0].envelope, env);
        receiver.ack(seq).await.unwrap();
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
