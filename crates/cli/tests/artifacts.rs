//! `custody artifacts get` against a real registry: the files a build
//! pushed come back byte for byte; an artifact whose names would escape
//! the directory, or whose bytes do not match their digests, writes
//! nothing it should not.

use std::path::Path;

use custody_testkit::Registry;
use custody_testkit::image::Blob;

mod support;

use support::{custody, text};

/// `custody artifacts get REF --out OUT` with the registry reachable.
fn get(registry: &Registry, reference: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "artifacts",
        "get",
        "--insecure-registry",
        registry.host(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(reference);
    custody(&args)
}

/// Pushes an artifact of `files` (title, bytes) by hand as
/// `REGISTRY/t/files:TAG`; returns the layer blobs.
fn push_artifact(registry: &Registry, tag: &str, files: &[(&str, &[u8])]) -> Vec<Blob> {
    let files: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(name, bytes)| ((*name).to_owned(), bytes.to_vec()))
        .collect();
    let tag = tag.to_owned();
    support::with_client(registry, |client| async move {
        use custody_oci::oci_spec::image::{Descriptor, MediaType};
        let upload = |blob: Blob| {
            let client = &client;
            async move {
                support::upload_blob(client, "t/files", &blob).await;
                blob
            }
        };
        let config = upload(Blob::new(
            "application/vnd.oci.empty.v1+json",
            b"{}".to_vec(),
        ))
        .await;
        let mut blobs = Vec::new();
        let mut layers = Vec::new();
        for (name, bytes) in files {
            let blob = upload(Blob::new("application/octet-stream", bytes)).await;
            let mut layer = blob.descriptor();
            layer["annotations"] = serde_json::json!({ "org.opencontainers.image.title": name });
            layers.push(layer);
            blobs.push(blob);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.custody.artifact.v1",
            "config": config.descriptor(),
            "layers": layers,
        });
        let bytes = bytes::Bytes::from(serde_json::to_vec(&manifest).unwrap());
        let descriptor = Descriptor::new(
            MediaType::ImageManifest,
            bytes.len() as u64,
            custody_oci::digest::sha256(&bytes),
        );
        client
            .put_manifest("t/files", &tag, &descriptor, &bytes)
            .await
            .unwrap();
        blobs
    })
}

/// Every file beneath `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in fs_err::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn artifacts_get_writes_back_the_files_a_build_pushed() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs_err::create_dir_all(src.join("dist")).unwrap();
    let binary = custody_testkit::image::random_bytes(7, 300_000);
    fs_err::write(src.join("dist/app.bin"), &binary).unwrap();
    fs_err::write(src.join("notes.txt"), "release notes\n").unwrap();
    let spec = format!(
        "steps:\n  - name: a\n    run: 'true'\nartifacts:\n  - paths: [notes.txt, dist/app.bin]\n    to: {}/t/files:v1\n",
        registry.host()
    );
    fs_err::write(src.join("custody.yaml"), spec).unwrap();
    let data = dir.path().join("data");
    let built = custody(&[
        "build",
        src.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--insecure-registry",
        registry.host(),
    ]);
    assert!(built.status.success(), "{}", text(&built));

    let reference = format!("{}/t/files:v1", registry.host());
    let out = dir.path().join("got");
    let got = get(&registry, &reference, &out, &[]);
    assert!(got.status.success(), "{}", text(&got));
    assert_eq!(tree(&out), ["dist/app.bin", "notes.txt"]);
    assert_eq!(fs_err::read(out.join("dist/app.bin")).unwrap(), binary);
    assert_eq!(
        fs_err::read_to_string(out.join("notes.txt")).unwrap(),
        "release notes\n"
    );
    let printed = String::from_utf8_lossy(&got.stdout);
    assert!(
        printed.contains(&format!("{}\n", out.join("notes.txt").display())),
        "{printed}"
    );

    // Existing files stay unless `--force`.
    fs_err::remove_dir_all(out.join("dist")).unwrap();
    fs_err::write(out.join("notes.txt"), "mine\n").unwrap();
    let again = get(&registry, &reference, &out, &[]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.contains("notes.txt` exists already") && said.contains("--force"),
        "{said}"
    );
    assert_eq!(
        fs_err::read_to_string(out.join("notes.txt")).unwrap(),
        "mine\n"
    );
    assert!(
        !out.join("dist").exists(),
        "nothing fetched once a file exists"
    );
    let forced = get(&registry, &reference, &out, &["--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert_eq!(
        fs_err::read_to_string(out.join("notes.txt")).unwrap(),
        "release notes\n"
    );
    // A symlink planted where a directory goes is not followed.
    let elsewhere = dir.path().join("elsewhere");
    fs_err::create_dir_all(&elsewhere).unwrap();
    let planted = dir.path().join("planted");
    fs_err::create_dir_all(&planted).unwrap();
    std::os::unix::fs::symlink(&elsewhere, planted.join("dist")).unwrap();
    let through = get(&registry, &reference, &planted, &["--force"]);
    assert_eq!(through.status.code(), Some(1), "{}", text(&through));
    assert!(tree(&elsewhere).is_empty());
}

#[test]
fn artifacts_get_refuses_names_that_escape_and_bytes_that_do_not_match() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a/b/out");
    for (tag, name) in [
        ("climbs", "../evil"),
        ("absolute", "/etc/x"),
        ("deep", "ok/../../../evil"),
    ] {
        push_artifact(&registry, tag, &[("fine.txt", b"fine"), (name, b"evil")]);
        let reference = format!("{}/t/files:{tag}", registry.host());
        let refused = get(&registry, &reference, &out, &[]);
        assert_eq!(refused.status.code(), Some(1), "{tag}: {}", text(&refused));
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(
            said.contains(&format!("refused file name `{name}`")),
            "{said}"
        );
        // Refused before anything was written, inside or out.
        assert!(!out.exists() || tree(&out).is_empty(), "{tag}");
        assert_eq!(tree(dir.path()), Vec::<String>::new(), "{tag}");
    }

    // A registry serving other bytes than the digest names: the file is not
    // kept, and nothing half-written is left.
    let blobs = push_artifact(
        &registry,
        "tampered",
        &[("good.txt", b"good bytes"), ("bad.txt", b"true bytes")],
    );
    let hex = blobs[1].hex();
    let stored = registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    fs_err::write(&stored, b"evil bytes").unwrap();
    let reference = format!("{}/t/files:tampered", registry.host());
    let refused = get(&registry, &reference, &out, &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("file `bad.txt` was not written")
            && said.contains("does not match its digest"),
        "{said}"
    );
    assert_eq!(tree(&out), ["good.txt"]);
    assert_eq!(fs_err::read(out.join("good.txt")).unwrap(), b"good bytes");
}
