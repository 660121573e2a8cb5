//! The cluster's PostgreSQL side: the LISTEN/NOTIFY bus ([`PgBus`]) and
//! the shared rate limits ([`PgLimits`]).
//!
//! Every connection is made with `target_session_attrs=read-write`, so a
//! multi-host URL (`postgres://h1:5432,h2:5432/hush`) finds the primary
//! after a standby was promoted: NOTIFY is not replicated, LISTEN only
//! hears what is committed on the server it listens on, and that must be
//! the primary. Connections are plain TCP (`NoTls`): the database is on a
//! private network or loopback.

use super::bus::{self, ClusterBus, ClusterEvent, INBOX_CHANNEL, NodeId, PRESENCE_CHANNEL};
use super::limits::{Limit, RateLimits, Rates, TakeFuture};
use super::shard::ShardMap;
use crate::error::RelayError;
use crate::server::hub::DeviceHub;
use hush_protocol::DeviceId;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, config::TargetSessionAttrs};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between reconnection attempts of the bus listener.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// How often every node wakes all its connected devices to re-read their
/// inboxes, whatever the bus said: the bound on how late a push can be when
/// an inbox NOTIFY was lost (see [`PgBus`]).
pub const SAFETY_WAKE: Duration = Duration::from_secs(60);
/// How long a refused-because-unreachable rate limit asks clients to wait.
pub const UNREACHABLE_RETRY_MS: u32 = 1_000;

/// Parse a `postgres://` URL (several hosts allowed) for the cluster's use.
pub fn pg_config(url: &str) -> Result<Config, RelayError> {
    let mut config =
        Config::from_str(url).map_err(|e| RelayError::Config(format!("PostgreSQL URL: {e}")))?;
    config
        .target_session_attrs(TargetSessionAttrs::ReadWrite)
        .connect_timeout(CONNECT_TIMEOUT)
        .application_name("hush-relay");
    Ok(config)
}

/// One lazily (re)connected client for short queries.
struct PgLink {
    config: Config,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl PgLink {
    fn new(config: Config) -> PgLink {
        PgLink {
            config,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The current client, connecting first if there is none or it closed.
    async fn get(&self) -> Result<Arc<Client>, tokio_postgres::Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(c));
        }
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("cluster database connection ended: {e}");
            }
        });
        let client = Arc::new(client);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Forget the client after a failure (the next use reconnects).
    async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// `SELECT pg_notify(channel, payload)`, reconnecting once on failure.
    async fn notify(&self, channel: &str, payload: &str) -> Result<(), tokio_postgres::Error> {
        let mut last = None;
        for _ in 0..2 {
            let result = match self.get().await {
                Ok(c) => c
                    .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.reset().await;
                    last = Some(e);
                }
            }
        }
        match last {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// One notification to send, and who waits for it to be sent.
struct Outgoing {
    channel: &'static str,
    payload: String,
    done: Option<oneshot::Sender<()>>,
}

/// The bus over PostgreSQL LISTEN/NOTIFY: one listening connection per
/// shard database per node ([`INBOX_CHANNEL`] on every shard,
/// [`PRESENCE_CHANNEL`] on shard 0), one connection per shard for the
/// notifications this node sends.
pub struct PgBus {
    map: ShardMap,
    configs: Vec<Config>,
    links: Vec<Arc<PgLink>>,
    /// Payloads to send, per shard.
    outbox: Vec<mpsc::UnboundedSender<Outgoing>>,
    outbox_rx: Mutex<Vec<mpsc::UnboundedReceiver<Outgoing>>>,
    /// Send inbox moves after commits (when the store does not NOTIFY
    /// inside its commit transactions).
    notify_after_commit: bool,
    /// Listening connections currently established.
    listening: Arc<std::sync::atomic::AtomicUsize>,
    /// Period of the safety wake-up of every local device.
    safety_wake: Duration,
}

impl std::fmt::Debug for PgBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBus")
            .field("shards", &self.configs.len())
            .field("notify_after_commit", &self.notify_after_commit)
            .finish()
    }
}

impl PgBus {
    /// A bus over the shard databases at `urls` (shard `i` = `urls[i]`).
    /// `notify_after_commit`: announce this node's commits itself, after
    /// they returned — for stores that do not send the NOTIFY inside their
    /// commit transactions (a crash between commit and NOTIFY then delays
    /// the push until the device's next wake-up or reconnection).
    pub fn new(urls: &[String], notify_after_commit: bool) -> Result<PgBus, RelayError> {
        let configs = urls
            .iter()
            .map(|u| pg_config(u))
            .collect::<Result<Vec<_>, _>>()?;
        let n = u32::try_from(configs.len())
            .map_err(|_| RelayError::Config("too many shards".into()))?;
        if n == 0 {
            return Err(RelayError::Config(
                "the cluster bus needs a database".into(),
            ));
        }
        let links = configs
            .iter()
            .map(|c| Arc::new(PgLink::new(c.clone())))
            .collect();
        let (outbox, outbox_rx) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        Ok(PgBus {
            map: ShardMap::numbered(n),
            configs,
            links,
            outbox,
            outbox_rx: Mutex::new(outbox_rx),
            notify_after_commit,
            listening: Arc::default(),
            safety_wake: SAFETY_WAKE,
        })
    }

    /// The same bus with another safety wake-up period (tests).
    pub fn with_safety_wake(mut self, period: Duration) -> PgBus {
        self.safety_wake = period.max(Duration::from_millis(10));
        self
    }

    /// Whether every shard's listening connection is established (after
    /// start, and again after a reconnection).
    pub fn is_listening(&self) -> bool {
        self.listening.load(std::sync::atomic::Ordering::SeqCst) == self.configs.len()
    }

    fn queue(
        &self,
        shard: usize,
        channel: &'static str,
        payload: String,
        done: Option<oneshot::Sender<()>>,
    ) {
        if let Some(tx) = self.outbox.get(shard) {
            // The sender task ends only at shutdown (then `done` is
            // dropped, which ends the wait too).
            let _ = tx.send(Outgoing {
                channel,
                payload,
                done,
            });
        }
    }
}

impl ClusterBus for PgBus {
    fn publish_claim(
        &self,
        device: DeviceId,
        node: NodeId,
        conn: u64,
    ) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        let payload = bus::claim_payload(&device, node, conn);
        self.queue(0, PRESENCE_CHANNEL, payload, Some(tx));
        Some(rx)
    }

    fn publish_removed(&self, device: DeviceId) {
        self.queue(0, PRESENCE_CHANNEL, bus::removal_payload(&device), None);
    }

    fn publish_inbox(&self, moved: &[(DeviceId, u64)]) {
        if !self.notify_after_commit {
            return;
        }
        let mut per_shard: Vec<Vec<(DeviceId, u64)>> = vec![Vec::new(); self.configs.len()];
        for (device, head) in moved {
            per_shard[self.map.index_of(device.as_bytes())].push((*device, *head));
        }
        for (shard, moved) in per_shard.iter().enumerate() {
            for payload in bus::inbox_payloads(moved) {
                self.queue(shard, INBOX_CHANNEL, payload, None);
            }
        }
    }

    fn start(
        &self,
        hub: Arc<DeviceHub>,
        me: NodeId,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let receivers =
            std::mem::take(&mut *self.outbox_rx.lock().unwrap_or_else(|e| e.into_inner()));
        for (link, rx) in self.links.iter().zip(receivers) {
            tasks.push(tokio::spawn(send_loop(
                Arc::clone(link),
                rx,
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(safety_wake_loop(
            Arc::clone(&hub),
            self.safety_wake,
            shutdown.clone(),
        )));
        for (shard, config) in self.configs.iter().enumerate() {
            let channels: &'static [&'static str] = if shard == 0 {
                &[INBOX_CHANNEL, PRESENCE_CHANNEL]
            } else {
                &[INBOX_CHANNEL]
            };
            tasks.push(tokio::spawn(listen_loop(
                config.clone(),
                channels,
                Arc::clone(&hub),
                me,
                Arc::clone(&self.listening),
                shutdown.clone(),
            )));
        }
        tasks
    }
}

/// Every `period`, wake every local device to re-read its inbox.
///
/// The inbox NOTIFY is sent after the commit returned, not inside its
/// transaction (where PostgreSQL would hold its global notification lock
/// from before the commit record until the end of the transaction —
/// across the wait for the synchronous standby — and so serialise every
/// commit of every node). A NOTIFY is therefore lost when its node dies
/// between commit and NOTIFY, or when it cannot be sent after one
/// reconnection. Nothing is lost with it — the envelope is in the store,
/// and any later wake-up of that device (its next message, its
/// reconnection, a bus reconnection on its node) reads it — but a device
/// that stays connected and receives nothing else would see it late; this
/// wake-up bounds that to `period`. Cost: one inbox read per connected
/// device per period.
async fn safety_wake_loop(
    hub: Arc<DeviceHub>,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the listeners wake everyone at start.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => hub.wake_inboxes(),
            _ = shutdown.changed() => return,
        }
    }
}

/// Send queued notifications in order; a notification that cannot be sent
/// after one reconnection is dropped (logged): the receivers' next wake-up
/// or resync covers it.
async fn send_loop(
    link: Arc<PgLink>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Connect before the first notification needs it.
    if let Err(e) = link.get().await {
        tracing::warn!("cluster bus sender cannot connect yet: {e}");
    }
    loop {
        let out = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        if let Err(e) = link.notify(out.channel, &out.payload).await {
            tracing::warn!(channel = out.channel, "cluster notification not sent: {e}");
        }
        if let Some(done) = out.done {
            let _ = done.send(());
        }
    }
}

/// Listen on one shard database, apply what arrives to the hub, and
/// reconnect (then wake every local device) whenever the connection ends.
async fn listen_loop(
    config: Config,
    channels: &'static [&'static str],
    hub: Arc<DeviceHub>,
    me: NodeId,
    listening: Arc<std::sync::atomic::AtomicUsize>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listen_once(&config, channels, &hub, me, &listening) => {
                if let Err(e) = r {
                    tracing::warn!("cluster bus connection lost: {e}");
                }
            }
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn listen_once(
    config: &Config,
    channels: &[&str],
    hub: &DeviceHub,
    me: NodeId,
    listening: &std::sync::atomic::AtomicUsize,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(Ok(n)).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = tx.send(Err(e));
                    return;
                }
                None => return,
            }
        }
    });
    let listen: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
    if let Err(e) = client.batch_execute(&listen).await {
        driver.abort();
        return Err(e);
    }
    listening.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let result = async {
        // From here on every commit is heard; whatever was committed
        // before (maybe while we were away) is found by the read each
        // woken connection now makes.
        bus::apply(hub, me, &ClusterEvent::Resync);
        tracing::debug!(?channels, "cluster bus listening");
        while let Some(message) = rx.recv().await {
            let n = message?;
            match bus::parse(n.channel(), n.payload()) {
                Some(event) => bus::apply(hub, me, &event),
                None => tracing::warn!(channel = n.channel(), "malformed cluster notification"),
            }
        }
        Ok(())
    }
    .await;
    listening.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    driver.abort();
    result
}

/// Rate limits in a table of shard 0's database, shared by every node:
/// the same generic cell rate algorithm as the in-memory buckets, one
/// atomic `INSERT … ON CONFLICT DO UPDATE … WHERE` per take (the row lock
/// serialises concurrent takes of one key across nodes). If the database
/// cannot be reached the action is refused with a short retry time: the
/// store behind the action is unreachable then as well.
pub struct PgLimits {
    link: PgLink,
    rates: Rates,
    table_ready: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for PgLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLimits")
            .field("rates", &self.rates)
            .finish_non_exhaustive()
    }
}

/// The table of [`PgLimits`].
pub const LIMITS_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS hush_rate_limits (\
     key bytea PRIMARY KEY, tat_us bigint NOT NULL)";

const TAKE_SQL: &str = "INSERT INTO hush_rate_limits AS r (key, tat_us) \
     VALUES ($1::bytea, $2::bigint + $3::bigint) \
     ON CONFLICT (key) DO UPDATE SET tat_us = GREATEST(r.tat_us, $2::bigint) + $3::bigint \
     WHERE GREATEST(r.tat_us, $2::bigint) - $2::bigint <= $4::bigint \
     RETURNING tat_us";

fn limit_key(limit: &Limit) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    match limit {
        Limit::Registration(std::net::IpAddr::V4(ip)) => {
            key.push(1);
            key.extend_from_slice(&ip.octets());
        }
        Limit::Registration(std::net::IpAddr::V6(ip)) => {
            key.push(1);
            key.extend_from_slice(&ip.octets());
        }
        Limit::PrekeyFetcher(d) => {
            key.push(2);
            key.extend_from_slice(d.as_bytes());
        }
        Limit::PrekeyTarget(d) => {
            key.push(3);
            key.extend_from_slice(d.as_bytes());
        }
    }
    key
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl PgLimits {
    /// Limits at `rates` in the database at `url` (shard 0's).
    pub fn new(url: &str, rates: Rates) -> Result<PgLimits, RelayError> {
        Ok(PgLimits {
            link: PgLink::new(pg_config(url)?),
            rates,
            table_ready: tokio::sync::OnceCell::new(),
        })
    }

    async fn try_take(
        &self,
        limit: &Limit,
        now_ms: u64,
    ) -> Result<Result<(), u32>, tokio_postgres::Error> {
        let (per_period, period_ms) = self.rates.of(limit);
        if per_period == 0 {
            return Ok(Ok(()));
        }
        let client = self.link.get().await?;
        self.table_ready
            .get_or_try_init(|| async { client.batch_execute(LIMITS_TABLE_SQL).await })
            .await?;
        let per = u64::from(per_period);
        let interval = (period_ms.saturating_mul(1000) / per).max(1);
        let tolerance = interval.saturating_mul(per - 1);
        let now = now_ms.saturating_mul(1000);
        let key = limit_key(limit);
        let taken = client
            .query_opt(
                TAKE_SQL,
                &[&key, &as_i64(now), &as_i64(interval), &as_i64(tolerance)],
            )
            .await?;
        if taken.is_some() {
            return Ok(Ok(()));
        }
        let row = client
            .query_opt(
                "SELECT tat_us FROM hush_rate_limits WHERE key = $1::bytea",
                &[&key],
            )
            .await?;
        let tat: i64 = match row {
            Some(r) => r.try_get(0)?,
            None => 0,
        };
        let tat = u64::try_from(tat).unwrap_or(0);
        let ahead = tat.saturating_sub(now).saturating_sub(tolerance);
        Ok(Err(u32::try_from(ahead.div_ceil(1000))
            .unwrap_or(u32::MAX)
            .max(1)))
    }

    /// Delete rows whose buckets are full again at `now_ms` (they are the
    /// same as never seen). Returns how many went.
    pub async fn forget_idle(&self, now_ms: u64) -> Result<u64, RelayError> {
        let now = as_i64(now_ms.saturating_mul(1000));
        let run = async {
            let client = self.link.get().await?;
            client
                .execute(
                    "DELETE FROM hush_rate_limits WHERE tat_us <= $1::bigint",
                    &[&now],
                )
                .await
        };
        match run.await {
            Ok(n) => Ok(n),
            Err(e) => {
                self.link.reset().await;
                Err(RelayError::Internal(format!("rate limit cleanup: {e}")))
            }
        }
    }
}

impl RateLimits for PgLimits {
    fn take(&self, limit: Limit, now_ms: u64) -> TakeFuture<'_> {
        Box::pin(async move {
            match self.try_take(&limit, now_ms).await {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::warn!("rate limit database unreachable: {e}");
                    self.link.reset().await;
                    Err(UNREACHABLE_RETRY_MS)
                }
            }
        })
    }

    fn refund(&self, limit: Limit) {
        let (per_period, period_ms) = self.rates.of(&limit);
        if per_period == 0 {
            return;
        }
        let interval = as_i64((period_ms.saturating_mul(1000) / u64::from(per_period)).max(1));
        let key = limit_key(&limit);
        let client = match self.link.client.try_lock() {
            Ok(slot) => slot.as_ref().map(Arc::clone),
            Err(_) => None,
        };
        let Some(client) = client else {
            return;
        };
        tokio::spawn(async move {
            let _ = client
                .execute(
                    "UPDATE hush_rate_limits SET tat_us = tat_us - $2::bigint WHERE key = $1::bytea",
                    &[&key, &interval],
                )
                .await;
        });
    }
}
