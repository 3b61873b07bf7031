//! [`Disk`]: a machine's disk on the station, served to NBD clients.
//!
//! Reads come from the overlay for the blocks of a chunk the session wrote, else cost
//! nothing if the chunk is zero, else from the station cache, else from the bank
//! (verified, then cached). Only one fetch per chunk is in flight; others wait for it.
//!
//! Writes go to the overlay, tracked per block (4 KiB for 64 KiB chunks; see
//! [`block_size_for`]): a write covering whole blocks of a clean chunk is written as
//! is and marks those blocks dirty, so a 4 KiB write costs 4 KiB. Only a write that
//! covers part of a block not yet in the overlay first merges that block with the
//! base chunk. Check-in and recovery assemble each partly dirty chunk in memory
//! ([`assemble_chunk`]) from the overlay's blocks and a freshly verified base chunk.
//!
//! A FLUSH appends the checksums of the blocks it makes durable to the session's
//! journal; a write to a block whose checksum is durable first syncs an intent record
//! ([`crate::session`] explains why).
//!
//! ## Background fetches
//!
//! [`Disk::start_background`] starts a few worker threads (bounded parallelism) that
//! fetch into the station cache ahead of the guest: **read-ahead** of the chunks after a
//! sequential miss (a window of [`READAHEAD_MIN`] chunks, doubling up to
//! [`READAHEAD_MAX`] while the guest keeps reading what it brought, never past the
//! disk's end), and the replay of a recorded **working set** ([`crate::workset`],
//! [`Disk::replay`]) in its order. A guest read never queues behind them: it fetches at
//! once, or joins the fetch of the same chunk already in flight. The replay stops at
//! the list's end, or once it has brought half the cache's bound, so it never evicts the
//! working set it is filling. Every read the guest waits on a fetch for is counted with
//! its wait ([`SessionStats`]).
//!
//! Lock order: the flush lock (the journal's mutex), then a chunk's stripe lock, then
//! the pending-chunk list; a write takes the flush lock (for an intent) only while it
//! holds no stripe lock. The flight map is held only to look up or insert a flight,
//! never across I/O.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use mbank_core::{ChunkId, DiskIndex};
use mbank_nbd::{BlockDevice, DeviceError, Extent};
use mbank_store::{ChunkStore, StoreError};

use crate::StationError;
use crate::cache::ChunkCache;
use crate::cached::{CachedStore, FetchError};
use crate::session::{
    BlockSum, DirtyMap, JOURNAL_HEADER, JOURNAL_PREALLOC, JOURNAL_RECORD, NewFiles, Record,
    SessionDir, SessionLock, SessionMeta, block_size_for, block_sum, encode_dirty, encode_record,
    full_mask,
};
use crate::workset::{Entry, WorkingSet};

const STRIPES: usize = 256;

/// Counters of one session.
#[derive(Debug, Default)]
pub struct DiskCounters {
    pub chunks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    /// Bytes appended to the journal (records, and the zeros it is extended by).
    pub journal_bytes: AtomicU64,
    /// Intent records synced before a flushed block was rewritten.
    pub intents: AtomicU64,
    /// Times the journal was folded into a new dirty map.
    pub compactions: AtomicU64,
    /// Flushes that a flush asked for after them made durable (group commit).
    pub flushes_shared: AtomicU64,
    /// Guest reads (and write merges, and stream chunks the boot needs) that waited for
    /// a fetch from the bank, and how long they waited in all (ns).
    pub misses_waited: AtomicU64,
    pub wait_ns: AtomicU64,
    /// Guest reads waiting for a fetch now.
    pub misses_waiting: AtomicU64,
    /// Chunks the guest used for the first time that a background fetch had brought.
    pub prefetch_hits: AtomicU64,
    /// Chunks fetched by the working-set replay, and by read-ahead.
    pub prefetched_chunks: AtomicU64,
    pub readahead_chunks: AtomicU64,
    /// Working-set entries queued, found cached already, naming chunks the bank no
    /// longer has, or no longer fitting the disk or its streams (stale).
    pub workset_queued: AtomicU64,
    pub workset_cached: AtomicU64,
    pub workset_missing: AtomicU64,
    pub workset_stale: AtomicU64,
    /// Entries left unfetched because the replay had brought half the cache's bound.
    pub workset_over_budget: AtomicU64,
    /// Dirty chunks the background write-back stored in the bank, and their bytes as
    /// sent (compressed); chunks it found there already are not counted.
    pub written_back_chunks: AtomicU64,
    pub written_back_bytes: AtomicU64,
}

/// A session's statistics so far, as `attach --json`, `run --json` and the control
/// socket's `stats` show them.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SessionStats {
    /// Bytes and chunks fetched from the bank (by the guest's reads and in the
    /// background).
    pub bytes_fetched: u64,
    pub chunks_fetched: u64,
    /// Reads the guest waited on a fetch for, and their total wait.
    pub misses_waited: u64,
    pub miss_wait_seconds: f64,
    /// Reads waiting for a fetch now (a guest stalled on an unreachable bank shows
    /// here).
    pub misses_waiting: u64,
    /// Chunks the guest found in the cache because a background fetch brought them.
    pub prefetch_hits: u64,
    pub prefetched_chunks: u64,
    pub readahead_chunks: u64,
    /// Entries of the working set this session recorded so far.
    pub workset_recorded: u64,
    pub workset_queued: u64,
    pub workset_cached: u64,
    pub workset_missing: u64,
    pub workset_stale: u64,
    pub workset_over_budget: u64,
    /// Dirty chunks the background write-back sent to the bank ([`crate::writeback`]).
    pub written_back_chunks: u64,
    pub written_back_bytes: u64,
    /// Guest flushes that another flush made durable (group commit).
    pub flushes_shared: u64,
}

/// Per-place flags: the guest read the chunk; a background fetch brought it; read-ahead
/// brought it.
const USED: u8 = 1;
const PREFETCHED: u8 = 2;
const AHEAD: u8 = 4;
/// Read-ahead's first window after a sequential miss, in chunks...
pub const READAHEAD_MIN: usize = 4;
/// ...and its largest.
pub const READAHEAD_MAX: usize = 32;

/// The working set being recorded: chunks in order of first use, until a quiet period
/// or a time bound.
struct Recorder {
    entries: Vec<Entry>,
    open: bool,
    started: Instant,
    last: Option<Instant>,
    quiet: Duration,
    max: Duration,
}

impl Recorder {
    fn note(&mut self, e: Entry) {
        if !self.open {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.started) > self.max
            || self
                .last
                .is_some_and(|l| now.duration_since(l) > self.quiet)
            || self.entries.len() as u64 >= crate::workset::MAX_ENTRIES
        {
            // The guest is ready (or took too long): later reads are its work, not
            // its start.
            self.open = false;
            return;
        }
        self.entries.push(e);
        self.last = Some(now);
    }
}

/// What a background worker fetches.
enum Job {
    Ahead(usize),
    List(Entry),
}

#[derive(Default)]
struct Queue {
    ahead: VecDeque<usize>,
    list: VecDeque<Entry>,
    busy: usize,
    workers: usize,
    stop: bool,
    /// Bytes the replay brought into the cache, and the most it may.
    list_bytes: u64,
    /// Read-ahead: the first place not queued yet, and the window.
    ra_next: usize,
    ra_window: usize,
    /// Stream chunks a replay may fetch (those of the session's version).
    stream_ids: HashSet<ChunkId>,
}

/// The background fetchers' queue, shared with their threads.
#[derive(Default)]
struct Background {
    q: Mutex<Queue>,
    /// Work arrived, or stop.
    cv: Condvar,
    /// The queue ran dry with no worker busy.
    idle: Condvar,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// The journal a session appends its flushes to, and the durable state it and the
/// dirty map file describe together. Its mutex is the flush lock.
struct Journal {
    file: File,
    generation: u64,
    /// Where the next record goes.
    end: u64,
    /// The file's length: zeros from `end` on.
    len: u64,
    seq: u64,
    /// Per chunk, the blocks the durable state names (see [`DirtyMap`]).
    durable: Vec<u64>,
    /// The checksums the durable state holds (see [`DirtyMap::sums`]).
    sums: std::collections::BTreeMap<u64, BlockSum>,
    /// A compaction failed part way: a map of the next generation may exist, which
    /// would hide anything appended to this journal. Nothing is appended until a
    /// compaction succeeds.
    redo: bool,
    /// The last flush snapshot ([`Disk::flush_snapshots`]) made durable.
    durable_through: u64,
}

/// The journal is folded into a new dirty map once its records exceed this many bytes
/// and twice the size of that map (so compaction costs a bounded share of the flushes).
pub const DEFAULT_COMPACT_BYTES: u64 = 4 << 20;

/// Appends exactly `n` bytes read at `off` of `f` to `buf`, without first zeroing
/// them. On error `buf` is left as it was.
pub fn append_pread(buf: &mut Vec<u8>, f: &File, off: u64, n: usize) -> std::io::Result<()> {
    let start = buf.len();
    buf.reserve(n);
    while buf.len() < start + n {
        let want = start + n - buf.len();
        let at = off + (buf.len() - start) as u64;
        let spare = &mut buf.spare_capacity_mut()[..want];
        // SAFETY: `spare` is `want` bytes of the vector's allocation past its length,
        // valid for writes; pread writes at most `want` bytes there and nothing else.
        let r = unsafe {
            libc::pread(
                f.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                want,
                at as libc::off_t,
            )
        };
        let err = match r {
            0 => std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            r if r > 0 => {
                // SAFETY: pread initialised the first `r` (<= `want`) spare bytes.
                unsafe { buf.set_len(buf.len() + r as usize) };
                continue;
            }
            _ => std::io::Error::last_os_error(),
        };
        if err.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        buf.truncate(start);
        return Err(err);
    }
    Ok(())
}

/// The mask of blocks `first..=last`.
fn block_range(first: usize, last: usize) -> u64 {
    let upto = if last >= 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    upto & !((1u64 << first) - 1)
}

/// A checked-out disk: base index, overlay, dirty map.
pub struct Disk {
    pub meta: SessionMeta,
    pub dir: SessionDir,
    pub base: DiskIndex,
    overlay: File,
    /// Per chunk, the blocks the overlay holds (see [`DirtyMap`]).
    dirty: Vec<AtomicU64>,
    /// Per chunk, the blocks written since the last flush took them in: the next flush
    /// records their checksums.
    pending: Vec<AtomicU64>,
    /// Chunks with pending blocks (a chunk may appear twice).
    pending_chunks: Mutex<Vec<usize>>,
    /// Per chunk, the blocks whose checksum a flush has taken and no intent has
    /// released since: a write to one first syncs an intent record.
    sealed: Vec<AtomicU64>,
    block_size: usize,
    journal: Mutex<Journal>,
    /// Flushes that took the pending blocks so far (under the journal lock): a flush
    /// asked for after snapshot `n` was taken is covered by any later snapshot.
    flush_snapshots: AtomicU64,
    compact_bytes: AtomicU64,
    stripes: Vec<Mutex<()>>,
    cache: Arc<ChunkCache>,
    /// The station cache and the bank: every chunk the session fetches.
    chunks: Arc<CachedStore>,
    demand: AtomicUsize,
    pub counters: DiskCounters,
    /// The session directory's lock, held while the disk is served.
    lock: Option<SessionLock>,
    /// Damaged bank chunks already reported on stderr.
    reported: Mutex<std::collections::HashSet<ChunkId>>,
    /// Per place: [`USED`], [`PREFETCHED`], [`AHEAD`].
    flags: Vec<AtomicU8>,
    /// Stream chunks the session used, and those a replay brought.
    streams_used: Mutex<HashSet<ChunkId>>,
    streams_prefetched: Mutex<HashSet<ChunkId>>,
    recorder: Mutex<Recorder>,
    bg: Arc<Background>,
    /// The session's last checkpoint ([`crate::checkpoint`]), as `session.json` has it,
    /// and the durable map it was taken from (kept by this process only).
    checkpoint: Mutex<Option<crate::session::Checkpoint>>,
    checkpoint_map: Mutex<Option<DirtyMap>>,
    /// Per chunk: written since the background write-back last took it.
    changed: Vec<AtomicBool>,
    /// Per chunk the write-back stored: what it sent ([`Disk::record_written_back`]).
    written_back: Mutex<HashMap<usize, WrittenBack>>,
}

/// A chunk the write-back stored in the bank: its id (`None`: all zeros, nothing
/// stored) and the blocks of the overlay it was assembled from with their checksums.
#[derive(Clone, Debug)]
pub struct WrittenBack {
    pub id: Option<ChunkId>,
    pub mask: u64,
    pub sums: Vec<crate::session::BlockSum>,
}

/// What [`Disk::snapshot_flushed`] took: the durable map, the flush count it
/// reflects, and each chunk it names with the overlay's blocks in place.
pub type FlushedState = (DirtyMap, u64, Vec<(usize, Vec<u8>)>);

fn io(what: &str, e: std::io::Error) -> DeviceError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        DeviceError::NoSpace(what.to_string())
    } else {
        DeviceError::io(what.to_string(), e)
    }
}

impl Disk {
    /// The disk of a new session ([`crate::session::NewSession::finish`]): nothing
    /// written yet, an empty journal of generation 1.
    pub fn new(
        meta: SessionMeta,
        files: NewFiles,
        base: DiskIndex,
        cache: Arc<ChunkCache>,
        store: Arc<dyn ChunkStore>,
    ) -> Self {
        let len = files.journal.metadata().map_or(0, |m| m.len());
        let n = base.chunks.len();
        Disk {
            meta,
            dir: files.dir,
            block_size: block_size_for(base.chunk_size) as usize,
            base,
            overlay: files.overlay,
            dirty: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pending: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pending_chunks: Mutex::new(Vec::new()),
            sealed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            journal: Mutex::new(Journal {
                file: files.journal,
                generation: 1,
                end: JOURNAL_HEADER as u64,
                len,
                seq: 0,
                durable: vec![0; n],
                sums: Default::default(),
                redo: false,
                durable_through: 0,
            }),
            flush_snapshots: AtomicU64::new(0),
            compact_bytes: AtomicU64::new(DEFAULT_COMPACT_BYTES),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            chunks: Arc::new(CachedStore::new(cache.clone(), store)),
            cache,
            demand: AtomicUsize::new(0),
            counters: DiskCounters::default(),
            lock: Some(files.lock),
            reported: Mutex::new(std::collections::HashSet::new()),
            flags: (0..n).map(|_| AtomicU8::new(0)).collect(),
            streams_used: Mutex::new(HashSet::new()),
            streams_prefetched: Mutex::new(HashSet::new()),
            recorder: Mutex::new(Recorder {
                entries: Vec::new(),
                open: true,
                started: Instant::now(),
                last: None,
                quiet: Duration::from_millis(crate::workset::DEFAULT_QUIET_MS),
                max: Duration::from_millis(crate::workset::DEFAULT_MAX_MS),
            }),
            bg: Arc::new(Background::default()),
            checkpoint: Mutex::new(None),
            checkpoint_map: Mutex::new(None),
            changed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            written_back: Mutex::new(HashMap::new()),
        }
    }

    /// The chunks written since the last call, for the background write-back: each
    /// is taken once until the guest writes it again.
    pub fn take_changed(&self) -> Vec<usize> {
        (0..self.changed.len())
            .filter(|&i| self.changed[i].swap(false, Ordering::AcqRel))
            .collect()
    }

    /// Records that the write-back stored chunk `i` as `wb` (durable in the bank). Valid
    /// for the check-in only while nothing writes chunk `i` again (see
    /// [`Disk::written_back`]).
    pub fn record_written_back(&self, i: usize, wb: WrittenBack) {
        self.written_back
            .lock()
            .expect("written-back lock")
            .insert(i, wb);
    }

    /// The chunks whose content in `map` (the durable map after the last flush) is what
    /// the write-back stored, with their ids: not written since the write-back took
    /// them (a write marks the chunk after its data is in the overlay, so one that
    /// raced the write-back's read marks it too), the same blocks in the overlay, and
    /// each block's checksum as the write-back read it equal to the one recorded when it
    /// was flushed (so what went to the bank is what was flushed, as the check-in's own
    /// check of the overlay would require). The check-in takes these ids instead of
    /// reading, checking and hashing the chunks again.
    pub fn written_back(&self, map: &DirtyMap) -> HashMap<usize, Option<ChunkId>> {
        let wb = self.written_back.lock().expect("written-back lock");
        wb.iter()
            .filter(|(i, w)| {
                let i = **i;
                !self.changed[i].load(Ordering::Acquire)
                    && map.masks.get(i) == Some(&w.mask)
                    && w.mask != 0
                    && (0..64)
                        .filter(|j| w.mask & (1 << j) != 0)
                        .zip(&w.sums)
                        .all(|(j, sum)| map.sums.get(&(i as u64 * 64 + j)) == Some(sum))
                    && w.sums.len() == w.mask.count_ones() as usize
            })
            .map(|(i, w)| (*i, w.id))
            .collect()
    }

    /// Gives chunk `i` back to the next [`Disk::take_changed`] (its write-back failed
    /// or was cut short).
    pub fn mark_changed(&self, i: usize) {
        self.changed[i].store(true, Ordering::Release);
    }

    /// True while a guest read (or write merge) waits on a fetch from the bank: the
    /// background write-back holds back then.
    pub fn guest_waiting(&self) -> bool {
        self.demand.load(Ordering::Acquire) > 0
    }

    /// The session's metadata with its last checkpoint: what `session.json` holds now.
    pub fn meta_now(&self) -> SessionMeta {
        let mut m = self.meta.clone();
        m.checkpoint = self.checkpoint.lock().expect("checkpoint lock").clone();
        m
    }

    /// Records checkpoint `c` in `session.json` (durably) and in memory, so the next
    /// checkpoint or check-in, and recovery after a crash, derive from it.
    pub fn set_checkpoint(
        &self,
        c: crate::session::Checkpoint,
        map: DirtyMap,
    ) -> Result<(), StationError> {
        let mut g = self.checkpoint.lock().expect("checkpoint lock");
        *self.checkpoint_map.lock().expect("checkpoint lock") = Some(map);
        let mut m = self.meta.clone();
        m.checkpoint = Some(c.clone());
        *g = Some(c);
        self.dir.write_meta(&m)
    }

    /// The durable map the session's last checkpoint was taken from, if this process
    /// took it.
    pub fn checkpoint_map(&self) -> Option<DirtyMap> {
        self.checkpoint_map.lock().expect("checkpoint lock").clone()
    }

    /// How many flushes made blocks durable so far: a checkpoint is due only when this
    /// moved since the last one.
    pub fn flush_seq(&self) -> u64 {
        self.journal.lock().expect("flush lock").seq
    }

    /// The session's flushed state, taken under the flush lock so that no flush
    /// completes while it is read: the durable map, the flush count it reflects, and
    /// for each chunk it names, the chunk's bytes with the blocks the map names read
    /// from the overlay (zeros elsewhere). A sealed block cannot be rewritten while the
    /// lock is held (its intent record needs the lock) and is checked against its
    /// checksum here; a block the guest is rewriting since its last flush may hold its
    /// old, new or torn data, as after a crash. So the result is a state the disk could
    /// have after a power cut at this moment. The guest's writes go on meanwhile; its
    /// flushes, and first rewrites of flushed blocks, wait.
    ///
    /// A chunk that `prev` (the map of the last checkpoint) names with the same blocks,
    /// every one of them sealed with the same checksum in both, holds what it held then
    /// and is left out: the lock is held, and memory used, for the chunks that changed
    /// since (all of them when `prev` is `None`).
    pub fn snapshot_flushed(&self, prev: Option<&DirtyMap>) -> Result<FlushedState, StationError> {
        let j = self.journal.lock().expect("flush lock");
        let mut map = DirtyMap::clean(self.base.disk_size, self.base.chunk_size);
        map.masks.copy_from_slice(&j.durable);
        map.sums = j.sums.clone();
        map.generation = j.generation;
        let bs = self.block_size;
        let mut out = Vec::new();
        let mut bad = Vec::new();
        let same = |i: usize, p: &DirtyMap| {
            let mask = map.masks[i];
            p.masks.get(i) == Some(&mask)
                && (0..64).filter(|b| mask & (1 << b) != 0).all(|b| {
                    let n = i as u64 * 64 + b;
                    map.sums.get(&n).is_some_and(|s| p.sums.get(&n) == Some(s))
                })
        };
        for i in map.dirty_chunks() {
            if prev.is_some_and(|p| same(i, p)) {
                continue;
            }
            let len = self.base.chunk_len(i);
            let mut buf = vec![0u8; len];
            let mask = map.masks[i];
            let blocks = len.div_ceil(bs);
            let mut b = 0;
            while b < blocks {
                if mask & (1 << b) == 0 {
                    b += 1;
                    continue;
                }
                let first = b;
                while b < blocks && mask & (1 << b) != 0 {
                    b += 1;
                }
                let (s, e) = (first * bs, (b * bs).min(len));
                let off = i as u64 * self.chunk_size() + s as u64;
                self.overlay
                    .read_exact_at(&mut buf[s..e], off)
                    .map_err(|e| StationError::Io {
                        what: format!(
                            "read chunk {i} (bytes {off}..) from the session overlay {} for a \
                             checkpoint",
                            self.dir.overlay_path().display()
                        ),
                        source: e,
                    })?;
            }
            for b in (0..blocks).filter(|b| mask & (1 << b) != 0) {
                let n = i as u64 * 64 + b as u64;
                if let Some(sum) = map.sums.get(&n)
                    && block_sum(&buf[map.block_range(i, b)]) != *sum
                {
                    bad.push(n);
                }
            }
            out.push((i, buf));
        }
        if !bad.is_empty() {
            return Err(StationError::OverlayDamaged {
                path: self.dir.overlay_path(),
                blocks: bad,
                block_size: map.block_size,
                chunk_size: map.chunk_size,
            });
        }
        Ok((map, j.seq, out))
    }

    /// Records the working set until no new chunk was needed for `quiet`, or until
    /// `max` after the session started.
    pub fn set_recording(&self, quiet: Duration, max: Duration) {
        let mut r = self.recorder.lock().expect("recorder lock");
        r.quiet = quiet;
        r.max = max;
    }

    /// Ends recording and returns the working set recorded (empty if the guest read
    /// nothing from the bank's chunks).
    pub fn take_working_set(&self) -> WorkingSet {
        let mut r = self.recorder.lock().expect("recorder lock");
        r.open = false;
        WorkingSet {
            chunk_size: self.base.chunk_size,
            entries: r.entries.clone(),
        }
    }

    /// The session's statistics so far.
    pub fn stats(&self) -> SessionStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SessionStats {
            bytes_fetched: get(&c.bytes_fetched),
            chunks_fetched: get(&c.chunks_fetched),
            misses_waited: get(&c.misses_waited),
            miss_wait_seconds: get(&c.wait_ns) as f64 / 1e9,
            misses_waiting: get(&c.misses_waiting),
            prefetch_hits: get(&c.prefetch_hits),
            prefetched_chunks: get(&c.prefetched_chunks),
            readahead_chunks: get(&c.readahead_chunks),
            workset_recorded: self.recorder.lock().expect("recorder lock").entries.len() as u64,
            workset_queued: get(&c.workset_queued),
            workset_cached: get(&c.workset_cached),
            workset_missing: get(&c.workset_missing),
            workset_stale: get(&c.workset_stale),
            workset_over_budget: get(&c.workset_over_budget),
            written_back_chunks: get(&c.written_back_chunks),
            written_back_bytes: get(&c.written_back_bytes),
            flushes_shared: get(&c.flushes_shared),
        }
    }

    /// Runs `fetch`, a fetch the guest waits on: shown as waiting while it runs, then
    /// counted with its wait.
    fn waiting<T>(&self, fetch: impl FnOnce() -> T) -> T {
        let c = &self.counters;
        c.misses_waiting.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        let r = fetch();
        c.misses_waiting.fetch_sub(1, Ordering::Relaxed);
        c.misses_waited.fetch_add(1, Ordering::Relaxed);
        c.wait_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    /// Notes the guest's use of base chunk `id` at place `i`: recorded on its first use;
    /// a prefetch hit if a background fetch brought it; read-ahead goes on if
    /// read-ahead brought it.
    fn first_use(&self, i: usize, id: &ChunkId) {
        if self.flags[i].load(Ordering::Relaxed) & USED != 0 {
            return;
        }
        let prev = self.flags[i].fetch_or(USED, Ordering::AcqRel);
        if prev & USED != 0 {
            return;
        }
        self.recorder
            .lock()
            .expect("recorder lock")
            .note(Entry::Disk {
                place: i as u64,
                id: *id,
            });
        if prev & PREFETCHED != 0 {
            self.counters.prefetch_hits.fetch_add(1, Ordering::Relaxed);
        }
        if prev & AHEAD != 0 {
            self.readahead_extend(i);
        }
    }

    /// Starts `jobs` background fetchers (read-ahead and working-set replay), which run
    /// until [`Disk::stop_background`] or the disk is dropped.
    pub fn start_background(self: &Arc<Self>, jobs: usize) {
        let jobs = jobs.clamp(1, 16);
        self.bg.q.lock().expect("queue lock").workers += jobs;
        let mut threads = self.bg.threads.lock().expect("queue lock");
        for _ in 0..jobs {
            let (bg, disk) = (self.bg.clone(), Arc::downgrade(self));
            threads.push(std::thread::spawn(move || background_worker(&bg, &disk)));
        }
    }

    /// Stops the background fetchers (a fetch in flight completes) and waits for them.
    pub fn stop_background(&self) {
        self.bg.q.lock().expect("queue lock").stop = true;
        self.bg.cv.notify_all();
        self.bg.idle.notify_all();
        let threads = std::mem::take(&mut *self.bg.threads.lock().expect("queue lock"));
        for t in threads {
            // A worker holding the last reference to the disk drops it on its own
            // thread: never join oneself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    /// Waits until the background fetchers have nothing queued and none in flight
    /// (at once if none runs).
    pub fn wait_background_idle(&self) {
        let mut q = self.bg.q.lock().expect("queue lock");
        while q.workers > 0 && !q.stop && (q.busy > 0 || !q.ahead.is_empty() || !q.list.is_empty())
        {
            q = self.bg.idle.wait(q).expect("queue lock");
        }
    }

    /// Queues a recorded working set for the background fetchers, in its order. Disk
    /// entries are fetched from their place in this session's disk; stream entries only
    /// if one of `streams` (the chunks of this version's streams) names them. Entries
    /// that no longer fit are counted as stale and skipped.
    /// Returns how many entries were queued.
    pub fn replay(&self, ws: &WorkingSet, streams: HashSet<ChunkId>) -> u64 {
        let mut q = self.bg.q.lock().expect("queue lock");
        q.list_bytes = 0;
        q.stream_ids = streams;
        let mut stale = 0;
        for e in &ws.entries {
            let fits = match e {
                Entry::Disk { place, .. } => {
                    ws.chunk_size == self.base.chunk_size
                        && (*place as usize) < self.base.chunks.len()
                }
                Entry::Stream { id } => q.stream_ids.contains(id),
            };
            if fits {
                q.list.push_back(*e);
            } else {
                stale += 1;
            }
        }
        let queued = q.list.len() as u64;
        self.counters
            .workset_queued
            .fetch_add(queued, Ordering::Relaxed);
        self.counters
            .workset_stale
            .fetch_add(stale, Ordering::Relaxed);
        drop(q);
        self.bg.cv.notify_all();
        queued
    }

    /// A guest read missed chunk `i`: if it follows the chunk before it, queue the next
    /// [`READAHEAD_MIN`] chunks.
    fn readahead_on_miss(&self, i: usize) {
        if i == 0 || self.flags[i - 1].load(Ordering::Relaxed) & USED == 0 {
            return;
        }
        let mut q = self.bg.q.lock().expect("queue lock");
        if q.workers == 0 || q.stop || (q.ra_next > i && q.ra_next <= i + 1 + q.ra_window) {
            return;
        }
        q.ra_window = READAHEAD_MIN;
        q.ra_next = i + 1;
        self.queue_ahead(&mut q, i + 1 + READAHEAD_MIN);
    }

    /// The guest used chunk `i` that read-ahead brought: keep the window ahead of it,
    /// doubling it up to [`READAHEAD_MAX`].
    fn readahead_extend(&self, i: usize) {
        let mut q = self.bg.q.lock().expect("queue lock");
        if q.workers == 0 || q.stop {
            return;
        }
        q.ra_next = q.ra_next.max(i + 1);
        if q.ra_next - (i + 1) > q.ra_window / 2 {
            return;
        }
        q.ra_window = (q.ra_window * 2).clamp(READAHEAD_MIN, READAHEAD_MAX);
        let to = i + 1 + q.ra_window;
        self.queue_ahead(&mut q, to);
    }

    /// Queues places from `q.ra_next` up to `to` (never past the disk's end) that hold
    /// a chunk the guest has not read and the overlay does not cover.
    fn queue_ahead(&self, q: &mut Queue, to: usize) {
        let to = to.min(self.base.chunks.len());
        for p in q.ra_next..to {
            if self.base.chunks[p].is_some()
                && self.flags[p].load(Ordering::Relaxed) & (USED | PREFETCHED) == 0
                && self.mask(p) != self.full(p)
                && q.ahead.len() < 2 * READAHEAD_MAX
            {
                q.ahead.push_back(p);
            }
        }
        q.ra_next = q.ra_next.max(to);
        self.bg.cv.notify_all();
    }

    /// Runs one background job.
    fn background_job(&self, job: Job) {
        match job {
            Job::Ahead(p) => {
                if self.fetch_place_ahead(p, AHEAD).is_some_and(|n| n > 0) {
                    self.counters
                        .readahead_chunks
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Job::List(Entry::Disk { place, .. }) => {
                let p = place as usize;
                let len = self.base.chunk_len(p) as u64;
                if !self.take_budget(len) {
                    return;
                }
                match self.fetch_place_ahead(p, 0) {
                    Some(n) if n > 0 => {
                        self.counters
                            .prefetched_chunks
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => self.give_budget(len),
                    None => {
                        self.give_budget(len);
                        self.counters
                            .workset_missing
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Job::List(Entry::Stream { id }) => {
                if self.cache.contains(&id) {
                    self.counters.workset_cached.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match self.fetch_raw(&id, None) {
                    Ok(d) => {
                        if !self.take_budget(d.len() as u64) {
                            return;
                        }
                        self.counters
                            .prefetched_chunks
                            .fetch_add(1, Ordering::Relaxed);
                        self.streams_prefetched
                            .lock()
                            .expect("stream lock")
                            .insert(id);
                    }
                    Err(e) if e.is_missing() => {
                        self.counters
                            .workset_missing
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// Counts `len` bytes against the replay's share of the cache; false (and the rest
    /// of the list dropped) once it would pass half the cache's bound, so the replay
    /// never evicts what it brought.
    fn take_budget(&self, len: u64) -> bool {
        let mut q = self.bg.q.lock().expect("queue lock");
        if q.list_bytes + len > self.cache.max_bytes() / 2 {
            let dropped = q.list.len() as u64 + 1;
            q.list.clear();
            self.counters
                .workset_over_budget
                .fetch_add(dropped, Ordering::Relaxed);
            return false;
        }
        q.list_bytes += len;
        true
    }

    fn give_budget(&self, len: u64) {
        let mut q = self.bg.q.lock().expect("queue lock");
        q.list_bytes = q.list_bytes.saturating_sub(len);
    }

    /// Fetches the chunk at place `p` into the cache for the guest, marking it
    /// [`PREFETCHED`] and `flag`. `Some(0)`: nothing to fetch (zero, covered by the
    /// overlay, read by the guest already, or cached); `None`: the bank lacks it.
    fn fetch_place_ahead(&self, p: usize, flag: u8) -> Option<u64> {
        let Some(id) = self.base.chunks.get(p).copied().flatten() else {
            return Some(0);
        };
        if self.mask(p) == self.full(p) || self.flags[p].load(Ordering::Relaxed) & USED != 0 {
            return Some(0);
        }
        if self.cache.contains(&id) {
            if flag == 0 {
                self.counters.workset_cached.fetch_add(1, Ordering::Relaxed);
            }
            return Some(0);
        }
        match self.fetch_raw(&id, Some(p)) {
            Ok(d) if d.len() == self.base.chunk_len(p) => {
                self.flags[p].fetch_or(PREFETCHED | flag, Ordering::AcqRel);
                Some(d.len() as u64)
            }
            Ok(_) => Some(0),
            Err(e) if e.is_missing() => None,
            Err(_) => Some(0),
        }
    }

    /// Folds the journal into a new dirty map once its records pass `bytes` (and twice
    /// the map's size); [`DEFAULT_COMPACT_BYTES`] unless set.
    pub fn set_compact_bytes(&self, bytes: u64) {
        self.compact_bytes.store(bytes, Ordering::Relaxed);
    }

    /// True if this disk holds its session directory's lock.
    pub fn holds_lock(&self) -> bool {
        self.lock.is_some()
    }

    pub fn chunk_size(&self) -> u64 {
        self.base.chunk_size as u64
    }

    /// True if the overlay holds any block of chunk `i`.
    pub fn is_dirty(&self, i: usize) -> bool {
        self.mask(i) != 0
    }

    /// The blocks of chunk `i` the overlay holds.
    pub fn mask(&self, i: usize) -> u64 {
        self.dirty[i].load(Ordering::Acquire)
    }

    fn full(&self, i: usize) -> u64 {
        full_mask(self.base.chunk_len(i), self.block_size as u32)
    }

    /// Marks blocks of chunk `i` dirty and pending; their data must already be in the
    /// overlay. The caller holds the chunk's stripe lock.
    fn set_dirty(&self, i: usize, blocks: u64) {
        self.dirty[i].fetch_or(blocks, Ordering::AcqRel);
        self.changed[i].store(true, Ordering::Release);
        if self.pending[i].fetch_or(blocks, Ordering::AcqRel) == 0 {
            self.pending_chunks.lock().expect("pending lock").push(i);
        }
    }

    /// The blocks the overlay holds, as it is now (flushed or not; no checksums).
    pub fn dirty_map(&self) -> DirtyMap {
        let mut map = DirtyMap::clean(self.base.disk_size, self.base.chunk_size);
        for (m, d) in map.masks.iter_mut().zip(&self.dirty) {
            *m = d.load(Ordering::Acquire);
        }
        map
    }

    /// The durable state as of the last flush: what recovery would find (the blocks
    /// flushed, with their checksums).
    pub fn durable_map(&self) -> DirtyMap {
        let j = self.journal.lock().expect("flush lock");
        let mut map = DirtyMap::clean(self.base.disk_size, self.base.chunk_size);
        map.masks.copy_from_slice(&j.durable);
        map.sums = j.sums.clone();
        map.generation = j.generation;
        map
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

    /// A chunk of a stream the session needs (kernel, initrd, memory): from the cache,
    /// or fetched from the bank once (a wait counted). Recorded in the working set.
    pub fn fetch(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>, DeviceError> {
        if self.streams_used.lock().expect("stream lock").insert(*id) {
            self.recorder
                .lock()
                .expect("recorder lock")
                .note(Entry::Stream { id: *id });
            if self
                .streams_prefetched
                .lock()
                .expect("stream lock")
                .remove(id)
                && self.cache.contains(id)
            {
                self.counters.prefetch_hits.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(d) = self.cache.get(id) {
            return Ok(Arc::new(d));
        }
        self.waiting(|| self.fetch_missing(id, None))
    }

    /// [`Disk::fetch`] of the base chunk `id` for its place `i` in the disk: an I/O
    /// error if the chunk is not as long as the place (the version's index is wrong).
    fn fetch_at(&self, i: usize, id: &ChunkId) -> Result<Arc<Vec<u8>>, DeviceError> {
        match self.cache.get(id) {
            Some(d) => {
                self.check_len(i, id, d.len())?;
                Ok(Arc::new(d))
            }
            None => self.waiting(|| self.fetch_missing(id, Some(i))),
        }
    }

    /// An I/O error (reported once on stderr) if chunk `id`, `len` bytes long, does not
    /// fit place `i` of the base disk.
    fn check_len(&self, i: usize, id: &ChunkId, len: usize) -> Result<(), DeviceError> {
        let Some(w) = mbank_bank::WrongLength::disk(&self.base, i, *id, len) else {
            return Ok(());
        };
        if self.reported.lock().expect("report lock").insert(*id) {
            eprintln!(
                "mbank: {}@{}: version damaged: {w}; guest reads there fail with an I/O \
                 error. Run `mbank verify` on the bank",
                self.meta.machine,
                self.meta
                    .base
                    .as_deref()
                    .map_or("-", |b| &b[..b.len().min(12)]),
            );
        }
        Err(DeviceError::io(
            format!("chunk {i} of the disk"),
            std::io::Error::other(w.to_string()),
        ))
    }

    /// [`Disk::fetch`] of a chunk the cache was just asked for and lacked (asking it
    /// again would count a second miss); with `place`, for that place of the disk,
    /// checked against its length (and cached only if it fits).
    fn fetch_missing(
        &self,
        id: &ChunkId,
        place: Option<usize>,
    ) -> Result<Arc<Vec<u8>>, DeviceError> {
        let data = self
            .fetch_raw(id, place)
            .map_err(|f| self.guest_fetch_error(id, f))?;
        if let Some(i) = place {
            self.check_len(i, id, data.len())?;
        }
        Ok(data)
    }

    /// The device error of a fetch that failed for the guest; damage is reported on
    /// stderr once per chunk.
    fn guest_fetch_error(&self, id: &ChunkId, f: FetchError) -> DeviceError {
        let e = match f {
            FetchError::Shared(e) => return DeviceError::Unavailable(e),
            FetchError::Store(e) => e,
        };
        match e {
            StoreError::Corrupt { .. } | StoreError::Missing(_) => {
                if self.reported.lock().expect("report lock").insert(*id) {
                    eprintln!(
                        "mbank: {}@{}: a guest read needs chunk {id}, which the bank cannot \
                         give: {e}; the read fails with an I/O error. Run `mbank verify` on the \
                         bank to see what else is damaged",
                        self.meta.machine,
                        self.meta
                            .base
                            .as_deref()
                            .map_or("-", |b| &b[..b.len().min(12)]),
                    );
                }
                DeviceError::io(
                    format!("chunk {id} of the disk"),
                    std::io::Error::other(e.to_string()),
                )
            }
            other => DeviceError::Unavailable(other.to_string()),
        }
    }

    /// Fetches chunk `id` from the bank through the session's [`CachedStore`] (one
    /// fetch per chunk in flight), counts what this call read, and caches it (when
    /// `place` is given, only if it fits that place).
    fn fetch_raw(&self, id: &ChunkId, place: Option<usize>) -> Result<Arc<Vec<u8>>, FetchError> {
        let f = self.chunks.fetch_missing(id, |len| {
            place.is_none_or(|i| self.base.chunk_len(i) == len)
        })?;
        if f.from_bank {
            self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_fetched
                .fetch_add(f.data.len() as u64, Ordering::Relaxed);
        }
        Ok(f.data)
    }

    /// The station cache and the bank, as this session fetches from them.
    pub fn chunks(&self) -> &Arc<CachedStore> {
        &self.chunks
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

    /// Appends `n` bytes at `a` of chunk `i`'s base content to `buf`. With `inline`,
    /// returns `Ok(false)` instead of doing anything slow (a fetch, a first
    /// verification), leaving `buf` as it was.
    fn base_append(
        &self,
        i: usize,
        a: usize,
        n: usize,
        buf: &mut Vec<u8>,
        inline: bool,
    ) -> Result<bool, DeviceError> {
        let Some(id) = &self.base.chunks[i] else {
            buf.resize(buf.len() + n, 0);
            return Ok(true);
        };
        self.first_use(i, id);
        let len = self.base.chunk_len(i);
        if self.cache.read_append(id, a, n, len, buf, !inline) {
            return Ok(true);
        }
        if inline {
            return Ok(false);
        }
        let data = self.waiting(|| {
            self.readahead_on_miss(i);
            self.fetch_missing(id, Some(i))
        })?;
        buf.extend_from_slice(&data[a..a + n]);
        Ok(true)
    }

    fn overlay_append(&self, buf: &mut Vec<u8>, off: u64, n: usize) -> Result<(), DeviceError> {
        append_pread(buf, &self.overlay, off, n).map_err(|e| io("read the session overlay", e))
    }

    /// Appends bytes `[a, a+n)` of chunk `i` to `buf`: each block from the overlay if
    /// the session wrote it, else from the base. `Ok(false)` as for `base_append`.
    fn chunk_append(
        &self,
        i: usize,
        a: usize,
        n: usize,
        buf: &mut Vec<u8>,
        inline: bool,
    ) -> Result<bool, DeviceError> {
        let chunk_off = i as u64 * self.chunk_size();
        let mask = self.mask(i);
        if mask == 0 {
            return self.base_append(i, a, n, buf, inline);
        }
        if mask == self.full(i) {
            self.overlay_append(buf, chunk_off + a as u64, n)?;
            return Ok(true);
        }
        // Partly dirty: the range from the base (one cache lookup), then the runs of
        // blocks the overlay holds over it.
        let bs = self.block_size;
        let touched = block_range(a / bs, (a + n - 1) / bs);
        if mask & touched == touched {
            self.overlay_append(buf, chunk_off + a as u64, n)?;
            return Ok(true);
        }
        let start = buf.len();
        if !self.base_append(i, a, n, buf, inline)? {
            return Ok(false);
        }
        let (end, mut pos) = (a + n, a);
        while pos < end {
            let dirty = mask & (1 << (pos / bs)) != 0;
            let mut run_end = (pos / bs + 1) * bs;
            while run_end < end && (mask & (1 << (run_end / bs)) != 0) == dirty {
                run_end += bs;
            }
            let run_end = run_end.min(end);
            if dirty {
                let dst = &mut buf[start + pos - a..start + run_end - a];
                if let Err(e) = self.overlay.read_exact_at(dst, chunk_off + pos as u64) {
                    buf.truncate(start);
                    return Err(io("read the session overlay", e));
                }
            }
            pos = run_end;
        }
        Ok(true)
    }

    /// Reads `len` bytes at `off`. With `inline`, `Ok(None)` if that needs anything
    /// slower than a `pread` or two (a fetch from the bank, a first verification of a
    /// cached chunk), so the caller can run it where blocking is fine.
    pub fn read_with(
        &self,
        off: u64,
        len: u32,
        inline: bool,
    ) -> Result<Option<Vec<u8>>, DeviceError> {
        let mut out = Vec::with_capacity(len as usize);
        for (i, a, n) in self.pieces(off, len as u64) {
            if !self.chunk_append(i, a, n, &mut out, inline)? {
                return Ok(None);
            }
        }
        debug_assert_eq!(out.len(), len as usize);
        Ok(Some(out))
    }

    pub fn read_sync(&self, off: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        self.demand.fetch_add(1, Ordering::AcqRel);
        let r = self.read_with(off, len, false);
        self.demand.fetch_sub(1, Ordering::AcqRel);
        Ok(r?.expect("a read that may block always completes"))
    }

    /// The blocks a write of `[a, a+n)` into chunk `i` touches, and whether it must
    /// first merge its first / last block with what is there (the write covers only
    /// part of a block the overlay does not hold yet).
    fn write_plan(&self, i: usize, a: usize, n: usize) -> (usize, usize, bool, bool) {
        let (bs, clen, mask) = (self.block_size, self.base.chunk_len(i), self.mask(i));
        let (first, last) = (a / bs, (a + n - 1) / bs);
        let head = !a.is_multiple_of(bs) && mask & (1 << first) == 0;
        let tail_end = ((last + 1) * bs).min(clen);
        let tail = a + n < tail_end && mask & (1 << last) == 0;
        (first, last, head, tail)
    }

    /// True if a write of `[off, off+len)` needs no merge with a base chunk that is
    /// not zero, so it is a `pwrite` or two and cheap enough to run inline.
    fn write_is_fast(&self, off: u64, len: u64) -> bool {
        self.pieces(off, len).all(|(i, a, n)| {
            let (first, last, head, tail) = self.write_plan(i, a, n);
            self.sealed[i].load(Ordering::Acquire) & block_range(first, last) == 0
                && (!(head || tail) || self.base.chunks[i].is_none())
        })
    }

    /// Writes `data` (or zeros, for `None`) at `off`. A block a flush has taken the
    /// checksum of is rewritten only once an intent record naming it is synced.
    pub fn write_sync(&self, off: u64, data: Option<&[u8]>, len: u64) -> Result<(), DeviceError> {
        let mut at = 0usize;
        for (i, a, n) in self.pieces(off, len) {
            let touched = block_range(a / self.block_size, (a + n - 1) / self.block_size);
            // The intent is written without the stripe lock (a flush takes stripe
            // locks under the flush lock); a flush may seal the blocks again before
            // the lock is ours, so look again under it.
            let _g = loop {
                if self.sealed[i].load(Ordering::Acquire) & touched != 0 {
                    self.unseal(i, touched)?;
                }
                let g = self.stripes[i % STRIPES].lock().expect("stripe lock");
                if self.sealed[i].load(Ordering::Acquire) & touched == 0 {
                    break g;
                }
            };
            let chunk_off = i as u64 * self.chunk_size();
            let clen = self.base.chunk_len(i);
            let piece = data.map(|d| &d[at..at + n]);
            let write = |buf: &[u8], at: usize| {
                self.overlay
                    .write_all_at(buf, chunk_off + at as u64)
                    .map_err(|e| io("write the session overlay", e))
            };
            let zero = |at: usize, n: usize| {
                punch_hole(&self.overlay, chunk_off + at as u64, n as u64)
                    .map_err(|e| io("clear a range in the session overlay", e))
            };
            let (first, last, head, tail) = self.write_plan(i, a, n);
            if !head && !tail {
                match piece {
                    Some(p) => write(p, a)?,
                    None => zero(a, n)?,
                }
            } else {
                // Part of a block the overlay lacks: merge it with the base first.
                let bs = self.block_size;
                let start = if head { first * bs } else { a };
                let end = if tail {
                    ((last + 1) * bs).min(clen)
                } else {
                    a + n
                };
                let base = match &self.base.chunks[i] {
                    Some(id) => Some(self.fetch_at(i, id)?),
                    None => None,
                };
                let from_base = |buf: &mut Vec<u8>, s: usize, e: usize| match &base {
                    Some(b) => buf.extend_from_slice(&b[s..e]),
                    None => buf.resize(buf.len() + e - s, 0),
                };
                let mut buf = Vec::with_capacity(end - start);
                if head {
                    from_base(&mut buf, start, a);
                }
                match piece {
                    Some(p) => buf.extend_from_slice(p),
                    None => buf.resize(buf.len() + n, 0),
                }
                if tail {
                    from_base(&mut buf, a + n, end);
                }
                write(&buf, start)?;
            }
            self.set_dirty(i, block_range(first, last));
            at += n;
        }
        Ok(())
    }

    /// Syncs an intent record for the sealed blocks of `blocks` in chunk `i`, and
    /// unseals them: from here on recovery does not hold them to their checksums.
    fn unseal(&self, i: usize, blocks: u64) -> Result<(), DeviceError> {
        let mut j = self.journal.lock().expect("flush lock");
        if j.redo {
            self.compact(&mut j)?;
        }
        let mask = self.sealed[i].load(Ordering::Acquire) & blocks;
        if mask == 0 {
            return Ok(());
        }
        let rec = encode_record(
            j.generation,
            &Record::Intent {
                chunk: i as u64,
                mask,
            },
        );
        self.append(&mut j, &rec)?;
        self.counters.intents.fetch_add(1, Ordering::Relaxed);
        self.sealed[i].fetch_and(!mask, Ordering::AcqRel);
        for b in (0..64).filter(|b| mask & (1 << b) != 0) {
            j.sums.remove(&(i as u64 * 64 + b));
        }
        Ok(())
    }

    /// Appends `bytes` to the journal and syncs it. The bytes overwrite zeros the file
    /// already holds (it is extended, synced, ahead of need), so the sync changes no
    /// metadata.
    fn append(&self, j: &mut Journal, bytes: &[u8]) -> Result<(), DeviceError> {
        let need = j.end + bytes.len() as u64;
        if need > j.len {
            let grow = (need - j.len).max(JOURNAL_PREALLOC);
            j.file
                .write_all_at(&vec![0u8; grow as usize], j.len)
                .and_then(|()| j.file.sync_data())
                .map_err(|e| io("extend the session journal", e))?;
            j.len += grow;
            self.counters
                .journal_bytes
                .fetch_add(grow, Ordering::Relaxed);
        }
        j.file
            .write_all_at(bytes, j.end)
            .and_then(|()| j.file.sync_data())
            .map_err(|e| io("append to the session journal", e))?;
        j.end = need;
        self.counters
            .journal_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every write so far durable (DESIGN invariant 4): the checksums of the
    /// blocks written since the last flush are taken (each chunk's under its stripe
    /// lock, sealing those blocks), the overlay is synced, then their records and a
    /// flush record are appended to the journal and synced. A flush costs the data it
    /// makes durable, not the size of the dirty map; now and then the journal is
    /// folded into a new map ([`Disk::set_compact_bytes`]).
    ///
    /// Flushes that queue behind one in progress share the next one (group commit):
    /// a flush whose writes another flush took in, made durable after it was asked
    /// for, returns at once (counted in `flushes_shared`).
    pub fn flush_sync(&self) -> Result<(), DeviceError> {
        // Any snapshot taken from now on holds every write completed before this call.
        let need = self.flush_snapshots.load(Ordering::Acquire) + 1;
        self.flush_covering(need)
    }

    /// [`Disk::flush_sync`] for a flush asked for before snapshot `need` was taken.
    fn flush_covering(&self, need: u64) -> Result<(), DeviceError> {
        let mut j = self.journal.lock().expect("flush lock");
        if j.durable_through >= need {
            self.counters.flushes_shared.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if j.redo {
            self.compact(&mut j)?;
        }
        let snapshot = self.flush_snapshots.fetch_add(1, Ordering::AcqRel) + 1;
        let chunks = std::mem::take(&mut *self.pending_chunks.lock().expect("pending lock"));
        let mut taken: Vec<(usize, u64)> = Vec::new();
        let mut sums: Vec<(u64, BlockSum)> = Vec::new();
        let mut buf = Vec::new();
        let mut failed = None;
        for &i in &chunks {
            let _g = self.stripes[i % STRIPES].lock().expect("stripe lock");
            let p = self.pending[i].swap(0, Ordering::AcqRel);
            if p == 0 {
                continue;
            }
            taken.push((i, p));
            if failed.is_some() {
                continue;
            }
            // The pending blocks' span of the chunk, in one read.
            let bs = self.block_size;
            let (first, last) = (p.trailing_zeros() as usize, 63 - p.leading_zeros() as usize);
            let clen = self.base.chunk_len(i);
            let (s, e) = (first * bs, ((last + 1) * bs).min(clen));
            buf.clear();
            let off = i as u64 * self.chunk_size();
            if let Err(e) = append_pread(&mut buf, &self.overlay, off + s as u64, e - s) {
                failed = Some(io("read the session overlay to checksum it", e));
                continue;
            }
            for b in (first..=last).filter(|b| p & (1 << b) != 0) {
                let r = (b * bs - s)..(((b + 1) * bs).min(clen) - s);
                sums.push((i as u64 * 64 + b as u64, block_sum(&buf[r])));
            }
            self.sealed[i].fetch_or(p, Ordering::AcqRel);
        }
        let done = match failed {
            Some(e) => Err(e),
            None => self
                .overlay
                .sync_data()
                .map_err(|e| io("sync the session overlay", e))
                .and_then(|()| {
                    if sums.is_empty() {
                        return Ok(());
                    }
                    let g = j.generation;
                    let mut bytes = Vec::with_capacity((sums.len() + 1) * JOURNAL_RECORD);
                    for &(block, sum) in &sums {
                        bytes.extend_from_slice(&encode_record(g, &Record::Sum { block, sum }));
                    }
                    j.seq += 1;
                    bytes.extend_from_slice(&encode_record(g, &Record::Flush { seq: j.seq }));
                    self.append(&mut j, &bytes)
                }),
        };
        if let Err(e) = done {
            // Not durable: the next flush takes these blocks again.
            for (i, p) in taken {
                self.set_dirty(i, p);
            }
            return Err(e);
        }
        for &(block, sum) in &sums {
            j.durable[(block / 64) as usize] |= 1 << (block % 64);
            j.sums.insert(block, sum);
        }
        j.durable_through = snapshot;
        self.maybe_compact(&mut j)
    }

    /// Folds the journal into a new dirty map when it has grown past the threshold:
    /// the map of the next generation (written atomically), then an empty journal of
    /// that generation (written atomically). Cut between the two, the map is newer
    /// than the journal, which recovery then skips: the map holds all it said.
    fn maybe_compact(&self, j: &mut Journal) -> Result<(), DeviceError> {
        let records = j.end - JOURNAL_HEADER as u64;
        let map_size = (j.sums.len() * 24 + j.durable.len() / 8) as u64;
        if records <= self.compact_bytes.load(Ordering::Relaxed).max(2 * map_size) {
            return Ok(());
        }
        self.compact(j)
    }

    /// Writes the durable state as the map of the next generation, then an empty
    /// journal of that generation. If either fails, nothing more is appended until a
    /// later call succeeds (the new map may be there already and would hide it).
    fn compact(&self, j: &mut Journal) -> Result<(), DeviceError> {
        j.redo = true;
        let mut map = DirtyMap::clean(self.base.disk_size, self.base.chunk_size);
        map.masks.copy_from_slice(&j.durable);
        map.sums = j.sums.clone();
        map.generation = j.generation + 1;
        let bytes = encode_dirty(&map);
        let fail = |what: &str, e: crate::StationError| {
            DeviceError::io(what.to_string(), std::io::Error::other(e.to_string()))
        };
        crate::session::write_atomic(&self.dir.dirty_path(), &bytes)
            .map_err(|e| fail("write the dirty map", e))?;
        let file = self
            .dir
            .create_journal(map.generation, map.block_size)
            .map_err(|e| fail("start a new session journal", e))?;
        j.len = file.metadata().map_or(0, |m| m.len());
        j.file = file;
        j.generation = map.generation;
        j.end = JOURNAL_HEADER as u64;
        j.redo = false;
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        self.counters
            .journal_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn cache_sync(&self, off: u64, len: u32) -> Result<(), DeviceError> {
        for (i, _, _) in self.pieces(off, len as u64) {
            if self.mask(i) != self.full(i)
                && let Some(id) = &self.base.chunks[i]
            {
                self.fetch_at(i, id)?;
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

    /// Fetches every non-zero chunk not whole in the overlay that the cache lacks, one
    /// at a time, yielding to reads the guest waits on. Stops when `stop` is set.
    pub fn prefetch(&self, stop: &AtomicBool) {
        for (i, c) in self.base.chunks.iter().enumerate() {
            let Some(id) = c else { continue };
            while self.demand.load(Ordering::Acquire) > 0 && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if self.mask(i) == self.full(i) || self.cache.contains(id) {
                continue;
            }
            let _ = self.fetch_at(i, id);
        }
    }
}

/// Chunk `i` as a check-in stores it: the blocks `map` names from the overlay, the
/// rest from the base chunk, got from `base_chunk` (which must return data verified
/// against its id just now, not trusted from earlier; zeros for a zero chunk). What
/// the overlay holds outside the map (say, a write never flushed before a crash) is
/// not part of the session's durable state and is not read. Nothing is written: a
/// check-in needs no space on the station.
pub fn assemble_chunk(
    overlay: &File,
    overlay_path: &std::path::Path,
    base: &DiskIndex,
    map: &DirtyMap,
    i: usize,
    base_chunk: &dyn Fn(&ChunkId) -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, StationError> {
    let cs = base.chunk_size as u64;
    let bs = map.block_size as usize;
    let len = base.chunk_len(i);
    let (mask, full) = (map.masks[i], map.full_mask(i));
    let read = |buf: &mut [u8], at: usize| {
        overlay
            .read_exact_at(buf, i as u64 * cs + at as u64)
            .map_err(|e| StationError::Io {
                what: format!(
                    "read chunk {i} (bytes {}..{}) from the session overlay {}",
                    i as u64 * cs + at as u64,
                    i as u64 * cs + (at + buf.len()) as u64,
                    overlay_path.display()
                ),
                source: e,
            })
    };
    let mut data = if mask == full {
        vec![0u8; len]
    } else {
        match &base.chunks[i] {
            Some(id) => {
                let d = base_chunk(id).map_err(|e| StationError::Io {
                    what: format!("fetch base chunk {id} to merge with the writes to chunk {i}"),
                    source: std::io::Error::other(e),
                })?;
                if d.len() != len {
                    return Err(StationError::Io {
                        what: format!("merge chunk {i} with its base chunk {id}"),
                        source: std::io::Error::other(format!(
                            "the base chunk is {} bytes, its place in the disk {len}",
                            d.len()
                        )),
                    });
                }
                d
            }
            None => vec![0u8; len],
        }
    };
    if mask == full {
        read(&mut data, 0)?;
        return Ok(data);
    }
    // Runs of blocks the overlay holds, each read in one go.
    let blocks = len.div_ceil(bs);
    let mut j = 0;
    while j < blocks {
        if mask & (1 << j) == 0 {
            j += 1;
            continue;
        }
        let first = j;
        while j < blocks && mask & (1 << j) != 0 {
            j += 1;
        }
        let (s, e) = (first * bs, (j * bs).min(len));
        read(&mut data[s..e], s)?;
    }
    Ok(data)
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
            if let Some(data) = d.read_with(offset, len, true)? {
                return Ok(data);
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
            if !fua && d.write_is_fast(offset, data.len() as u64) {
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

/// A background fetcher: takes read-ahead first, then the working set, until stopped or
/// the disk is gone.
fn background_worker(bg: &Background, disk: &Weak<Disk>) {
    loop {
        let job = {
            let mut q = bg.q.lock().expect("queue lock");
            loop {
                if q.stop {
                    return;
                }
                if let Some(p) = q.ahead.pop_front() {
                    q.busy += 1;
                    break Job::Ahead(p);
                }
                if let Some(e) = q.list.pop_front() {
                    q.busy += 1;
                    break Job::List(e);
                }
                if q.busy == 0 {
                    bg.idle.notify_all();
                }
                q = bg.cv.wait(q).expect("queue lock");
            }
        };
        let Some(d) = disk.upgrade() else { return };
        d.background_job(job);
        drop(d);
        let mut q = bg.q.lock().expect("queue lock");
        q.busy -= 1;
        if q.busy == 0 && q.ahead.is_empty() && q.list.is_empty() {
            bg.idle.notify_all();
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.stop_background();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Station;
    use crate::session::encode_dirty_v1;
    use mbank_bank::{Bank, ImportOptions, NoProgress};
    use mbank_core::{MachineName, MachineRef};
    use mbank_store::LocalStore;

    const CS: usize = 65536;
    /// Eight 64 KiB chunks (chunk 3 all zero) and a last chunk of 5120 bytes.
    const DISK: usize = 8 * CS + 5120;

    struct Fixture {
        dir: tempfile::TempDir,
        bank: Bank,
        station: Station,
        /// What the disk should read as.
        model: Vec<u8>,
        /// The disk as imported.
        base: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut bank = Bank::init(&dir.path().join("bank")).unwrap();
        let mut base: Vec<u8> = (0..DISK)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8 | 1)
            .collect();
        base[3 * CS..4 * CS].fill(0);
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, &base).unwrap();
        let m: MachineName = "alice/dev".parse().unwrap();
        bank.import(&m, &img, &ImportOptions::default(), &NoProgress)
            .unwrap();
        let station = Station::open(&dir.path().join("cache"), 64 << 20).unwrap();
        Fixture {
            dir,
            bank,
            station,
            model: base.clone(),
            base,
        }
    }

    impl Fixture {
        fn check_out(&mut self) -> Arc<Disk> {
            let store: Arc<dyn ChunkStore> =
                Arc::new(LocalStore::open(self.bank.root().unwrap()).unwrap());
            let r: MachineRef = "alice/dev".parse().unwrap();
            self.station
                .check_out(&mut self.bank, &r, false, store)
                .unwrap()
        }

        fn write(&mut self, disk: &Disk, off: usize, data: Option<&[u8]>, len: usize) {
            disk.write_sync(off as u64, data, len as u64).unwrap();
            match data {
                Some(d) => self.model[off..off + len].copy_from_slice(d),
                None => self.model[off..off + len].fill(0),
            }
        }

        /// The head version's disk, exported by the bank.
        fn head(&self) -> Vec<u8> {
            let out = self.dir.path().join("head.raw");
            let r: MachineRef = "alice/dev".parse().unwrap();
            self.bank.export(&r, &out, 2, &NoProgress).unwrap();
            std::fs::read(out).unwrap()
        }
    }

    /// A bank store that logs every read and makes reads of one chunk slow.
    struct SlowStore {
        inner: LocalStore,
        slow: Mutex<Option<ChunkId>>,
        log: Mutex<Vec<(ChunkId, bool)>>,
        demand_reading: AtomicBool,
    }

    impl ChunkStore for SlowStore {
        fn put(&self, c: &mbank_core::chunk::EncodedChunk) -> Result<u64, StoreError> {
            self.inner.put(c)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
        fn touch(&self, id: &ChunkId) -> Result<bool, StoreError> {
            self.inner.touch(id)
        }
        fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
            let slow = *self.slow.lock().unwrap() == Some(*id);
            // Which reads start while the slow (demand) read is in flight.
            let during = self.demand_reading.load(Ordering::SeqCst);
            self.log.lock().unwrap().push((*id, during));
            if slow {
                self.demand_reading.store(true, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(300));
                self.demand_reading.store(false, Ordering::SeqCst);
            } else {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            self.inner.get_raw(id)
        }
        fn quarantine(&self, id: &ChunkId) -> Result<Option<std::path::PathBuf>, StoreError> {
            self.inner.quarantine(id)
        }
        fn sweep(
            &self,
            cutoff: std::time::SystemTime,
            keep: &(dyn Fn(&ChunkId) -> bool + Sync),
        ) -> Result<mbank_store::SweepStats, StoreError> {
            self.inner.sweep(cutoff, keep)
        }
        fn stats(&self) -> Result<mbank_store::StoreStats, StoreError> {
            self.inner.stats()
        }
    }

    /// Reads the guest waits on go before background work: while a demand read fetches,
    /// the prefetcher starts no fetch of its own; without demand it fetches everything.
    #[test]
    fn prefetch_yields_to_reads_the_guest_waits_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut bank = Bank::init(&dir.path().join("bank")).unwrap();
        let n = 64;
        let base: Vec<u8> = (0..n * CS).map(|i| (i / 7 % 251) as u8 | 1).collect();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, &base).unwrap();
        let m: MachineName = "alice/dev".parse().unwrap();
        bank.import(&m, &img, &ImportOptions::default(), &NoProgress)
            .unwrap();
        let station = Station::open(&dir.path().join("cache"), 64 << 20).unwrap();
        let store = Arc::new(SlowStore {
            inner: LocalStore::open(bank.root().unwrap()).unwrap(),
            slow: Mutex::new(None),
            log: Mutex::new(Vec::new()),
            demand_reading: AtomicBool::new(false),
        });
        let r: MachineRef = "alice/dev".parse().unwrap();
        let disk = station
            .check_out(&mut bank, &r, false, store.clone())
            .unwrap();
        // The guest will want the last chunk, which the prefetcher reaches last.
        let last = disk.base.chunks[n - 1].unwrap();
        *store.slow.lock().unwrap() = Some(last);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let d = disk.clone();
            let stop = &stop;
            s.spawn(move || d.prefetch(stop));
            // Let the prefetcher get going, then read as the guest would.
            while store.log.lock().unwrap().len() < 3 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let got = disk.read_sync(((n - 1) * CS) as u64, 4096).unwrap();
            assert_eq!(got, base[(n - 1) * CS..(n - 1) * CS + 4096]);
        });
        let log = store.log.lock().unwrap().clone();
        let during = log.iter().filter(|(_, d)| *d).count();
        // At most the one fetch the prefetcher had already decided on before the demand
        // read began may start; every other waits (60 would fit in the window otherwise).
        assert!(
            during <= 1,
            "{during} prefetch reads started during a demand read"
        );
        // And the prefetcher went on to fetch the whole disk once, the demanded chunk
        // only by the demand read.
        let ids: std::collections::HashSet<ChunkId> = log.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), n, "every chunk fetched");
        assert_eq!(log.len(), n, "no chunk fetched twice: {log:?}");
        drop(disk);
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    /// The session is abandoned as a crash leaves it: its process gone.
    fn crash(disk: Arc<Disk>) {
        let path = disk.dir.meta_path();
        let mut meta = disk.dir.read_meta().unwrap();
        meta.pid = u32::MAX - 1; // a process that does not exist
        std::fs::write(path, serde_json::to_vec(&meta).unwrap()).unwrap();
        drop(disk);
    }

    /// A checkpoint holds what was flushed, not what was written since (the overlay
    /// moves on while it is taken); none is made without a new flush; the next one
    /// derives from it; a flipped bit in a flushed block is refused.
    #[test]
    fn a_checkpoint_holds_the_flushed_state_only() {
        use crate::checkpoint::checkpoint;
        let mut f = fixture();
        let disk = f.check_out();
        let opts = ImportOptions::default();
        let a = vec![7u8; 6000];
        f.write(&disk, 2 * CS + 100, Some(&a), a.len());
        f.write(&disk, CS, Some(&[4u8; 8192]), 8192);
        disk.flush_sync().unwrap();
        let flushed = f.model.clone();
        // Written, not flushed: not part of the checkpoint.
        f.write(&disk, 5 * CS, Some(&vec![9u8; CS]), CS);
        f.write(&disk, 2 * CS + 20000, Some(&[3u8; 10]), 10);
        let r = checkpoint(&mut f.bank, &disk, "test", 0, &opts)
            .unwrap()
            .expect("a checkpoint");
        assert!(r.head_moved);
        assert_eq!(r.chunks, 2);
        assert!(
            f.head() == flushed,
            "the checkpoint holds the flushed writes only"
        );
        assert!(
            checkpoint(&mut f.bank, &disk, "test", r.flush_seq, &opts)
                .unwrap()
                .is_none(),
            "no flush since: no checkpoint"
        );
        disk.flush_sync().unwrap();
        let r2 = checkpoint(&mut f.bank, &disk, "test", r.flush_seq, &opts)
            .unwrap()
            .expect("a second checkpoint");
        assert!(
            f.head() == f.model,
            "the second checkpoint holds every write"
        );
        assert_eq!(r2.chunks, 2, "chunk 1 did not change: it is not read again");
        let m: MachineName = "alice/dev".parse().unwrap();
        let v2 = f
            .bank
            .resolve(&MachineRef {
                machine: m,
                version: Some(r2.version.clone()),
            })
            .unwrap();
        assert_eq!(v2.parent.map(|p| p.to_hex()), Some(r.version.clone()));
        let tags = &f.bank.log(&v2.machine).unwrap();
        assert!(
            tags.iter()
                .filter(|v| v.tags.iter().any(|t| t == crate::checkpoint::TAG))
                .count()
                == 2
        );
        // A flushed block that no longer holds what was flushed: nothing is stored.
        f.write(&disk, 7 * CS, Some(&[1u8; 4096]), 4096);
        disk.flush_sync().unwrap();
        disk.overlay()
            .write_all_at(&[0x55], (7 * CS + 200) as u64)
            .unwrap();
        match checkpoint(&mut f.bank, &disk, "test", r2.flush_seq, &opts) {
            Err(StationError::OverlayDamaged { blocks, .. }) => {
                assert_eq!(blocks, vec![7 * 64]);
            }
            other => panic!("a damaged block must be refused: {other:?}"),
        }
        let head = f.bank.catalog().machine(&v2.machine).unwrap().unwrap().head;
        assert_eq!(head.map(|h| h.to_hex()), Some(r2.version), "nothing stored");
    }

    #[test]
    fn block_writes_cost_only_their_blocks_and_read_back_merged() {
        let mut f = fixture();
        let disk = f.check_out();
        // 4 KiB, block-aligned, into a clean chunk: no merge, only that block.
        f.write(&disk, CS + 8192, Some(&pattern(4096, 1)), 4096);
        assert_eq!(disk.mask(1), 0b100);
        let overlay = std::fs::read(disk.dir.overlay_path()).unwrap();
        assert_eq!(
            &overlay[CS + 8192..CS + 12288],
            &f.model[CS + 8192..CS + 12288]
        );
        assert!(
            overlay[..CS + 8192]
                .iter()
                .chain(&overlay[CS + 12288..])
                .all(|&b| b == 0),
            "nothing but the written block reached the overlay"
        );
        // Unaligned, inside one clean block: that block is merged with the base.
        f.write(&disk, 2 * CS + 5000, Some(&pattern(100, 2)), 100);
        assert_eq!(disk.mask(2), 0b10);
        // Across a chunk boundary, both ends unaligned.
        f.write(&disk, 5 * CS - 6000, Some(&pattern(12000, 3)), 12000);
        assert_eq!(disk.mask(4), 0b11 << 14);
        assert_eq!(disk.mask(5), 0b11);
        // Into the zero chunk, and into the short last chunk's partial last block.
        f.write(&disk, 3 * CS + 1, Some(&pattern(10, 4)), 10);
        assert_eq!(disk.mask(3), 0b1);
        f.write(&disk, 8 * CS + 4500, Some(&pattern(100, 5)), 100);
        assert_eq!(disk.mask(8), 0b10);
        // Zeros over one block; a whole chunk; a second write into a dirty block.
        f.write(&disk, 6 * CS + 4096, None, 4096);
        assert_eq!(disk.mask(6), 0b10);
        f.write(&disk, 7 * CS, Some(&pattern(CS, 6)), CS);
        assert_eq!(disk.mask(7), 0xffff);
        f.write(&disk, CS + 9000, Some(&pattern(50, 7)), 50);
        assert_eq!(disk.mask(1), 0b100);
        assert_eq!(disk.mask(0), 0);
        assert_eq!(disk.dirty_chunks(), [1, 2, 3, 4, 5, 6, 7, 8]);

        assert_eq!(disk.read_sync(0, DISK as u32).unwrap(), f.model);
        for (off, len) in [(CS + 8000, 5000), (5 * CS - 7000, 9000), (8 * CS, 5000)] {
            let got = disk.read_sync(off as u64, len as u32).unwrap();
            assert_eq!(got, &f.model[off..off + len], "read at {off}");
        }
        // The zero chunk now holds data.
        let st = disk.block_status_sync(3 * CS as u64, CS as u32);
        assert_eq!(st, [Extent::data(CS as u32)]);

        // Check-in stores each written chunk whole: merged with its base.
        let r = f
            .station
            .check_in(&mut f.bank, &disk, &ImportOptions::default(), &NoProgress)
            .unwrap();
        assert_eq!(r.chunks_written, 8);
        assert_eq!(f.head(), f.model);
    }

    /// Group commit: a flush asked for before a snapshot that later became durable
    /// returns without syncing again; one asked for after it syncs its own writes.
    #[test]
    fn a_flush_covered_by_a_later_snapshot_is_shared_and_its_writes_survive() {
        let mut f = fixture();
        let disk = f.check_out();
        f.write(&disk, CS, Some(&pattern(4096, 1)), 4096);
        // Two flushes asked for at the same time (both before snapshot 1): the first
        // takes the write in; the second finds it durable.
        disk.flush_covering(1).unwrap();
        let journal = std::fs::metadata(disk.dir.journal_path()).unwrap().len();
        let seq = disk.journal.lock().unwrap().seq;
        disk.flush_covering(1).unwrap();
        assert_eq!(disk.counters.flushes_shared.load(Ordering::Relaxed), 1);
        assert_eq!(
            disk.journal.lock().unwrap().seq,
            seq,
            "no second flush record"
        );
        assert_eq!(
            std::fs::metadata(disk.dir.journal_path()).unwrap().len(),
            journal
        );
        // A write after that, and a flush asked for after snapshot 1: its own.
        f.write(&disk, 2 * CS, Some(&pattern(4096, 2)), 4096);
        disk.flush_sync().unwrap();
        assert_eq!(disk.counters.flushes_shared.load(Ordering::Relaxed), 1);
        assert_eq!(disk.journal.lock().unwrap().seq, seq + 1);
        let flushed = f.model.clone();
        crash(disk);
        f.station
            .recover(&mut f.bank, &ImportOptions::default())
            .unwrap();
        assert_eq!(f.head(), flushed, "both flushed writes");
    }

    #[test]
    fn flushed_block_writes_survive_a_crash_and_unflushed_ones_do_not_leak() {
        let mut f = fixture();
        let disk = f.check_out();
        f.write(&disk, CS + 8192, Some(&pattern(4096, 1)), 4096);
        f.write(&disk, 2 * CS + 100, Some(&pattern(300, 2)), 300);
        f.write(&disk, 3 * CS + 4096, Some(&pattern(8192, 3)), 8192);
        f.write(&disk, 4 * CS, Some(&pattern(CS, 4)), CS);
        disk.flush_sync().unwrap();
        let flushed = f.model.clone();
        let map = disk
            .dir
            .read_dirty(DISK as u64, CS as u32)
            .expect("the durable map reads back");
        assert_eq!(map, disk.durable_map());
        assert_eq!(map.masks, disk.dirty_map().masks);
        assert_eq!(map.masks[1..5], [0b100, 0b1, 0b110, 0xffff]);
        assert_eq!(
            map.sums.len(),
            1 + 1 + 2 + 16,
            "a checksum per flushed block"
        );
        let bytes = std::fs::read(disk.dir.dirty_path()).unwrap();
        assert_eq!(bytes[4], 3, "format 3");

        // Written, never flushed: into a clean block of a partly dirty chunk, and into
        // a clean chunk. The overlay holds them, the durable map does not.
        f.write(&disk, CS + 5 * 4096, Some(&pattern(4096, 9)), 4096);
        f.write(&disk, 6 * CS, Some(&pattern(4096, 9)), 4096);
        crash(disk);

        let reports = f
            .station
            .recover(&mut f.bank, &ImportOptions::default())
            .unwrap()
            .recovered;
        assert_eq!(reports.len(), 1);
        assert!(reports[0].recovered);
        assert_eq!(reports[0].chunks_written, 4);
        let head = f.head();
        assert_eq!(head, flushed, "every flushed write, merged with the base");
        assert_eq!(
            head[CS + 5 * 4096..CS + 6 * 4096],
            f.base[CS + 5 * 4096..CS + 6 * 4096]
        );
    }

    #[test]
    fn a_session_left_by_an_older_mbank_is_recovered() {
        let mut f = fixture();
        let disk = f.check_out();
        // What an older mbank left: chunk 2 whole in the overlay, a format 1 map.
        let new = pattern(CS, 8);
        disk.overlay().write_all_at(&new, 2 * CS as u64).unwrap();
        f.model[2 * CS..3 * CS].copy_from_slice(&new);
        std::fs::write(disk.dir.dirty_path(), encode_dirty_v1(&[0b100], 9)).unwrap();
        crash(disk);
        let reports = f
            .station
            .recover(&mut f.bank, &ImportOptions::default())
            .unwrap()
            .recovered;
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].chunks_written, 1);
        assert_eq!(f.head(), f.model);
    }

    #[test]
    fn reads_without_blocking_need_a_verified_cache_copy() {
        let mut f = fixture();
        let disk = f.check_out();
        // Nothing is cached yet: an inline read declines, a blocking one fetches.
        assert!(disk.read_with(0, 4096, true).unwrap().is_none());
        assert_eq!(disk.read_sync(0, 4096).unwrap(), f.base[..4096]);
        let inline = disk.read_with(100, 8000, true).unwrap();
        assert_eq!(inline.as_deref(), Some(&f.base[100..8100]));
        // A zero chunk and overlay blocks never need the cache.
        f.write(&disk, CS + 4096, Some(&pattern(4096, 1)), 4096);
        let got = disk.read_with(3 * CS as u64, 4096, true).unwrap();
        assert_eq!(got.as_deref(), Some(&[0u8; 4096][..]));
        let got = disk.read_with(CS as u64 + 4096, 4096, true).unwrap();
        assert_eq!(got.as_deref(), Some(&f.model[CS + 4096..CS + 8192]));
        assert!(disk.write_is_fast(CS as u64 + 4096, 4096));
        assert!(disk.write_is_fast(CS as u64, 4096 * 3));
        assert!(!disk.write_is_fast(CS as u64 + 100, 4096), "needs a merge");
        assert!(
            disk.write_is_fast(3 * CS as u64 + 100, 10),
            "the zero chunk merges free"
        );
    }

    #[test]
    fn append_pread_reads_exactly_or_leaves_the_buffer_alone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, pattern(10000, 3)).unwrap();
        let f = File::open(&p).unwrap();
        let mut buf = vec![7u8; 3];
        append_pread(&mut buf, &f, 100, 5000).unwrap();
        assert_eq!(buf[..3], [7, 7, 7]);
        assert_eq!(buf[3..], pattern(10000, 3)[100..5100]);
        let err = append_pread(&mut buf, &f, 9000, 2000).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(buf.len(), 5003, "a short read leaves the buffer as it was");
    }

    /// Flips one byte of the station cache's file of `id`, in place (same inode).
    fn flip_cached(f: &Fixture, id: &ChunkId, at: u64) {
        let hex = id.to_hex();
        let p = f.dir.path().join("cache/chunks").join(&hex[..2]).join(&hex);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut b = [0u8];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    }

    /// A cached chunk verified once and changed in place afterwards is neither given
    /// to the guest nor used to fill a partly written chunk at check-in: the changed
    /// byte never reaches the bank.
    #[test]
    fn a_cache_file_changed_in_place_is_neither_served_nor_checked_in() {
        let mut f = fixture();
        let disk = f.check_out();
        // Chunks 0 and 1 are fetched, cached and verified; reads now trust the cache.
        assert_eq!(disk.read_sync(0, 2 * CS as u32).unwrap(), f.base[..2 * CS]);
        let got = disk.read_with(100, 4096, true).unwrap();
        assert_eq!(got.as_deref(), Some(&f.base[100..4196]));
        let (c0, c1) = (disk.base.chunks[0].unwrap(), disk.base.chunks[1].unwrap());
        flip_cached(&f, &c0, 200);
        flip_cached(&f, &c1, 40000);
        // The guest reads the bank's bytes, inline or not.
        if let Some(got) = disk.read_with(100, 4096, true).unwrap() {
            assert!(
                got == f.base[100..4196],
                "an inline read served the changed byte"
            );
        }
        let got = disk.read_sync(0, 4096).unwrap();
        assert!(got == f.base[..4096], "a read served the changed byte");
        // A block of chunk 1 written: check-in fills the rest of it from verified data.
        f.write(&disk, CS + 8192, Some(&pattern(4096, 1)), 4096);
        let r = f
            .station
            .check_in(&mut f.bank, &disk, &ImportOptions::default(), &NoProgress)
            .unwrap();
        assert_eq!(r.chunks_written, 1);
        assert!(f.head() == f.model, "the version holds the changed byte");
        assert!(
            f.station
                .cache
                .counters
                .dropped_corrupt
                .load(Ordering::Relaxed)
                >= 1
        );
    }

    /// A base version whose index puts a chunk at a place of another length (a 1 MiB
    /// chunk at a 64 KiB place; chunk 0's 64 KiB at the 5120-byte last place): reads
    /// of those places fail with an I/O error naming the chunk, from the bank or from
    /// the cache, inline or not; a write that merges with such a base fails; the
    /// misplaced chunk is not cached; the other chunks read as before.
    #[test]
    fn a_base_chunk_of_the_wrong_length_for_its_place_fails_the_guest_read() {
        let mut f = fixture();
        let big = mbank_core::chunk::encode(&vec![0x5a; 1 << 20], 3);
        f.bank.store().put(&big).unwrap();
        f.bank.store().flush().unwrap();
        let r: MachineRef = "alice/dev".parse().unwrap();
        let mut v = f.bank.resolve(&r).unwrap();
        let mut idx = f.bank.catalog().disk_index(&v).unwrap();
        let c0 = idx.chunks[0].unwrap();
        idx.chunks[1] = Some(big.id);
        idx.chunks[8] = Some(c0);
        let parent = v.id;
        v.id = mbank_core::VersionId::random();
        v.parent = Some(parent);
        f.bank
            .catalog_mut()
            .commit_version(&v, &idx, &[], Some(parent))
            .unwrap();
        let disk = f.check_out();
        // Chunk 0 reads, and is now cached and verified.
        assert_eq!(disk.read_sync(0, CS as u32).unwrap(), f.base[..CS]);
        let Err(e) = disk.read_sync(CS as u64, 4096) else {
            panic!("a read of chunk 1 served the misplaced chunk");
        };
        assert!(
            matches!(e, DeviceError::Io { .. }) && e.to_string().contains(&big.id.to_hex()),
            "{e}"
        );
        assert!(
            !f.station.cache.contains(&big.id),
            "the misplaced chunk was cached"
        );
        let last = 8 * CS as u64;
        assert!(
            !matches!(disk.read_with(last, 4096, true), Ok(Some(_))),
            "an inline read served chunk 0 at the last place"
        );
        let Err(e) = disk.read_sync(last, 4096) else {
            panic!("a read of the last chunk served chunk 0");
        };
        assert!(e.to_string().contains(&c0.to_hex()), "{e}");
        let e = disk
            .write_sync(CS as u64 + 100, Some(&[1u8; 10]), 10)
            .unwrap_err();
        assert!(e.to_string().contains(&big.id.to_hex()), "{e}");
        assert_eq!(
            disk.read_sync(2 * CS as u64, CS as u32).unwrap(),
            f.base[2 * CS..3 * CS]
        );
    }
}
