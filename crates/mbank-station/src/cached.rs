//! [`CachedStore`]: the station cache in front of the bank, the one way a session
//! gets a chunk it does not hold: the disk's reads and background fetches, the base
//! chunks a check-in merges with partly written ones, and the streams a session needs
//! (kernel, initrd, a saved memory state).
//!
//! A chunk comes from the cache when it holds a good copy, else from the bank
//! (verified on read by the store), and is then kept in the cache. Only one fetch per
//! chunk is in flight: a caller wanting a chunk another caller is fetching waits for
//! that fetch and shares its outcome. The flight map is held only to look up or insert
//! a flight, never across I/O.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use mbank_core::{ChunkId, MemoryIndex};
use mbank_store::{ChunkStore, StoreError};

use crate::cache::ChunkCache;

/// Chunks of a stream fetched at once by [`CachedStore::write_stream`].
pub const STREAM_WINDOW: usize = 32;

type FlightResult = Option<Result<Arc<Vec<u8>>, String>>;

#[derive(Default)]
struct Flight {
    done: Mutex<FlightResult>,
    cv: Condvar,
}

/// Why a fetch from the bank failed: the store's own error (this caller fetched), or
/// the one another caller's fetch of the same chunk got.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch a chunk from the bank: {0}")]
    Store(#[source] StoreError),
    #[error("cannot fetch a chunk from the bank: {0}")]
    Shared(String),
}

impl FetchError {
    /// True if the bank has no such chunk (only known to the caller that fetched).
    pub fn is_missing(&self) -> bool {
        matches!(self, FetchError::Store(StoreError::Missing(_)))
    }
}

/// A chunk got from the bank by [`CachedStore::fetch_missing`].
pub struct Fetched {
    pub data: Arc<Vec<u8>>,
    /// True if this call read it from the bank; false if it shared another caller's
    /// fetch.
    pub from_bank: bool,
}

/// Why a stream could not be written out by [`CachedStore::write_stream`].
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("chunk {id} of the stream cannot be fetched: {why}")]
    Fetch { id: ChunkId, why: String },
    #[error("chunk {id} is {got} bytes, but the stream's index says {want}")]
    Length { id: ChunkId, got: usize, want: u32 },
    #[error("cannot write the stream out: {0}")]
    Write(#[source] std::io::Error),
}

/// The station cache and the bank behind it; see the module docs.
pub struct CachedStore {
    cache: Arc<ChunkCache>,
    store: Arc<dyn ChunkStore>,
    flights: Mutex<HashMap<ChunkId, Arc<Flight>>>,
}

impl CachedStore {
    pub fn new(cache: Arc<ChunkCache>, store: Arc<dyn ChunkStore>) -> Self {
        CachedStore {
            cache,
            store,
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// The station cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The bank's store.
    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// The chunk from the cache or, failing that, from the bank (then cached).
    pub fn fetch(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>, FetchError> {
        if let Some(d) = self.cache.get(id) {
            return Ok(Arc::new(d));
        }
        Ok(self.fetch_missing(id, |_| true)?.data)
    }

    /// The chunk verified now: re-hashed from the cache (without counting a cache use),
    /// or fetched from the bank and not cached. For a check-in, which must not trust an
    /// earlier check and writes nothing on the station.
    pub fn fetch_verified(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>, FetchError> {
        if let Some(d) = self.cache.peek(id) {
            return Ok(Arc::new(d));
        }
        Ok(self.fetch_missing(id, |_| false)?.data)
    }

    /// Fetches chunk `id`, which the cache was just asked for and lacked, from the
    /// bank: once however many callers want it at the same time (the others wait for
    /// the one in flight). It is cached if `keep(its length)` says so (a chunk that
    /// does not fit its place in a disk is not kept); a full cache is no error.
    pub fn fetch_missing(
        &self,
        id: &ChunkId,
        keep: impl FnOnce(usize) -> bool,
    ) -> Result<Fetched, FetchError> {
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
                Ok(d) => Ok(Fetched {
                    data: d.clone(),
                    from_bank: false,
                }),
                Err(e) => Err(FetchError::Shared(e.clone())),
            };
        }
        // The caller found the cache without it, but a flight that ended between that
        // look and this one's start may have cached it since: look again (re-hashed,
        // as a check-in needs) before going to the bank.
        if let Some(d) = self.cache.peek(id) {
            let d = Arc::new(d);
            *flight.done.lock().expect("flight lock") = Some(Ok(d.clone()));
            flight.cv.notify_all();
            self.flights.lock().expect("flight lock").remove(id);
            return Ok(Fetched {
                data: d,
                from_bank: false,
            });
        }
        let result = match self.store.read(id) {
            Ok(plain) => {
                if keep(plain.len()) {
                    let _ = self.cache.insert(id, &plain);
                }
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
        result
            .map(|data| Fetched {
                data,
                from_bank: true,
            })
            .map_err(FetchError::Store)
    }

    /// Each of `ids` from the cache or, for those it lacks, from the bank in **one**
    /// batch request ([`ChunkStore::read_many`]: one `POST /v1/chunks/get` to a bank
    /// server), then cached; a chunk another caller is fetching is waited for, not
    /// asked again. If the batch fails, its chunks are fetched one by one, so only a
    /// bad chunk fails. One outcome per id, in order. For a fault of lazily loaded RAM,
    /// which reads several chunks at once.
    pub fn fetch_many(&self, ids: &[ChunkId]) -> Vec<Result<Arc<Vec<u8>>, FetchError>> {
        let mut out: Vec<Option<Result<Arc<Vec<u8>>, FetchError>>> = ids
            .iter()
            .map(|id| self.cache.get(id).map(|d| Ok(Arc::new(d))))
            .collect();
        // Claim the flights of the chunks nobody fetches yet.
        let mut lead: Vec<(usize, Arc<Flight>)> = Vec::new();
        let mut follow: Vec<(usize, Arc<Flight>)> = Vec::new();
        {
            let mut f = self.flights.lock().expect("flight lock");
            for (i, id) in ids.iter().enumerate() {
                if out[i].is_some() || lead.iter().any(|(j, _)| ids[*j] == *id) {
                    continue;
                }
                match f.get(id) {
                    Some(fl) => follow.push((i, fl.clone())),
                    None => {
                        let fl = Arc::new(Flight::default());
                        f.insert(*id, fl.clone());
                        lead.push((i, fl));
                    }
                }
            }
        }
        // A flight that ended since the look at the cache may have cached a chunk:
        // look again before going to the bank (as `fetch_missing` does).
        lead.retain(|(i, flight)| {
            let Some(d) = self.cache.peek(&ids[*i]) else {
                return true;
            };
            let d = Arc::new(d);
            *flight.done.lock().expect("flight lock") = Some(Ok(d.clone()));
            flight.cv.notify_all();
            self.flights.lock().expect("flight lock").remove(&ids[*i]);
            out[*i] = Some(Ok(d));
            false
        });
        if !lead.is_empty() {
            let want: Vec<ChunkId> = lead.iter().map(|(i, _)| ids[*i]).collect();
            let got: Vec<Result<Vec<u8>, StoreError>> = match self.store.read_many(&want) {
                Ok(all) if all.len() == want.len() => all.into_iter().map(Ok).collect(),
                _ => want.iter().map(|id| self.store.read(id)).collect(),
            };
            for ((i, flight), r) in lead.iter().zip(got) {
                let id = ids[*i];
                let r = r.map(|plain| {
                    let _ = self.cache.insert(&id, &plain);
                    Arc::new(plain)
                });
                *flight.done.lock().expect("flight lock") = Some(match &r {
                    Ok(d) => Ok(d.clone()),
                    Err(e) => Err(e.to_string()),
                });
                flight.cv.notify_all();
                self.flights.lock().expect("flight lock").remove(&id);
                out[*i] = Some(r.map_err(FetchError::Store));
            }
        }
        for (i, flight) in follow {
            let mut done = flight.done.lock().expect("flight lock");
            while done.is_none() {
                done = flight.cv.wait(done).expect("flight lock");
            }
            out[i] = Some(match done.as_ref().expect("set") {
                Ok(d) => Ok(d.clone()),
                Err(e) => Err(FetchError::Shared(e.clone())),
            });
        }
        // A chunk named twice in `ids` shares the first one's outcome.
        (0..ids.len())
            .map(|i| match out[i].take() {
                Some(r) => r,
                None => {
                    let first = ids.iter().position(|x| *x == ids[i]).expect("itself");
                    match &out[first] {
                        Some(Ok(d)) => Ok(d.clone()),
                        Some(Err(e)) => Err(FetchError::Shared(e.to_string())),
                        None => self.fetch(&ids[i]),
                    }
                }
            })
            .collect()
    }

    /// Writes the stream `idx` to `out` in order, getting its chunks with `get` (for a
    /// session, [`crate::device::Disk::fetch`], which records its use) on `jobs`
    /// threads (at most 8), [`STREAM_WINDOW`] chunks at a time; every chunk is checked
    /// against its length in the index. `done` counts the bytes written.
    pub fn write_stream<F>(
        idx: &MemoryIndex,
        mut out: impl Write,
        jobs: usize,
        done: &AtomicU64,
        get: F,
    ) -> Result<(), StreamError>
    where
        F: Fn(&ChunkId) -> Result<Arc<Vec<u8>>, String> + Sync,
    {
        type Slot = Mutex<Option<Result<Arc<Vec<u8>>, String>>>;
        let zeros = vec![0u8; mbank_core::cdc::MAX_SIZE as usize];
        for window in idx.runs.chunks(STREAM_WINDOW) {
            let next = AtomicUsize::new(0);
            let slots: Vec<Slot> = window.iter().map(|_| Mutex::new(None)).collect();
            std::thread::scope(|s| {
                for _ in 0..jobs.clamp(1, 8) {
                    s.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(run) = window.get(i) else { return };
                            if let Some(id) = &run.id {
                                *slots[i].lock().expect("slot") = Some(get(id));
                            }
                        }
                    });
                }
            });
            for (run, slot) in window.iter().zip(slots) {
                match (run.id, slot.into_inner().expect("slot")) {
                    (None, _) => {
                        let mut left = run.len as usize;
                        while left > 0 {
                            let k = left.min(zeros.len());
                            out.write_all(&zeros[..k]).map_err(StreamError::Write)?;
                            left -= k;
                        }
                    }
                    (Some(id), Some(Ok(data))) => {
                        if data.len() != run.len as usize {
                            return Err(StreamError::Length {
                                id,
                                got: data.len(),
                                want: run.len,
                            });
                        }
                        out.write_all(&data).map_err(StreamError::Write)?;
                    }
                    (Some(id), Some(Err(why))) => return Err(StreamError::Fetch { id, why }),
                    (Some(id), None) => {
                        return Err(StreamError::Fetch {
                            id,
                            why: "it was not fetched".into(),
                        });
                    }
                }
                done.fetch_add(run.len as u64, Ordering::Relaxed);
            }
        }
        out.flush().map_err(StreamError::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbank_core::MemoryRun;
    use mbank_core::chunk::encode_with_id;
    use mbank_store::MemStore;

    /// A store that counts reads and holds each one until told to go on, so that
    /// callers pile up behind one fetch.
    struct Slow {
        inner: MemStore,
        reads: AtomicU64,
    }

    impl ChunkStore for Slow {
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
            self.reads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
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

    #[test]
    fn one_fetch_per_chunk_in_flight_then_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(d.path(), 16 << 20).unwrap());
        let store = Arc::new(Slow {
            inner: MemStore::default(),
            reads: AtomicU64::new(0),
        });
        let data = vec![5u8; 70_000];
        let id = ChunkId::of(&data);
        store.put(&encode_with_id(id, &data, 1)).unwrap();
        let cs = CachedStore::new(cache, store.clone());
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| assert_eq!(*cs.fetch(&id).unwrap(), data));
            }
        });
        assert_eq!(
            store.reads.load(Ordering::SeqCst),
            1,
            "one read of the bank"
        );
        assert_eq!(*cs.fetch_verified(&id).unwrap(), data);
        assert_eq!(store.reads.load(Ordering::SeqCst), 1, "then the cache");
        // A check-in's fetch of a chunk the cache lacks does not fill the cache.
        let more = vec![6u8; 20_000];
        let more_id = ChunkId::of(&more);
        store.put(&encode_with_id(more_id, &more, 1)).unwrap();
        assert_eq!(*cs.fetch_verified(&more_id).unwrap(), more);
        assert!(!cs.cache().contains(&more_id));
        // A missing chunk is the store's error for the caller that fetched.
        let other = ChunkId::of(b"absent");
        assert!(cs.fetch(&other).unwrap_err().is_missing());
        // A caller that found the cache without a chunk, while another caller's fetch
        // of it ended and cached it, gets the cached copy: no second read of the bank.
        let late = vec![7u8; 30_000];
        let late_id = ChunkId::of(&late);
        store.put(&encode_with_id(late_id, &late, 1)).unwrap();
        cs.cache().insert(&late_id, &late).unwrap();
        let reads = store.reads.load(Ordering::SeqCst);
        let f = cs.fetch_missing(&late_id, |_| true).unwrap();
        assert_eq!(*f.data, late);
        assert!(!f.from_bank, "found in the cache on the second look");
        assert_eq!(
            store.reads.load(Ordering::SeqCst),
            reads,
            "the bank was not read"
        );
    }

    #[test]
    fn many_chunks_come_from_the_bank_in_one_batch_then_from_the_cache() {
        struct Batches {
            inner: Slow,
            batches: AtomicU64,
        }
        impl ChunkStore for Batches {
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
                self.inner.get_raw(id)
            }
            fn get_raw_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
                self.batches.fetch_add(1, Ordering::SeqCst);
                ids.iter().map(|id| self.inner.inner.get_raw(id)).collect()
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
        let d = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(d.path(), 16 << 20).unwrap());
        let store = Arc::new(Batches {
            inner: Slow {
                inner: MemStore::default(),
                reads: AtomicU64::new(0),
            },
            batches: AtomicU64::new(0),
        });
        let chunks: Vec<Vec<u8>> = (1..=16u8).map(|i| vec![i; 4096]).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        for (id, c) in ids.iter().zip(&chunks) {
            store.put(&encode_with_id(*id, c, 1)).unwrap();
        }
        let cs = CachedStore::new(cache, store.clone());
        assert_eq!(*cs.fetch(&ids[3]).unwrap(), chunks[3]);
        let mut want = ids.clone();
        want.push(ids[0]);
        let got = cs.fetch_many(&want);
        assert_eq!(got.len(), 17);
        for (r, c) in got.iter().zip(chunks.iter().chain([&chunks[0]])) {
            assert_eq!(**r.as_ref().unwrap(), *c);
        }
        assert_eq!(store.batches.load(Ordering::SeqCst), 1, "one batch request");
        assert_eq!(
            store.inner.reads.load(Ordering::SeqCst),
            1,
            "the single fetch"
        );
        cs.fetch_many(&ids)
            .into_iter()
            .for_each(|r| drop(r.unwrap()));
        assert_eq!(store.batches.load(Ordering::SeqCst), 1, "then the cache");
        // A missing chunk fails alone: the batch is retried chunk by chunk.
        let absent = ChunkId::of(b"absent");
        let r = cs.fetch_many(&[absent, ids[5]]);
        assert!(r[0].as_ref().unwrap_err().is_missing());
        assert!(r[1].is_ok());
    }

    #[test]
    fn a_stream_is_written_in_order_and_checked_against_its_lengths() {
        let chunks: Vec<Vec<u8>> = (0..70u8).map(|i| vec![i | 1; 1000 + i as usize]).collect();
        let mut runs = Vec::new();
        let mut want = Vec::new();
        for (k, c) in chunks.iter().enumerate() {
            runs.push(MemoryRun {
                id: Some(ChunkId::of(c)),
                len: c.len() as u32,
            });
            want.extend_from_slice(c);
            if k % 10 == 0 {
                runs.push(MemoryRun { id: None, len: 300 });
                want.extend_from_slice(&[0u8; 300]);
            }
        }
        let idx = MemoryIndex {
            total_len: want.len() as u64,
            runs,
        };
        let by_id: HashMap<ChunkId, Arc<Vec<u8>>> = chunks
            .iter()
            .map(|c| (ChunkId::of(c), Arc::new(c.clone())))
            .collect();
        let get = |id: &ChunkId| by_id.get(id).cloned().ok_or_else(|| "absent".to_string());
        let (mut out, n) = (Vec::new(), AtomicU64::new(0));
        CachedStore::write_stream(&idx, &mut out, 3, &n, get).unwrap();
        assert!(out == want);
        assert_eq!(n.load(Ordering::Relaxed), want.len() as u64);
        // A chunk shorter than its run is refused, naming it.
        let mut bad = idx.clone();
        bad.runs[0].len += 1;
        let e = CachedStore::write_stream(&bad, Vec::new(), 2, &n, get).unwrap_err();
        assert!(
            e.to_string().contains(&bad.runs[0].id.unwrap().to_string()),
            "{e}"
        );
    }
}
