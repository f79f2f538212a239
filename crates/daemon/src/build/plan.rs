//! Stage one: everything the provenance will claim, resolved before any
//! runner exists — the source to a commit, each step image tag to a digest,
//! each destination for this build (and checked able to take a push) — and
//! the job the runner gets: its steps, its outputs, the registry access it
//! needs for this job only, the paths and bounds of the step boundary.

use std::collections::HashMap;
use std::path::Path;

use custody_attest::statement::ResourceDescriptor;
use custody_oci::digest::Digest;
use custody_oci::layout::Layout;
use custody_oci::registry::{Client, Credential, RegistryOptions, certs};
use custody_oci::{Location, Reference};
use custody_provenance::build_type;
use custody_wire::rpc::proto;

use crate::record::BuildId;

use super::{BuildError, BuildRequest, BuildService, Progress, SpecInput};
use crate::source::BuildSource;
use crate::spec::{self, Spec, Values};

/// Specs read from a source larger than this are refused.
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// What a build will do and claim, fixed before it runs.
pub(crate) struct Plan {
    /// The spec that runs.
    pub spec: LoadedSpec,
    /// What the runner is handed.
    pub job: proto::Job,
    /// The source as a resolved dependency.
    pub source: ResourceDescriptor,
    pub step_images: Vec<ResourceDescriptor>,
    /// Where each output goes, in the order the runner reports them.
    pub outputs: Vec<Expected>,
    /// Each `pushes` repository and where what steps push to it goes.
    pub pushes: Vec<PlannedPush>,
    /// Each `pulls` repository and the registry repository it reads.
    pub pulls: Vec<PlannedPull>,
}

/// A `pulls` repository: steps read `from` through the gateway.
pub(crate) struct PlannedPull {
    pub name: String,
    /// `host[:port]/path`, without tag or digest.
    pub from: Reference,
}

/// A `pushes` repository, its destination resolved and checked.
pub(crate) struct PlannedPush {
    pub name: String,
    /// `host[:port]/path`, without tag or digest.
    pub destination: Reference,
}

/// What the runner's gateway takes pushes to and reads pulls from.
#[derive(Clone, Copy)]
struct GatewayRepositories<'a> {
    pushes: &'a [PlannedPush],
    pulls: &'a [PlannedPull],
}

/// The spec a build runs, read once.
pub(crate) struct LoadedSpec {
    pub bytes: Vec<u8>,
    pub spec: Spec,
    /// It did not come from the source at the commit built.
    pub inline: bool,
}

/// What a spec destination is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Artifact,
    Push,
}

/// A pushed output as the daemon expects it.
pub(crate) struct Expected {
    pub destination: Location,
    pub artifact: bool,
}

/// Registry clients by host, made once per build: resolving step images,
/// checking outputs, attaching and tagging share TLS setup and tokens.
pub(crate) struct Clients<'a> {
    options: &'a RegistryOptions,
    by_host: HashMap<String, Client>,
}

impl<'a> Clients<'a> {
    pub fn new(options: &'a RegistryOptions) -> Self {
        Self {
            options,
            by_host: HashMap::new(),
        }
    }

    pub async fn get(&mut self, host: &str) -> Result<&Client, custody_oci::Error> {
        if !self.by_host.contains_key(host) {
            let client = Client::new(host, self.options).await?;
            self.by_host.insert(host.to_owned(), client);
        }
        Ok(&self.by_host[host])
    }
}

/// The source, resolved.
struct Source {
    dependency: ResourceDescriptor,
    job: proto::source::Kind,
    revision: String,
    commit: String,
    /// The address a git source was checked at and is fetched from.
    pinned: Option<std::net::SocketAddr>,
}

impl BuildService {
    /// Plans build `id` of `request`.
    pub(crate) async fn plan(
        &self,
        id: &BuildId,
        request: &BuildRequest,
        clients: &mut Clients<'_>,
        progress: &mut (impl FnMut(Progress) + Send),
    ) -> Result<Plan, BuildError> {
        let source = self.resolve_source(request, progress).await?;
        if !source.commit.is_empty() {
            self.store.record_commit(id, &source.commit).await?;
        }
        let spec = self.load_spec(request, &source).await?;
        // Before anything else is asked of the network: a spec naming a
        // secret its source may not have fails here, naming the line.
        let url = match &request.source {
            BuildSource::Git(git) => Some(&git.git),
            BuildSource::Directory(_) => None,
        };
        self.secrets
            .check(&spec.spec, url, spec.inline)
            .map_err(|refusal| BuildError::SecretRefused {
                spec: request.spec_path.clone(),
                refusal,
            })?;
        let step_images = resolve_step_images(&spec.spec, clients, progress).await?;
        let planned_steps: Vec<_> = spec
            .spec
            .steps
            .iter()
            .zip(pinned_images(&spec.spec, &step_images))
            .map(|(step, pinned)| {
                let digest = pinned
                    .and_then(|p| p.rsplit_once('@'))
                    .and_then(|(_, digest)| custody_oci::digest::parse(digest).ok());
                (step.name.clone(), digest)
            })
            .collect();
        self.store.record_steps(id, &planned_steps).await?;
        let values = Values {
            revision: &source.revision,
            commit: &source.commit,
            job: id.as_str(),
        };
        let declared = spec
            .spec
            .images
            .iter()
            .map(|i| (&i.to, Kind::Image))
            .chain(spec.spec.artifacts.iter().map(|a| (&a.to, Kind::Artifact)))
            .chain(spec.spec.pushes.iter().map(|p| (&p.to, Kind::Push)));
        let mut outputs = Vec::new();
        let mut pushes = Vec::new();
        for (to, kind) in declared {
            let destination = resolve_destination(to, &values, &request.spec_path)?;
            if let Some(policy) = &self.policy {
                policy.destinations.check(&destination).map_err(|reason| {
                    BuildError::DestinationRefused {
                        spec: request.spec_path.clone(),
                        line: to.line,
                        column: to.column,
                        reason,
                    }
                })?;
            }
            // Every destination must be able to take its output before any
            // step runs: a typo in a host should cost seconds, not a build.
            preflight(clients, &destination)
                .await
                .map_err(|source| BuildError::Destination {
                    spec: request.spec_path.clone(),
                    line: to.line,
                    column: to.column,
                    destination: destination.to_string(),
                    source: Box::new(source),
                })?;
            match (kind, destination) {
                (Kind::Push, Location::Registry(reference)) => pushes.push(reference),
                (Kind::Push, other) => {
                    unreachable!("the spec allows pushes only to registries, not `{other}`")
                }
                (kind, destination) => outputs.push(Expected {
                    destination,
                    artifact: kind == Kind::Artifact,
                }),
            }
        }
        let pushes: Vec<PlannedPush> = spec
            .spec
            .pushes
            .iter()
            .zip(pushes)
            .map(|(push, destination)| PlannedPush {
                name: push.name.to_string(),
                destination,
            })
            .collect();
        // Pulls are reads with the platform's credentials for their host,
        // like step images: no destination policy, no push check.
        let pulls: Vec<PlannedPull> = spec
            .spec
            .pulls
            .iter()
            .map(|pull| PlannedPull {
                name: pull.name.to_string(),
                from: pull.from.clone(),
            })
            .collect();
        let workdir = match &request.source {
            BuildSource::Git(git) => git.path.as_str(),
            BuildSource::Directory(_) => "",
        };
        let job = self
            .job(
                id,
                &spec.spec,
                (&source.job, workdir),
                &step_images,
                &outputs,
                GatewayRepositories {
                    pushes: &pushes,
                    pulls: &pulls,
                },
            )
            .await?;
        Ok(Plan {
            spec,
            job,
            source: source.dependency,
            step_images,
            outputs,
            pushes,
            pulls,
        })
    }

    /// The job as the runner gets it.
    async fn job(
        &self,
        id: &BuildId,
        spec: &Spec,
        (source, workdir): (&proto::source::Kind, &str),
        step_images: &[ResourceDescriptor],
        outputs: &[Expected],
        gateway: GatewayRepositories<'_>,
    ) -> Result<proto::Job, BuildError> {
        let GatewayRepositories { pushes, pulls } = gateway;
        let (images, artifacts) = outputs.split_at(spec.images.len());
        let hosts = registry_hosts(outputs, pushes, pulls, step_images);
        Ok(proto::Job {
            job_id: id.to_string(),
            steps: spec
                .steps
                .iter()
                .zip(pinned_images(spec, step_images))
                .map(|(step, image)| {
                    let mut job_step = job_step(step, image);
                    job_step.secrets = self.step_secrets(step)?;
                    Ok(job_step)
                })
                .collect::<Result<_, BuildError>>()?,
            registries: Some(self.registry_access(&hosts).await?),
            images: spec
                .images
                .iter()
                .zip(images)
                .map(|(image, expected)| proto::ImageOutput {
                    from: image.from.to_string(),
                    to: expected.destination.to_string(),
                })
                .collect(),
            artifacts: spec
                .artifacts
                .iter()
                .zip(artifacts)
                .map(|(artifact, expected)| proto::ArtifactOutput {
                    paths: artifact.paths.clone(),
                    to: expected.destination.to_string(),
                })
                .collect(),
            source: Some(proto::Source {
                kind: Some(source.clone()),
            }),
            workdir: workdir.to_owned(),
            hidden_paths: self
                .hidden_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            bounds: Some(self.bounds.for_job(spec)),
            pushes: pushes
                .iter()
                .map(|push| proto::GatewayPush {
                    name: push.name.clone(),
                    to: push.destination.to_string(),
                })
                .collect(),
            pulls: pulls
                .iter()
                .map(|pull| proto::GatewayPull {
                    name: pull.name.clone(),
                    from: pull.from.to_string(),
                })
                .collect(),
        })
    }

    /// The values of the secrets `step` asked for, read now: the runner
    /// gets them for this step only. They leave their redacting type here,
    /// onto the wire.
    fn step_secrets(&self, step: &spec::Step) -> Result<Vec<proto::StepSecret>, BuildError> {
        let mut given: Vec<proto::StepSecret> = Vec::new();
        for used in step.secrets.iter().chain(step.secret_env.values()) {
            let file = step.secrets.iter().any(|s| s.name == used.name);
            let env: Vec<String> = step
                .secret_env
                .iter()
                .filter(|(_, s)| s.name == used.name)
                .map(|(var, _)| var.clone())
                .collect();
            if given.iter().any(|g| g.name == used.name) {
                continue;
            }
            let value = self
                .secrets
                .read(used)
                .map_err(|reason| BuildError::SecretUnreadable {
                    name: used.name.clone(),
                    reason,
                })?;
            if !env.is_empty() && value.expose().contains(&0) {
                return Err(BuildError::SecretUnreadable {
                    name: used.name.clone(),
                    reason: "it holds a NUL byte, which an environment variable cannot".into(),
                });
            }
            given.push(proto::StepSecret {
                name: used.name.clone(),
                value: value.expose().to_vec(),
                file,
                env,
            });
        }
        Ok(given)
    }

    /// The registry access the runner gets for this job: credentials and TLS
    /// material for exactly the hosts the job talks to. Credentials stay in
    /// their redacting type until they are put on the wire here.
    async fn registry_access(&self, hosts: &[String]) -> Result<proto::RegistryAccess, BuildError> {
        let options = self.registry.clone();
        let hosts = hosts.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut access = proto::RegistryAccess {
                insecure_hosts: options.insecure_hosts.clone(),
                ..proto::RegistryAccess::default()
            };
            for host in hosts {
                match options.credentials.lookup(&host)? {
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
                    None => certs::load(&options.certs_dirs, &host)?,
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
        .map_err(|e| BuildError::RegistryAccess(Box::new(e)))
    }
}

impl BuildService {
    /// The git source resolved to a commit (within the service's source
    /// policy), or a local directory's state.
    async fn resolve_source(
        &self,
        request: &BuildRequest,
        progress: &mut (impl FnMut(Progress) + Send),
    ) -> Result<Source, BuildError> {
        match &request.source {
            BuildSource::Git(git) => self.resolve_git(git, progress).await,
            BuildSource::Directory(dir) => resolve_directory(dir, progress).await,
        }
    }

    async fn resolve_git(
        &self,
        git: &spec::GitSource,
        progress: &mut (impl FnMut(Progress) + Send),
    ) -> Result<Source, BuildError> {
        let pinned = match &self.policy {
            Some(policy) => policy.sources.resolve(&git.git).await.map_err(|reason| {
                BuildError::SourceRefused {
                    url: git.git.to_string(),
                    reason,
                }
            })?,
            None => None,
        };
        let remote = custody_source::Remote::new(&git.git).pinned(pinned);
        let commit = custody_source::resolve(&remote, &git.revision)
            .await
            .map_err(|e| self.source_error(e))?;
        progress(Progress::Source {
            description: format!("{} {} at {commit}", git.git, git.revision),
        });
        Ok(Source {
            dependency: build_type::git_source(git.git.as_str(), &commit),
            job: proto::source::Kind::Git(proto::GitSource {
                url: git.git.to_string(),
                commit: commit.clone(),
                pinned: pinned.map(|a| a.to_string()).unwrap_or_default(),
            }),
            revision: git.revision.clone(),
            commit,
            pinned,
        })
    }

    /// A fetch failure as a submitter may see it: a service keeps the
    /// detail (refused, reset, which banner) for its own log.
    fn source_error(&self, error: custody_source::SourceError) -> BuildError {
        if self.policy.is_some() {
            tracing::warn!("fetching a build's source failed: {error}");
            BuildError::SourceUnavailable
        } else {
            BuildError::Source(error)
        }
    }

    /// The spec that came with the request, or the one at `spec_path` in
    /// the source at the resolved commit.
    async fn load_spec(
        &self,
        request: &BuildRequest,
        source: &Source,
    ) -> Result<LoadedSpec, BuildError> {
        match &request.spec {
            SpecInput::Given {
                bytes,
                spec,
                inline,
            } => Ok(LoadedSpec {
                bytes: bytes.clone(),
                spec: (**spec).clone(),
                inline: *inline,
            }),
            SpecInput::InSource => {
                let BuildSource::Git(git) = &request.source else {
                    let path = match &request.source {
                        BuildSource::Directory(dir) => dir.join(&request.spec_path),
                        BuildSource::Git(_) => unreachable!("matched above"),
                    };
                    let bytes = fs_err::read(&path).map_err(|e| {
                        BuildError::SpecUnreadable(custody_source::SourceError::Copy {
                            path: path.clone(),
                            detail: e.to_string(),
                        })
                    })?;
                    let spec = super::parse_spec(&request.spec_path, &bytes)?;
                    return Ok(LoadedSpec {
                        bytes,
                        spec,
                        inline: false,
                    });
                };
                let remote = custody_source::Remote::new(&git.git).pinned(source.pinned);
                let path = request.spec_path.to_string_lossy();
                let bytes =
                    custody_source::read_file(&remote, &source.commit, &path, MAX_SPEC_BYTES)
                        .await
                        .map_err(|e| match e {
                            custody_source::SourceError::File { .. } => {
                                BuildError::SpecUnreadable(e)
                            }
                            other => self.source_error(other),
                        })?;
                let spec = super::parse_spec(&request.spec_path, &bytes)?;
                Ok(LoadedSpec {
                    bytes,
                    spec,
                    inline: false,
                })
            }
        }
    }
}

/// A local directory's git state.
async fn resolve_directory(
    dir: &Path,
    progress: &mut (impl FnMut(Progress) + Send),
) -> Result<Source, BuildError> {
    let dir = dir
        .canonicalize()
        .map_err(|source| BuildError::SourceDirectory {
            path: dir.to_owned(),
            source,
        })?;
    let state = custody_source::local_state(&dir).await;

    let uri = format!("file://{}", dir.display());
    let job = proto::source::Kind::LocalDirectory(dir.display().to_string());
    Ok(match state {
        Some(state) => {
            let dirty = if state.dirty {
                " (uncommitted changes)"
            } else {
                ""
            };
            progress(Progress::Source {
                description: format!("{} at {}{dirty}", dir.display(), state.commit),
            });
            Source {
                dependency: build_type::local_source(&uri, Some((&state.commit, state.dirty))),
                job,
                revision: state.commit.clone(),
                commit: state.commit,
                pinned: None,
            }
        }
        None => {
            progress(Progress::Source {
                description: format!("{} (not a git checkout)", dir.display()),
            });
            Source {
                dependency: build_type::local_source(&uri, None),
                job,
                revision: "local".to_owned(),
                commit: String::new(),
                pinned: None,
            }
        }
    })
}

/// Each step image pinned to the digest its tag names now.
async fn resolve_step_images(
    spec: &Spec,
    clients: &mut Clients<'_>,
    progress: &mut (impl FnMut(Progress) + Send),
) -> Result<Vec<ResourceDescriptor>, BuildError> {
    let mut step_images = Vec::new();
    for step in &spec.steps {
        let Some(image) = &step.image else { continue };
        let failed = |source| BuildError::StepImage {
            step: step.name.clone(),
            image: image.to_string(),
            source: Box::new(source),
        };
        let digest = match image.digest() {
            Some(digest) => digest.clone(),
            None => {
                let client = clients.get(image.api_host()).await.map_err(failed)?;
                let (descriptor, _) = client
                    .manifest(image.repository(), &image.manifest_ref())
                    .await
                    .map_err(failed)?;
                descriptor.digest().clone()
            }
        };
        let pinned = pin(image, &digest);
        progress(Progress::StepImage {
            step: step.name.clone(),
            pinned: pinned.clone(),
        });
        step_images.push(build_type::step_image(&step.name, &pinned, &digest));
    }
    Ok(step_images)
}

/// A destination for this build: placeholders filled in, and a relative
/// `oci:` path taken from the spec file's directory.
fn resolve_destination(
    to: &spec::Destination,
    values: &Values<'_>,
    spec_path: &Path,
) -> Result<Location, BuildError> {
    let template = to.template();
    let refused = |reason: String| BuildError::DestinationTemplate {
        template: template.to_owned(),
        reason,
    };
    if values.commit.is_empty()
        && (template.contains("{commit}") || template.contains("{short_commit}"))
    {
        return Err(refused(
            "it uses the commit, but the source is not a git checkout".into(),
        ));
    }
    let location = to
        .resolve(values)
        .map_err(|e| refused(format!("after substitution: {e}")))?;
    Ok(match location {
        Location::Layout { path, .. } if path.is_relative() && spec_path.is_relative() => {
            return Err(refused(
                "it is a layout path relative to the spec, and a submitted build has no \
                 directory to resolve it against: push to a registry or give an absolute \
                 `oci:` path on the daemon's machine"
                    .into(),
            ));
        }
        Location::Layout { path, tag } if path.is_relative() => Location::Layout {
            path: spec_path.parent().unwrap_or(Path::new("/")).join(path),
            tag,
        },
        other => other,
    })
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

/// Each step's image pinned by digest, in step order (`None` for the host).
fn pinned_images<'a>(
    spec: &'a spec::Spec,
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
        hosts: step.hosts.iter().map(ToString::to_string).collect(),
        image: image.unwrap_or_default().to_owned(),
        limits: Some(proto::Limits {
            memory_bytes: step.memory.unwrap_or(spec::DEFAULT_MEMORY_BYTES),
            pids: step.pids.unwrap_or(spec::DEFAULT_PIDS),
        }),
        secrets: Vec::new(),
        user_namespaces: step.user_namespaces,
    }
}

/// Registry hosts the job talks to: destinations, pulls and step images.
fn registry_hosts(
    outputs: &[Expected],
    pushes: &[PlannedPush],
    pulls: &[PlannedPull],
    step_images: &[ResourceDescriptor],
) -> Vec<String> {
    let mut hosts: Vec<String> = outputs
        .iter()
        .filter_map(|e| match &e.destination {
            Location::Registry(reference) => Some(reference.api_host().to_owned()),
            _ => None,
        })
        .chain(pushes.iter().map(|p| p.destination.api_host().to_owned()))
        .chain(pulls.iter().map(|p| p.from.api_host().to_owned()))
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
