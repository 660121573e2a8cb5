//! Hostile input: no byte string makes any decoder panic, and whatever does
//! decode is a value the encoders accept and reproduce.
// Test code: a failed expectation should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use hush_protocol::frame::{decode_client_body, decode_server_body};
use hush_protocol::{
    Envelope, EnvelopeHeader, FrameBuffer, decode_client_frame, decode_server_frame,
    encode_client_frame, encode_server_frame,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Run every decoder on `bytes`; any frame that decodes must re-encode and
/// decode to itself.
fn decode_everything(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(f) = decode_client_frame(bytes) {
        let again = encode_client_frame(&f)
            .map_err(|e| TestCaseError::fail(format!("decoded {f:?} but cannot re-encode: {e}")))?;
        prop_assert_eq!(decode_client_frame(&again), Ok(f));
    }
    if let Ok(f) = decode_server_frame(bytes) {
        let again = encode_server_frame(&f)
            .map_err(|e| TestCaseError::fail(format!("decoded {f:?} but cannot re-encode: {e}")))?;
        prop_assert_eq!(decode_server_frame(&again), Ok(f));
    }
    let _ = decode_client_body(bytes);
    let _ = decode_server_body(bytes);
    if let Ok(e) = Envelope::from_bytes(bytes) {
        // Envelope decoding is canonical: the stored bytes come back exactly.
        prop_assert_eq!(e.to_bytes(), Ok(bytes.to_vec()));
    }
    if let Ok((h, used)) = EnvelopeHeader::parse(bytes) {
        prop_assert_eq!(h.to_bytes(), Ok(bytes[..used].to_vec()));
    }
    let mut buf = FrameBuffer::new();
    buf.extend(bytes);
    for _ in 0..8 {
        match buf.next_client_frame() {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    Ok(())
}

/// Wrap a payload in a consistent length prefix and version byte, so random
/// bytes reach the postcard decoder instead of failing at the prefix.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    out.push(hush_protocol::PROTOCOL_VERSION);
    out.extend_from_slice(payload);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..600)) {
        decode_everything(&bytes)?;
    }

    #[test]
    fn arbitrary_framed_payloads_never_panic(payload in vec(any::<u8>(), 0..600)) {
        decode_everything(&framed(&payload))?;
    }

    #[test]
    fn arbitrary_envelope_shaped_bytes_never_panic(
        flags in 0u8..2,
        fixed in vec(any::<u8>(), 81),
        rest in vec(any::<u8>(), 0..300),
    ) {
        // Version and flags valid, so parsing reaches the variable part.
        let mut bytes = vec![1, flags];
        bytes.extend_from_slice(&fixed);
        bytes.extend_from_slice(&rest);
        decode_everything(&bytes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_client_frames_never_panic(
        f in client_frame(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = encode_client_frame(&f).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        decode_everything(&bytes)?;
        decode_everything(&bytes[4..])?;
    }

    #[test]
    fn mutated_server_frames_never_panic(
        f in server_frame(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = encode_server_frame(&f).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        decode_everything(&bytes)?;
    }

    #[test]
    fn mutated_envelopes_never_panic(
        e in envelope_with(256),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = e.to_bytes().map_err(|err| TestCaseError::fail(err.to_string()))?;
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        decode_everything(&bytes)?;
    }
}
