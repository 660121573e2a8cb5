//! # hush-crypto
//!
//! All end-to-end cryptography of Hush. The relay only ever stores ciphertext
//! envelopes; everything that makes them confidential and authentic lives here,
//! as pure functions over explicit state: no IO, no clocks (callers pass
//! `now_ms`), no global RNG (callers pass `rng`), no `unsafe`, no panics on any
//! input. The same code compiles for native targets and `wasm32-unknown-unknown`.
//!
//! ## Reading order / module layout
//!
//! 1. [`error`](crate::CryptoError) — the single error enum, [`CryptoError`].
//! 2. `rng` — [`os_rng`] for production; everything else takes `&mut impl CryptoRng`
//!    so the client's simulator can inject a seeded RNG and stay deterministic.
//! 3. `kdf` — every key derivation (HKDF-SHA256, HMAC-SHA256) with its
//!    domain-separation label; the whole key hierarchy in one screen.
//! 4. `aead` — ChaCha20-Poly1305 wrappers and the at-rest helper
//!    ([`seal_at_rest`] / [`open_at_rest`]) the client uses for its outbox.
//!    Natively the AEAD is ring's; on
//!    wasm32 with `simd128` it is this crate's own RFC 8439 code
//!    (`aead/`: 4-way ChaCha20 and Poly1305 over a lane type), checked on the
//!    running build by [`self_test`].
//! 5. `padding` — [`pad`] / [`unpad`]: ISO/IEC 7816-4 padding to power-of-two
//!    buckets up to 512 bytes and Padmé buckets above, which hides plaintext
//!    length from the relay.
//! 6. `identity` — [`DeviceIdentity`] (Ed25519 + X25519), [`UserIdentity`] and
//!    [`SignedDeviceList`], plus every signature (all domain-separated), including
//!    the relay's [`verify_auth_challenge`].
//! 7. `prekeys` — [`PrekeySecrets`] (signed prekey rotation with grace period,
//!    one-time prekeys) and the public [`PrekeyBundle`].
//! 8. `header` — the fixed-size wire layouts [`RatchetHeader`] and [`SessionInit`]
//!    that the protocol crate embeds verbatim.
//! 9. `x3dh` — [`initiate`] / [`respond`]: the initial key agreement.
//! 10. `ratchet` — [`Session`]: the double ratchet with forced chain reseeds,
//!     bounded out-of-order handling, transactional `open`, and persistence.
//!
//! `docs/SECURITY.md` (section "Cryptography") describes the design and its
//! security properties.
//!
//! ## Typical flow
//!
//! ```
//! use hush_crypto::{DeviceIdentity, PrekeySecrets, initiate, respond, os_rng};
//! # fn main() -> Result<(), hush_crypto::CryptoError> {
//! let mut rng = os_rng();
//! let alice = DeviceIdentity::generate(&mut rng);
//! let bob = DeviceIdentity::generate(&mut rng);
//! let mut bob_prekeys = PrekeySecrets::new(&bob, &mut rng, 0);
//! let otk = bob_prekeys.generate_one_time_prekeys(&mut rng, 1)?;
//! let bundle = bob_prekeys.bundle(Some(otk[0].0))?;
//!
//! let (mut a, init) = initiate(&alice, &bundle, &mut rng)?;
//! let (header, ct) = a.seal(&mut rng, 0, b"hi bob", |h| h.to_bytes().to_vec())?;
//!
//! let mut b = respond(&bob, &mut bob_prekeys, &init, &alice.public())?;
//! let pt = b.open(&mut rng, 0, &header, &header.to_bytes(), &ct)?;
//! assert_eq!(pt, b"hi bob");
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod aead;
mod error;
mod header;
mod identity;
mod kdf;
mod padding;
mod persist;
mod prekeys;
mod ratchet;
mod rng;
mod secret;
mod self_test;
mod x3dh;

pub use aead::{
    AT_REST_NONCE_LEN, TAG_LEN, open_at_rest, open_stream_chunk, seal_at_rest, seal_stream_chunk,
};
pub use error::CryptoError;
pub use header::{RATCHET_HEADER_LEN, RatchetHeader, SESSION_INIT_LEN, SessionInit};
pub use identity::{
    DOMAIN_AUTH, DOMAIN_DEVICES, DOMAIN_GENERIC, DOMAIN_PREKEY, DeviceEntry, DeviceIdentity,
    DevicePublic, MAX_DEVICES, SignedDeviceList, UserIdentity, verify, verify_auth_challenge,
    verify_prefixed,
};
#[allow(deprecated)]
pub use kdf::MESSAGE_INFO;
pub use kdf::{GROUP_STREAM_INFO, RATCHET_INFO, RESEED_INFO, X3DH_INFO, group_stream_id};
#[allow(deprecated)]
pub use padding::LARGE_BUCKET_STEP;
pub use padding::{MIN_BUCKET, PADME_THRESHOLD, pad, padded_len, unpad};
pub use prekeys::{
    DAY_MS, MAX_ONE_TIME_PREKEYS, PrekeyBundle, PrekeySecrets, SIGNED_PREKEY_GRACE_MS,
    SIGNED_PREKEY_ROTATION_MS,
};
pub use ratchet::{
    MAX_CHAIN_AGE_MS, MAX_GENERATION_JUMP, MAX_GENERATIONS_KEPT, MAX_MESSAGES_PER_CHAIN,
    MAX_RECEIVING_DH_CHAINS, MAX_RETIRED_KEYS, MAX_SKIP, MAX_SKIPPED_KEYS, MAX_SKIPPED_SEEDS,
    MESSAGE_NONCE_LEN, RotationPolicy, Session,
};
pub use rng::{OsRng, checked_os_rng, os_rng};
pub use self_test::self_test;
pub use x3dh::{initiate, respond};

/// Re-export so callers name the same `CryptoRng` trait version this crate uses.
pub use rand_core;

#[cfg(test)]
mod kat_tests;
#[cfg(test)]
mod limits_tests;
#[cfg(test)]
mod redaction_tests;
