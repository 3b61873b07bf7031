//! # mbank-station
//!
//! The two lightweight hooks on a lab PC: a **chunk cache** shared by every session on
//! the station ([`cache`]), and **write tracking**: each session's writes go to an
//! overlay with a dirty map ([`session`], [`device`]), so checking in sends only the
//! chunks the guest wrote, without rescanning the disk.
//!
//! ## A session's life
//!
//! 1. [`Station::check_out`] takes the machine's lease in the catalog (one live session
//!    per machine, DESIGN invariant 6), writes `session.json` and an empty overlay.
//! 2. The [`device::Disk`] serves reads and writes (over NBD, see `mbank-nbd`). A FLUSH
//!    or FUA write makes the overlay durable, then the dirty map (invariant 4).
//! 3. [`Station::check_in`] stores the dirty chunks (only those the bank lacks are
//!    written), commits a version whose parent is the version checked out, moving the
//!    head by compare-and-swap (a lost race is kept as its own version), then releases
//!    the lease and deletes the session. Dirty bits live until the version is committed.
//!
//! ## Crashes
//!
//! A session whose process died (kill -9, power loss) stays in `<cache>/sessions/`. The
//! next `mbank attach` or `mbank recover` on the station finds it ([`Station::recover`])
//! and checks in what its durable dirty map names: every flushed write.
//!
//! ## Station identity
//!
//! `<cache>/STATION` holds a random station id (`MBANK-STATION 1` then `id <hex>`). Two
//! cache directories are two stations, even on one host.

pub mod cache;
pub mod device;
pub mod session;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mbank_bank::{Bank, BankError, ImportOptions, NoProgress, Progress, VersionSource};
use mbank_catalog::{CatalogError, Lease, NamedStream, now_ms};
use mbank_core::{MachineName, MachineRef, VersionId};
use mbank_store::ChunkStore;
use serde::Serialize;

use crate::cache::ChunkCache;
use crate::device::Disk;
use crate::session::{SESSION_FORMAT, SessionDir, SessionMeta};

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
    #[error(transparent)]
    Bank(#[from] BankError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
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
    pub seconds: f64,
    pub checkin_seconds: f64,
    pub recovered: bool,
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
        // The cache and its sessions are private to the station's user (one service
        // account serves every user of the PC): 0700, whatever the umask.
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("sessions"))
            .map_err(|e| StationError::Io {
                what: format!("create the station cache {}", dir.display()),
                source: e,
            })?;
        let marker = dir.join("STATION");
        let id = match fs::read_to_string(&marker) {
            Ok(t) => {
                let mut lines = t.lines();
                if lines.next().map(str::trim) != Some(&format!("{STATION_MAGIC} 1")) {
                    return Err(StationError::BadSession {
                        path: marker,
                        why: "not a station marker".into(),
                    });
                }
                lines
                    .find_map(|l| l.strip_prefix("id "))
                    .map(|s| s.trim().to_string())
                    .ok_or_else(|| StationError::BadSession {
                        path: marker.clone(),
                        why: "no id line".into(),
                    })?
            }
            Err(_) => {
                let id = random_hex();
                let tmp = dir.join(".STATION.tmp");
                fs::write(&tmp, format!("{STATION_MAGIC} 1\nid {id}\n"))
                    .and_then(|_| fs::rename(&tmp, &marker))
                    .map_err(|e| StationError::Io {
                        what: format!("write {}", marker.display()),
                        source: e,
                    })?;
                id
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
        let v = bank.resolve(r)?;
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
        // A session that holds the machine is replaced with --force, or when it is a
        // dead session of this station. Asking again names the session replaced, so a
        // third session taking the lease in between is not displaced unseen.
        let mut replace: Option<String> = None;
        for _ in 0..3 {
            match bank.catalog_mut().take_lease(&lease, replace.as_deref()) {
                Err(CatalogError::LeaseHeld { held, .. })
                    if replace.as_deref() != Some(held.session.as_str())
                        && (force
                            || (held.station == my_station
                                && !session_alive(
                                    held.pid,
                                    held.started_ms,
                                    &sessions.join(&held.session).join("overlay"),
                                ))) =>
                {
                    replace = Some(held.session.clone());
                }
                r => {
                    r?;
                    break;
                }
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
        };
        let (dir, overlay) = match SessionDir::create(self.sessions_dir().join(&session), &meta) {
            Ok(x) => x,
            Err(e) => {
                let _ = bank.catalog().release_lease(&v.machine, &session);
                return Err(e);
            }
        };
        let bits = vec![0u64; index.chunks.len().div_ceil(64)];
        Ok(Arc::new(Disk::new(
            meta,
            dir,
            index,
            overlay,
            bits,
            self.cache.clone(),
            fetch_from,
        )))
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
        let dirty = disk.dirty_chunks();
        let mut report = self.commit(
            bank,
            &disk.meta,
            &disk.dir,
            &disk.base,
            disk.overlay(),
            dirty,
            extras,
            opts,
            progress,
        )?;
        report.bytes_fetched = disk.counters.bytes_fetched.load(Ordering::Relaxed);
        report.chunks_fetched = disk.counters.chunks_fetched.load(Ordering::Relaxed);
        report.cache_hits = self.cache.counters.hits.load(Ordering::Relaxed);
        report.cache_misses = self.cache.counters.misses.load(Ordering::Relaxed);
        let _ = self.cache.sync();
        Ok(report)
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

    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        bank: &mut Bank,
        meta: &SessionMeta,
        dir: &SessionDir,
        base: &mbank_core::DiskIndex,
        overlay: &fs::File,
        dirty: Vec<usize>,
        extras: &CheckinExtras,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<SessionReport, StationError> {
        let started = Instant::now();
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
        if commit
            && let Ok(done) = bank.resolve(&MachineRef {
                machine: machine.clone(),
                version: Some(id.to_hex()),
            })
        {
            report.version = Some(done.id.to_hex());
            report.head_moved =
                bank.catalog().machine(&machine)?.and_then(|m| m.head) == Some(done.id);
        } else if commit {
            let writer = bank.begin_write(&format!("check-in {}", meta.machine))?;
            let parent = meta.base_version()?;
            let (mut config, mut streams) = (None, Vec::new());
            if let Some(p) = parent {
                let v = bank.resolve(&MachineRef {
                    machine: machine.clone(),
                    version: Some(p.to_hex()),
                })?;
                config = v.config.clone();
                streams = bank.catalog().streams(&v)?;
                streams
                    .retain(|(n, _)| n != "memory" && !extras.streams.iter().any(|(e, _)| e == n));
            }
            if extras.config.is_some() {
                config = extras.config.clone();
            }
            streams.extend(extras.streams.iter().cloned());
            let total = dirty.iter().map(|&i| base.chunk_len(i) as u64).sum();
            let cs = base.chunk_size as u64;
            let lens: Vec<usize> = dirty.iter().map(|&i| base.chunk_len(i)).collect();
            // A chunk the session wrote only in part is made whole in the overlay first,
            // with its base chunk's bytes where the durable dirty map names no write.
            let map = dir.read_dirty(base.disk_size, base.chunk_size)?;
            let (cache, store) = (&self.cache, bank.store());
            device::fill_partial_chunks(overlay, base, &map, &dirty, &|id| {
                cache
                    .peek(id)
                    .map_or_else(|| store.read(id).map_err(|e| e.to_string()), Ok)
            })?;
            let items = dirty.into_iter().zip(lens).map(move |(i, len)| {
                let mut buf = vec![0u8; len];
                std::os::unix::fs::FileExt::read_exact_at(overlay, &mut buf, i as u64 * cs)
                    .map_err(|e| BankError::Image {
                        path: dir.overlay_path(),
                        why: format!("reading dirty chunk {i} failed: {e}"),
                    })?;
                Ok((i, Some(buf)))
            });
            let source = VersionSource {
                description: format!("check-in from {}", self.name),
                parent,
                base: base.clone(),
                items: Box::new(items),
                total_bytes: total,
                id: Some(id),
                config,
                streams,
                streams_stored: extras.streams_stored,
            };
            let r = bank.write_version(&machine, source, &writer, opts, progress)?;
            report.version = Some(r.version);
            report.head_moved = r.head_moved;
            report.chunks_uploaded = r.chunks_new;
            report.bytes_uploaded = r.bytes_stored;
        }
        // The version is committed: only now may the dirty map go.
        bank.catalog().release_lease(&machine, &meta.session)?;
        dir.remove()?;
        report.checkin_seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// The live session of `machine` on this station, if there is one.
    pub fn live_session(&self, machine: &MachineName) -> Option<(SessionDir, SessionMeta)> {
        let entries = fs::read_dir(self.sessions_dir()).ok()?;
        for entry in entries.flatten() {
            let dir = SessionDir { dir: entry.path() };
            let Ok(meta) = dir.read_meta() else { continue };
            if meta.machine == machine.as_str()
                && session_alive(meta.pid, meta.started_ms, &dir.overlay_path())
            {
                return Some((dir, meta));
            }
        }
        None
    }

    /// Finds sessions on this station whose process is gone and checks in what their
    /// durable dirty maps name. Sessions of live processes are left alone.
    pub fn recover(
        &self,
        bank: &mut Bank,
        opts: &ImportOptions,
    ) -> Result<Vec<SessionReport>, StationError> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.sessions_dir()) else {
            return Ok(out);
        };
        for entry in entries.flatten() {
            let dir = SessionDir { dir: entry.path() };
            let meta = match dir.read_meta() {
                Ok(m) => m,
                Err(_) if !dir.meta_path().exists() => {
                    // Died before its metadata was written: nothing was served.
                    let _ = dir.remove();
                    continue;
                }
                Err(e) => return Err(e),
            };
            if meta.pid == std::process::id()
                || session_alive(meta.pid, meta.started_ms, &dir.overlay_path())
            {
                continue;
            }
            // The cache is shared by every bank used on this station: a session of
            // another bank is that bank's to recover (its versions are not in this one).
            if bank_path(&meta.bank) != bank.location() {
                continue;
            }
            let Some(base_id) = meta.base_version()? else {
                continue;
            };
            let m: MachineName = meta.machine.parse().map_err(|e| StationError::BadSession {
                path: dir.meta_path(),
                why: format!("{e}"),
            })?;
            let v = bank.resolve(&MachineRef {
                machine: m,
                version: Some(base_id.to_hex()),
            })?;
            let base = bank.catalog().disk_index(&v)?;
            let dirty = dir
                .read_dirty(base.disk_size, base.chunk_size)?
                .dirty_chunks();
            // Writable: check-in merges partly written chunks with their base in it.
            let overlay = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.overlay_path())
                .map_err(|e| StationError::Io {
                    what: format!("open {}", dir.overlay_path().display()),
                    source: e,
                })?;
            let extras = CheckinExtras::default();
            let mut r = self.commit(
                bank,
                &meta,
                &dir,
                &base,
                &overlay,
                dirty,
                &extras,
                opts,
                &NoProgress,
            )?;
            r.recovered = true;
            out.push(r);
        }
        Ok(out)
    }
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
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].version.as_deref(), Some(v.as_str()));
        assert_eq!(
            bank.log(&m).unwrap().len(),
            2,
            "no second copy of the check-in"
        );
        assert!(!disk.dir.dir.exists());
    }
}
