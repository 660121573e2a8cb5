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
