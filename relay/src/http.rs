//! A small HTTP/1.1 listener for operators and browsers.
//!
//! - `GET /healthz` → `ok`
//! - `GET /metrics` → Prometheus text
//! - `GET /certificate.sha256` → hex SHA-256 of the current certificate (what
//!   a browser page pins for WebTransport to a self-signed relay)
//! - anything else → served from [`StaticFiles`] when the demo is enabled
//!   and built in, 404 otherwise.
//!
//! Hand-written on a TCP listener because it needs so little: one request
//! per connection (`Connection: close`), request line and headers capped at
//! 8 KiB and a read timeout, no bodies. It binds to whatever `--http` says;
//! keep it on a private address if the metrics should stay private.

use crate::metrics::Metrics;
use crate::tls::CertState;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Longest request head (request line + headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time allowed to send the request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests served at once; more wait for a slot.
pub const MAX_CONCURRENT: usize = 64;

/// One static file.
#[derive(Debug, Clone)]
pub struct StaticFile {
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
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// The certificate in use.
    pub cert: Arc<CertState>,
    /// Called (on a blocking thread) before rendering metrics, to sample gauges.
    pub refresh_metrics: Option<Arc<dyn Fn() + Send + Sync>>,
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
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { break };
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let _permit = permit;
                    handle(stream, &state).await;
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
    extra: &'static str,
}

impl Reply {
    fn text(status: &'static str, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: Cow::Borrowed("text/plain; charset=utf-8"),
            body: Cow::Owned(body.into().into_bytes()),
            extra: "",
        }
    }
}

async fn handle(mut stream: TcpStream, state: &HttpState) {
    let reply = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => route(&head, state).await,
        Ok(Err(reply)) => reply,
        Err(_) => Reply::text("408 Request Timeout", "request timeout\n"),
    };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\n{}Connection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len(),
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
        "/healthz" => Reply::text("200 OK", "ok\n"),
        "/metrics" => {
            if let Some(refresh) = &state.refresh_metrics {
                let refresh = Arc::clone(refresh);
                let _ = tokio::task::spawn_blocking(move || refresh()).await;
            }
            Reply {
                status: "200 OK",
                content_type: Cow::Borrowed("text/plain; version=0.0.4; charset=utf-8"),
                body: Cow::Owned(state.metrics.render().into_bytes()),
                extra: "",
            }
        }
        "/certificate.sha256" => {
            let mut r = Reply::text("200 OK", format!("{}\n", state.cert.get().sha256_hex));
            // Public information; pages on other origins may pin it too.
            r.extra = "Access-Control-Allow-Origin: *\r\n";
            r
        }
        _ => match state.static_files.as_ref().and_then(|s| s.get(path)) {
            Some(file) => Reply {
                status: "200 OK",
                content_type: file.content_type,
                body: file.body,
                extra: "",
            },
            None => Reply::text("404 Not Found", "not found\n"),
        },
    }
}
