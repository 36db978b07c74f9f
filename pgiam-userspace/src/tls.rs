//! TLS on both sides: the certificate pgiam presents to clients, and how it checks the server.

mod issuer;

pub use issuer::Issuer;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::{ClientTls, Upstream, UpstreamTls};

/// ALPN protocol id PostgreSQL 17 requires on direct-SSL connections.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot write generated TLS material to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid upstream server name {0:?}")]
    ServerName(String),
}

fn pem_err(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err("certificates", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("certificates", path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// How pgiam answers a client's TLS handshake.
pub enum ClientAcceptor {
    /// One certificate for every client (`mode = "files"`).
    Fixed(tokio_rustls::TlsAcceptor),
    /// A certificate for the name each client dialled, from a CA (`generate`, `ca`).
    Issuing(Arc<Issuer>),
}

impl ClientAcceptor {
    /// Completes a client's handshake. `dialled`: the address the client connected to (for an
    /// intercepted one, the database's address it dialled), named by the certificate when the
    /// client sends no server name.
    pub async fn accept<IO>(
        &self,
        io: IO,
        dialled: Option<std::net::IpAddr>,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match self {
            ClientAcceptor::Fixed(acceptor) => acceptor.accept(io).await,
            ClientAcceptor::Issuing(issuer) => {
                let start =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
                        .await?;
                let sni = start.client_hello().server_name().map(str::to_owned);
                let config = issuer
                    .config_for(sni.as_deref(), dialled)
                    .map_err(std::io::Error::other)?;
                start.into_stream(config).await
            }
        }
    }
}

/// The server-side TLS configuration for clients, or `None` when client TLS is disabled.
pub fn client_acceptor(
    tls: &ClientTls,
    state_dir: &Path,
) -> Result<Option<ClientAcceptor>, TlsError> {
    let (cert_path, key_path) = match tls {
        ClientTls::Disabled => return Ok(None),
        ClientTls::Files { cert, key } => (cert.clone(), key.clone()),
        ClientTls::Generate => {
            let issuer = Issuer::generated(state_dir)?;
            return Ok(Some(ClientAcceptor::Issuing(Arc::new(issuer))));
        }
        ClientTls::Ca { cert, key } => {
            let issuer = Issuer::load(cert, key)?;
            return Ok(Some(ClientAcceptor::Issuing(Arc::new(issuer))));
        }
    };
    let certs = load_certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem_err("key", &key_path, e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(ClientAcceptor::Fixed(
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    )))
}

/// Writes `contents` to `path` (in `dir`, created if missing) whole or not at all, with `mode`
/// from the start.
fn write_private(dir: &Path, path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(write_err(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(write_err(&tmp))?;
    f.sync_all().map_err(write_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(write_err(path))
}

/// The client-side TLS configuration for the upstream, or `None` for `tls = "disable"`.
pub fn upstream_connector(
    upstream: &Upstream,
) -> Result<Option<(tokio_rustls::TlsConnector, ServerName<'static>)>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match upstream.tls {
        UpstreamTls::Disable => return Ok(None),
        UpstreamTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
            .with_no_client_auth(),
        UpstreamTls::VerifyFull => {
            let ca = upstream
                .ca_file
                .as_deref()
                .expect("config validation demands ca_file for verify-full");
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    let name = upstream
        .server_name
        .clone()
        .unwrap_or_else(|| upstream.host.clone());
    let server_name = ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))?;
    Ok(Some((
        tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
    )))
}

/// libpq's `sslmode=require`: the channel is encrypted and the handshake signatures checked,
/// but any certificate is accepted. Chosen explicitly by the operator, never a fallback.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_mode_issues_from_a_ca_in_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let acceptor = client_acceptor(&ClientTls::Generate, dir.path()).unwrap();
        assert!(matches!(acceptor, Some(ClientAcceptor::Issuing(_))));
        assert!(dir.path().join("client-ca.crt").exists());
    }

    #[test]
    fn missing_files_are_named() {
        let Err(err) = client_acceptor(
            &ClientTls::Files {
                cert: "/nonexistent/c.pem".into(),
                key: "/nonexistent/k.pem".into(),
            },
            Path::new("/tmp"),
        ) else {
            panic!("missing files must fail")
        };
        let err = err.to_string();
        assert!(err.contains("/nonexistent/c.pem"), "{err}");
    }
}
