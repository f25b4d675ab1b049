//! TLS configuration: the acceptor for clients (`server.tls_cert`/`server.tls_key`) and
//! the connector toward PostgreSQL (`sslmode` in `backend.url`).
//!
//! Toward PostgreSQL spillway follows libpq's meaning of `prefer`/`require`: the
//! channel is encrypted but the server certificate is not verified (that is what
//! `verify-ca`/`verify-full` would add; spillway refuses those modes rather than
//! pretend to verify). Handshake signatures are still checked, so the session is bound
//! to whoever holds the presented key.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} {path}: {error}")]
    Read {
        key: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("{key} {path}: no {what} found in the PEM file")]
    Empty {
        key: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client-facing acceptor from PEM files.
pub fn acceptor(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor, TlsError> {
    let open = |key: &'static str, path: &Path| {
        File::open(path)
            .map(BufReader::new)
            .map_err(|error| TlsError::Read {
                key,
                path: path.display().to_string(),
                error,
            })
    };
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut open("server.tls_cert", cert_path)?)
            .collect::<Result<_, _>>()
            .map_err(|error| TlsError::Read {
                key: "server.tls_cert",
                path: cert_path.display().to_string(),
                error,
            })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key: "server.tls_cert",
            path: cert_path.display().to_string(),
            what: "certificate",
        });
    }
    let key = rustls_pemfile::private_key(&mut open("server.tls_key", key_path)?)
        .map_err(|error| TlsError::Read {
            key: "server.tls_key",
            path: key_path.display().to_string(),
            error,
        })?
        .ok_or_else(|| TlsError::Empty {
            key: "server.tls_key",
            path: key_path.display().to_string(),
            what: "private key",
        })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Builds the upstream connector (encryption without certificate verification).
pub fn upstream_connector() -> Result<TlsConnector, TlsError> {
    let provider = provider();
    let verifier = Arc::new(EncryptOnly {
        algorithms: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// libpq `sslmode=require`: accept any certificate, still verify handshake signatures.
#[derive(Debug)]
struct EncryptOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
