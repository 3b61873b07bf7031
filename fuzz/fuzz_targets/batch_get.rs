//! The answer to a batch get (`POST /v1/chunks/get`) as the client reads it:
//! `wire::parse_chunks_answer`. Byte 0 is how many chunks were asked (0 ..=
//! `MAX_GET_MANY`), the rest the answer. An answer that splits must build back to the
//! same bytes and hold 1 to that many chunks. The same bytes as a query (the body of
//! `chunks/get` and `chunks/have` as the server reads it: `wire::parse_id_list`): a
//! list that parses is whole ids, at most the bound, in order.
//!
//! Allocation bound: 64 KiB + 2 bytes per input byte held at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_fuzz::{KIB, bounded};
use mbank_remote::wire;

fuzz_target!(|data: &[u8]| {
    let Some((&n, answer)) = data.split_first() else {
        return;
    };
    let n = usize::from(n) % (wire::MAX_GET_MANY + 1);
    bounded("batch_get", 64 * KIB + 2 * data.len(), || {
        let Ok(chunks) = wire::parse_chunks_answer(answer, n) else {
            return;
        };
        assert!(chunks.len() <= n && (n == 0 || !chunks.is_empty()));
        assert_eq!(wire::chunks_answer(chunks.iter().copied()), answer);
    });
    bounded("id_list", 64 * KIB + 2 * data.len(), || {
        for max in [wire::MAX_GET_MANY, wire::MAX_HAVE] {
            if let Ok(ids) = wire::parse_id_list(data, max) {
                assert!(ids.len() <= max);
                let back: Vec<u8> = ids.iter().flat_map(|id| *id.as_bytes()).collect();
                assert_eq!(back, data);
            }
        }
    });
});
