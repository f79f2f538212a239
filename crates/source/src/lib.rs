//! Getting a build's source: a git repository at a commit, or a local
//! directory (recording its commit, and whether its tree was dirty).
//!
//! Git runs with a fixed environment: no terminal prompts, no system or
//! global configuration, and only the transports custody allows (`ext::`
//! would run commands named in the URL).

#![forbid(unsafe_code)]

mod url;

pub use url::{GitUrl, GitUrlError};

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Transports a source URL may use.
const ALLOWED_PROTOCOLS: &str = "file:git:http:https:ssh";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("revision `{revision}` is not in `{url}`")]
    UnknownRevision { url: String, revision: String },
    #[error("git {action} for `{url}` failed: {detail}")]
    Git {
        url: String,
        action: &'static str,
        detail: String,
    },
    #[error("`{url}` checked out `{actual}`, not the commit `{expected}` it was asked for")]
    WrongCommit {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("cannot copy `{}`: {detail}", path.display())]
    Copy { path: PathBuf, detail: String },
}

/// What a local directory's git state was when it was copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalState {
    pub commit: String,
    /// Uncommitted changes or untracked files were present.
    pub dirty: bool,
}

fn git() -> Command {
    let mut command = Command::new("git");
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", ALLOWED_PROTOCOLS)
        .stdin(Stdio::null());
    command
}

async fn run(mut command: Command, url: &str, action: &'static str) -> Result<String, SourceError> {
    let output = command.output().await.map_err(|e| SourceError::Git {
        url: url.to_owned(),
        action,
        detail: format!("cannot run git: {e}"),
    })?;
    if !output.status.success() {
        let detail = String::from_utf8_lossy(&output.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or("failed")
            .to_owned();
        return Err(SourceError::Git {
            url: url.to_owned(),
            action,
            detail,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn is_commit(text: &str) -> bool {
    (text.len() == 40 || text.len() == 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolves `revision` (a branch, tag, `HEAD`, or a commit) in the
/// repository at `url` to a commit.
pub async fn resolve(url: &GitUrl, revision: &str) -> Result<String, SourceError> {
    let url = url.as_str();
    if is_commit(revision) {
        return Ok(revision.to_ascii_lowercase());
    }
    let mut command = git();
    command.args(["ls-remote", "--", url]);
    let listing = run(command, url, "ls-remote").await?;
    let refs: Vec<(&str, &str)> = listing.lines().filter_map(|l| l.split_once('\t')).collect();
    // Exact names first; a peeled tag (`^{}`) names the commit, not the tag object.
    let candidates = [
        revision.to_owned(),
        format!("refs/heads/{revision}"),
        format!("refs/tags/{revision}^{{}}"),
        format!("refs/tags/{revision}"),
    ];
    candidates
        .iter()
        .find_map(|want| {
            refs.iter()
                .find(|(_, name)| name == want)
                .map(|(sha, _)| (*sha).to_owned())
        })
        .ok_or_else(|| SourceError::UnknownRevision {
            url: url.to_owned(),
            revision: revision.to_owned(),
        })
}

/// Checks out `commit` of `url` into `dest` (which must not exist) and
/// confirms that `HEAD` is that commit.
pub async fn fetch(url: &GitUrl, commit: &str, dest: &Path) -> Result<(), SourceError> {
    let url = url.as_str();
    let mut clone = git();
    clone
        .args(["clone", "--quiet", "--no-checkout", "--", url])
        .arg(dest);
    run(clone, url, "clone").await?;
    let mut checkout = git();
    checkout
        .arg("-C")
        .arg(dest)
        .args(["checkout", "--quiet", "--detach", commit]);
    run(checkout, url, "checkout").await?;
    let mut head = git();
    head.arg("-C").arg(dest).args(["rev-parse", "HEAD"]);
    let actual = run(head, url, "rev-parse").await?.trim().to_owned();
    if actual != commit {
        return Err(SourceError::WrongCommit {
            url: url.to_owned(),
            expected: commit.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// The git state of a local directory, if it is a git checkout.
pub async fn local_state(dir: &Path) -> Option<LocalState> {
    let display = dir.display().to_string();
    let mut head = git();
    head.arg("-C").arg(dir).args(["rev-parse", "HEAD"]);
    let commit = run(head, &display, "rev-parse")
        .await
        .ok()?
        .trim()
        .to_owned();
    let mut status = git();
    status
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--untracked-files=normal"]);
    let dirty = !run(status, &display, "status")
        .await
        .ok()?
        .trim()
        .is_empty();
    Some(LocalState { commit, dirty })
}

/// The URL of a local checkout's `origin` remote, if it has one.
pub async fn origin(dir: &Path) -> Option<String> {
    let mut remote = git();
    remote
        .arg("-C")
        .arg(dir)
        .args(["remote", "get-url", "origin"]);
    let url = run(remote, &dir.display().to_string(), "remote get-url")
        .await
        .ok()?;
    Some(url.trim().to_owned()).filter(|url| !url.is_empty())
}

/// Copies a local directory into `dest`, symlinks as symlinks.
pub async fn copy_local(dir: &Path, dest: &Path) -> Result<(), SourceError> {
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| SourceError::Copy {
            path: dest.to_owned(),
            detail: e.to_string(),
        })?;
    let output = Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(dir.join("."))
        .arg(dest)
        .output()
        .await
        .map_err(|e| SourceError::Copy {
            path: dir.to_owned(),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(SourceError::Copy {
            path: dir.to_owned(),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
