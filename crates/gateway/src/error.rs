//! The two kinds of failure: the gateway could not be set up or served
//! ([`Error`], for the runner), and a request the gateway refuses
//! ([`Refusal`], for the step's client, in the registry's own error JSON).

use std::path::PathBuf;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Why the gateway could not start or keep serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The storage directory could not be opened or set up as a layout.
    #[error("gateway storage `{}`", path.display())]
    Storage {
        path: PathBuf,
        #[source]
        source: custody_oci::Error,
    },

    /// The storage directory already holds files: everything in it must
    /// have come through the gateway, or the records would not say what
    /// it holds.
    #[error("gateway storage `{}` is not empty; the gateway needs a new or empty directory", path.display())]
    StorageNotEmpty { path: PathBuf },

    /// No repository was declared: a gateway that accepts nothing.
    #[error("the gateway needs at least one declared repository")]
    NoRepositories,

    /// A repository declared both for pushes and for pulls.
    #[error("`{0}` is declared both for pushes and for pulls; a repository is one or the other")]
    PushAndPull(crate::name::Repository),
}

/// Error codes of the distribution spec ("Error Codes") the gateway answers
/// with; each fixes the status it is sent with unless the case says
/// otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Denied,
    Unsupported,
    TooManyRequests,
    /// distribution's code for a chunk that does not continue the upload.
    RangeInvalid,
    /// distribution's code for a tag that does not parse.
    TagInvalid,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::RangeInvalid => "RANGE_INVALID",
            Code::TagInvalid => "TAG_INVALID",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Code::BlobUnknown
            | Code::BlobUploadUnknown
            | Code::ManifestUnknown
            | Code::NameUnknown => StatusCode::NOT_FOUND,
            Code::Denied => StatusCode::FORBIDDEN,
            Code::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Code::BlobUploadInvalid
            | Code::DigestInvalid
            | Code::ManifestBlobUnknown
            | Code::ManifestInvalid
            | Code::NameInvalid
            | Code::SizeInvalid
            | Code::TagInvalid => StatusCode::BAD_REQUEST,
        }
    }
}

/// A request the gateway refuses: a status, a code and a message that
/// names what is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    /// `Range` to send with a 416, so the client can resume.
    pub(crate) range: Option<String>,
}

impl Refusal {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            status: code.status(),
            code,
            message: message.into(),
            range: None,
        }
    }

    /// The storage limit is reached. 413, since the client sent more than
    /// the gateway takes; DENIED, since no retry will succeed.
    pub(crate) fn over_limit(limit: u64) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..Self::new(
                Code::Denied,
                format!(
                    "the build's pushes may store at most {limit} bytes in the gateway, and this would exceed it"
                ),
            )
        }
    }

    /// Something failed on the gateway's side (a disk error): 500.
    pub(crate) fn internal(what: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            ..Self::new(
                Code::BlobUploadInvalid,
                format!("the gateway failed: {what}"),
            )
        }
    }

    pub(crate) fn with_range(mut self, range: String) -> Self {
        self.range = Some(range);
        self
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        tracing::debug!(status = %self.status, code = self.code.as_str(), message = %self.message, "gateway refused a request");
        let body = serde_json::json!({
            "errors": [{"code": self.code.as_str(), "message": self.message}]
        });
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(range) = self.range.and_then(|r| HeaderValue::from_str(&r).ok()) {
            headers.insert(header::RANGE, range);
        }
        response
    }
}
