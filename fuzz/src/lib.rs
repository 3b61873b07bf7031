//! Shared parts of the fuzz targets: the allocation bound every target checks, and the
//! in-memory NBD connection the NBD targets drive.
//!
//! **Allocation bound.** This crate's global allocator counts the bytes live on the
//! heap. [`bounded`] runs one input with a stated bound: once the bytes it holds at
//! once (its peak over what was live when it started) would exceed the bound, the
//! allocation fails, so the process aborts with a stack trace at the allocation that
//! broke it and libFuzzer keeps the input as a crash. Allocations made by C code
//! (zstd's contexts) do not go through Rust's allocator and are not counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use mbank_nbd::proto::{self, ClientFlags, ClientOption, InfoRequest, MetaContextRequest};
use mbank_nbd::{MemDevice, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * KIB;

/// Counts live heap bytes; refuses an allocation that breaks the armed bound.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static OVER: AtomicBool = AtomicBool::new(false);

impl Counting {
    /// Accounts `add` more bytes; false (and nothing accounted) if that breaks the limit.
    fn take(add: usize) -> bool {
        let now = LIVE.fetch_add(add, Relaxed).wrapping_add(add);
        if now > LIMIT.load(Relaxed) {
            LIVE.fetch_sub(add, Relaxed);
            OVER.store(true, Relaxed);
            // Disarm, so that reporting the failure can allocate.
            LIMIT.store(usize::MAX, Relaxed);
            return false;
        }
        PEAK.fetch_max(now, Relaxed);
        true
    }
}

// SAFETY: every method forwards to `System` with the caller's layout and pointer
// unchanged; the counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::take(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::take(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (hence `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // While it moves, both the old and the new block are live.
        if !Self::take(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            LIVE.fetch_sub(new_size, Relaxed);
        } else {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` (one input) allowing it to hold at most `bound` heap bytes at once beyond
/// what was live before; panics if an allocation was refused for breaking it (a
/// fallible one such as `try_reserve` would not have aborted by itself).
pub fn bounded<R>(target: &str, bound: usize, f: impl FnOnce() -> R) -> R {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        // A panic disarms the bound first: printing it allocates.
        let next = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            LIMIT.store(usize::MAX, Relaxed);
            next(info)
        }));
    });
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    OVER.store(false, Relaxed);
    LIMIT.store(base.saturating_add(bound), Relaxed);
    let r = f();
    LIMIT.store(usize::MAX, Relaxed);
    let peak = PEAK.load(Relaxed) - base;
    assert!(
        !OVER.load(Relaxed),
        "{target}: one input tried to hold more than its bound of {bound} heap bytes at once (peak before that: {peak})"
    );
    r
}

/// Appends the BLAKE3 checksum of `body`, so that a mutated input reaches the checks
/// behind a format's checksum.
pub fn with_checksum(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    v.extend_from_slice(mbank_core::ChunkId::of(body).as_bytes());
    v
}

/// One tokio runtime for the whole process (one thread: runs are repeatable). A
/// connection that hangs shows as a libFuzzer timeout.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread tokio runtime")
    })
}

/// Serves `client` (what the client sends, whole) to an NBD server over an in-memory
/// stream and discards the server's answers. The server must end the connection,
/// whatever the bytes.
pub fn serve(client: &[u8], device: MemDevice, opts: &ServerOptions) {
    let (ours, theirs) = tokio::io::duplex(64 * KIB);
    let device = Arc::new(device);
    runtime().block_on(async {
        let (mut rd, mut wr) = tokio::io::split(ours);
        let send = async {
            // The server may end the connection before it read everything.
            let _ = wr.write_all(client).await;
            let _ = wr.shutdown().await;
        };
        let drain = async {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let server = mbank_nbd::serve_connection(theirs, device, opts);
        let ((), (), _end) = tokio::join!(send, drain, server);
    });
}

/// The bytes a client sends to reach transmission: client flags, then, as `mode` asks,
/// structured replies (bit 0) and the `base:allocation` context (bit 1, with bit 0),
/// then `NBD_OPT_GO` for `export`.
pub fn handshake(mode: u8, export: &str) -> Vec<u8> {
    let mut out = ClientFlags {
        fixed_newstyle: true,
        no_zeroes: true,
    }
    .encode()
    .to_vec();
    if mode & 1 != 0 {
        out.extend(ClientOption::StructuredReply.encode());
        if mode & 2 != 0 {
            out.extend(
                ClientOption::SetMetaContext(MetaContextRequest {
                    export: export.into(),
                    queries: vec![proto::META_BASE_ALLOCATION.into()],
                })
                .encode(),
            );
        }
    }
    out.extend(
        ClientOption::Go(InfoRequest {
            export: export.into(),
            requests: vec![proto::INFO_BLOCK_SIZE],
        })
        .encode(),
    );
    out
}
