//! Length-hiding padding applied to every ratchet plaintext.
//!
//! Ciphertext length leaks plaintext length; the relay sees every envelope, so
//! plaintexts are padded to a small set of bucket sizes: powers of two from 64
//! bytes up to 16 KiB, then multiples of 16 KiB. The scheme is ISO/IEC 7816-4
//! (one `0x80` byte, then zeros), which is unambiguous for any plaintext,
//! including ones ending in zero bytes. [`unpad`] accepts only the canonical
//! padding (smallest bucket), so each padded string has exactly one meaning.

use crate::CryptoError;

/// Smallest bucket.
pub const MIN_BUCKET: usize = 64;
/// Largest power-of-two bucket; above it buckets grow in steps of this size.
pub const LARGE_BUCKET_STEP: usize = 16 * 1024;

const MARKER: u8 = 0x80;

/// The padded size for a plaintext of `len` bytes (always `> len`).
pub fn padded_len(len: usize) -> usize {
    let needed = len.saturating_add(1);
    if needed <= MIN_BUCKET {
        MIN_BUCKET
    } else if needed <= LARGE_BUCKET_STEP {
        needed.next_power_of_two()
    } else {
        needed
            .div_ceil(LARGE_BUCKET_STEP)
            .saturating_mul(LARGE_BUCKET_STEP)
    }
}

/// Pads `plaintext` to its bucket: `plaintext ‖ 0x80 ‖ 0x00…`.
pub fn pad(plaintext: &[u8]) -> Vec<u8> {
    let total = padded_len(plaintext.len());
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(plaintext);
    out.push(MARKER);
    out.resize(total, 0);
    out
}

/// Removes padding added by [`pad`].
///
/// # Errors
/// [`CryptoError::BadPadding`] if the length is not a bucket size, the marker is
/// missing, or a smaller bucket would have fitted (non-canonical).
pub fn unpad(padded: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let marker = padded
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(CryptoError::BadPadding)?;
    if padded.get(marker) != Some(&MARKER) || padded_len(marker) != padded.len() {
        return Err(CryptoError::BadPadding);
    }
    Ok(padded[..marker].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_boundaries() {
        assert_eq!(padded_len(0), 64);
        assert_eq!(padded_len(63), 64);
        assert_eq!(padded_len(64), 128);
        assert_eq!(padded_len(1024), 2048);
        assert_eq!(padded_len(1023), 1024);
        assert_eq!(padded_len(16383), 16384);
        assert_eq!(padded_len(16384), 32768);
        assert_eq!(padded_len(40000), 49152);
    }

    #[test]
    fn round_trip_including_trailing_zeros_and_markers() {
        for len in [0usize, 1, 62, 63, 64, 65, 1000, 16383, 16384, 20000] {
            for fill in [0u8, 0x80, 0xff] {
                let pt = vec![fill; len];
                let p = pad(&pt);
                assert_eq!(p.len(), padded_len(len));
                assert_eq!(unpad(&p).unwrap(), pt);
            }
        }
    }

    #[test]
    fn rejects_non_canonical() {
        assert_eq!(unpad(&[]), Err(CryptoError::BadPadding));
        assert_eq!(unpad(&[0u8; 64]), Err(CryptoError::BadPadding));
        let mut p = pad(b"hi");
        p[2] = 0x81;
        assert_eq!(unpad(&p), Err(CryptoError::BadPadding));
        // Right marker, wrong (too big) bucket.
        let mut big = vec![0u8; 128];
        big[0] = 0x80;
        assert_eq!(unpad(&big), Err(CryptoError::BadPadding));
        // Not a bucket size at all.
        let mut odd = vec![0u8; 65];
        odd[64] = 0x80;
        assert_eq!(unpad(&odd), Err(CryptoError::BadPadding));
    }
}
