//! The relay's settings: command-line flags, `HUSH_*` environment variables
//! and an optional TOML file, merged with precedence
//! **flag > environment > file > default**.
//!
//! Flags and environment variables are parsed by clap into a [`Cli`] whose
//! fields are all optional (so "not given" is distinguishable from "given
//! the default"); the file, if any, fills the gaps; defaults fill the rest.
//! The result is a plain [`Config`] value that the server takes as is, which
//! is also how tests configure a relay without touching the process
//! environment.

use crate::error::RelayError;
use crate::store::redb_store::DEFAULT_SEGMENT_BYTES;
use crate::store::{BlobLimits, StoreLimits, StoreSpec};
use clap::Parser;
use clap::builder::BoolishValueParser;
use hush_protocol::limits::MAX_ENVELOPE_LEN;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default UDP address of the QUIC endpoint.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 4433);
/// Default retention of unacknowledged envelopes: 7 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default retention of unacknowledged envelopes flagged important: 30 days.
pub const DEFAULT_RETENTION_IMPORTANT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default per-connection send rate, envelopes per second.
pub const DEFAULT_SEND_RATE: u32 = 200;
/// Default bound on connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default bound on connections open at once from one address (an IPv6
/// /64 counts as one address).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// The connection threads of a relay not told `--workers`: one per core
/// but one, and at least one.
///
/// The commit writer is a thread of its own that every durable send passes
/// through. With a connection thread on every core it has to win a core
/// from them exactly when sends pile up (at full ingest on two cores it
/// waited for one 28 % of its time), and on a small machine the hand-offs
/// between connection threads cost more than the extra thread brings. On
/// the two-core benchmark host one thread instead of two drained a backlog
/// faster and more steadily (397k–454k msgs/s against 349k–425k),
/// answered one-at-a-time sends ~4 % faster, and took concurrent sends at
/// the same rate (BENCHMARKS.md, "Latest: connection threads").
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

/// Most connection threads `--workers` accepts: far beyond any core count
/// that helps, low enough that a typo cannot exhaust the process's threads.
pub const MAX_WORKERS: usize = 1024;
/// Default registrations (new devices) per address per hour.
pub const DEFAULT_MAX_REGISTRATIONS_PER_IP_HOUR: u32 = 20;
/// Default `FetchPrekeys` per requesting device per minute.
pub const DEFAULT_PREKEY_FETCHES_PER_DEVICE_MINUTE: u32 = 30;
/// Default `FetchPrekeys` of one target device per minute (all requesters).
pub const DEFAULT_PREKEY_FETCHES_PER_TARGET_MINUTE: u32 = 10;
/// Smallest `--max-envelope` accepted: a header with a short ratchet header
/// and an empty payload must still fit.
pub const MIN_MAX_ENVELOPE: usize = 256;
/// Smallest `--segment-bytes`: below this, segment files and their
/// compaction copies multiply for little gain.
pub const MIN_SEGMENT_BYTES: u64 = 1 << 20;
/// Largest `--segment-bytes`: a segment is reclaimed whole, so a larger one
/// could pin that much disk for one unacknowledged envelope.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// Default `--stale-after`: 30 days.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest retention accepted (10 years): keeps expiry arithmetic far from overflow.
pub const MAX_RETENTION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Resolved relay settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// UDP address of the QUIC endpoint (both `hush/1` and `h3`).
    pub listen: SocketAddr,
    /// Directory holding the database and generated certificates; created if missing.
    pub data_dir: PathBuf,
    /// Where envelopes and metadata live (`--store`, repeatable); empty means
    /// the redb store in `data_dir`. Several must all be PostgreSQL: the
    /// shards of one cluster, shard `i` = the `i`-th (see
    /// [`crate::cluster::shard`]).
    pub store: Vec<StoreSpec>,
    /// Start on a PostgreSQL primary without a synchronous standby.
    pub allow_unreplicated: bool,
    /// Stop the process (exit status 3) when the store refuses every send
    /// until a restart ([`crate::store::Store::failure`]), so that its
    /// supervisor restarts it; otherwise keep serving reads.
    pub exit_on_store_failure: bool,
    /// Address of the HTTP listener (health, metrics, certificate hash), if any.
    pub http: Option<SocketAddr>,
    /// Generate (and renew) a short-lived self-signed certificate in the data dir.
    pub dev_cert: bool,
    /// PEM certificate chain (with `key`), instead of `dev_cert`.
    pub cert: Option<PathBuf>,
    /// PEM private key (with `cert`).
    pub key: Option<PathBuf>,
    /// How long an unacknowledged envelope is kept.
    pub retention: Duration,
    /// How long an unacknowledged envelope whose header carries the
    /// important flag is kept (never less than `retention`).
    pub retention_important: Duration,
    /// A device not seen for this long is reported stale (`--stale-after`).
    pub stale_after: Duration,
    /// Largest envelope accepted, bytes (at most the protocol's 64 KiB).
    pub max_envelope: usize,
    /// Most unacknowledged envelopes per inbox.
    pub inbox_max_messages: u64,
    /// Most unacknowledged envelope bytes per inbox.
    pub inbox_max_bytes: u64,
    /// Envelopes per second one connection may send (0 = unlimited).
    pub send_rate: u32,
    /// Most bytes all stored envelopes may take together (see
    /// `store::stored_cost`); `None` = a share of the data directory's
    /// free space, resolved when the relay starts.
    pub max_store_bytes: Option<u64>,
    /// Size at which the redb store closes its active envelope log segment
    /// and starts a new one (`--segment-bytes`). Space comes back a whole
    /// segment at a time, so smaller segments return it sooner, at the cost
    /// of more files and more compaction copies.
    pub segment_bytes: u64,
    /// Most devices one user may register.
    pub max_devices_per_user: u32,
    /// Largest blob (history archive) one device may upload.
    pub max_blob_bytes: u64,
    /// Most unexpired blobs one device may own.
    pub max_blobs_per_device: u32,
    /// Most bytes of unexpired blobs one device may own.
    pub max_blob_bytes_per_device: u64,
    /// Serve the demo page on the HTTP listener.
    pub demo: bool,
    /// Connections open at once; more are refused before their handshake.
    pub max_connections: usize,
    /// Threads that run the connections (QUIC, WebTransport, WebSocket,
    /// HTTP); `None` = [`default_workers`]. Read by the binary when it
    /// builds its runtime: a relay started inside another program runs on
    /// that program's runtime. The commit writer and the checkpoint have
    /// their own threads either way.
    pub workers: Option<usize>,
    /// Connections open at once from one address (IPv6: one /64).
    pub max_connections_per_ip: usize,
    /// Registrations (new devices) per address per hour (0 = unlimited).
    pub max_registrations_per_ip_hour: u32,
    /// `FetchPrekeys` requests per requesting device per minute (0 = unlimited).
    pub prekey_fetches_per_device_minute: u32,
    /// `FetchPrekeys` requests naming one target device per minute, from
    /// all requesters together (0 = unlimited).
    pub prekey_fetches_per_target_minute: u32,
    /// How often the retention purge runs (not a flag: tests shorten it).
    pub purge_interval: Duration,
    /// How often the certificate is checked for renewal or replacement.
    pub cert_check_interval: Duration,
    /// How long shutdown waits for connections to close before giving up.
    pub shutdown_grace: Duration,
    /// The TLS WebSocket listener (`wss://`, TCP): by default on the QUIC
    /// address's port number.
    pub ws_listen: WsListen,
    /// Upgrade `GET /ws` on the HTTP listener to a plain (unencrypted
    /// transport) WebSocket even when the HTTP listener is not on a
    /// loopback address. On loopback it is always on.
    pub http_ws: bool,
}

/// Where the TLS WebSocket listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WsListen {
    /// TCP on the QUIC endpoint's own address and port number (default).
    #[default]
    SameAsQuic,
    /// TCP on this address.
    At(SocketAddr),
    /// No TLS WebSocket listener.
    Off,
}

impl WsListen {
    /// Parse `--ws-listen`: `quic` (the QUIC address), `off`, or `ADDR`.
    pub fn parse(text: &str) -> Result<WsListen, String> {
        match text.trim() {
            "quic" | "" => Ok(WsListen::SameAsQuic),
            "off" | "none" => Ok(WsListen::Off),
            other => other.parse().map(WsListen::At).map_err(|_| {
                format!("{other:?} is not an address (expected ADDR:PORT, `quic` or `off`)")
            }),
        }
    }

    /// The text [`WsListen::parse`] reads back.
    pub fn to_text(self) -> String {
        match self {
            WsListen::SameAsQuic => "quic".into(),
            WsListen::Off => "off".into(),
            WsListen::At(addr) => addr.to_string(),
        }
    }
}

impl Config {
    /// Defaults for a relay whose data lives in `data_dir`. This is what the
    /// binary uses when nothing is given, except that it listens on an
    /// ephemeral port (`127.0.0.1:0`), runs the HTTP listener on an
    /// ephemeral port too, and uses a dev certificate: the settings tests want.
    pub fn default_for(data_dir: PathBuf) -> Config {
        let mut c = Config::defaults(data_dir);
        c.listen = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        c.http = Some(SocketAddr::new(
            std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
            0,
        ));
        c.dev_cert = true;
        c
    }

    /// The documented defaults (no certificate source chosen).
    fn defaults(data_dir: PathBuf) -> Config {
        let limits = StoreLimits::default();
        Config {
            listen: DEFAULT_LISTEN,
            data_dir,
            store: Vec::new(),
            allow_unreplicated: false,
            exit_on_store_failure: true,
            http: None,
            dev_cert: false,
            cert: None,
            key: None,
            retention: DEFAULT_RETENTION,
            retention_important: DEFAULT_RETENTION_IMPORTANT,
            stale_after: DEFAULT_STALE_AFTER,
            max_envelope: MAX_ENVELOPE_LEN,
            inbox_max_messages: limits.max_inbox_messages,
            inbox_max_bytes: limits.max_inbox_bytes,
            send_rate: DEFAULT_SEND_RATE,
            max_store_bytes: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_devices_per_user: limits.max_devices_per_user,
            max_blob_bytes: BlobLimits::default().max_blob_bytes,
            max_blobs_per_device: BlobLimits::default().max_blobs_per_device,
            max_blob_bytes_per_device: BlobLimits::default().max_blob_bytes_per_device,
            demo: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            workers: None,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_registrations_per_ip_hour: DEFAULT_MAX_REGISTRATIONS_PER_IP_HOUR,
            prekey_fetches_per_device_minute: DEFAULT_PREKEY_FETCHES_PER_DEVICE_MINUTE,
            prekey_fetches_per_target_minute: DEFAULT_PREKEY_FETCHES_PER_TARGET_MINUTE,
            purge_interval: Duration::from_secs(5),
            cert_check_interval: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(5),
            ws_listen: WsListen::SameAsQuic,
            http_ws: false,
        }
    }

    /// Parse flags from `args` (the first item is the program name), read
    /// `HUSH_*` variables from the process environment, then the config file.
    pub fn parse_from<I, T>(args: I) -> Result<Config, RelayError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|e| RelayError::Config(e.to_string()))?;
        Config::from_cli(&cli)
    }

    /// Merge parsed flags/environment with the config file they name and the defaults.
    pub fn from_cli(cli: &Cli) -> Result<Config, RelayError> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mut c = Config::defaults(PathBuf::from("hush-data"));
        macro_rules! pick {
            ($field:ident) => {
                cli.$field.clone().or(file.$field.clone())
            };
        }
        if let Some(v) = pick!(listen) {
            c.listen = v;
        }
        if let Some(v) = pick!(data) {
            c.data_dir = v;
        }
        let specs = if cli.store.is_empty() {
            file.store.clone().unwrap_or_default()
        } else {
            cli.store.clone()
        };
        c.store = specs
            .iter()
            .map(|s| StoreSpec::parse(s).map_err(|e| RelayError::Config(format!("--store: {e}"))))
            .collect::<Result<_, _>>()?;
        c.allow_unreplicated = pick!(allow_unreplicated).unwrap_or(false);
        c.exit_on_store_failure = pick!(exit_on_store_failure).unwrap_or(true);
        c.http = pick!(http);
        c.dev_cert = pick!(dev_cert).unwrap_or(false);
        c.cert = pick!(cert);
        c.key = pick!(key);
        if let Some(v) = &cli.retention {
            c.retention = v.0;
        } else if let Some(v) = &file.retention {
            c.retention = parse_retention(v).map_err(|e| RelayError::Config(e.to_string()))?;
        }
        if let Some(v) = &cli.retention_important {
            c.retention_important = v.0;
        } else if let Some(v) = &file.retention_important {
            c.retention_important =
                parse_retention(v).map_err(|e| RelayError::Config(e.to_string()))?;
        }
        if let Some(v) = &cli.stale_after {
            c.stale_after = v.0;
        } else if let Some(v) = &file.stale_after {
            c.stale_after = parse_retention(v).map_err(|e| RelayError::Config(e.to_string()))?;
        }
        if let Some(v) = pick!(max_envelope) {
            c.max_envelope = usize::try_from(v.0).unwrap_or(usize::MAX);
        }
        if let Some(v) = pick!(inbox_max_messages) {
            c.inbox_max_messages = v;
        }
        if let Some(v) = pick!(inbox_max_bytes) {
            c.inbox_max_bytes = v.0;
        }
        if let Some(v) = pick!(send_rate) {
            c.send_rate = v;
        }
        if let Some(v) = pick!(max_store_bytes) {
            c.max_store_bytes = Some(v.0);
        }
        if let Some(v) = pick!(segment_bytes) {
            c.segment_bytes = v.0;
        }
        if let Some(v) = pick!(max_devices_per_user) {
            c.max_devices_per_user = v;
        }
        if let Some(v) = pick!(max_blob_bytes) {
            c.max_blob_bytes = v.0;
        }
        if let Some(v) = pick!(max_blobs_per_device) {
            c.max_blobs_per_device = v;
        }
        if let Some(v) = pick!(max_blob_bytes_per_device) {
            c.max_blob_bytes_per_device = v.0;
        }
        c.demo = pick!(demo).unwrap_or(false);
        if let Some(v) = pick!(max_connections) {
            c.max_connections = v;
        }
        if let Some(v) = pick!(max_connections_per_ip) {
            c.max_connections_per_ip = v;
        }
        if let Some(v) = pick!(workers) {
            c.workers = Some(v);
        }
        if let Some(v) = pick!(max_registrations_per_ip_hour) {
            c.max_registrations_per_ip_hour = v;
        }
        if let Some(v) = pick!(prekey_fetches_per_device_minute) {
            c.prekey_fetches_per_device_minute = v;
        }
        if let Some(v) = pick!(prekey_fetches_per_target_minute) {
            c.prekey_fetches_per_target_minute = v;
        }
        if let Some(v) = pick!(ws_listen) {
            c.ws_listen =
                WsListen::parse(&v).map_err(|e| RelayError::Config(format!("--ws-listen: {e}")))?;
        }
        c.http_ws = pick!(http_ws).unwrap_or(false);
        c.validate()?;
        Ok(c)
    }

    /// Reject contradictory or out-of-range settings with a message naming the option.
    pub fn validate(&self) -> Result<(), RelayError> {
        let err = |m: String| Err(RelayError::Config(m));
        match (self.dev_cert, &self.cert, &self.key) {
            (true, None, None) => {}
            (true, _, _) => return err("--dev-cert cannot be combined with --cert/--key".into()),
            (false, Some(_), Some(_)) => {}
            (false, Some(_), None) => return err("--cert needs --key".into()),
            (false, None, Some(_)) => return err("--key needs --cert".into()),
            (false, None, None) => {
                return err(
                    "no certificate: pass --cert FILE --key FILE, or --dev-cert for a \
                     self-signed development certificate"
                        .into(),
                );
            }
        }
        if self.store.len() > 1 {
            if self.store.iter().any(|s| matches!(s, StoreSpec::Redb(_))) {
                return err(format!(
                    "--store was given {} times with a redb: store among them: only \
                     PostgreSQL stores can be shards (give either one redb:DIR or one or more \
                     postgres:// URLs)",
                    self.store.len()
                ));
            }
            for (i, s) in self.store.iter().enumerate() {
                if self.store[..i].contains(s) {
                    return err(format!(
                        "--store {} is given twice: each shard is its own database",
                        StoreSpec::redact(&s.to_spec_string())
                    ));
                }
            }
        }
        if self.max_envelope < MIN_MAX_ENVELOPE || self.max_envelope > MAX_ENVELOPE_LEN {
            return err(format!(
                "--max-envelope {} is outside {MIN_MAX_ENVELOPE}..={MAX_ENVELOPE_LEN} bytes",
                self.max_envelope
            ));
        }
        if self.retention.is_zero() || self.retention > MAX_RETENTION {
            return err(format!(
                "--retention {} is outside 1s..={}",
                format_duration(self.retention),
                format_duration(MAX_RETENTION)
            ));
        }
        if self.retention_important.is_zero() || self.retention_important > MAX_RETENTION {
            return err(format!(
                "--retention-important {} is outside 1s..={}",
                format_duration(self.retention_important),
                format_duration(MAX_RETENTION)
            ));
        }
        if self.stale_after.is_zero() || self.stale_after > MAX_RETENTION {
            return err(format!(
                "--stale-after {} is outside 1s..={}",
                format_duration(self.stale_after),
                format_duration(MAX_RETENTION)
            ));
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            return err("--max-connections and --max-connections-per-ip must be at least 1".into());
        }
        if let Some(n) = self.workers
            && !(1..=MAX_WORKERS).contains(&n)
        {
            return err(format!("--workers {n} is outside 1..={MAX_WORKERS}"));
        }
        if self.inbox_max_messages == 0 {
            return err("--inbox-max-messages must be at least 1".into());
        }
        if self.inbox_max_bytes < self.max_envelope as u64 {
            return err(format!(
                "--inbox-max-bytes {} is smaller than --max-envelope {}",
                self.inbox_max_bytes, self.max_envelope
            ));
        }
        if self.max_devices_per_user == 0 {
            return err("--max-devices-per-user must be at least 1".into());
        }
        if let Some(cap) = self.max_store_bytes
            && cap < self.max_envelope as u64
        {
            return err(format!(
                "--max-store-bytes {cap} is smaller than --max-envelope {}",
                self.max_envelope
            ));
        }
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return err(format!(
                "--segment-bytes {} is outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES} bytes",
                self.segment_bytes
            ));
        }
        Ok(())
    }

    /// The store limits these settings imply (an automatic
    /// `max_store_bytes` is left uncapped here; the server resolves it).
    pub fn store_limits(&self) -> StoreLimits {
        StoreLimits {
            max_inbox_messages: self.inbox_max_messages,
            max_inbox_bytes: self.inbox_max_bytes,
            max_store_bytes: self.max_store_bytes.unwrap_or(u64::MAX),
            max_devices_per_user: self.max_devices_per_user,
            ..StoreLimits::default()
        }
    }

    /// The PostgreSQL shard URLs (shard `i` = `--store` number `i`), or
    /// `None` when the store is redb.
    pub fn postgres_shards(&self) -> Option<Vec<String>> {
        let urls: Vec<String> = self
            .store
            .iter()
            .filter_map(|s| match s {
                StoreSpec::Postgres(url) => Some(url.clone()),
                StoreSpec::Redb(_) => None,
            })
            .collect();
        (!urls.is_empty() && urls.len() == self.store.len()).then_some(urls)
    }

    /// The store to open: the (first) one `--store` names, or the redb
    /// store in the data directory.
    pub fn store_spec(&self) -> StoreSpec {
        self.store
            .first()
            .cloned()
            .unwrap_or_else(|| StoreSpec::Redb(self.data_dir.clone()))
    }

    /// The blob limits these settings imply (blobs live a day).
    pub fn blob_limits(&self) -> BlobLimits {
        BlobLimits {
            max_blob_bytes: self.max_blob_bytes,
            max_blobs_per_device: self.max_blobs_per_device,
            max_blob_bytes_per_device: self.max_blob_bytes_per_device,
            ..BlobLimits::default()
        }
    }

    /// The stale period in milliseconds.
    pub fn stale_after_ms(&self) -> u64 {
        u64::try_from(self.stale_after.as_millis()).unwrap_or(u64::MAX)
    }

    /// Retention in milliseconds.
    pub fn retention_ms(&self) -> u64 {
        u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX)
    }

    /// Retention of important envelopes in milliseconds: the longer of
    /// `retention_important` and `retention`, so the important class never
    /// expires first.
    pub fn retention_important_ms(&self) -> u64 {
        u64::try_from(self.retention_important.max(self.retention).as_millis()).unwrap_or(u64::MAX)
    }

    /// The settings as a TOML config file (what `--print-config` shows).
    pub fn to_toml(&self) -> String {
        let f = FileConfig {
            listen: Some(self.listen),
            data: Some(self.data_dir.clone()),
            store: (!self.store.is_empty())
                .then(|| self.store.iter().map(StoreSpec::to_spec_string).collect()),
            allow_unreplicated: self.allow_unreplicated.then_some(true),
            exit_on_store_failure: Some(self.exit_on_store_failure),
            http: self.http,
            dev_cert: Some(self.dev_cert),
            cert: self.cert.clone(),
            key: self.key.clone(),
            retention: Some(format_duration(self.retention)),
            retention_important: Some(format_duration(self.retention_important)),
            stale_after: Some(format_duration(self.stale_after)),
            max_envelope: Some(ByteSize(self.max_envelope as u64)),
            inbox_max_messages: Some(self.inbox_max_messages),
            inbox_max_bytes: Some(ByteSize(self.inbox_max_bytes)),
            send_rate: Some(self.send_rate),
            max_store_bytes: self.max_store_bytes.map(ByteSize),
            segment_bytes: Some(ByteSize(self.segment_bytes)),
            max_devices_per_user: Some(self.max_devices_per_user),
            max_blob_bytes: Some(ByteSize(self.max_blob_bytes)),
            max_blobs_per_device: Some(self.max_blobs_per_device),
            max_blob_bytes_per_device: Some(ByteSize(self.max_blob_bytes_per_device)),
            demo: Some(self.demo),
            max_connections: Some(self.max_connections),
            max_connections_per_ip: Some(self.max_connections_per_ip),
            workers: self.workers,
            max_registrations_per_ip_hour: Some(self.max_registrations_per_ip_hour),
            prekey_fetches_per_device_minute: Some(self.prekey_fetches_per_device_minute),
            prekey_fetches_per_target_minute: Some(self.prekey_fetches_per_target_minute),
            ws_listen: Some(self.ws_listen.to_text()),
            http_ws: Some(self.http_ws),
        };
        toml::to_string(&f).unwrap_or_default()
    }
}

/// Command-line flags. Every flag can also be set by the environment
/// variable named in its help (`HUSH_<FLAG>`); a flag wins over its variable.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "hush-relay",
    version,
    about = "Hush relay: stores end-to-end encrypted envelopes until their devices fetch them.",
    long_about = "Hush relay: a durable QUIC store-and-forward server for end-to-end encrypted \
                  envelopes. It cannot read what it stores.\n\n\
                  Settings come from flags, then HUSH_* environment variables, then the \
                  --config file, then defaults (in that order of precedence)."
)]
pub struct Cli {
    /// UDP address of the QUIC endpoint (native clients and browsers share it)
    /// [default: 127.0.0.1:4433]
    #[arg(long, env = "HUSH_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Data directory: database and generated certificates; created if missing
    /// [default: ./hush-data]
    #[arg(long, env = "HUSH_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,

    /// Where envelopes and metadata live: redb:DIR (a local redb store) or a
    /// PostgreSQL URL, postgres://USER@HOST1:PORT,HOST2:PORT/DB?target_session_attrs=read-write
    /// (nodes sharing it are otherwise stateless). Repeat with several
    /// postgres:// URLs to spread devices over shards: keep their order fixed
    /// (see OPERATING.md, "Shards") [default: redb:DATA_DIR]
    #[arg(long, env = "HUSH_STORE", value_name = "SPEC")]
    pub store: Vec<String>,

    /// Start even if the PostgreSQL primary has no synchronous standby (stored
    /// envelopes are then only on the primary; logged, and metric
    /// hush_store_replicated is 0)
    #[arg(
        long,
        env = "HUSH_ALLOW_UNREPLICATED",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub allow_unreplicated: Option<bool>,

    /// When the store's log fails a write or sync, or its index file a write
    /// (a full disk, an I/O error), it refuses every send until the relay
    /// restarts, which recovers every acknowledged envelope: stop the
    /// process then (exit status 3)
    /// for its supervisor to restart it; with false, keep serving reads
    /// while /healthz answers 503 [default: true]
    #[arg(
        long,
        env = "HUSH_EXIT_ON_STORE_FAILURE",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub exit_on_store_failure: Option<bool>,

    /// Address of the HTTP listener for /healthz, /metrics, /certificate.sha256,
    /// /relay.json (where pages dial and which certificate hash to pin) and,
    /// with --demo, the demo page at / [default: none]
    #[arg(long, env = "HUSH_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    /// Use a self-signed ECDSA certificate for localhost, valid < 14 days, stored
    /// in the data directory and renewed automatically (development and browsers
    /// pinning its hash)
    #[arg(
        long,
        env = "HUSH_DEV_CERT",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub dev_cert: Option<bool>,

    /// PEM certificate chain for the name clients connect to (needs --key)
    #[arg(long, env = "HUSH_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// PEM private key of --cert
    #[arg(long, env = "HUSH_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// How long unacknowledged envelopes are kept, with a unit: s, m, h or d
    /// (e.g. 30d) [default: 7d]
    #[arg(long, env = "HUSH_RETENTION", value_name = "DURATION", value_parser = parse_retention_arg)]
    pub retention: Option<Retention>,

    /// How long unacknowledged envelopes flagged important (`hush send
    /// --important`) are kept, with a unit (at least --retention) [default: 30d]
    #[arg(long, env = "HUSH_RETENTION_IMPORTANT", value_name = "DURATION", value_parser = parse_retention_arg)]
    pub retention_important: Option<Retention>,

    /// A device not seen for this long is reported stale to its peers, who
    /// stop encrypting to it (with a unit, e.g. 30d) [default: 30d]
    #[arg(long, env = "HUSH_STALE_AFTER", value_name = "DURATION", value_parser = parse_retention_arg)]
    pub stale_after: Option<Retention>,

    /// Largest envelope accepted, bytes (K/M suffixes allowed), at most 64K
    /// [default: 64K]
    #[arg(long, env = "HUSH_MAX_ENVELOPE", value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_envelope: Option<ByteSize>,

    /// Most unacknowledged envelopes one device's inbox may hold [default: 100000]
    #[arg(long, env = "HUSH_INBOX_MAX_MESSAGES", value_name = "N")]
    pub inbox_max_messages: Option<u64>,

    /// Most unacknowledged bytes one device's inbox may hold (K/M/G suffixes)
    /// [default: 1G]
    #[arg(long, env = "HUSH_INBOX_MAX_BYTES", value_name = "SIZE", value_parser = parse_size_arg)]
    pub inbox_max_bytes: Option<ByteSize>,

    /// Envelopes per second one connection may send; 0 means unlimited [default: 200]
    #[arg(long, env = "HUSH_SEND_RATE", value_name = "N")]
    pub send_rate: Option<u32>,

    /// Most bytes the stored envelopes of all inboxes may take together
    /// (K/M/G suffixes); sends past it are refused with StoreFull
    /// [default: a quarter of the data directory's free space plus what the
    /// store already holds, at start]
    #[arg(long, env = "HUSH_MAX_STORE_BYTES", value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_store_bytes: Option<ByteSize>,

    /// Size at which the envelope log (redb store) starts a new segment
    /// file (K/M/G suffixes, 1M..=1G); space comes back a segment at a time
    /// [default: 64M]
    #[arg(long, env = "HUSH_SEGMENT_BYTES", value_name = "SIZE", value_parser = parse_size_arg)]
    pub segment_bytes: Option<ByteSize>,

    /// Most devices one user may register [default: 10]
    #[arg(long, env = "HUSH_MAX_DEVICES_PER_USER", value_name = "N")]
    pub max_devices_per_user: Option<u32>,

    /// Largest blob (a history archive for a newly linked device) one
    /// device may upload [default: 256MiB]
    #[arg(long, env = "HUSH_MAX_BLOB_BYTES", value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_blob_bytes: Option<ByteSize>,

    /// Most unexpired blobs one device may hold [default: 4]
    #[arg(long, env = "HUSH_MAX_BLOBS_PER_DEVICE", value_name = "N")]
    pub max_blobs_per_device: Option<u32>,

    /// Most bytes of unexpired blobs one device may hold [default: 512MiB]
    #[arg(
        long,
        env = "HUSH_MAX_BLOB_BYTES_PER_DEVICE",
        value_name = "SIZE",
        value_parser = parse_size_arg
    )]
    pub max_blob_bytes_per_device: Option<ByteSize>,

    /// Serve the demo chat page on the HTTP listener (when built in)
    #[arg(
        long,
        env = "HUSH_DEMO",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub demo: Option<bool>,

    /// Connections open at once; more are refused before their handshake
    /// [default: 10000].
    #[arg(long, env = "HUSH_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Connections open at once from one address (an IPv6 /64 counts as one)
    /// [default: 256].
    #[arg(long, env = "HUSH_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// Threads that run the connections [default: one per core but one, at
    /// least one]. The commit writer and the checkpoint have threads of
    /// their own besides.
    #[arg(long, env = "HUSH_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    /// Registrations (new devices) per address per hour, 0 = unlimited
    /// [default: 20].
    #[arg(long, env = "HUSH_MAX_REGISTRATIONS_PER_IP_HOUR", value_name = "N")]
    pub max_registrations_per_ip_hour: Option<u32>,

    /// FetchPrekeys requests per requesting device per minute, 0 = unlimited
    /// [default: 30].
    #[arg(long, env = "HUSH_PREKEY_FETCHES_PER_DEVICE_MINUTE", value_name = "N")]
    pub prekey_fetches_per_device_minute: Option<u32>,

    /// FetchPrekeys requests naming one target device per minute, from all
    /// requesters together, 0 = unlimited [default: 10].
    #[arg(long, env = "HUSH_PREKEY_FETCHES_PER_TARGET_MINUTE", value_name = "N")]
    pub prekey_fetches_per_target_minute: Option<u32>,

    /// TCP address of the TLS WebSocket listener (`wss://HOST:PORT/ws`, the
    /// fallback for networks without UDP and browsers without WebTransport):
    /// `quic` = the --listen address and port number over TCP, `off`, or an
    /// ADDR [default: quic]
    #[arg(long, env = "HUSH_WS_LISTEN", value_name = "ADDR|quic|off")]
    pub ws_listen: Option<String>,

    /// Also upgrade `GET /ws` on the HTTP listener to a plain WebSocket when
    /// --http is not a loopback address (on loopback it always is). Traffic
    /// stays end-to-end encrypted and device-authenticated, but a network
    /// observer sees its metadata in clear [default: false]
    #[arg(
        long,
        env = "HUSH_HTTP_WS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub http_ws: Option<bool>,

    /// TOML file with any of the settings above (keys as the flag names without
    /// dashes in front, e.g. `retention = "30d"`); unknown keys are rejected
    #[arg(long, env = "HUSH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the resolved settings as TOML and exit
    #[arg(long)]
    pub print_config: bool,
}

/// The TOML config file. Keys are the flag names (`dev-cert`, `send-rate`, …).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// See `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// See `--data`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// See `--store` (a list of specs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<Vec<String>>,
    /// See `--allow-unreplicated`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_unreplicated: Option<bool>,
    /// See `--exit-on-store-failure`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_on_store_failure: Option<bool>,
    /// See `--http`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// See `--dev-cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev_cert: Option<bool>,
    /// See `--cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// See `--key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// See `--retention` (a string such as `"30d"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// See `--retention-important` (a string such as `"30d"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_important: Option<String>,
    /// See `--stale-after` (a string such as `"30d"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_after: Option<String>,
    /// See `--max-envelope` (an integer, or a string with a suffix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_envelope: Option<ByteSize>,
    /// See `--inbox-max-messages`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_max_messages: Option<u64>,
    /// See `--inbox-max-bytes` (an integer, or a string with a suffix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_max_bytes: Option<ByteSize>,
    /// See `--send-rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_rate: Option<u32>,
    /// See `--max-store-bytes` (an integer, or a string with a suffix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_store_bytes: Option<ByteSize>,
    /// See `--segment-bytes` (an integer, or a string with a suffix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_bytes: Option<ByteSize>,
    /// See `--max-devices-per-user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_devices_per_user: Option<u32>,
    /// See `--max-blob-bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_blob_bytes: Option<ByteSize>,
    /// See `--max-blobs-per-device`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_blobs_per_device: Option<u32>,
    /// See `--max-blob-bytes-per-device`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_blob_bytes_per_device: Option<ByteSize>,
    /// See `--demo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demo: Option<bool>,
    /// See `--max-connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// See `--max-connections-per-ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<usize>,
    /// See `--workers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// See `--max-registrations-per-ip-hour`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_registrations_per_ip_hour: Option<u32>,
    /// See `--prekey-fetches-per-device-minute`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prekey_fetches_per_device_minute: Option<u32>,
    /// See `--prekey-fetches-per-target-minute`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prekey_fetches_per_target_minute: Option<u32>,
    /// See `--ws-listen` (`"quic"`, `"off"` or an address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_listen: Option<String>,
    /// See `--http-ws`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_ws: Option<bool>,
}

impl FileConfig {
    /// Parse TOML text; the error names the offending key.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().to_string())
    }

    /// Read and parse a config file. Relative paths inside it are taken
    /// relative to the file's directory, so a service's config works from any
    /// working directory.
    pub fn load(path: &Path) -> Result<FileConfig, RelayError> {
        let text = std::fs::read_to_string(path).map_err(|source| RelayError::File {
            what: "config file",
            path: path.to_path_buf(),
            source,
        })?;
        let mut f = FileConfig::parse(&text)
            .map_err(|e| RelayError::Config(format!("config file {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut f.data, &mut f.cert, &mut f.key].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for spec in f.store.iter_mut().flatten() {
            if let Some(dir) = spec.strip_prefix("redb:")
                && Path::new(dir).is_relative()
            {
                *spec = format!("redb:{}", base.join(dir).display());
            }
        }
        Ok(f)
    }
}

/// A retention period parsed from `30d`-style text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Duration);

fn parse_retention_arg(s: &str) -> Result<Retention, String> {
    parse_retention(s).map(Retention)
}

/// Parse a duration with a unit suffix: `90s`, `15m`, `12h`, `30d`.
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "retention '{s}': expected a number with a unit, e.g. 7d"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("retention '{s}': number too large"))?;
    let secs_per = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "" => {
            return Err(format!(
                "retention '{s}': add a unit: s, m, h or d (e.g. {s}d)"
            ));
        }
        other => {
            return Err(format!(
                "retention '{s}': unknown unit '{other}' (use s, m, h or d)"
            ));
        }
    };
    let secs = n
        .checked_mul(secs_per)
        .ok_or_else(|| format!("retention '{s}': too long"))?;
    let d = Duration::from_secs(secs);
    if d.is_zero() {
        return Err(format!("retention '{s}': must be longer than zero"));
    }
    if d > MAX_RETENTION {
        return Err(format!("retention '{s}': longer than 3650d"));
    }
    Ok(d)
}

/// Format a duration in the largest unit that divides it (`7d`, `90m`, `45s`).
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return "0s".into();
    }
    for (unit, per) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(per) {
            return format!("{}{unit}", s / per);
        }
    }
    format!("{s}s")
}

/// A byte count, written as an integer or with a binary suffix (`64K`, `1G`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

fn parse_size_arg(s: &str) -> Result<ByteSize, String> {
    parse_size(s).map(ByteSize)
}

/// Parse `65536`, `64K`, `64KiB`, `16M`, `1G` (binary multiples, case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size '{s}': expected a number of bytes, e.g. 65536 or 64K"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "size '{s}': unknown unit '{other}' (use K, M or G)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}': too large"))
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte count: an integer or a string such as \"64K\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a byte count cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_units() {
        assert_eq!(parse_retention("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_retention("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_retention("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_retention(" 45s "), Ok(Duration::from_secs(45)));
        assert!(parse_retention("7").unwrap_err().contains("add a unit"));
        assert!(parse_retention("7w").unwrap_err().contains("unknown unit"));
        assert!(parse_retention("0d").is_err());
        assert!(parse_retention("d").is_err());
        assert!(parse_retention("99999999999999999999d").is_err());
        assert!(parse_retention("3651d").is_err());
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(format_duration(Duration::from_secs(5400)), "90m");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("64K"), Ok(65_536));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn file_rejects_unknown_key_by_name() {
        let err = FileConfig::parse("listen = \"127.0.0.1:1\"\nretension = \"7d\"\n").unwrap_err();
        assert!(err.contains("retension"), "{err}");
    }

    #[test]
    fn file_accepts_sizes_as_int_or_string() {
        let f = FileConfig::parse("max-envelope = \"32K\"\ninbox-max-bytes = 1048576\n").unwrap();
        assert_eq!(f.max_envelope, Some(ByteSize(32 * 1024)));
        assert_eq!(f.inbox_max_bytes, Some(ByteSize(1 << 20)));
    }

    #[test]
    fn validate_needs_exactly_one_certificate_source() {
        let mut c = Config::default_for(PathBuf::from("x"));
        assert!(c.validate().is_ok());
        c.cert = Some("c.pem".into());
        assert!(c.validate().is_err());
        c.dev_cert = false;
        assert!(c.validate().unwrap_err().to_string().contains("--key"));
        c.key = Some("k.pem".into());
        assert!(c.validate().is_ok());
        c.max_envelope = MAX_ENVELOPE_LEN + 1;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-envelope")
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let mut c = Config::default_for(PathBuf::from("/var/lib/hush"));
        c.retention = Duration::from_secs(30 * 86_400);
        let f = FileConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(f.retention.as_deref(), Some("30d"));
        assert_eq!(f.data, Some(PathBuf::from("/var/lib/hush")));
        assert_eq!(f.dev_cert, Some(true));
    }

    #[test]
    fn a_failed_store_stops_the_relay_unless_told_otherwise() {
        let c = Config::parse_from(["hush-relay", "--dev-cert"]).unwrap();
        assert!(c.exit_on_store_failure);
        let f = FileConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(f.exit_on_store_failure, Some(true));
        let c = Config::parse_from(["hush-relay", "--dev-cert", "--exit-on-store-failure=false"])
            .unwrap();
        assert!(!c.exit_on_store_failure);
        let f = FileConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(f.exit_on_store_failure, Some(false));
        let f = FileConfig::parse("exit-on-store-failure = false\n").unwrap();
        assert_eq!(f.exit_on_store_failure, Some(false));
    }

    #[test]
    fn store_flag_picks_the_backend_takes_postgres_shards_and_refuses_mixes_or_unknown() {
        let c = Config::parse_from(["hush-relay", "--dev-cert", "--data", "/d"]).unwrap();
        assert_eq!(c.store_spec(), StoreSpec::Redb(PathBuf::from("/d")));
        assert!(!c.allow_unreplicated);
        let url =
            "postgres://hush:pw@10.0.0.1:5432,10.0.0.2:5432/hush?target_session_attrs=read-write";
        let c = Config::parse_from([
            "hush-relay",
            "--dev-cert",
            "--store",
            url,
            "--allow-unreplicated",
        ])
        .unwrap();
        assert_eq!(c.store_spec(), StoreSpec::Postgres(url.into()));
        assert!(c.allow_unreplicated);
        // The password never shows in Debug output (logs).
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw"), "{shown}");
        assert!(
            shown.contains("hush:***@10.0.0.1:5432,10.0.0.2:5432/hush"),
            "{shown}"
        );
        let f = FileConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(f.store, Some(vec![url.to_string()]));
        assert_eq!(f.allow_unreplicated, Some(true));
        let c = Config::parse_from(["hush-relay", "--dev-cert", "--store", "redb:/x"]).unwrap();
        assert_eq!(c.store_spec(), StoreSpec::Redb(PathBuf::from("/x")));
        let e = Config::parse_from([
            "hush-relay",
            "--dev-cert",
            "--store",
            "redb:/x",
            "--store",
            url,
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("only PostgreSQL stores can be shards"), "{e}");
        // Several PostgreSQL stores are the shards, in order.
        let url2 = "postgres://hush@10.0.1.1:5432/hush";
        let c = Config::parse_from(["hush-relay", "--dev-cert", "--store", url, "--store", url2])
            .unwrap();
        assert_eq!(
            c.postgres_shards(),
            Some(vec![url.to_string(), url2.to_string()])
        );
        assert_eq!(c.store_spec(), StoreSpec::Postgres(url.into()));
        let f = FileConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(f.store, Some(vec![url.to_string(), url2.to_string()]));
        let e = Config::parse_from(["hush-relay", "--dev-cert", "--store", url, "--store", url])
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        assert!(!e.contains("pw"), "no password in errors: {e}");
        let c = Config::parse_from(["hush-relay", "--dev-cert", "--store", "redb:/x"]).unwrap();
        assert_eq!(c.postgres_shards(), None);
        for bad in ["mysql://x", "redb:", "/var/lib/hush"] {
            let e = Config::parse_from(["hush-relay", "--dev-cert", "--store", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--store"), "{bad}: {e}");
        }
        let f = FileConfig::parse("store = [\"postgres://h/db\"]\nallow-unreplicated = true\n")
            .unwrap();
        assert_eq!(f.store, Some(vec!["postgres://h/db".to_string()]));
        assert_eq!(
            StoreSpec::redact("postgresql://u:secret@h/db?password=x"),
            "postgresql://u:***@h/db?password=***"
        );
    }

    #[test]
    fn workers_from_flag_and_file_bounded() {
        let c = Config::parse_from(["hush-relay", "--dev-cert"]).unwrap();
        assert_eq!(c.workers, None, "one per core unless asked");
        let c = Config::parse_from(["hush-relay", "--dev-cert", "--workers", "1"]).unwrap();
        assert_eq!(c.workers, Some(1));
        let f = FileConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(f.workers, Some(1));
        let f = FileConfig::parse("workers = 3\n").unwrap();
        assert_eq!(f.workers, Some(3));
        for bad in ["0", "1025"] {
            let e = Config::parse_from(["hush-relay", "--dev-cert", "--workers", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--workers"), "{bad}: {e}");
        }
        assert!(Config::parse_from(["hush-relay", "--dev-cert", "--workers", "x"]).is_err());
    }

    #[test]
    fn store_and_device_caps_from_flags_file_and_defaults() {
        let c = Config::parse_from(["hush-relay", "--dev-cert"]).unwrap();
        assert_eq!(c.max_store_bytes, None);
        assert_eq!(c.segment_bytes, DEFAULT_SEGMENT_BYTES);
        assert_eq!(c.max_devices_per_user, 10);
        assert_eq!(c.store_limits().max_store_bytes, u64::MAX);
        let c = Config::parse_from([
            "hush-relay",
            "--dev-cert",
            "--max-store-bytes",
            "2G",
            "--max-devices-per-user",
            "3",
            "--segment-bytes",
            "8M",
        ])
        .unwrap();
        assert_eq!(c.max_store_bytes, Some(2 << 30));
        assert_eq!(c.segment_bytes, 8 << 20);
        let limits = c.store_limits();
        assert_eq!(
            (limits.max_store_bytes, limits.max_devices_per_user),
            (2 << 30, 3)
        );
        let f = FileConfig::parse(&c.to_toml()).unwrap();
        assert_eq!(f.max_store_bytes, Some(ByteSize(2 << 30)));
        assert_eq!(f.max_devices_per_user, Some(3));
        assert_eq!(f.segment_bytes, Some(ByteSize(8 << 20)));
        let f = FileConfig::parse("max-store-bytes = \"10G\"\nmax-devices-per-user = 4\n").unwrap();
        assert_eq!(f.max_store_bytes, Some(ByteSize(10 << 30)));
        let mut c = Config::default_for(PathBuf::from("x"));
        c.max_devices_per_user = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-devices-per-user")
        );
        c.max_devices_per_user = 1;
        c.max_store_bytes = Some(1024);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-store-bytes")
        );
        c.max_store_bytes = None;
        for bad in [MIN_SEGMENT_BYTES - 1, MAX_SEGMENT_BYTES + 1] {
            c.segment_bytes = bad;
            assert!(
                c.validate()
                    .unwrap_err()
                    .to_string()
                    .contains("--segment-bytes")
            );
        }
        c.segment_bytes = MIN_SEGMENT_BYTES;
        assert!(c.validate().is_ok());
    }
}
