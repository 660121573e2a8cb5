//! Poly1305 (RFC 8439 §2.5) over whole 16-byte blocks, as the AEAD uses it.
//!
//! Radix 2^26 (five limbs, 32×32→64-bit products): wasm32 has a native 64-bit
//! multiply but no 64×64→128-bit one, so this is the fast scalar form there, and
//! it maps onto `simd128`'s 32×32→64-bit lane multiplies. Runs of at least
//! [`VECTOR_MIN_LEN`] bytes are processed four blocks at a time on [`Lanes`]:
//! lane `j` accumulates blocks `j, j + 4, …` with multiplier r^4, and the lanes
//! are folded at the end with r^4, r^3, r^2, r (Horner's rule, regrouped).
//!
//! The AEAD only ever authenticates zero-padded data (`pad16`), so every block
//! is a full block with the 2^128 bit set; no partial-block case exists.

use super::lanes::Lanes;
use zeroize::{Zeroize, ZeroizeOnDrop};

const MASK26: u32 = 0x03ff_ffff;
const HIBIT: u32 = 1 << 24;
/// Shortest run of blocks worth the 4-way path.
pub(crate) const VECTOR_MIN_LEN: usize = 128;

/// A running Poly1305 computation.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(crate) struct Poly1305 {
    /// r, r^2, r^3, r^4 (powers above r computed on first vector use).
    powers: [[u32; 5]; 4],
    have_powers: bool,
    h: [u32; 5],
    pad: [u32; 4],
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// One carry pass over 64-bit limb sums: limbs < 2^26 except limb 1 (< 2^26 + 2^12).
#[inline(always)]
fn carry(d: [u64; 5]) -> [u32; 5] {
    let m = u64::from(MASK26);
    let [d0, mut d1, mut d2, mut d3, mut d4] = d;
    d1 += d0 >> 26;
    d2 += d1 >> 26;
    d3 += d2 >> 26;
    d4 += d3 >> 26;
    let h0 = (d0 & m) + (d4 >> 26) * 5;
    [
        (h0 & m) as u32,
        ((d1 & m) + (h0 >> 26)) as u32,
        (d2 & m) as u32,
        (d3 & m) as u32,
        (d4 & m) as u32,
    ]
}

/// a · b mod 2^130 − 5 (partially reduced); limbs of `a` < 2^28, of `b` < 2^27.
#[inline(always)]
fn mul(a: [u32; 5], b: [u32; 5]) -> [u32; 5] {
    let [h0, h1, h2, h3, h4] = a.map(u64::from);
    let [r0, r1, r2, r3, r4] = b.map(u64::from);
    let (s1, s2, s3, s4) = (r1 * 5, r2 * 5, r3 * 5, r4 * 5);
    carry([
        h0 * r0 + h1 * s4 + h2 * s3 + h3 * s2 + h4 * s1,
        h0 * r1 + h1 * r0 + h2 * s4 + h3 * s3 + h4 * s2,
        h0 * r2 + h1 * r1 + h2 * r0 + h3 * s4 + h4 * s3,
        h0 * r3 + h1 * r2 + h2 * r1 + h3 * r0 + h4 * s4,
        h0 * r4 + h1 * r3 + h2 * r2 + h3 * r1 + h4 * r0,
    ])
}

/// The limbs of one 16-byte block plus 2^128.
#[inline(always)]
fn limbs(m: &[u8]) -> [u32; 5] {
    [
        le32(m, 0) & MASK26,
        (le32(m, 3) >> 2) & MASK26,
        (le32(m, 6) >> 4) & MASK26,
        (le32(m, 9) >> 6) & MASK26,
        (le32(m, 12) >> 8) | HIBIT,
    ]
}

/// Limbs of four consecutive blocks, lane `b` = block `b`.
#[inline(always)]
fn limbs4<L: Lanes>(m: &[u8; 64]) -> [L; 5] {
    // Fixed-size array: every index below is checked at compile time, so this
    // compiles to plain loads (no bounds checks, nothing left un-inlined).
    let w = |i: usize| u32::from_le_bytes([m[4 * i], m[4 * i + 1], m[4 * i + 2], m[4 * i + 3]]);
    let rows = [
        L::new(w(0), w(1), w(2), w(3)),
        L::new(w(4), w(5), w(6), w(7)),
        L::new(w(8), w(9), w(10), w(11)),
        L::new(w(12), w(13), w(14), w(15)),
    ];
    let [w0, w1, w2, w3] = L::transpose(rows);
    let mask = L::splat(MASK26);
    [
        w0.and(mask),
        w0.shr::<26>().or(w1.shl::<6>()).and(mask),
        w1.shr::<20>().or(w2.shl::<12>()).and(mask),
        w2.shr::<14>().or(w3.shl::<18>()).and(mask),
        w3.shr::<8>().or(L::splat(HIBIT)),
    ]
}

/// Lane-wise h · r with `s = 5r` (limb 0 of `s` unused), unreduced 64-bit sums.
#[inline(always)]
fn mul4<L: Lanes>(h: &[L; 5], r: &[L; 5], s: &[L; 5]) -> [L::Wide; 5] {
    let dot = |terms: [(L, L); 5]| {
        let [t0, t1, t2, t3, t4] = terms.map(|(a, b)| a.mul_wide(b));
        L::wide_add(L::wide_add(L::wide_add(t0, t1), L::wide_add(t2, t3)), t4)
    };
    let [h0, h1, h2, h3, h4] = *h;
    [
        dot([(h0, r[0]), (h1, s[4]), (h2, s[3]), (h3, s[2]), (h4, s[1])]),
        dot([(h0, r[1]), (h1, r[0]), (h2, s[4]), (h3, s[3]), (h4, s[2])]),
        dot([(h0, r[2]), (h1, r[1]), (h2, r[0]), (h3, s[4]), (h4, s[3])]),
        dot([(h0, r[3]), (h1, r[2]), (h2, r[1]), (h3, r[0]), (h4, s[4])]),
        dot([(h0, r[4]), (h1, r[3]), (h2, r[2]), (h3, r[1]), (h4, r[0])]),
    ]
}

/// [`carry`] on every lane.
#[inline(always)]
fn carry4<L: Lanes>(d: [L::Wide; 5]) -> [L; 5] {
    let m = u64::from(MASK26);
    let [d0, mut d1, mut d2, mut d3, mut d4] = d;
    d1 = L::wide_add(d1, L::wide_shr::<26>(d0));
    d2 = L::wide_add(d2, L::wide_shr::<26>(d1));
    d3 = L::wide_add(d3, L::wide_shr::<26>(d2));
    d4 = L::wide_add(d4, L::wide_shr::<26>(d3));
    let c = L::wide_shr::<26>(d4);
    let h0 = L::wide_add(L::wide_and(d0, m), L::wide_add(c, L::wide_shl::<2>(c)));
    let h1 = L::wide_add(L::wide_and(d1, m), L::wide_shr::<26>(h0));
    [
        L::narrow(L::wide_and(h0, m)),
        L::narrow(h1),
        L::narrow(L::wide_and(d2, m)),
        L::narrow(L::wide_and(d3, m)),
        L::narrow(L::wide_and(d4, m)),
    ]
}

impl Poly1305 {
    /// Starts a MAC with the one-time key `r ‖ s` (r is clamped here).
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        let r = [
            le32(key, 0) & 0x03ff_ffff,
            (le32(key, 3) >> 2) & 0x03ff_ff03,
            (le32(key, 6) >> 4) & 0x03ff_c0ff,
            (le32(key, 9) >> 6) & 0x03f0_3fff,
            (le32(key, 12) >> 8) & 0x000f_ffff,
        ];
        Self {
            powers: [r; 4],
            have_powers: false,
            h: [0; 5],
            pad: [le32(key, 16), le32(key, 20), le32(key, 24), le32(key, 28)],
        }
    }

    /// Absorbs `data` zero-padded to a multiple of 16 bytes.
    pub(crate) fn update_padded<L: Lanes>(&mut self, data: &[u8]) {
        let mut rest = data;
        if data.len() >= VECTOR_MIN_LEN {
            let (bulk, tail) = data.split_at(data.len() / 64 * 64);
            self.blocks4::<L>(bulk);
            rest = tail;
        }
        let mut blocks = rest.chunks_exact(16);
        for block in &mut blocks {
            self.block(block);
        }
        let tail = blocks.remainder();
        if !tail.is_empty() {
            let mut last = [0u8; 16];
            last[..tail.len()].copy_from_slice(tail);
            self.block(&last);
        }
    }

    /// Absorbs one full 16-byte block.
    #[inline(always)]
    pub(crate) fn block(&mut self, m: &[u8]) {
        let m = limbs(m);
        let h: [u32; 5] = core::array::from_fn(|i| self.h[i] + m[i]);
        self.h = mul(h, self.powers[0]);
    }

    /// Absorbs `data` (a non-empty multiple of 64 bytes) four blocks at a time.
    fn blocks4<L: Lanes>(&mut self, data: &[u8]) {
        if !self.have_powers {
            let r = self.powers[0];
            let r2 = mul(r, r);
            self.powers = [r, r2, mul(r2, r), mul(r2, r2)];
            self.have_powers = true;
        }
        let p = &self.powers;
        let five = |x: u32| x * 5;
        let (groups, _) = data.as_chunks::<64>();
        let mut groups = groups.iter();
        let Some(first) = groups.next() else {
            return;
        };
        // Lane 0 continues the running value.
        let mut acc = limbs4::<L>(first);
        for (limb, h) in acc.iter_mut().zip(self.h) {
            *limb = limb.add(L::new(h, 0, 0, 0));
        }
        let r4: [L; 5] = core::array::from_fn(|k| L::splat(p[3][k]));
        let s4: [L; 5] = core::array::from_fn(|k| L::splat(five(p[3][k])));
        for group in groups {
            let m = limbs4::<L>(group);
            // Reload the multipliers every iteration: if LLVM hoists their
            // zero-extension out of the loop, it can no longer select wasm's
            // 32×32→64 `extmul` and emits far slower full 64-bit lane multiplies.
            let (r4, s4) = core::hint::black_box((&r4, &s4));
            let h = carry4::<L>(mul4(&acc, r4, s4));
            acc = core::array::from_fn(|k| h[k].add(m[k]));
        }
        // Fold: lane j is multiplied by r^(4 − j), then all lanes are summed.
        let r: [L; 5] = core::array::from_fn(|k| L::new(p[3][k], p[2][k], p[1][k], p[0][k]));
        let s: [L; 5] = core::array::from_fn(|k| {
            L::new(five(p[3][k]), five(p[2][k]), five(p[1][k]), five(p[0][k]))
        });
        let (r, s) = core::hint::black_box((&r, &s)); // as above: keep `extmul`
        let sums = mul4(&acc, r, s).map(|d| L::wide_to_array(d).iter().sum());
        self.h = carry(sums);
    }

    /// Finishes: full reduction mod 2^130 − 5, then adds `s` mod 2^128.
    pub(crate) fn finalize(mut self) -> [u8; 16] {
        let [mut h0, mut h1, mut h2, mut h3, mut h4] = self.h;
        let mut c;
        c = h1 >> 26;
        h1 &= MASK26;
        h2 += c;
        c = h2 >> 26;
        h2 &= MASK26;
        h3 += c;
        c = h3 >> 26;
        h3 &= MASK26;
        h4 += c;
        c = h4 >> 26;
        h4 &= MASK26;
        h0 += c * 5;
        c = h0 >> 26;
        h0 &= MASK26;
        h1 += c;

        // g = h + 5 − 2^130; keep h if g is negative (constant time).
        let mut g0 = h0.wrapping_add(5);
        c = g0 >> 26;
        g0 &= MASK26;
        let mut g1 = h1.wrapping_add(c);
        c = g1 >> 26;
        g1 &= MASK26;
        let mut g2 = h2.wrapping_add(c);
        c = g2 >> 26;
        g2 &= MASK26;
        let mut g3 = h3.wrapping_add(c);
        c = g3 >> 26;
        g3 &= MASK26;
        let g4 = h4.wrapping_add(c).wrapping_sub(1 << 26);
        let use_g = (g4 >> 31).wrapping_sub(1); // all ones if g ≥ 0
        let pick = |h: u32, g: u32| (h & !use_g) | (g & use_g);
        let (h0, h1, h2, h3, h4) = (
            pick(h0, g0),
            pick(h1, g1),
            pick(h2, g2),
            pick(h3, g3),
            pick(h4, g4),
        );

        // To 4 × 32 bits, then + s with carries.
        let w = [
            h0 | (h1 << 26),
            (h1 >> 6) | (h2 << 20),
            (h2 >> 12) | (h3 << 14),
            (h3 >> 18) | (h4 << 8),
        ];
        let mut out = [0u8; 16];
        let mut carry = 0u64;
        for (i, (word, pad)) in w.iter().zip(self.pad).enumerate() {
            let f = u64::from(*word) + u64::from(pad) + carry;
            out[4 * i..4 * i + 4].copy_from_slice(&(f as u32).to_le_bytes());
            carry = f >> 32;
        }
        self.h.zeroize();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::lanes::Portable;
    use super::*;

    /// With r = 1 and s = 0 the tag is Σ(mᵢ + 2^128) mod (2^130 − 5), mod 2^128:
    /// three blocks summing to p − 1, p and p + 1 exercise the final reduction.
    #[test]
    fn final_reduction_around_the_prime() {
        let mut key = [0u8; 32];
        key[0] = 1;
        let le128 = |x: u128| x.to_le_bytes();
        for (first, expected) in [
            (u128::MAX - 5, u128::MAX - 5), // h = p − 1
            (u128::MAX - 4, 0),             // h = p
            (u128::MAX - 3, 1),             // h = p + 1
        ] {
            let mut mac = Poly1305::new(&key);
            mac.block(&le128(first));
            mac.block(&le128(0));
            mac.block(&le128(0));
            assert_eq!(mac.finalize(), le128(expected), "first block {first:#x}");
        }
    }

    #[test]
    fn update_padded_zero_pads_the_last_block() {
        let key = [9u8; 32];
        let mut a = Poly1305::new(&key);
        a.update_padded::<Portable>(&[5u8; 20]);
        let mut b = Poly1305::new(&key);
        let mut padded = [0u8; 32];
        padded[..20].fill(5);
        b.block(&padded[..16]);
        b.block(&padded[16..]);
        assert_eq!(a.finalize(), b.finalize());
    }
}

#[cfg(test)]
mod vector_tests {
    use super::super::lanes::Portable;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The 4-way path (with its r^2..r^4 and final fold) equals Horner's rule
        /// block by block, for any key (r limbs up to their clamped maxima) and
        /// any run length, including repeated updates that reuse the powers.
        #[test]
        fn four_way_equals_one_block_at_a_time(
            key in any::<[u8; 32]>(),
            data in prop::collection::vec(any::<u8>(), 0..1200),
            split in 0usize..1200,
        ) {
            let split = split.min(data.len());
            let mut vector = Poly1305::new(&key);
            vector.update_padded::<Portable>(&data[..split]);
            vector.update_padded::<Portable>(&data[split..]);
            let mut scalar = Poly1305::new(&key);
            for part in [&data[..split], &data[split..]] {
                let mut padded = part.to_vec();
                padded.resize(part.len().div_ceil(16) * 16, 0);
                for block in padded.chunks(16) {
                    scalar.block(block);
                }
            }
            prop_assert_eq!(vector.finalize(), scalar.finalize());
        }
    }

    #[test]
    fn all_ones_blocks_and_maximal_key_agree() {
        // Largest limbs everywhere: maximal r after clamping, all-0xff message.
        let key = [0xffu8; 32];
        let data = [0xffu8; 64 * 9];
        let mut vector = Poly1305::new(&key);
        vector.update_padded::<Portable>(&data);
        let mut scalar = Poly1305::new(&key);
        for block in data.chunks(16) {
            scalar.block(block);
        }
        assert_eq!(vector.finalize(), scalar.finalize());
    }
}
