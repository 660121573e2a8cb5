//! Device-list attacks against the engine: a contact (or a relay serving its
//! lists) claims another contact's device. A small in-memory relay that
//! stores and serves whatever lists it is given (it checks nothing, like a
//! hostile relay), and engines driven through the storage → frames → events
//! contract.

use super::*;
use crate::storage::Storage;
use crate::storage::memory::MemoryStorage;
use hush_protocol::{
    AuthOk, ClientFrame, Delivered, DeviceRegistration, Envelope, OneTimePrekey, Page,
    PrekeyBundle, Request, Response, SendOutcome, ServerFrame, SignedDeviceList, SignedPrekey,
};
use std::collections::{BTreeMap, VecDeque};

const T0: u64 = 1_700_000_000_000;

#[derive(Default)]
struct Relay {
    registered: BTreeMap<DeviceId, DeviceRegistration>,
    signed: BTreeMap<DeviceId, SignedPrekey>,
    otks: BTreeMap<DeviceId, Vec<OneTimePrekey>>,
    lists: BTreeMap<UserKey, SignedDeviceList>,
    inbox: BTreeMap<DeviceId, BTreeMap<u64, Envelope>>,
    head: BTreeMap<DeviceId, u64>,
    /// Every envelope stored: (sender, recipient, conversation).
    sent: Vec<(DeviceId, DeviceId, ConversationId)>,
}

impl Relay {
    fn handle(&mut self, who: DeviceId, f: ClientFrame) -> Vec<(DeviceId, ServerFrame)> {
        let id = f.request_id;
        let resp = |r: Response| {
            vec![(
                who,
                ServerFrame::Response {
                    request_id: id,
                    response: r,
                },
            )]
        };
        let refuse = |code| vec![(who, ServerFrame::error(id, code, "no"))];
        match f.request {
            Request::Hello { .. } => resp(Response::Challenge { challenge: [1; 32] }),
            Request::Register { registration, .. } => {
                self.registered.insert(who, registration);
                resp(Response::Authenticated(self.auth_ok(who)))
            }
            Request::Auth { .. } => resp(Response::Authenticated(self.auth_ok(who))),
            Request::PublishPrekeys {
                signed_prekey,
                one_time_prekeys,
            } => {
                self.signed.insert(who, signed_prekey);
                let pool = self.otks.entry(who).or_default();
                pool.extend(one_time_prekeys);
                let left = pool.len() as u32;
                resp(Response::PrekeysPublished {
                    one_time_prekeys_left: left,
                })
            }
            Request::FetchPrekeys { device } => {
                let (Some(reg), Some(spk)) =
                    (self.registered.get(&device), self.signed.get(&device))
                else {
                    return refuse(hush_protocol::ErrorCode::NoPrekeys);
                };
                let otk = self.otks.get_mut(&device).and_then(|p| p.pop());
                resp(Response::Prekeys(PrekeyBundle {
                    device,
                    user: reg.user,
                    signing_key: reg.signing_key,
                    agreement_key: reg.agreement_key,
                    signed_prekey: spk.clone(),
                    one_time_prekey: otk,
                }))
            }
            Request::PublishDeviceList { list } => {
                let stored = self
                    .lists
                    .get(&list.list.user)
                    .map_or(0, |l| l.list.version);
                if list.list.version <= stored {
                    return refuse(hush_protocol::ErrorCode::Forbidden);
                }
                let v = list.list.version;
                self.lists.insert(list.list.user, list);
                resp(Response::DeviceListPublished { version: v })
            }
            Request::FetchDeviceList { user } => match self.lists.get(&user) {
                Some(l) => resp(Response::DeviceList(l.clone())),
                None => refuse(hush_protocol::ErrorCode::UnknownDevice),
            },
            Request::Send { envelopes } => {
                let mut outcomes = Vec::new();
                let mut pushes = Vec::new();
                for env in envelopes {
                    let h = env.header.clone();
                    self.sent
                        .push((h.sender_device, h.recipient_device, h.conversation_id));
                    let head = self.head.entry(h.recipient_device).or_default();
                    *head += 1;
                    let seq = *head;
                    self.inbox
                        .entry(h.recipient_device)
                        .or_default()
                        .insert(seq, env.clone());
                    pushes.push((h.recipient_device, Delivered { seq, envelope: env }));
                    outcomes.push(SendOutcome::Stored {
                        message_id: h.message_id,
                        recipient: h.recipient_device,
                        seq,
                        duplicate: false,
                    });
                }
                let mut out = resp(Response::Sent { outcomes });
                for (d, del) in pushes {
                    out.push((
                        d,
                        ServerFrame::Push {
                            envelopes: vec![del],
                        },
                    ));
                }
                out
            }
            Request::Pull { after, limit, ack } => {
                self.ack(who, ack);
                let inbox = self.inbox.entry(who).or_default();
                let envelopes: Vec<Delivered> = inbox
                    .range(after + 1..)
                    .take(usize::from(limit))
                    .map(|(s, e)| Delivered {
                        seq: *s,
                        envelope: e.clone(),
                    })
                    .collect();
                let last = envelopes.last().map_or(after, |d| d.seq);
                let remaining = inbox.range(last + 1..).count() as u64;
                resp(Response::Page(Page {
                    envelopes,
                    remaining,
                    truncated: None,
                }))
            }
            Request::Ack { up_to } => {
                self.ack(who, up_to);
                resp(Response::Acked { up_to })
            }
            Request::Ping => resp(Response::Pong { relay_time_ms: 0 }),
        }
    }

    fn ack(&mut self, who: DeviceId, up_to: u64) {
        if let Some(inbox) = self.inbox.get_mut(&who) {
            let keep = inbox.split_off(&(up_to + 1));
            *inbox = keep;
        }
    }

    fn auth_ok(&self, who: DeviceId) -> AuthOk {
        AuthOk {
            device: who,
            inbox_head: self.head.get(&who).copied().unwrap_or(0),
            acked: 0,
            one_time_prekeys_left: self.otks.get(&who).map_or(0, |p| p.len() as u32),
            relay_time_ms: 0,
        }
    }
}

struct Client {
    engine: Engine,
    storage: MemoryStorage,
    connected: bool,
    queue: VecDeque<ServerFrame>,
    events: Vec<Event>,
}

struct Net {
    relay: Relay,
    clients: Vec<Client>,
    now: u64,
    seed: u8,
}

impl Net {
    fn new() -> Net {
        Net {
            relay: Relay::default(),
            clients: Vec::new(),
            now: T0,
            seed: 40,
        }
    }

    fn add(&mut self, engine: Engine, step: Step) -> usize {
        let mut storage = MemoryStorage::new();
        storage.apply(&step.storage).unwrap();
        self.clients.push(Client {
            engine,
            storage,
            connected: false,
            queue: VecDeque::new(),
            events: step.events,
        });
        let i = self.clients.len() - 1;
        self.clients[i].connected = true;
        self.input(i, Input::Connected);
        self.settle();
        i
    }

    fn create(&mut self, name: &str) -> usize {
        self.seed += 1;
        let (e, s) = Engine::create(
            self.now,
            [self.seed; 32],
            "relay",
            name,
            EngineConfig::default(),
        )
        .unwrap();
        self.add(e, s)
    }

    fn join(&mut self, inviter: usize) -> usize {
        let Some(Reply::LinkCode(text)) = self.command(inviter, Command::CreateLinkCode) else {
            panic!("no link code");
        };
        let code = LinkCode::parse(&text).unwrap();
        self.seed += 1;
        let (e, s) =
            Engine::join(self.now, [self.seed; 32], &code, EngineConfig::default()).unwrap();
        self.add(e, s)
    }

    fn transmit(&mut self, i: usize, frames: Vec<ClientFrame>) {
        if !self.clients[i].connected {
            return;
        }
        let me = self.clients[i].engine.device_id();
        for f in frames {
            for (to, frame) in self.relay.handle(me, f) {
                if let Some(t) = self
                    .clients
                    .iter_mut()
                    .find(|c| c.engine.device_id() == to && c.connected)
                {
                    t.queue.push_back(frame);
                }
            }
        }
    }

    fn input(&mut self, i: usize, input: Input) -> Option<Reply> {
        let mut step = self.clients[i].engine.handle(self.now, input).unwrap();
        self.transmit(i, std::mem::take(&mut step.early_frames));
        let c = &mut self.clients[i];
        c.storage.apply(&step.storage).unwrap();
        c.events.extend(step.events);
        if step.close {
            c.connected = false;
        }
        let reply = step.reply;
        self.transmit(i, step.frames);
        reply
    }

    fn command(&mut self, i: usize, c: Command) -> Option<Reply> {
        let r = self.input(i, Input::Command(c));
        self.settle();
        r
    }

    fn settle(&mut self) {
        for _ in 0..10_000 {
            let Some(i) = self.clients.iter().position(|c| !c.queue.is_empty()) else {
                return;
            };
            let Some(f) = self.clients[i].queue.pop_front() else {
                continue;
            };
            self.input(i, Input::Frame(f));
        }
        panic!("network did not settle");
    }

    /// Advance time, firing every client's timers (and reconnecting it).
    fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now = (self.now + 250).min(end);
            for i in 0..self.clients.len() {
                if !self.clients[i].connected {
                    self.clients[i].connected = true;
                    self.input(i, Input::Connected);
                }
                self.input(i, Input::Tick);
            }
            self.settle();
        }
    }

    /// Reconnect client `i`: a fresh connection refreshes every list.
    fn reconnect(&mut self, i: usize) {
        self.clients[i].connected = false;
        self.clients[i].queue.clear();
        self.input(i, Input::Disconnected);
        self.clients[i].connected = true;
        self.input(i, Input::Connected);
        self.settle();
    }

    fn befriend(&mut self, a: usize, b: usize) -> ConversationId {
        let ca = self.clients[a].engine.contact_code();
        let cb = self.clients[b].engine.contact_code();
        let Some(Reply::Contact(conv)) = self.command(a, Command::AddContact { code: cb }) else {
            panic!("no contact");
        };
        self.command(b, Command::AddContact { code: ca });
        conv
    }

    fn send(&mut self, i: usize, conv: ConversationId, text: &str) {
        let r = self.command(
            i,
            Command::SendText {
                conversation: conv,
                text: text.into(),
            },
        );
        assert!(matches!(r, Some(Reply::Message(_))), "{r:?}");
    }

    fn messages(&self, i: usize) -> Vec<HistoryRecord> {
        self.clients[i]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Message(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
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
            !net.relay
                .sent
                .iter()
                .any(|&(s, r, c)| s == v_dev && r == a_dev && c == conv_vx),
            "round {round}: X's conversation was encrypted to A's device"
        );
        assert!(
            net.relay
                .sent
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
        !net.relay
            .sent
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
