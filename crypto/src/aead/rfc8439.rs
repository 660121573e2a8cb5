//! The ChaCha20-Poly1305 AEAD construction (RFC 8439 §2.8) over the 4-way
//! ChaCha20 core and the radix-2^26 Poly1305.
//!
//! Output layout is the `chacha20poly1305` crate's: `ciphertext ‖ tag`. Opening
//! decrypts into a fresh buffer while authenticating the ciphertext and releases
//! the plaintext only if the tag matches (the buffer is wiped otherwise).

use super::TAG_LEN;
use super::chacha20::{ChaCha20, xor_with_poly_key};
use super::lanes::Lanes;
use super::poly1305::Poly1305;
use crate::CryptoError;
use zeroize::{Zeroize, Zeroizing};

/// MAC over `aad ‖ pad16 ‖ ct ‖ pad16 ‖ len(aad) ‖ len(ct)` (lengths as u64 LE).
fn tag<L: Lanes>(poly_key: &[u8; 32], aad: &[u8], ciphertext: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = Poly1305::new(poly_key);
    mac.update_padded::<L>(aad);
    mac.update_padded::<L>(ciphertext);
    let mut lengths = [0u8; 16];
    lengths[..8].copy_from_slice(&(aad.len() as u64).to_le_bytes());
    lengths[8..].copy_from_slice(&(ciphertext.len() as u64).to_le_bytes());
    mac.block(&lengths);
    mac.finalize()
}

/// Encrypts `buffer` in place, authenticating `aad`, and appends the tag.
pub(crate) fn seal_in_place<L: Lanes>(
    key: &[u8; 32],
    nonce: &[u8; 12],
    buffer: &mut Vec<u8>,
    aad: &[u8],
) -> Result<(), CryptoError> {
    let poly_key = Zeroizing::new(xor_with_poly_key::<L>(&ChaCha20::new(key, nonce), buffer)?);
    let t = tag::<L>(&poly_key, aad, buffer);
    buffer.extend_from_slice(&t);
    Ok(())
}

/// Encrypts `plaintext`, authenticating `aad`; returns `ciphertext ‖ tag`.
#[cfg(test)]
pub(crate) fn seal<L: Lanes>(
    key: &[u8; 32],
    nonce: &[u8; 12],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    seal_in_place::<L>(key, nonce, &mut out, aad)?;
    Ok(out)
}

/// Authenticates and decrypts `ciphertext ‖ tag`.
///
/// # Errors
/// [`CryptoError::DecryptFailed`] if the input is shorter than a tag or the tag
/// does not match.
pub(crate) fn open<L: Lanes>(
    key: &[u8; 32],
    nonce: &[u8; 12],
    sealed: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let body_len = sealed
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(CryptoError::DecryptFailed)?;
    let (body, received) = sealed.split_at(body_len);
    let mut out = body.to_vec();
    let poly_key = Zeroizing::new(
        xor_with_poly_key::<L>(&ChaCha20::new(key, nonce), &mut out)
            .map_err(|_| CryptoError::DecryptFailed)?,
    );
    let expected = tag::<L>(&poly_key, aad, body);
    // Constant time: fold every byte difference before looking at the result.
    let diff = expected
        .iter()
        .zip(received)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if core::hint::black_box(diff) != 0 {
        out.zeroize();
        return Err(CryptoError::DecryptFailed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::lanes::Portable;
    use super::*;
    use chacha20poly1305::aead::{Aead, Payload};
    use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
    use proptest::prelude::*;

    fn reference(key: &[u8; 32], nonce: &[u8; 12], pt: &[u8], aad: &[u8]) -> Vec<u8> {
        ChaCha20Poly1305::new(&(*key).into())
            .encrypt(&(*nonce).into(), Payload { msg: pt, aad })
            .unwrap()
    }

    #[test]
    fn every_length_up_to_five_batches_matches_the_crate() {
        let key = [0x11u8; 32];
        let nonce = [0x22u8; 12];
        let pt: Vec<u8> = (0..1300u32).map(|i| (i * 31) as u8).collect();
        for len in 0..=pt.len() {
            let aad = &pt[..len % 40];
            let sealed = seal::<Portable>(&key, &nonce, &pt[..len], aad).unwrap();
            assert_eq!(
                sealed,
                reference(&key, &nonce, &pt[..len], aad),
                "len {len}"
            );
            assert_eq!(
                open::<Portable>(&key, &nonce, &sealed, aad).unwrap(),
                &pt[..len]
            );
        }
    }

    #[test]
    fn open_rejects_short_input_and_any_flipped_bit() {
        let key = [1u8; 32];
        let nonce = [2u8; 12];
        for short in 0..TAG_LEN {
            assert_eq!(
                open::<Portable>(&key, &nonce, &vec![0u8; short], b""),
                Err(CryptoError::DecryptFailed)
            );
        }
        let sealed = seal::<Portable>(&key, &nonce, b"attack at dawn", b"hdr").unwrap();
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                open::<Portable>(&key, &nonce, &bad, b"hdr"),
                Err(CryptoError::DecryptFailed),
                "bit {i}"
            );
        }
        assert_eq!(
            open::<Portable>(&[3u8; 32], &nonce, &sealed, b"hdr"),
            Err(CryptoError::DecryptFailed)
        );
        assert_eq!(
            open::<Portable>(&key, &[3u8; 12], &sealed, b"hdr"),
            Err(CryptoError::DecryptFailed)
        );
    }

    proptest! {
        #[test]
        fn seal_matches_the_crate_and_opens(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 12]>(),
            aad in prop::collection::vec(any::<u8>(), 0..100),
            pt in prop::collection::vec(any::<u8>(), 0..3000),
        ) {
            let sealed = seal::<Portable>(&key, &nonce, &pt, &aad).unwrap();
            prop_assert_eq!(&sealed, &reference(&key, &nonce, &pt, &aad));
            prop_assert_eq!(open::<Portable>(&key, &nonce, &sealed, &aad).unwrap(), pt);
        }
    }
}
