//! Signing and verifying keys. A [`Signer`] is whatever makes custody's
//! signatures: a [`SigningKey`] read from a PKCS#8 PEM file (mode 0600), or
//! a key inside a PKCS#11 token (`custody_pkcs11`). Public keys are SPKI
//! PEM; both ECDSA P-256 (the default) and Ed25519. A [`Keyring`] holds the
//! public keys a verifier trusts, found by key id.

use std::path::Path;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair, ParsedPublicKey,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use sha2::{Digest as _, Sha256};

use crate::Error;

/// Which signature scheme a key uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    EcdsaP256,
    Ed25519,
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::EcdsaP256 => "ecdsa-p256",
            Algorithm::Ed25519 => "ed25519",
        })
    }
}

impl std::str::FromStr for Algorithm {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self, Error> {
        match text {
            "ecdsa-p256" => Ok(Algorithm::EcdsaP256),
            "ed25519" => Ok(Algorithm::Ed25519),
            other => Err(Error::Key(format!(
                "unknown key algorithm `{other}`; use `ecdsa-p256` or `ed25519`"
            ))),
        }
    }
}

/// What signs DSSE pre-authentication bytes. One signer is shared by every
/// build the daemon runs at once (behind an `Arc`), so it is `Send + Sync`.
///
/// Every signer signs the same encoding, so verifiers cannot tell them
/// apart: ECDSA P-256 makes an ASN.1 DER signature over the SHA-256 of the
/// message, Ed25519 signs the message itself.
pub trait Signer: Send + Sync + std::fmt::Debug {
    /// Signs `message` (the DSSE PAE).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error>;
    /// The public key of the private key that signs.
    fn verifying_key(&self) -> &VerifyingKey;
    fn algorithm(&self) -> Algorithm {
        self.verifying_key().algorithm()
    }
    /// `sha256:<hex>` of the public key's SPKI: what envelopes carry as `keyid`.
    fn key_id(&self) -> &str {
        self.verifying_key().key_id()
    }
}

/// A private key that signs envelopes. It never prints.
pub struct SigningKey {
    pair: Pair,
    public: VerifyingKey,
}

enum Pair {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public.key_id())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key; returns it with its PKCS#8 DER encoding.
    pub fn generate(algorithm: Algorithm) -> Result<(Self, Vec<u8>), Error> {
        let pkcs8 = match algorithm {
            Algorithm::EcdsaP256 => EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
                .and_then(|k| k.to_pkcs8v1())
                .map_err(|_| Error::Key("key generation failed".into()))?
                .as_ref()
                .to_vec(),
            Algorithm::Ed25519 => Ed25519KeyPair::generate()
                .and_then(|k| k.to_pkcs8v1())
                .map_err(|_| Error::Key("key generation failed".into()))?
                .as_ref()
                .to_vec(),
        };
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// Reads a PKCS#8 key of either algorithm.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, Error> {
        let pair = if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der)
        {
            Pair::Ecdsa(pair)
        } else if let Ok(pair) = Ed25519KeyPair::from_pkcs8(der) {
            Pair::Ed25519(pair)
        } else {
            return Err(Error::Key(
                "not a PKCS#8 ECDSA P-256 or Ed25519 private key".into(),
            ));
        };
        let spki = match &pair {
            Pair::Ecdsa(p) => p.public_key().as_der().map(|d| d.as_ref().to_vec()),
            Pair::Ed25519(p) => p.public_key().as_der().map(|d| d.as_ref().to_vec()),
        }
        .map_err(|_| Error::Key("cannot encode the public key".into()))?;
        let public = VerifyingKey::from_spki_der(&spki)?;
        Ok(Self { pair, public })
    }

    /// Reads a PKCS#8 PEM file, naming the file in any error.
    pub fn from_pem_file(path: &Path) -> Result<Self, Error> {
        let bad = |reason: String| Error::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = fs_err::read(path)?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem)
            .map_err(|e| bad(format!("not a PKCS#8 PEM private key ({e})")))?;
        Self::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| bad(e.to_string()))
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.pair {
            Pair::Ecdsa(_) => Algorithm::EcdsaP256,
            Pair::Ed25519(_) => Algorithm::Ed25519,
        }
    }

    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.public
    }

    /// Signs `message` (ECDSA: ASN.1 DER signature over SHA-256).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        Signer::sign(self, message)
    }
}

impl Signer for SigningKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        match &self.pair {
            Pair::Ecdsa(pair) => pair
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| Error::Key("signing failed".into())),
            Pair::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
        }
    }

    fn verifying_key(&self) -> &VerifyingKey {
        &self.public
    }
}

/// A public key that checks signatures.
#[derive(Clone)]
pub struct VerifyingKey {
    key: ParsedPublicKey,
    algorithm: Algorithm,
    spki: Vec<u8>,
    key_id: String,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// Whether `pem` holds a private key (whose bytes no message may show).
fn is_private_pem(pem: &[u8]) -> bool {
    pem.windows(b"PRIVATE KEY-----".len())
        .any(|w| w == b"PRIVATE KEY-----")
}

impl VerifyingKey {
    /// Reads a DER SubjectPublicKeyInfo of either algorithm.
    pub fn from_spki_der(spki: &[u8]) -> Result<Self, Error> {
        let (key, algorithm) = ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, spki)
            .map(|k| (k, Algorithm::EcdsaP256))
            .or_else(|_| {
                ParsedPublicKey::new(&signature::ED25519, spki).map(|k| (k, Algorithm::Ed25519))
            })
            .map_err(|_| Error::Key("not an ECDSA P-256 or Ed25519 public key".into()))?;
        Ok(Self {
            key,
            algorithm,
            spki: spki.to_vec(),
            key_id: key_id(spki),
        })
    }

    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let der = SubjectPublicKeyInfoDer::from_pem_slice(pem)
            .map_err(|e| Error::Key(format!("not an SPKI PEM public key ({e})")))?;
        Self::from_spki_der(der.as_ref())
    }

    pub fn from_pem_file(path: &Path) -> Result<Self, Error> {
        let pem = fs_err::read(path)?;
        Self::from_pem(&pem).map_err(|e| Error::KeyFile {
            path: path.display().to_string(),
            reason: if is_private_pem(&pem) {
                let public = path.with_extension("pub");
                let beside = if public.is_file() {
                    format!(": pass `{}`", public.display())
                } else {
                    String::new()
                };
                format!(
                    "this is a private key; verifying takes its public key (`custody keys generate` writes it beside, as `.pub`){beside}"
                )
            } else {
                e.to_string()
            },
        })
    }

    /// `sha256:<hex>` of the DER SubjectPublicKeyInfo.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    pub fn to_pem(&self) -> String {
        pem("PUBLIC KEY", &self.spki)
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        self.key.verify_sig(message, signature).is_ok()
    }
}

/// The public keys a verifier trusts, each found by its key id: a DSSE
/// signature is checked with the key its `keyid` names, and one naming a
/// key not here verifies with none (a retired key stays here, so what it
/// signed keeps verifying after rotation).
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    keys: Vec<VerifyingKey>,
}

impl Keyring {
    /// The keys, each once (by key id).
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        let mut ring = Self::default();
        for key in keys {
            ring.add(key);
        }
        ring
    }

    pub fn add(&mut self, key: VerifyingKey) {
        if self.get(key.key_id()).is_none() {
            self.keys.push(key);
        }
    }

    pub fn get(&self, key_id: &str) -> Option<&VerifyingKey> {
        self.keys.iter().find(|k| k.key_id() == key_id)
    }

    pub fn keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, for messages.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.key_id().to_owned()).collect()
    }
}

impl From<VerifyingKey> for Keyring {
    fn from(key: VerifyingKey) -> Self {
        Self::new([key])
    }
}

fn key_id(spki: &[u8]) -> String {
    let digest = Sha256::digest(spki);
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// PEM text for DER bytes.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// Writes a new key pair as `dir/custody.key` (PKCS#8 PEM, mode 0600) and
/// `dir/custody.pub` (SPKI PEM). Refuses to overwrite an existing key.
pub fn generate_files(
    dir: &Path,
    algorithm: Algorithm,
) -> Result<(std::path::PathBuf, std::path::PathBuf, SigningKey), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs_err::create_dir_all(dir)?;
    let private = dir.join("custody.key");
    let public = dir.join("custody.pub");
    let (key, pkcs8) = SigningKey::generate(algorithm)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .map_err(|e| Error::KeyFile {
            path: private.display().to_string(),
            reason: format!("cannot create it ({e}); an existing key is never overwritten"),
        })?;
    file.write_all(pem("PRIVATE KEY", &pkcs8).as_bytes())?;
    fs_err::write(&public, key.verifying_key().to_pem())?;
    Ok((private, public, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_and_sign() {
        for algorithm in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
            let dir = tempfile::tempdir().unwrap();
            let (private, public, key) = generate_files(dir.path(), algorithm).unwrap();
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &fs_err::metadata(&private).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600);
            let loaded = SigningKey::from_pem_file(&private).unwrap();
            assert_eq!(loaded.algorithm(), algorithm);
            let verifying = VerifyingKey::from_pem_file(&public).unwrap();
            assert_eq!(verifying.key_id(), key.verifying_key().key_id());
            let signature = loaded.sign(b"message").unwrap();
            assert!(verifying.verify(b"message", &signature));
            assert!(!verifying.verify(b"messagE", &signature));
            assert!(
                generate_files(dir.path(), algorithm).is_err(),
                "an existing key was overwritten"
            );
            assert!(!format!("{loaded:?}").contains("PRIVATE"));
        }
    }

    #[test]
    fn bad_key_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        fs_err::write(&path, "not a key").unwrap();
        let err = SigningKey::from_pem_file(&path).unwrap_err().to_string();
        assert!(err.contains("k.pem"), "{err}");
        let err = VerifyingKey::from_pem_file(&path).unwrap_err().to_string();
        assert!(err.contains("k.pem"), "{err}");
    }
}
