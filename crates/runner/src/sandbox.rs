//! Steps run in a bubblewrap sandbox: their own PID, IPC, UTS, cgroup and
//! (unless they ask for network) network namespaces, the host's top-level
//! directories read-only, `/workspace` and `/output` read-write, fresh
//! `/tmp`, `/dev` and `/proc`, and only the environment the step declares. In their PID
//! namespace steps cannot see the runner, so neither its memory nor its
//! environment; the token never reaches the disk they can read.
//!
//! Where the runner is root, steps are root in the sandbox too, without
//! capabilities: home directories and `/run` are empty tmpfs mounts, and
//! directories the daemon names (its data directory) can be hidden the same
//! way.

use std::path::{Path, PathBuf};

use custody_wire::rpc::proto;
use tokio::process::Command;

/// The `PATH` steps get.
pub const STEP_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BWRAP: &str = "bwrap";
/// Top-level host directories no step sees: they appear empty.
const HIDDEN_TOP: &[&str] = &["root", "home", "run", "tmp"];
/// Top-level entries the sandbox makes itself.
const OWN_TOP: &[&str] = &["proc", "dev", "workspace", "output"];

/// Where a job's steps work, on the runner's side.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// Bound at `/workspace`.
    pub workspace: PathBuf,
    /// Bound at `/output`.
    pub output: PathBuf,
    /// More host paths to hide: directories behind empty tmpfs mounts,
    /// files behind `/dev/null`.
    pub hidden: Vec<PathBuf>,
}

/// The root a step runs on.
pub enum Root<'a> {
    /// The host's top-level directories, read-only.
    Host,
    /// An unpacked step image; nothing of the host is visible.
    Image(&'a Path),
}

impl Sandbox {
    /// The command that runs `step` in this sandbox on `root`.
    pub fn command(&self, step: &proto::Step, root: Root<'_>) -> Command {
        let mut command = Command::new(BWRAP);
        command.args(["--die-with-parent", "--new-session", "--unshare-all"]);
        if step.network {
            command.arg("--share-net");
        }
        match root {
            Root::Host => self.host_root(&mut command),
            // The image's own files, writable: builds install things.
            Root::Image(rootfs) => {
                command
                    .arg("--bind")
                    .arg(rootfs)
                    .arg("/")
                    .args(["--tmpfs", "/tmp"]);
            }
        }
        command
            .args(["--dev", "/dev", "--proc", "/proc"])
            .arg("--bind")
            .arg(&self.workspace)
            .arg("/workspace")
            .arg("--bind")
            .arg(&self.output)
            .arg("/output")
            .args([
                "--chdir",
                "/workspace",
                "--clearenv",
                "--setenv",
                "PATH",
                STEP_PATH,
                "--setenv",
                "HOME",
                "/workspace",
            ]);
        for (key, value) in &step.env {
            command.arg("--setenv").arg(key).arg(value);
        }
        command.arg("--");
        if step.args.is_empty() {
            command.args(["/bin/sh", "-c", &step.run]);
        } else {
            command.args(&step.args);
        }
        // bwrap itself gets nothing of the runner's environment either.
        command.env_clear().env("PATH", STEP_PATH);
        command
    }

    /// A fresh tmpfs root holding the host's top-level entries read-only (so
    /// `/workspace` and `/output` can be made in it), with home
    /// directories, `/run` and `/tmp` empty.
    fn host_root(&self, command: &mut Command) {
        for entry in std::fs::read_dir("/").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = Path::new("/").join(name);
            if OWN_TOP.contains(&name) {
                continue;
            }
            if HIDDEN_TOP.contains(&name) {
                command.arg("--tmpfs").arg(&path);
            } else if let Ok(target) = std::fs::read_link(&path) {
                command.arg("--symlink").arg(target).arg(&path);
            } else {
                command.arg("--ro-bind").arg(&path).arg(&path);
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
            if covered {
                continue;
            }
            if hidden.is_dir() {
                command.arg("--tmpfs").arg(hidden);
            } else if hidden.exists() {
                command.arg("--ro-bind").arg("/dev/null").arg(hidden);
            }
        }
    }
}
