//! The crate's one error type, and the exit status each variant maps to.
//!
//! Every message names its cause in words a user can act on ("relay
//! unreachable at …", "unknown contact …"), because the `hush` binary prints
//! exactly this text before exiting non-zero.

use hush_client::{ClientError, StorageError};
use std::path::PathBuf;

/// Everything that can make a `hush` command fail.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The home directory holds no device yet.
    #[error("not initialised: {0} holds no hush device (run `hush init --relay HOST:PORT` first)")]
    NotInitialised(PathBuf),
    /// `init` on a home directory that already holds a device.
    #[error("already initialised: {0} already holds a hush device")]
    AlreadyInitialised(PathBuf),
    /// The home directory's store is open in another `hush` process.
    #[error("{0} is in use by another hush process (for example a running `hush listen`)")]
    InUse(PathBuf),
    /// No contact by that name.
    #[error("unknown contact {0:?} (add it with `hush contact add NAME CODE`)")]
    UnknownContact(String),
    /// Another contact already has that name.
    #[error("a different contact is already called {0:?}")]
    DuplicateContact(String),
    /// No group by that name (or id).
    #[error("unknown group {0:?} (see `hush group list`)")]
    UnknownGroup(String),
    /// A bare name that is both a contact's and a group's.
    #[error(
        "{0:?} is both a contact and a group: write `#{0}` for the group (a bare name is never guessed)"
    )]
    AmbiguousName(String),
    /// Several groups carry that name.
    #[error(
        "several groups are called {0:?}: name one by its id, `#ID` (ids in `hush group list --json`)"
    )]
    AmbiguousGroup(String),
    /// Several contacts carry that name.
    #[error(
        "several contacts are called {0:?} (a group brought in a member under a name already used here): refusing to guess; `hush contact list --json` shows them"
    )]
    AmbiguousContact(String),
    /// A new group or contact name that a contact or group already has.
    #[error(
        "{0:?} is already the name of a contact or a group here: contact and group names must differ"
    )]
    NameTaken(String),
    /// A contact or link code did not parse.
    #[error("invalid {what}: {reason}")]
    BadCode {
        /// Which kind of code.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The relay refuses this device: its user removed it from another device.
    #[error(
        "this device was removed by its user: the relay refuses it and nothing new is encrypted to it (set it up again with `hush init --link`)"
    )]
    DeviceRemoved,
    /// `hush device remove` named no device of this user.
    #[error("unknown device {0:?} (see `hush device list`)")]
    UnknownDevice(String),
    /// No connection could be made to the relay within the command's bound.
    #[error("relay unreachable at {addr}: {reason}")]
    Unreachable {
        /// `HOST:PORT` as configured.
        addr: String,
        /// The last transport failure.
        reason: String,
    },
    /// The relay's certificate is not the pinned one.
    #[error("certificate mismatch: relay presented sha256 {presented}, expected {expected}")]
    CertMismatch {
        /// Hex SHA-256 of the certificate the relay presented.
        presented: String,
        /// Hex SHA-256 given with `--cert-hash`.
        expected: String,
    },
    /// The relay's certificate did not verify against the system trust roots.
    #[error(
        "the relay at {addr} presented a certificate that does not verify ({reason}); pass --cert-hash for a relay with a self-signed certificate"
    )]
    CertUntrusted {
        /// `HOST:PORT`.
        addr: String,
        /// What the TLS layer said.
        reason: String,
    },
    /// The relay did not confirm a message in time; it stays in the outbox.
    #[error("{0}")]
    NotConfirmed(String),
    /// The relay refused this device (for example a rejected registration).
    #[error("the relay refused this device: {0}")]
    Refused(String),
    /// A configuration value is malformed (address, hash, name…).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The setting.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// TLS or QUIC could not be set up locally.
    #[error("transport setup: {0}")]
    Transport(String),
    /// The local store failed.
    #[error("local storage: {0}")]
    Storage(#[from] StorageError),
    /// The client engine refused or failed.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// Local file IO failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The OS random source failed.
    #[error("no OS randomness: {0}")]
    Random(String),
}

impl CliError {
    /// The process exit status for this error: 3 relay unreachable,
    /// 4 certificate problem, 5 message not confirmed (kept in the outbox),
    /// 6 not initialised / already initialised / in use, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => 3,
            CliError::CertMismatch { .. } | CliError::CertUntrusted { .. } => 4,
            CliError::NotConfirmed(_) => 5,
            CliError::NotInitialised(_) | CliError::AlreadyInitialised(_) | CliError::InUse(_) => 6,
            _ => 1,
        }
    }
}
