//! A build's log, and its steps' starts and ends, on their way to the store.

use custody_oci::Digest;

use crate::record::{BuildId, Timestamp};
use crate::store::{self, StepEnding, Store, StoreError};

/// Log lines and step records on their way to the store: one task writes
/// them in order, lines a batch at a time (every [`LOG_BATCH_INTERVAL`] or
/// [`LOG_BATCH_LINES`] lines), so a crash loses at most one batch and
/// nothing reorders. A step's start or end is written as it comes (after
/// the lines before it), so a running build shows the steps it finished.
pub(crate) struct LogWriter {
    entries: tokio::sync::mpsc::UnboundedSender<Entry>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

pub const LOG_BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
const LOG_BATCH_LINES: usize = 1000;

/// What the writer stores.
enum Entry {
    Line(store::LogLine),
    Started {
        index: u32,
        name: String,
        image: Option<Digest>,
        at: Timestamp,
    },
    Finished {
        index: u32,
        ending: StepEnding,
        at: Timestamp,
    },
}

impl LogWriter {
    pub(crate) fn start(store: Store, id: BuildId) -> Self {
        let (entries, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = incoming.recv().await {
                let mut step = None;
                match first {
                    Entry::Line(line) => batch.push(line),
                    other => step = Some(other),
                }
                let deadline = tokio::time::Instant::now() + LOG_BATCH_INTERVAL;
                while step.is_none() && batch.len() < LOG_BATCH_LINES {
                    match tokio::time::timeout_at(deadline, incoming.recv()).await {
                        Ok(Some(Entry::Line(line))) => batch.push(line),
                        Ok(Some(other)) => step = Some(other),
                        Ok(None) | Err(_) => break,
                    }
                }
                store.append_logs(&id, &batch).await?;
                batch.clear();
                match step {
                    Some(Entry::Started {
                        index,
                        name,
                        image,
                        at,
                    }) => {
                        store
                            .step_started(&id, index, &name, image.as_ref(), at)
                            .await?
                    }
                    Some(Entry::Finished { index, ending, at }) => {
                        store.step_finished(&id, index, ending, at).await?
                    }
                    Some(Entry::Line(_)) | None => {}
                }
            }
            Ok(())
        });
        Self { entries, task }
    }

    pub(crate) fn send(&self, line: store::LogLine) {
        // The task only stops early when the store failed; `finish` says so.
        let _ = self.entries.send(Entry::Line(line));
    }

    /// Step `index` started now, on `image` (its manifest digest) if any.
    pub(crate) fn step_started(&self, index: u32, name: &str, image: Option<Digest>) {
        let _ = self.entries.send(Entry::Started {
            index,
            name: name.to_owned(),
            image,
            at: Timestamp::now(),
        });
    }

    /// Step `index` ended now.
    pub(crate) fn step_finished(&self, index: u32, ending: StepEnding) {
        let _ = self.entries.send(Entry::Finished {
            index,
            ending,
            at: Timestamp::now(),
        });
    }

    /// Writes what is left and reports whether every entry was stored.
    pub(crate) async fn finish(self) -> Result<(), StoreError> {
        drop(self.entries);
        self.task.await.expect("the log writer does not panic")
    }
}
