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
