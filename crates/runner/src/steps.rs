//! Running a job's steps one by one, streaming their output.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use custody_wire::rpc::proto::{self, Event, event::Kind, log_line};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::cgroup::{Limits, StepCgroup};
use crate::event;
use crate::sandbox::{Root, Sandbox};

type Events = mpsc::Sender<Result<Event, Status>>;

/// Runs every step in order; stops at the first failure or on cancel.
pub(crate) async fn run_all(
    job: &proto::Job,
    sandbox: &Sandbox,
    events: &Events,
    mut cancel: watch::Receiver<Option<String>>,
) -> proto::Finished {
    if let Err(error) = prepare_source(job, &sandbox.workspace).await {
        return failed(format!("source: {error}"));
    }
    for (index, step) in job.steps.iter().enumerate() {
        let index = index as u32;
        if let Some(reason) = cancel.borrow().clone() {
            return cancelled(reason);
        }
        // A step image becomes this step's root filesystem.
        let rootfs = sandbox.workspace.with_file_name(format!("rootfs-{index}"));
        let image_digest = if step.image.is_empty() {
            String::new()
        } else {
            match prepare_image(&step.image, job, &rootfs).await {
                Ok(digest) => digest,
                Err(error) => {
                    return proto::Finished {
                        success: false,
                        cancelled: false,
                        error: format!("step `{}`: image `{}`: {error}", step.name, step.image),
                    };
                }
            }
        };
        let root = if step.image.is_empty() {
            Root::Host
        } else {
            Root::Image(&rootfs)
        };
        let _ = events
            .send(Ok(event(Kind::StepStarted(proto::StepStarted {
                index,
                name: step.name.clone(),
                image_digest,
            }))))
            .await;
        let limits = step.limits.unwrap_or_default();
        let limits = Limits::or_defaults(limits.memory_bytes, limits.pids);
        let cgroup = match StepCgroup::create(&format!("custody-{}-{index}", job.job_id), limits) {
            Ok(Some(cgroup)) => Some(cgroup),
            Ok(None) => {
                if index == 0 {
                    tracing::warn!(
                        "cannot create cgroups here: steps run without memory and process limits"
                    );
                }
                None
            }
            Err(e) => {
                return failed(format!(
                    "step `{}`: cannot set up its cgroup: {e}",
                    step.name
                ));
            }
        };
        let outcome = run_step(
            index,
            step,
            sandbox,
            root,
            cgroup.as_ref(),
            events,
            &mut cancel,
        )
        .await;
        let out_of_memory = cgroup.as_ref().is_some_and(StepCgroup::oom_killed);
        let out_of_pids = cgroup.as_ref().is_some_and(StepCgroup::pids_exhausted);
        drop(cgroup);
        match outcome {
            Ok(StepEnd::Exited(code)) => {
                let _ = events
                    .send(Ok(event(Kind::StepFinished(proto::StepFinished {
                        index,
                        exit_code: code,
                        timed_out: false,
                    }))))
                    .await;
                if code != 0 && out_of_memory {
                    return failed(format!(
                        "step `{}` ran out of memory (limit {} MiB) and was killed",
                        step.name,
                        limits.memory_bytes >> 20
                    ));
                }
                if code != 0 {
                    let hint = if out_of_pids {
                        format!(" (it hit its limit of {} processes)", limits.pids)
                    } else {
                        String::new()
                    };
                    return failed(format!(
                        "step `{}` exited with code {code}{hint}",
                        step.name
                    ));
                }
            }
            Ok(StepEnd::TimedOut) => {
                let _ = events
                    .send(Ok(event(Kind::StepFinished(proto::StepFinished {
                        index,
                        exit_code: -1,
                        timed_out: true,
                    }))))
                    .await;
                return proto::Finished {
                    success: false,
                    cancelled: false,
                    error: format!(
                        "step `{}` timed out after {} s",
                        step.name, step.timeout_seconds
                    ),
                };
            }
            Ok(StepEnd::Cancelled(reason)) => return cancelled(reason),
            Err(err) => {
                return proto::Finished {
                    success: false,
                    cancelled: false,
                    error: format!("step `{}` could not start: {err}", step.name),
                };
            }
        }
    }
    // The runner, not the steps, reads what they produced and pushes it.
    if let Err(error) = crate::push::push_outputs(job, sandbox, events).await {
        return proto::Finished {
            success: false,
            cancelled: false,
            error,
        };
    }
    proto::Finished {
        success: true,
        cancelled: false,
        error: String::new(),
    }
}

/// Pulls and unpacks a step image; returns the digest it resolved to.
async fn prepare_image(
    image: &str,
    job: &proto::Job,
    rootfs: &std::path::Path,
) -> Result<String, String> {
    let reference: custody_oci::Reference = image
        .parse()
        .map_err(|e: custody_oci::Error| e.to_string())?;
    let options = crate::push::registry_options(job);
    let resolved = crate::rootfs::prepare(&reference, &options, rootfs)
        .await
        .map_err(|e| e.to_string())?;
    Ok(resolved.digest.to_string())
}

fn failed(error: String) -> proto::Finished {
    proto::Finished {
        success: false,
        cancelled: false,
        error,
    }
}

/// Puts the job's source into the workspace: a git repository checked out
/// at the commit the daemon resolved, or a copy of a local directory.
async fn prepare_source(job: &proto::Job, workspace: &std::path::Path) -> Result<(), String> {
    use proto::source::Kind as SourceKind;
    match job.source.as_ref().and_then(|s| s.kind.as_ref()) {
        None => Ok(()),
        Some(SourceKind::Git(git)) => custody_source::fetch(&git.url, &git.commit, workspace)
            .await
            .map_err(|e| e.to_string()),
        Some(SourceKind::LocalDirectory(dir)) => {
            custody_source::copy_local(std::path::Path::new(dir), workspace)
                .await
                .map_err(|e| e.to_string())
        }
    }
}

fn cancelled(reason: String) -> proto::Finished {
    proto::Finished {
        success: false,
        cancelled: true,
        error: reason,
    }
}

enum StepEnd {
    Exited(i32),
    TimedOut,
    Cancelled(String),
}

async fn run_step(
    index: u32,
    step: &proto::Step,
    sandbox: &Sandbox,
    root: Root<'_>,
    cgroup: Option<&StepCgroup>,
    events: &Events,
    cancel: &mut watch::Receiver<Option<String>>,
) -> std::io::Result<StepEnd> {
    let mut command = sandbox.command(step, root);
    if let Some(cgroup) = cgroup {
        command = crate::cgroup::enter(command.as_std(), &cgroup.procs_files());
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so everything the step starts can be killed.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let stdout = forward(
        index,
        log_line::Stream::Stdout,
        child.stdout.take().expect("piped"),
        events.clone(),
    );
    let stderr = forward(
        index,
        log_line::Stream::Stderr,
        child.stderr.take().expect("piped"),
        events.clone(),
    );
    let limit = match step.timeout_seconds {
        0 => Duration::MAX,
        s => Duration::from_secs(u64::from(s)),
    };
    let kill_group = || {
        if let Some(group) = group {
            let _ = killpg(group, Signal::SIGKILL);
        }
    };
    let end = tokio::select! {
        status = child.wait() => {
            let status = status?;
            StepEnd::Exited(status.code().unwrap_or(-1))
        }
        () = sleep_or_forever(limit) => {
            kill_group();
            let _ = child.wait().await;
            StepEnd::TimedOut
        }
        reason = wait_cancel(cancel) => {
            kill_group();
            let _ = child.wait().await;
            StepEnd::Cancelled(reason)
        }
    };
    // Output written before the end is all sent before the step's end event.
    let _ = tokio::join!(stdout, stderr);
    Ok(end)
}

async fn sleep_or_forever(limit: Duration) {
    if limit == Duration::MAX {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(limit).await;
}

async fn wait_cancel(cancel: &mut watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(reason) = cancel.borrow_and_update().clone() {
            return reason;
        }
        if cancel.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Sends each line as soon as it is read; a long line without a newline is
/// sent in pieces rather than held.
fn forward(
    index: u32,
    stream: log_line::Stream,
    output: impl AsyncRead + Unpin + Send + 'static,
    events: Events,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::with_capacity(64 * 1024, output);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader)
                .take(64 * 1024)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            };
            if line.ends_with(b"\n") {
                line.pop();
            }
            let log = proto::LogLine {
                step: index,
                stream: stream as i32,
                line: std::mem::take(&mut line),
                unix_millis: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
            };
            if events.send(Ok(event(Kind::Log(log)))).await.is_err() {
                break;
            }
        }
    })
}
