//! # mbank-store
//!
//! Where chunks live. [`ChunkStore`] is the one seam: [`LocalStore`] keeps chunks in a
//! directory on local disk; [`MemStore`] keeps them in memory for unit tests;
//! [`S3Store`] keeps them in an S3-compatible object store (tested against a three-node
//! Garage cluster; the bank uses it once the bank server wires it in).
//!
//! ## What a store promises
//!
//! - **Chunks are immutable and named by their content.** Writing a chunk that exists
//!   replaces it with identical bytes, so two writers storing the same chunk at once is
//!   harmless.
//! - **Reads are verified.** [`ChunkStore::read`] decodes and re-hashes every chunk; a
//!   chunk that fails is moved aside ([`ChunkStore::quarantine`]) and reported as
//!   [`StoreError::Corrupt`], never returned. A later write of the same content repairs it.
//! - **Durable before visible.** [`ChunkStore::put`] may buffer; after
//!   [`ChunkStore::flush`] returns, every chunk put before it is durable on disk and
//!   visible to every process. A version may reference a chunk only after that flush
//!   (DESIGN invariant 1).
//!
//! ## Local directory layout
//!
//! ```text
//! <bank>/chunks/00 … ff/           256 fan-out directories, by the id's first byte
//! <bank>/chunks/ab/<64 hex digits> one chunk, in the format of mbank_core::chunk
//! <bank>/chunks/ab/.tmp-<hex>-<r>  a chunk being written (not yet a chunk)
//! <bank>/corrupt/<hex>.<ms>        chunks found damaged and moved aside
//! ```
//!
//! A put writes a temp file in the chunk's fan-out directory without fsync. A flush
//! calls `syncfs` once (one flush of the whole file system is far cheaper than one fsync
//! per chunk: measured 0.2 ms against 1.1 ms per 64 KiB chunk here), then renames every
//! pending temp file into place and fsyncs each fan-out directory it touched. A crash
//! before the rename leaves only temp files, which GC removes; a crash after it leaves
//! complete chunks, because their data was on disk before their name was.
//!
//! ## Garbage collection scheme (DESIGN invariant 5)
//!
//! GC must never delete a chunk that a version, or a writer still in flight, can
//! reference. The scheme, which the bank crate drives:
//!
//! 1. Every writer (an import, later a check-in) registers in the catalog with its start
//!    time **before** it looks at the store, and unregisters after its version is
//!    committed (or it fails).
//! 2. A writer that relies on a chunk already in the store calls
//!    [`ChunkStore::touch`], which sets the chunk's mtime to now. New chunks get a fresh
//!    mtime when written. So every chunk a live writer will reference has an mtime no
//!    older than that writer's start.
//! 3. GC takes `cutoff = min(now, start of the oldest live writer) - 1 s` (the margin
//!    covers the kernel's coarse file timestamps), **then** reads every version's index
//!    to build the set of referenced chunks, **then** sweeps: it deletes a chunk only if
//!    no version references it **and** its mtime is older than `cutoff`.
//! 4. The sweep of each fan-out directory holds an exclusive `flock` on that directory;
//!    `touch` holds a shared one. So a touch either happens before GC looks at the chunk
//!    (GC sees the new mtime and keeps it) or after GC has finished with the directory
//!    (the touch sees the chunk is gone, and the writer stores it again).
//!
//! A writer that registered after GC read the writer list started after `now`, so
//! everything it touches is newer than `cutoff`. A writer that unregistered before that
//! read had already committed its version, which GC then reads in step 3. A writer that
//! died without unregistering stays "live" until the bank sees its process is gone, which
//! only makes GC keep more. Temp files older than `cutoff` are leftovers of dead writers
//! and are removed by the sweep.
//!
//! ### Forks: chunks taken from an existing version without a touch
//!
//! A fork (`create --from`) makes a version naming every chunk of its source. Step 2
//! would have it touch them all, and on S3 a touch is a copy of the object onto itself
//! (written with fsync on a quorum of nodes): a fork of a published Debian base took
//! over a minute on an idle Garage and over five through a loaded server. So a writer
//! may instead rely on the chunks of a version it read **after it registered**,
//! without touching them, under one more rule for GC:
//!
//! 5. The catalog counts every deletion of a version record and keeps the time of the
//!    last one (a trigger on the table, so no way of removing a version can miss it;
//!    `Catalog::version_removals`). GC reads the count before it reads the writer list,
//!    and the count and time again after the mark (step 3's reading of every version).
//!    It **sweeps nothing** (`GcReport::sweep_deferred`) if the count changed, or if a
//!    writer it found live started no later than 1 s after the last removal.
//!
//! Why that keeps invariant 5 ("GC never deletes what may be referenced"). Let a writer
//! W register at `s`, read version V's index at `r >= s`, and commit a version naming
//! V's chunks at `c`, without touching them; a GC G reads the count at `g0`, the writer
//! list at `g1`, marks from `g2` to `g3`, and reads the count again at `g4`. G could only
//! delete such a chunk if it is in no version G marked: V is gone by the time G's mark
//! reads it (V removed at some `v <= g3`) and W's version was not there yet (`c > g2`).
//! V existed at `r`, so `r < v`. Two cases:
//! - W registered before G read the writers (`s < g1`), and had not yet unregistered
//!   (it unregisters after `c > g2`): G found W live, and the last removal is at or after
//!   `v > r >= s`: G defers. (A W that G judged dead, its process gone or, on another
//!   host, silent past the heartbeats' limit, is assumed never to commit: step 2's
//!   touches rely on that too.)
//! - W registered after G read the writers (`s > g1 > g0`): then `v > r >= s > g0`,
//!   and `v <= g3 < g4`, so the count G read at `g4` differs from the one at `g0`: G
//!   defers.
//!
//! Either way the chunks of V stay until a GC that starts after every writer that could
//! have read V has committed (its version then marks them) or gone. The cost: one GC
//! sweeps nothing after a removal while writers older than it are in flight, such as a
//! station's session-long write-back writer; the next GC after they finish collects
//! everything. Writers that store or reuse chunks they did not read from a version (an
//! import's dedup, a check-in's `have`) still touch, as in step 2.
//!
//! | operation | may overlap with |
//! | --- | --- |
//! | put / flush | everything |
//! | touch | everything; waits while GC sweeps that fan-out directory |
//! | read | everything; a chunk GC deletes was referenced by no version |
//! | sweep | everything; a second GC only deletes what the first would |

mod local;
mod mem;
mod s3;

pub use local::LocalStore;
pub use mem::MemStore;
pub use s3::{Retry, S3Config, S3Store};

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::SystemTime;

use mbank_core::ChunkId;
use mbank_core::chunk::{self, ChunkError, EncodedChunk};

/// What went wrong in a store, on which object, and whether retrying may help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {0} is missing from the bank")]
    Missing(ChunkId),
    #[error("{source}{}", moved_to.as_ref().map(|p| format!("; moved aside to {}", p.display())).unwrap_or_default())]
    Corrupt {
        source: ChunkError,
        moved_to: Option<PathBuf>,
    },
    #[error("no space left on the bank's disk while trying to {action} {}", path.display())]
    NoSpace { action: &'static str, path: PathBuf },
    #[error("the bank is read-only: cannot {action} {} ({source})", path.display())]
    ReadOnly {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bank server refused or failed the request; the message is the server's (e.g.
    /// a quota exceeded) or the client's account of what failed, shown as is.
    #[error("{0}")]
    Remote(String),
}

/// The header a presigned upload ([`Staging::put_url`]) must carry: the base64 SHA-256
/// of the bytes, which the URL's signature covers.
pub const CHECKSUM_HEADER: &str = "x-amz-checksum-sha256";

/// Chunks uploaded by whoever holds a presigned URL, straight into the store, under a
/// staging name: the SHA-256 of their bytes, which the store enforces (the URL signs
/// [`CHECKSUM_HEADER`]). Nothing reads a staged chunk but the bank, which verifies it
/// ([`Staging::read_staged`]: it must decode to its id) before [`Staging::promote`]
/// gives it the chunk's own name; a chunk's name thus only ever receives verified
/// bytes. A staged chunk never promoted is deleted by the sweep once older than its
/// cutoff.
pub trait Staging: Send + Sync {
    /// A URL to PUT `len` bytes whose SHA-256 is `sha256` to, with [`CHECKSUM_HEADER`]
    /// set to [`base64`] of it (and `Content-Length` to `len`: both are signed); valid
    /// for `valid` from `issued`. No request is made.
    fn put_url(
        &self,
        sha256: &[u8; 32],
        len: u64,
        issued: SystemTime,
        valid: std::time::Duration,
    ) -> String;
    /// The bytes staged under `sha256` (at most one byte over a chunk's bound), or
    /// `None` if nothing is.
    fn read_staged(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Gives the chunk staged under `sha256`, verified by the caller to be chunk `id`,
    /// its own name (a copy in the store) and removes the staged one.
    fn promote(&self, sha256: &[u8; 32], id: &ChunkId) -> Result<(), StoreError>;
    /// Removes what is staged under `sha256` (nothing if nothing is).
    fn discard(&self, sha256: &[u8; 32]) -> Result<(), StoreError>;
}

/// The SHA-256 of `bytes`: what names a staged upload ([`Staging`]).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Standard base64 (with padding) of `bytes`, as S3's checksum headers take it.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(ABC[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What [`ChunkStore::read_each`] hands each verified plaintext to, with its place.
pub type Each<'a> = dyn Fn(usize, Vec<u8>) -> ControlFlow<()> + Sync + 'a;

/// Places one thread of [`ChunkStore::read_each`]'s default reads at a time.
pub const READ_RUN: usize = 16;

/// Runs `work` over `0..n` cut into consecutive runs of at most `run` places, on up to
/// `jobs` threads that take the next run when done with one (so the runs start in
/// order). The first error, or a [`ControlFlow::Break`], stops every thread before its
/// next run; the error is returned.
pub fn in_runs(
    n: usize,
    run: usize,
    jobs: usize,
    work: impl Fn(std::ops::Range<usize>) -> Result<ControlFlow<()>, StoreError> + Sync,
) -> Result<(), StoreError> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let run = run.max(1);
    let threads = jobs.max(1).min(n.div_ceil(run));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let err: Mutex<Option<StoreError>> = Mutex::new(None);
    let thread = || {
        while !stop.load(Ordering::Relaxed) {
            let first = next.fetch_add(run, Ordering::Relaxed);
            if first >= n {
                return;
            }
            match work(first..(first + run).min(n)) {
                Ok(ControlFlow::Continue(())) => {}
                Ok(ControlFlow::Break(())) => stop.store(true, Ordering::Relaxed),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    err.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                }
            }
        }
    };
    if threads <= 1 {
        thread();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(thread);
            }
        });
    }
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl StoreError {
    /// Wraps an I/O error with what was being done to which path, sorting out the
    /// conditions a user can act on (a full disk, a read-only bank).
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace { action, path },
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => StoreError::ReadOnly {
                action,
                path,
                source,
            },
            _ => StoreError::Io {
                action,
                path,
                source,
            },
        }
    }

    /// True when the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }
}

/// Locks on fan-out prefixes that every host of a bank sees (for a bank whose catalog is
/// in PostgreSQL: its advisory locks). The S3 store takes them on top of its own, a
/// touch shared and a sweep exclusive: step 4 of the GC scheme above across hosts,
/// where a lock file's `flock` only covers one.
pub trait PrefixLocks: Send + Sync {
    /// Holds the lock of `fanout`, shared or exclusive, until the guard drops.
    fn lock(
        &self,
        fanout: u8,
        exclusive: bool,
    ) -> Result<Box<dyn std::any::Any + Send>, StoreError>;
}

/// [`PrefixLocks`] behind an `Arc`, for a store's configuration.
#[derive(Clone)]
pub struct SharedPrefixLocks(pub std::sync::Arc<dyn PrefixLocks>);

impl std::fmt::Debug for SharedPrefixLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedPrefixLocks")
    }
}

/// Opens `path` (a directory, or a lock file created if missing) and takes a shared or
/// exclusive `flock` on it, held until the returned file is closed. Touch (shared)
/// against sweep (exclusive) across processes; see the GC scheme above.
pub(crate) fn flock_path(
    path: &std::path::Path,
    create: bool,
    exclusive: bool,
) -> Result<std::fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = if create {
        std::fs::OpenOptions::new()
            .mode(0o600)
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    } else {
        std::fs::File::open(path)
    }
    .map_err(|e| StoreError::io("open lock", path, e))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(StoreError::io("lock", path, e));
        }
    }
}

/// What one GC sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub chunks_kept: u64,
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    /// Unreferenced chunks kept because they are newer than the cutoff.
    pub chunks_too_new: u64,
    pub temp_files_deleted: u64,
}

/// Totals over the chunks in a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub chunks: u64,
    pub bytes: u64,
}

/// Where a version's pack comes from (`mbank_core::pack`, docs/formats.md "Pack"): a
/// bank server, or a bank directory's `packs/`. A pack is derived data, so its reader
/// checks every chunk against its id and falls back to the chunks when it fails.
pub trait PackSource: Send + Sync {
    /// The serialised pack index of version `version` of `machine`; `None` when no pack
    /// of that version is built.
    fn pack_index(
        &self,
        machine: &str,
        version: mbank_core::VersionId,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// The frame of segment `n` of that pack, `seg` as its index describes it.
    fn pack_segment(
        &self,
        machine: &str,
        version: mbank_core::VersionId,
        n: usize,
        seg: &mbank_core::pack::Segment,
    ) -> Result<Vec<u8>, StoreError>;
}

/// A place to keep chunks. See the crate docs for what every implementation promises.
pub trait ChunkStore: Send + Sync {
    /// Stores an encoded chunk; durable and visible once [`ChunkStore::flush`] returns.
    /// Returns the number of bytes written.
    fn put(&self, chunk: &EncodedChunk) -> Result<u64, StoreError>;

    /// [`ChunkStore::put`] for many chunks (one request to a bank server); returns the
    /// bytes written for each.
    fn put_many(&self, chunks: &[EncodedChunk]) -> Result<Vec<u64>, StoreError> {
        chunks.iter().map(|c| self.put(c)).collect()
    }

    /// Makes every chunk put so far durable and visible.
    fn flush(&self) -> Result<(), StoreError>;

    /// Says whether the chunk is present, and if so marks it as just used, so that a GC
    /// running now keeps it (see the GC scheme in the crate docs).
    fn touch(&self, id: &ChunkId) -> Result<bool, StoreError>;

    /// [`ChunkStore::touch`] for many chunks at once (one request to a bank server).
    fn touch_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        ids.iter().map(|id| self.touch(id)).collect()
    }

    /// The stored bytes of a chunk, unverified. Most callers want [`ChunkStore::read`].
    fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError>;

    /// Moves a damaged chunk out of the way; returns where it went, if anywhere.
    fn quarantine(&self, id: &ChunkId) -> Result<Option<PathBuf>, StoreError>;

    /// Deletes every chunk for which `keep` is false and whose mtime is older than
    /// `cutoff`, and temp files older than `cutoff`.
    fn sweep(
        &self,
        cutoff: SystemTime,
        keep: &(dyn Fn(&ChunkId) -> bool + Sync),
    ) -> Result<SweepStats, StoreError>;

    /// Counts the chunks and their stored bytes.
    fn stats(&self) -> Result<StoreStats, StoreError>;

    /// [`ChunkStore::get_raw`] for many chunks (one request to a bank server).
    fn get_raw_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
        ids.iter().map(|id| self.get_raw(id)).collect()
    }

    /// The stored bytes of each of `ids`, unverified, handed to `each(i, raw)` (`i` its
    /// place in `ids`) in the order of `ids`, each as soon as it and those before it
    /// are read: a bank server streams a batch get's answer from this. A missing or
    /// unreadable chunk is handed over as its error, in its place. `each` returns
    /// [`ControlFlow::Break`] to stop the reading (reads in flight are dropped).
    ///
    /// The default reads one chunk at a time. A store whose reads are round trips (S3)
    /// keeps several in flight, a bounded window ahead of `each`, so a batch costs
    /// about one round trip per window rather than one per chunk.
    fn get_raw_each(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(usize, Result<Vec<u8>, StoreError>) -> ControlFlow<()>,
    ) {
        for (i, id) in ids.iter().enumerate() {
            if each(i, self.get_raw(id)).is_break() {
                return;
            }
        }
    }

    /// Reads, decodes and verifies a chunk; returns its plaintext. A chunk that fails
    /// verification is quarantined and reported as [`StoreError::Corrupt`].
    fn read(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let raw = self.get_raw(id)?;
        self.verify(id, raw)
    }

    /// [`ChunkStore::read`] for many chunks, fetched with [`ChunkStore::get_raw_many`].
    fn read_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
        let raws = self.get_raw_many(ids)?;
        ids.iter()
            .zip(raws)
            .map(|(id, raw)| self.verify(id, raw))
            .collect()
    }

    /// Reads, decodes and verifies each of `ids` on up to `jobs` threads, handing each
    /// plaintext to `each(i, plain)` (`i` its place in `ids`) as soon as it is
    /// verified: in no set order, once per place (a repeated id is read once and
    /// handed over for each of its places), never from two threads at once for one
    /// place. A slow chunk holds up only the thread that waits for it. `each` may
    /// block (a writer that keeps its output in order does); it returns
    /// [`ControlFlow::Break`] to stop the reading, after which `read_each` returns
    /// `Ok` without handing over the rest (the caller keeps its own reason). The first
    /// store error stops every thread and is returned.
    ///
    /// The default takes runs of [`READ_RUN`] places per thread and reads each run
    /// with [`ChunkStore::read_many`]; a bank server's client streams each run's
    /// answer into `each` as it arrives, with one request per thread in flight.
    fn read_each(&self, ids: &[ChunkId], jobs: usize, each: &Each<'_>) -> Result<(), StoreError> {
        in_runs(ids.len(), READ_RUN, jobs, |run| {
            let plains = self.read_many(&ids[run.clone()])?;
            for (i, plain) in run.zip(plains) {
                if each(i, plain).is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Ok(ControlFlow::Continue(()))
        })
    }

    /// A stored chunk's plaintext length, from its header: a check of where an index
    /// may place the chunk, not a verification of the chunk ([`ChunkStore::read`]
    /// does that). The default reads the whole chunk; a store that can read just the
    /// header does so. A header that does not parse is [`StoreError::Corrupt`] (the
    /// chunk is not moved aside).
    fn plain_len(&self, id: &ChunkId) -> Result<usize, StoreError> {
        let raw = self.get_raw(id)?;
        chunk::parse_header(id, &raw)
            .map(|(_, n)| n)
            .map_err(|source| StoreError::Corrupt {
                source,
                moved_to: None,
            })
    }

    /// [`ChunkStore::plain_len`] of each of `ids`, in order; the first error is
    /// returned. The default asks one at a time; a store whose reads are round trips
    /// (S3) keeps several in flight.
    fn plain_len_many(&self, ids: &[ChunkId]) -> Result<Vec<usize>, StoreError> {
        ids.iter().map(|id| self.plain_len(id)).collect()
    }

    /// URLs through which whoever holds one may GET each of `ids`' stored bytes
    /// straight from where the store keeps them, valid for `valid` from `issued`, in
    /// the order of `ids`; `None` when the store has no such URLs (a directory, a bank
    /// server's client). An [`S3Store`] presigns them (SigV4 query authentication).
    /// No request is made and nothing is checked: a URL of an absent chunk answers 404.
    /// A bank server hands them only for chunks the asking user may read.
    fn direct_urls(
        &self,
        _ids: &[ChunkId],
        _issued: SystemTime,
        _valid: std::time::Duration,
    ) -> Option<Vec<String>> {
        None
    }

    /// Uploads straight to the store by presigned URLs, when the store offers them (S3).
    fn staging(&self) -> Option<&dyn Staging> {
        None
    }

    /// Decodes and verifies a chunk's stored bytes; quarantines it if they are damaged.
    fn verify(&self, id: &ChunkId, raw: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match chunk::decode(id, &raw) {
            Ok(d) => Ok(d.plain),
            Err(source) => {
                let moved_to = self.quarantine(id).ok().flatten();
                Err(StoreError::Corrupt { source, moved_to })
            }
        }
    }
}

#[cfg(test)]
mod base64_tests {
    #[test]
    fn base64_matches_rfc4648() {
        for (plain, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(plain.as_bytes()), want);
        }
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! Behaviour every store must show; each implementation's tests call these.
    use super::*;
    use mbank_core::chunk::{DEFAULT_ZSTD_LEVEL, encode};
    use std::time::Duration;

    pub fn put_flush_read(store: &dyn ChunkStore) {
        let a = encode(&b"alpha".repeat(1000), DEFAULT_ZSTD_LEVEL);
        let b = encode(b"beta", DEFAULT_ZSTD_LEVEL);
        assert!(!store.touch(&a.id).unwrap());
        assert!(store.put(&a).unwrap() > 0);
        store.put(&b).unwrap();
        store.put(&a).unwrap(); // same chunk twice is harmless
        store.flush().unwrap();
        assert!(store.touch(&a.id).unwrap());
        assert_eq!(store.read(&a.id).unwrap(), b"alpha".repeat(1000));
        assert_eq!(store.read(&b.id).unwrap(), b"beta");
        let missing = ChunkId::of(b"nope");
        assert!(matches!(store.read(&missing), Err(StoreError::Missing(_))));
        assert_eq!(store.plain_len(&a.id).unwrap(), 5000);
        assert_eq!(store.plain_len(&b.id).unwrap(), 4);
        assert!(matches!(
            store.plain_len(&missing),
            Err(StoreError::Missing(_))
        ));
        let s = store.stats().unwrap();
        assert_eq!(s.chunks, 2);
        assert_eq!(s.bytes, (a.bytes.len() + b.bytes.len()) as u64);
    }

    pub fn sweep_respects_keep_and_cutoff(store: &dyn ChunkStore) {
        let keep = encode(b"keep me", 3);
        let drop = encode(b"drop me", 3);
        store.put(&keep).unwrap();
        store.put(&drop).unwrap();
        store.flush().unwrap();
        // A cutoff in the past protects everything just written.
        let past = SystemTime::now() - Duration::from_secs(3600);
        let s = store.sweep(past, &|_| false).unwrap();
        assert_eq!(s.chunks_deleted, 0);
        assert_eq!(s.chunks_too_new, 2);
        let future = SystemTime::now() + Duration::from_secs(3600);
        let s = store.sweep(future, &|id: &ChunkId| *id == keep.id).unwrap();
        assert_eq!(s.chunks_deleted, 1);
        assert_eq!(s.chunks_kept, 1);
        assert!(store.touch(&keep.id).unwrap());
        assert!(!store.touch(&drop.id).unwrap());
    }
}
