//! The last stages, each a type the next one takes, so the order cannot be
//! broken: outputs are **checked** at their destinations (fetched back by
//! digest), only checked outputs are **signed** for, only a signed
//! statement is **attached**, and only then are the **tags** written. A
//! failure anywhere before the tags leaves every tag where it was.

use custody_attest::keys::Signer;
use custody_attest::statement::{Provenance, ResourceDescriptor, SLSA_PROVENANCE_V1, Statement};
use custody_oci::Location;
use custody_oci::digest::{self, Digest};
use custody_oci::layout::Layout;
use custody_oci::oci_spec::image::{Descriptor, ImageManifest, MediaType};
use custody_provenance::attach;
use custody_provenance::build_type::{self, SubjectKind};
use custody_wire::events::Pushed;

use super::plan::{Clients, Expected, PlannedPush};
use super::{BuildError, Progress};
use crate::store;

/// The OCI annotation that names an artifact file.
const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// Outputs found at their destinations, as the runner said it pushed them.
/// Only [`check`] makes one.
pub(crate) struct Checked {
    outputs: Vec<CheckedOutput>,
    subjects: Vec<ResourceDescriptor>,
}

struct CheckedOutput {
    destination: Location,
    /// The manifest as found (media type, size, digest) and its bytes.
    manifest: Descriptor,
    bytes: Vec<u8>,
}

/// A signed statement about checked outputs. Only [`sign`] makes one.
pub(crate) struct Signed {
    checked: Checked,
    envelope: Vec<u8>,
}

/// A statement attached to every output. Only [`attach_all`] makes one.
pub(crate) struct Attached(Signed);

/// What a succeeded build published.
pub(crate) struct Published {
    pub envelope: Vec<u8>,
    pub subjects: Vec<ResourceDescriptor>,
    /// As recorded: each destination with its tag.
    pub outputs: Vec<store::Output>,
}

/// Fetches every output the runner reported back from its destination by
/// digest; its bytes must hash to that digest. The subjects follow from
/// what was found (an artifact's files from its fetched manifest), not
/// from what the runner said.
pub(crate) async fn check(
    expected: &[Expected],
    pushes: &[PlannedPush],
    pushed: &[Pushed],
    clients: &mut Clients<'_>,
    progress: &mut (impl FnMut(Progress) + Send),
) -> Result<Checked, BuildError> {
    let (by_steps, declared): (Vec<&Pushed>, Vec<&Pushed>) =
        pushed.iter().partition(|p| p.gateway.is_some());
    if declared.len() != expected.len() {
        return Err(BuildError::OutputCount {
            reported: declared.len(),
            declared: expected.len(),
        });
    }
    let mut checked = Checked {
        outputs: Vec::new(),
        subjects: Vec::new(),
    };
    for (output, expected) in declared.into_iter().zip(expected) {
        let failed = |detail: String| BuildError::Check {
            destination: expected.destination.to_string(),
            digest: output.digest.clone(),
            detail,
        };
        let digest = digest::parse(&output.digest).map_err(|e| failed(e.to_string()))?;
        let (manifest, bytes) = fetch(clients, &expected.destination, &digest, output.size)
            .await
            .map_err(failed)?;
        progress(Progress::Checked {
            destination: expected.destination.to_string(),
            digest: digest.to_string(),
        });
        let name = build_type::subject_name(&expected.destination);
        if expected.artifact {
            checked
                .subjects
                .push(build_type::subject(SubjectKind::Artifact, &name, &digest));
            checked
                .subjects
                .extend(artifact_files(&bytes).map_err(failed)?);
        } else {
            checked
                .subjects
                .push(build_type::subject(SubjectKind::Image, &name, &digest));
        }
        checked.outputs.push(CheckedOutput {
            destination: expected.destination.clone(),
            manifest,
            bytes,
        });
    }
    check_pushed_by_steps(pushes, &by_steps, clients, progress, &mut checked).await?;
    Ok(checked)
}

/// What steps pushed through the gateway, fetched back from its `pushes`
/// destination like any image output: each is a subject annotated with the
/// step that pushed it and goes out under the tag the step used. Every
/// declared push must have been made.
async fn check_pushed_by_steps(
    pushes: &[PlannedPush],
    pushed: &[&Pushed],
    clients: &mut Clients<'_>,
    progress: &mut (impl FnMut(Progress) + Send),
    checked: &mut Checked,
) -> Result<(), BuildError> {
    for output in pushed {
        let gateway = output.gateway.as_ref().expect("partitioned on it");
        let push = pushes
            .iter()
            .find(|p| p.name == gateway.push)
            .ok_or_else(|| BuildError::UnknownPush {
                name: gateway.push.clone(),
            })?;
        let failed = |detail: String| BuildError::Check {
            destination: push.destination.to_string(),
            digest: output.digest.clone(),
            detail,
        };
        let reference = match &gateway.tag {
            Some(tag) => format!("{}:{tag}", push.destination)
                .parse()
                .map_err(|e: custody_oci::Error| failed(e.to_string()))?,
            None => push.destination.clone(),
        };
        let destination = Location::Registry(reference);
        let digest = digest::parse(&output.digest).map_err(|e| failed(e.to_string()))?;
        let (manifest, bytes) = fetch(clients, &destination, &digest, output.size)
            .await
            .map_err(failed)?;
        progress(Progress::Checked {
            destination: destination.to_string(),
            digest: digest.to_string(),
        });
        checked.subjects.push(build_type::pushed_by_step(
            &build_type::subject_name(&destination),
            &digest,
            &gateway.step,
            gateway.tag.as_deref(),
        ));
        checked.outputs.push(CheckedOutput {
            destination,
            manifest,
            bytes,
        });
    }
    if let Some(missing) = pushes.iter().find(|p| {
        !pushed
            .iter()
            .any(|o| o.gateway.as_ref().is_some_and(|g| g.push == p.name))
    }) {
        return Err(BuildError::PushNotMade {
            name: missing.name.clone(),
        });
    }
    Ok(())
}

/// Signs the statement about `checked`'s subjects with `provenance`.
pub(crate) fn sign(
    checked: Checked,
    provenance: &Provenance,
    key: &dyn Signer,
) -> Result<Signed, BuildError> {
    let statement = Statement::provenance(checked.subjects.clone(), provenance);
    let envelope = statement.sign(key).map_err(BuildError::Sign)?;
    let envelope = serde_json::to_vec_pretty(&envelope).expect("an envelope serialises");
    Ok(Signed { checked, envelope })
}

/// Attaches the signed statement next to every output.
pub(crate) async fn attach_all(
    signed: Signed,
    clients: &mut Clients<'_>,
    progress: &mut (impl FnMut(Progress) + Send),
) -> Result<Attached, BuildError> {
    for output in &signed.checked.outputs {
        attach_one(clients, output, &signed.envelope)
            .await
            .map_err(|detail| BuildError::Attach {
                destination: output.destination.to_string(),
                detail,
            })?;
        progress(Progress::Attached {
            destination: output.destination.to_string(),
        });
    }
    Ok(Attached(signed))
}

/// Moves every destination's tag to its output: the last thing a build does.
pub(crate) async fn tag_all(
    attached: Attached,
    clients: &mut Clients<'_>,
    progress: &mut (impl FnMut(Progress) + Send),
) -> Result<Published, BuildError> {
    let Signed { checked, envelope } = attached.0;
    let mut outputs = Vec::new();
    for output in &checked.outputs {
        tag(clients, output)
            .await
            .map_err(|detail| BuildError::Tag {
                destination: output.destination.to_string(),
                detail,
            })?;
        progress(Progress::Tagged {
            destination: output.destination.to_string(),
        });
        outputs.push(store::Output {
            reference: output.destination.to_string(),
            digest: output.manifest.digest().clone(),
            size: output.manifest.size(),
        });
    }
    Ok(Published {
        envelope,
        subjects: checked.subjects,
        outputs,
    })
}

/// The manifest `digest` (of `size` bytes) where it was pushed.
async fn fetch(
    clients: &mut Clients<'_>,
    destination: &Location,
    digest: &Digest,
    size: u64,
) -> Result<(Descriptor, Vec<u8>), String> {
    match destination {
        Location::Registry(reference) => {
            let client = clients
                .get(reference.api_host())
                .await
                .map_err(|e| e.to_string())?;
            let (descriptor, bytes) = client
                .manifest(reference.repository(), digest.as_ref())
                .await
                .map_err(|e| e.to_string())?;
            Ok((
                Descriptor::new(
                    descriptor.media_type().clone(),
                    bytes.len() as u64,
                    digest.clone(),
                ),
                bytes.to_vec(),
            ))
        }
        Location::Layout { path, .. } => {
            let (path, digest) = (path.clone(), digest.clone());
            tokio::task::spawn_blocking(move || -> Result<_, String> {
                let layout = Layout::open(&path).map_err(|e| e.to_string())?;
                // Any media type: the bytes are checked against digest and size.
                let blob = Descriptor::new(MediaType::ImageManifest, size, digest.clone());
                let bytes = layout.read_small_blob(&blob).map_err(|e| e.to_string())?;
                let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|m| m["mediaType"].as_str().map(MediaType::from))
                    .unwrap_or(MediaType::ImageManifest);
                Ok((Descriptor::new(media_type, size, digest), bytes))
            })
            .await
            .expect("reading a layout does not panic")
        }
        Location::DockerArchive { .. } => Err("a docker archive is not a destination".into()),
    }
}

/// The files of an artifact: each layer named by its title.
fn artifact_files(manifest: &[u8]) -> Result<Vec<ResourceDescriptor>, String> {
    let parsed: ImageManifest =
        serde_json::from_slice(manifest).map_err(|e| format!("not a manifest: {e}"))?;
    parsed
        .layers()
        .iter()
        .map(|layer| {
            let title = layer
                .annotations()
                .as_ref()
                .and_then(|a| a.get(TITLE_ANNOTATION))
                .ok_or_else(|| format!("layer `{}` has no title", layer.digest()))?;
            Ok(build_type::subject(
                SubjectKind::File,
                title,
                layer.digest(),
            ))
        })
        .collect()
}

async fn attach_one(
    clients: &mut Clients<'_>,
    output: &CheckedOutput,
    envelope: &[u8],
) -> Result<(), String> {
    match &output.destination {
        Location::Registry(reference) => {
            let client = clients
                .get(reference.api_host())
                .await
                .map_err(|e| e.to_string())?;
            attach::attach_to_registry(
                client,
                reference.repository(),
                &output.manifest,
                envelope,
                SLSA_PROVENANCE_V1,
            )
            .await
            .map_err(|e| e.to_string())
        }
        Location::Layout { path, .. } => {
            let (path, subject, envelope) =
                (path.clone(), output.manifest.clone(), envelope.to_vec());
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

/// Writes the destination's tag for the output, and checks that it names
/// it: a registry gets the manifest again under the tag, a layout lists it
/// in `index.json`.
async fn tag(clients: &mut Clients<'_>, output: &CheckedOutput) -> Result<(), String> {
    let subject = &output.manifest;
    match &output.destination {
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
                    &bytes::Bytes::copy_from_slice(&output.bytes),
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
