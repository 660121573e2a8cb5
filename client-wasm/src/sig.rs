//! The signatures the relay checks, in the byte formats of `hush-protocol`.
//!
//! The relay verifies three signatures with plain Ed25519 (`verify_strict`)
//! over bytes defined in `hush-protocol`: the connection-auth response
//! ([`hush_protocol::auth_challenge_bytes`]), the device certificate
//! ([`hush_protocol::DeviceRegistration::certificate_bytes`], signed by the
//! user identity) and the device list
//! ([`hush_protocol::DeviceList::signing_bytes`], signed by the user identity).
//! `hush-crypto` signs with its own domain-separated layout instead, so this
//! module produces the protocol's layout from the same keys. It reads the
//! Ed25519 seed out of the identity's versioned record and checks that it
//! reproduces the identity's public key, so a change of the record format
//! shows up as a typed error, never as a wrong signature.
//!
//! Peers verify device lists here too ([`verify_device_list`]), with the
//! user key pinned by the contact code.

use crate::error::ClientError;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hush_crypto::{CryptoError, DeviceIdentity, UserIdentity};
use hush_protocol::{
    DeviceId, DeviceList, DeviceRegistration, SignedDeviceList, UserKey, auth_challenge_bytes,
};
use zeroize::Zeroizing;

/// Recover the Ed25519 key from a `V1` record: variant 0, then the 32-byte seed.
fn seed_key(record: &[u8], expected_public: &[u8; 32]) -> Result<SigningKey, ClientError> {
    let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
        record
            .get(1..33)
            .filter(|_| record.first() == Some(&0))
            .and_then(|s| s.try_into().ok())
            .ok_or(ClientError::Crypto(CryptoError::MalformedState(
                "identity record",
            )))?,
    );
    let key = SigningKey::from_bytes(&seed);
    if key.verifying_key().to_bytes() != *expected_public {
        return Err(ClientError::Crypto(CryptoError::MalformedState(
            "identity record layout",
        )));
    }
    Ok(key)
}

fn device_key(identity: &DeviceIdentity) -> Result<SigningKey, ClientError> {
    seed_key(&identity.to_bytes()?, &identity.public().signing)
}

fn user_key(identity: &UserIdentity) -> Result<SigningKey, ClientError> {
    seed_key(&identity.to_bytes()?, &identity.public())
}

/// The `Auth`/`Register` proof for this connection's challenge.
pub(crate) fn auth_signature(
    identity: &DeviceIdentity,
    challenge: &[u8; 32],
    device: &DeviceId,
) -> Result<[u8; 64], ClientError> {
    Ok(device_key(identity)?
        .sign(&auth_challenge_bytes(challenge, device))
        .to_bytes())
}

/// A device registration with the user identity's certificate signature.
pub(crate) fn registration(
    user: &UserIdentity,
    identity: &DeviceIdentity,
    device: DeviceId,
) -> Result<DeviceRegistration, ClientError> {
    let public = identity.public();
    let mut reg = DeviceRegistration {
        device,
        user: UserKey(user.public()),
        signing_key: public.signing,
        agreement_key: public.agreement,
        user_signature: [0u8; 64],
    };
    reg.user_signature = user_key(user)?.sign(&reg.certificate_bytes()).to_bytes();
    Ok(reg)
}

/// Sign a device list with the user identity.
pub(crate) fn sign_device_list(
    user: &UserIdentity,
    list: DeviceList,
) -> Result<SignedDeviceList, ClientError> {
    let signature = user_key(user)?.sign(&list.signing_bytes()?).to_bytes();
    Ok(SignedDeviceList { list, signature })
}

/// Check a device list against the user key the caller trusts (from a
/// contact code or this device's own identity).
pub fn verify_device_list(list: &SignedDeviceList, user: &UserKey) -> Result<(), ClientError> {
    if list.list.user != *user {
        return Err(ClientError::Crypto(CryptoError::IdentityMismatch));
    }
    if list.list.devices.len() > hush_protocol::limits::MAX_DEVICES_PER_USER {
        return Err(ClientError::Crypto(CryptoError::MalformedDeviceList));
    }
    let key = VerifyingKey::from_bytes(user.as_bytes())
        .map_err(|_| ClientError::Crypto(CryptoError::BadKey))?;
    key.verify_strict(
        &list.list.signing_bytes()?,
        &Signature::from_bytes(&list.signature),
    )
    .map_err(|_| ClientError::Crypto(CryptoError::BadSignature))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn signatures_verify_under_the_protocol_layouts() {
        let mut rng = ChaCha20Rng::from_seed([4; 32]);
        let user = UserIdentity::generate(&mut rng);
        let dev = DeviceIdentity::generate(&mut rng);
        let id = DeviceId([9; 16]);
        let reg = registration(&user, &dev, id).unwrap();
        let vk = VerifyingKey::from_bytes(&user.public()).unwrap();
        vk.verify_strict(
            &reg.certificate_bytes(),
            &Signature::from_bytes(&reg.user_signature),
        )
        .unwrap();
        let sig = auth_signature(&dev, &[1; 32], &id).unwrap();
        let dk = VerifyingKey::from_bytes(&dev.public().signing).unwrap();
        dk.verify_strict(
            &auth_challenge_bytes(&[1; 32], &id),
            &Signature::from_bytes(&sig),
        )
        .unwrap();
        let list = DeviceList {
            user: UserKey(user.public()),
            version: 1,
            devices: vec![],
        };
        let signed = sign_device_list(&user, list).unwrap();
        verify_device_list(&signed, &UserKey(user.public())).unwrap();
        assert!(verify_device_list(&signed, &UserKey([3; 32])).is_err());
        let mut tampered = signed.clone();
        tampered.list.version = 2;
        assert!(verify_device_list(&tampered, &UserKey(user.public())).is_err());
    }
}
