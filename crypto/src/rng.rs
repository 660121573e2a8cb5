//! Randomness plumbing.
//!
//! Protocol logic never reaches for a global RNG: every function that needs
//! randomness takes `rng: &mut R` with `R: rand_core::CryptoRng`, so the client's
//! deterministic simulator can inject a seeded ChaCha RNG and replay a run bit for
//! bit. Production callers use [`os_rng`], which draws from the operating system
//! (or `crypto.getRandomValues` on `wasm32`) through `getrandom` 0.4.

use crate::CryptoError;
use rand_core::{CryptoRng, TryRng, UnwrapErr};

/// The operating-system RNG as an infallible [`CryptoRng`].
///
/// It panics only if the OS refuses to provide randomness, which no caller can
/// recover from anyway; use [`checked_os_rng`] first if you want that reported as
/// an error (for example on a `wasm32` host without Web Crypto).
pub type OsRng = UnwrapErr<getrandom::SysRng>;

/// Returns the operating-system RNG (see [`OsRng`]).
pub fn os_rng() -> OsRng {
    UnwrapErr(getrandom::SysRng)
}

/// Returns the operating-system RNG after probing that it works.
///
/// # Errors
/// [`CryptoError::RngUnavailable`] when the platform has no usable entropy source.
pub fn checked_os_rng() -> Result<OsRng, CryptoError> {
    let mut probe = [0u8; 1];
    getrandom::SysRng
        .try_fill_bytes(&mut probe)
        .map_err(|_| CryptoError::RngUnavailable)?;
    Ok(os_rng())
}

/// Fills a fresh 32-byte array from `rng`.
pub(crate) fn random_32<R: CryptoRng + ?Sized>(rng: &mut R) -> [u8; 32] {
    let mut out = [0u8; 32];
    rng.fill_bytes(&mut out);
    out
}
