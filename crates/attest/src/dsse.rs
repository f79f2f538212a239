//! DSSE envelopes (github.com/secure-systems-lab/dsse, protocol v1).
//!
//! The signature covers the pre-authentication encoding (PAE) of payload
//! type and payload, never the JSON around them, so nothing outside the
//! signed bytes can change their meaning.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::keys::{Keyring, Signer, VerifyingKey};

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
    /// Which key made it: `sha256:<hex>` of its SPKI. It picks the key a
    /// keyring checks the signature with (the signature is still checked:
    /// naming a key proves nothing); empty, every key is tried.
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

/// Signs `payload` as `payload_type` with whichever signer it is given.
pub fn sign(payload_type: &str, payload: &[u8], signer: &dyn Signer) -> Result<Envelope, Error> {
    let signature = signer.sign(&pae(payload_type, payload))?;
    Ok(Envelope {
        payload: STANDARD.encode(payload),
        payload_type: payload_type.to_owned(),
        signatures: vec![Signature {
            keyid: signer.key_id().to_owned(),
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
/// payload, and that the payload is of `expected_type`: [`verify_keyring`]
/// with a keyring of one.
pub fn verify(
    envelope: &Envelope,
    key: &VerifyingKey,
    expected_type: &str,
) -> Result<VerifiedPayload, Error> {
    verify_keyring(envelope, &Keyring::from(key.clone()), expected_type)
}

/// Checks that some signature in `envelope` verifies with the key of the
/// keyring its `keyid` names (every key, for a signature naming none) and
/// that the payload is of `expected_type`. When no signature names a key
/// of the keyring, the error says which ids they name and which it holds.
pub fn verify_keyring(
    envelope: &Envelope,
    keyring: &Keyring,
    expected_type: &str,
) -> Result<VerifiedPayload, Error> {
    let payload = STANDARD
        .decode(envelope.payload.as_bytes())
        .map_err(|e| Error::Envelope(format!("the payload is not base64: {e}")))?;
    if envelope.signatures.is_empty() {
        return Err(Error::Envelope("it has no signatures".into()));
    }
    let message = pae(&envelope.payload_type, &payload);
    let mut tried = Vec::new();
    let mut signer = None;
    'signatures: for s in &envelope.signatures {
        let candidates: Vec<&VerifyingKey> = if s.keyid.is_empty() {
            keyring.keys().iter().collect()
        } else {
            keyring.get(&s.keyid).into_iter().collect()
        };
        let Ok(sig) = STANDARD.decode(s.sig.as_bytes()) else {
            continue;
        };
        for key in candidates {
            if !tried.contains(&key.key_id()) {
                tried.push(key.key_id());
            }
            if key.verify(&message, &sig) {
                signer = Some(key);
                break 'signatures;
            }
        }
    }
    let Some(key) = signer else {
        return Err(if tried.is_empty() {
            Error::UnknownKey {
                key_ids: envelope
                    .signatures
                    .iter()
                    .map(|s| s.keyid.clone())
                    .collect(),
                keyring: keyring.ids(),
            }
        } else {
            Error::BadSignature {
                key_id: tried.join("`, `"),
            }
        });
    };
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
    use crate::keys::{Algorithm, SigningKey};

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
                Err(Error::UnknownKey { .. })
            ));
            assert!(matches!(
                verify(&envelope, key.verifying_key(), "text/plain"),
                Err(Error::PayloadType { .. })
            ));
        }
    }

    #[test]
    fn a_keyring_picks_the_key_by_key_id_and_names_unknown_ones() {
        let (old, _) = SigningKey::generate(Algorithm::EcdsaP256).unwrap();
        let (new, _) = SigningKey::generate(Algorithm::Ed25519).unwrap();
        let (stranger, _) = SigningKey::generate(Algorithm::EcdsaP256).unwrap();
        let ring = Keyring::new([old.verifying_key().clone(), new.verifying_key().clone()]);
        let kind = "application/vnd.in-toto+json";
        for key in [&old, &new] {
            let envelope = sign(kind, b"{}", key).unwrap();
            let verified = verify_keyring(&envelope, &ring, kind).unwrap();
            assert_eq!(verified.key_id, key.verifying_key().key_id());
        }

        let foreign = sign(kind, b"{}", &stranger).unwrap();
        let err = verify_keyring(&foreign, &ring, kind).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::UnknownKey { .. }), "{text}");
        assert!(text.contains(stranger.verifying_key().key_id()), "{text}");
        assert!(text.contains(old.verifying_key().key_id()), "{text}");
        assert!(text.contains(new.verifying_key().key_id()), "{text}");

        // Naming a trusted key is not signing with it.
        let mut impostor = foreign.clone();
        impostor.signatures[0].keyid = old.verifying_key().key_id().to_owned();
        assert!(matches!(
            verify_keyring(&impostor, &ring, kind),
            Err(Error::BadSignature { .. })
        ));
        // A signature naming no key is tried with each.
        let mut anonymous = sign(kind, b"{}", &new).unwrap();
        anonymous.signatures[0].keyid.clear();
        assert!(verify_keyring(&anonymous, &ring, kind).is_ok());
    }
}
