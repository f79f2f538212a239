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

/// Opens `path` when the stream first reads.
fn opener(
    path: &std::path::Path,
) -> impl FnOnce() -> Result<std::sync::Arc<std::fs::File>, Error> + Send + 'static {
    let path = path.to_owned();
    move || {
        Ok(std::sync::Arc::new(
            fs_err::File::open(path)?.into_parts().0,
        ))
    }
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
    let good = collect(stream::from_file(opener(&path), None, descriptor(&blob)))
        .await
        .unwrap();
    assert_eq!(good, blob.bytes);

    let mut tampered = blob.bytes.clone();
    tampered[699_999] ^= 1;
    fs_err::write(&path, &tampered).unwrap();
    let mut received = 0usize;
    let mut stream = stream::from_file(opener(&path), None, descriptor(&blob));
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
    let err = collect(stream::from_file(opener(&path), None, descriptor(&blob)))
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

/// A layout where someone planted symlinks: `blobs/sha256` pointing at
/// another directory, `index.json`'s old temporary name pointing at a file.
/// Writing to it is refused naming the link, and nothing lands outside.
#[tokio::test]
async fn layouts_with_planted_symlinks_are_refused_and_nothing_is_written_outside() {
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(7, &[1_000]);
    let source_root = dir.path().join("src");
    LayoutWriter::new(&source_root)
        .image(&image)
        .tag("v1", &image.manifest);
    let source = Source::open(
        &format!("oci:{}:v1", source_root.display())
            .parse::<Location>()
            .unwrap(),
        &RegistryOptions::default(),
    )
    .await
    .unwrap();

    let victim_dir = dir.path().join("cron.d");
    fs_err::create_dir(&victim_dir).unwrap();
    let victim_file = dir.path().join("passwd");
    fs_err::write(&victim_file, "root:x:0:0\n").unwrap();
    let planted = dir.path().join("out");
    fs_err::create_dir_all(planted.join("blobs")).unwrap();
    fs_err::write(
        planted.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs_err::write(
        planted.join("index.json"),
        r#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .unwrap();
    std::os::unix::fs::symlink(&victim_dir, planted.join("blobs/sha256")).unwrap();
    std::os::unix::fs::symlink(&victim_file, planted.join(".index.json.tmp")).unwrap();

    let err = Destination::open(
        &format!("oci:{}:v1", planted.display())
            .parse::<Location>()
            .unwrap(),
        &RegistryOptions::default(),
    )
    .await
    .err()
    .expect("a layout holding symlinks is refused");
    assert!(matches!(err, Error::Symlink { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(".index.json.tmp") || message.contains("blobs/sha256"),
        "{message}"
    );

    // Even a layout that looked clean when opened is never written through
    // a link planted afterwards (a step racing the runner).
    fs_err::remove_file(planted.join(".index.json.tmp")).unwrap();
    fs_err::remove_file(planted.join("blobs/sha256")).unwrap();
    let destination = Destination::open(
        &format!("oci:{}:v1", planted.display())
            .parse::<Location>()
            .unwrap(),
        &RegistryOptions::default(),
    )
    .await
    .unwrap();
    std::os::unix::fs::symlink(&victim_dir, planted.join("blobs/sha256")).unwrap();
    let err = copy::copy(&source, &destination, &CopyOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Symlink { .. }), "{err}");
    assert!(err.to_string().contains("blobs/sha256"), "{err}");

    assert_eq!(fs_err::read_dir(&victim_dir).unwrap().count(), 0);
    assert_eq!(
        fs_err::read_to_string(&victim_file).unwrap(),
        "root:x:0:0\n"
    );
    // The layout path itself may not go through a symlink either.
    std::os::unix::fs::symlink(&source_root, dir.path().join("link")).unwrap();
    let err = Layout::open(dir.path().join("link")).unwrap_err();
    assert!(matches!(err, Error::Symlink { .. }), "{err}");
}

/// A blob that is a FIFO or a symlink to a file outside is never read.
#[test]
fn blobs_that_are_not_regular_files_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let image = Image::random(8, &[1_000]);
    let root = dir.path().join("layout");
    let mut writer = LayoutWriter::new(&root);
    writer.image(&image).tag("v1", &image.manifest);
    let layer = writer.blob_path(&image.layers[0]);
    let layout = Layout::open(&root).unwrap();
    fs_err::remove_file(&layer).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&layer)
        .status()
        .unwrap();
    assert!(made.success());
    let digest = custody_oci::digest::parse(&image.layers[0].digest).unwrap();
    // A FIFO would block a plain open forever; this returns at once.
    let err = layout.open_blob(&digest).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    fs_err::remove_file(&layer).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &layer).unwrap();
    let err = layout.open_blob(&digest).unwrap_err();
    assert!(matches!(err, Error::Symlink { .. }), "{err}");
}
