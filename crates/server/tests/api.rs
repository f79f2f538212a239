//! The HTTP API in-process: the real service (`serve::run`) on listeners
//! bound to free ports, stopped by a future, over SQLite or a throwaway
//! PostgreSQL, spoken to by a real HTTP client. What needs a process of
//! its own (signals, kill -9, the CLI) stays in `crates/cli/tests/serve.rs`.

use std::time::Duration;

use custody_daemon::bounds::StepBounds;
use custody_oci::registry::RegistryOptions;
use custody_server::config::{Config, Environment};
use custody_server::serve::{self, Listeners, ServeError};
use custody_testkit::postgres::Backend;

const TOKEN: &str = "test-token-5f2b";

/// A running service; `stop` ends it the way SIGTERM would.
struct Service {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    _dir: tempfile::TempDir,
}

impl Service {
    /// The service on `database_url` (SQLite when `None`), with `adjust`
    /// applied to its configuration.
    async fn start(database_url: Option<String>, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.path().join("data")),
            database_url,
            tokens: vec![TOKEN.into()],
            daemon_name: Some("api".into()),
            ..Config::default()
        };
        adjust(&mut config);
        let env = Environment {
            current_exe: Some("/nonexistent/custody".into()),
            hostname: "test".into(),
            ..Environment::default()
        };
        let settings = config
            .resolve(env, RegistryOptions::default(), StepBounds::default())
            .unwrap();
        let listeners = Listeners::bind(&settings).await.unwrap();
        let url = format!("http://{}", listeners.api.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve::run(
            settings,
            listeners,
            async {
                let _ = stopped.await;
            },
            |_| {},
        ));
        let service = Self {
            url,
            stop,
            task,
            _dir: dir,
        };
        service.wait_ready().await;
        service
    }

    async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = reqwest::get(format!("{}/readyz", self.url)).await
                && response.status() == 200
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the service did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

custody_testkit::on_both!(the_api_refuses_what_it_cannot_serve);

async fn the_api_refuses_what_it_cannot_serve(backend: Backend) {
    // Inline specs allowed: their errors are the API's to report.
    let service = Service::start(backend.url().map(str::to_owned), |config| {
        config.allow_inline_specs = Some(true);
    })
    .await;
    let http = reqwest::Client::new();
    let url = service.url.clone();

    for (token, why) in [(None, "no token"), (Some("wrong"), "wrong token")] {
        for path in ["/api/v1/builds", "/api/v1/openapi.json", "/api/v1/keys"] {
            let mut request = http.get(format!("{url}{path}"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{path} with {why}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
    }

    // The spec's own line and column, in the message and as fields.
    let response = http
        .post(format!("{url}/api/v1/builds"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({
            "spec": "steps:\n  - name: one\n    run: true\n    timeout: soon\n",
            "source": {"git": "file:///nowhere", "revision": "main"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_spec", "{body}");
    assert_eq!(body["error"]["line"], 4, "{body}");
    assert_eq!(body["error"]["column"], 14, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("custody.yaml:4:14: "), "{message}");

    // Credentials in a source URL would be stored and signed: refused, in
    // the request and in the spec, without repeating them; nothing stored.
    for (spec, source) in [
        (
            "steps:\n  - name: one\n    run: true\n".to_owned(),
            serde_json::json!({"git": "https://alice:tok3n-s3cret@example.org/app.git", "revision": "main"}),
        ),
        (
            "source:\n  git: https://tok3n-s3cret@example.org/app.git\nsteps:\n  - name: one\n    run: true\n".to_owned(),
            serde_json::Value::Null,
        ),
    ] {
        let mut body = serde_json::json!({ "spec": spec });
        if !source.is_null() {
            body["source"] = source;
        }
        let response = http
            .post(format!("{url}/api/v1/builds"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let text = response.text().await.unwrap();
        assert!(text.contains("carries credentials"), "{text}");
        assert!(!text.contains("tok3n-s3cret"), "{text}");
    }
    let listed = get_json(&url, "/api/v1/builds").await;
    assert_eq!(
        listed["builds"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );

    let response = http
        .post(format!("{url}/api/v1/builds"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");

    // Ids that cannot be build ids and ids of no build are both no build.
    for path in [
        "/api/v1/builds/01234567-no-such-build",
        "/api/v1/builds/01234567-no-such-build/logs",
        "/api/v1/builds/01234567-no-such-build/provenance",
        "/api/v1/builds/0196f7a0-aaaa-7bbb-8ccc-ddddeeeeffff",
        "/api/v1/builds/0196f7a0-aaaa-7bbb-8ccc-ddddeeeeffff/logs",
        "/api/v1/builds/0196f7a0-aaaa-7bbb-8ccc-ddddeeeeffff/provenance",
    ] {
        let response = http
            .get(format!("{url}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{body}");
    }
    let response = http
        .post(format!(
            "{url}/api/v1/builds/0196f7a0-aaaa-7bbb-8ccc-ddddeeeeffff/cancel"
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    for (query, says) in [
        ("limit=0", "`limit` must be 1 to"),
        ("before=../../etc", "`before` `../../etc` is not a build id"),
    ] {
        let response = http
            .get(format!("{url}/api/v1/builds?{query}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }

    // The OpenAPI document describes the routes it serves.
    let openapi = get_json(&url, "/api/v1/openapi.json").await;
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/builds",
        "/api/v1/builds/{id}",
        "/api/v1/builds/{id}/logs",
        "/api/v1/builds/{id}/cancel",
        "/api/v1/builds/{id}/provenance",
        "/api/v1/keys",
    ] {
        assert!(openapi["paths"].get(path).is_some(), "{path} missing");
    }
    // The probes and metrics need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = http.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // The address opened in a browser says where things are, not 404.
    let front = http.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(front.status(), 200);
    let text = front.text().await.unwrap();
    assert!(text.contains("/api/v1/openapi.json"), "{text}");
    service.stop().await;
}

/// GETs `path` with the token; the JSON it answers.
async fn get_json(url: &str, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// POSTs `body` as a build; the status and the error body.
async fn submit(url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/api/v1/builds"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Regression (attacks on a shared service, each with a valid token): a
/// submitted spec ran where the repository's own was expected; a source
/// named the daemon host's own repositories or services; a destination
/// wrote layouts anywhere the daemon can. Refused at submit, naming the
/// rule; nothing is queued.
#[tokio::test]
async fn what_the_policy_does_not_allow_is_refused_at_submit() {
    let service = Service::start(None, |_| {}).await;
    let url = service.url.clone();
    let source = |git: &str| serde_json::json!({"git": git, "revision": "main"});
    for (body, says) in [
        (
            serde_json::json!({
                "spec": "steps:\n  - name: backdoor\n    run: echo BACKDOOR\n",
                "source": source("https://git.example.org/app.git"),
            }),
            "`allow_inline_specs` is off",
        ),
        (
            serde_json::json!({"source": source("/root/secretrepo")}),
            "does not fetch local repositories",
        ),
        (
            serde_json::json!({"source": source("file:///root/secretrepo")}),
            "does not fetch local repositories",
        ),
        (
            serde_json::json!({"source": source("http://git.example.org/app.git")}),
            "does not fetch `http` sources",
        ),
        (
            serde_json::json!({"source": source("https://127.0.0.1:9/admin/x")}),
            "`127.0.0.1` is a loopback address",
        ),
        (
            serde_json::json!({"source": source("https://169.254.169.254/latest/meta-data")}),
            "link-local",
        ),
        (
            serde_json::json!({"source": source("ssh://git@10.1.2.3/app.git")}),
            "private address",
        ),
    ] {
        let (status, body) = submit(&url, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "refused_by_policy", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    let (status, body) = submit(
        &url,
        serde_json::json!({"spec_path": "../../etc/passwd", "source": source("https://git.example.org/app.git")}),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &"invalid_request".into()),
        "{body}"
    );

    // Where inline specs are allowed, their destinations are checked too.
    let open = Service::start(None, |config| {
        config.allow_inline_specs = Some(true);
        config.destinations.registries = vec!["registry.example:5000/team".into()];
        config.destinations.oci_roots = vec!["/srv/custody/layouts".into()];
    })
    .await;
    for (to, says) in [
        ("oci:/etc/cron.d:v1", "not under `destinations.oci_roots`"),
        ("oci:out/app:v1", "not under `destinations.oci_roots`"),
        (
            "registry.example:5000/other/app:{revision}",
            "not under `destinations.registries`",
        ),
        (
            "attacker.example/app:v1",
            "not under `destinations.registries`",
        ),
    ] {
        let spec = format!(
            "steps:\n  - name: a\n    run: 'true'\nartifacts:\n  - paths: [x]\n    to: {to}\n"
        );
        let (status, body) = submit(
            &open.url,
            serde_json::json!({"spec": spec, "source": source("https://git.example.org/app.git")}),
        )
        .await;
        assert_eq!(status, 400, "{to}: {body}");
        assert_eq!(body["error"]["code"], "refused_by_policy", "{body}");
        assert_eq!(body["error"]["line"], 6, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{to}: {message}");
    }
    let spec = "steps:\n  - name: a\n    run: 'true'\nartifacts:\n  - paths: [x]\n    to: registry.example:5000/team/app:{revision}\n";
    let (status, body) = submit(
        &open.url,
        serde_json::json!({"spec": spec, "source": source("https://git.example.org/app.git")}),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    for service in [&service, &open] {
        let listed = get_json(&service.url, "/api/v1/builds").await;
        let queued = listed["builds"].as_array().map_or(0, Vec::len);
        assert_eq!(
            queued,
            usize::from(std::ptr::eq(service, &open)),
            "{listed}"
        );
    }
    service.stop().await;
    open.stop().await;
}

/// The OpenAPI document is whole: every schema it references is defined
/// (`LogEvent` is named only by the log stream's description), every
/// error code the server answers is listed, and a build queued (submitted
/// or retried) is answered 201 with its `Location`.
#[tokio::test]
async fn the_openapi_document_defines_what_it_references() {
    let service = Service::start(None, |_| {}).await;
    let openapi = get_json(&service.url, "/api/v1/openapi.json").await;
    fn references(value: &serde_json::Value, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match value.as_str() {
                        Some(target) if key == "$ref" => found.push(target.to_owned()),
                        _ => references(value, found),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| references(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    references(&openapi, &mut found);
    let schemas = &openapi["components"]["schemas"];
    assert!(found.len() > 10, "{found:?}");
    for target in &found {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("`{target}` is not a schema reference"));
        assert!(schemas.get(name).is_some(), "`{target}` is not defined");
    }
    for name in [
        "LogEvent",
        "LogStream",
        "Step",
        "StepState",
        "Build",
        "Output",
    ] {
        assert!(schemas.get(name).is_some(), "{name} missing");
    }
    let codes: Vec<&str> = schemas["ErrorCode"]["enum"]
        .as_array()
        .or_else(|| schemas["ErrorCode"]["oneOf"].as_array())
        .unwrap_or_else(|| panic!("{}", schemas["ErrorCode"]))
        .iter()
        .flat_map(|v| {
            v.as_str().map(|s| vec![s]).unwrap_or_else(|| {
                v["enum"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|e| e.as_str())
                    .collect()
            })
        })
        .collect();
    for code in [
        "unauthorized",
        "invalid_request",
        "invalid_spec",
        "refused_by_policy",
        "not_found",
        "no_provenance",
        "already_ended",
        "method_not_allowed",
        "unavailable",
        "too_many_streams",
        "request_timeout",
    ] {
        assert!(codes.contains(&code), "`{code}` not in {codes:?}");
    }
    for path in ["/api/v1/builds", "/api/v1/builds/{id}/retry"] {
        let created = &openapi["paths"][path]["post"]["responses"]["201"];
        assert!(
            created["headers"].get("Location").is_some(),
            "{path}: {created}"
        );
    }
    let build = &schemas["Build"]["properties"];
    for field in ["commit", "steps", "outputs", "retry_of"] {
        assert!(build.get(field).is_some(), "Build.{field} missing");
    }
    service.stop().await;
}
