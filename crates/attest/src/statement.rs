//! in-toto Statement v1 (github.com/in-toto/attestation, spec/v1) with a
//! SLSA Provenance v1 predicate (slsa.dev/spec/v1.0/provenance).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::dsse::{self, Envelope, VerifiedPayload};
use crate::keys::{Keyring, Signer, VerifyingKey};

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";
/// The DSSE payload type of in-toto statements.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// An in-toto statement: these subjects, this predicate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    pub subject: Vec<ResourceDescriptor>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: serde_json::Value,
}

/// A resource by name and digests (`{"sha256": "<hex>"}`), and optionally URI.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceDescriptor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The SLSA Provenance v1 predicate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    pub build_definition: BuildDefinition,
    pub run_details: RunDetails,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    pub build_type: String,
    pub external_parameters: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_parameters: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDetails {
    pub builder: Builder,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BuildMetadata>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub byproducts: Vec<ResourceDescriptor>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Builder {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builder_dependencies: Vec<ResourceDescriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildMetadata {
    pub invocation_id: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_on: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_on: Option<String>,
}

impl Statement {
    /// A SLSA Provenance v1 statement about `subject`.
    pub fn provenance(subject: Vec<ResourceDescriptor>, provenance: &Provenance) -> Self {
        Self {
            statement_type: STATEMENT_TYPE.to_owned(),
            subject,
            predicate_type: SLSA_PROVENANCE_V1.to_owned(),
            predicate: serde_json::to_value(provenance).expect("provenance serialises"),
        }
    }

    /// Signs the statement into a DSSE envelope.
    pub fn sign(&self, key: &dyn Signer) -> Result<Envelope, Error> {
        let payload = serde_json::to_vec(self).expect("a statement serialises");
        dsse::sign(PAYLOAD_TYPE, &payload, key)
    }
}

/// A statement whose envelope signature checked out with a known key. It
/// exists only through [`VerifiedStatement::verify`].
#[derive(Debug)]
pub struct VerifiedStatement {
    statement: Statement,
    key_id: String,
}

impl VerifiedStatement {
    /// Verifies the envelope with `key` and parses its payload as a v1 statement.
    pub fn verify(envelope: &Envelope, key: &VerifyingKey) -> Result<Self, Error> {
        Self::verify_keyring(envelope, &Keyring::from(key.clone()))
    }

    /// Verifies the envelope with the key of `keyring` its signature names
    /// and parses its payload as a v1 statement.
    pub fn verify_keyring(envelope: &Envelope, keyring: &Keyring) -> Result<Self, Error> {
        let VerifiedPayload { bytes, key_id, .. } =
            dsse::verify_keyring(envelope, keyring, PAYLOAD_TYPE)?;
        let statement: Statement =
            serde_json::from_slice(&bytes).map_err(|e| Error::Statement(e.to_string()))?;
        if statement.statement_type != STATEMENT_TYPE {
            return Err(Error::Statement(format!(
                "`_type` is `{}`, expected `{STATEMENT_TYPE}`",
                statement.statement_type
            )));
        }
        Ok(Self { statement, key_id })
    }

    /// The statement, as signed.
    pub fn statement(&self) -> &Statement {
        &self.statement
    }

    /// The id of the key whose signature verified.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Whether some subject has this sha256 digest (hex, no prefix).
    pub fn names_sha256(&self, hex: &str) -> bool {
        self.statement
            .subject
            .iter()
            .any(|s| s.digest.get("sha256").is_some_and(|d| d == hex))
    }

    /// The SLSA Provenance v1 predicate, when that is what this is.
    pub fn provenance(&self) -> Result<Provenance, Error> {
        if self.statement.predicate_type != SLSA_PROVENANCE_V1 {
            return Err(Error::Statement(format!(
                "`predicateType` is `{}`, expected `{SLSA_PROVENANCE_V1}`",
                self.statement.predicate_type
            )));
        }
        serde_json::from_value(self.statement.predicate.clone())
            .map_err(|e| Error::Statement(format!("the provenance predicate: {e}")))
    }
}
