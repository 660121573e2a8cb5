//! Sessions against a hostile relay: a one-time prekey handed to two
//! initiators, and forged envelopes that try to make the receiver work.
//! Uses the in-memory relay and drivers of `tests.rs`.

use super::*;
use hush_crypto::RatchetHeader;

/// Bob's one-time prekey ids named by the `SessionInit`s the relay stored
/// for envelopes from `from` to `to`.
fn otk_ids_used(net: &Net, from: DeviceId, to: DeviceId) -> BTreeSet<Option<u32>> {
    net.relay
        .seen_bytes
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .filter(|e| e.header.sender_device == from && e.header.recipient_device == to)
        .filter_map(|e| e.header.session_init.map(|i| i.one_time_prekey_id))
        .collect()
}

/// The relay stores `envelopes` as if `from` had sent them and pushes them
/// to their recipients (a forger's send: no answer goes to `from`).
fn inject(net: &mut Net, from: DeviceId, envelopes: Vec<Envelope>) {
    let frame = ClientFrame {
        request_id: u32::MAX,
        request: Request::Send { envelopes },
    };
    for (to, f) in net.relay.handle(from, frame) {
        if !matches!(f, ServerFrame::Push { .. }) {
            continue;
        }
        if let Some(c) = net
            .clients
            .iter_mut()
            .find(|c| c.engine.device_id() == to && c.connected)
        {
            c.queue.push_back(f);
        }
    }
}

/// One-time prekeys of `d` the relay still holds (each prekey fetch takes one).
fn otks_left(net: &Net, d: DeviceId) -> usize {
    net.relay.otks.get(&d).map_or(0, Vec::len)
}

fn texts_from(net: &Net, i: usize, conv: ConversationId) -> Vec<String> {
    net.messages(i)
        .iter()
        .filter(|r| r.conversation == conv && !r.outgoing)
        .map(|r| r.text.clone())
        .collect()
}

#[test]
fn replayed_one_time_prekey_session_recovers_and_every_message_arrives_once_in_order() {
    let mut net = Net::new();
    let alice = net.create("alice");
    let carol = net.create("carol");
    let bob = net.create("bob");
    let conv_ab = net.befriend(alice, bob);
    let conv_cb = net.befriend(carol, bob);
    net.advance(2_000);
    let (ad, cd, bd) = (
        net.clients[alice].engine.device_id(),
        net.clients[carol].engine.device_id(),
        net.clients[bob].engine.device_id(),
    );
    // The relay keeps a copy of Bob's one-time prekeys and, after Alice
    // took one, puts it back so Carol's fetch returns the same one.
    let pool = net.relay.otks.get(&bd).cloned().unwrap();
    net.send(alice, conv_ab, "a1");
    net.advance(1_000);
    assert_eq!(texts_from(&net, bob, conv_ab), vec!["a1"]);
    net.relay.otks.insert(bd, pool);
    let carol_texts: Vec<String> = (1..=3).map(|i| format!("c{i}")).collect();
    for t in &carol_texts {
        net.send(carol, conv_cb, t);
    }
    net.advance(500);
    let a_otk = otk_ids_used(&net, ad, bd);
    let c_otk = otk_ids_used(&net, cd, bd);
    assert_eq!(a_otk.len(), 1);
    assert!(a_otk.iter().all(Option::is_some));
    assert_eq!(a_otk, c_otk, "the relay handed out one prekey twice");
    // Carol's first session cannot be answered; Bob starts a fresh one and
    // Carol re-sends everything on it.
    net.advance(30_000);
    assert_eq!(texts_from(&net, bob, conv_cb), carol_texts);
    // Both conversations keep working, both ways.
    net.send(carol, conv_cb, "c4");
    net.send(alice, conv_ab, "a2");
    net.send(bob, conv_cb, "b-to-carol");
    net.send(bob, conv_ab, "b-to-alice");
    net.advance(5_000);
    let mut all_c = carol_texts.clone();
    all_c.push("c4".into());
    assert_eq!(
        texts_from(&net, bob, conv_cb),
        all_c,
        "exactly once, in order"
    );
    assert_eq!(texts_from(&net, bob, conv_ab), vec!["a1", "a2"]);
    assert_eq!(texts_from(&net, carol, conv_cb), vec!["b-to-carol"]);
    assert_eq!(texts_from(&net, alice, conv_ab), vec!["b-to-alice"]);
    // Carol now sends on Bob's session; hers is gone.
    let slot = net.clients[carol].engine.sessions.get(&bd).unwrap();
    assert!(slot.entries.iter().all(|e| e.initiator == bd));
    assert_eq!(net.clients[carol].engine.counters().unrecoverable, 0);
}

#[test]
fn forged_unanswerable_session_inits_trigger_at_most_one_reset_per_interval() {
    let mut net = Net::new();
    let alice = net.create("alice");
    let bob = net.create("bob");
    let conv = net.befriend(alice, bob);
    net.advance(2_000);
    net.send(alice, conv, "hello");
    net.advance(2_000);
    assert_eq!(texts_from(&net, bob, conv), vec!["hello"]);
    let (ad, bd) = (
        net.clients[alice].engine.device_id(),
        net.clients[bob].engine.device_id(),
    );
    // Alice's stored envelope, re-sent by the relay many times with a
    // SessionInit naming a one-time prekey Bob does not have.
    let original = net
        .relay
        .seen_bytes
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .find(|e| e.header.sender_device == ad && e.header.recipient_device == bd)
        .unwrap();
    let otks_before = otks_left(&net, ad);
    let bob_to_alice = |net: &Net| {
        net.relay
            .seen_bytes
            .iter()
            .filter_map(|b| Envelope::from_bytes(b).ok())
            .filter(|e| e.header.sender_device == bd && e.header.recipient_device == ad)
            .count()
    };
    let sent_before = bob_to_alice(&net);
    let rejected_before = net.clients[bob].engine.counters().rejected;
    let mut forged = Vec::new();
    for n in 0..50u64 {
        let mut e = original.clone();
        let init = e.header.session_init.as_mut().unwrap();
        init.one_time_prekey_id = Some(0x7000_0000);
        init.ephemeral = [n as u8 + 1; 32];
        e.header.sender_seq = 1_000 + n;
        e.header.message_id = MessageId([n as u8; 16]);
        forged.push(e);
    }
    inject(&mut net, ad, forged);
    net.settle();
    net.advance(2_000);
    assert_eq!(
        net.clients[bob].engine.counters().rejected - rejected_before,
        50,
        "every forged envelope is rejected"
    );
    assert_eq!(
        otks_before - otks_left(&net, ad),
        1,
        "fifty forged envelopes start one session reset"
    );
    // One reset message (and at most a receipt for Alice's answer to it).
    let sent = bob_to_alice(&net) - sent_before;
    assert!(
        (1..=2).contains(&sent),
        "bob sent {sent} envelopes to alice"
    );
    // Alice ignores the reset (it names no session of hers) and the
    // conversation still works.
    net.send(alice, conv, "still here");
    net.send(bob, conv, "me too");
    net.advance(5_000);
    assert_eq!(texts_from(&net, bob, conv), vec!["hello", "still here"]);
    assert_eq!(texts_from(&net, alice, conv), vec!["me too"]);
    // Both seal on Bob's fresh session (Alice's answered one no longer
    // wins the tie-break against a session announced by a reset).
    let bob_fresh = sending_session(&net, bob, ad);
    assert!(bob_fresh.is_some());
    assert_eq!(sending_session(&net, alice, bd), bob_fresh);
}

/// `n` forged copies of `template` (a real envelope from its sender), each
/// with a fresh random ratchet key, the largest index a chain reaches, its
/// own message id and a sender seq far above anything real: what a hostile
/// relay can push to make the recipient work.
fn forged_new_keys(template: &Envelope, n: u64, tag: u8) -> Vec<Envelope> {
    let rh = RatchetHeader::from_bytes(&template.header.ratchet).unwrap();
    (0..n)
        .map(|k| {
            let mut e = template.clone();
            let mut f = rh;
            f.dh = [0; 32];
            f.dh[..8].copy_from_slice(&k.to_le_bytes());
            f.dh[8] = tag;
            f.dh[31] = 0x42;
            f.index = 99;
            f.previous_chain_len = 0;
            e.header.ratchet = f.to_bytes().to_vec();
            e.header.session_init = None;
            e.header.sender_seq = 1_000_000 + u64::from(tag) * 100_000 + k;
            let mut id = [tag; 16];
            id[..8].copy_from_slice(&k.to_le_bytes());
            e.header.message_id = MessageId(id);
            e
        })
        .collect()
}

/// The last envelope the relay stored from `from` to `to`.
fn last_envelope(net: &Net, from: DeviceId, to: DeviceId) -> Envelope {
    net.relay
        .seen_bytes
        .iter()
        .rev()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .find(|e| e.header.sender_device == from && e.header.recipient_device == to)
        .unwrap()
}

/// Pushes `envelopes` to their recipient in chunks (each chunk one `Send`).
fn flood(net: &mut Net, from: DeviceId, envelopes: Vec<Envelope>) {
    for chunk in envelopes.chunks(500) {
        inject(net, from, chunk.to_vec());
        net.settle();
    }
}

#[test]
fn ten_thousand_forged_new_keys_cost_at_most_the_budget_and_real_messages_arrive() {
    let mut net = Net::new();
    let alice = net.create("alice");
    let bob = net.create("bob");
    let conv = net.befriend(alice, bob);
    net.advance(2_000);
    net.send(alice, conv, "m1");
    net.advance(2_000);
    assert_eq!(texts_from(&net, bob, conv), vec!["m1"]);
    let (ad, bd) = (
        net.clients[alice].engine.device_id(),
        net.clients[bob].engine.device_id(),
    );
    let template = last_envelope(&net, ad, bd);
    let cfg = net.cfg.clone();
    let start = net.now;
    let tried_before = net.clients[bob].engine.open_budgets.expensive_failures;
    let c0 = net.clients[bob].engine.counters();
    // 10,000 forged envelopes in two waves, with real messages of Alice's
    // sent during the flood and after it.
    flood(&mut net, ad, forged_new_keys(&template, 5_000, 1));
    net.send(alice, conv, "during 1");
    flood(&mut net, ad, forged_new_keys(&template, 5_000, 2));
    net.send(alice, conv, "during 2");
    net.advance(1_000);
    net.send(alice, conv, "after");
    // Each turn of the conversation (Alice's reply to Bob's receipts comes
    // on a new ratchet key) is an expensive open: one that came while the
    // budget was spent was dropped unopened and is repaired once it refills.
    net.advance(10 * 60_000);
    let c1 = net.clients[bob].engine.counters();
    let tried = net.clients[bob].engine.open_budgets.expensive_failures - tried_before;
    let refills = (net.now - start) / cfg.open_budget_refill_ms;
    assert!(
        tried <= u64::from(cfg.open_budget) + refills,
        "{tried} expensive attempts for 10,000 forged envelopes"
    );
    assert_eq!(tried, u64::from(cfg.open_budget), "the budget is spent");
    // Every forgery is rejected: the tried ones failed, the rest were
    // dropped unopened, and so was every real envelope rejected here.
    let rejected = c1.rejected - c0.rejected;
    let skipped = c1.undecryptable_skipped - c0.undecryptable_skipped;
    assert!(rejected >= 10_000);
    assert_eq!(rejected - 10_000, skipped - (10_000 - tried));
    // The ongoing conversation is not blocked: in order, once.
    assert_eq!(
        texts_from(&net, bob, conv),
        vec!["m1", "during 1", "during 2", "after"]
    );
    assert_eq!(c1.unrecoverable, 0);
}

#[test]
fn a_real_message_dropped_by_a_spent_budget_arrives_later_by_gap_repair() {
    let mut net = Net::new();
    let alice = net.create("alice");
    let bob = net.create("bob");
    let conv = net.befriend(alice, bob);
    net.advance(2_000);
    net.send(alice, conv, "a1");
    net.advance(2_000);
    assert_eq!(texts_from(&net, bob, conv), vec!["a1"]);
    let (ad, bd) = (
        net.clients[alice].engine.device_id(),
        net.clients[bob].engine.device_id(),
    );
    let template = last_envelope(&net, ad, bd);
    // Bob answers: Alice's next envelopes carry a new ratchet key, which is
    // expensive for Bob to try. The relay floods Bob before they arrive.
    net.send(bob, conv, "b1");
    let c0 = net.clients[bob].engine.counters();
    flood(&mut net, ad, forged_new_keys(&template, 100, 3));
    assert_eq!(texts_from(&net, alice, conv), vec!["b1"]);
    net.send(alice, conv, "a2");
    net.advance(2_000);
    let c1 = net.clients[bob].engine.counters();
    assert_eq!(
        texts_from(&net, bob, conv),
        vec!["a1"],
        "a2 needs a root step and the budget is spent"
    );
    assert!(
        c1.undecryptable_skipped - c0.undecryptable_skipped > 100 - u64::from(net.cfg.open_budget),
        "a2 itself was dropped unopened"
    );
    // Time refills the budget; Alice's tail probe (or Bob's resend request)
    // brings a2 again and it opens: once, in order.
    net.advance(10 * 60_000);
    assert_eq!(texts_from(&net, bob, conv), vec!["a1", "a2"]);
    net.send(alice, conv, "a3");
    net.advance(2_000);
    assert_eq!(texts_from(&net, bob, conv), vec!["a1", "a2", "a3"]);
    assert_eq!(net.clients[bob].engine.counters().unrecoverable, 0);
}

#[test]
fn counters_written_before_the_skip_counter_still_load() {
    // The layout of `s/counters` before `undecryptable_skipped`: eleven u64.
    let old: [u64; 11] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    let bytes = crate::storage::encode(&old).unwrap();
    let c = Counters::decode(b"s/counters", &bytes).unwrap();
    assert_eq!((c.duplicates_dropped, c.next_local), (1, 11));
    assert_eq!((c.relay_claims_ignored, c.recalls_refused), (0, 0));
    assert_eq!(c.undecryptable_skipped, 0);
    let now = Counters {
        undecryptable_skipped: 300,
        ..c
    };
    let bytes = crate::storage::encode(&now).unwrap();
    assert_eq!(Counters::decode(b"s/counters", &bytes).unwrap(), now);
}

/// The session each side of a device pair seals on (its first entry), by
/// the ephemeral key of the X3DH that started it.
fn sending_session(net: &Net, i: usize, peer: DeviceId) -> Option<[u8; 32]> {
    net.clients[i]
        .engine
        .sessions
        .get(&peer)
        .and_then(|s| s.entries.first())
        .map(|e| e.ephemeral)
}

/// Both devices of a pair start a session at once, and the first envelope
/// of the higher device's session is delayed in the network (a send in
/// flight, or retried after a cut) until the lower device has already had
/// an answer on its own session. The lower device used to take that late
/// session as the one to send on, while the higher one had moved to the
/// lower's: each sealed on a session the other did not send on, and
/// everything the lower device sent from then on stayed undecryptable
/// (the race the simulator found between a device and the one it had just
/// linked). Both must converge on the lower device's session, with every
/// message arriving exactly once.
#[test]
fn a_late_session_init_from_the_higher_device_does_not_split_the_pair() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let (ad, bd) = (
        net.clients[a].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    let (lo, hi, lod, hid) = if ad < bd {
        (a, b, ad, bd)
    } else {
        (b, a, bd, ad)
    };
    assert!(sending_session(&net, lo, hid).is_none());
    assert!(sending_session(&net, hi, lod).is_none());

    // The higher device starts its session; its first envelope is held.
    net.clients[hi].hold_sends = 1;
    net.send(hi, conv, "hi-1");
    let hi_own = sending_session(&net, hi, lod).expect("hi started a session");
    assert_eq!(net.held.len(), 1, "hi's first envelope is in flight");
    // The lower device starts its own; the higher one answers it, switches
    // to it (lower id wins) and seals its next message there.
    net.send(lo, conv, "lo-1");
    let lo_own = sending_session(&net, lo, hid).expect("lo started a session");
    assert_ne!(lo_own, hi_own);
    assert_eq!(sending_session(&net, hi, lod), Some(lo_own));
    net.send(hi, conv, "hi-2");
    assert_eq!(
        texts_from(&net, lo, conv),
        Vec::<String>::new(),
        "hi-2 waits for hi-1"
    );
    // Only now does the higher device's first envelope, with its X3DH,
    // reach the relay and the lower device, which has had an answer on
    // its own session by then.
    net.release_held();
    assert_eq!(texts_from(&net, lo, conv), vec!["hi-1", "hi-2"]);
    assert_eq!(
        sending_session(&net, lo, hid),
        Some(lo_own),
        "lo keeps its own"
    );

    net.send(lo, conv, "lo-2");
    net.send(hi, conv, "hi-3");
    net.advance(30_000);
    assert_eq!(texts_from(&net, hi, conv), vec!["lo-1", "lo-2"]);
    assert_eq!(texts_from(&net, lo, conv), vec!["hi-1", "hi-2", "hi-3"]);
    assert_eq!(sending_session(&net, lo, hid), Some(lo_own));
    assert_eq!(sending_session(&net, hi, lod), Some(lo_own));
    for i in [lo, hi] {
        let c = net.clients[i].engine.counters();
        assert_eq!(c.rejected, 0, "client {i}: nothing undecryptable");
        assert_eq!(c.unrecoverable, 0);
    }
}

/// The lower device's session is established both ways when a forged init
/// (naming a one-time prekey the higher device lacks) makes the higher one
/// start a fresh session and announce it with a `SessionReset`. The lower
/// device keeps its own session first against late inits from the higher
/// one, so the reset itself must move it to the fresh session; else each
/// side would seal on a session the other does not send on.
#[test]
fn a_reset_from_the_higher_device_moves_the_lower_one_to_its_fresh_session() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let (ad, bd) = (
        net.clients[a].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    let (lo, hi, lod, hid) = if ad < bd {
        (a, b, ad, bd)
    } else {
        (b, a, bd, ad)
    };
    net.send(lo, conv, "lo-1");
    net.advance(2_000);
    net.send(hi, conv, "hi-1");
    net.advance(2_000);
    let lo_own = sending_session(&net, lo, hid);
    assert!(lo_own.is_some());
    assert_eq!(sending_session(&net, hi, lod), lo_own);
    let original = net
        .relay
        .seen_bytes
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .find(|e| e.header.sender_device == lod && e.header.recipient_device == hid)
        .unwrap();
    let mut e = original.clone();
    let init = e.header.session_init.as_mut().unwrap();
    init.one_time_prekey_id = Some(0x7000_0000);
    init.ephemeral = [9; 32];
    e.header.sender_seq = 1_000;
    e.header.message_id = MessageId([9; 16]);
    inject(&mut net, lod, vec![e]);
    net.settle();
    net.advance(2_000);
    let hi_fresh = sending_session(&net, hi, lod);
    assert!(hi_fresh.is_some());
    assert_ne!(hi_fresh, lo_own, "hi started a fresh session");
    assert_eq!(sending_session(&net, lo, hid), hi_fresh, "lo moved to it");
    for n in 2..=4 {
        net.send(lo, conv, &format!("lo-{n}"));
        net.send(hi, conv, &format!("hi-{n}"));
        net.advance(1_000);
    }
    net.advance(10_000);
    assert_eq!(
        texts_from(&net, hi, conv),
        vec!["lo-1", "lo-2", "lo-3", "lo-4"]
    );
    assert_eq!(
        texts_from(&net, lo, conv),
        vec!["hi-1", "hi-2", "hi-3", "hi-4"]
    );
    assert_eq!(
        sending_session(&net, lo, hid),
        sending_session(&net, hi, lod)
    );
}
