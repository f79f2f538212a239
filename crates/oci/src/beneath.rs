//! Files beneath a directory, reached without ever following a symlink.
//!
//! Layouts and outputs live where untrusted code can write: a build step
//! writes `/output`, a repository commits whatever it likes next to its spec.
//! A path-based `open` follows a symlink planted there (`blobs/sha256 ->
//! /etc/cron.d`) and writes outside. Every operation here starts from an
//! open directory handle and resolves with `openat2(2)`'s
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so no component of the path may
//! be a symlink and nothing can climb out; kernels without `openat2` get the
//! same by opening one component at a time with `O_NOFOLLOW`. New files are
//! created with `O_EXCL` under a fresh name and renamed into place (a
//! rename replaces a symlink, it never writes through one); only regular
//! files are ever read, so a FIFO cannot hang the reader.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, AtFlags, CWD, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::Error;

/// What a name in a directory is, without following it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device: never read.
    Other,
}

/// An open directory; everything below it is reached through it.
#[derive(Clone, Debug)]
pub struct Dir {
    fd: Arc<OwnedFd>,
    /// For messages only: operations never use it.
    path: PathBuf,
}

impl Dir {
    /// Opens the directory `path` (absolute, or relative to the working
    /// directory); no component of it may be a symlink.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let fd = resolve(
            CWD,
            path,
            OFlags::DIRECTORY | OFlags::RDONLY,
            Resolution::NoSymlinks,
        )
        .map_err(|e| error(path, e))?;
        Ok(Self {
            fd: Arc::new(fd),
            path: path.to_owned(),
        })
    }

    /// Opens `path`, creating the directories that are missing (mode
    /// 0755); no existing component may be a symlink.
    pub fn create_all(path: &Path) -> Result<Self, Error> {
        let start = if path.is_absolute() { "/" } else { "." };
        let base = Self::open(Path::new(start))?;
        let relative: PathBuf = path
            .components()
            .filter(|c| !matches!(c, Component::RootDir))
            .collect();
        let mut dir = base;
        for component in relative.components() {
            let name = component.as_os_str();
            dir = match component {
                Component::CurDir => dir,
                // `..` is a real directory, never a link; it is only
                // allowed here, in a path the caller chose.
                Component::ParentDir => dir.step(Path::new(".."), false)?,
                _ => dir.step(Path::new(name), true)?,
            };
        }
        Ok(Self {
            fd: dir.fd,
            path: path.to_owned(),
        })
    }

    /// The same directory, named `shown` in messages (`/output` for the
    /// runner's copy of a step's output directory).
    pub fn named(self, shown: impl Into<PathBuf>) -> Self {
        Self {
            fd: self.fd,
            path: shown.into(),
        }
    }

    /// Where this directory is, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()` joined with `relative`, for messages.
    pub fn display_path(&self, relative: &Path) -> PathBuf {
        self.path.join(relative)
    }

    /// Opens the directory `relative` beneath this one.
    pub fn open_dir(&self, relative: &Path) -> Result<Self, Error> {
        let fd = self.resolve(relative, OFlags::DIRECTORY | OFlags::RDONLY)?;
        Ok(Self {
            fd: Arc::new(fd),
            path: self.display_path(relative),
        })
    }

    /// Opens `relative`, creating the directories that are missing.
    pub fn create_dir_all(&self, relative: &Path) -> Result<Self, Error> {
        let mut dir = self.clone();
        for component in checked_relative(relative).map_err(|e| error(relative, e))? {
            dir = dir.step(Path::new(&component), true)?;
        }
        Ok(dir)
    }

    /// One component down, creating it when `create` and it is missing.
    fn step(&self, name: &Path, create: bool) -> Result<Self, Error> {
        let flags = OFlags::DIRECTORY | OFlags::RDONLY;
        let resolution = if name == Path::new("..") {
            Resolution::NoSymlinks
        } else {
            Resolution::Beneath
        };
        let fd = match resolve(self.fd.as_fd(), name, flags, resolution) {
            Err(Errno::NOENT) if create => {
                match rfs::mkdirat(self.fd.as_fd(), name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(error(&self.display_path(name), e)),
                }
                resolve(self.fd.as_fd(), name, flags, resolution)
            }
            other => other,
        }
        .map_err(|e| error(&self.display_path(name), e))?;
        Ok(Self {
            fd: Arc::new(fd),
            path: self.display_path(name),
        })
    }

    /// Opens the regular file `relative` for reading.
    pub fn open_file(&self, relative: &Path) -> Result<File, Error> {
        // Non-blocking, so opening a FIFO returns at once; it is then
        // refused for not being a regular file. (No effect on files.)
        let fd = self.resolve(relative, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)?;
        regular(fd, &self.display_path(relative))
    }

    /// Opens the regular file `relative`, following symlinks only while they
    /// stay beneath this directory (the kernel refuses any that leave it:
    /// absolute targets, `..` above the top).
    pub fn open_file_inside(&self, relative: &Path) -> Result<File, Error> {
        checked_relative(relative).map_err(|e| error(&self.display_path(relative), e))?;
        let fd = resolve(
            self.fd.as_fd(),
            relative,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            Resolution::BeneathFollowing,
        )
        .map_err(|e| error(&self.display_path(relative), e))?;
        regular(fd, &self.display_path(relative))
    }

    /// Where the symlink `relative` points, for messages.
    pub fn link_target(&self, relative: &Path) -> Option<PathBuf> {
        let parent = relative.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = match parent {
            Some(parent) => self.open_dir(parent).ok()?,
            None => self.clone(),
        };
        let target = rfs::readlinkat(dir.fd.as_fd(), relative.file_name()?, Vec::new()).ok()?;
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(
            target.as_bytes(),
        )))
    }

    /// What `relative` is, without following it; `None` when it does not
    /// exist. A symlink on the way is an error.
    pub fn kind(&self, relative: &Path) -> Result<Option<Kind>, Error> {
        match self.resolve_raw(relative, OFlags::PATH | OFlags::NOFOLLOW) {
            Ok(fd) => {
                let stat = rfs::fstat(&fd).map_err(|e| error(&self.display_path(relative), e))?;
                Ok(Some(kind_of(FileType::from_raw_mode(stat.st_mode))))
            }
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(error(&self.display_path(relative), e)),
        }
    }

    /// Whether `relative` is a regular file (a symlink is not).
    pub fn is_file(&self, relative: &Path) -> bool {
        matches!(self.kind(relative), Ok(Some(Kind::File)))
    }

    /// The names in this directory and what each is.
    pub fn entries(&self) -> Result<Vec<(OsString, Kind)>, Error> {
        let failed = |e| error(&self.path, e);
        let mut entries = Vec::new();
        for entry in rfs::Dir::read_from(self.fd.as_fd()).map_err(failed)? {
            let entry = entry.map_err(failed)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsString::from(std::ffi::OsStr::from_bytes(name));
            let kind = match entry.file_type() {
                FileType::Unknown => {
                    let stat = rfs::statat(self.fd.as_fd(), &name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(failed)?;
                    kind_of(FileType::from_raw_mode(stat.st_mode))
                }
                other => kind_of(other),
            };
            entries.push((name, kind));
        }
        Ok(entries)
    }

    /// A new, empty file in this directory under a fresh name; it is
    /// removed unless [`TempFile::persist`] moves it into place.
    pub fn create_temp(&self, prefix: &str) -> Result<TempFile, Error> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let name = format!(
                "{prefix}{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
            match self.resolve_raw(Path::new(&name), flags) {
                Ok(fd) => {
                    return Ok(TempFile {
                        dir: self.clone(),
                        name: Some(name),
                        file: File::from(fd),
                    });
                }
                // Someone (a step) took that name: take another.
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(error(&self.display_path(Path::new(&name)), e)),
            }
        }
    }

    /// Replaces the file `name` in this directory with `bytes`, atomically.
    pub fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        let mut temp = self.create_temp(&format!(".{name}.tmp-"))?;
        temp.write_all(bytes)?;
        temp.persist(name)
    }

    fn resolve(&self, relative: &Path, flags: OFlags) -> Result<OwnedFd, Error> {
        self.resolve_raw(relative, flags)
            .map_err(|e| error(&self.display_path(relative), e))
    }

    fn resolve_raw(&self, relative: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
        checked_relative(relative)?;
        resolve(self.fd.as_fd(), relative, flags, Resolution::Beneath)
    }
}

/// `fd` as a file, if it is a regular one.
fn regular(fd: OwnedFd, shown: &Path) -> Result<File, Error> {
    let stat = rfs::fstat(&fd).map_err(|e| error(shown, e))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(Error::Io(io::Error::other(format!(
            "`{}` is not a regular file",
            shown.display()
        ))));
    }
    Ok(File::from(fd))
}

/// A file being written under a temporary name in a [`Dir`].
pub struct TempFile {
    dir: Dir,
    /// `None` once persisted.
    name: Option<String>,
    file: File,
}

impl TempFile {
    /// Writes all of `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::Io(io::Error::new(e.kind(), self.describe(e))))
    }

    /// Writes all of `pieces`, in order, with as few system calls as the
    /// kernel allows (`writev`).
    pub fn write_all_vectored(&mut self, pieces: &[&[u8]]) -> Result<(), Error> {
        let mut slices: Vec<io::IoSlice<'_>> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            match self.file.write_vectored(slices) {
                Ok(0) => {
                    let e = io::Error::from(io::ErrorKind::WriteZero);
                    return Err(Error::Io(io::Error::new(e.kind(), self.describe(e))));
                }
                Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(io::Error::new(e.kind(), self.describe(e)))),
            }
        }
        Ok(())
    }

    /// Moves the file to `name` in its directory, replacing what was there
    /// (a symlink is replaced, not followed).
    pub fn persist(self, name: &str) -> Result<(), Error> {
        self.rename_to(name, rfs::RenameFlags::empty())
    }

    /// Moves the file to `name` in its directory only if nothing is there
    /// (`RENAME_NOREPLACE`): an existing name is an `AlreadyExists` error
    /// and the temporary file goes.
    pub fn persist_new(self, name: &str) -> Result<(), Error> {
        self.rename_to(name, rfs::RenameFlags::NOREPLACE)
    }

    /// Renames the temporary file to the plain file name `name` beside it;
    /// on failure the temporary file goes.
    fn rename_to(mut self, name: &str, flags: rfs::RenameFlags) -> Result<(), Error> {
        let target = Path::new(name);
        if target.components().count() != 1 || name == ".." || name == "." {
            return Err(Error::Io(io::Error::other(format!(
                "`{name}` is not a plain file name"
            ))));
        }
        let temp = self
            .name
            .take()
            .expect("a temporary file is persisted once");
        rfs::renameat_with(
            self.dir.fd.as_fd(),
            &temp,
            self.dir.fd.as_fd(),
            target,
            flags,
        )
        .map_err(|e| {
            let _ = rfs::unlinkat(self.dir.fd.as_fd(), &temp, AtFlags::empty());
            error(&self.dir.display_path(target), e)
        })
    }

    fn describe(&self, e: io::Error) -> String {
        let name = self.name.as_deref().unwrap_or("?");
        format!(
            "failed to write `{}`: {e}",
            self.dir.display_path(Path::new(name)).display()
        )
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let _ = rfs::unlinkat(self.dir.fd.as_fd(), name.as_str(), AtFlags::empty());
        }
    }
}

/// Opens the regular file `path` for reading; no component of the path may
/// be a symlink.
pub fn open_file(path: &Path) -> Result<File, Error> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::Io(io::Error::other(format!(
            "`{}` is not a file",
            path.display()
        )))
    })?;
    Dir::open(parent)?.open_file(Path::new(name))
}

/// How far resolution may go.
#[derive(Clone, Copy)]
enum Resolution {
    /// No symlink anywhere, and never above the starting directory.
    Beneath,
    /// No symlink anywhere (for a path the caller chose, which may start at `/`).
    NoSymlinks,
    /// Symlinks followed while they stay beneath the starting directory.
    BeneathFollowing,
}

fn resolve(
    start: impl AsFd,
    path: &Path,
    flags: OFlags,
    resolution: Resolution,
) -> Result<OwnedFd, Errno> {
    let how = match resolution {
        Resolution::Beneath => {
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
        }
        Resolution::NoSymlinks => ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        Resolution::BeneathFollowing => ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    };
    // openat2 refuses a mode unless it creates the file.
    let mode = if flags.contains(OFlags::CREATE) {
        Mode::from_raw_mode(0o644)
    } else {
        Mode::empty()
    };
    match rfs::openat2(&start, path, flags | OFlags::CLOEXEC, mode, how) {
        // Old kernels: no link at all is followed, which is stricter.
        Err(Errno::NOSYS) => resolve_by_components(start, path, flags, mode),
        other => other,
    }
}

/// `openat2` for kernels before 5.6: one component at a time, each opened
/// with `O_NOFOLLOW`.
fn resolve_by_components(
    start: impl AsFd,
    path: &Path,
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let components: Vec<Component<'_>> = path.components().collect();
    let mut current: Option<OwnedFd> = None;
    let directory = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for (i, component) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let name: &Path = match component {
            Component::RootDir => Path::new("/"),
            Component::CurDir => Path::new("."),
            Component::ParentDir => Path::new(".."),
            Component::Normal(name) => Path::new(*name),
            Component::Prefix(_) => return Err(Errno::INVAL),
        };
        let at = current.as_ref().map_or(start.as_fd(), |fd| fd.as_fd());
        let opened = if last {
            rfs::openat(at, name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode)?
        } else {
            rfs::openat(at, name, directory, Mode::empty())?
        };
        current = Some(opened);
    }
    match current {
        Some(fd) => Ok(fd),
        None => rfs::openat(start, ".", flags | OFlags::CLOEXEC, mode),
    }
}

/// The components of a path meant to stay beneath a directory: relative,
/// without `..`.
fn checked_relative(relative: &Path) -> Result<Vec<OsString>, Errno> {
    relative
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| match c {
            Component::Normal(name) => Ok(name.to_owned()),
            _ => Err(Errno::XDEV),
        })
        .collect()
}

fn kind_of(file_type: FileType) -> Kind {
    match file_type {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// The error for `errno` at `path`: symlinks and escapes get their own.
fn error(path: &Path, errno: Errno) -> Error {
    match errno {
        // ELOOP: a symlink where none may be; EXDEV: a path that would
        // leave the directory (`..`, or an absolute path).
        Errno::LOOP | Errno::XDEV => Error::Symlink {
            path: path.to_owned(),
        },
        other => Error::Io(io::Error::new(
            io::Error::from(other).kind(),
            format!("`{}`: {}", path.display(), io::Error::from(other)),
        )),
    }
}
