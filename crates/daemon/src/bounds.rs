//! The step boundary as the daemon's operator sets it: how big a build's
//! disk and log may be, which private destinations `network: true` steps
//! may reach, which host ids steps run as, how big a step image may be.
//! The runner enforces them (see `custody_runner`); the spec may ask for a
//! disk of its own size.

use custody_wire::rpc::proto;

use crate::spec::Spec;

/// A build's disk when neither the spec nor the operator sets one.
pub const DEFAULT_DISK_BYTES: u64 = 20 << 30;
/// A build's stored log at most.
pub const DEFAULT_LOG_BYTES: u64 = 64 << 20;
/// Step images at most, uncompressed.
pub const DEFAULT_IMAGE_MAX_BYTES: u64 = 16 << 30;
pub const DEFAULT_IMAGE_MAX_LAYERS: u32 = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepBounds {
    /// The disk of a build whose spec sets no `disk:`.
    pub disk_bytes: u64,
    pub log_bytes: u64,
    /// `HOST[:PORT]`, `IP[:PORT]` or `CIDR[:PORT]` steps may reach although
    /// private, local or link-local.
    pub egress_allow: Vec<String>,
    /// `START:COUNT` host ids steps run as; `None`: the runner's choice.
    pub step_ids: Option<String>,
    pub image_max_bytes: u64,
    pub image_max_layers: u32,
}

impl Default for StepBounds {
    fn default() -> Self {
        Self {
            disk_bytes: DEFAULT_DISK_BYTES,
            log_bytes: DEFAULT_LOG_BYTES,
            egress_allow: Vec::new(),
            step_ids: None,
            image_max_bytes: DEFAULT_IMAGE_MAX_BYTES,
            image_max_layers: DEFAULT_IMAGE_MAX_LAYERS,
        }
    }
}

impl StepBounds {
    /// What the runner gets for a build of `spec`.
    pub fn for_job(&self, spec: &Spec) -> proto::Bounds {
        proto::Bounds {
            disk_bytes: spec.disk.unwrap_or(self.disk_bytes),
            log_bytes: self.log_bytes,
            egress_allow: self.egress_allow.clone(),
            step_ids: self.step_ids.clone().unwrap_or_default(),
            image_max_bytes: self.image_max_bytes,
            image_max_layers: self.image_max_layers,
        }
    }
}

/// A build's stored log, bounded even if a runner sent more than its
/// budget: the runner keeps head and tail within `limit`; the daemon stores
/// at most a little more (its notes, the runner's egress refusals) and then
/// drops lines, counting them.
#[derive(Debug)]
pub struct LogBackstop {
    left: u64,
    pub dropped_lines: u64,
}

impl LogBackstop {
    pub fn new(limit: u64) -> Self {
        Self {
            left: limit + (limit / 8).max(1 << 20),
            dropped_lines: 0,
        }
    }

    /// Whether a line of `len` bytes may still be stored.
    pub fn admit(&mut self, len: usize) -> bool {
        let cost = len as u64 + 64;
        if cost <= self.left {
            self.left -= cost;
            true
        } else {
            self.dropped_lines += 1;
            false
        }
    }
}

/// The line the log shows where `lines` lines (`bytes` bytes) of a step's
/// output were cut.
pub fn cut_marker(lines: u64, bytes: u64, limit: u64) -> String {
    format!(
        "[custody] {lines} lines ({bytes} bytes) of this step's output were cut here: a build's log keeps its first and last {} bytes (its limit is {limit} bytes)",
        limit / 2
    )
}
