//! Certificates for the names clients dial, issued by a CA the operator tells clients to trust.
//!
//! An intercepted application dials the database's own name (or address) and, with
//! `sslmode=verify-full` / `verify-ca`, checks that the certificate it is shown is issued by a
//! CA it trusts for that name. pgiam holds a CA (its own, generated once in `state_dir`, or the
//! operator's) and issues, per name, a leaf certificate for exactly the name the client asked
//! for in its TLS ClientHello (SNI), else the address it dialled: never a name the client did
//! not dial. Leaves are kept in memory, reissued before they expire, and their keys never leave
//! the process.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use super::{pem_err, provider, TlsError, ALPN_POSTGRESQL};

/// How long an issued leaf is valid, and how long before its end it is replaced.
const LEAF_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Names remembered at once; past that the cache starts over (a name is cheap to reissue).
const CACHE_CAPACITY: usize = 1024;

/// A CA and the leaves it has issued.
pub struct Issuer {
    ca: rcgen::Certificate,
    ca_der: CertificateDer<'static>,
    ca_key: KeyPair,
    issued: Mutex<HashMap<String, (Arc<ServerConfig>, SystemTime)>>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").finish_non_exhaustive()
    }
}

impl Issuer {
    /// The CA in `cert`/`key` (PEM).
    pub fn load(cert: &Path, key: &Path) -> Result<Issuer, TlsError> {
        let cert_pem =
            std::fs::read_to_string(cert).map_err(|e| pem_err("CA certificate", cert, e))?;
        let key_pem = std::fs::read_to_string(key).map_err(|e| pem_err("CA key", key, e))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| pem_err("CA certificate", cert, e))?;
        let ca_key = KeyPair::from_pem(&key_pem).map_err(|e| pem_err("CA key", key, e))?;
        let ca_der = super::load_certs(cert)?.remove(0);
        // The parameters as read, signed again by their own key: what leaves are issued
        // under (issuer name, key identifier) is the CA's; this copy itself is never shown.
        let ca = params.self_signed(&ca_key)?;
        Ok(Issuer {
            ca,
            ca_der,
            ca_key,
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// Creates pgiam's own CA in `dir` (`client-ca.crt`, `client-ca.key` 0600) unless it is
    /// there already, and loads it. The key is never replaced: clients that trust the CA keep
    /// trusting what pgiam presents after a restart.
    pub fn generated(dir: &Path) -> Result<Issuer, TlsError> {
        let cert = dir.join("client-ca.crt");
        let key = dir.join("client-ca.key");
        if !(cert.exists() && key.exists()) {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into());
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params
                .distinguished_name
                .push(DnType::CommonName, format!("pgiam client CA ({host})"));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
            params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
            let ca_key = KeyPair::generate()?;
            let ca = params.self_signed(&ca_key)?;
            super::write_private(dir, &key, &ca_key.serialize_pem(), 0o600)?;
            super::write_private(dir, &cert, &ca.pem(), 0o644)?;
            tracing::info!(ca = %cert.display(), "generated pgiam's client CA: clients that verify the server trust this file");
        }
        Issuer::load(&cert, &key)
    }

    /// The TLS configuration for a client that asked for `sni` and dialled `dialled`.
    pub fn config_for(
        &self,
        sni: Option<&str>,
        dialled: Option<IpAddr>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let name = match (sni, dialled) {
            (Some(name), _) => name.to_ascii_lowercase(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => "localhost".to_owned(),
        };
        let now = SystemTime::now();
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((config, renew_at)) = issued.get(&name) {
            if now < *renew_at {
                return Ok(config.clone());
            }
        }
        let config = Arc::new(self.issue(&name)?);
        if issued.len() >= CACHE_CAPACITY {
            issued.clear();
        }
        let renew_at = now + LEAF_LIFETIME - LEAF_RENEW_BEFORE;
        issued.insert(name, (config.clone(), renew_at));
        Ok(config)
    }

    /// A leaf for `name` (a DNS name or an IP address) and the server configuration showing it.
    fn issue(&self, name: &str) -> Result<ServerConfig, TlsError> {
        // rcgen makes an IP address SAN of a name that parses as one.
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc()
            + time::Duration::seconds(LEAF_LIFETIME.as_secs() as i64);
        let key = KeyPair::generate()?;
        let leaf = params.signed_by(&key, &self.ca, &self.ca_key)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.ca_der.clone()], key_der)?;
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        tracing::debug!(name, "issued a client TLS certificate");
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_leaves_name_only_what_was_dialled() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let issuer = Issuer::generated(dir.path()).unwrap();
        let key = dir.path().join("client-ca.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let first = std::fs::read(&key).unwrap();
        let again = Issuer::generated(dir.path()).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), first, "the CA key is kept");
        assert_eq!(issuer.ca_der, again.ca_der);

        let a = issuer.config_for(Some("DB.internal"), None).unwrap();
        let b = issuer.config_for(Some("db.internal"), None).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one leaf per name, cached");
        let by_ip = issuer
            .config_for(None, Some("10.0.0.7".parse().unwrap()))
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &by_ip));
    }
}
