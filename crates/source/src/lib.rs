//! Getting a build's source: a git repository at a commit, or a local
//! directory (recording its commit, and whether its tree was dirty).
//!
//! Git runs with a fixed environment: no terminal prompts, no system or
//! global configuration, and only the transports custody allows (`ext::`
//! would run commands named in the URL).

#![forbid(unsafe_code)]

mod url;

pub use url::{Endpoint, GitUrl, GitUrlError};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Transports a source URL may use.
const ALLOWED_PROTOCOLS: &str = "file:git:http:https:ssh";

/// How long one git operation may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Slower than this (bytes per second) for [`LOW_SPEED_SECONDS`]: given up.
const LOW_SPEED_BYTES: u32 = 1000;
const LOW_SPEED_SECONDS: u32 = 30;

/// A repository to talk to, and how: an overall deadline for each git
/// operation, and optionally the address to connect to (checked by the
/// caller's policy), so a name cannot resolve elsewhere between the check
/// and the connection.
#[derive(Clone, Debug)]
pub struct Remote<'a> {
    url: &'a GitUrl,
    pin: Option<SocketAddr>,
    timeout: Duration,
}

impl<'a> Remote<'a> {
    pub fn new(url: &'a GitUrl) -> Self {
        Self {
            url,
            pin: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Connects to `addr` whatever the host name resolves to (`https`,
    /// `http`: curl's resolve list; `ssh`: the connection's `HostName`).
    pub fn pinned(mut self, addr: Option<SocketAddr>) -> Self {
        self.pin = addr;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn url(&self) -> &GitUrl {
        self.url
    }

    /// `git` with this remote's connection settings.
    fn git(&self) -> Command {
        let mut command = git();
        let endpoint = self.url.endpoint();
        if let (Some(addr), Some(host), Some(port)) = (self.pin, &endpoint.host, endpoint.port) {
            let ip = match addr {
                SocketAddr::V4(v4) => v4.ip().to_string(),
                SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
            };
            match endpoint.scheme.as_str() {
                "https" | "http" => {
                    command
                        .arg("-c")
                        .arg(format!("http.curloptResolve={host}:{port}:{ip}"));
                }
                "ssh" => {
                    command.arg("-c").arg(format!(
                        "core.sshCommand=ssh -o HostName={} -o HostKeyAlias={host} -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=2",
                        addr.ip()
                    ));
                }
                _ => {}
            }
        }
        command
    }

    async fn run(&self, command: Command, action: &'static str) -> Result<String, SourceError> {
        let url = self.url.as_str();
        match tokio::time::timeout(self.timeout, run(command, url, action)).await {
            Ok(result) => result,
            Err(_) => Err(SourceError::TimedOut {
                url: url.to_owned(),
                action,
                after: self.timeout,
            }),
        }
    }
}

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
    #[error("git {action} for `{url}` took longer than {}s", after.as_secs())]
    TimedOut {
        url: String,
        action: &'static str,
        after: Duration,
    },
    #[error("`{path}` at {commit} in `{url}`: {reason}")]
    File {
        url: String,
        commit: String,
        path: String,
        reason: String,
    },
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
        .env("GIT_HTTP_LOW_SPEED_LIMIT", LOW_SPEED_BYTES.to_string())
        .env("GIT_HTTP_LOW_SPEED_TIME", LOW_SPEED_SECONDS.to_string())
        .stdin(Stdio::null())
        // A deadline or a cancel drops the future: git goes with it.
        .kill_on_drop(true);
    command
}

/// Kills a process group when dropped: git's helpers (`git remote-https`,
/// `ssh`) are its children, and a deadline or a cancel must end them too.
struct GroupKill(Option<nix::unistd::Pid>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

async fn run(mut command: Command, url: &str, action: &'static str) -> Result<String, SourceError> {
    let failed = |e: std::io::Error| SourceError::Git {
        url: url.to_owned(),
        action,
        detail: format!("cannot run git: {e}"),
    };
    let child = command
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(failed)?;
    let mut group = GroupKill(
        child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(nix::unistd::Pid::from_raw),
    );
    let output = child.wait_with_output().await.map_err(failed)?;
    group.0 = None;
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
/// repository to a commit.
pub async fn resolve(remote: &Remote<'_>, revision: &str) -> Result<String, SourceError> {
    let url = remote.url.as_str();
    if is_commit(revision) {
        return Ok(revision.to_ascii_lowercase());
    }
    let mut command = remote.git();
    command.args(["ls-remote", "--", url]);
    let listing = remote.run(command, "ls-remote").await?;
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

/// Checks out `commit` of the repository into `dest` (which must not
/// exist) and confirms that `HEAD` is that commit.
pub async fn fetch(remote: &Remote<'_>, commit: &str, dest: &Path) -> Result<(), SourceError> {
    let url = remote.url.as_str();
    let mut clone = remote.git();
    clone
        .args(["clone", "--quiet", "--no-checkout", "--", url])
        .arg(dest);
    remote.run(clone, "clone").await?;
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

/// The bytes of the regular file at `path` in `commit`, read from git's
/// objects (never through a working tree: a symbolic link is refused, not
/// followed), at most `limit` bytes.
pub async fn read_file(
    remote: &Remote<'_>,
    commit: &str,
    path: &str,
    limit: u64,
) -> Result<Vec<u8>, SourceError> {
    let url = remote.url.as_str();
    let refused = |reason: String| SourceError::File {
        url: url.to_owned(),
        commit: commit.to_owned(),
        path: path.to_owned(),
        reason,
    };
    if !is_commit(commit) {
        return Err(refused("not a commit id".into()));
    }
    let scratch = tempfile::tempdir().map_err(|e| refused(format!("no scratch directory: {e}")))?;
    let repo = scratch.path();
    let mut init = git();
    init.args(["init", "--quiet", "--bare"]).arg(repo);
    remote.run(init, "init").await?;
    // The commit alone; a server that cannot serve a commit by id gets
    // asked for its branches and tags instead.
    let mut shallow = remote.git();
    shallow.arg("-C").arg(repo).args([
        "fetch",
        "--quiet",
        "--no-tags",
        "--depth",
        "1",
        "--",
        url,
        commit,
    ]);
    if remote.run(shallow, "fetch").await.is_err() {
        let mut all = remote.git();
        all.arg("-C").arg(repo).args([
            "fetch",
            "--quiet",
            "--",
            url,
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ]);
        remote.run(all, "fetch").await?;
    }
    let mut tree = git();
    tree.env("GIT_LITERAL_PATHSPECS", "1")
        .arg("-C")
        .arg(repo)
        .args(["ls-tree", "-l", "--full-tree", commit, "--", path]);
    let listing = remote.run(tree, "ls-tree").await?;
    // `MODE TYPE OBJECT SIZE\tPATH`
    let fields: Vec<&str> = listing
        .split('\t')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    match fields.as_slice() {
        [] => return Err(refused("no such file".into())),
        ["120000", ..] => return Err(refused("is a symbolic link; name the file itself".into())),
        ["100644" | "100755", "blob", _, size] => {
            if size.parse::<u64>().map_or(true, |size| size > limit) {
                return Err(refused(format!("is larger than {limit} bytes")));
            }
        }
        _ => return Err(refused("is not a regular file".into())),
    }
    let mut show = git();
    show.arg("-C")
        .arg(repo)
        .args(["cat-file", "blob", &format!("{commit}:{path}")]);
    let output = tokio::time::timeout(remote.timeout, show.output())
        .await
        .map_err(|_| refused("reading it took too long".into()))?
        .map_err(|e| refused(format!("cannot run git: {e}")))?;
    if !output.status.success() {
        return Err(refused(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    Ok(output.stdout)
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

/// Where `dir` lies inside its checkout: `examples/hello` (empty at the
/// checkout's root); `None` outside a checkout.
pub async fn path_in_checkout(dir: &Path) -> Option<String> {
    let mut prefix = git();
    prefix
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--show-prefix"]);
    let text = run(prefix, &dir.display().to_string(), "rev-parse")
        .await
        .ok()?;
    Some(text.trim().trim_end_matches('/').to_owned())
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
