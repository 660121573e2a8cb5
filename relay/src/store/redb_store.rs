//! The relay's durable [`Store`]: one redb file.
//!
//! Every mutating call is exactly one write transaction committed with
//! [`Durability::Immediate`]: when it returns `Ok`, the change is on disk and
//! survives `kill -9`; when it fails, nothing of it is visible. Reads run in
//! read transactions on an MVCC snapshot and never wait for the writer. redb
//! allows one writer at a time, which is why [`Store::commit`] takes a whole
//! batch: the caller's group commit turns many concurrent sends into one
//! fsync. The tables and their byte layouts are specified in
//! `docs/STORAGE.md` (see also the private `tables` module).

use super::keys::{
    DedupExpiryKey, ExpiryKey, InboxKey, OtkKey, dedup_expiry_key, dedup_expiry_upper, dedup_key,
    expiry_key, expiry_upper, inbox_key, otk_key, split_dedup_expiry_key, split_expiry_key,
    split_inbox_key, split_otk_key,
};
use super::rules::{self, PageBudget, RemainingScan};
use super::tables::*;
use super::tombstones;
use super::{
    CommitOutcome, DeviceRecord, InboxPage, InboxState, NewEnvelope, PurgeStats, Refusal, Store,
    StoreError, StoreLimits, StoredEnvelope,
};
use hush_protocol::{
    DeviceId, DeviceRegistration, OneTimePrekey, PrekeyBundle, SignedDeviceList, SignedPrekey,
    UserKey,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redb::{Table, WriteTransaction};
use std::collections::BTreeMap;
use std::path::Path;

macro_rules! backend_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Backend(format!("redb: {e}"))
            }
        }
    )*};
}

backend_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
);

/// Whether a write transaction changed anything: unchanged ones are aborted
/// instead of committed, which saves an fsync on no-op calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Changed {
    Yes,
    No,
}

/// The redb-backed store. Cheap to share behind an `Arc`; all methods take
/// `&self` and are safe to call from many threads.
pub struct RedbStore {
    db: Database,
    limits: StoreLimits,
    /// Acks handled so far; picks which ones commit durably.
    acks: std::sync::atomic::AtomicU64,
}

/// One ack in this many is committed with an fsync (see `RedbStore::write_with`).
pub const DURABLE_ACK_EVERY: u64 = 32;

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

type InboxTable<'t> = Table<'t, &'static [u8; 24], &'static [u8]>;
type MetaTable<'t> = Table<'t, &'static [u8; 16], &'static [u8]>;

impl RedbStore {
    /// Open the database at `path`, creating the file and its tables if
    /// missing. After an unclean shutdown redb repairs the file here, so the
    /// first open after a crash may take longer. Fails if another process (or
    /// another `RedbStore` in this one) has the file open, or if it holds a
    /// different format version.
    pub fn open(path: impl AsRef<Path>, limits: StoreLimits) -> Result<RedbStore, StoreError> {
        let db = Database::create(path)?;
        let store = RedbStore {
            db,
            limits,
            acks: std::sync::atomic::AtomicU64::new(0),
        };
        store.write(|txn| {
            // Opening a table in a write transaction creates it, so read
            // transactions can always open every table afterwards.
            txn.open_table(INBOX)?;
            txn.open_table(DEDUP)?;
            txn.open_table(DEDUP_EXPIRY)?;
            txn.open_table(INBOX_META)?;
            txn.open_table(DEVICES)?;
            txn.open_table(SIGNED_PREKEYS)?;
            txn.open_table(ONE_TIME_PREKEYS)?;
            txn.open_table(DEVICE_LISTS)?;
            txn.open_table(EXPIRY)?;
            txn.open_table(TOMBSTONES)?;
            let mut info = txn.open_table(INFO)?;
            let stored = info
                .get(FORMAT_KEY)?
                .map(|g| decode_format(g.value()))
                .transpose()?;
            match stored {
                Some(FORMAT_VERSION) => Ok(((), Changed::No)),
                Some(other) => Err(StoreError::Backend(format!(
                    "unsupported store format {other} (this relay reads {FORMAT_VERSION})"
                ))),
                None => {
                    info.insert(FORMAT_KEY, FORMAT_VERSION.to_be_bytes().as_slice())?;
                    Ok(((), Changed::Yes))
                }
            }
        })?;
        Ok(store)
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// Run `f` in one write transaction; commit it durably if `f` reports a
    /// change, abort it otherwise or on error.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<(T, Changed), StoreError>,
    ) -> Result<T, StoreError> {
        self.write_with(Durability::Immediate, f)
    }

    /// [`RedbStore::write`] with a chosen durability. Only acknowledgements use
    /// [`Durability::None`]: losing one in a crash re-delivers envelopes the
    /// device already has, which clients drop by sender seq, so an ack need
    /// not wait for an fsync. Every [`DURABLE_ACK_EVERY`]th ack (and any
    /// other write) is durable, which also persists the acks before it and
    /// lets redb reclaim the pages they freed.
    fn write_with<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<(T, Changed), StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability)?;
        // On error `txn` is dropped here, which aborts it.
        let (out, changed) = f(&txn)?;
        match changed {
            Changed::Yes => txn.commit()?,
            Changed::No => txn.abort()?,
        }
        Ok(out)
    }
}

/// The counters of `device`'s inbox (zeros if it has none yet).
fn load_state<T>(meta: &T, device: &DeviceId) -> Result<InboxState, StoreError>
where
    T: ReadableTable<&'static [u8; 16], &'static [u8]>,
{
    Ok(meta
        .get(device.as_bytes())?
        .map(|g| decode_state(g.value()))
        .transpose()?
        .unwrap_or_default())
}

/// Count the inbox rows of `device` with `first ≤ seq ≤ last`, reading keys
/// only.
fn count_rows<T>(inbox: &T, device: &DeviceId, first: u64, last: u64) -> Result<u64, StoreError>
where
    T: ReadableTable<&'static [u8; 24], &'static [u8]>,
{
    if first > last {
        return Ok(0);
    }
    let (lo, hi) = (inbox_key(device, first), inbox_key(device, last));
    let mut n = 0u64;
    for item in inbox.range::<&InboxKey>(&lo..=&hi)? {
        item?;
        n += 1;
    }
    Ok(n)
}

/// The batch's view of inbox counters: loaded on first use, written back once
/// at the end of the transaction.
struct StateCache<'m, 't> {
    meta: &'m mut MetaTable<'t>,
    states: BTreeMap<DeviceId, InboxState>,
}

impl<'m, 't> StateCache<'m, 't> {
    fn new(meta: &'m mut MetaTable<'t>) -> Self {
        StateCache {
            meta,
            states: BTreeMap::new(),
        }
    }

    fn get(&mut self, device: DeviceId) -> Result<&mut InboxState, StoreError> {
        use std::collections::btree_map::Entry;
        match self.states.entry(device) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => Ok(e.insert(load_state(&*self.meta, &device)?)),
        }
    }

    fn flush(self) -> Result<(), StoreError> {
        for (device, state) in &self.states {
            self.meta
                .insert(device.as_bytes(), encode_state(state).as_slice())?;
        }
        Ok(())
    }
}

/// Remove `device`'s inbox rows with seq ≤ `up_to` and their expiry index
/// entries, updating `state`.
fn delete_acked(
    inbox: &mut InboxTable<'_>,
    expiry: &mut Table<'_, &'static [u8; 32], ()>,
    device: &DeviceId,
    up_to: u64,
    state: &mut InboxState,
) -> Result<(), StoreError> {
    let (lo, hi) = (inbox_key(device, 0), inbox_key(device, up_to));
    let mut removed = Vec::new();
    for item in inbox.extract_from_if::<&InboxKey, _>(&lo..=&hi, |_, _| true)? {
        let (k, v) = item?;
        let (_, seq) = split_inbox_key(k.value());
        let (header, envelope) = decode_inbox_row(v.value())?;
        removed.push((seq, header.expires_at_ms, envelope.len() as u64));
    }
    for (seq, expires_at_ms, len) in removed {
        expiry.remove(&expiry_key(expires_at_ms, device, seq))?;
        rules::release(state, len);
    }
    Ok(())
}

impl Store for RedbStore {
    fn register_device(
        &self,
        registration: &DeviceRegistration,
        now_ms: u64,
    ) -> Result<DeviceRecord, StoreError> {
        self.write(|txn| {
            let mut devices = txn.open_table(DEVICES)?;
            let key = registration.device.as_bytes();
            let existing = devices
                .get(key)?
                .map(|g| decode_device(registration.device, g.value()))
                .transpose()?;
            match existing {
                Some(record) if record.registration == *registration => Ok((record, Changed::No)),
                Some(_) => Err(StoreError::AlreadyRegistered),
                None => {
                    let record = DeviceRecord {
                        registration: registration.clone(),
                        registered_at_ms: now_ms,
                    };
                    devices.insert(key, encode_device(&record).as_slice())?;
                    Ok((record, Changed::Yes))
                }
            }
        })
    }

    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let found = devices
            .get(device.as_bytes())?
            .map(|g| decode_device(*device, g.value()))
            .transpose()?;
        Ok(found)
    }

    fn commit(&self, batch: &[NewEnvelope]) -> Result<Vec<CommitOutcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let limits = self.limits;
        self.write(|txn| {
            let devices = txn.open_table(DEVICES)?;
            let mut inbox = txn.open_table(INBOX)?;
            let mut dedup = txn.open_table(DEDUP)?;
            let mut dedup_expiry = txn.open_table(DEDUP_EXPIRY)?;
            let mut expiry = txn.open_table(EXPIRY)?;
            let mut meta = txn.open_table(INBOX_META)?;
            let mut states = StateCache::new(&mut meta);
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut changed = Changed::No;
            for env in batch {
                let dk = dedup_key(&env.sender, &env.recipient, &env.message_id);
                let seen = dedup
                    .get(&dk)?
                    .map(|g| decode_dedup(g.value()))
                    .transpose()?;
                if let Some(entry) = seen {
                    outcomes.push(CommitOutcome::Duplicate { seq: entry.seq });
                    continue;
                }
                if devices.get(env.recipient.as_bytes())?.is_none() {
                    outcomes.push(CommitOutcome::Refused(Refusal::UnknownRecipient));
                    continue;
                }
                let len = env.bytes.len() as u64;
                let state = states.get(env.recipient)?;
                if let Err(refusal) = rules::admit(state, len, &limits) {
                    outcomes.push(CommitOutcome::Refused(refusal));
                    continue;
                }
                let seq = rules::assign(state, len)
                    .ok_or_else(|| StoreError::Backend("inbox seq space exhausted".into()))?;
                let header = InboxRowHeader {
                    expires_at_ms: env.expires_at_ms,
                    sender: env.sender,
                    conversation: env.conversation,
                    sender_seq: env.sender_seq,
                };
                inbox.insert(
                    &inbox_key(&env.recipient, seq),
                    encode_inbox_row(&header, &env.bytes).as_slice(),
                )?;
                expiry.insert(&expiry_key(env.expires_at_ms, &env.recipient, seq), ())?;
                let entry = DedupEntry {
                    seq,
                    expires_at_ms: env.expires_at_ms,
                };
                dedup.insert(&dk, encode_dedup(&entry).as_slice())?;
                dedup_expiry.insert(&dedup_expiry_key(env.expires_at_ms, &dk), ())?;
                outcomes.push(CommitOutcome::Stored { seq });
                changed = Changed::Yes;
            }
            if changed == Changed::Yes {
                states.flush()?;
            }
            Ok((outcomes, changed))
        })
    }

    fn pull(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<InboxPage, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(INBOX_META)?;
        let inbox = txn.open_table(INBOX)?;
        let tombs = txn.open_table(TOMBSTONES)?;
        let state = load_state(&meta, device)?;

        let mut envelopes = Vec::new();
        let mut oldest_retained = None;
        let first = after.checked_add(1);
        if let Some(first) = first {
            let (lo, hi) = (inbox_key(device, first), inbox_key(device, u64::MAX));
            let mut budget = PageBudget::new(limit, max_bytes);
            for item in inbox.range::<&InboxKey>(&lo..=&hi)? {
                let (k, v) = item?;
                let (_, seq) = split_inbox_key(k.value());
                oldest_retained.get_or_insert(seq);
                let (_, bytes) = decode_inbox_row(v.value())?;
                if !budget.take(bytes.len()) {
                    break;
                }
                envelopes.push(StoredEnvelope {
                    seq,
                    bytes: bytes.to_vec(),
                });
            }
        }

        let page_len = envelopes.len() as u64;
        let boundary = envelopes.last().map_or(after, |e| e.seq);
        let remaining = match rules::remaining_scan(&state, after, boundary) {
            RemainingScan::Below { after } => {
                let below = count_rows(&inbox, device, state.acked.saturating_add(1), after)?;
                state.depth.saturating_sub(below).saturating_sub(page_len)
            }
            RemainingScan::Above { boundary } => match boundary.checked_add(1) {
                Some(next) => count_rows(&inbox, device, next, u64::MAX)?,
                None => 0,
            },
        };

        let mut dropped = Vec::new();
        if let Some(first) = first {
            let (lo, hi) = (inbox_key(device, first), inbox_key(device, u64::MAX));
            for item in tombs.range::<&InboxKey>(&lo..=&hi)? {
                let (_, v) = item?;
                dropped.push(decode_tombstone(v.value())?);
            }
        }
        let oldest = oldest_retained.unwrap_or_else(|| state.head.saturating_add(1));
        Ok(InboxPage {
            envelopes,
            remaining,
            truncated: tombstones::truncation(oldest, dropped),
        })
    }

    fn ack(&self, device: &DeviceId, up_to: u64) -> Result<u64, StoreError> {
        let n = self.acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let durability = if n % DURABLE_ACK_EVERY == DURABLE_ACK_EVERY - 1 {
            Durability::Immediate
        } else {
            Durability::None
        };
        self.write_with(durability, |txn| {
            let mut meta = txn.open_table(INBOX_META)?;
            let mut state = load_state(&meta, device)?;
            let target = up_to.min(state.head);
            if target <= state.acked {
                return Ok((state.acked, Changed::No));
            }
            let mut inbox = txn.open_table(INBOX)?;
            let mut expiry = txn.open_table(EXPIRY)?;
            delete_acked(&mut inbox, &mut expiry, device, target, &mut state)?;
            let mut tombs = txn.open_table(TOMBSTONES)?;
            let (lo, hi) = (inbox_key(device, 0), inbox_key(device, target));
            for item in tombs.extract_from_if::<&InboxKey, _>(&lo..=&hi, |_, _| true)? {
                item?;
            }
            state.acked = target;
            meta.insert(device.as_bytes(), encode_state(&state).as_slice())?;
            Ok((target, Changed::Yes))
        })
    }

    fn inbox_state(&self, device: &DeviceId) -> Result<InboxState, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(INBOX_META)?;
        load_state(&meta, device)
    }

    fn purge_expired(&self, now_ms: u64, max: usize) -> Result<PurgeStats, StoreError> {
        if max == 0 {
            return Ok(PurgeStats::default());
        }
        self.write(|txn| {
            let mut stats = PurgeStats::default();
            let mut changed = Changed::No;

            let mut expiry = txn.open_table(EXPIRY)?;
            let mut inbox = txn.open_table(INBOX)?;
            let mut tombs = txn.open_table(TOMBSTONES)?;
            let mut meta = txn.open_table(INBOX_META)?;
            let mut states = StateCache::new(&mut meta);
            let hi = expiry_upper(now_ms);
            let mut due = Vec::new();
            for item in expiry
                .extract_from_if::<&ExpiryKey, _>(..=&hi, |_, _| true)?
                .take(max)
            {
                let (k, _) = item?;
                due.push(split_expiry_key(k.value()));
            }
            for (_, device, seq) in due {
                changed = Changed::Yes;
                let key = inbox_key(&device, seq);
                let row = inbox
                    .remove(&key)?
                    .map(|g| decode_inbox_row(g.value()).map(|(h, env)| (h, env.len() as u64)))
                    .transpose()?;
                // An index entry without its row (already acked) just goes.
                if let Some((header, len)) = row {
                    tombs.insert(&key, encode_tombstone(&header.tombstone()).as_slice())?;
                    rules::release(states.get(device)?, len);
                    stats.expired += 1;
                }
            }
            states.flush()?;

            let mut dedup_expiry = txn.open_table(DEDUP_EXPIRY)?;
            let mut dedup = txn.open_table(DEDUP)?;
            let hi = dedup_expiry_upper(now_ms);
            let mut due = Vec::new();
            for item in dedup_expiry
                .extract_from_if::<&DedupExpiryKey, _>(..=&hi, |_, _| true)?
                .take(max)
            {
                let (k, _) = item?;
                due.push(split_dedup_expiry_key(k.value()).1);
            }
            for dk in due {
                changed = Changed::Yes;
                if dedup.remove(&dk)?.is_some() {
                    stats.dedup_removed += 1;
                }
            }
            Ok((stats, changed))
        })
    }

    fn publish_prekeys(
        &self,
        device: &DeviceId,
        signed_prekey: &SignedPrekey,
        one_time: &[OneTimePrekey],
    ) -> Result<u32, StoreError> {
        let cap = u64::from(self.limits.max_one_time_prekeys);
        self.write(|txn| {
            let devices = txn.open_table(DEVICES)?;
            if devices.get(device.as_bytes())?.is_none() {
                return Err(StoreError::UnknownDevice);
            }
            let mut spks = txn.open_table(SIGNED_PREKEYS)?;
            spks.insert(
                device.as_bytes(),
                encode_signed_prekey(signed_prekey).as_slice(),
            )?;
            let mut otks = txn.open_table(ONE_TIME_PREKEYS)?;
            let mut count = count_otks(&otks, device)?;
            for otk in one_time {
                if count >= cap {
                    break;
                }
                let key = otk_key(device, otk.id);
                if otks.get(&key)?.is_some() {
                    continue;
                }
                otks.insert(&key, otk.public.as_slice())?;
                count += 1;
            }
            Ok((u32::try_from(count).unwrap_or(u32::MAX), Changed::Yes))
        })
    }

    fn take_prekey_bundle(&self, device: &DeviceId) -> Result<Option<PrekeyBundle>, StoreError> {
        self.write(|txn| {
            let devices = txn.open_table(DEVICES)?;
            let record = devices
                .get(device.as_bytes())?
                .map(|g| decode_device(*device, g.value()))
                .transpose()?
                .ok_or(StoreError::UnknownDevice)?;
            let spks = txn.open_table(SIGNED_PREKEYS)?;
            let spk = spks
                .get(device.as_bytes())?
                .map(|g| decode_signed_prekey(g.value()))
                .transpose()?;
            let Some(signed_prekey) = spk else {
                return Ok((None, Changed::No));
            };
            let mut otks = txn.open_table(ONE_TIME_PREKEYS)?;
            let (lo, hi) = (otk_key(device, 0), otk_key(device, u32::MAX));
            let mut one_time_prekey = None;
            // The lowest id is handed out and removed in this transaction.
            if let Some(item) = otks
                .extract_from_if::<&OtkKey, _>(&lo..=&hi, |_, _| true)?
                .next()
            {
                let (k, v) = item?;
                let (_, id) = split_otk_key(k.value());
                one_time_prekey = Some(OneTimePrekey {
                    id,
                    public: decode_otk_public(v.value())?,
                });
            }
            let changed = if one_time_prekey.is_some() {
                Changed::Yes
            } else {
                Changed::No
            };
            let reg = record.registration;
            let bundle = PrekeyBundle {
                device: *device,
                user: reg.user,
                signing_key: reg.signing_key,
                agreement_key: reg.agreement_key,
                signed_prekey,
                one_time_prekey,
            };
            Ok((Some(bundle), changed))
        })
    }

    fn one_time_prekeys_left(&self, device: &DeviceId) -> Result<u32, StoreError> {
        let txn = self.db.begin_read()?;
        let otks = txn.open_table(ONE_TIME_PREKEYS)?;
        Ok(u32::try_from(count_otks(&otks, device)?).unwrap_or(u32::MAX))
    }

    fn publish_device_list(&self, list: &SignedDeviceList) -> Result<u64, StoreError> {
        let user = list.list.user;
        let version = list.list.version;
        let encoded = encode_device_list(list)?;
        self.write(|txn| {
            let mut lists = txn.open_table(DEVICE_LISTS)?;
            let stored = lists
                .get(user.as_bytes())?
                .map(|g| decode_device_list(user, g.value()))
                .transpose()?;
            if let Some(stored) = stored
                && stored.list.version >= version
            {
                return Err(StoreError::StaleDeviceList {
                    stored: stored.list.version,
                });
            }
            lists.insert(user.as_bytes(), encoded.as_slice())?;
            Ok((version, Changed::Yes))
        })
    }

    fn device_list(&self, user: &UserKey) -> Result<Option<SignedDeviceList>, StoreError> {
        let txn = self.db.begin_read()?;
        let lists = txn.open_table(DEVICE_LISTS)?;
        let found = lists
            .get(user.as_bytes())?
            .map(|g| decode_device_list(*user, g.value()))
            .transpose()?;
        Ok(found)
    }

    fn total_depth(&self) -> Result<u64, StoreError> {
        // redb keeps each table's entry count in its header: O(1).
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(INBOX)?.len()?)
    }
}

/// One-time prekeys stored for `device`, at most the pool cap: a bounded
/// key-only scan.
fn count_otks<T>(otks: &T, device: &DeviceId) -> Result<u64, StoreError>
where
    T: ReadableTable<&'static [u8; 20], &'static [u8]>,
{
    let (lo, hi) = (otk_key(device, 0), otk_key(device, u32::MAX));
    let mut n = 0u64;
    for item in otks.range::<&OtkKey>(&lo..=&hi)? {
        item?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(n: u8) -> DeviceRegistration {
        DeviceRegistration {
            device: DeviceId([n; 16]),
            user: UserKey([n; 32]),
            signing_key: [n; 32],
            agreement_key: [n; 32],
            user_signature: [n; 64],
        }
    }

    fn is_corrupt<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
        matches!(&r, Err(StoreError::Backend(m)) if m.starts_with("corrupt"))
    }

    /// Write raw bytes under a key of a table, bypassing the store's codecs.
    fn poke(store: &RedbStore, f: impl FnOnce(&WriteTransaction)) {
        let txn = store.db.begin_write().unwrap();
        f(&txn);
        txn.commit().unwrap();
    }

    #[test]
    fn corrupt_values_on_disk_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let d = DeviceId([1; 16]);
        store.register_device(&registration(1), 5).unwrap();
        poke(&store, |txn| {
            let mut t = txn.open_table(DEVICES).unwrap();
            t.insert(d.as_bytes(), [1u8, 2, 3].as_slice()).unwrap();
            let mut t = txn.open_table(INBOX_META).unwrap();
            t.insert(d.as_bytes(), [0u8; 31].as_slice()).unwrap();
            let mut t = txn.open_table(INBOX).unwrap();
            t.insert(&inbox_key(&d, 1), [0u8; 10].as_slice()).unwrap();
            let mut t = txn.open_table(DEVICE_LISTS).unwrap();
            t.insert(&[1u8; 32], [0u8; 75].as_slice()).unwrap();
            let mut t = txn.open_table(TOMBSTONES).unwrap();
            t.insert(&inbox_key(&d, 2), [0u8; 41].as_slice()).unwrap();
        });
        assert!(is_corrupt(store.device(&d)));
        assert!(is_corrupt(store.register_device(&registration(1), 6)));
        assert!(is_corrupt(store.inbox_state(&d)));
        assert!(is_corrupt(store.pull(&d, 0, 10, 1000)));
        assert!(is_corrupt(store.ack(&d, 1)));
        assert!(is_corrupt(store.device_list(&UserKey([1; 32]))));
        assert!(is_corrupt(store.take_prekey_bundle(&d)));
    }

    #[test]
    fn corrupt_inbox_row_fails_pull_and_purge_without_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let d = DeviceId([2; 16]);
        poke(&store, |txn| {
            let mut t = txn.open_table(INBOX).unwrap();
            t.insert(&inbox_key(&d, 1), [0u8; 47].as_slice()).unwrap();
            let mut t = txn.open_table(EXPIRY).unwrap();
            t.insert(&expiry_key(10, &d, 1), ()).unwrap();
        });
        assert!(is_corrupt(store.pull(&d, 0, 10, 1000)));
        assert!(is_corrupt(store.purge_expired(10, 10)));
        // The failed purge rolled back: the index entry is still there.
        let txn = store.db.begin_read().unwrap();
        assert_eq!(txn.open_table(EXPIRY).unwrap().len().unwrap(), 1);
    }

    #[test]
    fn other_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let store = RedbStore::open(&path, StoreLimits::default()).unwrap();
            poke(&store, |txn| {
                let mut t = txn.open_table(INFO).unwrap();
                t.insert(FORMAT_KEY, 2u32.to_be_bytes().as_slice()).unwrap();
            });
        }
        let err = RedbStore::open(&path, StoreLimits::default()).unwrap_err();
        assert!(matches!(err, StoreError::Backend(m) if m.contains("format 2")));
    }

    #[test]
    fn no_op_calls_do_not_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb"), StoreLimits::default()).unwrap();
        let before = store.db.begin_read().unwrap();
        store.register_device(&registration(3), 1).unwrap();
        // A repeat registration, an ack of nothing and an empty purge leave
        // the snapshot contents the same.
        store.register_device(&registration(3), 2).unwrap();
        assert_eq!(store.ack(&DeviceId([3; 16]), 5).unwrap(), 0);
        assert_eq!(
            store.purge_expired(u64::MAX, 10).unwrap(),
            PurgeStats::default()
        );
        assert_eq!(
            store
                .device(&DeviceId([3; 16]))
                .unwrap()
                .unwrap()
                .registered_at_ms,
            1
        );
        // The snapshot taken before the registration still does not see it.
        assert!(
            before
                .open_table(DEVICES)
                .unwrap()
                .get(&[3u8; 16])
                .unwrap()
                .is_none()
        );
    }
}
