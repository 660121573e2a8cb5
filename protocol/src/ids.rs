//! Fixed-size identifiers.
//!
//! All identifiers are plain byte arrays: they appear in plaintext headers the
//! relay must read (to route and deduplicate) but they carry no meaning the
//! relay could exploit beyond that. `Display` prints lowercase hex.

use serde::{Deserialize, Serialize};

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length of the identifier in bytes.
            pub const LEN: usize = $len;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Parse from lowercase or uppercase hex.
            pub fn from_hex(s: &str) -> Result<Self, crate::ProtocolError> {
                let mut out = [0u8; $len];
                hex::decode_to_slice(s, &mut out)
                    .map_err(|_| crate::ProtocolError::Malformed(stringify!($name)))?;
                Ok($name(out))
            }

            /// Lowercase hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl From<[u8; $len]> for $name {
            fn from(b: [u8; $len]) -> Self {
                $name(b)
            }
        }
    };
}

byte_id!(
    /// A device, chosen at random by the device when it is created.
    DeviceId,
    16
);
byte_id!(
    /// A relay blob (a history archive being handed to a new device): 16
    /// random bytes chosen by its uploader. Knowing the id is what lets a
    /// device download the blob, so it is a capability: it travels only
    /// inside end-to-end encrypted payloads.
    BlobId,
    16
);
byte_id!(
    /// A conversation between users, chosen by whoever starts it.
    ConversationId,
    16
);
byte_id!(
    /// A user's long-term identity: the Ed25519 public key that signs the
    /// user's device list. Contact codes carry it, so the relay cannot swap it.
    UserKey,
    32
);
byte_id!(
    /// A message id: 48-bit big-endian milliseconds since the Unix epoch, then
    /// 80 random bits. Minted by the sender, so retries carry the same id and
    /// the relay deduplicates by id, never by content. Ids sort by creation
    /// time across devices without coordination (snowflake-like), but Hush
    /// never orders a conversation by them: sender seqs decide order.
    MessageId,
    16
);

impl MessageId {
    /// Build an id from the creation time and 80 bits of randomness.
    pub fn new(unix_ms: u64, random: [u8; 10]) -> Self {
        let mut b = [0u8; 16];
        let ts = unix_ms & 0xFFFF_FFFF_FFFF;
        b[..6].copy_from_slice(&ts.to_be_bytes()[2..]);
        b[6..].copy_from_slice(&random);
        MessageId(b)
    }

    /// The creation time embedded in the id, in ms since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        let mut t = [0u8; 8];
        t[2..].copy_from_slice(&self.0[..6]);
        u64::from_be_bytes(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_keeps_timestamp_and_sorts_by_time() {
        let a = MessageId::new(1_700_000_000_000, [0xFF; 10]);
        let b = MessageId::new(1_700_000_000_001, [0x00; 10]);
        assert_eq!(a.timestamp_ms(), 1_700_000_000_000);
        assert!(a < b);
    }

    #[test]
    fn hex_round_trip_and_rejects_garbage() {
        let d = DeviceId([7; 16]);
        assert_eq!(DeviceId::from_hex(&d.to_hex()), Ok(d));
        assert!(DeviceId::from_hex("zz").is_err());
        assert!(DeviceId::from_hex(&"00".repeat(15)).is_err());
    }
}
