//! A small HTTP/1.1 listener for operators and browsers.
//!
//! - `GET /healthz` → `ok`
//! - `GET /metrics` → Prometheus text
//! - `GET /certificate.sha256` → hex SHA-256 of the current certificate (what
//!   a browser page pins for WebTransport to a self-signed relay)
//! - `GET /relay.json` → where and how a page reaches the relay:
//!   `{"quic":"HOST:PORT","webtransport":"https://HOST:PORT/","certificateSha256":"HEX"}`,
//!   plus `"websocket":"wss://HOST:PORT/ws"` when the TLS WebSocket listener
//!   is on and `"websocketPlain":"ws://HOST:PORT/ws"` (this listener's own
//!   origin) when plain WebSocket upgrades are on
//! - `GET /ws` with a WebSocket upgrade → handed to the relay's WebSocket
//!   transport ([`crate::server::websocket`]) when plain WebSocket upgrades
//!   are on (a loopback listener, or `--http-ws`), 404 otherwise
//! - anything else → served from [`StaticFiles`] when the demo is enabled
//!   (`--demo`, see [`crate::demo`]), 404 otherwise.
//!
//! Hand-written on a TCP listener because it needs so little: one request
//! per connection (`Connection: close`), request line and headers capped at
//! 8 KiB and a read timeout, no bodies. It binds to whatever `--http` says;
//! keep it on a private address if the metrics should stay private.
//!
//! Idle and slow clients (slowloris) cannot starve it: the listener always
//! accepts, at most [`MAX_CONNECTIONS`] connections are open at once, and
//! when a new one arrives at that bound the oldest connection still sending
//! its request head is dropped to make room (if every open connection is
//! past its head, the new one is refused instead). The whole head must
//! arrive within [`READ_TIMEOUT`], however slowly it trickles.

use crate::metrics::Metrics;
use crate::server::websocket::{self, PlainUpgrade};
use crate::tls::CertState;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// Longest request head (request line + headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time allowed to send the whole request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once; at the bound, the oldest one still sending its
/// head makes room for a new one.
pub const MAX_CONNECTIONS: usize = 128;

/// The open connections, and those of them still sending their head (by
/// age), which may be dropped for a newer one.
#[derive(Default)]
struct Slots {
    open: usize,
    next_id: u64,
    reading: BTreeMap<u64, oneshot::Sender<()>>,
}

/// One open connection's place in [`Slots`]; dropping it frees the place.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    id: u64,
}

fn lock_slots(slots: &Mutex<Slots>) -> std::sync::MutexGuard<'_, Slots> {
    // Updates are single map and counter operations: nothing to poison.
    slots.lock().unwrap_or_else(|e| e.into_inner())
}

impl Slot {
    /// Take a place for a new connection: at the bound, drop the oldest one
    /// still reading its head. `None` when every open connection is past
    /// its head. The receiver fires if this connection is dropped later.
    fn admit(
        slots: &Arc<Mutex<Slots>>,
        metrics: &Metrics,
    ) -> Option<(Slot, oneshot::Receiver<()>)> {
        let mut s = lock_slots(slots);
        if s.open >= MAX_CONNECTIONS {
            metrics.http_dropped_total.fetch_add(1, Ordering::Relaxed);
            let (_, oldest) = s.reading.pop_first()?;
            let _ = oldest.send(());
        }
        let id = s.next_id;
        s.next_id += 1;
        s.open += 1;
        let (tx, rx) = oneshot::channel();
        s.reading.insert(id, tx);
        Some((
            Slot {
                slots: Arc::clone(slots),
                id,
            },
            rx,
        ))
    }

    /// The head arrived: this connection is no longer dropped for newer ones.
    fn head_read(&self) {
        lock_slots(&self.slots).reading.remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = lock_slots(&self.slots);
        s.open = s.open.saturating_sub(1);
        s.reading.remove(&self.id);
    }
}

/// One static file.
#[derive(Debug, Clone)]
pub struct StaticFile {
    /// Status line, e.g. `200 OK` (or `503 Service Unavailable` for a page
    /// that explains why the real one is missing).
    pub status: &'static str,
    /// `Content-Type` header value.
    pub content_type: Cow<'static, str>,
    /// The bytes.
    pub body: Cow<'static, [u8]>,
}

/// A source of static files (e.g. the demo page embedded in the binary).
pub trait StaticFiles: Send + Sync + 'static {
    /// The file for a request path (`/`, `/app.js`, …), if any.
    fn get(&self, path: &str) -> Option<StaticFile>;
}

/// What the HTTP handlers read.
pub struct HttpState {
    /// The bound address of the QUIC endpoint (advertised by `/relay.json`).
    pub quic_addr: SocketAddr,
    /// The bound address of the TLS WebSocket listener, if any (advertised).
    pub ws_addr: Option<SocketAddr>,
    /// Where `GET /ws` upgrades go; `None` = plain WebSocket upgrades off.
    pub websocket: Option<tokio::sync::mpsc::Sender<PlainUpgrade>>,
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The certificate in use.
    pub cert: Arc<CertState>,
    /// Called (on a blocking thread) before rendering metrics, to sample gauges.
    pub refresh_metrics: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Why the relay cannot serve sends until it is restarted, if it cannot
    /// (`GET /healthz` then answers 503 with the reason).
    pub failure: Option<Arc<dyn Fn() -> Option<String> + Send + Sync>>,
    /// Served for other paths when set.
    pub static_files: Option<Arc<dyn StaticFiles>>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("static_files", &self.static_files.is_some())
            .finish_non_exhaustive()
    }
}

/// Serve until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, remote)) = accepted else { continue };
                // Dropping the stream refuses the connection.
                let Some((slot, dropped)) = Slot::admit(&slots, &state.metrics) else { continue };
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    handle(stream, remote, &state, slot, dropped).await;
                });
            }
            _ = shutdown.changed() => break,
        }
    }
}

struct Reply {
    status: &'static str,
    content_type: Cow<'static, str>,
    body: Cow<'static, [u8]>,
    /// `no-store` for live values; `no-cache` (revalidate every time) for
    /// the demo's files, so a rebuilt relay's page is never stale.
    cache: &'static str,
    extra: &'static str,
}

impl Reply {
    fn text(status: &'static str, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: Cow::Borrowed("text/plain; charset=utf-8"),
            body: Cow::Owned(body.into().into_bytes()),
            cache: "no-store",
            extra: "",
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    remote: SocketAddr,
    state: &HttpState,
    slot: Slot,
    dropped: oneshot::Receiver<()>,
) {
    let read = tokio::select! {
        read = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)) => read,
        // A newer connection needed the place: close without a word.
        _ = dropped => return,
    };
    slot.head_read();
    if let (Ok(Ok(head)), Some(upgrades)) = (&read, &state.websocket)
        && websocket::is_ws_request(head)
    {
        // The WebSocket transport takes the connection (and counts it in
        // the relay's connection limits); this listener's slot is freed.
        let up = PlainUpgrade {
            stream,
            remote,
            head: head.clone(),
        };
        match upgrades.try_send(up) {
            Ok(()) => return,
            Err(
                tokio::sync::mpsc::error::TrySendError::Full(up)
                | tokio::sync::mpsc::error::TrySendError::Closed(up),
            ) => {
                stream = up.stream;
                let reply = Reply::text("503 Service Unavailable", "busy; retry\n");
                write_reply(&mut stream, reply).await;
                return;
            }
        }
    }
    let reply = match read {
        Ok(Ok(head)) => route(&head, state).await,
        Ok(Err(reply)) => reply,
        Err(_) => Reply::text("408 Request Timeout", "request timeout\n"),
    };
    write_reply(&mut stream, reply).await;
}

async fn write_reply(stream: &mut TcpStream, reply: Reply) {
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: {}\r\n\
         X-Content-Type-Options: nosniff\r\n{}Connection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.cache,
        reply.extra
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&reply.body).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(READ_TIMEOUT, write).await;
}

/// Read up to the blank line ending the head; the body (if any) is ignored.
async fn read_head(stream: &mut TcpStream) -> Result<String, Reply> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| Reply::text("400 Bad Request", "bad request\n"))?;
        if n == 0 {
            return Err(Reply::text("400 Bad Request", "incomplete request\n"));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(end) = find_blank_line(&buf) {
            buf.truncate(end);
            return String::from_utf8(buf)
                .map_err(|_| Reply::text("400 Bad Request", "request head is not UTF-8\n"));
        }
        if buf.len() > MAX_HEAD {
            return Err(Reply::text(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            ));
        }
    }
}

fn find_blank_line(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n")
}

async fn route(head: &str, state: &HttpState) -> Reply {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Reply::text("400 Bad Request", "bad request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Reply::text("505 HTTP Version Not Supported", "HTTP/1.x only\n");
    }
    if method != "GET" {
        let mut r = Reply::text("405 Method Not Allowed", "only GET\n");
        r.extra = "Allow: GET\r\n";
        return r;
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    match path {
        "/healthz" => match state.failure.as_ref().and_then(|failure| failure()) {
            None => Reply::text("200 OK", "ok\n"),
            Some(why) => Reply::text("503 Service Unavailable", format!("failed: {why}\n")),
        },
        "/metrics" => {
            if let Some(refresh) = &state.refresh_metrics {
                let refresh = Arc::clone(refresh);
                let _ = tokio::task::spawn_blocking(move || refresh()).await;
            }
            Reply {
                status: "200 OK",
                content_type: Cow::Borrowed("text/plain; version=0.0.4; charset=utf-8"),
                body: Cow::Owned(state.metrics.render().into_bytes()),
                cache: "no-store",
                extra: "",
            }
        }
        "/certificate.sha256" => {
            let mut r = Reply::text("200 OK", format!("{}\n", state.cert.get().sha256_hex));
            // Public information; pages on other origins may pin it too.
            r.extra = "Access-Control-Allow-Origin: *\r\n";
            r
        }
        "/relay.json" => {
            let host = header(head, "host");
            let quic = advertised_quic_addr(state.quic_addr, host);
            let mut websockets = String::new();
            if let Some(ws) = state.ws_addr {
                let ws = advertised_quic_addr(ws, host);
                websockets.push_str(&format!(",\"websocket\":\"wss://{ws}/ws\""));
            }
            if state.websocket.is_some()
                && let Some(origin) = host.filter(|h| host_without_port(h).is_some())
            {
                websockets.push_str(&format!(",\"websocketPlain\":\"ws://{origin}/ws\""));
            }
            let body = format!(
                "{{\"quic\":\"{quic}\",\"webtransport\":\"https://{quic}/\",\
                 \"certificateSha256\":\"{}\"{websockets}}}\n",
                state.cert.get().sha256_hex
            );
            Reply {
                status: "200 OK",
                content_type: Cow::Borrowed("application/json"),
                body: Cow::Owned(body.into_bytes()),
                cache: "no-store",
                // Public information, as is the certificate hash.
                extra: "Access-Control-Allow-Origin: *\r\n",
            }
        }
        _ => match state.static_files.as_ref().and_then(|s| s.get(path)) {
            Some(file) => Reply {
                status: file.status,
                content_type: file.content_type,
                body: file.body,
                cache: "no-cache",
                extra: "",
            },
            None => Reply::text("404 Not Found", "not found\n"),
        },
    }
}

/// The value of the first `name` header of a request head (case-insensitive).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// The QUIC address clients should dial, as `host:port`. A relay bound to a
/// specific address names it; one bound to every interface (`0.0.0.0`,
/// `[::]`) names the host the page was fetched from (the `Host` header)
/// with the QUIC port — or the unspecified address if that header is
/// missing or malformed.
pub fn advertised_quic_addr(quic: SocketAddr, host_header: Option<&str>) -> String {
    if !quic.ip().is_unspecified() {
        return quic.to_string();
    }
    match host_header.and_then(host_without_port) {
        Some(host) => format!("{host}:{}", quic.port()),
        None => quic.to_string(),
    }
}

/// The host part of a `Host` header value (`name`, `name:port`, `[v6]`,
/// `[v6]:port`), if it is a plausible DNS name or IP literal. Anything else
/// (quotes, spaces, slashes…) is refused, so the value is safe in JSON and
/// in a URL.
fn host_without_port(value: &str) -> Option<&str> {
    if value.is_empty() || value.len() > 255 {
        return None;
    }
    let host = if let Some(rest) = value.strip_prefix('[') {
        let end = rest.find(']')?;
        let inner = rest.get(..end)?;
        let after = rest.get(end + 1..)?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let ok = !inner.is_empty()
            && port_ok
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        return ok.then(|| value.get(..end + 2)).flatten();
    } else {
        match value.split_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                host
            }
            Some(_) => return None,
            None => value,
        }
    };
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    ok.then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_found_case_insensitively() {
        let head = "GET / HTTP/1.1\r\nhOsT: example.org:8080\r\nX: y";
        assert_eq!(header(head, "Host"), Some("example.org:8080"));
        assert_eq!(header(head, "missing"), None);
        // The request line is not a header.
        assert_eq!(header("GET /a:b HTTP/1.1", "GET /a"), None);
    }

    #[test]
    fn advertised_address() {
        let bound: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        assert_eq!(
            advertised_quic_addr(bound, Some("evil\"x")),
            "127.0.0.1:4433"
        );
        let any: SocketAddr = "0.0.0.0:4433".parse().unwrap();
        assert_eq!(
            advertised_quic_addr(any, Some("chat.example.org:8080")),
            "chat.example.org:4433"
        );
        assert_eq!(
            advertised_quic_addr(any, Some("192.168.1.5")),
            "192.168.1.5:4433"
        );
        assert_eq!(
            advertised_quic_addr(any, Some("[fe80::1]:8080")),
            "[fe80::1]:4433"
        );
        assert_eq!(advertised_quic_addr(any, Some("[::1]")), "[::1]:4433");
        for bad in [
            "",
            "a b",
            "x\"y",
            "host:",
            "host:80:90",
            "[::1",
            "[]:1",
            "[::1]x",
            "a/b",
        ] {
            assert_eq!(
                advertised_quic_addr(any, Some(bad)),
                "0.0.0.0:4433",
                "{bad}"
            );
        }
        assert_eq!(advertised_quic_addr(any, None), "0.0.0.0:4433");
        let any6: SocketAddr = "[::]:4433".parse().unwrap();
        assert_eq!(
            advertised_quic_addr(any6, Some("localhost:8080")),
            "localhost:4433"
        );
        assert_eq!(advertised_quic_addr(any6, None), "[::]:4433");
    }
}
