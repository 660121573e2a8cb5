//! Retention with an injected clock: an in-process relay whose time only
//! moves when the test says so. Envelopes that expire unread leave
//! tombstones, and the next pull from an old cursor reports exactly which
//! sender-seq ranges of which (sender, conversation) were dropped, so the
//! recipient can ask those senders to resend.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{ConversationId, DeviceId, DroppedRange};
use hush_relay::{Config, ManualClock, RelayHandle};
use hush_tests::{DeviceIdentity, RelayTarget, TestDevice, conversation, make_envelope, stored};
use std::sync::Arc;
use std::time::Duration;

const RETENTION: Duration = Duration::from_secs(2);
const START_MS: u64 = 1_700_000_000_000;

async fn start(dir: &std::path::Path, clock: &ManualClock) -> RelayHandle {
    let mut config = Config::default_for(dir.to_path_buf());
    config.retention = RETENTION;
    config.send_rate = 0;
    config.http = None;
    // Only explicit purge_now() passes: the test decides when time has passed.
    config.purge_interval = Duration::from_secs(3600);
    RelayHandle::start(config, Arc::new(clock.clone()))
        .await
        .expect("in-process relay starts")
}

fn target(relay: &RelayHandle) -> RelayTarget {
    RelayTarget::from_cert_der(relay.quic_addr(), &relay.cert_der())
}

/// Ranges as sortable tuples (the order of ranges in a page is not part of
/// the contract).
fn sorted(ranges: &[DroppedRange]) -> Vec<(DeviceId, ConversationId, u64, u64)> {
    let mut v: Vec<_> = ranges
        .iter()
        .map(|r| (r.sender, r.conversation, r.first_seq, r.last_seq))
        .collect();
    v.sort();
    v
}

fn range(sender: DeviceId, conversation: ConversationId, first: u64, last: u64) -> DroppedRange {
    DroppedRange {
        sender,
        conversation,
        first_seq: first,
        last_seq: last,
    }
}

#[tokio::test]
async fn expired_envelopes_are_reported_as_dropped_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let relay = start(dir.path(), &clock).await;
    let t = target(&relay);

    let a = DeviceIdentity::from_seed(1);
    let b = DeviceIdentity::from_seed(2);
    let c = DeviceIdentity::from_seed(3);
    let mut a_conn = TestDevice::register_new(&a, t).await.unwrap();
    let mut b_conn = TestDevice::register_new(&b, t).await.unwrap();
    let mut c_conn = TestDevice::register_new(&c, t).await.unwrap();
    let (x, y, z) = (conversation(10), conversation(20), conversation(30));

    // Relay seqs: A/x 1..=5 → 1..=5, C/y 1..=3 → 6..=8, A/z 1..=2 → 9..=10.
    let ax: Vec<_> = (1..=5)
        .map(|i| make_envelope(a.device(), b.device(), x, i, b"ax"))
        .collect();
    let cy: Vec<_> = (1..=3)
        .map(|i| make_envelope(c.device(), b.device(), y, i, b"cy"))
        .collect();
    let az: Vec<_> = (1..=2)
        .map(|i| make_envelope(a.device(), b.device(), z, i, b"az"))
        .collect();
    a_conn.send(ax).await.unwrap();
    c_conn.send(cy).await.unwrap();
    let outcomes = a_conn.send(az).await.unwrap();
    assert_eq!(stored(&outcomes[1]), Some((10, false)));

    // B reads and acknowledges the first two, then goes away.
    let page = b_conn.pull(0, 2, 0).await.unwrap();
    assert_eq!(page.envelopes.len(), 2);
    assert_eq!(b_conn.ack(2).await.unwrap(), 2);

    // Nothing expires before its time.
    clock.advance(RETENTION.as_millis() as u64 - 1);
    assert_eq!(relay.purge_now().await.unwrap(), 0);
    let page = b_conn.pull(2, 200, 0).await.unwrap();
    assert!(page.truncated.is_none());
    assert_eq!(page.envelopes.len(), 8);
    drop(b_conn);

    // Past retention: the eight unread ones expire; two sent afterwards do not.
    clock.advance(1_001);
    let fresh: Vec<_> = (6..=7)
        .map(|i| make_envelope(a.device(), b.device(), x, i, b"new"))
        .collect();
    let outcomes = a_conn.send(fresh.clone()).await.unwrap();
    assert_eq!(stored(&outcomes[0]), Some((11, false)));
    assert_eq!(relay.purge_now().await.unwrap(), 8);
    assert_eq!(
        relay
            .metrics()
            .expired_total
            .load(std::sync::atomic::Ordering::Relaxed),
        8
    );

    let mut b_conn = TestDevice::login(&b, t).await.unwrap();
    let expected = sorted(&[
        range(a.device(), x, 3, 5),
        range(c.device(), y, 1, 3),
        range(a.device(), z, 1, 2),
    ]);
    // Reported on every pull from the old cursor until acknowledged past.
    for _ in 0..2 {
        let page = b_conn.pull(2, 200, 0).await.unwrap();
        let truncation = page
            .truncated
            .expect("pull from an expired cursor is flagged");
        assert_eq!(truncation.dropped_count, 8);
        assert_eq!(truncation.oldest_retained, 11);
        assert_eq!(
            sorted(&truncation.dropped),
            expected,
            "one range per (sender, conversation)"
        );
        let seqs: Vec<_> = page.envelopes.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, vec![11, 12]);
        assert_eq!(page.envelopes[0].envelope, fresh[0]);
    }

    // Acknowledging past the hole clears it; the fresh envelopes remain.
    let page = b_conn.pull(10, 200, 10).await.unwrap();
    assert!(page.truncated.is_none(), "{:?}", page.truncated);
    let seqs: Vec<_> = page.envelopes.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, vec![11, 12]);
    let page = b_conn.pull(12, 200, 12).await.unwrap();
    assert!(page.envelopes.is_empty() && page.truncated.is_none());
    drop(b_conn);
    let mut b_conn = TestDevice::login(&b, t).await.unwrap();
    assert_eq!(b_conn.auth_ok().unwrap().acked, 12);
    let page = b_conn.pull(0, 200, 0).await.unwrap();
    assert!(page.envelopes.is_empty() && page.truncated.is_none());

    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_expired_message_id_can_be_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let relay = start(dir.path(), &clock).await;
    let t = target(&relay);
    let a = DeviceIdentity::from_seed(4);
    let b = DeviceIdentity::from_seed(5);
    let mut a_conn = TestDevice::register_new(&a, t).await.unwrap();
    TestDevice::register_new(&b, t).await.unwrap().close();

    let e = make_envelope(a.device(), b.device(), conversation(1), 1, b"resend me");
    assert_eq!(
        stored(&a_conn.send_one(e.clone()).await.unwrap()),
        Some((1, false))
    );
    assert_eq!(
        stored(&a_conn.send_one(e.clone()).await.unwrap()),
        Some((1, true))
    );
    clock.advance(RETENTION.as_millis() as u64 + 1);
    assert_eq!(relay.purge_now().await.unwrap(), 1);
    // The recipient asked for a resend; the sender re-sends the same id. It is
    // stored anew (the dedup entry expired with the envelope), not reported
    // as a duplicate of something that no longer exists.
    assert_eq!(
        stored(&a_conn.send_one(e.clone()).await.unwrap()),
        Some((2, false))
    );
    let mut b_conn = TestDevice::login(&b, t).await.unwrap();
    let page = b_conn.pull(0, 200, 0).await.unwrap();
    let t = page.truncated.expect("seq 1 expired unread");
    assert_eq!(t.dropped, vec![range(a.device(), conversation(1), 1, 1)]);
    assert_eq!(page.envelopes.len(), 1);
    assert_eq!(page.envelopes[0].envelope, e);
    relay.shutdown().await.unwrap();
}

const RETENTION_IMPORTANT: Duration = Duration::from_secs(10);

/// The important retention class: an envelope whose header carries the
/// important flag is kept until `--retention-important`; a normal one sent
/// before it expires at `--retention` as usual, and a normal one queued
/// behind an unread important one waits for it (purges remove prefixes).
#[tokio::test]
async fn an_important_envelope_outlives_the_normal_retention() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut config = Config::default_for(dir.path().to_path_buf());
    config.retention = RETENTION;
    config.retention_important = RETENTION_IMPORTANT;
    config.send_rate = 0;
    config.http = None;
    config.purge_interval = Duration::from_secs(3600);
    let relay = RelayHandle::start(config, Arc::new(clock.clone()))
        .await
        .expect("in-process relay starts");
    let t = target(&relay);
    let a = DeviceIdentity::from_seed(6);
    let b = DeviceIdentity::from_seed(7);
    let mut a_conn = TestDevice::register_new(&a, t).await.unwrap();
    TestDevice::register_new(&b, t).await.unwrap().close();
    let x = conversation(1);

    // Seq 1 normal, seq 2 important, seq 3 normal (queued behind seq 2).
    let normal = make_envelope(a.device(), b.device(), x, 1, b"normal");
    let mut important = make_envelope(a.device(), b.device(), x, 2, b"important");
    important.header.important = true;
    let behind = make_envelope(a.device(), b.device(), x, 3, b"behind");
    a_conn
        .send(vec![normal, important.clone(), behind.clone()])
        .await
        .unwrap();

    // Past the normal retention: only the normal envelope in front goes.
    clock.advance(RETENTION.as_millis() as u64 + 1);
    assert_eq!(relay.purge_now().await.unwrap(), 1);
    let mut b_conn = TestDevice::login(&b, t).await.unwrap();
    let page = b_conn.pull(0, 200, 0).await.unwrap();
    let tr = page.truncated.expect("the normal envelope expired unread");
    assert_eq!(tr.dropped, vec![range(a.device(), x, 1, 1)]);
    let seqs: Vec<_> = page.envelopes.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, vec![2, 3], "the important envelope survived");
    assert_eq!(page.envelopes[0].envelope, important);
    assert!(page.envelopes[0].envelope.header.important);
    assert_eq!(page.envelopes[1].envelope, behind);
    drop(b_conn);

    // Past the important retention both remaining envelopes go together.
    clock.advance(RETENTION_IMPORTANT.as_millis() as u64);
    assert_eq!(relay.purge_now().await.unwrap(), 2);
    let mut b_conn = TestDevice::login(&b, t).await.unwrap();
    let page = b_conn.pull(0, 200, 0).await.unwrap();
    assert!(page.envelopes.is_empty());
    assert_eq!(
        page.truncated.unwrap().dropped,
        vec![range(a.device(), x, 1, 3)]
    );
    relay.shutdown().await.unwrap();
}
