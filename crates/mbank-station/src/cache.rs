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
//! and remembers that it did (and which inode it hashed: a file replaced since is
//! hashed again), so whatever a crash (or a stranger) left in the directory is
//! verified before it is served, and dropped if it fails. After that a small read is
//! one `pread` on a kept descriptor (or an `open` and a `pread` once the process keeps
//! as many as its descriptor limit allows). A row without a file, or a file without a
//! row, only costs a fetch or some slack in the bound.

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

/// A verified chunk file this process keeps open, so a small read is one `pread`.
struct OpenChunk {
    file: fs::File,
    /// The use epoch in which this chunk's use was last noted.
    noted: AtomicU32,
}

pub struct ChunkCache {
    dir: PathBuf,
    db: Mutex<Connection>,
    max_bytes: u64,
    /// Chunks this process has re-hashed (or written) since it opened the cache, with
    /// the inode of the file it checked: a file replaced since is checked again.
    verified: RwLock<HashMap<ChunkId, u64>>,
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

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, StationError> {
        let chunks = dir.join("chunks");
        fs::create_dir_all(&chunks).map_err(io_err(format!("create {}", chunks.display())))?;
        let conn = Connection::open(dir.join("cache.db")).map_err(db_err("open cache.db"))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(db_err("set the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err("set WAL mode"))?;
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

    /// Opens the chunk's file if it is one this process verified. With `verify`, a file
    /// not verified yet is read whole and hashed first (`data` gets its bytes), and
    /// dropped if it fails. `None`: no good copy (or, without `verify`, none verified).
    fn open_checked(
        &self,
        id: &ChunkId,
        verify: bool,
        data: Option<&mut Vec<u8>>,
    ) -> Option<fs::File> {
        let mut f = fs::File::open(self.path(id)).ok()?;
        let ino = f.metadata().ok()?.ino();
        let known = self.verified.read().expect("cache lock").get(id) == Some(&ino);
        if known {
            if let Some(d) = data {
                f.read_to_end(d).ok()?;
            }
            return Some(f);
        }
        if !verify {
            return None;
        }
        let mut whole = Vec::new();
        let d = data.unwrap_or(&mut whole);
        f.read_to_end(d).ok()?;
        if ChunkId::of(d) != *id {
            // Left by a crash or damaged on disk: never serve it.
            d.clear();
            self.drop_corrupt(id);
            return None;
        }
        self.verified.write().expect("cache lock").insert(*id, ino);
        Some(f)
    }

    /// The chunk's plaintext, if the cache holds a good copy.
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let mut data = Vec::new();
        if self.open_checked(id, true, Some(&mut data)).is_none() {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.note_use(*id);
        Some(data)
    }

    /// [`ChunkCache::get`] for the station's own work (check-in): counted neither as a
    /// hit or miss nor as a use.
    pub fn peek(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let mut data = Vec::new();
        self.open_checked(id, true, Some(&mut data))?;
        Some(data)
    }

    /// Appends `n` bytes at `offset` of a cached chunk to `buf`; false (and `buf` as it
    /// was) if the cache has no good copy. Without `verify`, false also when this
    /// process has not verified the chunk yet (reading it whole to do so is slow), and
    /// a miss is not counted: the caller asks again with `verify`.
    pub fn read_append(
        &self,
        id: &ChunkId,
        offset: usize,
        n: usize,
        buf: &mut Vec<u8>,
        verify: bool,
    ) -> bool {
        let kept = self.open.read().expect("cache lock").get(id).cloned();
        if let Some(c) = kept {
            if append_pread(buf, &c.file, offset as u64, n).is_ok() {
                self.hit(id, Some(&c));
                return true;
            }
            self.open.write().expect("cache lock").remove(id);
        }
        let Some(file) = self.open_checked(id, verify, None) else {
            if verify {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        };
        if append_pread(buf, &file, offset as u64, n).is_err() {
            if verify {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        let c = Arc::new(OpenChunk {
            file,
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
        let write = || -> std::io::Result<u64> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(plain)?;
            let ino = f.metadata()?.ino();
            fs::rename(&tmp, &path)?;
            Ok(ino)
        };
        let ino = match write() {
            Ok(ino) => ino,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_err(format!("write {}", path.display()))(e));
            }
        };
        // The caller verified `plain`, and this file holds exactly it.
        self.verified.write().expect("cache lock").insert(*id, ino);
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
