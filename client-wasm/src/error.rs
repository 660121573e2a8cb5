//! The crate's one error type.
//!
//! Everything that comes from the network, from storage or from the user is
//! checked and turned into a [`ClientError`]; nothing in the engine panics on
//! foreign input. Variants are specific enough for a driver to decide what to
//! do (show a message, drop the connection, rebuild the engine from storage).

use hush_crypto::CryptoError;
use hush_protocol::ProtocolError;

/// Everything that can go wrong in `hush-client`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A storage backend failed or holds something it cannot read.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A cryptographic operation failed (bad signature, undecryptable message…).
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    /// Bytes from the relay or a peer did not decode.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// A contact or link code is not valid.
    #[error("invalid code: {0}")]
    BadCode(&'static str),
    /// The command names a contact, conversation or message this device does not know.
    #[error("unknown {0}")]
    Unknown(&'static str),
    /// The command is not possible in the current state (e.g. retrying a message
    /// that has not failed, linking before the device exists).
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
    /// A message is too long to fit in an envelope.
    #[error("message too large: {len} bytes (max {max})")]
    TooLarge {
        /// Encoded size of the message.
        len: usize,
        /// The largest size that fits.
        max: usize,
    },
    /// Storage holds no device: create one or join with a link code first.
    #[error("no device in storage")]
    NoDevice,
    /// This build's cryptography gave a wrong known answer at start-up
    /// ([`crate::self_test`]): the client refuses to run.
    #[error("the encryption of this build failed its self-test ({0}): refusing to run")]
    SelfTest(CryptoError),
    /// A history archive (history transfer to a new device) is truncated,
    /// reordered, tampered with or sealed under another key.
    #[error("history archive: {0}")]
    Archive(&'static str),
}

/// Failures of a [`crate::storage::Storage`] backend.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend's IO failed (disk full, permission, closed database…).
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// A record could not be decoded: the store is corrupt or from an
    /// incompatible version. Carries the record's key (never its value).
    #[error("corrupt record {key}")]
    Corrupt {
        /// The key of the bad record, printable.
        key: String,
    },
    /// The store is sealed (encrypted at rest) and the key given does not
    /// open it: a wrong passphrase or key file, or a key of the wrong kind.
    #[error("wrong key for the client store: {0}")]
    WrongKey(String),
}
