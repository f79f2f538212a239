//! The gateway: a registry endpoint build steps push to, so that builders
//! that push images themselves (skopeo, crane, buildah, ko…) never hold a
//! credential and what they pushed is seen by the platform, not reported
//! by them.
//!
//! The gateway speaks the OCI distribution API over plain HTTP on a
//! listener it is given, accepts pushes only to the repositories the
//! build declared, verifies every blob and manifest against its digest
//! while it streams, stores them in an OCI layout under a byte limit, and
//! records what was pushed ([`Pushed`]) for the platform to push onward
//! once every step has succeeded. Repositories declared for pulls are
//! read-only: their manifests and blobs come from the real registry through
//! an [`Upstream`] the platform passes in (holding the credentials the step
//! never sees), and every manifest digest served is recorded ([`Pulled`]).
//!
//! ```ignore
//! let gateway = Gateway::new(Config::new(job_dir.join("pushed"), ["app".parse()?], 8 << 30))?;
//! gateway.serve(listener, stop).await?;
//! for (repository, pushed) in gateway.pushed().repositories { … }
//! ```
//!
//! # Layout
//! - [`name`]: repository names, tags and references, parsed at the edge.
//! - `http` (private): the endpoints, the refusals, and the serving loop.
//! - `store` (private): the layout on disk, upload sessions, the budget.
//! - `manifest` (private): what a pushed manifest is and names.
//! - [`pushed`]: the records the caller reads afterwards.
//! - [`error`]: [`Error`] for the caller, [`Refusal`] for the step's client.

#![forbid(unsafe_code)]

pub mod error;
mod http;
mod manifest;
pub mod name;
pub mod pushed;
mod store;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use custody_oci::Digest;
use futures_util::Stream;
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;

pub use error::{Code, Error, Refusal};
pub use name::{Reference, Repository, Tag};
pub use pushed::{Pushed, PushedRepository};

/// A boxed error from a [`Destination`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where pushed repositories will go, asked whether it already holds a
/// blob: a manifest may then name the blob without the step uploading it,
/// and a `HEAD` of it answers 200 so builders skip it (the onward push is
/// sparse). The runner answers from the real destination registry with the
/// platform's credentials; the step never learns more than "present".
pub trait Destination: Send + Sync {
    /// The size of `digest` if the destination of `repository` holds it.
    fn blob_size<'a>(
        &'a self,
        repository: &'a Repository,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<u64>, BoxError>>;

    /// Whether the destination of `repository` holds the manifest
    /// `digest` (and so, by its registry's checks when it took it,
    /// everything that manifest names): an index may then list it without
    /// the step pushing it. The default holds none.
    fn has_manifest<'a>(
        &'a self,
        _repository: &'a Repository,
        _digest: &'a Digest,
    ) -> BoxFuture<'a, Result<bool, BoxError>> {
        Box::pin(async { Ok(false) })
    }

    /// Opens an upload session at the destination of `repository`, which
    /// the bytes of a step's upload stream to while the gateway stores
    /// them, so the onward push overlaps the step. The session is only
    /// ever completed by [`Gateway::complete_onward`], which the platform
    /// calls once every step has succeeded; until then the destination
    /// holds no blob. `None`: nothing is streamed (the onward push sends
    /// the blob afterwards).
    fn open_upload<'a>(
        &'a self,
        _repository: &'a Repository,
    ) -> BoxFuture<'a, Result<Option<Box<dyn OnwardUpload>>, BoxError>> {
        Box::pin(async { Ok(None) })
    }
}

/// An upload session open at a destination (see
/// [`Destination::open_upload`]): appended to as the step's bytes arrive,
/// then completed or cancelled, never both.
pub trait OnwardUpload: Send + Sync {
    /// Streams `body` into the session, which stays open.
    fn append(&mut self, body: BlobBody) -> BoxFuture<'_, Result<(), BoxError>>;

    /// Makes the session's bytes the blob `digest` at the destination.
    fn complete(self: Box<Self>, digest: Digest) -> BoxFuture<'static, Result<(), BoxError>>;

    /// Ends the session; the destination keeps nothing of it.
    fn cancel(self: Box<Self>) -> BoxFuture<'static, Result<(), BoxError>>;
}

/// A destination that holds nothing: every blob a manifest names must be
/// pushed through the gateway.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDestination;

impl Destination for NoDestination {
    fn blob_size<'a>(
        &'a self,
        _repository: &'a Repository,
        _digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<u64>, BoxError>> {
        Box::pin(async { Ok(None) })
    }
}

/// Where pull repositories are read from: the real registry, asked with
/// the platform's credentials. `None` is "not there" (404 to the step).
pub trait Upstream: Send + Sync {
    /// Manifest `reference` of pull repository `repository`; a digest
    /// reference must come back with those very bytes.
    fn manifest<'a>(
        &'a self,
        repository: &'a Repository,
        reference: &'a Reference,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, BoxError>>;

    /// The size of blob `digest` in `repository`, if it is there.
    fn blob_size<'a>(
        &'a self,
        repository: &'a Repository,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<u64>, BoxError>>;

    /// Blob `digest` of `size` bytes, its bytes checked against both
    /// while they stream.
    fn blob<'a>(
        &'a self,
        repository: &'a Repository,
        digest: &'a Digest,
        size: u64,
    ) -> BoxFuture<'a, Result<BlobBody, BoxError>>;
}

/// A blob's bytes as they stream from an [`Upstream`].
pub type BlobBody = Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>;

/// A manifest read from an [`Upstream`].
#[derive(Clone, Debug)]
pub struct UpstreamManifest {
    pub media_type: String,
    /// The digest of `bytes`.
    pub digest: Digest,
    pub bytes: Bytes,
}

/// No upstream: a gateway without pull repositories.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoUpstream;

impl Upstream for NoUpstream {
    fn manifest<'a>(
        &'a self,
        _repository: &'a Repository,
        _reference: &'a Reference,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, BoxError>> {
        Box::pin(async { Ok(None) })
    }

    fn blob_size<'a>(
        &'a self,
        _repository: &'a Repository,
        _digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<u64>, BoxError>> {
        Box::pin(async { Ok(None) })
    }

    fn blob<'a>(
        &'a self,
        _repository: &'a Repository,
        digest: &'a Digest,
        _size: u64,
    ) -> BoxFuture<'a, Result<BlobBody, BoxError>> {
        Box::pin(async move { Err(format!("no upstream holds `{digest}`").into()) })
    }
}

/// A manifest a step read from a pull repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    pub repository: Repository,
    pub digest: Digest,
}

/// What a gateway serves and where it keeps it.
pub struct Config {
    /// A new or empty directory; the gateway makes it an OCI layout and
    /// keeps every blob and manifest there. It must not be reachable by
    /// steps.
    pub storage: PathBuf,
    /// The repositories steps may push to (the spec's `pushes` names).
    pub repositories: BTreeSet<Repository>,
    /// Bytes everything stored and being uploaded may take together.
    pub limit: u64,
    /// Asked about blobs the gateway does not hold.
    pub destination: Arc<dyn Destination>,
    /// The repositories steps may read from (the spec's `pulls` names),
    /// read-only, served from `upstream`.
    pub pulls: BTreeSet<Repository>,
    pub upstream: Arc<dyn Upstream>,
}

impl Config {
    pub fn new(
        storage: impl Into<PathBuf>,
        repositories: impl IntoIterator<Item = Repository>,
        limit: u64,
    ) -> Self {
        Self {
            storage: storage.into(),
            repositories: repositories.into_iter().collect(),
            limit,
            destination: Arc::new(NoDestination),
            pulls: BTreeSet::new(),
            upstream: Arc::new(NoUpstream),
        }
    }

    /// Read-only repositories `pulls`, served from `upstream`.
    pub fn with_pulls(
        mut self,
        pulls: impl IntoIterator<Item = Repository>,
        upstream: impl Upstream + 'static,
    ) -> Self {
        self.pulls = pulls.into_iter().collect();
        self.upstream = Arc::new(upstream);
        self
    }

    pub fn with_destination(mut self, destination: impl Destination + 'static) -> Self {
        self.destination = Arc::new(destination);
        self
    }
}

/// The registry endpoint. Upload sessions left open are discarded (their
/// files removed) when the gateway is dropped.
pub struct Gateway {
    shared: Arc<Shared>,
}

/// What every request handler shares.
pub(crate) struct Shared {
    store: store::Store,
    limit: u64,
    destination: Arc<dyn Destination>,
    pulls: BTreeSet<Repository>,
    upstream: Arc<dyn Upstream>,
    /// Every manifest served from a pull repository.
    pulled: Mutex<BTreeSet<(Repository, String)>>,
}

impl Shared {
    /// What the destination says of `digest`; a destination that cannot be
    /// asked holds nothing (the step then uploads it, or is refused naming it).
    async fn destination_size(&self, repository: &Repository, digest: &Digest) -> Option<u64> {
        match self.destination.blob_size(repository, digest).await {
            Ok(size) => size,
            Err(e) => {
                tracing::warn!(%repository, %digest, error = %e, "the destination could not be asked about a blob");
                None
            }
        }
    }
}

impl Shared {
    /// Whether the destination holds the manifest `digest`; one that
    /// cannot be asked holds none (the index naming it is refused).
    async fn destination_has_manifest(&self, repository: &Repository, digest: &Digest) -> bool {
        match self.destination.has_manifest(repository, digest).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(%repository, %digest, error = %e, "the destination could not be asked about a manifest");
                false
            }
        }
    }

    /// A new upload for `repository`, streaming to a session at its
    /// destination when the destination opens one.
    async fn new_upload(&self, repository: &Repository) -> Result<store::Upload, Refusal> {
        let mut upload = self.store.new_upload(repository)?;
        match self.destination.open_upload(repository).await {
            Ok(Some(onward)) => upload.stream_to(onward),
            Ok(None) => {}
            // Pushed onward from the gateway's copy after the last step.
            Err(e) => {
                tracing::warn!(%repository, error = %e, "no upload could be opened at the destination")
            }
        }
        Ok(upload)
    }
}

impl Gateway {
    /// Opens (creating it if missing) the storage directory as an OCI
    /// layout.
    pub fn new(config: Config) -> Result<Self, Error> {
        if config.repositories.is_empty() && config.pulls.is_empty() {
            return Err(Error::NoRepositories);
        }
        if let Some(both) = config.repositories.intersection(&config.pulls).next() {
            return Err(Error::PushAndPull(both.clone()));
        }
        let store = store::Store::open(&config.storage, config.repositories, config.limit)?;
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                limit: config.limit,
                destination: config.destination,
                pulls: config.pulls,
                upstream: config.upstream,
                pulled: Mutex::default(),
            }),
        })
    }

    /// Serves the distribution API on `listener` until `shutdown`
    /// resolves, then closes every connection. What was pushed stays
    /// readable with [`Gateway::pushed`]. A failed `accept` is logged and
    /// serving goes on: it is one client's, not the gateway's.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        http::serve(self.shared.clone(), listener, shutdown).await
    }

    /// What steps pushed so far.
    pub fn pushed(&self) -> Pushed {
        self.shared.store.pushed()
    }

    /// Every manifest steps read from pull repositories so far, each once.
    pub fn pulled(&self) -> Vec<Pulled> {
        let pulled = self.shared.pulled.lock().unwrap_or_else(|e| e.into_inner());
        pulled
            .iter()
            .filter_map(|(repository, digest)| {
                Some(Pulled {
                    repository: repository.clone(),
                    digest: custody_oci::digest::parse(digest).ok()?,
                })
            })
            .collect()
    }

    /// Bytes stored and being uploaded, counted against the limit.
    pub fn bytes_used(&self) -> u64 {
        self.shared.store.bytes_stored()
    }

    /// The layout the gateway writes.
    pub fn storage(&self) -> &std::path::Path {
        self.shared.store.root()
    }

    /// Completes the destination session of every blob steps uploaded
    /// whole and verified (see [`Destination::open_upload`]), all at once;
    /// each blob with how that went. Call it only once every step has
    /// succeeded: from here on the destination holds these blobs. A blob
    /// whose session failed is simply absent there, and an onward push
    /// sends it as it would have without streaming.
    pub async fn complete_onward(&self) -> Vec<(Repository, Digest, Result<(), BoxError>)> {
        let pending = self.shared.store.take_onward();
        futures_util::future::join_all(pending.into_iter().map(
            |(repository, digest, onward)| async move {
                let result = onward.complete(digest.clone()).await;
                (repository, digest, result)
            },
        ))
        .await
    }

    /// Cancels every destination session not completed: of blobs waiting
    /// for [`Gateway::complete_onward`] and of uploads still open. For a
    /// build that failed (nothing may reach a destination) and, after the
    /// onward push, for what is left. Failures are logged: an upload never
    /// completed is no blob at the destination either way.
    pub async fn cancel_onward(&self) {
        let sessions = self.shared.store.take_all_onward();
        futures_util::future::join_all(sessions.into_iter().map(|onward| async move {
            if let Err(e) = onward.cancel().await {
                tracing::warn!(error = %e, "cancelling a destination upload failed");
            }
        }))
        .await;
    }
}
