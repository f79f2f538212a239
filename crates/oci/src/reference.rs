//! Image references: `host[:port]/repo[:tag][@digest]` for registries and the
//! transport-prefixed forms (`oci:PATH[:TAG]`, `docker-archive:PATH`) for
//! images on disk.
//!
//! Registry references follow the docker reference grammar, including its
//! normalisation: a first component without `.` or `:` (and not `localhost`)
//! is a Docker Hub repository, and single-component Hub names live under
//! `library/`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::Error;
use crate::digest::{self, Digest};

/// The registry that unqualified names refer to.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually lives.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A reference to an image in an OCI registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]` as written (Docker Hub normalised to `docker.io`).
    registry: String,
    /// The repository path, e.g. `team/app` or `library/alpine`.
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host to talk to: Docker Hub's API lives on another name than its
    /// references use.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry for: the digest when pinned, else the tag,
    /// else `latest`.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The same repository, pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same repository, without tag or digest.
    pub fn untagged(&self) -> Self {
        Self {
            tag: None,
            digest: None,
            ..self.clone()
        }
    }

    /// Another repository on the same registry.
    pub fn with_repository(&self, repository: &str) -> Result<Self, Error> {
        Self::from_str(&format!("{}/{}", self.registry, repository))
    }

    /// The registry as credentials are keyed.
    pub fn host(&self) -> RegistryHost {
        RegistryHost::canonical(&self.registry)
    }
}

/// A registry's `host[:port]`, checked, and spelt one way: lowercase, with
/// Docker Hub's three names (`docker.io`, `index.docker.io`,
/// `registry-1.docker.io`) as `docker.io`. Credentials are keyed by it, so
/// every spelling of one registry finds its credential and no other
/// registry does.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistryHost(String);

impl RegistryHost {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `host`, already known to be a valid `host[:port]`, in its one spelling.
    fn canonical(host: &str) -> Self {
        let host = host.to_ascii_lowercase();
        match host.as_str() {
            "index.docker.io" | "registry-1.docker.io" => Self(DOCKER_HUB.to_owned()),
            _ => Self(host),
        }
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RegistryHost {
    type Err = Error;

    /// `host[:port]` as references write it: no scheme, no path.
    fn from_str(text: &str) -> Result<Self, Error> {
        if !is_valid_host(text) {
            return Err(Error::InvalidReference {
                reference: text.to_owned(),
                reason: "not a valid host[:port]".into(),
            });
        }
        Ok(Self::canonical(text))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidReference {
            reference: text.to_owned(),
            reason: reason.to_owned(),
        };
        if text.is_empty() {
            return Err(invalid("it is empty"));
        }
        if text.len() > 4096 {
            return Err(invalid("it is longer than 4096 characters"));
        }
        let (name_and_tag, digest) = match text.split_once('@') {
            Some((name, digest)) => (
                name,
                Some(digest::parse(digest).map_err(|e| invalid(&e.to_string()))?),
            ),
            None => (text, None),
        };
        // A tag is the part after the last `:` that comes after the last `/`;
        // an earlier `:` belongs to the host's port.
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&name_and_tag[..at], Some(&name_and_tag[at + 1..]))
            }
            None => (name_and_tag, None),
        };
        if let Some(tag) = tag
            && !is_valid_tag(tag)
        {
            return Err(invalid(&format!(
                "tag `{tag}` must be 1 to 128 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"
            )));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
            _ => registry,
        };
        if !is_valid_host(&registry) {
            return Err(invalid(&format!("`{registry}` is not a valid host[:port]")));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if let Some(component) = repository.split('/').find(|c| !is_valid_component(c)) {
            return Err(invalid(&format!(
                "repository component `{component}` must be lowercase letters and digits, separated by `.`, `_`, `__` or `-`"
            )));
        }
        Ok(Self {
            registry,
            repository,
            tag: tag.map(str::to_owned),
            digest,
        })
    }
}

fn is_valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && tag.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn is_valid_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        // An IPv6 literal is bracketed: `[::1]:5000`.
        Some((name, port)) if !port.contains(']') => (name, Some(port)),
        _ => (host, None),
    };
    let name_ok = if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
    };
    name_ok && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

fn is_valid_component(component: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        match &component[start..i] {
            "." | "_" | "__" => {}
            sep if sep.bytes().all(|b| b == b'-') => {}
            _ => return false,
        }
    }
    true
}

/// Where an image is or goes: a registry, an OCI image layout, or (as a
/// source only) a `docker save` archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Registry(Reference),
    /// `oci:PATH[:TAG]`
    Layout {
        path: PathBuf,
        tag: Option<String>,
    },
    /// `docker-archive:PATH`
    DockerArchive {
        path: PathBuf,
    },
}

impl Location {
    /// Checks that images can be written here, before any work starts.
    pub fn check_writable(&self) -> Result<(), Error> {
        match self {
            Location::DockerArchive { .. } => Err(read_only(self)),
            _ => Ok(()),
        }
    }
}

pub(crate) fn read_only(location: &Location) -> Error {
    Error::Unsupported(format!(
        "`{location}`: docker archives can only be read; write to `oci:PATH[:TAG]` or a registry"
    ))
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Registry(reference) => reference.fmt(f),
            Location::Layout { path, tag: None } => write!(f, "oci:{}", path.display()),
            Location::Layout {
                path,
                tag: Some(tag),
            } => write!(f, "oci:{}:{tag}", path.display()),
            Location::DockerArchive { path } => write!(f, "docker-archive:{}", path.display()),
        }
    }
}

impl FromStr for Location {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidReference {
            reference: text.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = text.strip_prefix("oci:") {
            // The tag is whatever follows the last `:` when that is a valid
            // tag and not part of the path (paths may hold `:` before a `/`).
            let (path, tag) = match rest.rsplit_once(':') {
                Some((path, tag)) if !tag.contains('/') && !path.is_empty() => {
                    if !is_valid_tag(tag) {
                        return Err(invalid(&format!("`{tag}` is not a valid tag")));
                    }
                    (path, Some(tag.to_owned()))
                }
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(invalid("the layout path is empty"));
            }
            return Ok(Location::Layout {
                path: PathBuf::from(path),
                tag,
            });
        }
        if let Some(path) = text.strip_prefix("docker-archive:") {
            if path.is_empty() {
                return Err(invalid("the archive path is empty"));
            }
            return Ok(Location::DockerArchive {
                path: PathBuf::from(path),
            });
        }
        let reference = text.strip_prefix("docker://").unwrap_or(text);
        if let Some((transport, _)) = reference.split_once(':')
            && !transport.contains('.')
            && !transport.contains('/')
            && reference.contains(":/")
        {
            return Err(invalid(&format!(
                "unknown transport `{transport}:`; use `oci:PATH[:TAG]`, `docker-archive:PATH` or a registry reference"
            )));
        }
        Ok(Location::Registry(Reference::from_str(reference)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Reference {
        text.parse().unwrap()
    }

    #[test]
    fn docker_hub_names_are_normalised() {
        let r = parse("alpine");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/alpine");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.manifest_ref(), "latest");
        assert_eq!(
            parse("index.docker.io/team/app:1").to_string(),
            "docker.io/team/app:1"
        );
    }

    #[test]
    fn registry_hosts_have_one_spelling() {
        let host = |text: &str| text.parse::<RegistryHost>().unwrap();
        assert_eq!(host("Registry.Example:5000"), host("registry.example:5000"));
        assert_eq!(host("registry-1.docker.io"), host("docker.io"));
        assert_eq!(host("index.docker.io"), parse("alpine").host());
        assert_eq!(
            parse("127.0.0.1:5000/team/app:v1").host().as_str(),
            "127.0.0.1:5000"
        );
        assert_ne!(host("registry.example"), host("registry.example:5000"));
        for bad in [
            "",
            "https://registry.example",
            "registry.example/team",
            "registry.example:5000:1",
            "user@registry.example",
            "registry.example:99999",
        ] {
            assert!(bad.parse::<RegistryHost>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_port_tag_and_digest_are_split() {
        let digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = parse(&format!("127.0.0.1:5000/team/app:v1@{digest}"));
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.manifest_ref(), digest);
        assert_eq!(parse("localhost/app").registry(), "localhost");
        assert_eq!(parse("[::1]:5000/app").registry(), "[::1]:5000");
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (text, needle) in [
            ("127.0.0.1:5000/Team/app", "`Team`"),
            ("127.0.0.1:5000/app:-bad", "tag `-bad`"),
            ("127.0.0.1:99999/app", "host[:port]"),
            ("127.0.0.1:5000/app@sha256:12", "sha256:12"),
            ("", "empty"),
        ] {
            let err = text.parse::<Reference>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn locations_parse_transports() {
        assert_eq!(
            "oci:/tmp/x:v1".parse::<Location>().unwrap(),
            Location::Layout {
                path: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            "oci:relative/dir".parse::<Location>().unwrap(),
            Location::Layout {
                path: "relative/dir".into(),
                tag: None
            }
        );
        assert!(matches!(
            "docker-archive:/tmp/a.tar".parse::<Location>().unwrap(),
            Location::DockerArchive { .. }
        ));
        assert!(matches!(
            "docker://127.0.0.1:5000/a:b".parse::<Location>().unwrap(),
            Location::Registry(_)
        ));
        let err = "ftp:/x".parse::<Location>().unwrap_err().to_string();
        assert!(err.contains("unknown transport"), "{err}");
    }
}
