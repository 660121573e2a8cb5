//! Known-bytes vectors. Each expected hex string here also appears in
//! `docs/PROTOCOL.md` (checked below), so the specification and the code
//! cannot drift apart: changing either without the other fails this file.
// Test code: a failed expectation should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::ALL_ERROR_CODES;
use hush_protocol::limits::*;
use hush_protocol::{
    AuthOk, BlobId, ClientFrame, ConversationId, Delivered, DeviceEntry, DeviceId, DeviceList,
    DeviceRegistration, Envelope, EnvelopeHeader, ErrorCode, MessageId, OneTimePrekey, Page,
    PrekeyBundle, Request, Response, SendOutcome, ServerFrame, SessionInitHeader, SignedDeviceList,
    SignedPrekey, UserKey, WireError, auth_challenge_bytes, decode_client_frame,
    decode_server_frame, encode_client_frame, encode_server_frame,
};

const DOC: &str = include_str!("../../docs/PROTOCOL.md");

/// The document with all whitespace removed, so hex may be wrapped and tables
/// padded freely.
fn compact(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

fn assert_in_doc(needle: &str) {
    assert!(
        compact(DOC).contains(&compact(needle)),
        "docs/PROTOCOL.md does not contain {needle:?}"
    );
}

/// The worked-example header of the specification.
fn example_header(session_init: bool) -> EnvelopeHeader {
    EnvelopeHeader {
        message_id: MessageId::new(1_700_000_000_000, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        sender_device: DeviceId([0x11; 16]),
        recipient_device: DeviceId([0x22; 16]),
        conversation_id: ConversationId([0x33; 16]),
        sender_seq: 7,
        sent_at_ms: 1_700_000_000_123,
        ratchet: vec![0xA0, 0xA1, 0xA2, 0xA3],
        session_init: session_init.then_some(SessionInitHeader {
            initiator_identity: [0x44; 32],
            ephemeral: [0x55; 32],
            signed_prekey_id: 3,
            one_time_prekey_id: None,
        }),
        important: false,
    }
}

const HEADER_PLAIN: &str = "0100018bcfe568000102030405060708090a\
    11111111111111111111111111111111\
    22222222222222222222222222222222\
    33333333333333333333333333333333\
    0000000000000007\
    0000018bcfe5687b\
    04a0a1a2a3";

const HEADER_SESSION_INIT: &str = "0101018bcfe568000102030405060708090a\
    11111111111111111111111111111111\
    22222222222222222222222222222222\
    33333333333333333333333333333333\
    0000000000000007\
    0000018bcfe5687b\
    04a0a1a2a3\
    4444444444444444444444444444444444444444444444444444444444444444\
    5555555555555555555555555555555555555555555555555555555555555555\
    00000003ffffffff";

const HEADER_IMPORTANT: &str = "0102018bcfe568000102030405060708090a\
    11111111111111111111111111111111\
    22222222222222222222222222222222\
    33333333333333333333333333333333\
    0000000000000007\
    0000018bcfe5687b\
    04a0a1a2a3";

const PULL_FRAME: &str = "00000007 01 07 04 05 c801 05";

const SEND_FRAME: &str = "0000006c 01 02 03 01 67\
    0100018bcfe568000102030405060708090a\
    11111111111111111111111111111111\
    22222222222222222222222222222222\
    33333333333333333333333333333333\
    0000000000000007\
    0000018bcfe5687b\
    04a0a1a2a3\
    cccccccccccccccccccccccccccccccc";

const ERROR_FRAME: &str = "00000011 01 01 03 04 09 736c6f7720646f776e 01 dc0b";

const PREKEYS_LOW_FRAME: &str = "00000003 01 04 14";

const AUTH_FRAME: &str = "00000044 01 01 01 40\
    5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a\
    5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn hex_of(vector: &str) -> Vec<u8> {
    hex::decode(compact(vector)).expect("test vector is hex")
}

#[test]
fn envelope_header_golden_vector() {
    let h = example_header(false);
    assert_eq!(hex::encode(h.to_bytes().unwrap()), compact(HEADER_PLAIN));
    assert_eq!(
        EnvelopeHeader::parse(&hex_of(HEADER_PLAIN)),
        Ok((h, hex_of(HEADER_PLAIN).len()))
    );
    assert_in_doc(HEADER_PLAIN);
}

#[test]
fn envelope_header_with_session_init_golden_vector() {
    let h = example_header(true);
    assert_eq!(
        hex::encode(h.to_bytes().unwrap()),
        compact(HEADER_SESSION_INIT)
    );
    assert_eq!(
        EnvelopeHeader::parse(&hex_of(HEADER_SESSION_INIT)).map(|(h, _)| h),
        Ok(h)
    );
    assert_in_doc(HEADER_SESSION_INIT);
}

#[test]
fn envelope_header_important_golden_vector() {
    let mut h = example_header(false);
    h.important = true;
    assert_eq!(
        hex::encode(h.to_bytes().unwrap()),
        compact(HEADER_IMPORTANT)
    );
    assert_eq!(
        EnvelopeHeader::parse(&hex_of(HEADER_IMPORTANT)),
        Ok((h, hex_of(HEADER_IMPORTANT).len()))
    );
    assert_in_doc(HEADER_IMPORTANT);
}

#[test]
fn envelope_header_offsets_match_the_table() {
    // The byte table of the specification: (offset, length, field).
    let table: [(usize, usize, &str); 9] = [
        (0, 1, "version"),
        (1, 1, "flags"),
        (2, 16, "message_id"),
        (18, 16, "sender_device"),
        (34, 16, "recipient_device"),
        (50, 16, "conversation_id"),
        (66, 8, "sender_seq"),
        (74, 8, "sent_at_ms"),
        (82, 1, "ratchet_len"),
    ];
    let h = example_header(false);
    let b = h.to_bytes().unwrap();
    let field = |off: usize, len: usize| &b[off..off + len];
    assert_eq!(field(0, 1), [1]);
    assert_eq!(field(1, 1), [0]);
    assert_eq!(field(2, 16), h.message_id.as_bytes());
    assert_eq!(field(18, 16), h.sender_device.as_bytes());
    assert_eq!(field(34, 16), h.recipient_device.as_bytes());
    assert_eq!(field(50, 16), h.conversation_id.as_bytes());
    assert_eq!(field(66, 8), h.sender_seq.to_be_bytes());
    assert_eq!(field(74, 8), h.sent_at_ms.to_be_bytes());
    assert_eq!(field(82, 1), [4]);
    assert_eq!(&b[83..], &h.ratchet[..]);
    assert_eq!(hush_protocol::envelope::FIXED_HEADER_LEN, 83);
    assert_eq!(hush_protocol::envelope::SESSION_INIT_LEN, 72);
    for (off, len, name) in table {
        assert_in_doc(&format!("| {off} | {len} | `{name}` |"));
    }
}

#[test]
fn message_id_layout_golden_vector() {
    let id = MessageId::new(1_700_000_000_000, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert_eq!(id.to_hex(), "018bcfe568000102030405060708090a");
    assert_eq!(id.timestamp_ms(), 1_700_000_000_000);
    assert_in_doc("018bcfe568000102030405060708090a");
}

const BLOB_PUT_FRAME: &str =
    "0000001b 01 09 0b b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1 00 ac02 04 eeeeeeee";

#[test]
fn blob_put_frame_golden_vector() {
    let frame = ClientFrame {
        request_id: 9,
        request: Request::BlobPut {
            blob: BlobId([0xb1; 16]),
            offset: 0,
            total_len: 300,
            bytes: vec![0xee; 4],
        },
    };
    assert_eq!(
        hex::encode(encode_client_frame(&frame).unwrap()),
        compact(BLOB_PUT_FRAME)
    );
    assert_eq!(decode_client_frame(&hex_of(BLOB_PUT_FRAME)), Ok(frame));
    assert_in_doc(BLOB_PUT_FRAME);
}

#[test]
fn pull_frame_golden_vector() {
    let frame = ClientFrame {
        request_id: 7,
        request: Request::Pull {
            after: 5,
            limit: 200,
            ack: 5,
        },
    };
    assert_eq!(
        hex::encode(encode_client_frame(&frame).unwrap()),
        compact(PULL_FRAME)
    );
    assert_eq!(decode_client_frame(&hex_of(PULL_FRAME)), Ok(frame));
    assert_in_doc(PULL_FRAME);
}

#[test]
fn send_frame_golden_vector() {
    let frame = ClientFrame {
        request_id: 2,
        request: Request::Send {
            envelopes: vec![Envelope {
                header: example_header(false),
                ciphertext: vec![0xCC; 16],
            }],
        },
    };
    assert_eq!(
        hex::encode(encode_client_frame(&frame).unwrap()),
        compact(SEND_FRAME)
    );
    assert_eq!(decode_client_frame(&hex_of(SEND_FRAME)), Ok(frame));
    assert_in_doc(SEND_FRAME);
}

#[test]
fn error_frame_golden_vector() {
    let frame = ServerFrame::Error {
        request_id: 3,
        error: WireError {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            retry_after_ms: Some(1500),
        },
    };
    assert_eq!(
        hex::encode(encode_server_frame(&frame).unwrap()),
        compact(ERROR_FRAME)
    );
    assert_eq!(decode_server_frame(&hex_of(ERROR_FRAME)), Ok(frame));
    assert_in_doc(ERROR_FRAME);
}

#[test]
fn prekeys_low_frame_golden_vector() {
    let frame = ServerFrame::PrekeysLow {
        one_time_prekeys_left: 20,
    };
    assert_eq!(
        hex::encode(encode_server_frame(&frame).unwrap()),
        compact(PREKEYS_LOW_FRAME)
    );
    assert_eq!(decode_server_frame(&hex_of(PREKEYS_LOW_FRAME)), Ok(frame));
    assert_in_doc(PREKEYS_LOW_FRAME);
}

#[test]
fn auth_frame_golden_vector() {
    let frame = ClientFrame {
        request_id: 1,
        request: Request::Auth {
            signature: [0x5A; 64],
        },
    };
    assert_eq!(
        hex::encode(encode_client_frame(&frame).unwrap()),
        compact(AUTH_FRAME)
    );
    assert_eq!(decode_client_frame(&hex_of(AUTH_FRAME)), Ok(frame));
    assert_in_doc(AUTH_FRAME);
}

#[test]
fn auth_challenge_bytes_layout() {
    let challenge: [u8; 32] = std::array::from_fn(|i| i as u8);
    let device = DeviceId([0xD0; 16]);
    let m = auth_challenge_bytes(&challenge, &device);
    assert_eq!(m.len(), 12 + 32 + 16);
    assert_eq!(&m[..12], b"hush-auth-v1");
    assert_eq!(&m[12..44], &challenge);
    assert_eq!(&m[44..], device.as_bytes());
    assert_in_doc("`hush-auth-v1`");
    // Distinct challenges give distinct signed messages.
    let mut other = challenge;
    other[31] ^= 1;
    assert_ne!(auth_challenge_bytes(&other, &device), m);
}

#[test]
fn device_certificate_bytes_layout() {
    let reg = DeviceRegistration {
        device: DeviceId([1; 16]),
        user: UserKey([2; 32]),
        signing_key: [3; 32],
        agreement_key: [4; 32],
        user_signature: [5; 64],
    };
    let m = reg.certificate_bytes();
    assert_eq!(m.len(), 19 + 16 + 32 + 32 + 32);
    assert_eq!(&m[..19], b"hush-device-cert-v1");
    assert_eq!(&m[19..35], &[1; 16]);
    assert_eq!(&m[35..67], &[2; 32]);
    assert_eq!(&m[67..99], &[3; 32]);
    assert_eq!(&m[99..], &[4; 32]);
    assert_in_doc("`hush-device-cert-v1`");
}

#[test]
fn device_list_signing_bytes_layout() {
    let list = DeviceList {
        user: UserKey([0x77; 32]),
        version: 300,
        devices: vec![
            DeviceEntry {
                device: DeviceId([1; 16]),
                signing_key: [2; 32],
                agreement_key: [3; 32],
                membership_signature: [7; 64],
            },
            DeviceEntry {
                device: DeviceId([4; 16]),
                signing_key: [5; 32],
                agreement_key: [6; 32],
                membership_signature: [8; 64],
            },
        ],
    };
    let mut expected = b"hush-device-list-v1".to_vec();
    expected.extend_from_slice(&[0x77; 32]);
    expected.extend_from_slice(&[0xAC, 0x02]); // 300 as LEB128
    expected.push(2);
    for (d, s, a, m) in [(1u8, 2u8, 3u8, 7u8), (4, 5, 6, 8)] {
        expected.extend_from_slice(&[d; 16]);
        expected.extend_from_slice(&[s; 32]);
        expected.extend_from_slice(&[a; 32]);
        expected.push(0x40); // the membership proof is a Sig64 byte string
        expected.extend_from_slice(&[m; 64]);
    }
    // 19 + 32 + 2 + 1 + 2 × 145: each entry is 145 bytes on the wire.
    assert_eq!(expected.len(), 19 + 32 + 2 + 1 + 2 * 145);
    assert_eq!(list.signing_bytes(), Ok(expected));
    assert_in_doc("`hush-device-list-v1`");
}

#[test]
fn device_membership_bytes_layout() {
    let entry = DeviceEntry {
        device: DeviceId([1; 16]),
        signing_key: [2; 32],
        agreement_key: [3; 32],
        membership_signature: [9; 64],
    };
    let m = entry.membership_bytes(&UserKey([4; 32]));
    assert_eq!(m.len(), 21 + 32 + 16 + 32 + 32);
    assert_eq!(m.len(), 133);
    assert_eq!(&m[..21], b"hush-device-member-v1");
    assert_eq!(&m[..21], hush_protocol::frame::DEVICE_MEMBERSHIP_DOMAIN);
    assert_eq!(&m[21..53], &[4; 32]);
    assert_eq!(&m[53..69], &[1; 16]);
    assert_eq!(&m[69..101], &[2; 32]);
    assert_eq!(&m[101..], &[3; 32]);
    // The proof does not sign itself: the signature field is not in the bytes.
    let mut other = entry.clone();
    other.membership_signature = [0; 64];
    assert_eq!(other.membership_bytes(&UserKey([4; 32])), m);
    // It is bound to the user: another user's bytes differ.
    assert_ne!(entry.membership_bytes(&UserKey([5; 32])), m);
    assert_eq!(
        hush_protocol::frame::membership_bytes(
            &UserKey([4; 32]),
            &entry.device,
            &entry.signing_key,
            &entry.agreement_key
        ),
        m
    );
    assert_in_doc("`hush-device-member-v1`");
}

/// A device list frame with one entry, byte for byte: the entry is its id,
/// its two keys and its membership proof as a `Sig64` (`0x40` + 64 bytes).
#[test]
fn device_list_response_with_one_entry_bytes() {
    let f = ServerFrame::Response {
        request_id: 1,
        response: Response::DeviceList(SignedDeviceList {
            list: DeviceList {
                user: UserKey([0x11; 32]),
                version: 2,
                devices: vec![DeviceEntry {
                    device: DeviceId([0x22; 16]),
                    signing_key: [0x33; 32],
                    agreement_key: [0x44; 32],
                    membership_signature: [0x55; 64],
                }],
            },
            signature: [0x66; 64],
        }),
    };
    let bytes = encode_server_frame(&f).expect("encodes");
    let mut body = vec![1u8]; // version
    body.push(0); // ServerFrame::Response
    body.push(1); // request_id
    body.push(8); // Response::DeviceList
    body.extend_from_slice(&[0x11; 32]);
    body.push(2); // version
    body.push(1); // one device
    body.extend_from_slice(&[0x22; 16]);
    body.extend_from_slice(&[0x33; 32]);
    body.extend_from_slice(&[0x44; 32]);
    body.push(0x40);
    body.extend_from_slice(&[0x55; 64]);
    body.push(0x40);
    body.extend_from_slice(&[0x66; 64]);
    let mut expected = (body.len() as u32).to_be_bytes().to_vec();
    expected.extend_from_slice(&body);
    assert_eq!(bytes, expected);
    assert_eq!(decode_server_frame(&bytes), Ok(f));
}

/// The variant index (one byte, all tables are below 128) at `offset` of an
/// encoded frame, and the variant's name from its Debug form.
fn variant_at(bytes: &[u8], offset: usize, debug: &str) -> (u8, String) {
    let name: String = debug
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (bytes[offset], name)
}

fn check_table(rows: &[(u8, String)], expected: &[&str]) {
    let names: Vec<&str> = rows.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, expected);
    for (i, (index, name)) in rows.iter().enumerate() {
        assert_eq!(
            usize::from(*index),
            i,
            "{name} is not at its declaration index"
        );
        assert_in_doc(&format!("| {index} | `{name}` |"));
    }
}

fn all_requests() -> Vec<Request> {
    vec![
        Request::Hello {
            device: DeviceId([0; 16]),
        },
        Request::Auth { signature: [0; 64] },
        Request::Register {
            registration: DeviceRegistration {
                device: DeviceId([0; 16]),
                user: UserKey([0; 32]),
                signing_key: [0; 32],
                agreement_key: [0; 32],
                user_signature: [0; 64],
            },
            signature: [0; 64],
        },
        Request::Send {
            envelopes: Vec::new(),
        },
        Request::Pull {
            after: 0,
            limit: 0,
            ack: 0,
        },
        Request::Ack { up_to: 0 },
        Request::PublishPrekeys {
            signed_prekey: SignedPrekey {
                id: 0,
                public: [0; 32],
                signature: [0; 64],
            },
            one_time_prekeys: vec![OneTimePrekey {
                id: 0,
                public: [0; 32],
            }],
        },
        Request::FetchPrekeys {
            device: DeviceId([0; 16]),
        },
        Request::PublishDeviceList {
            list: SignedDeviceList {
                list: DeviceList {
                    user: UserKey([0; 32]),
                    version: 0,
                    devices: Vec::new(),
                },
                signature: [0; 64],
            },
        },
        Request::FetchDeviceList {
            user: UserKey([0; 32]),
        },
        Request::Ping,
        Request::BlobPut {
            blob: BlobId([0; 16]),
            offset: 0,
            total_len: 1,
            bytes: Vec::new(),
        },
        Request::BlobStatus {
            blob: BlobId([0; 16]),
        },
        Request::BlobGet {
            blob: BlobId([0; 16]),
            offset: 0,
            max: 0,
        },
        Request::FetchDeviceLeases {
            user: UserKey([0; 32]),
        },
        Request::EarlyPushes,
    ]
}

#[test]
fn request_variant_indexes_match_the_doc_table() {
    let rows: Vec<(u8, String)> = all_requests()
        .into_iter()
        .map(|request| {
            let dbg = format!("{request:?}");
            let bytes = encode_client_frame(&ClientFrame {
                request_id: 0,
                request,
            })
            .unwrap();
            // length(4) version(1) request_id(1) variant
            variant_at(&bytes, 6, &dbg)
        })
        .collect();
    check_table(
        &rows,
        &[
            "Hello",
            "Auth",
            "Register",
            "Send",
            "Pull",
            "Ack",
            "PublishPrekeys",
            "FetchPrekeys",
            "PublishDeviceList",
            "FetchDeviceList",
            "Ping",
            "BlobPut",
            "BlobStatus",
            "BlobGet",
            "FetchDeviceLeases",
            "EarlyPushes",
        ],
    );
}

fn all_responses() -> Vec<Response> {
    let spk = SignedPrekey {
        id: 0,
        public: [0; 32],
        signature: [0; 64],
    };
    vec![
        Response::Challenge { challenge: [0; 32] },
        Response::Authenticated(AuthOk {
            device: DeviceId([0; 16]),
            inbox_head: 0,
            acked: 0,
            one_time_prekeys_left: 0,
            relay_time_ms: 0,
        }),
        Response::Sent {
            outcomes: Vec::new(),
        },
        Response::Page(Page {
            envelopes: Vec::new(),
            remaining: 0,
            truncated: None,
        }),
        Response::Acked { up_to: 0 },
        Response::PrekeysPublished {
            one_time_prekeys_left: 0,
        },
        Response::Prekeys(PrekeyBundle {
            device: DeviceId([0; 16]),
            user: UserKey([0; 32]),
            signing_key: [0; 32],
            agreement_key: [0; 32],
            signed_prekey: spk,
            one_time_prekey: None,
        }),
        Response::DeviceListPublished { version: 0 },
        Response::DeviceList(SignedDeviceList {
            list: DeviceList {
                user: UserKey([0; 32]),
                version: 0,
                devices: Vec::new(),
            },
            signature: [0; 64],
        }),
        Response::Pong { relay_time_ms: 0 },
        Response::BlobStored {
            blob: BlobId([0; 16]),
            committed: 0,
        },
        Response::BlobState {
            blob: BlobId([0; 16]),
            total_len: 0,
            committed: 0,
            expires_at_ms: 0,
        },
        Response::BlobChunk {
            blob: BlobId([0; 16]),
            offset: 0,
            total_len: 0,
            committed: 0,
            bytes: Vec::new(),
        },
        Response::DeviceLeases {
            list: SignedDeviceList {
                list: DeviceList {
                    user: UserKey([0; 32]),
                    version: 0,
                    devices: Vec::new(),
                },
                signature: [0; 64],
            },
            leases: Vec::new(),
        },
        Response::EarlyPushes,
    ]
}

#[test]
fn response_variant_indexes_match_the_doc_table() {
    let rows: Vec<(u8, String)> = all_responses()
        .into_iter()
        .map(|response| {
            let dbg = format!("{response:?}");
            let bytes = encode_server_frame(&ServerFrame::Response {
                request_id: 0,
                response,
            })
            .unwrap();
            // length(4) version(1) ServerFrame::Response(1) request_id(1) variant
            variant_at(&bytes, 7, &dbg)
        })
        .collect();
    check_table(
        &rows,
        &[
            "Challenge",
            "Authenticated",
            "Sent",
            "Page",
            "Acked",
            "PrekeysPublished",
            "Prekeys",
            "DeviceListPublished",
            "DeviceList",
            "Pong",
            "BlobStored",
            "BlobState",
            "BlobChunk",
            "DeviceLeases",
            "EarlyPushes",
        ],
    );
}

#[test]
fn server_frame_variant_indexes_match_the_doc_table() {
    let frames = vec![
        ServerFrame::Response {
            request_id: 0,
            response: Response::Pong { relay_time_ms: 0 },
        },
        ServerFrame::error(0, ErrorCode::Internal, ""),
        ServerFrame::Push {
            envelopes: vec![Delivered {
                seq: 1,
                envelope: common::sample_envelope(0, 16, false),
            }],
        },
        ServerFrame::closing(ErrorCode::ShuttingDown, ""),
        ServerFrame::PrekeysLow {
            one_time_prekeys_left: 0,
        },
        ServerFrame::Retired { last_seen_ms: 0 },
        ServerFrame::EarlyPush {
            envelopes: Vec::new(),
        },
        ServerFrame::Durable { through: 0 },
    ];
    let rows: Vec<(u8, String)> = frames
        .into_iter()
        .map(|f| {
            let dbg = format!("{f:?}");
            variant_at(&encode_server_frame(&f).unwrap(), 5, &dbg)
        })
        .collect();
    check_table(
        &rows,
        &[
            "Response",
            "Error",
            "Push",
            "Closing",
            "PrekeysLow",
            "Retired",
            "EarlyPush",
            "Durable",
        ],
    );
}

#[test]
fn error_code_indexes_match_the_doc_table() {
    let rows: Vec<(u8, String)> = ALL_ERROR_CODES
        .iter()
        .map(|code| {
            let bytes = encode_server_frame(&ServerFrame::closing(*code, "")).unwrap();
            // length(4) version(1) ServerFrame::Closing(1) code
            variant_at(&bytes, 6, &format!("{code:?}"))
        })
        .collect();
    check_table(
        &rows,
        &[
            "UnknownDevice",
            "BadAuth",
            "TooLarge",
            "Quota",
            "RateLimited",
            "ExpiredCursor",
            "BadFrame",
            "UnsupportedVersion",
            "NotAuthenticated",
            "Forbidden",
            "AlreadyRegistered",
            "NoPrekeys",
            "Replaced",
            "ShuttingDown",
            "Internal",
            "StoreFull",
            "DeviceLimit",
            "RegistrationLimit",
            "BlobLimit",
            "UnknownBlob",
            "DeviceRemoved",
        ],
    );
}

#[test]
fn send_outcome_indexes_match_the_doc_table() {
    let outcomes = [
        SendOutcome::Stored {
            message_id: MessageId([0; 16]),
            recipient: DeviceId([0; 16]),
            seq: 0,
            duplicate: false,
        },
        SendOutcome::Refused {
            message_id: MessageId([0; 16]),
            recipient: DeviceId([0; 16]),
            error: WireError::new(ErrorCode::Quota, ""),
        },
    ];
    let rows: Vec<(u8, String)> = outcomes
        .into_iter()
        .map(|o| {
            let dbg = format!("{o:?}");
            let bytes = encode_server_frame(&ServerFrame::Response {
                request_id: 0,
                response: Response::Sent { outcomes: vec![o] },
            })
            .unwrap();
            // length(4) version(1) Response(1) request_id(1) Sent(1) count(1) variant
            variant_at(&bytes, 9, &dbg)
        })
        .collect();
    check_table(&rows, &["Stored", "Refused"]);
}

#[test]
fn limits_and_constants_match_the_doc() {
    let limits: [(&str, usize); 11] = [
        ("MAX_FRAME_LEN", MAX_FRAME_LEN),
        ("MAX_ENVELOPE_LEN", MAX_ENVELOPE_LEN),
        ("MAX_BATCH", MAX_BATCH),
        ("MAX_PAGE", usize::from(MAX_PAGE)),
        ("MAX_PAGE_BYTES", MAX_PAGE_BYTES),
        ("MAX_ONE_TIME_PREKEYS", MAX_ONE_TIME_PREKEYS),
        ("MAX_DEVICES_PER_USER", MAX_DEVICES_PER_USER),
        ("MAX_DROPPED_RANGES", MAX_DROPPED_RANGES),
        ("MAX_TEXT_LEN", MAX_TEXT_LEN),
        ("MAX_RATCHET_HEADER_LEN", MAX_RATCHET_HEADER_LEN),
        ("MAX_BLOB_CHUNK", MAX_BLOB_CHUNK),
    ];
    for (name, value) in limits {
        assert_in_doc(&format!("| `{name}` | {value} |"));
    }
    assert_eq!(hush_protocol::PROTOCOL_VERSION, 1);
    assert_eq!(hush_protocol::envelope::ENVELOPE_VERSION, 1);
    assert_eq!(hush_protocol::ALPN_HUSH, b"hush/1");
    assert_eq!(hush_protocol::ALPN_H3, b"h3");
    assert_in_doc("`hush/1`");
    assert_in_doc("`h3`");
    assert_eq!(hush_protocol::envelope::MIN_CIPHERTEXT_LEN, 16);
}
