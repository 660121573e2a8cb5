//! ChaCha20-Poly1305 wrappers: message encryption and the at-rest sealing helper.
//!
//! Ratchet messages use a key and nonce derived from a single-use message key.
//! [`seal_at_rest`] is for long-lived keys (the client's outbox key) and therefore
//! uses a random 96-bit nonce stored in front of the ciphertext.
//!
//! Backends: native builds use the `chacha20poly1305` crate (AVX2/AVX-512/NEON
//! code paths). On wasm32 with the `simd128` target feature, the crate has no
//! vector code, so the AEAD is this crate's own RFC 8439 implementation
//! ([`rfc8439`]) over a 4-way ChaCha20 core written against [`lanes::Lanes`].
//! That implementation also compiles natively, where tests check it against the
//! crate and the RFC vectors; [`crate::self_test`] runs known answers through
//! whichever backend is active, so the wasm build can check itself.

use crate::CryptoError;
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
use chacha20poly1305::aead::{Aead, Payload};
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
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

/// Encrypts `buffer` in place with ChaCha20-Poly1305, authenticating `aad`, and
/// appends the tag (reserve [`TAG_LEN`] spare capacity to avoid a reallocation).
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
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

/// Decrypts and authenticates; any failure is [`CryptoError::DecryptFailed`].
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
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
