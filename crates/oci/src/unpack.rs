//! Unpacking image layers into a root filesystem, with OCI whiteouts
//! (image-spec `layer.md`, "Whiteouts").
//!
//! Layers come from images nobody vouches for, so every entry is checked
//! before it touches the disk: absolute paths and `..` components are
//! refused (an entry naming the root itself, `/` as `umoci insert DIR /`
//! writes it, escapes nothing and is skipped), and so is any entry whose path goes through a symlink already in
//! the tree (a layer that plants `etc -> /etc` and then writes `etc/passwd`
//! would otherwise write outside the root). Hard links must point inside
//! the tree the same way. Devices and FIFOs are skipped; set-id bits are
//! dropped. Owners are kept only through an [`Owners`] mapping (a step's
//! user namespace range); without one everything belongs to the unpacker.
//! [`Measured`] bounds and hashes the uncompressed stream, so a layer can be
//! checked against its `diff_id` and a decompression bomb stops at the
//! limit. This is blocking work: run it under `spawn_blocking`.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use fs_err as fs;

/// The opaque-directory marker: hide everything lower layers put here.
const OPAQUE: &str = ".wh..wh..opq";
/// The prefix of a whiteout: `.wh.NAME` deletes `NAME` from lower layers.
const WHITEOUT_PREFIX: &str = ".wh.";

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    #[error("layer entry `{entry}` is refused: {reason}")]
    Unsafe { entry: String, reason: &'static str },
    #[error("layer is not a readable tar stream: {0}")]
    Tar(#[source] std::io::Error),
    #[error("unsupported layer media type `{0}`")]
    MediaType(String),
    #[error("the image is larger than the limit of {limit} bytes uncompressed")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How a layer blob is compressed, from its media type.
pub fn decompressor<'a>(
    media_type: &str,
    blob: impl Read + 'a,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    let base = media_type.split(';').next().unwrap_or(media_type).trim();
    if base.ends_with("+gzip")
        || base.ends_with(".gzip")
        || base == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(blob)))
    } else if base.ends_with("+zstd") {
        Ok(Box::new(zstd::stream::read::Decoder::new(blob)?))
    } else if base.ends_with(".tar") || base == "application/vnd.docker.image.rootfs.diff.tar" {
        Ok(Box::new(blob))
    } else {
        Err(UnpackError::MediaType(media_type.to_owned()))
    }
}

/// Host owners for the owners a layer's entries name (`uid`, `gid` inside
/// the image); `None` leaves files to whoever unpacks.
pub type Owners<'a> = Option<&'a dyn Fn(u64, u64) -> (u32, u32)>;

/// Applies one (uncompressed) layer tar on top of `root`.
pub fn apply_layer(
    tar_stream: impl Read,
    root: &Path,
    owners: Owners<'_>,
) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(tar_stream);
    // Paths this layer itself created: an opaque marker hides lower layers
    // only, never entries of its own layer.
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw = entry.path().map_err(UnpackError::Tar)?.into_owned();
        let display = raw.display().to_string();
        if is_root(&raw) {
            continue; // the root's own entry: it is the directory unpacked into
        }
        let relative = clean(&raw).ok_or(UnpackError::Unsafe {
            entry: display.clone(),
            reason: "absolute paths and `..` are not allowed",
        })?;
        let Some(name) = relative
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
        else {
            continue; // the root itself
        };
        let parent_rel = relative.parent().unwrap_or(Path::new("")).to_owned();
        ensure_no_symlink(root, &parent_rel, &display)?;
        let parent = root.join(&parent_rel);

        if name == OPAQUE {
            if parent.is_dir() {
                for child in fs::read_dir(&parent)? {
                    let child = child?;
                    let child_rel = parent_rel.join(child.file_name());
                    if !created.contains(&child_rel) {
                        remove(&child.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(UnpackError::Unsafe {
                    entry: display,
                    reason: "a whiteout must name an entry",
                });
            }
            remove(&parent.join(hidden))?;
            continue;
        }

        let target = root.join(&relative);
        let kind = entry.header().entry_type();
        fs::create_dir_all(&parent)?;
        // What a lower layer had here is replaced, except a directory by a
        // directory (whose contents stay).
        if let Ok(existing) = std::fs::symlink_metadata(&target)
            && !(existing.is_dir() && kind.is_dir())
        {
            remove(&target)?;
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o1777;
        match kind {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target)?;
                set_mode(&target, mode | 0o700)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = fs::File::create(&target)?;
                std::io::copy(&mut entry, &mut file)?;
                set_mode(&target, mode)?;
            }
            tar::EntryType::Symlink => {
                let link = link_target(&entry, &display, "a symlink without a target")?;
                // The target is stored as is: nothing here ever follows it.
                std::os::unix::fs::symlink(link, &target)?;
            }
            tar::EntryType::Link => {
                let link = link_target(&entry, &display, "a hard link without a target")?;
                let link_rel = clean(&link).ok_or(UnpackError::Unsafe {
                    entry: display.clone(),
                    reason: "a hard link must point inside the layer",
                })?;
                ensure_no_symlink(root, &link_rel, &display)?;
                fs::hard_link(root.join(&link_rel), &target)?;
            }
            // Devices and FIFOs need privileges and no build needs them from an image.
            _ => continue,
        }
        if let Some(owners) = owners {
            let header = entry.header();
            let (uid, gid) = owners(header.uid().unwrap_or(0), header.gid().unwrap_or(0));
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid))?;
        }
        created.insert(relative);
    }
    Ok(())
}

fn link_target<R: Read>(
    entry: &tar::Entry<'_, R>,
    display: &str,
    missing: &'static str,
) -> Result<PathBuf, UnpackError> {
    entry
        .link_name()
        .map_err(UnpackError::Tar)?
        .map(|l| l.into_owned())
        .ok_or(UnpackError::Unsafe {
            entry: display.to_owned(),
            reason: missing,
        })
}

/// The path as components inside the root, or `None` if it is absolute or
/// climbs with `..`.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// Whether `path` names the root itself (`/`, `./`, `.`).
fn is_root(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::RootDir | Component::CurDir))
}

/// Refuses `relative` if any of its components is a symlink in the tree.
fn ensure_no_symlink(root: &Path, relative: &Path, entry: &str) -> Result<(), UnpackError> {
    let mut at = root.to_owned();
    for component in relative.components() {
        at.push(component);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(UnpackError::Unsafe {
                    entry: entry.to_owned(),
                    reason: "its path goes through a symlink",
                });
            }
            Ok(_) => {}
            Err(_) => break, // does not exist yet: nothing below it can be a link
        }
    }
    Ok(())
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A reader that hashes (sha256) and counts what passes through it, and
/// fails once more than `limit` bytes did.
pub struct Measured<R> {
    inner: R,
    hasher: crate::digest::Hasher,
    total: u64,
    limit: u64,
}

impl<R: Read> Measured<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            hasher: crate::digest::Hasher::new(&crate::digest::DigestAlgorithm::Sha256)
                .expect("sha256 is supported"),
            total: 0,
            limit,
        }
    }

    /// Whether the stream went past its limit.
    pub fn exceeded(&self) -> bool {
        self.total > self.limit
    }

    /// Reads what is left (a tar reader stops at its end marker), then
    /// returns the digest and size of everything that passed.
    pub fn finish(mut self) -> Result<(crate::Digest, u64), UnpackError> {
        let drained = std::io::copy(&mut self, &mut std::io::sink());
        if self.exceeded() {
            return Err(UnpackError::TooLarge { limit: self.limit });
        }
        drained.map_err(UnpackError::Tar)?;
        Ok((self.hasher.finish(), self.total))
    }
}

impl<R: Read> Read for Measured<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.exceeded() {
            return Err(std::io::Error::other(
                "the uncompressed size limit was reached",
            ));
        }
        // Never read more than one byte past the limit.
        let room = (self.limit - self.total).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.hasher.update(&buf[..n]);
        self.total += n as u64;
        if self.exceeded() {
            return Err(std::io::Error::other(
                "the uncompressed size limit was reached",
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of entries named exactly as given (the tar crate would
    /// normalise `/`), each a directory, or a file holding `x` when its
    /// name does not end in `/`.
    fn tar_of(names: &[&str]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for name in names {
            let mut header = tar::Header::new_ustar();
            let field = &mut header.as_old_mut().name;
            field[..name.len()].copy_from_slice(name.as_bytes());
            let dir = name.ends_with('/');
            header.set_entry_type(if dir {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            });
            header.set_mode(if dir { 0o755 } else { 0o644 });
            header.set_size(if dir { 0 } else { 1 });
            header.set_cksum();
            let body: &[u8] = if dir { b"" } else { b"x" };
            builder.append(&header, body).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn the_roots_own_entry_is_skipped_and_escapes_stay_refused() {
        let root = tempfile::tempdir().unwrap();
        // As `umoci insert DIR /` writes a layer: the root, then its content.
        apply_layer(
            &tar_of(&["/", "./", "etc/", "etc/x"])[..],
            root.path(),
            None,
        )
        .unwrap();
        assert_eq!(fs::read(root.path().join("etc/x")).unwrap(), b"x");
        for escape in ["/etc/y", "../y", "etc/../../y"] {
            let err = apply_layer(&tar_of(&[escape])[..], root.path(), None).unwrap_err();
            assert!(
                matches!(&err, UnpackError::Unsafe { entry, .. } if entry == escape),
                "{escape}: {err}"
            );
        }
    }
}
