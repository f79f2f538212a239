//! A step image as a root filesystem: resolved to a digest, every blob
//! verified as it downloads, layers applied in order with whiteouts (and
//! refused if they reach outside, see `custody_oci::unpack`), each layer's
//! uncompressed bytes checked against the config's `diff_ids`, and the whole
//! image held to a layer count and an uncompressed size before the disk
//! fills. Files belong to the step's ids, shifted into its host range, so a
//! step that installs packages as its image's root can.

use std::path::Path;

use custody_oci::oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use custody_oci::registry::{Client, RegistryOptions};
use custody_oci::unpack::{self, Measured, UnpackError};

use crate::ids::StepIds;
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
    #[error("`{reference}` is refused: {detail}")]
    Limit { reference: String, detail: String },
    #[error(
        "layer `{layer}` of `{reference}` does not match the image's config: its content hashes to `{actual}`, the config's `diff_id` says `{expected}`"
    )]
    DiffId {
        reference: String,
        layer: Digest,
        expected: String,
        actual: Digest,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Bounds on a step image, checked before and while it unpacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Uncompressed bytes of all layers together (and compressed, too).
    pub max_bytes: u64,
    pub max_layers: usize,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 30,
            max_layers: 256,
        }
    }
}

/// The image a step ran on, as provenance records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The reference as written in the spec.
    pub reference: String,
    /// The digest the reference resolved to (an index or a manifest).
    pub digest: Digest,
    /// The environment the image's config sets (`Env`, `KEY=VALUE`), in
    /// its order: a toolchain image's `PATH` and friends.
    pub env: Vec<(String, String)>,
}

/// Pulls `reference` and unpacks it into `dest` (an empty directory),
/// downloading layers into `scratch`; files are given to `ids` when set.
pub async fn prepare(
    reference: &Reference,
    options: &RegistryOptions,
    dest: &Path,
    scratch: &Path,
    limits: ImageLimits,
    ids: Option<StepIds>,
) -> Result<ResolvedImage, RootfsError> {
    let shown = reference.to_string();
    let client = Client::new(reference.api_host(), options).await?;
    let (top, manifest) = manifest_for_this_machine(&client, reference).await?;
    let (diff_ids, env) = checked_config(&client, reference, &manifest, limits).await?;
    tokio::fs::create_dir_all(dest).await?;
    let mut budget = limits.max_bytes;
    for (layer, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let path = scratch.join(layer.digest().digest());
        download(&client, reference.repository(), layer, &path).await?;
        let unpack = Unpack {
            path,
            dest: dest.to_owned(),
            media_type: layer.media_type().to_string(),
            budget,
            ids,
        };
        let (actual, size) = tokio::task::spawn_blocking(move || unpack.run())
            .await
            .expect("unpacking does not panic")
            .map_err(|source| match source {
                UnpackError::TooLarge { .. } => RootfsError::Limit {
                    reference: shown.clone(),
                    detail: format!(
                        "it is larger than the limit of {} bytes uncompressed for step images",
                        limits.max_bytes
                    ),
                },
                source => RootfsError::Unpack {
                    reference: shown.clone(),
                    layer: layer.digest().clone(),
                    source,
                },
            })?;
        if actual.to_string() != diff_id {
            return Err(RootfsError::DiffId {
                reference: shown,
                layer: layer.digest().clone(),
                expected: diff_id,
                actual,
            });
        }
        budget -= size;
    }
    if let Some(ids) = ids {
        let dest = dest.to_owned();
        tokio::task::spawn_blocking(move || give_leftovers(&dest, ids))
            .await
            .expect("changing owners does not panic")?;
    }
    Ok(ResolvedImage {
        reference: shown,
        digest: top,
        env,
    })
}

/// The digest `reference` resolves to, and its image manifest for this
/// machine (linux/ARCH from an index).
async fn manifest_for_this_machine(
    client: &Client,
    reference: &Reference,
) -> Result<(Digest, ImageManifest), RootfsError> {
    let bad = |detail: String| RootfsError::Image {
        reference: reference.to_string(),
        detail,
    };
    let repository = reference.repository();
    let (top, bytes) = client
        .manifest(repository, &reference.manifest_ref())
        .await?;
    let media_type = top.media_type().to_string();
    let bytes = if media_type.contains("index") || media_type.contains("manifest.list") {
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
    let manifest =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not an image manifest: {e}")))?;
    Ok((top.digest().clone(), manifest))
}

/// The layers' `diff_ids` and the environment from the image's config,
/// once the image is known to be within `limits` (layer count, compressed
/// size, config size).
async fn checked_config(
    client: &Client,
    reference: &Reference,
    manifest: &ImageManifest,
    limits: ImageLimits,
) -> Result<(Vec<String>, Vec<(String, String)>), RootfsError> {
    let limit = |detail: String| RootfsError::Limit {
        reference: reference.to_string(),
        detail,
    };
    let layers = manifest.layers();
    if layers.len() > limits.max_layers {
        return Err(limit(format!(
            "it has {} layers; step images may have at most {}",
            layers.len(),
            limits.max_layers
        )));
    }
    let compressed: u64 = layers.iter().map(|l| l.size()).sum();
    if compressed > limits.max_bytes {
        return Err(limit(format!(
            "its layers are {compressed} bytes; step images may be at most {} bytes",
            limits.max_bytes
        )));
    }
    let config = manifest.config();
    if config.size() > custody_oci::layout::MAX_MANIFEST_SIZE {
        return Err(limit(format!(
            "its config is {} bytes; configs may be at most {} bytes",
            config.size(),
            custody_oci::layout::MAX_MANIFEST_SIZE
        )));
    }
    let mut config_bytes = Vec::new();
    let mut stream = client.blob(reference.repository(), config).await?;
    while let Some(chunk) = stream.next().await {
        config_bytes.extend_from_slice(&chunk?);
    }
    let bad = |detail: String| RootfsError::Image {
        reference: reference.to_string(),
        detail,
    };
    let configuration = serde_json::from_slice::<ImageConfiguration>(&config_bytes)
        .map_err(|e| bad(format!("its config is not an image config: {e}")))?;
    let diff_ids = configuration.rootfs().diff_ids().clone();
    let env = image_env(&configuration).map_err(bad)?;
    if diff_ids.len() != layers.len() {
        return Err(bad(format!(
            "its config lists {} diff_ids for {} layers",
            diff_ids.len(),
            layers.len()
        )));
    }
    Ok((diff_ids, env))
}

/// The config's `Env` as pairs; an entry without `=` or with a name no
/// shell could use is refused rather than guessed at.
fn image_env(configuration: &ImageConfiguration) -> Result<Vec<(String, String)>, String> {
    let entries = configuration
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    entries
        .iter()
        .map(|entry| {
            let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid || !entry.contains('=') || value.contains('\0') {
                return Err(format!(
                    "its config's `Env` entry `{name}` is not NAME=VALUE"
                ));
            }
            Ok((name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Downloads a layer to `path`, verified while it streams.
async fn download(
    client: &Client,
    repository: &str,
    layer: &custody_oci::oci_spec::image::Descriptor,
    path: &Path,
) -> Result<(), RootfsError> {
    let mut file = tokio::fs::File::create(path).await?;
    let mut stream = client.blob(repository, layer).await?;
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk?).await?;
    }
    file.flush().await?;
    Ok(())
}

/// One downloaded layer to apply (blocking work: decompression and tar).
struct Unpack {
    path: std::path::PathBuf,
    dest: std::path::PathBuf,
    media_type: String,
    /// Uncompressed bytes this layer may still take.
    budget: u64,
    ids: Option<StepIds>,
}

impl Unpack {
    /// Applies the layer; returns the digest and size of its uncompressed
    /// stream (for its `diff_id`). The download is removed either way.
    fn run(self) -> Result<(Digest, u64), UnpackError> {
        let ids = self.ids;
        let owners = |uid: u64, gid: u64| match ids {
            Some(ids) => (
                ids.host_uid(uid).unwrap_or(ids.uid),
                ids.host_gid(gid).unwrap_or(ids.gid),
            ),
            None => (0, 0),
        };
        let owners: unpack::Owners<'_> = ids.is_some().then_some(&owners);
        let result = fs_err::File::open(&self.path)
            .map_err(UnpackError::Io)
            .and_then(|blob| unpack::decompressor(&self.media_type, blob))
            .and_then(|tar| {
                let mut measured = Measured::new(tar, self.budget);
                match unpack::apply_layer(&mut measured, &self.dest, owners) {
                    Err(_) if measured.exceeded() => {
                        Err(UnpackError::TooLarge { limit: self.budget })
                    }
                    Err(e) => Err(e),
                    Ok(()) => measured.finish(),
                }
            });
        let _ = std::fs::remove_file(&self.path);
        result
    }
}

/// What unpacking made without an owner from the image (the root itself,
/// parents a layer did not list) belongs to host root: give it to the
/// step's root, so the step can write its own image.
fn give_leftovers(dest: &Path, ids: StepIds) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in walkdir::WalkDir::new(dest).follow_links(false) {
        let entry = entry.map_err(std::io::Error::other)?;
        let meta = entry.metadata().map_err(std::io::Error::other)?;
        if meta.uid() == 0 || meta.gid() == 0 {
            let uid = if meta.uid() == 0 { ids.uid } else { meta.uid() };
            let gid = if meta.gid() == 0 { ids.gid } else { meta.gid() };
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}
