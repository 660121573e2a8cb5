//! Errors: local decode failures and the typed refusals sent on the wire.

use serde::{Deserialize, Serialize};

/// Why a byte string could not be turned into a protocol value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The input ended before the value was complete.
    #[error("truncated input: needed {needed} more bytes")]
    Truncated {
        /// How many more bytes were required at the point of failure.
        needed: usize,
    },
    /// A length field or item count exceeds a protocol limit.
    #[error("{what} too large: {len} > {max}")]
    TooLarge {
        /// Which field was too large.
        what: &'static str,
        /// The declared or actual size.
        len: usize,
        /// The protocol limit.
        max: usize,
    },
    /// The version byte is not one this implementation speaks.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The bytes are not a valid encoding.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// Bytes were left over after a complete value.
    #[error("{0} trailing bytes after a complete value")]
    TrailingBytes(usize),
}

impl ProtocolError {
    /// The wire error code a relay answers with when a peer's frame fails to decode.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// The kinds of refusal the relay reports. Stable on the wire: new codes are
/// only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The device id is not registered on this relay.
    UnknownDevice,
    /// Authentication failed (bad signature, wrong key, stale challenge).
    BadAuth,
    /// A frame, envelope or batch exceeds a limit.
    TooLarge,
    /// The recipient's inbox is full (message or byte quota).
    Quota,
    /// The connection sends faster than its rate limit allows.
    RateLimited,
    /// The pull cursor predates what the relay still holds.
    ExpiredCursor,
    /// The frame could not be decoded or violates the protocol.
    BadFrame,
    /// The frame's protocol version is not supported.
    UnsupportedVersion,
    /// The request needs an authenticated connection.
    NotAuthenticated,
    /// The device may not do this (e.g. read another device's inbox).
    Forbidden,
    /// The device id is already registered with different keys.
    AlreadyRegistered,
    /// The target device has published no prekeys.
    NoPrekeys,
    /// A newer connection of the same device replaced this one.
    Replaced,
    /// The relay is shutting down; reconnect later.
    ShuttingDown,
    /// The relay failed internally; the request may be retried.
    Internal,
    /// The relay's store is at its global size cap: sends are refused until
    /// acknowledged envelopes free space. Pulls and acks keep working.
    StoreFull,
    /// The user already has as many registered devices as the relay allows.
    DeviceLimit,
    /// Too many registrations from this network address recently; the
    /// refusal's `retry_after_ms` says when to try again.
    RegistrationLimit,
    /// Position 18. A blob put exceeds a blob limit: the blob is larger than
    /// the relay accepts, or the device holds too many (or too large) open
    /// blobs already.
    BlobLimit,
    /// Position 19. No such blob: never created, expired, or not yet
    /// written that far.
    UnknownBlob,
    /// Position 20. The device was removed: its user published a device
    /// list without it. The relay freed its inbox and refuses its
    /// authentication (and registration) from then on.
    DeviceRemoved,
}

/// A refusal as sent on the wire: a code for programs, a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Machine-readable kind.
    pub code: ErrorCode,
    /// Human-readable detail (at most [`crate::limits::MAX_TEXT_LEN`] bytes);
    /// never contains message content or keys.
    pub message: String,
    /// For [`ErrorCode::RateLimited`]: how long to wait before retrying, in ms.
    pub retry_after_ms: Option<u32>,
}

impl WireError {
    /// A refusal with a message, truncated to the protocol's text limit.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_text(&mut message);
        WireError {
            code,
            message,
            retry_after_ms: None,
        }
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

/// Cut a string to at most [`crate::limits::MAX_TEXT_LEN`] bytes on a char boundary.
pub(crate) fn truncate_text(s: &mut String) {
    let max = crate::limits::MAX_TEXT_LEN;
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_TEXT_LEN;

    #[test]
    fn truncate_text_cuts_on_a_char_boundary() {
        let mut ascii = "a".repeat(MAX_TEXT_LEN + 10);
        truncate_text(&mut ascii);
        assert_eq!(ascii.len(), MAX_TEXT_LEN);

        // 3-byte chars: 256 is not a boundary, 255 is.
        let mut wide = "€".repeat(100);
        truncate_text(&mut wide);
        assert_eq!(wide.len(), 255);
        assert!(wide.chars().all(|c| c == '€'));

        let mut short = String::from("fine");
        truncate_text(&mut short);
        assert_eq!(short, "fine");
    }

    #[test]
    fn wire_error_new_truncates_and_leaves_retry_unset() {
        let e = WireError::new(ErrorCode::Quota, "x".repeat(1000));
        assert_eq!(e.message.len(), MAX_TEXT_LEN);
        assert_eq!(e.retry_after_ms, None);
        assert_eq!(e.code, ErrorCode::Quota);
        assert!(e.to_string().starts_with("Quota: xxx"));
    }

    #[test]
    fn protocol_errors_describe_themselves() {
        let e = ProtocolError::TooLarge {
            what: "frame",
            len: 9,
            max: 8,
        };
        assert_eq!(e.to_string(), "frame too large: 9 > 8");
        assert_eq!(e.code(), ErrorCode::TooLarge);
        assert_eq!(
            ProtocolError::Truncated { needed: 2 }.to_string(),
            "truncated input: needed 2 more bytes"
        );
        assert_eq!(ProtocolError::TrailingBytes(3).code(), ErrorCode::BadFrame);
    }
}
