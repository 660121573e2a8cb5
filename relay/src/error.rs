//! The relay crate's error type.
//!
//! Refusals of a peer's request are not errors here: they are typed
//! [`hush_protocol::WireError`] frames. `RelayError` is for the operator —
//! bad configuration, unusable certificates, ports that cannot be bound,
//! storage that fails — and always says what it was doing.

use crate::store::StoreError;
use std::path::PathBuf;

/// Everything that can stop the relay from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration is invalid (bad flag, bad file, contradictory options).
    #[error("configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What the file is for ("certificate", "data directory", …).
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// A socket could not be bound or used.
    #[error("{what} {addr}: {source}")]
    Net {
        /// Which listener ("QUIC", "HTTP").
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// The certificate or key is unusable, or TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A background task ended unexpectedly.
    #[error("internal: {0}")]
    Internal(String),
    /// The store refuses every send until a restart; the relay stopped so
    /// that its supervisor restarts it (`--exit-on-store-failure`).
    #[error("stopped because the store failed: {0}")]
    StoreFailed(String),
}
