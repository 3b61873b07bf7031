//! A station session's durable dirty map (`mbank_station::session::decode_dirty`).
//!
//! Input: byte 0 picks the chunk size (4 KiB << (b % 11): 4 KiB ..= 4 MiB), bytes 1..5
//! the disk size (a u32 LE count of 4 KiB blocks, capped at 65536 chunks), the rest is
//! the map; it is decoded as it is and with a valid checksum appended. A
//! map that decodes must encode to a map that decodes to the same.
//!
//! Allocation bound: 8 bytes per chunk (at most 512 KiB) + 64 KiB + 4 bytes per input
//! byte held at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_fuzz::{KIB, bounded, with_checksum};
use mbank_station::session::{decode_dirty, encode_dirty};

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
});
