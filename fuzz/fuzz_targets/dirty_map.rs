//! A station session's durable dirty map (`mbank_station::session::decode_dirty`).
//!
//! Input: byte 0 picks the chunk size (4 KiB << (b % 11): 4 KiB ..= 4 MiB), bytes 1..5
//! the disk size (a u32 LE count of 4 KiB blocks, capped at 65536 chunks), the rest is
//! the map; it is decoded as it is and with a valid checksum appended. A
//! map that decodes must encode to a map that decodes to the same.
//!
//! The same bytes are also a session journal (`replay_journal`) extending a clean map
//! of that disk: as they are, and turned into valid records (17 bytes each: the kind,
//! then two u64 LE fields), so that replay sees whole records of every kind, flushes
//! and intents included, and not only a checksum failing. A replay that succeeds
//! leaves every block the map names inside the disk, with a checksum only for a block
//! it names, and the map still encodes and decodes to itself.
//!
//! Allocation bound: 8 bytes per chunk (at most 512 KiB) + 64 KiB + 4 bytes per input
//! byte held at once for the map; for the journal, 24 bytes per chunk (a clean map, an
//! encoding and a decoded copy) + 64 KiB + 16 bytes per input byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_fuzz::{KIB, bounded, with_checksum};
use mbank_station::session::{
    DirtyMap, Record, decode_dirty, encode_dirty, encode_record, journal_header, replay_journal,
};

const MAX_CHUNKS: u64 = 1 << 16;

fn check(bytes: &[u8], disk_size: u64, chunk_size: u32) {
    if let Ok(map) = decode_dirty(bytes, disk_size, chunk_size) {
        let again = encode_dirty(&map);
        let back = decode_dirty(&again, disk_size, chunk_size).expect("an encoded map decodes");
        assert_eq!(
            back, map,
            "a dirty map changed in an encode/decode round trip"
        );
    }
}

fn replay(journal: &[u8], disk_size: u64, chunk_size: u32) {
    let mut map = DirtyMap::clean(disk_size, chunk_size);
    if replay_journal(&mut map, journal).is_ok() {
        for (i, m) in map.masks.iter().enumerate() {
            assert_eq!(m & !map.full_mask(i), 0, "a block past chunk {i}'s end");
        }
        for b in map.sums.keys() {
            assert_ne!(map.masks[(b / 64) as usize] & (1 << (b % 64)), 0);
        }
        let back = decode_dirty(&encode_dirty(&map), disk_size, chunk_size)
            .expect("a replayed map encodes to a map that decodes");
        assert_eq!(back, map);
    }
}

/// A journal of generation 0 for `chunk_size`, its records made from `bytes`.
fn journal_of(bytes: &[u8], chunk_size: u32) -> Vec<u8> {
    let block_size = mbank_station::session::block_size_for(chunk_size);
    let mut j = journal_header(0, block_size).to_vec();
    for r in bytes.chunks_exact(17) {
        let a = u64::from_le_bytes(r[1..9].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(r[9..17].try_into().expect("8 bytes"));
        let rec = match r[0] % 3 {
            0 => Record::Sum {
                block: a % (MAX_CHUNKS * 64 + 64),
                sum: r[1..17].try_into().expect("16 bytes"),
            },
            1 => Record::Intent {
                chunk: a % (MAX_CHUNKS + 1),
                mask: b,
            },
            _ => Record::Flush { seq: a },
        };
        j.extend_from_slice(&encode_record(0, &rec));
    }
    j
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let chunk_size = 4096u32 << (data[0] % 11);
    let blocks = u64::from(u32::from_le_bytes(data[1..5].try_into().expect("4 bytes")));
    let disk_size = (blocks * 4096)
        .min(MAX_CHUNKS * u64::from(chunk_size))
        .max(1);
    let map = &data[5..];
    let chunks = disk_size.div_ceil(u64::from(chunk_size)) as usize;
    bounded("dirty_map", 8 * chunks + 64 * KIB + 4 * data.len(), || {
        check(map, disk_size, chunk_size);
        check(&with_checksum(map), disk_size, chunk_size);
    });
    // The clean map, the replayed map's encoding and its decoded copy (8 bytes per
    // chunk each), the records (each at most 3x the bytes they come from) and sums.
    bounded(
        "journal",
        24 * chunks + 64 * KIB + 16 * data.len(),
        || {
            replay(map, disk_size, chunk_size);
            replay(&journal_of(map, chunk_size), disk_size, chunk_size);
        },
    );
});
