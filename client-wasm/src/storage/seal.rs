//! Encryption at rest: every value a store writes is sealed.
//!
//! The engine emits plaintext records (identity secrets, ratchet sessions,
//! message history); the stores seal each value at their boundary, so the
//! engine never sees the difference and a store file copied away holds no
//! secret and no message text.
//!
//! A sealed value is `nonce (12) ‖ ciphertext ‖ tag (16)`: ChaCha20-Poly1305
//! ([`hush_crypto::seal_at_rest`]) under the store's 32-byte data key with a
//! random nonce per write, and the record's *key* as associated data, so a
//! value moved to another key (a pack swapped between conversations, an old
//! session copied over a newer one's key) fails to open and is reported as
//! [`StorageError::Corrupt`]. Keys stay plaintext: they are namespaces, ids
//! (conversation, message, device ids, all random) and positions, never
//! secrets or text; the stores need them in the clear to range-scan.
//!
//! What the data key is sealed by is the store's [`Header`], kept beside the
//! records: either nothing (the key is held elsewhere: a key file natively,
//! a non-extractable WebCrypto key in the browser) or a passphrase, through
//! Argon2id with the salt and cost parameters recorded in the header. The
//! header ends in a check value (an empty plaintext sealed under the key,
//! the header's other bytes as associated data), so a wrong key or
//! passphrase is [`StorageError::WrongKey`] at open, never garbage later.

use crate::error::StorageError;
use crate::storage::keys;
use hush_crypto::{AT_REST_NONCE_LEN, TAG_LEN, open_at_rest, seal_at_rest};
use rand_core::{CryptoRng, Rng as _};
use zeroize::Zeroizing;

/// Length of a data key.
pub const KEY_LEN: usize = 32;
/// Bytes a sealed value adds to its plaintext.
pub const OVERHEAD: usize = AT_REST_NONCE_LEN + TAG_LEN;
/// Version byte of the header layout.
const HEADER_VERSION: u8 = 1;
/// Header kind: the key is held outside the store (key file, WebCrypto).
const KIND_KEY: u8 = 1;
/// Header kind: the key is derived from a passphrase with Argon2id.
const KIND_PASSPHRASE: u8 = 2;
/// Length of the Argon2id salt.
pub const SALT_LEN: usize = 16;
/// Associated-data prefix of the check value (never a record key: those
/// start with `s/` or `h/`).
const CHECK_AD: &[u8] = b"hush-store-check/v1";
/// Printable name of the header, for errors.
const HEADER_NAME: &str = "store seal header";

/// A store's data key (zeroized on drop, never printed).
#[derive(Clone)]
pub struct StoreKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

impl StoreKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> StoreKey {
        StoreKey(Zeroizing::new(bytes))
    }

    /// A fresh random key from the operating system's RNG.
    pub fn generate() -> Result<StoreKey, StorageError> {
        let mut rng = rng()?;
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill_bytes(&mut *bytes);
        Ok(StoreKey(bytes))
    }

    /// The key's bytes (to write a key file or wrap the key).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// The operating system's RNG, or a typed error if it is unavailable.
pub(crate) fn rng() -> Result<hush_crypto::OsRng, StorageError> {
    hush_crypto::checked_os_rng()
        .map_err(|e| StorageError::Backend(format!("no randomness for sealing: {e}")))
}

/// Seal the value of record `key`.
pub fn seal<R: CryptoRng + ?Sized>(
    store_key: &StoreKey,
    rng: &mut R,
    key: &[u8],
    value: &[u8],
) -> Result<Vec<u8>, StorageError> {
    seal_at_rest(store_key.as_bytes(), rng, value, key)
        .map_err(|e| StorageError::Backend(format!("sealing a record failed: {e}")))
}

/// Open the sealed value of record `key`; a value that was altered, moved
/// from another key or sealed under another key is
/// [`StorageError::Corrupt`] naming the key.
pub fn open(store_key: &StoreKey, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, StorageError> {
    open_at_rest(store_key.as_bytes(), sealed, key).map_err(|_| StorageError::Corrupt {
        key: keys::printable(key),
    })
}

/// Argon2id cost parameters (RFC 9106 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// What a new passphrase-sealed store uses: 64 MiB, 3 passes, 1 lane
    /// (RFC 9106's second recommendation with one lane; about 0.2 s on a
    /// laptop core, paid once per start).
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// Largest parameters a header may ask for (a crafted header must not
    /// make the client allocate without bound).
    const MAX: KdfParams = KdfParams {
        m_kib: 1024 * 1024,
        t: 64,
        p: 16,
    };

    fn within_bounds(&self) -> bool {
        (1..=Self::MAX.m_kib).contains(&self.m_kib)
            && (1..=Self::MAX.t).contains(&self.t)
            && (1..=Self::MAX.p).contains(&self.p)
    }
}

/// What seals a store's data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// The key is held outside the store (a key file, a WebCrypto key).
    Key,
    /// The key is Argon2id(passphrase, salt, params).
    Passphrase {
        /// Random salt of this store.
        salt: [u8; SALT_LEN],
        /// Cost parameters.
        params: KdfParams,
    },
}

/// The header record of a sealed store.
///
/// Layout: `version (1) ‖ kind (1) ‖ [salt (16) ‖ m (u32 LE) ‖ t (u32 LE) ‖
/// p (u32 LE)] ‖ check (28)`, the bracketed part for a passphrase only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// What seals the key.
    pub protection: Protection,
    check: Vec<u8>,
}

impl Header {
    /// A header for a new store sealed under `key`.
    pub fn new<R: CryptoRng + ?Sized>(
        protection: Protection,
        key: &StoreKey,
        rng: &mut R,
    ) -> Result<Header, StorageError> {
        let ad = check_ad(&Self::prefix(&protection));
        let check = seal_at_rest(key.as_bytes(), rng, &[], &ad)
            .map_err(|e| StorageError::Backend(format!("sealing the store header failed: {e}")))?;
        Ok(Header { protection, check })
    }

    fn prefix(protection: &Protection) -> Vec<u8> {
        let mut out = vec![HEADER_VERSION];
        match protection {
            Protection::Key => out.push(KIND_KEY),
            Protection::Passphrase { salt, params } => {
                out.push(KIND_PASSPHRASE);
                out.extend_from_slice(salt);
                for n in [params.m_kib, params.t, params.p] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
        out
    }

    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Self::prefix(&self.protection);
        out.extend_from_slice(&self.check);
        out
    }

    /// Parse a header; anything malformed is [`StorageError::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<Header, StorageError> {
        let corrupt = || StorageError::Corrupt {
            key: HEADER_NAME.into(),
        };
        let (&version, rest) = bytes.split_first().ok_or_else(corrupt)?;
        if version != HEADER_VERSION {
            return Err(StorageError::Backend(format!(
                "unsupported {HEADER_NAME} version {version} (this build reads {HEADER_VERSION})"
            )));
        }
        let (&kind, rest) = rest.split_first().ok_or_else(corrupt)?;
        let (protection, rest) = match kind {
            KIND_KEY => (Protection::Key, rest),
            KIND_PASSPHRASE => {
                let salt: [u8; SALT_LEN] = rest
                    .get(..SALT_LEN)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(corrupt)?;
                let word = |i: usize| -> Result<u32, StorageError> {
                    let at = SALT_LEN + 4 * i;
                    rest.get(at..at + 4)
                        .and_then(|w| w.try_into().ok())
                        .map(u32::from_le_bytes)
                        .ok_or_else(corrupt)
                };
                let params = KdfParams {
                    m_kib: word(0)?,
                    t: word(1)?,
                    p: word(2)?,
                };
                if !params.within_bounds() {
                    return Err(corrupt());
                }
                let rest = rest.get(SALT_LEN + 12..).ok_or_else(corrupt)?;
                (Protection::Passphrase { salt, params }, rest)
            }
            _ => return Err(corrupt()),
        };
        if rest.len() != OVERHEAD {
            return Err(corrupt());
        }
        Ok(Header {
            protection,
            check: rest.to_vec(),
        })
    }

    /// Whether `key` is this store's key: [`StorageError::WrongKey`] if not.
    pub fn verify(&self, key: &StoreKey) -> Result<(), StorageError> {
        let ad = check_ad(&Self::prefix(&self.protection));
        match open_at_rest(key.as_bytes(), &self.check, &ad) {
            Ok(plain) if plain.is_empty() => Ok(()),
            _ => Err(StorageError::WrongKey(
                match self.protection {
                    Protection::Key => {
                        "the key does not open this store (wrong or replaced key file?)"
                    }
                    Protection::Passphrase { .. } => "wrong passphrase",
                }
                .into(),
            )),
        }
    }
}

fn check_ad(prefix: &[u8]) -> Vec<u8> {
    let mut ad = CHECK_AD.to_vec();
    ad.extend_from_slice(prefix);
    ad
}

/// How a native store is unlocked.
pub enum Unlock {
    /// A data key held outside the store (e.g. a key file).
    Key(StoreKey),
    /// A passphrase: the key is derived with Argon2id. `params` are used
    /// when a store is created; an existing store's header decides.
    Passphrase {
        /// The passphrase (zeroized on drop).
        passphrase: Zeroizing<String>,
        /// Parameters for a new store.
        params: KdfParams,
    },
}

impl std::fmt::Debug for Unlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unlock::Key(_) => f.write_str("Unlock::Key(..)"),
            Unlock::Passphrase { params, .. } => write!(f, "Unlock::Passphrase(.., {params:?})"),
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Unlock {
    /// A passphrase with the default parameters for new stores.
    pub fn passphrase(passphrase: impl Into<String>) -> Unlock {
        Unlock::Passphrase {
            passphrase: Zeroizing::new(passphrase.into()),
            params: KdfParams::DEFAULT,
        }
    }

    /// The key and header for a new store.
    pub fn create<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
    ) -> Result<(StoreKey, Header), StorageError> {
        let (key, protection) = match self {
            Unlock::Key(key) => (key.clone(), Protection::Key),
            Unlock::Passphrase { passphrase, params } => {
                let mut salt = [0u8; SALT_LEN];
                rng.fill_bytes(&mut salt);
                let key = derive(passphrase, &salt, *params)?;
                let protection = Protection::Passphrase {
                    salt,
                    params: *params,
                };
                (key, protection)
            }
        };
        let header = Header::new(protection, &key, rng)?;
        Ok((key, header))
    }

    /// The key of an existing store, checked against its header.
    pub fn open(&self, header: &Header) -> Result<StoreKey, StorageError> {
        let key = match (self, &header.protection) {
            (Unlock::Key(key), Protection::Key) => key.clone(),
            (Unlock::Passphrase { passphrase, .. }, Protection::Passphrase { salt, params }) => {
                derive(passphrase, salt, *params)?
            }
            (Unlock::Key(_), Protection::Passphrase { .. }) => {
                return Err(StorageError::WrongKey(
                    "this store is sealed with a passphrase; none was given".into(),
                ));
            }
            (Unlock::Passphrase { .. }, Protection::Key) => {
                return Err(StorageError::WrongKey(
                    "this store is sealed with a key file, not a passphrase".into(),
                ));
            }
        };
        header.verify(&key)?;
        Ok(key)
    }
}

/// Argon2id(passphrase, salt) with `params`.
#[cfg(not(target_arch = "wasm32"))]
fn derive(passphrase: &str, salt: &[u8], params: KdfParams) -> Result<StoreKey, StorageError> {
    use argon2::{Algorithm, Argon2, Params, Version};
    let bad = |e: argon2::Error| StorageError::Backend(format!("Argon2id: {e}"));
    let p = Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN)).map_err(bad)?;
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
        .hash_password_into(passphrase.as_bytes(), salt, &mut *out)
        .map_err(bad)?;
    Ok(StoreKey(out))
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// Cheap parameters: the tests check the plumbing, not the cost.
    const CHEAP: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };

    fn pass(p: &str) -> Unlock {
        Unlock::Passphrase {
            passphrase: Zeroizing::new(p.into()),
            params: CHEAP,
        }
    }

    #[test]
    fn a_value_opens_only_under_its_own_record_key() {
        let key = StoreKey::generate().unwrap();
        let mut rng = rng().unwrap();
        let sealed = seal(&key, &mut rng, b"s/session/a", b"secret").unwrap();
        assert_eq!(sealed.len(), 6 + OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(open(&key, b"s/session/a", &sealed).unwrap(), b"secret");
        // Swapped to another key: refused, naming the key it was read under.
        assert!(matches!(
            open(&key, b"s/session/b", &sealed),
            Err(StorageError::Corrupt { key }) if key.starts_with("s/session/")
        ));
        // Another store's key.
        let other = StoreKey::generate().unwrap();
        assert!(open(&other, b"s/session/a", &sealed).is_err());
        // One flipped bit.
        let mut bad = sealed.clone();
        bad[14] ^= 1;
        assert!(open(&key, b"s/session/a", &bad).is_err());
        // Two seals of one value differ (random nonces).
        assert_ne!(
            seal(&key, &mut rng, b"k", b"v").unwrap(),
            seal(&key, &mut rng, b"k", b"v").unwrap()
        );
    }

    #[test]
    fn a_wrong_passphrase_is_a_typed_error() {
        let mut rng = rng().unwrap();
        let (key, header) = pass("correct horse").create(&mut rng).unwrap();
        let back = Header::decode(&header.encode()).unwrap();
        assert_eq!(back, header);
        assert_eq!(
            pass("correct horse").open(&back).unwrap().as_bytes(),
            key.as_bytes()
        );
        assert!(matches!(
            pass("correct horsf").open(&back),
            Err(StorageError::WrongKey(m)) if m.contains("wrong passphrase")
        ));
        assert!(matches!(
            Unlock::Key(key).open(&back),
            Err(StorageError::WrongKey(_))
        ));
    }

    #[test]
    fn a_wrong_key_and_crafted_headers_are_typed_errors() {
        let mut rng = rng().unwrap();
        let key = StoreKey::generate().unwrap();
        let (_, header) = Unlock::Key(key.clone()).create(&mut rng).unwrap();
        assert!(Unlock::Key(key).open(&header).is_ok());
        assert!(matches!(
            Unlock::Key(StoreKey::generate().unwrap()).open(&header),
            Err(StorageError::WrongKey(_))
        ));
        assert!(matches!(
            pass("x").open(&header),
            Err(StorageError::WrongKey(_))
        ));
        // Raised cost parameters fail the check (they are authenticated)…
        let (_, header) = pass("p").create(&mut rng).unwrap();
        let mut bytes = header.encode();
        bytes[2 + SALT_LEN + 4] = 2;
        assert!(matches!(
            pass("p").open(&Header::decode(&bytes).unwrap()),
            Err(StorageError::WrongKey(_))
        ));
        // …and unbounded ones are refused before any allocation.
        let mut huge = header.encode();
        huge[2 + SALT_LEN..2 + SALT_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Header::decode(&huge),
            Err(StorageError::Corrupt { .. })
        ));
        for n in 0..bytes.len() {
            assert!(Header::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn keys_are_never_printed() {
        let key = StoreKey::from_bytes([0xab; KEY_LEN]);
        assert_eq!(format!("{key:?}"), "StoreKey(..)");
        let p = pass("hunter2");
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
