//! What a pushed manifest is and what it refers to, read from its bytes.
//!
//! Only image manifests and indexes (OCI and Docker schema 2) are taken:
//! they are what the runner can push onward and what the provenance can
//! name. A manifest with a `subject` is a referrer (a signature, an
//! attestation, an SBOM attached to an image): those are the platform's to
//! write, so a step cannot plant one next to the image it pushed
//! (image-spec `manifest.md`, "subject").

use custody_oci::Digest;
use serde_json::Value;

use crate::error::{Code, Refusal};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A manifest that parsed and may be kept, once what it names is held.
#[derive(Debug)]
pub(crate) struct Manifest {
    pub media_type: String,
    /// Config and layers of an image manifest.
    pub blobs: Vec<Digest>,
    /// The manifests an index lists.
    pub children: Vec<Digest>,
}

/// Reads `bytes` as a manifest sent with `content_type`.
pub(crate) fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, Refusal> {
    let invalid = |why: String| Refusal::new(Code::ManifestInvalid, why);
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("the manifest is not JSON: {e}")))?;
    let Value::Object(object) = &value else {
        return Err(invalid("the manifest is not a JSON object".into()));
    };
    if object.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(invalid(
            "the gateway takes schemaVersion 2 manifests (OCI image manifests and indexes, Docker schema 2)"
                .into(),
        ));
    }
    if object.contains_key("subject") {
        return Err(Refusal::new(
            Code::Denied,
            "manifests with a `subject` (signatures, attestations, other referrers) are the platform's to write; push images and indexes without one",
        ));
    }
    // The header wins where it is specific; a generic or missing one
    // defers to the body's `mediaType`, and the two may not disagree.
    let declared = object.get("mediaType").and_then(Value::as_str);
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or_default().trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    let media_type = match (header, declared) {
        (Some(header), Some(declared)) if header != declared => {
            return Err(invalid(format!(
                "the manifest says it is `{declared}` but was sent as `{header}`"
            )));
        }
        (Some(media_type), _) | (None, Some(media_type)) => media_type.to_owned(),
        (None, None) if object.contains_key("manifests") => OCI_INDEX.to_owned(),
        (None, None) => OCI_MANIFEST.to_owned(),
    };
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = object
                .get("config")
                .ok_or_else(|| invalid("the image manifest has no `config`".into()))?;
            let mut blobs = vec![descriptor_digest(config, "config")?];
            for (i, layer) in list(object.get("layers"), "layers")?.iter().enumerate() {
                blobs.push(descriptor_digest(layer, &format!("layers[{i}]"))?);
            }
            Ok(Manifest {
                media_type,
                blobs,
                children: Vec::new(),
            })
        }
        OCI_INDEX | DOCKER_LIST => {
            let mut children = Vec::new();
            for (i, child) in list(object.get("manifests"), "manifests")?
                .iter()
                .enumerate()
            {
                children.push(descriptor_digest(child, &format!("manifests[{i}]"))?);
            }
            Ok(Manifest {
                media_type,
                blobs: Vec::new(),
                children,
            })
        }
        other => Err(Refusal::new(
            Code::ManifestInvalid,
            format!(
                "the gateway takes `{OCI_MANIFEST}`, `{OCI_INDEX}`, `{DOCKER_MANIFEST}` and `{DOCKER_LIST}`, not `{other}`"
            ),
        )),
    }
}

fn list<'a>(value: Option<&'a Value>, field: &str) -> Result<&'a [Value], Refusal> {
    match value {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(Refusal::new(
            Code::ManifestInvalid,
            format!("`{field}` is not a list"),
        )),
    }
}

fn descriptor_digest(value: &Value, field: &str) -> Result<Digest, Refusal> {
    let text = value
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| Refusal::new(Code::ManifestInvalid, format!("`{field}` has no `digest`")))?;
    if value.get("size").and_then(Value::as_u64).is_none() {
        return Err(Refusal::new(
            Code::ManifestInvalid,
            format!("`{field}` has no `size`"),
        ));
    }
    custody_oci::digest::parse(text)
        .map_err(|e| Refusal::new(Code::ManifestInvalid, format!("`{field}`: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{D}","size":0}},"layers":[{{"mediaType":"y","digest":"{D}","size":0}}]{extra}}}"#
        )
    }

    #[test]
    fn an_image_manifest_names_its_config_and_layers() {
        let parsed = parse(image("").as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(parsed.media_type, OCI_MANIFEST);
        assert_eq!(parsed.blobs.len(), 2);
        assert!(parsed.children.is_empty());
    }

    #[test]
    fn a_subject_is_denied() {
        let subject =
            format!(r#","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":0}}"#);
        let refusal = parse(image(&subject).as_bytes(), None).unwrap_err();
        assert_eq!(refusal.code, Code::Denied);
    }

    #[test]
    fn header_and_body_may_not_disagree() {
        let refusal = parse(image("").as_bytes(), Some(OCI_INDEX)).unwrap_err();
        assert_eq!(refusal.code, Code::ManifestInvalid);
    }

    #[test]
    fn other_media_types_are_refused() {
        let refusal = parse(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.artifact.manifest.v1+json"}"#,
            None,
        )
        .unwrap_err();
        assert_eq!(refusal.code, Code::ManifestInvalid);
    }
}
