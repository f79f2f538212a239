//! Running a job's steps one by one, inside the step boundary, streaming
//! their output.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use custody_wire::events::{
    Egress, Isolation, JobEnd, LogLine, RunnerEvent, StepEnd as Ended, Stream,
};
use custody_wire::rpc::proto;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

use crate::EventSink;
use crate::cgroup::{Limits, StepCgroup};
use crate::egress::{self, HostPattern, Policy};
use crate::jobdir::JobDir;
use crate::logs::Log;
use crate::netns::StepNetwork;
use crate::rootfs::ImageLimits;
use crate::sandbox::{Root, Sandbox};

/// At most this many refused destinations are told per step.
const MAX_EGRESS_NOTES: u32 = 100;

/// Everything a job's steps run within.
pub(crate) struct Boundary {
    pub jobdir: JobDir,
    pub sandbox: Sandbox,
    pub policy: Arc<Policy>,
    /// Where steps push images themselves and read `pulls`, when the spec
    /// declares either.
    pub gateway: Option<crate::gateway::BuildGateway>,
    pub log_bytes: u64,
    pub image_limits: ImageLimits,
    /// What could not be enforced here (for the log and the provenance).
    pub notes: Vec<String>,
}

/// Runs every step in order; stops at the first failure or on cancel.
pub(crate) async fn run_all(
    job: &proto::Job,
    boundary: &Boundary,
    events: &EventSink,
    mut cancel: watch::Receiver<Option<String>>,
) -> JobEnd {
    let cgroups = crate::cgroup::supported(&job.job_id);
    let mut notes = boundary.notes.clone();
    if !cgroups {
        notes.push(
            "memory and process limits are not enforced: the runner cannot create cgroups here"
                .into(),
        );
    }
    for note in &notes {
        tracing::warn!("{note}");
    }
    let bounds = job.bounds.clone().unwrap_or_default();
    events
        .send(RunnerEvent::Isolation(Isolation {
            uid_map: boundary.sandbox.ids.uid_map(),
            gid_map: boundary.sandbox.ids.gid_map(),
            disk_bytes: boundary.jobdir.disk_limit,
            cgroups,
            log_bytes: boundary.log_bytes,
            egress_allow: bounds.egress_allow,
            notes,
        }))
        .await;
    if let Err(error) = prepare_source(job, &boundary.jobdir).await {
        return JobEnd::Failed(format!("source: {error}"));
    }
    let mut log = Log::new(boundary.log_bytes, events.clone());
    let mut outcome = None;
    for (index, step) in job.steps.iter().enumerate() {
        if let Some(reason) = cancel.borrow().clone() {
            outcome = Some(JobEnd::Cancelled(reason));
            break;
        }
        if let Err(finished) = run_one(
            index as u32,
            step,
            job,
            boundary,
            events,
            &mut log,
            &mut cancel,
        )
        .await
        {
            outcome = Some(finished);
            break;
        }
    }
    // The log's kept tail goes out before anything else happens.
    log.finish().await;
    let end = match outcome {
        Some(finished) => finished,
        // The runner, not the steps, reads what they produced and pushes it.
        None => match crate::push::push_outputs(job, boundary, events).await {
            Ok(()) => JobEnd::Succeeded,
            Err(error) => JobEnd::Failed(error),
        },
    };
    // Destination sessions the gateway streamed steps' uploads to and that
    // were not completed go, whatever the end: a failed build leaves no
    // blob at a destination.
    if let Some(gateway) = &boundary.gateway {
        gateway.cancel_onward().await;
    }
    end
}

/// One step, from its image to its end; `Err` ends the job.
async fn run_one(
    index: u32,
    step: &proto::Step,
    job: &proto::Job,
    boundary: &Boundary,
    events: &EventSink,
    log: &mut Log,
    cancel: &mut watch::Receiver<Option<String>>,
) -> Result<(), JobEnd> {
    // A step image becomes this step's root filesystem.
    let rootfs = boundary.jobdir.rootfs(index);
    let (image_digest, image_env) = if step.image.is_empty() {
        (None, Vec::new())
    } else {
        let (digest, env) = prepare_image(&step.image, job, boundary, &rootfs)
            .await
            .map_err(|error| {
                JobEnd::Failed(format!(
                    "step `{}`: image `{}`: {error}",
                    step.name, step.image
                ))
            })?;
        (Some(digest), env)
    };
    let root = if step.image.is_empty() {
        Root::Host
    } else {
        Root::Image(&rootfs)
    };
    events
        .send(RunnerEvent::StepStarted {
            index,
            name: step.name.clone(),
            image_digest,
        })
        .await;
    let limits = step.limits.unwrap_or_default();
    let limits = Limits::or_defaults(limits.memory_bytes, limits.pids);
    let cgroup =
        StepCgroup::create(&format!("custody-{}-{index}", job.job_id), limits).map_err(|e| {
            JobEnd::Failed(format!(
                "step `{}`: cannot set up its cgroup: {e}",
                step.name
            ))
        })?;
    let network = if boundary.sandbox.ids.privileged {
        tokio::task::spawn_blocking(StepNetwork::create)
            .await
            .expect("making a namespace does not panic")
            .map_err(|e| JobEnd::Failed(format!("step `{}`: {e}", step.name)))?
    } else {
        StepNetwork::made_by_sandbox()
    };
    // The image's own environment comes first (its `PATH` replaces the
    // default one); what the runner sets for the step, then the step's
    // `env`, go over it.
    let (proxy, proxy_env) = if step.network {
        let proxy = egress_proxy(index, step, &network, boundary, events).map_err(|e| {
            JobEnd::Failed(format!(
                "step `{}`: cannot serve its egress proxy: {e}",
                step.name
            ))
        })?;
        let env = proxy.env.clone();
        (Some(proxy), env)
    } else {
        (None, Vec::new())
    };
    let mut extra_env = image_env;
    extra_env.extend(proxy_env);
    let registry = match &boundary.gateway {
        Some(gateway) => {
            let serving = gateway.serve_in(&network).map_err(|e| {
                if let Some(proxy) = &proxy {
                    proxy.task.abort();
                }
                JobEnd::Failed(format!(
                    "step `{}`: cannot serve the registry gateway (`pushes`, `pulls`): {e}",
                    step.name
                ))
            })?;
            extra_env.push(crate::gateway::env());
            Some(serving)
        }
        None => None,
    };

    let outcome = run_step(
        step,
        boundary,
        root,
        &extra_env,
        &network,
        cgroup.as_ref(),
        log,
        index,
        cancel,
    )
    .await;
    if let Some(proxy) = proxy {
        // Every destination the step reached is told before its end.
        proxy.stop().await;
    }
    if let (Some(serving), Some(gateway)) = (registry, &boundary.gateway) {
        serving.stop().await;
        gateway.step_ended(&step.name);
    }
    let limited = Limited {
        memory: cgroup.as_ref().is_some_and(StepCgroup::oom_killed),
        pids: cgroup.as_ref().is_some_and(StepCgroup::pids_exhausted),
        disk: boundary
            .jobdir
            .disk_limit
            .filter(|_| boundary.jobdir.disk_full()),
    };
    if let Some(cgroup) = cgroup
        && let Err(e) = cgroup.remove().await
    {
        tracing::warn!(step = %step.name, "{e}");
    }
    let end = match &outcome {
        Ok(StepEnd::Exited(code)) => Some(Ended::Exited(*code)),
        Ok(StepEnd::TimedOut) => Some(Ended::TimedOut),
        _ => None,
    };
    if let Some(end) = end {
        events.send(RunnerEvent::StepFinished { index, end }).await;
    }
    ended(step, outcome, limited, limits)
}

/// Which of its limits a step ran into.
struct Limited {
    memory: bool,
    pids: bool,
    /// The disk limit, when the disk is full.
    disk: Option<u64>,
}

/// Whether the job goes on after a step ended this way, and if not, why.
fn ended(
    step: &proto::Step,
    outcome: std::io::Result<StepEnd>,
    limited: Limited,
    limits: Limits,
) -> Result<(), JobEnd> {
    let name = &step.name;
    match outcome {
        Ok(StepEnd::Exited(0)) => Ok(()),
        Ok(StepEnd::Exited(_)) if limited.memory => Err(JobEnd::Failed(format!(
            "step `{name}` ran out of memory (limit {} MiB) and was killed",
            limits.memory_bytes >> 20
        ))),
        Ok(StepEnd::Exited(code)) => Err(JobEnd::Failed(match limited.disk {
            Some(limit) => format!(
                "step `{name}` exceeded its disk limit of {} (it exited with code {code})",
                crate::human_bytes(limit)
            ),
            None if limited.pids => format!(
                "step `{name}` exited with code {code} (it hit its limit of {} processes)",
                limits.pids
            ),
            None => format!("step `{name}` exited with code {code}"),
        })),
        Ok(StepEnd::TimedOut) => Err(JobEnd::Failed(format!(
            "step `{name}` timed out after {} s",
            step.timeout_seconds
        ))),
        Ok(StepEnd::Cancelled(reason)) => Err(JobEnd::Cancelled(reason)),
        Err(err) => Err(JobEnd::Failed(format!(
            "step `{name}` could not start: {err}"
        ))),
    }
}

/// The egress proxy of one step.
struct Proxy {
    task: tokio::task::JoinHandle<()>,
    /// Sends what the proxy records and notes as events; ends once the
    /// proxy and all its connections are gone.
    told: tokio::task::JoinHandle<()>,
    /// What points the step's clients at it.
    env: Vec<(String, String)>,
}

impl Proxy {
    /// Stops serving, closes what is still open, and returns once every
    /// destination reached has been sent as an event.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = self.told.await;
    }
}

/// What the proxy tells while it serves.
enum Told {
    Note(String),
    Contact(egress::Contact),
}

/// Serves the egress proxy on the step's loopback.
fn egress_proxy(
    index: u32,
    step: &proto::Step,
    network: &StepNetwork,
    boundary: &Boundary,
    events: &EventSink,
) -> std::io::Result<Proxy> {
    // The daemon parsed the list; a runner still refuses what it cannot read.
    let hosts = step
        .hosts
        .iter()
        .map(|h| HostPattern::parse(h).map_err(std::io::Error::other))
        .collect::<std::io::Result<Vec<_>>>()?;
    let rules = egress::Rules {
        policy: boundary.policy.clone(),
        hosts,
    };
    let listener = tokio::net::TcpListener::from_std(network.listen()?)?;
    let port = listener.local_addr()?.port();
    // Refusals are told in the step's log, a bounded number of them.
    let (notes, mut incoming) = mpsc::unbounded_channel::<Told>();
    let contacts = notes.clone();
    let told = Arc::new(AtomicU32::new(0));
    let proxy = egress::serve(
        listener,
        rules,
        move |refusal| {
            let n = told.fetch_add(1, Ordering::Relaxed);
            if n < MAX_EGRESS_NOTES {
                let _ = notes.send(Told::Note(format!("[custody] {refusal}")));
            } else if n == MAX_EGRESS_NOTES {
                let _ = notes.send(Told::Note(
                    "[custody] more egress was refused; not told further".into(),
                ));
            }
        },
        move |contact| {
            let _ = contacts.send(Told::Contact(contact));
        },
    );
    let events = events.clone();
    let told = tokio::spawn(async move {
        while let Some(told) = incoming.recv().await {
            let event = match told {
                Told::Note(note) => RunnerEvent::Log(LogLine {
                    step: index,
                    stream: Stream::Stderr,
                    line: note.into_bytes(),
                    unix_millis: now_millis(),
                }),
                Told::Contact(contact) => RunnerEvent::Egress(Egress {
                    step: index,
                    uri: contact.uri,
                    sha256: contact.sha256,
                    bytes_sent: contact.bytes_sent,
                    bytes_received: contact.bytes_received,
                }),
            };
            if !events.send(event).await {
                break;
            }
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    let mut no_proxy = "localhost,127.0.0.1,::1".to_owned();
    if boundary.gateway.is_some() {
        // Clients that match `NO_PROXY` by `host:port` find the gateway too.
        no_proxy.push(',');
        no_proxy.push_str(&crate::gateway::address());
    }
    let env = [
        ("HTTP_PROXY", url.clone()),
        ("HTTPS_PROXY", url.clone()),
        ("http_proxy", url.clone()),
        ("https_proxy", url),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    Ok(Proxy {
        task: proxy,
        told,
        env,
    })
}

/// Pulls and unpacks a step image; returns the digest it resolved to.
async fn prepare_image(
    image: &str,
    job: &proto::Job,
    boundary: &Boundary,
    rootfs: &std::path::Path,
) -> Result<(String, Vec<(String, String)>), String> {
    let reference: custody_oci::Reference = image
        .parse()
        .map_err(|e: custody_oci::Error| e.to_string())?;
    let options = crate::push::registry_options(job);
    let ids = boundary.sandbox.ids;
    let resolved = crate::rootfs::prepare(
        &reference,
        &options,
        rootfs,
        &boundary.jobdir.private,
        boundary.image_limits,
        ids.privileged.then_some(ids),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((resolved.digest.to_string(), resolved.env))
}

/// Puts the job's source into the workspace: a git repository checked out
/// at the commit the daemon resolved, or a copy of a local directory; then
/// gives it to the steps' root.
async fn prepare_source(job: &proto::Job, jobdir: &JobDir) -> Result<(), String> {
    use proto::source::Kind as SourceKind;
    let workspace = &jobdir.workspace;
    match job.source.as_ref().and_then(|s| s.kind.as_ref()) {
        None => Ok(()),
        Some(SourceKind::Git(git)) => {
            let url = custody_source::GitUrl::parse(&git.url).map_err(|e| e.to_string())?;
            let pinned = match git.pinned.as_str() {
                "" => None,
                addr => Some(
                    addr.parse()
                        .map_err(|_| format!("bad source pin `{addr}`"))?,
                ),
            };
            let remote = custody_source::Remote::new(&url).pinned(pinned);
            custody_source::fetch(&remote, &git.commit, workspace)
                .await
                .map_err(|e| e.to_string())
        }
        Some(SourceKind::LocalDirectory(dir)) => {
            custody_source::copy_local(std::path::Path::new(dir), workspace)
                .await
                .map_err(|e| e.to_string())
        }
    }?;
    if !job.workdir.is_empty() {
        // A real directory of the source: not a symlink on the way, not a
        // path out of it.
        let found = custody_oci::beneath::Dir::open(workspace)
            .and_then(|dir| dir.open_dir(std::path::Path::new(&job.workdir)));
        if found.is_err() {
            return Err(format!(
                "the build runs in `{}`, which is not a directory of the source (a symlink is not followed)",
                job.workdir
            ));
        }
    }
    let (ids, workspace) = (jobdir.ids, workspace.clone());
    tokio::task::spawn_blocking(move || crate::jobdir::give_to_steps(ids, &workspace))
        .await
        .expect("changing owners does not panic")
        .map_err(|e| e.to_string())
}

enum StepEnd {
    Exited(i32),
    TimedOut,
    Cancelled(String),
}

#[allow(clippy::too_many_arguments)]
async fn run_step(
    step: &proto::Step,
    boundary: &Boundary,
    root: Root<'_>,
    extra_env: &[(String, String)],
    network: &StepNetwork,
    cgroup: Option<&StepCgroup>,
    log: &mut Log,
    index: u32,
    cancel: &mut watch::Receiver<Option<String>>,
) -> std::io::Result<StepEnd> {
    let (mut child, _spawner) = boundary
        .sandbox
        .start(step, root, extra_env, network, cgroup)
        .await?;
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let limit = match step.timeout_seconds {
        0 => Duration::MAX,
        s => Duration::from_secs(u64::from(s)),
    };
    let kill_group = || {
        if let Some(group) = group {
            let _ = killpg(group, Signal::SIGKILL);
        }
    };
    let end = async {
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                Ok(StepEnd::Exited(status.code().unwrap_or(-1)))
            }
            () = sleep_or_forever(limit) => {
                kill_group();
                let _ = child.wait().await;
                Ok(StepEnd::TimedOut)
            }
            reason = wait_cancel(cancel) => {
                kill_group();
                let _ = child.wait().await;
                Ok(StepEnd::Cancelled(reason))
            }
        }
    };
    // Output written before the end is all sent before the step's end event.
    let (end, ()) = tokio::join!(end, log.follow(index, stdout, stderr));
    end
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

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
