//! A test CA and the certificates it signs, and certs.d directories.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
}

/// A CA with a server certificate for 127.0.0.1/localhost and a client
/// certificate, all freshly generated.
#[derive(Clone)]
pub struct Certs {
    pub ca: Pair,
    pub server: Pair,
    pub client: Pair,
}

impl Certs {
    pub fn generate() -> Self {
        Self::for_hosts(&["127.0.0.1", "localhost"])
    }

    /// As [`Certs::generate`], the server certificate naming `hosts`
    /// (names or IP addresses).
    pub fn for_hosts(hosts: &[&str]) -> Self {
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "custody test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca_params, &ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let key = KeyPair::generate().expect("a leaf key");
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &issuer).expect("a leaf certificate");
            Pair {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                cert_der: cert.der().to_vec(),
            }
        };
        let server = leaf(
            hosts.iter().map(|h| (*h).to_owned()).collect(),
            ExtendedKeyUsagePurpose::ServerAuth,
            hosts.first().copied().unwrap_or("server"),
        );
        let client = leaf(
            vec!["client.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "custody test client",
        );
        Self {
            ca: Pair {
                cert_pem: ca_cert.pem(),
                key_pem: ca_key.serialize_pem(),
                cert_der: ca_cert.der().to_vec(),
            },
            server,
            client,
        }
    }

    /// Writes `root/<host>/ca.crt`, and the client pair when asked: the
    /// certs.d layout Docker and custody read.
    pub fn write_certs_d(&self, root: &Path, host: &str, with_client: bool) {
        let dir = root.join(host);
        fs_err::create_dir_all(&dir).unwrap();
        fs_err::write(dir.join("ca.crt"), &self.ca.cert_pem).unwrap();
        if with_client {
            fs_err::write(dir.join("client.cert"), &self.client.cert_pem).unwrap();
            fs_err::write(dir.join("client.key"), &self.client.key_pem).unwrap();
        }
    }
}
