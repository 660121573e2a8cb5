//! The signatures the relay checks, in the byte formats of `hush-protocol`.
//!
//! The relay verifies three signatures with plain Ed25519 (`verify_strict`)
//! over bytes defined in `hush-protocol`: the connection-auth response
//! ([`hush_protocol::auth_challenge_bytes`]), the device certificate
//! ([`hush_protocol::DeviceRegistration::certificate_bytes`], signed by the
//! user identity) and the device list
//! ([`hush_protocol::DeviceList::signing_bytes`], signed by the user identity).
//! These layouts carry their own domain prefixes, so they are signed with
//! `hush-crypto`'s `sign_prefixed` (plain Ed25519 over the given bytes) and
//! checked with `verify_prefixed`.
//!
//! Peers verify device lists here too ([`verify_device_list`]), with the
//! user key pinned by the contact code.

use crate::error::ClientError;
use hush_crypto::{CryptoError, DeviceIdentity, UserIdentity, verify_prefixed};
use hush_protocol::{
    DeviceId, DeviceList, DeviceRegistration, SignedDeviceList, UserKey, auth_challenge_bytes,
};

/// The `Auth`/`Register` proof for this connection's challenge.
pub(crate) fn auth_signature(
    identity: &DeviceIdentity,
    challenge: &[u8; 32],
    device: &DeviceId,
) -> Result<[u8; 64], ClientError> {
    Ok(identity.sign_prefixed(&auth_challenge_bytes(challenge, device)))
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
    reg.user_signature = user.sign_prefixed(&reg.certificate_bytes());
    Ok(reg)
}

/// Sign a device list with the user identity.
pub(crate) fn sign_device_list(
    user: &UserIdentity,
    list: DeviceList,
) -> Result<SignedDeviceList, ClientError> {
    let signature = user.sign_prefixed(&list.signing_bytes()?);
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
    verify_prefixed(
        user.as_bytes(),
        &list.list.signing_bytes()?,
        &list.signature,
    )
    .map_err(ClientError::Crypto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use ed25519_dalek::{Signature, VerifyingKey};
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
