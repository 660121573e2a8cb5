//! Long-term identities and every signature the protocol makes.
//!
//! A *device* holds an Ed25519 signing key (authenticates to the relay, signs its
//! prekeys) and an X25519 agreement key (the X3DH identity key). A *user* holds an
//! Ed25519 key whose only job is to sign the list of that user's devices, so a
//! peer can check that a device really belongs to the user it claims.
//!
//! Every signature is domain-separated: the signed bytes are
//! `label ‖ 0x00 ‖ message` with a distinct label per purpose ([`DOMAIN_PREKEY`],
//! [`DOMAIN_DEVICES`], [`DOMAIN_GENERIC`]). Labels contain no zero byte, so the
//! encoding is prefix-free and a signature made for one purpose can never verify
//! for another. The wire protocol's own layouts (connection auth, device
//! certificates, device lists) begin with their own labels (`hush-auth-v1`,
//! `hush-device-cert-v1`, `hush-device-list-v1`) followed by fixed-length fields,
//! and are signed as they are (`sign_prefixed`). Verification uses `verify_strict` (rejects
//! small-order keys and non-canonical signatures, so signatures are not malleable).

use crate::CryptoError;
use crate::persist;
use crate::rng::random_32;
use crate::secret::{Secret32, bytes64};
use core::fmt;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Signature domain for relay authentication challenges.
pub const DOMAIN_AUTH: &[u8] = b"hush-auth-v1";
/// Signature domain for signed prekeys.
pub const DOMAIN_PREKEY: &[u8] = b"hush-prekey-v1";
/// Signature domain for signed device lists.
pub const DOMAIN_DEVICES: &[u8] = b"hush-devices-v1";
/// Signature domain for application signatures made with [`DeviceIdentity::sign`].
pub const DOMAIN_GENERIC: &[u8] = b"hush-sig-v1";

/// Maximum devices in one [`SignedDeviceList`]; bounds verification work.
pub const MAX_DEVICES: usize = 1024;

fn domain_bytes(domain: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let len = domain.len() + 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(domain);
    out.push(0);
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

fn sign_domain(key: &SigningKey, domain: &[u8], parts: &[&[u8]]) -> [u8; 64] {
    key.sign(&domain_bytes(domain, parts)).to_bytes()
}

fn verify_domain(
    public: &[u8; 32],
    domain: &[u8],
    parts: &[&[u8]],
    sig: &[u8; 64],
) -> Result<(), CryptoError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| CryptoError::BadKey)?;
    key.verify_strict(&domain_bytes(domain, parts), &Signature::from_bytes(sig))
        .map_err(|_| CryptoError::BadSignature)
}

fn signing_key_from_rng<R: CryptoRng + ?Sized>(rng: &mut R) -> SigningKey {
    let seed = Zeroizing::new(random_32(rng));
    SigningKey::from_bytes(&seed)
}

/// Computes X25519(secret, public), rejecting non-contributory results.
pub(crate) fn dh(secret: &Secret32, public: &[u8; 32]) -> Result<Secret32, CryptoError> {
    #[cfg(test)]
    crate::kdf::work::note();
    let sk = StaticSecret::from(secret.0);
    let shared = sk.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(CryptoError::BadKey);
    }
    Ok(Secret32(shared.to_bytes()))
}

/// The X25519 public key of a secret.
pub(crate) fn x25519_public(secret: &Secret32) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(secret.0)).to_bytes()
}

/// Generates a fresh X25519 key pair `(secret, public)`.
pub(crate) fn x25519_keypair<R: CryptoRng + ?Sized>(rng: &mut R) -> (Secret32, [u8; 32]) {
    let secret = Secret32(random_32(rng));
    let public = x25519_public(&secret);
    (secret, public)
}

/// Verifies a generic application signature made with [`DeviceIdentity::sign`].
///
/// # Errors
/// [`CryptoError::BadKey`] for an invalid public key, [`CryptoError::BadSignature`] otherwise.
pub fn verify(public: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Result<(), CryptoError> {
    verify_domain(public, DOMAIN_GENERIC, &[msg], sig)
}

/// Verifies a signature made by `sign_prefixed` over bytes that carry their own
/// Hush wire-protocol domain prefix (strict Ed25519 verification).
///
/// # Errors
/// [`CryptoError::BadKey`] for an invalid public key, [`CryptoError::BadSignature`] otherwise.
pub fn verify_prefixed(public: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> Result<(), CryptoError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| CryptoError::BadKey)?;
    key.verify_strict(msg, &Signature::from_bytes(sig))
        .map_err(|_| CryptoError::BadSignature)
}

/// Verifies a relay authentication response (the relay calls this).
///
/// The signed bytes are exactly `hush-protocol`'s `auth_challenge_bytes`:
/// `"hush-auth-v1" ‖ challenge ‖ device_id` (fixed lengths, so unambiguous),
/// binding the response to the fresh challenge and to the device id claimed.
///
/// # Errors
/// [`CryptoError::BadKey`] or [`CryptoError::BadSignature`].
pub fn verify_auth_challenge(
    device_signing_pub: &[u8; 32],
    challenge: &[u8; 32],
    device_id: &[u8; 16],
    sig: &[u8; 64],
) -> Result<(), CryptoError> {
    verify_prefixed(
        device_signing_pub,
        &[DOMAIN_AUTH, challenge.as_slice(), device_id.as_slice()].concat(),
        sig,
    )
}

/// The public half of a device identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DevicePublic {
    /// Ed25519 verifying key.
    pub signing: [u8; 32],
    /// X25519 identity (agreement) public key.
    pub agreement: [u8; 32],
}

impl DevicePublic {
    /// `signing ‖ agreement` (64 bytes), used in associated data and device lists.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.signing);
        out[32..].copy_from_slice(&self.agreement);
        out
    }
}

/// A device's long-term secret keys. Zeroized on drop; `Debug` shows only public keys.
#[derive(Clone)]
pub struct DeviceIdentity {
    signing: SigningKey,
    agreement: Secret32,
    agreement_pub: [u8; 32],
}

impl ZeroizeOnDrop for DeviceIdentity {}

impl DeviceIdentity {
    /// Generates a new device identity.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let signing = signing_key_from_rng(rng);
        let (agreement, agreement_pub) = x25519_keypair(rng);
        Self {
            signing,
            agreement,
            agreement_pub,
        }
    }

    /// The public keys to publish.
    pub fn public(&self) -> DevicePublic {
        DevicePublic {
            signing: self.signing.verifying_key().to_bytes(),
            agreement: self.agreement_pub,
        }
    }

    /// Signs an application message (domain [`DOMAIN_GENERIC`]); check with [`verify`].
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        sign_domain(&self.signing, DOMAIN_GENERIC, &[msg])
    }

    /// Signs bytes that already begin with a Hush wire-protocol domain prefix
    /// (`hush-protocol`'s auth-challenge layout): plain Ed25519 over `msg`,
    /// checked with [`verify_prefixed`]. Never pass bytes without such a prefix.
    pub fn sign_prefixed(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// Answers a relay authentication challenge; checked by [`verify_auth_challenge`].
    pub fn sign_auth_challenge(&self, challenge: &[u8; 32], device_id: &[u8; 16]) -> [u8; 64] {
        self.sign_prefixed(&[DOMAIN_AUTH, challenge.as_slice(), device_id.as_slice()].concat())
    }

    pub(crate) fn sign_prekey(&self, id: u32, prekey: &[u8; 32]) -> [u8; 64] {
        sign_domain(
            &self.signing,
            DOMAIN_PREKEY,
            &[&self.agreement_pub, &id.to_be_bytes(), prekey],
        )
    }

    pub(crate) fn agreement_secret(&self) -> &Secret32 {
        &self.agreement
    }

    #[cfg(test)]
    pub(crate) fn debug_secrets(&self) -> Vec<[u8; 32]> {
        vec![self.signing.to_bytes(), self.agreement.0]
    }

    /// Encodes the identity (secret!) for storage; the buffer is wiped on drop.
    ///
    /// # Errors
    /// Only [`CryptoError::Internal`].
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        persist::encode(self)
    }

    /// Decodes an identity stored with [`DeviceIdentity::to_bytes`].
    ///
    /// # Errors
    /// [`CryptoError::MalformedState`] if the record does not decode or is inconsistent.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        persist::decode(bytes)
    }
}

/// Checks a prekey signature made by [`DeviceIdentity::sign_prekey`].
pub(crate) fn verify_prekey_signature(
    identity: &DevicePublic,
    id: u32,
    prekey: &[u8; 32],
    sig: &[u8; 64],
) -> Result<(), CryptoError> {
    verify_domain(
        &identity.signing,
        DOMAIN_PREKEY,
        &[&identity.agreement, &id.to_be_bytes(), prekey],
        sig,
    )
}

impl fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("public", &self.public())
            .field("secrets", &"[redacted]")
            .finish()
    }
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct DeviceIdentityV1 {
    signing_seed: [u8; 32],
    agreement: [u8; 32],
}

#[derive(Serialize)]
enum DeviceIdentityRecordRef<'a> {
    V1(&'a DeviceIdentityV1),
}

#[derive(Deserialize)]
enum DeviceIdentityRecord {
    V1(DeviceIdentityV1),
}

impl Serialize for DeviceIdentity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v1 = DeviceIdentityV1 {
            signing_seed: self.signing.to_bytes(),
            agreement: self.agreement.0,
        };
        DeviceIdentityRecordRef::V1(&v1).serialize(s)
    }
}

impl<'de> Deserialize<'de> for DeviceIdentity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let DeviceIdentityRecord::V1(v1) = DeviceIdentityRecord::deserialize(d)?;
        let agreement = Secret32(v1.agreement);
        Ok(Self {
            signing: SigningKey::from_bytes(&v1.signing_seed),
            agreement_pub: x25519_public(&agreement),
            agreement,
        })
    }
}

/// One device in a user's [`SignedDeviceList`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The relay-visible device id.
    pub device_id: [u8; 16],
    /// The device's public keys.
    pub public: DevicePublic,
}

/// A user's list of devices, signed by the user's identity key.
///
/// `version` must increase with every change; clients keep the highest version
/// they have seen so the relay cannot roll a user back to an older list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDeviceList {
    /// The user's Ed25519 public key (the signer).
    pub user: [u8; 32],
    /// Monotonic version counter.
    pub version: u64,
    /// Devices, sorted by `device_id`, no duplicates.
    pub devices: Vec<DeviceEntry>,
    /// Ed25519 signature over [`SignedDeviceList::canonical_bytes`].
    #[serde(with = "bytes64")]
    pub signature: [u8; 64],
}

impl SignedDeviceList {
    fn check_canonical(devices: &[DeviceEntry]) -> Result<(), CryptoError> {
        if devices.len() > MAX_DEVICES
            || devices.windows(2).any(|w| w[0].device_id >= w[1].device_id)
        {
            return Err(CryptoError::MalformedDeviceList);
        }
        Ok(())
    }

    /// The signed payload: `user ‖ version (u64 BE) ‖ count (u32 BE) ‖ (device_id ‖ signing ‖ agreement)*`
    /// (the domain prefix is added by the signature layer).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        Self::payload(&self.user, self.version, &self.devices)
    }

    fn payload(user: &[u8; 32], version: u64, devices: &[DeviceEntry]) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 8 + 4 + devices.len() * 80);
        out.extend_from_slice(user);
        out.extend_from_slice(&version.to_be_bytes());
        let count = u32::try_from(devices.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for d in devices {
            out.extend_from_slice(&d.device_id);
            out.extend_from_slice(&d.public.to_bytes());
        }
        out
    }

    /// Verifies the list against the user key the caller already trusts.
    ///
    /// # Errors
    /// [`CryptoError::IdentityMismatch`] if signed by another user,
    /// [`CryptoError::MalformedDeviceList`] if not canonical, or a signature error.
    pub fn verify(&self, expected_user: &[u8; 32]) -> Result<(), CryptoError> {
        if &self.user != expected_user {
            return Err(CryptoError::IdentityMismatch);
        }
        Self::check_canonical(&self.devices)?;
        verify_domain(
            &self.user,
            DOMAIN_DEVICES,
            &[&self.canonical_bytes()],
            &self.signature,
        )
    }

    /// Looks up a device's public keys by id (call after [`SignedDeviceList::verify`]).
    pub fn device(&self, device_id: &[u8; 16]) -> Option<&DevicePublic> {
        self.devices
            .binary_search_by(|d| d.device_id.cmp(device_id))
            .ok()
            .and_then(|i| self.devices.get(i))
            .map(|d| &d.public)
    }
}

/// A user's identity key. Zeroized on drop; `Debug` shows only the public key.
#[derive(Clone)]
pub struct UserIdentity {
    signing: SigningKey,
}

impl ZeroizeOnDrop for UserIdentity {}

impl UserIdentity {
    /// Generates a new user identity.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self {
            signing: signing_key_from_rng(rng),
        }
    }

    #[cfg(test)]
    pub(crate) fn debug_secrets(&self) -> Vec<[u8; 32]> {
        vec![self.signing.to_bytes()]
    }

    /// The Ed25519 public key peers pin for this user.
    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Signs bytes that already begin with a Hush wire-protocol domain prefix
    /// (`hush-protocol`'s device-certificate and device-list layouts): plain
    /// Ed25519 over `msg`, checked with [`verify_prefixed`]. Never pass bytes without
    /// such a prefix.
    pub fn sign_prefixed(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// Signs a device list; the entries are sorted by device id first.
    ///
    /// # Errors
    /// [`CryptoError::MalformedDeviceList`] on duplicate ids or more than [`MAX_DEVICES`].
    pub fn sign_device_list(
        &self,
        version: u64,
        mut devices: Vec<DeviceEntry>,
    ) -> Result<SignedDeviceList, CryptoError> {
        devices.sort_by_key(|d| d.device_id);
        SignedDeviceList::check_canonical(&devices)?;
        let user = self.public();
        let payload = SignedDeviceList::payload(&user, version, &devices);
        let signature = sign_domain(&self.signing, DOMAIN_DEVICES, &[&payload]);
        Ok(SignedDeviceList {
            user,
            version,
            devices,
            signature,
        })
    }

    /// Encodes the identity (secret!) for storage; the buffer is wiped on drop.
    ///
    /// # Errors
    /// Only [`CryptoError::Internal`].
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        persist::encode(self)
    }

    /// Decodes an identity stored with [`UserIdentity::to_bytes`].
    ///
    /// # Errors
    /// [`CryptoError::MalformedState`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        persist::decode(bytes)
    }
}

impl fmt::Debug for UserIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserIdentity")
            .field("public", &self.public())
            .field("secret", &"[redacted]")
            .finish()
    }
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct UserIdentityV1 {
    signing_seed: [u8; 32],
}

#[derive(Serialize)]
enum UserIdentityRecordRef<'a> {
    V1(&'a UserIdentityV1),
}

#[derive(Deserialize)]
enum UserIdentityRecord {
    V1(UserIdentityV1),
}

impl Serialize for UserIdentity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v1 = UserIdentityV1 {
            signing_seed: self.signing.to_bytes(),
        };
        UserIdentityRecordRef::V1(&v1).serialize(s)
    }
}

impl<'de> Deserialize<'de> for UserIdentity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let UserIdentityRecord::V1(v1) = UserIdentityRecord::deserialize(d)?;
        Ok(Self {
            signing: SigningKey::from_bytes(&v1.signing_seed),
        })
    }
}
