//! custody's provenance: its build type written and read in one place,
//! attestations attached next to images and found again, and the checks
//! `custody verify` (or anyone) makes. Depends on `custody-oci` and
//! `custody-attest` only: verifying needs no store, runner or daemon.
//!
//! # Layout
//! - [`build_type`]: what custody's SLSA provenance says and where
//!   (`docs/build-type.md`): the descriptors the daemon writes, and the
//!   readers verification uses.
//! - [`attach`]: attaching an envelope to an image (OCI 1.1 referrer or
//!   tag schema, cosign `.att`, layout referrers) and finding them again.
//! - [`policy`]: builder, source (never a dirty tree unless allowed) and
//!   step-image policy.
//! - [`verify`]: an image or layout through every stage (envelope,
//!   signature, subject, predicate, policy), each with its own error.

#![forbid(unsafe_code)]

pub mod attach;
pub mod build_type;
pub mod policy;
pub mod verify;
