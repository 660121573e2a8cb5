//! Certificate pinning for test clients.
//!
//! The relay's development certificate is self-signed, so no CA verifies it.
//! Instead the client accepts exactly one certificate: the one whose DER
//! encoding hashes to the SHA-256 the relay printed at startup (the same check
//! browsers do with `serverCertificateHashes`). The handshake signature is
//! still verified against that certificate's key, so a peer holding a copy of
//! the certificate but not its key cannot pass.

use crate::{HarnessError, Result};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// Accepts exactly the certificate whose DER has this SHA-256: the `hush`
/// CLI's verifier, so the tests pin certificates the way real clients do.
pub use hush_cli::transport::PinnedVerifier as PinnedCertVerifier;

/// SHA-256 of a DER certificate (what [`PinnedCertVerifier`] pins).
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(Sha256::digest(der).as_slice());
    out
}

/// A quinn client configuration that pins `cert_sha256`, offers `alpn`,
/// and gives up on a silent peer after `idle_timeout` (keep-alives at a
/// third of it keep a quiet but healthy connection open).
pub fn client_config(
    cert_sha256: [u8; 32],
    alpn: &[u8],
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCertVerifier::new(cert_sha256, &provider));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| HarnessError::Connect(format!("tls config: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| HarnessError::Connect(format!("quic tls config: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|e| HarnessError::Connect(format!("idle timeout: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(idle_timeout / 3));
    transport.mtu_discovery_config(Some(hush_relay::server::quic::mtu_discovery()));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A client endpoint bound to `bind`, with the endpoint settings the relay
/// and Hush's native clients use (the largest UDP payload they receive).
pub fn client_endpoint(bind: std::net::SocketAddr) -> Result<quinn::Endpoint> {
    let config = hush_relay::server::quic::endpoint_config()
        .map_err(|e| HarnessError::Connect(e.to_string()))?;
    Ok(quinn::Endpoint::new(
        config,
        None,
        std::net::UdpSocket::bind(bind)?,
        Arc::new(quinn::TokioRuntime),
    )?)
}
