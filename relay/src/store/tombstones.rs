//! Tombstones of envelopes that expired unread, and the [`Truncation`] a pull
//! reports from them.
//!
//! When an envelope is purged before its recipient acknowledged it, the relay
//! keeps the only thing the recipient needs to recover: who sent it, in which
//! conversation, under which sender seq. A pull whose cursor predates such
//! tombstones reports them merged into per-(sender, conversation) ranges, so
//! the client can ask each sender to resend exactly what is missing.

use hush_protocol::limits::MAX_DROPPED_RANGES;
use hush_protocol::{ConversationId, DeviceId, DroppedRange, Truncation};

/// What remains of an envelope that expired unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Tombstone {
    /// The sending device.
    pub sender: DeviceId,
    /// The conversation.
    pub conversation: ConversationId,
    /// The sender seq of the lost envelope.
    pub sender_seq: u64,
}

/// Build the truncation report of a pull from every tombstone with seq >
/// `after`, or `None` if there is none.
///
/// Ranges are sorted by (sender, conversation, first seq) — a deterministic
/// order both stores share — and merge sender seqs that are equal or
/// adjacent. At most [`MAX_DROPPED_RANGES`] ranges are reported (the first in
/// that order); `dropped_count` always counts every tombstone.
pub(crate) fn truncation(
    oldest_retained: u64,
    tombstones: impl IntoIterator<Item = Tombstone>,
) -> Option<Truncation> {
    let mut all: Vec<Tombstone> = tombstones.into_iter().collect();
    if all.is_empty() {
        return None;
    }
    let dropped_count = all.len() as u64;
    all.sort_unstable();
    let mut dropped: Vec<DroppedRange> = Vec::new();
    for t in all {
        if let Some(last) = dropped.last_mut()
            && last.sender == t.sender
            && last.conversation == t.conversation
            && t.sender_seq <= last.last_seq.saturating_add(1)
        {
            last.last_seq = last.last_seq.max(t.sender_seq);
            continue;
        }
        if dropped.len() == MAX_DROPPED_RANGES {
            break;
        }
        dropped.push(DroppedRange {
            sender: t.sender,
            conversation: t.conversation,
            first_seq: t.sender_seq,
            last_seq: t.sender_seq,
        });
    }
    Some(Truncation {
        oldest_retained,
        dropped_count,
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(sender: u8, conv: u8, seq: u64) -> Tombstone {
        Tombstone {
            sender: DeviceId([sender; 16]),
            conversation: ConversationId([conv; 16]),
            sender_seq: seq,
        }
    }

    fn range(sender: u8, conv: u8, first: u64, last: u64) -> DroppedRange {
        DroppedRange {
            sender: DeviceId([sender; 16]),
            conversation: ConversationId([conv; 16]),
            first_seq: first,
            last_seq: last,
        }
    }

    #[test]
    fn none_without_tombstones() {
        assert_eq!(truncation(5, []), None);
    }

    #[test]
    fn merges_adjacent_and_splits_gaps_per_sender_and_conversation() {
        // Interleaved in relay-seq order, as an inbox would hold them.
        let input = [
            t(2, 1, 4),
            t(1, 1, 2),
            t(1, 2, 9),
            t(1, 1, 1),
            t(1, 1, 3),
            t(2, 1, 5),
            t(1, 1, 6),
            t(1, 1, 3), // the same sender seq twice stays one range
        ];
        let tr = truncation(17, input).unwrap();
        assert_eq!(tr.oldest_retained, 17);
        assert_eq!(tr.dropped_count, 8);
        assert_eq!(
            tr.dropped,
            vec![
                range(1, 1, 1, 3),
                range(1, 1, 6, 6),
                range(1, 2, 9, 9),
                range(2, 1, 4, 5),
            ]
        );
    }

    #[test]
    fn caps_ranges_but_counts_everything() {
        let n = MAX_DROPPED_RANGES as u64 + 10;
        // Every other sender seq: no two merge.
        let tr = truncation(1, (0..n).map(|i| t(1, 1, i * 2))).unwrap();
        assert_eq!(tr.dropped_count, n);
        assert_eq!(tr.dropped.len(), MAX_DROPPED_RANGES);
        assert_eq!(tr.dropped[0], range(1, 1, 0, 0));
        let last = (MAX_DROPPED_RANGES as u64 - 1) * 2;
        assert_eq!(tr.dropped[MAX_DROPPED_RANGES - 1], range(1, 1, last, last));
    }

    #[test]
    fn extreme_sender_seqs_do_not_overflow() {
        let tr = truncation(1, [t(1, 1, u64::MAX), t(1, 1, u64::MAX - 1)]).unwrap();
        assert_eq!(tr.dropped, vec![range(1, 1, u64::MAX - 1, u64::MAX)]);
    }
}
