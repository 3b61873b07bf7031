//! An upload batch (`POST /v1/chunks`) as the server reads it: `wire::parse_batch_body`
//! splits it into (id, stored bytes), then each chunk is decoded and checked against
//! its id (`mbank_core::chunk::decode`), as the server's `store_uploads` does. A body
//! that splits must build back to the same bytes.
//!
//! Allocation bound: `MAX_PLAIN_LEN` (16 MiB, one chunk decoded at a time) + 64 KiB +
//! 2 bytes per input byte held at once (at most `MAX_BATCH_CHUNKS` entries).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_core::chunk::{self, MAX_PLAIN_LEN};
use mbank_fuzz::{KIB, bounded};
use mbank_remote::wire;

fuzz_target!(|data: &[u8]| {
    bounded(
        "batch_upload",
        MAX_PLAIN_LEN + 64 * KIB + 2 * data.len(),
        || {
            let Ok(parts) = wire::parse_batch_body(data) else {
                return;
            };
            assert!(parts.len() <= wire::MAX_BATCH_CHUNKS);
            assert_eq!(wire::batch_body(parts.iter().map(|(id, b)| (id, *b))), data);
            for (id, bytes) in &parts {
                let _ = chunk::decode(id, bytes);
            }
        },
    );
});
