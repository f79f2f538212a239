//! The files of an OCI artifact, written back to a directory.
//!
//! custody pushes a build's `artifacts:` as OCI artifacts: an image
//! manifest whose layers are the files, each titled with its path in the
//! workspace (`org.opencontainers.image.title`, as oras writes and reads
//! them). Reading one back trusts nothing the registry says: every title
//! must be a plain relative path (not absolute, no `..`) before any byte is
//! written, each file is hashed while it streams and kept only if it
//! matches its descriptor, and every file is created beneath the directory
//! through [`crate::beneath`] (no symlink followed, nothing outside), never
//! over an existing file unless asked to.

use std::path::{Component, Path, PathBuf};

use futures_util::StreamExt as _;
use oci_spec::image::{Descriptor, ImageManifest};

use crate::beneath::Dir;
use crate::registry::Client;

/// The annotation that names a layer's file.
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// One file an artifact carries.
#[derive(Clone, Debug)]
pub struct ArtifactFile {
    /// Where it goes beneath the directory: checked to be a plain
    /// relative path.
    pub path: PathBuf,
    pub descriptor: Descriptor,
}

/// Why an artifact's files were not written back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    /// The manifest is not an image manifest whose layers are files.
    #[error("not an artifact of files: {reason}")]
    NotFiles { reason: String },
    /// A file name that would land outside the directory, or nowhere.
    #[error("refused file name `{name}`: {reason}")]
    UnsafeName { name: String, reason: &'static str },
    /// Two layers with one name: the second would replace the first.
    #[error("the artifact names the file `{name}` twice")]
    Duplicate { name: String },
    /// A file that is there already.
    #[error("`{}` exists already", path.display())]
    Exists { path: PathBuf },
    /// A file whose bytes could not be fetched, did not match their
    /// digest, or could not be written.
    #[error("file `{name}` was not written")]
    File {
        name: String,
        #[source]
        source: crate::Error,
    },
}

/// The files the artifact manifest `bytes` names, each name checked, in
/// layer order. Nothing is fetched.
pub fn files(bytes: &[u8]) -> Result<Vec<ArtifactFile>, ArtifactError> {
    let manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| ArtifactError::NotFiles {
            reason: format!("the manifest does not parse as an OCI image manifest: {e}"),
        })?;
    let mut files: Vec<ArtifactFile> = Vec::new();
    for (index, layer) in manifest.layers().iter().enumerate() {
        let name = layer
            .annotations()
            .as_ref()
            .and_then(|a| a.get(TITLE_ANNOTATION))
            .ok_or_else(|| ArtifactError::NotFiles {
                reason: format!(
                    "layer {index} (`{}`) has no `{TITLE_ANNOTATION}` naming its file",
                    layer.digest()
                ),
            })?;
        let path = checked_name(name)?;
        if files.iter().any(|f| f.path == path) {
            return Err(ArtifactError::Duplicate { name: name.clone() });
        }
        files.push(ArtifactFile {
            path,
            descriptor: layer.clone(),
        });
    }
    Ok(files)
}

/// `name` as a path beneath a directory: relative, every component a
/// plain name (`./` prefixes are dropped).
fn checked_name(name: &str) -> Result<PathBuf, ArtifactError> {
    let refuse = |reason| ArtifactError::UnsafeName {
        name: name.to_owned(),
        reason,
    };
    if name.contains('\0') {
        return Err(refuse("it holds a NUL byte"));
    }
    let mut path = PathBuf::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("it climbs out with `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("it is an absolute path"));
            }
        }
    }
    if path.as_os_str().is_empty() {
        return Err(refuse("it names no file"));
    }
    Ok(path)
}

/// Writes `files` of the artifact in `repository` beneath `out`, each
/// streamed from `client` and kept only once its bytes matched its
/// digest. An existing file is an error before anything is fetched,
/// unless `force` (then it is replaced, never written through). Returns
/// the paths written, beneath `out`.
pub async fn write_files(
    client: &Client,
    repository: &str,
    files: &[ArtifactFile],
    out: &Dir,
    force: bool,
) -> Result<Vec<PathBuf>, ArtifactError> {
    let failed = |file: &ArtifactFile| {
        let name = file.path.display().to_string();
        move |source| ArtifactError::File { name, source }
    };
    if !force {
        for file in files {
            if out.kind(&file.path).map_err(failed(file))?.is_some() {
                return Err(ArtifactError::Exists {
                    path: out.display_path(&file.path),
                });
            }
        }
    }
    let mut written = Vec::new();
    for file in files {
        let (parent, name) = split(&file.path);
        let dir = out.create_dir_all(parent).map_err(failed(file))?;
        let mut temp = dir.create_temp(".custody-get-").map_err(failed(file))?;
        let mut blob = client
            .blob(repository, &file.descriptor)
            .await
            .map_err(failed(file))?;
        // The stream fails at its end if the bytes did not hash to the
        // digest; the temporary file then goes with `temp`.
        while let Some(chunk) = blob.next().await {
            let chunk = chunk.map_err(failed(file))?;
            temp.write_all(&chunk).map_err(failed(file))?;
        }
        if force {
            temp.persist(name)
        } else {
            temp.persist_new(name)
        }
        .map_err(|e| match e {
            crate::Error::Io(io) if io.kind() == std::io::ErrorKind::AlreadyExists => {
                ArtifactError::Exists {
                    path: out.display_path(&file.path),
                }
            }
            other => failed(file)(other),
        })?;
        written.push(file.path.clone());
    }
    Ok(written)
}

/// A checked path's directory (possibly empty) and file name.
fn split(path: &Path) -> (&Path, &str) {
    let parent = path.parent().unwrap_or(Path::new(""));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a checked path ends in a UTF-8 name");
    (parent, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(titles: &[&str]) -> Vec<u8> {
        let layers: Vec<_> = titles
            .iter()
            .map(|title| {
                serde_json::json!({
                    "mediaType": "application/octet-stream",
                    "digest": format!("sha256:{}", "a".repeat(64)),
                    "size": 1,
                    "annotations": { TITLE_ANNOTATION: title },
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                "size": 2,
            },
            "layers": layers,
        }))
        .unwrap()
    }

    #[test]
    fn file_names_stay_beneath_the_directory() {
        let found = files(&manifest(&["a.txt", "./dist/b.bin", "c/d/e"])).unwrap();
        let paths: Vec<_> = found.iter().map(|f| f.path.clone()).collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("a.txt"),
                PathBuf::from("dist/b.bin"),
                PathBuf::from("c/d/e")
            ]
        );
        for bad in ["../evil", "a/../../evil", "/etc/x", "", ".", "./", "a\0b"] {
            let refused = files(&manifest(&[bad])).unwrap_err();
            assert!(
                matches!(refused, ArtifactError::UnsafeName { ref name, .. } if name == bad),
                "{bad:?}: {refused}"
            );
        }
        assert!(matches!(
            files(&manifest(&["a", "./a"])).unwrap_err(),
            ArtifactError::Duplicate { .. }
        ));
    }
}
