//! Source URLs that carry no secrets.
//!
//! A source URL is recorded in the store and signed into the provenance;
//! `https://user:token@host/repo.git` would publish the token with every
//! build. A [`GitUrl`] cannot hold credentials: a password anywhere, or a
//! user name on `http(s)://` (where it is a token as often as not), is
//! refused when the URL is parsed. User names stay allowed where they are
//! an account, not a secret: `ssh://git@host/repo`, `git@host:repo`.

use std::fmt;

/// A git repository location without credentials: a URL (`https`, `http`,
/// `ssh`, `git`, `file`), scp-like `[user@]host:path`, or a local path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GitUrl(String);

/// Where a [`GitUrl`] leads: its transport, and the host and port it
/// connects to (none for `file`, which covers local paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `https`, `http`, `ssh`, `git`, `file`, or the URL's own scheme.
    pub scheme: String,
    pub host: Option<String>,
    pub port: Option<u16>,
}

/// Why a source URL was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GitUrlError {
    /// The URL holds a password or token.
    #[error(
        "source `{redacted}` carries credentials in its URL; they would be stored and signed into every build's provenance"
    )]
    Credentials {
        /// The URL with its user information replaced by `***`.
        redacted: String,
    },
    /// Nothing to fetch from.
    #[error("the source URL is empty")]
    Empty,
    /// Not something git can fetch.
    #[error("source `{url}` is not a git URL: {reason}")]
    Invalid { url: String, reason: String },
}

impl GitUrlError {
    /// What to do instead.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            GitUrlError::Credentials { .. } => Some(
                "remove the user and password (or token) from the URL: custody never records secrets in source URLs; give the daemon read access to the repository instead",
            ),
            _ => None,
        }
    }
}

impl GitUrl {
    pub fn parse(text: &str) -> Result<Self, GitUrlError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(GitUrlError::Empty);
        }
        if text.chars().any(char::is_control) {
            return Err(GitUrlError::Invalid {
                url: text.escape_default().to_string(),
                reason: "it holds control characters".into(),
            });
        }
        if let Some((scheme, _)) = text.split_once("://") {
            let url = url::Url::parse(text).map_err(|e| GitUrlError::Invalid {
                url: redact(text),
                reason: e.to_string(),
            })?;
            let web = matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https");
            if url.password().is_some() || (web && !url.username().is_empty()) {
                return Err(GitUrlError::Credentials {
                    redacted: redact(text),
                });
            }
            return Ok(Self(text.to_owned()));
        }
        // scp-like `user@host:path`: a user name, never `user:password@`.
        if let Some((user, _)) = text.split_once('@')
            && !text.starts_with('/')
            && user.contains(':')
        {
            return Err(GitUrlError::Credentials {
                redacted: redact(text),
            });
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The transport, host and port git will use for this URL.
    pub fn endpoint(&self) -> Endpoint {
        let text = self.0.as_str();
        if text.contains("://")
            && let Ok(url) = url::Url::parse(text)
        {
            let scheme = url.scheme().to_ascii_lowercase();
            let port = url.port().or(match scheme.as_str() {
                "https" => Some(443),
                "http" => Some(80),
                "ssh" => Some(22),
                "git" => Some(9418),
                _ => None,
            });
            let host = url
                .host_str()
                .filter(|h| !h.is_empty() && scheme != "file")
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned());
            return Endpoint {
                port: host.as_ref().and(port),
                scheme,
                host,
            };
        }
        // git's rule: `host:path` is ssh when the colon comes before any
        // slash; `[v6]:path` and `user@[v6]:path` bracket the host.
        let colon = match text.find('[') {
            Some(open) if !text[..open].contains('/') => {
                text[open..].find("]:").map(|close| open + close + 1)
            }
            _ => text.find(':'),
        };
        let slash = text.find('/');
        match colon {
            Some(colon) if slash.is_none_or(|slash| colon < slash) => {
                let authority = &text[..colon];
                let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Endpoint {
                    scheme: "ssh".into(),
                    host: Some(host.to_owned()),
                    port: Some(22),
                }
            }
            _ => Endpoint {
                scheme: "file".into(),
                host: None,
                port: None,
            },
        }
    }
}

impl fmt::Display for GitUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for GitUrl {
    type Err = GitUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl AsRef<str> for GitUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// `text` with whatever precedes the host's `@` replaced by `***`.
fn redact(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), text),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_without_secrets_parse() {
        for url in [
            "https://example.org/team/app.git",
            "http://127.0.0.1:3000/app",
            "ssh://git@example.org/team/app.git",
            "git@example.org:team/app.git",
            "git://example.org/app",
            "file:///srv/git/app.git",
            "/srv/git/app.git",
        ] {
            assert_eq!(GitUrl::parse(url).unwrap().as_str(), url);
        }
    }

    #[test]
    fn credentials_are_refused_and_never_repeated() {
        for (url, shown) in [
            (
                "https://alice:s3cret@example.org/app.git",
                "https://***@example.org/app.git",
            ),
            (
                "https://ghp_tok3n@example.org/app.git",
                "https://***@example.org/app.git",
            ),
            (
                "ssh://git:s3cret@example.org/app.git",
                "ssh://***@example.org/app.git",
            ),
            (
                "alice:s3cret@example.org:app.git",
                "***@example.org:app.git",
            ),
        ] {
            let err = GitUrl::parse(url).unwrap_err();
            assert_eq!(
                err,
                GitUrlError::Credentials {
                    redacted: shown.into()
                }
            );
            let text = err.to_string();
            assert!(
                !text.contains("s3cret") && !text.contains("tok3n"),
                "{text}"
            );
            assert!(err.hint().unwrap().contains("remove"));
        }
        assert_eq!(GitUrl::parse("  "), Err(GitUrlError::Empty));
    }

    #[test]
    fn endpoints_say_where_git_connects() {
        for (url, scheme, host, port) in [
            (
                "https://example.org/app.git",
                "https",
                Some("example.org"),
                Some(443),
            ),
            (
                "http://127.0.0.1:3000/app",
                "http",
                Some("127.0.0.1"),
                Some(3000),
            ),
            (
                "ssh://git@example.org:2222/app",
                "ssh",
                Some("example.org"),
                Some(2222),
            ),
            (
                "git@example.org:team/app.git",
                "ssh",
                Some("example.org"),
                Some(22),
            ),
            ("[::1]:team/app.git", "ssh", Some("::1"), Some(22)),
            (
                "git://example.org/app",
                "git",
                Some("example.org"),
                Some(9418),
            ),
            ("file:///srv/git/app.git", "file", None, None),
            ("/root/secretrepo", "file", None, None),
            ("./here:there", "file", None, None),
            (
                "HTTPS://EXAMPLE.org/x",
                "https",
                Some("example.org"),
                Some(443),
            ),
        ] {
            let endpoint = GitUrl::parse(url).unwrap().endpoint();
            assert_eq!(
                (
                    endpoint.scheme.as_str(),
                    endpoint.host.as_deref(),
                    endpoint.port
                ),
                (scheme, host, port),
                "{url}"
            );
        }
    }
}
