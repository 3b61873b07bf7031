//! Bounds that keep the server up under abuse (docs/api.md, "Limits"):
//!
//! - [`Limits`]: timeouts and caps, set by `mbank serve`'s options.
//! - [`LoginGuard`]: at most [`Limits::hash_concurrency`] password hashes at once, on
//!   their own threads (argon2 costs 19 MiB and tens of milliseconds each), a short
//!   queue behind them (else `503` with `Retry-After`), and a growing backoff after repeated failed logins, per client
//!   address and per user name (`429` with `Retry-After`, without hashing).
//! - [`BodyBudget`]: the bytes of request bodies held in memory at once; a request
//!   waits for its share (its `Content-Length`) before its body is read.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ApiError;

/// Timeouts and caps of `mbank serve`.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time a client has for its TLS handshake, for a request's headers, and to start
    /// its next request on a kept-alive connection.
    pub header_timeout: Duration,
    /// Time a client has to send a request body, plus one second per MiB of it.
    pub body_timeout: Duration,
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one client address.
    pub max_connections_per_address: usize,
    /// Bytes of request bodies held in memory at once, over all requests.
    pub body_memory: usize,
    /// Password hashes (logins) computed at once.
    pub hash_concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 512,
            max_connections_per_address: 64,
            body_memory: 512 << 20,
            hash_concurrency: cores,
        }
    }
}

/// The accounting unit of [`BodyBudget`].
const KIB: usize = 1024;

/// The request-body bytes the server may hold at once.
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total_kib: usize,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        let total_kib = bytes.div_ceil(KIB).clamp(1, u32::MAX as usize);
        BodyBudget {
            permits: Arc::new(Semaphore::new(total_kib)),
            total_kib,
        }
    }

    /// Waits up to `wait` for room for `len` bytes; `503` if none came.
    pub async fn reserve(
        &self,
        len: usize,
        wait: Duration,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        let kib = len.div_ceil(KIB).clamp(1, self.total_kib) as u32;
        match tokio::time::timeout(wait, self.permits.clone().acquire_many_owned(kib)).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(ApiError::unavailable(
                "the server holds as many request bodies as it may; try again shortly",
            )
            .retry_after(1)),
        }
    }
}

/// Failed logins before backoff starts, per client address and per user name. The
/// user's is higher: guesses from one address must not lock its owner out elsewhere.
const FREE_PER_ADDRESS: u32 = 5;
const FREE_PER_USER: u32 = 10;
/// The first backoff; it doubles with each further failure, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A record with no failure for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Most records kept (each address and user name that failed recently).
const MAX_RECORDS: usize = 20_000;
/// Logins that may wait for a hash thread, per thread.
const QUEUE_PER_SLOT: usize = 4;

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Addr(IpAddr),
    User(String),
}

struct Failures {
    count: u32,
    last: Instant,
    until: Instant,
}

type HashJob = Box<dyn FnOnce() + Send>;

/// Bounds the cost of `POST /v1/login`. Password hashes run on their own few threads,
/// not on the blocking pool: argon2's 19 MiB would otherwise stay resident in the
/// allocator arena of every pool thread that ever hashed.
pub struct LoginGuard {
    queue: Mutex<std::sync::mpsc::SyncSender<HashJob>>,
    failures: Mutex<HashMap<Key, Failures>>,
}

impl LoginGuard {
    pub fn new(hash_concurrency: usize) -> Self {
        let threads = hash_concurrency.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<HashJob>(threads * QUEUE_PER_SLOT);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mbank-hash-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return, // the server is gone
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-hash thread");
            }
        }
        LoginGuard {
            queue: Mutex::new(tx),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn keys(user: &str, addr: IpAddr) -> [Key; 2] {
        // Names longer than any valid one are one key: they all fail anyway.
        let user: String = user.chars().take(64).collect();
        [Key::Addr(addr), Key::User(user)]
    }

    /// `429` while `user` or `addr` is in backoff after failed logins.
    pub fn check(&self, user: &str, addr: IpAddr) -> Result<(), ApiError> {
        let now = Instant::now();
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let wait = Self::keys(user, addr)
            .iter()
            .filter_map(|k| f.get(k))
            .map(|r| r.until.saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() {
            return Ok(());
        }
        Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_logins",
            format!(
                "too many failed logins for this user or from this address; wait {} s before trying again",
                wait.as_secs_f64().ceil() as u64
            ),
        )
        .retry_after(wait.as_secs_f64().ceil() as u64))
    }

    /// Runs `f` (a login: one password hash) on the hash threads, behind at most a short
    /// queue; `503` with `Retry-After` when the queue is full.
    pub async fn hash<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: HashJob = Box::new(move || {
            let _ = tx.send(f());
        });
        let queued = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_send(job);
        if queued.is_err() {
            return Err(ApiError::unavailable(
                "the server is checking as many passwords as it may; try again shortly",
            )
            .retry_after(1));
        }
        rx.await
            .map_err(|_| ApiError::internal("the password check failed (its thread ended)"))
    }

    /// Counts a failed login against `user` and `addr`.
    pub fn failed(&self, user: &str, addr: IpAddr) {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() >= MAX_RECORDS {
            f.retain(|_, r| r.until > now || now.duration_since(r.last) < FORGET_AFTER);
        }
        for key in Self::keys(user, addr) {
            let free = match key {
                Key::Addr(_) => FREE_PER_ADDRESS,
                Key::User(_) => FREE_PER_USER,
            };
            if f.len() >= MAX_RECORDS && !f.contains_key(&key) {
                // Full of recent failures: make room by forgetting the oldest.
                if let Some(old) = f.iter().min_by_key(|(_, r)| r.last).map(|(k, _)| k.clone()) {
                    f.remove(&old);
                }
            }
            let r = f.entry(key).or_insert(Failures {
                count: 0,
                last: now,
                until: now,
            });
            if now.duration_since(r.last) >= FORGET_AFTER {
                r.count = 0;
            }
            r.count += 1;
            r.last = now;
            if r.count >= free {
                let doublings = (r.count - free).min(16);
                r.until = now + (FIRST_BACKOFF * (1u32 << doublings)).min(MAX_BACKOFF);
            }
        }
    }

    /// Clears the failures counted against `user` (not those of the address).
    pub fn succeeded(&self, user: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(&Key::User(user.chars().take(64).collect()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_after_the_free_failures_per_address_not_for_other_addresses() {
        let g = LoginGuard::new(1);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..FREE_PER_ADDRESS - 1 {
            g.failed("alice", a);
            assert!(g.check("alice", a).is_ok());
        }
        g.failed("alice", a);
        let e = g.check("alice", a).unwrap_err();
        assert_eq!(e.status.as_u16(), 429);
        assert!(e.retry_after.is_some());
        // Another address may still try alice; the user's count is below its bound.
        assert!(g.check("alice", b).is_ok());
        for _ in 0..FREE_PER_USER {
            g.failed("alice", "10.0.0.3".parse().unwrap());
        }
        assert!(
            g.check("alice", b).is_err(),
            "alice is in backoff everywhere"
        );
        g.succeeded("alice");
        assert!(g.check("alice", b).is_ok());
    }
}
