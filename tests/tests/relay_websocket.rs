//! The relay's WebSocket transport, end to end: a real `hush-relay` process
//! on 127.0.0.1, real TCP, TLS and WebSockets, one fresh relay per test.
//!
//! - the whole protocol (register, auth, send, pull, push, ack) over
//!   `wss://` on the QUIC port number, interoperating with QUIC devices,
//!   and "newest connection wins" across transports;
//! - the plain `ws://…/ws` upgrade on a loopback HTTP listener, advertised
//!   in `/relay.json`;
//! - hostile WebSocket input: an oversized frame before authentication, a
//!   text message, garbage, broken WebSocket framing, a bad signature —
//!   each refused with a typed error frame and/or close code, while another
//!   device keeps being served;
//! - a device whose old connection is stuck writing to it reconnects and
//!   is told the ack it sent there;
//! - the connection limit per address applies to WebSockets too;
//! - the `hush` CLI with `--transport ws`, and with `--transport auto`
//!   against a relay whose UDP port is closed.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{ErrorCode, Request, Response, ServerFrame};
use hush_relay::clock::SystemClock;
use hush_relay::config::Config;
use hush_relay::server::RelayHandle;
use hush_tests::cli::{Hush, metric};
use hush_tests::ws::{WsDevice, WsEvent};
use hush_tests::{
    DeviceIdentity, RelayProcess, TestDevice, conversation, make_envelope, make_envelope_sized,
    refusal_code, stored,
};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Bound for anything the relay should do promptly.
const PROMPT: Duration = Duration::from_secs(10);

async fn relay(extra: &[&str]) -> RelayProcess {
    let mut args = vec!["--send-rate", "0"];
    args.extend_from_slice(extra);
    RelayProcess::spawn_temp(&args)
        .await
        .expect("relay process starts")
}

async fn ws_device(relay: &RelayProcess, seed: u64) -> (DeviceIdentity, WsDevice) {
    let id = DeviceIdentity::from_seed(seed);
    let ws = relay.ws_addr().expect("the TLS WebSocket listener is on");
    let mut dev = WsDevice::connect_tls(&id, ws, relay.cert_sha256())
        .await
        .expect("WebSocket connects");
    dev.register()
        .await
        .expect("device registers over WebSocket");
    (id, dev)
}

/// Register, send, pull, live push and ack over `wss://` on the QUIC port
/// number; a QUIC device and a WebSocket device talk to each other; a newer
/// connection of the same device (over QUIC) replaces the WebSocket one.
#[tokio::test]
async fn full_protocol_over_tls_websocket() {
    let relay = relay(&[]).await;
    let ws_addr = relay.ws_addr().unwrap();
    assert_eq!(
        ws_addr.port(),
        relay.quic_addr().port(),
        "the TLS WebSocket listens on the QUIC port number (TCP)"
    );
    let (a, mut alice) = ws_device(&relay, 1).await;
    let b = DeviceIdentity::from_seed(2);
    let mut bob_quic = TestDevice::register_new(&b, relay.target()).await.unwrap();
    let conv = conversation(5);

    // WebSocket -> QUIC.
    let e1 = make_envelope(a.device(), b.device(), conv, 1, b"over ws");
    assert_eq!(
        stored(&alice.send_one(e1.clone()).await.unwrap()),
        Some((1, false))
    );
    let page = bob_quic.pull(0, 200, 0).await.unwrap();
    assert_eq!(page.envelopes.len(), 1);
    assert_eq!(page.envelopes[0].envelope, e1);

    // QUIC -> WebSocket: pull (now live), then live pushes, then ack.
    let page = alice.pull(0, 200, 0).await.unwrap();
    assert!(page.envelopes.is_empty());
    assert_eq!(page.remaining, 0);
    let mut sent = Vec::new();
    for i in 1..=3 {
        let e = make_envelope(
            b.device(),
            a.device(),
            conv,
            i,
            format!("live {i}").as_bytes(),
        );
        bob_quic.send_one(e.clone()).await.unwrap();
        sent.push(e);
    }
    let mut pushed = Vec::new();
    while pushed.len() < 3 {
        pushed.extend(alice.next_push(PROMPT).await.unwrap());
    }
    let seqs: Vec<u64> = pushed.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    for (d, e) in pushed.iter().zip(&sent) {
        assert_eq!(&d.envelope, e);
    }
    assert_eq!(alice.ack(3).await.unwrap(), 3);

    // A large frame after authentication goes through (many WebSocket
    // frames' worth of a 60 KiB envelope).
    let big = make_envelope(a.device(), b.device(), conv, 2, &vec![7u8; 60 * 1024]);
    assert_eq!(
        stored(&alice.send_one(big.clone()).await.unwrap()),
        Some((2, false))
    );

    // The same device over QUIC: the newest connection wins; the WebSocket
    // hears why (Closing{Replaced}) and is closed with 4001.
    let mut alice_quic = TestDevice::login(&a, relay.target()).await.unwrap();
    assert_eq!(
        alice_quic.auth_ok().unwrap().acked,
        3,
        "the ack over WebSocket held"
    );
    let (frames, code) = alice.until_closed(PROMPT).await.unwrap();
    assert!(
        frames.iter().any(|f| matches!(
            f,
            ServerFrame::Closing {
                code: ErrorCode::Replaced,
                ..
            }
        )),
        "{frames:?}"
    );
    assert_eq!(code, Some(4001));
    // And back: a new WebSocket replaces the QUIC connection.
    let ws = relay.ws_addr().unwrap();
    let mut again = WsDevice::connect_tls(&a, ws, relay.cert_sha256())
        .await
        .unwrap();
    assert_eq!(again.auth().await.unwrap().acked, 3);
    let closed = alice_quic.next_frame(PROMPT).await.unwrap();
    assert!(
        matches!(
            closed,
            ServerFrame::Closing {
                code: ErrorCode::Replaced,
                ..
            }
        ),
        "{closed:?}"
    );
    assert!(
        metric(&relay, "hush_websocket_connections_total")
            .unwrap()
            .unwrap()
            >= 2.0
    );
}

/// A loopback HTTP listener upgrades `/ws` to a plain WebSocket running the
/// same protocol, and `/relay.json` names both WebSocket URLs.
#[tokio::test]
async fn plain_websocket_on_loopback_http_and_relay_json() {
    let relay = relay(&[]).await;
    let (status, body) = relay.http_get("/relay.json").unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["websocket"],
        format!("wss://{}/ws", relay.ws_addr().unwrap())
    );
    // The harness asks with `Host: 127.0.0.1`.
    assert_eq!(json["websocketPlain"], "ws://127.0.0.1/ws");

    let id = DeviceIdentity::from_seed(3);
    let mut dev = WsDevice::connect_plain(&id, relay.http_addr())
        .await
        .unwrap();
    dev.register().await.unwrap();
    let page = dev.pull(0, 10, 0).await.unwrap();
    assert_eq!(page.remaining, 0);
    // A plain GET of /ws without the upgrade is refused, not served.
    let (status, _) = relay.http_get("/ws").unwrap();
    assert_eq!(status, 426);
}

/// Without a loopback HTTP listener and without `--http-ws`, `/ws` is not
/// upgraded, and `/relay.json` does not offer it; with the flag it is.
#[tokio::test]
async fn plain_websocket_is_off_unless_loopback_or_flag() {
    let id = DeviceIdentity::from_seed(4);
    for flag in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default_for(dir.path().join("data"));
        config.http = Some("0.0.0.0:0".parse().unwrap());
        config.http_ws = flag;
        let relay = RelayHandle::start(config, Arc::new(SystemClock))
            .await
            .unwrap();
        let http: SocketAddr = ([127, 0, 0, 1], relay.http_addr().unwrap().port()).into();
        let body = tokio::task::spawn_blocking(move || http_get(http, "/relay.json"))
            .await
            .unwrap();
        assert_eq!(body.contains("websocketPlain"), flag, "{body}");
        let plain = WsDevice::connect_plain(&id, http).await;
        if flag {
            let mut dev = plain.unwrap();
            dev.register().await.unwrap();
        } else {
            assert!(plain.is_err());
        }
        relay.shutdown().await.unwrap();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PROMPT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// Hostile input over WebSockets gets typed refusals and closes, and a
/// well-behaved device on the same relay is served throughout.
#[tokio::test]
async fn hostile_websocket_input_is_refused_and_others_keep_being_served() {
    let relay = relay(&[]).await;
    let ws = relay.ws_addr().unwrap();
    let hash = relay.cert_sha256();
    let (good_id, mut good) = ws_device(&relay, 10).await;
    let stranger = DeviceIdentity::from_seed(11);

    // 1. Before authentication, a frame declaring 1 MiB: TooLarge at once
    //    (the prefix is enough), then close 4003.
    let mut c = WsDevice::connect_tls(&stranger, ws, hash).await.unwrap();
    let mut bytes = (1024u32 * 1024).to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 64]);
    c.write_bytes(&bytes).await.unwrap();
    let (frames, code) = c.until_closed(PROMPT).await.unwrap();
    assert!(
        frames.iter().any(
            |f| matches!(f, ServerFrame::Error { error, .. } if error.code == ErrorCode::TooLarge)
        ),
        "{frames:?}"
    );
    assert_eq!(code, Some(4003));
    assert_eq!(
        metric(&relay, "hush_preauth_oversize_total").unwrap(),
        Some(1.0)
    );

    // 2. A text message: close 1003.
    let mut c = WsDevice::connect_tls(&stranger, ws, hash).await.unwrap();
    c.send_message(Message::Text("{\"hello\":1}".into()))
        .await
        .unwrap();
    let (frames, code) = c.until_closed(PROMPT).await.unwrap();
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(code, Some(1003));

    // 3. Garbage (a small frame whose body does not decode): BadFrame, close 4003.
    let mut c = WsDevice::connect_tls(&stranger, ws, hash).await.unwrap();
    c.write_bytes(&[0, 0, 0, 5, 1, 0xFF, 0xFF, 0xFF, 0xFF])
        .await
        .unwrap();
    let (frames, code) = c.until_closed(PROMPT).await.unwrap();
    assert!(
        frames.iter().any(
            |f| matches!(f, ServerFrame::Error { error, .. } if error.code == ErrorCode::BadFrame)
        ),
        "{frames:?}"
    );
    assert_eq!(code, Some(4003));

    // 4. A bad signature: BadAuth, and the connection ends.
    let (victim, _victim_conn) = ws_device(&relay, 12).await;
    let mut c = WsDevice::connect_tls(&victim, ws, hash).await.unwrap();
    c.hello().await.unwrap();
    let res = c
        .request(Request::Auth {
            signature: [9u8; 64],
        })
        .await;
    assert_eq!(refusal_code(&res), Some(ErrorCode::BadAuth), "{res:?}");
    let (_, code) = c.until_closed(PROMPT).await.unwrap();
    assert_eq!(code, Some(4003));

    // 5. Broken WebSocket framing (an unmasked client frame), in the
    //    clear on the HTTP listener: close 1002.
    let code = raw_plain_ws(relay.http_addr(), &[0x82, 0x02, 0xAB, 0xCD]);
    assert_eq!(code, Some(1002));
    // A stray continuation frame (masked, but no message to continue).
    let code = raw_plain_ws(relay.http_addr(), &[0x80, 0x80, 1, 2, 3, 4]);
    assert_eq!(code, Some(1002));
    assert!(
        metric(&relay, "hush_websocket_violations_total")
            .unwrap()
            .unwrap()
            >= 3.0
    );

    // 6. A bad upgrade request is an HTTP error, not a WebSocket.
    let mut s = std::net::TcpStream::connect(relay.http_addr()).unwrap();
    s.set_read_timeout(Some(PROMPT)).unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // Throughout, the good device is served.
    let e = make_envelope(
        good_id.device(),
        victim.device(),
        conversation(1),
        1,
        b"still here",
    );
    assert_eq!(stored(&good.send_one(e).await.unwrap()), Some((1, false)));
    assert_eq!(good.pull(0, 10, 0).await.unwrap().remaining, 0);
}

/// Upgrade in the clear by hand, send `bytes` raw, and return the close
/// code the relay answers with.
fn raw_plain_ws(http: std::net::SocketAddr, bytes: &[u8]) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(PROMPT)).unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    s.write_all(bytes).unwrap();
    // Server frames are unmasked: skip to the close frame (opcode 8).
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let mut i = 0;
    while i + 2 <= rest.len() {
        let opcode = rest[i] & 0x0F;
        let len = (rest[i + 1] & 0x7F) as usize;
        if len >= 126 {
            return None;
        }
        if opcode == 0x8 && len >= 2 && i + 4 <= rest.len() {
            return Some(u16::from_be_bytes([rest[i + 2], rest[i + 3]]));
        }
        i += 2 + len;
    }
    None
}

/// `--max-connections-per-ip` counts WebSockets: the third from one
/// address is refused before TLS, and freeing one makes room.
/// A device whose old connection is stuck writing pages to a peer that no
/// longer reads (a phone that moved networks mid catch-up) reconnects, and
/// its new connection is told the ack it sent on the old one: the relay
/// applies that ack for the new connection instead of waiting for the old
/// one, which holds it back (the device was catching up) and cannot get to
/// it while its write is blocked.
#[tokio::test]
async fn a_reconnect_adopts_the_ack_of_a_connection_stuck_writing() {
    let relay = relay(&["--inbox-max-bytes", "64MiB"]).await;
    let (a, mut sender) = ws_device(&relay, 30).await;
    let (b, mut old) = ws_device(&relay, 31).await;
    let conv = conversation(3);
    let big: Vec<_> = (1..=200)
        .map(|i| make_envelope_sized(a.device(), b.device(), conv, i, 60 * 1024, 7))
        .collect();
    for chunk in big.chunks(16) {
        let id = sender
            .write_request(Request::Send {
                envelopes: chunk.to_vec(),
            })
            .await
            .unwrap();
        match sender.next_event(PROMPT).await.unwrap() {
            WsEvent::Frame(frame) => match *frame {
                ServerFrame::Response {
                    request_id,
                    response: Response::Sent { outcomes },
                } if request_id == id => {
                    assert!(outcomes.iter().all(|o| stored(o).is_some()), "{outcomes:?}");
                }
                other => panic!("expected Sent, got {other:?}"),
            },
            other => panic!("expected a frame, got {other:?}"),
        }
    }
    let page = old.pull(0, 10, 0).await.unwrap();
    assert_eq!(page.envelopes.last().map(|d| d.seq), Some(10));
    // Acknowledge 1..=10 with the next pull (held back: more remains), and
    // ask for the same 2 MiB page again and again without reading: the
    // relay's writes fill the socket buffers and block.
    for _ in 0..16 {
        old.write_request(Request::Pull {
            after: 10,
            limit: 1000,
            ack: 10,
        })
        .await
        .unwrap();
    }
    let mut new = TestDevice::login(&b, relay.target()).await.unwrap();
    assert_eq!(
        new.auth_ok().map(|ok| ok.acked),
        Some(10),
        "AuthOk reports the ack the stuck connection received"
    );
    let page = new.pull(10, 5, 10).await.unwrap();
    assert_eq!(page.envelopes.first().map(|d| d.seq), Some(11));
    drop(old);
}

#[tokio::test]
async fn connection_limit_per_address_applies_to_websockets() {
    let relay = relay(&["--max-connections-per-ip", "2"]).await;
    let ws = relay.ws_addr().unwrap();
    let hash = relay.cert_sha256();
    let id = DeviceIdentity::from_seed(20);
    let first = WsDevice::connect_tls(&id, ws, hash).await.unwrap();
    let _second = WsDevice::connect_tls(&id, ws, hash).await.unwrap();
    assert!(WsDevice::connect_tls(&id, ws, hash).await.is_err());
    assert_eq!(
        metric(&relay, "hush_connections_refused_total{limit=\"per_ip\"}").unwrap(),
        Some(1.0)
    );
    drop(first);
    hush_tests::wait_until_async(PROMPT, "a freed WebSocket place", || async {
        match WsDevice::connect_tls(&id, ws, hash).await {
            Ok(mut d) => d.register().await.is_ok(),
            Err(_) => false,
        }
    })
    .await
    .unwrap();
}

/// The CLI over `--transport ws` end to end: init, contacts, send, sync;
/// `status --json` names the transport.
#[tokio::test]
async fn cli_transport_ws_end_to_end() {
    let relay = relay(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let alice = Hush::new(dir.path(), "alice").unwrap();
    let bob = Hush::new(dir.path(), "bob").unwrap();
    let addr = relay.quic_addr().to_string();
    let hash = hex::encode(relay.cert_sha256());
    for (h, name) in [(&alice, "alice"), (&bob, "bob")] {
        h.run_ok(&[
            "--transport",
            "ws",
            "init",
            "--relay",
            &addr,
            "--cert-hash",
            &hash,
            "--name",
            name,
        ])
        .await
        .unwrap();
    }
    alice
        .add_contact("bob", &bob.code().await.unwrap())
        .await
        .unwrap();
    bob.add_contact("alice", &alice.code().await.unwrap())
        .await
        .unwrap();
    alice
        .run_ok(&["--transport", "ws", "send", "bob", "hello over websocket"])
        .await
        .unwrap();
    let out = bob
        .run_ok(&["--transport", "ws", "sync", "--json"])
        .await
        .unwrap();
    let texts = hush_tests::cli::texts(&out.messages());
    assert!(
        texts.contains(&"hello over websocket".to_string()),
        "{texts:?}"
    );
    let status = bob
        .run_ok(&["--transport", "ws", "status", "--json"])
        .await
        .unwrap();
    let status = &status.json_lines()[0];
    assert_eq!(status["transport"]["setting"], "ws");
    assert_eq!(status["transport"]["last"], "websocket");
    // No QUIC connection was ever made by the CLI (only the relay's own
    // count of WebSockets grew).
    assert!(
        metric(&relay, "hush_websocket_connections_total")
            .unwrap()
            .unwrap()
            >= 4.0
    );
}

/// A free TCP port on 127.0.0.1 (nothing listens on its UDP twin either).
fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `--transport auto` (the default) against an address whose UDP port is
/// closed (QUIC is elsewhere): the WebSocket takes over, and a QUIC device
/// on the same relay gets the message.
#[tokio::test]
async fn cli_auto_falls_back_to_websocket_when_udp_is_closed() {
    let port = free_tcp_port();
    let ws_listen = format!("127.0.0.1:{port}");
    let relay = relay(&["--ws-listen", &ws_listen]).await;
    assert_ne!(relay.quic_addr().port(), port);
    let dir = tempfile::tempdir().unwrap();
    let alice = Hush::new(dir.path(), "alice").unwrap();
    let bob = Hush::new(dir.path(), "bob").unwrap();
    let hash = hex::encode(relay.cert_sha256());
    // Alice only knows the TCP port; nothing answers on its UDP twin.
    alice
        .run_ok(&[
            "init",
            "--relay",
            &ws_listen,
            "--cert-hash",
            &hash,
            "--name",
            "alice",
        ])
        .await
        .unwrap();
    bob.init(&relay, "bob").await.unwrap();
    alice
        .add_contact("bob", &bob.code().await.unwrap())
        .await
        .unwrap();
    bob.add_contact("alice", &alice.code().await.unwrap())
        .await
        .unwrap();
    alice
        .run_ok(&["send", "bob", "udp is blocked here"])
        .await
        .unwrap();
    let got = bob.sync_messages().await.unwrap();
    let texts = hush_tests::cli::texts(&got);
    assert!(
        texts.contains(&"udp is blocked here".to_string()),
        "{texts:?}"
    );
    let a = alice.status().await.unwrap();
    assert_eq!(a["transport"]["setting"], "auto");
    assert_eq!(a["transport"]["last"], "websocket");
    let b = bob.status().await.unwrap();
    assert_eq!(b["transport"]["last"], "quic");
    // With QUIC forced, alice cannot reach the relay at all.
    let out = alice
        .run(&["--transport", "quic", "send", "bob", "never", "--wait", "2"])
        .await
        .unwrap();
    assert!(!out.ok(), "{out:?}");
}
