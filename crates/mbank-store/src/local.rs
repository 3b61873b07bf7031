//! [`LocalStore`]: chunks as files in a directory. Layout and crash behaviour are in the
//! crate docs.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use mbank_core::ChunkId;
use mbank_core::chunk::{self, EncodedChunk, MAX_STORED_LEN};

use crate::{ChunkStore, StoreError, StoreStats, SweepStats};

/// Flush on our own once this many chunks are pending, so memory and the amount of work
/// a crash throws away stay bounded.
const FLUSH_EVERY_CHUNKS: usize = 4096;
const FLUSH_EVERY_BYTES: u64 = 256 << 20;
const TMP_PREFIX: &str = ".tmp-";

struct PendingChunk {
    tmp: PathBuf,
    fanout: u8,
    len: u64,
    /// A flush has taken it: that flush renames its temp file and drops the entry once
    /// the name is durable. Until then the entry stays, so the chunk is found (under
    /// its temp name, or its own once renamed) by every thread of this process.
    in_flush: bool,
}

#[derive(Default)]
struct Pending {
    chunks: HashMap<ChunkId, PendingChunk>,
    /// Chunks and bytes no flush has taken yet (what the automatic flush counts).
    waiting: usize,
    bytes: u64,
}

/// A chunk store in a local directory.
pub struct LocalStore {
    chunks: PathBuf,
    corrupt: PathBuf,
    pending: Mutex<Pending>,
}

impl LocalStore {
    /// Sets the modification time of `path` (chunk `id`'s file or temp file) to now,
    /// under a shared lock of its fan-out directory; false if it does not exist.
    fn touch_path(&self, id: &ChunkId, path: &Path) -> Result<bool, StoreError> {
        let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL in a chunk path");
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
        ];
        let _lock = self.lock_fanout(id.fanout(), false)?;
        // SAFETY: `c` is a valid NUL-terminated path and `times` two valid timespecs,
        // both alive for the duration of the call.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(false)
        } else {
            Err(StoreError::io("touch chunk", path, e))
        }
    }

    /// Opens chunk `id`: its pending temp file if it has one, else its file. A flush in
    /// another thread may rename the temp file into place between the look-up and the
    /// open, so a temp file that has gone is looked for under the chunk's name.
    fn open_chunk(&self, id: &ChunkId) -> Result<(File, PathBuf), StoreError> {
        let tmp = self
            .pending
            .lock()
            .expect("pending lock poisoned")
            .chunks
            .get(id)
            .map(|p| p.tmp.clone());
        let named = self.chunk_path(id);
        for path in tmp.into_iter().chain(std::iter::once(named)) {
            match File::open(&path) {
                Ok(f) => return Ok((f, path)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("open chunk", &path, e)),
            }
        }
        Err(StoreError::Missing(*id))
    }

    /// Creates the directory layout under `root` (which must exist).
    pub fn create(root: &Path) -> Result<Self, StoreError> {
        let chunks = root.join("chunks");
        for i in 0..=255u8 {
            let d = chunks.join(format!("{i:02x}"));
            private_dirs(&d)?;
        }
        let corrupt = root.join("corrupt");
        private_dirs(&corrupt)?;
        fsync_dir(&chunks)?;
        fsync_dir(root)?;
        Self::open(root)
    }

    /// Opens the store under `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let chunks = root.join("chunks");
        if !chunks.is_dir() {
            return Err(StoreError::io(
                "open chunk directory",
                &chunks,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        Ok(LocalStore {
            chunks,
            corrupt: root.join("corrupt"),
            pending: Mutex::new(Pending::default()),
        })
    }

    fn fanout_dir(&self, fanout: u8) -> PathBuf {
        self.chunks.join(format!("{fanout:02x}"))
    }

    /// Where chunk `id` lives.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.fanout_dir(id.fanout()).join(id.to_hex())
    }

    /// Where chunk `id` lives in the store under `root`.
    pub fn chunk_path_in(root: &Path, id: &ChunkId) -> PathBuf {
        root.join("chunks")
            .join(format!("{:02x}", id.fanout()))
            .join(id.to_hex())
    }

    fn lock_fanout(&self, fanout: u8, exclusive: bool) -> Result<File, StoreError> {
        crate::flock_path(&self.fanout_dir(fanout), false, exclusive)
    }

    /// Makes every chunk in `batch` (id, temp file, fan-out) durable under its name,
    /// then drops their pending entries. Entries stay visible while this runs: a commit
    /// checking its chunks, a read or a dedup question in another thread finds each
    /// chunk under one name or the other, never neither. Another flush may rename some
    /// of them first; this one still syncs their directories before it returns, so a
    /// caller relying on it never sees a name that is not yet durable.
    fn flush_pending(&self, batch: &[(ChunkId, PathBuf, u8)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // 1. Data of every temp file to disk, with one syncfs.
        let dir = File::open(&self.chunks)
            .map_err(|e| StoreError::io("open directory", &self.chunks, e))?;
        // SAFETY: syncfs on a file descriptor we own.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(StoreError::io(
                "sync the file system holding",
                &self.chunks,
                e,
            ));
        }
        // 2. Names into place; 3. the names to disk.
        let mut dirs = BTreeSet::new();
        for (id, tmp, fanout) in batch {
            let dest = self.chunk_path(id);
            match fs::rename(tmp, &dest) {
                Ok(()) => {}
                // Renamed by a concurrent flush (whose directory sync may not have
                // happened yet: this flush syncs it too), or deleted by a GC that
                // judged its writer gone: no version named it (a commit checks that
                // every chunk it names is there).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !dest.exists() {
                        continue;
                    }
                }
                Err(e) => return Err(StoreError::io("rename chunk into", &dest, e)),
            }
            dirs.insert(*fanout);
        }
        for d in dirs {
            fsync_dir(&self.fanout_dir(d))?;
        }
        let mut p = self.pending.lock().expect("pending lock poisoned");
        for (id, tmp, _) in batch {
            if p.chunks.get(id).is_some_and(|c| &c.tmp == tmp) {
                p.chunks.remove(id);
            }
        }
        Ok(())
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        // Chunks never flushed were never referenced: remove their temp files.
        if let Ok(p) = self.pending.get_mut() {
            for c in p.chunks.values() {
                let _ = fs::remove_file(&c.tmp);
            }
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    let f = File::open(dir).map_err(|e| StoreError::io("open directory", dir, e))?;
    f.sync_all()
        .map_err(|e| StoreError::io("sync directory", dir, e))
}

fn random_suffix() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    format!("{:016x}", u64::from_le_bytes(b))
}

/// Creates `d` and its missing parents for the bank's user alone (0700, whatever the
/// umask): a bank is private to the user or service that owns it.
fn private_dirs(d: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
        .map_err(|e| StoreError::io("create directory", d, e))
}

fn mtime(md: &fs::Metadata) -> SystemTime {
    md.modified().unwrap_or(UNIX_EPOCH)
}

impl ChunkStore for LocalStore {
    fn put(&self, chunk: &EncodedChunk) -> Result<u64, StoreError> {
        let len = chunk.bytes.len() as u64;
        // Put already by this process and still there: nothing to write again.
        let earlier = self
            .pending
            .lock()
            .expect("pending lock poisoned")
            .chunks
            .get(&chunk.id)
            .map(|p| p.tmp.clone());
        if let Some(tmp) = earlier
            && self.touch_path(&chunk.id, &tmp)?
        {
            return Ok(len);
        }
        let fanout = chunk.id.fanout();
        let tmp = self.fanout_dir(fanout).join(format!(
            "{TMP_PREFIX}{}-{}",
            chunk.id.to_hex(),
            random_suffix()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .mode(0o600)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(&chunk.bytes)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io("write chunk file", &tmp, e));
        }
        let full = {
            let mut p = self.pending.lock().expect("pending lock poisoned");
            let entry = PendingChunk {
                tmp,
                fanout,
                len,
                in_flush: false,
            };
            // An earlier entry is one whose temp file a GC swept (else the put above
            // would have found it), or one a flush is renaming, which it finishes.
            if let Some(old) = p.chunks.insert(chunk.id, entry)
                && !old.in_flush
            {
                p.waiting -= 1;
                p.bytes -= old.len;
            }
            p.waiting += 1;
            p.bytes += len;
            p.waiting >= FLUSH_EVERY_CHUNKS || p.bytes >= FLUSH_EVERY_BYTES
        };
        if full {
            self.flush()?;
        }
        Ok(len)
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every entry, also those another flush is working on: when this returns, each
        // chunk put before it must be durable under its name.
        let batch: Vec<(ChunkId, PathBuf, u8)> = {
            let mut p = self.pending.lock().expect("pending lock poisoned");
            p.waiting = 0;
            p.bytes = 0;
            p.chunks
                .iter_mut()
                .map(|(id, c)| {
                    c.in_flush = true;
                    (*id, c.tmp.clone(), c.fanout)
                })
                .collect()
        };
        self.flush_pending(&batch)
    }

    fn touch(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let tmp = self
            .pending
            .lock()
            .expect("pending lock poisoned")
            .chunks
            .get(id)
            .map(|p| p.tmp.clone());
        // A chunk put but not flushed yet: its temp file is touched like a chunk, so a
        // GC keeps it for the writer relying on it. If a GC has deleted it (its writer
        // was judged gone), the chunk is not there: the caller stores it again.
        if let Some(tmp) = tmp {
            if self.touch_path(id, &tmp)? {
                return Ok(true);
            }
            // Gone: renamed into place by a flush (then the name below finds it; the
            // flush drops the entry once the name is durable), or swept: then it is
            // forgotten, if it is still the entry looked at.
            let mut p = self.pending.lock().expect("pending lock poisoned");
            if p.chunks
                .get(id)
                .is_some_and(|c| c.tmp == tmp && !c.in_flush)
                && let Some(c) = p.chunks.remove(id)
            {
                p.waiting -= 1;
                p.bytes -= c.len;
            }
        }
        self.touch_path(id, &self.chunk_path(id))
    }

    /// Reads only the chunk's 16-byte header and the file's size.
    fn plain_len(&self, id: &ChunkId) -> Result<usize, StoreError> {
        use std::os::unix::fs::FileExt;
        let (f, path) = self.open_chunk(id)?;
        let size = f
            .metadata()
            .map_err(|e| StoreError::io("stat chunk", &path, e))?
            .len();
        let mut h = [0u8; chunk::HEADER_LEN];
        let mut n = 0;
        while n < h.len() {
            match f.read_at(&mut h[n..], n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::io("read chunk header", &path, e)),
            }
        }
        let stored = usize::try_from(size).unwrap_or(usize::MAX);
        chunk::parse_header_of(id, &h[..n], stored)
            .map(|(_, len)| len)
            .map_err(|source| StoreError::Corrupt {
                source,
                moved_to: None,
            })
    }

    fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let (mut f, path) = self.open_chunk(id)?;
        let mut buf = Vec::new();
        // Read at most one byte past the bound, so an oversized file is caught by the
        // decoder's length checks without reading all of it.
        (&mut f)
            .take(MAX_STORED_LEN as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| StoreError::io("read chunk", &path, e))?;
        Ok(buf)
    }

    fn quarantine(&self, id: &ChunkId) -> Result<Option<PathBuf>, StoreError> {
        let from = self.chunk_path(id);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let to = self.corrupt.join(format!("{}.{ms}", id.to_hex()));
        private_dirs(&self.corrupt)?;
        match fs::rename(&from, &to) {
            Ok(()) => Ok(Some(to)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("move damaged chunk aside", &from, e)),
        }
    }

    fn sweep(
        &self,
        cutoff: SystemTime,
        keep: &(dyn Fn(&ChunkId) -> bool + Sync),
    ) -> Result<SweepStats, StoreError> {
        let mut s = SweepStats::default();
        for fanout in 0..=255u8 {
            let dir = self.fanout_dir(fanout);
            let _lock = self.lock_fanout(fanout, true)?;
            let entries = fs::read_dir(&dir).map_err(|e| StoreError::io("list", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let path = entry.path();
                let md = match fs::symlink_metadata(&path) {
                    Ok(md) => md,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io("inspect", &path, e)),
                };
                if name.starts_with(TMP_PREFIX) {
                    if mtime(&md) < cutoff {
                        fs::remove_file(&path)
                            .map_err(|e| StoreError::io("delete temp file", &path, e))?;
                        s.temp_files_deleted += 1;
                    }
                    continue;
                }
                let Ok(id) = name.parse::<ChunkId>() else {
                    continue;
                };
                if keep(&id) {
                    s.chunks_kept += 1;
                } else if mtime(&md) >= cutoff {
                    s.chunks_too_new += 1;
                } else {
                    fs::remove_file(&path).map_err(|e| StoreError::io("delete chunk", &path, e))?;
                    s.chunks_deleted += 1;
                    s.bytes_deleted += md.len();
                }
            }
        }
        Ok(s)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut s = StoreStats::default();
        for fanout in 0..=255u8 {
            let dir = self.fanout_dir(fanout);
            let entries = fs::read_dir(&dir).map_err(|e| StoreError::io("list", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io("list", &dir, e))?;
                let name = entry.file_name();
                if name.to_str().is_some_and(|n| n.parse::<ChunkId>().is_ok()) {
                    let md = entry
                        .metadata()
                        .map_err(|e| StoreError::io("inspect", entry.path(), e))?;
                    s.chunks += 1;
                    s.bytes += md.len();
                }
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;
    use mbank_core::chunk::encode;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::create(d.path()).unwrap();
        (d, s)
    }

    #[test]
    fn contract_put_flush_read() {
        let (_d, s) = store();
        contract::put_flush_read(&s);
    }

    #[test]
    fn contract_sweep() {
        let (_d, s) = store();
        contract::sweep_respects_keep_and_cutoff(&s);
    }

    #[test]
    fn unflushed_chunks_are_invisible_to_other_processes_and_cleaned_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let a = LocalStore::create(d.path()).unwrap();
        let c = encode(b"pending", 3);
        a.put(&c).unwrap();
        let b = LocalStore::open(d.path()).unwrap();
        assert!(!b.touch(&c.id).unwrap(), "not visible before flush");
        assert!(a.touch(&c.id).unwrap(), "visible to its writer");
        drop(a);
        let tmp_left = fs::read_dir(b.fanout_dir(c.id.fanout())).unwrap().count();
        assert_eq!(tmp_left, 0);
    }

    #[test]
    fn corrupt_chunk_is_moved_aside_and_rewritten_later() {
        let (d, s) = store();
        let c = encode(&b"precious".repeat(100), 3);
        s.put(&c).unwrap();
        s.flush().unwrap();
        let path = s.chunk_path(&c.id);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = s.read(&c.id).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    moved_to: Some(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&c.id.to_hex()));
        assert!(!path.exists());
        assert_eq!(fs::read_dir(d.path().join("corrupt")).unwrap().count(), 1);
        // Storing the same content again repairs the bank.
        s.put(&c).unwrap();
        s.flush().unwrap();
        assert_eq!(s.read(&c.id).unwrap(), b"precious".repeat(100));
    }

    #[test]
    fn stale_temp_files_are_swept() {
        let (_d, s) = store();
        let stray = s.fanout_dir(7).join(".tmp-dead-writer");
        fs::write(&stray, b"half a chunk").unwrap();
        let st = s
            .sweep(
                SystemTime::now() + std::time::Duration::from_secs(5),
                &|_| true,
            )
            .unwrap();
        assert_eq!(st.temp_files_deleted, 1);
        assert!(!stray.exists());
    }

    #[test]
    fn a_pending_chunk_swept_as_a_dead_writers_is_not_there() {
        let (_d, s) = store();
        let c = encode(b"a chunk put but never flushed", 3);
        s.put(&c).unwrap();
        assert!(s.touch(&c.id).unwrap(), "pending: there");
        // A GC that judged its writer gone (cutoff in the future) deletes the temp file.
        let later = SystemTime::now() + std::time::Duration::from_secs(60);
        let swept = s.sweep(later, &|_| false).unwrap();
        assert_eq!(swept.temp_files_deleted, 1);
        assert!(
            !s.touch(&c.id).unwrap(),
            "swept: not there, so it is sent again"
        );
        s.flush().unwrap();
        assert!(matches!(s.get_raw(&c.id), Err(StoreError::Missing(_))));
        // Stored again, it is there.
        s.put(&c).unwrap();
        s.flush().unwrap();
        assert_eq!(s.read(&c.id).unwrap(), b"a chunk put but never flushed");
    }

    #[test]
    fn a_chunk_being_flushed_stays_visible_to_its_process() {
        // A flush in one thread (a commit) must not hide the chunks it is moving into
        // place from another (a commit checking its chunks, a read, a dedup question):
        // between taking the pending list and renaming, they were under neither name.
        let (_d, s) = store();
        let mut misses = 0;
        for round in 0..40u32 {
            let chunks: Vec<_> = (0..64u32)
                .map(|i| encode(format!("round {round} chunk {i}").as_bytes(), 1))
                .collect();
            for c in &chunks {
                s.put(c).unwrap();
            }
            let done = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    s.flush().unwrap();
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                });
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                    for c in &chunks {
                        match s.plain_len(&c.id) {
                            Ok(_) => {}
                            Err(StoreError::Missing(_)) => misses += 1,
                            Err(e) => panic!("{e}"),
                        }
                        if !s.touch(&c.id).unwrap() {
                            misses += 1;
                        }
                    }
                    if finished {
                        break;
                    }
                }
            });
        }
        assert_eq!(
            misses, 0,
            "chunks put and being flushed were answered missing"
        );
    }

    #[test]
    fn touch_waits_for_sweep_lock() {
        // While GC holds a fan-out directory exclusively, a touch in it must wait.
        let (_d, s) = store();
        let c = encode(b"contended", 3);
        s.put(&c).unwrap();
        s.flush().unwrap();
        let guard = s.lock_fanout(c.id.fanout(), true).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                assert!(s.touch(&c.id).unwrap());
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(!done.load(std::sync::atomic::Ordering::SeqCst));
            drop(guard);
        });
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }
}
