//! One job's life on the daemon: expect a runner, start it through the
//! executor, wait until it authenticates, hand it the job, and follow its
//! events to the end. Whatever happens, the job's waiter is gone afterwards.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_wire::events::{JobEnd, Pulled, Pushed, RunnerEvent};
use custody_wire::rpc::proto;
use custody_wire::{Connector, RunnerSession};
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;

use crate::executor::{Executor, ExecutorError, Launch, RunnerEnded};

/// Starts runners for jobs and follows them.
pub struct Dispatcher {
    pub connector: Arc<Connector>,
    pub executor: Arc<dyn Executor>,
    /// Where runners reach the connector (as seen from where they run).
    pub daemon_addr: String,
    /// How long a runner has from being started to authenticating.
    pub connect_timeout: Duration,
}

/// How a job that ran to its end went.
#[derive(Debug)]
pub struct JobReport {
    /// Where the runner ran: the executor's description.
    pub runner: String,
    /// The address the runner connected from.
    pub peer: SocketAddr,
    /// Where the runner said it runs: host name and pid.
    pub hello: Option<(String, u32)>,
    pub outputs: Vec<Pushed>,
    /// What steps read from `pulls` repositories.
    pub pulled: Vec<Pulled>,
    pub end: JobEnd,
    pub timings: Timings,
}

/// Moments in the job's life, measured from when dispatch began.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    pub runner_started: Duration,
    pub authenticated: Duration,
    pub first_event: Duration,
    pub finished: Duration,
}

/// Why a job did not run to its end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error("the runner ({runner}) ended before the job did: {detail}")]
    RunnerEnded { runner: String, detail: String },
    #[error("the runner ({runner}) did not connect within {after:?}")]
    ConnectTimeout { runner: String, after: Duration },
    #[error("the job was cancelled: {0}")]
    Cancelled(String),
    #[error("the session with the runner ({runner}) failed: {detail}")]
    Session { runner: String, detail: String },
    #[error(transparent)]
    Wire(#[from] custody_wire::Error),
}

impl Dispatcher {
    /// Runs `job` on a fresh runner. `on_event` sees every event as it
    /// arrives (turned from the wire's types into the daemon's here, and
    /// nowhere else); `cancel` resolving (with a reason) cancels the job.
    pub async fn run(
        &self,
        job: proto::Job,
        mut on_event: impl FnMut(&RunnerEvent) + Send,
        cancel: impl Future<Output = String> + Send,
    ) -> Result<JobReport, JobError> {
        let begun = Instant::now();
        let job_id = job.job_id.clone();
        let (token, pending) = self.connector.register(&job_id)?;
        // Whatever happens from here on, the token dies with this call.
        let _withdraw = Withdraw {
            connector: &self.connector,
            job_id: &job_id,
        };
        let launch = Launch {
            job_id: job_id.clone(),
            token,
            certificate_pem: self.connector.certificate_pem().to_owned(),
            daemon_addr: self.daemon_addr.clone(),
        };
        let process = self.executor.start(launch).await?;
        let runner_started = begun.elapsed();
        let runner = process.description.clone();
        let mut ended = Some(process.ended);
        let mut stop = Some(process.stop);
        tokio::pin!(cancel);

        let session: RunnerSession = tokio::select! {
            session = pending => session?,
            end = poll_ended(&mut ended) => {
                return Err(JobError::RunnerEnded { runner, detail: before_connecting(end) });
            }
            () = tokio::time::sleep(self.connect_timeout) => {
                stop_runner(&mut stop).await;
                return Err(JobError::ConnectTimeout { runner, after: self.connect_timeout });
            }
            reason = &mut cancel => {
                stop_runner(&mut stop).await;
                return Err(JobError::Cancelled(reason));
            }
        };
        let authenticated = session.authenticated_at.saturating_duration_since(begun);
        let peer = session.peer;
        let mut runner = Running {
            description: runner,
            ended,
            stop,
        };
        let followed = follow(session, job, &mut runner, begun, &mut on_event, cancel).await?;
        let finished_at = begun.elapsed();
        // Closing the session lets the runner exit; make sure it did.
        if poll_ended_within(&mut runner.ended, Duration::from_secs(5))
            .await
            .is_none()
        {
            stop_runner(&mut runner.stop).await;
        }
        Ok(JobReport {
            runner: runner.description,
            peer,
            hello: followed.hello,
            outputs: followed.outputs,
            pulled: followed.pulled,
            end: followed.end,
            timings: Timings {
                runner_started,
                authenticated,
                first_event: followed.first_event.unwrap_or(finished_at),
                finished: finished_at,
            },
        })
    }
}

/// A runner that was started: how to hear it end and how to stop it.
struct Running {
    description: String,
    ended: Option<BoxFuture<'static, RunnerEnded>>,
    stop: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
}

/// What the runner said, to the end of its job.
struct Followed {
    hello: Option<(String, u32)>,
    outputs: Vec<Pushed>,
    pulled: Vec<Pulled>,
    end: JobEnd,
    first_event: Option<Duration>,
}

/// Hands `job` to the runner over its session and follows its events
/// (turned into the daemon's own types here) until it says the job ended;
/// `cancel` resolving asks the runner to stop the job.
async fn follow(
    session: RunnerSession,
    job: proto::Job,
    runner: &mut Running,
    begun: Instant,
    on_event: &mut (impl FnMut(&RunnerEvent) + Send),
    cancel: impl Future<Output = String> + Send,
) -> Result<Followed, JobError> {
    let mut client = session.client;
    let session_error = |e: tonic::Status| JobError::Session {
        runner: runner.description.clone(),
        detail: e.message().to_owned(),
    };
    let mut events = client.run(job).await.map_err(session_error)?.into_inner();
    tokio::pin!(cancel);
    let mut followed = Followed {
        hello: None,
        outputs: Vec::new(),
        pulled: Vec::new(),
        end: JobEnd::Succeeded,
        first_event: None,
    };
    let mut cancel_sent = false;
    loop {
        tokio::select! {
            next = events.next() => match next {
                Some(Ok(event)) => {
                    followed.first_event.get_or_insert_with(|| begun.elapsed());
                    let Ok(event) = RunnerEvent::try_from(event) else {
                        continue; // an event this daemon does not know
                    };
                    on_event(&event);
                    match event {
                        RunnerEvent::Hello { hostname, pid, .. } => followed.hello = Some((hostname, pid)),
                        RunnerEvent::Pushed(pushed) => followed.outputs.push(pushed),
                        RunnerEvent::Pulled(pulled) => followed.pulled.push(pulled),
                        RunnerEvent::Finished(end) => {
                            followed.end = end;
                            return Ok(followed);
                        }
                        _ => {}
                    }
                }
                Some(Err(status)) => {
                    let description = runner.description.clone();
                    return Err(session_failed(description, status, &mut runner.ended, &mut runner.stop).await);
                }
                None => {
                    let detail = match poll_ended_within(&mut runner.ended, Duration::from_secs(2)).await {
                        Some(end) => end.detail,
                        None => "the event stream ended without a result".to_owned(),
                    };
                    stop_runner(&mut runner.stop).await;
                    return Err(JobError::RunnerEnded { runner: runner.description.clone(), detail });
                }
            },
            end = poll_ended(&mut runner.ended) => {
                return Err(JobError::RunnerEnded { runner: runner.description.clone(), detail: end.detail });
            }
            reason = &mut cancel, if !cancel_sent => {
                cancel_sent = true;
                // The runner kills the step and ends the stream with a
                // `Finished(Cancelled)`; if it cannot, stop it.
                if client.cancel(proto::CancelRequest { reason: reason.clone() }).await.is_err() {
                    stop_runner(&mut runner.stop).await;
                    return Err(JobError::Cancelled(reason));
                }
            }
        }
    }
}

/// A broken session, explained with what the runner said as it went.
async fn session_failed(
    runner: String,
    status: tonic::Status,
    ended: &mut Option<BoxFuture<'static, RunnerEnded>>,
    stop: &mut Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
) -> JobError {
    let mut detail = status.message().to_owned();
    match poll_ended_within(ended, Duration::from_secs(2)).await {
        Some(end) if !end.detail.is_empty() => detail = format!("{detail}; {}", end.detail),
        Some(_) => {}
        None => stop_runner(stop).await,
    }
    JobError::Session { runner, detail }
}

struct Withdraw<'a> {
    connector: &'a Connector,
    job_id: &'a str,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.connector.withdraw(self.job_id);
    }
}

fn before_connecting(end: RunnerEnded) -> String {
    format!("it exited before connecting: {}", end.detail)
}

/// Waits for the runner to end; never resolves once it has been seen ending.
async fn poll_ended(ended: &mut Option<BoxFuture<'static, RunnerEnded>>) -> RunnerEnded {
    match ended {
        Some(future) => {
            let end = future.await;
            *ended = None;
            end
        }
        None => std::future::pending().await,
    }
}

async fn poll_ended_within(
    ended: &mut Option<BoxFuture<'static, RunnerEnded>>,
    limit: Duration,
) -> Option<RunnerEnded> {
    if ended.is_none() {
        return Some(RunnerEnded {
            success: true,
            detail: String::new(),
        });
    }
    tokio::time::timeout(limit, poll_ended(ended)).await.ok()
}

async fn stop_runner(stop: &mut Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>) {
    if let Some(stop) = stop.take() {
        stop().await;
    }
}
