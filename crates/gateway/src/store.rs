//! What the gateway holds: blobs and manifests in an OCI layout on disk,
//! what each repository was given, the open upload sessions, and the byte
//! budget all of it is counted against.
//!
//! Every file is reached through the layout's directory handle
//! ([`custody_oci::beneath`]): a step can write the job's disk, so nothing
//! here follows a symlink, uploads go to temporary files created `O_EXCL`
//! under fresh names, and a blob appears under its digest only by a rename
//! once its bytes hashed to that digest. A temporary file is removed when
//! its upload is dropped: refused, abandoned, or left open when the gateway
//! goes away.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use custody_oci::Digest;
use custody_oci::beneath::{Dir, TempFile};
use custody_oci::digest::{DigestAlgorithm, Hasher};
use custody_oci::layout::Layout;
use custody_oci::oci_spec::image::{Descriptor, MediaType};
use futures_util::{Stream, StreamExt};
use uuid::Uuid;

use crate::error::{Code, Error, Refusal};
use crate::manifest::Manifest;
use crate::name::{Repository, Tag};
use crate::pushed::{Pushed, PushedRepository};
use crate::{BlobBody, OnwardUpload};

/// Upload sessions open at once, at most: builders upload a handful of
/// blobs in parallel, and every session holds a file descriptor.
pub(crate) const MAX_SESSIONS: usize = 128;

/// The gateway's storage and bookkeeping, shared by every request.
pub(crate) struct Store {
    /// The layout's root, for messages.
    root: PathBuf,
    layout: Layout,
    /// `blobs/sha256` of the layout: uploads are written beside their
    /// final names, so the rename that commits them stays in one directory.
    blobs: Dir,
    budget: Arc<Budget>,
    declared: BTreeSet<Repository>,
    state: Mutex<State>,
    /// Held while a finished upload is renamed into place, so two uploads
    /// of the same blob are counted once.
    commit: Arc<Mutex<()>>,
}

#[derive(Default)]
struct State {
    /// Everything held, blobs and manifests, with its size.
    held: HashMap<Digest, u64>,
    repositories: BTreeMap<Repository, Repo>,
    sessions: HashMap<Uuid, Slot>,
    /// Destination sessions of blobs uploaded whole and verified, waiting
    /// to be completed once every step has succeeded (or cancelled).
    pending: HashMap<(Repository, Digest), Onward>,
}

/// What one repository was given.
#[derive(Default)]
struct Repo {
    /// Blobs uploaded to or mounted into it.
    blobs: HashSet<Digest>,
    manifests: HashMap<Digest, ManifestRecord>,
    tags: BTreeMap<Tag, Digest>,
}

struct ManifestRecord {
    media_type: String,
    size: u64,
    /// Put by digest (`PUT /manifests/sha256:…`) at least once.
    by_digest: bool,
    /// The manifests it lists, for an index.
    children: Vec<Digest>,
    /// The blobs it names (config and layers), for an image manifest.
    blobs: Vec<Digest>,
}

impl Repo {
    /// The blobs the manifests it would push onward name: those of every
    /// tagged or by-digest manifest and of the manifests they list.
    fn referenced_blobs(&self) -> HashSet<&Digest> {
        let mut stack: Vec<&Digest> = self.tags.values().collect();
        stack.extend(
            self.manifests
                .iter()
                .filter(|(_, record)| record.by_digest)
                .map(|(digest, _)| digest),
        );
        let mut seen = HashSet::new();
        let mut blobs = HashSet::new();
        while let Some(digest) = stack.pop() {
            if !seen.insert(digest) {
                continue;
            }
            if let Some(record) = self.manifests.get(digest) {
                blobs.extend(record.blobs.iter());
                stack.extend(record.children.iter());
            }
        }
        blobs
    }
}

enum Slot {
    Idle(Box<Upload>),
    /// A request is writing to it; a second one at the same time is refused.
    Busy,
}

/// The byte budget: everything stored and everything being uploaded.
struct Budget {
    limit: u64,
    used: AtomicU64,
}

impl Budget {
    fn reserve(self: &Arc<Self>, charge: &mut Charge, bytes: u64) -> Result<(), Refusal> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .map_err(|_| Refusal::over_limit(self.limit))?;
        charge.bytes += bytes;
        Ok(())
    }
}

/// Bytes reserved in the budget; given back when dropped unless kept.
struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Charge {
    fn new(budget: &Arc<Budget>) -> Self {
        Self {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// The bytes stay counted: what they paid for is stored.
    fn keep(mut self) {
        self.bytes = 0;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// An upload in progress: a temporary file, the hash of what it holds so
/// far, the budget it has taken, and the destination session its bytes
/// also stream to, if any.
pub(crate) struct Upload {
    repository: Repository,
    file: TempFile,
    hasher: Hasher,
    written: u64,
    charge: Charge,
    onward: Option<Onward>,
}

impl Upload {
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Streams what this upload receives from now on to `onward` too.
    pub(crate) fn stream_to(&mut self, onward: Box<dyn OnwardUpload>) {
        self.onward = Some(Onward(Some(onward)));
    }
}

/// A destination session; cancelled when dropped (a refused, broken or
/// abandoned upload leaves nothing at the destination) unless taken out to
/// be completed or cancelled and awaited.
struct Onward(Option<Box<dyn OnwardUpload>>);

impl Onward {
    fn take(mut self) -> Box<dyn OnwardUpload> {
        self.0.take().expect("an onward session is taken once")
    }
}

impl Drop for Onward {
    fn drop(&mut self) {
        let Some(onward) = self.0.take() else { return };
        // Dropped outside a runtime (the process ending), the session is
        // left to the registry's expiry of unfinished uploads: never
        // completed, it is no blob there.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = onward.cancel().await {
                    tracing::warn!(error = %e, "cancelling a destination upload failed");
                }
            });
        }
    }
}

/// How long the gateway waits for a destination to take the next piece of
/// a streamed upload before it gives up streaming that upload (it is then
/// pushed onward from the gateway's copy after the last step).
const ONWARD_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// About how many bytes of an upload go to the disk writer and the
/// destination at once.
const BATCH: usize = 256 * 1024;

/// An upload session taken out of the table by the request working on it.
/// Dropped without [`Store::put_back`], the session ends: its temporary file
/// is removed and its budget given back.
pub(crate) struct Taken<'a> {
    store: &'a Store,
    id: Uuid,
    pub(crate) upload: Option<Upload>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut state = self.store.lock();
        if matches!(state.sessions.get(&self.id), Some(Slot::Busy)) {
            state.sessions.remove(&self.id);
        }
    }
}

/// A manifest as the gateway holds it.
pub(crate) struct HeldManifest {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

impl Store {
    pub(crate) fn open(
        root: &Path,
        declared: BTreeSet<Repository>,
        limit: u64,
    ) -> Result<Self, Error> {
        let storage = |source| Error::Storage {
            path: root.to_owned(),
            source,
        };
        if let Ok(existing) = Dir::open(root)
            && !existing.entries().map_err(storage)?.is_empty()
        {
            return Err(Error::StorageNotEmpty {
                path: root.to_owned(),
            });
        }
        let layout = Layout::for_writing(root).map_err(storage)?;
        layout.create_if_missing().map_err(storage)?;
        let blobs = Dir::open(root)
            .and_then(|dir| dir.create_dir_all(Path::new("blobs/sha256")))
            .map_err(storage)?;
        Ok(Self {
            root: root.to_owned(),
            layout,
            blobs,
            budget: Arc::new(Budget {
                limit,
                used: AtomicU64::new(0),
            }),
            declared,
            state: Mutex::default(),
            commit: Arc::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere left the tables as they were between two
        // consistent updates; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn declared(&self) -> &BTreeSet<Repository> {
        &self.declared
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn bytes_stored(&self) -> u64 {
        self.budget.used.load(Ordering::SeqCst)
    }

    // --- blobs ---

    /// The size of `digest` if `repository` holds it.
    pub(crate) fn blob_size(&self, repository: &Repository, digest: &Digest) -> Option<u64> {
        let state = self.lock();
        let repo = state.repositories.get(repository)?;
        if repo.blobs.contains(digest) || repo.manifests.contains_key(digest) {
            state.held.get(digest).copied()
        } else {
            None
        }
    }

    /// The bytes of a held blob, verified while they stream.
    pub(crate) fn read_blob(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
    ) -> custody_oci::stream::BlobStream {
        let layout = self.layout.clone();
        let wanted = digest.clone();
        custody_oci::stream::from_file(
            move || layout.open_blob(&wanted).map(Arc::new),
            None,
            Descriptor::new(MediaType::from(media_type), size, digest.clone()),
        )
    }

    /// Links a blob `from` holds into `to` (a cross-repository mount);
    /// false when `from` does not hold it.
    pub(crate) fn mount(&self, to: &Repository, from: &Repository, digest: &Digest) -> bool {
        let mut state = self.lock();
        let held = state
            .repositories
            .get(from)
            .is_some_and(|repo| repo.blobs.contains(digest));
        if held {
            state
                .repositories
                .entry(to.clone())
                .or_default()
                .blobs
                .insert(digest.clone());
        }
        held
    }

    // --- upload sessions ---

    /// A new, empty upload for `repository`.
    pub(crate) fn new_upload(&self, repository: &Repository) -> Result<Upload, Refusal> {
        let file = self
            .blobs
            .create_temp(".upload-")
            .map_err(Refusal::internal)?;
        Ok(Upload {
            repository: repository.clone(),
            file,
            hasher: Hasher::new(&DigestAlgorithm::Sha256).expect("sha256 is supported"),
            written: 0,
            charge: Charge::new(&self.budget),
            onward: None,
        })
    }

    /// Starts a session: the upload waits in the table under a fresh id.
    /// Each holds an open file, so a step may not hold more than
    /// [`MAX_SESSIONS`] at once (abandoned ones count until the gateway goes).
    pub(crate) fn open_session(&self, upload: Upload) -> Result<Uuid, Refusal> {
        let mut state = self.lock();
        if state.sessions.len() >= MAX_SESSIONS {
            return Err(Refusal::new(
                Code::TooManyRequests,
                format!(
                    "{MAX_SESSIONS} uploads are in progress, the most the gateway keeps open; finish some first"
                ),
            ));
        }
        let id = Uuid::now_v7();
        state.sessions.insert(id, Slot::Idle(Box::new(upload)));
        Ok(id)
    }

    /// Takes the session `id` of `repository` for one request.
    pub(crate) fn take(&self, repository: &Repository, id: &str) -> Result<Taken<'_>, Refusal> {
        let unknown = || {
            Refusal::new(
                Code::BlobUploadUnknown,
                format!(
                    "no upload `{id}` in progress for `{repository}`; start one with POST /v2/{repository}/blobs/uploads/"
                ),
            )
        };
        let id: Uuid = id.parse().map_err(|_| unknown())?;
        let mut state = self.lock();
        match state.sessions.get_mut(&id) {
            Some(slot @ Slot::Idle(_)) => {
                let Slot::Idle(upload) = std::mem::replace(slot, Slot::Busy) else {
                    unreachable!("matched as idle")
                };
                if &upload.repository != repository {
                    *slot = Slot::Idle(upload);
                    return Err(unknown());
                }
                Ok(Taken {
                    store: self,
                    id,
                    upload: Some(*upload),
                })
            }
            Some(Slot::Busy) => Err(Refusal::new(
                Code::BlobUploadInvalid,
                format!("upload `{id}` is already receiving data in another request"),
            )),
            None => Err(unknown()),
        }
    }

    /// Returns a taken session to the table for the client's next request.
    pub(crate) fn put_back(&self, mut taken: Taken<'_>) {
        let upload = taken
            .upload
            .take()
            .expect("a taken session holds its upload");
        self.lock()
            .sessions
            .insert(taken.id, Slot::Idle(Box::new(upload)));
    }

    /// Appends `body` to `upload`, hashing and writing on a blocking thread
    /// while the body streams, each piece counted against the budget first.
    /// On a refusal the upload is gone (its file removed, its bytes given
    /// back); on success it is returned, longer.
    pub(crate) async fn append<S, E>(&self, upload: Upload, body: S) -> Result<Upload, Refusal>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let mut upload = upload;
        // The destination gets each piece as the disk does: one streamed
        // request per request of the step's client. Pieces go to both in
        // batches of about [`BATCH`] bytes (clients send small ones: Go's
        // 32 KiB), so each thread wakes once per batch, not per piece.
        let mut onward = upload.onward.take().map(|onward| {
            let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(4);
            let task = tokio::spawn(async move {
                let mut onward = onward;
                let body: BlobBody = Box::pin(
                    tokio_stream::wrappers::ReceiverStream::new(rx)
                        .flat_map(futures_util::stream::iter)
                        .map(Ok::<_, crate::BoxError>),
                );
                let result = match onward.0.as_mut() {
                    Some(session) => session.append(body).await,
                    None => Ok(()),
                };
                (onward, result)
            });
            (Some(tx), task)
        });
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(4);
        let budget = self.budget.clone();
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(batch) = rx.blocking_recv() {
                let bytes: usize = batch.iter().map(Bytes::len).sum();
                budget.reserve(&mut upload.charge, bytes as u64)?;
                for piece in &batch {
                    upload.hasher.update(piece);
                }
                let pieces: Vec<&[u8]> = batch.iter().map(|p| &p[..]).collect();
                upload
                    .file
                    .write_all_vectored(&pieces)
                    .map_err(Refusal::internal)?;
                upload.written += bytes as u64;
            }
            Ok::<_, Refusal>(upload)
        });
        let mut body = std::pin::pin!(body);
        let mut broken = None;
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batched = 0;
        loop {
            let piece = body.next().await;
            let end = match &piece {
                None => true,
                Some(Ok(piece)) => {
                    batched += piece.len();
                    batch.push(piece.clone());
                    false
                }
                Some(Err(e)) => {
                    broken = Some(e.to_string());
                    break;
                }
            };
            let flush = batched >= BATCH || (end && batched > 0);
            if !flush {
                if end {
                    break;
                }
                continue;
            }
            let full = std::mem::take(&mut batch);
            batched = 0;
            if let Some((sender @ Some(_), task)) = &mut onward {
                let to = sender.as_ref().expect("matched as some");
                let sent = tokio::time::timeout(ONWARD_STALL, to.send(full.clone())).await;
                match sent {
                    Ok(Ok(())) => {}
                    // The destination failed: its answer says why.
                    Ok(Err(_)) => *sender = None,
                    Err(_) => {
                        tracing::warn!(
                            "the destination stalled; the upload is pushed onward after the last step instead"
                        );
                        task.abort();
                        onward = None;
                    }
                }
            }
            if tx.send(full).await.is_err() || end {
                break; // the writer refused (its answer says why), or the end
            }
        }
        drop(tx);
        let written = writer.await;
        let onward = match onward {
            Some((sender, task)) => {
                drop(sender);
                match task.await {
                    Ok((onward, Ok(()))) => Some(onward),
                    Ok((_cancelled_on_drop, Err(e))) => {
                        tracing::warn!(error = %e, "streaming an upload to its destination failed; it is pushed onward after the last step instead");
                        None
                    }
                    Err(_) => None,
                }
            }
            None => None,
        };
        let mut upload =
            written.map_err(|e| Refusal::internal(format!("upload writer: {e}")))??;
        upload.onward = onward;
        match broken {
            // Part of the body came and part did not: what was written
            // cannot be trusted to be a prefix the client knows about.
            Some(e) => Err(Refusal::new(
                Code::BlobUploadInvalid,
                format!("the request body broke off: {e}"),
            )),
            None => Ok(upload),
        }
    }

    /// Ends `upload` as the blob `expected`: kept under its digest if its
    /// bytes hash to it, otherwise removed (DIGEST_INVALID).
    pub(crate) async fn finish(&self, upload: Upload, expected: &Digest) -> Result<u64, Refusal> {
        let Upload {
            repository,
            file,
            hasher,
            written,
            charge,
            onward,
        } = upload;
        let actual = hasher.finish();
        if &actual != expected {
            return Err(Refusal::new(
                Code::DigestInvalid,
                format!(
                    "the uploaded bytes hash to `{actual}`, not `{expected}`; nothing was kept"
                ),
            ));
        }
        self.commit_file(file, expected, charge).await?;
        let mut state = self.lock();
        state.held.insert(expected.clone(), written);
        if let Some(onward) = onward {
            // A second session for the same blob is not needed: dropped,
            // it is cancelled.
            state
                .pending
                .entry((repository.clone(), expected.clone()))
                .or_insert(onward);
        }
        state
            .repositories
            .entry(repository)
            .or_default()
            .blobs
            .insert(expected.clone());
        Ok(written)
    }

    /// Moves a verified temporary file to its digest's name, keeping its
    /// charge; when the blob is already there, the copy and its charge go.
    async fn commit_file(
        &self,
        file: TempFile,
        digest: &Digest,
        charge: Charge,
    ) -> Result<(), Refusal> {
        let name = digest.digest().to_owned();
        let exists = self.lock().held.contains_key(digest);
        if exists {
            return Ok(()); // `file` and `charge` drop: removed, given back
        }
        let blobs = self.blobs.clone();
        let commit = self.commit.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = commit.lock().unwrap_or_else(|e| e.into_inner());
            if blobs.is_file(Path::new(&name)) {
                return Ok(false);
            }
            file.persist(&name).map(|()| true)
        })
        .await
        .map_err(|e| Refusal::internal(format!("committing `{digest}`: {e}")))?
        .map_err(Refusal::internal)?;
        if result {
            charge.keep();
        }
        Ok(())
    }

    /// The destination sessions of verified blobs that a manifest to be
    /// pushed onward names, to be completed. The others stay pending, for
    /// [`Store::take_all_onward`] to cancel: a blob no pushed manifest
    /// names (data a step would slip into the destination beside the
    /// image) never exists there.
    pub(crate) fn take_onward(&self) -> Vec<(Repository, Digest, Box<dyn OnwardUpload>)> {
        let mut state = self.lock();
        let state = &mut *state;
        let referenced: HashMap<&Repository, HashSet<&Digest>> = state
            .repositories
            .iter()
            .map(|(name, repo)| (name, repo.referenced_blobs()))
            .collect();
        let named = |(repository, digest): &(Repository, Digest)| {
            referenced
                .get(repository)
                .is_some_and(|blobs| blobs.contains(digest))
        };
        let keys: Vec<(Repository, Digest)> =
            state.pending.keys().filter(|k| named(k)).cloned().collect();
        keys.into_iter()
            .filter_map(|key| {
                let onward = state.pending.remove(&key)?;
                let (repository, digest) = key;
                Some((repository, digest, onward.take()))
            })
            .collect()
    }

    /// Every destination session still open: of verified blobs and of
    /// uploads not finished.
    pub(crate) fn take_all_onward(&self) -> Vec<Box<dyn OnwardUpload>> {
        let mut state = self.lock();
        let mut sessions: Vec<_> = state.pending.drain().map(|(_, o)| o.take()).collect();
        for slot in state.sessions.values_mut() {
            if let Slot::Idle(upload) = slot
                && let Some(onward) = upload.onward.take()
            {
                sessions.push(onward.take());
            }
        }
        sessions
    }

    // --- manifests ---

    /// Keeps a manifest (already parsed and checked) put to `repository`.
    pub(crate) async fn put_manifest(
        &self,
        repository: &Repository,
        bytes: Bytes,
        digest: &Digest,
        manifest: Manifest,
        tag: Option<Tag>,
    ) -> Result<(), Refusal> {
        let mut charge = Charge::new(&self.budget);
        self.budget.reserve(&mut charge, bytes.len() as u64)?;
        let blobs = self.blobs.clone();
        let file = tokio::task::spawn_blocking(move || {
            let mut file = blobs.create_temp(".manifest-")?;
            file.write_all(&bytes)?;
            Ok::<_, custody_oci::Error>(file)
        })
        .await
        .map_err(|e| Refusal::internal(format!("writing manifest: {e}")))?
        .map_err(Refusal::internal)?;
        let size = charge.bytes;
        self.commit_file(file, digest, charge).await?;
        let mut state = self.lock();
        state.held.insert(digest.clone(), size);
        let repo = state.repositories.entry(repository.clone()).or_default();
        let record = repo
            .manifests
            .entry(digest.clone())
            .or_insert(ManifestRecord {
                media_type: manifest.media_type,
                size,
                by_digest: false,
                children: manifest.children,
                blobs: manifest.blobs,
            });
        match tag {
            Some(tag) => {
                repo.tags.insert(tag, digest.clone());
            }
            None => record.by_digest = true,
        }
        Ok(())
    }

    /// Which of `digests` `repository` does not hold: blobs for an image
    /// manifest, manifests for an index.
    pub(crate) fn missing(
        &self,
        repository: &Repository,
        blobs: &[Digest],
        manifests: &[Digest],
    ) -> Vec<Digest> {
        let state = self.lock();
        let repo = state.repositories.get(repository);
        let has_blob = |d: &Digest| repo.is_some_and(|r| r.blobs.contains(d));
        let has_manifest = |d: &Digest| repo.is_some_and(|r| r.manifests.contains_key(d));
        let mut missing: Vec<Digest> = blobs
            .iter()
            .filter(|d| !has_blob(d))
            .chain(manifests.iter().filter(|d| !has_manifest(d)))
            .cloned()
            .collect();
        missing.dedup();
        missing
    }

    /// The manifest `reference` names in `repository`.
    pub(crate) fn manifest(
        &self,
        repository: &Repository,
        reference: &crate::name::Reference,
    ) -> Option<HeldManifest> {
        let state = self.lock();
        let repo = state.repositories.get(repository)?;
        let digest = match reference {
            crate::name::Reference::Tag(tag) => repo.tags.get(tag)?,
            crate::name::Reference::Digest(digest) => digest,
        };
        let record = repo.manifests.get(digest)?;
        Some(HeldManifest {
            media_type: record.media_type.clone(),
            digest: digest.clone(),
            size: record.size,
        })
    }

    pub(crate) fn tags(&self, repository: &Repository) -> Vec<Tag> {
        self.lock()
            .repositories
            .get(repository)
            .map(|repo| repo.tags.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// What was pushed, as records.
    pub(crate) fn pushed(&self) -> Pushed {
        let state = self.lock();
        let mut repositories = BTreeMap::new();
        for (name, repo) in &state.repositories {
            let descriptor = |digest: &Digest| {
                let record = &repo.manifests[digest];
                Descriptor::new(
                    MediaType::from(record.media_type.as_str()),
                    record.size,
                    digest.clone(),
                )
            };
            let tags: BTreeMap<Tag, Descriptor> = repo
                .tags
                .iter()
                .map(|(tag, digest)| (tag.clone(), descriptor(digest)))
                .collect();
            let tagged: HashSet<&Digest> = repo.tags.values().collect();
            let listed: HashSet<&Digest> = repo
                .manifests
                .values()
                .flat_map(|record| record.children.iter())
                .collect();
            let mut by_digest: Vec<Descriptor> = repo
                .manifests
                .iter()
                .filter(|(digest, record)| {
                    record.by_digest && !tagged.contains(digest) && !listed.contains(digest)
                })
                .map(|(digest, _)| descriptor(digest))
                .collect();
            by_digest.sort_by_key(|d| d.digest().to_string());
            if tags.is_empty() && by_digest.is_empty() {
                continue; // blobs alone are nothing to push onward
            }
            repositories.insert(name.clone(), PushedRepository { tags, by_digest });
        }
        Pushed {
            layout: self.root.clone(),
            repositories,
        }
    }
}
