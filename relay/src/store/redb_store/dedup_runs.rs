//! The dedup index in runs (format 7): one row per (sender, recipient) and
//! commit instead of one per envelope.
//!
//! A sender's message ids begin with their creation time
//! (`MessageId::new`), so the ids one sender sends one recipient mostly
//! increase. A commit's new entries of one pair are written as one row keyed
//! `sender ‖ recipient ‖ first message id`, holding the entries sorted by id.
//! The rows of a pair cover disjoint id ranges, so an id is found with one
//! B-tree seek: the pair's last row at or below it. Ids above the pair's
//! highest stored id, the usual case, are known to be new from that highest
//! id alone, which the commit reads once per pair.
//!
//! Each entry keeps its own expiry. A second table queues every row at the
//! earliest expiry among its entries, so purge drops entries when they
//! expire, in expiry order, without a row per entry.
//!
//! Why: under heavy ingest a commit stores about sixteen envelopes per
//! (sender, recipient) pair, and redb's cost is per row (the B-tree walk, the
//! leaf update), not per byte. A row per envelope was a tenth of the relay's
//! ingest time (`BENCHMARKS.md`).

use super::super::keys::DedupExpiryKey;
use super::super::tables::{DEDUP_RUN_QUEUE, DEDUP_RUNS, corrupt};
use crate::store::StoreError;
use hush_protocol::{DeviceId, MessageId};
use redb::{ReadableTable, Table, WriteTransaction};

/// `sender 16 ‖ recipient 16 ‖ first message id 16`.
pub(crate) type RunKey = [u8; 48];

/// Most entries in one row: 4 KiB.
pub(crate) const RUN_MAX: usize = 128;

/// Bytes of one entry: `message id 16 ‖ seq u64 ‖ expires_at u64`.
const ENTRY_LEN: usize = 32;

type RunsTable<'t> = Table<'t, &'static RunKey, &'static [u8]>;
type QueueTable<'t> = Table<'t, &'static DedupExpiryKey, ()>;

/// One dedup entry: a message id of the pair, the seq it was stored under,
/// and when the entry is dropped (the envelope's expiry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub id: [u8; 16],
    pub seq: u64,
    pub expires_at_ms: u64,
}

/// The row key of the pair's run that starts at `first`.
fn run_key(sender: &DeviceId, recipient: &DeviceId, first: &[u8; 16]) -> RunKey {
    let mut k = [0u8; 48];
    k[..16].copy_from_slice(sender.as_bytes());
    k[16..32].copy_from_slice(recipient.as_bytes());
    k[32..].copy_from_slice(first);
    k
}

/// The queue key of a row whose earliest entry expires at `at`.
fn queue_key(at: u64, key: &RunKey) -> DedupExpiryKey {
    let mut k = [0u8; 56];
    k[..8].copy_from_slice(&at.to_be_bytes());
    k[8..].copy_from_slice(key);
    k
}

/// `n × (message id ‖ seq u64 ‖ expires_at u64)`, ids ascending.
fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        v.extend_from_slice(&e.id);
        v.extend_from_slice(&e.seq.to_be_bytes());
        v.extend_from_slice(&e.expires_at_ms.to_be_bytes());
    }
    v
}

/// One entry of a checked value.
fn entry_at(bytes: &[u8], i: usize) -> Result<Entry, StoreError> {
    let at = i
        .checked_mul(ENTRY_LEN)
        .ok_or_else(|| corrupt("dedup run"))?;
    let b = bytes
        .get(at..at + ENTRY_LEN)
        .ok_or_else(|| corrupt("dedup run"))?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&b[..16]);
    let mut n = [0u8; 8];
    n.copy_from_slice(&b[16..24]);
    let seq = u64::from_be_bytes(n);
    n.copy_from_slice(&b[24..32]);
    Ok(Entry {
        id,
        seq,
        expires_at_ms: u64::from_be_bytes(n),
    })
}

/// Entries in a value, checking its length.
fn count(bytes: &[u8]) -> Result<usize, StoreError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(ENTRY_LEN) {
        return Err(corrupt("dedup run"));
    }
    Ok(bytes.len() / ENTRY_LEN)
}

/// Inverse of [`encode`], checking that the ids ascend strictly.
fn decode(bytes: &[u8]) -> Result<Vec<Entry>, StoreError> {
    let n = count(bytes)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let e = entry_at(bytes, i)?;
        if out.last().is_some_and(|p: &Entry| p.id >= e.id) {
            return Err(corrupt("dedup run (ids out of order)"));
        }
        out.push(e);
    }
    Ok(out)
}

/// The earliest expiry among `entries` (not empty).
fn earliest(entries: &[Entry]) -> u64 {
    entries.iter().map(|e| e.expires_at_ms).min().unwrap_or(0)
}

/// The pair's last row whose key is at or below `id`, as its key and raw
/// value.
fn row_at_or_below<T>(
    table: &T,
    sender: &DeviceId,
    recipient: &DeviceId,
    id: &[u8; 16],
) -> Result<Option<(RunKey, Vec<u8>)>, StoreError>
where
    T: ReadableTable<&'static RunKey, &'static [u8]>,
{
    let (lo, hi) = (
        run_key(sender, recipient, &[0; 16]),
        run_key(sender, recipient, id),
    );
    match table.range::<&RunKey>(&lo..=&hi)?.next_back() {
        Some(item) => {
            let (k, v) = item?;
            Ok(Some((*k.value(), v.value().to_vec())))
        }
        None => Ok(None),
    }
}

/// The seq stored for `id` from `sender` to `recipient`, if any.
pub(crate) fn lookup<T>(
    table: &T,
    sender: &DeviceId,
    recipient: &DeviceId,
    id: &MessageId,
) -> Result<Option<u64>, StoreError>
where
    T: ReadableTable<&'static RunKey, &'static [u8]>,
{
    let Some((_, bytes)) = row_at_or_below(table, sender, recipient, id.as_bytes())? else {
        return Ok(None);
    };
    let n = count(&bytes)?;
    // Binary search over the entries in place.
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let e = entry_at(&bytes, mid)?;
        match e.id.cmp(id.as_bytes()) {
            std::cmp::Ordering::Equal => return Ok(Some(e.seq)),
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    Ok(None)
}

/// The highest message id stored for the pair: every id above it is new.
#[cfg(test)]
pub(crate) fn highest<T>(
    table: &T,
    sender: &DeviceId,
    recipient: &DeviceId,
) -> Result<Option<[u8; 16]>, StoreError>
where
    T: ReadableTable<&'static RunKey, &'static [u8]>,
{
    // The pair's last row; only its last entry is read (no copy of it).
    let (lo, hi) = (
        run_key(sender, recipient, &[0; 16]),
        run_key(sender, recipient, &[0xFF; 16]),
    );
    match table.range::<&RunKey>(&lo..=&hi)?.next_back() {
        Some(item) => {
            let (_, v) = item?;
            let bytes = v.value();
            Ok(Some(entry_at(bytes, count(bytes)? - 1)?.id))
        }
        None => Ok(None),
    }
}

/// The pair's last row (key and value): the one that holds its highest id,
/// and that a commit's fresh entries fill first.
pub(crate) fn last_row<T>(
    table: &T,
    sender: &DeviceId,
    recipient: &DeviceId,
) -> Result<Option<(RunKey, Vec<u8>)>, StoreError>
where
    T: ReadableTable<&'static RunKey, &'static [u8]>,
{
    row_at_or_below(table, sender, recipient, &[0xFF; 16])
}

/// The two tables, opened in one write transaction.
pub(crate) struct Tables<'t> {
    runs: RunsTable<'t>,
    queue: QueueTable<'t>,
}

impl<'t> Tables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            runs: txn.open_table(DEDUP_RUNS)?,
            queue: txn.open_table(DEDUP_RUN_QUEUE)?,
        })
    }

    /// Read access for [`lookup`] and [`last_row`].
    pub(crate) fn runs(&self) -> &RunsTable<'t> {
        &self.runs
    }

    /// Write `entries` (ids ascending, not empty) as rows of at most
    /// [`RUN_MAX`], each queued at its earliest expiry.
    fn put(
        &mut self,
        sender: &DeviceId,
        recipient: &DeviceId,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        for chunk in entries.chunks(RUN_MAX) {
            let key = run_key(sender, recipient, &chunk[0].id);
            self.runs.insert(&key, encode(chunk).as_slice())?;
            self.queue.insert(&queue_key(earliest(chunk), &key), ())?;
        }
        Ok(())
    }

    /// Remove the row `key` holding `entries` and its queue entry.
    fn take(&mut self, key: &RunKey, entries: &[Entry]) -> Result<(), StoreError> {
        self.runs.remove(key)?;
        self.queue.remove(&queue_key(earliest(entries), key))?;
        Ok(())
    }

    /// Add a commit's new entries of one pair: ids not stored for it yet,
    /// distinct. `last` is the pair's last row before them ([`last_row`]),
    /// which holds its highest stored id. Entries above it fill the pair's last row, then make
    /// new rows; one at or below it
    /// (an id older than the pair's newest, rare) joins the row whose range
    /// it falls in or borders, which is rewritten.
    pub(crate) fn add(
        &mut self,
        sender: &DeviceId,
        recipient: &DeviceId,
        last: Option<(RunKey, Vec<u8>)>,
        mut new: Vec<Entry>,
    ) -> Result<(), StoreError> {
        let last = match last {
            Some((key, bytes)) => Some((key, decode(&bytes)?)),
            None => None,
        };
        let highest = last
            .as_ref()
            .and_then(|(_, entries)| entries.last())
            .map(|e| e.id);
        new.sort_unstable_by_key(|e| e.id);
        let split = new.partition_point(|e| highest.is_some_and(|h| e.id <= h));
        let (inside, mut fresh) = new.split_at(split);
        // Fresh entries fill the pair's last row first (its ids are all
        // below them): one rewrite instead of a new row and its queue entry,
        // which at a few envelopes per commit is most of the work. Its queue
        // entry moves only if a fresh entry expires before all of its own.
        if !fresh.is_empty()
            && let Some((key, mut entries)) = last
        {
            let room = RUN_MAX.saturating_sub(entries.len()).min(fresh.len());
            if room > 0 {
                let (join, rest) = fresh.split_at(room);
                let before = earliest(&entries);
                entries.extend_from_slice(join);
                let after = earliest(&entries);
                self.runs.insert(&key, encode(&entries).as_slice())?;
                if after != before {
                    self.queue.remove(&queue_key(before, &key))?;
                    self.queue.insert(&queue_key(after, &key), ())?;
                }
                fresh = rest;
            }
        }
        if !fresh.is_empty() {
            self.put(sender, recipient, fresh)?;
        }
        for e in inside {
            // The row it falls in (or above the end of); below the pair's
            // first row, that first row.
            let found = match row_at_or_below(&self.runs, sender, recipient, &e.id)? {
                Some(row) => Some(row),
                None => {
                    let (lo, hi) = (
                        run_key(sender, recipient, &[0; 16]),
                        run_key(sender, recipient, &[0xFF; 16]),
                    );
                    match self.runs.range::<&RunKey>(&lo..=&hi)?.next() {
                        Some(item) => {
                            let (k, v) = item?;
                            Some((*k.value(), v.value().to_vec()))
                        }
                        None => None,
                    }
                }
            };
            let Some((key, bytes)) = found else {
                return Err(corrupt("dedup runs (highest id without a row)"));
            };
            let mut entries = decode(&bytes)?;
            let at = match entries.binary_search_by(|x| x.id.cmp(&e.id)) {
                Ok(_) => return Err(corrupt("dedup runs (new id already stored)")),
                Err(at) => at,
            };
            self.take(&key, &entries)?;
            entries.insert(at, *e);
            self.put(sender, recipient, &entries)?;
        }
        Ok(())
    }

    /// Drop expired entries (expires_at ≤ `now_ms`), earliest first, at
    /// most `budget` of them. Returns (entries dropped, entries looked at).
    pub(crate) fn purge(&mut self, now_ms: u64, budget: u64) -> Result<(u64, u64), StoreError> {
        let upper = queue_key(now_ms, &[0xFF; 48]);
        let (mut dropped, mut looked) = (0u64, 0u64);
        while looked < budget {
            // The two earliest rows due. Entries leave in the order
            // (expires_at, sender, recipient, message id) across all rows:
            // the first row's go up to the second's time, and those at that
            // time only if the first row's pair and ids come first (rows of
            // one pair hold disjoint id ranges, so its key says so).
            let (first, until) = {
                let mut due = self.queue.range::<&DedupExpiryKey>(..=&upper)?;
                let Some(first) = due.next() else { break };
                let first = *first?.0.value();
                let until = match due.next() {
                    Some(item) => {
                        let second = *item?.0.value();
                        let at = u64_at(&second);
                        if first[8..] < second[8..] {
                            at
                        } else {
                            at.saturating_sub(1)
                        }
                    }
                    None => now_ms,
                };
                (first, until.min(now_ms))
            };
            let mut key = [0u8; 48];
            key.copy_from_slice(&first[8..]);
            let Some(bytes) = self.runs.get(&key)?.map(|g| g.value().to_vec()) else {
                return Err(corrupt("dedup run queue (entry without its row)"));
            };
            let entries = decode(&bytes)?;
            if queue_key(earliest(&entries), &key) != first {
                return Err(corrupt("dedup run queue (entry at another time)"));
            }
            let mut due: Vec<usize> = (0..entries.len())
                .filter(|&i| entries[i].expires_at_ms <= until)
                .collect();
            due.sort_by_key(|&i| entries[i].expires_at_ms);
            due.truncate(
                usize::try_from(budget - looked)
                    .unwrap_or(usize::MAX)
                    .max(1),
            );
            looked += due.len() as u64;
            dropped += due.len() as u64;
            let gone: std::collections::BTreeSet<usize> = due.into_iter().collect();
            let rest: Vec<Entry> = entries
                .iter()
                .enumerate()
                .filter(|(i, _)| !gone.contains(i))
                .map(|(_, e)| *e)
                .collect();
            self.take(&key, &entries)?;
            if !rest.is_empty() {
                let (sender, recipient) = pair_of(&key);
                self.put(&sender, &recipient, &rest)?;
            }
        }
        Ok((dropped, looked))
    }
}

/// One commit's view of the dedup runs: for each pair it met, the highest
/// id stored before it (read once) and the entries it adds, sorted by id.
/// One hash lookup per envelope; ids above both are new without a seek.
#[derive(Default)]
pub(crate) struct Batch {
    pairs: std::collections::HashMap<(DeviceId, DeviceId), Pair>,
    added: usize,
}

/// A pair's part of a [`Batch`].
struct Pair {
    /// The pair's last row before this batch, read once.
    last: Option<(RunKey, Vec<u8>)>,
    highest: Option<[u8; 16]>,
    entries: Vec<Entry>,
}

impl Batch {
    /// The seq stored for `id` from `sender` to `recipient`, before this
    /// batch or by it, if any.
    pub(crate) fn find<T>(
        &mut self,
        table: &T,
        sender: &DeviceId,
        recipient: &DeviceId,
        id: &MessageId,
    ) -> Result<Option<u64>, StoreError>
    where
        T: ReadableTable<&'static RunKey, &'static [u8]>,
    {
        use std::collections::hash_map::Entry as Slot;
        let pair = match self.pairs.entry((*sender, *recipient)) {
            Slot::Occupied(o) => o.into_mut(),
            Slot::Vacant(v) => {
                let last = last_row(table, sender, recipient)?;
                let highest = match &last {
                    Some((_, bytes)) => Some(entry_at(bytes, count(bytes)? - 1)?.id),
                    None => None,
                };
                v.insert(Pair {
                    last,
                    highest,
                    entries: Vec::new(),
                })
            }
        };
        let key = id.as_bytes();
        if pair.entries.last().is_some_and(|last| *key <= last.id)
            && let Ok(at) = pair.entries.binary_search_by(|e| e.id.cmp(key))
        {
            return Ok(Some(pair.entries[at].seq));
        }
        if pair.highest.is_some_and(|h| *key <= h) {
            return lookup(table, sender, recipient, id);
        }
        Ok(None)
    }

    /// Add the entry of a stored envelope whose id [`Batch::find`] found
    /// nowhere.
    pub(crate) fn push(&mut self, sender: &DeviceId, recipient: &DeviceId, entry: Entry) {
        let pair = self
            .pairs
            .entry((*sender, *recipient))
            .or_insert_with(|| Pair {
                last: None,
                highest: None,
                entries: Vec::new(),
            });
        match pair.entries.last() {
            Some(last) if last.id >= entry.id => {
                let at = pair.entries.partition_point(|e| e.id < entry.id);
                pair.entries.insert(at, entry);
            }
            _ => pair.entries.push(entry),
        }
        self.added += 1;
    }

    /// Entries added.
    pub(crate) fn len(&self) -> usize {
        self.added
    }

    /// Whether none were added.
    pub(crate) fn is_empty(&self) -> bool {
        self.added == 0
    }

    /// Write the added entries (pairs in key order, for the B-tree's sake).
    pub(crate) fn write(self, tables: &mut Tables<'_>) -> Result<(), StoreError> {
        let mut pairs: Vec<_> = self
            .pairs
            .into_iter()
            .filter(|(_, p)| !p.entries.is_empty())
            .collect();
        pairs.sort_unstable_by_key(|(k, _)| *k);
        for ((sender, recipient), pair) in pairs {
            tables.add(&sender, &recipient, pair.last, pair.entries)?;
        }
        Ok(())
    }
}

/// A big-endian `u64` at the start of a queue key.
fn u64_at(k: &DedupExpiryKey) -> u64 {
    let mut n = [0u8; 8];
    n.copy_from_slice(&k[..8]);
    u64::from_be_bytes(n)
}

/// The sender and recipient of a row key.
fn pair_of(key: &RunKey) -> (DeviceId, DeviceId) {
    let mut s = [0u8; 16];
    let mut r = [0u8; 16];
    s.copy_from_slice(&key[..16]);
    r.copy_from_slice(&key[16..32]);
    (DeviceId(s), DeviceId(r))
}

/// Check the layout of both tables (for `check_consistency`): every row
/// decodes, is keyed by its first id, lies above the pair's previous row and
/// is queued at its earliest expiry; the queue has nothing else. Returns the
/// number of entries, or what is wrong.
pub(crate) fn check<R, Q>(runs: &R, queue: &Q) -> Result<Result<u64, String>, StoreError>
where
    R: ReadableTable<&'static RunKey, &'static [u8]>,
    Q: ReadableTable<&'static DedupExpiryKey, ()>,
{
    let mut expected = Vec::new();
    let mut previous: Option<(RunKey, [u8; 16])> = None;
    let mut total = 0u64;
    for item in runs.range::<&RunKey>(..)? {
        let (k, v) = item?;
        let key = *k.value();
        let entries = decode(v.value())?;
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(Err("empty dedup run".into()));
        };
        if key[32..] != first.id {
            return Ok(Err("dedup run keyed by another id than its first".into()));
        }
        if let Some((pk, plast)) = previous
            && pk[..32] == key[..32]
            && plast >= first.id
        {
            return Ok(Err("dedup runs of one pair overlap".into()));
        }
        previous = Some((key, last.id));
        expected.push(queue_key(earliest(&entries), &key));
        total += entries.len() as u64;
    }
    expected.sort_unstable();
    let mut actual = Vec::new();
    for item in queue.range::<&DedupExpiryKey>(..)? {
        actual.push(*item?.0.value());
    }
    if actual != expected {
        return Ok(Err("dedup run queue differs from the runs".into()));
    }
    Ok(Ok(total))
}

/// Entries of a pair, from the tables as they stand (tests).
#[cfg(test)]
pub(crate) fn entries_of<T>(
    table: &T,
    sender: &DeviceId,
    recipient: &DeviceId,
) -> Result<std::collections::BTreeMap<[u8; 16], Entry>, StoreError>
where
    T: ReadableTable<&'static RunKey, &'static [u8]>,
{
    let (lo, hi) = (
        run_key(sender, recipient, &[0; 16]),
        run_key(sender, recipient, &[0xFF; 16]),
    );
    let mut out = std::collections::BTreeMap::new();
    for item in table.range::<&RunKey>(&lo..=&hi)? {
        for e in decode(item?.1.value())? {
            out.insert(e.id, e);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata};

    const S: DeviceId = DeviceId([1; 16]);
    const R: DeviceId = DeviceId([2; 16]);

    fn id(n: u8) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[15] = n;
        id
    }

    fn entry(n: u8, expires_at_ms: u64) -> Entry {
        Entry {
            id: id(n),
            seq: u64::from(n) * 10,
            expires_at_ms,
        }
    }

    /// A fresh database with both tables, handed to `f` in one write
    /// transaction, then checked.
    fn with_tables(f: impl FnOnce(&mut Tables<'_>)) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = Tables::open(&txn).unwrap();
            f(&mut t);
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        check(
            &txn.open_table(DEDUP_RUNS).unwrap(),
            &txn.open_table(DEDUP_RUN_QUEUE).unwrap(),
        )
        .unwrap()
        .unwrap();
    }

    fn seq_of(t: &Tables<'_>, n: u8) -> Option<u64> {
        lookup(t.runs(), &S, &R, &MessageId(id(n))).unwrap()
    }

    fn ids(t: &Tables<'_>) -> Vec<u8> {
        entries_of(t.runs(), &S, &R)
            .unwrap()
            .keys()
            .map(|k| k[15])
            .collect()
    }

    /// Ids above the pair's highest fill its last row; older ids join the
    /// row whose range they fall in or border, below the first row too;
    /// every id is then found, and ids never added are not.
    #[test]
    fn entries_are_found_wherever_they_were_added() {
        with_tables(|t| {
            assert_eq!(highest(t.runs(), &S, &R).unwrap(), None);
            t.add(&S, &R, None, vec![entry(20, 5), entry(10, 5)])
                .unwrap();
            let top = highest(t.runs(), &S, &R).unwrap();
            assert_eq!(top, Some(id(20)));
            // Fresh ids fill the last row.
            t.add(
                &S,
                &R,
                last_row(t.runs(), &S, &R).unwrap(),
                vec![entry(22, 6)],
            )
            .unwrap();
            assert_eq!(t.runs.len().unwrap(), 1);
            // A second row (as a full last row would make).
            t.add(&S, &R, None, vec![entry(30, 6), entry(40, 6)])
                .unwrap();
            assert_eq!(t.runs.len().unwrap(), 2);
            // 15 falls inside the first row, 25 between the rows, 5 below both.
            assert_eq!(highest(t.runs(), &S, &R).unwrap(), Some(id(40)));
            t.add(
                &S,
                &R,
                last_row(t.runs(), &S, &R).unwrap(),
                vec![entry(15, 7), entry(25, 7), entry(5, 7)],
            )
            .unwrap();
            assert_eq!(t.runs.len().unwrap(), 2);
            // A fresh entry that expires before the last row's others moves
            // that row in the queue (`with_tables` checks the queue).
            t.add(
                &S,
                &R,
                last_row(t.runs(), &S, &R).unwrap(),
                vec![entry(41, 1)],
            )
            .unwrap();
            assert_eq!(t.runs.len().unwrap(), 2);
            assert_eq!(t.purge(1, 10).unwrap(), (1, 1));
            assert_eq!(ids(t), vec![5, 10, 15, 20, 22, 25, 30, 40]);
            assert_eq!(seq_of(t, 22), Some(220));
            for n in [5, 10, 15, 20, 25, 30, 40] {
                assert_eq!(seq_of(t, n), Some(u64::from(n) * 10), "{n}");
            }
            for n in [0, 4, 11, 26, 35, 41, 255] {
                assert_eq!(seq_of(t, n), None, "{n}");
            }
            // Another pair is separate.
            assert_eq!(lookup(t.runs(), &R, &S, &MessageId(id(10))).unwrap(), None);
            // An id that is already there is a broken caller, not a panic.
            assert!(
                t.add(
                    &S,
                    &R,
                    last_row(t.runs(), &S, &R).unwrap(),
                    vec![entry(10, 9)]
                )
                .is_err()
            );
        });
    }

    /// Large commits and long out-of-order growth are cut into rows of at
    /// most `RUN_MAX`.
    #[test]
    fn rows_stay_within_their_cap() {
        with_tables(|t| {
            let many: Vec<Entry> = (0..=250u8).map(|n| entry(n, 5)).collect();
            t.add(&S, &R, None, many).unwrap();
            for item in t.runs.range::<&RunKey>(..).unwrap() {
                assert!(count(item.unwrap().1.value()).unwrap() <= RUN_MAX);
            }
            assert_eq!(ids(t).len(), 251);
            assert_eq!(seq_of(t, 200), Some(2000));
            // The last row (123 entries) takes five more; the rest start
            // a row of their own.
            let more: Vec<Entry> = (0..10u8)
                .map(|n| {
                    let mut e = entry(n, 5);
                    e.id[14] = 1;
                    e
                })
                .collect();
            t.add(&S, &R, last_row(t.runs(), &S, &R).unwrap(), more)
                .unwrap();
            assert_eq!(t.runs.len().unwrap(), 3);
            for item in t.runs.range::<&RunKey>(..).unwrap() {
                assert!(count(item.unwrap().1.value()).unwrap() <= RUN_MAX);
            }
            assert_eq!(ids(t).len(), 261);
        });
    }

    /// Expired entries leave in the order (expires_at, sender, recipient,
    /// id) across rows and pairs, bounded by the budget; the rest stays
    /// findable.
    #[test]
    fn purge_drops_expired_entries_in_order_within_the_budget() {
        with_tables(|t| {
            // Pair (S, R): ids 1..=4 expiring 10, 30, 20, 40.
            t.add(
                &S,
                &R,
                None,
                vec![entry(1, 10), entry(2, 30), entry(3, 20), entry(4, 40)],
            )
            .unwrap();
            // Pair (R, S) sorts after (S, R)? No: R = 02.., S = 01.., so
            // (R, S) sorts after; give it entries at 20 and 30.
            t.add(&R, &S, None, vec![entry(7, 20), entry(8, 30)])
                .unwrap();
            assert_eq!(t.purge(5, 10).unwrap(), (0, 0));
            // At 30 with a budget of 3: (10, S‖R, 1), (20, S‖R, 3), (20, R‖S, 7).
            assert_eq!(t.purge(30, 3).unwrap(), (3, 3));
            assert_eq!(ids(t), vec![2, 4]);
            assert_eq!(lookup(t.runs(), &R, &S, &MessageId(id(7))).unwrap(), None);
            assert_eq!(
                lookup(t.runs(), &R, &S, &MessageId(id(8))).unwrap(),
                Some(80)
            );
            // Then the two at 30, and nothing at 40 yet.
            assert_eq!(t.purge(30, 10).unwrap(), (2, 2));
            assert_eq!(ids(t), vec![4]);
            assert_eq!(t.purge(40, 10).unwrap(), (1, 1));
            assert_eq!(t.runs.len().unwrap(), 0);
            assert_eq!(t.queue.len().unwrap(), 0);
        });
    }

    /// Overlapping rows, a row keyed by another id and a queue that
    /// disagrees are reported by the check; damaged values are errors.
    #[test]
    fn check_and_readers_catch_damage() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let checked = |db: &Database| {
            let txn = db.begin_read().unwrap();
            check(
                &txn.open_table(DEDUP_RUNS).unwrap(),
                &txn.open_table(DEDUP_RUN_QUEUE).unwrap(),
            )
        };
        let txn = db.begin_write().unwrap();
        {
            let mut t = Tables::open(&txn).unwrap();
            t.add(&S, &R, None, vec![entry(1, 5), entry(3, 5)]).unwrap();
            t.add(
                &S,
                &R,
                last_row(&t.runs, &S, &R).unwrap(),
                vec![entry(4, 5)],
            )
            .unwrap();
        }
        txn.commit().unwrap();
        assert_eq!(checked(&db).unwrap(), Ok(3));
        // A second row whose range reaches into the first's.
        let txn = db.begin_write().unwrap();
        {
            let mut runs = txn.open_table(DEDUP_RUNS).unwrap();
            runs.insert(
                &run_key(&S, &R, &id(4)),
                encode(&[entry(4, 5), entry(2, 5)]).as_slice(),
            )
            .unwrap();
        }
        txn.commit().unwrap();
        assert!(checked(&db).is_err(), "ids out of order");
        let txn = db.begin_write().unwrap();
        {
            let mut runs = txn.open_table(DEDUP_RUNS).unwrap();
            runs.insert(
                &run_key(&S, &R, &id(2)),
                encode(&[entry(2, 5), entry(9, 5)]).as_slice(),
            )
            .unwrap();
            runs.remove(&run_key(&S, &R, &id(4))).unwrap();
        }
        txn.commit().unwrap();
        assert!(matches!(checked(&db), Ok(Err(_))), "overlap or queue");
        let txn = db.begin_write().unwrap();
        {
            let mut runs = txn.open_table(DEDUP_RUNS).unwrap();
            runs.insert(&run_key(&S, &R, &id(2)), [0u8; 33].as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let runs = txn.open_table(DEDUP_RUNS).unwrap();
        assert!(lookup(&runs, &S, &R, &MessageId(id(2))).is_err());
        assert!(checked(&db).is_err());
    }
}
