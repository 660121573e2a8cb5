//! Sending: the outbox, fan-out, sealing, relay confirmations, retries,
//! re-sends for resend requests and tail probes.
//!
//! An outbox entry is written (payload sealed at rest) in the same batch as
//! the command that created it, before any transmission. Each target device
//! gets its sender seq and envelope when the entry is first sealed for it,
//! always in creation order per (device, conversation) stream. The sealed
//! envelope is kept until the relay confirms it, so retries send the same
//! bytes with the same transport id and the relay's dedup drops repeats.

use super::{Dirty, Engine, Event, Pending};
use crate::codes::control_conversation;
use crate::error::ClientError;
use crate::payload::{Body, Payload};
use crate::state::{EntryKind, MessageState, OutboxEntry, Target, Transmission};
use crate::storage::{self, StorageOp, keys};
use hush_crypto::{RatchetHeader, open_at_rest, seal_at_rest};
use hush_protocol::limits::MAX_BATCH;
use hush_protocol::{
    ConversationId, DeviceId, Envelope, EnvelopeHeader, ErrorCode, MessageId, Request, SendOutcome,
    SessionInitHeader, UserKey,
};

/// The deadline of a chat entry that outlived its send deadline waiting for
/// the contact's first device; resolving it restarts the deadline.
const WAITING_FOR_DEVICES: u64 = u64::MAX;

/// The entry still has something to do: resolve its targets, seal for a
/// target (sealing continues even for `Failed` entries, so sender seqs always
/// follow creation order), or transmit (not while `Failed`).
pub(crate) fn needs_work(o: &OutboxEntry) -> bool {
    !o.resolved
        || o.targets.iter().any(|t| !t.gone && t.seq.is_none())
        || (o.state != MessageState::Failed && awaiting_relay(o))
}

/// Some sealed transmission waits for the relay's confirmation.
fn awaiting_relay(o: &OutboxEntry) -> bool {
    o.targets
        .iter()
        .any(|t| !t.gone && t.tx.is_some() && !t.stored)
}

/// The entry wants its retry timer: something to seal or to transmit.
pub(crate) fn wants_transmission(o: &OutboxEntry) -> bool {
    needs_work(o)
}

/// An active entry's timers for the index: its deadline while a chat
/// message is sending (unless it waits for the contact's first device),
/// and its retry time while that lies ahead.
fn entry_times(now: u64, o: &OutboxEntry) -> (Option<u64>, Option<u64>) {
    let deadline = (o.kind == EntryKind::Chat
        && o.state == MessageState::Sending
        && o.deadline_ms != WAITING_FOR_DEVICES)
        .then_some(o.deadline_ms);
    let retry = (wants_transmission(o) && o.retry_at > now).then_some(o.retry_at);
    (deadline, retry)
}

fn rank(s: MessageState) -> u8 {
    match s {
        MessageState::Failed | MessageState::Sending | MessageState::RecipientInboxFull => 0,
        MessageState::Stored => 1,
        MessageState::Delivered => 2,
        MessageState::Read => 3,
    }
}

impl Engine {
    /// Create an outbox entry. Chat entries fan out to the conversation's
    /// devices once their lists are fresh; control entries go to `to`.
    pub(crate) fn queue(
        &mut self,
        now: u64,
        id: MessageId,
        conversation: ConversationId,
        body: Body,
        to: Option<DeviceId>,
    ) -> Result<(), ClientError> {
        let ack_eliciting = body.ack_eliciting();
        // A group's stream items name the group inside: their clear
        // conversation id is a pseudonym (see `group.rs`).
        let body = if to.is_none() && self.is_group(&conversation) {
            body.with_group(conversation)
        } else {
            body
        };
        let payload = Payload { id, body }.encode()?;
        let sealed = seal_at_rest(
            &self.device.at_rest.0,
            &mut self.rng,
            &payload,
            id.as_bytes(),
        )?;
        let local_seq = self.counters.next_local;
        self.counters.next_local = local_seq.saturating_add(1);
        self.touch(Dirty::Counters);
        let (kind, conversation, targets, resolved, deadline) = match to {
            Some(d) => (
                EntryKind::Control,
                control_conversation(&self.device.device, &d),
                vec![new_target(d, false)],
                true,
                u64::MAX,
            ),
            None => (
                EntryKind::Chat,
                conversation,
                Vec::new(),
                false,
                now.saturating_add(self.cfg.send_deadline_ms),
            ),
        };
        let entry = OutboxEntry {
            id,
            local_seq,
            conversation,
            kind,
            sealed,
            ack_eliciting,
            created_ms: now,
            deadline_ms: deadline,
            state: MessageState::Sending,
            resolved,
            targets,
            retry_at: now,
            retry_delay_ms: 0,
            important: false,
        };
        self.outbox.insert(id, entry);
        self.activate((local_seq, id));
        self.touch(Dirty::Outbox(id));
        Ok(())
    }

    /// At load: each stream's seq → entry map of unreceipted ack-eliciting
    /// items, from the outbox (it is not persisted, see `OutStream::sent`).
    pub(crate) fn rebuild_sent_index(&mut self) {
        let me = self.device.device;
        for o in self.outbox.values().filter(|o| o.ack_eliciting) {
            for t in &o.targets {
                let Some(seq) = t.seq else {
                    continue;
                };
                let conv = match o.kind {
                    EntryKind::Chat => match self.chat_stream(&o.conversation, &t.device) {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                    EntryKind::Control => control_conversation(&me, &t.device),
                };
                if let Some(os) = self.out_streams.get_mut(&(t.device, conv))
                    && seq > os.receipted
                {
                    os.sent.insert(seq, o.id);
                }
            }
        }
    }

    /// Queue a control item to one device.
    pub(crate) fn queue_control(
        &mut self,
        now: u64,
        to: DeviceId,
        body: Body,
    ) -> Result<(), ClientError> {
        let id = self.mint_id(now);
        self.queue(now, id, ConversationId([0; 16]), body, Some(to))
    }

    /// Decide a chat entry's targets: every device of the contact and every
    /// other device of this user, once both lists are fresh enough.
    fn resolve(&mut self, now: u64, id: &MessageId) -> bool {
        let Some(entry) = self.outbox.get(id) else {
            return false;
        };
        if self.is_group(&entry.conversation) {
            return self.resolve_group(now, id);
        }
        let Some(&user) = self.conversations.get(&entry.conversation) else {
            return false;
        };
        let me = self.user_key();
        // Both gates run (each may start its fetch) before deciding.
        let contact_ready = self.list_gate(now, user);
        let own_ready = self.list_gate(now, me);
        if !contact_ready || !own_ready {
            return false;
        }
        // Devices the relay reports stale get nothing new (see `lifecycle`).
        let stale_theirs = self.stale_targets(&user);
        let stale_mine = self.stale_targets(&me);
        let mut targets: Vec<Target> = self
            .contacts
            .get(&user)
            .map(|c| {
                c.known
                    .devices()
                    .filter(|e| !stale_theirs.contains(&e.device))
                    .map(|e| new_target(e.device, true))
                    .collect()
            })
            .unwrap_or_default();
        let my_device = self.device.device;
        targets.extend(
            self.own
                .known
                .devices()
                .filter(|e| e.device != my_device && !stale_mine.contains(&e.device))
                .map(|e| new_target(e.device, false)),
        );
        let deadline = now.saturating_add(self.cfg.send_deadline_ms);
        if let Some(entry) = self.outbox.get_mut(id) {
            entry.targets = targets;
            entry.resolved = true;
            // The entry waited past its deadline for the contact's first
            // device (see `check_deadlines`): the relay gets its full time
            // from now.
            if entry.deadline_ms == WAITING_FOR_DEVICES {
                entry.deadline_ms = deadline;
            }
        }
        self.touch(Dirty::Outbox(*id));
        true
    }

    /// Whether `user`'s device list may be used for a fan-out now. A list
    /// older than `device_list_fresh_ms` is re-fetched first, waiting at
    /// most `device_list_wait_ms` for the answer (then the known devices
    /// are used). A contact with no known device never resolves: the entry
    /// waits (its list is retried with backoff) rather than fan out to
    /// nobody.
    pub(crate) fn list_gate(&mut self, now: u64, user: UserKey) -> bool {
        let me = self.user_key();
        let (usable, fetched) = if user == me {
            (self.own.known.list.is_some(), self.own.known.fetched_ms)
        } else {
            match self.contacts.get(&user) {
                Some(c) => (c.known.devices().next().is_some(), c.known.fetched_ms),
                None => return false,
            }
        };
        if let Some(&sent) = self.link.list_fetch_sent.get(&user) {
            // A fetch is running: wait for it, within bounds.
            return usable && now >= sent.saturating_add(self.cfg.device_list_wait_ms);
        }
        if !usable {
            if user != me {
                let due = self.list_retry.get(&user).is_none_or(|r| now >= r.0);
                if due {
                    self.fetch_list(now, user);
                }
            }
            return false;
        }
        let fresh = fetched.is_some_and(|t| now < t.saturating_add(self.cfg.device_list_fresh_ms));
        if !fresh {
            self.fetch_list(now, user);
            return !self.link.list_fetch_sent.contains_key(&user);
        }
        true
    }

    /// Seal what can be sealed and transmit what is due, in creation order.
    ///
    /// Visits the entries of the index's `ready` set, not all of `active`:
    /// an entry waiting only for the relay's answer costs nothing here
    /// (see `outbox_index`).
    pub(crate) fn pump_outbox(&mut self, now: u64) -> Result<(), ClientError> {
        if !self.link.ready {
            return Ok(());
        }
        self.reindex_touched(now);
        let mut batch: Vec<(MessageId, DeviceId, Envelope)> = Vec::new();
        let ids = self.outbox_index.ready();
        for (local, id) in ids.iter().copied() {
            #[cfg(test)]
            {
                self.outbox_index.visits += 1;
            }
            let resolved = self.outbox.get(&id).is_some_and(|o| o.resolved);
            if !resolved && !self.resolve(now, &id) {
                continue;
            }
            let unsealed: Vec<usize> = match self.outbox.get(&id) {
                Some(o) => o
                    .targets
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| !t.gone && t.seq.is_none())
                    .map(|(i, _)| i)
                    .collect(),
                None => {
                    self.deactivate((local, id));
                    continue;
                }
            };
            for i in unsealed {
                let Some(d) = self
                    .outbox
                    .get(&id)
                    .and_then(|o| o.targets.get(i))
                    .map(|t| t.device)
                else {
                    continue;
                };
                // No session yet, or the peer could not answer ours and a
                // fresh one must come from its bundle first.
                if self.sessions.get(&d).is_none_or(|s| s.entries.is_empty())
                    || self.session_repair.fresh.contains(&d)
                {
                    if self.peer(&d).is_some() {
                        self.want_session(now, d);
                    } else if let Some(t) =
                        self.outbox.get_mut(&id).and_then(|o| o.targets.get_mut(i))
                    {
                        t.gone = true;
                    }
                    continue;
                }
                self.seal_target(now, &id, i)?;
            }
            let Some(entry) = self.outbox.get(&id) else {
                continue;
            };
            if now >= entry.retry_at && entry.state != MessageState::Failed {
                // Decoded straight from the stored bytes, skipping what is
                // already in flight (no copy of envelopes that wait).
                let due: Vec<(DeviceId, Result<Envelope, _>)> = entry
                    .targets
                    .iter()
                    .filter(|t| !t.gone && !t.stored)
                    .filter(|t| !self.link.in_flight.contains(&(id, t.device)))
                    .filter_map(|t| {
                        t.tx.as_ref()
                            .map(|tx| (t.device, Envelope::from_bytes(&tx.envelope)))
                    })
                    .collect();
                for (d, env) in due {
                    match env {
                        Ok(env) => batch.push((id, d, env)),
                        Err(_) => {
                            if let Some(t) = self
                                .outbox
                                .get_mut(&id)
                                .and_then(|o| o.targets.iter_mut().find(|t| t.device == d))
                            {
                                t.gone = true;
                            }
                        }
                    }
                }
            }
            self.settle(now, &id);
        }
        let mut batch = batch.into_iter().peekable();
        while batch.peek().is_some() {
            let mut items = Vec::new();
            let mut envelopes = Vec::new();
            for (id, d, env) in batch.by_ref().take(MAX_BATCH) {
                self.link.in_flight.insert((id, d));
                items.push((id, d));
                envelopes.push(env);
            }
            self.request(Request::Send { envelopes }, Pending::Send(items));
        }
        // Now that what was sent is in flight, park what has nothing left
        // to do until an answer, a reconnect or its retry time.
        for key in ids {
            self.park_if_idle(now, key);
        }
        Ok(())
    }

    /// Put an entry into `active` (it has work left), to be indexed before
    /// the index is next used.
    pub(crate) fn activate(&mut self, key: (u64, MessageId)) {
        self.active.insert(key);
        self.outbox_index.touch(key.1);
    }

    /// Take an entry out of `active` and the index.
    pub(crate) fn deactivate(&mut self, key: (u64, MessageId)) {
        self.active.remove(&key);
        self.outbox_index.forget(&key.1);
    }

    /// Index the entries changed since the index last looked: each is
    /// ready for the pump, with its timers as they are now; or out of the
    /// index if it left `active`.
    pub(crate) fn reindex_touched(&mut self, now: u64) {
        for id in self.outbox_index.take_touched() {
            match self.outbox.get(&id) {
                Some(o) if self.active.contains(&(o.local_seq, o.id)) => {
                    let key = (o.local_seq, o.id);
                    let (deadline, retry) = entry_times(now, o);
                    self.outbox_index.set_times(key, deadline, retry);
                    self.outbox_index.mark_ready(key);
                }
                _ => self.outbox_index.forget(&id),
            }
        }
    }

    /// After the pump's visit: if nothing is left to do for the entry
    /// until its answer, a reconnect or its retry time, the pump skips it
    /// until then (see `outbox_index`).
    fn park_if_idle(&mut self, now: u64, key: (u64, MessageId)) {
        let Some(o) = self
            .outbox
            .get(&key.1)
            .filter(|_| self.active.contains(&key))
        else {
            self.outbox_index.forget(&key.1);
            return;
        };
        let sealed = o.resolved && !o.targets.iter().any(|t| !t.gone && t.seq.is_none());
        let nothing_due = o.state == MessageState::Failed
            || now < o.retry_at
            || !o.targets.iter().any(|t| {
                !t.gone
                    && !t.stored
                    && t.tx.is_some()
                    && !self.link.in_flight.contains(&(o.id, t.device))
            });
        let (deadline, retry) = entry_times(now, o);
        let idle = sealed && nothing_due;
        self.outbox_index.set_times(key, deadline, retry);
        if idle {
            self.outbox_index.park(key);
        }
    }

    /// Assign the next sender seq of the target's stream and seal.
    fn seal_target(&mut self, now: u64, id: &MessageId, i: usize) -> Result<(), ClientError> {
        let Some(entry) = self.outbox.get(id) else {
            return Ok(());
        };
        let Some(d) = entry.targets.get(i).map(|t| t.device) else {
            return Ok(());
        };
        let conv = match entry.kind {
            EntryKind::Chat => self.chat_stream(&entry.conversation, &d)?,
            EntryKind::Control => control_conversation(&self.device.device, &d),
        };
        let ack_eliciting = entry.ack_eliciting;
        let payload = open_at_rest(&self.device.at_rest.0, &entry.sealed, id.as_bytes())?;
        let os = self.out_streams.entry((d, conv)).or_default();
        let seq = os.next_seq;
        os.next_seq = seq.saturating_add(1);
        if ack_eliciting {
            os.sent.insert(seq, *id);
        }
        self.touch(Dirty::Out(d, conv));
        let env = self.seal_envelope(now, d, conv, seq, *id, &payload)?;
        let bytes = env.to_bytes()?;
        if let Some(t) = self.outbox.get_mut(id).and_then(|o| o.targets.get_mut(i)) {
            t.seq = Some(seq);
            t.tx = Some(Transmission {
                transport_id: *id,
                envelope: bytes,
            });
            t.stored = false;
        }
        self.touch(Dirty::Outbox(*id));
        Ok(())
    }

    /// Seal a payload for one device under its current session.
    pub(crate) fn seal_envelope(
        &mut self,
        now: u64,
        d: DeviceId,
        conv: ConversationId,
        seq: u64,
        transport_id: MessageId,
        payload: &[u8],
    ) -> Result<Envelope, ClientError> {
        let me = self.device.device;
        let important = self.outbox.get(&transport_id).is_some_and(|o| o.important);
        let Some(entry) = self
            .sessions
            .get_mut(&d)
            .and_then(|s| s.entries.first_mut())
        else {
            return Err(ClientError::Unknown("session"));
        };
        let session = &mut entry.session;
        let mut header = EnvelopeHeader {
            message_id: transport_id,
            sender_device: me,
            recipient_device: d,
            conversation_id: conv,
            sender_seq: seq,
            sent_at_ms: now,
            ratchet: Vec::new(),
            session_init: session.needs_init_header().map(|i| SessionInitHeader {
                initiator_identity: i.initiator_identity,
                ephemeral: i.ephemeral,
                signed_prekey_id: i.signed_prekey_id,
                one_time_prekey_id: i.one_time_prekey_id,
            }),
            important,
        };
        let epoch = session.epoch();
        let template = header.clone();
        let (rh, ciphertext) =
            session.seal(&mut self.rng, now, payload, |rh: &RatchetHeader| {
                let mut h = template;
                h.ratchet = rh.to_bytes().to_vec();
                h.to_bytes().unwrap_or_default()
            })?;
        header.ratchet = rh.to_bytes().to_vec();
        let new_epoch = session.epoch();
        self.touch(Dirty::Session(d));
        if new_epoch != epoch {
            self.event(Event::KeyRotation {
                device: d,
                epoch: new_epoch,
            });
        }
        Ok(Envelope { header, ciphertext })
    }

    /// The relay answered a `Send`: one outcome per envelope, in order.
    pub(crate) fn on_sent(
        &mut self,
        now: u64,
        items: Vec<(MessageId, DeviceId)>,
        outcomes: Vec<SendOutcome>,
    ) -> Result<(), ClientError> {
        let mut retry: Vec<(MessageId, DeviceId)> = Vec::new();
        let mut wait: Option<u64> = None;
        let mut inbox_full: Vec<MessageId> = Vec::new();
        let mut outcomes = outcomes.into_iter();
        let mut touched: Vec<MessageId> = items.iter().map(|(id, _)| *id).collect();
        touched.dedup();
        for (id, d) in items {
            self.link.in_flight.remove(&(id, d));
            let Some(outcome) = outcomes.next() else {
                retry.push((id, d));
                continue;
            };
            match outcome {
                SendOutcome::Stored {
                    message_id,
                    recipient,
                    ..
                } => {
                    let Some(entry) = self.outbox.get_mut(&id) else {
                        continue;
                    };
                    let conv = entry.conversation;
                    let kind = entry.kind;
                    let ack_eliciting = entry.ack_eliciting;
                    let Some(t) = entry.targets.iter_mut().find(|t| t.device == d) else {
                        continue;
                    };
                    let matches = recipient == d
                        && t.tx
                            .as_ref()
                            .is_some_and(|tx| tx.transport_id == message_id);
                    if !matches {
                        retry.push((id, d));
                        continue;
                    }
                    t.stored = true;
                    t.tx = None;
                    self.touch(Dirty::Outbox(id));
                    if ack_eliciting {
                        // Control entries already carry their stream's
                        // (control) conversation; a group's is per device.
                        let stream_conv = match kind {
                            EntryKind::Chat => self.chat_stream(&conv, &d)?,
                            EntryKind::Control => conv,
                        };
                        let base = self.cfg.probe_base_ms;
                        if let Some(os) = self.out_streams.get_mut(&(d, stream_conv))
                            && os.probe_at.is_none()
                        {
                            os.probe_at = Some(now.saturating_add(base));
                            os.probe_delay_ms = base;
                            self.touch(Dirty::Out(d, stream_conv));
                        }
                    }
                }
                SendOutcome::Refused { error, .. } => match error.code {
                    ErrorCode::UnknownDevice
                    | ErrorCode::TooLarge
                    | ErrorCode::BadFrame
                    | ErrorCode::Forbidden => {
                        if let Some(t) = self
                            .outbox
                            .get_mut(&id)
                            .and_then(|o| o.targets.iter_mut().find(|t| t.device == d))
                        {
                            t.gone = true;
                            t.tx = None;
                        }
                        self.touch(Dirty::Outbox(id));
                    }
                    code => {
                        if let Some(ms) = error.retry_after_ms {
                            wait = Some(wait.map_or(u64::from(ms), |w| w.max(u64::from(ms))));
                        }
                        if code == ErrorCode::Quota {
                            inbox_full.push(id);
                        }
                        retry.push((id, d));
                    }
                },
            }
        }
        self.on_send_refused(now, &retry, wait);
        for id in inbox_full {
            self.counters.inbox_full_refusals = self.counters.inbox_full_refusals.saturating_add(1);
            self.touch(Dirty::Counters);
            self.set_state(&id, MessageState::RecipientInboxFull);
        }
        for id in touched {
            self.settle(now, &id);
        }
        Ok(())
    }

    /// Schedule retries of transmissions the relay did not store.
    pub(crate) fn on_send_refused(
        &mut self,
        now: u64,
        items: &[(MessageId, DeviceId)],
        wait: Option<u64>,
    ) {
        for (id, d) in items {
            self.link.in_flight.remove(&(*id, *d));
            let Some(delay) = self.outbox.get(id).map(|o| o.retry_delay_ms) else {
                continue;
            };
            let next = self.next_delay(delay, self.cfg.retry_base_ms, self.cfg.retry_max_ms);
            let at = now.saturating_add(wait.map_or(next, |w| w.max(next)));
            if let Some(o) = self.outbox.get_mut(id) {
                o.retry_delay_ms = next;
                o.retry_at = at;
                let key = (o.local_seq, o.id);
                if o.state != MessageState::Failed {
                    self.activate(key);
                }
            }
            self.touch(Dirty::Outbox(*id));
        }
    }

    /// After (re)connecting, everything unconfirmed is sent again at once.
    pub(crate) fn reset_transmissions(&mut self, now: u64) {
        let ids: Vec<MessageId> = self.active.iter().map(|(_, id)| *id).collect();
        for id in ids {
            if let Some(o) = self.outbox.get_mut(&id) {
                o.retry_at = now;
                o.retry_delay_ms = 0;
            }
            // Every entry is looked at again, with its new retry time.
            self.outbox_index.touch(id);
        }
    }

    /// Recompute an entry's state after changes; drop finished control entries.
    pub(crate) fn settle(&mut self, now: u64, id: &MessageId) {
        let Some(entry) = self.outbox.get(id) else {
            return;
        };
        let live: Vec<&Target> = entry.targets.iter().filter(|t| !t.gone).collect();
        let all_stored = entry.resolved && live.iter().all(|t| t.seq.is_some() && t.stored);
        let any_delivered = entry.targets.iter().any(|t| t.recipient && t.delivered);
        let all_delivered = entry.resolved && live.iter().all(|t| t.delivered);
        let key = (entry.local_seq, entry.id);
        let kind = entry.kind;
        let ack_eliciting = entry.ack_eliciting;
        let needs = needs_work(entry);
        match kind {
            EntryKind::Control => {
                let done = if ack_eliciting {
                    all_delivered
                } else {
                    all_stored
                };
                if done {
                    self.remove_entry(id);
                    return;
                }
            }
            EntryKind::Chat => {
                if any_delivered {
                    self.set_state(id, MessageState::Delivered);
                } else if all_stored {
                    self.set_state(id, MessageState::Stored);
                }
            }
        }
        // Only a change of membership goes to the index: the pump settles
        // every entry it visits, and that alone must not make it ready.
        if needs {
            if !self.active.contains(&key) {
                self.activate(key);
            }
        } else if self.active.contains(&key) {
            self.deactivate(key);
        }
        let _ = now;
    }

    /// Move a chat message's state forward (never backward, except Failed →
    /// Sending on a retry), record it in history and tell the app.
    pub(crate) fn set_state(&mut self, id: &MessageId, state: MessageState) {
        let Some(entry) = self.outbox.get_mut(id) else {
            return;
        };
        let forward = rank(state) > rank(entry.state)
            || (entry.state == MessageState::Failed && state != MessageState::Failed)
            || (state == MessageState::Failed && entry.state == MessageState::Sending)
            || (state == MessageState::RecipientInboxFull && entry.state == MessageState::Sending);
        if !forward || entry.kind != EntryKind::Chat {
            return;
        }
        entry.state = state;
        let conversation = entry.conversation;
        self.touch(Dirty::Outbox(*id));
        if let Ok(value) = storage::encode(&state) {
            self.history_ops.push(StorageOp::Put {
                key: keys::history_state(id),
                value,
            });
        }
        self.event(Event::MessageState {
            id: *id,
            conversation,
            state,
        });
    }

    fn remove_entry(&mut self, id: &MessageId) {
        if let Some(o) = self.outbox.remove(id) {
            self.deactivate((o.local_seq, o.id));
            for t in &o.targets {
                if let Some(seq) = t.seq {
                    let conv = match o.kind {
                        EntryKind::Chat => match self.chat_stream(&o.conversation, &t.device) {
                            Ok(c) => c,
                            Err(_) => continue,
                        },
                        EntryKind::Control => control_conversation(&self.device.device, &t.device),
                    };
                    if let Some(os) = self.out_streams.get_mut(&(t.device, conv))
                        && os.sent.remove(&seq).is_some()
                    {
                        self.dirty.insert(Dirty::Out(t.device, conv));
                    }
                }
            }
            self.touch(Dirty::Outbox(*id));
        }
    }

    /// Chat messages not confirmed by the relay in time become `Failed`,
    /// except those still waiting for the contact's first device: they stay
    /// `Sending`, and their deadline restarts when they fan out.
    ///
    /// `due` are the entries whose timers came due (`OutboxIndex::pop_due`):
    /// an entry whose deadline passed has one of them.
    pub(crate) fn check_deadlines(
        &mut self,
        now: u64,
        due: &std::collections::BTreeSet<(u64, MessageId)>,
    ) {
        let due: Vec<(MessageId, bool)> = due
            .iter()
            .filter_map(|(_, id)| self.outbox.get(id))
            .filter(|o| {
                o.kind == EntryKind::Chat
                    && o.state == MessageState::Sending
                    && now >= o.deadline_ms
            })
            .map(|o| (o.id, self.awaits_devices(o)))
            .collect();
        for (id, waiting) in due {
            if waiting {
                if let Some(o) = self.outbox.get_mut(&id) {
                    o.deadline_ms = WAITING_FOR_DEVICES;
                }
                self.touch(Dirty::Outbox(id));
                continue;
            }
            self.set_state(&id, MessageState::Failed);
            self.settle(now, &id);
        }
    }

    /// An unresolved chat entry whose contact has no known device yet (not
    /// registered, or every fetch so far refused): it stays `Sending` and
    /// fans out once a device is known, however long that takes.
    fn awaits_devices(&self, o: &OutboxEntry) -> bool {
        !o.resolved
            && self
                .conversations
                .get(&o.conversation)
                .and_then(|u| self.contacts.get(u))
                .is_some_and(|c| c.known.devices().next().is_none())
    }

    /// Re-send one stream item (same logical id and sender seq, fresh
    /// transport id) under the current ratchet. Returns false if the outbox
    /// no longer has it.
    pub(crate) fn resend(
        &mut self,
        now: u64,
        d: DeviceId,
        conv: ConversationId,
        seq: u64,
    ) -> Result<bool, ClientError> {
        self.resend_with(now, d, conv, seq, false)
    }

    /// Re-seal one stream item under the current session even if its
    /// previous envelope has not been stored yet (that one was sealed on a
    /// session the peer cannot open); only an envelope in flight is left to
    /// finish. Returns false if the outbox no longer has it.
    pub(crate) fn reseal(
        &mut self,
        now: u64,
        d: DeviceId,
        conv: ConversationId,
        seq: u64,
    ) -> Result<bool, ClientError> {
        self.resend_with(now, d, conv, seq, true)
    }

    fn resend_with(
        &mut self,
        now: u64,
        d: DeviceId,
        conv: ConversationId,
        seq: u64,
        stale_session: bool,
    ) -> Result<bool, ClientError> {
        let Some(id) = self
            .out_streams
            .get(&(d, conv))
            .and_then(|s| s.sent.get(&seq))
            .copied()
        else {
            return Ok(false);
        };
        let Some(entry) = self.outbox.get(&id) else {
            return Ok(false);
        };
        let Some(i) = entry
            .targets
            .iter()
            .position(|t| t.device == d && t.seq == Some(seq))
        else {
            return Ok(false);
        };
        let pending = entry
            .targets
            .get(i)
            .is_some_and(|t| t.tx.is_some() && !t.stored)
            && (!stale_session || self.link.in_flight.contains(&(id, d)));
        if pending {
            // The original is still being retried; nothing to add.
            return Ok(true);
        }
        if self.sessions.get(&d).is_none_or(|s| s.entries.is_empty()) {
            return Ok(false);
        }
        let payload = open_at_rest(&self.device.at_rest.0, &entry.sealed, id.as_bytes())?;
        let transport = self.mint_id(now);
        let env = self.seal_envelope(now, d, conv, seq, transport, &payload)?;
        let bytes = env.to_bytes()?;
        let deadline = now.saturating_add(self.cfg.send_deadline_ms);
        let mut revived = false;
        if let Some(o) = self.outbox.get_mut(&id) {
            if let Some(t) = o.targets.get_mut(i) {
                t.tx = Some(Transmission {
                    transport_id: transport,
                    envelope: bytes,
                });
                t.stored = false;
                t.gone = false;
            }
            o.retry_at = now;
            o.retry_delay_ms = 0;
            if o.state == MessageState::Failed {
                o.deadline_ms = deadline;
                revived = true;
            }
            let key = (o.local_seq, o.id);
            self.activate(key);
        }
        if revived {
            self.set_state(&id, MessageState::Sending);
        }
        self.counters.resent = self.counters.resent.saturating_add(1);
        self.touch(Dirty::Counters);
        self.touch(Dirty::Outbox(id));
        Ok(true)
    }

    /// Re-send the tail of streams whose receipt is overdue.
    pub(crate) fn run_probes(&mut self, now: u64) -> Result<(), ClientError> {
        // The due streams from the timer index (see `timers`).
        self.reindex_streams();
        let due = self.stream_timers.probes.due(now);
        for (d, conv) in due {
            let Some(os) = self.out_streams.get(&(d, conv)) else {
                self.stream_timers.probes.set((d, conv), None);
                continue;
            };
            let receipted = os.receipted;
            let tail = os
                .sent
                .range(receipted.saturating_add(1)..)
                .next_back()
                .map(|(s, _)| *s);
            let delay = os.probe_delay_ms;
            match tail {
                Some(seq) => {
                    let _ = self.resend(now, d, conv, seq)?;
                    self.counters.probes = self.counters.probes.saturating_add(1);
                    self.touch(Dirty::Counters);
                    let next =
                        self.next_delay(delay, self.cfg.probe_base_ms, self.cfg.probe_max_ms);
                    if let Some(os) = self.out_streams.get_mut(&(d, conv)) {
                        os.probe_delay_ms = next;
                        os.probe_at = Some(now.saturating_add(next));
                    }
                }
                None => {
                    if let Some(os) = self.out_streams.get_mut(&(d, conv)) {
                        os.probe_at = None;
                        os.probe_delay_ms = 0;
                    }
                }
            }
            self.touch(Dirty::Out(d, conv));
        }
        Ok(())
    }

    /// A peer's receipt: it stored our seqs up to `through` in `conv`, and
    /// its user read `read`.
    pub(crate) fn on_receipt(
        &mut self,
        now: u64,
        d: DeviceId,
        delivered: &[(ConversationId, u64)],
        read: &[MessageId],
    ) {
        for &(conv, through) in delivered {
            let Some(os) = self.out_streams.get_mut(&(d, conv)) else {
                continue;
            };
            if through <= os.receipted || through >= os.next_seq {
                continue;
            }
            os.receipted = through;
            let covered: Vec<MessageId> = os.sent.range(..=through).map(|(_, id)| *id).collect();
            let keep = os.sent.split_off(&through.saturating_add(1));
            os.sent = keep;
            if os.sent.is_empty() {
                os.probe_at = None;
                os.probe_delay_ms = 0;
            } else {
                os.probe_at = Some(now.saturating_add(self.cfg.probe_base_ms));
                os.probe_delay_ms = self.cfg.probe_base_ms;
            }
            self.touch(Dirty::Out(d, conv));
            for id in covered {
                let mut newly = false;
                if let Some(t) = self
                    .outbox
                    .get_mut(&id)
                    .and_then(|o| o.targets.iter_mut().find(|t| t.device == d))
                {
                    newly = !t.delivered;
                    t.delivered = true;
                }
                if newly {
                    self.touch(Dirty::Outbox(id));
                }
                let before = self.outbox.get(&id).map(|o| o.state);
                self.settle(now, &id);
                if newly {
                    self.group_member_state_changed(&id, before);
                }
            }
        }
        for id in read {
            let newly = self.group_note_read(d, id);
            let before = self.outbox.get(id).map(|o| o.state);
            let is_recipient = self
                .outbox
                .get(id)
                .is_some_and(|o| o.targets.iter().any(|t| t.device == d && t.recipient));
            if is_recipient {
                self.set_state(id, MessageState::Read);
            }
            if newly {
                self.group_member_state_changed(id, before);
            }
        }
    }

    /// Targets on devices that left their user's list are dropped (a removed
    /// device receives nothing new).
    pub(crate) fn drop_unlisted_targets(&mut self) {
        let ids: Vec<MessageId> = self.active.iter().map(|(_, id)| *id).collect();
        for id in ids {
            let Some(o) = self.outbox.get(&id) else {
                continue;
            };
            if o.kind != EntryKind::Chat || !o.resolved {
                continue;
            }
            let gone: Vec<usize> = o
                .targets
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.gone && t.seq.is_none() && self.peer(&t.device).is_none())
                .map(|(i, _)| i)
                .collect();
            if gone.is_empty() {
                continue;
            }
            if let Some(o) = self.outbox.get_mut(&id) {
                for i in gone {
                    if let Some(t) = o.targets.get_mut(i) {
                        t.gone = true;
                    }
                }
            }
            self.touch(Dirty::Outbox(id));
        }
    }

    /// Hourly: expire old outbox entries, tombstones, link tokens and parked
    /// envelopes.
    pub(crate) fn housekeeping(&mut self, now: u64) {
        let retention = self.cfg.outbox_retention_ms;
        let expired: Vec<MessageId> = self
            .outbox
            .values()
            .filter(|o| now >= o.created_ms.saturating_add(retention))
            .map(|o| o.id)
            .collect();
        for id in expired {
            self.remove_entry(&id);
        }
        let tomb_ttl = self.removal_window();
        let recalls: Vec<(ConversationId, UserKey, MessageId)> = self
            .recalls
            .iter()
            .filter(|(_, at)| now >= at.saturating_add(tomb_ttl))
            .map(|(k, _)| *k)
            .collect();
        for (c, u, id) in recalls {
            self.recalls.remove(&(c, u, id));
            self.touch(Dirty::Recall(c, u, id));
        }
        // A message of ours is remembered while a recall naming it could
        // still be honoured (see `deliver_chat`).
        let mine: Vec<(ConversationId, MessageId)> = self
            .mine
            .iter()
            .filter(|((_, id), at)| now >= (**at).max(id.timestamp_ms()).saturating_add(tomb_ttl))
            .map(|(k, _)| *k)
            .collect();
        for (c, id) in mine {
            self.mine.remove(&(c, id));
            self.touch(Dirty::Mine(c, id));
        }
        let old: Vec<MessageId> = self
            .tombs
            .iter()
            .filter(|(_, t)| now >= t.at_ms.saturating_add(tomb_ttl))
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.tombs.remove(&id);
            self.touch(Dirty::Tomb(id));
        }
        let links: Vec<[u8; 16]> = self
            .links
            .iter()
            .filter(|(_, l)| now >= l.expires_ms)
            .map(|(t, _)| *t)
            .collect();
        for t in links {
            self.links.remove(&t);
            self.touch(Dirty::Link(t));
        }
        let parked: Vec<u64> = self
            .parked
            .iter()
            .filter(|(_, p)| now >= p.parked_ms.saturating_add(super::DAY_MS))
            .map(|(s, _)| *s)
            .collect();
        for s in parked {
            self.unpark(s);
            self.counters.rejected = self.counters.rejected.saturating_add(1);
            self.touch(Dirty::Counters);
        }
    }
}

pub(crate) fn new_target(device: DeviceId, recipient: bool) -> Target {
    Target {
        device,
        recipient,
        seq: None,
        tx: None,
        stored: false,
        delivered: false,
        gone: false,
    }
}
