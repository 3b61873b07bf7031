//! The connection loop of `mbank serve`: accepts TCP connections, refuses those over the
//! caps (in total and per client address, so one address cannot take every slot), runs
//! the TLS handshake (bounded in time) and serves HTTP/1.1 with hyper, whose header
//! timeout also ends idle keep-alive connections. `axum::serve` offers none of these
//! bounds, hence this loop.
//!
//! Every connection's task holds a [`Slot`] (counted per address, released on drop) and
//! a clone of the `done` sender, so shutdown waits for the last connection by waiting for
//! the channel to close.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::Limits;

/// Open connections, in total and per client address.
#[derive(Default)]
struct Open {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
}

/// A connection's place in [`Open`]; given back on drop.
struct Slot {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.total -= 1;
        if let Some(n) = o.by_addr.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                o.by_addr.remove(&self.ip);
            }
        }
    }
}

/// Takes a slot for a connection from `ip`, unless a cap is reached.
fn take_slot(open: &Arc<Mutex<Open>>, ip: IpAddr, limits: &Limits) -> Option<Slot> {
    let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
    let mine = o.by_addr.get(&ip).copied().unwrap_or(0);
    if o.total >= limits.max_connections || mine >= limits.max_connections_per_address {
        return None;
    }
    o.total += 1;
    *o.by_addr.entry(ip).or_default() += 1;
    Some(Slot {
        open: open.clone(),
        ip,
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
            let _slot = slot;
            let _done = done;
            match tls {
                None => serve_one(sock, peer, router, &limits, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(sock)).await {
                        Ok(Ok(s)) => serve_one(s, peer, router, &limits, stop).await,
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    drop(done_tx);
    // Every connection task holds a sender: `None` once the last one ended.
    let _ = done_rx.recv().await;
}

/// Serves HTTP/1.1 on one connection; on shutdown, finishes the request in progress.
async fn serve_one<S>(
    io: S,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut r = router.clone();
        async move { tower_call(&mut r, req).await }
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
