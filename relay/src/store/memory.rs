//! An in-memory [`Store`] with the same semantics as the redb one.
//!
//! Its maps mirror the redb tables one for one (same keys, same orders), and
//! it shares the quota, page and truncation rules with the redb store, so the
//! conformance suite holds both to identical answers. One mutex makes every
//! call atomic. Nothing is lost by a simulated relay restart as long as the
//! same `MemoryStore` outlives it: every call is "durable" when it returns,
//! just as with redb.

use super::rules::{self, PageBudget};
use super::tombstones::{self, Tombstone};
use super::{
    CommitOutcome, DeviceRecord, InboxPage, InboxState, NewEnvelope, PurgeStats, Refusal, Store,
    StoreError, StoreLimits, StoredEnvelope,
};
use hush_protocol::{
    ConversationId, DeviceId, DeviceRegistration, MessageId, OneTimePrekey, PrekeyBundle,
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

/// The dedup key: (sender, recipient, message id).
type DedupKey = (DeviceId, DeviceId, MessageId);

/// The tables, as ordered maps keyed like their redb counterparts.
#[derive(Debug, Default)]
struct Tables {
    devices: BTreeMap<DeviceId, DeviceRecord>,
    meta: BTreeMap<DeviceId, InboxState>,
    inbox: BTreeMap<(DeviceId, u64), Row>,
    /// → (seq, expires_at_ms)
    dedup: BTreeMap<DedupKey, (u64, u64)>,
    dedup_expiry: BTreeSet<(u64, DedupKey)>,
    expiry: BTreeSet<(u64, DeviceId, u64)>,
    tombstones: BTreeMap<(DeviceId, u64), Tombstone>,
    signed_prekeys: BTreeMap<DeviceId, SignedPrekey>,
    one_time_prekeys: BTreeMap<(DeviceId, u32), [u8; 32]>,
    device_lists: BTreeMap<UserKey, SignedDeviceList>,
}

impl Tables {
    fn state(&self, device: &DeviceId) -> InboxState {
        self.meta.get(device).copied().unwrap_or_default()
    }

    fn count_rows(&self, device: DeviceId, first: u64, last: u64) -> u64 {
        if first > last {
            return 0;
        }
        self.inbox.range((device, first)..=(device, last)).count() as u64
    }

    fn count_otks(&self, device: DeviceId) -> u64 {
        self.one_time_prekeys
            .range((device, 0)..=(device, u32::MAX))
            .count() as u64
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

    fn lock(&self) -> Result<MutexGuard<'_, Tables>, StoreError> {
        // A poisoned lock means a call panicked half-way: its changes may be
        // partial, so refuse to serve rather than expose them.
        self.tables
            .lock()
            .map_err(|_| StoreError::Backend("memory store poisoned".into()))
    }
}

impl Store for MemoryStore {
    fn register_device(
        &self,
        registration: &DeviceRegistration,
        now_ms: u64,
    ) -> Result<DeviceRecord, StoreError> {
        let mut t = self.lock()?;
        if let Some(record) = t.devices.get(&registration.device) {
            if record.registration == *registration {
                return Ok(record.clone());
            }
            return Err(StoreError::AlreadyRegistered);
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
            let dk = (env.sender, env.recipient, env.message_id);
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
            if let Err(refusal) = rules::admit(state, len, &self.limits) {
                outcomes.push(CommitOutcome::Refused(refusal));
                continue;
            }
            let seq = rules::assign(state, len)
                .ok_or_else(|| StoreError::Backend("inbox seq space exhausted".into()))?;
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
            t.expiry.insert((env.expires_at_ms, env.recipient, seq));
            t.dedup.insert(dk, (seq, env.expires_at_ms));
            t.dedup_expiry.insert((env.expires_at_ms, dk));
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
                    bytes: row.bytes.clone(),
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
        let mut guard = self.lock()?;
        let t = &mut *guard;
        let d = *device;
        let mut state = t.state(device);
        let target = up_to.min(state.head);
        if target <= state.acked {
            return Ok(state.acked);
        }
        let seqs: Vec<u64> = t
            .inbox
            .range((d, 0)..=(d, target))
            .map(|(&(_, seq), _)| seq)
            .collect();
        for seq in seqs {
            if let Some(row) = t.inbox.remove(&(d, seq)) {
                t.expiry.remove(&(row.expires_at_ms, d, seq));
                rules::release(&mut state, row.bytes.len() as u64);
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
        Ok(target)
    }

    fn inbox_state(&self, device: &DeviceId) -> Result<InboxState, StoreError> {
        Ok(self.lock()?.state(device))
    }

    fn purge_expired(&self, now_ms: u64, max: usize) -> Result<PurgeStats, StoreError> {
        let mut guard = self.lock()?;
        let t = &mut *guard;
        let mut stats = PurgeStats::default();
        let hi = (now_ms, DeviceId([0xFF; 16]), u64::MAX);
        let due: Vec<_> = t.expiry.range(..=hi).take(max).copied().collect();
        for entry in due {
            t.expiry.remove(&entry);
            let (_, device, seq) = entry;
            if let Some(row) = t.inbox.remove(&(device, seq)) {
                t.tombstones.insert(
                    (device, seq),
                    Tombstone {
                        sender: row.sender,
                        conversation: row.conversation,
                        sender_seq: row.sender_seq,
                    },
                );
                rules::release(t.meta.entry(device).or_default(), row.bytes.len() as u64);
                stats.expired += 1;
            }
        }
        let all = DeviceId([0xFF; 16]);
        let hi = (now_ms, (all, all, MessageId([0xFF; 16])));
        let due: Vec<_> = t.dedup_expiry.range(..=hi).take(max).copied().collect();
        for entry in due {
            t.dedup_expiry.remove(&entry);
            if t.dedup.remove(&entry.1).is_some() {
                stats.dedup_removed += 1;
            }
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
}
