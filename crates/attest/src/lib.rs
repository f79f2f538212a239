//! Attestations: what custody signs and how anyone checks it.
//!
//! # Layout
//! - [`keys`]: the [`keys::Signer`] interface, signing keys (ECDSA P-256
//!   or Ed25519, PKCS#8 PEM), verifying keys (SPKI PEM) with the key id
//!   custody puts in envelopes, and keyrings that pick a key by that id.
//! - [`dsse`]: DSSE envelopes: pre-authentication encoding, signing, and
//!   verification that yields the payload only once a signature checks out.
//! - [`statement`]: in-toto Statement v1 with a SLSA Provenance v1 predicate.
//!
//! The in-toto crate only knows the v0.1/v0.2 formats, so these types are
//! custody's own, written from the specifications.

#![forbid(unsafe_code)]

pub mod dsse;
pub mod keys;
pub mod statement;

/// Everything that can go wrong with keys and envelopes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key file that cannot be used.
    #[error("key `{path}`: {reason}")]
    KeyFile { path: String, reason: String },
    /// Key material that cannot be used.
    #[error("invalid key: {0}")]
    Key(String),
    /// An envelope that is not well-formed.
    #[error("malformed DSSE envelope: {0}")]
    Envelope(String),
    /// No signature in the envelope verifies with the key.
    #[error("no signature in the envelope verifies with key `{key_id}`")]
    BadSignature { key_id: String },
    /// No signature names a key of the keyring.
    #[error(
        "the envelope is signed by key `{}`, which is not in the keyring (it has `{}`)",
        key_ids.join("`, `"),
        keyring.join("`, `")
    )]
    UnknownKey {
        /// The key ids the signatures name.
        key_ids: Vec<String>,
        /// The key ids the keyring holds.
        keyring: Vec<String>,
    },
    /// A signer (a PKCS#11 token) failed to sign.
    #[error("signing with `{signer}` failed: {reason}")]
    Sign { signer: String, reason: String },
    /// The envelope carries another kind of payload.
    #[error("the envelope's payload type is `{actual}`, expected `{expected}`")]
    PayloadType { expected: String, actual: String },
    /// The payload is not the statement it should be.
    #[error("invalid in-toto statement: {0}")]
    Statement(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
