//! Checking an image or layout against its attestations: find every DSSE
//! envelope attached to it (referrers, cosign tags, layout referrers),
//! and accept it if one of them is signed by the key, is a statement about
//! this very digest, carries SLSA provenance and passes the policy.

use custody_attest::dsse::Envelope;
use custody_attest::keys::VerifyingKey;
use custody_attest::policy::Policy;
use custody_attest::statement::{Provenance, VerifiedStatement};
use custody_oci::layout::Layout;
use custody_oci::registry::{Client, RegistryOptions};
use custody_oci::{Digest, Location};

use crate::attach;

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
        reasons: Vec<String>,
    },
    #[error(transparent)]
    Oci(#[from] custody_oci::Error),
}

/// Verifies the image at `location`.
pub async fn verify(
    location: &Location,
    options: &RegistryOptions,
    key: &VerifyingKey,
    policy: &Policy,
) -> Result<Verified, VerifyError> {
    let name = crate::build::subject_name(location);
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
        match check(bytes, key, &name, &digest, policy) {
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

/// One envelope through every stage; the reason names the stage it failed.
fn check(
    bytes: &[u8],
    key: &VerifyingKey,
    name: &str,
    digest: &Digest,
    policy: &Policy,
) -> Result<(VerifiedStatement, Provenance), String> {
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| format!("not a DSSE envelope: {e}"))?;
    let statement =
        VerifiedStatement::verify(&envelope, key).map_err(|e| format!("signature: {e}"))?;
    // Only a manifest the build pushed, to this very repository (or
    // layout), vouches for an image: a file whose bytes happen to be some
    // image's manifest does not.
    if digest.algorithm().as_ref() != "sha256" || !statement.names_manifest(name, digest.digest()) {
        let as_file = statement.names_sha256(digest.digest());
        return Err(format!(
            "subject: the statement names no image or artifact `{name}` with digest `{digest}`{}",
            if as_file {
                " (only a file with those bytes, which vouches for no image)"
            } else {
                ""
            }
        ));
    }
    let provenance = statement
        .provenance()
        .map_err(|e| format!("predicate: {e}"))?;
    policy
        .check(&provenance)
        .map_err(|e| format!("policy: {e}"))?;
    Ok((statement, provenance))
}
