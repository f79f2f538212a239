//! Step images pulled from a real registry into a root filesystem.

use std::io::Write;

use custody_oci::copy::{self, CopyOptions, Destination, Source};
use custody_oci::registry::RegistryOptions;
use custody_runner::rootfs;
use custody_testkit::Registry;
use custody_testkit::image::{Blob, Image, LayoutWriter, sha256};

/// A gzip'd tar layer from (path, contents) pairs; contents `None` is a directory.
fn layer(entries: &[(&str, Option<&str>)]) -> (Blob, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, contents) in entries {
        let mut header = tar::Header::new_gnu();
        match contents {
            Some(text) => {
                header.set_size(text.len() as u64);
                header.set_mode(0o755);
                header.set_entry_type(tar::EntryType::Regular);
                header.set_cksum();
                tar.append_data(&mut header, path, text.as_bytes()).unwrap();
            }
            None => {
                header.set_size(0);
                header.set_mode(0o755);
                header.set_entry_type(tar::EntryType::Directory);
                header.set_cksum();
                tar.append_data(&mut header, path, &b""[..]).unwrap();
            }
        }
    }
    let tar = tar.into_inner().unwrap();
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (
        Blob::new(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gz.finish().unwrap(),
        ),
        diff_id,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_step_image_unpacks_with_its_whiteouts() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let (base, base_id) = layer(&[
        ("bin", None),
        ("bin/tool", Some("#!/bin/sh\necho tool\n")),
        ("etc", None),
        ("etc/os-release", Some("ID=test\n")),
    ]);
    let (top, top_id) = layer(&[("bin/.wh.tool", Some("")), ("etc/motd", Some("hello\n"))]);
    let image = Image::from_layers(7, vec![base, top], vec![base_id, top_id], "amd64");
    let root = dir.path().join("layout");
    LayoutWriter::new(&root)
        .image(&image)
        .tag("v1", &image.manifest);
    let options = RegistryOptions {
        insecure_hosts: vec![registry.host().to_owned()],
        ..RegistryOptions::default()
    };
    let source = Source::open(
        &format!("oci:{}:v1", root.display()).parse().unwrap(),
        &options,
    )
    .await
    .unwrap();
    let target = format!("{}/tools/builder:v1", registry.host());
    let destination = Destination::open(&target.parse().unwrap(), &options)
        .await
        .unwrap();
    let report = copy::copy(&source, &destination, &CopyOptions::default())
        .await
        .unwrap();

    // Pinned by digest, as provenance will record it.
    let pinned = format!(
        "{}/tools/builder@{}",
        registry.host(),
        report.descriptor.digest()
    );
    let rootfs_dir = dir.path().join("rootfs");
    let resolved = rootfs::prepare(
        &pinned.parse().unwrap(),
        &options,
        &rootfs_dir,
        dir.path(),
        rootfs::ImageLimits::default(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resolved.digest.to_string(), image.manifest.digest);
    assert_eq!(
        fs_err::read_to_string(rootfs_dir.join("etc/os-release")).unwrap(),
        "ID=test\n"
    );
    assert_eq!(
        fs_err::read_to_string(rootfs_dir.join("etc/motd")).unwrap(),
        "hello\n"
    );
    assert!(rootfs_dir.join("bin").is_dir());
    assert!(
        !rootfs_dir.join("bin/tool").exists(),
        "the upper layer's whiteout was not applied"
    );

    // A digest the registry does not have is an error naming it.
    let missing = format!(
        "{}/tools/builder@sha256:{}",
        registry.host(),
        "0".repeat(64)
    );
    let err = rootfs::prepare(
        &missing.parse().unwrap(),
        &options,
        &dir.path().join("other"),
        dir.path(),
        rootfs::ImageLimits::default(),
        None,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(&"0".repeat(64)), "{err}");
}
