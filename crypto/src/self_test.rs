//! Known-answer self-test of the active ChaCha20-Poly1305 backend.
//!
//! wasm32 builds with `simd128` use this crate's own AEAD rather than the
//! `chacha20poly1305` crate; native tests cannot execute that build, so the
//! same known answers are exposed as [`self_test`] for the wasm build to run on
//! itself (the wasm benchmark runs it before measuring, and a client may run it
//! at start-up).

use crate::CryptoError;
use crate::aead::{decrypt, encrypt};
use sha2::{Digest, Sha256};

/// RFC 8439 §2.8.2.
const RFC_KEY: &str = "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f";
const RFC_NONCE: &str = "070000004041424344454647";
const RFC_AAD: &str = "50515253c0c1c2c3c4c5c6c7";
const RFC_PLAINTEXT: &[u8] = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
const RFC_SEALED: &str = "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6\
3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36\
92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc\
3ff4def08e4b7a9de576d26586cec64b6116\
1ae10b594f09e26a7e902ecbd0600691";

/// Plaintext lengths around every block and 4-block boundary of the vector core.
pub(crate) const SWEEP_LENGTHS: [usize; 14] = [
    0, 1, 15, 16, 63, 64, 191, 192, 193, 255, 256, 448, 449, 1100,
];
/// SHA-256 over `seal(len)` for every length in [`SWEEP_LENGTHS`], as computed by
/// the `chacha20poly1305` crate (a native test recomputes it with the crate).
pub(crate) const SWEEP_DIGEST: &str =
    "174f42f45e1a5bec02bd94da5f1f191ff6e1c69d0e65a9da9326b6f2ef6e00c5";

fn unhex(s: &str) -> Result<Vec<u8>, CryptoError> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(CryptoError::Internal("self-test vector")),
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| match p {
            [hi, lo] => Ok(nibble(*hi)? << 4 | nibble(*lo)?),
            _ => Err(CryptoError::Internal("self-test vector")),
        })
        .collect()
}

fn array<const N: usize>(s: &str) -> Result<[u8; N], CryptoError> {
    unhex(s)?
        .try_into()
        .map_err(|_| CryptoError::Internal("self-test vector"))
}

/// Inputs of the length sweep: deterministic key, nonce, AD and plaintext.
pub(crate) fn sweep_inputs() -> ([u8; 32], [u8; 12], &'static [u8], Vec<u8>) {
    let key = core::array::from_fn(|i| (i as u8).wrapping_mul(3).wrapping_add(1));
    let nonce = core::array::from_fn(|i| 0xa0 + i as u8);
    let plaintext = (0..1100usize).map(|i| (i * 7 + i / 256) as u8).collect();
    (key, nonce, b"hush self-test", plaintext)
}

/// SHA-256 over the sealed outputs of the length sweep under `seal`.
pub(crate) fn sweep_digest(
    seal: impl Fn(&[u8; 32], &[u8; 12], &[u8], &[u8]) -> Result<Vec<u8>, CryptoError>,
) -> Result<[u8; 32], CryptoError> {
    let (key, nonce, aad, plaintext) = sweep_inputs();
    let mut h = Sha256::new();
    for len in SWEEP_LENGTHS {
        let pt = plaintext
            .get(..len)
            .ok_or(CryptoError::Internal("self-test vector"))?;
        h.update(seal(&key, &nonce, pt, aad)?);
    }
    Ok(h.finalize().into())
}

/// Runs known-answer tests through the ChaCha20-Poly1305 backend this build
/// uses: the RFC 8439 §2.8.2 vector (seal, open, tag and ciphertext tampering)
/// and a sweep of message lengths across block boundaries whose digest was
/// computed with the `chacha20poly1305` crate.
///
/// # Errors
/// [`CryptoError::Internal`] naming the check that failed; a build that fails
/// must not be used.
pub fn self_test() -> Result<(), CryptoError> {
    let fail = |what| Err(CryptoError::Internal(what));
    let key = array::<32>(RFC_KEY)?;
    let nonce = array::<12>(RFC_NONCE)?;
    let aad = unhex(RFC_AAD)?;
    let sealed = encrypt(&key, &nonce, RFC_PLAINTEXT, &aad)?;
    if sealed != unhex(RFC_SEALED)? {
        return fail("self-test: rfc 8439 seal");
    }
    if decrypt(&key, &nonce, &sealed, &aad)? != RFC_PLAINTEXT {
        return fail("self-test: rfc 8439 open");
    }
    for at in [0, sealed.len() - 1] {
        let mut bad = sealed.clone();
        bad[at] ^= 1;
        if decrypt(&key, &nonce, &bad, &aad) != Err(CryptoError::DecryptFailed) {
            return fail("self-test: tampering accepted");
        }
    }
    if decrypt(&key, &nonce, &sealed, &aad[1..]) != Err(CryptoError::DecryptFailed) {
        return fail("self-test: wrong associated data accepted");
    }
    let (key, nonce, aad, plaintext) = sweep_inputs();
    for len in SWEEP_LENGTHS {
        let pt = plaintext.get(..len).ok_or(CryptoError::Internal("sweep"))?;
        if decrypt(&key, &nonce, &encrypt(&key, &nonce, pt, aad)?, aad)? != pt {
            return fail("self-test: round trip");
        }
    }
    if sweep_digest(encrypt)? != array::<32>(SWEEP_DIGEST)? {
        return fail("self-test: length sweep");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_digest_is_what_the_crate_computes() {
        // Native `encrypt` is ring; the digest was computed with the
        // chacha20poly1305 crate, so this checks one against the other.
        let digest = sweep_digest(encrypt).unwrap();
        assert_eq!(hex::encode(digest), SWEEP_DIGEST);
    }

    #[test]
    fn self_test_passes_on_this_build() {
        self_test().unwrap();
    }

    #[test]
    fn vector_core_produces_the_same_sweep() {
        use crate::aead::{lanes::Portable, rfc8439};
        let digest = sweep_digest(rfc8439::seal::<Portable>).unwrap();
        assert_eq!(hex::encode(digest), SWEEP_DIGEST);
    }
}
