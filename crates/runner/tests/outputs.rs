//! Collecting what steps produced, and refusing what would lead outside.

use std::os::unix::fs::symlink;
use std::process::Command;

use custody_oci::layout::Layout;
use custody_runner::outputs::{self, ARTIFACT_TYPE, OutputError, TITLE_ANNOTATION};

fn globs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn globs_match_workspace_files_and_every_glob_must_match() {
    let ws = tempfile::tempdir().unwrap();
    fs_err::create_dir_all(ws.path().join("dist/sub")).unwrap();
    fs_err::write(ws.path().join("dist/a.tar.gz"), "a").unwrap();
    fs_err::write(ws.path().join("dist/sub/b.tar.gz"), "b").unwrap();
    fs_err::write(ws.path().join("README"), "r").unwrap();
    symlink("a.tar.gz", ws.path().join("dist/link.tar.gz")).unwrap();

    let files = outputs::collect_files(ws.path(), "", &globs(&["dist/*.tar.gz"])).unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        ["dist/a.tar.gz", "dist/link.tar.gz"],
        "`*` does not cross `/`; a link inside is fine"
    );
    let files =
        outputs::collect_files(ws.path(), "", &globs(&["dist/**/*.tar.gz", "README"])).unwrap();
    assert_eq!(files.len(), 4);

    let err =
        outputs::collect_files(ws.path(), "", &globs(&["dist/*.tar.gz", "missing/*"])).unwrap_err();
    assert!(
        matches!(&err, OutputError::NothingMatched { glob } if glob == "missing/*"),
        "{err}"
    );
}

#[test]
fn paths_are_relative_to_the_builds_directory_and_a_swapped_one_leads_nowhere() {
    let ws = tempfile::tempdir().unwrap();
    fs_err::create_dir_all(ws.path().join("examples/hello/dist")).unwrap();
    fs_err::write(ws.path().join("examples/hello/dist/a.txt"), "a").unwrap();
    fs_err::write(ws.path().join("top.txt"), "top").unwrap();
    let files = outputs::collect_files(ws.path(), "examples/hello", &globs(&["dist/*"])).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(
        files[0].path, "dist/a.txt",
        "named as the build's directory sees it"
    );
    // Nothing outside the build's directory matches, even with `**`.
    let err =
        outputs::collect_files(ws.path(), "examples/hello", &globs(&["**/top.txt"])).unwrap_err();
    assert!(matches!(err, OutputError::NothingMatched { .. }), "{err}");

    // A step replaced the build's directory with a link to the host.
    let host = tempfile::tempdir().unwrap();
    fs_err::create_dir_all(host.path().join("dist")).unwrap();
    fs_err::write(host.path().join("dist/secret"), "host").unwrap();
    fs_err::remove_dir_all(ws.path().join("examples/hello")).unwrap();
    symlink(host.path(), ws.path().join("examples/hello")).unwrap();
    let err = outputs::collect_files(ws.path(), "examples/hello", &globs(&["dist/*"])).unwrap_err();
    assert!(matches!(err, OutputError::NothingMatched { .. }), "{err}");
}

#[test]
fn a_glob_matching_a_symlink_to_outside_is_refused() {
    let ws = tempfile::tempdir().unwrap();
    symlink("/etc/passwd", ws.path().join("passwd")).unwrap();
    let err = outputs::collect_files(ws.path(), "", &globs(&["*"])).unwrap_err();
    assert!(matches!(err, OutputError::Escapes { .. }), "{err}");
    assert!(
        err.to_string().contains("`passwd`") && err.to_string().contains("/etc/passwd"),
        "{err}"
    );
}

#[test]
fn images_under_output_are_opened_without_following_links() {
    let out = tempfile::tempdir().unwrap();
    let image = custody_testkit::image::Image::random(3, &[100]);
    custody_testkit::image::LayoutWriter::new(&out.path().join("app"))
        .image(&image)
        .tag("v1", &image.manifest);
    let location = |text: &str| text.parse::<custody_oci::Location>().unwrap();
    assert!(matches!(
        outputs::open_image(out.path(), &location("oci:/output/app:v1")),
        Ok(custody_oci::copy::Source::Layout { .. })
    ));
    // A step that links its "image" to a directory it cannot read, or an
    // archive to a file it cannot read, gets nothing read through the link.
    let elsewhere = tempfile::tempdir().unwrap();
    custody_testkit::image::LayoutWriter::new(elsewhere.path())
        .image(&image)
        .tag("v1", &image.manifest);
    symlink(elsewhere.path(), out.path().join("sneaky")).unwrap();
    symlink("/etc/shadow", out.path().join("shadow.tar")).unwrap();
    for (declared, shown) in [
        ("oci:/output/sneaky:v1", "/output/sneaky"),
        ("docker-archive:/output/shadow.tar", "/output/shadow.tar"),
    ] {
        let err = outputs::open_image(out.path(), &location(declared))
            .err()
            .expect("a link is refused");
        assert!(
            matches!(err, OutputError::Oci(custody_oci::Error::Symlink { .. }))
                && err.to_string().contains(shown),
            "{err}"
        );
    }
    let err = outputs::open_image(out.path(), &location("oci:/output/never-written"))
        .err()
        .unwrap();
    assert!(
        matches!(err, OutputError::Missing { .. })
            && err.to_string().contains("/output/never-written"),
        "{err}"
    );
}

#[test]
fn artifacts_are_oci_artifacts_that_standard_tools_read() {
    let ws = tempfile::tempdir().unwrap();
    fs_err::create_dir_all(ws.path().join("dist")).unwrap();
    fs_err::write(ws.path().join("dist/app.tar.gz"), "payload").unwrap();
    fs_err::write(ws.path().join("dist/notes.txt"), "notes").unwrap();
    let files = outputs::collect_files(ws.path(), "", &globs(&["dist/*"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout_root = dir.path().join("artifact");
    let layout = Layout::for_writing(&layout_root).unwrap();
    layout.create_if_missing().unwrap();
    let descriptor = outputs::write_artifact(ws.path(), &files, &layout, "v1").unwrap();

    let output = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            &format!("oci:{}:v1", layout_root.display()),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        custody_oci::digest::sha256(&output.stdout),
        *descriptor.digest()
    );
    let manifest: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(manifest["artifactType"], ARTIFACT_TYPE);
    let titles: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["annotations"][TITLE_ANNOTATION].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["dist/app.tar.gz", "dist/notes.txt"]);
    let first = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    assert_eq!(
        fs_err::read_to_string(layout_root.join("blobs/sha256").join(first)).unwrap(),
        "payload"
    );
}
