//! The NBD handshake as a client sends it: client flags, then options (header + data).
//!
//! The input is the client's whole byte stream. The codec's own parsers walk it first
//! (`parse_client_flags`, `parse_option_header`, `parse_option`), then a server over a
//! 64 KiB `MemDevice` is served the same bytes, cut after the first `GO` or
//! `EXPORT_NAME` the walk finds so that transmission is left to `nbd_requests`.
//!
//! Allocation bound: 256 KiB + 4 bytes per input byte held at once (option data is at
//! most `MAX_OPTION_LEN`, 64 KiB; replies are small).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_fuzz::{KIB, bounded, serve};
use mbank_nbd::proto::{self, ClientOption, OPTION_HEADER_LEN};
use mbank_nbd::{MemDevice, ServerOptions};

/// Where the handshake ends: after the first option that enters transmission.
fn walk(data: &[u8]) -> usize {
    let Some(flags) = data.get(..4) else {
        return data.len();
    };
    if proto::parse_client_flags(flags).is_err() {
        return data.len();
    }
    let mut at = 4;
    while let Some(head) = data.get(at..at + OPTION_HEADER_LEN) {
        let Ok(h) = proto::parse_option_header(head) else {
            break;
        };
        at += OPTION_HEADER_LEN;
        let Some(body) = data.get(at..at + h.len as usize) else {
            break;
        };
        at += body.len();
        if let Ok(opt) = proto::parse_option(h.option, body) {
            // What was parsed encodes back to an option the parser accepts alike.
            if !matches!(opt, ClientOption::Unknown(_) | ClientOption::Abort) {
                let again = opt.encode();
                let h2 = proto::parse_option_header(&again[..OPTION_HEADER_LEN])
                    .expect("an encoded option header parses");
                let back = proto::parse_option(h2.option, &again[OPTION_HEADER_LEN..])
                    .expect("an encoded option parses");
                assert_eq!(back, opt, "an option changed in an encode/parse round trip");
            }
            if matches!(opt, ClientOption::Go(_) | ClientOption::ExportName(_)) {
                return at;
            }
        }
    }
    data.len()
}

fuzz_target!(|data: &[u8]| {
    bounded("nbd_options", 256 * KIB + 4 * data.len(), || {
        let end = walk(data);
        let opts = ServerOptions::with_export_name("fuzz");
        serve(&data[..end], MemDevice::new(64 * KIB as u64), &opts);
    });
});
