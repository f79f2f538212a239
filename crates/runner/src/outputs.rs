//! What steps produced, read by the runner (never by the steps): image
//! layouts under `/output` and artifact files matched by globs in the
//! workspace. Nothing a step wrote may lead the runner outside those two
//! directories: every file is opened through the directory it belongs to
//! (see [`custody_oci::beneath`]), so a symlink that points out is refused,
//! a layout or archive under `/output` is never reached through a symlink
//! at all, and an output that was declared but never written fails.

use std::io::Seek;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use custody_oci::Location;
use custody_oci::archive::DockerArchive;
use custody_oci::beneath::Dir;
use custody_oci::copy::Source;
use custody_oci::digest::{DigestAlgorithm, Hasher};
use custody_oci::layout::Layout;
use custody_oci::oci_spec::image::{Descriptor, MediaType};

/// The artifact type of custody's file artifacts.
pub const ARTIFACT_TYPE: &str = "application/vnd.custody.artifact.v1";
/// The media type each file is stored with.
pub const FILE_MEDIA_TYPE: &str = "application/octet-stream";
/// Each file's path in the workspace, as OCI artifact tools read it.
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// How steps see their output directory.
const OUTPUT: &str = "/output";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    #[error("`{glob}` matched no file in the workspace; the build declared it as an output")]
    NothingMatched { glob: String },
    #[error("`{glob}` is not a valid glob: {detail}")]
    BadGlob { glob: String, detail: String },
    #[error("`{path}` is refused: it leads outside {dir}{}", target.as_ref().map(|t| format!(" (to `{}`)", t.display())).unwrap_or_default())]
    Escapes {
        path: String,
        dir: &'static str,
        target: Option<PathBuf>,
    },
    #[error("`{path}` is not there; the build declared it as an output")]
    Missing { path: String },
    #[error("`{path}` is not an output under /output")]
    NotAnOutput { path: String },
    #[error(transparent)]
    Oci(#[from] custody_oci::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A workspace file that goes out as part of an artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactFile {
    /// Its name in the artifact: relative to the build's directory,
    /// `/`-separated.
    pub path: String,
    /// Relative to the workspace.
    pub inside: PathBuf,
}

/// Files of the build's directory `workdir` (relative to `workspace`;
/// empty for the workspace itself) matching `globs` (`*` does not cross
/// `/`; `**` does), relative to it, sorted by path. Every glob must match
/// at least one file. A matched symlink must stay inside the workspace.
pub fn collect_files(
    workspace: &Path,
    workdir: &str,
    globs: &[String],
) -> Result<Vec<ArtifactFile>, OutputError> {
    let dir = Dir::open(workspace)?;
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
    // The whole workspace is walked, never through a link, and only what
    // lies under the build's directory counts: a step that swapped that
    // directory for a symlink leads the walk nowhere.
    for entry in walkdir::WalkDir::new(workspace)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| std::io::Error::other(e.to_string()))?;
        let Ok(inside) = entry.path().strip_prefix(workspace) else {
            continue;
        };
        let Ok(relative) = inside.strip_prefix(workdir) else {
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
        // A link to a directory inside is no file: skip it, as before.
        match open_inside(&dir, inside) {
            Ok(_) => files.push(ArtifactFile {
                path,
                inside: inside.to_owned(),
            }),
            Err(OutputError::Oci(custody_oci::Error::Io(_))) if entry.path_is_symlink() => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(i) = matched.iter().position(|m| !m) {
        return Err(OutputError::NothingMatched {
            glob: globs[i].clone(),
        });
    }
    Ok(files)
}

/// Opens the workspace file `relative`: symlinks are followed only while
/// they stay inside.
fn open_inside(workspace: &Dir, relative: &Path) -> Result<std::fs::File, OutputError> {
    workspace.open_file_inside(relative).map_err(|e| match e {
        custody_oci::Error::Symlink { .. } => OutputError::Escapes {
            path: relative.display().to_string(),
            dir: "the workspace",
            target: workspace.link_target(relative),
        },
        other => OutputError::Oci(other),
    })
}

/// Opens the image a step declared at `from` (`oci:/output/…[:TAG]` or
/// `docker-archive:/output/…`) inside `output_dir`, the runner's copy of
/// `/output`, never through a symlink.
pub fn open_image(output_dir: &Path, from: &Location) -> Result<Source, OutputError> {
    let output = Dir::open(output_dir)?.named(OUTPUT);
    let declared = match from {
        Location::Layout { path, .. } | Location::DockerArchive { path } => path,
        Location::Registry(_) => {
            return Err(OutputError::NotAnOutput {
                path: from.to_string(),
            });
        }
    };
    let relative = declared
        .strip_prefix(OUTPUT)
        .map_err(|_| OutputError::NotAnOutput {
            path: declared.display().to_string(),
        })?;
    let missing = |e: custody_oci::Error| match e {
        custody_oci::Error::Layout { reason, .. } if reason == "no such directory" => {
            OutputError::Missing {
                path: declared.display().to_string(),
            }
        }
        custody_oci::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
            OutputError::Missing {
                path: declared.display().to_string(),
            }
        }
        other => OutputError::Oci(other),
    };
    match from {
        Location::Layout { tag, .. } => Ok(Source::Layout {
            layout: Layout::open_in(&output, relative).map_err(missing)?,
            tag: tag.clone(),
        }),
        _ => {
            let file = output.open_file(relative).map_err(missing)?;
            Ok(Source::Archive(Arc::new(DockerArchive::from_file(
                declared, file,
            )?)))
        }
    }
}

/// Writes `files` of `workspace` into `layout` as one OCI artifact (each
/// file a layer titled with its path, the empty config) tagged `tag`,
/// hashing each file as it is copied. Blocking.
pub fn write_artifact(
    workspace: &Path,
    files: &[ArtifactFile],
    layout: &Layout,
    tag: &str,
) -> Result<Descriptor, OutputError> {
    let workspace = Dir::open(workspace)?;
    let mut layers = Vec::new();
    for file in files {
        let mut reader = open_inside(&workspace, &file.inside)?;
        let (digest, size) = {
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
            reader.rewind()?;
            layout.write_blob(&descriptor, &mut reader)?;
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
