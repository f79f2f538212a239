//! Steps that push images themselves (`pushes`): skopeo inside a step
//! pushes an OCI layout to `$CUSTODY_REGISTRY`, the runner's gateway on
//! the step's loopback; custody pushes it onward to a TLS + htpasswd
//! registry only once every step succeeded, signs it and tags it. Checked
//! with skopeo, curl and `custody verify`, and attacked from the step.

use std::path::{Path, PathBuf};
use std::process::Output;

use custody_testkit::image::{Image, LayoutWriter};
use custody_testkit::{FaultProxy, Registry};

mod support;
use support::{custody, payload, text};

const PASSWORD: &str = "s3cret-gateway-pw";

/// A TLS registry that wants a password: only the platform holds it.
fn registry() -> Registry {
    Registry::builder()
        .tls()
        .basic_auth("alice", PASSWORD)
        .start()
}

/// A source directory holding an OCI layout `layout` with `image` tagged `v1`.
fn source_with_layout(dir: &Path, image: &Image) -> PathBuf {
    let src = dir.join("src");
    LayoutWriter::new(&src.join("layout"))
        .image(image)
        .tag("v1", &image.manifest);
    src
}

/// `custody build SRC` with `spec`, trusting `registry` and holding its
/// password; the provenance goes to `DIR/provenance.json`.
fn build(registry: &Registry, dir: &Path, src: &Path, spec: &str) -> Output {
    build_via(registry, registry.host(), dir, src, spec)
}

/// [`build`] with `registry` reached at `host` (a [`FaultProxy`] in front
/// of it): the same CA and password, keyed by that host.
fn build_via(registry: &Registry, host: &str, dir: &Path, src: &Path, spec: &str) -> Output {
    fs_err::write(src.join("custody.yaml"), spec).unwrap();
    let ca = registry
        .certs_dir()
        .expect("a TLS registry")
        .join(registry.host())
        .join("ca.crt");
    let certs = dir.join("certs.d");
    fs_err::create_dir_all(certs.join(host)).unwrap();
    fs_err::copy(&ca, certs.join(host).join("ca.crt")).unwrap();
    let (user, password) = registry.credentials().expect("a password");
    let docker = custody_testkit::write_docker_config(dir, host, user, password);
    let data = dir.join("data");
    let envelope = dir.join("provenance.json");
    custody(&[
        "build",
        src.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--provenance-out",
        envelope.to_str().unwrap(),
        "--certs-dir",
        certs.to_str().unwrap(),
        "--authfile",
        docker.join("config.json").to_str().unwrap(),
    ])
}

/// Pushes `layout`'s `v1` straight to `registry` as `reference`, with
/// the password (as whoever made the base image would).
fn seed(registry: &Registry, layout: &Path, reference: &str) {
    let certs = registry.certs_dir().unwrap().join(registry.host());
    let (user, password) = registry.credentials().unwrap();
    let pushed = std::process::Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("--dest-cert-dir={}", certs.display()))
        .arg(format!("--dest-creds={user}:{password}"))
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/{reference}", registry.host()))
        .output()
        .unwrap();
    assert!(pushed.status.success(), "{}", text(&pushed));
}

/// The skopeo command a step runs to push the layout through the gateway.
fn push_to(repository_and_tag: &str) -> String {
    format!(
        "skopeo copy --quiet --dest-tls-verify=false oci:layout:v1 docker://$CUSTODY_REGISTRY/{repository_and_tag}"
    )
}

fn spec(host: &str, steps: &str, pushes: &[&str]) -> String {
    let pushes: String = pushes
        .iter()
        .map(|name| format!("  - name: {name}\n    to: {host}/team/{name}\n"))
        .collect();
    format!("steps:\n{steps}pushes:\n{pushes}")
}

/// The manifest `registry` serves at `reference` (`REPOSITORY:TAG`), as
/// skopeo reads it with the password.
fn published(registry: &Registry, reference: &str) -> Vec<u8> {
    let inspected = registry
        .skopeo(&["inspect", "--raw"])
        .arg(format!("docker://{}/{reference}", registry.host()))
        .output()
        .unwrap();
    assert!(inspected.status.success(), "{}", text(&inspected));
    inspected.stdout
}

/// Nothing of `image` reached `repository`: no tag, no manifest, no layer.
fn assert_nothing_published(registry: &Registry, repository: &str, image: &Image) {
    let listed = registry
        .skopeo(&["list-tags"])
        .arg(format!("docker://{}/{repository}", registry.host()))
        .output()
        .unwrap();
    if listed.status.success() {
        let tags: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
        assert_eq!(tags["Tags"], serde_json::json!([]), "{}", text(&listed));
    }
    assert!(!registry.has_manifest(repository, &image.manifest.digest));
    assert!(!registry.has_manifest(repository, "v1"));
    for blob in image.blobs() {
        assert!(
            !registry.has_blob(repository, &blob.digest),
            "{}",
            blob.digest
        );
    }
}

#[test]
fn skopeo_in_a_step_pushes_through_the_gateway_and_custody_publishes_it() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(7, &[4096, 70_000]);
    let src = source_with_layout(dir.path(), &image);
    // The step looks for the password where a careless platform would
    // leave it (the pattern is split so the spec itself does not hold it).
    let look = r#"if grep -rqs "s3cret-gateway""-pw" /workspace /output /tmp /run /root /home /etc/containers /proc/self/environ; then echo FOUND; exit 9; fi"#;
    let steps = format!(
        "  - name: compile\n    run: echo compiled\n  - name: image\n    run: env && {look} && {}\n",
        push_to("app:v1")
    );
    let output = build(
        &registry,
        dir.path(),
        &src,
        &spec(registry.host(), &steps, &["app"]),
    );
    assert!(output.status.success(), "{}", text(&output));

    // The step saw the gateway and no credential: not in its environment
    // (printed by `env`), not in the files it can read, not in its log.
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(
        log.contains("[image] CUSTODY_REGISTRY=127.0.0.1:5000"),
        "{}",
        text(&output)
    );
    assert!(!text(&output).contains(PASSWORD), "{}", text(&output));

    // The destination holds the layout's image under the step's tag.
    let manifest_bytes = published(&registry, "team/app:v1");
    assert_eq!(
        custody_testkit::image::sha256(&manifest_bytes),
        image.manifest.digest
    );

    // It is a subject, credited to the step that pushed it.
    let statement = payload(&dir.path().join("provenance.json"));
    let subjects = statement["subject"].as_array().unwrap();
    let subject = subjects
        .iter()
        .find(|s| s["digest"]["sha256"] == image.manifest.hex())
        .unwrap_or_else(|| panic!("no subject for the pushed image: {subjects:?}"));
    assert_eq!(
        subject["name"],
        format!("{}/team/app", registry.host()).as_str()
    );
    assert_eq!(subject["annotations"]["kind"], "image");
    assert_eq!(subject["annotations"]["step"], "image");
    assert_eq!(subject["annotations"]["tag"], "v1");

    // custody verify finds the attached provenance and accepts it.
    let certs = registry.certs_dir().unwrap();
    let docker = dir.path().join("docker");
    let public = dir.path().join("data/keys/custody.pub");
    let verified = custody(&[
        "verify",
        &format!("{}/team/app:v1", registry.host()),
        "--key",
        public.to_str().unwrap(),
        "--certs-dir",
        certs.to_str().unwrap(),
        "--authfile",
        docker.join("config.json").to_str().unwrap(),
    ]);
    assert!(verified.status.success(), "{}", text(&verified));
}

#[test]
fn a_later_failing_step_leaves_nothing_at_the_destination() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(8, &[5000]);
    let src = source_with_layout(dir.path(), &image);
    let steps = format!(
        "  - name: image\n    run: {}\n  - name: test\n    run: echo tests failed; exit 3\n",
        push_to("app:v1")
    );
    let output = build(
        &registry,
        dir.path(),
        &src,
        &spec(registry.host(), &steps, &["app"]),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("step `test` exited with code 3"),
        "{}",
        text(&output)
    );
    assert_nothing_published(&registry, "team/app", &image);
    assert!(!dir.path().join("provenance.json").exists());
}

/// The upload sessions in `repository` that still hold bytes. (A
/// cancelled one is gone but for an empty hash state distribution 2.8
/// writes as it closes it.)
fn open_uploads(registry: &Registry, repository: &str) -> Vec<String> {
    let uploads = registry
        .storage_dir()
        .join("docker/registry/v2/repositories")
        .join(repository)
        .join("_uploads");
    match fs_err::read_dir(&uploads) {
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|session| session.join("data").exists())
            .map(|session| session.display().to_string())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The gateway streams a step's upload to the destination while the step
/// runs (the bytes cross a fault proxy in front of it), but never
/// completes it before every step succeeded: a later failing step leaves
/// no blob there, asked directly, and the sessions are cancelled.
#[test]
fn a_later_failing_step_leaves_no_streamed_blob_at_the_destination() {
    let registry = registry();
    let proxy = FaultProxy::start(registry.addr());
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(21, &[1 << 20, 3 << 20]);
    let src = source_with_layout(dir.path(), &image);
    let steps = format!(
        "  - name: image\n    run: {}\n  - name: test\n    run: echo tests failed; exit 3\n",
        push_to("app:v1")
    );
    let output = build_via(
        &registry,
        &proxy.host(),
        dir.path(),
        &src,
        &spec(&proxy.host(), &steps, &["app"]),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        proxy.bytes_up() > 4 << 20,
        "the step's upload was not streamed to the destination: {} bytes went up",
        proxy.bytes_up()
    );
    for blob in image.blobs() {
        assert!(
            !registry.has_blob("team/app", &blob.digest),
            "{}",
            blob.digest
        );
    }
    assert_eq!(open_uploads(&registry, "team/app"), Vec::<String>::new());
    assert_nothing_published(&registry, "team/app", &image);
}

/// Eight blobs uploaded at once by a step's own client (curl: a session,
/// a PATCH and a PUT each), streamed to the destination while they
/// arrive; once the steps succeeded the sessions are completed and the
/// image is at the destination under the step's tag.
#[test]
fn eight_parallel_uploads_streamed_through_the_gateway_are_published() {
    let registry = registry();
    let proxy = FaultProxy::start(registry.addr());
    let dir = tempfile::tempdir().unwrap();
    let sizes: Vec<usize> = (0..7).map(|i| 300_000 + i * 77_777).collect();
    let image = Image::random(22, &sizes);
    let src = source_with_layout(dir.path(), &image);
    let gateway = "http://$CUSTODY_REGISTRY/v2/app";
    let mut script = String::from("set -e\nupload() {\n  location=$(curl -sS --fail-with-body -X POST -D - -o /dev/null {gateway}/blobs/uploads/ | tr -d '\\r' | sed -n 's/^[Ll]ocation: //p')\n  location=$(curl -sS --fail-with-body -X PATCH -H 'Content-Type: application/octet-stream' --data-binary @layout/blobs/sha256/$1 -D - -o /dev/null \"http://$CUSTODY_REGISTRY$location\" | tr -d '\\r' | sed -n 's/^[Ll]ocation: //p')\n  curl -sS --fail-with-body -X PUT \"http://$CUSTODY_REGISTRY$location?digest=sha256:$1\"\n}\n")
        .replace("{gateway}", gateway);
    let blobs: Vec<_> = image.blobs().collect();
    assert_eq!(blobs.len(), 8);
    for blob in &blobs {
        script.push_str(&format!("upload {} & pids=\"$pids $!\"\n", blob.hex()));
    }
    // `set -e` sees a failed upload through `wait PID`.
    script.push_str("for pid in $pids; do wait $pid; done\n");
    script.push_str(&format!(
        "curl -sS --fail-with-body -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary @layout/blobs/sha256/{} {gateway}/manifests/v1\n",
        image.manifest.hex()
    ));
    fs_err::write(src.join("upload.sh"), script).unwrap();
    let steps =
        "  - name: image\n    run: sh upload.sh\n  - name: test\n    run: echo tests passed\n";
    let output = build_via(
        &registry,
        &proxy.host(),
        dir.path(),
        &src,
        &spec(&proxy.host(), steps, &["app"]),
    );
    assert!(output.status.success(), "{}", text(&output));
    // Each blob went up once, streamed: the onward copy found them all
    // present and sent only the manifest and the attestation.
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let up = proxy.bytes_up();
    assert!(
        up > total && up < total + 300_000,
        "{up} bytes went up for {total} bytes of blobs"
    );
    let manifest_bytes = published(&registry, "team/app:v1");
    assert_eq!(
        custody_testkit::image::sha256(&manifest_bytes),
        image.manifest.digest
    );
    for blob in &blobs {
        assert!(
            registry.has_blob("team/app", &blob.digest),
            "{}",
            blob.digest
        );
    }
    assert_eq!(open_uploads(&registry, "team/app"), Vec::<String>::new());
}

/// A step that uploads a blob no pushed manifest names (data smuggled
/// into the destination, outside every subject of the provenance) sees
/// its upload accepted by the gateway, but once the build succeeded the
/// destination holds only the image's blobs: the stray session was
/// cancelled, not completed.
#[test]
fn a_blob_no_pushed_manifest_names_never_reaches_the_destination() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(23, &[50_000]);
    let src = source_with_layout(dir.path(), &image);
    let stray = custody_testkit::image::random_bytes(24, 200_000);
    let stray_digest = custody_testkit::image::sha256(&stray);
    fs_err::write(src.join("stray.bin"), &stray).unwrap();
    let steps = format!(
        "  - name: image\n    run: |\n      set -e\n      {}\n      curl -sS --fail-with-body -X POST -H 'Content-Type: application/octet-stream' --data-binary @stray.bin \"http://$CUSTODY_REGISTRY/v2/app/blobs/uploads/?digest={stray_digest}\"\n      echo stray uploaded\n",
        push_to("app:v1")
    );
    let output = build(
        &registry,
        dir.path(),
        &src,
        &spec(registry.host(), &steps, &["app"]),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("stray uploaded"),
        "{}",
        text(&output)
    );
    assert!(registry.has_manifest("team/app", "v1"));
    for blob in image.blobs() {
        assert!(
            registry.has_blob("team/app", &blob.digest),
            "{}",
            blob.digest
        );
    }
    assert!(
        !registry.has_blob("team/app", &stray_digest),
        "a blob no manifest names was completed at the destination"
    );
    assert_eq!(open_uploads(&registry, "team/app"), Vec::<String>::new());
}

/// A builder that assembles a multi-platform index from images already
/// at the destination (pushed there by earlier builds) pushes only the
/// index: the gateway accepts it because the destination holds its
/// children, and the runner's onward push sends the index alone, which
/// is published under the step's tag and signed.
#[test]
fn an_index_over_images_only_the_destination_holds_is_published() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let (amd, arm) = (Image::random(41, &[3000]), Image::random(42, &[4000]));
    for (image, arch) in [(&amd, "amd64"), (&arm, "arm64")] {
        let layout = dir.path().join(arch);
        LayoutWriter::new(&layout)
            .image(image)
            .tag("v1", &image.manifest);
        seed(&registry, &layout, &format!("team/app:{arch}"));
    }
    let index = custody_testkit::image::index_of(&[(&amd, "amd64"), (&arm, "arm64")]);
    let src = dir.path().join("src");
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(src.join("index.json"), &index.bytes).unwrap();
    let steps = "  - name: index\n    run: |\n      curl -sS --fail-with-body -X PUT -H 'Content-Type: application/vnd.oci.image.index.v1+json' --data-binary @index.json http://$CUSTODY_REGISTRY/v2/app/manifests/multi\n";
    let output = build(
        &registry,
        dir.path(),
        &src,
        &spec(registry.host(), steps, &["app"]),
    );
    assert!(output.status.success(), "{}", text(&output));
    let manifest_bytes = published(&registry, "team/app:multi");
    assert_eq!(
        custody_testkit::image::sha256(&manifest_bytes),
        index.digest
    );
    let statement = payload(&dir.path().join("provenance.json"));
    let subjects = statement["subject"].to_string();
    assert!(
        subjects.contains(index.digest.trim_start_matches("sha256:")),
        "{subjects}"
    );
}

#[test]
fn a_push_to_an_undeclared_repository_fails_the_step() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(9, &[5000]);
    let src = source_with_layout(dir.path(), &image);
    // The attacker's step tries a repository the spec does not declare.
    let steps = format!("  - name: image\n    run: {}\n", push_to("other:v1"));
    let output = build(
        &registry,
        dir.path(),
        &src,
        &spec(registry.host(), &steps, &["app"]),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let all = text(&output);
    assert!(all.contains("step `image` exited with code"), "{all}");
    // skopeo shows the gateway's refusal in the step's log: the registry's
    // own error code, naming what the step may push to.
    assert!(
        all.contains("[image]") && all.contains("name unknown"),
        "{all}"
    );
    assert!(
        all.contains("`other` is not a repository this build declared; steps may push to `app`"),
        "{all}"
    );
    assert_nothing_published(&registry, "team/other", &image);
    assert_nothing_published(&registry, "team/app", &image);
}

#[test]
fn a_declared_push_no_step_made_fails_the_build_naming_it() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(10, &[5000]);
    let src = source_with_layout(dir.path(), &image);
    let steps = format!("  - name: image\n    run: {}\n", push_to("app:v1"));
    let output = build(
        &registry,
        dir.path(),
        &src,
        &spec(registry.host(), &steps, &["app", "forgotten"]),
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`forgotten`") && stderr.contains("no step pushed"),
        "{}",
        text(&output)
    );
    // What was pushed to `app` does not go out either.
    assert_nothing_published(&registry, "team/app", &image);
}

/// The destination already holds the image's big layer (a base image
/// pushed there before): the gateway answers the step's `HEAD` for it
/// with 200, so skopeo skips the upload, the gateway accepts the manifest
/// naming it, and the runner's onward push finds it present. The layer
/// crosses no wire during the build.
#[test]
fn a_layer_the_destination_holds_is_neither_uploaded_nor_pushed_again() {
    let registry = registry();
    let proxy = FaultProxy::start(registry.addr());
    let dir = tempfile::tempdir().unwrap();
    let (big, big_diff) = custody_testkit::image::gzip_layer(
        "big",
        &custody_testkit::image::random_bytes(31, 3_000_000),
    );
    let layer = |seed: u64| {
        custody_testkit::image::gzip_layer(
            "small",
            &custody_testkit::image::random_bytes(seed, 2000),
        )
    };
    let ((base_top, base_diff), (app_top, app_diff)) = (layer(32), layer(33));
    let base = Image::from_layers(
        32,
        vec![big.clone(), base_top],
        vec![big_diff.clone(), base_diff],
        "amd64",
    );
    let app = Image::from_layers(
        33,
        vec![big.clone(), app_top],
        vec![big_diff, app_diff],
        "amd64",
    );

    // The base image reaches the destination straight, not through the proxy.
    let base_layout = dir.path().join("base");
    LayoutWriter::new(&base_layout)
        .image(&base)
        .tag("v1", &base.manifest);
    seed(&registry, &base_layout, "team/app:base");
    assert!(registry.has_blob("team/app", &big.digest));

    let src = source_with_layout(dir.path(), &app);
    let steps = format!("  - name: image\n    run: {}\n", push_to("app:v1"));
    let output = build_via(
        &registry,
        &proxy.host(),
        dir.path(),
        &src,
        &spec(&proxy.host(), &steps, &["app"]),
    );
    assert!(output.status.success(), "{}", text(&output));

    // The destination holds the new image under the step's tag, whole.
    let manifest_bytes = published(&registry, "team/app:v1");
    assert_eq!(
        custody_testkit::image::sha256(&manifest_bytes),
        app.manifest.digest
    );
    for blob in app.blobs() {
        assert!(
            registry.has_blob("team/app", &blob.digest),
            "{}",
            blob.digest
        );
    }

    // Checks, the small layer, config, manifest and attestation went up;
    // the 3 MB layer went neither up nor down.
    let (up, down) = (proxy.bytes_up(), proxy.bytes_down());
    assert!(big.size > 2_900_000);
    assert!(
        up < 200_000 && down < 200_000,
        "the build sent {up} and fetched {down} bytes through the proxy"
    );
}

/// A step reads a `pulls` repository through the gateway with skopeo, which
/// holds no credential: the gateway serves it from the TLS + htpasswd
/// registry with the platform's password, and the manifest the step read
/// is a resolved dependency of the provenance.
#[test]
fn skopeo_in_a_step_reads_a_pulls_repository_and_the_provenance_names_it() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let base = Image::random(41, &[3000, 60_000]);
    let base_layout = dir.path().join("base");
    LayoutWriter::new(&base_layout)
        .image(&base)
        .tag("v1", &base.manifest);
    seed(&registry, &base_layout, "library/base:v1");

    let src = dir.path().join("src");
    fs_err::create_dir_all(&src).unwrap();
    let look = r#"if grep -rqs "s3cret-gateway""-pw" /workspace /output /tmp /run /root /home /etc/containers /proc/self/environ; then echo FOUND; exit 9; fi"#;
    let steps = format!(
        "  - name: fetch\n    run: env && {look} && skopeo copy --quiet --remove-signatures --src-tls-verify=false docker://$CUSTODY_REGISTRY/base:v1 oci:/workspace/x:v1 && cat /workspace/x/index.json\n  - name: write\n    run: skopeo copy --quiet --remove-signatures --src-tls-verify=false --dest-tls-verify=false docker://$CUSTODY_REGISTRY/base:v1 docker://$CUSTODY_REGISTRY/base:v2 || echo REFUSED\n"
    );
    let spec = format!(
        "steps:\n{steps}pulls:\n  - name: base\n    from: {}/library/base\n",
        registry.host()
    );
    let output = build(&registry, dir.path(), &src, &spec);
    assert!(output.status.success(), "{}", text(&output));
    let all = text(&output);
    assert!(
        all.contains("[fetch] CUSTODY_REGISTRY=127.0.0.1:5000"),
        "{all}"
    );
    assert!(!all.contains(PASSWORD), "{all}");
    // The step holds the very image the registry has.
    assert!(all.contains(&base.manifest.digest), "{all}");
    // A pull repository takes no push: the gateway says so, DENIED.
    assert!(all.contains("[write] REFUSED"), "{all}");
    assert!(all.contains("is a pull repository"), "{all}");
    assert!(!registry.has_manifest("library/base", "v2"));

    let statement = payload(&dir.path().join("provenance.json"));
    let dependencies = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    let pulled = dependencies
        .iter()
        .find(|d| d["name"] == "pull:base")
        .unwrap_or_else(|| panic!("no pull:base dependency: {dependencies:?}"));
    assert_eq!(
        pulled["uri"],
        format!("{}/library/base@{}", registry.host(), base.manifest.digest).as_str()
    );
    assert_eq!(pulled["digest"]["sha256"], base.manifest.hex());
}

/// A second client custody did not write: Python's `oras` pushes a file
/// artifact (its own manifest, config and layer) through the gateway, and
/// custody publishes exactly what it pushed.
#[test]
fn oras_in_a_step_pushes_an_artifact_through_the_gateway() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(src.join("report.txt"), "built by a step\n").unwrap();
    fs_err::write(
        src.join("push.py"),
        "import os, oras.client\n\
         client = oras.client.OrasClient(hostname=os.environ['CUSTODY_REGISTRY'], insecure=True)\n\
         client.push(target=os.environ['CUSTODY_REGISTRY'] + '/app:v1', files=['report.txt'], disable_path_validation=True)\n",
    )
    .unwrap();
    // scripts/setup installs oras for the system python3, where steps see it.
    let steps = "  - name: publish\n    run: PYTHONPATH=/opt/custody-tests/python /usr/bin/python3 push.py\n";
    let output = build(
        &registry,
        dir.path(),
        &src,
        &spec(registry.host(), steps, &["app"]),
    );
    assert!(output.status.success(), "{}", text(&output));

    // The destination holds oras's manifest, whose one layer is the file.
    let manifest_bytes = published(&registry, "team/app:v1");
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["digest"],
        custody_testkit::image::sha256(b"built by a step\n").as_str()
    );
    assert_eq!(
        layers[0]["annotations"]["org.opencontainers.image.title"],
        "report.txt"
    );

    // That manifest is the subject the step is credited with.
    let digest = custody_testkit::image::sha256(&manifest_bytes);
    let statement = payload(&dir.path().join("provenance.json"));
    let subject = statement["subject"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| format!("sha256:{}", s["digest"]["sha256"].as_str().unwrap()) == digest)
        .unwrap_or_else(|| panic!("no subject for {digest}: {statement}"))
        .clone();
    assert_eq!(subject["annotations"]["step"], "publish");
    assert_eq!(subject["annotations"]["tag"], "v1");
}

/// What the gateway refuses, tried from a step as an attacker would: each
/// request fails with the registry's own error code, the step's exit code
/// says so, and nothing of the build reaches the destination.
#[test]
fn the_gateway_refuses_deletes_attestation_tags_subjects_and_wrong_bytes_from_a_step() {
    let registry = registry();
    let image = Image::random(11, &[6000]);
    let hex = image.manifest.hex();
    let gateway = "http://$CUSTODY_REGISTRY/v2/app";
    // Each attempt after a good push of the layout, so the blobs and the
    // manifest it names are there; `curl --fail-with-body` shows it and exits 22.
    let attempts = [
        (
            "delete",
            format!("curl -sS --fail-with-body -X DELETE {gateway}/manifests/v1"),
            "UNSUPPORTED",
        ),
        (
            "attestation tag",
            push_to(&format!("app:sha256-{hex}.att")),
            "denied",
        ),
        (
            "subject",
            format!(
                "python3 -c 'import json,sys; m=json.load(open(\"layout/blobs/sha256/{hex}\")); m[\"subject\"]={{\"mediaType\":m[\"mediaType\"],\"digest\":\"sha256:{hex}\",\"size\":1}}; open(\"m.json\",\"w\").write(json.dumps(m))' && curl -sS --fail-with-body -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary @m.json {gateway}/manifests/v2"
            ),
            "DENIED",
        ),
        (
            "wrong bytes",
            format!(
                "echo tampered > blob && curl -sS --fail-with-body -X POST --data-binary @blob \"{gateway}/blobs/uploads/?digest=sha256:{}\"",
                "0".repeat(64)
            ),
            "DIGEST_INVALID",
        ),
    ];
    for (what, attempt, code) in attempts {
        let dir = tempfile::tempdir().unwrap();
        let src = source_with_layout(dir.path(), &image);
        let script = format!("set -e\n{}\n{attempt}\n", push_to("app:v1"));
        fs_err::write(src.join("attack.sh"), script).unwrap();
        let steps = "  - name: attack\n    run: sh attack.sh\n";
        let output = build(
            &registry,
            dir.path(),
            &src,
            &spec(registry.host(), steps, &["app"]),
        );
        let all = text(&output);
        assert_eq!(output.status.code(), Some(1), "{what}: {all}");
        assert!(
            all.contains("step `attack` exited with code"),
            "{what}: {all}"
        );
        assert!(all.contains(code), "{what}: no {code} in\n{all}");
        assert_nothing_published(&registry, "team/app", &image);
    }
}
