//! The memory image behind the FUSE file: chunk states, the overlay file, the dirty map
//! and the counters. No FUSE here, so the unit tests drive it directly.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::{Counters, FetchError, Fetcher, MemError};

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Only in the base (the bank or the station cache): the first access fetches it.
    Absent,
    /// A fetch is in flight; others wait on the condition variable.
    Fetching,
    /// In the overlay: fetched, written whole, or a zero chunk (a hole in the overlay).
    Ready,
}

/// The geometry of a memory image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The guest's RAM size in bytes (the file's size).
    pub size: u64,
    /// Bytes per chunk, a power of two; the last chunk may be shorter.
    pub chunk_size: u32,
}

impl Layout {
    /// How many chunks cover `size`.
    pub fn chunks(&self) -> usize {
        self.size.div_ceil(self.chunk_size as u64) as usize
    }

    /// The length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = i as u64 * self.chunk_size as u64;
        (self.size - start).min(self.chunk_size as u64) as usize
    }

    fn start(&self, i: usize) -> u64 {
        i as u64 * self.chunk_size as u64
    }
}

#[derive(Default)]
struct Stats {
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    faults_waited: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    largest_read: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    fetch_errors: AtomicU64,
    prefetched: AtomicU64,
    /// Reads being served now (a guest fault waits in one of them).
    reads_in_flight: AtomicU64,
    /// Chunks fetched by read-ahead with a sequential guest fault.
    read_ahead: AtomicU64,
}

struct Inner {
    states: Vec<State>,
    /// One bit per chunk: written since the image was made (or since
    /// [`MemImage::clear_dirty`]).
    dirty: Vec<u64>,
    /// One bit per chunk: written since [`MemImage::take_changed`] last took it (set
    /// with the dirty bit, after the bytes are in the overlay).
    changed: Vec<u64>,
    last_error: Option<String>,
    /// The chunks a guest access fetched, in the order of their first fetch.
    faults: Vec<u32>,
    /// The first [`READ_LOG`] read requests: offset and length.
    read_log: Vec<(u64, u32)>,
    /// The chunk after the last read's, and the read-ahead window (chunks) that
    /// sequential faults have grown.
    next_chunk: usize,
    window: usize,
}

/// The most chunks one read-ahead fetches beyond a fault (64 KiB chunks: 2 MiB).
pub const READ_AHEAD_MAX: usize = 32;

/// How many read requests [`MemImage::read_log`] keeps (a fault's read-around is a
/// few requests; this covers a resume until the guest answers).
const READ_LOG: usize = 4096;

/// A guest RAM image of fixed-size chunks, fetched on first access through a
/// [`Fetcher`]; writes go to a sparse overlay file and set the chunk's dirty bit.
pub struct MemImage {
    layout: Layout,
    overlay: File,
    overlay_path: PathBuf,
    fetcher: Arc<dyn Fetcher>,
    inner: Mutex<Inner>,
    fetched: Condvar,
    stats: Stats,
}

impl MemImage {
    /// A new image of `layout` whose overlay is created at `overlay` (it must not
    /// exist; it is made sparse, `layout.size` long). `nonzero[i]` is false for a chunk
    /// the version's index elides as zero: it reads as zeros without a fetch.
    pub fn create(
        layout: Layout,
        nonzero: &[bool],
        overlay: &Path,
        fetcher: Arc<dyn Fetcher>,
    ) -> Result<MemImage, MemError> {
        if !layout.chunk_size.is_power_of_two() || layout.chunk_size < 4096 {
            return Err(MemError::Layout(format!(
                "chunk size {} is not a power of two of at least 4096",
                layout.chunk_size
            )));
        }
        if layout.size == 0 || !layout.size.is_multiple_of(4096) {
            return Err(MemError::Layout(format!(
                "RAM size {} is not a positive multiple of 4096",
                layout.size
            )));
        }
        if nonzero.len() != layout.chunks() {
            return Err(MemError::Layout(format!(
                "the index has {} chunks, {} bytes of RAM in chunks of {} need {}",
                nonzero.len(),
                layout.size,
                layout.chunk_size,
                layout.chunks()
            )));
        }
        let io = |e: std::io::Error| MemError::Overlay {
            path: overlay.to_path_buf(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(overlay)
            .map_err(io)?;
        file.set_len(layout.size).map_err(io)?;
        let states = nonzero
            .iter()
            .map(|&nz| if nz { State::Absent } else { State::Ready })
            .collect();
        Ok(MemImage {
            layout,
            overlay: file,
            overlay_path: overlay.to_path_buf(),
            fetcher,
            inner: Mutex::new(Inner {
                states,
                dirty: vec![0; layout.chunks().div_ceil(64)],
                changed: vec![0; layout.chunks().div_ceil(64)],
                last_error: None,
                faults: Vec::new(),
                read_log: Vec::new(),
                next_chunk: usize::MAX,
                window: 0,
            }),
            fetched: Condvar::new(),
            stats: Stats::default(),
        })
    }

    /// The image's geometry.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every step under the lock leaves the states consistent; go on after a panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn chunk_range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let cs = self.layout.chunk_size as u64;
        let end = (offset + len).min(self.layout.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        (offset / cs) as usize..end.div_ceil(cs) as usize
    }

    /// Makes chunk `i` ready in the overlay, fetching it or joining a fetch in flight.
    /// `guest` says whether a guest access waits on it (counted as a fault waited).
    fn ensure(&self, i: usize, guest: bool) -> Result<(), MemError> {
        let mut g = self.lock();
        let mut waited = false;
        loop {
            match g.states[i] {
                State::Ready => return Ok(()),
                State::Fetching => {
                    if guest && !waited {
                        waited = true;
                        self.stats.faults_waited.fetch_add(1, Ordering::Relaxed);
                    }
                    g = self.fetched.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                State::Absent => {
                    g.states[i] = State::Fetching;
                    if guest {
                        g.faults.push(i as u32);
                    }
                    drop(g);
                    if guest && !waited {
                        self.stats.faults_waited.fetch_add(1, Ordering::Relaxed);
                    } else if !guest {
                        self.stats.prefetched.fetch_add(1, Ordering::Relaxed);
                    }
                    let r = self.fetch_into_overlay(i);
                    let mut g = self.lock();
                    g.states[i] = if r.is_ok() {
                        State::Ready
                    } else {
                        State::Absent
                    };
                    if let Err(e) = &r {
                        self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                        g.last_error = Some(e.to_string());
                    }
                    drop(g);
                    self.fetched.notify_all();
                    return r;
                }
            }
        }
    }

    fn fetch_into_overlay(&self, i: usize) -> Result<(), MemError> {
        let data = self.fetcher.fetch(i);
        self.store_fetched(i, data)
    }

    /// Fetches, in one [`Fetcher::fetch_many`], the chunks of `chunks` that are absent
    /// (claiming them first, so others wait for this fetch), for a guest access
    /// (`guest`, counted as faults waited) or ahead of the guest (counted as
    /// prefetched). After a guest access the caller [`MemImage::ensure`]s each chunk.
    /// Returns the first failed fetch's error.
    fn fetch_absent(
        &self,
        chunks: impl IntoIterator<Item = usize>,
        guest: bool,
    ) -> Result<(), MemError> {
        let prefetched = &self.stats.prefetched;
        match guest {
            true => self.fetch_absent_with(chunks, 0..0, prefetched),
            false => self.fetch_absent_with(0..0, chunks, prefetched),
        }
    }

    /// [`MemImage::fetch_absent`] of the guest's `chunks` and, in the same batch, the
    /// absent chunks of `ahead` (read-ahead or prefetch, counted in `counter`: not
    /// faults; their failures are left to a later access).
    fn fetch_absent_with(
        &self,
        chunks: impl IntoIterator<Item = usize>,
        ahead: impl IntoIterator<Item = usize>,
        counter: &AtomicU64,
    ) -> Result<(), MemError> {
        let mut g = self.lock();
        let n = self.layout.chunks();
        let mut mine: Vec<usize> = Vec::new();
        for i in chunks {
            if i < n && g.states[i] == State::Absent {
                g.states[i] = State::Fetching;
                g.faults.push(i as u32);
                mine.push(i);
            }
        }
        let guest = mine.len();
        for i in ahead {
            if i < n && g.states[i] == State::Absent {
                g.states[i] = State::Fetching;
                mine.push(i);
            }
        }
        drop(g);
        if mine.is_empty() {
            return Ok(());
        }
        self.stats
            .faults_waited
            .fetch_add(guest as u64, Ordering::Relaxed);
        counter.fetch_add((mine.len() - guest) as u64, Ordering::Relaxed);
        let mut results = self.fetcher.fetch_many(&mine).into_iter();
        let mut outcomes: Vec<_> = mine
            .iter()
            .map(|&i| {
                let data = results.next().unwrap_or_else(|| {
                    Err(FetchError::new(
                        "the fetcher returned fewer chunks than asked",
                    ))
                });
                self.store_fetched(i, data)
            })
            .collect();
        let mut g = self.lock();
        for (&i, r) in mine.iter().zip(&outcomes) {
            g.states[i] = if r.is_ok() {
                State::Ready
            } else {
                State::Absent
            };
            if let Err(e) = r {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                g.last_error = Some(e.to_string());
            }
        }
        drop(g);
        self.fetched.notify_all();
        match guest {
            0 => outcomes.drain(..).find(Result::is_err).unwrap_or(Ok(())),
            _ => outcomes
                .drain(..guest)
                .find(Result::is_err)
                .unwrap_or(Ok(())),
        }
    }

    /// Writes a fetched chunk `i` into the overlay, checking its length.
    fn store_fetched(&self, i: usize, data: Result<Vec<u8>, FetchError>) -> Result<(), MemError> {
        let want = self.layout.chunk_len(i);
        let data = data.map_err(|source| MemError::Fetch { chunk: i, source })?;
        if data.len() != want {
            return Err(MemError::Fetch {
                chunk: i,
                source: FetchError::new(format!(
                    "the fetcher returned {} bytes for a chunk of {want}",
                    data.len()
                )),
            });
        }
        self.stats.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_fetched
            .fetch_add(want as u64, Ordering::Relaxed);
        // A fetched chunk may still hold zero pages: leave them holes.
        let mut at = 0;
        for page in data.chunks(4096) {
            if page.iter().any(|&b| b != 0) {
                self.overlay
                    .write_all_at(page, self.layout.start(i) + at)
                    .map_err(|e| self.overlay_err(e))?;
            }
            at += page.len() as u64;
        }
        Ok(())
    }

    fn overlay_err(&self, e: std::io::Error) -> MemError {
        MemError::Overlay {
            path: self.overlay_path.clone(),
            source: e,
        }
    }

    /// Reads up to `len` bytes at `offset` (short at the end of the image), fetching
    /// the chunks it touches that are not in the overlay yet.
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, MemError> {
        self.stats.reads_in_flight.fetch_add(1, Ordering::AcqRel);
        let r = self.read_counted(offset, len);
        self.stats.reads_in_flight.fetch_sub(1, Ordering::AcqRel);
        r
    }

    fn read_counted(&self, offset: u64, len: u32) -> Result<Vec<u8>, MemError> {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .largest_read
            .fetch_max(len as u64, Ordering::Relaxed);
        let range = self.chunk_range(offset, len as u64);
        // Read-ahead: a read that starts where the last one ended and finds a chunk
        // absent grows the window (1, 2, 4, … READ_AHEAD_MAX chunks) fetched with it in
        // the same batch; a read elsewhere shrinks it to nothing.
        let ahead = {
            let mut g = self.lock();
            if g.read_log.len() < READ_LOG {
                g.read_log.push((offset, len));
            }
            let sequential = g.next_chunk != usize::MAX
                && range.start + 1 >= g.next_chunk
                && range.start <= g.next_chunk + 1;
            let missing = range.clone().any(|i| g.states[i] == State::Absent);
            if !sequential {
                g.window = 0;
            } else if missing {
                g.window = (g.window * 2).clamp(1, READ_AHEAD_MAX);
            }
            g.next_chunk = range.end;
            if missing { g.window } else { 0 }
        };
        let ahead = range.end..(range.end + ahead).min(self.layout.chunks());
        self.fetch_absent_with(range.clone(), ahead, &self.stats.read_ahead)?;
        for i in range {
            self.ensure(i, true)?;
        }
        let end = (offset + len as u64).min(self.layout.size);
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        self.overlay
            .read_exact_at(&mut buf, offset)
            .map_err(|e| self.overlay_err(e))?;
        self.stats
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf)
    }

    /// Writes `data` at `offset` into the overlay and marks the chunks dirty. A chunk
    /// written only in part is fetched first (its other bytes come from the base); one
    /// written whole is not. Writes past the end fail: the image never grows.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemError> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.layout.size)
            .ok_or(MemError::OutOfRange {
                offset,
                len: data.len() as u64,
                size: self.layout.size,
            })?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        for i in self.chunk_range(offset, data.len() as u64) {
            let start = self.layout.start(i);
            let whole = offset <= start && end >= start + self.layout.chunk_len(i) as u64;
            if whole {
                let mut g = self.lock();
                while g.states[i] == State::Fetching {
                    g = self.fetched.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                g.states[i] = State::Ready;
            } else {
                self.ensure(i, true)?;
            }
        }
        self.overlay
            .write_all_at(data, offset)
            .map_err(|e| self.overlay_err(e))?;
        let mut g = self.lock();
        for i in self.chunk_range(offset, data.len() as u64) {
            g.dirty[i / 64] |= 1 << (i % 64);
            g.changed[i / 64] |= 1 << (i % 64);
        }
        drop(g);
        self.stats
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Fetches chunk `i` ahead of the guest if it is not in the overlay yet (a guest
    /// access to it meanwhile waits for this fetch instead of starting another).
    pub fn prefetch(&self, i: usize) -> Result<(), MemError> {
        if i >= self.layout.chunks() {
            return Ok(());
        }
        self.ensure(i, false)
    }

    /// Fetches the absent chunks of `chunks` ahead of the guest in one
    /// [`Fetcher::fetch_many`] (a guest access to one of them meanwhile waits for this
    /// fetch). Chunks past the end are ignored.
    pub fn prefetch_many(&self, chunks: &[usize]) -> Result<(), MemError> {
        self.fetch_absent(chunks.iter().copied(), false)
    }

    /// The chunks guest accesses fetched so far, in the order of their first fetch
    /// (the RAM's working set, for a later resume to fetch ahead of the guest).
    pub fn fault_order(&self) -> Vec<usize> {
        self.lock().faults.iter().map(|&i| i as usize).collect()
    }

    /// The first read requests served (up to 4096), as offset and length: what the
    /// kernel's read-around asked for on each fault.
    pub fn read_log(&self) -> Vec<(u64, u32)> {
        self.lock().read_log.clone()
    }

    /// Makes the overlay durable (`fdatasync`). The kernel hands dirty pages of a
    /// shared mapping to the file system only on write-back or an `fsync` of the file,
    /// so a suspend fsyncs the FUSE file first, which ends here.
    pub fn sync(&self) -> Result<(), MemError> {
        self.overlay.sync_data().map_err(|e| self.overlay_err(e))
    }

    /// The chunks written since the image was made, in order.
    pub fn dirty_chunks(&self) -> Vec<usize> {
        let g = self.lock();
        (0..self.layout.chunks())
            .filter(|&i| g.dirty[i / 64] & (1 << (i % 64)) != 0)
            .collect()
    }

    /// Whether a read (a guest fault) is being served now: background work that
    /// competes with it for the link waits.
    pub fn guest_reading(&self) -> bool {
        self.stats.reads_in_flight.load(Ordering::Acquire) > 0
    }

    /// The chunks written since the last call (or since the image was made), in order,
    /// their marks cleared: a background write-back takes them *before* it reads them,
    /// so a write it does not see marks the chunk again.
    pub fn take_changed(&self) -> Vec<usize> {
        let mut g = self.lock();
        let n = self.layout.chunks();
        let mut out = Vec::new();
        for (w, word) in g.changed.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if w * 64 + b < n {
                    out.push(w * 64 + b);
                }
            }
        }
        out
    }

    /// Marks chunk `i` changed again (a write-back that took it and did not store it).
    pub fn mark_changed(&self, i: usize) {
        if i < self.layout.chunks() {
            self.lock().changed[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether chunk `i` was written since [`MemImage::take_changed`] last took it.
    pub fn is_changed(&self, i: usize) -> bool {
        i < self.layout.chunks() && self.lock().changed[i / 64] & (1 << (i % 64)) != 0
    }

    /// Reads chunk `i` as the guest sees it now (for a suspend that stores the dirty
    /// chunks), fetching it if it is not in the overlay.
    pub fn read_chunk(&self, i: usize) -> Result<Vec<u8>, MemError> {
        let start = self.layout.start(i);
        self.ensure(i, false)?;
        let mut buf = vec![0u8; self.layout.chunk_len(i)];
        self.overlay
            .read_exact_at(&mut buf, start)
            .map_err(|e| self.overlay_err(e))?;
        Ok(buf)
    }

    /// Keeps `e` as the last error the counters report.
    pub(crate) fn note_error(&self, e: &MemError) {
        self.lock().last_error = Some(e.to_string());
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        let g = self.lock();
        let ready = g.states.iter().filter(|s| **s == State::Ready).count() as u64;
        let dirty = g.dirty.iter().map(|w| w.count_ones() as u64).sum();
        let last_error = g.last_error.clone();
        drop(g);
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            chunks: self.layout.chunks() as u64,
            chunks_ready: ready,
            chunks_fetched: l(&s.chunks_fetched),
            bytes_fetched: l(&s.bytes_fetched),
            faults_waited: l(&s.faults_waited),
            prefetched: l(&s.prefetched),
            read_ahead: l(&s.read_ahead),
            reads_in_flight: l(&s.reads_in_flight),
            fetch_errors: l(&s.fetch_errors),
            reads: l(&s.reads),
            bytes_read: l(&s.bytes_read),
            largest_read: l(&s.largest_read),
            writes: l(&s.writes),
            bytes_written: l(&s.bytes_written),
            dirty_chunks: dirty,
            last_error,
        }
    }
}
