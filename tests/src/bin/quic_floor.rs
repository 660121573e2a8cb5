//! `quic_floor`: what one page round trip costs the transport alone.
//!
//! Job B of the peer benchmark drains 100,000 × 1 KiB in pages of 200, one
//! page in flight: a small request, ~225 KB back, over and over. This bench
//! does exactly that traffic with nothing else: a server process (this
//! binary with `serve`) on the relay's own QUIC settings (its TLS config,
//! transport config and 8 MiB UDP buffers) answers each 8-byte request with
//! that many bytes from memory, and the client reads them as the load
//! generator reads a page. No store, no framing, no envelopes: the time per
//! round trip here is the floor under the relay's, and `200 / that` the
//! most msgs/s any relay on quinn could reach in job B on this host.
//!
//! ```text
//! cargo run --release -p hush-tests --bin quic_floor -- [--bytes N] [--pages P] [--runs R] [--fresh]
//! ```
//!
//! Defaults: 225,000 bytes (a page of 200 envelopes of 1 KiB with their
//! headers and framing), 500 pages (one drain of 100,000), 3 runs on one
//! connection; `--fresh` gives every run a new connection of the same two
//! (by then warm) processes, as job B's reader connects only to drain.
//! Timed here, never in tests.

use hush_protocol::ALPN_HUSH;
use hush_relay::server::quic::server_config;
use hush_relay::tls::{generate_dev_cert, parse_pem};
use hush_tests::tls::{cert_sha256, client_config};
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
}

fn parse() -> BenchResult<Args> {
    let mut args = Args {
        bytes: 225_000,
        pages: 500,
        runs: 3,
        fresh: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> BenchResult<usize> {
            Ok(it.next().ok_or(format!("{flag} needs a value"))?.parse()?)
        };
        match flag.as_str() {
            "--bytes" => args.bytes = value()?,
            "--pages" => args.pages = value()?,
            "--runs" => args.runs = value()?,
            "--fresh" => args.fresh = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.bytes == 0 || args.pages == 0 || args.runs == 0 {
        return Err("--bytes, --pages and --runs must be positive".into());
    }
    Ok(args)
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
/// answers every 8-byte request on every stream with that many bytes.
async fn serve() -> BenchResult<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let (cert, key) = generate_dev_cert(now)?;
    let material = parse_pem(cert.as_bytes(), key.as_bytes())?;
    let hash = cert_sha256(material.chain.first().ok_or("no certificate")?.as_ref());
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
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
                    let mut payload = Vec::new();
                    let mut ask = [0u8; 8];
                    while recv.read_exact(&mut ask).await.is_ok() {
                        let n = u64::from_le_bytes(ask) as usize;
                        payload.resize(n, 0xC5);
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
        send.write_all(&(bytes as u64).to_le_bytes()).await?;
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

async fn client(args: &Args) -> BenchResult<()> {
    let exe = std::env::current_exe()?;
    let mut server = Command::new(exe)
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let result = async {
        let stdout = server.stdout.take().ok_or("server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let (port, hex) = line.trim().split_once(' ').ok_or("server said nothing")?;
        let port: u16 = port.parse()?;
        let mut hash = [0u8; 32];
        for (i, b) in hash.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or("short hash")?, 16)?;
        }
        let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
        endpoint.set_default_client_config(client_config(
            hash,
            ALPN_HUSH,
            Duration::from_secs(30),
        )?);
        let server_addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut conn = endpoint.connect(server_addr, "localhost")?.await?;
        println!(
            "quic_floor: {} round trips of a small request and {} bytes back, {} runs \
             (server: the relay's TLS and transport config, separate process)",
            args.pages, args.bytes, args.runs
        );
        let mut rates = Vec::new();
        for run in 1..=args.runs {
            if args.fresh && run > 1 {
                conn.close(0u32.into(), b"next run");
                conn = endpoint.connect(server_addr, "localhost")?.await?;
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
        Ok::<(), Box<dyn Error + Send + Sync>>(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    result
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
