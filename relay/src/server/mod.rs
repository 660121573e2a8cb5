//! The running relay: QUIC endpoint, group-commit writer, retention purge,
//! certificate renewal and the HTTP listener, wired around one
//! [`RelayCore`].
//!
//! [`RelayHandle::start`] returns once every socket is bound;
//! [`RelayHandle::shutdown`] stops accepting, lets connections finish their
//! pending sends (the writer commits and answers everything already queued),
//! says `Closing{ShuttingDown}` to the rest, closes the endpoint and waits a
//! bounded time for the peers to be told.

pub mod driver;
pub mod guard;
pub mod hub;
pub mod quic;
pub mod websocket;
pub mod webtransport;
pub mod writer;

use crate::clock::Clock;
use crate::config::{Config, WsListen};
use crate::core::{CoreConfig, RelayCore};
use crate::error::RelayError;
use crate::http::{HttpState, StaticFiles};
use crate::metrics::Metrics;
use crate::store::postgres::PgOptions;
use crate::store::redb_store::RedbStore;
use crate::store::{Store, StoreSpec};
use crate::tls::{CertSource, CertState, dev_cert_usable};
use hub::DeviceHub;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "hush.redb";
/// Envelopes removed per purge transaction (a pass loops until done).
pub const PURGE_CHUNK: usize = 1000;

/// State shared by every connection.
pub(crate) struct Shared {
    pub(crate) core: RelayCore<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) hub: Arc<DeviceHub>,
    pub(crate) commits: mpsc::Sender<writer::WriterMsg>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) next_conn_id: AtomicU64,
    /// Connections open at once, in total and per address.
    pub(crate) connections: Arc<guard::ConnectionLimiter>,
    /// Registrations per source address per hour and `FetchPrekeys` per
    /// requesting and per target device per minute: in memory, or shared
    /// by the nodes of a cluster.
    pub(crate) limits: Arc<dyn crate::cluster::limits::RateLimits>,
    /// Pages read ahead of their `Pull`, over all connections (see
    /// [`driver::MAX_READS_AHEAD`]).
    pub(crate) reads_ahead: Arc<tokio::sync::Semaphore>,
}

/// Optional parts a caller can plug into the relay.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Files served on the HTTP listener when `--demo` is on, instead of
    /// the demo embedded at build time.
    pub static_files: Option<Arc<dyn StaticFiles>>,
    /// Run as a node of a cluster: the bus for live push and presence
    /// across nodes, and the shared rate limits.
    pub cluster: Option<crate::cluster::ClusterOptions>,
}

impl std::fmt::Debug for StartOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartOptions")
            .field("static_files", &self.static_files.is_some())
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// How often [`RelayHandle::store_failed`] looks at the store.
pub const STORE_FAILURE_POLL: Duration = Duration::from_millis(200);

/// A running relay.
pub struct RelayHandle {
    quic_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    ws_addr: Option<SocketAddr>,
    cert: Arc<CertState>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    shutdown_tx: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    ws_task: JoinHandle<()>,
    writer_task: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("quic_addr", &self.quic_addr)
            .field("http_addr", &self.http_addr)
            .field("ws_addr", &self.ws_addr)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn create_data_dir(dir: &Path) -> Result<(), RelayError> {
    let err = |source| RelayError::File {
        what: "data directory",
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err)?;
        #[cfg(unix)]
        {
            // Holds the database (routing metadata) and the dev key.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    Ok(())
}

/// The multi-threaded runtime a relay process runs on: `--workers`
/// connection threads, by default one per core but one (the group-commit
/// writer has its own thread; see [`crate::config::default_workers`]).
pub fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            config
                .workers
                .unwrap_or_else(crate::config::default_workers),
        )
        .enable_all()
        .build()
}

impl RelayHandle {
    /// Open the store in the data directory, bind, and start serving.
    /// Returns once the QUIC (and HTTP) sockets are listening.
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<RelayHandle, RelayError> {
        RelayHandle::start_with(config, clock, StartOptions::default()).await
    }

    /// [`RelayHandle::start`] with optional parts.
    pub async fn start_with(
        config: Config,
        clock: Arc<dyn Clock>,
        options: StartOptions,
    ) -> Result<RelayHandle, RelayError> {
        config.validate()?;
        create_data_dir(&config.data_dir)?;
        let mut limits = config.store_limits();
        let auto_cap = config.max_store_bytes.is_none();
        let segment_bytes = config.segment_bytes;
        match config.store_spec() {
            StoreSpec::Redb(dir) => {
                create_data_dir(&dir)?;
                let path = dir.join(DB_FILE);
                let store = tokio::task::spawn_blocking(move || {
                    if auto_cap {
                        limits.max_store_bytes =
                            crate::store::redb_store::default_max_store_bytes(&path)?;
                    }
                    RedbStore::open_with_segment_size(path, limits, segment_bytes)
                })
                .await
                .map_err(|e| RelayError::Internal(format!("opening store: {e}")))??;
                RelayHandle::start_with_store(config, clock, Arc::new(store), options).await
            }
            StoreSpec::Postgres(_) => {
                // No local disk to take a share of: without --max-store-bytes
                // the database's size is the operator's to watch. Several
                // URLs are the shards of one cluster.
                let pg_options = PgOptions {
                    allow_unreplicated: config.allow_unreplicated,
                    ..PgOptions::default()
                };
                let urls = config.postgres_shards().unwrap_or_default();
                let opened = crate::cluster::open::open_postgres(&urls, limits, pg_options).await?;
                let (store, replicated) = (opened.store, opened.replicated);
                // Several nodes may share this database: join its cluster
                // bus (live push and presence across nodes) and keep the
                // registration and prekey-fetch limits in it. The store
                // does not NOTIFY inside its commits, so the bus announces
                // them after they returned.
                let mut options = options;
                if options.cluster.is_none() {
                    let rates = crate::cluster::limits::Rates {
                        registrations_per_ip_hour: config.max_registrations_per_ip_hour,
                        prekey_fetches_per_device_minute: config.prekey_fetches_per_device_minute,
                        prekey_fetches_per_target_minute: config.prekey_fetches_per_target_minute,
                    };
                    options.cluster = Some(crate::cluster::ClusterOptions::postgres(
                        &urls, rates, false,
                    )?);
                }
                let handle = RelayHandle::start_with_store(config, clock, store, options).await?;
                handle
                    .metrics
                    .store_replicated
                    .store(i64::from(replicated), std::sync::atomic::Ordering::Relaxed);
                Ok(handle)
            }
        }
    }

    /// Start over a given store (e.g. a `MemoryStore` in tests). The store's
    /// own limits apply; `config`'s inbox limits are not re-applied to it.
    pub async fn start_with_store(
        config: Config,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
        options: StartOptions,
    ) -> Result<RelayHandle, RelayError> {
        config.validate()?;
        create_data_dir(&config.data_dir)?;
        let metrics = Arc::new(Metrics::new());
        let core = RelayCore::new(
            Arc::clone(&store),
            CoreConfig::from_config(&config),
            Arc::clone(&metrics),
        );

        // Certificate.
        let source = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) if !config.dev_cert => CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => CertSource::Dev(config.data_dir.clone()),
        };
        let material = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || source.load(unix_now()))
                .await
                .map_err(|e| RelayError::Internal(format!("loading certificate: {e}")))??
        };
        let server_config = quic::server_config(&material)?;
        let cert = Arc::new(CertState::new(material.info.clone()));

        // Expired envelopes go before anyone can pull them.
        purge_pass(&store, clock.as_ref(), &metrics).await?;
        core.refresh_depth();
        core.refresh_leases(clock.now_ms());

        let (endpoint, quic_addr, ws_listener) = bind_quic_and_ws(&config, server_config).await?;
        let ws_addr = match &ws_listener {
            Some(l) => Some(l.local_addr().map_err(|source| RelayError::Net {
                what: "WebSocket",
                addr: quic_addr,
                source,
            })?),
            None => None,
        };
        let ws_tls = websocket::TlsSlot::new(&material)?;
        let http_listener =
            match config.http {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(
                    |source| RelayError::Net {
                        what: "HTTP",
                        addr,
                        source,
                    },
                )?),
                None => None,
            };
        let http_addr = match &http_listener {
            Some(l) => Some(l.local_addr().map_err(|source| RelayError::Net {
                what: "HTTP",
                addr: config.http.unwrap_or(quic_addr),
                source,
            })?),
            None => None,
        };

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (commit_tx, commit_rx) = mpsc::channel(writer::QUEUE_DEPTH);
        let hub = Arc::new(match &options.cluster {
            Some(c) => DeviceHub::clustered(c.node, Arc::clone(&c.bus)),
            None => DeviceHub::default(),
        });
        let rates = crate::cluster::limits::Rates {
            registrations_per_ip_hour: config.max_registrations_per_ip_hour,
            prekey_fetches_per_device_minute: config.prekey_fetches_per_device_minute,
            prekey_fetches_per_target_minute: config.prekey_fetches_per_target_minute,
        };
        let limits: Arc<dyn crate::cluster::limits::RateLimits> =
            match options.cluster.as_ref().and_then(|c| c.limits.clone()) {
                Some(shared) => shared,
                None => Arc::new(crate::cluster::limits::LocalLimits::new(rates)),
            };
        // Hear the other nodes before the first connection is accepted.
        let bus_tasks = match &options.cluster {
            Some(c) => c.bus.start(Arc::clone(&hub), c.node, shutdown_rx.clone()),
            None => Vec::new(),
        };
        let shared = Arc::new(Shared {
            core,
            clock: Arc::clone(&clock),
            hub: Arc::clone(&hub),
            commits: commit_tx,
            metrics: Arc::clone(&metrics),
            shutdown: shutdown_rx.clone(),
            next_conn_id: AtomicU64::new(1),
            connections: guard::ConnectionLimiter::new(
                config.max_connections,
                config.max_connections_per_ip,
            ),
            limits,
            reads_ahead: Arc::new(tokio::sync::Semaphore::new(driver::MAX_READS_AHEAD)),
        });

        let writer_task = writer::start(
            commit_rx,
            shared.commits.downgrade(),
            Arc::clone(&store),
            hub,
            Arc::clone(&metrics),
        )
        .map_err(|e| RelayError::Internal(format!("starting the commit writer: {e}")))?;
        let accept_task = tokio::spawn(quic::accept_loop(
            endpoint.clone(),
            Arc::clone(&shared),
            shutdown_rx.clone(),
            config.shutdown_grace,
        ));
        // Plain `/ws` on the HTTP listener: always on loopback, elsewhere
        // only when the operator asks (`--http-ws`).
        let http_ws = http_addr.is_some_and(|a| a.ip().is_loopback()) || config.http_ws;
        let (upgrade_tx, upgrade_rx) = if http_ws && http_addr.is_some() {
            let (tx, rx) = mpsc::channel(websocket::UPGRADE_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let ws_task = tokio::spawn(websocket::accept_loop(
            ws_listener,
            Arc::clone(&ws_tls),
            upgrade_rx,
            Arc::clone(&shared),
            shutdown_rx.clone(),
            config.shutdown_grace,
        ));
        let mut background = bus_tasks;
        background.extend([
            tokio::spawn(purge_loop(
                Arc::clone(&shared),
                config.purge_interval,
                shutdown_rx.clone(),
            )),
            tokio::spawn(cert_loop(
                endpoint.clone(),
                source,
                Arc::clone(&cert),
                ws_tls,
                config.cert_check_interval,
                shutdown_rx.clone(),
            )),
        ]);
        if let Some(listener) = http_listener {
            // `--demo` serves the page embedded at build time unless the
            // caller brought its own files.
            let static_files = match (config.demo, options.static_files) {
                (false, _) => None,
                (true, Some(files)) => Some(files),
                (true, None) => {
                    if !crate::demo::DemoFiles::embedded().is_built() {
                        tracing::warn!(
                            "--demo: this relay was built without the demo's wasm package; \
                             run `cargo xtask build-wasm` and rebuild"
                        );
                    }
                    Some(crate::demo::embedded())
                }
            };
            let refresh_shared = Arc::clone(&shared);
            let failure_shared = Arc::clone(&shared);
            let state = Arc::new(HttpState {
                quic_addr,
                ws_addr,
                websocket: upgrade_tx,
                metrics: Arc::clone(&metrics),
                cert: Arc::clone(&cert),
                refresh_metrics: Some(Arc::new(move || refresh_shared.core.refresh_depth())),
                failure: Some(Arc::new(move || failure_shared.core.store_failure())),
                static_files,
            });
            background.push(tokio::spawn(crate::http::serve(
                listener,
                state,
                shutdown_rx,
            )));
        }
        tracing::info!(%quic_addr, http = ?http_addr, websocket = ?ws_addr, "relay started");
        Ok(RelayHandle {
            quic_addr,
            http_addr,
            ws_addr,
            cert,
            metrics,
            shared,
            endpoint,
            shutdown_tx,
            accept_task,
            ws_task,
            writer_task,
            background,
            grace: config.shutdown_grace,
        })
    }

    /// The bound UDP address of the QUIC endpoint.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound TCP address of the TLS WebSocket listener, if enabled.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The bound address of the HTTP listener, if enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// DER of the certificate currently served (clients pin it).
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert.get().der.clone()
    }

    /// Hex SHA-256 of [`RelayHandle::cert_der`].
    pub fn cert_sha256_hex(&self) -> String {
        self.cert.get().sha256_hex.clone()
    }

    /// Print, on stdout, the lines that scripts and the test harness parse
    /// to find a started relay: `hush-relay listening on <addr>`, `http on
    /// <addr>` and `websocket on <addr>` (when enabled) and `certificate
    /// sha256: <hex>`, in that order.
    pub fn announce(&self) {
        println!("hush-relay listening on {}", self.quic_addr());
        if let Some(addr) = self.http_addr() {
            println!("http on {addr}");
        }
        if let Some(addr) = self.ws_addr() {
            println!("websocket on {addr}");
        }
        println!("certificate sha256: {}", self.cert_sha256_hex());
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Run one retention pass at the clock's current time; returns how many
    /// envelopes expired.
    pub async fn purge_now(&self) -> Result<u64, RelayError> {
        let expired = purge_pass(
            self.shared.core.store(),
            self.shared.clock.as_ref(),
            &self.metrics,
        )
        .await?;
        let shared = Arc::clone(&self.shared);
        let _ = tokio::task::spawn_blocking(move || {
            shared.core.refresh_depth();
            shared.core.refresh_leases(shared.clock.now_ms());
        })
        .await;
        Ok(expired)
    }

    /// Resolves once the store refuses every send until a restart
    /// ([`crate::store::Store::failure`]), with the reason. Looked at every
    /// [`STORE_FAILURE_POLL`] (an atomic flag; `/healthz` reports the same
    /// at once).
    pub async fn store_failed(&self) -> String {
        let mut every = tokio::time::interval(STORE_FAILURE_POLL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            if let Some(why) = self.shared.core.store_failure() {
                return why;
            }
        }
    }

    /// Stop gracefully: refuse new connections, answer pending sends, tell
    /// open connections `ShuttingDown`, close the endpoint and wait (bounded)
    /// for peers to be told.
    pub async fn shutdown(self) -> Result<(), RelayError> {
        tracing::info!("shutting down");
        let _ = self.shutdown_tx.send(true);
        // Connections drain (their pending commits are still answered).
        if let Err(e) = self.accept_task.await {
            tracing::warn!("accept loop ended abnormally: {e}");
        }
        if let Err(e) = self.ws_task.await {
            tracing::warn!("WebSocket accept loop ended abnormally: {e}");
        }
        // Then the writer commits whatever is still queued and stops.
        let _ = self.shared.commits.send(writer::WriterMsg::Stop).await;
        if let Err(e) = self.writer_task.await {
            tracing::warn!("commit writer ended abnormally: {e}");
        }
        for task in self.background {
            if tokio::time::timeout(self.grace, task).await.is_err() {
                tracing::warn!("a background task did not stop in time");
            }
        }
        self.endpoint.close(
            quic::close_code::SHUTTING_DOWN.into(),
            b"relay shutting down",
        );
        if tokio::time::timeout(self.grace, self.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("peers did not acknowledge the close in time");
        }
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// One retention pass: purge in chunks until nothing more has expired.
async fn purge_pass(
    store: &Arc<dyn Store>,
    clock: &dyn Clock,
    metrics: &Metrics,
) -> Result<u64, RelayError> {
    let now = clock.now_ms();
    let mut total = 0u64;
    // Bounded: a pass never runs forever even if the store keeps reporting work.
    for _ in 0..10_000 {
        let s = Arc::clone(store);
        let stats = tokio::task::spawn_blocking(move || s.purge_expired(now, PURGE_CHUNK))
            .await
            .map_err(|e| RelayError::Internal(format!("purge task: {e}")))??;
        total += stats.expired;
        Metrics::add(&metrics.expired_total, stats.expired);
        let chunk = PURGE_CHUNK as u64;
        if stats.expired < chunk && stats.dedup_removed < chunk {
            break;
        }
    }
    if total > 0 {
        tracing::info!(expired = total, "retention purge");
    }
    // Expired blobs (history archives): a bounded number per pass.
    let s = Arc::clone(store);
    let blobs = tokio::task::spawn_blocking(move || s.purge_blobs(now, PURGE_CHUNK))
        .await
        .map_err(|e| RelayError::Internal(format!("purge task: {e}")))??;
    if blobs > 0 {
        tracing::info!(blobs, "expired blobs purged");
    }
    Ok(total)
}

/// How often the retention loop recounts stale and removed devices: an
/// eighth of `--stale-after` (so a device shows stale at most that late),
/// at most every [`LEASE_RECOUNT_MAX`]. The count walks every registered
/// device, so it must not run on every purge pass (every few seconds) on a
/// relay with millions of devices; the depth gauge, read from a counter,
/// still does.
fn lease_recount_every(stale_after_ms: u64) -> Duration {
    Duration::from_millis(stale_after_ms / 8).min(LEASE_RECOUNT_MAX)
}

/// The longest pause between two recounts of the device-lease gauges.
const LEASE_RECOUNT_MAX: Duration = Duration::from_secs(600);

async fn purge_loop(shared: Arc<Shared>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let recount = lease_recount_every(shared.core.config().stale_after_ms);
    let mut last_recount = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) =
            purge_pass(shared.core.store(), shared.clock.as_ref(), &shared.metrics).await
        {
            tracing::error!("retention purge failed: {e}");
        }
        let recount_now = last_recount.elapsed() >= recount;
        if recount_now {
            last_recount = tokio::time::Instant::now();
        }
        let s = Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || {
            s.core.refresh_depth();
            if recount_now {
                s.core.refresh_leases(s.clock.now_ms());
            }
        })
        .await;
    }
}

/// Renew the dev certificate before it nears expiry, or pick up replaced
/// certificate files, and swap the endpoint's TLS config (new connections
/// only; open ones keep theirs).
async fn cert_loop(
    endpoint: quinn::Endpoint,
    source: CertSource,
    state: Arc<CertState>,
    ws_tls: Arc<websocket::TlsSlot>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let current = state.get();
        if matches!(source, CertSource::Dev(_)) && dev_cert_usable(&current, unix_now()) {
            continue;
        }
        let s = source.clone();
        let loaded = match tokio::task::spawn_blocking(move || s.load(unix_now())).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::error!("certificate reload failed: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("certificate reload task failed: {e}");
                continue;
            }
        };
        if loaded.info.sha256_hex == current.sha256_hex {
            continue;
        }
        match quic::server_config(&loaded) {
            Ok(config) => {
                if *shutdown.borrow() {
                    // Shutdown already refused new connections; keep it so.
                    return;
                }
                endpoint.set_server_config(Some(config));
                if let Err(e) = ws_tls.set(&loaded) {
                    tracing::error!("new certificate unusable for WebSocket: {e}");
                }
                tracing::info!(sha256 = %loaded.info.sha256_hex, "certificate replaced");
                state.set(loaded.info);
            }
            Err(e) => tracing::error!("new certificate unusable: {e}"),
        }
    }
}

/// Kernel buffer asked for on each side of the relay's UDP socket.
///
/// One socket carries every QUIC connection. With the kernel's default
/// receive buffer (208 KiB on Linux), datagrams that arrive while the
/// relay's endpoint task waits for a CPU are dropped once it is full, and
/// QUIC only resends them after a loss timer: 64 connections sending at
/// full rate to a busy 2-core relay lost ~28,000 datagrams in 10 s, which
/// put their ack p99 at ~88 ms (`BENCHMARKS.md`). Linux caps the request at
/// `net.core.rmem_max` / `wmem_max`; OPERATING.md says how to raise those.
pub const UDP_BUFFER_BYTES: usize = 8 << 20;

/// The relay's UDP socket, bound to `addr`, with [`UDP_BUFFER_BYTES`] of
/// kernel buffer asked for (what the kernel grants is logged).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As std binds: `[::]` also takes IPv4 where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer still works, only with more loss.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    let (recv, send) = (socket.recv_buffer_size(), socket.send_buffer_size());
    tracing::debug!(?recv, ?send, "UDP socket buffers");
    if let Ok(granted) = recv
        && granted < UDP_BUFFER_BYTES
    {
        tracing::info!(
            granted,
            asked = UDP_BUFFER_BYTES,
            "the kernel granted a smaller UDP receive buffer than asked for; \
             raise net.core.rmem_max for busy relays (docs/OPERATING.md)"
        );
    }
    Ok(socket.into())
}

/// Tries at finding an ephemeral port number free on both UDP and TCP.
const SAME_PORT_TRIES: usize = 16;

/// Bind the QUIC endpoint and the TLS WebSocket listener. With
/// [`WsListen::SameAsQuic`] the TCP listener takes the QUIC endpoint's
/// address and port number; when that port was ephemeral (`:0`) and its
/// TCP twin is taken, another ephemeral port is tried.
async fn bind_quic_and_ws(
    config: &Config,
    server_config: quinn::ServerConfig,
) -> Result<(quinn::Endpoint, SocketAddr, Option<tokio::net::TcpListener>), RelayError> {
    let net =
        |what: &'static str, addr: SocketAddr| move |source| RelayError::Net { what, addr, source };
    let mut tries = 0;
    loop {
        tries += 1;
        let endpoint_config = quic::relay_endpoint_config(&config.data_dir)?;
        let endpoint = udp_socket(config.listen)
            .and_then(|socket| {
                quinn::Endpoint::new(
                    endpoint_config.clone(),
                    Some(server_config.clone()),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(net("QUIC", config.listen))?;
        let quic_addr = endpoint.local_addr().map_err(net("QUIC", config.listen))?;
        let ws_at = match config.ws_listen {
            WsListen::Off => return Ok((endpoint, quic_addr, None)),
            WsListen::At(addr) => addr,
            WsListen::SameAsQuic => quic_addr,
        };
        match tokio::net::TcpListener::bind(ws_at).await {
            Ok(listener) => return Ok((endpoint, quic_addr, Some(listener))),
            Err(e)
                if config.ws_listen == WsListen::SameAsQuic
                    && config.listen.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && tries < SAME_PORT_TRIES =>
            {
                endpoint.close(0u32.into(), b"");
                continue;
            }
            Err(source) => {
                return Err(RelayError::Net {
                    what: "WebSocket",
                    addr: ws_at,
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_udp_socket_gets_the_largest_buffer_the_kernel_allows() {
        let socket = socket2::Socket::from(
            udp_socket(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind on loopback"),
        );
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .expect("rmem_max")
            .trim()
            .parse()
            .expect("a number");
        // Linux reports twice what it grants (the rest is its bookkeeping).
        let granted = socket.recv_buffer_size().expect("SO_RCVBUF") / 2;
        assert!(
            granted >= UDP_BUFFER_BYTES.min(max),
            "granted {granted}, rmem_max {max}"
        );
        assert!(socket.nonblocking().expect("O_NONBLOCK"));
    }

    #[test]
    fn device_recounts_follow_the_stale_period_but_not_every_pass() {
        // The default 30 days: once every ten minutes, not every 5 s pass.
        assert_eq!(
            lease_recount_every(30 * 24 * 3600 * 1000),
            LEASE_RECOUNT_MAX
        );
        // A short period: an eighth of it, so staleness shows promptly.
        assert_eq!(lease_recount_every(3_000), Duration::from_millis(375));
    }
}
