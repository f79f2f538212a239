//! What travels over the HTTP API, shared by the server and its client. The
//! OpenAPI document is generated from these types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A build to queue.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The spec's path inside the source: the build reads it there, at
    /// the commit it resolves.
    #[serde(default = "default_spec_path")]
    #[schema(default = "custody.yaml")]
    pub spec_path: String,
    /// The git source to build (required unless an inline spec names it).
    #[serde(default)]
    pub source: Option<GitSource>,
    /// The spec's text, sent with the request instead of read from the
    /// source: only where the service allows inline specs; recorded as
    /// inline in the provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<String>,
}

fn default_spec_path() -> String {
    "custody.yaml".to_owned()
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    /// A repository URL the daemon can fetch (`https://`, `ssh://`,
    /// `file://`, `git://`).
    pub git: String,
    /// Branch, tag or commit.
    #[serde(default = "default_revision")]
    #[schema(default = "HEAD")]
    pub revision: String,
    /// The directory of the repository the build runs in (`examples/hello`):
    /// the steps start there and artifact `paths` are relative to it; the
    /// provenance records it. Default: the repository's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

fn default_revision() -> String {
    "HEAD".to_owned()
}

/// Where a build is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl BuildState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BuildState::Succeeded | BuildState::Failed | BuildState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::Cancelled => "cancelled",
        }
    }
}

/// A build as the service knows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Build {
    pub id: String,
    pub state: BuildState,
    pub spec_path: String,
    /// What was asked for: `{"git": URL, "revision": REV}`.
    #[schema(value_type = Object)]
    pub source: serde_json::Value,
    /// The commit (40 hex digits) the source's revision resolved to, once
    /// the build planned.
    #[serde(default)]
    pub commit: Option<String>,
    /// The build this one retries (`POST /builds/{id}/retry`).
    #[serde(default)]
    pub retry_of: Option<String>,
    /// RFC 3339 times.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The daemon that runs (or ran) it.
    pub daemon: Option<String>,
    /// Set while a cancel waits for the daemon running it.
    pub cancel_requested: Option<String>,
    /// Whether signed provenance can be downloaded.
    pub has_provenance: bool,
    /// Its spec's steps, in order, once it planned: each as far as it got.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// What it pushed, in the order the spec declares (only a succeeded
    /// build has any).
    pub outputs: Vec<Output>,
}

/// One step of a build.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Step {
    pub name: String,
    pub state: StepState,
    /// The manifest digest of the step's image; absent for a step on the
    /// host root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Once it exited: its exit code (-1 when a signal killed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Once it ended: how long it ran, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Where a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started yet.
    Pending,
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited otherwise.
    Failed,
    /// Ran past its `timeout`.
    TimedOut,
    /// Never started: the build ended first.
    Skipped,
    /// Still running when the build ended (cancelled, or its daemon lost).
    Interrupted,
    /// A state this client does not know (from a newer server).
    #[serde(other)]
    Unknown,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::TimedOut => "timed_out",
            StepState::Skipped => "skipped",
            StepState::Interrupted => "interrupted",
            StepState::Unknown => "unknown",
        }
    }
}

/// One manifest a build pushed.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Output {
    /// Where, pinned by digest.
    pub reference: String,
    /// The manifest's digest.
    pub digest: String,
    /// The manifest's size in bytes.
    pub size: u64,
}

/// One page of builds, newest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct BuildList {
    pub builds: Vec<Build>,
    /// Pass as `before` for the next page; absent on the last.
    pub next: Option<String>,
}

/// One line a step wrote (the `data` of a `log` server-sent event).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct LogEvent {
    /// Position in the build's log; the event's `id`.
    pub seq: i64,
    /// The step's index in the spec.
    pub step: u32,
    pub stream: LogStream,
    /// The line, without its newline (invalid UTF-8 replaced).
    pub line: String,
    /// When the runner read it, unix milliseconds.
    pub time: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// A key the service signs provenance with.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PublicKey {
    /// `sha256` of the key's SubjectPublicKeyInfo, as in DSSE `keyid`.
    pub key_id: String,
    pub algorithm: String,
    /// SubjectPublicKeyInfo PEM, for `custody verify --key`.
    pub pem: String,
    /// Whether the service signs with it now; a retired key (`false`) is
    /// listed so what it signed still verifies.
    #[serde(default = "signs_by_default")]
    pub signs: bool,
}

/// A list from before rotation listed only the signing key.
fn signs_by_default() -> bool {
    true
}

/// Every key the service signs or signed with: `custody verify --keys`
/// takes this document as it is.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<PublicKey>,
}

/// Every error the API returns.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// For `invalid_spec`, `unknown_secret` and `secret_not_allowed`:
    /// where in the spec (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u64>,
}

/// What went wrong, for programs; each code has one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401: no token, or not one the service accepts.
    Unauthorized,
    /// 400: the request itself is malformed.
    InvalidRequest,
    /// 400: the spec cannot be used; `line` and `column` say where.
    InvalidSpec,
    /// 400: the service's policy refuses it (a source, a destination, an
    /// inline spec); the message names the rule.
    RefusedByPolicy,
    /// 400: the spec names a secret the service does not define; `line`
    /// and `column` say where.
    UnknownSecret,
    /// 400: the spec names a secret the build's source may not use (not
    /// in the secret's `sources`); `line` and `column` say where.
    SecretNotAllowed,
    /// 404: no such build or route.
    NotFound,
    /// 400: a shortened build id that more than one build begins with; the
    /// message names them.
    AmbiguousId,
    /// 404: the build exists but published no provenance.
    NoProvenance,
    /// 409: the build already ended.
    AlreadyEnded,
    /// 405: the route does not take that method.
    MethodNotAllowed,
    /// 503: the store is not answering, or the service is shutting down.
    Unavailable,
    /// 429: this token already holds as many log streams as one may.
    TooManyStreams,
    /// 408: the request's body did not arrive in time.
    RequestTimeout,
    /// A code this client does not know (from a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status the server answers this code with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidSpec
            | ErrorCode::RefusedByPolicy
            | ErrorCode::AmbiguousId
            | ErrorCode::UnknownSecret
            | ErrorCode::SecretNotAllowed => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound | ErrorCode::NoProvenance => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::AlreadyEnded => 409,
            ErrorCode::TooManyStreams => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Unknown => 500,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&text)
    }
}
