//! The redb tables and the byte layouts of their values.
//!
//! Values are written by hand at fixed offsets with big-endian integers (no
//! serializer), so `docs/STORAGE.md` can specify them byte for byte and a
//! future version can read them without this code. Every decoder checks the
//! exact length before reading and reports a mismatch as
//! [`StoreError::Backend`] ("corrupt …"): bytes read from disk never cause a
//! panic.

use super::keys::{DedupExpiryKey, DedupKey, InboxKey, OtkKey, QueueKey, split_dedup_expiry_key};
use super::segments::BodyRef;
use super::tombstones::Tombstone;
use super::{DeviceRecord, InboxState, StoreError};
use hush_protocol::{
    ConversationId, DeviceEntry, DeviceId, DeviceList, DeviceRegistration, SignedDeviceList,
    SignedPrekey, UserKey,
};
use redb::TableDefinition;

/// `device ‖ first seq` → a run of n ≥ 1 [`InboxRow`]s (n × 64 bytes: header
/// fields and where each envelope's record lies in the segment files), for
/// the seqs `first..first + n` (format 7; see the private `runs` module).
pub(crate) const INBOX: TableDefinition<&InboxKey, &[u8]> = TableDefinition::new("inbox");
/// `segment id` → [`SegmentInfo`] (24 bytes): one row per segment file that
/// may hold live envelopes; the highest id is the active (appended) one.
pub(crate) const SEGMENTS: TableDefinition<&SegmentKey, &[u8]> = TableDefinition::new("segments");
/// `message id ‖ sender ‖ recipient` → [`DedupEntry`] (16 bytes).
pub(crate) const DEDUP: TableDefinition<&DedupKey, &[u8]> = TableDefinition::new("dedup");
/// `expires_at ‖ message id ‖ sender ‖ recipient` of its first entry → a
/// [`DedupBatch`] (n × 56 bytes): the dedup entries one commit created,
/// oldest first, so purge finds them without a per-envelope index.
pub(crate) const DEDUP_BATCHES: TableDefinition<&DedupExpiryKey, &[u8]> =
    TableDefinition::new("dedup_batches");
/// `sender ‖ recipient ‖ first message id` → n × (message id ‖ seq ‖
/// expires_at) (32·n bytes, ids ascending): the dedup entries of one pair in
/// one commit (format 7; see the private `dedup_runs` module). Format 6's
/// [`DEDUP`] and [`DEDUP_BATCHES`] are still read and purged, never written.
pub(crate) const DEDUP_RUNS: TableDefinition<&[u8; 48], &[u8]> = TableDefinition::new("dedup_runs");
/// `earliest expires_at ‖ dedup run key` → `()`: each [`DEDUP_RUNS`] row at
/// the expiry of its earliest entry, for the purge.
pub(crate) const DEDUP_RUN_QUEUE: TableDefinition<&DedupExpiryKey, ()> =
    TableDefinition::new("dedup_run_queue");
/// `device` → [`InboxState`] (32 bytes).
pub(crate) const INBOX_META: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("inbox_meta");
/// `device` → [`DeviceRecord`] (168 bytes).
pub(crate) const DEVICES: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("devices");
/// `device` → [`SignedPrekey`] (100 bytes).
pub(crate) const SIGNED_PREKEYS: TableDefinition<&[u8; 16], &[u8]> =
    TableDefinition::new("signed_prekeys");
/// `device ‖ id` → one-time prekey public key (32 bytes).
pub(crate) const ONE_TIME_PREKEYS: TableDefinition<&OtkKey, &[u8]> =
    TableDefinition::new("one_time_prekeys");
/// `user` → [`SignedDeviceList`] (76 + 144·n bytes).
pub(crate) const DEVICE_LISTS: TableDefinition<&[u8; 32], &[u8]> =
    TableDefinition::new("device_lists");
/// `expires_at ‖ device` → `()`: one entry per non-empty inbox, at the expiry
/// of its oldest stored envelope.
pub(crate) const PURGE_QUEUE: TableDefinition<&QueueKey, ()> = TableDefinition::new("purge_queue");
/// `device ‖ seq` → [`Tombstone`] (40 bytes).
pub(crate) const TOMBSTONES: TableDefinition<&InboxKey, &[u8]> = TableDefinition::new("tombstones");
/// `user ‖ device` → `()`: the devices of each user, so registration can
/// count a user's devices with a bounded range scan (format 4).
pub(crate) const USER_DEVICES: TableDefinition<&UserDeviceKey, ()> =
    TableDefinition::new("user_devices");
/// `blob` → blob meta (48 bytes: owner 16 ‖ total_len u64 ‖ committed u64
/// ‖ created_at u64 ‖ expires_at u64, all big-endian).
pub(crate) const BLOBS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("blobs");
/// `blob ‖ offset` (u64 BE) → the blob's bytes from `offset`, one row per
/// appended piece (at most `MAX_BLOB_CHUNK` bytes).
pub(crate) const BLOB_CHUNKS: TableDefinition<&[u8; 24], &[u8]> =
    TableDefinition::new("blob_chunks");
/// `owner ‖ blob` → `()`: each device's blobs, to count them at creation.
pub(crate) const BLOB_OWNERS: TableDefinition<&[u8; 32], ()> = TableDefinition::new("blob_owners");
/// `expires_at` (u64 BE) `‖ blob` → `()`: blobs by expiry, for the purge.
pub(crate) const BLOB_EXPIRY: TableDefinition<&[u8; 24], ()> = TableDefinition::new("blob_expiry");

/// `device` → last-seen time (ms, relay clock) of every registered device,
/// written at registration and then at most once per
/// `LAST_SEEN_GRANULARITY_MS` by authentication (format 5).
pub(crate) const DEVICE_SEEN: TableDefinition<&[u8; 16], u64> = TableDefinition::new("device_seen");
/// `device` → when it was removed (ms): removed device ids, refused at
/// registration for good (format 5).
pub(crate) const REMOVED_DEVICES: TableDefinition<&[u8; 16], u64> =
    TableDefinition::new("removed_devices");

/// Name → value: the file format version (`"format"` → u32 BE).
pub(crate) const INFO: TableDefinition<&str, &[u8]> = TableDefinition::new("info");

/// Key of the format version in [`INFO`].
pub(crate) const FORMAT_KEY: &str = "format";
/// The layout described in `docs/STORAGE.md`.
pub(crate) const FORMAT_VERSION: u32 = 7;
/// Format 6, upgraded in place on open: one [`INBOX`] row per envelope. Such
/// a row is a run of one in format 7, so there is nothing to convert; once
/// format 7 has written runs, a relay that reads only format 6 must not open
/// the store (it would read a run as a damaged row), so the version is
/// raised.
pub(crate) const FORMAT_VERSION_SINGLE_ROWS: u32 = 6;
/// The previous format, upgraded in place on open: the same tables, but
/// every envelope commit was durable in redb and segments hold no batch
/// trailers. Nothing to convert; once format 6 has written, a relay that
/// reads only format 5 must not open the store (it would cut off batches
/// that only the log holds), so the version is raised.
pub(crate) const FORMAT_VERSION_PREVIOUS: u32 = 5;
/// Format 4, upgraded in place on open: format 5 without [`DEVICE_SEEN`]
/// (filled from [`DEVICES`]' registration times) and [`REMOVED_DEVICES`]
/// (empty).
pub(crate) const FORMAT_VERSION_OLDER: u32 = 4;
/// The format before that, upgraded in place on open too: format 4 without
/// [`USER_DEVICES`], which the upgrade fills from [`DEVICES`].
pub(crate) const FORMAT_VERSION_UPGRADABLE: u32 = 3;

/// Key of the [`USER_DEVICES`] table: `user 32 ‖ device 16`.
pub(crate) type UserDeviceKey = [u8; 48];

/// The [`USER_DEVICES`] key of `device` of `user`.
pub(crate) fn user_device_key(user: &UserKey, device: &DeviceId) -> UserDeviceKey {
    let mut k = [0u8; 48];
    k[..32].copy_from_slice(user.as_bytes());
    k[32..].copy_from_slice(device.as_bytes());
    k
}

/// Key of the [`SEGMENTS`] table: the segment id, big-endian.
pub(crate) type SegmentKey = [u8; 4];

/// A bounds-checked reader over a value read from disk.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Start reading a value that must be exactly `len` bytes long (or at
    /// least `len` when `exact` is false).
    fn new(
        bytes: &'a [u8],
        len: usize,
        exact: bool,
        what: &'static str,
    ) -> Result<Self, StoreError> {
        if bytes.len() < len || (exact && bytes.len() != len) {
            return Err(corrupt(what));
        }
        Ok(Reader {
            bytes,
            pos: 0,
            what,
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let end = self.pos + N;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or_else(|| corrupt(self.what))?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        self.pos = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn rest(self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }
}

/// The error for a value whose bytes do not match its layout.
pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("corrupt {what}"))
}

/// Bytes of an inbox row: the header fields, then the body's location.
pub(crate) const INBOX_ROW_LEN: usize = 64;

/// The plaintext header fields kept with each stored envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InboxRowHeader {
    /// When the envelope is purged if still unacknowledged.
    pub expires_at_ms: u64,
    /// Sending device (for the tombstone).
    pub sender: DeviceId,
    /// Conversation (for the tombstone).
    pub conversation: ConversationId,
    /// Sender seq (for the tombstone).
    pub sender_seq: u64,
}

impl InboxRowHeader {
    /// The tombstone left behind when this envelope expires unread.
    pub(crate) fn tombstone(&self) -> Tombstone {
        Tombstone {
            sender: self.sender,
            conversation: self.conversation,
            sender_seq: self.sender_seq,
        }
    }
}

/// One `inbox` row: what purge needs without touching the body, and where
/// the body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InboxRow {
    /// Header fields.
    pub header: InboxRowHeader,
    /// The envelope's record in a segment file.
    pub body: BodyRef,
}

/// `expires_at u64 ‖ sender 16 ‖ conversation 16 ‖ sender_seq u64 ‖
/// segment u32 ‖ offset u64 ‖ len u32`.
pub(crate) fn encode_inbox_row(row: &InboxRow) -> [u8; INBOX_ROW_LEN] {
    let mut v = [0u8; INBOX_ROW_LEN];
    v[..8].copy_from_slice(&row.header.expires_at_ms.to_be_bytes());
    v[8..24].copy_from_slice(row.header.sender.as_bytes());
    v[24..40].copy_from_slice(row.header.conversation.as_bytes());
    v[40..48].copy_from_slice(&row.header.sender_seq.to_be_bytes());
    v[48..52].copy_from_slice(&row.body.segment.to_be_bytes());
    v[52..60].copy_from_slice(&row.body.offset.to_be_bytes());
    v[60..].copy_from_slice(&row.body.len.to_be_bytes());
    v
}

/// Inverse of [`encode_inbox_row`].
pub(crate) fn decode_inbox_row(bytes: &[u8]) -> Result<InboxRow, StoreError> {
    let mut r = Reader::new(bytes, INBOX_ROW_LEN, true, "inbox row")?;
    Ok(InboxRow {
        header: InboxRowHeader {
            expires_at_ms: r.u64()?,
            sender: DeviceId(r.array()?),
            conversation: ConversationId(r.array()?),
            sender_seq: r.u64()?,
        },
        body: BodyRef {
            segment: r.u32()?,
            offset: r.u64()?,
            len: r.u32()?,
        },
    })
}

/// A segment's row: how much of it is still referenced, and how far it is
/// committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SegmentInfo {
    /// `inbox` rows pointing into this segment.
    pub live: u64,
    /// Record bytes (header + envelope) of those rows.
    pub live_bytes: u64,
    /// Length of the committed part of the file; anything after it was
    /// never acknowledged and is cut off on open.
    pub end: u64,
}

/// `live u64 ‖ live_bytes u64 ‖ end u64`.
pub(crate) fn encode_segment(info: &SegmentInfo) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&info.live.to_be_bytes());
    v[8..16].copy_from_slice(&info.live_bytes.to_be_bytes());
    v[16..].copy_from_slice(&info.end.to_be_bytes());
    v
}

/// Inverse of [`encode_segment`].
pub(crate) fn decode_segment(bytes: &[u8]) -> Result<SegmentInfo, StoreError> {
    let mut r = Reader::new(bytes, 24, true, "segment row")?;
    Ok(SegmentInfo {
        live: r.u64()?,
        live_bytes: r.u64()?,
        end: r.u64()?,
    })
}

/// A dedup entry: the seq the message got and when the entry expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DedupEntry {
    /// Relay seq in the recipient's inbox.
    pub seq: u64,
    /// When the entry is dropped (the envelope's expiry).
    pub expires_at_ms: u64,
}

/// `seq u64 ‖ expires_at u64` (format 6 wrote these; tests build them).
#[cfg(test)]
pub(crate) fn encode_dedup(entry: &DedupEntry) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&entry.seq.to_be_bytes());
    v[8..].copy_from_slice(&entry.expires_at_ms.to_be_bytes());
    v
}

/// Inverse of [`encode_dedup`].
pub(crate) fn decode_dedup(bytes: &[u8]) -> Result<DedupEntry, StoreError> {
    let mut r = Reader::new(bytes, 16, true, "dedup entry")?;
    Ok(DedupEntry {
        seq: r.u64()?,
        expires_at_ms: r.u64()?,
    })
}

/// Bytes of one entry of a dedup batch list.
const DEDUP_BATCH_ENTRY_LEN: usize = 56;

/// One dedup batch list: `(expires_at, dedup key)` pairs in ascending order.
pub(crate) type DedupBatch = Vec<(u64, DedupKey)>;

/// `n × (expires_at u64 ‖ dedup key 48)`, in the given (ascending) order.
pub(crate) fn encode_dedup_batch(entries: &[(u64, DedupKey)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * DEDUP_BATCH_ENTRY_LEN);
    for (expires_at_ms, key) in entries {
        v.extend_from_slice(&expires_at_ms.to_be_bytes());
        v.extend_from_slice(key);
    }
    v
}

/// Inverse of [`encode_dedup_batch`]; a list is never empty.
pub(crate) fn decode_dedup_batch(bytes: &[u8]) -> Result<DedupBatch, StoreError> {
    const WHAT: &str = "dedup batch";
    if bytes.is_empty() || !bytes.len().is_multiple_of(DEDUP_BATCH_ENTRY_LEN) {
        return Err(corrupt(WHAT));
    }
    let mut r = Reader::new(bytes, bytes.len(), true, WHAT)?;
    let mut out = Vec::with_capacity(bytes.len() / DEDUP_BATCH_ENTRY_LEN);
    for _ in 0..bytes.len() / DEDUP_BATCH_ENTRY_LEN {
        let k: DedupExpiryKey = r.array()?;
        out.push(split_dedup_expiry_key(&k));
    }
    Ok(out)
}

/// `head u64 ‖ acked u64 ‖ depth u64 ‖ bytes u64`.
pub(crate) fn encode_state(state: &InboxState) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&state.head.to_be_bytes());
    v[8..16].copy_from_slice(&state.acked.to_be_bytes());
    v[16..24].copy_from_slice(&state.depth.to_be_bytes());
    v[24..].copy_from_slice(&state.bytes.to_be_bytes());
    v
}

/// Inverse of [`encode_state`].
pub(crate) fn decode_state(bytes: &[u8]) -> Result<InboxState, StoreError> {
    let mut r = Reader::new(bytes, 32, true, "inbox meta")?;
    Ok(InboxState {
        head: r.u64()?,
        acked: r.u64()?,
        depth: r.u64()?,
        bytes: r.u64()?,
    })
}

/// Length of an encoded [`DeviceRecord`].
const DEVICE_LEN: usize = 168;

/// `user 32 ‖ signing_key 32 ‖ agreement_key 32 ‖ user_signature 64 ‖
/// registered_at u64` (the device id is the key).
pub(crate) fn encode_device(record: &DeviceRecord) -> Vec<u8> {
    let reg = &record.registration;
    let mut v = Vec::with_capacity(DEVICE_LEN);
    v.extend_from_slice(reg.user.as_bytes());
    v.extend_from_slice(&reg.signing_key);
    v.extend_from_slice(&reg.agreement_key);
    v.extend_from_slice(&reg.user_signature);
    v.extend_from_slice(&record.registered_at_ms.to_be_bytes());
    v
}

/// Inverse of [`encode_device`].
pub(crate) fn decode_device(device: DeviceId, bytes: &[u8]) -> Result<DeviceRecord, StoreError> {
    let mut r = Reader::new(bytes, DEVICE_LEN, true, "device record")?;
    Ok(DeviceRecord {
        registration: DeviceRegistration {
            device,
            user: UserKey(r.array()?),
            signing_key: r.array()?,
            agreement_key: r.array()?,
            user_signature: r.array()?,
        },
        registered_at_ms: r.u64()?,
    })
}

/// `id u32 ‖ public 32 ‖ signature 64`.
pub(crate) fn encode_signed_prekey(spk: &SignedPrekey) -> [u8; 100] {
    let mut v = [0u8; 100];
    v[..4].copy_from_slice(&spk.id.to_be_bytes());
    v[4..36].copy_from_slice(&spk.public);
    v[36..].copy_from_slice(&spk.signature);
    v
}

/// Inverse of [`encode_signed_prekey`].
pub(crate) fn decode_signed_prekey(bytes: &[u8]) -> Result<SignedPrekey, StoreError> {
    let mut r = Reader::new(bytes, 100, true, "signed prekey")?;
    Ok(SignedPrekey {
        id: r.u32()?,
        public: r.array()?,
        signature: r.array()?,
    })
}

/// A one-time prekey's value is its 32-byte public key.
pub(crate) fn decode_otk_public(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    Reader::new(bytes, 32, true, "one-time prekey")?.array()
}

/// Bytes of one [`DeviceEntry`] in an encoded device list.
const DEVICE_ENTRY_LEN: usize = 144;
/// Bytes of an encoded device list before its entries.
const DEVICE_LIST_HEADER_LEN: usize = 76;

/// `version u64 ‖ signature 64 ‖ count u32 ‖ count × (device 16 ‖
/// signing_key 32 ‖ agreement_key 32 ‖ membership_signature 64)` (the user
/// is the key).
pub(crate) fn encode_device_list(list: &SignedDeviceList) -> Result<Vec<u8>, StoreError> {
    let devices = &list.list.devices;
    let count = u32::try_from(devices.len())
        .map_err(|_| StoreError::Backend("device list too long to store".into()))?;
    let mut v = Vec::with_capacity(DEVICE_LIST_HEADER_LEN + devices.len() * DEVICE_ENTRY_LEN);
    v.extend_from_slice(&list.list.version.to_be_bytes());
    v.extend_from_slice(&list.signature);
    v.extend_from_slice(&count.to_be_bytes());
    for d in devices {
        v.extend_from_slice(d.device.as_bytes());
        v.extend_from_slice(&d.signing_key);
        v.extend_from_slice(&d.agreement_key);
        v.extend_from_slice(&d.membership_signature);
    }
    Ok(v)
}

/// Inverse of [`encode_device_list`].
pub(crate) fn decode_device_list(
    user: UserKey,
    bytes: &[u8],
) -> Result<SignedDeviceList, StoreError> {
    const WHAT: &str = "device list";
    let mut r = Reader::new(bytes, DEVICE_LIST_HEADER_LEN, false, WHAT)?;
    let version = r.u64()?;
    let signature = r.array()?;
    let count = usize::try_from(r.u32()?).map_err(|_| corrupt(WHAT))?;
    let body = r.rest();
    if count.checked_mul(DEVICE_ENTRY_LEN) != Some(body.len()) {
        return Err(corrupt(WHAT));
    }
    let mut r = Reader::new(body, body.len(), true, WHAT)?;
    let mut devices = Vec::with_capacity(count);
    for _ in 0..count {
        devices.push(DeviceEntry {
            device: DeviceId(r.array()?),
            signing_key: r.array()?,
            agreement_key: r.array()?,
            membership_signature: r.array()?,
        });
    }
    Ok(SignedDeviceList {
        list: DeviceList {
            user,
            version,
            devices,
        },
        signature,
    })
}

/// `sender 16 ‖ conversation 16 ‖ sender_seq u64`.
pub(crate) fn encode_tombstone(t: &Tombstone) -> [u8; 40] {
    let mut v = [0u8; 40];
    v[..16].copy_from_slice(t.sender.as_bytes());
    v[16..32].copy_from_slice(t.conversation.as_bytes());
    v[32..].copy_from_slice(&t.sender_seq.to_be_bytes());
    v
}

/// Inverse of [`encode_tombstone`].
pub(crate) fn decode_tombstone(bytes: &[u8]) -> Result<Tombstone, StoreError> {
    let mut r = Reader::new(bytes, 40, true, "tombstone")?;
    Ok(Tombstone {
        sender: DeviceId(r.array()?),
        conversation: ConversationId(r.array()?),
        sender_seq: r.u64()?,
    })
}

/// The format version value stored under [`FORMAT_KEY`].
pub(crate) fn decode_format(bytes: &[u8]) -> Result<u32, StoreError> {
    Reader::new(bytes, 4, true, "format version")?.u32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn is_corrupt<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Backend(m)) if m.starts_with("corrupt"))
    }

    fn sample_list(n: usize) -> SignedDeviceList {
        SignedDeviceList {
            list: DeviceList {
                user: UserKey([9; 32]),
                version: 7,
                devices: (0..n)
                    .map(|i| DeviceEntry {
                        device: DeviceId([i as u8; 16]),
                        signing_key: [i as u8 + 1; 32],
                        agreement_key: [i as u8 + 2; 32],
                        membership_signature: [i as u8 + 3; 64],
                    })
                    .collect(),
            },
            signature: [3; 64],
        }
    }

    #[test]
    fn values_round_trip() {
        let row = InboxRow {
            header: InboxRowHeader {
                expires_at_ms: 5,
                sender: DeviceId([1; 16]),
                conversation: ConversationId([2; 16]),
                sender_seq: 77,
            },
            body: BodyRef {
                segment: 3,
                offset: 1 << 40,
                len: 1024,
            },
        };
        assert_eq!(decode_inbox_row(&encode_inbox_row(&row)).unwrap(), row);

        let info = SegmentInfo {
            live: 1,
            live_bytes: 2,
            end: 3,
        };
        assert_eq!(decode_segment(&encode_segment(&info)).unwrap(), info);

        let d = DedupEntry {
            seq: 3,
            expires_at_ms: 9,
        };
        assert_eq!(decode_dedup(&encode_dedup(&d)).unwrap(), d);

        let s = InboxState {
            head: 1,
            acked: 2,
            depth: 3,
            bytes: 4,
        };
        assert_eq!(decode_state(&encode_state(&s)).unwrap(), s);

        let rec = DeviceRecord {
            registration: DeviceRegistration {
                device: DeviceId([4; 16]),
                user: UserKey([5; 32]),
                signing_key: [6; 32],
                agreement_key: [7; 32],
                user_signature: [8; 64],
            },
            registered_at_ms: 1234,
        };
        let enc = encode_device(&rec);
        assert_eq!(enc.len(), DEVICE_LEN);
        assert_eq!(decode_device(DeviceId([4; 16]), &enc).unwrap(), rec);

        let spk = SignedPrekey {
            id: 11,
            public: [1; 32],
            signature: [2; 64],
        };
        assert_eq!(
            decode_signed_prekey(&encode_signed_prekey(&spk)).unwrap(),
            spk
        );

        for n in [0, 1, 16] {
            let list = sample_list(n);
            let enc = encode_device_list(&list).unwrap();
            assert_eq!(enc.len(), DEVICE_LIST_HEADER_LEN + n * DEVICE_ENTRY_LEN);
            assert_eq!(decode_device_list(UserKey([9; 32]), &enc).unwrap(), list);
        }

        let t = Tombstone {
            sender: DeviceId([1; 16]),
            conversation: ConversationId([2; 16]),
            sender_seq: u64::MAX,
        };
        assert_eq!(decode_tombstone(&encode_tombstone(&t)).unwrap(), t);

        let list = vec![(3, [1u8; 48]), (3, [2u8; 48]), (9, [0u8; 48])];
        let enc = encode_dedup_batch(&list);
        assert_eq!(enc.len(), 3 * 56);
        assert_eq!(decode_dedup_batch(&enc).unwrap(), list);
    }

    #[test]
    fn layouts_match_the_spec() {
        // §2.3 example: head 10, acked 3, depth 7, bytes 112.
        let s = InboxState {
            head: 10,
            acked: 3,
            depth: 7,
            bytes: 112,
        };
        let mut expect = Vec::new();
        for n in [10u64, 3, 7, 0x70] {
            expect.extend_from_slice(&n.to_be_bytes());
        }
        assert_eq!(encode_state(&s).to_vec(), expect);
        // §2.4 inbox row offsets.
        let row = encode_inbox_row(&InboxRow {
            header: InboxRowHeader {
                expires_at_ms: 0x0102_0304_0506_0708,
                sender: DeviceId([0x11; 16]),
                conversation: ConversationId([0x22; 16]),
                sender_seq: 5,
            },
            body: BodyRef {
                segment: 2,
                offset: 0x1000,
                len: 1024,
            },
        });
        assert_eq!(&row[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&row[8..24], &[0x11; 16]);
        assert_eq!(&row[24..40], &[0x22; 16]);
        assert_eq!(&row[40..48], &5u64.to_be_bytes());
        assert_eq!(&row[48..52], &2u32.to_be_bytes());
        assert_eq!(&row[52..60], &0x1000u64.to_be_bytes());
        assert_eq!(&row[60..], &1024u32.to_be_bytes());
        // §2.12 segment row.
        let v = encode_segment(&SegmentInfo {
            live: 7,
            live_bytes: 8,
            end: 9,
        });
        assert_eq!(&v[..8], &7u64.to_be_bytes());
        assert_eq!(&v[8..16], &8u64.to_be_bytes());
        assert_eq!(&v[16..], &9u64.to_be_bytes());
        // §2.2 device record offsets.
        let rec = DeviceRecord {
            registration: DeviceRegistration {
                device: DeviceId([0; 16]),
                user: UserKey([1; 32]),
                signing_key: [2; 32],
                agreement_key: [3; 32],
                user_signature: [4; 64],
            },
            registered_at_ms: 9,
        };
        let v = encode_device(&rec);
        assert_eq!((v[0], v[32], v[64], v[96], v[159]), (1, 2, 3, 4, 4));
        assert_eq!(&v[160..], &9u64.to_be_bytes());
        // §2.7 dedup value and §2.9 signed prekey.
        let d = encode_dedup(&DedupEntry {
            seq: 1,
            expires_at_ms: 2,
        });
        assert_eq!(
            (&d[..8], &d[8..]),
            (&1u64.to_be_bytes()[..], &2u64.to_be_bytes()[..])
        );
        let spk = encode_signed_prekey(&SignedPrekey {
            id: 0x0102_0304,
            public: [5; 32],
            signature: [6; 64],
        });
        assert_eq!(
            (&spk[..4], spk[4], spk[35], spk[36]),
            (&[1u8, 2, 3, 4][..], 5, 5, 6)
        );
        // §2.11 device list offsets.
        let v = encode_device_list(&sample_list(2)).unwrap();
        assert_eq!(&v[..8], &7u64.to_be_bytes());
        assert_eq!(&v[8..72], &[3; 64]);
        assert_eq!(&v[72..76], &2u32.to_be_bytes());
        assert_eq!(v.len(), 76 + 2 * 144);
        assert_eq!(
            (v[76 + 144], v[92 + 144], v[124 + 144], v[156 + 144]),
            (1, 2, 3, 4)
        );
        // §2.8 dedup batch: expires_at ‖ dedup key, repeated.
        let b = encode_dedup_batch(&[(5, [7u8; 48]), (6, [8u8; 48])]);
        assert_eq!(&b[..8], &5u64.to_be_bytes());
        assert_eq!(&b[8..56], &[7u8; 48]);
        assert_eq!(&b[56..64], &6u64.to_be_bytes());
        assert_eq!(&b[64..], &[8u8; 48]);
        // §2.6 tombstone.
        let t = encode_tombstone(&Tombstone {
            sender: DeviceId([7; 16]),
            conversation: ConversationId([8; 16]),
            sender_seq: 3,
        });
        assert_eq!((t[0], t[16], &t[32..]), (7, 8, &3u64.to_be_bytes()[..]));
    }

    #[test]
    fn wrong_lengths_are_corrupt_not_panics() {
        assert!(is_corrupt(decode_inbox_row(&[0; 63])));
        assert!(is_corrupt(decode_inbox_row(&[0; 65])));
        assert!(is_corrupt(decode_segment(&[0; 23])));
        assert!(is_corrupt(decode_dedup(&[0; 15])));
        assert!(is_corrupt(decode_dedup(&[0; 17])));
        assert!(is_corrupt(decode_state(&[0; 31])));
        assert!(is_corrupt(decode_device(DeviceId([0; 16]), &[0; 169])));
        assert!(is_corrupt(decode_signed_prekey(&[0; 99])));
        assert!(is_corrupt(decode_otk_public(&[0; 33])));
        assert!(is_corrupt(decode_tombstone(&[])));
        assert!(is_corrupt(decode_dedup_batch(&[])));
        assert!(is_corrupt(decode_dedup_batch(&[0; 57])));
        assert!(is_corrupt(decode_format(&[0; 3])));
        // A device list whose count disagrees with its length.
        let mut enc = encode_device_list(&sample_list(2)).unwrap();
        enc[75] = 3;
        assert!(is_corrupt(decode_device_list(UserKey([0; 32]), &enc)));
        enc[72..76].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(is_corrupt(decode_device_list(UserKey([0; 32]), &enc)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_inbox_row(&bytes);
            let _ = decode_segment(&bytes);
            let _ = decode_dedup(&bytes);
            let _ = decode_state(&bytes);
            let _ = decode_device(DeviceId([0; 16]), &bytes);
            let _ = decode_signed_prekey(&bytes);
            let _ = decode_otk_public(&bytes);
            let _ = decode_device_list(UserKey([0; 32]), &bytes);
            let _ = decode_tombstone(&bytes);
            let _ = decode_format(&bytes);
            let _ = decode_dedup_batch(&bytes);
        }
    }
}
