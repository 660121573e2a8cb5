//! The relay's edges under attack, end to end: a real `hush-relay` process
//! on 127.0.0.1, real QUIC and TCP, one fresh relay per test.
//!
//! - a flood of unauthenticated connections declaring huge frames does not
//!   grow the relay's memory beyond a bound, and authenticated devices keep
//!   sending and pulling meanwhile;
//! - a failed `Register` or `Auth` ends its connection;
//! - registrations from one address are limited per hour;
//! - idle and trickling HTTP connections do not starve the HTTP listener;
//! - a stranger draining a device's one-time prekeys is rate-limited, and
//!   the owner is told (`PrekeysLow`) so it can refill.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::limits::MAX_FRAME_LEN;
use hush_protocol::{
    ALPN_HUSH, ErrorCode, FrameBuffer, OneTimePrekey, Request, ServerFrame, SignedPrekey,
};
use hush_tests::{
    DeviceIdentity, RelayProcess, TestDevice, conversation, make_envelope, refusal_code, stored,
    wait_until_async, within,
};
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Bound for anything the relay should do promptly.
const PROMPT: Duration = Duration::from_secs(10);

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

/// A memory figure of the relay process from `/proc/PID/status`, bytes:
/// `VmRSS` (resident now) or `VmHWM` (the resident peak so far).
fn proc_mem(relay: &RelayProcess, field: &str) -> u64 {
    let pid = relay.pid().expect("relay is running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// A counter of the relay's `/metrics`, summed over its label sets.
fn metric(relay: &RelayProcess, name: &str) -> u64 {
    let (status, body) = relay.http_get("/metrics").unwrap();
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// How one flood connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloodEnd {
    /// Refused before or during the handshake.
    Refused,
    /// Admitted, then refused with `TooLarge` and closed.
    TooLarge,
    /// Anything else (the relay closed without a frame, a timeout…).
    Other,
}

/// One unauthenticated connection that declares a maximal frame and sends
/// as much of its body as the relay lets it, then waits for the verdict.
/// The connection is returned (kept open) so that the relay's memory is
/// measured with every flood connection still in place.
async fn flood_one(
    endpoint: quinn::Endpoint,
    target: hush_tests::RelayTarget,
) -> (FloodEnd, Option<quinn::Connection>) {
    let Ok(connecting) = endpoint.connect(target.addr, "localhost") else {
        return (FloodEnd::Refused, None);
    };
    let conn = match tokio::time::timeout(PROMPT, connecting).await {
        Ok(Ok(c)) => c,
        _ => return (FloodEnd::Refused, None),
    };
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(PROMPT, conn.open_bi()).await else {
        return (FloodEnd::Other, Some(conn));
    };
    let mut frame = (MAX_FRAME_LEN as u32).to_be_bytes().to_vec();
    frame.push(1);
    frame.extend(std::iter::repeat_n(0xAB, 256 * 1024));
    // Flow control may stall the write (the relay reads no more once it
    // has refused the frame): read the verdict meanwhile.
    let write = async {
        let _ = tokio::time::timeout(Duration::from_secs(2), send.write_all(&frame)).await;
    };
    let mut frames = FrameBuffer::new();
    let mut chunk = vec![0u8; 4096];
    let read = tokio::time::timeout(PROMPT, async {
        loop {
            match recv.read(&mut chunk).await {
                Ok(Some(n)) => {
                    frames.extend(&chunk[..n]);
                    if let Ok(Some(f)) = frames.next_server_frame() {
                        return f;
                    }
                }
                _ => return ServerFrame::closing(ErrorCode::Internal, "no frame"),
            }
        }
    });
    let ((), verdict) = tokio::join!(write, read);
    let end = match verdict {
        Ok(ServerFrame::Error { error, .. }) if error.code == ErrorCode::TooLarge => {
            FloodEnd::TooLarge
        }
        _ => FloodEnd::Other,
    };
    (end, Some(conn))
}

/// 2,000 unauthenticated connections (100 at a time), each declaring a
/// 4 MiB frame and pushing 256 KiB of it: the relay refuses what is over
/// its per-address bound (50 here) before any handshake, answers the rest `TooLarge` as soon as the
/// length prefix arrives and closes them, keeps its resident memory within
/// 64 MiB of where it started, and serves authenticated devices throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preauth_flood_keeps_memory_bounded_and_devices_served() {
    const FLOOD: usize = 2000;
    const IN_FLIGHT: usize = 100;
    const RSS_BOUND: u64 = 64 * 1024 * 1024;
    let relay = relay(&["--max-connections-per-ip", "50"]).await;
    let (a, mut alice) = registered(&relay, 1).await;
    let (b, mut bob) = registered(&relay, 2).await;
    let env = make_envelope(a.device(), b.device(), conversation(1), 1, b"before");
    assert!(stored(&alice.send_one(env).await.unwrap()).is_some());
    assert_eq!(bob.pull(0, 200, 0).await.unwrap().envelopes.len(), 1);
    let before = proc_mem(&relay, "VmRSS");

    let config = hush_tests::tls::client_config(
        relay.target().cert_sha256,
        ALPN_HUSH,
        Duration::from_secs(30),
    )
    .unwrap();
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
    endpoint.set_default_client_config(config);
    let flooding = Arc::new(AtomicBool::new(true));
    let target = relay.target();
    let flood = tokio::spawn({
        let endpoint = endpoint.clone();
        let flooding = Arc::clone(&flooding);
        async move {
            let mut ends = Vec::with_capacity(FLOOD);
            let mut held = Vec::with_capacity(FLOOD);
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..FLOOD {
                if tasks.len() >= IN_FLIGHT
                    && let Some(done) = tasks.join_next().await
                {
                    let (end, conn) = done.unwrap();
                    ends.push(end);
                    held.extend(conn);
                }
                tasks.spawn(flood_one(endpoint.clone(), target));
            }
            while let Some(done) = tasks.join_next().await {
                let (end, conn) = done.unwrap();
                ends.push(end);
                held.extend(conn);
            }
            flooding.store(false, Ordering::SeqCst);
            (ends, held)
        }
    });

    // Meanwhile the authenticated devices keep working.
    let mut seq = 1;
    while flooding.load(Ordering::SeqCst) || seq < 3 {
        seq += 1;
        let env = make_envelope(a.device(), b.device(), conversation(1), seq, b"during");
        let outcome = within(PROMPT, "a send during the flood", alice.send_one(env))
            .await
            .unwrap()
            .unwrap();
        assert!(stored(&outcome).is_some(), "{outcome:?}");
        // Acknowledging what came before, Bob gets exactly the new one.
        let page = within(
            PROMPT,
            "a pull during the flood",
            bob.pull(seq - 1, 200, seq - 1),
        )
        .await
        .unwrap()
        .unwrap();
        let seqs: Vec<u64> = page.envelopes.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, vec![seq], "the envelope just sent is there");
    }
    let (ends, held) = within(Duration::from_secs(60), "the flood", flood)
        .await
        .unwrap()
        .unwrap();
    let peak = proc_mem(&relay, "VmHWM");
    let count = |e: FloodEnd| ends.iter().filter(|x| **x == e).count();
    let (refused, too_large, other) = (
        count(FloodEnd::Refused),
        count(FloodEnd::TooLarge),
        count(FloodEnd::Other),
    );
    eprintln!(
        "flood: {refused} refused, {too_large} TooLarge, {other} other; relay RSS {} MiB before, peak {} MiB; {seq} sends and pulls meanwhile",
        before >> 20,
        peak >> 20
    );
    assert_eq!(ends.len(), FLOOD);
    assert!(
        too_large > 0,
        "admitted flood connections are refused TooLarge"
    );
    assert!(
        refused > 0,
        "connections over the per-address bound are refused"
    );
    assert_eq!(
        other, 0,
        "every flood connection is refused or told TooLarge"
    );
    assert!(
        peak.saturating_sub(before) <= RSS_BOUND,
        "relay RSS peaked {} MiB above where it started (bound {} MiB)",
        peak.saturating_sub(before) >> 20,
        RSS_BOUND >> 20
    );
    // Every refusal a flood client saw is counted, once per connection
    // attempt however often its Initial packet was retransmitted (under load
    // a refusal can take longer than the client's retransmission timer). The
    // count is higher only where a refusal packet was lost (the flood's own
    // traffic fills the client socket's buffer) and the retransmitted Initial
    // was then admitted: 2-4 % of refusals here, loaded host or not.
    let counted = metric(&relay, "hush_connections_refused_total") as usize;
    assert!(
        counted >= refused && counted <= refused + refused / 10 + 5,
        "{counted} refusals counted for {refused} refused clients"
    );
    assert_eq!(
        metric(&relay, "hush_preauth_oversize_total") as usize,
        too_large
    );
    drop(held);
    endpoint.close(0u32.into(), b"done");
    // And still after it.
    let env = make_envelope(a.device(), b.device(), conversation(1), seq + 1, b"after");
    assert!(stored(&alice.send_one(env).await.unwrap()).is_some());
}

/// A failed `Register` and a failed `Auth` each close their connection:
/// one attempt per handshake.
#[tokio::test]
async fn failed_register_or_auth_closes_the_connection() {
    let relay = relay(&[]).await;
    let a = DeviceIdentity::from_seed(10);
    let mut conn = TestDevice::connect(&a, relay.target()).await.unwrap();
    let challenge = conn.hello().await.unwrap();
    let mut registration = a.registration();
    registration.user_signature[0] ^= 1;
    let res = conn
        .request(Request::Register {
            registration,
            signature: a.sign_challenge(&challenge),
        })
        .await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::BadAuth), "{res:?}");
    conn.closed(PROMPT).await.unwrap();

    let mut conn = TestDevice::connect(&a, relay.target()).await.unwrap();
    let res = conn.auth().await;
    assert_eq!(
        refusal_code(&res),
        Some(ErrorCode::UnknownDevice),
        "{res:?}"
    );
    conn.closed(PROMPT).await.unwrap();

    // A good registration still works, and so does its Auth.
    let (a, _) = registered(&relay, 10).await;
    let mut conn = TestDevice::connect(&a, relay.target()).await.unwrap();
    conn.auth().await.unwrap();
}

/// 500 registrations from one address: the first 20 (the hourly limit)
/// succeed, every other one is refused `RegistrationLimit` with a
/// `retry_after_ms`, and registered devices still authenticate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_per_address_are_limited() {
    const ATTEMPTS: u64 = 500;
    const LIMIT: usize = 20;
    let relay = relay(&["--max-registrations-per-ip-hour", "20"]).await;
    let target = relay.target();
    let ok = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8u64 {
        let (ok, limited) = (Arc::clone(&ok), Arc::clone(&limited));
        tasks.spawn(async move {
            for i in (worker..ATTEMPTS).step_by(8) {
                let id = DeviceIdentity::from_seed(1000 + i);
                let mut conn = TestDevice::connect(&id, target).await.unwrap();
                match conn.register().await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        conn.close();
                    }
                    Err(hush_tests::HarnessError::Refused(e)) => {
                        assert_eq!(e.code, ErrorCode::RegistrationLimit, "{e:?}");
                        let wait = e.retry_after_ms.expect("retry_after_ms");
                        assert!(wait > 0 && wait <= 3_600_000, "{wait}");
                        limited.fetch_add(1, Ordering::SeqCst);
                        // The refusal ends the connection.
                        conn.closed(PROMPT).await.unwrap();
                    }
                    Err(e) => panic!("registration {i}: {e}"),
                }
            }
        });
    }
    within(Duration::from_secs(120), "500 registrations", async {
        while let Some(t) = tasks.join_next().await {
            t.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(ok.load(Ordering::SeqCst), LIMIT);
    assert_eq!(limited.load(Ordering::SeqCst), ATTEMPTS as usize - LIMIT);
    assert_eq!(
        metric(&relay, "hush_refusals_total{kind=\"registration_limit\"}"),
        ATTEMPTS - LIMIT as u64
    );
    // A device registered before the limit still authenticates: find one.
    let mut authenticated = 0;
    for i in 0..ATTEMPTS {
        let id = DeviceIdentity::from_seed(1000 + i);
        let mut conn = TestDevice::connect(&id, target).await.unwrap();
        match conn.auth().await {
            Ok(ok) => {
                assert_eq!(ok.device, id.device());
                authenticated += 1;
                if authenticated == 2 {
                    break;
                }
            }
            Err(e) => assert_eq!(
                refusal_code(&Err::<(), _>(e)),
                Some(ErrorCode::UnknownDevice)
            ),
        }
    }
    assert_eq!(authenticated, 2, "registered devices authenticate");
}

/// Idle and byte-by-byte connections on the HTTP listener.
fn hold_http_connections(
    relay: &RelayProcess,
    idle: usize,
    trickling: usize,
) -> Vec<std::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..idle {
        held.push(std::net::TcpStream::connect(relay.http_addr()).unwrap());
    }
    for _ in 0..trickling {
        let mut s = std::net::TcpStream::connect(relay.http_addr()).unwrap();
        s.write_all(b"G").unwrap();
        held.push(s);
    }
    held
}

/// With 200 idle connections and 20 more sending their request one byte at
/// a time, `/healthz`, `/relay.json` and `/certificate.sha256` still answer
/// within two seconds each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_answers_while_idle_and_slow_connections_are_held() {
    let relay = Arc::new(relay(&[]).await);
    let mut held = hold_http_connections(&relay, 200, 20);
    let stop = Arc::new(AtomicBool::new(false));
    // The slow ones keep trickling (one byte each per 100 ms) meanwhile.
    let trickle = {
        let stop = Arc::clone(&stop);
        let mut slow: Vec<_> = held.split_off(200);
        std::thread::spawn(move || {
            let bytes = b"ET /healthz HTTP/1.1\r\nHost: x\r\n";
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                for s in &mut slow {
                    let _ = s.write_all(&bytes[i % bytes.len()..][..1]);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            slow
        })
    };
    for path in ["/healthz", "/relay.json", "/certificate.sha256"] {
        let r = Arc::clone(&relay);
        let p = path.to_string();
        let answer = within(
            Duration::from_secs(2),
            path,
            tokio::task::spawn_blocking(move || r.http_get(&p)),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(answer.0, 200, "{path}: {answer:?}");
    }
    let (_, body) = relay.http_get("/certificate.sha256").unwrap();
    assert_eq!(body.trim().len(), 64);
    stop.store(true, Ordering::SeqCst);
    let slow = trickle.join().unwrap();
    drop(slow);
    drop(held);
    assert!(metric(&relay, "hush_http_dropped_total") > 0);
}

fn signed_prekey(owner: &DeviceIdentity, id: u32) -> SignedPrekey {
    let public = [id as u8; 32];
    SignedPrekey {
        id,
        public,
        signature: owner.sign_as_device(&public),
    }
}

fn one_time(ids: std::ops::Range<u32>) -> Vec<OneTimePrekey> {
    ids.map(|id| OneTimePrekey {
        id,
        public: [(id % 251) as u8 + 1; 32],
    })
    .collect()
}

/// A stranger drains a device's one-time prekeys: its own fetches are
/// limited per minute, and so are all fetches of that one target
/// (`RateLimited` with `retry_after_ms`). As the pool runs low and empties
/// the owner's live connection is told (`PrekeysLow`), and once the owner
/// refills, fetches hand out one-time prekeys again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prekey_draining_is_rate_limited_and_the_owner_refills() {
    let relay = relay(&[
        "--prekey-fetches-per-device-minute",
        "5",
        "--prekey-fetches-per-target-minute",
        "8",
    ])
    .await;
    let (o, mut owner) = registered(&relay, 20).await;
    let left = owner
        .publish_prekeys(signed_prekey(&o, 1), one_time(100..106))
        .await
        .unwrap();
    assert_eq!(left, 6);
    let (_, mut stranger) = registered(&relay, 21).await;
    let (_, mut second) = registered(&relay, 22).await;

    // Per requesting device: 5 per minute.
    let mut handed = Vec::new();
    for _ in 0..5 {
        handed.push(
            stranger
                .fetch_prekeys(o.device())
                .await
                .unwrap()
                .one_time_prekey,
        );
    }
    let res = stranger.fetch_prekeys(o.device()).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::RateLimited), "{res:?}");
    let Err(hush_tests::HarnessError::Refused(e)) = res else {
        unreachable!()
    };
    assert!(
        e.retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 60_000),
        "{e:?}"
    );

    // Per target: 8 per minute from everyone together.
    for _ in 0..3 {
        handed.push(
            second
                .fetch_prekeys(o.device())
                .await
                .unwrap()
                .one_time_prekey,
        );
    }
    let res = second.fetch_prekeys(o.device()).await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::RateLimited), "{res:?}");

    // Six one-time prekeys went out, then the signed prekey alone.
    let ids: Vec<_> = handed.iter().map(|k| k.as_ref().map(|k| k.id)).collect();
    assert_eq!(
        ids,
        vec![
            Some(100),
            Some(101),
            Some(102),
            Some(103),
            Some(104),
            Some(105),
            None,
            None
        ]
    );

    // The owner heard about it, down to the empty pool.
    let mut last = u32::MAX;
    while last != 0 {
        let left = owner.next_prekeys_low(PROMPT).await.unwrap();
        assert!(left <= 10 && left < last, "{left} after {last}");
        last = left;
    }
    // It refills; the next fetcher (within the limits) gets a fresh one.
    let left = owner
        .publish_prekeys(signed_prekey(&o, 2), one_time(200..250))
        .await
        .unwrap();
    assert_eq!(left, 50);
    let (_, mut third) = registered(&relay, 23).await;
    let res = third.fetch_prekeys(o.device()).await;
    assert_eq!(
        refusal_code(&res),
        Some(ErrorCode::RateLimited),
        "the target's budget is still spent"
    );
    // The target's bucket refills one fetch every 7.5 s: the next one gets a
    // fresh one-time prekey.
    let third = Arc::new(tokio::sync::Mutex::new(third));
    let got = Arc::new(std::sync::Mutex::new(None));
    let target = o.device();
    wait_until_async(
        Duration::from_secs(15),
        "a fetch within the target's budget",
        || {
            let (third, got) = (Arc::clone(&third), Arc::clone(&got));
            async move {
                match third.lock().await.fetch_prekeys(target).await {
                    Ok(bundle) => {
                        *got.lock().unwrap() = Some(bundle);
                        true
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
                        false
                    }
                }
            }
        },
    )
    .await
    .unwrap();
    let fresh = got.lock().unwrap().take().unwrap();
    assert_eq!(fresh.signed_prekey.id, 2);
    assert_eq!(fresh.one_time_prekey.map(|k| k.id), Some(200));
    // An offline owner learns the count when it authenticates.
    owner.close();
    let back = TestDevice::login(&o, relay.target()).await.unwrap();
    assert_eq!(back.auth_ok().unwrap().one_time_prekeys_left, 49);
    back.close();
}
