//! [`MemStore`]: chunks in memory, for unit tests of code above the store.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use mbank_core::ChunkId;
use mbank_core::chunk::EncodedChunk;

use crate::{ChunkStore, StoreError, StoreStats, SweepStats};

/// A chunk store in memory. Puts are visible at once; flush does nothing.
#[derive(Default)]
pub struct MemStore {
    chunks: Mutex<HashMap<ChunkId, (Vec<u8>, SystemTime)>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces a chunk's stored bytes, to simulate damage in tests.
    pub fn corrupt_for_test(&self, id: &ChunkId, bytes: Vec<u8>) {
        if let Some(e) = self.map().get_mut(id) {
            e.0 = bytes;
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkId, (Vec<u8>, SystemTime)>> {
        self.chunks.lock().expect("memory store lock poisoned")
    }
}

impl ChunkStore for MemStore {
    fn put(&self, chunk: &EncodedChunk) -> Result<u64, StoreError> {
        self.map()
            .insert(chunk.id, (chunk.bytes.clone(), SystemTime::now()));
        Ok(chunk.bytes.len() as u64)
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn touch(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self
            .map()
            .get_mut(id)
            .map(|e| e.1 = SystemTime::now())
            .is_some())
    }

    fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        self.map()
            .get(id)
            .map(|e| e.0.clone())
            .ok_or(StoreError::Missing(*id))
    }

    fn quarantine(&self, id: &ChunkId) -> Result<Option<PathBuf>, StoreError> {
        self.map().remove(id);
        Ok(None)
    }

    fn sweep(
        &self,
        cutoff: SystemTime,
        keep: &(dyn Fn(&ChunkId) -> bool + Sync),
    ) -> Result<SweepStats, StoreError> {
        let mut s = SweepStats::default();
        self.map().retain(|id, (bytes, t)| {
            if keep(id) {
                s.chunks_kept += 1;
                true
            } else if *t >= cutoff {
                s.chunks_too_new += 1;
                true
            } else {
                s.chunks_deleted += 1;
                s.bytes_deleted += bytes.len() as u64;
                false
            }
        });
        Ok(s)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let m = self.map();
        Ok(StoreStats {
            chunks: m.len() as u64,
            bytes: m.values().map(|e| e.0.len() as u64).sum(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract;

    #[test]
    fn contract_put_flush_read() {
        contract::put_flush_read(&MemStore::new());
    }

    #[test]
    fn contract_sweep() {
        contract::sweep_respects_keep_and_cutoff(&MemStore::new());
    }

    #[test]
    fn corrupt_read_is_refused() {
        let s = MemStore::new();
        let c = mbank_core::chunk::encode(b"data", 3);
        s.put(&c).unwrap();
        s.corrupt_for_test(&c.id, b"garbage".to_vec());
        assert!(matches!(s.read(&c.id), Err(StoreError::Corrupt { .. })));
    }
}
