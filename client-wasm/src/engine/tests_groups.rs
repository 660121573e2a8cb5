//! Groups on the shared engine test network: membership changes, multi-
//! device members, the causal order under reordering and loss, and the
//! attacks a hostile member or stranger can try.

use super::*;

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
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let c = net.create("carol");
    net.befriend_all(&[a, b, c]);
    net.advance(2_000);
    let g = net.create_group(a, "trip", &[b, c]);
    net.advance(2_000);
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
