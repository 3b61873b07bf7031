//! The console's administrator pages beyond adding users: changing users (quota,
//! password, disable, remove), published machines, storage with garbage collection
//! and verification run by the server, live sessions, and health charts from the
//! metrics' counters.
//!
//! **Jobs**: an administrator may start `gc` or `verify` on the bank from the storage
//! page. They are the API's jobs ([`crate::jobs::Jobs`], as `mbank gc --bank URL`
//! starts them): one of a kind at a time however started, recorded in
//! `<bank>/last-JOB.json`. The page shows the last job of each kind since the server
//! started (phase and progress while it runs, then its outcome), and the recorded
//! last run where that is newer (before this server started, or on the bank's host).
//!
//! **Health**: a task samples the counters every [`SAMPLE_EVERY`]; the page draws
//! the last [`SAMPLES`] as rates, in inline SVG (no script).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect};
use maud::{Markup, html};
use mbank_remote::wire;
use serde::Deserialize;

use super::{
    ApiError, App, Page, Posted, Session, Shared, WebResult, actions, admin_only, blocking, bytes,
    check_csrf, layout, session, when,
};

/// How often the health counters are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How many samples the health page draws (an hour).
const SAMPLES: usize = 360;

/// The console's state in the server: health samples.
#[derive(Default)]
pub(crate) struct ConsoleState {
    samples: Mutex<VecDeque<Sample>>,
    sampler: std::sync::OnceLock<()>,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    ms: i64,
    requests: u64,
    errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    commits: u64,
}

fn sample(app: &App) -> Sample {
    let m = &app.metrics;
    let errors = m
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .sum();
    Sample {
        ms: mbank_catalog::now_ms(),
        requests: m.requests.load(Relaxed),
        errors,
        bytes_in: m.bytes_in.load(Relaxed),
        bytes_out: m.bytes_out.load(Relaxed),
        commits: m.commits.load(Relaxed),
    }
}

/// Starts the health sampler once per server (when a runtime is there to run it).
pub(crate) fn start_sampler(app: &Shared) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(app);
    app.console.sampler.get_or_init(|| {
        rt.spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                let Some(app) = weak.upgrade() else { return };
                let s = sample(&app);
                let mut q = app
                    .console
                    .samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if q.len() == SAMPLES {
                    q.pop_front();
                }
                q.push_back(s);
            }
        });
    });
}

fn admin(s: &Session) -> Result<(), ApiError> {
    admin_only(s)
}

// ---------------------------------------------------------------------------------
// Users

#[derive(Deserialize)]
pub(super) struct ChangeUser {
    #[serde(default)]
    csrf: String,
    name: String,
    /// `quota`, `password`, `disable`, `enable` or `remove`.
    action: String,
    #[serde(default)]
    quota_gib: String,
    #[serde(default)]
    password: String,
}

/// `POST /admin/users/change`: `mbank admin user` for one user (`Access::set_quota`,
/// `set_password`, `set_disabled`, `remove_user`). An administrator cannot disable or
/// remove themself (nobody would be left to undo it).
pub(crate) async fn change_user(
    State(app): State<Shared>,
    headers: HeaderMap,
    Posted(f): Posted<ChangeUser>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    admin(&s)?;
    if f.name == s.user.name && matches!(f.action.as_str(), "disable" | "remove") {
        return Err(ApiError::bad_request(format!(
            "you cannot {} your own account ({}); ask another administrator",
            f.action, f.name
        ))
        .into());
    }
    let quota = if f.action == "quota" {
        super::quota_bytes(&f.quota_gib)?
    } else {
        None
    };
    let by = s.user.name.clone();
    blocking(&app, move |app| {
        app.access(|a| {
            match f.action.as_str() {
                "quota" => a.set_quota(&f.name, quota)?,
                "password" => a.set_password(&f.name, &f.password)?,
                "disable" => {
                    a.set_disabled(&f.name, true)?;
                }
                "enable" => {
                    a.set_disabled(&f.name, false)?;
                }
                "remove" => a.remove_user(&f.name)?,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "no such change to a user: {other:?}"
                    )));
                }
            }
            Ok(())
        })?;
        tracing::info!(user = %f.name, action = %f.action, by = %by, "user changed (console)");
        Ok(())
    })
    .await?;
    Ok(Redirect::to("/admin/users").into_response())
}

// ---------------------------------------------------------------------------------
// Published machines

/// `GET /admin/published`: the published machines; publish another, unpublish one.
pub(crate) async fn published_page(State(app): State<Shared>, headers: HeaderMap) -> WebResult {
    let s = session(&app, &headers).await?;
    admin(&s)?;
    let published = blocking(&app, |app| app.access(|a| Ok(a.published()?))).await?;
    let body = html! {
        h1 { "Published machines" }
        p { "Every user may see and fork a published machine; its new versions are published with it." }
        table id="published" {
            thead { tr { th { "Machine" } th {} } }
            tbody {
                @for m in &published {
                    tr {
                        td { a href=(format!("/machines/{m}")) { (m) } }
                        td {
                            form.inline method="post" action="/admin/published" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                input type="hidden" name="machine" value=(m);
                                input type="hidden" name="action" value="unpublish";
                                button.danger type="submit" name="unpublish" { "Unpublish" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Publish a machine" }
        form id="publish" method="post" action="/admin/published" {
            input type="hidden" name="csrf" value=(s.csrf);
            input type="hidden" name="action" value="publish";
            label { "Machine (user/name) " input type="text" name="machine" required; }
            button type="submit" { "Publish" }
        }
    };
    Ok(Page(StatusCode::OK, layout("Published", Some(&s), body)).into_response())
}

#[derive(Deserialize)]
pub(super) struct PublishForm {
    #[serde(default)]
    csrf: String,
    machine: String,
    action: String,
}

/// `POST /admin/published`: `actions::publish` or `actions::unpublish`.
pub(crate) async fn publish(
    State(app): State<Shared>,
    headers: HeaderMap,
    Posted(f): Posted<PublishForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let m: mbank_core::MachineName = f
        .machine
        .trim()
        .parse()
        .map_err(|e| ApiError::bad_request(format!("{e}")))?;
    let user = s.user.clone();
    let publish = f.action == "publish";
    let head = m.clone();
    blocking(&app, move |app| match f.action.as_str() {
        "publish" => actions::publish(app, &user, &m).map(drop),
        "unpublish" => actions::unpublish(app, &user, &m),
        other => Err(ApiError::bad_request(format!(
            "no such change to a publication: {other:?}"
        ))),
    })
    .await?;
    if publish {
        // Every station will fetch the published head: pack it for exports, after the
        // answer (a build takes seconds of a core).
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            let built = app
                .catalog(|c| Ok(c.resolve(&head, None)?))
                .and_then(|v| app.build_pack(&v, true));
            if let Err(e) = built {
                tracing::warn!(machine = %head, "the published head was not packed: {}", e.body.message);
            }
        });
    }
    Ok(Redirect::to("/admin/published").into_response())
}

// ---------------------------------------------------------------------------------
// Storage and jobs

/// `GET /admin/storage`: the bank's totals (`mbank stats`: a walk over every index),
/// each user's use, and the gc, verify and stats jobs.
pub(crate) async fn storage_page(State(app): State<Shared>, headers: HeaderMap) -> WebResult {
    let s = session(&app, &headers).await?;
    admin(&s)?;
    let (stats, users, records) = blocking(&app, |app| {
        let bank = mbank_bank::Bank::open(&app.bank_dir, true)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let stats = bank
            .stats()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut users = Vec::new();
        for u in app.access(|a| Ok(a.users()?))? {
            let used = app.usage(&u.name)?;
            users.push((u, used));
        }
        let records =
            ["gc", "verify"].map(|job| (job, crate::metrics::LastJob::read(&app.bank_dir, job)));
        Ok((stats, users, records))
    })
    .await?;
    let jobs = app.jobs.latest();
    let running = |kind: &str| jobs.iter().any(|j| j.job == kind && j.state == "running");
    // A recorded run newer than this server's last job of its kind.
    let records: Vec<_> = records
        .into_iter()
        .filter_map(|(kind, r)| {
            let r = r?;
            let newer = match jobs.iter().find(|j| j.job == kind) {
                None => true,
                Some(j) => j.finished_ms.is_some_and(|f| r.finished_ms > f),
            };
            newer.then_some((kind, r))
        })
        .collect();
    let body = html! {
        h1 { "Storage" }
        table id="storage" {
            tbody {
                tr { th { "Stored" } td { (bytes(stats.bytes_stored)) " in " (stats.chunks) " chunks (" (stats.store) ")" } }
                tr { th { "Disks hold" } td { (bytes(stats.logical_nonzero_bytes)) " of data in " (stats.versions) " versions of " (stats.machines) " machines (" (bytes(stats.logical_bytes)) " with zeros)" } }
                tr { th { "Deduplication" } td id="dedup" { (format!("{:.2}", stats.dedup_ratio)) "×" } }
                tr { th { "Chunks referenced" } td { (stats.chunks_referenced) } }
                tr { th { "Packs" } td id="packs" { (stats.packs) " (" (bytes(stats.pack_bytes)) ", copies for exports)" } }
            }
        }
        h2 { "Use per user" }
        table id="use" {
            thead { tr { th { "User" } th { "Used" } th { "Quota" } } }
            tbody {
                @for (u, used) in &users {
                    tr { td { (u.name) } td { (bytes(*used)) } td { (u.quota.map(bytes).unwrap_or_else(|| "none".into())) } }
                }
            }
        }
        h2 { "Garbage collection and verification" }
        p { "The same jobs as " code { "mbank gc" } ", " code { "verify" } " and " code { "stats" } " with " code { "--bank URL" } "." }
        table id="jobs" {
            thead { tr { th { "Job" } th { "By" } th { "Started" } th { "State" } th { "Outcome" } } }
            tbody {
                @for j in &jobs {
                    tr.job {
                        td { (j.job) }
                        td { (j.by) }
                        td { (when(j.started_ms)) }
                        td {
                            @match j.finished_ms {
                                None => {
                                    "running: " (j.phase)
                                    @if j.total > 0 {
                                        " " progress max=(j.total) value=(j.done.min(j.total)) {}
                                        " " (j.done.min(j.total) * 100 / j.total) "%"
                                    }
                                }
                                Some(f) => { "finished " (when(f)) }
                            }
                        }
                        td.outcome {
                            @match outcome(j) {
                                Some(Ok(o)) => span.ok { (o) },
                                Some(Err(e)) => span.error { (e) },
                                None => "-",
                            }
                        }
                    }
                }
                @for (kind, r) in &records {
                    tr.job.recorded {
                        td { (kind) }
                        td { "-" }
                        td { (when(r.finished_ms - (r.seconds * 1000.0) as i64)) }
                        td { "finished " (when(r.finished_ms)) " (" code { "last-" (kind) ".json" } ")" }
                        td.outcome {
                            @match (&r.failure, r.ok) {
                                (None, true) if *kind == "verify" => span.ok { "no damage" },
                                (None, true) => span.ok { "done in " (format!("{:.1}", r.seconds)) " s" @if let Some(b) = r.bytes_stored { "; " (bytes(b)) " stored after it" } },
                                (f, _) => span.error { (f.as_deref().unwrap_or("failed")) },
                            }
                        }
                    }
                }
            }
        }
        @if jobs.is_empty() && records.is_empty() { p { "No gc or verify has run on this bank." } }
        @if jobs.iter().any(|j| j.state == "running") {
            p { "A job is running; " a href="/admin/storage" { "reload the page" } " to follow it." }
        }
        @for kind in ["gc", "verify"] {
            @if !running(kind) {
                form.inline method="post" action="/admin/jobs" {
                    input type="hidden" name="csrf" value=(s.csrf);
                    input type="hidden" name="kind" value=(kind);
                    button type="submit" name=(format!("start-{kind}")) { "Start " (kind) }
                }
            }
        }
    };
    Ok(Page(StatusCode::OK, layout("Storage", Some(&s), body)).into_response())
}

/// What the storage page says of a finished job: `Ok(summary)`, or `Err` with what
/// failed or the damage verify found; `None` while it runs.
fn outcome(j: &wire::Job) -> Option<Result<String, String>> {
    if j.state == "running" {
        return None;
    }
    let Some(r) = &j.result else {
        return Some(Err(j
            .error
            .clone()
            .unwrap_or_else(|| format!("{} failed (no reason given)", j.job))));
    };
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let len = |k: &str| r[k].as_array().map_or(0, Vec::len);
    let secs = r["seconds"].as_f64().unwrap_or(0.0);
    Some(match j.job.as_str() {
        "gc" => Ok(format!(
            "deleted {} chunks ({}), kept {} for writers in flight; {} referenced by {} versions; forgot {} rights; {secs:.1} s",
            n("chunks_deleted"),
            bytes(n("bytes_deleted")),
            n("chunks_kept_for_writers"),
            n("chunks_referenced"),
            n("versions"),
            n("access_rows_pruned"),
        )),
        "verify" => {
            let summary = format!(
                "{} versions, {} chunks ({}) checked in {secs:.1} s",
                n("versions"),
                n("chunks_checked"),
                bytes(n("bytes_checked")),
            );
            if r["ok"] == true {
                Ok(format!("no damage: {summary}"))
            } else {
                Err(format!(
                    "DAMAGE: {} chunks, {} indexes, {} databases, {} records damaged; {} missing rights; {summary}; run `mbank verify` on the bank's host for the details",
                    len("damaged_chunks"),
                    len("damaged_indexes"),
                    len("damaged_databases"),
                    len("damaged_records"),
                    len("missing_rights"),
                ))
            }
        }
        _ => Ok(format!(
            "{} machines, {} versions; {} stored",
            n("machines"),
            n("versions"),
            bytes(n("bytes_stored")),
        )),
    })
}

#[derive(Deserialize)]
pub(super) struct JobForm {
    #[serde(default)]
    csrf: String,
    kind: String,
}

/// `POST /admin/jobs`: starts `gc` or `verify` as the API's `POST /v1/admin/jobs` does
/// (a job of that kind running already is left to run, and shown).
pub(crate) async fn start_job(
    State(app): State<Shared>,
    headers: HeaderMap,
    Posted(f): Posted<JobForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    admin(&s)?;
    if !matches!(f.kind.as_str(), "gc" | "verify") {
        return Err(ApiError::bad_request(format!(
            "no such job: {:?}; start gc or verify",
            f.kind
        ))
        .into());
    }
    let job = app
        .jobs
        .start(&app.bank_dir, &f.kind, &s.user.name)
        .map_err(ApiError::internal)?;
    tracing::info!(job = %job.job, id = job.id, by = %s.user.name, "job requested (console)");
    Ok(Redirect::to("/admin/storage").into_response())
}

// ---------------------------------------------------------------------------------
// Sessions

/// `GET /admin/sessions`: every live session (the leases): machine, station, since,
/// last heartbeat.
pub(crate) async fn sessions_page(State(app): State<Shared>, headers: HeaderMap) -> WebResult {
    let s = session(&app, &headers).await?;
    admin(&s)?;
    let leases = blocking(&app, |app| {
        let mut out = Vec::new();
        for m in app.catalog(|c| Ok(c.machines()?))? {
            if let Some(l) = app.catalog(|c| Ok(c.lease(&m.name)?))? {
                out.push(l);
            }
        }
        Ok(out)
    })
    .await?;
    let body = html! {
        h1 { "Live sessions" }
        @if leases.is_empty() { p { "No machine is checked out." } }
        table id="sessions" {
            thead { tr { th { "Machine" } th { "Station" } th { "Since" } th { "Last heartbeat" } th { "Version" } } }
            tbody {
                @for l in &leases {
                    tr {
                        td { a href=(format!("/machines/{}", l.machine)) { (l.machine) } }
                        td { (l.station_name) }
                        td { (when(l.started_ms)) }
                        td { (when(l.heartbeat_ms)) }
                        td { code { (l.base.map(|b| b.short()).unwrap_or_else(|| "-".into())) } }
                    }
                }
            }
        }
    };
    Ok(Page(StatusCode::OK, layout("Sessions", Some(&s), body)).into_response())
}

// ---------------------------------------------------------------------------------
// Health

/// A small line chart of `values` (inline SVG; attributes only, no style, as the
/// console's Content-Security-Policy wants).
fn chart(id: &str, title: &str, unit: &str, values: &[f64]) -> Markup {
    const W: f64 = 360.0;
    const H: f64 = 60.0;
    let max = values.iter().copied().fold(0.0f64, f64::max);
    let n = values.len().max(2) - 1;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = i as f64 * W / n as f64;
            let y = if max > 0.0 {
                H - v / max * (H - 4.0)
            } else {
                H
            };
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let last = values.last().copied().unwrap_or(0.0);
    html! {
        figure.chart id=(id) {
            figcaption { (title) ": " b { (format!("{last:.2}")) } " " (unit) " (peak " (format!("{max:.2}")) ")" }
            svg xmlns="http://www.w3.org/2000/svg" width="360" height="60" viewBox="0 0 360 60" role="img" {
                title { (title) }
                rect x="0" y="0" width="360" height="60" fill="#ffffff" stroke="#e2e5ea" {}
                polyline fill="none" stroke="#2a6df4" stroke-width="1.5" points=(points.join(" ")) {}
            }
        }
    }
}

/// `GET /admin/health`: rates from the counters `/metrics` exports, over the last
/// hour, and the counts now.
pub(crate) async fn health_page(State(app): State<Shared>, headers: HeaderMap) -> WebResult {
    let s = session(&app, &headers).await?;
    admin(&s)?;
    let mut samples: Vec<Sample> = app
        .console
        .samples
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let now = sample(&app);
    samples.push(now);
    let rate = |f: fn(&Sample) -> u64, per: f64| -> Vec<f64> {
        samples
            .windows(2)
            .map(|w| {
                let secs = ((w[1].ms - w[0].ms).max(1) as f64) / 1000.0;
                f(&w[1]).saturating_sub(f(&w[0])) as f64 / secs / per
            })
            .collect()
    };
    let errors = app
        .metrics
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let body = html! {
        h1 { "Server health" }
        p { "Rates over the last " (samples.len().saturating_sub(1)) " samples, one every " (SAMPLE_EVERY.as_secs()) " s; the counters are those of " code { "/metrics" } "." }
        div.charts {
            (chart("requests", "Requests", "/s", &rate(|s| s.requests, 1.0)))
            (chart("errors", "Error answers", "/s", &rate(|s| s.errors, 1.0)))
            (chart("bytes-in", "Received", "MiB/s", &rate(|s| s.bytes_in, 1048576.0)))
            (chart("bytes-out", "Sent", "MiB/s", &rate(|s| s.bytes_out, 1048576.0)))
            (chart("commits", "Commits", "/s", &rate(|s| s.commits, 1.0)))
        }
        h2 { "Totals" }
        table id="totals" {
            tbody {
                tr { th { "Requests" } td { (now.requests) } }
                tr { th { "Commits" } td { (now.commits) } }
                tr { th { "Received" } td { (bytes(now.bytes_in)) } }
                tr { th { "Sent" } td { (bytes(now.bytes_out)) } }
                tr { th { "Logins (failed)" } td { (app.metrics.logins.load(Relaxed)) " (" (app.metrics.login_failures.load(Relaxed)) ")" } }
                @for (k, v) in &errors { tr { th { "Errors " (k) } td { (v) } } }
            }
        }
    };
    Ok(Page(StatusCode::OK, layout("Health", Some(&s), body)).into_response())
}
