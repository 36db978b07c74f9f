//! TLS on both sides: the certificate pgiam presents to clients, and how it checks the server.

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

/// The server-side TLS configuration for clients, or `None` when client TLS is disabled.
pub fn client_acceptor(
    tls: &ClientTls,
    state_dir: &Path,
) -> Result<Option<tokio_rustls::TlsAcceptor>, TlsError> {
    let (cert_path, key_path) = match tls {
        ClientTls::Disabled => return Ok(None),
        ClientTls::Files { cert, key } => (cert.clone(), key.clone()),
        ClientTls::Generate => ensure_generated(state_dir)?,
    };
    let certs = load_certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem_err("key", &key_path, e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// Creates a self-signed certificate for this host in `state_dir` unless one is there already.
/// The key is written 0600 and never replaced, so clients that pinned it keep working.
fn ensure_generated(state_dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = state_dir.join("client-tls.crt");
    let key_path = state_dir.join("client-tls.key");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Write { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(write_err(state_dir))?;
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let names = vec![host, "localhost".into(), "127.0.0.1".into(), "::1".into()];
    let generated = rcgen::generate_simple_self_signed(names)?;
    let write = |path: &Path, contents: &str, mode: u32| {
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
    };
    write(&key_path, &generated.key_pair.serialize_pem(), 0o600)?;
    write(&cert_path, &generated.cert.pem(), 0o644)?;
    tracing::info!(cert = %cert_path.display(), "generated a host-local TLS certificate for clients");
    Ok((cert_path, key_path))
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
    fn generated_certificate_is_created_once_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(client_acceptor(&ClientTls::Generate, dir.path())
            .unwrap()
            .is_some());
        let key = dir.path().join("client-tls.key");
        let first = std::fs::read(&key).unwrap();
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        client_acceptor(&ClientTls::Generate, dir.path()).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), first, "the key is reused");
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
