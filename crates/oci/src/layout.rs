//! OCI image layouts on disk: `oci-layout`, `index.json` and
//! `blobs/<alg>/<encoded>` (image-spec `image-layout.md`).
//!
//! Everything here is blocking file I/O; async callers run it under
//! `spawn_blocking`. Blobs are written to a temporary file beside their final
//! name and renamed only once their bytes matched the digest, so a layout
//! never holds a blob under a wrong name, even after a crash.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use oci_spec::image::{ANNOTATION_REF_NAME, Descriptor, ImageIndex, MediaType};

use crate::Error;
use crate::beneath::{Dir, Kind, TempFile};
use crate::digest::{Digest, Hasher};

const LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";
const LAYOUT_VERSION: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
/// Manifests and indexes larger than this are refused, as registries do.
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// `index.json` lists every image of the layout; past this it is refused.
const MAX_INDEX_SIZE: u64 = 64 << 20;

/// An OCI image layout directory. Every file in it is reached through the
/// open root directory without following symlinks (see [`crate::beneath`]),
/// and a layout that holds a symlink is refused naming it: layouts are
/// written where build steps and repositories can plant things.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
    /// Set once the directory exists (at once for an existing layout, at
    /// [`Layout::create_if_missing`] for a new one); shared by clones.
    dir: Arc<OnceLock<Dir>>,
}

impl Layout {
    /// Opens an existing layout, checking its `oci-layout` marker. No
    /// component of `root` may be a symlink, nor anything in the layout.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        let dir = Dir::open(&root).map_err(|e| not_a_layout(&root, e))?;
        Self::checked(root, dir)
    }

    /// Opens the existing layout `relative` beneath `parent` (a build's
    /// `/output`), never through a symlink.
    pub fn open_in(parent: &Dir, relative: &Path) -> Result<Self, Error> {
        let root = parent.display_path(relative);
        let dir = parent
            .open_dir(relative)
            .map_err(|e| not_a_layout(&root, e))?;
        Self::checked(root, dir)
    }

    fn checked(root: PathBuf, dir: Dir) -> Result<Self, Error> {
        if !dir.is_file(Path::new(LAYOUT_FILE)) {
            return Err(Error::Layout {
                path: root,
                reason: format!("it has no `{LAYOUT_FILE}` file, so it is not an OCI image layout"),
            });
        }
        let marker = root.join(LAYOUT_FILE);
        let text = read_limited(&dir, Path::new(LAYOUT_FILE), 4096)?;
        let version: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| Error::Layout {
                path: marker.clone(),
                reason: format!("it is not JSON: {e}"),
            })?;
        match version.get("imageLayoutVersion").and_then(|v| v.as_str()) {
            Some(v) if v.starts_with("1.") => {}
            other => {
                return Err(Error::Layout {
                    path: marker,
                    reason: format!("unsupported imageLayoutVersion {other:?}; custody reads 1.x"),
                });
            }
        }
        refuse_symlinks(&dir)?;
        Ok(Self {
            root,
            dir: Arc::new(OnceLock::from(dir)),
        })
    }

    /// A layout to write to: an existing one, or one to create at `root`
    /// (nothing is created until [`Layout::create_if_missing`]). A directory
    /// that holds other things is refused.
    pub fn for_writing(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        let dir = match Dir::open(&root) {
            Ok(dir) => dir,
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                // What exists of the path already may not go through a
                // symlink either: say so now, not when the first blob lands.
                if let Some(existing) = root.ancestors().skip(1).find(|a| a.exists()) {
                    Dir::open(existing)?;
                }
                return Ok(Self {
                    root,
                    dir: Arc::new(OnceLock::new()),
                });
            }
            Err(e) => return Err(e),
        };
        if dir.kind(Path::new(LAYOUT_FILE))?.is_some() {
            return Self::checked(root, dir);
        }
        if !dir.entries()?.is_empty() {
            return Err(Error::Layout {
                path: root,
                reason: "the directory is not empty and is not an OCI image layout".into(),
            });
        }
        Ok(Self {
            root,
            dir: Arc::new(OnceLock::from(dir)),
        })
    }

    /// Writes the `oci-layout` marker and an empty index if they are absent.
    pub fn create_if_missing(&self) -> Result<(), Error> {
        let dir = match self.dir.get() {
            Some(dir) => dir.clone(),
            None => {
                let dir = Dir::create_all(&self.root)?;
                self.dir.get_or_init(|| dir).clone()
            }
        };
        if dir.kind(Path::new(LAYOUT_FILE))?.is_some() {
            return Ok(());
        }
        dir.create_dir_all(Path::new("blobs"))?;
        self.write_index(&empty_index())?;
        dir.write_atomically(LAYOUT_FILE, LAYOUT_VERSION.as_bytes())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root directory; an error for a layout not created yet.
    fn dir(&self) -> Result<&Dir, Error> {
        self.dir.get().ok_or_else(|| Error::Layout {
            path: self.root.clone(),
            reason: "the layout does not exist yet".into(),
        })
    }

    pub fn index(&self) -> Result<ImageIndex, Error> {
        let bytes = read_limited(self.dir()?, Path::new(INDEX_FILE), MAX_INDEX_SIZE)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Layout {
            path: self.root.join(INDEX_FILE),
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

    /// Where the blob `digest` is, relative to the root.
    fn blob_relative(digest: &Digest) -> PathBuf {
        Path::new("blobs")
            .join(digest.algorithm().as_ref())
            .join(digest.digest())
    }

    /// The path of the blob `digest`, for messages.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(Self::blob_relative(digest))
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.dir
            .get()
            .is_some_and(|dir| dir.is_file(&Self::blob_relative(digest)))
    }

    /// Opens the blob `digest` for reading (a regular file, never a link).
    pub fn open_blob(&self, digest: &Digest) -> Result<std::fs::File, Error> {
        match self.dir()?.open_file(&Self::blob_relative(digest)) {
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::BlobsMissing {
                    location: format!("oci:{}", self.root.display()),
                    digests: vec![digest.clone()],
                })
            }
            other => other,
        }
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
        let mut bytes = Vec::new();
        self.open_blob(descriptor.digest())?
            .take(descriptor.size() + 1)
            .read_to_end(&mut bytes)
            .map_err(Error::Read)?;
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
        let blobs = self
            .dir()?
            .create_dir_all(&Path::new("blobs").join(digest.algorithm().as_ref()))?;
        Ok(BlobWriter {
            file: blobs.create_temp(".partial-")?,
            name: digest.digest().to_owned(),
        })
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
        self.dir()?.write_atomically(INDEX_FILE, &bytes)
    }
}

/// A blob being written to a temporary file; `commit` moves it into place.
pub struct BlobWriter {
    file: TempFile,
    name: String,
}

impl BlobWriter {
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.file.write_all(bytes)
    }

    pub fn commit(self) -> Result<(), Error> {
        self.file.persist(&self.name)
    }
}

/// Reads the regular file `relative` of `dir`, refusing more than `limit` bytes.
fn read_limited(dir: &Dir, relative: &Path, limit: u64) -> Result<Vec<u8>, Error> {
    let mut bytes = Vec::new();
    dir.open_file(relative)?
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::Read)?;
    if bytes.len() as u64 > limit {
        return Err(Error::Layout {
            path: dir.display_path(relative),
            reason: format!("it is larger than {limit} bytes"),
        });
    }
    Ok(bytes)
}

/// Refuses a layout holding a symlink anywhere custody reads or writes:
/// its top level, `blobs/` and each `blobs/<algorithm>/`.
fn refuse_symlinks(dir: &Dir) -> Result<(), Error> {
    let check = |dir: &Dir| -> Result<Vec<std::ffi::OsString>, Error> {
        let mut subdirs = Vec::new();
        for (name, kind) in dir.entries()? {
            match kind {
                Kind::Symlink => {
                    return Err(Error::Symlink {
                        path: dir.display_path(Path::new(&name)),
                    });
                }
                Kind::Dir => subdirs.push(name),
                _ => {}
            }
        }
        Ok(subdirs)
    };
    if check(dir)?.iter().any(|name| name == "blobs") {
        let blobs = dir.open_dir(Path::new("blobs"))?;
        for algorithm in check(&blobs)? {
            check(&blobs.open_dir(Path::new(&algorithm))?)?;
        }
    }
    Ok(())
}

/// An error opening a layout's root, said as such.
fn not_a_layout(root: &Path, error: Error) -> Error {
    match error {
        Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound => Error::Layout {
            path: root.to_owned(),
            reason: "no such directory".into(),
        },
        other => other,
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
