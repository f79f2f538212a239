//! A step image as a root filesystem: resolved to a digest, every blob
//! verified as it downloads, layers applied in order with whiteouts (and
//! refused if they reach outside, see `custody_oci::unpack`).

use std::path::Path;

use custody_oci::oci_spec::image::{ImageIndex, ImageManifest};
use custody_oci::registry::{Client, RegistryOptions};
use custody_oci::unpack::{self, UnpackError};
use custody_oci::{Digest, Reference};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootfsError {
    #[error(transparent)]
    Oci(#[from] custody_oci::Error),
    #[error("`{reference}`: {detail}")]
    Image { reference: String, detail: String },
    #[error("unpacking layer `{layer}` of `{reference}`: {source}")]
    Unpack {
        reference: String,
        layer: Digest,
        source: UnpackError,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The image a step ran on, as provenance records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The reference as written in the spec.
    pub reference: String,
    /// The digest the reference resolved to (an index or a manifest).
    pub digest: Digest,
}

/// Pulls `reference` and unpacks it into `dest` (an empty directory).
pub async fn prepare(
    reference: &Reference,
    options: &RegistryOptions,
    dest: &Path,
) -> Result<ResolvedImage, RootfsError> {
    let shown = reference.to_string();
    let bad = |detail: String| RootfsError::Image {
        reference: shown.clone(),
        detail,
    };
    let client = Client::new(reference.api_host(), options).await?;
    let repository = reference.repository();
    let (top, bytes) = client
        .manifest(repository, &reference.manifest_ref())
        .await?;
    let manifest_bytes = if top.media_type().to_string().contains("index")
        || top.media_type().to_string().contains("manifest.list")
    {
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not an image index: {e}")))?;
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let chosen = index
            .manifests()
            .iter()
            .find(|d| {
                d.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == arch
                })
            })
            .ok_or_else(|| bad(format!("the index has no linux/{arch} image")))?;
        client
            .manifest(repository, chosen.digest().as_ref())
            .await?
            .1
    } else {
        bytes
    };
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| bad(format!("not an image manifest: {e}")))?;
    tokio::fs::create_dir_all(dest).await?;
    let scratch = tempfile::tempdir()?;
    for layer in manifest.layers() {
        // Download (verified while it streams) to a file, then unpack off
        // the runtime: decompression and tar are blocking work.
        let path = scratch.path().join(layer.digest().digest());
        let mut file = tokio::fs::File::create(&path).await?;
        let mut stream = client.blob(repository, layer).await?;
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk?).await?;
        }
        file.flush().await?;
        drop(file);
        let (dest, media_type, digest, shown) = (
            dest.to_owned(),
            layer.media_type().to_string(),
            layer.digest().clone(),
            shown.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let blob = fs_err::File::open(&path)?;
            let unpacked = unpack::decompressor(&media_type, blob)
                .and_then(|tar| unpack::apply_layer(tar, &dest));
            let _ = std::fs::remove_file(&path);
            unpacked.map_err(|source| RootfsError::Unpack {
                reference: shown,
                layer: digest,
                source,
            })
        })
        .await
        .expect("unpacking does not panic")?;
    }
    Ok(ResolvedImage {
        reference: shown,
        digest: top.digest().clone(),
    })
}
