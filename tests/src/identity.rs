//! Deterministic device identities for tests.
//!
//! A Hush device has an Ed25519 key (it authenticates connections), an X25519
//! key (session agreement) and a certificate: its user identity's Ed25519
//! signature over [`DeviceRegistration::certificate_bytes`]. Tests derive all
//! keys from a seed so a failing run can be replayed.

use crate::rng::SeededRng;
use ed25519_dalek::{Signer, SigningKey};
use hush_protocol::{
    DeviceEntry, DeviceId, DeviceList, DeviceRegistration, SignedDeviceList, UserKey,
    auth_challenge_bytes,
};

/// A device's keys and its user's identity key. Secrets stay out of `Debug`.
#[derive(Clone)]
pub struct DeviceIdentity {
    device: DeviceId,
    user_key: SigningKey,
    device_key: SigningKey,
    agreement_public: [u8; 32],
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("device", &self.device)
            .field("user", &self.user())
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// A new user with one device, every key derived from `seed`.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = SeededRng::new(seed ^ 0x4855_5348_5553_4552);
        let user_key = SigningKey::from_bytes(&rng.bytes());
        Self::device_of(user_key, &mut rng)
    }

    /// Another device of the same user, its keys derived from `seed`.
    pub fn another_device(&self, seed: u64) -> Self {
        let mut rng = SeededRng::new(seed ^ 0x4445_5649_4345_0002);
        Self::device_of(self.user_key.clone(), &mut rng)
    }

    /// An identity from explicit key material (e.g. keys made by
    /// `hush-crypto`): the device id, the user's and the device's Ed25519
    /// secret keys and the device's X25519 public key.
    pub fn from_parts(
        device: DeviceId,
        user_secret: [u8; 32],
        device_secret: [u8; 32],
        agreement_public: [u8; 32],
    ) -> Self {
        DeviceIdentity {
            device,
            user_key: SigningKey::from_bytes(&user_secret),
            device_key: SigningKey::from_bytes(&device_secret),
            agreement_public,
        }
    }

    fn device_of(user_key: SigningKey, rng: &mut SeededRng) -> Self {
        DeviceIdentity {
            device: DeviceId(rng.bytes()),
            user_key,
            device_key: SigningKey::from_bytes(&rng.bytes()),
            agreement_public: rng.bytes(),
        }
    }

    /// The device id.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The user's identity key.
    pub fn user(&self) -> UserKey {
        UserKey(self.user_key.verifying_key().to_bytes())
    }

    /// The device's Ed25519 public key.
    pub fn signing_public(&self) -> [u8; 32] {
        self.device_key.verifying_key().to_bytes()
    }

    /// The device's X25519 public key.
    pub fn agreement_public(&self) -> [u8; 32] {
        self.agreement_public
    }

    /// The registration, certified by the user key.
    pub fn registration(&self) -> DeviceRegistration {
        let mut reg = DeviceRegistration {
            device: self.device,
            user: self.user(),
            signing_key: self.signing_public(),
            agreement_key: self.agreement_public,
            user_signature: [0; 64],
        };
        reg.user_signature = self.sign_as_user(&reg.certificate_bytes());
        reg
    }

    /// The device key's signature proving possession on a connection whose
    /// challenge is `challenge`.
    pub fn sign_challenge(&self, challenge: &[u8; 32]) -> [u8; 64] {
        self.sign_as_device(&auth_challenge_bytes(challenge, &self.device))
    }

    /// A signature by the device key.
    pub fn sign_as_device(&self, message: &[u8]) -> [u8; 64] {
        self.device_key.sign(message).to_bytes()
    }

    /// A signature by the user identity key.
    pub fn sign_as_user(&self, message: &[u8]) -> [u8; 64] {
        self.user_key.sign(message).to_bytes()
    }

    /// This device's entry in its own user's device list, with its
    /// membership proof (signed by the device key).
    pub fn device_entry(&self) -> DeviceEntry {
        self.device_entry_for(&self.user())
    }

    /// This device's entry with a membership proof for `user`'s list: only
    /// `user == self.user()` makes a valid entry; another user is how a test
    /// builds a device's consent to the wrong list.
    pub fn device_entry_for(&self, user: &UserKey) -> DeviceEntry {
        let mut entry = DeviceEntry {
            device: self.device,
            signing_key: self.signing_public(),
            agreement_key: self.agreement_public,
            membership_signature: [0; 64],
        };
        entry.membership_signature = self.sign_as_device(&entry.membership_bytes(user));
        entry
    }

    /// A device list of this user, signed by the user key.
    pub fn signed_device_list(&self, version: u64, devices: Vec<DeviceEntry>) -> SignedDeviceList {
        let list = DeviceList {
            user: self.user(),
            version,
            devices,
        };
        // Encoding a list of at most a few entries cannot fail; an empty
        // signature would only make the relay refuse it, which tests see.
        let signature = list
            .signing_bytes()
            .map(|b| self.sign_as_user(&b))
            .unwrap_or([0; 64]);
        SignedDeviceList { list, signature }
    }
}
