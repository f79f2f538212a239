//! What steps produced, read by the runner (never by the steps): image
//! layouts under `/output` and artifact files matched by globs in the
//! workspace. Nothing a step wrote may lead the runner outside those two
//! directories: a symlink that points out is refused, and so is an output
//! that was declared but never written.

use std::path::{Path, PathBuf};

use custody_oci::digest::{DigestAlgorithm, Hasher};
use custody_oci::layout::Layout;
use custody_oci::oci_spec::image::{Descriptor, MediaType};

/// The artifact type of custody's file artifacts.
pub const ARTIFACT_TYPE: &str = "application/vnd.custody.artifact.v1";
/// The media type each file is stored with.
pub const FILE_MEDIA_TYPE: &str = "application/octet-stream";
/// Each file's path in the workspace, as OCI artifact tools read it.
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    #[error("`{glob}` matched no file in the workspace; the build declared it as an output")]
    NothingMatched { glob: String },
    #[error("`{glob}` is not a valid glob: {detail}")]
    BadGlob { glob: String, detail: String },
    #[error("`{path}` is refused: it leads outside {dir} (to `{}`)", target.display())]
    Escapes {
        path: String,
        dir: &'static str,
        target: PathBuf,
    },
    #[error("`{path}` is not there; the build declared it as an output")]
    Missing { path: String },
    #[error(transparent)]
    Oci(#[from] custody_oci::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A workspace file that goes out as part of an artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactFile {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    /// Where its bytes are (the symlink target for a link inside).
    pub source: PathBuf,
}

/// Files in `workspace` matching `globs` (`*` does not cross `/`; `**`
/// does), sorted by path. Every glob must match at least one file.
pub fn collect_files(workspace: &Path, globs: &[String]) -> Result<Vec<ArtifactFile>, OutputError> {
    let root = workspace.canonicalize()?;
    let matchers = globs
        .iter()
        .map(|g| {
            globset::GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map(|glob| glob.compile_matcher())
                .map_err(|e| OutputError::BadGlob {
                    glob: g.clone(),
                    detail: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut matched = vec![false; globs.len()];
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(&root)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| std::io::Error::other(e.to_string()))?;
        let Ok(relative) = entry.path().strip_prefix(&root) else {
            continue;
        };
        let Some(path) = relative.to_str().map(str::to_owned) else {
            continue;
        };
        if path.is_empty() || entry.file_type().is_dir() {
            continue;
        }
        let mut hit = false;
        for (i, matcher) in matchers.iter().enumerate() {
            if matcher.is_match(relative) {
                matched[i] = true;
                hit = true;
            }
        }
        if !hit {
            continue;
        }
        let source = if entry.path_is_symlink() {
            inside(&root, entry.path(), &path, "the workspace")?
        } else {
            entry.path().to_owned()
        };
        if source.is_file() {
            files.push(ArtifactFile { path, source });
        }
    }
    if let Some(i) = matched.iter().position(|m| !m) {
        return Err(OutputError::NothingMatched {
            glob: globs[i].clone(),
        });
    }
    Ok(files)
}

/// The real location of `declared` (a path as steps saw it under
/// `/output`), which must exist and stay inside `output_dir`.
pub fn output_path(output_dir: &Path, declared: &Path) -> Result<PathBuf, OutputError> {
    let relative = declared.strip_prefix("/output").unwrap_or(declared);
    let candidate = output_dir.join(relative);
    if std::fs::symlink_metadata(&candidate).is_err() {
        return Err(OutputError::Missing {
            path: declared.display().to_string(),
        });
    }
    inside(
        &output_dir.canonicalize()?,
        &candidate,
        &declared.display().to_string(),
        "/output",
    )
}

fn inside(
    root: &Path,
    path: &Path,
    shown: &str,
    dir: &'static str,
) -> Result<PathBuf, OutputError> {
    let target = path.canonicalize().map_err(|_| OutputError::Missing {
        path: shown.to_owned(),
    })?;
    if !target.starts_with(root) {
        return Err(OutputError::Escapes {
            path: shown.to_owned(),
            dir,
            target,
        });
    }
    Ok(target)
}

/// Writes `files` into `layout` as one OCI artifact (each file a layer
/// titled with its path, the empty config) tagged `tag`, hashing each file
/// as it is copied. Blocking.
pub fn write_artifact(
    files: &[ArtifactFile],
    layout: &Layout,
    tag: &str,
) -> Result<Descriptor, OutputError> {
    let mut layers = Vec::new();
    for file in files {
        let (digest, size) = {
            let mut reader = fs_err::File::open(&file.source)?;
            let mut hasher = Hasher::new(&DigestAlgorithm::Sha256)?;
            let mut buf = vec![0; 256 * 1024];
            let mut size = 0u64;
            loop {
                let n = std::io::Read::read(&mut reader, &mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            (hasher.finish(), size)
        };
        let descriptor = Descriptor::new(MediaType::from(FILE_MEDIA_TYPE), size, digest);
        if !layout.has_blob(descriptor.digest()) {
            // Checked again while copying: a file changed meanwhile is refused.
            layout.write_blob(&descriptor, fs_err::File::open(&file.source)?)?;
        }
        let mut layer = serde_json::to_value(&descriptor).expect("descriptors serialise");
        layer["annotations"] = serde_json::json!({ TITLE_ANNOTATION: file.path });
        layers.push(layer);
    }
    let empty = b"{}";
    let config = Descriptor::new(
        MediaType::from("application/vnd.oci.empty.v1+json"),
        empty.len() as u64,
        custody_oci::digest::sha256(empty),
    );
    if !layout.has_blob(config.digest()) {
        layout.write_blob(&config, &empty[..])?;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT_TYPE,
        "config": config,
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let descriptor = Descriptor::new(
        MediaType::ImageManifest,
        bytes.len() as u64,
        custody_oci::digest::sha256(&bytes),
    );
    layout.write_blob(&descriptor, bytes.as_slice())?;
    layout.add_manifest(&descriptor, Some(tag))?;
    Ok(descriptor)
}
