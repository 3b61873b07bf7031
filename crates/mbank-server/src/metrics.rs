//! Counters for `GET /metrics` (Prometheus text format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What the server counts. Gauges that come from the catalog are read at scrape time.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Chunks the `have` queries asked about, and how many the user could skip sending.
    pub have_asked: AtomicU64,
    pub have_hits: AtomicU64,
    /// Chunk uploads: stored anew, or already in the bank (sent because the user could
    /// not read it, or sent twice).
    pub chunks_stored: AtomicU64,
    pub chunks_dedup: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub chunks_served: AtomicU64,
    pub commits: AtomicU64,
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    /// Error answers by kind.
    pub errors: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn error(&self, kind: &str) {
        let mut m = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(kind.to_string()).or_default() += 1;
    }

    /// The text exposition; `sessions`, `machines` and `users` are read by the caller.
    pub fn render(&self, sessions: u64, machines: u64, users: u64) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "mbank_requests_total",
            "HTTP requests answered.",
            self.requests.load(Relaxed),
        );
        counter(
            "mbank_bytes_in_total",
            "Request body bytes received.",
            self.bytes_in.load(Relaxed),
        );
        counter(
            "mbank_bytes_out_total",
            "Response body bytes sent.",
            self.bytes_out.load(Relaxed),
        );
        counter(
            "mbank_have_asked_total",
            "Chunk ids asked about in missing-chunk queries.",
            self.have_asked.load(Relaxed),
        );
        counter(
            "mbank_have_hits_total",
            "Chunk ids the asking user did not need to send.",
            self.have_hits.load(Relaxed),
        );
        counter(
            "mbank_chunks_stored_total",
            "Uploaded chunks stored anew.",
            self.chunks_stored.load(Relaxed),
        );
        counter(
            "mbank_chunks_dedup_total",
            "Uploaded chunks the bank already held (stored once for all users).",
            self.chunks_dedup.load(Relaxed),
        );
        counter(
            "mbank_bytes_stored_total",
            "Stored bytes of the chunks stored anew.",
            self.bytes_stored.load(Relaxed),
        );
        counter(
            "mbank_chunks_served_total",
            "Chunks downloaded.",
            self.chunks_served.load(Relaxed),
        );
        counter(
            "mbank_commits_total",
            "Versions committed.",
            self.commits.load(Relaxed),
        );
        counter("mbank_logins_total", "Logins.", self.logins.load(Relaxed));
        counter(
            "mbank_login_failures_total",
            "Refused logins.",
            self.login_failures.load(Relaxed),
        );
        let asked = self.have_asked.load(Relaxed) + self.chunks_dedup.load(Relaxed);
        let stored = self.chunks_stored.load(Relaxed);
        let ratio = if stored > 0 {
            (asked as f64) / (stored as f64)
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "# HELP mbank_dedup_ratio Chunks offered by writers per chunk stored anew.\n# TYPE mbank_dedup_ratio gauge\nmbank_dedup_ratio {ratio}"
        );
        let _ = writeln!(
            out,
            "# HELP mbank_sessions Machines checked out (leases held).\n# TYPE mbank_sessions gauge\nmbank_sessions {sessions}"
        );
        let _ = writeln!(
            out,
            "# HELP mbank_machines Machines in the bank.\n# TYPE mbank_machines gauge\nmbank_machines {machines}"
        );
        let _ = writeln!(
            out,
            "# HELP mbank_users Users.\n# TYPE mbank_users gauge\nmbank_users {users}"
        );
        let _ = writeln!(
            out,
            "# HELP mbank_errors_total Error answers by kind.\n# TYPE mbank_errors_total counter"
        );
        for (kind, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "mbank_errors_total{{kind=\"{kind}\"}} {n}");
        }
        out
    }
}
