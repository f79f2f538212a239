//! The policy `custody verify` checks a provenance against: who built it,
//! from which source at which commit, with which step images, reaching
//! which destinations.

use custody_attest::statement::Provenance;
pub use custody_net::HostPattern;

use crate::build_type::{egress, is_dirty, is_inline_spec, source, step_images};

/// What a verifier insists on, beyond a valid signature on a statement
/// about the artifact.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// `runDetails.builder.id` must be exactly this.
    pub builder_id: Option<String>,
    /// The source repository must be this URL.
    pub source_repository: Option<String>,
    /// …and, if given, at this commit.
    pub source_commit: Option<String>,
    /// When given, every step image must be one of these digests
    /// (`sha256:<hex>`); an empty list allows only steps without images.
    pub allowed_step_images: Option<Vec<String>>,
    /// Accept a build of a working tree with uncommitted changes when a
    /// source is required (it is not the repository at any commit).
    pub allow_dirty: bool,
    /// Accept a spec that did not come from the source (submitted with
    /// the build, or a local file) when a source is required.
    pub allow_inline_spec: bool,
    /// When given, every destination a step reached through its egress
    /// proxy must match one of these; an empty list allows none.
    pub allowed_egress: Option<Vec<HostPattern>>,
}

/// How a statement fails the policy.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    #[error("the builder is `{actual}`, expected `{expected}`")]
    BuilderId { expected: String, actual: String },
    #[error("the source is `{actual}`, expected `{expected}`")]
    SourceRepository { expected: String, actual: String },
    #[error("the source commit is `{actual}`, expected `{expected}`")]
    SourceCommit { expected: String, actual: String },
    #[error(
        "the source `{uri}` was built with uncommitted changes: it is not the repository at any commit (pass `--allow-dirty` to accept that)"
    )]
    Dirty { uri: String },
    #[error(
        "the spec that ran was not read from the source (it came with the request, or from a local file): the source alone does not say what was built (pass `--allow-inline-spec` to accept that)"
    )]
    InlineSpec,
    #[error("step image `{image}` ({digest}) is not in the allowed list")]
    StepImage { image: String, digest: String },
    #[error(
        "the build's steps reached the outside, and `--no-egress` allows nothing: {}",
        destinations.iter().map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", ")
    )]
    Egress {
        /// Each destination, with the step that reached it.
        destinations: Vec<String>,
    },
    #[error("step `{step}` reached `{uri}`, which no `--allow-egress` pattern allows")]
    EgressNotAllowed { step: String, uri: String },
    #[error("the provenance has no {0}")]
    Missing(&'static str),
}

impl Policy {
    /// Checks `provenance`; the first violation found is returned.
    pub fn check(&self, provenance: &Provenance) -> Result<(), Violation> {
        if let Some(expected) = &self.builder_id {
            let actual = &provenance.run_details.builder.id;
            if actual != expected {
                return Err(Violation::BuilderId {
                    expected: expected.clone(),
                    actual: actual.clone(),
                });
            }
        }
        let source = source(provenance);
        if let Some(expected) = &self.source_repository {
            let actual = source
                .and_then(|s| s.uri.as_deref())
                .map(|u| u.trim_start_matches("git+"))
                .ok_or(Violation::Missing("source"))?;
            if normalise(actual) != normalise(expected) {
                return Err(Violation::SourceRepository {
                    expected: expected.clone(),
                    actual: actual.to_owned(),
                });
            }
        }
        if self.source_repository.is_some() && !self.allow_dirty && is_dirty(source) {
            return Err(Violation::Dirty {
                uri: source.and_then(|s| s.uri.clone()).unwrap_or_default(),
            });
        }
        if self.source_repository.is_some() && !self.allow_inline_spec && is_inline_spec(provenance)
        {
            return Err(Violation::InlineSpec);
        }
        if let Some(expected) = &self.source_commit {
            let actual = source
                .and_then(|s| s.digest.get("gitCommit"))
                .ok_or(Violation::Missing("source commit"))?;
            if actual != expected {
                return Err(Violation::SourceCommit {
                    expected: expected.clone(),
                    actual: actual.clone(),
                });
            }
        }
        if let Some(allowed) = &self.allowed_step_images {
            for image in step_images(provenance) {
                let digest = image
                    .digest
                    .get("sha256")
                    .map(|h| format!("sha256:{h}"))
                    .unwrap_or_default();
                if !allowed.contains(&digest) {
                    return Err(Violation::StepImage {
                        image: image.uri.clone().unwrap_or_default(),
                        digest,
                    });
                }
            }
        }
        if let Some(allowed) = &self.allowed_egress {
            check_egress(provenance, allowed)?;
        }
        Ok(())
    }
}

/// Every recorded destination must match `allowed`; none may exist when
/// it is empty.
fn check_egress(provenance: &Provenance, allowed: &[HostPattern]) -> Result<(), Violation> {
    if allowed.is_empty() {
        let destinations: Vec<String> = egress(provenance)
            .map(|record| format!("{} (step {})", record.uri, record.step))
            .collect();
        if destinations.is_empty() {
            return Ok(());
        }
        return Err(Violation::Egress { destinations });
    }
    for record in egress(provenance) {
        let matched = record
            .host_port()
            .is_some_and(|(host, port)| allowed.iter().any(|p| p.matches(&host, port)));
        if !matched {
            return Err(Violation::EgressNotAllowed {
                step: record.step,
                uri: record.uri,
            });
        }
    }
    Ok(())
}

/// `https://host/path.git` and `https://host/path` name the same repository.
fn normalise(url: &str) -> &str {
    url.trim_end_matches('/').trim_end_matches(".git")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build_type::EgressRecord;

    fn reaching(records: &[(&str, &str)]) -> Provenance {
        let mut provenance: Provenance = serde_json::from_value(serde_json::json!({
            "buildDefinition": {
                "buildType": crate::build_type::BUILD_TYPE,
                "externalParameters": {},
            },
            "runDetails": { "builder": { "id": "b" } },
        }))
        .unwrap();
        provenance.run_details.byproducts = records
            .iter()
            .map(|(step, uri)| {
                EgressRecord {
                    step: (*step).into(),
                    uri: (*uri).into(),
                    sha256: None,
                    bytes_sent: 1,
                    bytes_received: 2,
                    folded: 0,
                }
                .descriptor()
            })
            .collect();
        provenance
    }

    fn allowing(patterns: &[&str]) -> Policy {
        Policy {
            allowed_egress: Some(
                patterns
                    .iter()
                    .map(|p| HostPattern::parse(p).unwrap())
                    .collect(),
            ),
            ..Policy::default()
        }
    }

    #[test]
    fn egress_is_allowed_only_to_matching_hosts_and_ports() {
        let provenance = reaching(&[
            ("deps", "tcp://files.pythonhosted.org:443"),
            ("deps", "http://pypi.org/simple/?x=1"),
        ]);
        assert_eq!(Policy::default().check(&provenance), Ok(()));
        assert_eq!(
            allowing(&["*.pythonhosted.org:443", "pypi.org:80"]).check(&provenance),
            Ok(())
        );
        assert_eq!(
            allowing(&["*.pythonhosted.org"]).check(&provenance),
            Err(Violation::EgressNotAllowed {
                step: "deps".into(),
                uri: "http://pypi.org/simple/?x=1".into()
            })
        );
        assert!(matches!(
            allowing(&["pythonhosted.org", "pypi.org"]).check(&provenance),
            Err(Violation::EgressNotAllowed { uri, .. }) if uri == "tcp://files.pythonhosted.org:443"
        ));
        let err = allowing(&[]).check(&provenance).unwrap_err();
        assert!(
            err.to_string()
                .contains("`tcp://files.pythonhosted.org:443 (step deps)`"),
            "{err}"
        );
        assert_eq!(allowing(&[]).check(&reaching(&[])), Ok(()));
        // A URI that names no host and port matches nothing.
        assert!(
            allowing(&["x"])
                .check(&reaching(&[("s", "ftp://x/")]))
                .is_err()
        );
    }
}
