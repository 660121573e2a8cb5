//! Size limits shared by relay and clients.
//!
//! They are part of the protocol: a peer that exceeds one gets a typed
//! refusal ([`crate::ErrorCode::TooLarge`] or [`crate::ErrorCode::BadFrame`]).
//! Decoders compare declared lengths against these constants before
//! allocating, which is what keeps a hostile peer from exhausting memory.

/// Largest encoded envelope (header + ciphertext), in bytes.
pub const MAX_ENVELOPE_LEN: usize = 64 * 1024;

/// Most envelopes in one `Send` batch.
pub const MAX_BATCH: usize = 32;

/// Most envelopes in one pulled page (the client may ask for fewer).
pub const MAX_PAGE: u16 = 1000;

/// Byte budget of one page or push: the relay stops filling a page early
/// rather than exceed it, so a page always fits in a frame.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Largest frame body (everything after the 4-byte length prefix).
/// A full batch or page plus per-item overhead fits with room to spare.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Most one-time prekeys in one publish request.
pub const MAX_ONE_TIME_PREKEYS: usize = 200;

/// Most devices in one user's signed device list.
pub const MAX_DEVICES_PER_USER: usize = 16;

/// Most dropped sender-seq ranges reported in one truncated page.
pub const MAX_DROPPED_RANGES: usize = 1024;

/// Longest human-readable string in a frame (error messages, close reasons).
pub const MAX_TEXT_LEN: usize = 256;

/// Longest ratchet header carried inside an envelope header.
pub const MAX_RATCHET_HEADER_LEN: usize = 96;

/// Largest blob chunk in one `BlobPut` or `BlobChunk` (and the most one
/// `BlobGet` may ask for).
pub const MAX_BLOB_CHUNK: usize = 1024 * 1024;

/// The largest UDP payload a native QUIC endpoint of Hush (the relay, the
/// `hush` client) receives, and the most its path MTU discovery probes
/// for. Internet paths settle at about 1,452 bytes as before; loopback and
/// jumbo-frame networks carry several 1 KiB envelopes per datagram instead
/// of one, which is what most of QUIC's per-message cost scales with
/// (packet protection, acknowledgements, system calls).
///
/// Why 6 KiB and not the 65,527 QUIC allows: quinn hands the kernel up to
/// 10 datagrams in one segmentation-offload send, and Linux refuses a send
/// of more than 64 KiB in all. With 16 KiB datagrams every full send of a
/// page was refused and lost, and catch-up fell to less than half; 10 × 6
/// KiB stays below the limit.
pub const MAX_UDP_PAYLOAD: u16 = 6 * 1024;

// Ten datagrams (quinn's most per send) with their IPv6 and UDP headers
// fit in one offloaded send of at most 65,535 bytes.
const _: () = assert!(10 * (MAX_UDP_PAYLOAD as usize + 48) <= 65_535);

#[cfg(test)]
mod tests {
    use super::*;

    /// Worst-case postcard overhead of one envelope inside a frame: a varint
    /// byte-string length (3 bytes up to 2^21) plus, in pages, a u64 seq (10).
    const PER_ENVELOPE_OVERHEAD: usize = 3 + 10;

    #[test]
    fn a_full_batch_fits_in_a_frame() {
        let worst = 1 + 5 + 1 + 1 + MAX_BATCH * (MAX_ENVELOPE_LEN + PER_ENVELOPE_OVERHEAD);
        assert!(worst <= MAX_FRAME_LEN, "{worst} > {MAX_FRAME_LEN}");
    }

    #[test]
    fn a_full_page_fits_in_a_frame() {
        // The relay stops a page at MAX_PAGE_BYTES of envelopes, but always
        // sends at least one, so one envelope may exceed the budget.
        let envelopes = MAX_PAGE_BYTES + MAX_ENVELOPE_LEN;
        let per_item = usize::from(MAX_PAGE) * PER_ENVELOPE_OVERHEAD;
        let truncation = 20 + 3 + MAX_DROPPED_RANGES * (16 + 16 + 10 + 10);
        let worst = 16 + envelopes + per_item + truncation;
        assert!(worst <= MAX_FRAME_LEN, "{worst} > {MAX_FRAME_LEN}");
    }

    // Relations the encoders rely on, checked at compile time.
    const _: () = assert!(MAX_RATCHET_HEADER_LEN <= u8::MAX as usize);
    const _: () = assert!(MAX_TEXT_LEN < MAX_FRAME_LEN);
    const _: () = assert!(MAX_ENVELOPE_LEN <= MAX_PAGE_BYTES);
    // A full chunk plus its few fixed fields fits in a frame.
    const _: () = assert!(MAX_BLOB_CHUNK + 64 <= MAX_FRAME_LEN);
}
