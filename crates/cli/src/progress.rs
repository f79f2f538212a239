//! Progress bars on a terminal: one per blob in flight.

use std::collections::HashMap;
use std::sync::Mutex;

use custody_oci::Digest;
use custody_oci::copy::{BlobOutcome, Progress};
use custody_oci::oci_spec::image::Descriptor;
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
