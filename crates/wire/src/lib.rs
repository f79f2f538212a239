//! The runner connection: how a runner started anywhere proves to the
//! daemon that it is the one started for a job, and the RPC they then speak.
//!
//! # Layout
//! - [`address`]: what counts as one client when limiting clients.
//! - [`identity`]: the daemon's ephemeral TLS 1.3 certificate and the runner's
//!   client configuration that trusts exactly it.
//! - [`token`]: one-time job tokens, compared by digest in constant time.
//! - [`handshake`]: the `JOBID\nTOKEN\n` → `OK\n`/`IJ\n`/`IT\n` exchange.
//! - [`connector`]: the daemon's listener and its waiters.
//! - [`mod@dial`]: the runner's side of the handshake.
//! - [`rpc`]: the tonic service from `proto/runner.proto`, roles inverted.
//! - [`events`]: what a runner reports, in both sides' own types; the
//!   generated ones stay at the RPC edge.

#![forbid(unsafe_code)]

pub mod address;
pub mod connector;
pub mod dial;
pub mod events;
pub mod handshake;
pub mod identity;
pub mod rpc;
pub mod token;

use std::sync::Arc;

pub use address::ClientAddress;
pub use connector::{Connector, Pending, RunnerSession};
pub use dial::{DialError, dial};
pub use identity::DaemonIdentity;
pub use token::{JobToken, TokenDigest};

/// What can go wrong on the daemon's side of a runner connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot make the daemon's TLS identity: {0}")]
    Identity(String),
    #[error("invalid daemon certificate: {0}")]
    Certificate(String),
    #[error("`{0}` is not a valid job id: use letters, digits, `.`, `_` and `-`")]
    InvalidJobId(String),
    #[error("runner handshake failed: {0}")]
    Handshake(String),
    #[error("refused a runner for job `{job_id}`: {verdict:?}")]
    Refused {
        job_id: String,
        verdict: handshake::Verdict,
    },
    #[error("the job stopped waiting for its runner")]
    Withdrawn,
}

/// The one crypto provider custody uses (aws-lc-rs), passed explicitly so no
/// process-wide default is needed.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
