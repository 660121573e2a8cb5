//! The relay over real QUIC and HTTP on 127.0.0.1: authentication,
//! replacement, live push, malformed input, HTTP endpoints and graceful
//! shutdown. (Browsers' WebTransport beside native clients on the same port:
//! `server_webtransport.rs`.)

// Helpers below fail the test by panicking, as test code does.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use common::{Client, Device, http_get, within};
use hush_protocol::{ErrorCode, Request, Response, SendOutcome, ServerFrame};
use hush_relay::{Config, ManualClock, RelayHandle};
use std::sync::Arc;

async fn start(dir: &tempfile::TempDir) -> RelayHandle {
    let config = Config::default_for(dir.path().join("data"));
    RelayHandle::start(config, Arc::new(ManualClock::new(1_800_000_000_000)))
        .await
        .expect("relay starts")
}

fn error_code(f: &ServerFrame) -> ErrorCode {
    match f {
        ServerFrame::Error { error, .. } => error.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_succeeds_fails_and_a_signature_does_not_replay_on_another_connection() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir).await;
    let cert = relay.cert_der();
    let alice = Device::new(1);

    // Before authentication only Hello/Auth/Register/Ping are allowed.
    let mut c1 = Client::connect(relay.quic_addr(), &cert).await;
    let f = c1
        .request(Request::Pull {
            after: 0,
            limit: 10,
            ack: 0,
        })
        .await;
    assert_eq!(error_code(&f), ErrorCode::NotAuthenticated);
    // Unknown device: refused, and the connection ends (one attempt per
    // connection); the device registers on a new one.
    let f = alice.auth(&mut c1).await;
    assert_eq!(error_code(&f), ErrorCode::UnknownDevice);
    assert_closed_with(&mut c1, ErrorCode::UnknownDevice).await;
    let mut c1 = Client::connect(relay.quic_addr(), &cert).await;
    alice.register(&mut c1).await;

    // Capture a valid signature on connection 2.
    let mut c2 = Client::connect(relay.quic_addr(), &cert).await;
    let challenge2 = c2.challenge(alice.id).await;
    let captured = alice.sign(&challenge2);

    // Replaying it on connection 3 fails: its challenge differs.
    let mut c3 = Client::connect(relay.quic_addr(), &cert).await;
    let challenge3 = c3.challenge(alice.id).await;
    assert_ne!(challenge2, challenge3);
    let f = c3
        .request(Request::Auth {
            signature: captured,
        })
        .await;
    assert_eq!(error_code(&f), ErrorCode::BadAuth);
    // No second guess on the same connection: it is closed.
    assert_closed_with(&mut c3, ErrorCode::BadAuth).await;
    // A new connection authenticates with a fresh challenge.
    let mut c3 = Client::connect(relay.quic_addr(), &cert).await;
    let f = alice.auth(&mut c3).await;
    match f {
        ServerFrame::Response {
            response: Response::Authenticated(ok),
            ..
        } => {
            assert_eq!(ok.device, alice.id)
        }
        other => panic!("{other:?}"),
    }
    // Connection 1 (registered as alice) was replaced by connection 3.
    let mut closing = None;
    while let Some(f) = c1.next_frame().await {
        if let ServerFrame::Closing { code, .. } = f {
            closing = Some(code);
        }
    }
    assert_eq!(closing, Some(ErrorCode::Replaced));
    // And connection 3 still works.
    let f = c3.request(Request::Ping).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Pong { .. },
            ..
        }
    ));
    assert_eq!(relay.metrics().refusals(ErrorCode::BadAuth), 1);
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_stored_then_pushed_live_and_shutdown_says_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir).await;
    let cert = relay.cert_der();
    let (alice, bob) = (Device::new(1), Device::new(2));
    let mut ca = Client::connect(relay.quic_addr(), &cert).await;
    alice.register(&mut ca).await;
    let mut cb = Client::connect(relay.quic_addr(), &cert).await;
    bob.register(&mut cb).await;

    // Bob drains his (empty) inbox and becomes live.
    let f = cb
        .request(Request::Pull {
            after: 0,
            limit: 200,
            ack: 0,
        })
        .await;
    assert!(
        matches!(&f, ServerFrame::Response { response: Response::Page(p), .. } if p.remaining == 0)
    );

    let f = ca
        .request(Request::Send {
            envelopes: vec![alice.envelope_to(&bob, 1), alice.envelope_to(&bob, 2)],
        })
        .await;
    match f {
        ServerFrame::Response {
            response: Response::Sent { outcomes },
            ..
        } => {
            let seqs: Vec<u64> = outcomes
                .iter()
                .map(|o| match o {
                    SendOutcome::Stored {
                        seq,
                        duplicate: false,
                        ..
                    } => *seq,
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(seqs, vec![1, 2]);
        }
        other => panic!("{other:?}"),
    }
    // Pushed in order, contiguous with the (empty) page.
    let mut pushed = Vec::new();
    while pushed.len() < 2 {
        match cb.next_frame().await.expect("a push") {
            ServerFrame::Push { envelopes } => pushed.extend(envelopes),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pushed.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(pushed[0].envelope, alice.envelope_to(&bob, 1));
    let f = cb.request(Request::Ack { up_to: 2 }).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Acked { up_to: 2 },
            ..
        }
    ));

    // A malformed frame closes only that connection.
    let mut bad = Client::connect(relay.quic_addr(), &cert).await;
    bad.write_raw(&[0, 0, 0, 3, 1, 0xFF, 0xFF]).await;
    let f = bad.next_frame().await.expect("an error frame");
    assert_eq!(error_code(&f), ErrorCode::BadFrame);
    assert!(bad.next_frame().await.is_none(), "then the stream ends");
    let f = ca.request(Request::Ping).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Pong { .. },
            ..
        }
    ));

    let m = relay.metrics();
    assert_eq!(hush_relay::Metrics::get(&m.envelopes_stored_total), 2);
    assert!(m.commit_batch_size.count() >= 1);

    // Graceful shutdown: live connections are told, then closed.
    let shutdown = tokio::spawn(relay.shutdown());
    let mut saw = None;
    while let Some(f) = cb.next_frame().await {
        if let ServerFrame::Closing { code, .. } = f {
            saw = Some(code);
        }
    }
    assert_eq!(saw, Some(ErrorCode::ShuttingDown));
    within("shutdown", shutdown).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir).await;
    let http = relay.http_addr().expect("HTTP enabled");

    let (status, _, body) = http_get(http, "GET /healthz HTTP/1.1").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let (status, head, body) = http_get(http, "GET /certificate.sha256 HTTP/1.1").await;
    assert_eq!(status, 200);
    assert_eq!(body.trim(), relay.cert_sha256_hex());
    assert!(head.contains("Access-Control-Allow-Origin: *"));

    // Open one connection so the counters move.
    let _c = Client::connect(relay.quic_addr(), &relay.cert_der()).await;
    let (head, body) = common::eventually("the connection to be counted", || async {
        let (status, head, body) = http_get(http, "GET /metrics HTTP/1.1").await;
        assert_eq!(status, 200);
        body.contains("hush_connections_total 1")
            .then_some((head, body))
    })
    .await;
    assert!(head.contains("text/plain; version=0.0.4"));
    for series in [
        "hush_sends_total 0",
        "hush_connections_total 1",
        "hush_inbox_depth 0",
        "hush_commit_latency_seconds_bucket{le=\"+Inf\"} 0",
        "hush_send_durable_seconds_bucket{le=\"+Inf\"} 0",
        "hush_refusals_total{kind=\"quota\"} 0",
    ] {
        assert!(body.contains(series), "missing {series} in\n{body}");
    }

    assert_eq!(http_get(http, "GET / HTTP/1.1").await.0, 404);
    assert_eq!(http_get(http, "POST /healthz HTTP/1.1").await.0, 405);
    assert_eq!(http_get(http, "GET /healthz SPDY/9").await.0, 505);
    relay.shutdown().await.unwrap();
}

/// The seqs of a `Page` reply.
fn page_seqs(f: &ServerFrame) -> (Vec<u64>, u64) {
    match f {
        ServerFrame::Response {
            response: Response::Page(p),
            ..
        } => (p.envelopes.iter().map(|d| d.seq).collect(), p.remaining),
        other => panic!("expected a page, got {other:?}"),
    }
}

/// Sends that arrive in one read go to the commit writer together and come
/// back as one answer, which the relay splits among the requests. A hostile
/// client packs, into ONE write, sends that the relay must answer
/// differently: a good one, one to an unregistered device, a replay of the
/// first, one request mixing a forged-sender envelope with a good one, a
/// `Ping` between them, and a last good one. Every request must get exactly
/// its own outcomes (a refused or duplicate envelope must never borrow a
/// neighbour's "stored"), and only the good envelopes may be stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_read_together_get_their_own_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir).await;
    let cert = relay.cert_der();
    let (alice, bob, stranger) = (Device::new(1), Device::new(2), Device::new(9));
    let mut ca = Client::connect(relay.quic_addr(), &cert).await;
    alice.register(&mut ca).await;
    let mut cb = Client::connect(relay.quic_addr(), &cert).await;
    bob.register(&mut cb).await;

    let mut forged = alice.envelope_to(&bob, 7);
    forged.header.sender_device = bob.id;
    let requests = vec![
        Request::Send {
            envelopes: vec![alice.envelope_to(&bob, 1)],
        },
        Request::Send {
            envelopes: vec![alice.envelope_to(&stranger, 2)],
        },
        Request::Send {
            envelopes: vec![alice.envelope_to(&bob, 1)],
        },
        Request::Send {
            envelopes: vec![forged, alice.envelope_to(&bob, 3)],
        },
        Request::Ping,
        Request::Send {
            envelopes: vec![alice.envelope_to(&bob, 4)],
        },
    ];
    let mut bytes = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        let frame = hush_protocol::ClientFrame {
            request_id: 100 + i as u32,
            request,
        };
        bytes.extend(hush_protocol::encode_client_frame(&frame).unwrap());
    }
    ca.write_raw(&bytes).await;

    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 6 {
        match ca.next_frame().await.expect("an answer") {
            ServerFrame::Response {
                request_id,
                response,
            } => {
                assert!(
                    answers.insert(request_id, response).is_none(),
                    "one answer per request"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let outcomes = |id: u32| match answers.get(&id) {
        Some(Response::Sent { outcomes }) => outcomes.clone(),
        other => panic!("request {id}: {other:?}"),
    };
    let stored = |o: &SendOutcome| match o {
        SendOutcome::Stored {
            seq,
            duplicate,
            message_id,
            ..
        } => Some((*seq, *duplicate, *message_id)),
        SendOutcome::Refused { .. } => None,
    };
    let refused = |o: &SendOutcome| match o {
        SendOutcome::Refused { error, .. } => Some(error.code),
        SendOutcome::Stored { .. } => None,
    };
    let id_of = |n: u64| alice.envelope_to(&bob, n).header.message_id;

    let first = outcomes(100);
    assert_eq!(first.len(), 1);
    assert_eq!(stored(&first[0]), Some((1, false, id_of(1))));
    let unknown = outcomes(101);
    assert_eq!(unknown.len(), 1);
    assert_eq!(refused(&unknown[0]), Some(ErrorCode::UnknownDevice));
    let replay = outcomes(102);
    assert_eq!(replay.len(), 1);
    assert_eq!(stored(&replay[0]), Some((1, true, id_of(1))), "a duplicate");
    let mixed = outcomes(103);
    assert_eq!(mixed.len(), 2);
    assert_eq!(refused(&mixed[0]), Some(ErrorCode::Forbidden));
    assert_eq!(stored(&mixed[1]), Some((2, false, id_of(3))));
    assert!(
        matches!(answers.get(&104), Some(Response::Pong { .. })),
        "ping: {:?}",
        answers.get(&104)
    );
    let last = outcomes(105);
    assert_eq!(last.len(), 1);
    assert_eq!(stored(&last[0]), Some((3, false, id_of(4))));

    let m = relay.metrics();
    assert_eq!(hush_relay::Metrics::get(&m.envelopes_stored_total), 3);
    let f = cb
        .request(Request::Pull {
            after: 0,
            limit: 200,
            ack: 0,
        })
        .await;
    let (seqs, remaining) = page_seqs(&f);
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(remaining, 0);
}

/// A pull's merged ack is applied after its page is sent, but the page is
/// the one acking first would give, the connection's acks apply in order,
/// and a later request on the connection sees them applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_acks_apply_after_the_page_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir).await;
    let cert = relay.cert_der();
    let (alice, bob) = (Device::new(1), Device::new(2));
    let mut ca = Client::connect(relay.quic_addr(), &cert).await;
    alice.register(&mut ca).await;
    let mut cb = Client::connect(relay.quic_addr(), &cert).await;
    bob.register(&mut cb).await;
    let envelopes = (1..=8).map(|i| alice.envelope_to(&bob, i)).collect();
    let f = ca.request(Request::Send { envelopes }).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Sent { .. },
            ..
        }
    ));

    let pull = |after, ack| Request::Pull {
        after,
        limit: 3,
        ack,
    };
    assert_eq!(page_seqs(&cb.request(pull(0, 0)).await), (vec![1, 2, 3], 5));
    assert_eq!(page_seqs(&cb.request(pull(3, 3)).await), (vec![4, 5, 6], 2));
    // An ack beyond `after` skips what it deletes, as if applied first.
    assert_eq!(page_seqs(&cb.request(pull(2, 6)).await), (vec![7, 8], 0));
    // Any other request waits for the connection's acks: the cursor in
    // force is the last merged ack.
    let f = cb.request(Request::Ack { up_to: 0 }).await;
    assert!(
        matches!(
            f,
            ServerFrame::Response {
                response: Response::Acked { up_to: 6 },
                ..
            }
        ),
        "{f:?}"
    );
    assert_eq!(page_seqs(&cb.request(pull(0, 0)).await), (vec![7, 8], 0));
    relay.shutdown().await.unwrap();
}

/// The relay ends the connection after a failed `Auth` or `Register` (its
/// refusal, already read, names `code`): nothing but the end follows.
async fn assert_closed_with(client: &mut Client, code: ErrorCode) {
    if let Some(f) = client.next_frame().await {
        panic!("after {code:?} the connection should end, got {f:?}");
    }
}

/// Many single-envelope `Send`s in flight on one connection (written back to
/// back, as a pipelining client does): the relay answers their acks several
/// per write once a group commit makes them durable, and every request still
/// gets exactly one `Sent`, in request order, naming its own envelope, with
/// every envelope stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_get_one_ack_each_in_order() {
    const SENDS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir).await;
    let cert = relay.cert_der();
    let (alice, bob) = (Device::new(1), Device::new(2));
    let mut ca = Client::connect(relay.quic_addr(), &cert).await;
    alice.register(&mut ca).await;
    let mut cb = Client::connect(relay.quic_addr(), &cert).await;
    bob.register(&mut cb).await;

    let mut ids = Vec::new();
    for n in 1..=SENDS {
        let id = ca
            .send_request(Request::Send {
                envelopes: vec![alice.envelope_to(&bob, n)],
            })
            .await;
        ids.push(id);
    }
    let mut acked = Vec::new();
    while acked.len() < ids.len() {
        match ca.next_frame().await.expect("an ack") {
            ServerFrame::Response {
                request_id,
                response: Response::Sent { outcomes },
            } => {
                let [
                    SendOutcome::Stored {
                        seq,
                        message_id,
                        duplicate: false,
                        ..
                    },
                ] = outcomes.as_slice()
                else {
                    panic!("request {request_id}: {outcomes:?}");
                };
                let n = acked.len() as u64 + 1;
                assert_eq!(*message_id, alice.envelope_to(&bob, n).header.message_id);
                assert_eq!(*seq, n, "acks in request order");
                acked.push(request_id);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, ids, "one ack per request, in order");
    let f = ca.request(Request::Ping).await;
    assert!(
        matches!(
            &f,
            ServerFrame::Response {
                response: Response::Pong { .. },
                ..
            }
        ),
        "no stray frames after the acks: {f:?}"
    );
    let m = relay.metrics();
    assert_eq!(hush_relay::Metrics::get(&m.envelopes_stored_total), SENDS);
    let f = cb
        .request(Request::Pull {
            after: 0,
            limit: 200,
            ack: 0,
        })
        .await;
    let (seqs, remaining) = page_seqs(&f);
    assert_eq!(seqs, (1..=SENDS).collect::<Vec<_>>());
    assert_eq!(remaining, 0);
}
