//! What the tests of the binary share: running it, reading what it printed
//! and the provenance it wrote; [`daemon`] runs `custody serve`.

#![allow(dead_code)]

pub mod daemon;

use std::path::Path;
use std::process::{Command, Output};

pub const CUSTODY: &str = env!("CARGO_BIN_EXE_custody");

/// Runs `custody ARGS` with a canary secret in its environment.
pub fn custody(args: &[&str]) -> Output {
    Command::new(CUSTODY)
        .args(args)
        .env("CANARY_SECRET", "canary-f00d-d00d")
        .output()
        .expect("custody runs")
}

/// Exit code, stdout and stderr, for assertion messages.
pub fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The in-toto statement inside a DSSE envelope file.
pub fn payload(envelope_file: &Path) -> serde_json::Value {
    use base64::Engine as _;
    let envelope: serde_json::Value =
        serde_json::from_slice(&fs_err::read(envelope_file).unwrap()).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The build id `custody build` announced (`==> build ID`).
pub fn build_id(output: &Output) -> custody_daemon::record::BuildId {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("==> build "))
        .and_then(|id| custody_daemon::record::BuildId::parse(id.trim()))
        .expect("custody build names its build")
}

/// testkit's busybox image pushed to `registry` as `tools/busybox:v1`;
/// returns the image and the tagged reference.
pub fn push_busybox(
    registry: &custody_testkit::Registry,
    dir: &Path,
) -> (custody_testkit::image::Image, String) {
    let (layout, image) = custody_testkit::image::busybox_layout(dir);
    let tagged = format!("{}/tools/busybox:v1", registry.host());
    let pushed = custody(&[
        "push",
        "--insecure-registry",
        registry.host(),
        &format!("oci:{}:v1", layout.display()),
        &tagged,
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    (image, tagged)
}

/// Runs `work` with a library registry client for `registry` (plain HTTP).
pub fn with_client<T, F>(
    registry: &custody_testkit::Registry,
    work: impl FnOnce(custody_oci::registry::Client) -> F,
) -> T
where
    F: std::future::Future<Output = T>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let options = custody_oci::registry::RegistryOptions {
            insecure_hosts: vec![registry.host().to_owned()],
            ..Default::default()
        };
        let client = custody_oci::registry::Client::new(registry.host(), &options)
            .await
            .unwrap();
        work(client).await
    })
}

/// Uploads `blob` to `repository` with `client`, checked against its digest
/// as it streams (as custody's own pushes are).
pub async fn upload_blob(
    client: &custody_oci::registry::Client,
    repository: &str,
    blob: &custody_testkit::image::Blob,
) {
    let descriptor: custody_oci::oci_spec::image::Descriptor =
        serde_json::from_value(blob.descriptor()).unwrap();
    let body = bytes::Bytes::from(blob.bytes.clone());
    client
        .upload_blob(repository, &descriptor, None, || {
            let body = body.clone();
            custody_oci::stream::verified(
                futures_util::stream::once(async move { Ok(body) }),
                descriptor.clone(),
            )
        })
        .await
        .unwrap();
}
