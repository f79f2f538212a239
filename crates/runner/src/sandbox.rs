//! Steps run in a bubblewrap sandbox: their own user, PID, IPC, UTS and
//! cgroup namespaces, the network namespace the runner made for them (see
//! [`crate::netns`]), the host's top-level directories read-only (or their
//! image), `/workspace` and `/output` read-write, fresh `/tmp`, `/dev` and
//! `/proc`, no capabilities, and only the environment the step declares.
//!
//! The step is root in its user namespace and nobody on the host: where the
//! runner is root, bubblewrap starts as the first id of the step's host range
//! ([`crate::ids`]) and waits (`--userns-block-fd`) while the runner writes
//! the namespace's `uid_map`/`gid_map` (`0 START COUNT`), moves it into the
//! step's cgroup, sets the namespace's `user.max_user_namespaces` to 0
//! (unless the step says `user_namespaces: true`), and only then lets it go
//! on — so nothing of the step ever runs with host privileges, outside its
//! limits or with user namespaces of its own. bubblewrap itself starts
//! with an empty environment, so nothing a step sets (`LD_PRELOAD`,
//! `LD_DEBUG_OUTPUT`, …) acts on it while it still runs on the host; the
//! step's environment reaches it through a pipe (`--args`: `--clearenv`,
//! then `--setenv` for each variable), never in its arguments (which any
//! local user can read in `/proc`).
//!
//! A step that asked for secrets gets a tmpfs of its own at `/run/secrets`
//! holding exactly those, each a file of mode 0400 owned by the step's
//! root: bubblewrap copies each value from a pipe the runner writes
//! (`--file FD`), so it is in neither the arguments nor on the build's
//! disk. A secret asked for as a variable is in the step's environment.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use custody_wire::rpc::proto;
use tokio::process::{Child, Command};

use crate::cgroup::StepCgroup;
use crate::ids::StepIds;
use crate::netns::{SpawnGuard, StepNetwork};

/// The `PATH` steps get.
pub const STEP_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BWRAP: &str = "bwrap";
/// Top-level host directories no step sees: they appear empty.
const HIDDEN_TOP: &[&str] = &["root", "home", "run", "tmp"];
/// Top-level entries the sandbox makes itself.
const OWN_TOP: &[&str] = &["proc", "dev", "workspace", "output"];
/// The descriptors bubblewrap reports on and waits on, in the child.
const INFO_FD: i32 = 3;
const BLOCK_FD: i32 = 4;
/// The descriptor bubblewrap reads the step's environment from (`--args`).
const ENV_FD: i32 = 5;
/// The first descriptor a secret's value is read from, in the child.
const FIRST_SECRET_FD: i32 = 6;
/// Where a step finds the secrets it asked for.
pub const SECRETS_DIR: &str = "/run/secrets";
/// How long bubblewrap may take to set its namespaces up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a job's steps work, on the runner's side.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// Bound at `/workspace`.
    pub workspace: PathBuf,
    /// Where in `/workspace` steps start: the build's directory of its
    /// source (empty: `/workspace` itself).
    pub workdir: String,
    /// Bound at `/output`.
    pub output: PathBuf,
    /// More host paths to hide: directories behind empty tmpfs mounts,
    /// files behind `/dev/null`.
    pub hidden: Vec<PathBuf>,
    /// The host ids steps run as.
    pub ids: StepIds,
}

/// The root a step runs on.
pub enum Root<'a> {
    /// The host's top-level directories, read-only.
    Host,
    /// An unpacked step image; nothing of the host is visible.
    Image(&'a Path),
}

impl Sandbox {
    /// Starts `step` on `root` inside `network`, with `extra_env` (the
    /// proxy settings) under its own environment, in `cgroup` from its first
    /// instruction. Output is piped; the step leads its own process group.
    pub async fn start(
        &self,
        step: &proto::Step,
        root: Root<'_>,
        extra_env: &[(String, String)],
        network: &StepNetwork,
        cgroup: Option<&StepCgroup>,
    ) -> std::io::Result<(Child, SpawnGuard)> {
        let (mut info, info_child) = std::io::pipe()?;
        let (block_child, mut block) = std::io::pipe()?;
        let secret_env: Vec<(&str, Vec<u8>)> = secret_env(step).collect();
        let environment = environment_arguments(
            [("PATH", STEP_PATH), ("HOME", "/workspace")]
                .into_iter()
                .chain(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .chain(step.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map(|(k, v)| (k, v.as_bytes()))
                .chain(secret_env.iter().map(|(k, v)| (*k, v.as_slice()))),
        )?;
        let mut command = Command::new(BWRAP);
        command.args(["--args", &ENV_FD.to_string()]);
        if network.made_by_sandbox_itself() {
            command.arg("--unshare-net");
        }
        command
            .args(self.arguments(step, root))
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so everything the step starts can be killed.
            .process_group(0)
            .kill_on_drop(true);
        let mut mappings = vec![
            FdMapping {
                parent_fd: OwnedFd::from(info_child),
                child_fd: INFO_FD,
            },
            FdMapping {
                parent_fd: OwnedFd::from(block_child),
                child_fd: BLOCK_FD,
            },
            FdMapping {
                parent_fd: pipe_holding(environment)?,
                child_fd: ENV_FD,
            },
        ];
        for (secret, child_fd) in file_secrets(step).zip(FIRST_SECRET_FD..) {
            mappings.push(FdMapping {
                parent_fd: pipe_holding(secret.value.clone())?,
                child_fd,
            });
        }
        command
            .fd_mappings(mappings)
            .map_err(std::io::Error::other)?;
        if self.ids.privileged {
            // Dropping from root also drops every supplementary group.
            command.uid(self.ids.uid).gid(self.ids.gid);
        }
        // Started from inside the step's network namespace; the command (and
        // with it our copies of the child's pipe ends) is dropped there.
        let (mut child, guard) = network.spawn(command)?;

        // bubblewrap's child keeps its copy of the descriptor open until it
        // goes on, so the report ends where its JSON does, not at EOF.
        let report = tokio::task::spawn_blocking(move || {
            let mut text = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                match info.read(&mut chunk) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => text.extend_from_slice(&chunk[..n]),
                }
                if let Ok(report) = serde_json::from_slice::<serde_json::Value>(&text) {
                    return Some(report);
                }
                if text.len() > 64 * 1024 {
                    return None;
                }
            }
        });
        let report = match tokio::time::timeout(SETUP_TIMEOUT, report).await {
            Ok(Ok(report)) => report,
            _ => None,
        };
        let inner = report
            .and_then(|v| v["child-pid"].as_u64())
            .and_then(|pid| u32::try_from(pid).ok());
        let Some(inner) = inner else {
            return Err(failed_to_start(child).await);
        };
        let prepared = self.prepare(inner, child.id(), cgroup);
        if let Err(e) = prepared {
            let _ = child.start_kill();
            return Err(e);
        }
        if !step.user_namespaces
            && let Err(e) = forbid_user_namespaces(inner, self.ids.privileged).await
        {
            let _ = child.start_kill();
            return Err(e);
        }
        // Go on: the namespace is mapped and the cgroup joined.
        block.write_all(b"1")?;
        drop(block);
        Ok((child, guard))
    }
}

/// Keeps the step from making user namespaces of its own (the kernel code
/// behind them — mounts, capabilities inside — is a large surface): the
/// limit of the step's user namespace (`user.max_user_namespaces`) is set
/// to 0 from inside it, by `nsenter` as the namespace's owner, before the
/// step runs. The step, without capabilities, cannot raise it again.
/// (bubblewrap's own `--disable-userns` cannot be combined with the
/// `--userns-block-fd` the id mapping needs.)
async fn forbid_user_namespaces(inner: u32, privileged: bool) -> std::io::Result<()> {
    let output = tokio::process::Command::new("nsenter")
        .args(["--user", "--target", &inner.to_string()])
        // A runner that is not root cannot change its groups there (the
        // namespace denies `setgroups`); it keeps its ids, which the
        // namespace maps. Root's own ids are not mapped there: it takes
        // the namespace's root, as nsenter does by default.
        .args((!privileged).then_some("--preserve-credentials"))
        .arg("--")
        .args(["sysctl", "-q", "-w", "user.max_user_namespaces=0"])
        .env_clear()
        .env("PATH", STEP_PATH)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if output.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "cannot keep the step from making user namespaces (`nsenter … sysctl user.max_user_namespaces=0` failed: {}); a step that needs them says `user_namespaces: true`",
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// bubblewrap's `--args` for an environment of exactly `variables` (later
/// ones win): NUL-separated, so a NUL inside a name or value would be an
/// argument of its own and is refused, as is a name with `=`.
fn environment_arguments<'a>(
    variables: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> std::io::Result<Vec<u8>> {
    let mut bytes = b"--clearenv\0".to_vec();
    for (name, value) in variables {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains(&0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the environment variable `{}` cannot be set: a name holds no `=`, and neither holds a NUL byte",
                    name.replace('\0', "\\0")
                ),
            ));
        }
        for part in [b"--setenv".as_slice(), name.as_bytes(), value] {
            bytes.extend_from_slice(part);
            bytes.push(0);
        }
    }
    Ok(bytes)
}

impl Sandbox {
    /// Maps the user namespace of bubblewrap's child `inner` and moves it
    /// and bubblewrap (`outer`) into the step's cgroup.
    fn prepare(
        &self,
        inner: u32,
        outer: Option<u32>,
        cgroup: Option<&StepCgroup>,
    ) -> std::io::Result<()> {
        let proc = PathBuf::from(format!("/proc/{inner}"));
        fs_err::write(proc.join("uid_map"), self.ids.uid_map())?;
        fs_err::write(proc.join("setgroups"), "deny")?;
        fs_err::write(proc.join("gid_map"), self.ids.gid_map())?;
        if let Some(cgroup) = cgroup {
            for pid in outer.into_iter().chain([inner]) {
                cgroup.add_process(pid)?;
            }
        }
        Ok(())
    }

    /// bubblewrap's arguments: namespaces, the root, the bind mounts, the
    /// command. Nothing secret: any local user may read them.
    fn arguments(&self, step: &proto::Step, root: Root<'_>) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--die-with-parent",
            "--new-session",
            "--unshare-user",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--uid",
            "0",
            "--gid",
            "0",
            "--cap-drop",
            "ALL",
            "--info-fd",
            "3",
            "--userns-block-fd",
            "4",
        ]
        .map(OsString::from)
        .to_vec();
        let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
            args.extend(items.iter().map(|i| i.as_ref().to_owned()));
        };
        match root {
            Root::Host => self.host_root(&mut push),
            // The image's own files, writable: builds install things.
            Root::Image(rootfs) => {
                push(&[&"--bind", &rootfs, &"/", &"--tmpfs", &"/tmp"]);
            }
        }
        let start = match self.workdir.as_str() {
            "" => "/workspace".to_owned(),
            dir => format!("/workspace/{dir}"),
        };
        push(&[
            &"--dev",
            &"/dev",
            &"--proc",
            &"/proc",
            &"--bind",
            &self.workspace,
            &"/workspace",
            &"--bind",
            &self.output,
            &"/output",
            &"--chdir",
            &start,
        ]);
        let mut secrets = file_secrets(step).zip(FIRST_SECRET_FD..).peekable();
        if secrets.peek().is_some() {
            // A tmpfs of this step's own, whatever the root: nothing of it
            // reaches the build's disk or outlives the step.
            push(&[&"--perms", &"0500", &"--tmpfs", &SECRETS_DIR]);
            for (secret, fd) in secrets {
                let fd = fd.to_string();
                let path = format!("{SECRETS_DIR}/{}", secret.name);
                push(&[&"--perms", &"0400", &"--file", &fd, &path]);
            }
        }
        push(&[&"--"]);
        if step.args.is_empty() {
            push(&[&"/bin/sh", &"-c", &step.run]);
        } else {
            for arg in &step.args {
                push(&[arg]);
            }
        }
        args
    }

    /// A fresh tmpfs root holding the host's top-level entries read-only (so
    /// `/workspace` and `/output` can be made in it), with home
    /// directories, `/run` and `/tmp` empty.
    fn host_root(&self, push: &mut impl FnMut(&[&dyn AsRef<std::ffi::OsStr>])) {
        for entry in std::fs::read_dir("/").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = Path::new("/").join(name);
            if OWN_TOP.contains(&name) {
                continue;
            }
            if HIDDEN_TOP.contains(&name) {
                push(&[&"--tmpfs", &path]);
            } else if let Ok(target) = std::fs::read_link(&path) {
                push(&[&"--symlink", &target, &path]);
            } else {
                push(&[&"--ro-bind", &path, &path]);
            }
        }
        for hidden in &self.hidden {
            // Inside a directory already hidden there is nothing to hide, and
            // mounting over it would make its path appear in the empty tmpfs.
            let covered = HIDDEN_TOP
                .iter()
                .any(|top| hidden.starts_with(Path::new("/").join(top)))
                || self
                    .hidden
                    .iter()
                    .any(|other| other != hidden && other.is_dir() && hidden.starts_with(other));
            // A path the step's ids cannot even reach needs no hiding (its
            // own permissions already keep the step out), and bubblewrap,
            // running as those ids, could not mount over it.
            if covered || !self.reachable(hidden) {
                continue;
            }
            if hidden.is_dir() {
                push(&[&"--tmpfs", hidden]);
            } else if hidden.exists() {
                push(&[&"--ro-bind", &"/dev/null", hidden]);
            }
        }
    }
}

impl Sandbox {
    /// Whether the step's ids may search every directory on the way to
    /// `path` (so it could look at it, were it not hidden).
    fn reachable(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        if !self.ids.privileged {
            return true;
        }
        path.ancestors().skip(1).all(|dir| {
            let Ok(meta) = std::fs::metadata(dir) else {
                return false;
            };
            let mode = meta.mode();
            mode & 0o001 != 0
                || (meta.gid() == self.ids.gid && mode & 0o010 != 0)
                || (meta.uid() == self.ids.uid && mode & 0o100 != 0)
        })
    }
}

/// The secrets `step` gets as files under [`SECRETS_DIR`].
fn file_secrets(step: &proto::Step) -> impl Iterator<Item = &proto::StepSecret> {
    step.secrets.iter().filter(|secret| {
        secret.file
            && !secret.name.is_empty()
            && !secret.name.contains('/')
            && secret.name != "."
            && secret.name != ".."
    })
}

/// The variables `step` gets a secret in.
fn secret_env(step: &proto::Step) -> impl Iterator<Item = (&str, Vec<u8>)> {
    step.secrets.iter().flat_map(|secret| {
        secret
            .env
            .iter()
            .map(|var| (var.as_str(), secret.value.clone()))
    })
}

/// A pipe that holds `bytes` and then ends, for bubblewrap to read (the
/// step's environment for `--args`, a secret for `--file`): a thread
/// writes it, since it may be larger than the pipe's buffer.
fn pipe_holding(bytes: Vec<u8>) -> std::io::Result<OwnedFd> {
    let (reader, mut writer) = std::io::pipe()?;
    std::thread::Builder::new()
        .name("sandbox-pipe".into())
        .spawn(move || {
            // A sandbox that failed to start closes its end: nothing to do.
            let _ = writer.write_all(&bytes);
        })?;
    Ok(OwnedFd::from(reader))
}

/// bubblewrap gave up before its sandbox existed: say what it said.
async fn failed_to_start(mut child: Child) -> std::io::Error {
    let _ = child.start_kill();
    let mut said = Vec::new();
    if let Some(mut stderr) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), stderr.read_to_end(&mut said)).await;
    }
    let _ = child.wait().await;
    let said = String::from_utf8_lossy(&said);
    std::io::Error::other(format!(
        "bubblewrap could not set the sandbox up{}",
        if said.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", said.trim())
        }
    ))
}
