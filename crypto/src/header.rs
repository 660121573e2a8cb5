//! Fixed-size wire formats the protocol crate embeds verbatim in envelope headers.
//!
//! All integers are big-endian; all fields have fixed offsets so parsing needs no
//! length prefixes and cannot be ambiguous.

use crate::CryptoError;
use serde::{Deserialize, Serialize};

/// Byte length of [`RatchetHeader::to_bytes`].
pub const RATCHET_HEADER_LEN: usize = 76;
/// Byte length of [`SessionInit::to_bytes`].
pub const SESSION_INIT_LEN: usize = 77;

/// The per-message ratchet header (sent in clear, authenticated by the AEAD).
///
/// Byte layout ([`RATCHET_HEADER_LEN`] = 76 bytes):
///
/// | offset | len | field |
/// |---|---|---|
/// | 0 | 32 | `dh` — sender's current ratchet public key |
/// | 32 | 4 | `previous_chain_len` — messages in the sender's previous sending chain |
/// | 36 | 4 | `index` — message number in the current sending chain |
/// | 40 | 4 | `generation` — reseed generation of the chain (0 = fresh from a DH step) |
/// | 44 | 32 | `reseed` — ephemeral X25519 key of the reseed; all zero when `generation == 0` |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RatchetHeader {
    /// Sender's current ratchet public key.
    pub dh: [u8; 32],
    /// Number of messages in the sender's previous sending chain (the previous
    /// reseed generation, or the last chain before the latest DH step).
    pub previous_chain_len: u32,
    /// Index of this message within its sending chain.
    pub index: u32,
    /// Reseed generation within the chain started by `dh` (0 = not reseeded).
    pub generation: u32,
    /// Public half of the reseed ephemeral; zero when `generation == 0`.
    pub reseed: [u8; 32],
}

impl RatchetHeader {
    /// Serialises to the fixed layout documented on the type.
    pub fn to_bytes(&self) -> [u8; RATCHET_HEADER_LEN] {
        let mut out = [0u8; RATCHET_HEADER_LEN];
        out[0..32].copy_from_slice(&self.dh);
        out[32..36].copy_from_slice(&self.previous_chain_len.to_be_bytes());
        out[36..40].copy_from_slice(&self.index.to_be_bytes());
        out[40..44].copy_from_slice(&self.generation.to_be_bytes());
        out[44..76].copy_from_slice(&self.reseed);
        out
    }

    /// Parses the fixed layout.
    ///
    /// # Errors
    /// [`CryptoError::Truncated`] if `bytes` is not exactly [`RATCHET_HEADER_LEN`]
    /// long, [`CryptoError::MalformedHeader`] if the reseed field is inconsistent
    /// with the generation.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let b: &[u8; RATCHET_HEADER_LEN] = bytes.try_into().map_err(|_| CryptoError::Truncated)?;
        let h = Self {
            dh: arr32(&b[0..32])?,
            previous_chain_len: be32(&b[32..36])?,
            index: be32(&b[36..40])?,
            generation: be32(&b[40..44])?,
            reseed: arr32(&b[44..76])?,
        };
        h.check()?;
        Ok(h)
    }

    /// Structural check: a reseed key is present exactly when `generation > 0`.
    pub(crate) fn check(&self) -> Result<(), CryptoError> {
        if (self.generation == 0) != (self.reseed == [0u8; 32]) {
            return Err(CryptoError::MalformedHeader);
        }
        Ok(())
    }
}

/// What the initiator sends (in every envelope until the responder replies) so
/// the responder can run its half of X3DH.
///
/// Byte layout ([`SESSION_INIT_LEN`] = 77 bytes): `initiator_identity (32) ‖
/// ephemeral (32) ‖ signed_prekey_id (u32 BE) ‖ has_one_time (1 byte, 0 or 1) ‖
/// one_time_prekey_id (u32 BE, zero when absent)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionInit {
    /// Initiator's X25519 identity (agreement) public key.
    pub initiator_identity: [u8; 32],
    /// Initiator's X3DH ephemeral public key.
    pub ephemeral: [u8; 32],
    /// Which of the responder's signed prekeys was used.
    pub signed_prekey_id: u32,
    /// Which one-time prekey was used, if any.
    pub one_time_prekey_id: Option<u32>,
}

impl SessionInit {
    /// Serialises to the fixed layout documented on the type.
    pub fn to_bytes(&self) -> [u8; SESSION_INIT_LEN] {
        let mut out = [0u8; SESSION_INIT_LEN];
        out[0..32].copy_from_slice(&self.initiator_identity);
        out[32..64].copy_from_slice(&self.ephemeral);
        out[64..68].copy_from_slice(&self.signed_prekey_id.to_be_bytes());
        if let Some(id) = self.one_time_prekey_id {
            out[68] = 1;
            out[69..73].copy_from_slice(&id.to_be_bytes());
        }
        out
    }

    /// Parses the fixed layout.
    ///
    /// # Errors
    /// [`CryptoError::Truncated`] on a wrong length, [`CryptoError::MalformedHeader`]
    /// on a flag byte other than 0/1, non-zero id without flag, or non-zero trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let b: &[u8; SESSION_INIT_LEN] = bytes.try_into().map_err(|_| CryptoError::Truncated)?;
        let id = be32(&b[69..73])?;
        let one_time_prekey_id = match b[68] {
            0 if id == 0 => None,
            1 => Some(id),
            _ => return Err(CryptoError::MalformedHeader),
        };
        if b[73..] != [0u8; 4] {
            return Err(CryptoError::MalformedHeader);
        }
        Ok(Self {
            initiator_identity: arr32(&b[0..32])?,
            ephemeral: arr32(&b[32..64])?,
            signed_prekey_id: be32(&b[64..68])?,
            one_time_prekey_id,
        })
    }
}

fn arr32(b: &[u8]) -> Result<[u8; 32], CryptoError> {
    b.try_into().map_err(|_| CryptoError::Truncated)
}

fn be32(b: &[u8]) -> Result<u32, CryptoError> {
    let a: [u8; 4] = b.try_into().map_err(|_| CryptoError::Truncated)?;
    Ok(u32::from_be_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = RatchetHeader {
            dh: [1; 32],
            previous_chain_len: 0x0102_0304,
            index: 5,
            generation: 2,
            reseed: [9; 32],
        };
        let b = h.to_bytes();
        assert_eq!(&b[32..36], &[1, 2, 3, 4]);
        assert_eq!(&b[36..40], &[0, 0, 0, 5]);
        assert_eq!(RatchetHeader::from_bytes(&b).unwrap(), h);
        assert_eq!(
            RatchetHeader::from_bytes(&b[..75]),
            Err(CryptoError::Truncated)
        );
        let mut bad = b;
        bad[40..44].copy_from_slice(&[0; 4]);
        assert_eq!(
            RatchetHeader::from_bytes(&bad),
            Err(CryptoError::MalformedHeader)
        );
    }

    #[test]
    fn session_init_round_trip() {
        for otk in [None, Some(7u32), Some(0)] {
            let i = SessionInit {
                initiator_identity: [3; 32],
                ephemeral: [4; 32],
                signed_prekey_id: 9,
                one_time_prekey_id: otk,
            };
            assert_eq!(SessionInit::from_bytes(&i.to_bytes()).unwrap(), i);
        }
        let mut b = [0u8; SESSION_INIT_LEN];
        b[68] = 2;
        assert_eq!(
            SessionInit::from_bytes(&b),
            Err(CryptoError::MalformedHeader)
        );
    }
}
