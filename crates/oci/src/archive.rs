//! `docker save` archives as an image source.
//!
//! The archive's `manifest.json` names a config file and layer files. They are
//! read in place: each becomes a byte range of the tar file, so pushing one
//! streams straight from the archive without unpacking it. custody presents
//! the image with an OCI manifest; the config bytes are kept as they are, so
//! the image's config digest (its ID) does not change.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use fs_err as fs;
use oci_spec::image::{Descriptor, MediaType};
use serde::Deserialize;

use crate::Error;
use crate::digest::{self, DigestAlgorithm, Hasher};

/// A file inside the archive: where its bytes start and how many there are.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// The one image of a docker-save archive, described as OCI content.
#[derive(Debug)]
pub struct DockerArchive {
    pub path: PathBuf,
    /// The archive, opened once (never through a symlink); blobs are read
    /// from it at their offsets.
    pub file: std::sync::Arc<std::fs::File>,
    /// The generated OCI manifest, as the exact bytes that will be pushed.
    pub manifest: Vec<u8>,
    pub manifest_descriptor: Descriptor,
    pub config: Vec<u8>,
    /// Where each layer blob lives in the tar, by digest.
    pub blobs: HashMap<String, Range>,
    pub repo_tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl DockerArchive {
    /// Reads the archive's index of files and hashes its layers (blocking).
    /// No component of `path` may be a symlink.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::from_file(path, crate::beneath::open_file(path)?)
    }

    /// Reads the archive `file` (found at `path`, for messages).
    pub fn from_file(path: &Path, file: std::fs::File) -> Result<Self, Error> {
        let bad = |reason: String| Error::Archive {
            path: path.to_owned(),
            reason,
        };
        let mut file = fs::File::from_parts(file, path);
        let mut magic = [0u8; 2];
        if file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b] {
            return Err(bad(
                "it is gzip-compressed; `docker save` archives are plain tar (gunzip it first)"
                    .into(),
            ));
        }
        file.seek(SeekFrom::Start(0)).map_err(Error::Read)?;
        let files = members(file.file_mut()).map_err(bad)?;

        let read_member = |file: &mut fs::File, name: &str, limit: u64| -> Result<Vec<u8>, Error> {
            let range = files
                .get(name.trim_start_matches("./"))
                .ok_or_else(|| bad(format!("it has no `{name}`")))?;
            if range.len > limit {
                return Err(bad(format!("`{name}` is larger than {limit} bytes")));
            }
            let mut bytes = vec![0; range.len as usize];
            file.seek(SeekFrom::Start(range.offset))
                .map_err(Error::Read)?;
            file.read_exact(&mut bytes).map_err(Error::Read)?;
            Ok(bytes)
        };

        let manifest_json =
            read_member(&mut file, "manifest.json", crate::layout::MAX_MANIFEST_SIZE)?;
        let mut images: Vec<ArchiveManifest> = serde_json::from_slice(&manifest_json)
            .map_err(|e| bad(format!("its manifest.json is not valid: {e}")))?;
        let image = match images.len() {
            1 => images.remove(0),
            0 => return Err(bad("its manifest.json lists no image".into())),
            n => {
                return Err(bad(format!(
                    "it holds {n} images; custody reads archives of one image (save them one at a time)"
                )));
            }
        };

        let config = read_member(&mut file, &image.config, crate::layout::MAX_MANIFEST_SIZE)?;
        let config_descriptor = descriptor(
            MediaType::ImageConfig,
            digest::sha256(&config),
            config.len() as u64,
        );

        let mut blobs = HashMap::new();
        let mut layers = Vec::new();
        for name in &image.layers {
            let range = *files.get(name.trim_start_matches("./")).ok_or_else(|| {
                bad(format!(
                    "its manifest.json names layer `{name}`, which the archive does not hold"
                ))
            })?;
            let (digest, media_type) = hash_range(&mut file, range)?;
            blobs.insert(digest.to_string(), range);
            layers.push(descriptor(media_type, digest, range.len));
        }

        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(config_descriptor)
            .layers(layers)
            .build()
            .expect("every required manifest field is set");
        let manifest_bytes = serde_json::to_vec(&manifest).expect("a manifest serialises");
        let manifest_descriptor = descriptor(
            MediaType::ImageManifest,
            digest::sha256(&manifest_bytes),
            manifest_bytes.len() as u64,
        );
        Ok(Self {
            path: path.to_owned(),
            file: std::sync::Arc::new(file.into_parts().0),
            manifest: manifest_bytes,
            manifest_descriptor,
            config,
            blobs,
            repo_tags: image.repo_tags.unwrap_or_default(),
        })
    }
}

/// Where each regular file of the tar `file` is, by name.
fn members(file: &mut std::fs::File) -> Result<HashMap<String, Range>, String> {
    let mut files = HashMap::new();
    // The archive borrows the file only while its index is read.
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|e| format!("it is not a tar archive: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("it is not a readable tar archive: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| format!("an entry has an unreadable name: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        files.insert(
            name,
            Range {
                offset: entry.raw_file_position(),
                len: entry.size(),
            },
        );
    }
    Ok(files)
}

/// Hashes one member and tells from its first bytes how it is compressed.
fn hash_range(file: &mut fs::File, range: Range) -> Result<(crate::Digest, MediaType), Error> {
    file.seek(SeekFrom::Start(range.offset))
        .map_err(Error::Read)?;
    let mut hasher = Hasher::new(&DigestAlgorithm::Sha256)?;
    let mut reader = file.take(range.len);
    let mut buf = vec![0; 256 * 1024];
    let mut head = Vec::new();
    loop {
        let n = reader.read(&mut buf).map_err(Error::Read)?;
        if n == 0 {
            break;
        }
        if head.len() < 4 {
            head.extend_from_slice(&buf[..n.min(4)]);
        }
        hasher.update(&buf[..n]);
    }
    let media_type = match head.as_slice() {
        [0x1f, 0x8b, ..] => MediaType::ImageLayerGzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => MediaType::ImageLayerZstd,
        _ => MediaType::ImageLayer,
    };
    Ok((hasher.finish(), media_type))
}

pub(crate) fn descriptor(media_type: MediaType, digest: crate::Digest, size: u64) -> Descriptor {
    Descriptor::new(media_type, size, digest)
}
