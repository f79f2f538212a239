//! What a shared service accepts from the people who submit builds: which
//! sources it fetches, where builds may push, and whether a spec may come
//! with the request instead of from the source. `custody build` runs on its
//! user's own machine and has no policy; `custody serve` always has one.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

use custody_oci::Location;
use custody_source::GitUrl;

/// A service's rules for what it builds; the default is the strictest.
#[derive(Clone, Debug, Default)]
pub struct ServicePolicy {
    pub sources: SourcePolicy,
    pub destinations: DestinationPolicy,
    /// Specs may come with the request (recorded as inline in the
    /// provenance); otherwise each build reads its spec from its source.
    pub allow_inline_specs: bool,
}

/// Sources a service fetches: by transport, and by host, judged on the
/// address connected to.
#[derive(Clone, Debug)]
pub struct SourcePolicy {
    schemes: Vec<String>,
    hosts: custody_net::Policy,
}

/// The transports a service fetches from unless configured otherwise.
pub const DEFAULT_SOURCE_SCHEMES: [&str; 2] = ["https", "ssh"];
const KNOWN_SCHEMES: [&str; 5] = ["https", "http", "ssh", "git", "file"];

impl Default for SourcePolicy {
    fn default() -> Self {
        Self {
            schemes: DEFAULT_SOURCE_SCHEMES.map(str::to_owned).to_vec(),
            hosts: custody_net::Policy::default(),
        }
    }
}

impl SourcePolicy {
    /// `schemes` (empty: the defaults) and `hosts` (`HOST[:PORT]`,
    /// `*.DOMAIN`, `IP`, `CIDR`; empty: any public host).
    pub fn new(schemes: &[String], hosts: &[String]) -> Result<Self, String> {
        let schemes: Vec<String> = if schemes.is_empty() {
            DEFAULT_SOURCE_SCHEMES.map(str::to_owned).to_vec()
        } else {
            schemes
                .iter()
                .map(|s| s.trim().to_ascii_lowercase())
                .collect()
        };
        if let Some(unknown) = schemes
            .iter()
            .find(|s| !KNOWN_SCHEMES.contains(&s.as_str()))
        {
            return Err(format!(
                "`sources.schemes`: `{unknown}` is not a git transport custody fetches; use {}",
                KNOWN_SCHEMES.join(", ")
            ));
        }
        let hosts = custody_net::Policy::new(hosts, Vec::new())
            .map_err(|e| format!("`sources.hosts`: {e}"))?;
        Ok(Self { schemes, hosts })
    }

    /// What can be said of `url` without the network: its transport, and
    /// its host against the list.
    pub fn check(&self, url: &GitUrl) -> Result<(), String> {
        let endpoint = url.endpoint();
        if !self.schemes.contains(&endpoint.scheme) {
            let what = if endpoint.scheme == "file" {
                "local repositories (`file:` and paths)".to_owned()
            } else {
                format!("`{}` sources", endpoint.scheme)
            };
            return Err(format!(
                "this service does not fetch {what}: `sources.schemes` allows {}",
                self.schemes.join(", ")
            ));
        }
        if let Some(host) = &endpoint.host
            && !self.hosts.is_empty()
            && !self.hosts.lists(host, None)
        {
            return Err(format!(
                "this service does not fetch from `{host}`: it is not in `sources.hosts`"
            ));
        }
        Ok(())
    }

    /// Checks `url`, resolves its host and checks the addresses it would
    /// connect to; returns the address git must use (none for `file`).
    pub async fn resolve(&self, url: &GitUrl) -> Result<Option<SocketAddr>, String> {
        self.refusal(url).await.map_err(|refusal| refusal.message)
    }

    /// As [`SourcePolicy::resolve`], telling a refusal from a name that
    /// does not resolve (yet): a submission is refused only for the first.
    pub async fn refusal(&self, url: &GitUrl) -> Result<Option<SocketAddr>, SourceRefusal> {
        let refused = |message| SourceRefusal {
            message,
            unresolved: false,
        };
        self.check(url).map_err(refused)?;
        let endpoint = url.endpoint();
        let (Some(host), Some(port)) = (endpoint.host, endpoint.port) else {
            return Ok(None);
        };
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|_| SourceRefusal {
                message: format!("the source host `{host}` does not resolve"),
                unresolved: true,
            })?
            .collect();
        let own = custody_net::host_addresses();
        let mut refused = None;
        for addr in &addresses {
            match self.hosts.refusal(&host, *addr, &own) {
                None => return Ok(Some(*addr)),
                Some(why) => refused = Some(why),
            }
        }
        Err(match refused {
            Some(why) => SourceRefusal {
                message: format!(
                    "the source host `{host}` {why}; an operator can list it in `sources.hosts`"
                ),
                unresolved: false,
            },
            None => SourceRefusal {
                message: format!("the source host `{host}` does not resolve"),
                unresolved: true,
            },
        })
    }
}

/// Why a source is not fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRefusal {
    pub message: String,
    /// Only because its name does not resolve (now).
    pub unresolved: bool,
}

/// Where builds may push.
#[derive(Clone, Debug, Default)]
pub struct DestinationPolicy {
    /// `HOST[:PORT][/REPOSITORY-PREFIX]`, `*` for any registry; empty: any.
    registries: Vec<String>,
    /// Directories `oci:` destinations may be under; empty: none.
    oci_roots: Vec<PathBuf>,
}

impl DestinationPolicy {
    pub fn new(registries: &[String], oci_roots: &[PathBuf]) -> Result<Self, String> {
        if let Some(root) = oci_roots.iter().find(|r| !r.is_absolute()) {
            return Err(format!(
                "`destinations.oci_roots`: `{}` is not an absolute path",
                root.display()
            ));
        }
        Ok(Self {
            registries: registries
                .iter()
                .map(|r| r.trim().trim_end_matches('/').to_owned())
                .collect(),
            oci_roots: oci_roots.to_vec(),
        })
    }

    /// Whether a build may push to `destination` (resolved: a layout path
    /// is absolute), and the rule that refuses it if not.
    pub fn check(&self, destination: &Location) -> Result<(), String> {
        match destination {
            Location::Registry(reference) => {
                let name = format!("{}/{}", reference.registry(), reference.repository());
                let allowed = self.registries.is_empty()
                    || self.registries.iter().any(|rule| {
                        rule == "*" || name == *rule || name.starts_with(&format!("{rule}/"))
                    });
                if allowed {
                    Ok(())
                } else {
                    Err(format!(
                        "`{name}` is not under `destinations.registries` ({})",
                        self.registries.join(", ")
                    ))
                }
            }
            Location::Layout { path, .. } | Location::DockerArchive { path } => {
                let normal = !path
                    .components()
                    .any(|c| matches!(c, Component::ParentDir | Component::CurDir));
                let under = |root: &PathBuf| path.starts_with(root) && path != root;
                if path.is_absolute() && normal && self.oci_roots.iter().any(under) {
                    return Ok(());
                }
                Err(if self.oci_roots.is_empty() {
                    format!(
                        "`oci:{}`: this service writes no layouts (`destinations.oci_roots` is empty)",
                        path.display()
                    )
                } else {
                    format!(
                        "`oci:{}` is not under `destinations.oci_roots` ({})",
                        path.display(),
                        self.oci_roots
                            .iter()
                            .map(|r| r.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
            }
        }
    }
}

/// A spec path a submitter names: relative, inside the source.
pub fn check_spec_path(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`spec_path` `{path}` must be a relative path inside the source"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> GitUrl {
        GitUrl::parse(text).unwrap()
    }

    #[test]
    fn sources_are_refused_by_transport_and_host() {
        let policy = SourcePolicy::default();
        policy
            .check(&url("https://git.example.org/app.git"))
            .unwrap();
        policy.check(&url("git@git.example.org:app.git")).unwrap();
        for (bad, says) in [
            ("/root/secretrepo", "local repositories"),
            ("file:///root/secretrepo", "local repositories"),
            ("http://git.example.org/app", "`http` sources"),
            ("git://git.example.org/app", "`git` sources"),
        ] {
            let err = policy.check(&url(bad)).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let listed = SourcePolicy::new(&["https".into()], &["*.example.org".into()]).unwrap();
        listed.check(&url("https://git.example.org/app")).unwrap();
        let err = listed.check(&url("https://example.com/app")).unwrap_err();
        assert!(err.contains("not in `sources.hosts`"), "{err}");
        assert!(SourcePolicy::new(&["ftp".into()], &[]).is_err());
        assert!(SourcePolicy::new(&[], &["a b".into()]).is_err());
    }

    #[tokio::test]
    async fn sources_that_resolve_to_the_host_or_its_network_are_refused() {
        let policy = SourcePolicy::default();
        for bad in [
            "https://127.0.0.1/admin/x",
            "https://localhost/x",
            "https://169.254.169.254/latest",
            "https://10.0.0.1/x",
            "https://[::1]/x",
        ] {
            let err = policy.resolve(&url(bad)).await.unwrap_err();
            assert!(err.contains("sources.hosts"), "{bad}: {err}");
        }
        let listed = SourcePolicy::new(&["https".into()], &["127.0.0.1".into()]).unwrap();
        assert_eq!(
            listed
                .resolve(&url("https://127.0.0.1:8443/x"))
                .await
                .unwrap(),
            Some("127.0.0.1:8443".parse().unwrap())
        );
    }

    #[test]
    fn destinations_must_be_under_a_configured_rule() {
        let policy = DestinationPolicy::new(
            &["registry.example:5000/team".into()],
            &[PathBuf::from("/srv/layouts")],
        )
        .unwrap();
        let check = |text: &str| policy.check(&text.parse::<Location>().unwrap());
        check("registry.example:5000/team/app:v1").unwrap();
        check("registry.example:5000/team/sub/app:v1").unwrap();
        check("oci:/srv/layouts/app:v1").unwrap();
        for bad in [
            "registry.example:5000/teamx/app:v1",
            "registry.example:5000/other:v1",
            "elsewhere.example/team/app:v1",
            "oci:/etc/cron.d:v1",
            "oci:/srv/layouts/../../etc:v1",
            "oci:/srv/layouts:v1",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
        let none = DestinationPolicy::default();
        none.check(&"anywhere.example/x:v1".parse().unwrap())
            .unwrap();
        let err = none.check(&"oci:/tmp/x:v1".parse().unwrap()).unwrap_err();
        assert!(err.contains("writes no layouts"), "{err}");
        assert!(DestinationPolicy::new(&[], &[PathBuf::from("rel")]).is_err());
    }

    #[test]
    fn spec_paths_stay_inside_the_source() {
        check_spec_path("custody.yaml").unwrap();
        check_spec_path("ci/custody.yaml").unwrap();
        for bad in ["", "/etc/passwd", "../x", "ci/../../x", "./custody.yaml"] {
            assert!(check_spec_path(bad).is_err(), "{bad}");
        }
    }
}
