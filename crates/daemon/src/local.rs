//! The local executor: each runner is a child process of the daemon.
//! The token is written to the runner's stdin, which is then closed.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::executor::{
    Executor, ExecutorError, Launch, RunnerEnded, RunnerProcess, Tail, with_output,
};

/// The daemon's environment variables a runner inherits.
const RUNNER_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "TMPDIR",
    "CUSTODY_LOG",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Starts `PROGRAM runner …` for each job.
pub struct LocalExecutor {
    /// The `custody` binary (the daemon's own, by default).
    program: PathBuf,
}

impl LocalExecutor {
    pub fn new(program: PathBuf) -> Self {
        Self { program }
    }

    /// Runners from the binary the daemon itself runs from.
    pub fn current_binary() -> Result<Self, ExecutorError> {
        let program = std::env::current_exe().map_err(|e| ExecutorError::Misconfigured {
            executor: "local".into(),
            reason: format!("cannot find the custody binary: {e}"),
        })?;
        Ok(Self::new(program))
    }
}

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<RunnerProcess, ExecutorError>> {
        async move {
            let failed = |reason: String| ExecutorError::StartFailed {
                executor: "local".into(),
                reason,
            };
            let mut child = Command::new(&self.program)
                .arg("runner")
                .arg("--daemon")
                .arg(&launch.daemon_addr)
                .arg("--job-id")
                .arg(&launch.job_id)
                .arg("--token-stdin")
                // Nothing of the daemon's environment passes but what a
                // runner needs; the certificate is public, the token is not
                // and goes through stdin.
                .env_clear()
                .envs(
                    std::env::vars_os()
                        .filter(|(k, _)| RUNNER_ENV.iter().any(|allowed| k == allowed)),
                )
                .env("CUSTODY_DAEMON_CERT", &launch.certificate_pem)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| failed(format!("cannot run `{}`: {e}", self.program.display())))?;
            let pid = child.id().unwrap_or_default();
            let mut stdin = child.stdin.take().expect("stdin is piped");
            // A runner that died at once closes the pipe: that is reported
            // through `ended`, with its output.
            let _ = stdin
                .write_all(format!("{}\n", launch.token.expose()).as_bytes())
                .await;
            drop(stdin);

            let tail = Arc::new(Mutex::new(Tail::default()));
            let stderr = child.stderr.take().expect("stderr is piped");
            let reader = {
                let tail = tail.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tail.lock().expect("never poisoned").push(line);
                    }
                })
            };
            let ended = async move {
                let status = child.wait().await;
                let _ = reader.await;
                let tail = tail.lock().expect("never poisoned").render();
                match status {
                    Ok(status) => RunnerEnded {
                        success: status.success(),
                        detail: with_output(
                            format!("the runner (pid {pid}) exited with {status}"),
                            &tail,
                        ),
                    },
                    Err(e) => RunnerEnded {
                        success: false,
                        detail: format!("waiting for the runner (pid {pid}) failed: {e}"),
                    },
                }
            }
            .boxed();
            let stop = Box::new(move || {
                async move {
                    // The runner leads its own process group: stop it and its steps.
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                .boxed()
            });
            Ok(RunnerProcess {
                description: format!("pid {pid}"),
                ended,
                stop,
            })
        }
        .boxed()
    }
}
