//! Envelope and header parsing never panics, and whatever parses re-encodes
//! to exactly the input bytes (the header is AEAD associated data, so its
//! encoding must be canonical).
#![no_main]

use hush_protocol::{Envelope, EnvelopeHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, used)) = EnvelopeHeader::parse(data) {
        assert_eq!(used, header.encoded_len());
        assert_eq!(header.to_bytes().ok().as_deref(), Some(&data[..used]));
    }
    if let Ok(envelope) = Envelope::from_bytes(data) {
        assert_eq!(envelope.to_bytes().ok().as_deref(), Some(data));
        assert_eq!(
            envelope.associated_data().ok().as_deref(),
            Some(&data[..envelope.header.encoded_len()])
        );
    }
});
