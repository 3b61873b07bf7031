//! The body of a commit (`POST /v1/machines/{m}/versions`) as the server reads it:
//! `wire::parse_commit_body` (header length, JSON header, disk index, stream indexes),
//! then the disk index and each stream's index parsed as the server does.
//!
//! A header that parses builds a body (`wire::commit_body`) that parses back alike.
//!
//! Allocation bound: 64 KiB + 24 bytes per input byte held at once (the JSON header
//! is at most `MAX_JSON`; a list of streams costs more parsed than written, and the
//! target copies the body once more to build it back).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_core::index::{DiskIndex, MemoryIndex};
use mbank_fuzz::{KIB, bounded};
use mbank_remote::wire;

fn header_json_len(body: &[u8]) -> usize {
    u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) as usize
}

fuzz_target!(|data: &[u8]| {
    bounded("commit_body", 64 * KIB + 24 * data.len(), || {
        let Ok((header, index, streams)) = wire::parse_commit_body(data) else {
            return;
        };
        assert_eq!(streams.len(), header.streams.len());
        assert_eq!(index.len() as u64, header.index_len);
        let _ = DiskIndex::from_bytes(index);
        for s in &streams {
            let _ = MemoryIndex::from_bytes(s);
        }
        // What the client would send for this header parses back alike.
        let owned: Vec<Vec<u8>> = streams.iter().map(|s| s.to_vec()).collect();
        let again = wire::commit_body(&header, index, &owned);
        if again.len() + header_json_len(data) - data.len() > wire::MAX_JSON {
            return; // rewritten, the header outgrew the limit (`1E1` becomes `10.0`)
        }
        let (h2, index2, streams2) =
            wire::parse_commit_body(&again).expect("a built commit body parses");
        assert_eq!((index2, &streams2), (index, &streams));
        assert_eq!(h2.streams, header.streams);
    });
});
