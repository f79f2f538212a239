//! Registry authentication: credentials from the places Docker and podman
//! users keep them, and the `WWW-Authenticate` challenge that decides
//! between Basic and Bearer tokens (distribution's token spec).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::{Error, RegistryHost};

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a user proves themselves with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    UserPassword {
        user: String,
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken` in docker's config).
    IdentityToken(Secret),
}

impl Credential {
    fn user(&self) -> Option<String> {
        match self {
            Credential::UserPassword { user, .. } => Some(user.clone()),
            Credential::IdentityToken(_) => None,
        }
    }
}

/// Credentials, each for one registry: a host not named gets none. A
/// credential is never offered to another host than its own, whatever a
/// spec or a registry's answer names.
#[derive(Clone, Debug, Default)]
pub struct HostCredentials(HashMap<RegistryHost, Credential>);

impl HostCredentials {
    /// Adds `credential` for `host`; a host named twice is refused, as there
    /// is no telling which was meant.
    pub fn insert(&mut self, host: RegistryHost, credential: Credential) -> Result<(), Error> {
        if self.0.contains_key(&host) {
            return Err(Error::InvalidCreds {
                reason: format!("`{host}` is named more than once"),
            });
        }
        self.0.insert(host, credential);
        Ok(())
    }

    pub fn contains(&self, host: &RegistryHost) -> bool {
        self.0.contains_key(host)
    }

    /// The credential for `host` (`host[:port]` as a client talks to it),
    /// if one was given for that very registry.
    pub fn get(&self, host: &str) -> Option<&Credential> {
        self.0.get(&host.parse::<RegistryHost>().ok()?)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(RegistryHost, Credential)> for HostCredentials {
    fn from_iter<I: IntoIterator<Item = (RegistryHost, Credential)>>(pairs: I) -> Self {
        Self(pairs.into_iter().collect())
    }
}

/// Where to look for credentials. Every source answers by host: there is
/// no credential for every registry.
#[derive(Clone, Debug, Default)]
pub enum CredentialSource {
    /// Exactly these, by host; any other host is anonymous. `--creds
    /// HOST=USER:PASS`, or what a runner gets from the daemon for one job.
    PerHost(HostCredentials),
    /// `--authfile FILE`: a docker `config.json` or containers `auth.json`.
    File(PathBuf),
    /// `$REGISTRY_AUTH_FILE`, containers' `auth.json`, then docker's `config.json`.
    #[default]
    Default,
}

impl CredentialSource {
    /// Finds the credential for `host` (blocking: credential helpers are
    /// separate programs).
    pub fn lookup(&self, host: &str) -> Result<Option<Credential>, Error> {
        match self {
            CredentialSource::PerHost(credentials) => Ok(credentials.get(host).cloned()),
            CredentialSource::File(path) => {
                if !path.is_file() {
                    return Err(Error::Credentials {
                        host: host.to_owned(),
                        reason: format!("auth file `{}` does not exist", path.display()),
                    });
                }
                lookup_in_file(path, host)
            }
            CredentialSource::Default => {
                for path in default_auth_files() {
                    if path.is_file()
                        && let Some(found) = lookup_in_file(&path, host)?
                    {
                        return Ok(Some(found));
                    }
                }
                Ok(None)
            }
        }
    }
}

impl CredentialSource {
    /// The files this source reads credentials from, those that exist:
    /// what a daemon must keep out of every build step's sight.
    pub fn files(&self) -> Vec<PathBuf> {
        let candidates = match self {
            CredentialSource::File(path) => vec![path.clone()],
            CredentialSource::Default => default_auth_files(),
            CredentialSource::PerHost(_) => Vec::new(),
        };
        candidates.into_iter().filter(|p| p.exists()).collect()
    }
}

fn default_auth_files() -> Vec<PathBuf> {
    let env = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let mut files = Vec::new();
    if let Some(path) = env("REGISTRY_AUTH_FILE") {
        files.push(path);
    }
    if let Some(dir) = env("XDG_RUNTIME_DIR") {
        files.push(dir.join("containers/auth.json"));
    }
    let home = env("HOME");
    if let Some(config) =
        env("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config")))
    {
        files.push(config.join("containers/auth.json"));
    }
    if let Some(dir) = env("DOCKER_CONFIG") {
        files.push(dir.join("config.json"));
    } else if let Some(home) = home {
        files.push(home.join(".docker/config.json"));
    }
    files
}

fn lookup_in_file(path: &std::path::Path, host: &str) -> Result<Option<Credential>, Error> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    // Docker keys Hub credentials by its legacy URL; others by host, with or
    // without a scheme.
    let mut keys = vec![
        host.to_owned(),
        format!("https://{host}"),
        format!("http://{host}"),
    ];
    if host == "docker.io" || host == "registry-1.docker.io" {
        keys.insert(0, "https://index.docker.io/v1/".to_owned());
        keys.push("index.docker.io".to_owned());
        keys.push("docker.io".to_owned());
    }
    let bytes = fs_err::read(path)?;
    let helper_name = |key: &str| -> String {
        let config: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        config
            .pointer(&format!(
                "/credHelpers/{}",
                key.replace('~', "~0").replace('/', "~1")
            ))
            .or_else(|| config.get("credsStore"))
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned()
    };
    for key in keys {
        match docker_credential::get_credential_from_reader(bytes.as_slice(), &key) {
            Ok(DockerCredential::UsernamePassword(user, password)) => {
                return Ok(Some(Credential::UserPassword {
                    user,
                    password: Secret::new(password),
                }));
            }
            Ok(DockerCredential::IdentityToken(token)) => {
                return Ok(Some(Credential::IdentityToken(Secret::new(token))));
            }
            Err(E::NoCredentialConfigured) => continue,
            Err(E::ConfigReadError) => {
                return Err(Error::Credentials {
                    host: host.to_owned(),
                    reason: format!("`{}` is not a valid auth file", path.display()),
                });
            }
            Err(E::HelperCommunicationError) => {
                return Err(Error::Credentials {
                    host: host.to_owned(),
                    reason: format!(
                        "cannot run credential helper `docker-credential-{}` named in `{}`; is it installed and on PATH?",
                        helper_name(&key),
                        path.display()
                    ),
                });
            }
            // The helper's standard answer for a host it has nothing for:
            // go on, as docker does, and try anonymous access.
            Err(E::HelperFailure { stdout, .. }) if stdout.contains("credentials not found") => {
                continue;
            }
            Err(E::HelperFailure { helper, .. }) => {
                // Its output may hold secrets: name it, do not echo it.
                return Err(Error::Credentials {
                    host: host.to_owned(),
                    reason: format!(
                        "credential helper `{helper}` (from `{}`) failed",
                        path.display()
                    ),
                });
            }
            Err(other) => {
                return Err(Error::Credentials {
                    host: host.to_owned(),
                    reason: format!("from `{}`: {other:?}", path.display()),
                });
            }
        }
    }
    Ok(None)
}

/// One `--creds` value. The value itself is never repeated in an error:
/// it holds a password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredsArg {
    /// `HOST=USER:PASS`: for that registry only.
    ForHost(RegistryHost, Credential),
    /// `USER:PASS`, naming no registry: the caller decides which hosts it is
    /// for (those its command line names), or refuses it.
    Bare(Credential),
}

impl CredsArg {
    /// `HOST=USER:PASS` when the text before the first `=` is a
    /// `host[:port]`, else `USER:PASS`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if let Some((host, rest)) = text.split_once('=')
            && let Ok(host) = host.parse::<RegistryHost>()
        {
            let credential = parse_creds(rest).map_err(|_| Error::InvalidCreds {
                reason: format!("the value for `{host}` is not `{host}=USER:PASSWORD`"),
            })?;
            return Ok(CredsArg::ForHost(host, credential));
        }
        Ok(CredsArg::Bare(parse_creds(text)?))
    }
}

/// Parses `USER:PASS`.
pub fn parse_creds(text: &str) -> Result<Credential, Error> {
    match text.split_once(':') {
        Some((user, password)) if !user.is_empty() => Ok(Credential::UserPassword {
            user: user.to_owned(),
            password: Secret::new(password),
        }),
        _ => Err(Error::InvalidCreds {
            reason: "it is neither `HOST=USER:PASSWORD` nor `USER:PASSWORD`".into(),
        }),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

impl Challenge {
    /// Parses the first challenge custody understands from a header value.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Some(Challenge::Basic),
            "bearer" => {
                let params = parse_params(params);
                Some(Challenge::Bearer {
                    realm: params.get("realm")?.clone(),
                    service: params.get("service").cloned(),
                })
            }
            _ => None,
        }
    }
}

/// `key="value", key=value` pairs, values possibly quoted with escapes.
fn parse_params(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, value);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    params
}

/// The access a request needs, in the token spec's scope syntax.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope(Vec<String>);

impl Scope {
    pub fn pull(repository: &str) -> Self {
        Self(vec![format!("repository:{repository}:pull")])
    }
    pub fn push(repository: &str) -> Self {
        Self(vec![format!("repository:{repository}:pull,push")])
    }
    /// Push to `repository` plus pull from `from`, for cross-repository mounts.
    pub fn push_mounting(repository: &str, from: &str) -> Self {
        let mut scope = Self::push(repository);
        if from != repository {
            scope.0.push(format!("repository:{from}:pull"));
        }
        scope
    }
    /// `/v2/` itself needs no repository access.
    pub fn none() -> Self {
        Self(Vec::new())
    }
}

/// Authentication state for one registry host, shared by all requests to it.
pub struct Authenticator {
    host: String,
    credential: Option<Credential>,
    challenge: Mutex<Option<Challenge>>,
    tokens: Mutex<HashMap<Scope, (Secret, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Authenticator {
    pub fn new(host: String, credential: Option<Credential>) -> Self {
        Self {
            host,
            credential,
            challenge: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub fn user(&self) -> Option<String> {
        self.credential.as_ref().and_then(Credential::user)
    }

    /// Records the registry's challenge; a fresh challenge also drops the
    /// cached token for `scope`, which the registry just refused.
    pub async fn challenged(&self, header: Option<&str>, scope: &Scope) -> bool {
        let challenge = header.and_then(Challenge::parse);
        let known = challenge.is_some();
        *self.challenge.lock().await = challenge;
        self.tokens.lock().await.remove(scope);
        known
    }

    pub async fn has_challenge(&self) -> bool {
        self.challenge.lock().await.is_some()
    }

    /// The `Authorization` header for a request needing `scope`, if the
    /// registry asked for one.
    pub async fn header(
        &self,
        http: &reqwest::Client,
        scope: &Scope,
    ) -> Result<Option<HeaderValue>, Error> {
        let challenge = self.challenge.lock().await.clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => match &self.credential {
                Some(Credential::UserPassword { user, password }) => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .encode(format!("{user}:{}", password.expose()));
                    Ok(Some(sensitive(&format!("Basic {raw}"))))
                }
                Some(Credential::IdentityToken(_)) => Err(self.refused(
                    "the registry asks for a password, but the credential is an identity token"
                        .into(),
                )),
                None => Err(self
                    .refused("the registry requires a login and no credentials were found".into())),
            },
            Some(Challenge::Bearer { realm, service }) => {
                if let Some((token, expires)) = self.tokens.lock().await.get(scope)
                    && Instant::now() < *expires
                {
                    return Ok(Some(sensitive(&format!("Bearer {}", token.expose()))));
                }
                let (token, lifetime) = self
                    .fetch_token(http, &realm, service.as_deref(), scope)
                    .await?;
                // Renew a little early so a token never expires mid-request.
                let expires = Instant::now()
                    + lifetime
                        .saturating_sub(Duration::from_secs(10))
                        .max(Duration::from_secs(1));
                let header = sensitive(&format!("Bearer {}", token.expose()));
                self.tokens
                    .lock()
                    .await
                    .insert(scope.clone(), (token, expires));
                Ok(Some(header))
            }
        }
    }

    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        realm: &str,
        service: Option<&str>,
        scope: &Scope,
    ) -> Result<(Secret, Duration), Error> {
        let realm_url = url::Url::parse(realm).map_err(|e| Error::Protocol {
            host: self.host.clone(),
            action: "the authentication challenge".into(),
            detail: format!("token realm `{realm}` is not a URL: {e}"),
        })?;
        let realm_host = realm_url.host_str().unwrap_or_default().to_owned();
        let action = format!("a token request to `{realm_host}`");
        let request = match &self.credential {
            Some(Credential::IdentityToken(refresh)) => {
                // OAuth2 refresh-token grant (distribution's token spec, "oauth").
                let mut form = vec![
                    ("grant_type", "refresh_token".to_owned()),
                    ("refresh_token", refresh.expose().to_owned()),
                    ("client_id", "custody".to_owned()),
                ];
                if let Some(service) = service {
                    form.push(("service", service.to_owned()));
                }
                form.push(("scope", scope.0.join(" ")));
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form)
                    .finish();
                http.post(realm_url)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body)
            }
            other => {
                let mut url = realm_url;
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    for s in &scope.0 {
                        query.append_pair("scope", s);
                    }
                }
                let request = http.get(url);
                match other {
                    Some(Credential::UserPassword { user, password }) => {
                        request.basic_auth(user, Some(password.expose()))
                    }
                    _ => request,
                }
            }
        };
        let response = request.send().await.map_err(|e| Error::Transport {
            host: realm_host.clone(),
            action: action.clone(),
            detail: super::describe(&e),
        })?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(self.refused(format!("the token server `{realm_host}` answered {status}")));
        }
        if !status.is_success() {
            return Err(Error::Registry {
                host: realm_host,
                action,
                status: status.as_u16(),
                detail: super::error_detail(response).await,
            });
        }
        let body: TokenResponse = response.json().await.map_err(|e| Error::Protocol {
            host: realm_host.clone(),
            action: action.clone(),
            detail: format!("the token response is not valid JSON: {}", e.without_url()),
        })?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Protocol {
                host: realm_host,
                action,
                detail: "the token response holds no token".into(),
            })?;
        // The spec's default lifetime is 60 seconds.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        Ok((Secret::new(token), lifetime))
    }

    pub fn refused(&self, detail: String) -> Error {
        Error::Unauthorized {
            host: self.host.clone(),
            user: self.user(),
            detail,
        }
    }
}

fn sensitive(value: &str) -> HeaderValue {
    let mut header = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""));
    header.set_sensitive(true);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into())
            })
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None);
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    #[test]
    fn secrets_do_not_print() {
        let credential = parse_creds("alice:hunter2").unwrap();
        assert!(!format!("{credential:?}").contains("hunter2"));
        assert!(parse_creds("nouser").is_err());
    }

    #[test]
    fn auth_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw");
        fs_err::write(
            &path,
            format!(r#"{{"auths":{{"reg.example:5000":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let source = CredentialSource::File(path);
        assert_eq!(
            source.lookup("reg.example:5000").unwrap(),
            Some(Credential::UserPassword {
                user: "bob".into(),
                password: Secret::new("pw")
            })
        );
        assert_eq!(source.lookup("other:5000").unwrap(), None);
    }

    /// How docker's keys match: a scheme and a path are dropped from a key
    /// that has a scheme, Docker Hub's names are one, nothing else is
    /// loosened; a key with a path and no scheme (podman's per-repository
    /// form) is offered to no host at all rather than to a wrong one.
    #[test]
    fn auth_file_entries_go_to_their_own_host_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth =
            |who: &str| base64::engine::general_purpose::STANDARD.encode(format!("{who}:pw"));
        fs_err::write(
            &path,
            serde_json::json!({"auths": {
                "https://index.docker.io/v1/": {"auth": auth("hub")},
                "https://reg.example:5000/v1/": {"auth": auth("scheme")},
                "plain.example": {"auth": auth("plain")},
                "team.example:5000/team": {"auth": auth("pathed")},
            }})
            .to_string(),
        )
        .unwrap();
        let source = CredentialSource::File(path);
        let user = |host: &str| {
            source.lookup(host).unwrap().map(|c| match c {
                Credential::UserPassword { user, .. } => user,
                Credential::IdentityToken(_) => "token".into(),
            })
        };
        assert_eq!(user("registry-1.docker.io").as_deref(), Some("hub"));
        assert_eq!(user("docker.io").as_deref(), Some("hub"));
        assert_eq!(user("reg.example:5000").as_deref(), Some("scheme"));
        assert_eq!(user("plain.example").as_deref(), Some("plain"));
        for elsewhere in [
            "index.docker.io.attacker.example",
            "reg.example",
            "reg.example:5001",
            "plain.example:443",
            "team.example:5000",
            "team.example",
            "attacker.example",
            "127.0.0.1:5000",
        ] {
            assert_eq!(user(elsewhere), None, "{elsewhere}");
        }
    }

    #[test]
    fn creds_values_name_their_host() {
        let host = |text: &str| text.parse::<RegistryHost>().unwrap();
        assert_eq!(
            CredsArg::parse("reg.example:5000=alice:pa=ss:word").unwrap(),
            CredsArg::ForHost(
                host("reg.example:5000"),
                Credential::UserPassword {
                    user: "alice".into(),
                    password: Secret::new("pa=ss:word")
                }
            )
        );
        assert!(matches!(
            CredsArg::parse("alice:pa=ss").unwrap(),
            CredsArg::Bare(Credential::UserPassword { user, .. }) if user == "alice"
        ));
        let err = CredsArg::parse("reg.example=hunter2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reg.example") && !err.contains("hunter2"),
            "{err}"
        );
        let credentials: HostCredentials = [(host("docker.io"), parse_creds("a:b").unwrap())]
            .into_iter()
            .collect();
        assert!(credentials.get("registry-1.docker.io").is_some());
        assert!(credentials.get("docker.io.attacker.example").is_none());
    }
}
