//! custody's build type, written and read in one place (documented in
//! `docs/build-type.md`):
//! - `externalParameters`: `source` (`{ "git": URL, "revision": asked-for }`
//!   or `{ "directory": PATH }`) and `spec` (`path`, `digest`, and
//!   `inline: true` when the spec did not come from the source at the
//!   commit built: submitted with the request, or a local file);
//! - `internalParameters`: the executor and the step boundary the runner
//!   reported;
//! - `resolvedDependencies`: the source as `name: "source"`,
//!   `uri: "git+URL"`, `digest: { "gitCommit": SHA }` (with
//!   `annotations.dirty` for a working tree with uncommitted changes), and
//!   each step image as `name: "step-image:STEP"`, `uri: REFERENCE`,
//!   `digest: { "sha256": HEX }`, and each manifest a step read through
//!   the gateway from a `pulls` repository as `name: "pull:NAME"`,
//!   `uri: REGISTRY/REPO@sha256:HEX`, `digest: { "sha256": HEX }`;
//! - subjects, each with `annotations.kind`: `image`, `artifact` or `file`;
//! - `byproducts`: each step's log as `name: "log:STEP"`, with
//!   `annotations.cutLines`/`cutBytes` when the log passed its bound; and
//!   each destination a step reached through its egress proxy as
//!   `name: "egress:STEP"`, `uri` `tcp://HOST:PORT` (a tunnel) or the
//!   `http://` URL (with `digest.sha256` of the response body), and
//!   `annotations` `step`, `bytesSent`, `bytesReceived`.

use std::collections::BTreeMap;

use custody_attest::statement::{Provenance, ResourceDescriptor};
use custody_oci::{Digest, Location};

/// custody's build type URI.
pub const BUILD_TYPE: &str = "https://custody.dev/build-types/build/v1";
/// The `name` of the source in `resolvedDependencies`.
pub const SOURCE_DEPENDENCY: &str = "source";
/// The `name` prefix of step images in `resolvedDependencies`.
pub const STEP_IMAGE_PREFIX: &str = "step-image:";
/// The `name` prefix of manifests steps read from `pulls` repositories in
/// `resolvedDependencies`.
pub const PULL_PREFIX: &str = "pull:";
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

/// The source dependency of a git repository at `commit`.
pub fn git_source(url: &str, commit: &str) -> ResourceDescriptor {
    ResourceDescriptor {
        name: Some(SOURCE_DEPENDENCY.to_owned()),
        uri: Some(format!("git+{url}")),
        digest: BTreeMap::from([("gitCommit".to_owned(), commit.to_owned())]),
        ..ResourceDescriptor::default()
    }
}

/// The source dependency of a local directory: a git checkout at `commit`
/// (`dirty` when its tree had uncommitted changes), or just its `file://` URI.
pub fn local_source(file_uri: &str, commit: Option<(&str, bool)>) -> ResourceDescriptor {
    match commit {
        Some((commit, dirty)) => {
            let mut source = git_source(file_uri, commit);
            if dirty {
                let mut annotations = serde_json::Map::new();
                annotations.insert("dirty".into(), true.into());
                source.annotations = Some(annotations);
            }
            source
        }
        None => ResourceDescriptor {
            name: Some(SOURCE_DEPENDENCY.to_owned()),
            uri: Some(file_uri.to_owned()),
            ..ResourceDescriptor::default()
        },
    }
}

/// The dependency on step `step`'s image, `pinned` to `digest`.
pub fn step_image(step: &str, pinned: &str, digest: &Digest) -> ResourceDescriptor {
    ResourceDescriptor {
        name: Some(format!("{STEP_IMAGE_PREFIX}{step}")),
        uri: Some(pinned.to_owned()),
        ..digest_descriptor(digest)
    }
}

/// A manifest a step read from `pulls` repository `pull` through the
/// gateway: `from` is the registry repository (`host[:port]/path`) it was
/// served from.
pub fn pulled(pull: &str, from: &str, digest: &Digest) -> ResourceDescriptor {
    ResourceDescriptor {
        name: Some(format!("{PULL_PREFIX}{pull}")),
        uri: Some(format!("{from}@{digest}")),
        ..digest_descriptor(digest)
    }
}

/// What steps read from `pulls` repositories, in the resolved dependencies.
pub fn pulls(provenance: &Provenance) -> impl Iterator<Item = &ResourceDescriptor> {
    provenance
        .build_definition
        .resolved_dependencies
        .iter()
        .filter(|d| {
            d.name
                .as_deref()
                .is_some_and(|n| n.starts_with(PULL_PREFIX))
        })
}

/// A subject: what `kind` of thing `name` is, with its digest.
pub fn subject(kind: SubjectKind, name: &str, digest: &Digest) -> ResourceDescriptor {
    ResourceDescriptor {
        name: Some(name.to_owned()),
        annotations: Some(kind.annotations()),
        ..digest_descriptor(digest)
    }
}

/// The annotation of a subject a step pushed itself (through the runner's
/// gateway): the step's name.
pub const PUSHED_BY_STEP: &str = "step";
/// …and the tag the step pushed it under, when it used one.
pub const PUSHED_TAG: &str = "tag";

/// An image step `step` pushed itself through the gateway, as `tag` if it
/// used one; named and checked like any other image subject.
pub fn pushed_by_step(
    name: &str,
    digest: &Digest,
    step: &str,
    tag: Option<&str>,
) -> ResourceDescriptor {
    let mut subject = subject(SubjectKind::Image, name, digest);
    let annotations = subject.annotations.get_or_insert_default();
    annotations.insert(PUSHED_BY_STEP.to_owned(), step.into());
    if let Some(tag) = tag {
        annotations.insert(PUSHED_TAG.to_owned(), tag.into());
    }
    subject
}

/// The byproduct for step `step`'s log: the sha256 `hex` of its stored
/// lines, and what was cut (`(lines, bytes)`) when it passed its bound.
pub fn step_log(step: &str, hex: String, cut: Option<(u64, u64)>) -> ResourceDescriptor {
    ResourceDescriptor {
        name: Some(format!("log:{step}")),
        digest: BTreeMap::from([("sha256".to_owned(), hex)]),
        annotations: cut.map(|(lines, bytes)| {
            let mut map = serde_json::Map::new();
            map.insert("cutLines".into(), lines.into());
            map.insert("cutBytes".into(), bytes.into());
            map
        }),
        ..ResourceDescriptor::default()
    }
}

/// The `name` prefix of egress byproducts.
pub const EGRESS_PREFIX: &str = "egress:";

/// A destination a step reached through its egress proxy, as the
/// provenance records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRecord {
    pub step: String,
    /// `tcp://HOST:PORT` or an `http://` URL.
    pub uri: String,
    /// For plain HTTP, the sha256 (hex) of the response body.
    pub sha256: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Contacts folded into this record by their host and port alone
    /// (then `uri` is `tcp://HOST:PORT`): the build had already recorded
    /// as many exact URLs and digests as it keeps. 0 for an exact record.
    pub folded: u64,
}

impl EgressRecord {
    /// The host and port it names, `None` for a URI that is neither form.
    pub fn host_port(&self) -> Option<(String, u16)> {
        uri_host_port(&self.uri)
    }

    /// The `uri` of a tunnel to `host:port`: `tcp://HOST:PORT`, an IPv6
    /// address in brackets.
    pub fn tunnel_uri(host: &str, port: u16) -> String {
        if host.contains(':') {
            format!("tcp://[{host}]:{port}")
        } else {
            format!("tcp://{host}:{port}")
        }
    }

    /// The byproduct that records it.
    pub fn descriptor(&self) -> ResourceDescriptor {
        let mut annotations = serde_json::Map::new();
        annotations.insert("step".into(), self.step.clone().into());
        annotations.insert("bytesSent".into(), self.bytes_sent.into());
        annotations.insert("bytesReceived".into(), self.bytes_received.into());
        if self.folded > 0 {
            annotations.insert("folded".into(), self.folded.into());
        }
        ResourceDescriptor {
            name: Some(format!("{EGRESS_PREFIX}{}", self.step)),
            uri: Some(self.uri.clone()),
            digest: self
                .sha256
                .iter()
                .map(|hex| ("sha256".to_owned(), hex.clone()))
                .collect(),
            annotations: Some(annotations),
        }
    }

    /// Reads one back; `None` for a byproduct that is not an egress record.
    pub fn from_descriptor(descriptor: &ResourceDescriptor) -> Option<Self> {
        let step = descriptor.name.as_deref()?.strip_prefix(EGRESS_PREFIX)?;
        let annotations = descriptor.annotations.as_ref();
        let number = |key: &str| {
            annotations
                .and_then(|a| a.get(key))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        Some(Self {
            step: step.to_owned(),
            uri: descriptor.uri.clone().unwrap_or_default(),
            sha256: descriptor.digest.get("sha256").cloned(),
            bytes_sent: number("bytesSent"),
            bytes_received: number("bytesReceived"),
            folded: number("folded"),
        })
    }
}

/// The host and port an egress `uri` names (`tcp://HOST:PORT`, or an
/// `http://` URL, port 80 unless written); `None` for neither form.
pub fn uri_host_port(uri: &str) -> Option<(String, u16)> {
    let (authority, default) = if let Some(rest) = uri.strip_prefix("tcp://") {
        (rest, None)
    } else {
        let rest = uri.strip_prefix("http://")?;
        (rest.split(['/', '?', '#']).next()?, Some(80))
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    custody_net::split_authority(authority, default)
}

/// Every destination the build's steps reached, in the order recorded.
pub fn egress(provenance: &Provenance) -> impl Iterator<Item = EgressRecord> + '_ {
    provenance
        .run_details
        .byproducts
        .iter()
        .filter_map(EgressRecord::from_descriptor)
}

/// A subject's name for `destination`: `REGISTRY/REPO`, or `oci:PATH` for
/// a layout. Verification names what it checks the same way.
pub fn subject_name(destination: &Location) -> String {
    match destination {
        Location::Registry(reference) => {
            format!("{}/{}", reference.registry(), reference.repository())
        }
        Location::Layout { path, .. } => format!("oci:{}", path.display()),
        Location::DockerArchive { path } => format!("docker-archive:{}", path.display()),
    }
}

fn digest_descriptor(digest: &Digest) -> ResourceDescriptor {
    ResourceDescriptor {
        digest: BTreeMap::from([(digest.algorithm().to_string(), digest.digest().to_owned())]),
        ..ResourceDescriptor::default()
    }
}

/// `externalParameters.spec`: where the spec was, its digest, and whether
/// it came from anywhere but the source at the commit built.
pub fn spec_parameters(path: &str, digest: &Digest, inline: bool) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "path": path,
        "digest": { digest.algorithm().to_string(): digest.digest() },
    });
    if inline {
        spec["inline"] = true.into();
    }
    spec
}

/// Whether the spec that ran did not come from the source (see
/// [`spec_parameters`]).
pub fn is_inline_spec(provenance: &Provenance) -> bool {
    provenance.build_definition.external_parameters["spec"]["inline"]
        .as_bool()
        .unwrap_or(false)
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
