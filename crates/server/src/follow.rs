//! Log followers share one source per build: the first follower of a build
//! starts a task that polls the store for that build's new lines and its
//! end, and every follower receives them from it; the task stops when the
//! build ends or its last follower leaves.
//!
//! The store is polled, not told, because the build may run on another
//! daemon sharing the queue (PostgreSQL). With one poll loop per follower,
//! 1,000 idle followers of one build kept a core busy; with one per
//! followed build they cost what one does.
//!
//! A follower reads the lines stored before it subscribed itself (its
//! backlog), then takes the task's updates, skipping what it already has.
//! Subscribing happens before the backlog is read and the task reads a line
//! only after it is stored, so every line reaches the follower one way or
//! the other. One that falls behind (a slow client) reads what it missed
//! from the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custody_daemon::record::BuildId;
use custody_daemon::store::{self, BuildDetail, LogLine, Store, StoreError};
use tokio::sync::broadcast;

/// How often a followed build's store rows are read.
pub const LOG_POLL: Duration = Duration::from_millis(200);
/// The most lines one store read returns.
pub const PAGE: i64 = 1000;
/// Updates kept for followers that have not taken them yet; one further
/// behind catches up from the store.
const BACKLOG: usize = 64;

/// What the task of a followed build tells its followers.
#[derive(Clone, Debug)]
pub enum Update {
    /// Lines stored since the last update, in order, each with its `seq`.
    Lines(Arc<[(i64, LogLine)]>),
    /// The build ended; every line was sent before this.
    Ended(Arc<BuildDetail>),
    /// The store failed; the task has stopped.
    Failed,
}

/// The followed builds and their tasks.
pub struct Followers {
    store: Store,
    builds: Mutex<HashMap<BuildId, broadcast::Sender<Update>>>,
}

impl Followers {
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self {
            store,
            builds: Mutex::default(),
        })
    }

    /// Subscribes to `id`'s updates: every line stored after this returns
    /// arrives as an [`Update`] (read what came before from the store).
    /// Starts the build's task if nobody followed it yet.
    pub async fn follow(self: &Arc<Self>, id: &BuildId) -> Result<Subscription, StoreError> {
        if let Some(sender) = self.lock().get(id) {
            return Ok(Subscription {
                updates: sender.subscribe(),
            });
        }
        // Where the new task starts: lines up to here are stored already,
        // so any follower that subscribes from now on reads them itself.
        let last = self.store.last_log_seq(id).await?.unwrap_or(-1);
        let mut builds = self.lock();
        if let Some(sender) = builds.get(id) {
            // Another follower started it meanwhile.
            return Ok(Subscription {
                updates: sender.subscribe(),
            });
        }
        let (sender, updates) = broadcast::channel(BACKLOG);
        builds.insert(id.clone(), sender.clone());
        drop(builds);
        tokio::spawn(self.clone().poll(id.clone(), last, sender));
        Ok(Subscription { updates })
    }

    /// How many builds are followed now.
    pub fn followed(&self) -> usize {
        self.lock().len()
    }

    /// The task of one followed build.
    async fn poll(self: Arc<Self>, id: BuildId, mut last: i64, sender: broadcast::Sender<Update>) {
        let mut ticks = tokio::time::interval(LOG_POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if self.retire_if_unfollowed(&id, &sender) {
                return;
            }
            match self.read(&id, &mut last, &sender).await {
                Ok(Polled::Running) => {}
                Ok(Polled::Ended(ended)) => {
                    // Retired first: whoever subscribes after this starts a
                    // task of its own, which sees the end at once.
                    self.retire(&id);
                    let _ = sender.send(Update::Ended(ended));
                    return;
                }
                Ok(Polled::Gone) => {
                    tracing::error!("following {id}: the build is no longer in the store");
                    self.retire(&id);
                    let _ = sender.send(Update::Failed);
                    return;
                }
                Err(e) => {
                    tracing::error!("following {id}: {e}");
                    self.retire(&id);
                    let _ = sender.send(Update::Failed);
                    return;
                }
            }
        }
    }

    /// Sends the lines stored after `last`; once the build has ended (after
    /// its last lines), says so with the build, its steps and outputs.
    async fn read(
        &self,
        id: &BuildId,
        last: &mut i64,
        sender: &broadcast::Sender<Update>,
    ) -> Result<Polled, StoreError> {
        // The state first: a build that had ended by then has every line
        // stored already.
        let Some(record) = self.store.build(id).await? else {
            return Ok(Polled::Gone);
        };
        let ended = !matches!(record.state, store::State::Queued | store::State::Running);
        loop {
            let lines = self.store.logs_after(id, *last, PAGE).await?;
            let Some((seq, _)) = lines.last() else { break };
            *last = *seq;
            let full = lines.len() as i64 == PAGE;
            let _ = sender.send(Update::Lines(lines.into()));
            if !full {
                break;
            }
        }
        if !ended {
            return Ok(Polled::Running);
        }
        let detail = self.store.details(vec![record]).await?.pop();
        Ok(Polled::Ended(Arc::new(
            detail.expect("one record, one detail"),
        )))
    }

    /// Stops following `id` if nobody does; decided under the lock new
    /// followers subscribe under, so none is left without a task.
    fn retire_if_unfollowed(&self, id: &BuildId, sender: &broadcast::Sender<Update>) -> bool {
        let mut builds = self.lock();
        if sender.receiver_count() > 0 {
            return false;
        }
        if builds.get(id).is_some_and(|s| s.same_channel(sender)) {
            builds.remove(id);
        }
        true
    }

    fn retire(&self, id: &BuildId) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BuildId, broadcast::Sender<Update>>> {
        self.builds
            .lock()
            .expect("the followed builds are never poisoned")
    }
}

/// What one read of a followed build found.
enum Polled {
    Running,
    Ended(Arc<BuildDetail>),
    Gone,
}

/// One follower's end of a followed build's updates.
pub struct Subscription {
    updates: broadcast::Receiver<Update>,
}

/// What a follower gets next.
pub enum Next {
    Update(Update),
    /// Updates were missed: read from the store where you are.
    Behind,
}

impl Subscription {
    pub async fn next(&mut self) -> Next {
        match self.updates.recv().await {
            Ok(update) => Next::Update(update),
            Err(broadcast::error::RecvError::Lagged(_)) => Next::Behind,
            // The task ends by sending `Ended` or `Failed`; gone without
            // either, it failed.
            Err(broadcast::error::RecvError::Closed) => Next::Update(Update::Failed),
        }
    }
}
