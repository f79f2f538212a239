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
    /// What it pushed, in the order the spec declares.
    pub outputs: Vec<Output>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Output {
    pub reference: String,
    pub digest: String,
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
}

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
