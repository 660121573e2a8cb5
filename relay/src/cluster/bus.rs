//! The cluster bus: how the nodes of a cluster tell each other that inboxes
//! grew and that a device connected.
//!
//! Two kinds of events travel on it, in one total order per channel:
//!
//! - **inbox moved** (channel [`INBOX_CHANNEL`]): devices whose inbox head
//!   moved, with the new head. Each node bumps its [`DeviceHub`] watch for
//!   those of its devices that are connected, exactly as its own writer does
//!   after a local commit. With PostgreSQL the node sends this NOTIFY
//!   right after the commit returned (so it is delivered only after the
//!   commit is visible); one lost between commit and NOTIFY (the node
//!   died) only delays the push, and every node's periodic safety wake-up
//!   ([`super::pg::SAFETY_WAKE`]) bounds that delay.
//! - **claimed** (channel [`PRESENCE_CHANNEL`]): a connection of node `n`
//!   authenticated as device `d`. Every node sees every claim in the same
//!   order, its own included; see [`DeviceHub::apply_claim`] for how that
//!   makes the newest connection win cluster-wide.
//! - **removed** (channel [`PRESENCE_CHANNEL`] too): a node accepted a
//!   device list that removed device `d`. Every node closes its connection
//!   of `d`, if it has one, with `DeviceRemoved`, as the accepting node does
//!   for its own; without this, a removed device's session on another node
//!   would stay open until its next (refused) authentication.
//!
//! When a node's bus connection is lost and re-made, events may have been
//! lost meanwhile: the node wakes every local device once
//! ([`DeviceHub::wake_all`]), and each connection re-reads its inbox.
//!
//! Payloads are short ASCII strings (NOTIFY payloads must stay under 8000
//! bytes): inbox moves are `<device hex>:<head>` items joined by `,`,
//! batched by [`inbox_payloads`]; a claim is `<device hex>:<node hex>:<conn>`;
//! a removal is `rm:<device hex>`.

use crate::server::hub::DeviceHub;
use hush_protocol::DeviceId;
use std::sync::Arc;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// NOTIFY channel of inbox moves (one per shard's database).
pub const INBOX_CHANNEL: &str = "hush_inbox";
/// NOTIFY channel of claims (on shard 0's database only, for one order).
pub const PRESENCE_CHANNEL: &str = "hush_presence";
/// Most bytes of one payload we send (PostgreSQL's limit is 8000).
pub const MAX_PAYLOAD: usize = 7900;

/// A relay node's identity within the cluster: random per process start,
/// so a restarted node never mistakes an old claim for one of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(pub u64);

impl NodeId {
    /// A fresh random node id.
    pub fn random() -> NodeId {
        let mut b = [0u8; 8];
        // Without OS randomness, the time still tells restarts apart.
        if getrandom::fill(&mut b).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            b = t.to_be_bytes();
        }
        NodeId(u64::from_be_bytes(b))
    }
}

/// One event from the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// These inboxes now hold envelopes up to these heads.
    InboxMoved(Vec<(DeviceId, u64)>),
    /// Connection `conn` of node `node` claimed `device`.
    Claimed {
        /// The device.
        device: DeviceId,
        /// The claiming node.
        node: NodeId,
        /// The connection's id on that node.
        conn: u64,
    },
    /// A node accepted a device list that removed this device.
    Removed(DeviceId),
    /// Events may have been lost (the bus connection was re-made).
    Resync,
}

/// Apply one bus event to this node's hub.
pub fn apply(hub: &DeviceHub, me: NodeId, event: &ClusterEvent) {
    match event {
        ClusterEvent::InboxMoved(moved) => {
            for (device, head) in moved {
                hub.notify(device, *head);
            }
        }
        ClusterEvent::Claimed { device, node, conn } => {
            if hub.apply_claim(device, (*node == me).then_some(*conn)) {
                tracing::debug!(
                    node = node.0,
                    "a connection on another node replaced a local one"
                );
            }
        }
        ClusterEvent::Removed(device) => {
            if hub.evict(device) {
                tracing::debug!("a removed device's connection closed on word from the cluster");
            }
        }
        ClusterEvent::Resync => hub.wake_all(),
    }
}

/// Split inbox moves into NOTIFY payloads of at most [`MAX_PAYLOAD`] bytes.
pub fn inbox_payloads(moved: &[(DeviceId, u64)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for (device, head) in moved {
        let item = format!("{}:{head}", device.to_hex());
        if !cur.is_empty() && cur.len() + 1 + item.len() > MAX_PAYLOAD {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(',');
        }
        cur.push_str(&item);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The payload of a claim.
pub fn claim_payload(device: &DeviceId, node: NodeId, conn: u64) -> String {
    format!("{}:{:016x}:{conn}", device.to_hex(), node.0)
}

/// The prefix of a removal on [`PRESENCE_CHANNEL`].
const REMOVED_PREFIX: &str = "rm:";

/// The payload of a removal.
pub fn removal_payload(device: &DeviceId) -> String {
    format!("{REMOVED_PREFIX}{}", device.to_hex())
}

/// Parse a notification of `channel` (`None` for an unknown channel or a
/// malformed payload, which is skipped).
pub fn parse(channel: &str, payload: &str) -> Option<ClusterEvent> {
    match channel {
        INBOX_CHANNEL => {
            let mut moved = Vec::new();
            for item in payload.split(',') {
                let (device, head) = item.split_once(':')?;
                moved.push((DeviceId::from_hex(device).ok()?, head.parse().ok()?));
            }
            Some(ClusterEvent::InboxMoved(moved))
        }
        PRESENCE_CHANNEL => {
            if let Some(device) = payload.strip_prefix(REMOVED_PREFIX) {
                return Some(ClusterEvent::Removed(DeviceId::from_hex(device).ok()?));
            }
            let mut parts = payload.split(':');
            let device = DeviceId::from_hex(parts.next()?).ok()?;
            let node = NodeId(u64::from_str_radix(parts.next()?, 16).ok()?);
            let conn = parts.next()?.parse().ok()?;
            if parts.next().is_some() {
                return None;
            }
            Some(ClusterEvent::Claimed { device, node, conn })
        }
        _ => None,
    }
}

/// Where a node publishes its events.
pub trait ClusterBus: Send + Sync + 'static {
    /// Connection `conn` of node `node` claimed `device` (called right
    /// after the local [`DeviceHub::claim`]). A bus that sends claims
    /// asynchronously returns a receiver that completes once the claim is
    /// in the bus's order (sent, or given up): the connection waits for it
    /// (bounded) before answering `AuthOk`, so a device's next connection,
    /// made after that answer, is always later in the order.
    fn publish_claim(
        &self,
        device: DeviceId,
        node: NodeId,
        conn: u64,
    ) -> Option<tokio::sync::oneshot::Receiver<()>>;

    /// This node accepted a device list that removed `device` (its own
    /// connection of it was closed already). Best effort: a removal lost on
    /// the way leaves the device's connection on another node open until
    /// it next authenticates, which the store then refuses.
    fn publish_removed(&self, device: DeviceId);

    /// A local commit moved these inbox heads. A bus whose store already
    /// announces commits inside its transactions ignores this.
    fn publish_inbox(&self, moved: &[(DeviceId, u64)]);

    /// Start delivering the bus's events to `hub` (this node is `me`) until
    /// `shutdown` turns true; returns the tasks doing it.
    fn start(
        &self,
        hub: Arc<DeviceHub>,
        me: NodeId,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>>;
}

/// An in-process bus: every node attached to it sees every event in one
/// order. For tests of several nodes in one process, and as the model of
/// what the PostgreSQL bus provides.
#[derive(Debug, Clone)]
pub struct MemoryBus {
    tx: broadcast::Sender<ClusterEvent>,
}

impl MemoryBus {
    /// A bus that buffers up to `capacity` events per lagging node (a node
    /// that falls further behind gets [`ClusterEvent::Resync`]).
    pub fn new(capacity: usize) -> MemoryBus {
        let (tx, _) = broadcast::channel(capacity.max(1));
        MemoryBus { tx }
    }

    /// Deliver this bus's events to `hub` (node `me`) until the bus is
    /// dropped. Events published before this call are not delivered.
    pub fn attach(&self, hub: Arc<DeviceHub>, me: NodeId) -> JoinHandle<()> {
        let (_keep, never) = watch::channel(false);
        let mut rx = self.tx.subscribe();
        tokio::spawn(async move {
            let _keep = _keep;
            deliver(&mut rx, &hub, me, never).await;
        })
    }

    /// Publish an event as a node would.
    pub fn send(&self, event: ClusterEvent) {
        // No subscriber is not an error: nobody to tell.
        let _ = self.tx.send(event);
    }
}

/// Apply a broadcast receiver's events until the bus or `shutdown` ends.
async fn deliver(
    rx: &mut broadcast::Receiver<ClusterEvent>,
    hub: &DeviceHub,
    me: NodeId,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let got = tokio::select! {
            got = rx.recv() => got,
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    return;
                }
                continue;
            }
        };
        match got {
            Ok(event) => apply(hub, me, &event),
            // Events were lost: wake everything instead.
            Err(broadcast::error::RecvError::Lagged(_)) => apply(hub, me, &ClusterEvent::Resync),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl ClusterBus for MemoryBus {
    fn publish_claim(
        &self,
        device: DeviceId,
        node: NodeId,
        conn: u64,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        // In the order as soon as it is sent.
        self.send(ClusterEvent::Claimed { device, node, conn });
        None
    }

    fn publish_removed(&self, device: DeviceId) {
        // Same payload and parsing as the PostgreSQL bus.
        if let Some(event) = parse(PRESENCE_CHANNEL, &removal_payload(&device)) {
            self.send(event);
        }
    }

    fn publish_inbox(&self, moved: &[(DeviceId, u64)]) {
        // Same batching and parsing as the PostgreSQL payloads.
        for payload in inbox_payloads(moved) {
            if let Some(event) = parse(INBOX_CHANNEL, &payload) {
                self.send(event);
            }
        }
    }

    fn start(
        &self,
        hub: Arc<DeviceHub>,
        me: NodeId,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let mut rx = self.tx.subscribe();
        vec![tokio::spawn(async move {
            deliver(&mut rx, &hub, me, shutdown).await;
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(i: u16) -> DeviceId {
        let mut b = [0u8; 16];
        b[..2].copy_from_slice(&i.to_be_bytes());
        DeviceId(b)
    }

    #[test]
    fn inbox_payloads_stay_under_the_notify_limit_and_round_trip() {
        let moved: Vec<(DeviceId, u64)> = (0..1000).map(|i| (dev(i), u64::MAX - 7)).collect();
        let payloads = inbox_payloads(&moved);
        assert!(payloads.len() > 1, "a thousand heads need several payloads");
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() <= MAX_PAYLOAD && p.len() < 8000);
            match parse(INBOX_CHANNEL, p) {
                Some(ClusterEvent::InboxMoved(m)) => back.extend(m),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(back, moved);
        assert!(inbox_payloads(&[]).is_empty());
    }

    #[test]
    fn claims_round_trip_and_malformed_payloads_are_skipped() {
        let node = NodeId(0xdead_beef_0000_0001);
        let p = claim_payload(&dev(3), node, 42);
        assert_eq!(
            parse(PRESENCE_CHANNEL, &p),
            Some(ClusterEvent::Claimed {
                device: dev(3),
                node,
                conn: 42
            })
        );
        for bad in ["", "zz:1:2", "00:1:2", &format!("{p}:9"), "x"] {
            assert_eq!(parse(PRESENCE_CHANNEL, bad), None, "{bad}");
        }
        for bad in ["", "00ff:1", &format!("{}:-1", dev(1).to_hex())] {
            assert_eq!(parse(INBOX_CHANNEL, bad), None, "{bad}");
        }
        assert_eq!(parse("other", &p), None);
        assert_eq!(
            parse(PRESENCE_CHANNEL, &removal_payload(&dev(4))),
            Some(ClusterEvent::Removed(dev(4)))
        );
        for bad in ["rm:", "rm:zz", &format!("rm:{}:1", dev(4).to_hex())] {
            assert_eq!(parse(PRESENCE_CHANNEL, bad), None, "{bad}");
        }
    }

    /// A removal published by one node closes the device's connection on
    /// another, with `Removed` (not `Replaced`).
    #[tokio::test]
    async fn a_removal_on_one_node_closes_the_devices_connection_on_another() {
        let bus = MemoryBus::new(64);
        let (hub_a, hub_b) = (
            Arc::new(DeviceHub::default()),
            Arc::new(DeviceHub::default()),
        );
        let _ta = bus.attach(Arc::clone(&hub_a), NodeId(1));
        let _tb = bus.attach(Arc::clone(&hub_b), NodeId(2));
        let (d, other) = (dev(7), dev(8));
        let mut on_b = hub_b.claim(d, 1);
        let mut other_on_b = hub_b.claim(other, 2);
        bus.publish_removed(d);
        let why = tokio::time::timeout(std::time::Duration::from_secs(5), &mut on_b.replaced)
            .await
            .expect("the removed device's connection on B is closed")
            .expect("closer sent");
        assert!(matches!(why, crate::server::hub::Displaced::Removed));
        assert!(
            other_on_b.replaced.try_recv().is_err(),
            "another device stays"
        );
    }

    /// Two nodes on one bus: a commit on node A wakes the device's
    /// connection on node B, and a newer connection on node B replaces the
    /// older one on node A (and not the other way round).
    #[tokio::test]
    async fn two_hubs_on_one_bus_push_across_and_newest_claim_wins() {
        let bus = MemoryBus::new(64);
        let (hub_a, hub_b) = (
            Arc::new(DeviceHub::default()),
            Arc::new(DeviceHub::default()),
        );
        let (a, b) = (NodeId(1), NodeId(2));
        let _ta = bus.attach(Arc::clone(&hub_a), a);
        let _tb = bus.attach(Arc::clone(&hub_b), b);
        let d = dev(9);
        let wait = std::time::Duration::from_secs(5);

        let mut on_a = hub_a.claim(d, 1);
        assert!(bus.publish_claim(d, a, 1).is_none());
        // Node A commits for the device; B has no connection for it yet.
        bus.publish_inbox(&[(d, 1)]);
        tokio::time::timeout(wait, on_a.inbox.changed())
            .await
            .expect("A's own connection is woken")
            .expect("watch open");

        let mut on_b = hub_b.claim(d, 1);
        assert!(bus.publish_claim(d, b, 1).is_none());
        tokio::time::timeout(wait, &mut on_a.replaced)
            .await
            .expect("the older connection on A is replaced")
            .expect("closer sent");
        assert!(
            on_b.replaced.try_recv().is_err(),
            "the newer connection on B stays"
        );
        bus.publish_inbox(&[(d, 2)]);
        tokio::time::timeout(wait, on_b.inbox.changed())
            .await
            .expect("a commit announced on the bus wakes B's connection")
            .expect("watch open");
        assert_eq!(*on_b.inbox.borrow_and_update(), 2);
    }

    #[tokio::test]
    async fn a_lagging_node_wakes_everything_instead_of_losing_pushes() {
        let bus = MemoryBus::new(1);
        let hub = Arc::new(DeviceHub::default());
        let d = dev(1);
        let mut c = hub.claim(d, 1);
        // Overflow the node's queue before its task runs: the events for
        // `d` are lost, and the node must still wake `d`.
        let task = bus.attach(Arc::clone(&hub), NodeId(5));
        for i in 0..10 {
            bus.publish_inbox(&[(dev(100 + i), 1)]);
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), c.inbox.changed())
            .await
            .expect("woken after the lag")
            .expect("watch open");
        drop(bus);
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the node's bus task ends with the bus")
            .expect("no panic");
    }
}
