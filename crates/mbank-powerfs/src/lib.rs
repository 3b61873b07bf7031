//! # mbank-powerfs
//!
//! A FUSE file system for tests that can lose what was not synced, as a power cut
//! would: the station's power-loss test runs `mbank attach --cache` on it, cuts the
//! power at a random point, and checks that recovery from what survived keeps every
//! flush the station acknowledged. This kernel has no device-mapper (no dm-flakey or
//! dm-log-writes), hence a file system of our own. Not for production data: it keeps
//! everything in memory.
//!
//! ## Semantics
//!
//! The file system keeps two states in memory ([`model::Model`]): the **volatile
//! view**, which every process sees, and the **durable state**, what survives a cut.
//!
//! | what | becomes durable on |
//! | --- | --- |
//! | a file's data (4 KiB pages), size, holes | `fsync`/`fdatasync` of that file |
//! | a directory's entries (create, mkdir, rename, unlink, rmdir) | `fsync` of that directory ([`Metadata::Posix`]), or any sync in the file system ([`Metadata::Journal`]) |
//! | everything | [`PowerMount::sync_all`] (a clean shutdown) |
//!
//! [`Metadata::Posix`] is what POSIX promises and so all a careful program may count
//! on: a new file's name needs an fsync of its directory, and a new directory's name
//! one of its parent. [`Metadata::Journal`] is how ext4 and XFS behave in practice:
//! their one journal commits every earlier namespace change with any fsync. Neither
//! orders data with names: a file renamed into place without an fsync of its data
//! may be found with its new name and no data (ext4 without `auto_da_alloc`).
//!
//! **A cut** ([`PowerMount::cut`], `SIGUSR1` to the binary, or by itself after
//! [`Options::cut_after`] operations) makes every later operation fail with `EIO` and
//! freezes the durable state. By default everything unsynced is lost; with
//! [`Options::keep_unsynced`], each unsynced page, file size and directory is kept
//! with probability 1/2 (seeded, so a failure replays), as a disk writes back part of
//! its cache before the power goes: then what a program synced must still be there
//! whatever else survived. [`PowerMount::dump`] writes the durable state to a real
//! directory (sparse files keep their holes), where recovery can run.
//!
//! Supported: regular files and directories, `read`/`write`/`ftruncate`,
//! `fallocate` mode 0 and `FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE` (other modes:
//! `EOPNOTSUPP`), `rename` (and `RENAME_NOREPLACE`), shared writable `mmap` (through
//! the kernel's page cache, as SQLite's WAL index needs). POSIX locks are the kernel's
//! (not forwarded). No links, symlinks, device files or extended attributes.
//!
//! Memory is proportional to the data written (pages of 4 KiB, kept while a durable
//! or volatile name may reach them), not to file sizes: a sparse overlay of a large
//! disk costs only its written pages.
//!
//! ## Mounting
//!
//! As root, `mount(2)` directly; otherwise `fusermount3` (Debian's `fuse3`), which
//! the tests do not need because they run as root.

pub mod model;

mod fs;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use model::{Metadata, Model, Options};

/// A mounted power-fail file system. Unmounted (lazily) when dropped.
pub struct PowerMount {
    model: Arc<Mutex<Model>>,
    dir: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl PowerMount {
    /// Mounts an empty file system on `dir` (an existing directory), served by a
    /// thread of this process.
    pub fn mount(dir: &Path, opts: Options) -> io::Result<PowerMount> {
        let model = Arc::new(Mutex::new(Model::new(opts)));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("mbank-powerfs".into()),
            fuser::MountOption::Subtype("mbank-powerfs".into()),
        ];
        let session = fuser::spawn_mount(fs::PowerFs::new(model.clone()), dir, &config)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot mount the power-fail file system on {}: {e} (it needs /dev/fuse, and root or fusermount3)",
                        dir.display()
                    ),
                )
            })?;
        Ok(PowerMount {
            model,
            dir: dir.to_path_buf(),
            session: Some(session),
        })
    }

    fn m(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where it is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Cuts the power (see the crate docs). Repeating it does nothing.
    pub fn cut(&self) {
        self.m().cut();
    }

    /// Cuts the power by itself after `n` more changing or syncing operations: the
    /// one after them fails with EIO, and so does every later one.
    pub fn cut_after(&self, n: u64) {
        self.m().cut_after(n);
    }

    /// True once the power was cut (by [`PowerMount::cut`] or by itself).
    pub fn is_cut(&self) -> bool {
        self.m().is_cut()
    }

    /// Changing and syncing operations served so far.
    pub fn ops(&self) -> u64 {
        self.m().ops()
    }

    /// Makes everything durable, as a clean shutdown would.
    pub fn sync_all(&self) -> io::Result<()> {
        self.m()
            .sync_all()
            .map_err(|_| io::Error::other("the power was cut: nothing can be synced"))
    }

    /// Writes the durable state under `to` (an existing empty directory).
    pub fn dump(&self, to: &Path) -> io::Result<()> {
        self.m().dump(to).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot write the durable state of {} to {}: {e}",
                    self.dir.display(),
                    to.display()
                ),
            )
        })
    }

    /// Unmounts lazily: processes that still hold files open get errors, and the
    /// serving thread ends when the last of them is gone.
    pub fn unmount(mut self) -> io::Result<()> {
        self.detach()
    }

    fn detach(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(io::Error::other)?;
        // SAFETY: umount2 reads the NUL-terminated path, which lives across the call.
        let r = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let err = (r != 0).then(io::Error::last_os_error);
        // The session's own unmount finds nothing mounted; its thread is left to end
        // when the kernel closes the connection.
        drop(session);
        match err {
            Some(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot unmount {}: {e}", self.dir.display()),
            )),
            None => Ok(()),
        }
    }
}

impl Drop for PowerMount {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}
