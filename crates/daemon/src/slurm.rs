//! The Slurm executor: each runner is a Slurm batch job.
//!
//! The token and the daemon's certificate go in files in a spool directory
//! shared with the compute nodes, the token file private (0600) and deleted
//! by the runner as soon as it is read, so the token is never on a command
//! line nor in the job's environment (which `scontrol` can show). The job is
//! watched with `squeue`/`scontrol` and stopped with `scancel`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::process::Command;

use crate::executor::{Executor, ExecutorError, Launch, RunnerEnded, RunnerProcess, with_output};

/// How to submit runners to Slurm.
#[derive(Clone, Debug)]
pub struct SlurmExecutor {
    /// The `custody` binary as the compute nodes see it.
    pub program: PathBuf,
    /// A directory shared with the compute nodes, for token, certificate
    /// and output files.
    pub spool_dir: PathBuf,
    /// Extra `sbatch` arguments (`--partition=…`, `--time=…`).
    pub sbatch_args: Vec<String>,
    /// Environment for the Slurm commands themselves (e.g. `SLURM_CONF`).
    pub command_env: Vec<(String, String)>,
    /// How often a job's state is checked.
    pub poll_interval: Duration,
}

impl SlurmExecutor {
    pub fn new(program: PathBuf, spool_dir: PathBuf) -> Self {
        Self {
            program,
            spool_dir,
            sbatch_args: Vec::new(),
            command_env: Vec::new(),
            poll_interval: Duration::from_millis(500),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.envs(self.command_env.iter().map(|(k, v)| (k, v)));
        command.stdin(Stdio::null());
        command
    }

    fn misconfigured(&self, reason: String) -> ExecutorError {
        ExecutorError::Misconfigured {
            executor: "slurm".into(),
            reason,
        }
    }

    async fn submit(&self, launch: &Launch) -> Result<(String, Files), ExecutorError> {
        if !self.program.is_absolute() {
            return Err(self.misconfigured(format!(
                "the runner program `{}` must be an absolute path valid on the compute nodes",
                self.program.display()
            )));
        }
        tokio::fs::create_dir_all(&self.spool_dir)
            .await
            .map_err(|e| {
                self.misconfigured(format!(
                    "cannot create the spool directory `{}`: {e}",
                    self.spool_dir.display()
                ))
            })?;
        let files = Files::new(&self.spool_dir, &launch.job_id);
        let write_failed = |path: &Path, e: std::io::Error| {
            self.misconfigured(format!("cannot write `{}`: {e}", path.display()))
        };
        write_private(&files.token, launch.token.expose())
            .map_err(|e| write_failed(&files.token, e))?;
        fs_err::write(&files.certificate, &launch.certificate_pem)
            .map_err(|e| write_failed(&files.certificate, e))?;

        let script = [
            quote(&self.program.to_string_lossy()),
            "runner".into(),
            "--daemon".into(),
            quote(&launch.daemon_addr),
            "--job-id".into(),
            quote(&launch.job_id),
            "--token-file".into(),
            quote(&files.token.to_string_lossy()),
            "--daemon-cert-file".into(),
            quote(&files.certificate.to_string_lossy()),
        ]
        .join(" ");
        let output = self
            .command("sbatch")
            .arg("--parsable")
            .arg(format!("--job-name=custody-{}", launch.job_id))
            .arg(format!("--output={}", files.output.display()))
            .arg(format!("--chdir={}", self.spool_dir.display()))
            // The job starts with a clean environment: nothing of the daemon's.
            .arg("--export=NONE")
            .args(&self.sbatch_args)
            .arg("--wrap")
            .arg(script)
            .output()
            .await
            .map_err(|e| {
                files.remove();
                if e.kind() == std::io::ErrorKind::NotFound {
                    self.misconfigured("`sbatch` is not installed or not on PATH".into())
                } else {
                    ExecutorError::StartFailed {
                        executor: "slurm".into(),
                        reason: format!("running sbatch: {e}"),
                    }
                }
            })?;
        if !output.status.success() {
            files.remove();
            return Err(ExecutorError::StartFailed {
                executor: "slurm".into(),
                reason: format!(
                    "sbatch failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        // `--parsable` prints `ID` or `ID;CLUSTER`.
        let id = stdout
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_owned();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            files.remove();
            return Err(ExecutorError::StartFailed {
                executor: "slurm".into(),
                reason: format!("sbatch printed no job id: {stdout:?}"),
            });
        }
        Ok((id, files))
    }

    /// Waits until Slurm no longer runs the job; says how it ended.
    async fn watch(self, id: String, files: Files) -> RunnerEnded {
        loop {
            tokio::time::sleep(self.poll_interval).await;
            let state = self
                .command("squeue")
                .args(["-h", "-j", &id, "-o", "%T"])
                .output()
                .await;
            let active = match &state {
                Ok(out) if out.status.success() => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    let text = text.trim();
                    !text.is_empty()
                        && !matches!(
                            text,
                            "COMPLETED"
                                | "FAILED"
                                | "CANCELLED"
                                | "TIMEOUT"
                                | "NODE_FAIL"
                                | "OUT_OF_MEMORY"
                                | "PREEMPTED"
                                | "BOOT_FAIL"
                                | "DEADLINE"
                        )
                }
                // squeue fails for job ids it has forgotten: the job is gone.
                _ => false,
            };
            if active {
                continue;
            }
            let details = self
                .command("scontrol")
                .args(["show", "job", "-o", &id])
                .output()
                .await;
            let info = details
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let field = |name: &str| {
                info.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                    .unwrap_or("?")
                    .to_owned()
            };
            let job_state = if info.is_empty() {
                "VANISHED".to_owned()
            } else {
                field("JobState")
            };
            let tail = tail_of(&files.output);
            files.remove();
            return RunnerEnded {
                success: job_state == "COMPLETED",
                detail: with_output(
                    format!(
                        "slurm job {id} ended {job_state} (exit code {}) on node {}",
                        field("ExitCode"),
                        field("NodeList")
                    ),
                    &tail,
                ),
            };
        }
    }
}

impl Executor for SlurmExecutor {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<RunnerProcess, ExecutorError>> {
        async move {
            let (id, files) = self.submit(&launch).await?;
            let ended = self.clone().watch(id.clone(), files).boxed();
            let cancel = {
                let this = self.clone();
                let id = id.clone();
                Box::new(move || {
                    async move {
                        let _ = this.command("scancel").arg(&id).output().await;
                    }
                    .boxed()
                }) as Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>
            };
            Ok(RunnerProcess {
                description: format!("slurm job {id}"),
                ended,
                stop: cancel,
            })
        }
        .boxed()
    }
}

/// The per-job files in the spool directory.
#[derive(Clone, Debug)]
struct Files {
    token: PathBuf,
    certificate: PathBuf,
    output: PathBuf,
}

impl Files {
    fn new(spool: &Path, job_id: &str) -> Self {
        Self {
            token: spool.join(format!("{job_id}.token")),
            certificate: spool.join(format!("{job_id}.crt")),
            output: spool.join(format!("{job_id}.out")),
        }
    }

    fn remove(&self) {
        for path in [&self.token, &self.certificate, &self.output] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Creates `path` readable by its owner only, from the first byte on.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

fn tail_of(path: &Path) -> String {
    let text = fs_err::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Single-quotes a word for `sh`.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
