//! Key derivation: every KDF the protocol uses, in one place.
//!
//! Keeping the derivations together makes the key hierarchy auditable (it is
//! mirrored in `docs/SECURITY.md`) and guarantees every use has its own
//! domain-separation label, so no two derivations can ever produce related keys.
//!
//! | function | construction | label |
//! |---|---|---|
//! | [`x3dh_secret`] | HKDF-SHA256, salt = 32 zero bytes, IKM = 32×`0xFF` ‖ DH1..DH4 | `hush-x3dh-v1` |
//! | [`root_step`] (KDF_RK) | HKDF-SHA256, salt = root key, IKM = DH output → RK′ ‖ CK ‖ seed | `hush-ratchet-v1` |
//! | [`chain_step`] (KDF_CK) | HMAC-SHA256(CK, `0x01`) = MK, HMAC-SHA256(CK, `0x02`) = CK′ | — |
//! | [`next_seed`] | HMAC-SHA256(seed, `0x03`) | — |
//! | [`reseed_chain`] | HKDF-SHA256, salt = seed, IKM = DH(E, peer ratchet key) | `hush-reseed-v1` ‖ gen ‖ E |
//! | [`message_keys`] | HKDF-SHA256-Expand, PRK = MK → key (32) ‖ nonce (12) | `hush-message-v1` |

use crate::CryptoError;
use crate::secret::Secret32;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// HKDF info label for the X3DH shared secret.
pub const X3DH_INFO: &[u8] = b"hush-x3dh-v1";
/// HKDF info label for root-chain steps (KDF_RK).
pub const RATCHET_INFO: &[u8] = b"hush-ratchet-v1";
/// HKDF info label prefix for sender-side chain reseeds.
pub const RESEED_INFO: &[u8] = b"hush-reseed-v1";
/// HKDF info label that expands a message key into an AEAD key and nonce.
pub const MESSAGE_INFO: &[u8] = b"hush-message-v1";

const CK_MESSAGE: u8 = 0x01;
const CK_CHAIN: u8 = 0x02;
const SEED_NEXT: u8 = 0x03;

/// HKDF-SHA256 extract-and-expand into `out`.
pub(crate) fn hkdf(
    salt: &[u8],
    ikm: &[u8],
    info: &[&[u8]],
    out: &mut [u8],
) -> Result<(), CryptoError> {
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand_multi_info(info, out)
        .map_err(|_| CryptoError::Internal("hkdf output length"))
}

fn hmac_key(key: &[u8; 32]) -> Result<Hmac<Sha256>, CryptoError> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .map_err(|_| CryptoError::Internal("hmac key length"))
}

fn hmac_finish(mut mac: Hmac<Sha256>, byte: u8) -> Secret32 {
    mac.update(&[byte]);
    let tag = mac.finalize().into_bytes();
    let mut out = Secret32([0u8; 32]);
    out.0.copy_from_slice(&tag);
    out
}

/// HMAC-SHA256(key, [byte]).
fn hmac_byte(key: &[u8; 32], byte: u8) -> Result<Secret32, CryptoError> {
    Ok(hmac_finish(hmac_key(key)?, byte))
}

/// Derives the X3DH shared secret `SK` from the concatenated DH outputs.
pub(crate) fn x3dh_secret(dh_outputs: &[&Secret32]) -> Result<Secret32, CryptoError> {
    // X3DH §2.2: F = 32 0xFF bytes prepended for curve25519 so the IKM can never
    // collide with an XEdDSA/other-protocol input; salt = zero-filled hash length.
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * (dh_outputs.len() + 1)));
    ikm.extend_from_slice(&[0xFF; 32]);
    for dh in dh_outputs {
        ikm.extend_from_slice(dh.bytes());
    }
    let mut out = Secret32([0u8; 32]);
    hkdf(&[0u8; 32], &ikm, &[X3DH_INFO], &mut out.0)?;
    Ok(out)
}

/// Output of one root-chain step.
pub(crate) struct RootStep {
    pub(crate) root_key: Secret32,
    pub(crate) chain_key: Secret32,
    /// Seed of the chain's reseed hash chain (generation 1).
    pub(crate) seed: Secret32,
}

/// KDF_RK: mixes a DH output into the root key; yields the new root key, the new
/// chain key, and the first reseed seed of that chain.
pub(crate) fn root_step(root_key: &Secret32, dh: &Secret32) -> Result<RootStep, CryptoError> {
    let mut okm = Zeroizing::new([0u8; 96]);
    hkdf(root_key.bytes(), dh.bytes(), &[RATCHET_INFO], okm.as_mut())?;
    let mut step = RootStep {
        root_key: Secret32([0u8; 32]),
        chain_key: Secret32([0u8; 32]),
        seed: Secret32([0u8; 32]),
    };
    step.root_key.0.copy_from_slice(&okm[..32]);
    step.chain_key.0.copy_from_slice(&okm[32..64]);
    step.seed.0.copy_from_slice(&okm[64..]);
    Ok(step)
}

/// KDF_CK: advances a chain key; returns `(next_chain_key, message_key)`.
pub(crate) fn chain_step(chain_key: &Secret32) -> Result<(Secret32, Secret32), CryptoError> {
    // Both outputs use the same key: run the HMAC key schedule once and clone it.
    let keyed = hmac_key(chain_key.bytes())?;
    let mk = hmac_finish(keyed.clone(), CK_MESSAGE);
    let ck = hmac_finish(keyed, CK_CHAIN);
    Ok((ck, mk))
}

/// Advances the per-chain reseed hash chain: seed(g+1) = HMAC(seed(g), 0x03).
///
/// A one-way hash chain (rather than one stored master seed) so that holding the
/// current seed reveals nothing about generations already used.
pub(crate) fn next_seed(seed: &Secret32) -> Result<Secret32, CryptoError> {
    hmac_byte(seed.bytes(), SEED_NEXT)
}

/// Derives the chain key of reseed generation `generation` from its seed and the
/// fresh DH output `DH(E, peer ratchet key)`; binds the generation and `E`.
pub(crate) fn reseed_chain(
    seed: &Secret32,
    dh: &Secret32,
    generation: u32,
    reseed_pub: &[u8; 32],
) -> Result<Secret32, CryptoError> {
    let mut out = Secret32([0u8; 32]);
    hkdf(
        seed.bytes(),
        dh.bytes(),
        &[RESEED_INFO, &generation.to_be_bytes(), reseed_pub],
        &mut out.0,
    )?;
    Ok(out)
}

/// AEAD key and nonce derived from one message key.
pub(crate) struct MessageKeys {
    pub(crate) key: Zeroizing<[u8; 32]>,
    pub(crate) nonce: [u8; 12],
}

/// Expands a message key into a ChaCha20-Poly1305 key and nonce. Each message key
/// is used exactly once, so a deterministic nonce is safe.
///
/// The message key is already a uniformly random PRF output, so it is used
/// directly as the HKDF pseudorandom key (HKDF-Expand only, RFC 5869 §3.3), which
/// saves an HMAC per message.
pub(crate) fn message_keys(mk: &Secret32) -> Result<MessageKeys, CryptoError> {
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::from_prk(mk.bytes())
        .map_err(|_| CryptoError::Internal("hkdf prk length"))?
        .expand(MESSAGE_INFO, okm.as_mut())
        .map_err(|_| CryptoError::Internal("hkdf output length"))?;
    let mut keys = MessageKeys {
        key: Zeroizing::new([0u8; 32]),
        nonce: [0u8; 12],
    };
    keys.key.copy_from_slice(&okm[..32]);
    keys.nonce.copy_from_slice(&okm[32..]);
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_step_outputs_differ_and_are_deterministic() {
        let ck = Secret32([7u8; 32]);
        let (a1, m1) = chain_step(&ck).unwrap();
        let (a2, m2) = chain_step(&ck).unwrap();
        assert_eq!(a1.0, a2.0);
        assert_eq!(m1.0, m2.0);
        assert_ne!(a1.0, m1.0);
        assert_ne!(next_seed(&ck).unwrap().0, a1.0);
        assert_ne!(next_seed(&ck).unwrap().0, m1.0);
    }

    #[test]
    fn root_step_splits_into_distinct_keys() {
        let s = root_step(&Secret32([1u8; 32]), &Secret32([2u8; 32])).unwrap();
        assert_ne!(s.root_key.0, s.chain_key.0);
        assert_ne!(s.chain_key.0, s.seed.0);
    }
}
