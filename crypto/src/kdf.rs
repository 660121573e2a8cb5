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
//! | [`group_stream_id`] | HKDF-SHA256, salt = 32 zero bytes, IKM = group id (16) → 16 bytes | `hush-group-stream-v1` ‖ sender device ‖ recipient device |
//! | [`message_keys`] | none: MK is the ChaCha20-Poly1305 key; the nonce is random per message and sent in front of the ciphertext | — |

use crate::CryptoError;
use crate::secret::Secret32;
use hkdf::Hkdf;
use sha2::Sha256;
use sha2::block_api::compress256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// HKDF info label for the X3DH shared secret.
pub const X3DH_INFO: &[u8] = b"hush-x3dh-v1";
/// HKDF info label for root-chain steps (KDF_RK).
pub const RATCHET_INFO: &[u8] = b"hush-ratchet-v1";
/// HKDF info label prefix for sender-side chain reseeds.
pub const RESEED_INFO: &[u8] = b"hush-reseed-v1";
/// HKDF info label prefix for a group stream's conversation id.
pub const GROUP_STREAM_INFO: &[u8] = b"hush-group-stream-v1";
/// Former HKDF info label that expanded a message key into an AEAD key and
/// nonce. Message keys are now used directly (see `message_keys`); nothing
/// derives with this label any more.
#[deprecated(note = "message keys are used directly as AEAD keys; no derivation uses this label")]
pub const MESSAGE_INFO: &[u8] = b"hush-message-v1";

/// Test-only count of key derivations and DH operations on this thread, so
/// unit tests can prove that a limit rejects a header before any work.
#[cfg(test)]
pub(crate) mod work {
    use core::cell::Cell;
    thread_local! {
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }
    pub(crate) fn note() {
        COUNT.with(|c| c.set(c.get() + 1));
    }
    pub(crate) fn count() -> u64 {
        COUNT.with(Cell::get)
    }
}

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

/// The conversation id a group's stream from `sender` to `recipient` (device
/// ids) carries in clear: HKDF-SHA256 with the group id as input key material,
/// a zero salt, and `GROUP_STREAM_INFO ‖ sender ‖ recipient` as info, cut to
/// 16 bytes. Without the group id the result is unlinkable to the group and
/// to the same group's other device pairs; the label keeps it apart from
/// every other id (one-to-one and control conversations are SHA-256 of other
/// labels).
pub fn group_stream_id(
    group: &[u8; 16],
    sender: &[u8; 16],
    recipient: &[u8; 16],
) -> Result<[u8; 16], CryptoError> {
    let mut out = [0u8; 16];
    hkdf(
        &[0u8; 32],
        group,
        &[GROUP_STREAM_INFO, sender, recipient],
        &mut out,
    )?;
    Ok(out)
}

/// SHA-256 initial hash value (FIPS 180-4 §5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];
/// Longest message [`HmacSha256::mac`] takes: it must fit one block with the
/// `0x80` byte and the 8-byte length.
const ONE_BLOCK_MAX: usize = 64 - 1 - 8;

/// HMAC-SHA256 (RFC 2104) keyed with 32 bytes, for the per-message derivations.
///
/// Every per-message input (one tag byte; HKDF-Expand blocks of at most 48
/// bytes) fits one SHA-256 block, so each MAC is exactly two compressions
/// after the two of the key schedule. Calling the compression function
/// directly gives the same outputs as the `hmac`/`hkdf` crates (tests compare
/// them) without their generic buffering, which costs as much as the hashing
/// itself for inputs this short, notably on wasm32.
#[derive(Zeroize, ZeroizeOnDrop)]
struct HmacSha256 {
    /// State after absorbing `key ⊕ ipad`.
    inner: [u32; 8],
    /// State after absorbing `key ⊕ opad`.
    outer: [u32; 8],
}

impl HmacSha256 {
    fn new(key: &[u8; 32]) -> Self {
        let mut block = Zeroizing::new([0x36u8; 64]);
        for (b, k) in block.iter_mut().zip(key) {
            *b ^= k;
        }
        let mut inner = SHA256_IV;
        compress256(&mut inner, core::slice::from_ref(&*block));
        for b in block.iter_mut() {
            *b ^= 0x36 ^ 0x5c;
        }
        let mut outer = SHA256_IV;
        compress256(&mut outer, core::slice::from_ref(&*block));
        Self { inner, outer }
    }

    /// HMAC of the concatenation of `parts` (at most [`ONE_BLOCK_MAX`] bytes).
    fn mac(&self, parts: &[&[u8]]) -> Result<Secret32, CryptoError> {
        let mut block = Zeroizing::new([0u8; 64]);
        let mut len = 0;
        for part in parts {
            let end = len + part.len();
            if end > ONE_BLOCK_MAX {
                return Err(CryptoError::Internal("hmac input length"));
            }
            block[len..end].copy_from_slice(part);
            len = end;
        }
        block[len] = 0x80;
        // The key block precedes the message: 64 + len bytes in total.
        block[56..].copy_from_slice(&(((64 + len) as u64) * 8).to_be_bytes());
        let mut state = Zeroizing::new(self.inner);
        compress256(&mut state, core::slice::from_ref(&*block));

        block.fill(0);
        for (chunk, word) in block.chunks_exact_mut(4).zip(state.iter()) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        block[32] = 0x80;
        block[56..].copy_from_slice(&(((64 + 32) as u64) * 8).to_be_bytes());
        *state = self.outer;
        compress256(&mut state, core::slice::from_ref(&*block));

        let mut out = Secret32([0u8; 32]);
        for (chunk, word) in out.0.chunks_exact_mut(4).zip(state.iter()) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        Ok(out)
    }
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
    #[cfg(test)]
    work::note();
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
    #[cfg(test)]
    work::note();
    // Both outputs use the same key: run the HMAC key schedule once.
    let keyed = HmacSha256::new(chain_key.bytes());
    let mk = keyed.mac(&[&[CK_MESSAGE]])?;
    let ck = keyed.mac(&[&[CK_CHAIN]])?;
    Ok((ck, mk))
}

/// Advances the per-chain reseed hash chain: seed(g+1) = HMAC(seed(g), 0x03).
///
/// A one-way hash chain (rather than one stored master seed) so that holding the
/// current seed reveals nothing about generations already used.
pub(crate) fn next_seed(seed: &Secret32) -> Result<Secret32, CryptoError> {
    #[cfg(test)]
    work::note();
    HmacSha256::new(seed.bytes()).mac(&[&[SEED_NEXT]])
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

/// AEAD key of one message.
pub(crate) struct MessageKeys {
    pub(crate) key: Zeroizing<[u8; 32]>,
}

/// The ChaCha20-Poly1305 key of one message: the message key itself.
///
/// MK = HMAC-SHA256(CK, 0x01) is a uniformly random PRF output meant for
/// exactly one message (a sending chain advances before the next seal; a
/// receiver deletes MK once used). The nonce is *not* derived: each seal draws
/// a fresh random 96-bit nonce and sends it in front of the ciphertext, so a
/// sender whose state was rolled back (a restored backup, a copied home
/// directory), and which therefore derives the same MK again, still never
/// repeats a (key, nonce) pair. An earlier version expanded MK with
/// HKDF-Expand into a key and a nonce, and a later one used the all-zero
/// nonce; neither survives a rollback.
pub(crate) fn message_keys(mk: &Secret32) -> Result<MessageKeys, CryptoError> {
    Ok(MessageKeys {
        key: Zeroizing::new(mk.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, KeyInit, Mac};
    use proptest::prelude::*;

    fn hmac_reference(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
        mac.update(msg);
        mac.finalize().into_bytes().into()
    }

    proptest! {
        #[test]
        fn one_block_hmac_matches_the_hmac_crate(
            key in any::<[u8; 32]>(),
            msg in prop::collection::vec(any::<u8>(), 0..=ONE_BLOCK_MAX),
            split in 0usize..=ONE_BLOCK_MAX,
        ) {
            let split = split.min(msg.len());
            let ours = HmacSha256::new(&key).mac(&[&msg[..split], &msg[split..]]).unwrap();
            prop_assert_eq!(ours.0, hmac_reference(&key, &msg));
        }

        #[test]
        fn per_message_kdfs_match_the_hmac_crate(key in any::<[u8; 32]>()) {
            let k = Secret32(key);
            let (ck, mk) = chain_step(&k).unwrap();
            prop_assert_eq!(mk.0, hmac_reference(&key, &[CK_MESSAGE]));
            prop_assert_eq!(ck.0, hmac_reference(&key, &[CK_CHAIN]));
            prop_assert_eq!(next_seed(&k).unwrap().0, hmac_reference(&key, &[SEED_NEXT]));
            let keys = message_keys(&mk).unwrap();
            prop_assert_eq!(*keys.key, mk.0);
        }
    }

    #[test]
    fn one_block_hmac_rejects_longer_input() {
        let h = HmacSha256::new(&[1u8; 32]);
        assert!(h.mac(&[&[0u8; ONE_BLOCK_MAX]]).is_ok());
        assert_eq!(
            h.mac(&[&[0u8; 40], &[0u8; 16]]).map(|_| ()),
            Err(CryptoError::Internal("hmac input length"))
        );
    }

    #[test]
    fn one_block_hmac_at_padding_boundaries() {
        // Independent check of the padding arithmetic at the one-block limit.
        let key = [0x0bu8; 32];
        for len in [0usize, 1, 15, 16, 47, 48, 54, 55] {
            let msg = vec![0xa5u8; len];
            assert_eq!(
                HmacSha256::new(&key).mac(&[&msg]).unwrap().0,
                hmac_reference(&key, &msg),
                "len {len}"
            );
        }
    }

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
