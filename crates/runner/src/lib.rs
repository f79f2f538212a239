//! The runner: one process per job, started by an executor. It dials the
//! daemon, authenticates with its one-time token, then serves the runner
//! RPC: the daemon hands it the job and it runs the steps one by one,
//! streaming their output back as it is written.
//!
//! The step boundary — what every step runs within:
//! - [`ids`]: the host ids a step's root maps to (never host root);
//! - [`sandbox`]: bubblewrap with its own user, PID, IPC and UTS namespaces,
//!   no capabilities, the environment it declares and nothing else;
//! - [`netns`]: a network namespace of its own with only `lo`; [`egress`]:
//!   the proxy a `network: true` step reaches the outside through, which
//!   never connects to the host, its neighbours or metadata services;
//! - [`cgroup`]: memory and process limits, and nothing left running after;
//! - [`jobdir`]: the job's directories, 0710 to the step's group, on a disk
//!   of the build's size; [`logs`]: a log that stays within its budget;
//!   [`redact`]: the job's secrets masked in everything sent back;
//! - [`rootfs`]: step images within limits, checked layer by layer;
//! - [`outputs`] and `push`: what steps produced, read without following
//!   anything they planted (`custody_oci::beneath`), pushed by the runner;
//!   [`gateway`]: the registry steps push to themselves (`pushes`), served
//!   on each step's loopback, pushed onward by the runner.
//!
//! The runner's token never reaches steps: it arrives on stdin or in a file
//! that is deleted once read.

#![forbid(unsafe_code)]

pub mod cgroup;
pub mod egress;
pub mod gateway;
pub mod ids;
pub mod jobdir;
pub mod logs;
pub mod netns;
pub mod outputs;
mod push;
pub mod redact;
pub mod rootfs;
pub mod sandbox;
mod steps;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custody_wire::events::RunnerEvent;
use custody_wire::rpc::proto::{self, Event};
use custody_wire::{DialError, JobToken};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Everything a runner needs to find its daemon and prove itself.
pub struct Settings {
    /// `host:port` of the daemon's runner connector.
    pub daemon: String,
    pub job_id: String,
    pub token: JobToken,
    /// The daemon's certificate (PEM): the only one this runner trusts.
    pub certificate_pem: String,
    /// Where steps run; a fresh temporary directory when not given.
    pub workdir: Option<PathBuf>,
    /// How long to try to get through the handshake.
    pub connect_deadline: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("the RPC session with the daemon failed: {0}")]
    Session(#[from] custody_wire::Error),
    #[error("cannot prepare the work directory: {0}")]
    Workdir(#[source] std::io::Error),
}

static MOUNTS_ISOLATED: AtomicBool = AtomicBool::new(false);

/// Keeps every descriptor the runner inherited (whatever its starter
/// left open: a shell's, a service manager's, the daemon's) from reaching
/// a step: each is marked close-on-exec, so bubblewrap, and the step after
/// it, get only the descriptors the runner hands them. Call it first.
pub fn close_inherited_descriptors() {
    close_fds::set_fds_cloexec_threadsafe(3, &[]);
}

/// Gives the runner a mount namespace of its own (root only; call it
/// before any other thread exists): the build's disk is mounted there,
/// invisible to the rest of the host and gone when the runner is, however
/// it ends. Host mounts still show up inside; ours never leak out.
pub fn isolate_mounts() -> Result<(), String> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("cannot make a mount namespace: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make the mount namespace private: {e}"))?;
    MOUNTS_ISOLATED.store(true, Ordering::SeqCst);
    Ok(())
}

pub(crate) fn mounts_isolated() -> bool {
    MOUNTS_ISOLATED.load(Ordering::SeqCst)
}

/// `20 GiB`, `512 MiB`, `300 bytes`: sizes for people.
pub fn human_bytes(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift {
            let value = bytes as f64 / (1u64 << shift) as f64;
            return if bytes.is_multiple_of(1 << shift) {
                format!("{} {unit}", bytes >> shift)
            } else {
                format!("{value:.1} {unit}")
            };
        }
    }
    format!("{bytes} bytes")
}

/// The build's disk when the daemon names none.
pub const DEFAULT_DISK_BYTES: u64 = 20 << 30;

/// Connects, authenticates and serves the job until the daemon is done.
pub async fn run(settings: Settings) -> Result<(), Error> {
    let stream = custody_wire::dial(
        &settings.daemon,
        &settings.certificate_pem,
        &settings.job_id,
        &settings.token,
        settings.connect_deadline,
    )
    .await?;
    let (workdir, _cleanup) = match settings.workdir {
        Some(dir) => (dir, None),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("custody-job-")
                .tempdir()
                .map_err(Error::Workdir)?;
            (dir.path().to_owned(), Some(dir))
        }
    };
    tracing::info!(job = %settings.job_id, workdir = %workdir.display(), "authenticated; serving the job");
    // The daemon's port is never an egress destination, whatever is allowed.
    let daemon = settings
        .daemon
        .to_socket_addrs()
        .map(|addrs| addrs.collect())
        .unwrap_or_default();
    let cancel = Arc::new(watch::channel(None).0);
    let job = Arc::new(Mutex::new(None));
    let service = JobService {
        workdir,
        daemon,
        started: Mutex::new(false),
        cancel: cancel.clone(),
        job: job.clone(),
    };
    let served = custody_wire::rpc::serve(stream, service).await;
    // The daemon is gone (or done): stop what still runs and let the job
    // take its steps, cgroups and disk down before the work directory goes.
    let running = job.lock().expect("never poisoned").take();
    if let Some(running) = running {
        cancel.send_if_modified(|reason| {
            reason.get_or_insert_with(|| "the daemon ended the session".to_owned());
            true
        });
        let _ = tokio::time::timeout(Duration::from_secs(30), running).await;
    }
    served?;
    Ok(())
}

struct JobService {
    workdir: PathBuf,
    /// The daemon's connector addresses.
    daemon: Vec<SocketAddr>,
    started: Mutex<bool>,
    /// Set to the reason once the daemon cancels.
    cancel: Arc<watch::Sender<Option<String>>>,
    /// The job's task, awaited before the runner exits.
    job: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// What preparing a job needs of the service (owned, for a blocking thread).
struct Preparation {
    workdir: PathBuf,
    daemon: Vec<SocketAddr>,
}

impl JobService {
    fn preparation(&self) -> Preparation {
        Preparation {
            workdir: self.workdir.clone(),
            daemon: self.daemon.clone(),
        }
    }
}

impl Preparation {
    /// The job's directories and the boundary its steps run within; the
    /// work directory itself (where the runner keeps what it pulls) and the
    /// paths the daemon names are hidden from steps.
    fn prepare(&self, job: &proto::Job) -> Result<steps::Boundary, String> {
        let bounds = job.bounds.clone().unwrap_or_default();
        let ids = ids::StepIds::for_runner(Some(&bounds.step_ids))?;
        let disk = match bounds.disk_bytes {
            0 => DEFAULT_DISK_BYTES,
            n => n,
        };
        let (jobdir, note) = jobdir::JobDir::create(&self.workdir, ids, disk)
            .map_err(|e| format!("cannot prepare the work directory: {e}"))?;
        let policy = egress::Policy::new(&bounds.egress_allow, self.daemon.clone())?;
        // What steps push is kept on the build's disk, where only the
        // runner reaches, and counts against the same size.
        let gateway = gateway::BuildGateway::for_job(
            &job.pushes,
            &job.pulls,
            &jobdir.private.join("gateway"),
            disk,
            Arc::new(gateway::Registries::new(push::registry_options(job))),
        )?;
        let defaults = rootfs::ImageLimits::default();
        let mut notes: Vec<String> = note.into_iter().collect();
        if !ids.privileged {
            notes.push(
                "steps run as the runner's own user (mapped to root inside): the runner is not root, so it cannot map them to an unprivileged range".into(),
            );
        }
        Ok(steps::Boundary {
            sandbox: sandbox::Sandbox {
                workspace: jobdir.workspace.clone(),
                workdir: job.workdir.clone(),
                output: jobdir.output.clone(),
                hidden: job
                    .hidden_paths
                    .iter()
                    .map(PathBuf::from)
                    .chain([self.workdir.clone()])
                    .collect(),
                ids,
            },
            jobdir,
            policy: Arc::new(policy),
            gateway,
            log_bytes: match bounds.log_bytes {
                0 => logs::DEFAULT_LOG_LIMIT,
                n => n,
            },
            image_limits: rootfs::ImageLimits {
                max_bytes: match bounds.image_max_bytes {
                    0 => defaults.max_bytes,
                    n => n,
                },
                max_layers: match bounds.image_max_layers {
                    0 => defaults.max_layers,
                    n => n as usize,
                },
            },
            notes,
        })
    }
}

#[tonic::async_trait]
impl custody_wire::rpc::Runner for JobService {
    type RunStream = ReceiverStream<Result<Event, Status>>;

    async fn run(&self, request: Request<proto::Job>) -> Result<Response<Self::RunStream>, Status> {
        {
            let mut started = self.started.lock().expect("never poisoned");
            if *started {
                return Err(Status::failed_precondition(
                    "this runner has already been given its job",
                ));
            }
            *started = true;
        }
        let job = request.into_inner();
        let (sender, receiver) = mpsc::channel(256);
        let events = EventSink::new(sender, redact::Redactor::for_job(&job));
        events
            .send(RunnerEvent::Hello {
                hostname: hostname(),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .await;
        // Making the job's disk runs mkfs and mount: off the runtime.
        let prepared = {
            let (service, job) = (self.preparation(), job.clone());
            tokio::task::spawn_blocking(move || service.prepare(&job))
                .await
                .expect("preparing a job does not panic")
        };
        let boundary = match prepared {
            Ok(boundary) => boundary,
            Err(e) => return Err(Status::internal(e)),
        };
        let cancel = self.cancel.subscribe();
        let task = tokio::spawn(async move {
            let finished = steps::run_all(&job, &boundary, &events, cancel).await;
            // The build's disk goes before the daemon hears the end.
            drop(boundary);
            events.send(RunnerEvent::Finished(finished)).await;
        });
        *self.job.lock().expect("never poisoned") = Some(task);
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn cancel(
        &self,
        request: Request<proto::CancelRequest>,
    ) -> Result<Response<proto::CancelReply>, Status> {
        let reason = request.into_inner().reason;
        self.cancel.send_replace(Some(if reason.is_empty() {
            "cancelled".to_owned()
        } else {
            reason
        }));
        Ok(Response::new(proto::CancelReply {}))
    }
}

/// Where the runner's events go: turned into the wire's `proto::Event`
/// here, the one place the runner touches the generated types for them.
/// Every event passes the job's [`redact::Redactor`]: log lines, egress
/// URLs and failure messages leave the runner with secrets masked.
#[derive(Clone)]
pub(crate) struct EventSink {
    sender: mpsc::Sender<Result<Event, Status>>,
    redactor: Option<Arc<redact::Redactor>>,
}

impl EventSink {
    pub(crate) fn new(
        sender: mpsc::Sender<Result<Event, Status>>,
        redactor: Option<redact::Redactor>,
    ) -> Self {
        Self {
            sender,
            redactor: redactor.map(Arc::new),
        }
    }

    /// `line`, cut at its end, with any secret the cut split masked.
    pub(crate) fn redact_cut(&self, line: &[u8]) -> Vec<u8> {
        match &self.redactor {
            Some(redactor) => redactor.redact_cut(line),
            None => line.to_vec(),
        }
    }

    /// Sends `event` unless the queue to the daemon is full, without
    /// waiting: for progress, which the next report replaces.
    pub(crate) fn offer(&self, event: RunnerEvent) {
        let event = match &self.redactor {
            Some(redactor) => redacted(redactor, event),
            None => event,
        };
        let _ = self.sender.try_send(Ok(Event::from(event)));
    }

    /// Sends `event`; `false` once the daemon stopped listening.
    pub(crate) async fn send(&self, event: RunnerEvent) -> bool {
        let event = match &self.redactor {
            Some(redactor) => redacted(redactor, event),
            None => event,
        };
        self.sender.send(Ok(Event::from(event))).await.is_ok()
    }
}

/// `event` with the job's secrets masked wherever a step's doing can put
/// text: its output, the URLs it reached, why it failed.
fn redacted(redactor: &redact::Redactor, event: RunnerEvent) -> RunnerEvent {
    use custody_wire::events::JobEnd;
    match event {
        RunnerEvent::Log(mut line) => {
            line.line = redactor.redact(&line.line);
            RunnerEvent::Log(line)
        }
        RunnerEvent::Egress(mut egress) => {
            egress.uri = redactor.redact_str(&egress.uri);
            RunnerEvent::Egress(egress)
        }
        RunnerEvent::Finished(JobEnd::Failed(why)) => {
            RunnerEvent::Finished(JobEnd::Failed(redactor.redact_str(&why)))
        }
        RunnerEvent::Finished(JobEnd::Cancelled(why)) => {
            RunnerEvent::Finished(JobEnd::Cancelled(redactor.redact_str(&why)))
        }
        other => other,
    }
}

/// This machine's name, as runners report it and `serve` names its daemons.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use custody_wire::events::{Egress, JobEnd, RunnerEvent};

    use super::*;

    /// A step can put a secret in a URL it reaches or in why it failed,
    /// not only in its output: those leave masked too.
    #[test]
    fn secrets_are_masked_in_egress_urls_and_failures() {
        let redactor = redact::Redactor::new(&[b"T0KEN-abc123"]).unwrap();
        let egress = redacted(
            &redactor,
            RunnerEvent::Egress(Egress {
                step: 0,
                uri: "http://evil.test/?t=T0KEN-abc123".into(),
                sha256: None,
                bytes_sent: 1,
                bytes_received: 1,
            }),
        );
        let RunnerEvent::Egress(egress) = egress else {
            panic!("{egress:?}")
        };
        assert_eq!(egress.uri, "http://evil.test/?t=***");
        let failed = redacted(
            &redactor,
            RunnerEvent::Finished(JobEnd::Failed("bad T0KEN-abc123".into())),
        );
        assert_eq!(
            failed,
            RunnerEvent::Finished(JobEnd::Failed("bad ***".into()))
        );
    }
}
