//! # mbank-memfs
//!
//! A FUSE file system that holds one file: a guest's RAM, served lazily. QEMU maps it
//! with `-object memory-backend-file,share=on,mem-path=<mount>/<name>` and `-machine
//! memory-backend=…`; with the migration capability `x-ignore-shared` the migration
//! stream then carries only device state, and a resumed guest faults its memory in
//! from here as it touches it (ARCHITECTURE.md, "Lazy memory: evaluation", has the
//! measurements that chose this path).
//!
//! ## What it owns
//!
//! A [`MemImage`]: the RAM cut into fixed-size chunks ([`Layout`]), each either
//! *absent* (only in the base: the station cache or the bank), *being fetched*, or
//! *ready* in the session's **overlay**, a sparse file as long as the RAM. A chunk the
//! version's index elides as zero starts ready (a hole in the overlay reads as
//! zeros): it costs no fetch.
//!
//! - **Read** (a page fault in QEMU becomes a FUSE READ of the `max_readahead` window
//!   around it, one chunk by default; but QEMU advises guest RAM `MADV_HUGEPAGE`, and
//!   for such a mapping the kernel reads a 4 MiB window, 2 MiB aligned, in requests of
//!   1 MiB, whatever `max_readahead` says: start QEMU under
//!   `mbank_vm::thp::HugePageAdvice::Ignore`, as `mbank run` does):
//!   the chunks it touches that nobody fetches yet are made ready by one
//!   [`Fetcher::fetch_many`] (one batch per read), whose bytes are written into the
//!   overlay, then the read is served from the overlay. One fetch per chunk is in
//!   flight: a second reader waits for it (a *fault waited*, counted).
//! - **Write** (the kernel writes back pages the guest dirtied, or `fsync`): a chunk
//!   written only in part is fetched first, a chunk written whole is not; the bytes go
//!   to the overlay and the chunk's bit in the **dirty map** is set. A suspend stores
//!   [`MemImage::dirty_chunks`] only.
//! - **fsync** of the file: the kernel first writes back every dirty page of the file
//!   (also those dirtied through QEMU's shared mapping), then the overlay is synced.
//!   A suspend must fsync the FUSE file after `stop` and before it reads the dirty map.
//! - [`MemImage::prefetch`] fetches ahead of the guest (the recorded working set, then
//!   the rest); a guest fault on a chunk being prefetched joins that fetch.
//! - [`Counters`]: chunks and bytes fetched, faults waited, dirty chunks, reads (and
//!   the largest), writes; [`MemImage::read_log`] the first reads' offsets and lengths.
//!
//! The chunk size is the caller's: ARCHITECTURE.md ("Lazy memory: evaluation")
//! measured 64 KiB to 2 MiB and chose 64 KiB: small chunks keep the dirty set of a
//! suspend small, and without the huge-page read-around a fault fetches one or two.
//!
//! ## Invariants
//!
//! - A chunk is ready only once its whole content is in the overlay (fetched and
//!   written, or written whole by the guest): a reader never sees a half-filled chunk.
//! - A fetch is checked for length; the fetcher verifies content (the station's cache
//!   and the bank hash every chunk they hand out).
//! - A dirty bit is set only after its bytes are in the overlay, and is never cleared
//!   here (a later step clears it after a committed suspend).
//!
//! ## Errors and crashes
//!
//! A fetch that fails answers `EIO`, which the kernel turns into `SIGBUS` in QEMU: a
//! [`Fetcher`] should retry a transient failure (a bank restarting) and stall the
//! guest, not fail. The message is kept in [`Counters::last_error`], naming the chunk.
//! The dirty map lives in memory: after a crash of the station the overlay file is all
//! that is left, and the version's memory is the last suspended one (this prototype
//! does not yet journal the dirty map as the disk's session does).
//! Locks: one mutex over the chunk states and the dirty map, never held across a
//! fetch or file I/O of a chunk.
//!
//! ## Mounting
//!
//! As root, `mount(2)` directly; otherwise `fusermount3`. Served by a few threads of
//! this process ([`MemMount::mount`]), so a fault in one place does not wait behind a
//! fetch for another.

mod fs;
mod image;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use image::{Layout, MemImage};

/// Starts writing back every page dirtied through a mapping of the mounted RAM `file`
/// to the image and waits for it (`sync_file_range`), without syncing the overlay: a
/// background write-back of a running guest's RAM calls it before
/// [`MemImage::take_changed`]. The guest's next write to such a page faults once.
pub fn write_out(file: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let err = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot write out the guest RAM file {}: {e}",
                file.display()
            ),
        )
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(file)
        .map_err(err)?;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: the descriptor is open for the call; the range 0..0 means the whole file.
    if unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Where the chunks of a memory image come from (the station plugs in its cache and
/// the bank). Called from the FUSE threads, at most once at a time per chunk.
pub trait Fetcher: Send + Sync + 'static {
    /// The bytes of chunk `chunk` (exactly [`Layout::chunk_len`] of them), verified.
    /// Never called for a chunk the index elides as zero.
    fn fetch(&self, chunk: usize) -> Result<Vec<u8>, FetchError>;

    /// The bytes of each of `chunks` (a FUSE read's absent chunks, in order), one
    /// outcome per chunk. A fetcher over a remote bank should get them in one request;
    /// by default they are fetched one by one.
    fn fetch_many(&self, chunks: &[usize]) -> Vec<Result<Vec<u8>, FetchError>> {
        chunks.iter().map(|&c| self.fetch(c)).collect()
    }
}

/// A fetcher's failure, in its own words (which chunk, which store, what to do).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    /// What went wrong.
    pub message: String,
}

impl FetchError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> FetchError {
        FetchError {
            message: message.into(),
        }
    }
}

/// What can go wrong with a memory image.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The size, chunk size or index do not fit together.
    #[error("invalid memory image: {0}")]
    Layout(String),
    /// A chunk could not be fetched; the guest sees an I/O error (SIGBUS in QEMU).
    #[error("cannot fetch memory chunk {chunk}: {source}")]
    Fetch {
        /// The chunk's number in the image.
        chunk: usize,
        /// The fetcher's error.
        source: FetchError,
    },
    /// The overlay file failed (disk full, I/O error).
    #[error("memory overlay {path}: {source} (check the station's cache file system)")]
    Overlay {
        /// The overlay file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A write past the end of the RAM.
    #[error("write of {len} bytes at {offset} is past the end of the {size}-byte RAM")]
    OutOfRange {
        /// Where the write started.
        offset: u64,
        /// How many bytes it had.
        len: u64,
        /// The RAM size.
        size: u64,
    },
}

/// What a memory image did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Chunks in the image.
    pub chunks: u64,
    /// Chunks ready in the overlay (zero, fetched or written whole).
    pub chunks_ready: u64,
    /// Chunks fetched through the [`Fetcher`].
    pub chunks_fetched: u64,
    /// Bytes fetched through the [`Fetcher`].
    pub bytes_fetched: u64,
    /// Read requests (a fault's read-around) and partial writes that waited for a
    /// fetch, counted once per chunk they waited on.
    pub faults_waited: u64,
    /// Fetches started by [`MemImage::prefetch`].
    pub prefetched: u64,
    /// Chunks fetched by read-ahead, in the batch of a sequential fault.
    pub read_ahead: u64,
    /// Reads being served now: a guest stalled on a fetch (an unreachable bank) shows
    /// here.
    pub reads_in_flight: u64,
    /// Fetches that failed.
    pub fetch_errors: u64,
    /// Read requests served.
    pub reads: u64,
    /// Bytes they returned.
    pub bytes_read: u64,
    /// The longest read request (the kernel's read-around window, or its request
    /// size when the window is split).
    pub largest_read: u64,
    /// Write requests served.
    pub writes: u64,
    /// Bytes they wrote.
    pub bytes_written: u64,
    /// Chunks with their dirty bit set.
    pub dirty_chunks: u64,
    /// The last error answered to the kernel, if any.
    pub last_error: Option<String>,
}

/// Options for [`MemMount::mount`].
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The file's name in the mount (default `ram`).
    pub name: OsString,
    /// FUSE threads serving requests (default 4).
    pub threads: usize,
    /// The kernel's read-ahead (and so mmap read-around) window in bytes; `None`:
    /// one chunk. Larger windows fetch chunks the guest may never touch.
    pub readahead: Option<u32>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            name: "ram".into(),
            threads: 4,
            readahead: None,
        }
    }
}

/// A mounted memory file system. Unmounted (lazily) when dropped.
pub struct MemMount {
    image: Arc<MemImage>,
    dir: PathBuf,
    file: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl MemMount {
    /// Mounts `image` on `dir` (an existing empty directory), served by threads of
    /// this process. The file is `dir/<opts.name>`, owned by the caller.
    pub fn mount(dir: &Path, image: Arc<MemImage>, opts: MountOptions) -> io::Result<MemMount> {
        // SAFETY: getuid and getgid only read the process's credentials.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let fs = fs::MemFs {
            image: image.clone(),
            name: opts.name.clone(),
            uid,
            gid,
            made: std::time::SystemTime::now(),
            readahead: opts.readahead.unwrap_or(image.layout().chunk_size),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("mbank-memfs".into()),
            fuser::MountOption::Subtype("mbank-memfs".into()),
        ];
        config.n_threads = Some(opts.threads.max(1));
        config.clone_fd = true;
        let session = fuser::spawn_mount(fs, dir, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot mount the memory file system on {}: {e} (it needs /dev/fuse, and root or fusermount3)",
                    dir.display()
                ),
            )
        })?;
        Ok(MemMount {
            image,
            dir: dir.to_path_buf(),
            file: dir.join(&opts.name),
            session: Some(session),
        })
    }

    /// The image served.
    pub fn image(&self) -> &Arc<MemImage> {
        &self.image
    }

    /// The RAM file's path, for QEMU's `mem-path`.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Hands every page dirtied through a mapping of the file back to the image and
    /// syncs the overlay (an `fsync` of the FUSE file). Call it after QEMU's `stop`.
    pub fn sync(&self) -> io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .open(&self.file)
            .and_then(|f| f.sync_all().map(|_| f));
        f.map(drop).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot sync the guest RAM file {}: {e}",
                    self.file.display()
                ),
            )
        })
    }

    /// [`write_out`] of the file.
    pub fn write_out(&self) -> io::Result<()> {
        write_out(&self.file)
    }

    /// Unmounts lazily: processes that still map the file get errors, and the serving
    /// threads end when the last of them is gone.
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

impl Drop for MemMount {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

#[cfg(test)]
mod tests;
