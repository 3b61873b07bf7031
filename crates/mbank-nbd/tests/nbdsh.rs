//! Protocol edges through libnbd's Python bindings (`nbdsh`), with libnbd's client-side
//! checks turned off (`set_strict_mode(0)`) so that the server is what answers.

mod common;

use std::sync::Arc;

use common::*;
use mbank_nbd::{MemDevice, ServerOptions};

const MIB: u64 = 1024 * 1024;

const HELPERS: &str = r#"
def expect_errno(fn, code, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == code, "%s: got errno %s (%s), want %s" % (what, e.errnum, e.string, code)
    else:
        raise AssertionError(what + ": succeeded, want errno %d" % code)

def connect(**kw):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_export_name(EXPORT)
    for k, v in kw.items():
        getattr(h, k)(v)
    h.connect_unix(SOCK)
    return h
"#;

#[test]
fn errors_for_bad_ranges_and_zero_length_requests() {
    let dev = Arc::new(MemDevice::new(8 * MIB));
    let server = TestServer::start(dev.clone());
    let script = format!(
        "{HELPERS}{}",
        r#"
for structured in (True, False):
    h = connect(set_request_structured_replies=structured)
    assert h.get_structured_replies_negotiated() == structured
    expect_errno(lambda: h.pread(512, SIZE - 100), errno.EINVAL, "read past the end")
    expect_errno(lambda: h.pread(1, SIZE), errno.EINVAL, "read at the end")
    expect_errno(lambda: h.pwrite(b"x" * 512, SIZE - 100), errno.ENOSPC, "write past the end")
    expect_errno(lambda: h.zero(4096, SIZE - 1), errno.ENOSPC, "zero past the end")
    expect_errno(lambda: h.trim(4096, SIZE - 1), errno.EINVAL, "trim past the end")
    expect_errno(lambda: h.cache(4096, SIZE - 1), errno.EINVAL, "cache past the end")
    # Zero-length requests are no-ops, even at the very end.
    for off in (0, 4096, SIZE):
        assert h.pread(0, off) == b""
        h.pwrite(b"", off)
        h.trim(0, off)
        h.zero(0, off)
        h.cache(0, off)
    h.flush()
    # The connection is still fine after all those errors.
    h.pwrite(b"abc", 100, nbd.CMD_FLAG_FUA)
    assert h.pread(3, 100) == b"abc"
    h.shutdown()
print("ok")
"#
    );
    assert_eq!(nbdsh(&server, 8 * MIB, &script).trim(), "ok");
    assert!(dev.fua_write_count() >= 2);
    assert_eq!(dev.cache_count(), 0);
    server.stop();
}

#[test]
fn many_aio_requests_in_flight() {
    let dev = Arc::new(MemDevice::new(16 * MIB));
    let server = TestServer::start(dev.clone());
    let script = format!(
        "{HELPERS}{}",
        r#"
h = connect()
N, BS = 192, 65536
writes = [h.aio_pwrite(bytes([i % 251]) * BS, i * BS) for i in range(N)]
assert h.aio_in_flight() > 0
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in writes:
    assert h.aio_command_completed(c)
h.aio_flush()
reads = []
for i in reversed(range(N)):
    buf = nbd.Buffer(BS)
    reads.append((i, buf, h.aio_pread(buf, i * BS)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, buf, c in reads:
    assert h.aio_command_completed(c)
    assert buf.to_bytearray() == bytes([i % 251]) * BS, "block %d" % i
h.shutdown()
print("ok")
"#
    );
    assert_eq!(nbdsh(&server, 16 * MIB, &script).trim(), "ok");
    let content = dev.to_vec();
    for i in 0..192usize {
        assert!(
            content[i * 65536..(i + 1) * 65536]
                .iter()
                .all(|&b| b == (i % 251) as u8)
        );
    }
    server.stop();
}

#[test]
fn opt_list_info_meta_contexts_and_block_status() {
    let server = TestServer::start_with(
        Arc::new(MemDevice::new(4 * MIB)),
        ServerOptions {
            description: Some("test disk".into()),
            ..ServerOptions::with_export_name("disk")
        },
    );
    let script = r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(SOCK)
assert h.aio_is_negotiating()
exports = []
h.opt_list(lambda name, desc: exports.append((name, desc)) or 0)
assert exports == [(EXPORT, "test disk")], exports

h.set_export_name("no-such-export")
try:
    h.opt_info()
except nbd.Error:
    pass
else:
    raise AssertionError("INFO on an unknown export succeeded")

h.set_export_name(EXPORT)
h.opt_info()
assert h.get_size() == SIZE
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim()
assert h.can_zero() and h.can_cache() and not h.is_read_only()
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024

contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
assert contexts == ["base:allocation"], contexts

h.add_meta_context("base:allocation")
h.opt_go()
assert not h.aio_is_negotiating()
assert h.can_meta_context("base:allocation")

h.pwrite(b"\x01" * 65536, 1024 * 1024)
h.zero(65536, 2 * 1024 * 1024, nbd.CMD_FLAG_NO_HOLE)
entries = []
def extent(context, offset, e, err):
    assert context == "base:allocation"
    entries.extend(e)
    return 0
h.block_status(SIZE, 0, extent)
pairs = list(zip(entries[0::2], entries[1::2]))
assert pairs == [(1024 * 1024, 3), (65536, 0), (1024 * 1024 - 65536, 3), (65536, 2), (SIZE - 2 * 1024 * 1024 - 65536, 3)], pairs
entries.clear()
h.block_status(SIZE, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert entries == [1024 * 1024, 3], entries
h.shutdown()
print("ok")
"#;
    assert_eq!(nbdsh(&server, 4 * MIB, script).trim(), "ok");
    server.stop();
}

#[test]
fn read_only_export_answers_writes_with_eperm() {
    let dev = Arc::new(MemDevice::from_bytes(&pattern(MIB as usize, 9)).with_read_only(true));
    let server = TestServer::start(dev.clone());
    let script = format!(
        "{HELPERS}{}",
        r#"
h = connect()
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
expect_errno(lambda: h.pwrite(b"x" * 512, 0), errno.EPERM, "write")
expect_errno(lambda: h.trim(512, 0), errno.EPERM, "trim")
expect_errno(lambda: h.zero(512, 0), errno.EPERM, "zero")
assert len(h.pread(4096, 0)) == 4096
h.shutdown()
print("ok")
"#
    );
    assert_eq!(nbdsh(&server, MIB, &script).trim(), "ok");
    assert_eq!(dev.to_vec(), pattern(MIB as usize, 9));
    server.stop();
}
