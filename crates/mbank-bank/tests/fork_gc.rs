//! Forks and GC: a fork (`create --from`) takes its source's chunks without touching
//! them (a copy of every object on S3), and GC still never deletes what the fork's
//! version will reference when the source is removed while the fork is in flight
//! (`mbank-store`'s crate docs, "Forks").

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mbank_bank::{Bank, DiskFrom, GcReport, ImportOptions, NewMachine, NoProgress};
use mbank_core::chunk::EncodedChunk;
use mbank_core::{ChunkId, MachineName, MachineRef};
use mbank_store::{ChunkStore, StoreError, StoreStats, SweepStats};

type Hook = Box<dyn FnOnce() + Send>;

/// A store that counts touches and runs a hook at the next flush (a fork flushes once,
/// after it has read its source's index and before it commits).
struct Watched {
    inner: Arc<dyn ChunkStore>,
    touched: AtomicUsize,
    on_flush: Mutex<Option<Hook>>,
}

impl ChunkStore for Watched {
    fn put(&self, chunk: &EncodedChunk) -> Result<u64, StoreError> {
        self.inner.put(chunk)
    }
    fn flush(&self) -> Result<(), StoreError> {
        let hook = self.on_flush.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.flush()
    }
    fn touch(&self, id: &ChunkId) -> Result<bool, StoreError> {
        self.touched.fetch_add(1, Ordering::SeqCst);
        self.inner.touch(id)
    }
    fn touch_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        self.touched.fetch_add(ids.len(), Ordering::SeqCst);
        self.inner.touch_many(ids)
    }
    fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        self.inner.get_raw(id)
    }
    fn quarantine(&self, id: &ChunkId) -> Result<Option<std::path::PathBuf>, StoreError> {
        self.inner.quarantine(id)
    }
    fn sweep(
        &self,
        cutoff: SystemTime,
        keep: &(dyn Fn(&ChunkId) -> bool + Sync),
    ) -> Result<SweepStats, StoreError> {
        self.inner.sweep(cutoff, keep)
    }
    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats()
    }
}

/// A bank at `dir` with lab/base imported (32 chunks of 64 KiB of noise), its chunks'
/// mtimes an hour old (as a published base's are).
fn bank_with_base(dir: &Path) -> Bank {
    let mut bank = Bank::init(dir).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let img: Vec<u8> = (0..32 << 16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let p = dir.with_extension("raw");
    std::fs::write(&p, &img).unwrap();
    let m: MachineName = "lab/base".parse().unwrap();
    let opts = ImportOptions {
        chunk_size: Some(64 << 10),
        ..Default::default()
    };
    let r = bank.import(&m, &p, &opts, &NoProgress).unwrap();
    assert_eq!(r.chunks_new, 32);
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for fan in std::fs::read_dir(dir.join("chunks")).unwrap() {
        for f in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let f = std::fs::File::open(f.unwrap().path()).unwrap();
            f.set_modified(an_hour_ago).unwrap();
        }
    }
    bank
}

/// `bank`'s parts with its store watched.
fn watched(bank: &Bank) -> (Bank, Arc<Watched>) {
    let store = Arc::new(Watched {
        inner: bank.store_arc(),
        touched: AtomicUsize::new(0),
        on_flush: Mutex::new(None),
    });
    let parts = Bank::with_parts(
        bank.location().to_string(),
        store.clone(),
        bank.catalog().reopen().unwrap(),
    );
    (parts, store)
}

fn fork(bank: &mut Bank, from: &str, to: &str) -> mbank_bank::ImportReport {
    let v = bank
        .resolve(&MachineRef {
            machine: from.parse().unwrap(),
            version: None,
        })
        .unwrap();
    let writer = bank.begin_write(&format!("create {to}")).unwrap();
    let to: MachineName = to.parse().unwrap();
    bank.create(
        NewMachine {
            machine: &to,
            disk: DiskFrom::Version(&v),
            grow_to: None,
            config: "{}".into(),
            streams: Vec::new(),
            streams_stored: (0, 0),
        },
        &writer,
        &ImportOptions::default(),
        &NoProgress,
    )
    .unwrap()
}

/// Every chunk of `machine`'s head reads back.
fn assert_intact(bank: &Bank, machine: &str, what: &str) {
    let v = bank
        .resolve(&MachineRef {
            machine: machine.parse().unwrap(),
            version: None,
        })
        .unwrap();
    let idx = bank.catalog().disk_index(&v).unwrap();
    let ids: Vec<ChunkId> = idx.chunks.iter().flatten().copied().collect();
    assert_eq!(ids.len(), 32, "{what}: {machine} names its 32 chunks");
    for id in ids {
        if let Err(e) = bank.store().read(&id) {
            panic!("{what}: chunk {id} of {machine}: {e}");
        }
    }
}

/// A fork of a 32-chunk base touches none of them: on S3 each touch is a copy of the
/// object onto itself, which made a fork of a published Debian base take minutes.
#[test]
fn a_fork_touches_none_of_its_sources_chunks() {
    let d = tempfile::tempdir().unwrap();
    let bank = bank_with_base(&d.path().join("bank"));
    let (mut parts, store) = watched(&bank);
    fork(&mut parts, "lab/base", "lab/fork");
    assert_eq!(
        store.touched.load(Ordering::SeqCst),
        0,
        "chunks touched by a fork"
    );
    assert_intact(&bank, "lab/fork", "the fork");
}

/// The race GC must survive: a fork has read its source's index, the source is removed
/// and a GC runs before the fork commits. Its chunks are old and, when GC reads the
/// versions, in no version; the GC must still keep them. A later GC, once the fork has
/// committed, keeps them as the fork's, and collects nothing the fork needs.
#[test]
fn gc_while_a_fork_is_in_flight_and_its_source_is_removed_keeps_the_forks_chunks() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("bank");
    let bank = bank_with_base(&dir);
    let (mut parts, store) = watched(&bank);
    let during: Arc<Mutex<Option<GcReport>>> = Arc::default();
    *store.on_flush.lock().unwrap() = Some(Box::new({
        let (dir, during) = (dir.clone(), during.clone());
        move || {
            let mut other = Bank::open(&dir, false).unwrap();
            let base = MachineRef {
                machine: "lab/base".parse().unwrap(),
                version: None,
            };
            other.remove(&base).unwrap();
            *during.lock().unwrap() = Some(other.gc(&NoProgress).unwrap());
        }
    }));
    fork(&mut parts, "lab/base", "lab/fork");
    let during = during
        .lock()
        .unwrap()
        .take()
        .expect("the GC ran during the fork");
    assert_eq!(during.chunks_deleted, 0, "{during:?}");
    assert!(during.sweep_deferred, "{during:?}");
    assert_intact(&bank, "lab/fork", "after a GC during the fork");

    // No writer in flight now, the removal before it: this GC sweeps, keeping the
    // fork's chunks because the fork names them.
    let after = bank.gc(&NoProgress).unwrap();
    assert!(!after.sweep_deferred, "{after:?}");
    assert_eq!(after.chunks_referenced, 32, "{after:?}");
    assert_eq!(after.chunks_deleted, 0, "{after:?}");
    assert_intact(&bank, "lab/fork", "after the next GC");

    // And the fork removed, the next GC takes every chunk.
    let mut b = Bank::open(&dir, false).unwrap();
    b.remove(&MachineRef {
        machine: "lab/fork".parse().unwrap(),
        version: None,
    })
    .unwrap();
    let last = b.gc(&NoProgress).unwrap();
    assert_eq!(last.chunks_deleted, 32, "{last:?}");
}
