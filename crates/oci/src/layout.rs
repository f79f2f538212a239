//! OCI image layouts on disk: `oci-layout`, `index.json` and
//! `blobs/<alg>/<encoded>` (image-spec `image-layout.md`).
//!
//! Everything here is blocking file I/O; async callers run it under
//! `spawn_blocking`. Blobs are written to a temporary file beside their final
//! name and renamed only once their bytes matched the digest, so a layout
//! never holds a blob under a wrong name, even after a crash.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fs_err as fs;
use oci_spec::image::{ANNOTATION_REF_NAME, Descriptor, ImageIndex, MediaType};

use crate::Error;
use crate::digest::{Digest, Hasher};

const LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";
const LAYOUT_VERSION: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
/// Manifests and indexes larger than this are refused, as registries do.
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;

/// An OCI image layout directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Opens an existing layout, checking its `oci-layout` marker.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        let marker = root.join(LAYOUT_FILE);
        if !marker.is_file() {
            return Err(Error::Layout {
                path: root,
                reason: format!("it has no `{LAYOUT_FILE}` file, so it is not an OCI image layout"),
            });
        }
        let text = fs::read_to_string(&marker)?;
        let version: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Layout {
                path: marker.clone(),
                reason: format!("it is not JSON: {e}"),
            })?;
        match version.get("imageLayoutVersion").and_then(|v| v.as_str()) {
            Some(v) if v.starts_with("1.") => Ok(Self { root }),
            other => Err(Error::Layout {
                path: marker,
                reason: format!("unsupported imageLayoutVersion {other:?}; custody reads 1.x"),
            }),
        }
    }

    /// A layout to write to: an existing one, or one to create at `root`
    /// (nothing is created until [`Layout::create_if_missing`]). A directory
    /// that holds other things is refused.
    pub fn for_writing(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        if root.join(LAYOUT_FILE).exists() {
            return Self::open(root);
        }
        if root.exists() && fs::read_dir(&root)?.next().is_some() {
            return Err(Error::Layout {
                path: root,
                reason: "the directory is not empty and is not an OCI image layout".into(),
            });
        }
        Ok(Self { root })
    }

    /// Writes the `oci-layout` marker and an empty index if they are absent.
    pub fn create_if_missing(&self) -> Result<(), Error> {
        if self.root.join(LAYOUT_FILE).exists() {
            return Ok(());
        }
        fs::create_dir_all(self.root.join("blobs"))?;
        write_atomically(&self.root.join(LAYOUT_FILE), LAYOUT_VERSION.as_bytes())?;
        self.write_index(&empty_index())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index(&self) -> Result<ImageIndex, Error> {
        let path = self.root.join(INDEX_FILE);
        let bytes = fs::read(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Layout {
            path,
            reason: format!("it is not a valid image index: {e}"),
        })
    }

    /// The manifest descriptor tagged `tag`, or the only one when no tag is given.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, Error> {
        let index = self.index()?;
        let manifests = index.manifests();
        let tag_of = |d: &Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_REF_NAME))
                .cloned()
        };
        match tag {
            Some(tag) => manifests
                .iter()
                .find(|d| tag_of(d).as_deref() == Some(tag))
                .cloned()
                .ok_or_else(|| {
                    let tags: Vec<String> = manifests.iter().filter_map(tag_of).collect();
                    Error::Layout {
                        path: self.root.clone(),
                        reason: format!(
                            "no image is tagged `{tag}` (tags here: {})",
                            list_or_none(&tags)
                        ),
                    }
                }),
            None => match manifests.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(Error::Layout {
                    path: self.root.clone(),
                    reason: "the layout holds no image".into(),
                }),
                many => {
                    let tags: Vec<String> = many.iter().filter_map(tag_of).collect();
                    Err(Error::Layout {
                        path: self.root.clone(),
                        reason: format!(
                            "the layout holds {} images; name one with `oci:PATH:TAG` (tags here: {})",
                            many.len(),
                            list_or_none(&tags)
                        ),
                    })
                }
            },
        }
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().as_ref())
            .join(digest.digest())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Reads a small blob (a manifest or config) whole and checks it against
    /// its descriptor.
    pub fn read_small_blob(&self, descriptor: &Descriptor) -> Result<Vec<u8>, Error> {
        if descriptor.size() > MAX_MANIFEST_SIZE {
            return Err(Error::ManifestTooLarge {
                digest: descriptor.digest().clone(),
                size: descriptor.size(),
            });
        }
        let path = self.blob_path(descriptor.digest());
        if !path.is_file() {
            return Err(Error::BlobsMissing {
                location: format!("oci:{}", self.root.display()),
                digests: vec![descriptor.digest().clone()],
            });
        }
        let bytes = fs::read(&path)?;
        crate::digest::verify_bytes(descriptor.digest(), descriptor.size(), &bytes)?;
        Ok(bytes)
    }

    /// Writes a blob from `reader`, checking its digest and size while it
    /// streams; the blob appears under its name only if both match.
    pub fn write_blob(&self, descriptor: &Descriptor, mut reader: impl Read) -> Result<(), Error> {
        let mut hasher = Hasher::for_digest(descriptor.digest())?;
        let mut writer = self.blob_writer(descriptor.digest())?;
        let mut buf = vec![0; 256 * 1024];
        let mut written = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(Error::Read)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer.write_all(&buf[..n])?;
            written += n as u64;
        }
        check_written(descriptor, written, hasher.finish())?;
        writer.commit()
    }

    /// A writer for a blob whose bytes the caller has already verified.
    pub fn blob_writer(&self, digest: &Digest) -> Result<BlobWriter, Error> {
        let final_path = self.blob_path(digest);
        let dir = final_path.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        let file = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(dir)
            .map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!(
                        "failed to create a temporary file in `{}`: {e}",
                        dir.display()
                    ),
                ))
            })?;
        Ok(BlobWriter { file, final_path })
    }

    /// Records `descriptor` in `index.json`. With a tag, the tag moves to
    /// this descriptor; without one, the descriptor is added unless present.
    pub fn add_manifest(&self, descriptor: &Descriptor, tag: Option<&str>) -> Result<(), Error> {
        let mut index = self.index()?;
        let mut manifests = index.manifests().clone();
        let mut descriptor = descriptor.clone();
        match tag {
            Some(tag) => {
                manifests.retain(|d| {
                    d.annotations()
                        .as_ref()
                        .and_then(|a| a.get(ANNOTATION_REF_NAME))
                        != Some(&tag.to_owned())
                });
                let mut annotations = descriptor.annotations().clone().unwrap_or_default();
                annotations.insert(ANNOTATION_REF_NAME.to_owned(), tag.to_owned());
                descriptor.set_annotations(Some(annotations));
            }
            None => {
                if manifests.iter().any(|d| d.digest() == descriptor.digest()) {
                    return Ok(());
                }
            }
        }
        manifests.push(descriptor);
        index.set_manifests(manifests);
        self.write_index(&index)
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), Error> {
        let bytes = serde_json::to_vec(index).expect("an image index serialises");
        write_atomically(&self.root.join(INDEX_FILE), &bytes)
    }
}

/// A blob being written to a temporary file; `commit` moves it into place.
pub struct BlobWriter {
    file: tempfile::NamedTempFile,
    final_path: PathBuf,
}

impl BlobWriter {
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.file.write_all(bytes).map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("failed to write `{}`: {e}", self.file.path().display()),
            ))
        })
    }

    pub fn commit(self) -> Result<(), Error> {
        let final_path = self.final_path;
        self.file.persist(&final_path).map_err(|e| {
            Error::Io(std::io::Error::new(
                e.error.kind(),
                format!(
                    "failed to move a blob into `{}`: {}",
                    final_path.display(),
                    e.error
                ),
            ))
        })?;
        Ok(())
    }
}

pub(crate) fn check_written(
    descriptor: &Descriptor,
    written: u64,
    actual: Digest,
) -> Result<(), Error> {
    if written != descriptor.size() {
        return Err(Error::SizeMismatch {
            digest: descriptor.digest().clone(),
            expected: descriptor.size(),
            actual: written,
        });
    }
    if &actual != descriptor.digest() {
        return Err(Error::DigestMismatch {
            expected: descriptor.digest().clone(),
            actual,
        });
    }
    Ok(())
}

fn empty_index() -> ImageIndex {
    let mut index = ImageIndex::default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(Vec::new());
    index
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().expect("layout files have a parent");
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
