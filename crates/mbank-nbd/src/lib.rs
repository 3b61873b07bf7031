//! # mbank-nbd
//!
//! Machine Bank's NBD server: how QEMU (and any NBD client: qemu-img, nbdcopy, nbdinfo,
//! fio) reaches a machine's disk. This crate owns the protocol and nothing else; what a
//! disk *is* stays behind the [`BlockDevice`] trait, which the station implements over
//! its overlay, chunk cache and bank.
//!
//! - [`proto`]: the wire protocol as pure functions over bytes (no I/O), written from the
//!   protocol's own `doc/proto.md`: handshake, options and their replies, requests,
//!   simple replies and structured reply chunks, both directions, so it can be fuzzed and
//!   used to write test clients.
//! - [`BlockDevice`], [`Extent`], [`DeviceError`]: the seam under the protocol.
//! - [`device_errno`] / [`failure_errno`]: the one mapping from failures to NBD errors.
//! - [`serve_unix`], [`serve_tcp`], [`serve_tcp_listener`], [`serve_connection`]: the server.
//! - [`MemDevice`]: a sparse in-memory device for tests and demos.
//!
//! ## What is served
//!
//! One export per server, under a configurable name; the empty (default) name reaches it
//! too. Fixed newstyle negotiation only (`NBD_FLAG_FIXED_NEWSTYLE`,
//! `NBD_FLAG_NO_ZEROES`), with `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` (`base:allocation`) and
//! the older `EXPORT_NAME`. Every other option (TLS, extended headers, ...) is answered
//! `NBD_REP_ERR_UNSUP` and the handshake goes on. In transmission: `READ`, `WRITE`
//! (with `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES` (with `NO_HOLE`), `CACHE`,
//! `BLOCK_STATUS` and `DISC`. The advertised block sizes are 1 / the device's preferred
//! size / 32 MiB ([`proto::MAX_PAYLOAD`]).
//!
//! ## Invariants
//!
//! 1. **The device never sees an invalid request.** Every range is checked against
//!    [`BlockDevice::size`] first (reads, trims, cache and block status past the end get
//!    `EINVAL`, writes past the end `ENOSPC`), writes to a read-only device get `EPERM`,
//!    unknown commands and flags get `EINVAL`, and zero-length requests are answered as
//!    no-ops without calling the device (except `BLOCK_STATUS`, which must describe at
//!    least one byte, so it gets `EINVAL`).
//! 2. **Durability is the device's word.** A `FLUSH` or a `FUA` write is acknowledged
//!    only after the device's `flush` / `write(.., fua = true)` returned; `TRIM` with FUA
//!    is followed by a device flush. The server itself caches nothing, so
//!    `NBD_FLAG_CAN_MULTI_CONN` is advertised exactly when [`BlockDevice::multi_conn`]
//!    says the device allows it.
//! 3. **Replies never interleave.** Each reply (header and data) is written whole while
//!    holding the connection's one writer lock.
//! 4. **Bounded memory per connection.** A `WRITE` announcing more than 32 MiB ends the
//!    connection (its payload cannot be skipped safely); at most
//!    [`ServerOptions::max_in_flight`] requests and
//!    [`ServerOptions::max_in_flight_bytes`] (32 MiB) of buffers, replies not yet written
//!    included, are held, after which the server stops reading the socket until replies
//!    drain. A client that never reads its replies pins at most that (plus the kernel's
//!    socket buffer), and is closed after [`ServerOptions::write_timeout`] without
//!    progress. Option data is bounded by [`proto::MAX_OPTION_LEN`].
//! 5. **One connection cannot hurt another.** A client that breaks the protocol, or
//!    vanishes mid-request, ends only its own connection: its requests already read run
//!    to completion (their replies are dropped), then its task ends. A device that panics
//!    fails that one request with `EIO`.
//!
//! ## Limits on clients
//!
//! Idle or stalled clients cannot keep others out:
//!
//! - **Handshake**: at most [`ServerOptions::max_connections`] clients negotiate at once
//!   (the rest wait in the listen backlog), each for at most
//!   [`ServerOptions::handshake_timeout`] (10 s, as qemu-nbd's handshake limit).
//! - **Connection cap**: at most [`ServerOptions::max_connections`] (64) connections in
//!   transmission. A client that asks for the export (`NBD_OPT_GO` / `EXPORT_NAME`) when
//!   the server is full takes the place of the connection that has gone longest without
//!   a request (none in flight, idle at least [`ServerOptions::evict_idle_after`], 10 s),
//!   which is closed after answering what it had read; if every connection is busy, the
//!   newcomer is refused at once with `NBD_REP_ERR_POLICY` and a message naming the limit
//!   (as nbdkit's limit filter refuses; `EXPORT_NAME` cannot carry an error, so that
//!   connection is closed). Nobody waits forever behind idle connections.
//! - **Idle connections are not timed out by default** ([`ServerOptions::idle_timeout`]
//!   is `None`): QEMU keeps its NBD connection open while the guest does nothing, and
//!   closing it would turn the guest's next disk access into an error or a reconnect.
//!   Idle connections go only to make room at the cap, the longest idle first.
//! - **Replies nobody reads**: a reply write that makes no progress for
//!   [`ServerOptions::write_timeout`] (60 s) closes the connection; the replies still
//!   queued are dropped.
//!
//! [`ServerStats`] counts refused, evicted and timed-out connections and the buffered
//! bytes (now and at peak).
//!
//! ## Concurrency
//!
//! Per connection, one task reads requests off the socket in order (buffered, so a
//! burst of small requests costs one read). Each request is first run right there, up
//! to the point where it would wait: one the device answers at once (a warm read) is
//! answered without a task switch or a thread wake-up; one that waits (a fetch, a
//! flush) continues on its own task, and the loop goes on reading. Replies go back in
//! completion order (out of order is allowed by NBD: clients match replies by handle),
//! each header and its data in one vectored write. Ordering between overlapping requests in
//! flight is the client's business, as in NBD. The only lock this crate takes on the
//! data path is the connection's writer mutex, and nothing else is locked while it is
//! held, so there is no lock order to get wrong.
//!
//! The server runs on the caller's Tokio runtime, which needs its I/O and time drivers
//! (`Builder::enable_all`, or `#[tokio::main]`).
//!
//! ## Shutdown and crashes
//!
//! When the `shutdown` future given to a `serve_*` function completes, the server stops
//! accepting (and removes its unix socket file), each connection stops reading new
//! requests, answers the ones in flight, closes; then the function returns. Connections
//! still busy after [`ServerOptions::shutdown_grace`] are cut. The server keeps no state
//! of its own: a crash leaves at most a stale socket file, which the next
//! [`serve_unix`] on that path removes.
//!
//! ## Errors and observability
//!
//! Failures that end a connection are [`ConnectionError`]s (logged with `tracing` at
//! `warn` by the listeners); failures of one request go to the client as NBD errors and
//! are counted in [`ServerStats`]. Starting a listener fails with a [`ServeError`].

mod device;
mod errno;
mod mem;
pub mod proto;
mod server;

pub use device::{BlockDevice, DeviceError, Extent};
pub use errno::{Failure, Refusal, device_errno, failure_errno};
pub use mem::MemDevice;
pub use server::{
    BASE_ALLOCATION_ID, ConnectionEnd, ConnectionError, MAX_DESCRIPTORS, ServeError, ServerOptions,
    ServerStats, StatsSnapshot, descriptors, serve_connection, serve_tcp, serve_tcp_listener,
    serve_unix, transmission_flags,
};

/// True when every byte of `data` is zero.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(8);
    let acc = words.by_ref().fold(0u64, |acc, w| {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        acc | u64::from_ne_bytes(word)
    });
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_detection() {
        assert!(super::is_zero(&[]));
        assert!(super::is_zero(&[0; 17]));
        for i in 0..17 {
            let mut v = [0u8; 17];
            v[i] = 1;
            assert!(!super::is_zero(&v));
        }
    }
}
