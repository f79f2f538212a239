//! Provenance signed by a key inside a PKCS#11 token (a real SoftHSM token
//! per test), and key rotation: `custody keys generate/export --pkcs11`,
//! `custody build`/`serve --signing-key pkcs11:…`, `GET /api/v1/keys` with
//! retired keys, `custody verify --key … --key …` and `--keys FILE`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use custody_testkit::softhsm::MODULE;
use custody_testkit::{SoftHsm, free_port, git};

mod support;
use support::daemon::{Daemon, DaemonOptions};
use support::{CUSTODY, text};

/// A PIN no output may show.
const PIN: &str = "pin-7f3a91c2";

/// `custody ARGS` with SoftHSM pointed at `hsm`'s token.
fn custody(hsm: &SoftHsm, args: &[&str]) -> Output {
    let (name, value) = hsm.env();
    Command::new(CUSTODY)
        .args(args)
        .env(name, value)
        .output()
        .expect("custody runs")
}

/// Makes key `object` in the token and writes its public key; returns the
/// URI, the public key file and the key id.
fn make_key(hsm: &SoftHsm, object: &str, algorithm: &str) -> (String, PathBuf, String) {
    let uri = hsm.uri(object);
    let made = custody(
        hsm,
        &[
            "keys",
            "generate",
            "--pkcs11",
            &uri,
            "--algorithm",
            algorithm,
        ],
    );
    assert!(made.status.success(), "{}", text(&made));
    let key_id = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    assert!(key_id.starts_with("sha256:"), "{}", text(&made));
    let public = hsm.dir().join(format!("{object}.pub"));
    let exported = custody(
        hsm,
        &[
            "keys",
            "export",
            "--pkcs11",
            &uri,
            "--out",
            public.to_str().unwrap(),
        ],
    );
    assert!(exported.status.success(), "{}", text(&exported));
    assert_eq!(String::from_utf8_lossy(&exported.stdout).trim(), key_id);
    (uri, public, key_id)
}

/// A committed repository whose spec publishes `notes.txt` as an artifact
/// at `oci:out/files:v1`; returns it and that artifact's location.
fn repository(dir: &Path, name: &str) -> (PathBuf, String) {
    let src = dir.join(name);
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(
        src.join("custody.yaml"),
        "steps:\n  - name: a\n    run: cat notes.txt\nartifacts:\n  - paths: [notes.txt]\n    to: oci:out/files:v1\n",
    )
    .unwrap();
    fs_err::write(src.join("notes.txt"), format!("{name}\n")).unwrap();
    git(&src, &["init", "-q"]);
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "notes"]);
    let artifact = format!("oci:{}:v1", src.join("out/files").display());
    (src, artifact)
}

/// `custody build SRC --signing-key KEY`, the envelope written beside.
fn build(hsm: &SoftHsm, src: &Path, key: &str) -> (Output, PathBuf) {
    let envelope = src.with_extension("dsse.json");
    let data = src.with_extension("data");
    let output = custody(
        hsm,
        &[
            "build",
            src.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--signing-key",
            key,
            "--provenance-out",
            envelope.to_str().unwrap(),
        ],
    );
    (output, envelope)
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
print(keyid)
"#;

#[test]
fn a_key_made_in_softhsm_signs_a_build_that_independent_tools_verify() {
    let hsm = SoftHsm::token("custody", PIN);
    let dir = tempfile::tempdir().unwrap();
    for algorithm in ["ecdsa-p256", "ed25519"] {
        let (uri, public, key_id) = make_key(&hsm, algorithm, algorithm);
        let (src, artifact) = repository(dir.path(), algorithm);
        let (output, envelope) = build(&hsm, &src, &uri);
        assert!(output.status.success(), "{}", text(&output));
        assert!(!text(&output).contains(PIN), "{}", text(&output));

        // The envelope names the token's key, and securesystemslib checks
        // it with nothing but the exported public key.
        let checked = Command::new("python3")
            .args(["-c", SECURESYSTEMSLIB])
            .arg(&envelope)
            .arg(&public)
            .output()
            .expect("python3 runs");
        assert!(
            checked.status.success(),
            "securesystemslib refused the {algorithm} envelope (run scripts/setup): {}",
            text(&checked)
        );
        assert_eq!(String::from_utf8_lossy(&checked.stdout).trim(), key_id);

        let verified = Command::new(CUSTODY)
            .args(["verify", &artifact, "--key", public.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(verified.status.success(), "{}", text(&verified));
    }
    // A PIN in the URI works, but custody says where it shows, never what it is.
    let (src, _) = repository(dir.path(), "pin-value");
    let uri = format!(
        "pkcs11:token={};object=ecdsa-p256?module-path={MODULE}&pin-value={PIN}",
        hsm.label
    );
    let (output, _) = build(&hsm, &src, &uri);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("warning: the token's PIN is in custody's arguments"),
        "{}",
        text(&output)
    );
    assert!(!text(&output).contains(PIN), "{}", text(&output));
    // A second key under a label the token already has is refused.
    let again = custody(
        &hsm,
        &["keys", "generate", "--pkcs11", &hsm.uri("ecdsa-p256")],
    );
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(
        text(&again).contains("already has a key `ecdsa-p256`"),
        "{}",
        text(&again)
    );
}

/// A careless operator keeps the token where any user may read it
/// (`/var/tmp`, world-readable). A step that goes looking for the token's
/// files (the key, wrapped by the PIN: worth trying PINs on offline) finds
/// the directory empty, and the PIN file too.
#[test]
fn a_step_cannot_read_the_token_that_holds_the_signing_key() {
    let hsm = SoftHsm::token_in(Path::new("/var/tmp"), "custody", PIN);
    let (uri, _, _) = make_key(&hsm, "provenance", "ecdsa-p256");
    let pin = hsm.pin_file();
    let opened = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(hsm.dir())
        .status()
        .unwrap();
    assert!(opened.success());
    let tokens = hsm.tokens();
    let token_files = walk_files(&tokens);
    assert!(!token_files.is_empty(), "SoftHSM wrote no token files");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("thief");
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(
        src.join("custody.yaml"),
        format!(
            "steps:\n  - name: steal\n    run: |\n\
             \x20     echo \"token files: $(find {tokens} -type f | wc -l)\"\n\
             \x20     echo \"token bytes: $(cat {tokens}/*/* 2>/dev/null | wc -c)\"\n\
             \x20     echo \"pin: $(cat {pin} 2>/dev/null)\"\n",
            tokens = tokens.display(),
            pin = pin.display(),
        ),
    )
    .unwrap();
    let (output, _) = build(&hsm, &src, &uri);
    assert!(output.status.success(), "{}", text(&output));
    let out = text(&output);
    assert!(out.contains("[steal] token files: 0"), "{out}");
    assert!(out.contains("[steal] token bytes: 0"), "{out}");
    assert!(out.lines().any(|l| l.trim_end() == "[steal] pin:"), "{out}");
    assert!(!out.contains(PIN), "{out}");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs_err::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// What each unusable signer must say, and a URI that makes it.
fn unusable_signers(hsm: &SoftHsm) -> Vec<(String, &'static str)> {
    let pin = hsm.pin_file();
    let wrong_pin = hsm.dir().join("wrong-pin");
    fs_err::write(&wrong_pin, "not-the-pin\n").unwrap();
    let uri = |token: &str, object: &str, module: &str, pin: &Path| {
        format!(
            "pkcs11:token={token};object={object}?module-path={module}&pin-source=file:{}",
            pin.display()
        )
    };
    vec![
        (
            uri("custody", "provenance", MODULE, &wrong_pin),
            "the PIN of token `custody` is wrong",
        ),
        (
            uri("nosuchtoken", "provenance", MODULE, &pin),
            "no PKCS#11 token `nosuchtoken`",
        ),
        (
            uri("custody", "nosuchkey", MODULE, &pin),
            "token `custody` has no private key `nosuchkey`",
        ),
        (
            uri(
                "custody",
                "provenance",
                "/usr/lib/nowhere/libpkcs11.so",
                &pin,
            ),
            "cannot load the PKCS#11 module `/usr/lib/nowhere/libpkcs11.so`",
        ),
    ]
}

#[test]
fn build_and_serve_refuse_to_start_with_a_signer_that_cannot_sign() {
    let hsm = SoftHsm::token("custody", PIN);
    make_key(&hsm, "provenance", "ecdsa-p256");
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = repository(dir.path(), "notes");
    for (uri, reason) in unusable_signers(&hsm) {
        let (output, _) = build(&hsm, &src, &uri);
        let shown = text(&output);
        assert_eq!(output.status.code(), Some(2), "{uri}: {shown}");
        assert!(shown.contains(reason), "{uri}: {shown}");
        assert!(shown.contains("hint: "), "{uri}: {shown}");
        assert!(!shown.contains(PIN), "{shown}");
        // No step ran: the signer is checked before anything else.
        assert!(!shown.contains("==> build "), "{shown}");

        // `custody serve` does not start either; it says why and exits 2.
        let data = dir.path().join("serve-data");
        let (name, value) = hsm.env();
        let mut serve = Command::new(CUSTODY)
            .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--signing-key", &uri])
            .env("CUSTODY_TOKEN", "token-for-a-daemon-that-never-starts")
            .env(name, value)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = serve.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                serve.kill().unwrap();
                panic!("custody serve started with `{uri}`");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{uri}: {stderr}");
        assert!(stderr.contains(reason), "{uri}: {stderr}");
        assert!(!stderr.contains(PIN), "{stderr}");
    }
}

#[tokio::test]
async fn after_rotation_the_listed_keys_verify_old_and_new_builds_and_strangers_fail() {
    let hsm = SoftHsm::token("custody", PIN);
    let dir = tempfile::tempdir().unwrap();
    let (old_uri, old_public, old_id) = make_key(&hsm, "old", "ecdsa-p256");
    let (new_uri, new_public, new_id) = make_key(&hsm, "new", "ecdsa-p256");
    let (old_src, old_artifact) = repository(dir.path(), "before");
    let (output, _) = build(&hsm, &old_src, &old_uri);
    assert!(output.status.success(), "{}", text(&output));
    let (new_src, new_artifact) = repository(dir.path(), "after");
    let (output, _) = build(&hsm, &new_src, &new_uri);
    assert!(output.status.success(), "{}", text(&output));

    // The service now signs with the new key; the old one is retired.
    let data = dir.path().join("serve");
    let mut options = DaemonOptions::new("rotated", &data);
    options.config = format!(
        "signing_key = \"{new_uri}\"\nretired_keys = [\"{}\"]\n{}",
        old_public.display(),
        options.config
    );
    let (name, value) = hsm.env();
    options.env = vec![(name.to_owned(), value.into_os_string())];
    let daemon = Daemon::start(options);
    let keys = daemon.client().keys().await.unwrap();
    let listed: Vec<(&str, bool)> = keys
        .keys
        .iter()
        .map(|k| (k.key_id.as_str(), k.signs))
        .collect();
    assert_eq!(
        listed,
        [(new_id.as_str(), true), (old_id.as_str(), false)],
        "{}",
        daemon.log()
    );
    assert!(keys.keys.iter().all(|k| k.algorithm == "ecdsa-p256"));
    assert!(!daemon.log().contains(PIN), "{}", daemon.log());

    // The endpoint's JSON, as saved by whoever verifies.
    let keys_file = dir.path().join("keys.json");
    fs_err::write(&keys_file, serde_json::to_vec_pretty(&keys).unwrap()).unwrap();
    let verify = |artifact: &str, keyring: &[&str]| {
        let output = Command::new(CUSTODY)
            .arg("verify")
            .arg(artifact)
            .args(keyring)
            .output()
            .unwrap();
        (output.status.code(), text(&output))
    };
    let keys_arg = ["--keys", keys_file.to_str().unwrap()];
    for artifact in [&old_artifact, &new_artifact] {
        let (code, shown) = verify(artifact, &keys_arg);
        assert_eq!(code, Some(0), "{artifact}: {shown}");
        let (code, shown) = verify(
            artifact,
            &[
                "--key",
                new_public.to_str().unwrap(),
                "--key",
                old_public.to_str().unwrap(),
            ],
        );
        assert_eq!(code, Some(0), "{artifact}: {shown}");
    }
    // A keyring without the key that signed: refused, naming the key id it
    // was signed with and the ids it has.
    let (code, shown) = verify(&old_artifact, &["--key", new_public.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains(&format!(
            "signed by key `{old_id}`, which is not in the keyring (it has `{new_id}`)"
        )),
        "{shown}"
    );

    // A list that claims a key under another key's id is refused.
    let mut forged = keys.clone();
    forged.keys[0].key_id = old_id.clone();
    fs_err::write(&keys_file, serde_json::to_vec(&forged).unwrap()).unwrap();
    let (code, shown) = verify(&new_artifact, &keys_arg);
    assert_eq!(code, Some(2), "{shown}");
    assert!(shown.contains("with a public key whose id is"), "{shown}");
}
