//! Prometheus metrics: the queue as the store sees it (read at scrape time,
//! so every daemon reports the shared queue), and durations of the builds
//! this daemon ran.

use std::sync::Mutex;
use std::time::Duration;

use custody_daemon::queue::Observer;
use custody_daemon::store::State;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    queue_depth: Gauge,
    builds: Family<StateLabel, Gauge>,
    running_here: Gauge,
    build_duration: Family<StateLabel, Histogram>,
    push_duration: Histogram,
}

const STATES: [State; 5] = [
    State::Queued,
    State::Running,
    State::Succeeded,
    State::Failed,
    State::Cancelled,
];

impl Default for Metrics {
    fn default() -> Self {
        let queue_depth = Gauge::default();
        let builds = Family::<StateLabel, Gauge>::default();
        let running_here = Gauge::default();
        // 0.1 s to ~1.8 h.
        let build_duration = Family::<StateLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.1, 2.0, 17))
        });
        let push_duration = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        let mut registry = Registry::with_prefix("custody");
        registry.register(
            "queue_depth",
            "Builds waiting in the queue (all daemons)",
            queue_depth.clone(),
        );
        registry.register("builds", "Builds in the store by state", builds.clone());
        registry.register(
            "running_builds",
            "Builds this daemon is running now",
            running_here.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "From claim to end, for builds this daemon ran, by final state",
            build_duration.clone(),
        );
        registry.register(
            "push_duration_seconds",
            "The runner's push phase (after the last step) of builds this daemon ran",
            push_duration.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            queue_depth,
            builds,
            running_here,
            build_duration,
            push_duration,
        }
    }
}

impl Metrics {
    /// The exposition text, with the store's counts as of now.
    pub fn render(&self, counts: &[(State, i64)], running_here: usize) -> String {
        for state in STATES {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            self.builds
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(n);
            if state == State::Queued {
                self.queue_depth.set(n);
            }
        }
        self.running_here.set(running_here as i64);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(
            &mut text,
            &self.registry.lock().expect("not poisoned"),
        )
        .expect("writing to a String does not fail");
        text
    }
}

impl Observer for Metrics {
    fn build_finished(&self, state: State, took: Duration, push: Option<Duration>) {
        self.build_duration
            .get_or_create(&StateLabel {
                state: state.as_str().to_owned(),
            })
            .observe(took.as_secs_f64());
        if let Some(push) = push {
            self.push_duration.observe(push.as_secs_f64());
        }
    }
}
