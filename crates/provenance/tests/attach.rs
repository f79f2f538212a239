//! Attestations attached next to an image, found again from any layout,
//! on a real registry (distribution 2.8: no referrers API, so the tag
//! schema fallback) and in an OCI layout.

use std::collections::BTreeMap;
use std::process::Command;

use custody_attest::dsse::Envelope;
use custody_attest::keys::{Algorithm, SigningKey};
use custody_attest::statement::{
    BuildDefinition, Builder, Provenance, ResourceDescriptor, RunDetails, SLSA_PROVENANCE_V1,
    Statement, VerifiedStatement,
};
use custody_oci::copy::{self, CopyOptions, Destination, Source};
use custody_oci::layout::Layout;
use custody_oci::registry::{Client, RegistryOptions};
use custody_provenance::attach::{self, DSSE_MEDIA_TYPE};
use custody_testkit::Registry;
use custody_testkit::image::{Image, LayoutWriter};

fn envelope_for(subject_hex: &str, key: &SigningKey) -> Vec<u8> {
    let subject = ResourceDescriptor {
        name: Some("app".into()),
        digest: BTreeMap::from([("sha256".into(), subject_hex.into())]),
        ..Default::default()
    };
    let provenance = Provenance {
        build_definition: BuildDefinition {
            build_type: "https://custody.dev/build/v1".into(),
            external_parameters: serde_json::json!({}),
            internal_parameters: None,
            resolved_dependencies: Vec::new(),
        },
        run_details: RunDetails {
            builder: Builder {
                id: "https://custody.dev/builder/test".into(),
                builder_dependencies: Vec::new(),
                version: BTreeMap::new(),
            },
            metadata: None,
            byproducts: Vec::new(),
        },
    };
    serde_json::to_vec(
        &Statement::provenance(vec![subject], &provenance)
            .sign(key)
            .unwrap(),
    )
    .unwrap()
}

fn verify_all(envelopes: &[bytes::Bytes], key: &SigningKey, subject_hex: &str) {
    for bytes in envelopes {
        let envelope: Envelope = serde_json::from_slice(bytes).unwrap();
        let verified = VerifiedStatement::verify(&envelope, key.verifying_key()).unwrap();
        assert!(verified.names_sha256(subject_hex));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn attestations_are_found_as_referrers_and_as_cosign_tags() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(1, &[1_000]);
    let root = dir.path().join("layout");
    LayoutWriter::new(&root)
        .image(&image)
        .tag("v1", &image.manifest);
    let options = RegistryOptions {
        insecure_hosts: vec![registry.host().to_owned()],
        ..RegistryOptions::default()
    };
    let reference = format!("{}/team/app:v1", registry.host());
    let source = Source::open(
        &format!("oci:{}:v1", root.display()).parse().unwrap(),
        &options,
    )
    .await
    .unwrap();
    let destination = Destination::open(&reference.parse().unwrap(), &options)
        .await
        .unwrap();
    let report = copy::copy(&source, &destination, &CopyOptions::default())
        .await
        .unwrap();
    let subject = report.descriptor;
    let hex = subject.digest().digest().to_owned();

    let (key, _) = SigningKey::generate(Algorithm::EcdsaP256).unwrap();
    let envelope = envelope_for(&hex, &key);
    let client = Client::new(registry.host(), &options).await.unwrap();
    attach::attach_to_registry(&client, "team/app", &subject, &envelope, SLSA_PROVENANCE_V1)
        .await
        .unwrap();
    // Attaching again changes nothing.
    attach::attach_to_registry(&client, "team/app", &subject, &envelope, SLSA_PROVENANCE_V1)
        .await
        .unwrap();

    let found = attach::find_in_registry(&client, "team/app", subject.digest())
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "one envelope, found through both layouts");
    assert_eq!(found[0].as_ref(), envelope.as_slice());
    verify_all(&found, &key, &hex);

    // Standard tools see both: the cosign tag and the referrers fallback tag.
    for (tag, key_path) in [
        (format!("sha256-{hex}.att"), "layers"),
        (format!("sha256-{hex}"), "manifests"),
    ] {
        let output = Command::new("skopeo")
            .args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{}/team/app:{tag}", registry.host()),
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "skopeo cannot read `{tag}`: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let manifest: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let entries = manifest[key_path].as_array().unwrap();
        assert_eq!(entries.len(), 1, "{tag}: {manifest}");
    }
    let referrers = client
        .referrers("team/app", subject.digest(), Some(DSSE_MEDIA_TYPE))
        .await
        .unwrap();
    assert_eq!(referrers.len(), 1);

    // Another image has none.
    let other = custody_oci::digest::sha256(b"another image");
    assert!(
        attach::find_in_registry(&client, "team/app", &other)
            .await
            .unwrap()
            .is_empty()
    );
}

#[test]
fn attestations_live_in_layouts_too() {
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(2, &[1_000]);
    LayoutWriter::new(dir.path())
        .image(&image)
        .tag("v1", &image.manifest);
    let layout = Layout::open(dir.path()).unwrap();
    let subject = layout.resolve(Some("v1")).unwrap();
    let hex = subject.digest().digest().to_owned();
    let (key, _) = SigningKey::generate(Algorithm::Ed25519).unwrap();
    let envelope = envelope_for(&hex, &key);
    attach::attach_to_layout(&layout, &subject, &envelope, SLSA_PROVENANCE_V1).unwrap();
    attach::attach_to_layout(&layout, &subject, &envelope, SLSA_PROVENANCE_V1).unwrap();
    let found = attach::find_in_layout(&layout, subject.digest()).unwrap();
    assert_eq!(found.len(), 1);
    verify_all(&found, &key, &hex);
    // The image is still what `v1` names.
    assert_eq!(
        layout.resolve(Some("v1")).unwrap().digest(),
        subject.digest()
    );
    // skopeo still reads the layout.
    let output = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            &format!("oci:{}:v1", dir.path().display()),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
