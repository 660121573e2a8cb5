//! The invariants checked after every run.
//!
//! 1. No plaintext reached the relay: no byte string any device sent to the
//!    relay, and no envelope the relay stored, contains a message marker.
//! 2. Liveness: after the heal phase (and a user's retry of failed
//!    messages) every message reached `Stored` at its sender, and — unless
//!    the scenario lets senders forget — `Delivered` or `Read`.
//! 3. Every stored message is in the history of every device of its
//!    recipient and every other device of its sender exactly once (or was
//!    recalled/deleted, which leaves a tombstone or a recall record), or was reported
//!    unrecoverable — which is only allowed when the sender's outbox
//!    expired, i.e. the sender lost it too.
//! 4. Order: on every device, the messages of each (sender device,
//!    conversation) appear in the order they were written.
//! 5. No duplicates: no device showed a message twice, and no history lists
//!    a message twice.
//! 6. Every chat stream is complete: each device has delivered (or declared
//!    unrecoverable) every sender seq every other device assigned to it.
//!
//! Group scenarios add (see [`check_group`]):
//!
//! 7. One order: a group message has the same position on every device
//!    that shows it, and every device's group order is sorted by it, has
//!    no duplicate and lists only messages in its history.
//! 8. Causality: every message the sender displayed before writing a
//!    message comes before it.
//! 9. Exactly once to every member: a message reaches every device of every
//!    user who was a member when it was written (and the author's other
//!    devices), unless that user or the author was removed during the run,
//!    or its add raced the adder's removal (added by a member already
//!    removed, or removed by one that had not seen the add: devices that
//!    sort the removal first skip the add).
//! 10. Removal: a user removed before the sender wrote a message never
//!     shows it.

use super::Report;
use super::world::World;
use hush_client::storage::keys;
use hush_client::{GroupPosition, MessageState, Storage};
use hush_protocol::{ConversationId, DeviceId, MessageId};
use std::collections::{BTreeMap, BTreeSet};

/// A failed run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The setup phase failed.
    #[error("setup: {0}")]
    Setup(String),
    /// An engine returned an error or storage failed.
    #[error("engine: {0}")]
    Engine(String),
    /// An invariant does not hold.
    #[error("invariant: {0}")]
    Invariant(String),
}

fn fail(msg: String) -> Result<Report, Violation> {
    Err(Violation::Invariant(msg))
}

fn history_ids<S: Storage>(s: &S, conv: &ConversationId) -> Result<Vec<MessageId>, Violation> {
    let rows = s
        .scan_prefix(&keys::history_order_prefix(conv))
        .map_err(|e| Violation::Engine(e.to_string()))?;
    let mut out = Vec::new();
    for (_, v) in rows {
        let id: MessageId = hush_client::storage::decode(b"order", &v)
            .map_err(|_| Violation::Engine("order record".into()))?;
        out.push(id);
    }
    Ok(out)
}

fn has<S: Storage>(s: &S, key: &[u8]) -> Result<bool, Violation> {
    s.get(key)
        .map(|v| v.is_some())
        .map_err(|e| Violation::Engine(e.to_string()))
}

/// Check a finished world.
pub fn check(w: &World) -> Result<Report, Violation> {
    let mut report = w.report.clone();
    report.messages = w.sent.len();
    if let Some(leak) = w.leaks.first() {
        return fail(format!("{leak} ({} leaks)", w.leaks.len()));
    }
    let forgetful = w.scenario.senders_may_forget();
    let users = w.scenario.devices.len();
    let user_nodes: Vec<Vec<usize>> = (0..users).map(|u| w.user_nodes(u)).collect();
    let device_of: Vec<DeviceId> = w.nodes.iter().map(|n| n.engine.device_id()).collect();

    // Sanity: the marker scan can see plaintext where it legitimately is.
    if let Some(m) = w.sent.iter().find(|m| !w.recalled.contains(&m.id)) {
        let s = &w.nodes[m.node].storage;
        let found = s
            .records()
            .any(|(_, v)| v.windows(m.text.len()).any(|x| x == m.text.as_bytes()));
        if !found {
            return fail("a sent text is not in its sender's history (scan would be blind)".into());
        }
    }

    // 2. Liveness of states.
    let mut stored: BTreeSet<MessageId> = BTreeSet::new();
    for m in &w.sent {
        let s = &w.nodes[m.node].storage;
        let state = s
            .get(&keys::history_state(&m.id))
            .map_err(|e| Violation::Engine(e.to_string()))?
            .and_then(|v| hush_client::storage::decode::<MessageState>(b"state", &v).ok());
        match state {
            Some(MessageState::Stored) if !forgetful => {
                return fail(format!("message {} stored but never delivered", m.id));
            }
            Some(MessageState::Stored | MessageState::Delivered | MessageState::Read) => {
                stored.insert(m.id);
            }
            other if !forgetful => {
                return fail(format!("message {} ended in state {other:?}", m.id));
            }
            _ => {}
        }
    }
    report.stored = stored.len();

    // 3, 4, 5 per device and conversation.
    let sent_by_id: BTreeMap<MessageId, &super::world::SentMsg> =
        w.sent.iter().map(|m| (m.id, m)).collect();
    let mut missing_per: BTreeMap<(usize, DeviceId, ConversationId), u64> = BTreeMap::new();
    for m in &w.sent {
        if !stored.contains(&m.id) {
            continue;
        }
        let sender_user = w.nodes[m.node].user;
        let expected: Vec<usize> = user_nodes[m.to_user]
            .iter()
            .chain(user_nodes[sender_user].iter())
            .copied()
            .filter(|&d| d != m.node)
            .collect();
        for d in expected {
            let s = &w.nodes[d].storage;
            let present = has(s, &keys::history_message(&m.conversation, &m.id))?;
            let tomb = has(s, &keys::tombstone(&m.id))?;
            // A recall is kept under `s/recall/<conv><author user><id>`.
            let author = w.nodes[m.node].engine.user_key();
            let recall = [
                b"s/recall/".as_slice(),
                m.conversation.as_bytes(),
                author.as_bytes(),
                m.id.as_bytes(),
            ]
            .concat();
            let recalled = has(s, &recall)?;
            if present || tomb || recalled {
                report.deliveries += 1;
            } else {
                *missing_per
                    .entry((d, device_of[m.node], m.conversation))
                    .or_default() += 1;
            }
        }
    }
    for ((d, from, conv), missing) in &missing_per {
        let reported = w.nodes[*d]
            .unrecoverable
            .get(&(*from, *conv))
            .copied()
            .unwrap_or(0);
        if !forgetful || reported < *missing {
            return fail(format!(
                "device {d} lacks {missing} stored message(s) from {from} in {conv} (reported unrecoverable: {reported})"
            ));
        }
    }
    for (i, n) in w.nodes.iter().enumerate() {
        let reported: u64 = n.unrecoverable.values().sum();
        report.unrecoverable += reported;
        if reported > 0 && !forgetful {
            return fail(format!(
                "device {i} reported {reported} unrecoverable message(s) although every sender kept its outbox"
            ));
        }
        if let Some((id, count)) = n.shown.iter().find(|(_, c)| **c > 1) {
            return fail(format!("device {i} showed message {id} {count} times"));
        }
        let c = n.engine.counters();
        report.gaps_detected += c.gaps_detected;
        report.recovered += c.recovered;
        report.duplicates += c.duplicates_dropped;
        report.out_of_order += c.out_of_order;
        report.resent += c.resent;
        report.probes += c.probes;
        let mut convs: BTreeSet<ConversationId> =
            n.engine.contacts().into_iter().map(|(_, _, c)| c).collect();
        convs.extend(w.group);
        for conv in convs {
            let ids = history_ids(&n.storage, &conv)?;
            let unique: BTreeSet<&MessageId> = ids.iter().collect();
            if unique.len() != ids.len() {
                return fail(format!("device {i} lists a message twice in {conv}"));
            }
            // Order per sender device.
            let mut last: BTreeMap<usize, usize> = BTreeMap::new();
            for id in &ids {
                let Some(m) = sent_by_id.get(id) else {
                    continue;
                };
                if let Some(&prev) = last.get(&m.node)
                    && m.index <= prev
                {
                    return fail(format!(
                        "device {i} shows messages of node {} out of order in {conv}",
                        m.node
                    ));
                }
                last.insert(m.node, m.index);
            }
            // 6. Stream completeness.
            for (j, other) in w.nodes.iter().enumerate() {
                if j == i {
                    continue;
                }
                let sent = other.engine.sent_through(&device_of[i], &conv);
                let got = n.engine.delivered_through(&device_of[j], &conv);
                if got != sent {
                    return fail(format!(
                        "device {i} delivered seq {got} of node {j}'s stream in {conv}, which sent {sent}"
                    ));
                }
            }
        }
    }
    check_group(w, &mut report)?;
    Ok(report)
}

/// Invariants 7–10 of a group scenario.
pub fn check_group(w: &World, report: &mut Report) -> Result<(), Violation> {
    let Some(g) = w.group else {
        return Ok(());
    };
    report.group_messages = w.group_sent.len();
    let users = w.scenario.devices.len();
    let mut keys = Vec::new();
    for u in 0..users {
        keys.push(
            w.user_key(u)
                .ok_or_else(|| Violation::Setup("user without device".into()))?,
        );
    }
    let mut pos_of: BTreeMap<MessageId, GroupPosition> = BTreeMap::new();
    for (i, n) in w.nodes.iter().enumerate() {
        let order = n.engine.group_order(&g);
        let unique: BTreeSet<&MessageId> = order.iter().collect();
        if unique.len() != order.len() {
            return Err(Violation::Invariant(format!(
                "device {i} orders a group message twice"
            )));
        }
        let history: BTreeSet<MessageId> = history_ids(&n.storage, &g)?.into_iter().collect();
        let mut prev: Option<GroupPosition> = None;
        for id in &order {
            if !history.contains(id) {
                return Err(Violation::Invariant(format!(
                    "device {i} orders group message {id} that is not in its history"
                )));
            }
            let p = n.engine.group_position(&g, id).ok_or_else(|| {
                Violation::Invariant(format!("device {i} has no position for {id}"))
            })?;
            match pos_of.get(id) {
                Some(q) if *q != p => {
                    return Err(Violation::Invariant(format!(
                        "group message {id} has position {p:?} on device {i}, {q:?} elsewhere"
                    )));
                }
                Some(_) => {}
                None => {
                    pos_of.insert(*id, p);
                }
            }
            if prev.is_some_and(|q| q >= p) {
                return Err(Violation::Invariant(format!(
                    "device {i}'s group order is not sorted"
                )));
            }
            prev = Some(p);
        }
        let c = n.engine.group_counters();
        report.group_held += c.held;
        report.group_refs_requested += c.refs_requested;
    }
    for m in &w.group_sent {
        let Some(px) = pos_of.get(&m.id) else {
            continue;
        };
        for y in &m.after {
            if pos_of.get(y).is_some_and(|py| py >= px) {
                return Err(Violation::Invariant(format!(
                    "group message {y} was displayed before {} was written, but is ordered after it",
                    m.id
                )));
            }
        }
    }
    for m in &w.group_sent {
        let sender_user = w.nodes[m.node].user;
        let sender_removed =
            w.removed_users.contains(&sender_user) || w.contested_users.contains(&sender_user);
        let author = keys[sender_user];
        let s = &w.nodes[m.node].storage;
        let state = s
            .get(&keys::history_state(&m.id))
            .map_err(|e| Violation::Engine(e.to_string()))?
            .and_then(|v| hush_client::storage::decode::<MessageState>(b"state", &v).ok());
        if !sender_removed
            && !matches!(
                state,
                Some(MessageState::Stored | MessageState::Delivered | MessageState::Read)
            )
        {
            return Err(Violation::Invariant(format!(
                "group message {} ended in state {state:?}",
                m.id
            )));
        }
        for (d, n) in w.nodes.iter().enumerate() {
            if d == m.node {
                continue;
            }
            let u = n.user;
            let member = m.members.contains(&keys[u]) || u == sender_user;
            let shows = n.engine.group_position(&g, &m.id).is_some();
            if !member && w.removed_users.contains(&u) && shows {
                return Err(Violation::Invariant(format!(
                    "device {d} of removed user {u} shows group message {} written after the removal",
                    m.id
                )));
            }
            let present = has(&n.storage, &keys::history_message(&g, &m.id))?
                || has(&n.storage, &keys::tombstone(&m.id))?
                || has(
                    &n.storage,
                    &[
                        b"s/recall/".as_slice(),
                        g.as_bytes(),
                        author.as_bytes(),
                        m.id.as_bytes(),
                    ]
                    .concat(),
                )?;
            if present {
                report.group_deliveries += 1;
            } else if member
                && !sender_removed
                && !w.removed_users.contains(&u)
                && !w.contested_users.contains(&u)
            {
                return Err(Violation::Invariant(format!(
                    "device {d} (user {u}) lacks group message {} from node {} ({:?})",
                    m.id,
                    m.node,
                    n.engine.group_counters()
                )));
            }
        }
    }
    Ok(())
}
