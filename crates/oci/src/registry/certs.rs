//! Per-host TLS material from `certs.d` directories, as Docker and
//! containers/image read them: `<dir>/<host[:port]>/*.crt` are extra CA
//! roots, `*.cert` + `*.key` (same stem) are a client certificate pair.

use std::path::{Path, PathBuf};

use fs_err as fs;

use crate::Error;

/// The TLS material found for one host.
#[derive(Clone, Default)]
pub struct HostTls {
    /// The directory it came from, for messages.
    pub dir: Option<PathBuf>,
    /// PEM-encoded CA certificates, one entry per `.crt` file.
    pub roots: Vec<Vec<u8>>,
    /// PEM certificate chain followed by its PEM private key.
    pub identity: Option<Vec<u8>>,
}

impl std::fmt::Debug for HostTls {
    // The private key never prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTls")
            .field("dir", &self.dir)
            .field("roots", &self.roots.len())
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The certs.d roots to search, in order: the one the user named, custody's
/// own, then Docker's and containers' system directories.
pub fn default_search_path(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = explicit {
        dirs.push(dir.to_owned());
    }
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(config) = config_home {
        dirs.push(config.join("custody").join("certs.d"));
    }
    dirs.push(PathBuf::from("/etc/docker/certs.d"));
    dirs.push(PathBuf::from("/etc/containers/certs.d"));
    dirs
}

/// Loads the TLS material for `host` from the first search directory that
/// has a directory for it. A `.cert` without its `.key`, or the reverse, is
/// an error naming both files.
pub fn load(search: &[PathBuf], host: &str) -> Result<HostTls, Error> {
    let Some(dir) = search
        .iter()
        .map(|root| root.join(host))
        .find(|d| d.is_dir())
    else {
        return Ok(HostTls::default());
    };
    let problem = |reason: String| Error::CertsDir {
        host: host.to_owned(),
        dir: dir.clone(),
        reason,
    };
    let mut names: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    names.sort();

    let mut tls = HostTls {
        dir: Some(dir.clone()),
        ..HostTls::default()
    };
    for path in &names {
        match path.extension().and_then(|e| e.to_str()) {
            Some("crt") => {
                let pem = fs::read(path)?;
                if !contains_pem(&pem, "CERTIFICATE") {
                    return Err(problem(format!(
                        "`{}` holds no PEM certificate",
                        path.display()
                    )));
                }
                tls.roots.push(pem);
            }
            Some("cert") => {
                let key = path.with_extension("key");
                if !key.is_file() {
                    return Err(problem(format!(
                        "client certificate `{}` has no key: `{}` is missing",
                        path.display(),
                        key.display()
                    )));
                }
                if tls.identity.is_none() {
                    let mut identity = fs::read(path)?;
                    let key_pem = fs::read(&key)?;
                    if !contains_pem(&key_pem, "PRIVATE KEY") {
                        return Err(problem(format!(
                            "`{}` holds no PEM private key",
                            key.display()
                        )));
                    }
                    identity.push(b'\n');
                    identity.extend_from_slice(&key_pem);
                    tls.identity = Some(identity);
                }
            }
            Some("key") => {
                let cert = path.with_extension("cert");
                if !cert.is_file() {
                    return Err(problem(format!(
                        "client key `{}` has no certificate: `{}` is missing",
                        path.display(),
                        cert.display()
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(tls)
}

fn contains_pem(bytes: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.contains(label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_client_pair_names_both_files() {
        let root = tempfile::tempdir().unwrap();
        let host = root.path().join("reg.example:5000");
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("client.cert"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let err = load(&[root.path().to_owned()], "reg.example:5000")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client.cert") && err.contains("client.key"),
            "{err}"
        );

        fs::remove_file(host.join("client.cert")).unwrap();
        fs::write(host.join("other.key"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let err = load(&[root.path().to_owned()], "reg.example:5000")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("other.key") && err.contains("other.cert"),
            "{err}"
        );
    }

    #[test]
    fn first_directory_with_the_host_wins() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        fs::create_dir_all(second.path().join("h:1")).unwrap();
        fs::write(
            second.path().join("h:1/ca.crt"),
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let tls = load(&[first.path().to_owned(), second.path().to_owned()], "h:1").unwrap();
        assert_eq!(tls.roots.len(), 1);
        assert!(
            load(&[first.path().to_owned()], "h:1")
                .unwrap()
                .roots
                .is_empty()
        );
    }
}
