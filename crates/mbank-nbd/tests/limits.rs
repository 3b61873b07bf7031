//! Limits that keep the server up under idle, stalled and too many clients: the
//! connection cap with idle eviction and refusal, the idle and write timeouts, and the
//! per-connection bound on buffered reply bytes. Raw clients from `mbank_nbd::proto`,
//! with a real client (qemu-io, nbdinfo) alongside.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mbank_nbd::proto::*;
use mbank_nbd::{BlockDevice, DeviceError, Extent, MemDevice, ServerOptions};

const MIB: u64 = 1024 * 1024;

/// How long a test waits for something the fixed server does at once; on a server that
/// never does it the test fails here instead of hanging.
const BOUND: Duration = Duration::from_secs(30);

/// Connects with a bounded read timeout, so a client stuck in the listen backlog fails
/// the test instead of hanging it.
fn connect_bounded(server: &TestServer) -> RawClient {
    let sock = UnixStream::connect(&server.socket).expect("connecting");
    sock.set_read_timeout(Some(BOUND)).expect("timeout");
    RawClient::from_stream(sock)
}

fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < BOUND, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn go_request() -> ClientOption {
    ClientOption::Go(InfoRequest {
        export: "disk".into(),
        requests: vec![],
    })
}

#[test]
fn idle_clients_at_the_cap_make_room_for_new_ones() {
    let server = TestServer::start_with(
        Arc::new(MemDevice::new(4 * MIB)),
        ServerOptions {
            evict_idle_after: Duration::ZERO,
            ..ServerOptions::with_export_name("disk")
        },
    );
    let cap = ServerOptions::default().max_connections;
    let mut idle: Vec<RawClient> = (0..cap)
        .map(|_| {
            let mut c = connect_bounded(&server);
            c.go("disk", false, false);
            c
        })
        .collect();
    assert_eq!(server.stats().connections_active, cap as u64);

    // A new client is greeted, negotiates and is served: the longest idle one goes.
    let mut c = connect_bounded(&server);
    c.go("disk", true, false);
    assert_eq!(c.call(Command::Write, 0, 0, 5, b"fresh").error, 0);
    assert_eq!(c.call(Command::Read, 0, 0, 5, &[]).data, b"fresh");
    assert!(idle[0].closed_by_server(), "the longest idle client stays");
    assert_eq!(server.stats().connections_evicted, 1);

    // A real client gets in too, alongside.
    require("qemu-io", "qemu-utils");
    let out = run(std::process::Command::new("qemu-io")
        .args(["-f", "raw"])
        .args([
            "-c",
            "write -P 0x5a 65536 65536",
            "-c",
            "read -P 0x5a 65536 65536",
        ])
        .arg(server.uri()));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");
    assert!(idle[1].closed_by_server(), "the next idle client stays");
    assert_eq!(server.stats().connections_evicted, 2);

    // The others are still served.
    let last = idle.last_mut().expect("clients");
    assert_eq!(last.call(Command::Read, 0, 0, 5, &[]).data, b"fresh");
    c.disconnect();
    server.stop();
}

/// Reads wait for a permit on `gate`; everything else goes straight to memory.
struct GatedDevice {
    inner: MemDevice,
    gate: tokio::sync::Semaphore,
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        self.gate.acquire().await.expect("gate closed").forget();
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.inner.write_zeroes(offset, len, no_hole, fua).await
    }
    async fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.inner.cache(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        self.inner.block_status(offset, len).await
    }
}

#[test]
fn a_full_server_of_busy_connections_refuses_newcomers_with_policy() {
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(MIB),
        gate: tokio::sync::Semaphore::new(0),
    });
    let server = TestServer::start_with(
        dev.clone(),
        ServerOptions {
            max_connections: 4,
            evict_idle_after: Duration::ZERO,
            ..ServerOptions::with_export_name("disk")
        },
    );
    let mut busy: Vec<(RawClient, u64)> = (0..4)
        .map(|_| {
            let mut c = connect_bounded(&server);
            c.go("disk", false, false);
            let h = c.send(Command::Read, 0, 0, 512, &[]);
            // The flush is answered only after the read was taken off the socket.
            assert_eq!(c.call(Command::Flush, 0, 0, 0, &[]).error, 0);
            (c, h)
        })
        .collect();

    // Every connection has a request in flight: the newcomer is told why, at once.
    let mut c = connect_bounded(&server);
    let r = c.option(&go_request());
    assert!(
        matches!(&r[..], [OptionReply::Error { kind: RepError::Policy, message }]
            if message.contains("4 connections")),
        "{r:?}"
    );
    assert_eq!(server.stats().connections_refused, 1);

    // Once the requests are answered the connections are idle, and the newcomer's next
    // GO takes the place of one of them.
    dev.gate.add_permits(4);
    for (b, h) in &mut busy {
        let r = b.recv();
        assert_eq!((r.handle, r.error), (*h, 0));
    }
    let replies = c.option(&go_request());
    assert_eq!(replies.last(), Some(&OptionReply::Ack), "{replies:?}");
    dev.gate.add_permits(1);
    assert_eq!(c.call(Command::Read, 0, 0, 512, &[]).data, vec![0u8; 512]);
    assert_eq!(server.stats().connections_evicted, 1);
    c.disconnect();
    server.stop();
}

#[test]
fn a_client_that_never_reads_replies_pins_bounded_memory_and_is_closed() {
    let server = TestServer::start_with(
        Arc::new(MemDevice::new(64 * MIB)),
        ServerOptions {
            write_timeout: Duration::from_secs(2),
            ..ServerOptions::with_export_name("disk")
        },
    );
    let mut c = connect_bounded(&server);
    c.go("disk", false, false);
    // 64 reads of 8 MiB (512 MiB of replies), and never a byte read back.
    let read = 8 * MIB as u32;
    let mut bytes = Vec::new();
    for i in 0..64u64 {
        let req = Request {
            flags: 0,
            command: Command::Read,
            handle: i + 1,
            offset: (i % 8) * u64::from(read),
            len: read,
        };
        bytes.extend_from_slice(&req.encode());
    }
    c.write(&bytes);
    poll_until("the server to hold replies for the stalled client", || {
        server.stats().buffered_bytes >= 2 * u64::from(read)
    });

    // Another client is served meanwhile.
    require("nbdinfo", "libnbd-bin");
    let out = run(std::process::Command::new("nbdinfo")
        .arg("--size")
        .arg(server.uri()));
    assert_eq!(out.trim(), (64 * MIB).to_string());

    // The stalled connection is closed after the write timeout ...
    poll_until("the stalled connection to be closed", || {
        server.stats().connections_active == 0
    });
    let mut sink = Vec::new();
    c.sock
        .read_to_end(&mut sink)
        .expect("the client sees the connection end");
    let s = server.stats();
    assert!(s.connections_timed_out >= 1, "{s:?}");
    assert_eq!(s.buffered_bytes, 0, "{s:?}");
    // ... and what it pinned never went past the per-connection budget.
    assert!(s.buffered_bytes_peak <= 32 * MIB, "{s:?}");
    assert!(s.requests < 64, "all 64 reads were taken in: {s:?}");
    server.stop();
}

#[test]
fn idle_timeout_closes_idle_connections_but_not_busy_ones() {
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(MIB),
        gate: tokio::sync::Semaphore::new(0),
    });
    let server = TestServer::start_with(
        dev.clone(),
        ServerOptions {
            idle_timeout: Some(Duration::from_millis(300)),
            ..ServerOptions::with_export_name("disk")
        },
    );
    let mut busy = connect_bounded(&server);
    busy.go("disk", false, false);
    let h = busy.send(Command::Read, 0, 0, 512, &[]);
    assert_eq!(busy.call(Command::Flush, 0, 0, 0, &[]).error, 0);

    // Connected after the busy one sent its last request: once it is closed as idle,
    // the busy one has been without new requests for longer than the timeout too.
    let mut idle = connect_bounded(&server);
    idle.go("disk", false, false);
    assert!(idle.closed_by_server(), "the idle connection stays open");
    assert!(server.stats().connections_timed_out >= 1);

    dev.gate.add_permits(1);
    let r = busy.recv();
    assert_eq!((r.handle, r.error), (h, 0));
    assert_eq!(r.data, vec![0u8; 512]);
    drop(busy);
    server.stop();
}
