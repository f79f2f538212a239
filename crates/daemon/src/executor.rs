//! Executors start runners somewhere: a child process here, a Slurm job on
//! a cluster, a Kubernetes Job later. The daemon does not care where; it
//! only needs the runner started with its launch details, to hear if the
//! runner dies before the job is done, and to be able to stop it.

use futures_util::future::BoxFuture;

use custody_wire::JobToken;

/// What a runner needs to find its daemon and prove itself.
#[derive(Clone, Debug)]
pub struct Launch {
    pub job_id: String,
    /// Secret: reaches the runner through a pipe or a private file, never
    /// its command line or environment.
    pub token: JobToken,
    /// The daemon's certificate (PEM, public).
    pub certificate_pem: String,
    /// `host:port` where the runner can reach the daemon's connector.
    pub daemon_addr: String,
}

/// A runner that was started.
pub struct RunnerProcess {
    /// Where it runs, for messages: `pid 1234`, `slurm job 42`.
    pub description: String,
    /// Resolves when the runner is gone, with what is known of why.
    pub ended: BoxFuture<'static, RunnerEnded>,
    /// Stops the runner (and what it started); safe to call after it ended.
    pub stop: Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>,
}

/// How a runner ended, as far as its executor can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerEnded {
    pub success: bool,
    /// The exit status or scheduler state, and the last lines the runner
    /// printed, for the job's failure reason.
    pub detail: String,
}

/// Why an executor could not start a runner.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecutorError {
    /// The executor is set up wrongly; nothing was started.
    #[error("executor `{executor}` is misconfigured: {reason}")]
    Misconfigured { executor: String, reason: String },
    /// Starting failed.
    #[error("executor `{executor}` could not start the runner: {reason}")]
    StartFailed { executor: String, reason: String },
}

/// Starts runners. Implementations must keep the token off command lines
/// and out of any environment a step could read.
pub trait Executor: Send + Sync + 'static {
    /// A short name for messages and provenance (`local`, `slurm`).
    fn name(&self) -> &'static str;

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<RunnerProcess, ExecutorError>>;
}

/// Settings an executor may be built from (the daemon's configuration).
#[derive(Clone, Debug, Default)]
pub struct ExecutorSettings {
    /// The `custody` binary runners are started from (as the place where
    /// they run sees it).
    pub runner_program: std::path::PathBuf,
    /// For `slurm`: a directory shared with the compute nodes.
    pub spool_dir: Option<std::path::PathBuf>,
    /// For `slurm`: extra `sbatch` arguments.
    pub sbatch_args: Vec<String>,
}

/// Builds the executor named `kind`. An unknown kind, or settings it cannot
/// work with, fail here, before any job is started.
pub fn build(
    kind: &str,
    settings: &ExecutorSettings,
) -> Result<std::sync::Arc<dyn Executor>, ExecutorError> {
    match kind {
        "local" => Ok(std::sync::Arc::new(crate::local::LocalExecutor::new(
            settings.runner_program.clone(),
        ))),
        "slurm" => {
            let spool_dir =
                settings
                    .spool_dir
                    .clone()
                    .ok_or_else(|| ExecutorError::Misconfigured {
                        executor: "slurm".into(),
                        reason: "it needs a spool directory shared with the compute nodes".into(),
                    })?;
            if !settings.runner_program.is_absolute() {
                return Err(ExecutorError::Misconfigured {
                    executor: "slurm".into(),
                    reason: format!(
                        "the runner program `{}` must be an absolute path",
                        settings.runner_program.display()
                    ),
                });
            }
            let mut executor =
                crate::slurm::SlurmExecutor::new(settings.runner_program.clone(), spool_dir);
            executor.sbatch_args = settings.sbatch_args.clone();
            Ok(std::sync::Arc::new(executor))
        }
        other => Err(ExecutorError::Misconfigured {
            executor: other.to_owned(),
            reason: "unknown executor kind; use `local` or `slurm`".into(),
        }),
    }
}

/// Keeps the last lines of a stream of output, for failure messages.
#[derive(Default)]
pub(crate) struct Tail {
    lines: std::collections::VecDeque<String>,
}

impl Tail {
    const KEEP: usize = 8;

    pub(crate) fn push(&mut self, line: String) {
        if self.lines.len() == Self::KEEP {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    pub(crate) fn render(&self) -> String {
        self.lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// `detail` followed by the runner's last output lines, if it printed any.
pub(crate) fn with_output(detail: String, tail: &str) -> String {
    if tail.trim().is_empty() {
        detail
    } else {
        format!("{detail}; its last output:\n{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_or_misconfigured_executors_are_refused_up_front() {
        let settings = ExecutorSettings {
            runner_program: "/usr/bin/custody".into(),
            ..Default::default()
        };
        let err = build("kubernetes", &settings).err().unwrap().to_string();
        assert!(
            err.contains("`kubernetes`") && err.contains("unknown executor kind"),
            "{err}"
        );
        let err = build("slurm", &settings).err().unwrap().to_string();
        assert!(err.contains("spool directory"), "{err}");
        let relative = ExecutorSettings {
            runner_program: "custody".into(),
            spool_dir: Some("/tmp".into()),
            ..Default::default()
        };
        assert!(
            build("slurm", &relative)
                .err()
                .unwrap()
                .to_string()
                .contains("absolute path")
        );
        assert_eq!(build("local", &settings).unwrap().name(), "local");
    }
}
