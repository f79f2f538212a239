//! The distribution API a step's client talks to (OCI distribution spec
//! v1.1, "Endpoints"), served over plain HTTP on a listener the caller
//! binds.
//!
//! One handler parses the path (repository names hold `/`, so the route
//! is read from its end) and answers each endpoint; every refusal is the
//! registry's own error JSON with a message naming what is allowed.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use custody_oci::Digest;
use custody_oci::digest::{DigestAlgorithm, Hasher};
use custody_oci::layout::MAX_MANIFEST_SIZE;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::error::{Code, Refusal};
use crate::name::{Reference, Repository, Tag};
use crate::{BoxError, Shared, manifest};

const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const UPLOAD_SESSION: HeaderName = HeaderName::from_static("blob-upload-session-id");

/// Serves `shared` on `listener` until `shutdown` resolves; then every
/// connection is closed at once (a step still talking to the gateway after
/// the platform stopped it has nothing more to say) and this returns once
/// their tasks have ended.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let router = Router::new().fallback(handle).with_state(shared);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    // A connection that failed before it was accepted
                    // (reset, aborted) is that client's problem; running
                    // out of descriptors passes once others close.
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .without_shutdown()
                        .await;
                    match served {
                        Ok(parts) => linger(parts.io.into_inner()).await,
                        Err(e) => tracing::debug!(error = %e, "gateway connection ended"),
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// How long, and for how many bytes, a closed connection's unread request
/// is still read and thrown away.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: u64 = 64 << 20;

/// Closes a connection the way that lets its client read the answer: a
/// refusal sent before the request's body was read (over the limit, a
/// wrong digest) is followed by closing. Closing a socket with unread
/// bytes in it resets the connection, and a reset can throw away the
/// answer before the client read it — it then reports "broken pipe", not
/// why. So the write side is shut first and what the client still sends
/// is read and dropped, for a bounded time and size (a lingering close).
async fn linger(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = tokio::io::sink();
        let mut limited = tokio::io::AsyncReadExt::take(&mut stream, LINGER_BYTES);
        tokio::io::copy(&mut limited, &mut sink).await
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let mut response = match dispatch(&shared, request).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    };
    response
        .headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    response
}

/// An endpoint of the API, with its repository parsed.
enum Route {
    /// `/v2/`
    Base,
    /// `/v2/<name>/blobs/<digest>`
    Blob(Repository, String),
    /// `/v2/<name>/blobs/uploads/`
    Uploads(Repository),
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload(Repository, String),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(Repository, String),
    /// `/v2/<name>/tags/list`
    Tags(Repository),
}

impl Route {
    fn parse(path: &str) -> Result<Self, Refusal> {
        let not_api = || Refusal {
            status: StatusCode::NOT_FOUND,
            ..Refusal::new(
                Code::Unsupported,
                format!("`{path}` is not a distribution API endpoint the gateway serves"),
            )
        };
        let rest = match path {
            "/v2" | "/v2/" => return Ok(Route::Base),
            _ => path.strip_prefix("/v2/").ok_or_else(not_api)?,
        };
        let name = |text: &str| {
            text.parse::<Repository>()
                .map_err(|e| Refusal::new(Code::NameInvalid, e.to_string()))
        };
        if let Some(repository) = rest.strip_suffix("/tags/list") {
            return Ok(Route::Tags(name(repository)?));
        }
        if let Some(repository) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Ok(Route::Uploads(name(repository)?));
        }
        // The last segment is never part of the name: split there. Some
        // clients escape the `:` of a digest.
        let (before, last) = rest.rsplit_once('/').ok_or_else(not_api)?;
        let last = last.replace("%3A", ":").replace("%3a", ":");
        let last = last.as_str();
        if let Some(repository) = before.strip_suffix("/blobs/uploads") {
            return Ok(Route::Upload(name(repository)?, last.to_owned()));
        }
        if let Some(repository) = before.strip_suffix("/blobs") {
            return Ok(Route::Blob(name(repository)?, last.to_owned()));
        }
        if let Some(repository) = before.strip_suffix("/manifests") {
            return Ok(Route::Manifest(name(repository)?, last.to_owned()));
        }
        Err(not_api())
    }

    fn repository(&self) -> Option<&Repository> {
        match self {
            Route::Base => None,
            Route::Blob(r, _)
            | Route::Uploads(r)
            | Route::Upload(r, _)
            | Route::Manifest(r, _)
            | Route::Tags(r) => Some(r),
        }
    }
}

async fn dispatch(shared: &Shared, request: Request) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    let method = parts.method;
    if method == Method::DELETE {
        // Deleting would let a step take back what it pushed after a later
        // step saw it, or remove what another step pushed.
        return Err(Refusal::new(
            Code::Unsupported,
            "the gateway deletes nothing: what a step pushes stays until the build ends",
        ));
    }
    let route = Route::parse(parts.uri.path())?;
    if let Some(repository) = route.repository()
        && shared.pulls.contains(repository)
    {
        let repository = repository.clone();
        return pull(shared, method, route, &repository).await;
    }
    if let Some(repository) = route.repository()
        && !shared.store.declared().contains(repository)
    {
        return Err(Refusal::new(
            Code::NameUnknown,
            format!(
                "`{repository}` is not a repository this build declared; steps may push to {}",
                allowed(shared)
            ),
        ));
    }
    let query = Query::parse(parts.uri.query());
    let headers = parts.headers;
    match (method, route) {
        (Method::GET | Method::HEAD, Route::Base) => Ok(empty(StatusCode::OK)),
        (m @ (Method::GET | Method::HEAD), Route::Blob(repository, digest)) => {
            get_blob(shared, &repository, &digest, m == Method::HEAD).await
        }
        (Method::POST, Route::Uploads(repository)) => {
            start_upload(shared, &repository, &query, &headers, body).await
        }
        (Method::GET, Route::Upload(repository, id)) => {
            let taken = shared.store.take(&repository, &id)?;
            let written = taken.upload.as_ref().map_or(0, |u| u.written());
            shared.store.put_back(taken);
            Ok(upload_status(
                StatusCode::NO_CONTENT,
                &repository,
                &id,
                written,
            ))
        }
        (Method::PATCH, Route::Upload(repository, id)) => {
            patch_upload(shared, &repository, &id, &headers, body).await
        }
        (Method::PUT, Route::Upload(repository, id)) => {
            finish_upload(shared, &repository, &id, &query, &headers, body).await
        }
        (Method::PUT, Route::Manifest(repository, reference)) => {
            put_manifest(shared, &repository, &reference, &headers, body).await
        }
        (m @ (Method::GET | Method::HEAD), Route::Manifest(repository, reference)) => {
            get_manifest(shared, &repository, &reference, m == Method::HEAD).await
        }
        (Method::GET, Route::Tags(repository)) => Ok(tags(shared, &repository, &query)),
        (method, _) => Err(Refusal::new(
            Code::Unsupported,
            format!("the gateway does not answer {method} here"),
        )),
    }
}

/// The declared repositories, for messages.
fn allowed(shared: &Shared) -> String {
    let pushes = names(shared.store.declared());
    let pushes = if pushes.is_empty() {
        "no repository".to_owned()
    } else {
        pushes
    };
    if shared.pulls.is_empty() {
        pushes
    } else {
        format!("{pushes} and read from {}", names(&shared.pulls))
    }
}

fn names(repositories: &std::collections::BTreeSet<Repository>) -> String {
    repositories
        .iter()
        .map(|r| format!("`{r}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A request to a pull repository: manifests and blobs are read from the
/// upstream registry (with the platform's credentials, which the step
/// never sees); every manifest served is recorded. Nothing is written.
async fn pull(
    shared: &Shared,
    method: Method,
    route: Route,
    repository: &Repository,
) -> Result<Response, Refusal> {
    let head = method == Method::HEAD;
    match (method, route) {
        (Method::GET | Method::HEAD, Route::Manifest(_, reference)) => {
            pull_manifest(shared, repository, &reference, head).await
        }
        (Method::GET | Method::HEAD, Route::Blob(_, digest)) => {
            pull_blob(shared, repository, &digest, head).await
        }
        (Method::GET, Route::Tags(_)) => Err(Refusal::new(
            Code::Unsupported,
            format!(
                "the gateway does not list the tags of pull repository `{repository}`; read a tag or digest"
            ),
        )),
        _ => Err(Refusal::new(
            Code::Denied,
            format!(
                "`{repository}` is a pull repository: steps read its manifests and blobs and push nothing to it; steps may push to {}",
                allowed(shared)
            ),
        )),
    }
}

/// A refusal for an upstream that could not be asked: 502, naming the
/// repository and what the upstream said (custody's registry errors carry
/// no credential).
fn upstream_failed(repository: &Repository, what: &str, error: &BoxError) -> Refusal {
    Refusal {
        status: StatusCode::BAD_GATEWAY,
        ..Refusal::new(
            Code::Denied,
            format!("reading {what} of pull repository `{repository}` failed: {error}"),
        )
    }
}

async fn pull_manifest(
    shared: &Shared,
    repository: &Repository,
    reference: &str,
    head: bool,
) -> Result<Response, Refusal> {
    let reference = parse_reference(reference)?;
    let manifest = shared
        .upstream
        .manifest(repository, &reference)
        .await
        .map_err(|e| upstream_failed(repository, &format!("manifest `{reference}`"), &e))?
        .ok_or_else(|| unknown_manifest(repository, &reference))?;
    if !head {
        // What a step read is what it may have built on; a HEAD only
        // learns a digest, which the step must then read to use.
        shared
            .pulled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((repository.clone(), manifest.digest.to_string()));
    }
    let size = manifest.bytes.len() as u64;
    let body = if head {
        Body::empty()
    } else {
        Body::from(manifest.bytes)
    };
    Ok(manifest_found(
        &manifest.digest,
        size,
        &manifest.media_type,
        body,
    ))
}

async fn pull_blob(
    shared: &Shared,
    repository: &Repository,
    digest: &str,
    head: bool,
) -> Result<Response, Refusal> {
    let digest = parse_digest(digest)?;
    let what = format!("blob `{digest}`");
    let size = shared
        .upstream
        .blob_size(repository, &digest)
        .await
        .map_err(|e| upstream_failed(repository, &what, &e))?
        .ok_or_else(|| unknown_blob(repository, &digest))?;
    let body = if head {
        Body::empty()
    } else {
        let stream = shared
            .upstream
            .blob(repository, &digest, size)
            .await
            .map_err(|e| upstream_failed(repository, &what, &e))?;
        Body::from_stream(stream)
    };
    Ok(blob_found(&digest, size, body))
}

/// The query parameters the API uses.
#[derive(Default)]
struct Query {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
    n: Option<usize>,
    last: Option<String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let mut parsed = Query::default();
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let value = value.into_owned();
            match key.as_ref() {
                // The spec allows several; the first is checked (and a
                // blob matches only one digest anyway).
                "digest" if parsed.digest.is_none() => parsed.digest = Some(value),
                "mount" => parsed.mount = Some(value),
                "from" => parsed.from = Some(value),
                "n" => parsed.n = value.parse().ok(),
                "last" => parsed.last = Some(value),
                _ => {}
            }
        }
        parsed
    }
}

fn parse_digest(text: &str) -> Result<Digest, Refusal> {
    custody_oci::digest::parse(text).map_err(|e| Refusal::new(Code::DigestInvalid, e.to_string()))
}

/// A digest an upload is to end as: uploads are hashed with sha256 while
/// they stream, so that is the algorithm taken.
fn upload_digest(text: &str) -> Result<Digest, Refusal> {
    let digest = parse_digest(text)?;
    if digest.algorithm() != &DigestAlgorithm::Sha256 {
        return Err(Refusal::new(
            Code::Unsupported,
            format!("the gateway takes blobs named by sha256 digests, not `{digest}`"),
        ));
    }
    Ok(digest)
}

async fn get_blob(
    shared: &Shared,
    repository: &Repository,
    digest: &str,
    head: bool,
) -> Result<Response, Refusal> {
    let digest = parse_digest(digest)?;
    let Some(size) = shared.store.blob_size(repository, &digest) else {
        // The destination's copy lets a builder skip the upload; the bytes
        // are not the gateway's to serve.
        if head && let Some(size) = shared.destination_size(repository, &digest).await {
            return Ok(blob_found(&digest, size, Body::empty()));
        }
        return Err(unknown_blob(repository, &digest));
    };
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(
            shared
                .store
                .read_blob(&digest, size, "application/octet-stream"),
        )
    };
    Ok(blob_found(&digest, size, body))
}

fn blob_found(digest: &Digest, size: u64, body: Body) -> Response {
    manifest_found(digest, size, "application/octet-stream", body)
}

/// A manifest or blob answered (`body` empty for a `HEAD`): its length,
/// media type and digest.
fn manifest_found(digest: &Digest, size: u64, media_type: &str, body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    headers.insert(header::CONTENT_TYPE, header_value(media_type));
    headers.insert(CONTENT_DIGEST, header_value(digest.as_ref()));
    response
}

fn unknown_blob(repository: &Repository, digest: &Digest) -> Refusal {
    Refusal::new(
        Code::BlobUnknown,
        format!("`{repository}` holds no blob `{digest}`"),
    )
}

fn unknown_manifest(repository: &Repository, reference: &impl std::fmt::Display) -> Refusal {
    Refusal::new(
        Code::ManifestUnknown,
        format!("`{repository}` holds no manifest `{reference}`"),
    )
}

async fn start_upload(
    shared: &Shared,
    repository: &Repository,
    query: &Query,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    if let (Some(mount), Some(from)) = (&query.mount, &query.from) {
        // A mount that cannot be made is an ordinary upload (spec,
        // "Mounting a blob from another repository"): 202 below.
        if let (Ok(digest), Ok(from)) = (parse_digest(mount), from.parse::<Repository>())
            && shared.store.declared().contains(&from)
            && shared.store.mount(repository, &from, &digest)
        {
            return Ok(blob_created(repository, &digest));
        }
    }
    if let Some(digest) = &query.digest {
        // Monolithic: the whole blob in this POST.
        let digest = upload_digest(digest)?;
        refuse_over_limit(shared, headers)?;
        let upload = shared.new_upload(repository).await?;
        let upload = shared.store.append(upload, body.into_data_stream()).await?;
        shared.store.finish(upload, &digest).await?;
        return Ok(blob_created(repository, &digest));
    }
    let upload = shared.new_upload(repository).await?;
    let id = shared.store.open_session(upload)?.to_string();
    Ok(upload_status(StatusCode::ACCEPTED, repository, &id, 0))
}

async fn patch_upload(
    shared: &Shared,
    repository: &Repository,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let mut taken = shared.store.take(repository, id)?;
    let written = taken.upload.as_ref().map_or(0, |u| u.written());
    if let Err(refusal) = check_range(headers, written) {
        shared.store.put_back(taken);
        return Err(refusal.with_range(range(written)));
    }
    refuse_over_limit(shared, headers)?;
    let upload = taken
        .upload
        .take()
        .expect("a taken session holds its upload");
    let upload = shared.store.append(upload, body.into_data_stream()).await?;
    let written = upload.written();
    taken.upload = Some(upload);
    shared.store.put_back(taken);
    Ok(upload_status(StatusCode::ACCEPTED, repository, id, written))
}

async fn finish_upload(
    shared: &Shared,
    repository: &Repository,
    id: &str,
    query: &Query,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let mut taken = shared.store.take(repository, id)?;
    let written = taken.upload.as_ref().map_or(0, |u| u.written());
    let checked = match &query.digest {
        None => Err(Refusal::new(
            Code::DigestInvalid,
            "finishing an upload needs `?digest=sha256:…`",
        )),
        Some(digest) => upload_digest(digest),
    }
    .and_then(|digest| {
        check_range(headers, written).map_err(|r| r.with_range(range(written)))?;
        Ok(digest)
    });
    let digest = match checked {
        Ok(digest) => digest,
        Err(refusal) => {
            // Nothing was sent to it: the client may still finish properly.
            shared.store.put_back(taken);
            return Err(refusal);
        }
    };
    refuse_over_limit(shared, headers)?;
    let upload = taken
        .upload
        .take()
        .expect("a taken session holds its upload");
    let upload = shared.store.append(upload, body.into_data_stream()).await?;
    shared.store.finish(upload, &digest).await?;
    // `taken` drops here, with the session.
    Ok(blob_created(repository, &digest))
}

/// A chunk's `Content-Range` (`<start>-<end>`, inclusive) must continue
/// the upload where it stands (spec, "Pushing a blob in chunks"); a
/// client that sends none streams from where it stands.
fn check_range(headers: &HeaderMap, written: u64) -> Result<(), Refusal> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(());
    };
    let invalid = |why: String| Refusal::new(Code::RangeInvalid, why);
    let text = value
        .to_str()
        .map_err(|_| invalid("`Content-Range` is not text".into()))?;
    let (start, end) = text
        .trim()
        .trim_start_matches("bytes ")
        .split_once('-')
        .and_then(|(s, e)| Some((s.parse::<u64>().ok()?, e.parse::<u64>().ok()?)))
        .ok_or_else(|| invalid(format!("`Content-Range: {text}` is not `<start>-<end>`")))?;
    if start != written || end < start {
        return Err(invalid(format!(
            "the chunk `{start}-{end}` does not continue the upload, which holds {written} bytes"
        )));
    }
    if let Some(length) = content_length(headers)
        && length != end - start + 1
    {
        return Err(invalid(format!(
            "`Content-Range: {start}-{end}` is {} bytes but `Content-Length` is {length}",
            end - start + 1
        )));
    }
    Ok(())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A body announced larger than what is left of the budget is refused
/// before a byte of it is read. (One without a length is counted as it
/// streams.)
fn refuse_over_limit(shared: &Shared, headers: &HeaderMap) -> Result<(), Refusal> {
    match content_length(headers) {
        Some(length) if shared.store.bytes_stored().saturating_add(length) > shared.limit => {
            Err(Refusal::over_limit(shared.limit))
        }
        _ => Ok(()),
    }
}

/// The `Range` of an upload holding `written` bytes, as distribution
/// writes it: inclusive, `0-0` when empty.
fn range(written: u64) -> String {
    format!("0-{}", written.saturating_sub(1))
}

fn upload_status(status: StatusCode, repository: &Repository, id: &str, written: u64) -> Response {
    let mut response = empty(status);
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        header_value(&format!("/v2/{repository}/blobs/uploads/{id}")),
    );
    headers.insert(header::RANGE, header_value(&range(written)));
    headers.insert(UPLOAD_UUID, header_value(id));
    headers.insert(UPLOAD_SESSION, header_value(id));
    response
}

fn blob_created(repository: &Repository, digest: &Digest) -> Response {
    let mut response = empty(StatusCode::CREATED);
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        header_value(&format!("/v2/{repository}/blobs/{digest}")),
    );
    headers.insert(CONTENT_DIGEST, header_value(digest.as_ref()));
    response
}

async fn put_manifest(
    shared: &Shared,
    repository: &Repository,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let reference = parse_reference(reference)?;
    if let Reference::Tag(tag) = &reference
        && tag.is_attestation_schema()
    {
        return Err(Refusal::new(
            Code::Denied,
            format!(
                "`{tag}` is in the tag schema of attestations and signatures (`sha256-<hex>`, `.att`, `.sig`), which only the platform writes; tag the image with another name, or push it by digest"
            ),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_MANIFEST_SIZE as usize)
        .await
        .map_err(|_| {
            Refusal::new(
                Code::ManifestInvalid,
                format!("a manifest may be at most {MAX_MANIFEST_SIZE} bytes"),
            )
        })?;
    let digest = match &reference {
        Reference::Digest(expected) => {
            let actual = hash(expected.algorithm(), &bytes)?;
            if &actual != expected {
                return Err(Refusal::new(
                    Code::DigestInvalid,
                    format!(
                        "the manifest hashes to `{actual}`, not `{expected}`; nothing was kept"
                    ),
                ));
            }
            actual
        }
        Reference::Tag(_) => hash(&DigestAlgorithm::Sha256, &bytes)?,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let parsed = manifest::parse(&bytes, content_type)?;
    let missing = shared
        .store
        .missing(repository, &parsed.blobs, &parsed.children);
    let mut unknown = Vec::new();
    for digest in missing {
        let held = if parsed.children.contains(&digest) {
            shared.destination_has_manifest(repository, &digest).await
        } else {
            shared.destination_size(repository, &digest).await.is_some()
        };
        if !held {
            unknown.push(format!("`{digest}`"));
        }
    }
    if !unknown.is_empty() {
        return Err(Refusal::new(
            Code::ManifestBlobUnknown,
            format!(
                "the manifest names {} that `{repository}` was not given and its destination does not hold: {}; push {} first",
                if unknown.len() == 1 {
                    "content"
                } else {
                    "contents"
                },
                unknown.join(", "),
                if unknown.len() == 1 { "it" } else { "them" },
            ),
        ));
    }
    let tag = match reference {
        Reference::Tag(tag) => Some(tag),
        Reference::Digest(_) => None,
    };
    shared
        .store
        .put_manifest(repository, bytes, &digest, parsed, tag)
        .await?;
    let mut response = empty(StatusCode::CREATED);
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        header_value(&format!("/v2/{repository}/manifests/{digest}")),
    );
    headers.insert(CONTENT_DIGEST, header_value(digest.as_ref()));
    Ok(response)
}

fn parse_reference(text: &str) -> Result<Reference, Refusal> {
    if text.contains(':') {
        Ok(Reference::Digest(parse_digest(text)?))
    } else {
        text.parse::<Tag>()
            .map(Reference::Tag)
            .map_err(|e| Refusal::new(Code::TagInvalid, e.to_string()))
    }
}

fn hash(algorithm: &DigestAlgorithm, bytes: &[u8]) -> Result<Digest, Refusal> {
    let mut hasher =
        Hasher::new(algorithm).map_err(|e| Refusal::new(Code::DigestInvalid, e.to_string()))?;
    hasher.update(bytes);
    Ok(hasher.finish())
}

async fn get_manifest(
    shared: &Shared,
    repository: &Repository,
    reference: &str,
    head: bool,
) -> Result<Response, Refusal> {
    let reference = parse_reference(reference)?;
    let held = shared
        .store
        .manifest(repository, &reference)
        .ok_or_else(|| unknown_manifest(repository, &reference))?;
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(
            shared
                .store
                .read_blob(&held.digest, held.size, &held.media_type),
        )
    };
    Ok(manifest_found(
        &held.digest,
        held.size,
        &held.media_type,
        body,
    ))
}

fn tags(shared: &Shared, repository: &Repository, query: &Query) -> Response {
    let tags: Vec<String> = shared
        .store
        .tags(repository)
        .into_iter()
        .map(|t| t.to_string())
        .filter(|t| query.last.as_ref().is_none_or(|last| t > last))
        .take(query.n.unwrap_or(usize::MAX))
        .collect();
    let body = serde_json::json!({"name": repository.as_str(), "tags": tags});
    let mut response = Response::new(Body::from(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn empty(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    response
}

/// A header value from text the gateway made (digests, ids, names, media
/// types it accepted).
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
