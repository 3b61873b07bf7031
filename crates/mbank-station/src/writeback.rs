//! **Write-back**: while a session runs, the chunks the guest wrote go to the bank in
//! the background, so that its check-in (or suspend) sends only what changed since.
//!
//! - **What**: each chunk written since the thread last took it ([`Disk::take_changed`]),
//!   as it is in the overlay now (over its base chunk, like check-in assembles it). The
//!   guest may be writing it meanwhile: the chunk sent may then be one the check-in
//!   never names, which costs a transfer and nothing else (chunks are named by their
//!   content, and the write marks the chunk for the next pass). Write-back makes no
//!   version. It records what it stored: each chunk's id and the checksums of the
//!   overlay blocks it was made from ([`Disk::written_back`]). The check-in takes the
//!   id of a chunk nothing wrote since, whose blocks' checksums are the ones recorded
//!   at their flush, without reading it again; it assembles and hashes every other
//!   dirty chunk as before, and asks the bank which it has (`touch_many`).
//! - **When**: in batches of [`BATCH`] chunks, never while a guest read waits on a fetch
//!   ([`Disk::guest_waiting`]), under a bandwidth cap (bytes sent per second; default
//!   [`DEFAULT_MBIT`] Mbit/s, `--writeback-mbit`, `MBANK_WRITEBACK_MBIT`; 0 turns it off).
//! - **Memory too**: a session with lazy memory writes its guest's RAM back the same
//!   way ([`crate::memory::LazyRam::start_writeback`]), under the same cap: both
//!   threads pay one [`Pacer`].
//! - **Safe from GC**: the session registers a writer in the bank for its whole life
//!   (held until after its check-in commits), so every chunk it writes back is newer
//!   than the GC cutoff while the session lives (the scheme in `mbank-store`). Each
//!   batch is flushed to the store before the next; the writer is kept fresh (heartbeat)
//!   for banks on other hosts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mbank_bank::WriterGuard;
use mbank_core::ChunkId;
use mbank_core::chunk::encode_with_id;
use mbank_store::{ChunkStore, StoreError};

use crate::device::{Disk, WrittenBack, assemble_chunk};
use crate::live::Warn;

/// The default bandwidth cap of write-back, in Mbit/s: a quarter of the lab's
/// 100 Mbit/s link.
pub const DEFAULT_MBIT: u64 = 25;
/// The environment variable that sets the cap in Mbit/s; `0` turns write-back off.
pub const ENV_MBIT: &str = "MBANK_WRITEBACK_MBIT";
/// Chunks per batch: one `have` query and one upload each.
pub const BATCH: usize = 32;
/// How often the thread looks for newly written chunks.
const TICK: Duration = Duration::from_millis(100);

/// The cap in bytes per second: `mbit` if given, else `$MBANK_WRITEBACK_MBIT`, else
/// [`DEFAULT_MBIT`]; `None` when 0 (off).
pub fn cap(mbit: Option<u64>) -> Option<u64> {
    let m = mbit
        .or_else(|| std::env::var(ENV_MBIT).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(DEFAULT_MBIT);
    (m > 0).then(|| m.saturating_mul(1_000_000) / 8)
}

/// The bandwidth cap shared by a session's write-back threads (disk and RAM): each
/// pays for what it sent, and waits until the link's share is free again.
pub struct Pacer {
    bytes_per_second: u64,
    /// When the bytes sent so far have drained at the cap.
    free_at: Mutex<std::time::Instant>,
}

impl Pacer {
    pub fn new(bytes_per_second: u64) -> Arc<Pacer> {
        Arc::new(Pacer {
            bytes_per_second: bytes_per_second.max(1),
            free_at: Mutex::new(std::time::Instant::now()),
        })
    }

    /// Accounts `bytes` sent now; returns how long the sender waits before its next
    /// batch (until every thread's bytes so far have drained at the cap).
    pub fn paid(&self, bytes: u64) -> Duration {
        let now = std::time::Instant::now();
        let mut at = self.free_at.lock().expect("pacer lock");
        *at = (*at).max(now) + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        *at - now
    }
}

/// Sleeps `d` in ticks; false if `stop` was set meanwhile.
pub(crate) fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let mut left = d;
    while !left.is_zero() {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let t = left.min(TICK);
        std::thread::sleep(t);
        left -= t;
    }
    !stop.load(Ordering::Relaxed)
}

/// Starts the write-back of `disk` into `store` under `pacer`'s cap, until `stop`;
/// `writer` is the session's writer registration (kept fresh here).
pub fn spawn(
    disk: Arc<Disk>,
    store: Arc<dyn ChunkStore>,
    writer: Arc<Mutex<WriterGuard>>,
    pacer: Arc<Pacer>,
    zstd_level: i32,
    stop: Arc<AtomicBool>,
    say: Warn,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut warned = false;
        let mut beat = std::time::Instant::now();
        while nap(TICK, &stop) {
            if beat.elapsed() > Duration::from_secs(60) {
                writer.lock().expect("writer lock").heartbeat();
                beat = std::time::Instant::now();
            }
            let changed = disk.take_changed();
            if changed.is_empty() {
                continue;
            }
            let map = disk.dirty_map();
            let mut rest = changed.as_slice();
            while !rest.is_empty() {
                // Behind the guest's reads.
                while disk.guest_waiting() && nap(Duration::from_millis(1), &stop) {}
                if stop.load(Ordering::Relaxed) {
                    rest.iter().for_each(|&i| disk.mark_changed(i));
                    return;
                }
                let (batch, more) = rest.split_at(rest.len().min(BATCH));
                rest = more;
                match send(&disk, &*store, &map, batch, zstd_level) {
                    Ok(sent) => {
                        if !nap(pacer.paid(sent), &stop) {
                            rest.iter().for_each(|&i| disk.mark_changed(i));
                            return;
                        }
                    }
                    Err(e) => {
                        batch.iter().for_each(|&i| disk.mark_changed(i));
                        if !warned {
                            say(format!(
                                "warning: the background write-back of {} failed: {e}; it tries \
                                 again, and check-in sends what it could not",
                                disk.meta.machine
                            ));
                            warned = true;
                        }
                        if !nap(Duration::from_secs(5), &stop) {
                            rest.iter().for_each(|&i| disk.mark_changed(i));
                            return;
                        }
                    }
                }
            }
        }
    })
}

/// Sends the chunks `batch` of `disk` (as the overlay holds them, over their base) that
/// the bank lacks, and flushes the store; returns the bytes sent.
fn send(
    disk: &Disk,
    store: &dyn ChunkStore,
    map: &crate::session::DirtyMap,
    batch: &[usize],
    zstd_level: i32,
) -> Result<u64, String> {
    let fetch = |id: &mbank_core::ChunkId| {
        disk.chunks()
            .fetch_verified(id)
            .map(Arc::unwrap_or_clone)
            .map_err(|e| e.to_string())
    };
    let path = disk.dir.overlay_path();
    let mut chunks = Vec::with_capacity(batch.len());
    // What each chunk was assembled from, recorded once it is durable in the bank.
    let mut sent = Vec::with_capacity(batch.len());
    for &i in batch {
        let mask = map.masks[i];
        if mask == 0 {
            continue;
        }
        let data = assemble_chunk(disk.overlay(), &path, &disk.base, map, i, &fetch)
            .map_err(|e| e.to_string())?;
        let sums = (0..64)
            .filter(|j| mask & (1 << j) != 0)
            .map(|j| crate::session::block_sum(&data[map.block_range(i, j)]))
            .collect();
        let id = if mbank_core::is_zero(&data) {
            None
        } else {
            let id = ChunkId::of(&data);
            chunks.push((id, data));
            Some(id)
        };
        sent.push((i, WrittenBack { id, mask, sums }));
    }
    let record = |sent: Vec<(usize, WrittenBack)>| {
        for (i, wb) in sent {
            disk.record_written_back(i, wb);
        }
    };
    let n = chunks.len();
    let (new, bytes) = send_missing(store, chunks, zstd_level)
        .map_err(|e| format!("send {n} chunks to the bank: {e}"))?;
    if new > 0 {
        store
            .flush()
            .map_err(|e| format!("flush the bank's store: {e}"))?;
    }
    record(sent);
    let c = &disk.counters;
    c.written_back_chunks.fetch_add(new, Ordering::Relaxed);
    c.written_back_bytes.fetch_add(bytes, Ordering::Relaxed);
    Ok(bytes)
}

/// Sends those of `chunks` (ids and plaintexts) the bank lacks: one `have` query, then
/// only those are compressed and uploaded, in one batch. Returns how many were sent and
/// their bytes as sent; the caller flushes the store. The disk's and the RAM's
/// write-back and the RAM's suspend send through it.
pub(crate) fn send_missing(
    store: &dyn ChunkStore,
    chunks: Vec<(ChunkId, Vec<u8>)>,
    zstd_level: i32,
) -> Result<(u64, u64), StoreError> {
    if chunks.is_empty() {
        return Ok((0, 0));
    }
    let ids: Vec<_> = chunks.iter().map(|(id, _)| *id).collect();
    let have = store.touch_many(&ids)?;
    let missing: Vec<_> = chunks
        .into_iter()
        .zip(have)
        .filter(|(_, h)| !h)
        .map(|((id, data), _)| encode_with_id(id, &data, zstd_level))
        .collect();
    if missing.is_empty() {
        return Ok((0, 0));
    }
    let bytes = missing.iter().map(|c| c.bytes.len() as u64).sum();
    store.put_many(&missing)?;
    Ok((missing.len() as u64, bytes))
}
