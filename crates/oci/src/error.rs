use std::path::PathBuf;

use crate::digest::Digest;

/// Everything that can go wrong moving images. Each variant carries the
/// reference, host, path or digest at fault so the message stands alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A reference or location did not parse.
    #[error("invalid reference `{reference}`: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// A digest did not parse.
    #[error("invalid digest `{digest}`: {reason}")]
    InvalidDigest { digest: String, reason: String },

    /// A digest algorithm custody cannot compute.
    #[error("unsupported digest algorithm `{algorithm}`; custody checks sha256, sha384 and sha512")]
    UnsupportedDigest { algorithm: String },

    /// Bytes that do not hash to the digest that names them.
    #[error("blob `{expected}` does not match its digest: its bytes hash to `{actual}`")]
    DigestMismatch { expected: Digest, actual: Digest },

    /// Bytes of another length than the descriptor says.
    #[error("blob `{digest}` is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    /// A manifest or index over the size registries accept.
    #[error("manifest `{digest}` is {size} bytes, over the 4 MiB limit for manifests")]
    ManifestTooLarge { digest: Digest, size: u64 },

    /// Blobs the image needs that neither the source nor the destination holds.
    #[error("{} not in `{location}` and not at the destination: {}", if digests.len() == 1 { "a blob is" } else { "blobs are" }, digests.iter().map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", "))]
    BlobsMissing {
        location: String,
        digests: Vec<Digest>,
    },

    /// An OCI image layout that cannot be used.
    #[error("OCI layout `{}`: {reason}", path.display())]
    Layout { path: PathBuf, reason: String },

    /// A path that is, or goes through, a symlink (or climbs out with `..`)
    /// where custody follows none: layouts, outputs, job directories.
    #[error("`{}` is a symlink or goes through one; custody never follows symlinks in layouts, outputs or job directories", path.display())]
    Symlink { path: PathBuf },

    /// A docker-save archive that cannot be used.
    #[error("docker archive `{}`: {reason}", path.display())]
    Archive { path: PathBuf, reason: String },

    /// A certs.d directory that is set up wrongly.
    #[error("TLS configuration for `{host}` in `{}`: {reason}", dir.display())]
    CertsDir {
        host: String,
        dir: PathBuf,
        reason: String,
    },

    /// Credentials that could not be read.
    #[error("credentials for `{host}`: {reason}")]
    Credentials { host: String, reason: String },

    /// A `--creds` value custody cannot use; the value is never shown (it
    /// holds a password).
    #[error("invalid `--creds` value: {reason}")]
    InvalidCreds { reason: String },

    /// The registry refused our credentials (or we had none).
    #[error("`{host}` refused access{}: {detail}", user.as_ref().map(|u| format!(" for user `{u}`")).unwrap_or_default())]
    Unauthorized {
        host: String,
        user: Option<String>,
        detail: String,
    },

    /// The registry answered with an error status.
    #[error("`{host}` answered {status} to {action}: {detail}")]
    Registry {
        host: String,
        action: String,
        status: u16,
        detail: String,
    },

    /// The registry could not be reached or the connection broke.
    #[error("cannot talk to `{host}` ({action}): {detail}")]
    Transport {
        host: String,
        action: String,
        detail: String,
    },

    /// An exchange that moves no blob (a manifest, a tag, a referrers
    /// list, a token) did not complete within the deadline, however the
    /// registry trickled its answer.
    #[error("`{host}` did not finish answering {action} within {} s", after.as_secs())]
    TimedOut {
        host: String,
        action: String,
        after: std::time::Duration,
    },

    /// The registry said something that makes no sense.
    #[error("`{host}` gave an invalid answer to {action}: {detail}")]
    Protocol {
        host: String,
        action: String,
        detail: String,
    },

    /// The combination asked for is not something custody does.
    #[error("{0}")]
    Unsupported(String),

    /// A file error; fs-err's message names the path.
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// A read error from a blob stream (the path is in the surrounding context).
    #[error("failed to read blob data: {0}")]
    Read(#[source] std::io::Error),
}

impl Error {
    /// Whether trying the same request again may succeed: broken connections
    /// and server-side errors, never a refusal (4xx) or bad content.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Registry { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// Whether the fault is in how custody was called or set up (exit code 2)
    /// rather than in the operation itself (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::InvalidReference { .. }
                | Error::InvalidDigest { .. }
                | Error::CertsDir { .. }
                | Error::Credentials { .. }
                | Error::InvalidCreds { .. }
                | Error::Unsupported(_)
        )
    }

    /// What the user can do about it, where there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Unauthorized { host, user: None, .. } => Some(format!(
                "log in to `{host}` (`docker login {host}`), or pass `--creds {host}=USER:PASS` or `--authfile FILE`"
            )),
            Error::Unauthorized { host, user: Some(_), .. } => Some(format!(
                "check the credentials for `{host}` and that they may push and pull this repository"
            )),
            Error::InvalidCreds { .. } => Some(
                "write `--creds HOST=USER:PASSWORD`, HOST as references name the registry (`registry.example.org:5000`)".into(),
            ),
            Error::BlobsMissing { .. } => Some(
                "push the base image to the destination repository first (or name it with `--mount-from`), or write the blobs into the layout".into(),
            ),
            Error::Transport { host, detail, .. } if detail.contains("InvalidContentType") => Some(format!(
                "`{host}` seems to serve plain HTTP; if you trust it, pass `--insecure-registry {host}`"
            )),
            Error::Transport { host, detail, .. } if detail.contains("certificate") => Some(format!(
                "put the CA that signed `{host}`'s certificate in `certs.d/{host}/ca.crt` (see `--certs-dir`)"
            )),
            Error::Transport { host, .. } => Some(format!(
                "check that `{host}` is up and reachable; use `--insecure-registry {host}` only if it serves plain HTTP"
            )),
            Error::InvalidReference { reference, .. }
                if ["/", "./", "../", "~"].iter().any(|p| reference.starts_with(p)) =>
            {
                Some(format!(
                    "`{reference}` looks like a path: write `oci:{reference}` for an OCI layout, or `docker-archive:{reference}` for a docker archive"
                ))
            }
            Error::TimedOut { host, .. } => Some(format!(
                "check that `{host}` is healthy; a slower registry needs a longer `--registry-timeout`"
            )),
            Error::Symlink { .. } => Some(
                "name the real directory (`realpath` prints it), or remove the symlink".into(),
            ),
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => {
                Some("the source is corrupt or was modified; nothing was committed for this blob".into())
            }
            _ => None,
        }
    }
}
