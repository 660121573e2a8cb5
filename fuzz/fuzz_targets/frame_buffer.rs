//! The stream splitter, fed arbitrary bytes in arbitrary chunks, never panics,
//! never holds more than one frame's worth of bytes beyond what it was given,
//! and splits the same way however the stream is chunked.
#![no_main]

use hush_protocol::{FrameBuffer, ProtocolError};
use libfuzzer_sys::fuzz_target;

/// Feed `stream` in chunks and collect every body until the first error.
fn split(stream: &[u8], chunk_sizes: &[u8]) -> (Vec<Vec<u8>>, Option<ProtocolError>) {
    let mut buf = FrameBuffer::new();
    let mut bodies = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < stream.len() {
        let size = usize::from(
            chunk_sizes
                .get(i % chunk_sizes.len().max(1))
                .copied()
                .unwrap_or(1),
        )
        .max(1);
        let end = (pos + size).min(stream.len());
        buf.extend(&stream[pos..end]);
        pos = end;
        i += 1;
        loop {
            match buf.next_body() {
                Ok(Some(body)) => bodies.push(body),
                Ok(None) => break,
                Err(e) => return (bodies, Some(e)),
            }
        }
        // Whatever is buffered is an incomplete frame: less than its prefix
        // announced, which is itself within the frame limit.
        assert!(buf.buffered() < 4 + hush_protocol::limits::MAX_FRAME_LEN);
        match buf.wanted() {
            Ok(w) => assert!(w >= 1),
            Err(e) => return (bodies, Some(e)),
        }
    }
    // Decoding the bodies must not panic either.
    for b in &bodies {
        let _ = hush_protocol::frame::decode_client_body(b);
        let _ = hush_protocol::frame::decode_server_body(b);
    }
    (bodies, None)
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many chunk-size bytes follow; the rest is the stream.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let chunked = split(stream, sizes);
    let whole = split(stream, &[255]);
    let bytewise = split(stream, &[1]);
    assert_eq!(chunked, whole);
    assert_eq!(chunked, bytewise);
});
