//! NBD transmission: request headers and WRITE payloads, through the server.
//!
//! The first input byte picks the negotiation (bit 0 structured replies, bit 1 the
//! `base:allocation` context, bit 2 a read-only device); a valid handshake is sent,
//! then the rest of the input as the client's requests, to a server over a 1 MiB
//! `MemDevice`. Every 28-byte window is also run through `parse_request` directly.
//!
//! Allocation bound: `MAX_PAYLOAD` (32 MiB: the server takes a WRITE's announced
//! payload, and holds at most that much of buffers in flight) + 1 MiB (the device's
//! data) + 512 KiB + 4 bytes per input byte held at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbank_fuzz::{KIB, MIB, bounded, handshake, serve};
use mbank_nbd::proto::{self, MAX_PAYLOAD, REQUEST_LEN};
use mbank_nbd::{MemDevice, ServerOptions};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, requests)) = data.split_first() else {
        return;
    };
    let bound = MAX_PAYLOAD as usize + MIB + 512 * KIB + 4 * data.len();
    bounded("nbd_requests", bound, || {
        for w in requests.windows(REQUEST_LEN).step_by(7) {
            if let Ok(req) = proto::parse_request(w) {
                assert!(req.payload_len() <= MAX_PAYLOAD);
                assert_eq!(proto::parse_request(&req.encode()), Ok(req));
            }
        }
        let mut client = handshake(mode, "fuzz");
        client.extend_from_slice(requests);
        let device = MemDevice::new(MIB as u64).with_read_only(mode & 4 != 0);
        serve(&client, device, &ServerOptions::with_export_name("fuzz"));
    });
});
