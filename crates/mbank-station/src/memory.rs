//! [`LazyRam`]: the RAM device of a session that runs with lazy memory (`mbank run
//! --lazy-memory`). The guest's RAM is one file on an [`mbank_memfs`] mount in the
//! session directory, which QEMU maps with `memory-backend-file,share=on`; a suspend
//! then migrates only the device state (capability `x-ignore-shared`) and stores the
//! RAM itself as the version's [`RAM_STREAM`].
//!
//! - **The `ram` stream** is an index of kind 2 (memory) whose runs are the RAM cut in
//!   fixed chunks of [`RAM_CHUNK`] bytes (the last one may be shorter), a zero chunk
//!   being a run without a chunk id (docs/formats.md). Chunk `i` of the RAM is run `i`.
//! - **Resume** ([`LazyRam::mount`] with the parent's `ram` index): a chunk is fetched
//!   through the session's [`CachedStore`] (station cache, else the bank; verified) the
//!   first time the guest touches it, the absent chunks of one FUSE read (a fault's
//!   read-around, 1 MiB) in one batch request ([`CachedStore::fetch_many`]); zero
//!   chunks cost nothing. A fresh boot mounts an
//!   all-zero image: nothing is ever fetched.
//! - **RAM working set** ([`RAM_SET_STREAM`]): the chunks the guest's faults fetched, in
//!   order, stored by [`LazyRam::save`]; the next resume of that version replays it in
//!   the background ([`LazyRam::prefetch`], [`PREFETCH_BATCH`] chunks per batch).
//! - **Suspend** ([`LazyRam::save`], after QEMU's `stop`): the RAM file is fsynced, so
//!   the kernel hands every page the guest dirtied back to the image as a write; then
//!   only the chunks written since the mount ([`mbank_memfs::MemImage::dirty_chunks`])
//!   are read, hashed and sent (in batches of [`SAVE_BATCH`]: one `have` query, one
//!   upload), and every other run is the parent's. A second suspend of a resumed guest
//!   sends its dirty chunks only.
//! - **Write-back** ([`LazyRam::start_writeback`]): while the guest runs, a thread
//!   writes its dirty pages out to the image every [`WRITEBACK_ROUND`]
//!   ([`mbank_memfs::write_out`]), takes the chunks changed since
//!   ([`MemImage::take_changed`]), and sends those that changed in an earlier round but
//!   not in the last one (settled: a chunk the guest rewrites all the time is left to
//!   the suspend), behind the guest's faults and disk reads, under the session's
//!   write-back cap, under its writer registration. It records each chunk's id; the
//!   suspend takes the id of every dirty chunk nothing wrote since it was taken, and
//!   reads, hashes and sends only the rest.
//!
//! Crashes: the overlay and the dirty map are not journalled. A session killed while
//! running loses its RAM since the version it resumed (the disk is recovered as after
//! a power loss) and leaves its mount behind; [`unmount_stale`] detaches it before the
//! directory is removed. A chunk that cannot be fetched is an I/O error for the guest
//! (QEMU dies of SIGBUS); [`RamStats::last_error`] names it for the session's error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mbank_bank::{Bank, StreamStats, WriterGuard};
use mbank_core::chunk::DEFAULT_ZSTD_LEVEL;
use mbank_core::{ChunkId, MemoryIndex, MemoryRun};
use mbank_memfs::{Counters, FetchError, Fetcher, Layout, MemImage, MemMount, MountOptions};
use mbank_store::ChunkStore;

use crate::cached::CachedStore;

pub use mbank_bank::derive::{RAM_SET_STREAM, RAM_STREAM};

/// `MBRS`: the magic of a RAM working set ([`RAM_SET_STREAM`]).
pub const RAM_SET_MAGIC: [u8; 4] = *b"MBRS";
pub const RAM_SET_VERSION: u8 = 1;
const RAM_SET_HEADER: usize = 12;

/// RAM chunks fetched at once by the working set's replay.
pub const PREFETCH_BATCH: usize = 16;

/// Bytes per RAM chunk (ARCHITECTURE.md, "Lazy memory": small chunks keep the dirty set
/// of a suspend small).
pub const RAM_CHUNK: u32 = 64 << 10;

/// Dirty chunks hashed and sent at once by [`LazyRam::save`] and the write-back.
pub const SAVE_BATCH: usize = 32;

/// How often the RAM's write-back writes the guest's dirty pages out and looks for
/// settled chunks.
pub const WRITEBACK_ROUND: std::time::Duration = std::time::Duration::from_secs(5);

/// Names inside the session directory.
const MOUNT_DIR: &str = "ram.mnt";
const OVERLAY: &str = "ram.overlay";

/// What can go wrong with a session's RAM device.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The version's `ram` stream does not fit the machine's memory size.
    #[error(
        "the saved RAM of this version does not fit the machine: {0} (run its parent version, \
         or boot it from its disk)"
    )]
    Layout(String),
    /// The RAM file system could not be set up or torn down.
    #[error("guest RAM at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The memory image failed (overlay, fetch).
    #[error("guest RAM: {0}")]
    Image(#[from] mbank_memfs::MemError),
    /// The bank refused the RAM's chunks.
    #[error("cannot store the guest's RAM in the bank: {0} (the guest keeps running; try again)")]
    Store(#[from] mbank_store::StoreError),
    /// The bank refused the RAM's working set.
    #[error(
        "cannot store the guest's RAM working set in the bank: {0} (the guest keeps running; try again)"
    )]
    Bank(#[from] mbank_bank::BankError),
}

/// Fetches RAM chunks through the session's [`CachedStore`].
struct CachedFetcher {
    chunks: Arc<CachedStore>,
    ids: Vec<Option<ChunkId>>,
}

impl Fetcher for CachedFetcher {
    fn fetch(&self, chunk: usize) -> Result<Vec<u8>, FetchError> {
        let Some(Some(id)) = self.ids.get(chunk) else {
            return Err(FetchError::new(format!(
                "RAM chunk {chunk} is zero or past the end; nothing to fetch"
            )));
        };
        self.chunks
            .fetch(id)
            .map(Arc::unwrap_or_clone)
            .map_err(|e| FetchError::new(format!("RAM chunk {chunk} ({id}): {e}")))
    }

    fn fetch_many(&self, chunks: &[usize]) -> Vec<Result<Vec<u8>, FetchError>> {
        let ids: Vec<Option<ChunkId>> = chunks
            .iter()
            .map(|&c| self.ids.get(c).copied().flatten())
            .collect();
        let Some(wanted) = ids.iter().copied().collect::<Option<Vec<ChunkId>>>() else {
            return chunks.iter().map(|&c| self.fetch(c)).collect();
        };
        self.chunks
            .fetch_many(&wanted)
            .into_iter()
            .zip(chunks.iter().zip(&wanted))
            .map(|(r, (c, id))| {
                r.map(Arc::unwrap_or_clone)
                    .map_err(|e| FetchError::new(format!("RAM chunk {c} ({id}): {e}")))
            })
            .collect()
    }
}

/// What a session's RAM device did so far (`run --json`, the control socket's `stats`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RamStats {
    /// Chunks of [`RAM_CHUNK`] bytes in the RAM.
    pub chunks: u64,
    /// Chunks of the version's saved RAM that are not zero (the most a resume fetches).
    pub chunks_nonzero: u64,
    /// Chunks fetched through the station cache so far, and their bytes.
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Fault reads and partial writes that waited for a fetch.
    pub faults_waited: u64,
    /// Fault reads being served now (a guest stalled on an unreachable bank shows here).
    pub faults_in_flight: u64,
    /// Chunks fetched ahead of the guest by the replay of the recorded working set.
    pub chunks_prefetched: u64,
    /// Chunks fetched by read-ahead with a sequential fault (in the fault's batch).
    pub chunks_read_ahead: u64,
    /// Chunks the guest wrote since the mount (as far as the kernel wrote them back).
    pub chunks_dirty: u64,
    /// Chunks the background write-back stored in the bank during the session, and
    /// their bytes as sent (compressed); chunks the bank had already are not counted.
    pub written_back_chunks: u64,
    pub written_back_bytes: u64,
    /// Fetches that failed (the guest's access got an I/O error: QEMU dies of SIGBUS),
    /// and the last failure's message, which names the chunk.
    pub fetch_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A handle that reads a [`LazyRam`]'s statistics from another thread.
#[derive(Clone)]
pub struct RamStatsHandle {
    image: Arc<MemImage>,
    chunks_nonzero: u64,
    written: Arc<Written>,
}

impl RamStatsHandle {
    /// The statistics now.
    pub fn stats(&self) -> RamStats {
        let c: Counters = self.image.counters();
        RamStats {
            chunks: c.chunks,
            chunks_nonzero: self.chunks_nonzero,
            chunks_fetched: c.chunks_fetched,
            bytes_fetched: c.bytes_fetched,
            faults_waited: c.faults_waited,
            faults_in_flight: c.reads_in_flight,
            chunks_prefetched: c.prefetched,
            chunks_read_ahead: c.read_ahead,
            chunks_dirty: c.dirty_chunks,
            written_back_chunks: self.written.chunks.load(Ordering::Relaxed),
            written_back_bytes: self.written.bytes.load(Ordering::Relaxed),
            fetch_errors: c.fetch_errors,
            last_error: c.last_error,
        }
    }
}

/// A session's guest RAM on a lazy memory file system; see the module docs.
pub struct LazyRam {
    mount: Option<MemMount>,
    base: Vec<Option<ChunkId>>,
    layout: Layout,
    /// The working set the version came with (replayed by [`LazyRam::prefetch`]).
    inherited_set: Vec<usize>,
    prefetcher: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    /// What the write-back stored, and its thread while it runs.
    written: Arc<Written>,
    writeback: std::sync::Mutex<Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>>,
}

/// What the RAM's write-back stored: per chunk, the id of the content it sent when it
/// took the chunk (`Some(None)`: zeros), and its counters.
#[derive(Default)]
struct Written {
    ids: std::sync::Mutex<Vec<Option<Option<ChunkId>>>>,
    chunks: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

/// What [`LazyRam::save`] stored: the `ram` index and what storing it did, and the
/// RAM working set ([`RAM_SET_STREAM`]) with its number of entries, if the session
/// recorded one.
pub struct SavedRam {
    pub index: MemoryIndex,
    pub stats: StreamStats,
    pub working_set: Option<(MemoryIndex, u64)>,
    /// Dirty chunks whose id the write-back had stored (not read again).
    pub written_back: u64,
}

/// A RAM working set as bytes (docs/formats.md, "RAM working set"): `MBRS`, format
/// version 1, three zero bytes, the entry count (u32 LE), then each entry, a chunk
/// number of the RAM (u32 LE), in order of first use.
pub fn encode_ram_set(chunks: &[usize]) -> Vec<u8> {
    let mut b = Vec::with_capacity(RAM_SET_HEADER + 4 * chunks.len());
    b.extend_from_slice(&RAM_SET_MAGIC);
    b.extend_from_slice(&[RAM_SET_VERSION, 0, 0, 0]);
    b.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for &c in chunks {
        b.extend_from_slice(&(c as u32).to_le_bytes());
    }
    b
}

/// Parses a RAM working set of a RAM of `chunks` chunks; see [`encode_ram_set`].
pub fn decode_ram_set(b: &[u8], chunks: usize) -> Result<Vec<usize>, String> {
    if b.len() < RAM_SET_HEADER || b[..4] != RAM_SET_MAGIC {
        return Err("not a RAM working set (no MBRS header)".into());
    }
    if b[4] != RAM_SET_VERSION {
        return Err(format!("RAM working set format {} is not known", b[4]));
    }
    let n = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
    let body = &b[RAM_SET_HEADER..];
    if body.len() != n.saturating_mul(4) {
        return Err(format!(
            "the RAM working set says {n} entries but holds {} bytes of them",
            body.len()
        ));
    }
    body.chunks_exact(4)
        .map(|e| u32::from_le_bytes(e.try_into().expect("4 bytes")) as usize)
        .map(|c| {
            if c < chunks {
                Ok(c)
            } else {
                Err(format!("RAM chunk {c} is past the RAM's {chunks} chunks"))
            }
        })
        .collect()
}

/// The most bytes a RAM working set of `chunks` chunks can take.
pub fn ram_set_bound(chunks: usize) -> u64 {
    (RAM_SET_HEADER + 4 * chunks) as u64
}

impl LazyRam {
    /// Mounts `size` bytes of guest RAM under `session_dir`, its chunks those of
    /// `base` (the version's `ram` stream) or, without one, all zero.
    pub fn mount(
        chunks: Arc<CachedStore>,
        session_dir: &Path,
        size: u64,
        base: Option<&MemoryIndex>,
    ) -> Result<LazyRam, MemoryError> {
        let layout = Layout {
            size,
            chunk_size: RAM_CHUNK,
        };
        let ids: Vec<Option<ChunkId>> = match base {
            None => vec![None; layout.chunks()],
            Some(idx) => ram_ids(idx, layout)?,
        };
        let nonzero: Vec<bool> = ids.iter().map(Option::is_some).collect();
        let dir = session_dir.join(MOUNT_DIR);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MemoryError::Io { path, source }
        };
        unmount_stale(session_dir);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let overlay = session_dir.join(OVERLAY);
        match std::fs::remove_file(&overlay) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&overlay)(e)),
            _ => {}
        }
        let fetcher = Arc::new(CachedFetcher {
            chunks,
            ids: ids.clone(),
        });
        let image = Arc::new(MemImage::create(layout, &nonzero, &overlay, fetcher)?);
        let mount = MemMount::mount(&dir, image, MountOptions::default()).map_err(io(&dir))?;
        Ok(LazyRam {
            mount: Some(mount),
            base: ids,
            layout,
            inherited_set: Vec::new(),
            prefetcher: None,
            written: Arc::new(Written {
                ids: std::sync::Mutex::new(vec![None; layout.chunks()]),
                ..Written::default()
            }),
            writeback: std::sync::Mutex::new(None),
        })
    }

    /// Fetches the chunks of `working_set` (the version's [`RAM_SET_STREAM`]) ahead of
    /// the guest, in its order, [`PREFETCH_BATCH`] at a time, in a background thread
    /// that ends with the mount; the guest's faults go on meanwhile (a fault on a chunk
    /// in flight waits for that fetch). A failed batch is left to the guest's faults.
    pub fn prefetch(&mut self, working_set: Vec<usize>) {
        self.inherited_set = working_set.clone();
        let image = self.mounted().image().clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::Builder::new()
            .name("ram-prefetch".into())
            .spawn(move || {
                for batch in working_set.chunks(PREFETCH_BATCH) {
                    if s.load(Ordering::Relaxed) {
                        return;
                    }
                    let _ = image.prefetch_many(batch);
                }
            });
        if let Ok(h) = h {
            self.prefetcher = Some((stop, h));
        }
    }

    fn stop_prefetch(&mut self) {
        if let Some((stop, h)) = self.prefetcher.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
    }

    /// The RAM working set to store with the next version: the chunks this session's
    /// guest fetched on fault, in order, then those of the inherited set it lacks (they
    /// were prefetched, so they are no faults here, but still needed). A session whose
    /// guest waited on no fault (all prefetched in time) passes the inherited set on.
    /// Each chunk once (a fault retried after a failed fetch is recorded again).
    fn working_set(&self) -> Vec<usize> {
        let mut have = vec![false; self.layout.chunks()];
        self.mounted()
            .image()
            .fault_order()
            .into_iter()
            .chain(self.inherited_set.iter().copied())
            .filter(|&c| c < have.len() && !std::mem::replace(&mut have[c], true))
            .collect()
    }

    fn mounted(&self) -> &MemMount {
        self.mount.as_ref().expect("mounted until dropped")
    }

    /// The RAM file, for QEMU's `mem-path`.
    pub fn file(&self) -> &Path {
        self.mounted().file()
    }

    /// A handle on the RAM device's statistics.
    pub fn stats_handle(&self) -> RamStatsHandle {
        RamStatsHandle {
            image: self.mounted().image().clone(),
            chunks_nonzero: self.base.iter().filter(|c| c.is_some()).count() as u64,
            written: self.written.clone(),
        }
    }

    /// Stores the RAM as it is now (call it after QEMU's `stop`): syncs the RAM file,
    /// sends the chunks written since the mount, and returns the `ram` index (the
    /// parent's runs for the rest). `guard` keeps what is sent from GC until the version
    /// naming it commits.
    pub fn save(&self, bank: &Bank, guard: &WriterGuard) -> Result<SavedRam, MemoryError> {
        self.stop_writeback();
        let m = self.mounted();
        m.sync().map_err(|source| MemoryError::Io {
            path: m.file().to_path_buf(),
            source,
        })?;
        let image = m.image();
        let store: &dyn ChunkStore = &*bank.store_arc();
        let mut ids = self.base.clone();
        let mut st = StreamStats::default();
        // The write-back's chunks that nothing wrote since it took them are in the bank
        // (kept by the session's writer); the rest are read and sent now.
        let mut written_back = 0;
        let mut rest = Vec::new();
        {
            let written = self.written.ids.lock().expect("written lock");
            for i in image.dirty_chunks() {
                match written[i] {
                    Some(id) if !image.is_changed(i) => {
                        ids[i] = id;
                        written_back += 1;
                    }
                    _ => rest.push(i),
                }
            }
        }
        for batch in rest.chunks(SAVE_BATCH) {
            let sent = store_chunks(image, store, batch)?;
            st.chunks_new += sent.chunks_new;
            st.bytes_stored += sent.bytes;
            for (i, id) in sent.ids {
                ids[i] = id;
            }
        }
        store.flush()?;
        let runs: Vec<MemoryRun> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| MemoryRun {
                id: *id,
                len: self.layout.chunk_len(i) as u32,
            })
            .collect();
        st.bytes = self.layout.size;
        st.chunks = runs.len() as u64;
        st.chunks_zero = runs.iter().filter(|r| r.id.is_none()).count() as u64;
        // The chunks the guest waited for, for the next resume to fetch ahead of it.
        let ws = self.working_set();
        let working_set = if ws.is_empty() {
            None
        } else {
            let (idx, ws_st) = bank.store_stream(guard, &encode_ram_set(&ws)[..])?;
            st.chunks_new += ws_st.chunks_new;
            st.bytes_stored += ws_st.bytes_stored;
            Some((idx, ws.len() as u64))
        };
        Ok(SavedRam {
            index: MemoryIndex {
                total_len: self.layout.size,
                runs,
            },
            stats: st,
            working_set,
            written_back,
        })
    }

    /// Starts the RAM's write-back (see the module docs) into `store` under `writer`
    /// and `pacer`, the session's ([`crate::live::Session::writeback`]); it waits while
    /// `guest_waits` (a disk read waiting on a fetch) or a fault is served. It runs until
    /// [`LazyRam::save`] or the unmount; a failure is said once and tried again.
    pub fn start_writeback(
        &self,
        store: Arc<dyn ChunkStore>,
        writer: Arc<std::sync::Mutex<WriterGuard>>,
        pacer: Arc<crate::writeback::Pacer>,
        guest_waits: impl Fn() -> bool + Send + 'static,
        say: crate::live::Warn,
    ) {
        let image = self.mounted().image().clone();
        let file = self.mounted().file().to_path_buf();
        let written = self.written.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::Builder::new()
            .name("ram-writeback".into())
            .spawn(move || {
                let _writer = writer;
                let busy = || guest_waits() || image.guest_reading();
                let mut pending: Vec<usize> = Vec::new();
                let mut warned = false;
                while crate::writeback::nap(WRITEBACK_ROUND, &s) {
                    if let Err(e) = mbank_memfs::write_out(&file) {
                        if !std::mem::replace(&mut warned, true) {
                            say(format!(
                                "warning: the RAM's background write-back stopped: {e}"
                            ));
                        }
                        break;
                    }
                    let now = image.take_changed();
                    let mut hot = vec![false; image.layout().chunks()];
                    now.iter().for_each(|&i| hot[i] = true);
                    let settled: Vec<usize> =
                        pending.iter().copied().filter(|&i| !hot[i]).collect();
                    pending = now;
                    let mut left = settled.as_slice();
                    while !left.is_empty() {
                        while busy()
                            && crate::writeback::nap(std::time::Duration::from_millis(1), &s)
                        {
                        }
                        if s.load(Ordering::Relaxed) {
                            pending.extend_from_slice(left);
                            break;
                        }
                        let (batch, more) = left.split_at(left.len().min(SAVE_BATCH));
                        left = more;
                        let sent = store_chunks(&image, &*store, batch).and_then(|sent| {
                            store.flush()?;
                            Ok(sent)
                        });
                        match sent {
                            Ok(sent) => {
                                let mut ids = written.ids.lock().expect("written lock");
                                for (i, id) in sent.ids {
                                    ids[i] = Some(id);
                                }
                                drop(ids);
                                written.chunks.fetch_add(sent.chunks_new, Ordering::Relaxed);
                                written.bytes.fetch_add(sent.bytes, Ordering::Relaxed);
                                if !crate::writeback::nap(pacer.paid(sent.bytes), &s) {
                                    pending.extend_from_slice(left);
                                    break;
                                }
                            }
                            Err(e) => {
                                if !std::mem::replace(&mut warned, true) {
                                    say(format!(
                                        "warning: the RAM's background write-back failed: {e}; \
                                         it tries again, and the suspend sends what it could not"
                                    ));
                                }
                                pending.extend_from_slice(batch);
                                pending.extend_from_slice(left);
                                break;
                            }
                        }
                    }
                }
                // What was taken and not stored goes back to the suspend.
                for i in pending {
                    image.mark_changed(i);
                }
            });
        if let Ok(h) = h {
            *self.writeback.lock().expect("write-back lock") = Some((stop, h));
        }
    }

    /// Stops the write-back thread, if it runs, and waits for it.
    fn stop_writeback(&self) {
        let w = self.writeback.lock().expect("write-back lock").take();
        if let Some((stop, h)) = w {
            stop.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
    }

    /// Unmounts the RAM file system (QEMU must have exited).
    pub fn unmount(mut self) -> Result<(), MemoryError> {
        self.stop_prefetch();
        self.stop_writeback();
        let Some(m) = self.mount.take() else {
            return Ok(());
        };
        let dir = m.file().parent().map(Path::to_path_buf).unwrap_or_default();
        m.unmount()
            .map_err(|source| MemoryError::Io { path: dir, source })
    }
}

impl Drop for LazyRam {
    fn drop(&mut self) {
        self.stop_prefetch();
        self.stop_writeback();
    }
}

/// What [`store_chunks`] did: each chunk's id (`None`: zeros), and the chunks and bytes
/// the bank did not have.
struct Stored {
    ids: Vec<(usize, Option<ChunkId>)>,
    chunks_new: u64,
    bytes: u64,
}

/// Reads the chunks `batch` of `image` as they are now, and sends those the bank lacks
/// (one `have` query, one upload; only those are compressed); the caller flushes the
/// store.
fn store_chunks(
    image: &MemImage,
    store: &dyn ChunkStore,
    batch: &[usize],
) -> Result<Stored, MemoryError> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut plain = Vec::with_capacity(batch.len());
    for &i in batch {
        let data = image.read_chunk(i)?;
        if mbank_core::is_zero(&data) {
            ids.push((i, None));
        } else {
            let id = ChunkId::of(&data);
            ids.push((i, Some(id)));
            plain.push((id, data));
        }
    }
    let (chunks_new, bytes) = crate::writeback::send_missing(store, plain, DEFAULT_ZSTD_LEVEL)?;
    Ok(Stored {
        ids,
        chunks_new,
        bytes,
    })
}

/// The chunk ids of a `ram` index for `layout`: one run per chunk, each as long as its
/// place; anything else is refused.
pub fn ram_ids(idx: &MemoryIndex, layout: Layout) -> Result<Vec<Option<ChunkId>>, MemoryError> {
    if idx.total_len != layout.size || idx.runs.len() != layout.chunks() {
        return Err(MemoryError::Layout(format!(
            "it holds {} bytes in {} runs, the machine has {} bytes of RAM in {} chunks of {}",
            idx.total_len,
            idx.runs.len(),
            layout.size,
            layout.chunks(),
            layout.chunk_size
        )));
    }
    idx.runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if r.len as usize == layout.chunk_len(i) {
                Ok(r.id)
            } else {
                Err(MemoryError::Layout(format!(
                    "run {i} is {} bytes, the RAM's chunk there is {}",
                    r.len,
                    layout.chunk_len(i)
                )))
            }
        })
        .collect()
}

/// Detaches a RAM mount a killed session left in `session_dir` (best effort), so the
/// directory can be removed.
pub fn unmount_stale(session_dir: &Path) {
    // No look at `dir` first: on a mount whose server died, stat fails with ENOTCONN,
    // so `exists()` says false for exactly the mount to detach. umount2 on a directory
    // that is no mount point (or none at all) fails harmlessly.
    let dir = session_dir.join(MOUNT_DIR);
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 reads the NUL-terminated path, which lives across the call.
    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ram_working_set_round_trips_and_bad_ones_are_refused() {
        let list = vec![7, 0, 4095, 3];
        let b = encode_ram_set(&list);
        assert_eq!(b.len() as u64, ram_set_bound(4));
        assert_eq!(decode_ram_set(&b, 4096).unwrap(), list);
        assert!(decode_ram_set(&b, 4000).unwrap_err().contains("4095"));
        assert!(decode_ram_set(&b[..b.len() - 1], 4096).is_err());
        assert!(decode_ram_set(b"MBWS", 4096).is_err());
        let mut other = b.clone();
        other[4] = 9;
        assert!(
            decode_ram_set(&other, 4096)
                .unwrap_err()
                .contains("format 9")
        );
    }

    #[test]
    fn a_ram_index_must_have_one_run_per_chunk() {
        let layout = Layout {
            size: 3 * RAM_CHUNK as u64,
            chunk_size: RAM_CHUNK,
        };
        let good = MemoryIndex {
            total_len: layout.size,
            runs: vec![
                MemoryRun {
                    id: None,
                    len: RAM_CHUNK
                };
                3
            ],
        };
        assert_eq!(ram_ids(&good, layout).unwrap(), vec![None; 3]);
        let mut cdc = good.clone();
        cdc.runs[0].len = 100;
        cdc.runs[1].len = 2 * RAM_CHUNK - 100;
        cdc.runs.pop();
        cdc.runs.push(MemoryRun {
            id: None,
            len: RAM_CHUNK,
        });
        let e = ram_ids(&cdc, layout).unwrap_err().to_string();
        assert!(e.contains("run 0 is 100 bytes"), "{e}");
    }
}
