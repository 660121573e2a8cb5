//! What only the redb store promises: everything committed is still there
//! after the file is closed and opened again.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{
    ConversationId, DeviceEntry, DeviceId, DeviceList, DeviceRegistration, MessageId,
    OneTimePrekey, SignedDeviceList, SignedPrekey, UserKey,
};
use hush_relay::store::redb_store::RedbStore;
use hush_relay::store::{CommitOutcome, InboxState, NewEnvelope, Store, StoreError, StoreLimits};

fn dev(n: u8) -> DeviceId {
    DeviceId([n; 16])
}

fn reg(n: u8) -> DeviceRegistration {
    DeviceRegistration {
        device: dev(n),
        user: UserKey([n; 32]),
        signing_key: [n; 32],
        agreement_key: [n + 1; 32],
        user_signature: [n + 2; 64],
    }
}

fn env(to: u8, msg: u8, expires_at_ms: u64) -> NewEnvelope {
    NewEnvelope {
        recipient: dev(to),
        sender: dev(1),
        message_id: MessageId([msg; 16]),
        conversation: ConversationId([7; 16]),
        sender_seq: u64::from(msg),
        bytes: vec![msg; 100 + usize::from(msg)],
        expires_at_ms,
    }
}

fn spk(id: u32) -> SignedPrekey {
    SignedPrekey {
        id,
        public: [3; 32],
        signature: [4; 64],
    }
}

fn otk(id: u32) -> OneTimePrekey {
    OneTimePrekey {
        id,
        public: [id as u8; 32],
    }
}

fn list(version: u64) -> SignedDeviceList {
    SignedDeviceList {
        list: DeviceList {
            user: UserKey([9; 32]),
            version,
            devices: vec![DeviceEntry {
                device: dev(9),
                signing_key: [9; 32],
                agreement_key: [10; 32],
                membership_signature: [12; 64],
            }],
        },
        signature: [11; 64],
    }
}

#[test]
fn reopen_keeps_everything_and_head_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested-name.redb");
    assert!(!path.exists());
    let limits = StoreLimits::default();
    {
        let s = RedbStore::open(&path, limits).unwrap();
        assert!(path.exists());
        s.register_device(&reg(9), 42).unwrap();
        s.register_device(&reg(8), 43).unwrap();
        let batch: Vec<_> = (1..=6)
            .map(|m| env(9, m, if m == 2 { 50 } else { 10_000 }))
            .collect();
        let out = s.commit(&batch).unwrap();
        assert_eq!(out.last(), Some(&CommitOutcome::Stored { seq: 6 }));
        s.commit(&[env(8, 20, 10_000)]).unwrap();
        // Seq 1 is acked, which makes seq 2 (expiring at 50) the oldest.
        assert_eq!(s.ack(&dev(9), 1).unwrap(), 1);
        assert_eq!(s.purge_expired(50, 10).unwrap().expired, 1);
        assert_eq!(
            s.publish_prekeys(&dev(9), &spk(1), &[otk(1), otk(2), otk(3)])
                .unwrap(),
            3
        );
        s.take_prekey_bundle(&dev(9)).unwrap();
        s.publish_device_list(&list(4)).unwrap();
    }
    let s = RedbStore::open(&path, limits).unwrap();
    assert_eq!(s.device(&dev(9)).unwrap().unwrap().registered_at_ms, 42);
    assert_eq!(s.device(&dev(9)).unwrap().unwrap().registration, reg(9));
    assert_eq!(
        s.inbox_state(&dev(9)).unwrap(),
        InboxState {
            head: 6,
            acked: 1,
            depth: 4,
            bytes: 103 + 104 + 105 + 106,
        }
    );
    assert_eq!(s.total_depth().unwrap(), 5);
    let page = s.pull(&dev(9), 0, 100, usize::MAX).unwrap();
    let seqs: Vec<u64> = page.envelopes.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);
    assert_eq!(page.envelopes[0].bytes, vec![3u8; 103]);
    let t = page.truncated.unwrap();
    assert_eq!((t.oldest_retained, t.dropped_count), (3, 1));
    assert_eq!((t.dropped[0].first_seq, t.dropped[0].last_seq), (2, 2));
    // Dedup survived: retries get their original seqs.
    assert_eq!(
        s.commit(&[env(9, 4, 10_000), env(9, 1, 10_000)]).unwrap(),
        vec![
            CommitOutcome::Duplicate { seq: 4 },
            CommitOutcome::Duplicate { seq: 1 }
        ]
    );
    // The head continues where it was.
    assert_eq!(
        s.commit(&[env(9, 30, 10_000)]).unwrap(),
        vec![CommitOutcome::Stored { seq: 7 }]
    );
    assert_eq!(s.one_time_prekeys_left(&dev(9)).unwrap(), 2);
    let b = s.take_prekey_bundle(&dev(9)).unwrap().unwrap();
    assert_eq!((b.signed_prekey, b.one_time_prekey), (spk(1), Some(otk(2))));
    assert_eq!(s.device_list(&UserKey([9; 32])).unwrap(), Some(list(4)));
    assert!(matches!(
        s.publish_device_list(&list(4)),
        Err(StoreError::StaleDeviceList { stored: 4 })
    ));
    // The purge queue survived too: the rest expires on schedule.
    assert_eq!(s.purge_expired(10_000, 100).unwrap().expired, 6);
    assert_eq!(s.inbox_state(&dev(9)).unwrap().depth, 0);
    assert_eq!(s.total_depth().unwrap(), 0);
}

#[test]
fn second_open_of_the_same_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    let _first = RedbStore::open(&path, StoreLimits::default()).unwrap();
    let second = RedbStore::open(&path, StoreLimits::default());
    assert!(matches!(second, Err(StoreError::Backend(_))));
}

#[test]
fn a_file_that_is_not_a_database_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.redb");
    std::fs::write(&path, vec![0x5A; 8192]).unwrap();
    assert!(matches!(
        RedbStore::open(&path, StoreLimits::default()),
        Err(StoreError::Backend(_))
    ));
}

#[test]
fn reads_see_a_consistent_snapshot_while_a_writer_runs() {
    // A long batch commits while pulls run: each pull sees either none or all
    // of the batch, never a part of it.
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path().join("relay.redb"), StoreLimits::default()).unwrap();
    s.register_device(&reg(9), 1).unwrap();
    let batches = 20u8;
    let per = 10u8;
    std::thread::scope(|scope| {
        let store = &s;
        let writer = scope.spawn(move || {
            for b in 0..batches {
                let batch: Vec<_> = (0..per).map(|i| env(9, b * per + i, 10_000)).collect();
                store.commit(&batch).unwrap();
            }
        });
        loop {
            let finished = writer.is_finished();
            let n = store
                .pull(&dev(9), 0, usize::MAX, usize::MAX)
                .unwrap()
                .envelopes
                .len();
            assert_eq!(n % usize::from(per), 0, "saw a partial batch: {n}");
            if finished {
                assert_eq!(n, usize::from(batches) * usize::from(per));
                break;
            }
        }
        writer.join().unwrap();
    });
    assert_eq!(
        s.inbox_state(&dev(9)).unwrap().head,
        u64::from(batches) * u64::from(per)
    );
}

/// The `*.seg` files in a store's segment directory, by id.
fn segment_files(s: &RedbStore) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(s.segment_dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// The pinning attack: one small envelope that is never acknowledged sits
/// among many that are, so without compaction its whole segment file stays
/// on disk for the retention period. Compaction moves it into the active
/// segment and deletes the old file; the envelope still pulls intact (also
/// after a reopen), and the store-cap count does not change.
#[test]
fn compaction_reclaims_a_segment_pinned_by_one_unacked_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    let limits = StoreLimits::default();
    let (pinned_bytes, stored) = {
        let s = RedbStore::open_with_segment_size(&path, limits, 4096).unwrap();
        s.register_device(&reg(9), 1).unwrap();
        s.register_device(&reg(8), 1).unwrap();
        // The pinning envelope first, then enough for inbox 8 to fill and
        // roll several segments.
        assert_eq!(
            s.commit(&[env(9, 200, 10_000)]).unwrap(),
            vec![CommitOutcome::Stored { seq: 1 }]
        );
        for m in 0..60u8 {
            s.commit(&[env(8, m, 10_000)]).unwrap();
        }
        let before = segment_files(&s);
        assert!(before.len() >= 3, "segments {before:?}");
        assert_eq!(before[0], 1);
        // Everything but the pinning envelope is acknowledged: the sealed
        // segments other than the first are deleted, the first stays.
        assert_eq!(s.ack(&dev(8), 60).unwrap(), 60);
        // A durable commit lets the deletions of non-durable acks happen.
        s.commit(&[env(8, 100, 10_000)]).unwrap();
        let pinned = segment_files(&s);
        assert!(pinned.contains(&1), "segment 1 gone without compaction");
        let stored = s.stored_bytes().unwrap();
        let mut steps = 0;
        while s.compact(1024).unwrap() {
            steps += 1;
            assert!(steps < 100, "compaction does not finish");
        }
        assert!(steps >= 1);
        let after = segment_files(&s);
        assert!(!after.contains(&1), "segment 1 still there: {after:?}");
        s.check_consistency().unwrap();
        assert_eq!(s.stored_bytes().unwrap(), stored);
        let page = s.pull(&dev(9), 0, 10, usize::MAX).unwrap();
        assert_eq!(page.envelopes.len(), 1);
        assert_eq!(page.envelopes[0].seq, 1);
        assert_eq!(page.envelopes[0].bytes, vec![200u8; 300]);
        // Nothing left to do: a further step is a no-op.
        assert!(!s.compact(1024).unwrap());
        (page.envelopes[0].bytes.clone(), stored)
    };
    let s = RedbStore::open_with_segment_size(&path, limits, 4096).unwrap();
    s.check_consistency().unwrap();
    assert!(!segment_files(&s).contains(&1));
    assert_eq!(s.stored_bytes().unwrap(), stored);
    let page = s.pull(&dev(9), 0, 10, usize::MAX).unwrap();
    assert_eq!(page.envelopes[0].bytes, pinned_bytes);
    // Inbox 8 was untouched by the move of inbox 9's record.
    let page = s.pull(&dev(8), 60, 10, usize::MAX).unwrap();
    assert_eq!(page.envelopes.len(), 1);
    assert_eq!(page.envelopes[0].bytes, vec![100u8; 200]);
}

/// Segments that are still mostly live are left alone: compaction only
/// copies when it reclaims more than it writes.
#[test]
fn compaction_leaves_mostly_live_segments_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open_with_segment_size(
        dir.path().join("relay.redb"),
        StoreLimits::default(),
        4096,
    )
    .unwrap();
    s.register_device(&reg(9), 1).unwrap();
    for m in 0..60u8 {
        s.commit(&[env(9, m, 10_000)]).unwrap();
    }
    let before = segment_files(&s);
    assert!(before.len() >= 3);
    // The first few envelopes acked: segment 1 loses less than half.
    s.ack(&dev(9), 3).unwrap();
    assert!(!s.compact(1 << 20).unwrap());
    assert_eq!(segment_files(&s), before);
    s.check_consistency().unwrap();
}

/// The per-user device cap survives a reopen (the count is in the file, not
/// in memory).
#[test]
fn device_cap_holds_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.redb");
    let limits = StoreLimits {
        max_devices_per_user: 2,
        ..StoreLimits::default()
    };
    let of_user = |n: u8| DeviceRegistration {
        user: UserKey([77; 32]),
        ..reg(n)
    };
    {
        let s = RedbStore::open(&path, limits).unwrap();
        s.register_device(&of_user(1), 1).unwrap();
        s.register_device(&of_user(2), 1).unwrap();
    }
    let s = RedbStore::open(&path, limits).unwrap();
    assert!(matches!(
        s.register_device(&of_user(3), 2),
        Err(StoreError::DeviceLimit { max: 2 })
    ));
    s.register_device(&of_user(2), 3).unwrap();
}

/// A damaged record in a segment due for compaction is a typed error, not a
/// panic, the segment is not retried after every commit, and the rest of the
/// store keeps working.
#[test]
fn compaction_of_a_damaged_segment_is_an_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open_with_segment_size(
        dir.path().join("relay.redb"),
        StoreLimits::default(),
        4096,
    )
    .unwrap();
    s.register_device(&reg(9), 1).unwrap();
    s.register_device(&reg(8), 1).unwrap();
    s.commit(&[env(9, 200, 10_000)]).unwrap();
    for m in 0..60u8 {
        s.commit(&[env(8, m, 10_000)]).unwrap();
    }
    s.ack(&dev(8), 60).unwrap();
    // Flip a byte of the pinned envelope's body (right after the segment
    // header and its record header).
    let seg = s.segment_dir().join("000001.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[16 + 36 + 5] ^= 0xFF;
    std::fs::write(&seg, bytes).unwrap();
    assert!(matches!(s.compact(1 << 20), Err(StoreError::Backend(m)) if m.contains("corrupt")));
    assert!(!s.compact(1 << 20).unwrap());
    assert!(seg.exists());
    assert!(matches!(
        s.pull(&dev(9), 0, 10, usize::MAX),
        Err(StoreError::Backend(_))
    ));
    assert_eq!(
        s.commit(&[env(8, 100, 10_000)]).unwrap(),
        vec![CommitOutcome::Stored { seq: 61 }]
    );
}
