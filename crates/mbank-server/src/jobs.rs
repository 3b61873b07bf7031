//! What an administrator runs on the bank over HTTPS (`/v1/admin/…`, docs/api.md):
//! `gc`, `verify` and `stats` as jobs in the server process, each on a thread of its
//! own with a `Bank` opened on the served directory (as `mbank gc` would be on the host:
//! safe while serving), whose progress and report the client polls; and the users'
//! quotas and usage. The same functions serve `mbank gc` and `verify` on the host, so
//! both record `<bank>/last-JOB.json` for `/metrics` and prune the same rights.
//!
//! [`Jobs`] is the server's only runner: the web console's storage page starts gc and
//! verify through it and lists its jobs (issue 16: one set of rules), so one job of a
//! kind runs at a time whichever way it was started, and each sees the other's.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use mbank_bank::{Bank, Progress, Unit};
use mbank_remote::wire;

/// A running or finished job.
pub struct JobState {
    id: u64,
    job: String,
    /// The administrator who started it.
    by: String,
    started_ms: i64,
    phase: Mutex<(String, &'static str)>,
    total: AtomicU64,
    done: AtomicU64,
    /// `None` while it runs.
    outcome: Mutex<Option<(i64, Result<serde_json::Value, String>)>>,
}

impl JobState {
    fn new(id: u64, job: &str, by: &str) -> JobState {
        JobState {
            id,
            job: job.to_string(),
            by: by.to_string(),
            started_ms: mbank_catalog::now_ms(),
            phase: Mutex::new(("starting".into(), "chunks")),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            outcome: Mutex::new(None),
        }
    }

    /// True while the job runs.
    pub fn running(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// What `GET /v1/admin/jobs/{id}` answers.
    pub fn wire(&self) -> wire::Job {
        let (phase, unit) = self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (state, finished_ms, result, error) = match outcome {
            None => ("running", None, None, None),
            Some((t, Ok(v))) => ("done", Some(t), Some(v), None),
            Some((t, Err(e))) => ("failed", Some(t), None, Some(e)),
        };
        wire::Job {
            id: self.id,
            job: self.job.clone(),
            by: self.by.clone(),
            state: state.into(),
            phase,
            done: self.done.load(Relaxed),
            total: self.total.load(Relaxed),
            unit: unit.into(),
            started_ms: self.started_ms,
            finished_ms,
            result,
            error,
        }
    }
}

impl Progress for JobState {
    fn start(&self, what: &str, total: u64, unit: Unit) {
        let unit = match unit {
            Unit::Bytes => "bytes",
            Unit::Chunks => "chunks",
        };
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = (what.to_string(), unit);
        self.total.store(total, Relaxed);
        self.done.store(0, Relaxed);
    }

    fn advance(&self, n: u64) {
        self.done.fetch_add(n, Relaxed);
    }
}

/// The jobs started since the server started (ids from 1).
#[derive(Default)]
pub struct Jobs {
    all: Mutex<Vec<std::sync::Arc<JobState>>>,
}

impl Jobs {
    /// Starts `job` on the bank in `bank_dir` for administrator `by`, or answers the
    /// one of that kind that runs already (whoever started it).
    pub fn start(&self, bank_dir: &Path, job: &str, by: &str) -> Result<wire::Job, String> {
        if !matches!(job, "gc" | "verify" | "stats") {
            return Err(format!("there is no job {job:?}: gc, verify or stats"));
        }
        let mut all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = all.iter().find(|j| j.job == job && j.running()) {
            return Ok(j.wire());
        }
        let state = std::sync::Arc::new(JobState::new(all.len() as u64 + 1, job, by));
        all.push(state.clone());
        drop(all);
        let dir: PathBuf = bank_dir.to_path_buf();
        let answer = state.wire();
        let name = job.to_string();
        let job = job.to_string();
        std::thread::Builder::new()
            .name(format!("mbank {name}"))
            .spawn(move || {
                tracing::info!(job, id = state.id, "job started");
                let r = run(&dir, &job, &state);
                match &r {
                    Ok(_) => tracing::info!(job, id = state.id, "job done"),
                    Err(e) => tracing::warn!(job, id = state.id, error = %e, "job failed"),
                }
                *state.outcome.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((mbank_catalog::now_ms(), r));
            })
            .map_err(|e| format!("cannot start a thread for {name}: {e}"))?;
        Ok(answer)
    }

    /// Job `id`, if there is one.
    pub fn get(&self, id: u64) -> Option<wire::Job> {
        let all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().find(|j| j.id == id).map(|j| j.wire())
    }

    /// The last job of each kind started since the server started, oldest first.
    pub fn latest(&self) -> Vec<wire::Job> {
        let all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<wire::Job> = Vec::new();
        for j in all.iter().rev() {
            if !out.iter().any(|o| o.job == j.job) {
                out.push(j.wire());
            }
        }
        out.reverse();
        out
    }
}

fn run(dir: &Path, job: &str, progress: &JobState) -> Result<serde_json::Value, String> {
    let started = std::time::Instant::now();
    let err = |e: mbank_bank::BankError| e.to_string();
    match job {
        "gc" => {
            let bank = Bank::open(dir, false).map_err(err)?;
            let r = bank.gc(progress);
            let stored = r
                .as_ref()
                .ok()
                .and_then(|_| bank.store().stats().ok())
                .map(|s| s.bytes);
            record_job(
                dir,
                "gc",
                r.as_ref().err().map(|e| e.to_string()),
                started,
                stored,
            );
            let r = r.map_err(err)?;
            let pruned = prune_rights(&bank, dir, r.cutoff_ms)?;
            let mut v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
            v["access_rows_pruned"] = pruned.into();
            Ok(v)
        }
        "verify" => {
            let bank = Bank::open(dir, true).map_err(err)?;
            let r = bank.verify(None, mbank_bank::default_jobs(), progress);
            let failure = match &r {
                Ok(r) if r.ok() => None,
                Ok(_) => Some("damage found".to_string()),
                Err(e) => Some(e.to_string()),
            };
            record_job(dir, "verify", failure, started, None);
            let r = r.map_err(err)?;
            let mut v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
            v["ok"] = r.ok().into();
            Ok(v)
        }
        _ => {
            let bank = Bank::open(dir, true).map_err(err)?;
            progress.start("counting", 0, Unit::Chunks);
            serde_json::to_value(bank.stats().map_err(err)?).map_err(|e| e.to_string())
        }
    }
}

/// After a gc of a served bank: forgets who may read a chunk that is gone, so that
/// quotas count what is still stored; but not the rights recorded since the gc's
/// cutoff, which a writer in flight may rely on (the server holds the chunks it sent
/// back until their commit, out of the gc's sight). Returns the rows dropped; 0 for a
/// bank that is not served (no access database).
pub fn prune_rights(bank: &Bank, dir: &Path, cutoff_ms: i64) -> Result<u64, String> {
    if !dir.join(mbank_access::FILE_NAME).is_file() {
        return Ok(0);
    }
    let referenced = bank.referenced_chunks().map_err(|e| e.to_string())?;
    let access = mbank_access::Access::open(dir).map_err(|e| e.to_string())?;
    let store = bank.store();
    access
        .prune(
            &|id| {
                referenced.contains(id)
                    || !matches!(
                        store.plain_len(id),
                        Err(mbank_store::StoreError::Missing(_))
                    )
            },
            cutoff_ms,
        )
        .map_err(|e| e.to_string())
}

/// Records in `<bank>/last-JOB.json` when `gc` or `verify` ended and how (`failure`:
/// what went wrong), for `/metrics` (docs/formats.md). Best effort: a read-only bank
/// keeps no record.
pub fn record_job(
    dir: &Path,
    job: &str,
    failure: Option<String>,
    started: std::time::Instant,
    bytes_stored: Option<u64>,
) {
    let v = serde_json::json!({
        "job": job,
        "finished_ms": mbank_catalog::now_ms(),
        "seconds": started.elapsed().as_secs_f64(),
        "ok": failure.is_none(),
        "failure": failure,
        "bytes_stored": bytes_stored,
    });
    let path = dir.join(format!("last-{job}.json"));
    let tmp = dir.join(format!(".last-{job}.json.tmp"));
    let written =
        std::fs::write(&tmp, format!("{v}\n")).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        eprintln!(
            "mbank: warning: cannot record the {job} run in {}: {e}",
            path.display()
        );
    }
}
