//! The `inbox` table in runs (format 7): one row per (inbox, commit).
//!
//! A send commit stores a recipient's envelopes at consecutive seqs, so
//! their index entries are written as one row, keyed by the run's first
//! seq, whose value is the entries one after another
//! ([`INBOX_ROW_LEN`] bytes each, as a format 6 row). Under heavy ingest a
//! commit carries about sixteen envelopes per recipient: one B-tree insert
//! instead of sixteen is what the format is for (redb's cost is per row, not
//! per byte). A format 6 row is a run of one, so format 6 files are valid
//! format 7 files as they are.
//!
//! The runs of an inbox cover exactly its stored seqs `(base, head]`, without
//! gaps or overlaps, because every deletion removes a prefix: an ack or a
//! purge that ends inside a run writes its rest back as a new row keyed at
//! its new first seq. Runs hold at most [`RUN_MAX`] entries, which bounds
//! that rewrite and keeps rows small enough for redb's leaves.
//!
//! Every function here reads and writes through the same checks: a value
//! whose length is not a whole number of entries is [`corrupt`], never a
//! panic.

use super::super::keys::{InboxKey, inbox_key, split_inbox_key};
use super::super::tables::{INBOX_ROW_LEN, InboxRow, corrupt, decode_inbox_row};
use super::InboxTable;
use crate::store::StoreError;
use hush_protocol::DeviceId;
use redb::ReadableTable;
use std::collections::BTreeMap;

/// Most entries in one run row: 4 KiB of entries, one page of redb's.
pub(crate) const RUN_MAX: usize = 64;

/// Number of entries in a run value, checking that it is a whole number of
/// them and not none.
pub(crate) fn run_len(bytes: &[u8]) -> Result<u64, StoreError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(INBOX_ROW_LEN) {
        return Err(corrupt("inbox run"));
    }
    Ok((bytes.len() / INBOX_ROW_LEN) as u64)
}

/// Entry `i` of a run value (checked by [`run_len`]).
fn entry(bytes: &[u8], i: u64) -> Result<InboxRow, StoreError> {
    let at = usize::try_from(i)
        .ok()
        .and_then(|i| i.checked_mul(INBOX_ROW_LEN))
        .ok_or_else(|| corrupt("inbox run"))?;
    let slice = bytes
        .get(at..at + INBOX_ROW_LEN)
        .ok_or_else(|| corrupt("inbox run"))?;
    decode_inbox_row(slice)
}

/// Insert the entries `rows` (encoded, one after another) of `device`'s
/// seqs from `first` on, as rows of at most [`RUN_MAX`] entries.
pub(crate) fn insert(
    table: &mut InboxTable<'_>,
    device: &DeviceId,
    first: u64,
    rows: &[u8],
) -> Result<(), StoreError> {
    let mut seq = first;
    for chunk in rows.chunks(RUN_MAX * INBOX_ROW_LEN) {
        run_len(chunk)?;
        table.insert(&inbox_key(device, seq), chunk)?;
        seq = seq.saturating_add((chunk.len() / INBOX_ROW_LEN) as u64);
    }
    Ok(())
}

/// The key of the row whose run may hold `device`'s `seq`: the last row at
/// or below it (the run holds it if it is long enough).
fn run_start<T>(table: &T, device: &DeviceId, seq: u64) -> Result<u64, StoreError>
where
    T: ReadableTable<&'static InboxKey, &'static [u8]>,
{
    let (lo, hi) = (inbox_key(device, 0), inbox_key(device, seq));
    match table.range::<&InboxKey>(&lo..=&hi)?.next_back() {
        Some(item) => Ok(split_inbox_key(item?.0.value()).1),
        None => Ok(seq),
    }
}

/// Visit `device`'s stored entries with seqs in `from..=to`, in seq order,
/// until `f` returns `false`.
pub(crate) fn visit<T>(
    table: &T,
    device: &DeviceId,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, InboxRow) -> Result<bool, StoreError>,
) -> Result<(), StoreError>
where
    T: ReadableTable<&'static InboxKey, &'static [u8]>,
{
    if from > to {
        return Ok(());
    }
    let start = run_start(table, device, from)?;
    let (lo, hi) = (inbox_key(device, start), inbox_key(device, to));
    for item in table.range::<&InboxKey>(&lo..=&hi)? {
        let (k, v) = item?;
        let first = split_inbox_key(k.value()).1;
        let bytes = v.value();
        let n = run_len(bytes)?;
        for i in from.saturating_sub(first)..n {
            let seq = first.saturating_add(i);
            if seq > to {
                return Ok(());
            }
            if !f(seq, entry(bytes, i)?)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The entry of `device`'s `seq`, if stored.
#[cfg(test)]
pub(crate) fn get<T>(table: &T, device: &DeviceId, seq: u64) -> Result<Option<InboxRow>, StoreError>
where
    T: ReadableTable<&'static InboxKey, &'static [u8]>,
{
    let mut found = None;
    visit(table, device, seq, seq, |_, row| {
        found = Some(row);
        Ok(false)
    })?;
    Ok(found)
}

/// Remove `device`'s entries with seq ≤ `up_to` (a prefix of its inbox),
/// handing each to `removed`; the rest of a run that `up_to` ends inside is
/// written back as a row of its own.
pub(crate) fn remove_through(
    table: &mut InboxTable<'_>,
    device: &DeviceId,
    up_to: u64,
    mut removed: impl FnMut(u64, &InboxRow),
) -> Result<(), StoreError> {
    let (lo, hi) = (inbox_key(device, 0), inbox_key(device, up_to));
    let mut rest: Option<Vec<u8>> = None;
    let mut damaged = false;
    // One pass that removes every row starting in the range (the predicate
    // keeps none); a value that does not decode fails the whole
    // transaction below.
    table.retain_in::<&InboxKey, _>(&lo..=&hi, |k, bytes| {
        let first = split_inbox_key(k).1;
        let Ok(n) = run_len(bytes) else {
            damaged = true;
            return false;
        };
        for i in 0..n {
            let seq = first.saturating_add(i);
            if seq > up_to {
                let at = (i as usize) * INBOX_ROW_LEN;
                rest = bytes.get(at..).map(<[u8]>::to_vec);
                break;
            }
            match entry(bytes, i) {
                Ok(row) => removed(seq, &row),
                Err(_) => damaged = true,
            }
        }
        false
    })?;
    if damaged {
        return Err(corrupt("inbox run"));
    }
    if let Some(rest) = rest {
        table.insert(&inbox_key(device, up_to.saturating_add(1)), rest.as_slice())?;
    }
    Ok(())
}

/// Entries of every run in `table` (for counts in checks and tests).
pub(crate) fn count_all<T>(table: &T) -> Result<u64, StoreError>
where
    T: ReadableTable<&'static InboxKey, &'static [u8]>,
{
    let mut n = 0u64;
    for item in table.range::<&InboxKey>(..)? {
        n = n.saturating_add(run_len(item?.1.value())?);
    }
    Ok(n)
}

/// Single entries changed in place (compaction moves records one by one):
/// each run is read once, changed in memory and written back once.
#[derive(Default)]
pub(crate) struct Edits {
    /// Run key → the run's value and whether it was changed.
    runs: BTreeMap<InboxKey, (Vec<u8>, bool)>,
}

impl Edits {
    /// The run holding `device`'s `seq` (loaded once) and the entry's
    /// index in it; `None` if the seq is not stored.
    fn locate(
        &mut self,
        table: &InboxTable<'_>,
        device: &DeviceId,
        seq: u64,
    ) -> Result<Option<(InboxKey, u64)>, StoreError> {
        let first = run_start(table, device, seq)?;
        let key = inbox_key(device, first);
        let (bytes, _) = match self.runs.entry(key) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let Some(v) = table.get(&key)? else {
                    return Ok(None);
                };
                let bytes = v.value().to_vec();
                e.insert((bytes, false))
            }
        };
        let i = seq.saturating_sub(first);
        Ok((i < run_len(bytes)?).then_some((key, i)))
    }

    /// The entry of `device`'s `seq`, as changed so far.
    pub(crate) fn get(
        &mut self,
        table: &InboxTable<'_>,
        device: &DeviceId,
        seq: u64,
    ) -> Result<Option<InboxRow>, StoreError> {
        match self.locate(table, device, seq)? {
            Some((key, i)) => {
                let (bytes, _) = self.runs.get(&key).ok_or_else(|| corrupt("inbox run"))?;
                Ok(Some(entry(bytes, i)?))
            }
            None => Ok(None),
        }
    }

    /// Replace the entry of `device`'s `seq` (which must be stored).
    pub(crate) fn set(
        &mut self,
        table: &InboxTable<'_>,
        device: &DeviceId,
        seq: u64,
        row: &[u8; INBOX_ROW_LEN],
    ) -> Result<(), StoreError> {
        let (key, i) = self
            .locate(table, device, seq)?
            .ok_or_else(|| corrupt("inbox run (entry gone)"))?;
        let (bytes, changed) = self
            .runs
            .get_mut(&key)
            .ok_or_else(|| corrupt("inbox run"))?;
        let at = (i as usize) * INBOX_ROW_LEN;
        bytes
            .get_mut(at..at + INBOX_ROW_LEN)
            .ok_or_else(|| corrupt("inbox run"))?
            .copy_from_slice(row);
        *changed = true;
        Ok(())
    }

    /// Write the changed runs back.
    pub(crate) fn write(self, table: &mut InboxTable<'_>) -> Result<(), StoreError> {
        for (key, (bytes, changed)) in &self.runs {
            if *changed {
                table.insert(key, bytes.as_slice())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::segments::BodyRef;
    use crate::store::tables::{INBOX, InboxRowHeader, encode_inbox_row};
    use hush_protocol::ConversationId;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata};

    fn row(seq: u64) -> InboxRow {
        InboxRow {
            header: InboxRowHeader {
                expires_at_ms: 1_000 + seq,
                sender: DeviceId([9; 16]),
                conversation: ConversationId([3; 16]),
                sender_seq: seq,
            },
            body: BodyRef {
                segment: 1,
                offset: 16 + 100 * seq,
                len: 50,
            },
        }
    }

    fn encoded(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        seqs.flat_map(|s| encode_inbox_row(&row(s))).collect()
    }

    fn with_table(f: impl FnOnce(&mut InboxTable<'_>)) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(INBOX).unwrap();
            f(&mut t);
        }
        txn.commit().unwrap();
        let _ = db.begin_read().unwrap();
    }

    fn all(t: &InboxTable<'_>, d: &DeviceId) -> Vec<(u64, InboxRow)> {
        let mut out = Vec::new();
        visit(t, d, 0, u64::MAX, |seq, r| {
            out.push((seq, r));
            Ok(true)
        })
        .unwrap();
        out
    }

    /// Long runs are cut at `RUN_MAX`; every seq reads back its own entry,
    /// from any starting point, and other inboxes are not touched.
    #[test]
    fn runs_split_at_their_cap_and_read_back_by_seq() {
        with_table(|t| {
            let (d, other) = (DeviceId([1; 16]), DeviceId([2; 16]));
            insert(t, &d, 5, &encoded(5..=204)).unwrap();
            insert(t, &other, 1, &encoded(1..=3)).unwrap();
            assert_eq!(t.len().unwrap(), 4 + 1);
            assert_eq!(count_all(t).unwrap(), 203);
            let got = all(t, &d);
            assert_eq!(got.len(), 200);
            assert!(got.iter().all(|(s, r)| *r == row(*s)));
            assert_eq!(get(t, &d, 4).unwrap(), None);
            assert_eq!(get(t, &d, 69).unwrap(), Some(row(69)));
            assert_eq!(get(t, &d, 204).unwrap(), Some(row(204)));
            assert_eq!(get(t, &d, 205).unwrap(), None);
            let mut from = Vec::new();
            visit(t, &d, 100, 130, |s, _| {
                from.push(s);
                Ok(s < 110)
            })
            .unwrap();
            assert_eq!(from, (100..=110).collect::<Vec<_>>());
        });
    }

    /// Removing a prefix that ends inside a run keeps its rest, keyed at
    /// its new first seq; removing everything leaves no row.
    #[test]
    fn a_prefix_ending_inside_a_run_keeps_the_rest_of_it() {
        with_table(|t| {
            let d = DeviceId([1; 16]);
            insert(t, &d, 1, &encoded(1..=10)).unwrap();
            insert(t, &d, 11, &encoded(11..=20)).unwrap();
            let mut removed = Vec::new();
            remove_through(t, &d, 13, |s, r| {
                assert_eq!(*r, row(s));
                removed.push(s);
            })
            .unwrap();
            assert_eq!(removed, (1..=13).collect::<Vec<_>>());
            let left: Vec<u64> = all(t, &d).into_iter().map(|(s, _)| s).collect();
            assert_eq!(left, (14..=20).collect::<Vec<_>>());
            assert!(t.get(&inbox_key(&d, 14)).unwrap().is_some());
            remove_through(t, &d, 20, |_, _| {}).unwrap();
            assert_eq!(t.len().unwrap(), 0);
        });
    }

    /// Edits change single entries of a run and write each run once.
    #[test]
    fn edits_change_single_entries() {
        with_table(|t| {
            let d = DeviceId([1; 16]);
            insert(t, &d, 1, &encoded(1..=10)).unwrap();
            let mut edits = Edits::default();
            let mut moved = row(4);
            moved.body.segment = 2;
            edits.set(t, &d, 4, &encode_inbox_row(&moved)).unwrap();
            assert_eq!(edits.get(t, &d, 4).unwrap(), Some(moved));
            assert_eq!(edits.get(t, &d, 11).unwrap(), None);
            assert!(edits.set(t, &d, 11, &encode_inbox_row(&moved)).is_err());
            edits.write(t).unwrap();
            assert_eq!(get(t, &d, 4).unwrap(), Some(moved));
            assert_eq!(get(t, &d, 5).unwrap(), Some(row(5)));
        });
    }

    /// A value that is not a whole number of entries is an error for every
    /// reader and for removal, not a panic.
    #[test]
    fn damaged_runs_are_errors() {
        with_table(|t| {
            let d = DeviceId([1; 16]);
            t.insert(&inbox_key(&d, 1), [0u8; 65].as_slice()).unwrap();
            assert!(get(t, &d, 1).is_err());
            assert!(count_all(t).is_err());
            assert!(remove_through(t, &d, 1, |_, _| {}).is_err());
            t.insert(&inbox_key(&d, 1), [].as_slice()).unwrap();
            assert!(get(t, &d, 1).is_err());
            assert!(run_len(&[]).is_err());
        });
    }
}
