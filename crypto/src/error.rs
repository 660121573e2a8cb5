//! The single error type of the crate.
//!
//! Every fallible function returns [`CryptoError`]. Variants are specific so the
//! client engine can react differently (drop a replay silently, ask for a new
//! prekey bundle, surface a tampering warning) without string matching. No
//! variant carries secret material.

/// Everything that can go wrong in `hush-crypto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// An Ed25519 signature did not verify (wrong key, wrong domain, tampered message).
    #[error("signature verification failed")]
    BadSignature,
    /// AEAD authentication failed: wrong key, tampered ciphertext, header or associated data.
    #[error("authenticated decryption failed")]
    DecryptFailed,
    /// A public key is malformed or yields a non-contributory (all-zero) Diffie-Hellman output.
    #[error("invalid or low-order public key")]
    BadKey,
    /// The identity presented does not match the one the keys were made for.
    #[error("identity key mismatch")]
    IdentityMismatch,
    /// A message claims a position more than the allowed number of keys ahead in its chain.
    #[error("message index jumps {requested} keys ahead; at most {limit} allowed")]
    JumpTooFar {
        /// How many message keys would have to be skipped.
        requested: u64,
        /// The configured maximum.
        limit: u32,
    },
    /// A message claims a reseed generation too far ahead of what this session has seen.
    #[error("message skips {requested} chain reseeds; at most {limit} allowed")]
    TooManySkipped {
        /// How many reseed generations would have to be skipped.
        requested: u64,
        /// The configured maximum.
        limit: u32,
    },
    /// The message key was already used (a replay or duplicate delivery), or was
    /// discarded by the bounded skipped-key store.
    #[error("message already decrypted (replay or duplicate)")]
    Duplicate,
    /// The message belongs to a receiving chain this session no longer holds
    /// (evicted by the retention bounds, or closed by the sender).
    #[error("message belongs to a chain this session no longer holds")]
    UnknownChain,
    /// The session has not received the peer's ratchet key yet and so cannot send.
    #[error("session cannot send before it has received a message from the peer")]
    NotReady,
    /// The referenced signed or one-time prekey does not exist (unknown id, expired,
    /// or a one-time prekey that was already consumed).
    #[error("no such prekey (unknown, expired or already used)")]
    NoPrekey,
    /// Storing more one-time prekeys would exceed the bound.
    #[error("too many one-time prekeys stored (limit {limit})")]
    TooManyPrekeys {
        /// The maximum number of stored one-time prekeys.
        limit: usize,
    },
    /// Padding is not the canonical ISO/IEC 7816-4 form for its bucket.
    #[error("invalid message padding")]
    BadPadding,
    /// Input is shorter than the fixed layout requires.
    #[error("input truncated or wrong length")]
    Truncated,
    /// A ratchet header is inconsistent (e.g. reseed key present on generation 0).
    #[error("malformed ratchet header")]
    MalformedHeader,
    /// A signed device list is not canonical (unsorted, duplicate ids, too long).
    #[error("malformed device list")]
    MalformedDeviceList,
    /// Stored state could not be decoded or violates an invariant.
    #[error("malformed stored state: {0}")]
    MalformedState(&'static str),
    /// A rotation policy exceeds the house limits (100 messages, 7 days) or is zero.
    #[error("invalid rotation policy")]
    BadPolicy,
    /// A 32-bit counter (message index, generation, prekey id) would overflow.
    #[error("counter exhausted")]
    CounterExhausted,
    /// The operating system random number generator is not available.
    #[error("operating system RNG unavailable")]
    RngUnavailable,
    /// An internal invariant failed; unreachable unless a dependency misbehaves.
    #[error("internal error: {0}")]
    Internal(&'static str),
}
