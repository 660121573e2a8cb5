//! Device-list attacks against the engine: a contact (or a relay serving its
//! lists) claims another contact's device. Uses the in-memory relay and
//! drivers of `tests.rs`; lists are planted on the relay directly, as a
//! relay that checks nothing would serve them.

use super::*;

impl Net {
    /// Reconnect client `i`: a fresh connection refreshes every list.
    fn reconnect(&mut self, i: usize) {
        self.disconnect(i);
        self.connect(i);
    }
    fn warnings(&self, i: usize) -> Vec<String> {
        self.clients[i]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Warning(w) => Some(w.clone()),
                _ => None,
            })
            .collect()
    }
    fn engine(&self, i: usize) -> &Engine {
        &self.clients[i].engine
    }
    /// The list of client `i`'s user the relay holds.
    fn stored_list(&self, i: usize) -> SignedDeviceList {
        self.relay.lists[&self.engine(i).user_key()].clone()
    }
    /// Put a list of client `i`'s user, signed by its user key, with these
    /// entries on the relay (a relay that checks nothing serves it).
    fn plant_list(&mut self, i: usize, devices: Vec<DeviceEntry>) -> SignedDeviceList {
        let user = self.engine(i).user_key();
        let version = self.relay.lists.get(&user).map_or(0, |l| l.list.version) + 1;
        let list = DeviceList {
            user,
            version,
            devices,
        };
        let signed = crate::sig::sign_device_list(&self.engine(i).device.user, list).unwrap();
        self.relay.lists.insert(user, signed.clone());
        signed
    }

    /// Every envelope the relay stored: (sender, recipient, conversation).
    fn sent(&self) -> Vec<(DeviceId, DeviceId, ConversationId)> {
        self.relay
            .seen_bytes
            .iter()
            .filter_map(|b| Envelope::from_bytes(b).ok())
            .map(|e| {
                let h = e.header;
                (h.sender_device, h.recipient_device, h.conversation_id)
            })
            .collect()
    }
}

/// Attack: contact X publishes a list, signed with X's own user key, that
/// names contact A's device (id and public keys copied from A's list) —
/// first without A's device's membership proof, then with the proof copied
/// from A's own list (bound to A's user key, so it fails for X). V refuses
/// both lists as a whole: A's messages still reach V as A's, and V never
/// encrypts X's conversation to A's device.
#[test]
fn a_contact_cannot_claim_another_contacts_device() {
    let mut net = Net::new();
    let a = net.create("a");
    let v = net.create("v");
    let x = net.create("x");
    let conv_va = net.befriend(v, a);
    let conv_vx = net.befriend(v, x);
    let a_user = net.engine(a).user_key();
    let a_dev = net.engine(a).device_id();
    let x_dev = net.engine(x).device_id();

    let a_entry = net.stored_list(a).list.devices[0].clone();
    assert_eq!(a_entry.device, a_dev);
    let x_entry = net.stored_list(x).list.devices[0].clone();
    let mut unproven = a_entry.clone();
    unproven.membership_signature = [0; 64];

    for (round, stolen) in [unproven, a_entry.clone()].into_iter().enumerate() {
        let planted = net.plant_list(x, vec![x_entry.clone(), stolen]);
        net.clients[v].events.clear();
        net.reconnect(v);
        // V fetched X's planted list and refused it as a whole.
        let held = net.engine(v).contacts[&net.engine(x).user_key()]
            .known
            .list
            .clone();
        assert_ne!(held.as_ref(), Some(&planted), "round {round}");
        assert!(
            !net.engine(v).contacts[&net.engine(x).user_key()]
                .known
                .contains(&a_dev)
        );
        assert!(
            net.warnings(v)
                .iter()
                .any(|w| w.contains("membership proof")),
            "round {round}: {:?}",
            net.warnings(v)
        );
        assert_eq!(net.engine(v).peer(&a_dev).map(|(u, _)| u), Some(a_user));
        assert_eq!(net.engine(v).claimants(&a_dev), vec![a_user]);

        // A writes to V: it arrives, attributed to A.
        let text = format!("from a {round}");
        net.send(a, conv_va, &text);
        net.advance(1_000);
        let got: Vec<_> = net
            .messages(v)
            .into_iter()
            .filter(|m| m.text == text)
            .collect();
        assert_eq!(got.len(), 1, "round {round}");
        assert_eq!(got[0].from_user, a_user);
        assert_eq!(got[0].from_device, a_dev);
        assert_eq!(got[0].conversation, conv_va);

        // V writes to X: X gets it; A's device never gets X's conversation.
        let text = format!("to x {round}");
        net.send(v, conv_vx, &text);
        net.advance(1_000);
        assert!(
            net.messages(x).iter().any(|m| m.text == text),
            "round {round}"
        );
        let v_dev = net.engine(v).device_id();
        assert!(
            !net.sent()
                .iter()
                .any(|&(s, r, c)| s == v_dev && r == a_dev && c == conv_vx),
            "round {round}: X's conversation was encrypted to A's device"
        );
        assert!(
            net.sent()
                .iter()
                .any(|&(s, r, c)| s == v_dev && r == x_dev && c == conv_vx)
        );
    }
}

/// A device that signed membership proofs for two users (a hostile device,
/// or one whose key leaked) is named by two verified lists: V attributes it
/// to neither user, says so, and accepts no message from it.
#[test]
fn a_device_listed_by_two_users_is_attributed_to_neither() {
    let mut net = Net::new();
    let v = net.create("v");
    let x1 = net.create("x1");
    let x2 = net.create("x2");
    net.befriend(v, x1);
    let conv_vx2 = net.befriend(v, x2);
    let x1_dev = net.engine(x1).device_id();
    let x2_user = net.engine(x2).user_key();
    // X1's device signs a proof for X2's user, and X2 lists it.
    let mut entry = net.stored_list(x1).list.devices[0].clone();
    entry.membership_signature = net
        .engine(x1)
        .device
        .identity
        .sign_prefixed(&entry.membership_bytes(&x2_user));
    let x2_entry = net.stored_list(x2).list.devices[0].clone();
    let planted = net.plant_list(x2, vec![x2_entry, entry]);
    crate::sig::verify_device_list(&planted, &x2_user).unwrap();

    net.clients[v].events.clear();
    net.reconnect(v);
    assert!(net.engine(v).contacts[&x2_user].known.contains(&x1_dev));
    assert_eq!(net.engine(v).claimants(&x1_dev).len(), 2);
    assert_eq!(net.engine(v).peer(&x1_dev), None);
    assert!(
        net.warnings(v)
            .iter()
            .any(|w| w.contains("listed by another user")),
        "{:?}",
        net.warnings(v)
    );

    // V writes to X2: the contested device gets nothing.
    let v_dev = net.engine(v).device_id();
    net.send(v, conv_vx2, "to x2");
    net.advance(2_000);
    assert!(
        !net.sent()
            .iter()
            .any(|&(s, r, _)| s == v_dev && r == x1_dev),
        "V encrypted to a contested device"
    );
    assert!(net.messages(x2).iter().any(|m| m.text == "to x2"));
}

/// Linking: the new device signs its own entry, the merged list keeps the
/// first device's proof unchanged, and every entry of every list the relay
/// holds verifies.
#[test]
fn linked_devices_each_prove_their_own_entry() {
    let mut net = Net::new();
    let a = net.create("a");
    let before = net.stored_list(a).list.devices[0].clone();
    let b = net.join(a);
    net.advance(2_000);
    let user = net.engine(a).user_key();
    let list = net.stored_list(a);
    crate::sig::verify_device_list(&list, &user).unwrap();
    let ids: Vec<_> = list.list.devices.iter().map(|e| e.device).collect();
    assert_eq!(
        ids,
        vec![net.engine(a).device_id(), net.engine(b).device_id()]
    );
    assert_eq!(
        list.list.devices[0], before,
        "the first entry is kept as is"
    );
    for e in &list.list.devices {
        crate::sig::verify_membership(e, &user).unwrap();
    }
    // Both devices hold the merged list as their own.
    for i in [a, b] {
        assert_eq!(net.engine(i).own.known.list.as_ref(), Some(&list));
    }
}
