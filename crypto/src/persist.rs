//! Versioned persistence helpers.
//!
//! Every stored secret-bearing type (identities, prekey secrets, sessions)
//! serialises through serde as a one-variant enum `V1(..)`, so a future format
//! change adds `V2` and old records still decode. The `to_bytes`/`from_bytes`
//! convenience methods use postcard and return [`Zeroizing`] buffers because the
//! encoding contains private keys.

use crate::CryptoError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

/// Counts bytes instead of storing them (sizing pass).
struct Counter(usize);

impl Extend<u8> for Counter {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0 = self.0.saturating_add(iter.into_iter().count());
    }
}

/// Encodes `value` with postcard into a buffer that is wiped on drop.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    // Size first, so the output buffer never reallocates (a reallocation would
    // leave an unwiped copy of the secrets in freed memory).
    let size = postcard::to_extend(value, Counter(0))
        .map_err(|_| CryptoError::Internal("encode"))?
        .0;
    let buf = postcard::to_extend(value, Vec::with_capacity(size))
        .map_err(|_| CryptoError::Internal("encode"))?;
    Ok(Zeroizing::new(buf))
}

/// Decodes a postcard record, mapping every failure to [`CryptoError::MalformedState`].
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CryptoError> {
    postcard::from_bytes(bytes).map_err(|_| CryptoError::MalformedState("undecodable record"))
}
