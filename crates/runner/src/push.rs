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
use crate::steps::Boundary;

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
    boundary: &Boundary,
    events: &mpsc::Sender<Result<Event, Status>>,
) -> Result<(), String> {
    let options = registry_options(job);
    let jobdir = &boundary.jobdir;
    for image in &job.images {
        let from: Location = image
            .from
            .parse()
            .map_err(|e: custody_oci::Error| e.to_string())?;
        // The step saw `/output/…`; the runner opens it inside its own copy.
        let source = {
            let output = jobdir.output.clone();
            tokio::task::spawn_blocking(move || outputs::open_image(&output, &from))
                .await
                .expect("opening an output does not panic")
                .map_err(|e| e.to_string())?
        };
        let to: Location = image
            .to
            .parse()
            .map_err(|e: custody_oci::Error| e.to_string())?;
        let report = copy_to(&source, &to, &options)
            .await
            .map_err(|e| format!("pushing `{}` to `{}`: {e}", image.from, image.to))?;
        send_output(events, report).await;
    }
    for (index, artifact) in job.artifacts.iter().enumerate() {
        let staging = jobdir.private.join(format!("artifact-{index}"));
        let layout = {
            let (workspace, globs) = (jobdir.workspace.clone(), artifact.paths.clone());
            tokio::task::spawn_blocking(move || -> Result<Layout, outputs::OutputError> {
                let files = outputs::collect_files(&workspace, &globs)?;
                let layout = Layout::for_writing(&staging)?;
                layout.create_if_missing()?;
                outputs::write_artifact(&workspace, &files, &layout, "artifact")?;
                Ok(layout)
            })
            .await
            .expect("writing an artifact does not panic")
            .map_err(|e| e.to_string())?
        };
        let source = Source::Layout {
            layout,
            tag: Some("artifact".into()),
        };
        let to: Location = artifact
            .to
            .parse()
            .map_err(|e: custody_oci::Error| e.to_string())?;
        let report = copy_to(&source, &to, &options).await.map_err(|e| {
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
    source: &Source,
    to: &Location,
    options: &RegistryOptions,
) -> Result<copy::CopyReport, custody_oci::Error> {
    let destination = Destination::open(to, options).await?;
    copy::copy(
        source,
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
