//! Early pushes (docs/PROTOCOL.md §8.5) on the shared engine test network:
//! a message pushed before the relay's sync is stored and shown at once,
//! but counted in the cursor and acknowledged only once the relay says it
//! is durable; a relay that dies before its sync, and gives the seq to
//! another envelope, loses nothing; a relay that claims more is durable
//! than it pushed moves nothing.

use super::*;

/// alice, bob and carol, bob a contact of both, on a relay that pushes
/// early; settled.
fn early_net() -> (Net, usize, usize, usize, ConversationId, ConversationId) {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let c = net.create("carol");
    let ab = net.befriend(a, b);
    let cb = net.befriend(c, b);
    net.advance(2_000);
    net.relay.early_pushes = true;
    // Bob asks for early pushes on his next connection.
    net.disconnect(b);
    net.connect(b);
    assert!(
        net.relay
            .early_asked
            .contains(&net.clients[b].engine.device_id())
    );
    (net, a, b, c, ab, cb)
}

fn texts(net: &Net, i: usize) -> Vec<String> {
    net.messages(i).into_iter().map(|r| r.text).collect()
}

/// The acks bob sent: every `Ack` and every `Pull`'s merged ack.
fn acks_sent(net: &Net, i: usize) -> u64 {
    net.clients[i]
        .steps
        .iter()
        .flat_map(|(_, _, frames)| frames)
        .filter_map(|r| match r {
            Request::Ack { up_to } => Some(*up_to),
            Request::Pull { ack, .. } => Some(*ack),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn an_early_push_is_shown_at_once_and_counted_only_once_durable() {
    let (mut net, a, b, _c, ab, _cb) = early_net();
    let cursor = stored_cursor(&net.clients[b].storage);
    net.send(a, ab, "early");
    // Shown (and so stored) before the relay's sync is done.
    assert_eq!(texts(&net, b), vec!["early".to_string()]);
    net.advance(2_000);
    assert_eq!(
        stored_cursor(&net.clients[b].storage),
        cursor,
        "counted before it is durable"
    );
    assert!(acks_sent(&net, b) <= cursor, "acknowledged before durable");
    assert!(
        net.relay
            .held_answers
            .iter()
            .any(|(to, f)| *to == net.clients[a].engine.device_id()
                && matches!(
                    f,
                    ServerFrame::Response {
                        response: Response::Sent { .. },
                        ..
                    }
                )),
        "alice's answer waits for the sync"
    );
    net.relay_sync();
    net.advance(2_000);
    assert_eq!(stored_cursor(&net.clients[b].storage), cursor + 1);
    assert_eq!(acks_sent(&net, b), cursor + 1, "acknowledged once durable");
    assert_eq!(texts(&net, b), vec!["early".to_string()], "shown once");
}

#[test]
fn a_relay_that_dies_before_its_sync_and_reuses_the_seq_loses_nothing() {
    let (mut net, a, b, c, ab, cb) = early_net();
    let cursor = stored_cursor(&net.clients[b].storage);
    net.send(a, ab, "from alice");
    assert_eq!(texts(&net, b), vec!["from alice".to_string()]);
    // The relay dies before the sync: alice's envelope, pushed early to
    // bob under seq cursor + 1, is gone, and alice never heard it stored.
    net.relay_crash();
    net.switch_off(a);
    // Carol's message takes that seq.
    net.connect(c);
    net.connect(b);
    net.send(c, cb, "from carol");
    net.relay_sync();
    assert_eq!(
        net.relay.inbox[&net.clients[b].engine.device_id()]
            .keys()
            .next()
            .copied(),
        Some(cursor + 1),
        "carol's envelope got the seq alice's had"
    );
    // Alice comes back and sends hers again (a new seq).
    net.connect(a);
    net.advance(3_000);
    net.relay_sync();
    net.advance(3_000);
    let mut got = texts(&net, b);
    got.sort();
    assert_eq!(
        got,
        vec!["from alice".to_string(), "from carol".to_string()],
        "each shown exactly once"
    );
    assert_eq!(stored_cursor(&net.clients[b].storage), cursor + 2);
    assert_eq!(net.clients[a].engine.unsent(), 0);
}

#[test]
fn a_durable_claim_beyond_what_was_pushed_moves_nothing() {
    let (mut net, a, b, _c, ab, _cb) = early_net();
    let cursor = stored_cursor(&net.clients[b].storage);
    net.send(a, ab, "one");
    // A hostile relay claims far more is durable than it pushed.
    net.clients[b]
        .queue
        .push_back(ServerFrame::Durable { through: 1_000 });
    net.settle();
    net.advance(2_000);
    assert_eq!(
        stored_cursor(&net.clients[b].storage),
        cursor + 1,
        "capped at the envelope pushed early"
    );
    assert!(acks_sent(&net, b) <= cursor + 1);
    // Nothing above it was skipped: the next message still arrives.
    net.relay.early_pushes = false;
    net.relay_sync();
    net.send(a, ab, "two");
    net.advance(2_000);
    assert_eq!(texts(&net, b), vec!["one".to_string(), "two".to_string()]);
    assert_eq!(stored_cursor(&net.clients[b].storage), cursor + 2);
}

#[test]
fn a_device_that_does_not_ask_gets_plain_pushes_only() {
    let mut net = Net::new();
    net.cfg.early_pushes = false;
    let a = net.create("alice");
    let b = net.create("bob");
    let ab = net.befriend(a, b);
    net.advance(2_000);
    net.relay.early_pushes = true;
    assert!(net.relay.early_asked.is_empty());
    net.send(a, ab, "plain");
    assert!(texts(&net, b).is_empty(), "nothing before the sync");
    net.relay_sync();
    assert_eq!(texts(&net, b), vec!["plain".to_string()]);
}
