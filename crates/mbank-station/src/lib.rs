//! # mbank-station
//!
//! The two lightweight hooks on a lab PC: a **chunk cache** shared by every session on
//! the station ([`cache`]), and **write tracking**: each session's writes go to an
//! overlay with a dirty map ([`session`], [`device`]), so checking in sends only the
//! chunks the guest wrote, without rescanning the disk.
//!
//! ## A session's life
//!
//! [`Session`] ([`live`]) holds these steps together for `mbank attach` and `mbank run`:
//! the lease and its heartbeat, the background fetchers, the disk and the streams it
//! reads through one [`cached::CachedStore`], and the end (check-in or discard). With
//! lazy memory, `run` adds the guest's RAM device ([`memory::LazyRam`]): RAM chunks
//! fetched through the same `CachedStore` as the guest touches them, and a suspend that
//! stores only the chunks it wrote (not journalled: a crash loses the RAM, not the disk).
//!
//! 1. [`Station::check_out`] takes the machine's lease in the catalog (one live session
//!    per machine, DESIGN invariant 6), writes `session.json` and an empty overlay.
//! 2. The [`device::Disk`] serves reads and writes (over NBD, see `mbank-nbd`). A FLUSH
//!    or FUA write makes the overlay durable, then appends the checksums of the blocks
//!    it made durable to the session's journal (invariant 4; [`session`] says why a
//!    rewrite of a flushed block first syncs an intent record).
//! 3. Every few minutes, while flushes make new blocks durable, the session commits a
//!    **checkpoint** of its flushed state ([`checkpoint`]), a version it goes on from.
//! 4. [`Station::check_in`] stores the dirty chunks (only those the bank lacks are
//!    written), commits a version whose parent is the last checkpoint, else the version
//!    checked out, moving the head by compare-and-swap from the head seen at check-out (so a session of an older
//!    version becomes the head unless someone moved it; a lost race is kept as its own
//!    version), then releases the lease, deletes the session and applies the machine's
//!    retention policy. Dirty bits live until the version is committed.
//!
//! ## Crashes
//!
//! A session whose process died (kill -9, power loss) stays in `<cache>/sessions/`. The
//! next `mbank attach` or `mbank recover` on the station finds it ([`Station::recover`])
//! and checks in what its durable dirty map and journal name: every flushed write.
//! Before anything is sent, every flushed block is re-hashed; a block that no longer
//! holds what was flushed there (a flipped bit) sets the session aside, naming the
//! blocks, and nothing of it is stored.
//!
//! ## Station identity
//!
//! `<cache>/STATION` holds a random station id (`MBANK-STATION 1` then `id <hex>`). Two
//! cache directories are two stations, even on one host.

pub mod cache;
pub mod cached;
pub mod checkpoint;
pub mod device;
pub mod live;
pub mod memory;
pub mod session;
pub mod workset;
pub mod writeback;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mbank_bank::{Bank, BankError, ImportOptions, NoProgress, Progress, VersionSource};
use mbank_catalog::{CatalogError, CommitOutcome, Lease, NamedStream, now_ms};
use mbank_core::{ChunkId, MachineName, MachineRef, VersionId};
use mbank_store::ChunkStore;
use serde::Serialize;

use crate::cache::ChunkCache;
use crate::cached::CachedStore;
use crate::device::Disk;
pub use crate::live::{Session, SessionOptions};
use crate::session::{DirtyMap, SESSION_FORMAT, SessionDir, SessionMeta};

/// Default bound of a station cache: 10 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;
const STATION_MAGIC: &str = "MBANK-STATION";

/// What went wrong on the station.
#[derive(Debug, thiserror::Error)]
pub enum StationError {
    #[error("station cache: cannot {what}: {why}")]
    Cache { what: String, why: String },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("session state {} is damaged: {why}", path.display())]
    BadSession { path: PathBuf, why: String },
    /// Flushed blocks of a session's overlay no longer hold what was flushed there.
    #[error(
        "the session overlay {} does not hold what was flushed to {}: {}",
        path.display(),
        if blocks.len() == 1 { "one block" } else { "some blocks" },
        describe_blocks(blocks, *chunk_size, *block_size)
    )]
    OverlayDamaged {
        path: PathBuf,
        /// Block numbers (chunk × 64 + block in the chunk).
        blocks: Vec<u64>,
        block_size: u32,
        chunk_size: u32,
    },
    /// A version's recorded working set cannot be used; the session goes on without it.
    #[error(
        "the working set stored with {version} cannot be used: {why}; it is skipped (the \
         guest's reads are fetched as it makes them, and this session records a new one)"
    )]
    Workset { version: String, why: String },
    #[error(transparent)]
    Bank(#[from] BankError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Names damaged overlay blocks by chunk, block and byte range of the disk (the
/// first 16 of them, and how many more).
fn describe_blocks(blocks: &[u64], chunk_size: u32, block_size: u32) -> String {
    let mut out: Vec<String> = blocks
        .iter()
        .take(16)
        .map(|b| {
            let (i, j) = (b / 64, b % 64);
            let off = i * chunk_size as u64 + j * block_size as u64;
            format!("the block at byte {off} of the disk (chunk {i}, block {j})")
        })
        .collect();
    if blocks.len() > 16 {
        out.push(format!("and {} more", blocks.len() - 16));
    }
    out.join(", ")
}

/// What a session did, as `attach --json` prints it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionReport {
    pub machine: String,
    pub session: String,
    pub base: Option<String>,
    /// The version check-in made, if it made one.
    pub version: Option<String>,
    pub head_moved: bool,
    pub bytes_fetched: u64,
    pub chunks_fetched: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub chunks_written: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Dirty chunks the check-in took as the background write-back stored them, without
    /// reading them again.
    pub chunks_written_back: u64,
    pub seconds: f64,
    pub checkin_seconds: f64,
    pub recovered: bool,
    /// Versions the machine's retention policy removed after the check-in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forgotten: Vec<String>,
    /// Why the machine's retention policy could not be applied (the check-in stands).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_error: Option<String>,
    /// Bytes the session sent to the bank (its chunks and streams the bank lacked).
    pub bytes_sent: u64,
    /// Checkpoints the session committed before it ended ([`checkpoint`]).
    pub checkpoints: u64,
    /// Fetches, waits, prefetch and read-ahead, the working set ([`device::SessionStats`]).
    pub stats: device::SessionStats,
    /// Entries of the working set stored with the new version (0: none stored).
    pub workset_stored: u64,
    /// What went wrong without failing the session (a working set skipped, say).
    pub warnings: Vec<String>,
}

/// What a check-in stores besides the disk's dirty chunks.
#[derive(Clone, Debug, Default)]
pub struct CheckinExtras {
    /// The new version's machine configuration; `None` keeps the base version's.
    pub config: Option<String>,
    /// Streams for the new version (a saved `memory` state). The base version's other
    /// streams (`kernel`, `initrd`) are kept unless replaced; its `memory` never is,
    /// because the disk has moved on from it.
    pub streams: Vec<NamedStream>,
    /// Commit a version even when no chunk is dirty: a memory state was saved, or the
    /// machine was powered off and the base's saved memory must not be resumed again.
    pub always: bool,
    /// Chunks and bytes storing `streams` added to the bank, for the statistics.
    pub streams_stored: (u64, u64),
    /// Commit a version to store the working set the session recorded when the base
    /// version has none (a machine's first boot), even with nothing else to commit.
    pub first_working_set: bool,
}

/// A station: its cache directory and identity.
pub struct Station {
    pub dir: PathBuf,
    pub id: String,
    pub name: String,
    pub cache: Arc<ChunkCache>,
}

fn host() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The id in a station marker's text, if it is one.
fn parse_marker(t: &str) -> Option<String> {
    let mut lines = t.lines();
    if lines.next().map(str::trim) != Some(&format!("{STATION_MAGIC} 1")) {
        return None;
    }
    lines
        .find_map(|l| l.strip_prefix("id "))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Writes the station marker durably (temp file, fsync, rename, fsync the directory)
/// with `id`, or a new random one; returns the id. The caller holds the directory's
/// lock ([`lock_dir`]), so two processes opening a new station agree on one id.
fn write_marker(dir: &Path, marker: &Path, id: Option<String>) -> Result<String, StationError> {
    use std::io::Write;
    let id = id.unwrap_or_else(random_hex);
    let tmp = dir.join(format!(".STATION.{}.tmp", std::process::id()));
    (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(format!("{STATION_MAGIC} 1\nid {id}\n").as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, marker)?;
        fs::File::open(dir)?.sync_all()
    })()
    .map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StationError::Io {
            what: format!("write {}", marker.display()),
            source: e,
        }
    })?;
    Ok(id)
}

/// Takes an exclusive `flock` on directory `dir` (waiting for it), held while the
/// returned file is open.
fn lock_dir(dir: &Path) -> Result<fs::File, StationError> {
    let f = fs::File::open(dir).map_err(|e| StationError::Io {
        what: format!("open {}", dir.display()),
        source: e,
    })?;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(StationError::Io {
                what: format!("lock {}", dir.display()),
                source: e,
            });
        }
    }
}

/// True if process `pid` exists and is not a zombie (a killed process whose parent
/// has not reaped it yet is gone for our purposes).
fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// When process `pid` started, in ms since the epoch (to a second or so), if known.
fn process_start_ms(pid: u32) -> Option<i64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, starttime in clock ticks since boot; fields 3.. follow "(comm) ".
    let ticks: i64 = stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let btime: i64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| btime * 1000 + ticks * 1000 / hz as i64)
}

/// Whether process `pid` has `path` open; None if its descriptors cannot be read.
fn holds_open(pid: u32, path: &Path) -> Option<bool> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|p| p == path)),
    )
}

/// True if the session that process `pid` started at `started_ms`, with its overlay at
/// `overlay`, may still be running. A live pid is not enough: after a reboot (a power
/// loss) pids start again and the session's pid may name some unrelated process. That
/// process does not hold the overlay open and started after the session; a session's
/// own process holds its overlay open from just after `started_ms` to its end.
fn session_alive(pid: u32, started_ms: i64, overlay: &Path) -> bool {
    pid_alive(pid)
        && (holds_open(pid, overlay) != Some(false)
            || process_start_ms(pid).is_none_or(|t| t <= started_ms + 2000))
}

/// True if the session in `dir` (of process `pid`, started at `started_ms`) is being
/// served: its process holds the directory's lock. A session of an older mbank
/// (format 1, no lock) is judged by [`session_alive`]; a directory that is gone, by
/// its process.
fn session_live(dir: &Path, pid: u32, started_ms: i64) -> bool {
    let mut sd = SessionDir {
        dir: dir.to_path_buf(),
    };
    if !sd.dir.exists() {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        sd.dir = dir.with_file_name(format!(".new-{name}"));
        if !sd.dir.exists() {
            // Neither made nor being made (a session has one or the other from
            // before its lease is taken to its end): it ended, or was set aside.
            return false;
        }
        // Being made: alive while its maker holds the lock.
        return matches!(sd.try_lock(), Ok(None));
    }
    let old_format = sd.read_meta().map_or(true, |m| m.format < 2);
    match sd.try_lock() {
        Ok(None) => pid_alive(pid) || !old_format,
        Ok(Some(_)) if !old_format => false,
        _ => session_alive(pid, started_ms, &sd.overlay_path()),
    }
}

/// How a session names its bank: the bank directory's canonical path.
/// A session record's bank as [`Bank::location`] names it: URLs as they are,
/// directories canonical.
fn bank_path(bank: &str) -> String {
    if bank.contains("://") {
        return bank.to_string();
    }
    let p = Path::new(bank);
    fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// The id of the version a session's check-in makes: derived from the session id.
fn checkin_version_id(session: &str) -> VersionId {
    let h = mbank_core::ChunkId::of(format!("mbank check-in of session {session}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    VersionId::from_bytes(b)
}

fn random_hex() -> String {
    VersionId::random().to_hex()
}

impl Station {
    /// The cache directory to use when none is given: `$MBANK_CACHE` is handled by the
    /// CLI; this is `/var/cache/mbank` for root, else `$XDG_CACHE_HOME/mbank` or
    /// `~/.cache/mbank`.
    pub fn default_dir() -> PathBuf {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/cache/mbank");
        }
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(x).join("mbank");
        }
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache/mbank"))
            .unwrap_or_else(|| PathBuf::from("/tmp/mbank-cache"))
    }

    /// Opens (creating if needed) the station whose cache is `dir`.
    pub fn open(dir: &Path, cache_size: u64) -> Result<Station, StationError> {
        let sessions = dir.join("sessions");
        let new = !sessions.exists();
        // The cache and its sessions are private to the station's user (one service
        // account serves every user of the PC): 0700, whatever the umask.
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&sessions)
            .map_err(|e| StationError::Io {
                what: format!("create the station cache {}", dir.display()),
                source: e,
            })?;
        if new {
            // The directories must survive a power loss before sessions go in them.
            for d in [Some(dir), dir.parent()].into_iter().flatten() {
                let _ = fs::File::open(d).and_then(|f| f.sync_all());
            }
        }
        let marker = dir.join("STATION");
        let read = || {
            fs::read_to_string(&marker)
                .ok()
                .and_then(|t| parse_marker(&t))
        };
        let id = match read() {
            Some(id) => id,
            None => {
                // Missing, or damaged (say, empty after a power loss under an older
                // mbank): written under the directory's lock, with the id the
                // station's sessions record if any, so processes agree on one id.
                let _lock = lock_dir(dir)?;
                match read() {
                    Some(id) => id,
                    None => write_marker(dir, &marker, Self::id_from_sessions(&sessions))?,
                }
            }
        };
        let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Ok(Station {
            name: format!("{}:{}", host(), dir.display()),
            cache: {
                let c = Arc::new(ChunkCache::open(&dir, cache_size)?);
                c.start_use_writer();
                c
            },
            id,
            dir,
        })
    }

    /// The station id its sessions record, if any session records one.
    fn id_from_sessions(sessions: &Path) -> Option<String> {
        fs::read_dir(sessions).ok()?.flatten().find_map(|e| {
            SessionDir { dir: e.path() }
                .read_meta()
                .ok()
                .map(|m| m.station)
                .filter(|s| parse_marker(&format!("{STATION_MAGIC} 1\nid {s}\n")).is_some())
        })
    }

    fn sessions_dir(&self) -> PathBuf {
        self.dir.join("sessions")
    }

    /// Checks out `r` for a new session: takes the lease (refusing, unless `force`, if
    /// another live session holds it) and prepares the overlay.
    pub fn check_out(
        &self,
        bank: &mut Bank,
        r: &MachineRef,
        force: bool,
        fetch_from: Arc<dyn ChunkStore>,
    ) -> Result<Arc<Disk>, StationError> {
        // The head as the session begins; the check-in expects it still there.
        let head_at_start = bank.catalog().machine(&r.machine)?.and_then(|m| m.head);
        let v = match (&r.version, head_at_start) {
            (None, Some(h)) => bank.resolve(&MachineRef {
                machine: r.machine.clone(),
                version: Some(h.to_hex()),
            })?,
            _ => bank.resolve(r)?,
        };
        let index = bank.catalog().disk_index(&v)?;
        let session = random_hex();
        let lease = Lease {
            machine: v.machine.to_string(),
            session: session.clone(),
            station: self.id.clone(),
            station_name: self.name.clone(),
            pid: std::process::id(),
            base: Some(v.id),
            started_ms: now_ms(),
            heartbeat_ms: now_ms(),
        };
        let my_station = self.id.clone();
        let sessions = self.sessions_dir();
        // The session's directory exists, locked, before its lease is taken, so no
        // other process on the station takes the lease for a dead session's.
        let new = SessionDir::begin(sessions.join(&session))?;
        // A session that holds the machine is replaced with --force, or when it is a
        // dead session of this station. Asking again names the session replaced, so a
        // third session taking the lease in between is not displaced unseen.
        let mut replace: Option<String> = None;
        let mut taken = None;
        for _ in 0..3 {
            match bank.catalog_mut().take_lease(&lease, replace.as_deref()) {
                Err(CatalogError::LeaseHeld { held, .. })
                    if replace.as_deref() != Some(held.session.as_str())
                        && (force
                            || (held.station == my_station
                                && !session_live(
                                    &sessions.join(&held.session),
                                    held.pid,
                                    held.started_ms,
                                ))) =>
                {
                    replace = Some(held.session.clone());
                }
                r => {
                    taken = Some(r.map(|_| ()));
                    break;
                }
            }
        }
        match taken {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                new.abandon();
                return Err(e.into());
            }
            None => {
                new.abandon();
                return Err(StationError::Cache {
                    what: format!("take the lease of {}", v.machine),
                    why: "it changed hands three times while this station asked; try again".into(),
                });
            }
        }
        let meta = SessionMeta {
            format: SESSION_FORMAT,
            session: session.clone(),
            machine: v.machine.to_string(),
            base: Some(v.id.to_hex()),
            disk_size: index.disk_size,
            chunk_size: index.chunk_size,
            station: self.id.clone(),
            pid: std::process::id(),
            started_ms: now_ms(),
            bank: bank.location().to_string(),
            head_at_start: Some(head_at_start.map_or_else(|| "none".into(), |h| h.to_hex())),
            checkpoint: None,
        };
        let files = match new.finish(&meta) {
            Ok(x) => x,
            Err(e) => {
                let _ = bank.catalog().release_lease(&v.machine, &session);
                return Err(e);
            }
        };
        let disk = Disk::new(meta, files, index, self.cache.clone(), fetch_from);
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        // For tests and benchmarks: fold the journal into the map more (or less) often.
        if let Some(b) = env("MBANK_JOURNAL_COMPACT_BYTES") {
            disk.set_compact_bytes(b);
        }
        // For tests and benchmarks: when the recording of the working set ends.
        disk.set_recording(
            std::time::Duration::from_millis(
                env("MBANK_WSET_QUIET_MS").unwrap_or(workset::DEFAULT_QUIET_MS),
            ),
            std::time::Duration::from_millis(
                env("MBANK_WSET_MAX_MS").unwrap_or(workset::DEFAULT_MAX_MS),
            ),
        );
        Ok(Arc::new(disk))
    }

    /// Checks in a live session: flushes it, stores its dirty chunks, commits a version,
    /// releases the lease and deletes the session.
    pub fn check_in(
        &self,
        bank: &mut Bank,
        disk: &Disk,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<SessionReport, StationError> {
        self.check_in_with(bank, disk, &CheckinExtras::default(), opts, progress)
    }

    /// [`Station::check_in`], storing `extras` with the new version.
    pub fn check_in_with(
        &self,
        bank: &mut Bank,
        disk: &Disk,
        extras: &CheckinExtras,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<SessionReport, StationError> {
        disk.flush_sync().map_err(|e| StationError::Io {
            what: "flush the session before check-in".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        disk.stop_background();
        let mut extras = extras.clone();
        let map = disk.durable_map();
        let mut warnings = Vec::new();
        let (guard, stored) =
            match self.store_working_set(bank, disk, &map, &mut extras, &mut warnings) {
                Ok(Some((g, n))) => (Some(g), n),
                Ok(None) => (None, 0),
                Err(e) => {
                    warnings.push(format!(
                        "the working set this session recorded was not stored ({e}); the \
                         next session of {} fetches as the guest reads",
                        disk.meta.machine
                    ));
                    (None, 0)
                }
            };
        let meta = disk.meta_now();
        let known = disk.written_back(&map);
        let mut report = self.commit(
            bank,
            &meta,
            &disk.dir,
            &disk.base,
            (disk.overlay(), &map, &known),
            &extras,
            opts,
            progress,
        )?;
        drop(guard);
        report.checkpoints = meta.checkpoint.as_ref().map_or(0, |c| c.count);
        report.stats = disk.stats();
        if report.stats.workset_missing > 0 {
            warnings.push(format!(
                "the working set of {} named {} chunks the bank no longer has; they were \
                 skipped",
                disk.meta.machine, report.stats.workset_missing
            ));
        }
        report.workset_stored = if report.version.is_some() { stored } else { 0 };
        report.warnings = warnings;
        report.bytes_sent = report.bytes_uploaded;
        report.bytes_fetched = disk.counters.bytes_fetched.load(Ordering::Relaxed);
        report.chunks_fetched = disk.counters.chunks_fetched.load(Ordering::Relaxed);
        report.cache_hits = self.cache.counters.hits.load(Ordering::Relaxed);
        report.cache_misses = self.cache.counters.misses.load(Ordering::Relaxed);
        let _ = self.cache.sync();
        Ok(report)
    }

    /// Stores the working set `disk` recorded as a stream for the check-in's version,
    /// when a version is committed anyway or `extras.first_working_set` asks for one
    /// and the base version has none. Returns the writer guard protecting its chunks
    /// until the commit, and its entries.
    fn store_working_set(
        &self,
        bank: &mut Bank,
        disk: &Disk,
        map: &DirtyMap,
        extras: &mut CheckinExtras,
        warnings: &mut Vec<String>,
    ) -> Result<Option<(mbank_bank::WriterGuard, u64)>, StationError> {
        let ws = disk.take_working_set();
        if ws.entries.is_empty() {
            return Ok(None);
        }
        let base_has = match self.base_version(bank, disk) {
            Ok(v) => v.streams.iter().any(|s| s == workset::STREAM_NAME),
            Err(e) => {
                warnings.push(format!("{e}"));
                true
            }
        };
        let commit = !map.dirty_chunks().is_empty() || extras.always;
        if !commit && (base_has || !extras.first_working_set) {
            return Ok(None);
        }
        // A recording cut short keeps what it inherited (see `WorkingSet::merged_with`).
        let ws = match (base_has, self.base_version(bank, disk)) {
            (true, Ok(v)) => match self.load_working_set(bank, &v) {
                Ok(Some((inherited, _))) => ws.merged_with(&inherited),
                Ok(None) | Err(_) => ws,
            },
            _ => ws,
        };
        let guard = bank.begin_write(&format!("working set of {}", disk.meta.machine))?;
        let (idx, st) = bank.store_stream(&guard, &ws.encode()[..])?;
        extras
            .streams
            .retain(|(n, _)| n.as_str() != workset::STREAM_NAME);
        extras.streams.push((workset::STREAM_NAME.to_string(), idx));
        extras.streams_stored.0 += st.chunks_new;
        extras.streams_stored.1 += st.bytes_stored;
        extras.always = true;
        Ok(Some((guard, ws.entries.len() as u64)))
    }

    /// The version a session checked out.
    fn base_version(
        &self,
        bank: &Bank,
        disk: &Disk,
    ) -> Result<mbank_catalog::VersionInfo, StationError> {
        let machine: MachineName =
            disk.meta
                .machine
                .parse()
                .map_err(|e| StationError::BadSession {
                    path: disk.dir.meta_path(),
                    why: format!("{e}"),
                })?;
        let base = disk
            .meta
            .base
            .clone()
            .ok_or_else(|| StationError::BadSession {
                path: disk.dir.meta_path(),
                why: "the session names no base version".into(),
            })?;
        Ok(bank.resolve(&MachineRef {
            machine,
            version: Some(base),
        })?)
    }

    /// Queues the working set stored with the session's version for `disk`'s
    /// background fetchers ([`Disk::start_background`]); returns how many entries were
    /// queued (0 if the version has none). A record that cannot be read or parsed is
    /// [`StationError::Workset`], for the caller to show as a warning: the session
    /// goes on without it.
    pub fn replay_working_set(&self, bank: &Bank, disk: &Disk) -> Result<u64, StationError> {
        let v = self.base_version(bank, disk)?;
        Ok(match self.load_working_set(bank, &v)? {
            Some((ws, ids)) => disk.replay(&ws, ids),
            None => 0,
        })
    }

    /// The working set stored with version `v`, if it has one, and the chunk ids of
    /// its other streams (which a stream entry may name).
    fn load_working_set(
        &self,
        bank: &Bank,
        v: &mbank_catalog::VersionInfo,
    ) -> Result<Option<(workset::WorkingSet, std::collections::HashSet<ChunkId>)>, StationError>
    {
        let streams = bank.catalog().streams(v)?;
        let Some((_, idx)) = streams.iter().find(|(n, _)| n == workset::STREAM_NAME) else {
            return Ok(None);
        };
        let bad = |why: String| StationError::Workset {
            version: format!("{}@{}", v.machine, v.id.short()),
            why,
        };
        let bound = (workset::HEADER_LEN
            + workset::MAX_ENTRIES as usize * workset::ENTRY_LEN
            + workset::TRAILER_LEN) as u64;
        if idx.total_len > bound {
            return Err(bad(format!(
                "its stream is {} bytes, more than a record may be ({bound})",
                idx.total_len
            )));
        }
        let mut bytes = Vec::with_capacity(idx.total_len as usize);
        bank.restore_stream(idx, &mut bytes)
            .map_err(|e| bad(format!("reading it failed: {e}")))?;
        let ws = workset::WorkingSet::decode(&bytes).map_err(|e| bad(e.to_string()))?;
        let ids: std::collections::HashSet<ChunkId> = streams
            .iter()
            .filter(|(n, _)| n != workset::STREAM_NAME)
            .flat_map(|(_, i)| i.runs.iter().filter_map(|r| r.id))
            .collect();
        Ok(Some((ws, ids)))
    }

    /// Ends a session without a check-in: its writes are dropped.
    pub fn discard(&self, bank: &Bank, disk: &Disk) -> Result<(), StationError> {
        let m: MachineName = disk
            .meta
            .machine
            .parse()
            .map_err(|e| StationError::BadSession {
                path: disk.dir.dir.clone(),
                why: format!("{e}"),
            })?;
        bank.catalog().release_lease(&m, &disk.meta.session)?;
        disk.dir.remove()
    }

    /// Commits the session's writes: `written` is the overlay, its durable map, and the
    /// dirty chunks the write-back already stored with their ids
    /// ([`device::Disk::written_back`]), which are taken as they are.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        bank: &mut Bank,
        meta: &SessionMeta,
        dir: &SessionDir,
        base: &mbank_core::DiskIndex,
        written: (&fs::File, &DirtyMap, &HashMap<usize, Option<ChunkId>>),
        extras: &CheckinExtras,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<SessionReport, StationError> {
        let (overlay, map, known) = written;
        let started = Instant::now();
        let dirty = map.dirty_chunks();
        let machine: MachineName = meta.machine.parse().map_err(|e| StationError::BadSession {
            path: dir.meta_path(),
            why: format!("{e}"),
        })?;
        let mut report = SessionReport {
            machine: meta.machine.clone(),
            session: meta.session.clone(),
            base: meta.base.clone(),
            chunks_written: dirty.len() as u64,
            seconds: (now_ms() - meta.started_ms) as f64 / 1000.0,
            ..Default::default()
        };
        // The check-in's version id follows from the session, so a check-in repeated
        // after a crash between its commit and the session's removal is recognised.
        let id = checkin_version_id(&meta.session);
        let commit = !dirty.is_empty() || extras.always;
        let repeated = match commit {
            true => bank.repeated_commit(&machine, id)?,
            false => None,
        };
        if let Some(outcome) = repeated {
            report.version = Some(id.to_hex());
            report.head_moved = outcome == CommitOutcome::HeadMoved;
        } else if commit {
            // Nothing goes to the bank unless every flushed block still holds what was
            // flushed there (a flipped bit in the overlay is not stored as valid data).
            // (Those the write-back stored were checked against the same checksums
            // when it read them.)
            let mut check = map.clone();
            check
                .sums
                .retain(|block, _| !known.contains_key(&((block / 64) as usize)));
            let bad = session::damaged_blocks(overlay, &dir.overlay_path(), &check)?;
            if !bad.is_empty() {
                return Err(StationError::OverlayDamaged {
                    path: dir.overlay_path(),
                    blocks: bad,
                    block_size: map.block_size,
                    chunk_size: map.chunk_size,
                });
            }
            let writer = bank.begin_write(&format!("check-in {}", meta.machine))?;
            // The session's last checkpoint, if it made one, else the version it
            // checked out; the dirty chunks are all sent again over the base, and
            // those the checkpoint stored already cost a `have` query, not an upload.
            let parent = meta.parent_version()?;
            // The chunks the write-back stored go into the index as they are (durable
            // in the bank, kept from GC by the session's writer until this commit).
            let mut over = base.clone();
            for (&i, id) in known {
                over.chunks[i] = *id;
            }
            let dirty: Vec<usize> = dirty
                .into_iter()
                .filter(|i| !known.contains_key(i))
                .collect();
            report.chunks_written_back = known.len() as u64;
            let total = dirty.iter().map(|&i| base.chunk_len(i) as u64).sum();
            // A chunk the session wrote only in part is assembled in memory: the
            // blocks the dirty map names from the overlay, the rest from its base
            // chunk, verified now (re-hashed from the cache, or fetched and checked).
            let chunks = CachedStore::new(self.cache.clone(), bank.store_arc());
            let overlay_path = dir.overlay_path();
            let items = dirty.into_iter().map(move |i| {
                let fetch = |id: &ChunkId| {
                    chunks
                        .fetch_verified(id)
                        .map(Arc::unwrap_or_clone)
                        .map_err(|e| e.to_string())
                };
                device::assemble_chunk(overlay, &overlay_path, base, map, i, &fetch)
                    .map(|buf| (i, Some(buf)))
                    .map_err(|e| BankError::Image {
                        path: overlay_path.clone(),
                        why: format!("{e}"),
                    })
            });
            // What the version inherits from its parent is the bank's rule.
            let source = VersionSource {
                description: format!("check-in from {}", self.name),
                parent,
                expected_head: meta.expected_head(parent),
                base: over,
                items: Box::new(items),
                total_bytes: total,
                id: Some(id),
                config: extras.config.clone(),
                streams: extras.streams.clone(),
                streams_stored: extras.streams_stored,
            };
            let r = bank.derive_version(&machine, id, source, &writer, opts, progress)?;
            report.version = Some(r.version);
            report.head_moved = r.head_moved;
            report.chunks_uploaded = r.chunks_new;
            report.bytes_uploaded = r.bytes_stored;
        }
        // The version is committed: only now may the dirty map go.
        bank.catalog().release_lease(&machine, &meta.session)?;
        dir.remove()?;
        // The machine's retention policy runs once the session no longer protects its
        // base. Its failure leaves more versions than the policy wants, nothing worse.
        if report.version.is_some() {
            match bank.apply_policy(&machine) {
                Ok(Some(f)) => report.forgotten = f.removed.iter().map(|v| v.to_hex()).collect(),
                Ok(None) => {}
                Err(e) => report.policy_error = Some(e.to_string()),
            }
        }
        report.checkin_seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// The live session of `machine` on this station, if there is one.
    pub fn live_session(&self, machine: &MachineName) -> Option<(SessionDir, SessionMeta)> {
        self.live_sessions()
            .into_iter()
            .find(|(_, meta)| meta.machine == machine.as_str())
    }

    /// Every live session on this station (its process runs), in no particular order.
    /// Sessions being made, dead ones (for `recover`) and unreadable ones are left out.
    pub fn live_sessions(&self) -> Vec<(SessionDir, SessionMeta)> {
        let Ok(entries) = fs::read_dir(self.sessions_dir()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let dir = SessionDir { dir: entry.path() };
            let Ok(meta) = dir.read_meta() else { continue };
            if session_live(&dir.dir, meta.pid, meta.started_ms) {
                out.push((dir, meta));
            }
        }
        out
    }

    /// Where sessions that recovery could not account for are kept.
    pub fn damaged_dir(&self) -> PathBuf {
        self.dir.join("damaged")
    }

    /// Finds sessions on this station whose process is gone and checks in what their
    /// durable dirty maps name: every flushed write. Sessions of live processes, and
    /// those another process is recovering, are left alone. One session's trouble
    /// stops only that session: a damaged one is moved to [`Station::damaged_dir`]
    /// (never deleted), one that cannot be checked in now (the bank is away, a base
    /// chunk is damaged) stays for the next try; both are reported in
    /// [`Recovery::problems`] with what to do, and the others go on.
    pub fn recover(&self, bank: &mut Bank, opts: &ImportOptions) -> Result<Recovery, StationError> {
        let mut out = Recovery::default();
        let entries = match fs::read_dir(self.sessions_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(StationError::Io {
                    what: format!("list {}", self.sessions_dir().display()),
                    source: e,
                });
            }
        };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for path in dirs {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !path.is_dir() {
                continue;
            }
            let dir = SessionDir { dir: path.clone() };
            if name.starts_with(".new-") {
                self.clean_unfinished(&dir);
                continue;
            }
            if name.starts_with('.') {
                continue;
            }
            // Held: the session is alive, or another process is recovering it.
            let _lock = match dir.try_lock() {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                // Gone since we listed it: another process finished it.
                Err(_) if !path.exists() => continue,
                Err(e) => {
                    out.problems
                        .push(self.problem(bank, &dir, None, false, e.to_string()));
                    continue;
                }
            };
            if !path.exists() {
                continue;
            }
            match self.recover_one(bank, &dir, opts) {
                Ok(Some(r)) => out.recovered.push(r),
                Ok(None) => {}
                Err(p) => out.problems.push(*p),
            }
        }
        Ok(out)
    }

    /// A `.new-` session directory whose creator died before it was complete has
    /// served nothing: it goes once it is unlocked and a minute old (a younger one may
    /// be between its creation and its lock).
    fn clean_unfinished(&self, dir: &SessionDir) {
        let old = fs::metadata(&dir.dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60));
        if old && let Ok(Some(_lock)) = dir.try_lock() {
            let _ = dir.remove();
        }
    }

    fn problem(
        &self,
        bank: &Bank,
        dir: &SessionDir,
        meta: Option<&SessionMeta>,
        set_aside: bool,
        why: String,
    ) -> SessionProblem {
        let session = meta.map_or_else(
            || {
                dir.dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            },
            |m| m.session.clone(),
        );
        let machine = meta.map(|m| m.machine.clone());
        let base = meta.and_then(|m| m.base.clone());
        let mut kept_at = dir.dir.clone();
        let mut why = why;
        let advice = if set_aside {
            match dir.set_aside(&self.damaged_dir(), &why) {
                Ok(to) => {
                    kept_at = to;
                    // Dead and out of the way: the machine is free for a new session.
                    if let Some(m) = meta
                        && let Ok(name) = m.machine.parse::<MachineName>()
                    {
                        let _ = bank.catalog().release_lease(&name, &m.session);
                    }
                    format!(
                        "nothing was checked in from it and nothing was deleted: its files are kept in {} \
                         (`overlay` is a raw image holding the blocks it wrote, `WHY` says what is wrong); \
                         {} starts from its last version on the next run; remove that directory once you \
                         no longer need it",
                        kept_at.display(),
                        machine.as_deref().unwrap_or("the machine")
                    )
                }
                Err(e) => {
                    why = format!("{why}; moving it aside failed too: {e}");
                    "it stays where it is; move it out of the sessions directory by hand".into()
                }
            }
        } else {
            "it stays where it is, and the next `mbank recover` (or attach or run) on this station \
             tries again once the cause is fixed"
                .into()
        };
        SessionProblem {
            session,
            machine,
            base,
            kept_at,
            set_aside,
            why,
            advice,
        }
    }

    /// Recovers the session in `dir`, which the caller has locked. `Ok(None)`: not
    /// this call's to recover (alive, another bank's) or nothing to recover.
    fn recover_one(
        &self,
        bank: &mut Bank,
        dir: &SessionDir,
        opts: &ImportOptions,
    ) -> Result<Option<SessionReport>, Box<SessionProblem>> {
        let damaged = |bank: &Bank, meta: Option<&SessionMeta>, why: String| {
            Box::new(self.problem(bank, dir, meta, true, why))
        };
        let meta = match dir.read_meta() {
            Ok(m) => m,
            Err(e) => {
                // No metadata and nothing written: an empty session, nothing to keep.
                if !dir.meta_path().exists()
                    && !dir.dirty_path().exists()
                    && !dir.overlay_has_data().unwrap_or(true)
                {
                    let _ = dir.remove();
                    return Ok(None);
                }
                let why = if dir.meta_path().exists() {
                    format!("{e}")
                } else {
                    format!("{} is missing", dir.meta_path().display())
                };
                return Err(damaged(bank, None, why));
            }
        };
        // Sessions of an older mbank hold no lock: judge them by their process.
        if meta.format < 2 && session_alive(meta.pid, meta.started_ms, &dir.overlay_path()) {
            return Ok(None);
        }
        // The cache is shared by every bank used on this station: a session of
        // another bank is that bank's to recover (its versions are not in this one).
        if bank_path(&meta.bank) != bank.location() {
            return Ok(None);
        }
        let m = &meta;
        let base_id = match meta.base_version() {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => return Err(damaged(bank, Some(m), e.to_string())),
        };
        let machine: MachineName = meta.machine.parse().map_err(|e| {
            damaged(
                bank,
                Some(m),
                format!("machine name {:?}: {e}", meta.machine),
            )
        })?;
        // Trouble reaching the bank is not the session's damage: it stays for later.
        let later = |bank: &Bank, e: String| Box::new(self.problem(bank, dir, Some(m), false, e));
        let v = bank
            .resolve(&MachineRef {
                machine,
                version: Some(base_id.to_hex()),
            })
            .map_err(|e| later(bank, format!("its base version: {e}")))?;
        let base = bank
            .catalog()
            .disk_index(&v)
            .map_err(|e| later(bank, format!("its base version's index: {e}")))?;
        if (base.disk_size, base.chunk_size) != (meta.disk_size, meta.chunk_size) {
            return Err(damaged(
                bank,
                Some(m),
                format!(
                    "it records a disk of {} bytes in chunks of {}, its base version has {} in {}",
                    meta.disk_size, meta.chunk_size, base.disk_size, base.chunk_size
                ),
            ));
        }
        let map = if dir.dirty_path().exists() || meta.format >= 2 {
            match dir.read_dirty(base.disk_size, base.chunk_size) {
                Ok(map) if dir.dirty_path().exists() => map,
                Ok(_) => {
                    return Err(damaged(
                        bank,
                        Some(m),
                        format!("{} is missing", dir.dirty_path().display()),
                    ));
                }
                Err(e) => return Err(damaged(bank, Some(m), e.to_string())),
            }
        } else if dir.overlay_has_data().unwrap_or(true) {
            // An older mbank's session that never flushed, with data in its overlay:
            // what it holds was never acknowledged, but it is not ours to throw away.
            return Err(damaged(
                bank,
                Some(m),
                "it has no dirty map, but its overlay holds data".into(),
            ));
        } else {
            session::DirtyMap::clean(base.disk_size, base.chunk_size)
        };
        let dirty = map.dirty_chunks();
        let overlay = match fs::File::open(dir.overlay_path()) {
            Ok(f) => f,
            Err(e) if dirty.is_empty() && e.kind() == std::io::ErrorKind::NotFound => {
                fs::File::open("/dev/null").map_err(|e| later(bank, e.to_string()))?
            }
            Err(e) => {
                return Err(damaged(
                    bank,
                    Some(m),
                    format!("cannot open {}: {e}", dir.overlay_path().display()),
                ));
            }
        };
        let end = dirty.last().map_or(0, |&i| {
            i as u64 * base.chunk_size as u64 + map.chunk_len(i) as u64
        });
        match overlay.metadata() {
            Ok(md) if md.len() >= end => {}
            Ok(md) => {
                return Err(damaged(
                    bank,
                    Some(m),
                    format!(
                        "{} is {} bytes, short of the {end} its dirty map needs",
                        dir.overlay_path().display(),
                        md.len()
                    ),
                ));
            }
            Err(e) => return Err(later(bank, e.to_string())),
        }
        let extras = CheckinExtras::default();
        let mut r = self
            .commit(
                bank,
                &meta,
                dir,
                &base,
                (&overlay, &map, &Default::default()),
                &extras,
                opts,
                &NoProgress,
            )
            .map_err(|e| match e {
                StationError::OverlayDamaged { .. } => damaged(bank, Some(m), e.to_string()),
                e => later(bank, format!("checking it in failed: {e}")),
            })?;
        r.recovered = true;
        Ok(Some(r))
    }
}

/// A session recovery could not check in, and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionProblem {
    pub session: String,
    pub machine: Option<String>,
    pub base: Option<String>,
    /// Where the session's files are now.
    pub kept_at: PathBuf,
    /// True if the session was damaged and moved out of the sessions directory;
    /// false if it stays there to be tried again.
    pub set_aside: bool,
    pub why: String,
    pub advice: String,
}

impl std::fmt::Display for SessionProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (&self.machine, &self.base) {
            (Some(m), Some(b)) => {
                format!("session {} of {m}@{}", self.session, &b[..b.len().min(12)])
            }
            (Some(m), None) => format!("session {} of {m}", self.session),
            _ => format!("session {}", self.session),
        };
        let verb = if self.set_aside {
            "is damaged"
        } else {
            "could not be checked in"
        };
        write!(f, "{what} {verb}: {}; {}", self.why, self.advice)
    }
}

/// What [`Station::recover`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Recovery {
    pub recovered: Vec<SessionReport>,
    pub problems: Vec<SessionProblem>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbank_store::LocalStore;

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    #[test]
    fn a_check_in_repeated_after_a_crash_makes_no_second_version() {
        let d = tempfile::tempdir().unwrap();
        let mut bank = Bank::init(&d.path().join("bank")).unwrap();
        let img = d.path().join("disk.raw");
        fs::write(&img, vec![7u8; 1 << 20]).unwrap();
        let m: MachineName = "alice/dev".parse().unwrap();
        bank.import(&m, &img, &ImportOptions::default(), &NoProgress)
            .unwrap();
        let station = Station::open(&d.path().join("cache"), 64 << 20).unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(LocalStore::open(bank.root().unwrap()).unwrap());
        let r: MachineRef = "alice/dev".parse().unwrap();
        let disk = station.check_out(&mut bank, &r, false, store).unwrap();
        disk.write_sync(4096, Some(&[1u8; 4096]), 4096).unwrap();
        disk.flush_sync().unwrap();
        // What a crash right after the commit would leave: the session directory.
        let saved = d.path().join("saved");
        copy_dir(&disk.dir.dir, &saved);
        let first = station
            .check_in(&mut bank, &disk, &ImportOptions::default(), &NoProgress)
            .unwrap();
        let v = first.version.clone().unwrap();
        let mut meta: SessionMeta =
            serde_json::from_slice(&fs::read(saved.join("session.json")).unwrap()).unwrap();
        meta.pid = u32::MAX - 1; // a process that does not exist
        fs::write(
            saved.join("session.json"),
            serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        copy_dir(&saved, &disk.dir.dir);
        let again = station
            .recover(&mut bank, &ImportOptions::default())
            .unwrap()
            .recovered;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].version.as_deref(), Some(v.as_str()));
        assert_eq!(
            bank.log(&m).unwrap().len(),
            2,
            "no second copy of the check-in"
        );
        assert!(!disk.dir.dir.exists());
    }

    struct Setup {
        d: tempfile::TempDir,
        bank: Bank,
        station: Station,
        image: Vec<u8>,
    }

    /// A bank holding alice/dev and bob/dev (1 MiB each, 16 chunks) and a station.
    fn setup() -> Setup {
        let d = tempfile::tempdir().unwrap();
        let mut bank = Bank::init(&d.path().join("bank")).unwrap();
        let image: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8 | 1).collect();
        let img = d.path().join("disk.raw");
        fs::write(&img, &image).unwrap();
        for m in ["alice/dev", "bob/dev"] {
            let m: MachineName = m.parse().unwrap();
            bank.import(&m, &img, &ImportOptions::default(), &NoProgress)
                .unwrap();
        }
        let station = Station::open(&d.path().join("cache"), 64 << 20).unwrap();
        Setup {
            d,
            bank,
            station,
            image,
        }
    }

    impl Setup {
        /// A session of `machine` that wrote `data` at `off`, flushed, and died.
        fn dead_session(&mut self, machine: &str, off: u64, data: &[u8]) -> SessionDir {
            let store: Arc<dyn ChunkStore> =
                Arc::new(LocalStore::open(self.bank.root().unwrap()).unwrap());
            let r: MachineRef = machine.parse().unwrap();
            let disk = self
                .station
                .check_out(&mut self.bank, &r, false, store)
                .unwrap();
            disk.write_sync(off, Some(data), data.len() as u64).unwrap();
            disk.flush_sync().unwrap();
            let dir = disk.dir.clone();
            drop(disk); // its lock goes with it, as with a killed process
            dir
        }

        fn export(&self, machine: &str) -> Vec<u8> {
            let out = self.d.path().join("out.raw");
            let r: MachineRef = machine.parse().unwrap();
            self.bank.export(&r, &out, 2, &NoProgress).unwrap();
            fs::read(out).unwrap()
        }

        fn recover(&mut self) -> Recovery {
            self.station
                .recover(&mut self.bank, &ImportOptions::default())
                .unwrap()
        }
    }

    /// A session whose dirty map or metadata is gone is not taken for one that wrote
    /// nothing: its overlay is kept aside, reported, and no version is made from it.
    #[test]
    fn a_session_missing_its_files_is_kept_aside_not_deleted() {
        for lost in ["dirty", "session.json"] {
            let mut s = setup();
            let dir = s.dead_session("alice/dev", 4096, &[9u8; 4096]);
            fs::remove_file(dir.dir.join(lost)).unwrap();
            let r = s.recover();
            assert!(r.recovered.is_empty(), "{lost}: {r:?}");
            assert_eq!(r.problems.len(), 1, "{lost}: {r:?}");
            let p = &r.problems[0];
            assert!(p.set_aside && p.why.contains(lost), "{lost}: {p}");
            assert!(
                !dir.dir.exists(),
                "{lost}: moved out of the sessions directory"
            );
            let kept = fs::read(p.kept_at.join("overlay")).unwrap();
            assert_eq!(kept[4096..8192], [9u8; 4096], "{lost}: the overlay is kept");
            assert!(p.advice.contains(&p.kept_at.display().to_string()));
            assert_eq!(s.export("alice/dev"), s.image, "{lost}: no version made");
            // Nothing more to do, and the machine can be checked out again.
            let again = s.recover();
            assert!(again.recovered.is_empty() && again.problems.is_empty());
            s.dead_session("alice/dev", 0, &[1u8; 4096]);
            assert_eq!(s.recover().recovered.len(), 1, "{lost}");
        }
    }

    /// One session with a damaged dirty map or metadata stops only itself: the others
    /// on the station are recovered, and the damaged one is set aside with the reason.
    #[test]
    fn a_damaged_session_does_not_stop_the_others() {
        for (file, damage) in [("dirty", "truncate"), ("session.json", "garbage")] {
            let mut s = setup();
            let bad = s.dead_session("alice/dev", 0, &[7u8; 8192]);
            s.dead_session("bob/dev", 65536, &[8u8; 4096]);
            let p = bad.dir.join(file);
            let bytes = fs::read(&p).unwrap();
            match damage {
                "truncate" => fs::write(&p, &bytes[..bytes.len() / 2]).unwrap(),
                _ => fs::write(&p, b"{ not json").unwrap(),
            }
            let r = s.recover();
            assert_eq!(r.recovered.len(), 1, "{file}: {r:?}");
            assert_eq!(r.recovered[0].machine, "bob/dev");
            assert_eq!(r.problems.len(), 1, "{file}: {r:?}");
            assert!(r.problems[0].set_aside, "{file}");
            let mut want = s.image.clone();
            want[65536..65536 + 4096].fill(8);
            assert_eq!(s.export("bob/dev"), want, "{file}");
            assert_eq!(s.export("alice/dev"), s.image, "{file}");
            assert!(s.d.path().join("cache/damaged").read_dir().unwrap().count() == 1);
        }
    }

    /// Two recoveries of one dead session at once: one checks it in, the other leaves
    /// it alone; neither fails, and there is one version.
    #[test]
    fn concurrent_recoveries_check_a_session_in_once() {
        for round in 0..8 {
            let mut s = setup();
            s.dead_session("alice/dev", 0, &[round as u8 + 1; 4096]);
            let bank_dir = s.bank.root().unwrap().to_path_buf();
            let cache_dir = s.station.dir.clone();
            let results: Vec<Recovery> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..2)
                    .map(|_| {
                        let (b, c) = (bank_dir.clone(), cache_dir.clone());
                        sc.spawn(move || {
                            let mut bank = Bank::open(&b, false).unwrap();
                            let st = Station::open(&c, 64 << 20).unwrap();
                            st.recover(&mut bank, &ImportOptions::default()).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let done: usize = results.iter().map(|r| r.recovered.len()).sum();
            let problems: Vec<_> = results.iter().flat_map(|r| &r.problems).collect();
            assert!(problems.is_empty(), "round {round}: {problems:?}");
            assert_eq!(done, 1, "round {round}: {results:?}");
            let m: MachineName = "alice/dev".parse().unwrap();
            assert_eq!(s.bank.log(&m).unwrap().len(), 2, "round {round}");
        }
    }

    /// A session directory being made is never taken for a dead session: a young
    /// `.new-` directory is left alone, an abandoned old one is cleaned up.
    #[test]
    fn a_session_being_created_is_left_alone() {
        let mut s = setup();
        let young = s.station.sessions_dir().join(".new-0123");
        fs::create_dir_all(&young).unwrap();
        fs::write(young.join("session.json"), b"{").unwrap();
        let r = s.recover();
        assert!(r.recovered.is_empty() && r.problems.is_empty(), "{r:?}");
        assert!(young.exists(), "a session being created is not removed");
        // The same, abandoned two minutes ago by a process that died.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        fs::File::open(&young).unwrap().set_modified(old).unwrap();
        let r = s.recover();
        assert!(r.recovered.is_empty() && r.problems.is_empty(), "{r:?}");
        assert!(!young.exists(), "an abandoned half-made session goes");
    }
}
