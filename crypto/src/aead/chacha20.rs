//! ChaCha20 (RFC 8439 §2.3–2.4), four blocks at a time.
//!
//! State word `i` of the four blocks lives in one [`Lanes`] value (lane `b` =
//! block `counter + b`), so every quarter round runs on all four blocks at once;
//! the results are transposed back into four 64-byte blocks at the end.

use super::lanes::Lanes;
use crate::CryptoError;

/// Bytes produced by one call of [`keystream4`].
pub(crate) const KEYSTREAM4_LEN: usize = 256;
const BLOCK_LEN: usize = 64;
/// "expand 32-byte k".
const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

/// Key and nonce as little-endian words (the constant part of the state).
#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub(crate) struct ChaCha20 {
    key: [u32; 8],
    nonce: [u32; 3],
}

fn le32(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[4 * i..4 * i + 4]);
    u32::from_le_bytes(w)
}

impl ChaCha20 {
    pub(crate) fn new(key: &[u8; 32], nonce: &[u8; 12]) -> Self {
        Self {
            key: core::array::from_fn(|i| le32(key, i)),
            nonce: core::array::from_fn(|i| le32(nonce, i)),
        }
    }

    /// Keystream blocks `counter .. counter + 4` (block counters wrap like the
    /// 32-bit counter of RFC 8439; callers keep messages short enough that
    /// they never do).
    #[inline(always)]
    pub(crate) fn keystream4<L: Lanes>(&self, counter: u32, out: &mut [u8; KEYSTREAM4_LEN]) {
        let k = &self.key;
        let n = &self.nonce;
        let init: [L; 16] = [
            L::splat(SIGMA[0]),
            L::splat(SIGMA[1]),
            L::splat(SIGMA[2]),
            L::splat(SIGMA[3]),
            L::splat(k[0]),
            L::splat(k[1]),
            L::splat(k[2]),
            L::splat(k[3]),
            L::splat(k[4]),
            L::splat(k[5]),
            L::splat(k[6]),
            L::splat(k[7]),
            L::new(
                counter,
                counter.wrapping_add(1),
                counter.wrapping_add(2),
                counter.wrapping_add(3),
            ),
            L::splat(n[0]),
            L::splat(n[1]),
            L::splat(n[2]),
        ];
        let mut s = init;
        for _ in 0..10 {
            // Column rounds.
            quarter(&mut s, 0, 4, 8, 12);
            quarter(&mut s, 1, 5, 9, 13);
            quarter(&mut s, 2, 6, 10, 14);
            quarter(&mut s, 3, 7, 11, 15);
            // Diagonal rounds.
            quarter(&mut s, 0, 5, 10, 15);
            quarter(&mut s, 1, 6, 11, 12);
            quarter(&mut s, 2, 7, 8, 13);
            quarter(&mut s, 3, 4, 9, 14);
        }
        for (w, i) in s.iter_mut().zip(init) {
            *w = w.add(i);
        }
        // Rows 4g..4g+4 transposed: element b holds words 4g..4g+4 of block b.
        for g in 0..4 {
            let t = L::transpose([s[4 * g], s[4 * g + 1], s[4 * g + 2], s[4 * g + 3]]);
            for (b, v) in t.into_iter().enumerate() {
                let at = b * BLOCK_LEN + 16 * g;
                for (j, word) in v.to_array().into_iter().enumerate() {
                    out[at + 4 * j..at + 4 * j + 4].copy_from_slice(&word.to_le_bytes());
                }
            }
        }
    }
}

#[inline(always)]
fn quarter<L: Lanes>(s: &mut [L; 16], a: usize, b: usize, c: usize, d: usize) {
    s[a] = s[a].add(s[b]);
    s[d] = s[d].xor(s[a]).rotl::<16>();
    s[c] = s[c].add(s[d]);
    s[b] = s[b].xor(s[c]).rotl::<12>();
    s[a] = s[a].add(s[b]);
    s[d] = s[d].xor(s[a]).rotl::<8>();
    s[c] = s[c].add(s[d]);
    s[b] = s[b].xor(s[c]).rotl::<7>();
}

fn xor_into(data: &mut [u8], keystream: &[u8]) {
    for (d, k) in data.iter_mut().zip(keystream) {
        *d ^= k;
    }
}

/// Encrypts or decrypts `data` in place with the keystream from block 1 on, as
/// the AEAD construction does (RFC 8439 §2.8), and returns the one-time
/// Poly1305 key (the first 32 bytes of block 0).
///
/// # Errors
/// [`CryptoError::Internal`] if `data` would need more than 2^32 − 1 blocks.
pub(crate) fn xor_with_poly_key<L: Lanes>(
    cipher: &ChaCha20,
    data: &mut [u8],
) -> Result<[u8; 32], CryptoError> {
    let blocks = (data.len() as u64).div_ceil(BLOCK_LEN as u64);
    if blocks > u64::from(u32::MAX) {
        return Err(CryptoError::Internal("chacha20 message too long"));
    }
    let mut ks = [0u8; KEYSTREAM4_LEN];
    cipher.keystream4::<L>(0, &mut ks);
    let mut poly_key = [0u8; 32];
    poly_key.copy_from_slice(&ks[..32]);
    let first = data.len().min(KEYSTREAM4_LEN - BLOCK_LEN);
    let (head, rest) = data.split_at_mut(first);
    xor_into(head, &ks[BLOCK_LEN..]);
    let mut counter = 4u32;
    for chunk in rest.chunks_mut(KEYSTREAM4_LEN) {
        cipher.keystream4::<L>(counter, &mut ks);
        xor_into(chunk, &ks);
        counter = counter.wrapping_add(4);
    }
    // Keystream is key material: do not leave it on the stack.
    zeroize::Zeroize::zeroize(&mut ks);
    Ok(poly_key)
}
