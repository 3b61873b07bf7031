//! # mbank-bank
//!
//! A bank on local disk, opened in-process: a [`LocalStore`] of chunks plus a
//! [`Catalog`] of machines and versions, and the operations users run on them:
//! [`Bank::import`], [`Bank::export`], [`Bank::verify`], [`Bank::gc`], [`Bank::remove`],
//! and the memory-stream API ([`Bank::store_stream`], [`Bank::restore_stream`]).
//!
//! ## Directory
//!
//! ```text
//! <bank>/MBANK        marker: magic line, format version, bank id (docs/formats.md)
//! <bank>/catalog.db   the catalog (mbank-catalog)
//! <bank>/chunks/…     the chunk store (mbank-store)
//! <bank>/corrupt/…    damaged chunks moved aside
//! ```
//!
//! ## Order of a write (DESIGN invariants 1, 2 and 5)
//!
//! 1. register as a writer in the catalog (GC keeps everything newer than our start);
//! 2. read the machine's head: that is the new version's parent;
//! 3. chunk, hash, skip zero chunks, `touch` chunks the store has, store the rest;
//! 4. flush the store: every chunk is durable;
//! 5. commit the version with its index and move the head by compare-and-swap;
//! 6. unregister.
//!
//! A crash anywhere before 5 leaves the catalog as it was; chunks and temp files it
//! wrote are unreferenced and GC removes them. A crash inside 5 is rolled back by SQLite.
//!
//! ## Threads
//!
//! Hashing, compression and file I/O run on `jobs` worker threads (default: one per
//! core); the catalog is used from the calling thread only.

mod create;
mod export;
pub mod image;
mod import;
mod stream;
mod verify;

pub use create::{DiskFrom, NewMachine};
pub use export::ExportReport;
pub use image::ImageFormat;
pub use import::{ChunkItem, ImportOptions, ImportReport, VersionSource};
pub use stream::StreamStats;
pub use verify::{DamagedChunk, DamagedIndex, GcReport, VerifyReport};

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mbank_catalog::{Catalog, CatalogApi, CatalogError, MachineInfo, VersionInfo, WriterInfo};
use mbank_core::{ChunkId, MachineName, MachineRef, VersionId};
use mbank_store::{ChunkStore, LocalStore, StoreError};
use serde::Serialize;

/// First line of the `MBANK` marker file.
pub const MARKER_MAGIC: &str = "MBANK-BANK";
/// Bank directory format version written by this code.
pub const MARKER_VERSION: u32 = 1;
const MARKER_MAX_LEN: u64 = 4096;

/// Everything that can go wrong in a bank operation. Messages name the action, the
/// object and the cause; the CLI adds what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error("{} is not a Machine Bank bank (it has no MBANK file); create one with `mbank --bank {} init`", path.display(), path.display())]
    NotABank { path: PathBuf },
    #[error("{} is already a bank", path.display())]
    AlreadyABank { path: PathBuf },
    #[error("{} is not empty and is not a bank; give an empty or new directory to init", path.display())]
    NotEmpty { path: PathBuf },
    #[error("the bank marker {} is damaged or of an unknown kind: {why}", path.display())]
    BadMarker { path: PathBuf, why: String },
    #[error("the bank at {} is read-only: cannot {action}", path.display())]
    ReadOnly { path: PathBuf, action: &'static str },
    #[error("cannot import {}: {why}", path.display())]
    Image { path: PathBuf, why: String },
    #[error("version {version} of {machine} cannot be read: {source}")]
    Damaged {
        machine: MachineName,
        version: VersionId,
        #[source]
        source: Box<StoreError>,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the index of {machine}@{} is damaged: GC cannot know which chunks it needs, so it deletes nothing; run `mbank verify`", version.short())]
    GcRefused {
        machine: MachineName,
        version: VersionId,
    },
    #[error(
        "{machine} is checked out on station {station}: a version a session reads from cannot be removed until the session ends"
    )]
    InUse {
        machine: MachineName,
        station: String,
    },
    #[error(
        "a machine named {0} exists already; pick another name, or remove it with `mbank rm {0}`"
    )]
    MachineExists(MachineName),
    #[error("reading the input stream failed: {0}")]
    Stream(#[from] std::io::Error),
    #[error(
        "{action} runs on the bank's host: {location} is a bank server; run it there with --bank DIR"
    )]
    NotLocal {
        location: String,
        action: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl BankError {
    fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BankError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// True when the disk under the bank (or the export target) is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            BankError::Store(StoreError::NoSpace { .. }) => true,
            BankError::Damaged { source, .. } => matches!(**source, StoreError::NoSpace { .. }),
            BankError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            BankError::Catalog(c) => c.is_disk_full(),
            _ => false,
        }
    }

    /// True when the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            BankError::Store(s) => s.is_retryable(),
            BankError::Catalog(c) => c.is_retryable(),
            _ => false,
        }
    }
}

/// What a progress count counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Chunks,
}

/// Reports progress of long operations. Every method has a no-op default.
pub trait Progress: Sync {
    /// A new phase begins, of `total` units (0 when unknown).
    fn start(&self, _what: &str, _total: u64, _unit: Unit) {}
    /// `n` more units of the current phase are done.
    fn advance(&self, _n: u64) {}
    /// The current phase is over.
    fn finish(&self) {}
}

/// Progress that reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A machine as `ls` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct MachineSummary {
    pub machine: String,
    pub versions: u64,
    pub head: Option<String>,
    pub disk_size: Option<u64>,
    pub chunk_size: u32,
    pub created_ms: i64,
    pub updated_ms: Option<i64>,
}

impl From<MachineInfo> for MachineSummary {
    fn from(m: MachineInfo) -> Self {
        MachineSummary {
            machine: m.name.to_string(),
            versions: m.versions,
            head: m.head.map(|h| h.to_hex()),
            disk_size: m.disk_size,
            chunk_size: m.chunk_size,
            created_ms: m.created_ms,
            updated_ms: m.updated_ms,
        }
    }
}

/// Totals over a whole bank, as `stats` shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BankStats {
    pub machines: u64,
    pub versions: u64,
    /// Chunks and stored bytes in the store (including garbage not yet collected).
    pub chunks: u64,
    pub bytes_stored: u64,
    /// The sum of every version's disk size.
    pub logical_bytes: u64,
    /// The sum of every version's non-zero chunks' plaintext size.
    pub logical_nonzero_bytes: u64,
    /// Distinct chunks referenced by some version.
    pub chunks_referenced: u64,
    /// logical_nonzero_bytes / bytes_stored.
    pub dedup_ratio: f64,
}

/// A version as `log` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct VersionSummary {
    pub version: String,
    pub machine: String,
    pub parent: Option<String>,
    pub head: bool,
    pub created_ms: i64,
    pub disk_size: u64,
    pub chunk_size: u32,
    /// The version holds a saved memory state: `mbank run` resumes it.
    pub suspended: bool,
    /// The version holds a machine configuration (made by `mbank create` or `run`).
    pub configured: bool,
    pub stats: mbank_catalog::VersionStats,
}

/// A registered writer; unregisters when dropped, so a failed write does not hold GC
/// back longer than the process lives. It has its own catalog connection.
pub struct WriterGuard {
    catalog: Box<dyn CatalogApi>,
    pub info: WriterInfo,
}

impl WriterGuard {
    /// Tells the catalog this writer is still alive.
    pub fn heartbeat(&self) {
        let _ = self.catalog.heartbeat(self.info.id);
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let _ = self.catalog.unregister_writer(self.info.id);
    }
}

/// A bank: a chunk store and a catalog. On local disk ([`Bank::open`]) both are the
/// bank directory's; a bank server's client ([`Bank::with_parts`]) brings its own.
pub struct Bank {
    /// The bank's name for people and session records: its canonical directory, or URL.
    location: String,
    /// The bank's directory, when it is on this machine.
    root: Option<PathBuf>,
    store: Arc<dyn ChunkStore>,
    catalog: Box<dyn CatalogApi>,
    read_only: bool,
}

fn this_host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn dir_is_writable(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

impl Bank {
    /// Creates a new bank in `path` (which may exist if it is empty).
    pub fn init(path: &Path) -> Result<Bank, BankError> {
        if path.join("MBANK").exists() {
            return Err(BankError::AlreadyABank { path: path.into() });
        }
        if path.exists() {
            let mut entries =
                fs::read_dir(path).map_err(|e| BankError::io("read directory", path, e))?;
            if entries.next().is_some() {
                return Err(BankError::NotEmpty { path: path.into() });
            }
        }
        fs::create_dir_all(path).map_err(|e| match e.raw_os_error() {
            Some(libc::EROFS) | Some(libc::EACCES) => BankError::ReadOnly {
                path: path.into(),
                action: "create the bank directory",
            },
            _ => BankError::io("create directory", path, e),
        })?;
        if !dir_is_writable(path) {
            return Err(BankError::ReadOnly {
                path: path.into(),
                action: "create a bank in it",
            });
        }
        LocalStore::create(path)?;
        drop(Catalog::open(&path.join("catalog.db"), true, false)?);
        // The marker goes last: a directory without it is not (yet) a bank.
        let marker = path.join("MBANK");
        let tmp = path.join(".MBANK.tmp");
        let body = format!(
            "{MARKER_MAGIC} {MARKER_VERSION}\nid {}\ncreated_ms {}\n",
            VersionId::random().to_hex(),
            mbank_catalog::now_ms()
        );
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &marker)?;
            fs::File::open(path)?.sync_all()
        };
        write().map_err(|e| BankError::io("write the bank marker", &marker, e))?;
        Bank::open(path, false)
    }

    /// Opens the bank in `path`. A read-only open works on a read-only file system.
    pub fn open(path: &Path, read_only: bool) -> Result<Bank, BankError> {
        let marker = path.join("MBANK");
        let text = match fs::metadata(&marker) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BankError::NotABank { path: path.into() });
            }
            Err(e) => return Err(BankError::io("read the bank marker", &marker, e)),
            Ok(md) if md.len() > MARKER_MAX_LEN => {
                return Err(BankError::BadMarker {
                    path: marker,
                    why: format!("it is {} bytes long", md.len()),
                });
            }
            Ok(_) => fs::read_to_string(&marker)
                .map_err(|e| BankError::io("read the bank marker", &marker, e))?,
        };
        let first = text.lines().next().unwrap_or("");
        let version = first
            .strip_prefix(MARKER_MAGIC)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .ok_or_else(|| BankError::BadMarker {
                path: marker.clone(),
                why: format!(
                    "first line is {first:?}, expected \"{MARKER_MAGIC} {MARKER_VERSION}\""
                ),
            })?;
        if version != MARKER_VERSION {
            return Err(BankError::BadMarker {
                path: marker,
                why: format!("bank format version {version}; this mbank knows {MARKER_VERSION}"),
            });
        }
        if !read_only && !dir_is_writable(path) {
            return Err(BankError::ReadOnly {
                path: path.into(),
                action: "write to it",
            });
        }
        let store = LocalStore::open(path)?;
        // Read-only commands still open the catalog for writing when they can, so that
        // SQLite can roll back a journal left by a process killed mid-transaction
        // (a read-only connection cannot, and would refuse to read).
        let catalog_read_only = read_only && !dir_is_writable(path);
        let catalog = Catalog::open(&path.join("catalog.db"), false, catalog_read_only)?;
        let location = fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        Ok(Bank {
            location,
            root: Some(path.into()),
            store: Arc::new(store),
            catalog: Box::new(catalog),
            read_only,
        })
    }

    /// A bank made of a store and a catalog from elsewhere (a bank server's client).
    /// `location` names it (a URL).
    pub fn with_parts(
        location: String,
        store: Arc<dyn ChunkStore>,
        catalog: Box<dyn CatalogApi>,
    ) -> Bank {
        Bank {
            location,
            root: None,
            store,
            catalog,
            read_only: false,
        }
    }

    /// The bank's directory; `None` for a bank served by another machine.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The bank's canonical directory or its URL: what session records name.
    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn store(&self) -> &dyn ChunkStore {
        &*self.store
    }

    /// The store, shareable with threads that outlive a borrow (a station's fetches).
    pub fn store_arc(&self) -> Arc<dyn ChunkStore> {
        self.store.clone()
    }

    pub fn catalog(&self) -> &dyn CatalogApi {
        &*self.catalog
    }

    pub fn catalog_mut(&mut self) -> &mut dyn CatalogApi {
        &mut *self.catalog
    }

    /// The bank's directory, or an error saying `action` runs on the bank's host.
    fn local_root(&self, action: &'static str) -> Result<&Path, BankError> {
        self.root.as_deref().ok_or_else(|| BankError::NotLocal {
            location: self.location.clone(),
            action,
        })
    }

    /// A connection of its own to a local bank's catalog, for the walks over every
    /// index that only the bank's host does (verify, gc, stats).
    fn local_catalog(&self, action: &'static str) -> Result<Catalog, BankError> {
        let root = self.local_root(action)?;
        let read_only = self.read_only && !dir_is_writable(root);
        Ok(Catalog::open(&root.join("catalog.db"), false, read_only)?)
    }

    /// Where a chunk's file lives in a local bank (for messages and tests).
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        LocalStore::chunk_path_in(self.root.as_deref().unwrap_or(Path::new("")), id)
    }

    /// Names the catalog file in errors a user can act on (a full disk).
    fn catalog_err(&self, action: &'static str, e: CatalogError) -> BankError {
        match &self.root {
            Some(root) if e.is_disk_full() => BankError::Store(StoreError::NoSpace {
                action,
                path: root.join("catalog.db"),
            }),
            _ => e.into(),
        }
    }

    fn require_writable(&self, action: &'static str) -> Result<(), BankError> {
        if self.read_only {
            return Err(BankError::ReadOnly {
                path: PathBuf::from(&self.location),
                action,
            });
        }
        Ok(())
    }

    /// Registers this process as a writer (see the GC scheme in `mbank-store`). Keep the
    /// guard alive until the version that references the written chunks is committed.
    pub fn begin_write(&self, what: &str) -> Result<WriterGuard, BankError> {
        self.require_writable("write")?;
        let catalog = self.catalog.reopen()?;
        let info = catalog
            .register_writer(std::process::id(), &this_host(), what)
            .map_err(|e| self.catalog_err("register a writer in", e))?;
        Ok(WriterGuard { catalog, info })
    }

    /// Every machine.
    pub fn list(&self) -> Result<Vec<MachineSummary>, BankError> {
        Ok(self
            .catalog
            .machines()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// The versions of a machine, newest first.
    pub fn log(&self, machine: &MachineName) -> Result<Vec<VersionSummary>, BankError> {
        let head = self.catalog.machine(machine)?.and_then(|m| m.head);
        Ok(self
            .catalog
            .versions(machine)?
            .into_iter()
            .map(|v| VersionSummary {
                version: v.id.to_hex(),
                machine: v.machine.to_string(),
                parent: v.parent.map(|p| p.to_hex()),
                head: Some(v.id) == head,
                created_ms: v.created_ms,
                disk_size: v.disk_size,
                chunk_size: v.chunk_size,
                suspended: v.has_memory(),
                configured: v.config.is_some(),
                stats: v.stats,
            })
            .collect())
    }

    /// Resolves `machine[@version]` to one version.
    pub fn resolve(&self, r: &MachineRef) -> Result<VersionInfo, BankError> {
        Ok(self.catalog.resolve(&r.machine, r.version.as_deref())?)
    }

    /// Forgets a version (`machine@version`) or a whole machine. The chunks go at the
    /// next GC. Returns the removed version ids and the machine's new head.
    pub fn remove(
        &mut self,
        r: &MachineRef,
    ) -> Result<(Vec<VersionId>, Option<VersionId>), BankError> {
        self.require_writable("remove versions")?;
        // A session's base version must outlive the session: its clean chunks are read
        // from it, and GC would otherwise take them. That holds for sessions displaced
        // by `--force` too, until they check in.
        let bases = self.catalog.session_bases(&r.machine)?;
        if !bases.is_empty() {
            let going = match &r.version {
                None => None,
                Some(_) => Some(self.resolve(r)?.id),
            };
            if let Some((_, station)) = bases
                .into_iter()
                .find(|(b, _)| going.is_none_or(|g| g == *b))
            {
                return Err(BankError::InUse {
                    machine: r.machine.clone(),
                    station,
                });
            }
        }
        match &r.version {
            Some(_) => {
                let v = self.resolve(r)?;
                let head = self.catalog.remove_version(&v)?;
                Ok((vec![v.id], head))
            }
            None => {
                let ids = self
                    .catalog
                    .versions(&r.machine)?
                    .into_iter()
                    .map(|v| v.id)
                    .collect();
                self.catalog.remove_machine(&r.machine)?;
                Ok((ids, None))
            }
        }
    }

    /// Totals over the bank.
    pub fn stats(&self) -> Result<BankStats, BankError> {
        let catalog = self.local_catalog("stats")?;
        let store = self.store.stats()?;
        let mut s = BankStats {
            chunks: store.chunks,
            bytes_stored: store.bytes,
            machines: self.catalog.machines()?.len() as u64,
            ..Default::default()
        };
        let mut seen = std::collections::HashSet::new();
        catalog.for_each_index(None, |v, idx| {
            s.versions += 1;
            s.logical_bytes += v.disk_size;
            let idx = idx?;
            for (i, c) in idx.chunks.iter().enumerate() {
                if let Some(c) = c {
                    s.logical_nonzero_bytes += idx.chunk_len(i) as u64;
                    seen.insert(*c);
                }
            }
            Ok(())
        })?;
        catalog.for_each_stream(None, |_, _, idx| {
            seen.extend(idx?.runs.iter().filter_map(|r| r.id));
            Ok(())
        })?;
        s.chunks_referenced = seen.len() as u64;
        s.dedup_ratio = if s.bytes_stored > 0 {
            s.logical_nonzero_bytes as f64 / s.bytes_stored as f64
        } else {
            0.0
        };
        Ok(s)
    }
}

/// Number of worker threads to use when the caller does not say.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
