//! TLS of the progress endpoint: the serving certificate and key the operator presents, and
//! the CA it hands to each job's pods so the trainer can verify it (DESIGN.md, "Contracts
//! between operator and trainer").
//!
//! Everything is checked once at start-up, with errors naming the file and the flag, rather
//! than at the first trainer's handshake: each file parses as PEM, the key matches the
//! certificate, and the certificate chains to the CA for the host trainers dial (the host of
//! `DINOFLOW_PROGRESS_ENDPOINT`), exactly as the trainer will check it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// A TLS setting that cannot be used; the message names the file, the flag and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

impl TlsError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// The files of the progress endpoint's TLS, as the operator was given them.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The loaded, checked serving identity and the CA handed to pods.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// PEM of the CA the trainer verifies the endpoint against (the per-job Secret's `ca.crt`).
    pub ca_pem: String,
}

impl std::fmt::Debug for ServerTls {
    // The key is a secret: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Flag names, for error messages.
pub const CERT_FLAG: &str = "--progress-tls-cert-file (DINOFLOW_PROGRESS_TLS_CERT_FILE)";
pub const KEY_FLAG: &str = "--progress-tls-key-file (DINOFLOW_PROGRESS_TLS_KEY_FILE)";
pub const CA_FLAG: &str = "--progress-tls-ca-file (DINOFLOW_PROGRESS_TLS_CA_FILE)";

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("cannot read {flag} {}: {e}", path.display())))
}

/// Every certificate in a PEM file (at least one).
pub fn parse_certificates(
    pem: &[u8],
    path: &Path,
    flag: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{flag} {}: not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{flag} {}: no `-----BEGIN CERTIFICATE-----` block in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        TlsError(format!(
            "{KEY_FLAG} {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}",
            path.display()
        ))
    })
}

impl ServerTls {
    /// Reads and checks the files for an endpoint trainers dial at `endpoint`.
    pub fn load(files: &TlsFiles, endpoint: &str) -> Result<Self, TlsError> {
        let cert_pem = read(&files.cert, CERT_FLAG)?;
        let key_pem = read(&files.key, KEY_FLAG)?;
        let ca_bytes = read(&files.ca, CA_FLAG)?;
        Self::from_pem(files, cert_pem, key_pem, ca_bytes, endpoint)
    }

    fn from_pem(
        files: &TlsFiles,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        ca_bytes: Vec<u8>,
        endpoint: &str,
    ) -> Result<Self, TlsError> {
        let chain = parse_certificates(&cert_pem, &files.cert, CERT_FLAG)?;
        let key = parse_key(&key_pem, &files.key)?;
        let provider = Arc::new(ring::default_provider());
        CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
            TlsError(format!(
                "{KEY_FLAG} {} does not go with {CERT_FLAG} {}: {e}",
                files.key.display(),
                files.cert.display()
            ))
        })?;
        let ca_pem = String::from_utf8(ca_bytes).map_err(|_| {
            TlsError(format!(
                "{CA_FLAG} {}: not a PEM file (not UTF-8)",
                files.ca.display()
            ))
        })?;
        let mut roots = RootCertStore::empty();
        for ca in parse_certificates(ca_pem.as_bytes(), &files.ca, CA_FLAG)? {
            roots.add(ca).map_err(|e| {
                TlsError(format!(
                    "{CA_FLAG} {}: not a usable CA certificate: {e}",
                    files.ca.display()
                ))
            })?;
        }
        let host = endpoint_host(endpoint)?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError(format!("{CA_FLAG} {}: {e}", files.ca.display())))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| {
            TlsError(format!(
                "DINOFLOW_PROGRESS_ENDPOINT {endpoint:?}: host {host:?} is not a DNS name or IP: {e}"
            ))
        })?;
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map_err(|e| {
                TlsError(format!(
                    "{CERT_FLAG} {} does not verify against {CA_FLAG} {} for {host:?}, the host \
                     of DINOFLOW_PROGRESS_ENDPOINT, as trainers will check it: {e}",
                    files.cert.display(),
                    files.ca.display()
                ))
            })?;
        Ok(Self {
            cert_pem,
            key_pem,
            ca_pem,
        })
    }

    /// tonic's server TLS settings for this identity.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// The host trainers dial: the authority of an `https://host:port` endpoint.
pub fn endpoint_host(endpoint: &str) -> Result<String, TlsError> {
    let uri: tonic::transport::Uri = endpoint.parse().map_err(|e| {
        TlsError(format!(
            "DINOFLOW_PROGRESS_ENDPOINT {endpoint:?} is not a URI: {e}"
        ))
    })?;
    if uri.scheme_str() != Some("https") {
        return Err(TlsError(format!(
            "DINOFLOW_PROGRESS_ENDPOINT {endpoint:?} must start with https:// when the endpoint \
             serves TLS (plaintext only with --progress-plaintext)"
        )));
    }
    let host = uri.host().unwrap_or_default();
    // An IPv6 literal comes bracketed in a URI.
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

/// A tonic server builder for the progress endpoint: TLS with `tls`, plaintext without
/// (only when asked for with --progress-plaintext; the caller warns).
pub fn server(tls: Option<&ServerTls>) -> Result<Server, TlsError> {
    match tls {
        Some(tls) => Server::builder()
            .tls_config(tls.server_config())
            .map_err(|e| TlsError(format!("progress endpoint TLS: {e}"))),
        None => Ok(Server::builder()),
    }
}

#[cfg(test)]
mod tests;
