//! Bad input is refused with the right `ProtocolError` variant, and each
//! limit is enforced on both the encoding and the decoding side.
// Test code: a failed expectation should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use hush_protocol::envelope::{
    ENVELOPE_VERSION, FIXED_HEADER_LEN, FLAG_SESSION_INIT, MIN_CIPHERTEXT_LEN, NO_ONE_TIME_PREKEY,
};
use hush_protocol::frame::{decode_client_body, decode_server_body};
use hush_protocol::limits::*;
use hush_protocol::{
    BlobId, ClientFrame, Delivered, DeviceEntry, DeviceId, DeviceList, DroppedRange, Envelope,
    EnvelopeHeader, ErrorCode, FrameBuffer, OneTimePrekey, Page, ProtocolError, Request, Response,
    SendOutcome, ServerFrame, SignedDeviceList, SignedPrekey, Truncation, UserKey, WireError,
    decode_client_frame, decode_server_frame, encode_client_frame, encode_server_frame,
};
use proptest::collection::vec;
use proptest::prelude::*;
use serde::Serialize;

/// A frame built straight from postcard, skipping the encoder's limit checks:
/// what a hostile or buggy peer could send.
fn raw_frame<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let body = postcard::to_allocvec(value).expect("serializable");
    frame_from_body(version, &body)
}

fn frame_from_body(version: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len() + 1).expect("small");
    let mut out = len.to_be_bytes().to_vec();
    out.push(version);
    out.extend_from_slice(payload);
    out
}

fn cf(request: Request) -> ClientFrame {
    ClientFrame {
        request_id: 1,
        request,
    }
}

fn resp(response: Response) -> ServerFrame {
    ServerFrame::Response {
        request_id: 1,
        response,
    }
}

fn too_large_what(r: Result<impl std::fmt::Debug, ProtocolError>) -> (&'static str, usize, usize) {
    match r {
        Err(ProtocolError::TooLarge { what, len, max }) => (what, len, max),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

fn sample_client_frames() -> Vec<ClientFrame> {
    vec![
        cf(Request::Pull {
            after: 5,
            limit: 200,
            ack: 5,
        }),
        cf(Request::Send {
            envelopes: vec![sample_envelope(40, 48, true), sample_envelope(0, 16, false)],
        }),
        cf(Request::Auth {
            signature: [0x5A; 64],
        }),
        cf(Request::Ping),
    ]
}

fn sample_server_frames() -> Vec<ServerFrame> {
    vec![
        resp(Response::Page(Page {
            envelopes: vec![Delivered {
                seq: 300,
                envelope: sample_envelope(40, 20, false),
            }],
            remaining: 7,
            truncated: Some(Truncation {
                oldest_retained: 250,
                dropped_count: 3,
                dropped: vec![DroppedRange {
                    sender: DeviceId([1; 16]),
                    conversation: hush_protocol::ConversationId([2; 16]),
                    first_seq: 4,
                    last_seq: 6,
                }],
            }),
        })),
        ServerFrame::error(9, ErrorCode::RateLimited, "slow down"),
        ServerFrame::closing(ErrorCode::Replaced, "another connection"),
        ServerFrame::Push {
            envelopes: vec![Delivered {
                seq: 1,
                envelope: sample_envelope(1, 17, true),
            }],
        },
    ]
}

// ---- truncation and trailing bytes -------------------------------------------------

#[test]
fn client_frame_cut_at_every_point_is_truncated() {
    for frame in sample_client_frames() {
        let bytes = encode_client_frame(&frame).expect("encodes");
        for cut in 0..bytes.len() {
            let r = decode_client_frame(&bytes[..cut]);
            match r {
                Err(ProtocolError::Truncated { needed }) if cut >= 4 => {
                    assert_eq!(needed, bytes.len() - cut, "cut {cut}")
                }
                Err(ProtocolError::Truncated { needed }) => assert_eq!(needed, 4 - cut),
                other => panic!("cut {cut} of {frame:?}: {other:?}"),
            }
        }
    }
}

#[test]
fn server_frame_cut_at_every_point_is_truncated() {
    for frame in sample_server_frames() {
        let bytes = encode_server_frame(&frame).expect("encodes");
        for cut in 0..bytes.len() {
            assert!(
                matches!(
                    decode_server_frame(&bytes[..cut]),
                    Err(ProtocolError::Truncated { .. })
                ),
                "cut {cut} of {frame:?}"
            );
        }
    }
}

#[test]
fn frame_body_cut_at_every_point_is_truncated() {
    // The length prefix is consistent, but the postcard value inside ends early.
    for frame in sample_client_frames() {
        let bytes = encode_client_frame(&frame).expect("encodes");
        let body = &bytes[4..];
        for cut in 0..body.len() {
            assert!(
                matches!(
                    decode_client_body(&body[..cut]),
                    Err(ProtocolError::Truncated { .. })
                ),
                "cut {cut} of {frame:?}"
            );
            let reframed = frame_from_body(body[0], body.get(1..cut).unwrap_or_default());
            if cut >= 1 {
                assert!(
                    matches!(
                        decode_client_frame(&reframed),
                        Err(ProtocolError::Truncated { .. })
                    ),
                    "reframed cut {cut} of {frame:?}"
                );
            }
        }
    }
    for frame in sample_server_frames() {
        let bytes = encode_server_frame(&frame).expect("encodes");
        let body = &bytes[4..];
        for cut in 0..body.len() {
            assert!(
                matches!(
                    decode_server_body(&body[..cut]),
                    Err(ProtocolError::Truncated { .. })
                ),
                "cut {cut} of {frame:?}"
            );
        }
    }
}

#[test]
fn bytes_after_a_complete_frame_are_trailing() {
    for frame in sample_client_frames() {
        let mut bytes = encode_client_frame(&frame).expect("encodes");
        bytes.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            decode_client_frame(&bytes),
            Err(ProtocolError::TrailingBytes(3))
        );
    }
    for frame in sample_server_frames() {
        let mut bytes = encode_server_frame(&frame).expect("encodes");
        bytes.push(0xFF);
        assert_eq!(
            decode_server_frame(&bytes),
            Err(ProtocolError::TrailingBytes(1))
        );
    }
}

#[test]
fn bytes_after_the_value_inside_a_frame_are_trailing() {
    // The length prefix covers the extra bytes: postcard stops early.
    let frame = cf(Request::Ping);
    let mut payload = postcard::to_allocvec(&frame).expect("serializable");
    payload.extend_from_slice(&[1, 2, 3, 4, 5]);
    let bytes = frame_from_body(1, &payload);
    assert_eq!(
        decode_client_frame(&bytes),
        Err(ProtocolError::TrailingBytes(5))
    );
    let mut buf = FrameBuffer::new();
    buf.extend(&bytes);
    assert_eq!(
        buf.next_client_frame(),
        Err(ProtocolError::TrailingBytes(5))
    );
}

proptest! {
    #[test]
    fn any_frame_cut_anywhere_is_truncated(f in client_frame(), cut in any::<prop::sample::Index>()) {
        let bytes = encode_client_frame(&f).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let cut = cut.index(bytes.len());
        let is_truncated = matches!(decode_client_frame(&bytes[..cut]), Err(ProtocolError::Truncated { .. }));
        prop_assert!(is_truncated);
        let body_cut = cut.min(bytes.len() - 5) + 4;
        let is_truncated = matches!(decode_client_body(&bytes[4..body_cut]), Err(ProtocolError::Truncated { .. }));
        prop_assert!(is_truncated);
    }

    #[test]
    fn any_server_frame_with_trailing_bytes_is_refused(f in server_frame(), extra in vec(any::<u8>(), 1..40)) {
        let mut bytes = encode_server_frame(&f).map_err(|e| TestCaseError::fail(e.to_string()))?;
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode_server_frame(&bytes), Err(ProtocolError::TrailingBytes(extra.len())));
    }
}

// ---- length prefix ---------------------------------------------------------------------

#[test]
fn frame_buffer_refuses_an_oversized_length_as_soon_as_it_arrives() {
    for declared in [MAX_FRAME_LEN as u32 + 1, 16 * 1024 * 1024, u32::MAX] {
        let prefix = declared.to_be_bytes();
        let mut buf = FrameBuffer::new();
        for (i, b) in prefix[..3].iter().enumerate() {
            buf.extend(&[*b]);
            assert_eq!(buf.next_body(), Ok(None));
            assert_eq!(buf.wanted(), Ok(3 - i));
        }
        buf.extend(&prefix[3..]);
        let expected = ("frame", declared as usize, MAX_FRAME_LEN);
        assert_eq!(too_large_what(buf.next_body()), expected);
        assert_eq!(too_large_what(buf.wanted()), expected);
        assert_eq!(too_large_what(buf.next_client_frame()), expected);
        assert_eq!(too_large_what(buf.next_server_frame()), expected);
        // Nothing of the body was needed to decide, and nothing more is held.
        assert_eq!(buf.buffered(), 4);
        // The whole-frame decoders agree, however little of the body is present.
        assert_eq!(too_large_what(decode_client_frame(&prefix)), expected);
        assert_eq!(
            too_large_what(decode_server_frame(&[&prefix[..], &[1, 2, 3]].concat())),
            expected
        );
    }
}

#[test]
fn frame_buffer_accepts_a_length_of_exactly_the_maximum() {
    let mut buf = FrameBuffer::new();
    buf.extend(&(MAX_FRAME_LEN as u32).to_be_bytes());
    assert_eq!(buf.next_body(), Ok(None));
    assert_eq!(buf.wanted(), Ok(MAX_FRAME_LEN));
}

#[test]
fn zero_length_frames_are_malformed() {
    let mut buf = FrameBuffer::new();
    buf.extend(&[0, 0, 0, 0]);
    assert_eq!(
        buf.next_body(),
        Err(ProtocolError::Malformed("empty frame"))
    );
    assert_eq!(buf.wanted(), Err(ProtocolError::Malformed("empty frame")));
    assert_eq!(
        decode_client_frame(&[0, 0, 0, 0]),
        Err(ProtocolError::Malformed("empty frame"))
    );
    assert_eq!(
        decode_server_frame(&[0, 0, 0, 0]),
        Err(ProtocolError::Malformed("empty frame"))
    );
    assert_eq!(
        decode_client_body(&[]),
        Err(ProtocolError::Truncated { needed: 1 })
    );
}

#[test]
fn encoding_a_frame_larger_than_the_maximum_is_refused() {
    // 100 full-size envelopes pass the page count limit but not the frame size.
    let big = sample_envelope(
        MAX_RATCHET_HEADER_LEN,
        MAX_ENVELOPE_LEN - FIXED_HEADER_LEN - MAX_RATCHET_HEADER_LEN,
        false,
    );
    assert_eq!(big.encoded_len(), MAX_ENVELOPE_LEN);
    let page = Page {
        envelopes: (0..100)
            .map(|seq| Delivered {
                seq,
                envelope: big.clone(),
            })
            .collect(),
        remaining: 0,
        truncated: None,
    };
    let (what, len, max) = too_large_what(encode_server_frame(&resp(Response::Page(page))));
    assert_eq!((what, max), ("frame", MAX_FRAME_LEN));
    assert!(len > MAX_FRAME_LEN);
}

#[test]
fn a_full_batch_of_full_envelopes_fits_in_a_frame() {
    let big = sample_envelope(0, MAX_ENVELOPE_LEN - FIXED_HEADER_LEN, false);
    let frame = cf(Request::Send {
        envelopes: vec![big; MAX_BATCH],
    });
    let bytes = encode_client_frame(&frame).expect("a full batch must be encodable");
    assert!(bytes.len() - 4 <= MAX_FRAME_LEN);
    assert_eq!(decode_client_frame(&bytes), Ok(frame));
}

// ---- versions --------------------------------------------------------------------------

#[test]
fn frames_with_another_version_are_unsupported() {
    for version in [0u8, 2, 0x7F, 0xFF] {
        let client = raw_frame(version, &cf(Request::Ping));
        assert_eq!(
            decode_client_frame(&client),
            Err(ProtocolError::UnsupportedVersion(version))
        );
        let mut buf = FrameBuffer::new();
        buf.extend(&client);
        assert_eq!(
            buf.next_client_frame(),
            Err(ProtocolError::UnsupportedVersion(version))
        );
        let server = raw_frame(version, &ServerFrame::error(0, ErrorCode::Internal, "x"));
        assert_eq!(
            decode_server_frame(&server),
            Err(ProtocolError::UnsupportedVersion(version))
        );
        // Even an undecodable body reports the version first.
        let junk = frame_from_body(version, &[0xFF; 8]);
        assert_eq!(
            decode_client_frame(&junk),
            Err(ProtocolError::UnsupportedVersion(version))
        );
    }
}

#[test]
fn envelope_headers_with_another_version_are_unsupported() {
    let good = sample_envelope(40, 32, true).to_bytes().expect("encodes");
    assert_eq!(good[0], ENVELOPE_VERSION);
    for version in [0u8, 2, 0xFF] {
        let mut bad = good.clone();
        bad[0] = version;
        assert_eq!(
            EnvelopeHeader::parse(&bad),
            Err(ProtocolError::UnsupportedVersion(version))
        );
        assert_eq!(
            Envelope::from_bytes(&bad),
            Err(ProtocolError::UnsupportedVersion(version))
        );
    }
}

// ---- envelope rules --------------------------------------------------------------------

#[test]
fn unknown_envelope_flags_are_malformed() {
    for init in [false, true] {
        let good = sample_envelope(8, 16, init).to_bytes().expect("encodes");
        // Bit 0 is session-init, bit 1 the important retention class.
        for bit in 2..8 {
            let mut bad = good.clone();
            bad[1] |= 1 << bit;
            assert_eq!(
                Envelope::from_bytes(&bad),
                Err(ProtocolError::Malformed("envelope flags")),
                "bit {bit}"
            );
        }
    }
}

#[test]
fn session_init_flag_without_its_bytes_is_truncated() {
    // Setting the flag on a header without the 72 bytes consumes the ciphertext
    // as session-init fields; too little left is a truncation.
    let mut bytes = sample_envelope(0, 16, false).to_bytes().expect("encodes");
    bytes[1] = FLAG_SESSION_INIT;
    assert!(matches!(
        Envelope::from_bytes(&bytes),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn ratchet_header_over_the_limit_is_refused_both_ways() {
    let mut e = sample_envelope(MAX_RATCHET_HEADER_LEN + 1, 16, false);
    let expected = Err(ProtocolError::TooLarge {
        what: "ratchet header",
        len: MAX_RATCHET_HEADER_LEN + 1,
        max: MAX_RATCHET_HEADER_LEN,
    });
    assert_eq!(e.header.to_bytes(), expected.clone());
    assert_eq!(e.to_bytes(), expected.clone());
    assert_eq!(e.associated_data(), expected);
    e.header.ratchet.pop();
    let good = e.to_bytes().expect("96 bytes is allowed");
    // Decoding: the length byte alone decides, for every value above the limit.
    for len_byte in (MAX_RATCHET_HEADER_LEN as u8 + 1)..=u8::MAX {
        let mut bad = good.clone();
        bad[FIXED_HEADER_LEN - 1] = len_byte;
        assert_eq!(
            Envelope::from_bytes(&bad),
            Err(ProtocolError::TooLarge {
                what: "ratchet header",
                len: usize::from(len_byte),
                max: MAX_RATCHET_HEADER_LEN
            })
        );
    }
}

#[test]
fn envelope_size_limit_holds_on_encode_and_decode() {
    let exact = sample_envelope(40, MAX_ENVELOPE_LEN - FIXED_HEADER_LEN - 40, true);
    let exact = Envelope {
        ciphertext: vec![0xCC; MAX_ENVELOPE_LEN - exact.header.encoded_len()],
        ..exact
    };
    let bytes = exact.to_bytes().expect("exactly the limit encodes");
    assert_eq!(bytes.len(), MAX_ENVELOPE_LEN);
    assert_eq!(Envelope::from_bytes(&bytes), Ok(exact.clone()));

    let mut over = exact;
    over.ciphertext.push(0);
    assert_eq!(
        over.to_bytes(),
        Err(ProtocolError::TooLarge {
            what: "envelope",
            len: MAX_ENVELOPE_LEN + 1,
            max: MAX_ENVELOPE_LEN
        })
    );
    let mut over_bytes = bytes;
    over_bytes.push(0);
    assert_eq!(
        Envelope::from_bytes(&over_bytes),
        Err(ProtocolError::TooLarge {
            what: "envelope",
            len: MAX_ENVELOPE_LEN + 1,
            max: MAX_ENVELOPE_LEN
        })
    );
    // The size check comes first: oversized garbage is TooLarge, not a version error.
    assert!(matches!(
        Envelope::from_bytes(&vec![0xFF; MAX_ENVELOPE_LEN + 1]),
        Err(ProtocolError::TooLarge {
            what: "envelope",
            ..
        })
    ));
}

#[test]
fn ciphertext_shorter_than_a_tag_is_refused() {
    for ct_len in 0..MIN_CIPHERTEXT_LEN {
        let e = sample_envelope(4, ct_len, false);
        assert_eq!(
            e.to_bytes(),
            Err(ProtocolError::Malformed("ciphertext shorter than a tag"))
        );
        let mut bytes = e.header.to_bytes().expect("header encodes");
        bytes.extend_from_slice(&e.ciphertext);
        assert_eq!(
            Envelope::from_bytes(&bytes),
            Err(ProtocolError::Truncated {
                needed: MIN_CIPHERTEXT_LEN - ct_len
            })
        );
    }
    assert!(
        sample_envelope(4, MIN_CIPHERTEXT_LEN, false)
            .to_bytes()
            .is_ok()
    );
}

#[test]
fn envelope_header_cut_at_every_point_is_truncated() {
    for init in [false, true] {
        let h = sample_envelope(40, 16, init).header;
        let bytes = h.to_bytes().expect("encodes");
        for cut in 0..bytes.len() {
            assert!(
                matches!(
                    EnvelopeHeader::parse(&bytes[..cut]),
                    Err(ProtocolError::Truncated { .. })
                ),
                "cut {cut}"
            );
            assert!(
                matches!(
                    Envelope::from_bytes(&bytes[..cut]),
                    Err(ProtocolError::Truncated { .. })
                ),
                "cut {cut}"
            );
        }
    }
}

#[test]
fn reserved_one_time_prekey_id_cannot_be_encoded_or_published() {
    let mut e = sample_envelope(4, 16, true);
    if let Some(init) = &mut e.header.session_init {
        init.one_time_prekey_id = Some(NO_ONE_TIME_PREKEY);
    }
    let reserved: Result<(), _> = Err(ProtocolError::Malformed("reserved one-time prekey id"));
    assert_eq!(e.header.to_bytes().map(|_| ()), reserved.clone());
    assert_eq!(e.to_bytes().map(|_| ()), reserved.clone());
    assert_eq!(
        encode_client_frame(&cf(Request::Send { envelopes: vec![e] })).map(|_| ()),
        reserved.clone()
    );
    let publish = cf(Request::PublishPrekeys {
        signed_prekey: SignedPrekey {
            id: 1,
            public: [0; 32],
            signature: [0; 64],
        },
        one_time_prekeys: vec![OneTimePrekey {
            id: NO_ONE_TIME_PREKEY,
            public: [1; 32],
        }],
    });
    assert_eq!(encode_client_frame(&publish).map(|_| ()), reserved.clone());
    assert_eq!(
        decode_client_frame(&raw_frame(1, &publish)).map(|_| ()),
        reserved
    );
}

#[test]
fn invalid_envelopes_in_a_batch_are_reported_with_their_own_error() {
    let mut big = sample_envelope(0, MAX_ENVELOPE_LEN - FIXED_HEADER_LEN + 1, false);
    let frame = cf(Request::Send {
        envelopes: vec![sample_envelope(0, 16, false), big.clone()],
    });
    assert_eq!(
        too_large_what(encode_client_frame(&frame)),
        ("envelope", MAX_ENVELOPE_LEN + 1, MAX_ENVELOPE_LEN)
    );
    big.ciphertext.truncate(3);
    let frame = cf(Request::Send {
        envelopes: vec![big],
    });
    assert_eq!(
        encode_client_frame(&frame),
        Err(ProtocolError::Malformed("ciphertext shorter than a tag"))
    );
}

#[test]
fn an_invalid_envelope_inside_a_received_frame_makes_the_frame_bad() {
    // Hand-build `Send { [bytes] }` where the bytes are a version-2 envelope.
    let mut env = sample_envelope(0, 16, false).to_bytes().expect("encodes");
    env[0] = 2;
    let mut payload = vec![1, 3, 1]; // request_id 1, variant Send, one envelope
    payload.push(env.len() as u8);
    payload.extend_from_slice(&env);
    let r = decode_client_frame(&frame_from_body(1, &payload));
    assert_eq!(r, Err(ProtocolError::Malformed("frame body")));
    assert_eq!(r.map(|_| ()).unwrap_err().code(), ErrorCode::BadFrame);
}

// ---- count limits ----------------------------------------------------------------------

#[test]
fn send_batch_over_the_limit_is_refused_both_ways() {
    let envelopes = vec![sample_envelope(0, 16, false); MAX_BATCH + 1];
    let frame = cf(Request::Send { envelopes });
    let expected: Result<(), _> = Err(ProtocolError::TooLarge {
        what: "send batch",
        len: MAX_BATCH + 1,
        max: MAX_BATCH,
    });
    assert_eq!(encode_client_frame(&frame).map(|_| ()), expected.clone());
    assert_eq!(
        decode_client_frame(&raw_frame(1, &frame)).map(|_| ()),
        expected
    );
    let mut at_limit = frame;
    if let Request::Send { envelopes } = &mut at_limit.request {
        envelopes.pop();
    }
    let bytes = encode_client_frame(&at_limit).expect("a full batch is allowed");
    assert_eq!(decode_client_frame(&bytes), Ok(at_limit));
}

#[test]
fn pull_limit_over_the_page_size_is_refused_both_ways() {
    for limit in [MAX_PAGE + 1, 5000, u16::MAX] {
        let frame = cf(Request::Pull {
            after: 0,
            limit,
            ack: 0,
        });
        let expected = ("page limit", usize::from(limit), usize::from(MAX_PAGE));
        assert_eq!(too_large_what(encode_client_frame(&frame)), expected);
        assert_eq!(
            too_large_what(decode_client_frame(&raw_frame(1, &frame))),
            expected
        );
    }
    for limit in [0, 1, MAX_PAGE] {
        let frame = cf(Request::Pull {
            after: 0,
            limit,
            ack: 0,
        });
        let bytes = encode_client_frame(&frame).expect("within the limit");
        assert_eq!(decode_client_frame(&bytes), Ok(frame));
    }
}

#[test]
fn blob_chunks_over_the_limit_are_refused_both_ways() {
    let blob = BlobId([7; 16]);
    let put = |n: usize| {
        cf(Request::BlobPut {
            blob,
            offset: 0,
            total_len: 4 * MAX_BLOB_CHUNK as u64,
            bytes: vec![1; n],
        })
    };
    let expected = ("blob chunk", MAX_BLOB_CHUNK + 1, MAX_BLOB_CHUNK);
    assert_eq!(
        too_large_what(encode_client_frame(&put(MAX_BLOB_CHUNK + 1))),
        expected
    );
    assert_eq!(
        too_large_what(decode_client_frame(&raw_frame(1, &put(MAX_BLOB_CHUNK + 1)))),
        expected
    );
    let ok = encode_client_frame(&put(MAX_BLOB_CHUNK)).expect("a full chunk is allowed");
    assert_eq!(decode_client_frame(&ok), Ok(put(MAX_BLOB_CHUNK)));

    let get = |max: u32| {
        cf(Request::BlobGet {
            blob,
            offset: 0,
            max,
        })
    };
    let over = MAX_BLOB_CHUNK as u32 + 1;
    assert_eq!(
        too_large_what(decode_client_frame(&raw_frame(1, &get(over)))),
        ("blob read", over as usize, MAX_BLOB_CHUNK)
    );
    assert!(encode_client_frame(&get(MAX_BLOB_CHUNK as u32)).is_ok());

    let chunk = |n: usize| {
        resp(Response::BlobChunk {
            blob,
            offset: 0,
            total_len: 9,
            committed: 9,
            bytes: vec![2; n],
        })
    };
    assert_eq!(
        too_large_what(decode_server_frame(&raw_frame(
            1,
            &chunk(MAX_BLOB_CHUNK + 1)
        ))),
        ("blob chunk", MAX_BLOB_CHUNK + 1, MAX_BLOB_CHUNK)
    );
    assert!(encode_server_frame(&chunk(MAX_BLOB_CHUNK)).is_ok());
}

#[test]
fn blob_puts_past_their_declared_size_are_malformed() {
    let put = |offset: u64, total_len: u64, n: usize| {
        cf(Request::BlobPut {
            blob: BlobId([7; 16]),
            offset,
            total_len,
            bytes: vec![1; n],
        })
    };
    for (offset, total, n, what) in [
        (0, 0, 0, "empty blob"),
        (0, 3, 4, "blob chunk past total_len"),
        (8, 10, 3, "blob chunk past total_len"),
        (u64::MAX, u64::MAX, 1, "blob chunk past total_len"),
    ] {
        let f = put(offset, total, n);
        assert_eq!(
            encode_client_frame(&f),
            Err(ProtocolError::Malformed(what)),
            "{offset} {total} {n}"
        );
        assert_eq!(
            decode_client_frame(&raw_frame(1, &f)),
            Err(ProtocolError::Malformed(what))
        );
    }
    let f = put(8, 10, 2);
    assert_eq!(
        decode_client_frame(&encode_client_frame(&f).unwrap()),
        Ok(f)
    );
}

#[test]
fn too_many_one_time_prekeys_are_refused_both_ways() {
    let keys = |n: usize| {
        (0..n)
            .map(|i| OneTimePrekey {
                id: i as u32,
                public: [i as u8; 32],
            })
            .collect::<Vec<_>>()
    };
    let frame = |n| {
        cf(Request::PublishPrekeys {
            signed_prekey: SignedPrekey {
                id: 1,
                public: [0; 32],
                signature: [0; 64],
            },
            one_time_prekeys: keys(n),
        })
    };
    let over = frame(MAX_ONE_TIME_PREKEYS + 1);
    let expected = (
        "one-time prekeys",
        MAX_ONE_TIME_PREKEYS + 1,
        MAX_ONE_TIME_PREKEYS,
    );
    assert_eq!(too_large_what(encode_client_frame(&over)), expected);
    assert_eq!(
        too_large_what(decode_client_frame(&raw_frame(1, &over))),
        expected
    );
    let ok = frame(MAX_ONE_TIME_PREKEYS);
    assert_eq!(
        decode_client_frame(&encode_client_frame(&ok).expect("at limit")),
        Ok(ok)
    );
}

fn device_list(n: usize) -> SignedDeviceList {
    SignedDeviceList {
        list: DeviceList {
            user: UserKey([7; 32]),
            version: 1,
            devices: (0..n)
                .map(|i| DeviceEntry {
                    device: DeviceId([i as u8; 16]),
                    signing_key: [1; 32],
                    agreement_key: [2; 32],
                    membership_signature: [4; 64],
                })
                .collect(),
        },
        signature: [3; 64],
    }
}

#[test]
fn oversized_device_lists_are_refused_both_ways_in_both_directions() {
    let expected = (
        "device list",
        MAX_DEVICES_PER_USER + 1,
        MAX_DEVICES_PER_USER,
    );
    let publish = cf(Request::PublishDeviceList {
        list: device_list(MAX_DEVICES_PER_USER + 1),
    });
    assert_eq!(too_large_what(encode_client_frame(&publish)), expected);
    assert_eq!(
        too_large_what(decode_client_frame(&raw_frame(1, &publish))),
        expected
    );
    let fetched = resp(Response::DeviceList(device_list(MAX_DEVICES_PER_USER + 1)));
    assert_eq!(too_large_what(encode_server_frame(&fetched)), expected);
    assert_eq!(
        too_large_what(decode_server_frame(&raw_frame(1, &fetched))),
        expected
    );
    let ok = resp(Response::DeviceList(device_list(MAX_DEVICES_PER_USER)));
    assert_eq!(
        decode_server_frame(&encode_server_frame(&ok).expect("at limit")),
        Ok(ok)
    );
}

fn delivered(n: usize) -> Vec<Delivered> {
    (0..n)
        .map(|i| Delivered {
            seq: i as u64 + 1,
            envelope: sample_envelope(0, 16, false),
        })
        .collect()
}

#[test]
fn oversized_pages_and_pushes_are_refused_both_ways() {
    let over = usize::from(MAX_PAGE) + 1;
    let page = resp(Response::Page(Page {
        envelopes: delivered(over),
        remaining: 0,
        truncated: None,
    }));
    let expected = ("page", over, usize::from(MAX_PAGE));
    assert_eq!(too_large_what(encode_server_frame(&page)), expected);
    assert_eq!(
        too_large_what(decode_server_frame(&raw_frame(1, &page))),
        expected
    );

    let push = ServerFrame::Push {
        envelopes: delivered(over),
    };
    let expected = ("push", over, usize::from(MAX_PAGE));
    assert_eq!(too_large_what(encode_server_frame(&push)), expected);
    assert_eq!(
        too_large_what(decode_server_frame(&raw_frame(1, &push))),
        expected
    );

    let full = ServerFrame::Push {
        envelopes: delivered(usize::from(MAX_PAGE)),
    };
    assert_eq!(
        decode_server_frame(&encode_server_frame(&full).expect("at limit")),
        Ok(full)
    );
}

#[test]
fn too_many_dropped_ranges_are_refused_both_ways() {
    let range = DroppedRange {
        sender: DeviceId([1; 16]),
        conversation: hush_protocol::ConversationId([2; 16]),
        first_seq: 1,
        last_seq: 2,
    };
    let page = |n| {
        resp(Response::Page(Page {
            envelopes: Vec::new(),
            remaining: 0,
            truncated: Some(Truncation {
                oldest_retained: 10,
                dropped_count: n as u64,
                dropped: vec![range.clone(); n],
            }),
        }))
    };
    let expected = ("dropped ranges", MAX_DROPPED_RANGES + 1, MAX_DROPPED_RANGES);
    let over = page(MAX_DROPPED_RANGES + 1);
    assert_eq!(too_large_what(encode_server_frame(&over)), expected);
    assert_eq!(
        too_large_what(decode_server_frame(&raw_frame(1, &over))),
        expected
    );
    let ok = page(MAX_DROPPED_RANGES);
    assert_eq!(
        decode_server_frame(&encode_server_frame(&ok).expect("at limit")),
        Ok(ok)
    );
}

#[test]
fn too_many_send_outcomes_are_refused_both_ways() {
    let outcome = SendOutcome::Stored {
        message_id: hush_protocol::MessageId([1; 16]),
        recipient: DeviceId([2; 16]),
        seq: 3,
        duplicate: false,
    };
    let sent = resp(Response::Sent {
        outcomes: vec![outcome; MAX_BATCH + 1],
    });
    let expected = ("send outcomes", MAX_BATCH + 1, MAX_BATCH);
    assert_eq!(too_large_what(encode_server_frame(&sent)), expected);
    assert_eq!(
        too_large_what(decode_server_frame(&raw_frame(1, &sent))),
        expected
    );
}

#[test]
fn texts_over_the_limit_are_refused_wherever_they_appear() {
    let long = "é".repeat(MAX_TEXT_LEN / 2 + 1); // 258 bytes
    let error = WireError {
        code: ErrorCode::Quota,
        message: long.clone(),
        retry_after_ms: None,
    };
    let frames = [
        ServerFrame::Error {
            request_id: 1,
            error: error.clone(),
        },
        ServerFrame::Closing {
            code: ErrorCode::ShuttingDown,
            reason: long.clone(),
        },
        resp(Response::Sent {
            outcomes: vec![SendOutcome::Refused {
                message_id: hush_protocol::MessageId([1; 16]),
                recipient: DeviceId([2; 16]),
                error,
            }],
        }),
    ];
    for frame in frames {
        let expected = ("text", long.len(), MAX_TEXT_LEN);
        assert_eq!(
            too_large_what(encode_server_frame(&frame)),
            expected,
            "{frame:?}"
        );
        assert_eq!(
            too_large_what(decode_server_frame(&raw_frame(1, &frame))),
            expected
        );
    }
    // The constructors cut on a char boundary instead.
    let cut = ServerFrame::error(1, ErrorCode::Quota, long.clone());
    match &cut {
        ServerFrame::Error { error, .. } => assert_eq!(error.message.len(), MAX_TEXT_LEN),
        other => panic!("unexpected {other:?}"),
    }
    let cut = ServerFrame::closing(ErrorCode::Quota, format!("x{long}"));
    match &cut {
        ServerFrame::Closing { reason, .. } => assert_eq!(reason.len(), MAX_TEXT_LEN - 1),
        other => panic!("unexpected {other:?}"),
    }
}

// ---- malformed postcard ----------------------------------------------------------------

#[test]
fn malformed_bodies_are_malformed() {
    let malformed: Result<(), _> = Err(ProtocolError::Malformed("frame body"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown request variant", vec![7, 60]),
        (
            "huge request variant",
            vec![7, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F],
        ),
        ("variant above u32", vec![7, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F]),
        (
            "overlong request id",
            vec![0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 10],
        ),
        (
            "signature of 63 bytes",
            [vec![7, 1, 63], vec![0; 63]].concat(),
        ),
        (
            "signature of 65 bytes",
            [vec![7, 1, 65], vec![0; 65]].concat(),
        ),
        (
            "u16 limit above 16 bits",
            vec![7, 4, 0, 0xFF, 0xFF, 0x04, 0],
        ),
    ];
    for (what, payload) in cases {
        assert_eq!(
            decode_client_frame(&frame_from_body(1, &payload)).map(|_| ()),
            malformed,
            "{what}"
        );
    }
    let server_cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown server frame variant", vec![60]),
        ("unknown response variant", vec![0, 1, 60]),
        ("unknown error code", vec![1, 0, 60, 0, 0]),
        ("bad option tag", vec![1, 0, 0, 0, 2]),
        ("invalid UTF-8", vec![3, 0, 2, 0xC3, 0x28]),
        (
            "bad bool",
            [vec![0, 0, 2, 1, 0], vec![1; 32], vec![9], vec![2]].concat(),
        ),
    ];
    for (what, payload) in server_cases {
        assert_eq!(
            decode_server_frame(&frame_from_body(1, &payload)).map(|_| ()),
            malformed,
            "{what}"
        );
    }
}

// ---- error code mapping ----------------------------------------------------------------

#[test]
fn protocol_errors_map_to_wire_codes() {
    let cases = [
        (ProtocolError::Truncated { needed: 3 }, ErrorCode::BadFrame),
        (
            ProtocolError::TooLarge {
                what: "frame",
                len: 9,
                max: 8,
            },
            ErrorCode::TooLarge,
        ),
        (
            ProtocolError::UnsupportedVersion(2),
            ErrorCode::UnsupportedVersion,
        ),
        (ProtocolError::Malformed("frame body"), ErrorCode::BadFrame),
        (ProtocolError::TrailingBytes(1), ErrorCode::BadFrame),
    ];
    for (err, code) in cases {
        assert_eq!(err.code(), code, "{err}");
    }
    // And on real failures, end to end.
    let mut buf = FrameBuffer::new();
    buf.extend(&u32::MAX.to_be_bytes());
    assert_eq!(
        buf.next_body().map(|_| ()).unwrap_err().code(),
        ErrorCode::TooLarge
    );
    let v2 = raw_frame(2, &cf(Request::Ping));
    assert_eq!(
        decode_client_frame(&v2).unwrap_err().code(),
        ErrorCode::UnsupportedVersion
    );
}

/// The body of a `DeviceList` answer with one entry whose membership proof is
/// written as `proof` (the bytes after the entry's agreement key).
fn one_entry_list_body(proof: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8, 1, 8]; // Response, request_id 1, DeviceList
    body.extend_from_slice(&[7; 32]); // user
    body.push(1); // version
    body.push(1); // one device
    body.extend_from_slice(&[1; 16]);
    body.extend_from_slice(&[2; 32]);
    body.extend_from_slice(&[3; 32]);
    body.extend_from_slice(proof);
    body.push(0x40);
    body.extend_from_slice(&[5; 64]); // the list signature
    body
}

#[test]
fn device_list_entries_without_a_64_byte_membership_proof_are_refused() {
    let mut good = vec![0x40];
    good.extend_from_slice(&[4; 64]);
    let decoded = decode_server_frame(&frame_from_body(1, &one_entry_list_body(&good)))
        .expect("a well-formed entry decodes");
    match decoded {
        ServerFrame::Response {
            response: Response::DeviceList(l),
            ..
        } => assert_eq!(l.list.devices[0].membership_signature, [4; 64]),
        other => panic!("{other:?}"),
    }
    // The entry layout before membership proofs (no proof at all): the list
    // signature is read as the proof and the frame then ends early.
    assert_eq!(
        decode_server_frame(&frame_from_body(1, &one_entry_list_body(&[]))),
        Err(ProtocolError::Truncated { needed: 1 })
    );
    // A proof of any length but 64 is malformed.
    for len in [0usize, 63, 65] {
        let mut proof = vec![len as u8];
        proof.extend(std::iter::repeat_n(4u8, len));
        assert_eq!(
            decode_server_frame(&frame_from_body(1, &one_entry_list_body(&proof))),
            Err(ProtocolError::Malformed("frame body")),
            "proof of {len} bytes"
        );
    }
}
