//! What steps pushed through the gateway, as the runner reads it to push
//! onward: per repository, each tag and the manifest it names, and the
//! manifests pushed by digest that nothing else names.

use std::collections::BTreeMap;
use std::path::PathBuf;

use custody_oci::oci_spec::image::Descriptor;

use crate::name::{Repository, Tag};

/// Everything pushed, read with [`crate::Gateway::pushed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// The OCI layout holding every manifest and blob named here (its
    /// `index.json` stays empty: these records are what says what it holds).
    pub layout: PathBuf,
    /// Only repositories given at least one manifest appear.
    pub repositories: BTreeMap<Repository, PushedRepository>,
}

/// What one repository was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedRepository {
    /// Each tag and the manifest it names last.
    pub tags: BTreeMap<Tag, Descriptor>,
    /// Manifests put by digest that no tag names and no index pushed here
    /// lists: pushed on their own, for the runner to push by digest. (An
    /// index's children travel with the index.) Sorted by digest.
    pub by_digest: Vec<Descriptor>,
}
