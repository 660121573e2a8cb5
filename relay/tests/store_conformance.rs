//! The storage conformance suite: every case runs against [`MemoryStore`],
//! [`RedbStore`] and [`PgStore`], so the simulator's store and the real ones
//! cannot drift apart. The PostgreSQL cases share one throwaway server
//! started once for this test binary, with a fresh database per case.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::limits::MAX_DROPPED_RANGES;
use hush_protocol::{
    BlobId, ConversationId, DeviceEntry, DeviceId, DeviceList, DeviceRegistration, DroppedRange,
    MessageId, OneTimePrekey, SignedDeviceList, SignedPrekey, UserKey,
};
use hush_relay::store::memory::MemoryStore;
use hush_relay::store::postgres::{PgOptions, PgStore};
use hush_relay::store::redb_store::RedbStore;
use hush_relay::store::{
    BlobLimits, BlobMeta, BlobWrite, CommitOutcome, InboxState, NewEnvelope, PurgeStats, Refusal,
    Store, StoreError, StoreLimits, blob_cost, stored_cost,
};
use hush_tests::pg::PgCluster;
use std::collections::BTreeSet;
use std::ops::Deref;
use std::sync::OnceLock;

/// A store under test, with whatever must outlive it (the redb file's dir).
struct Made<S> {
    store: S,
    _dir: Option<tempfile::TempDir>,
}

impl<S> Deref for Made<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.store
    }
}

fn make_memory(limits: StoreLimits) -> Made<MemoryStore> {
    Made {
        store: MemoryStore::new(limits),
        _dir: None,
    }
}

fn make_redb(limits: StoreLimits) -> Made<RedbStore> {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("relay.redb"), limits).unwrap();
    Made {
        store,
        _dir: Some(dir),
    }
}

/// The PostgreSQL server of this test binary, started on first use. It is
/// stopped by its reaper when the binary exits (statics are never dropped).
fn pg_cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        PgCluster::primary_only().expect("start PostgreSQL (is the postgresql package installed?)")
    })
}

fn make_pg(limits: StoreLimits) -> Made<PgStore> {
    let cluster = pg_cluster();
    let db = cluster.create_database().unwrap();
    // Semantics, not replication, are under test here: one server.
    let options = PgOptions {
        allow_unreplicated: true,
        ..PgOptions::default()
    };
    let store = PgStore::open(&cluster.primary_url(&db), limits, options).unwrap();
    Made { store, _dir: None }
}

/// Generates one `#[test]` per case and per store.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $( #[test] fn $case() { super::$case(&super::make_memory); } )*
        }
        mod redb {
            $( #[test] fn $case() { super::$case(&super::make_redb); } )*
        }
        mod postgres {
            $( #[test] fn $case() { super::$case(&super::make_pg); } )*
        }
    };
}

conformance!(
    blobs_append_contiguously_and_reads_see_the_committed_prefix,
    blob_writes_by_others_or_changing_bytes_are_refused,
    blob_limits_count_only_unexpired_blobs_of_the_owner,
    expired_blobs_are_absent_and_purged_oldest_first,
    blobs_count_against_the_store_cap_and_are_freed_by_purge,
    registration_is_idempotent_and_conflicts_fail,
    commit_assigns_contiguous_seqs_per_inbox,
    dedup_within_a_batch_returns_the_first_seq,
    dedup_across_batches_survives_ack,
    dedup_key_is_sender_recipient_and_message_id,
    unknown_recipient_is_refused_alone,
    quota_by_messages_refuses_without_partial_writes,
    quota_by_bytes_refuses_without_partial_writes,
    empty_batch_commits_nothing,
    pull_pages_by_limit_with_remaining,
    pull_respects_max_bytes_but_returns_one,
    remaining_is_exact_around_purged_and_unacked_prefixes,
    ack_deletes_is_monotonic_and_clamps,
    purge_writes_tombstones_and_pull_reports_merged_ranges,
    purge_takes_expired_prefixes_oldest_inbox_first_bounded_by_max,
    purge_stops_at_the_first_unexpired_envelope,
    mixed_retention_classes_purge_prefixes_only,
    ack_past_tombstones_clears_truncation,
    truncation_with_nothing_retained_points_past_head,
    truncation_caps_ranges_but_counts_all,
    expired_dedup_entries_are_dropped,
    prekeys_are_handed_out_once_lowest_first,
    prekey_pool_is_capped,
    bundle_needs_registration_and_signed_prekey,
    device_lists_only_move_forward,
    counters_of_unknown_and_many_inboxes,
    concurrent_commits_and_pulls_stay_consistent,
    store_cap_refuses_past_the_cap_until_acks_free_space,
    store_cap_is_freed_by_purge_and_ignores_duplicates,
    device_cap_refuses_the_extra_device_of_a_user,
    last_seen_is_written_coarsely,
    removing_a_device_frees_its_inbox_and_prekeys_and_refuses_it,
    lease_counts_count_stale_and_removed_devices,
    a_list_dropping_devices_removes_them_in_the_same_transaction,
);

type Make<S> = dyn Fn(StoreLimits) -> Made<S>;

const R: u8 = 9;
const R2: u8 = 8;
const A: u8 = 1;
const B: u8 = 2;
const LATER: u64 = 1_000_000;

fn dev(n: u8) -> DeviceId {
    DeviceId([n; 16])
}

fn conv(n: u8) -> ConversationId {
    ConversationId([n; 16])
}

fn reg(n: u8) -> DeviceRegistration {
    DeviceRegistration {
        device: dev(n),
        user: UserKey([n; 32]),
        signing_key: [n; 32],
        agreement_key: [n.wrapping_add(100); 32],
        user_signature: [n; 64],
    }
}

fn mid(n: u64) -> MessageId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    MessageId(b)
}

/// Envelope bytes that identify the message, `len` long (at least 8).
fn body(msg: u64, len: usize) -> Vec<u8> {
    let mut b = msg.to_be_bytes().to_vec();
    b.resize(len.max(8), (msg % 251) as u8);
    b
}

/// An envelope from `from` to `to`, message `msg`, 16 bytes, far expiry.
fn env(from: u8, to: u8, msg: u64) -> NewEnvelope {
    NewEnvelope {
        recipient: dev(to),
        sender: dev(from),
        message_id: mid(msg),
        conversation: conv(1),
        sender_seq: msg,
        bytes: body(msg, 16),
        expires_at_ms: LATER,
    }
}

trait EnvExt {
    fn len(self, len: usize) -> Self;
    fn expires(self, at: u64) -> Self;
    fn in_conv(self, c: u8, sender_seq: u64) -> Self;
}

impl EnvExt for NewEnvelope {
    fn len(mut self, len: usize) -> Self {
        self.bytes = body(
            u64::from_be_bytes(self.message_id.0[..8].try_into().unwrap()),
            len,
        );
        self
    }
    fn expires(mut self, at: u64) -> Self {
        self.expires_at_ms = at;
        self
    }
    fn in_conv(mut self, c: u8, sender_seq: u64) -> Self {
        self.conversation = conv(c);
        self.sender_seq = sender_seq;
        self
    }
}

fn stored(seq: u64) -> CommitOutcome {
    CommitOutcome::Stored { seq }
}

fn dup(seq: u64) -> CommitOutcome {
    CommitOutcome::Duplicate { seq }
}

fn refused(r: Refusal) -> CommitOutcome {
    CommitOutcome::Refused(r)
}

/// A store with the given devices registered.
fn with_devices<S: Store>(make: &Make<S>, limits: StoreLimits, devices: &[u8]) -> Made<S> {
    let s = make(limits);
    for &d in devices {
        s.register_device(&reg(d), 1).unwrap();
    }
    s
}

fn seqs_of<S: Store>(s: &S, device: u8, after: u64) -> Vec<u64> {
    let page = s.pull(&dev(device), after, usize::MAX, usize::MAX).unwrap();
    page.envelopes.iter().map(|e| e.seq).collect()
}

fn range(sender: u8, c: u8, first: u64, last: u64) -> DroppedRange {
    DroppedRange {
        sender: dev(sender),
        conversation: conv(c),
        first_seq: first,
        last_seq: last,
    }
}

fn registration_is_idempotent_and_conflicts_fail<S: Store>(make: &Make<S>) {
    let s = make(StoreLimits::default());
    assert_eq!(s.device(&dev(A)).unwrap(), None);
    let first = s.register_device(&reg(A), 100).unwrap();
    assert_eq!(first.registration, reg(A));
    assert_eq!(first.registered_at_ms, 100);
    // Same keys again: a no-op returning the original record.
    let again = s.register_device(&reg(A), 200).unwrap();
    assert_eq!(again, first);
    // Different keys under the same id: refused, original kept.
    let mut other = reg(A);
    other.signing_key = [0xEE; 32];
    assert!(matches!(
        s.register_device(&other, 300),
        Err(StoreError::AlreadyRegistered)
    ));
    let mut other_user = reg(A);
    other_user.user = UserKey([0xEE; 32]);
    assert!(matches!(
        s.register_device(&other_user, 300),
        Err(StoreError::AlreadyRegistered)
    ));
    assert_eq!(s.device(&dev(A)).unwrap(), Some(first));
    assert_eq!(s.device(&dev(B)).unwrap(), None);
}

fn commit_assigns_contiguous_seqs_per_inbox<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R, R2]);
    let batch = [
        env(A, R, 1).len(10),
        env(A, R2, 2).len(20),
        env(B, R, 3).len(30),
        env(A, R, 4).len(40),
        env(B, R2, 5).len(50),
    ];
    assert_eq!(
        s.commit(&batch).unwrap(),
        vec![stored(1), stored(1), stored(2), stored(3), stored(2)]
    );
    let next = [env(A, R2, 6), env(A, R, 7)];
    assert_eq!(s.commit(&next).unwrap(), vec![stored(3), stored(4)]);
    assert_eq!(
        s.inbox_state(&dev(R)).unwrap(),
        InboxState {
            head: 4,
            acked: 0,
            depth: 4,
            bytes: 10 + 30 + 40 + 16,
        }
    );
    assert_eq!(s.inbox_state(&dev(R2)).unwrap().head, 3);
    let page = s.pull(&dev(R), 0, 100, usize::MAX).unwrap();
    let got: Vec<(u64, Vec<u8>)> = page
        .envelopes
        .into_iter()
        .map(|e| (e.seq, e.bytes.to_vec()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, body(1, 10)),
            (2, body(3, 30)),
            (3, body(4, 40)),
            (4, body(7, 16)),
        ]
    );
    assert_eq!(page.remaining, 0);
    assert_eq!(page.truncated, None);
    assert_eq!(s.total_depth().unwrap(), 7);
}

fn dedup_within_a_batch_returns_the_first_seq<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R, R2]);
    let batch = [
        env(A, R, 1),
        env(A, R, 2),
        env(A, R, 1),
        env(A, R2, 1),
        env(A, R, 2),
        env(A, R, 3),
    ];
    assert_eq!(
        s.commit(&batch).unwrap(),
        vec![stored(1), stored(2), dup(1), stored(1), dup(2), stored(3)]
    );
    assert_eq!(s.inbox_state(&dev(R)).unwrap().depth, 3);
    assert_eq!(seqs_of(&*s, R, 0), vec![1, 2, 3]);
}

fn dedup_across_batches_survives_ack<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    assert_eq!(
        s.commit(&[env(A, R, 1), env(A, R, 2)]).unwrap(),
        vec![stored(1), stored(2)]
    );
    assert_eq!(
        s.commit(&[env(A, R, 2), env(A, R, 3)]).unwrap(),
        vec![dup(2), stored(3)]
    );
    assert_eq!(s.ack(&dev(R), 3).unwrap(), 3);
    // A late retry after the recipient acknowledged: still the original seq.
    assert_eq!(
        s.commit(&[env(A, R, 1), env(A, R, 3)]).unwrap(),
        vec![dup(1), dup(3)]
    );
    let state = s.inbox_state(&dev(R)).unwrap();
    assert_eq!((state.head, state.depth, state.bytes), (3, 0, 0));
    assert!(seqs_of(&*s, R, 0).is_empty());
}

fn dedup_key_is_sender_recipient_and_message_id<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R, R2]);
    assert_eq!(
        s.commit(&[env(A, R, 1), env(B, R, 1), env(A, R2, 1)])
            .unwrap(),
        vec![stored(1), stored(2), stored(1)]
    );
    assert_eq!(
        s.commit(&[env(B, R, 1), env(A, R2, 1), env(A, R, 1)])
            .unwrap(),
        vec![dup(2), dup(1), dup(1)]
    );
}

fn unknown_recipient_is_refused_alone<S: Store>(make: &Make<S>) {
    const U: u8 = 77;
    let s = with_devices(make, StoreLimits::default(), &[R]);
    assert_eq!(
        s.commit(&[env(A, R, 1), env(A, U, 2), env(A, R, 3)])
            .unwrap(),
        vec![stored(1), refused(Refusal::UnknownRecipient), stored(2)]
    );
    assert_eq!(s.inbox_state(&dev(U)).unwrap(), InboxState::default());
    assert_eq!(s.total_depth().unwrap(), 2);
    // Nothing was remembered for the refused envelope: once the device
    // exists, the same message is stored, not reported as a duplicate.
    s.register_device(&reg(U), 5).unwrap();
    assert_eq!(s.commit(&[env(A, U, 2)]).unwrap(), vec![stored(1)]);
}

fn quota_by_messages_refuses_without_partial_writes<S: Store>(make: &Make<S>) {
    let limits = StoreLimits {
        max_inbox_messages: 3,
        ..StoreLimits::default()
    };
    let s = with_devices(make, limits, &[R, R2]);
    let batch = [
        env(A, R, 1),
        env(A, R, 2),
        env(A, R2, 3),
        env(A, R, 4),
        env(A, R, 5),
        env(A, R2, 6),
    ];
    assert_eq!(
        s.commit(&batch).unwrap(),
        vec![
            stored(1),
            stored(2),
            stored(1),
            stored(3),
            refused(Refusal::QuotaMessages),
            stored(2),
        ]
    );
    assert_eq!(
        s.inbox_state(&dev(R)).unwrap(),
        InboxState {
            head: 3,
            acked: 0,
            depth: 3,
            bytes: 48,
        }
    );
    assert_eq!(seqs_of(&*s, R, 0), vec![1, 2, 3]);
    assert_eq!(s.total_depth().unwrap(), 5);
    // A retry of an already stored message is still a duplicate when full.
    assert_eq!(s.commit(&[env(A, R, 2)]).unwrap(), vec![dup(2)]);
    // Acking makes room; the refused message is stored anew, contiguously.
    assert_eq!(s.ack(&dev(R), 1).unwrap(), 1);
    assert_eq!(
        s.commit(&[env(A, R, 5), env(A, R, 7)]).unwrap(),
        vec![stored(4), refused(Refusal::QuotaMessages)]
    );
    assert_eq!(seqs_of(&*s, R, 0), vec![2, 3, 4]);
}

fn quota_by_bytes_refuses_without_partial_writes<S: Store>(make: &Make<S>) {
    let limits = StoreLimits {
        max_inbox_bytes: 100,
        ..StoreLimits::default()
    };
    let s = with_devices(make, limits, &[R]);
    let batch = [
        env(A, R, 1).len(40),
        env(A, R, 2).len(40),
        env(A, R, 3).len(40),
        env(A, R, 4).len(20),
        env(A, R, 5).len(8),
        env(A, R, 6).len(101),
    ];
    assert_eq!(
        s.commit(&batch).unwrap(),
        vec![
            stored(1),
            stored(2),
            refused(Refusal::QuotaBytes),
            stored(3),
            refused(Refusal::QuotaBytes),
            refused(Refusal::QuotaBytes),
        ]
    );
    let state = s.inbox_state(&dev(R)).unwrap();
    assert_eq!((state.head, state.depth, state.bytes), (3, 3, 100));
    let page = s.pull(&dev(R), 0, 10, usize::MAX).unwrap();
    let lens: Vec<usize> = page.envelopes.iter().map(|e| e.bytes.len()).collect();
    assert_eq!(lens, vec![40, 40, 20]);
    // Bytes are released by ack and the refused envelope then fits.
    s.ack(&dev(R), 1).unwrap();
    assert_eq!(s.inbox_state(&dev(R)).unwrap().bytes, 60);
    assert_eq!(s.commit(&[env(A, R, 3).len(40)]).unwrap(), vec![stored(4)]);
}

/// A sender fills the whole store (not one inbox: the envelopes go to two
/// recipients, each far below its inbox quota): past the cap every envelope
/// is refused with `StoreFull` and nothing of it is written; acks give the
/// space back.
fn store_cap_refuses_past_the_cap_until_acks_free_space<S: Store>(make: &Make<S>) {
    let limits = StoreLimits {
        max_store_bytes: 3 * stored_cost(40),
        ..StoreLimits::default()
    };
    let s = with_devices(make, limits, &[R, R2]);
    assert_eq!(s.stored_bytes().unwrap(), 0);
    let batch = [
        env(A, R, 1).len(40),
        env(A, R2, 2).len(40),
        env(A, R, 3).len(40),
        env(A, R2, 4).len(40),
        env(A, R, 5).len(8),
    ];
    assert_eq!(
        s.commit(&batch).unwrap(),
        vec![
            stored(1),
            stored(1),
            stored(2),
            refused(Refusal::StoreFull),
            refused(Refusal::StoreFull),
        ]
    );
    assert_eq!(s.stored_bytes().unwrap(), 3 * stored_cost(40));
    // Nothing of the refused envelopes was written.
    assert_eq!(s.inbox_state(&dev(R2)).unwrap().head, 1);
    assert_eq!(s.inbox_state(&dev(R)).unwrap().head, 2);
    assert_eq!(s.total_depth().unwrap(), 3);
    // Still full: a later batch is refused too, pulls keep working.
    assert_eq!(
        s.commit(&[env(B, R2, 6).len(8)]).unwrap(),
        vec![refused(Refusal::StoreFull)]
    );
    assert_eq!(seqs_of(&*s, R, 0), vec![1, 2]);
    // An ack frees its envelope's share; the refused one then fits.
    s.ack(&dev(R), 1).unwrap();
    assert_eq!(s.stored_bytes().unwrap(), 2 * stored_cost(40));
    assert_eq!(
        s.commit(&[env(A, R2, 4).len(40), env(A, R2, 7).len(8)])
            .unwrap(),
        vec![stored(2), refused(Refusal::StoreFull)]
    );
    s.ack(&dev(R), 2).unwrap();
    s.ack(&dev(R2), 2).unwrap();
    assert_eq!(s.stored_bytes().unwrap(), 0);
    assert_eq!(s.commit(&[env(A, R2, 7).len(8)]).unwrap(), vec![stored(3)]);
    assert_eq!(s.stored_bytes().unwrap(), stored_cost(8));
}

/// Expired envelopes give their space back; a retry of an envelope already
/// stored is still answered as a duplicate when the store is full.
fn store_cap_is_freed_by_purge_and_ignores_duplicates<S: Store>(make: &Make<S>) {
    let limits = StoreLimits {
        max_store_bytes: 2 * stored_cost(16),
        ..StoreLimits::default()
    };
    let s = with_devices(make, limits, &[R]);
    assert_eq!(
        s.commit(&[env(A, R, 1).expires(10), env(A, R, 2).expires(20)])
            .unwrap(),
        vec![stored(1), stored(2)]
    );
    assert_eq!(
        s.commit(&[env(A, R, 2), env(A, R, 3)]).unwrap(),
        vec![dup(2), refused(Refusal::StoreFull)]
    );
    s.purge_expired(10, 100).unwrap();
    assert_eq!(s.stored_bytes().unwrap(), stored_cost(16));
    assert_eq!(s.commit(&[env(A, R, 3)]).unwrap(), vec![stored(3)]);
}

/// One user registers devices until the cap; the next one is refused and not
/// stored, while re-registering an existing device and other users'
/// devices still succeed.
fn device_cap_refuses_the_extra_device_of_a_user<S: Store>(make: &Make<S>) {
    let limits = StoreLimits {
        max_devices_per_user: 3,
        ..StoreLimits::default()
    };
    let s = make(limits);
    let of_user = |n: u8, user: u8| DeviceRegistration {
        user: UserKey([user; 32]),
        ..reg(n)
    };
    for n in 1..=3 {
        s.register_device(&of_user(n, 50), 1).unwrap();
    }
    assert!(matches!(
        s.register_device(&of_user(4, 50), 2),
        Err(StoreError::DeviceLimit { max: 3 })
    ));
    assert_eq!(s.device(&dev(4)).unwrap(), None);
    // Same keys again: still the original record.
    assert_eq!(
        s.register_device(&of_user(2, 50), 3)
            .unwrap()
            .registered_at_ms,
        1
    );
    // Other users are not affected, and their devices do not count.
    for n in 4..=6 {
        s.register_device(&of_user(n, 51), 4).unwrap();
    }
    assert!(matches!(
        s.register_device(&of_user(7, 51), 5),
        Err(StoreError::DeviceLimit { max: 3 })
    ));
    assert!(matches!(
        s.register_device(&of_user(8, 50), 5),
        Err(StoreError::DeviceLimit { max: 3 })
    ));
}

fn empty_batch_commits_nothing<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    assert_eq!(s.commit(&[]).unwrap(), vec![]);
    assert_eq!(s.inbox_state(&dev(R)).unwrap(), InboxState::default());
}

fn pull_pages_by_limit_with_remaining<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let batch: Vec<_> = (1..=10).map(|m| env(A, R, m)).collect();
    s.commit(&batch).unwrap();
    let d = dev(R);
    let p = s.pull(&d, 0, 4, usize::MAX).unwrap();
    assert_eq!(
        p.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(p.envelopes[2].bytes, body(3, 16));
    assert_eq!(p.remaining, 6);
    let p = s.pull(&d, 4, 4, usize::MAX).unwrap();
    assert_eq!(
        p.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![5, 6, 7, 8]
    );
    assert_eq!(p.remaining, 2);
    let p = s.pull(&d, 8, 4, usize::MAX).unwrap();
    assert_eq!(
        p.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![9, 10]
    );
    assert_eq!(p.remaining, 0);
    let p = s.pull(&d, 10, 4, usize::MAX).unwrap();
    assert!(p.envelopes.is_empty());
    assert_eq!(p.remaining, 0);
    let p = s.pull(&d, u64::MAX, 4, usize::MAX).unwrap();
    assert!(p.envelopes.is_empty());
    assert_eq!((p.remaining, p.truncated), (0, None));
    // A zero limit returns nothing but still counts what is waiting.
    let p = s.pull(&d, 3, 0, usize::MAX).unwrap();
    assert!(p.envelopes.is_empty());
    assert_eq!(p.remaining, 7);
    // Pulling never deletes.
    assert_eq!(s.inbox_state(&d).unwrap().depth, 10);
}

fn pull_respects_max_bytes_but_returns_one<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let mut batch = vec![env(A, R, 1).len(1000)];
    batch.extend((2..=5).map(|m| env(A, R, m).len(100)));
    s.commit(&batch).unwrap();
    let d = dev(R);
    let count = |after, max_bytes| s.pull(&d, after, 100, max_bytes).unwrap().envelopes.len();
    // The first envelope alone exceeds the budget: still returned, alone.
    assert_eq!(count(0, 500), 1);
    assert_eq!(count(0, 0), 1);
    assert_eq!(count(0, 1099), 1);
    assert_eq!(count(0, 1100), 2);
    assert_eq!(count(1, 250), 2);
    assert_eq!(count(1, 300), 3);
    assert_eq!(count(1, 10), 1);
    let p = s.pull(&d, 1, 100, 250).unwrap();
    assert_eq!(p.remaining, 2);
}

fn remaining_is_exact_around_purged_and_unacked_prefixes<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let batch: Vec<_> = (1..=10)
        .map(|m| {
            let e = env(A, R, m);
            if m <= 3 { e.expires(50) } else { e }
        })
        .collect();
    s.commit(&batch).unwrap();
    let d = dev(R);
    let page = |after, limit| {
        let p = s.pull(&d, after, limit, usize::MAX).unwrap();
        (
            p.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
            p.remaining,
        )
    };
    assert_eq!(page(0, 3), (vec![1, 2, 3], 7));
    assert_eq!(page(8, 1), (vec![9], 1));
    assert_eq!(page(5, 2), (vec![6, 7], 3));
    assert_eq!(page(0, 0), (vec![], 10));
    // Purge seqs 1 to 3: stored are 4 to 10.
    assert_eq!(s.purge_expired(50, 100).unwrap().expired, 3);
    assert_eq!(page(0, 2), (vec![4, 5], 5));
    assert_eq!(page(2, 1), (vec![4], 6));
    assert_eq!(page(3, 0), (vec![], 7));
    assert_eq!(page(6, 1), (vec![7], 3));
    assert_eq!(page(8, 1), (vec![9], 1));
    s.ack(&d, 5).unwrap();
    // Stored are 6 to 10.
    assert_eq!(page(6, 1), (vec![7], 3));
    assert_eq!(page(2, 0), (vec![], 5));
    assert_eq!(page(0, 1), (vec![6], 4));
    assert_eq!(page(9, 5), (vec![10], 0));
    assert_eq!(page(10, 5), (vec![], 0));
    assert_eq!(page(u64::MAX, 5), (vec![], 0));
    s.ack(&d, 10).unwrap();
    assert_eq!(page(0, 5), (vec![], 0));
}

fn ack_deletes_is_monotonic_and_clamps<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R, R2]);
    let batch: Vec<_> = (1..=10).map(|m| env(A, R, m)).collect();
    s.commit(&batch).unwrap();
    s.commit(&[env(A, R2, 11)]).unwrap();
    let d = dev(R);
    assert_eq!(s.ack(&d, 3).unwrap(), 3);
    assert_eq!(
        s.inbox_state(&d).unwrap(),
        InboxState {
            head: 10,
            acked: 3,
            depth: 7,
            bytes: 7 * 16,
        }
    );
    assert_eq!(seqs_of(&*s, R, 0), (4..=10).collect::<Vec<_>>());
    // Never backwards.
    assert_eq!(s.ack(&d, 2).unwrap(), 3);
    assert_eq!(s.ack(&d, 3).unwrap(), 3);
    assert_eq!(s.ack(&d, 0).unwrap(), 3);
    assert_eq!(s.inbox_state(&d).unwrap().depth, 7);
    // Clamped to the head.
    assert_eq!(s.ack(&d, 1_000).unwrap(), 10);
    assert_eq!(
        s.inbox_state(&d).unwrap(),
        InboxState {
            head: 10,
            acked: 10,
            depth: 0,
            bytes: 0,
        }
    );
    let p = s.pull(&d, 0, 100, usize::MAX).unwrap();
    assert!(p.envelopes.is_empty());
    assert_eq!((p.remaining, p.truncated), (0, None));
    // Seqs are never reused, and the clamp means new envelopes stay unacked.
    assert_eq!(s.commit(&[env(A, R, 12)]).unwrap(), vec![stored(11)]);
    assert_eq!(seqs_of(&*s, R, 0), vec![11]);
    assert_eq!(s.ack(&d, u64::MAX).unwrap(), 11);
    // Other inboxes are untouched; unknown ones ack nothing.
    assert_eq!(s.inbox_state(&dev(R2)).unwrap().depth, 1);
    assert_eq!(s.ack(&dev(55), 5).unwrap(), 0);
    assert_eq!(s.total_depth().unwrap(), 1);
}

/// R's inbox after [`purge_fixture`]: seqs 7 and 8 survive; 1 to 6 became
/// tombstones.
fn purge_fixture<S: Store>(make: &Make<S>) -> Made<S> {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let batch = [
        env(A, R, 1).in_conv(3, 1).expires(90),
        env(A, R, 2).in_conv(1, 1).expires(100),
        env(B, R, 3).in_conv(2, 7).expires(100),
        env(A, R, 4).in_conv(1, 2).expires(100),
        env(A, R, 5).in_conv(1, 5).expires(100),
        env(B, R, 6).in_conv(2, 8).expires(100),
        env(A, R, 7).in_conv(1, 3).expires(5_000),
        env(A, R, 8).in_conv(1, 4).expires(5_000),
    ];
    s.commit(&batch).unwrap();
    assert_eq!(
        s.purge_expired(99, 100).unwrap(),
        PurgeStats {
            expired: 1,
            dedup_removed: 1,
        }
    );
    assert_eq!(
        s.purge_expired(100, 100).unwrap(),
        PurgeStats {
            expired: 5,
            dedup_removed: 5,
        }
    );
    assert_eq!(s.purge_expired(100, 100).unwrap(), PurgeStats::default());
    s
}

fn purge_writes_tombstones_and_pull_reports_merged_ranges<S: Store>(make: &Make<S>) {
    let s = purge_fixture(make);
    let d = dev(R);
    assert_eq!(
        s.inbox_state(&d).unwrap(),
        InboxState {
            head: 8,
            acked: 0,
            depth: 2,
            bytes: 32,
        }
    );
    assert_eq!(s.total_depth().unwrap(), 2);

    let p = s.pull(&d, 0, 100, usize::MAX).unwrap();
    assert_eq!(
        p.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![7, 8]
    );
    assert_eq!(p.envelopes[0].bytes, body(7, 16));
    assert_eq!(p.remaining, 0);
    let t = p.truncated.unwrap();
    assert_eq!(t.oldest_retained, 7);
    assert_eq!(t.dropped_count, 6);
    assert_eq!(
        t.dropped,
        vec![
            range(A, 1, 1, 2),
            range(A, 1, 5, 5),
            range(A, 3, 1, 1),
            range(B, 2, 7, 8),
        ]
    );

    // From a later cursor only the later tombstones count.
    let p = s.pull(&d, 4, 100, usize::MAX).unwrap();
    assert_eq!(
        p.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![7, 8]
    );
    let t = p.truncated.unwrap();
    assert_eq!((t.oldest_retained, t.dropped_count), (7, 2));
    assert_eq!(t.dropped, vec![range(A, 1, 5, 5), range(B, 2, 8, 8)]);
    // The truncation does not depend on the page size.
    let p = s.pull(&d, 4, 0, usize::MAX).unwrap();
    assert_eq!(p.truncated.unwrap().oldest_retained, 7);
    // Past the last tombstone: no truncation.
    assert_eq!(s.pull(&d, 6, 100, usize::MAX).unwrap().truncated, None);
    assert_eq!(s.pull(&d, 7, 100, usize::MAX).unwrap().truncated, None);
}

fn purge_takes_expired_prefixes_oldest_inbox_first_bounded_by_max<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R, R2]);
    s.commit(&[
        env(A, R2, 1).expires(10),
        env(A, R, 2).expires(20),
        env(A, R, 3).expires(30),
        env(A, R2, 4).expires(40),
        env(A, R, 5).expires(50),
    ])
    .unwrap();
    assert_eq!(s.purge_expired(u64::MAX, 0).unwrap(), PurgeStats::default());
    assert_eq!(
        s.purge_expired(35, 2).unwrap(),
        PurgeStats {
            expired: 2,
            dedup_removed: 2,
        }
    );
    // The two oldest went: R2's seq 1 (at 10) and R's seq 1 (at 20).
    assert_eq!(seqs_of(&*s, R, 0), vec![2, 3]);
    assert_eq!(seqs_of(&*s, R2, 0), vec![2]);
    assert_eq!(
        s.purge_expired(35, 10).unwrap(),
        PurgeStats {
            expired: 1,
            dedup_removed: 1,
        }
    );
    assert_eq!(seqs_of(&*s, R, 0), vec![3]);
    assert_eq!(s.purge_expired(35, 10).unwrap(), PurgeStats::default());
    assert_eq!(s.purge_expired(1_000, 10).unwrap().expired, 2);
    assert_eq!(s.total_depth().unwrap(), 0);
    let t = s
        .pull(&dev(R), 0, 10, usize::MAX)
        .unwrap()
        .truncated
        .unwrap();
    assert_eq!((t.oldest_retained, t.dropped_count), (4, 3));
    // Acked envelopes are not purged again.
    s.commit(&[env(A, R, 6).expires(2_000)]).unwrap();
    s.ack(&dev(R), 4).unwrap();
    assert_eq!(
        s.purge_expired(3_000, 10).unwrap(),
        PurgeStats {
            expired: 0,
            dedup_removed: 1,
        }
    );
}

/// Retention is uniform, so an inbox's envelopes expire in seq order and
/// purge removes an expired prefix. An envelope that expires before an older
/// one (a clock step) waits for it, so deletions stay prefixes.
fn purge_stops_at_the_first_unexpired_envelope<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    s.commit(&[
        env(A, R, 1).expires(100),
        env(A, R, 2).expires(50),
        env(A, R, 3).expires(100),
        env(A, R, 4).expires(60),
    ])
    .unwrap();
    let d = dev(R);
    // Seq 2 has expired but seq 1 has not: nothing is purged.
    assert_eq!(s.purge_expired(70, 10).unwrap().expired, 0);
    assert_eq!(seqs_of(&*s, R, 0), vec![1, 2, 3, 4]);
    // Acking seq 1 makes seq 2 the oldest: now it goes, and seq 3 stops the
    // purge again.
    s.ack(&d, 1).unwrap();
    assert_eq!(s.purge_expired(70, 10).unwrap().expired, 1);
    assert_eq!(seqs_of(&*s, R, 0), vec![3, 4]);
    let p = s.pull(&d, 1, 10, usize::MAX).unwrap();
    assert_eq!((p.remaining, p.truncated.unwrap().dropped_count), (0, 1));
    assert_eq!(s.purge_expired(100, 10).unwrap().expired, 2);
    assert_eq!(
        s.inbox_state(&d).unwrap(),
        InboxState {
            head: 4,
            acked: 1,
            depth: 0,
            bytes: 0,
        }
    );
    // An emptied inbox is queued again by its next envelope.
    assert_eq!(
        s.commit(&[env(A, R, 5).expires(200)]).unwrap(),
        vec![stored(5)]
    );
    assert_eq!(s.purge_expired(199, 10).unwrap().expired, 0);
    assert_eq!(s.purge_expired(200, 10).unwrap().expired, 1);
    let t = s.pull(&d, 1, 10, usize::MAX).unwrap().truncated.unwrap();
    assert_eq!((t.oldest_retained, t.dropped_count), (6, 4));
}

/// Retention classes (important envelopes expire later): purge still only
/// removes expired prefixes, so a normal envelope queued behind an unread
/// important one stays until that one is acked or expires; its dedup entry
/// still expires at its own `expires_at_ms`.
fn mixed_retention_classes_purge_prefixes_only<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let d = dev(R);
    assert_eq!(
        s.commit(&[
            env(A, R, 1).expires(10),
            env(A, R, 2).expires(1_000),
            env(A, R, 3).expires(20),
            env(A, R, 4).expires(20),
        ])
        .unwrap(),
        vec![stored(1), stored(2), stored(3), stored(4)]
    );
    // Seq 1 goes at its expiry; the important seq 2 holds back seqs 3 and 4.
    assert_eq!(s.purge_expired(500, 10).unwrap().expired, 1);
    assert_eq!(seqs_of(&*s, R, 0), vec![2, 3, 4]);
    let p = s.pull(&d, 0, 10, usize::MAX).unwrap();
    let t = p.truncated.unwrap();
    assert_eq!((t.oldest_retained, t.dropped_count), (2, 1));
    assert_eq!(t.dropped, vec![range(A, 1, 1, 1)]);
    assert_eq!(s.inbox_state(&d).unwrap().depth, 3);
    // The held-back envelopes' dedup entries expired on time: a retry of
    // seq 3 is stored anew (the recipient drops it by message id).
    assert_eq!(
        s.commit(&[env(A, R, 3).expires(600)]).unwrap(),
        vec![stored(5)]
    );
    // Acking the important one lets the expired ones behind it go.
    s.ack(&d, 2).unwrap();
    assert_eq!(s.purge_expired(500, 10).unwrap().expired, 2);
    assert_eq!(seqs_of(&*s, R, 0), vec![5]);
    assert_eq!(s.purge_expired(600, 10).unwrap().expired, 1);
    let t = s.pull(&d, 2, 10, usize::MAX).unwrap().truncated.unwrap();
    assert_eq!((t.oldest_retained, t.dropped_count), (6, 3));
    assert_eq!(t.dropped, vec![range(A, 1, 3, 4)]);
}

fn ack_past_tombstones_clears_truncation<S: Store>(make: &Make<S>) {
    let s = purge_fixture(make);
    let d = dev(R);
    assert_eq!(s.ack(&d, 3).unwrap(), 3);
    let t = s.pull(&d, 0, 100, usize::MAX).unwrap().truncated.unwrap();
    assert_eq!((t.oldest_retained, t.dropped_count), (7, 3));
    assert_eq!(s.ack(&d, 6).unwrap(), 6);
    let p = s.pull(&d, 0, 100, usize::MAX).unwrap();
    assert_eq!(p.truncated, None);
    assert_eq!(
        p.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![7, 8]
    );
    assert_eq!(s.ack(&d, 7).unwrap(), 7);
    let p = s.pull(&d, 0, 100, usize::MAX).unwrap();
    assert_eq!(
        p.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![8]
    );
    assert_eq!(s.inbox_state(&d).unwrap().depth, 1);
}

fn truncation_with_nothing_retained_points_past_head<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    s.commit(&[
        env(A, R, 1).expires(100),
        env(A, R, 2).expires(100),
        env(A, R, 3).expires(100),
    ])
    .unwrap();
    s.purge_expired(100, 10).unwrap();
    let p = s.pull(&dev(R), 0, 10, usize::MAX).unwrap();
    assert!(p.envelopes.is_empty());
    assert_eq!(p.remaining, 0);
    let t = p.truncated.unwrap();
    assert_eq!((t.oldest_retained, t.dropped_count), (4, 3));
    assert_eq!(t.dropped, vec![range(A, 1, 1, 3)]);
    assert_eq!(s.commit(&[env(A, R, 4)]).unwrap(), vec![stored(4)]);
    let p = s.pull(&dev(R), 0, 10, usize::MAX).unwrap();
    assert_eq!(p.truncated.unwrap().oldest_retained, 4);
}

fn truncation_caps_ranges_but_counts_all<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let n = MAX_DROPPED_RANGES as u64 + 6;
    // Sender seqs 2, 4, 6, …: no two adjacent, so every tombstone is a range.
    for chunk in (1..=n).collect::<Vec<_>>().chunks(200) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|&m| env(A, R, m).in_conv(1, m * 2).expires(10))
            .collect();
        s.commit(&batch).unwrap();
    }
    assert_eq!(s.purge_expired(10, usize::MAX).unwrap().expired, n);
    let t = s
        .pull(&dev(R), 0, 10, usize::MAX)
        .unwrap()
        .truncated
        .unwrap();
    assert_eq!(t.dropped_count, n);
    assert_eq!(t.dropped.len(), MAX_DROPPED_RANGES);
    assert_eq!(t.dropped[0], range(A, 1, 2, 2));
    assert_eq!(t.oldest_retained, n + 1);
}

fn expired_dedup_entries_are_dropped<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    assert_eq!(
        s.commit(&[env(A, R, 1).expires(100)]).unwrap(),
        vec![stored(1)]
    );
    s.ack(&dev(R), 1).unwrap();
    assert_eq!(s.purge_expired(99, 10).unwrap(), PurgeStats::default());
    assert_eq!(s.commit(&[env(A, R, 1)]).unwrap(), vec![dup(1)]);
    // The envelope was acked, so only the dedup entry expires.
    assert_eq!(
        s.purge_expired(100, 10).unwrap(),
        PurgeStats {
            expired: 0,
            dedup_removed: 1,
        }
    );
    // Past the retention window a retry is a new message.
    assert_eq!(s.commit(&[env(A, R, 1)]).unwrap(), vec![stored(2)]);
}

fn spk(id: u32) -> SignedPrekey {
    SignedPrekey {
        id,
        public: [id as u8; 32],
        signature: [id as u8 + 1; 64],
    }
}

fn otk(id: u32) -> OneTimePrekey {
    OneTimePrekey {
        id,
        public: [(id % 256) as u8; 32],
    }
}

fn prekeys_are_handed_out_once_lowest_first<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let d = dev(R);
    assert_eq!(
        s.publish_prekeys(&d, &spk(1), &[otk(5), otk(1), otk(3)])
            .unwrap(),
        3
    );
    assert_eq!(s.one_time_prekeys_left(&d).unwrap(), 3);
    let b = s.take_prekey_bundle(&d).unwrap().unwrap();
    assert_eq!(b.device, d);
    assert_eq!(b.user, reg(R).user);
    assert_eq!(b.signing_key, reg(R).signing_key);
    assert_eq!(b.agreement_key, reg(R).agreement_key);
    assert_eq!(b.signed_prekey, spk(1));
    assert_eq!(b.one_time_prekey, Some(otk(1)));
    assert_eq!(s.one_time_prekeys_left(&d).unwrap(), 2);
    let b = s.take_prekey_bundle(&d).unwrap().unwrap();
    assert_eq!(b.one_time_prekey, Some(otk(3)));
    // Republishing replaces the signed prekey; a known id is ignored, even
    // with another key, and an id handed out before can come back.
    let mut clash = otk(5);
    clash.public = [0xAA; 32];
    assert_eq!(
        s.publish_prekeys(&d, &spk(2), &[clash, otk(2), otk(1)])
            .unwrap(),
        3
    );
    let mut handed = Vec::new();
    for _ in 0..3 {
        let b = s.take_prekey_bundle(&d).unwrap().unwrap();
        assert_eq!(b.signed_prekey, spk(2));
        handed.push(b.one_time_prekey.unwrap());
    }
    assert_eq!(handed, vec![otk(1), otk(2), otk(5)]);
    // Exhausted: the bundle still comes, without a one-time prekey.
    let b = s.take_prekey_bundle(&d).unwrap().unwrap();
    assert_eq!(b.one_time_prekey, None);
    assert_eq!(s.one_time_prekeys_left(&d).unwrap(), 0);
    // Publishing with no one-time prekeys reports the pool and keeps it.
    assert_eq!(s.publish_prekeys(&d, &spk(3), &[]).unwrap(), 0);
    assert_eq!(
        s.take_prekey_bundle(&d).unwrap().unwrap().signed_prekey,
        spk(3)
    );
}

fn prekey_pool_is_capped<S: Store>(make: &Make<S>) {
    let limits = StoreLimits {
        max_one_time_prekeys: 4,
        ..StoreLimits::default()
    };
    let s = with_devices(make, limits, &[R]);
    let d = dev(R);
    let many: Vec<_> = (10..16).map(otk).collect();
    assert_eq!(s.publish_prekeys(&d, &spk(1), &many).unwrap(), 4);
    // Full: a lower id is not added either.
    assert_eq!(s.publish_prekeys(&d, &spk(1), &[otk(1)]).unwrap(), 4);
    assert_eq!(
        s.take_prekey_bundle(&d).unwrap().unwrap().one_time_prekey,
        Some(otk(10))
    );
    assert_eq!(
        s.publish_prekeys(&d, &spk(1), &[otk(1), otk(2)]).unwrap(),
        4
    );
    let mut ids = Vec::new();
    while let Some(k) = s.take_prekey_bundle(&d).unwrap().unwrap().one_time_prekey {
        ids.push(k.id);
    }
    assert_eq!(ids, vec![1, 11, 12, 13]);
}

fn bundle_needs_registration_and_signed_prekey<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let d = dev(R);
    assert_eq!(s.take_prekey_bundle(&d).unwrap(), None);
    assert_eq!(s.one_time_prekeys_left(&d).unwrap(), 0);
    let stranger = dev(66);
    assert!(matches!(
        s.publish_prekeys(&stranger, &spk(1), &[otk(1)]),
        Err(StoreError::UnknownDevice)
    ));
    assert!(matches!(
        s.take_prekey_bundle(&stranger),
        Err(StoreError::UnknownDevice)
    ));
    assert_eq!(s.one_time_prekeys_left(&stranger).unwrap(), 0);
    // Another device's pool is separate.
    s.register_device(&reg(R2), 1).unwrap();
    s.publish_prekeys(&dev(R2), &spk(9), &[otk(1)]).unwrap();
    assert_eq!(s.take_prekey_bundle(&d).unwrap(), None);
    assert_eq!(s.one_time_prekeys_left(&dev(R2)).unwrap(), 1);
}

fn device_list(user: u8, version: u64, devices: &[u8]) -> SignedDeviceList {
    SignedDeviceList {
        list: DeviceList {
            user: UserKey([user; 32]),
            version,
            devices: devices
                .iter()
                .map(|&d| DeviceEntry {
                    device: dev(d),
                    signing_key: [d; 32],
                    agreement_key: [d + 1; 32],
                    membership_signature: [d + 2; 64],
                })
                .collect(),
        },
        signature: [version as u8; 64],
    }
}

fn device_lists_only_move_forward<S: Store>(make: &Make<S>) {
    let s = make(StoreLimits::default());
    let user = UserKey([A; 32]);
    assert_eq!(s.device_list(&user).unwrap(), None);
    assert_eq!(s.publish_device_list(&device_list(A, 1, &[1])).unwrap(), 1);
    assert_eq!(s.device_list(&user).unwrap(), Some(device_list(A, 1, &[1])));
    assert!(matches!(
        s.publish_device_list(&device_list(A, 1, &[1, 2])),
        Err(StoreError::StaleDeviceList { stored: 1 })
    ));
    assert!(matches!(
        s.publish_device_list(&device_list(A, 0, &[])),
        Err(StoreError::StaleDeviceList { stored: 1 })
    ));
    assert_eq!(
        s.publish_device_list(&device_list(A, 3, &[1, 2, 3]))
            .unwrap(),
        3
    );
    assert!(matches!(
        s.publish_device_list(&device_list(A, 2, &[1])),
        Err(StoreError::StaleDeviceList { stored: 3 })
    ));
    assert_eq!(
        s.device_list(&user).unwrap(),
        Some(device_list(A, 3, &[1, 2, 3]))
    );
    // Users are independent; an empty list is a valid list.
    assert_eq!(s.publish_device_list(&device_list(B, 1, &[])).unwrap(), 1);
    assert_eq!(
        s.device_list(&UserKey([B; 32])).unwrap(),
        Some(device_list(B, 1, &[]))
    );
    assert_eq!(
        s.publish_device_list(&device_list(A, u64::MAX, &[4]))
            .unwrap(),
        u64::MAX
    );
}

fn counters_of_unknown_and_many_inboxes<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[10, 11, 12]);
    assert_eq!(s.inbox_state(&dev(99)).unwrap(), InboxState::default());
    assert_eq!(s.total_depth().unwrap(), 0);
    let p = s.pull(&dev(99), 0, 10, usize::MAX).unwrap();
    assert!(p.envelopes.is_empty());
    assert_eq!((p.remaining, p.truncated), (0, None));
    let batch: Vec<_> = (0..30u64).map(|m| env(A, 10 + (m % 3) as u8, m)).collect();
    s.commit(&batch).unwrap();
    assert_eq!(s.total_depth().unwrap(), 30);
    s.ack(&dev(10), 4).unwrap();
    s.ack(&dev(11), 10).unwrap();
    assert_eq!(s.total_depth().unwrap(), 30 - 4 - 10);
    for d in 10..=12 {
        let st = s.inbox_state(&dev(d)).unwrap();
        assert_eq!(st.head, 10);
        assert_eq!(st.depth, seqs_of(&*s, d, 0).len() as u64);
    }
}

fn concurrent_commits_and_pulls_stay_consistent<S: Store>(make: &Make<S>) {
    const WRITERS: u64 = 2;
    const BATCHES: u64 = 25;
    const PER_BATCH: u64 = 4;
    let s = with_devices(make, StoreLimits::default(), &[R]);
    let store: &S = &s;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut checks = 0u32;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::Acquire);
                // Every snapshot shows a gap-free prefix of the inbox.
                let seqs = seqs_of(store, R, 0);
                let expect: Vec<u64> = (1..=seqs.len() as u64).collect();
                assert_eq!(seqs, expect);
                checks += 1;
                if finished {
                    return checks;
                }
            }
        });
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                scope.spawn(move || {
                    for b in 0..BATCHES {
                        let batch: Vec<_> = (0..PER_BATCH)
                            .map(|i| env(A, R, 1 + w * 10_000 + b * PER_BATCH + i))
                            .collect();
                        for o in store.commit(&batch).unwrap() {
                            assert!(matches!(o, CommitOutcome::Stored { .. }));
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        assert!(reader.join().unwrap() >= 1);
    });
    let total = WRITERS * BATCHES * PER_BATCH;
    let page = s.pull(&dev(R), 0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(page.envelopes.len() as u64, total);
    let distinct: BTreeSet<_> = page.envelopes.iter().map(|e| e.bytes.clone()).collect();
    assert_eq!(distinct.len() as u64, total);
    assert_eq!(s.inbox_state(&dev(R)).unwrap().head, total);
}

/// A small deterministic generator (no dependency, reproducible by seed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Both stores, driven by the same long pseudo-random sequence of commits
/// (with duplicates, unknown recipients, quota refusals and the odd clock
/// step), acks, purges and pulls, give identical answers at every step. The
/// redb store derives `remaining` from its counters while the memory store
/// counts rows, so this also checks that stored seqs stay contiguous.
#[test]
fn redb_and_memory_agree_on_a_random_workload() {
    let limits = StoreLimits {
        max_inbox_messages: 12,
        max_inbox_bytes: 12 * 40,
        max_one_time_prekeys: 4,
        max_store_bytes: 20 * stored_cost(24),
        max_devices_per_user: 10,
    };
    for seed in 1..=6u64 {
        let mem = with_devices(&make_memory, limits, &[R, R2, A, B]);
        let db = with_devices(&make_redb, limits, &[R, R2, A, B]);
        let mut rng = Lcg(seed);
        let mut now = 1_000u64;
        // What the sequence exercised, so it cannot silently go trivial.
        let (mut dups, mut quota, mut expired, mut truncated, mut full) = (0, 0, 0, 0, 0);
        let devices = [R, R2, 77];
        for step in 0..1_500 {
            let ctx = format!("seed {seed} step {step}");
            match rng.below(10) {
                0..=3 => {
                    let n = 1 + rng.below(8);
                    let batch: Vec<_> = (0..n)
                        .map(|_| {
                            let from = [A, B][rng.below(2) as usize];
                            let to = devices[rng.below(3) as usize];
                            let retention = if rng.below(20) == 0 { 50 } else { 300 };
                            env(from, to, rng.below(60))
                                .len(8 + rng.below(32) as usize)
                                .expires(now + retention)
                        })
                        .collect();
                    let out = mem.commit(&batch).unwrap();
                    assert_eq!(out, db.commit(&batch).unwrap(), "{ctx}");
                    for o in out {
                        match o {
                            CommitOutcome::Duplicate { .. } => dups += 1,
                            CommitOutcome::Refused(
                                Refusal::QuotaMessages | Refusal::QuotaBytes,
                            ) => quota += 1,
                            CommitOutcome::Refused(Refusal::StoreFull) => full += 1,
                            _ => {}
                        }
                    }
                }
                4 | 5 => {
                    let d = dev(devices[rng.below(3) as usize]);
                    let head = mem.inbox_state(&d).unwrap().head;
                    let up_to = rng.below(head + 2);
                    assert_eq!(
                        mem.ack(&d, up_to).unwrap(),
                        db.ack(&d, up_to).unwrap(),
                        "{ctx}"
                    );
                }
                6 => {
                    now += rng.below(60);
                    let max = 1 + rng.below(6) as usize;
                    let stats = mem.purge_expired(now, max).unwrap();
                    assert_eq!(stats, db.purge_expired(now, max).unwrap(), "{ctx}");
                    expired += stats.expired;
                }
                _ => {
                    let d = dev(devices[rng.below(3) as usize]);
                    let head = mem.inbox_state(&d).unwrap().head;
                    let after = rng.below(head + 2);
                    let limit = rng.below(6) as usize;
                    let max_bytes = 20 + rng.below(100) as usize;
                    let page = mem.pull(&d, after, limit, max_bytes).unwrap();
                    truncated += u64::from(page.truncated.is_some());
                    assert_eq!(page, db.pull(&d, after, limit, max_bytes).unwrap(), "{ctx}");
                }
            }
            for d in devices {
                assert_eq!(
                    mem.inbox_state(&dev(d)).unwrap(),
                    db.inbox_state(&dev(d)).unwrap(),
                    "{ctx}"
                );
            }
            assert_eq!(
                mem.total_depth().unwrap(),
                db.total_depth().unwrap(),
                "{ctx}"
            );
            assert_eq!(
                mem.stored_bytes().unwrap(),
                db.stored_bytes().unwrap(),
                "{ctx}"
            );
            if step % 20 == 0 {
                db.check_consistency().unwrap();
            }
        }
        db.check_consistency().unwrap();
        assert!(
            dups > 0 && quota > 0 && expired > 0 && truncated > 0 && full > 0,
            "seed {seed}: dups {dups} quota {quota} expired {expired} truncated {truncated} \
             full {full}"
        );
    }
}

// ---- blobs -------------------------------------------------------------------------------

const BLOB_NOW: u64 = 1_000_000;

fn blob_limits() -> BlobLimits {
    BlobLimits {
        max_blob_bytes: 1000,
        max_blobs_per_device: 2,
        max_blob_bytes_per_device: 1500,
        ttl_ms: 100,
    }
}

fn put<'a>(owner: u8, blob: u8, offset: u64, total_len: u64, bytes: &'a [u8]) -> BlobWrite<'a> {
    BlobWrite {
        owner: dev(owner),
        blob: BlobId([blob; 16]),
        offset,
        total_len,
        bytes,
    }
}

fn read_all<S: Store>(s: &S, blob: u8, now: u64) -> Option<Vec<u8>> {
    s.blob_read(&BlobId([blob; 16]), 0, usize::MAX, now)
        .unwrap()
        .map(|(_, b)| b)
}

fn blobs_append_contiguously_and_reads_see_the_committed_prefix<S: Store>(make: &Make<S>) {
    let s = make(StoreLimits::default());
    let l = blob_limits();
    let m = s
        .blob_put(&put(1, 7, 0, 20, b"0123456789"), &l, BLOB_NOW)
        .unwrap();
    assert_eq!(
        m,
        BlobMeta {
            owner: dev(1),
            total_len: 20,
            committed: 10,
            created_at_ms: BLOB_NOW,
            expires_at_ms: BLOB_NOW + 100,
        }
    );
    // Idempotent retries, entirely inside the committed prefix.
    for (off, bytes) in [(0u64, &b"0123456789"[..]), (3, b"345"), (10, b"")] {
        let m = s
            .blob_put(&put(1, 7, off, 20, bytes), &l, BLOB_NOW + 1)
            .unwrap();
        assert_eq!(
            (m.committed, m.created_at_ms, m.expires_at_ms),
            (10, BLOB_NOW, BLOB_NOW + 100)
        );
    }
    // Overlap then append, in several pieces; reads span pieces.
    s.blob_put(&put(1, 7, 8, 20, b"89abcd"), &l, BLOB_NOW)
        .unwrap();
    s.blob_put(&put(1, 7, 14, 20, b"efghij"), &l, BLOB_NOW)
        .unwrap();
    assert_eq!(read_all(&*s, 7, BLOB_NOW).unwrap(), b"0123456789abcdefghij");
    let (meta, part) = s
        .blob_read(&BlobId([7; 16]), 9, 7, BLOB_NOW)
        .unwrap()
        .unwrap();
    assert_eq!((meta.committed, part.as_slice()), (20, &b"9abcdef"[..]));
    let (_, none) = s
        .blob_read(&BlobId([7; 16]), 20, 7, BLOB_NOW)
        .unwrap()
        .unwrap();
    assert!(none.is_empty());
    let (_, none) = s
        .blob_read(&BlobId([7; 16]), 5, 0, BLOB_NOW)
        .unwrap()
        .unwrap();
    assert!(none.is_empty());
    // Gaps and another total are inconsistent; nothing is written.
    s.blob_put(&put(1, 8, 0, 20, b"ab"), &l, BLOB_NOW).unwrap();
    assert!(matches!(
        s.blob_put(&put(1, 8, 3, 20, b"x"), &l, BLOB_NOW),
        Err(StoreError::BlobMismatch(_))
    ));
    assert!(matches!(
        s.blob_put(&put(1, 8, 2, 21, b"x"), &l, BLOB_NOW),
        Err(StoreError::BlobMismatch(_))
    ));
    // No blob to append to.
    assert!(matches!(
        s.blob_put(&put(1, 9, 1, 20, b"x"), &l, BLOB_NOW),
        Err(StoreError::UnknownBlob)
    ));
    assert_eq!(read_all(&*s, 8, BLOB_NOW).unwrap(), b"ab");
    assert_eq!(read_all(&*s, 9, BLOB_NOW), None);
}

fn blob_writes_by_others_or_changing_bytes_are_refused<S: Store>(make: &Make<S>) {
    let s = make(StoreLimits::default());
    let l = blob_limits();
    s.blob_put(&put(1, 7, 0, 8, b"abcd"), &l, BLOB_NOW).unwrap();
    for (off, bytes) in [(0u64, &b"abcd"[..]), (4, b"efgh"), (2, b"cdef")] {
        assert!(matches!(
            s.blob_put(&put(2, 7, off, 8, bytes), &l, BLOB_NOW),
            Err(StoreError::BlobForbidden(_))
        ));
    }
    assert!(matches!(
        s.blob_put(&put(1, 7, 2, 8, b"cXef"), &l, BLOB_NOW),
        Err(StoreError::BlobForbidden(_))
    ));
    assert_eq!(read_all(&*s, 7, BLOB_NOW).unwrap(), b"abcd");
}

fn blob_limits_count_only_unexpired_blobs_of_the_owner<S: Store>(make: &Make<S>) {
    let s = make(StoreLimits::default());
    let l = blob_limits();
    assert!(matches!(
        s.blob_put(&put(1, 1, 0, 1001, b"x"), &l, BLOB_NOW),
        Err(StoreError::BlobLimit(_))
    ));
    s.blob_put(&put(1, 1, 0, 1000, b"x"), &l, BLOB_NOW).unwrap();
    assert!(matches!(
        s.blob_put(&put(1, 2, 0, 501, b"x"), &l, BLOB_NOW),
        Err(StoreError::BlobLimit(_))
    ));
    s.blob_put(&put(1, 2, 0, 500, b"x"), &l, BLOB_NOW).unwrap();
    assert!(matches!(
        s.blob_put(&put(1, 3, 0, 1, b"x"), &l, BLOB_NOW),
        Err(StoreError::BlobLimit(_))
    ));
    // Another device has its own allowance.
    s.blob_put(&put(2, 3, 0, 1, b"x"), &l, BLOB_NOW).unwrap();
    // Once expired (even unpurged), the owner's blobs no longer count.
    s.blob_put(&put(1, 4, 0, 1000, b"x"), &l, BLOB_NOW + 100)
        .unwrap();
}

fn expired_blobs_are_absent_and_purged_oldest_first<S: Store>(make: &Make<S>) {
    let s = make(StoreLimits::default());
    let l = blob_limits();
    s.blob_put(&put(1, 1, 0, 4, b"aaaa"), &l, BLOB_NOW).unwrap();
    s.blob_put(&put(2, 2, 0, 4, b"bb"), &l, BLOB_NOW + 10)
        .unwrap();
    s.blob_put(&put(3, 3, 0, 4, b"cc"), &l, BLOB_NOW + 20)
        .unwrap();
    assert_eq!(read_all(&*s, 1, BLOB_NOW + 99).unwrap(), b"aaaa");
    assert_eq!(read_all(&*s, 1, BLOB_NOW + 100), None);
    // Writes after expiry: appending fails, offset 0 starts a new blob.
    assert!(matches!(
        s.blob_put(&put(2, 2, 2, 4, b"bb"), &l, BLOB_NOW + 110),
        Err(StoreError::UnknownBlob)
    ));
    assert_eq!(s.purge_blobs(BLOB_NOW + 5, 10).unwrap(), 0);
    assert_eq!(s.purge_blobs(BLOB_NOW + 200, 1).unwrap(), 1);
    assert_eq!(
        read_all(&*s, 1, BLOB_NOW),
        None,
        "purged, whatever the clock says"
    );
    assert_eq!(read_all(&*s, 2, BLOB_NOW + 10).unwrap(), b"bb");
    assert_eq!(s.purge_blobs(BLOB_NOW + 200, 10).unwrap(), 2);
    assert_eq!(s.purge_blobs(BLOB_NOW + 200, 10).unwrap(), 0);
    let m = s
        .blob_put(&put(3, 3, 0, 4, b"new"), &l, BLOB_NOW + 300)
        .unwrap();
    assert_eq!((m.committed, m.expires_at_ms), (3, BLOB_NOW + 400));
    assert_eq!(read_all(&*s, 3, BLOB_NOW + 300).unwrap(), b"new");
}

/// Blobs count against `max_store_bytes` (their whole declared size, from
/// the first piece) next to envelopes: a new blob that does not fit is
/// refused with nothing written, a blob that fits may finish even when the
/// store is then full, envelopes are refused while blobs hold the room, and
/// purging (or replacing) an expired blob gives its share back.
fn blobs_count_against_the_store_cap_and_are_freed_by_purge<S: Store>(make: &Make<S>) {
    let limits = StoreLimits {
        max_store_bytes: stored_cost(40) + blob_cost(300),
        ..StoreLimits::default()
    };
    let s = with_devices(make, limits, &[R]);
    let l = blob_limits();
    assert_eq!(s.commit(&[env(A, R, 1).len(40)]).unwrap(), vec![stored(1)]);
    assert_eq!(s.stored_bytes().unwrap(), stored_cost(40));

    // One byte too many: refused, nothing stored or counted.
    assert!(matches!(
        s.blob_put(&put(1, 7, 0, 301, b"x"), &l, BLOB_NOW),
        Err(StoreError::StoreFull)
    ));
    assert_eq!(read_all(&*s, 7, BLOB_NOW), None);
    assert_eq!(s.stored_bytes().unwrap(), stored_cost(40));

    // Exactly the room: the whole declared size is counted at once, and
    // the rest of the blob still goes in with the store full.
    s.blob_put(&put(1, 7, 0, 300, &[1; 100]), &l, BLOB_NOW)
        .unwrap();
    assert_eq!(s.stored_bytes().unwrap(), limits.max_store_bytes);
    let m = s
        .blob_put(&put(1, 7, 100, 300, &[2; 200]), &l, BLOB_NOW + 1)
        .unwrap();
    assert_eq!(m.committed, 300);
    assert_eq!(s.stored_bytes().unwrap(), limits.max_store_bytes);
    // Full: no new blob (another device's neither), no new envelope.
    for owner in [1, 2] {
        assert!(matches!(
            s.blob_put(&put(owner, 8, 0, 1, b"x"), &l, BLOB_NOW + 1),
            Err(StoreError::StoreFull)
        ));
    }
    assert_eq!(
        s.commit(&[env(A, R, 2).len(1)]).unwrap(),
        vec![refused(Refusal::StoreFull)]
    );

    // The purge gives the blob's share back.
    assert_eq!(s.purge_blobs(BLOB_NOW + 100, 10).unwrap(), 1);
    assert_eq!(s.stored_bytes().unwrap(), stored_cost(40));
    assert_eq!(s.commit(&[env(A, R, 2).len(1)]).unwrap(), vec![stored(2)]);
    s.ack(&dev(R), 2).unwrap();
    assert_eq!(s.stored_bytes().unwrap(), 0);

    // An expired blob replaced before the purge: the old one's share is
    // released as the new one is charged.
    s.blob_put(&put(1, 9, 0, 300, b"old"), &l, BLOB_NOW + 200)
        .unwrap();
    assert_eq!(s.stored_bytes().unwrap(), blob_cost(300));
    s.blob_put(&put(1, 9, 0, 200, b"new"), &l, BLOB_NOW + 300)
        .unwrap();
    assert_eq!(s.stored_bytes().unwrap(), blob_cost(200));
    assert_eq!(s.purge_blobs(BLOB_NOW + 400, 10).unwrap(), 1);
    assert_eq!(s.stored_bytes().unwrap(), 0);
}

/// The redb store's count of blob bytes is rebuilt when the file is opened
/// again (after a crash), so a restarted relay is as full as before.
#[test]
fn redb_counts_blobs_again_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    let limits = StoreLimits {
        max_store_bytes: blob_cost(300) + blob_cost(10),
        ..StoreLimits::default()
    };
    let l = blob_limits();
    let limits = StoreLimits {
        max_store_bytes: limits.max_store_bytes + 2 * stored_cost(40),
        ..limits
    };
    let before = {
        let s = RedbStore::open(&path, limits).unwrap();
        s.register_device(&reg(R), 1).unwrap();
        s.blob_put(&put(1, 7, 0, 300, b"abc"), &l, BLOB_NOW)
            .unwrap();
        assert_eq!(
            s.commit(&[env(A, R, 1).len(40), env(A, R, 2).len(40)])
                .unwrap(),
            vec![stored(1), stored(2)]
        );
        s.stored_bytes().unwrap()
    };
    assert_eq!(before, blob_cost(300) + 2 * stored_cost(40));
    let s = RedbStore::open(&path, limits).unwrap();
    assert_eq!(s.stored_bytes().unwrap(), before);
    assert!(matches!(
        s.blob_put(&put(2, 8, 0, 11, b"x"), &l, BLOB_NOW),
        Err(StoreError::StoreFull)
    ));
    s.blob_put(&put(2, 8, 0, 10, b"x"), &l, BLOB_NOW).unwrap();
}

// ---- device lifecycle ------------------------------------------------------

fn last_seen_is_written_coarsely<S: Store>(make: &Make<S>) {
    let s = make(StoreLimits::default());
    s.register_device(&reg(R), 10).unwrap();
    // Registration counts as seen.
    assert_eq!(s.device_last_seen(&dev(R)).unwrap(), Some(10));
    // Within the granularity: reported, not written.
    assert_eq!(s.touch_device(&dev(R), 500, 1_000).unwrap(), Some(10));
    assert_eq!(s.device_last_seen(&dev(R)).unwrap(), Some(10));
    // Past it: written.
    assert_eq!(s.touch_device(&dev(R), 1_010, 1_000).unwrap(), Some(10));
    assert_eq!(s.device_last_seen(&dev(R)).unwrap(), Some(1_010));
    assert_eq!(s.touch_device(&dev(R), 1_500, 1_000).unwrap(), Some(1_010));
    assert_eq!(s.device_last_seen(&dev(R)).unwrap(), Some(1_010));
    // A clock that steps back writes nothing.
    assert_eq!(s.touch_device(&dev(R), 5, 1_000).unwrap(), Some(1_010));
    assert_eq!(s.device_last_seen(&dev(R)).unwrap(), Some(1_010));
    // Unknown devices are not invented.
    assert_eq!(s.touch_device(&dev(A), 5_000, 0).unwrap(), None);
    assert_eq!(s.device_last_seen(&dev(A)).unwrap(), None);
}

/// A second device of `reg(n)`'s user.
fn sibling(n: u8, device: u8) -> DeviceRegistration {
    DeviceRegistration {
        device: dev(device),
        ..reg(n)
    }
}

fn removing_a_device_frees_its_inbox_and_prekeys_and_refuses_it<S: Store>(make: &Make<S>) {
    let limits = StoreLimits {
        max_devices_per_user: 2,
        ..StoreLimits::default()
    };
    let s = with_devices(make, limits, &[A]);
    s.register_device(&sibling(A, R), 1).unwrap();
    s.register_device(&reg(B), 1).unwrap();
    s.commit(&[env(B, R, 1), env(B, R, 2), env(B, A, 3)])
        .unwrap();
    s.publish_prekeys(&dev(R), &spk(1), &[otk(1), otk(2)])
        .unwrap();
    let before = s.stored_bytes().unwrap();
    assert_eq!(s.total_depth().unwrap(), 3);
    // The user is at its cap.
    assert!(matches!(
        s.register_device(&sibling(A, 77), 2),
        Err(StoreError::DeviceLimit { .. })
    ));

    assert!(s.remove_device(&dev(R), 50).unwrap());
    assert!(
        !s.remove_device(&dev(R), 60).unwrap(),
        "removal is idempotent"
    );
    assert!(!s.remove_device(&dev(99), 60).unwrap(), "unknown: nothing");
    assert_eq!(s.device_removed(&dev(R)).unwrap(), Some(50));
    assert_eq!(s.device_removed(&dev(A)).unwrap(), None);
    // Inbox freed: nothing to pull, counters and totals back down.
    assert_eq!(s.device(&dev(R)).unwrap(), None);
    assert_eq!(s.inbox_state(&dev(R)).unwrap(), InboxState::default());
    assert!(seqs_of(&*s, R, 0).is_empty());
    assert_eq!(s.total_depth().unwrap(), 1);
    assert_eq!(
        s.stored_bytes().unwrap(),
        before - 2 * stored_cost(16),
        "the removed inbox's bytes are released"
    );
    // Prekeys gone; the device is refused as a recipient and at registration.
    assert!(matches!(
        s.take_prekey_bundle(&dev(R)),
        Err(StoreError::UnknownDevice)
    ));
    assert_eq!(s.one_time_prekeys_left(&dev(R)).unwrap(), 0);
    assert_eq!(
        s.commit(&[env(B, R, 4)]).unwrap(),
        vec![refused(Refusal::UnknownRecipient)]
    );
    assert!(matches!(
        s.register_device(&sibling(A, R), 70),
        Err(StoreError::DeviceRemoved)
    ));
    assert_eq!(s.device_last_seen(&dev(R)).unwrap(), None);
    // Its slot is free for a new device of the user; the others are untouched.
    s.register_device(&sibling(A, 77), 80).unwrap();
    assert_eq!(seqs_of(&*s, A, 0), vec![1]);
}

fn lease_counts_count_stale_and_removed_devices<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[A, B, R]);
    let all = |_: &DeviceId| true;
    assert_eq!(s.lease_counts(1, &all).unwrap().stale, 0);
    assert_eq!(s.lease_counts(2, &all).unwrap().stale, 3);
    s.touch_device(&dev(B), 5_000, 0).unwrap();
    let c = s.lease_counts(2_000, &all).unwrap();
    assert_eq!((c.stale, c.removed), (2, 0));
    s.remove_device(&dev(R), 6_000).unwrap();
    let c = s.lease_counts(2_000, &all).unwrap();
    assert_eq!((c.stale, c.removed), (1, 1));
    let not_a = |d: &DeviceId| *d != dev(A);
    let c = s.lease_counts(2_000, &not_a).unwrap();
    assert_eq!((c.stale, c.removed), (0, 1));
}

/// `publish_device_list_removing`: the newer list is stored and every
/// device the previous list named that it drops, registered to the list's
/// user, is removed with it (inbox freed, refused from then on); a device
/// of another user the old list named is left alone; a stale list changes
/// nothing at all (neither the list nor any registration).
fn a_list_dropping_devices_removes_them_in_the_same_transaction<S: Store>(make: &Make<S>) {
    let s = with_devices(make, StoreLimits::default(), &[A, B]);
    s.register_device(&sibling(A, R), 1).unwrap();
    s.register_device(&sibling(A, R2), 1).unwrap();
    s.commit(&[env(B, R, 1), env(B, R2, 2)]).unwrap();
    let user = UserKey([A; 32]);
    // The first list removes nothing (there was none before).
    let v1 = device_list(A, 1, &[A, R, R2, B]);
    assert_eq!(
        s.publish_device_list_removing(&v1, 10).unwrap(),
        (1, Vec::new())
    );
    assert_eq!(s.device_list(&user).unwrap(), Some(v1.clone()));

    // A stale list: refused, and nothing is removed.
    let stale = device_list(A, 1, &[A]);
    assert!(matches!(
        s.publish_device_list_removing(&stale, 20),
        Err(StoreError::StaleDeviceList { stored: 1 })
    ));
    assert!(s.device(&dev(R)).unwrap().is_some());
    assert_eq!(s.device_removed(&dev(R)).unwrap(), None);

    // v2 drops R and B (B is another user's device: not removed).
    let v2 = device_list(A, 2, &[A, R2]);
    let (version, removed) = s.publish_device_list_removing(&v2, 30).unwrap();
    assert_eq!(version, 2);
    assert_eq!(removed, vec![dev(R)]);
    assert_eq!(s.device_list(&user).unwrap(), Some(v2.clone()));
    assert_eq!(s.device(&dev(R)).unwrap(), None);
    assert_eq!(s.device_removed(&dev(R)).unwrap(), Some(30));
    assert!(seqs_of(&*s, R, 0).is_empty());
    assert!(s.device(&dev(B)).unwrap().is_some());
    assert_eq!(s.device_removed(&dev(B)).unwrap(), None);
    assert_eq!(seqs_of(&*s, R2, 0), vec![1]);
    assert!(matches!(
        s.register_device(&sibling(A, R), 40),
        Err(StoreError::DeviceRemoved)
    ));
    // Dropping an already removed device again removes nothing more.
    let v3 = device_list(A, 3, &[A]);
    let (_, removed) = s.publish_device_list_removing(&v3, 50).unwrap();
    assert_eq!(removed, vec![dev(R2)]);
    assert_eq!(s.device_removed(&dev(R)).unwrap(), Some(30));
}

/// The simulator's model of a relay that died between a commit's write and
/// its sync: a restored snapshot forgets the commit, so the same seq goes
/// to the next envelope and the forgotten one is no duplicate.
#[test]
fn memory_snapshot_restore_forgets_everything_after_it() {
    let s = with_devices(&make_memory, StoreLimits::default(), &[1, 2, 3]);
    assert_eq!(s.commit(&[env(1, 2, 1)]).unwrap(), vec![stored(1)]);
    let before = s.snapshot().unwrap();
    assert_eq!(s.commit(&[env(1, 2, 2)]).unwrap(), vec![stored(2)]);
    s.restore(before).unwrap();
    assert_eq!(seqs_of(&*s, 2, 0), vec![1]);
    assert_eq!(s.commit(&[env(3, 2, 7)]).unwrap(), vec![stored(2)]);
    assert_eq!(s.commit(&[env(1, 2, 2)]).unwrap(), vec![stored(3)]);
    assert_eq!(s.inbox_state(&dev(2)).unwrap().head, 3);
}
