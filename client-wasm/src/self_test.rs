//! The cryptographic self-test a client passes before it starts.
//!
//! The wasm32 build seals and opens every envelope with hush-crypto's own
//! ChaCha20-Poly1305 (a simd128 core the native tests cannot execute). A
//! build whose AEAD gives wrong answers would send messages no peer can
//! open, or accept tampered ones, so a driver runs [`check_crypto`] (the
//! known answers of [`hush_crypto::self_test`] through the backend of the
//! running build) before it opens storage, and refuses to start on
//! [`ClientError::SelfTest`]. The browser `Client.open` / `Client.link` do
//! it on every call; [`crypto_checked`] tells whether it passed in this
//! process (the browser client reports it in `status().selfTest`).

use crate::ClientError;
use hush_crypto::CryptoError;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`check_crypto`] passed in this process.
static PASSED: AtomicBool = AtomicBool::new(false);

/// Runs the AEAD known-answer self-test of this build.
///
/// # Errors
/// [`ClientError::SelfTest`] when any known answer is wrong: the caller must
/// not start a client.
pub fn check_crypto() -> Result<(), ClientError> {
    check_with(hush_crypto::self_test)?;
    PASSED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Whether [`check_crypto`] ran and passed in this process.
pub fn crypto_checked() -> bool {
    PASSED.load(Ordering::Relaxed)
}

/// The start-up check over any self-test: its failure becomes
/// [`ClientError::SelfTest`] (never a panic, never ignored).
fn check_with(test: impl FnOnce() -> Result<(), CryptoError>) -> Result<(), ClientError> {
    test().map_err(ClientError::SelfTest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_build_passes_and_records_it() {
        check_crypto().unwrap();
        assert!(crypto_checked());
    }

    /// A broken AEAD (the self-test reporting a wrong known answer) stops
    /// the start with the typed error that names the failed check.
    #[test]
    fn a_failing_self_test_refuses_to_start() {
        let mut ran = false;
        let err = check_with(|| {
            ran = true;
            Err(CryptoError::Internal("self-test: rfc 8439 seal"))
        })
        .unwrap_err();
        assert!(ran, "the check runs the self-test it is given");
        assert!(
            matches!(
                err,
                ClientError::SelfTest(CryptoError::Internal("self-test: rfc 8439 seal"))
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("self-test") && text.contains("refusing"),
            "{text}"
        );
        assert!(check_with(|| Ok(())).is_ok());
    }
}
