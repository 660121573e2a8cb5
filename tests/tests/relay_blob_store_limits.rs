//! Blobs (history archives) count against `--max-store-bytes`, end to end on
//! a real `hush-relay` process on 127.0.0.1: a device cannot fill the disk
//! with blob bytes past the cap, a blob that fits is charged its whole
//! declared size at once (so it can finish, and envelopes are refused while
//! it holds the room), and after a SIGKILL and restart the relay counts the
//! stored blob again. (That the purge gives a blob's share back is in the
//! store conformance suite: blobs live a day on a real relay.)

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_protocol::{BlobId, ErrorCode, Request, Response};
use hush_relay::store::{blob_cost, stored_cost};
use hush_tests::{
    DeviceIdentity, RelayProcess, TestDevice, conversation, make_envelope_sized, refusal_code,
    refused, stored,
};

/// The relay's store cap.
const CAP: &str = "64K";
const CAP_BYTES: u64 = 64 * 1024;
/// The archive that fits.
const ARCHIVE: u64 = 40_000;
/// Bytes per `BlobPut`.
const PIECE: usize = 8_000;
/// Encoded size of each envelope.
const ENVELOPE: usize = 4 * 1024;

fn first_piece(blob: u8, total_len: u64) -> Request {
    Request::BlobPut {
        blob: BlobId([blob; 16]),
        offset: 0,
        total_len,
        bytes: vec![blob; 16],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_bytes_count_against_the_store_cap_across_a_restart() {
    let mut relay = RelayProcess::spawn_temp(&["--send-rate", "0", "--max-store-bytes", CAP])
        .await
        .expect("relay process starts");
    let a = DeviceIdentity::from_seed(1);
    let b = DeviceIdentity::from_seed(2);
    let mut dev = TestDevice::register_new(&a, relay.target()).await.unwrap();
    TestDevice::register_new(&b, relay.target()).await.unwrap();

    // A blob declaring more than the whole store is refused with StoreFull
    // (not a blob limit: the default blob limits are far larger), and
    // nothing of it exists afterwards.
    let too_big = dev.request(first_piece(1, CAP_BYTES)).await;
    assert_eq!(refusal_code(&too_big), Some(ErrorCode::StoreFull));
    let status = dev
        .request(Request::BlobStatus {
            blob: BlobId([1; 16]),
        })
        .await;
    assert_eq!(refusal_code(&status), Some(ErrorCode::UnknownBlob));

    // One that fits is uploaded in pieces.
    let blob = BlobId([2; 16]);
    let bytes: Vec<u8> = (0..ARCHIVE).map(|i| (i % 251) as u8).collect();
    for (i, piece) in bytes.chunks(PIECE).enumerate() {
        let r = dev
            .request(Request::BlobPut {
                blob,
                offset: (i * PIECE) as u64,
                total_len: ARCHIVE,
                bytes: piece.to_vec(),
            })
            .await
            .unwrap();
        assert!(matches!(r, Response::BlobStored { .. }), "{r:?}");
    }

    // Envelopes get only the room the blob left.
    let room = CAP_BYTES - blob_cost(ARCHIVE);
    let fits = room / stored_cost(ENVELOPE as u64);
    assert!((1..8).contains(&fits), "{fits}");
    let conv = conversation(1);
    let mut accepted = 0u64;
    for seq in 1..=10u64 {
        let env = make_envelope_sized(a.device(), b.device(), conv, seq, ENVELOPE, seq as u8);
        let outcome = dev.send_one(env).await.unwrap();
        if let Some(e) = refused(&outcome) {
            assert_eq!(e.code, ErrorCode::StoreFull);
            break;
        }
        assert!(stored(&outcome).is_some());
        accepted += 1;
    }
    assert_eq!(accepted, fits, "the blob's declared size is counted");

    // After a crash the relay counts the blob again: still full.
    relay.restart().await.unwrap();
    let mut dev = TestDevice::login(&a, relay.target()).await.unwrap();
    let env = make_envelope_sized(a.device(), b.device(), conv, 99, ENVELOPE, 99);
    let outcome = dev.send_one(env).await.unwrap();
    assert_eq!(
        refused(&outcome).map(|e| e.code),
        Some(ErrorCode::StoreFull)
    );
    // A blob one byte larger than what is left is refused (it would fit
    // many times over if the stored archive were not counted).
    let left_now = room - accepted * stored_cost(ENVELOPE as u64);
    let again = dev
        .request(first_piece(3, left_now - blob_cost(0) + 1))
        .await;
    assert_eq!(refusal_code(&again), Some(ErrorCode::StoreFull));

    // The recipient drains its inbox: the envelopes' room comes back, the
    // blob's does not — a new blob fits exactly in what is left.
    let mut recipient = TestDevice::login(&b, relay.target()).await.unwrap();
    let inbox = recipient.read_inbox(0).await.unwrap();
    assert_eq!(inbox.len() as u64, accepted);
    let last = inbox.last().unwrap().seq;
    recipient.ack(last).await.unwrap();
    let left = room - blob_cost(0);
    let over = dev.request(first_piece(4, left + 1)).await;
    assert_eq!(refusal_code(&over), Some(ErrorCode::StoreFull));
    let r = dev.request(first_piece(4, left)).await.unwrap();
    assert!(
        matches!(r, Response::BlobStored { committed: 16, .. }),
        "{r:?}"
    );
    // The stored blob is intact after the restart.
    let r = dev
        .request(Request::BlobGet {
            blob,
            offset: 0,
            max: ARCHIVE as u32,
        })
        .await
        .unwrap();
    match r {
        Response::BlobChunk {
            bytes: got,
            committed,
            ..
        } => {
            assert_eq!(committed, ARCHIVE);
            assert_eq!(got, bytes);
        }
        other => panic!("{other:?}"),
    }
}
