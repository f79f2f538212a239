//! A job's directory on the runner's machine, and the disk its steps write.
//!
//! ```text
//! JOB/                 root:STEPGID 0710 — only the step's own ids may pass
//!   disk.img           root 0600, a sparse file: the build's disk
//!   disk/              the disk, mounted (ext4, nosuid, nodev)
//!     workspace/       the source, then given to the step's root for it to change
//!     output/          owned by the step's root
//!     rootfs-N/        step N's image, its files owned by the step's ids
//!   runner/            root 0700: what only the runner touches (downloads, staging)
//! ```
//!
//! Where the runner is root (and so has its own mount namespace, see
//! [`crate::isolate_mounts`]), `disk/` is a filesystem of the build's disk
//! size on a loop device: a step that writes past it gets `ENOSPC` and
//! nothing outside the job fills up; it disappears with the runner's mount
//! namespace even if the runner is killed. Elsewhere `disk/` is a plain
//! directory and the limit is not enforced (the runner says so).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ids::StepIds;

/// The filesystem's own metadata takes 3.5–6% of an ext4 disk; the image
/// is made this much larger so steps get at least about the size asked for.
fn image_size(limit: u64) -> u64 {
    limit + limit / 16 + (4 << 20)
}

/// A job's directories; the disk is unmounted and removed when dropped.
#[derive(Debug)]
pub struct JobDir {
    root: PathBuf,
    /// The mounted disk, when the limit is enforced.
    mounted: Option<PathBuf>,
    pub ids: StepIds,
    pub workspace: PathBuf,
    pub output: PathBuf,
    /// Only the runner's: downloads, artifact staging.
    pub private: PathBuf,
    /// The disk limit steps run under; `None` where it is not enforced.
    pub disk_limit: Option<u64>,
}

impl JobDir {
    /// Sets up `root` (an empty directory the runner made) for a job whose
    /// steps run as `ids` with a disk of `disk_limit` bytes. Returns a note
    /// for the build log when the limit cannot be enforced here.
    pub fn create(
        root: &Path,
        ids: StepIds,
        disk_limit: u64,
    ) -> std::io::Result<(Self, Option<String>)> {
        let step_root = (ids.uid, ids.gid);
        set_owner_and_mode(root, (0, ids.gid), 0o710, ids.privileged)?;
        let disk = root.join("disk");
        fs_err::create_dir(&disk)?;
        let (mounted, note) = if !ids.privileged {
            (
                None,
                Some(format!(
                    "the build's disk limit of {} is not enforced: the runner is not root",
                    crate::human_bytes(disk_limit)
                )),
            )
        } else if !crate::mounts_isolated() {
            (
                None,
                Some(format!(
                    "the build's disk limit of {} is not enforced: the runner has no mount namespace of its own",
                    crate::human_bytes(disk_limit)
                )),
            )
        } else {
            match mount_disk(root, &disk, disk_limit, ids.gid) {
                Ok(()) => (Some(disk.clone()), None),
                Err(reason) => (
                    None,
                    Some(format!(
                        "the build's disk limit of {} is not enforced: {reason}",
                        crate::human_bytes(disk_limit)
                    )),
                ),
            }
        };
        set_owner_and_mode(&disk, (0, ids.gid), 0o710, ids.privileged)?;
        // The workspace stays the runner's until the source is in it (git
        // refuses to work in a directory someone else owns); then
        // `give_to_steps` hands it over.
        let workspace = disk.join("workspace");
        fs_err::create_dir(&workspace)?;
        set_owner_and_mode(&workspace, (0, 0), 0o755, ids.privileged)?;
        let output = disk.join("output");
        fs_err::create_dir(&output)?;
        set_owner_and_mode(&output, step_root, 0o755, ids.privileged)?;
        let private = root.join("runner");
        fs_err::create_dir(&private)?;
        fs_err::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let disk_limit = mounted.is_some().then_some(disk_limit);
        Ok((
            Self {
                root: root.to_owned(),
                mounted,
                ids,
                workspace,
                output,
                private,
                disk_limit,
            },
            note,
        ))
    }

    /// Where step `index`'s image is unpacked (on the build's disk).
    pub fn rootfs(&self, index: u32) -> PathBuf {
        self.root.join("disk").join(format!("rootfs-{index}"))
    }

    /// Whether the build's disk is (nearly) full: a step that failed then
    /// most likely failed for it.
    pub fn disk_full(&self) -> bool {
        let Some(mounted) = &self.mounted else {
            return false;
        };
        match nix::sys::statvfs::statvfs(mounted) {
            Ok(stat) => {
                let free = stat.blocks_available() * stat.fragment_size();
                free < (1 << 20) || stat.files_available() == 0
            }
            Err(_) => false,
        }
    }
}

/// Gives everything under `dir` to the steps' root (lchown: links are
/// changed, never followed), so steps can change the source. Blocking.
pub fn give_to_steps(ids: StepIds, dir: &Path) -> std::io::Result<()> {
    if !ids.privileged {
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(dir).follow_links(false) {
        let entry = entry.map_err(std::io::Error::other)?;
        std::os::unix::fs::lchown(entry.path(), Some(ids.uid), Some(ids.gid)).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot give `{}` to the step: {e}", entry.path().display()),
            )
        })?;
    }
    Ok(())
}

impl Drop for JobDir {
    fn drop(&mut self) {
        if let Some(mounted) = &self.mounted {
            // Every step process is gone by now; a lazy unmount still lets
            // go of a busy disk, and the loop device frees itself.
            let _ = nix::mount::umount2(mounted, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs_err::remove_file(self.root.join("disk.img"));
        }
    }
}

/// Makes a sparse ext4 image of the disk size and mounts it at `at`.
fn mount_disk(root: &Path, at: &Path, limit: u64, gid: u32) -> Result<(), String> {
    let image = root.join("disk.img");
    let file = fs_err::File::create(&image).map_err(|e| e.to_string())?;
    fs_err::set_permissions(&image, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    file.set_len(image_size(limit))
        .map_err(|e| format!("cannot size `{}`: {e}", image.display()))?;
    drop(file);
    // No journal and lazy inode tables: a scratch disk made in milliseconds.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
        .arg(format!("lazy_itable_init=1,root_owner=0:{gid}"))
        .arg(&image))?;
    run(Command::new("mount")
        .args(["-o", "loop,nosuid,nodev,noatime"])
        .arg(&image)
        .arg(at))?;
    // Nothing of the new filesystem but our directories.
    let _ = fs_err::remove_dir(at.join("lost+found"));
    Ok(())
}

fn run(command: &mut Command) -> Result<(), String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command
        .env("PATH", crate::sandbox::STEP_PATH)
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn set_owner_and_mode(
    path: &Path,
    (uid, gid): (u32, u32),
    mode: u32,
    privileged: bool,
) -> std::io::Result<()> {
    if privileged {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot chown `{}`: {e}", path.display()))
        })?;
    }
    // Not root: the runner's own user owns everything; only it may enter.
    let mode = if privileged { mode } else { 0o700 };
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
