//! `custody push`, `pull` and `referrers` against real registries (Debian's
//! docker-registry), checked with skopeo where a second opinion matters.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use custody_testkit::Registry;
use custody_testkit::image::{self, Image, LayoutWriter};

/// What a user sees from one run of the binary.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn custody(args: &[&str]) -> Run {
    custody_with_env(args, &[])
}

fn custody_with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_custody"));
    command
        .args(args)
        // No credentials or certs.d from the machine running the tests.
        .env("HOME", home.path())
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CUSTODY_CERTS_DIR")
        .env("NO_PROXY", "127.0.0.1,localhost");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("custody runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

impl Run {
    #[track_caller]
    fn success(self) -> Self {
        assert_eq!(self.code, 0, "custody failed:\n{}", self.stderr);
        self
    }

    #[track_caller]
    fn failure(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "expected exit {code}; stdout: {}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert!(
            self.stdout.is_empty(),
            "a failed run printed data: {}",
            self.stdout
        );
        self
    }

    #[track_caller]
    fn stderr_has(self, needle: &str) -> Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        self
    }
}

/// A layout holding `image` tagged `v1`.
fn layout_with(dir: &Path, image: &Image) -> PathBuf {
    let root = dir.join("layout");
    LayoutWriter::new(&root)
        .image(image)
        .tag("v1", &image.manifest);
    root
}

fn oci(path: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", path.display())
}

/// The manifest digest skopeo sees at `reference`.
fn skopeo_digest(registry: &Registry, reference: &str) -> String {
    let mut command = registry.skopeo(&["inspect", "--raw"]);
    let output = command
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    image::sha256(&output.stdout)
}

fn push_args<'a>(registry: &'a Registry, extra: &[&'a str]) -> Vec<String> {
    let mut args = vec!["push".to_owned()];
    if let Some(dir) = registry.certs_dir() {
        args.push(format!("--certs-dir={}", dir.display()));
    } else {
        args.push(format!("--insecure-registry={}", registry.host()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_push(registry: &Registry, extra: &[&str]) -> Run {
    let args = push_args(registry, extra);
    custody(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn push_then_pull_round_trips_with_identical_digests() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(1, &[200_000, 3_000, 70_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/app:v1", registry.host());
    let digestfile = dir.path().join("digest");

    let run = run_push(
        &registry,
        &[
            "--digestfile",
            digestfile.to_str().unwrap(),
            &oci(&layout, "v1"),
            &destination,
        ],
    )
    .success();
    assert_eq!(
        run.stdout,
        format!("{destination}@{}\n", image.manifest.digest)
    );
    assert_eq!(
        fs_err::read_to_string(&digestfile).unwrap(),
        image.manifest.digest
    );
    assert_eq!(
        skopeo_digest(&registry, &destination),
        image.manifest.digest
    );

    let pulled = dir.path().join("pulled");
    let run = custody(&[
        "pull",
        "--insecure-registry",
        registry.host(),
        &destination,
        &oci(&pulled, "copy"),
    ])
    .success();
    assert_eq!(
        run.stdout,
        format!("oci:{}:copy@{}\n", pulled.display(), image.manifest.digest)
    );
    for blob in image.blobs().chain([&image.manifest]) {
        let bytes = fs_err::read(pulled.join("blobs/sha256").join(blob.hex())).unwrap();
        assert_eq!(
            bytes, blob.bytes,
            "blob {} differs after the round trip",
            blob.digest
        );
    }
    // skopeo reads the pulled layout too.
    let output = Command::new("skopeo")
        .args(["inspect", "--raw", &oci(&pulled, "copy")])
        .output()
        .unwrap();
    assert_eq!(image::sha256(&output.stdout), image.manifest.digest);
}

#[test]
fn a_second_push_uploads_nothing() {
    let registry = Registry::builder().start();
    let proxy = custody_testkit::FaultProxy::start(registry.addr());
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(2, &[500_000, 400_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/app:v1", proxy.host());
    let push = || {
        custody(&[
            "push",
            "--insecure-registry",
            &proxy.host(),
            &oci(&layout, "v1"),
            &destination,
        ])
        .success()
    };

    push();
    let first = proxy.bytes_up();
    assert!(first > 900_000, "the first push sent only {first} bytes");
    push();
    let second = proxy.bytes_up() - first;
    assert!(
        second < 20_000,
        "the second push sent {second} bytes; it should only check and re-tag"
    );
}

#[test]
fn a_pull_fetches_only_what_the_layout_lacks() {
    let registry = Registry::builder().start();
    let proxy = custody_testkit::FaultProxy::start(registry.addr());
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(20, &[600_000, 500_000]);
    let layout = layout_with(dir.path(), &image);
    let source = format!("{}/team/app:v1", proxy.host());
    custody(&[
        "push",
        "--insecure-registry",
        &proxy.host(),
        &oci(&layout, "v1"),
        &source,
    ])
    .success();

    let pulled = dir.path().join("pulled");
    let pull = || {
        custody(&[
            "pull",
            "--insecure-registry",
            &proxy.host(),
            &source,
            &oci(&pulled, "v1"),
        ])
        .success()
    };
    let before = proxy.bytes_down();
    pull();
    let first = proxy.bytes_down() - before;
    assert!(
        first > 1_100_000,
        "the first pull fetched only {first} bytes"
    );

    // Lose one layer: the next pull fetches that one alone.
    fs_err::remove_file(pulled.join("blobs/sha256").join(image.layers[1].hex())).unwrap();
    let before = proxy.bytes_down();
    pull();
    let second = proxy.bytes_down() - before;
    assert!(
        second > 500_000 && second < 560_000,
        "the second pull fetched {second} bytes"
    );
    assert_eq!(
        fs_err::read(pulled.join("blobs/sha256").join(image.layers[1].hex())).unwrap(),
        image.layers[1].bytes
    );
}

/// A registry that answers a byte every 200 ms never trips a read timeout;
/// the request deadline ends the pull, naming the host and the flag.
#[test]
fn a_trickling_registry_fails_within_the_request_deadline() {
    let registry = Registry::builder().start();
    let proxy = custody_testkit::FaultProxy::start(registry.addr());
    let dir = tempfile::tempdir().unwrap();
    let layout = layout_with(dir.path(), &Image::random(21, &[1_000]));
    let source = format!("{}/team/app:v1", proxy.host());
    custody(&[
        "push",
        "--insecure-registry",
        &proxy.host(),
        &oci(&layout, "v1"),
        &source,
    ])
    .success();
    proxy.trickle(Duration::from_millis(200));
    let started = std::time::Instant::now();
    custody(&[
        "pull",
        "--insecure-registry",
        &proxy.host(),
        "--registry-timeout",
        "2",
        &source,
        &oci(&dir.path().join("pulled"), "v1"),
    ])
    .failure(1)
    .stderr_has(&format!("`{}` did not finish answering", proxy.host()))
    .stderr_has("within 2 s")
    .stderr_has("--registry-timeout");
    // Answering in full takes the proxy minutes; the pull gave up with the
    // deadline (plus start-up), not at the end of the answer.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the pull took {:?}",
        started.elapsed()
    );
}

#[test]
fn pulling_an_unknown_image_names_it_and_leaves_no_layout_behind() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("pulled");
    custody(&[
        "pull",
        "--insecure-registry",
        registry.host(),
        &format!("{}/team/none:v1", registry.host()),
        &oci(&target, "v1"),
    ])
    .failure(1)
    .stderr_has("`team/none:v1`")
    .stderr_has("404");
    assert!(
        !target.exists(),
        "a failed pull created {}",
        target.display()
    );
}

#[test]
fn image_indexes_push_and_pull_with_every_platform() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let amd64 = Image::random(3, &[10_000]);
    let arm64 = Image::random(4, &[12_000]);
    let index = image::index_of(&[(&amd64, "amd64"), (&arm64, "arm64")]);
    let root = dir.path().join("layout");
    LayoutWriter::new(&root)
        .image(&amd64)
        .image(&arm64)
        .blob(&index)
        .tag("multi", &index);
    let destination = format!("{}/team/multi:v1", registry.host());

    let run = run_push(&registry, &[&oci(&root, "multi"), &destination]).success();
    assert_eq!(run.stdout.trim(), format!("{destination}@{}", index.digest));
    assert_eq!(skopeo_digest(&registry, &destination), index.digest);
    assert_eq!(
        skopeo_digest(
            &registry,
            &format!("{}/team/multi@{}", registry.host(), arm64.manifest.digest)
        ),
        arm64.manifest.digest
    );

    let pulled = dir.path().join("pulled");
    custody(&[
        "pull",
        "--insecure-registry",
        registry.host(),
        &destination,
        &oci(&pulled, "multi"),
    ])
    .success();
    for blob in amd64
        .blobs()
        .chain(arm64.blobs())
        .chain([&amd64.manifest, &arm64.manifest, &index])
    {
        assert!(
            pulled.join("blobs/sha256").join(blob.hex()).is_file(),
            "pull left out {}",
            blob.digest
        );
    }
}

#[test]
fn docker_archives_push_with_their_config_and_layers_unchanged() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    let (config_digest, diff_ids) =
        image::write_docker_archive(&archive, 5, &[30_000, 5_000], "team/app:v1");
    let destination = format!("{}/team/fromarchive:v1", registry.host());

    run_push(
        &registry,
        &[
            &format!("docker-archive:{}", archive.display()),
            &destination,
        ],
    )
    .success();
    let output = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{destination}"),
        ])
        .output()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(manifest["config"]["digest"], config_digest.as_str());
    let layers: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        layers, diff_ids,
        "uncompressed archive layers keep their diff ids as digests"
    );
}

#[test]
fn a_sparse_layout_pushes_where_the_blobs_are_and_names_each_missing_one_elsewhere() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(6, &[20_000, 30_000]);
    let full = layout_with(dir.path(), &image);
    run_push(
        &registry,
        &[
            &oci(&full, "v1"),
            &format!("{}/team/base:v1", registry.host()),
        ],
    )
    .success();

    let sparse = dir.path().join("sparse");
    LayoutWriter::new(&sparse)
        .image_without_layers(&image)
        .tag("v2", &image.manifest);

    // Where the destination has the layers, the sparse layout pushes.
    run_push(
        &registry,
        &[
            &oci(&sparse, "v2"),
            &format!("{}/team/base:v2", registry.host()),
        ],
    )
    .success();

    // Elsewhere, each missing blob is named and nothing is tagged.
    let elsewhere = format!("{}/team/other:v2", registry.host());
    let run = run_push(&registry, &[&oci(&sparse, "v2"), &elsewhere]).failure(1);
    for layer in &image.layers {
        assert!(
            run.stderr.contains(&layer.digest),
            "{} is not named:\n{}",
            layer.digest,
            run.stderr
        );
    }
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);

    // Mounting from the repository that has them makes it work.
    run_push(
        &registry,
        &["--mount-from", "team/base", &oci(&sparse, "v2"), &elsewhere],
    )
    .success();
    assert_eq!(skopeo_digest(&registry, &elsewhere), image.manifest.digest);
}

#[test]
fn a_tampered_blob_is_refused_before_it_is_uploaded() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(7, &[50_000]);
    let layout = layout_with(dir.path(), &image);
    let layer = &image.layers[0];
    let path = layout.join("blobs/sha256").join(layer.hex());
    let mut bytes = fs_err::read(&path).unwrap();
    bytes[10_000] ^= 0xff;
    fs_err::write(&path, bytes).unwrap();

    let destination = format!("{}/team/tampered:v1", registry.host());
    run_push(&registry, &[&oci(&layout, "v1"), &destination])
        .failure(1)
        .stderr_has(&format!(
            "blob `{}` does not match its digest",
            layer.digest
        ));
    assert!(
        !registry.has_blob("team/tampered", &layer.digest),
        "the tampered blob reached the registry"
    );
    assert!(
        !registry.has_manifest("team/tampered", "v1"),
        "the tag was written"
    );
}

#[test]
fn chunked_uploads_produce_the_same_image() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(8, &[300_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/chunked:v1", registry.host());
    run_push(
        &registry,
        &["--chunk-size", "65536", &oci(&layout, "v1"), &destination],
    )
    .success();
    assert_eq!(
        skopeo_digest(&registry, &destination),
        image.manifest.digest
    );
}

#[test]
fn tls_registries_are_trusted_through_certs_d_only() {
    let registry = Registry::builder().tls().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(9, &[10_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/tls:v1", registry.host());

    run_push(&registry, &[&oci(&layout, "v1"), &destination]).success();
    assert_eq!(
        skopeo_digest(&registry, &destination),
        image.manifest.digest
    );

    // Without the CA, the certificate is not trusted, and the message says so.
    custody(&["push", &oci(&layout, "v1"), &destination])
        .failure(1)
        .stderr_has(registry.host())
        .stderr_has("certificate")
        .stderr_has("certs.d");
}

#[test]
fn half_a_client_certificate_pair_is_an_error_naming_both_files() {
    let registry = Registry::builder().tls().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(10, &[1_000]);
    let layout = layout_with(dir.path(), &image);
    let host_dir = registry.certs_dir().unwrap().join(registry.host());
    fs_err::write(
        host_dir.join("client.cert"),
        "-----BEGIN CERTIFICATE-----\n",
    )
    .unwrap();

    run_push(
        &registry,
        &[
            &oci(&layout, "v1"),
            &format!("{}/team/x:v1", registry.host()),
        ],
    )
    .failure(2)
    .stderr_has("client.cert")
    .stderr_has("client.key");
}

#[test]
fn client_certificates_from_certs_d_are_presented() {
    let registry = Registry::builder().tls().client_certs().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(11, &[5_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/mtls:v1", registry.host());
    run_push(&registry, &[&oci(&layout, "v1"), &destination]).success();

    // The same CA without the client pair: the registry refuses the handshake.
    let no_client = dir.path().join("certs-no-client");
    let host_dir = no_client.join(registry.host());
    fs_err::create_dir_all(&host_dir).unwrap();
    fs_err::copy(
        registry
            .certs_dir()
            .unwrap()
            .join(registry.host())
            .join("ca.crt"),
        host_dir.join("ca.crt"),
    )
    .unwrap();
    custody(&[
        "push",
        "--certs-dir",
        no_client.to_str().unwrap(),
        &oci(&layout, "v1"),
        &destination,
    ])
    .failure(1)
    .stderr_has(registry.host());
}

#[test]
fn basic_auth_uses_the_given_credentials_and_explains_a_refusal() {
    let registry = Registry::builder()
        .tls()
        .basic_auth("alice", "s3cret")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(12, &[5_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/auth:v1", registry.host());

    run_push(
        &registry,
        &["--creds", "alice:s3cret", &oci(&layout, "v1"), &destination],
    )
    .success();

    let run = run_push(
        &registry,
        &["--creds", "alice:wrong", &oci(&layout, "v1"), &destination],
    )
    .failure(1)
    .stderr_has(registry.host())
    .stderr_has("`alice`")
    .stderr_has("401");
    assert!(
        !run.stderr.contains("wrong"),
        "the password leaked into the message:\n{}",
        run.stderr
    );

    run_push(&registry, &[&oci(&layout, "v1"), &destination])
        .failure(1)
        .stderr_has("no credentials")
        .stderr_has("docker login");

    // A docker config.json found through DOCKER_CONFIG.
    let docker_config =
        custody_testkit::write_docker_config(dir.path(), registry.host(), "alice", "s3cret");
    let args = push_args(&registry, &[&oci(&layout, "v1"), &destination]);
    custody_with_env(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("DOCKER_CONFIG", docker_config.to_str().unwrap())],
    )
    .success();
}

#[test]
fn credential_helpers_and_containers_auth_files_are_used() {
    let registry = Registry::builder()
        .tls()
        .basic_auth("alice", "s3cret")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(21, &[2_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/helper:v1", registry.host());
    let args = push_args(&registry, &[&oci(&layout, "v1"), &destination]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // A credential helper speaking the docker-credential protocol: the
    // server URL on stdin, JSON on stdout.
    let bin = dir.path().join("bin");
    fs_err::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-testkit");
    fs_err::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$1\" = get ] && [ \"$server\" = {host} ] || exit 1\necho '{{\"ServerURL\":\"{host}\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}}'\n",
            host = registry.host()
        ),
    )
    .unwrap();
    fs_err::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let docker = dir.path().join("docker");
    fs_err::create_dir_all(&docker).unwrap();
    fs_err::write(docker.join("config.json"), r#"{"credsStore":"testkit"}"#).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    custody_with_env(
        &args,
        &[("DOCKER_CONFIG", docker.to_str().unwrap()), ("PATH", &path)],
    )
    .success();

    // containers' auth.json through REGISTRY_AUTH_FILE.
    let auth_dir = custody_testkit::write_docker_config(
        &dir.path().join("containers"),
        registry.host(),
        "alice",
        "s3cret",
    );
    custody_with_env(
        &args,
        &[(
            "REGISTRY_AUTH_FILE",
            auth_dir.join("config.json").to_str().unwrap(),
        )],
    )
    .success();

    // A helper that fails is named, and its output is not echoed.
    fs_err::write(docker.join("config.json"), r#"{"credsStore":"missing"}"#).unwrap();
    custody_with_env(
        &args,
        &[("DOCKER_CONFIG", docker.to_str().unwrap()), ("PATH", &path)],
    )
    .failure(2)
    .stderr_has("docker-credential-missing");
}

#[test]
fn bearer_tokens_are_scoped_to_the_repository() {
    let registry = Registry::builder()
        .tls()
        .token_auth("alice", "s3cret")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(13, &[5_000, 6_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/app:v1", registry.host());

    run_push(
        &registry,
        &["--creds", "alice:s3cret", &oci(&layout, "v1"), &destination],
    )
    .success();
    assert_eq!(
        skopeo_digest(&registry, &destination),
        image.manifest.digest
    );
    let scopes: Vec<String> = registry
        .token_requests()
        .into_iter()
        .flat_map(|r| r.scopes)
        .collect();
    assert!(
        scopes.iter().any(|s| s == "repository:team/app:pull,push"),
        "scopes asked: {scopes:?}"
    );
    assert!(
        scopes.iter().all(|s| s.starts_with("repository:team/app:")),
        "scopes asked: {scopes:?}"
    );

    // A mount asks for pull on the source repository as well.
    let sparse = dir.path().join("sparse");
    LayoutWriter::new(&sparse)
        .image_without_layers(&image)
        .tag("v1", &image.manifest);
    run_push(
        &registry,
        &[
            "--creds",
            "alice:s3cret",
            "--mount-from",
            "team/app",
            &oci(&sparse, "v1"),
            &format!("{}/team/copy:v1", registry.host()),
        ],
    )
    .success();
    let scopes: Vec<String> = registry
        .token_requests()
        .into_iter()
        .flat_map(|r| r.scopes)
        .collect();
    assert!(
        scopes.iter().any(|s| s == "repository:team/app:pull"),
        "scopes asked: {scopes:?}"
    );

    run_push(
        &registry,
        &["--creds", "alice:nope", &oci(&layout, "v1"), &destination],
    )
    .failure(1)
    .stderr_has("token server");
}

#[test]
fn a_registry_that_dies_mid_push_gives_a_clear_error_and_a_rerun_finishes() {
    let registry = Registry::builder().start();
    let proxy = custody_testkit::FaultProxy::start(registry.addr());
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(15, &[2_000_000, 2_000_000]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/flaky:v1", proxy.host());
    let push = || {
        custody(&[
            "push",
            "--insecure-registry",
            &proxy.host(),
            &oci(&layout, "v1"),
            &destination,
        ])
    };

    proxy.die_after(1_000_000);
    push()
        .failure(1)
        .stderr_has(&format!("cannot talk to `{}`", proxy.host()));
    assert!(!registry.has_manifest("team/flaky", "v1"));

    proxy.revive();
    push().success();
    assert_eq!(
        skopeo_digest(&registry, &format!("{}/team/flaky:v1", registry.host())),
        image.manifest.digest
    );
}

#[test]
fn referrers_are_listed_through_the_tag_schema_fallback() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(16, &[1_000]);
    let layout = layout_with(dir.path(), &image);
    let subject = format!("{}/team/app:v1", registry.host());
    run_push(&registry, &[&oci(&layout, "v1"), &subject]).success();

    // An artifact whose subject is the image, pushed from a layout.
    let empty = image::Blob::new("application/vnd.oci.empty.v1+json", b"{}".to_vec());
    let payload = image::Blob::new("application/vnd.in-toto+json", b"{\"hello\":1}".to_vec());
    let artifact = image::Blob::new(
        "application/vnd.oci.image.manifest.v1+json",
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.example.test",
            "config": empty.descriptor(),
            "layers": [payload.descriptor()],
            "subject": image.manifest.descriptor(),
        }))
        .unwrap(),
    );
    let artifact_layout = dir.path().join("artifact");
    LayoutWriter::new(&artifact_layout)
        .blob(&empty)
        .blob(&payload)
        .blob(&artifact)
        .tag("att", &artifact);
    let pushed = custody_oci_push_referrer(&registry, &artifact_layout, &image.manifest.digest);
    assert_eq!(pushed, artifact.digest);

    let run = custody(&[
        "referrers",
        "--insecure-registry",
        registry.host(),
        &subject,
    ])
    .success();
    assert_eq!(
        run.stdout,
        format!(
            "{}\tapplication/vnd.example.test\t{}\n",
            artifact.digest, artifact.size
        )
    );
    let run = custody(&[
        "referrers",
        "--insecure-registry",
        registry.host(),
        "--artifact-type",
        "application/other",
        &subject,
    ])
    .success();
    assert_eq!(run.stdout, "");
    // The fallback tag is a real index that other tools can read.
    let fallback = format!(
        "{}/team/app:sha256-{}",
        registry.host(),
        image.manifest.hex()
    );
    skopeo_digest(&registry, &fallback);
}

/// Pushes the artifact in `layout` as a referrer through the library, the
/// way attestations will be attached.
fn custody_oci_push_referrer(registry: &Registry, layout: &Path, subject: &str) -> String {
    use custody_oci::registry::{Client, RegistryOptions};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let options = RegistryOptions {
            insecure_hosts: vec![registry.host().to_owned()],
            ..RegistryOptions::default()
        };
        let client = Client::new(registry.host(), &options).await.unwrap();
        let layout = custody_oci::layout::Layout::open(layout).unwrap();
        let descriptor = layout.resolve(Some("att")).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&layout.read_small_blob(&descriptor).unwrap()).unwrap();
        for blob in [&manifest["config"], &manifest["layers"][0]] {
            let blob: custody_oci::oci_spec::image::Descriptor =
                serde_json::from_value(blob.clone()).unwrap();
            client
                .upload_blob("team/app", &blob, None, || {
                    let (layout, digest) = (layout.clone(), blob.digest().clone());
                    custody_oci::stream::from_file(
                        move || layout.open_blob(&digest).map(std::sync::Arc::new),
                        None,
                        blob.clone(),
                    )
                })
                .await
                .unwrap();
        }
        let mut listed = descriptor.clone();
        listed.set_annotations(None);
        let bytes = bytes::Bytes::from(layout.read_small_blob(&descriptor).unwrap());
        let subject = custody_oci::digest::parse(subject).unwrap();
        client
            .put_referrer("team/app", &subject, &listed, &bytes)
            .await
            .unwrap();
        listed.digest().to_string()
    })
}

#[test]
fn bad_references_are_usage_errors_that_show_the_reference() {
    // A path where a reference belongs: the hint writes it as a layout.
    custody(&["pull", "127.0.0.1:9/team/app:v1", "/tmp/x"])
        .failure(2)
        .stderr_has("`/tmp/x`")
        .stderr_has("hint: `/tmp/x` looks like a path: write `oci:/tmp/x`");
    custody(&["push", "oci:/nonexistent:v1", "127.0.0.1:5000/Team/App:v1"])
        .failure(2)
        .stderr_has("`127.0.0.1:5000/Team/App:v1`")
        .stderr_has("lowercase");
    custody(&["push", "oci:/x", "docker-archive:/tmp/out.tar"])
        .failure(2)
        .stderr_has("can only be read");
    custody(&["push", "--jobs", "0", "oci:/x", "127.0.0.1:1/a"]).failure(2);
}

#[test]
fn help_explains_every_flag() {
    let run = custody(&["push", "--help"]).success();
    for flag in [
        "--certs-dir",
        "--insecure-registry",
        "--creds",
        "--authfile",
        "--jobs",
        "--digestfile",
        "--mount-from",
        "--chunk-size",
        "oci:PATH[:TAG]",
        "docker-archive:PATH",
    ] {
        assert!(
            run.stdout.contains(flag),
            "push --help does not mention {flag}"
        );
    }
    let run = custody(&["pull", "--help"]).success();
    assert!(run.stdout.contains("--certs-dir") && run.stdout.contains("verified"));
}

#[test]
fn keys_generate_writes_a_private_and_a_public_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keys");
    let run = custody(&["keys", "generate", "--out", out.to_str().unwrap()]).success();
    assert!(
        run.stdout.starts_with("sha256:") && run.stdout.trim().len() == 71,
        "{}",
        run.stdout
    );
    let private = out.join("custody.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&fs_err::metadata(&private).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        fs_err::read_to_string(&private)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert!(
        fs_err::read_to_string(out.join("custody.pub"))
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    let before = fs_err::read(&private).unwrap();
    custody(&["keys", "generate", "--out", out.to_str().unwrap()])
        .failure(2)
        .stderr_has("custody.key")
        .stderr_has("never overwritten");
    assert_eq!(fs_err::read(&private).unwrap(), before);
    // The private key where the public one belongs: said, and where the
    // public one is; the key itself is never shown.
    let verify = custody(&[
        "verify",
        "127.0.0.1:9/team/app:v1",
        "--key",
        private.to_str().unwrap(),
    ])
    .failure(2)
    .stderr_has("this is a private key")
    .stderr_has(&format!("pass `{}`", out.join("custody.pub").display()));
    let secret = fs_err::read_to_string(&private).unwrap();
    let body = secret.lines().nth(1).unwrap();
    assert!(!verify.stderr.contains(body), "{}", verify.stderr);
    custody(&[
        "keys",
        "generate",
        "--out",
        dir.path().join("ed").to_str().unwrap(),
        "--algorithm",
        "ed25519",
    ])
    .success();
}

#[test]
fn a_push_into_a_log_says_how_far_it_got_and_json_says_what_it_pushed() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(11, &[4 << 20, 4 << 20]);
    let layout = layout_with(dir.path(), &image);
    let destination = format!("{}/team/logged:v1", registry.host());
    let args = push_args(&registry, &["--json", &oci(&layout, "v1"), &destination]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // stderr is a pipe here, as in CI: plain lines, not bars.
    let run = custody_with_env(&args, &[("CUSTODY_PROGRESS_SECONDS", "0.000001")]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // The last line counts every blob that started.
    let line = run
        .stderr
        .lines()
        .rfind(|l| l.starts_with("copying: "))
        .unwrap_or_else(|| panic!("no progress line:\n{}", run.stderr));
    assert!(
        line.ends_with("/s)") && line.contains(" of 8.0 MiB"),
        "{line}"
    );
    assert!(!run.stderr.contains('\x1b'), "terminal codes in a log");
    let result: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(result["digest"], image.manifest.digest.as_str());
    assert_eq!(
        result["reference"],
        format!("{destination}@{}", image.manifest.digest)
    );
}
