//! After the last step: read the declared outputs (runner code, not step
//! code), push them, and report each pushed descriptor to the daemon.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custody_oci::Location;
use custody_oci::copy::{self, CopyOptions, Destination, Source};
use custody_oci::layout::Layout;
use custody_oci::registry::certs::HostTls;
use custody_oci::registry::{Credential, CredentialSource, RegistryOptions, Secret};
use custody_wire::events::{GatewayPushed, Pulled, Pushed, RunnerEvent};
use custody_wire::rpc::proto;

use crate::EventSink;
use crate::outputs;
use crate::steps::Boundary;

/// How the runner reaches registries: exactly what the daemon sent for this
/// job, nothing of this machine's own certs.d or credential files.
pub(crate) fn registry_options(job: &proto::Job) -> RegistryOptions {
    let access = job.registries.clone().unwrap_or_default();
    let credentials = access
        .credentials
        .into_iter()
        // The daemon names hosts as references do; one it could not have
        // named gets nothing.
        .filter_map(|c| {
            let host = c.host.parse::<custody_oci::RegistryHost>().ok()?;
            let credential = if c.identity_token.is_empty() {
                Credential::UserPassword {
                    user: c.username,
                    password: Secret::new(c.password),
                }
            } else {
                Credential::IdentityToken(Secret::new(c.identity_token))
            };
            Some((host, credential))
        })
        .collect();
    let host_tls = access
        .tls
        .into_iter()
        .map(|t| {
            let tls = HostTls {
                dir: None,
                roots: t.roots,
                identity: (!t.identity.is_empty()).then_some(t.identity),
            };
            (t.host, tls)
        })
        .collect();
    RegistryOptions {
        certs_dirs: Vec::new(),
        host_tls,
        insecure_hosts: access.insecure_hosts,
        credentials: CredentialSource::PerHost(credentials),
        ..RegistryOptions::default()
    }
}

/// An output ready to push: its source opened, its destination parsed.
struct Ready {
    /// What to say in errors: the output as the spec declared it.
    what: String,
    source: Source,
    to: Location,
    /// Set for what a step pushed through the gateway.
    gateway: Option<GatewayPushed>,
}

/// Pushes every declared output by digest only: the daemon writes the tags
/// once every output was pushed and checked, the provenance signed and
/// attached, so a failed build moves no tag. Every output is read and
/// checked before anything is pushed; the first failure stops it, with a
/// reason naming the output.
pub(crate) async fn push_outputs(
    job: &proto::Job,
    boundary: &Boundary,
    events: &EventSink,
) -> Result<(), String> {
    let options = registry_options(job);
    let mut ready = Vec::new();
    for image in &job.images {
        let from: Location = image
            .from
            .parse()
            .map_err(|e: custody_oci::Error| e.to_string())?;
        // The step saw `/output/…`; the runner opens it inside its own copy.
        let output = boundary.jobdir.output.clone();
        let source = tokio::task::spawn_blocking(move || outputs::open_image(&output, &from))
            .await
            .expect("opening an output does not panic")
            .map_err(|e| e.to_string())?;
        ready.push(Ready {
            what: format!("`{}`", image.from),
            source,
            to: parse(&image.to)?,
            gateway: None,
        });
    }
    for (index, artifact) in job.artifacts.iter().enumerate() {
        ready.push(Ready {
            what: format!("artifact {:?}", artifact.paths),
            source: stage_artifact(boundary, index, &artifact.paths).await?,
            to: parse(&artifact.to)?,
            gateway: None,
        });
    }
    if let Some(gateway) = &boundary.gateway {
        // What steps read, for the provenance's resolved dependencies.
        for pulled in gateway.pulled() {
            events
                .send(RunnerEvent::Pulled(Pulled {
                    pull: pulled.repository.to_string(),
                    digest: pulled.digest.to_string(),
                }))
                .await;
        }
        ready.extend(pushed_by_steps(gateway).await?);
        // Every step succeeded and everything is read: the blobs steps
        // streamed through the gateway may now exist at the destinations,
        // and the copy below finds them there.
        gateway.complete_onward().await;
    }
    for output in ready {
        let progress = Arc::new(Progress::new(events.clone(), output.to.to_string()));
        let report = copy_to(&output.source, &output.to, &options, progress.clone())
            .await
            .map_err(|e| format!("pushing {} to `{}`: {e}", output.what, output.to))?;
        progress.report();
        send_output(events, report, output.gateway).await;
    }
    Ok(())
}

/// How often a push says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// One output's push as the daemon hears of it: bytes of blobs sent of
/// those that must be, every [`PROGRESS_EVERY`] and once at the end.
struct Progress {
    events: EventSink,
    destination: String,
    /// When it last said, bytes sent, bytes to send.
    state: Mutex<(Instant, u64, u64)>,
}

impl Progress {
    fn new(events: EventSink, destination: String) -> Self {
        Self {
            events,
            destination,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    fn report(&self) {
        let (_, bytes, total) = *self.state.lock().expect("not poisoned");
        self.events.offer(RunnerEvent::Pushing {
            destination: self.destination.clone(),
            bytes,
            total,
        });
    }
}

impl copy::Progress for Progress {
    fn blob_started(&self, descriptor: &custody_oci::oci_spec::image::Descriptor) {
        self.state.lock().expect("not poisoned").2 += descriptor.size();
    }

    fn blob_bytes(&self, _digest: &custody_oci::Digest, bytes: u64) {
        let due = {
            let mut state = self.state.lock().expect("not poisoned");
            state.1 += bytes;
            let due = state.0.elapsed() >= PROGRESS_EVERY;
            if due {
                state.0 = Instant::now();
            }
            due
        };
        if due {
            self.report();
        }
    }
}

/// What steps pushed through the gateway, each manifest from the
/// gateway's layout to its `pushes` destination, by digest like any other
/// output: the daemon writes the step's tag once everything is checked
/// and attached. A declared repository no step pushed to fails the build.
async fn pushed_by_steps(gateway: &crate::gateway::BuildGateway) -> Result<Vec<Ready>, String> {
    let (pushed, onward) = gateway.onward()?;
    let layout = {
        let root = pushed.layout.clone();
        tokio::task::spawn_blocking(move || Layout::open(root))
            .await
            .expect("opening a layout does not panic")
            .map_err(|e| format!("reading what steps pushed: {e}"))?
    };
    onward
        .into_iter()
        .map(|o| {
            let what = match &o.tag {
                Some(tag) => format!("`$CUSTODY_REGISTRY/{}:{tag}`", o.repository),
                None => format!(
                    "`$CUSTODY_REGISTRY/{}@{}`",
                    o.repository,
                    o.manifest.digest()
                ),
            };
            Ok(Ready {
                what,
                source: Source::LayoutManifest {
                    layout: layout.clone(),
                    manifest: Box::new(o.manifest),
                },
                to: parse(&o.to)?,
                gateway: Some(GatewayPushed {
                    push: o.repository.to_string(),
                    tag: o.tag.map(|t| t.to_string()),
                    step: o.step,
                }),
            })
        })
        .collect()
}

/// Writes the workspace files `globs` match as one artifact, in a layout
/// only the runner can reach.
async fn stage_artifact(
    boundary: &Boundary,
    index: usize,
    globs: &[String],
) -> Result<Source, String> {
    let staging = boundary.jobdir.private.join(format!("artifact-{index}"));
    let (workspace, globs) = (boundary.jobdir.workspace.clone(), globs.to_vec());
    let workdir = boundary.sandbox.workdir.clone();
    let layout = tokio::task::spawn_blocking(move || -> Result<Layout, outputs::OutputError> {
        let files = outputs::collect_files(&workspace, &workdir, &globs)?;
        let layout = Layout::for_writing(&staging)?;
        layout.create_if_missing()?;
        outputs::write_artifact(&workspace, &files, &layout, "artifact")?;
        Ok(layout)
    })
    .await
    .expect("writing an artifact does not panic")
    .map_err(|e| e.to_string())?;
    Ok(Source::Layout {
        layout,
        tag: Some("artifact".into()),
    })
}

fn parse(location: &str) -> Result<Location, String> {
    location
        .parse()
        .map_err(|e: custody_oci::Error| e.to_string())
}

async fn copy_to(
    source: &Source,
    to: &Location,
    options: &RegistryOptions,
    progress: Arc<dyn copy::Progress>,
) -> Result<copy::CopyReport, custody_oci::Error> {
    let destination = Destination::open_untagged(to, options).await?;
    copy::copy(
        source,
        &destination,
        &CopyOptions {
            progress,
            ..CopyOptions::default()
        },
    )
    .await
}

async fn send_output(events: &EventSink, report: copy::CopyReport, gateway: Option<GatewayPushed>) {
    events
        .send(RunnerEvent::Pushed(Pushed {
            reference: report.pinned,
            digest: report.descriptor.digest().to_string(),
            size: report.descriptor.size(),
            bytes_sent: report.bytes_copied,
            gateway,
        }))
        .await;
}
