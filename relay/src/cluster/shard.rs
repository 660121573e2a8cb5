//! The shard map: which store holds a device's inbox and a user's rows.
//!
//! A cluster may spread its data over several independent stores (one
//! PostgreSQL cluster per shard). Each shard has a number that is never
//! reused; a key (a device id, a user key) belongs to the shard with the
//! highest rendezvous score `SHA-256("hush-shard-v1" ‖ shard u32 BE ‖ key)`
//! (its first 8 bytes, big-endian; ties go to the lower number).
//!
//! Why rendezvous (highest random weight) hashing rather than jump hash:
//! a key's shard depends only on the key and the *set* of shard numbers.
//! Adding a shard takes about `1/(n+1)` of the keys, all of them to the new
//! shard (nothing moves between old shards); retiring any shard — not only
//! the last, which is all jump hash allows — moves only that shard's keys.
//! The cost, one SHA-256 per shard per lookup, is nothing next to a
//! database round trip for the handful of shards a relay has.
//!
//! [`ShardedStore`] implements [`Store`] over the shards: per-device calls go
//! to the device's shard, device lists to the user's shard, totals are sums.

use crate::store::{
    BlobLimits, BlobMeta, BlobWrite, CommitOutcome, DeviceRecord, InboxPage, InboxState,
    NewEnvelope, PurgeStats, Store, StoreError,
};
use hush_protocol::{
    BlobId, DeviceId, DeviceRegistration, OneTimePrekey, PrekeyBundle, SignedDeviceList,
    SignedPrekey, UserKey,
};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Domain separation of the rendezvous score.
const SCORE_DOMAIN: &[u8] = b"hush-shard-v1";

/// The rendezvous score of `key` on shard `shard`.
fn score(shard: u32, key: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update(SCORE_DOMAIN);
    h.update(shard.to_be_bytes());
    h.update(key);
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Shard numbers and the rendezvous choice among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    ids: Vec<u32>,
}

impl ShardMap {
    /// A map over the given shard numbers (duplicates are ignored). `None`
    /// if there is none.
    pub fn new(ids: impl IntoIterator<Item = u32>) -> Option<ShardMap> {
        let mut ids: Vec<u32> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        (!ids.is_empty()).then_some(ShardMap { ids })
    }

    /// Shards numbered `0..n` (`n` ≥ 1; 0 is taken as 1).
    pub fn numbered(n: u32) -> ShardMap {
        ShardMap {
            ids: (0..n.max(1)).collect(),
        }
    }

    /// The shard numbers, ascending.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Position in [`ShardMap::ids`] of the shard that owns `key`.
    pub fn index_of(&self, key: &[u8]) -> usize {
        let mut best = 0usize;
        let mut best_score = 0u64;
        for (i, id) in self.ids.iter().enumerate() {
            let s = score(*id, key);
            // Strictly greater: on a tie the lower shard number (earlier
            // position) keeps it.
            if i == 0 || s > best_score {
                best = i;
                best_score = s;
            }
        }
        best
    }

    /// The shard number that owns a device's inbox, keys and prekeys.
    pub fn device_shard(&self, device: &DeviceId) -> u32 {
        self.ids[self.index_of(device.as_bytes())]
    }

    /// The shard number that owns a user's device list and device count.
    pub fn user_shard(&self, user: &UserKey) -> u32 {
        self.ids[self.index_of(user.as_bytes())]
    }
}

/// A [`Store`] spread over several stores by [`ShardMap`].
///
/// - Per-device rows (registration, inbox, dedup entries, tombstones,
///   prekeys) live on the device's shard.
/// - A user's device list lives on the user's shard. A registration is made
///   on the user's shard first — that store counts the user's devices and
///   enforces `max_devices_per_user` in its own transaction — and then on
///   the device's shard (when different). If the second step fails, the
///   client's retry of the same registration is a no-op on the first shard
///   and completes the second.
/// - [`Store::commit`] splits a batch by recipient shard and commits one
///   transaction per shard. That is correct because every envelope's
///   outcome depends only on its own recipient's inbox (seq, dedup entry,
///   quota) and the recipient's shard's store-wide cap: no envelope's fate
///   depends on another shard's rows, and there is no cross-envelope
///   atomicity to keep — an acknowledged envelope is durable on its shard
///   whatever happens to the others. If one shard fails, the whole call
///   fails and the relay answers every envelope of the batch with an error;
///   the client retries with the same message ids and the shards that had
///   committed answer [`CommitOutcome::Duplicate`] with the original seq.
/// - Totals ([`Store::total_depth`], [`Store::stored_bytes`]) are sums;
///   [`Store::purge_expired`] runs on every shard with the same `max` and
///   returns the sums (so up to `max` per shard; a caller that loops while
///   a full chunk was purged may run one extra, empty round).
pub struct ShardedStore {
    map: ShardMap,
    shards: Vec<Arc<dyn Store>>,
}

impl std::fmt::Debug for ShardedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedStore")
            .field("shards", &self.map.ids())
            .finish()
    }
}

impl ShardedStore {
    /// Shards numbered `0..stores.len()` in the given order. The order is
    /// part of the data layout: shard `i` must always be the same database.
    pub fn new(stores: Vec<Arc<dyn Store>>) -> Result<ShardedStore, StoreError> {
        let n = u32::try_from(stores.len())
            .map_err(|_| StoreError::Backend("too many shards".into()))?;
        if n == 0 {
            return Err(StoreError::Backend("a sharded store needs a shard".into()));
        }
        Ok(ShardedStore {
            map: ShardMap::numbered(n),
            shards: stores,
        })
    }

    /// The shard map.
    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// The store of shard number `id` (shards are numbered by position).
    pub fn shard(&self, id: u32) -> Option<&Arc<dyn Store>> {
        self.shards.get(usize::try_from(id).ok()?)
    }

    fn device_store(&self, device: &DeviceId) -> &dyn Store {
        self.shards[self.map.index_of(device.as_bytes())].as_ref()
    }

    fn user_store(&self, user: &UserKey) -> &dyn Store {
        self.shards[self.map.index_of(user.as_bytes())].as_ref()
    }
}

impl Store for ShardedStore {
    fn register_device(
        &self,
        registration: &DeviceRegistration,
        now_ms: u64,
    ) -> Result<DeviceRecord, StoreError> {
        let user_i = self.map.index_of(registration.user.as_bytes());
        let device_i = self.map.index_of(registration.device.as_bytes());
        let counted = self.shards[user_i].register_device(registration, now_ms)?;
        if device_i == user_i {
            return Ok(counted);
        }
        self.shards[device_i].register_device(registration, now_ms)
    }

    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.device_store(device).device(device)
    }

    fn commit(&self, batch: &[NewEnvelope]) -> Result<Vec<CommitOutcome>, StoreError> {
        if self.shards.len() == 1 {
            return self.shards[0].commit(batch);
        }
        // Positions of each shard's envelopes in the batch, in input order
        // (so per-inbox order and in-batch duplicates are kept).
        let mut per_shard: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        for (i, e) in batch.iter().enumerate() {
            per_shard[self.map.index_of(e.recipient.as_bytes())].push(i);
        }
        let mut outcomes: Vec<Option<CommitOutcome>> = vec![None; batch.len()];
        for (shard, positions) in per_shard.iter().enumerate() {
            if positions.is_empty() {
                continue;
            }
            let sub: Vec<NewEnvelope> = positions.iter().map(|&i| batch[i].clone()).collect();
            let got = self.shards[shard].commit(&sub)?;
            if got.len() != sub.len() {
                return Err(StoreError::Backend(format!(
                    "shard {shard} answered {} outcomes for {} envelopes",
                    got.len(),
                    sub.len()
                )));
            }
            for (&i, outcome) in positions.iter().zip(got) {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| StoreError::Backend("an envelope got no outcome".into())))
            .collect()
    }

    fn pull(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        self.device_store(device)
            .pull(device, after, limit, max_bytes)
    }

    fn ack(&self, device: &DeviceId, up_to: u64) -> Result<u64, StoreError> {
        self.device_store(device).ack(device, up_to)
    }

    fn inbox_state(&self, device: &DeviceId) -> Result<InboxState, StoreError> {
        self.device_store(device).inbox_state(device)
    }

    fn purge_expired(&self, now_ms: u64, max: usize) -> Result<PurgeStats, StoreError> {
        let mut total = PurgeStats::default();
        for s in &self.shards {
            let stats = s.purge_expired(now_ms, max)?;
            total.expired = total.expired.saturating_add(stats.expired);
            total.dedup_removed = total.dedup_removed.saturating_add(stats.dedup_removed);
        }
        Ok(total)
    }

    fn publish_prekeys(
        &self,
        device: &DeviceId,
        signed_prekey: &SignedPrekey,
        one_time: &[OneTimePrekey],
    ) -> Result<u32, StoreError> {
        self.device_store(device)
            .publish_prekeys(device, signed_prekey, one_time)
    }

    fn take_prekey_bundle(&self, device: &DeviceId) -> Result<Option<PrekeyBundle>, StoreError> {
        self.device_store(device).take_prekey_bundle(device)
    }

    fn one_time_prekeys_left(&self, device: &DeviceId) -> Result<u32, StoreError> {
        self.device_store(device).one_time_prekeys_left(device)
    }

    fn publish_device_list(&self, list: &SignedDeviceList) -> Result<u64, StoreError> {
        self.user_store(&list.list.user).publish_device_list(list)
    }

    fn device_list(&self, user: &UserKey) -> Result<Option<SignedDeviceList>, StoreError> {
        self.user_store(user).device_list(user)
    }

    // A device's registration lives on its shard and, for the per-user
    // count, on its user's shard: last-seen times live on the device's
    // shard only, removal clears both.
    fn touch_device(
        &self,
        device: &DeviceId,
        now_ms: u64,
        granularity_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.device_store(device)
            .touch_device(device, now_ms, granularity_ms)
    }

    fn device_last_seen(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        self.device_store(device).device_last_seen(device)
    }

    fn remove_device(&self, device: &DeviceId, now_ms: u64) -> Result<bool, StoreError> {
        let device_i = self.map.index_of(device.as_bytes());
        let record = self.shards[device_i].device(device)?;
        if let Some(record) = &record {
            let user_i = self.map.index_of(record.registration.user.as_bytes());
            if user_i != device_i {
                self.shards[user_i].remove_device(device, now_ms)?;
            }
        }
        self.shards[device_i].remove_device(device, now_ms)
    }

    // Atomic when every dropped device lives on the user's shard (one
    // transaction there). Otherwise the devices are removed first, each on
    // its shards, and the list is stored last on the user's shard: a crash
    // in between leaves the dropped devices removed under the old list
    // (nothing is sent to a removed device: sends to it are refused) until
    // the publishing client, which keeps its unconfirmed list, publishes it
    // again; never a stored list with a dropped device still registered.
    fn publish_device_list_removing(
        &self,
        list: &SignedDeviceList,
        now_ms: u64,
    ) -> Result<(u64, Vec<DeviceId>), StoreError> {
        let user = list.list.user;
        let user_i = self.map.index_of(user.as_bytes());
        let previous = self.shards[user_i].device_list(&user)?;
        if let Some(p) = &previous
            && p.list.version >= list.list.version
        {
            return Err(StoreError::StaleDeviceList {
                stored: p.list.version,
            });
        }
        let dropped = crate::store::dropped_devices(previous.as_ref(), list);
        if dropped
            .iter()
            .all(|d| self.map.index_of(d.as_bytes()) == user_i)
        {
            return self.shards[user_i].publish_device_list_removing(list, now_ms);
        }
        let mut removed = Vec::new();
        for d in dropped {
            let ours = self
                .device(&d)?
                .is_some_and(|r| r.registration.user == user);
            if ours && self.remove_device(&d, now_ms)? {
                removed.push(d);
            }
        }
        let version = self.shards[user_i].publish_device_list(list)?;
        Ok((version, removed))
    }

    fn device_removed(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        self.device_store(device).device_removed(device)
    }

    fn lease_counts(
        &self,
        stale_before_ms: u64,
        owns: &(dyn Fn(&DeviceId) -> bool + Sync),
    ) -> Result<crate::store::LeaseCounts, StoreError> {
        let mut total = crate::store::LeaseCounts::default();
        for (i, s) in self.shards.iter().enumerate() {
            let mine = |d: &DeviceId| self.map.index_of(d.as_bytes()) == i && owns(d);
            let c = s.lease_counts(stale_before_ms, &mine)?;
            total.stale = total.stale.saturating_add(c.stale);
            total.removed = total.removed.saturating_add(c.removed);
        }
        Ok(total)
    }

    fn total_depth(&self) -> Result<u64, StoreError> {
        self.shards
            .iter()
            .try_fold(0u64, |acc, s| Ok(acc.saturating_add(s.total_depth()?)))
    }

    fn stored_bytes(&self) -> Result<u64, StoreError> {
        self.shards
            .iter()
            .try_fold(0u64, |acc, s| Ok(acc.saturating_add(s.stored_bytes()?)))
    }

    fn compact_step(&self, budget: u64) -> Result<bool, StoreError> {
        let mut more = false;
        for s in &self.shards {
            more |= s.compact_step(budget)?;
        }
        Ok(more)
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        for s in &self.shards {
            s.checkpoint()?;
        }
        Ok(())
    }

    fn checkpoint_due(&self) -> bool {
        self.shards.iter().any(|s| s.checkpoint_due())
    }

    // Blobs live on the first shard: they are few (one per history
    // transfer), and one place keeps the per-device blob limits exact.
    fn blob_put(
        &self,
        put: &BlobWrite<'_>,
        limits: &BlobLimits,
        now_ms: u64,
    ) -> Result<BlobMeta, StoreError> {
        self.shards[0].blob_put(put, limits, now_ms)
    }

    fn blob_read(
        &self,
        blob: &BlobId,
        offset: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Option<(BlobMeta, Vec<u8>)>, StoreError> {
        self.shards[0].blob_read(blob, offset, max, now_ms)
    }

    fn purge_blobs(&self, now_ms: u64, max: usize) -> Result<u64, StoreError> {
        self.shards[0].purge_blobs(now_ms, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreLimits;
    use crate::store::memory::MemoryStore;
    use hush_protocol::{ConversationId, DeviceList, MessageId};

    fn dev(i: u32) -> DeviceId {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&i.to_be_bytes());
        b[15] = 0xd;
        DeviceId(b)
    }

    fn reg(device: DeviceId, user: u8) -> DeviceRegistration {
        DeviceRegistration {
            device,
            user: UserKey([user; 32]),
            signing_key: [1; 32],
            agreement_key: [2; 32],
            user_signature: [3; 64],
        }
    }

    fn envelope(recipient: DeviceId, n: u8) -> NewEnvelope {
        NewEnvelope {
            recipient,
            sender: dev(999_999),
            message_id: MessageId::new(1_700_000_000_000, [n; 10]),
            conversation: ConversationId([4; 16]),
            sender_seq: u64::from(n),
            bytes: vec![n; 32],
            expires_at_ms: u64::MAX,
        }
    }

    fn two_shards(limits: StoreLimits) -> (ShardedStore, [Arc<MemoryStore>; 2]) {
        let a = Arc::new(MemoryStore::new(limits));
        let b = Arc::new(MemoryStore::new(limits));
        let stores: Vec<Arc<dyn Store>> = vec![a.clone(), b.clone()];
        (ShardedStore::new(stores).expect("two shards"), [a, b])
    }

    /// A device on shard `want` (by search over ids).
    fn device_on(map: &ShardMap, want: u32, from: u32) -> DeviceId {
        (from..)
            .map(dev)
            .find(|d| map.device_shard(d) == want)
            .expect("some id lands on every shard")
    }

    #[test]
    fn rendezvous_spreads_keys_and_a_new_shard_takes_keys_only_for_itself() {
        let two = ShardMap::numbered(2);
        let three = ShardMap::numbered(3);
        let n = 4000u32;
        let mut on_two = [0u32; 2];
        let mut moved = 0u32;
        for i in 0..n {
            let d = dev(i);
            let before = two.device_shard(&d);
            on_two[before as usize] += 1;
            let after = three.device_shard(&d);
            if after != before {
                assert_eq!(after, 2, "a key only ever moves to the new shard");
                moved += 1;
            }
        }
        for count in on_two {
            assert!((1600..=2400).contains(&count), "uneven spread: {on_two:?}");
        }
        assert!(
            (n / 3 - 300..=n / 3 + 300).contains(&moved),
            "about a third moves to the third shard, moved {moved}"
        );
        // Retiring shard 0 of three moves only shard 0's keys.
        let without_0 = ShardMap::new([1, 2]).expect("two shards");
        for i in 0..n {
            let d = dev(i);
            if three.device_shard(&d) != 0 {
                assert_eq!(without_0.device_shard(&d), three.device_shard(&d));
            }
        }
        assert_eq!(ShardMap::new([]), None);
    }

    #[test]
    fn a_batch_over_two_shards_keeps_per_inbox_order_and_outcomes_in_place() {
        let (store, [a, b]) = two_shards(StoreLimits::default());
        let map = store.map().clone();
        let x = device_on(&map, 0, 0);
        let y = device_on(&map, 1, 0);
        store.register_device(&reg(x, 1), 0).expect("x");
        store.register_device(&reg(y, 2), 0).expect("y");
        assert!(a.device(&x).expect("read").is_some(), "x lives on shard 0");
        assert!(b.device(&y).expect("read").is_some(), "y lives on shard 1");
        assert!(a.device(&y).expect("read").is_none() || map.user_shard(&UserKey([2; 32])) == 0);

        let batch = vec![
            envelope(x, 1),
            envelope(y, 2),
            envelope(x, 3),
            envelope(y, 2), // a duplicate inside the batch
            envelope(dev(777_777), 5),
            envelope(y, 4),
        ];
        let out = store.commit(&batch).expect("commit");
        assert_eq!(
            out,
            vec![
                CommitOutcome::Stored { seq: 1 },
                CommitOutcome::Stored { seq: 1 },
                CommitOutcome::Stored { seq: 2 },
                CommitOutcome::Duplicate { seq: 1 },
                CommitOutcome::Refused(crate::store::Refusal::UnknownRecipient),
                CommitOutcome::Stored { seq: 2 },
            ]
        );
        // A retry of the whole batch finds every stored envelope on its shard.
        let again = store.commit(&batch).expect("retry");
        assert_eq!(again[0], CommitOutcome::Duplicate { seq: 1 });
        assert_eq!(again[5], CommitOutcome::Duplicate { seq: 2 });
        assert_eq!(a.total_depth().expect("a"), 2);
        assert_eq!(b.total_depth().expect("b"), 2);
        assert_eq!(store.total_depth().expect("sum"), 4);
        let page = store.pull(&y, 0, 10, 1 << 20).expect("pull");
        let bytes: Vec<u8> = page.envelopes.iter().map(|e| e.bytes[0]).collect();
        assert_eq!(bytes, vec![2, 4], "y's inbox in order");
        assert_eq!(store.ack(&y, 2).expect("ack"), 2);
        assert_eq!(store.inbox_state(&y).expect("state").depth, 0);
        assert_eq!(store.inbox_state(&x).expect("state").depth, 2);
        assert_eq!(
            store.stored_bytes().expect("sum"),
            a.stored_bytes().expect("a") + b.stored_bytes().expect("b")
        );
    }

    #[test]
    fn the_per_user_device_limit_holds_across_shards_and_lists_live_with_the_user() {
        let limits = StoreLimits {
            max_devices_per_user: 3,
            ..StoreLimits::default()
        };
        let (store, _) = two_shards(limits);
        let map = store.map().clone();
        let user = 7u8;
        // Devices of one user on both shards.
        let ids = [
            device_on(&map, 0, 0),
            device_on(&map, 1, 0),
            device_on(&map, 0, 1000),
            device_on(&map, 1, 1000),
        ];
        for d in &ids[..3] {
            store
                .register_device(&reg(*d, user), 0)
                .expect("within the cap");
        }
        assert!(
            matches!(
                store.register_device(&reg(ids[3], user), 0),
                Err(StoreError::DeviceLimit { max: 3 })
            ),
            "a fourth device is refused although its own shard holds only one"
        );
        assert!(store.device(&ids[3]).expect("read").is_none());
        // Registering the same keys again is still a no-op.
        store
            .register_device(&reg(ids[1], user), 5)
            .expect("idempotent");

        let list = SignedDeviceList {
            list: DeviceList {
                user: UserKey([user; 32]),
                version: 2,
                devices: Vec::new(),
            },
            signature: [0; 64],
        };
        assert_eq!(store.publish_device_list(&list).expect("publish"), 2);
        let user_shard = store
            .shard(map.user_shard(&UserKey([user; 32])))
            .expect("shard");
        assert_eq!(
            user_shard.device_list(&UserKey([user; 32])).expect("read"),
            Some(list.clone()),
            "the list is stored on the user's shard"
        );
        assert_eq!(
            store.device_list(&UserKey([user; 32])).expect("read"),
            Some(list)
        );
    }

    /// A list dropping devices that live on other shards than the user's:
    /// they are removed on every shard holding them, the list is stored on
    /// the user's shard, and the returned set names them.
    #[test]
    fn a_list_dropping_devices_on_other_shards_removes_them_everywhere() {
        let (store, shards) = two_shards(StoreLimits::default());
        let map = store.map().clone();
        let user = 7u8;
        let user_key = UserKey([user; 32]);
        let user_shard = map.user_shard(&user_key);
        let other = 1 - user_shard;
        let near = device_on(&map, user_shard, 0);
        let far = device_on(&map, other, 0);
        let far2 = device_on(
            &map,
            other,
            u32::from_be_bytes(far.0[..4].try_into().expect("4")) + 1,
        );
        for d in [near, far, far2] {
            store.register_device(&reg(d, user), 1).expect("register");
        }
        let entry = |d: DeviceId| hush_protocol::DeviceEntry {
            device: d,
            signing_key: [1; 32],
            agreement_key: [2; 32],
            membership_signature: [4; 64],
        };
        let list = |version: u64, devices: &[DeviceId]| SignedDeviceList {
            list: DeviceList {
                user: user_key,
                version,
                devices: devices.iter().map(|d| entry(*d)).collect(),
            },
            signature: [0; 64],
        };
        let v1 = list(1, &[near, far, far2]);
        assert_eq!(
            store.publish_device_list_removing(&v1, 5).expect("v1"),
            (1, Vec::new())
        );
        let v2 = list(2, &[near, far2]);
        let (version, removed) = store.publish_device_list_removing(&v2, 9).expect("v2");
        assert_eq!((version, removed), (2, vec![far]));
        assert_eq!(store.device_list(&user_key).expect("read"), Some(v2));
        assert_eq!(store.device(&far).expect("read"), None);
        assert_eq!(store.device_removed(&far).expect("read"), Some(9));
        for s in &shards {
            assert_eq!(s.device(&far).expect("read"), None, "left on a shard");
        }
        assert!(store.device(&far2).expect("read").is_some());
        assert!(store.device(&near).expect("read").is_some());
        // Stale: nothing changes.
        assert!(matches!(
            store.publish_device_list_removing(&list(2, &[near]), 10),
            Err(StoreError::StaleDeviceList { stored: 2 })
        ));
        assert!(store.device(&far2).expect("read").is_some());
    }
}
