//! Layer unpacking: whiteouts, and hostile layers that try to write outside
//! the root.

use std::path::Path;

use custody_oci::unpack::{UnpackError, apply_layer, decompressor};

/// A tar built entry by entry, names written raw so hostile ones survive.
struct Tar(Vec<u8>);

impl Tar {
    fn new() -> Self {
        Self(Vec::new())
    }

    fn entry(mut self, name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) -> Self {
        let mut header = tar::Header::new_gnu();
        header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            header.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        header.set_cksum();
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(data);
        self.0
            .extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
        self
    }

    fn file(self, name: &str, data: &str) -> Self {
        self.entry(name, tar::EntryType::Regular, data.as_bytes(), None)
    }

    fn dir(self, name: &str) -> Self {
        self.entry(name, tar::EntryType::Directory, b"", None)
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name, tar::EntryType::Symlink, b"", Some(target))
    }

    fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(name, tar::EntryType::Link, b"", Some(target))
    }

    fn bytes(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

fn apply(tar: Tar, root: &Path) -> Result<(), UnpackError> {
    apply_layer(tar.bytes().as_slice(), root, None)
}

fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in walk(root) {
        out.push(entry.strip_prefix(root).unwrap().display().to_string());
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs_err::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        out.push(path.clone());
        if path.is_dir() && !path.is_symlink() {
            out.extend(walk(&path));
        }
    }
    out
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers_only() {
    let root = tempfile::tempdir().unwrap();
    apply(
        Tar::new()
            .dir("a")
            .file("a/x", "1")
            .file("a/y", "2")
            .dir("b")
            .file("b/z", "3")
            .file("keep", "k"),
        root.path(),
    )
    .unwrap();
    // The upper layer adds `a/new` before its opaque marker: it must survive.
    apply(
        Tar::new()
            .file("a/new", "n")
            .file("a/.wh..wh..opq", "")
            .file("b/.wh.z", "")
            .file("keep", "k2"),
        root.path(),
    )
    .unwrap();
    assert_eq!(listing(root.path()), ["a", "a/new", "b", "keep"]);
    assert_eq!(
        fs_err::read_to_string(root.path().join("keep")).unwrap(),
        "k2"
    );
}

#[test]
fn gzip_and_zstd_layers_decompress_by_media_type() {
    use std::io::Write;
    let tar = Tar::new().file("hello", "world").bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(tar.as_slice(), 1).unwrap();
    for (media_type, blob) in [
        ("application/vnd.oci.image.layer.v1.tar+gzip", gz),
        ("application/vnd.oci.image.layer.v1.tar+zstd", zst),
        ("application/vnd.oci.image.layer.v1.tar", tar.clone()),
    ] {
        let root = tempfile::tempdir().unwrap();
        apply_layer(
            decompressor(media_type, blob.as_slice()).unwrap(),
            root.path(),
            None,
        )
        .unwrap();
        assert_eq!(
            fs_err::read_to_string(root.path().join("hello")).unwrap(),
            "world",
            "{media_type}"
        );
    }
    assert!(decompressor("application/x-unknown", &b""[..]).is_err());
}

#[test]
fn entries_that_climb_out_or_are_absolute_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let root = outside.path().join("root");
    fs_err::create_dir_all(&root).unwrap();
    for (tar, name) in [
        (Tar::new().file("../evil", "x"), "../evil"),
        (Tar::new().file("a/../../evil", "x"), "a/../../evil"),
        (Tar::new().file("/evil", "x"), "/evil"),
        (Tar::new().file(".wh...", ""), ".wh.."),
    ] {
        let err = apply(tar, &root).unwrap_err();
        assert!(matches!(err, UnpackError::Unsafe { .. }), "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
    }
    assert!(!outside.path().join("evil").exists());
}

#[test]
fn writes_through_a_symlink_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let root = outside.path().join("root");
    let target = outside.path().join("target");
    fs_err::create_dir_all(&root).unwrap();
    fs_err::create_dir_all(&target).unwrap();
    // In one layer, and across layers.
    let err = apply(
        Tar::new()
            .symlink("etc", target.to_str().unwrap())
            .file("etc/passwd", "pwned"),
        &root,
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::Unsafe { .. }), "{err}");
    let root2 = outside.path().join("root2");
    fs_err::create_dir_all(&root2).unwrap();
    apply(Tar::new().symlink("etc", "../target"), &root2).unwrap();
    let err = apply(Tar::new().file("etc/passwd", "pwned"), &root2).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
    let err = apply(Tar::new().file("etc/.wh.passwd", ""), &root2).unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(
        !target.join("passwd").exists(),
        "a layer wrote through a symlink"
    );

    // A symlink itself is fine, and so is replacing it with a file.
    apply(Tar::new().file("etc", "now a file"), &root2).unwrap();
    assert_eq!(
        fs_err::read_to_string(root2.join("etc")).unwrap(),
        "now a file"
    );
}

#[test]
fn hard_links_must_stay_inside() {
    let outside = tempfile::tempdir().unwrap();
    let root = outside.path().join("root");
    fs_err::create_dir_all(&root).unwrap();
    fs_err::write(outside.path().join("secret"), "s").unwrap();
    let err = apply(Tar::new().hardlink("copy", "../secret"), &root).unwrap_err();
    assert!(matches!(err, UnpackError::Unsafe { .. }), "{err}");
    apply(Tar::new().file("orig", "o").hardlink("copy", "orig"), &root).unwrap();
    assert_eq!(fs_err::read_to_string(root.join("copy")).unwrap(), "o");
}
