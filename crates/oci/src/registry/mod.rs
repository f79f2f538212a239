//! A client for the OCI distribution API, one per registry host.
//!
//! Transport follows what Docker users already have (see `certs`), auth is
//! decided by the registry's challenge (see `auth`), and uploads stream from
//! verified blob streams so wrong bytes are never committed.

pub mod auth;
pub mod certs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use reqwest::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::sync::OnceCell;
use url::Url;

use crate::Error;
use crate::digest::{self, Digest};
use crate::layout::MAX_MANIFEST_SIZE;
use crate::stream::{self, BlobStream, ErrorSlot};
pub use auth::{Credential, CredentialSource, Scope, Secret};

/// The manifest media types custody asks for, most preferred first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// How to reach registries; shared by every host's client.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// certs.d roots, searched in order (see [`certs::default_search_path`]).
    pub certs_dirs: Vec<PathBuf>,
    /// TLS material already loaded, by host; used instead of `certs_dirs`
    /// for these hosts (a runner gets it from the daemon).
    pub host_tls: HashMap<String, certs::HostTls>,
    /// Hosts (`host[:port]`) to talk to over plain HTTP.
    pub insecure_hosts: Vec<String>,
    pub credentials: CredentialSource,
    pub user_agent: String,
    pub connect_timeout: Duration,
    /// Upload in PATCH chunks of this size instead of one streaming PUT,
    /// for registries (or proxies) that cap request bodies.
    pub chunk_size: Option<u64>,
    /// Attempts for a request that failed transiently (connection, 5xx).
    pub attempts: u32,
    /// The most one exchange that moves no blob may take, retries and
    /// token included: a registry that trickles a manifest a byte at a
    /// time fails here, not after hours.
    pub request_deadline: Duration,
}

/// [`RegistryOptions::request_deadline`] unless the caller says otherwise.
pub const DEFAULT_REQUEST_DEADLINE: Duration = Duration::from_secs(60);

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            certs_dirs: certs::default_search_path(None),
            host_tls: HashMap::new(),
            insecure_hosts: Vec::new(),
            credentials: CredentialSource::Default,
            user_agent: concat!("custody/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(10),
            chunk_size: None,
            attempts: 3,
            request_deadline: DEFAULT_REQUEST_DEADLINE,
        }
    }
}

/// The outcome of asking the registry to mount a blob from another repository.
pub enum Mount {
    Mounted,
    /// The registry could not mount it and opened an upload instead.
    Upload(Url),
}

/// A client for one registry host.
pub struct Client {
    host: String,
    base: Url,
    http: reqwest::Client,
    /// For the token realm only (see `Client::new`).
    token_http: reqwest::Client,
    auth: auth::Authenticator,
    pinged: OnceCell<()>,
    chunk_size: Option<u64>,
    attempts: u32,
    deadline: Duration,
}

impl Client {
    /// Sets up TLS and credentials for `host` (`host[:port]`); no request is
    /// sent until the first operation.
    pub async fn new(host: &str, options: &RegistryOptions) -> Result<Self, Error> {
        let insecure = options.insecure_hosts.iter().any(|h| h == host);
        let scheme = if insecure { "http" } else { "https" };
        let base =
            Url::parse(&format!("{scheme}://{host}/")).map_err(|e| Error::InvalidReference {
                reference: host.to_owned(),
                reason: format!("not a usable host: {e}"),
            })?;
        let (tls, credential) = {
            let host = host.to_owned();
            let dirs = options.certs_dirs.clone();
            let given = options.host_tls.get(&host).cloned();
            let source = options.credentials.clone();
            tokio::task::spawn_blocking(move || -> Result<_, Error> {
                let tls = match given {
                    Some(tls) => tls,
                    None => certs::load(&dirs, &host)?,
                };
                Ok((tls, source.lookup(&host)?))
            })
            .await
            .expect("credential lookup does not panic")?
        };
        let http = http_client(host, options, &tls, reqwest::redirect::Policy::default())?;
        // Token requests carry the credential: a Basic header (which reqwest
        // drops when a redirect leaves the origin) or, for an identity token,
        // the body, which a 307 or 308 would send on unchanged. So they
        // follow no redirect off their origin.
        let token_http = http_client(
            host,
            options,
            &tls,
            reqwest::redirect::Policy::custom(|attempt| {
                let leaves = attempt
                    .previous()
                    .last()
                    .is_some_and(|previous| previous.origin() != attempt.url().origin());
                if leaves || attempt.previous().len() > 10 {
                    attempt.stop()
                } else {
                    attempt.follow()
                }
            }),
        )?;
        Ok(Self {
            host: host.to_owned(),
            base,
            http,
            token_http,
            auth: auth::Authenticator::new(host.to_owned(), credential),
            pinged: OnceCell::new(),
            chunk_size: options.chunk_size,
            attempts: options.attempts.max(1),
            deadline: options.request_deadline,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Refuses a 401 that did not come from the registry's own origin (a
    /// redirect target, an upload location elsewhere): only the registry
    /// itself says how to authenticate to it, so no other origin can name
    /// the token realm its credential is sent to.
    fn challenge_from_elsewhere(&self, response: &Response, action: &str) -> Result<(), Error> {
        if response.url().origin() == self.base.origin() {
            return Ok(());
        }
        Err(self.auth.refused(format!(
            "{action} was answered 401 Unauthorized by `{}`, another origin than the registry; custody sends the registry's credentials to no other origin",
            response.url().origin().ascii_serialization()
        )))
    }

    fn url(&self, path: &str) -> Url {
        self.base
            .join(path)
            .expect("registry API paths are valid URL paths")
    }

    /// `GET /v2/` once, to learn how the registry wants us to authenticate
    /// before any request with a body that could not be replayed.
    async fn ping(&self) -> Result<(), Error> {
        self.pinged
            .get_or_try_init(|| async {
                let response = self
                    .http
                    .get(self.url("v2/"))
                    .send()
                    .await
                    .map_err(|e| self.transport("the API version check", &e))?;
                if response.status() == StatusCode::UNAUTHORIZED {
                    self.challenge_from_elsewhere(&response, "the API version check")?;
                    let header = response
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok());
                    if !self.auth.challenged(header, &Scope::none()).await {
                        return Err(self.auth.refused(format!(
                            "unsupported authentication challenge {:?}",
                            header.unwrap_or("(none)")
                        )));
                    }
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Sends a request with the authorization `scope` needs; a 401 is
    /// answered by re-reading the challenge and trying once more.
    async fn send(
        &self,
        action: &str,
        scope: &Scope,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, Error> {
        self.ping().await?;
        for attempt in 0..2 {
            let mut request = build().build().map_err(|e| self.transport(action, &e))?;
            // An upload `Location` may point elsewhere; the registry's
            // credentials go to the registry's own origin only.
            if request.url().origin() == self.base.origin()
                && let Some(header) = self.auth.header(&self.token_http, scope).await?
            {
                request
                    .headers_mut()
                    .insert(reqwest::header::AUTHORIZATION, header);
            }
            let response = self
                .http
                .execute(request)
                .await
                .map_err(|e| self.transport(action, &e))?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            self.challenge_from_elsewhere(&response, action)?;
            let header = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if attempt == 0 && self.auth.challenged(header.as_deref(), scope).await {
                continue;
            }
            let detail = error_detail(response).await;
            return Err(self
                .auth
                .refused(format!("{action} answered 401 Unauthorized: {detail}")));
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// `exchange` (one that moves no blob), failed as [`Error::TimedOut`]
    /// if it is not over within the request deadline: read timeouts are
    /// per read, and a registry answering a byte at a time never trips
    /// them.
    async fn within<T>(
        &self,
        action: &str,
        exchange: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.deadline, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(Error::TimedOut {
                    host: self.host.clone(),
                    action: action.to_owned(),
                    after: self.deadline,
                })
            })
    }

    /// [`Client::retrying`] an exchange that moves no blob, the retries
    /// within one request deadline.
    async fn exchange<T, F, Fut>(&self, action: &str, operation: F) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        self.within(action, self.retrying(operation)).await
    }

    /// Retries `operation` with backoff while it fails transiently.
    async fn retrying<T, F, Fut>(&self, operation: F) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match operation().await {
                Err(err) if err.is_transient() && attempt < self.attempts => {
                    tracing::debug!(host = %self.host, %err, attempt, "retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn transport(&self, action: &str, err: &reqwest::Error) -> Error {
        Error::Transport {
            host: self.host.clone(),
            action: action.to_owned(),
            detail: describe(err),
        }
    }

    async fn expect(
        &self,
        response: Response,
        action: &str,
        ok: &[StatusCode],
    ) -> Result<Response, Error> {
        if ok.contains(&response.status()) {
            return Ok(response);
        }
        let status = response.status().as_u16();
        Err(Error::Registry {
            host: self.host.clone(),
            action: action.to_owned(),
            status,
            detail: error_detail(response).await,
        })
    }

    /// Whether `repository` already has the blob.
    pub async fn has_blob(&self, repository: &str, digest: &Digest) -> Result<bool, Error> {
        let action = format!("a check for blob `{digest}`");
        Ok(self.head_blob(repository, digest, &action).await?.is_some())
    }

    /// The size of the blob if `repository` has it, as the registry's
    /// `Content-Length` says (a claim: whoever reads the blob checks its
    /// bytes against a descriptor).
    pub async fn blob_size(&self, repository: &str, digest: &Digest) -> Result<Option<u64>, Error> {
        let action = format!("a check for blob `{digest}`");
        let Some(headers) = self.head_blob(repository, digest, &action).await? else {
            return Ok(None);
        };
        // Read from the header: the body of a HEAD is empty, and so is what
        // reqwest would count of it.
        headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| self.protocol(&action, "the answer has no usable `Content-Length`"))
    }

    /// The headers of a `HEAD` of the blob if `repository` has it.
    async fn head_blob(
        &self,
        repository: &str,
        digest: &Digest,
        action: &str,
    ) -> Result<Option<reqwest::header::HeaderMap>, Error> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"));
        self.exchange(action, || async {
            let response = self
                .send(action, &Scope::pull(repository), || {
                    self.http.head(url.clone())
                })
                .await?;
            match response.status() {
                StatusCode::OK => Ok(Some(response.headers().clone())),
                StatusCode::NOT_FOUND => Ok(None),
                _ => self.expect(response, action, &[]).await.map(|_| None),
            }
        })
        .await
    }

    /// Whether `repository` would take a push, without pushing anything:
    /// reaches the registry (TLS or plain HTTP as configured), gets push
    /// access (credentials, token scope), starts an upload and cancels it.
    pub async fn check_push(&self, repository: &str) -> Result<(), Error> {
        let action = format!("starting an upload to `{repository}`");
        let scope = Scope::push(repository);
        self.within(&action, async {
            let location = self.start_upload(repository, &action, &scope).await?;
            // Cancelling is a courtesy: a registry that cannot leaves the
            // empty upload to its own expiry.
            let _ = self
                .send(&action, &scope, || self.http.delete(location.clone()))
                .await;
            Ok(())
        })
        .await
    }

    /// Starts a blob upload session; returns where to send the blob.
    async fn start_upload(
        &self,
        repository: &str,
        action: &str,
        scope: &Scope,
    ) -> Result<Url, Error> {
        let url = self.url(&format!("v2/{repository}/blobs/uploads/"));
        let response = self
            .send(action, scope, || self.http.post(url.clone()))
            .await?;
        let response = self
            .expect(response, action, &[StatusCode::ACCEPTED])
            .await?;
        self.location(&response, action)
    }

    /// Opens an upload session in `repository` and returns its location,
    /// for a blob whose bytes arrive later ([`Client::append_upload`]) and
    /// which exists only once [`Client::commit_upload`] names its digest.
    /// Until then the registry shows it nowhere (OCI distribution spec,
    /// "Pushing blobs": a blob exists once the closing `PUT` succeeded).
    pub async fn open_upload(&self, repository: &str) -> Result<Url, Error> {
        let action = format!("starting an upload to `{repository}`");
        let scope = Scope::push(repository);
        self.exchange(&action, || self.start_upload(repository, &action, &scope))
            .await
    }

    /// Streams `body` into the open upload at `location` as one `PATCH`
    /// without `Content-Range` (distribution's streamed upload: appended
    /// where the upload stands); returns the location to use next. The
    /// body is sent once, so nothing is retried.
    pub async fn append_upload<S>(
        &self,
        repository: &str,
        location: Url,
        body: S,
    ) -> Result<Url, Error>
    where
        S: futures_util::TryStream + Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        Bytes: From<S::Ok>,
    {
        let action = format!("streaming an upload to `{repository}`");
        let scope = Scope::push(repository);
        let body = std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(body)));
        let response = self
            .send(&action, &scope, || {
                let mut request = self
                    .http
                    .patch(location.clone())
                    .header(CONTENT_TYPE, "application/octet-stream");
                // `send` has pinged, so auth is known and a second attempt
                // (after a 401) sends an empty body the registry refuses.
                if let Some(body) = body.lock().expect("body lock").take() {
                    request = request.body(body);
                }
                request
            })
            .await?;
        let response = self
            .expect(
                response,
                &action,
                &[StatusCode::ACCEPTED, StatusCode::NO_CONTENT],
            )
            .await?;
        self.location(&response, &action)
    }

    /// Closes the upload at `location` as blob `digest` (`PUT ?digest=`,
    /// no body): from here on the blob exists in `repository`.
    pub async fn commit_upload(
        &self,
        repository: &str,
        location: Url,
        digest: &Digest,
    ) -> Result<(), Error> {
        let action = format!("completing the upload of blob `{digest}`");
        let scope = Scope::push(repository);
        let mut url = location;
        url.query_pairs_mut().append_pair("digest", digest.as_ref());
        self.exchange(&action, || async {
            let response = self
                .send(&action, &scope, || {
                    self.http.put(url.clone()).header(CONTENT_LENGTH, 0)
                })
                .await?;
            self.expect(response, &action, &[StatusCode::CREATED])
                .await
                .map(|_| ())
        })
        .await
    }

    /// Cancels the upload at `location` (`DELETE`): what it received goes.
    pub async fn cancel_upload(&self, repository: &str, location: Url) -> Result<(), Error> {
        let action = format!("cancelling an upload to `{repository}`");
        let scope = Scope::push(repository);
        self.exchange(&action, || async {
            let response = self
                .send(&action, &scope, || self.http.delete(location.clone()))
                .await?;
            self.expect(
                response,
                &action,
                &[
                    StatusCode::NO_CONTENT,
                    StatusCode::OK,
                    StatusCode::NOT_FOUND,
                ],
            )
            .await
            .map(|_| ())
        })
        .await
    }

    /// Asks the registry to mount `digest` from `from` into `repository`.
    pub async fn mount_blob(
        &self,
        repository: &str,
        from: &str,
        digest: &Digest,
    ) -> Result<Mount, Error> {
        let action = format!("mounting blob `{digest}` from `{from}`");
        let mut url = self.url(&format!("v2/{repository}/blobs/uploads/"));
        url.query_pairs_mut()
            .append_pair("mount", digest.as_ref())
            .append_pair("from", from);
        let scope = Scope::push_mounting(repository, from);
        self.exchange(&action, || async {
            let response = self
                .send(&action, &scope, || self.http.post(url.clone()))
                .await?;
            let response = self
                .expect(
                    response,
                    &action,
                    &[StatusCode::CREATED, StatusCode::ACCEPTED],
                )
                .await?;
            if response.status() == StatusCode::CREATED {
                Ok(Mount::Mounted)
            } else {
                Ok(Mount::Upload(self.location(&response, &action)?))
            }
        })
        .await
    }

    /// Uploads one blob. `open` is called for every attempt, so a retry
    /// starts over with fresh, freshly verified bytes.
    pub async fn upload_blob(
        &self,
        repository: &str,
        descriptor: &Descriptor,
        started: Option<Url>,
        open: impl Fn() -> BlobStream,
    ) -> Result<(), Error> {
        let digest = descriptor.digest();
        let action = format!("uploading blob `{digest}`");
        let scope = Scope::push(repository);
        let started = std::sync::Mutex::new(started);
        self.retrying(|| async {
            let resumed = started.lock().expect("upload location lock").take();
            let location = match resumed {
                Some(url) => url,
                None => self.start_upload(repository, &action, &scope).await?,
            };
            match self.chunk_size {
                None => {
                    self.put_monolithic(&action, &scope, location, descriptor, open())
                        .await
                }
                Some(chunk) => {
                    self.put_chunked(&action, &scope, location, descriptor, open(), chunk)
                        .await
                }
            }
        })
        .await
    }

    async fn put_monolithic(
        &self,
        action: &str,
        scope: &Scope,
        location: Url,
        descriptor: &Descriptor,
        body: BlobStream,
    ) -> Result<(), Error> {
        let mut url = location;
        url.query_pairs_mut()
            .append_pair("digest", descriptor.digest().as_ref());
        let slot = ErrorSlot::default();
        let body = std::sync::Mutex::new(Some(slot.body(body)));
        let result = self
            .send(action, scope, || {
                let mut request = self
                    .http
                    .put(url.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, descriptor.size());
                // The body can be sent once; a 401 retry (after which auth is
                // known) sends an empty one, which the registry refuses cleanly.
                if let Some(body) = body.lock().expect("body lock").take() {
                    request = request.body(body);
                }
                request
            })
            .await;
        if let Some(err) = slot.take() {
            return Err(err);
        }
        self.expect(result?, action, &[StatusCode::CREATED])
            .await
            .map(|_| ())
    }

    async fn put_chunked(
        &self,
        action: &str,
        scope: &Scope,
        mut location: Url,
        descriptor: &Descriptor,
        mut body: BlobStream,
        chunk_size: u64,
    ) -> Result<(), Error> {
        let mut offset = 0u64;
        let mut buffer = bytes::BytesMut::new();
        let mut finished = false;
        while !finished {
            while (buffer.len() as u64) < chunk_size {
                match body.next().await {
                    Some(chunk) => buffer.extend_from_slice(&chunk?),
                    None => {
                        finished = true;
                        break;
                    }
                }
            }
            if buffer.is_empty() {
                break;
            }
            let take = buffer.len().min(chunk_size as usize);
            let chunk: Bytes = buffer.split_to(take).freeze();
            // A full buffer may still hold the verified stream's held-back
            // tail; only the last PUT commits, after the stream has ended.
            let end = offset + chunk.len() as u64 - 1;
            let response = self
                .send(action, scope, || {
                    self.http
                        .patch(location.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_RANGE, format!("{offset}-{end}"))
                        .header(CONTENT_LENGTH, chunk.len())
                        .body(chunk.clone())
                })
                .await?;
            let response = self
                .expect(
                    response,
                    action,
                    &[StatusCode::ACCEPTED, StatusCode::NO_CONTENT],
                )
                .await?;
            location = self.location(&response, action)?;
            offset = end + 1;
            if !buffer.is_empty() {
                finished = false;
            }
        }
        location
            .query_pairs_mut()
            .append_pair("digest", descriptor.digest().as_ref());
        let response = self
            .send(action, scope, || {
                self.http.put(location.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        self.expect(response, action, &[StatusCode::CREATED])
            .await
            .map(|_| ())
    }

    fn location(&self, response: &Response, action: &str) -> Result<Url, Error> {
        let header = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Protocol {
                host: self.host.clone(),
                action: action.to_owned(),
                detail: "the answer has no `Location` header".into(),
            })?;
        // Relative locations are relative to the registry's own URL.
        self.base.join(header).map_err(|e| Error::Protocol {
            host: self.host.clone(),
            action: action.to_owned(),
            detail: format!("`Location` is not a URL: {e}"),
        })
    }

    /// Streams a blob, verified against its descriptor.
    pub async fn blob(
        &self,
        repository: &str,
        descriptor: &Descriptor,
    ) -> Result<BlobStream, Error> {
        let digest = descriptor.digest();
        let action = format!("downloading blob `{digest}`");
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"));
        let response = self
            .retrying(|| async {
                let response = self
                    .send(&action, &Scope::pull(repository), || {
                        self.http.get(url.clone())
                    })
                    .await?;
                self.expect(response, &action, &[StatusCode::OK]).await
            })
            .await?;
        let host = self.host.clone();
        let bytes = response.bytes_stream().map_err(move |e| Error::Transport {
            host: host.clone(),
            action: action.clone(),
            detail: describe(&e),
        });
        Ok(stream::verified(bytes, descriptor.clone()))
    }

    /// Fetches a manifest or index by tag or digest. The returned descriptor
    /// carries the digest of the exact bytes; when `reference` is a digest
    /// the bytes must match it.
    pub async fn manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<(Descriptor, Bytes), Error> {
        let action = format!("fetching manifest `{repository}:{reference}`");
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"));
        self.exchange(&action, || async {
            let response = self
                .send(&action, &Scope::pull(repository), || {
                    self.http.get(url.clone()).header(ACCEPT, MANIFEST_ACCEPT)
                })
                .await?;
            let response = self.expect(response, &action, &[StatusCode::OK]).await?;
            let media_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
            if response
                .content_length()
                .is_some_and(|n| n > MAX_MANIFEST_SIZE)
            {
                return Err(self.protocol(&action, "the manifest is over the 4 MiB limit"));
            }
            let bytes = read_capped(response, MAX_MANIFEST_SIZE)
                .await
                .map_err(|e| self.transport(&action, &e))?;
            let bytes = bytes
                .ok_or_else(|| self.protocol(&action, "the manifest is over the 4 MiB limit"))?;
            let media_type = match media_type {
                Some(m) if m != "application/json" && !m.is_empty() => MediaType::from(m.as_str()),
                _ => sniff_media_type(&bytes)
                    .ok_or_else(|| self.protocol(&action, "the manifest has no media type"))?,
            };
            let computed = digest::sha256(&bytes);
            if let Ok(expected) = digest::parse(reference) {
                digest::verify_bytes(&expected, bytes.len() as u64, &bytes)?;
                return Ok((
                    Descriptor::new(media_type, bytes.len() as u64, expected),
                    bytes,
                ));
            }
            Ok((
                Descriptor::new(media_type, bytes.len() as u64, computed),
                bytes,
            ))
        })
        .await
    }

    /// Whether a manifest exists under `reference` (tag or digest).
    pub async fn has_manifest(&self, repository: &str, reference: &str) -> Result<bool, Error> {
        let action = format!("a check for manifest `{repository}:{reference}`");
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"));
        self.exchange(&action, || async {
            let response = self
                .send(&action, &Scope::pull(repository), || {
                    self.http.head(url.clone()).header(ACCEPT, MANIFEST_ACCEPT)
                })
                .await?;
            match response.status() {
                StatusCode::OK => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => self.expect(response, &action, &[]).await.map(|_| false),
            }
        })
        .await
    }

    /// Stores a manifest under `reference` (a tag, or its digest). Returns
    /// whether the registry processed its `subject` (OCI 1.1 `OCI-Subject`).
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        descriptor: &Descriptor,
        bytes: &Bytes,
    ) -> Result<bool, Error> {
        let action = format!(
            "storing manifest `{}` as `{repository}:{reference}`",
            descriptor.digest()
        );
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"));
        let media_type = descriptor.media_type().to_string();
        self.exchange(&action, || async {
            let response = self
                .send(&action, &Scope::push(repository), || {
                    self.http
                        .request(Method::PUT, url.clone())
                        .header(CONTENT_TYPE, media_type.clone())
                        .body(bytes.clone())
                })
                .await?;
            let response = self
                .expect(response, &action, &[StatusCode::CREATED, StatusCode::OK])
                .await?;
            Ok(response.headers().contains_key("oci-subject"))
        })
        .await
    }

    /// Lists the manifests that name `digest` as their subject: the OCI 1.1
    /// referrers API, or the `sha256-<hex>` tag schema where the registry
    /// has no such API.
    pub async fn referrers(
        &self,
        repository: &str,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>, Error> {
        let action = format!("listing referrers of `{digest}`");
        self.within(
            &action,
            self.list_referrers(repository, digest, artifact_type, &action),
        )
        .await
    }

    async fn list_referrers(
        &self,
        repository: &str,
        digest: &Digest,
        artifact_type: Option<&str>,
        action: &str,
    ) -> Result<Vec<Descriptor>, Error> {
        let mut url = self.url(&format!("v2/{repository}/referrers/{digest}"));
        if let Some(artifact_type) = artifact_type {
            url.query_pairs_mut()
                .append_pair("artifactType", artifact_type);
        }
        let response = self
            .retrying(|| async {
                self.send(action, &Scope::pull(repository), || {
                    self.http.get(url.clone())
                })
                .await
            })
            .await?;
        let is_index = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/vnd.oci.image.index.v1+json"));
        let index = if response.status() == StatusCode::OK && is_index {
            let bytes = read_capped(response, MAX_MANIFEST_SIZE)
                .await
                .map_err(|e| self.transport(action, &e))?
                .ok_or_else(|| self.protocol(action, "the referrers index is over 4 MiB"))?;
            serde_json::from_slice::<ImageIndex>(&bytes).map_err(|e| {
                self.protocol(action, &format!("the referrers index is not valid: {e}"))
            })?
        } else if response.status() == StatusCode::NOT_FOUND || response.status() == StatusCode::OK
        {
            // Distribution 2.x answers 404 for the unknown endpoint: fall back.
            match self.fallback_index(repository, digest).await? {
                Some(index) => index,
                None => return Ok(Vec::new()),
            }
        } else {
            return self.expect(response, action, &[]).await.map(|_| Vec::new());
        };
        Ok(index
            .manifests()
            .iter()
            .filter(|d| {
                artifact_type.is_none_or(|t| {
                    d.artifact_type()
                        .as_ref()
                        .is_some_and(|a| a.to_string() == t)
                })
            })
            .cloned()
            .collect())
    }

    async fn fallback_index(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<ImageIndex>, Error> {
        let tag = fallback_tag(digest);
        if !self.has_manifest(repository, &tag).await? {
            return Ok(None);
        }
        let (_, bytes) = self.manifest(repository, &tag).await?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            self.protocol(
                "reading the referrers tag",
                &format!("`{tag}` is not an image index: {e}"),
            )
        })
    }

    /// Pushes a manifest that has a `subject` and makes sure it can be found
    /// from that subject: if the registry does not index referrers itself,
    /// the `sha256-<hex>` fallback index is updated (OCI distribution 1.1,
    /// "Pushing Manifests with Subject").
    pub async fn put_referrer(
        &self,
        repository: &str,
        subject: &Digest,
        descriptor: &Descriptor,
        bytes: &Bytes,
    ) -> Result<(), Error> {
        let indexed = self
            .put_manifest(repository, descriptor.digest().as_ref(), descriptor, bytes)
            .await?;
        if indexed {
            return Ok(());
        }
        let mut index = match self.fallback_index(repository, subject).await? {
            Some(index) => index,
            None => {
                let mut index = ImageIndex::default();
                index.set_media_type(Some(MediaType::ImageIndex));
                index.set_manifests(Vec::new());
                index
            }
        };
        if index
            .manifests()
            .iter()
            .any(|d| d.digest() == descriptor.digest())
        {
            return Ok(());
        }
        let mut manifests = index.manifests().clone();
        manifests.push(referrer_descriptor(descriptor, bytes));
        index.set_manifests(manifests);
        let index_bytes = Bytes::from(serde_json::to_vec(&index).expect("an index serialises"));
        let index_descriptor = Descriptor::new(
            MediaType::ImageIndex,
            index_bytes.len() as u64,
            digest::sha256(&index_bytes),
        );
        self.put_manifest(
            repository,
            &fallback_tag(subject),
            &index_descriptor,
            &index_bytes,
        )
        .await
        .map(|_| ())
    }

    fn protocol(&self, action: &str, detail: &str) -> Error {
        Error::Protocol {
            host: self.host.clone(),
            action: action.to_owned(),
            detail: detail.to_owned(),
        }
    }
}

/// An HTTP client for `host` with its TLS material and `redirects`.
fn http_client(
    host: &str,
    options: &RegistryOptions,
    tls: &certs::HostTls,
    redirects: reqwest::redirect::Policy,
) -> Result<reqwest::Client, Error> {
    let mut builder = reqwest::Client::builder()
        .user_agent(options.user_agent.clone())
        .connect_timeout(options.connect_timeout)
        .read_timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(32)
        .tls_version_min(reqwest::tls::Version::TLS_1_2)
        .redirect(redirects);
    let cert_problem = |reason: String| Error::CertsDir {
        host: host.to_owned(),
        dir: tls.dir.clone().unwrap_or_default(),
        reason,
    };
    let mut roots = Vec::new();
    for pem in &tls.roots {
        roots.extend(
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                cert_problem(format!("a CA file is not valid PEM: {}", describe(&e)))
            })?,
        );
    }
    builder = builder.tls_certs_merge(roots);
    if let Some(identity) = &tls.identity {
        builder = builder.identity(reqwest::Identity::from_pem(identity).map_err(|e| {
            cert_problem(format!(
                "the client certificate or key is not valid: {}",
                describe(&e)
            ))
        })?);
    }
    builder.build().map_err(|e| cert_problem(describe(&e)))
}

/// The tag under which the referrers of `digest` are listed on registries
/// without the referrers API.
pub fn fallback_tag(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm(), digest.digest())
}

/// The descriptor that lists a referrer: its artifact type (or config media
/// type) and annotations copied from the manifest, as the spec asks.
pub fn referrer_descriptor(descriptor: &Descriptor, bytes: &[u8]) -> Descriptor {
    let mut listed = descriptor.clone();
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
        let artifact_type = value
            .get("artifactType")
            .and_then(|v| v.as_str())
            .or_else(|| value.pointer("/config/mediaType").and_then(|v| v.as_str()));
        if let Some(t) = artifact_type {
            listed.set_artifact_type(Some(MediaType::from(t)));
        }
        if let Some(annotations) = value
            .get("annotations")
            .and_then(|a| serde_json::from_value(a.clone()).ok())
        {
            listed.set_annotations(Some(annotations));
        }
    }
    listed
}

fn sniff_media_type(bytes: &[u8]) -> Option<MediaType> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if let Some(m) = value.get("mediaType").and_then(|m| m.as_str()) {
        return Some(MediaType::from(m));
    }
    if value.get("manifests").is_some() {
        Some(MediaType::ImageIndex)
    } else if value.get("config").is_some() {
        Some(MediaType::ImageManifest)
    } else {
        None
    }
}

async fn read_capped(response: Response, cap: u64) -> Result<Option<Bytes>, reqwest::Error> {
    let mut stream = response.bytes_stream();
    let mut buffer = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        buffer.extend_from_slice(&chunk?);
        if buffer.len() as u64 > cap {
            return Ok(None);
        }
    }
    Ok(Some(buffer.freeze()))
}

/// The registry's own words for an error: the `errors` list of the
/// distribution spec when there is one, else the start of the body.
pub(crate) async fn error_detail(response: Response) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let status = response.status();
    let bytes = read_capped(response, 64 * 1024)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    if let Ok(parsed) = serde_json::from_slice::<Errors>(&bytes) {
        let text: Vec<String> = parsed
            .errors
            .iter()
            .map(|e| match (&e.code, &e.message) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.clone(),
                (None, Some(message)) => message.clone(),
                (None, None) => String::new(),
            })
            .filter(|s| !s.is_empty())
            .collect();
        if !text.is_empty() {
            return text.join("; ");
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    if text.is_empty() {
        status.canonical_reason().unwrap_or("no details").to_owned()
    } else {
        text.chars().take(300).collect()
    }
}

/// A transport error with its causes, without the URL (which may carry
/// upload state) and without repeating itself.
pub(crate) fn describe(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(err);
    let head = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else if err.is_body() {
        "the request body failed"
    } else if err.is_decode() {
        "the response could not be decoded"
    } else {
        "request failed"
    };
    parts.push(head.to_owned());
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}
