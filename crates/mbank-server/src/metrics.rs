//! Counters for `GET /metrics` (Prometheus text format 0.0.4), named by Prometheus's
//! conventions: the unit in the name (`_bytes`, `_seconds`), `_total` for counters,
//! `mbank_build_info` for the version, and error kinds (docs/api.md) as labels.

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
    /// Pack segments sent, and their bytes.
    pub pack_segments_served: AtomicU64,
    pub pack_bytes_served: AtomicU64,
    /// Presigned URLs handed out for direct chunk reads.
    pub chunk_urls: AtomicU64,
    /// Presigned URLs handed out for direct uploads, and chunks confirmed after one.
    pub upload_urls: AtomicU64,
    pub chunks_confirmed: AtomicU64,
    pub commits: AtomicU64,
    /// Chunk headers read from the store to check a commit's chunk lengths.
    pub commit_length_reads: AtomicU64,
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    /// Error answers by kind.
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Request durations by (method, route).
    pub durations: Mutex<BTreeMap<(String, String), Histogram>>,
}

/// Upper bounds of the request-duration histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One histogram: cumulative counts are made when rendered.
#[derive(Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// How `mbank gc` or `mbank verify` last ended on the bank's host: what the command
/// wrote to `<bank>/last-JOB.json` (docs/formats.md).
#[derive(Debug, serde::Deserialize)]
pub struct LastJob {
    pub finished_ms: i64,
    #[serde(default)]
    pub seconds: f64,
    pub ok: bool,
    /// What went wrong, when not `ok`.
    #[serde(default)]
    pub failure: Option<String>,
    #[serde(default)]
    pub bytes_stored: Option<u64>,
}

impl LastJob {
    /// The record of `job` in `bank_dir`, if there is one that parses.
    pub fn read(bank_dir: &std::path::Path, job: &str) -> Option<LastJob> {
        let text = std::fs::read(bank_dir.join(format!("last-{job}.json"))).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

impl Metrics {
    /// Counts a request of `method` on `route` that took `secs`.
    pub fn observe_duration(&self, method: &str, route: &str, secs: f64) {
        let mut m = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let h = m
            .entry((method.to_string(), route.to_string()))
            .or_default();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.counts[i] += 1;
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn error(&self, kind: &str) {
        let mut m = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(kind.to_string()).or_default() += 1;
    }

    /// The text exposition; `sessions`, `machines`, `users` and the last gc and verify
    /// runs are read by the caller.
    pub fn render(
        &self,
        sessions: u64,
        machines: u64,
        users: u64,
        jobs: &[(&str, Option<LastJob>)],
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP mbank_build_info The running mbank's version.\n# TYPE mbank_build_info gauge\nmbank_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP mbank_request_duration_seconds Time from a request's arrival to its answer, by route.\n# TYPE mbank_request_duration_seconds histogram"
        );
        for ((method, route), h) in self
            .durations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let labels = format!("method=\"{method}\",route=\"{}\"", route.replace('"', "'"));
            let mut cumulative = 0;
            for (le, n) in BUCKETS.iter().zip(h.counts) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "mbank_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "mbank_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\nmbank_request_duration_seconds_sum{{{labels}}} {}\nmbank_request_duration_seconds_count{{{labels}}} {}",
                h.count, h.sum, h.count
            );
        }
        for (job, last) in jobs {
            let Some(last) = last else { continue };
            let _ = writeln!(
                out,
                "# HELP mbank_last_{job}_timestamp_seconds When `mbank {job}` last ended on the bank's host.\n# TYPE mbank_last_{job}_timestamp_seconds gauge\nmbank_last_{job}_timestamp_seconds {}",
                last.finished_ms as f64 / 1000.0
            );
            let _ = writeln!(
                out,
                "# HELP mbank_last_{job}_success 1 if the last `mbank {job}` succeeded (for verify: found no damage), else 0.\n# TYPE mbank_last_{job}_success gauge\nmbank_last_{job}_success {}",
                u8::from(last.ok)
            );
            if let Some(b) = last.bytes_stored {
                let _ = writeln!(
                    out,
                    "# HELP mbank_stored_bytes Bytes the chunk store held after the last gc.\n# TYPE mbank_stored_bytes gauge\nmbank_stored_bytes {b}"
                );
            }
        }
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
            "mbank_received_bytes_total",
            "Request body bytes received.",
            self.bytes_in.load(Relaxed),
        );
        counter(
            "mbank_sent_bytes_total",
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
            "mbank_stored_bytes_total",
            "Stored bytes of the chunks stored anew.",
            self.bytes_stored.load(Relaxed),
        );
        counter(
            "mbank_chunks_served_total",
            "Chunks downloaded.",
            self.chunks_served.load(Relaxed),
        );
        counter(
            "mbank_pack_segments_served_total",
            "Pack segments downloaded (exports of versions that have a pack).",
            self.pack_segments_served.load(Relaxed),
        );
        counter(
            "mbank_pack_bytes_served_total",
            "Bytes of pack segments downloaded.",
            self.pack_bytes_served.load(Relaxed),
        );
        counter(
            "mbank_chunk_urls_total",
            "Presigned URLs handed out for direct chunk reads from the object store.",
            self.chunk_urls.load(Relaxed),
        );
        counter(
            "mbank_upload_urls_total",
            "Presigned URLs handed out for direct chunk uploads to the object store.",
            self.upload_urls.load(Relaxed),
        );
        counter(
            "mbank_chunks_confirmed_total",
            "Chunks uploaded by presigned URLs that the server verified and recorded.",
            self.chunks_confirmed.load(Relaxed),
        );
        counter(
            "mbank_commits_total",
            "Versions committed.",
            self.commits.load(Relaxed),
        );
        counter(
            "mbank_commit_length_reads_total",
            "Chunk headers read from the store to check the lengths in commits.",
            self.commit_length_reads.load(Relaxed),
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
