//! X3DH-style initial key agreement (Signal's X3DH spec, with Hush's labels).
//!
//! The initiator (A) fetches the responder's (B) [`PrekeyBundle`] and computes
//!
//! ```text
//! DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)   [DH4 = DH(EK_A, OPK_B)]
//! SK  = HKDF-SHA256(salt = 0^32, IKM = 0xFF^32 ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4], info = "hush-x3dh-v1")
//! ```
//!
//! `SK` becomes the root key of the double ratchet; the responder's signed prekey
//! doubles as its first ratchet key, as in Signal. DH1 and DH2 give mutual
//! authentication through the identity keys, DH3/DH4 forward secrecy. The
//! session's associated data is `initiator DevicePublic ‖ responder DevicePublic`
//! (both signing and agreement keys), prepended to every message's AEAD input, so
//! a message only opens in a session between exactly these two devices.

use crate::CryptoError;
use crate::header::SessionInit;
use crate::identity::{DeviceIdentity, DevicePublic, dh, x25519_keypair};
use crate::kdf::x3dh_secret;
use crate::prekeys::{PrekeyBundle, PrekeySecrets};
use crate::ratchet::Session;
use rand_core::CryptoRng;

/// Starts a session with the owner of `bundle` (after verifying it).
///
/// Returns the session (ready to [`Session::seal`]) and the [`SessionInit`] that
/// must accompany the first envelopes; [`Session::needs_init_header`] keeps
/// returning it until the responder's first message has been opened.
///
/// # Errors
/// [`CryptoError::BadSignature`] for a bad signed-prekey signature,
/// [`CryptoError::BadKey`] for an invalid or low-order key in the bundle.
pub fn initiate<R: CryptoRng + ?Sized>(
    ours: &DeviceIdentity,
    bundle: &PrekeyBundle,
    rng: &mut R,
) -> Result<(Session, SessionInit), CryptoError> {
    bundle.verify()?;
    let (ek, ek_pub) = x25519_keypair(rng);
    let dh1 = dh(ours.agreement_secret(), &bundle.signed_prekey)?;
    let dh2 = dh(&ek, &bundle.identity.agreement)?;
    let dh3 = dh(&ek, &bundle.signed_prekey)?;
    let sk = match &bundle.one_time_prekey {
        Some((_, opk)) => {
            let dh4 = dh(&ek, opk)?;
            x3dh_secret(&[&dh1, &dh2, &dh3, &dh4])?
        }
        None => x3dh_secret(&[&dh1, &dh2, &dh3])?,
    };
    let init = SessionInit {
        initiator_identity: ours.public().agreement,
        ephemeral: ek_pub,
        signed_prekey_id: bundle.signed_prekey_id,
        one_time_prekey_id: bundle.one_time_prekey.map(|(id, _)| id),
    };
    let session = Session::new_initiator(
        rng,
        sk,
        ours.public(),
        bundle.identity,
        bundle.signed_prekey,
        init,
    )?;
    Ok((session, init))
}

/// Completes the responder's side of X3DH from the initiator's [`SessionInit`].
///
/// Consumes the one-time prekey named in `init`; using the same one-time prekey
/// twice fails with [`CryptoError::NoPrekey`]. Because a forged `init` also
/// consumes it, callers should keep a clone of `prekeys` and only persist the
/// consumption once the first message has opened with the new session.
///
/// `initiator` comes from the initiator's verified device list; it must match
/// `init.initiator_identity`.
///
/// # Errors
/// [`CryptoError::IdentityMismatch`], [`CryptoError::NoPrekey`], [`CryptoError::BadKey`].
pub fn respond(
    ours: &DeviceIdentity,
    prekeys: &mut PrekeySecrets,
    init: &SessionInit,
    initiator: &DevicePublic,
) -> Result<Session, CryptoError> {
    if init.initiator_identity != initiator.agreement || prekeys.owner() != &ours.public() {
        return Err(CryptoError::IdentityMismatch);
    }
    let (spk, spk_pub) = prekeys.signed_secret(init.signed_prekey_id)?;
    // An unknown or consumed one-time prekey (a replayed bundle, or a forged
    // init) is refused before any Diffie-Hellman work.
    if let Some(id) = init.one_time_prekey_id {
        prekeys.one_time_secret(id)?;
    }
    let dh1 = dh(spk, &initiator.agreement)?;
    let dh2 = dh(ours.agreement_secret(), &init.ephemeral)?;
    let dh3 = dh(spk, &init.ephemeral)?;
    let sk = match init.one_time_prekey_id {
        Some(id) => {
            let dh4 = dh(prekeys.one_time_secret(id)?, &init.ephemeral)?;
            x3dh_secret(&[&dh1, &dh2, &dh3, &dh4])?
        }
        None => x3dh_secret(&[&dh1, &dh2, &dh3])?,
    };
    let session = Session::new_responder(sk, spk.clone(), spk_pub, ours.public(), *initiator);
    if let Some(id) = init.one_time_prekey_id {
        prekeys.consume_one_time(id);
    }
    Ok(session)
}
