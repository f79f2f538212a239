//! One build, from spec to signed provenance, as a pipeline of typed stages:
//!
//! 1. `plan`: everything the provenance will claim, resolved before any
//!    runner exists (the source to a commit, step image tags to digests,
//!    destinations — each checked able to take a push) and the job.
//! 2. `run`: a runner runs the steps and pushes every output by digest;
//!    the log streams to the store within its bound.
//! 3. `publish`: `Checked` outputs (fetched back from their destinations)
//!    are the only thing that can be `Signed` for; only a signed statement
//!    is `Attached`; only then are the tags written.
//!
//! A failure at any stage is a [`BuildError`] that keeps its cause; the
//! build's end state follows from it. A failed build publishes nothing: no
//! provenance, no tag moved ("a failed build publishes nothing" is kept by
//! `BuildService::execute` and the stage types).

mod error;
mod logs;
mod plan;
mod publish;
mod run;
mod stop;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use custody_attest::keys::Signer;
use custody_attest::statement::{
    BuildDefinition, BuildMetadata, Builder, Provenance, ResourceDescriptor, RunDetails,
};
use custody_oci::registry::RegistryOptions;
use custody_provenance::build_type::{self, BUILD_TYPE};
use custody_wire::events::{Isolation, RunnerEvent};
use serde_json::json;

pub use error::BuildError;
pub use logs::LOG_BATCH_INTERVAL;

use crate::bounds::StepBounds;
use crate::dispatch::Dispatcher;
use crate::policy::ServicePolicy;
use crate::record::{BuildId, Timestamp};
use crate::source::BuildSource;
use crate::spec::{self, Spec};
use crate::store::{Ending, NewBuild, State, Store, StoreError};
use logs::LogWriter;
use plan::{Clients, Plan};
use publish::Published;
use run::Ran;
use stop::Stop;

/// What to build.
#[derive(Debug)]
pub struct BuildRequest {
    /// The spec file, as recorded in the provenance: a path in the source,
    /// or (`custody build`) on this machine.
    pub spec_path: PathBuf,
    pub spec: SpecInput,
    /// What it builds: the submitted source, else the spec's, else the
    /// directory given.
    pub source: BuildSource,
    /// The build this one retries (`internalParameters.retryOf`).
    pub retry_of: Option<BuildId>,
}

/// The spec a build runs.
#[derive(Debug)]
pub enum SpecInput {
    /// Read once (the digest recorded is of the bytes that were parsed and
    /// run). `inline`: it did not come from the source at the commit built.
    Given {
        bytes: Vec<u8>,
        spec: Box<Spec>,
        inline: bool,
    },
    /// Read from the source, at `spec_path`, at the commit the build
    /// resolves its revision to.
    InSource,
}

impl BuildRequest {
    /// The request for the spec whose exact bytes are `spec_bytes`, found
    /// at `spec_path`, building `directory` unless the spec names a git
    /// source (`custody build`).
    pub fn parse(
        spec_path: PathBuf,
        spec_bytes: Vec<u8>,
        directory: &Path,
    ) -> Result<Self, spec::SpecError> {
        let spec = parse_spec(&spec_path, &spec_bytes)?;
        let source = BuildSource::choose(None, spec.source.as_ref(), Some(directory))
            .unwrap_or_else(|| BuildSource::Directory(directory.to_owned()));
        // The spec comes from the source when it is a file of the
        // directory being built; from a git source it never does.
        let inline = match &source {
            BuildSource::Git(_) => true,
            BuildSource::Directory(dir) => {
                let inside = |dir: &Path| {
                    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
                    let spec = spec_path
                        .canonicalize()
                        .unwrap_or_else(|_| spec_path.clone());
                    spec.starts_with(dir)
                };
                !inside(dir)
            }
        };
        Ok(Self {
            spec_path,
            spec: SpecInput::Given {
                bytes: spec_bytes,
                spec: Box::new(spec),
                inline,
            },
            source,
            retry_of: None,
        })
    }

    /// The request for a recorded build: the source chosen when it was
    /// submitted, and the spec that came with it (`Some`: inline) or
    /// `None` to read it from the source.
    pub fn recorded(
        spec_path: PathBuf,
        spec_bytes: Option<Vec<u8>>,
        source: BuildSource,
    ) -> Result<Self, spec::SpecError> {
        let spec = match spec_bytes {
            Some(bytes) => SpecInput::Given {
                spec: Box::new(parse_spec(&spec_path, &bytes)?),
                bytes,
                inline: true,
            },
            None => SpecInput::InSource,
        };
        Ok(Self {
            spec_path,
            spec,
            source,
            retry_of: None,
        })
    }

    /// The spec, when it came with the request.
    pub fn given_spec(&self) -> Option<&Spec> {
        match &self.spec {
            SpecInput::Given { spec, .. } => Some(spec),
            SpecInput::InSource => None,
        }
    }
}

/// Parses a spec read from `spec_path`.
pub(crate) fn parse_spec(spec_path: &Path, spec_bytes: &[u8]) -> Result<Spec, spec::SpecError> {
    let text = std::str::from_utf8(spec_bytes).map_err(|e| spec::SpecError {
        file: spec_path.to_owned(),
        line: 0,
        column: 0,
        message: format!("the spec is not UTF-8 text: {e}"),
        snippet: None,
    })?;
    spec::parse(text, spec_path)
}

/// The daemon's side of building: everything trusted that a build needs.
pub struct BuildService {
    pub dispatcher: Arc<Dispatcher>,
    /// The executor's kind, recorded in the provenance.
    pub executor_kind: String,
    /// How the daemon reaches registries; the runner gets what it needs of
    /// this for one job.
    pub registry: RegistryOptions,
    pub key: Arc<dyn Signer>,
    pub builder_id: String,
    /// The runner binary's digest, when the daemon can read it.
    pub runner_digest: Option<custody_oci::Digest>,
    /// Host paths no step may see (the data directory, the key file).
    pub hidden_paths: Vec<PathBuf>,
    /// Disk, log, egress, step ids and step image limits.
    pub bounds: StepBounds,
    pub store: Store,
    /// What a shared service accepts (`custody serve`); `None` for a
    /// build on its user's own machine.
    pub policy: Option<Arc<ServicePolicy>>,
    /// The longest a build may take, from planning to publishing.
    pub max_build: Option<Duration>,
    /// The secrets steps may ask for, and which sources may use each.
    pub secrets: Arc<crate::secrets::Secrets>,
}

/// What happens, for whoever watches.
#[derive(Debug)]
pub enum Progress {
    Queued {
        id: BuildId,
    },
    Source {
        description: String,
    },
    StepImage {
        step: String,
        pinned: String,
    },
    /// What the runner said (its log, its steps, what it pushed).
    Runner(RunnerEvent),
    Checked {
        destination: String,
        digest: String,
    },
    Attached {
        destination: String,
    },
    /// The destination's tag names the pushed manifest now.
    Tagged {
        destination: String,
    },
}

/// How a build ended.
#[derive(Debug)]
pub enum Outcome {
    Succeeded {
        id: BuildId,
        /// The signed DSSE envelope (JSON).
        envelope: Vec<u8>,
        subjects: Vec<ResourceDescriptor>,
    },
    Failed {
        id: BuildId,
        /// Why, with what to do about it when there is something to say.
        error: String,
    },
    Cancelled {
        id: BuildId,
        reason: String,
    },
}

impl Outcome {
    pub fn id(&self) -> &BuildId {
        match self {
            Outcome::Succeeded { id, .. }
            | Outcome::Failed { id, .. }
            | Outcome::Cancelled { id, .. } => id,
        }
    }

    pub fn state(&self) -> State {
        match self {
            Outcome::Succeeded { .. } => State::Succeeded,
            Outcome::Failed { .. } => State::Failed,
            Outcome::Cancelled { .. } => State::Cancelled,
        }
    }

    /// The outcome a store record tells (another daemon ended the build).
    fn recorded(id: &BuildId, state: Option<State>, error: Option<String>) -> Self {
        let error = error
            .unwrap_or_else(|| "the build was ended elsewhere while this daemon ran it".to_owned());
        match state {
            Some(State::Cancelled) => Outcome::Cancelled {
                id: id.clone(),
                reason: error,
            },
            _ => Outcome::Failed {
                id: id.clone(),
                error,
            },
        }
    }
}

impl BuildService {
    /// Records `request` and runs it to the end at once, outside the queue;
    /// `cancel` resolving cancels it. Only the store failing is an `Err`:
    /// everything else is in the outcome.
    pub async fn run(
        &self,
        request: BuildRequest,
        mut progress: impl FnMut(Progress) + Send,
        cancel: impl Future<Output = String> + Send,
    ) -> Result<Outcome, StoreError> {
        let id = BuildId::new();
        let now = Timestamp::now();
        self.store
            .insert_running(
                &NewBuild {
                    id: &id,
                    spec_path: &request.spec_path.display().to_string(),
                    spec: match &request.spec {
                        SpecInput::Given { bytes, .. } => Some(bytes.as_slice()),
                        SpecInput::InSource => None,
                    },
                    source: &request.source,
                    created_at: now,
                    retry_of: None,
                },
                now,
            )
            .await?;
        progress(Progress::Queued { id: id.clone() });
        self.run_recorded(&id, None, &request, progress, cancel)
            .await
    }

    /// Puts a build of `source` in the queue, with its spec's bytes when
    /// they came with the request (already checked), or `None` to read it
    /// at `spec_path` in the source; returns its id.
    /// `retry_of` names the build this one retries.
    pub async fn enqueue(
        &self,
        spec_path: &str,
        spec_bytes: Option<&[u8]>,
        source: &spec::GitSource,
        retry_of: Option<&BuildId>,
    ) -> Result<BuildId, StoreError> {
        let id = BuildId::new();
        self.store
            .enqueue(&NewBuild {
                id: &id,
                spec_path,
                spec: spec_bytes,
                source: &BuildSource::Git(source.clone()),
                created_at: Timestamp::now(),
                retry_of,
            })
            .await?;
        Ok(id)
    }

    /// Runs a build the store already holds as running (`owner` is the
    /// daemon that claimed it from the queue, if one did) to its end. Log
    /// lines reach the store in batches while it runs.
    pub async fn run_recorded(
        &self,
        id: &BuildId,
        owner: Option<&str>,
        request: &BuildRequest,
        mut progress: impl FnMut(Progress) + Send,
        cancel: impl Future<Output = String> + Send,
    ) -> Result<Outcome, StoreError> {
        let logs = LogWriter::start(self.store.clone(), id.clone());
        let result = self
            .execute(id, owner, request, &mut progress, &logs, cancel)
            .await;
        logs.finish().await?;
        let (state, error, outputs, envelope) = match &result {
            Ok(published) => (
                State::Succeeded,
                None,
                published.outputs.as_slice(),
                Some(published.envelope.as_slice()),
            ),
            Err(error) => (error.state(), Some(error.report()), &[][..], None),
        };
        let recorded = self
            .store
            .finish(
                id,
                owner,
                &Ending {
                    state,
                    finished_at: Timestamp::now(),
                    error: error.as_deref(),
                    outputs,
                    provenance: envelope,
                },
            )
            .await?;
        if !recorded {
            // Another daemon ended it (our lease ran out): its word stands.
            let record = self.store.build(id).await?;
            return Ok(Outcome::recorded(
                id,
                record.as_ref().map(|r| r.state),
                record.and_then(|r| r.error),
            ));
        }
        let id = id.clone();
        Ok(match result {
            Ok(published) => Outcome::Succeeded {
                id,
                envelope: published.envelope,
                subjects: published.subjects,
            },
            Err(error) if error.state() == State::Cancelled => Outcome::Cancelled {
                id,
                reason: error.to_string(),
            },
            Err(error) => Outcome::Failed {
                id,
                error: error.report(),
            },
        })
    }

    /// The stages, in order; the first failure ends the build.
    async fn execute(
        &self,
        id: &BuildId,
        owner: Option<&str>,
        request: &BuildRequest,
        progress: &mut (impl FnMut(Progress) + Send),
        logs: &LogWriter,
        cancel: impl Future<Output = String> + Send,
    ) -> Result<Published, BuildError> {
        let started_on = Timestamp::now();
        let stop = Stop::new(cancel, self.max_build);
        let mut clients = Clients::new(&self.registry);
        let plan = stop
            .guard(
                "planning (source, spec, step images, destinations)",
                self.plan(id, request, &mut clients, progress),
            )
            .await?;
        // From here on a runner may exist: this build must never be handed
        // to another daemon.
        self.store.mark_runner_started(id).await?;
        const RUNNING: &str = "running the steps";
        let ran = self
            .run_job(&plan, logs, progress, stop.reason(RUNNING))
            .await
            .map_err(|e| stop.explain(RUNNING, e))?;
        let checked = stop
            .guard(
                "checking the outputs",
                publish::check(
                    &plan.outputs,
                    &plan.pushes,
                    &ran.outputs,
                    &mut clients,
                    progress,
                ),
            )
            .await?;
        let provenance = self.provenance(id, request, plan, ran, started_on);
        self.ensure_claim(id, owner).await?;
        // A token may take its time (a network HSM): off the runtime, so
        // the service's other builds and API answers go on meanwhile.
        let key = self.key.clone();
        let signed =
            tokio::task::spawn_blocking(move || publish::sign(checked, &provenance, key.as_ref()))
                .await
                .map_err(|e| {
                    BuildError::Sign(custody_attest::Error::Sign {
                        signer: self.key.key_id().to_owned(),
                        reason: format!("the signer stopped: {e}"),
                    })
                })??;
        let attached = stop
            .guard(
                "attaching the provenance",
                publish::attach_all(signed, &mut clients, progress),
            )
            .await?;
        stop.guard(
            "tagging",
            publish::tag_all(attached, &mut clients, progress),
        )
        .await
    }

    /// A daemon whose lease ran out while the runner worked must not
    /// publish: another daemon has already ended the build.
    async fn ensure_claim(&self, id: &BuildId, owner: Option<&str>) -> Result<(), BuildError> {
        let Some(owner) = owner else {
            return Ok(());
        };
        let held = self
            .store
            .build(id)
            .await?
            .is_some_and(|b| b.state == State::Running && b.owner.as_deref() == Some(owner));
        if held {
            Ok(())
        } else {
            Err(BuildError::LostClaim)
        }
    }

    /// The SLSA provenance of build `id` (custody's build type).
    fn provenance(
        &self,
        id: &BuildId,
        request: &BuildRequest,
        plan: Plan,
        ran: Ran,
        started_on: Timestamp,
    ) -> Provenance {
        let spec_digest = custody_oci::digest::sha256(&plan.spec.bytes);
        Provenance {
            build_definition: BuildDefinition {
                build_type: BUILD_TYPE.to_owned(),
                external_parameters: json!({
                    "source": request.source.to_json(),
                    "spec": build_type::spec_parameters(
                        &request.spec_path.display().to_string(),
                        &spec_digest,
                        plan.spec.inline,
                    ),
                }),
                internal_parameters: Some(self.internal_parameters(
                    &plan.spec.spec,
                    &ran.isolation,
                    ran.dropped_lines,
                    request.retry_of.as_ref(),
                )),
                resolved_dependencies: std::iter::once(plan.source)
                    .chain(plan.step_images)
                    .chain(pulled_dependencies(&plan.pulls, &ran.pulled))
                    .collect(),
            },
            run_details: RunDetails {
                builder: Builder {
                    id: self.builder_id.clone(),
                    builder_dependencies: self
                        .runner_digest
                        .iter()
                        .map(|digest| ResourceDescriptor {
                            name: Some("runner".to_owned()),
                            digest: BTreeMap::from([(
                                digest.algorithm().to_string(),
                                digest.digest().to_owned(),
                            )]),
                            ..ResourceDescriptor::default()
                        })
                        .collect(),
                    version: BTreeMap::from([(
                        "custody".to_owned(),
                        env!("CARGO_PKG_VERSION").to_owned(),
                    )]),
                },
                metadata: Some(BuildMetadata {
                    invocation_id: id.to_string(),
                    started_on: Some(started_on.rfc3339()),
                    finished_on: Some(Timestamp::now().rfc3339()),
                }),
                byproducts: ran
                    .logs
                    .byproducts(&plan.spec.spec)
                    .into_iter()
                    .chain(ran.egress.byproducts())
                    .collect(),
            },
        }
    }

    /// The executor and the step boundary as the runner reported it.
    fn internal_parameters(
        &self,
        spec: &Spec,
        isolation: &Isolation,
        dropped_lines: u64,
        retry_of: Option<&BuildId>,
    ) -> serde_json::Value {
        let mut parameters = json!({
            "executor": self.executor_kind,
            "sandbox": {
                "kind": "bubblewrap",
                "user": { "uidMap": isolation.uid_map, "gidMap": isolation.gid_map },
                "network": "private",
                "egressAllow": isolation.egress_allow,
                "diskBytes": isolation.disk_bytes.unwrap_or(0),
                "cgroups": isolation.cgroups,
                "logBytes": isolation.log_bytes,
                "logLinesDroppedByDaemon": dropped_lines,
                "notes": isolation.notes,
                "steps": spec.steps.iter().map(|step| json!({
                    "name": step.name,
                    "egress": step.network,
                    "egressHosts": step.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "timeoutSeconds": step.timeout.map(|t| t.as_secs()),
                    "memoryBytes": step.memory.unwrap_or(spec::DEFAULT_MEMORY_BYTES),
                    "pids": step.pids.unwrap_or(spec::DEFAULT_PIDS),
                    "userNamespaces": step.user_namespaces,
                    // Names only: never a value, never a digest of one.
                    "secrets": step.secret_names(),
                })).collect::<Vec<_>>(),
            },
        });
        if let Some(id) = retry_of {
            parameters["retryOf"] = json!(id.as_str());
        }
        parameters
    }
}

/// The manifests steps read from `pulls` repositories, as resolved
/// dependencies named for the repository they were served from. The
/// runner names only the `pulls` it was given; anything else it said, or
/// a digest that does not parse, is not claimed.
fn pulled_dependencies(
    pulls: &[plan::PlannedPull],
    pulled: &[custody_wire::events::Pulled],
) -> Vec<custody_attest::statement::ResourceDescriptor> {
    pulled
        .iter()
        .filter_map(|p| {
            let pull = pulls.iter().find(|planned| planned.name == p.pull)?;
            let digest = custody_oci::digest::parse(&p.digest).ok()?;
            let from = format!("{}/{}", pull.from.registry(), pull.from.repository());
            Some(build_type::pulled(&pull.name, &from, &digest))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &[u8] = b"steps:\n  - name: a\n    run: true\n";

    fn inline(request: &BuildRequest) -> bool {
        match request.spec {
            SpecInput::Given { inline, .. } => inline,
            SpecInput::InSource => panic!("a parsed request carries its spec"),
        }
    }

    #[test]
    fn a_spec_is_from_the_source_only_when_it_is_a_file_of_the_directory_built() {
        let dir = tempfile::tempdir().unwrap();
        let built = dir.path().join("src");
        fs_err::create_dir_all(built.join("ci")).unwrap();
        let own = BuildRequest::parse(built.join("ci/custody.yaml"), SPEC.to_vec(), &built);
        assert!(!inline(&own.unwrap()));
        let beside = BuildRequest::parse(dir.path().join("custody.yaml"), SPEC.to_vec(), &built);
        assert!(inline(&beside.unwrap()));
        // A sibling whose name starts with the directory's is not inside it.
        let sibling =
            BuildRequest::parse(dir.path().join("src2/custody.yaml"), SPEC.to_vec(), &built);
        assert!(inline(&sibling.unwrap()));
        let git =
            b"source:\n  git: https://example.org/r.git\nsteps:\n  - name: a\n    run: true\n";
        let named = BuildRequest::parse(built.join("custody.yaml"), git.to_vec(), &built);
        assert!(inline(&named.unwrap()));
    }
}
