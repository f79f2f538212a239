//! Our envelopes, checked by tools we did not write: Python's
//! securesystemslib verifies the DSSE signature with the public key.

use std::collections::BTreeMap;
use std::process::Command;

use custody_attest::keys::{Algorithm, generate_files};
use custody_attest::statement::{
    BuildDefinition, BuildMetadata, Builder, Provenance, ResourceDescriptor, RunDetails, Statement,
    VerifiedStatement,
};

const CHECK: &str = r#"
import json, sys
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

envelope = Envelope.from_dict(json.load(open(sys.argv[1])))
keyid = next(iter(envelope.signatures))
key = SSlibKey.from_crypto(load_pem_public_key(open(sys.argv[2], "rb").read()), keyid=keyid)
envelope.verify([key], 1)
statement = json.loads(envelope.payload)
print(statement["predicateType"], statement["subject"][0]["digest"]["sha256"])
"#;

fn statement() -> Statement {
    let subject = ResourceDescriptor {
        name: Some("127.0.0.1:5000/team/app".into()),
        digest: BTreeMap::from([("sha256".into(), "ab".repeat(32))]),
        ..Default::default()
    };
    let provenance = Provenance {
        build_definition: BuildDefinition {
            build_type: "https://custody.dev/build/v1".into(),
            external_parameters: serde_json::json!({"source": "https://example.org/app.git"}),
            internal_parameters: None,
            resolved_dependencies: Vec::new(),
        },
        run_details: RunDetails {
            builder: Builder {
                id: "https://custody.dev/builder/test".into(),
                builder_dependencies: Vec::new(),
                version: BTreeMap::new(),
            },
            metadata: Some(BuildMetadata {
                invocation_id: "job-1".into(),
                started_on: None,
                finished_on: None,
            }),
            byproducts: Vec::new(),
        },
    };
    Statement::provenance(vec![subject], &provenance)
}

#[test]
fn securesystemslib_verifies_our_envelopes() {
    for algorithm in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
        let dir = tempfile::tempdir().unwrap();
        let (_, public, key) = generate_files(dir.path(), algorithm).unwrap();
        let envelope = statement().sign(&key).unwrap();
        let path = dir.path().join("envelope.json");
        fs_err::write(&path, serde_json::to_vec(&envelope).unwrap()).unwrap();

        let output = Command::new("python3")
            .arg("-c")
            .arg(CHECK)
            .arg(&path)
            .arg(&public)
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "securesystemslib refused our {algorithm:?} envelope (run scripts/setup):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("https://slsa.dev/provenance/v1 {}", "ab".repeat(32))
        );

        // And it refuses a tampered one, as we do.
        let mut tampered = envelope.clone();
        let mut statement = statement();
        statement.subject[0]
            .digest
            .insert("sha256".into(), "cd".repeat(32));
        tampered.payload = serde_json::to_value(statement.sign(&key).unwrap()).unwrap()["payload"]
            .as_str()
            .unwrap()
            .to_owned();
        fs_err::write(&path, serde_json::to_vec(&tampered).unwrap()).unwrap();
        let output = Command::new("python3")
            .arg("-c")
            .arg(CHECK)
            .arg(&path)
            .arg(&public)
            .output()
            .unwrap();
        assert!(
            !output.status.success(),
            "securesystemslib accepted a tampered envelope"
        );
        assert!(VerifiedStatement::verify(&tampered, key.verifying_key()).is_err());

        let verified = VerifiedStatement::verify(&envelope, key.verifying_key()).unwrap();
        assert!(verified.names_sha256(&"ab".repeat(32)));
        assert_eq!(
            verified.provenance().unwrap().run_details.builder.id,
            "https://custody.dev/builder/test"
        );
    }
}
