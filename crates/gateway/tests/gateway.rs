//! The gateway driven by clients custody did not write: skopeo pushes and
//! reads images through it, curl speaks the distribution API by hand for
//! chunked uploads and for every refusal. Each test starts a real gateway
//! on a port-0 listener and stops it with a channel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use custody_gateway::{
    BlobBody, BoxError, Config, Destination, Gateway, Pushed, Reference, Repository, Upstream,
    UpstreamManifest,
};
use custody_oci::Digest;
use custody_testkit::image::{self, Blob, Image, LayoutWriter};
use futures_util::future::BoxFuture;

/// A gateway serving on 127.0.0.1, on its own runtime.
struct Running {
    gateway: Arc<Gateway>,
    host: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    runtime: tokio::runtime::Runtime,
    storage: PathBuf,
    /// Also `HOME` for skopeo, so no cache or credentials of the machine
    /// running the tests take part.
    dir: tempfile::TempDir,
}

struct Setup {
    repositories: Vec<&'static str>,
    limit: u64,
    destination: Option<Box<dyn FnOnce(Config) -> Config>>,
}

fn gateway(repositories: &[&'static str]) -> Setup {
    Setup {
        repositories: repositories.to_vec(),
        limit: 64 << 20,
        destination: None,
    }
}

impl Setup {
    fn limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    fn destination(mut self, destination: impl Destination + 'static) -> Self {
        self.destination = Some(Box::new(move |config: Config| {
            config.with_destination(destination)
        }));
        self
    }

    /// Read-only repositories `pulls`, served from `upstream`.
    fn pulls(mut self, pulls: &[&'static str], upstream: impl Upstream + 'static) -> Self {
        let before = self.destination.take();
        let pulls: Vec<Repository> = pulls.iter().map(|r| r.parse().unwrap()).collect();
        self.destination = Some(Box::new(move |config: Config| {
            let config = match before {
                Some(before) => before(config),
                None => config,
            };
            config.with_pulls(pulls, upstream)
        }));
        self
    }

    fn start(self) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("pushed");
        let repositories = self.repositories.iter().map(|r| r.parse().unwrap());
        let mut config = Config::new(&storage, repositories, self.limit);
        if let Some(with) = self.destination {
            config = with(config);
        }
        let gateway = Arc::new(Gateway::new(config).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = gateway.clone();
        let served = runtime.spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        Running {
            gateway,
            host,
            stop: Some(stop),
            served: Some(served),
            runtime,
            storage,
            dir,
        }
    }
}

impl Running {
    fn docker(&self, reference: &str) -> String {
        format!("docker://{}/{reference}", self.host)
    }

    fn skopeo(&self, args: &[&str]) -> std::process::Output {
        Command::new("skopeo")
            .args(args)
            .env("HOME", self.dir.path())
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .output()
            .expect("skopeo runs")
    }

    /// `skopeo copy SOURCE docker://HOST/DESTINATION` to the gateway.
    fn skopeo_copy(&self, source: &str, destination: &str) -> std::process::Output {
        self.skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            source,
            &self.docker(destination),
        ])
    }

    /// curl `method` on `path`, with the body from `body` if given.
    fn curl(&self, method: &str, path: &str, headers: &[&str], body: Option<&[u8]>) -> Reply {
        let scratch = tempfile::tempdir().unwrap();
        let dump = scratch.path().join("headers");
        let out = scratch.path().join("body");
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--noproxy", "*", "-D"])
            .arg(&dump)
            .arg("-o")
            .arg(&out)
            .args(["-w", "%{http_code}"]);
        if method == "HEAD" {
            command.arg("-I");
        } else {
            command.args(["-X", method]);
        }
        for header in headers {
            command.args(["-H", header]);
        }
        if let Some(body) = body {
            let file = scratch.path().join("upload");
            fs_err::write(&file, body).unwrap();
            command
                .arg("--data-binary")
                .arg(format!("@{}", file.display()));
            if !headers.iter().any(|h| h.starts_with("Content-Type")) {
                command.args(["-H", "Content-Type: application/octet-stream"]);
            }
        }
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("http://{}{path}", self.host)
        };
        let output = command.arg(url).output().expect("curl runs");
        assert!(
            output.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Reply {
            status: String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse()
                .unwrap(),
            headers: fs_err::read_to_string(&dump).unwrap_or_default(),
            body: fs_err::read(&out).unwrap_or_default(),
        }
    }

    /// A blob pushed whole with `POST …/blobs/uploads/?digest=`.
    fn push_blob(&self, repository: &str, blob: &Blob) -> Reply {
        self.curl(
            "POST",
            &format!("/v2/{repository}/blobs/uploads/?digest={}", blob.digest),
            &[],
            Some(&blob.bytes),
        )
    }

    fn put_manifest(&self, repository: &str, reference: &str, manifest: &Blob) -> Reply {
        self.curl(
            "PUT",
            &format!("/v2/{repository}/manifests/{reference}"),
            &[&format!("Content-Type: {}", manifest.media_type)],
            Some(&manifest.bytes),
        )
    }

    /// Stops serving and drops the gateway; returns what it recorded and the
    /// files left in its storage.
    fn stop(mut self) -> (Pushed, Vec<String>) {
        let pushed = self.gateway.pushed();
        self.stop.take().unwrap().send(()).unwrap();
        let served = self.served.take().unwrap();
        self.runtime.block_on(served).unwrap();
        let storage = self.storage.clone();
        drop(self.gateway);
        (pushed, files(&storage))
    }
}

/// Every file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs_err::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// The blob files in a storage listing (not the layout's own files).
fn blob_files(files: &[String]) -> Vec<&String> {
    files.iter().filter(|f| f.starts_with("blobs/")).collect()
}

struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }

    /// The first error code and message of a registry error body.
    fn error(&self) -> (String, String) {
        let value: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not error JSON: {}", String::from_utf8_lossy(&self.body)));
        let error = &value["errors"][0];
        (
            error["code"].as_str().unwrap().to_owned(),
            error["message"].as_str().unwrap().to_owned(),
        )
    }

    #[track_caller]
    fn refused(&self, status: u16, code: &str) -> String {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let (actual, message) = self.error();
        assert_eq!(actual, code, "message: {message}");
        message
    }
}

fn layout_with(dir: &Path, image: &Image) -> PathBuf {
    let root = dir.join("layout");
    LayoutWriter::new(&root)
        .image(image)
        .tag("v1", &image.manifest);
    root
}

fn manifest_bytes(value: serde_json::Value) -> Blob {
    Blob::new(
        "application/vnd.oci.image.manifest.v1+json",
        serde_json::to_vec(&value).unwrap(),
    )
}

#[test]
fn skopeo_pushes_a_layout_and_reads_it_back() {
    let gateway = gateway(&["app"]).start();
    let image = Image::random(1, &[4000, 70_000]);
    let layout = layout_with(gateway.dir.path(), &image);

    let copied = gateway.skopeo_copy(&format!("oci:{}:v1", layout.display()), "app:v1");
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );

    let inspected = gateway.skopeo(&["inspect", "--tls-verify=false", &gateway.docker("app:v1")]);
    assert!(
        inspected.status.success(),
        "{}",
        String::from_utf8_lossy(&inspected.stderr)
    );
    let inspected: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(inspected["Digest"], image.manifest.digest.as_str());
    assert_eq!(inspected["RepoTags"], serde_json::json!(["v1"]));

    // Every blob comes back out, byte for byte, through GET.
    let out = gateway.dir.path().join("out");
    let pulled = gateway.skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &gateway.docker("app:v1"),
        &format!("oci:{}:v1", out.display()),
    ]);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    for blob in image.blobs() {
        assert_eq!(
            fs_err::read(out.join("blobs/sha256").join(blob.hex())).unwrap(),
            blob.bytes
        );
    }

    let by_digest = gateway.curl(
        "HEAD",
        &format!("/v2/app/manifests/{}", image.manifest.digest),
        &[],
        None,
    );
    assert_eq!(by_digest.status, 200);
    assert_eq!(
        by_digest.header("Docker-Content-Digest").as_deref(),
        Some(image.manifest.digest.as_str())
    );
    let tags = gateway.curl("GET", "/v2/app/tags/list", &[], None);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&tags.body).unwrap(),
        serde_json::json!({"name": "app", "tags": ["v1"]})
    );

    let (pushed, files) = gateway.stop();
    let app = &pushed.repositories[&"app".parse::<Repository>().unwrap()];
    let v1 = &app.tags[&"v1".parse().unwrap()];
    assert_eq!(v1.digest().to_string(), image.manifest.digest);
    assert_eq!(v1.size(), image.manifest.size);
    assert_eq!(
        v1.media_type().to_string(),
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(app.by_digest.is_empty());
    for blob in image.blobs().chain([&image.manifest]) {
        assert!(
            files.contains(&format!("blobs/sha256/{}", blob.hex())),
            "{files:?}"
        );
    }
    assert_eq!(
        blob_files(&files).len(),
        4,
        "nothing else is kept: {files:?}"
    );
}

#[test]
fn skopeo_pushes_a_multi_platform_index_with_its_children() {
    let gateway = gateway(&["app"]).start();
    let amd64 = Image::random(2, &[3000]);
    let arm64 = Image::random(3, &[3000]);
    let index = image::index_of(&[(&amd64, "amd64"), (&arm64, "arm64")]);
    let root = gateway.dir.path().join("layout");
    LayoutWriter::new(&root)
        .image(&amd64)
        .image(&arm64)
        .blob(&index)
        .tag("v1", &index);

    let copied = gateway.skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", root.display()),
        &gateway.docker("app:multi"),
    ]);
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );

    let (pushed, _) = gateway.stop();
    let app = &pushed.repositories[&"app".parse::<Repository>().unwrap()];
    assert_eq!(
        app.tags[&"multi".parse().unwrap()].digest().to_string(),
        index.digest
    );
    // The children were put by digest, but travel with their index.
    assert!(app.by_digest.is_empty(), "{:?}", app.by_digest);
}

#[test]
fn curl_uploads_in_chunks() {
    let gateway = gateway(&["app"]).start();
    let bytes = image::random_bytes(7, 300_000);
    let digest = image::sha256(&bytes);
    let (first, second) = bytes.split_at(100_000);

    let started = gateway.curl("POST", "/v2/app/blobs/uploads/", &[], None);
    assert_eq!(started.status, 202);
    let location = started.header("Location").unwrap();
    let uuid = started.header("Docker-Upload-UUID").unwrap();
    assert!(location.ends_with(&uuid), "{location}");
    assert_eq!(started.header("Range").as_deref(), Some("0-0"));

    let patched = gateway.curl("PATCH", &location, &["Content-Range: 0-99999"], Some(first));
    assert_eq!(patched.status, 202);
    assert_eq!(patched.header("Range").as_deref(), Some("0-99999"));
    let location = patched.header("Location").unwrap();

    // A chunk that does not continue the upload: 416, with where it stands.
    let out_of_order = gateway.curl("PATCH", &location, &["Content-Range: 5-9"], Some(b"abcde"));
    assert_eq!(out_of_order.status, 416);
    assert_eq!(out_of_order.header("Range").as_deref(), Some("0-99999"));

    let patched = gateway.curl(
        "PATCH",
        &location,
        &["Content-Range: 100000-299999"],
        Some(second),
    );
    assert_eq!(patched.status, 202);
    assert_eq!(patched.header("Range").as_deref(), Some("0-299999"));

    let status = gateway.curl("GET", &location, &[], None);
    assert_eq!(status.status, 204);
    assert_eq!(status.header("Range").as_deref(), Some("0-299999"));

    let put = gateway.curl("PUT", &format!("{location}?digest={digest}"), &[], None);
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    assert_eq!(
        put.header("Docker-Content-Digest").as_deref(),
        Some(digest.as_str())
    );
    assert_eq!(
        put.header("Location"),
        Some(format!("/v2/app/blobs/{digest}"))
    );

    let head = gateway.curl("HEAD", &format!("/v2/app/blobs/{digest}"), &[], None);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Length"), Some("300000".into()));
    let escaped = digest.replace(':', "%3A");
    let head = gateway.curl("HEAD", &format!("/v2/app/blobs/{escaped}"), &[], None);
    assert_eq!(head.status, 200, "an escaped `:` is a `:`");
    let get = gateway.curl("GET", &format!("/v2/app/blobs/{digest}"), &[], None);
    assert_eq!(get.body, bytes);

    // The session ended with the PUT.
    let again = gateway.curl("PATCH", &location, &[], Some(b"more"));
    again.refused(404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(gateway.gateway.bytes_used(), 300_000);
}

#[test]
fn the_api_answers_as_a_registry() {
    let gateway = gateway(&["app"]).start();
    let base = gateway.curl("GET", "/v2/", &[], None);
    assert_eq!(base.status, 200);
    assert_eq!(
        base.header("Docker-Distribution-API-Version").as_deref(),
        Some("registry/2.0")
    );
    let missing = gateway.curl(
        "HEAD",
        &format!("/v2/app/blobs/{}", image::sha256(b"nothing")),
        &[],
        None,
    );
    assert_eq!(missing.status, 404);
    gateway
        .curl("GET", "/v2/app/manifests/v1", &[], None)
        .refused(404, "MANIFEST_UNKNOWN");
}

#[test]
fn an_undeclared_repository_is_refused_naming_the_declared_ones() {
    let gateway = gateway(&["app", "team/tools"]).start();
    let image = Image::random(4, &[1000]);
    let layout = layout_with(gateway.dir.path(), &image);

    let copied = gateway.skopeo_copy(&format!("oci:{}:v1", layout.display()), "elsewhere:v1");
    assert!(!copied.status.success());
    let stderr = String::from_utf8_lossy(&copied.stderr);
    assert!(
        stderr.contains("not a repository this build declared"),
        "{stderr}"
    );

    let message = gateway
        .push_blob("elsewhere", &image.config)
        .refused(404, "NAME_UNKNOWN");
    assert!(
        message.contains("`app`") && message.contains("`team/tools`"),
        "{message}"
    );
    gateway
        .curl("GET", "/v2/elsewhere/tags/list", &[], None)
        .refused(404, "NAME_UNKNOWN");
    gateway
        .curl("POST", "/v2/Bad..Name/blobs/uploads/", &[], None)
        .refused(400, "NAME_INVALID");

    let (pushed, files) = gateway.stop();
    assert!(pushed.repositories.is_empty());
    assert!(blob_files(&files).is_empty(), "{files:?}");
}

#[test]
fn delete_is_refused_everywhere() {
    let gateway = gateway(&["app"]).start();
    let image = Image::random(5, &[1000]);
    let layout = layout_with(gateway.dir.path(), &image);
    assert!(
        gateway
            .skopeo_copy(&format!("oci:{}:v1", layout.display()), "app:v1")
            .status
            .success()
    );
    let started = gateway.curl("POST", "/v2/app/blobs/uploads/", &[], None);
    let session = started.header("Location").unwrap();

    for path in [
        "/v2/app/manifests/v1".to_owned(),
        format!("/v2/app/manifests/{}", image.manifest.digest),
        format!("/v2/app/blobs/{}", image.config.digest),
        session,
        "/v2/elsewhere/manifests/v1".to_owned(),
    ] {
        gateway
            .curl("DELETE", &path, &[], None)
            .refused(405, "UNSUPPORTED");
    }

    let inspected = gateway.skopeo(&["inspect", "--tls-verify=false", &gateway.docker("app:v1")]);
    assert!(inspected.status.success());
    let (pushed, _) = gateway.stop();
    assert_eq!(
        pushed.repositories[&"app".parse::<Repository>().unwrap()].tags[&"v1".parse().unwrap()]
            .digest()
            .to_string(),
        image.manifest.digest
    );
}

#[test]
fn attestation_schema_tags_are_denied() {
    let gateway = gateway(&["app"]).start();
    let image = Image::random(6, &[1000]);
    let layout = layout_with(gateway.dir.path(), &image);
    let schema = format!("sha256-{}", image.manifest.hex());

    let copied = gateway.skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("app:{schema}.att"),
    );
    assert!(!copied.status.success());
    assert!(
        String::from_utf8_lossy(&copied.stderr).contains("denied"),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );

    for tag in [
        schema.clone(),
        format!("{schema}.sig"),
        format!("{schema}.att"),
    ] {
        let message = gateway
            .put_manifest("app", &tag, &image.manifest)
            .refused(403, "DENIED");
        assert!(message.contains("attestations"), "{message}");
    }

    let (pushed, files) = gateway.stop();
    assert!(pushed.repositories.is_empty(), "{pushed:?}");
    assert!(
        !files.iter().any(|f| f.ends_with(image.manifest.hex())),
        "the manifest was not kept: {files:?}"
    );
}

#[test]
fn a_manifest_with_a_subject_is_denied() {
    let gateway = gateway(&["app"]).start();
    let image = Image::random(8, &[1000]);
    for blob in image.blobs() {
        assert_eq!(gateway.push_blob("app", blob).status, 201);
    }
    assert_eq!(
        gateway.put_manifest("app", "v1", &image.manifest).status,
        201
    );

    let mut referrer: serde_json::Value = serde_json::from_slice(&image.manifest.bytes).unwrap();
    referrer["subject"] = image.manifest.descriptor();
    let referrer = manifest_bytes(referrer);
    gateway
        .put_manifest("app", &referrer.digest, &referrer)
        .refused(403, "DENIED");
    gateway
        .put_manifest("app", "signed", &referrer)
        .refused(403, "DENIED");

    let (pushed, files) = gateway.stop();
    let app = &pushed.repositories[&"app".parse::<Repository>().unwrap()];
    assert_eq!(app.tags.len(), 1);
    assert!(app.by_digest.is_empty());
    assert!(
        !files.iter().any(|f| f.ends_with(referrer.hex())),
        "{files:?}"
    );
}

#[test]
fn bytes_that_do_not_match_their_digest_are_refused_and_not_kept() {
    let gateway = gateway(&["app"]).start();
    let claimed = image::sha256(b"what the client claims");

    // Whole, in the POST.
    let message = gateway
        .curl(
            "POST",
            &format!("/v2/app/blobs/uploads/?digest={claimed}"),
            &[],
            Some(b"something else"),
        )
        .refused(400, "DIGEST_INVALID");
    assert!(message.contains(&claimed), "{message}");

    // Chunked, then finished with the wrong digest: the session ends too.
    let started = gateway.curl("POST", "/v2/app/blobs/uploads/", &[], None);
    let location = started.header("Location").unwrap();
    assert_eq!(
        gateway
            .curl("PATCH", &location, &[], Some(b"something else"))
            .status,
        202
    );
    gateway
        .curl("PUT", &format!("{location}?digest={claimed}"), &[], None)
        .refused(400, "DIGEST_INVALID");
    gateway
        .curl("GET", &location, &[], None)
        .refused(404, "BLOB_UPLOAD_UNKNOWN");

    // A manifest put by a digest that is not its own.
    let image = Image::random(9, &[500]);
    for blob in image.blobs() {
        gateway.push_blob("app", blob);
    }
    gateway
        .put_manifest("app", &claimed, &image.manifest)
        .refused(400, "DIGEST_INVALID");

    assert_eq!(
        gateway.gateway.bytes_used(),
        image.blobs().map(|b| b.size).sum::<u64>()
    );
    let (pushed, files) = gateway.stop();
    assert!(pushed.repositories.is_empty());
    assert_eq!(
        blob_files(&files).len(),
        2,
        "only the image's blobs: {files:?}"
    );
}

#[test]
fn a_manifest_naming_content_not_pushed_is_refused() {
    let other = gateway(&["app", "other"]).start();
    let gateway = gateway(&["app"]).start();
    let image = Image::random(10, &[1000, 2000]);
    gateway.push_blob("app", &image.config);
    gateway.push_blob("app", &image.layers[0]);

    let message = gateway
        .put_manifest("app", "v1", &image.manifest)
        .refused(400, "MANIFEST_BLOB_UNKNOWN");
    assert!(message.contains(&image.layers[1].digest), "{message}");
    assert!(!message.contains(&image.layers[0].digest), "{message}");

    // An index whose child manifest was never put.
    let index = image::index_of(&[(&image, "amd64")]);
    gateway
        .curl(
            "PUT",
            "/v2/app/manifests/multi",
            &[&format!("Content-Type: {}", index.media_type)],
            Some(&index.bytes),
        )
        .refused(400, "MANIFEST_BLOB_UNKNOWN");

    // A blob in another repository is not this one's until mounted.
    for blob in image.blobs() {
        other.push_blob("other", blob);
    }
    other
        .put_manifest("app", "v1", &image.manifest)
        .refused(400, "MANIFEST_BLOB_UNKNOWN");

    let (pushed, files) = gateway.stop();
    assert!(pushed.repositories.is_empty());
    assert!(!files.iter().any(|f| f.ends_with(image.manifest.hex())));
    other.stop();
}

/// A destination that holds the blobs it was given, as the runner's will
/// answer from the real registry.
struct Holding(Vec<Blob>);

impl Destination for Holding {
    fn blob_size<'a>(
        &'a self,
        repository: &'a Repository,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<u64>, BoxError>> {
        let size = (repository.as_str() == "app")
            .then(|| self.0.iter().find(|b| b.digest == digest.to_string()))
            .flatten()
            .map(|b| b.size);
        Box::pin(async move { Ok(size) })
    }
}

#[test]
fn blobs_the_destination_holds_need_not_be_pushed() {
    let image = Image::random(11, &[1000, 2000]);
    let base_layer = image.layers[0].clone();
    let gateway = gateway(&["app"])
        .destination(Holding(vec![base_layer.clone()]))
        .start();

    let head = gateway.curl(
        "HEAD",
        &format!("/v2/app/blobs/{}", base_layer.digest),
        &[],
        None,
    );
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("Content-Length"),
        Some(base_layer.size.to_string())
    );

    gateway.push_blob("app", &image.config);
    gateway.push_blob("app", &image.layers[1]);
    let put = gateway.put_manifest("app", "v1", &image.manifest);
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));

    let (pushed, files) = gateway.stop();
    assert_eq!(pushed.repositories.len(), 1);
    assert!(!files.iter().any(|f| f.ends_with(base_layer.hex())));
}

#[test]
fn a_blob_is_mounted_only_between_declared_repositories() {
    let gateway = gateway(&["app", "other"]).start();
    let blob = Blob::new("application/octet-stream", image::random_bytes(12, 5000));
    assert_eq!(gateway.push_blob("app", &blob).status, 201);
    let head = |repository: &str| {
        gateway
            .curl(
                "HEAD",
                &format!("/v2/{repository}/blobs/{}", blob.digest),
                &[],
                None,
            )
            .status
    };
    assert_eq!(head("other"), 404);

    let mounted = gateway.curl(
        "POST",
        &format!("/v2/other/blobs/uploads/?mount={}&from=app", blob.digest),
        &[],
        None,
    );
    assert_eq!(mounted.status, 201);
    assert_eq!(
        mounted.header("Location"),
        Some(format!("/v2/other/blobs/{}", blob.digest))
    );
    assert_eq!(head("other"), 200);

    // From a repository not declared, or of a blob not held: an upload
    // starts instead.
    for query in [
        format!("mount={}&from=elsewhere", blob.digest),
        format!("mount={}&from=app", image::sha256(b"not here")),
    ] {
        let fallback = gateway.curl(
            "POST",
            &format!("/v2/other/blobs/uploads/?{query}"),
            &[],
            None,
        );
        assert_eq!(fallback.status, 202);
        assert!(fallback.header("Docker-Upload-UUID").is_some());
    }
    assert_eq!(gateway.gateway.bytes_used(), 5000, "a mount stores nothing");
    gateway.stop();
}

#[test]
fn eight_parallel_uploads_all_land() {
    let gateway = gateway(&["app"]).start();
    let blobs: Vec<Blob> = (0..8)
        .map(|i| {
            Blob::new(
                "application/octet-stream",
                image::random_bytes(100 + i, 400_000),
            )
        })
        .collect();
    std::thread::scope(|scope| {
        for blob in &blobs {
            let gateway = &gateway;
            scope.spawn(move || {
                let started = gateway.curl("POST", "/v2/app/blobs/uploads/", &[], None);
                let location = started.header("Location").unwrap();
                let (first, second) = blob.bytes.split_at(150_000);
                assert_eq!(
                    gateway.curl("PATCH", &location, &[], Some(first)).status,
                    202
                );
                let patched = gateway.curl("PATCH", &location, &[], Some(second));
                assert_eq!(patched.status, 202);
                let put = gateway.curl(
                    "PUT",
                    &format!(
                        "{}?digest={}",
                        patched.header("Location").unwrap(),
                        blob.digest
                    ),
                    &[],
                    None,
                );
                assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
            });
        }
    });
    assert_eq!(gateway.gateway.bytes_used(), 8 * 400_000);
    let (_, files) = gateway.stop();
    for blob in &blobs {
        assert!(files.contains(&format!("blobs/sha256/{}", blob.hex())));
    }
    assert_eq!(blob_files(&files).len(), 8, "{files:?}");
}

#[test]
fn past_the_limit_uploads_are_refused_and_nothing_is_kept() {
    let gateway = gateway(&["app"]).limit(100_000).start();
    let big = Blob::new("application/octet-stream", image::random_bytes(13, 150_000));

    // Announced too large: refused before it is read.
    let message = gateway.push_blob("app", &big).refused(413, "DENIED");
    assert!(message.contains("100000 bytes"), "{message}");

    // Streamed with no length: refused when it crosses the limit, and the
    // session goes with what it had written.
    let started = gateway.curl("POST", "/v2/app/blobs/uploads/", &[], None);
    let location = started.header("Location").unwrap();
    gateway
        .curl(
            "PATCH",
            &location,
            &["Transfer-Encoding: chunked"],
            Some(&big.bytes),
        )
        .refused(413, "DENIED");
    gateway
        .curl("GET", &location, &[], None)
        .refused(404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(gateway.gateway.bytes_used(), 0);

    // skopeo, with an image larger than the limit.
    let image = Image::random(14, &[200_000]);
    let layout = layout_with(gateway.dir.path(), &image);
    let copied = gateway.skopeo_copy(&format!("oci:{}:v1", layout.display()), "app:v1");
    assert!(!copied.status.success());
    let stderr = String::from_utf8_lossy(&copied.stderr);
    assert!(
        stderr.contains("may store at most 100000 bytes"),
        "{stderr}"
    );
    assert_eq!(
        gateway.gateway.bytes_used(),
        0,
        "the refused upload gave its bytes back"
    );

    // What fits still does.
    let small = Blob::new("application/octet-stream", image::random_bytes(15, 1000));
    assert_eq!(gateway.push_blob("app", &small).status, 201);

    let (pushed, files) = gateway.stop();
    assert!(pushed.repositories.is_empty());
    let blobs = blob_files(&files);
    assert!(
        blobs
            .iter()
            .all(|f| !f.ends_with(big.hex()) && !f.contains(".upload-")),
        "{files:?}"
    );
}

#[test]
fn open_upload_sessions_are_bounded() {
    let gateway = gateway(&["app"]).start();
    // One curl, one connection, 129 POSTs.
    let url = format!("http://{}/v2/app/blobs/uploads/", gateway.host);
    let output = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-X", "POST"])
        .args(["-w", "%{http_code}\\n"])
        .args((0..129).flat_map(|_| ["-o", "/dev/null", url.as_str()]))
        .output()
        .unwrap();
    let codes = String::from_utf8_lossy(&output.stdout);
    let codes: Vec<&str> = codes.lines().collect();
    assert_eq!(codes.len(), 129);
    assert!(codes[..128].iter().all(|c| *c == "202"), "{codes:?}");
    assert_eq!(codes[128], "429");
    gateway
        .curl("POST", "/v2/app/blobs/uploads/", &[], None)
        .refused(429, "TOOMANYREQUESTS");

    let (_, files) = gateway.stop();
    assert!(blob_files(&files).is_empty(), "{files:?}");
}

#[test]
fn an_abandoned_upload_leaves_nothing_once_the_gateway_is_gone() {
    let gateway = gateway(&["app"]).start();
    let started = gateway.curl("POST", "/v2/app/blobs/uploads/", &[], None);
    let location = started.header("Location").unwrap();
    assert_eq!(
        gateway
            .curl(
                "PATCH",
                &location,
                &[],
                Some(&image::random_bytes(16, 10_000))
            )
            .status,
        202
    );
    let partial = blob_files(&files(&gateway.storage))
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(
        partial.len(),
        1,
        "the upload is on disk meanwhile: {partial:?}"
    );

    let (_, files) = gateway.stop();
    assert!(blob_files(&files).is_empty(), "{files:?}");
}

#[test]
fn storage_must_be_new_or_empty_and_reached_without_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let app = || ["app".parse::<Repository>().unwrap()];

    let used = dir.path().join("used");
    fs_err::create_dir_all(&used).unwrap();
    fs_err::write(used.join("planted"), b"x").unwrap();
    assert!(matches!(
        Gateway::new(Config::new(&used, app(), 1 << 20)),
        Err(custody_gateway::Error::StorageNotEmpty { .. })
    ));

    let real = dir.path().join("real");
    fs_err::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
    assert!(matches!(
        Gateway::new(Config::new(dir.path().join("link/pushed"), app(), 1 << 20)),
        Err(custody_gateway::Error::Storage { .. })
    ));
    assert!(
        files(&real).is_empty(),
        "nothing was written through the link"
    );

    assert!(matches!(
        Gateway::new(Config::new(dir.path().join("new"), [], 1 << 20)),
        Err(custody_gateway::Error::NoRepositories)
    ));
}

/// An upstream holding one image, as the runner's reads the real registry.
struct Serving(Image);

impl Serving {
    fn blob(&self, digest: &Digest) -> Option<&Blob> {
        self.0.blobs().find(|b| b.digest == digest.to_string())
    }
}

impl Upstream for Serving {
    fn manifest<'a>(
        &'a self,
        _repository: &'a Repository,
        reference: &'a Reference,
    ) -> BoxFuture<'a, Result<Option<UpstreamManifest>, BoxError>> {
        let manifest = &self.0.manifest;
        let found = match reference {
            Reference::Tag(tag) => tag.as_str() == "v1",
            Reference::Digest(digest) => digest.to_string() == manifest.digest,
        };
        let found = found.then(|| UpstreamManifest {
            media_type: manifest.media_type.clone(),
            digest: custody_oci::digest::parse(&manifest.digest).unwrap(),
            bytes: manifest.bytes.clone().into(),
        });
        Box::pin(async move { Ok(found) })
    }

    fn blob_size<'a>(
        &'a self,
        _repository: &'a Repository,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Option<u64>, BoxError>> {
        let size = self.blob(digest).map(|b| b.size);
        Box::pin(async move { Ok(size) })
    }

    fn blob<'a>(
        &'a self,
        _repository: &'a Repository,
        digest: &'a Digest,
        _size: u64,
    ) -> BoxFuture<'a, Result<BlobBody, BoxError>> {
        let bytes = self
            .blob(digest)
            .map(|b| bytes::Bytes::from(b.bytes.clone()));
        Box::pin(async move {
            let bytes = bytes.ok_or("no such blob")?;
            let body: BlobBody = Box::pin(futures_util::stream::once(async { Ok(bytes) }));
            Ok(body)
        })
    }
}

#[test]
fn skopeo_reads_a_pull_repository_which_takes_no_push() {
    let image = Image::random(51, &[1000, 3000]);
    let gateway = gateway(&["app"])
        .pulls(&["base"], Serving(image.clone()))
        .start();
    let out = gateway.dir.path().join("read");
    let read = gateway.skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &gateway.docker("base:v1"),
        &format!("oci:{}:v1", out.display()),
    ]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    for blob in image.blobs() {
        assert_eq!(
            fs_err::read(out.join("blobs/sha256").join(blob.hex())).unwrap(),
            blob.bytes
        );
    }
    let pulled = gateway.gateway.pulled();
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    assert_eq!(pulled[0].repository.as_str(), "base");
    assert_eq!(pulled[0].digest.to_string(), image.manifest.digest);

    // Nothing goes into it: not a blob, not a manifest.
    let message = gateway
        .push_blob("base", &image.config)
        .refused(403, "DENIED");
    assert!(message.contains("`base` is a pull repository"), "{message}");
    gateway
        .put_manifest("base", "v2", &image.manifest)
        .refused(403, "DENIED");
    let missing = gateway.curl("GET", "/v2/base/manifests/v9", &[], None);
    missing.refused(404, "MANIFEST_UNKNOWN");
    let (pushed, _) = gateway.stop();
    assert!(pushed.repositories.is_empty());
}
