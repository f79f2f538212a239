//! custody's OCI layer: digests, image layouts, docker-save archives and a
//! registry client that pushes and pulls with the TLS, credentials and
//! redirect behaviour Docker users rely on.
//!
//! # Layout
//! - [`digest`]: hashing exact bytes; [`stream`]: blob streams that verify
//!   themselves while they flow.
//! - [`mod@reference`]: registry references and `oci:`/`docker-archive:` locations.
//! - [`layout`]: OCI image layouts on disk; [`archive`]: `docker save` tars;
//!   [`beneath`]: the file access both use, which never follows a symlink.
//! - [`registry`]: the distribution API client (certs.d, auth, uploads,
//!   referrers).
//! - [`artifact`]: an artifact's files written back beneath a directory.
//! - [`copy`]: the engine that moves an image between any source and
//!   destination, used by `custody push` and `custody pull`.

#![forbid(unsafe_code)]

pub mod archive;
pub mod artifact;
pub mod beneath;
pub mod copy;
pub mod digest;
mod error;
pub mod layout;
pub mod reference;
pub mod registry;
pub mod stream;
pub mod unpack;

pub use digest::Digest;
pub use error::Error;
pub use oci_spec;
pub use reference::{Location, Reference, RegistryHost};
