//! Where the daemon's signing key is: a PKCS#8 PEM file, or a key inside a
//! PKCS#11 token named by an RFC 7512 URI. `--signing-key` and serve's
//! `signing_key` take either; a `pkcs11:` URI never prints its PIN.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use custody_attest::keys::{Signer, SigningKey, VerifyingKey};
use custody_pkcs11::Pkcs11Uri;

/// A signing key's place: a file or a token.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A PKCS#8 PEM private key file.
    File(PathBuf),
    /// A key pair inside a PKCS#11 token.
    Pkcs11(Pkcs11Uri),
}

impl KeySource {
    /// Opens the signer and proves it signs: a key file is read, a token is
    /// opened, logged in to, and signs a probe its public key verifies.
    /// Blocking (a token may take a while): call it off the runtime.
    pub fn open(&self) -> Result<Arc<dyn Signer>, crate::embedded::Error> {
        Ok(match self {
            KeySource::File(path) => Arc::new(SigningKey::from_pem_file(path)?),
            KeySource::Pkcs11(uri) => custody_pkcs11::open_shared(uri).map_err(|source| {
                crate::embedded::Error::Signer {
                    source_uri: uri.to_string(),
                    source,
                }
            })?,
        })
    }

    /// Files a step must not see: the key file, or the token's PIN file
    /// and the directories the module keeps its tokens in.
    pub fn secret_files(&self) -> Vec<PathBuf> {
        match self {
            KeySource::File(path) => vec![path.clone()],
            KeySource::Pkcs11(uri) => uri
                .pin_file()
                .map(Path::to_owned)
                .into_iter()
                .chain(uri.token_storage())
                .collect(),
        }
    }
}

impl FromStr for KeySource {
    type Err = custody_pkcs11::Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.starts_with("pkcs11:") {
            Ok(KeySource::Pkcs11(text.parse()?))
        } else {
            Ok(KeySource::File(PathBuf::from(text)))
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(path) => write!(f, "{}", path.display()),
            KeySource::Pkcs11(uri) => write!(f, "{uri}"),
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(path) => f.debug_tuple("File").field(path).finish(),
            KeySource::Pkcs11(uri) => f.debug_tuple("Pkcs11").field(uri).finish(),
        }
    }
}

impl<'de> serde::Deserialize<'de> for KeySource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Reads retired public keys (SPKI PEM): keys that no longer sign but
/// whose signatures still verify, listed by `GET /api/v1/keys`.
pub fn read_retired(paths: &[PathBuf]) -> Result<Vec<VerifyingKey>, custody_attest::Error> {
    paths
        .iter()
        .map(|path| VerifyingKey::from_pem_file(path))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_source_is_a_path_or_a_uri_that_hides_its_pin() {
        assert_eq!(
            "/etc/custody/key.pem".parse::<KeySource>().unwrap(),
            KeySource::File("/etc/custody/key.pem".into())
        );
        let source: KeySource = "pkcs11:token=t;object=k?module-path=/m.so&pin-value=hunter2"
            .parse()
            .unwrap();
        assert!(matches!(source, KeySource::Pkcs11(_)));
        for shown in [source.to_string(), format!("{source:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        let err = "pkcs11:token=t?pin-value=hunter2"
            .parse::<KeySource>()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
