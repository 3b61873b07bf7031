//! Memory images and other streams of unknown length, cut by content (FastCDC).
//!
//! The command line for this comes with suspend and resume; here is the library API.
//! The chunks a stream writes are protected from GC only while the caller holds the
//! [`crate::WriterGuard`] it passed in, until a version referencing the index commits.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::{Mutex, mpsc};

use mbank_core::chunk::DEFAULT_ZSTD_LEVEL;
use mbank_core::{ChunkId, MemoryIndex, MemoryRun, cdc};
use mbank_store::ChunkStore;
use serde::Serialize;

use crate::import::{BATCH, Outcome, store_batch};
use crate::{Bank, BankError, WriterGuard};

/// What storing a stream did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamStats {
    pub bytes: u64,
    pub chunks: u64,
    pub chunks_zero: u64,
    pub chunks_new: u64,
    pub bytes_stored: u64,
}

impl Bank {
    /// Cuts `reader` into content-defined chunks, stores those the bank lacks, flushes,
    /// and returns the index. Runs of zeros are recorded, not stored. Cutting runs on
    /// the calling thread; hashing, compression and writes on one worker per core, in
    /// batches like a disk's chunks (one `touch_many` and one `put_many` per batch: a
    /// bank server is asked once per batch, not once per chunk).
    pub fn store_stream(
        &self,
        _writer: &WriterGuard,
        reader: impl Read,
    ) -> Result<(MemoryIndex, StreamStats), BankError> {
        let store: &dyn ChunkStore = &*self.store;
        let jobs = crate::default_jobs();
        let (work_tx, work_rx) = mpsc::sync_channel::<Vec<(usize, Vec<u8>)>>(jobs * 2);
        let work_rx = Mutex::new(work_rx);
        type Done = (usize, u64, Result<Outcome, BankError>);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let seen = &Mutex::new(HashSet::<ChunkId>::new());
        let mut st = StreamStats::default();
        let mut runs: Vec<Option<MemoryRun>> = Vec::new();
        let cut = std::thread::scope(|s| -> Result<(), BankError> {
            for _ in 0..jobs {
                let (work_rx, done_tx) = (&work_rx, done_tx.clone());
                s.spawn(move || {
                    loop {
                        let next = work_rx.lock().expect("work lock").recv();
                        let Ok(batch) = next else { return };
                        for done in store_batch(batch, store, seen, DEFAULT_ZSTD_LEVEL, false) {
                            if done_tx.send(done).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
            drop(done_tx);
            let mut n = 0usize;
            let mut lens: Vec<u32> = Vec::new();
            let mut batch = Vec::with_capacity(BATCH);
            let stopped = || BankError::Stream(std::io::Error::other("a worker stopped"));
            let mut sent = cdc::chunk_stream::<_, BankError>(reader, |data| {
                lens.push(data.len() as u32);
                batch.push((n, data));
                n += 1;
                if batch.len() == BATCH {
                    work_tx
                        .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                        .map_err(|_| stopped())?;
                }
                Ok(())
            });
            if sent.is_ok() && !batch.is_empty() {
                sent = work_tx.send(batch).map_err(|_| stopped());
            }
            drop(work_tx);
            runs.resize(n, None);
            let mut first_err = sent.err();
            for (i, _, r) in done_rx.iter() {
                let (id, new, stored) = match r {
                    Ok(Outcome::Zero) => (None, false, 0),
                    Ok(Outcome::Dedup(id)) => (Some(id), false, 0),
                    Ok(Outcome::New(id, b) | Outcome::Repaired(id, b)) => (Some(id), true, b),
                    Err(e) => {
                        first_err.get_or_insert(e);
                        continue;
                    }
                };
                let len = lens[i];
                st.bytes += len as u64;
                st.chunks += 1;
                st.chunks_zero += id.is_none() as u64;
                st.chunks_new += new as u64;
                st.bytes_stored += stored;
                runs[i] = Some(MemoryRun { id, len });
            }
            first_err.map_or(Ok(()), Err)
        });
        cut?;
        let idx = MemoryIndex {
            total_len: st.bytes,
            runs: runs
                .into_iter()
                .map(|r| r.expect("every chunk was stored"))
                .collect(),
        };
        store.flush()?;
        Ok((idx, st))
    }

    /// Writes the stream described by `idx` to `writer`, verifying every chunk.
    pub fn restore_stream(
        &self,
        idx: &MemoryIndex,
        mut writer: impl Write,
    ) -> Result<u64, BankError> {
        let zeros = vec![0u8; cdc::MAX_SIZE as usize];
        let mut n = 0u64;
        for run in &idx.runs {
            let res = match &run.id {
                Some(id) => {
                    let plain = self.store.read(id)?;
                    if plain.len() != run.len as usize {
                        return Err(BankError::Store(mbank_store::StoreError::Corrupt {
                            source: mbank_core::ChunkError::BadLength {
                                id: *id,
                                claimed: run.len as u64,
                                why: "the index's length for this chunk differs from the chunk",
                            },
                            moved_to: None,
                        }));
                    }
                    writer.write_all(&plain)
                }
                None => {
                    let mut left = run.len as usize;
                    let mut r = Ok(());
                    while left > 0 && r.is_ok() {
                        let k = left.min(zeros.len());
                        r = writer.write_all(&zeros[..k]);
                        left -= k;
                    }
                    r
                }
            };
            res.map_err(|e| BankError::io("write the restored stream to", "the output", e))?;
            n += run.len as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn memory_stream_round_trip_and_second_save_is_cheap() {
        let d = tempfile::tempdir().unwrap();
        let bank = Bank::init(&d.path().join("bank")).unwrap();
        let w = bank.begin_write("test").unwrap();
        // A "memory image": random pages, zero pages, repeated pages.
        let mut mem = pseudo_random(3 << 20, 1);
        mem.extend(vec![0u8; 2 << 20]);
        mem.extend(pseudo_random(1 << 20, 1));
        let (idx, st) = bank.store_stream(&w, &mem[..]).unwrap();
        assert_eq!(idx.total_len, mem.len() as u64);
        assert!(st.chunks_zero > 0);
        let mut out = Vec::new();
        assert_eq!(
            bank.restore_stream(&idx, &mut out).unwrap(),
            mem.len() as u64
        );
        assert!(out == mem);
        // A little work later: a few bytes change. Only a few chunks are new.
        mem[100_000] ^= 1;
        mem[4_000_000] ^= 1;
        let (idx2, st2) = bank.store_stream(&w, &mem[..]).unwrap();
        assert!(st2.chunks_new <= 4, "{st2:?}");
        let mut out = Vec::new();
        bank.restore_stream(&idx2, &mut out).unwrap();
        assert!(out == mem);
        // Round trip through the index's byte format too.
        assert_eq!(MemoryIndex::from_bytes(&idx2.to_bytes()).unwrap(), idx2);
    }
}
