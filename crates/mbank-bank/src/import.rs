//! `import`: a disk image becomes a new version of a machine.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mbank_catalog::{CatalogError, CommitOutcome, NamedStream, VersionInfo, VersionStats, now_ms};
use mbank_core::chunk::{DEFAULT_ZSTD_LEVEL, decode, encode_with_id};
use mbank_core::{ChunkId, DEFAULT_CHUNK_SIZE, DiskIndex, MachineName, VersionId, is_zero};
use mbank_store::{ChunkStore, StoreError};
use serde::Serialize;

use crate::image::{ImageFormat, ImageSource, open_image};
use crate::{Bank, BankError, Progress, Unit, WriterGuard};

/// How to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Chunk size for a new machine; an existing machine keeps its own.
    pub chunk_size: Option<u32>,
    /// Force the image format instead of recognising it.
    pub format: Option<ImageFormat>,
    /// Worker threads for hashing, compression and I/O.
    pub jobs: usize,
    pub zstd_level: i32,
    /// Where a non-raw image is converted to raw first.
    pub temp_dir: PathBuf,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            chunk_size: None,
            format: None,
            jobs: crate::default_jobs(),
            zstd_level: DEFAULT_ZSTD_LEVEL,
            temp_dir: std::env::temp_dir(),
        }
    }
}

/// What an import did.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    pub machine: String,
    pub version: String,
    pub parent: Option<String>,
    /// False when another writer moved the head first: the version is kept, unhead.
    pub head_moved: bool,
    pub head: Option<String>,
    pub format: String,
    pub disk_size: u64,
    pub chunk_size: u32,
    pub bytes_read: u64,
    pub chunks_total: u64,
    pub chunks_zero: u64,
    pub chunks_new: u64,
    pub chunks_dedup: u64,
    pub bytes_stored: u64,
    pub seconds: f64,
}

/// What `import --repair` ([`Bank::repair_from_image`]) did.
#[derive(Clone, Debug, Serialize)]
pub struct RepairReport {
    pub machine: String,
    pub image: String,
    pub chunk_size: u32,
    pub chunks_total: u64,
    pub chunks_zero: u64,
    /// Chunks the bank had intact (counting each time the image repeats one).
    pub chunks_intact: u64,
    /// Chunks the bank had damaged (they failed their hash): rewritten from the image.
    pub chunks_repaired: u64,
    /// Chunks the bank lacked (`verify` had moved them aside, say): stored.
    pub chunks_stored: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

pub(crate) enum Outcome {
    Zero,
    New(ChunkId, u64),
    Dedup(ChunkId),
    /// The store had the chunk, damaged; it was rewritten (`repair` only).
    Repaired(ChunkId, u64),
}

/// How often a long import tells the catalog it is still alive.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// One chunk handed to [`Bank::write_version`]: its position in the index and its
/// plaintext, or `None` when the reader already knows it is all zeros.
pub type ChunkItem = (usize, Option<Vec<u8>>);

/// Where a new version's chunks come from.
pub struct VersionSource<'a> {
    /// What to record as the version's source, e.g. `import disk.raw`.
    pub description: String,
    /// The version this one is made from (its parent), or `None` for a first import.
    pub parent: Option<VersionId>,
    /// The head the writer saw when it began: the commit moves the head only if it is
    /// still this (compare-and-swap), else the version is kept beside it. For an import
    /// it is the parent; for a session started from an older version it is the head at
    /// the session's start, not the parent, so that its check-in moves the head when
    /// nobody else did.
    pub expected_head: Option<VersionId>,
    /// The index to start from: every entry not replaced by an item is kept as is.
    pub base: DiskIndex,
    /// The chunks that replace entries of `base`, in any order. Runs on its own thread.
    pub items: Box<dyn Iterator<Item = Result<ChunkItem, BankError>> + Send + 'a>,
    /// The bytes `items` will cover, for progress.
    pub total_bytes: u64,
    /// The new version's id; random when `None`. A caller that may repeat the same
    /// write after a crash (a station's check-in) fixes it, so the repeat is detected.
    pub id: Option<VersionId>,
    /// The machine configuration (JSON) stored with the version.
    pub config: Option<String>,
    /// Byte streams (memory state, kernel, initrd) stored with the version. Their
    /// chunks must already be durable in the bank, written under the same writer.
    pub streams: Vec<NamedStream>,
    /// Chunks and stored bytes the streams added to the bank, for the statistics.
    pub streams_stored: (u64, u64),
}

impl Bank {
    /// Imports the image at `path` as a new version of `machine`.
    pub fn import(
        &mut self,
        machine: &MachineName,
        path: &Path,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<ImportReport, BankError> {
        self.require_writable("import")?;
        let writer = self.begin_write(&format!("import {machine}"))?;
        let existing = self.catalog.machine(machine)?;
        let chunk_size = existing
            .as_ref()
            .map(|m| m.chunk_size)
            .or(opts.chunk_size)
            .unwrap_or(DEFAULT_CHUNK_SIZE);
        let image = open_image(path, opts.format, &opts.temp_dir)?;
        let base = DiskIndex::zeroed(image.len, chunk_size);
        let source = VersionSource {
            description: format!("import {}", path.display()),
            parent: existing.as_ref().and_then(|m| m.head),
            expected_head: existing.as_ref().and_then(|m| m.head),
            total_bytes: image.len,
            items: Box::new(image_items(path, &image, chunk_size as u64, image.len)),
            base,
            id: None,
            config: None,
            streams: Vec::new(),
            streams_stored: (0, 0),
        };
        let format = image.format.name();
        let mut report = self.write_version(machine, source, &writer, opts, progress)?;
        report.format = format.into();
        Ok(report)
    }

    /// Repairs the bank from the image at `path`, an image `machine` was made from (or
    /// shares chunks with): re-reads and re-hashes every chunk of the image the bank
    /// has, rewrites from the image those that fail (an atomic replacement of the
    /// damaged file), and stores those the bank lacks. Makes no version and moves no
    /// head. Slower than an import, which trusts a chunk it finds present: this reads
    /// back every shared chunk, like `verify`. On the bank's host only: a bank server
    /// keeps a chunk it has rather than take a copy from a client.
    pub fn repair_from_image(
        &mut self,
        machine: &MachineName,
        path: &Path,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<RepairReport, BankError> {
        self.require_writable("repair")?;
        self.local_root("import --repair")?;
        let started = Instant::now();
        let m = self
            .catalog
            .machine(machine)?
            .ok_or_else(|| CatalogError::MachineNotFound(machine.to_string()))?;
        let writer = self.begin_write(&format!("repair {machine}"))?;
        let image = open_image(path, opts.format, &opts.temp_dir)?;
        let mut index = DiskIndex::zeroed(image.len, m.chunk_size);
        let mut stats = VersionStats::default();
        let what = format!("repairing {machine} from {}", path.display());
        progress.start(&what, image.len, Unit::Bytes);
        let items = Box::new(image_items(path, &image, m.chunk_size as u64, image.len));
        let result = store_chunks(
            items,
            &mut index,
            &*self.store,
            opts,
            true,
            progress,
            &mut stats,
            || writer.heartbeat(),
        );
        progress.finish();
        let (repaired, repaired_bytes) = result?;
        self.store.flush()?;
        Ok(RepairReport {
            machine: machine.to_string(),
            image: path.display().to_string(),
            chunk_size: m.chunk_size,
            chunks_total: index.chunks.len() as u64,
            chunks_zero: stats.chunks_zero,
            chunks_intact: stats.chunks_dedup,
            chunks_repaired: repaired,
            chunks_stored: stats.chunks_new,
            bytes_written: stats.bytes_stored + repaired_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Stores the chunks of `source` (hashing, compressing and skipping what the bank
    /// has on `opts.jobs` threads), flushes the store, and commits a version whose
    /// parent is `source.parent`, moving the head by compare-and-swap. The caller keeps
    /// `writer` registered until this returns.
    pub fn write_version(
        &mut self,
        machine: &MachineName,
        source: VersionSource<'_>,
        writer: &WriterGuard,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<ImportReport, BankError> {
        let started = Instant::now();
        let VersionSource {
            description,
            parent,
            expected_head,
            mut base,
            items,
            total_bytes,
            id,
            config,
            streams,
            streams_stored,
        } = source;
        let mut stats = VersionStats {
            source: description.clone(),
            chunks_total: base.chunks.len() as u64,
            ..Default::default()
        };
        progress.start(&description, total_bytes, Unit::Bytes);
        let result = store_chunks(
            items,
            &mut base,
            &*self.store,
            opts,
            false,
            progress,
            &mut stats,
            || writer.heartbeat(),
        );
        progress.finish();
        result?;
        if parent.is_none() {
            // A first version made from another's chunks or an empty disk (`create`):
            // the chunks no item covered come from the base as they are, zero or shared,
            // so that zero + new + dedup = total as for an import.
            let covered = stats.chunks_zero + stats.chunks_new + stats.chunks_dedup;
            let untouched = stats.chunks_total.saturating_sub(covered);
            let zeros = base.chunks.iter().filter(|c| c.is_none()).count() as u64;
            let untouched_zero = zeros.saturating_sub(stats.chunks_zero).min(untouched);
            stats.chunks_zero += untouched_zero;
            stats.chunks_dedup += untouched - untouched_zero;
        }
        stats.chunks_new += streams_stored.0;
        stats.bytes_stored += streams_stored.1;
        let index = base;
        // Invariant 1: chunks durable, then index + version, then head.
        self.store.flush()?;
        stats.seconds = started.elapsed().as_secs_f64();
        let info = VersionInfo {
            id: id.unwrap_or_else(VersionId::random),
            machine: machine.clone(),
            parent,
            created_ms: now_ms(),
            disk_size: index.disk_size,
            chunk_size: index.chunk_size,
            stats: stats.clone(),
            config,
            streams: Vec::new(),
        };
        let outcome = self
            .catalog
            .commit_version(&info, &index, &streams, expected_head)
            .map_err(|e| self.catalog_err("commit the version to", e))?;
        let (head_moved, head) = match outcome {
            CommitOutcome::HeadMoved => (true, Some(info.id)),
            CommitOutcome::Kept { head } => (false, head),
        };
        Ok(ImportReport {
            machine: machine.to_string(),
            version: info.id.to_hex(),
            parent: parent.map(|p| p.to_hex()),
            head_moved,
            head: head.map(|h| h.to_hex()),
            format: "raw".into(),
            disk_size: index.disk_size,
            chunk_size: index.chunk_size,
            bytes_read: stats.bytes_read,
            chunks_total: stats.chunks_total,
            chunks_zero: stats.chunks_zero,
            chunks_new: stats.chunks_new,
            chunks_dedup: stats.chunks_dedup,
            bytes_stored: stats.bytes_stored,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The chunks of an image, in order, for a disk of `disk_len` bytes (at least the
/// image's length; what lies past the image is zeros). Holes (per `SEEK_DATA`) become
/// zero items without I/O.
pub(crate) fn image_items<'a>(
    path: &'a Path,
    image: &'a ImageSource,
    cs: u64,
    disk_len: u64,
) -> impl Iterator<Item = Result<ChunkItem, BankError>> + Send + 'a {
    let n = DiskIndex::chunk_count(disk_len, cs as u32) as usize;
    let mut data_at: Option<u64> = Some(0);
    (0..n).map(move |i| {
        let off = i as u64 * cs;
        let len = index_chunk_len(disk_len, cs, i);
        if off >= image.len {
            return Ok((i, None));
        }
        if data_at.is_some_and(|d| d < off) {
            data_at = image.next_data(off);
        }
        if data_at.is_none_or(|d| d >= off + len as u64) {
            return Ok((i, None));
        }
        let mut buf = vec![0u8; len];
        let have = len.min((image.len - off) as usize);
        image
            .file
            .read_exact_at(&mut buf[..have], off)
            .map_err(|e| BankError::Image {
                path: path.to_path_buf(),
                why: format!("reading {len} bytes at offset {off} failed: {e}"),
            })?;
        Ok((i, Some(buf)))
    })
}

/// Runs `items` on one reader thread, hashes and stores on `jobs` workers, and fills
/// `index` on the calling thread. With `repair`, every chunk the store has is read back
/// and rewritten if damaged; returns the chunks and bytes so rewritten (counted in
/// `stats` as already in the bank).
#[allow(clippy::too_many_arguments)]
fn store_chunks(
    items: Box<dyn Iterator<Item = Result<ChunkItem, BankError>> + Send + '_>,
    index: &mut DiskIndex,
    store: &dyn ChunkStore,
    opts: &ImportOptions,
    repair: bool,
    progress: &dyn Progress,
    stats: &mut VersionStats,
    mut heartbeat: impl FnMut(),
) -> Result<(u64, u64), BankError> {
    let jobs = opts.jobs.max(1);
    let cs = index.chunk_size as u64;
    let abort = &AtomicBool::new(false);
    let seen = &Mutex::new(HashSet::<ChunkId>::new());
    // Chunks travel in batches, so that a bank server is asked which it lacks once
    // per batch rather than once per chunk.
    let (work_tx, work_rx) = mpsc::sync_channel::<Vec<(usize, Vec<u8>)>>(jobs * 2);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, u64, Result<Outcome, BankError>)>();
    std::thread::scope(|s| -> Result<(u64, u64), BankError> {
        let reader_done = done_tx.clone();
        s.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            for item in items {
                if abort.load(Ordering::Relaxed) {
                    return;
                }
                match item {
                    Ok((i, None)) => {
                        let _ = reader_done.send((i, 0, Ok(Outcome::Zero)));
                    }
                    Ok((i, Some(buf))) => {
                        batch.push((i, buf));
                        if batch.len() == BATCH
                            && work_tx
                                .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                                .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = reader_done.send((usize::MAX, 0, Err(e)));
                        return;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = work_tx.send(batch);
            }
        });
        for _ in 0..jobs {
            let done = done_tx.clone();
            let work_rx = &work_rx;
            s.spawn(move || {
                loop {
                    let next = work_rx.lock().expect("work queue poisoned").recv();
                    let Ok(batch) = next else { return };
                    if abort.load(Ordering::Relaxed) {
                        continue; // drain, so the reader is never stuck
                    }
                    for (i, read, r) in store_batch(batch, store, seen, opts.zstd_level, repair) {
                        if done.send((i, read, r)).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        drop(done_tx);
        let mut first_err = None;
        let mut repaired = (0, 0);
        let mut last_beat = Instant::now();
        for (i, read, r) in done_rx {
            if i < index.chunks.len() {
                progress.advance(index_chunk_len(index.disk_size, cs, i) as u64);
            }
            stats.bytes_read += read;
            match r {
                Ok(Outcome::Zero) => {
                    stats.chunks_zero += 1;
                    index.chunks[i] = None;
                }
                Ok(Outcome::New(id, bytes)) => {
                    stats.chunks_new += 1;
                    stats.bytes_stored += bytes;
                    index.chunks[i] = Some(id);
                }
                Ok(Outcome::Dedup(id)) => {
                    stats.chunks_dedup += 1;
                    index.chunks[i] = Some(id);
                }
                Ok(Outcome::Repaired(id, bytes)) => {
                    stats.chunks_dedup += 1;
                    repaired.0 += 1;
                    repaired.1 += bytes;
                    index.chunks[i] = Some(id);
                }
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    first_err.get_or_insert(e);
                }
            }
            if last_beat.elapsed() > HEARTBEAT {
                heartbeat();
                last_beat = Instant::now();
            }
        }
        first_err.map_or(Ok(repaired), Err)
    })
}

fn index_chunk_len(disk_size: u64, cs: u64, i: usize) -> usize {
    (disk_size - i as u64 * cs).min(cs) as usize
}

/// Chunks a worker takes at a time.
pub(crate) const BATCH: usize = 32;

/// Hashes a batch, skips zeros and repeats, asks the store which it has (touching
/// those), and stores the rest. With `repair`, reads back each chunk the store has and
/// stores it again if its stored bytes fail their hash. One result per chunk, with the
/// bytes it read.
pub(crate) fn store_batch(
    batch: Vec<(usize, Vec<u8>)>,
    store: &dyn ChunkStore,
    seen: &Mutex<HashSet<ChunkId>>,
    level: i32,
    repair: bool,
) -> Vec<(usize, u64, Result<Outcome, BankError>)> {
    let mut out = Vec::with_capacity(batch.len());
    let mut ask = Vec::new();
    for (i, buf) in batch {
        let read = buf.len() as u64;
        if is_zero(&buf) {
            out.push((i, read, Ok(Outcome::Zero)));
            continue;
        }
        let id = ChunkId::of(&buf);
        if !seen.lock().expect("seen set poisoned").insert(id) {
            out.push((i, read, Ok(Outcome::Dedup(id))));
            continue;
        }
        ask.push((i, id, buf));
    }
    if ask.is_empty() {
        return out;
    }
    let ids: Vec<ChunkId> = ask.iter().map(|(_, id, _)| *id).collect();
    let have = match store.touch_many(&ids) {
        Ok(h) => h,
        Err(e) => {
            // The first error aborts the write; the batch's other chunks need no report.
            out.push((ask[0].0, 0, Err(BankError::Store(e))));
            return out;
        }
    };
    // With `repair`, which chunks the store has are damaged (or went missing since).
    let mut damaged = vec![false; ask.len()];
    if repair {
        for (k, (i, id, _)) in ask.iter().enumerate() {
            if !have[k] {
                continue;
            }
            damaged[k] = match store.get_raw(id) {
                Ok(raw) => decode(id, &raw).is_err(),
                Err(StoreError::Missing(_)) => true,
                Err(e) => {
                    out.push((*i, 0, Err(BankError::Store(e))));
                    return out;
                }
            };
        }
    }
    let (mut at, mut encoded) = (Vec::new(), Vec::new());
    for (((i, id, buf), have), damaged) in ask.into_iter().zip(have).zip(damaged) {
        let read = buf.len() as u64;
        if have && !damaged {
            out.push((i, read, Ok(Outcome::Dedup(id))));
        } else {
            at.push((i, read, damaged));
            encoded.push(encode_with_id(id, &buf, level));
        }
    }
    if encoded.is_empty() {
        return out;
    }
    match store.put_many(&encoded) {
        Ok(sizes) => out.extend(at.into_iter().zip(encoded.iter().zip(sizes)).map(
            |((i, read, damaged), (e, b))| {
                let o = if damaged {
                    Outcome::Repaired(e.id, b)
                } else {
                    Outcome::New(e.id, b)
                };
                (i, read, Ok(o))
            },
        )),
        // The first error aborts the write; the batch's other chunks need no report.
        Err(e) => out.push((at[0].0, 0, Err(BankError::Store(e)))),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoProgress;

    #[test]
    fn import_dedups_and_skips_zeros() {
        let d = tempfile::tempdir().unwrap();
        let mut bank = Bank::init(&d.path().join("bank")).unwrap();
        let cs = 4096usize;
        let mut img = vec![0u8; cs * 8 + 512];
        img[0..cs].fill(1);
        img[2 * cs..3 * cs].fill(1); // repeat of chunk 0
        img[5 * cs + 10] = 7;
        img[8 * cs..].fill(9); // short last chunk
        let p = d.path().join("a.raw");
        std::fs::write(&p, &img).unwrap();
        let m: MachineName = "alice/dev".parse().unwrap();
        let opts = ImportOptions {
            chunk_size: Some(cs as u32),
            ..Default::default()
        };
        let r = bank.import(&m, &p, &opts, &NoProgress).unwrap();
        assert_eq!(r.chunks_total, 9);
        assert_eq!(r.chunks_zero, 5);
        assert_eq!(r.chunks_new, 3);
        assert_eq!(r.chunks_dedup, 1);
        assert!(r.head_moved);
        let r2 = bank.import(&m, &p, &opts, &NoProgress).unwrap();
        assert_eq!(r2.chunks_new, 0);
        assert_eq!(r2.bytes_stored, 0);
        assert_eq!(r2.parent.as_deref(), Some(r.version.as_str()));
    }
}
