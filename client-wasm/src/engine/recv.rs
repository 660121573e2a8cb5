//! Receiving: pages and pushes, decryption, dedup, ordering by sender seq,
//! control items, receipts and gap repair.
//!
//! Relay-seq layer: everything with a relay seq at or below the cursor is
//! already handled; a page (see `pull`) or push advances the cursor in the
//! same batch as the stored messages, and the acknowledgement (merged into a
//! later `Pull`, or a windowed `Ack` while live) goes out only after that
//! batch.
//!
//! Sender-seq layer, per (sender device, conversation): `delivered` is the
//! contiguous prefix; chat items above it are held (stored, not shown) until
//! the hole fills, control items are applied at once but still recorded.
//! Holes are requested from the sender after a grace period once the sync
//! has drained; the sender re-sends or answers "unavailable", which the
//! recipient reports and skips. Nothing is ever reordered by wall clock.

use super::{Dirty, Engine, Event};
use crate::codes::control_conversation;
use crate::error::ClientError;
use crate::payload::{Body, MAX_LIST, Payload, SeqRange, to_ranges};
use crate::state::{
    EntryKind, HeldItem, HistoryRecord, InStream, Parked, PendingReceipt, Removal, SessionEntry,
    Tombstone,
};
use crate::storage::{self, StorageOp, keys};
use hush_crypto::{DevicePublic, RatchetHeader, SessionInit, respond};
use hush_protocol::{
    ConversationId, Delivered, DeviceEntry, DeviceId, Envelope, MessageId, Truncation, UserKey,
};

/// Most seqs handled from one resend request or "unavailable" answer.
const MAX_SEQS_PER_REQUEST: u64 = 10_000;

/// Least time between two session resets started for one peer device: an
/// envelope whose `SessionInit` cannot be answered (forged, or replayed by
/// the relay) costs at most one prekey fetch and one control message per
/// device per interval.
pub(crate) const SESSION_RESET_INTERVAL_MS: u64 = 60_000;

/// Sessions being re-established because a peer device's session could not
/// be answered. In memory only: after a restart the peer's next unanswerable
/// envelope starts the repair again.
#[derive(Debug, Default)]
pub(crate) struct SessionRepair {
    /// When the last reset to each device was started (rate limit).
    pub last_reset: std::collections::BTreeMap<DeviceId, u64>,
    /// Devices that need a fresh session from their prekey bundle before
    /// anything more is sealed to them.
    pub fresh: std::collections::BTreeSet<DeviceId>,
}

/// Seqs above the highest seen that the relay reported expired and that
/// were asked of the sender, still without an answer.
fn claims_open(st: &InStream) -> bool {
    st.requested
        .range(st.highest.saturating_add(1)..)
        .next()
        .is_some()
}

/// Receiving chains remembered per sender device (the latest ones opened).
const CHAIN_MARKS: usize = 4;

/// Per sender device, a token bucket for failed *expensive* decryption
/// attempts: forged envelopes (a hostile relay can push any number) cost at
/// most `open_budget` expensive failures per device, plus one per
/// `open_budget_refill_ms`. In memory only: a restart refills every bucket.
#[derive(Debug, Default)]
pub(crate) struct OpenBudgets {
    pub devices: std::collections::BTreeMap<DeviceId, OpenBudget>,
    /// Expensive attempts that failed, since start (diagnostics, tests).
    pub expensive_failures: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct OpenBudget {
    pub tokens: u32,
    /// Refill clock: tokens are added for whole intervals since then.
    pub since_ms: u64,
    /// Where this device's receiving chains stand, learned from envelopes
    /// that opened: a header on one of them with a small forward skip is
    /// cheap to try.
    pub marks: Vec<ChainMark>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ChainMark {
    pub dh: [u8; 32],
    pub generation: u32,
    pub next_index: u32,
}

/// Failures reported before any X25519 or key derivation, which cost no
/// budget: an unknown prekey or identity (`respond` checks those first) and,
/// unless a new X3DH was answered first (`new_x3dh`), header bounds.
fn refused_before_work(e: &ClientError, new_x3dh: bool) -> bool {
    use hush_crypto::CryptoError as C;
    match e {
        ClientError::Crypto(C::NoPrekey | C::IdentityMismatch) => true,
        ClientError::Protocol(_)
        | ClientError::Crypto(C::MalformedHeader | C::JumpTooFar { .. }) => !new_x3dh,
        _ => false,
    }
}

impl OpenBudget {
    fn refill(&mut self, now: u64, cap: u32, every_ms: u64) {
        let every = every_ms.max(1);
        if self.tokens >= cap {
            self.tokens = cap;
            self.since_ms = now;
            return;
        }
        let n = now.saturating_sub(self.since_ms) / every;
        if n > 0 {
            let add = u32::try_from(n).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(add).min(cap);
            self.since_ms = if self.tokens >= cap {
                now
            } else {
                self.since_ms.saturating_add(n.saturating_mul(every))
            };
        }
    }

    fn cheap(&self, h: &RatchetHeader, skip: u32) -> bool {
        self.marks.iter().any(|m| {
            m.dh == h.dh
                && m.generation == h.generation
                && h.index <= m.next_index.saturating_add(skip)
        })
    }

    fn opened(&mut self, h: &RatchetHeader) {
        let next = h.index.saturating_add(1);
        let mut mark = ChainMark {
            dh: h.dh,
            generation: h.generation,
            next_index: next,
        };
        if let Some(p) = self.marks.iter().position(|m| m.dh == h.dh) {
            let old = self.marks.remove(p);
            if old.generation > h.generation
                || (old.generation == h.generation && old.next_index > next)
            {
                mark = old;
            }
        }
        self.marks.push(mark);
        if self.marks.len() > CHAIN_MARKS {
            self.marks.remove(0);
        }
    }
}

impl Engine {
    pub(crate) fn on_push(
        &mut self,
        now: u64,
        envelopes: Vec<Delivered>,
        early: bool,
    ) -> Result<(), ClientError> {
        for d in envelopes {
            let top = self.cursor.through.max(self.link.early_through);
            if d.seq <= self.cursor.through {
                self.count_duplicate();
                continue;
            }
            if d.seq <= top {
                // Taken from an early push on this connection: a plain
                // push of it says it is durable now. The relay never gives
                // a seq to two envelopes while it runs, so this is the
                // envelope already stored.
                if !early {
                    self.cursor.through = d.seq;
                    self.touch(Dirty::Cursor);
                }
                self.count_duplicate();
                continue;
            }
            if d.seq != top.saturating_add(1) {
                // A hole in relay seqs: never acknowledge past it; pull instead.
                self.link.live = false;
                if self.link.pulls.is_empty() {
                    self.send_pull();
                }
                break;
            }
            self.process(now, d.seq, &d.envelope, false)?;
            if early {
                // Stored and shown, but not counted or acknowledged before
                // the relay says it is durable: a relay that dies first may
                // give this seq to another envelope (docs/PROTOCOL.md §8.5).
                self.link.early_through = d.seq;
                self.early_taken = self.early_taken.saturating_add(1);
            } else {
                self.cursor.through = d.seq;
                self.touch(Dirty::Cursor);
            }
        }
        self.schedule_ack(now);
        Ok(())
    }

    /// The relay says what it pushed early up to `through` is durable.
    /// Capped at what this connection took early: a claim beyond it never
    /// moves the cursor past envelopes this device does not hold.
    pub(crate) fn on_durable(&mut self, now: u64, through: u64) {
        let through = through.min(self.link.early_through);
        if through > self.cursor.through {
            self.cursor.through = through;
            self.touch(Dirty::Cursor);
            self.schedule_ack(now);
        }
    }

    /// Acknowledge the cursor at once once a batch is due, else within the
    /// ack window.
    fn schedule_ack(&mut self, now: u64) {
        if self.link.live {
            let unacked = self.cursor.through.saturating_sub(self.link.acked_sent);
            if unacked >= self.cfg.ack_batch {
                self.send_ack();
            } else if unacked > 0 && self.link.ack_due.is_none() {
                self.link.ack_due = Some(now.saturating_add(self.cfg.ack_window_ms));
            }
        }
    }

    /// The relay says envelopes expired unread. Its claim only speeds up
    /// the repair of holes the senders themselves authenticated: `highest`
    /// moves only with envelopes that opened, so a claim never makes this
    /// device expect (and later skip) seqs a sender has not written. Seqs
    /// claimed above a sender's authenticated highest are counted and only
    /// asked of the sender (a hostile relay; or an honest expiry of a
    /// stream's whole tail, which the sender then answers "unavailable").
    pub(crate) fn on_truncation(&mut self, now: u64, t: &Truncation) -> Result<(), ClientError> {
        let mut ignored = 0u64;
        for r in &t.dropped {
            if self.peer(&r.sender).is_none() || r.last_seq < r.first_seq {
                continue;
            }
            let key = (r.sender, r.conversation);
            let highest = self.in_streams.get(&key).map_or(0, |s| s.highest);
            if r.last_seq > highest {
                let from = r.first_seq.max(highest.saturating_add(1));
                ignored = ignored.saturating_add((r.last_seq - from).saturating_add(1));
                // Ask the sender (asking is harmless): an honest sender
                // re-sends what it has and answers "unavailable" only for
                // seqs it assigned, and only seqs asked for are skipped on
                // such an answer. Bounded like any request.
                let st = self.in_streams.entry(key).or_default();
                let room = (MAX_SEQS_PER_REQUEST as usize).saturating_sub(st.requested.len());
                let last = r
                    .last_seq
                    .min(from.saturating_add(room as u64).saturating_sub(1));
                if room > 0 && last >= from {
                    st.requested.extend(from..=last);
                    // Asked again with the gap backoff until the sender
                    // answers: this request can itself expire on the relay
                    // while the sender is away, and nothing else would
                    // bring those seqs back or report them lost.
                    if st.request_at.is_none() {
                        st.gap_since = Some(now);
                        st.request_delay_ms = 0;
                        st.request_at = Some(now.saturating_add(self.cfg.resend_retry_ms));
                    }
                    self.touch(Dirty::In(key.0, key.1));
                    self.queue_control(
                        now,
                        key.0,
                        Body::ResendRequest {
                            conversation: key.1,
                            seqs: vec![SeqRange { first: from, last }],
                        },
                    )?;
                }
            }
            if let Some(st) = self.in_streams.get_mut(&key)
                && r.first_seq <= st.highest
                && st.has_gap()
            {
                st.gap_since.get_or_insert(now);
                // The relay told us these expired: no grace period needed.
                st.request_at = Some(now);
                self.touch(Dirty::In(key.0, key.1));
            }
        }
        if ignored > 0 {
            self.counters.relay_claims_ignored =
                self.counters.relay_claims_ignored.saturating_add(ignored);
            self.touch(Dirty::Counters);
        }
        if t.dropped_count > 0 && t.dropped.is_empty() {
            self.event(Event::Warning(format!(
                "{} envelopes expired on the relay before this device read them",
                t.dropped_count
            )));
        }
        Ok(())
    }

    /// Handle one envelope. Returns false if it was parked (sender unknown).
    pub(crate) fn process(
        &mut self,
        now: u64,
        relay_seq: u64,
        env: &Envelope,
        from_parked: bool,
    ) -> Result<bool, ClientError> {
        let h = &env.header;
        let me = self.device.device;
        if h.recipient_device != me || h.sender_seq == 0 || h.sender_device == me {
            self.reject();
            return Ok(true);
        }
        let d = h.sender_device;
        let conv = h.conversation_id;
        let seq = h.sender_seq;
        if let Some(st) = self.in_streams.get(&(d, conv))
            && (seq <= st.delivered || st.above.contains(&seq))
        {
            self.count_duplicate();
            // The sender may be probing because our receipt was lost.
            self.schedule_receipt(now, d, conv);
            return Ok(true);
        }
        let Some((user, entry)) = self.peer(&d) else {
            if !from_parked {
                // Stored in this step's batch, before the cursor that covers
                // it is acknowledged: a parked envelope survives a crash.
                self.park(relay_seq, d, env.to_bytes()?, now);
                self.refresh_for_unknown_sender(now);
            }
            return Ok(false);
        };
        let is_control = conv == control_conversation(&me, &d);
        if !is_control {
            self.map_group_stream(&d, &conv);
            let known = if let Some(ok) = self.group_stream_allowed(&d, &user, &conv) {
                ok
            } else if user == self.user_key() {
                self.conversations.contains_key(&conv)
            } else {
                self.contacts
                    .get(&user)
                    .is_some_and(|c| c.conversation == conv)
            };
            if !known {
                self.reject();
                return Ok(true);
            }
        }
        let plaintext = match self.open_envelope(now, d, &entry, env) {
            Ok(p) => p,
            Err(_) => {
                // Undecryptable: dropped without recording its seq, so a real
                // message the relay mangled is requested again as a gap.
                self.reject();
                return Ok(true);
            }
        };
        let payload = Payload::decode(&plaintext)
            .ok()
            .filter(|p| p.body.is_chat() != is_control);
        let st = self.in_streams.entry((d, conv)).or_default();
        st.highest = st.highest.max(seq);
        let recovered = st.requested.remove(&seq);
        self.touch(Dirty::In(d, conv));
        if recovered {
            self.counters.recovered = self.counters.recovered.saturating_add(1);
            self.touch(Dirty::Counters);
            if !is_control {
                self.event(Event::GapRecovered {
                    conversation: self.stream_conversation(&d, conv),
                    from_device: d,
                    count: 1,
                });
            }
        }
        let Some(payload) = payload else {
            // It opened but makes no sense: record the seq so it is not
            // requested forever, and count it.
            self.reject();
            if let Some(st) = self.in_streams.get_mut(&(d, conv)) {
                st.above.insert(seq);
            }
            self.advance(now, d, conv)?;
            return Ok(true);
        };
        if is_control {
            let elicits = payload.body.ack_eliciting();
            if let Some(st) = self.in_streams.get_mut(&(d, conv)) {
                st.above.insert(seq);
            }
            let carrier = env.header.session_init.as_ref().map(|i| i.ephemeral);
            self.apply_control(now, d, user, carrier, payload)?;
            self.advance(now, d, conv)?;
            if elicits {
                self.schedule_receipt(now, d, conv);
            }
        } else {
            let next = self
                .in_streams
                .get(&(d, conv))
                .map_or(1, |s| s.delivered.saturating_add(1));
            if seq == next {
                self.deliver_chat(now, d, user, conv, seq, payload)?;
                if let Some(st) = self.in_streams.get_mut(&(d, conv)) {
                    st.delivered = seq;
                }
            } else {
                self.counters.out_of_order = self.counters.out_of_order.saturating_add(1);
                self.touch(Dirty::Counters);
                self.held.insert(
                    (d, conv, seq),
                    HeldItem {
                        payload,
                        from_user: user,
                    },
                );
                self.touch(Dirty::Held(d, conv, seq));
                if let Some(st) = self.in_streams.get_mut(&(d, conv)) {
                    st.above.insert(seq);
                }
            }
            self.advance(now, d, conv)?;
            self.schedule_receipt(now, d, conv);
        }
        Ok(true)
    }

    pub(crate) fn count_duplicate(&mut self) {
        self.counters.duplicates_dropped = self.counters.duplicates_dropped.saturating_add(1);
        self.touch(Dirty::Counters);
    }

    pub(crate) fn reject(&mut self) {
        self.counters.rejected = self.counters.rejected.saturating_add(1);
        self.touch(Dirty::Counters);
    }

    /// Open within the sender device's work budget. A cheap attempt (the
    /// session holds a chain for the header's ratchet key, this device has
    /// opened a message of that generation on it, and the skip is at most
    /// `open_cheap_skip`) is always made. An expensive one (a root step, a
    /// reseed, a long skip, a new X3DH) is made only while the device's
    /// budget has a token, and takes one only if it fails; with none left
    /// the envelope is dropped unopened (`undecryptable_skipped`), and like
    /// any undecryptable envelope its seq is not recorded, so a real message
    /// is requested again by gap repair and re-sent.
    fn open_envelope(
        &mut self,
        now: u64,
        d: DeviceId,
        peer: &DeviceEntry,
        env: &Envelope,
    ) -> Result<Vec<u8>, ClientError> {
        let rh = RatchetHeader::from_bytes(&env.header.ratchet)?;
        let known_chain = self.open_is_cheap(d, &rh, env);
        let new_x3dh = env.header.session_init.as_ref().is_some_and(|init| {
            self.sessions
                .get(&d)
                .is_none_or(|s| s.entries.iter().all(|e| e.ephemeral != init.ephemeral))
        });
        let cap = self.cfg.open_budget;
        let every = self.cfg.open_budget_refill_ms;
        let budget = self
            .open_budgets
            .devices
            .entry(d)
            .or_insert_with(|| OpenBudget {
                tokens: cap,
                since_ms: now,
                marks: Vec::new(),
            });
        budget.refill(now, cap, every);
        let cheap = known_chain && budget.cheap(&rh, self.cfg.open_cheap_skip);
        if !cheap && budget.tokens == 0 {
            self.counters.undecryptable_skipped =
                self.counters.undecryptable_skipped.saturating_add(1);
            self.touch(Dirty::Counters);
            return Err(ClientError::Crypto(hush_crypto::CryptoError::DecryptFailed));
        }
        let result = self.try_open(now, d, peer, env);
        if let Some(b) = self.open_budgets.devices.get_mut(&d) {
            match &result {
                Ok(_) => b.opened(&rh),
                Err(e) if !cheap && !refused_before_work(e, new_x3dh) => {
                    b.tokens = b.tokens.saturating_sub(1);
                    self.open_budgets.expensive_failures =
                        self.open_budgets.expensive_failures.saturating_add(1);
                }
                Err(_) => {}
            }
        }
        result
    }

    /// Whether the session `try_open` would use already holds a receiving
    /// chain for the header's ratchet key (no root step, no new X3DH).
    fn open_is_cheap(&self, d: DeviceId, rh: &RatchetHeader, env: &Envelope) -> bool {
        let Some(slot) = self.sessions.get(&d) else {
            return false;
        };
        match &env.header.session_init {
            Some(init) => slot
                .entries
                .iter()
                .find(|e| e.ephemeral == init.ephemeral)
                .is_some_and(|e| e.session.knows_ratchet_key(&rh.dh)),
            None => slot
                .entries
                .iter()
                .any(|e| e.session.knows_ratchet_key(&rh.dh)),
        }
    }

    /// Open with the session the header names (answering its X3DH init if
    /// new), else with the session that knows the header's ratchet key, else
    /// with the one we send on. Transactional: a failure changes nothing.
    fn try_open(
        &mut self,
        now: u64,
        d: DeviceId,
        peer: &DeviceEntry,
        env: &Envelope,
    ) -> Result<Vec<u8>, ClientError> {
        let h = &env.header;
        let rh = RatchetHeader::from_bytes(&h.ratchet)?;
        let ad = env.associated_data()?;
        let me = self.device.device;
        let slot = self.sessions.entry(d).or_default();
        let epochs: Vec<u64> = slot.entries.iter().map(|e| e.session.epoch()).collect();
        let mut opened: Option<(usize, Vec<u8>)> = None;
        if let Some(init) = &h.session_init
            && let Some(i) = slot
                .entries
                .iter()
                .position(|e| e.ephemeral == init.ephemeral)
            && let Some(e) = slot.entries.get_mut(i)
        {
            opened = Some((
                i,
                e.session
                    .open(&mut self.rng, now, &rh, &ad, &env.ciphertext)?,
            ));
        }
        if opened.is_none()
            && let Some(init) = &h.session_init
        {
            // A new session from the peer: answer its X3DH. Prekey consumption
            // is committed only if the first message opens with it.
            let ci = SessionInit {
                initiator_identity: init.initiator_identity,
                ephemeral: init.ephemeral,
                signed_prekey_id: init.signed_prekey_id,
                one_time_prekey_id: init.one_time_prekey_id,
            };
            let public = DevicePublic {
                signing: peer.signing_key,
                agreement: peer.agreement_key,
            };
            let mut prekeys = self.prekeys.secrets.clone();
            let mut session = match respond(&self.device.identity, &mut prekeys, &ci, &public) {
                Ok(s) => s,
                Err(e) => {
                    if e == hush_crypto::CryptoError::NoPrekey {
                        // Its prekey is gone (used by another session, e.g. a
                        // relay that handed one bundle out twice): this
                        // session can never be answered. Start a fresh one.
                        self.session_unanswerable(now, d, init.ephemeral)?;
                    }
                    return Err(e.into());
                }
            };
            let pt = session.open(&mut self.rng, now, &rh, &ad, &env.ciphertext)?;
            self.prekeys.secrets = prekeys;
            self.touch(Dirty::Prekeys);
            let entry = SessionEntry {
                session,
                initiator: d,
                ephemeral: init.ephemeral,
            };
            let slot = self.sessions.entry(d).or_default();
            // Both sides initiated at once: both keep sending on the session
            // initiated by the lower device id; the other stays for opening.
            // Whether ours was answered yet does not matter: the higher
            // device moves to ours as soon as it answers it, so an init of
            // its own that arrives after its answer (sealed before it saw
            // ours, delayed in flight or retried after a cut) is stale. Had
            // it replaced ours here, each side would seal on a session the
            // other does not send on, and nothing from this device would
            // open there again. A higher device that really needs a fresh
            // session announces it with a `SessionReset` sealed on it
            // (`on_session_reset` puts that one first).
            let ours_first = slot.entries.first().is_some_and(|e| e.initiator == me);
            if ours_first && me < d {
                slot.entries.insert(1, entry);
            } else {
                slot.entries.insert(0, entry);
            }
            slot.entries.truncate(4);
            self.touch(Dirty::Session(d));
            self.event(Event::KeyRotation {
                device: d,
                epoch: self
                    .sessions
                    .get(&d)
                    .and_then(|s| s.entries.first())
                    .map_or(0, |e| e.session.epoch()),
            });
            return Ok(pt);
        }
        if opened.is_none() {
            // Bounded work per envelope: the session that already knows the
            // header's ratchet key (no root step), else only the session we
            // send on, where a peer's new ratchet key answers ours. A forged
            // envelope thus costs at most one speculative DH step.
            let slot = self.sessions.entry(d).or_default();
            let i = slot
                .entries
                .iter()
                .position(|e| e.session.knows_ratchet_key(&rh.dh))
                .unwrap_or(0);
            if let Some(e) = slot.entries.get_mut(i) {
                // The error is kept: one refused before any work costs no
                // budget (see `open_envelope`).
                let pt = e
                    .session
                    .open(&mut self.rng, now, &rh, &ad, &env.ciphertext)?;
                opened = Some((i, pt));
            }
        }
        let Some((i, pt)) = opened else {
            return Err(ClientError::Crypto(hush_crypto::CryptoError::DecryptFailed));
        };
        self.touch(Dirty::Session(d));
        let after = self
            .sessions
            .get(&d)
            .and_then(|s| s.entries.get(i))
            .map(|e| e.session.epoch());
        if let Some(epoch) = after
            && i == 0
            && epochs.first().is_some_and(|&b| b != epoch)
        {
            self.event(Event::KeyRotation { device: d, epoch });
        }
        Ok(pt)
    }

    /// A peer device's `SessionInit` names a prekey we no longer hold, so
    /// nothing sealed on that session will ever open here. Start a fresh
    /// session to the device from its prekey bundle and send, on it, a
    /// `SessionReset` naming the broken session: the peer drops that one and
    /// re-sends everything we have not receipted. Rate-limited per device.
    fn session_unanswerable(
        &mut self,
        now: u64,
        d: DeviceId,
        ephemeral: [u8; 32],
    ) -> Result<(), ClientError> {
        let repair = &mut self.session_repair;
        if repair
            .last_reset
            .get(&d)
            .is_some_and(|&t| now < t.saturating_add(SESSION_RESET_INTERVAL_MS))
        {
            return Ok(());
        }
        repair
            .last_reset
            .retain(|_, t| now < t.saturating_add(SESSION_RESET_INTERVAL_MS));
        repair.last_reset.insert(d, now);
        repair.fresh.insert(d);
        self.queue_control(now, d, Body::SessionReset { ephemeral })
    }

    /// The peer could not answer the session we started with `ephemeral`
    /// and sent this on a fresh session of its own (`carrier`, the one the
    /// envelope named): that session goes first, as the peer now sends on
    /// it (it may have come second if ours had been answered). Then drop
    /// ours and re-send, on the peer's session, everything it has not
    /// receipted; that part is ignored unless the named session is ours,
    /// never answered, and not the only one.
    fn on_session_reset(
        &mut self,
        now: u64,
        d: DeviceId,
        ephemeral: [u8; 32],
        carrier: Option<[u8; 32]>,
    ) -> Result<(), ClientError> {
        let me = self.device.device;
        let Some(slot) = self.sessions.get_mut(&d) else {
            return Ok(());
        };
        if let Some(c) = carrier
            && let Some(p) = slot
                .entries
                .iter()
                .position(|e| e.initiator == d && e.ephemeral == c)
            && p > 0
        {
            let entry = slot.entries.remove(p);
            let epoch = entry.session.epoch();
            slot.entries.insert(0, entry);
            self.touch(Dirty::Session(d));
            self.event(Event::KeyRotation { device: d, epoch });
        }
        let Some(slot) = self.sessions.get_mut(&d) else {
            return Ok(());
        };
        let Some(pos) = slot.entries.iter().position(|e| {
            e.initiator == me && e.ephemeral == ephemeral && e.session.needs_init_header().is_some()
        }) else {
            return Ok(());
        };
        if slot.entries.len() < 2 {
            return Ok(());
        }
        slot.entries.remove(pos);
        let epoch = slot.entries.first().map_or(0, |e| e.session.epoch());
        self.touch(Dirty::Session(d));
        self.event(Event::KeyRotation { device: d, epoch });
        let mut due: Vec<(ConversationId, u64)> = Vec::new();
        for ((dev, conv), os) in &self.out_streams {
            if *dev != d {
                continue;
            }
            let room = usize::try_from(MAX_SEQS_PER_REQUEST)
                .unwrap_or(usize::MAX)
                .saturating_sub(due.len());
            due.extend(
                os.sent
                    .range(os.receipted.saturating_add(1)..)
                    .take(room)
                    .map(|(s, _)| (*conv, *s)),
            );
        }
        for (conv, seq) in due {
            self.reseal(now, d, conv, seq)?;
        }
        Ok(())
    }

    /// Release everything contiguous above `delivered`.
    fn advance(&mut self, now: u64, d: DeviceId, conv: ConversationId) -> Result<(), ClientError> {
        loop {
            let Some(st) = self.in_streams.get_mut(&(d, conv)) else {
                return Ok(());
            };
            let next = st.delivered.saturating_add(1);
            if !st.above.remove(&next) {
                break;
            }
            st.delivered = next;
            if let Some(item) = self.held.remove(&(d, conv, next)) {
                self.touch(Dirty::Held(d, conv, next));
                self.deliver_chat(now, d, item.from_user, conv, next, item.payload)?;
            }
        }
        self.touch(Dirty::In(d, conv));
        if let Some(st) = self.in_streams.get_mut(&(d, conv)) {
            if st.has_gap() || claims_open(st) {
                if st.gap_since.is_none() {
                    st.gap_since = Some(now);
                    st.request_at = Some(now.saturating_add(self.cfg.gap_grace_ms));
                    st.request_delay_ms = 0;
                }
            } else {
                st.gap_since = None;
                st.request_at = None;
                st.request_delay_ms = 0;
            }
        }
        Ok(())
    }

    pub(crate) fn deliver_chat(
        &mut self,
        now: u64,
        d: DeviceId,
        user: UserKey,
        conv: ConversationId,
        seq: u64,
        payload: Payload,
    ) -> Result<(), ClientError> {
        if !self.conversations.contains_key(&conv) {
            return self.group_deliver(now, d, user, conv, seq, payload);
        }
        match payload.body {
            Body::Text { text, sent_at_ms } => {
                // Removed before it came: by its author's recall, or by this
                // user's delete (or a recall recorded by an earlier version).
                let recalled = self.recalls.contains_key(&(conv, user, payload.id));
                let removed = self
                    .tombs
                    .get(&payload.id)
                    .is_some_and(|t| t.conversation == conv);
                if recalled || removed {
                    self.counters.suppressed = self.counters.suppressed.saturating_add(1);
                    self.touch(Dirty::Counters);
                    return Ok(());
                }
                // Already imported from the history archive.
                if !self.history_admit(&payload.id) {
                    self.counters.duplicates_dropped =
                        self.counters.duplicates_dropped.saturating_add(1);
                    self.touch(Dirty::Counters);
                    return Ok(());
                }
                let record = HistoryRecord {
                    id: payload.id,
                    conversation: conv,
                    from_user: user,
                    from_device: d,
                    sender_seq: seq,
                    sent_at_ms,
                    stored_at_ms: now,
                    text,
                    outgoing: user == self.user_key(),
                };
                self.store_history(&record)?;
                self.event(Event::Message(record));
            }
            Body::Recall { target } => {
                // Only the author may recall: the recall is keyed by its
                // sender's user, so it can only ever remove that user's
                // message in this conversation. In a conversation with a
                // contact the only other author is this user: a contact
                // naming one of our messages (or one too old to tell) is
                // refused.
                let own = user == self.user_key();
                let ours = self.mine.contains_key(&(conv, target))
                    || self
                        .outbox
                        .get(&target)
                        .is_some_and(|o| o.kind == EntryKind::Chat);
                let too_old = target.timestamp_ms().saturating_add(self.removal_window()) <= now;
                if own || !(ours || too_old) {
                    self.apply_recall(now, conv, user, target);
                } else {
                    self.counters.recalls_refused = self.counters.recalls_refused.saturating_add(1);
                    self.touch(Dirty::Counters);
                }
            }
            _ => self.reject(),
        }
        Ok(())
    }

    pub(crate) fn store_history(&mut self, record: &HistoryRecord) -> Result<(), ClientError> {
        if record.outgoing {
            self.mine
                .insert((record.conversation, record.id), record.stored_at_ms);
            self.touch(Dirty::Mine(record.conversation, record.id));
        }
        let order = self.counters.next_order;
        self.counters.next_order = order.saturating_add(1);
        self.touch(Dirty::Counters);
        self.history_ops.push(StorageOp::Put {
            key: keys::history_message(&record.conversation, &record.id),
            value: storage::encode(record)?,
        });
        self.history_ops.push(StorageOp::Put {
            key: keys::history_order(&record.conversation, order),
            value: storage::encode(&record.id)?,
        });
        Ok(())
    }

    /// How long recalls and deletes are remembered (and recalls honoured).
    pub(crate) fn removal_window(&self) -> u64 {
        self.cfg.tombstone_ttl_ms.max(self.cfg.outbox_retention_ms)
    }

    /// A recall by `author` (checked by the caller): remembered under
    /// (conversation, author, id) so that only that author's message with
    /// this id in this conversation is removed, now or when it arrives.
    pub(crate) fn apply_recall(
        &mut self,
        now: u64,
        conv: ConversationId,
        author: UserKey,
        id: MessageId,
    ) {
        if self.recalls.contains_key(&(conv, author, id)) {
            return;
        }
        self.recalls.insert((conv, author, id), now);
        self.touch(Dirty::Recall(conv, author, id));
        // Only this conversation's copy: in a conversation with a contact
        // the message is theirs (ours are refused above) or ours.
        self.history_ops.push(StorageOp::Delete {
            key: keys::history_message(&conv, &id),
        });
        self.event(Event::MessageRemoved {
            id,
            conversation: conv,
            reason: Removal::Recalled,
        });
    }

    /// This user's delete (here or synced from another of their devices):
    /// tombstone (so a late arrival stays hidden) and erase from history.
    /// Recalls go through [`Engine::apply_recall`].
    pub(crate) fn apply_removal(
        &mut self,
        now: u64,
        conv: ConversationId,
        id: MessageId,
        reason: Removal,
    ) {
        if self.tombs.contains_key(&id) {
            return;
        }
        self.tombs.insert(
            id,
            Tombstone {
                reason,
                conversation: conv,
                at_ms: now,
            },
        );
        self.touch(Dirty::Tomb(id));
        self.history_ops.push(StorageOp::Delete {
            key: keys::history_message(&conv, &id),
        });
        self.event(Event::MessageRemoved {
            id,
            conversation: conv,
            reason,
        });
    }

    /// `carrier`: the X3DH ephemeral key of the peer's session the item
    /// came on, if the envelope named one.
    fn apply_control(
        &mut self,
        now: u64,
        d: DeviceId,
        user: UserKey,
        carrier: Option<[u8; 32]>,
        payload: Payload,
    ) -> Result<(), ClientError> {
        let own = user == self.user_key();
        match payload.body {
            Body::Receipt { delivered, read } => self.on_receipt(now, d, &delivered, &read),
            Body::ReadSync { conversation, ids } if own => {
                for id in &ids {
                    self.history_ops.push(StorageOp::Put {
                        key: keys::history_read(id),
                        value: storage::encode(&())?,
                    });
                }
                self.event(Event::ReadSynced { conversation, ids });
            }
            Body::DeleteSync { conversation, ids } if own => {
                for id in ids {
                    self.apply_removal(now, conversation, id, Removal::Deleted);
                }
            }
            Body::ResendRequest { conversation, seqs } => {
                self.on_resend_request(now, d, user, conversation, &seqs)?
            }
            Body::ResendUnavailable { conversation, seqs } => {
                self.on_unavailable(now, d, conversation, &seqs)?
            }
            Body::LinkHello { token } if own => {
                let valid = self
                    .links
                    .remove(&token)
                    .is_some_and(|l| now < l.expires_ms);
                self.touch(Dirty::Link(token));
                if valid {
                    let contacts = self.contact_infos();
                    self.queue_control(now, d, Body::LinkWelcome { contacts })?;
                    self.history_note_linked(d);
                    self.event(Event::DeviceLinked { device: d });
                } else {
                    self.reject();
                }
            }
            Body::LinkWelcome { contacts } if own => {
                let expected = self.device.link.as_ref().is_some_and(|l| l.inviter == d);
                if expected {
                    for c in contacts {
                        let u = UserKey(c.user);
                        if u != self.user_key() {
                            self.add_contact(now, u, c.relay, c.name);
                        }
                    }
                    self.device.link = None;
                    self.touch(Dirty::Device);
                    self.event(Event::Linked);
                }
            }
            Body::ContactAdded { contact } if own => {
                let u = UserKey(contact.user);
                if u != self.user_key() {
                    self.add_contact(now, u, contact.relay, contact.name);
                }
            }
            Body::HistoryRequest if own => self.on_history_request(d),
            Body::HistoryOffer {
                blob,
                key,
                total_len,
                chunks,
                messages,
            } if own => self.on_history_offer(d, blob, &key, total_len, chunks, messages),
            Body::SessionReset { ephemeral } => {
                self.on_session_reset(now, d, ephemeral, carrier)?;
            }
            Body::NotYetSent {
                conversation,
                next_seq,
            } => self.on_not_yet_sent(d, conversation, next_seq),
            Body::DeviceListChanged { list } => self.on_list_notice(now, user, list)?,
            body @ (Body::GroupResend { .. } | Body::GroupUnavailable { .. }) => {
                self.group_control(now, d, body)?
            }
            _ => self.reject(),
        }
        Ok(())
    }

    /// The sender says seqs from `next_seq` on were never written: the ones
    /// this device asked for (only relay expiry claims make it ask above
    /// what the sender authenticated) are no longer awaited, and the relay's
    /// claim is reported as misbehaviour. Nothing is skipped or marked
    /// received, so those seqs still arrive normally once written; a peer
    /// that lies here only cancels requests of its own stream.
    fn on_not_yet_sent(&mut self, d: DeviceId, conv: ConversationId, next_seq: u64) {
        let Some(st) = self.in_streams.get_mut(&(d, conv)) else {
            return;
        };
        let refuted = st
            .requested
            .split_off(&next_seq.max(st.highest.saturating_add(1)));
        if refuted.is_empty() {
            return;
        }
        let count = refuted.len() as u64;
        self.touch(Dirty::In(d, conv));
        self.counters.relay_claims_refuted =
            self.counters.relay_claims_refuted.saturating_add(count);
        self.touch(Dirty::Counters);
        self.event(Event::RelayMisbehaviour {
            conversation: self.stream_conversation(&d, conv),
            from_device: d,
            count,
        });
    }

    pub(crate) fn contact_infos(&self) -> Vec<crate::payload::ContactInfo> {
        self.contacts
            .values()
            .take(MAX_LIST)
            .map(|c| crate::payload::ContactInfo {
                user: c.user.0,
                relay: c.relay.clone(),
                name: c.name.clone(),
            })
            .collect()
    }

    fn on_resend_request(
        &mut self,
        now: u64,
        d: DeviceId,
        user: UserKey,
        conv: ConversationId,
        ranges: &[SeqRange],
    ) -> Result<(), ClientError> {
        let me = self.device.device;
        let allowed = conv == control_conversation(&me, &d)
            || self.out_group(&d, &conv).is_some()
            || if user == self.user_key() {
                self.conversations.contains_key(&conv)
            } else {
                self.contacts
                    .get(&user)
                    .is_some_and(|c| c.conversation == conv)
            };
        if !allowed {
            self.reject();
            return Ok(());
        }
        // Only seqs this device assigned can be "unavailable": answering so
        // for a future seq would make the peer skip that message when it is
        // written.
        let sent_through = self
            .out_streams
            .get(&(d, conv))
            .map_or(0, |s| s.next_seq.saturating_sub(1));
        let mut unavailable = Vec::new();
        let mut budget = MAX_SEQS_PER_REQUEST;
        let mut ignored = 0u64;
        for r in ranges {
            if r.last > sent_through {
                let from = r.first.max(sent_through.saturating_add(1));
                ignored = ignored.saturating_add(r.last.saturating_sub(from).saturating_add(1));
            }
            let mut s = r.first;
            while s <= r.last.min(sent_through) && budget > 0 {
                budget -= 1;
                if !self.resend(now, d, conv, s)? {
                    unavailable.push(s);
                }
                s = match s.checked_add(1) {
                    Some(n) => n,
                    None => break,
                };
            }
        }
        if ignored > 0 {
            self.counters.peer_claims_ignored =
                self.counters.peer_claims_ignored.saturating_add(ignored);
            self.touch(Dirty::Counters);
            // Say so, authenticated: the peer asked because the relay claimed
            // these expired, and only this answer can prove the claim false.
            self.queue_control(
                now,
                d,
                Body::NotYetSent {
                    conversation: conv,
                    next_seq: sent_through.saturating_add(1),
                },
            )?;
        }
        if !unavailable.is_empty() {
            let mut ranges = to_ranges(unavailable);
            ranges.truncate(MAX_LIST);
            self.queue_control(
                now,
                d,
                Body::ResendUnavailable {
                    conversation: conv,
                    seqs: ranges,
                },
            )?;
        }
        Ok(())
    }

    fn on_unavailable(
        &mut self,
        now: u64,
        d: DeviceId,
        conv: ConversationId,
        ranges: &[SeqRange],
    ) -> Result<(), ClientError> {
        let is_chat = conv != control_conversation(&self.device.device, &d);
        let Some(st) = self.in_streams.get_mut(&(d, conv)) else {
            return Ok(());
        };
        let mut count = 0u64;
        let mut budget = MAX_SEQS_PER_REQUEST;
        // Only seqs below what the sender authenticated are skipped: an
        // "unavailable" for a seq it has not written yet would otherwise
        // drop that message as a duplicate when it comes.
        let mut ignored = 0u64;
        for r in ranges {
            let mut s = r.first.max(st.delivered.saturating_add(1));
            while s <= r.last && budget > 0 {
                budget -= 1;
                // Above the authenticated highest only what was asked for.
                if s > st.highest && !st.requested.contains(&s) {
                    ignored = ignored.saturating_add(1);
                } else {
                    if st.above.insert(s) {
                        count += 1;
                    }
                    st.requested.remove(&s);
                    // The sender's own answer says it assigned this seq.
                    st.highest = st.highest.max(s);
                }
                s = match s.checked_add(1) {
                    Some(n) => n,
                    None => break,
                };
            }
        }
        self.touch(Dirty::In(d, conv));
        if ignored > 0 {
            self.counters.peer_claims_ignored =
                self.counters.peer_claims_ignored.saturating_add(ignored);
            self.touch(Dirty::Counters);
        }
        if count > 0 && is_chat {
            self.counters.unrecoverable = self.counters.unrecoverable.saturating_add(count);
            self.touch(Dirty::Counters);
            self.event(Event::Unrecoverable {
                conversation: self.stream_conversation(&d, conv),
                from_device: d,
                count,
            });
        }
        self.advance(now, d, conv)
    }

    /// Batch a receipt for `conv` to device `d` (one per window per device).
    pub(crate) fn schedule_receipt(&mut self, now: u64, d: DeviceId, conv: ConversationId) {
        let window = self.cfg.receipt_window_ms;
        let r = self.receipts.entry(d).or_insert_with(|| PendingReceipt {
            due_ms: now.saturating_add(window),
            ..PendingReceipt::default()
        });
        if r.delivered.insert(conv) {
            self.touch(Dirty::Receipt(d));
        }
    }

    /// Queue a read receipt for the author device of a message.
    pub(crate) fn schedule_read(&mut self, now: u64, d: DeviceId, id: MessageId) {
        let window = self.cfg.receipt_window_ms;
        let r = self.receipts.entry(d).or_insert_with(|| PendingReceipt {
            due_ms: now.saturating_add(window),
            ..PendingReceipt::default()
        });
        r.read.push(id);
        self.touch(Dirty::Receipt(d));
    }

    pub(crate) fn flush_receipts(&mut self, now: u64) -> Result<(), ClientError> {
        let due: Vec<DeviceId> = self
            .receipts
            .iter()
            .filter(|(_, r)| now >= r.due_ms)
            .map(|(d, _)| *d)
            .collect();
        for d in due {
            let Some(r) = self.receipts.remove(&d) else {
                continue;
            };
            self.touch(Dirty::Receipt(d));
            let delivered: Vec<(ConversationId, u64)> = r
                .delivered
                .iter()
                .filter_map(|c| {
                    self.in_streams
                        .get(&(d, *c))
                        .map(|s| (*c, s.delivered))
                        .filter(|(_, t)| *t > 0)
                })
                .take(MAX_LIST)
                .collect();
            if self.peer(&d).is_none() {
                continue;
            }
            let mut reads = r.read.chunks(MAX_LIST);
            let first = reads.next().map(<[MessageId]>::to_vec).unwrap_or_default();
            if !delivered.is_empty() || !first.is_empty() {
                self.queue_control(
                    now,
                    d,
                    Body::Receipt {
                        delivered,
                        read: first,
                    },
                )?;
            }
            for more in reads {
                self.queue_control(
                    now,
                    d,
                    Body::Receipt {
                        delivered: Vec::new(),
                        read: more.to_vec(),
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Ask senders for what is still missing, once the sync has drained.
    pub(crate) fn request_gaps(&mut self, now: u64) -> Result<(), ClientError> {
        if !self.link.live {
            return Ok(());
        }
        // The due streams from the timer index (see `timers`).
        self.reindex_streams();
        let due = self.stream_timers.gaps.due(now);
        let me = self.device.device;
        for (d, conv) in due {
            let Some(st) = self.in_streams.get_mut(&(d, conv)) else {
                self.stream_timers.gaps.set((d, conv), None);
                continue;
            };
            // Holes below the highest seq seen, then seqs above it that the
            // relay reported expired and that were asked for without an
            // answer yet.
            let claimed = st.requested.range(st.highest.saturating_add(1)..).copied();
            let missing: Vec<u64> = st
                .missing()
                .chain(claimed)
                .take(MAX_SEQS_PER_REQUEST as usize)
                .collect();
            if missing.is_empty() {
                st.request_at = None;
                st.gap_since = None;
                self.touch(Dirty::In(d, conv));
                continue;
            }
            let fresh: Vec<u64> = missing
                .iter()
                .copied()
                .filter(|s| !st.requested.contains(s))
                .collect();
            st.requested.extend(fresh.iter().copied());
            let delay = st.request_delay_ms;
            self.touch(Dirty::In(d, conv));
            if !fresh.is_empty() {
                self.counters.gaps_detected = self
                    .counters
                    .gaps_detected
                    .saturating_add(fresh.len() as u64);
                self.touch(Dirty::Counters);
                if conv != control_conversation(&me, &d) {
                    self.event(Event::GapDetected {
                        conversation: self.stream_conversation(&d, conv),
                        from_device: d,
                        count: fresh.len() as u64,
                    });
                }
            }
            let mut ranges = to_ranges(missing);
            ranges.truncate(MAX_LIST);
            if self.peer(&d).is_some() {
                self.queue_control(
                    now,
                    d,
                    Body::ResendRequest {
                        conversation: conv,
                        seqs: ranges,
                    },
                )?;
            }
            let next = self.next_delay(
                delay,
                self.cfg.resend_retry_ms,
                self.cfg.resend_retry_max_ms,
            );
            if let Some(st) = self.in_streams.get_mut(&(d, conv)) {
                st.request_delay_ms = next;
                st.request_at = Some(now.saturating_add(next));
            }
        }
        Ok(())
    }

    /// Park an envelope from an unknown device, within the bounds: per
    /// sender device, then in all (count and bytes), the oldest go first.
    /// Their records are deleted in the same batch.
    fn park(&mut self, relay_seq: u64, d: DeviceId, envelope: Vec<u8>, now: u64) {
        self.parked_bytes = self.parked_bytes.saturating_add(envelope.len());
        if let Some(old) = self.parked.insert(
            relay_seq,
            Parked {
                envelope,
                parked_ms: now,
            },
        ) {
            self.parked_bytes = self.parked_bytes.saturating_sub(old.envelope.len());
            // Another envelope had this seq: one taken from an early push
            // whose relay restarted before it was durable. Its sender sends
            // it again (the relay never acknowledged it).
            for set in self.parked_by_device.values_mut() {
                set.remove(&relay_seq);
            }
            self.parked_by_device.retain(|_, set| !set.is_empty());
        }
        self.parked_by_device
            .entry(d)
            .or_default()
            .insert(relay_seq);
        self.touch(Dirty::Parked(relay_seq));
        self.enforce_device_bound(d);
        self.enforce_parked_bounds();
    }

    fn enforce_device_bound(&mut self, d: DeviceId) {
        let per_device = self.cfg.parked_per_device.max(1);
        while let Some(set) = self.parked_by_device.get(&d)
            && set.len() > per_device
            && let Some(&oldest) = set.first()
        {
            self.drop_parked(oldest);
        }
    }

    /// Drop the oldest parked envelopes of each device over its bound, then
    /// the oldest of all while over the total bounds.
    pub(crate) fn enforce_parked_bounds(&mut self) {
        let per_device = self.cfg.parked_per_device.max(1);
        let over: Vec<DeviceId> = self
            .parked_by_device
            .iter()
            .filter(|(_, set)| set.len() > per_device)
            .map(|(d, _)| *d)
            .collect();
        for d in over {
            self.enforce_device_bound(d);
        }
        let max = self.cfg.parked_max.max(1);
        let max_bytes = self.cfg.parked_max_bytes;
        while (self.parked.len() > max || self.parked_bytes > max_bytes)
            && let Some(&oldest) = self.parked.keys().next()
        {
            self.drop_parked(oldest);
        }
    }

    fn drop_parked(&mut self, s: u64) {
        self.unpark(s);
        self.counters.parked_dropped = self.counters.parked_dropped.saturating_add(1);
        self.touch(Dirty::Counters);
    }

    /// Forget a parked envelope (its record is deleted with the step).
    pub(crate) fn unpark(&mut self, s: u64) {
        if let Some(p) = self.parked.remove(&s) {
            self.parked_bytes = self.parked_bytes.saturating_sub(p.envelope.len());
        }
        self.parked_by_device.retain(|_, set| {
            set.remove(&s);
            !set.is_empty()
        });
        self.touch(Dirty::Parked(s));
    }

    /// Derive the per-device index and byte total of parked envelopes.
    pub(crate) fn rebuild_parked_index(&mut self) {
        self.parked_by_device.clear();
        self.parked_bytes = 0;
        for (s, p) in &self.parked {
            self.parked_bytes = self.parked_bytes.saturating_add(p.envelope.len());
            // One that does not parse is dropped at its retry; until then it
            // counts under a device id no real device has.
            let d = Envelope::from_bytes(&p.envelope)
                .map_or(DeviceId([0; 16]), |e| e.header.sender_device);
            self.parked_by_device.entry(d).or_default().insert(*s);
        }
    }

    /// Retry envelopes parked because their sender was unknown.
    pub(crate) fn retry_parked(&mut self, now: u64) -> Result<(), ClientError> {
        let seqs: Vec<u64> = self.parked.keys().copied().collect();
        for s in seqs {
            let Some(p) = self.parked.get(&s) else {
                continue;
            };
            let env = match Envelope::from_bytes(&p.envelope) {
                Ok(e) => e,
                Err(_) => {
                    self.unpark(s);
                    self.reject();
                    continue;
                }
            };
            if self.process(now, s, &env, true)? {
                self.unpark(s);
            }
        }
        if self.parked.is_empty() {
            self.parked_refreshes = 0;
        }
        Ok(())
    }

    /// Diagnostics: the highest sender seq from device `d` in `conv` up to
    /// which everything is delivered (or declared unrecoverable) here.
    /// (For a group, the group id or the stream's pseudonym.)
    pub fn delivered_through(&self, d: &DeviceId, conv: &ConversationId) -> u64 {
        let me = self.device.device;
        let conv = match self.is_group(conv) {
            true => super::group::group_stream(conv, d, &me).unwrap_or(*conv),
            false => *conv,
        };
        self.in_streams
            .get(&(*d, conv))
            .map_or(0, |s: &InStream| s.delivered)
    }

    /// Diagnostics: the highest sender seq this device assigned in its
    /// stream to device `d` in `conv`.
    /// (For a group, the group id or the stream's pseudonym.)
    pub fn sent_through(&self, d: &DeviceId, conv: &ConversationId) -> u64 {
        let conv = self.chat_stream(conv, d).unwrap_or(*conv);
        self.out_streams
            .get(&(*d, conv))
            .map_or(0, |s| s.next_seq.saturating_sub(1))
    }
}
