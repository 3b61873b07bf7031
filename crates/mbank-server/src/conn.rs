//! The connection loop of `mbank serve`: accepts TCP connections, refuses those over the
//! caps (in total and per client address, so one address cannot take every slot), runs
//! the TLS handshake (bounded in time) and serves HTTP/1.1 with hyper, whose header
//! timeout also ends idle keep-alive connections. `axum::serve` offers none of these
//! bounds, hence this loop.
//!
//! Every connection's task holds a [`Slot`] (counted per address, released on drop) and
//! a clone of the `done` sender, so shutdown waits for the last connection by waiting for
//! the channel to close.
//!
//! At the total cap a newcomer is not simply turned away: the connection that has
//! waited longest without a request in progress (a slow client still sending headers,
//! or an idle keep-alive one), if it has waited over [`EVICT_AFTER`], is closed to make
//! room. So slow or idle connections from many addresses cannot keep legitimate users
//! out; a connection whose request is being served is never closed for this.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::Limits;

/// A connection waiting this long without a request in progress may be closed to make
/// room for a newcomer when the server is at its connection cap.
const EVICT_AFTER: Duration = Duration::from_secs(1);

/// What the loop knows of one open connection.
struct Conn {
    /// A request is being served.
    busy: bool,
    /// Since when it has been waiting (opened, or its last request answered).
    since: Instant,
    /// Closes the connection.
    kill: Arc<tokio::sync::Notify>,
}

/// Open connections, in total and per client address.
#[derive(Default)]
struct Open {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
    conns: HashMap<u64, Conn>,
    next: u64,
}

impl Open {
    /// Closes the connection waiting longest without a request, if one has waited
    /// over [`EVICT_AFTER`]; true if it did.
    fn evict_one(&mut self) -> bool {
        let now = Instant::now();
        let victim = self
            .conns
            .iter()
            .filter(|(_, c)| !c.busy && now.duration_since(c.since) >= EVICT_AFTER)
            .min_by_key(|(_, c)| c.since)
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.conns.remove(&id)) {
            Some(c) => {
                c.kill.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A connection's place in [`Open`]; given back on drop.
struct Slot {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
    id: u64,
    kill: Arc<tokio::sync::Notify>,
}

impl Slot {
    /// Marks the connection as serving a request (`true`) or waiting (`false`).
    fn set_busy(&self, busy: bool) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = o.conns.get_mut(&self.id) {
            c.busy = busy;
            c.since = Instant::now();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.conns.remove(&self.id);
        o.total -= 1;
        if let Some(n) = o.by_addr.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                o.by_addr.remove(&self.ip);
            }
        }
    }
}

/// Takes a slot for a connection from `ip`, unless its address is at its cap, or the
/// total cap is reached and no waiting connection can be closed to make room (the one
/// closed gives its slot back when its task ends, so the total may pass the cap by the
/// connections being closed).
fn take_slot(open: &Arc<Mutex<Open>>, ip: IpAddr, limits: &Limits) -> Option<Slot> {
    let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
    let mine = o.by_addr.get(&ip).copied().unwrap_or(0);
    if mine >= limits.max_connections_per_address {
        return None;
    }
    if o.conns.len() >= limits.max_connections && !o.evict_one() {
        return None;
    }
    o.total += 1;
    *o.by_addr.entry(ip).or_default() += 1;
    let (id, kill) = (o.next, Arc::new(tokio::sync::Notify::new()));
    o.next += 1;
    o.conns.insert(
        id,
        Conn {
            busy: false,
            since: Instant::now(),
            kill: kill.clone(),
        },
    );
    Some(Slot {
        open: open.clone(),
        ip,
        id,
        kill,
    })
}

/// Serves `router` on `tcp` (with TLS when `tls` is given) until `shutdown` resolves,
/// then lets open connections finish their requests and returns.
pub async fn run(
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let open = Arc::new(Mutex::new(Open::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut refused_logged = std::time::Instant::now() - Duration::from_secs(60);
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = take_slot(&open, peer.ip(), &limits) else {
            // Closed at once: a client over its share gets no slot to hold.
            if refused_logged.elapsed() > Duration::from_secs(10) {
                refused_logged = std::time::Instant::now();
                tracing::warn!(%peer, max = limits.max_connections, per_address = limits.max_connections_per_address, "connection refused: too many open connections");
            }
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (router, tls, stop, done) = (
            router.clone(),
            tls.clone(),
            stop_rx.clone(),
            done_tx.clone(),
        );
        let limits = limits.clone();
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            let kill = slot.kill.clone();
            let _done = done;
            let handshake_by = tokio::time::Instant::now() + limits.header_timeout;
            let work = async {
                match tls {
                    None => serve_one(sock, peer, router, &limits, stop, slot.clone()).await,
                    // One deadline for the first byte and the whole handshake.
                    Some(_) if plain_http(&sock, handshake_by).await => {
                        answer_use_https(sock, peer, &limits).await
                    }
                    Some(acceptor) => {
                        match tokio::time::timeout_at(handshake_by, acceptor.accept(sock)).await {
                            Ok(Ok(s)) => {
                                serve_one(s, peer, router, &limits, stop, slot.clone()).await
                            }
                            Ok(Err(e)) => {
                                tracing::info!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
            };
            tokio::select! {
                _ = work => {}
                _ = kill.notified() => {
                    tracing::debug!(%peer, "closed to make room for a new connection");
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    drop(done_tx);
    // Every connection task holds a sender: `None` once the last one ended.
    let _ = done_rx.recv().await;
}

/// True when a client of the TLS port starts with a plain HTTP request (a method's
/// capital letters; a TLS handshake starts with the byte 0x16).
async fn plain_http(sock: &tokio::net::TcpStream, by: tokio::time::Instant) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout_at(by, sock.peek(&mut first)).await,
        Ok(Ok(1)) if first[0].is_ascii_uppercase()
    )
}

/// Answers a plain HTTP request on the TLS port with a `400 use_https` error (docs/api.md),
/// so that the client says what is wrong rather than retrying a garbled answer.
async fn answer_use_https(mut sock: tokio::net::TcpStream, peer: SocketAddr, limits: &Limits) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The request's head, read before answering so that closing does not reset the
    // connection under the answer.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read_head = async {
        while head.len() < 64 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(limits.header_timeout, read_head).await;
    tracing::info!(%peer, "plain HTTP on the TLS port: answered use_https");
    let body = serde_json::to_string(&mbank_remote::wire::ErrorBody {
        kind: "use_https".into(),
        message: "this bank server speaks TLS only: use https:// in its URL".into(),
        ..Default::default()
    })
    .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(limits.header_timeout, async {
        let _ = sock.write_all(answer.as_bytes()).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

/// Serves HTTP/1.1 on one connection; on shutdown, finishes the request in progress.
async fn serve_one<S>(
    io: S,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    mut stop: watch::Receiver<bool>,
    slot: Arc<Slot>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut r = router.clone();
        let slot = slot.clone();
        slot.set_busy(true);
        async move {
            let resp = tower_call(&mut r, req).await;
            slot.set_busy(false);
            resp
        }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    let conn = b.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                    return;
                }
            }
        }
    }
}

/// Calls the router (always ready) for one request.
async fn tower_call(
    router: &mut Router,
    req: hyper::Request<Incoming>,
) -> Result<axum::response::Response, std::convert::Infallible> {
    use tower_service::Service;
    router.call(req.map(axum::body::Body::new)).await
}
