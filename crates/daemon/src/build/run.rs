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

/// Exact egress records (URL and digest) a build keeps, and the bytes
/// their URIs may take: past either, a contact is folded into one record
/// per step and `tcp://HOST:PORT`.
const MAX_EXACT_EGRESS: usize = 1000;
const MAX_EXACT_EGRESS_URI_BYTES: usize = 256 * 1024;
/// Folded records a build keeps; a step that reaches more hosts than that
/// fails the build, since its provenance could not name them all.
const MAX_FOLDED_EGRESS: usize = 1000;

/// The destinations steps reached, as the runner reported them: one entry
/// per step, URI and digest, its bytes summed over every connection —
/// within bounds, so a step that makes a million distinct requests
/// cannot make the provenance (and the daemon's memory) grow with them.
#[derive(Default)]
pub(crate) struct Egress {
    records: Vec<EgressRecord>,
    /// `(step index, uri, sha256)` to its place in `records`.
    index: std::collections::HashMap<(u32, String, Option<String>), usize>,
    uri_bytes: usize,
    folded_records: usize,
    /// Why a destination could not be recorded: the build fails.
    unrecorded: Option<String>,
}

impl Egress {
    fn add(&mut self, spec: &Spec, reported: &custody_wire::events::Egress) {
        let step_name = || {
            spec.steps
                .get(reported.step as usize)
                .map_or_else(|| reported.step.to_string(), |s| s.name.clone())
        };
        let key = (reported.step, reported.uri.clone(), reported.sha256.clone());
        let exact_room = self.records.len() < MAX_EXACT_EGRESS
            && self.uri_bytes + reported.uri.len() <= MAX_EXACT_EGRESS_URI_BYTES;
        let at = match self.index.get(&key) {
            Some(&at) => at,
            None if exact_room => {
                self.uri_bytes += reported.uri.len();
                self.insert(key, step_name(), reported.sha256.clone())
            }
            None => {
                let Some((host, port)) = build_type::uri_host_port(&reported.uri) else {
                    self.unrecorded.get_or_insert_with(|| {
                        format!(
                            "step `{}` reached `{}`, which names no host and port",
                            step_name(),
                            reported.uri
                        )
                    });
                    return;
                };
                let key = (reported.step, EgressRecord::tunnel_uri(&host, port), None);
                let at = match self.index.get(&key) {
                    Some(&at) => at,
                    None if self.folded_records < MAX_FOLDED_EGRESS => {
                        self.folded_records += 1;
                        self.insert(key, step_name(), None)
                    }
                    None => {
                        self.unrecorded.get_or_insert_with(|| {
                            format!(
                                "step `{}` reached more destinations through its egress proxy than a provenance records ({MAX_EXACT_EGRESS} URLs, then {MAX_FOLDED_EGRESS} hosts); no provenance is published for a build whose destinations cannot all be named",
                                step_name()
                            )
                        });
                        return;
                    }
                };
                self.records[at].folded += 1;
                at
            }
        };
        let record = &mut self.records[at];
        record.bytes_sent = record.bytes_sent.saturating_add(reported.bytes_sent);
        record.bytes_received = record
            .bytes_received
            .saturating_add(reported.bytes_received);
    }

    fn insert(
        &mut self,
        key: (u32, String, Option<String>),
        step: String,
        sha256: Option<String>,
    ) -> usize {
        self.records.push(EgressRecord {
            step,
            uri: key.1.clone(),
            sha256,
            bytes_sent: 0,
            bytes_received: 0,
            folded: 0,
        });
        self.index.insert(key, self.records.len() - 1);
        self.records.len() - 1
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
            // Steps succeeded, but where they went cannot all be recorded.
            JobEnd::Succeeded if egress.unrecorded.is_some() => Err(BuildError::EgressUnrecorded(
                egress.unrecorded.take().unwrap_or_default(),
            )),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reached(step: u32, uri: String) -> custody_wire::events::Egress {
        custody_wire::events::Egress {
            step,
            uri,
            sha256: Some("ab".repeat(32)),
            bytes_sent: 10,
            bytes_received: 20,
        }
    }

    /// Past the exact records, contacts fold per host and port; past the
    /// folded ones, the build cannot be recorded and says which step.
    #[test]
    fn egress_past_its_bounds_is_folded_then_refused_never_kept_whole() {
        let spec = crate::spec::parse(
            "steps:\n  - name: fetch\n    network: true\n    run: x\n",
            std::path::Path::new("custody.yaml"),
        )
        .unwrap();
        let mut egress = Egress::default();
        for n in 0..MAX_EXACT_EGRESS + 5 {
            egress.add(&spec, &reached(0, format!("http://a.example/{n}")));
        }
        // The same URL again adds to its record, never a new one.
        egress.add(&spec, &reached(0, "http://a.example/0".into()));
        assert_eq!(egress.records.len(), MAX_EXACT_EGRESS + 1);
        let folded = egress.records.last().unwrap();
        assert_eq!(folded.uri, "tcp://a.example:80");
        assert_eq!((folded.folded, folded.sha256.as_ref()), (5, None));
        assert_eq!(folded.bytes_received, 5 * 20);
        assert_eq!(egress.records[0].bytes_received, 2 * 20);
        assert!(egress.unrecorded.is_none());

        // One folded record is a.example's; the rest of the room goes to ports.
        for port in 1..MAX_FOLDED_EGRESS {
            egress.add(&spec, &reached(0, format!("tcp://[::1]:{port}")));
        }
        assert_eq!(egress.records.len(), MAX_EXACT_EGRESS + MAX_FOLDED_EGRESS);
        assert_eq!(egress.records.last().unwrap().uri, "tcp://[::1]:999");
        assert!(egress.unrecorded.is_none());
        egress.add(&spec, &reached(0, "http://b.example/".into()));
        assert_eq!(egress.records.len(), MAX_EXACT_EGRESS + MAX_FOLDED_EGRESS);
        let why = egress.unrecorded.expect("the build cannot be recorded");
        assert!(
            why.starts_with("step `fetch` reached more destinations"),
            "{why}"
        );
    }
}
