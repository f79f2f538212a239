//! Memory and process limits for a step, through cgroups.
//!
//! Where the runner may create cgroups (root on cgroup v1, as on the
//! machines custody is tested on; or a cgroup v2 subtree delegated to it with
//! the `memory` and `pids` controllers enabled), each step gets its own
//! cgroup under the runner's, with `memory` and `pids` limits. Elsewhere the
//! step runs without them and the runner logs that once per job. The step is
//! moved into its cgroup while bubblewrap waits for its user namespace to be
//! mapped (see [`crate::sandbox`]), so no process of the step ever runs
//! outside it; when the step ends, whatever is left in it is killed and the
//! cgroup removed.

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

    /// Moves the process `pid` into this cgroup (every hierarchy).
    pub fn add_process(&self, pid: u32) -> std::io::Result<()> {
        for dir in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// The processes still in this cgroup.
    fn processes(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|dir| fs::read(dir.join("cgroup.procs")).ok())
            .flat_map(|text| {
                String::from_utf8_lossy(&text)
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills whatever is left of the step (a process that escaped its
    /// session or process group) and removes the cgroup, trying again until
    /// it is empty; gives up after a few seconds and says so.
    pub async fn remove(mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let left = self.processes();
            if left.is_empty() {
                let mut failed = None;
                for dir in &self.dirs {
                    match std::fs::remove_dir(dir) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => failed = Some(format!("`{}`: {e}", dir.display())),
                    }
                }
                if failed.is_none() {
                    self.dirs.clear();
                    return Ok(());
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(format!(
                        "cannot remove the step's cgroup {}",
                        failed.unwrap_or_default()
                    ));
                }
            } else {
                if self.version == Version::V2 {
                    let _ = fs::write(self.dirs[0].join("cgroup.kill"), "1");
                }
                for pid in left {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                if tokio::time::Instant::now() > deadline {
                    return Err("processes of the step survived SIGKILL".into());
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
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
        // Normally `remove` has emptied `dirs`; this is the fallback.
        for dir in &self.dirs {
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

/// Whether this runner can give steps cgroups: makes and removes a probe.
pub fn supported(job_id: &str) -> bool {
    let limits = Limits::or_defaults(0, 0);
    match StepCgroup::create(&format!("custody-{job_id}-probe"), limits) {
        Ok(Some(mut probe)) => {
            for dir in std::mem::take(&mut probe.dirs) {
                let _ = std::fs::remove_dir(dir);
            }
            true
        }
        _ => false,
    }
}
