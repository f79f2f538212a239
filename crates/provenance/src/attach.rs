//! Where attestations live next to an image, in the three layouts tools
//! look in: an OCI 1.1 referrer (through the referrers API, or the
//! `sha256-<hex>` tag schema on registries without it), cosign's
//! `sha256-<hex>.att` tag, and, for an `oci:` layout, a manifest with a
//! `subject` in the layout's own index.

use bytes::Bytes;
use custody_oci::layout::Layout;
use custody_oci::oci_spec::image::{Descriptor, MediaType};
use custody_oci::registry::{Client, fallback_tag};
use custody_oci::{Digest, Error, digest, stream};

/// The media type of a DSSE envelope blob.
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// The annotation naming the statement's predicate type.
pub const PREDICATE_ANNOTATION: &str = "in-toto.io/predicate-type";
/// cosign's annotation for the same.
const COSIGN_PREDICATE_ANNOTATION: &str = "predicateType";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";

/// The blobs and manifests that carry one envelope.
struct Pieces {
    envelope: (Descriptor, Bytes),
    empty: (Descriptor, Bytes),
    referrer: (Descriptor, Bytes),
}

fn blob(media_type: &str, bytes: Bytes) -> (Descriptor, Bytes) {
    (
        Descriptor::new(
            MediaType::from(media_type),
            bytes.len() as u64,
            digest::sha256(&bytes),
        ),
        bytes,
    )
}

fn json_descriptor(d: &Descriptor) -> serde_json::Value {
    serde_json::to_value(d).expect("descriptors serialise")
}

fn pieces(subject: &Descriptor, envelope: &[u8], predicate_type: &str) -> Pieces {
    let envelope = blob(DSSE_MEDIA_TYPE, Bytes::copy_from_slice(envelope));
    let empty = blob(EMPTY_MEDIA_TYPE, Bytes::from_static(EMPTY));
    let mut layer = json_descriptor(&envelope.0);
    layer["annotations"] = serde_json::json!({ PREDICATE_ANNOTATION: predicate_type });
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": DSSE_MEDIA_TYPE,
        "config": json_descriptor(&empty.0),
        "layers": [layer],
        "subject": { "mediaType": subject.media_type().to_string(), "digest": subject.digest().to_string(), "size": subject.size() },
        "annotations": { PREDICATE_ANNOTATION: predicate_type },
    });
    let referrer = blob(
        "application/vnd.oci.image.manifest.v1+json",
        Bytes::from(serde_json::to_vec(&manifest).expect("json")),
    );
    Pieces {
        envelope,
        empty,
        referrer,
    }
}

/// cosign's tag for the attestations of `digest`.
pub fn cosign_tag(digest: &Digest) -> String {
    format!("{}.att", fallback_tag(digest))
}

/// Attaches `envelope` to the image `subject` in `repository`: as a
/// referrer, and in cosign's `.att` manifest (added to what is there).
pub async fn attach_to_registry(
    client: &Client,
    repository: &str,
    subject: &Descriptor,
    envelope: &[u8],
    predicate_type: &str,
) -> Result<(), Error> {
    let pieces = pieces(subject, envelope, predicate_type);
    for (descriptor, bytes) in [&pieces.empty, &pieces.envelope] {
        if !client.has_blob(repository, descriptor.digest()).await? {
            let bytes = bytes.clone();
            client
                .upload_blob(repository, descriptor, None, || {
                    let bytes = bytes.clone();
                    stream::verified(
                        futures_util::stream::once(async move { Ok(bytes) }),
                        descriptor.clone(),
                    )
                })
                .await?;
        }
    }
    client
        .put_referrer(
            repository,
            subject.digest(),
            &pieces.referrer.0,
            &pieces.referrer.1,
        )
        .await?;

    // cosign keeps every attestation of an image as a layer of one manifest.
    let tag = cosign_tag(subject.digest());
    let mut layers: Vec<serde_json::Value> = Vec::new();
    if client.has_manifest(repository, &tag).await? {
        let (_, existing) = client.manifest(repository, &tag).await?;
        let existing: serde_json::Value =
            serde_json::from_slice(&existing).map_err(|e| Error::Protocol {
                host: client.host().to_owned(),
                action: format!("reading `{tag}`"),
                detail: e.to_string(),
            })?;
        layers = existing["layers"].as_array().cloned().unwrap_or_default();
    }
    if !layers
        .iter()
        .any(|l| l["digest"] == pieces.envelope.0.digest().to_string())
    {
        let mut layer = json_descriptor(&pieces.envelope.0);
        layer["annotations"] = serde_json::json!({ COSIGN_PREDICATE_ANNOTATION: predicate_type });
        layers.push(layer);
    }
    let config = blob(
        "application/vnd.oci.image.config.v1+json",
        Bytes::from_static(EMPTY),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": json_descriptor(&config.0),
        "layers": layers,
    });
    let (descriptor, bytes) = blob(
        "application/vnd.oci.image.manifest.v1+json",
        Bytes::from(serde_json::to_vec(&manifest).expect("json")),
    );
    client
        .put_manifest(repository, &tag, &descriptor, &bytes)
        .await?;
    Ok(())
}

/// Every DSSE envelope attached to `subject` in `repository`, from any of
/// the layouts, each once. Nothing here is trusted yet: verify each.
pub async fn find_in_registry(
    client: &Client,
    repository: &str,
    subject: &Digest,
) -> Result<Vec<Bytes>, Error> {
    let mut layers: Vec<Descriptor> = Vec::new();
    for referrer in client
        .referrers(repository, subject, Some(DSSE_MEDIA_TYPE))
        .await?
    {
        let (_, bytes) = client
            .manifest(repository, referrer.digest().as_ref())
            .await?;
        layers.extend(dsse_layers(&bytes));
    }
    let tag = cosign_tag(subject);
    if client.has_manifest(repository, &tag).await? {
        let (_, bytes) = client.manifest(repository, &tag).await?;
        layers.extend(dsse_layers(&bytes));
    }
    let mut seen = std::collections::HashSet::new();
    let mut envelopes = Vec::new();
    for layer in layers {
        if !seen.insert(layer.digest().clone())
            || layer.size() > custody_oci::layout::MAX_MANIFEST_SIZE
        {
            continue;
        }
        let chunks: Vec<Bytes> =
            futures_util::TryStreamExt::try_collect(client.blob(repository, &layer).await?).await?;
        envelopes.push(Bytes::from(chunks.concat()));
    }
    Ok(envelopes)
}

fn dsse_layers(manifest: &[u8]) -> Vec<Descriptor> {
    serde_json::from_slice::<serde_json::Value>(manifest)
        .ok()
        .and_then(|m| m.get("layers").cloned())
        .and_then(|l| serde_json::from_value::<Vec<Descriptor>>(l).ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.media_type().to_string() == DSSE_MEDIA_TYPE)
        .collect()
}

/// Attaches `envelope` to `subject` inside an OCI image layout: a manifest
/// with a `subject`, listed untagged in `index.json` (blocking).
pub fn attach_to_layout(
    layout: &Layout,
    subject: &Descriptor,
    envelope: &[u8],
    predicate_type: &str,
) -> Result<(), Error> {
    let pieces = pieces(subject, envelope, predicate_type);
    for (descriptor, bytes) in [&pieces.empty, &pieces.envelope, &pieces.referrer] {
        if !layout.has_blob(descriptor.digest()) {
            layout.write_blob(descriptor, bytes.as_ref())?;
        }
    }
    let listed = custody_oci::registry::referrer_descriptor(&pieces.referrer.0, &pieces.referrer.1);
    layout.add_manifest(&listed, None)
}

/// Every DSSE envelope attached to `subject` in a layout (blocking).
pub fn find_in_layout(layout: &Layout, subject: &Digest) -> Result<Vec<Bytes>, Error> {
    let mut envelopes = Vec::new();
    for listed in layout.index()?.manifests() {
        if listed
            .artifact_type()
            .as_ref()
            .map(|t| t.to_string())
            .as_deref()
            != Some(DSSE_MEDIA_TYPE)
        {
            continue;
        }
        let manifest = layout.read_small_blob(listed)?;
        let names_subject = serde_json::from_slice::<serde_json::Value>(&manifest)
            .ok()
            .and_then(|m| {
                m["subject"]["digest"]
                    .as_str()
                    .map(|d| d == subject.as_ref())
            })
            .unwrap_or(false);
        if !names_subject {
            continue;
        }
        for layer in dsse_layers(&manifest) {
            envelopes.push(Bytes::from(layout.read_small_blob(&layer)?));
        }
    }
    Ok(envelopes)
}
