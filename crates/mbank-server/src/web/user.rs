//! The console's user actions beyond the history's head and remove forms: fork,
//! retention policy, labels, a version's disk as a download, a token for a station.
//! Each calls the action the API's handler calls (`actions.rs`).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use maud::html;
use serde::Deserialize;

use super::{
    ApiError, Page, Posted, Shared, WebResult, actions, blocking, check_csrf, layout, machine_name,
    session, version_id, when,
};

#[derive(Deserialize)]
pub(super) struct ForkForm {
    #[serde(default)]
    csrf: String,
    /// The version to fork; empty for the head.
    #[serde(default)]
    version: String,
    /// The new machine's name, under the user's own name.
    name: String,
}

/// `POST /machines/{u}/{n}/fork`: a new machine `user/NAME` from a version of a
/// machine the user may see (their own or a published base): `actions::fork`, which
/// commits through the API's commit rules.
pub(crate) async fn fork(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path((u, n)): Path<(String, String)>,
    Posted(f): Posted<ForkForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let from = machine_name(&u, &n)?;
    let to = machine_name(&s.user.name, f.name.trim())?;
    let v = match f.version.trim() {
        "" => None,
        v => Some(version_id(v)?),
    };
    let user = s.user.clone();
    let back = format!("/machines/{to}");
    blocking(&app, move |app| actions::fork(app, &user, &from, v, &to)).await?;
    Ok(Redirect::to(&back).into_response())
}

#[derive(Deserialize)]
pub(super) struct PolicyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    keep_last: String,
    #[serde(default)]
    keep_hourly: String,
    #[serde(default)]
    keep_daily: String,
    #[serde(default)]
    keep_weekly: String,
    #[serde(default)]
    keep_monthly: String,
    /// Present: clear the policy.
    #[serde(default)]
    clear: Option<String>,
}

fn count(field: &str, v: &str) -> Result<u32, ApiError> {
    match v.trim() {
        "" => Ok(0),
        v => v.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "{} must be a whole number of versions (0 turns the rule off), not {v:?}",
                field.replace('_', " ")
            ))
        }),
    }
}

/// `POST /machines/{u}/{n}/policy`: `PUT /v1/machines/{m}/policy` (owner only; an
/// empty policy is refused as the API refuses it; `clear` removes it).
pub(crate) async fn set_policy(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path((u, n)): Path<(String, String)>,
    Posted(f): Posted<PolicyForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let m = machine_name(&u, &n)?;
    let policy = if f.clear.is_some() {
        None
    } else {
        Some(mbank_catalog::Policy {
            keep_last: count("keep_last", &f.keep_last)?,
            keep_hourly: count("keep_hourly", &f.keep_hourly)?,
            keep_daily: count("keep_daily", &f.keep_daily)?,
            keep_weekly: count("keep_weekly", &f.keep_weekly)?,
            keep_monthly: count("keep_monthly", &f.keep_monthly)?,
        })
    };
    let user = s.user.clone();
    let back = format!("/machines/{m}");
    blocking(&app, move |app| {
        actions::set_policy(app, &user, &m, policy.as_ref())
    })
    .await?;
    Ok(Redirect::to(&back).into_response())
}

#[derive(Deserialize)]
pub(super) struct LabelForm {
    #[serde(default)]
    csrf: String,
    version: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    tag: String,
}

/// `POST /machines/{u}/{n}/label`: a note and/or a tag on a version
/// (`POST /v1/machines/{m}/versions/{v}/labels`, owner only).
pub(crate) async fn label(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path((u, n)): Path<(String, String)>,
    Posted(f): Posted<LabelForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let m = machine_name(&u, &n)?;
    let v = version_id(&f.version)?;
    let change = mbank_catalog::LabelChange {
        note: Some(f.note.trim().to_string()).filter(|n| !n.is_empty()),
        add_tags: Some(f.tag.trim().to_string())
            .filter(|t| !t.is_empty())
            .into_iter()
            .collect(),
        remove_tags: Vec::new(),
    };
    let user = s.user.clone();
    let back = format!("/machines/{m}#v-{}", v.to_hex());
    blocking(&app, move |app| actions::label(app, &user, &m, v, &change)).await?;
    Ok(Redirect::to(&back).into_response())
}

/// Bytes from the export thread to the client.
type Piece = Result<Bytes, std::io::Error>;

/// The body of a download: what the export thread sends, as it comes.
struct Streamed {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    len: u64,
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(http_body::Frame::data)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len)
    }
}

/// The export's writer: pieces of 256 KiB into a channel of 8 (2 MiB in flight per
/// download); a client gone away is a write error, which ends the export.
struct Sender {
    tx: tokio::sync::mpsc::Sender<Piece>,
    buf: Vec<u8>,
}

const PIECE: usize = 256 << 10;

impl Sender {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let b = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE)));
        self.tx
            .blocking_send(Ok(b))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}

impl std::io::Write for Sender {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(PIECE - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == PIECE {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// `GET /machines/{u}/{n}/versions/{v}/disk.raw`: the disk of a version the user may
/// see, as a raw image streamed as it is read and verified (`mbank_bank::write_disk`,
/// the export's in-order path): at most 2 MiB of it in memory. The length is sent
/// first; a chunk that cannot be read ends the stream short, so the browser reports a
/// failed download rather than keep a wrong image.
pub(crate) async fn download(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path((u, n, v)): Path<(String, String, String)>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    let m = machine_name(&u, &n)?;
    let v = version_id(&v)?;
    let user = s.user.clone();
    let (info, index) = blocking(&app, move |app| {
        let info = super::super::exact_version(app, &user, &m, v)?;
        let index = app.catalog(|c| Ok(c.disk_index(&info)?))?;
        Ok((info, index))
    })
    .await?;
    let len = index.disk_size;
    let file = format!(
        "{}-{}-{}.raw",
        info.machine.user(),
        info.machine.name(),
        info.id.short()
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(8);
    let a = app.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = Sender {
            tx: tx.clone(),
            buf: Vec::with_capacity(PIECE),
        };
        let name = format!("the download of {}@{}", info.machine, info.id.short());
        if let Err(e) = mbank_bank::write_disk(&*a.store, &info, &index, &mut w, &name, 2) {
            tracing::warn!(machine = %info.machine, version = %info.id, error = %e, "download failed");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let mut r = Body::new(Streamed { rx, len }).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(d) = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        h.insert(header::CONTENT_DISPOSITION, d);
    }
    Ok(r)
}

#[derive(Deserialize)]
pub(super) struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    label: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    days: String,
}

/// `POST /tokens`: a token for a station, as `POST /v1/login` issues one (the password
/// again, the same backoff and hash pool), shown once.
pub(crate) async fn create_token(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Posted(f): Posted<TokenForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let days: u64 = match f.days.trim() {
        "" => 30,
        d => match d.parse() {
            Ok(n) if (1..=365).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "a token lives 1 to 365 days, not {d:?}"
                ))
                .into());
            }
        },
    };
    let label = match f.label.trim() {
        "" => "station (console)".to_string(),
        l => l.to_string(),
    };
    let name = s.user.name.clone();
    let addr = peer.ip();
    app.logins.check(&name, addr)?;
    let a = app.clone();
    let (u, pw, l) = (name.clone(), f.password, label.clone());
    let ttl = std::time::Duration::from_secs(days * 86400);
    let r = app
        .logins
        .hash(move || a.access(|x| Ok(x.login(&u, &pw, ttl, &l)?)))
        .await?;
    let t = match r {
        Ok(t) => {
            app.logins.succeeded(&name);
            t
        }
        Err(e) => {
            if e.status == StatusCode::UNAUTHORIZED {
                app.logins.failed(&name, addr);
                return Err(ApiError::forbidden(
                    "the password is wrong; a station's token needs your password",
                )
                .into());
            }
            return Err(e.into());
        }
    };
    tracing::info!(user = %name, %label, days, "token created (console)");
    let body = html! {
        h1 { "New token" }
        p { "For " b { (label) } ", valid until " (when(t.expires_ms)) ". It is shown only now: copy it to the station." }
        pre id="new-token" { (t.token) }
        p { "On the station: " code { "export MBANK_TOKEN=…" } " before " code { "mbank --bank URL …" } "." }
        p { a href="/tokens" { "Back to your tokens" } }
    };
    Ok(Page(StatusCode::OK, layout("New token", Some(&s), body)).into_response())
}
