//! Every decoder of bytes from the network must return an error, never panic,
//! on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hush_protocol::decode_client_frame(data);
    let _ = hush_protocol::decode_server_frame(data);
    let _ = hush_protocol::Envelope::from_bytes(data);
});
