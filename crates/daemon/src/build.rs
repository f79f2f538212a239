//! One build, from spec to signed provenance.
//!
//! The daemon resolves everything the provenance will claim before the
//! runner starts (the source revision to a commit, each step image tag to a
//! digest, the destinations), hands the runner the job with the registry
//! access it needs for this job only, and follows it. When the runner says
//! it pushed something, the daemon checks it at the destination itself;
//! only when every step, push and check passed does it sign the statement,
//! store it and attach it to every pushed manifest. A failed build publishes
//! nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use custody_attest::keys::SigningKey;
use custody_attest::policy::{BUILD_TYPE, SOURCE_DEPENDENCY, STEP_IMAGE_PREFIX, SubjectKind};
use custody_attest::statement::{
    BuildDefinition, BuildMetadata, Builder, Provenance, ResourceDescriptor, RunDetails,
    SLSA_PROVENANCE_V1, Statement,
};
use custody_oci::digest::{self, Digest};
use custody_oci::layout::Layout;
use custody_oci::registry::{Client, Credential, RegistryOptions, certs};
use custody_oci::{Location, Reference};
use custody_wire::rpc::proto::{self, Event, event::Kind};
use oci_spec::image::ImageManifest;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::attach;
use crate::bounds::{LogBackstop, StepBounds, cut_marker};
use crate::dispatch::{Dispatcher, JobError};
use crate::spec::{self, Spec, Values};
use crate::store::{self, Ending, NewBuild, State, Store, StoreError};

/// The OCI annotation that names an artifact file.
const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// What to build.
#[derive(Debug)]
pub struct BuildRequest {
    /// The spec file, as recorded in the provenance.
    pub spec_path: PathBuf,
    /// Its exact bytes (their digest is recorded).
    pub spec_bytes: Vec<u8>,
    pub spec: Spec,
    /// The directory to build when the spec names no git source.
    pub directory: Option<PathBuf>,
}

impl BuildRequest {
    /// The request for the spec whose exact bytes are `spec_bytes` (read
    /// once: the digest recorded is of the bytes that are parsed and run),
    /// found at `spec_path`, building `directory` unless the spec names a
    /// git source.
    pub fn parse(
        spec_path: PathBuf,
        spec_bytes: Vec<u8>,
        directory: Option<PathBuf>,
    ) -> Result<Self, spec::SpecError> {
        let text = std::str::from_utf8(&spec_bytes).map_err(|e| spec::SpecError {
            file: spec_path.clone(),
            line: 0,
            column: 0,
            message: format!("the spec is not UTF-8 text: {e}"),
            snippet: None,
        })?;
        let spec = spec::parse(text, &spec_path)?;
        Ok(Self {
            spec_path,
            spec_bytes,
            spec,
            directory,
        })
    }
}

/// The daemon's side of building: everything trusted that a build needs.
pub struct BuildService {
    pub dispatcher: Arc<Dispatcher>,
    /// The executor's kind, recorded in the provenance.
    pub executor_kind: String,
    /// How the daemon reaches registries; the runner gets what it needs of
    /// this for one job.
    pub registry: RegistryOptions,
    pub key: Arc<SigningKey>,
    pub builder_id: String,
    /// `sha256:<hex>` of the runner binary, when the daemon can read it.
    pub runner_digest: Option<String>,
    /// Host paths no step may see (the data directory, the key file).
    pub hidden_paths: Vec<PathBuf>,
    /// Disk, log, egress, step ids and step image limits.
    pub bounds: StepBounds,
    pub store: Store,
}

/// What happens, for whoever watches.
#[derive(Debug)]
pub enum Progress {
    Queued {
        id: String,
    },
    Source {
        description: String,
    },
    StepImage {
        step: String,
        pinned: String,
    },
    Runner(Event),
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
pub struct Outcome {
    pub id: String,
    pub state: State,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The signed DSSE envelope (JSON), only for a succeeded build.
    pub envelope: Option<Vec<u8>>,
    pub subjects: Vec<ResourceDescriptor>,
}

/// A build that did not succeed, and why.
struct Failure {
    state: State,
    message: String,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Self {
            state: State::Failed,
            message: message.into(),
        }
    }
}

/// What a succeeded build published.
struct Published {
    envelope: Vec<u8>,
    subjects: Vec<ResourceDescriptor>,
}

/// What the daemon resolved before the runner started.
struct Resolved {
    source_dependency: ResourceDescriptor,
    job_source: proto::source::Kind,
    revision: String,
    commit: String,
    step_images: Vec<ResourceDescriptor>,
}

/// A pushed output as the daemon expects it.
struct Expected {
    destination: Location,
    artifact: bool,
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
        let id = uuid::Uuid::now_v7().to_string();
        let source = external_source(&request);
        self.store
            .insert_running(
                &NewBuild {
                    id: &id,
                    spec_path: &request.spec_path.display().to_string(),
                    spec: &request.spec_bytes,
                    source: &source.to_string(),
                    created_at: &now(),
                },
                &now(),
            )
            .await?;
        progress(Progress::Queued { id: id.clone() });
        self.run_recorded(&id, None, &request, progress, cancel)
            .await
    }

    /// Puts a build of `spec_bytes` (already checked) from `source` in the
    /// queue; returns its id.
    pub async fn enqueue(
        &self,
        spec_path: &str,
        spec_bytes: &[u8],
        source: &spec::GitSource,
    ) -> Result<String, StoreError> {
        let id = uuid::Uuid::now_v7().to_string();
        let source = json!({ "git": source.git.as_str(), "revision": source.revision });
        self.store
            .enqueue(&NewBuild {
                id: &id,
                spec_path,
                spec: spec_bytes,
                source: &source.to_string(),
                created_at: &now(),
            })
            .await?;
        Ok(id)
    }

    /// Runs a build the store already holds as running (`owner` is the
    /// daemon that claimed it from the queue, if one did) to its end. Log
    /// lines reach the store in batches while it runs.
    pub async fn run_recorded(
        &self,
        id: &str,
        owner: Option<&str>,
        request: &BuildRequest,
        mut progress: impl FnMut(Progress) + Send,
        cancel: impl Future<Output = String> + Send,
    ) -> Result<Outcome, StoreError> {
        let logs = LogWriter::start(self.store.clone(), id.to_owned());
        let result = self
            .execute(id, owner, request, &mut progress, &logs, cancel)
            .await;
        logs.finish().await?;
        let finished_at = now();
        let (state, error, outputs, published) = match result {
            Ok((outputs, published)) => (State::Succeeded, None, outputs, Some(published)),
            Err(failure) => (failure.state, Some(failure.message), Vec::new(), None),
        };
        let recorded = self
            .store
            .finish(
                id,
                owner,
                &Ending {
                    state,
                    finished_at: &finished_at,
                    error: error.as_deref(),
                    outputs: &outputs,
                    provenance: published.as_ref().map(|p| p.envelope.as_slice()),
                },
            )
            .await?;
        if !recorded {
            // Another daemon ended it (our lease ran out): its word stands.
            let record = self.store.build(id).await?;
            return Ok(Outcome {
                id: id.to_owned(),
                state: record.as_ref().map_or(State::Failed, |r| r.state),
                error: Some(record.and_then(|r| r.error).unwrap_or_else(|| {
                    "the build was ended elsewhere while this daemon ran it".to_owned()
                })),
                envelope: None,
                subjects: Vec::new(),
            });
        }
        let (envelope, subjects) =
            published.map_or((None, Vec::new()), |p| (Some(p.envelope), p.subjects));
        Ok(Outcome {
            id: id.to_owned(),
            state,
            error,
            envelope,
            subjects,
        })
    }

    async fn execute(
        &self,
        id: &str,
        owner: Option<&str>,
        request: &BuildRequest,
        progress: &mut (impl FnMut(Progress) + Send),
        logs: &LogWriter,
        cancel: impl Future<Output = String> + Send,
    ) -> Result<(Vec<store::Output>, Published), Failure> {
        let started_on = now();
        // One client per registry host for the whole build: resolving step
        // images, checking outputs and attaching share TLS setup and tokens.
        let mut clients = Clients::new(&self.registry);
        let resolved = self.resolve(request, &mut clients, progress).await?;

        let values = Values {
            revision: &resolved.revision,
            commit: &resolved.commit,
            job: id,
        };
        let mut expected = Vec::new();
        let mut images = Vec::new();
        for image in &request.spec.images {
            let destination = resolve_destination(&image.to, &values, &request.spec_path)?;
            images.push(proto::ImageOutput {
                from: image.from.to_string(),
                to: destination.to_string(),
            });
            expected.push(Expected {
                destination,
                artifact: false,
            });
        }
        let mut artifacts = Vec::new();
        for artifact in &request.spec.artifacts {
            let destination = resolve_destination(&artifact.to, &values, &request.spec_path)?;
            artifacts.push(proto::ArtifactOutput {
                paths: artifact.paths.clone(),
                to: destination.to_string(),
            });
            expected.push(Expected {
                destination,
                artifact: true,
            });
        }

        // Every destination must be able to take its output before any
        // step runs: a typo in a host should cost seconds, not a build.
        let declared = request
            .spec
            .images
            .iter()
            .map(|i| &i.to)
            .chain(request.spec.artifacts.iter().map(|a| &a.to));
        for (declared, expected) in declared.zip(&expected) {
            preflight(&mut clients, &expected.destination)
                .await
                .map_err(|e| {
                    let hint = e.hint().map(|h| format!("; hint: {h}")).unwrap_or_default();
                    Failure::new(format!(
                        "{}:{}:{}: destination `{}` cannot take the build's output: {e}{hint}",
                        request.spec_path.display(),
                        declared.line,
                        declared.column,
                        expected.destination
                    ))
                })?;
        }

        let hosts = registry_hosts(&expected, &resolved.step_images);
        let job = proto::Job {
            job_id: id.to_owned(),
            steps: request
                .spec
                .steps
                .iter()
                .zip(pinned_images(&request.spec, &resolved.step_images))
                .map(|(step, image)| job_step(step, image))
                .collect(),
            registries: Some(self.registry_access(&hosts).await?),
            images,
            artifacts,
            source: Some(proto::Source {
                kind: Some(resolved.job_source.clone()),
            }),
            hidden_paths: self
                .hidden_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            bounds: Some(self.bounds.for_job(&request.spec)),
        };

        // From here on a runner may exist: this build must never be handed
        // to another daemon.
        self.store
            .mark_runner_started(id)
            .await
            .map_err(|e| Failure::new(e.to_string()))?;
        let mut step_logs: BTreeMap<u32, Sha256> = BTreeMap::new();
        let mut isolation = None;
        let mut cuts: BTreeMap<u32, proto::LogCut> = BTreeMap::new();
        let mut backstop = LogBackstop::new(self.bounds.log_bytes);
        let report = self
            .dispatcher
            .run(
                job,
                |event| {
                    let mut store_line = |line: &proto::LogLine| {
                        if !backstop.admit(line.line.len()) {
                            return;
                        }
                        let hasher = step_logs.entry(line.step).or_default();
                        hasher.update(&line.line);
                        hasher.update(b"\n");
                        logs.send(store::LogLine {
                            step: line.step,
                            stream: line.stream,
                            line: line.line.clone(),
                            unix_millis: line.unix_millis,
                        });
                    };
                    match &event.kind {
                        Some(Kind::Log(line)) => store_line(line),
                        Some(Kind::LogCut(cut)) => {
                            cuts.insert(cut.step, *cut);
                            if cut.lines == 0 {
                                return; // only ends of long lines: each says so itself
                            }
                            let marker = proto::LogLine {
                                step: cut.step,
                                stream: proto::log_line::Stream::Stderr as i32,
                                line: cut_marker(cut, self.bounds.log_bytes).into_bytes(),
                                unix_millis: now_millis(),
                            };
                            store_line(&marker);
                            progress(Progress::Runner(Event {
                                kind: Some(Kind::Log(marker)),
                            }));
                            return;
                        }
                        Some(Kind::Isolation(reported)) => {
                            // What the runner could not enforce goes in the
                            // build's log (first step), for every reader.
                            for note in &reported.notes {
                                let line = proto::LogLine {
                                    step: 0,
                                    stream: proto::log_line::Stream::Stderr as i32,
                                    line: format!("[custody] warning: {note}").into_bytes(),
                                    unix_millis: now_millis(),
                                };
                                store_line(&line);
                                progress(Progress::Runner(Event {
                                    kind: Some(Kind::Log(line)),
                                }));
                            }
                            isolation = Some(reported.clone());
                            return;
                        }
                        _ => {}
                    }
                    progress(Progress::Runner(event.clone()));
                },
                cancel,
            )
            .await
            .map_err(|e| match e {
                JobError::Cancelled(reason) => Failure {
                    state: State::Cancelled,
                    message: reason,
                },
                other => Failure::new(other.to_string()),
            })?;
        if report.finished.cancelled {
            return Err(Failure {
                state: State::Cancelled,
                message: report.finished.error,
            });
        }
        if !report.finished.success {
            return Err(Failure::new(report.finished.error));
        }

        // The runner says what it pushed; the daemon checks each at its
        // destination before anything is signed.
        if report.outputs.len() != expected.len() {
            return Err(Failure::new(format!(
                "the runner reported {} pushed outputs; the spec declares {}",
                report.outputs.len(),
                expected.len()
            )));
        }
        let mut subjects = Vec::new();
        let mut checked = Vec::new();
        for (output, expected) in report.outputs.iter().zip(&expected) {
            let digest = digest::parse(&output.digest).map_err(|e| {
                Failure::new(format!(
                    "the runner reported `{}` for `{}`: {e}",
                    output.digest, expected.destination
                ))
            })?;
            let manifest = check_output(&mut clients, expected, &digest, output.size)
                .await
                .map_err(|e| {
                    Failure::new(format!(
                        "checking `{}` at `{}`: {e}",
                        digest, expected.destination
                    ))
                })?;
            progress(Progress::Checked {
                destination: expected.destination.to_string(),
                digest: digest.to_string(),
            });
            let kind = if expected.artifact {
                SubjectKind::Artifact
            } else {
                SubjectKind::Image
            };
            subjects.push(ResourceDescriptor {
                annotations: Some(kind.annotations()),
                ..descriptor(Some(subject_name(&expected.destination)), None, &digest)
            });
            if expected.artifact {
                subjects.extend(artifact_files(&manifest).map_err(|e| {
                    Failure::new(format!(
                        "the artifact `{}` at `{}`: {e}",
                        digest, expected.destination
                    ))
                })?);
            }
            checked.push((
                expected,
                oci_spec::image::Descriptor::new(
                    manifest.media_type,
                    manifest.bytes.len() as u64,
                    digest,
                ),
                manifest.bytes,
            ));
        }

        let byproducts = request
            .spec
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| {
                let hex = step_logs
                    .remove(&(index as u32))
                    .map(|h| hex(&h.finalize()))
                    .unwrap_or_else(|| hex(&Sha256::digest(b"")));
                // The digest covers the stored log; what was cut is said.
                let annotations = cuts.get(&(index as u32)).map(|cut| {
                    let mut map = serde_json::Map::new();
                    map.insert("cutLines".into(), cut.lines.into());
                    map.insert("cutBytes".into(), cut.bytes.into());
                    map
                });
                ResourceDescriptor {
                    name: Some(format!("log:{}", step.name)),
                    digest: BTreeMap::from([("sha256".to_owned(), hex)]),
                    annotations,
                    ..ResourceDescriptor::default()
                }
            })
            .collect();
        let provenance = Provenance {
            build_definition: BuildDefinition {
                build_type: BUILD_TYPE.to_owned(),
                external_parameters: json!({
                    "source": external_source(request),
                    "spec": {
                        "path": request.spec_path.display().to_string(),
                        "digest": { "sha256": hex(&Sha256::digest(&request.spec_bytes)) },
                    },
                }),
                internal_parameters: Some(self.internal_parameters(
                    &request.spec,
                    isolation.as_ref(),
                    backstop.dropped_lines,
                )),
                resolved_dependencies: std::iter::once(resolved.source_dependency)
                    .chain(resolved.step_images)
                    .collect(),
            },
            run_details: RunDetails {
                builder: Builder {
                    id: self.builder_id.clone(),
                    builder_dependencies: self
                        .runner_digest
                        .as_deref()
                        .and_then(|d| d.strip_prefix("sha256:"))
                        .map(|hex| ResourceDescriptor {
                            name: Some("runner".to_owned()),
                            digest: BTreeMap::from([("sha256".to_owned(), hex.to_owned())]),
                            ..ResourceDescriptor::default()
                        })
                        .into_iter()
                        .collect(),
                    version: BTreeMap::from([(
                        "custody".to_owned(),
                        env!("CARGO_PKG_VERSION").to_owned(),
                    )]),
                },
                metadata: Some(BuildMetadata {
                    invocation_id: id.to_owned(),
                    started_on: Some(started_on),
                    finished_on: Some(now()),
                }),
                byproducts,
            },
        };
        // A daemon whose lease ran out while the runner worked must not
        // publish: another daemon has already failed the build.
        if let Some(owner) = owner {
            let held = self
                .store
                .build(id)
                .await
                .map_err(|e| Failure::new(e.to_string()))?
                .is_some_and(|b| b.state == State::Running && b.owner.as_deref() == Some(owner));
            if !held {
                return Err(Failure::new(
                    "this daemon lost its claim on the build before signing; nothing was published",
                ));
            }
        }
        let statement = Statement::provenance(subjects.clone(), &provenance);
        let envelope = statement
            .sign(&self.key)
            .map_err(|e| Failure::new(format!("signing the provenance: {e}")))?;
        let envelope = serde_json::to_vec_pretty(&envelope).expect("an envelope serialises");

        for (expected, subject, _) in &checked {
            attach_to(&mut clients, &expected.destination, subject, &envelope)
                .await
                .map_err(|e| {
                    Failure::new(format!(
                        "attaching the provenance to `{}`: {e}",
                        expected.destination
                    ))
                })?;
            progress(Progress::Attached {
                destination: expected.destination.to_string(),
            });
        }
        // Only now, with every output pushed, checked, signed for and
        // attached to, do the tags move: a failure before here left every
        // tag where it was.
        for (expected, subject, bytes) in &checked {
            tag(&mut clients, &expected.destination, subject, bytes)
                .await
                .map_err(|e| Failure::new(format!("tagging `{}`: {e}", expected.destination)))?;
            progress(Progress::Tagged {
                destination: expected.destination.to_string(),
            });
        }
        // Recorded as published: the destination with its tag.
        let outputs = report
            .outputs
            .iter()
            .zip(&checked)
            .map(|(o, (expected, _, _))| store::Output {
                reference: expected.destination.to_string(),
                digest: o.digest.clone(),
                size: o.size,
            })
            .collect();
        Ok((outputs, Published { envelope, subjects }))
    }

    /// Resolves the source and the step images.
    async fn resolve(
        &self,
        request: &BuildRequest,
        clients: &mut Clients<'_>,
        progress: &mut (impl FnMut(Progress) + Send),
    ) -> Result<Resolved, Failure> {
        let (source_dependency, job_source, revision, commit) = match &request.spec.source {
            Some(git) => {
                let commit = custody_source::resolve(&git.git, &git.revision)
                    .await
                    .map_err(|e| Failure::new(format!("source: {e}")))?;
                progress(Progress::Source {
                    description: format!("{} {} at {commit}", git.git, git.revision),
                });
                (
                    ResourceDescriptor {
                        name: Some(SOURCE_DEPENDENCY.to_owned()),
                        uri: Some(format!("git+{}", git.git)),
                        digest: BTreeMap::from([("gitCommit".to_owned(), commit.clone())]),
                        ..ResourceDescriptor::default()
                    },
                    proto::source::Kind::Git(proto::GitSource {
                        url: git.git.to_string(),
                        commit: commit.clone(),
                    }),
                    git.revision.clone(),
                    commit,
                )
            }
            None => {
                let dir = request.directory.as_deref().ok_or_else(|| {
                    Failure::new("the spec names no `source` and no directory was given")
                })?;
                let dir = dir.canonicalize().map_err(|e| {
                    Failure::new(format!("source directory `{}`: {e}", dir.display()))
                })?;
                let state = custody_source::local_state(&dir).await;
                let uri = format!("file://{}", dir.display());
                let (dependency, revision, commit) = match state {
                    Some(state) => {
                        progress(Progress::Source {
                            description: format!(
                                "{} at {}{}",
                                dir.display(),
                                state.commit,
                                if state.dirty {
                                    " (uncommitted changes)"
                                } else {
                                    ""
                                }
                            ),
                        });
                        let mut annotations = serde_json::Map::new();
                        if state.dirty {
                            annotations.insert("dirty".into(), true.into());
                        }
                        (
                            ResourceDescriptor {
                                name: Some(SOURCE_DEPENDENCY.to_owned()),
                                uri: Some(format!("git+{uri}")),
                                digest: BTreeMap::from([(
                                    "gitCommit".to_owned(),
                                    state.commit.clone(),
                                )]),
                                annotations: (!annotations.is_empty()).then_some(annotations),
                            },
                            state.commit.clone(),
                            state.commit,
                        )
                    }
                    None => {
                        progress(Progress::Source {
                            description: format!("{} (not a git checkout)", dir.display()),
                        });
                        (
                            ResourceDescriptor {
                                name: Some(SOURCE_DEPENDENCY.to_owned()),
                                uri: Some(uri),
                                ..ResourceDescriptor::default()
                            },
                            "local".to_owned(),
                            String::new(),
                        )
                    }
                };
                (
                    dependency,
                    proto::source::Kind::LocalDirectory(dir.display().to_string()),
                    revision,
                    commit,
                )
            }
        };

        let mut step_images = Vec::new();
        for step in &request.spec.steps {
            let Some(image) = &step.image else { continue };
            let digest = match image.digest() {
                Some(digest) => digest.clone(),
                None => {
                    let client = clients.get(image.api_host()).await.map_err(|e| {
                        Failure::new(format!("step `{}`: image `{image}`: {e}", step.name))
                    })?;
                    let (descriptor, _) = client
                        .manifest(image.repository(), &image.manifest_ref())
                        .await
                        .map_err(|e| {
                            Failure::new(format!("step `{}`: image `{image}`: {e}", step.name))
                        })?;
                    descriptor.digest().clone()
                }
            };
            let pinned = pin(image, &digest);
            progress(Progress::StepImage {
                step: step.name.clone(),
                pinned: pinned.clone(),
            });
            step_images.push(descriptor(
                Some(format!("{STEP_IMAGE_PREFIX}{}", step.name)),
                Some(pinned),
                &digest,
            ));
        }
        Ok(Resolved {
            source_dependency,
            job_source,
            revision,
            commit,
            step_images,
        })
    }

    /// The registry access the runner gets for this job: credentials and TLS
    /// material for exactly the hosts the job talks to.
    async fn registry_access(&self, hosts: &[String]) -> Result<proto::RegistryAccess, Failure> {
        let options = self.registry.clone();
        let hosts = hosts.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut access = proto::RegistryAccess {
                insecure_hosts: options.insecure_hosts.clone(),
                ..proto::RegistryAccess::default()
            };
            for host in hosts {
                let lookup = |e: custody_oci::Error| Failure::new(e.to_string());
                match options.credentials.lookup(&host).map_err(lookup)? {
                    Some(Credential::UserPassword { user, password }) => {
                        access.credentials.push(proto::RegistryCredential {
                            host: host.clone(),
                            username: user,
                            password: password.expose().to_owned(),
                            identity_token: String::new(),
                        });
                    }
                    Some(Credential::IdentityToken(token)) => {
                        access.credentials.push(proto::RegistryCredential {
                            host: host.clone(),
                            identity_token: token.expose().to_owned(),
                            ..proto::RegistryCredential::default()
                        });
                    }
                    None => {}
                }
                let tls = match options.host_tls.get(&host) {
                    Some(tls) => tls.clone(),
                    None => certs::load(&options.certs_dirs, &host).map_err(lookup)?,
                };
                if !tls.roots.is_empty() || tls.identity.is_some() {
                    access.tls.push(proto::HostTls {
                        host,
                        roots: tls.roots,
                        identity: tls.identity.unwrap_or_default(),
                    });
                }
            }
            Ok(access)
        })
        .await
        .expect("looking up registry access does not panic")
    }

    /// The executor and the step boundary as the runner reported it.
    fn internal_parameters(
        &self,
        spec: &Spec,
        isolation: Option<&proto::Isolation>,
        dropped_lines: u64,
    ) -> serde_json::Value {
        let isolation = isolation.cloned().unwrap_or_default();
        json!({
            "executor": self.executor_kind,
            "sandbox": {
                "kind": "bubblewrap",
                "user": { "uidMap": isolation.uid_map, "gidMap": isolation.gid_map },
                "network": "private",
                "egressAllow": isolation.egress_allow,
                "diskBytes": isolation.disk_bytes,
                "cgroups": isolation.cgroups,
                "logBytes": isolation.log_bytes,
                "logLinesDroppedByDaemon": dropped_lines,
                "notes": isolation.notes,
                "steps": spec.steps.iter().map(|step| json!({
                    "name": step.name,
                    "egress": step.network,
                    "timeoutSeconds": step.timeout.map(|t| t.as_secs()),
                    "memoryBytes": step.memory.unwrap_or(spec::DEFAULT_MEMORY_BYTES),
                    "pids": step.pids.unwrap_or(spec::DEFAULT_PIDS),
                })).collect::<Vec<_>>(),
            },
        })
    }
}

/// `externalParameters.source`: what the build was asked to build.
fn external_source(request: &BuildRequest) -> serde_json::Value {
    match (&request.spec.source, &request.directory) {
        (Some(git), _) => json!({ "git": git.git.as_str(), "revision": git.revision }),
        (None, Some(dir)) => json!({
            "directory": dir.canonicalize().unwrap_or_else(|_| dir.clone()).display().to_string()
        }),
        (None, None) => json!({}),
    }
}

/// A destination for this build: placeholders filled in, and a relative
/// `oci:` path taken from the spec file's directory.
fn resolve_destination(
    to: &spec::Destination,
    values: &Values<'_>,
    spec_path: &Path,
) -> Result<Location, Failure> {
    let template = to.template();
    if values.commit.is_empty()
        && (template.contains("{commit}") || template.contains("{short_commit}"))
    {
        return Err(Failure::new(format!(
            "destination `{template}` uses the commit, but the source is not a git checkout"
        )));
    }
    let location = to
        .resolve(values)
        .map_err(|e| Failure::new(format!("destination `{template}` after substitution: {e}")))?;
    Ok(match location {
        Location::Layout { path, .. } if path.is_relative() && spec_path.is_relative() => {
            return Err(Failure::new(format!(
                "destination `{template}` is a layout path relative to the spec, and a \
                 submitted build has no directory to resolve it against: push to a registry \
                 or give an absolute `oci:` path on the daemon's machine"
            )));
        }
        Location::Layout { path, tag } if path.is_relative() => Location::Layout {
            path: spec_path.parent().unwrap_or(Path::new("/")).join(path),
            tag,
        },
        other => other,
    })
}

/// Each step's image pinned by digest, in step order (`None` for the host).
fn pinned_images<'a>(
    spec: &'a Spec,
    resolved: &'a [ResourceDescriptor],
) -> impl Iterator<Item = Option<&'a str>> + 'a {
    let mut resolved = resolved.iter();
    spec.steps.iter().map(move |step| {
        step.image
            .as_ref()
            .and_then(|_| resolved.next().and_then(|d| d.uri.as_deref()))
    })
}

fn job_step(step: &spec::Step, image: Option<&str>) -> proto::Step {
    let (run, args) = match &step.command {
        spec::Command::Run(run) => (run.clone(), Vec::new()),
        spec::Command::Args(args) => (String::new(), args.clone()),
    };
    proto::Step {
        name: step.name.clone(),
        run,
        args,
        env: step.env.clone().into_iter().collect(),
        timeout_seconds: step
            .timeout
            .map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        network: step.network,
        image: image.unwrap_or_default().to_owned(),
        limits: Some(proto::Limits {
            memory_bytes: step.memory.unwrap_or(spec::DEFAULT_MEMORY_BYTES),
            pids: step.pids.unwrap_or(spec::DEFAULT_PIDS),
        }),
    }
}

/// Registry hosts the job talks to: destinations and step images.
fn registry_hosts(expected: &[Expected], step_images: &[ResourceDescriptor]) -> Vec<String> {
    let mut hosts: Vec<String> = expected
        .iter()
        .filter_map(|e| match &e.destination {
            Location::Registry(reference) => Some(reference.api_host().to_owned()),
            _ => None,
        })
        .chain(step_images.iter().filter_map(|d| {
            d.uri
                .as_deref()
                .and_then(|u| u.parse::<Reference>().ok())
                .map(|r| r.api_host().to_owned())
        }))
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

fn pin(image: &Reference, digest: &Digest) -> String {
    format!("{}/{}@{digest}", image.registry(), image.repository())
}

/// A subject's name: the repository, or the layout. `custody verify`
/// names what it verifies the same way.
pub fn subject_name(destination: &Location) -> String {
    match destination {
        Location::Registry(reference) => {
            format!("{}/{}", reference.registry(), reference.repository())
        }
        Location::Layout { path, .. } => format!("oci:{}", path.display()),
        Location::DockerArchive { path } => format!("docker-archive:{}", path.display()),
    }
}

fn descriptor(name: Option<String>, uri: Option<String>, digest: &Digest) -> ResourceDescriptor {
    ResourceDescriptor {
        name,
        uri,
        digest: BTreeMap::from([(digest.algorithm().to_string(), digest.digest().to_owned())]),
        annotations: None,
    }
}

/// A manifest as found at its destination.
struct Manifest {
    media_type: oci_spec::image::MediaType,
    bytes: Vec<u8>,
}

/// Registry clients by host, made once per build.
struct Clients<'a> {
    options: &'a RegistryOptions,
    by_host: HashMap<String, Client>,
}

impl<'a> Clients<'a> {
    fn new(options: &'a RegistryOptions) -> Self {
        Self {
            options,
            by_host: HashMap::new(),
        }
    }

    async fn get(&mut self, host: &str) -> Result<&Client, custody_oci::Error> {
        if !self.by_host.contains_key(host) {
            let client = Client::new(host, self.options).await?;
            self.by_host.insert(host.to_owned(), client);
        }
        Ok(&self.by_host[host])
    }
}

/// Fetches the manifest `digest` from where it was pushed; its bytes must
/// hash to the digest, and the destination's tag (if any) must name it.
async fn check_output(
    clients: &mut Clients<'_>,
    expected: &Expected,
    digest: &Digest,
    size: u64,
) -> Result<Manifest, String> {
    match &expected.destination {
        Location::Registry(reference) => {
            let client = clients
                .get(reference.api_host())
                .await
                .map_err(|e| e.to_string())?;
            let (descriptor, bytes) = client
                .manifest(reference.repository(), digest.as_ref())
                .await
                .map_err(|e| e.to_string())?;
            Ok(Manifest {
                media_type: descriptor.media_type().clone(),
                bytes: bytes.to_vec(),
            })
        }
        Location::Layout { path, .. } => {
            let (path, digest) = (path.clone(), digest.clone());
            tokio::task::spawn_blocking(move || -> Result<Manifest, String> {
                let layout = Layout::open(&path).map_err(|e| e.to_string())?;
                // Any media type: the bytes are checked against digest and size.
                let blob = oci_spec::image::Descriptor::new(
                    oci_spec::image::MediaType::ImageManifest,
                    size,
                    digest,
                );
                let bytes = layout.read_small_blob(&blob).map_err(|e| e.to_string())?;
                let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|m| {
                        m["mediaType"]
                            .as_str()
                            .map(oci_spec::image::MediaType::from)
                    })
                    .unwrap_or(oci_spec::image::MediaType::ImageManifest);
                Ok(Manifest { media_type, bytes })
            })
            .await
            .expect("reading a layout does not panic")
        }
        Location::DockerArchive { .. } => Err("a docker archive is not a destination".into()),
    }
}

/// Whether `destination` would take a push now: a registry grants push
/// access (an upload started and cancelled), a layout path is one custody
/// may write (a layout or nothing yet, no symlink on the way).
async fn preflight(
    clients: &mut Clients<'_>,
    destination: &Location,
) -> Result<(), custody_oci::Error> {
    match destination {
        Location::Registry(reference) => {
            let client = clients.get(reference.api_host()).await?;
            client.check_push(reference.repository()).await
        }
        Location::Layout { path, .. } => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Layout::for_writing(path).map(|_| ()))
                .await
                .expect("checking a layout does not panic")
        }
        Location::DockerArchive { .. } => Ok(()),
    }
}

/// Writes the destination's tag for the manifest `subject` (`bytes`), and
/// checks that it names it: a registry gets the manifest again under the
/// tag, a layout lists it in `index.json`.
async fn tag(
    clients: &mut Clients<'_>,
    destination: &Location,
    subject: &oci_spec::image::Descriptor,
    bytes: &[u8],
) -> Result<(), String> {
    match destination {
        Location::Registry(reference) => {
            let Some(tag) = reference.tag() else {
                return Ok(()); // pushed by digest, and that is all it asked for
            };
            let client = clients
                .get(reference.api_host())
                .await
                .map_err(|e| e.to_string())?;
            client
                .put_manifest(
                    reference.repository(),
                    tag,
                    subject,
                    &bytes::Bytes::copy_from_slice(bytes),
                )
                .await
                .map_err(|e| e.to_string())?;
            let (tagged, _) = client
                .manifest(reference.repository(), tag)
                .await
                .map_err(|e| e.to_string())?;
            if tagged.digest() != subject.digest() {
                return Err(format!(
                    "the tag `{tag}` names `{}`, not the pushed manifest",
                    tagged.digest()
                ));
            }
            Ok(())
        }
        Location::Layout { path, tag } => {
            let (path, tag, subject) = (path.clone(), tag.clone(), subject.clone());
            tokio::task::spawn_blocking(move || {
                Layout::open(&path)?.add_manifest(&subject, tag.as_deref())
            })
            .await
            .expect("writing a layout does not panic")
            .map_err(|e| e.to_string())
        }
        Location::DockerArchive { .. } => Err("a docker archive is not a destination".into()),
    }
}

/// The files of an artifact: each layer named by its title.
fn artifact_files(manifest: &Manifest) -> Result<Vec<ResourceDescriptor>, String> {
    let parsed: ImageManifest =
        serde_json::from_slice(&manifest.bytes).map_err(|e| format!("not a manifest: {e}"))?;
    parsed
        .layers()
        .iter()
        .map(|layer| {
            let title = layer
                .annotations()
                .as_ref()
                .and_then(|a| a.get(TITLE_ANNOTATION))
                .ok_or_else(|| format!("layer `{}` has no title", layer.digest()))?;
            Ok(ResourceDescriptor {
                annotations: Some(SubjectKind::File.annotations()),
                ..descriptor(Some(title.clone()), None, layer.digest())
            })
        })
        .collect()
}

async fn attach_to(
    clients: &mut Clients<'_>,
    destination: &Location,
    subject: &oci_spec::image::Descriptor,
    envelope: &[u8],
) -> Result<(), String> {
    match destination {
        Location::Registry(reference) => {
            let client = clients
                .get(reference.api_host())
                .await
                .map_err(|e| e.to_string())?;
            attach::attach_to_registry(
                client,
                reference.repository(),
                subject,
                envelope,
                SLSA_PROVENANCE_V1,
            )
            .await
            .map_err(|e| e.to_string())
        }
        Location::Layout { path, .. } => {
            let (path, subject, envelope) = (path.clone(), subject.clone(), envelope.to_vec());
            tokio::task::spawn_blocking(move || {
                let layout = Layout::open(&path)?;
                attach::attach_to_layout(&layout, &subject, &envelope, SLSA_PROVENANCE_V1)
            })
            .await
            .expect("writing to a layout does not panic")
            .map_err(|e| e.to_string())
        }
        Location::DockerArchive { .. } => Err("a docker archive is not a destination".into()),
    }
}

/// `sha256:<hex>` of a file (blocking).
pub fn file_digest(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        match file.read(&mut buffer)? {
            0 => break,
            n => hasher.update(&buffer[..n]),
        }
    }
    Ok(format!("sha256:{}", hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Log lines on their way to the store: one task appends them in order, a
/// batch at a time (every [`LOG_BATCH_INTERVAL`] or [`LOG_BATCH_LINES`]
/// lines), so a crash loses at most one batch and lines never reorder.
struct LogWriter {
    lines: tokio::sync::mpsc::UnboundedSender<store::LogLine>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

pub const LOG_BATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
const LOG_BATCH_LINES: usize = 1000;

impl LogWriter {
    fn start(store: Store, id: String) -> Self {
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

    fn send(&self, line: store::LogLine) {
        // The task only stops early when the store failed; `finish` says so.
        let _ = self.lines.send(line);
    }

    /// Writes what is left and reports whether every batch was stored.
    async fn finish(self) -> Result<(), StoreError> {
        drop(self.lines);
        self.task.await.expect("the log writer does not panic")
    }
}
