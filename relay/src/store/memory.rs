//! An in-memory [`Store`] with the same semantics as the redb one.
//!
//! Its maps mirror the redb tables (same keys, same orders, the same purge
//! queue; dedup entries dropped in the order the redb store's dedup runs
//! drop them), and it shares the quota, page and
//! truncation rules with the redb store, so the conformance suite holds both
//! to identical answers. It counts `remaining` by scanning rather than from
//! the counters, which makes it an independent check of the redb store's
//! O(1) answer. One mutex makes every
//! call atomic. Nothing is lost by a simulated relay restart as long as the
//! same `MemoryStore` outlives it: every call is "durable" when it returns,
//! just as with redb.

use super::blobs;
use super::rules::{self, PageBudget};
use super::tombstones::{self, Tombstone};
use super::{
    BlobLimits, BlobMeta, BlobWrite, CommitOutcome, DeviceRecord, InboxPage, InboxState,
    NewEnvelope, PurgeStats, Refusal, Store, StoreError, StoreLimits, StoredEnvelope,
};
use hush_protocol::{
    BlobId, ConversationId, DeviceId, DeviceRegistration, MessageId, OneTimePrekey, PrekeyBundle,
    SignedDeviceList, SignedPrekey, UserKey,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

/// A stored envelope with the metadata its tombstone needs.
#[derive(Debug, Clone)]
struct Row {
    bytes: Vec<u8>,
    expires_at_ms: u64,
    sender: DeviceId,
    conversation: ConversationId,
    sender_seq: u64,
}

/// The dedup key: (message id, sender, recipient), ordered like the redb
/// key bytes.
type DedupKey = (MessageId, DeviceId, DeviceId);

/// The tables, as ordered maps keyed like their redb counterparts.
#[derive(Debug, Default, Clone)]
struct Tables {
    devices: BTreeMap<DeviceId, DeviceRecord>,
    meta: BTreeMap<DeviceId, InboxState>,
    inbox: BTreeMap<(DeviceId, u64), Row>,
    /// → (seq, expires_at_ms)
    dedup: BTreeMap<DedupKey, (u64, u64)>,
    /// Every dedup entry as (expires_at_ms, sender, recipient, message id):
    /// the order in which the purge drops them, as the redb store's dedup
    /// runs do.
    dedup_expiry: BTreeSet<(u64, DeviceId, DeviceId, MessageId)>,
    /// (expiry of the oldest stored envelope, device) per non-empty inbox.
    purge_queue: BTreeSet<(u64, DeviceId)>,
    tombstones: BTreeMap<(DeviceId, u64), Tombstone>,
    signed_prekeys: BTreeMap<DeviceId, SignedPrekey>,
    one_time_prekeys: BTreeMap<(DeviceId, u32), [u8; 32]>,
    device_lists: BTreeMap<UserKey, SignedDeviceList>,
    /// Sum of `stored_cost` over `inbox`, plus `blob_cost` over `blobs`.
    stored: u64,
    /// Blobs with their committed bytes.
    blobs: BTreeMap<BlobId, (BlobMeta, Vec<u8>)>,
    /// Last-seen time of registered devices that authenticated since
    /// registering (the others count from `registered_at_ms`).
    last_seen: BTreeMap<DeviceId, u64>,
    /// Removed device ids → when.
    removed: BTreeMap<DeviceId, u64>,
}

impl Tables {
    /// Delete everything of `d`'s inbox up to `up_to` (clamped to its
    /// head) and return the acked cursor now in force.
    /// Remove a device for good (see `Store::remove_device`).
    fn remove(&mut self, d: DeviceId, now_ms: u64) -> bool {
        if self.removed.contains_key(&d) || !self.devices.contains_key(&d) {
            return false;
        }
        self.ack_to(d, u64::MAX);
        self.meta.remove(&d);
        self.tombstones.retain(|(owner, _), _| *owner != d);
        self.signed_prekeys.remove(&d);
        self.one_time_prekeys.retain(|(owner, _), _| *owner != d);
        self.devices.remove(&d);
        self.last_seen.remove(&d);
        self.removed.insert(d, now_ms);
        true
    }

    fn ack_to(&mut self, d: DeviceId, up_to: u64) -> u64 {
        let t = self;
        let mut state = t.state(&d);
        let target = up_to.min(state.head);
        if target <= state.acked {
            return state.acked;
        }
        let seqs: Vec<u64> = t
            .inbox
            .range((d, 0)..=(d, target))
            .map(|(&(_, seq), _)| seq)
            .collect();
        let mut first_expiry = None;
        for seq in seqs {
            if let Some(row) = t.inbox.remove(&(d, seq)) {
                first_expiry.get_or_insert(row.expires_at_ms);
                rules::release(&mut state, row.bytes.len() as u64);
                t.stored = t
                    .stored
                    .saturating_sub(super::stored_cost(row.bytes.len() as u64));
            }
        }
        if let Some(old) = first_expiry {
            t.purge_queue.remove(&(old, d));
            if let Some(new) = t.oldest_expiry(d) {
                t.purge_queue.insert((new, d));
            }
        }
        let tombs: Vec<u64> = t
            .tombstones
            .range((d, 0)..=(d, target))
            .map(|(&(_, seq), _)| seq)
            .collect();
        for seq in tombs {
            t.tombstones.remove(&(d, seq));
        }
        state.acked = target;
        t.meta.insert(d, state);
        target
    }

    fn state(&self, device: &DeviceId) -> InboxState {
        self.meta.get(device).copied().unwrap_or_default()
    }

    fn count_rows(&self, device: DeviceId, first: u64, last: u64) -> u64 {
        if first > last {
            return 0;
        }
        self.inbox.range((device, first)..=(device, last)).count() as u64
    }

    /// Expiry of `device`'s oldest stored envelope.
    fn oldest_expiry(&self, device: DeviceId) -> Option<u64> {
        self.inbox
            .range((device, 0)..=(device, u64::MAX))
            .next()
            .map(|(_, row)| row.expires_at_ms)
    }

    /// Purge the expired prefix of `device`'s inbox (at most `budget`),
    /// writing tombstones, and re-queue it; returns how many went.
    fn purge_inbox(&mut self, device: DeviceId, now_ms: u64, budget: u64) -> u64 {
        let mut due = Vec::new();
        let mut next_expiry = None;
        for (&(_, seq), row) in self.inbox.range((device, 0)..=(device, u64::MAX)) {
            if row.expires_at_ms > now_ms || due.len() as u64 >= budget {
                next_expiry = Some(row.expires_at_ms);
                break;
            }
            due.push(seq);
        }
        let purged = due.len() as u64;
        for seq in due {
            if let Some(row) = self.inbox.remove(&(device, seq)) {
                self.tombstones.insert(
                    (device, seq),
                    Tombstone {
                        sender: row.sender,
                        conversation: row.conversation,
                        sender_seq: row.sender_seq,
                    },
                );
                rules::release(self.meta.entry(device).or_default(), row.bytes.len() as u64);
                self.stored = self
                    .stored
                    .saturating_sub(super::stored_cost(row.bytes.len() as u64));
            }
        }
        if let Some(expiry) = next_expiry {
            self.purge_queue.insert((expiry, device));
        }
        purged
    }

    fn count_otks(&self, device: DeviceId) -> u64 {
        self.one_time_prekeys
            .range((device, 0)..=(device, u32::MAX))
            .count() as u64
    }
}

/// What [`MemoryStore::snapshot`] copied.
pub struct MemorySnapshot(Tables);

impl std::fmt::Debug for MemorySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Like the store itself: the envelopes stay out of logs.
        f.debug_struct("MemorySnapshot").finish_non_exhaustive()
    }
}

/// The in-memory store.
#[derive(Default)]
pub struct MemoryStore {
    limits: StoreLimits,
    tables: Mutex<Tables>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The contents (every stored envelope) do not belong in logs.
        f.debug_struct("MemoryStore")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store enforcing `limits`.
    pub fn new(limits: StoreLimits) -> MemoryStore {
        MemoryStore {
            limits,
            tables: Mutex::new(Tables::default()),
        }
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// A copy of everything the store holds, to put back with
    /// [`MemoryStore::restore`]. The simulator uses the pair to model a
    /// relay whose commit was written but not yet synced when it died: the
    /// restart finds the store as it was before that commit, and hands the
    /// same seqs to other envelopes.
    pub fn snapshot(&self) -> Result<MemorySnapshot, StoreError> {
        Ok(MemorySnapshot(self.lock()?.clone()))
    }

    /// Put back what [`MemoryStore::snapshot`] copied, dropping every
    /// change made since.
    pub fn restore(&self, snapshot: MemorySnapshot) -> Result<(), StoreError> {
        *self.lock()? = snapshot.0;
        Ok(())
    }

    fn lock(&self) -> Result<MutexGuard<'_, Tables>, StoreError> {
        // A poisoned lock means a call panicked half-way: its changes may be
        // partial, so refuse to serve rather than expose them.
        self.tables
            .lock()
            .map_err(|_| StoreError::Backend("memory store poisoned".into()))
    }
}

impl Store for MemoryStore {
    fn local_reads(&self) -> bool {
        true
    }

    fn register_device(
        &self,
        registration: &DeviceRegistration,
        now_ms: u64,
    ) -> Result<DeviceRecord, StoreError> {
        let mut t = self.lock()?;
        if t.removed.contains_key(&registration.device) {
            return Err(StoreError::DeviceRemoved);
        }
        if let Some(record) = t.devices.get(&registration.device) {
            if record.registration == *registration {
                return Ok(record.clone());
            }
            return Err(StoreError::AlreadyRegistered);
        }
        let max = self.limits.max_devices_per_user;
        let user = registration.user;
        let count = t
            .devices
            .values()
            .filter(|r| r.registration.user == user)
            .count();
        if count >= max as usize {
            return Err(StoreError::DeviceLimit { max });
        }
        let record = DeviceRecord {
            registration: registration.clone(),
            registered_at_ms: now_ms,
        };
        t.devices.insert(registration.device, record.clone());
        Ok(record)
    }

    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self.lock()?.devices.get(device).cloned())
    }

    fn commit(&self, batch: &[NewEnvelope]) -> Result<Vec<CommitOutcome>, StoreError> {
        let mut guard = self.lock()?;
        let t = &mut *guard;
        let mut outcomes = Vec::with_capacity(batch.len());
        for env in batch {
            let dk = (env.message_id, env.sender, env.recipient);
            if let Some(&(seq, _)) = t.dedup.get(&dk) {
                outcomes.push(CommitOutcome::Duplicate { seq });
                continue;
            }
            if !t.devices.contains_key(&env.recipient) {
                outcomes.push(CommitOutcome::Refused(Refusal::UnknownRecipient));
                continue;
            }
            let len = env.bytes.len() as u64;
            let state = t.meta.entry(env.recipient).or_default();
            if let Err(refusal) = rules::admit(state, len, &self.limits)
                .and_then(|()| rules::admit_store(t.stored, len, &self.limits))
            {
                outcomes.push(CommitOutcome::Refused(refusal));
                continue;
            }
            let was_empty = state.depth == 0;
            let seq = rules::assign(state, len)
                .ok_or_else(|| StoreError::Backend("inbox seq space exhausted".into()))?;
            if was_empty {
                t.purge_queue.insert((env.expires_at_ms, env.recipient));
            }
            t.inbox.insert(
                (env.recipient, seq),
                Row {
                    bytes: env.bytes.clone(),
                    expires_at_ms: env.expires_at_ms,
                    sender: env.sender,
                    conversation: env.conversation,
                    sender_seq: env.sender_seq,
                },
            );
            t.dedup.insert(dk, (seq, env.expires_at_ms));
            t.dedup_expiry
                .insert((env.expires_at_ms, env.sender, env.recipient, env.message_id));
            t.stored = t.stored.saturating_add(super::stored_cost(len));
            outcomes.push(CommitOutcome::Stored { seq });
        }
        Ok(outcomes)
    }

    fn pull(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        let t = self.lock()?;
        let d = *device;
        let state = t.state(device);
        let mut envelopes = Vec::new();
        let mut oldest_retained = None;
        let mut dropped = Vec::new();
        if let Some(first) = after.checked_add(1) {
            let mut budget = PageBudget::new(limit, max_bytes);
            for (&(_, seq), row) in t.inbox.range((d, first)..=(d, u64::MAX)) {
                oldest_retained.get_or_insert(seq);
                if !budget.take(row.bytes.len()) {
                    break;
                }
                envelopes.push(StoredEnvelope {
                    seq,
                    bytes: row.bytes.clone().into(),
                });
            }
            dropped.extend(
                t.tombstones
                    .range((d, first)..=(d, u64::MAX))
                    .map(|(_, tomb)| *tomb),
            );
        }
        // Memory is cheap to scan: count directly what the redb store may
        // derive from the depth.
        let boundary = envelopes.last().map_or(after, |e| e.seq);
        let remaining = match boundary.checked_add(1) {
            Some(next) => t.count_rows(d, next, u64::MAX),
            None => 0,
        };
        let oldest = oldest_retained.unwrap_or_else(|| state.head.saturating_add(1));
        Ok(InboxPage {
            envelopes,
            remaining,
            truncated: tombstones::truncation(oldest, dropped),
        })
    }

    fn ack(&self, device: &DeviceId, up_to: u64) -> Result<u64, StoreError> {
        Ok(self.lock()?.ack_to(*device, up_to))
    }

    fn inbox_state(&self, device: &DeviceId) -> Result<InboxState, StoreError> {
        Ok(self.lock()?.state(device))
    }

    fn touch_device(
        &self,
        device: &DeviceId,
        now_ms: u64,
        granularity_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut t = self.lock()?;
        let Some(record) = t.devices.get(device) else {
            return Ok(None);
        };
        let previous = t
            .last_seen
            .get(device)
            .copied()
            .unwrap_or(record.registered_at_ms);
        if now_ms >= previous.saturating_add(granularity_ms) {
            t.last_seen.insert(*device, now_ms);
        }
        Ok(Some(previous))
    }

    fn device_last_seen(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        let t = self.lock()?;
        Ok(t.devices.get(device).map(|r| {
            t.last_seen
                .get(device)
                .copied()
                .unwrap_or(r.registered_at_ms)
        }))
    }

    fn remove_device(&self, device: &DeviceId, now_ms: u64) -> Result<bool, StoreError> {
        Ok(self.lock()?.remove(*device, now_ms))
    }

    fn publish_device_list_removing(
        &self,
        list: &SignedDeviceList,
        now_ms: u64,
    ) -> Result<(u64, Vec<DeviceId>), StoreError> {
        let mut guard = self.lock()?;
        let t = &mut *guard;
        let user = list.list.user;
        let previous = match t.device_lists.get(&user) {
            Some(stored) if stored.list.version >= list.list.version => {
                return Err(StoreError::StaleDeviceList {
                    stored: stored.list.version,
                });
            }
            stored => stored.cloned(),
        };
        t.device_lists.insert(user, list.clone());
        let mut removed = Vec::new();
        for d in super::dropped_devices(previous.as_ref(), list) {
            let ours = t
                .devices
                .get(&d)
                .is_some_and(|r| r.registration.user == user);
            if ours && t.remove(d, now_ms) {
                removed.push(d);
            }
        }
        Ok((list.list.version, removed))
    }

    fn device_removed(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        Ok(self.lock()?.removed.get(device).copied())
    }

    fn lease_counts(
        &self,
        stale_before_ms: u64,
        owns: &(dyn Fn(&DeviceId) -> bool + Sync),
    ) -> Result<super::LeaseCounts, StoreError> {
        let t = self.lock()?;
        let stale = t
            .devices
            .iter()
            .filter(|(d, r)| {
                owns(d)
                    && t.last_seen.get(d).copied().unwrap_or(r.registered_at_ms) < stale_before_ms
            })
            .count() as u64;
        let removed = t.removed.keys().filter(|d| owns(d)).count() as u64;
        Ok(super::LeaseCounts { stale, removed })
    }

    fn blob_put(
        &self,
        put: &BlobWrite<'_>,
        limits: &BlobLimits,
        now_ms: u64,
    ) -> Result<BlobMeta, StoreError> {
        let mut guard = self.lock()?;
        let t = &mut *guard;
        let stored = t.blobs.get(&put.blob).map(|b| b.0);
        let existing = blobs::live(stored, now_ms);
        // An expired blob with this id is replaced: its bytes are freed.
        let freed = match (stored, existing) {
            (Some(old), None) => super::blob_cost(old.total_len),
            _ => 0,
        };
        let max_store_bytes = self.limits.max_store_bytes;
        let counted = t.stored;
        let plan = blobs::plan_put(
            existing,
            put,
            limits,
            now_ms,
            || {
                let mine = t
                    .blobs
                    .values()
                    .filter(|(m, _)| m.owner == put.owner && m.expires_at_ms > now_ms);
                Ok(mine.fold((0, 0), |(n, b), (m, _)| (n + 1, b + m.total_len)))
            },
            || {
                Ok(blobs::StoreRoom {
                    stored: counted.saturating_sub(freed),
                    max: max_store_bytes,
                })
            },
        )?;
        let start = usize::try_from(put.offset).unwrap_or(usize::MAX);
        if plan.create {
            t.blobs.insert(put.blob, (plan.meta, Vec::new()));
            t.stored = t
                .stored
                .saturating_sub(freed)
                .saturating_add(super::blob_cost(plan.meta.total_len));
        }
        let Some((meta, bytes)) = t.blobs.get_mut(&put.blob) else {
            return Err(StoreError::UnknownBlob);
        };
        let stored = bytes.get(start..start.saturating_add(plan.overlap));
        if stored != put.bytes.get(..plan.overlap) {
            return Err(StoreError::BlobForbidden(
                "the bytes differ from the committed ones",
            ));
        }
        bytes.extend_from_slice(put.bytes.get(plan.overlap..).unwrap_or_default());
        *meta = plan.meta;
        Ok(plan.meta)
    }

    fn blob_read(
        &self,
        blob: &BlobId,
        offset: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Option<(BlobMeta, Vec<u8>)>, StoreError> {
        let t = self.lock()?;
        let Some((meta, bytes)) = t.blobs.get(blob).filter(|b| b.0.expires_at_ms > now_ms) else {
            return Ok(None);
        };
        let (a, b) = blobs::read_range(meta, offset, max);
        let out = bytes
            .get(usize::try_from(a).unwrap_or(usize::MAX)..usize::try_from(b).unwrap_or(0))
            .unwrap_or_default()
            .to_vec();
        Ok(Some((*meta, out)))
    }

    fn purge_blobs(&self, now_ms: u64, max: usize) -> Result<u64, StoreError> {
        let mut t = self.lock()?;
        let mut expired: Vec<(u64, BlobId)> = t
            .blobs
            .iter()
            .filter(|(_, (m, _))| m.expires_at_ms <= now_ms)
            .map(|(id, (m, _))| (m.expires_at_ms, *id))
            .collect();
        expired.sort_unstable();
        expired.truncate(max);
        for (_, id) in &expired {
            if let Some((m, _)) = t.blobs.remove(id) {
                t.stored = t.stored.saturating_sub(super::blob_cost(m.total_len));
            }
        }
        Ok(expired.len() as u64)
    }

    fn purge_expired(&self, now_ms: u64, max: usize) -> Result<PurgeStats, StoreError> {
        let mut guard = self.lock()?;
        let t = &mut *guard;
        let mut stats = PurgeStats::default();
        let max = max as u64;
        while stats.expired < max {
            let Some(&(expiry, device)) = t.purge_queue.first() else {
                break;
            };
            if expiry > now_ms {
                break;
            }
            t.purge_queue.remove(&(expiry, device));
            stats.expired += t.purge_inbox(device, now_ms, max - stats.expired);
        }
        while stats.dedup_removed < max {
            let Some(&first) = t.dedup_expiry.first() else {
                break;
            };
            let (expires_at_ms, sender, recipient, id) = first;
            if expires_at_ms > now_ms {
                break;
            }
            t.dedup_expiry.remove(&first);
            t.dedup.remove(&(id, sender, recipient));
            stats.dedup_removed += 1;
        }
        Ok(stats)
    }

    fn publish_prekeys(
        &self,
        device: &DeviceId,
        signed_prekey: &SignedPrekey,
        one_time: &[OneTimePrekey],
    ) -> Result<u32, StoreError> {
        let mut t = self.lock()?;
        if !t.devices.contains_key(device) {
            return Err(StoreError::UnknownDevice);
        }
        t.signed_prekeys.insert(*device, signed_prekey.clone());
        let cap = u64::from(self.limits.max_one_time_prekeys);
        let mut count = t.count_otks(*device);
        for otk in one_time {
            if count >= cap {
                break;
            }
            if let std::collections::btree_map::Entry::Vacant(e) =
                t.one_time_prekeys.entry((*device, otk.id))
            {
                e.insert(otk.public);
                count += 1;
            }
        }
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    fn take_prekey_bundle(&self, device: &DeviceId) -> Result<Option<PrekeyBundle>, StoreError> {
        let mut t = self.lock()?;
        let reg = t
            .devices
            .get(device)
            .map(|r| r.registration.clone())
            .ok_or(StoreError::UnknownDevice)?;
        let Some(signed_prekey) = t.signed_prekeys.get(device).cloned() else {
            return Ok(None);
        };
        let lowest = t
            .one_time_prekeys
            .range((*device, 0)..=(*device, u32::MAX))
            .next()
            .map(|(&(_, id), &public)| OneTimePrekey { id, public });
        if let Some(otk) = &lowest {
            t.one_time_prekeys.remove(&(*device, otk.id));
        }
        Ok(Some(PrekeyBundle {
            device: *device,
            user: reg.user,
            signing_key: reg.signing_key,
            agreement_key: reg.agreement_key,
            signed_prekey,
            one_time_prekey: lowest,
        }))
    }

    fn one_time_prekeys_left(&self, device: &DeviceId) -> Result<u32, StoreError> {
        Ok(u32::try_from(self.lock()?.count_otks(*device)).unwrap_or(u32::MAX))
    }

    fn publish_device_list(&self, list: &SignedDeviceList) -> Result<u64, StoreError> {
        let mut t = self.lock()?;
        let user = list.list.user;
        if let Some(stored) = t.device_lists.get(&user)
            && stored.list.version >= list.list.version
        {
            return Err(StoreError::StaleDeviceList {
                stored: stored.list.version,
            });
        }
        t.device_lists.insert(user, list.clone());
        Ok(list.list.version)
    }

    fn device_list(&self, user: &UserKey) -> Result<Option<SignedDeviceList>, StoreError> {
        Ok(self.lock()?.device_lists.get(user).cloned())
    }

    fn total_depth(&self) -> Result<u64, StoreError> {
        Ok(self.lock()?.inbox.len() as u64)
    }

    fn stored_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.lock()?.stored)
    }
}
