//! Every frame a decoder accepts is one the encoder accepts and reproduces:
//! decode → encode → decode is the identity on values (bytes may differ, since
//! postcard accepts non-minimal varints). The input is wrapped in a valid length
//! prefix and version byte so the fuzzer spends its time inside the body.
#![no_main]

use hush_protocol::{
    decode_client_frame, decode_server_frame, encode_client_frame, encode_server_frame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(len) = u32::try_from(data.len() + 1) else {
        return;
    };
    let mut frame = len.to_be_bytes().to_vec();
    frame.push(hush_protocol::PROTOCOL_VERSION);
    frame.extend_from_slice(data);

    if let Ok(f) = decode_client_frame(&frame) {
        let again = encode_client_frame(&f).expect("a decoded request re-encodes");
        assert!(again.len() <= frame.len());
        assert_eq!(decode_client_frame(&again).as_ref(), Ok(&f));
    }
    if let Ok(f) = decode_server_frame(&frame) {
        let again = encode_server_frame(&f).expect("a decoded relay frame re-encodes");
        assert!(again.len() <= frame.len());
        assert_eq!(decode_server_frame(&again).as_ref(), Ok(&f));
    }
});
