//! ChaCha20-Poly1305 wrappers: message encryption and the at-rest sealing helper.
//!
//! Ratchet messages use a key and nonce derived from a single-use message key.
//! [`seal_at_rest`] is for long-lived keys (the client's outbox key) and therefore
//! uses a random 96-bit nonce stored in front of the ciphertext.
//!
//! Backends, all the same RFC 8439 AEAD (same bytes for the same inputs):
//!
//! - native builds use `ring` (the assembly of BoringSSL, chosen at run time
//!   for the CPU). The `chacha20poly1305` crate was the native backend first;
//!   its AVX2 Poly1305 calls its vector intrinsics as out-of-line functions
//!   (helpers without the `avx2` target feature cannot inline them), and a
//!   1 KiB seal plus open cost 4.8 µs against ring's 1.5 µs. A backlog
//!   catch-up opens every envelope and seals every stored record, so that was
//!   a quarter of its CPU. `ring` is already linked for TLS and QUIC.
//! - wasm32 without `simd128` uses the `chacha20poly1305` crate.
//! - wasm32 with the `simd128` target feature, where the crate has no vector
//!   code, uses this crate's own implementation ([`rfc8439`]) over a 4-way
//!   ChaCha20 core written against [`lanes::Lanes`].
//!
//! The own implementation also compiles natively, where tests check it against
//! the crate, `ring` and the RFC vectors; [`crate::self_test`] runs known
//! answers through whichever backend is active, so the wasm build can check
//! itself.
//!
//! `ring`'s key object is not wiped when dropped. It lives on the stack for
//! one call, as do the crate's own copies of the key (`Key::from(*key)`);
//! the long-lived keys themselves are held in zeroizing types by the callers.

use crate::CryptoError;
#[cfg(all(target_arch = "wasm32", not(target_feature = "simd128")))]
use chacha20poly1305::aead::{Aead, Payload};
#[cfg(all(target_arch = "wasm32", not(target_feature = "simd128")))]
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use rand_core::CryptoRng;

#[cfg(any(test, all(target_arch = "wasm32", target_feature = "simd128")))]
mod chacha20;
#[cfg(any(test, all(target_arch = "wasm32", target_feature = "simd128")))]
pub(crate) mod lanes;
#[cfg(any(test, all(target_arch = "wasm32", target_feature = "simd128")))]
mod poly1305;
#[cfg(any(test, all(target_arch = "wasm32", target_feature = "simd128")))]
pub(crate) mod rfc8439;

/// Length of the random nonce prefixed by [`seal_at_rest`].
pub const AT_REST_NONCE_LEN: usize = 12;
/// Length of the Poly1305 authentication tag.
pub const TAG_LEN: usize = 16;

/// Encrypts `buffer` in place with ChaCha20-Poly1305, authenticating `aad`, and
/// appends the tag (reserve [`TAG_LEN`] spare capacity to avoid a reallocation).
/// wasm32 `simd128` backend.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(crate) fn encrypt_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    buffer: &mut Vec<u8>,
    aad: &[u8],
) -> Result<(), CryptoError> {
    rfc8439::seal_in_place::<lanes::Simd128>(key, nonce, buffer, aad)
}

/// Decrypts and authenticates; any failure is [`CryptoError::DecryptFailed`]
/// (wasm32 `simd128` backend).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(crate) fn decrypt(
    key: &[u8; 32],
    nonce: &[u8; 12],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    rfc8439::open::<lanes::Simd128>(key, nonce, ciphertext, aad)
}

/// A `ring` key for one operation.
#[cfg(not(target_arch = "wasm32"))]
fn ring_key(key: &[u8; 32]) -> Result<ring::aead::LessSafeKey, CryptoError> {
    let key = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key)
        .map_err(|_| CryptoError::Internal("aead key"))?;
    Ok(ring::aead::LessSafeKey::new(key))
}

/// Encrypts `buffer` in place with ChaCha20-Poly1305, authenticating `aad`, and
/// appends the tag (reserve [`TAG_LEN`] spare capacity to avoid a reallocation).
/// Native backend (`ring`).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn encrypt_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    buffer: &mut Vec<u8>,
    aad: &[u8],
) -> Result<(), CryptoError> {
    ring_key(key)?
        .seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(*nonce),
            ring::aead::Aad::from(aad),
            buffer,
        )
        .map_err(|_| CryptoError::Internal("aead encrypt"))
}

/// Decrypts and authenticates; any failure is [`CryptoError::DecryptFailed`]
/// (native backend, `ring`).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn decrypt(
    key: &[u8; 32],
    nonce: &[u8; 12],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if ciphertext.len() < TAG_LEN {
        return Err(CryptoError::DecryptFailed);
    }
    let mut buffer = ciphertext.to_vec();
    let opened = ring_key(key)?
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key(*nonce),
            ring::aead::Aad::from(aad),
            &mut buffer,
        )
        .map(|plaintext| plaintext.len());
    match opened {
        Ok(len) => {
            buffer.truncate(len);
            Ok(buffer)
        }
        Err(_) => {
            // ring leaves the buffer's contents unspecified on failure.
            zeroize::Zeroize::zeroize(&mut buffer);
            Err(CryptoError::DecryptFailed)
        }
    }
}

/// Encrypts `buffer` in place with ChaCha20-Poly1305, authenticating `aad`, and
/// appends the tag (reserve [`TAG_LEN`] spare capacity to avoid a reallocation).
/// wasm32 backend without `simd128` (the `chacha20poly1305` crate).
#[cfg(all(target_arch = "wasm32", not(target_feature = "simd128")))]
pub(crate) fn encrypt_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    buffer: &mut Vec<u8>,
    aad: &[u8],
) -> Result<(), CryptoError> {
    use chacha20poly1305::aead::AeadInOut;
    ChaCha20Poly1305::new(&Key::from(*key))
        .encrypt_in_place(&Nonce::from(*nonce), aad, buffer)
        .map_err(|_| CryptoError::Internal("aead encrypt"))
}

/// Encrypts `plaintext` with ChaCha20-Poly1305, authenticating `aad`; returns
/// `ciphertext ‖ tag`.
pub(crate) fn encrypt(
    key: &[u8; 32],
    nonce: &[u8; 12],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut buffer = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buffer.extend_from_slice(plaintext);
    if let Err(e) = encrypt_in_place(key, nonce, &mut buffer, aad) {
        zeroize::Zeroize::zeroize(&mut buffer);
        return Err(e);
    }
    Ok(buffer)
}

/// Decrypts and authenticates; any failure is [`CryptoError::DecryptFailed`]
/// (wasm32 backend without `simd128`, the `chacha20poly1305` crate).
#[cfg(all(target_arch = "wasm32", not(target_feature = "simd128")))]
pub(crate) fn decrypt(
    key: &[u8; 32],
    nonce: &[u8; 12],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    cipher
        .decrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| CryptoError::DecryptFailed)
}

/// Seals `plaintext` under a long-lived 32-byte key for storage.
///
/// Output layout: `nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)`. The nonce is
/// random, so keep the number of messages per key well below 2^32 (birthday bound
/// on 96-bit nonces); rotate the key long before that.
///
/// # Errors
/// Only [`CryptoError::Internal`] if the plaintext exceeds ChaCha20's 256 GiB limit.
pub fn seal_at_rest<R: CryptoRng + ?Sized>(
    key: &[u8; 32],
    nonce_rng: &mut R,
    plaintext: &[u8],
    ad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; AT_REST_NONCE_LEN];
    nonce_rng.fill_bytes(&mut nonce);
    let ct = encrypt(key, &nonce, plaintext, ad)?;
    let mut out = Vec::with_capacity(AT_REST_NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens a blob produced by [`seal_at_rest`] with the same key and `ad`.
///
/// # Errors
/// [`CryptoError::Truncated`] if shorter than nonce + tag,
/// [`CryptoError::DecryptFailed`] on any authentication failure.
pub fn open_at_rest(key: &[u8; 32], sealed: &[u8], ad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < AT_REST_NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Truncated);
    }
    let (nonce, ct) = sealed.split_at(AT_REST_NONCE_LEN);
    let nonce: [u8; AT_REST_NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Truncated)?;
    decrypt(key, &nonce, ct, ad)
}

/// The nonce of chunk `index` of a STREAM-sealed archive (Hoang, Reyhanitabar,
/// Rogaway, Vizár): the chunk index as 8 big-endian bytes, three zero bytes
/// and a last-chunk flag (1 on the final chunk, else 0). A chunk therefore
/// opens only at its own position, and only the final chunk opens as final,
/// so reordering, dropping or truncating chunks is detected.
fn stream_nonce(index: u64, last: bool) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    nonce
}

/// Seal chunk `index` of a STREAM archive under a one-time `key` (never
/// reuse a key for two archives). Output: ciphertext ‖ 16-byte tag.
pub fn seal_stream_chunk(
    key: &[u8; 32],
    index: u64,
    last: bool,
    plaintext: &[u8],
    ad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    encrypt(key, &stream_nonce(index, last), plaintext, ad)
}

/// Open chunk `index` of a STREAM archive; fails unless it was sealed at this
/// position with this `last` flag, key and associated data.
pub fn open_stream_chunk(
    key: &[u8; 32],
    index: u64,
    last: bool,
    sealed: &[u8],
    ad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < TAG_LEN {
        return Err(CryptoError::Truncated);
    }
    decrypt(key, &stream_nonce(index, last), sealed, ad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::aead::{Aead, Payload};
    use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
    use proptest::prelude::*;

    /// The `chacha20poly1305` crate: the reference for whichever backend
    /// this build uses.
    fn reference(key: &[u8; 32], nonce: &[u8; 12], pt: &[u8], aad: &[u8]) -> Vec<u8> {
        ChaCha20Poly1305::new(&(*key).into())
            .encrypt(&(*nonce).into(), Payload { msg: pt, aad })
            .unwrap()
    }

    proptest! {
        #[test]
        fn the_backend_seals_what_the_crate_seals_and_opens_it(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 12]>(),
            pt in proptest::collection::vec(any::<u8>(), 0..2048),
            aad in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let sealed = encrypt(&key, &nonce, &pt, &aad).unwrap();
            prop_assert_eq!(&sealed, &reference(&key, &nonce, &pt, &aad));
            prop_assert_eq!(decrypt(&key, &nonce, &sealed, &aad).unwrap(), pt);
        }

        #[test]
        fn any_flipped_bit_fails_to_open(
            key in any::<[u8; 32]>(),
            pt in proptest::collection::vec(any::<u8>(), 0..300),
            bit in any::<prop::sample::Index>(),
        ) {
            let nonce = [9u8; 12];
            let mut sealed = encrypt(&key, &nonce, &pt, b"ad").unwrap();
            let i = bit.index(sealed.len() * 8);
            sealed[i / 8] ^= 1 << (i % 8);
            prop_assert_eq!(decrypt(&key, &nonce, &sealed, b"ad"), Err(CryptoError::DecryptFailed));
        }
    }

    #[test]
    fn short_or_foreign_ciphertexts_fail_cleanly() {
        let key = [1u8; 32];
        let nonce = [2u8; 12];
        for len in 0..TAG_LEN {
            assert_eq!(
                decrypt(&key, &nonce, &vec![0u8; len], b""),
                Err(CryptoError::DecryptFailed)
            );
        }
        let sealed = encrypt(&key, &nonce, b"hello", b"ad").unwrap();
        assert_eq!(
            decrypt(&[3u8; 32], &nonce, &sealed, b"ad"),
            Err(CryptoError::DecryptFailed)
        );
        assert_eq!(
            decrypt(&key, &nonce, &sealed, b"other ad"),
            Err(CryptoError::DecryptFailed)
        );
    }
}
