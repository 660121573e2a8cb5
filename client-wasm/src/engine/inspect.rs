//! Read-only views for drivers: what this device still owes the relay, and
//! which incoming streams have holes.
//!
//! A long-running driver (the browser page) never needs them: it simply
//! stays connected. A short-lived one (the `hush` CLI, one process per
//! command) uses them to decide when it may exit without leaving work
//! undone — a registration not confirmed, a device list not published, a
//! transmission the relay has not stored, a receipt not yet sent — and to
//! report gaps that are still being repaired.

use super::{Engine, send};
use crate::codes::control_conversation;
use crate::state::MessageState;
use hush_protocol::{ConversationId, DeviceId};

/// Work this device has not yet handed to the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// The relay has not confirmed this device's registration.
    pub unregistered: bool,
    /// A signed device list of this user waits for publication.
    pub list_unpublished: bool,
    /// A newly linked device has not yet queued its introduction to the
    /// device that issued its link code.
    pub link_pending: bool,
    /// Outbox entries (chat and control, `Failed` ones excluded) with a
    /// target not yet sealed or a transmission the relay has not stored.
    pub transmissions: usize,
    /// Devices with a receipt queued but not yet sent.
    pub receipts: usize,
}

impl Backlog {
    /// Nothing is owed to the relay.
    pub fn is_empty(&self) -> bool {
        *self == Backlog::default()
    }
}

/// An incoming stream with missing sender seqs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenGap {
    /// The sending device.
    pub from_device: DeviceId,
    /// The conversation (a device pair's control conversation if `control`;
    /// for a group stream, the group).
    pub conversation: ConversationId,
    /// A control stream (receipts, syncs…) rather than a chat stream.
    pub control: bool,
    /// Sender seqs known to exist and not received.
    pub missing: u64,
    /// Of those, how many were already requested from the sender.
    pub requested: u64,
}

impl Engine {
    /// What this device still owes the relay.
    pub fn backlog(&self) -> Backlog {
        Backlog {
            unregistered: !self.device.registered,
            list_unpublished: self.own.to_publish.is_some(),
            link_pending: self.device.link.as_ref().is_some_and(|l| !l.hello_sent),
            // Entries with work left are in `active`: no scan of the
            // whole outbox (it keeps sent messages for days).
            transmissions: self
                .active
                .iter()
                .filter_map(|(_, id)| self.outbox.get(id))
                .filter(|o| o.state != MessageState::Failed && send::wants_transmission(o))
                .count(),
            receipts: self.receipts.len(),
        }
    }

    /// Incoming streams with holes (being repaired, or waiting for the
    /// sender to answer).
    pub fn open_gaps(&self) -> Vec<OpenGap> {
        let me = self.device.device;
        self.in_streams
            .iter()
            .filter_map(|((d, c), s)| {
                // Counted arithmetically: a peer's seqs may be far apart.
                let lo = s.delivered.saturating_add(1);
                if s.highest < lo {
                    return None;
                }
                let held = s.above.range(lo..=s.highest).count() as u64;
                let missing = (s.highest - s.delivered).saturating_sub(held);
                let requested = s
                    .requested
                    .range(lo..=s.highest)
                    .filter(|q| !s.above.contains(q))
                    .count() as u64;
                (missing > 0).then(|| OpenGap {
                    from_device: *d,
                    // A group stream is shown under its group.
                    conversation: self.stream_conversation(d, *c),
                    control: *c == control_conversation(&me, d),
                    missing,
                    requested,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::{Engine, EngineConfig, Input};

    #[test]
    fn a_new_device_owes_registration_and_its_device_list() {
        let (mut e, _) = Engine::create(
            1_700_000_000_000,
            [3; 32],
            "127.0.0.1:1",
            "a",
            EngineConfig::default(),
        )
        .unwrap();
        let b = e.backlog();
        assert!(b.unregistered && b.list_unpublished && !b.link_pending);
        assert_eq!((b.transmissions, b.receipts), (0, 0));
        assert!(!b.is_empty());
        assert!(e.open_gaps().is_empty());
        // Connecting alone changes nothing owed.
        e.handle(1_700_000_000_001, Input::Connected).unwrap();
        assert_eq!(e.backlog(), b);
    }
}
