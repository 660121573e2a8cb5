//! ChaCha20-Poly1305 wrappers: message encryption and the at-rest sealing helper.
//!
//! Ratchet messages use a key and nonce derived from a single-use message key.
//! [`seal_at_rest`] is for long-lived keys (the client's outbox key) and therefore
//! uses a random 96-bit nonce stored in front of the ciphertext.

use crate::CryptoError;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use rand_core::CryptoRng;

/// Length of the random nonce prefixed by [`seal_at_rest`].
pub const AT_REST_NONCE_LEN: usize = 12;
/// Length of the Poly1305 authentication tag.
pub const TAG_LEN: usize = 16;

/// Encrypts `plaintext` with ChaCha20-Poly1305, authenticating `aad`.
pub(crate) fn encrypt(
    key: &[u8; 32],
    nonce: &[u8; 12],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    cipher
        .encrypt(
            &Nonce::from(*nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Internal("aead encrypt"))
}

/// Decrypts and authenticates; any failure is [`CryptoError::DecryptFailed`].
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
