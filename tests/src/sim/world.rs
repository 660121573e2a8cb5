//! The simulated world: virtual clock, event queue, network, relay, devices.

use super::check::Violation;
use crate::rng::SeededRng;
use hush_client::{
    Command, ContactCode, Engine, EngineConfig, Event, Input, LinkCode, MemoryStorage, Reply,
    Storage,
};
use hush_protocol::{
    ClientFrame, ConversationId, DeviceId, ErrorCode, MessageId, Response, ServerFrame, UserKey,
    decode_server_frame, encode_client_frame,
};
use hush_relay::Metrics;
use hush_relay::core::{Action, CoreConfig, PendingSend, RelayCore, Session};
use hush_relay::store::memory::MemoryStore;
use hush_relay::store::{CommitOutcome, Store, StoreError, StoreLimits};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Every message text starts with this; the relay must never see it.
pub const MARKER: &str = "hush-sim-secret-";
const START_MS: u64 = 1_700_000_000_000;
const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;

/// The shape of one run, derived from its seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Devices per user (the first is created, the others linked).
    pub devices: Vec<usize>,
    /// Text messages the workload sends.
    pub messages: usize,
    /// Length of the fault phase.
    pub workload_ms: u64,
    /// Length of the fault-free phase after it.
    pub heal_ms: u64,
    /// Per envelope in a page/push, in 1/10000: withheld by the relay.
    pub withhold_bp: u64,
    /// …duplicated.
    pub dup_bp: u64,
    /// …swapped with its neighbour.
    pub reorder_bp: u64,
    /// Mean time between connection cuts (0 = none).
    pub cut_every_ms: u64,
    /// Relay restarts during the fault phase.
    pub relay_restarts: usize,
    /// Per engine step, in 1/10000: crash before / after its storage batch.
    pub crash_bp: u64,
    /// Offline spells (a device stops dialing for a while).
    pub offline_spells: usize,
    /// Longest offline spell.
    pub offline_max_ms: u64,
    /// Relay retention of unacknowledged envelopes.
    pub relay_retention_ms: u64,
    /// Client outbox retention.
    pub outbox_retention_ms: u64,
    /// Workload includes recalls, deletes and reads.
    pub extras: bool,
    /// The last user (one device) registers only after the others added its
    /// contact code and settled: they must learn of its device by retrying
    /// its device list, without reconnecting.
    pub late_user: bool,
    /// Envelopes per pulled page: small pages make backlogs span many
    /// pipelined pulls (each one an early frame).
    pub page_limit: u16,
    /// Devices commit like the `hush` CLI: each step's batch is committed
    /// later (a few ms), while further inputs are handled; a step's early
    /// frames leave once every earlier step is durable, its frames and
    /// events once its own batch is. A crash drops every batch not yet
    /// committed.
    pub pipelined: bool,
    /// Most pulls in flight during a backlog sync (1–4): pipelined pulls
    /// that assumed dense seqs meet withheld, duplicated and expired
    /// envelopes.
    pub pull_depth: u16,
    /// Per page during the fault phase, in 1/10000: the relay forges an
    /// expiry report claiming a thousand future seqs of a sender stream in
    /// the page (a hostile relay); no stream may lose a message to it.
    pub forge_bp: u64,
    /// A group scenario (see [`GroupPlan`]); `None` for one-to-one only.
    pub group: Option<GroupPlan>,
    /// The relay commits as the real one on redb does: a commit is first
    /// written, pushed early to the recipients that asked for early pushes,
    /// and only 2–4 ms later durable (the sender's ack, the recipients'
    /// `Durable`); reads see it only then. Half of the relay restarts of
    /// such a scenario fall between a write and its sync, so the restarted
    /// relay hands the early-pushed seqs to other envelopes.
    pub relay_sync: bool,
}

/// The group workload: the first user creates a group with every user but
/// the last; during the fault phase members send group messages, one
/// member adds the last user, and maybe one member removes another.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    /// Group messages sent (by random devices of members).
    pub messages: usize,
    /// A member removes another member during the run.
    pub remove: bool,
}

impl Scenario {
    /// Derive a scenario from a seed (six families, randomised inside).
    pub fn from_seed(seed: u64) -> Scenario {
        let mut r = SeededRng::new(seed ^ 0x5ce7_a210);
        let users = r.range(2, 3) as usize;
        let devices: Vec<usize> = (0..users).map(|_| r.range(1, 3) as usize).collect();
        let family = seed % 6;
        let mut s = Scenario {
            devices,
            messages: r.range(6, 16) as usize,
            workload_ms: r.range(2, 6) * MINUTE,
            heal_ms: 20 * MINUTE,
            withhold_bp: 0,
            dup_bp: 0,
            reorder_bp: 0,
            cut_every_ms: 0,
            relay_restarts: 0,
            crash_bp: 0,
            offline_spells: 0,
            offline_max_ms: 0,
            relay_retention_ms: 7 * 24 * 60 * MINUTE,
            outbox_retention_ms: 14 * 24 * 60 * MINUTE,
            extras: r.range(0, 1) == 1,
            late_user: false,
            page_limit: 200,
            pipelined: false,
            pull_depth: EngineConfig::default().pull_depth,
            forge_bp: 0,
            group: None,
            relay_sync: false,
        };
        // Drawn from their own generator, so the rest of the scenario of a
        // seed is what it was before these knobs existed.
        let mut p = SeededRng::new(seed ^ 0x9199_11ed);
        if p.range(0, 1) == 1 {
            s.page_limit = p.range(1, 4) as u16;
        }
        s.pipelined = p.range(0, 1) == 1;
        s.pull_depth = p.range(1, 4) as u16;
        let mut f = SeededRng::new(seed ^ 0xf0a6_e0c1);
        if f.range(0, 1) == 1 {
            s.forge_bp = f.range(500, 3_000);
        }
        s.relay_sync = SeededRng::new(seed ^ 0xea51_70c5).range(0, 1) == 1;

        match family {
            0 => {
                s.cut_every_ms = r.range(20, 90) * SECOND;
            }
            1 => {
                s.withhold_bp = r.range(100, 600);
                s.dup_bp = r.range(0, 500);
                s.reorder_bp = r.range(0, 500);
                s.cut_every_ms = r.range(10, 60) * SECOND;
            }
            2 => {
                s.crash_bp = r.range(50, 300);
                s.relay_restarts = r.range(1, 3) as usize;
                s.cut_every_ms = r.range(15, 60) * SECOND;
            }
            3 => {
                s.offline_spells = r.range(1, 3) as usize;
                s.offline_max_ms = r.range(2, 6) * MINUTE;
                s.relay_retention_ms = r.range(40, 120) * SECOND;
                s.withhold_bp = r.range(0, 200);
            }
            5 => {
                // Senders forget: outboxes expire while a recipient device is
                // offline longer than the relay keeps its envelopes.
                s.offline_spells = r.range(1, 2) as usize;
                s.offline_max_ms = r.range(4, 6) * MINUTE;
                s.workload_ms = r.range(4, 6) * MINUTE;
                s.relay_retention_ms = r.range(30, 60) * SECOND;
                s.outbox_retention_ms = r.range(60, 120) * SECOND;
                s.cut_every_ms = r.range(30, 90) * SECOND;
            }
            _ => {
                if seed % 12 == 4 {
                    s.late_user = true;
                    if let Some(last) = s.devices.last_mut() {
                        *last = 1;
                    }
                }
                s.withhold_bp = r.range(0, 300);
                s.dup_bp = r.range(0, 300);
                s.reorder_bp = r.range(0, 300);
                s.crash_bp = r.range(0, 150);
                s.relay_restarts = r.range(0, 2) as usize;
                s.cut_every_ms = r.range(15, 90) * SECOND;
                s.offline_spells = r.range(0, 2) as usize;
                s.offline_max_ms = r.range(1, 4) * MINUTE;
                if r.range(0, 1) == 1 {
                    s.relay_retention_ms = r.range(40, 120) * SECOND;
                    if r.range(0, 1) == 1 {
                        s.outbox_retention_ms = r.range(90, 240) * SECOND;
                    }
                }
            }
        }
        if std::env::var("HUSH_SIM_TRACE").is_ok() {
            eprintln!("scenario {s:?}");
        }
        s
    }

    /// A small group world from a seed: 3–4 users of 1–2 devices, the
    /// fault families of [`Scenario::from_seed`] with outboxes that outlive
    /// the run (relay retention may still expire envelopes), a few
    /// one-to-one messages besides the group workload.
    pub fn group_from_seed(seed: u64) -> Scenario {
        let mut s = Scenario::from_seed(seed);
        let mut g = SeededRng::new(seed ^ 0x6a05_5eed);
        // Small worlds (1,000 seeds in tens of seconds): 3 or 4 users of
        // one device each, one of them with a second device in half of the
        // seeds; at most 5 devices.
        let users = g.range(3, 4) as usize;
        s.devices = vec![1; users];
        if g.range(0, 1) == 1 {
            let u = g.range(0, users as u64 - 1) as usize;
            s.devices[u] = 2;
        }
        s.late_user = false;
        s.messages = g.range(0, 2) as usize;
        s.outbox_retention_ms = 14 * 24 * 60 * MINUTE;
        s.workload_ms = s.workload_ms.min(3 * MINUTE);
        s.offline_max_ms = s.offline_max_ms.min(3 * MINUTE);
        s.heal_ms = 8 * MINUTE;
        s.group = Some(GroupPlan {
            messages: g.range(4, 9) as usize,
            remove: g.range(0, 1) == 1,
        });
        s
    }

    /// Whether senders may legitimately lose messages (their outbox expires
    /// before the sim ends), so recipients may report them unrecoverable.
    pub fn senders_may_forget(&self) -> bool {
        self.outbox_retention_ms < self.workload_ms + self.heal_ms + 5 * MINUTE
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            outbox_retention_ms: self.outbox_retention_ms,
            probe_base_ms: 10 * SECOND,
            probe_max_ms: 2 * MINUTE,
            resend_retry_ms: 10 * SECOND,
            resend_retry_max_ms: 2 * MINUTE,
            page_limit: self.page_limit,
            pull_depth: self.pull_depth,
            ..EngineConfig::default()
        }
    }
}

/// A message the workload sent.
#[derive(Debug, Clone)]
pub struct SentMsg {
    /// Its id.
    pub id: MessageId,
    /// The sending node.
    pub node: usize,
    /// The receiving user.
    pub to_user: usize,
    /// Its conversation.
    pub conversation: ConversationId,
    /// Its text.
    pub text: String,
    /// Creation order at the sending node.
    pub index: usize,
}

/// A group message the workload sent.
#[derive(Debug, Clone)]
pub struct GroupSent {
    /// Its id.
    pub id: MessageId,
    /// The sending node.
    pub node: usize,
    /// The members as the sender saw them when it wrote it.
    pub members: BTreeSet<UserKey>,
    /// The group messages the sender displayed when it wrote it (they must
    /// come before it everywhere).
    pub after: Vec<MessageId>,
}

/// One simulated device.
pub struct Node {
    /// Index of its user.
    pub user: usize,
    /// Its durable storage (survives crashes).
    pub storage: MemoryStorage,
    /// Its engine (rebuilt from storage after a crash).
    pub engine: Engine,
    conn: Option<u64>,
    dialing: bool,
    timer_gen: u64,
    timer_at: Option<u64>,
    offline: bool,
    /// `Event::Message` count per message id.
    pub shown: BTreeMap<MessageId, u32>,
    /// Messages received here (for reads and deletes): (id, author device, conversation).
    pub received: Vec<(MessageId, DeviceId, ConversationId)>,
    /// `Event::Unrecoverable` totals per (sender device, conversation).
    pub unrecoverable: BTreeMap<(DeviceId, ConversationId), u64>,
    /// Messages sent from here, in order.
    pub sent_order: Vec<MessageId>,
    /// Pipelined driver: steps handled but not yet committed, oldest first.
    /// The first one's early frames are sent; the others' wait for every
    /// step before them to be committed.
    pending: std::collections::VecDeque<PendingStep>,
    /// Invalidates scheduled commits (a crash drops the pending steps).
    commit_gen: u64,
}

/// A step whose storage batch is not durable yet (pipelined driver).
struct PendingStep {
    storage: Vec<hush_client::StorageOp>,
    /// The step had early frames (sent once they are taken from `early`).
    had_early: bool,
    early: Vec<ClientFrame>,
    frames: Vec<ClientFrame>,
    events: Vec<Event>,
}

/// A commit the relay wrote but has not synced: its envelopes may have
/// been pushed early; a relay death now undoes it.
struct Unsynced {
    c: u64,
    pending: PendingSend,
    result: Result<Vec<CommitOutcome>, StoreError>,
    /// Envelopes of it pushed early.
    early: u64,
}

struct Conn {
    node: usize,
    session: Option<Session>,
    alive: bool,
    to_client_at: u64,
    to_relay_at: u64,
}

enum Ev {
    Dial(usize),
    Connected(usize, u64),
    Lost(usize, u64),
    ToRelay(u64, ClientFrame),
    ToClient(u64, ServerFrame),
    Commit(u64, u64, PendingSend),
    CloseConn(u64),
    Timer(usize, u64),
    /// A pipelined node's oldest pending batch becomes durable.
    LocalCommit(usize, u64),
    Send(usize, usize),
    GroupSend(usize),
    GroupAdd(usize),
    GroupRemove(usize),
    Recall(usize),
    Delete(usize),
    Read(usize),
    /// The relay's unsynced commit of this relay epoch becomes durable
    /// ([`Scenario::relay_sync`]).
    Synced(u64),
    Cut,
    /// The relay dies for this long; `true`: it may wait for the next
    /// commit's unsynced window to die in.
    RelayDown(u64, bool),
    RelayUp,
    Crash(usize),
    Offline(usize, u64),
    Online(usize),
    Purge,
}

/// The whole simulation.
pub struct World {
    /// The run's seed.
    pub seed: u64,
    /// Its scenario.
    pub scenario: Scenario,
    rng: SeededRng,
    /// Virtual time, ms since the epoch.
    pub now: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    qseq: u64,
    core: RelayCore<MemoryStore>,
    /// The relay's durable store.
    pub store: Arc<MemoryStore>,
    relay_up: bool,
    relay_epoch: u64,
    /// The commit written but not yet synced ([`Scenario::relay_sync`]).
    unsynced: Option<Unsynced>,
    /// Commits waiting for it: the relay writes one batch at a time.
    commit_queue: VecDeque<(u64, PendingSend)>,
    /// A relay death (for this long) waiting for the next write.
    death_pending: Option<u64>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    faults: bool,
    /// Devices.
    pub nodes: Vec<Node>,
    /// Messages sent, in order.
    pub sent: Vec<SentMsg>,
    /// Messages recalled (by id).
    pub recalled: BTreeSet<MessageId>,
    /// Plaintext found in bytes that reached the relay.
    pub leaks: Vec<String>,
    /// The group of a group scenario.
    pub group: Option<ConversationId>,
    /// Group messages sent, in order.
    pub group_sent: Vec<GroupSent>,
    /// Users removed from the group (by a member's command).
    pub removed_users: BTreeSet<usize>,
    /// (device, relay seq, sender, message id) of every envelope handed to
    /// a device, after the relay's mangling.
    handed: BTreeSet<(DeviceId, u64, DeviceId, MessageId)>,
    /// (device, relay seq) of every envelope the relay withheld from a
    /// device (a device may acknowledge past those: it detects the loss
    /// from the sender's stream instead).
    withheld: BTreeSet<(DeviceId, u64)>,
    /// Users whose add races the adder's own removal: added by a member
    /// already removed without knowing it (a relay withheld the removal),
    /// or removed by a member that had not seen the add yet. Whether the
    /// add counts depends on where the concurrent removal sorts, so devices
    /// that order the removal first skip the add (`docs/CLIENT.md`,
    /// groups, "Limits").
    pub contested_users: BTreeSet<usize>,
    /// Who added the last user (the group plan's one add).
    added_by: Option<usize>,
    /// Counters for the report.
    pub report: super::Report,
    text_counter: usize,
    trace: bool,
}

impl World {
    /// Build the world and run the setup phase (users, contacts, linked
    /// devices) until every device knows every device list.
    pub fn new(seed: u64, scenario: Scenario) -> Result<World, Violation> {
        let config = CoreConfig {
            max_envelope: hush_protocol::limits::MAX_ENVELOPE_LEN,
            retention_ms: scenario.relay_retention_ms,
            retention_important_ms: scenario.relay_retention_ms,
            send_rate: 0,
            send_burst: 64,
            push_window: hush_relay::core::DEFAULT_PUSH_WINDOW,
            blobs: hush_relay::store::BlobLimits::default(),
            stale_after_ms: hush_relay::core::DEFAULT_STALE_AFTER_MS,
        };
        let store = Arc::new(MemoryStore::new(StoreLimits::default()));
        let core = RelayCore::new(store.clone(), config, Arc::new(Metrics::new()));
        let mut w = World {
            seed,
            scenario,
            rng: SeededRng::new(seed),
            now: START_MS,
            queue: BTreeMap::new(),
            qseq: 0,
            core,
            store,
            relay_up: true,
            relay_epoch: 0,
            unsynced: None,
            commit_queue: VecDeque::new(),
            death_pending: None,
            conns: BTreeMap::new(),
            next_conn: 1,
            faults: false,
            nodes: Vec::new(),
            sent: Vec::new(),
            recalled: BTreeSet::new(),
            leaks: Vec::new(),
            group: None,
            group_sent: Vec::new(),
            removed_users: BTreeSet::new(),
            handed: BTreeSet::new(),
            withheld: BTreeSet::new(),
            contested_users: BTreeSet::new(),
            added_by: None,
            report: super::Report::default(),
            text_counter: 0,
            trace: std::env::var("HUSH_SIM_TRACE").is_ok(),
        };
        w.setup()?;
        Ok(w)
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.qseq += 1;
        self.queue.insert((t.max(self.now), self.qseq), ev);
    }

    fn chance(&mut self, bp: u64) -> bool {
        bp > 0 && self.rng.range(0, 9_999) < bp
    }

    fn latency(&mut self) -> u64 {
        self.rng.range(1, 40)
    }

    fn seed32(&mut self) -> [u8; 32] {
        self.rng.bytes()
    }

    /// The node indices of a user.
    pub fn user_nodes(&self, user: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].user == user)
            .collect()
    }

    /// A user's identity key.
    pub fn user_key(&self, user: usize) -> Option<UserKey> {
        self.user_nodes(user)
            .first()
            .map(|&i| self.nodes[i].engine.user_key())
    }

    fn add_node(
        &mut self,
        user: usize,
        engine: Engine,
        step: hush_client::Step,
    ) -> Result<usize, Violation> {
        let mut storage = MemoryStorage::new();
        storage
            .apply(&step.storage)
            .map_err(|e| Violation::Engine(format!("storage: {e}")))?;
        self.nodes.push(Node {
            user,
            storage,
            engine,
            conn: None,
            dialing: false,
            timer_gen: 0,
            timer_at: None,
            offline: false,
            shown: BTreeMap::new(),
            received: Vec::new(),
            unrecoverable: BTreeMap::new(),
            sent_order: Vec::new(),
            pending: std::collections::VecDeque::new(),
            commit_gen: 0,
        });
        let i = self.nodes.len() - 1;
        self.nodes[i].dialing = true;
        self.at(self.now, Ev::Dial(i));
        Ok(i)
    }

    fn setup(&mut self) -> Result<(), Violation> {
        let cfg = self.scenario.engine_config();
        let users = self.scenario.devices.len();
        for u in 0..users {
            let seed = self.seed32();
            let (engine, step) = Engine::create(
                self.now,
                seed,
                "sim-relay",
                &format!("user{u}"),
                cfg.clone(),
            )
            .map_err(|e| Violation::Engine(format!("create: {e}")))?;
            let i = self.add_node(u, engine, step)?;
            if self.scenario.late_user && u + 1 == users {
                // Not registered yet: it stays off the relay until the end
                // of setup.
                self.nodes[i].offline = true;
            }
        }
        self.run_until(self.now + 5 * SECOND)?;
        let codes: Vec<ContactCode> = (0..users)
            .map(|u| self.nodes[u].engine.contact_code())
            .collect();
        for u in 0..users {
            for (v, code) in codes.iter().enumerate() {
                if u != v {
                    self.command(u, Command::AddContact { code: code.clone() })?;
                }
            }
        }
        self.run_until(self.now + 5 * SECOND)?;
        for u in 0..users {
            for _ in 1..self.scenario.devices[u] {
                let reply = self.command(u, Command::CreateLinkCode)?;
                let Some(Reply::LinkCode(text)) = reply else {
                    return Err(Violation::Setup("no link code".into()));
                };
                let code = LinkCode::parse(&text)
                    .map_err(|e| Violation::Setup(format!("link code: {e}")))?;
                let seed = self.seed32();
                let (engine, step) = Engine::join(self.now, seed, &code, cfg.clone())
                    .map_err(|e| Violation::Engine(format!("join: {e}")))?;
                self.add_node(u, engine, step)?;
            }
        }
        // Contacts learn of new devices when they refresh device lists (on
        // connect, when stale, or on an unknown sender): reconnect everyone.
        self.run_until(self.now + 5 * SECOND)?;
        let all: Vec<u64> = self.conns.keys().copied().collect();
        for c in all {
            self.cut(c);
        }
        let deadline = self.now + 2 * MINUTE;
        while !self.converged(self.scenario.late_user) {
            if self.now >= deadline {
                return Err(Violation::Setup("device lists did not converge".into()));
            }
            self.run_until(self.now + SECOND)?;
        }
        if self.scenario.late_user {
            // The late user registers now; nobody reconnects.
            let late = self.user_nodes(users - 1);
            for i in late {
                self.at(self.now, Ev::Online(i));
            }
            let deadline = self.now + 2 * MINUTE;
            while !self.converged(false) {
                if self.now >= deadline {
                    return Err(Violation::Setup(
                        "nobody learned of the late user's device".into(),
                    ));
                }
                self.run_until(self.now + SECOND)?;
            }
        }
        Ok(())
    }

    /// Every device knows every user's devices. With `skip_last`, the last
    /// user (not registered yet) is left out on both sides.
    fn converged(&self, skip_last: bool) -> bool {
        let all = self.scenario.devices.len();
        let users = if skip_last { all - 1 } else { all };
        let truth: Vec<BTreeSet<DeviceId>> = (0..users)
            .map(|u| {
                self.user_nodes(u)
                    .iter()
                    .map(|&i| self.nodes[i].engine.device_id())
                    .collect()
            })
            .collect();
        self.nodes.iter().filter(|n| n.user < users).all(|n| {
            n.engine.contacts().len() == all - 1
                && (0..users).all(|u| {
                    self.user_key(u).is_some_and(|k| {
                        n.engine.devices_of(&k).into_iter().collect::<BTreeSet<_>>() == truth[u]
                    })
                })
        })
    }

    /// Schedule the workload and faults, run the fault phase, heal, run
    /// until quiet.
    pub fn run(&mut self) -> Result<(), Violation> {
        let start = self.now;
        let end = start + self.scenario.workload_ms;
        let users = self.scenario.devices.len();
        for _ in 0..self.scenario.messages {
            let t = self.rng.range(start, end);
            let node = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
            let mut to = self.rng.range(0, users as u64 - 1) as usize;
            if to == self.nodes[node].user {
                to = (to + 1) % users;
            }
            self.at(t, Ev::Send(node, to));
        }
        if self.scenario.extras {
            for _ in 0..3 {
                let t = self.rng.range(start, end);
                let n = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
                let kind = self.rng.range(0, 2);
                self.at(
                    t,
                    match kind {
                        0 => Ev::Recall(n),
                        1 => Ev::Delete(n),
                        _ => Ev::Read(n),
                    },
                );
            }
        }
        if self.scenario.cut_every_ms > 0 {
            let mut t = start;
            loop {
                t += self.rng.range(1, 2 * self.scenario.cut_every_ms);
                if t >= end {
                    break;
                }
                self.at(t, Ev::Cut);
            }
        }
        for _ in 0..self.scenario.relay_restarts {
            let t = self.rng.range(start, end);
            let down = self.rng.range(100, 20 * SECOND);
            self.at(t, Ev::RelayDown(down, true));
        }
        for _ in 0..self.scenario.offline_spells {
            let t = self.rng.range(start, end);
            let n = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
            let d = self
                .rng
                .range(SECOND, self.scenario.offline_max_ms.max(SECOND));
            self.at(t, Ev::Offline(n, d));
        }
        if self.scenario.crash_bp > 0 {
            for _ in 0..self.rng.range(0, 3) {
                let t = self.rng.range(start, end);
                let n = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
                self.at(t, Ev::Crash(n));
            }
        }
        if let Some(plan) = self.scenario.group.clone() {
            // Every user but the last; the last is added during the run.
            let members: Vec<UserKey> = (1..users - 1).filter_map(|u| self.user_key(u)).collect();
            let reply = self.command(
                0,
                Command::CreateGroup {
                    name: "sim".into(),
                    members,
                },
            )?;
            let Some(Reply::Group(g)) = reply else {
                return Err(Violation::Setup("no group".into()));
            };
            self.group = Some(g);
            for _ in 0..plan.messages {
                let t = self.rng.range(start, end);
                let n = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
                self.at(t, Ev::GroupSend(n));
            }
            let t = self.rng.range(start, end);
            let n = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
            self.at(t, Ev::GroupAdd(n));
            if plan.remove {
                let t = self.rng.range(start, end);
                let n = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
                self.at(t, Ev::GroupRemove(n));
            }
        }
        self.at(start + 10 * SECOND, Ev::Purge);
        self.faults = true;
        self.run_until(end)?;
        // Heal: no more faults, everyone online, the relay up.
        self.faults = false;
        if !self.relay_up {
            self.relay_up = true;
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].offline {
                self.at(self.now, Ev::Online(i));
            }
        }
        let heal_end = self.now + self.scenario.heal_ms;
        self.run_until(self.now + MINUTE)?;
        self.retry_failed()?;
        self.run_until(self.now + 5 * MINUTE)?;
        self.retry_failed()?;
        self.run_until(heal_end)?;
        for i in 0..self.nodes.len() {
            self.flush(i)?;
        }
        Ok(())
    }

    /// What a user does after "check your network": retry failed messages.
    fn retry_failed(&mut self) -> Result<(), Violation> {
        for i in 0..self.nodes.len() {
            let failed: Vec<MessageId> = self.nodes[i]
                .engine
                .outbox_ids()
                .into_iter()
                .filter(|id| {
                    self.nodes[i].engine.message_state(id)
                        == Some(hush_client::MessageState::Failed)
                })
                .collect();
            for id in failed {
                self.command(i, Command::Retry { id })?;
            }
        }
        Ok(())
    }

    fn run_until(&mut self, t: u64) -> Result<(), Violation> {
        while let Some((&(when, _), _)) = self.queue.first_key_value() {
            if when > t {
                break;
            }
            let Some(((when, _), ev)) = self.queue.pop_first() else {
                break;
            };
            self.now = when;
            self.report.events += 1;
            if self.report.events > 3_000_000 {
                return Err(Violation::Engine(
                    "runaway simulation (too many events)".into(),
                ));
            }
            self.dispatch(ev)?;
        }
        self.now = self.now.max(t);
        Ok(())
    }

    fn dispatch(&mut self, ev: Ev) -> Result<(), Violation> {
        match ev {
            Ev::Dial(i) => {
                self.nodes[i].dialing = false;
                if self.nodes[i].offline || self.nodes[i].conn.is_some() {
                    return Ok(());
                }
                // Frames of steps handled on the previous connection must
                // never reach the next one: finish them first.
                self.flush(i)?;
                if !self.relay_up {
                    // The dial fails.
                    self.drive(i, Input::Disconnected)?;
                    return Ok(());
                }
                let id = self.next_conn;
                self.next_conn += 1;
                let session = self.core.new_session(self.now);
                self.conns.insert(
                    id,
                    Conn {
                        node: i,
                        session: Some(session),
                        alive: true,
                        to_client_at: self.now,
                        to_relay_at: self.now,
                    },
                );
                self.nodes[i].conn = Some(id);
                let l = self.latency();
                self.at(self.now + l, Ev::Connected(i, id));
            }
            Ev::Connected(i, c) => {
                if self.nodes[i].conn == Some(c) && self.conns.get(&c).is_some_and(|x| x.alive) {
                    self.drive(i, Input::Connected)?;
                }
            }
            Ev::Lost(i, c) => {
                if self.nodes[i].conn == Some(c) {
                    self.nodes[i].conn = None;
                    self.drive(i, Input::Disconnected)?;
                }
            }
            Ev::ToRelay(c, frame) => {
                if self.relay_up && self.conns.get(&c).is_some_and(|x| x.alive) {
                    self.relay_handle(c, frame)?;
                }
            }
            Ev::ToClient(c, frame) => {
                let Some(conn) = self.conns.get(&c) else {
                    return Ok(());
                };
                let i = conn.node;
                if !conn.alive || self.nodes[i].conn != Some(c) {
                    return Ok(());
                }
                let device = self.nodes[i].engine.device_id();
                let frame = self.mangle(frame, device);
                self.note_received(device, &frame);
                self.drive(i, Input::Frame(frame))?;
            }
            Ev::Commit(epoch, c, pending) => {
                if epoch == self.relay_epoch && self.relay_up {
                    if self.scenario.relay_sync {
                        self.write(c, pending)?;
                    } else {
                        self.commit(c, pending);
                    }
                }
            }
            Ev::Synced(epoch) => {
                if epoch == self.relay_epoch && self.relay_up {
                    self.synced()?;
                }
            }
            Ev::CloseConn(c) => self.cut(c),
            Ev::LocalCommit(i, generation) => {
                if self.nodes[i].commit_gen == generation {
                    self.commit_next(i, true)?;
                }
            }
            Ev::Timer(i, generation) => {
                if self.nodes[i].timer_gen == generation {
                    self.nodes[i].timer_at = None;
                    self.drive(i, Input::Tick)?;
                }
            }
            Ev::Send(i, to) => {
                let Some(key) = self.user_key(to) else {
                    return Ok(());
                };
                let conversation = self.nodes[i].engine.conversation_with(&key);
                self.text_counter += 1;
                let text = format!("{MARKER}{}-{}", self.seed, self.text_counter);
                let reply = self.command(
                    i,
                    Command::SendText {
                        conversation,
                        text: text.clone(),
                    },
                )?;
                if let Some(Reply::Message(id)) = reply {
                    let index = self.nodes[i].sent_order.len();
                    self.nodes[i].sent_order.push(id);
                    self.sent.push(SentMsg {
                        id,
                        node: i,
                        to_user: to,
                        conversation,
                        text,
                        index,
                    });
                }
            }
            Ev::GroupSend(i) => {
                let Some(g) = self.group else {
                    return Ok(());
                };
                let Some(info) = self.nodes[i].engine.group(&g).filter(|x| x.active) else {
                    return Ok(());
                };
                let after = self.nodes[i].engine.group_order(&g);
                self.text_counter += 1;
                let text = format!("{MARKER}{}-{}", self.seed, self.text_counter);
                let reply = self.command(
                    i,
                    Command::SendText {
                        conversation: g,
                        text,
                    },
                )?;
                if let Some(Reply::Message(id)) = reply {
                    self.group_sent.push(GroupSent {
                        id,
                        node: i,
                        members: info.members.into_iter().collect(),
                        after,
                    });
                }
            }
            Ev::GroupAdd(i) => {
                let Some(g) = self.group else {
                    return Ok(());
                };
                let last = self.scenario.devices.len() - 1;
                let Some(key) = self.user_key(last) else {
                    return Ok(());
                };
                let ok = self.nodes[i]
                    .engine
                    .group(&g)
                    .is_some_and(|x| x.active && !x.members.contains(&key));
                if ok {
                    if self.removed_users.contains(&self.nodes[i].user) {
                        self.contested_users.insert(last);
                    }
                    self.added_by = Some(self.nodes[i].user);
                    self.command(
                        i,
                        Command::AddMembers {
                            group: g,
                            members: vec![key],
                        },
                    )?;
                }
            }
            Ev::GroupRemove(i) => {
                let Some(g) = self.group else {
                    return Ok(());
                };
                let Some(info) = self.nodes[i].engine.group(&g).filter(|x| x.active) else {
                    return Ok(());
                };
                let me = self.nodes[i].user;
                let users = self.scenario.devices.len();
                let pick = self.rng.range(0, users as u64 - 1) as usize;
                // Never the last user (the one added during the run).
                let victim = (0..users - 1).map(|k| (pick + k) % (users - 1)).find(|&u| {
                    u != me
                        && self
                            .user_key(u)
                            .is_some_and(|key| info.members.contains(&key))
                });
                if let Some(v) = victim
                    && let Some(key) = self.user_key(v)
                {
                    self.removed_users.insert(v);
                    // The victim added the last user, and this device has
                    // not seen that add yet: the two changes are concurrent.
                    let last = users - 1;
                    if self.added_by == Some(v)
                        && self
                            .user_key(last)
                            .is_some_and(|key| !info.members.contains(&key))
                    {
                        self.contested_users.insert(last);
                    }
                    self.command(
                        i,
                        Command::RemoveMembers {
                            group: g,
                            members: vec![key],
                        },
                    )?;
                }
            }
            Ev::Recall(i) => {
                let pick = self
                    .sent
                    .iter()
                    .filter(|m| m.node == i && !self.recalled.contains(&m.id))
                    .map(|m| (m.id, m.conversation))
                    .next();
                if let Some((id, conversation)) = pick {
                    let reply = self.command(i, Command::Recall { conversation, id })?;
                    if reply.is_some() {
                        self.recalled.insert(id);
                    }
                }
            }
            Ev::Delete(i) => {
                if let Some(&(id, _, conversation)) = self.nodes[i].received.first() {
                    self.command(
                        i,
                        Command::Delete {
                            conversation,
                            ids: vec![id],
                        },
                    )?;
                }
            }
            Ev::Read(i) => {
                let mut by_conv: BTreeMap<ConversationId, Vec<(MessageId, DeviceId)>> =
                    BTreeMap::new();
                for &(id, d, c) in &self.nodes[i].received {
                    by_conv.entry(c).or_default().push((id, d));
                }
                for (conversation, messages) in by_conv {
                    self.command(
                        i,
                        Command::MarkRead {
                            conversation,
                            messages,
                        },
                    )?;
                }
            }
            Ev::Cut => {
                let alive: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.alive)
                    .map(|(k, _)| *k)
                    .collect();
                if !alive.is_empty() {
                    let k = alive[self.rng.range(0, alive.len() as u64 - 1) as usize];
                    self.cut(k);
                }
            }
            Ev::RelayDown(down, may_wait) => {
                if may_wait
                    && self.scenario.relay_sync
                    && self.unsynced.is_none()
                    && self.death_pending.is_none()
                    && self.rng.range(0, 1) == 1
                {
                    // Die in the next commit's window between write and sync.
                    self.death_pending = Some(down);
                    return Ok(());
                }
                if self.faults && self.relay_up {
                    self.report.relay_restarts += 1;
                    self.relay_up = false;
                    self.relay_epoch += 1;
                    // A commit written but not synced is gone: the restarted
                    // relay finds the store as it was before it.
                    if let Some(lost) = self.unsynced.take() {
                        self.report.early_lost += lost.early;
                    }
                    self.commit_queue.clear();
                    let all: Vec<u64> = self.conns.keys().copied().collect();
                    for c in all {
                        self.cut(c);
                    }
                    self.at(self.now + down, Ev::RelayUp);
                }
            }
            Ev::RelayUp => self.relay_up = true,
            Ev::Crash(i) => {
                if self.faults {
                    self.crash(i)?;
                }
            }
            Ev::Offline(i, d) => {
                if self.faults && !self.nodes[i].offline {
                    self.nodes[i].offline = true;
                    if let Some(c) = self.nodes[i].conn {
                        self.cut(c);
                    }
                    self.at(self.now + d, Ev::Online(i));
                }
            }
            Ev::Online(i) => {
                if self.nodes[i].offline {
                    self.nodes[i].offline = false;
                    self.nodes[i].dialing = true;
                    self.at(self.now, Ev::Dial(i));
                }
            }
            Ev::Purge => {
                let _ = self.store.purge_expired(self.now, 100_000);
                self.at(self.now + 10 * SECOND, Ev::Purge);
            }
        }
        Ok(())
    }

    /// Run a command on node `i` now; returns the reply if the step's storage
    /// was applied.
    pub fn command(&mut self, i: usize, c: Command) -> Result<Option<Reply>, Violation> {
        self.drive(i, Input::Command(c))
    }

    /// Feed one input to a node's engine and carry out its step like a real
    /// driver: early frames (once every earlier step is durable), storage,
    /// then frames, then events. Commands are always carried out at once
    /// (their reply says the command is stored); other inputs of a
    /// pipelined node are committed later (see [`Scenario::pipelined`]).
    fn drive(&mut self, i: usize, input: Input) -> Result<Option<Reply>, Violation> {
        let command = matches!(input, Input::Command(_));
        if command || !self.scenario.pipelined {
            // Everything before this step must be durable first.
            self.flush(i)?;
        }
        let label = if self.trace {
            trace_input(&input)
        } else {
            String::new()
        };
        let step = match self.nodes[i].engine.handle(self.now, input) {
            Ok(s) => s,
            Err(hush_client::ClientError::Unknown(_) | hush_client::ClientError::NotAllowed(_)) => {
                return Ok(None);
            }
            Err(e) => return Err(Violation::Engine(format!("node {i}: {e}"))),
        };
        if self.trace {
            eprintln!(
                "{:>8} n{i} {label} -> early {:?} frames {:?} events {:?} wake {:?} connect {:?}{}",
                self.now - START_MS,
                step.early_frames
                    .iter()
                    .map(trace_frame)
                    .collect::<Vec<_>>(),
                step.frames.iter().map(trace_frame).collect::<Vec<_>>(),
                step.events,
                step.wake_at.map(|t| t.saturating_sub(START_MS)),
                step.connect_at.map(|t| t.saturating_sub(START_MS)),
                if step.close { " CLOSE" } else { "" }
            );
        }
        let pending = PendingStep {
            storage: step.storage,
            had_early: !step.early_frames.is_empty(),
            early: step.early_frames,
            frames: step.frames,
            events: step.events,
        };
        let reply = step.reply;
        if step.close
            && let Some(c) = self.nodes[i].conn.take()
            && let Some(conn) = self.conns.get_mut(&c)
        {
            // Closing needs nothing durable: frames still pending for this
            // connection are dropped.
            conn.alive = false;
        }
        if let Some(w) = step.wake_at
            && self.nodes[i].timer_at != Some(w)
        {
            self.nodes[i].timer_gen += 1;
            self.nodes[i].timer_at = Some(w);
            let g = self.nodes[i].timer_gen;
            self.at(w, Ev::Timer(i, g));
        }
        if let Some(c) = step.connect_at
            && self.nodes[i].conn.is_none()
            && !self.nodes[i].dialing
            && !self.nodes[i].offline
        {
            self.nodes[i].dialing = true;
            self.at(c, Ev::Dial(i));
        }
        let first = self.nodes[i].pending.is_empty();
        self.nodes[i].pending.push_back(pending);
        if first {
            // Every earlier step is durable: the early frames leave now.
            self.send_early(i)?;
        }
        if command || !self.scenario.pipelined {
            let applied = self.commit_next(i, true)?;
            return Ok(if applied { reply } else { None });
        }
        if first {
            self.schedule_commit(i);
        }
        Ok(reply)
    }

    /// Send the early frames of the oldest pending step (every step before
    /// it is durable). With crashes on, sometimes crash right after them:
    /// the relay got a pull that acknowledges only earlier steps.
    fn send_early(&mut self, i: usize) -> Result<(), Violation> {
        let early = match self.nodes[i].pending.front_mut() {
            Some(p) => std::mem::take(&mut p.early),
            None => return Ok(()),
        };
        if early.is_empty() {
            return Ok(());
        }
        for frame in early {
            self.send_to_relay(i, frame);
        }
        if self.faults && self.chance(self.scenario.crash_bp * 10) {
            self.report.crashes_after_early += 1;
            self.crash(i)?;
        }
        Ok(())
    }

    fn schedule_commit(&mut self, i: usize) {
        let g = self.nodes[i].commit_gen;
        let d = self.rng.range(0, 3);
        self.at(self.now + d, Ev::LocalCommit(i, g));
    }

    /// Make the oldest pending step durable, then send the next step's
    /// early frames and this step's frames, and show its events. With
    /// `faults_allowed`, crashes may strike before or after the batch.
    /// Returns whether the batch was applied.
    fn commit_next(&mut self, i: usize, faults_allowed: bool) -> Result<bool, Violation> {
        let Some(step) = self.nodes[i].pending.pop_front() else {
            return Ok(false);
        };
        let bp = if faults_allowed && self.faults {
            self.scenario.crash_bp
        } else {
            0
        };
        if self.chance(bp / 2) {
            // Crash before the batch is durable: the step never happened
            // (its early frames may have left).
            if step.had_early {
                self.report.crashes_after_early += 1;
            }
            self.crash(i)?;
            return Ok(false);
        }
        self.nodes[i]
            .storage
            .apply(&step.storage)
            .map_err(|e| Violation::Engine(format!("storage: {e}")))?;
        if self.chance(bp / 2) {
            // Crash after the batch: frames and events are lost.
            self.report.crashes_after_storage += 1;
            self.crash(i)?;
            return Ok(true);
        }
        // The next step's early frames may leave now, even before this
        // step's frames (the order a real driver need not keep).
        let crashes = self.report.crashes;
        self.send_early(i)?;
        if self.report.crashes != crashes {
            return Ok(true);
        }
        for frame in step.frames {
            self.send_to_relay(i, frame);
        }
        for e in step.events {
            self.record(i, e);
        }
        if !self.nodes[i].pending.is_empty() {
            self.schedule_commit(i);
        }
        Ok(true)
    }

    /// Commit every pending step of a node now (no faults).
    fn flush(&mut self, i: usize) -> Result<(), Violation> {
        while !self.nodes[i].pending.is_empty() {
            self.commit_next(i, false)?;
        }
        Ok(())
    }

    fn record(&mut self, i: usize, e: Event) {
        match e {
            Event::GroupChanged { .. } => self.report.group_changes += 1,
            Event::Message(r) => {
                *self.nodes[i].shown.entry(r.id).or_default() += 1;
                if !r.outgoing {
                    self.nodes[i]
                        .received
                        .push((r.id, r.from_device, r.conversation));
                }
            }
            Event::Unrecoverable {
                conversation,
                from_device,
                count,
            } => {
                *self.nodes[i]
                    .unrecoverable
                    .entry((from_device, conversation))
                    .or_default() += count;
            }
            _ => {}
        }
    }

    fn crash(&mut self, i: usize) -> Result<(), Violation> {
        self.report.crashes += 1;
        // Whatever was not committed is gone.
        self.nodes[i].pending.clear();
        self.nodes[i].commit_gen += 1;
        if let Some(c) = self.nodes[i].conn.take()
            && let Some(conn) = self.conns.get_mut(&c)
        {
            conn.alive = false;
        }
        let seed = self.seed32();
        let records = self.nodes[i]
            .storage
            .load_state()
            .map_err(|e| Violation::Engine(format!("load: {e}")))?;
        self.nodes[i].engine = Engine::load(records, seed, self.scenario.engine_config())
            .map_err(|e| Violation::Engine(format!("reload after crash: {e}")))?;
        self.nodes[i].timer_at = None;
        self.nodes[i].timer_gen += 1;
        if !self.nodes[i].offline {
            self.nodes[i].dialing = true;
            self.at(self.now + 200, Ev::Dial(i));
        }
        Ok(())
    }

    fn cut(&mut self, c: u64) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        if !conn.alive {
            return;
        }
        conn.alive = false;
        let node = conn.node;
        let l = self.latency();
        self.at(self.now + l, Ev::Lost(node, c));
    }

    fn send_to_relay(&mut self, i: usize, frame: ClientFrame) {
        match encode_client_frame(&frame) {
            Ok(bytes) => self.scan(&bytes, "client frame"),
            Err(e) => self.leaks.push(format!("unencodable client frame: {e}")),
        }
        let Some(c) = self.nodes[i].conn else {
            return;
        };
        let l = self.latency();
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let t = (self.now + l).max(conn.to_relay_at);
        conn.to_relay_at = t;
        self.at(t, Ev::ToRelay(c, frame));
    }

    fn send_to_client(&mut self, c: u64, frame: ServerFrame) {
        let l = self.latency();
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let t = (self.now + l).max(conn.to_client_at);
        conn.to_client_at = t;
        self.at(t, Ev::ToClient(c, frame));
    }

    fn scan(&mut self, bytes: &[u8], what: &str) {
        let m = MARKER.as_bytes();
        if bytes.windows(m.len()).any(|w| w == m) {
            self.leaks.push(format!("plaintext marker in {what}"));
        }
    }

    /// Remember which envelope a device was handed under which relay seq.
    fn note_received(&mut self, device: DeviceId, frame: &ServerFrame) {
        let envelopes = match frame {
            ServerFrame::Push { envelopes } | ServerFrame::EarlyPush { envelopes } => envelopes,
            ServerFrame::Response {
                response: Response::Page(page),
                ..
            } => &page.envelopes,
            _ => return,
        };
        for d in envelopes {
            let h = &d.envelope.header;
            self.handed
                .insert((device, d.seq, h.sender_device, h.message_id));
        }
    }

    /// Relay-level exactly-once: an acknowledgement deletes only envelopes
    /// the device was handed under that very seq, or that the relay
    /// withheld from it (a hostile relay's choice: the device finds the
    /// gap in the sender's stream and asks for a resend). A device that counted an
    /// early push before it was durable would ack past a seq the restarted
    /// relay gave to another envelope, which it never received.
    fn check_ack(&self, c: u64, frame: &ClientFrame) -> Result<(), Violation> {
        let up_to = match frame.request {
            hush_protocol::Request::Ack { up_to } => up_to,
            hush_protocol::Request::Pull { ack, .. } => ack,
            _ => return Ok(()),
        };
        let Some(device) = self
            .conns
            .get(&c)
            .and_then(|x| x.session.as_ref())
            .and_then(|s| s.device())
        else {
            return Ok(());
        };
        let sim = |e: StoreError| Violation::Engine(format!("sim relay store: {e}"));
        let acked = self.store.inbox_state(&device).map_err(sim)?.acked;
        if up_to <= acked {
            return Ok(());
        }
        let page = self
            .store
            .pull(&device, acked, usize::MAX, usize::MAX)
            .map_err(sim)?;
        for e in page.envelopes.iter().filter(|e| e.seq <= up_to) {
            let env = hush_protocol::Envelope::from_bytes(&e.bytes)
                .map_err(|e| Violation::Engine(format!("sim relay: stored envelope: {e}")))?;
            let h = &env.header;
            if !self
                .handed
                .contains(&(device, e.seq, h.sender_device, h.message_id))
                && !self.withheld.contains(&(device, e.seq))
            {
                return Err(Violation::Invariant(format!(
                    "device {device:?} acknowledged relay seq {} (up to {up_to}) without ever being handed its envelope {:?}",
                    e.seq, h.message_id
                )));
            }
        }
        Ok(())
    }

    fn relay_handle(&mut self, c: u64, frame: ClientFrame) -> Result<(), Violation> {
        self.check_ack(c, &frame)?;
        let challenge = self.rng.bytes();
        let Some(mut session) = self.conns.get_mut(&c).and_then(|x| x.session.take()) else {
            return Ok(());
        };
        let actions = self.core.handle(&mut session, frame, self.now, challenge);
        if let Some(conn) = self.conns.get_mut(&c) {
            conn.session = Some(session);
        }
        self.relay_actions(c, actions);
        Ok(())
    }

    fn relay_actions(&mut self, c: u64, actions: Vec<Action>) {
        for a in actions {
            match a {
                // Through the relay's own encoder and the client's decoder,
                // so pages and pushes written from stored bytes are what the
                // client reads.
                Action::Send(f) => match f.encode().and_then(|b| decode_server_frame(&b)) {
                    Ok(f) => self.send_to_client(c, f),
                    Err(e) => self
                        .leaks
                        .push(format!("relay frame does not round-trip: {e}")),
                },
                Action::Commit(p) => {
                    let d = self.rng.range(1, 3);
                    let epoch = self.relay_epoch;
                    self.at(self.now + d, Ev::Commit(epoch, c, p));
                }
                Action::Authenticated(device) => {
                    let older: Vec<u64> = self
                        .conns
                        .iter()
                        .filter(|(k, x)| {
                            **k != c
                                && x.alive
                                && x.session.as_ref().and_then(|s| s.device()) == Some(device)
                        })
                        .map(|(k, _)| *k)
                        .collect();
                    for k in older {
                        self.send_to_client(
                            k,
                            ServerFrame::closing(ErrorCode::Replaced, "replaced"),
                        );
                        let t = self.conns.get(&k).map_or(self.now, |x| x.to_client_at) + 1;
                        self.at(t, Ev::CloseConn(k));
                    }
                }
                Action::Live(_) => self.pump(c),
                // The session itself remembers that it asked; `write`
                // pushes to such sessions (`Scenario::relay_sync`).
                Action::EarlyPushes(_) => {}
                Action::Evict(device) => {
                    let open: Vec<u64> = self
                        .conns
                        .iter()
                        .filter(|(_, x)| {
                            x.alive && x.session.as_ref().and_then(|s| s.device()) == Some(device)
                        })
                        .map(|(k, _)| *k)
                        .collect();
                    for k in open {
                        self.send_to_client(
                            k,
                            ServerFrame::closing(ErrorCode::DeviceRemoved, "removed"),
                        );
                        let t = self.conns.get(&k).map_or(self.now, |x| x.to_client_at) + 1;
                        self.at(t, Ev::CloseConn(k));
                    }
                }
                Action::Close { .. } => {
                    let t = self.conns.get(&c).map_or(self.now, |x| x.to_client_at) + 1;
                    self.at(t, Ev::CloseConn(c));
                }
            }
        }
    }

    fn pump(&mut self, c: u64) {
        let Some(mut session) = self.conns.get_mut(&c).and_then(|x| x.session.take()) else {
            return;
        };
        let actions = self.core.pump(&mut session);
        if let Some(conn) = self.conns.get_mut(&c) {
            conn.session = Some(session);
        }
        self.relay_actions(c, actions);
    }

    fn commit(&mut self, c: u64, p: PendingSend) {
        for e in &p.envelopes {
            let bytes = e.bytes.clone();
            self.scan(&bytes, "stored envelope");
        }
        let result = self.store.commit(&p.envelopes);
        self.committed(c, p, result);
    }

    /// [`Scenario::relay_sync`]: write a commit (its outcomes decided, its
    /// envelopes pushed early to the sessions that asked) without making it
    /// visible; [`World::synced`] makes it durable 2–4 ms later.
    fn write(&mut self, c: u64, p: PendingSend) -> Result<(), Violation> {
        if self.unsynced.is_some() {
            self.commit_queue.push_back((c, p));
            return Ok(());
        }
        for e in &p.envelopes {
            let bytes = e.bytes.clone();
            self.scan(&bytes, "stored envelope");
        }
        let sim = |e: StoreError| Violation::Engine(format!("sim relay store: {e}"));
        // Decide the outcomes, then put the store back: reads (pulls,
        // pumps) must not see the commit before its sync, as the real
        // relay's index does not.
        let before = self.store.snapshot().map_err(sim)?;
        let result = self.store.commit(&p.envelopes);
        self.store.restore(before).map_err(sim)?;
        let mut runs: BTreeMap<DeviceId, Vec<hush_protocol::RawDelivered>> = BTreeMap::new();
        if let Ok(outcomes) = &result {
            for (e, o) in p.envelopes.iter().zip(outcomes) {
                if let CommitOutcome::Stored { seq } = o {
                    let raw = hush_protocol::RawDelivered::new(*seq, e.bytes.clone())
                        .map_err(|e| Violation::Engine(format!("sim relay: {e}")))?;
                    runs.entry(e.recipient).or_default().push(raw);
                }
            }
        }
        let mut early = 0;
        // When the last early push reaches its device.
        let mut arrive = self.now;
        let live: Vec<(u64, DeviceId)> = self
            .conns
            .iter()
            .filter(|(_, x)| x.alive)
            .filter_map(|(k, x)| {
                let s = x.session.as_ref()?;
                let d = s.device()?;
                (s.wants_early() && runs.contains_key(&d)).then_some((*k, d))
            })
            .collect();
        for (k, d) in live {
            let Some(mut session) = self.conns.get_mut(&k).and_then(|x| x.session.take()) else {
                continue;
            };
            let run: Vec<_> = runs
                .get(&d)
                .map(|r| {
                    r.iter()
                        .filter(|e| e.seq() > session.delivered())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let n = run.len() as u64;
            let actions = self.core.push_fresh(&mut session, run, true);
            if let Some(conn) = self.conns.get_mut(&k) {
                conn.session = Some(session);
            }
            if let Some(actions) = actions {
                early += n;
                self.relay_actions(k, actions);
                if let Some(conn) = self.conns.get(&k) {
                    arrive = arrive.max(conn.to_client_at);
                }
            }
        }
        self.report.early_pushed += early;
        self.unsynced = Some(Unsynced {
            c,
            pending: p,
            result,
            early,
        });
        let mut synced_at = self.now + self.rng.range(2, 4);
        if self.faults
            && let Some(down) = self.death_pending.take()
        {
            // The relay dies once its early pushes have reached their
            // devices, before its sync (the real relay's sync is slower
            // than a push over loopback; the simulated network is slower).
            synced_at = synced_at.max(arrive + 1);
            self.at(arrive.max(self.now + 1), Ev::RelayDown(down, false));
        }
        self.at(synced_at, Ev::Synced(self.relay_epoch));
        Ok(())
    }

    /// The unsynced commit is durable: apply it for reads, answer its
    /// sender, push to its recipients and tell early sessions.
    fn synced(&mut self) -> Result<(), Violation> {
        let Some(u) = self.unsynced.take() else {
            return Ok(());
        };
        let applied = self.store.commit(&u.pending.envelopes);
        let same = match (&applied, &u.result) {
            (Ok(a), Ok(b)) => a == b,
            (Err(_), Err(_)) => true,
            _ => false,
        };
        if !same {
            return Err(Violation::Engine(format!(
                "sim relay: a commit's outcomes changed between its write and its sync: {:?} then {:?}",
                u.result, applied
            )));
        }
        self.committed(u.c, u.pending, u.result);
        if let Some((c, p)) = self.commit_queue.pop_front() {
            self.write(c, p)?;
        }
        Ok(())
    }

    /// A commit is durable: answer its sender, push to its recipients'
    /// live sessions and tell those that took it early.
    fn committed(
        &mut self,
        c: u64,
        p: PendingSend,
        result: Result<Vec<CommitOutcome>, StoreError>,
    ) {
        let recipients: BTreeSet<DeviceId> = p.envelopes.iter().map(|e| e.recipient).collect();
        let frame = self.core.finish_send(p.ticket, result);
        if self.conns.get(&c).is_some_and(|x| x.alive) {
            self.send_to_client(c, frame);
        }
        let live: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, x)| {
                x.alive
                    && x.session.as_ref().is_some_and(|s| {
                        s.is_live() && s.device().is_some_and(|d| recipients.contains(&d))
                    })
            })
            .map(|(k, _)| *k)
            .collect();
        for k in live {
            self.pump(k);
            self.durable_notice(k);
        }
    }

    /// Tell a session what of its early pushes is durable now.
    fn durable_notice(&mut self, k: u64) {
        let Some(mut session) = self.conns.get_mut(&k).and_then(|x| x.session.take()) else {
            return;
        };
        let head = session
            .device()
            .and_then(|d| self.store.inbox_state(&d).ok())
            .map_or(0, |s| s.head);
        let notice = self.core.durable_notice(&mut session, head);
        if let Some(conn) = self.conns.get_mut(&k) {
            conn.session = Some(session);
        }
        if let Some(action) = notice {
            self.relay_actions(k, vec![action]);
        }
    }

    /// Relay misbehaviour on the way to a client: withhold, duplicate or
    /// swap envelopes inside pages and pushes.
    fn mangle(&mut self, frame: ServerFrame, device: DeviceId) -> ServerFrame {
        let (w, d, r) = if self.faults {
            (
                self.scenario.withhold_bp,
                self.scenario.dup_bp,
                self.scenario.reorder_bp,
            )
        } else {
            (0, 0, 0)
        };
        let fix = |envs: &mut Vec<hush_protocol::Delivered>, world: &mut World| {
            let mut out = Vec::with_capacity(envs.len());
            for e in envs.drain(..) {
                if world.chance(w) {
                    world.report.withheld += 1;
                    world.withheld.insert((device, e.seq));
                    continue;
                }
                if world.chance(d) {
                    out.push(e.clone());
                }
                out.push(e);
            }
            if out.len() >= 2 && world.chance(r) {
                let k = world.rng.range(0, out.len() as u64 - 2) as usize;
                out.swap(k, k + 1);
            }
            *envs = out;
        };
        match frame {
            ServerFrame::Push { mut envelopes } => {
                fix(&mut envelopes, self);
                ServerFrame::Push { envelopes }
            }
            ServerFrame::EarlyPush { mut envelopes } => {
                fix(&mut envelopes, self);
                ServerFrame::EarlyPush { envelopes }
            }
            ServerFrame::Durable { through }
                if self.faults && self.chance(self.scenario.forge_bp) =>
            {
                // A hostile relay claims more is durable than is: the
                // client holds the claim to what it was pushed early.
                self.report.durable_forged += 1;
                ServerFrame::Durable {
                    through: through.saturating_add(1_000),
                }
            }
            ServerFrame::Response {
                request_id,
                response: Response::Page(mut page),
            } => {
                if page.truncated.is_some() {
                    self.report.truncations += 1;
                }
                let forge = if self.faults {
                    self.scenario.forge_bp
                } else {
                    0
                };
                if let Some(h) = page.envelopes.first().map(|d| d.envelope.header.clone())
                    && self.chance(forge)
                {
                    let first = h.sender_seq.saturating_add(1_000);
                    let t = page.truncated.get_or_insert(hush_protocol::Truncation {
                        oldest_retained: 0,
                        dropped_count: 0,
                        dropped: Vec::new(),
                    });
                    t.dropped.push(hush_protocol::DroppedRange {
                        sender: h.sender_device,
                        conversation: h.conversation_id,
                        first_seq: first,
                        last_seq: first.saturating_add(999),
                    });
                }
                fix(&mut page.envelopes, self);
                ServerFrame::Response {
                    request_id,
                    response: Response::Page(page),
                }
            }
            other => other,
        }
    }
}

fn trace_input(i: &Input) -> String {
    match i {
        Input::Frame(ServerFrame::Response {
            request_id,
            response,
        }) => {
            let r = match response {
                Response::Page(p) => format!(
                    "Page(seqs {:?}, remaining {}, truncated {})",
                    p.envelopes.iter().map(|d| d.seq).collect::<Vec<_>>(),
                    p.remaining,
                    p.truncated.is_some()
                ),
                Response::Sent { outcomes } => format!("Sent({} outcomes)", outcomes.len()),
                other => {
                    let s = format!("{other:?}");
                    s.chars().take(60).collect()
                }
            };
            format!("Response#{request_id} {r}")
        }
        Input::Frame(ServerFrame::Push { envelopes }) => format!(
            "Push(seqs {:?})",
            envelopes.iter().map(|d| d.seq).collect::<Vec<_>>()
        ),
        Input::Frame(ServerFrame::EarlyPush { envelopes }) => format!(
            "EarlyPush(seqs {:?})",
            envelopes.iter().map(|d| d.seq).collect::<Vec<_>>()
        ),
        Input::Frame(f) => {
            let s = format!("{f:?}");
            s.chars().take(80).collect()
        }
        Input::Command(c) => {
            let s = format!("{c:?}");
            s.chars().take(60).collect()
        }
        other => format!("{other:?}"),
    }
}

fn trace_frame(f: &ClientFrame) -> String {
    use hush_protocol::Request;
    let r = match &f.request {
        Request::Send { envelopes } => format!(
            "Send[{}]",
            envelopes
                .iter()
                .map(|e| format!(
                    "{}>{}:{}",
                    &e.header.sender_device.to_hex()[..4],
                    &e.header.recipient_device.to_hex()[..4],
                    e.header.sender_seq
                ))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Request::Pull { after, ack, .. } => format!("Pull(after {after}, ack {ack})"),
        Request::Ack { up_to } => format!("Ack({up_to})"),
        other => {
            let s = format!("{other:?}");
            s.chars().take(40).collect()
        }
    };
    format!("#{} {r}", f.request_id)
}
