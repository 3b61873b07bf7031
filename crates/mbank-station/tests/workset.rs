//! Recorded working sets, read-ahead and the session statistics that show them: a
//! session records the chunks the guest needed, check-in stores the list with the
//! version, and the next session on a cold station fetches them ahead of the guest, so
//! the guest waits on fewer misses. Counts, never times.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

use mbank_bank::{Bank, ImportOptions, NoProgress};
use mbank_core::chunk::EncodedChunk;
use mbank_core::{ChunkId, MachineName, MachineRef};
use mbank_station::device::Disk;
use mbank_station::workset::{Entry, STREAM_NAME, WorkingSet};
use mbank_station::{CheckinExtras, Station, StationError};
use mbank_store::{ChunkStore, LocalStore, StoreError};

const CS: usize = 65536;

/// A bank store that logs every read, and holds reads of chosen chunks until opened.
struct LogStore {
    inner: LocalStore,
    log: Mutex<Vec<ChunkId>>,
    held: Mutex<HashSet<ChunkId>>,
    cv: Condvar,
}

impl LogStore {
    fn open(bank: &Bank) -> Arc<LogStore> {
        Arc::new(LogStore {
            inner: LocalStore::open(bank.root().unwrap()).unwrap(),
            log: Mutex::new(Vec::new()),
            held: Mutex::new(HashSet::new()),
            cv: Condvar::new(),
        })
    }

    fn reads(&self) -> Vec<ChunkId> {
        self.log.lock().unwrap().clone()
    }
}

impl ChunkStore for LogStore {
    fn put(&self, c: &EncodedChunk) -> Result<u64, StoreError> {
        self.inner.put(c)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn touch(&self, id: &ChunkId) -> Result<bool, StoreError> {
        self.inner.touch(id)
    }
    fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        self.log.lock().unwrap().push(*id);
        let mut held = self.held.lock().unwrap();
        while held.contains(id) {
            held = self.cv.wait(held).unwrap();
        }
        drop(held);
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

struct Fixture {
    dir: tempfile::TempDir,
    bank: Bank,
    base: Vec<u8>,
}

/// A bank holding alice/dev, a disk of `bytes` bytes with every chunk distinct.
fn fixture(bytes: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut bank = Bank::init(&dir.path().join("bank")).unwrap();
    let base: Vec<u8> = (0..bytes)
        .map(|i| ((i / CS) as u8).wrapping_mul(7) ^ (i.wrapping_mul(2654435761) >> 13) as u8 | 1)
        .collect();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, &base).unwrap();
    let m: MachineName = "alice/dev".parse().unwrap();
    bank.import(&m, &img, &ImportOptions::default(), &NoProgress)
        .unwrap();
    Fixture { dir, bank, base }
}

impl Fixture {
    /// A new station (an empty cache).
    fn station(&self, name: &str) -> Station {
        Station::open(&self.dir.path().join(name), 256 << 20).unwrap()
    }

    fn check_out(&mut self, station: &Station, store: Arc<LogStore>) -> Arc<Disk> {
        let r: MachineRef = "alice/dev".parse().unwrap();
        station.check_out(&mut self.bank, &r, false, store).unwrap()
    }

    /// Reads 4 KiB at the start of each of `places`, as a guest would, and checks them.
    fn read(&self, disk: &Disk, places: &[usize]) {
        for &p in places {
            let got = disk.read_sync((p * CS) as u64, 4096).unwrap();
            assert_eq!(got, self.base[p * CS..p * CS + 4096], "place {p}");
        }
    }

    /// Checks a session in as a first boot does (storing a working set even with
    /// nothing written).
    fn check_in(&mut self, station: &Station, disk: &Disk) -> mbank_station::SessionReport {
        let extras = CheckinExtras {
            first_working_set: true,
            ..Default::default()
        };
        station
            .check_in_with(
                &mut self.bank,
                disk,
                &extras,
                &ImportOptions::default(),
                &NoProgress,
            )
            .unwrap()
    }
}

/// The places a "boot" reads: scattered, out of order.
const BOOT: [usize; 12] = [17, 3, 200, 45, 120, 7, 250, 64, 99, 1, 180, 33];

/// A session records the chunks the guest read; the next session of that version on a
/// station with an empty cache fetches them ahead of the guest, whose reads then wait
/// on no miss.
#[test]
fn a_recorded_working_set_spares_the_next_cold_session_its_misses() {
    let mut f = fixture(256 * CS);
    let a = f.station("a");
    let disk = f.check_out(&a, LogStore::open(&f.bank));
    f.read(&disk, &BOOT);
    let first = f.check_in(&a, &disk);
    drop(disk);
    assert_eq!(first.stats.misses_waited, BOOT.len() as u64);
    assert_eq!(first.stats.workset_recorded, BOOT.len() as u64);
    assert_eq!(first.workset_stored, BOOT.len() as u64, "{first:?}");
    assert!(
        first.version.is_some(),
        "a first boot stores its working set"
    );

    // The stored record lists the places in the order the guest first read them.
    let head = f.bank.resolve(&"alice/dev".parse().unwrap()).unwrap();
    assert!(head.streams.iter().any(|s| s == STREAM_NAME));

    // The next session, on another station with an empty cache.
    let b = f.station("b");
    let store = LogStore::open(&f.bank);
    let disk = f.check_out(&b, store.clone());
    disk.start_background(4);
    assert_eq!(
        b.replay_working_set(&f.bank, &disk).unwrap(),
        BOOT.len() as u64
    );
    disk.wait_background_idle();
    f.read(&disk, &BOOT);
    let stats = disk.stats();
    assert_eq!(stats.misses_waited, 0, "{stats:?}");
    assert_eq!(stats.prefetch_hits, BOOT.len() as u64, "{stats:?}");
    assert_eq!(stats.prefetched_chunks, BOOT.len() as u64, "{stats:?}");
    // The replay fetched exactly the list, each chunk once.
    let want: HashSet<ChunkId> = BOOT.iter().map(|&p| disk.base.chunks[p].unwrap()).collect();
    let reads = store.reads();
    assert_eq!(reads.len(), BOOT.len(), "{reads:?}");
    assert_eq!(reads.iter().copied().collect::<HashSet<_>>(), want);
    // Nothing written, and the version has a working set: no new version.
    let second = f.check_in(&b, &disk);
    assert_eq!(second.version, None, "{second:?}");
    drop(disk);
}

/// Commits a version of alice/dev whose working-set stream holds `record`.
fn commit_record(f: &mut Fixture, station: &Station, record: &[u8]) {
    let disk = f.check_out(station, LogStore::open(&f.bank));
    let w = f.bank.begin_write("test").unwrap();
    let (idx, _) = f.bank.store_stream(&w, record).unwrap();
    let extras = CheckinExtras {
        streams: vec![(STREAM_NAME.to_string(), idx)],
        always: true,
        ..Default::default()
    };
    station
        .check_in_with(
            &mut f.bank,
            &disk,
            &extras,
            &ImportOptions::default(),
            &NoProgress,
        )
        .unwrap();
}

/// A truncated or corrupted record is a warning ([`StationError::Workset`]) and no
/// error for the session: nothing is queued and the disk reads right.
#[test]
fn a_damaged_working_set_is_skipped_and_the_disk_reads_right() {
    let mut f = fixture(64 * CS);
    let a = f.station("a");
    let good = WorkingSet {
        chunk_size: CS as u32,
        entries: (0..8)
            .map(|p| Entry::Disk {
                place: p,
                id: ChunkId::of(b"x"),
            })
            .collect(),
    }
    .encode();
    let truncated = good[..good.len() - 20].to_vec();
    let mut flipped = good.clone();
    flipped[40] ^= 1;
    for (what, record) in [("truncated", truncated), ("corrupted", flipped)] {
        commit_record(&mut f, &a, &record);
        let station = f.station(&format!("cold-{what}"));
        let disk = f.check_out(&station, LogStore::open(&f.bank));
        disk.start_background(2);
        match station.replay_working_set(&f.bank, &disk) {
            Err(StationError::Workset { why, .. }) => eprintln!("{what}: {why}"),
            other => panic!("{what}: {other:?}"),
        }
        f.read(&disk, &[0, 5, 63]);
        assert_eq!(disk.stats().prefetched_chunks, 0);
        station.discard(&f.bank, &disk).unwrap();
    }

    // A record whose stream chunk is gone from the bank: the same warning.
    commit_record(&mut f, &a, &good);
    let v = f.bank.resolve(&"alice/dev".parse().unwrap()).unwrap();
    let idx = f.bank.catalog().stream(&v, STREAM_NAME).unwrap().unwrap();
    for run in &idx.runs {
        std::fs::remove_file(f.bank.chunk_path(&run.id.unwrap())).unwrap();
    }
    let station = f.station("cold-gone");
    let disk = f.check_out(&station, LogStore::open(&f.bank));
    assert!(matches!(
        station.replay_working_set(&f.bank, &disk),
        Err(StationError::Workset { .. })
    ));
    f.read(&disk, &[0, 5, 63]);
    station.discard(&f.bank, &disk).unwrap();
}

/// A list naming places past the disk's end, stream chunks the version does not have,
/// and a stream chunk gone from the bank: those entries are skipped (counted as stale or
/// missing, a warning at check-in), the rest are fetched, and the disk reads right.
#[test]
fn stale_entries_are_skipped_with_a_warning() {
    let mut f = fixture(64 * CS);
    let a = f.station("a");
    // A version with a kernel stream whose one chunk then goes missing.
    let kernel: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8 | 1).collect();
    let kid = ChunkId::of(&kernel);
    {
        let disk = f.check_out(&a, LogStore::open(&f.bank));
        let w = f.bank.begin_write("test").unwrap();
        let (kidx, _) = f.bank.store_stream(&w, &kernel[..]).unwrap();
        assert_eq!(kidx.runs[0].id, Some(kid));
        let ws = WorkingSet {
            chunk_size: CS as u32,
            entries: vec![
                Entry::Stream { id: kid },
                Entry::Disk {
                    place: 5,
                    id: ChunkId::of(b"old"),
                },
                Entry::Disk {
                    place: 64,
                    id: ChunkId::of(b"past the end"),
                },
                Entry::Stream {
                    id: ChunkId::of(b"not a stream of this version"),
                },
                Entry::Disk {
                    place: 9,
                    id: ChunkId::of(b"old"),
                },
            ],
        };
        let (widx, _) = f.bank.store_stream(&w, &ws.encode()[..]).unwrap();
        let extras = CheckinExtras {
            streams: vec![
                ("kernel".to_string(), kidx),
                (STREAM_NAME.to_string(), widx),
            ],
            always: true,
            ..Default::default()
        };
        a.check_in_with(
            &mut f.bank,
            &disk,
            &extras,
            &ImportOptions::default(),
            &NoProgress,
        )
        .unwrap();
    }
    std::fs::remove_file(f.bank.chunk_path(&kid)).unwrap();
    let b = f.station("b");
    let disk = f.check_out(&b, LogStore::open(&f.bank));
    disk.start_background(2);
    assert_eq!(b.replay_working_set(&f.bank, &disk).unwrap(), 3);
    disk.wait_background_idle();
    let s = disk.stats();
    assert_eq!(
        (s.workset_stale, s.workset_missing, s.prefetched_chunks),
        (2, 1, 2),
        "{s:?}"
    );
    f.read(&disk, &[5, 9, 0, 63]);
    assert_eq!(disk.stats().misses_waited, 2, "places 0 and 63 only");
    let r = f.check_in(&b, &disk);
    assert!(
        r.warnings.iter().any(|w| w.contains("no longer has")),
        "{:?}",
        r.warnings
    );
}

/// Read-ahead: after two sequential misses the chunks after them are fetched ahead of
/// the guest, the window grows while the guest reads what it brought, and it never
/// reaches past the disk's end (the last chunk here is a short one).
#[test]
fn read_ahead_follows_a_sequential_reader_and_stops_at_the_disk_end() {
    let n = 10;
    let mut f = fixture(n * CS - CS / 2);
    let a = f.station("a");
    let store = LogStore::open(&f.bank);
    let disk = f.check_out(&a, store.clone());
    disk.start_background(2);
    for p in 0..n {
        let len = if p == n - 1 { CS / 2 } else { CS };
        let got = disk.read_sync((p * CS) as u64, len as u32).unwrap();
        assert_eq!(got, f.base[p * CS..p * CS + len], "place {p}");
        disk.wait_background_idle();
    }
    let s = disk.stats();
    assert_eq!(s.misses_waited, 2, "{s:?}");
    assert_eq!(s.readahead_chunks, (n - 2) as u64, "{s:?}");
    assert_eq!(s.prefetch_hits, (n - 2) as u64, "{s:?}");
    let reads = store.reads();
    assert_eq!(reads.len(), n, "each chunk fetched once: {reads:?}");
    assert_eq!(
        reads.iter().copied().collect::<HashSet<_>>(),
        disk.base.chunks.iter().map(|c| c.unwrap()).collect()
    );
    a.discard(&f.bank, &disk).unwrap();
}

/// A guest read never queues behind the replay: with every background fetcher stuck on
/// a list chunk the bank is slow to give, a read of another chunk is served.
#[test]
fn a_guest_read_jumps_the_replay_queue() {
    let mut f = fixture(64 * CS);
    let a = f.station("a");
    let disk = f.check_out(&a, LogStore::open(&f.bank));
    f.read(&disk, &(0..32).collect::<Vec<_>>());
    f.check_in(&a, &disk);
    drop(disk);

    let b = f.station("b");
    let store = LogStore::open(&f.bank);
    let disk = f.check_out(&b, store.clone());
    // Hold every chunk of the list.
    *store.held.lock().unwrap() = (0..32).map(|p| disk.base.chunks[p].unwrap()).collect();
    disk.start_background(2);
    assert_eq!(b.replay_working_set(&f.bank, &disk).unwrap(), 32);
    while store.reads().len() < 2 {
        std::thread::yield_now();
    }
    // Both fetchers wait in the bank; the guest reads elsewhere.
    let (tx, rx) = std::sync::mpsc::channel();
    let d = disk.clone();
    std::thread::spawn(move || tx.send(d.read_sync(50 * CS as u64, 4096)).unwrap());
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the guest's read was served while the replay waited")
        .unwrap();
    assert_eq!(got, f.base[50 * CS..50 * CS + 4096]);
    assert_eq!(disk.stats().misses_waited, 1);
    store.held.lock().unwrap().clear();
    store.cv.notify_all();
    disk.wait_background_idle();
    assert_eq!(disk.stats().prefetched_chunks, 32);
    assert_eq!(
        disk.counters.chunks_fetched.load(Ordering::Relaxed),
        33,
        "the list once, and the guest's chunk"
    );
    b.discard(&f.bank, &disk).unwrap();
}

/// A guest read waiting on the bank shows as waiting while it waits (a station whose
/// bank is unreachable shows its stalled guest), and as one wait once served.
#[test]
fn a_read_waiting_on_the_bank_shows_as_waiting_until_served() {
    let mut f = fixture(8 * CS);
    let a = f.station("a");
    let store = LogStore::open(&f.bank);
    let disk = f.check_out(&a, store.clone());
    *store.held.lock().unwrap() = [disk.base.chunks[5].unwrap()].into();
    let (tx, rx) = std::sync::mpsc::channel();
    let d = disk.clone();
    std::thread::spawn(move || tx.send(d.read_sync(5 * CS as u64, 4096)).unwrap());
    while store.reads().is_empty() {
        std::thread::yield_now();
    }
    let s = disk.stats();
    assert_eq!((s.misses_waiting, s.misses_waited), (1, 0), "{s:?}");
    store.held.lock().unwrap().clear();
    store.cv.notify_all();
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the read was served once the bank answered")
        .unwrap();
    assert_eq!(got, f.base[5 * CS..5 * CS + 4096]);
    let s = disk.stats();
    assert_eq!((s.misses_waiting, s.misses_waited), (0, 1), "{s:?}");
    a.discard(&f.bank, &disk).unwrap();
}
