//! What custody's provenance says, where, and the policy `custody verify`
//! checks against it.
//!
//! custody's build type (documented in `docs/build-type.md`):
//! - `externalParameters.source`: `{ "git": URL, "revision": asked-for }`
//!   (or `{ "directory": PATH }` for a local build);
//! - `resolvedDependencies`: the source as `name: "source"`,
//!   `uri: "git+URL"`, `digest: { "gitCommit": SHA }`, and each step image as
//!   `name: "step-image:STEP"`, `uri: REFERENCE`, `digest: { "sha256": HEX }`.

use crate::statement::{Provenance, ResourceDescriptor};

/// custody's build type URI.
pub const BUILD_TYPE: &str = "https://custody.dev/build-types/build/v1";
/// The `name` of the source in `resolvedDependencies`.
pub const SOURCE_DEPENDENCY: &str = "source";
/// The `name` prefix of step images in `resolvedDependencies`.
pub const STEP_IMAGE_PREFIX: &str = "step-image:";
/// The subject annotation that says what a subject is.
pub const SUBJECT_KIND: &str = "kind";

/// What a subject of custody's provenance is. Only manifests custody
/// pushed (images and artifacts) can vouch for an image; a file subject
/// is a file's bytes, whatever they happen to look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectKind {
    /// An image manifest a build pushed.
    Image,
    /// The manifest of a file artifact a build pushed.
    Artifact,
    /// One file of an artifact.
    File,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Image => "image",
            SubjectKind::Artifact => "artifact",
            SubjectKind::File => "file",
        }
    }

    /// The `annotations` a subject of this kind carries.
    pub fn annotations(self) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        map.insert(SUBJECT_KIND.to_owned(), self.as_str().into());
        map
    }

    /// The kind `subject` says it is, if any.
    pub fn of(subject: &ResourceDescriptor) -> Option<Self> {
        match subject.annotations.as_ref()?.get(SUBJECT_KIND)?.as_str()? {
            "image" => Some(SubjectKind::Image),
            "artifact" => Some(SubjectKind::Artifact),
            "file" => Some(SubjectKind::File),
            _ => None,
        }
    }
}

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
    #[error("step image `{image}` ({digest}) is not in the allowed list")]
    StepImage { image: String, digest: String },
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
        Ok(())
    }
}

/// The source entry of the resolved dependencies.
pub fn source(provenance: &Provenance) -> Option<&ResourceDescriptor> {
    provenance
        .build_definition
        .resolved_dependencies
        .iter()
        .find(|d| d.name.as_deref() == Some(SOURCE_DEPENDENCY))
}

/// Whether the source was a working tree with uncommitted changes.
pub fn is_dirty(source: Option<&ResourceDescriptor>) -> bool {
    source
        .and_then(|s| s.annotations.as_ref())
        .and_then(|a| a.get("dirty"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

/// The step images of the resolved dependencies.
pub fn step_images(provenance: &Provenance) -> impl Iterator<Item = &ResourceDescriptor> {
    provenance
        .build_definition
        .resolved_dependencies
        .iter()
        .filter(|d| {
            d.name
                .as_deref()
                .is_some_and(|n| n.starts_with(STEP_IMAGE_PREFIX))
        })
}

/// `https://host/path.git` and `https://host/path` name the same repository.
fn normalise(url: &str) -> &str {
    url.trim_end_matches('/').trim_end_matches(".git")
}
