//! Names in the distribution API, parsed once at the edge: repository
//! names, tags and the `<reference>` of a manifest path.
//!
//! Grammars from the OCI distribution spec, "Pulling manifests":
//! `<name>` is `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`
//! and a tag is `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.

use std::fmt;
use std::str::FromStr;

use custody_oci::Digest;

/// A repository name as the distribution spec allows it (`app`,
/// `team/app`). Only the gateway's declared repositories are served; this
/// type says nothing about that, only that the name is well formed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Repository(String);

/// A name that is not a valid repository name or tag.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a valid {what}: {reason}")]
pub struct InvalidName {
    pub text: String,
    pub what: &'static str,
    pub reason: &'static str,
}

impl Repository {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Repository {
    type Err = InvalidName;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidName {
            text: text.to_owned(),
            what: "repository name",
            reason,
        };
        // The spec's own bound, "the name SHOULD NOT exceed 255 characters"
        // once a hostname is prefixed; keep well under it.
        if text.is_empty() || text.len() > 200 {
            return Err(invalid("it must be 1 to 200 characters"));
        }
        for component in text.split('/') {
            if !valid_component(component) {
                return Err(invalid(
                    "each `/`-separated part is lowercase letters and digits, joined by `.`, `_`, `__` or dashes",
                ));
            }
        }
        Ok(Self(text.to_owned()))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or one or more `-`.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let run = &component[start..i];
        let ok = run == "." || run == "_" || run == "__" || run.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag as the distribution spec allows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this tag is in the tag schema attestations and signatures
    /// are found by (`sha256-<hex>`, cosign's `sha256-<hex>.att`/`.sig`,
    /// the distribution spec's referrers tag schema fallback). Those are
    /// the platform's to write: a step that wrote one could plant an
    /// attestation next to an image it pushed.
    pub fn is_attestation_schema(&self) -> bool {
        let lower = self.0.to_ascii_lowercase();
        [("sha256-", 64), ("sha384-", 96), ("sha512-", 128)]
            .iter()
            .any(|(prefix, hex_len)| {
                lower.strip_prefix(prefix).is_some_and(|rest| {
                    rest.len() >= *hex_len
                        && rest.as_bytes()[..*hex_len]
                            .iter()
                            .all(u8::is_ascii_hexdigit)
                })
            })
    }
}

impl FromStr for Tag {
    type Err = InvalidName;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidName {
            text: text.to_owned(),
            what: "tag",
            reason,
        };
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let bytes = text.as_bytes();
        match bytes.first() {
            None => return Err(invalid("it is empty")),
            Some(&first) if !word(first) => {
                return Err(invalid("it must start with a letter, digit or `_`"));
            }
            Some(_) => {}
        }
        if bytes.len() > 128 {
            return Err(invalid("it is longer than 128 characters"));
        }
        if !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
            return Err(invalid(
                "it may hold only letters, digits, `_`, `.` and `-`",
            ));
        }
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `<reference>` of `/v2/<name>/manifests/<reference>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(tag) => tag.fmt(f),
            Reference::Digest(digest) => digest.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_distribution_grammar() {
        for good in ["app", "team/app", "a.b", "a_b", "a__b", "a---b", "x1/y-2/z"] {
            assert!(good.parse::<Repository>().is_ok(), "{good}");
        }
        for bad in [
            "", "App", "a/", "/a", "a//b", "-a", "a-", "a___b", "a._b", "../a", "a b",
        ] {
            assert!(bad.parse::<Repository>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_follow_the_distribution_grammar() {
        for good in ["v1", "latest", "_x", "1.0-rc.1", "A_b"] {
            assert!(good.parse::<Tag>().is_ok(), "{good}");
        }
        for bad in ["", ".v1", "-v1", "a/b", "a:b", &"a".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_attestation_tag_schema_is_recognised_with_and_without_suffix() {
        let hex = "a".repeat(64);
        for schema in [
            format!("sha256-{hex}"),
            format!("sha256-{hex}.att"),
            format!("sha256-{hex}.sig"),
            format!("SHA256-{}", hex.to_uppercase()),
        ] {
            assert!(
                schema.parse::<Tag>().unwrap().is_attestation_schema(),
                "{schema}"
            );
        }
        for plain in ["v1", "sha256-abc", "sha256", "x-sha256-0"] {
            assert!(
                !plain.parse::<Tag>().unwrap().is_attestation_schema(),
                "{plain}"
            );
        }
    }
}
