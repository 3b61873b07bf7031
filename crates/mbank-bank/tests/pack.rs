//! Packs (`mbank_bank::pack`): an export that takes a version's chunks from its pack
//! writes the same bytes as one from the chunks, moves fewer bytes, and goes on from
//! the chunks when the pack is damaged, stale or gone; gc removes the packs of removed
//! versions.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use mbank_bank::pack::{DirPacks, pack_path};
use mbank_bank::{Bank, ImportOptions, NoProgress};
use mbank_core::{MachineName, MachineRef};

const CHUNK: usize = 64 << 10;

/// A disk of text-like chunks (which compress better together than alone), random
/// ones, zero runs and a chunk that recurs far apart.
fn image() -> Vec<u8> {
    let mut img = Vec::new();
    let mut x: u64 = 0x1234_5678;
    let words = [
        "the ", "bank ", "keeps ", "every ", "machine ", "of ", "a ", "lab ", "user ", "disk ",
        "chunk ", "station ",
    ];
    for c in 0..300 {
        let mut chunk = Vec::with_capacity(CHUNK);
        match c % 10 {
            // Zeros.
            3 => chunk.resize(CHUNK, 0),
            // Random.
            7 => {
                while chunk.len() < CHUNK {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.extend_from_slice(&x.to_le_bytes());
                }
            }
            // The same chunk again and again.
            9 => chunk.extend(std::iter::repeat_n(b'r', CHUNK)),
            _ => {
                while chunk.len() < CHUNK {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
                    chunk.extend_from_slice(format!("{c} ").as_bytes());
                }
                chunk.truncate(CHUNK);
            }
        }
        img.extend_from_slice(&chunk);
    }
    // A short last chunk (of whole sectors).
    img.extend(b"the end of the disk ".iter().cycle().take(1024));
    img
}

fn setup(dir: &Path) -> (Vec<u8>, MachineRef) {
    let bank_dir = dir.join("bank");
    let mut bank = Bank::init(&bank_dir).unwrap();
    let img = image();
    let p = dir.join("disk.raw");
    std::fs::write(&p, &img).unwrap();
    let m: MachineName = "lab/base".parse().unwrap();
    let opts = ImportOptions {
        chunk_size: Some(CHUNK as u32),
        ..Default::default()
    };
    bank.import(&m, &p, &opts, &NoProgress).unwrap();
    (img, "lab/base".parse().unwrap())
}

fn packed_bank(dir: &Path) -> Bank {
    let root = dir.join("bank");
    Bank::open(&root, false)
        .unwrap()
        .with_packs(Arc::new(DirPacks(root)))
}

/// Exports to a file and through a FIFO (written in order); both outputs and the
/// first report.
fn export_both(
    bank: &Bank,
    r: &MachineRef,
    dir: &Path,
) -> (Vec<u8>, Vec<u8>, mbank_bank::ExportReport) {
    let out = dir.join("out.raw");
    let rep = bank.export(r, &out, 2, &NoProgress).unwrap();
    let file = std::fs::read(&out).unwrap();
    let fifo = dir.join("out.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut b = Vec::new();
            std::fs::File::open(&fifo)
                .unwrap()
                .read_to_end(&mut b)
                .unwrap();
            b
        })
    };
    let rep2 = bank.export(r, &fifo, 2, &NoProgress).unwrap();
    let piped = reader.join().unwrap();
    assert_eq!(
        rep.pack.as_ref().map(|p| p.fell_back.is_some()),
        rep2.pack.as_ref().map(|p| p.fell_back.is_some())
    );
    (file, piped, rep)
}

#[test]
fn an_export_from_a_pack_writes_the_disk_and_moves_fewer_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (img, r) = setup(dir.path());
    let bank = packed_bank(dir.path());
    // No pack yet: the chunks, and no word of a pack.
    let (file, piped, rep) = export_both(&bank, &r, dir.path());
    assert!(file == img && piped == img);
    assert!(rep.pack.is_none());
    let built = bank.build_pack(&r, 9, 2, &NoProgress).unwrap();
    // 300 places: 30 zero, 30 of one repeated chunk, the rest distinct; plus the tail.
    assert_eq!(built.chunks, 300 - 30 - 30 + 1 + 1);
    assert!(
        built.pack_bytes < built.stored_bytes,
        "the pack ({} bytes) is no smaller than the chunks' {}",
        built.pack_bytes,
        built.stored_bytes
    );
    let (file, piped, rep) = export_both(&bank, &r, dir.path());
    assert!(
        file == img,
        "the export from the pack differs from the disk"
    );
    assert!(
        piped == img,
        "the in-order export from the pack differs from the disk"
    );
    let used = rep.pack.unwrap();
    assert_eq!(used.fell_back, None);
    assert_eq!(
        used.chunks,
        300 - 30 + 1,
        "every non-zero place from the pack"
    );
    assert_eq!(used.segments, built.segments);
    assert!(used.bytes < built.stored_bytes);
    assert_eq!(rep.chunks_read, 300 - 30 + 1);
}

#[test]
fn a_damaged_stale_or_missing_pack_falls_back_to_the_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (img, r) = setup(dir.path());
    let bank = packed_bank(dir.path());
    bank.build_pack(&r, 3, 2, &NoProgress).unwrap();
    let v = bank.resolve(&r).unwrap();
    let path = pack_path(&dir.path().join("bank"), v.id);
    let good = std::fs::read(&path).unwrap();

    // A byte of the last segment's frame flipped: the pack gives what it can, the
    // chunks the rest.
    let mut b = good.clone();
    let n = b.len();
    b[n - 100] ^= 0x55;
    std::fs::write(&path, &b).unwrap();
    let (file, piped, rep) = export_both(&bank, &r, dir.path());
    assert!(file == img && piped == img);
    let used = rep.pack.unwrap();
    let why = used.fell_back.expect("no word of the damage");
    assert!(why.contains("segment"), "{why}");

    // A damaged index: nothing from the pack.
    let mut b = good.clone();
    b[50] ^= 1;
    std::fs::write(&path, &b).unwrap();
    let (file, piped, rep) = export_both(&bank, &r, dir.path());
    assert!(file == img && piped == img);
    let used = rep.pack.unwrap();
    assert_eq!(used.chunks, 0);
    let why = used.fell_back.unwrap();
    assert!(why.contains("checksum"), "{why}");

    // Truncated.
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let (file, piped, rep) = export_both(&bank, &r, dir.path());
    assert!(file == img && piped == img);
    assert!(rep.pack.unwrap().fell_back.unwrap().contains("truncated"));

    // Another version's pack under this one's name: stale.
    let mut bank = packed_bank(dir.path());
    let p2 = dir.path().join("disk2.raw");
    let mut img2 = img.clone();
    img2[5] ^= 1;
    std::fs::write(&p2, &img2).unwrap();
    let m2: MachineName = "lab/other".parse().unwrap();
    bank.import(&m2, &p2, &ImportOptions::default(), &NoProgress)
        .unwrap();
    let r2: MachineRef = "lab/other".parse().unwrap();
    let v2 = bank.resolve(&r2).unwrap();
    bank.build_pack(&r2, 3, 2, &NoProgress).unwrap();
    std::fs::copy(pack_path(&dir.path().join("bank"), v2.id), &path).unwrap();
    let (file, piped, rep) = export_both(&bank, &r, dir.path());
    assert!(file == img && piped == img);
    assert!(rep.pack.unwrap().fell_back.unwrap().contains("version"));

    // Removed: no pack, no word.
    std::fs::remove_file(&path).unwrap();
    let (file, _, rep) = export_both(&bank, &r, dir.path());
    assert!(file == img);
    assert!(rep.pack.is_none());
}

#[test]
fn gc_removes_the_packs_of_removed_versions_only() {
    let dir = tempfile::tempdir().unwrap();
    let (img, r) = setup(dir.path());
    let mut bank = packed_bank(dir.path());
    let p2 = dir.path().join("disk2.raw");
    std::fs::write(&p2, &img[..CHUNK * 10]).unwrap();
    bank.import(
        &"lab/small".parse().unwrap(),
        &p2,
        &ImportOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let r2: MachineRef = "lab/small".parse().unwrap();
    let (v1, v2) = (bank.resolve(&r).unwrap().id, bank.resolve(&r2).unwrap().id);
    bank.build_pack(&r, 3, 1, &NoProgress).unwrap();
    bank.build_pack(&r2, 3, 1, &NoProgress).unwrap();
    let root = dir.path().join("bank");
    let st = bank.stats().unwrap();
    let on_disk: u64 = [v1, v2]
        .iter()
        .map(|v| std::fs::metadata(pack_path(&root, *v)).unwrap().len())
        .sum();
    assert_eq!((st.packs, st.pack_bytes), (2, on_disk));
    bank.remove(&r2).unwrap();
    let g = bank.gc(&NoProgress).unwrap();
    assert_eq!(g.packs_removed, 1);
    assert_eq!(bank.stats().unwrap().packs, 1);
    assert!(pack_path(&root, v1).exists());
    assert!(!pack_path(&root, v2).exists());
}
