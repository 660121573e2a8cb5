//! Small wrappers that keep secret bytes out of logs and wipe them on drop.
//!
//! [`Secret32`] is the one container for every 32-byte secret the crate holds in
//! its own structs (root key, chain keys, message keys, X25519 private keys, reseed
//! seeds). Centralising it means the redacted `Debug` and zeroize-on-drop behaviour
//! is written and tested once. It serialises as a plain 32-byte array because the
//! client must be able to persist session state.

use core::fmt;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A 32-byte secret: zeroized on drop, `Debug` prints `[redacted]`.
#[derive(Clone, Zeroize, ZeroizeOnDrop, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Secret32(pub(crate) [u8; 32]);

impl Secret32 {
    /// Borrows the secret bytes (only for feeding them to a primitive).
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Serde helper for `[u8; 64]` (serde derives only cover arrays up to 32).
///
/// Encoded as a fixed 64-element tuple, which is 64 raw bytes in postcard and an
/// array of numbers in JSON, matching how serde encodes `[u8; 32]`.
pub(crate) mod bytes64 {
    use core::fmt;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::ser::SerializeTuple;
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(value: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(64)?;
        for b in value {
            t.serialize_element(b)?;
        }
        t.end()
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = [u8; 64];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; 64], A::Error> {
                let mut out = [0u8; 64];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(out)
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<[u8; 64], E> {
                <[u8; 64]>::try_from(v).map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_tuple(64, V)
    }
}
