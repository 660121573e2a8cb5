//! Shared proptest strategies for every wire type, and small fixtures.
//!
//! Each integration test file includes this module; not every file uses every
//! strategy.
#![allow(dead_code)]

use hush_protocol::envelope::{MIN_CIPHERTEXT_LEN, NO_ONE_TIME_PREKEY};
use hush_protocol::limits::{
    MAX_BATCH, MAX_BLOB_CHUNK, MAX_DEVICES_PER_USER, MAX_ONE_TIME_PREKEYS, MAX_PAGE,
    MAX_RATCHET_HEADER_LEN, MAX_TEXT_LEN,
};
use hush_protocol::{
    AuthOk, BlobId, ClientFrame, ConversationId, Delivered, DeviceEntry, DeviceId, DeviceList,
    DeviceRegistration, DroppedRange, Envelope, EnvelopeHeader, ErrorCode, MessageId,
    OneTimePrekey, Page, PrekeyBundle, Request, Response, SendOutcome, ServerFrame,
    SessionInitHeader, SignedDeviceList, SignedPrekey, Truncation, UserKey, WireError,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

/// Largest ciphertext generated for a lone envelope.
pub const MAX_CT_SINGLE: usize = 8 * 1024;
/// Largest ciphertext generated for envelopes inside batches and pages, so a
/// case stays small enough for hundreds of cases per test.
pub const MAX_CT_BATCH: usize = 1024;

/// Every error code, in declaration (= wire index) order.
pub const ALL_ERROR_CODES: [ErrorCode; 21] = [
    ErrorCode::UnknownDevice,
    ErrorCode::BadAuth,
    ErrorCode::TooLarge,
    ErrorCode::Quota,
    ErrorCode::RateLimited,
    ErrorCode::ExpiredCursor,
    ErrorCode::BadFrame,
    ErrorCode::UnsupportedVersion,
    ErrorCode::NotAuthenticated,
    ErrorCode::Forbidden,
    ErrorCode::AlreadyRegistered,
    ErrorCode::NoPrekeys,
    ErrorCode::Replaced,
    ErrorCode::ShuttingDown,
    ErrorCode::Internal,
    ErrorCode::StoreFull,
    ErrorCode::DeviceLimit,
    ErrorCode::RegistrationLimit,
    ErrorCode::BlobLimit,
    ErrorCode::UnknownBlob,
    ErrorCode::DeviceRemoved,
];

pub fn device() -> impl Strategy<Value = DeviceId> {
    any::<[u8; 16]>().prop_map(DeviceId)
}

pub fn conversation() -> impl Strategy<Value = ConversationId> {
    any::<[u8; 16]>().prop_map(ConversationId)
}

pub fn user() -> impl Strategy<Value = UserKey> {
    any::<[u8; 32]>().prop_map(UserKey)
}

pub fn message_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

pub fn key32() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

pub fn sig() -> impl Strategy<Value = [u8; 64]> {
    any::<[u8; 64]>()
}

/// Any u64, with the boundaries of every varint width well represented.
pub fn wide_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..300,
        Just(u64::MAX),
        (0u32..64).prop_map(|s| 1u64 << s),
        (1u32..64).prop_map(|s| (1u64 << s) - 1),
    ]
}

/// Any u32 with the varint boundaries represented.
pub fn wide_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        0u32..300,
        Just(u32::MAX),
        (0u32..32).prop_map(|s| 1u32 << s),
    ]
}

/// A one-time prekey id that the envelope header can carry.
pub fn otk_id() -> impl Strategy<Value = u32> {
    prop_oneof![any::<u32>(), Just(0u32), Just(NO_ONE_TIME_PREKEY - 1)]
        .prop_filter("reserved id", |id| *id != NO_ONE_TIME_PREKEY)
}

pub fn session_init() -> impl Strategy<Value = SessionInitHeader> {
    (key32(), key32(), any::<u32>(), option::of(otk_id())).prop_map(
        |(initiator_identity, ephemeral, signed_prekey_id, one_time_prekey_id)| SessionInitHeader {
            initiator_identity,
            ephemeral,
            signed_prekey_id,
            one_time_prekey_id,
        },
    )
}

pub fn header() -> impl Strategy<Value = EnvelopeHeader> {
    (
        message_id(),
        device(),
        device(),
        conversation(),
        wide_u64(),
        wide_u64(),
        vec(any::<u8>(), 0..=MAX_RATCHET_HEADER_LEN),
        option::of(session_init()),
        any::<bool>(),
    )
        .prop_map(
            |(
                message_id,
                sender_device,
                recipient_device,
                conversation_id,
                sender_seq,
                sent_at_ms,
                ratchet,
                session_init,
                important,
            )| EnvelopeHeader {
                message_id,
                sender_device,
                recipient_device,
                conversation_id,
                sender_seq,
                sent_at_ms,
                ratchet,
                session_init,
                important,
            },
        )
}

pub fn envelope_with(max_ct: usize) -> impl Strategy<Value = Envelope> {
    (header(), vec(any::<u8>(), MIN_CIPHERTEXT_LEN..=max_ct))
        .prop_map(|(header, ciphertext)| Envelope { header, ciphertext })
}

pub fn envelope() -> impl Strategy<Value = Envelope> {
    envelope_with(MAX_CT_SINGLE)
}

/// Any valid UTF-8 text of at most `MAX_TEXT_LEN` bytes (multi-byte chars included).
pub fn text() -> impl Strategy<Value = String> {
    ".{0,64}".prop_map(|mut s: String| {
        while s.len() > MAX_TEXT_LEN {
            s.pop();
        }
        s
    })
}

pub fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ALL_ERROR_CODES.to_vec())
}

pub fn wire_error() -> impl Strategy<Value = WireError> {
    (error_code(), text(), option::of(wide_u32())).prop_map(|(code, message, retry_after_ms)| {
        WireError {
            code,
            message,
            retry_after_ms,
        }
    })
}

pub fn registration() -> impl Strategy<Value = DeviceRegistration> {
    (device(), user(), key32(), key32(), sig()).prop_map(
        |(device, user, signing_key, agreement_key, user_signature)| DeviceRegistration {
            device,
            user,
            signing_key,
            agreement_key,
            user_signature,
        },
    )
}

pub fn signed_prekey() -> impl Strategy<Value = SignedPrekey> {
    (wide_u32(), key32(), sig()).prop_map(|(id, public, signature)| SignedPrekey {
        id,
        public,
        signature,
    })
}

pub fn one_time_prekey() -> impl Strategy<Value = OneTimePrekey> {
    (otk_id(), key32()).prop_map(|(id, public)| OneTimePrekey { id, public })
}

pub fn prekey_bundle() -> impl Strategy<Value = PrekeyBundle> {
    (
        device(),
        user(),
        key32(),
        key32(),
        signed_prekey(),
        option::of(one_time_prekey()),
    )
        .prop_map(
            |(device, user, signing_key, agreement_key, signed_prekey, one_time_prekey)| {
                PrekeyBundle {
                    device,
                    user,
                    signing_key,
                    agreement_key,
                    signed_prekey,
                    one_time_prekey,
                }
            },
        )
}

pub fn device_entry() -> impl Strategy<Value = DeviceEntry> {
    (device(), key32(), key32(), sig()).prop_map(
        |(device, signing_key, agreement_key, membership_signature)| DeviceEntry {
            device,
            signing_key,
            agreement_key,
            membership_signature,
        },
    )
}

pub fn signed_device_list() -> impl Strategy<Value = SignedDeviceList> {
    (
        user(),
        wide_u64(),
        vec(device_entry(), 0..=MAX_DEVICES_PER_USER),
        sig(),
    )
        .prop_map(|(user, version, devices, signature)| SignedDeviceList {
            list: DeviceList {
                user,
                version,
                devices,
            },
            signature,
        })
}

pub fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        device().prop_map(|device| Request::Hello { device }),
        sig().prop_map(|signature| Request::Auth { signature }),
        (registration(), sig()).prop_map(|(registration, signature)| Request::Register {
            registration,
            signature
        }),
        vec(envelope_with(MAX_CT_BATCH), 0..=MAX_BATCH)
            .prop_map(|envelopes| Request::Send { envelopes }),
        (wide_u64(), 0..=MAX_PAGE, wide_u64()).prop_map(|(after, limit, ack)| Request::Pull {
            after,
            limit,
            ack
        }),
        wide_u64().prop_map(|up_to| Request::Ack { up_to }),
        (
            signed_prekey(),
            vec(one_time_prekey(), 0..=MAX_ONE_TIME_PREKEYS)
        )
            .prop_map(
                |(signed_prekey, one_time_prekeys)| Request::PublishPrekeys {
                    signed_prekey,
                    one_time_prekeys
                }
            ),
        device().prop_map(|device| Request::FetchPrekeys { device }),
        signed_device_list().prop_map(|list| Request::PublishDeviceList { list }),
        user().prop_map(|user| Request::FetchDeviceList { user }),
        Just(Request::Ping),
        (blob_id(), 0u64..1000, vec(any::<u8>(), 0..64), 0u64..1000).prop_map(
            |(blob, offset, bytes, extra)| Request::BlobPut {
                blob,
                offset,
                total_len: offset + bytes.len() as u64 + extra.max(1),
                bytes,
            }
        ),
        blob_id().prop_map(|blob| Request::BlobStatus { blob }),
        (blob_id(), wide_u64(), 0..=MAX_BLOB_CHUNK as u32)
            .prop_map(|(blob, offset, max)| Request::BlobGet { blob, offset, max }),
        user().prop_map(|user| Request::FetchDeviceLeases { user }),
        Just(Request::EarlyPushes),
    ]
}

pub fn blob_id() -> impl Strategy<Value = BlobId> {
    any::<[u8; 16]>().prop_map(BlobId)
}

pub fn client_frame() -> impl Strategy<Value = ClientFrame> {
    (wide_u32(), request()).prop_map(|(request_id, request)| ClientFrame {
        request_id,
        request,
    })
}

pub fn delivered() -> impl Strategy<Value = Delivered> {
    (wide_u64(), envelope_with(MAX_CT_BATCH))
        .prop_map(|(seq, envelope)| Delivered { seq, envelope })
}

pub fn dropped_range() -> impl Strategy<Value = DroppedRange> {
    (device(), conversation(), wide_u64(), wide_u64()).prop_map(
        |(sender, conversation, first_seq, last_seq)| DroppedRange {
            sender,
            conversation,
            first_seq,
            last_seq,
        },
    )
}

pub fn truncation() -> impl Strategy<Value = Truncation> {
    (wide_u64(), wide_u64(), vec(dropped_range(), 0..=40)).prop_map(
        |(oldest_retained, dropped_count, dropped)| Truncation {
            oldest_retained,
            dropped_count,
            dropped,
        },
    )
}

/// Pages are kept to at most 24 envelopes per case; the full count limit is
/// exercised by the dedicated limit tests.
pub fn page() -> impl Strategy<Value = Page> {
    (
        vec(delivered(), 0..=24),
        wide_u64(),
        option::of(truncation()),
    )
        .prop_map(|(envelopes, remaining, truncated)| Page {
            envelopes,
            remaining,
            truncated,
        })
}

pub fn send_outcome() -> impl Strategy<Value = SendOutcome> {
    prop_oneof![
        (message_id(), device(), wide_u64(), any::<bool>()).prop_map(
            |(message_id, recipient, seq, duplicate)| SendOutcome::Stored {
                message_id,
                recipient,
                seq,
                duplicate
            }
        ),
        (message_id(), device(), wire_error()).prop_map(|(message_id, recipient, error)| {
            SendOutcome::Refused {
                message_id,
                recipient,
                error,
            }
        }),
    ]
}

pub fn auth_ok() -> impl Strategy<Value = AuthOk> {
    (device(), wide_u64(), wide_u64(), wide_u32(), wide_u64()).prop_map(
        |(device, inbox_head, acked, one_time_prekeys_left, relay_time_ms)| AuthOk {
            device,
            inbox_head,
            acked,
            one_time_prekeys_left,
            relay_time_ms,
        },
    )
}

pub fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        key32().prop_map(|challenge| Response::Challenge { challenge }),
        auth_ok().prop_map(Response::Authenticated),
        vec(send_outcome(), 0..=MAX_BATCH).prop_map(|outcomes| Response::Sent { outcomes }),
        page().prop_map(Response::Page),
        wide_u64().prop_map(|up_to| Response::Acked { up_to }),
        wide_u32().prop_map(|one_time_prekeys_left| Response::PrekeysPublished {
            one_time_prekeys_left
        }),
        prekey_bundle().prop_map(Response::Prekeys),
        wide_u64().prop_map(|version| Response::DeviceListPublished { version }),
        signed_device_list().prop_map(Response::DeviceList),
        wide_u64().prop_map(|relay_time_ms| Response::Pong { relay_time_ms }),
        (blob_id(), wide_u64())
            .prop_map(|(blob, committed)| Response::BlobStored { blob, committed }),
        (blob_id(), wide_u64(), wide_u64(), wide_u64()).prop_map(
            |(blob, total_len, committed, expires_at_ms)| Response::BlobState {
                blob,
                total_len,
                committed,
                expires_at_ms
            }
        ),
        (
            blob_id(),
            wide_u64(),
            wide_u64(),
            wide_u64(),
            vec(any::<u8>(), 0..64)
        )
            .prop_map(
                |(blob, offset, total_len, committed, bytes)| Response::BlobChunk {
                    blob,
                    offset,
                    total_len,
                    committed,
                    bytes
                }
            ),
        (
            signed_device_list(),
            vec(
                (device(), wide_u64(), any::<bool>()),
                0..=MAX_DEVICES_PER_USER
            )
        )
            .prop_map(|(list, leases)| Response::DeviceLeases {
                list,
                leases: leases
                    .into_iter()
                    .map(|(device, last_seen_ms, stale)| hush_protocol::DeviceLease {
                        device,
                        last_seen_ms,
                        stale
                    })
                    .collect()
            }),
        Just(Response::EarlyPushes),
    ]
}

pub fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (wide_u32(), response()).prop_map(|(request_id, response)| ServerFrame::Response {
            request_id,
            response
        }),
        (wide_u32(), wire_error())
            .prop_map(|(request_id, error)| ServerFrame::Error { request_id, error }),
        vec(delivered(), 0..=24).prop_map(|envelopes| ServerFrame::Push { envelopes }),
        (error_code(), text()).prop_map(|(code, reason)| ServerFrame::Closing { code, reason }),
        wide_u32().prop_map(|one_time_prekeys_left| ServerFrame::PrekeysLow {
            one_time_prekeys_left
        }),
        wide_u64().prop_map(|last_seen_ms| ServerFrame::Retired { last_seen_ms }),
        vec(delivered(), 0..=24).prop_map(|envelopes| ServerFrame::EarlyPush { envelopes }),
        wide_u64().prop_map(|through| ServerFrame::Durable { through }),
    ]
}

/// A fixed, valid envelope for the rejection tests.
pub fn sample_envelope(ratchet_len: usize, ct_len: usize, init: bool) -> Envelope {
    Envelope {
        header: EnvelopeHeader {
            message_id: MessageId::new(1_700_000_000_000, [0xA5; 10]),
            sender_device: DeviceId([0x11; 16]),
            recipient_device: DeviceId([0x22; 16]),
            conversation_id: ConversationId([0x33; 16]),
            sender_seq: 42,
            sent_at_ms: 1_700_000_000_123,
            ratchet: vec![0xEE; ratchet_len],
            session_init: init.then_some(SessionInitHeader {
                initiator_identity: [0x44; 32],
                ephemeral: [0x55; 32],
                signed_prekey_id: 9,
                one_time_prekey_id: Some(10),
            }),
            important: false,
        },
        ciphertext: vec![0xCC; ct_len],
    }
}
