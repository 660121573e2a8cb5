//! Decisions both stores make identically: quota admission, page budgets and
//! which dedup entries a purge takes.
//!
//! Keeping them in one place is what lets the conformance suite hold the
//! memory store and the redb store to the same answers.

use super::{InboxState, Refusal, StoreLimits};

/// Whether an envelope of `len` bytes fits in an inbox in `state`. The
/// message quota is checked first, so an inbox that is full on both counts
/// reports [`Refusal::QuotaMessages`].
pub(crate) fn admit(state: &InboxState, len: u64, limits: &StoreLimits) -> Result<(), Refusal> {
    if state.depth >= limits.max_inbox_messages {
        return Err(Refusal::QuotaMessages);
    }
    match state.bytes.checked_add(len) {
        Some(total) if total <= limits.max_inbox_bytes => Ok(()),
        _ => Err(Refusal::QuotaBytes),
    }
}

/// Whether an envelope of `len` bytes fits under the store-wide cap, given
/// the bytes already counted (see [`super::stored_cost`]).
pub(crate) fn admit_store(stored: u64, len: u64, limits: &StoreLimits) -> Result<(), Refusal> {
    match stored.checked_add(super::stored_cost(len)) {
        Some(total) if total <= limits.max_store_bytes => Ok(()),
        _ => Err(Refusal::StoreFull),
    }
}

/// Record an admitted envelope in the inbox counters and return its seq.
/// `None` only if the seq space is exhausted (2^64 envelopes).
pub(crate) fn assign(state: &mut InboxState, len: u64) -> Option<u64> {
    let seq = state.head.checked_add(1)?;
    state.head = seq;
    state.depth = state.depth.saturating_add(1);
    state.bytes = state.bytes.saturating_add(len);
    Some(seq)
}

/// Remove an envelope of `len` bytes from the inbox counters (ack or purge).
pub(crate) fn release(state: &mut InboxState, len: u64) {
    state.depth = state.depth.saturating_sub(1);
    state.bytes = state.bytes.saturating_sub(len);
}

/// Remove `count` envelopes of `bytes` bytes in total from the counters.
pub(crate) fn release_many(state: &mut InboxState, count: u64, bytes: u64) {
    state.depth = state.depth.saturating_sub(count);
    state.bytes = state.bytes.saturating_sub(bytes);
}

/// The size limits of one page being filled.
#[derive(Debug)]
pub(crate) struct PageBudget {
    limit: usize,
    max_bytes: usize,
    count: usize,
    bytes: usize,
}

impl PageBudget {
    /// A budget of at most `limit` envelopes and `max_bytes` bytes.
    pub(crate) fn new(limit: usize, max_bytes: usize) -> Self {
        PageBudget {
            limit,
            max_bytes,
            count: 0,
            bytes: 0,
        }
    }

    /// Take an envelope of `len` bytes if it fits; the first one always fits
    /// the byte budget, so a page is never empty because of one large
    /// envelope.
    pub(crate) fn take(&mut self, len: usize) -> bool {
        if self.count >= self.limit {
            return false;
        }
        let total = self.bytes.saturating_add(len);
        if self.count > 0 && total > self.max_bytes {
            return false;
        }
        self.count += 1;
        self.bytes = total;
        true
    }
}

/// Dedup-expiry entries a purge takes, and those it leaves listed.
pub(crate) type DueAndRest<K> = (Vec<(u64, K)>, Vec<(u64, K)>);

/// Split one dedup-expiry list into the entries a purge at `now_ms` takes
/// (expired ones, at most `budget`, in list order) and the rest, which stays
/// listed under its new first entry.
pub(crate) fn split_due_dedup<K>(list: Vec<(u64, K)>, now_ms: u64, budget: u64) -> DueAndRest<K> {
    let mut due = Vec::new();
    let mut rest = Vec::new();
    for (expires_at_ms, key) in list {
        if expires_at_ms > now_ms || due.len() as u64 >= budget {
            rest.push((expires_at_ms, key));
        } else {
            due.push((expires_at_ms, key));
        }
    }
    (due, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_due_dedup_takes_expired_entries_up_to_the_budget_in_order() {
        let list = vec![(5, 'a'), (20, 'b'), (7, 'c'), (9, 'd'), (30, 'e')];
        let (due, rest) = split_due_dedup(list.clone(), 10, 2);
        assert_eq!(due, vec![(5, 'a'), (7, 'c')]);
        assert_eq!(rest, vec![(20, 'b'), (9, 'd'), (30, 'e')]);
        let (due, rest) = split_due_dedup(list, 4, 10);
        assert!(due.is_empty());
        assert_eq!(rest.len(), 5);
    }

    #[test]
    fn admit_checks_messages_then_bytes() {
        let limits = StoreLimits {
            max_inbox_messages: 2,
            max_inbox_bytes: 100,
            max_one_time_prekeys: 1,
            ..StoreLimits::default()
        };
        let mut s = InboxState::default();
        assert_eq!(admit(&s, 100, &limits), Ok(()));
        assert_eq!(admit(&s, 101, &limits), Err(Refusal::QuotaBytes));
        assert_eq!(assign(&mut s, 60), Some(1));
        assert_eq!(admit(&s, 41, &limits), Err(Refusal::QuotaBytes));
        assert_eq!(admit(&s, 40, &limits), Ok(()));
        assert_eq!(assign(&mut s, 40), Some(2));
        assert_eq!(admit(&s, 0, &limits), Err(Refusal::QuotaMessages));
        release(&mut s, 60);
        assert_eq!(s.depth, 1);
        assert_eq!(s.bytes, 40);
        assert_eq!(s.head, 2);
        let full = InboxState {
            head: u64::MAX,
            bytes: u64::MAX,
            ..InboxState::default()
        };
        assert_eq!(admit(&full, 1, &limits), Err(Refusal::QuotaBytes));
        let mut exhausted = full;
        assert_eq!(assign(&mut exhausted, 1), None);
    }

    #[test]
    fn budget_limits_count_and_bytes_but_takes_one() {
        let mut b = PageBudget::new(3, 10);
        assert!(b.take(50));
        assert!(!b.take(1));
        let mut b = PageBudget::new(3, 10);
        assert!(b.take(4));
        assert!(b.take(6));
        assert!(!b.take(1));
        let mut b = PageBudget::new(2, 100);
        assert!(b.take(1));
        assert!(b.take(1));
        assert!(!b.take(1));
        assert!(!PageBudget::new(0, 100).take(1));
    }
}
