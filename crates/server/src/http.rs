//! The HTTP API: routes, bearer-token auth, JSON errors, log streaming.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use custody_daemon::policy::check_spec_path;
use custody_daemon::queue::Queue;
use custody_daemon::record::{BuildId, BuildIdPrefix, Timestamp};
use custody_daemon::source::BuildSource;
use custody_daemon::spec;
use custody_daemon::store::{self, BuildDetail, CancelOutcome, StoreError};
use custody_wire::TokenDigest;
use futures_util::{Stream, StreamExt as _};
use serde::Deserialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::{
    Build, BuildList, BuildState, ErrorBody, ErrorCode, ErrorDetail, KeyList, LogEvent, LogStream,
    Output, Step, StepState, SubmitRequest,
};
use crate::follow::{self, Followers, Next, Subscription, Update};
use crate::metrics::Metrics;

/// The most builds one list page holds.
const MAX_PAGE: i64 = 500;
/// Specs are small; anything bigger is a mistake.
const MAX_BODY: usize = 1 << 20;
/// How long a request body (at most [`MAX_BODY`]) may take to arrive, all
/// of it: a client trickling one is answered `request_timeout`.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Log streams one token may hold open at once unless the configuration
/// says otherwise: each is a connection and a task for as long as its build
/// runs.
pub const DEFAULT_MAX_STREAMS_PER_TOKEN: usize = 64;

/// What every handler shares.
pub struct App {
    pub queue: Arc<Queue>,
    /// SHA-256 of each accepted token: compared in constant time, and the
    /// tokens themselves are not kept.
    token_digests: Vec<TokenDigest>,
    pub metrics: Arc<Metrics>,
    pub keys: KeyList,
    pub shutting_down: AtomicBool,
    /// Ended builds as served: an ended build never changes again, so its
    /// answer is kept rather than read from the store for every poll.
    ended: std::sync::Mutex<std::collections::HashMap<BuildId, axum::body::Bytes>>,
    /// One store poll per followed build, shared by its followers.
    pub followers: Arc<Followers>,
    /// Log streams open now, by token (as in `token_digests`).
    streams: Arc<[AtomicUsize]>,
    /// The most log streams one token may hold open.
    max_streams_per_token: usize,
    /// What `/metrics` wants, if anything.
    metrics_digest: Option<TokenDigest>,
}

/// How many ended builds' answers are kept (about 1 KiB each).
const ENDED_CACHE: usize = 4096;

impl App {
    pub fn new(
        queue: Arc<Queue>,
        tokens: &[String],
        metrics_token: Option<&str>,
        max_streams_per_token: usize,
        metrics: Arc<Metrics>,
        keys: KeyList,
    ) -> Self {
        let followers = Followers::new(queue.service().store.clone());
        Self {
            queue,
            token_digests: tokens
                .iter()
                .map(|t| TokenDigest::of(t.as_bytes()))
                .collect(),
            metrics,
            keys,
            shutting_down: AtomicBool::new(false),
            ended: Default::default(),
            followers,
            streams: tokens.iter().map(|_| AtomicUsize::new(0)).collect(),
            max_streams_per_token,
            metrics_digest: metrics_token.map(|t| TokenDigest::of(t.trim().as_bytes())),
        }
    }

    /// Which token `presented` is (compared by digest, in constant time,
    /// every one of them).
    fn caller(&self, presented: &str) -> Option<Caller> {
        TokenDigest::position(&self.token_digests, presented.as_bytes())
            .map(|token| Caller { token })
    }

    /// A slot for one more log stream of `caller`'s, unless its token holds
    /// as many as one may already.
    fn open_stream(&self, caller: Caller) -> Result<StreamSlot, ApiError> {
        let open = &self.streams[caller.token];
        let before = open.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot {
            streams: self.streams.clone(),
            token: caller.token,
        };
        if before >= self.max_streams_per_token {
            drop(slot);
            return Err(ApiError::new(
                ErrorCode::TooManyStreams,
                format!(
                    "this token holds {} log streams already, the most one may \
                     (`max_streams_per_token`); close one first",
                    self.max_streams_per_token
                ),
            ));
        }
        Ok(slot)
    }
}

/// Who made a request: the index of the token it carried.
#[derive(Clone, Copy, Debug)]
struct Caller {
    token: usize,
}

/// One open log stream, counted against its token until dropped (when the
/// stream ends or its client goes away).
struct StreamSlot {
    streams: Arc<[AtomicUsize]>,
    token: usize,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.streams[self.token].fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "custody",
        description = "Builds whose outputs can be trusted: queue builds, follow them, fetch their signed provenance."
    ),
    // Named only in descriptions (the `data` of `log` server-sent events),
    // so listed here to be defined.
    components(schemas(LogEvent, LogStream)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// The whole service: `/api/v1/…` behind the token, the probes and metrics
/// open.
pub fn router(app: Arc<App>) -> Router {
    let (api, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(submit, list))
        .routes(routes!(show))
        .routes(routes!(logs))
        .routes(routes!(cancel))
        .routes(routes!(retry))
        .routes(routes!(provenance))
        .routes(routes!(keys))
        .split_for_parts();
    openapi.paths.paths = std::mem::take(&mut openapi.paths.paths)
        .into_iter()
        .map(|(path, item)| (format!("/api/v1{path}"), item))
        .collect();
    let openapi = Arc::new(openapi);
    let api = api
        .route(
            "/openapi.json",
            get(move || {
                let openapi = openapi.clone();
                async move { Json(openapi.as_ref().clone()) }
            }),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/api/v1", api)
        .route("/", get(front_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// An API error: a status, a stable code and a message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            detail: ErrorDetail {
                code,
                message: message.into(),
                line: None,
                column: None,
            },
        }
    }

    fn not_found(id: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::NotFound, format!("no build `{id}`"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("the store failed: {e}");
        Self::new(
            ErrorCode::Unavailable,
            "the job store is not answering; try again",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"custody\""),
            );
        }
        response
    }
}

/// What someone who opens the server's address in a browser sees: where
/// the API and its description are.
async fn front_page() -> &'static str {
    "custody serve: a build service whose outputs can be trusted.\n\n\
     API:      /api/v1 (every request needs `Authorization: Bearer TOKEN`)\n\
     OpenAPI:  /api/v1/openapi.json\n\
     Health:   /healthz, /readyz\n\
     CLI:      CUSTODY_SERVER=<this address> custody builds list\n"
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not take that method",
    )
}

async fn require_token(
    State(app): State<Arc<App>>,
    mut request: Request,
    next: middleware::Next,
) -> Result<Response, ApiError> {
    let Some(presented) = bearer(request.headers()) else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "send `Authorization: Bearer TOKEN` (the CLI reads CUSTODY_TOKEN)",
        ));
    };
    let Some(caller) = app.caller(presented) else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "the token is not one this service accepts",
        ));
    };
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// JSON bodies whose rejections are API errors too.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // All of the body within the deadline, not just each piece of it:
        // a client trickling a byte at a time holds nothing for long.
        tokio::time::timeout(BODY_READ_TIMEOUT, Json::<T>::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::RequestTimeout,
                    format!(
                        "the request body did not arrive within {} s",
                        BODY_READ_TIMEOUT.as_secs()
                    ),
                )
            })?
            .map(|Json(v)| ApiJson(v))
            .map_err(|e: JsonRejection| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))
    }
}

/// A build id in the path, whole or shortened to a prefix only one build
/// begins with (like a git commit); one that cannot begin a build id is no
/// build.
pub struct BuildPath(pub BuildId);

impl FromRequestParts<Arc<App>> for BuildPath {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Arc<App>,
    ) -> Result<Self, ApiError> {
        let Path(text) = Path::<String>::from_request_parts(parts, app)
            .await
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))?;
        if let Some(id) = BuildId::parse(&text) {
            return Ok(BuildPath(id));
        }
        let prefix = BuildIdPrefix::parse(&text).ok_or_else(|| ApiError::not_found(&text))?;
        let store = &app.queue.service().store;
        let mut found = store.ids_starting(&prefix, 3).await?;
        match found.len() {
            0 => Err(ApiError::not_found(&text)),
            1 => Ok(BuildPath(found.remove(0))),
            _ => {
                let named: Vec<&str> = found.iter().map(BuildId::as_str).collect();
                Err(ApiError::new(
                    ErrorCode::AmbiguousId,
                    format!(
                        "`{prefix}` begins more than one build ({}{}); give more of the id",
                        named[..2].join(", "),
                        if named.len() > 2 { ", …" } else { "" }
                    ),
                ))
            }
        }
    }
}

/// Query strings whose rejections are API errors too.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))
    }
}

/// Queue a build.
///
/// The build's spec is read from its source at the resolved commit
/// (`spec_path`, default `custody.yaml`). Where the operator allows inline
/// specs, `spec` may carry the spec's text instead: it is checked first
/// (`invalid_spec` with the line and column at fault) and recorded as
/// inline in the provenance. Sources and destinations outside the
/// service's policy are refused (`refused_by_policy`, naming the rule).
#[utoipa::path(
    post, path = "/builds", request_body = SubmitRequest,
    responses(
        (status = 201, description = "Queued", body = Build,
            headers(("Location" = String, description = "The build's URL: `/api/v1/builds/{id}`"))),
        (status = 400, description = "Bad request or spec, refused by policy, or a secret the spec names that the service does not define (`unknown_secret`) or the source may not use (`secret_not_allowed`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
    )
)]
async fn submit(
    State(app): State<Arc<App>>,
    ApiJson(request): ApiJson<SubmitRequest>,
) -> Result<Response, ApiError> {
    let service = app.queue.service();
    let policy = service.policy.clone().unwrap_or_default();
    check_spec_path(&request.spec_path)
        .map_err(|message| ApiError::new(ErrorCode::InvalidRequest, message))?;
    let spec_path = std::path::PathBuf::from(&request.spec_path);
    let inline = match &request.spec {
        Some(_) if !policy.allow_inline_specs => {
            return Err(ApiError::new(
                ErrorCode::RefusedByPolicy,
                "this service reads each build's spec from its source: send `spec_path` \
                 (default `custody.yaml`) instead of the spec's text (`allow_inline_specs` \
                 is off)",
            ));
        }
        Some(text) => Some(spec::parse(text, &spec_path).map_err(|e| {
            let mut error = ApiError::new(ErrorCode::InvalidSpec, e.to_string());
            error.detail.line = (e.line > 0).then_some(e.line);
            error.detail.column = (e.line > 0).then_some(e.column);
            error
        })?),
        None => None,
    };
    let asked = request
        .source
        .map(|source| {
            // Credentials in a source URL would be stored and signed.
            let git = spec::GitUrl::parse(&source.git).map_err(|e| {
                let message = match e.hint() {
                    Some(hint) => format!("`source.git`: {e}; {hint}"),
                    None => format!("`source.git`: {e}"),
                };
                ApiError::new(ErrorCode::InvalidRequest, message)
            })?;
            let path = spec::WorkDir::parse(source.path.as_deref().unwrap_or("")).map_err(|e| {
                ApiError::new(ErrorCode::InvalidRequest, format!("`source.path`: {e}"))
            })?;
            Ok::<_, ApiError>(spec::GitSource {
                git,
                revision: source.revision,
                path,
            })
        })
        .transpose()?;
    let spec_source = inline.as_ref().and_then(|spec| spec.source.as_ref());
    let Some(BuildSource::Git(source)) = BuildSource::choose(asked, spec_source, None) else {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "name the git source to build: `source` in the request (or in an inline spec)",
        ));
    };
    if source.revision.trim().is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "`source.revision` must not be empty",
        ));
    }
    // Refused now where it can be said now; the build checks again (and
    // on the address it connects to) when it runs.
    let refused =
        |rule: String| ApiError::new(ErrorCode::RefusedByPolicy, format!("`source.git`: {rule}"));
    policy.sources.check(&source.git).map_err(refused)?;
    match tokio::time::timeout(SUBMIT_DNS_TIMEOUT, policy.sources.refusal(&source.git)).await {
        Ok(Err(refusal)) if !refusal.unresolved => return Err(refused(refusal.message)),
        _ => {}
    }
    if let Some(spec) = &inline {
        check_destinations(&policy.destinations, spec)?;
        // A spec from the source is checked the same way when the build
        // plans, before any runner starts.
        service
            .secrets
            .check(spec, Some(&source.git), true)
            .map_err(secret_refused)?;
    }
    let id = service
        .enqueue(
            &request.spec_path,
            request.spec.as_deref().map(str::as_bytes),
            &source,
            None,
        )
        .await?;
    created(&app, &id).await
}

/// The answer to a build just queued: 201, its URL in `Location`, and the
/// build as stored now (queued, unless a daemon's poll claimed it already;
/// waking the queue claims it at once).
async fn created(app: &App, id: &BuildId) -> Result<Response, ApiError> {
    let detail = app
        .queue
        .service()
        .store
        .build_detail(id)
        .await?
        .ok_or_else(|| ApiError::not_found(id))?;
    app.queue.wake();
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/v1/builds/{id}"))],
        Json(to_build(detail)),
    )
        .into_response())
}

/// Retry a build: a new build of the same spec at the same commit.
///
/// The new build reads the same spec (the same `spec_path`, or the same
/// inline text) from the same repository at the commit the retried build
/// resolved, not at its branch again; it records which build it retries
/// (`retry_of`). A build that failed before it resolved a commit is
/// retried as it was asked for. The service's policy applies as to any
/// submission.
#[utoipa::path(
    post, path = "/builds/{id}/retry", params(("id" = String, Path, description = "The build to retry")),
    responses(
        (status = 201, description = "The new build, queued", body = Build,
            headers(("Location" = String, description = "The new build's URL: `/api/v1/builds/{id}`"))),
        (status = 400, description = "Refused by policy, or not a build of a git source", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such build", body = ErrorBody),
    )
)]
async fn retry(
    State(app): State<Arc<App>>,
    BuildPath(id): BuildPath,
) -> Result<Response, ApiError> {
    let service = app.queue.service();
    let recorded = service
        .store
        .recorded(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(&id))?;
    let BuildSource::Git(mut source) = recorded.source else {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("build `{id}` built a local directory, which the service cannot fetch again"),
        ));
    };
    if let Some(commit) = recorded.commit {
        source.revision = commit;
    }
    let policy = service.policy.clone().unwrap_or_default();
    if recorded.spec.is_some() && !policy.allow_inline_specs {
        return Err(ApiError::new(
            ErrorCode::RefusedByPolicy,
            format!(
                "build `{id}` ran an inline spec, which this service no longer accepts \
                 (`allow_inline_specs` is off)"
            ),
        ));
    }
    policy.sources.check(&source.git).map_err(|rule| {
        ApiError::new(ErrorCode::RefusedByPolicy, format!("`source.git`: {rule}"))
    })?;
    let new = service
        .enqueue(
            &recorded.spec_path,
            recorded.spec.as_deref(),
            &source,
            Some(&id),
        )
        .await?;
    created(&app, &new).await
}

/// A secret the spec may not have, located in the spec.
fn secret_refused(refusal: custody_daemon::secrets::SecretRefusal) -> ApiError {
    use custody_daemon::secrets::SecretRefusal;
    let code = match &refusal {
        SecretRefusal::Unknown { .. } => ErrorCode::UnknownSecret,
        _ => ErrorCode::SecretNotAllowed,
    };
    let (line, column) = refusal.location();
    let mut error = ApiError::new(code, refusal.to_string());
    error.detail.line = (line > 0).then_some(line);
    error.detail.column = (line > 0).then_some(column);
    error
}

/// How long a submission waits for its source's name to resolve before
/// leaving the address check to the build.
const SUBMIT_DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// An inline spec's destinations against the policy, as far as they can
/// be known before the build runs (templates filled with placeholders).
fn check_destinations(
    policy: &custody_daemon::policy::DestinationPolicy,
    spec: &spec::Spec,
) -> Result<(), ApiError> {
    let values = spec::Values {
        revision: "revision",
        commit: "0000000000000000000000000000000000000000",
        job: "00000000-0000-7000-8000-000000000000",
    };
    for to in spec.output_destinations() {
        let Ok(location) = to.resolve(&values) else {
            continue; // the build says what is wrong with the template
        };
        policy.check(&location).map_err(|rule| {
            let mut error = ApiError::new(
                ErrorCode::RefusedByPolicy,
                format!("destination `{}`: {rule}", to.template()),
            );
            error.detail.line = Some(to.line);
            error.detail.column = Some(to.column);
            error
        })?;
    }
    Ok(())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only builds in this state.
    state: Option<BuildState>,
    /// At most this many (1–500, default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Only builds older than this id: the previous page's `next`.
    before: Option<String>,
}

/// List builds, newest first.
#[utoipa::path(
    get, path = "/builds", params(ListQuery),
    responses(
        (status = 200, description = "A page of builds", body = BuildList),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
    )
)]
async fn list(
    State(app): State<Arc<App>>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<BuildList>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("`limit` must be 1 to {MAX_PAGE}, not {limit}"),
        ));
    }
    let before = query
        .before
        .as_deref()
        .map(|text| {
            BuildId::parse(text).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("`before` `{text}` is not a build id: pass a page's `next`"),
                )
            })
        })
        .transpose()?;
    let state = query.state.map(to_store_state);
    let store = &app.queue.service().store;
    let records = store.list(state, before.as_ref(), limit).await?;
    let next = (records.len() as i64 == limit)
        .then(|| records.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(Json(BuildList {
        builds: store
            .details(records)
            .await?
            .into_iter()
            .map(to_build)
            .collect(),
        next,
    }))
}

/// Show one build: the commit it resolved, its steps and what it pushed.
#[utoipa::path(
    get, path = "/builds/{id}", params(("id" = String, Path, description = "Build id")),
    responses(
        (status = 200, description = "The build", body = Build),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such build", body = ErrorBody),
    )
)]
async fn show(State(app): State<Arc<App>>, BuildPath(id): BuildPath) -> Result<Response, ApiError> {
    let cached = app.ended.lock().expect("not poisoned").get(&id).cloned();
    let body = match cached {
        Some(body) => body,
        None => {
            let detail = app
                .queue
                .service()
                .store
                .build_detail(&id)
                .await?
                .ok_or_else(|| ApiError::not_found(&id))?;
            let build = to_build(detail);
            let body =
                axum::body::Bytes::from(serde_json::to_vec(&build).expect("a build serialises"));
            if build.state.is_final() {
                let mut ended = app.ended.lock().expect("not poisoned");
                if ended.len() >= ENDED_CACHE {
                    ended.clear();
                }
                ended.insert(id, body.clone());
            }
            body
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    /// Keep the stream open until the build ends (default: send what is
    /// stored, then end).
    follow: Option<bool>,
    /// Only lines after this `seq` (also taken from `Last-Event-ID`).
    after: Option<i64>,
}

/// Stream a build's log as server-sent events.
///
/// `log` events carry a `LogEvent` (their `id` is its `seq`); the last
/// event, `end`, carries the `Build` once it has ended (or, without
/// `follow`, as it is now). A client that joins late gets the stored lines
/// first; one that reconnects with `Last-Event-ID` resumes after it.
#[utoipa::path(
    get, path = "/builds/{id}/logs",
    params(("id" = String, Path, description = "Build id"), LogsQuery),
    responses(
        (status = 200, description = "text/event-stream of `log` events, then one `end`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such build", body = ErrorBody),
        (status = 429, description = "This token holds as many log streams as one may", body = ErrorBody),
    )
)]
async fn logs(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    BuildPath(id): BuildPath,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let slot = app.open_stream(caller)?;
    if app.queue.service().store.build(&id).await?.is_none() {
        return Err(ApiError::not_found(&id));
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let after = query.after.or(resume).unwrap_or(-1);
    // Subscribed before the backlog is read, so no line falls between.
    let live = match query.follow.unwrap_or(false) {
        true => Some(app.followers.follow(&id).await?),
        false => None,
    };
    let reader = LogReader {
        app,
        id,
        after,
        live,
        catching_up: true,
        done: false,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(reader, |mut reader| async move {
        let events = reader.next_events().await?;
        Some((futures_util::stream::iter(events), reader))
    })
    .flatten();
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// One client's log stream: the stored lines in pages, then (following)
/// the build's shared updates, then `end`.
struct LogReader {
    app: Arc<App>,
    id: BuildId,
    /// The last `seq` sent.
    after: i64,
    /// The followed build's updates; `None` when not following.
    live: Option<Subscription>,
    /// Reading from the store rather than from `live`.
    catching_up: bool,
    done: bool,
    _slot: StreamSlot,
}

impl LogReader {
    /// The next events to send; `None` once `end` (or `error`) was sent.
    async fn next_events(&mut self) -> Option<Vec<Result<Event, Infallible>>> {
        if self.done {
            return None;
        }
        loop {
            if self.catching_up || self.live.is_none() {
                let store = &self.app.queue.service().store;
                // Not following, the state comes first: a build that had
                // ended by then has every line stored already.
                let now = match self.live {
                    Some(_) => None,
                    None => match store.build(&self.id).await {
                        Ok(record) => record,
                        Err(e) => return Some(self.failed(&e.to_string())),
                    },
                };
                let lines = match store.logs_after(&self.id, self.after, follow::PAGE).await {
                    Ok(lines) => lines,
                    Err(e) => return Some(self.failed(&e.to_string())),
                };
                if lines.len() < follow::PAGE as usize {
                    self.catching_up = false;
                }
                if !lines.is_empty() {
                    return Some(self.send(lines.into_iter()));
                }
                if self.live.is_none() {
                    let Some(record) = now else {
                        self.done = true;
                        return None;
                    };
                    let detail = match store.details(vec![record]).await {
                        Ok(mut details) => details.pop().expect("one record, one detail"),
                        Err(e) => return Some(self.failed(&e.to_string())),
                    };
                    return Some(self.end(to_build(detail)));
                }
            }
            let live = self.live.as_mut().expect("following");
            match live.next().await {
                Next::Update(Update::Lines(lines)) => {
                    let Some((first, _)) = lines.first() else {
                        continue;
                    };
                    if *first > self.after.saturating_add(1) {
                        // Lines between are in the store, not here.
                        self.catching_up = true;
                        continue;
                    }
                    let fresh = lines
                        .iter()
                        .filter(|(seq, _)| *seq > self.after)
                        .cloned()
                        .collect::<Vec<_>>();
                    if !fresh.is_empty() {
                        return Some(self.send(fresh.into_iter()));
                    }
                }
                Next::Update(Update::Ended(ended)) => {
                    // Every line came before this, and none was missed
                    // (that would have been `Behind` or a gap).
                    return Some(self.end(to_build(ended.as_ref().clone())));
                }
                Next::Update(Update::Failed) => return Some(self.failed("see the daemon's log")),
                Next::Behind => self.catching_up = true,
            }
        }
    }

    fn send(
        &mut self,
        lines: impl Iterator<Item = (i64, store::LogLine)>,
    ) -> Vec<Result<Event, Infallible>> {
        lines
            .map(|(seq, line)| {
                self.after = seq;
                Ok(log_event(seq, line))
            })
            .collect()
    }

    fn end(&mut self, build: Build) -> Vec<Result<Event, Infallible>> {
        self.done = true;
        let event = Event::default()
            .event("end")
            .json_data(&build)
            .expect("a build serialises");
        vec![Ok(event)]
    }

    fn failed(&mut self, why: &str) -> Vec<Result<Event, Infallible>> {
        tracing::error!("following {}: {why}", self.id);
        self.done = true;
        let event = Event::default().event("error").data("the job store failed");
        vec![Ok(event)]
    }
}

fn log_event(seq: i64, line: store::LogLine) -> Event {
    let event = LogEvent {
        seq,
        step: line.step,
        stream: if line.stream == 1 {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        },
        line: String::from_utf8_lossy(&line.line).into_owned(),
        time: line.time.unix_millis(),
    };
    Event::default()
        .event("log")
        .id(seq.to_string())
        .json_data(&event)
        .expect("a log line serialises")
}

/// Cancel a build.
///
/// A queued build is cancelled at once; a running one is stopped by the
/// daemon running it (its steps are killed, nothing is published).
#[utoipa::path(
    post, path = "/builds/{id}/cancel", params(("id" = String, Path, description = "Build id")),
    responses(
        (status = 202, description = "Cancelled, or being cancelled", body = Build),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such build", body = ErrorBody),
        (status = 409, description = "It had already ended", body = ErrorBody),
    )
)]
async fn cancel(
    State(app): State<Arc<App>>,
    BuildPath(id): BuildPath,
) -> Result<(StatusCode, Json<Build>), ApiError> {
    let store = &app.queue.service().store;
    let now = app.queue.config().clock.now();
    match store.cancel(&id, "cancelled through the API", now).await? {
        CancelOutcome::Cancelled => {}
        CancelOutcome::Requested => app.queue.cancel_local(&id),
        CancelOutcome::AlreadyEnded(state) => {
            return Err(ApiError::new(
                ErrorCode::AlreadyEnded,
                format!("build `{id}` already ended: {}", state.as_str()),
            ));
        }
        CancelOutcome::NotFound => return Err(ApiError::not_found(&id)),
    }
    let detail = store
        .build_detail(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(&id))?;
    Ok((StatusCode::ACCEPTED, Json(to_build(detail))))
}

/// Download a build's signed provenance: a DSSE envelope holding an
/// in-toto statement with SLSA Provenance v1.
#[utoipa::path(
    get, path = "/builds/{id}/provenance", params(("id" = String, Path, description = "Build id")),
    responses(
        (status = 200, description = "The DSSE envelope", content_type = "application/vnd.dsse.envelope.v1+json", body = Object),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such build, or it published none", body = ErrorBody),
    )
)]
async fn provenance(
    State(app): State<Arc<App>>,
    BuildPath(id): BuildPath,
) -> Result<Response, ApiError> {
    let store = &app.queue.service().store;
    match store.provenance(&id).await? {
        Some(envelope) => Ok((
            [(
                header::CONTENT_TYPE,
                "application/vnd.dsse.envelope.v1+json",
            )],
            envelope,
        )
            .into_response()),
        None => match store.build(&id).await? {
            None => Err(ApiError::not_found(&id)),
            Some(record) => Err(ApiError::new(
                ErrorCode::NoProvenance,
                format!(
                    "build `{id}` published no provenance (it is {}; only a succeeded build has one)",
                    record.state.as_str()
                ),
            )),
        },
    }
}

/// The public keys the service signs with.
#[utoipa::path(
    get, path = "/keys",
    responses(
        (status = 200, description = "Public keys", body = KeyList),
        (status = 401, description = "No or wrong token", body = ErrorBody),
    )
)]
async fn keys(State(app): State<Arc<App>>) -> Json<KeyList> {
    Json(app.keys.clone())
}

async fn readyz(State(app): State<Arc<App>>) -> Result<&'static str, ApiError> {
    if app.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::new(ErrorCode::Unavailable, "shutting down"));
    }
    app.queue.service().store.ping().await?;
    Ok("ready\n")
}

/// Prometheus metrics; behind `metrics_token` when one is set.
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    if let Some(wanted) = &app.metrics_digest {
        let presented = bearer(&headers).ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send `Authorization: Bearer METRICS_TOKEN` (`metrics_token` in the configuration)",
            )
        })?;
        if !TokenDigest::any_matches(std::slice::from_ref(wanted), presented.as_bytes()) {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "the token is not this service's metrics token",
            ));
        }
    }
    let counts = app.queue.service().store.count_by_state().await?;
    let text = app.metrics.render(&counts, app.queue.running());
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

fn to_store_state(state: BuildState) -> store::State {
    match state {
        BuildState::Queued => store::State::Queued,
        BuildState::Running => store::State::Running,
        BuildState::Succeeded => store::State::Succeeded,
        BuildState::Failed => store::State::Failed,
        BuildState::Cancelled => store::State::Cancelled,
    }
}

fn to_build(detail: BuildDetail) -> Build {
    let BuildDetail {
        record,
        outputs,
        steps,
    } = detail;
    let ended = !matches!(record.state, store::State::Queued | store::State::Running);
    Build {
        state: match record.state {
            store::State::Queued => BuildState::Queued,
            store::State::Running => BuildState::Running,
            store::State::Succeeded => BuildState::Succeeded,
            store::State::Failed => BuildState::Failed,
            store::State::Cancelled => BuildState::Cancelled,
        },
        source: record.source.to_json(),
        commit: record.commit,
        retry_of: record.retry_of.map(|id| id.to_string()),
        id: record.id.to_string(),
        spec_path: record.spec_path,
        created_at: record.created_at.rfc3339(),
        started_at: record.started_at.map(Timestamp::rfc3339),
        finished_at: record.finished_at.map(Timestamp::rfc3339),
        error: record.error,
        daemon: record.owner,
        cancel_requested: record
            .cancel_reason
            .filter(|_| matches!(record.state, store::State::Running | store::State::Queued)),
        has_provenance: record.has_provenance,
        steps: steps
            .into_iter()
            .map(|step| Step {
                name: step.name,
                state: match step.state {
                    store::StepState::Pending if ended => StepState::Skipped,
                    store::StepState::Running if ended => StepState::Interrupted,
                    store::StepState::Pending => StepState::Pending,
                    store::StepState::Running => StepState::Running,
                    store::StepState::Succeeded => StepState::Succeeded,
                    store::StepState::Failed => StepState::Failed,
                    store::StepState::TimedOut => StepState::TimedOut,
                },
                image: step.image.map(|d| d.to_string()),
                exit_code: step.exit_code,
                duration_ms: step.duration_ms,
            })
            .collect(),
        outputs: outputs
            .into_iter()
            .map(|o| Output {
                reference: o.reference,
                digest: o.digest.to_string(),
                size: o.size,
            })
            .collect(),
    }
}
