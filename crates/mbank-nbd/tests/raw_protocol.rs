//! Protocol edges driven by our own client (written from `mbank_nbd::proto`), where the
//! real clients cannot send what we need: unknown options and commands, bad flags,
//! EXPORT_NAME, clients that vanish mid-request, forced out-of-order completion.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::*;
use mbank_nbd::proto::*;
use mbank_nbd::{
    BlockDevice, ConnectionEnd, DeviceError, Extent, MemDevice, ServeError, ServerOptions,
};

const MIB: u64 = 1024 * 1024;

fn mem(size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new(size))
}

#[test]
fn unknown_options_are_refused_and_the_handshake_goes_on() {
    let server = TestServer::start(mem(MIB));
    let mut c = server.client();
    assert_eq!(
        c.handshake_flags,
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        "handshake flags"
    );
    for code in [99u32, 4, 11, 0x7fff_ffff] {
        let r = c.raw_option(code, b"some data the server must skip");
        assert!(
            matches!(
                &r[..],
                [OptionReply::Error {
                    kind: RepError::Unsup,
                    ..
                }]
            ),
            "option {code}: {r:?}"
        );
    }
    let r = c.option(&ClientOption::StartTls);
    assert!(matches!(
        &r[..],
        [OptionReply::Error {
            kind: RepError::Unsup,
            ..
        }]
    ));
    // Malformed known options: INVALID, and still going.
    let r = c.raw_option(OPT_LIST, b"junk");
    assert!(matches!(
        &r[..],
        [OptionReply::Error {
            kind: RepError::Invalid,
            ..
        }]
    ));
    let r = c.raw_option(OPT_GO, &[0, 0, 0, 9, b'x']);
    assert!(matches!(
        &r[..],
        [OptionReply::Error {
            kind: RepError::Invalid,
            ..
        }]
    ));
    // Meta contexts before structured replies: INVALID.
    let r = c.option(&ClientOption::SetMetaContext(MetaContextRequest {
        export: "disk".into(),
        queries: vec![META_BASE_ALLOCATION.into()],
    }));
    assert!(matches!(
        &r[..],
        [OptionReply::Error {
            kind: RepError::Invalid,
            ..
        }]
    ));

    c.go("disk", false, false);
    assert_eq!(c.size, MIB);
    let reply = c.call(Command::Read, 0, 0, 512, &[]);
    assert_eq!(reply.error, 0);
    assert!(reply.simple);
    assert_eq!(reply.data, vec![0u8; 512]);
    c.disconnect();
    server.stop();
}

#[test]
fn list_info_and_unknown_export() {
    let server = TestServer::start_with(
        mem(3 * MIB),
        ServerOptions {
            description: Some("alice/dev disk 0".into()),
            ..ServerOptions::with_export_name("disk")
        },
    );
    let mut c = server.client();
    let r = c.option(&ClientOption::List);
    assert_eq!(
        r,
        vec![
            OptionReply::Server {
                name: "disk".into(),
                details: "alice/dev disk 0".into()
            },
            OptionReply::Ack
        ]
    );
    let r = c.option(&ClientOption::Info(InfoRequest {
        export: "nope".into(),
        requests: vec![],
    }));
    assert!(
        matches!(&r[..], [OptionReply::Error { kind: RepError::Unknown, message }] if message.contains("nope")),
        "{r:?}"
    );
    let r = c.option(&ClientOption::Info(InfoRequest {
        export: String::new(),
        requests: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    }));
    assert!(r.contains(&OptionReply::Info(Info::Name("disk".into()))));
    assert!(r.contains(&OptionReply::Info(Info::Description(
        "alice/dev disk 0".into()
    ))));
    assert!(r.contains(&OptionReply::Info(Info::BlockSize {
        min: 1,
        preferred: 4096,
        max: MAX_PAYLOAD
    })));
    let flags = r
        .iter()
        .find_map(|r| match r {
            OptionReply::Info(Info::Export { size, flags }) => {
                assert_eq!(*size, 3 * MIB);
                Some(*flags)
            }
            _ => None,
        })
        .expect("INFO_EXPORT");
    let expected = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_CACHE
        | FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, expected);
    assert_eq!(r.last(), Some(&OptionReply::Ack));
    // GO to an unknown export fails and the session goes on; then GO works.
    let r = c.option(&ClientOption::Go(InfoRequest {
        export: "other".into(),
        requests: vec![],
    }));
    assert!(matches!(
        &r[..],
        [OptionReply::Error {
            kind: RepError::Unknown,
            ..
        }]
    ));
    c.go("disk", true, false);
    assert_eq!(c.export_flags, expected | FLAG_SEND_DF);
    c.disconnect();

    // LIST refused by policy.
    let server2 = TestServer::start_with(
        mem(MIB),
        ServerOptions {
            allow_list: false,
            ..ServerOptions::default()
        },
    );
    let mut c = server2.client();
    let r = c.option(&ClientOption::List);
    assert!(matches!(
        &r[..],
        [OptionReply::Error {
            kind: RepError::Policy,
            ..
        }]
    ));
    let r = c.option(&ClientOption::Abort);
    assert_eq!(r, vec![OptionReply::Ack]);
    assert!(c.closed_by_server());
    server2.stop();
    server.stop();
}

#[test]
fn export_name_the_old_way() {
    let dev = mem(MIB);
    dev.write_at(0, b"hello").expect("seed");
    let server = TestServer::start(dev);

    // With NO_ZEROES: exactly size + flags.
    let mut c = server.client();
    c.write(&ClientOption::ExportName("disk".into()).encode());
    let mut reply = [0u8; 10];
    c.read_exact(&mut reply);
    let (size, flags) = parse_export_name_reply(&reply).expect("reply");
    assert_eq!(size, MIB);
    assert_ne!(flags & FLAG_HAS_FLAGS, 0);
    assert_eq!(c.call(Command::Read, 0, 0, 5, &[]).data, b"hello");
    c.disconnect();

    // Without NO_ZEROES, the default (empty) name: 124 zero bytes follow.
    let mut c = RawClient::connect_with_flags(&server.socket, FLAG_C_FIXED_NEWSTYLE);
    c.write(&ClientOption::ExportName(String::new()).encode());
    let mut reply = vec![0u8; EXPORT_NAME_REPLY_LEN];
    c.read_exact(&mut reply);
    assert_eq!(parse_export_name_reply(&reply).expect("reply").0, MIB);
    assert!(reply[10..].iter().all(|&b| b == 0));
    assert_eq!(c.call(Command::Read, 0, 0, 5, &[]).data, b"hello");
    c.disconnect();

    // An unknown name cannot be refused politely: the server hangs up.
    let mut c = server.client();
    c.write(&ClientOption::ExportName("wrong".into()).encode());
    assert!(c.closed_by_server());
    // Unknown client flags: hang up too.
    let mut c = RawClient::connect_with_flags(&server.socket, 0x8000_0000);
    assert!(c.closed_by_server());
    wait_until("failed connections to be counted", || {
        server.stats().connections_failed >= 2
    });
    server.stop();
}

#[test]
fn unknown_commands_and_bad_flags_get_einval_and_the_connection_goes_on() {
    let server = TestServer::start(mem(MIB));
    for structured in [false, true] {
        let mut c = server.client();
        c.go("disk", structured, false);
        let r = c.call(Command::Unknown(42), 0, 0, 512, &[]);
        assert_eq!(r.error, EINVAL, "unknown command");
        let r = c.call(Command::Write, CMD_FLAG_NO_HOLE, 0, 4, b"abcd");
        assert_eq!(r.error, EINVAL, "NO_HOLE on WRITE");
        let r = c.call(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 4, &[]);
        assert_eq!(r.error, EINVAL, "FAST_ZERO was not advertised");
        let r = c.call(Command::Read, 1 << 12, 0, 4, &[]);
        assert_eq!(r.error, EINVAL, "unknown flag");
        // BLOCK_STATUS without a negotiated context.
        let r = c.call(Command::BlockStatus, 0, 0, 4096, &[]);
        assert_eq!(r.error, EINVAL, "block status without a context");
        if structured {
            assert!(!r.message.is_empty(), "structured errors carry a message");
            // READ with DF is fine once structured replies are on.
            assert_eq!(c.call(Command::Read, CMD_FLAG_DF, 0, 4, &[]).error, 0);
        } else {
            assert_eq!(c.call(Command::Read, CMD_FLAG_DF, 0, 4, &[]).error, EINVAL);
        }
        // Still serving.
        assert_eq!(c.call(Command::Write, CMD_FLAG_FUA, 0, 4, b"abcd").error, 0);
        assert_eq!(c.call(Command::Read, 0, 0, 4, &[]).data, b"abcd");
        c.disconnect();
    }
    server.stop();
}

#[test]
fn ranges_are_checked_and_zero_lengths_are_no_ops() {
    let dev = mem(MIB);
    let server = TestServer::start(dev.clone());
    for structured in [false, true] {
        let mut c = server.client();
        c.go("disk", structured, structured);
        let end = MIB;
        assert_eq!(c.call(Command::Read, 0, end - 100, 512, &[]).error, EINVAL);
        assert_eq!(c.call(Command::Read, 0, end + 1, 0, &[]).error, EINVAL);
        assert_eq!(
            c.call(Command::Read, 0, u64::MAX - 10, 512, &[]).error,
            EINVAL
        );
        assert_eq!(c.call(Command::Write, 0, end - 2, 4, b"abcd").error, ENOSPC);
        assert_eq!(c.call(Command::WriteZeroes, 0, end, 512, &[]).error, ENOSPC);
        assert_eq!(c.call(Command::Trim, 0, end - 1, 2, &[]).error, EINVAL);
        assert_eq!(c.call(Command::Cache, 0, end, 1, &[]).error, EINVAL);
        if structured {
            assert_eq!(
                c.call(Command::BlockStatus, 0, end - 1, 2, &[]).error,
                EINVAL
            );
            assert_eq!(c.call(Command::BlockStatus, 0, 0, 0, &[]).error, EINVAL);
        }
        // Reads over the 32 MiB bound are refused without dropping the connection.
        assert_eq!(
            c.call(Command::Read, 0, 0, MAX_PAYLOAD + 1, &[]).error,
            EINVAL
        );
        // Zero-length requests are accepted as no-ops, also exactly at the end.
        for offset in [0, 4096, end] {
            let r = c.call(Command::Read, 0, offset, 0, &[]);
            assert_eq!((r.error, r.data.len()), (0, 0));
            assert_eq!(c.call(Command::Write, 0, offset, 0, &[]).error, 0);
            assert_eq!(c.call(Command::Trim, 0, offset, 0, &[]).error, 0);
            assert_eq!(c.call(Command::WriteZeroes, 0, offset, 0, &[]).error, 0);
            assert_eq!(c.call(Command::Cache, 0, offset, 0, &[]).error, 0);
        }
        // The last byte is reachable.
        assert_eq!(c.call(Command::Write, 0, end - 1, 1, b"z").error, 0);
        assert_eq!(c.call(Command::Read, 0, end - 1, 1, &[]).data, b"z");
        c.disconnect();
    }
    assert_eq!(dev.cache_count(), 0, "zero-length CACHE reached the device");
    let stats = server.stats();
    assert!(stats.request_errors >= 16, "{stats:?}");
    server.stop();
}

#[test]
fn structured_replies_block_status_and_holes() {
    let dev = mem(4 * MIB);
    let data = pattern(128 * 1024, 7);
    dev.write_at(MIB, &data).expect("seed");
    let server = TestServer::start(dev.clone());
    let mut c = server.client();
    let r = c.option(&ClientOption::StructuredReply);
    assert_eq!(r, vec![OptionReply::Ack]);
    c.structured = true;
    let r = c.option(&ClientOption::ListMetaContext(MetaContextRequest {
        export: "disk".into(),
        queries: vec![],
    }));
    assert_eq!(
        r,
        vec![
            OptionReply::MetaContext {
                id: 0,
                name: META_BASE_ALLOCATION.into()
            },
            OptionReply::Ack
        ]
    );
    let r = c.option(&ClientOption::ListMetaContext(MetaContextRequest {
        export: "disk".into(),
        queries: vec!["qemu:dirty-bitmap:x".into()],
    }));
    assert_eq!(r, vec![OptionReply::Ack], "unknown namespaces are ignored");
    let r = c.option(&ClientOption::SetMetaContext(MetaContextRequest {
        export: "disk".into(),
        queries: vec![
            "base:".into(),
            "x-other:thing".into(),
            META_BASE_ALLOCATION.into(),
        ],
    }));
    assert_eq!(
        r,
        vec![
            OptionReply::MetaContext {
                id: mbank_nbd::BASE_ALLOCATION_ID,
                name: META_BASE_ALLOCATION.into()
            },
            OptionReply::Ack
        ]
    );
    c.go("disk", false, false);

    // A read of a hole comes back as one OFFSET_HOLE chunk, data as OFFSET_DATA.
    let r = c.call(Command::Read, 0, 0, 65536, &[]);
    assert_eq!(
        r.chunks,
        vec![Chunk::OffsetHole {
            offset: 0,
            len: 65536
        }]
    );
    let r = c.call(Command::Read, 0, MIB, 4096, &[]);
    assert!(matches!(&r.chunks[..], [Chunk::OffsetData { offset, .. }] if *offset == MIB));
    assert_eq!(r.data, data[..4096]);
    // DF: never a hole chunk.
    let r = c.call(Command::Read, CMD_FLAG_DF, 0, 4096, &[]);
    assert!(matches!(&r.chunks[..], [Chunk::OffsetData { .. }]));
    // Non-read successes end with NONE; errors with an ERROR chunk and a message.
    assert_eq!(
        c.call(Command::Flush, 0, 0, 0, &[]).chunks,
        vec![Chunk::None]
    );
    let r = c.call(Command::Read, 0, 4 * MIB, 1, &[]);
    assert!(
        matches!(&r.chunks[..], [Chunk::Error { error, message }] if *error == EINVAL && message.contains("past the end"))
    );

    // Block status: hole, data, hole.
    let r = c.call(Command::BlockStatus, 0, 0, (4 * MIB) as u32, &[]);
    let Chunk::BlockStatus { context, extents } = &r.chunks[0] else {
        panic!("{r:?}")
    };
    assert_eq!(*context, mbank_nbd::BASE_ALLOCATION_ID);
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        extents,
        &vec![
            BlockDescriptor {
                len: MIB as u32,
                flags: hz
            },
            BlockDescriptor {
                len: 128 * 1024,
                flags: 0
            },
            BlockDescriptor {
                len: (3 * MIB - 128 * 1024) as u32,
                flags: hz
            },
        ]
    );
    let r = c.call(
        Command::BlockStatus,
        CMD_FLAG_REQ_ONE,
        MIB - 4096,
        8192,
        &[],
    );
    assert_eq!(
        r.chunks,
        vec![Chunk::BlockStatus {
            context: mbank_nbd::BASE_ALLOCATION_ID,
            extents: vec![BlockDescriptor {
                len: 4096,
                flags: hz
            }]
        }]
    );
    // Write zeroes: punching makes a hole; NO_HOLE keeps it allocated but zero.
    let block = MemDevice::BLOCK as u64;
    assert_eq!(
        c.call(Command::WriteZeroes, 0, MIB, block as u32, &[])
            .error,
        0
    );
    assert!(!dev.is_allocated(MIB));
    assert_eq!(
        c.call(
            Command::WriteZeroes,
            CMD_FLAG_NO_HOLE,
            MIB + block,
            block as u32,
            &[]
        )
        .error,
        0
    );
    assert!(dev.is_allocated(MIB + block));
    let r = c.call(Command::BlockStatus, 0, MIB + block, block as u32, &[]);
    assert_eq!(
        r.chunks,
        vec![Chunk::BlockStatus {
            context: mbank_nbd::BASE_ALLOCATION_ID,
            extents: vec![BlockDescriptor {
                len: block as u32,
                flags: STATE_ZERO
            }]
        }]
    );
    // CACHE reaches the device; TRIM deallocates.
    assert_eq!(c.call(Command::Cache, 0, 0, 4096, &[]).error, 0);
    assert_eq!(dev.cache_count(), 1);
    assert_eq!(
        c.call(Command::Trim, CMD_FLAG_FUA, MIB + block, block as u32, &[])
            .error,
        0
    );
    assert!(!dev.is_allocated(MIB + block));
    c.disconnect();
    server.stop();
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dev = Arc::new(MemDevice::from_bytes(&pattern(MIB as usize, 3)).with_read_only(true));
    let server = TestServer::start(dev.clone());
    let mut c = server.client();
    c.go("disk", false, false);
    assert_ne!(c.export_flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        c.export_flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES),
        0
    );
    assert_eq!(c.call(Command::Write, 0, 0, 4, b"abcd").error, EPERM);
    assert_eq!(c.call(Command::Write, 0, 0, 0, &[]).error, EPERM);
    assert_eq!(c.call(Command::Trim, 0, 0, 4096, &[]).error, EPERM);
    assert_eq!(c.call(Command::WriteZeroes, 0, 0, 4096, &[]).error, EPERM);
    assert_eq!(c.call(Command::Flush, 0, 0, 0, &[]).error, 0);
    assert_eq!(
        c.call(Command::Read, 0, 0, 16, &[]).data,
        pattern(MIB as usize, 3)[..16]
    );
    c.disconnect();
    assert_eq!(dev.to_vec(), pattern(MIB as usize, 3));
    server.stop();
}


fn gated() -> Arc<GatedDevice> {
    let inner = MemDevice::from_bytes(&pattern(MIB as usize, 11));
    Arc::new(GatedDevice::new(inner, false))
}

#[test]
fn replies_come_back_out_of_order() {
    let dev = gated();
    let server = TestServer::start(dev.clone());
    let want = pattern(MIB as usize, 11);
    for structured in [false, true] {
        let mut c = server.client();
        c.go("disk", structured, false);
        let first = c.send(Command::Read, 0, 0, 4096, &[]);
        let second = c.send(Command::Read, 0, 8192, 4096, &[]);
        let r = c.recv();
        assert_eq!(r.handle, second, "the later request must be answered first");
        assert_eq!(r.data, want[8192..12288]);
        dev.gate.add_permits(1);
        let r = c.recv();
        assert_eq!(r.handle, first);
        assert_eq!(r.data, want[..4096]);
        c.disconnect();
    }
    server.stop();
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let dev = mem(8 * MIB);
    let server = TestServer::start(dev.clone());
    let mut c = server.client();
    c.go("disk", true, false);
    // 200 writes sent back to back (more than max_in_flight), then 200 reads.
    let chunk = 16 * 1024;
    let mut sent = std::collections::HashSet::new();
    let mut bytes = Vec::new();
    for i in 0..200u64 {
        let data = pattern(chunk, i);
        let req = Request {
            flags: if i % 7 == 0 { CMD_FLAG_FUA } else { 0 },
            command: Command::Write,
            handle: 1000 + i,
            offset: i * chunk as u64,
            len: chunk as u32,
        };
        bytes.extend_from_slice(&req.encode());
        bytes.extend_from_slice(&data);
        sent.insert(1000 + i);
    }
    // One writer thread so the server's replies can flow while we send.
    let mut w = c.sock.try_clone().expect("clone");
    let writer = std::thread::spawn(move || w.write_all(&bytes).expect("send"));
    for _ in 0..200 {
        let r = c.recv();
        assert_eq!(r.error, 0);
        assert!(sent.remove(&r.handle), "unexpected handle {}", r.handle);
    }
    writer.join().expect("writer");
    let handles: Vec<u64> = (0..200u64)
        .map(|i| c.send(Command::Read, 0, i * chunk as u64, chunk as u32, &[]))
        .collect();
    let mut got = std::collections::HashMap::new();
    for _ in 0..200 {
        let r = c.recv();
        got.insert(r.handle, r.data);
    }
    for (i, h) in handles.iter().enumerate() {
        assert_eq!(got[h], pattern(chunk, i as u64), "read {i}");
    }
    assert_eq!(c.call(Command::Flush, 0, 0, 0, &[]).error, 0);
    c.disconnect();
    assert!(dev.fua_write_count() >= 29);
    assert_eq!(dev.flush_count(), 1);
    let s = server.stats();
    assert_eq!(s.bytes_written, 200 * chunk as u64);
    assert_eq!(s.bytes_read, 200 * chunk as u64);
    server.stop();
}

#[test]
fn a_client_that_vanishes_mid_request_does_not_hurt_the_server() {
    let dev = mem(4 * MIB);
    let server = TestServer::start(dev.clone());

    // A WRITE header promising 1 MiB, part of the payload, then gone.
    let mut c = server.client();
    c.go("disk", false, false);
    let req = Request {
        flags: 0,
        command: Command::Write,
        handle: 1,
        offset: 0,
        len: MIB as u32,
    };
    c.write(&req.encode());
    c.write(&[0xab; 1000]);
    drop(c);

    // Gone mid-header, and mid-option.
    let mut c = server.client();
    c.go("disk", true, false);
    c.write(&req.encode()[..10]);
    drop(c);
    let mut c = server.client();
    c.write(&encode_option(OPT_GO, &[0, 0, 0, 4, b'd'])[..20]);
    drop(c);

    // Requests in flight when the client leaves: the server finishes them quietly.
    let mut c = server.client();
    c.go("disk", true, false);
    for i in 0..32u64 {
        c.send(Command::Read, 0, i * 65536, 65536, &[]);
    }
    drop(c);

    // A WRITE beyond the 32 MiB bound: hard disconnect.
    let mut c = server.client();
    c.go("disk", false, false);
    let big = Request {
        len: MAX_PAYLOAD + 1,
        ..req
    };
    c.write(&big.encode());
    assert!(c.closed_by_server());

    wait_until("all connections to end", || {
        server.stats().connections_active == 0
    });
    let s = server.stats();
    assert!(s.connections_failed >= 4, "{s:?}");
    assert!(!dev.is_allocated(0), "a partial write reached the device");

    // The next client is served normally.
    let mut c = server.client();
    c.go("disk", false, false);
    assert_eq!(c.call(Command::Write, 0, 0, 3, b"ok!").error, 0);
    assert_eq!(c.call(Command::Read, 0, 0, 3, &[]).data, b"ok!");
    c.disconnect();
    server.stop();
}

#[test]
fn shutdown_finishes_requests_in_flight_then_removes_the_socket() {
    let dev = gated();
    let mut server = TestServer::start(dev.clone());
    let mode = std::fs::metadata(&server.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let mut c = server.client();
    c.go("disk", true, false);
    let handle = c.send(Command::Read, 0, 0, 4096, &[]);
    // Make sure the server has the request before shutting down: a flush round trip
    // on the same connection is answered only after the read was read off the socket.
    assert_eq!(c.call(Command::Flush, 0, 0, 0, &[]).error, 0);
    server.request_stop();
    wait_until("the socket file to go away", || !server.socket.exists());
    // New clients are refused now.
    assert!(std::os::unix::net::UnixStream::connect(&server.socket).is_err());
    // Release the gated read: its reply still arrives, then the server hangs up.
    dev.gate.add_permits(1);
    let r = c.recv();
    assert_eq!((r.handle, r.error), (handle, 0));
    assert_eq!(r.data, pattern(MIB as usize, 11)[..4096]);
    assert!(c.closed_by_server());
    server.stop();
}

#[test]
fn stale_live_and_foreign_socket_paths() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");

    // A stale socket (nobody listening) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let path = stale.clone();
    let task = rt.spawn(async move {
        mbank_nbd::serve_unix(&path, mem(MIB), ServerOptions::default(), rx).await
    });
    wait_until("the server to listen", || {
        std::os::unix::net::UnixStream::connect(&stale).is_ok()
    });

    // A live one is not touched.
    let err = rt
        .block_on(mbank_nbd::serve_unix(
            &stale,
            mem(MIB),
            ServerOptions::default(),
            std::future::ready(()),
        ))
        .expect_err("second server on a live socket");
    assert!(matches!(err, ServeError::InUse(_)), "{err}");
    assert!(err.to_string().contains("in use"));

    // A regular file is never deleted.
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, b"keep me").expect("write");
    let err = rt
        .block_on(mbank_nbd::serve_unix(
            &file,
            mem(MIB),
            ServerOptions::default(),
            std::future::ready(()),
        ))
        .expect_err("server on a regular file");
    assert!(matches!(err, ServeError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");

    let _ = tx.send(());
    rt.block_on(task).expect("join").expect("serve");
    assert!(!stale.exists());
}

#[test]
fn serve_connection_over_any_stream_and_tcp() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // serve_connection over a socket pair; the client is the blocking test client.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
    theirs.set_nonblocking(true).expect("nonblocking");
    let dev = mem(MIB);
    let opts = ServerOptions::with_export_name("pair");
    let stats = opts.stats.clone();
    let task = {
        let dev = dev.clone();
        rt.spawn(async move {
            let stream = tokio::net::UnixStream::from_std(theirs).expect("tokio stream");
            mbank_nbd::serve_connection(stream, dev, &opts).await
        })
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = RawClient::from_stream(ours);
    c.go("pair", true, false);
    assert_eq!(c.call(Command::Write, 0, 100, 3, b"abc").error, 0);
    c.disconnect();
    let end = rt.block_on(task).expect("join").expect("connection");
    assert_eq!(end, ConnectionEnd::Disconnected);
    assert_eq!(stats.snapshot().bytes_written, 3);
    assert_eq!(&dev.to_vec()[100..103], b"abc");

    // TCP on an ephemeral port, with nbdinfo as the client.
    require("nbdinfo", "libnbd-bin");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(mbank_nbd::serve_tcp_listener(
        listener,
        mem(5 * MIB),
        ServerOptions::with_export_name("tcp"),
        rx,
    ));
    let out = run(std::process::Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd://127.0.0.1:{port}/tcp")));
    assert_eq!(out.trim(), (5 * MIB).to_string());
    let _ = tx.send(());
    rt.block_on(task).expect("join").expect("serve");
    drop(dir);
}
