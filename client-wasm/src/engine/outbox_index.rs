//! Which outbox entries an input must look at, and when the others are due.
//!
//! [`Engine::active`](super::Engine) holds every outbox entry with work left,
//! in creation order. The outbox pump, the deadline check and the next
//! wake-up used to walk all of it on every input, so each input cost the
//! number of messages waiting for the relay's confirmation. A device sending
//! 1,000 messages a second to a relay that held its acknowledgements for a
//! few seconds spent 0.37 ms per input instead of 0.012 ms
//! (`e2e_latency_bench`), and the longer the relay held them the slower the
//! device became at taking them in once they came.
//!
//! This index keeps, beside `active` and derived from it:
//!
//! - `ready`: the active entries the pump must visit, i.e. every one not
//!   known to be *parked*. An entry is parked when it is resolved, every
//!   live target is sealed, and nothing is to be transmitted now: each
//!   unconfirmed transmission is in flight, or the message failed, or its
//!   retry time lies ahead. Only three things end that: a change to the
//!   entry itself (every such change goes through `Engine::touch` of its
//!   outbox record: the relay's answer or refusal, a retry command, a
//!   resend request, a fan-out), a new connection (every transmission is
//!   sent again), and its retry time. Each puts it back in `ready`.
//!   Entries that wait for something outside themselves (a device list, a
//!   session) are never parked, so they are looked at on every input as
//!   before.
//! - two timer sets ([`super::timers::Timers`]): each active chat entry's
//!   deadline while it is `Sending`, and each active entry's retry time
//!   while that lies ahead. The deadline check takes the timers that are
//!   due instead of testing every entry, and the next wake-up is the first
//!   timer ahead.
//!
//! So an input costs the entries it changes plus those that wait for
//! something, not the entries in flight. Nothing here is stored: loading
//! the engine rebuilds it from the outbox.

use super::timers::Timers;
use hush_protocol::MessageId;
use std::collections::{BTreeMap, BTreeSet};

/// An entry of `Engine::active`: (local seq, id), in creation order.
pub(crate) type Key = (u64, MessageId);

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct OutboxIndex {
    ready: BTreeSet<Key>,
    deadlines: Timers<Key>,
    retries: Timers<Key>,
    /// The local seq of every indexed entry, to drop one known by id alone.
    locals: BTreeMap<MessageId, u64>,
    /// Entries changed since the index last looked (see
    /// [`OutboxIndex::touch`]).
    touched: BTreeSet<MessageId>,
    /// Entries the pump visited, for tests of the cost per input.
    #[cfg(test)]
    pub(crate) visits: u64,
}

impl OutboxIndex {
    /// The entry changed: look at it again before the index is next used.
    pub(crate) fn touch(&mut self, id: MessageId) {
        self.touched.insert(id);
    }

    /// The entries changed since the last call.
    pub(crate) fn take_touched(&mut self) -> BTreeSet<MessageId> {
        std::mem::take(&mut self.touched)
    }

    /// The pump must visit this entry.
    pub(crate) fn mark_ready(&mut self, key: Key) {
        self.ready.insert(key);
    }

    /// The pump need not visit this entry until something puts it back.
    pub(crate) fn park(&mut self, key: Key) {
        self.ready.remove(&key);
    }

    /// The entries to visit, in creation order.
    pub(crate) fn ready(&self) -> Vec<Key> {
        self.ready.iter().copied().collect()
    }

    /// Index the entry, with its deadline and retry timer (`None`: it has
    /// none).
    pub(crate) fn set_times(&mut self, key: Key, deadline: Option<u64>, retry: Option<u64>) {
        self.locals.insert(key.1, key.0);
        self.deadlines.set(key, deadline);
        self.retries.set(key, retry);
    }

    /// The entry left `active` (or the outbox): drop it from the index.
    pub(crate) fn forget(&mut self, id: &MessageId) {
        if let Some(local) = self.locals.remove(id) {
            let key = (local, *id);
            self.deadlines.set(key, None);
            self.retries.set(key, None);
            self.ready.remove(&key);
        }
    }

    /// Take every timer due at `now`: the entries they belong to become
    /// ready, and are returned (in creation order) for the deadline check.
    pub(crate) fn pop_due(&mut self, now: u64) -> BTreeSet<Key> {
        let mut due = BTreeSet::new();
        for key in self.deadlines.due(now) {
            self.deadlines.set(key, None);
            due.insert(key);
        }
        for key in self.retries.due(now) {
            self.retries.set(key, None);
            due.insert(key);
        }
        self.ready.extend(due.iter().copied());
        due
    }

    /// The first deadline after `now`, and with `retries` the first retry
    /// time too.
    pub(crate) fn next_after(&self, now: u64, retries: bool) -> Option<u64> {
        let deadline = self.deadlines.next_after(now);
        let retry = retries.then(|| self.retries.next_after(now)).flatten();
        deadline.into_iter().chain(retry).min()
    }

    /// Entries the index holds (tests).
    #[cfg(test)]
    pub(crate) fn indexed(&self) -> usize {
        self.locals.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    #[test]
    fn due_timers_make_their_entries_ready_once() {
        let mut ix = OutboxIndex::default();
        ix.set_times((1, id(1)), Some(100), None);
        ix.set_times((2, id(2)), Some(300), Some(150));
        assert_eq!(ix.next_after(0, true), Some(100));
        assert_eq!(ix.next_after(0, false), Some(100));
        assert_eq!(ix.next_after(100, true), Some(150));
        assert_eq!(ix.next_after(100, false), Some(300));
        assert!(ix.pop_due(99).is_empty());
        assert_eq!(
            ix.pop_due(150).into_iter().collect::<Vec<_>>(),
            vec![(1, id(1)), (2, id(2))]
        );
        assert_eq!(ix.ready(), vec![(1, id(1)), (2, id(2))]);
        // What was taken is gone; the later deadline stays.
        assert!(ix.pop_due(150).is_empty());
        assert_eq!(ix.next_after(150, true), Some(300));
        // Setting a popped timer again puts it back.
        ix.set_times((1, id(1)), Some(100), None);
        assert_eq!(ix.pop_due(150).len(), 1);
    }

    #[test]
    fn new_times_replace_old_ones_and_forget_drops_everything() {
        let mut ix = OutboxIndex::default();
        ix.set_times((1, id(1)), Some(100), Some(50));
        ix.set_times((1, id(1)), Some(200), None);
        assert_eq!(ix.next_after(0, true), Some(200));
        ix.mark_ready((1, id(1)));
        ix.forget(&id(1));
        assert_eq!(ix.next_after(0, true), None);
        assert!(ix.ready().is_empty());
        assert_eq!(ix.indexed(), 0);
        ix.mark_ready((3, id(3)));
        ix.park((3, id(3)));
        assert!(ix.ready().is_empty());
    }
}
