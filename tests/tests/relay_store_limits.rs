//! The relay's store-wide limits, end to end on a real `hush-relay` process
//! on 127.0.0.1: a sender filling the relay's disk is refused with
//! `StoreFull` while the recipient keeps pulling and acknowledging (which
//! gives the space back), and one user cannot register more than
//! `--max-devices-per-user` devices. Plus, on an in-process relay whose
//! store rolls small segments, the commit writer's segment compaction; and
//! a relay whose disk fails a write of its envelope log or of its index.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{Envelope, ErrorCode, SendOutcome};
use hush_relay::store::redb_store::RedbStore;
use hush_relay::store::{StoreLimits, stored_cost};
use hush_relay::{Config, RelayHandle, StartOptions, SystemClock};
use hush_tests::{
    DeviceIdentity, RelayProcess, RelayTarget, TestDevice, conversation, make_envelope_sized,
    refusal_code, refused, stored, wait_until,
};
use std::sync::Arc;
use std::time::Duration;

/// Bound for anything the relay should do promptly.
const PROMPT: Duration = Duration::from_secs(10);

/// Encoded size of each envelope the filling sender sends.
const ENVELOPE: usize = 8 * 1024;
/// The relay's store cap: eight envelopes' worth would not fit.
const CAP: &str = "64K";
const CAP_BYTES: u64 = 64 * 1024;

/// A sender fills a relay started with a small `--max-store-bytes` until its
/// sends are refused with `StoreFull`; nothing of a refused envelope is
/// stored, the recipient still pulls and acknowledges everything, and once
/// the acknowledgements free the space the refused envelope is accepted.
#[tokio::test]
async fn a_full_store_refuses_sends_until_acks_free_space() {
    let relay = RelayProcess::spawn_temp(&["--send-rate", "0", "--max-store-bytes", CAP])
        .await
        .expect("relay process starts");
    let a = DeviceIdentity::from_seed(1);
    let b = DeviceIdentity::from_seed(2);
    let mut sender = TestDevice::register_new(&a, relay.target()).await.unwrap();
    let mut recipient = TestDevice::register_new(&b, relay.target()).await.unwrap();
    let conv = conversation(1);
    let envelope =
        |seq: u64| make_envelope_sized(a.device(), b.device(), conv, seq, ENVELOPE, seq as u8);
    let fits = CAP_BYTES / stored_cost(ENVELOPE as u64);
    assert!((2..20).contains(&fits));

    // Fill: one envelope per Send until the relay refuses.
    let mut accepted = Vec::new();
    let mut refusal = None;
    for seq in 1..=20u64 {
        let env = envelope(seq);
        let outcome = sender.send_one(env.clone()).await.unwrap();
        match refused(&outcome) {
            Some(error) => {
                refusal = Some((seq, env, error.code));
                break;
            }
            None => accepted.push((stored(&outcome).unwrap().0, env)),
        }
    }
    let (refused_seq, refused_env, code) = refusal.expect("the store never filled up");
    assert_eq!(code, ErrorCode::StoreFull);
    assert_eq!(accepted.len() as u64, fits);
    // Still full for a second try.
    let again = sender.send_one(refused_env.clone()).await.unwrap();
    assert_eq!(refused(&again).map(|e| e.code), Some(ErrorCode::StoreFull));

    // The recipient pulls exactly what was accepted, intact, and nothing of
    // the refused envelope.
    let inbox = recipient.read_inbox(0).await.unwrap();
    assert_eq!(inbox.len(), accepted.len());
    for (got, (seq, env)) in inbox.iter().zip(&accepted) {
        assert_eq!(got.seq, *seq);
        assert_eq!(got.envelope, *env);
    }
    let last = inbox.last().unwrap().seq;
    assert_eq!(recipient.ack(last).await.unwrap(), last);

    // The space is back: the refused envelope (same message id) and more
    // are accepted now.
    let outcome = sender.send_one(refused_env.clone()).await.unwrap();
    assert_eq!(stored(&outcome), Some((last + 1, false)), "{outcome:?}");
    let more = sender.send_one(envelope(refused_seq + 1)).await.unwrap();
    assert_eq!(stored(&more), Some((last + 2, false)), "{more:?}");
    let inbox = recipient.read_inbox(last).await.unwrap();
    assert_eq!(inbox.len(), 2);
    assert_eq!(inbox[0].envelope, refused_env);
}

/// One user registers ten devices (the default cap); the eleventh is
/// refused with `DeviceLimit` and cannot authenticate, while an existing
/// device registering again and another user's device still succeed.
#[tokio::test]
async fn the_eleventh_device_of_a_user_is_refused() {
    let relay = RelayProcess::spawn_temp(&[])
        .await
        .expect("relay process starts");
    let first = DeviceIdentity::from_seed(10);
    let devices: Vec<DeviceIdentity> = std::iter::once(first.clone())
        .chain((1..=10).map(|n| first.another_device(n)))
        .collect();
    assert_eq!(devices.len(), 11);
    for d in &devices[..10] {
        assert_eq!(d.user(), first.user());
        TestDevice::register_new(d, relay.target())
            .await
            .expect("one of the first ten devices registers");
    }
    let eleventh = TestDevice::register_new(&devices[10], relay.target()).await;
    assert_eq!(refusal_code(&eleventh), Some(ErrorCode::DeviceLimit));
    // It was not stored: it cannot log in.
    let login = TestDevice::login(&devices[10], relay.target()).await;
    assert_eq!(refusal_code(&login), Some(ErrorCode::UnknownDevice));
    // Re-registering an existing device with the same keys still works.
    TestDevice::register_new(&devices[3], relay.target())
        .await
        .expect("re-registration of an existing device");
    // Other users are not affected.
    TestDevice::register_new(&DeviceIdentity::from_seed(99), relay.target())
        .await
        .expect("another user's device registers");
}

/// Files the relay with a failing disk may write: past about this size a
/// write fails (`RLIMIT_FSIZE`), as on a disk that filled up under the relay
/// (its `--max-store-bytes` reserves a share of the free space, but another
/// program may take the rest).
const DISK_LIMIT: u64 = 4 * 1024 * 1024;
/// Each send of the tests that fill it: a few dozen reach the limit.
const LARGE_ENVELOPE: usize = 48 * 1024;
/// The limit for the index file's test: it starts at about 1 MiB.
const SMALL_DISK_LIMIT: u64 = 1536 * 1024;
/// The index test's envelope log segments: each file stays below the limit.
const SMALL_SEGMENTS: u64 = 1024 * 1024;
const _: () = assert!(SMALL_SEGMENTS < SMALL_DISK_LIMIT);
/// Longer than the relay needs without traffic before it checkpoints its
/// index (50 ms).
const QUIET: Duration = Duration::from_millis(80);

/// The failing-disk tests' sender and recipient.
fn failing_disk_devices() -> (DeviceIdentity, DeviceIdentity) {
    (DeviceIdentity::from_seed(21), DeviceIdentity::from_seed(22))
}

/// How the failing-disk tests fill the disk.
#[derive(Clone, Copy)]
struct Filling {
    /// Encoded size of each envelope (one per `Send`).
    size: usize,
    /// Most sends before the test gives up.
    bound: u64,
    /// After this many sends, a pause long enough for the relay to see no
    /// traffic and checkpoint its index (`None`: no pauses).
    pause_every: Option<u64>,
}

/// Large envelopes back to back: the envelope log reaches the limit first.
const FILL_THE_LOG: Filling = Filling {
    size: LARGE_ENVELOPE,
    bound: 4 * DISK_LIMIT / LARGE_ENVELOPE as u64,
    pause_every: None,
};

/// The code of a send's refusal, whether it came as a `Refused` outcome or
/// as an error answer.
fn send_refusal(result: &hush_tests::Result<SendOutcome>) -> Option<ErrorCode> {
    match result {
        Ok(outcome) => refused(outcome).map(|e| e.code),
        Err(e) => e.code(),
    }
}

/// Register the two devices, then send envelopes one per `Send` as
/// `filling` says until the relay's store fails a write. Returns the sends
/// it acknowledged (relay seq, envelope) and the refused one, after
/// checking that the refusal is `Internal`.
async fn send_until_a_write_fails(
    relay: &RelayProcess,
    filling: Filling,
) -> (Vec<(u64, Envelope)>, Envelope) {
    let (a, b) = failing_disk_devices();
    let mut sender = TestDevice::register_new(&a, relay.target()).await.unwrap();
    TestDevice::register_new(&b, relay.target())
        .await
        .unwrap()
        .close();
    let mut accepted = Vec::new();
    for seq in 1..=filling.bound {
        if filling.pause_every.is_some_and(|n| seq % n == 0) {
            tokio::time::sleep(QUIET).await;
        }
        let env = make_envelope_sized(
            a.device(),
            b.device(),
            conversation(2),
            seq,
            filling.size,
            seq as u8,
        );
        let result = sender.send_one(env.clone()).await;
        match result.as_ref().ok().and_then(stored) {
            Some((relay_seq, duplicate)) => {
                assert!(!duplicate);
                accepted.push((relay_seq, env));
            }
            None => {
                assert_eq!(
                    send_refusal(&result),
                    Some(ErrorCode::Internal),
                    "{result:?}"
                );
                assert!(!accepted.is_empty(), "the first sends fit below the limit");
                sender.close();
                return (accepted, env);
            }
        }
    }
    panic!("no write failed in {} sends", filling.bound);
}

/// After a restart on a working disk: `/healthz` is ok again, the recipient
/// pulls exactly the acknowledged envelopes, intact and in order, and the
/// refused one is accepted now, after them.
async fn check_recovered(relay: &RelayProcess, accepted: &[(u64, Envelope)], refused: &Envelope) {
    let (a, b) = failing_disk_devices();
    assert_eq!(relay.http_get("/healthz").unwrap(), (200, "ok\n".into()));
    let (_, metrics) = relay.http_get("/metrics").unwrap();
    assert!(metrics.contains("\nhush_store_failed 0\n"), "{metrics}");
    let mut recipient = TestDevice::login(&b, relay.target()).await.unwrap();
    let inbox = recipient.read_inbox(0).await.unwrap();
    assert_eq!(
        inbox.len(),
        accepted.len(),
        "every acknowledged envelope, no other"
    );
    for (got, (seq, env)) in inbox.iter().zip(accepted) {
        assert_eq!(got.seq, *seq);
        assert_eq!(got.envelope, *env);
    }
    let mut sender = TestDevice::login(&a, relay.target()).await.unwrap();
    let outcome = sender.send_one(refused.clone()).await.unwrap();
    let (seq, duplicate) = stored(&outcome).expect("stored after the restart");
    assert!(!duplicate, "the refused send was never stored");
    let last = accepted.last().map_or(0, |(s, _)| *s);
    assert!(seq > last);
    let tail = recipient.read_inbox(last).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].envelope, *refused);
}

/// Fill a relay started under `limit` (and with `args`) as `filling` says
/// until a write fails; then the relay must stop by itself with exit status
/// 3, its log naming the failure (`log_says`), and a restart on a working
/// disk must recover every envelope it acknowledged.
async fn fails_stops_and_recovers(limit: u64, args: &[&str], filling: Filling, log_says: &str) {
    let args: Vec<&str> = ["--send-rate", "0"].iter().chain(args).copied().collect();
    let mut relay = RelayProcess::spawn_temp_with_file_size_limit(&args, limit)
        .await
        .expect("relay process starts");
    let (accepted, refused_env) = send_until_a_write_fails(&relay, filling).await;
    let status = relay
        .wait_exit(PROMPT, "relay exit after its store failed")
        .await
        .unwrap();
    assert_eq!(status.code(), Some(3), "{}", relay.log_tail(20));
    let log = String::from_utf8_lossy(&relay.log_bytes().unwrap()).into_owned();
    assert!(log.contains("stopped because the store failed"), "{log}");
    assert!(log.contains(log_says), "{log}");

    relay.clear_file_size_limit();
    relay.restart().await.unwrap();
    check_recovered(&relay, &accepted, &refused_env).await;
}

/// The relay's envelope log fails a write: the relay refuses that send
/// (nothing it writes can be trusted to be durable any more), stops with
/// exit status 3 so that its supervisor restarts it, and a restart on a
/// working disk recovers every envelope it acknowledged before.
#[tokio::test]
async fn a_failed_log_write_stops_the_relay_and_a_restart_recovers_what_it_acknowledged() {
    fails_stops_and_recovers(DISK_LIMIT, &[], FILL_THE_LOG, "envelope segments failed").await;
}

/// The index file (`hush.redb`) fails a write instead: the envelope log
/// rolls segments smaller than the limit, so only the index can outgrow
/// it, which small envelopes with pauses in which the relay checkpoints
/// its index make it do. redb then refuses every later operation on the
/// file until it is opened again, so the relay stops just the same, and a
/// restart recovers everything it acknowledged.
#[tokio::test]
async fn a_failed_index_write_stops_the_relay_and_a_restart_recovers_what_it_acknowledged() {
    let filling = Filling {
        size: 300,
        bound: 40_000,
        pause_every: Some(50),
    };
    fails_stops_and_recovers(
        SMALL_DISK_LIMIT,
        &["--segment-bytes", &SMALL_SEGMENTS.to_string()],
        filling,
        "the index file failed",
    )
    .await;
}

/// The same failure with `--exit-on-store-failure=false`: the relay stays
/// up, `GET /healthz` answers 503 with the reason and `hush_store_failed`
/// is 1, every later send is refused, and devices still pull what it
/// acknowledged. A restart on a working disk recovers everything.
#[tokio::test]
async fn a_relay_told_not_to_exit_reports_its_failed_store_and_serves_reads() {
    let mut relay = RelayProcess::spawn_temp_with_file_size_limit(
        &["--send-rate", "0", "--exit-on-store-failure=false"],
        DISK_LIMIT,
    )
    .await
    .expect("relay process starts");
    assert_eq!(relay.http_get("/healthz").unwrap(), (200, "ok\n".into()));
    let (accepted, refused_env) = send_until_a_write_fails(&relay, FILL_THE_LOG).await;
    let (a, b) = failing_disk_devices();

    let (status, body) = relay.http_get("/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("restarted"), "{body}");
    let (_, metrics) = relay.http_get("/metrics").unwrap();
    assert!(metrics.contains("\nhush_store_failed 1\n"), "{metrics}");
    let mut later = TestDevice::login(&a, relay.target()).await.unwrap();
    let small = make_envelope_sized(a.device(), b.device(), conversation(2), 10_000, 512, 7);
    let again = later.send_one(small).await;
    assert_eq!(send_refusal(&again), Some(ErrorCode::Internal), "{again:?}");
    later.close();
    let mut recipient = TestDevice::login(&b, relay.target()).await.unwrap();
    let inbox = recipient.read_inbox(0).await.unwrap();
    assert_eq!(inbox.len(), accepted.len());
    assert!(relay.is_running());
    recipient.close();

    relay.clear_file_size_limit();
    relay.restart().await.unwrap();
    check_recovered(&relay, &accepted, &refused_env).await;
}

/// The pinning attack against a running relay: one envelope its recipient
/// never acknowledges sits in a segment whose other envelopes were all
/// acknowledged. The commit writer compacts that segment between sends: its
/// file goes, and the pinned envelope is still pulled intact.
#[tokio::test]
async fn the_writer_reclaims_a_segment_pinned_by_one_unacked_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open_with_segment_size(
        dir.path().join("relay.redb"),
        StoreLimits::default(),
        16 * 1024,
    )
    .unwrap();
    let first_segment = store.segment_dir().join("000001.seg");
    let mut config = Config::default_for(dir.path().join("data"));
    config.send_rate = 0;
    config.http = None;
    let relay = RelayHandle::start_with_store(
        config,
        Arc::new(SystemClock),
        Arc::new(store),
        StartOptions::default(),
    )
    .await
    .expect("in-process relay starts");
    let t = RelayTarget::from_cert_der(relay.quic_addr(), &relay.cert_der());
    let (a, b, c) = (
        DeviceIdentity::from_seed(1),
        DeviceIdentity::from_seed(2),
        DeviceIdentity::from_seed(3),
    );
    let mut sender = TestDevice::register_new(&a, t).await.unwrap();
    let mut reader = TestDevice::register_new(&b, t).await.unwrap();
    let mut offline = TestDevice::register_new(&c, t).await.unwrap();
    let conv = conversation(1);
    // The pinning envelope, then enough for the reader to fill segments.
    let pinned = make_envelope_sized(a.device(), c.device(), conv, 1, 1024, 0xAA);
    assert!(stored(&sender.send_one(pinned.clone()).await.unwrap()).is_some());
    for seq in 1..=40u64 {
        let env = make_envelope_sized(a.device(), b.device(), conv, seq, 1024, seq as u8);
        assert!(stored(&sender.send_one(env).await.unwrap()).is_some());
    }
    let inbox = reader.read_inbox(0).await.unwrap();
    assert_eq!(inbox.len(), 40);
    reader.ack(40).await.unwrap();
    assert!(first_segment.exists(), "segment 1 went without compaction");
    // The next send's commit group is followed by compaction steps.
    let env = make_envelope_sized(a.device(), b.device(), conv, 41, 1024, 41);
    assert!(stored(&sender.send_one(env).await.unwrap()).is_some());
    wait_until(PROMPT, "segment 1 reclaimed", || !first_segment.exists())
        .await
        .unwrap();
    let got = offline.read_inbox(0).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope, pinned);
    relay.shutdown().await.unwrap();
}
