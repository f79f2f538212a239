//! A build's log on its way to the store.

use crate::record::BuildId;
use crate::store::{self, Store, StoreError};

/// Log lines on their way to the store: one task appends them in order, a
/// batch at a time (every [`LOG_BATCH_INTERVAL`] or [`LOG_BATCH_LINES`]
/// lines), so a crash loses at most one batch and lines never reorder.
pub(crate) struct LogWriter {
    lines: tokio::sync::mpsc::UnboundedSender<store::LogLine>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

pub const LOG_BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
const LOG_BATCH_LINES: usize = 1000;

impl LogWriter {
    pub(crate) fn start(store: Store, id: BuildId) -> Self {
        let (lines, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = incoming.recv().await {
                batch.push(first);
                let deadline = tokio::time::Instant::now() + LOG_BATCH_INTERVAL;
                while batch.len() < LOG_BATCH_LINES {
                    match tokio::time::timeout_at(deadline, incoming.recv()).await {
                        Ok(Some(line)) => batch.push(line),
                        Ok(None) | Err(_) => break,
                    }
                }
                store.append_logs(&id, &batch).await?;
                batch.clear();
            }
            Ok(())
        });
        Self { lines, task }
    }

    pub(crate) fn send(&self, line: store::LogLine) {
        // The task only stops early when the store failed; `finish` says so.
        let _ = self.lines.send(line);
    }

    /// Writes what is left and reports whether every batch was stored.
    pub(crate) async fn finish(self) -> Result<(), StoreError> {
        drop(self.lines);
        self.task.await.expect("the log writer does not panic")
    }
}
