//! A stored chunk (`mbank_core::chunk`): header, raw or zstd payload, hash check.
//!
//! The first 32 input bytes are the id asked for, the rest the stored bytes. As the
//! id rarely matches, the stored bytes are also decoded under the id of what they
//! decompress to, and a chunk that decodes must encode back to a chunk that decodes
//! to the same plaintext.
//!
//! Allocation bound: `MAX_PLAIN_LEN` (16 MiB: decoding allocates the plaintext length
//! the header claims, by design) + 64 KiB + 2 bytes per input byte held at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_core::ChunkId;
use mbank_core::chunk::{self, MAX_PLAIN_LEN};
use mbank_fuzz::{KIB, bounded};

fuzz_target!(|data: &[u8]| {
    if data.len() < 32 {
        return;
    }
    let (id, stored) = data.split_at(32);
    let id = ChunkId::from_bytes(id.try_into().expect("32 bytes"));
    bounded(
        "chunk_decode",
        MAX_PLAIN_LEN + 64 * KIB + 2 * data.len(),
        || {
            let header = chunk::parse_header(&id, stored);
            match chunk::decode(&id, stored) {
                Ok(d) => {
                    assert!(header.is_ok());
                    assert_eq!(ChunkId::of(&d.plain), id);
                }
                Err(chunk::ChunkError::HashMismatch { actual, .. }) => {
                    let d = chunk::decode(&actual, stored).expect("decodes under its own id");
                    let again = chunk::encode(&d.plain, 1);
                    let back = chunk::decode(&again.id, &again.bytes).expect("a new chunk decodes");
                    assert_eq!(back.plain, d.plain);
                }
                Err(_) => {}
            }
        },
    );
});
