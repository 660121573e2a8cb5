//! Browsers' transport: WebTransport sessions (a native `wtransport` client
//! standing in for a browser, pinning the certificate hash as a page does)
//! beside native `hush/1` clients on the same UDP port, the same frames on
//! one bidirectional stream; sessions refused off `/`; sessions ended by the
//! client; replacement across transports; shutdown. Also `/relay.json` and
//! the `--demo` files on the HTTP listener.

// Helpers below fail the test by panicking, as test code does.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use common::{Client, Device, Transport, eventually, http_get, webtransport_endpoint, within};
use hush_protocol::{ErrorCode, Request, Response, SendOutcome, ServerFrame};
use hush_relay::demo::DemoFiles;
use hush_relay::{Config, ManualClock, RelayHandle, StartOptions};
use std::sync::Arc;
use std::sync::atomic::Ordering;

async fn start(dir: &tempfile::TempDir, demo: bool, options: StartOptions) -> RelayHandle {
    let mut config = Config::default_for(dir.path().join("data"));
    config.demo = demo;
    RelayHandle::start_with(
        config,
        Arc::new(ManualClock::new(1_800_000_000_000)),
        options,
    )
    .await
    .expect("relay starts")
}

/// Open connections as the relay counts them.
fn open_connections(relay: &RelayHandle) -> i64 {
    relay.metrics().connections.load(Ordering::Relaxed)
}

fn stored_seqs(f: ServerFrame) -> Vec<u64> {
    match f {
        ServerFrame::Response {
            response: Response::Sent { outcomes },
            ..
        } => outcomes
            .iter()
            .map(|o| match o {
                SendOutcome::Stored { seq, .. } => *seq,
                other => panic!("not stored: {other:?}"),
            })
            .collect(),
        other => panic!("expected Sent, got {other:?}"),
    }
}

/// The `Closing` code among the frames left on a client's stream.
async fn closing_code(client: &mut Client) -> Option<ErrorCode> {
    let mut code = None;
    while let Some(f) = client.next_frame().await {
        if let ServerFrame::Closing { code: c, .. } = f {
            code = Some(c);
        }
    }
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_session_and_a_native_client_talk_through_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir, false, StartOptions::default()).await;
    let (alice, bob) = (Device::new(1), Device::new(2));

    // Alice as a browser, Bob native, both on the one UDP port.
    let mut browser =
        Client::connect_webtransport(relay.quic_addr(), &relay.cert_sha256_hex()).await;
    let mut native = Client::connect(relay.quic_addr(), &relay.cert_der()).await;
    assert!(matches!(browser.transport, Transport::WebTransport { .. }));
    alice.register(&mut browser).await;
    bob.register(&mut native).await;
    assert_eq!(open_connections(&relay), 2);

    // Bob goes live; Alice's send reaches him as a push.
    let f = native
        .request(Request::Pull {
            after: 0,
            limit: 100,
            ack: 0,
        })
        .await;
    assert!(
        matches!(&f, ServerFrame::Response { response: Response::Page(p), .. } if p.remaining == 0)
    );
    let f = browser
        .request(Request::Send {
            envelopes: vec![alice.envelope_to(&bob, 1)],
        })
        .await;
    assert_eq!(stored_seqs(f), vec![1]);
    match native.next_frame().await.expect("a push") {
        ServerFrame::Push { envelopes } => {
            assert_eq!(envelopes.len(), 1);
            assert_eq!(envelopes[0].seq, 1);
            assert_eq!(envelopes[0].envelope, alice.envelope_to(&bob, 1));
        }
        other => panic!("expected a push, got {other:?}"),
    }

    // Bob answers; Alice pulls it over WebTransport and acknowledges.
    let f = native
        .request(Request::Send {
            envelopes: vec![bob.envelope_to(&alice, 1), bob.envelope_to(&alice, 2)],
        })
        .await;
    assert_eq!(stored_seqs(f), vec![1, 2]);
    match browser
        .request(Request::Pull {
            after: 0,
            limit: 100,
            ack: 0,
        })
        .await
    {
        ServerFrame::Response {
            response: Response::Page(page),
            ..
        } => {
            let got: Vec<_> = page.envelopes.iter().map(|d| d.envelope.clone()).collect();
            assert_eq!(
                got,
                vec![bob.envelope_to(&alice, 1), bob.envelope_to(&alice, 2)]
            );
            assert_eq!(page.remaining, 0);
        }
        other => panic!("expected a page, got {other:?}"),
    }
    let f = browser.request(Request::Ack { up_to: 2 }).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Acked { up_to: 2 },
            ..
        }
    ));

    // Graceful shutdown tells the browser too.
    let shutdown = tokio::spawn(relay.shutdown());
    assert_eq!(
        closing_code(&mut browser).await,
        Some(ErrorCode::ShuttingDown)
    );
    assert_eq!(
        closing_code(&mut native).await,
        Some(ErrorCode::ShuttingDown)
    );
    within("shutdown", shutdown).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moves_between_transports_and_ended_sessions_free_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir, false, StartOptions::default()).await;
    let carol = Device::new(3);

    // Registered natively, then the same device opens a browser session:
    // the newer connection replaces the older, across transports.
    let mut native = Client::connect(relay.quic_addr(), &relay.cert_der()).await;
    carol.register(&mut native).await;
    let mut browser =
        Client::connect_webtransport(relay.quic_addr(), &relay.cert_sha256_hex()).await;
    let f = carol.auth(&mut browser).await;
    assert!(
        matches!(
            f,
            ServerFrame::Response {
                response: Response::Authenticated(_),
                ..
            }
        ),
        "{f:?}"
    );
    assert_eq!(closing_code(&mut native).await, Some(ErrorCode::Replaced));
    // And back: a native connection replaces the browser session.
    let mut native2 = Client::connect(relay.quic_addr(), &relay.cert_der()).await;
    let f = carol.auth(&mut native2).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Authenticated(_),
            ..
        }
    ));
    assert_eq!(closing_code(&mut browser).await, Some(ErrorCode::Replaced));
    drop(native2);
    eventually("replaced connections to be closed", || async {
        (open_connections(&relay) == 0).then_some(())
    })
    .await;

    // A browser that finishes its stream gets its pending answers, then a
    // clean close ("bye", code 0).
    let mut browser =
        Client::connect_webtransport(relay.quic_addr(), &relay.cert_sha256_hex()).await;
    let f = carol.auth(&mut browser).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Authenticated(_),
            ..
        }
    ));
    browser.send_request(Request::Ping).await;
    browser.finish().await;
    assert!(matches!(
        browser.next_frame().await,
        Some(ServerFrame::Response {
            response: Response::Pong { .. },
            ..
        })
    ));
    assert!(browser.next_frame().await.is_none(), "then the stream ends");
    let Transport::WebTransport { conn, .. } = &browser.transport else {
        panic!("a WebTransport client");
    };
    match within("the relay's close", conn.closed()).await {
        wtransport::error::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.code(), wtransport::VarInt::from_u32(0));
        }
        other => panic!("expected an application close, got {other:?}"),
    }

    // A browser that goes away without a word (tab closed, session closed):
    // the relay ends that connection and the device is free.
    let mut browser =
        Client::connect_webtransport(relay.quic_addr(), &relay.cert_sha256_hex()).await;
    let f = carol.auth(&mut browser).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Authenticated(_),
            ..
        }
    ));
    assert_eq!(open_connections(&relay), 1);
    let Transport::WebTransport { conn, .. } = &browser.transport else {
        panic!("a WebTransport client");
    };
    conn.close(wtransport::VarInt::from_u32(0), b"tab closed");
    eventually("the closed session's connection to end", || async {
        (open_connections(&relay) == 0).then_some(())
    })
    .await;
    // The device connects again as if nothing happened.
    let mut again = Client::connect_webtransport(relay.quic_addr(), &relay.cert_sha256_hex()).await;
    let f = carol.auth(&mut again).await;
    assert!(matches!(
        f,
        ServerFrame::Response {
            response: Response::Authenticated(_),
            ..
        }
    ));
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_off_the_root_path_are_refused_with_404() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir, false, StartOptions::default()).await;
    let endpoint = webtransport_endpoint(&relay.cert_sha256_hex());
    for path in ["/chat", "/index.html"] {
        let url = format!("https://{}{path}", relay.quic_addr());
        match within("a refusal", endpoint.connect(url)).await {
            Err(wtransport::error::ConnectingError::SessionRejected) => {}
            Err(other) => panic!("{path}: expected a 404 rejection, got {other}"),
            Ok(_) => panic!("{path}: session accepted"),
        }
    }
    eventually("refused connections to be closed", || async {
        (open_connections(&relay) == 0).then_some(())
    })
    .await;
    // A wrong certificate hash is refused by the client, as a browser would.
    let wrong = webtransport_endpoint(&"00".repeat(32));
    let url = format!("https://{}/", relay.quic_addr());
    assert!(within("a TLS failure", wrong.connect(url)).await.is_err());
    // The root path works with a query string too.
    let url = format!("https://{}/?v=1", relay.quic_addr());
    within("a session", endpoint.connect(url))
        .await
        .expect("session on / with a query");
    relay.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_json_says_where_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir, false, StartOptions::default()).await;
    let http = relay.http_addr().expect("HTTP enabled");
    let (status, head, body) = http_get(http, "GET /relay.json HTTP/1.1").await;
    assert_eq!(status, 200);
    assert!(head.contains("Content-Type: application/json"), "{head}");
    assert!(head.contains("Access-Control-Allow-Origin: *"), "{head}");
    assert!(head.contains("Cache-Control: no-store"), "{head}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let quic = relay.quic_addr().to_string();
    assert_eq!(info["quic"], quic.as_str());
    assert_eq!(info["webtransport"], format!("https://{quic}/").as_str());
    assert_eq!(info["certificateSha256"], relay.cert_sha256_hex().as_str());
    // Without --demo there is no page.
    assert_eq!(http_get(http, "GET / HTTP/1.1").await.0, 404);
    relay.shutdown().await.unwrap();
}

static FAKE_DEMO: &[(&str, &[u8])] = &[
    ("/app.js", b"export {};\n"),
    ("/index.html", b"<!doctype html><title>t</title>"),
    ("/pkg/hush_client.js", b"export default 1;\n"),
    ("/pkg/hush_client_bg.wasm", b"\0asm\x01\0\0\0"),
    ("/style.css", b"body{}\n"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_files_are_served_with_their_types() {
    let dir = tempfile::tempdir().unwrap();
    let options = StartOptions {
        static_files: Some(Arc::new(DemoFiles::from_table(FAKE_DEMO, true))),
        ..StartOptions::default()
    };
    let relay = start(&dir, true, options).await;
    let http = relay.http_addr().expect("HTTP enabled");
    for (path, content_type, body) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<!doctype html><title>t</title>",
        ),
        ("/app.js", "text/javascript; charset=utf-8", "export {};\n"),
        ("/style.css", "text/css; charset=utf-8", "body{}\n"),
        (
            "/pkg/hush_client_bg.wasm",
            "application/wasm",
            "\0asm\x01\0\0\0",
        ),
    ] {
        let (status, head, got) = http_get(http, &format!("GET {path} HTTP/1.1")).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains(&format!("Content-Type: {content_type}\r\n")),
            "{path}: {head}"
        );
        assert!(
            head.contains("Cache-Control: no-cache\r\n"),
            "{path}: {head}"
        );
        assert_eq!(got, body, "{path}");
    }
    assert_eq!(http_get(http, "GET /missing.js HTTP/1.1").await.0, 404);
    assert_eq!(http_get(http, "GET /../Cargo.toml HTTP/1.1").await.0, 404);
    // The relay's own endpoints still answer beside the page.
    assert_eq!(http_get(http, "GET /relay.json HTTP/1.1").await.0, 200);
    relay.shutdown().await.unwrap();
}

/// `--demo` without files of the caller's serves the demo built into the
/// binary: the page when `web-demo/pkg/` was built, otherwise how to build it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_flag_serves_the_embedded_demo() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(&dir, true, StartOptions::default()).await;
    let http = relay.http_addr().expect("HTTP enabled");
    let (status, head, body) = http_get(http, "GET / HTTP/1.1").await;
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8"),
        "{head}"
    );
    let demo = DemoFiles::embedded();
    if demo.is_built() {
        assert_eq!(status, 200);
        let disk = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../web-demo/index.html"
        ))
        .unwrap();
        assert_eq!(body, disk);
        let wasm = demo
            .paths()
            .find(|p| p.ends_with(".wasm"))
            .expect("a wasm module");
        let (status, head, _) = http_get(http, &format!("GET {wasm} HTTP/1.1")).await;
        assert_eq!(status, 200);
        assert!(head.contains("Content-Type: application/wasm"), "{head}");
    } else {
        assert_eq!(status, 503);
        assert!(body.contains("cargo xtask build-wasm"), "{body}");
    }
    relay.shutdown().await.unwrap();
}
