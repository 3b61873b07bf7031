//! The server: listeners, the handshake, and the transmission loop of one connection.
//!
//! See the [crate docs](crate) for the concurrency model and the guarantees.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use crate::device::{BlockDevice, DeviceError, Extent};
use crate::errno::{Failure, Refusal, failure_errno};
use crate::proto::{self, *};
use crate::tls::TlsConfig;

/// Metadata context id this server gives `base:allocation` (any nonzero value would do).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// How a server behaves. `Default` gives sensible values for a station.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Name of the one export. Clients may also use the empty (default) name.
    pub export_name: String,
    /// Optional description, returned by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Requests executing at once on one connection.
    pub max_in_flight: usize,
    /// Bytes of READ/WRITE buffers held at once on one connection, replies not yet
    /// written included (never less than [`proto::MAX_PAYLOAD`], so one largest request
    /// always fits). When they are used up the server reads no more requests from that
    /// connection until replies drain, so a client that never reads its replies pins at
    /// most this much.
    pub max_in_flight_bytes: usize,
    /// Connections in transmission at once. A new client that asks for the export
    /// (`NBD_OPT_GO` / `EXPORT_NAME`) when the server is full takes the place of the
    /// connection idle longest, if one has had no request for [`Self::evict_idle_after`];
    /// otherwise it is refused (`NBD_REP_ERR_POLICY`; `EXPORT_NAME`, which cannot carry
    /// an error, gets the connection closed). At most this many clients handshake at
    /// once; further ones wait in the listen backlog, each handshake bounded by
    /// [`Self::handshake_timeout`].
    pub max_connections: usize,
    /// How long a connection must have been without requests (none in flight) before a
    /// new client may take its place when the server is full.
    pub evict_idle_after: Duration,
    /// Close a connection in transmission that has had no request in flight for this
    /// long. `None` (the default) keeps idle connections open: QEMU holds its NBD
    /// connection while the guest does nothing, and that must not cost the guest its
    /// disk. Idle connections still make room for new clients at the cap.
    pub idle_timeout: Option<Duration>,
    /// Answer `NBD_OPT_LIST` (else `NBD_REP_ERR_POLICY`).
    pub allow_list: bool,
    /// Send reads that are entirely zero as `OFFSET_HOLE` chunks (structured replies only).
    pub sparse_reads: bool,
    /// A client that has not finished the handshake within this time is dropped.
    pub handshake_timeout: Duration,
    /// A connection whose replies cannot be written for this long (the client reads
    /// nothing) is closed; its requests in flight are dropped.
    pub write_timeout: Duration,
    /// On shutdown, how long connections may take to finish their requests in flight
    /// before they are cut.
    pub shutdown_grace: Duration,
    /// Counters, shared so that the caller can watch them while the server runs.
    pub stats: Arc<ServerStats>,
    /// Speak TLS, and require it: every option but `NBD_OPT_STARTTLS` (and `ABORT`) is
    /// answered `NBD_REP_ERR_TLS_REQD` until the client has upgraded the connection
    /// (the protocol's FORCEDTLS mode, as qemu-nbd with `--tls-creds`). `None` (the
    /// default): no TLS, `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_UNSUP`.
    pub tls: Option<TlsConfig>,
    /// A Unix socket's permission bits (default `0o600`: its owner only), so that
    /// another user (QEMU run by libvirt, say) may connect.
    pub socket_mode: u32,
    /// A Unix socket's owner and group (`None`: the process's), set before the socket
    /// appears at its path.
    pub socket_owner: (Option<u32>, Option<u32>),
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            description: None,
            max_in_flight: 64,
            max_in_flight_bytes: 32 * 1024 * 1024,
            max_connections: 64,
            evict_idle_after: Duration::from_secs(10),
            idle_timeout: None,
            allow_list: true,
            sparse_reads: true,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            stats: Arc::default(),
            tls: None,
            socket_mode: 0o600,
            socket_owner: (None, None),
        }
    }
}

impl ServerOptions {
    /// Options exporting `name`.
    pub fn with_export_name(name: impl Into<String>) -> Self {
        Self {
            export_name: name.into(),
            ..Self::default()
        }
    }

    fn serves(&self, requested: &str) -> bool {
        requested.is_empty() || requested == self.export_name
    }
}

/// Counters of one server (or of whatever shares them), updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct ServerStats {
    connections_accepted: AtomicU64,
    connections_active: AtomicU64,
    connections_failed: AtomicU64,
    requests: AtomicU64,
    request_errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    connections_refused: AtomicU64,
    connections_evicted: AtomicU64,
    connections_timed_out: AtomicU64,
    buffered_bytes: AtomicU64,
    buffered_bytes_peak: AtomicU64,
}

/// A copy of [`ServerStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted since start.
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Connections that ended with an error (protocol violation, I/O error, a client
    /// that vanished mid-message).
    pub connections_failed: u64,
    /// Transmission requests received (not counting `DISC`).
    pub requests: u64,
    /// Requests answered with an error.
    pub request_errors: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// Clients refused because the server was full and no connection was idle.
    pub connections_refused: u64,
    /// Idle connections closed to make room for a new client.
    pub connections_evicted: u64,
    /// Connections closed by a timeout: handshake, idle, or replies the client did not
    /// read.
    pub connections_timed_out: u64,
    /// Bytes of READ data and WRITE payloads the server holds now, replies waiting to
    /// be written included.
    pub buffered_bytes: u64,
    /// The most [`Self::buffered_bytes`] ever held at once.
    pub buffered_bytes_peak: u64,
}

impl ServerStats {
    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            connections_accepted: get(&self.connections_accepted),
            connections_active: get(&self.connections_active),
            connections_failed: get(&self.connections_failed),
            requests: get(&self.requests),
            request_errors: get(&self.request_errors),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            connections_refused: get(&self.connections_refused),
            connections_evicted: get(&self.connections_evicted),
            connections_timed_out: get(&self.connections_timed_out),
            buffered_bytes: get(&self.buffered_bytes),
            buffered_bytes_peak: get(&self.buffered_bytes_peak),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Bytes of buffers counted in [`ServerStats::buffered_bytes`] while this lives.
struct Buffered {
    stats: Arc<ServerStats>,
    n: u64,
}

impl Buffered {
    fn new(stats: &Arc<ServerStats>, n: usize) -> Self {
        let n = n as u64;
        let now = stats.buffered_bytes.fetch_add(n, Ordering::Relaxed) + n;
        stats.buffered_bytes_peak.fetch_max(now, Ordering::Relaxed);
        Self {
            stats: stats.clone(),
            n,
        }
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.stats
            .buffered_bytes
            .fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// Why a server could not start.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Creating the listening socket failed.
    #[error("binding the NBD socket {endpoint}: {source}")]
    Bind {
        /// The path or address.
        endpoint: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another server is listening on the socket path.
    #[error("the NBD socket {0} is in use by a running server")]
    InUse(PathBuf),
    /// Something other than a socket exists at the socket path; it is left alone.
    #[error("refusing to replace {0}: it exists and is not a socket")]
    NotASocket(PathBuf),
}

/// How a connection ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The client ended the handshake (`NBD_OPT_ABORT`, or it closed the socket).
    Aborted,
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The client closed the socket between requests.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// The connection was idle and a new client took its place (the server was at
    /// [`ServerOptions::max_connections`]).
    Evicted,
    /// The connection had no request for [`ServerOptions::idle_timeout`].
    IdleTimeout,
}

/// Why a connection ended with an error. None of these affects other connections.
#[derive(Debug, Error)]
pub enum ConnectionError {
    /// The client closed the connection in the middle of a message.
    #[error("{during}: the client closed the connection mid-message")]
    Truncated {
        /// What the server was doing.
        during: &'static str,
    },
    /// Reading from or writing to the socket failed.
    #[error("{during}: {source}")]
    Io {
        /// What the server was doing.
        during: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The client broke the protocol in a way that leaves no safe way to go on.
    #[error("{during}: {source}")]
    Protocol {
        /// What the server was doing.
        during: &'static str,
        /// What was wrong.
        #[source]
        source: proto::CodecError,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export this server does not have (that option
    /// cannot carry an error, so the protocol requires closing the connection).
    #[error("the client asked for export {requested:?}, but this server exports {served:?}")]
    UnknownExport {
        /// The name the client sent.
        requested: String,
        /// The name this server exports.
        served: String,
    },
    /// The handshake took too long.
    #[error("the client did not finish the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// The client read none of its replies for this long (or the socket accepted
    /// nothing), so the server closed the connection and dropped the replies.
    #[error(
        "the client read no reply data for {0:?}; closed its connection (a client must read \
         replies while it sends requests)"
    )]
    WriteStalled(Duration),
    /// `NBD_OPT_EXPORT_NAME` while the server was full and no connection was idle (that
    /// option cannot carry an error, so the connection is closed; `NBD_OPT_GO` gets
    /// `NBD_REP_ERR_POLICY` instead).
    #[error(
        "the server already serves {max} connections, none of them idle; end one, or raise \
         the limit"
    )]
    Full {
        /// [`ServerOptions::max_connections`].
        max: usize,
    },
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed: the client does not trust the
    /// server's certificate, presented none or one the server does not trust, or is no
    /// TLS client at all.
    #[error("the TLS handshake with the client failed: {source}")]
    Tls {
        /// The cause, as rustls reports it.
        #[source]
        source: io::Error,
    },
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires TLS (that option
    /// cannot carry an error, so the connection is closed).
    #[error(
        "the client asked for the export without TLS, which this server requires; connect \
         with TLS (an nbds:// URI, or QEMU's tls-creds)"
    )]
    TlsRequired,
}

fn io_err(during: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { during, source }
}

fn protocol_err(during: &'static str) -> impl FnOnce(proto::CodecError) -> ConnectionError {
    move |source| ConnectionError::Protocol { during, source }
}

// ---- public entry points ------------------------------------------------------------

/// Serves `device` on a unix socket at `path` until `shutdown` completes.
///
/// A stale socket file at `path` (one nobody listens on) is removed first; a live one, or
/// a file that is not a socket, is an error. The socket is created with mode 0600 before
/// it appears at `path` (bound under a temporary name, then renamed), so no other user
/// can ever connect. On shutdown the server stops accepting and removes the socket file
/// (if it is still the one it created), lets each connection finish the requests it has
/// in flight (up to [`ServerOptions::shutdown_grace`]), then returns.
pub async fn serve_unix<D, F>(
    path: impl AsRef<Path>,
    device: Arc<D>,
    opts: ServerOptions,
    shutdown: F,
) -> Result<(), ServeError>
where
    D: BlockDevice,
    F: Future + Send,
{
    let (listener, socket_file) = bind_unix(path.as_ref(), &opts)?;
    let opts = Arc::new(opts);
    let conns = accept_until(&listener, device, opts.clone(), shutdown).await;
    drop(listener);
    drop(socket_file);
    drain(conns, opts.shutdown_grace).await;
    Ok(())
}

/// Serves `device` on TCP at `addr` until `shutdown` completes; see [`serve_tcp_listener`].
pub async fn serve_tcp<D, F>(
    addr: SocketAddr,
    device: Arc<D>,
    opts: ServerOptions,
    shutdown: F,
) -> Result<(), ServeError>
where
    D: BlockDevice,
    F: Future + Send,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            endpoint: addr.to_string(),
            source,
        })?;
    serve_tcp_listener(listener, device, opts, shutdown).await
}

/// Serves `device` on an already bound TCP listener (handy with port 0) until
/// `shutdown` completes, then lets connections finish their requests in flight.
/// Without [`ServerOptions::tls`] nobody is authenticated and nothing is encrypted:
/// bind to loopback or a trusted network only.
pub async fn serve_tcp_listener<D, F>(
    listener: TcpListener,
    device: Arc<D>,
    opts: ServerOptions,
    shutdown: F,
) -> Result<(), ServeError>
where
    D: BlockDevice,
    F: Future + Send,
{
    let opts = Arc::new(opts);
    let conns = accept_until(&listener, device, opts.clone(), shutdown).await;
    drop(listener);
    drain(conns, opts.shutdown_grace).await;
    Ok(())
}

/// Serves one already connected client over any byte stream, from the greeting to the
/// end of the connection. The connection's counters go to `opts.stats`.
pub async fn serve_connection<S, D>(
    stream: S,
    device: Arc<D>,
    opts: &ServerOptions,
) -> Result<ConnectionEnd, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    D: BlockDevice,
{
    let (_keep_open, stop) = watch::channel(false);
    run_connection(Box::pin(stream), device, opts, stop, None).await
}

// ---- listeners ----------------------------------------------------------------------

trait Listener: Send + Sync {
    type Stream: Transport;
    fn next_conn(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn next_conn(&self) -> io::Result<UnixStream> {
        let (stream, _) = self.accept().await?;
        Ok(stream)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn next_conn(&self) -> io::Result<TcpStream> {
        let (stream, _) = self.accept().await?;
        // proto.md: both sides SHOULD disable Nagle.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A connection's byte stream: one piece during the handshake (which may upgrade it to
/// TLS), two independently owned halves in transmission (the request reader and the
/// reply writer).
trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::Read, Self::Write);
}

impl Transport for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Transport for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// Any stream given to [`serve_connection`].
impl<S: AsyncRead + AsyncWrite + Send + 'static> Transport for Pin<Box<S>> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl<S: Transport> Transport for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// The socket file this server created; removed on drop if it is still ours.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "removing the NBD socket");
                }
            }
            // Replaced by someone else, or already gone: not ours to remove.
            _ => {}
        }
    }
}

fn bind_unix(path: &Path, opts: &ServerOptions) -> Result<(UnixListener, SocketFile), ServeError> {
    let bind_err = |source| ServeError::Bind {
        endpoint: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServeError::NotASocket(path.to_owned()));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(bind_err(e)),
                }
            }
            Err(e) => return Err(bind_err(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }

    // Bind under a temporary name, give it its owner and mode, then rename into place:
    // the socket never exists at `path` with other permissions, and it is listening
    // once it is there.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".nbd-{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
    let (uid, gid) = opts.socket_owner;
    let placed = std::os::unix::fs::chown(&tmp, uid, gid)
        .and_then(|()| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(opts.socket_mode))
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::symlink_metadata(path));
    match placed {
        Ok(meta) => Ok((
            listener,
            SocketFile {
                path: path.to_owned(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(bind_err(e))
        }
    }
}

struct Connections {
    set: JoinSet<()>,
    stop: watch::Sender<bool>,
}

async fn accept_until<L, D, F>(
    listener: &L,
    device: Arc<D>,
    opts: Arc<ServerOptions>,
    shutdown: F,
) -> Connections
where
    L: Listener,
    D: BlockDevice,
    F: Future + Send,
{
    let (stop, stop_rx) = watch::channel(false);
    let mut set = JoinSet::new();
    // Handshakes at once; each is bounded by the handshake timeout, so clients waiting
    // in the backlog get their turn.
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let registry = Arc::new(Registry {
        max: opts.max_connections.max(1),
        evict_after: opts.evict_idle_after,
        stats: opts.stats.clone(),
        conns: std::sync::Mutex::new(HashMap::new()),
    });
    let mut shutdown = pin!(shutdown);
    let mut next_id = 0u64;
    loop {
        while let Some(done) = set.try_join_next() {
            if let Err(e) = done {
                error!(error = %e, "an NBD connection task failed");
            }
        }
        let slot = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.next_conn() => accepted,
        };
        match accepted {
            Ok(stream) => {
                next_id += 1;
                let admission = Admission {
                    id: next_id,
                    registry: registry.clone(),
                    handshake_slot: Some(slot),
                };
                set.spawn(connection_task(
                    next_id,
                    stream,
                    device.clone(),
                    opts.clone(),
                    stop_rx.clone(),
                    admission,
                ));
            }
            Err(e) => {
                // Usually transient (EMFILE, ECONNABORTED): back off a little, go on.
                warn!(error = %e, "accepting an NBD connection");
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    Connections { set, stop }
}

async fn drain(mut conns: Connections, grace: Duration) {
    let _ = conns.stop.send(true);
    let finished = tokio::time::timeout(grace, async {
        while conns.set.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !finished {
        warn!(
            connections = conns.set.len(),
            "NBD connections still busy after the shutdown grace period; cutting them"
        );
        conns.set.abort_all();
        while conns.set.join_next().await.is_some() {}
    }
}

/// Keeps `connections_active` right even if the task is aborted.
struct ActiveGuard(Arc<ServerStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection_task<S, D>(
    id: u64,
    stream: S,
    device: Arc<D>,
    opts: Arc<ServerOptions>,
    stop: watch::Receiver<bool>,
    admission: Admission,
) where
    S: Transport,
    D: BlockDevice,
{
    match run_connection(stream, device, &opts, stop, Some(admission)).await {
        Ok(end) => debug!(connection = id, ?end, "NBD connection ended"),
        Err(e) => warn!(connection = id, error = %e, "NBD connection failed"),
    }
}

// ---- the connection cap, idleness and eviction --------------------------------------

/// Microseconds since the first call in this process: a clock an atomic can hold.
fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Why a connection is being closed by the server's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// A reply could not be written (error or stall): drop the rest.
    WriteFailed,
    /// A new client took this idle connection's place.
    Evicted,
}

/// What a connection, its requests and the listener's registry share.
struct Activity {
    /// Requests read and not yet answered (or dropped).
    in_flight: AtomicU64,
    /// When the last request was read or answered ([`now_us`]).
    last_us: AtomicU64,
    close: watch::Sender<Option<Close>>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicU64::new(0),
            last_us: AtomicU64::new(now_us()),
            close: watch::Sender::new(None),
        })
    }

    /// How long the connection has been without requests, if it has none in flight.
    fn idle_us(&self) -> Option<u64> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(now_us().saturating_sub(self.last_us.load(Ordering::Relaxed)))
    }

    /// Asks the connection to close; the first reason wins.
    fn close(&self, why: Close) {
        self.close.send_if_modified(|c| {
            let first = c.is_none();
            if first {
                *c = Some(why);
            }
            first
        });
    }

    fn closing(&self) -> Option<Close> {
        *self.close.borrow()
    }
}

/// One request in flight, from its header being read until its reply is written or
/// dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.last_us.store(now_us(), Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_us.store(now_us(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connections of one listener that are in transmission.
struct Registry {
    max: usize,
    evict_after: Duration,
    stats: Arc<ServerStats>,
    conns: std::sync::Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Registry {
    /// A place for connection `id`. When the server is full, the connection idle longest
    /// (at least `evict_after`; the oldest on a tie) is asked to close and gives up its
    /// place; if none is idle, `Err(max)`.
    fn admit(self: &Arc<Self>, id: u64, activity: &Arc<Activity>) -> Result<Place, usize> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        if conns.len() >= self.max {
            let min = u64::try_from(self.evict_after.as_micros()).unwrap_or(u64::MAX);
            let victim = conns
                .iter()
                .filter_map(|(&other, a)| {
                    let idle = a.idle_us().filter(|&idle| idle >= min)?;
                    Some((idle, std::cmp::Reverse(other)))
                })
                .max();
            let Some((idle_us, std::cmp::Reverse(victim))) = victim else {
                ServerStats::add(&self.stats.connections_refused, 1);
                return Err(self.max);
            };
            if let Some(a) = conns.remove(&victim) {
                a.close(Close::Evicted);
            }
            ServerStats::add(&self.stats.connections_evicted, 1);
            debug!(
                connection = victim,
                idle_ms = idle_us / 1000,
                "closing an idle NBD connection to make room for a new client"
            );
        }
        activity.last_us.store(now_us(), Ordering::Relaxed);
        conns.insert(id, activity.clone());
        Ok(Place {
            registry: self.clone(),
            id,
        })
    }
}

/// A connection's place among those in transmission; given back on drop.
struct Place {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.registry
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// What a listener gives each connection it accepts.
struct Admission {
    id: u64,
    registry: Arc<Registry>,
    /// Held until the handshake ends.
    handshake_slot: Option<OwnedSemaphorePermit>,
}

/// Waits until the connection is asked to close; returns why.
async fn closed(rx: &mut watch::Receiver<Option<Close>>) -> Close {
    if let Ok(why) = rx.wait_for(Option::is_some).await
        && let Some(why) = *why
    {
        return why;
    }
    std::future::pending().await
}

/// Completes once the connection has had no request in flight for `limit` (never if
/// `None`).
async fn idle_for(activity: &Activity, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let limit = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX);
    loop {
        let wait = match activity.idle_us() {
            Some(idle) if idle >= limit => return,
            Some(idle) => limit - idle,
            None => limit,
        };
        tokio::time::sleep(Duration::from_micros(wait)).await;
    }
}

fn end_for(why: Close) -> ConnectionEnd {
    match why {
        // The write error is reported when the connection ends.
        Close::WriteFailed => ConnectionEnd::Closed,
        Close::Evicted => ConnectionEnd::Evicted,
    }
}

// ---- one connection -----------------------------------------------------------------

/// Waits until the stop flag is raised (forever if its sender is gone without raising it).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Reads exactly `buf.len()` bytes. `Ok(false)` if the peer closed (or reset) the
/// connection before the first byte; an error if it closed part-way.
async fn read_full<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    during: &'static str,
) -> Result<bool, ConnectionError> {
    let mut got = 0;
    while got < buf.len() {
        match rd.read(&mut buf[got..]).await {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ConnectionError::Truncated { during }),
            Ok(n) => got += n,
            Err(e) if got == 0 && e.kind() == io::ErrorKind::ConnectionReset => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConnectionError::Io { during, source: e }),
        }
    }
    Ok(true)
}

async fn read_message<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    during: &'static str,
) -> Result<(), ConnectionError> {
    if read_full(rd, buf, during).await? {
        Ok(())
    } else {
        Err(ConnectionError::Truncated { during })
    }
}

fn activate(stats: &Arc<ServerStats>) -> ActiveGuard {
    ServerStats::add(&stats.connections_accepted, 1);
    ServerStats::add(&stats.connections_active, 1);
    ActiveGuard(stats.clone())
}

async fn run_connection<S, D>(
    stream: S,
    device: Arc<D>,
    opts: &ServerOptions,
    mut stop: watch::Receiver<bool>,
    mut admission: Option<Admission>,
) -> Result<ConnectionEnd, ConnectionError>
where
    S: Transport,
    D: BlockDevice,
{
    let _active = activate(&opts.stats);
    let activity = Activity::new();
    let result = async {
        let negotiated = tokio::select! {
            biased;
            () = stopped(&mut stop) => return Ok(ConnectionEnd::Shutdown),
            r = tokio::time::timeout(
                opts.handshake_timeout,
                handshake(stream, &*device, opts, &activity, admission.as_ref()),
            ) => match r {
                Ok(r) => r?,
                Err(_) => {
                    ServerStats::add(&opts.stats.connections_timed_out, 1);
                    return Err(ConnectionError::HandshakeTimeout(opts.handshake_timeout));
                }
            },
        };
        // The next client may handshake now.
        if let Some(a) = &mut admission {
            a.handshake_slot = None;
        }
        match negotiated {
            None => Ok(ConnectionEnd::Aborted),
            Some((n, Secured::Plain(stream))) => {
                let (rd, wr) = stream.halves();
                transmission(rd, wr, device, opts, n, activity, stop).await
            }
            Some((n, Secured::Tls(stream))) => {
                let (rd, wr) = stream.halves();
                transmission(rd, wr, device, opts, n, activity, stop).await
            }
        }
    }
    .await;
    if result.is_err() {
        ServerStats::add(&opts.stats.connections_failed, 1);
    }
    result
}

/// What the handshake settled.
struct Negotiated {
    structured: bool,
    meta: bool,
    /// Its place among the connections in transmission (`None` without a listener).
    _place: Option<Place>,
}

/// The transmission flags for `device`, given whether structured replies are on.
pub fn transmission_flags<D: BlockDevice>(device: &D, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if device.read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if device.multi_conn() {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    if structured {
        // Reads always go back as one content chunk, so "don't fragment" costs nothing.
        flags |= FLAG_SEND_DF;
    }
    flags
}

fn preferred_block_size<D: BlockDevice>(device: &D) -> u32 {
    let p = device.preferred_block_size();
    if p.is_power_of_two() && p >= 512 {
        p
    } else {
        4096
    }
}

async fn send_replies<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    replies: &[OptionReply],
) -> Result<(), ConnectionError> {
    let mut out = Vec::new();
    for r in replies {
        out.extend_from_slice(&encode_option_reply(option, r));
    }
    wr.write_all(&out)
        .await
        .map_err(io_err("sending an option reply"))?;
    wr.flush().await.map_err(io_err("sending an option reply"))
}

/// A connection's stream after the handshake: as accepted, or upgraded to TLS.
enum Secured<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

/// Where a connection stands with TLS during option haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsState {
    /// The server has no TLS (NOTLS mode): STARTTLS is unsupported.
    Off,
    /// The server requires TLS and the client has not upgraded yet (FORCEDTLS mode):
    /// only STARTTLS and ABORT are served.
    Required,
    /// The connection runs over TLS.
    On,
}

/// How option haggling ended.
enum Haggled {
    /// The client ended the session (`NBD_OPT_ABORT`, or it closed the connection).
    Aborted,
    /// The export was chosen: transmission follows.
    Go(Negotiated),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake follows.
    StartTls,
}

/// The handshake: greeting, option haggling, and the TLS upgrade when the server
/// requires TLS. `Ok(None)` if the client ended the session before transmission.
async fn handshake<S, D>(
    mut stream: S,
    device: &D,
    opts: &ServerOptions,
    activity: &Arc<Activity>,
    admission: Option<&Admission>,
) -> Result<Option<(Negotiated, Secured<S>)>, ConnectionError>
where
    S: Transport,
    D: BlockDevice,
{
    stream
        .write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await
        .map_err(io_err("sending the greeting"))?;
    stream
        .flush()
        .await
        .map_err(io_err("sending the greeting"))?;

    let mut flags = [0u8; 4];
    if !read_full(&mut stream, &mut flags, "reading the client flags").await? {
        return Ok(None);
    }
    // Clients that do not set FIXED_NEWSTYLE are served as fixed-newstyle anyway
    // (proto.md allows it); such clients only ever send EXPORT_NAME.
    let client = parse_client_flags(&flags).map_err(protocol_err("reading the client flags"))?;

    let Some(tls) = &opts.tls else {
        let haggled = haggle(
            &mut stream,
            client,
            TlsState::Off,
            device,
            opts,
            activity,
            admission,
        )
        .await?;
        return Ok(match haggled {
            Haggled::Go(n) => Some((n, Secured::Plain(stream))),
            Haggled::Aborted | Haggled::StartTls => None,
        });
    };
    let haggled = haggle(
        &mut stream,
        client,
        TlsState::Required,
        device,
        opts,
        activity,
        admission,
    )
    .await?;
    match haggled {
        Haggled::Aborted => return Ok(None),
        // `haggle` never lets a client reach the export before TLS; should it ever,
        // the connection ends rather than serve in the clear.
        Haggled::Go(_) => return Err(ConnectionError::TlsRequired),
        Haggled::StartTls => {}
    }
    // proto.md: after the ACK, the TLS handshake on the same socket; haggling goes on
    // inside TLS, with no option state carried over (none was accepted before TLS).
    let mut stream = tls
        .acceptor
        .accept(stream)
        .await
        .map_err(|source| ConnectionError::Tls { source })?;
    let haggled = haggle(
        &mut stream,
        client,
        TlsState::On,
        device,
        opts,
        activity,
        admission,
    )
    .await?;
    match haggled {
        Haggled::Go(n) => Ok(Some((n, Secured::Tls(Box::new(stream))))),
        Haggled::Aborted | Haggled::StartTls => {
            // Close TLS politely; the client may already be gone.
            let _ = stream.shutdown().await;
            Ok(None)
        }
    }
}

/// Option haggling on `io` until the client chooses the export, ends the session, or
/// (in [`TlsState::Required`]) asks for TLS.
async fn haggle<T, D>(
    io: &mut T,
    client: ClientFlags,
    tls: TlsState,
    device: &D,
    opts: &ServerOptions,
    activity: &Arc<Activity>,
    admission: Option<&Admission>,
) -> Result<Haggled, ConnectionError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    let admit = || match admission {
        None => Ok(None),
        Some(a) => a.registry.admit(a.id, activity).map(Some),
    };
    let mut structured = false;
    let mut meta = false;
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        if !read_full(io, &mut header, "reading an option").await? {
            return Ok(Haggled::Aborted);
        }
        let header = parse_option_header(&header).map_err(protocol_err("reading an option"))?;
        let mut data = vec![0u8; header.len as usize];
        read_message(io, &mut data, "reading an option's data").await?;
        let code = header.option;
        if tls == TlsState::Required && code != OPT_STARTTLS && code != OPT_ABORT {
            // FORCEDTLS: nothing but the upgrade (or leaving) before TLS.
            if code == OPT_EXPORT_NAME {
                return Err(ConnectionError::TlsRequired);
            }
            send_replies(
                io,
                code,
                &[OptionReply::error(
                    RepError::TlsReqd,
                    "this server requires TLS: send NBD_OPT_STARTTLS first (an nbds:// URI, \
                     or QEMU's tls-creds)",
                )],
            )
            .await?;
            continue;
        }
        let option = match parse_option(code, &data) {
            Ok(option) => option,
            Err(e) if code == OPT_EXPORT_NAME => {
                return Err(ConnectionError::Protocol {
                    during: "reading the EXPORT_NAME option",
                    source: e,
                });
            }
            Err(e) => {
                send_replies(
                    io,
                    code,
                    &[OptionReply::error(RepError::Invalid, e.to_string())],
                )
                .await?;
                continue;
            }
        };
        let unknown_export = |name: &str| {
            OptionReply::error(
                RepError::Unknown,
                format!(
                    "no export named {name:?}; this server exports {:?}",
                    opts.export_name
                ),
            )
        };
        match option {
            ClientOption::ExportName(name) => {
                if !opts.serves(&name) {
                    return Err(ConnectionError::UnknownExport {
                        requested: name,
                        served: opts.export_name.clone(),
                    });
                }
                let place = admit().map_err(|max| ConnectionError::Full { max })?;
                let flags = transmission_flags(device, structured);
                io.write_all(&encode_export_name_reply(
                    device.size(),
                    flags,
                    client.no_zeroes,
                ))
                .await
                .map_err(io_err("answering EXPORT_NAME"))?;
                io.flush().await.map_err(io_err("answering EXPORT_NAME"))?;
                return Ok(Haggled::Go(Negotiated {
                    structured,
                    meta,
                    _place: place,
                }));
            }
            ClientOption::Abort => {
                // The client may already be gone; it need not wait for this reply.
                let _ = send_replies(io, code, &[OptionReply::Ack]).await;
                return Ok(Haggled::Aborted);
            }
            ClientOption::List => {
                let replies = if opts.allow_list {
                    vec![
                        OptionReply::Server {
                            name: opts.export_name.clone(),
                            details: opts.description.clone().unwrap_or_default(),
                        },
                        OptionReply::Ack,
                    ]
                } else {
                    vec![OptionReply::error(
                        RepError::Policy,
                        "listing exports is disabled on this server",
                    )]
                };
                send_replies(io, code, &replies).await?;
            }
            ClientOption::StartTls => match tls {
                TlsState::Off => {
                    send_replies(
                        io,
                        code,
                        &[OptionReply::error(
                            RepError::Unsup,
                            "this server does not offer TLS; reach it over a unix socket or a trusted network",
                        )],
                    )
                    .await?;
                }
                TlsState::Required => {
                    send_replies(io, code, &[OptionReply::Ack]).await?;
                    return Ok(Haggled::StartTls);
                }
                TlsState::On => {
                    send_replies(
                        io,
                        code,
                        &[OptionReply::error(
                            RepError::Invalid,
                            "TLS is already on for this connection",
                        )],
                    )
                    .await?;
                }
            },
            ClientOption::Info(req) | ClientOption::Go(req) => {
                if !opts.serves(&req.export) {
                    send_replies(io, code, &[unknown_export(&req.export)]).await?;
                    continue;
                }
                let place = if code == OPT_GO {
                    match admit() {
                        Ok(place) => place,
                        Err(max) => {
                            let refusal = OptionReply::error(
                                RepError::Policy,
                                format!(
                                    "this server already serves {max} connections, its limit, \
                                     and none of them is idle; try again later"
                                ),
                            );
                            send_replies(io, code, &[refusal]).await?;
                            continue;
                        }
                    }
                } else {
                    None
                };
                let mut replies = vec![OptionReply::Info(Info::Export {
                    size: device.size(),
                    flags: transmission_flags(device, structured),
                })];
                if req.requests.contains(&INFO_NAME) {
                    replies.push(OptionReply::Info(Info::Name(opts.export_name.clone())));
                }
                if let Some(text) = &opts.description
                    && req.requests.contains(&INFO_DESCRIPTION)
                {
                    replies.push(OptionReply::Info(Info::Description(text.clone())));
                }
                // Always sent: it tells clients about the 32 MiB request limit.
                replies.push(OptionReply::Info(Info::BlockSize {
                    min: 1,
                    preferred: preferred_block_size(device),
                    max: MAX_PAYLOAD,
                }));
                replies.push(OptionReply::Ack);
                send_replies(io, code, &replies).await?;
                if code == OPT_GO {
                    return Ok(Haggled::Go(Negotiated {
                        structured,
                        meta,
                        _place: place,
                    }));
                }
            }
            ClientOption::StructuredReply => {
                structured = true;
                send_replies(io, code, &[OptionReply::Ack]).await?;
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                let set = code == OPT_SET_META_CONTEXT;
                if set {
                    // Replaces the selection even when it fails.
                    meta = false;
                }
                if !structured {
                    send_replies(
                        io,
                        code,
                        &[OptionReply::error(
                            RepError::Invalid,
                            "negotiate structured replies before metadata contexts",
                        )],
                    )
                    .await?;
                    continue;
                }
                if !opts.serves(&req.export) {
                    send_replies(io, code, &[unknown_export(&req.export)]).await?;
                    continue;
                }
                let selected = if set {
                    req.queries.iter().any(|q| q == META_BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
                };
                let mut replies = Vec::new();
                if selected {
                    replies.push(OptionReply::MetaContext {
                        id: if set { BASE_ALLOCATION_ID } else { 0 },
                        name: META_BASE_ALLOCATION.into(),
                    });
                    meta |= set;
                }
                replies.push(OptionReply::Ack);
                send_replies(io, code, &replies).await?;
            }
            ClientOption::Unknown(code) => {
                send_replies(
                    io,
                    code,
                    &[OptionReply::error(
                        RepError::Unsup,
                        format!("option {code} is not supported by this server"),
                    )],
                )
                .await?;
            }
        }
    }
}

/// State shared by the reader loop and the request tasks of one connection.
struct Conn<D, W> {
    device: Arc<D>,
    writer: Mutex<W>,
    size: u64,
    read_only: bool,
    structured: bool,
    meta: bool,
    sparse_reads: bool,
    stats: Arc<ServerStats>,
    activity: Arc<Activity>,
    write_timeout: Duration,
    write_error: std::sync::Mutex<Option<io::Error>>,
}

/// What a successful request returns.
#[derive(Debug)]
enum Done {
    Ok,
    Data(Vec<u8>),
    Extents(Vec<BlockDescriptor>),
}

async fn transmission<R, W, D>(
    rd: R,
    wr: W,
    device: Arc<D>,
    opts: &ServerOptions,
    negotiated: Negotiated,
    activity: Arc<Activity>,
    mut stop: watch::Receiver<bool>,
) -> Result<ConnectionEnd, ConnectionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    // Many small requests arrive together: read them with one syscall, not one each.
    let mut rd = tokio::io::BufReader::with_capacity(REQUEST_BUFFER, rd);
    let conn = Arc::new(Conn {
        size: device.size(),
        read_only: device.read_only(),
        device,
        writer: Mutex::new(wr),
        structured: negotiated.structured,
        meta: negotiated.meta,
        sparse_reads: opts.sparse_reads,
        stats: opts.stats.clone(),
        activity,
        write_timeout: opts.write_timeout,
        write_error: std::sync::Mutex::new(None),
    });
    let mut closing = conn.activity.close.subscribe();
    let requests = Arc::new(Semaphore::new(opts.max_in_flight.max(1)));
    let byte_budget = opts.max_in_flight_bytes.max(MAX_PAYLOAD as usize);
    let bytes = Arc::new(Semaphore::new(byte_budget));
    let mut tasks = JoinSet::new();

    let end: Result<ConnectionEnd, ConnectionError> = loop {
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                error!(error = %e, "an NBD request task failed");
            }
        }
        let mut header = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            biased;
            why = closed(&mut closing) => break Ok(end_for(why)),
            () = stopped(&mut stop) => break Ok(ConnectionEnd::Shutdown),
            () = idle_for(&conn.activity, opts.idle_timeout) => {
                ServerStats::add(&conn.stats.connections_timed_out, 1);
                break Ok(ConnectionEnd::IdleTimeout);
            }
            got = read_full(&mut rd, &mut header, "reading a request") => got,
        };
        match got {
            Ok(true) => {}
            Ok(false) => break Ok(ConnectionEnd::Closed),
            Err(e) => break Err(e),
        }
        let req = match parse_request(&header) {
            Ok(req) => req,
            Err(e) => {
                break Err(ConnectionError::Protocol {
                    during: "reading a request",
                    source: e,
                });
            }
        };
        if req.command == Command::Disc {
            break Ok(ConnectionEnd::Disconnected);
        }
        let busy = Busy::new(&conn.activity);

        // Back-pressure: stop reading the socket while too much is in flight. Replies
        // hold their budget until written, so a client that reads none stalls here.
        let slot = tokio::select! {
            biased;
            why = closed(&mut closing) => break Ok(end_for(why)),
            () = stopped(&mut stop) => break Ok(ConnectionEnd::Shutdown),
            slot = requests.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break Ok(ConnectionEnd::Shutdown),
            },
        };
        let cost = match req.command {
            Command::Read | Command::Write => req.len.clamp(1, MAX_PAYLOAD),
            _ => 1,
        };
        let budget = tokio::select! {
            biased;
            why = closed(&mut closing) => break Ok(end_for(why)),
            () = stopped(&mut stop) => break Ok(ConnectionEnd::Shutdown),
            budget = bytes.clone().acquire_many_owned(cost) => match budget {
                Ok(budget) => budget,
                Err(_) => break Ok(ConnectionEnd::Shutdown),
            },
        };

        let mut payload = Vec::new();
        let mut held = None;
        if req.payload_len() > 0 {
            let read = tokio::select! {
                biased;
                why = closed(&mut closing) => break Ok(end_for(why)),
                () = stopped(&mut stop) => break Ok(ConnectionEnd::Shutdown),
                r = read_payload(&mut rd, req.payload_len() as usize) => r,
            };
            match read {
                Ok(p) => payload = p,
                Err(e) => break Err(e),
            }
            held = Some(Buffered::new(&conn.stats, payload.len()));
        }

        ServerStats::add(&conn.stats.requests, 1);
        let conn = conn.clone();
        let mut request = Box::pin(async move {
            let _held = (slot, budget, held, busy);
            serve_request(&conn, req, payload).await;
        });
        // Run it here until it would wait: a request the device answers at once (a
        // warm read, a write to the page cache) is done without a task or a thread
        // wake-up. Only one that waits becomes a task of its own, so the loop never
        // stops reading requests for it.
        if poll_once(request.as_mut()).await.is_pending() {
            tasks.spawn(request);
        }
    };

    // Let every request already read finish and answer, whatever ended the loop
    // (proto.md: on shutdown, service requests in flight before disconnecting).
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            error!(error = %e, "an NBD request task failed");
        }
    }
    let _ = tokio::time::timeout(conn.write_timeout, async {
        let mut w = conn.writer.lock().await;
        w.shutdown().await
    })
    .await;
    let write_error = conn
        .write_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match (end, write_error) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(e)) if e.kind() == io::ErrorKind::TimedOut => {
            ServerStats::add(&conn.stats.connections_timed_out, 1);
            Err(ConnectionError::WriteStalled(conn.write_timeout))
        }
        (Ok(_), Some(source)) => Err(ConnectionError::Io {
            during: "sending a reply",
            source,
        }),
        (Ok(end), None) => Ok(end),
    }
}

/// Polls a future, turning a panic inside it into an error value.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

async fn serve_request<D, W>(conn: &Conn<D, W>, req: Request, payload: Vec<u8>)
where
    D: BlockDevice,
    W: AsyncWrite + Unpin + Send,
{
    let result = match CatchUnwind(Box::pin(execute(conn, &req, payload))).await {
        Ok(result) => result,
        Err(_) => {
            error!(
                command = req.command.name(),
                offset = req.offset,
                len = req.len,
                "the block device panicked"
            );
            Err(Failure::Device(DeviceError::io(
                format!("{} at offset {}", req.command.name(), req.offset),
                io::Error::other("the block device panicked"),
            )))
        }
    };
    match &result {
        Ok(Done::Data(d)) => ServerStats::add(&conn.stats.bytes_read, d.len() as u64),
        Ok(_) if req.command == Command::Write => {
            ServerStats::add(&conn.stats.bytes_written, u64::from(req.len))
        }
        Ok(_) => {}
        Err(e) => {
            ServerStats::add(&conn.stats.request_errors, 1);
            debug!(
                command = req.command.name(),
                offset = req.offset,
                len = req.len,
                errno = failure_errno(e),
                error = %e,
                "NBD request failed"
            );
        }
    }
    let _buffered = match &result {
        Ok(Done::Data(d)) => Some(Buffered::new(&conn.stats, d.len())),
        _ => None,
    };
    let (head, data) = encode_reply(&req, result, conn.structured, conn.sparse_reads);
    // After a failed or stalled write nothing more goes out: drop the reply.
    if conn.activity.closing() == Some(Close::WriteFailed) {
        return;
    }
    let mut w = conn.writer.lock().await;
    if conn.activity.closing() == Some(Close::WriteFailed) {
        return;
    }
    let sent = write_reply(&mut *w, &head, data.as_deref(), conn.write_timeout).await;
    drop(w);
    if let Err(e) = sent {
        let mut slot = conn
            .write_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(e);
        }
        drop(slot);
        conn.activity.close(Close::WriteFailed);
    }
}

/// Polls `fut` once in the calling task's context.
async fn poll_once<F: Future + ?Sized>(mut fut: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

/// Bytes of requests read from the socket at once.
const REQUEST_BUFFER: usize = 64 * 1024;

/// Reads a WRITE payload of `len` bytes into a fresh buffer, without zeroing it first.
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    len: usize,
) -> Result<Vec<u8>, ConnectionError> {
    const DURING: &str = "reading the payload of a WRITE";
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        let want = (len - payload.len()) as u64;
        match (&mut *rd).take(want).read_buf(&mut payload).await {
            Ok(0) => return Err(ConnectionError::Truncated { during: DURING }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(ConnectionError::Io {
                    during: DURING,
                    source: e,
                });
            }
        }
    }
    Ok(payload)
}

/// Writes `head` then `data` with as few syscalls as the socket allows (one, usually).
/// Fails with `TimedOut` if the socket takes no byte for `stall`.
async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    head: &[u8],
    data: Option<&[u8]>,
    stall: Duration,
) -> io::Result<()> {
    let stalled = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client took no reply data for {stall:?}"),
        )
    };
    let mut bufs = [
        io::IoSlice::new(head),
        io::IoSlice::new(data.unwrap_or(&[])),
    ];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        let written = tokio::time::timeout(stall, w.write_vectored(bufs))
            .await
            .map_err(|_| stalled())?;
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    tokio::time::timeout(stall, w.flush())
        .await
        .map_err(|_| stalled())?
}

/// Checks a request against the export before the device sees it.
fn validate(
    req: &Request,
    size: u64,
    read_only: bool,
    structured: bool,
    meta: bool,
) -> Result<(), Refusal> {
    let command = req.command;
    let allowed = match command {
        Command::Read if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        Command::Read | Command::Write | Command::Flush | Command::Trim | Command::Cache => {
            CMD_FLAG_FUA
        }
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        Command::Disc => u16::MAX,
        Command::Unknown(code) => return Err(Refusal::UnknownCommand(code)),
    };
    if req.flags & !allowed != 0 {
        return Err(Refusal::BadFlags {
            command,
            flags: req.flags & !allowed,
        });
    }
    let writes = matches!(
        command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && read_only {
        return Err(Refusal::ReadOnly { command });
    }
    if command == Command::BlockStatus {
        if !meta {
            return Err(Refusal::NoMetaContext);
        }
        if req.len == 0 {
            return Err(Refusal::ZeroLengthStatus);
        }
    }
    if command == Command::Read && req.len > MAX_PAYLOAD {
        return Err(Refusal::TooLarge {
            command,
            len: req.len,
            max: MAX_PAYLOAD,
        });
    }
    if matches!(command, Command::Flush | Command::Disc) {
        // Offset and length are reserved (zero); nothing to check against the size.
        return Ok(());
    }
    let fits = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= size);
    if !fits {
        let (offset, len) = (req.offset, req.len);
        return Err(
            if matches!(command, Command::Write | Command::WriteZeroes) {
                Refusal::PastEnd {
                    command,
                    offset,
                    len,
                    size,
                }
            } else {
                Refusal::OutOfRange {
                    command,
                    offset,
                    len,
                    size,
                }
            },
        );
    }
    Ok(())
}

async fn execute<D: BlockDevice, W>(
    conn: &Conn<D, W>,
    req: &Request,
    payload: Vec<u8>,
) -> Result<Done, Failure> {
    validate(req, conn.size, conn.read_only, conn.structured, conn.meta)?;
    let dev = &*conn.device;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.len);
    // Zero-length requests are no-ops (proto.md: behaviour unspecified, SHOULD NOT
    // disconnect); the device never sees them.
    match req.command {
        Command::Read if len == 0 => Ok(Done::Data(Vec::new())),
        Command::Read => {
            let data = dev.read(offset, len).await?;
            if data.len() != len as usize {
                return Err(Failure::Device(DeviceError::io(
                    format!("reading {len} bytes at offset {offset}"),
                    io::Error::other(format!("the device returned {} bytes", data.len())),
                )));
            }
            Ok(Done::Data(data))
        }
        Command::Write if len == 0 => Ok(Done::Ok),
        Command::Write => {
            dev.write(offset, payload, fua).await?;
            Ok(Done::Ok)
        }
        Command::Flush => {
            dev.flush().await?;
            Ok(Done::Ok)
        }
        Command::Trim if len == 0 => Ok(Done::Ok),
        Command::Trim => {
            dev.trim(offset, len).await?;
            if fua {
                dev.flush().await?;
            }
            Ok(Done::Ok)
        }
        Command::WriteZeroes if len == 0 => Ok(Done::Ok),
        Command::WriteZeroes => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            dev.write_zeroes(offset, len, no_hole, fua).await?;
            Ok(Done::Ok)
        }
        Command::Cache if len == 0 => Ok(Done::Ok),
        Command::Cache => {
            dev.cache(offset, len).await?;
            Ok(Done::Ok)
        }
        Command::BlockStatus => {
            let extents = dev.block_status(offset, len).await?;
            let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
            Ok(Done::Extents(descriptors(&extents, len, req_one)))
        }
        // Handled by the reader loop / refused by `validate`.
        Command::Disc | Command::Unknown(_) => Err(Failure::Refused(Refusal::UnknownCommand(
            req.command.code(),
        ))),
    }
}

/// Most descriptors in one block status reply (128 KiB of payload). proto.md lets the
/// server describe less than asked; clients ask again from where the reply stopped.
pub const MAX_DESCRIPTORS: usize = 16 * 1024;

/// Turns what the device reported into valid `base:allocation` descriptors for a request
/// of `len` (> 0) bytes: zero-length extents dropped, the total cut to `len`, equal
/// neighbours merged, at most [`MAX_DESCRIPTORS`], at least one (status 0, "allocated,
/// unknown", if the device gave nothing), exactly one with `req_one`.
pub fn descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<BlockDescriptor> {
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut covered = 0u32;
    for e in extents {
        if covered >= len {
            break;
        }
        let flags = e.status_flags();
        let merges = out.last().is_some_and(|last| last.flags == flags);
        if !merges && out.len() >= MAX_DESCRIPTORS {
            break;
        }
        if e.len == 0 {
            continue;
        }
        let take = e.len.min(len - covered);
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += take,
            _ => out.push(BlockDescriptor { len: take, flags }),
        }
        covered += take;
    }
    if out.is_empty() {
        out.push(BlockDescriptor {
            len: len.max(1),
            flags: 0,
        });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// The bytes of the reply to `req`: a header, and for data replies the data itself
/// (sent separately to avoid copying it).
fn encode_reply(
    req: &Request,
    result: Result<Done, Failure>,
    structured: bool,
    sparse_reads: bool,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let handle = req.handle;
    if !structured {
        return match result {
            Ok(Done::Data(data)) => (encode_simple_reply(handle, 0).to_vec(), Some(data)),
            Ok(_) => (encode_simple_reply(handle, 0).to_vec(), None),
            Err(e) => (
                encode_simple_reply(handle, failure_errno(&e)).to_vec(),
                None,
            ),
        };
    }
    let chunk = match result {
        Ok(Done::Data(data)) if data.is_empty() => Chunk::None,
        Ok(Done::Data(data))
            if sparse_reads && req.flags & CMD_FLAG_DF == 0 && crate::is_zero(&data) =>
        {
            Chunk::OffsetHole {
                offset: req.offset,
                len: req.len,
            }
        }
        Ok(Done::Data(data)) => {
            return match encode_offset_data_header(handle, true, req.offset, data.len()) {
                Ok(head) => (head.to_vec(), Some(data)),
                Err(e) => (error_chunk(handle, EIO, &e.to_string()), None),
            };
        }
        Ok(Done::Ok) => Chunk::None,
        Ok(Done::Extents(extents)) => Chunk::BlockStatus {
            context: BASE_ALLOCATION_ID,
            extents,
        },
        Err(e) => return (error_chunk(handle, failure_errno(&e), &e.to_string()), None),
    };
    match encode_chunk(handle, true, &chunk) {
        Ok(bytes) => (bytes, None),
        Err(e) => (error_chunk(handle, EIO, &e.to_string()), None),
    }
}

const NONZERO_EIO: NonZeroU32 = NonZeroU32::new(EIO).expect("EIO is nonzero");

/// A final error chunk (`EIO` if `error` is zero, which no caller passes).
fn error_chunk(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let error = NonZeroU32::new(error).unwrap_or(NONZERO_EIO);
    encode_error_chunk(handle, true, error, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(command: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn validation() {
        let v = |r: Request| validate(&r, 4096, false, true, true);
        assert_eq!(v(req(Command::Read, 0, 0, 4096)), Ok(()));
        assert_eq!(v(req(Command::Read, 0, 4096, 0)), Ok(()));
        assert!(matches!(
            v(req(Command::Read, 0, 1, 4096)),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(
            v(req(Command::Read, 0, u64::MAX, 2)),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(
            v(req(Command::Write, 0, 4000, 100)),
            Err(Refusal::PastEnd { .. })
        ));
        assert!(matches!(
            v(req(Command::WriteZeroes, 0, 4097, 0)),
            Err(Refusal::PastEnd { .. })
        ));
        assert!(matches!(
            v(req(Command::Trim, 0, 4000, 100)),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(
            v(req(Command::Unknown(42), 0, 0, 0)),
            Err(Refusal::UnknownCommand(42))
        ));
        assert!(matches!(
            v(req(Command::Write, CMD_FLAG_NO_HOLE, 0, 1)),
            Err(Refusal::BadFlags { .. })
        ));
        assert!(matches!(
            v(req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 1)),
            Err(Refusal::BadFlags { .. })
        ));
        assert_eq!(
            v(req(
                Command::WriteZeroes,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                0,
                1
            )),
            Ok(())
        );
        assert!(matches!(
            v(req(Command::BlockStatus, 0, 0, 0)),
            Err(Refusal::ZeroLengthStatus)
        ));
        assert_eq!(v(req(Command::Flush, 0, 0, 0)), Ok(()));
        assert!(matches!(
            validate(
                &req(Command::BlockStatus, 0, 0, 1),
                4096,
                false,
                true,
                false
            ),
            Err(Refusal::NoMetaContext)
        ));
        assert!(matches!(
            validate(&req(Command::Trim, 0, 0, 1), 4096, true, true, true),
            Err(Refusal::ReadOnly { .. })
        ));
        assert!(matches!(
            validate(
                &req(Command::Read, CMD_FLAG_DF, 0, 1),
                4096,
                false,
                false,
                false
            ),
            Err(Refusal::BadFlags { .. })
        ));
    }

    /// A writer that takes at most 3 bytes per call, vectored or not.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn replies_survive_short_writes_and_payloads_are_read_exactly() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut w = Trickle(Vec::new());
            let stall = Duration::from_secs(60);
            write_reply(&mut w, b"header-16-bytes!", Some(b"and some data"), stall)
                .await
                .unwrap();
            write_reply(&mut w, b"alone", None, stall).await.unwrap();
            assert_eq!(w.0, b"header-16-bytes!and some dataalone");

            let mut rd: &[u8] = b"0123456789rest";
            assert_eq!(read_payload(&mut rd, 10).await.unwrap(), b"0123456789");
            assert_eq!(rd, b"rest", "nothing past the payload is consumed");
            assert!(matches!(
                read_payload(&mut rd, 5).await,
                Err(ConnectionError::Truncated { .. })
            ));
        });
    }

    proptest! {
        #[test]
        fn descriptors_are_valid(
            lens in proptest::collection::vec((0u32..100_000, any::<bool>(), any::<bool>()), 0..20),
            len in 1u32..500_000,
            req_one in any::<bool>(),
        ) {
            let extents: Vec<Extent> = lens.iter().map(|&(len, hole, zero)| Extent { len, hole, zero }).collect();
            let out = descriptors(&extents, len, req_one);
            prop_assert!(!out.is_empty() && out.len() <= MAX_DESCRIPTORS);
            prop_assert!(out.iter().all(|d| d.len > 0));
            let total: u64 = out.iter().map(|d| u64::from(d.len)).sum();
            prop_assert!(total <= u64::from(len));
            if req_one {
                prop_assert_eq!(out.len(), 1);
            }
            for pair in out.windows(2) {
                prop_assert_ne!(pair[0].flags, pair[1].flags);
            }
        }

        #[test]
        fn validation_never_panics(flags in any::<u16>(), code in any::<u16>(), offset in any::<u64>(),
                                   len in any::<u32>(), size in any::<u64>(), ro in any::<bool>(),
                                   st in any::<bool>(), meta in any::<bool>()) {
            let r = req(Command::from_code(code), flags, offset, len);
            let _ = validate(&r, size, ro, st, meta);
        }
    }
}
