//! What ends a build early: a cancel (from the API, the CLI or shutdown),
//! or the service's deadline for a whole build. Every stage runs under it,
//! so a build stuck resolving a source or a step image ends when cancelled,
//! not when the network gives up.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::Shared;
use tokio::time::Instant;

use super::BuildError;

type Cancel<'a> = Shared<Pin<Box<dyn Future<Output = String> + Send + 'a>>>;

pub(crate) struct Stop<'a> {
    cancel: Cancel<'a>,
    /// When the whole build must be over, and the limit that says so.
    deadline: Option<(Instant, Duration)>,
    timed_out: AtomicBool,
}

impl<'a> Stop<'a> {
    pub fn new(cancel: impl Future<Output = String> + Send + 'a, limit: Option<Duration>) -> Self {
        let cancel: Pin<Box<dyn Future<Output = String> + Send + 'a>> = Box::pin(cancel);
        Self {
            cancel: cancel.shared(),
            deadline: limit.map(|limit| (Instant::now() + limit, limit)),
            timed_out: AtomicBool::new(false),
        }
    }

    /// Runs `stage` unless the build is stopped first (dropping the stage:
    /// git and registry requests go with it).
    pub async fn guard<T>(
        &self,
        phase: &'static str,
        stage: impl Future<Output = Result<T, BuildError>>,
    ) -> Result<T, BuildError> {
        tokio::select! {
            result = stage => result,
            why = self.stopped(phase) => Err(why),
        }
    }

    /// The reason a runner is cancelled with, for the stage that hands the
    /// cancel on (the runner ends its steps itself); [`Stop::timed_out`]
    /// says afterwards whether it was the deadline.
    pub async fn reason(&self, phase: &'static str) -> String {
        match self.stopped(phase).await {
            BuildError::Cancelled(reason) => reason,
            timed_out => {
                self.timed_out.store(true, Ordering::Relaxed);
                timed_out.to_string()
            }
        }
    }

    /// `error`, or the deadline if that is what ended `phase`.
    pub fn explain(&self, phase: &'static str, error: BuildError) -> BuildError {
        match (self.timed_out.load(Ordering::Relaxed), self.deadline) {
            (true, Some((_, limit))) => BuildError::TimedOut { phase, limit },
            _ => error,
        }
    }

    async fn stopped(&self, phase: &'static str) -> BuildError {
        let deadline = async {
            match self.deadline {
                Some((at, limit)) => {
                    tokio::time::sleep_until(at).await;
                    limit
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            reason = self.cancel.clone() => BuildError::Cancelled(reason),
            limit = deadline => BuildError::TimedOut { phase, limit },
        }
    }
}
