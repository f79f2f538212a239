//! The build's registry gateway (`custody_gateway`): when the spec declares
//! `pushes`, one gateway holds everything the build's steps push, on the
//! build's disk beside the job's other runner-only files, and is served on
//! each step's own loopback at [`PORT`] while the step runs. The step gets
//! `CUSTODY_REGISTRY` and no credential; what it pushed stays here until
//! every step succeeded, then goes out like an `images:` output (see
//! `push.rs`), each manifest credited to the step that pushed it.
//!
//! So that the onward push overlaps the step, each blob upload also
//! streams into an upload session at its destination ([`RegistryUpload`])
//! while the step sends it; the session is completed (the blob made to
//! exist there) only after every step succeeded
//! ([`BuildGateway::complete_onward`]) and cancelled otherwise
//! ([`BuildGateway::cancel_onward`]).
//!
//! The gateway asks each push's destination, with the job's registry
//! access, whether it already holds a blob ([`Destinations`]): a builder
//! then skips uploading it, and the onward push (sparse: the copy finds
//! it present) does not send it either.
//!
//! With `pulls`, the same gateway serves read-only repositories from their
//! registry repositories ([`Pulls`]), with the job's registry access; every
//! manifest a step read is reported after the last step.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use custody_gateway::{
    BlobBody, BoxError, Config, Destination, Gateway, OnwardUpload, Pulled, Pushed,
    Reference as GatewayReference, Repository, Tag, Upstream, UpstreamManifest,
};
use custody_oci::oci_spec::image::{Descriptor, MediaType};
use custody_oci::registry::{Client, RegistryOptions};
use custody_oci::{Digest, Reference};
use custody_wire::rpc::proto;
use futures_util::TryStreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use crate::netns::StepNetwork;

/// The port the gateway listens on inside every step's network namespace:
/// fixed, so builders may also be configured with it, and free because
/// the namespace is the step's own.
pub const PORT: u16 = 5000;

/// The gateway of one build and who pushed what to it.
pub(crate) struct BuildGateway {
    gateway: Arc<Gateway>,
    /// Each declared repository and where it goes after the last step.
    pushes: Vec<(Repository, String)>,
    credits: Mutex<Credits>,
}

/// What was pushed when the last step ended, and which step gave each
/// manifest its place (tag or digest) last.
#[derive(Default)]
struct Credits {
    /// Each place and the digest of the manifest there.
    seen: BTreeMap<Place, String>,
    steps: BTreeMap<(Place, String), String>,
}

/// Where a manifest sits in a repository: `(repository, TAG)` or, pushed by
/// digest alone, `(repository, @DIGEST)`.
type Place = (String, String);

fn place(repository: &Repository, tag: Option<&Tag>, digest: &Digest) -> Place {
    let at = match tag {
        Some(tag) => tag.to_string(),
        None => format!("@{digest}"),
    };
    (repository.to_string(), at)
}

/// A manifest a step pushed, ready to be pushed onward.
pub(crate) struct Onward {
    pub repository: Repository,
    pub tag: Option<Tag>,
    pub manifest: Descriptor,
    /// Where it goes (`host[:port]/path`), as the daemon resolved it.
    pub to: String,
    pub step: String,
}

impl BuildGateway {
    /// A gateway for `pushes` and `pulls`, keeping at most `limit` bytes
    /// in `storage` (a directory only the runner reaches), asking the
    /// registries with `registries` (the job's access). `None` without
    /// either.
    pub(crate) fn for_job(
        pushes: &[proto::GatewayPush],
        pulls: &[proto::GatewayPull],
        storage: &Path,
        limit: u64,
        registries: Arc<Registries>,
    ) -> Result<Option<Self>, String> {
        if pushes.is_empty() && pulls.is_empty() {
            return Ok(None);
        }
        let pushes = pushes
            .iter()
            .map(|p| {
                let name = p.name.parse::<Repository>().map_err(|e| e.to_string())?;
                Ok((name, p.to.clone()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let destinations = Destinations::new(&pushes, registries.clone())?;
        let pulls = Pulls::new(pulls, registries)?;
        let pull_names: Vec<Repository> = pulls.from.keys().cloned().collect();
        let config = Config::new(storage, pushes.iter().map(|(name, _)| name.clone()), limit)
            .with_destination(destinations)
            .with_pulls(pull_names, pulls);
        let gateway =
            Gateway::new(config).map_err(|e| format!("cannot set up the registry gateway: {e}"))?;
        Ok(Some(Self {
            gateway: Arc::new(gateway),
            pushes,
            credits: Mutex::new(Credits::default()),
        }))
    }

    /// Serves the gateway on the step's loopback until the returned handle
    /// is stopped; the step's environment is what points it there.
    pub(crate) fn serve_in(&self, network: &StepNetwork) -> std::io::Result<Serving> {
        let listener = tokio::net::TcpListener::from_std(network.listen_at(PORT)?)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let gateway = self.gateway.clone();
        let task = tokio::spawn(async move {
            gateway
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Serving { stop, task })
    }

    /// Credits what changed since the last step ended to step `step`.
    pub(crate) fn step_ended(&self, step: &str) {
        let pushed = self.gateway.pushed();
        let mut credits = self.credits.lock().expect("never poisoned");
        for (place, digest) in places(&pushed) {
            if credits.seen.get(&place) != Some(&digest) {
                credits
                    .steps
                    .insert((place.clone(), digest.clone()), step.to_owned());
                credits.seen.insert(place, digest);
            }
        }
    }

    /// Makes the blobs steps uploaded exist at their destinations (their
    /// bytes went there while the steps uploaded them): only once every
    /// step has succeeded and everything to push was read. One that
    /// cannot be completed is pushed by the onward copy instead.
    pub(crate) async fn complete_onward(&self) {
        for (repository, digest, result) in self.gateway.complete_onward().await {
            if let Err(e) = result {
                tracing::warn!(%repository, %digest, error = %e, "completing a streamed upload failed; the onward push sends the blob");
            }
        }
    }

    /// Cancels every destination session left: all of them when the build
    /// failed, so its destinations hold nothing of it.
    pub(crate) async fn cancel_onward(&self) {
        self.gateway.cancel_onward().await;
    }

    /// Every manifest steps read from `pulls` repositories.
    pub(crate) fn pulled(&self) -> Vec<Pulled> {
        self.gateway.pulled()
    }

    /// Every manifest steps pushed, tagged ones first per repository; an
    /// error names each declared repository no step pushed to.
    pub(crate) fn onward(&self) -> Result<(Pushed, Vec<Onward>), String> {
        let pushed = self.gateway.pushed();
        let credits = self.credits.lock().expect("never poisoned");
        let missing: Vec<String> = self
            .pushes
            .iter()
            .filter(|(name, _)| !pushed.repositories.contains_key(name))
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the spec declares pushes to {} but no step pushed to {} (`$CUSTODY_REGISTRY/NAME[:TAG]`)",
                missing.join(", "),
                if missing.len() == 1 { "it" } else { "them" },
            ));
        }
        let mut onward = Vec::new();
        for (name, to) in &self.pushes {
            let repository = &pushed.repositories[name];
            let tagged = repository
                .tags
                .iter()
                .map(|(tag, d)| (Some(tag.clone()), d));
            let untagged = repository.by_digest.iter().map(|d| (None, d));
            for (tag, manifest) in tagged.chain(untagged) {
                let place = place(name, tag.as_ref(), manifest.digest());
                let step = credits
                    .steps
                    .get(&(place, manifest.digest().to_string()))
                    .cloned()
                    .unwrap_or_default();
                onward.push(Onward {
                    repository: name.clone(),
                    tag,
                    manifest: manifest.clone(),
                    to: to.clone(),
                    step,
                });
            }
        }
        Ok((pushed, onward))
    }
}

/// Every place in `pushed` and the manifest there.
fn places(pushed: &Pushed) -> Vec<(Place, String)> {
    let mut places = Vec::new();
    for (name, repository) in &pushed.repositories {
        for (tag, manifest) in &repository.tags {
            let digest = manifest.digest();
            places.push((place(name, Some(tag), digest), digest.to_string()));
        }
        for manifest in &repository.by_digest {
            let digest = manifest.digest();
            places.push((place(name, None, digest), digest.to_string()));
        }
    }
    places
}

/// Registry clients for the job's hosts, made on first use and kept, with
/// exactly the access the daemon sent for this job.
pub(crate) struct Registries {
    options: RegistryOptions,
    clients: tokio::sync::Mutex<HashMap<String, Arc<Client>>>,
}

impl Registries {
    pub(crate) fn new(options: RegistryOptions) -> Self {
        Self {
            options,
            clients: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The client for `reference`'s registry.
    pub(crate) async fn client(
        &self,
        reference: &Reference,
    ) -> Result<Arc<Client>, custody_oci::Error> {
        let host = reference.api_host();
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(host) {
            return Ok(client.clone());
        }
        let client = Arc::new(Client::new(host, &self.options).await?);
        clients.insert(host.to_owned(), client.clone());
        Ok(client)
    }
}

/// The gateway's [`Destination`]: each declared repository's `to`, asked
/// with the job's registry access. The step learns "present, this size"
/// of a blob and nothing else; the registry sees the runner, never the
/// step.
struct Destinations {
    to: BTreeMap<Repository, Reference>,
    registries: Arc<Registries>,
}

impl Destinations {
    fn new(pushes: &[(Repository, String)], registries: Arc<Registries>) -> Result<Self, String> {
        let to = pushes
            .iter()
            .map(|(name, to)| {
                let reference = to
                    .parse::<Reference>()
                    .map_err(|e| format!("the destination of push `{name}`: {e}"))?;
                Ok((name.clone(), reference))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { to, registries })
    }
}

impl Destination for Destinations {
    fn blob_size<'a>(
        &'a self,
        repository: &'a Repository,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<u64>, BoxError>> {
        Box::pin(async move {
            let Some(to) = self.to.get(repository) else {
                return Ok(None);
            };
            let client = self.registries.client(to).await?;
            Ok(client.blob_size(to.repository(), digest).await?)
        })
    }

    fn has_manifest<'a>(
        &'a self,
        repository: &'a Repository,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<bool, BoxError>> {
        Box::pin(async move {
            let Some(to) = self.to.get(repository) else {
                return Ok(false);
            };
            let client = self.registries.client(to).await?;
            Ok(client
                .has_manifest(to.repository(), digest.as_ref())
                .await?)
        })
    }

    fn open_upload<'a>(
        &'a self,
        repository: &'a Repository,
    ) -> BoxFuture<'a, Result<Option<Box<dyn OnwardUpload>>, BoxError>> {
        Box::pin(async move {
            let Some(to) = self.to.get(repository) else {
                return Ok(None);
            };
            let client = self.registries.client(to).await?;
            let location = client.open_upload(to.repository()).await?;
            let upload: Box<dyn OnwardUpload> = Box::new(RegistryUpload {
                client,
                repository: to.repository().to_owned(),
                location,
            });
            Ok(Some(upload))
        })
    }
}

/// An upload session open in a `pushes` destination, with the job's
/// registry access: it receives a step's blob while the step uploads it,
/// and is completed only after every step succeeded (the gateway's
/// `complete_onward`, called by `push.rs`), else cancelled.
struct RegistryUpload {
    client: Arc<Client>,
    repository: String,
    /// Where the session stands: registries move it with every request.
    location: url::Url,
}

impl OnwardUpload for RegistryUpload {
    fn append(&mut self, body: BlobBody) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(async move {
            self.location = self
                .client
                .append_upload(&self.repository, self.location.clone(), body)
                .await?;
            Ok(())
        })
    }

    fn complete(self: Box<Self>, digest: Digest) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async move {
            self.client
                .commit_upload(&self.repository, self.location, &digest)
                .await?;
            Ok(())
        })
    }

    fn cancel(self: Box<Self>) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(async move {
            self.client
                .cancel_upload(&self.repository, self.location)
                .await?;
            Ok(())
        })
    }
}

/// The gateway's [`Upstream`]: each `pulls` repository's `from`, read with
/// the job's registry access. Manifests by digest and blobs are checked
/// against their digests by the client as they arrive.
struct Pulls {
    from: BTreeMap<Repository, Reference>,
    registries: Arc<Registries>,
}

impl Pulls {
    fn new(pulls: &[proto::GatewayPull], registries: Arc<Registries>) -> Result<Self, String> {
        let from = pulls
            .iter()
            .map(|p| {
                let name = p.name.parse::<Repository>().map_err(|e| e.to_string())?;
                let from = p
                    .from
                    .parse::<Reference>()
                    .map_err(|e| format!("the repository of pull `{name}`: {e}"))?;
                Ok((name, from))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { from, registries })
    }

    async fn client(
        &self,
        repository: &Repository,
    ) -> Result<Option<(Arc<Client>, &Reference)>, BoxError> {
        let Some(from) = self.from.get(repository) else {
            return Ok(None);
        };
        Ok(Some((self.registries.client(from).await?, from)))
    }
}

/// Whether the registry said "not there".
fn not_found(error: &custody_oci::Error) -> bool {
    matches!(error, custody_oci::Error::Registry { status: 404, .. })
}

impl Upstream for Pulls {
    fn manifest<'a>(
        &'a self,
        repository: &'a Repository,
        reference: &'a GatewayReference,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, BoxError>> {
        Box::pin(async move {
            let Some((client, from)) = self.client(repository).await? else {
                return Ok(None);
            };
            match client
                .manifest(from.repository(), &reference.to_string())
                .await
            {
                Ok((descriptor, bytes)) => Ok(Some(UpstreamManifest {
                    media_type: descriptor.media_type().to_string(),
                    digest: descriptor.digest().clone(),
                    bytes,
                })),
                Err(e) if not_found(&e) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn blob_size<'a>(
        &'a self,
        repository: &'a Repository,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<u64>, BoxError>> {
        Box::pin(async move {
            let Some((client, from)) = self.client(repository).await? else {
                return Ok(None);
            };
            Ok(client.blob_size(from.repository(), digest).await?)
        })
    }

    fn blob<'a>(
        &'a self,
        repository: &'a Repository,
        digest: &'a Digest,
        size: u64,
    ) -> BoxFuture<'a, Result<BlobBody, BoxError>> {
        Box::pin(async move {
            let Some((client, from)) = self.client(repository).await? else {
                return Err(format!("`{repository}` is not a pull repository").into());
            };
            let descriptor = Descriptor::new(
                MediaType::Other("application/octet-stream".into()),
                size,
                digest.clone(),
            );
            let stream = client.blob(from.repository(), &descriptor).await?;
            let body: BlobBody = Box::pin(stream.map_err(|e| Box::new(e) as BoxError));
            Ok(body)
        })
    }
}

/// The gateway served in one step's namespace.
pub(crate) struct Serving {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Stops serving and waits until every connection is closed, so what
    /// the step pushed is all recorded before the next thing happens.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// What points a step's clients at the gateway.
pub(crate) fn env() -> (String, String) {
    ("CUSTODY_REGISTRY".to_owned(), address())
}

/// `127.0.0.1:PORT`.
pub(crate) fn address() -> String {
    format!("127.0.0.1:{PORT}")
}
