//! Why a build did not succeed, by the stage it stopped at. Each variant
//! keeps its cause; the build's end state and the hint a user sees follow
//! from the variant, not from parsing a message.

use std::path::PathBuf;

use crate::dispatch::JobError;
use crate::store::{State, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The git source could not be resolved to a commit.
    #[error("source: {0}")]
    Source(#[source] custody_source::SourceError),
    /// The service's source policy refuses the source.
    #[error("source `{url}` refused: {reason}")]
    SourceRefused { url: String, reason: String },
    /// A service does not tell submitters why a fetch failed (that would
    /// make it a port scanner); its log has the reason.
    #[error("the source could not be fetched; the service's log has the reason")]
    SourceUnavailable,
    /// The spec that was to run cannot be used.
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    /// The spec could not be read from the source.
    #[error("the spec could not be read from the source: {0}")]
    SpecUnreadable(#[source] custody_source::SourceError),
    /// A local build of a directory that is not there.
    #[error("source directory `{}`: {source}", path.display())]
    SourceDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A step image's tag could not be resolved to a digest.
    #[error("step `{step}`: image `{image}`: {source}")]
    StepImage {
        step: String,
        image: String,
        #[source]
        source: Box<custody_oci::Error>,
    },
    /// A destination that cannot be made from its template for this build.
    #[error("destination `{template}`: {reason}")]
    DestinationTemplate { template: String, reason: String },
    /// A destination that cannot take a push: found before any step ran.
    #[error(
        "{}:{line}:{column}: destination `{destination}` cannot take the build's output: {source}",
        spec.display()
    )]
    Destination {
        spec: PathBuf,
        line: u64,
        column: u64,
        destination: String,
        #[source]
        source: Box<custody_oci::Error>,
    },
    /// The service's destination policy refuses a destination.
    #[error("{}:{line}:{column}: destination refused: {reason}", spec.display())]
    DestinationRefused {
        spec: PathBuf,
        line: u64,
        column: u64,
        reason: String,
    },
    /// A secret the spec names is not defined, or not for this source:
    /// found before any step ran.
    #[error("{}:{}:{}: {refusal}", spec.display(), refusal.location().0, refusal.location().1)]
    SecretRefused {
        spec: PathBuf,
        refusal: crate::secrets::SecretRefusal,
    },
    /// A secret's value could not be read (its file, its variable).
    #[error("the secret `{name}` could not be read: {reason}")]
    SecretUnreadable { name: String, reason: String },
    /// The build ran past the service's `max_build_seconds`.
    #[error("the build ran past its limit of {}s while {phase}", limit.as_secs())]
    TimedOut {
        phase: &'static str,
        limit: std::time::Duration,
    },
    /// The daemon's own credentials or TLS material for a registry.
    #[error("registry access: {0}")]
    RegistryAccess(#[source] Box<custody_oci::Error>),
    /// No runner ran the job to its end.
    #[error(transparent)]
    Dispatch(JobError),
    /// The runner ran the job and says it failed (a step, a push).
    #[error("{0}")]
    Runner(String),
    /// A step reached destinations the provenance could not all record.
    #[error("{0}")]
    EgressUnrecorded(String),
    /// Cancelled, with the reason.
    #[error("{0}")]
    Cancelled(String),
    /// The runner's report does not match what the spec declares.
    #[error("the runner reported {reported} pushed outputs; the spec declares {declared}")]
    OutputCount { reported: usize, declared: usize },
    /// A `pushes` repository no step pushed to.
    #[error(
        "the spec declares a push to `{name}`, but no step pushed to `$CUSTODY_REGISTRY/{name}`"
    )]
    PushNotMade { name: String },
    /// The runner reported a gateway push to a repository the spec does not declare.
    #[error("the runner reported a push to `{name}`, which the spec does not declare")]
    UnknownPush { name: String },
    /// A pushed output is not what the runner said it pushed.
    #[error("checking `{digest}` at `{destination}`: {detail}")]
    Check {
        destination: String,
        digest: String,
        detail: String,
    },
    #[error("signing the provenance: {0}")]
    Sign(#[source] custody_attest::Error),
    /// Another daemon took the build over (this one's lease ran out).
    #[error("this daemon lost its claim on the build before signing; nothing was published")]
    LostClaim,
    #[error("attaching the provenance to `{destination}`: {detail}")]
    Attach { destination: String, detail: String },
    #[error("tagging `{destination}`: {detail}")]
    Tag { destination: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BuildError {
    /// The state a build that ended with this error is in.
    pub fn state(&self) -> State {
        match self {
            BuildError::Cancelled(_) | BuildError::Dispatch(JobError::Cancelled(_)) => {
                State::Cancelled
            }
            _ => State::Failed,
        }
    }

    /// What the user can do about it, where there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            BuildError::Destination { source, .. }
            | BuildError::StepImage { source, .. }
            | BuildError::RegistryAccess(source) => source.hint(),
            BuildError::EgressUnrecorded(_) => Some(
                "give the step a `network:` list of the hosts it needs, or fetch through fewer of them".into(),
            ),
            BuildError::LostClaim => {
                Some("the build was ended by another daemon; see its record".into())
            }
            _ => None,
        }
    }

    /// The message as stored and shown: the error, then its hint.
    pub fn report(&self) -> String {
        match self.hint() {
            Some(hint) => format!("{self}; hint: {hint}"),
            None => self.to_string(),
        }
    }
}

impl From<JobError> for BuildError {
    fn from(error: JobError) -> Self {
        match error {
            JobError::Cancelled(reason) => BuildError::Cancelled(reason),
            other => BuildError::Dispatch(other),
        }
    }
}
