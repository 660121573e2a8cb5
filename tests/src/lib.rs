//! `hush-tests`: the shared harness for Hush's workspace-level tests.
//!
//! Every end-to-end test of the relay goes through this crate so that the
//! awkward parts — finding and starting the relay binary, pinning its
//! certificate, speaking the framed protocol over real QUIC, waiting with a
//! bound — are written once and behave the same everywhere:
//!
//! - [`binaries`] — locate (and if needed build) a workspace binary.
//! - [`process`] — [`RelayProcess`]: a real `hush-relay` process on
//!   127.0.0.1 that can be killed with SIGKILL, stopped with SIGTERM and
//!   restarted on the same data directory and port; its output is captured to
//!   a log file.
//! - [`tls`] — a rustls verifier that accepts exactly one certificate,
//!   identified by the SHA-256 of its DER encoding.
//! - [`identity`] — [`DeviceIdentity`]: deterministic Ed25519 user and device
//!   keys and the signatures the protocol asks for.
//! - [`device`] — [`TestDevice`]: one authenticated QUIC connection speaking
//!   `hush/1`, with typed helpers for every request.
//! - [`envelopes`] — syntactically valid envelopes for tests that do not need
//!   real encryption.
//! - [`cli`] — [`cli::Hush`]: one device driven through the real `hush`
//!   binary, with bounded runs and JSON-lines parsing.
//! - [`chaos`] — SIGKILL the relay at random moments and restart it,
//!   telling clients through a watch channel.
//! - [`pg`] — [`pg::PgCluster`]: throwaway PostgreSQL servers on 127.0.0.1
//!   (a primary, optionally a synchronous streaming standby) for the
//!   PostgreSQL store, with a fresh database per test.
//! - [`wait`] — the only place where waiting and polling happen; every wait
//!   has a bound and names what it waited for.
//! - [`ws`] — [`ws::WsDevice`]: the same frames over the relay's WebSocket
//!   transport (TLS or plain), plus what a hostile WebSocket peer sends.
//! - [`rng`] — a small seeded generator so randomised tests can print and
//!   replay their seed.
//! - [`host`] — CPU steal and disk pressure over a benchmark run, printed
//!   beside its numbers.
//!
//! Nothing here panics on network or process input: failures are
//! [`HarnessError`]s, and tests decide what to assert.
#![deny(missing_docs)]

pub mod bench_send;
pub mod binaries;
pub mod chaos;
pub mod cli;
pub mod device;
pub mod envelopes;
pub mod host;
pub mod identity;
pub mod pg;
pub mod process;
pub mod rng;
pub mod sim;
pub mod tls;
pub mod wait;
pub mod ws;

pub use binaries::bin_path;
pub use device::{
    ConnectOptions, FrameReader, FrameWriter, RelayTarget, TestDevice, refusal_code, refused,
    stored,
};
pub use envelopes::{conversation, make_envelope, make_envelope_sized};
pub use identity::DeviceIdentity;
pub use process::RelayProcess;
pub use rng::SeededRng;
pub use wait::{wait_until, wait_until_async, wait_until_blocking, within};

use hush_protocol::{ErrorCode, ProtocolError, ServerFrame, WireError};
use std::time::Duration;

/// Everything that can go wrong while driving a relay from a test.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The bound that was exceeded.
        after: Duration,
    },
    /// Local IO (files, pipes, sockets) failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The QUIC handshake or stream setup failed.
    #[error("connect: {0}")]
    Connect(String),
    /// An established connection or stream failed.
    #[error("connection lost: {0}")]
    Connection(String),
    /// The relay's bytes did not decode.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The relay refused a request with an error frame.
    #[error("relay refused: {0}")]
    Refused(WireError),
    /// The relay announced it is closing the connection.
    #[error("relay closing the connection: {code:?} {reason}")]
    Closing {
        /// Why.
        code: ErrorCode,
        /// Detail from the relay.
        reason: String,
    },
    /// The relay answered with a frame that does not fit the request.
    #[error("unexpected frame: {0:?}")]
    Unexpected(Box<ServerFrame>),
    /// The relay process failed to start or exited unexpectedly.
    #[error("relay process: {0}")]
    Process(String),
    /// Building a workspace binary failed.
    #[error("build: {0}")]
    Build(String),
    /// A PostgreSQL server of [`pg::PgCluster`] failed to start or answer.
    #[error("postgres: {0}")]
    Postgres(String),
}

impl HarnessError {
    /// The wire error code if this is a refusal or a closing notice.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            HarnessError::Refused(e) => Some(e.code),
            HarnessError::Closing { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True if the connection (not just one request) is unusable: callers
    /// that survive relay crashes reconnect on these.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            HarnessError::Connection(_)
                | HarnessError::Connect(_)
                | HarnessError::Closing { .. }
                | HarnessError::Timeout { .. }
        )
    }
}

/// Result alias of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
