//! After the last step: read the declared outputs (runner code, not step
//! code), push them, and report each pushed descriptor to the daemon.

use std::sync::Arc;

use custody_oci::Location;
use custody_oci::copy::{self, CopyOptions, Destination, Source};
use custody_oci::layout::Layout;
use custody_oci::registry::certs::HostTls;
use custody_oci::registry::{Credential, CredentialSource, RegistryOptions, Secret};
use custody_wire::rpc::proto::{self, Event, event::Kind};
use tokio::sync::mpsc;
use tonic::Status;

use crate::event;
use crate::outputs;
use crate::sandbox::Sandbox;

/// How the runner reaches registries: exactly what the daemon sent for this
/// job, nothing of this machine's own certs.d or credential files.
pub(crate) fn registry_options(job: &proto::Job) -> RegistryOptions {
    let access = job.registries.clone().unwrap_or_default();
    let credentials = access
        .credentials
        .into_iter()
        .map(|c| {
            let credential = if c.identity_token.is_empty() {
                Credential::UserPassword {
                    user: c.username,
                    password: Secret::new(c.password),
                }
            } else {
                Credential::IdentityToken(Secret::new(c.identity_token))
            };
            (c.host, credential)
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

/// Pushes every declared output; the first failure stops it, with a reason
/// naming the output.
pub(crate) async fn push_outputs(
    job: &proto::Job,
    sandbox: &Sandbox,
    events: &mpsc::Sender<Result<Event, Status>>,
) -> Result<(), String> {
    let options = registry_options(job);
    for image in &job.images {
        let from: Location = image
            .from
            .parse()
            .map_err(|e: custody_oci::Error| e.to_string())?;
        // The step saw `/output/…`; the runner finds it in its own directory.
        let from = match from {
            Location::Layout { path, tag } => Location::Layout {
                path: outputs::output_path(&sandbox.output, &path).map_err(|e| e.to_string())?,
                tag,
            },
            Location::DockerArchive { path } => Location::DockerArchive {
                path: outputs::output_path(&sandbox.output, &path).map_err(|e| e.to_string())?,
            },
            Location::Registry(_) => {
                return Err(format!("`{}` is not an output under /output", image.from));
            }
        };
        let to: Location = image
            .to
            .parse()
            .map_err(|e: custody_oci::Error| e.to_string())?;
        let report = copy_to(&from, &to, &options)
            .await
            .map_err(|e| format!("pushing `{}` to `{}`: {e}", image.from, image.to))?;
        send_output(events, report).await;
    }
    for (index, artifact) in job.artifacts.iter().enumerate() {
        let files = outputs::collect_files(&sandbox.workspace, &artifact.paths)
            .map_err(|e| e.to_string())?;
        let staging = sandbox
            .workspace
            .with_file_name(format!("artifact-{index}"));
        let layout = {
            let staging = staging.clone();
            tokio::task::spawn_blocking(move || -> Result<Layout, outputs::OutputError> {
                let layout = Layout::for_writing(&staging)?;
                layout.create_if_missing()?;
                outputs::write_artifact(&files, &layout, "artifact")?;
                Ok(layout)
            })
            .await
            .expect("writing an artifact does not panic")
            .map_err(|e| e.to_string())?
        };
        let from = Location::Layout {
            path: layout.root().to_owned(),
            tag: Some("artifact".into()),
        };
        let to: Location = artifact
            .to
            .parse()
            .map_err(|e: custody_oci::Error| e.to_string())?;
        let report = copy_to(&from, &to, &options).await.map_err(|e| {
            format!(
                "pushing artifact {:?} to `{}`: {e}",
                artifact.paths, artifact.to
            )
        })?;
        send_output(events, report).await;
    }
    Ok(())
}

async fn copy_to(
    from: &Location,
    to: &Location,
    options: &RegistryOptions,
) -> Result<copy::CopyReport, custody_oci::Error> {
    let source = Source::open(from, options).await?;
    let destination = Destination::open(to, options).await?;
    copy::copy(
        &source,
        &destination,
        &CopyOptions {
            progress: Arc::new(copy::NoProgress),
            ..CopyOptions::default()
        },
    )
    .await
}

async fn send_output(events: &mpsc::Sender<Result<Event, Status>>, report: copy::CopyReport) {
    let output = proto::Output {
        reference: report.pinned,
        digest: report.descriptor.digest().to_string(),
        size: report.descriptor.size(),
    };
    let _ = events.send(Ok(event(Kind::Output(output)))).await;
}
