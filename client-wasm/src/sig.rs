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
//! user key pinned by the contact code. Each list entry also carries the
//! listed device's own membership proof
//! ([`hush_protocol::DeviceEntry::membership_bytes`], signed by the device
//! key), made by [`device_entry`] and checked by [`verify_device_list`], so a
//! user cannot list another user's device as its own.

use crate::error::ClientError;
use hush_crypto::{CryptoError, DeviceIdentity, UserIdentity, verify_prefixed};
use hush_protocol::{
    DeviceEntry, DeviceId, DeviceList, DeviceRegistration, SignedDeviceList, UserKey,
    auth_challenge_bytes,
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

/// This device's entry in `user`'s device list, with its membership proof:
/// the device key's signature over the entry's membership bytes.
pub(crate) fn device_entry(
    identity: &DeviceIdentity,
    user: &UserKey,
    device: DeviceId,
) -> DeviceEntry {
    let public = identity.public();
    let mut entry = DeviceEntry {
        device,
        signing_key: public.signing,
        agreement_key: public.agreement,
        membership_signature: [0u8; 64],
    };
    entry.membership_signature = identity.sign_prefixed(&entry.membership_bytes(user));
    entry
}

/// Check that the device of `entry` itself consented to being listed by
/// `user`.
///
/// # Errors
/// [`CryptoError::BadKey`] or [`CryptoError::BadSignature`] (as
/// [`ClientError::Crypto`]) when the proof does not verify.
pub fn verify_membership(entry: &DeviceEntry, user: &UserKey) -> Result<(), ClientError> {
    verify_prefixed(
        &entry.signing_key,
        &entry.membership_bytes(user),
        &entry.membership_signature,
    )
    .map_err(ClientError::Crypto)
}

/// Check a device list against the user key the caller trusts (from a
/// contact code or this device's own identity): the user's signature over the
/// list, no device listed twice, and every entry's membership proof by its
/// own device.
///
/// # Errors
/// [`CryptoError::IdentityMismatch`] for another user's list,
/// [`CryptoError::MalformedDeviceList`] for too many or repeated devices,
/// [`CryptoError::BadSignature`] (or `BadKey`) when the list signature or an
/// entry's membership proof does not verify; all as [`ClientError::Crypto`].
pub fn verify_device_list(list: &SignedDeviceList, user: &UserKey) -> Result<(), ClientError> {
    if list.list.user != *user {
        return Err(ClientError::Crypto(CryptoError::IdentityMismatch));
    }
    let devices = &list.list.devices;
    if devices.len() > hush_protocol::limits::MAX_DEVICES_PER_USER {
        return Err(ClientError::Crypto(CryptoError::MalformedDeviceList));
    }
    verify_prefixed(
        user.as_bytes(),
        &list.list.signing_bytes()?,
        &list.signature,
    )
    .map_err(ClientError::Crypto)?;
    for (i, entry) in devices.iter().enumerate() {
        if devices[..i].iter().any(|e| e.device == entry.device) {
            return Err(ClientError::Crypto(CryptoError::MalformedDeviceList));
        }
        verify_membership(entry, user)?;
    }
    Ok(())
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

    /// The membership proof is the device key's plain Ed25519 signature over
    /// the protocol's membership bytes for the list's user.
    #[test]
    fn membership_proof_is_the_device_signature_over_the_protocol_bytes() {
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let user = UserIdentity::generate(&mut rng);
        let dev = DeviceIdentity::generate(&mut rng);
        let uk = UserKey(user.public());
        let entry = device_entry(&dev, &uk, DeviceId([3; 16]));
        let bytes = hush_protocol::frame::membership_bytes(
            &uk,
            &DeviceId([3; 16]),
            &dev.public().signing,
            &dev.public().agreement,
        );
        let dk = VerifyingKey::from_bytes(&dev.public().signing).unwrap();
        dk.verify_strict(&bytes, &Signature::from_bytes(&entry.membership_signature))
            .unwrap();
        verify_membership(&entry, &uk).unwrap();
        // Bound to the user: the same proof fails for any other user key.
        let other = UserKey(UserIdentity::generate(&mut rng).public());
        assert!(matches!(
            verify_membership(&entry, &other),
            Err(ClientError::Crypto(CryptoError::BadSignature))
        ));
        // Bound to the keys and the id.
        for change in 0..3 {
            let mut e = entry.clone();
            match change {
                0 => e.device = DeviceId([4; 16]),
                1 => e.agreement_key[0] ^= 1,
                _ => e.membership_signature[5] ^= 1,
            }
            assert!(verify_membership(&e, &uk).is_err(), "change {change}");
        }
    }

    /// Attack: a user signs a list naming another user's device, with no
    /// proof, with the proof copied from the victim's list, or with a proof
    /// made by one of its own device keys: every one is refused, and so is a
    /// list naming a device twice.
    #[test]
    fn a_list_naming_another_users_device_does_not_verify() {
        let mut rng = ChaCha20Rng::from_seed([6; 32]);
        let (alice, mallory) = (
            UserIdentity::generate(&mut rng),
            UserIdentity::generate(&mut rng),
        );
        let (ak, mk) = (UserKey(alice.public()), UserKey(mallory.public()));
        let (adev, mdev) = (
            DeviceIdentity::generate(&mut rng),
            DeviceIdentity::generate(&mut rng),
        );
        let a_entry = device_entry(&adev, &ak, DeviceId([1; 16]));
        let m_entry = device_entry(&mdev, &mk, DeviceId([2; 16]));
        let alices = sign_device_list(
            &alice,
            DeviceList {
                user: ak,
                version: 1,
                devices: vec![a_entry.clone()],
            },
        )
        .unwrap();
        verify_device_list(&alices, &ak).unwrap();

        let mut unproven = a_entry.clone();
        unproven.membership_signature = [0; 64];
        let mut by_mallory = a_entry.clone();
        by_mallory.membership_signature = mdev.sign_prefixed(&a_entry.membership_bytes(&mk));
        for (what, stolen) in [
            ("no proof", unproven),
            ("copied proof", a_entry.clone()),
            ("proof by another device", by_mallory),
        ] {
            let list = sign_device_list(
                &mallory,
                DeviceList {
                    user: mk,
                    version: 1,
                    devices: vec![m_entry.clone(), stolen],
                },
            )
            .unwrap();
            assert!(
                matches!(
                    verify_device_list(&list, &mk),
                    Err(ClientError::Crypto(
                        CryptoError::BadSignature | CryptoError::BadKey
                    ))
                ),
                "{what}"
            );
        }
        let twice = sign_device_list(
            &mallory,
            DeviceList {
                user: mk,
                version: 1,
                devices: vec![m_entry.clone(), m_entry.clone()],
            },
        )
        .unwrap();
        assert!(matches!(
            verify_device_list(&twice, &mk),
            Err(ClientError::Crypto(CryptoError::MalformedDeviceList))
        ));
        let fine = sign_device_list(
            &mallory,
            DeviceList {
                user: mk,
                version: 2,
                devices: vec![m_entry],
            },
        )
        .unwrap();
        verify_device_list(&fine, &mk).unwrap();
    }
}
