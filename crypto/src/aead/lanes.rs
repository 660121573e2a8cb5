//! Four 32-bit lanes: the vector type the 4-way ChaCha20 and Poly1305 cores are
//! written against.
//!
//! The core is generic so the same code runs natively on [`Portable`] (plain
//! `[u32; 4]`, checked against the `chacha20poly1305` crate and RFC 8439 in
//! native tests) and on wasm32 on `Simd128` (one `v128` register, compiled
//! only with the `simd128` target feature).

/// Operations ChaCha20 needs on four independent 32-bit lanes.
pub(crate) trait Lanes: Copy {
    /// All four lanes set to `x`.
    fn splat(x: u32) -> Self;
    /// Lanes `[a, b, c, d]`.
    fn new(a: u32, b: u32, c: u32, d: u32) -> Self;
    /// The lanes as an array (lane 0 first).
    fn to_array(self) -> [u32; 4];
    /// Lane-wise wrapping addition.
    fn add(self, o: Self) -> Self;
    /// Lane-wise exclusive or.
    fn xor(self, o: Self) -> Self;
    /// Lane-wise left rotation by `N` bits (`0 < N < 32`).
    fn rotl<const N: u32>(self) -> Self;
    /// Transposes the 4×4 matrix whose rows are `m`: row `i` of the result holds
    /// lane `i` of every input row.
    fn transpose(m: [Self; 4]) -> [Self; 4];
    /// Lane-wise and.
    fn and(self, o: Self) -> Self;
    /// Lane-wise or.
    fn or(self, o: Self) -> Self;
    /// Lane-wise logical right shift by `N` bits.
    fn shr<const N: u32>(self) -> Self;
    /// Lane-wise left shift by `N` bits.
    fn shl<const N: u32>(self) -> Self;

    /// Four 64-bit lanes (products of [`Lanes::mul_wide`]).
    type Wide: Copy;
    /// Lane-wise full 32×32→64-bit product.
    fn mul_wide(self, o: Self) -> Self::Wide;
    /// Lane-wise 64-bit wrapping addition.
    fn wide_add(a: Self::Wide, b: Self::Wide) -> Self::Wide;
    /// Lane-wise 64-bit and with `mask` (in every lane).
    fn wide_and(a: Self::Wide, mask: u64) -> Self::Wide;
    /// Lane-wise 64-bit logical right shift by `N` bits.
    fn wide_shr<const N: u32>(a: Self::Wide) -> Self::Wide;
    /// Lane-wise 64-bit left shift by `N` bits.
    fn wide_shl<const N: u32>(a: Self::Wide) -> Self::Wide;
    /// The low 32 bits of every 64-bit lane.
    fn narrow(a: Self::Wide) -> Self;
    /// The 64-bit lanes as an array (lane 0 first).
    fn wide_to_array(a: Self::Wide) -> [u64; 4];
}

/// Portable lanes: plain arrays, for native tests against the reference crate.
#[cfg(test)]
#[derive(Clone, Copy)]
pub(crate) struct Portable([u32; 4]);

#[cfg(test)]
impl Lanes for Portable {
    #[inline(always)]
    fn splat(x: u32) -> Self {
        Self([x; 4])
    }
    #[inline(always)]
    fn new(a: u32, b: u32, c: u32, d: u32) -> Self {
        Self([a, b, c, d])
    }
    #[inline(always)]
    fn to_array(self) -> [u32; 4] {
        self.0
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        let [a, b, c, d] = self.0;
        let [e, f, g, h] = o.0;
        Self([
            a.wrapping_add(e),
            b.wrapping_add(f),
            c.wrapping_add(g),
            d.wrapping_add(h),
        ])
    }
    #[inline(always)]
    fn xor(self, o: Self) -> Self {
        let [a, b, c, d] = self.0;
        let [e, f, g, h] = o.0;
        Self([a ^ e, b ^ f, c ^ g, d ^ h])
    }
    #[inline(always)]
    fn rotl<const N: u32>(self) -> Self {
        Self(self.0.map(|x| x.rotate_left(N)))
    }
    #[inline(always)]
    fn transpose(m: [Self; 4]) -> [Self; 4] {
        let [a, b, c, d] = m.map(|r| r.0);
        [0, 1, 2, 3].map(|i| Self([a[i], b[i], c[i], d[i]]))
    }
    #[inline(always)]
    fn and(self, o: Self) -> Self {
        Self(core::array::from_fn(|i| self.0[i] & o.0[i]))
    }
    #[inline(always)]
    fn or(self, o: Self) -> Self {
        Self(core::array::from_fn(|i| self.0[i] | o.0[i]))
    }
    #[inline(always)]
    fn shr<const N: u32>(self) -> Self {
        Self(self.0.map(|x| x >> N))
    }
    #[inline(always)]
    fn shl<const N: u32>(self) -> Self {
        Self(self.0.map(|x| x << N))
    }

    type Wide = [u64; 4];
    #[inline(always)]
    fn mul_wide(self, o: Self) -> [u64; 4] {
        core::array::from_fn(|i| u64::from(self.0[i]) * u64::from(o.0[i]))
    }
    #[inline(always)]
    fn wide_add(a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
        core::array::from_fn(|i| a[i].wrapping_add(b[i]))
    }
    #[inline(always)]
    fn wide_and(a: [u64; 4], mask: u64) -> [u64; 4] {
        a.map(|x| x & mask)
    }
    #[inline(always)]
    fn wide_shr<const N: u32>(a: [u64; 4]) -> [u64; 4] {
        a.map(|x| x >> N)
    }
    #[inline(always)]
    fn wide_shl<const N: u32>(a: [u64; 4]) -> [u64; 4] {
        a.map(|x| x << N)
    }
    #[inline(always)]
    fn narrow(a: [u64; 4]) -> Self {
        Self(a.map(|x| x as u32))
    }
    #[inline(always)]
    fn wide_to_array(a: [u64; 4]) -> [u64; 4] {
        a
    }
}

/// wasm32 `simd128` lanes: one `v128` register.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[derive(Clone, Copy)]
pub(crate) struct Simd128(core::arch::wasm32::v128);

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
impl Lanes for Simd128 {
    #[inline(always)]
    fn splat(x: u32) -> Self {
        Self(core::arch::wasm32::u32x4_splat(x))
    }
    #[inline(always)]
    fn new(a: u32, b: u32, c: u32, d: u32) -> Self {
        Self(core::arch::wasm32::u32x4(a, b, c, d))
    }
    #[inline(always)]
    fn to_array(self) -> [u32; 4] {
        use core::arch::wasm32::u32x4_extract_lane as lane;
        [
            lane::<0>(self.0),
            lane::<1>(self.0),
            lane::<2>(self.0),
            lane::<3>(self.0),
        ]
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Self(core::arch::wasm32::u32x4_add(self.0, o.0))
    }
    #[inline(always)]
    fn xor(self, o: Self) -> Self {
        Self(core::arch::wasm32::v128_xor(self.0, o.0))
    }
    #[inline(always)]
    fn rotl<const N: u32>(self) -> Self {
        use core::arch::wasm32::{i8x16_shuffle, u32x4_shl, u32x4_shr, v128_or};
        // Whole-byte rotations are a single byte shuffle.
        match N {
            16 => Self(i8x16_shuffle::<
                2,
                3,
                0,
                1,
                6,
                7,
                4,
                5,
                10,
                11,
                8,
                9,
                14,
                15,
                12,
                13,
            >(self.0, self.0)),
            8 => Self(i8x16_shuffle::<
                3,
                0,
                1,
                2,
                7,
                4,
                5,
                6,
                11,
                8,
                9,
                10,
                15,
                12,
                13,
                14,
            >(self.0, self.0)),
            _ => Self(v128_or(u32x4_shl(self.0, N), u32x4_shr(self.0, 32 - N))),
        }
    }
    #[inline(always)]
    fn transpose(m: [Self; 4]) -> [Self; 4] {
        use core::arch::wasm32::{i32x4_shuffle, i64x2_shuffle};
        let [a, b, c, d] = m.map(|r| r.0);
        let ab_lo = i32x4_shuffle::<0, 4, 1, 5>(a, b); // a0 b0 a1 b1
        let ab_hi = i32x4_shuffle::<2, 6, 3, 7>(a, b); // a2 b2 a3 b3
        let cd_lo = i32x4_shuffle::<0, 4, 1, 5>(c, d);
        let cd_hi = i32x4_shuffle::<2, 6, 3, 7>(c, d);
        [
            Self(i64x2_shuffle::<0, 2>(ab_lo, cd_lo)),
            Self(i64x2_shuffle::<1, 3>(ab_lo, cd_lo)),
            Self(i64x2_shuffle::<0, 2>(ab_hi, cd_hi)),
            Self(i64x2_shuffle::<1, 3>(ab_hi, cd_hi)),
        ]
    }
    #[inline(always)]
    fn and(self, o: Self) -> Self {
        Self(core::arch::wasm32::v128_and(self.0, o.0))
    }
    #[inline(always)]
    fn or(self, o: Self) -> Self {
        Self(core::arch::wasm32::v128_or(self.0, o.0))
    }
    #[inline(always)]
    fn shr<const N: u32>(self) -> Self {
        Self(core::arch::wasm32::u32x4_shr(self.0, N))
    }
    #[inline(always)]
    fn shl<const N: u32>(self) -> Self {
        Self(core::arch::wasm32::u32x4_shl(self.0, N))
    }

    /// Lanes 0–1 and 2–3 as two `u64x2` registers.
    type Wide = (core::arch::wasm32::v128, core::arch::wasm32::v128);
    #[inline(always)]
    fn mul_wide(self, o: Self) -> Self::Wide {
        use core::arch::wasm32::{u64x2_extmul_high_u32x4, u64x2_extmul_low_u32x4};
        (
            u64x2_extmul_low_u32x4(self.0, o.0),
            u64x2_extmul_high_u32x4(self.0, o.0),
        )
    }
    #[inline(always)]
    fn wide_add(a: Self::Wide, b: Self::Wide) -> Self::Wide {
        use core::arch::wasm32::i64x2_add;
        (i64x2_add(a.0, b.0), i64x2_add(a.1, b.1))
    }
    #[inline(always)]
    fn wide_and(a: Self::Wide, mask: u64) -> Self::Wide {
        use core::arch::wasm32::{u64x2_splat, v128_and};
        let m = u64x2_splat(mask);
        (v128_and(a.0, m), v128_and(a.1, m))
    }
    #[inline(always)]
    fn wide_shr<const N: u32>(a: Self::Wide) -> Self::Wide {
        use core::arch::wasm32::u64x2_shr;
        (u64x2_shr(a.0, N), u64x2_shr(a.1, N))
    }
    #[inline(always)]
    fn wide_shl<const N: u32>(a: Self::Wide) -> Self::Wide {
        use core::arch::wasm32::i64x2_shl;
        (i64x2_shl(a.0, N), i64x2_shl(a.1, N))
    }
    #[inline(always)]
    fn narrow(a: Self::Wide) -> Self {
        Self(core::arch::wasm32::i32x4_shuffle::<0, 2, 4, 6>(a.0, a.1))
    }
    #[inline(always)]
    fn wide_to_array(a: Self::Wide) -> [u64; 4] {
        use core::arch::wasm32::u64x2_extract_lane as lane;
        [
            lane::<0>(a.0),
            lane::<1>(a.0),
            lane::<0>(a.1),
            lane::<1>(a.1),
        ]
    }
}
