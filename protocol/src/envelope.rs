//! The end-to-end encrypted envelope and its plaintext header.
//!
//! The header is written by hand at fixed offsets (see `docs/PROTOCOL.md`)
//! rather than through serde, because its exact bytes are the associated data
//! that the AEAD authenticates: the relay can read the routing fields (ids,
//! sender seq) but cannot change a single bit of them without the recipient
//! rejecting the envelope. The relay stores and forwards [`Envelope::to_bytes`]
//! verbatim.

use crate::ProtocolError;
use crate::ids::{ConversationId, DeviceId, MessageId};
use crate::limits::{MAX_ENVELOPE_LEN, MAX_RATCHET_HEADER_LEN};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Version byte of the envelope header layout.
pub const ENVELOPE_VERSION: u8 = 1;

/// Header flag: a [`SessionInitHeader`] follows the ratchet header.
pub const FLAG_SESSION_INIT: u8 = 0b0000_0001;

/// Header flag: the sender asked for the relay's long ("important") retention
/// class. The relay reads it to pick how long it keeps the envelope unread;
/// it changes nothing else.
pub const FLAG_IMPORTANT: u8 = 0b0000_0010;

/// Every flag bit this version defines; any other bit set is malformed.
pub const KNOWN_FLAGS: u8 = FLAG_SESSION_INIT | FLAG_IMPORTANT;

/// Bytes of the header before the variable-length ratchet header.
pub const FIXED_HEADER_LEN: usize = 83;

/// Bytes of an encoded [`SessionInitHeader`].
pub const SESSION_INIT_LEN: usize = 72;

/// Smallest possible ciphertext: the 16-byte Poly1305 tag of an empty payload.
pub const MIN_CIPHERTEXT_LEN: usize = 16;

/// Marks "no one-time prekey was used" in [`SessionInitHeader`]'s encoding.
/// Reserved: no one-time prekey may carry this id, since a header naming it
/// would decode as "none used".
pub const NO_ONE_TIME_PREKEY: u32 = u32::MAX;

/// What a sender attaches to its first messages to an offline recipient: the
/// inputs the recipient needs to run the X3DH-style agreement from its prekeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInitHeader {
    /// Initiator's long-term X25519 agreement public key.
    pub initiator_identity: [u8; 32],
    /// Initiator's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// Which of the recipient's signed prekeys was used.
    pub signed_prekey_id: u32,
    /// Which one-time prekey was used, if one was available.
    pub one_time_prekey_id: Option<u32>,
}

/// The plaintext header of an envelope. Everything here is visible to the
/// relay; everything here is also authenticated end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Sender-minted, time-ordered id; the relay's dedup key with the sender.
    pub message_id: MessageId,
    /// The sending device.
    pub sender_device: DeviceId,
    /// The device whose inbox receives this envelope.
    pub recipient_device: DeviceId,
    /// The conversation the message belongs to.
    pub conversation_id: ConversationId,
    /// Per (sender device, conversation, recipient device) contiguous counter,
    /// starting at 1: the recipient detects gaps in it end to end.
    pub sender_seq: u64,
    /// Sender's clock at sealing time, ms since the Unix epoch (display only).
    pub sent_at_ms: u64,
    /// The double-ratchet header, encoded by `hush-crypto`
    /// (at most [`MAX_RATCHET_HEADER_LEN`] bytes).
    pub ratchet: Vec<u8>,
    /// Present on messages sent before the recipient has replied.
    pub session_init: Option<SessionInitHeader>,
    /// Retention class: kept unread up to the relay's important retention
    /// instead of its default one ([`FLAG_IMPORTANT`]).
    pub important: bool,
}

impl EnvelopeHeader {
    /// Length of this header once encoded.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN
            + self.ratchet.len()
            + if self.session_init.is_some() {
                SESSION_INIT_LEN
            } else {
                0
            }
    }

    /// The exact header bytes: what goes on the wire and what the AEAD
    /// authenticates as associated data.
    ///
    /// Fails only if the ratchet header exceeds [`MAX_RATCHET_HEADER_LEN`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.write(&mut out)?;
        Ok(out)
    }

    /// The checks [`EnvelopeHeader::to_bytes`] makes before writing anything.
    fn check(&self) -> Result<(), ProtocolError> {
        if self.ratchet.len() > MAX_RATCHET_HEADER_LEN {
            return Err(ProtocolError::TooLarge {
                what: "ratchet header",
                len: self.ratchet.len(),
                max: MAX_RATCHET_HEADER_LEN,
            });
        }
        if let Some(init) = &self.session_init
            && init.one_time_prekey_id == Some(NO_ONE_TIME_PREKEY)
        {
            // It would be written as "no one-time prekey" and read back as None.
            return Err(ProtocolError::Malformed("reserved one-time prekey id"));
        }
        Ok(())
    }

    fn write(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        self.check()?;
        let mut flags = 0;
        if self.session_init.is_some() {
            flags |= FLAG_SESSION_INIT;
        }
        if self.important {
            flags |= FLAG_IMPORTANT;
        }
        out.push(ENVELOPE_VERSION);
        out.push(flags);
        out.extend_from_slice(self.message_id.as_bytes());
        out.extend_from_slice(self.sender_device.as_bytes());
        out.extend_from_slice(self.recipient_device.as_bytes());
        out.extend_from_slice(self.conversation_id.as_bytes());
        out.extend_from_slice(&self.sender_seq.to_be_bytes());
        out.extend_from_slice(&self.sent_at_ms.to_be_bytes());
        // Checked above: fits in a byte.
        out.push(self.ratchet.len() as u8);
        out.extend_from_slice(&self.ratchet);
        if let Some(init) = &self.session_init {
            out.extend_from_slice(&init.initiator_identity);
            out.extend_from_slice(&init.ephemeral);
            out.extend_from_slice(&init.signed_prekey_id.to_be_bytes());
            out.extend_from_slice(
                &init
                    .one_time_prekey_id
                    .unwrap_or(NO_ONE_TIME_PREKEY)
                    .to_be_bytes(),
            );
        }
        Ok(())
    }

    /// Parse a header from the front of `bytes`; returns it and its length.
    pub fn parse(bytes: &[u8]) -> Result<(EnvelopeHeader, usize), ProtocolError> {
        Self::parse_keeping(bytes, true)
    }

    /// [`EnvelopeHeader::parse`]; with `keep_ratchet` false the ratchet
    /// header is checked but left out (empty), so nothing is allocated.
    fn parse_keeping(
        bytes: &[u8],
        keep_ratchet: bool,
    ) -> Result<(EnvelopeHeader, usize), ProtocolError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if version != ENVELOPE_VERSION {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        let flags = r.u8()?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(ProtocolError::Malformed("envelope flags"));
        }
        let message_id = MessageId(r.array()?);
        let sender_device = DeviceId(r.array()?);
        let recipient_device = DeviceId(r.array()?);
        let conversation_id = ConversationId(r.array()?);
        let sender_seq = u64::from_be_bytes(r.array()?);
        let sent_at_ms = u64::from_be_bytes(r.array()?);
        let ratchet_len = usize::from(r.u8()?);
        if ratchet_len > MAX_RATCHET_HEADER_LEN {
            return Err(ProtocolError::TooLarge {
                what: "ratchet header",
                len: ratchet_len,
                max: MAX_RATCHET_HEADER_LEN,
            });
        }
        let ratchet = r.take(ratchet_len)?;
        let ratchet = if keep_ratchet {
            ratchet.to_vec()
        } else {
            Vec::new()
        };
        let session_init = if flags & FLAG_SESSION_INIT != 0 {
            let initiator_identity = r.array()?;
            let ephemeral = r.array()?;
            let signed_prekey_id = u32::from_be_bytes(r.array()?);
            let otk = u32::from_be_bytes(r.array()?);
            Some(SessionInitHeader {
                initiator_identity,
                ephemeral,
                signed_prekey_id,
                one_time_prekey_id: (otk != NO_ONE_TIME_PREKEY).then_some(otk),
            })
        } else {
            None
        };
        let header = EnvelopeHeader {
            message_id,
            sender_device,
            recipient_device,
            conversation_id,
            sender_seq,
            sent_at_ms,
            ratchet,
            session_init,
            important: flags & FLAG_IMPORTANT != 0,
        };
        Ok((header, r.pos))
    }
}

/// An envelope: plaintext header plus ChaCha20-Poly1305 ciphertext.
///
/// On the wire (inside frames) an envelope is one postcard byte string holding
/// [`Envelope::to_bytes`]; the relay stores those bytes unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The authenticated plaintext header.
    pub header: EnvelopeHeader,
    /// The AEAD output (padded payload + 16-byte tag); opaque to the relay.
    pub ciphertext: Vec<u8>,
}

impl Envelope {
    /// Encode header then ciphertext, enforcing [`MAX_ENVELOPE_LEN`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        self.check()?;
        let mut out = Vec::with_capacity(self.encoded_len());
        self.header.write(&mut out)?;
        out.extend_from_slice(&self.ciphertext);
        Ok(out)
    }

    /// Every check [`Envelope::to_bytes`] makes, without encoding. Frame
    /// validation runs it so that an unencodable envelope in a batch is
    /// reported with its real error rather than as an opaque serializer failure.
    pub(crate) fn check(&self) -> Result<(), ProtocolError> {
        let len = self.encoded_len();
        if len > MAX_ENVELOPE_LEN {
            return Err(ProtocolError::TooLarge {
                what: "envelope",
                len,
                max: MAX_ENVELOPE_LEN,
            });
        }
        if self.ciphertext.len() < MIN_CIPHERTEXT_LEN {
            return Err(ProtocolError::Malformed("ciphertext shorter than a tag"));
        }
        self.header.check()
    }

    /// Length of [`Envelope::to_bytes`].
    pub fn encoded_len(&self) -> usize {
        self.header.encoded_len() + self.ciphertext.len()
    }

    /// Decode an envelope, checking the size limit before anything else.
    pub fn from_bytes(bytes: &[u8]) -> Result<Envelope, ProtocolError> {
        let (header, ciphertext) = Self::split(bytes, true)?;
        Ok(Envelope {
            header,
            ciphertext: ciphertext.to_vec(),
        })
    }

    /// Whether `bytes` decode as an envelope ([`Envelope::from_bytes`]
    /// would succeed), checked without allocating: the relay checks stored
    /// envelopes this way and sends their bytes on as they are.
    pub fn check_bytes(bytes: &[u8]) -> Result<(), ProtocolError> {
        Self::split(bytes, false).map(|_| ())
    }

    /// The size limit, the header, and the ciphertext that follows it.
    fn split(bytes: &[u8], keep_ratchet: bool) -> Result<(EnvelopeHeader, &[u8]), ProtocolError> {
        if bytes.len() > MAX_ENVELOPE_LEN {
            return Err(ProtocolError::TooLarge {
                what: "envelope",
                len: bytes.len(),
                max: MAX_ENVELOPE_LEN,
            });
        }
        let (header, used) = EnvelopeHeader::parse_keeping(bytes, keep_ratchet)?;
        let ciphertext = bytes.get(used..).unwrap_or_default();
        if ciphertext.len() < MIN_CIPHERTEXT_LEN {
            return Err(ProtocolError::Truncated {
                needed: MIN_CIPHERTEXT_LEN - ciphertext.len(),
            });
        }
        Ok((header, ciphertext))
    }

    /// The header's bytes: the AEAD's associated data.
    pub fn associated_data(&self) -> Result<Vec<u8>, ProtocolError> {
        self.header.to_bytes()
    }
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.to_bytes().map_err(serde::ser::Error::custom)?;
        s.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Envelope;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("envelope bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Envelope, E> {
                Envelope::from_bytes(v).map_err(E::custom)
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<Envelope, E> {
                self.visit_bytes(v)
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Envelope, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A bounds-checked cursor over a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(ProtocolError::Truncated { needed: n })?;
        match self.bytes.get(self.pos..end) {
            Some(s) => {
                self.pos = end;
                Ok(s)
            }
            None => Err(ProtocolError::Truncated {
                needed: end - self.bytes.len(),
            }),
        }
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{BytesDeserializer, Error as ValueError};

    fn sample(ratchet: usize, ct: usize, init: bool) -> Envelope {
        Envelope {
            header: EnvelopeHeader {
                message_id: MessageId([1; 16]),
                sender_device: DeviceId([2; 16]),
                recipient_device: DeviceId([3; 16]),
                conversation_id: ConversationId([4; 16]),
                sender_seq: 5,
                sent_at_ms: 6,
                ratchet: vec![7; ratchet],
                session_init: init.then_some(SessionInitHeader {
                    initiator_identity: [8; 32],
                    ephemeral: [9; 32],
                    signed_prekey_id: 10,
                    one_time_prekey_id: Some(11),
                }),
                important: false,
            },
            ciphertext: vec![12; ct],
        }
    }

    #[test]
    fn reader_never_overflows_or_overreads() {
        let mut r = Reader {
            bytes: &[1, 2, 3],
            pos: 1,
        };
        assert_eq!(
            r.take(usize::MAX),
            Err(ProtocolError::Truncated { needed: usize::MAX })
        );
        assert_eq!(r.take(5), Err(ProtocolError::Truncated { needed: 3 }));
        assert_eq!(r.pos, 1, "a failed take consumes nothing");
        assert_eq!(r.take(2), Ok(&[2u8, 3][..]));
        assert_eq!(r.u8(), Err(ProtocolError::Truncated { needed: 1 }));
        assert_eq!(r.array::<4>(), Err(ProtocolError::Truncated { needed: 4 }));
    }

    #[test]
    fn encoded_len_counts_every_part() {
        assert_eq!(sample(0, 16, false).encoded_len(), FIXED_HEADER_LEN + 16);
        assert_eq!(
            sample(40, 100, true).encoded_len(),
            FIXED_HEADER_LEN + 40 + SESSION_INIT_LEN + 100
        );
        let e = sample(40, 100, true);
        assert_eq!(e.to_bytes().map(|b| b.len()), Ok(e.encoded_len()));
    }

    #[test]
    fn one_time_prekey_absence_uses_the_reserved_id() {
        let mut e = sample(0, 16, true);
        if let Some(init) = &mut e.header.session_init {
            init.one_time_prekey_id = None;
        }
        let bytes = e.to_bytes().unwrap_or_default();
        assert_eq!(
            &bytes[FIXED_HEADER_LEN + 68..FIXED_HEADER_LEN + 72],
            &[0xFF; 4]
        );
        assert_eq!(Envelope::from_bytes(&bytes), Ok(e));
    }

    #[test]
    fn serde_carries_envelopes_as_byte_strings() {
        let e = sample(3, 20, true);
        let bytes = e.to_bytes().unwrap_or_default();
        let de = BytesDeserializer::<ValueError>::new(&bytes);
        assert_eq!(Envelope::deserialize(de), Ok(e));
        let mut bad = bytes.clone();
        bad[0] = 9;
        let de = BytesDeserializer::<ValueError>::new(&bad);
        assert!(Envelope::deserialize(de).is_err());
    }

    #[test]
    fn serializing_an_invalid_envelope_fails_instead_of_writing_garbage() {
        let short = sample(0, 15, false);
        assert!(postcard::to_allocvec(&short).is_err());
        let ok = sample(0, 16, false);
        let encoded = postcard::to_allocvec(&ok).unwrap_or_default();
        // A byte string: one length byte (99 < 128) then the envelope.
        assert_eq!(encoded.first(), Some(&99u8));
        assert_eq!(postcard::from_bytes::<Envelope>(&encoded), Ok(ok));
    }
}
