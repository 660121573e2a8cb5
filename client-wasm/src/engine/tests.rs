//! Engine tests against hand-fed frames: a tiny in-memory relay written here
//! (no sockets, no clocks) with switches to drop, duplicate and reorder
//! envelopes, and drivers that follow the storage → frames → events contract.

use super::*;
use crate::storage::Storage;
use crate::storage::memory::MemoryStorage;
use hush_protocol::{
    AuthOk, ClientFrame, Delivered, DeviceRegistration, Envelope, OneTimePrekey, Page,
    PrekeyBundle, Request, Response, SendOutcome, ServerFrame, SignedDeviceList, SignedPrekey,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

const T0: u64 = 1_700_000_000_000;

#[derive(Default)]
struct FakeRelay {
    registered: BTreeMap<DeviceId, DeviceRegistration>,
    inbox: BTreeMap<DeviceId, BTreeMap<u64, Envelope>>,
    head: BTreeMap<DeviceId, u64>,
    dedup: BTreeSet<(DeviceId, DeviceId, MessageId)>,
    lists: BTreeMap<UserKey, SignedDeviceList>,
    signed: BTreeMap<DeviceId, SignedPrekey>,
    otks: BTreeMap<DeviceId, Vec<OneTimePrekey>>,
    /// Every envelope byte the relay ever stored.
    seen_bytes: Vec<Vec<u8>>,
    /// Drop the next N envelopes sent to this device (the relay loses them).
    lose_next: BTreeMap<DeviceId, usize>,
    /// Serve pulls from the acknowledged point, ignoring `after` (a relay
    /// that redelivers what it was not told is stored).
    redeliver_unacked: bool,
    /// Never answer device-list fetches (a relay that stalls).
    silent_list_fetches: bool,
    /// Answer these (asker, user) device-list fetches as if the user had none.
    hidden_lists: BTreeSet<(DeviceId, UserKey)>,
    /// Every device-list fetch: (who asked, for whom).
    list_fetches: Vec<(DeviceId, UserKey)>,
    /// Pulls answered so far; the ones whose index is listed here get a
    /// page of one envelope, whatever their limit (a short page).
    pulls_served: usize,
    short_pulls: BTreeSet<usize>,
    /// Assign relay seqs with holes of 0–2 (a relay whose seqs are not
    /// contiguous).
    seq_holes: bool,
    /// Attach this truncation notice to the next page served to the device
    /// (a hostile relay forging expiry reports).
    forged_truncation: Option<(DeviceId, hush_protocol::Truncation)>,
    /// Blobs: owner, declared size, committed bytes.
    pub(super) blobs: BTreeMap<hush_protocol::BlobId, (DeviceId, u64, Vec<u8>)>,
    /// Blob puts answered so far; a put whose index is listed here is
    /// dropped unanswered (a connection cut mid-upload).
    pub(super) blob_puts: usize,
    pub(super) lose_blob_puts: BTreeSet<usize>,
    /// The same for blob gets (a connection cut mid-download).
    pub(super) blob_gets: usize,
    pub(super) lose_blob_gets: BTreeSet<usize>,
    /// Refuse sends to these devices with `Quota` (their inbox is full).
    full_inboxes: BTreeSet<DeviceId>,
    /// Push early (docs/PROTOCOL.md §8.5): a stored envelope goes at once
    /// as `EarlyPush` to a recipient that asked for it, while its
    /// `Durable`, the sender's `Sent` and every other push wait for
    /// [`FakeRelay::sync`] (or are lost to [`FakeRelay::crash`]).
    early_pushes: bool,
    /// Devices whose connection asked for early pushes.
    early_asked: BTreeSet<DeviceId>,
    /// Stored but not synced yet: recipient, seq, dedup key.
    unsynced: Vec<(DeviceId, u64, (DeviceId, DeviceId, MessageId))>,
    /// Frames that go out once the sync is done.
    held_answers: Vec<(DeviceId, ServerFrame)>,
    /// Clear the important flag of envelopes before storing them (a relay
    /// downgrading a message's retention class).
    strip_important: bool,
    /// Devices whose lease the relay reports stale (true or not).
    pub(super) stale_devices: BTreeSet<DeviceId>,
    /// Leases for these devices are added to every answer (not in the list).
    pub(super) extra_leases: Vec<DeviceId>,
    /// Serve this list of the user to every fetch instead of the stored one
    /// (a relay hiding a newer list, e.g. a removal).
    pub(super) served_lists: BTreeMap<UserKey, SignedDeviceList>,
    /// (sender, recipient) streams the relay acknowledges but never
    /// delivers (a relay withholding everything one device sends another).
    pub(super) withheld_streams: BTreeSet<(DeviceId, DeviceId)>,
}

impl FakeRelay {
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
        if let Request::FetchDeviceLeases { user } = f.request {
            // Answered like FetchDeviceList, with a lease per device.
            let inner = ClientFrame {
                request_id: id,
                request: Request::FetchDeviceList { user },
            };
            return self
                .handle(who, inner)
                .into_iter()
                .map(|(to, frame)| match frame {
                    ServerFrame::Response {
                        request_id,
                        response: Response::DeviceList(list),
                    } => {
                        let mut leases: Vec<hush_protocol::DeviceLease> = list
                            .list
                            .devices
                            .iter()
                            .map(|e| hush_protocol::DeviceLease {
                                device: e.device,
                                last_seen_ms: T0,
                                stale: self.stale_devices.contains(&e.device),
                            })
                            .collect();
                        leases.extend(self.extra_leases.iter().map(|d| {
                            hush_protocol::DeviceLease {
                                device: *d,
                                last_seen_ms: T0,
                                stale: false,
                            }
                        }));
                        (
                            to,
                            ServerFrame::Response {
                                request_id,
                                response: Response::DeviceLeases { list, leases },
                            },
                        )
                    }
                    other => (to, other),
                })
                .collect();
        }
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
                    return vec![(
                        who,
                        ServerFrame::error(id, hush_protocol::ErrorCode::NoPrekeys, "none"),
                    )];
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
                    return vec![(
                        who,
                        ServerFrame::error(id, hush_protocol::ErrorCode::Forbidden, "stale"),
                    )];
                }
                let v = list.list.version;
                self.lists.insert(list.list.user, list);
                resp(Response::DeviceListPublished { version: v })
            }
            Request::FetchDeviceList { user } if self.silent_list_fetches => {
                self.list_fetches.push((who, user));
                Vec::new()
            }
            Request::FetchDeviceList { user } if self.hidden_lists.contains(&(who, user)) => {
                self.list_fetches.push((who, user));
                vec![(
                    who,
                    ServerFrame::error(id, hush_protocol::ErrorCode::UnknownDevice, "none"),
                )]
            }
            Request::FetchDeviceList { user } => match self
                .served_lists
                .get(&user)
                .or_else(|| self.lists.get(&user))
            {
                Some(l) => {
                    self.list_fetches.push((who, user));
                    resp(Response::DeviceList(l.clone()))
                }
                None => {
                    self.list_fetches.push((who, user));
                    vec![(
                        who,
                        ServerFrame::error(id, hush_protocol::ErrorCode::UnknownDevice, "none"),
                    )]
                }
            },
            Request::Send { envelopes } => {
                let mut outcomes = Vec::new();
                let mut pushes = Vec::new();
                for mut env in envelopes {
                    if self.strip_important {
                        env.header.important = false;
                    }
                    let h = env.header.clone();
                    if self.full_inboxes.contains(&h.recipient_device) {
                        outcomes.push(SendOutcome::Refused {
                            message_id: h.message_id,
                            recipient: h.recipient_device,
                            error: hush_protocol::WireError::new(
                                hush_protocol::ErrorCode::Quota,
                                "recipient inbox is full (messages)",
                            ),
                        });
                        continue;
                    }
                    self.seen_bytes.push(env.to_bytes().unwrap_or_default());
                    let key = (h.sender_device, h.recipient_device, h.message_id);
                    let seq = if self.dedup.contains(&key) {
                        0
                    } else {
                        self.dedup.insert(key);
                        let withheld = self
                            .withheld_streams
                            .contains(&(h.sender_device, h.recipient_device));
                        let lose = self
                            .lose_next
                            .get_mut(&h.recipient_device)
                            .filter(|n| **n > 0);
                        let head = self.head.entry(h.recipient_device).or_default();
                        *head += if self.seq_holes {
                            // Irregular holes of 0–2 seqs.
                            1 + ((*head).wrapping_mul(2_654_435_761) >> 7) % 3
                        } else {
                            1
                        };
                        let s = *head;
                        if let Some(n) = lose {
                            *n -= 1;
                        } else if withheld {
                        } else {
                            if self.early_pushes {
                                self.unsynced.push((h.recipient_device, s, key));
                            }
                            self.inbox
                                .entry(h.recipient_device)
                                .or_default()
                                .insert(s, env.clone());
                            pushes.push((
                                h.recipient_device,
                                Delivered {
                                    seq: s,
                                    envelope: env,
                                },
                            ));
                        }
                        s
                    };
                    outcomes.push(SendOutcome::Stored {
                        message_id: h.message_id,
                        recipient: h.recipient_device,
                        seq,
                        duplicate: seq == 0,
                    });
                }
                let mut out = resp(Response::Sent { outcomes });
                if self.early_pushes {
                    // Only early pushes leave before the sync.
                    self.held_answers.append(&mut out);
                    for (d, del) in pushes {
                        let envelopes = vec![del];
                        if self.early_asked.contains(&d) {
                            out.push((d, ServerFrame::EarlyPush { envelopes }));
                        } else {
                            self.held_answers.push((d, ServerFrame::Push { envelopes }));
                        }
                    }
                    return out;
                }
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
                if !self.redeliver_unacked {
                    self.ack(who, ack);
                }
                let inbox = self.inbox.entry(who).or_default();
                let from = if self.redeliver_unacked { 0 } else { after };
                let limit = if self.short_pulls.contains(&self.pulls_served) {
                    1
                } else {
                    usize::from(limit)
                };
                self.pulls_served += 1;
                let envelopes: Vec<Delivered> = inbox
                    .range(from + 1..)
                    .take(limit)
                    .map(|(s, e)| Delivered {
                        seq: *s,
                        envelope: e.clone(),
                    })
                    .collect();
                let last = envelopes.last().map_or(after, |d| d.seq);
                let remaining = inbox.range(last + 1..).count() as u64;
                let truncated = match self.forged_truncation.take() {
                    Some((d, t)) if d == who => Some(t),
                    other => {
                        self.forged_truncation = other;
                        None
                    }
                };
                resp(Response::Page(Page {
                    envelopes,
                    remaining,
                    truncated,
                }))
            }
            Request::Ack { up_to } => {
                self.ack(who, up_to);
                resp(Response::Acked { up_to })
            }
            Request::Ping => resp(Response::Pong { relay_time_ms: 0 }),
            Request::EarlyPushes => {
                self.early_asked.insert(who);
                resp(Response::EarlyPushes)
            }
            Request::FetchDeviceLeases { .. } => Vec::new(),
            Request::BlobPut {
                blob,
                offset,
                total_len,
                bytes,
            } => {
                let n = self.blob_puts;
                self.blob_puts += 1;
                if self.lose_blob_puts.contains(&n) {
                    return Vec::new();
                }
                let entry = self
                    .blobs
                    .entry(blob)
                    .or_insert_with(|| (who, total_len, Vec::new()));
                let committed = entry.2.len() as u64;
                if entry.0 != who || offset > committed {
                    return vec![(
                        who,
                        ServerFrame::error(id, hush_protocol::ErrorCode::Forbidden, "blob"),
                    )];
                }
                let skip = (committed - offset) as usize;
                entry
                    .2
                    .extend_from_slice(bytes.get(skip..).unwrap_or_default());
                let committed = entry.2.len() as u64;
                resp(Response::BlobStored { blob, committed })
            }
            Request::BlobStatus { blob } => match self.blobs.get(&blob) {
                Some((_, total_len, bytes)) => resp(Response::BlobState {
                    blob,
                    total_len: *total_len,
                    committed: bytes.len() as u64,
                    expires_at_ms: u64::MAX,
                }),
                None => vec![(
                    who,
                    ServerFrame::error(id, hush_protocol::ErrorCode::UnknownBlob, "no blob"),
                )],
            },
            Request::BlobGet { .. } if self.lose_blob_gets.contains(&self.blob_gets) => {
                self.blob_gets += 1;
                Vec::new()
            }
            Request::BlobGet { blob, offset, max } => match self.blobs.get(&blob) {
                Some((_, total_len, bytes)) if offset <= bytes.len() as u64 => {
                    self.blob_gets += 1;
                    let a = offset as usize;
                    let b = (a + max as usize).min(bytes.len());
                    resp(Response::BlobChunk {
                        blob,
                        offset,
                        total_len: *total_len,
                        committed: bytes.len() as u64,
                        bytes: bytes[a..b].to_vec(),
                    })
                }
                _ => vec![(
                    who,
                    ServerFrame::error(id, hush_protocol::ErrorCode::UnknownBlob, "no blob"),
                )],
            },
        }
    }

    /// The sync of everything stored since the last one is done: `Durable`
    /// to the devices pushed early, then the answers and pushes held.
    fn sync(&mut self) -> Vec<(DeviceId, ServerFrame)> {
        let mut heads: BTreeMap<DeviceId, u64> = BTreeMap::new();
        for (d, seq, _) in self.unsynced.drain(..) {
            let h = heads.entry(d).or_default();
            *h = (*h).max(seq);
        }
        let mut out: Vec<(DeviceId, ServerFrame)> = heads
            .into_iter()
            .filter(|(d, _)| self.early_asked.contains(d))
            .map(|(d, through)| (d, ServerFrame::Durable { through }))
            .collect();
        out.append(&mut self.held_answers);
        out
    }

    /// The relay dies before the sync: what was stored since the last one
    /// is gone (its seqs are given out again), and so are the answers held.
    fn crash(&mut self) {
        for (d, seq, key) in std::mem::take(&mut self.unsynced) {
            if let Some(inbox) = self.inbox.get_mut(&d) {
                inbox.remove(&seq);
            }
            let head = self.head.entry(d).or_default();
            *head = (*head).min(seq - 1);
            self.dedup.remove(&key);
        }
        self.held_answers.clear();
        self.early_asked.clear();
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
    /// Crash after the next step that stores something and acks.
    crash_after_storage: bool,
    /// Crash after the next step's early frames, before its storage.
    crash_after_early: bool,
    /// Every pull sent: (after, ack, sent as an early frame), and the pulls
    /// in flight.
    pulls: Vec<(u64, u64, bool)>,
    pulls_in_flight: BTreeSet<u32>,
    max_pulls_in_flight: usize,
    /// Sizes of the `s/out/…` records written (stream state of senders).
    out_record_sizes: Vec<usize>,
    /// Hold this many of its next `Send` frames in the network (they reach
    /// the relay at `release_held`, after anything sent meanwhile).
    hold_sends: usize,
    /// Kept offline: `advance` does not reconnect it (a device switched
    /// off), until `connect`.
    offline: bool,
    /// Every step handled: whether it was lazy, its events, its frames.
    steps: Vec<(bool, Vec<Event>, Vec<Request>)>,
}

/// The relay cursor durable in a store.
fn stored_cursor(s: &MemoryStorage) -> u64 {
    s.get(keys::CURSOR).unwrap().map_or(0, |v| {
        storage::decode::<Cursor>(keys::CURSOR, &v).unwrap().through
    })
}

struct Net {
    relay: FakeRelay,
    clients: Vec<Client>,
    now: u64,
    seed: u8,
    /// Configuration of engines created from here on.
    cfg: EngineConfig,
    /// Frames held in the network (`Client::hold_sends`): sender, frame.
    held: Vec<(usize, ClientFrame)>,
}

impl Net {
    fn new() -> Net {
        Net {
            relay: FakeRelay::default(),
            clients: Vec::new(),
            now: T0,
            seed: 1,
            cfg: Self::cfg(),
            held: Vec::new(),
        }
    }

    fn cfg() -> EngineConfig {
        EngineConfig::default()
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
            crash_after_storage: false,
            offline: false,
            crash_after_early: false,
            pulls: Vec::new(),
            pulls_in_flight: BTreeSet::new(),
            max_pulls_in_flight: 0,
            out_record_sizes: Vec::new(),
            hold_sends: 0,
            steps: Vec::new(),
        });
        self.clients.len() - 1
    }

    fn create(&mut self, name: &str) -> usize {
        self.seed += 1;
        let (e, s) =
            Engine::create(self.now, [self.seed; 32], "relay", name, self.cfg.clone()).unwrap();
        let i = self.add(e, s);
        self.connect(i);
        i
    }

    fn join(&mut self, inviter: usize) -> usize {
        let Some(Reply::LinkCode(text)) = self.command(inviter, Command::CreateLinkCode) else {
            panic!("no link code");
        };
        let code = LinkCode::parse(&text).unwrap();
        self.seed += 1;
        let (e, s) = Engine::join(self.now, [self.seed; 32], &code, self.cfg.clone()).unwrap();
        let i = self.add(e, s);
        self.connect(i);
        i
    }

    /// Hand frames of client `i` to the relay (if connected). Every
    /// acknowledgement must be covered by what the client's store holds.
    fn transmit(&mut self, i: usize, frames: Vec<ClientFrame>, early: bool) {
        let c = &mut self.clients[i];
        if !c.connected {
            return;
        }
        let durable = stored_cursor(&c.storage);
        for f in &frames {
            match f.request {
                Request::Pull { after, ack, .. } => {
                    assert!(ack <= durable, "pull acks {ack}, only {durable} is stored");
                    c.pulls.push((after, ack, early));
                    c.pulls_in_flight.insert(f.request_id);
                    c.max_pulls_in_flight = c.max_pulls_in_flight.max(c.pulls_in_flight.len());
                }
                Request::Ack { up_to } => {
                    assert!(up_to <= durable, "ack {up_to}, only {durable} is stored");
                }
                _ => {}
            }
        }
        let me = c.engine.device_id();
        for f in frames {
            let c = &mut self.clients[i];
            if c.hold_sends > 0 && matches!(f.request, Request::Send { .. }) {
                c.hold_sends -= 1;
                self.held.push((i, f));
                continue;
            }
            self.deliver_to_relay(me, f);
        }
    }

    /// The relay handles a frame from `me`; its answers and pushes go to
    /// the connected clients they are for.
    fn deliver_to_relay(&mut self, me: DeviceId, f: ClientFrame) {
        let frames = self.relay.handle(me, f);
        self.route(frames);
    }

    /// Queue the relay's frames for the connected clients they are for.
    fn route(&mut self, frames: Vec<(DeviceId, ServerFrame)>) {
        for (to, frame) in frames {
            if let Some(t) = self
                .clients
                .iter_mut()
                .find(|c| c.engine.device_id() == to && c.connected)
            {
                t.queue.push_back(frame);
            }
        }
    }

    /// The relay's sync is done: its `Durable`s, answers and pushes go out.
    fn relay_sync(&mut self) {
        let frames = self.relay.sync();
        self.route(frames);
        self.settle();
    }

    /// The relay dies before its sync and comes back: every connection
    /// ends.
    fn relay_crash(&mut self) {
        self.relay.crash();
        for i in 0..self.clients.len() {
            if self.clients[i].connected {
                self.disconnect(i);
            }
        }
    }

    /// Frames held in the network (`Client::hold_sends`) reach the relay
    /// now, in the order they were sent; then the network settles.
    fn release_held(&mut self) {
        for (i, f) in std::mem::take(&mut self.held) {
            if self.clients[i].connected {
                let me = self.clients[i].engine.device_id();
                self.deliver_to_relay(me, f);
            }
        }
        self.settle();
    }

    fn input(&mut self, i: usize, input: Input) -> Option<Reply> {
        if let Input::Frame(ServerFrame::Response { request_id, .. }) = &input {
            self.clients[i].pulls_in_flight.remove(request_id);
        }
        let mut step = self.clients[i].engine.handle(self.now, input).unwrap();
        self.clients[i].steps.push((
            step.is_lazy(),
            step.events.clone(),
            step.early_frames
                .iter()
                .chain(&step.frames)
                .map(|f| f.request.clone())
                .collect(),
        ));
        // Early frames leave before the step's storage is durable.
        let had_early = !step.early_frames.is_empty();
        self.transmit(i, std::mem::take(&mut step.early_frames), true);
        let c = &mut self.clients[i];
        if c.crash_after_early && had_early {
            // The process dies after the next page's pull, before storing.
            c.crash_after_early = false;
            let records = c.storage.load_state().unwrap();
            c.engine = Engine::load(records, [98; 32], self.cfg.clone()).unwrap();
            c.connected = false;
            c.queue.clear();
            c.pulls_in_flight.clear();
            return None;
        }
        c.out_record_sizes
            .extend(step.storage.iter().filter_map(|op| match op {
                StorageOp::Put { key, value } if key.starts_with(keys::OUT) => Some(value.len()),
                _ => None,
            }));
        c.storage.apply(&step.storage).unwrap();
        let stored_message = step.events.iter().any(|e| matches!(e, Event::Message(_)));
        if c.crash_after_storage && stored_message {
            // The process dies after the batch is durable, before any frame.
            c.crash_after_storage = false;
            let records = c.storage.load_state().unwrap();
            c.engine = Engine::load(records, [99; 32], self.cfg.clone()).unwrap();
            c.connected = false;
            c.queue.clear();
            c.pulls_in_flight.clear();
            return None;
        }
        c.events.extend(step.events);
        if step.close {
            c.connected = false;
        }
        if std::env::var("HUSH_TEST_TRACE").is_ok() {
            eprintln!(
                "{} c{i} frames {:?}",
                self.now - T0,
                step.frames
                    .iter()
                    .map(|f| format!("{:?}", f.request)
                        .chars()
                        .take(70)
                        .collect::<String>())
                    .collect::<Vec<_>>()
            );
        }
        let reply = step.reply;
        self.transmit(i, step.frames, false);
        reply
    }

    fn connect(&mut self, i: usize) {
        self.clients[i].offline = false;
        self.clients[i].connected = true;
        self.input(i, Input::Connected);
        self.settle();
    }

    fn disconnect(&mut self, i: usize) {
        self.clients[i].connected = false;
        self.clients[i].queue.clear();
        self.clients[i].pulls_in_flight.clear();
        self.input(i, Input::Disconnected);
    }

    /// Disconnect and keep offline until `connect`.
    fn switch_off(&mut self, i: usize) {
        self.disconnect(i);
        self.clients[i].offline = true;
    }

    fn command(&mut self, i: usize, c: Command) -> Option<Reply> {
        let r = self.input(i, Input::Command(c));
        self.settle();
        r
    }

    /// Deliver queued frames until nothing moves.
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

    /// Advance time, firing every client's timers along the way.
    fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now = (self.now + 250).min(end);
            for i in 0..self.clients.len() {
                if self.clients[i].offline {
                    continue;
                }
                if !self.clients[i].connected {
                    self.clients[i].connected = true;
                    self.input(i, Input::Connected);
                }
                self.input(i, Input::Tick);
            }
            self.settle();
        }
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

    fn befriend(&mut self, a: usize, b: usize) -> ConversationId {
        let ca = self.clients[a].engine.contact_code();
        let cb = self.clients[b].engine.contact_code();
        let Some(Reply::Contact(conv)) = self.command(a, Command::AddContact { code: cb }) else {
            panic!("no contact");
        };
        self.command(b, Command::AddContact { code: ca });
        conv
    }

    fn send(&mut self, i: usize, conv: ConversationId, text: &str) -> MessageId {
        let Some(Reply::Message(id)) = self.command(
            i,
            Command::SendText {
                conversation: conv,
                text: text.into(),
            },
        ) else {
            panic!("no id");
        };
        id
    }
}

#[test]
fn first_connection_registers_then_publishes_and_pulls() {
    let (mut e, step) = Engine::create(T0, [1; 32], "relay", "a", EngineConfig::default()).unwrap();
    assert!(
        !step.storage.is_empty(),
        "identity is stored before anything else"
    );
    assert_eq!(step.connect_at, Some(0));
    let s = e.handle(T0, Input::Connected).unwrap();
    assert!(matches!(s.frames[0].request, Request::Hello { .. }));
    let s = e
        .handle(
            T0,
            Input::Frame(ServerFrame::Response {
                request_id: s.frames[0].request_id,
                response: Response::Challenge { challenge: [5; 32] },
            }),
        )
        .unwrap();
    let Request::Register { registration, .. } = &s.frames[0].request else {
        panic!("expected Register, got {:?}", s.frames[0].request);
    };
    assert_eq!(registration.device, e.device_id());
    let s = e
        .handle(
            T0,
            Input::Frame(ServerFrame::Response {
                request_id: s.frames[0].request_id,
                response: Response::Authenticated(AuthOk {
                    device: e.device_id(),
                    inbox_head: 0,
                    acked: 0,
                    one_time_prekeys_left: 0,
                    relay_time_ms: 0,
                }),
            }),
        )
        .unwrap();
    let kinds: Vec<&Request> = s.frames.iter().map(|f| &f.request).collect();
    assert!(kinds.iter().any(|r| matches!(r, Request::PublishPrekeys { one_time_prekeys, .. } if !one_time_prekeys.is_empty())));
    assert!(
        kinds
            .iter()
            .any(|r| matches!(r, Request::PublishDeviceList { .. }))
    );
    assert!(
        kinds
            .iter()
            .any(|r| matches!(r, Request::Pull { after: 0, .. }))
    );
    assert_eq!(e.connection_state(), ConnectionState::Syncing);
}

#[test]
fn message_reaches_both_users_devices_once_and_relay_sees_no_plaintext() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let b2 = net.join(b);
    net.advance(2_000);
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let id = net.send(a, conv, "hush-unit-secret-1");
    net.advance(3_000);
    for r in [b, b2] {
        let got = net.messages(r);
        assert_eq!(
            got.len(),
            1,
            "device {r} got {got:?}: {:#?}",
            net.clients[r].events
        );
        assert_eq!(got[0].id, id);
        assert_eq!(got[0].text, "hush-unit-secret-1");
        assert_eq!(got[0].sender_seq, 1);
    }
    assert!(net.clients[a].events.iter().any(|e| matches!(
        e,
        Event::MessageState {
            state: MessageState::Delivered,
            ..
        }
    )));
    let marker = b"hush-unit-secret";
    assert!(!net.relay.seen_bytes.is_empty());
    assert!(
        net.relay
            .seen_bytes
            .iter()
            .all(|b| !b.windows(marker.len()).any(|w| w == marker))
    );
    // The app reads history from storage, not from the engine.
    let h = crate::storage::history(&net.clients[b].storage, &conv, None, 10).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].record.text, "hush-unit-secret-1");
}

#[test]
fn crash_after_storing_before_ack_redelivers_and_dedups() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.clients[b].crash_after_storage = true;
    net.relay.redeliver_unacked = true;
    let id = net.send(a, conv, "once");
    // Bob stored the message, then died before acknowledging or showing it.
    assert_eq!(net.messages(b).len(), 0);
    net.advance(5_000);
    let got: Vec<MessageId> = net.messages(b).iter().map(|r| r.id).collect();
    assert!(got.len() <= 1, "shown twice: {got:?}");
    let h = crate::storage::history(&net.clients[b].storage, &conv, None, 10).unwrap();
    assert_eq!(h.iter().filter(|e| e.record.id == id).count(), 1);
    assert!(
        net.clients[b].engine.counters().duplicates_dropped >= 1,
        "the redelivery was recognised"
    );
}

#[test]
fn lost_message_is_requested_and_resent_in_order() {
    let (mut net, a, b, conv) = alice_and_bob(Net::new());
    let bd = net.clients[b].engine.device_id();
    net.relay.lose_next.insert(bd, 1);
    let m1 = net.send(a, conv, "one");
    let m2 = net.send(a, conv, "two");
    net.advance(1_000);
    // Two arrived, one is missing: nothing is shown out of order.
    assert!(net.messages(b).is_empty());
    assert_eq!(net.clients[b].engine.counters().out_of_order, 1);
    net.advance(10_000);
    let got: Vec<MessageId> = net.messages(b).iter().map(|r| r.id).collect();
    assert_eq!(got, vec![m1, m2]);
    let c = net.clients[b].engine.counters();
    assert_eq!((c.gaps_detected, c.recovered), (1, 1));
    assert!(
        net.clients[b]
            .events
            .iter()
            .any(|e| matches!(e, Event::GapDetected { count: 1, .. }))
    );
    assert!(
        net.clients[b]
            .events
            .iter()
            .any(|e| matches!(e, Event::GapRecovered { .. }))
    );
}

#[test]
fn lost_tail_is_recovered_by_the_senders_probe() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.relay
        .lose_next
        .insert(net.clients[b].engine.device_id(), 1);
    let m = net.send(a, conv, "last words");
    net.advance(5_000);
    assert!(
        net.messages(b).is_empty(),
        "nothing after it reveals the loss"
    );
    net.advance(60_000);
    assert_eq!(
        net.messages(b).iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![m]
    );
    assert!(net.clients[a].engine.counters().probes >= 1);
}

#[test]
fn unavailable_messages_are_reported_and_skipped() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.relay
        .lose_next
        .insert(net.clients[b].engine.device_id(), 1);
    let _lost = net.send(a, conv, "gone");
    // The sender forgets it (its outbox expired) before anyone asks.
    let gone: Vec<MessageId> = net.clients[a].engine.outbox_ids();
    for id in gone {
        net.clients[a].engine.outbox.remove(&id);
    }
    let m2 = net.send(a, conv, "after");
    net.advance(10_000);
    let got: Vec<MessageId> = net.messages(b).iter().map(|r| r.id).collect();
    assert_eq!(got, vec![m2], "the stream moves on past the hole");
    assert!(
        net.clients[b]
            .events
            .iter()
            .any(|e| matches!(e, Event::Unrecoverable { count: 1, .. }))
    );
    assert_eq!(net.clients[b].engine.counters().unrecoverable, 1);
}

#[test]
fn read_and_delete_sync_to_other_devices_and_read_reaches_sender() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let b2 = net.join(b);
    net.advance(2_000);
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let m = net.send(a, conv, "read me");
    net.advance(2_000);
    let ad = net.clients[a].engine.device_id();
    net.command(
        b,
        Command::MarkRead {
            conversation: conv,
            messages: vec![(m, ad)],
        },
    );
    net.advance(3_000);
    assert!(
        net.clients[b2]
            .events
            .iter()
            .any(|e| matches!(e, Event::ReadSynced { ids, .. } if ids == &vec![m]))
    );
    assert!(net.clients[a].events.iter().any(
        |e| matches!(e, Event::MessageState { id, state: MessageState::Read, .. } if *id == m)
    ));
    net.command(
        b2,
        Command::Delete {
            conversation: conv,
            ids: vec![m],
        },
    );
    net.advance(3_000);
    for r in [b, b2] {
        assert!(
            crate::storage::history(&net.clients[r].storage, &conv, None, 10)
                .unwrap()
                .is_empty()
        );
        assert!(
            crate::storage::tombstone(&net.clients[r].storage, &m)
                .unwrap()
                .is_some()
        );
    }
    // Alice still has her message.
    assert_eq!(
        crate::storage::history(&net.clients[a].storage, &conv, None, 10)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn recall_arriving_before_its_target_hides_the_target() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    // Bob's engine learns of the recall first (e.g. from Alice's other device).
    let target = MessageId::new(T0, [7; 10]);
    let ad = net.clients[a].engine.device_id();
    let au = net.clients[a].engine.user_key();
    net.clients[b]
        .engine
        .apply_recall(net.now, conv, au, target);
    let payload = crate::payload::Payload {
        id: target,
        body: crate::payload::Body::Text {
            text: "oops".into(),
            sent_at_ms: T0,
        },
    };
    net.clients[b]
        .engine
        .deliver_chat(net.now, ad, au, conv, 1, payload)
        .unwrap();
    assert!(
        !net.clients[b]
            .engine
            .step
            .events
            .iter()
            .any(|e| matches!(e, Event::Message(_)))
    );
    assert_eq!(net.clients[b].engine.counters().suppressed, 1);
}

#[test]
fn offline_sends_fail_after_deadline_and_retry_keeps_the_id() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.disconnect(a);
    let id = {
        let r = net.clients[a]
            .engine
            .handle(
                net.now,
                Input::Command(Command::SendText {
                    conversation: conv,
                    text: "x".into(),
                }),
            )
            .unwrap();
        net.clients[a].storage.apply(&r.storage).unwrap();
        let Some(Reply::Message(id)) = r.reply else {
            panic!()
        };
        id
    };
    net.now += 6 * 60 * 1000;
    let s = net.clients[a].engine.handle(net.now, Input::Tick).unwrap();
    assert!(s.events.iter().any(|e| matches!(
        e,
        Event::MessageState {
            state: MessageState::Failed,
            ..
        }
    )));
    assert_eq!(
        net.clients[a].engine.message_state(&id),
        Some(MessageState::Failed)
    );
    assert!(matches!(
        net.clients[a].engine.handle(
            net.now,
            Input::Command(Command::Retry {
                id: MessageId([1; 16])
            })
        ),
        Err(ClientError::Unknown(_))
    ));
    net.clients[a].connected = true;
    net.input(a, Input::Connected);
    net.settle();
    net.command(a, Command::Retry { id });
    net.advance(5_000);
    assert_eq!(
        net.messages(b).iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![id]
    );
    assert_eq!(
        net.clients[a].engine.message_state(&id),
        Some(MessageState::Delivered)
    );
}

#[test]
fn reconnect_backoff_grows_with_jitter_and_caps() {
    let (mut e, _) = Engine::create(T0, [3; 32], "relay", "a", EngineConfig::default()).unwrap();
    let mut delays = Vec::new();
    let mut now = T0;
    for _ in 0..8 {
        let s = e.handle(now, Input::Disconnected).unwrap();
        let at = s.connect_at.unwrap();
        delays.push(at - now);
        now = at;
    }
    assert!(delays[0] >= 800 && delays[0] <= 1_200, "{delays:?}");
    assert!(delays[2] >= 3_200 && delays[2] <= 4_800, "{delays:?}");
    assert!(delays.iter().all(|d| *d <= 36_000), "{delays:?}");
    assert!(delays[7] >= 24_000, "{delays:?}");
}

#[test]
fn corrupt_storage_is_a_typed_error() {
    let (_, step) = Engine::create(T0, [3; 32], "relay", "a", EngineConfig::default()).unwrap();
    let mut s = MemoryStorage::new();
    s.apply(&step.storage).unwrap();
    s.apply(&[StorageOp::Put {
        key: keys::CURSOR.to_vec(),
        value: vec![1, 0xff, 0xff],
    }])
    .unwrap();
    let r = Engine::load(s.load_state().unwrap(), [1; 32], EngineConfig::default());
    assert!(matches!(
        r,
        Err(ClientError::Storage(crate::StorageError::Corrupt { .. }))
    ));
    assert!(matches!(
        Engine::load(Vec::new(), [1; 32], EngineConfig::default()),
        Err(ClientError::NoDevice)
    ));
}

#[test]
fn debug_output_never_shows_secrets() {
    let (e, _) = Engine::create(T0, [3; 32], "relay", "a", EngineConfig::default()).unwrap();
    let key = hex::encode(e.device.at_rest.0);
    let dump = format!("{:?} {:?}", e.device, e);
    assert!(!dump.contains(&key));
    assert!(dump.contains("redacted"));
}

/// Fetches of `user`'s list made by device `who` so far.
fn list_fetches(net: &Net, who: usize, user: &UserKey) -> usize {
    let d = net.clients[who].engine.device_id();
    net.relay
        .list_fetches
        .iter()
        .filter(|(w, u)| *w == d && u == user)
        .count()
}

#[test]
fn contact_added_before_the_peer_registered_is_retried_and_messages_flow() {
    let mut net = Net::new();
    let a = net.create("alice");
    net.advance(2_000);
    // Bob's device exists, but has not reached the relay yet.
    net.seed += 1;
    let (bob, bob_step) =
        Engine::create(net.now, [net.seed; 32], "relay", "bob", Net::cfg()).unwrap();
    let bob_code = bob.contact_code();
    let Some(Reply::Contact(conv)) = net.command(
        a,
        Command::AddContact {
            code: bob_code.clone(),
        },
    ) else {
        panic!("no contact");
    };
    assert!(net.clients[a].engine.devices_of(&bob_code.user).is_empty());
    let early = net.send(a, conv, "sent before bob registered");
    // Far past the send deadline: waiting for the contact's first device is
    // not a relay failure, and the message is never fanned out to nobody.
    net.advance(10 * 60 * 1000);
    assert_eq!(
        net.clients[a].engine.message_state(&early),
        Some(MessageState::Sending)
    );
    let asked = list_fetches(&net, a, &bob_code.user);
    // Retried with backoff (1 s doubling to 60 s): neither cached as empty
    // nor asked on every tick.
    assert!((6..=30).contains(&asked), "{asked} fetches in 10 minutes");

    let b = net.add(bob, bob_step);
    net.connect(b);
    let alice_code = net.clients[a].engine.contact_code();
    net.command(b, Command::AddContact { code: alice_code });
    let hi = net.send(b, conv, "hi alice");
    // No time passes and Alice does not reconnect: the envelope from the
    // unknown device made her fetch Bob's list and process it at once.
    let got: Vec<MessageId> = net.messages(a).iter().map(|r| r.id).collect();
    assert_eq!(got, vec![hi]);
    assert_eq!(net.clients[a].engine.devices_of(&bob_code.user).len(), 1);
    assert!(net.clients[a].engine.parked.is_empty());
    let h = crate::storage::history(&net.clients[a].storage, &conv, None, 10).unwrap();
    assert!(h.iter().any(|e| e.record.id == hi));
    // Alice's early message fans out now that Bob has a device.
    net.advance(3_000);
    let got: Vec<MessageId> = net.messages(b).iter().map(|r| r.id).collect();
    assert_eq!(got, vec![early]);
    assert_eq!(
        net.clients[a].engine.message_state(&early),
        Some(MessageState::Delivered)
    );
}

#[test]
fn parked_envelope_is_stored_before_its_ack_and_survives_a_crash() {
    let mut net = Net::new();
    let a = net.create("alice");
    net.advance(2_000);
    net.seed += 1;
    let (bob, bob_step) =
        Engine::create(net.now, [net.seed; 32], "relay", "bob", Net::cfg()).unwrap();
    let bob_user = bob.user_key();
    let Some(Reply::Contact(conv)) = net.command(
        a,
        Command::AddContact {
            code: bob.contact_code(),
        },
    ) else {
        panic!("no contact");
    };
    // The relay will not show Alice Bob's list for now.
    let ad = net.clients[a].engine.device_id();
    net.relay.hidden_lists.insert((ad, bob_user));
    let b = net.add(bob, bob_step);
    net.connect(b);
    let alice_code = net.clients[a].engine.contact_code();
    net.command(b, Command::AddContact { code: alice_code });
    let hi = net.send(b, conv, "parked for a while");
    net.advance(1_000);
    assert!(net.messages(a).is_empty());
    // Acknowledged to the relay (its copy is gone)…
    assert!(net.relay.inbox.get(&ad).is_none_or(|i| i.is_empty()));
    // …and therefore durably parked first.
    let stored = net.clients[a].storage.load_state().unwrap();
    assert_eq!(
        stored
            .iter()
            .filter(|(k, _)| k.starts_with(keys::PARKED))
            .count(),
        1
    );
    // Alice crashes; her rebuilt engine shows the message once the list is
    // served.
    let records = net.clients[a].storage.load_state().unwrap();
    net.clients[a].engine = Engine::load(records, [77; 32], Net::cfg()).unwrap();
    net.clients[a].connected = false;
    net.clients[a].queue.clear();
    net.relay.hidden_lists.clear();
    net.advance(2_000);
    let got: Vec<MessageId> = net.messages(a).iter().map(|r| r.id).collect();
    assert_eq!(got, vec![hi]);
}

#[test]
fn unknown_sender_refreshes_lists_soon_even_after_a_refresh_just_ran() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let bob_user = net.clients[b].engine.user_key();
    // Bob links a device; Alice's cached list does not have it yet, and the
    // relay's answer to her first refresh is stale.
    let ad = net.clients[a].engine.device_id();
    net.relay.hidden_lists.insert((ad, bob_user));
    let b2 = net.join(b);
    net.advance(2_000);
    let hi = net.send(b2, conv, "from the new device");
    assert!(net.messages(a).is_empty());
    net.relay.hidden_lists.clear();
    // A follow-up within seconds, not the half-minute parked timer.
    net.advance(6_000);
    let got: Vec<MessageId> = net.messages(a).iter().map(|r| r.id).collect();
    assert_eq!(got, vec![hi]);
}

#[test]
fn sender_refreshes_a_stale_list_before_fan_out_and_reaches_a_new_device() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let m1 = net.send(a, conv, "one");
    net.advance(2_000);
    // Bob links a device that never writes to Alice.
    let b2 = net.join(b);
    net.advance(40_000);
    assert_eq!(
        net.clients[a]
            .engine
            .devices_of(&net.clients[b].engine.user_key())
            .len(),
        1
    );
    let m2 = net.send(a, conv, "two");
    net.advance(3_000);
    let at_b: Vec<MessageId> = net.messages(b).iter().map(|r| r.id).collect();
    assert_eq!(at_b, vec![m1, m2]);
    // The new device gets what was sent after Alice learned of it.
    let at_b2: Vec<MessageId> = net.messages(b2).iter().map(|r| r.id).collect();
    assert_eq!(at_b2, vec![m2]);
    assert_eq!(
        net.clients[a]
            .engine
            .devices_of(&net.clients[b].engine.user_key())
            .len(),
        2
    );
}

#[test]
fn fan_out_waits_for_a_list_refresh_but_not_forever() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(40_000);
    net.relay.silent_list_fetches = true;
    let bob_user = net.clients[b].engine.user_key();
    let before = list_fetches(&net, a, &bob_user);
    let id = net.send(a, conv, "held briefly");
    assert_eq!(list_fetches(&net, a, &bob_user), before + 1);
    net.advance(2_000);
    assert!(
        net.messages(b).is_empty(),
        "sent before the refresh answered"
    );
    net.advance(5_000);
    let got: Vec<MessageId> = net.messages(b).iter().map(|r| r.id).collect();
    assert_eq!(got, vec![id]);
}

#[test]
fn reconnect_refreshes_every_device_list() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    net.befriend(a, b);
    net.advance(2_000);
    let bob_user = net.clients[b].engine.user_key();
    let alice_user = net.clients[a].engine.user_key();
    let (theirs, mine) = (
        list_fetches(&net, a, &bob_user),
        list_fetches(&net, a, &alice_user),
    );
    net.disconnect(a);
    net.clients[a].connected = true;
    net.input(a, Input::Connected);
    net.settle();
    assert_eq!(list_fetches(&net, a, &bob_user), theirs + 1);
    assert_eq!(list_fetches(&net, a, &alice_user), mine + 1);
}

/// A backlog read in small pages: each page's arrival sends the next pulls
/// as early frames, acknowledging only what earlier steps stored.
fn pipelined_catch_up(crash_after_early: bool) {
    let mut net = Net::new();
    net.cfg.page_limit = 2;
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.disconnect(b);
    let texts: Vec<String> = (0..9).map(|n| format!("m{n}")).collect();
    for t in &texts {
        net.send(a, conv, t);
    }
    // (No `advance`: it would reconnect bob.)
    net.settle();
    net.clients[b].pulls.clear();
    net.clients[b].crash_after_early = crash_after_early;
    net.clients[b].connected = true;
    net.input(b, Input::Connected);
    net.settle();
    net.advance(5_000);
    let c = &net.clients[b];
    assert!(!c.crash_after_early, "the crash was never injected");
    let early: Vec<&(u64, u64, bool)> = c.pulls.iter().filter(|p| p.2).collect();
    assert!(
        early.len() >= 3,
        "the backlog was not read in pipelined pages: {:?}",
        c.pulls
    );
    // The next page is asked for before this one is acknowledged.
    assert!(early.iter().all(|(after, ack, _)| ack < after), "{early:?}");
    assert!(
        (2..=3).contains(&c.max_pulls_in_flight),
        "pulls in flight: {}",
        c.max_pulls_in_flight
    );
    let got: Vec<String> = net.messages(b).into_iter().map(|r| r.text).collect();
    assert_eq!(got, texts, "every message once, in order");
    // Everything is acknowledged in the end.
    assert!(
        net.relay
            .inbox
            .get(&c.engine.device_id())
            .is_none_or(|i| i.is_empty())
    );
}

#[test]
fn backlog_pages_are_pipelined_and_acked_only_once_stored() {
    pipelined_catch_up(false);
}

#[test]
fn crash_between_the_next_pull_and_the_commit_loses_nothing() {
    pipelined_catch_up(true);
}

#[test]
fn sealing_cost_does_not_grow_with_the_unreceipted_backlog() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.disconnect(b);
    net.clients[a].out_record_sizes.clear();
    for n in 0..300 {
        net.send(a, conv, &format!("m{n}"));
    }
    net.settle();
    let sizes = &net.clients[a].out_record_sizes;
    assert!(sizes.len() >= 300, "{}", sizes.len());
    // The stream record does not list the 300 unreceipted messages.
    let largest = sizes.iter().copied().max().unwrap_or(0);
    assert!(largest < 64, "stream record of {largest} bytes");
    // The index of unreceipted items (for re-sends and probes) is rebuilt
    // from the outbox after a restart.
    let sent = |e: &Engine| -> usize { e.out_streams.values().map(|s| s.sent.len()).sum() };
    let before = sent(&net.clients[a].engine);
    assert!(before >= 300);
    let records = net.clients[a].storage.load_state().unwrap();
    let again = Engine::load(records, [5; 32], Net::cfg()).unwrap();
    assert_eq!(sent(&again), before);
    // And bob, back online, still gets everything.
    net.clients[b].connected = true;
    net.input(b, Input::Connected);
    net.settle();
    net.advance(5_000);
    assert_eq!(net.messages(b).len(), 300);
}

/// Bob, offline, gets `n` messages from alice in pages of `page_limit`;
/// `tweak` sets up the relay before he reconnects. Returns the net, bob's
/// index and the texts sent.
fn offline_backlog(
    n: usize,
    page_limit: u16,
    pull_depth: u16,
    tweak: impl FnOnce(&mut FakeRelay),
) -> (Net, usize, Vec<String>) {
    let mut net = Net::new();
    net.cfg.page_limit = page_limit;
    net.cfg.pull_depth = pull_depth;
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.disconnect(b);
    tweak(&mut net.relay);
    let texts: Vec<String> = (0..n).map(|k| format!("m{k}")).collect();
    for t in &texts {
        net.send(a, conv, t);
    }
    net.settle();
    net.clients[b].pulls.clear();
    net.clients[b].max_pulls_in_flight = 0;
    net.relay.pulls_served = 0;
    net.clients[b].connected = true;
    net.input(b, Input::Connected);
    net.settle();
    (net, b, texts)
}

/// Every text arrived exactly once, in order, and bob acknowledged all.
fn assert_all_once(net: &Net, b: usize, texts: &[String]) {
    let got: Vec<String> = net.messages(b).into_iter().map(|r| r.text).collect();
    assert_eq!(got, texts, "every message once, in order");
    let stored = crate::storage::history(
        &net.clients[b].storage,
        &net.clients[b]
            .engine
            .conversations
            .keys()
            .next()
            .copied()
            .unwrap(),
        None,
        texts.len() + 10,
    )
    .unwrap();
    assert_eq!(stored.len(), texts.len(), "history holds each message once");
    // Nothing was skipped at the relay-seq layer: no sender seq went
    // missing, so no re-send was needed to complete the history.
    let counters = net.clients[b].engine.counters();
    assert_eq!(counters.gaps_detected, 0, "{counters:?}");
    assert_eq!(counters.recovered, 0, "{counters:?}");
    let me = net.clients[b].engine.device_id();
    assert!(net.relay.inbox.get(&me).is_none_or(|i| i.is_empty()));
    assert_eq!(
        net.clients[b].engine.connection_state(),
        ConnectionState::Live
    );
}

#[test]
fn pipelined_pulls_with_a_short_page_in_the_middle_lose_nothing() {
    // Pages of 3, depth 3: the second pull served is answered with one
    // envelope, so the pulls sent after it asked for seqs beyond the cursor.
    let (mut net, b, texts) = offline_backlog(20, 3, 3, |r| {
        r.short_pulls = [1, 5].into_iter().collect();
    });
    net.advance(5_000);
    assert_all_once(&net, b, &texts);
    let link = &net.clients[b].engine.link;
    assert!(link.stale_pages >= 1, "no page was dropped");
    // Each pull starts at or below what the previous pages delivered: the
    // cursor never passed a seq that no page covered.
    let c = &net.clients[b];
    assert!(c.max_pulls_in_flight >= 2, "{:?}", c.pulls);
}

#[test]
fn non_contiguous_relay_seqs_still_yield_every_envelope_once() {
    let mut stale = 0;
    for depth in [1, 2, 3, 4] {
        // Holes in the seqs make the pipelined pulls overlap (pages that
        // repeat envelopes); two short pages make later ones start beyond
        // the cursor.
        let (mut net, b, texts) = offline_backlog(30, 4, depth, |r| {
            r.seq_holes = true;
            r.short_pulls = [2, 6].into_iter().collect();
        });
        net.advance(5_000);
        assert_all_once(&net, b, &texts);
        let e = &net.clients[b].engine;
        let head = net.relay.head[&e.device_id()];
        assert!(head > 40, "seqs had no holes: head {head}");
        assert_eq!(e.cursor.through, head);
        if depth > 1 {
            assert!(e.counters().duplicates_dropped > 0, "no page overlapped");
        }
        stale += e.link.stale_pages;
    }
    assert!(stale > 0, "no page started beyond the cursor");
}

#[test]
fn pulls_in_flight_are_bounded_by_the_depth() {
    for depth in [1u16, 2, 3, 5] {
        let (mut net, b, texts) = offline_backlog(40, 2, depth, |_| {});
        net.advance(5_000);
        assert_all_once(&net, b, &texts);
        let c = &net.clients[b];
        assert_eq!(
            c.max_pulls_in_flight,
            usize::from(depth),
            "depth {depth}: {:?}",
            c.pulls
        );
        assert_eq!(c.engine.link.max_pulls_in_flight, usize::from(depth));
        // No pull beyond the backlog: 40 envelopes (plus control items) in
        // pages of 2, nothing asked twice.
        let mut afters: Vec<u64> = c.pulls.iter().map(|p| p.0).collect();
        let n = afters.len();
        afters.dedup();
        assert_eq!(afters.len(), n, "a range was pulled twice: {:?}", c.pulls);
        assert_eq!(c.engine.link.stale_pages, 0);
    }
}

fn ids(net: &Net, i: usize) -> Vec<MessageId> {
    net.messages(i).iter().map(|r| r.id).collect()
}

/// A hostile relay claims 10,000 of Alice's future sender seqs "expired":
/// Bob must not expect them, ask Alice for them, accept her "unavailable"
/// and then drop her next messages as duplicates.
#[test]
fn forged_expiry_of_future_seqs_does_not_swallow_the_contacts_next_messages() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let m1 = net.send(a, conv, "one");
    net.advance(2_000);
    assert_eq!(ids(&net, b), vec![m1]);
    let ad = net.clients[a].engine.device_id();
    let bd = net.clients[b].engine.device_id();
    net.relay.forged_truncation = Some((
        bd,
        hush_protocol::Truncation {
            oldest_retained: 1,
            dropped_count: 10_000,
            dropped: vec![hush_protocol::DroppedRange {
                sender: ad,
                conversation: conv,
                first_seq: 2,
                last_seq: 10_001,
            }],
        },
    ));
    // Bob reconnects; the forged notice comes with his first page.
    net.disconnect(b);
    net.advance(120_000);
    assert!(
        net.relay.forged_truncation.is_none(),
        "the notice was served"
    );
    let m2 = net.send(a, conv, "two");
    let m3 = net.send(a, conv, "three");
    net.advance(2_000);
    assert_eq!(ids(&net, b), vec![m1, m2, m3]);
    assert_eq!(net.clients[b].engine.counters().unrecoverable, 0);
    assert_eq!(
        net.clients[b].engine.counters().relay_claims_ignored,
        10_000
    );
    // Bob asked Alice for them; her authenticated "not yet sent" proves the
    // relay's claim false, and Bob reports it as misbehaviour.
    assert_eq!(
        net.clients[b].engine.counters().relay_claims_refuted,
        10_000
    );
    let reports: Vec<_> = net.clients[b]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::RelayMisbehaviour {
                conversation,
                from_device,
                count,
            } => Some((*conversation, *from_device, *count)),
            _ => None,
        })
        .collect();
    assert_eq!(reports, vec![(conv, ad, 10_000)]);
}

/// A hostile contact answers "unavailable" for seqs it has not written yet:
/// its later messages with those seqs still show.
#[test]
fn contact_declaring_future_seqs_unavailable_cannot_swallow_its_later_messages() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let m1 = net.send(a, conv, "one");
    net.advance(2_000);
    let bd = net.clients[b].engine.device_id();
    let now = net.now;
    net.clients[a]
        .engine
        .queue_control(
            now,
            bd,
            crate::payload::Body::ResendUnavailable {
                conversation: conv,
                seqs: vec![crate::payload::SeqRange {
                    first: 1,
                    last: 10_000,
                }],
            },
        )
        .unwrap();
    net.advance(2_000);
    assert_eq!(net.clients[b].engine.counters().peer_claims_ignored, 9_999);
    let m2 = net.send(a, conv, "two");
    net.advance(2_000);
    assert_eq!(ids(&net, b), vec![m1, m2]);
    assert_eq!(net.clients[b].engine.counters().unrecoverable, 0);
}

/// A hostile contact asks for seqs this device never sent: it gets no
/// "unavailable" for them (which an honest peer would act on).
#[test]
fn resend_request_for_unsent_seqs_is_not_answered_unavailable() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let m1 = net.send(a, conv, "one");
    net.advance(2_000);
    assert_eq!(ids(&net, b), vec![m1]);
    let ad = net.clients[a].engine.device_id();
    let now = net.now;
    net.clients[b]
        .engine
        .queue_control(
            now,
            ad,
            crate::payload::Body::ResendRequest {
                conversation: conv,
                seqs: vec![crate::payload::SeqRange {
                    first: 2,
                    last: 5_000,
                }],
            },
        )
        .unwrap();
    net.advance(2_000);
    // Nothing was declared unavailable to Bob (he would count it).
    assert_eq!(net.clients[b].engine.counters().peer_claims_ignored, 0);
    assert_eq!(net.clients[a].engine.counters().peer_claims_ignored, 4_999);
    let m2 = net.send(a, conv, "two");
    net.advance(2_000);
    assert_eq!(ids(&net, b), vec![m1, m2]);
}

/// Records and value bytes under `s/parked/` in a client's store.
fn parked_storage(net: &Net, i: usize) -> (usize, usize) {
    let rows = net.clients[i].storage.scan_prefix(keys::PARKED).unwrap();
    (rows.len(), rows.iter().map(|(_, v)| v.len()).sum())
}

impl Net {
    /// A device that is no client here hands envelopes to the relay (a
    /// stranger writing straight to the relay).
    fn inject(&mut self, from: DeviceId, envelopes: Vec<Envelope>) {
        let frame = ClientFrame {
            request_id: 1,
            request: Request::Send { envelopes },
        };
        let frames = self.relay.handle(from, frame);
        self.route(frames);
        self.settle();
    }
}

/// A stranger floods the victim with 5,000 envelopes, from one device and
/// from 250 more: what the victim parks stays within the bounds (records and
/// bytes), its device-list fetches stay at the bounded rate, and its real
/// contact's messages still arrive.
#[test]
fn stranger_flood_is_parked_within_bounds_and_lists_are_not_refetched_per_envelope() {
    let mut net = Net::new();
    let v = net.create("victim");
    let a = net.create("alice");
    let m = net.create("mallory");
    let conv = net.befriend(v, a);
    net.advance(2_000);
    // Mallory adds the victim (who never adds her) and writes once: the
    // victim parks it, and it is the template of the flood.
    let vcode = net.clients[v].engine.contact_code();
    let Some(Reply::Contact(mconv)) = net.command(m, Command::AddContact { code: vcode }) else {
        panic!("no contact");
    };
    net.advance(2_000);
    net.send(m, mconv, "hello?");
    net.advance(1_000);
    let template = Envelope::from_bytes(net.relay.seen_bytes.last().unwrap()).unwrap();
    let vd = net.clients[v].engine.device_id();
    assert_eq!(template.header.recipient_device, vd);
    net.disconnect(m);
    let fetches = |net: &Net| {
        net.relay
            .list_fetches
            .iter()
            .filter(|(who, _)| *who == vd)
            .count()
    };
    let before = fetches(&net);
    let start = net.now;
    let mut sent = Vec::new();
    for batch in 0..50u64 {
        let envs: Vec<Envelope> = (0..100u64)
            .map(|k| {
                let i = batch * 100 + k;
                let mut e = template.clone();
                let mut id = [0u8; 10];
                id[..8].copy_from_slice(&i.to_be_bytes());
                e.header.message_id = MessageId::new(T0, id);
                e.header.sender_seq = i + 2;
                if i >= 2_500 {
                    // 250 more devices, 10 envelopes each.
                    let mut d = [0xee; 16];
                    d[..8].copy_from_slice(&(i / 10).to_be_bytes());
                    e.header.sender_device = DeviceId(d);
                }
                e
            })
            .collect();
        let from = template.header.sender_device;
        net.inject(from, envs);
        if batch % 10 == 0 {
            sent.push(net.send(a, conv, &format!("real {batch}")));
        }
        net.advance(2_000);
        if batch == 24 {
            // 2,500 and more from one device so far: 64 kept.
            assert_eq!(parked_storage(&net, v).0, 64, "parked from one device");
        }
    }
    net.advance(20_000);
    // The defaults: 64 per device, 1,000 and 4 MiB in all.
    let (records, bytes) = parked_storage(&net, v);
    assert_eq!(records, 1_000, "parked records");
    // Each record: the envelope, a timestamp and a few bytes of framing.
    assert!(bytes <= (4 << 20) + records * 16, "{bytes} parked bytes");
    let engine = &net.clients[v].engine;
    assert_eq!(engine.parked.len(), records, "memory holds what is stored");
    let dropped = engine.counters().parked_dropped;
    assert!(dropped >= 4_001, "{dropped} dropped");
    // 120 s of flood: a refresh at once, then 5, 10, 20 s apart, then every
    // 30 s (two lists each: the victim's own and Alice's) — not one per
    // envelope or per 5 s.
    let secs = (net.now - start) / 1_000;
    let refreshes = 4 + secs / 30;
    let made = fetches(&net) - before;
    assert!(
        made as u64 <= 2 * refreshes,
        "{made} list fetches in {secs} s"
    );
    let got: Vec<MessageId> = ids(&net, v);
    assert_eq!(got, sent, "the real contact's messages all arrive");
    // After a restart the bounds hold too (and the flood is not reloaded).
    let records_before = net.clients[v].storage.load_state().unwrap();
    let reloaded = Engine::load(records_before, [55; 32], Net::cfg()).unwrap();
    assert_eq!(reloaded.parked.len(), records);
}

/// Parked records written under larger bounds (or before parking was
/// bounded) are cut down to the bounds when the engine loads.
#[test]
fn parked_records_over_the_bounds_are_dropped_at_load() {
    let mut net = Net::new();
    let v = net.create("victim");
    net.advance(1_000);
    let vd = net.clients[v].engine.device_id();
    let mut loose = Net::cfg();
    loose.parked_per_device = 10_000;
    loose.parked_max = 10_000;
    net.clients[v].engine.cfg = loose;
    let stranger = DeviceId([0xab; 16]);
    let envs: Vec<Envelope> = (1..=300u64)
        .map(|i| {
            let mut id = [0u8; 10];
            id[..8].copy_from_slice(&i.to_be_bytes());
            Envelope {
                header: hush_protocol::EnvelopeHeader {
                    message_id: MessageId::new(T0, id),
                    sender_device: stranger,
                    recipient_device: vd,
                    conversation_id: ConversationId([1; 16]),
                    sender_seq: i,
                    sent_at_ms: T0,
                    ratchet: vec![0; 40],
                    session_init: None,
                    important: false,
                },
                ciphertext: vec![0; 100],
            }
        })
        .collect();
    net.inject(stranger, envs);
    assert_eq!(parked_storage(&net, v).0, 300);
    let records = net.clients[v].storage.load_state().unwrap();
    let mut e = Engine::load(records, [56; 32], Net::cfg()).unwrap();
    assert_eq!(e.parked.len(), 64);
    let step = e.handle(net.now, Input::Tick).unwrap();
    net.clients[v].storage.apply(&step.storage).unwrap();
    assert_eq!(parked_storage(&net, v).0, 64);
    assert_eq!(e.counters().parked_dropped, 236);
}
#[path = "tests_sessions.rs"]
mod sessions;

#[path = "tests_devices.rs"]
mod devices;

#[path = "tests_early.rs"]
mod early;
#[path = "tests_groups.rs"]
mod groups;
#[path = "tests_history.rs"]
mod history;

/// History of a conversation as the app reads it: the message ids.
fn history_ids(net: &Net, i: usize, conv: &ConversationId) -> BTreeSet<MessageId> {
    crate::storage::history(&net.clients[i].storage, conv, None, 100)
        .unwrap()
        .into_iter()
        .map(|h| h.record.id)
        .collect()
}

/// Client `i` sends a recall of `target` into `conv`, whatever its engine
/// would allow (a hostile peer's modified client).
fn forge_recall(net: &mut Net, i: usize, conv: ConversationId, target: MessageId) {
    let now = net.now;
    let e = &mut net.clients[i].engine;
    let id = e.mint_id(now);
    e.queue(now, id, conv, crate::payload::Body::Recall { target }, None)
        .unwrap();
    net.input(i, Input::Tick);
    net.settle();
}

/// Bob learns the id of Alice's message to Val and recalls it in his own
/// conversation with Val, once after it arrived and once before: Alice's
/// messages stay.
#[test]
fn contact_cannot_recall_another_contacts_message_before_or_after_it_arrives() {
    let mut net = Net::new();
    let v = net.create("val");
    let a = net.create("alice");
    let b = net.create("bob");
    let conv_va = net.befriend(v, a);
    let conv_vb = net.befriend(v, b);
    net.advance(2_000);
    let m1 = net.send(a, conv_va, "one");
    net.advance(2_000);
    forge_recall(&mut net, b, conv_vb, m1);
    net.advance(2_000);
    // The second is lost on its way to Val and arrives after Bob's recall.
    let vd = net.clients[v].engine.device_id();
    net.relay.lose_next.insert(vd, 1);
    let m2 = net.send(a, conv_va, "two");
    forge_recall(&mut net, b, conv_vb, m2);
    net.advance(2_000);
    assert!(!ids(&net, v).contains(&m2), "not there yet");
    net.advance(120_000);
    assert_eq!(ids(&net, v), vec![m1, m2]);
    assert_eq!(history_ids(&net, v, &conv_va), BTreeSet::from([m1, m2]));
    assert_eq!(net.clients[v].engine.counters().suppressed, 0);
}

/// Alice recalls a message Val wrote on his other device (so it is not in
/// this device's outbox): refused, it stays in Val's history.
#[test]
fn contact_cannot_recall_a_message_this_user_wrote() {
    let mut net = Net::new();
    let v = net.create("val");
    let v2 = net.join(v);
    let a = net.create("alice");
    net.advance(2_000);
    let conv = net.befriend(v, a);
    net.advance(2_000);
    let m = net.send(v2, conv, "mine");
    net.advance(2_000);
    assert_eq!(ids(&net, v), vec![m]);
    assert_eq!(ids(&net, a), vec![m]);
    forge_recall(&mut net, a, conv, m);
    net.advance(2_000);
    for i in [v, v2] {
        assert_eq!(history_ids(&net, i, &conv), BTreeSet::from([m]));
        assert!(
            !net.clients[i]
                .events
                .iter()
                .any(|e| matches!(e, Event::MessageRemoved { .. }))
        );
        assert_eq!(net.clients[i].engine.counters().recalls_refused, 1);
    }
}

/// Alice's own recall still works: from her other device, overtaking the
/// message on its way to Val, and from the writing device after it arrived.
#[test]
fn authors_recall_works_from_another_device_arriving_first_and_after_arrival() {
    let mut net = Net::new();
    let v = net.create("val");
    let a = net.create("alice");
    let a2 = net.join(a);
    net.advance(2_000);
    let conv = net.befriend(a, v);
    net.advance(2_000);
    let vd = net.clients[v].engine.device_id();
    net.relay.lose_next.insert(vd, 1);
    let m1 = net.send(a, conv, "oops");
    net.advance(1_000);
    net.command(
        a2,
        Command::Recall {
            conversation: conv,
            id: m1,
        },
    );
    net.advance(120_000);
    assert!(!ids(&net, v).contains(&m1));
    assert!(net.clients[v].events.iter().any(
        |e| matches!(e, Event::MessageRemoved { id, reason: Removal::Recalled, .. } if *id == m1)
    ));
    assert_eq!(net.clients[v].engine.counters().suppressed, 1);
    let m2 = net.send(a, conv, "also oops");
    net.advance(2_000);
    assert_eq!(history_ids(&net, v, &conv), BTreeSet::from([m2]));
    net.command(
        a,
        Command::Recall {
            conversation: conv,
            id: m2,
        },
    );
    net.advance(2_000);
    assert!(history_ids(&net, v, &conv).is_empty());
    assert_eq!(net.clients[v].engine.counters().recalls_refused, 0);
}

/// A recipient whose inbox is full: the sender shows `RecipientInboxFull`
/// (not a silent retry that ends in `Failed`, even past the deadline), counts
/// the refusals, and delivers once the inbox drains. Sync latency counters
/// move on the first catch-up of a connection.
#[test]
fn full_recipient_inbox_is_shown_and_delivery_follows_the_drain() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let c = net.clients[a].engine.counters();
    assert!(c.syncs >= 1, "{c:?}");
    assert_eq!(c.inbox_full_refusals, 0);
    let bob = net.clients[b].engine.device_id();
    net.relay.full_inboxes.insert(bob);
    let id = net.send(a, conv, "to a full inbox");
    net.advance(3_000);
    assert_eq!(
        net.clients[a].engine.message_state(&id),
        Some(MessageState::RecipientInboxFull)
    );
    assert!(net.clients[a].events.iter().any(|e| matches!(
        e,
        Event::MessageState {
            state: MessageState::RecipientInboxFull,
            ..
        }
    )));
    assert!(net.clients[a].engine.counters().inbox_full_refusals >= 1);
    // Past the send deadline it stays "inbox full", never "failed".
    net.advance(6 * 60 * 1000);
    assert_eq!(
        net.clients[a].engine.message_state(&id),
        Some(MessageState::RecipientInboxFull)
    );
    assert!(net.messages(b).is_empty());
    // The inbox drains: the next retry is stored and delivered, once.
    net.relay.full_inboxes.clear();
    net.advance(2 * 60 * 1000);
    assert_eq!(
        net.messages(b).iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![id]
    );
    assert_eq!(
        net.clients[a].engine.message_state(&id),
        Some(MessageState::Delivered)
    );
    let h = crate::storage::history(&net.clients[a].storage, &conv, None, 10).unwrap();
    assert_eq!(h.len(), 1);
}

/// `SendImportantText` seals every envelope of the message with the
/// header's important flag (the relay's long retention class); `SendText`
/// never sets it. An outbox record written before the flag existed loads
/// as not important.
#[test]
fn important_text_sets_the_header_flag_on_its_envelopes_only() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    let normal = net.send(a, conv, "normal");
    let Some(Reply::Message(important)) = net.command(
        a,
        Command::SendImportantText {
            conversation: conv,
            text: "important".into(),
        },
    ) else {
        panic!("no id");
    };
    net.advance(3_000);
    let headers: Vec<_> = net
        .relay
        .seen_bytes
        .iter()
        .filter_map(|b| Envelope::from_bytes(b).ok())
        .map(|e| e.header)
        .collect();
    let flagged = |id: MessageId| -> Vec<bool> {
        headers
            .iter()
            .filter(|h| h.message_id == id)
            .map(|h| h.important)
            .collect()
    };
    assert!(!flagged(normal).is_empty() && flagged(normal).iter().all(|f| !f));
    assert!(!flagged(important).is_empty() && flagged(important).iter().all(|f| *f));
    assert_eq!(
        net.messages(b)
            .iter()
            .map(|r| r.text.as_str())
            .collect::<Vec<_>>(),
        ["normal", "important"]
    );

    // A record without the trailing flag (an older build) still decodes.
    let mut entry = net.clients[a].engine.outbox[&important].clone();
    assert!(entry.important);
    let bytes = storage::encode(&entry).unwrap();
    let same = crate::state::OutboxEntry::decode(b"s/outbox/x", &bytes).unwrap();
    assert!(same.important);
    entry.important = false;
    let bytes = storage::encode(&entry).unwrap();
    // The older layout: the same bytes without the trailing flag.
    let old = &bytes[..bytes.len() - 1];
    let back = crate::state::OutboxEntry::decode(b"s/outbox/x", old).unwrap();
    assert!(!back.important);
    assert_eq!(back.id, entry.id);
}

/// A relay that clears the important flag (to expire a message early while
/// claiming it kept the sender's class) changes authenticated header bytes:
/// the recipient rejects the envelope instead of showing it.
#[test]
fn relay_stripping_the_important_flag_is_rejected() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    net.relay.strip_important = true;
    let before = net.clients[b].engine.counters().rejected;
    net.command(
        a,
        Command::SendImportantText {
            conversation: conv,
            text: "keep me".into(),
        },
    );
    net.advance(3_000);
    assert!(net.messages(b).is_empty());
    assert!(net.clients[b].engine.counters().rejected > before);
}

#[path = "tests_lifecycle.rs"]
mod lifecycle_tests;

/// Only steps on which nothing urgent waits are lazy: the relay's `Stored`
/// answer and a contact's receipt (state changes, acks to the relay); never
/// a send, a received message or a reply.
#[test]
fn only_delivery_notices_and_relay_acks_are_lazy() {
    let mut net = Net::new();
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.settle();
    net.clients[a].steps.clear();
    net.clients[b].steps.clear();
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        ids.push(net.send(a, conv, text));
        net.settle();
        net.advance(10_000);
        net.settle();
    }
    for id in &ids {
        assert_eq!(
            net.clients[a].engine.message_state(id),
            Some(MessageState::Delivered)
        );
    }
    let notice = |e: &Event, want: MessageState| matches!(e, Event::MessageState { id: m, state, .. } if ids.contains(m) && *state == want);
    let mut seen = (false, false, false, false);
    for (lazy, events, frames) in &net.clients[a].steps {
        let sends = frames.iter().any(|f| matches!(f, Request::Send { .. }));
        if sends {
            assert!(!lazy, "a step that sends is not lazy");
            seen.0 = true;
        }
        if events.iter().any(|e| notice(e, MessageState::Stored)) {
            assert!(*lazy, "the Stored notice is lazy: {events:?} {frames:?}");
            seen.1 = true;
        }
        if events.iter().any(|e| notice(e, MessageState::Delivered)) {
            // bob's receipt turns the ratchet: a `KeyRotation` comes along.
            assert!(*lazy, "the receipt is lazy: {events:?} {frames:?}");
            seen.2 = true;
        }
    }
    for (lazy, events, _) in &net.clients[b].steps {
        if events.iter().any(|e| matches!(e, Event::Message(_))) {
            assert!(!lazy, "a received message is not lazy");
            seen.3 = true;
        }
    }
    assert_eq!(seen, (true, true, true, true));
}

/// alice and bob, contacts, with alice's send deadline `deadline_ms` and
/// every `Send` of hers from here on held by the network (the relay never
/// answers them).
fn pair_holding_sends(deadline_ms: u64) -> (Net, usize, usize, ConversationId) {
    let mut net = Net::new();
    net.cfg.send_deadline_ms = deadline_ms;
    let (mut net, a, b, conv) = alice_and_bob(net);
    net.clients[a].hold_sends = usize::MAX;
    (net, a, b, conv)
}

/// alice and bob on `net`, contacts, settled for two seconds.
fn alice_and_bob(mut net: Net) -> (Net, usize, usize, ConversationId) {
    let a = net.create("alice");
    let b = net.create("bob");
    let conv = net.befriend(a, b);
    net.advance(2_000);
    (net, a, b, conv)
}

#[test]
fn an_input_does_not_walk_the_messages_waiting_for_the_relay() {
    let (mut net, a, b, conv) = pair_holding_sends(EngineConfig::default().send_deadline_ms);
    // Every message of alice's stays in flight.
    for n in 0..1_000 {
        net.send(a, conv, &format!("m{n}"));
    }
    assert_eq!(net.clients[a].engine.unsent(), 1_000);
    let visits = |net: &Net| net.clients[a].engine.outbox_index.visits;
    let before = visits(&net);
    for n in 0..100 {
        net.send(a, conv, &format!("late{n}"));
    }
    net.advance(1_000);
    let per_send = (visits(&net) - before) as f64 / 100.0;
    // A walk of everything in flight would visit over a thousand entries
    // per input; each new message is visited when queued, sealed and sent.
    assert!(per_send <= 4.0, "{per_send} entries visited per send");
    // The deadline still fires for every held message, from the index.
    assert_eq!(net.clients[a].engine.outbox_index.indexed(), 1_100);
    // Released, everything arrives once and is confirmed.
    net.clients[a].hold_sends = 0;
    net.release_held();
    net.advance(2_000);
    assert_eq!(net.messages(b).len(), 1_100);
    assert_eq!(net.clients[a].engine.unsent(), 0);
    assert_eq!(net.clients[a].engine.outbox_index.indexed(), 0);
}

#[test]
fn held_messages_fail_at_their_deadline_and_a_retry_sends_them() {
    let (mut net, a, b, conv) = pair_holding_sends(10_000);
    let ids: Vec<MessageId> = (0..50)
        .map(|n| net.send(a, conv, &format!("m{n}")))
        .collect();
    net.advance(9_000);
    assert!(
        ids.iter()
            .all(|id| net.clients[a].engine.message_state(id) == Some(MessageState::Sending))
    );
    net.advance(2_000);
    assert!(
        ids.iter()
            .all(|id| net.clients[a].engine.message_state(id) == Some(MessageState::Failed)),
        "every held message fails at its deadline"
    );
    // The connection that lost them drops; retried, they go out on the
    // next one.
    net.held.clear();
    net.clients[a].hold_sends = 0;
    net.disconnect(a);
    for id in &ids {
        net.command(a, Command::Retry { id: *id });
    }
    net.advance(2_000);
    assert_eq!(net.messages(b).len(), 50);
    assert!(
        ids.iter()
            .all(|id| net.clients[a].engine.message_state(id) != Some(MessageState::Failed))
    );
}

/// Drive client `i` by its own wake-ups only (no periodic ticks): jump to
/// each time its step asks to be woken, until `done` holds or the time
/// passes `limit`. Returns the time `done` first held.
fn run_on_wakeups(net: &mut Net, i: usize, limit: u64, done: impl Fn(&Net) -> bool) -> Option<u64> {
    for _ in 0..100 {
        if done(net) {
            return Some(net.now);
        }
        let now = net.now;
        let wake = net.clients[i]
            .engine
            .handle(now, Input::Tick)
            .unwrap()
            .wake_at?;
        if wake > limit {
            return None;
        }
        net.now = wake;
        net.input(i, Input::Tick);
        net.settle();
    }
    None
}

#[test]
fn a_gap_request_and_a_tail_probe_go_out_when_their_timers_wake_the_engine() {
    let (mut net, a, b, conv) = alice_and_bob(Net::new());
    let bd = net.clients[b].engine.device_id();
    net.relay.lose_next.insert(bd, 1);
    net.send(a, conv, "one");
    net.send(a, conv, "two");
    // bob holds "two" and waits for "one": his request is due after the
    // grace period, and his engine wakes for it then.
    let gap = net.clients[b]
        .engine
        .in_streams
        .values()
        .filter_map(|s| s.request_at)
        .min()
        .expect("a gap timer");
    let recovered = run_on_wakeups(&mut net, b, gap + 60_000, |n| n.messages(b).len() == 2);
    assert_eq!(
        recovered,
        Some(gap),
        "the gap is repaired when its timer is due"
    );
    // alice's "one" and "two" now wait for bob's receipt, which never
    // comes while he is offline: her tail probe goes out when due.
    net.switch_off(b);
    let probe = net.clients[a]
        .engine
        .out_streams
        .values()
        .filter_map(|s| s.probe_at)
        .min()
        .expect("a probe timer");
    let probes = net.clients[a].engine.counters().probes;
    let probed = run_on_wakeups(&mut net, a, probe + 60_000, |n| {
        n.clients[a].engine.counters().probes > probes
    });
    assert_eq!(
        probed,
        Some(probe),
        "the probe goes out when its timer is due"
    );
}

#[test]
fn a_held_message_fails_when_its_deadline_wakes_the_engine() {
    let (mut net, a, _, conv) = pair_holding_sends(10_000);
    let sent_at = net.now;
    let id = net.send(a, conv, "held");
    let failed = run_on_wakeups(&mut net, a, sent_at + 120_000, |n| {
        n.clients[a].engine.message_state(&id) == Some(MessageState::Failed)
    });
    assert_eq!(failed, Some(sent_at + 10_000));
}
