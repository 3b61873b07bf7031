//! Packs of versions (`mbank_core::pack`, docs/formats.md "Pack"): built from the
//! stored chunks into `<bank>/packs/`, served by a bank server, and read by an export
//! through one, which then moves one zstd stream's bytes rather than one frame per
//! chunk. A pack is derived data: a missing, damaged or stale one costs only speed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use mbank_catalog::VersionInfo;
use mbank_core::pack::{self, PackIndex, Segment};
use mbank_core::{ChunkId, DiskIndex, VersionId};
use mbank_store::{ChunkStore, PackSource, StoreError};
use serde::Serialize;

use crate::{BankError, Progress, Unit};

/// The directory of a bank's packs.
pub const PACKS_DIR: &str = "packs";

/// Where the pack of version `v` lives in the bank at `bank_dir`.
pub fn pack_path(bank_dir: &Path, v: VersionId) -> PathBuf {
    bank_dir
        .join(PACKS_DIR)
        .join(format!("{}.pack", v.to_hex()))
}

/// What building a pack did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PackReport {
    pub machine: String,
    pub version: String,
    /// Distinct non-zero chunks in the pack.
    pub chunks: u64,
    pub segments: u64,
    /// Their plaintext.
    pub plain_bytes: u64,
    /// The same chunks as the bank stores them (one frame each).
    pub stored_bytes: u64,
    /// The pack file: its index and frames.
    pub pack_bytes: u64,
    pub level: i32,
    pub path: String,
    pub seconds: f64,
}

/// The distinct non-zero chunks of `index` in the order the disk first uses them, each
/// with its length.
fn first_uses(index: &DiskIndex) -> Vec<(ChunkId, u32)> {
    let mut seen = HashSet::new();
    index
        .chunks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|id| (i, id)))
        .filter(|(_, id)| seen.insert(*id))
        .map(|(i, id)| (id, index.chunk_len(i) as u32))
        .collect()
}

/// The segments `chunks` make: runs of at most [`pack::SEGMENT_TARGET`] bytes (or one
/// chunk, if larger).
fn plan_segments(chunks: &[(ChunkId, u32)]) -> Vec<Vec<(ChunkId, u32)>> {
    let mut out: Vec<Vec<(ChunkId, u32)>> = Vec::new();
    let mut size = 0u64;
    for &(id, len) in chunks {
        match out.last_mut() {
            Some(seg) if size + len as u64 <= pack::SEGMENT_TARGET as u64 => {
                seg.push((id, len));
                size += len as u64;
            }
            _ => {
                out.push(vec![(id, len)]);
                size = len as u64;
            }
        }
    }
    out
}

/// Builds the pack of version `v` (whose disk index is `index`) from `store` into
/// `<bank_dir>/packs/`, replacing an older one: `jobs` segments are read and compressed
/// at once, at zstd level `level`. The file is written beside its name and renamed
/// into place once complete and synced.
pub fn build(
    store: &dyn ChunkStore,
    bank_dir: &Path,
    v: &VersionInfo,
    index: &DiskIndex,
    level: i32,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<PackReport, BankError> {
    let started = Instant::now();
    let damaged = |source| BankError::Damaged {
        machine: v.machine.clone(),
        version: v.id,
        source: Box::new(source),
    };
    let plan = plan_segments(&first_uses(index));
    let chunks: usize = plan.iter().map(|s| s.len()).sum();
    let plain_bytes: u64 = plan.iter().flatten().map(|(_, l)| *l as u64).sum();
    let index_len = pack::serialized_len(plan.len(), chunks);
    let dir = bank_dir.join(PACKS_DIR);
    fs::create_dir_all(&dir).map_err(|e| BankError::io("create", &dir, e))?;
    let path = pack_path(bank_dir, v.id);
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{:x}",
        v.id.to_hex(),
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| BankError::io("create", &tmp, e))?;
    let mut cleanup = crate::export::PartialFile(Some(tmp.clone()));
    progress.start(
        &format!("packing {}@{}", v.machine, v.id.short()),
        plain_bytes,
        Unit::Bytes,
    );
    let mut segments = Vec::with_capacity(plan.len());
    let mut offset = index_len as u64;
    let mut stored_bytes = 0u64;
    let jobs = jobs.max(1);
    // Waves of `jobs` segments: each read and compressed on its own thread, then
    // written in order.
    for wave in plan.chunks(jobs) {
        let done: Vec<Result<(Vec<u8>, u64), BankError>> = std::thread::scope(|s| {
            let handles: Vec<_> = wave
                .iter()
                .map(|seg| {
                    let (tmp, damaged) = (&tmp, &damaged);
                    s.spawn(move || -> Result<(Vec<u8>, u64), BankError> {
                        let ids: Vec<ChunkId> = seg.iter().map(|(id, _)| *id).collect();
                        let raws = store.get_raw_many(&ids).map_err(damaged)?;
                        let mut stored = 0u64;
                        let mut plains = Vec::with_capacity(ids.len());
                        for ((id, len), raw) in seg.iter().zip(raws) {
                            stored += raw.len() as u64;
                            let plain = store.verify(id, raw).map_err(damaged)?;
                            if plain.len() != *len as usize {
                                // Its first place, where the length was taken.
                                let i = index.chunks.iter().position(|c| *c == Some(*id));
                                let wrong = crate::WrongLength::disk(
                                    index,
                                    i.expect("a chunk of the index"),
                                    *id,
                                    plain.len(),
                                );
                                return Err(BankError::WrongLength {
                                    machine: v.machine.clone(),
                                    version: v.id,
                                    wrong: Box::new(wrong.expect("a length that differs")),
                                });
                            }
                            plains.push(plain);
                        }
                        let refs: Vec<&[u8]> = plains.iter().map(|p| p.as_slice()).collect();
                        let frame = pack::compress_segment(&refs, level)
                            .map_err(|e| BankError::io("compress a segment of", tmp, e))?;
                        Ok((frame, stored))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a pack builder thread panicked"))
                .collect()
        });
        for (seg, r) in wave.iter().zip(done) {
            let (frame, stored) = r?;
            file.write_all_at(&frame, offset)
                .map_err(|e| BankError::io("write", &tmp, e))?;
            let plain_len: u32 = seg.iter().map(|(_, l)| *l).sum();
            segments.push(Segment {
                offset,
                frame_len: frame.len() as u64,
                plain_len,
                chunks: seg.clone(),
            });
            offset += frame.len() as u64;
            stored_bytes += stored;
            progress.advance(plain_len as u64);
        }
    }
    let idx = PackIndex {
        version: v.id,
        segments,
    };
    let bytes = idx.to_bytes();
    debug_assert_eq!(bytes.len(), index_len);
    debug_assert_eq!(idx.file_len(), offset);
    file.write_all_at(&bytes, 0)
        .map_err(|e| BankError::io("write", &tmp, e))?;
    file.sync_all()
        .map_err(|e| BankError::io("sync", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| BankError::io("rename the pack to", &path, e))?;
    cleanup.0 = None;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    progress.finish();
    Ok(PackReport {
        machine: v.machine.to_string(),
        version: v.id.to_hex(),
        chunks: chunks as u64,
        segments: idx.segments.len() as u64,
        plain_bytes,
        stored_bytes,
        pack_bytes: offset,
        level,
        path: path.display().to_string(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl crate::Bank {
    /// Builds the pack of `r` in this bank's directory (see [`build`]); a bank server
    /// builds its own (`mbank pack` through it asks it to).
    pub fn build_pack(
        &self,
        r: &mbank_core::MachineRef,
        level: i32,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<PackReport, BankError> {
        self.require_writable("build a pack")?;
        let root = self.local_root("build a pack")?;
        let v = self.resolve(r)?;
        let index = self.catalog.disk_index(&v)?;
        build(&*self.store, root, &v, &index, level, jobs, progress)
    }
}

/// The serialised index of version `v`'s pack in the bank at `bank_dir`; `None` when
/// there is none. The index is checked (a damaged one is an error).
pub fn read_index(bank_dir: &Path, v: VersionId) -> Result<Option<(PackIndex, Vec<u8>)>, String> {
    let path = pack_path(bank_dir, v);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    let mut head = [0u8; pack::HEADER_LEN];
    f.read_exact_at(&mut head, 0)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let len = PackIndex::index_len(&head).map_err(|e| format!("{}: {e}", path.display()))?;
    let file_len = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if len as u64 > file_len {
        return Err(format!("{}: the pack is truncated", path.display()));
    }
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, 0)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let idx = PackIndex::from_bytes(&b).map_err(|e| format!("{}: {e}", path.display()))?;
    if idx.version != v {
        return Err(format!(
            "{}: the pack is of version {}",
            path.display(),
            idx.version.to_hex()
        ));
    }
    if idx.file_len() != file_len {
        return Err(format!(
            "{}: the pack is {} ({file_len} bytes; its index says {})",
            path.display(),
            if file_len < idx.file_len() {
                "truncated"
            } else {
                "too long"
            },
            idx.file_len()
        ));
    }
    Ok(Some((idx, b)))
}

/// The parsed indexes of the last few packs read from a bank directory, each kept
/// while its file stays the same (inode, length, modification time): a bank server
/// answers every segment request of an export from one parse of the index, not one
/// per segment.
#[derive(Default)]
pub struct IndexCache {
    entries: Mutex<Vec<CachedIndex>>,
    parses: std::sync::atomic::AtomicU64,
}

/// A pack's index and its serialised form, shared by the requests that read it.
pub type PackIndexBytes = std::sync::Arc<(PackIndex, Vec<u8>)>;
struct CachedIndex {
    version: VersionId,
    /// The file it was read from: inode, length, modification time (s, ns).
    file: (u64, u64, i64, i64),
    index: PackIndexBytes,
}

/// Indexes an [`IndexCache`] keeps.
const CACHED_INDEXES: usize = 8;

impl IndexCache {
    pub fn new() -> IndexCache {
        IndexCache::default()
    }

    /// [`read_index`], from the cache when the file has not changed since.
    pub fn get(&self, bank_dir: &Path, v: VersionId) -> Result<Option<PackIndexBytes>, String> {
        use std::os::unix::fs::MetadataExt;
        let path = pack_path(bank_dir, v);
        let file = match fs::metadata(&path) {
            Ok(m) => (m.ino(), m.len(), m.mtime(), m.mtime_nsec()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = entries
                .iter()
                .position(|e| e.version == v && e.file == file)
            {
                let hit = entries.remove(at);
                let index = hit.index.clone();
                entries.insert(0, hit);
                return Ok(Some(index));
            }
        }
        self.parses.fetch_add(1, Ordering::Relaxed);
        let Some(read) = read_index(bank_dir, v)? else {
            return Ok(None);
        };
        let index: PackIndexBytes = std::sync::Arc::new(read);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|e| e.version != v);
        entries.insert(
            0,
            CachedIndex {
                version: v,
                file,
                index: index.clone(),
            },
        );
        entries.truncate(CACHED_INDEXES);
        Ok(Some(index))
    }

    /// How many times an index was read and parsed from its file.
    pub fn parses(&self) -> u64 {
        self.parses.load(Ordering::Relaxed)
    }
}

/// The frame of segment `seg` of version `v`'s pack.
pub fn read_segment(bank_dir: &Path, v: VersionId, seg: &Segment) -> std::io::Result<Vec<u8>> {
    let f = File::open(pack_path(bank_dir, v))?;
    let mut b = vec![0u8; seg.frame_len as usize];
    f.read_exact_at(&mut b, seg.offset)?;
    Ok(b)
}

/// Removes the packs of versions for which `keep` is false, and temp files of builds
/// that ended more than an hour ago; the number of packs removed.
pub fn prune(bank_dir: &Path, keep: &dyn Fn(VersionId) -> bool) -> Result<u64, BankError> {
    let mut removed = 0;
    for e in entries(bank_dir)? {
        let name = e.file_name().to_string_lossy().into_owned();
        let old_tmp = name.starts_with(".tmp-")
            && e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600));
        let stale = name
            .strip_suffix(".pack")
            .and_then(|hex| hex.parse::<VersionId>().ok())
            .is_some_and(|v| !keep(v));
        if old_tmp || stale {
            match fs::remove_file(e.path()) {
                Ok(()) => removed += stale as u64,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(BankError::io("remove", e.path(), err)),
            }
        }
    }
    Ok(removed)
}

/// What `<bank_dir>/packs/` holds (nothing when it does not exist).
fn entries(bank_dir: &Path) -> Result<Vec<fs::DirEntry>, BankError> {
    let dir = bank_dir.join(PACKS_DIR);
    match fs::read_dir(&dir) {
        Ok(e) => Ok(e.flatten().collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(BankError::io("list", &dir, e)),
    }
}

/// The number of packs in the bank at `bank_dir` and their bytes.
pub fn usage(bank_dir: &Path) -> Result<(u64, u64), BankError> {
    let (mut n, mut bytes) = (0, 0);
    for e in entries(bank_dir)? {
        if e.file_name().to_string_lossy().ends_with(".pack")
            && let Ok(m) = e.metadata()
        {
            n += 1;
            bytes += m.len();
        }
    }
    Ok((n, bytes))
}

/// The packs in a bank directory, as a [`PackSource`].
pub struct DirPacks(pub PathBuf);

impl PackSource for DirPacks {
    fn pack_index(
        &self,
        _machine: &str,
        version: VersionId,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        read_index(&self.0, version)
            .map(|o| o.map(|(_, b)| b))
            .map_err(StoreError::Remote)
    }

    fn pack_segment(
        &self,
        _machine: &str,
        version: VersionId,
        _n: usize,
        seg: &Segment,
    ) -> Result<Vec<u8>, StoreError> {
        read_segment(&self.0, version, seg).map_err(|e| StoreError::Io {
            action: "read",
            path: pack_path(&self.0, version),
            source: e,
        })
    }
}

/// What an export took from a pack.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PackUse {
    /// Segments fetched, and their bytes.
    pub segments: u64,
    pub bytes: u64,
    /// Places of the disk written from the pack's chunks.
    pub chunks: u64,
    /// Why the export went on from the chunks instead, when the pack failed.
    pub fell_back: Option<String>,
}

/// Where [`walk`] hands each place of the disk: its number and its bytes (`None` for
/// zeros).
pub(crate) type Place<'a> = dyn FnMut(usize, Option<&[u8]>) -> Result<(), BankError> + 'a;

/// Most plaintext [`walk`] keeps of chunks the disk uses again later.
const KEEP_REPEATS: usize = 64 << 20;

/// Walks the disk's places in order, handing each to `out` (`None` for a zero place):
/// each chunk's first use comes from the pack (segments fetched `jobs` at a time, each
/// checked against its ids), a later use from memory or the store. Stops at the first
/// place the pack cannot give, with the reason in [`PackUse::fell_back`]; returns what
/// it used and the first place not handed over (the disk's end when it completed).
/// An error of `out`, or of the store for a repeated chunk, is returned as is.
#[allow(clippy::too_many_arguments)]
pub(crate) fn walk(
    src: &dyn PackSource,
    store: &dyn ChunkStore,
    v: &VersionInfo,
    index: &DiskIndex,
    idx: &PackIndex,
    jobs: usize,
    progress: &dyn Progress,
    out: &mut Place<'_>,
) -> Result<(PackUse, usize), BankError> {
    let mut used = PackUse::default();
    let places = index.chunks.len();
    // The pack must be the version's chunks in first-use order.
    let packed = idx.segments.iter().flat_map(|s| s.chunks.iter().copied());
    if idx.version != v.id || !packed.eq(first_uses(index)) {
        used.fell_back = Some(format!(
            "the pack does not hold the chunks of {}@{} in order",
            v.machine,
            v.id.short()
        ));
        return Ok((used, 0));
    }
    // The first and the last place of every chunk.
    let mut uses: HashMap<ChunkId, (usize, usize)> = HashMap::new();
    for (i, c) in index.chunks.iter().enumerate() {
        if let Some(id) = c {
            uses.entry(*id).or_insert((i, i)).1 = i;
        }
    }
    let machine = v.machine.to_string();
    let n = idx.segments.len();
    // A reader fetches a segment, then decodes it: twice the cores keeps the link
    // busy while some decode.
    let window = (2 * jobs).max(4);
    let next_seg = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let consumed = Mutex::new(0usize);
    let room = Condvar::new();
    std::thread::scope(|s| {
        // Made in the scope, so that the writer ending any way (a panic too) drops the
        // receiver, and a reader blocked on a full channel stops.
        // A segment's number, and its plaintext with its frame's length, or why not.
        type Fetched = (usize, Result<(Vec<u8>, u64), String>);
        let (tx, rx) = mpsc::sync_channel::<Fetched>(window);
        for _ in 0..window {
            let tx = tx.clone();
            let (next_seg, stop, consumed, room, machine) =
                (&next_seg, &stop, &consumed, &room, &machine);
            s.spawn(move || {
                loop {
                    let k = next_seg.fetch_add(1, Ordering::Relaxed);
                    if k >= n {
                        return;
                    }
                    // No more than `window` segments ahead of the writer.
                    let mut c = consumed.lock().unwrap_or_else(|p| p.into_inner());
                    while k >= *c + window && !stop.load(Ordering::Relaxed) {
                        c = room.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                    drop(c);
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let seg = &idx.segments[k];
                    let r = src
                        .pack_segment(machine, idx.version, k, seg)
                        .map_err(|e| e.to_string())
                        .and_then(|f| {
                            pack::decode_segment(k, seg, &f)
                                .map(|p| (p, f.len() as u64))
                                .map_err(|e| e.to_string())
                        });
                    if tx.send((k, r)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let _stop = StopReaders {
            stop: &stop,
            consumed: &consumed,
            room: &room,
        };
        let result = (|| -> Result<(PackUse, usize), BankError> {
            let mut ahead: BTreeMap<usize, Result<Vec<u8>, String>> = BTreeMap::new();
            // The segment being written: its plaintext, its chunks, and the next one's
            // place in that list and offset (none yet: an empty list).
            let mut cur: (Vec<u8>, &[(ChunkId, u32)], usize, usize) = (Vec::new(), &[], 0, 0);
            let mut seg_no = 0usize;
            let mut kept: HashMap<ChunkId, Vec<u8>> = HashMap::new();
            let mut kept_bytes = 0usize;
            for place in 0..places {
                let Some(id) = index.chunks[place] else {
                    out(place, None)?;
                    progress.advance(index.chunk_len(place) as u64);
                    continue;
                };
                let (first, last) = uses[&id];
                if place != first {
                    // A later use of a chunk.
                    let read;
                    let plain: &[u8] = match kept.get(&id) {
                        Some(p) => p,
                        None => {
                            read = store.read(&id).map_err(|e| BankError::Damaged {
                                machine: v.machine.clone(),
                                version: v.id,
                                source: Box::new(e),
                            })?;
                            &read
                        }
                    };
                    if let Some(w) = crate::WrongLength::disk(index, place, id, plain.len()) {
                        return Err(BankError::WrongLength {
                            machine: v.machine.clone(),
                            version: v.id,
                            wrong: Box::new(w),
                        });
                    }
                    out(place, Some(plain))?;
                    used.chunks += 1;
                    progress.advance(plain.len() as u64);
                    if last == place
                        && let Some(p) = kept.remove(&id)
                    {
                        kept_bytes -= p.len();
                    }
                    continue;
                }
                // A first use: the next chunk of the pack.
                let range = loop {
                    if let Some(&(_, len)) = cur.1.get(cur.2) {
                        let r = cur.3..cur.3 + len as usize;
                        cur.2 += 1;
                        cur.3 = r.end;
                        break r;
                    }
                    // The next segment, in order.
                    let got = loop {
                        if let Some(r) = ahead.remove(&seg_no) {
                            break r;
                        }
                        match rx.recv() {
                            Ok((k, r)) => {
                                let r = r.map(|(p, len)| {
                                    used.segments += 1;
                                    used.bytes += len;
                                    p
                                });
                                ahead.insert(k, r);
                            }
                            Err(_) => break Err("the pack's readers stopped".into()),
                        }
                    };
                    match got {
                        Ok(p) => {
                            cur = (p, &idx.segments[seg_no].chunks, 0, 0);
                            seg_no += 1;
                            *consumed.lock().unwrap_or_else(|p| p.into_inner()) = seg_no;
                            room.notify_all();
                        }
                        Err(e) => {
                            used.fell_back = Some(e);
                            return Ok((used, place));
                        }
                    }
                };
                let plain = &cur.0[range];
                out(place, Some(plain))?;
                used.chunks += 1;
                progress.advance(plain.len() as u64);
                if last != place && kept_bytes + plain.len() <= KEEP_REPEATS {
                    kept_bytes += plain.len();
                    kept.insert(id, plain.to_vec());
                }
            }
            Ok((used, places))
        })();
        // Stop the readers, then unblock any sending, before the scope joins them.
        drop(_stop);
        drop(rx);
        result
    })
}

/// Stops [`walk`]'s readers however its writer ends, a panic too. `stop` is set under
/// the window's lock, which a reader holds from its check of `stop` until it waits: so
/// no reader misses the wake-up and waits for ever.
struct StopReaders<'a> {
    stop: &'a AtomicBool,
    consumed: &'a Mutex<usize>,
    room: &'a Condvar,
}

impl Drop for StopReaders<'_> {
    fn drop(&mut self) {
        let held = self.consumed.lock().unwrap_or_else(|p| p.into_inner());
        self.stop.store(true, Ordering::Relaxed);
        drop(held);
        self.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbank_store::MemStore;

    /// Segments served from memory, each `n` as built.
    struct MemPacks(Vec<Vec<u8>>);
    impl PackSource for MemPacks {
        fn pack_index(&self, _: &str, _: VersionId) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(None)
        }
        fn pack_segment(
            &self,
            _: &str,
            _: VersionId,
            n: usize,
            _: &Segment,
        ) -> Result<Vec<u8>, StoreError> {
            Ok(self.0[n].clone())
        }
    }

    /// A disk of `places` distinct 4 KiB chunks, one per segment, its pack and its
    /// version.
    fn disk(places: usize) -> (DiskIndex, PackIndex, MemPacks, VersionInfo) {
        let plains: Vec<Vec<u8>> = (0..places as u32)
            .map(|i| i.to_le_bytes().repeat(1024))
            .collect();
        let index = DiskIndex {
            chunk_size: 4096,
            disk_size: 4096 * places as u64,
            chunks: plains.iter().map(|p| Some(ChunkId::of(p))).collect(),
        };
        let frames: Vec<Vec<u8>> = plains
            .iter()
            .map(|p| pack::compress_segment(&[p], 1).unwrap())
            .collect();
        let id = VersionId::random();
        let idx = PackIndex {
            version: id,
            segments: plains
                .iter()
                .zip(&frames)
                .map(|(p, f)| Segment {
                    offset: 0,
                    frame_len: f.len() as u64,
                    plain_len: p.len() as u32,
                    chunks: vec![(ChunkId::of(p), p.len() as u32)],
                })
                .collect(),
        };
        let v = VersionInfo {
            id,
            machine: "lab/m".parse().unwrap(),
            parent: None,
            created_ms: 0,
            disk_size: index.disk_size,
            chunk_size: index.chunk_size,
            stats: Default::default(),
            config: None,
            streams: Vec::new(),
        };
        (index, idx, MemPacks(frames), v)
    }

    /// [`walk`] over `disk`'s pack from memory, with `jobs`.
    fn walk_mem(
        (index, idx, src, v): &(DiskIndex, PackIndex, MemPacks, VersionInfo),
        jobs: usize,
        out: &mut Place<'_>,
    ) -> Result<(PackUse, usize), BankError> {
        walk(
            src,
            &MemStore::new(),
            v,
            index,
            idx,
            jobs,
            &crate::NoProgress,
            out,
        )
    }

    /// Runs `f` on a thread; false if it has not ended within 60 s.
    fn ends(f: impl FnOnce() + Send + 'static) -> bool {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(60)).is_ok()
    }

    #[test]
    fn the_readers_stop_when_the_writer_fails_or_panics() {
        // Readers run ahead to the window's edge and wait there; the writer then ends
        // at its first place, by an error and by a panic.
        for panics in [false, true] {
            assert!(
                ends(move || {
                    let r = walk_mem(&disk(64), 1, &mut |_, _| {
                        // Give the readers time to fill the window and wait.
                        std::thread::sleep(Duration::from_millis(200));
                        if panics {
                            panic!("the writer fails");
                        }
                        Err(BankError::io("write", "/x", std::io::Error::other("full")))
                    });
                    assert!(r.is_err());
                }),
                "walk did not end when its writer {} (panics: {panics})",
                if panics { "panicked" } else { "failed" }
            );
        }
    }

    #[test]
    fn the_index_cache_parses_a_pack_once_until_its_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (index, _, _, v) = disk(20);
        let store = MemStore::new();
        for i in 0..20u32 {
            let p = i.to_le_bytes().repeat(1024);
            store.put(&mbank_core::chunk::encode(&p, 3)).unwrap();
        }
        let cache = IndexCache::new();
        assert!(cache.get(dir.path(), v.id).unwrap().is_none());
        build(&store, dir.path(), &v, &index, 3, 1, &crate::NoProgress).unwrap();
        let a = cache.get(dir.path(), v.id).unwrap().unwrap();
        let b = cache.get(dir.path(), v.id).unwrap().unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        assert_eq!(cache.parses(), 1);
        // Built again (a new file): read again.
        build(&store, dir.path(), &v, &index, 5, 1, &crate::NoProgress).unwrap();
        let c = cache.get(dir.path(), v.id).unwrap().unwrap();
        assert_eq!(cache.parses(), 2);
        assert_eq!(c.0.segments.len(), 1);
        // Gone: none, and a damaged one is an error.
        let path = pack_path(dir.path(), v.id);
        let mut bytes = fs::read(&path).unwrap();
        bytes[45] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(cache.get(dir.path(), v.id).is_err());
        fs::remove_file(&path).unwrap();
        assert!(cache.get(dir.path(), v.id).unwrap().is_none());
    }

    #[test]
    fn every_place_is_handed_over_once_in_order() {
        let d = disk(50);
        let mut seen = Vec::new();
        let (used, next) = walk_mem(&d, 2, &mut |p, b| {
            assert_eq!(b.map(ChunkId::of), d.0.chunks[p]);
            seen.push(p);
            Ok(())
        })
        .unwrap();
        assert_eq!(next, 50);
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        assert_eq!((used.segments, used.chunks, used.fell_back), (50, 50, None));
    }
}
