//! Property tests: every wire type survives encode → decode unchanged, and the
//! stream splitter returns the same frames however the stream is chunked.
// Test code: a failed expectation should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use hush_protocol::envelope::{ENVELOPE_VERSION, FIXED_HEADER_LEN, SESSION_INIT_LEN};
use hush_protocol::frame::{decode_client_body, decode_server_body};
use hush_protocol::{
    ClientFrame, Envelope, EnvelopeHeader, FrameBuffer, Request, Response, ServerFrame,
    decode_client_frame, decode_server_frame, encode_client_frame, encode_server_frame,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Encode a client frame, decode it both as a whole and through its body, and
/// check the length prefix.
fn client_round_trip(frame: &ClientFrame) -> Result<(), TestCaseError> {
    let bytes = encode_client_frame(frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    prop_assert_eq!(len, bytes.len() - 4);
    prop_assert_eq!(bytes[4], hush_protocol::PROTOCOL_VERSION);
    prop_assert_eq!(&decode_client_frame(&bytes), &Ok(frame.clone()));
    prop_assert_eq!(&decode_client_body(&bytes[4..]), &Ok(frame.clone()));
    Ok(())
}

fn server_round_trip(frame: &ServerFrame) -> Result<(), TestCaseError> {
    let bytes = encode_server_frame(frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    prop_assert_eq!(len, bytes.len() - 4);
    prop_assert_eq!(bytes[4], hush_protocol::PROTOCOL_VERSION);
    prop_assert_eq!(&decode_server_frame(&bytes), &Ok(frame.clone()));
    prop_assert_eq!(&decode_server_body(&bytes[4..]), &Ok(frame.clone()));
    Ok(())
}

fn response_frame(response: Response) -> ServerFrame {
    ServerFrame::Response {
        request_id: 1,
        response,
    }
}

/// Cut `bytes` into chunks whose sizes cycle through `sizes` (each ≥ 1).
fn chunks<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let n = sizes[i % sizes.len()].min(bytes.len() - pos);
        out.push(&bytes[pos..pos + n]);
        pos += n;
        i += 1;
    }
    out
}

proptest! {
    #[test]
    fn envelope_header_round_trips(h in header()) {
        let bytes = h.to_bytes().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(bytes.len(), h.encoded_len());
        let expected_len = FIXED_HEADER_LEN
            + h.ratchet.len()
            + if h.session_init.is_some() { SESSION_INIT_LEN } else { 0 };
        prop_assert_eq!(bytes.len(), expected_len);
        prop_assert_eq!(bytes[0], ENVELOPE_VERSION);
        prop_assert_eq!(
            bytes[1],
            u8::from(h.session_init.is_some()) | (u8::from(h.important) << 1)
        );
        let (parsed, used) = EnvelopeHeader::parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(parsed, h);
    }

    #[test]
    fn envelope_header_parse_ignores_what_follows(h in header(), tail in vec(any::<u8>(), 0..64)) {
        let mut bytes = h.to_bytes().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let header_len = bytes.len();
        bytes.extend_from_slice(&tail);
        let (parsed, used) = EnvelopeHeader::parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(used, header_len);
        prop_assert_eq!(parsed, h);
    }

    #[test]
    fn envelope_round_trips_and_header_is_the_associated_data(e in envelope()) {
        let bytes = e.to_bytes().map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(bytes.len(), e.encoded_len());
        let ad = e.associated_data().map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(&bytes[..ad.len()], &ad[..]);
        prop_assert_eq!(&bytes[ad.len()..], &e.ciphertext[..]);
        let back = Envelope::from_bytes(&bytes).map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(back, e);
    }

    #[test]
    fn envelope_decoding_is_canonical(e in envelope()) {
        // Decoding then re-encoding gives back the very same bytes: the relay
        // forwards stored bytes and the recipient recomputes the AD from them.
        let bytes = e.to_bytes().map_err(|err| TestCaseError::fail(err.to_string()))?;
        let back = Envelope::from_bytes(&bytes).map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(back.to_bytes(), Ok(bytes));
    }

    #[test]
    fn every_request_round_trips(f in client_frame()) {
        client_round_trip(&f)?;
    }

    #[test]
    fn every_server_frame_round_trips(f in server_frame()) {
        server_round_trip(&f)?;
    }

    #[test]
    fn every_response_round_trips(request_id in wide_u32(), response in response()) {
        server_round_trip(&ServerFrame::Response { request_id, response })?;
    }

    #[test]
    fn send_batches_round_trip(request_id in wide_u32(), envelopes in vec(envelope_with(MAX_CT_BATCH), 0..=hush_protocol::limits::MAX_BATCH)) {
        client_round_trip(&ClientFrame { request_id, request: Request::Send { envelopes } })?;
    }

    #[test]
    fn registration_round_trips(request_id in wide_u32(), registration in registration(), signature in sig()) {
        client_round_trip(&ClientFrame {
            request_id,
            request: Request::Register { registration, signature },
        })?;
    }

    #[test]
    fn prekey_bundle_round_trips(bundle in prekey_bundle()) {
        server_round_trip(&response_frame(Response::Prekeys(bundle)))?;
    }

    #[test]
    fn signed_device_list_round_trips_both_ways(list in signed_device_list()) {
        server_round_trip(&response_frame(Response::DeviceList(list.clone())))?;
        client_round_trip(&ClientFrame { request_id: 2, request: Request::PublishDeviceList { list } })?;
    }

    #[test]
    fn device_list_signing_bytes_are_domain_then_postcard(list in signed_device_list()) {
        let bytes = list.list.signing_bytes().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let domain = hush_protocol::frame::DEVICE_LIST_DOMAIN;
        prop_assert_eq!(&bytes[..domain.len()], domain);
        let decoded: hush_protocol::DeviceList = postcard::from_bytes(&bytes[domain.len()..])
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded, list.list);
    }

    #[test]
    fn page_with_truncation_round_trips(page in page(), truncation in truncation()) {
        let mut page = page;
        page.truncated = Some(truncation);
        server_round_trip(&response_frame(Response::Page(page)))?;
    }

    #[test]
    fn wire_errors_round_trip(request_id in wide_u32(), error in wire_error()) {
        server_round_trip(&ServerFrame::Error { request_id, error: error.clone() })?;
        let standalone = postcard::to_allocvec(&error).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: hush_protocol::WireError = postcard::from_bytes(&standalone).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, error);
    }

    #[test]
    fn wire_error_new_always_fits_the_text_limit(code in error_code(), message in ".{0,300}") {
        let e = hush_protocol::WireError::new(code, message.clone());
        prop_assert!(e.message.len() <= hush_protocol::limits::MAX_TEXT_LEN);
        prop_assert!(message.starts_with(&e.message));
        // The constructor's output is always encodable.
        server_round_trip(&ServerFrame::Error { request_id: 0, error: e })?;
        server_round_trip(&ServerFrame::closing(code, message))?;
    }

    #[test]
    fn client_stream_split_in_any_chunks_gives_the_same_frames(
        frames in vec(client_frame(), 1..6),
        sizes in vec(1usize..2000, 1..8),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend(encode_client_frame(f).map_err(|e| TestCaseError::fail(e.to_string()))?);
        }
        let mut buf = FrameBuffer::new();
        let mut got = Vec::new();
        for chunk in chunks(&stream, &sizes) {
            buf.extend(chunk);
            while let Some(f) = buf.next_client_frame().map_err(|e| TestCaseError::fail(e.to_string()))? {
                got.push(f);
            }
        }
        prop_assert_eq!(buf.buffered(), 0);
        prop_assert_eq!(buf.wanted(), Ok(4));
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn server_stream_split_in_any_chunks_gives_the_same_frames(
        frames in vec(server_frame(), 1..6),
        sizes in vec(1usize..2000, 1..8),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend(encode_server_frame(f).map_err(|e| TestCaseError::fail(e.to_string()))?);
        }
        let mut buf = FrameBuffer::new();
        let mut got = Vec::new();
        for chunk in chunks(&stream, &sizes) {
            buf.extend(chunk);
            while let Some(f) = buf.next_server_frame().map_err(|e| TestCaseError::fail(e.to_string()))? {
                got.push(f);
            }
        }
        prop_assert_eq!(buf.buffered(), 0);
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn wanted_is_exactly_what_completes_the_next_frame(
        frames in vec(client_frame(), 1..4),
    ) {
        // A transport that reads exactly `wanted()` bytes each time never
        // over-reads and gets each frame on the read that completes it.
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend(encode_client_frame(f).map_err(|e| TestCaseError::fail(e.to_string()))?);
        }
        let mut buf = FrameBuffer::new();
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < stream.len() {
            let want = buf.wanted().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(want >= 1);
            prop_assert!(pos + want <= stream.len());
            buf.extend(&stream[pos..pos + want]);
            pos += want;
            if let Some(f) = buf.next_client_frame().map_err(|e| TestCaseError::fail(e.to_string()))? {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
    }
}

#[test]
fn every_request_variant_round_trips_once() {
    // A deterministic pass over each variant, so a variant the strategy might
    // under-sample is still covered on every run.
    let reg = hush_protocol::DeviceRegistration {
        device: hush_protocol::DeviceId([1; 16]),
        user: hush_protocol::UserKey([2; 32]),
        signing_key: [3; 32],
        agreement_key: [4; 32],
        user_signature: [5; 64],
    };
    let spk = hush_protocol::SignedPrekey {
        id: 6,
        public: [7; 32],
        signature: [8; 64],
    };
    let list = hush_protocol::SignedDeviceList {
        list: hush_protocol::DeviceList {
            user: hush_protocol::UserKey([9; 32]),
            version: 3,
            devices: vec![hush_protocol::DeviceEntry {
                device: hush_protocol::DeviceId([10; 16]),
                signing_key: [11; 32],
                agreement_key: [12; 32],
                membership_signature: [14; 64],
            }],
        },
        signature: [13; 64],
    };
    let requests = vec![
        Request::Hello {
            device: hush_protocol::DeviceId([1; 16]),
        },
        Request::Auth {
            signature: [0xAB; 64],
        },
        Request::Register {
            registration: reg,
            signature: [0xCD; 64],
        },
        Request::Send {
            envelopes: vec![sample_envelope(40, 32, true), sample_envelope(0, 16, false)],
        },
        Request::Pull {
            after: 5,
            limit: 200,
            ack: 5,
        },
        Request::Ack { up_to: 77 },
        Request::PublishPrekeys {
            signed_prekey: spk,
            one_time_prekeys: vec![hush_protocol::OneTimePrekey {
                id: 1,
                public: [1; 32],
            }],
        },
        Request::FetchPrekeys {
            device: hush_protocol::DeviceId([2; 16]),
        },
        Request::PublishDeviceList { list },
        Request::FetchDeviceList {
            user: hush_protocol::UserKey([3; 32]),
        },
        Request::Ping,
    ];
    for (i, request) in requests.into_iter().enumerate() {
        let frame = ClientFrame {
            request_id: i as u32,
            request,
        };
        let bytes = encode_client_frame(&frame).expect("encodes");
        assert_eq!(decode_client_frame(&bytes), Ok(frame));
    }
}
