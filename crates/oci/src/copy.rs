//! Copying an image (a manifest or an index with its manifests) and all its
//! blobs from a source to a destination: the engine behind push and pull.
//!
//! Order of work: read every manifest; ask the destination which blobs it
//! lacks; make sure the source (or a mount) can supply each of them, failing
//! before any upload if not; transfer the blobs in parallel; then store the
//! manifests, children before the index that names them, so a tag never
//! points at something incomplete.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};

use crate::Error;
use crate::archive::DockerArchive;
use crate::digest::Digest;
use crate::layout::Layout;
use crate::reference::{Location, Reference};
use crate::registry::{Client, Mount, RegistryOptions};
use crate::stream::{self, BlobStream};

/// Hooks for showing progress; every method has a no-op default.
pub trait Progress: Send + Sync {
    /// A blob transfer starts (again, after a retry).
    fn blob_started(&self, _descriptor: &Descriptor) {}
    fn blob_bytes(&self, _digest: &Digest, _bytes: u64) {}
    fn blob_finished(&self, _digest: &Digest, _outcome: BlobOutcome) {}
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// What happened to one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobOutcome {
    /// The destination had it already.
    Present,
    /// The registry mounted it from another repository.
    Mounted,
    /// Its bytes were transferred.
    Copied,
}

/// Knobs for one copy.
#[derive(Clone)]
pub struct CopyOptions {
    /// Blobs transferred at once.
    pub jobs: usize,
    /// Repositories on the destination registry to mount blobs from.
    pub mount_from: Vec<String>,
    pub progress: Arc<dyn Progress>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            jobs: 8,
            mount_from: Vec::new(),
            progress: Arc::new(NoProgress),
        }
    }
}

/// What a finished copy did.
#[derive(Clone, Debug)]
pub struct CopyReport {
    /// The top-level manifest or index, as stored at the destination.
    pub descriptor: Descriptor,
    /// The destination, pinned to the digest: `REF@sha256:…`.
    pub pinned: String,
    pub blobs_copied: usize,
    pub blobs_present: usize,
    pub blobs_mounted: usize,
    pub bytes_copied: u64,
}

/// Where an image comes from.
pub enum Source {
    Layout {
        layout: Layout,
        tag: Option<String>,
    },
    /// A manifest a layout holds by digest, listed in no `index.json` (what
    /// the runner's gateway keeps for steps that push themselves).
    LayoutManifest {
        layout: Layout,
        manifest: Box<Descriptor>,
    },
    Archive(Arc<DockerArchive>),
    Registry {
        client: Arc<Client>,
        reference: Reference,
    },
}

/// Where an image goes.
pub enum Destination {
    Layout {
        layout: Layout,
        tag: Option<String>,
        /// Whether the image is listed in `index.json` (with `tag`, if
        /// any); unlisted, only its blobs are written.
        listed: bool,
    },
    Registry {
        client: Arc<Client>,
        reference: Reference,
    },
}

impl Source {
    /// Opens `location` for reading.
    pub async fn open(location: &Location, options: &RegistryOptions) -> Result<Self, Error> {
        match location {
            Location::Layout { path, tag } => {
                let layout = blocking({
                    let path = path.clone();
                    move || Layout::open(path)
                })
                .await?;
                Ok(Source::Layout {
                    layout,
                    tag: tag.clone(),
                })
            }
            Location::DockerArchive { path } => {
                let path = path.clone();
                let archive = blocking(move || DockerArchive::open(&path)).await?;
                Ok(Source::Archive(Arc::new(archive)))
            }
            Location::Registry(reference) => Ok(Source::Registry {
                client: Arc::new(Client::new(reference.api_host(), options).await?),
                reference: reference.clone(),
            }),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Layout { layout, .. } => format!("oci:{}", layout.root().display()),
            Source::LayoutManifest { layout, manifest } => {
                format!("oci:{}@{}", layout.root().display(), manifest.digest())
            }
            Source::Archive(archive) => format!("docker-archive:{}", archive.path.display()),
            Source::Registry { reference, .. } => reference.to_string(),
        }
    }

    /// The top-level manifest and its bytes.
    async fn root(&self) -> Result<(Descriptor, Bytes), Error> {
        match self {
            Source::Layout { layout, tag } => {
                let (layout, tag) = (layout.clone(), tag.clone());
                blocking(move || {
                    let descriptor = layout.resolve(tag.as_deref())?;
                    let bytes = layout.read_small_blob(&descriptor)?;
                    Ok((descriptor, Bytes::from(bytes)))
                })
                .await
            }
            Source::LayoutManifest { layout, manifest } => {
                let (layout, manifest) = (layout.clone(), (**manifest).clone());
                blocking(move || {
                    let bytes = layout.read_small_blob(&manifest)?;
                    Ok((manifest, Bytes::from(bytes)))
                })
                .await
            }
            Source::Archive(archive) => Ok((
                archive.manifest_descriptor.clone(),
                Bytes::from(archive.manifest.clone()),
            )),
            Source::Registry { client, reference } => {
                client
                    .manifest(reference.repository(), &reference.manifest_ref())
                    .await
            }
        }
    }

    async fn manifest(&self, descriptor: &Descriptor) -> Result<Bytes, Error> {
        match self {
            Source::Layout { layout, .. } | Source::LayoutManifest { layout, .. } => {
                let (layout, descriptor) = (layout.clone(), descriptor.clone());
                blocking(move || layout.read_small_blob(&descriptor).map(Bytes::from)).await
            }
            Source::Archive(_) => Err(Error::Unsupported(
                "docker archives hold a single manifest".into(),
            )),
            Source::Registry { client, reference } => {
                let (_, bytes) = client
                    .manifest(reference.repository(), descriptor.digest().as_ref())
                    .await?;
                Ok(bytes)
            }
        }
    }

    /// Whether the source itself can supply the blob (a sparse layout may not).
    fn has_blob(&self, digest: &Digest) -> bool {
        match self {
            Source::Layout { layout, .. } | Source::LayoutManifest { layout, .. } => {
                layout.has_blob(digest)
            }
            Source::Archive(archive) => {
                archive.blobs.contains_key(digest.as_ref())
                    || archive.manifest_descriptor.digest() == digest
                    || crate::digest::sha256(&archive.config) == *digest
            }
            Source::Registry { .. } => true,
        }
    }

    /// A verified stream of the blob's bytes; nothing is read until polled.
    fn open_blob(&self, descriptor: &Descriptor) -> BlobStream {
        match self {
            Source::Layout { layout, .. } | Source::LayoutManifest { layout, .. } => {
                let (layout, digest) = (layout.clone(), descriptor.digest().clone());
                stream::from_file(
                    move || layout.open_blob(&digest).map(Arc::new),
                    None,
                    descriptor.clone(),
                )
            }
            Source::Archive(archive) => match archive.blobs.get(descriptor.digest().as_ref()) {
                Some(range) => {
                    let file = archive.file.clone();
                    stream::from_file(
                        move || Ok(file),
                        Some((range.offset, range.len)),
                        descriptor.clone(),
                    )
                }
                None => {
                    let config = Bytes::from(archive.config.clone());
                    stream::verified(
                        futures_util::stream::once(async move { Ok(config) }),
                        descriptor.clone(),
                    )
                }
            },
            Source::Registry { client, reference } => {
                let (client, repository, descriptor) = (
                    client.clone(),
                    reference.repository().to_owned(),
                    descriptor.clone(),
                );
                Box::pin(
                    futures_util::stream::once(async move {
                        client.blob(&repository, &descriptor).await
                    })
                    .try_flatten(),
                )
            }
        }
    }
}

impl Destination {
    /// Opens `location` for writing; a layout is created if absent.
    pub async fn open(location: &Location, options: &RegistryOptions) -> Result<Self, Error> {
        match location {
            Location::Layout { path, tag } => {
                let path = path.clone();
                let layout = blocking(move || Layout::for_writing(path)).await?;
                Ok(Destination::Layout {
                    layout,
                    tag: tag.clone(),
                    listed: true,
                })
            }
            Location::DockerArchive { .. } => Err(crate::reference::read_only(location)),
            Location::Registry(reference) => Ok(Destination::Registry {
                client: Arc::new(Client::new(reference.api_host(), options).await?),
                reference: reference.clone(),
            }),
        }
    }

    /// Opens `location` to receive an image by digest only: a registry
    /// reference loses its tag, a layout gets the blobs but no entry in
    /// `index.json`. Whoever publishes writes the tag later, once
    /// everything else has succeeded.
    pub async fn open_untagged(
        location: &Location,
        options: &RegistryOptions,
    ) -> Result<Self, Error> {
        match Self::open(location, options).await? {
            Destination::Layout { layout, .. } => Ok(Destination::Layout {
                layout,
                tag: None,
                listed: false,
            }),
            Destination::Registry { client, reference } => Ok(Destination::Registry {
                client,
                reference: reference.untagged(),
            }),
        }
    }

    /// Whether the destination already holds the manifest `digest` and so,
    /// by the registry's own checks on push, everything it refers to.
    async fn has_whole_image(&self, digest: &Digest) -> Result<bool, Error> {
        match self {
            // A layout checks nothing when a manifest is written.
            Destination::Layout { .. } => Ok(false),
            Destination::Registry { client, reference } => {
                client
                    .has_manifest(reference.repository(), digest.as_ref())
                    .await
            }
        }
    }

    async fn has_blob(&self, digest: &Digest) -> Result<bool, Error> {
        match self {
            Destination::Layout { layout, .. } => Ok(layout.has_blob(digest)),
            Destination::Registry { client, reference } => {
                client.has_blob(reference.repository(), digest).await
            }
        }
    }

    async fn put_blob(
        &self,
        source: &Source,
        descriptor: &Descriptor,
        started: Option<url::Url>,
        progress: &Arc<dyn Progress>,
    ) -> Result<(), Error> {
        let digest = descriptor.digest().clone();
        let open = || {
            progress.blob_started(descriptor);
            let progress = progress.clone();
            let digest = digest.clone();
            stream::counted(source.open_blob(descriptor), move |n| {
                progress.blob_bytes(&digest, n)
            })
        };
        match self {
            Destination::Registry { client, reference } => {
                client
                    .upload_blob(reference.repository(), descriptor, started, open)
                    .await
            }
            Destination::Layout { layout, .. } => write_to_layout(layout, &digest, open()).await,
        }
    }

    /// Stores a manifest; `tag` only for the top-level one.
    async fn put_manifest(
        &self,
        descriptor: &Descriptor,
        bytes: &Bytes,
        top: bool,
    ) -> Result<(), Error> {
        match self {
            Destination::Layout {
                layout,
                tag,
                listed,
            } => {
                let (layout, descriptor, bytes, tag, listed) = (
                    layout.clone(),
                    descriptor.clone(),
                    bytes.clone(),
                    tag.clone(),
                    *listed,
                );
                blocking(move || {
                    if !layout.has_blob(descriptor.digest()) {
                        layout.write_blob(&descriptor, bytes.as_ref())?;
                    }
                    if top && listed {
                        let mut listed = descriptor.clone();
                        listed.set_annotations(None);
                        layout.add_manifest(&listed, tag.as_deref())?;
                    }
                    Ok(())
                })
                .await
            }
            Destination::Registry { client, reference } => {
                let target = match (top, reference.tag()) {
                    (true, Some(tag)) => tag.to_owned(),
                    _ => descriptor.digest().to_string(),
                };
                client
                    .put_manifest(reference.repository(), &target, descriptor, bytes)
                    .await
                    .map(|_| ())
            }
        }
    }

    fn pinned(&self, digest: &Digest) -> String {
        match self {
            Destination::Layout {
                layout,
                tag: Some(tag),
                ..
            } => format!("oci:{}:{tag}@{digest}", layout.root().display()),
            Destination::Layout {
                layout, tag: None, ..
            } => {
                format!("oci:{}@{digest}", layout.root().display())
            }
            Destination::Registry { reference, .. } => {
                let mut pinned = reference.clone();
                if pinned.tag().is_none() && pinned.digest().is_none() {
                    return format!(
                        "{}/{}@{digest}",
                        reference.registry(),
                        reference.repository()
                    );
                }
                pinned = pinned.with_digest(digest.clone());
                pinned.to_string()
            }
        }
    }
}

/// The blobs to upload, each with an upload already started by a failed
/// mount; blobs the destination has or could mount are counted in
/// `report`. A blob neither the destination nor the source has is an error
/// before a single byte is uploaded.
async fn plan_transfers(
    source: &Source,
    destination: &Destination,
    options: &CopyOptions,
    blobs: Vec<Descriptor>,
    report: &mut CopyReport,
) -> Result<Vec<(Descriptor, Option<url::Url>)>, Error> {
    let jobs = options.jobs.max(1);
    // The futures are made before they are polled, which keeps this whole
    // future `Send` (a lazily mapping stream trips rustc's HRTB inference).
    let checks: Vec<_> = blobs
        .iter()
        .map(|b| destination.has_blob(b.digest()))
        .collect();
    let present: Vec<bool> = futures_util::stream::iter(checks)
        .buffered(jobs)
        .try_collect()
        .await?;
    let mut needed = Vec::new();
    for (blob, present) in blobs.into_iter().zip(present) {
        if present {
            report.blobs_present += 1;
            options
                .progress
                .blob_finished(blob.digest(), BlobOutcome::Present);
        } else {
            needed.push(blob);
        }
    }
    let mount_from = mount_candidates(source, destination, &options.mount_from);
    let mounts: Vec<_> = needed
        .iter()
        .map(|blob| try_mount(destination, &mount_from, blob.digest()))
        .collect();
    let plans: Vec<Plan> = futures_util::stream::iter(mounts)
        .buffered(jobs)
        .try_collect()
        .await?;
    let mut transfers = Vec::new();
    let mut missing = Vec::new();
    for (blob, plan) in needed.into_iter().zip(plans) {
        match plan {
            Plan::Mounted => {
                report.blobs_mounted += 1;
                options
                    .progress
                    .blob_finished(blob.digest(), BlobOutcome::Mounted);
            }
            Plan::Transfer(started) if source.has_blob(blob.digest()) => {
                transfers.push((blob, started))
            }
            Plan::Transfer(_) => missing.push(blob.digest().clone()),
        }
    }
    if !missing.is_empty() {
        return Err(Error::BlobsMissing {
            location: source.describe(),
            digests: missing,
        });
    }
    Ok(transfers)
}

/// Copies the image at `source` to `destination`.
pub async fn copy(
    source: &Source,
    destination: &Destination,
    options: &CopyOptions,
) -> Result<CopyReport, Error> {
    let (root, root_bytes) = source.root().await?;
    if let Destination::Layout { layout, .. } = destination {
        // Created only now, so a source that cannot be read leaves nothing behind.
        let layout = layout.clone();
        blocking(move || layout.create_if_missing()).await?;
    }
    if let Destination::Registry { reference, .. } = destination
        && let Some(pinned) = reference.digest()
        && pinned != root.digest()
    {
        return Err(Error::Unsupported(format!(
            "the destination is pinned to `{pinned}`, but the image is `{}`",
            root.digest()
        )));
    }
    let mut manifests = Vec::new();
    let mut blobs = Vec::new();
    collect(
        source,
        destination,
        root.clone(),
        root_bytes,
        &mut manifests,
        &mut blobs,
        &mut HashSet::new(),
    )
    .await?;

    let mut report = CopyReport {
        descriptor: root.clone(),
        pinned: destination.pinned(root.digest()),
        blobs_copied: 0,
        blobs_present: 0,
        blobs_mounted: 0,
        bytes_copied: 0,
    };

    // A registry that holds this very manifest validated, when it accepted
    // it, that every blob and child manifest it names is there: only the
    // tag may be missing. One request instead of one per blob.
    if destination.has_whole_image(root.digest()).await? {
        report.blobs_present = blobs.len();
        let (descriptor, bytes) = manifests
            .last()
            .expect("the root manifest is collected last");
        destination.put_manifest(descriptor, bytes, true).await?;
        return Ok(report);
    }

    let transfers = plan_transfers(source, destination, options, blobs, &mut report).await?;
    let jobs = options.jobs.max(1);
    let uploads: Vec<_> = transfers
        .into_iter()
        .map(|(blob, started)| async move {
            destination
                .put_blob(source, &blob, started, &options.progress)
                .await?;
            options
                .progress
                .blob_finished(blob.digest(), BlobOutcome::Copied);
            Ok::<u64, Error>(blob.size())
        })
        .collect();
    let outcomes: Vec<u64> = futures_util::stream::iter(uploads)
        .buffer_unordered(jobs)
        .try_collect()
        .await?;
    report.blobs_copied = outcomes.len();
    report.bytes_copied = outcomes.iter().sum();

    let count = manifests.len();
    for (i, (descriptor, bytes)) in manifests.iter().enumerate() {
        destination
            .put_manifest(descriptor, bytes, i + 1 == count)
            .await?;
    }
    Ok(report)
}

/// What to do about a blob the destination lacks.
enum Plan {
    /// The registry mounted it from another repository.
    Mounted,
    /// Transfer it, into the upload a refused mount opened, if any.
    Transfer(Option<url::Url>),
}

/// Tries to mount a blob from each candidate repository in turn.
async fn try_mount(
    destination: &Destination,
    candidates: &[String],
    digest: &Digest,
) -> Result<Plan, Error> {
    let Destination::Registry { client, reference } = destination else {
        return Ok(Plan::Transfer(None));
    };
    let mut started = None;
    for from in candidates {
        match client
            .mount_blob(reference.repository(), from, digest)
            .await
        {
            Ok(Mount::Mounted) => return Ok(Plan::Mounted),
            Ok(Mount::Upload(url)) => started = Some(url),
            Err(err) if err.is_transient() => return Err(err),
            // A refusal (no access to `from`, say) just means uploading.
            Err(err) => tracing::debug!(%err, "mount refused"),
        }
    }
    Ok(Plan::Transfer(started))
}

/// Repositories a registry destination may mount blobs from: those named,
/// plus the source repository when it is on the same registry.
fn mount_candidates(source: &Source, destination: &Destination, named: &[String]) -> Vec<String> {
    let Destination::Registry { reference: to, .. } = destination else {
        return Vec::new();
    };
    let mut candidates: Vec<String> = named
        .iter()
        .filter(|r| *r != to.repository())
        .cloned()
        .collect();
    if let Source::Registry {
        reference: from, ..
    } = source
        && from.registry() == to.registry()
        && from.repository() != to.repository()
        && !candidates.contains(&from.repository().to_owned())
    {
        candidates.push(from.repository().to_owned());
    }
    candidates
}

/// Walks the manifest tree: manifests in storing order (children first) and
/// each distinct blob once. An index's child the destination already holds
/// whole is neither read nor sent (the source need not have it: a builder
/// may list images an earlier build published).
async fn collect(
    source: &Source,
    destination: &Destination,
    descriptor: Descriptor,
    bytes: Bytes,
    manifests: &mut Vec<(Descriptor, Bytes)>,
    blobs: &mut Vec<Descriptor>,
    seen: &mut HashSet<Digest>,
) -> Result<(), Error> {
    let media_type = descriptor.media_type().to_string();
    let parse_error = |what: &str, e: serde_json::Error| Error::Protocol {
        host: source.describe(),
        action: format!("reading {what} `{}`", descriptor.digest()),
        detail: e.to_string(),
    };
    if is_index(&media_type) {
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| parse_error("index", e))?;
        for child in index.manifests() {
            if !seen.insert(child.digest().clone()) {
                continue;
            }
            if destination.has_whole_image(child.digest()).await? {
                continue;
            }
            let child_bytes = source.manifest(child).await?;
            Box::pin(collect(
                source,
                destination,
                child.clone(),
                child_bytes,
                manifests,
                blobs,
                seen,
            ))
            .await?;
        }
    } else if media_type == "application/vnd.docker.distribution.manifest.v1+json"
        || media_type == "application/vnd.docker.distribution.manifest.v1+prettyjws"
    {
        return Err(Error::Unsupported(format!(
            "`{}` is a Docker schema 1 manifest, which custody does not copy",
            descriptor.digest()
        )));
    } else {
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| parse_error("manifest", e))?;
        for blob in std::iter::once(manifest.config()).chain(manifest.layers().iter()) {
            // Foreign layers live elsewhere by design; registries do not store them.
            if blob.urls().as_ref().is_some_and(|u| !u.is_empty()) && is_foreign(blob.media_type())
            {
                continue;
            }
            if seen.insert(blob.digest().clone()) {
                blobs.push(blob.clone());
            }
        }
    }
    manifests.push((descriptor, bytes));
    Ok(())
}

fn is_index(media_type: &str) -> bool {
    media_type == MediaType::ImageIndex.to_string()
        || media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn is_foreign(media_type: &MediaType) -> bool {
    media_type.to_string().contains("foreign")
}

async fn write_to_layout(
    layout: &Layout,
    digest: &Digest,
    mut body: BlobStream,
) -> Result<(), Error> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let writer = {
        let layout = layout.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(
            move || -> Result<Option<crate::layout::BlobWriter>, Error> {
                let mut writer = layout.blob_writer(&digest)?;
                while let Some(chunk) = rx.blocking_recv() {
                    writer.write_all(&chunk)?;
                }
                Ok(Some(writer))
            },
        )
    };
    let mut failure = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => {
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    drop(tx);
    let writer = writer.await.expect("the layout writer does not panic")?;
    if let Some(err) = failure {
        return Err(err); // the temporary file is dropped, never committed
    }
    // The stream verified the bytes before it ended.
    match writer {
        Some(writer) => blocking(move || writer.commit()).await,
        None => Ok(()),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking work does not panic")
}
