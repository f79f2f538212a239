//! `--creds`: which registry each credential may be offered to.
//!
//! A credential goes to the registry it names (`HOST=USER:PASS`) and to no
//! other. A bare `USER:PASS` names none; it is accepted only where the
//! command line itself names every registry the command talks to (`push`,
//! `pull`, `referrers`, `verify`), and is for those. Where a spec chooses
//! the registries (`build`, `serve`) a bare credential would be offered to
//! whatever host a spec names, so it is refused (issue #12: a step
//! `image: ATTACKER/x` received the production password).

use custody_oci::RegistryHost;
use custody_oci::registry::CredentialSource;
use custody_oci::registry::auth::{CredsArg, HostCredentials};

/// Which registries a bare `--creds USER:PASS` is for.
pub(crate) enum Bare {
    /// The registries named on this command line (source, destination, image).
    NamedHere(Vec<RegistryHost>),
    /// None: a spec chooses the registries of `custody COMMAND`, so every
    /// credential must name its host.
    Refused { command: &'static str },
}

/// A `--creds` that names no registry where a spec chooses them (exit 2).
#[derive(Debug, thiserror::Error)]
#[error(
    "`custody {command} --creds USER:PASS` names no registry: a build's spec chooses the registries, and a credential is only ever offered to the one it names"
)]
pub(crate) struct Unscoped {
    command: &'static str,
}

impl Unscoped {
    pub(crate) fn hint(&self) -> String {
        "write `--creds HOST=USER:PASS` (repeatable), HOST as references name the registry, e.g. `--creds registry.example.org:5000=alice:PASSWORD`".into()
    }
}

/// The credentials `creds` (the `--creds` values) give, or the auth files.
pub(crate) fn source(
    creds: &[String],
    authfile: Option<&std::path::Path>,
    bare: Bare,
) -> anyhow::Result<CredentialSource> {
    if creds.is_empty() {
        return Ok(match authfile {
            Some(file) => CredentialSource::File(file.to_owned()),
            None => CredentialSource::Default,
        });
    }
    let mut scoped = HostCredentials::default();
    let mut unscoped = None;
    for text in creds {
        match CredsArg::parse(text)? {
            CredsArg::ForHost(host, credential) => scoped.insert(host, credential)?,
            CredsArg::Bare(credential) => {
                if unscoped.replace(credential).is_some() {
                    return Err(custody_oci::Error::InvalidCreds {
                        reason: "more than one names no registry".into(),
                    }
                    .into());
                }
            }
        }
    }
    if let Some(credential) = unscoped {
        let hosts = match bare {
            Bare::NamedHere(hosts) => hosts,
            Bare::Refused { command } => return Err(Unscoped { command }.into()),
        };
        // A host named with its own `HOST=` keeps that one.
        for host in hosts {
            if !scoped.contains(&host) {
                scoped.insert(host, credential.clone())?;
            }
        }
    }
    Ok(CredentialSource::PerHost(scoped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_oci::registry::Credential;

    fn lookup(source: &CredentialSource, host: &str) -> Option<String> {
        match source.lookup(host).unwrap()? {
            Credential::UserPassword { user, .. } => Some(user),
            Credential::IdentityToken(_) => None,
        }
    }

    fn creds(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    #[test]
    fn a_credential_goes_to_the_host_it_names_only() {
        let source = source(
            &creds(&["registry.example:5000=alice:pw=1:x", "Other.Example=bob:pw"]),
            None,
            Bare::Refused { command: "build" },
        )
        .unwrap();
        assert_eq!(
            lookup(&source, "registry.example:5000").as_deref(),
            Some("alice")
        );
        assert_eq!(lookup(&source, "other.example").as_deref(), Some("bob"));
        for elsewhere in [
            "registry.example",
            "registry.example:5001",
            "attacker.example",
        ] {
            assert_eq!(lookup(&source, elsewhere), None, "{elsewhere}");
        }
    }

    #[test]
    fn a_bare_credential_is_for_the_hosts_on_the_command_line() {
        let named = vec![
            "a.example:5000".parse().unwrap(),
            "b.example".parse().unwrap(),
        ];
        let source = source(
            &creds(&["alice:pw", "b.example=bob:pw"]),
            None,
            Bare::NamedHere(named),
        )
        .unwrap();
        assert_eq!(lookup(&source, "a.example:5000").as_deref(), Some("alice"));
        assert_eq!(lookup(&source, "b.example").as_deref(), Some("bob"));
        assert_eq!(lookup(&source, "attacker.example"), None);
    }

    #[test]
    fn a_bare_credential_is_refused_where_a_spec_names_the_hosts() {
        let err = source(
            &creds(&["alice:s3cret"]),
            None,
            Bare::Refused { command: "serve" },
        )
        .unwrap_err();
        let unscoped = err.downcast_ref::<Unscoped>().expect("refused as unscoped");
        assert!(unscoped.hint().contains("--creds HOST=USER:PASS"));
        assert!(!format!("{err:?}").contains("s3cret"));
    }

    #[test]
    fn bad_values_are_refused_without_repeating_them() {
        for values in [
            &["registry.example=s3cret"][..],
            &["s3cret"],
            &["a.example=alice:s3cret", "A.example=bob:s3cret"],
            &["alice:s3cret", "bob:s3cret"],
        ] {
            let err = source(&creds(values), None, Bare::NamedHere(Vec::new())).unwrap_err();
            let shown = format!("{err:#} {err:?}");
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(
                err.downcast_ref::<custody_oci::Error>()
                    .is_some_and(custody_oci::Error::is_usage),
                "{shown}"
            );
        }
    }
}
