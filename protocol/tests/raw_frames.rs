//! Frames written from stored envelope bytes (`hush_protocol::raw`) are the
//! frames `encode_server_frame` writes for the decoded envelopes, byte for
//! byte, and the raw path refuses what the typed path refuses.
// Test code: a failed expectation should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use hush_protocol::limits::MAX_PAGE;
use hush_protocol::{
    Delivered, Envelope, Page, ProtocolError, RawDelivered, Response, ServerFrame,
    decode_server_frame, encode_early_push_frame, encode_page_frame, encode_push_frame,
    encode_server_frame,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn raw(delivered: &[Delivered]) -> Vec<RawDelivered> {
    delivered
        .iter()
        .map(|d| RawDelivered::new(d.seq, d.envelope.to_bytes().unwrap()).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_raw_page_is_the_typed_page(request_id in wide_u32(), page in page()) {
        let raw = raw(&page.envelopes);
        let bytes = encode_page_frame(request_id, &raw, page.remaining, page.truncated.as_ref()).unwrap();
        let frame = ServerFrame::Response { request_id, response: Response::Page(page) };
        prop_assert_eq!(&bytes, &encode_server_frame(&frame).unwrap());
        prop_assert_eq!(decode_server_frame(&bytes).unwrap(), frame);
    }

    #[test]
    fn a_raw_push_is_the_typed_push(envelopes in vec(delivered(), 0..=24)) {
        let raw = raw(&envelopes);
        let bytes = encode_push_frame(&raw).unwrap();
        let frame = ServerFrame::Push { envelopes };
        prop_assert_eq!(&bytes, &encode_server_frame(&frame).unwrap());
        prop_assert_eq!(decode_server_frame(&bytes).unwrap(), frame);
    }

    #[test]
    fn a_raw_early_push_is_the_typed_early_push(envelopes in vec(delivered(), 0..=24)) {
        let raw = raw(&envelopes);
        let bytes = encode_early_push_frame(&raw).unwrap();
        let frame = ServerFrame::EarlyPush { envelopes };
        prop_assert_eq!(&bytes, &encode_server_frame(&frame).unwrap());
        prop_assert_eq!(decode_server_frame(&bytes).unwrap(), frame);
    }

    #[test]
    fn raw_envelopes_decode_to_what_was_encoded(d in delivered()) {
        let r = RawDelivered::new(d.seq, d.envelope.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(r.seq(), d.seq);
        prop_assert_eq!(r.decode().unwrap(), d);
    }

    /// `check_bytes` accepts exactly what `from_bytes` accepts.
    #[test]
    fn check_bytes_agrees_with_from_bytes(e in envelope(), cut in 0usize..2_000, flip in any::<(usize, u8)>()) {
        let mut bytes = e.to_bytes().unwrap();
        bytes.truncate(bytes.len().saturating_sub(cut));
        if let Some(b) = bytes.get_mut(flip.0 % 80) {
            *b ^= flip.1;
        }
        prop_assert_eq!(
            Envelope::check_bytes(&bytes),
            Envelope::from_bytes(&bytes).map(|_| ())
        );
    }
}

#[test]
fn bytes_that_are_no_envelope_are_refused() {
    assert!(RawDelivered::new(1, Vec::new()).is_err());
    assert!(RawDelivered::new(1, vec![0xff; 200]).is_err());
}

#[test]
fn more_than_a_page_is_refused_like_the_typed_frame() {
    let one = raw(&[Delivered {
        seq: 1,
        envelope: sample_envelope(40, 1_000, false),
    }]);
    let many: Vec<RawDelivered> = (0..=usize::from(MAX_PAGE))
        .map(|_| one[0].clone())
        .collect();
    assert!(matches!(
        encode_push_frame(&many),
        Err(ProtocolError::TooLarge { what: "page", .. })
    ));
    assert!(matches!(
        encode_page_frame(1, &many, 0, None),
        Err(ProtocolError::TooLarge { what: "page", .. })
    ));
    let typed = ServerFrame::Response {
        request_id: 1,
        response: Response::Page(Page {
            envelopes: many.iter().map(|r| r.decode().unwrap()).collect(),
            remaining: 0,
            truncated: None,
        }),
    };
    assert!(encode_server_frame(&typed).is_err());
    assert!(encode_push_frame(&many[..usize::from(MAX_PAGE)]).is_ok());
}
