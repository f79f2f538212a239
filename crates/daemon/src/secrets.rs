//! Build secrets: named values a step asks for by name (`secrets: [NAME]`
//! gives it `/run/secrets/NAME`; `env: { VAR: { secret: NAME } }` an
//! environment variable). They are defined outside the spec: by the
//! operator in `custody serve`'s configuration, each with the source
//! repositories allowed to use it, or by the user of `custody build` with
//! `--secret NAME=file:PATH|env:VAR`.
//!
//! A value is read when a build that uses it is planned, held in a
//! [`Secret`] that never prints, and put on the wire to the runner for the
//! steps that asked for it only. It is never stored, logged or signed: the
//! runner replaces it (and its base64 and URL-encoded forms) with `***` in
//! the log, and the provenance names the secrets each step received,
//! nothing of their values.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use custody_source::GitUrl;

use crate::spec::{SecretUse, Spec};

/// A secret's value. It never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place it goes: the runner's job.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a secret's value is read from, when a build needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// A file on the daemon's machine (hidden from steps).
    File(PathBuf),
    /// An environment variable of the daemon.
    Env(String),
}

impl SecretSource {
    /// `file:PATH` or `env:VAR`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
            Some(("env", var)) if !var.is_empty() && !var.contains('=') => {
                Ok(Self::Env(var.to_owned()))
            }
            _ => Err(format!(
                "`{text}` is not a secret source: use `file:PATH` or `env:VAR`"
            )),
        }
    }

    /// The value now.
    pub fn read(&self) -> Result<Secret, String> {
        let value = match self {
            SecretSource::File(path) => fs_err::read(path).map_err(|e| e.to_string())?,
            SecretSource::Env(var) => std::env::var_os(var)
                .ok_or_else(|| format!("the environment variable `{var}` is not set"))?
                .into_encoded_bytes(),
        };
        if value.is_empty() {
            return Err("it is empty".into());
        }
        Ok(Secret::new(value))
    }
}

/// The source repositories allowed to use a secret: glob patterns on the
/// git URL as submitted (`*` stays within a path segment, `**` crosses
/// them).
#[derive(Clone, Debug)]
pub struct SourcePatterns {
    patterns: Vec<String>,
    set: globset::GlobSet,
}

impl SourcePatterns {
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut set = globset::GlobSetBuilder::new();
        for pattern in patterns {
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("`{pattern}` is not a glob pattern: {e}"))?;
            set.add(glob);
        }
        Ok(Self {
            patterns: patterns.to_vec(),
            set: set.build().map_err(|e| e.to_string())?,
        })
    }

    /// Whether `url` may use the secret. A URL whose path git (or curl)
    /// would rewrite — `.` or `..` segments, percent-escapes, a query or
    /// fragment, backslashes — matches nothing: `team/x/../../other` is not
    /// in `team/*`, whatever the glob says.
    pub fn allows(&self, url: &GitUrl) -> bool {
        let text = url.as_str();
        let rewritten = text.contains(['%', '?', '#', '\\'])
            || text
                .split('/')
                .skip(1)
                .any(|segment| segment == "." || segment == "..");
        !rewritten && self.set.is_match(text)
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

/// One defined secret.
#[derive(Clone, Debug)]
pub struct SecretDefinition {
    pub source: SecretSource,
    /// `None`: any build may use it (`custody build`, on its user's own
    /// machine); a service always lists the repositories.
    pub allowed: Option<SourcePatterns>,
}

/// Every secret a daemon can give builds, by name.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    defined: BTreeMap<String, SecretDefinition>,
}

/// Why a spec may not have a secret it names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretRefusal {
    /// No secret of that name is defined.
    #[error("`{name}` is not a secret this daemon defines{}", known_list(known))]
    Unknown {
        name: String,
        line: u64,
        column: u64,
        known: Vec<String>,
    },
    /// The secret exists, but not for this source.
    #[error("the secret `{name}` may not be used by builds of `{source_url}`")]
    NotAllowed {
        name: String,
        source_url: String,
        line: u64,
        column: u64,
    },
    /// The spec came with the request: its commands are the submitter's,
    /// not the source's, whatever source it names.
    #[error(
        "the secret `{name}` is only for specs read from an allowed source; this spec came with the request"
    )]
    InlineSpec {
        name: String,
        line: u64,
        column: u64,
    },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        " (it defines none)".to_owned()
    } else {
        format!(
            "; defined: {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

impl SecretRefusal {
    /// Where in the spec the secret is named.
    pub fn location(&self) -> (u64, u64) {
        match self {
            SecretRefusal::Unknown { line, column, .. }
            | SecretRefusal::NotAllowed { line, column, .. }
            | SecretRefusal::InlineSpec { line, column, .. } => (*line, *column),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            SecretRefusal::Unknown { name, .. }
            | SecretRefusal::NotAllowed { name, .. }
            | SecretRefusal::InlineSpec { name, .. } => name,
        }
    }
}

/// Whether `name` can be a secret's name: it becomes a file name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Secrets {
    /// Defines `name`; names are letters, digits, `-`, `_` and `.`.
    pub fn define(&mut self, name: &str, definition: SecretDefinition) -> Result<(), String> {
        if !valid_name(name) {
            return Err(format!(
                "`{name}` is not a secret name: use letters, digits, `-`, `_` or `.`"
            ));
        }
        if self.defined.insert(name.to_owned(), definition).is_some() {
            return Err(format!("the secret `{name}` is defined twice"));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.defined.is_empty()
    }

    /// The files values are read from: steps must not see them.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.defined.values().filter_map(|d| match &d.source {
            SecretSource::File(path) => Some(path.as_path()),
            SecretSource::Env(_) => None,
        })
    }

    /// Whether every secret `spec` names is defined and allowed for a
    /// build of `source` (`None`: a local directory, allowed only where
    /// secrets have no allow-list). A secret with an allow-list is never
    /// for an `inline` spec: whoever submits one writes the commands that
    /// get it, and naming an allowed repository as the source would be
    /// enough to read the organisation's token.
    pub fn check(
        &self,
        spec: &Spec,
        source: Option<&GitUrl>,
        inline: bool,
    ) -> Result<(), SecretRefusal> {
        for used in spec.secret_uses() {
            let Some(definition) = self.defined.get(&used.name) else {
                return Err(SecretRefusal::Unknown {
                    name: used.name.clone(),
                    line: used.line,
                    column: used.column,
                    known: self.defined.keys().cloned().collect(),
                });
            };
            if definition.allowed.is_some() && inline {
                return Err(SecretRefusal::InlineSpec {
                    name: used.name.clone(),
                    line: used.line,
                    column: used.column,
                });
            }
            let allowed = match (&definition.allowed, source) {
                (None, _) => true,
                (Some(patterns), Some(url)) => patterns.allows(url),
                (Some(_), None) => false,
            };
            if !allowed {
                return Err(SecretRefusal::NotAllowed {
                    name: used.name.clone(),
                    source_url: source.map_or_else(
                        || "a local directory".to_owned(),
                        |url| url.as_str().to_owned(),
                    ),
                    line: used.line,
                    column: used.column,
                });
            }
        }
        Ok(())
    }

    /// Reads the value of `used` (already checked).
    pub fn read(&self, used: &SecretUse) -> Result<Secret, String> {
        let definition = self
            .defined
            .get(&used.name)
            .ok_or_else(|| format!("`{}` is not defined", used.name))?;
        definition.source.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> GitUrl {
        GitUrl::parse(text).unwrap()
    }

    #[test]
    fn a_secret_never_prints() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "Secret(***) ***");
    }

    #[test]
    fn patterns_match_within_segments_and_refuse_rewritten_paths() {
        let team = SourcePatterns::new(&["https://git.example.org/team/*".into()]).unwrap();
        assert!(team.allows(&url("https://git.example.org/team/app.git")));
        for other in [
            "https://git.example.org/other/app.git",
            "https://git.example.org/team/sub/app.git",
            "https://git.example.org/team/x/../../other/app.git",
            "https://git.example.org/team/..%2f..%2fother/app.git",
            "https://git.example.org/team/%2e%2e/other",
            "https://git.example.org.evil.test/team/app.git",
            "http://git.example.org/team/app.git",
            "https://git.example.org/team/app.git?x=/team/y",
        ] {
            assert!(!team.allows(&url(other)), "{other}");
        }
        let deep = SourcePatterns::new(&["https://git.example.org/team/**".into()]).unwrap();
        assert!(deep.allows(&url("https://git.example.org/team/sub/app.git")));
        assert!(!deep.allows(&url("https://git.example.org/team/./../x/app.git")));
    }

    #[test]
    fn a_spec_gets_only_defined_secrets_its_source_may_use() {
        let text = "steps:\n  - name: a\n    secrets: [npm]\n    env: { T: { secret: npm }, P: plain }\n    run: true\n";
        let spec = crate::spec::parse(text, Path::new("custody.yaml")).unwrap();
        assert_eq!(spec.steps[0].secret_names(), ["npm"]);
        assert_eq!(spec.steps[0].env["P"], "plain");
        let mut secrets = Secrets::default();
        let team = url("https://git.example.org/team/app.git");
        match secrets.check(&spec, Some(&team), false) {
            Err(SecretRefusal::Unknown { line, column, .. }) => assert_eq!((line, column), (3, 15)),
            other => panic!("{other:?}"),
        }
        secrets
            .define(
                "npm",
                SecretDefinition {
                    source: SecretSource::Env("NPM".into()),
                    allowed: Some(
                        SourcePatterns::new(&["https://git.example.org/team/*".into()]).unwrap(),
                    ),
                },
            )
            .unwrap();
        assert_eq!(secrets.check(&spec, Some(&team), false), Ok(()));
        let outsider = url("https://git.example.org/me/app.git");
        assert!(matches!(
            secrets.check(&spec, Some(&outsider), false),
            Err(SecretRefusal::NotAllowed { .. })
        ));
        assert!(matches!(
            secrets.check(&spec, Some(&team), true),
            Err(SecretRefusal::InlineSpec { .. })
        ));
        assert!(matches!(
            secrets.check(&spec, None, false),
            Err(SecretRefusal::NotAllowed { .. })
        ));
        for bad in [
            "secrets: [../etc]",
            "secrets: [a, a]",
            "env: { T: { secret: npm, other: 1 } }",
        ] {
            let text = format!("steps:\n  - name: a\n    {bad}\n    run: true\n");
            assert!(
                crate::spec::parse(&text, Path::new("c.yaml")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            SecretSource::parse("file:/etc/custody/npm").unwrap(),
            SecretSource::File("/etc/custody/npm".into())
        );
        assert_eq!(
            SecretSource::parse("env:NPM_TOKEN").unwrap(),
            SecretSource::Env("NPM_TOKEN".into())
        );
        for bad in ["npm", "file:", "env:", "vault:x"] {
            assert!(SecretSource::parse(bad).is_err(), "{bad}");
        }
    }
}
