//! Which connection currently speaks for each device, and how it learns
//! that its inbox changed.
//!
//! Per device there is a `watch` channel carrying the inbox's highest
//! committed seq: the group-commit writer bumps it after every durable
//! commit, and a live connection wakes up, marks the value seen, then reads
//! the store. Marking before reading means a commit can never slip between
//! the two unnoticed. The writer also leaves the envelopes it just
//! committed here for a watched device ([`DeviceHub::committed_fresh`]),
//! so that the connection can push them without reading them back
//! ([`DeviceHub::fresh_after`]); it reads the store whenever they are not
//! exactly the run it owes. For an owner that asked for early pushes
//! (docs/PROTOCOL.md §8.5) the writer also leaves what a commit has written
//! before its sync ([`DeviceHub::written_early`]), waking the connection
//! without moving the head; the connection pushes it as `EarlyPush` and
//! says `Durable` once the head passes it. Presence is one owner per device: a newer connection
//! claims the device and the previous owner is told to close (`Replaced`).
//!
//! In a cluster (see [`crate::cluster`]) the same hub also takes remote
//! events: inbox heads moved by other nodes' commits ([`DeviceHub::notify`]),
//! claims made on other nodes ([`DeviceHub::apply_claim`]), and a wake-up of
//! every local device after the cluster bus may have lost events
//! ([`DeviceHub::wake_all`]).

use crate::cluster::bus::{ClusterBus, NodeId};
use hush_protocol::{DeviceId, RawDelivered};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, watch};

/// Envelopes kept per watched device for [`DeviceHub::fresh_after`].
const FRESH_MAX: usize = 64;
/// Their bytes at most, per device.
const FRESH_MAX_BYTES: usize = 256 * 1024;
/// Their bytes at most, all devices together: past it, pushes read the
/// store (as they would anyway), and memory stays bounded whatever is sent
/// to how many connected devices.
const FRESH_TOTAL_MAX_BYTES: usize = 32 << 20;

/// The envelopes a node's last commits added to one watched inbox.
struct Fresh {
    /// Oldest first, contiguous in seq.
    envelopes: VecDeque<RawDelivered>,
    bytes: usize,
    /// The bytes of every device's, shared by the hub.
    total: Arc<AtomicUsize>,
}

impl Fresh {
    fn push(&mut self, raw: RawDelivered) {
        if self
            .envelopes
            .back()
            .is_some_and(|last| last.seq().saturating_add(1) != raw.seq())
        {
            // Not contiguous (another node's commit in between): start
            // over from this one.
            self.take();
        }
        let len = raw.bytes().len();
        if self.total.load(Ordering::Relaxed).saturating_add(len) > FRESH_TOTAL_MAX_BYTES {
            // A gap from here on: the run is no longer whole.
            self.take();
            return;
        }
        self.bytes += len;
        self.total.fetch_add(len, Ordering::Relaxed);
        self.envelopes.push_back(raw);
        while self.envelopes.len() > FRESH_MAX || self.bytes > FRESH_MAX_BYTES {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some(old) = self.envelopes.pop_front() {
            let len = old.bytes().len();
            self.bytes -= len;
            self.total.fetch_sub(len, Ordering::Relaxed);
        }
    }

    fn take(&mut self) -> VecDeque<RawDelivered> {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        std::mem::take(&mut self.envelopes)
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        self.take();
    }
}

struct Entry {
    inbox: watch::Sender<u64>,
    /// The envelopes this node's last commits added to the inbox while a
    /// connection watches it: its push takes them from here instead of
    /// reading them back from the store.
    fresh: Fresh,
    /// The owner asked for early pushes ([`DeviceHub::enable_early`]).
    early_on: bool,
    /// The envelopes this node's commits wrote to the inbox before their
    /// sync (only while `early_on`): [`DeviceHub::early_after`].
    early: Fresh,
    /// The one-time prekeys left after the last fetch that took the pool
    /// to or below the low-water mark (see [`DeviceHub::prekeys_low`]).
    prekeys_low: watch::Sender<Option<u32>>,
    owner: Option<Owner>,
    /// The highest ack a connection of the device on this node received
    /// (see [`Claim::acks_seen`]).
    acks_seen: u64,
}

/// Why a connection is told to close by the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Displaced {
    /// A newer connection of the same device took over.
    Replaced,
    /// The device's user removed it (a newer device list dropped it).
    Removed,
}

struct Owner {
    conn_id: u64,
    closer: oneshot::Sender<Displaced>,
    /// The cluster bus has delivered this connection's own claim back: every
    /// claim the bus delivers from now on was made after it.
    confirmed: bool,
}

/// The per-device registry shared by all connections and the writer.
#[derive(Default)]
pub struct DeviceHub {
    devices: Mutex<HashMap<DeviceId, Entry>>,
    /// Bytes of every device's fresh envelopes ([`FRESH_TOTAL_MAX_BYTES`]).
    fresh_total: Arc<AtomicUsize>,
    /// Devices whose owner asked for early pushes: while none did, a commit
    /// skips [`DeviceHub::written_early`]'s lookups.
    early_owners: AtomicUsize,
    /// In a cluster: this node and the bus its claims and commits go to.
    cluster: Option<(NodeId, Arc<dyn ClusterBus>)>,
}

impl std::fmt::Debug for DeviceHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHub")
            .field("devices", &self.len())
            .finish()
    }
}

/// What a connection gets when it claims a device.
#[derive(Debug)]
pub struct Claim {
    /// Changes whenever the device's inbox gains envelopes.
    pub inbox: watch::Receiver<u64>,
    /// Fires when a newer connection claims the same device, or when the
    /// device is removed.
    pub replaced: oneshot::Receiver<Displaced>,
    /// Changes when other devices' fetches ran the device's one-time
    /// prekey pool low; holds how many are left.
    pub prekeys_low: watch::Receiver<Option<u32>>,
    /// In a cluster: completes once the claim is in the bus's order (see
    /// [`ClusterBus::publish_claim`]).
    pub published: Option<oneshot::Receiver<()>>,
    /// The highest ack the device's earlier connections on this node
    /// received (as `Pull`s' merged acks, noted by [`DeviceHub::saw_ack`]).
    /// A connection applies such an ack only after the page it came with,
    /// and holds it back during a catch-up; the connection it displaced may
    /// not have applied it yet, or be stuck writing to a peer that is gone.
    /// The new connection applies it itself before its `AuthOk` reports the
    /// cursor (acks are cumulative, so applying one twice changes nothing).
    pub acks_seen: u64,
}

impl DeviceHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every update is a single insert/remove), so poisoning is ignored.
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A hub of node `node` of a cluster: claims and commits are also
    /// published on `bus` (whose events the node applies to this hub, see
    /// [`crate::cluster::bus::apply`]).
    pub fn clustered(node: NodeId, bus: Arc<dyn ClusterBus>) -> DeviceHub {
        DeviceHub {
            devices: Mutex::default(),
            fresh_total: Arc::default(),
            early_owners: AtomicUsize::new(0),
            cluster: Some((node, bus)),
        }
    }

    /// Make connection `conn_id` the device's owner; the previous owner, if
    /// any, is signalled to close. In a cluster the claim is published, so
    /// that an older connection of the device on another node closes too.
    pub fn claim(&self, device: DeviceId, conn_id: u64) -> Claim {
        let mut claim = self.claim_local(device, conn_id);
        if let Some((node, bus)) = &self.cluster {
            claim.published = bus.publish_claim(device, *node, conn_id);
        }
        claim
    }

    fn claim_local(&self, device: DeviceId, conn_id: u64) -> Claim {
        let (tx, rx) = oneshot::channel();
        let mut map = self.lock();
        let entry = map.entry(device).or_insert_with(|| Entry {
            inbox: watch::Sender::new(0),
            fresh: Fresh {
                envelopes: VecDeque::new(),
                bytes: 0,
                total: Arc::clone(&self.fresh_total),
            },
            early_on: false,
            early: Fresh {
                envelopes: VecDeque::new(),
                bytes: 0,
                total: Arc::clone(&self.fresh_total),
            },
            prekeys_low: watch::Sender::new(None),
            owner: None,
            acks_seen: 0,
        });
        let new = Owner {
            conn_id,
            closer: tx,
            confirmed: false,
        };
        if let Some(old) = entry.owner.replace(new) {
            let _ = old.closer.send(Displaced::Replaced);
        }
        // A new owner starts without early pushes until it asks.
        self.end_early(entry);
        Claim {
            inbox: entry.inbox.subscribe(),
            replaced: rx,
            prekeys_low: entry.prekeys_low.subscribe(),
            published: None,
            acks_seen: entry.acks_seen,
        }
    }

    /// The device was removed by its user: its connection on this node, if
    /// any, is told to close (it then says `DeviceRemoved`). Returns whether
    /// there was one.
    pub fn evict(&self, device: &DeviceId) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(device) else {
            return false;
        };
        let Some(owner) = entry.owner.take() else {
            return false;
        };
        self.end_early(entry);
        let _ = owner.closer.send(Displaced::Removed);
        if entry.inbox.receiver_count() == 0 {
            map.remove(device);
        }
        true
    }

    /// This node accepted a device list that removed `device`: close its
    /// connection here and, in a cluster, on every other node. Returns
    /// whether this node had one.
    pub fn removed(&self, device: &DeviceId) -> bool {
        let here = self.evict(device);
        if let Some((_, bus)) = &self.cluster {
            bus.publish_removed(*device);
        }
        here
    }

    /// Connection `conn_id` is gone (and has dropped its [`Claim`]): end its
    /// ownership if it still owns the device, and forget the device once
    /// nobody watches it.
    pub fn release(&self, device: DeviceId, conn_id: u64) {
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(&device) {
            if entry.owner.as_ref().is_some_and(|o| o.conn_id == conn_id) {
                entry.owner = None;
                self.end_early(entry);
            }
            if entry.owner.is_none() && entry.inbox.receiver_count() == 0 {
                map.remove(&device);
            }
        }
    }

    /// A connection of `device` received an ack up to `up_to`, which it
    /// applies later (see [`Claim::acks_seen`]).
    pub fn saw_ack(&self, device: &DeviceId, up_to: u64) {
        if let Some(entry) = self.lock().get_mut(device) {
            entry.acks_seen = entry.acks_seen.max(up_to);
        }
    }

    /// The device's inbox now holds envelopes up to `seq`.
    pub fn notify(&self, device: &DeviceId, seq: u64) {
        if let Some(entry) = self.lock().get(device) {
            entry.inbox.send_if_modified(|v| {
                if seq > *v {
                    *v = seq;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// A commit of this node stored these envelopes (seq and bytes, in seq
    /// order per device): keep them for the devices a connection watches,
    /// then wake it as [`DeviceHub::committed`] does. Call it only once the
    /// store serves them (not while a checkpoint holds them in its log
    /// alone).
    pub fn committed_fresh(
        &self,
        heads: &[(DeviceId, u64)],
        fresh: impl IntoIterator<Item = (DeviceId, u64, Vec<u8>)>,
    ) {
        {
            let mut map = self.lock();
            for (device, seq, bytes) in fresh {
                let Some(entry) = map.get_mut(&device) else {
                    continue;
                };
                if entry.inbox.receiver_count() == 0 {
                    continue;
                }
                match RawDelivered::new(seq, bytes) {
                    Ok(raw) => entry.fresh.push(raw),
                    // Read from the store, which refuses it in its turn.
                    Err(_) => drop(entry.fresh.take()),
                }
            }
        }
        self.committed(heads);
    }

    /// Take the envelopes kept for `device`: `Some` if they run from seq
    /// `after + 1` to `head` or beyond, without a gap; `None` sends the
    /// caller to the store. Either way none are kept any more (the store
    /// has them all), so a device that stops taking them holds no memory
    /// past its next wake-up.
    pub fn fresh_after(
        &self,
        device: &DeviceId,
        after: u64,
        head: u64,
    ) -> Option<Vec<RawDelivered>> {
        let mut map = self.lock();
        let mut run = map.get_mut(device)?.fresh.take();
        drop(map);
        while run.front().is_some_and(|e| e.seq() <= after) {
            run.pop_front();
        }
        let first = run.front()?.seq();
        let last = run.back()?.seq();
        (first == after.saturating_add(1) && last >= head).then(|| run.into())
    }

    /// Connection `conn_id`, the device's owner, asked for early pushes:
    /// from now on [`DeviceHub::written_early`] keeps the envelopes written
    /// to its inbox for it. Returns whether it is still the owner.
    pub fn enable_early(&self, device: &DeviceId, conn_id: u64) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(device) else {
            return false;
        };
        if entry.owner.as_ref().is_none_or(|o| o.conn_id != conn_id) {
            return false;
        }
        if !entry.early_on {
            entry.early_on = true;
            self.early_owners.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// The owner of `entry` changed or left: no early pushes until the
    /// next one asks.
    fn end_early(&self, entry: &mut Entry) {
        if entry.early_on {
            entry.early_on = false;
            self.early_owners.fetch_sub(1, Ordering::Relaxed);
        }
        drop(entry.early.take());
    }

    /// Whether any owner asked for early pushes (a commit with nobody to
    /// tell skips [`DeviceHub::written_early`]).
    pub fn any_early(&self) -> bool {
        self.early_owners.load(Ordering::Relaxed) > 0
    }

    /// A commit of this node has written these envelopes (seq and bytes,
    /// in seq order per device) and is syncing them: keep them for the
    /// devices whose owner asked for early pushes, and wake those owners
    /// (the inbox's durable head does not move). Nothing may call it for a
    /// commit whose failure would let the store hand the same seqs to
    /// other envelopes while it runs on (see `Store::commit_early`).
    pub fn written_early<'a>(&self, written: impl IntoIterator<Item = (DeviceId, u64, &'a [u8])>) {
        let mut woken: Vec<DeviceId> = Vec::new();
        let mut map = self.lock();
        for (device, seq, bytes) in written {
            let Some(entry) = map.get_mut(&device) else {
                continue;
            };
            if !entry.early_on {
                continue;
            }
            match RawDelivered::new(seq, bytes.to_vec()) {
                Ok(raw) => entry.early.push(raw),
                // The durable push reads it from the store, which refuses
                // it in its turn.
                Err(_) => drop(entry.early.take()),
            }
            if woken.last() != Some(&device) {
                woken.push(device);
            }
        }
        woken.sort_unstable();
        woken.dedup();
        for device in woken {
            if let Some(entry) = map.get(&device) {
                entry.inbox.send_modify(|_| {});
            }
        }
    }

    /// Take the envelopes written early for `device`: `Some` if they run
    /// from seq `after + 1` without a gap (possibly ending below the
    /// durable head). Either way none are kept any more.
    pub fn early_after(&self, device: &DeviceId, after: u64) -> Option<Vec<RawDelivered>> {
        let mut map = self.lock();
        let mut run = map.get_mut(device)?.early.take();
        drop(map);
        while run.front().is_some_and(|e| e.seq() <= after) {
            run.pop_front();
        }
        (run.front()?.seq() == after.saturating_add(1)).then(|| run.into())
    }

    /// A commit of this node moved these inbox heads: wake the local
    /// connections, and in a cluster tell the other nodes.
    pub fn committed(&self, heads: &[(DeviceId, u64)]) {
        for (device, seq) in heads {
            self.notify(device, *seq);
        }
        if let Some((_, bus)) = &self.cluster {
            bus.publish_inbox(heads);
        }
    }

    /// A claim of `device` as the cluster bus delivers it, in the bus's one
    /// total order (every node sees the same order, its own claims
    /// included). `local` is `Some(conn_id)` when the claim was made by this
    /// node's connection `conn_id`.
    ///
    /// Newest wins across nodes: the local owner is closed with `Replaced`
    /// if its own claim was delivered before this one (it is `confirmed`)
    /// and this one comes from another node (this node's own claims took
    /// effect locally when they were made). An owner whose claim has not come back
    /// yet claimed later than this one, so it stays. Returns whether a local
    /// owner was told to close.
    pub fn apply_claim(&self, device: &DeviceId, local: Option<u64>) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(device) else {
            return false;
        };
        let Some(owner) = entry.owner.as_mut() else {
            return false;
        };
        if let Some(conn_id) = local {
            // Our own claims were already applied locally when they were
            // made; the owner's own coming back confirms it.
            if conn_id == owner.conn_id {
                owner.confirmed = true;
            }
            return false;
        }
        if !owner.confirmed {
            return false;
        }
        if let Some(old) = entry.owner.take() {
            let _ = old.closer.send(Displaced::Replaced);
        }
        self.end_early(entry);
        if entry.inbox.receiver_count() == 0 {
            map.remove(device);
        }
        true
    }

    /// The cluster bus may have lost events (its connection was re-made):
    /// count every current owner's claim as delivered (any claim delivered
    /// from now on was made after the reconnection, so after theirs), and
    /// wake every watched inbox once so its connection reads the store.
    pub fn wake_all(&self) {
        let mut map = self.lock();
        for entry in map.values_mut() {
            if let Some(owner) = entry.owner.as_mut() {
                owner.confirmed = true;
            }
            entry.inbox.send_modify(|_| {});
        }
    }

    /// Wake every watched inbox once so its connection re-reads the store,
    /// leaving presence alone (the cluster bus's periodic safety wake-up).
    pub fn wake_inboxes(&self) {
        for entry in self.lock().values() {
            entry.inbox.send_modify(|_| {});
        }
    }

    /// The device's one-time prekey pool is down to `left`: tell its
    /// connection, if it has one (a device that is offline learns the count
    /// from `AuthOk` when it next connects). Returns whether a connection
    /// was told.
    pub fn prekeys_low(&self, device: &DeviceId, left: u32) -> bool {
        match self.lock().get(device) {
            Some(entry) if entry.owner.is_some() => {
                entry.prekeys_low.send_replace(Some(left));
                true
            }
            _ => false,
        }
    }

    /// Devices with a connection or a watcher.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No device is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid envelope's bytes for `device`, numbered `n`, with `len`
    /// bytes of ciphertext.
    fn envelope_bytes(device: DeviceId, n: u8, len: usize) -> Vec<u8> {
        use hush_protocol::{ConversationId, Envelope, EnvelopeHeader, MessageId};
        Envelope {
            header: EnvelopeHeader {
                message_id: MessageId::new(1_700_000_000_000, [n; 10]),
                sender_device: DeviceId([9; 16]),
                recipient_device: device,
                conversation_id: ConversationId([4; 16]),
                sender_seq: u64::from(n),
                sent_at_ms: 1_700_000_000_000,
                ratchet: vec![1; 40],
                session_init: None,
                important: false,
            },
            ciphertext: vec![n; len],
        }
        .to_bytes()
        .unwrap()
    }

    fn fresh(
        d: DeviceId,
        seqs: std::ops::RangeInclusive<u64>,
        len: usize,
    ) -> Vec<(DeviceId, u64, Vec<u8>)> {
        seqs.map(move |n| (d, n, envelope_bytes(d, n as u8, len)))
            .collect()
    }

    fn seqs(fresh: Option<Vec<RawDelivered>>) -> Option<Vec<u64>> {
        fresh.map(|f| f.iter().map(RawDelivered::seq).collect())
    }

    fn written(fresh: &[(DeviceId, u64, Vec<u8>)]) -> impl Iterator<Item = (DeviceId, u64, &[u8])> {
        fresh.iter().map(|(d, s, b)| (*d, *s, b.as_slice()))
    }

    /// Envelopes written early are kept only for the owner that asked for
    /// them, wake it without moving the durable head, are handed out once
    /// as a run from right after what was sent, and are no longer kept
    /// once a newer connection claims the device.
    #[tokio::test]
    async fn early_envelopes_are_kept_only_for_an_owner_that_asked() {
        let hub = DeviceHub::default();
        let d = DeviceId([1; 16]);
        let mut claim = hub.claim(d, 1);
        assert!(!hub.any_early());
        hub.written_early(written(&fresh(d, 1..=2, 48)));
        assert_eq!(seqs(hub.early_after(&d, 0)), None, "not asked for");
        assert!(!hub.enable_early(&d, 2), "only the owner may ask");
        assert!(hub.enable_early(&d, 1));
        assert!(hub.any_early());
        claim.inbox.borrow_and_update();
        hub.written_early(written(&fresh(d, 1..=3, 48)));
        assert!(claim.inbox.has_changed().unwrap(), "the owner is woken");
        assert_eq!(*claim.inbox.borrow_and_update(), 0, "durable head unmoved");
        assert_eq!(seqs(hub.early_after(&d, 1)), Some(vec![2, 3]));
        assert_eq!(seqs(hub.early_after(&d, 3)), None, "taken once");
        hub.written_early(written(&fresh(d, 5..=5, 48)));
        assert_eq!(seqs(hub.early_after(&d, 3)), None, "not right after");
        // A newer connection has not asked: nothing is kept for it.
        let _newer = hub.claim(d, 2);
        assert!(!hub.any_early());
        hub.written_early(written(&fresh(d, 6..=6, 48)));
        assert_eq!(seqs(hub.early_after(&d, 5)), None);
        assert_eq!(hub.fresh_total.load(Ordering::Relaxed), 0);
    }

    /// The envelopes of this node's commits are kept for a watched device
    /// only, bounded, and handed out once, as a whole run from right after
    /// what the connection was sent to the head it was woken for; whatever
    /// is not such a run sends it to the store, and is not kept either.
    #[tokio::test]
    async fn fresh_envelopes_are_kept_for_watched_devices_and_taken_once() {
        let hub = DeviceHub::default();
        let watched = DeviceId([1; 16]);
        let unwatched = DeviceId([2; 16]);
        let claim = hub.claim(watched, 1);
        hub.committed_fresh(
            &[(watched, 3), (unwatched, 3)],
            fresh(watched, 1..=3, 48)
                .into_iter()
                .chain(fresh(unwatched, 1..=3, 48)),
        );
        assert_eq!(seqs(hub.fresh_after(&unwatched, 0, 3)), None);
        assert!(hub.fresh_total.load(Ordering::Relaxed) > 0);
        assert_eq!(seqs(hub.fresh_after(&watched, 0, 3)), Some(vec![1, 2, 3]));
        assert_eq!(hub.fresh_total.load(Ordering::Relaxed), 0, "taken");
        assert_eq!(seqs(hub.fresh_after(&watched, 3, 3)), None);
        // What was sent already is dropped from the run.
        hub.committed_fresh(&[(watched, 6)], fresh(watched, 4..=6, 48));
        assert_eq!(seqs(hub.fresh_after(&watched, 4, 6)), Some(vec![5, 6]));
        // Short of the head, or not right after what was sent: the store,
        // and nothing is kept.
        hub.committed_fresh(&[(watched, 7)], fresh(watched, 7..=7, 48));
        assert_eq!(seqs(hub.fresh_after(&watched, 6, 8)), None);
        assert_eq!(seqs(hub.fresh_after(&watched, 6, 7)), None);
        hub.committed_fresh(&[(watched, 9)], fresh(watched, 9..=9, 48));
        assert_eq!(seqs(hub.fresh_after(&watched, 7, 9)), None);
        // A commit that does not follow on (another node's in between)
        // starts the run over.
        hub.committed_fresh(&[(watched, 11)], fresh(watched, 9..=9, 48));
        hub.committed_fresh(&[(watched, 11)], fresh(watched, 11..=11, 48));
        assert_eq!(seqs(hub.fresh_after(&watched, 10, 11)), Some(vec![11]));
        // Bounded per device: only the newest are kept.
        hub.committed_fresh(&[(watched, 200)], fresh(watched, 12..=200, 48));
        let kept = seqs(hub.fresh_after(&watched, 200 - FRESH_MAX as u64, 200)).unwrap();
        assert_eq!(kept.len(), FRESH_MAX);
        assert_eq!(kept.last(), Some(&200));
        // A device's envelopes go with its entry.
        hub.committed_fresh(&[(watched, 201)], fresh(watched, 201..=201, 48));
        assert!(hub.fresh_total.load(Ordering::Relaxed) > 0);
        drop(claim);
        hub.release(watched, 1);
        assert_eq!(hub.fresh_total.load(Ordering::Relaxed), 0);
    }

    /// All devices together keep at most [`FRESH_TOTAL_MAX_BYTES`]: past
    /// it, a device's run is dropped (its pushes read the store).
    #[tokio::test]
    async fn fresh_envelopes_are_bounded_across_devices() {
        let hub = DeviceHub::default();
        let per_device = FRESH_MAX_BYTES / FRESH_MAX;
        let devices = FRESH_TOTAL_MAX_BYTES / FRESH_MAX_BYTES + 8;
        let mut claims = Vec::new();
        for i in 0..devices {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let d = DeviceId(id);
            claims.push(hub.claim(d, 1));
            hub.committed_fresh(&[(d, 64)], fresh(d, 1..=64, per_device - 200));
            assert!(hub.fresh_total.load(Ordering::Relaxed) <= FRESH_TOTAL_MAX_BYTES);
        }
        assert!(hub.fresh_total.load(Ordering::Relaxed) > FRESH_TOTAL_MAX_BYTES / 2);
    }

    #[tokio::test]
    async fn newer_claim_replaces_older_and_notifications_reach_the_owner() {
        let hub = DeviceHub::default();
        let d = DeviceId([1; 16]);
        let mut a = hub.claim(d, 1);
        let mut b = hub.claim(d, 2);
        assert!(
            a.replaced.try_recv().is_ok(),
            "older connection is told to close"
        );
        assert!(b.replaced.try_recv().is_err());
        hub.notify(&d, 5);
        assert!(b.inbox.has_changed().unwrap());
        assert_eq!(*b.inbox.borrow_and_update(), 5);
        hub.notify(&d, 4);
        assert!(!b.inbox.has_changed().unwrap(), "seqs never move backwards");
        assert!(!b.prekeys_low.has_changed().unwrap());
        assert!(hub.prekeys_low(&d, 3), "the owner is told");
        assert!(b.prekeys_low.has_changed().unwrap());
        assert_eq!(*b.prekeys_low.borrow_and_update(), Some(3));
        assert!(
            !hub.prekeys_low(&DeviceId([9; 16]), 0),
            "nobody to tell for an offline device"
        );
        drop(a);
        hub.release(d, 1);
        assert_eq!(hub.len(), 1, "releasing the replaced claim keeps the owner");
        drop(b);
        hub.release(d, 2);
        assert!(hub.is_empty());
    }

    #[tokio::test]
    async fn a_remote_claim_replaces_only_an_owner_whose_claim_came_earlier() {
        let hub = DeviceHub::default();
        let d = DeviceId([2; 16]);
        let mut a = hub.claim(d, 7);
        // A remote claim delivered before our own: ours was made later.
        assert!(!hub.apply_claim(&d, None));
        assert!(
            a.replaced.try_recv().is_err(),
            "the newer local claim stays"
        );
        // Our own claim comes back: from now on remote claims are newer.
        assert!(!hub.apply_claim(&d, Some(7)));
        assert!(a.replaced.try_recv().is_err());
        // A claim of an older local connection of ours changes nothing.
        assert!(!hub.apply_claim(&d, Some(3)));
        assert!(a.replaced.try_recv().is_err());
        assert!(hub.apply_claim(&d, None), "a later remote claim wins");
        assert!(a.replaced.try_recv().is_ok());
        assert!(
            !hub.apply_claim(&DeviceId([3; 16]), None),
            "no owner, nothing to close"
        );
    }

    #[tokio::test]
    async fn wake_all_wakes_every_watcher_and_confirms_owners() {
        let hub = DeviceHub::default();
        let (d1, d2) = (DeviceId([4; 16]), DeviceId([5; 16]));
        let mut a = hub.claim(d1, 1);
        let mut b = hub.claim(d2, 2);
        hub.notify(&d1, 3);
        let _ = a.inbox.borrow_and_update();
        hub.wake_all();
        assert!(a.inbox.has_changed().unwrap(), "woken without a new seq");
        assert!(b.inbox.has_changed().unwrap());
        assert_eq!(*a.inbox.borrow_and_update(), 3, "the seq is unchanged");
        // After a reconnection of the bus, a remote claim is newer.
        assert!(hub.apply_claim(&d2, None));
        assert!(b.replaced.try_recv().is_ok());
    }
}
