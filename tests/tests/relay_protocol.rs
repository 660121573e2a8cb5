//! The relay's protocol, end to end: a real `hush-relay` process on
//! 127.0.0.1, real QUIC, one fresh relay per test.
//!
//! Covers registration and authentication (and their refusals), sending with
//! per-envelope outcomes, paging with merged acknowledgements, live and
//! early push,
//! deduplication of retries, quotas and size limits, malformed frames,
//! replaced connections, prekeys, device lists and graceful shutdown.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{
    Delivered, DeviceId, ErrorCode, OneTimePrekey, Request, Response, ServerFrame, SignedPrekey,
    auth_challenge_bytes, encode_client_frame,
};
use hush_tests::{
    DeviceIdentity, HarnessError, RelayProcess, TestDevice, conversation, make_envelope,
    make_envelope_sized, refusal_code, refused, stored, wait_until_async,
};
use std::collections::HashSet;
use std::time::Duration;

/// Bound for anything the relay should do promptly.
const PROMPT: Duration = Duration::from_secs(10);

/// A relay with the given extra flags and no send rate limit (tests send
/// hundreds of envelopes on one connection).
async fn relay(extra: &[&str]) -> RelayProcess {
    let mut args = vec!["--send-rate", "0"];
    args.extend_from_slice(extra);
    RelayProcess::spawn_temp(&args)
        .await
        .expect("relay process starts")
}

async fn registered(relay: &RelayProcess, seed: u64) -> (DeviceIdentity, TestDevice) {
    let id = DeviceIdentity::from_seed(seed);
    let dev = TestDevice::register_new(&id, relay.target())
        .await
        .expect("device registers");
    (id, dev)
}

fn seqs(delivered: &[Delivered]) -> Vec<u64> {
    delivered.iter().map(|d| d.seq).collect()
}

#[tokio::test]
async fn register_then_auth_on_a_new_connection() {
    let relay = relay(&[]).await;
    let a = DeviceIdentity::from_seed(1);
    let mut conn = TestDevice::connect(&a, relay.target()).await.unwrap();
    let ok = conn.register().await.unwrap();
    assert_eq!(ok.device, a.device());
    assert_eq!(
        (ok.inbox_head, ok.acked, ok.one_time_prekeys_left),
        (0, 0, 0)
    );
    assert!(ok.relay_time_ms > 0);
    conn.close();

    let mut again = TestDevice::login(&a, relay.target()).await.unwrap();
    assert_eq!(again.auth_ok().unwrap().device, a.device());
    assert!(again.ping().await.unwrap() > 0);
    // Authenticating twice on one connection is refused.
    let twice = again.auth().await;
    assert_eq!(
        refusal_code(&twice),
        Some(ErrorCode::Forbidden),
        "{twice:?}"
    );
    drop(again);

    // Registering the same keys again is idempotent.
    let mut same = TestDevice::connect(&a, relay.target()).await.unwrap();
    same.register()
        .await
        .expect("re-registration with the same keys");
    drop(same);

    // The same device id with other keys is refused.
    let other = DeviceIdentity::from_seed(2);
    let mut impostor = TestDevice::connect(&a, relay.target()).await.unwrap();
    let challenge = impostor.hello().await.unwrap();
    let mut registration = other.registration();
    registration.device = a.device();
    registration.user_signature = other.sign_as_user(&registration.certificate_bytes());
    let signature = other.sign_as_device(&auth_challenge_bytes(&challenge, &a.device()));
    let res = impostor
        .request(Request::Register {
            registration,
            signature,
        })
        .await;
    assert_eq!(
        refusal_code(&res),
        Some(ErrorCode::AlreadyRegistered),
        "{res:?}"
    );
}

#[tokio::test]
async fn registration_with_a_bad_certificate_is_refused() {
    let relay = relay(&[]).await;
    let a = DeviceIdentity::from_seed(3);
    let mut conn = TestDevice::connect(&a, relay.target()).await.unwrap();
    let challenge = conn.hello().await.unwrap();
    let mut registration = a.registration();
    registration.user_signature[0] ^= 1;
    let signature = a.sign_challenge(&challenge);
    let res = conn
        .request(Request::Register {
            registration,
            signature,
        })
        .await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::BadAuth), "{res:?}");
    // Nothing was registered: Auth now finds no such device.
    let mut later = TestDevice::connect(&a, relay.target()).await.unwrap();
    let res = later.auth().await;
    assert_eq!(
        refusal_code(&res),
        Some(ErrorCode::UnknownDevice),
        "{res:?}"
    );
}

#[tokio::test]
async fn pull_pages_with_merged_acks() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 10).await;
    let (b, mut inbox) = registered(&relay, 11).await;
    let conv = conversation(1);
    let sent: Vec<_> = (1..=450)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, format!("m{i}").as_bytes()))
        .collect();
    let mut next_seq = 1;
    for chunk in sent.chunks(32) {
        for o in sender.send(chunk.to_vec()).await.unwrap() {
            assert_eq!(stored(&o), Some((next_seq, false)), "{o:?}");
            next_seq += 1;
        }
    }

    let p1 = inbox.pull(0, 200, 0).await.unwrap();
    assert_eq!(seqs(&p1.envelopes), (1..=200).collect::<Vec<_>>());
    assert_eq!(p1.remaining, 250);
    assert!(p1.truncated.is_none());
    for (d, e) in p1.envelopes.iter().zip(&sent) {
        assert_eq!(&d.envelope, e, "envelope {} changed in transit", d.seq);
    }

    // Page 2 acknowledges page 1.
    let p2 = inbox.pull(200, 200, 200).await.unwrap();
    assert_eq!(seqs(&p2.envelopes), (201..=400).collect::<Vec<_>>());
    assert_eq!(p2.remaining, 50);

    // Page 1 is gone: a pull from 0 starts at 201 (the unacked part).
    let replay = inbox.pull(0, 200, 0).await.unwrap();
    assert_eq!(replay.envelopes.first().map(|d| d.seq), Some(201));
    assert_eq!(replay.envelopes.len(), 200);
    assert_eq!(replay.remaining, 50);

    let p3 = inbox.pull(400, 200, 400).await.unwrap();
    assert_eq!(seqs(&p3.envelopes), (401..=450).collect::<Vec<_>>());
    assert_eq!(p3.remaining, 0);
    for (d, e) in p3.envelopes.iter().zip(&sent[400..]) {
        assert_eq!(&d.envelope, e);
    }

    // Final merged ack: the inbox is empty, the cursor survives reconnects.
    let done = inbox.pull(450, 200, 450).await.unwrap();
    assert!(done.envelopes.is_empty());
    assert_eq!(done.remaining, 0);
    drop(inbox);
    let mut back = TestDevice::login(&b, relay.target()).await.unwrap();
    let ok = back.auth_ok().unwrap().clone();
    assert_eq!((ok.inbox_head, ok.acked), (450, 450));
    assert!(back.read_inbox(0).await.unwrap().is_empty());
}

/// A device catching up one page at a time is served pages the relay read
/// ahead while the previous page was on its way. With a sender adding
/// envelopes all along, and the device once asking for a page it already
/// had, every envelope still arrives exactly once, in order and unchanged,
/// and the relay's metrics show the reads ahead were used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_read_ahead_loses_and_repeats_nothing_while_senders_send() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 40).await;
    let (b, mut inbox) = registered(&relay, 41).await;
    let conv = conversation(4);
    let all: Vec<_> = (1..=1500)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, format!("m{i}").as_bytes()))
        .collect();
    for chunk in all[..1000].chunks(32) {
        sender.send(chunk.to_vec()).await.unwrap();
    }
    // 500 more arrive during the catch-up.
    let later = all[1000..].to_vec();
    let late = tokio::spawn(async move {
        for chunk in later.chunks(25) {
            for o in sender.send(chunk.to_vec()).await.unwrap() {
                assert!(stored(&o).is_some(), "{o:?}");
            }
        }
    });
    let mut late = Some(late);
    let mut got: Vec<Delivered> = Vec::new();
    let mut after = 0;
    let mut asked_again = false;
    while after < 1500 {
        let page = inbox.pull(after, 100, after).await.unwrap();
        if after >= 300 && !asked_again {
            // The device asks for the same page again (as after losing it):
            // not the page read ahead, so the store answers, alike.
            asked_again = true;
            let again = inbox.pull(after, 100, after).await.unwrap();
            assert_eq!(seqs(&again.envelopes), seqs(&page.envelopes));
            assert_eq!(again.envelopes, page.envelopes);
        }
        let Some(last) = page.envelopes.last().map(|d| d.seq) else {
            // Caught up with the late sender: let it finish (pushes meanwhile
            // are left unread; only pages count here).
            if let Some(task) = late.take() {
                task.await.unwrap();
            }
            continue;
        };
        assert_eq!(
            page.envelopes.first().map(|d| d.seq),
            Some(after + 1),
            "a page must start right above {after}"
        );
        after = last;
        got.extend(page.envelopes);
    }
    if let Some(task) = late.take() {
        task.await.unwrap();
    }
    assert_eq!(
        seqs(&got),
        (1..=1500).collect::<Vec<_>>(),
        "each once, in order"
    );
    for (d, sent) in got.iter().zip(&all) {
        assert_eq!(&d.envelope, sent, "envelope {} changed", d.seq);
    }
    let used = hush_tests::cli::metric(&relay, "hush_read_ahead_used_total")
        .unwrap()
        .unwrap_or(0.0);
    assert!(used >= 5.0, "pages served from reads ahead: {used}");
}

/// While a device catches up, the relay holds its merged acks back and
/// deletes up to 1,000 envelopes at once. Nothing acknowledged is lost or
/// redelivered for it: the held ack is applied when the connection ends,
/// and before any request that reads at or below it.
#[tokio::test]
async fn acks_held_during_a_catch_up_apply_before_lower_reads_and_at_the_end() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 50).await;
    let (b, mut inbox) = registered(&relay, 51).await;
    let conv = conversation(5);
    let all: Vec<_> = (1..=1500)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, b"held"))
        .collect();
    for chunk in all.chunks(32) {
        sender.send(chunk.to_vec()).await.unwrap();
    }
    // Pages up to 700; the merged acks reach 600, below the relay's bound.
    let mut after = 0;
    while after < 700 {
        let page = inbox.pull(after, 100, after).await.unwrap();
        after = page.envelopes.last().unwrap().seq;
    }
    assert_eq!(after, 700);
    // The connection ends: its held ack (600) is applied.
    inbox.close();
    drop(inbox);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    wait_until_async(
        PROMPT,
        "the held ack applied at the connection's end",
        || {
            let (target, b, acked) = (relay.target(), b.clone(), acked.clone());
            async move {
                let Ok(dev) = TestDevice::login(&b, target).await else {
                    return false;
                };
                let now = dev.auth_ok().map_or(0, |ok| ok.acked);
                acked.store(now, std::sync::atomic::Ordering::Relaxed);
                dev.close();
                now == 600
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; acked {acked:?}"));

    // A new connection: pages up to 900, acks held at 800. A read from
    // below them (as after a lost page) sees them applied first.
    let mut inbox = TestDevice::login(&b, relay.target()).await.unwrap();
    let mut after = 600;
    while after < 900 {
        let page = inbox.pull(after, 100, after).await.unwrap();
        assert_eq!(page.envelopes.first().unwrap().seq, after + 1);
        after = page.envelopes.last().unwrap().seq;
    }
    let from_start = inbox.pull(0, 100, 0).await.unwrap();
    assert_eq!(
        from_start.envelopes.first().map(|d| d.seq),
        Some(801),
        "acks up to 800 applied before the read"
    );
    // The rest, to the end: everything arrives once, in order.
    let mut got = Vec::new();
    let mut after = 900;
    loop {
        let page = inbox.pull(after, 100, after).await.unwrap();
        let Some(last) = page.envelopes.last().map(|d| d.seq) else {
            break;
        };
        got.extend(seqs(&page.envelopes));
        after = last;
    }
    assert_eq!(got, (901..=1500).collect::<Vec<_>>());
    assert_eq!(inbox.ack(1500).await.unwrap(), 1500);
}

/// A device that stops pulling in the middle of a catch-up, and stays
/// connected, still gets its held ack applied: here the inbox is full, and
/// the sender's envelope is accepted once the held ack freed room, while
/// the device sits idle.
#[tokio::test]
async fn a_held_ack_is_applied_while_the_device_idles_mid_catch_up() {
    let relay = relay(&["--inbox-max-messages", "300"]).await;
    let (a, mut sender) = registered(&relay, 60).await;
    let (b, mut inbox) = registered(&relay, 61).await;
    let conv = conversation(6);
    let all: Vec<_> = (1..=301)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, b"idle"))
        .collect();
    for chunk in all[..300].chunks(32) {
        for o in sender.send(chunk.to_vec()).await.unwrap() {
            assert!(stored(&o).is_some(), "{o:?}");
        }
    }
    let page = inbox.pull(0, 100, 0).await.unwrap();
    assert_eq!(page.remaining, 200);
    // Acknowledges 1..=100 (held: the device is catching up), then idles.
    let page = inbox.pull(100, 100, 100).await.unwrap();
    assert_eq!(page.envelopes.first().map(|d| d.seq), Some(101));
    let last = all[300].clone();
    let sender = tokio::sync::Mutex::new(sender);
    let shared = &sender;
    wait_until_async(PROMPT, "room freed by the held ack", || {
        let last = last.clone();
        async move {
            let o = shared.lock().await.send_one(last).await;
            o.is_ok_and(|o| stored(&o).is_some())
        }
    })
    .await
    .unwrap();
    // Still the same connection, still mid-way: the next page follows on.
    let page = inbox.pull(200, 100, 200).await.unwrap();
    assert_eq!(page.envelopes.first().map(|d| d.seq), Some(201));
    drop(b);
}

/// A device that leaves mid catch-up and reconnects at once, or whose new
/// connection displaces one still open, is told the ack it just sent: the
/// old connection held that ack back (the device was catching up), and
/// the new one waits for it to be applied before answering `AuthOk`. The
/// pages that follow start right after it.
#[tokio::test]
async fn a_reconnecting_device_is_told_the_acks_its_last_connection_sent() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 62).await;
    let (b, mut inbox) = registered(&relay, 63).await;
    let conv = conversation(7);
    let all: Vec<_> = (1..=120)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, b"again"))
        .collect();
    for chunk in all.chunks(30) {
        for o in sender.send(chunk.to_vec()).await.unwrap() {
            assert!(stored(&o).is_some(), "{o:?}");
        }
    }
    let mut acked = 0;
    for round in 0..10u64 {
        // Acknowledge the last page with the next pull (held back: more
        // remains), then reconnect at once.
        let page = inbox.pull(acked, 10, acked).await.unwrap();
        assert_eq!(page.envelopes.first().map(|d| d.seq), Some(acked + 1));
        let last = page.envelopes.last().map(|d| d.seq).unwrap();
        let page = inbox.pull(last, 1, last).await.unwrap();
        assert_eq!(page.envelopes.first().map(|d| d.seq), Some(last + 1));
        acked = last;
        let old = if round % 2 == 0 {
            // The old connection stays open: the new one displaces it.
            Some(inbox)
        } else {
            drop(inbox);
            None
        };
        inbox = TestDevice::login(&b, relay.target()).await.unwrap();
        assert_eq!(
            inbox.auth_ok().map(|ok| ok.acked),
            Some(acked),
            "round {round}: AuthOk reports the ack the last connection sent"
        );
        drop(old);
    }
    let page = inbox.pull(acked, 200, acked).await.unwrap();
    assert_eq!(seqs(&page.envelopes), (acked + 1..=120).collect::<Vec<_>>());
}

#[tokio::test]
async fn acks_are_clamped_to_the_head_and_never_move_back() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 14).await;
    let (b, mut inbox) = registered(&relay, 15).await;
    let conv = conversation(1);
    let first: Vec<_> = (1..=5)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, b"x"))
        .collect();
    sender.send(first).await.unwrap();
    // An ack far beyond the head only covers what exists.
    assert_eq!(inbox.ack(1_000).await.unwrap(), 5);
    assert_eq!(inbox.ack(3).await.unwrap(), 5, "acks never move backwards");
    let later: Vec<_> = (6..=8)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, b"y"))
        .collect();
    sender.send(later.clone()).await.unwrap();
    let page = inbox.pull(5, 200, 0).await.unwrap();
    assert_eq!(
        seqs(&page.envelopes),
        vec![6, 7, 8],
        "later envelopes survive"
    );
    // A cursor beyond the head: nothing, nothing remaining.
    let page = inbox.pull(50, 200, 0).await.unwrap();
    assert!(page.envelopes.is_empty());
    assert_eq!(page.remaining, 0);
    assert_eq!(seqs(&inbox.read_inbox(0).await.unwrap()), vec![6, 7, 8]);
}

#[tokio::test]
async fn limit_is_capped_and_zero_limit_still_progresses() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 12).await;
    let (b, mut inbox) = registered(&relay, 13).await;
    let batch: Vec<_> = (1..=3)
        .map(|i| make_envelope(a.device(), b.device(), conversation(1), i, b"x"))
        .collect();
    sender.send(batch).await.unwrap();
    // A limit above the protocol maximum cannot even be encoded: the codec
    // refuses it before it reaches the wire.
    let frame = hush_protocol::ClientFrame {
        request_id: 1,
        request: Request::Pull {
            after: 0,
            limit: hush_protocol::limits::MAX_PAGE + 1,
            ack: 0,
        },
    };
    assert!(encode_client_frame(&frame).is_err());
    let page = inbox.pull(0, 1, 0).await.unwrap();
    assert_eq!(seqs(&page.envelopes), vec![1]);
    assert_eq!(page.remaining, 2);
    // A zero limit is served as one, so a careless client still progresses.
    let page = inbox.pull(1, 0, 0).await.unwrap();
    assert_eq!(seqs(&page.envelopes), vec![2]);
    assert_eq!(page.remaining, 1);
}

#[tokio::test]
async fn live_push_after_catching_up() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 20).await;
    let (b, mut inbox) = registered(&relay, 21).await;
    let conv = conversation(7);
    // Two waiting before B syncs.
    let early: Vec<_> = (1..=2)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, b"early"))
        .collect();
    sender.send(early).await.unwrap();
    let page = inbox.pull(0, 200, 0).await.unwrap();
    assert_eq!(seqs(&page.envelopes), vec![1, 2]);
    assert_eq!(page.remaining, 0, "caught up: the connection is now live");

    // Sent one by one while B is live: pushed, contiguous after the page.
    let mut live = Vec::new();
    for i in 3..=7 {
        let e = make_envelope(
            a.device(),
            b.device(),
            conv,
            i,
            format!("live {i}").as_bytes(),
        );
        let o = sender.send_one(e.clone()).await.unwrap();
        assert_eq!(stored(&o), Some((i, false)));
        live.push(e);
    }
    let pushed = inbox.collect_pushes(5, PROMPT).await.unwrap();
    assert_eq!(seqs(&pushed), (3..=7).collect::<Vec<_>>());
    for (d, e) in pushed.iter().zip(&live) {
        assert_eq!(&d.envelope, e);
    }

    // Cumulative ack of everything received so far.
    assert_eq!(inbox.ack(7).await.unwrap(), 7);
    let batch: Vec<_> = (8..=10)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, b"batch"))
        .collect();
    sender.send(batch).await.unwrap();
    let pushed = inbox.collect_pushes(3, PROMPT).await.unwrap();
    assert_eq!(seqs(&pushed), vec![8, 9, 10]);
    drop(inbox);

    // Acked state survived; the unacked pushes are still there for a pull.
    let mut back = TestDevice::login(&b, relay.target()).await.unwrap();
    assert_eq!(back.auth_ok().unwrap().acked, 7);
    let rest = back.read_inbox(0).await.unwrap();
    assert_eq!(seqs(&rest), vec![8, 9, 10]);
}

/// A device that asked for early pushes gets every envelope once, in seq
/// order, as `EarlyPush` or `Push`; each `Durable` covers only what it was
/// pushed, and in the end covers everything; acks and a reconnect then work
/// as with plain pushes.
#[tokio::test]
async fn early_pushes_are_contiguous_and_confirmed_durable() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 30).await;
    let (b, mut inbox) = registered(&relay, 31).await;
    assert_eq!(
        inbox.request(Request::EarlyPushes).await.unwrap(),
        Response::EarlyPushes
    );
    assert_eq!(inbox.pull(0, 200, 0).await.unwrap().remaining, 0);
    let conv = conversation(8);
    let sent: Vec<_> = (1..=30u64)
        .map(|i| make_envelope(a.device(), b.device(), conv, i, b"early"))
        .collect();
    for e in &sent {
        assert!(stored(&sender.send_one(e.clone()).await.unwrap()).is_some());
    }
    let mut got: Vec<Delivered> = Vec::new();
    let (mut durable, mut early) = (0u64, 0usize);
    while durable < 30 {
        let pushed = got.last().map_or(0, |d| d.seq);
        match inbox.next_frame(PROMPT).await.unwrap() {
            ServerFrame::EarlyPush { envelopes } => {
                early += envelopes.len();
                got.extend(envelopes);
            }
            ServerFrame::Push { envelopes } => {
                durable = durable.max(envelopes.last().map_or(0, |d| d.seq));
                got.extend(envelopes);
            }
            ServerFrame::Durable { through } => {
                assert!(through <= pushed, "durable {through}, pushed {pushed}");
                assert!(through > durable, "durable {through} again");
                durable = through;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seqs(&got),
        (1..=30).collect::<Vec<_>>(),
        "each once, in order"
    );
    for (d, e) in got.iter().zip(&sent) {
        assert_eq!(&d.envelope, e);
    }
    eprintln!("{early} of 30 envelopes were pushed early");
    assert_eq!(inbox.ack(30).await.unwrap(), 30);
    drop(inbox);
    let mut back = TestDevice::login(&b, relay.target()).await.unwrap();
    assert_eq!(back.auth_ok().unwrap().acked, 30);
    assert!(back.read_inbox(0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_push_under_concurrent_senders_is_contiguous_and_windowed() {
    let relay = relay(&[]).await;
    let (b, mut inbox) = registered(&relay, 22).await;
    assert_eq!(inbox.pull(0, 200, 0).await.unwrap().remaining, 0);
    // Four senders, 400 envelopes each, all at once: more than the relay's
    // push window (unacknowledged envelopes), so pushes only continue as the
    // device acknowledges.
    const WINDOW: u64 = hush_relay::core::DEFAULT_PUSH_WINDOW;
    const { assert!(WINDOW < 1600) };
    let mut tasks = Vec::new();
    for s in 0..4u64 {
        let (a, mut conn) = registered(&relay, 23 + s).await;
        let to = b.device();
        tasks.push(tokio::spawn(async move {
            let conv = conversation(100 + s);
            for chunk in (1..=400u64).collect::<Vec<_>>().chunks(20) {
                let batch = chunk
                    .iter()
                    .map(|&i| make_envelope(a.device(), to, conv, i, b"live"))
                    .collect();
                for o in conn.send(batch).await.unwrap() {
                    assert!(stored(&o).is_some(), "{o:?}");
                }
            }
        }));
    }
    let mut got: Vec<Delivered> = Vec::new();
    let mut acked = 0;
    while got.len() < 1600 {
        let batch = inbox
            .next_push(PROMPT)
            .await
            .unwrap_or_else(|e| panic!("after {} envelopes: {e}", got.len()));
        got.extend(batch);
        // Acknowledge only when the window is full: the relay must stop
        // exactly there and resume on the ack.
        let last = got.last().unwrap().seq;
        assert!(
            last - acked <= WINDOW,
            "pushed past the window: {last} vs acked {acked}"
        );
        if last - acked == WINDOW || got.len() == 1600 {
            acked = inbox.ack(last).await.unwrap();
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        seqs(&got),
        (1..=1600).collect::<Vec<_>>(),
        "contiguous, no duplicates"
    );
    // Per sender, its own order is kept.
    let mut per_sender: std::collections::HashMap<DeviceId, Vec<u64>> = Default::default();
    for d in &got {
        let h = &d.envelope.header;
        per_sender
            .entry(h.sender_device)
            .or_default()
            .push(h.sender_seq);
    }
    for (_, s) in per_sender {
        assert_eq!(s, (1..=400).collect::<Vec<_>>());
    }
    assert_eq!(inbox.ack(1600).await.unwrap(), 1600);
}

#[tokio::test]
async fn retried_send_is_deduplicated() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 30).await;
    let (b, mut inbox) = registered(&relay, 31).await;
    let conv = conversation(2);
    let e = make_envelope(a.device(), b.device(), conv, 1, b"hello");
    let f = make_envelope(a.device(), b.device(), conv, 2, b"again");
    let g = make_envelope(a.device(), b.device(), conv, 3, b"twice in a batch");

    assert_eq!(
        stored(&sender.send_one(e.clone()).await.unwrap()),
        Some((1, false))
    );
    // Retry on the same connection: same seq, flagged duplicate.
    assert_eq!(
        stored(&sender.send_one(e.clone()).await.unwrap()),
        Some((1, true))
    );
    // Retry after a reconnect, batched with a new one.
    drop(sender);
    let mut sender = TestDevice::login(&a, relay.target()).await.unwrap();
    let outcomes = sender.send(vec![e.clone(), f.clone()]).await.unwrap();
    assert_eq!(stored(&outcomes[0]), Some((1, true)));
    assert_eq!(stored(&outcomes[1]), Some((2, false)));
    // The same envelope twice in one batch is stored once.
    let outcomes = sender.send(vec![g.clone(), g.clone()]).await.unwrap();
    assert_eq!(stored(&outcomes[0]), Some((3, false)));
    assert_eq!(stored(&outcomes[1]), Some((3, true)));

    let all = inbox.read_inbox(0).await.unwrap();
    assert_eq!(seqs(&all), vec![1, 2, 3]);
    let ids: Vec<_> = all.iter().map(|d| d.envelope.header.message_id).collect();
    assert_eq!(
        ids,
        vec![
            e.header.message_id,
            f.header.message_id,
            g.header.message_id
        ]
    );
}

#[tokio::test]
async fn message_quota_refuses_per_envelope_and_writes_nothing() {
    let relay = relay(&["--inbox-max-messages", "5"]).await;
    let (a, mut sender) = registered(&relay, 40).await;
    let (b, mut inbox) = registered(&relay, 41).await;
    let batch: Vec<_> = (1..=8)
        .map(|i| make_envelope(a.device(), b.device(), conversation(1), i, b"q"))
        .collect();
    let outcomes = sender.send(batch.clone()).await.unwrap();
    for (i, o) in outcomes.iter().enumerate() {
        if i < 5 {
            assert_eq!(stored(o), Some((i as u64 + 1, false)), "{o:?}");
        } else {
            assert_eq!(refused(o).map(|e| e.code), Some(ErrorCode::Quota), "{o:?}");
        }
    }
    let held = inbox.read_inbox(0).await.unwrap();
    assert_eq!(seqs(&held), vec![1, 2, 3, 4, 5]);

    // Acknowledging two frees two slots; the refused envelopes were never
    // written (no dedup entry), so their retry stores them as new. The relay
    // applies a pull's merged ack after sending the page, so the reply does
    // not mean the slots are free yet: wait until the inbox shows it.
    inbox.pull(2, 200, 2).await.unwrap();
    let inbox = tokio::sync::Mutex::new(inbox);
    let shared = &inbox;
    wait_until_async(
        Duration::from_secs(10),
        "the merged ack applied",
        || async move {
            let held = shared.lock().await.read_inbox(0).await;
            held.is_ok_and(|h| seqs(&h) == vec![3, 4, 5])
        },
    )
    .await
    .unwrap();
    let mut inbox = inbox.into_inner();
    let outcomes = sender.send(batch[5..].to_vec()).await.unwrap();
    assert_eq!(stored(&outcomes[0]), Some((6, false)));
    assert_eq!(stored(&outcomes[1]), Some((7, false)));
    assert_eq!(
        refused(&outcomes[2]).map(|e| e.code),
        Some(ErrorCode::Quota)
    );
    let held = inbox.read_inbox(2).await.unwrap();
    assert_eq!(seqs(&held), vec![3, 4, 5, 6, 7]);
    let ids: Vec<_> = held.iter().map(|d| d.envelope.header.sender_seq).collect();
    assert_eq!(ids, vec![3, 4, 5, 6, 7]);
}

#[tokio::test]
async fn byte_quota_refuses_the_envelope_that_would_overflow() {
    let relay = relay(&["--inbox-max-bytes", "4096", "--max-envelope", "1024"]).await;
    let (a, mut sender) = registered(&relay, 42).await;
    let (b, mut inbox) = registered(&relay, 43).await;
    let batch: Vec<_> = (1..=5)
        .map(|i| make_envelope_sized(a.device(), b.device(), conversation(1), i, 980, 0xaa))
        .collect();
    let outcomes = sender.send(batch).await.unwrap();
    let kinds: Vec<_> = outcomes
        .iter()
        .map(|o| stored(o).map(|(s, _)| s).ok_or(refused(o).map(|e| e.code)))
        .collect();
    assert_eq!(
        kinds,
        vec![Ok(1), Ok(2), Ok(3), Ok(4), Err(Some(ErrorCode::Quota))],
        "4 × 980 bytes fit in 4096, the fifth does not"
    );
    // A small one still fits in the 176 bytes left; a second does not.
    let small = make_envelope(a.device(), b.device(), conversation(1), 5, b"");
    assert!(small.encoded_len() <= 176 && 2 * small.encoded_len() > 176);
    assert_eq!(
        stored(&sender.send_one(small).await.unwrap()),
        Some((5, false))
    );
    let another = make_envelope(a.device(), b.device(), conversation(1), 6, b"");
    let o = sender.send_one(another).await.unwrap();
    assert_eq!(refused(&o).map(|e| e.code), Some(ErrorCode::Quota), "{o:?}");
    assert_eq!(
        seqs(&inbox.read_inbox(0).await.unwrap()),
        vec![1, 2, 3, 4, 5]
    );
}

#[tokio::test]
async fn oversized_and_forged_envelopes_are_refused_alone() {
    let relay = relay(&["--max-envelope", "2048"]).await;
    let (a, mut sender) = registered(&relay, 44).await;
    let (b, mut inbox) = registered(&relay, 45).await;
    let c = DeviceIdentity::from_seed(46);
    let conv = conversation(3);
    let batch = vec![
        make_envelope_sized(a.device(), b.device(), conv, 1, 2048, 1),
        make_envelope_sized(a.device(), b.device(), conv, 2, 2049, 2),
        // Claims to come from another device.
        make_envelope(c.device(), b.device(), conv, 1, b"forged"),
        // To a device that does not exist.
        make_envelope(a.device(), DeviceId([0xee; 16]), conv, 1, b"nobody"),
        make_envelope(a.device(), b.device(), conv, 3, b"fine"),
    ];
    let outcomes = sender.send(batch.clone()).await.unwrap();
    assert_eq!(outcomes.len(), 5);
    assert_eq!(
        stored(&outcomes[0]),
        Some((1, false)),
        "exactly at the limit"
    );
    assert_eq!(
        refused(&outcomes[1]).map(|e| e.code),
        Some(ErrorCode::TooLarge)
    );
    assert_eq!(
        refused(&outcomes[2]).map(|e| e.code),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        refused(&outcomes[3]).map(|e| e.code),
        Some(ErrorCode::UnknownDevice)
    );
    assert_eq!(stored(&outcomes[4]), Some((2, false)));
    let held = inbox.read_inbox(0).await.unwrap();
    assert_eq!(held.len(), 2);
    assert_eq!(held[0].envelope, batch[0]);
    assert_eq!(held[1].envelope, batch[4]);
}

#[tokio::test]
async fn send_rate_limit_is_a_typed_refusal() {
    let relay = RelayProcess::spawn_temp(&["--send-rate", "5"])
        .await
        .unwrap();
    let (a, mut sender) = registered(&relay, 47).await;
    let (b, mut inbox) = registered(&relay, 48).await;
    // The burst admits one full batch (32); a second one right after it
    // exceeds 5/s.
    let batch: Vec<_> = (1..=64)
        .map(|i| make_envelope(a.device(), b.device(), conversation(1), i, b"r"))
        .collect();
    let mut outcomes = sender.send(batch[..32].to_vec()).await.unwrap();
    outcomes.extend(sender.send(batch[32..].to_vec()).await.unwrap());
    let stored_ids: Vec<_> = outcomes
        .iter()
        .zip(&batch)
        .filter(|(o, _)| stored(o).is_some())
        .map(|(_, e)| e.header.message_id)
        .collect();
    let limited: Vec<_> = outcomes
        .iter()
        .filter_map(refused)
        .filter(|e| e.code == ErrorCode::RateLimited)
        .collect();
    assert!(stored_ids.len() >= 32, "the burst admits a full batch");
    assert!(
        limited.len() >= 16,
        "64 at once exceed 5/s: {}",
        limited.len()
    );
    assert_eq!(stored_ids.len() + limited.len(), 64);
    assert!(limited.iter().all(|e| e.retry_after_ms.is_some()));
    let held = inbox.read_inbox(0).await.unwrap();
    let held_ids: Vec<_> = held.iter().map(|d| d.envelope.header.message_id).collect();
    assert_eq!(held_ids, stored_ids, "only admitted envelopes were written");
}

#[tokio::test]
async fn auth_with_the_wrong_key_is_refused() {
    let relay = relay(&[]).await;
    let (a, _a_conn) = registered(&relay, 50).await;
    let (b, _b_conn) = registered(&relay, 51).await;
    drop(_b_conn);
    // Claim to be B, sign with A's device key: reading B's inbox is refused.
    let mut conn = TestDevice::connect(&b, relay.target()).await.unwrap();
    let challenge = conn.hello().await.unwrap();
    let signature = a.sign_as_device(&auth_challenge_bytes(&challenge, &b.device()));
    let res = conn.request(Request::Auth { signature }).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::BadAuth), "{res:?}");
    // A failed Auth ends the connection: no second guess on it.
    conn.closed(PROMPT).await.unwrap();
    // Claiming B with A's signature over A's own id does not work either.
    let mut conn = TestDevice::connect(&b, relay.target()).await.unwrap();
    let challenge = conn.hello().await.unwrap();
    let signature = a.sign_challenge(&challenge);
    let res = conn.request(Request::Auth { signature }).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::BadAuth), "{res:?}");
}

#[tokio::test]
async fn replayed_auth_signature_is_refused_on_another_connection() {
    let relay = relay(&[]).await;
    let (a, first) = registered(&relay, 52).await;
    drop(first);
    let mut one = TestDevice::connect(&a, relay.target()).await.unwrap();
    let mut two = TestDevice::connect(&a, relay.target()).await.unwrap();
    let c1 = one.hello().await.unwrap();
    let c2 = two.hello().await.unwrap();
    assert_ne!(c1, c2, "challenges are fresh per connection");
    let captured = a.sign_challenge(&c1);
    let res = two
        .request(Request::Auth {
            signature: captured,
        })
        .await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::BadAuth), "{res:?}");
    // The signature is good where it belongs.
    one.request(Request::Auth {
        signature: captured,
    })
    .await
    .expect("auth with this connection's challenge");
}

#[tokio::test]
async fn requests_before_auth_are_refused() {
    let relay = relay(&[]).await;
    let (a, first) = registered(&relay, 53).await;
    drop(first);
    let mut conn = TestDevice::connect(&a, relay.target()).await.unwrap();
    assert!(conn.ping().await.unwrap() > 0, "ping needs no auth");
    let env = make_envelope(a.device(), a.device(), conversation(1), 1, b"x");
    for request in [
        Request::Pull {
            after: 0,
            limit: 10,
            ack: 0,
        },
        Request::Send {
            envelopes: vec![env],
        },
        Request::Ack { up_to: 1 },
        Request::FetchPrekeys { device: a.device() },
        Request::FetchDeviceList { user: a.user() },
    ] {
        let res = conn.request(request.clone()).await;
        assert_eq!(
            refusal_code(&res),
            Some(ErrorCode::NotAuthenticated),
            "{request:?} → {res:?}"
        );
    }
    // Auth without Hello, then for a device nobody registered.
    let res = conn.request(Request::Auth { signature: [0; 64] }).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::BadAuth), "{res:?}");
    let stranger = DeviceIdentity::from_seed(54);
    let mut conn = TestDevice::connect(&stranger, relay.target())
        .await
        .unwrap();
    let res = conn.auth().await;
    assert_eq!(
        refusal_code(&res),
        Some(ErrorCode::UnknownDevice),
        "{res:?}"
    );
}

/// Open a connection, write `bytes`, expect an `Error` frame with `code`
/// and then the connection to close.
async fn expect_refused_bytes(relay: &RelayProcess, seed: u64, bytes: Vec<u8>, code: ErrorCode) {
    let id = DeviceIdentity::from_seed(seed);
    let mut conn = TestDevice::connect(&id, relay.target()).await.unwrap();
    conn.raw_write(&bytes).await.unwrap();
    match conn.next_frame(PROMPT).await {
        Ok(ServerFrame::Error { request_id, error }) => {
            assert_eq!(request_id, 0);
            assert_eq!(error.code, code, "{error}");
        }
        other => panic!("expected an {code:?} error frame, got {other:?}"),
    }
    conn.closed(PROMPT)
        .await
        .expect("relay closes a connection that sent a malformed frame");
}

#[tokio::test]
async fn malformed_frames_get_an_error_while_other_connections_keep_working() {
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 60).await;
    let (b, mut inbox) = registered(&relay, 61).await;

    let ping = encode_client_frame(&hush_protocol::ClientFrame {
        request_id: 9,
        request: Request::Ping,
    })
    .unwrap();
    let mut wrong_version = ping.clone();
    wrong_version[4] = 2;
    // Version 1, then bytes that are no request at all.
    let garbage = vec![0, 0, 0, 6, 1, 0xff, 0xff, 0xff, 0xff, 0xff];
    let oversized = vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let empty = vec![0, 0, 0, 0];

    let good = async {
        let mut got = Vec::new();
        for i in 1..=20u64 {
            let e = make_envelope(a.device(), b.device(), conversation(1), i, b"ok");
            assert_eq!(stored(&sender.send_one(e).await.unwrap()), Some((i, false)));
            got.extend(inbox.pull(i - 1, 200, 0).await.unwrap().envelopes);
        }
        got
    };
    let bad = async {
        expect_refused_bytes(&relay, 62, garbage, ErrorCode::BadFrame).await;
        expect_refused_bytes(&relay, 63, oversized, ErrorCode::TooLarge).await;
        expect_refused_bytes(&relay, 64, wrong_version, ErrorCode::UnsupportedVersion).await;
        expect_refused_bytes(&relay, 65, empty, ErrorCode::BadFrame).await;
    };
    let (got, ()) = tokio::join!(good, bad);
    assert_eq!(seqs(&got), (1..=20).collect::<Vec<_>>());
    assert!(sender.ping().await.is_ok(), "the good connection survived");
}

#[tokio::test]
async fn a_second_connection_of_a_device_replaces_the_first() {
    let relay = relay(&[]).await;
    let (a, mut first) = registered(&relay, 70).await;
    let mut second = TestDevice::login(&a, relay.target()).await.unwrap();
    match first.next_frame(PROMPT).await {
        Ok(ServerFrame::Closing { code, .. }) => assert_eq!(code, ErrorCode::Replaced),
        other => panic!("expected Closing{{Replaced}}, got {other:?}"),
    }
    first
        .closed(PROMPT)
        .await
        .expect("replaced connection closes");
    assert!(second.ping().await.is_ok());
    // The newer connection is the one that gets pushes.
    let (c, mut sender) = registered(&relay, 71).await;
    assert_eq!(second.pull(0, 200, 0).await.unwrap().remaining, 0);
    sender
        .send_one(make_envelope(
            c.device(),
            a.device(),
            conversation(1),
            1,
            b"to the new one",
        ))
        .await
        .unwrap();
    assert_eq!(seqs(&second.next_push(PROMPT).await.unwrap()), vec![1]);
}

fn signed_prekey(owner: &DeviceIdentity, id: u32) -> SignedPrekey {
    let public = [id as u8; 32];
    SignedPrekey {
        id,
        public,
        signature: owner.sign_as_device(&public),
    }
}

/// Every fetcher fetches `each` bundles of `target` at the same time as the
/// others; returns the one-time prekeys handed out (None when none was left).
async fn fetch_concurrently(
    fetchers: Vec<TestDevice>,
    target: DeviceId,
    each: usize,
) -> Vec<Option<OneTimePrekey>> {
    let tasks: Vec<_> = fetchers
        .into_iter()
        .map(|mut f| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..each {
                    got.push(f.fetch_prekeys(target).await.unwrap().one_time_prekey);
                }
                got
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_prekeys_are_handed_out_once_each() {
    // Hundreds of fetches of one device: no fetch limits here (they have
    // their own test in relay_hostile).
    let relay = relay(&[
        "--prekey-fetches-per-device-minute",
        "0",
        "--prekey-fetches-per-target-minute",
        "0",
    ])
    .await;
    let (a, mut owner) = registered(&relay, 80).await;
    let (_b, mut fetcher) = registered(&relay, 81).await;
    let (c, _c_conn) = registered(&relay, 82).await;

    let otks: Vec<_> = (1..=3)
        .map(|i| OneTimePrekey {
            id: 100 + i,
            public: [i as u8 + 0x40; 32],
        })
        .collect();
    let spk = signed_prekey(&a, 7);
    assert_eq!(
        owner
            .publish_prekeys(spk.clone(), otks.clone())
            .await
            .unwrap(),
        3
    );

    let mut handed = Vec::new();
    for _ in 0..4 {
        let bundle = fetcher.fetch_prekeys(a.device()).await.unwrap();
        assert_eq!(bundle.device, a.device());
        assert_eq!(bundle.user, a.user());
        assert_eq!(bundle.signing_key, a.signing_public());
        assert_eq!(bundle.agreement_key, a.agreement_public());
        assert_eq!(bundle.signed_prekey, spk);
        handed.push(bundle.one_time_prekey);
    }
    assert_eq!(handed[3], None, "the pool is empty after three");
    let ids: HashSet<_> = handed.iter().flatten().map(|k| k.id).collect();
    assert_eq!(ids, otks.iter().map(|k| k.id).collect::<HashSet<_>>());
    for k in handed.iter().flatten() {
        assert!(otks.contains(k), "handed out a key that was published");
    }

    // The owner sees the count drop to zero, then replenishes.
    drop(owner);
    let mut owner = TestDevice::login(&a, relay.target()).await.unwrap();
    assert_eq!(owner.auth_ok().unwrap().one_time_prekeys_left, 0);
    let more = vec![OneTimePrekey {
        id: 200,
        public: [9; 32],
    }];
    assert_eq!(
        owner
            .publish_prekeys(signed_prekey(&a, 8), more)
            .await
            .unwrap(),
        1
    );
    let bundle = fetcher.fetch_prekeys(a.device()).await.unwrap();
    assert_eq!(bundle.signed_prekey.id, 8, "the signed prekey was replaced");
    assert_eq!(bundle.one_time_prekey.map(|k| k.id), Some(200));

    // Concurrent fetchers never get the same one-time prekey.
    let pool: Vec<_> = (0..20)
        .map(|i| OneTimePrekey {
            id: 300 + i,
            public: [i as u8; 32],
        })
        .collect();
    assert_eq!(
        owner
            .publish_prekeys(signed_prekey(&a, 9), pool)
            .await
            .unwrap(),
        20
    );
    let mut fetchers = Vec::new();
    for seed in 0..4 {
        fetchers.push(registered(&relay, 83 + seed).await.1);
    }
    let fetched = fetch_concurrently(fetchers, a.device(), 6).await;
    let ids: Vec<u32> = fetched.iter().flatten().map(|k| k.id).collect();
    let distinct: HashSet<u32> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 20, "20 keys for 24 fetches");
    assert_eq!(distinct.len(), 20, "each handed out once: {ids:?}");
    assert_eq!(fetched.iter().filter(|k| k.is_none()).count(), 4);

    let res = fetcher.fetch_prekeys(c.device()).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::NoPrekeys), "{res:?}");
    let res = fetcher.fetch_prekeys(DeviceId([0x77; 16])).await;
    assert_eq!(
        refusal_code(&res),
        Some(ErrorCode::UnknownDevice),
        "{res:?}"
    );
}

#[tokio::test]
async fn device_lists_keep_the_newest_signed_version() {
    let relay = relay(&[]).await;
    let (a1, mut phone) = registered(&relay, 90).await;
    let a2 = a1.another_device(91);
    let mut laptop = TestDevice::register_new(&a2, relay.target()).await.unwrap();
    let (_b, mut other_user) = registered(&relay, 92).await;

    let res = other_user.fetch_device_list(a1.user()).await;
    assert_eq!(
        refusal_code(&res),
        Some(ErrorCode::UnknownDevice),
        "{res:?}"
    );

    let v1 = a1.signed_device_list(1, vec![a1.device_entry()]);
    assert_eq!(phone.publish_device_list(v1.clone()).await.unwrap(), 1);
    assert_eq!(other_user.fetch_device_list(a1.user()).await.unwrap(), v1);

    // Same version again, or older: refused, stored list unchanged.
    let res = laptop.publish_device_list(v1.clone()).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::Forbidden), "{res:?}");
    let v0 = a1.signed_device_list(0, vec![]);
    let res = laptop.publish_device_list(v0).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::Forbidden), "{res:?}");

    // A newer version with a bad signature: refused.
    let mut forged = a1.signed_device_list(2, vec![a1.device_entry(), a2.device_entry()]);
    forged.signature[10] ^= 0x20;
    let res = laptop.publish_device_list(forged).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::BadAuth), "{res:?}");
    assert_eq!(other_user.fetch_device_list(a1.user()).await.unwrap(), v1);

    // Another user may not publish this user's list, even correctly signed.
    let v5 = a1.signed_device_list(5, vec![a1.device_entry(), a2.device_entry()]);
    let res = other_user.publish_device_list(v5.clone()).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::Forbidden), "{res:?}");

    // Any device of the user may publish a newer one; versions may skip.
    assert_eq!(laptop.publish_device_list(v5.clone()).await.unwrap(), 5);
    assert_eq!(other_user.fetch_device_list(a1.user()).await.unwrap(), v5);
    let v3 = a1.signed_device_list(3, vec![a1.device_entry()]);
    let res = phone.publish_device_list(v3).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::Forbidden), "{res:?}");
    assert_eq!(phone.fetch_device_list(a1.user()).await.unwrap(), v5);
}

/// Attack: user X publishes a list, signed with X's own user key, naming
/// user A's device (its id and keys are public) without a membership proof
/// by that device for X: with none, with the proof copied from A's list, or
/// with A's device's proof made for another user. The relay refuses each with
/// `BadAuth` and keeps serving X's previous list.
#[tokio::test]
async fn a_list_naming_another_users_device_is_refused() {
    let relay = relay(&[]).await;
    let (a, mut a_conn) = registered(&relay, 95).await;
    let (x, mut x_conn) = registered(&relay, 96).await;
    let a_list = a.signed_device_list(1, vec![a.device_entry()]);
    assert_eq!(a_conn.publish_device_list(a_list).await.unwrap(), 1);
    let x_list = x.signed_device_list(1, vec![x.device_entry()]);
    assert_eq!(x_conn.publish_device_list(x_list.clone()).await.unwrap(), 1);

    let mut unproven = a.device_entry();
    unproven.membership_signature = [0; 64];
    let wrong_user = a.device_entry_for(&DeviceIdentity::from_seed(97).user());
    for (what, stolen) in [
        ("no proof", unproven),
        ("proof copied from A's list", a.device_entry()),
        ("A's device's proof for a third user", wrong_user),
    ] {
        let forged = x.signed_device_list(2, vec![x.device_entry(), stolen]);
        let res = x_conn.publish_device_list(forged).await;
        assert_eq!(
            refusal_code(&res),
            Some(ErrorCode::BadAuth),
            "{what}: {res:?}"
        );
        assert_eq!(
            x_conn.fetch_device_list(x.user()).await.unwrap(),
            x_list,
            "{what}"
        );
    }
}

#[tokio::test]
async fn graceful_shutdown_tells_connections_and_keeps_data() {
    let mut relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 100).await;
    let (b, mut inbox) = registered(&relay, 101).await;
    let batch: Vec<_> = (1..=10)
        .map(|i| make_envelope(a.device(), b.device(), conversation(1), i, b"kept"))
        .collect();
    sender.send(batch.clone()).await.unwrap();
    inbox.pull(0, 3, 0).await.unwrap();
    inbox.ack(3).await.unwrap();

    let status = relay.terminate().await.expect("relay stops on SIGTERM");
    assert!(status.success(), "clean exit: {status}");
    match sender.next_frame(PROMPT).await {
        Ok(ServerFrame::Closing { code, .. }) => assert_eq!(code, ErrorCode::ShuttingDown),
        other => panic!("expected Closing{{ShuttingDown}}, got {other:?}"),
    }

    relay.restart().await.unwrap();
    let mut back = TestDevice::login(&b, relay.target()).await.unwrap();
    let ok = back.auth_ok().unwrap().clone();
    assert_eq!((ok.inbox_head, ok.acked), (10, 3));
    let rest = back.read_inbox(0).await.unwrap();
    assert_eq!(seqs(&rest), (4..=10).collect::<Vec<_>>());
    for (d, e) in rest.iter().zip(&batch[3..]) {
        assert_eq!(&d.envelope, e);
    }
}

#[tokio::test]
async fn http_reports_the_certificate_hash_the_client_pinned() {
    let relay = relay(&[]).await;
    let (status, body) = relay.http_get("/certificate.sha256").expect("http request");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&hex::encode(relay.cert_sha256())),
        "body {body:?} names the pinned hash"
    );
    // A client pinned to another certificate refuses the relay.
    let a = DeviceIdentity::from_seed(110);
    let mut wrong = relay.target();
    wrong.cert_sha256[0] ^= 1;
    let res = TestDevice::connect(&a, wrong).await;
    assert!(matches!(res, Err(HarnessError::Connect(_))), "{res:?}");
}

#[tokio::test]
async fn settings_also_come_from_the_environment() {
    let relay = RelayProcess::spawn_temp_with_env(
        &["--send-rate", "0"],
        &[("HUSH_INBOX_MAX_MESSAGES", "2")],
    )
    .await
    .unwrap();
    let (a, mut sender) = registered(&relay, 120).await;
    let (b, _inbox) = registered(&relay, 121).await;
    let batch: Vec<_> = (1..=3)
        .map(|i| make_envelope(a.device(), b.device(), conversation(1), i, b"e"))
        .collect();
    let outcomes = sender.send(batch).await.unwrap();
    assert_eq!(stored(&outcomes[1]), Some((2, false)));
    assert_eq!(
        refused(&outcomes[2]).map(|e| e.code),
        Some(ErrorCode::Quota)
    );
}

/// A removed device's open connection is cut at once: when the relay
/// accepts a list that drops it, the device's live connection gets
/// `Closing{DeviceRemoved}` and is closed (it does not keep pulling or
/// sending until it happens to reconnect), and a new connection is refused
/// with `DeviceRemoved`.
#[tokio::test]
async fn a_removed_devices_open_connection_is_closed_with_device_removed() {
    let relay = relay(&[]).await;
    let (a1, mut phone) = registered(&relay, 95).await;
    let a2 = a1.another_device(96);
    let mut laptop = TestDevice::register_new(&a2, relay.target()).await.unwrap();
    let both = a1.signed_device_list(1, vec![a1.device_entry(), a2.device_entry()]);
    assert_eq!(phone.publish_device_list(both).await.unwrap(), 1);
    assert!(laptop.ping().await.is_ok());

    let without = a1.signed_device_list(2, vec![a1.device_entry()]);
    assert_eq!(phone.publish_device_list(without).await.unwrap(), 2);
    match laptop.next_frame(PROMPT).await {
        Ok(ServerFrame::Closing { code, .. }) => assert_eq!(code, ErrorCode::DeviceRemoved),
        other => panic!("expected Closing{{DeviceRemoved}}, got {other:?}"),
    }
    laptop
        .closed(PROMPT)
        .await
        .expect("the removed device's connection closes");
    // The publisher's connection is untouched.
    assert!(phone.ping().await.is_ok());
    let again = TestDevice::login(&a2, relay.target()).await;
    assert_eq!(
        refusal_code(&again),
        Some(ErrorCode::DeviceRemoved),
        "{again:?}"
    );
}

/// Datagrams larger than Ethernet's carry several envelopes where the path
/// allows (here loopback): the relay receives and advertises up to
/// `MAX_UDP_PAYLOAD`, both ends discover it, and a page then arrives in
/// datagrams of more than one Ethernet payload each, intact.
#[tokio::test]
async fn loopback_carries_datagrams_larger_than_ethernet() {
    // What one Ethernet frame carries over IPv4 (quinn's default largest payload).
    const ETHERNET_PAYLOAD: u16 = 1472;
    let relay = relay(&[]).await;
    let (a, mut sender) = registered(&relay, 40).await;
    let (b, mut inbox) = registered(&relay, 41).await;

    // The client's discovery can only pass 1,472 if the relay takes it.
    wait_until_async(PROMPT, "the client's path MTU grows", || {
        let mtu = inbox.connection().stats().path.current_mtu;
        async move { mtu > ETHERNET_PAYLOAD }
    })
    .await
    .unwrap();

    let conv = conversation(4);
    let sent: Vec<_> = (1..=64)
        .map(|i| make_envelope_sized(a.device(), b.device(), conv, i, 1024, i as u8))
        .collect();
    for chunk in sent.chunks(32) {
        for o in sender.send(chunk.to_vec()).await.unwrap() {
            assert!(stored(&o).is_some(), "{o:?}");
        }
    }
    // The relay's discovery towards the client runs beside the client's:
    // pull the same page (nothing acknowledged) until it comes in large
    // datagrams, a bounded number of times.
    let mut averages = Vec::new();
    for _ in 0..200 {
        let before = inbox.connection().stats().udp_rx;
        let page = inbox.pull(0, 64, 0).await.unwrap();
        assert_eq!(page.envelopes.len(), sent.len());
        for (d, e) in page.envelopes.iter().zip(&sent) {
            assert_eq!(&d.envelope, e, "envelope {} changed in transit", d.seq);
        }
        let after = inbox.connection().stats().udp_rx;
        let datagrams = (after.datagrams - before.datagrams).max(1);
        averages.push((after.bytes - before.bytes) / datagrams);
        if averages
            .last()
            .is_some_and(|&a| a > u64::from(ETHERNET_PAYLOAD))
        {
            return;
        }
    }
    panic!("pages still came in small datagrams (average bytes per pull: {averages:?})");
}
