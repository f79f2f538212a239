//! What a build was asked to build, in one type: the one place that says
//! which source wins and how it is recorded in the store (the `source`
//! column) and the provenance (`externalParameters.source`).

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::spec::{GitSource, GitUrl, WorkDir};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildSource {
    /// A git repository at a revision (resolved to a commit when it runs).
    Git(GitSource),
    /// A directory on the daemon's machine (`custody build DIR`).
    Directory(PathBuf),
}

impl BuildSource {
    /// The source a build runs: one the submitter named wins over the
    /// spec's own `source`; without either, the directory being built.
    pub fn choose(
        asked: Option<GitSource>,
        spec: Option<&GitSource>,
        directory: Option<&Path>,
    ) -> Option<Self> {
        asked
            .or_else(|| spec.cloned())
            .map(BuildSource::Git)
            .or_else(|| directory.map(|d| BuildSource::Directory(d.to_owned())))
    }

    /// As recorded: `{ "git": URL, "revision": REV }` (with `"path": DIR`
    /// when the build runs in a directory of it) or `{ "directory": PATH }`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            BuildSource::Git(git) if !git.path.is_root() => json!({
                "git": git.git.as_str(),
                "revision": git.revision,
                "path": git.path.as_str(),
            }),
            BuildSource::Git(git) => json!({ "git": git.git.as_str(), "revision": git.revision }),
            BuildSource::Directory(dir) => json!({
                "directory": dir.canonicalize().unwrap_or_else(|_| dir.clone()).display().to_string()
            }),
        }
    }

    /// Reads what [`BuildSource::to_json`] wrote.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("the stored source is not JSON: {e}"))?;
        if let (Some(git), Some(revision)) = (
            value.get("git").and_then(|v| v.as_str()),
            value.get("revision").and_then(|v| v.as_str()),
        ) {
            let path = value.get("path").and_then(|v| v.as_str()).unwrap_or("");
            return Ok(BuildSource::Git(GitSource {
                git: GitUrl::parse(git).map_err(|e| e.to_string())?,
                revision: revision.to_owned(),
                path: WorkDir::parse(path)?,
            }));
        }
        match value.get("directory").and_then(|v| v.as_str()) {
            Some(dir) => Ok(BuildSource::Directory(PathBuf::from(dir))),
            None => Err(format!(
                "the stored source `{text}` names no git repository or directory"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_dir_is_plain_names_inside_the_source() {
        for root in ["", ".", "./"] {
            assert!(WorkDir::parse(root).unwrap().is_root(), "{root:?}");
        }
        assert_eq!(WorkDir::parse("a/b/").unwrap().as_str(), "a/b");
        for bad in [
            "/etc",
            "../x",
            "a/../../b",
            "a//b",
            "a/./b",
            "a\\..\\b",
            "a\nb",
        ] {
            assert!(WorkDir::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn git(url: &str) -> GitSource {
        GitSource {
            git: GitUrl::parse(url).unwrap(),
            revision: "main".into(),
            path: WorkDir::default(),
        }
    }

    #[test]
    fn the_submitted_source_wins_then_the_spec_then_the_directory() {
        let asked = git("https://example.org/asked.git");
        let spec = git("https://example.org/spec.git");
        let dir = Path::new("/srv/app");
        assert_eq!(
            BuildSource::choose(Some(asked.clone()), Some(&spec), Some(dir)),
            Some(BuildSource::Git(asked))
        );
        assert_eq!(
            BuildSource::choose(None, Some(&spec), Some(dir)),
            Some(BuildSource::Git(spec))
        );
        assert_eq!(
            BuildSource::choose(None, None, Some(dir)),
            Some(BuildSource::Directory(dir.to_owned()))
        );
        assert_eq!(BuildSource::choose(None, None, None), None);
    }

    #[test]
    fn sources_round_trip_through_the_store() {
        let source = BuildSource::Git(git("https://example.org/app.git"));
        assert_eq!(
            BuildSource::from_json(&source.to_json().to_string()),
            Ok(source)
        );
        let mut inside = git("https://example.org/app.git");
        inside.path = WorkDir::parse("examples/hello/").unwrap();
        let source = BuildSource::Git(inside);
        assert_eq!(source.to_json()["path"], "examples/hello");
        assert_eq!(
            BuildSource::from_json(&source.to_json().to_string()),
            Ok(source)
        );
        assert!(
            BuildSource::from_json(r#"{"git":"https://h/x","revision":"m","path":"../x"}"#)
                .unwrap_err()
                .contains("without `..`")
        );
        assert!(BuildSource::from_json("{}").is_err());
        assert!(
            BuildSource::from_json(r#"{"git":"https://u:p@h/x","revision":"m"}"#)
                .unwrap_err()
                .contains("credentials")
        );
    }
}
