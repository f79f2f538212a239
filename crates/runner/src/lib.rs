//! The runner: one process per job, started by an executor. It dials the
//! daemon, authenticates with its one-time token, then serves the runner
//! RPC: the daemon hands it the job and it runs the steps one by one,
//! streaming their output back as it is written.
//!
//! Steps run in a bubblewrap sandbox (see [`sandbox`]) with only the
//! environment they declare, in their own process group so a cancel or
//! timeout kills everything they started. The runner's token never reaches
//! them: it arrives on stdin or in a file that is deleted once read.

#![forbid(unsafe_code)]

pub mod cgroup;
pub mod outputs;
mod push;
pub mod rootfs;
pub mod sandbox;
mod steps;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custody_wire::rpc::proto::{self, Event, event::Kind};
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
    let service = JobService {
        workdir,
        started: Mutex::new(false),
        cancel: Arc::new(watch::channel(None).0),
    };
    custody_wire::rpc::serve(stream, service).await?;
    Ok(())
}

struct JobService {
    workdir: PathBuf,
    started: Mutex<bool>,
    /// Set to the reason once the daemon cancels.
    cancel: Arc<watch::Sender<Option<String>>>,
}

impl JobService {
    /// `workspace/` and `output/` inside the work directory; the work
    /// directory itself (where the runner keeps what it pulls) and the paths
    /// the daemon names are hidden from steps.
    fn prepare(&self, job: &proto::Job) -> std::io::Result<sandbox::Sandbox> {
        let workspace = self.workdir.join("workspace");
        let output = self.workdir.join("output");
        fs_err::create_dir_all(&workspace)?;
        fs_err::create_dir_all(&output)?;
        Ok(sandbox::Sandbox {
            workspace,
            output,
            hidden: job
                .hidden_paths
                .iter()
                .map(PathBuf::from)
                .chain([self.workdir.clone()])
                .collect(),
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
        let (events, receiver) = mpsc::channel(256);
        let hello = proto::Hello {
            hostname: hostname(),
            pid: std::process::id(),
            runner_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let _ = events.send(Ok(event(Kind::Hello(hello)))).await;
        let sandbox = match self.prepare(&job) {
            Ok(sandbox) => sandbox,
            Err(e) => {
                return Err(Status::internal(format!(
                    "cannot prepare the work directory: {e}"
                )));
            }
        };
        let cancel = self.cancel.subscribe();
        tokio::spawn(async move {
            let finished = steps::run_all(&job, &sandbox, &events, cancel).await;
            let _ = events.send(Ok(event(Kind::Finished(finished)))).await;
        });
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

pub(crate) fn event(kind: Kind) -> Event {
    Event { kind: Some(kind) }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}
