//! DSSE envelopes (github.com/secure-systems-lab/dsse, protocol v1).
//!
//! The signature covers the pre-authentication encoding (PAE) of payload
//! type and payload, never the JSON around them, so nothing outside the
//! signed bytes can change their meaning.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::keys::{SigningKey, VerifyingKey};

/// A DSSE envelope as it is stored and exchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Base64 (standard, padded) of the payload bytes.
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Which key made it: `sha256:<hex>` of its SPKI. Advisory only: it
    /// selects nothing during verification.
    #[serde(default)]
    pub keyid: String,
    /// Base64 (standard, padded) of the signature bytes.
    pub sig: String,
}

/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Signs `payload` as `payload_type`.
pub fn sign(payload_type: &str, payload: &[u8], key: &SigningKey) -> Result<Envelope, Error> {
    let signature = key.sign(&pae(payload_type, payload))?;
    Ok(Envelope {
        payload: STANDARD.encode(payload),
        payload_type: payload_type.to_owned(),
        signatures: vec![Signature {
            keyid: key.verifying_key().key_id().to_owned(),
            sig: STANDARD.encode(signature),
        }],
    })
}

/// A payload whose signature has been checked; the only way to get one is
/// [`verify`].
#[derive(Debug)]
pub struct VerifiedPayload {
    pub payload_type: String,
    pub bytes: Vec<u8>,
    /// The key that signed it.
    pub key_id: String,
}

/// Checks that some signature in `envelope` was made by `key` over the
/// payload, and that the payload is of `expected_type`.
pub fn verify(
    envelope: &Envelope,
    key: &VerifyingKey,
    expected_type: &str,
) -> Result<VerifiedPayload, Error> {
    let payload = STANDARD
        .decode(envelope.payload.as_bytes())
        .map_err(|e| Error::Envelope(format!("the payload is not base64: {e}")))?;
    if envelope.signatures.is_empty() {
        return Err(Error::Envelope("it has no signatures".into()));
    }
    let message = pae(&envelope.payload_type, &payload);
    let signed = envelope.signatures.iter().any(|s| {
        STANDARD
            .decode(s.sig.as_bytes())
            .is_ok_and(|sig| key.verify(&message, &sig))
    });
    if !signed {
        return Err(Error::BadSignature {
            key_id: key.key_id().to_owned(),
        });
    }
    // Checked after the signature, so an unsigned envelope never gets to
    // say anything, not even its type.
    if envelope.payload_type != expected_type {
        return Err(Error::PayloadType {
            expected: expected_type.to_owned(),
            actual: envelope.payload_type.clone(),
        });
    }
    Ok(VerifiedPayload {
        payload_type: envelope.payload_type.clone(),
        bytes: payload,
        key_id: key.key_id().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Algorithm;

    #[test]
    fn pae_matches_the_specification_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn envelopes_verify_only_unchanged_and_with_the_right_key() {
        for algorithm in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
            let (key, _) = SigningKey::generate(algorithm).unwrap();
            let (other, _) = SigningKey::generate(algorithm).unwrap();
            let envelope = sign("application/vnd.in-toto+json", b"{\"a\":1}", &key).unwrap();
            let verified = verify(
                &envelope,
                key.verifying_key(),
                "application/vnd.in-toto+json",
            )
            .unwrap();
            assert_eq!(verified.bytes, b"{\"a\":1}");

            let mut tampered = envelope.clone();
            tampered.payload = STANDARD.encode(b"{\"a\":2}");
            assert!(matches!(
                verify(
                    &tampered,
                    key.verifying_key(),
                    "application/vnd.in-toto+json"
                ),
                Err(Error::BadSignature { .. })
            ));
            let mut retyped = envelope.clone();
            retyped.payload_type = "text/plain".into();
            assert!(matches!(
                verify(
                    &retyped,
                    key.verifying_key(),
                    "application/vnd.in-toto+json"
                ),
                Err(Error::BadSignature { .. })
            ));
            assert!(matches!(
                verify(
                    &envelope,
                    other.verifying_key(),
                    "application/vnd.in-toto+json"
                ),
                Err(Error::BadSignature { .. })
            ));
            assert!(matches!(
                verify(&envelope, key.verifying_key(), "text/plain"),
                Err(Error::PayloadType { .. })
            ));
        }
    }
}
