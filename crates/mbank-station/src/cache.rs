//! The station's chunk cache: one directory shared by every session and user on the
//! station, keyed by chunk id, bounded in size with least-recently-used eviction.
//!
//! ```text
//! <cache>/chunks/ab/<64 hex>   a chunk's plaintext
//! <cache>/cache.db             SQLite: chunks(id, size, used_ms), for the size bound and LRU
//! ```
//!
//! Files are written to a temp name and renamed, without fsync: the cache is never
//! trusted blindly. Each process re-hashes a cached chunk the first time it reads it
//! and remembers that it did, with the file's [`Stamp`] (inode, size, change and
//! modification times), so whatever a crash (or a stranger) left in the directory is
//! verified before it is served, and dropped if it fails. After that a small read is
//! one `pread` on a kept descriptor (or an `open` and a `pread` once the process keeps
//! as many as its descriptor limit allows) and one `fstat` after it: a file written,
//! truncated or replaced since it was hashed has another stamp (every change to a
//! file's data moves its change time, which no caller can set back), so its bytes are
//! not served but hashed again, and dropped if they no longer match. The cache sets
//! each file it writes to a fixed modification time ([`MARK_MTIME`]), which any write
//! moves to the present, so a change is seen even within one tick of a coarse clock;
//! a file without the mark whose change time is within a second of its hashing is
//! not remembered as verified (a write in the same tick could leave it unchanged). What a check-in stores is never taken
//! on trust: [`ChunkCache::peek`] re-hashes every time. A row without a file, or a
//! file without a row, only costs a fetch or some slack in the bound.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use mbank_catalog::now_ms;
use mbank_core::ChunkId;
use rusqlite::{Connection, params};

use crate::StationError;
use crate::device::append_pread;

/// Most chunk files kept open per process (fewer if the descriptor limit is low).
const OPEN_FILES_MAX: usize = 65536;
/// Uses are written to the database in batches of this many.
const USE_BATCH: usize = 512;
/// A chunk's use is recorded at most once per this many milliseconds: LRU order to
/// within a few seconds is enough, and a recorded use costs an SQLite update.
const USE_EPOCH_MS: i64 = 5000;

/// Counters of one process's use of the cache.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub dropped_corrupt: AtomicU64,
}

/// What changes whenever a file's contents may have: its inode, size, change time
/// (set by the kernel on every write, truncation or metadata change) and modification
/// time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl Stamp {
    fn of(f: &fs::File) -> Option<Stamp> {
        let m = f.metadata().ok()?;
        Some(Stamp {
            ino: m.ino(),
            size: m.size(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }

    /// True if the file changed so recently that a write in the same clock tick could
    /// leave the stamp as it is. A file with the cache's [`MARK_MTIME`] is not: any
    /// write to it moves its modification time off the mark.
    fn racy(&self) -> bool {
        if self.mtime == (MARK_MTIME, 0) {
            return false;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        now - self.ctime.0 <= 1
    }
}

/// The modification time (seconds since the epoch) the cache gives each chunk file it
/// writes. Any later write to the file sets its modification time to the present, so a
/// change is seen whatever the clock's resolution.
pub const MARK_MTIME: i64 = 1;

fn set_mark(f: &fs::File) -> std::io::Result<()> {
    let t = libc::timespec {
        tv_sec: MARK_MTIME as libc::time_t,
        tv_nsec: 0,
    };
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        t,
    ];
    // SAFETY: futimens on a descriptor we own, with a pointer to two timespecs that
    // live across the call.
    if unsafe { libc::futimens(std::os::fd::AsRawFd::as_raw_fd(f), times.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A verified chunk file this process keeps open, so a small read is one `pread`.
struct OpenChunk {
    file: fs::File,
    /// The file's stamp when it was verified.
    stamp: Stamp,
    /// The use epoch in which this chunk's use was last noted.
    noted: AtomicU32,
}

pub struct ChunkCache {
    dir: PathBuf,
    db: Mutex<Connection>,
    max_bytes: u64,
    /// Chunks this process has re-hashed (or written) since it opened the cache, with
    /// the stamp of the file it checked: a file changed since is checked again.
    verified: RwLock<HashMap<ChunkId, Stamp>>,
    uses: Mutex<Vec<ChunkId>>,
    use_tx: Mutex<Option<std::sync::mpsc::Sender<Vec<ChunkId>>>>,
    open: RwLock<HashMap<ChunkId, Arc<OpenChunk>>>,
    open_max: usize,
    /// Bytes added by this process since the last eviction check.
    added_since_check: AtomicU64,
    pub counters: CacheCounters,
}

fn db_err(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StationError {
    move |e| StationError::Cache {
        what: what.to_string(),
        why: e.to_string(),
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> StationError {
    move |e| StationError::Cache {
        what,
        why: e.to_string(),
    }
}

fn use_epoch() -> u32 {
    (now_ms() / USE_EPOCH_MS) as u32
}

/// How many chunk files to keep open: half the descriptor limit, after raising the
/// soft limit to the hard one (a cache of many chunks is what the limit is for; the
/// rest stays for sockets, the overlay and SQLite).
fn open_file_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 512;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass; raising the soft limit up
        // to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    ((lim.rlim_cur / 2) as usize).clamp(64, OPEN_FILES_MAX)
}

/// Puts the database in WAL mode unless it is already. Changing the journal mode does
/// not wait on the busy handler: two processes opening a new cache at once (an attach
/// and a `recover`) can find it locked, so it is tried again for up to 30 s.
fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let t = std::time::Instant::now();
    loop {
        let mode = conn
            .pragma_query_value(None, "journal_mode", |r| r.get::<_, String>(0))
            .and_then(|m| match m.eq_ignore_ascii_case("wal") {
                true => Ok(m),
                false => conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)),
            });
        match mode {
            Ok(_) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && t.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, StationError> {
        let chunks = dir.join("chunks");
        fs::create_dir_all(&chunks).map_err(io_err(format!("create {}", chunks.display())))?;
        let conn = Connection::open(dir.join("cache.db")).map_err(db_err("open cache.db"))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(db_err("set the busy timeout"))?;
        set_wal(&conn).map_err(db_err("set WAL mode"))?;
        conn.pragma_update(None, "synchronous", "OFF")
            .map_err(db_err("set synchronous mode"))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS chunks (
                 id BLOB PRIMARY KEY, size INTEGER NOT NULL, used_ms INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS chunks_by_use ON chunks (used_ms);",
        )
        .map_err(db_err("create the cache schema"))?;
        Ok(ChunkCache {
            dir: chunks,
            db: Mutex::new(conn),
            max_bytes,
            verified: RwLock::new(HashMap::new()),
            uses: Mutex::new(Vec::new()),
            use_tx: Mutex::new(None),
            open: RwLock::new(HashMap::new()),
            open_max: open_file_budget(),
            added_since_check: AtomicU64::new(0),
            counters: CacheCounters::default(),
        })
    }

    /// The cache's bound, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Drops a cached chunk that failed its hash: it is never served.
    fn drop_corrupt(&self, id: &ChunkId) {
        let _ = fs::remove_file(self.path(id));
        let _ = self.db.lock().expect("cache lock").execute(
            "DELETE FROM chunks WHERE id = ?1",
            params![&id.as_bytes()[..]],
        );
        self.counters
            .dropped_corrupt
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Opens the chunk's file if it is one this process verified and that has not
    /// changed since. With `verify`, a file not verified yet (or changed, or with
    /// `rehash` any file) is read whole and hashed first (`data` gets its bytes), and
    /// dropped if it fails. `None`: no good copy (or, without `verify`, none verified).
    fn open_checked(
        &self,
        id: &ChunkId,
        verify: bool,
        rehash: bool,
        mut data: Option<&mut Vec<u8>>,
    ) -> Option<(fs::File, Stamp)> {
        let mut f = fs::File::open(self.path(id)).ok()?;
        let mut stamp = Stamp::of(&f)?;
        let known = !rehash && self.verified.read().expect("cache lock").get(id) == Some(&stamp);
        if known {
            match data.as_deref_mut() {
                None => return Some((f, stamp)),
                Some(d) => {
                    // Read, then look again: a change during the read moves the stamp.
                    if f.read_to_end(d).is_ok() && Stamp::of(&f) == Some(stamp) {
                        return Some((f, stamp));
                    }
                    d.clear();
                    f = fs::File::open(self.path(id)).ok()?;
                    stamp = Stamp::of(&f)?;
                }
            }
        }
        if !verify {
            return None;
        }
        let mut whole = Vec::new();
        let d = data.unwrap_or(&mut whole);
        f.read_to_end(d).ok()?;
        if ChunkId::of(d) != *id {
            // Left by a crash, damaged on disk or changed in place: never serve it.
            d.clear();
            self.drop_corrupt(id);
            return None;
        }
        if Stamp::of(&f) != Some(stamp) {
            // Changed while it was hashed: what was read is good, the file is not.
            self.verified.write().expect("cache lock").remove(id);
            return None;
        }
        if stamp.racy() {
            self.verified.write().expect("cache lock").remove(id);
        } else {
            self.verified
                .write()
                .expect("cache lock")
                .insert(*id, stamp);
        }
        Some((f, stamp))
    }

    /// The chunk's plaintext, if the cache holds a good copy.
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let mut data = Vec::new();
        if self
            .open_checked(id, true, false, Some(&mut data))
            .is_none()
        {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.note_use(*id);
        Some(data)
    }

    /// The chunk's plaintext, re-hashed now whatever this process knew of the file,
    /// for the station's own work (what a check-in stores must be verified data):
    /// counted neither as a hit or miss nor as a use.
    pub fn peek(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let mut data = Vec::new();
        self.open_checked(id, true, true, Some(&mut data))?;
        Some(data)
    }

    /// Appends `n` bytes at `offset` of a cached chunk to `buf`; false (and `buf` as it
    /// was) if the cache has no good copy. Without `verify`, false also when this
    /// process has not verified the chunk yet (reading it whole to do so is slow), and
    /// a miss is not counted: the caller asks again with `verify`.
    ///
    /// `len` is the length of the chunk's place in the disk: a cached chunk of another
    /// length is not served there (false), whatever its content.
    pub fn read_append(
        &self,
        id: &ChunkId,
        offset: usize,
        n: usize,
        len: usize,
        buf: &mut Vec<u8>,
        verify: bool,
    ) -> bool {
        let start = buf.len();
        let kept = self.open.read().expect("cache lock").get(id).cloned();
        if kept.as_ref().is_some_and(|c| c.stamp.size != len as u64) {
            return false;
        }
        if let Some(c) = kept {
            // Read, then look: a file changed since it was hashed is not served.
            if append_pread(buf, &c.file, offset as u64, n).is_ok()
                && Stamp::of(&c.file) == Some(c.stamp)
            {
                self.hit(id, Some(&c));
                return true;
            }
            buf.truncate(start);
            self.open.write().expect("cache lock").remove(id);
        }
        let Some((file, stamp)) = self.open_checked(id, verify, false, None) else {
            if verify {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        };
        if stamp.size != len as u64 {
            return false;
        }
        if append_pread(buf, &file, offset as u64, n).is_err() || Stamp::of(&file) != Some(stamp) {
            buf.truncate(start);
            if verify {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        let c = Arc::new(OpenChunk {
            file,
            stamp,
            noted: AtomicU32::new(0),
        });
        self.hit(id, Some(&c));
        let mut open = self.open.write().expect("cache lock");
        if open.len() >= self.open_max
            && let Some(victim) = open.keys().next().copied()
        {
            open.remove(&victim);
        }
        open.insert(*id, c);
        true
    }

    fn hit(&self, id: &ChunkId, c: Option<&OpenChunk>) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        let epoch = use_epoch();
        if c.is_none_or(|c| c.noted.swap(epoch, Ordering::Relaxed) != epoch) {
            self.note_use(*id);
        }
    }

    /// True if the cache has a file for the chunk (not verified).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.path(id).exists()
    }

    fn note_use(&self, id: ChunkId) {
        let batch = {
            let mut u = self.uses.lock().expect("cache lock");
            u.push(id);
            if u.len() < USE_BATCH {
                return;
            }
            std::mem::take(&mut *u)
        };
        // Recording uses is bookkeeping for eviction: keep it off the request path
        // when a background writer is running.
        match &*self.use_tx.lock().expect("cache lock") {
            Some(tx) => {
                let _ = tx.send(batch);
            }
            None => {
                let _ = self.record_uses(&batch);
            }
        }
    }

    /// Starts a thread that writes batched use times, so reads never wait on SQLite.
    /// The thread ends when the cache is dropped.
    pub fn start_use_writer(self: &Arc<Self>) {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<ChunkId>>();
        let weak = Arc::downgrade(self);
        std::thread::spawn(move || {
            for batch in rx {
                let Some(cache) = weak.upgrade() else { return };
                let _ = cache.record_uses(&batch);
            }
        });
        *self.use_tx.lock().expect("cache lock") = Some(tx);
    }

    fn record_uses(&self, ids: &[ChunkId]) -> Result<(), StationError> {
        let mut db = self.db.lock().expect("cache lock");
        let tx = db.transaction().map_err(db_err("record chunk uses"))?;
        {
            let mut st = tx
                .prepare_cached("UPDATE chunks SET used_ms = ?1 WHERE id = ?2")
                .map_err(db_err("record chunk uses"))?;
            let now = now_ms();
            for id in ids {
                st.execute(params![now, &id.as_bytes()[..]])
                    .map_err(db_err("record chunk uses"))?;
            }
        }
        tx.commit().map_err(db_err("record chunk uses"))
    }

    /// Adds a verified chunk. Evicts least recently used chunks when over the bound.
    pub fn insert(&self, id: &ChunkId, plain: &[u8]) -> Result<(), StationError> {
        let path = self.path(id);
        let parent = path.parent().expect("chunk path has a parent");
        fs::create_dir_all(parent).map_err(io_err(format!("create {}", parent.display())))?;
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("the operating system's random source failed");
        let tmp = parent.join(format!(".tmp-{}", u64::from_le_bytes(r)));
        let write = || -> std::io::Result<Option<Stamp>> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(plain)?;
            set_mark(&f)?;
            fs::rename(&tmp, &path)?;
            // After the rename, which moves the change time.
            Ok(Stamp::of(&f))
        };
        let stamp = match write() {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_err(format!("write {}", path.display()))(e));
            }
        };
        // The caller verified `plain`, and this file holds exactly it.
        if let Some(stamp) = stamp {
            self.verified
                .write()
                .expect("cache lock")
                .insert(*id, stamp);
        }
        self.db
            .lock()
            .expect("cache lock")
            .execute(
                "INSERT OR REPLACE INTO chunks (id, size, used_ms) VALUES (?1, ?2, ?3)",
                params![&id.as_bytes()[..], plain.len() as i64, now_ms()],
            )
            .map_err(db_err("record a cached chunk"))?;
        // Check the bound every 1/64 of it, so eviction stays cheap.
        let added = self
            .added_since_check
            .fetch_add(plain.len() as u64, Ordering::Relaxed)
            + plain.len() as u64;
        if added >= (self.max_bytes / 64).max(1) {
            self.added_since_check.store(0, Ordering::Relaxed);
            self.evict()?;
        }
        Ok(())
    }

    /// Total bytes the cache records.
    pub fn size(&self) -> Result<u64, StationError> {
        self.db
            .lock()
            .expect("cache lock")
            .query_row("SELECT coalesce(sum(size), 0) FROM chunks", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(db_err("measure the cache"))
    }

    /// Deletes least recently used chunks until the cache is within its bound.
    pub fn evict(&self) -> Result<u64, StationError> {
        let pending = std::mem::take(&mut *self.uses.lock().expect("cache lock"));
        self.record_uses(&pending)?;
        let mut total = self.size()?;
        let mut evicted = 0;
        while total > self.max_bytes {
            let victims: Vec<(Vec<u8>, i64)> = {
                let db = self.db.lock().expect("cache lock");
                let mut st = db
                    .prepare_cached("SELECT id, size FROM chunks ORDER BY used_ms LIMIT 256")
                    .map_err(db_err("choose chunks to evict"))?;
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(db_err("choose chunks to evict"))?
                    .collect::<Result<_, _>>()
                    .map_err(db_err("choose chunks to evict"))?
            };
            if victims.is_empty() {
                break;
            }
            let db = self.db.lock().expect("cache lock");
            for (id, size) in victims {
                if total <= self.max_bytes {
                    break;
                }
                let Ok(arr) = <[u8; 32]>::try_from(id.as_slice()) else {
                    continue;
                };
                let id = ChunkId::from_bytes(arr);
                let _ = fs::remove_file(self.path(&id));
                self.open.write().expect("cache lock").remove(&id);
                self.verified.write().expect("cache lock").remove(&id);
                db.execute(
                    "DELETE FROM chunks WHERE id = ?1",
                    params![&id.as_bytes()[..]],
                )
                .map_err(db_err("evict a chunk"))?;
                total = total.saturating_sub(size as u64);
                evicted += 1;
            }
        }
        Ok(evicted)
    }

    /// Writes batched use times to the database.
    pub fn sync(&self) -> Result<(), StationError> {
        let pending = std::mem::take(&mut *self.uses.lock().expect("cache lock"));
        self.record_uses(&pending)
    }
}

#[cfg(test)]
mod tests {

    /// Processes opening a new cache at the same moment (an attach and a `recover`)
    /// all get it: switching it to WAL waits out the others instead of failing with
    /// "database is locked".
    #[test]
    fn caches_opened_at_once_on_a_new_directory_all_open() {
        for round in 0..20 {
            let d = tempfile::tempdir().unwrap();
            let go = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                let opens: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            go.wait();
                            ChunkCache::open(d.path(), 1 << 20).map(drop)
                        })
                    })
                    .collect();
                for o in opens {
                    if let Err(e) = o.join().unwrap() {
                        panic!("round {round}: {e}");
                    }
                }
            });
        }
    }

    use super::*;

    #[test]
    fn get_insert_verify_and_bound() {
        let d = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(d.path(), 10 * 1000).unwrap();
        let data: Vec<Vec<u8>> = (0..30u8).map(|i| vec![i; 1000]).collect();
        for (n, x) in data.iter().enumerate() {
            c.insert(&ChunkId::of(x), x).unwrap();
            // Keep chunk 0 hot.
            assert_eq!(
                c.get(&ChunkId::of(&data[0])).as_deref(),
                Some(&data[0][..]),
                "{n}"
            );
        }
        c.evict().unwrap();
        assert!(c.size().unwrap() <= 10 * 1000);
        assert!(
            c.get(&ChunkId::of(&data[0])).is_some(),
            "hot chunk survived"
        );
        assert!(
            c.get(&ChunkId::of(&data[1])).is_none(),
            "cold chunk evicted"
        );
        // A damaged file is caught by a new process (a fresh open) and dropped.
        let id = ChunkId::of(&data[29]);
        fs::write(c.path(&id), b"garbage").unwrap();
        let c2 = ChunkCache::open(d.path(), 10 * 1000).unwrap();
        assert!(c2.get(&id).is_none());
        assert!(!c2.contains(&id));
        assert_eq!(c2.counters.dropped_corrupt.load(Ordering::Relaxed), 1);
    }
}
