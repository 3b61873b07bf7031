//! NBD over TLS: the server's certificate and, optionally, the CA its clients'
//! certificates must come from. See the [crate docs](crate#tls) for the protocol side.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// What a TLS-speaking server presents and whom it lets in. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) acceptor: TlsAcceptor,
    client_auth: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// Why the TLS set-up could not be read.
#[derive(Debug, Error)]
pub enum TlsConfigError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read the {what} {}: {message}", path.display())]
    Read {
        /// "TLS certificate", "TLS private key", "client CA certificate".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// A certificate file held no certificate.
    #[error(
        "{} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
        .0.display()
    )]
    NoCertificate(PathBuf),
    /// rustls refused the combination (a key that does not match the certificate, a CA
    /// certificate it cannot use).
    #[error("{0}")]
    Setup(String),
}

impl TlsConfig {
    /// A server certificate chain and its private key (PEM; the key PKCS#8, PKCS#1 or
    /// SEC1). With `client_ca`, clients must present a certificate signed by one of the
    /// CA certificates in that PEM file (as qemu-nbd's x509 credentials with
    /// `verify-peer=on`); without it, any client that speaks TLS is served.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsConfigError> {
        let certs = read_certs("TLS certificate", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsConfigError::Read {
            what: "TLS private key",
            path: key.to_owned(),
            message: format!("{e} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)"),
        })?;
        // The same crypto provider as the bank server (`mbank serve`).
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError::Setup(format!("TLS set-up failed: {e}")))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs("client CA certificate", ca)? {
                    roots.add(c).map_err(|e| {
                        TlsConfigError::Setup(format!(
                            "the client CA certificate in {} cannot be used: {e}",
                            ca.display()
                        ))
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| {
                        TlsConfigError::Setup(format!(
                            "the client CA certificates in {} cannot be used: {e}",
                            ca.display()
                        ))
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            TlsConfigError::Setup(format!(
                "the TLS certificate {} and its key do not go together: {e}",
                cert.display()
            ))
        })?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            client_auth: client_ca.is_some(),
        })
    }

    /// True when clients must present a certificate from the configured CA.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_auth
    }
}

fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let read_err = |e: &dyn fmt::Display| TlsConfigError::Read {
        what,
        path: path.to_owned(),
        message: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(&e))?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}
