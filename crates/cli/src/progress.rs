//! Progress while blobs move: bars on a terminal (one per blob in
//! flight), plain periodic lines otherwise.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use custody_oci::Digest;
use custody_oci::copy::{BlobOutcome, Progress};
use custody_oci::oci_spec::image::Descriptor;
use custody_runner::human_bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Self {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
        }
    }
}

fn short(digest: &Digest) -> String {
    let hex = digest.digest();
    hex[..hex.len().min(12)].to_owned()
}

impl Progress for Bars {
    fn blob_started(&self, descriptor: &Descriptor) {
        let bar = self.multi.add(ProgressBar::new(descriptor.size()));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_prefix(short(descriptor.digest()));
        if let Some(old) = self
            .bars
            .lock()
            .expect("bars lock")
            .insert(descriptor.digest().to_string(), bar)
        {
            old.finish_and_clear();
        }
    }

    fn blob_bytes(&self, digest: &Digest, bytes: u64) {
        if let Some(bar) = self.bars.lock().expect("bars lock").get(digest.as_ref()) {
            bar.inc(bytes);
        }
    }

    fn blob_finished(&self, digest: &Digest, outcome: BlobOutcome) {
        let bar = self.bars.lock().expect("bars lock").remove(digest.as_ref());
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let line = match outcome {
            BlobOutcome::Present => return,
            BlobOutcome::Mounted => "mounted",
            BlobOutcome::Copied => "copied",
        };
        let _ = self.multi.println(format!("{} {line}", short(digest)));
    }
}

/// Plain progress lines for a log that is not a terminal (CI): at most one
/// every `every`, saying how much of what has started has moved, and how
/// fast.
pub struct Lines {
    every: Duration,
    verb: &'static str,
    state: Mutex<LinesState>,
}

struct LinesState {
    began: Instant,
    last: Instant,
    total: u64,
    moved: u64,
}

impl Lines {
    /// `CUSTODY_PROGRESS_SECONDS` sets how often (default 5 s).
    pub fn new(verb: &'static str) -> Self {
        let every = std::env::var("CUSTODY_PROGRESS_SECONDS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::from_secs(5), Duration::from_secs_f64);
        let now = Instant::now();
        Self {
            every,
            verb,
            state: Mutex::new(LinesState {
                began: now,
                last: now,
                total: 0,
                moved: 0,
            }),
        }
    }
}

impl Progress for Lines {
    fn blob_started(&self, descriptor: &Descriptor) {
        self.state.lock().expect("progress lock").total += descriptor.size();
    }

    fn blob_bytes(&self, _digest: &Digest, bytes: u64) {
        let mut state = self.state.lock().expect("progress lock");
        state.moved += bytes;
        let now = Instant::now();
        if now.duration_since(state.last) < self.every {
            return;
        }
        state.last = now;
        say!(
            "{}: {}",
            self.verb,
            how_far(state.moved, state.total, state.began)
        );
    }
}

/// `MOVED of TOTAL (RATE/s)`, sizes as the runner writes them, the rate
/// since `began`.
pub fn how_far(moved: u64, total: u64, began: Instant) -> String {
    let seconds = began.elapsed().as_secs_f64().max(0.001);
    format!(
        "{} of {} ({}/s)",
        human_bytes(moved),
        human_bytes(total),
        human_bytes((moved as f64 / seconds) as u64)
    )
}
