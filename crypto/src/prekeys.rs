//! Signed and one-time prekeys: what a device publishes so peers can start a
//! session with it while it is offline.
//!
//! * The **signed prekey** is a medium-term X25519 key signed by the device's
//!   Ed25519 key. Callers rotate it weekly ([`PrekeySecrets::needs_rotation`]);
//!   retired signed prekeys stay usable for [`SIGNED_PREKEY_GRACE_MS`] so first
//!   messages that were already in flight (built from an older bundle) still open.
//! * **One-time prekeys** are single-use X25519 keys, generated in batches and
//!   removed when a session consumes them. They give the first message forward
//!   secrecy even against a later leak of the signed prekey.
//!
//! Time is always passed in (`now_ms`); this module never reads a clock.

use crate::CryptoError;
use crate::identity::{DeviceIdentity, DevicePublic, verify_prekey_signature, x25519_keypair};
use crate::persist;
use crate::secret::{Secret32, bytes64};
use core::fmt;
use rand_core::CryptoRng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{ZeroizeOnDrop, Zeroizing};

/// A day in milliseconds.
pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// Signed prekeys should be rotated after this age.
pub const SIGNED_PREKEY_ROTATION_MS: u64 = 7 * DAY_MS;
/// Retired signed prekeys are kept this long after rotation, then deleted.
/// Must be at least as long as the relay keeps undelivered envelopes.
pub const SIGNED_PREKEY_GRACE_MS: u64 = 30 * DAY_MS;
/// Maximum number of unused one-time prekeys held at once.
pub const MAX_ONE_TIME_PREKEYS: usize = 2_000;

/// What a peer fetches (via the relay) to start a session with a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrekeyBundle {
    /// The device's identity public keys.
    pub identity: DevicePublic,
    /// Id of the signed prekey.
    pub signed_prekey_id: u32,
    /// X25519 signed prekey.
    pub signed_prekey: [u8; 32],
    /// Signature by `identity.signing` over `"hush-prekey-v1" ‖ 0 ‖ identity.agreement ‖ id ‖ signed_prekey`.
    #[serde(with = "bytes64")]
    pub signed_prekey_sig: [u8; 64],
    /// A one-time prekey handed out by the relay, if any are left.
    pub one_time_prekey: Option<(u32, [u8; 32])>,
}

impl PrekeyBundle {
    /// Verifies the signed-prekey signature (it also binds the agreement identity key).
    ///
    /// # Errors
    /// [`CryptoError::BadSignature`] or [`CryptoError::BadKey`].
    pub fn verify(&self) -> Result<(), CryptoError> {
        verify_prekey_signature(
            &self.identity,
            self.signed_prekey_id,
            &self.signed_prekey,
            &self.signed_prekey_sig,
        )
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct SignedPrekey {
    id: u32,
    secret: Secret32,
    public: [u8; 32],
    #[serde(with = "bytes64")]
    signature: [u8; 64],
    created_ms: u64,
    /// When it was replaced by a newer one (`None` while current).
    retired_ms: Option<u64>,
}

#[derive(Clone, Serialize, Deserialize)]
struct OneTimePrekey {
    id: u32,
    secret: Secret32,
    public: [u8; 32],
}

/// A device's prekey private keys. Zeroized on drop; `Debug` shows ids and counts only.
#[derive(Clone, Serialize, Deserialize)]
struct PrekeyState {
    owner: DevicePublic,
    current: SignedPrekey,
    retired: Vec<SignedPrekey>,
    one_time: Vec<OneTimePrekey>,
    next_signed_id: u32,
    next_one_time_id: u32,
}

/// A device's prekey secrets (signed prekeys, current and retired, plus unused
/// one-time prekeys). Zeroized on drop; `Debug` shows ids and counts only.
#[derive(Clone)]
pub struct PrekeySecrets {
    state: PrekeyState,
}

impl ZeroizeOnDrop for PrekeySecrets {}

fn make_signed<R: CryptoRng + ?Sized>(
    identity: &DeviceIdentity,
    rng: &mut R,
    id: u32,
    now_ms: u64,
) -> SignedPrekey {
    let (secret, public) = x25519_keypair(rng);
    SignedPrekey {
        id,
        signature: identity.sign_prekey(id, &public),
        secret,
        public,
        created_ms: now_ms,
        retired_ms: None,
    }
}

impl PrekeySecrets {
    /// Creates prekey secrets with a fresh signed prekey (id 1) and no one-time prekeys.
    pub fn new<R: CryptoRng + ?Sized>(identity: &DeviceIdentity, rng: &mut R, now_ms: u64) -> Self {
        Self {
            state: PrekeyState {
                owner: identity.public(),
                current: make_signed(identity, rng, 1, now_ms),
                retired: Vec::new(),
                one_time: Vec::new(),
                next_signed_id: 2,
                next_one_time_id: 1,
            },
        }
    }

    /// The identity these prekeys belong to.
    pub fn owner(&self) -> &DevicePublic {
        &self.state.owner
    }

    /// True once the current signed prekey is at least 7 days old.
    pub fn needs_rotation(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.state.current.created_ms) >= SIGNED_PREKEY_ROTATION_MS
    }

    /// Replaces the signed prekey; the old one is kept for the grace period. Also
    /// deletes retired prekeys past their grace period.
    ///
    /// # Errors
    /// [`CryptoError::IdentityMismatch`] if `identity` is not the owner,
    /// [`CryptoError::CounterExhausted`] after 2^32 rotations.
    pub fn rotate_signed_prekey<R: CryptoRng + ?Sized>(
        &mut self,
        identity: &DeviceIdentity,
        rng: &mut R,
        now_ms: u64,
    ) -> Result<(), CryptoError> {
        if identity.public() != self.state.owner {
            return Err(CryptoError::IdentityMismatch);
        }
        let id = self.state.next_signed_id;
        let next = id.checked_add(1).ok_or(CryptoError::CounterExhausted)?;
        let mut old = core::mem::replace(
            &mut self.state.current,
            make_signed(identity, rng, id, now_ms),
        );
        old.retired_ms = Some(now_ms);
        self.state.retired.push(old);
        self.state.next_signed_id = next;
        self.prune_expired(now_ms);
        Ok(())
    }

    /// Deletes retired signed prekeys whose grace period has passed.
    pub fn prune_expired(&mut self, now_ms: u64) {
        self.state.retired.retain(|k| {
            k.retired_ms
                .is_none_or(|t| now_ms.saturating_sub(t) < SIGNED_PREKEY_GRACE_MS)
        });
    }

    /// `(id, public key, signature)` of the current signed prekey, for upload.
    pub fn signed_prekey(&self) -> (u32, [u8; 32], [u8; 64]) {
        let c = &self.state.current;
        (c.id, c.public, c.signature)
    }

    /// Generates `count` one-time prekeys and returns their `(id, public key)` for upload.
    ///
    /// # Errors
    /// [`CryptoError::TooManyPrekeys`] if more than [`MAX_ONE_TIME_PREKEYS`] would be
    /// stored, [`CryptoError::CounterExhausted`] if ids run out.
    pub fn generate_one_time_prekeys<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        count: u32,
    ) -> Result<Vec<(u32, [u8; 32])>, CryptoError> {
        let count = usize::try_from(count).map_err(|_| CryptoError::TooManyPrekeys {
            limit: MAX_ONE_TIME_PREKEYS,
        })?;
        if self.state.one_time.len().saturating_add(count) > MAX_ONE_TIME_PREKEYS {
            return Err(CryptoError::TooManyPrekeys {
                limit: MAX_ONE_TIME_PREKEYS,
            });
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let id = self.state.next_one_time_id;
            self.state.next_one_time_id = id.checked_add(1).ok_or(CryptoError::CounterExhausted)?;
            let (secret, public) = x25519_keypair(rng);
            self.state
                .one_time
                .push(OneTimePrekey { id, secret, public });
            out.push((id, public));
        }
        Ok(out)
    }

    /// Number of unused one-time prekeys (replenish when low).
    pub fn one_time_count(&self) -> usize {
        self.state.one_time.len()
    }

    /// Builds a bundle for this device, optionally including an unused one-time prekey.
    ///
    /// # Errors
    /// [`CryptoError::NoPrekey`] if `one_time_id` is not an unused one-time prekey.
    pub fn bundle(&self, one_time_id: Option<u32>) -> Result<PrekeyBundle, CryptoError> {
        let one_time_prekey = match one_time_id {
            None => None,
            Some(id) => Some((id, self.find_one_time(id)?.public)),
        };
        let (signed_prekey_id, signed_prekey, signed_prekey_sig) = self.signed_prekey();
        Ok(PrekeyBundle {
            identity: self.state.owner,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_sig,
            one_time_prekey,
        })
    }

    fn find_one_time(&self, id: u32) -> Result<&OneTimePrekey, CryptoError> {
        self.state
            .one_time
            .iter()
            .find(|k| k.id == id)
            .ok_or(CryptoError::NoPrekey)
    }

    /// The signed prekey `(secret, public)` with this id, current or within grace.
    pub(crate) fn signed_secret(&self, id: u32) -> Result<(&Secret32, [u8; 32]), CryptoError> {
        core::iter::once(&self.state.current)
            .chain(self.state.retired.iter())
            .find(|k| k.id == id)
            .map(|k| (&k.secret, k.public))
            .ok_or(CryptoError::NoPrekey)
    }

    /// The unused one-time prekey secret with this id.
    pub(crate) fn one_time_secret(&self, id: u32) -> Result<&Secret32, CryptoError> {
        self.find_one_time(id).map(|k| &k.secret)
    }

    #[cfg(test)]
    pub(crate) fn debug_secrets(&self) -> Vec<[u8; 32]> {
        core::iter::once(&self.state.current)
            .chain(self.state.retired.iter())
            .map(|k| k.secret.0)
            .chain(self.state.one_time.iter().map(|k| k.secret.0))
            .collect()
    }

    /// Deletes a one-time prekey (it has been used).
    pub(crate) fn consume_one_time(&mut self, id: u32) {
        self.state.one_time.retain(|k| k.id != id);
    }

    /// Encodes the prekey secrets for storage; the buffer is wiped on drop.
    ///
    /// # Errors
    /// Only [`CryptoError::Internal`].
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        persist::encode(self)
    }

    /// Decodes prekey secrets stored with [`PrekeySecrets::to_bytes`].
    ///
    /// # Errors
    /// [`CryptoError::MalformedState`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        persist::decode(bytes)
    }
}

impl fmt::Debug for PrekeySecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrekeySecrets")
            .field("owner", &self.state.owner)
            .field("signed_prekey_id", &self.state.current.id)
            .field(
                "retired_ids",
                &self.state.retired.iter().map(|k| k.id).collect::<Vec<_>>(),
            )
            .field("one_time_count", &self.state.one_time.len())
            .field("secrets", &"[redacted]")
            .finish()
    }
}

#[derive(Serialize)]
enum PrekeyRecordRef<'a> {
    V1(&'a PrekeyState),
}

#[derive(Deserialize)]
enum PrekeyRecord {
    V1(PrekeyState),
}

impl Serialize for PrekeySecrets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PrekeyRecordRef::V1(&self.state).serialize(s)
    }
}

impl<'de> Deserialize<'de> for PrekeySecrets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let PrekeyRecord::V1(state) = PrekeyRecord::deserialize(d)?;
        if state.one_time.len() > MAX_ONE_TIME_PREKEYS {
            return Err(serde::de::Error::custom("too many one-time prekeys"));
        }
        Ok(Self { state })
    }
}
