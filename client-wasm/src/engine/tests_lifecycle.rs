//! Device lifecycle against the engine: stale leases (true or lying) and
//! removal. The in-memory relay of `tests.rs` answers `FetchDeviceLeases`
//! with whatever leases a test gives it, as a hostile relay could.

use super::*;

/// Envelopes the relay stored from `from` to `to` (by header).
fn sealed_to(net: &Net, from: DeviceId, to: DeviceId) -> usize {
    net.relay
        .seen_bytes
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .filter(|e| e.header.sender_device == from && e.header.recipient_device == to)
        .count()
}

/// Alice on two devices (a1, a2), Bob on one, contacts of each other.
fn alice_twice_and_bob() -> (Net, usize, usize, usize, ConversationId) {
    let mut net = Net::new();
    let a1 = net.create("alice");
    let a2 = net.join(a1);
    net.advance(2_000);
    let b = net.create("bob");
    let conv = net.befriend(a1, b);
    net.advance(2_000);
    (net, a1, a2, b, conv)
}

/// Let every list go stale in the engines' eyes, so the next send fetches
/// lists (and leases) again before it fans out.
fn past_list_freshness(net: &mut Net) {
    let fresh = net.cfg.device_list_fresh_ms;
    net.advance(fresh + 1_000);
}

/// A device the relay reports stale gets no new envelopes; once its lease
/// is fresh again it does.
#[test]
fn a_device_reported_stale_gets_no_new_envelopes() {
    let (mut net, a1, a2, b, conv) = alice_twice_and_bob();
    let (a1d, a2d, bd) = (
        net.clients[a1].engine.device_id(),
        net.clients[a2].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    net.send(b, conv, "before");
    net.advance(1_000);
    assert!(sealed_to(&net, bd, a2d) >= 1, "a2 is reached while live");

    net.relay.stale_devices.insert(a2d);
    past_list_freshness(&mut net);
    let to_a2 = sealed_to(&net, bd, a2d);
    let to_a1 = sealed_to(&net, bd, a1d);
    net.send(b, conv, "while a2 is stale");
    net.advance(1_000);
    assert_eq!(sealed_to(&net, bd, a2d), to_a2, "nothing new sealed to a2");
    assert!(sealed_to(&net, bd, a1d) > to_a1, "a1 still gets it");
    let infos = net.clients[b]
        .engine
        .device_infos(&net.clients[a1].engine.user_key());
    assert!(infos.iter().any(|i| i.device == a2d && i.stale));
    // Alice's own fan-out skips a2 too.
    let a1_to_a2 = sealed_to(&net, a1d, a2d);
    net.send(a1, conv, "alice while a2 is stale");
    net.advance(1_000);
    assert_eq!(sealed_to(&net, a1d, a2d), a1_to_a2);

    net.relay.stale_devices.clear();
    past_list_freshness(&mut net);
    net.send(b, conv, "a2 is back");
    net.advance(1_000);
    assert!(sealed_to(&net, bd, a2d) > to_a2, "a2 is reached again");
}

/// Attack: a hostile relay reports every device of a contact stale, to make
/// a message go to nobody. The client then encrypts to all of them.
#[test]
fn a_relay_calling_every_device_stale_cannot_silence_a_contact() {
    let (mut net, a1, a2, b, conv) = alice_twice_and_bob();
    let (a1d, a2d, bd) = (
        net.clients[a1].engine.device_id(),
        net.clients[a2].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    net.relay.stale_devices.extend([a1d, a2d]);
    past_list_freshness(&mut net);
    let (to_a1, to_a2) = (sealed_to(&net, bd, a1d), sealed_to(&net, bd, a2d));
    let id = net.send(b, conv, "to alice anyway");
    net.advance(1_000);
    assert!(sealed_to(&net, bd, a1d) > to_a1);
    assert!(sealed_to(&net, bd, a2d) > to_a2);
    assert!(net.messages(a1).iter().any(|m| m.id == id));
}

/// Attack: a hostile relay adds a lease for a device the signed list does
/// not name (its own device), hoping to be encrypted to. Leases only ever
/// narrow the signed list: nothing is sealed to the stranger.
#[test]
fn a_lease_cannot_add_a_device_to_a_signed_list() {
    let (mut net, a1, _a2, b, conv) = alice_twice_and_bob();
    let intruder = DeviceId([0xEE; 16]);
    net.relay.extra_leases.push(intruder);
    past_list_freshness(&mut net);
    let bd = net.clients[b].engine.device_id();
    net.send(b, conv, "hello");
    net.advance(1_000);
    assert_eq!(sealed_to(&net, bd, intruder), 0);
    let alice = net.clients[a1].engine.user_key();
    assert!(
        !net.clients[b]
            .engine
            .device_infos(&alice)
            .iter()
            .any(|i| i.device == intruder)
    );
}

/// Removing a device: a1 publishes Alice's list without a2. Bob and a1
/// seal nothing more to a2, and a2, still connected, learns it was removed
/// and never adds itself back.
#[test]
fn a_removed_device_gets_nothing_new_and_does_not_re_add_itself() {
    let (mut net, a1, a2, b, conv) = alice_twice_and_bob();
    let (a1d, a2d, bd) = (
        net.clients[a1].engine.device_id(),
        net.clients[a2].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    let alice = net.clients[a1].engine.user_key();
    net.send(b, conv, "before removal");
    net.advance(1_000);
    assert!(sealed_to(&net, bd, a2d) >= 1);

    net.command(a1, Command::RemoveDevice { device: a2d });
    net.advance(1_000);
    let stored = net.relay.lists[&alice].clone();
    assert!(!stored.list.devices.iter().any(|e| e.device == a2d));
    assert!(stored.list.devices.iter().any(|e| e.device == a1d));
    assert!(!net.clients[a1].engine.devices_of(&alice).contains(&a2d));

    past_list_freshness(&mut net);
    let (b_to_a2, a1_to_a2) = (sealed_to(&net, bd, a2d), sealed_to(&net, a1d, a2d));
    net.send(b, conv, "after removal");
    net.send(a1, conv, "alice after removal");
    net.advance(2_000);
    assert_eq!(sealed_to(&net, bd, a2d), b_to_a2, "bob sealed to a2");
    assert_eq!(sealed_to(&net, a1d, a2d), a1_to_a2, "a1 sealed to a2");
    assert!(net.messages(a1).iter().any(|m| m.text == "after removal"));

    // a2 (still served by this relay, which refuses nobody) fetches its
    // user's list on its next connection, sees itself dropped, stays out.
    net.disconnect(a2);
    net.connect(a2);
    net.advance(1_000);
    assert!(net.clients[a2].engine.removed());
    assert!(
        net.clients[a2]
            .events
            .iter()
            .any(|e| matches!(e, Event::Removed))
    );
    let after = net.relay.lists[&alice].clone();
    assert_eq!(after, stored, "a2 published a list re-adding itself");
}

/// Bad removals are refused before anything changes.
#[test]
fn removing_this_device_or_an_unlisted_one_is_refused() {
    let (mut net, a1, _a2, _b, _conv) = alice_twice_and_bob();
    let me = net.clients[a1].engine.device_id();
    let err = net.clients[a1]
        .engine
        .handle(
            net.now,
            Input::Command(Command::RemoveDevice { device: me }),
        )
        .unwrap_err();
    assert!(matches!(err, ClientError::NotAllowed(_)), "{err:?}");
    let err = net.clients[a1]
        .engine
        .handle(
            net.now,
            Input::Command(Command::RemoveDevice {
                device: DeviceId([0x42; 16]),
            }),
        )
        .unwrap_err();
    assert!(matches!(err, ClientError::Unknown(_)), "{err:?}");
}

/// The relay's `Retired` notice reaches the app as an event.
#[test]
fn a_retired_notice_becomes_an_event() {
    let (mut net, a1, _a2, _b, _conv) = alice_twice_and_bob();
    net.clients[a1].queue.push_back(ServerFrame::Retired {
        last_seen_ms: T0 - 1,
    });
    net.settle();
    assert_eq!(net.clients[a1].engine.retired_last_seen_ms(), Some(T0 - 1));
    assert!(
        net.clients[a1]
            .events
            .iter()
            .any(|e| matches!(e, Event::Retired { last_seen_ms } if *last_seen_ms == T0 - 1))
    );
}

/// Attack: after a1 removes a2, a hostile relay (colluding with a2) keeps
/// serving the old list, which names a2, to everyone. Bob gets the new list
/// from a1 itself (`DeviceListChanged`, signed by Alice), so neither his
/// next send (his cached list still fresh, no refresh) nor a later one
/// (after a fetch that returns the old list) is sealed to a2.
#[test]
fn a_relay_serving_the_old_list_after_a_removal_gets_nothing_sealed_to_it() {
    let (mut net, a1, a2, b, conv) = alice_twice_and_bob();
    let (a1d, a2d, bd) = (
        net.clients[a1].engine.device_id(),
        net.clients[a2].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    let alice = net.clients[a1].engine.user_key();
    net.send(b, conv, "before removal");
    net.advance(1_000);
    assert!(sealed_to(&net, bd, a2d) >= 1, "a2 is reached before");
    let old = net.relay.lists[&alice].clone();
    net.relay.served_lists.insert(alice, old.clone());

    net.command(a1, Command::RemoveDevice { device: a2d });
    net.advance(1_000);
    assert!(net.relay.lists[&alice].list.version > old.list.version);
    let bob = &net.clients[b].engine;
    assert!(!bob.devices_of(&alice).contains(&a2d), "bob still lists a2");
    assert!(bob.devices_of(&alice).contains(&a1d));
    assert_eq!(bob.counters().list_notices, 1);

    // At once, with bob's cached list still fresh.
    let b_to_a2 = sealed_to(&net, bd, a2d);
    net.send(b, conv, "right after removal");
    net.advance(1_000);
    assert_eq!(sealed_to(&net, bd, a2d), b_to_a2, "sealed to a2 at once");

    // And after bob re-fetched the list, which the relay answers with the
    // old one: ignored, counted, warned about.
    past_list_freshness(&mut net);
    net.send(b, conv, "later");
    net.advance(2_000);
    assert_eq!(sealed_to(&net, bd, a2d), b_to_a2, "sealed to a2 later");
    let bob = &net.clients[b].engine;
    assert!(bob.counters().old_lists_ignored >= 1);
    assert!(!bob.devices_of(&alice).contains(&a2d));
    assert!(
        net.clients[b]
            .events
            .iter()
            .any(|e| matches!(e, Event::Warning(w) if w.contains("older device list")))
    );
    let texts: Vec<String> = net.messages(a1).into_iter().map(|m| m.text).collect();
    assert!(
        texts.contains(&"right after removal".to_string()),
        "{texts:?}"
    );
    assert!(texts.contains(&"later".to_string()), "{texts:?}");
    // Bob's list of alice survives a restart (it is stored).
    let records = net.clients[b].storage.load_state().unwrap();
    let reloaded = Engine::load(records, [7; 32], net.cfg.clone()).unwrap();
    assert!(!reloaded.devices_of(&alice).contains(&a2d));
}

/// Attack: a contact sends a `DeviceListChanged` that is not its user's
/// signed list: another user's list (Bob passing on Alice's list), or its
/// own list with a bumped version, emptied, without a valid signature (to
/// make Alice stop writing to him). Both are rejected and change nothing.
#[test]
fn a_device_list_notice_that_is_not_the_senders_signed_list_is_rejected() {
    let (mut net, a1, _a2, b, _conv) = alice_twice_and_bob();
    let a1d = net.clients[a1].engine.device_id();
    let bob = net.clients[b].engine.user_key();
    let alice = net.clients[a1].engine.user_key();
    let alice_list = net.relay.lists[&alice].clone();
    let mut forged = net.relay.lists[&bob].clone();
    forged.list.version += 5;
    forged.list.devices.clear();
    let rejected = net.clients[a1].engine.counters().rejected;
    let bob_version = net.clients[a1].engine.devices_version(&bob);
    let now = net.now;
    for list in [alice_list, forged] {
        net.clients[b]
            .engine
            .queue_control(now, a1d, crate::payload::Body::DeviceListChanged { list })
            .unwrap();
    }
    net.advance(2_000);
    let e = &net.clients[a1].engine;
    assert_eq!(e.counters().rejected, rejected + 2);
    assert_eq!(e.counters().list_notices, 0);
    assert_eq!(e.devices_version(&bob), bob_version);
    assert!(!e.devices_of(&bob).is_empty());
}

/// `Retired` and removal are counted (and the count survives a restart).
#[test]
fn retired_and_removed_are_counted() {
    let (mut net, a1, a2, _b, _conv) = alice_twice_and_bob();
    net.clients[a1]
        .queue
        .push_back(ServerFrame::Retired { last_seen_ms: 1 });
    net.settle();
    assert_eq!(net.clients[a1].engine.counters().retired, 1);
    let a2d = net.clients[a2].engine.device_id();
    net.command(a1, Command::RemoveDevice { device: a2d });
    net.advance(1_000);
    net.disconnect(a2);
    net.connect(a2);
    net.advance(1_000);
    assert!(net.clients[a2].engine.removed());
    assert_eq!(net.clients[a2].engine.counters().removed, 1);
    let records = net.clients[a2].storage.load_state().unwrap();
    let reloaded = Engine::load(records, [7; 32], net.cfg.clone()).unwrap();
    assert!(reloaded.removed());
}

/// The user's own other devices get the notice too: with the relay serving
/// the old list, a2 still learns that a1 removed a3 and seals nothing more
/// to it.
#[test]
fn the_users_other_devices_get_the_removal_notice() {
    let mut net = Net::new();
    let a1 = net.create("alice");
    let a2 = net.join(a1);
    let a3 = net.join(a1);
    net.advance(2_000);
    let b = net.create("bob");
    let conv = net.befriend(a1, b);
    net.advance(2_000);
    // a2 fetches its user's list again (it was linked before a3).
    net.disconnect(a2);
    net.connect(a2);
    net.advance(1_000);
    let alice = net.clients[a1].engine.user_key();
    let (a2d, a3d) = (
        net.clients[a2].engine.device_id(),
        net.clients[a3].engine.device_id(),
    );
    assert!(net.clients[a2].engine.devices_of(&alice).contains(&a3d));
    let old = net.relay.lists[&alice].clone();
    net.relay.served_lists.insert(alice, old);

    net.command(a1, Command::RemoveDevice { device: a3d });
    net.advance(1_000);
    let e = &net.clients[a2].engine;
    assert!(!e.devices_of(&alice).contains(&a3d), "a2 still lists a3");
    assert_eq!(e.counters().list_notices, 1);
    let to_a3 = sealed_to(&net, a2d, a3d);
    net.send(a2, conv, "from a2 after the removal");
    net.advance(1_000);
    assert_eq!(sealed_to(&net, a2d, a3d), to_a3, "a2 sealed to a3");
}

/// Attack: the relay colludes with a removed device (a3). It serves
/// everyone the old list and withholds every envelope the remover (a1)
/// sends Bob, the removal notice included. Alice's third device (a2) still
/// answers Bob, so his messages turn `Delivered` and nothing would betray
/// the withheld stream; a2 forwards the notice it got from a1, so Bob
/// stops encrypting to a3 anyway. The relay would have to withhold every
/// stream from Alice's devices to Bob, which leaves his messages
/// undelivered, in plain sight.
#[test]
fn a_notice_withheld_from_the_remover_reaches_contacts_through_the_users_other_devices() {
    let mut net = Net::new();
    let a1 = net.create("alice");
    let a2 = net.join(a1);
    let a3 = net.join(a1);
    net.advance(2_000);
    let b = net.create("bob");
    let conv = net.befriend(a1, b);
    net.advance(2_000);
    // a2 fetches its user's list again (it was linked before a3).
    net.disconnect(a2);
    net.connect(a2);
    net.advance(1_000);
    let alice = net.clients[a1].engine.user_key();
    let (a1d, a2d, a3d, bd) = (
        net.clients[a1].engine.device_id(),
        net.clients[a2].engine.device_id(),
        net.clients[a3].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    net.send(b, conv, "before the removal");
    net.advance(1_000);
    assert!(sealed_to(&net, bd, a3d) >= 1, "a3 is reached before");
    assert!(sealed_to(&net, bd, a2d) >= 1, "a2 is reached before");
    let old = net.relay.lists[&alice].clone();
    net.relay.served_lists.insert(alice, old.clone());
    net.relay.withheld_streams.insert((a1d, bd));

    net.command(a1, Command::RemoveDevice { device: a3d });
    net.advance(2_000);
    assert!(net.relay.lists[&alice].list.version > old.list.version);
    assert!(
        sealed_to(&net, a1d, bd) >= 1,
        "a1 sent Bob its notice (withheld)"
    );
    let e = &net.clients[a2].engine;
    assert!(!e.devices_of(&alice).contains(&a3d), "a2 still lists a3");
    let bob = &net.clients[b].engine;
    assert!(!bob.devices_of(&alice).contains(&a3d), "bob still lists a3");
    assert!(bob.devices_of(&alice).contains(&a2d));
    assert_eq!(bob.counters().list_notices, 1);

    let to_a3 = sealed_to(&net, bd, a3d);
    net.send(b, conv, "after the removal");
    net.advance(1_000);
    assert_eq!(sealed_to(&net, bd, a3d), to_a3, "bob sealed to a3");
    let texts: Vec<String> = net.messages(a2).into_iter().map(|m| m.text).collect();
    assert!(
        texts.contains(&"after the removal".to_string()),
        "{texts:?}"
    );
}

/// The same attack when Alice's other device (a2) was offline while a3 was
/// linked and removed: a2 never listed a3, but the list it finds skips a
/// version, which may hide a removal, so it passes the notice on as well.
#[test]
fn a_device_that_missed_the_link_and_the_removal_still_forwards_the_notice() {
    let (mut net, a1, a2, b, conv) = alice_twice_and_bob();
    let alice = net.clients[a1].engine.user_key();
    net.switch_off(a2);
    let without_a3 = net.relay.lists[&alice].clone();
    let a3 = net.join(a1);
    net.advance(2_000);
    let (a1d, a3d, bd) = (
        net.clients[a1].engine.device_id(),
        net.clients[a3].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    past_list_freshness(&mut net);
    net.send(b, conv, "to all three");
    net.advance(1_000);
    assert!(sealed_to(&net, bd, a3d) >= 1, "bob reaches a3");
    assert!(!net.clients[a2].engine.devices_of(&alice).contains(&a3d));
    let a2_held = net.clients[a2].engine.devices_version(&alice);

    // The relay shows a2 the list from before a3 (and Bob, who ignores it
    // as older than his).
    net.relay.served_lists.insert(alice, without_a3);
    net.relay.withheld_streams.insert((a1d, bd));
    net.command(a1, Command::RemoveDevice { device: a3d });
    net.advance(1_000);
    net.connect(a2);
    net.advance(2_000);
    let e = &net.clients[a2].engine;
    assert!(
        e.devices_version(&alice) >= a2_held + 2,
        "a2 got the new list"
    );
    assert_eq!(e.counters().list_notices, 1, "from a1");
    let bob = &net.clients[b].engine;
    assert!(!bob.devices_of(&alice).contains(&a3d), "bob still lists a3");
    let to_a3 = sealed_to(&net, bd, a3d);
    net.send(b, conv, "after the removal");
    net.advance(1_000);
    assert_eq!(sealed_to(&net, bd, a3d), to_a3, "bob sealed to a3");
}

/// A message expires on the relay while its recipient is away; the
/// recipient learns of it from the relay's expiry report and asks the
/// sender, but that request expires too (the sender is away as well), and
/// by the time the sender is back both have forgotten their outbox
/// entries. The recipient must ask again until the sender answers, so the
/// message is either re-sent or reported lost; before, it was asked once,
/// and the message was gone without a report.
#[test]
fn a_lost_request_for_an_expired_message_is_asked_again_until_answered() {
    let mut net = Net::new();
    net.cfg.outbox_retention_ms = 90_000;
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.send(a, conv, "hello");
    net.advance(2_000);
    let (ad, bd) = (
        net.clients[a].engine.device_id(),
        net.clients[b].engine.device_id(),
    );
    // Bob is away; Alice's message (and every probe of it) expires on the
    // relay before Bob reads it.
    net.switch_off(b);
    net.relay.withheld_streams.insert((ad, bd));
    let lost = net.send(a, conv, "expired");
    net.advance(5_000);
    net.switch_off(a);
    // Bob returns to the relay's report that Alice's seq 2 expired; his
    // request for it expires too while Alice is away.
    net.relay.withheld_streams.insert((bd, ad));
    net.relay.forged_truncation = Some((
        bd,
        hush_protocol::Truncation {
            oldest_retained: 1,
            dropped_count: 1,
            dropped: vec![hush_protocol::DroppedRange {
                sender: ad,
                conversation: conv,
                first_seq: 2,
                last_seq: 2,
            }],
        },
    ));
    net.connect(b);
    net.advance(200_000);
    assert!(
        net.relay.forged_truncation.is_none(),
        "the report was served"
    );
    // Alice comes back after both outboxes forgot.
    net.relay.withheld_streams.clear();
    net.connect(a);
    net.advance(300_000);
    let got = net.messages(b).iter().any(|r| r.id == lost);
    let reported = net.clients[b].engine.counters().unrecoverable;
    assert!(
        got || reported == 1,
        "bob neither has the message nor reports it lost"
    );
    assert!(!got, "alice forgot it");
}
