//! `quic_floor`: what the peer benchmark's traffic costs the transport alone.
//!
//! **Job B** (the default) of the peer benchmark drains 100,000 × 1 KiB in pages of 200, one
//! page in flight: a small request, ~225 KB back, over and over. This bench
//! does exactly that traffic with nothing else: a server process (this
//! binary with `serve`) on the relay's own QUIC settings (its TLS config,
//! transport config and 8 MiB UDP buffers) answers each 8-byte request with
//! that many bytes from memory, and the client reads them as the load
//! generator reads a page. No store, no framing, no envelopes: the time per
//! round trip here is the floor under the relay's, and `200 / that` the
//! most msgs/s any relay on quinn could reach in job B on this host.
//!
//! **Job A** (`--ingest`): 64 producers, each on its own endpoint and
//! connection, keep `--inflight` requests in flight on one stream; every
//! request is the bytes of a real `Send` frame of one 1 KiB envelope and is
//! answered, as soon as it has arrived, with as many bytes as the relay's
//! `Sent` answer. No store, no decoding, no commit: the msgs/s here is the
//! most a relay on quinn could acknowledge in job A on this host, with the
//! same load generator shape (`peer_load`'s producers, on tokio's
//! multi-threaded runtime).
//!
//! ```text
//! cargo run --release -p hush-tests --bin quic_floor -- [--bytes N] [--pages P] [--runs R] [--fresh]
//! cargo run --release -p hush-tests --bin quic_floor -- --ingest [--inflight W] [--producers P] [--secs S] [--runs R]
//! ```
//!
//! Defaults: 225,000 bytes (a page of 200 envelopes of 1 KiB with their
//! headers and framing), 500 pages (one drain of 100,000), 3 runs on one
//! connection; `--fresh` gives every run a new connection of the same two
//! (by then warm) processes, as job B's reader connects only to drain.
//! With `--ingest`: 64 producers, 16 in flight, 10 s, 3 runs (new
//! connections for every run). Timed here, never in tests.

use hush_protocol::{
    ALPN_HUSH, ClientFrame, MessageId, Request, Response, SendOutcome, ServerFrame,
    encode_client_frame, encode_server_frame,
};
use hush_relay::server::quic::server_config;
use hush_relay::tls::{generate_dev_cert, parse_pem};
use hush_tests::tls::{cert_sha256, client_config};
use hush_tests::{DeviceIdentity, conversation, make_envelope_sized};
use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// UDP buffers as the relay asks for them (`hush_relay::server::UDP_BUFFER_BYTES`).
const UDP_BUFFER: usize = 8 << 20;

struct Args {
    bytes: usize,
    pages: usize,
    runs: usize,
    /// A new connection for every run (the processes stay warm).
    fresh: bool,
    /// Job A's traffic instead of job B's.
    ingest: bool,
    producers: usize,
    inflight: usize,
    secs: f64,
}

fn parse() -> BenchResult<Args> {
    let mut args = Args {
        bytes: 225_000,
        pages: 500,
        runs: 3,
        fresh: false,
        ingest: false,
        producers: 64,
        inflight: 16,
        secs: 10.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value =
            || -> BenchResult<String> { Ok(it.next().ok_or(format!("{flag} needs a value"))?) };
        match flag.as_str() {
            "--bytes" => args.bytes = value()?.parse()?,
            "--pages" => args.pages = value()?.parse()?,
            "--runs" => args.runs = value()?.parse()?,
            "--fresh" => args.fresh = true,
            "--ingest" => args.ingest = true,
            "--producers" => args.producers = value()?.parse()?,
            "--inflight" => args.inflight = value()?.parse()?,
            "--secs" => args.secs = value()?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.bytes == 0
        || args.bytes > u32::MAX as usize
        || args.pages == 0
        || args.runs == 0
        || args.producers == 0
        || args.inflight == 0
        || !args.secs.is_finite()
        || args.secs <= 0.0
    {
        return Err(
            "--bytes (at most 4 GiB), --pages, --runs, --producers, --inflight and --secs \
             must be positive"
                .into(),
        );
    }
    Ok(args)
}

/// A request on the wire: `body length (u32 LE) ‖ answer length (u32 LE) ‖
/// body`. The server reads the body whole, then writes that many bytes.
fn request(body: &[u8], answer: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&(answer as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn udp_socket() -> BenchResult<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The server process: prints `<port> <certificate sha256 hex>`, then
/// answers every [`request`] on every stream as it asks.
async fn serve() -> BenchResult<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let (cert, key) = generate_dev_cert(now)?;
    let material = parse_pem(cert.as_bytes(), key.as_bytes())?;
    let hash = cert_sha256(material.chain.first().ok_or("no certificate")?.as_ref());
    let endpoint = quinn::Endpoint::new(
        hush_relay::server::quic::endpoint_config()?,
        Some(server_config(&material)?),
        udp_socket()?,
        Arc::new(quinn::TokioRuntime),
    )?;
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    println!("{} {hex}", endpoint.local_addr()?.port());
    std::io::stdout().flush()?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut body = Vec::new();
                    let mut payload = Vec::new();
                    let mut head = [0u8; 8];
                    while recv.read_exact(&mut head).await.is_ok() {
                        let [b0, b1, b2, b3, a0, a1, a2, a3] = head;
                        body.resize(u32::from_le_bytes([b0, b1, b2, b3]) as usize, 0);
                        if recv.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        payload.resize(u32::from_le_bytes([a0, a1, a2, a3]) as usize, 0xC5);
                        if send.write_all(&payload).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    Ok(())
}

/// One drain: `pages` round trips of `bytes`; returns each one's time.
async fn drain(conn: &quinn::Connection, bytes: usize, pages: usize) -> BenchResult<Vec<Duration>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut times = Vec::with_capacity(pages);
    for _ in 0..pages {
        let start = Instant::now();
        send.write_all(&request(&[], bytes)).await?;
        let mut got = 0;
        while got < bytes {
            let want = (bytes - got).min(chunk.len());
            match recv.read(&mut chunk[..want]).await? {
                Some(n) => got += n,
                None => return Err("server finished the stream".into()),
            }
        }
        times.push(start.elapsed());
    }
    send.finish()?;
    Ok(times)
}

/// A started `serve` process and what a client needs to reach it.
struct Server {
    child: std::process::Child,
    addr: SocketAddr,
    cert_sha256: [u8; 32],
}

impl Server {
    fn start() -> BenchResult<Server> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut read = || -> BenchResult<(u16, [u8; 32])> {
            let stdout = child.stdout.take().ok_or("server stdout")?;
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            let (port, hex) = line.trim().split_once(' ').ok_or("server said nothing")?;
            let mut hash = [0u8; 32];
            for (i, b) in hash.iter_mut().enumerate() {
                *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or("short hash")?, 16)?;
            }
            Ok((port.parse()?, hash))
        };
        match read() {
            Ok((port, cert_sha256)) => Ok(Server {
                child,
                addr: ([127, 0, 0, 1], port).into(),
                cert_sha256,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// A client endpoint of its own (a UDP socket, as each of `peer_load`'s
    /// devices has) and a connection from it.
    async fn connect(&self) -> BenchResult<(quinn::Endpoint, quinn::Connection)> {
        let mut endpoint = hush_tests::tls::client_endpoint(([127, 0, 0, 1], 0).into())?;
        endpoint.set_default_client_config(client_config(
            self.cert_sha256,
            ALPN_HUSH,
            Duration::from_secs(30),
        )?);
        let conn = endpoint.connect(self.addr, "localhost")?.await?;
        Ok((endpoint, conn))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client_drain(args: &Args, server: &Server) -> BenchResult<()> {
    let (endpoint, mut conn) = server.connect().await?;
    println!(
        "quic_floor: {} round trips of a small request and {} bytes back, {} runs \
         (server: the relay's TLS and transport config, separate process)",
        args.pages, args.bytes, args.runs
    );
    let mut rates = Vec::new();
    for run in 1..=args.runs {
        if args.fresh && run > 1 {
            conn.close(0u32.into(), b"next run");
            conn = endpoint.connect(server.addr, "localhost")?.await?;
        }
        let mut times = drain(&conn, args.bytes, args.pages).await?;
        let total: Duration = times.iter().sum();
        times.sort();
        let p50 = times[times.len() / 2];
        let per_page = total / args.pages as u32;
        let equivalent = 200.0 * args.pages as f64 / total.as_secs_f64();
        println!(
            "run {run}: {:.3} s, mean {:.3} ms, p50 {:.3} ms per round trip; \
             {:.0} MB/s; at 200 envelopes a page: {equivalent:.0} msgs/s",
            total.as_secs_f64(),
            per_page.as_secs_f64() * 1e3,
            p50.as_secs_f64() * 1e3,
            (args.bytes * args.pages) as f64 / total.as_secs_f64() / 1e6,
        );
        rates.push(equivalent);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median: {:.0} msgs/s equivalent (the transport's ceiling for job B)",
        rates[rates.len() / 2]
    );
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(())
}

/// The encoded sizes of job A's traffic: a `Send` of one 1 KiB envelope
/// (as `peer_load` builds it) and the relay's `Sent` answer to it.
fn ingest_sizes() -> BenchResult<(Vec<u8>, usize)> {
    let sender = DeviceIdentity::from_seed(20_000).device();
    let recipient = DeviceIdentity::from_seed(10_000).device();
    let mut envelope = make_envelope_sized(sender, recipient, conversation(1), 1, 1024, 0x3c);
    envelope.header.message_id = MessageId::new(1_700_000_000_000, [7; 10]);
    let message_id = envelope.header.message_id;
    let send = encode_client_frame(&ClientFrame {
        request_id: 123_456,
        request: Request::Send {
            envelopes: vec![envelope],
        },
    })?;
    let sent = encode_server_frame(&ServerFrame::Response {
        request_id: 123_456,
        response: Response::Sent {
            outcomes: vec![SendOutcome::Stored {
                message_id,
                recipient,
                seq: 123_456,
                duplicate: false,
            }],
        },
    })?;
    Ok((send, sent.len()))
}

/// One producer: `window` requests in flight on one stream until `until`;
/// returns each answered request's round trip in µs.
async fn produce(
    conn: quinn::Connection,
    frame: Arc<Vec<u8>>,
    answer: usize,
    window: usize,
    until: Instant,
) -> BenchResult<Vec<u32>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut sent_at = std::collections::VecDeque::with_capacity(window);
    let mut reply = vec![0u8; answer];
    let mut lat = Vec::new();
    loop {
        while sent_at.len() < window && Instant::now() < until {
            sent_at.push_back(Instant::now());
            send.write_all(&frame).await?;
        }
        let Some(t0) = sent_at.pop_front() else {
            break;
        };
        recv.read_exact(&mut reply).await?;
        lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    send.finish()?;
    Ok(lat)
}

async fn client_ingest(args: &Args, server: &Server) -> BenchResult<()> {
    let (send, answer) = ingest_sizes()?;
    let frame = Arc::new(request(&send, answer));
    println!(
        "quic_floor --ingest: {} producers, {} requests of {} bytes in flight each, \
         answered with {answer} bytes, {} s, {} runs (server: the relay's TLS and \
         transport config, separate process; client: one endpoint per producer)",
        args.producers,
        args.inflight,
        send.len(),
        args.secs,
        args.runs
    );
    let mut rates = Vec::new();
    for run in 1..=args.runs {
        let mut conns = Vec::with_capacity(args.producers);
        for _ in 0..args.producers {
            conns.push(server.connect().await?);
        }
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(args.secs);
        let tasks: Vec<_> = conns
            .iter()
            .map(|(_, conn)| {
                tokio::spawn(produce(
                    conn.clone(),
                    Arc::clone(&frame),
                    answer,
                    args.inflight,
                    until,
                ))
            })
            .collect();
        let mut lat = Vec::new();
        for task in tasks {
            lat.extend(task.await??);
        }
        let secs = start.elapsed().as_secs_f64();
        if lat.is_empty() {
            return Err("no request was answered".into());
        }
        lat.sort_unstable();
        let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1e3;
        let rate = lat.len() as f64 / secs;
        println!(
            "run {run}: {} answered in {secs:.2} s: {rate:.0} msgs/s; round trip p50 {:.2} ms, \
             p99 {:.2} ms, p99.9 {:.2} ms",
            lat.len(),
            pct(0.5),
            pct(0.99),
            pct(0.999),
        );
        rates.push(rate);
        for (endpoint, conn) in conns {
            conn.close(0u32.into(), b"next run");
            endpoint.wait_idle().await;
        }
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median: {:.0} msgs/s (the transport's ceiling for job A at {} in flight)",
        rates[rates.len() / 2],
        args.inflight
    );
    Ok(())
}

async fn client(args: &Args) -> BenchResult<()> {
    let server = Server::start()?;
    if args.ingest {
        client_ingest(args, &server).await
    } else {
        client_drain(args, &server).await
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let result = if std::env::args().nth(1).as_deref() == Some("serve") {
        serve().await
    } else {
        match parse() {
            Ok(args) => client(&args).await,
            Err(e) => Err(e),
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quic_floor: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
