//! The durable queue as one daemon works it: claim queued builds up to a
//! concurrency limit, hold each claim with a lease renewed while it runs,
//! act on cancel requests, and end the builds of daemons that stopped
//! renewing theirs.
//!
//! Several daemons can work one PostgreSQL store: the store hands each
//! queued build to exactly one of them, and any of them reaps the others'
//! expired leases.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custody_wire::events::RunnerEvent;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::build::{BuildRequest, BuildService, Outcome, Progress};
use crate::record::BuildId;
pub use crate::record::{Clock, SystemClock};
use crate::store::{Claimed, Ending, Renewal, State};

/// How one daemon works the queue.
#[derive(Clone)]
pub struct QueueConfig {
    /// This daemon's name in the store (owner of its claims).
    pub owner: String,
    /// How many builds it runs at once.
    pub concurrency: usize,
    /// How long a claim holds without renewal; renewed every third of it.
    pub lease: Duration,
    /// How often it looks for work other daemons queued.
    pub poll: Duration,
    /// What leases are measured against: the system's clock, or a test's.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueConfig")
            .field("owner", &self.owner)
            .field("concurrency", &self.concurrency)
            .field("lease", &self.lease)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

/// What the queue tells whoever keeps metrics.
pub trait Observer: Send + Sync {
    /// A build this daemon ran ended. `push` is how long the runner's push
    /// phase took, when it got that far.
    fn build_finished(&self, state: State, took: Duration, push: Option<Duration>);
}

/// A daemon's hold on the queue.
pub struct Queue {
    service: Arc<BuildService>,
    config: QueueConfig,
    observer: Arc<dyn Observer>,
    wake: Notify,
    /// Builds running here, by id: cancelling the token cancels the build.
    running: Mutex<HashMap<BuildId, CancellationToken>>,
    stop_claiming: CancellationToken,
    cancel_running: CancellationToken,
    tasks: TaskTracker,
}

impl Queue {
    pub fn new(
        service: Arc<BuildService>,
        config: QueueConfig,
        observer: Arc<dyn Observer>,
    ) -> Arc<Self> {
        Arc::new(Self {
            service,
            config,
            observer,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            stop_claiming: CancellationToken::new(),
            cancel_running: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    pub fn service(&self) -> &BuildService {
        &self.service
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Starts claiming and reaping in the background.
    pub fn start(self: &Arc<Self>) {
        let queue = self.clone();
        self.tasks.spawn(async move { queue.claim_loop().await });
        let queue = self.clone();
        self.tasks.spawn(async move { queue.reap_loop().await });
    }

    /// Something was queued here: look now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Cancels a build if it runs here (the store already says so for
    /// other daemons to see).
    pub fn cancel_local(&self, id: &BuildId) {
        if let Some(token) = self.running.lock().expect("not poisoned").get(id) {
            token.cancel();
        }
    }

    /// How many builds run here now.
    pub fn running(&self) -> usize {
        self.running.lock().expect("not poisoned").len()
    }

    /// Stops claiming, lets running builds finish for up to `grace`, then
    /// cancels those left and waits for them to end cleanly.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop_claiming.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.running(),
                "grace period over: cancelling the builds still running"
            );
            self.cancel_running.cancel();
            self.tasks.wait().await;
        }
    }

    async fn claim_loop(self: Arc<Self>) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                () = self.stop_claiming.cancelled() => return,
            };
            let now = self.config.clock.now();
            match self
                .service
                .store
                .claim(&self.config.owner, now.after(self.config.lease), now)
                .await
            {
                Ok(Some(claimed)) => {
                    let queue = self.clone();
                    self.tasks.spawn(async move {
                        queue.run_claimed(claimed).await;
                        drop(slot);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::error!("claiming a build: {e}"),
            }
            drop(slot);
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.poll) => {}
                () = self.stop_claiming.cancelled() => return,
            }
        }
    }

    async fn reap_loop(self: Arc<Self>) {
        let every = (self.config.lease / 2).max(Duration::from_millis(100));
        loop {
            match self.service.store.reap(self.config.clock.now()).await {
                Ok(reaped) => {
                    for build in reaped {
                        if build.requeued {
                            tracing::warn!(id = %build.id, owner = %build.owner,
                                "lease expired before its runner started: queued again");
                            self.wake();
                        } else {
                            tracing::warn!(id = %build.id, owner = %build.owner,
                                "lease expired while it ran: failed");
                        }
                    }
                }
                Err(e) => tracing::error!("reaping expired leases: {e}"),
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.stop_claiming.cancelled() => return,
            }
        }
    }

    async fn run_claimed(self: Arc<Self>, claimed: Claimed) {
        let begun = Instant::now();
        let id = claimed.id.clone();
        let cancel = CancellationToken::new();
        self.running
            .lock()
            .expect("not poisoned")
            .insert(id.clone(), cancel.clone());
        let reason = Arc::new(Mutex::new(None::<String>));
        let lease = self
            .clone()
            .hold_lease(id.clone(), cancel.clone(), reason.clone());

        let state = match request_for(&claimed) {
            Ok(request) => {
                let run = self.run_request(&id, &request, &cancel, &reason);
                tokio::select! {
                    state = run => state,
                    () = lease => unreachable!("the lease loop runs until dropped"),
                }
            }
            Err(message) => self.refuse(&id, &message).await,
        };
        self.running.lock().expect("not poisoned").remove(&id);
        if let Some((state, push)) = state {
            self.observer.build_finished(state, begun.elapsed(), push);
        }
    }

    /// Runs the claimed build `id` to its end; its end state and how long
    /// its push took, unless the store failed.
    async fn run_request(
        &self,
        id: &BuildId,
        request: &BuildRequest,
        cancel: &CancellationToken,
        reason: &Mutex<Option<String>>,
    ) -> Option<(State, Option<Duration>)> {
        // Steps run one after another: the push phase starts when the last
        // of them finishes, and ends with the job.
        let mut push_began = None;
        let mut push_took = None;
        tracing::info!(%id, "build started");
        let progress = |event: Progress| {
            if let Progress::Runner(event) = event {
                match event {
                    RunnerEvent::StepStarted { name, .. } => {
                        tracing::info!(%id, step = %name, "step started");
                    }
                    RunnerEvent::StepFinished { index, end } => {
                        tracing::info!(%id, step = index, end = ?end, "step finished");
                        push_began = Some(Instant::now());
                    }
                    RunnerEvent::Pushing {
                        destination,
                        bytes,
                        total,
                    } => {
                        tracing::info!(%id, %destination, bytes, total, "pushing");
                    }
                    RunnerEvent::Pushed(pushed) => {
                        tracing::info!(
                            %id,
                            reference = %pushed.reference,
                            bytes_sent = pushed.bytes_sent,
                            "pushed"
                        );
                    }
                    RunnerEvent::Finished(_) => {
                        push_took = push_began.map(|b| b.elapsed());
                    }
                    _ => {}
                }
            }
        };
        let shutdown = self.cancel_running.clone();
        let stop = async {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = shutdown.cancelled() => {}
            }
            reason
                .lock()
                .expect("not poisoned")
                .take()
                .unwrap_or_else(|| {
                    if shutdown.is_cancelled() {
                        "the daemon shut down before the build finished".to_owned()
                    } else {
                        "cancelled".to_owned()
                    }
                })
        };
        let result = self
            .service
            .run_recorded(id, Some(&self.config.owner), request, progress, stop)
            .await;
        match result {
            Ok(outcome) => {
                let state = outcome.state();
                match &outcome {
                    Outcome::Failed { error, .. } => {
                        tracing::info!(%id, state = state.as_str(), %error, "build ended")
                    }
                    Outcome::Cancelled { reason, .. } => {
                        tracing::info!(%id, state = state.as_str(), error = %reason, "build ended")
                    }
                    Outcome::Succeeded { .. } => {
                        tracing::info!(%id, state = state.as_str(), "build ended")
                    }
                }
                Some((state, push_took))
            }
            Err(e) => {
                tracing::error!(%id, "the store failed while the build ran: {e}");
                None
            }
        }
    }

    /// Ends a claimed build that cannot even start, saying why.
    async fn refuse(&self, id: &BuildId, message: &str) -> Option<(State, Option<Duration>)> {
        let ending = Ending {
            state: State::Failed,
            finished_at: self.config.clock.now(),
            error: Some(message),
            outputs: &[],
            provenance: None,
        };
        match self
            .service
            .store
            .finish(id, Some(&self.config.owner), &ending)
            .await
        {
            Ok(_) => Some((State::Failed, None)),
            Err(e) => {
                tracing::error!(%id, "recording a build that cannot start: {e}");
                None
            }
        }
    }

    /// Renews the lease on `id` every third of its length until dropped;
    /// cancels the build when someone asks or when the claim is lost.
    async fn hold_lease(
        self: Arc<Self>,
        id: BuildId,
        cancel: CancellationToken,
        reason: Arc<Mutex<Option<String>>>,
    ) {
        let every = self.config.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let until = self.config.clock.now().after(self.config.lease);
            let why = match self
                .service
                .store
                .renew(&id, &self.config.owner, until)
                .await
            {
                Ok(Renewal::Held) => continue,
                Ok(Renewal::CancelRequested(why)) => why,
                Ok(Renewal::Lost) => {
                    "this daemon lost its claim on the build (its lease ran out)".to_owned()
                }
                Err(e) => {
                    // The lease runs on; another daemon ends the build if
                    // the store stays out of reach past it.
                    tracing::error!(%id, "renewing the lease: {e}");
                    continue;
                }
            };
            if !cancel.is_cancelled() {
                *reason.lock().expect("not poisoned") = Some(why);
                cancel.cancel();
            }
        }
    }
}

/// The build request a claimed row describes: its spec, and the source
/// chosen when it was submitted.
fn request_for(claimed: &Claimed) -> Result<BuildRequest, String> {
    BuildRequest::recorded(
        PathBuf::from(&claimed.spec_path),
        claimed.spec.clone(),
        claimed.source.clone(),
    )
    .map(|request| BuildRequest {
        retry_of: claimed.retry_of.clone(),
        ..request
    })
    .map_err(|e| e.to_string())
}
