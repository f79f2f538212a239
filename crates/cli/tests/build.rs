//! `custody build` end to end: the embedded daemon, a real runner, real
//! bubblewrap, real git, a real registry; skopeo and Python's
//! securesystemslib check what comes out.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use custody_testkit::Registry;

mod support;
use support::{custody, payload, text};

use custody_testkit::git;

/// examples/hello copied into a fresh git repository; returns it and its commit.
fn example_checkout(dir: &Path) -> (PathBuf, String) {
    let src = dir.join("hello");
    fs_err::create_dir_all(&src).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
    for name in ["custody.yaml", "hello.sh", ".gitignore"] {
        fs_err::copy(example.join(name), src.join(name)).unwrap();
    }
    git(&src, &["init", "-q"]);
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "example"]);
    let commit = git(&src, &["rev-parse", "HEAD"]);
    (src, commit)
}

/// The registry arguments a client needs for `registry`.
fn registry_args(registry: &Registry, dir: &Path) -> Vec<String> {
    let mut args = Vec::new();
    match registry.certs_dir() {
        Some(certs) => args.extend(["--certs-dir".into(), certs.display().to_string()]),
        None => args.extend(["--insecure-registry".into(), registry.host().to_owned()]),
    }
    if let Some((user, password)) = registry.credentials() {
        let docker = custody_testkit::write_docker_config(dir, registry.host(), user, password);
        args.extend([
            "--authfile".into(),
            docker.join("config.json").display().to_string(),
        ]);
    }
    args
}

fn skopeo(registry: &Registry, args: &[&str], reference: &str) -> Output {
    registry
        .skopeo(args)
        .arg(reference)
        .output()
        .expect("skopeo runs")
}

/// The tags of `repository`, as skopeo lists them.
fn tags(registry: &Registry, repository: &str) -> Vec<String> {
    let output = skopeo(
        registry,
        &["list-tags"],
        &format!("docker://{}/{repository}", registry.host()),
    );
    if !output.status.success() {
        return Vec::new();
    }
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    listed["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

const SECURESYSTEMSLIB: &str = r#"
import json, sys
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
envelope = Envelope.from_dict(json.load(open(sys.argv[1])))
keyid = next(iter(envelope.signatures))
key = SSlibKey.from_crypto(load_pem_public_key(open(sys.argv[2], "rb").read()), keyid=keyid)
envelope.verify([key], 1)
print("\n".join(s["digest"]["sha256"] for s in json.loads(envelope.payload)["subject"]))
"#;

/// How many builds in the data directory's store carry provenance.
fn stored_provenance(data: &Path) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = custody_daemon::store::Store::open_sqlite(&data.join("custody.db"))
            .await
            .unwrap();
        let count = store.count_provenance().await.unwrap();
        store.close().await;
        count
    })
}

fn provenance_files(data: &Path) -> usize {
    fs_err::read_dir(data.join("provenance"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn the_example_builds_pushes_and_verifies_with_independent_tools() {
    // TLS and a password: the runner can only push with what the daemon hands it.
    let registry = Registry::builder()
        .tls()
        .basic_auth("alice", "s3cret-pw")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let (src, commit) = example_checkout(dir.path());
    let spec = fs_err::read_to_string(src.join("custody.yaml"))
        .unwrap()
        .replace("oci:out/", &format!("{}/demo/", registry.host()));
    fs_err::write(dir.path().join("registry.yaml"), spec).unwrap();
    let data = dir.path().join("data");
    let envelope = dir.path().join("provenance.json");
    let mut args: Vec<String> = [
        "build",
        src.to_str().unwrap(),
        "-f",
        dir.path().join("registry.yaml").to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--builder-id",
        "https://ci.example.org/custody",
        "--provenance-out",
        envelope.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(registry_args(&registry, dir.path()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = custody(&args);
    assert!(output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("created a signing key at"), "{stderr}");
    // The steps' output streams live, prefixed with the step's name.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("[image] image written to /output/hello"),
        "{stdout}"
    );
    assert!(!format!("{stdout}{stderr}").contains("s3cret-pw"));

    let tag = &commit[..12];
    let image = format!("{}/demo/hello:{tag}", registry.host());
    let inspected = skopeo(
        &registry,
        &["inspect", "--raw"],
        &format!("docker://{image}"),
    );
    assert!(inspected.status.success(), "{}", text(&inspected));
    let image_digest = custody_testkit::image::sha256(&inspected.stdout);

    // securesystemslib checks the signature; the subjects are the image, the
    // artifact and each of its files.
    let public = data.join("keys/custody.pub");
    let check = Command::new("python3")
        .args(["-c", SECURESYSTEMSLIB])
        .arg(&envelope)
        .arg(&public)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let subjects = String::from_utf8_lossy(&check.stdout);
    let hex = |digest: String| digest.trim_start_matches("sha256:").to_owned();
    assert!(
        subjects.lines().any(|d| d == hex(image_digest.clone())),
        "{subjects}"
    );
    let script = fs_err::read(src.join("hello.sh")).unwrap();
    assert!(
        subjects
            .lines()
            .any(|d| d == hex(custody_testkit::image::sha256(&script))),
        "{subjects}"
    );

    let statement = payload(&envelope);
    let predicate = &statement["predicate"];
    let source = &predicate["buildDefinition"]["resolvedDependencies"][0];
    assert_eq!(source["digest"]["gitCommit"], commit.as_str());
    assert_eq!(
        predicate["runDetails"]["builder"]["id"],
        "https://ci.example.org/custody"
    );
    assert!(
        predicate["runDetails"]["builder"]["builderDependencies"][0]["digest"]["sha256"]
            .is_string()
    );
    assert_eq!(
        predicate["runDetails"]["byproducts"][0]["name"],
        "log:image"
    );
    assert_eq!(stored_provenance(&data), 1);

    // The artifact pulls back with the workspace's bytes.
    let pulled = dir.path().join("pulled");
    let mut pull = vec![
        "pull".to_owned(),
        format!("{}/demo/hello-files:{tag}", registry.host()),
        format!("oci:{}", pulled.display()),
    ];
    pull.extend(registry_args(&registry, dir.path()));
    let pull: Vec<&str> = pull.iter().map(String::as_str).collect();
    let output = custody(&pull);
    assert!(output.status.success(), "{}", text(&output));
    let blob = pulled
        .join("blobs/sha256")
        .join(hex(custody_testkit::image::sha256(&script)));
    assert_eq!(fs_err::read(blob).unwrap(), script);

    // custody verify with a policy: passes, and fails on a wrong builder or source.
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "verify".to_owned(),
            image.clone(),
            "--key".into(),
            public.display().to_string(),
        ];
        args.extend(registry_args(&registry, dir.path()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        custody(&args)
    };
    let source_url = format!("file://{}", src.canonicalize().unwrap().display());
    let source = format!("{source_url}@{commit}");
    // The spec came from `-f`, outside the source: the source alone does
    // not say what was built, so a source policy needs the user's consent.
    let not_from_source = verify(&["--source", &source]);
    assert_eq!(
        not_from_source.status.code(),
        Some(1),
        "{}",
        text(&not_from_source)
    );
    assert!(
        String::from_utf8_lossy(&not_from_source.stderr).contains("--allow-inline-spec"),
        "{}",
        text(&not_from_source)
    );
    let good = verify(&[
        "--builder-id",
        "https://ci.example.org/custody",
        "--source",
        &source,
        "--allow-inline-spec",
    ]);
    assert!(good.status.success(), "{}", text(&good));
    let wrong_builder = verify(&["--builder-id", "https://evil.example.org"]);
    assert_eq!(
        wrong_builder.status.code(),
        Some(1),
        "{}",
        text(&wrong_builder)
    );
    let wrong_commit = verify(&["--source", &format!("{source_url}@{}", "0".repeat(40))]);
    assert_eq!(
        wrong_commit.status.code(),
        Some(1),
        "{}",
        text(&wrong_commit)
    );
}

#[test]
fn a_git_source_is_fetched_at_the_resolved_commit_and_step_images_are_pinned() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    fs_err::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    fs_err::write(repo.join("VERSION"), "1.0\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "one"]);
    git(&repo, &["tag", "v1"]);
    let v1 = git(&repo, &["rev-parse", "HEAD"]);
    fs_err::write(repo.join("VERSION"), "2.0\n").unwrap();
    git(&repo, &["commit", "-qam", "two"]);

    let (image, tagged) = support::push_busybox(&registry, dir.path());

    let url = format!("file://{}", repo.display());
    let spec = format!(
        r#"
source:
  git: {url}
  revision: v1
steps:
  - name: in-image
    image: {tagged}
    run: cat /etc/os-release && cp VERSION dist.txt
artifacts:
  - paths: [dist.txt]
    to: oci:out/files:{{revision}}
"#
    );
    let data = dir.path().join("data");
    let envelope = dir.path().join("provenance.json");
    let output = build_in(
        &registry,
        dir.path(),
        &spec,
        &data,
        &["--provenance-out", envelope.to_str().unwrap()],
    );
    assert!(output.status.success(), "{}", text(&output));
    // The step ran on the image, in a checkout of the tag.
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("[in-image] ID=custody-test-image"),
        "{}",
        text(&output)
    );
    let artifact = format!("oci:{}:v1", dir.path().join("out/files").display());
    let statement = payload(&envelope);
    let dependencies = &statement["predicate"]["buildDefinition"]["resolvedDependencies"];
    assert_eq!(dependencies[0]["uri"], format!("git+{url}"));
    assert_eq!(dependencies[0]["digest"]["gitCommit"], v1.as_str());
    assert_eq!(dependencies[1]["name"], "step-image:in-image");
    let image_hex = image.manifest.digest.trim_start_matches("sha256:");
    assert_eq!(dependencies[1]["digest"]["sha256"], image_hex);
    let file = statement["subject"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "dist.txt")
        .expect("the file is a subject");
    assert_eq!(
        format!("sha256:{}", file["digest"]["sha256"].as_str().unwrap()),
        custody_testkit::image::sha256(b"1.0\n")
    );

    let public = data.join("keys/custody.pub");
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", &artifact, "--key", public.to_str().unwrap()];
        args.extend(extra);
        custody(&args)
    };
    // The spec is the local file that named the repository, not a file of
    // the commit: a source policy accepts it only when told to.
    let allowed = verify(&[
        "--source",
        &format!("{url}@{v1}"),
        "--allow-inline-spec",
        "--allow-step-image",
        &image.manifest.digest,
    ]);
    assert!(allowed.status.success(), "{}", text(&allowed));
    let other = format!("sha256:{}", "1".repeat(64));
    let refused = verify(&["--allow-step-image", &other]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(image_hex),
        "{}",
        text(&refused)
    );
}

/// Builds `spec` in a fresh directory against `registry`; returns the
/// output and the data directory.
fn build_spec(registry: &Registry, dir: &Path, spec: &str) -> (Output, PathBuf) {
    let data = dir.join("data");
    (build_in(registry, dir, spec, &data, &[]), data)
}

/// Writes `spec` as `dir/custody.yaml` and builds `dir` with `data` as the
/// data directory, `registry` reachable, and `extra` arguments.
fn build_in(registry: &Registry, dir: &Path, spec: &str, data: &Path, extra: &[&str]) -> Output {
    fs_err::write(dir.join("custody.yaml"), spec).unwrap();
    let mut args = vec![
        "build",
        dir.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--insecure-registry",
        registry.host(),
    ];
    args.extend_from_slice(extra);
    custody(&args)
}

/// The build failed (exit 1) saying `reason`, and no provenance exists
/// anywhere: not in the store, not in the data directory, not in the
/// registry.
fn assert_failed_without_provenance(
    output: &Output,
    data: &Path,
    registry: &Registry,
    reason: &str,
) {
    assert_eq!(output.status.code(), Some(1), "{}", text(output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(reason), "expected `{reason}` in\n{stderr}");
    assert_eq!(stored_provenance(data), 0);
    assert_eq!(provenance_files(data), 0);
    let attestation_tags: Vec<String> = tags(registry, "t/app")
        .into_iter()
        .filter(|t| t.starts_with("sha256-"))
        .collect();
    assert!(attestation_tags.is_empty(), "{attestation_tags:?}");
}

const WRITE_IMAGE: &str = "umoci init --layout /output/app && umoci new --image /output/app:v1";

#[test]
fn a_failing_step_publishes_nothing() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "steps:\n  - name: make\n    run: {WRITE_IMAGE}\n  - name: test\n    run: exit 3\nimages:\n  - from: oci:/output/app:v1\n    to: {}/t/app:v1\n",
        registry.host()
    );
    let (output, data) = build_spec(&registry, dir.path(), &spec);
    assert_failed_without_provenance(&output, &data, &registry, "step `test` exited with code 3");
    assert!(tags(&registry, "t/app").is_empty(), "nothing was pushed");
}

#[test]
fn a_push_to_a_stopped_registry_publishes_nothing() {
    let mut registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "steps:\n  - name: make\n    run: {WRITE_IMAGE}\nimages:\n  - from: oci:/output/app:v1\n    to: {}/t/app:v1\n",
        registry.host()
    );
    registry.stop();
    let (output, data) = build_spec(&registry, dir.path(), &spec);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Found before any step ran, naming the destination and its line.
    assert!(
        stderr.contains(&format!(
            "custody.yaml:6:9: destination `{}/t/app:v1` cannot take the build's output",
            registry.host()
        )),
        "{stderr}"
    );
    assert_eq!(stored_provenance(&data), 0);
    assert_eq!(provenance_files(&data), 0);
    registry.restart();
    assert!(tags(&registry, "t/app").is_empty());
}

#[test]
fn an_output_never_written_publishes_nothing() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    // The first image is written and pushed; the second never is.
    let spec = format!(
        "steps:\n  - name: make\n    run: {WRITE_IMAGE}\nimages:\n  - from: oci:/output/app:v1\n    to: {host}/t/app:v1\n  - from: oci:/output/missing\n    to: {host}/t/missing:v1\n",
        host = registry.host()
    );
    let (output, data) = build_spec(&registry, dir.path(), &spec);
    assert_failed_without_provenance(&output, &data, &registry, "/output/missing");
    // Every output is read before any is pushed: the first never was.
    assert!(tags(&registry, "t/app").is_empty());
}

#[test]
fn steps_see_no_secrets_and_never_the_hosts_network() {
    let registry = Registry::builder().basic_auth("bob", "hunter2-pw").start();
    // A data directory outside /tmp (which steps never see anyway), so the
    // test shows it is hidden on purpose.
    let data_root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = data_root.path().join("data");
    let key = data.join("keys/custody.key");
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in server.incoming().flatten() {
            let mut request = [0; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nREACHED",
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let auth =
        custody_testkit::write_docker_config(dir.path(), registry.host(), "bob", "hunter2-pw");
    let spec = format!(
        r#"steps:
  - name: snoop
    run: |
      env; cat /proc/*/environ 2>/dev/null | tr '\0' '\n'
      cat {key} 2>&1 | head -3; ls {data} 2>&1
      cat {auth}/config.json 2>&1
      cat /proc/1/environ | tr "\\0" "\\n" | grep -c "^PWD=/work" | sed "s/^/runner cwd seen: /"
      ls /proc | grep -c '^[0-9]' | sed 's/^/processes: /'
  - name: offline
    run: curl -sS --max-time 3 http://127.0.0.1:{port}/ || echo UNREACHABLE
  - name: online
    network: true
    run: curl -sS --max-time 3 http://127.0.0.1:{port}/ || echo UNREACHABLE
  - name: make
    run: {WRITE_IMAGE}
images:
  - from: oci:/output/app:v1
    to: {host}/t/app:v1
"#,
        key = key.display(),
        data = data.display(),
        auth = auth.display(),
        host = registry.host()
    );
    let output = build_in(
        &registry,
        dir.path(),
        &spec,
        &data,
        &["--authfile", auth.join("config.json").to_str().unwrap()],
    );
    // The runner pushed with the password the step never saw.
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let all = text(&output);
    for secret in [
        "hunter2-pw",
        "canary-f00d",
        "PRIVATE KEY",
        "CUSTODY_",
        "auths",
    ] {
        assert!(!all.contains(secret), "`{secret}` leaked:\n{all}");
    }
    assert!(
        stdout.contains(&format!(
            "[snoop] cat: {}: No such file or directory",
            key.display()
        )),
        "{stdout}"
    );
    // Not even the runner's working directory shows through.
    assert!(stdout.contains("[snoop] runner cwd seen: 0"), "{stdout}");
    // Its own PID namespace: the shell and its children only.
    let processes: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("[snoop] processes: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the step counted processes");
    assert!(processes <= 6, "{stdout}");
    assert!(stdout.contains("[offline] UNREACHABLE"), "{stdout}");
    // With network, the step's loopback is still its own, not the host's.
    assert!(stdout.contains("[online] UNREACHABLE"), "{stdout}");
    assert!(!stdout.contains("] REACHED"), "{stdout}");
}

#[test]
fn limits_and_timeouts_end_a_step_with_the_reason() {
    let registry = Registry::builder().start();
    for (spec, reason) in [
        (
            "steps:\n  - name: slow\n    timeout: 1s\n    run: sleep 30\n",
            "step `slow` timed out after 1 s",
        ),
        (
            "steps:\n  - name: hog\n    memory: 64MiB\n    run: python3 -c 'b = bytearray(512 << 20); print(len(b))'\n",
            "step `hog` ran out of memory (limit 64 MiB)",
        ),
        (
            "steps:\n  - name: forker\n    pids: 16\n    run: for i in $(seq 40); do sleep 5 & done; wait\n",
            "limit of 16 processes",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let (output, data) = build_spec(&registry, dir.path(), spec);
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(reason),
            "expected `{reason}`:\n{}",
            text(&output)
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        assert_eq!(stored_provenance(&data), 0);
    }
}

#[test]
fn spec_and_usage_errors_exit_2_naming_the_place() {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(
        dir.path().join("custody.yaml"),
        "steps:\n  - name: a\n    run: true\n    colour: blue\n",
    )
    .unwrap();
    let output = custody(&[
        "build",
        dir.path().to_str().unwrap(),
        "--data-dir",
        "/nonexistent/x",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("custody.yaml:4:5"), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");

    let empty = tempfile::tempdir().unwrap();
    let output = custody(&["build", empty.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no build spec at"),
        "{}",
        text(&output)
    );
}

/// A machine custody cannot set itself up on is not a failed build: exit 3,
/// naming what is at fault.
#[test]
fn a_data_directory_custody_cannot_use_exits_3_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(
        dir.path().join("custody.yaml"),
        "steps:\n  - name: a\n    run: 'true'\n",
    )
    .unwrap();
    let not_a_dir = dir.path().join("data");
    fs_err::write(&not_a_dir, "a file").unwrap();
    let output = custody(&[
        "build",
        dir.path().to_str().unwrap(),
        "--data-dir",
        not_a_dir.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("data directory `{}`", not_a_dir.display())),
        "{stderr}"
    );
    assert_eq!(fs_err::read_to_string(&not_a_dir).unwrap(), "a file");
}

/// Regression: the spec was read twice, once for the digest the provenance
/// records and once for the steps that run. Served through a FIFO whose
/// writer hands every reader a different spec, a second read would run
/// one spec and record another.
#[test]
fn the_spec_that_runs_is_the_spec_whose_digest_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    fs_err::create_dir(&source).unwrap();
    let fifo = dir.path().join("spec.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let specs = [
        "steps:\n  - name: which\n    run: echo spec-A\n",
        "steps:\n  - name: which\n    run: echo spec-B\n",
    ];
    {
        let fifo = fifo.clone();
        // Each reader gets one spec: after the first, wait until its reader
        // is gone (a non-blocking open fails with ENXIO when no one reads),
        // then serve the next to whoever opens it again. Once custody reads
        // only once, the second open blocks forever.
        std::thread::spawn(move || {
            use std::os::unix::fs::OpenOptionsExt as _;
            for (i, spec) in specs.iter().enumerate() {
                if i > 0 {
                    loop {
                        match std::fs::OpenOptions::new()
                            .write(true)
                            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                            .open(&fifo)
                        {
                            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENXIO as i32) => {
                                break;
                            }
                            _ => std::thread::sleep(std::time::Duration::from_millis(1)),
                        }
                    }
                }
                let mut writer = fs_err::OpenOptions::new().write(true).open(&fifo).unwrap();
                writer.write_all(spec.as_bytes()).unwrap();
            }
        });
    }
    let data = dir.path().join("data");
    let envelope = dir.path().join("provenance.json");
    let output = custody(&[
        "build",
        source.to_str().unwrap(),
        "-f",
        fifo.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--provenance-out",
        envelope.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let ran = specs
        .iter()
        .find(|spec| {
            stdout.contains(&format!(
                "[which] {}",
                &spec[spec.len() - 7..spec.len() - 1]
            ))
        })
        .expect("one of the specs ran");
    let recorded = &payload(&envelope)["predicate"]["buildDefinition"]["externalParameters"]["spec"]
        ["digest"]["sha256"];
    assert_eq!(
        format!("sha256:{}", recorded.as_str().unwrap()),
        custody_testkit::image::sha256(ran.as_bytes()),
        "the provenance records another spec than the one that ran:\n{stdout}"
    );
}

/// Regression: a source URL with credentials went into the signed
/// provenance and the store. It is refused before anything is recorded.
#[test]
fn a_source_url_with_credentials_is_refused_and_never_recorded() {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(
        dir.path().join("custody.yaml"),
        "source:\n  git: https://alice:tok3n-s3cret@127.0.0.1:9/app.git\nsteps:\n  - name: a\n    run: 'true'\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let output = custody(&[
        "build",
        dir.path().to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let all = text(&output);
    assert!(all.contains("custody.yaml:2:8"), "{all}");
    assert!(
        all.contains("`https://***@127.0.0.1:9/app.git` carries credentials"),
        "{all}"
    );
    assert!(all.contains("remove the user and password"), "{all}");
    assert!(!all.contains("tok3n-s3cret"), "{all}");
    assert!(!data.join("custody.db").exists(), "nothing was recorded");
}

/// Regression: a build of a working tree with uncommitted changes passed
/// `custody verify --source URL@COMMIT` as if it were that commit.
#[test]
fn a_dirty_tree_satisfies_no_source_policy_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs_err::create_dir(&src).unwrap();
    fs_err::write(
        src.join("custody.yaml"),
        "steps:\n  - name: a\n    run: cat notes.txt\nartifacts:\n  - paths: [notes.txt]\n    to: oci:out/files:v1\n",
    )
    .unwrap();
    fs_err::write(src.join("notes.txt"), "committed\n").unwrap();
    git(&src, &["init", "-q"]);
    git(&src, &["add", "custody.yaml", "notes.txt"]);
    git(&src, &["commit", "-qm", "one"]);
    let commit = git(&src, &["rev-parse", "HEAD"]);
    fs_err::write(src.join("notes.txt"), "not what was committed\n").unwrap();
    let data = dir.path().join("data");
    let output = custody(&[
        "build",
        src.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let url = format!("file://{}", src.canonicalize().unwrap().display());
    let verify = |extra: &[&str]| {
        let artifact = format!("oci:{}:v1", src.join("out/files").display());
        let key = data.join("keys/custody.pub");
        let mut args = vec!["verify", artifact.as_str(), "--key", key.to_str().unwrap()];
        args.extend_from_slice(extra);
        custody(&args)
    };
    let source = format!("{url}@{commit}");
    let refused = verify(&["--source", &source]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("built with uncommitted changes"),
        "{}",
        text(&refused)
    );
    let allowed = verify(&["--source", &source, "--allow-dirty"]);
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(
        String::from_utf8_lossy(&allowed.stdout)
            .contains("(dirty: built with uncommitted changes)"),
        "{}",
        text(&allowed)
    );
}

/// Regression: a repository committed the manifest bytes of an image custody
/// never built as a file and declared it an artifact; the provenance named
/// that digest as a file, and attached to the foreign image it verified.
#[test]
fn a_file_holding_a_foreign_manifest_vouches_for_no_image() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    // The foreign image, pushed by someone else.
    let image = custody_testkit::image::Image::random(11, &[300]);
    let layout = dir.path().join("foreign");
    custody_testkit::image::LayoutWriter::new(&layout)
        .image(&image)
        .tag("v1", &image.manifest);
    let foreign = format!("{}/foreign/app:v1", registry.host());
    let pushed = custody(&[
        "push",
        "--insecure-registry",
        registry.host(),
        &format!("oci:{}:v1", layout.display()),
        &foreign,
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    // The attacker's repository: the manifest's bytes as a file.
    let src = dir.path().join("src");
    fs_err::create_dir(&src).unwrap();
    fs_err::write(src.join("m.json"), &image.manifest.bytes).unwrap();
    fs_err::write(
        src.join("custody.yaml"),
        format!(
            "steps:\n  - name: a\n    run: 'true'\nartifacts:\n  - paths: [m.json]\n    to: {}/evil/files:v1\n",
            registry.host()
        ),
    )
    .unwrap();
    git(&src, &["init", "-q"]);
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "innocent"]);
    let commit = git(&src, &["rev-parse", "HEAD"]);
    let data = dir.path().join("data");
    let envelope = dir.path().join("provenance.json");
    let output = build_in(
        &registry,
        &src,
        &fs_err::read_to_string(src.join("custody.yaml")).unwrap(),
        &data,
        &[
            "--provenance-out",
            envelope.to_str().unwrap(),
            "--builder-id",
            "https://ci.example.org",
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    // The provenance says which subject is what.
    let statement = payload(&envelope);
    let file = statement["subject"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "m.json")
        .unwrap();
    assert_eq!(file["annotations"]["kind"], "file");
    assert_eq!(
        format!("sha256:{}", file["digest"]["sha256"].as_str().unwrap()),
        image.manifest.digest
    );
    // Attached to the foreign image...
    support::with_client(&registry, |client| async move {
        let subject: custody_oci::oci_spec::image::Descriptor =
            serde_json::from_value(image.manifest.descriptor()).unwrap();
        custody_provenance::attach::attach_to_registry(
            &client,
            "foreign/app",
            &subject,
            &fs_err::read(&envelope).unwrap(),
            custody_attest::statement::SLSA_PROVENANCE_V1,
        )
        .await
        .unwrap();
    });
    // ...it vouches for nothing.
    let key = data.join("keys/custody.pub");
    let source = format!("file://{}@{commit}", src.canonicalize().unwrap().display());
    let verified = custody(&[
        "verify",
        &foreign,
        "--insecure-registry",
        registry.host(),
        "--key",
        key.to_str().unwrap(),
        "--builder-id",
        "https://ci.example.org",
        "--source",
        &source,
    ]);
    assert_eq!(verified.status.code(), Some(1), "{}", text(&verified));
    assert!(
        text(&verified).contains("only a file with those bytes"),
        "{}",
        text(&verified)
    );
}

/// An image layout written into `src/NAME` for a step to copy to /output:
/// its digest is known before the build.
fn staged_image(src: &Path, name: &str, seed: u64, layer: usize) -> custody_testkit::image::Image {
    let image = custody_testkit::image::Image::random(seed, &[layer]);
    custody_testkit::image::LayoutWriter::new(&src.join(name))
        .image(&image)
        .tag("v1", &image.manifest);
    image
}

/// Pushes `image` to `registry` as `repository:v1`, as a previous build would have.
fn push_existing(registry: &Registry, dir: &Path, repository: &str) -> String {
    let image = custody_testkit::image::Image::random(99, &[100]);
    let layout = dir.join(format!("existing-{}", repository.replace('/', "-")));
    custody_testkit::image::LayoutWriter::new(&layout)
        .image(&image)
        .tag("v1", &image.manifest);
    let pushed = custody(&[
        "push",
        "--insecure-registry",
        registry.host(),
        &format!("oci:{}:v1", layout.display()),
        &format!("{}/{repository}:v1", registry.host()),
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    image.manifest.digest
}

/// The digest `repository:v1` names now.
fn tagged(registry: &Registry, repository: &str) -> String {
    let output = skopeo(
        registry,
        &["inspect", "--raw"],
        &format!("docker://{}/{repository}:v1", registry.host()),
    );
    assert!(output.status.success(), "{}", text(&output));
    custody_testkit::image::sha256(&output.stdout)
}

/// Regression: an image output was pushed and tagged, then the build failed
/// on an artifact whose glob matched nothing: the tag named an image
/// without provenance. Now every output is read before any is pushed.
#[test]
fn an_artifact_glob_matching_nothing_moves_no_tag() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let old = push_existing(&registry, dir.path(), "t/app");
    let src = dir.path().join("src");
    fs_err::create_dir(&src).unwrap();
    staged_image(&src, "app", 1, 1000);
    let spec = format!(
        "steps:\n  - name: copy\n    run: cp -r app /output/app\nimages:\n  - from: oci:/output/app:v1\n    to: {host}/t/app:v1\nartifacts:\n  - paths: [\"dist/*.tar.gz\"]\n    to: {host}/t/files:v1\n",
        host = registry.host()
    );
    let (output, data) = build_spec(&registry, &src, &spec);
    assert_failed_without_provenance(&output, &data, &registry, "`dist/*.tar.gz` matched no file");
    assert_eq!(tagged(&registry, "t/app"), old, "the tag moved");
}

/// Regression: outputs were tagged as they were pushed; a later push that
/// failed left the earlier tags moved. Now tags move only after every
/// output is pushed, checked, signed for and attached to.
#[test]
fn a_push_that_fails_midway_moves_no_earlier_tag() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let old = push_existing(&registry, dir.path(), "t/first");
    // The second destination is the same registry through a proxy that
    // dies once the big second image is under way.
    let proxy = custody_testkit::FaultProxy::start(registry.addr());
    let src = dir.path().join("src");
    fs_err::create_dir(&src).unwrap();
    staged_image(&src, "first", 2, 1000);
    staged_image(&src, "second", 3, 4 << 20);
    let spec = format!(
        "steps:\n  - name: copy\n    run: cp -r first second /output/\nimages:\n  - from: oci:/output/first:v1\n    to: {host}/t/first:v1\n  - from: oci:/output/second:v1\n    to: {proxy}/t/second:v1\n",
        host = registry.host(),
        proxy = proxy.host()
    );
    proxy.die_after(1 << 20);
    let data = src.join("data");
    let output = build_in(
        &registry,
        &src,
        &spec,
        &data,
        &["--insecure-registry", &proxy.host()],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains(&format!("to `{}/t/second:v1`", proxy.host())),
        "{}",
        text(&output)
    );
    assert_eq!(stored_provenance(&data), 0);
    assert_eq!(
        tagged(&registry, "t/first"),
        old,
        "the first image's tag moved"
    );
}

/// A failure while attaching the provenance (the registry refuses the
/// cosign tag custody extends) leaves every tag where it was.
#[test]
fn a_failure_while_attaching_moves_no_tag() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let old = push_existing(&registry, dir.path(), "t/app");
    let src = dir.path().join("src");
    fs_err::create_dir(&src).unwrap();
    let image = staged_image(&src, "app", 4, 1000);
    // A cosign `.att` manifest for the new image that names a blob the
    // registry no longer has: extending it is refused.
    let host = registry.host();
    support::with_client(&registry, |client| async move {
        use custody_oci::oci_spec::image::Descriptor;
        let mut descriptors = Vec::new();
        for bytes in [b"{}".to_vec(), b"a layer that will be deleted".to_vec()] {
            let blob = custody_testkit::image::Blob::new("application/octet-stream", bytes);
            support::upload_blob(&client, "t/app", &blob).await;
            descriptors.push(blob);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptors[0].descriptor(),
            "layers": [descriptors[1].descriptor()],
        });
        let bytes = bytes::Bytes::from(serde_json::to_vec(&manifest).unwrap());
        let descriptor = Descriptor::new(
            custody_oci::oci_spec::image::MediaType::ImageManifest,
            bytes.len() as u64,
            custody_oci::digest::sha256(&bytes),
        );
        let tag = format!("{}.att", image.manifest.digest.replace(':', "-"));
        client
            .put_manifest("t/app", &tag, &descriptor, &bytes)
            .await
            .unwrap();
        let deleted = reqwest::Client::new()
            .delete(format!(
                "http://{host}/v2/t/app/blobs/{}",
                descriptors[1].digest
            ))
            .send()
            .await
            .unwrap();
        assert!(deleted.status().is_success(), "{deleted:?}");
    });
    let spec = format!(
        "steps:\n  - name: copy\n    run: cp -r app /output/app\nimages:\n  - from: oci:/output/app:v1\n    to: {}/t/app:v1\n",
        registry.host()
    );
    let data = src.join("data");
    let output = build_in(&registry, &src, &spec, &data, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("attaching the provenance to"),
        "{}",
        text(&output)
    );
    assert_eq!(tagged(&registry, "t/app"), old, "the tag moved");
}

/// Regression: a destination that could never take the push (plain HTTP
/// spoken to as TLS, a host nothing listens on, credentials refused) was
/// found broken only after every step ran. Now before the first.
#[test]
fn a_destination_that_cannot_take_a_push_fails_before_any_step_runs() {
    let plain = Registry::builder().start();
    let guarded = Registry::builder().basic_auth("dave", "right-pw").start();
    let nowhere = format!("127.0.0.1:{}", custody_testkit::free_port());
    for (destination, extra, said) in [
        (
            format!("{}/t/app:v1", plain.host()),
            vec![],
            "--insecure-registry",
        ),
        (
            format!("{nowhere}/t/app:v1"),
            vec!["--insecure-registry".to_owned(), nowhere.clone()],
            "check that",
        ),
        (
            format!("{}/t/app:v1", guarded.host()),
            vec![
                "--insecure-registry".to_owned(),
                guarded.host().to_owned(),
                "--creds".to_owned(),
                format!("{}=dave:wrong-pw", guarded.host()),
            ],
            "refused access",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("f.txt"), "f\n").unwrap();
        fs_err::write(
            dir.path().join("custody.yaml"),
            format!(
                "steps:\n  - name: slow\n    run: echo STEP-RAN && sleep 20\nartifacts:\n  - paths: [f.txt]\n    to: {destination}\n"
            ),
        )
        .unwrap();
        let data = dir.path().join("data");
        let mut args = vec![
            "build".to_owned(),
            dir.path().display().to_string(),
            "--data-dir".to_owned(),
            data.display().to_string(),
        ];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = std::time::Instant::now();
        let output = custody(&args);
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        assert!(started.elapsed() < std::time::Duration::from_secs(15));
        let all = text(&output);
        assert!(!all.contains("STEP-RAN"), "a step ran:\n{all}");
        assert!(all.contains("custody.yaml:6:9: destination"), "{all}");
        assert!(all.contains(said), "expected `{said}`:\n{all}");
        assert!(!all.contains("wrong-pw"), "{all}");
    }
}

/// A toolchain image as builders make them: its tools on its own `PATH`,
/// set in the image config's `Env` (here by umoci, a tool custody did not
/// write).
#[test]
fn a_step_image_brings_its_own_environment() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let (layout, _) = custody_testkit::image::busybox_layout(dir.path());
    let tool = dir.path().join("mytool");
    fs_err::write(&tool, "#!/bin/sh\necho \"tool ran with FOO=$FOO\"\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let image = format!("{}:v1", layout.display());
    let umoci = |args: &[&str]| {
        let output = std::process::Command::new("umoci")
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "umoci {args:?}: {}", text(&output));
    };
    // A layer GNU tar wrote (umoci 0.4.7's own `insert` leaves its tar
    // streams without their end, which GNU tar refuses too).
    let root = dir.path().join("root");
    fs_err::create_dir_all(root.join("opt/tool/bin")).unwrap();
    fs_err::rename(&tool, root.join("opt/tool/bin/mytool")).unwrap();
    let layer = dir.path().join("layer.tar");
    let tar = std::process::Command::new("tar")
        .args([
            "-C",
            root.to_str().unwrap(),
            "-cf",
            layer.to_str().unwrap(),
            "opt",
        ])
        .output()
        .unwrap();
    assert!(tar.status.success(), "{}", text(&tar));
    umoci(&[
        "raw",
        "add-layer",
        "--image",
        &image,
        layer.to_str().unwrap(),
    ]);
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/opt/tool/bin:/bin",
        "--config.env",
        "FOO=from-the-image",
        "--config.env",
        "KEEP=image",
    ]);
    let tagged = format!("{}/tools/toolchain:v1", registry.host());
    let pushed = custody(&[
        "push",
        "--insecure-registry",
        registry.host(),
        &format!("oci:{image}"),
        &tagged,
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed));

    let spec = format!(
        "steps:\n  - name: tool\n    image: {tagged}\n    run: mytool; echo \"KEEP=$KEEP\"\n    env: {{ KEEP: spec }}\n"
    );
    let output = build_in(&registry, dir.path(), &spec, &dir.path().join("data"), &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        stdout.contains("[tool] tool ran with FOO=from-the-image"),
        "{}",
        text(&output)
    );
    assert!(
        stdout.contains("[tool] KEEP=spec"),
        "the spec's env wins: {}",
        text(&output)
    );
}
