//! The archive format: round trip, and every way of breaking it is a typed
//! error.

use super::*;
use hush_protocol::UserKey;

fn message(i: u64) -> ArchivedMessage {
    ArchivedMessage {
        record: HistoryRecord {
            id: MessageId::new(1_700_000_000_000 + i, [i as u8; 10]),
            conversation: ConversationId([(i % 2) as u8; 16]),
            from_user: UserKey([1; 32]),
            from_device: DeviceId([2; 16]),
            sender_seq: i,
            sent_at_ms: i,
            stored_at_ms: i,
            text: format!("message {i}"),
            outgoing: i.is_multiple_of(3),
        },
        read: i.is_multiple_of(2),
        state: i.is_multiple_of(3).then_some(MessageState::Read),
    }
}

fn archive(n: u64) -> (Vec<ArchivedMessage>, Vec<u8>, u32) {
    let messages: Vec<_> = (0..n).map(message).collect();
    let (bytes, chunks) = seal_archive(&KEY, &BLOB, &messages).unwrap();
    (messages, bytes, chunks)
}

const KEY: [u8; 32] = [7; 32];
const BLOB: BlobId = BlobId([9; 16]);

/// Byte ranges of the sealed chunks (length prefix included).
fn pieces(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push(at..at + 4 + len);
        at += 4 + len;
    }
    out
}

#[test]
fn archives_round_trip_in_order_across_chunks() {
    for n in [0, 1, MESSAGES_PER_CHUNK as u64, 1000] {
        let (messages, bytes, chunks) = archive(n);
        assert_eq!(
            chunks as usize,
            (n as usize).div_ceil(MESSAGES_PER_CHUNK).max(1)
        );
        assert_eq!(open_archive(&KEY, &BLOB, chunks, &bytes).unwrap(), messages);
        // Nothing of the plaintext shows.
        if n > 0 {
            let needle = b"message 1";
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }
}

#[test]
fn wrong_key_or_blob_is_refused() {
    let (_, bytes, chunks) = archive(10);
    assert!(matches!(
        open_archive(&[8; 32], &BLOB, chunks, &bytes),
        Err(ClientError::Archive(_))
    ));
    // Bound to its blob: the same bytes under another id do not open.
    assert!(matches!(
        open_archive(&KEY, &BlobId([1; 16]), chunks, &bytes),
        Err(ClientError::Archive(_))
    ));
}

#[test]
fn a_tampered_chunk_is_refused() {
    let (_, bytes, chunks) = archive(600);
    for at in [5, bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 1;
        assert!(
            matches!(
                open_archive(&KEY, &BLOB, chunks, &bad),
                Err(ClientError::Archive(_))
            ),
            "flip at {at}"
        );
    }
}

#[test]
fn truncated_or_reordered_archives_are_refused() {
    let (_, bytes, chunks) = archive(600);
    assert_eq!(chunks, 3);
    let p = pieces(&bytes);
    // Cut inside the last chunk, or after a whole chunk.
    assert!(matches!(
        open_archive(&KEY, &BLOB, chunks, &bytes[..bytes.len() - 1]),
        Err(ClientError::Archive("truncated"))
    ));
    assert!(matches!(
        open_archive(&KEY, &BLOB, chunks, &bytes[..p[1].end]),
        Err(ClientError::Archive("truncated"))
    ));
    // A shorter archive presented as complete: the last flag does not match.
    assert!(matches!(
        open_archive(&KEY, &BLOB, 2, &bytes[..p[1].end]),
        Err(ClientError::Archive(_))
    ));
    // Two chunks swapped.
    let swapped = [
        &bytes[p[1].clone()],
        &bytes[p[0].clone()],
        &bytes[p[2].clone()],
    ]
    .concat();
    assert!(matches!(
        open_archive(&KEY, &BLOB, chunks, &swapped),
        Err(ClientError::Archive(_))
    ));
    // A chunk dropped from the middle.
    let dropped = [&bytes[p[0].clone()], &bytes[p[2].clone()]].concat();
    assert!(matches!(
        open_archive(&KEY, &BLOB, 2, &dropped),
        Err(ClientError::Archive(_))
    ));
    // Extra bytes after the last chunk.
    let mut extra = bytes.clone();
    extra.extend_from_slice(&bytes[p[2].clone()]);
    assert!(matches!(
        open_archive(&KEY, &BLOB, chunks, &extra),
        Err(ClientError::Archive(_))
    ));
}

#[test]
fn a_huge_declared_chunk_length_is_refused_without_waiting() {
    let mut buf = vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    assert!(matches!(
        open_next_chunk(&KEY, &BLOB, 0, 1, &mut buf),
        Err(ClientError::Archive("chunk length out of range"))
    ));
}
