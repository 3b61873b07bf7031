//! `verify` and `gc`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use mbank_catalog::{CatalogError, WriterInfo, now_ms};
use mbank_core::{ChunkId, MachineName};
use mbank_store::{ChunkStore, StoreError};
use serde::Serialize;

use crate::{Bank, BankError, Progress, Unit, this_host};

/// A chunk that is missing or fails verification, and who needs it.
#[derive(Clone, Debug, Serialize)]
pub struct DamagedChunk {
    pub chunk: String,
    pub problem: String,
    /// Where the damaged file was moved, if it was.
    pub moved_to: Option<String>,
    /// Every `machine@version` whose disk contains this chunk.
    pub needed_by: Vec<String>,
}

/// A version whose index cannot be read.
#[derive(Clone, Debug, Serialize)]
pub struct DamagedIndex {
    pub version: String,
    pub problem: String,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub versions: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damaged_chunks: Vec<DamagedChunk>,
    pub damaged_indexes: Vec<DamagedIndex>,
    pub seconds: f64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damaged_chunks.is_empty() && self.damaged_indexes.is_empty()
    }
}

/// What `gc` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub versions: u64,
    pub chunks_referenced: u64,
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    /// Unreferenced chunks kept because a writer in flight may still use them.
    pub chunks_kept_for_writers: u64,
    pub temp_files_deleted: u64,
    pub live_writers: u64,
    pub stale_writers_removed: u64,
    pub seconds: f64,
}

/// Margin under the GC cutoff for the kernel's coarse file timestamps.
const MTIME_MARGIN: Duration = Duration::from_secs(1);
/// A writer on another host that has not been heard from for this long is dead.
const WRITER_SILENCE: Duration = Duration::from_secs(600);

fn writer_is_alive(w: &WriterInfo, host: &str) -> bool {
    if w.host == host {
        std::path::Path::new(&format!("/proc/{}", w.pid)).exists()
    } else {
        now_ms() - w.heartbeat_ms < WRITER_SILENCE.as_millis() as i64
    }
}

impl Bank {
    /// Re-hashes every chunk reachable from every version (or one machine's versions).
    /// Damaged chunks are moved aside (if the bank is writable) and reported with every
    /// version that needs them.
    pub fn verify(
        &self,
        machine: Option<&MachineName>,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, BankError> {
        let started = Instant::now();
        let catalog = self.local_catalog("verify")?;
        if let Some(m) = machine
            && self.catalog.machine(m)?.is_none()
        {
            return Err(mbank_catalog::CatalogError::MachineNotFound(m.to_string()).into());
        }
        let mut report = VerifyReport::default();
        let mut names: Vec<String> = Vec::new();
        let mut refs: HashMap<ChunkId, Vec<u32>> = HashMap::new();
        // Which versions (by their position in `names`) need each chunk.
        let mut note = |name: String, ids: Result<Vec<ChunkId>, CatalogError>| {
            match ids {
                Ok(ids) => {
                    let n = names.len() as u32;
                    for c in ids {
                        let e = refs.entry(c).or_default();
                        if e.last() != Some(&n) {
                            e.push(n);
                        }
                    }
                }
                Err(e) => report.damaged_indexes.push(DamagedIndex {
                    version: name.clone(),
                    problem: e.to_string(),
                }),
            }
            names.push(name);
        };
        let mut versions = 0;
        catalog.for_each_index(machine, |v, idx| {
            versions += 1;
            let ids = idx.map(|i| i.chunks.into_iter().flatten().collect());
            note(format!("{}@{}", v.machine, v.id.to_hex()), ids);
            Ok(())
        })?;
        catalog.for_each_stream(machine, |v, stream, idx| {
            let ids = idx.map(|i| i.runs.into_iter().filter_map(|r| r.id).collect());
            note(format!("{}@{} ({stream})", v.machine, v.id.to_hex()), ids);
            Ok(())
        })?;
        report.versions = versions;
        let chunks: Vec<&ChunkId> = refs.keys().collect();
        progress.start("verifying chunks", chunks.len() as u64, Unit::Chunks);
        let next = AtomicUsize::new(0);
        let bytes = AtomicU64::new(0);
        let bad: Mutex<Vec<(ChunkId, StoreError)>> = Mutex::new(Vec::new());
        let store: &dyn ChunkStore = &*self.store;
        std::thread::scope(|s| {
            for _ in 0..jobs.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(id) = chunks.get(i) else { return };
                        match store.read(id) {
                            Ok(plain) => {
                                bytes.fetch_add(plain.len() as u64, Ordering::Relaxed);
                            }
                            Err(e) => bad.lock().expect("poisoned").push((**id, e)),
                        }
                        progress.advance(1);
                    }
                });
            }
        });
        progress.finish();
        report.chunks_checked = chunks.len() as u64;
        report.bytes_checked = bytes.into_inner();
        let mut bad = bad.into_inner().expect("poisoned");
        bad.sort_by_key(|(id, _)| *id);
        for (id, e) in bad {
            let (problem, moved_to) = match e {
                StoreError::Missing(_) => ("missing".to_string(), None),
                StoreError::Corrupt { source, moved_to } => (
                    source.to_string(),
                    moved_to.map(|p| p.display().to_string()),
                ),
                other => (other.to_string(), None),
            };
            report.damaged_chunks.push(DamagedChunk {
                chunk: id.to_hex(),
                problem,
                moved_to,
                needed_by: refs[&id]
                    .iter()
                    .map(|&n| names[n as usize].clone())
                    .collect(),
            });
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Deletes every chunk that no version references and no writer in flight can
    /// still use. The scheme is written down in `mbank-store`'s crate docs.
    pub fn gc(&self, progress: &dyn Progress) -> Result<GcReport, BankError> {
        let started = Instant::now();
        self.require_writable("collect garbage")?;
        let catalog = self.local_catalog("gc")?;
        let mut report = GcReport::default();
        // 1. Cutoff: now, or the start of the oldest live writer, less a margin.
        let t0 = now_ms();
        let host = this_host();
        let mut oldest = t0;
        for w in catalog.writers()? {
            if writer_is_alive(&w, &host) {
                report.live_writers += 1;
                oldest = oldest.min(w.started_ms);
            } else {
                catalog.unregister_writer(w.id)?;
                report.stale_writers_removed += 1;
            }
        }
        let cutoff = UNIX_EPOCH + Duration::from_millis(oldest.max(0) as u64) - MTIME_MARGIN;
        // 2. Mark: every chunk of every version.
        let mut live = HashSet::new();
        let mut refused = None;
        catalog.for_each_index(None, |v, idx| {
            report.versions += 1;
            match idx {
                Ok(idx) => live.extend(idx.chunks.iter().flatten().copied()),
                Err(_) => {
                    refused.get_or_insert((v.machine.clone(), v.id));
                }
            }
            Ok(())
        })?;
        catalog.for_each_stream(None, |v, _, idx| {
            match idx {
                Ok(idx) => live.extend(idx.runs.iter().filter_map(|r| r.id)),
                Err(_) => {
                    refused.get_or_insert((v.machine.clone(), v.id));
                }
            }
            Ok(())
        })?;
        if let Some((machine, version)) = refused {
            return Err(BankError::GcRefused { machine, version });
        }
        report.chunks_referenced = live.len() as u64;
        // 3. Sweep.
        progress.start("sweeping unreferenced chunks", 0, Unit::Chunks);
        let s = self.store.sweep(cutoff, &|id| live.contains(id))?;
        progress.finish();
        report.chunks_deleted = s.chunks_deleted;
        report.bytes_deleted = s.bytes_deleted;
        report.chunks_kept_for_writers = s.chunks_too_new;
        report.temp_files_deleted = s.temp_files_deleted;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}
