//! Envelopes that are valid on the wire but not really encrypted.
//!
//! The relay cannot tell real ciphertext from filler, so most relay tests use
//! these; the plaintext test seals with `hush-crypto` instead.

use hush_protocol::envelope::MIN_CIPHERTEXT_LEN;
use hush_protocol::{ConversationId, DeviceId, Envelope, EnvelopeHeader, MessageId};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Length of the filler ratchet header (a DH key and two counters).
pub const RATCHET_FILLER_LEN: usize = 40;

/// Makes every generated message id unique within a process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh, time-ordered message id.
pub fn fresh_message_id(sender: &DeviceId) -> MessageId {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = Sha256::new();
    h.update(sender.as_bytes());
    h.update(n.to_be_bytes());
    h.update(std::process::id().to_be_bytes());
    let digest = h.finalize();
    let mut random = [0u8; 10];
    random.copy_from_slice(&digest.as_slice()[..10]);
    MessageId::new(now_ms(), random)
}

/// A header with a fresh message id and a filler ratchet header.
pub fn make_header(
    sender: DeviceId,
    recipient: DeviceId,
    conversation: ConversationId,
    sender_seq: u64,
) -> EnvelopeHeader {
    EnvelopeHeader {
        message_id: fresh_message_id(&sender),
        sender_device: sender,
        recipient_device: recipient,
        conversation_id: conversation,
        sender_seq,
        sent_at_ms: now_ms(),
        ratchet: vec![0x5a; RATCHET_FILLER_LEN],
        session_init: None,
        important: false,
    }
}

/// A syntactically valid envelope whose "ciphertext" is `body` followed by a
/// 16-byte filler tag. A retry must reuse the returned value (same message id).
pub fn make_envelope(
    sender: DeviceId,
    recipient: DeviceId,
    conversation: ConversationId,
    sender_seq: u64,
    body: &[u8],
) -> Envelope {
    let mut ciphertext = body.to_vec();
    ciphertext.extend_from_slice(&[0xc7; MIN_CIPHERTEXT_LEN]);
    Envelope {
        header: make_header(sender, recipient, conversation, sender_seq),
        ciphertext,
    }
}

/// An envelope whose encoding ([`Envelope::to_bytes`]) is exactly
/// `encoded_len` bytes (at least the header plus a tag), filled with `fill`.
pub fn make_envelope_sized(
    sender: DeviceId,
    recipient: DeviceId,
    conversation: ConversationId,
    sender_seq: u64,
    encoded_len: usize,
    fill: u8,
) -> Envelope {
    let header = make_header(sender, recipient, conversation, sender_seq);
    let body_len = encoded_len
        .saturating_sub(header.encoded_len())
        .max(MIN_CIPHERTEXT_LEN);
    Envelope {
        header,
        ciphertext: vec![fill; body_len],
    }
}

/// A conversation id from a small number (tests name conversations 1, 2, …).
pub fn conversation(n: u64) -> ConversationId {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    ConversationId(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_envelope_has_the_exact_length_and_round_trips() {
        let e = make_envelope_sized(
            DeviceId([1; 16]),
            DeviceId([2; 16]),
            conversation(1),
            1,
            1024,
            7,
        );
        let bytes = e.to_bytes().unwrap();
        assert_eq!(bytes.len(), 1024);
        assert_eq!(Envelope::from_bytes(&bytes).unwrap(), e);
    }

    #[test]
    fn message_ids_are_unique() {
        let a = make_envelope(
            DeviceId([1; 16]),
            DeviceId([2; 16]),
            conversation(1),
            1,
            b"x",
        );
        let b = make_envelope(
            DeviceId([1; 16]),
            DeviceId([2; 16]),
            conversation(1),
            1,
            b"x",
        );
        assert_ne!(a.header.message_id, b.header.message_id);
    }
}
