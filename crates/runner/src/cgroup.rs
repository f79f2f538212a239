//! Memory and process limits for a step, through cgroups.
//!
//! Where the runner may create cgroups (root on cgroup v1, as on the
//! machines custody is tested on; or a cgroup v2 subtree delegated to it with
//! the `memory` and `pids` controllers enabled), each step gets its own
//! cgroup under the runner's, with `memory` and `pids` limits. Elsewhere the
//! step runs without them and the runner logs that once per job. The step is
//! moved into its cgroup by a shell that then `exec`s bubblewrap, so no
//! process of the step ever runs outside it.

use std::path::{Path, PathBuf};

use fs_err as fs;

/// Limits when the job sets none (the daemon normally sets both).
pub const DEFAULT_MEMORY_BYTES: u64 = 4 << 30;
pub const DEFAULT_PIDS: u32 = 4096;

const ROOT: &str = "/sys/fs/cgroup";

/// The limits one step runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
}

impl Limits {
    pub fn or_defaults(memory_bytes: u64, pids: u32) -> Self {
        Self {
            memory_bytes: if memory_bytes == 0 {
                DEFAULT_MEMORY_BYTES
            } else {
                memory_bytes
            },
            pids: if pids == 0 { DEFAULT_PIDS } else { pids },
        }
    }
}

/// A step's cgroup(s); removed when dropped, once the step is gone.
#[derive(Debug)]
pub struct StepCgroup {
    /// One directory per hierarchy (v1: memory and pids; v2: one).
    dirs: Vec<PathBuf>,
    version: Version,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

impl StepCgroup {
    /// Creates the cgroup for one step with `limits`; `Ok(None)` where this
    /// runner cannot create cgroups.
    pub fn create(name: &str, limits: Limits) -> std::io::Result<Option<Self>> {
        let own = fs::read_to_string("/proc/self/cgroup")?;
        if Path::new(ROOT).join("memory").is_dir() && Path::new(ROOT).join("pids").is_dir() {
            let (Some(memory), Some(pids)) = (v1_path(&own, "memory"), v1_path(&own, "pids"))
            else {
                return Ok(None);
            };
            let memory = Path::new(ROOT).join("memory").join(memory).join(name);
            let pids = Path::new(ROOT).join("pids").join(pids).join(name);
            let group = Self {
                dirs: Vec::new(),
                version: Version::V1,
            };
            // Dropping a half-made group removes what it made.
            let Some(group) = group.add(&memory)? else {
                return Ok(None);
            };
            let Some(group) = group.add(&pids)? else {
                return Ok(None);
            };
            fs::write(
                memory.join("memory.limit_in_bytes"),
                limits.memory_bytes.to_string(),
            )?;
            // Without swap accounting this file is absent; the limit above
            // still holds for memory proper.
            let _ = fs::write(
                memory.join("memory.memsw.limit_in_bytes"),
                limits.memory_bytes.to_string(),
            );
            fs::write(pids.join("pids.max"), limits.pids.to_string())?;
            return Ok(Some(group));
        }
        let Some(path) = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| p.trim_start_matches('/').to_owned())
        else {
            return Ok(None);
        };
        let parent = Path::new(ROOT).join(path);
        let delegated = fs::read_to_string(parent.join("cgroup.subtree_control"))
            .map(|c| c.contains("memory") && c.contains("pids"))
            .unwrap_or(false);
        if !delegated {
            return Ok(None);
        }
        let group = Self {
            dirs: Vec::new(),
            version: Version::V2,
        };
        let Some(group) = group.add(&parent.join(name))? else {
            return Ok(None);
        };
        let dir = &group.dirs[0];
        fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
        let _ = fs::write(dir.join("memory.swap.max"), "0");
        fs::write(dir.join("pids.max"), limits.pids.to_string())?;
        Ok(Some(group))
    }

    /// Makes `dir`; `None` when cgroups cannot be created here at all.
    fn add(mut self, dir: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        self.dirs.push(dir.to_owned());
        Ok(Some(self))
    }

    /// The `cgroup.procs` files a step's first process writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Whether the kernel killed a process here for running out of memory.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = match self.version {
            Version::V1 => ("memory.oom_control", "oom_kill "),
            Version::V2 => ("memory.events", "oom_kill "),
        };
        self.dirs.iter().any(|dir| {
            fs::read_to_string(dir.join(file))
                .map(|text| {
                    text.lines()
                        .filter_map(|l| l.strip_prefix(key))
                        .any(|n| n.trim() != "0")
                })
                .unwrap_or(false)
        })
    }

    /// Whether a fork failed against the process limit.
    pub fn pids_exhausted(&self) -> bool {
        self.dirs.iter().any(|dir| {
            fs::read_to_string(dir.join("pids.events"))
                .map(|text| {
                    text.lines()
                        .filter_map(|l| l.strip_prefix("max "))
                        .any(|n| n.trim() != "0")
                })
                .unwrap_or(false)
        })
    }
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // Fails only while a process is still inside; the process group
            // is killed before this runs.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The runner's own path in a v1 hierarchy, from `/proc/self/cgroup`.
fn v1_path(own: &str, controller: &str) -> Option<String> {
    own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.trim_start_matches('/').to_owned())
    })
}

/// Wraps `command` so its first process joins `procs_files` before it
/// becomes bubblewrap.
pub fn enter(command: &std::process::Command, procs_files: &[PathBuf]) -> tokio::process::Command {
    // `$$` is the shell, which `exec` turns into the program.
    const SCRIPT: &str = r#"n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done
exec "$@""#;
    let mut wrapped = tokio::process::Command::new("/bin/sh");
    wrapped
        .args(["-c", SCRIPT, "sh"])
        .arg(procs_files.len().to_string())
        .args(procs_files)
        .arg(command.get_program())
        .args(command.get_args());
    // The shell exports `PWD`, which bubblewrap would inherit: make it `/`,
    // not the runner's directory.
    wrapped.env_clear().current_dir("/");
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            wrapped.env(key, value);
        }
    }
    wrapped
}
