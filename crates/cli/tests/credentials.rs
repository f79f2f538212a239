//! Where `--creds` credentials may go, attacked as users run custody
//! (issue #12): a spec, a registry's answer or a redirect names another
//! registry, and that registry records what reached it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use custody_server::api::{BuildState, GitSource, SubmitRequest};
use custody_testkit::http::{Request, Response, Server};
use custody_testkit::image::{Image, LayoutWriter};
use custody_testkit::{Registry, free_port, git};

mod support;
use support::daemon::{Daemon, DaemonOptions};
use support::{CUSTODY, custody, text};

/// alice's password at the registry she has an account on.
const PASSWORD: &str = "s3cret-pw";

/// One request a server got: method, path and its `Authorization`.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn record(&self, request: &Request) {
        self.0.lock().unwrap().push(Seen {
            method: request.method.clone(),
            path: request.path.clone(),
            authorization: request.headers.get("authorization").cloned(),
        });
    }

    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

/// A registry on another port that serves `image` as `tools/busybox:v1`
/// to anyone, the way public registries do: `/v2/` asks for a Bearer
/// token from its own realm, which hands out anonymous tokens — and would
/// record a password sent there. Everything it is sent is in its log.
struct AttackerRegistry {
    server: Server,
    log: Log,
}

const ANONYMOUS_TOKEN: &str = "attacker-anonymous-token";

impl AttackerRegistry {
    fn start(image: &Image) -> Self {
        let log = Log::default();
        let port: Arc<OnceLock<u16>> = Arc::default();
        let blobs: Vec<(String, Vec<u8>)> = image
            .blobs()
            .chain(std::iter::once(&image.manifest))
            .map(|b| (b.digest.clone(), b.bytes.clone()))
            .collect();
        let manifest = image.manifest.bytes.clone();
        let server = {
            let log = log.clone();
            let port = port.clone();
            Server::start(move |request| {
                log.record(&request);
                if request.path == "/token" {
                    let body = format!(r#"{{"token":"{ANONYMOUS_TOKEN}","expires_in":300}}"#);
                    return Response::new(200, "application/json", body);
                }
                let bearer = format!("Bearer {ANONYMOUS_TOKEN}");
                if request.headers.get("authorization") != Some(&bearer) {
                    let challenge = format!(
                        "Bearer realm=\"http://127.0.0.1:{}/token\",service=\"attacker\"",
                        port.get().copied().unwrap_or_default()
                    );
                    return Response::new(401, "application/json", "{}")
                        .header("WWW-Authenticate", &challenge);
                }
                let path = request.path.as_str();
                if path == "/v2/" {
                    return Response::new(200, "application/json", "{}");
                }
                if path.starts_with("/v2/tools/busybox/manifests/") {
                    return Response::new(
                        200,
                        "application/vnd.oci.image.manifest.v1+json",
                        manifest.clone(),
                    );
                }
                let blob = path
                    .strip_prefix("/v2/tools/busybox/blobs/")
                    .and_then(|digest| blobs.iter().find(|(d, _)| d == digest));
                match blob {
                    Some((_, bytes)) => {
                        Response::new(200, "application/octet-stream", bytes.clone())
                    }
                    None => Response::new(404, "application/json", "{}"),
                }
            })
        };
        port.set(server.port).unwrap();
        Self { server, log }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.server.port)
    }

    /// Asserts that nothing of alice's reached it: no request to its token
    /// realm carried any `Authorization`, and its registry endpoints saw
    /// none but the anonymous token its own realm handed out.
    fn assert_got_no_credential(&self) {
        let seen = self.log.seen();
        assert!(
            seen.iter().any(|s| s.path.contains("/manifests/")),
            "the attack never reached the registry: {seen:?}"
        );
        let bearer = format!("Bearer {ANONYMOUS_TOKEN}");
        let leaked: Vec<&Seen> = seen
            .iter()
            .filter(|s| match &s.authorization {
                None => false,
                Some(_) if s.path == "/token" => true,
                Some(a) => a != &bearer,
            })
            .collect();
        assert!(
            leaked.is_empty(),
            "a credential went to a registry it is not for: {leaked:?}"
        );
    }
}

/// alice's registry: plain HTTP, htpasswd Basic auth.
fn alices_registry() -> Registry {
    Registry::builder().basic_auth("alice", PASSWORD).start()
}

/// A spec whose step runs an image from `image_host` and whose artifact
/// goes to `destination_host`.
fn spec(image_host: &str, destination_host: &str) -> String {
    format!(
        "steps:\n  - name: lure\n    image: {image_host}/tools/busybox:v1\n    run: echo ran-in-the-image\nartifacts:\n  - paths: [custody.yaml]\n    to: {destination_host}/t/app:v1\n"
    )
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn as_strs(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

/// Regression (issue #12): `custody build --creds HOST=USER:PASS` with a
/// step image on another registry: tag resolution (daemon) and the image
/// pull (runner) reach that registry without the credential, and the
/// build still pushes to the credential's registry with it.
#[test]
fn build_offers_a_credential_only_to_the_registry_it_names() {
    let registry = alices_registry();
    let dir = tempfile::tempdir().unwrap();
    let (_, image) = custody_testkit::image::busybox_layout(dir.path());
    let attacker = AttackerRegistry::start(&image);
    let src = dir.path().join("src");
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(
        src.join("custody.yaml"),
        spec(&attacker.host(), registry.host()),
    )
    .unwrap();
    let data = dir.path().join("data");
    let creds = format!("{}=alice:{PASSWORD}", registry.host());
    let list = args(&[
        "build",
        src.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--insecure-registry",
        registry.host(),
        "--insecure-registry",
        &attacker.host(),
        "--creds",
        &creds,
    ]);
    let output = custody(&as_strs(&list));
    attacker.assert_got_no_credential();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(
        text(&output).contains("ran-in-the-image"),
        "{}",
        text(&output)
    );
    assert!(registry.has_manifest("t/app", "v1"), "nothing was pushed");
    assert!(!text(&output).contains(PASSWORD), "{}", text(&output));
}

/// A bare `USER:PASS` names no registry; where a spec chooses them it is a
/// usage error that says how to name one, and that does not echo it.
#[test]
fn build_and_serve_refuse_a_credential_that_names_no_registry() {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(
        dir.path().join("custody.yaml"),
        "steps:\n  - name: s\n    run: 'true'\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let bare = format!("alice:{PASSWORD}");
    for command in [
        args(&["build", dir.path().to_str().unwrap()]),
        args(&["serve", "--listen", &format!("127.0.0.1:{}", free_port())]),
    ] {
        let mut list = command.clone();
        list.extend(args(&[
            "--data-dir",
            data.to_str().unwrap(),
            "--creds",
            &bare,
        ]));
        let mut run = Command::new(CUSTODY);
        run.args(&list).env("CUSTODY_TOKEN", "t0ken");
        let output = exited_within(run, Duration::from_secs(60));
        let all = text(&output);
        assert_eq!(output.status.code(), Some(2), "{command:?}: {all}");
        assert!(all.contains("names no registry"), "{all}");
        assert!(
            all.contains("hint: write `--creds HOST=USER:PASS`"),
            "{all}"
        );
        assert!(!all.contains(PASSWORD), "{all}");
    }
    let help = custody(&["build", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--creds <HOST=USER:PASS>"), "{help}");
    assert!(help.contains("bare `USER:PASSWORD`"), "{help}");
}

/// Runs `command` to its end, or kills it after `limit`: a `serve` that
/// starts where it should have refused fails the test instead of hanging it.
fn exited_within(mut command: Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("custody runs");
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}:\n{}", text(&output));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `push` keeps the bare form, for the registries its command line names:
/// it still logs in to the destination, and the credential goes to no
/// host named nowhere on the command line — not to a blob redirect target,
/// and not to a token realm that another origin (where the registry sent
/// an upload) names in its 401.
#[test]
fn push_offers_a_bare_credential_to_the_registries_on_its_command_line_only() {
    let registry = Registry::builder()
        .basic_auth("alice", PASSWORD)
        .redirect_blobs()
        .start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(41, &[30_000]);
    let layout = dir.path().join("layout");
    LayoutWriter::new(&layout)
        .image(&image)
        .tag("v1", &image.manifest);
    let bare = format!("alice:{PASSWORD}");
    let destination = format!("{}/team/app:v1", registry.host());
    let layout_ref = format!("oci:{}:v1", layout.display());
    let pushed = custody(&[
        "push",
        "--insecure-registry",
        registry.host(),
        "--creds",
        &bare,
        &layout_ref,
        &destination,
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    assert!(registry.has_manifest("team/app", "v1"));
    let pulled = dir.path().join("pulled");
    let pull = custody(&[
        "pull",
        "--insecure-registry",
        registry.host(),
        "--creds",
        &bare,
        &destination,
        &format!("oci:{}:v1", pulled.display()),
    ]);
    assert!(pull.status.success(), "{}", text(&pull));
    let redirected = registry.redirect_requests();
    assert!(!redirected.is_empty(), "the blobs were not redirected");
    assert!(
        redirected.iter().all(|r| !r.had_authorization),
        "{redirected:?}"
    );

    // A registry that takes alice's password and sends uploads to another
    // origin, whose 401 names a token realm of its own.
    let realm_log = Log::default();
    let realm = {
        let log = realm_log.clone();
        Server::start(move |request| {
            log.record(&request);
            Response::new(200, "application/json", r#"{"token":"t"}"#)
        })
    };
    let elsewhere_log = Log::default();
    let elsewhere = {
        let log = elsewhere_log.clone();
        let realm = realm.port;
        Server::start(move |request| {
            log.record(&request);
            Response::new(401, "application/json", "{}").header(
                "WWW-Authenticate",
                &format!("Bearer realm=\"http://127.0.0.1:{realm}/token\",service=\"x\""),
            )
        })
    };
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("alice:{PASSWORD}")
        )
    );
    let hostile = {
        let to = elsewhere.port;
        Server::start(move |request| {
            if request.headers.get("authorization") != Some(&basic) {
                return Response::new(401, "application/json", "{}")
                    .header("WWW-Authenticate", "Basic realm=\"r\"");
            }
            match request.method.as_str() {
                "POST" => Response::new(202, "text/plain", "")
                    .header("Location", &format!("http://127.0.0.1:{to}/upload/1")),
                "GET" => Response::new(200, "application/json", "{}"),
                _ => Response::new(404, "application/json", "{}"),
            }
        })
    };
    let hostile_host = format!("127.0.0.1:{}", hostile.port);
    let refused = custody(&[
        "push",
        "--insecure-registry",
        &hostile_host,
        "--creds",
        &bare,
        &layout_ref,
        &format!("{hostile_host}/team/app:v1"),
    ]);
    let asked = realm_log.seen();
    assert!(
        asked.iter().all(|s| s.authorization.is_none()),
        "the credential went to a realm named by another origin: {asked:?}"
    );
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("another origin"),
        "{}",
        text(&refused)
    );
    assert!(!text(&refused).contains(PASSWORD), "{}", text(&refused));
    let reached = elsewhere_log.seen();
    assert!(
        reached.iter().any(|s| s.method == "PUT"),
        "the upload never went elsewhere: {reached:?}"
    );
    assert!(
        reached.iter().all(|s| s.authorization.is_none()),
        "{reached:?}"
    );
}

/// A git repository holding `spec` as custody.yaml; returns its file URL.
fn repository(dir: &Path, spec: &str) -> String {
    let src = dir.join("src");
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(src.join("custody.yaml"), spec).unwrap();
    git(&src, &["init", "-q"]);
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "spec"]);
    format!("file://{}", src.display())
}

/// Regression (issue #12): the same attack on `custody serve`: a submitted
/// spec's step image names another registry, which gets no credential,
/// while the build pushes to the credential's registry with it.
#[tokio::test(flavor = "multi_thread")]
async fn serve_offers_a_credential_only_to_the_registry_it_names() {
    let registry = alices_registry();
    let dir = tempfile::tempdir().unwrap();
    let (_, image) = custody_testkit::image::busybox_layout(dir.path());
    let attacker = AttackerRegistry::start(&image);
    let spec = spec(&attacker.host(), registry.host());
    let git = repository(dir.path(), &spec);
    let data = dir.path().join("data");
    let mut options = DaemonOptions::new("credentials", &data);
    options.extra = args(&[
        "--insecure-registry",
        registry.host(),
        "--insecure-registry",
        &attacker.host(),
        "--creds",
        &format!("{}=alice:{PASSWORD}", registry.host()),
    ]);
    let daemon = Daemon::start(options);
    let client = daemon.client();
    let build = client
        .submit(&SubmitRequest {
            spec: None,
            spec_path: "custody.yaml".to_owned(),
            source: Some(GitSource {
                git,
                revision: "main".to_owned(),
                path: None,
            }),
        })
        .await
        .unwrap();
    let mut lines = Vec::new();
    let ended = client
        .logs(&build.id, true, |event| lines.push(event.line))
        .await
        .unwrap();
    attacker.assert_got_no_credential();
    assert_eq!(
        ended.state,
        BuildState::Succeeded,
        "{ended:?}\n{lines:?}\n{}",
        daemon.log()
    );
    assert!(lines.iter().any(|l| l == "ran-in-the-image"), "{lines:?}");
    assert!(registry.has_manifest("t/app", "v1"), "nothing was pushed");
    assert!(!daemon.log().contains(PASSWORD));
}
