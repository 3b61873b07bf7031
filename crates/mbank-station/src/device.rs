//! [`Disk`]: a machine's disk on the station, served to NBD clients.
//!
//! Reads come from the overlay if the chunk is dirty, else cost nothing if the chunk is
//! zero, else from the station cache, else from the bank (verified, then cached). Only
//! one fetch per chunk is in flight; others wait for it. Writes go to the overlay at
//! chunk granularity: a partial write to a clean chunk first copies the base chunk in.
//!
//! Lock order: a chunk's stripe lock, then the flush lock; the flight map is held only
//! to look up or insert a flight, never across I/O.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use mbank_core::{ChunkId, DiskIndex};
use mbank_nbd::{BlockDevice, DeviceError, Extent};
use mbank_store::{ChunkStore, StoreError};

use crate::cache::ChunkCache;
use crate::session::{SessionDir, SessionMeta};

const STRIPES: usize = 256;

type FlightResult = Option<Result<Arc<Vec<u8>>, String>>;

#[derive(Default)]
struct Flight {
    done: Mutex<FlightResult>,
    cv: Condvar,
}

/// Counters of one session.
#[derive(Debug, Default)]
pub struct DiskCounters {
    pub chunks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
}

/// A checked-out disk: base index, overlay, dirty map.
pub struct Disk {
    pub meta: SessionMeta,
    pub dir: SessionDir,
    pub base: DiskIndex,
    overlay: File,
    dirty: Vec<AtomicU64>,
    dirty_gen: AtomicU64,
    durable_gen: Mutex<u64>,
    stripes: Vec<Mutex<()>>,
    cache: Arc<ChunkCache>,
    store: Arc<dyn ChunkStore>,
    flights: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    demand: AtomicUsize,
    pub counters: DiskCounters,
}

fn io(what: &str, e: std::io::Error) -> DeviceError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        DeviceError::NoSpace(what.to_string())
    } else {
        DeviceError::io(what.to_string(), e)
    }
}

impl Disk {
    pub fn new(
        meta: SessionMeta,
        dir: SessionDir,
        base: DiskIndex,
        overlay: File,
        dirty_bits: Vec<u64>,
        cache: Arc<ChunkCache>,
        store: Arc<dyn ChunkStore>,
    ) -> Self {
        Disk {
            meta,
            dir,
            base,
            overlay,
            dirty: dirty_bits.into_iter().map(AtomicU64::new).collect(),
            dirty_gen: AtomicU64::new(0),
            durable_gen: Mutex::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            cache,
            store,
            flights: Mutex::new(HashMap::new()),
            demand: AtomicUsize::new(0),
            counters: DiskCounters::default(),
        }
    }

    pub fn chunk_size(&self) -> u64 {
        self.base.chunk_size as u64
    }

    pub fn is_dirty(&self, i: usize) -> bool {
        self.dirty[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    fn set_dirty(&self, i: usize) {
        let prev = self.dirty[i / 64].fetch_or(1 << (i % 64), Ordering::AcqRel);
        if prev & (1 << (i % 64)) == 0 {
            self.dirty_gen.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Indices of the dirty chunks.
    pub fn dirty_chunks(&self) -> Vec<usize> {
        (0..self.base.chunks.len())
            .filter(|&i| self.is_dirty(i))
            .collect()
    }

    pub fn overlay(&self) -> &File {
        &self.overlay
    }

    /// A chunk's plaintext: from the cache, or fetched from the bank once.
    pub fn fetch(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>, DeviceError> {
        if let Some(d) = self.cache.get(id) {
            return Ok(Arc::new(d));
        }
        self.fetch_missing(id)
    }

    /// [`Disk::fetch`] of a chunk the cache was just asked for and lacked (asking it
    /// again would count a second miss).
    fn fetch_missing(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>, DeviceError> {
        let (flight, leader) = {
            let mut f = self.flights.lock().expect("flight lock");
            match f.get(id) {
                Some(fl) => (fl.clone(), false),
                None => {
                    let fl = Arc::new(Flight::default());
                    f.insert(*id, fl.clone());
                    (fl, true)
                }
            }
        };
        if !leader {
            let mut done = flight.done.lock().expect("flight lock");
            while done.is_none() {
                done = flight.cv.wait(done).expect("flight lock");
            }
            return match done.as_ref().expect("set") {
                Ok(d) => Ok(d.clone()),
                Err(e) => Err(DeviceError::Unavailable(e.clone())),
            };
        }
        let result = match self.store.read(id) {
            Ok(plain) => {
                self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_fetched
                    .fetch_add(plain.len() as u64, Ordering::Relaxed);
                // A full cache disk must not fail the guest's read.
                let _ = self.cache.insert(id, &plain);
                Ok(Arc::new(plain))
            }
            Err(e) => Err(e),
        };
        let shared = match &result {
            Ok(d) => Ok(d.clone()),
            Err(e) => Err(e.to_string()),
        };
        *flight.done.lock().expect("flight lock") = Some(shared);
        flight.cv.notify_all();
        self.flights.lock().expect("flight lock").remove(id);
        result.map_err(|e| match e {
            StoreError::Corrupt { .. } | StoreError::Missing(_) => DeviceError::io(
                format!("chunk {id} of the disk"),
                std::io::Error::other(e.to_string()),
            ),
            other => DeviceError::Unavailable(other.to_string()),
        })
    }

    /// Splits `[off, off+len)` into (chunk index, offset in chunk, length) pieces.
    fn pieces(&self, off: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize)> + use<> {
        let cs = self.chunk_size();
        let end = off + len;
        let mut pos = off;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let i = (pos / cs) as usize;
            let a = (pos % cs) as usize;
            let n = ((cs - a as u64).min(end - pos)) as usize;
            pos += n as u64;
            Some((i, a, n))
        })
    }

    /// True if serving `[off, off+len)` needs neither a fetch, a first verification,
    /// nor a merge: every piece is dirty, zero or open in the cache (and, for a write,
    /// dirty or a whole chunk). Such requests are cheap enough to run inline.
    fn is_fast(&self, off: u64, len: u64, write: bool) -> bool {
        self.pieces(off, len).all(|(i, a, n)| {
            if self.is_dirty(i) {
                return true;
            }
            if write {
                return a == 0 && n == self.base.chunk_len(i);
            }
            match &self.base.chunks[i] {
                None => true,
                Some(id) => self.cache.is_open(id),
            }
        })
    }

    pub fn read_sync(&self, off: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        self.demand.fetch_add(1, Ordering::AcqRel);
        let r = self.read_inner(off, len);
        self.demand.fetch_sub(1, Ordering::AcqRel);
        r
    }

    fn read_inner(&self, off: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        let mut out = vec![0u8; len as usize];
        let mut at = 0usize;
        for (i, a, n) in self.pieces(off, len as u64) {
            let dst = &mut out[at..at + n];
            let chunk_off = i as u64 * self.chunk_size();
            if self.is_dirty(i) {
                self.overlay
                    .read_exact_at(dst, chunk_off + a as u64)
                    .map_err(|e| io("read the session overlay", e))?;
            } else if let Some(id) = &self.base.chunks[i]
                && !self.cache.read_into(id, a, dst)
            {
                let data = self.fetch_missing(id)?;
                dst.copy_from_slice(&data[a..a + n]);
            }
            at += n;
        }
        Ok(out)
    }

    /// Writes `data` (or zeros, for `None`) at `off`.
    pub fn write_sync(&self, off: u64, data: Option<&[u8]>, len: u64) -> Result<(), DeviceError> {
        let mut at = 0usize;
        for (i, a, n) in self.pieces(off, len) {
            let _g = self.stripes[i % STRIPES].lock().expect("stripe lock");
            let chunk_off = i as u64 * self.chunk_size();
            let clen = self.base.chunk_len(i);
            let whole = a == 0 && n == clen;
            let piece = data.map(|d| &d[at..at + n]);
            let write = |buf: &[u8], at: u64| {
                self.overlay
                    .write_all_at(buf, at)
                    .map_err(|e| io("write the session overlay", e))
            };
            if whole {
                match piece {
                    Some(p) => write(p, chunk_off)?,
                    None => punch_hole(&self.overlay, chunk_off, clen as u64)
                        .map_err(|e| io("clear a chunk in the session overlay", e))?,
                }
            } else if self.is_dirty(i) {
                match piece {
                    Some(p) => write(p, chunk_off + a as u64)?,
                    None => write(&vec![0u8; n], chunk_off + a as u64)?,
                }
            } else {
                // First write to a clean chunk: merge it with the base chunk.
                let mut buf = match &self.base.chunks[i] {
                    Some(id) => {
                        Arc::try_unwrap(self.fetch(id)?).unwrap_or_else(|shared| (*shared).clone())
                    }
                    None => vec![0u8; clen],
                };
                match piece {
                    Some(p) => buf[a..a + n].copy_from_slice(p),
                    None => buf[a..a + n].fill(0),
                }
                write(&buf, chunk_off)?;
            }
            self.set_dirty(i);
            at += n;
        }
        Ok(())
    }

    /// Makes every write so far durable: overlay data first, then the dirty map that
    /// points at it (DESIGN invariant 4).
    pub fn flush_sync(&self) -> Result<(), DeviceError> {
        let mut durable = self.durable_gen.lock().expect("flush lock");
        let generation = self.dirty_gen.load(Ordering::Acquire);
        let bits: Vec<u64> = self
            .dirty
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .collect();
        self.overlay
            .sync_data()
            .map_err(|e| io("sync the session overlay", e))?;
        if generation != *durable || !self.dir.dirty_path().exists() {
            self.dir
                .write_dirty(&bits, self.base.chunks.len() as u64)
                .map_err(|e| {
                    DeviceError::io("write the dirty map", std::io::Error::other(e.to_string()))
                })?;
            *durable = generation;
        }
        Ok(())
    }

    pub fn cache_sync(&self, off: u64, len: u32) -> Result<(), DeviceError> {
        for (i, _, _) in self.pieces(off, len as u64) {
            if !self.is_dirty(i)
                && let Some(id) = &self.base.chunks[i]
            {
                self.fetch(id)?;
            }
        }
        Ok(())
    }

    pub fn block_status_sync(&self, off: u64, len: u32) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (i, _, n) in self.pieces(off, len as u64) {
            let e = if !self.is_dirty(i) && self.base.chunks[i].is_none() {
                Extent::hole(n as u32)
            } else {
                Extent::data(n as u32)
            };
            match out.last_mut() {
                Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
                _ => out.push(e),
            }
        }
        out
    }

    /// Fetches every clean, non-zero chunk the cache lacks, one at a time, yielding
    /// to reads the guest waits on. Stops when `stop` is set.
    pub fn prefetch(&self, stop: &AtomicBool) {
        for (i, c) in self.base.chunks.iter().enumerate() {
            let Some(id) = c else { continue };
            while self.demand.load(Ordering::Acquire) > 0 && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if self.is_dirty(i) || self.cache.contains(id) {
                continue;
            }
            let _ = self.fetch(id);
        }
    }
}

fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return f.write_all_at(&vec![0u8; len as usize], off);
    }
    Err(e)
}

/// The NBD face of a [`Disk`]: each request runs on a blocking thread.
#[derive(Clone)]
pub struct NbdDisk(pub Arc<Disk>);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DeviceError> + Send + 'static,
) -> Result<T, DeviceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DeviceError::io("run a disk request", std::io::Error::other(e.to_string())))?
}

impl BlockDevice for NbdDisk {
    fn size(&self) -> u64 {
        self.0.base.disk_size
    }

    fn multi_conn(&self) -> bool {
        // One overlay and one flush for every connection.
        true
    }

    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<u8>, DeviceError>> + Send {
        let d = self.0.clone();
        async move {
            // Warm reads are a pread or two: a thread hand-off would cost more.
            if d.is_fast(offset, len as u64, false) {
                return d.read_sync(offset, len);
            }
            blocking(move || d.read_sync(offset, len)).await
        }
    }

    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        let d = self.0.clone();
        async move {
            if !fua && d.is_fast(offset, data.len() as u64, true) {
                return d.write_sync(offset, Some(&data), data.len() as u64);
            }
            blocking(move || {
                d.write_sync(offset, Some(&data), data.len() as u64)?;
                if fua { d.flush_sync() } else { Ok(()) }
            })
            .await
        }
    }

    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send {
        let d = self.0.clone();
        blocking(move || d.flush_sync())
    }

    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send {
        let d = self.0.clone();
        blocking(move || d.write_sync(offset, None, len as u64))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _no_hole: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        let d = self.0.clone();
        blocking(move || {
            d.write_sync(offset, None, len as u64)?;
            if fua { d.flush_sync() } else { Ok(()) }
        })
    }

    fn cache(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send {
        let d = self.0.clone();
        blocking(move || d.cache_sync(offset, len))
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, DeviceError>> + Send {
        let d = self.0.clone();
        blocking(move || Ok(d.block_status_sync(offset, len)))
    }
}
