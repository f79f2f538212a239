//! Content digests: hashing exact bytes and checking them against descriptors.
//!
//! The digest type itself is `oci_spec`'s, which validates the
//! `algorithm:encoded` grammar; this module adds the hashing that custody
//! trusts, for the algorithms the image spec registers.

use std::fmt;
use std::str::FromStr;

pub use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::Digest as _;

use crate::Error;

/// An incremental hash for one of the registered digest algorithms.
pub struct Hasher {
    algorithm: DigestAlgorithm,
    state: State,
}

enum State {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A hasher for `algorithm`; fails for algorithms custody cannot compute.
    pub fn new(algorithm: &DigestAlgorithm) -> Result<Self, Error> {
        let state = match algorithm {
            DigestAlgorithm::Sha256 => State::Sha256(sha2::Sha256::new()),
            DigestAlgorithm::Sha384 => State::Sha384(sha2::Sha384::new()),
            DigestAlgorithm::Sha512 => State::Sha512(sha2::Sha512::new()),
            other => {
                return Err(Error::UnsupportedDigest {
                    algorithm: other.to_string(),
                });
            }
        };
        Ok(Self {
            algorithm: algorithm.clone(),
            state,
        })
    }

    /// A hasher for the algorithm `expected` uses, ready to check bytes against it.
    pub fn for_digest(expected: &Digest) -> Result<Self, Error> {
        Self::new(expected.algorithm())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            State::Sha256(h) => h.update(bytes),
            State::Sha384(h) => h.update(bytes),
            State::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        let raw: Vec<u8> = match self.state {
            State::Sha256(h) => h.finalize().to_vec(),
            State::Sha384(h) => h.finalize().to_vec(),
            State::Sha512(h) => h.finalize().to_vec(),
        };
        let text = format!("{}:{}", self.algorithm, Hex(&raw));
        Digest::from_str(&text).expect("a hash rendered as lowercase hex is a valid digest")
    }
}

/// The sha256 digest of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest {
    let mut hasher = Hasher::new(&DigestAlgorithm::Sha256).expect("sha256 is supported");
    hasher.update(bytes);
    hasher.finish()
}

/// The sha256 digest of the file at `path`, read in pieces (blocking).
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<Digest> {
    use std::io::Read as _;
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Hasher::new(&DigestAlgorithm::Sha256).expect("sha256 is supported");
    let mut buffer = vec![0; 1 << 16];
    loop {
        match file.read(&mut buffer)? {
            0 => break,
            n => hasher.update(&buffer[..n]),
        }
    }
    Ok(hasher.finish())
}

/// Checks that `bytes` are exactly what `digest` and `size` describe.
pub fn verify_bytes(digest: &Digest, size: u64, bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() as u64 != size {
        return Err(Error::SizeMismatch {
            digest: digest.clone(),
            expected: size,
            actual: bytes.len() as u64,
        });
    }
    let mut hasher = Hasher::for_digest(digest)?;
    hasher.update(bytes);
    let actual = hasher.finish();
    if &actual != digest {
        return Err(Error::DigestMismatch {
            expected: digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// Parses a digest, naming it in the error when it is malformed.
pub fn parse(text: &str) -> Result<Digest, Error> {
    let digest = Digest::from_str(text).map_err(|e| Error::InvalidDigest {
        digest: text.to_owned(),
        reason: e.to_string(),
    })?;
    // Reject what we cannot hash now, so a blob path is never built from an
    // unchecked encoding.
    Hasher::for_digest(&digest)?;
    Ok(digest)
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_empty_input_is_the_well_known_value() {
        assert_eq!(
            sha256(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn verify_bytes_names_the_mismatch() {
        let digest = sha256(b"hello");
        assert!(verify_bytes(&digest, 5, b"hello").is_ok());
        assert!(matches!(
            verify_bytes(&digest, 5, b"hellO"),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(matches!(
            verify_bytes(&digest, 4, b"hello"),
            Err(Error::SizeMismatch { .. })
        ));
    }

    #[test]
    fn parse_rejects_bad_and_unsupported_digests() {
        assert!(parse("sha256:abc").is_err());
        assert!(parse("sha256:../../etc/passwd").is_err());
        assert!(matches!(
            parse("md5:d41d8cd98f00b204e9800998ecf8427e"),
            Err(Error::UnsupportedDigest { .. })
        ));
    }
}
