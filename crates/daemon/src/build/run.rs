//! Stage two: a runner runs the job. Its log goes to the store as it
//! streams (within the log's bound, each step's stored lines hashed for the
//! provenance), the boundary it reports is kept, and what it says it pushed
//! is collected for the daemon to check.

use std::collections::BTreeMap;

use custody_attest::statement::ResourceDescriptor;
use custody_oci::digest::{DigestAlgorithm, Hasher};
use custody_provenance::build_type;
use custody_provenance::build_type::EgressRecord;
use custody_wire::events::{
    Isolation, JobEnd, LogLine, Pulled, Pushed, RunnerEvent, StepEnd, Stream,
};

use super::logs::LogWriter;
use super::plan::Plan;
use super::{BuildError, BuildService, Progress};
use crate::bounds::{LogBackstop, cut_marker};
use crate::record::Timestamp;
use crate::spec::Spec;
use crate::store;

/// What a job that ran to its end left behind.
pub(crate) struct Ran {
    /// What the runner says it pushed, in output order.
    pub outputs: Vec<Pushed>,
    /// What steps read from `pulls` repositories, as the runner saw it.
    pub pulled: Vec<Pulled>,
    pub logs: StepLogs,
    /// The boundary the steps ran within, as the runner set it up.
    pub isolation: Isolation,
    /// Lines the daemon refused past the log's bound.
    pub dropped_lines: u64,
    /// Where steps went through their egress proxies.
    pub egress: Egress,
}

/// The destinations steps reached, as the runner reported them: one entry
/// per step, URI and digest, its bytes summed over every connection.
#[derive(Default)]
pub(crate) struct Egress {
    records: Vec<EgressRecord>,
    /// `(step index, uri, sha256)` to its place in `records`.
    index: std::collections::HashMap<(u32, String, Option<String>), usize>,
}

impl Egress {
    fn add(&mut self, spec: &Spec, reported: &custody_wire::events::Egress) {
        let key = (reported.step, reported.uri.clone(), reported.sha256.clone());
        let at = *self.index.entry(key).or_insert_with(|| {
            self.records.push(EgressRecord {
                step: spec
                    .steps
                    .get(reported.step as usize)
                    .map_or_else(|| reported.step.to_string(), |s| s.name.clone()),
                uri: reported.uri.clone(),
                sha256: reported.sha256.clone(),
                bytes_sent: 0,
                bytes_received: 0,
            });
            self.records.len() - 1
        });
        let record = &mut self.records[at];
        record.bytes_sent = record.bytes_sent.saturating_add(reported.bytes_sent);
        record.bytes_received = record
            .bytes_received
            .saturating_add(reported.bytes_received);
    }

    /// The `egress:STEP` byproducts.
    pub fn byproducts(&self) -> impl Iterator<Item = ResourceDescriptor> + '_ {
        self.records.iter().map(EgressRecord::descriptor)
    }
}

/// Each step's stored log, hashed as it is stored, and what was cut of it.
#[derive(Default)]
pub(crate) struct StepLogs {
    digests: BTreeMap<u32, Hasher>,
    cuts: BTreeMap<u32, (u64, u64)>,
}

impl StepLogs {
    fn hash(&mut self, line: &LogLine) {
        let hasher = self
            .digests
            .entry(line.step)
            .or_insert_with(|| Hasher::new(&DigestAlgorithm::Sha256).expect("sha256"));
        hasher.update(&line.line);
        hasher.update(b"\n");
    }

    /// The `log:STEP` byproducts: the digest of what was stored, and what
    /// was cut when the log passed its bound.
    pub fn byproducts(mut self, spec: &Spec) -> Vec<ResourceDescriptor> {
        spec.steps
            .iter()
            .enumerate()
            .map(|(index, step)| {
                let index = index as u32;
                let hex = match self.digests.remove(&index) {
                    Some(hasher) => hasher.finish().digest().to_owned(),
                    None => custody_oci::digest::sha256(b"").digest().to_owned(),
                };
                build_type::step_log(&step.name, hex, self.cuts.get(&index).copied())
            })
            .collect()
    }
}

impl BuildService {
    /// Hands the planned job to a runner and follows it to its end.
    pub(crate) async fn run_job(
        &self,
        plan: &Plan,
        logs: &LogWriter,
        progress: &mut (impl FnMut(Progress) + Send),
        cancel: impl Future<Output = String> + Send,
    ) -> Result<Ran, BuildError> {
        let mut recording = Recording {
            logs,
            step_logs: StepLogs::default(),
            backstop: LogBackstop::new(self.bounds.log_bytes),
        };
        let mut isolation = Isolation::default();
        let mut egress = Egress::default();
        let report = self
            .dispatcher
            .run(
                plan.job.clone(),
                |event| {
                    match event {
                        RunnerEvent::Log(line) => recording.store(line),
                        RunnerEvent::LogCut { step, lines, bytes } => {
                            recording.step_logs.cuts.insert(*step, (*lines, *bytes));
                            if *lines == 0 {
                                return; // only ends of long lines: each says so itself
                            }
                            let marker =
                                note(*step, cut_marker(*lines, *bytes, self.bounds.log_bytes));
                            recording.store(&marker);
                            progress(Progress::Runner(RunnerEvent::Log(marker)));
                            return;
                        }
                        RunnerEvent::Egress(reported) => {
                            egress.add(&plan.spec.spec, reported);
                            return;
                        }
                        RunnerEvent::StepStarted {
                            index,
                            name,
                            image_digest,
                        } => {
                            // A digest that does not parse is not recorded.
                            let image = image_digest
                                .as_deref()
                                .and_then(|d| custody_oci::digest::parse(d).ok());
                            logs.step_started(*index, name, image);
                        }
                        RunnerEvent::StepFinished { index, end } => {
                            logs.step_finished(
                                *index,
                                match end {
                                    StepEnd::Exited(code) => store::StepEnding::Exited(*code),
                                    StepEnd::TimedOut => store::StepEnding::TimedOut,
                                },
                            );
                        }
                        RunnerEvent::Isolation(reported) => {
                            // What the runner could not enforce goes in the
                            // build's log (first step), for every reader.
                            for text in &reported.notes {
                                let line = note(0, format!("[custody] warning: {text}"));
                                recording.store(&line);
                                progress(Progress::Runner(RunnerEvent::Log(line)));
                            }
                            isolation = reported.clone();
                            return;
                        }
                        _ => {}
                    }
                    progress(Progress::Runner(event.clone()));
                },
                cancel,
            )
            .await?;
        match report.end {
            JobEnd::Succeeded => Ok(Ran {
                outputs: report.outputs,
                pulled: report.pulled,
                logs: recording.step_logs,
                isolation,
                dropped_lines: recording.backstop.dropped_lines,
                egress,
            }),
            JobEnd::Failed(error) => Err(BuildError::Runner(error)),
            JobEnd::Cancelled(reason) => Err(BuildError::Cancelled(reason)),
        }
    }
}

/// The log on its way to the store, within its bound, hashed per step.
struct Recording<'a> {
    logs: &'a LogWriter,
    step_logs: StepLogs,
    backstop: LogBackstop,
}

impl Recording<'_> {
    fn store(&mut self, line: &LogLine) {
        if !self.backstop.admit(line.line.len()) {
            return;
        }
        self.step_logs.hash(line);
        self.logs.send(store::LogLine {
            step: line.step,
            stream: line.stream.number(),
            line: line.line.clone(),
            time: Timestamp::from_unix_millis(line.unix_millis),
        });
    }
}

/// A line of custody's own in step `step`'s log.
fn note(step: u32, text: String) -> LogLine {
    LogLine {
        step,
        stream: Stream::Stderr,
        line: text.into_bytes(),
        unix_millis: Timestamp::now().unix_millis(),
    }
}
