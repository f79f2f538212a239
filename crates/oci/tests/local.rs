//! Layouts, archives and verified streams, on disk only.

use bytes::Bytes;
use custody_oci::copy::{self, CopyOptions, Destination, Source};
use custody_oci::layout::Layout;
use custody_oci::oci_spec::image::Descriptor;
use custody_oci::registry::RegistryOptions;
use custody_oci::{Error, Location, stream};
use custody_testkit::image::{self, Image, LayoutWriter};
use futures_util::TryStreamExt;

fn descriptor(blob: &image::Blob) -> Descriptor {
    serde_json::from_value(blob.descriptor()).unwrap()
}

async fn collect(stream: stream::BlobStream) -> Result<Vec<u8>, Error> {
    let chunks: Vec<Bytes> = stream.try_collect().await?;
    Ok(chunks.concat())
}

#[tokio::test]
async fn file_streams_verify_and_withhold_the_end_of_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let blob = image::Blob::new("application/octet-stream", image::random_bytes(1, 700_000));
    let path = dir.path().join("blob");
    fs_err::write(&path, &blob.bytes).unwrap();
    let good = collect(stream::from_file(path.clone(), None, descriptor(&blob)))
        .await
        .unwrap();
    assert_eq!(good, blob.bytes);

    let mut tampered = blob.bytes.clone();
    tampered[699_999] ^= 1;
    fs_err::write(&path, &tampered).unwrap();
    let mut received = 0usize;
    let mut stream = stream::from_file(path.clone(), None, descriptor(&blob));
    let err = loop {
        match stream.try_next().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => panic!("a tampered blob streamed to its end"),
            Err(err) => break err,
        }
    };
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(
        received < blob.bytes.len(),
        "all bytes were handed out before the mismatch was found"
    );

    // A longer file is caught as well.
    let mut longer = blob.bytes.clone();
    longer.push(0);
    fs_err::write(&path, &longer).unwrap();
    let err = collect(stream::from_file(path, None, descriptor(&blob)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
}

#[tokio::test]
async fn layout_to_layout_copies_keep_every_byte_and_tag() {
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(1, &[10_000, 20_000]);
    let source_root = dir.path().join("src");
    LayoutWriter::new(&source_root)
        .image(&image)
        .tag("v1", &image.manifest);
    let options = RegistryOptions::default();
    let source = Source::open(
        &format!("oci:{}:v1", source_root.display())
            .parse::<Location>()
            .unwrap(),
        &options,
    )
    .await
    .unwrap();
    let target = dir.path().join("dst");
    let destination = Destination::open(
        &format!("oci:{}:copied", target.display())
            .parse::<Location>()
            .unwrap(),
        &options,
    )
    .await
    .unwrap();
    let report = copy::copy(&source, &destination, &CopyOptions::default())
        .await
        .unwrap();
    assert_eq!(report.blobs_copied, 3);
    assert_eq!(
        report.descriptor.digest().to_string(),
        image.manifest.digest
    );

    let layout = Layout::open(&target).unwrap();
    assert_eq!(
        layout.resolve(Some("copied")).unwrap().digest().to_string(),
        image.manifest.digest
    );
    for blob in image.blobs().chain([&image.manifest]) {
        assert_eq!(
            fs_err::read(target.join("blobs/sha256").join(blob.hex())).unwrap(),
            blob.bytes
        );
    }
    // Again: everything is present, nothing is copied.
    let report = copy::copy(&source, &destination, &CopyOptions::default())
        .await
        .unwrap();
    assert_eq!((report.blobs_copied, report.blobs_present), (0, 3));
}

#[test]
fn layouts_name_the_tag_they_lack_and_list_the_ones_they_have() {
    let dir = tempfile::tempdir().unwrap();
    let a = Image::random(2, &[100]);
    let b = Image::random(3, &[100]);
    LayoutWriter::new(dir.path())
        .image(&a)
        .image(&b)
        .tag("a", &a.manifest)
        .tag("b", &b.manifest);
    let layout = Layout::open(dir.path()).unwrap();
    let err = layout.resolve(Some("c")).unwrap_err().to_string();
    assert!(
        err.contains("`c`") && err.contains("`a`") && err.contains("`b`"),
        "{err}"
    );
    let err = layout.resolve(None).unwrap_err().to_string();
    assert!(err.contains("2 images"), "{err}");
    assert!(
        Layout::open(dir.path().join("blobs"))
            .unwrap_err()
            .to_string()
            .contains("oci-layout")
    );
}

#[test]
fn docker_archives_are_read_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.tar");
    let (config_digest, diff_ids) =
        image::write_docker_archive(&path, 4, &[5_000, 7_000], "team/app:v1");
    let archive = custody_oci::archive::DockerArchive::open(&path).unwrap();
    assert_eq!(
        custody_oci::digest::sha256(&archive.config).to_string(),
        config_digest
    );
    for diff_id in &diff_ids {
        assert!(
            archive.blobs.contains_key(diff_id),
            "layer {diff_id} not found"
        );
    }
    assert_eq!(archive.repo_tags, ["team/app:v1"]);

    fs_err::write(
        &path,
        b"not a tar at all, just some bytes that go on for a while..........",
    )
    .unwrap();
    let err = custody_oci::archive::DockerArchive::open(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("image.tar"), "{err}");
}
