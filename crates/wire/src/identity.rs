//! The daemon's ephemeral TLS identity: a fresh P-256 key and a self-signed
//! certificate made at start. Runners are handed the certificate (public)
//! and trust exactly it, so no PKI is needed and a restarted daemon is a
//! different daemon.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::Error;

/// The name in the daemon's certificate and the one runners expect; it is
/// never resolved, only matched.
pub const SERVER_NAME: &str = "custody-daemon.invalid";

/// The daemon side: certificate and key, ready to accept runners.
pub struct DaemonIdentity {
    certificate_pem: String,
    server_config: Arc<ServerConfig>,
}

impl std::fmt::Debug for DaemonIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonIdentity").finish_non_exhaustive()
    }
}

impl DaemonIdentity {
    /// Makes a fresh key and certificate.
    pub fn generate() -> Result<Self, Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Identity(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .map_err(|e| Error::Identity(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "custody daemon");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        // Long enough for any build; the key dies with the daemon anyway.
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2999, 1, 1);
        let certificate = params
            .self_signed(&key)
            .map_err(|e| Error::Identity(e.to_string()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server_config = ServerConfig::builder_with_provider(crate::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Identity(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![certificate.der().clone()], key_der)
            .map_err(|e| Error::Identity(e.to_string()))?;
        Ok(Self {
            certificate_pem: certificate.pem(),
            server_config: Arc::new(server_config),
        })
    }

    /// The certificate runners must be given.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }
}

/// The runner side: a TLS 1.3 client that trusts exactly the daemon's
/// certificate, and no system roots.
pub fn runner_tls_config(certificate_pem: &str) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    let mut found = 0;
    for der in pem_certificates(certificate_pem)? {
        roots
            .add(der)
            .map_err(|e| Error::Certificate(e.to_string()))?;
        found += 1;
    }
    if found == 0 {
        return Err(Error::Certificate("no PEM certificate found".into()));
    }
    let config = ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub(crate) fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("the fixed server name is valid")
}

fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate(format!("not a PEM certificate: {e}")))
}
