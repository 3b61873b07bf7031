//! The session journal: a FLUSH appends the checksums of the blocks it makes durable
//! instead of rewriting the dirty map, and recovery holds every flushed block to its
//! checksum, so a flipped bit in the overlay is found and never stored in the bank,
//! while a block the guest rewrote after its last flush is not taken for damage.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

use mbank_bank::{Bank, ImportOptions, NoProgress};
use mbank_core::{MachineName, MachineRef};
use mbank_station::Station;
use mbank_station::device::Disk;
use mbank_store::{ChunkStore, LocalStore};

const CS: usize = 65536;
/// 256 chunks of 64 KiB.
const DISK: usize = 256 * CS;

struct Fixture {
    dir: tempfile::TempDir,
    bank: Bank,
    station: Station,
    base: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut bank = Bank::init(&dir.path().join("bank")).unwrap();
    let base: Vec<u8> = (0..DISK)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 1)
        .collect();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, &base).unwrap();
    let m: MachineName = "alice/dev".parse().unwrap();
    bank.import(&m, &img, &ImportOptions::default(), &NoProgress)
        .unwrap();
    let station = Station::open(&dir.path().join("cache"), 256 << 20).unwrap();
    Fixture {
        dir,
        bank,
        station,
        base,
    }
}

impl Fixture {
    fn check_out(&mut self) -> Arc<Disk> {
        let store: Arc<dyn ChunkStore> =
            Arc::new(LocalStore::open(self.bank.root().unwrap()).unwrap());
        let r: MachineRef = "alice/dev".parse().unwrap();
        self.station
            .check_out(&mut self.bank, &r, false, store)
            .unwrap()
    }

    fn head(&self) -> Vec<u8> {
        let out = self.dir.path().join("head.raw");
        let r: MachineRef = "alice/dev".parse().unwrap();
        self.bank.export(&r, &out, 2, &NoProgress).unwrap();
        std::fs::read(out).unwrap()
    }
}

fn block(seed: u8) -> Vec<u8> {
    (0..4096)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect()
}

/// The session is abandoned as a crash leaves it: its process gone, its lock dropped.
fn crash(disk: Arc<Disk>) {
    let path = disk.dir.meta_path();
    let mut meta = disk.dir.read_meta().unwrap();
    meta.pid = u32::MAX - 1;
    std::fs::write(path, serde_json::to_vec(&meta).unwrap()).unwrap();
    drop(disk);
}

/// A FLUSH costs the blocks it makes durable: the dirty map file is left as it is
/// (not rewritten, whatever its size), and the journal gains one checksum record per
/// block written plus one flush record.
#[test]
fn a_flush_appends_its_blocks_instead_of_rewriting_the_dirty_map() {
    let mut f = fixture();
    let disk = f.check_out();
    // One 4 KiB block in each of 200 chunks: a map of 200 partly dirty chunks.
    for c in 0..200 {
        disk.write_sync((c * CS + 4096) as u64, Some(&block(c as u8)), 4096)
            .unwrap();
    }
    disk.flush_sync().unwrap();
    let map = disk.dir.dirty_path();
    let (ino, bytes) = (
        std::fs::metadata(&map).unwrap().ino(),
        std::fs::read(&map).unwrap(),
    );
    let journal = disk.dir.dir.join("journal");
    let journal_len = std::fs::metadata(&journal).map(|m| m.len());
    for k in 0..10usize {
        disk.write_sync((k * CS + 8192) as u64, Some(&block(k as u8 ^ 0x55)), 4096)
            .unwrap();
        disk.flush_sync().unwrap();
        assert_eq!(
            std::fs::metadata(&map).unwrap().ino(),
            ino,
            "flush {k} replaced the dirty map"
        );
        assert!(
            std::fs::read(&map).unwrap() == bytes,
            "flush {k} changed the dirty map"
        );
        assert_eq!(
            std::fs::metadata(&journal).map(|m| m.len()).unwrap(),
            *journal_len.as_ref().unwrap(),
            "the journal's preallocated zeros hold flush {k}: its size stays"
        );
    }
    // 200 + 10 checksum records, 11 flush records, nothing else.
    let j = std::fs::read(&journal).unwrap();
    let records = j[32..]
        .chunks_exact(48)
        .take_while(|r| r.iter().any(|&b| b != 0))
        .count();
    assert_eq!(records, 200 + 10 + 11);
    let written = disk
        .counters
        .journal_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(written, (records * 48) as u64, "bytes the flushes wrote");
    // And what was flushed is what a crash leaves.
    crash(disk);
    let mut want = f.base.clone();
    for c in 0..200 {
        want[c * CS + 4096..c * CS + 8192].copy_from_slice(&block(c as u8));
    }
    for k in 0..10 {
        want[k * CS + 8192..k * CS + 12288].copy_from_slice(&block(k as u8 ^ 0x55));
    }
    let r = f
        .station
        .recover(&mut f.bank, &ImportOptions::default())
        .unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.recovered.len(), 1);
    assert!(
        f.head() == want,
        "the recovered version holds every flushed write"
    );
}

/// A bit flipped in a flushed block of the overlay after the flush is found by
/// recovery: the session is set aside, the report names the block, and the bank gets
/// no version of it.
#[test]
fn a_flipped_bit_in_a_flushed_overlay_block_sets_the_session_aside() {
    let mut f = fixture();
    let disk = f.check_out();
    disk.write_sync((5 * CS) as u64, Some(&block(1)), 4096)
        .unwrap();
    disk.write_sync((9 * CS + 3 * 4096) as u64, Some(&block(2)), 4096)
        .unwrap();
    disk.flush_sync().unwrap();
    let overlay = disk.dir.overlay_path();
    crash(disk);
    let heads_before = f.head();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&overlay)
        .unwrap();
    let at = (9 * CS + 3 * 4096 + 1000) as u64;
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 0x10], at).unwrap();

    let r = f
        .station
        .recover(&mut f.bank, &ImportOptions::default())
        .unwrap();
    assert!(
        r.recovered.is_empty(),
        "a session with a damaged flushed block was checked in: {:?}",
        r.recovered
    );
    assert_eq!(r.problems.len(), 1);
    let p = &r.problems[0];
    assert!(p.set_aside, "{p}");
    let named = format!("byte {} of the disk", 9 * CS + 3 * 4096);
    assert!(p.why.contains(&named), "the report names the block: {p}");
    assert!(
        !p.why.contains(&format!("byte {}", 5 * CS)),
        "only the damaged block is named: {p}"
    );
    let why = std::fs::read_to_string(p.kept_at.join("WHY")).unwrap();
    assert!(why.contains(&named), "{why}");
    assert!(f.head() == heads_before, "nothing was stored");
    assert_eq!(f.bank.log(&"alice/dev".parse().unwrap()).unwrap().len(), 1);
}

/// A block rewritten after its last flush (the write never acknowledged as durable)
/// may hold the old data, the new, or a mix after a crash: none of these is damage.
#[test]
fn a_block_rewritten_after_its_flush_is_not_damage() {
    let mut f = fixture();
    let disk = f.check_out();
    let (b1, b2) = ((3 * CS) as u64, (7 * CS + 4096) as u64);
    disk.write_sync(b1, Some(&block(1)), 4096).unwrap();
    disk.write_sync(b2, Some(&block(2)), 4096).unwrap();
    disk.flush_sync().unwrap();
    // Rewritten, not flushed: b1 whole, b2 in part (a merge inside a dirty block).
    disk.write_sync(b1, Some(&block(3)), 4096).unwrap();
    disk.write_sync(b2 + 100, Some(&[9u8; 50]), 50).unwrap();
    let overlay = disk.dir.overlay_path();
    crash(disk);
    // A torn rewrite: half of b1 reached the disk.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&overlay)
        .unwrap();
    file.write_all_at(&block(1)[..2048], b1).unwrap();

    let r = f
        .station
        .recover(&mut f.bank, &ImportOptions::default())
        .unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.recovered.len(), 1);
    let head = f.head();
    let (b1, b2) = (b1 as usize, b2 as usize);
    let mut torn = block(1)[..2048].to_vec();
    torn.extend_from_slice(&block(3)[2048..]);
    assert!(
        head[b1..b1 + 4096] == torn[..],
        "b1 holds what the overlay holds"
    );
    let mut b2_now = block(2);
    b2_now[100..150].fill(9);
    assert!(head[b2..b2 + 4096] == b2_now[..]);
}

/// A small deterministic generator for the tests' write plans.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Copies the session directory `from` to `to` (its files only).
fn copy_session(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A process killed in the middle of a journal append leaves the records before the
/// cut, maybe part of one, and the preallocated zeros: cut at every byte, the replayed
/// journal names exactly the blocks of the flushes whose flush record is whole, and
/// never fails.
#[test]
fn a_journal_cut_anywhere_keeps_exactly_the_whole_flushes() {
    let mut f = fixture();
    let disk = f.check_out();
    disk.set_compact_bytes(u64::MAX);
    let mut rng = Rng(0x9e3779b97f4a7c15);
    // (journal end after the flush, the durable masks then)
    let mut flushes = vec![(32u64, disk.durable_map().masks)];
    for round in 0..24u8 {
        for _ in 0..1 + rng.below(4) {
            // Often a block flushed before: its rewrite syncs an intent first.
            let c = rng.below(16) as usize;
            let b = rng.below(16) as usize;
            disk.write_sync((c * CS + b * 4096) as u64, Some(&block(round)), 4096)
                .unwrap();
        }
        disk.flush_sync().unwrap();
        let end = 32
            + disk
                .counters
                .journal_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
        flushes.push((end, disk.durable_map().masks));
    }
    assert!(
        disk.counters
            .intents
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the plan rewrote flushed blocks"
    );
    let journal = std::fs::read(disk.dir.dir.join("journal")).unwrap();
    let dirty = std::fs::read(disk.dir.dirty_path()).unwrap();
    let end = flushes.last().unwrap().0 as usize;
    let tmp = f.dir.path().join("cut");
    std::fs::create_dir_all(&tmp).unwrap();
    let sd = mbank_station::session::SessionDir { dir: tmp.clone() };
    std::fs::write(sd.dirty_path(), &dirty).unwrap();
    for cut in 32..=end {
        let mut j = journal[..cut].to_vec();
        j.resize(journal.len(), 0);
        std::fs::write(sd.dir.join("journal"), &j).unwrap();
        let map = sd
            .read_dirty(DISK as u64, CS as u32)
            .unwrap_or_else(|e| panic!("cut at byte {cut}: {e}"));
        let want = &flushes
            .iter()
            .rev()
            .find(|(e, _)| *e as usize <= cut)
            .unwrap()
            .1;
        assert!(map.masks == *want, "cut at byte {cut}: wrong blocks");
    }
    drop(disk);
}

/// Compaction folds the journal into a new dirty map, then starts a new journal. Cut
/// between the two, the new map is found with the old journal, which it supersedes:
/// every flushed write is there. And a session that compacted often recovers whole.
#[test]
fn a_cut_inside_a_compaction_keeps_every_flushed_write() {
    let mut f = fixture();
    let disk = f.check_out();
    disk.set_compact_bytes(0);
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let mut want = f.base.clone();
    let snap = f.dir.path().join("snap");
    copy_session(&disk.dir.dir, &snap);
    let mut seen = 0;
    for round in 0..40u8 {
        for _ in 0..1 + rng.below(6) {
            let off = (rng.below(64) as usize * CS) + rng.below(16) as usize * 4096;
            let d = block(round.wrapping_mul(7));
            disk.write_sync(off as u64, Some(&d), 4096).unwrap();
            want[off..off + 4096].copy_from_slice(&d);
        }
        disk.flush_sync().unwrap();
        let n = disk
            .counters
            .compactions
            .load(std::sync::atomic::Ordering::Relaxed);
        if n > seen {
            seen = n;
            // The new map with the journal as it was before this flush.
            let cut = f.dir.path().join(format!("cut-{round}"));
            copy_session(&snap, &cut);
            std::fs::copy(disk.dir.dirty_path(), cut.join("dirty")).unwrap();
            let sd = mbank_station::session::SessionDir { dir: cut };
            let map = sd.read_dirty(DISK as u64, CS as u32).unwrap();
            let durable = disk.durable_map();
            assert!(map.masks == durable.masks, "round {round}");
            assert!(map.sums == durable.sums, "round {round}");
        }
        std::fs::remove_dir_all(&snap).unwrap();
        copy_session(&disk.dir.dir, &snap);
    }
    assert!(seen >= 3, "{seen} compactions: the test needs several");
    crash(disk);
    let r = f
        .station
        .recover(&mut f.bank, &ImportOptions::default())
        .unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(
        f.head() == want,
        "every flushed write is in the recovered version"
    );
}
