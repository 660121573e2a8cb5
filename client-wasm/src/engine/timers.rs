//! Timers by due time, so that the engine finds what is due (and its next
//! wake-up) without walking every record that may carry a timer.
//!
//! The per-stream timers (a gap's next resend request on an incoming
//! stream, a tail probe on an outgoing one) live in the stream records.
//! Looking for due ones used to walk every stream on every input, twice
//! (once to act, once for the next wake-up): a device with thousands of
//! streams (many contacts, large groups: one stream per peer device and
//! conversation) paid for all of them on each message. [`StreamTimers`]
//! mirrors those fields, kept current the same way the outbox index is
//! (`outbox_index`): every change to a stream record goes through
//! `Engine::touch`, which notes the stream, and the noted streams are
//! indexed again before the timers are read. Held group messages' request
//! times use the same [`Timers`] (`group::GroupState::held_timers`).

use hush_protocol::{ConversationId, DeviceId};
use std::collections::{BTreeMap, BTreeSet};

/// One timer per key, ordered by due time.
#[derive(Debug)]
pub(crate) struct Timers<K> {
    by_time: BTreeMap<u64, BTreeSet<K>>,
    at: BTreeMap<K, u64>,
}

impl<K> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            by_time: BTreeMap::new(),
            at: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy> Timers<K> {
    /// Set `key`'s timer to `at` (`None`: no timer).
    pub(crate) fn set(&mut self, key: K, at: Option<u64>) {
        if self.at.get(&key).copied() == at {
            return;
        }
        if let Some(old) = self.at.remove(&key)
            && let Some(keys) = self.by_time.get_mut(&old)
        {
            keys.remove(&key);
            if keys.is_empty() {
                self.by_time.remove(&old);
            }
        }
        if let Some(t) = at {
            self.at.insert(key, t);
            self.by_time.entry(t).or_default().insert(key);
        }
    }

    /// The keys whose time is at or before `now`, in key order. They stay
    /// until set again: one that cannot act yet is due at the next look.
    pub(crate) fn due(&self, now: u64) -> Vec<K> {
        let keys: BTreeSet<K> = self
            .by_time
            .range(..=now)
            .flat_map(|(_, keys)| keys.iter().copied())
            .collect();
        keys.into_iter().collect()
    }

    /// The first time after `now`.
    pub(crate) fn next_after(&self, now: u64) -> Option<u64> {
        self.by_time
            .range(now.saturating_add(1)..)
            .next()
            .map(|(t, _)| *t)
    }

    /// Keys with a timer (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.at.len()
    }
}

/// A stream: the peer device and the conversation.
pub(crate) type StreamKey = (DeviceId, ConversationId);

/// The timers of the stream records (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct StreamTimers {
    /// Incoming streams' `request_at` (the next resend request for a gap).
    pub(crate) gaps: Timers<StreamKey>,
    /// Outgoing streams' `probe_at` (the next tail probe).
    pub(crate) probes: Timers<StreamKey>,
    /// Streams changed since the timers were last brought up to date.
    pub(crate) touched_in: BTreeSet<StreamKey>,
    pub(crate) touched_out: BTreeSet<StreamKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_are_found_by_time_and_stay_until_set_again() {
        let mut t: Timers<u8> = Timers::default();
        t.set(3, Some(100));
        t.set(1, Some(200));
        t.set(2, Some(100));
        assert_eq!(t.next_after(0), Some(100));
        assert_eq!(t.next_after(100), Some(200));
        assert_eq!(t.next_after(200), None);
        assert!(t.due(99).is_empty());
        assert_eq!(t.due(100), vec![2, 3]);
        // Still due until set again.
        assert_eq!(t.due(150), vec![2, 3]);
        t.set(2, None);
        t.set(3, Some(300));
        assert_eq!(t.due(250), vec![1]);
        assert_eq!(t.next_after(250), Some(300));
        t.set(1, None);
        t.set(3, None);
        assert_eq!(t.len(), 0);
        assert_eq!(t.next_after(0), None);
        assert!(t.by_time.is_empty());
    }
}
