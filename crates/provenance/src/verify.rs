//! Checking an image or layout against its attestations: find every DSSE
//! envelope attached to it (referrers, cosign tags, layout referrers),
//! and accept it if one of them is signed by a key of the keyring (the one
//! its signature's key id names), is a statement about
//! this very digest, carries SLSA provenance and passes the policy.

use custody_attest::dsse::Envelope;
use custody_attest::keys::Keyring;
use custody_attest::statement::{Provenance, VerifiedStatement};
use custody_oci::layout::Layout;
use custody_oci::registry::{Client, RegistryOptions};
use custody_oci::{Digest, Location};

use crate::attach;
use crate::build_type::SubjectKind;
use crate::policy::{Policy, Violation};

/// An attestation that passed every check.
#[derive(Debug)]
pub struct Verified {
    /// What was verified, pinned: `REF@sha256:…`.
    pub target: String,
    pub digest: Digest,
    pub statement: VerifiedStatement,
    pub provenance: Provenance,
    /// How many envelopes were found in all.
    pub envelopes: usize,
}

/// Why verification failed, by stage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("`{target}` has no attestation (no referrer, no cosign `.att` tag)")]
    NoAttestation { target: String },
    #[error("no attestation of `{target}` passed:\n{}", reasons.iter().map(|r| format!("  - {r}")).collect::<Vec<_>>().join("\n"))]
    Rejected {
        target: String,
        /// Why each distinct envelope failed, by the stage it failed at.
        reasons: Vec<Rejection>,
    },
    #[error(transparent)]
    Oci(#[from] custody_oci::Error),
}

/// Why one envelope was refused, by the stage it failed at.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Not a DSSE envelope at all.
    #[error("not a DSSE envelope: {0}")]
    Envelope(String),
    /// No signature verifies with the key, or the payload is no statement.
    #[error("signature: {0}")]
    Signature(String),
    /// The statement is about something else.
    #[error(
        "subject: the statement names no image or artifact `{name}` with digest `{digest}`{}",
        if *only_as_file { " (only a file with those bytes, which vouches for no image)" } else { "" }
    )]
    Subject {
        name: String,
        digest: String,
        /// A file subject had this digest: a file's bytes vouch for no image.
        only_as_file: bool,
    },
    /// Not SLSA provenance v1.
    #[error("predicate: {0}")]
    Predicate(String),
    /// Signed and about this image, but the policy says no.
    #[error("policy: {0}")]
    Policy(Violation),
}

/// Verifies the image at `location`.
pub async fn verify(
    location: &Location,
    options: &RegistryOptions,
    keys: &Keyring,
    policy: &Policy,
) -> Result<Verified, VerifyError> {
    let name = crate::build_type::subject_name(location);
    let (target, digest, envelopes) = match location {
        Location::Registry(reference) => {
            let client = Client::new(reference.api_host(), options).await?;
            let (descriptor, _) = client
                .manifest(reference.repository(), &reference.manifest_ref())
                .await?;
            let digest = descriptor.digest().clone();
            let envelopes =
                attach::find_in_registry(&client, reference.repository(), &digest).await?;
            (
                format!(
                    "{}/{}@{digest}",
                    reference.registry(),
                    reference.repository()
                ),
                digest,
                envelopes,
            )
        }
        Location::Layout { path, tag } => {
            let (path, tag) = (path.clone(), tag.clone());
            tokio::task::spawn_blocking(move || -> Result<_, custody_oci::Error> {
                let layout = Layout::open(&path)?;
                let descriptor = layout.resolve(tag.as_deref())?;
                let envelopes = attach::find_in_layout(&layout, descriptor.digest())?;
                Ok((
                    format!("oci:{}@{}", path.display(), descriptor.digest()),
                    descriptor.digest().clone(),
                    envelopes,
                ))
            })
            .await
            .expect("layout reading does not panic")?
        }
        Location::DockerArchive { .. } => {
            return Err(custody_oci::Error::Unsupported(format!(
                "`{location}`: verify an image in a registry or an OCI layout"
            ))
            .into());
        }
    };
    if envelopes.is_empty() {
        return Err(VerifyError::NoAttestation { target });
    }
    let count = envelopes.len();
    let mut reasons = Vec::new();
    for bytes in &envelopes {
        match check(bytes, keys, &name, &digest, policy) {
            Ok((statement, provenance)) => {
                return Ok(Verified {
                    target,
                    digest,
                    statement,
                    provenance,
                    envelopes: count,
                });
            }
            Err(reason) => {
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
        }
    }
    Err(VerifyError::Rejected { target, reasons })
}

/// One envelope through every stage; the rejection names the stage it failed.
fn check(
    bytes: &[u8],
    keys: &Keyring,
    name: &str,
    digest: &Digest,
    policy: &Policy,
) -> Result<(VerifiedStatement, Provenance), Rejection> {
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| Rejection::Envelope(e.to_string()))?;
    let statement = VerifiedStatement::verify_keyring(&envelope, keys)
        .map_err(|e| Rejection::Signature(e.to_string()))?;
    // Only a manifest the build pushed, to this very repository (or
    // layout), vouches for an image: a file whose bytes happen to be some
    // image's manifest does not.
    let hex = digest.digest();
    let sha256 = digest.algorithm().as_ref() == "sha256";
    let subjects = &statement.statement().subject;
    let names_manifest = sha256
        && subjects.iter().any(|s| {
            s.name.as_deref() == Some(name)
                && s.digest.get("sha256").is_some_and(|d| d == hex)
                && matches!(
                    SubjectKind::of(s),
                    Some(SubjectKind::Image | SubjectKind::Artifact)
                )
        });
    if !names_manifest {
        return Err(Rejection::Subject {
            name: name.to_owned(),
            digest: digest.to_string(),
            only_as_file: sha256 && statement.names_sha256(hex),
        });
    }
    let provenance = statement
        .provenance()
        .map_err(|e| Rejection::Predicate(e.to_string()))?;
    policy.check(&provenance).map_err(Rejection::Policy)?;
    Ok((statement, provenance))
}
