//! Length-hiding padding applied to every ratchet plaintext.
//!
//! Ciphertext length leaks plaintext length; the relay sees every envelope, so
//! plaintexts are padded to a small set of bucket sizes:
//!
//! - up to [`PADME_THRESHOLD`] (512 bytes): powers of two from [`MIN_BUCKET`]
//!   (64, 128, 256, 512). Short texts are where an exact length says the most
//!   (a "yes" versus a sentence), and padding them coarsely costs at most a few
//!   hundred bytes of work.
//! - above it: Padmé (Nikitin et al., "Reducing Metadata Leakage from Encrypted
//!   Files and Communication with PURBs", PETS 2019). A length `L` with
//!   `E = ⌊log2 L⌋` is rounded up to a multiple of `2^(E − ⌊log2 E⌋ − 1)`, so
//!   each doubling of size has at most 16 buckets: at most 12% overhead (a 1 KiB
//!   message costs 1,088 bytes instead of the 2,048 a power-of-two bucket
//!   would), while a bucket reveals only `O(log log L)` bits of the length.
//!
//! The scheme is ISO/IEC 7816-4 (one `0x80` byte, then zeros), which is
//! unambiguous for any plaintext, including ones ending in zero bytes. [`unpad`]
//! accepts only the canonical padding (smallest bucket), so each padded string
//! has exactly one meaning. `docs/SECURITY.md` ("Padding") discusses the
//! trade-off.

use crate::CryptoError;

/// Smallest bucket.
pub const MIN_BUCKET: usize = 64;
/// Largest power-of-two bucket; longer plaintexts use Padmé buckets.
pub const PADME_THRESHOLD: usize = 512;
/// Former step of the buckets above 16 KiB (multiples of 16 KiB).
#[deprecated(note = "padding above 512 bytes now uses Padmé buckets; see `padded_len`")]
pub const LARGE_BUCKET_STEP: usize = 16 * 1024;

const MARKER: u8 = 0x80;

/// The padded size for a plaintext of `len` bytes (always `> len`).
pub fn padded_len(len: usize) -> usize {
    // One byte for the marker.
    let needed = len.saturating_add(1);
    if needed <= MIN_BUCKET {
        MIN_BUCKET
    } else if needed <= PADME_THRESHOLD {
        needed.next_power_of_two()
    } else {
        padme(needed)
    }
}

/// Padmé: rounds `len` (> 0) up so that only its top `⌊log2 E⌋ + 1` bits
/// (E = ⌊log2 len⌋) can be non-zero.
fn padme(len: usize) -> usize {
    let e = len.ilog2();
    let s = e.ilog2() + 1;
    let mask = (1usize << (e - s)) - 1;
    // Cannot overflow for any length that fits in memory; saturate regardless.
    len.checked_add(mask).map_or(usize::MAX, |l| l & !mask)
}

/// Pads `plaintext` to its bucket: `plaintext ‖ 0x80 ‖ 0x00…`.
pub fn pad(plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(padded_len(plaintext.len()));
    pad_into(plaintext, &mut out);
    out
}

/// Appends `plaintext ‖ 0x80 ‖ 0x00…` (its bucket size) to `out`; lets the
/// ratchet pad straight into the buffer it then encrypts in place.
pub(crate) fn pad_into(plaintext: &[u8], out: &mut Vec<u8>) {
    let end = out.len() + padded_len(plaintext.len());
    out.extend_from_slice(plaintext);
    out.push(MARKER);
    out.resize(end, 0);
}

/// Length of the plaintext inside canonically padded `padded`.
fn unpadded_len(padded: &[u8]) -> Result<usize, CryptoError> {
    let marker = padded
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(CryptoError::BadPadding)?;
    if padded.get(marker) != Some(&MARKER) || padded_len(marker) != padded.len() {
        return Err(CryptoError::BadPadding);
    }
    Ok(marker)
}

/// Removes padding added by [`pad`].
///
/// # Errors
/// [`CryptoError::BadPadding`] if the length is not a bucket size, the marker is
/// missing, or a smaller bucket would have fitted (non-canonical).
pub fn unpad(padded: &[u8]) -> Result<Vec<u8>, CryptoError> {
    Ok(padded[..unpadded_len(padded)?].to_vec())
}

/// [`unpad`] without a copy: truncates `padded` to the plaintext. The buffer is
/// wiped if the padding is invalid (it holds decrypted data).
pub(crate) fn unpad_owned(mut padded: Vec<u8>) -> Result<Vec<u8>, CryptoError> {
    match unpadded_len(&padded) {
        Ok(len) => {
            // Only the marker and zeros remain beyond `len`: nothing to wipe.
            padded.truncate(len);
            Ok(padded)
        }
        Err(e) => {
            zeroize::Zeroize::zeroize(&mut padded);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_boundaries() {
        assert_eq!(padded_len(0), 64);
        assert_eq!(padded_len(63), 64);
        assert_eq!(padded_len(64), 128);
        assert_eq!(padded_len(255), 256);
        assert_eq!(padded_len(256), 512);
        assert_eq!(padded_len(511), 512);
        // Padmé above 512 bytes: 512..1024 in steps of 32, 1024..2048 in steps of 64.
        assert_eq!(padded_len(512), 544);
        assert_eq!(padded_len(1023), 1024);
        assert_eq!(padded_len(1024), 1088);
        assert_eq!(padded_len(1087), 1088);
        assert_eq!(padded_len(1088), 1152);
        assert_eq!(padded_len(16383), 16384);
        assert_eq!(padded_len(16384), 17408);
        assert_eq!(padded_len(40000), 40960);
        assert_eq!(padded_len(64 * 1024), 67584);
    }

    /// Reference Padmé exactly as written in the paper (floating-point free form).
    fn padme_reference(l: u64) -> u64 {
        let e = 63 - u64::from(l.leading_zeros());
        let s = 64 - u64::from(e.leading_zeros());
        let last_bits = e - s;
        let bit_mask = (1u64 << last_bits) - 1;
        (l + bit_mask) & !bit_mask
    }

    #[test]
    fn matches_padme_and_bounds_overhead_and_bucket_count() {
        let mut buckets = std::collections::BTreeSet::new();
        let mut prev = 0;
        for len in 0..70_000usize {
            let p = padded_len(len);
            assert!(p > len, "{len}");
            assert!(p >= prev, "monotone at {len}");
            prev = p;
            if len >= PADME_THRESHOLD {
                assert_eq!(p as u64, padme_reference(len as u64 + 1), "{len}");
                // Padmé's bound: at most ~12% larger than the marker-extended length.
                assert!((p - len - 1) * 100 <= (len + 1) * 12, "{len} -> {p}");
            } else {
                assert!(p.is_power_of_two() && p >= MIN_BUCKET, "{len} -> {p}");
            }
            buckets.insert(p);
        }
        // 64..512: 4 buckets; each octave from 512 to 64 KiB: 16 buckets; 65 KiB..70 KiB: 4.
        let per_octave = |lo: usize| buckets.iter().filter(|&&b| b > lo && b <= 2 * lo).count();
        for lo in [512, 1024, 2048, 4096, 8192, 16384, 32768] {
            assert_eq!(per_octave(lo), 16, "octave above {lo}");
        }
        assert_eq!(buckets.iter().filter(|&&b| b <= 512).count(), 4);
    }

    #[test]
    fn never_below_len_even_at_the_top_of_usize() {
        for len in [usize::MAX - 1, usize::MAX / 2, usize::MAX / 2 + 1] {
            assert!(padded_len(len) > len || padded_len(len) == usize::MAX);
        }
    }

    #[test]
    fn round_trip_including_trailing_zeros_and_markers() {
        for len in [
            0usize, 1, 62, 63, 64, 65, 511, 512, 1000, 1024, 1087, 16383, 16384, 20000,
        ] {
            for fill in [0u8, 0x80, 0xff] {
                let pt = vec![fill; len];
                let p = pad(&pt);
                assert_eq!(p.len(), padded_len(len));
                assert_eq!(unpad(&p).unwrap(), pt);
            }
        }
    }

    #[test]
    fn owned_and_borrowed_forms_agree() {
        for len in [0usize, 5, 63, 64, 600, 1024, 3000] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = vec![9u8; 3];
            pad_into(&pt, &mut buf);
            assert_eq!(&buf[..3], &[9, 9, 9]);
            assert_eq!(&buf[3..], pad(&pt).as_slice());
            assert_eq!(unpad_owned(buf[3..].to_vec()).unwrap(), pt);
        }
        assert_eq!(unpad_owned(vec![0u8; 64]), Err(CryptoError::BadPadding));
        assert_eq!(unpad_owned(vec![1u8; 64]), Err(CryptoError::BadPadding));
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
        // The same above the Padmé threshold: 1,000 bytes fit 1,024, not 1,088.
        let mut big = pad(&[7u8; 1000]);
        big.resize(1088, 0);
        assert_eq!(unpad(&big), Err(CryptoError::BadPadding));
        // The old power-of-two bucket for a 1 KiB text is no longer canonical.
        let mut old = vec![1u8; 1024];
        old.push(0x80);
        old.resize(2048, 0);
        assert_eq!(unpad(&old), Err(CryptoError::BadPadding));
        // Not a bucket size at all.
        let mut odd = vec![0u8; 65];
        odd[64] = 0x80;
        assert_eq!(unpad(&odd), Err(CryptoError::BadPadding));
    }
}
