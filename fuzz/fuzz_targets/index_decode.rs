//! Disk and memory indexes (`mbank_core::index`), as the catalog and the server read
//! them.
//!
//! The input is parsed as it is, and again with a valid BLAKE3 trailer appended so
//! that mutations reach the checks behind the checksum. An index that parses must
//! encode back to the same bytes.
//!
//! Allocation bound: 64 KiB + 4 bytes per input byte held at once (the parser checks
//! the entry count against the length before it allocates).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_core::index::{DiskIndex, MemoryIndex};
use mbank_fuzz::{KIB, bounded, with_checksum};

fn check(bytes: &[u8]) {
    if let Ok(ix) = DiskIndex::from_bytes(bytes) {
        assert_eq!(ix.to_bytes(), bytes, "a disk index did not round-trip");
        assert_eq!(
            ix.chunks.len() as u64,
            DiskIndex::chunk_count(ix.disk_size, ix.chunk_size)
        );
    }
    if let Ok(ix) = MemoryIndex::from_bytes(bytes) {
        assert_eq!(ix.to_bytes(), bytes, "a memory index did not round-trip");
    }
}

fuzz_target!(|data: &[u8]| {
    bounded("index_decode", 64 * KIB + 4 * data.len(), || {
        check(data);
        check(&with_checksum(data));
    });
});
