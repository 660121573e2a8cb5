//! Certificates: operator-provided PEM files, or a self-signed development
//! certificate that browsers can pin by hash.
//!
//! Browsers accept a self-signed certificate over WebTransport only when the
//! page pins its SHA-256 (`serverCertificateHashes`), and only if it is ECDSA
//! and valid for **at most 14 days** in total. The dev certificate is
//! therefore generated with a 13-day span (starting a few minutes in the past
//! to absorb clock skew), reused across restarts while more than 2 days
//! remain, and renewed after that; the relay publishes the current hash on
//! its HTTP listener and prints it at startup.
//!
//! Certificate dates always come from the real system clock, never from the
//! relay's injectable [`crate::Clock`]: clients check them against their own
//! real clocks.

use crate::error::RelayError;
use hush_protocol::{ALPN_H3, ALPN_HUSH};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the generated development certificate in the data directory.
pub const DEV_CERT_FILE: &str = "dev-cert.pem";
/// File name of its private key (mode 0600).
pub const DEV_KEY_FILE: &str = "dev-key.pem";
/// Total validity of a generated certificate: under the browsers' 14-day cap.
pub const DEV_CERT_SPAN_SECS: i64 = 13 * 86_400;
/// How far before "now" a generated certificate starts (clock skew margin).
pub const DEV_CERT_BACKDATE_SECS: i64 = 5 * 60;
/// A dev certificate with less than this left is replaced.
pub const DEV_CERT_RENEW_BEFORE_SECS: i64 = 2 * 86_400;
/// The browsers' limit on a pinned certificate's total validity.
pub const BROWSER_MAX_SPAN_SECS: i64 = 14 * 86_400;

/// A certificate chain and its key, ready for TLS.
pub struct CertMaterial {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Public facts about the leaf.
    pub info: CertInfo,
}

impl std::fmt::Debug for CertMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CertMaterial")
            .field("chain_len", &self.chain.len())
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Public facts about the certificate in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DER of the leaf certificate.
    pub der: Vec<u8>,
    /// Lowercase hex SHA-256 of `der` (what browsers pin).
    pub sha256_hex: String,
    /// Validity start, Unix seconds (if the DER could be read).
    pub not_before: Option<i64>,
    /// Validity end, Unix seconds (if the DER could be read).
    pub not_after: Option<i64>,
}

impl CertInfo {
    /// Facts about a leaf certificate.
    pub fn from_der(der: &[u8]) -> CertInfo {
        let validity = der_validity(der).ok();
        CertInfo {
            der: der.to_vec(),
            sha256_hex: sha256_hex(der),
            not_before: validity.map(|v| v.0),
            not_after: validity.map(|v| v.1),
        }
    }
}

/// The certificate currently served, readable from any task and swapped
/// when it is renewed or replaced.
#[derive(Debug)]
pub struct CertState(std::sync::RwLock<Arc<CertInfo>>);

impl CertState {
    /// Start with `info`.
    pub fn new(info: CertInfo) -> Self {
        CertState(std::sync::RwLock::new(Arc::new(info)))
    }

    /// The current certificate.
    pub fn get(&self) -> Arc<CertInfo> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replace the current certificate.
    pub fn set(&self, info: CertInfo) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(info);
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether a dev certificate was reused or made anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevCertStatus {
    /// The stored one still had enough validity left.
    Reused,
    /// A new one was generated and stored.
    Generated,
}

/// Load the dev certificate from `dir`, or generate and store a new one if
/// it is missing, unreadable, too long-lived for browsers, or has less than
/// two days left at `now_unix`.
pub fn load_or_create_dev_cert(
    dir: &Path,
    now_unix: i64,
) -> Result<(CertMaterial, DevCertStatus), RelayError> {
    let cert_path = dir.join(DEV_CERT_FILE);
    let key_path = dir.join(DEV_KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        match load_pem_files(&cert_path, &key_path) {
            Ok(m) if dev_cert_usable(&m.info, now_unix) => {
                // Check the pair matches before trusting it.
                if quic_server_config(&m).is_ok() {
                    return Ok((m, DevCertStatus::Reused));
                }
                tracing::warn!(
                    "stored dev certificate does not match its key; generating a new one"
                );
            }
            Ok(_) => tracing::info!("dev certificate expires soon; generating a new one"),
            Err(e) => tracing::warn!("stored dev certificate unusable ({e}); generating a new one"),
        }
    }
    let (cert_pem, key_pem) = generate_dev_cert(now_unix)?;
    write_file(&cert_path, cert_pem.as_bytes(), false)?;
    write_file(&key_path, key_pem.as_bytes(), true)?;
    let m = parse_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
    Ok((m, DevCertStatus::Generated))
}

/// Whether a stored dev certificate may still be served at `now_unix`.
pub fn dev_cert_usable(info: &CertInfo, now_unix: i64) -> bool {
    match (info.not_before, info.not_after) {
        (Some(nb), Some(na)) => {
            na - nb < BROWSER_MAX_SPAN_SECS
                && nb <= now_unix
                && na - now_unix > DEV_CERT_RENEW_BEFORE_SECS
        }
        _ => false,
    }
}

/// Generate a self-signed ECDSA P-256 certificate for `localhost`,
/// `127.0.0.1` and `::1`, valid from a few minutes before `now_unix` for
/// [`DEV_CERT_SPAN_SECS`]. Returns (certificate PEM, private key PEM).
pub fn generate_dev_cert(now_unix: i64) -> Result<(String, String), RelayError> {
    let tls = |e: rcgen::Error| RelayError::Tls(format!("generating dev certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(tls)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "Hush relay development certificate",
    );
    let not_before = now_unix - DEV_CERT_BACKDATE_SECS;
    let date = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .map_err(|e| RelayError::Tls(format!("certificate date: {e}")))
    };
    params.not_before = date(not_before)?;
    params.not_after = date(not_before + DEV_CERT_SPAN_SECS)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(tls)?;
    let cert = params.self_signed(&key).map_err(tls)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Read a PEM certificate chain and private key.
pub fn load_pem_files(cert: &Path, key: &Path) -> Result<CertMaterial, RelayError> {
    let read = |what, p: &Path| {
        std::fs::read(p).map_err(|source| RelayError::File {
            what,
            path: p.to_path_buf(),
            source,
        })
    };
    let cert_pem = read("certificate", cert)?;
    let key_pem = read("private key", key)?;
    parse_pem(&cert_pem, &key_pem).map_err(|e| match e {
        RelayError::Tls(m) => {
            RelayError::Tls(format!("{} / {}: {m}", cert.display(), key.display()))
        }
        other => other,
    })
}

/// Parse PEM bytes of a chain and a key.
pub fn parse_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertMaterial, RelayError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RelayError::Tls(format!("reading certificate PEM: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| RelayError::Tls("no certificate in PEM".into()))?;
    let info = CertInfo::from_der(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| RelayError::Tls(format!("reading private key PEM: {e}")))?;
    Ok(CertMaterial { chain, key, info })
}

/// Build the QUIC server crypto for `material`: TLS 1.3 only, ALPN
/// `h3` and `hush/1` (the connection's protocol is dispatched on it), no 0-RTT
/// (early data could be replayed).
pub fn quic_server_config(
    material: &CertMaterial,
) -> Result<quinn::crypto::rustls::QuicServerConfig, RelayError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| RelayError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|e| RelayError::Tls(format!("certificate and key: {e}")))?;
    tls.alpn_protocols = vec![ALPN_H3.to_vec(), ALPN_HUSH.to_vec()];
    quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| RelayError::Tls(format!("QUIC TLS config: {e}")))
}

/// Write `bytes` to `path` atomically (temporary file + rename); `private`
/// files get mode 0600 on Unix.
pub(crate) fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), RelayError> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let err = |source| RelayError::File {
        what: if private {
            "private key"
        } else {
            "certificate"
        },
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(err)?;
    #[cfg(unix)]
    if private {
        // The file may have existed with wider permissions.
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// Where the certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// Generated in (and reused from) this directory.
    Dev(PathBuf),
    /// Operator files, re-read when they change (e.g. after an ACME renewal).
    Files {
        /// PEM chain.
        cert: PathBuf,
        /// PEM key.
        key: PathBuf,
    },
}

impl CertSource {
    /// Load the current certificate; for a dev certificate, renew it if needed.
    pub fn load(&self, now_unix: i64) -> Result<CertMaterial, RelayError> {
        match self {
            CertSource::Dev(dir) => load_or_create_dev_cert(dir, now_unix).map(|(m, _)| m),
            CertSource::Files { cert, key } => load_pem_files(cert, key),
        }
    }
}

/// Read notBefore/notAfter (Unix seconds) from a DER X.509 certificate.
///
/// A minimal walk of the fixed prefix of `TBSCertificate` (version, serial,
/// signature algorithm, issuer, validity) — enough to decide renewal without
/// pulling in a full X.509 parser.
pub fn der_validity(der: &[u8]) -> Result<(i64, i64), String> {
    let (tag, cert, _) = der_tlv(der)?;
    expect_tag(tag, 0x30, "certificate")?;
    let (tag, tbs, _) = der_tlv(cert)?;
    expect_tag(tag, 0x30, "tbsCertificate")?;
    let (mut tag, _, mut next) = der_tlv(tbs)?;
    if tag == 0xA0 {
        // Explicit version: skip to the serial.
        (tag, _, next) = der_tlv(next)?;
    }
    expect_tag(tag, 0x02, "serial")?;
    let (tag, _, next) = der_tlv(next)?;
    expect_tag(tag, 0x30, "signature algorithm")?;
    let (tag, _, next) = der_tlv(next)?;
    expect_tag(tag, 0x30, "issuer")?;
    let (tag, validity, _) = der_tlv(next)?;
    expect_tag(tag, 0x30, "validity")?;
    let (t1, nb, after_nb) = der_tlv(validity)?;
    let (t2, na, _) = der_tlv(after_nb)?;
    Ok((der_time(t1, nb)?, der_time(t2, na)?))
}

fn expect_tag(got: u8, want: u8, what: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: unexpected DER tag {got:#04x}"))
    }
}

/// One DER tag-length-value: (tag, contents, bytes after it).
fn der_tlv(b: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let (&tag, rest) = b.split_first().ok_or("DER: truncated tag")?;
    let (&first, rest) = rest.split_first().ok_or("DER: truncated length")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return Err("DER: unsupported length form".into());
        }
        let bytes = rest.get(..n).ok_or("DER: truncated length")?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        (len, &rest[n..])
    };
    let contents = rest.get(..len).ok_or("DER: truncated contents")?;
    Ok((tag, contents, &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) to Unix seconds.
fn der_time(tag: u8, b: &[u8]) -> Result<i64, String> {
    let s = std::str::from_utf8(b).map_err(|_| "DER time: not ASCII")?;
    let s = s.strip_suffix('Z').ok_or("DER time: not UTC")?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = s
                .get(..2)
                .and_then(|v| v.parse().ok())
                .ok_or("DER time: year")?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        0x18 => {
            let y: i32 = s
                .get(..4)
                .and_then(|v| v.parse().ok())
                .ok_or("DER time: year")?;
            (y, s.get(4..).ok_or("DER time: short")?)
        }
        _ => return Err(format!("DER time: unexpected tag {tag:#04x}")),
    };
    if rest.len() != 10 || !rest.bytes().all(|c| c.is_ascii_digit()) {
        return Err("DER time: malformed".into());
    }
    let num = |i: usize| -> Result<u8, String> {
        rest.get(i..i + 2)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| "DER time: malformed".to_string())
    };
    let month = time::Month::try_from(num(0)?).map_err(|e| e.to_string())?;
    let date = time::Date::from_calendar_date(year, month, num(2)?).map_err(|e| e.to_string())?;
    let t = time::Time::from_hms(num(4)?, num(6)?, num(8)?).map_err(|e| e.to_string())?;
    Ok(time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn generated_cert_reads_back_its_validity() {
        let (cert, key) = generate_dev_cert(NOW).unwrap();
        let m = parse_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(m.info.not_before, Some(NOW - DEV_CERT_BACKDATE_SECS));
        assert_eq!(
            m.info.not_after,
            Some(NOW - DEV_CERT_BACKDATE_SECS + DEV_CERT_SPAN_SECS)
        );
        assert_eq!(m.info.sha256_hex.len(), 64);
        assert!(quic_server_config(&m).is_ok());
    }

    #[test]
    fn der_time_forms() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Ok(0));
        assert_eq!(der_time(0x18, b"19700101000100Z"), Ok(60));
        assert_eq!(der_time(0x17, b"491231235959Z"), Ok(2_524_607_999));
        assert!(der_time(0x17, b"700101000000").is_err());
        assert!(der_time(0x17, b"701301000000Z").is_err());
        assert!(der_validity(&[0x30, 0x05, 0x00]).is_err());
    }

    #[test]
    fn usable_rules() {
        let info = |nb: i64, na: i64| CertInfo {
            der: vec![],
            sha256_hex: String::new(),
            not_before: Some(nb),
            not_after: Some(na),
        };
        assert!(dev_cert_usable(&info(NOW - 10, NOW + 10 * 86_400), NOW));
        assert!(!dev_cert_usable(&info(NOW - 10, NOW + 86_400), NOW));
        assert!(!dev_cert_usable(
            &info(NOW - 5 * 86_400, NOW + 10 * 86_400),
            NOW
        ));
        assert!(!dev_cert_usable(&info(NOW + 10, NOW + 10 * 86_400), NOW));
    }
}
