//! `custody verify` against real registries: what passes, and each way a
//! provenance can fail, with the reason a user sees.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use custody_attest::keys::{Algorithm, SigningKey, generate_files};
use custody_attest::statement::{
    BuildDefinition, BuildMetadata, Builder, Provenance, ResourceDescriptor, RunDetails,
    SLSA_PROVENANCE_V1, Statement,
};
use custody_oci::registry::{Client, RegistryOptions};
use custody_provenance::attach;
use custody_provenance::build_type::{BUILD_TYPE, SubjectKind};
use custody_testkit::Registry;
use custody_testkit::image::{Image, LayoutWriter};

const BUILDER: &str = "https://custody.example/builders/test";
const REPO: &str = "https://example.org/app.git";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const STEP_IMAGE: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn provenance() -> Provenance {
    let dependency = |name: &str, uri: &str, algorithm: &str, value: &str| ResourceDescriptor {
        name: Some(name.into()),
        uri: Some(uri.into()),
        digest: BTreeMap::from([(algorithm.into(), value.into())]),
        ..Default::default()
    };
    Provenance {
        build_definition: BuildDefinition {
            build_type: BUILD_TYPE.into(),
            external_parameters: serde_json::json!({"source": {"git": REPO, "revision": "main"}}),
            internal_parameters: None,
            resolved_dependencies: vec![
                dependency("source", &format!("git+{REPO}"), "gitCommit", COMMIT),
                dependency(
                    "step-image:build",
                    "127.0.0.1:5000/tools/builder",
                    "sha256",
                    STEP_IMAGE.trim_start_matches("sha256:"),
                ),
            ],
        },
        run_details: RunDetails {
            builder: Builder {
                id: BUILDER.into(),
                builder_dependencies: Vec::new(),
                version: BTreeMap::new(),
            },
            metadata: Some(BuildMetadata {
                invocation_id: "job-42".into(),
                started_on: None,
                finished_on: None,
            }),
            byproducts: Vec::new(),
        },
    }
}

/// A signed statement with one subject: `name` (`REGISTRY/REPO` or
/// `oci:PATH`, as custody names what it pushed) of `kind`.
fn envelope_of(name: &str, kind: SubjectKind, subject_hex: &str, key: &SigningKey) -> Vec<u8> {
    let subject = ResourceDescriptor {
        name: Some(name.into()),
        digest: BTreeMap::from([("sha256".into(), subject_hex.into())]),
        annotations: Some(kind.annotations()),
        ..Default::default()
    };
    serde_json::to_vec(
        &Statement::provenance(vec![subject], &provenance())
            .sign(key)
            .unwrap(),
    )
    .unwrap()
}

/// An image subject named for `repo` of `s`'s registry.
fn envelope(s: &Setup, repo: &str, subject_hex: &str) -> Vec<u8> {
    envelope_of(
        &format!("{}/{repo}", s.registry.host()),
        SubjectKind::Image,
        subject_hex,
        &s.key,
    )
}

struct Setup {
    registry: Registry,
    dir: tempfile::TempDir,
    public: std::path::PathBuf,
    key: SigningKey,
}

/// Pushes a fresh image to `repo:v1` and returns its manifest descriptor.
fn push_image(s: &Setup, seed: u64, repo: &str) -> custody_oci::oci_spec::image::Descriptor {
    let image = Image::random(seed, &[500]);
    let root = s.dir.path().join(format!("layout-{seed}"));
    LayoutWriter::new(&root)
        .image(&image)
        .tag("v1", &image.manifest);
    let output = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args([
            "push",
            "--insecure-registry",
            s.registry.host(),
            &format!("oci:{}:v1", root.display()),
            &format!("{}/{repo}:v1", s.registry.host()),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_value(image.manifest.descriptor()).unwrap()
}

fn attach(
    s: &Setup,
    repo: &str,
    subject: &custody_oci::oci_spec::image::Descriptor,
    envelope: &[u8],
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let options = RegistryOptions {
            insecure_hosts: vec![s.registry.host().to_owned()],
            ..RegistryOptions::default()
        };
        let client = Client::new(s.registry.host(), &options).await.unwrap();
        attach::attach_to_registry(&client, repo, subject, envelope, SLSA_PROVENANCE_V1)
            .await
            .unwrap();
    });
}

fn setup() -> Setup {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let (_, public, key) = generate_files(&dir.path().join("keys"), Algorithm::EcdsaP256).unwrap();
    Setup {
        registry,
        dir,
        public,
        key,
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn verify(s: &Setup, key: &Path, image: &str, extra: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args([
            "verify",
            "--insecure-registry",
            s.registry.host(),
            "--key",
            key.to_str().unwrap(),
        ])
        .args(extra)
        .arg(image)
        .env("HOME", s.dir.path())
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into(),
        stderr: String::from_utf8_lossy(&output.stderr).into(),
    }
}

#[track_caller]
fn refused(run: Run, needle: &str) {
    assert_eq!(
        run.code, 1,
        "expected refusal; stdout {}\nstderr {}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr.contains(needle),
        "stderr lacks {needle:?}:\n{}",
        run.stderr
    );
}

#[test]
fn a_signed_provenance_verifies_and_every_kind_of_mismatch_is_refused() {
    let s = setup();
    let subject = push_image(&s, 1, "team/app");
    let hex = subject.digest().digest().to_owned();
    attach(&s, "team/app", &subject, &envelope(&s, "team/app", &hex));
    let image = format!("{}/team/app:v1", s.registry.host());

    let run = verify(
        &s,
        &s.public,
        &image,
        &[
            "--builder-id",
            BUILDER,
            "--source",
            &format!("{REPO}@{COMMIT}"),
            "--allow-step-image",
            STEP_IMAGE,
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.starts_with(&format!(
            "verified {}/team/app@sha256:{hex}",
            s.registry.host()
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(BUILDER)
            && run.stdout.contains(COMMIT)
            && run.stdout.contains("job-42"),
        "{}",
        run.stdout
    );

    let run = verify(&s, &s.public, &image, &["--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["statement"]["predicateType"], SLSA_PROVENANCE_V1);

    refused(
        verify(
            &s,
            &s.public,
            &image,
            &["--builder-id", "https://other/builder"],
        ),
        "policy: the builder is",
    );
    refused(
        verify(
            &s,
            &s.public,
            &image,
            &["--source", "https://example.org/other.git"],
        ),
        "policy: the source is",
    );
    refused(
        verify(
            &s,
            &s.public,
            &image,
            &["--source", &format!("{REPO}@{}", "f".repeat(40))],
        ),
        "policy: the source commit is",
    );
    refused(
        verify(
            &s,
            &s.public,
            &image,
            &["--allow-step-image", &format!("sha256:{}", "b".repeat(64))],
        ),
        "is not in the allowed list",
    );

    // Signed by another key.
    let (_, other_public, _) =
        generate_files(&s.dir.path().join("other"), Algorithm::Ed25519).unwrap();
    refused(verify(&s, &other_public, &image, &[]), "signature:");
}

#[test]
fn tampered_misdirected_and_missing_attestations_are_refused() {
    let s = setup();
    let image_of = |repo: &str| format!("{}/{repo}:v1", s.registry.host());

    // A payload changed after signing.
    let subject = push_image(&s, 2, "team/tampered");
    let hex = subject.digest().digest().to_owned();
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&envelope(&s, "team/tampered", &hex)).unwrap();
    let mut statement: serde_json::Value =
        serde_json::from_slice(&base64_decode(envelope["payload"].as_str().unwrap())).unwrap();
    statement["predicate"]["runDetails"]["builder"]["id"] = "https://evil/builder".into();
    envelope["payload"] = base64_encode(&serde_json::to_vec(&statement).unwrap()).into();
    attach(
        &s,
        "team/tampered",
        &subject,
        &serde_json::to_vec(&envelope).unwrap(),
    );
    refused(
        verify(&s, &s.public, &image_of("team/tampered"), &[]),
        "signature:",
    );

    // A valid statement about another artifact, attached to this one.
    let subject = push_image(&s, 3, "team/misdirected");
    attach(
        &s,
        "team/misdirected",
        &subject,
        &self::envelope(&s, "team/misdirected", &"c".repeat(64)),
    );
    refused(
        verify(&s, &s.public, &image_of("team/misdirected"), &[]),
        "subject:",
    );

    // This very digest, but pushed to another repository.
    let subject = push_image(&s, 6, "team/elsewhere");
    let hex = subject.digest().digest().to_owned();
    attach(
        &s,
        "team/elsewhere",
        &subject,
        &self::envelope(&s, "team/original", &hex),
    );
    refused(
        verify(&s, &s.public, &image_of("team/elsewhere"), &[]),
        "names no image or artifact",
    );

    // This very digest as a file subject: a file's bytes vouch for no image.
    let subject = push_image(&s, 7, "team/file");
    let hex = subject.digest().digest().to_owned();
    let name = format!("{}/team/file", s.registry.host());
    attach(
        &s,
        "team/file",
        &subject,
        &envelope_of(&name, SubjectKind::File, &hex, &s.key),
    );
    refused(
        verify(&s, &s.public, &image_of("team/file"), &[]),
        "only a file with those bytes",
    );

    // No attestation at all.
    push_image(&s, 4, "team/bare");
    refused(
        verify(&s, &s.public, &image_of("team/bare"), &[]),
        "has no attestation",
    );

    // Usage errors are exit 2.
    let run = verify(
        &s,
        &s.dir.path().join("missing.pem"),
        &image_of("team/bare"),
        &[],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[test]
fn attestations_in_an_oci_layout_verify() {
    let s = setup();
    let image = Image::random(5, &[500]);
    let root = s.dir.path().join("layout");
    LayoutWriter::new(&root)
        .image(&image)
        .tag("v1", &image.manifest);
    let layout = custody_oci::layout::Layout::open(&root).unwrap();
    let subject = layout.resolve(Some("v1")).unwrap();
    attach::attach_to_layout(
        &layout,
        &subject,
        &envelope_of(
            &format!("oci:{}", root.canonicalize().unwrap().display()),
            SubjectKind::Image,
            subject.digest().digest(),
            &s.key,
        ),
        SLSA_PROVENANCE_V1,
    )
    .unwrap();
    let run = verify(
        &s,
        &s.public,
        &format!("oci:{}:v1", root.display()),
        &["--builder-id", BUILDER],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn a_plain_http_registry_asked_for_tls_gets_the_insecure_registry_hint() {
    let s = setup();
    let image = format!("{}/app:v1", s.registry.host());
    let output = Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(["verify", "--key", s.public.to_str().unwrap(), &image])
        .env("HOME", s.dir.path())
        .output()
        .unwrap();
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into(),
        stderr: String::from_utf8_lossy(&output.stderr).into(),
    };
    let hint = format!(
        "hint: `{host}` seems to serve plain HTTP; if you trust it, pass `--insecure-registry {host}`",
        host = s.registry.host()
    );
    refused(run, &hint);
}
