//! Groups on the shared engine test network: membership changes, multi-
//! device members, the causal order under reordering and loss, and the
//! attacks a hostile member or stranger can try.

use super::*;
use crate::engine::group::group_stream;
use crate::payload::{Body, GroupRef, Payload};

impl Net {
    fn create_group(&mut self, i: usize, name: &str, members: &[usize]) -> ConversationId {
        let members = members
            .iter()
            .map(|m| self.clients[*m].engine.user_key())
            .collect();
        let Some(Reply::Group(g)) = self.command(
            i,
            Command::CreateGroup {
                name: name.into(),
                members,
            },
        ) else {
            panic!("no group");
        };
        g
    }

    /// Make every pair of users contacts.
    fn befriend_all(&mut self, users: &[usize]) {
        for (n, a) in users.iter().enumerate() {
            for b in &users[n + 1..] {
                self.befriend(*a, *b);
            }
        }
    }

    fn user(&self, i: usize) -> UserKey {
        self.clients[i].engine.user_key()
    }
}

/// Texts of a group in the group order, as device `i` shows them.
/// alice, bob and carol, all contacts, settled.
fn alice_bob_carol() -> (Net, usize, usize, usize) {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let c = net.create("carol");
    net.befriend_all(&[a, b, c]);
    net.advance(2_000);
    (net, a, b, c)
}

/// alice, bob and carol, all contacts, in a group named `name` that
/// alice created, settled.
fn alice_bob_carol_in_a_group(name: &str) -> (Net, usize, usize, usize, ConversationId) {
    let (mut net, a, b, c) = alice_bob_carol();
    let g = net.create_group(a, name, &[b, c]);
    net.advance(2_000);
    (net, a, b, c, g)
}

fn group_texts(net: &Net, i: usize, g: &ConversationId) -> Vec<String> {
    let e = &net.clients[i].engine;
    let texts: BTreeMap<MessageId, String> = net.clients[i]
        .events
        .iter()
        .filter_map(|ev| match ev {
            Event::Message(r) if r.conversation == *g => Some((r.id, r.text.clone())),
            _ => None,
        })
        .collect();
    let sent: BTreeMap<MessageId, String> =
        storage::history(&net.clients[i].storage, g, None, 10_000)
            .unwrap()
            .into_iter()
            .map(|h| (h.record.id, h.record.text))
            .collect();
    e.group_order(g)
        .iter()
        .map(|id| {
            texts
                .get(id)
                .or_else(|| sent.get(id))
                .cloned()
                .unwrap_or_else(|| panic!("ordered message {id} not in history"))
        })
        .collect()
}

/// Every `Event::Message` of the group on device `i` (to count duplicates).
fn group_events(net: &Net, i: usize, g: &ConversationId) -> Vec<String> {
    net.clients[i]
        .events
        .iter()
        .filter_map(|ev| match ev {
            Event::Message(r) if r.conversation == *g => Some(r.text.clone()),
            _ => None,
        })
        .collect()
}

fn say(net: &mut Net, i: usize, g: ConversationId, text: &str) -> MessageId {
    net.send(i, g, text)
}

#[test]
fn group_create_send_receive_between_online_devices() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("trip");
    for i in [a, b, c] {
        let info = net.clients[i].engine.group(&g).expect("group known");
        assert_eq!(info.name, "trip");
        assert!(info.active);
        let mut want = vec![net.user(a), net.user(b), net.user(c)];
        want.sort();
        assert_eq!(info.members, want);
    }
    say(&mut net, a, g, "hi all");
    net.advance(2_000);
    say(&mut net, b, g, "hi alice");
    net.advance(2_000);
    say(&mut net, c, g, "hello");
    net.advance(2_000);
    for i in [a, b, c] {
        assert_eq!(
            group_texts(&net, i, &g),
            vec!["hi all", "hi alice", "hello"],
            "device {i}"
        );
        // Storage alone gives the same order.
        let stored: Vec<String> = super::group::group_history(&net.clients[i].storage, &g)
            .unwrap()
            .into_iter()
            .map(|h| h.record.text)
            .collect();
        assert_eq!(stored, vec!["hi all", "hi alice", "hello"], "device {i}");
    }
    assert_eq!(group_events(&net, b, &g), vec!["hi all", "hello"]);
    let from = net
        .messages(b)
        .into_iter()
        .find(|r| r.text == "hello")
        .unwrap()
        .from_user;
    assert_eq!(from, net.user(c));
}

fn info(net: &Net, i: usize, g: &ConversationId) -> super::group::GroupInfo {
    net.clients[i].engine.group(g).expect("group known")
}

/// Envelopes the relay stored for device `to` in group `g`'s streams (each
/// under the pseudonym of its device pair).
fn envelopes_to(net: &Net, to: DeviceId, g: &ConversationId) -> usize {
    net.relay
        .seen_bytes
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .filter(|e| {
            e.header.recipient_device == to
                && e.header.conversation_id
                    == group_stream(g, &e.header.sender_device, &to).unwrap()
        })
        .count()
}

#[test]
fn membership_changes_add_remove_leave_rename_reach_every_member() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let c = net.create("carol");
    let d = net.create("dave");
    net.befriend_all(&[a, b, c]);
    net.befriend(a, d);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b]);
    net.advance(2_000);
    say(&mut net, a, g, "before carol");
    net.advance(2_000);
    net.command(
        a,
        Command::AddMembers {
            group: g,
            members: vec![net.user(c), net.user(d)],
        },
    );
    net.advance(3_000);
    for i in [a, b, c, d] {
        assert_eq!(info(&net, i, &g).members.len(), 4, "device {i}");
    }
    // Dave is not Bob's or Carol's contact: he became one through the group.
    say(&mut net, d, g, "dave here");
    say(&mut net, b, g, "after carol");
    net.advance(5_000);
    assert_eq!(group_texts(&net, c, &g), vec!["dave here", "after carol"]);
    assert_eq!(
        group_texts(&net, b, &g),
        vec!["before carol", "dave here", "after carol"]
    );
    net.command(
        c,
        Command::RenameGroup {
            group: g,
            name: "renamed".into(),
        },
    );
    net.advance(2_000);
    for i in [a, b, c, d] {
        assert_eq!(info(&net, i, &g).name, "renamed");
    }
    net.command(
        b,
        Command::RemoveMembers {
            group: g,
            members: vec![net.user(d)],
        },
    );
    net.advance(2_000);
    assert!(!info(&net, d, &g).active, "dave learns he was removed");
    let now = net.now;
    assert!(
        net.clients[d]
            .engine
            .handle(now, Input::Command(Command::LeaveGroup { group: g }))
            .is_err()
    );
    net.command(c, Command::LeaveGroup { group: g });
    net.advance(2_000);
    assert!(!info(&net, c, &g).active);
    for i in [a, b] {
        let mut want = vec![net.user(a), net.user(b)];
        want.sort();
        assert_eq!(info(&net, i, &g).members, want, "device {i}");
    }
    say(&mut net, a, g, "just us");
    net.advance(2_000);
    assert_eq!(group_texts(&net, b, &g).last().unwrap(), "just us");
    for i in [c, d] {
        assert!(!group_texts(&net, i, &g).contains(&"just us".to_string()));
    }
    // A removed member cannot send any more.
    assert!(
        net.clients[d]
            .engine
            .handle(
                net.now,
                Input::Command(Command::SendText {
                    conversation: g,
                    text: "x".into()
                })
            )
            .is_err()
    );
}

#[test]
fn group_commands_check_their_limits() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let s = net.create("stranger");
    net.befriend(a, b);
    net.advance(2_000);
    let e = &mut net.clients[a].engine;
    let now = net.now;
    let r = e.handle(
        now,
        Input::Command(Command::CreateGroup {
            name: "x".repeat(crate::payload::MAX_GROUP_NAME_BYTES + 1),
            members: vec![],
        }),
    );
    assert!(matches!(r, Err(ClientError::TooLarge { .. })));
    let stranger = net.clients[s].engine.user_key();
    let e = &mut net.clients[a].engine;
    let r = e.handle(
        now,
        Input::Command(Command::CreateGroup {
            name: "g".into(),
            members: vec![stranger],
        }),
    );
    assert!(matches!(r, Err(ClientError::Unknown("contact"))));
    let g = net.create_group(a, "g", &[b]);
    let too_many: Vec<UserKey> = (0..100u8).map(|i| UserKey([i; 32])).collect();
    let e = &mut net.clients[a].engine;
    for i in 0..100u8 {
        e.contacts.insert(
            UserKey([i; 32]),
            crate::state::Contact {
                user: UserKey([i; 32]),
                relay: "relay".into(),
                name: String::new(),
                conversation: conversation_between(&e.user_key(), &UserKey([i; 32])),
                known: Default::default(),
            },
        );
    }
    let r = e.handle(
        now,
        Input::Command(Command::AddMembers {
            group: g,
            members: too_many,
        }),
    );
    assert!(matches!(r, Err(ClientError::NotAllowed(_))));
    assert_eq!(e.group(&g).unwrap().members.len(), 2);
}

#[test]
fn multi_device_members_get_every_message_once_in_the_same_order() {
    let mut net = Net::new();
    let a = net.create("alice");
    let a2 = net.join(a);
    let b = net.create("bob");
    let b2 = net.join(b);
    let c = net.create("carol");
    net.advance(2_000);
    net.befriend_all(&[a, b, c]);
    net.advance(2_000);
    let g = net.create_group(a2, "g", &[b, c]);
    net.advance(3_000);
    for i in [a, a2, b, b2, c] {
        assert!(info(&net, i, &g).active, "device {i}");
    }
    // Senders on different devices, with sends that cross in flight.
    say(&mut net, a, g, "a1");
    say(&mut net, b2, g, "b1");
    say(&mut net, c, g, "c1");
    net.advance(1_000);
    say(&mut net, a2, g, "a2");
    say(&mut net, b, g, "b2");
    net.advance(3_000);
    let want = group_texts(&net, a, &g);
    assert_eq!(want.len(), 5);
    for i in [a2, b, b2, c] {
        assert_eq!(group_texts(&net, i, &g), want, "device {i}");
    }
    // Exactly once: each device got each message not its own once.
    // (each device wrote one of the five).
    for i in [a, a2, b, b2, c] {
        let ev = group_events(&net, i, &g);
        let set: BTreeSet<&String> = ev.iter().collect();
        assert_eq!(set.len(), ev.len(), "duplicate on {i}");
        assert_eq!(ev.len(), 4, "device {i}");
    }
    // a1 and a2 were written by Alice's two devices in that order; each
    // device shows them in that order.
    for i in [a, a2, b, b2, c] {
        let t = group_texts(&net, i, &g);
        let p1 = t.iter().position(|x| x == "a1").unwrap();
        let p2 = t.iter().position(|x| x == "a2").unwrap();
        assert!(p1 < p2);
    }
}

#[test]
fn held_message_is_released_when_its_predecessor_arrives_after_a_resend() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    let cd = net.clients[c].engine.device_id();
    // The relay loses Alice's question to Carol; Bob answers it.
    net.relay.lose_next.insert(cd, 1);
    say(&mut net, a, g, "question?");
    net.advance(500);
    say(&mut net, b, g, "answer");
    net.advance(500);
    assert!(group_texts(&net, c, &g).is_empty(), "the answer is held");
    assert_eq!(net.clients[c].engine.group_counters().held, 1);
    // Carol asks Alice by id after the grace period, long before Alice's
    // tail probe would re-send it.
    net.advance(6_000);
    assert_eq!(group_texts(&net, c, &g), vec!["question?", "answer"]);
    assert!(net.clients[c].engine.group_counters().refs_requested >= 1);
    assert_eq!(net.clients[a].engine.counters().probes, 0);
    for i in [a, b] {
        assert_eq!(group_texts(&net, i, &g), vec!["question?", "answer"]);
    }
    // The answer was not shown before the question it follows.
    assert_eq!(group_events(&net, c, &g), vec!["question?", "answer"]);
}

#[test]
fn a_held_group_message_asks_for_its_predecessor_when_its_timer_wakes_the_engine() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    let cd = net.clients[c].engine.device_id();
    net.relay.lose_next.insert(cd, 1);
    say(&mut net, a, g, "question?");
    say(&mut net, b, g, "answer");
    let due = net.clients[c]
        .engine
        .groups
        .held
        .values()
        .map(|h| h.request_at)
        .min()
        .expect("the answer is held");
    // Driven by her own wake-ups alone, Carol asks for the question when
    // the held answer's timer is due, and shows both then.
    let shown = run_on_wakeups(&mut net, c, due + 60_000, |n| {
        group_texts(n, c, &g).len() == 2
    });
    assert_eq!(shown, Some(due));
    assert_eq!(group_texts(&net, c, &g), vec!["question?", "answer"]);
}

#[test]
fn a_held_predecessor_is_waited_for_not_asked_for_again() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    let cd = net.clients[c].engine.device_id();
    // Carol loses Alice's first message, and Alice goes offline before
    // anyone asks her for it.
    net.relay.lose_next.insert(cd, 1);
    say(&mut net, a, g, "x");
    net.advance(500);
    net.switch_off(a);
    // Bob's two replies reach Carol: "y" waits for "x", "z" for "y". Her
    // receipt covers both on Bob's stream, so Bob no longer keeps them
    // for re-sending to her.
    say(&mut net, b, g, "y");
    net.advance(500);
    say(&mut net, b, g, "z");
    net.advance(30_000);
    assert!(group_texts(&net, c, &g).is_empty(), "both wait for x");
    assert_eq!(net.clients[c].engine.group_counters().held, 2);
    // Asking Bob for "y", which Carol holds, would bring "unavailable"
    // and drop it; she asks only Alice, for "x".
    assert_eq!(net.clients[c].engine.group_counters().refs_unavailable, 0);
    net.connect(a);
    net.advance(120_000);
    for i in [a, b, c] {
        assert_eq!(group_texts(&net, i, &g), vec!["x", "y", "z"], "device {i}");
    }
    assert_eq!(group_events(&net, c, &g), vec!["x", "y", "z"]);
    assert_eq!(net.clients[c].engine.group_counters().refs_unavailable, 0);
}

/// A held message whose give-up comes while its predecessor is still held
/// here (that one arrived later and waits for its own predecessor) keeps
/// waiting, with its timer set ahead: it is not looked at again on every
/// step, and all are shown in order in the end.
#[test]
fn a_message_past_its_give_up_waits_for_a_held_predecessor_on_a_timer() {
    let mut net = Net::new();
    let [a, b, c, d] = ["alice", "bob", "carol", "dave"].map(|n| net.create(n));
    net.befriend_all(&[a, b, c, d]);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b, c, d]);
    net.advance(2_000);
    let cd = net.clients[c].engine.device_id();
    // Carol loses Alice's "x"; Alice goes offline. Carol loses Bob's "y"
    // too, and Bob goes offline. Dave's "z" names "y".
    net.relay.lose_next.insert(cd, 1);
    say(&mut net, a, g, "x");
    net.advance(500);
    net.switch_off(a);
    net.relay.lose_next.insert(cd, 1);
    say(&mut net, b, g, "y");
    net.advance(500);
    net.switch_off(b);
    say(&mut net, d, g, "z");
    net.advance(300_000);
    assert_eq!(net.clients[c].engine.groups.held.len(), 1, "z waits for y");
    // Bob comes back and re-sends "y", which waits for "x": "z"'s give-up
    // comes about five minutes before "y"'s.
    net.connect(b);
    let give_up = 10 * Net::cfg().resend_retry_ms;
    let mut z_expired_while_y_held = false;
    for _ in 0..(3_600_000 / 250) {
        net.advance(250);
        let now = net.now;
        let e = &net.clients[c].engine;
        // After every step no held message's timer is behind the clock.
        assert!(
            e.groups.held.values().all(|h| h.request_at > now),
            "a held message left due at {now}"
        );
        let expired = e
            .groups
            .held
            .values()
            .filter(|h| h.since_ms.saturating_add(give_up) <= now)
            .count();
        if e.groups.held.len() == 2 && expired == 1 {
            z_expired_while_y_held = true;
        }
        if e.groups.held.is_empty() {
            break;
        }
    }
    assert!(z_expired_while_y_held, "z's give-up came while y was held");
    assert_eq!(group_texts(&net, c, &g), vec!["y", "z"]);
    net.connect(a);
    net.advance(600_000);
    for i in [a, b, c, d] {
        assert_eq!(group_texts(&net, i, &g), vec!["x", "y", "z"], "device {i}");
    }
}

/// A hostile member writes two messages that each name the other as a
/// predecessor at the same depth. Neither waits for the other as a held
/// predecessor (only a lower depth can be one), so the cycle cannot hold
/// them for good: after the give-up time neither is held any more.
#[test]
fn held_messages_naming_each_other_cannot_wait_forever() {
    let (mut net, _a, b, c, g) = alice_bob_carol_in_a_group("g");
    say(&mut net, b, g, "hello");
    net.advance(2_000);
    let bd = net.clients[b].engine.device_id();
    let cd = net.clients[c].engine.device_id();
    let bob = net.user(b);
    let wire = group_stream(&g, &bd, &cd).unwrap();
    let (one, two) = (MessageId([0x11; 16]), MessageId([0x22; 16]));
    let item = |id: MessageId, other: MessageId| Payload {
        id,
        body: Body::GroupText {
            text: format!("{}", id.0[0]),
            sent_at_ms: 0,
            depth: 7,
            refs: vec![GroupRef {
                id: other,
                device: bd,
            }],
        },
    };
    let now = net.now;
    let e = &mut net.clients[c].engine;
    e.group_deliver(now, bd, bob, wire, 100, item(one, two))
        .unwrap();
    e.group_deliver(now, bd, bob, wire, 101, item(two, one))
        .unwrap();
    assert_eq!(e.groups.held.len(), 2);
    // The give-up is checked when a held message's request timer fires,
    // whose backoff has reached 8 minutes by then.
    net.advance(20 * Net::cfg().resend_retry_ms);
    let e = &net.clients[c].engine;
    assert!(e.groups.held.is_empty(), "the cycle was broken");
    // The lower position is released first, once its partner is given up
    // on; the other then names a shown message at its own depth, which no
    // honest writer does, and is dropped as invalid.
    assert_eq!(group_texts(&net, c, &g), vec!["hello", "17"]);
    assert_eq!(e.group_counters().invalid_dropped, 1);
}

#[test]
fn held_messages_survive_a_restart() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    let cd = net.clients[c].engine.device_id();
    net.relay.lose_next.insert(cd, 1);
    say(&mut net, a, g, "first");
    net.advance(500);
    say(&mut net, b, g, "second");
    net.advance(500);
    assert!(group_texts(&net, c, &g).is_empty());
    // Carol's process dies and restarts from storage.
    let records = net.clients[c].storage.load_state().unwrap();
    net.clients[c].engine = Engine::load(records, [77; 32], Net::cfg()).unwrap();
    net.clients[c].connected = false;
    net.advance(8_000);
    assert_eq!(group_texts(&net, c, &g), vec!["first", "second"]);
    assert!(info(&net, c, &g).active);
}

#[test]
fn a_mention_and_the_senders_next_message_never_swap() {
    let mut net = Net::new();
    let a = net.create("alice");
    let a2 = net.join(a);
    let b = net.create("bob");
    net.advance(2_000);
    net.befriend(a, b);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b]);
    net.advance(2_000);
    let bd = net.clients[b].engine.device_id();
    // The mention from Alice's phone is delayed; her laptop, which showed
    // it, sends the next message, which reaches Bob first.
    net.relay.lose_next.insert(bd, 1);
    say(&mut net, a, g, "@bob look");
    net.advance(500);
    say(&mut net, a2, g, "(the photo)");
    net.advance(500);
    assert!(group_texts(&net, b, &g).is_empty());
    net.advance(8_000);
    for i in [a, a2, b] {
        assert_eq!(
            group_texts(&net, i, &g),
            vec!["@bob look", "(the photo)"],
            "device {i}"
        );
    }
}

#[test]
fn two_senders_interleaving_with_losses_give_one_order_everywhere() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let c = net.create("carol");
    let d = net.create("dave");
    net.befriend_all(&[a, b, c, d]);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b, c, d]);
    net.advance(2_000);
    let devs: Vec<DeviceId> = [c, d]
        .iter()
        .map(|i| net.clients[*i].engine.device_id())
        .collect();
    for round in 0..6 {
        // Each round loses something on its way to Carol or Dave.
        net.relay.lose_next.insert(devs[round % 2], 1);
        say(&mut net, a, g, &format!("a{round}"));
        say(&mut net, b, g, &format!("b{round}"));
        net.advance(if round % 3 == 0 { 250 } else { 1_000 });
    }
    net.advance(70_000);
    let want = group_texts(&net, a, &g);
    assert_eq!(want.len(), 12);
    for i in [b, c, d] {
        assert_eq!(group_texts(&net, i, &g), want, "device {i}");
        let ev = group_events(&net, i, &g);
        assert_eq!(ev.iter().collect::<BTreeSet<_>>().len(), ev.len());
    }
}

#[test]
fn removed_member_gets_nothing_sent_after_the_removal() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    say(&mut net, b, g, "hello");
    net.advance(2_000);
    net.command(
        a,
        Command::RemoveMembers {
            group: g,
            members: vec![net.user(c)],
        },
    );
    net.advance(2_000);
    let cd = net.clients[c].engine.device_id();
    let before = envelopes_to(&net, cd, &g);
    assert!(before > 0, "carol got the group before her removal");
    say(&mut net, a, g, "secret from a");
    say(&mut net, b, g, "secret from b");
    net.advance(5_000);
    // Not even ciphertext: nothing is encrypted to Carol's device.
    assert_eq!(envelopes_to(&net, cd, &g), before);
    assert_eq!(group_texts(&net, c, &g), vec!["hello"]);
    assert!(!info(&net, c, &g).active);
    assert_eq!(
        group_texts(&net, b, &g),
        vec!["hello", "secret from a", "secret from b"]
    );
}

/// Give `i`'s engine a group record naming `members`, as a hostile client
/// that was never (or no longer) in the group would.
fn fake_membership(net: &mut Net, i: usize, g: ConversationId, members: &[usize]) {
    let set: BTreeSet<UserKey> = members.iter().map(|m| net.user(*m)).collect();
    let rec = super::group::GroupRecord {
        name: "fake".into(),
        members: set.clone(),
        active: true,
        base_name: "fake".into(),
        base_members: set,
        base_pos: super::group::GroupPosition {
            depth: 0,
            id: MessageId([0; 16]),
        },
        ops: Vec::new(),
        heads: BTreeSet::new(),
    };
    net.clients[i].engine.groups.records.insert(g, rec);
}

#[test]
fn a_non_members_group_message_is_ignored() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let m = net.create("mallory");
    net.befriend(a, b);
    net.befriend(m, b);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b]);
    net.advance(2_000);
    say(&mut net, a, g, "members only");
    net.advance(2_000);
    // Mallory, Bob's contact but not a member, writes into the group.
    fake_membership(&mut net, m, g, &[m, b, a]);
    say(&mut net, m, g, "let me in");
    net.advance(5_000);
    assert_eq!(group_texts(&net, b, &g), vec!["members only"]);
    assert!(!group_events(&net, b, &g).contains(&"let me in".to_string()));
    assert_eq!(net.clients[b].engine.group_counters().non_member_dropped, 1);
    assert_eq!(info(&net, b, &g).members.len(), 2);
    // Nor can she change the group.
    net.command(
        m,
        Command::RenameGroup {
            group: g,
            name: "owned".into(),
        },
    );
    net.command(
        m,
        Command::RemoveMembers {
            group: g,
            members: vec![net.user(a)],
        },
    );
    net.advance(5_000);
    assert_eq!(info(&net, b, &g).name, "g");
    assert_eq!(info(&net, b, &g).members.len(), 2);
}

#[test]
fn a_member_cannot_impersonate_another_member() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    say(&mut net, c, g, "carol speaking");
    net.advance(2_000);
    let (ad, bd, cd) = (
        net.clients[a].engine.device_id(),
        net.clients[b].engine.device_id(),
        net.clients[c].engine.device_id(),
    );
    // Carol takes an envelope she sealed to Bob and claims Alice sent it
    // (a new transport id, so the relay stores it).
    let mut forged: Vec<Envelope> = net
        .relay
        .seen_bytes
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .filter(|e| {
            e.header.sender_device == cd
                && e.header.recipient_device == bd
                && e.header.conversation_id == group_stream(&g, &cd, &bd).unwrap()
        })
        .collect();
    assert!(!forged.is_empty());
    for (n, e) in forged.iter_mut().enumerate() {
        // Carol knows the group id: she puts Alice's stream to Bob in too.
        e.header.conversation_id = group_stream(&g, &ad, &bd).unwrap();
        e.header.sender_device = ad;
        e.header.sender_seq = 50 + n as u64;
        e.header.message_id = MessageId([0x42 + n as u8; 16]);
    }
    let rejected = net.clients[b].engine.counters().rejected;
    net.inject(cd, forged.clone());
    net.advance(2_000);
    assert!(net.clients[b].engine.counters().rejected > rejected);
    let from_alice: Vec<String> = net
        .messages(b)
        .into_iter()
        .filter(|r| r.conversation == g && r.from_user == net.user(a))
        .map(|r| r.text)
        .collect();
    assert!(from_alice.is_empty(), "{from_alice:?}");
    assert_eq!(group_texts(&net, b, &g), vec!["carol speaking"]);
}

#[test]
fn only_the_author_can_recall_a_group_message() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    let m1 = say(&mut net, a, g, "mine");
    let m2 = say(&mut net, b, g, "bob's");
    net.advance(2_000);
    // Carol tries to recall Alice's message; Bob recalls his own.
    net.command(
        c,
        Command::Recall {
            conversation: g,
            id: m1,
        },
    );
    net.command(
        b,
        Command::Recall {
            conversation: g,
            id: m2,
        },
    );
    net.advance(3_000);
    for i in [a, b] {
        assert_eq!(group_texts(&net, i, &g), vec!["mine"], "device {i}");
    }
    assert_eq!(net.clients[a].engine.group_counters().recalls_refused, 1);
}

#[test]
fn per_member_receipts_and_read_sync() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let b2 = net.join(b);
    let c = net.create("carol");
    net.advance(2_000);
    net.befriend_all(&[a, b, c]);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b, c]);
    net.advance(2_000);
    let ad = net.clients[a].engine.device_id();
    let m = say(&mut net, a, g, "read me");
    net.advance(3_000);
    let states: BTreeMap<UserKey, MessageState> = net.clients[a]
        .engine
        .member_states(&m)
        .into_iter()
        .collect();
    assert_eq!(states.get(&net.user(b)), Some(&MessageState::Delivered));
    assert_eq!(states.get(&net.user(c)), Some(&MessageState::Delivered));
    net.command(
        b2,
        Command::MarkRead {
            conversation: g,
            messages: vec![(m, ad)],
        },
    );
    net.advance(3_000);
    let states: BTreeMap<UserKey, MessageState> = net.clients[a]
        .engine
        .member_states(&m)
        .into_iter()
        .collect();
    assert_eq!(states.get(&net.user(b)), Some(&MessageState::Read));
    assert_eq!(states.get(&net.user(c)), Some(&MessageState::Delivered));
    assert!(net.clients[b].events.iter().any(
        |e| matches!(e, Event::ReadSynced { conversation, ids } if *conversation == g && ids == &vec![m])
    ));
}

#[test]
fn a_hostile_member_cannot_grow_held_messages_without_bound() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    net.befriend(a, b);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b]);
    net.advance(2_000);
    // Bob names a predecessor that does not exist, in every message.
    let bd = net.clients[b].engine.device_id();
    let n = super::group::MAX_HELD_PER_DEVICE + 20;
    for k in 0..n {
        if let Some(r) = net.clients[b].engine.groups.records.get_mut(&g) {
            r.heads.insert((5, MessageId([0xee; 16]), bd));
        }
        say(&mut net, b, g, &format!("h{k}"));
    }
    net.advance(1_000);
    let e = &net.clients[a].engine;
    assert_eq!(e.groups.held.len(), super::group::MAX_HELD_PER_DEVICE);
    assert_eq!(e.group_counters().held_dropped, 20);
    // Bob answers that he never wrote it; after the give-up time what is
    // held is released in the group order, and nothing more is held.
    net.advance(11 * Net::cfg().resend_retry_ms);
    let e = &net.clients[a].engine;
    assert!(e.groups.held.is_empty());
    assert_eq!(
        group_texts(&net, a, &g).len(),
        super::group::MAX_HELD_PER_DEVICE
    );
}

/// A hostile relay hands a removed member copies of what the group wrote
/// after the removal, re-addressed to the removed member's device: they
/// were sealed in other members' pairwise sessions, so they do not open,
/// and nothing of them is shown or stored.
#[test]
fn a_removed_member_cannot_open_copies_the_relay_redirects_to_it() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    say(&mut net, a, g, "before");
    net.advance(2_000);
    net.command(
        a,
        Command::RemoveMembers {
            group: g,
            members: vec![net.user(c)],
        },
    );
    net.advance(2_000);
    assert!(!info(&net, c, &g).active);
    let (ad, bd, cd) = (
        net.clients[a].engine.device_id(),
        net.clients[b].engine.device_id(),
        net.clients[c].engine.device_id(),
    );
    let seen = net.relay.seen_bytes.len();
    say(&mut net, a, g, "secret after the removal");
    net.advance(2_000);
    assert_eq!(
        group_texts(&net, b, &g).last().map(String::as_str),
        Some("secret after the removal")
    );
    // Alice's envelopes of the group to Bob since the removal, re-addressed
    // to Carol's device (as Alice's, from Alice's device: Carol does have a
    // pairwise session with Alice).
    let redirected: Vec<Envelope> = net.relay.seen_bytes[seen..]
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .filter(|e| {
            e.header.sender_device == ad
                && e.header.recipient_device == bd
                && e.header.conversation_id == group_stream(&g, &ad, &bd).unwrap()
        })
        .map(|mut e| {
            e.header.recipient_device = cd;
            e.header.conversation_id = group_stream(&g, &ad, &cd).unwrap();
            e
        })
        .collect();
    assert!(
        !redirected.is_empty(),
        "alice wrote to bob after the removal"
    );
    let texts_before = group_texts(&net, c, &g);
    let rejected = net.clients[c].engine.counters().rejected;
    net.inject(ad, redirected);
    net.advance(5_000);
    assert!(
        net.clients[c].engine.counters().rejected > rejected,
        "the copies did not open"
    );
    assert_eq!(group_texts(&net, c, &g), texts_before);
    assert_eq!(texts_before, vec!["before"]);
    assert!(
        !net.messages(c).iter().any(|r| r.text.contains("secret")),
        "nothing of it reached carol"
    );
    assert!(
        storage::history(&net.clients[c].storage, &g, None, 100)
            .unwrap()
            .iter()
            .all(|h| h.record.text == "before")
    );
}

/// Deleting a group message on one device deletes it on the user's other
/// devices (and only there): as in one-to-one conversations.
#[test]
fn deleting_a_group_message_syncs_to_the_users_other_devices_only() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let b2 = net.join(b);
    let c = net.create("carol");
    net.advance(2_000);
    net.befriend_all(&[a, b, c]);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b, c]);
    net.advance(2_000);
    let m = say(&mut net, a, g, "delete me");
    net.advance(2_000);
    say(&mut net, c, g, "keep me");
    net.advance(3_000);
    for i in [b, b2] {
        assert_eq!(
            group_texts(&net, i, &g),
            vec!["delete me", "keep me"],
            "device {i}"
        );
    }
    net.command(
        b2,
        Command::Delete {
            conversation: g,
            ids: vec![m],
        },
    );
    net.advance(3_000);
    for i in [b, b2] {
        assert_eq!(group_texts(&net, i, &g), vec!["keep me"], "device {i}");
        assert!(
            storage::tombstone(&net.clients[i].storage, &m)
                .unwrap()
                .is_some()
        );
        let stored: Vec<String> = super::group::group_history(&net.clients[i].storage, &g)
            .unwrap()
            .into_iter()
            .map(|h| h.record.text)
            .collect();
        assert_eq!(stored, vec!["keep me"], "device {i}");
    }
    // The other members keep it.
    for i in [a, c] {
        assert_eq!(
            group_texts(&net, i, &g),
            vec!["delete me", "keep me"],
            "device {i}"
        );
    }
}

/// The overall state of a group message moves with its first member; a
/// later member's receipt still reaches the app as a `MessageState` event
/// (of the unchanged state), so a page showing per-member states re-reads
/// them instead of showing the second member as unread for ever.
#[test]
fn a_later_members_receipt_is_announced_though_the_overall_state_stays() {
    let (mut net, a, b, c, g) = alice_bob_carol_in_a_group("g");
    let ad = net.clients[a].engine.device_id();
    let m = say(&mut net, a, g, "read me");
    net.advance(3_000);
    let read_events = |net: &Net| {
        net.clients[a]
            .events
            .iter()
            .filter(|e| {
                matches!(e, Event::MessageState { id, state: MessageState::Read, .. } if *id == m)
            })
            .count()
    };
    let states = |net: &Net| -> BTreeMap<UserKey, MessageState> {
        net.clients[a]
            .engine
            .member_states(&m)
            .into_iter()
            .collect()
    };
    for i in [b, c] {
        assert_eq!(
            states(&net).get(&net.user(i)),
            Some(&MessageState::Delivered)
        );
    }
    assert_eq!(read_events(&net), 0);
    net.command(
        b,
        Command::MarkRead {
            conversation: g,
            messages: vec![(m, ad)],
        },
    );
    net.advance(3_000);
    assert_eq!(read_events(&net), 1, "bob's read moves the state");
    assert_eq!(
        states(&net).get(&net.user(c)),
        Some(&MessageState::Delivered)
    );
    net.command(
        c,
        Command::MarkRead {
            conversation: g,
            messages: vec![(m, ad)],
        },
    );
    net.advance(3_000);
    assert_eq!(states(&net).get(&net.user(c)), Some(&MessageState::Read));
    assert_eq!(read_events(&net), 2, "carol's read is announced too");
    // A repeated receipt changes nothing and announces nothing.
    net.command(
        c,
        Command::MarkRead {
            conversation: g,
            messages: vec![(m, ad)],
        },
    );
    net.advance(3_000);
    assert_eq!(read_events(&net), 2);
}

/// What the relay sees of a group: it stores every envelope (the test's
/// relay records them all). No clear header carries the group id (nor does
/// any envelope byte string), and the copies of one group message to
/// different devices carry different conversation ids, each used by one
/// (sender device, recipient device) pair only and unlike every one-to-one
/// or control conversation id, so the relay cannot tell which envelopes
/// belong to one group, nor that two pairs share a group.
#[test]
fn the_relay_cannot_link_group_envelopes_to_the_group_or_to_each_other() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let b2 = net.join(b);
    let c = net.create("carol");
    let d = net.create("dave");
    net.advance(2_000);
    net.befriend_all(&[a, b, c, d]);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b, c]);
    net.advance(2_000);
    let m = say(&mut net, a, g, "one message, many copies");
    say(&mut net, b, g, "from bob");
    net.advance(2_000);
    net.command(
        c,
        Command::AddMembers {
            group: g,
            members: vec![net.user(d)],
        },
    );
    net.advance(3_000);
    assert!(
        info(&net, d, &g).active,
        "{:?}",
        net.clients[d].engine.group_counters()
    );
    say(&mut net, d, g, "dave joined");
    let oops = say(&mut net, b, g, "oops");
    net.command(
        b,
        Command::Recall {
            conversation: g,
            id: oops,
        },
    );
    net.advance(3_000);
    for i in [a, b, b2, c, d] {
        assert!(
            group_texts(&net, i, &g).contains(&"dave joined".to_string()),
            "device {i}: {:?}",
            group_texts(&net, i, &g)
        );
    }
    assert!(
        !group_texts(&net, a, &g).contains(&"oops".to_string()),
        "the recall came through"
    );

    let envs: Vec<(Envelope, &Vec<u8>)> = net
        .relay
        .seen_bytes
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok().map(|e| (e, b)))
        .collect();
    // Not in any header, and not anywhere in what the relay stores.
    for (e, bytes) in &envs {
        assert_ne!(e.header.conversation_id, g, "a clear group id");
        assert!(
            !bytes.windows(16).any(|w| w == g.as_bytes()),
            "the group id in an envelope's bytes"
        );
    }
    // Every group envelope is under its pair's pseudonym; each pseudonym
    // belongs to one device pair.
    let mut pairs: BTreeMap<ConversationId, BTreeSet<(DeviceId, DeviceId)>> = BTreeMap::new();
    let mut group_envelopes = 0;
    for (e, _) in &envs {
        let h = &e.header;
        pairs
            .entry(h.conversation_id)
            .or_default()
            .insert((h.sender_device, h.recipient_device));
        if h.conversation_id == group_stream(&g, &h.sender_device, &h.recipient_device).unwrap() {
            group_envelopes += 1;
        }
    }
    assert!(group_envelopes >= 20, "{group_envelopes} group envelopes");
    let devices: Vec<DeviceId> = [a, b, b2, c, d]
        .iter()
        .map(|i| net.clients[*i].engine.device_id())
        .collect();
    let mut streams = BTreeSet::new();
    for s in &devices {
        for r in devices.iter().filter(|r| *r != s) {
            let id = group_stream(&g, s, r).unwrap();
            assert!(streams.insert(id), "two pairs share a group stream id");
            if let Some(p) = pairs.get(&id) {
                assert_eq!(p.len(), 1, "a group stream id used by several pairs");
            }
            assert_ne!(id, crate::codes::control_conversation(s, r));
        }
    }
    for i in [a, b, c, d] {
        for j in [a, b, c, d].into_iter().filter(|j| *j != i) {
            let one_to_one = crate::codes::conversation_between(&net.user(i), &net.user(j));
            assert!(!streams.contains(&one_to_one));
        }
    }
    // The copies of Alice's one message: one per device, all different.
    let copies: BTreeSet<ConversationId> = envs
        .iter()
        .filter(|(e, _)| e.header.message_id == m)
        .map(|(e, _)| e.header.conversation_id)
        .collect();
    let copy_count = envs
        .iter()
        .filter(|(e, _)| e.header.message_id == m)
        .count();
    assert!(copies.len() >= 3, "{copies:?}");
    assert_eq!(
        copies.len(),
        copy_count,
        "two copies share a conversation id"
    );
}

/// A member cannot slip a message of one group into another group's
/// stream: the group named inside must be the one the stream's pseudonym
/// is derived from.
#[test]
fn a_group_stream_cannot_carry_another_groups_message() {
    let (mut net, a, b, c) = alice_bob_carol();
    let g1 = net.create_group(a, "one", &[b, c]);
    let g2 = net.create_group(c, "two", &[b]);
    net.advance(2_000);
    say(&mut net, c, g1, "in one");
    say(&mut net, c, g2, "in two");
    net.advance(2_000);
    let invalid = net.clients[b].engine.group_counters().invalid_dropped;
    // Carol's modified client queues a message naming group two into
    // group one's streams.
    let now = net.now;
    let e = &mut net.clients[c].engine;
    let (depth, refs) = e.next_position(&g2);
    let id = e.mint_id(now);
    e.queue(
        now,
        id,
        g1,
        crate::payload::Body::GroupMessage {
            group: g2,
            text: "smuggled".into(),
            sent_at_ms: now,
            depth,
            refs,
        },
        None,
    )
    .unwrap();
    net.input(c, Input::Tick);
    net.advance(3_000);
    assert!(net.clients[b].engine.group_counters().invalid_dropped > invalid);
    for g in [g1, g2] {
        assert!(!group_texts(&net, b, &g).contains(&"smuggled".to_string()));
    }
    // The streams still work.
    say(&mut net, c, g2, "after");
    net.advance(2_000);
    assert_eq!(group_texts(&net, b, &g2), vec!["in two", "after"]);
}

/// The relay's expiry notices name a group stream by its pseudonym. A
/// hostile relay claims 1,000 future seqs of Alice's group stream to Bob
/// expired: Bob asks Alice by the pseudonym, Alice maps it back to her
/// stream of the group and answers "not yet sent", Bob reports the relay
/// (under the group's id) and Alice's next group messages still show.
#[test]
fn a_forged_expiry_of_a_group_stream_is_refuted_by_its_sender() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    net.befriend_all(&[a, b]);
    net.advance(2_000);
    let g = net.create_group(a, "g", &[b]);
    net.advance(2_000);
    say(&mut net, a, g, "one");
    net.advance(2_000);
    let ad = net.clients[a].engine.device_id();
    let bd = net.clients[b].engine.device_id();
    let stream = group_stream(&g, &ad, &bd).unwrap();
    let next = net.clients[a].engine.sent_through(&bd, &g) + 1;
    assert!(next > 2, "alice's stream to bob is in use");
    net.relay.forged_truncation = Some((
        bd,
        hush_protocol::Truncation {
            oldest_retained: 1,
            dropped_count: 1_000,
            dropped: vec![hush_protocol::DroppedRange {
                sender: ad,
                conversation: stream,
                first_seq: next,
                last_seq: next + 999,
            }],
        },
    ));
    net.disconnect(b);
    net.advance(120_000);
    assert!(
        net.relay.forged_truncation.is_none(),
        "the notice was served"
    );
    say(&mut net, a, g, "two");
    say(&mut net, a, g, "three");
    net.advance(2_000);
    assert_eq!(group_texts(&net, b, &g), vec!["one", "two", "three"]);
    let c = net.clients[b].engine.counters();
    assert_eq!(c.unrecoverable, 0);
    assert_eq!(c.relay_claims_refuted, 1_000);
    let reports: Vec<_> = net.clients[b]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::RelayMisbehaviour {
                conversation,
                from_device,
                ..
            } => Some((*conversation, *from_device)),
            _ => None,
        })
        .collect();
    assert_eq!(reports, vec![(g, ad)]);
}
