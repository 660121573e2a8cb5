//! Text codes people exchange: contact codes and device-link codes, and the
//! identifiers derived from them.
//!
//! Both codes are `prefix ‖ base64url(postcard(body) ‖ checksum)` where the
//! checksum is the first 4 bytes of SHA-256 over the body, so a mistyped or
//! truncated code is rejected instead of decoding into the wrong key:
//!
//! - `hush-contact:` — [`ContactCode`]: the user's identity public key (which
//!   pins every device list the relay hands out), the relay address and a
//!   display name. Safe to publish.
//! - `hush-link:` — [`LinkCode`]: what a new device needs to join the user.
//!   It carries the **user identity secret**, so it must travel only between
//!   the user's own devices (see `docs/SECURITY.md`, "Devices and linking").

use crate::error::ClientError;
use base64::Engine as _;
use hush_crypto::UserIdentity;
use hush_protocol::{ConversationId, DeviceId, UserKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const CONTACT_PREFIX: &str = "hush-contact:";
const LINK_PREFIX: &str = "hush-link:";
const CHECKSUM_LEN: usize = 4;
/// Longest relay address or display name a code may carry.
pub const MAX_CODE_TEXT: usize = 256;

fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let d = Sha256::digest(body);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&d[..CHECKSUM_LEN]);
    out
}

fn encode_code<T: Serialize>(prefix: &str, value: &T) -> Result<String, ClientError> {
    let mut body = Zeroizing::new(
        postcard::to_allocvec(value).map_err(|_| ClientError::BadCode("unencodable"))?,
    );
    let sum = checksum(&body);
    body.extend_from_slice(&sum);
    let mut out = String::from(prefix);
    out.push_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body.as_slice()));
    Ok(out)
}

fn decode_code<T: for<'de> Deserialize<'de>>(prefix: &str, text: &str) -> Result<T, ClientError> {
    let rest = text
        .trim()
        .strip_prefix(prefix)
        .ok_or(ClientError::BadCode("wrong prefix"))?;
    if rest.len() > 4 * MAX_CODE_TEXT + 512 {
        return Err(ClientError::BadCode("too long"));
    }
    let raw = Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rest)
            .map_err(|_| ClientError::BadCode("not base64url"))?,
    );
    let split = raw
        .len()
        .checked_sub(CHECKSUM_LEN)
        .ok_or(ClientError::BadCode("too short"))?;
    let (body, sum) = raw.split_at(split);
    if checksum(body) != sum {
        return Err(ClientError::BadCode("checksum mismatch"));
    }
    postcard::from_bytes(body).map_err(|_| ClientError::BadCode("malformed body"))
}

fn check_text(s: &str, what: &'static str) -> Result<(), ClientError> {
    if s.len() > MAX_CODE_TEXT || s.chars().any(char::is_control) {
        return Err(ClientError::BadCode(what));
    }
    Ok(())
}

/// What a user hands out so others can message them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactCode {
    /// The user's identity key: every device list must be signed by it.
    pub user: UserKey,
    /// Where the user's relay is reached (`host:port`).
    pub relay: String,
    /// A display name chosen by the user (not authenticated beyond the code).
    pub name: String,
}

impl ContactCode {
    /// The text form, `hush-contact:…`.
    pub fn to_text(&self) -> Result<String, ClientError> {
        encode_code(CONTACT_PREFIX, self)
    }

    /// Parse the text form, checking prefix, checksum and field sizes.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let code: ContactCode = decode_code(CONTACT_PREFIX, text)?;
        check_text(&code.relay, "relay address")?;
        check_text(&code.name, "name")?;
        Ok(code)
    }
}

/// A one-time code that lets a new device join an existing user.
///
/// `Debug` never prints the user secret or the token.
#[derive(Clone, Serialize, Deserialize)]
pub struct LinkCode {
    /// Relay address of the user.
    pub relay: String,
    /// The user's display name (copied to the new device).
    pub name: String,
    /// The device that made the code; the new device introduces itself to it.
    pub inviter: DeviceId,
    /// One-time token the inviter accepts once, before it expires.
    pub token: [u8; 16],
    /// The user identity secret (postcard of [`UserIdentity`]).
    pub(crate) user_secret: Vec<u8>,
}

impl Drop for LinkCode {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.user_secret.zeroize();
        self.token.zeroize();
    }
}

impl std::fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCode")
            .field("relay", &self.relay)
            .field("name", &self.name)
            .field("inviter", &self.inviter)
            .field("secrets", &"[redacted]")
            .finish()
    }
}

impl LinkCode {
    /// The text form, `hush-link:…` (contains secrets: show it only to the user).
    pub fn to_text(&self) -> Result<Zeroizing<String>, ClientError> {
        encode_code(LINK_PREFIX, self).map(Zeroizing::new)
    }

    /// Parse the text form.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let code: LinkCode = decode_code(LINK_PREFIX, text)?;
        check_text(&code.relay, "relay address")?;
        check_text(&code.name, "name")?;
        code.user_identity()?;
        Ok(code)
    }

    /// The user identity the code carries.
    pub(crate) fn user_identity(&self) -> Result<UserIdentity, ClientError> {
        UserIdentity::from_bytes(&self.user_secret).map_err(|_| ClientError::BadCode("user secret"))
    }
}

fn derive16(label: &[u8], a: &[u8], b: &[u8]) -> [u8; 16] {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h = Sha256::new();
    h.update(label);
    h.update([0u8]);
    h.update(lo);
    h.update(hi);
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// The one-to-one conversation between two users: both sides derive the same
/// id from the two identity keys, so no negotiation is needed.
pub fn conversation_between(a: &UserKey, b: &UserKey) -> ConversationId {
    ConversationId(derive16(
        b"hush-conversation-v1",
        a.as_bytes(),
        b.as_bytes(),
    ))
}

/// The control conversation of a device pair: receipts, read and delete sync,
/// resend requests and link messages travel here, with their own sender seqs,
/// so they never leave holes in chat streams.
pub fn control_conversation(a: &DeviceId, b: &DeviceId) -> ConversationId {
    ConversationId(derive16(b"hush-control-v1", a.as_bytes(), b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_code_round_trips_and_rejects_typos() {
        let code = ContactCode {
            user: UserKey([7; 32]),
            relay: "127.0.0.1:4433".into(),
            name: "alice".into(),
        };
        let text = code.to_text().unwrap();
        assert!(text.starts_with("hush-contact:"));
        assert_eq!(ContactCode::parse(&text).unwrap(), code);
        // Flip one character in the middle: checksum or decoding must fail.
        let mut chars: Vec<char> = text.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let bad: String = chars.into_iter().collect();
        assert!(ContactCode::parse(&bad).is_err());
        assert!(ContactCode::parse("hush-link:AAAA").is_err());
        assert!(ContactCode::parse("hush-contact:").is_err());
    }

    #[test]
    fn derived_ids_are_symmetric_and_distinct() {
        let a = UserKey([1; 32]);
        let b = UserKey([2; 32]);
        assert_eq!(conversation_between(&a, &b), conversation_between(&b, &a));
        let d1 = DeviceId([1; 16]);
        let d2 = DeviceId([2; 16]);
        assert_eq!(
            control_conversation(&d1, &d2),
            control_conversation(&d2, &d1)
        );
        assert_ne!(
            control_conversation(&d1, &d2).0,
            conversation_between(&a, &b).0
        );
    }
}
