//! # mbank-bank
//!
//! A bank opened in-process: a chunk store (a [`LocalStore`] in the bank directory, or
//! an [`S3Store`](mbank_store::S3Store) bucket that the `MBANK` marker names, see
//! [`StoreSpec`]) plus a [`Catalog`] of machines and versions, always in the bank
//! directory, and the operations users run on them:
//! [`Bank::import`], [`Bank::export`], [`Bank::verify`], [`Bank::gc`], [`Bank::remove`],
//! and the memory-stream API ([`Bank::store_stream`], [`Bank::restore_stream`]).
//!
//! ## Directory
//!
//! ```text
//! <bank>/MBANK           marker: magic line, format version, bank id, store (docs/formats.md)
//! <bank>/catalog.db      the catalog (mbank-catalog)
//! <bank>/chunks/…        the chunk store (mbank-store), when the bank keeps its chunks here
//! <bank>/corrupt/…       damaged chunks moved aside (the same)
//! <bank>/s3-credentials  the S3 key, when the chunks are in a bucket (mode 0600; optional)
//! ```
//!
//! The catalog stays local even when the chunks are in S3: it alone moves heads and
//! records sessions, by compare-and-swap in SQLite (Garage ignores conditional PUTs).
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
pub mod derive;
mod export;
pub mod image;
mod import;
pub mod lengths;
pub mod pack;
mod s3;
mod stream;
mod verify;

pub use create::{DiskFrom, NewMachine, fork_source, fork_source_text};
pub use derive::{check_not_in_use, repeated_commit};
pub use export::{ExportReport, write_disk};
pub use image::ImageFormat;
pub use import::{ChunkItem, ImportOptions, ImportReport, RepairReport, VersionSource};
pub use lengths::{Place, WrongLength, check_chunk_lengths, length_pairs, lengths_to_check};
pub use s3::{CREDENTIALS_FILE, STORE_URL_FORM, StoreSpec};
pub use stream::StreamStats;
pub use verify::{DamagedChunk, DamagedIndex, GcReport, VerifyReport};

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mbank_catalog::{
    Catalog, CatalogApi, CatalogError, ForgetReport, LabelChange, Labels, MachineInfo, Policy,
    VersionInfo, WriterInfo,
};
use mbank_core::{ChunkId, MachineName, MachineRef, VersionId};
use mbank_store::{ChunkStore, LocalStore, StoreError};
use serde::Serialize;

/// First line of the `MBANK` marker file.
pub const MARKER_MAGIC: &str = "MBANK-BANK";
/// The newest bank directory format version this code reads and writes. `init` writes
/// version 1 for a bank that keeps its chunks in its directory (so older mbank opens
/// it) and version 2 for one whose marker has a `store` line (so older mbank, which
/// would ignore the line and look for chunks in the directory, refuses it), and version
/// 3 for one whose marker has a `catalog postgres` line (its catalog and access rights
/// are in the PostgreSQL database `postgres.url` names; older mbank would open an empty
/// `catalog.db` instead, and its GC would find no version needing any chunk).
pub const MARKER_VERSION: u32 = 3;
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
    #[error("version {version} of {machine} is damaged: {wrong}")]
    WrongLength {
        machine: MachineName,
        version: VersionId,
        wrong: Box<WrongLength>,
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
    #[error(
        "no S3 credentials for the bank at {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them to {} as two lines, key_id=... and secret=..., with mode 0600",
        bank.display(), file.display()
    )]
    NoCredentials { bank: PathBuf, file: PathBuf },
    #[error(
        "{} may be read or written by group or others (mode {mode:04o}) and holds an S3 secret: run `chmod 600 {}`",
        path.display(), path.display()
    )]
    CredentialsExposed { path: PathBuf, mode: u32 },
    #[error("cannot use the S3 credentials from {from}: {why}")]
    BadCredentials { from: String, why: String },
    #[error("cannot reach the bank's chunk store {url}: {source}; {advice}")]
    StoreUnreachable {
        url: String,
        advice: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error(
        "bucket {bucket} (at {endpoints}) already holds chunks, perhaps another bank's: a bank's gc deletes every chunk its own catalog does not reference, so each bank needs a bucket of its own; give an empty bucket"
    )]
    BucketInUse { bucket: String, endpoints: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Access(#[from] mbank_access::AccessError),
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
    /// Packs in `<bank>/packs/` (`mbank pack`) and their bytes: copies of their
    /// versions' data for exports, not in `bytes_stored`.
    pub packs: u64,
    pub pack_bytes: u64,
    /// Where the chunks are: `local` (the bank directory) or the store URL.
    pub store: String,
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
    /// The version's machine configuration (memory, CPUs…), as `mbank create` or `set`
    /// stored it; absent when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    pub stats: mbank_catalog::VersionStats,
    /// The version's note (`mbank note`), if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The version's tags (`mbank note --tag`).
    pub tags: Vec<String>,
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
    /// The store the marker names; `None` for chunks in the bank directory (or a bank
    /// server's).
    store_spec: Option<StoreSpec>,
    catalog: Box<dyn CatalogApi>,
    read_only: bool,
    /// Where exports look for a version's pack first (a bank server's client).
    packs: Option<Arc<dyn mbank_store::PackSource>>,
}

/// What the `MBANK` marker says.
#[derive(Debug, PartialEq, Eq)]
struct Marker {
    version: u32,
    store: Option<StoreSpec>,
    /// The catalog is in PostgreSQL (`catalog postgres`).
    postgres: bool,
}

/// Parses the marker's text (docs/formats.md); the error says what is wrong.
fn parse_marker(text: &str) -> Result<Marker, String> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let version = first
        .strip_prefix(MARKER_MAGIC)
        .and_then(|v| v.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            format!("first line is {first:?}, expected \"{MARKER_MAGIC} N\" (N a format version)")
        })?;
    if !(1..=MARKER_VERSION).contains(&version) {
        return Err(format!(
            "bank format version {version}; this mbank knows 1 to {MARKER_VERSION}"
        ));
    }
    let mut store = None;
    let mut postgres = false;
    for line in lines {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        if key == "catalog" {
            if version < 3 {
                return Err("a catalog line needs bank format version 3".into());
            }
            if value.trim() != "postgres" {
                return Err(format!(
                    "catalog {}: this mbank knows only `catalog postgres`",
                    value.trim()
                ));
            }
            if postgres {
                return Err("it has two catalog lines".into());
            }
            postgres = true;
            continue;
        }
        if key != "store" {
            continue; // unknown lines are ignored
        }
        if version < 2 {
            return Err("a store line needs bank format version 2".into());
        }
        if store.is_some() {
            return Err("it has two store lines".into());
        }
        let spec = StoreSpec::parse(value.trim())
            .map_err(|why| format!("store {}: {why}", value.trim()))?;
        store = Some(spec);
    }
    Ok(Marker {
        version,
        store,
        postgres,
    })
}

/// The marker of a new bank.
fn marker_text(
    id: &VersionId,
    created_ms: i64,
    store: Option<&StoreSpec>,
    postgres: bool,
) -> String {
    let version = match (store.is_some(), postgres) {
        (_, true) => 3,
        (true, false) => 2,
        (false, false) => 1,
    };
    let mut body = format!(
        "{MARKER_MAGIC} {version}\nid {}\ncreated_ms {created_ms}\n",
        id.to_hex()
    );
    if let Some(s) = store {
        body.push_str(&format!("store {s}\n"));
    }
    if postgres {
        body.push_str("catalog postgres\n");
    }
    body
}

fn this_host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A warning when the bank directory `path` lets users other than its owner in (a bank
/// made before `init` made banks private, or one opened up by hand): its catalog,
/// access database (password hashes) and chunks are the owner's alone. `None` when it
/// is private, or cannot be read.
pub fn open_to_others(path: &Path) -> Option<String> {
    let mode = fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "the bank directory {} has mode {mode:o}: its catalog, chunks and access database (password hashes) are readable by other users of this machine; make it private with `chmod -R go-rwx {}`",
            path.display(),
            path.display()
        )
    })
}

pub(crate) fn dir_is_writable(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

impl Bank {
    /// Creates a new bank in `path` (which may exist if it is empty) that keeps its
    /// chunks in the directory.
    pub fn init(path: &Path) -> Result<Bank, BankError> {
        Bank::init_with_store(path, None)
    }

    /// Creates a new bank in `path` (which may exist if it is empty) with its chunks in
    /// `store`, or in the directory when `None`. With a store, the directory may already
    /// hold the credentials file, and the bucket must answer and hold no chunks yet.
    pub fn init_with_store(path: &Path, store: Option<&StoreSpec>) -> Result<Bank, BankError> {
        Bank::init_full(path, store, None)
    }

    /// [`Bank::init_with_store`], with the catalog and the access rights in the
    /// PostgreSQL database at `postgres` when given (written to `postgres.url`, 0600).
    /// The database must answer and hold no bank's machines yet.
    pub fn init_full(
        path: &Path,
        store: Option<&StoreSpec>,
        postgres: Option<&str>,
    ) -> Result<Bank, BankError> {
        if path.join("MBANK").exists() {
            return Err(BankError::AlreadyABank { path: path.into() });
        }
        if path.exists() {
            let entries =
                fs::read_dir(path).map_err(|e| BankError::io("read directory", path, e))?;
            for e in entries {
                let e = e.map_err(|e| BankError::io("read directory", path, e))?;
                if !(store.is_some() && e.file_name() == CREDENTIALS_FILE) {
                    return Err(BankError::NotEmpty { path: path.into() });
                }
            }
        }
        // A bank is private to the user or service that owns it: its directory is
        // 0700 (made so here if it existed empty), its files 0600, whatever the umask.
        let made = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => fs::create_dir_all(p),
            _ => Ok(()),
        }
        .and_then(|()| match fs::create_dir(path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        })
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o700)));
        made.map_err(|e| match e.raw_os_error() {
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => BankError::ReadOnly {
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
        match store {
            None => drop(LocalStore::create(path)?),
            Some(spec) => {
                let (s3, creds_from) = s3::open_store(path, spec)?;
                match s3.holds_chunks() {
                    Err(e) => return Err(s3::unreachable(spec, &creds_from, e)),
                    Ok(true) => {
                        return Err(BankError::BucketInUse {
                            bucket: spec.bucket.clone(),
                            endpoints: spec.endpoints.join(", "),
                        });
                    }
                    Ok(false) => {}
                }
            }
        }
        match postgres {
            None => {
                // SQLite gives the catalog's -wal and -shm files the database's mode.
                let catalog = path.join("catalog.db");
                fs::OpenOptions::new()
                    .mode(0o600)
                    .write(true)
                    .create_new(true)
                    .open(&catalog)
                    .map_err(|e| BankError::io("create the catalog", &catalog, e))?;
                drop(Catalog::open(&catalog, true, false)?);
            }
            Some(url) => {
                let file = path.join(mbank_sql::URL_FILE);
                let mut f = fs::OpenOptions::new()
                    .mode(0o600)
                    .write(true)
                    .create_new(true)
                    .open(&file)
                    .map_err(|e| BankError::io("create", &file, e))?;
                f.write_all(format!("{url}\n").as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| BankError::io("write", &file, e))?;
                let catalog = Catalog::open_in(path, true, false)?;
                let machines = catalog.machines()?;
                if let Some(m) = machines.first() {
                    let _ = fs::remove_file(&file);
                    return Err(BankError::BadMarker {
                        path: file,
                        why: format!(
                            "the PostgreSQL database {} already holds a bank's catalog \
                             ({} machines, {} among them): give a new, empty database, or \
                             copy that bank's directory (MBANK and {}) to share it",
                            mbank_sql::redact(url),
                            machines.len(),
                            m.name,
                            mbank_sql::URL_FILE
                        ),
                    });
                }
            }
        }
        // The marker goes last: a directory without it is not (yet) a bank.
        let marker = path.join("MBANK");
        let tmp = path.join(".MBANK.tmp");
        let body = marker_text(
            &VersionId::random(),
            mbank_catalog::now_ms(),
            store,
            postgres.is_some(),
        );
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .mode(0o600)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
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
        let parsed = parse_marker(&text).map_err(|why| BankError::BadMarker {
            path: marker.clone(),
            why,
        })?;
        // The marker and postgres.url must agree: a catalog looked for in the wrong
        // place would look empty, and GC would keep no chunk.
        let url = mbank_sql::bank_url(path)
            .map_err(|e| BankError::io("read", path.join(mbank_sql::URL_FILE), e))?;
        match (parsed.postgres, url.is_some()) {
            (true, false) => {
                return Err(BankError::BadMarker {
                    path: marker,
                    why: format!(
                        "it says the catalog is in PostgreSQL, but {} is missing: put the \
                         database's URL there (one line, mode 0600)",
                        path.join(mbank_sql::URL_FILE).display()
                    ),
                });
            }
            (false, true) => {
                return Err(BankError::BadMarker {
                    path: marker,
                    why: format!(
                        "it has no `catalog postgres` line, but {} names a database: \
                         remove that file, or add the line and make the marker version 3",
                        path.join(mbank_sql::URL_FILE).display()
                    ),
                });
            }
            _ => {}
        }
        if !read_only && !dir_is_writable(path) {
            return Err(BankError::ReadOnly {
                path: path.into(),
                action: "write to it",
            });
        }
        let store: Arc<dyn ChunkStore> = match &parsed.store {
            None => Arc::new(LocalStore::open(path)?),
            Some(spec) => {
                let (s3, creds_from) = s3::open_store(path, spec)?;
                s3.check()
                    .map_err(|e| s3::unreachable(spec, &creds_from, e))?;
                Arc::new(s3)
            }
        };
        // Read-only commands still open the catalog for writing when they can, so that
        // SQLite can roll back a journal left by a process killed mid-transaction
        // (a read-only connection cannot, and would refuse to read).
        let catalog_read_only = read_only && !dir_is_writable(path);
        let catalog = Catalog::open_in(path, false, catalog_read_only)?;
        let location = fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        Ok(Bank {
            location,
            root: Some(path.into()),
            store,
            store_spec: parsed.store,
            catalog: Box::new(catalog),
            read_only,
            packs: None,
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
            store_spec: None,
            catalog,
            read_only: false,
            packs: None,
        }
    }

    /// The bank with exports that take a version's chunks from its pack in `packs`
    /// when there is one (`mbank_bank::pack`), and from the store otherwise.
    pub fn with_packs(mut self, packs: Arc<dyn mbank_store::PackSource>) -> Bank {
        self.packs = Some(packs);
        self
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

    /// The store the bank's marker names; `None` when the chunks are in the bank
    /// directory (or the bank is a server's).
    pub fn store_spec(&self) -> Option<&StoreSpec> {
        self.store_spec.as_ref()
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
        Ok(Catalog::open_in(root, false, read_only)?)
    }

    /// Where a chunk's file lives in a bank that keeps its chunks in its directory (for
    /// messages and tests). Meaningless for a bank whose chunks are in S3
    /// ([`Bank::store_spec`] is `Some`) or on a server: no file has that name there.
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
        let mut labels: std::collections::HashMap<VersionId, mbank_catalog::Labels> = self
            .catalog
            .labels(machine)?
            .into_iter()
            .map(|l| (l.version, l.labels))
            .collect();
        Ok(self
            .catalog
            .versions(machine)?
            .into_iter()
            .map(|v| {
                let l = labels.remove(&v.id).unwrap_or_default();
                VersionSummary {
                    version: v.id.to_hex(),
                    machine: v.machine.to_string(),
                    parent: v.parent.map(|p| p.to_hex()),
                    head: Some(v.id) == head,
                    created_ms: v.created_ms,
                    disk_size: v.disk_size,
                    chunk_size: v.chunk_size,
                    suspended: v.has_memory(),
                    configured: v.config.is_some(),
                    config: v
                        .config
                        .as_deref()
                        .and_then(|c| serde_json::from_str(c).ok()),
                    stats: v.stats,
                    note: l.note,
                    tags: l.tags,
                }
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
        // (The rule is `derive::check_not_in_use`, which the bank server applies too.)
        if !self.catalog.session_bases(&r.machine)?.is_empty() {
            let going = match &r.version {
                None => None,
                Some(_) => Some(self.resolve(r)?.id),
            };
            self.check_not_in_use(&r.machine, going)?;
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

    /// Applies a retention policy to `machine` (see `mbank_catalog::retention`): removes
    /// the versions it does not keep, never the head, a session's base or a suspended
    /// version nothing was made from. With `dry_run`, only says what it would remove.
    /// The chunks go at the next GC, as after `rm`.
    pub fn forget(
        &mut self,
        machine: &MachineName,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<ForgetReport, BankError> {
        if !dry_run {
            self.require_writable("forget versions")?;
        }
        Ok(self.catalog.forget(machine, policy, dry_run)?)
    }

    /// Applies `machine`'s own retention policy, if it has one (after a check-in).
    pub fn apply_policy(
        &mut self,
        machine: &MachineName,
    ) -> Result<Option<ForgetReport>, BankError> {
        match self.catalog.policy(machine)? {
            Some(p) => Ok(Some(self.forget(machine, &p, false)?)),
            None => Ok(None),
        }
    }

    /// Makes `to` (`machine@version`) the head, if the head is still `expected` (by
    /// default the head as read now): a compare-and-swap, refused while a session runs
    /// on the machine. Returns the head it replaced.
    pub fn set_head(
        &mut self,
        to: &MachineRef,
        expected: Option<Option<VersionId>>,
    ) -> Result<Option<VersionId>, BankError> {
        self.require_writable("move the head")?;
        let v = self.resolve(to)?;
        let expected = match expected {
            Some(e) => e,
            None => {
                self.catalog
                    .machine(&to.machine)?
                    .ok_or_else(|| CatalogError::MachineNotFound(to.machine.to_string()))?
                    .head
            }
        };
        self.catalog.set_head(&to.machine, v.id, expected)?;
        Ok(expected)
    }

    /// Changes the note and tags of a version (`machine@version`, or the head).
    pub fn label(
        &mut self,
        r: &MachineRef,
        change: &LabelChange,
    ) -> Result<(VersionInfo, Labels), BankError> {
        self.require_writable("label versions")?;
        let v = self.resolve(r)?;
        let labels = self.catalog.label(&v, change)?;
        Ok((v, labels))
    }

    /// Every chunk some version's disk or stream names (a walk over every index, on
    /// the bank's host).
    pub fn referenced_chunks(&self) -> Result<std::collections::HashSet<ChunkId>, BankError> {
        let catalog = self.local_catalog("listing the referenced chunks")?;
        let mut seen = std::collections::HashSet::new();
        catalog.for_each_index(None, |_, idx| {
            seen.extend(idx?.chunks.iter().flatten().copied());
            Ok(())
        })?;
        catalog.for_each_stream(None, |_, _, idx| {
            seen.extend(idx?.runs.iter().filter_map(|r| r.id));
            Ok(())
        })?;
        Ok(seen)
    }

    /// Totals over the bank.
    pub fn stats(&self) -> Result<BankStats, BankError> {
        let catalog = self.local_catalog("stats")?;
        let store = self.store.stats()?;
        let mut s = BankStats {
            chunks: store.chunks,
            bytes_stored: store.bytes,
            machines: self.catalog.machines()?.len() as u64,
            store: self
                .store_spec
                .as_ref()
                .map_or_else(|| "local".to_string(), |s| s.to_string()),
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
        (s.packs, s.pack_bytes) = crate::pack::usage(self.local_root("stats")?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const GARAGE: &str =
        "s3://mbank?endpoint=http://127.0.0.1:3900,http://127.0.0.1:3901&region=garage";

    #[test]
    fn marker_round_trips_with_and_without_a_store() {
        let id = VersionId::random();
        let local = marker_text(&id, 17, None, false);
        assert!(local.starts_with("MBANK-BANK 1\n"), "{local}");
        assert_eq!(
            parse_marker(&local).unwrap(),
            Marker {
                version: 1,
                store: None,
                postgres: false
            }
        );
        let spec = StoreSpec::parse(GARAGE).unwrap();
        let s3 = marker_text(&id, 17, Some(&spec), false);
        assert!(s3.starts_with("MBANK-BANK 2\n"), "{s3}");
        assert!(s3.ends_with(&format!("\nstore {GARAGE}\n")), "{s3}");
        assert_eq!(
            parse_marker(&s3).unwrap(),
            Marker {
                version: 2,
                store: Some(spec.clone()),
                postgres: false
            }
        );
        assert!(s3.len() as u64 <= MARKER_MAX_LEN);
        for store in [None, Some(&spec)] {
            let pg = marker_text(&id, 17, store, true);
            assert!(pg.starts_with("MBANK-BANK 3\n"), "{pg}");
            assert!(pg.ends_with("\ncatalog postgres\n"), "{pg}");
            assert_eq!(
                parse_marker(&pg).unwrap(),
                Marker {
                    version: 3,
                    store: store.cloned(),
                    postgres: true
                }
            );
        }
    }

    #[test]
    fn marker_lines_older_readers_know() {
        // A version-1 marker as every mbank so far wrote it, with an unknown line.
        let m = parse_marker("MBANK-BANK 1\nid 00\ncreated_ms 1\nfuture thing\n").unwrap();
        assert_eq!(m.store, None);
        // Version 2 without a store line is a bank with local chunks.
        assert_eq!(parse_marker("MBANK-BANK 2\nid 00\n").unwrap().store, None);
    }

    #[test]
    fn bad_markers_are_refused_with_a_reason() {
        let cases = [
            ("", "first line"),
            ("MBANK-BANK\n", "first line"),
            ("MBANK-BANKX 1\n", "first line"),
            ("MBANK-STATION 1\n", "first line"),
            ("MBANK-BANK 0\n", "version 0"),
            ("MBANK-BANK 4\n", "version 4"),
            (
                "MBANK-BANK 2\ncatalog postgres\n",
                "needs bank format version 3",
            ),
            ("MBANK-BANK 3\ncatalog mysql\n", "only `catalog postgres`"),
            (
                "MBANK-BANK 3\ncatalog postgres\ncatalog postgres\n",
                "two catalog lines",
            ),
            (
                "MBANK-BANK 1\nstore s3://mbank?endpoint=http://h&region=r\n",
                "needs bank format version 2",
            ),
            (
                "MBANK-BANK 2\nstore s3://mbank?endpoint=http://h&region=r\nstore s3://other?endpoint=http://h&region=r\n",
                "two store lines",
            ),
            ("MBANK-BANK 2\nstore s3://mbank?region=r\n", "no endpoint"),
            ("MBANK-BANK 2\nstore /some/dir\n", "s3://"),
            ("MBANK-BANK 2\nstore\n", "s3://"),
        ];
        for (text, needle) in cases {
            let e = parse_marker(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn init_and_open_a_local_bank_write_version_1() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("bank");
        let bank = Bank::init(&path).unwrap();
        assert!(bank.store_spec().is_none());
        assert_eq!(bank.stats().unwrap().store, "local");
        let text = fs::read_to_string(path.join("MBANK")).unwrap();
        assert!(text.starts_with("MBANK-BANK 1\n"), "{text}");
        assert!(!text.contains("store"), "{text}");
    }

    #[test]
    fn init_with_a_store_refuses_a_directory_with_other_files() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("notes"), "x").unwrap();
        let spec = StoreSpec::parse(GARAGE).unwrap();
        let e = Bank::init_with_store(d.path(), Some(&spec)).err().unwrap();
        assert!(matches!(e, BankError::NotEmpty { .. }), "{e}");
        // A local bank may not have a credentials file in the way either.
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(CREDENTIALS_FILE), "x").unwrap();
        let e = Bank::init(d.path()).err().unwrap();
        assert!(matches!(e, BankError::NotEmpty { .. }), "{e}");
    }

    #[test]
    fn open_refuses_an_exposed_credentials_file_before_any_request() {
        // The endpoint is never contacted: the permission check comes first. (The
        // process environment must not hold AWS credentials for this to reach the
        // file; the test is skipped in that case.)
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_some()
            || std::env::var_os("AWS_SECRET_ACCESS_KEY").is_some()
        {
            eprintln!("AWS_* credentials set in the environment; not testing the file");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path();
        drop(Catalog::open(&path.join("catalog.db"), true, false).unwrap());
        let spec =
            StoreSpec::parse("s3://mbank?endpoint=http://127.0.0.1:9&region=garage").unwrap();
        fs::write(
            path.join("MBANK"),
            marker_text(&VersionId::random(), 1, Some(&spec), false),
        )
        .unwrap();
        let creds = path.join(CREDENTIALS_FILE);
        fs::write(&creds, "key_id=a\nsecret=b\n").unwrap();
        fs::set_permissions(&creds, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Bank::open(path, true).err().unwrap();
        assert!(matches!(e, BankError::CredentialsExposed { .. }), "{e}");
        fs::remove_file(&creds).unwrap();
        let e = Bank::open(path, true).err().unwrap();
        assert!(matches!(e, BankError::NoCredentials { .. }), "{e}");
    }
}
