//! The web console (issue 16): server-rendered HTML at `/`, over the same TLS and for the
//! same users as the API.
//!
//! ## Sessions
//!
//! Logging in (`POST /login`) issues an ordinary `mbank-access` token labelled
//! `web console`, valid for [`SESSION_TTL`], and puts it in the `mbank_session` cookie
//! (`HttpOnly`, `SameSite=Strict`, `Path=/`, and `Secure` when the server speaks TLS).
//! The user sees it among their tokens (`/tokens`, `mbank token list`) and may revoke it
//! there; logging out revokes it. A request whose cookie holds no valid token is sent to
//! the login page. Login goes through the API's guard: the same backoff after failed
//! logins and the same pool of password hashes.
//!
//! ## Forms and CSRF
//!
//! Every form is a `POST` with a hidden `csrf` field. For a session it is
//! [`csrf_for`] its token (a BLAKE3 key derivation: unguessable without the cookie,
//! which scripts cannot read); the login form's is a random nonce also set in the
//! short-lived `mbank_login` cookie (double submit). A `POST` whose field does not match
//! is refused `403` before anything is done. `SameSite=Strict` is a second line.
//!
//! ## One set of rules
//!
//! Every action is one function in `actions.rs` that enforces its rules (owner checks,
//! isolation, quotas, the bank's rules): the API's handler and the console's both call
//! it and differ only in how they parse and answer. A page for a machine another user
//! owns is the same `404` as for one that does not exist, and a head move, removal,
//! fork (a commit through the API's commit rules), policy or label change is refused
//! for the same reasons with the same message. `web/user.rs` holds fork, retention,
//! labels, the streamed raw download and station tokens; `web/admin.rs` the
//! administrator's pages (users, published machines, storage with gc and verify jobs,
//! live sessions, health charts).
//!
//! Pages need no JavaScript; the only style is `/console.css`, and the
//! `Content-Security-Policy` allows nothing else.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, FromRequest, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use maud::{DOCTYPE, Markup, html};
use mbank_access::User;
use mbank_catalog::{MachineInfo, VersionInfo, VersionLabels};
use mbank_core::VersionId;
use serde::Deserialize;

use super::{ApiError, App, Shared, actions, machine_name, version_id};

mod admin;
mod user;

pub(crate) use admin::ConsoleState;
use admin::{
    change_user, health_page, publish, published_page, sessions_page, start_job, storage_page,
};
use user::{create_token, download, fork, label, set_policy};

/// The session cookie: an `mbank-access` token.
const SESSION_COOKIE: &str = "mbank_session";
/// The login form's CSRF nonce (double submit).
const LOGIN_COOKIE: &str = "mbank_login";
/// How long a console session's token lives.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The label of a console session's token.
const SESSION_LABEL: &str = "web console";
/// The largest form body the console takes.
const FORM_LIMIT: usize = 64 << 10;
/// The time a form's body has to arrive (the API's body deadline, `Limits::body_timeout`
/// by default): a client trickling a form holds a connection no longer.
const FORM_TIME: Duration = Duration::from_secs(30);

/// Whether cookies are marked `Secure` (the server speaks TLS).
#[derive(Clone, Copy)]
struct Tls(bool);

/// The console's routes. Mounted beside the API's, outside its bearer-token gate: the
/// console authenticates by its cookie.
pub(crate) fn routes(app: Shared, tls: bool) -> Router<Shared> {
    admin::start_sampler(&app);
    Router::new()
        .route("/", get(home))
        .route("/console.css", get(css))
        .route("/favicon.svg", get(favicon))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/machines/{u}/{n}", get(machine_page))
        .route("/machines/{u}/{n}/head", post(set_head))
        .route("/machines/{u}/{n}/remove", post(remove_version))
        .route("/machines/{u}/{n}/fork", post(fork))
        .route("/machines/{u}/{n}/policy", post(set_policy))
        .route("/machines/{u}/{n}/label", post(label))
        .route("/machines/{u}/{n}/versions/{v}/disk.raw", get(download))
        .route("/tokens", get(tokens_page).post(create_token))
        .route("/tokens/revoke", post(revoke_token))
        .route("/admin/users", get(users_page).post(add_user))
        .route("/admin/users/change", post(change_user))
        .route("/admin/published", get(published_page).post(publish))
        .route("/admin/storage", get(storage_page))
        .route("/admin/jobs", post(start_job))
        .route("/admin/sessions", get(sessions_page))
        .route("/admin/health", get(health_page))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(Extension(Tls(tls)))
        .layer(axum::middleware::map_response(headers))
        .layer(axum::middleware::from_fn_with_state(app, observe))
}

/// Counts and logs each console request as the API's are (`super::observe`, which
/// would turn the console's HTML error pages into JSON).
async fn observe(
    State(app): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    app.metrics.requests.fetch_add(1, Relaxed);
    if status.is_client_error() || status.is_server_error() {
        app.metrics.error(&status.as_u16().to_string());
    }
    tracing::info!(
        target: "mbank::http",
        %method,
        path,
        status = status.as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "console",
    );
    resp
}

/// Headers on every console answer: no framing, no caching, no other sources.
async fn headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (k, v) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    r
}

/// A page answer: the status and the HTML.
struct Page(StatusCode, Markup);

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            self.1.into_string(),
        )
            .into_response()
    }
}

/// A failure shown as a page with the API's status and message.
struct WebError(ApiError);

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        WebError(e)
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let e = self.0;
        if e.status == StatusCode::UNAUTHORIZED {
            return Redirect::to("/login").into_response();
        }
        let title = e.status.canonical_reason().unwrap_or("Refused");
        let body = html! {
            h1 { (e.status.as_u16()) " " (title) }
            p.error { (e.body.message) }
            p { a href="/" { "Back to your machines" } }
        };
        let mut r = Page(e.status, layout(title, None, body)).into_response();
        if let Some(s) = e.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

type WebResult = Result<Response, WebError>;

/// A posted form (`application/x-www-form-urlencoded`); one that cannot be read is
/// refused with a page saying so, before anything is done.
struct Posted<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Posted<T> {
    type Rejection = WebError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, WebError> {
        let read = Form::<T>::from_request(req, state);
        let Ok(form) = tokio::time::timeout(FORM_TIME, read).await else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the form did not arrive within {} s; submit it again",
                    FORM_TIME.as_secs()
                ),
            )
            .into());
        };
        match form {
            Ok(Form(t)) => Ok(Posted(t)),
            Err(e) => Err(ApiError::new(
                e.status(),
                "bad_request",
                format!(
                    "the form could not be read ({}); reload the page and submit it again",
                    e.body_text()
                ),
            )
            .into()),
        }
    }
}

/// The logged-in user of a page, and the CSRF value their forms carry.
struct Session {
    user: User,
    token: String,
    csrf: String,
}

/// The CSRF value of the session with `token`.
fn csrf_for(token: &str) -> String {
    blake3::Hasher::new_derive_key("mbank web console 2026 csrf")
        .update(token.as_bytes())
        .finalize()
        .to_hex()
        .to_string()
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty() && v.len() <= 256)
}

fn set_cookie(tls: Tls, name: &str, value: &str, path: &str, max_age: u64) -> HeaderValue {
    let secure = if tls.0 { "; Secure" } else { "" };
    let v = format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Runs `f` on the blocking pool (the access database and the catalog are SQLite).
async fn blocking<R: Send + 'static>(
    app: &Shared,
    f: impl FnOnce(&App) -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || f(&app))
        .await
        .map_err(|e| ApiError::internal(format!("the request's worker failed: {e}")))?
}

/// The session of a request, from its cookie; `401` (shown as the login page) without a
/// valid one.
async fn session(app: &Shared, headers: &HeaderMap) -> Result<Session, ApiError> {
    let token = cookie(headers, SESSION_COOKIE).ok_or_else(ApiError::unauthorized)?;
    let t = token.clone();
    let user = blocking(app, move |a| a.access(|x| Ok(x.authenticate(&t)?))).await?;
    let csrf = csrf_for(&token);
    Ok(Session { user, token, csrf })
}

/// Refuses a form whose `csrf` field is not the session's.
fn check_csrf(s: &Session, sent: &str) -> Result<(), ApiError> {
    if blake3::hash(sent.as_bytes()) == blake3::hash(s.csrf.as_bytes()) {
        Ok(())
    } else {
        Err(csrf_refused())
    }
}

fn csrf_refused() -> ApiError {
    ApiError::forbidden(
        "the form's CSRF token is missing or not this session's; reload the page and submit the form again",
    )
}

fn layout(title: &str, s: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Machine Bank" }
                link rel="stylesheet" href="/console.css";
                link rel="icon" type="image/svg+xml" href="/favicon.svg";
            }
            body {
                header {
                    a.brand href="/" { "Machine Bank" }
                    @if let Some(s) = s {
                        nav {
                            a href="/" { "Machines" }
                            a href="/tokens" { "Tokens" }
                            @if s.user.admin {
                                a href="/admin/users" { "Users" }
                                a href="/admin/published" { "Published" }
                                a href="/admin/storage" { "Storage" }
                                a href="/admin/sessions" { "Sessions" }
                                a href="/admin/health" { "Health" }
                            }
                            span.who { (s.user.name) }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("web.css"),
    )
        .into_response()
}

async fn favicon() -> Response {
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#1d2330"/><rect x="3" y="4" width="10" height="3" fill="#2a6df4"/><rect x="3" y="9" width="10" height="3" fill="#c5cad3"/></svg>"##,
    )
        .into_response()
}

/// Bytes for people: `1.5 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn when(ms: i64) -> String {
    mbank_core::utc_datetime(ms)
}

// ---------------------------------------------------------------------------------
// Logging in and out

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

fn login_form(status: StatusCode, tls: Tls, message: Option<&str>) -> Response {
    let nonce = hex(&random16());
    let body = html! {
        h1 { "Log in" }
        @if let Some(m) = message { p.error { (m) } }
        form method="post" action="/login" {
            input type="hidden" name="csrf" value=(nonce);
            label { "User " input type="text" name="user" autocomplete="username" required; }
            label { "Password " input type="password" name="password" autocomplete="current-password" required; }
            button type="submit" { "Log in" }
        }
    };
    let mut r = Page(status, layout("Log in", None, body)).into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(tls, LOGIN_COOKIE, &nonce, "/login", 600),
    );
    r
}

fn random16() -> [u8; 16] {
    let mut b = [0u8; 16];
    // Without the system's randomness no nonce can be made; an all-zero one would be
    // guessable, so the login form is then refused (its cookie never matches "").
    if getrandom::fill(&mut b).is_err() {
        tracing::error!("the system's random number generator failed; console logins refused");
    }
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn login_page(
    State(app): State<Shared>,
    Extension(tls): Extension<Tls>,
    headers: HeaderMap,
) -> Response {
    if session(&app, &headers).await.is_ok() {
        return Redirect::to("/").into_response();
    }
    login_form(StatusCode::OK, tls, None)
}

/// `POST /login`: the API's login (`super::login`): backoff, the hash pool, the same
/// token; the token goes into the session cookie.
async fn login(
    State(app): State<Shared>,
    Extension(tls): Extension<Tls>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Posted(f): Posted<LoginForm>,
) -> WebResult {
    let nonce = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if nonce.len() != 32 || nonce == hex(&[0; 16]) || f.csrf != nonce {
        return Ok(login_form(
            StatusCode::FORBIDDEN,
            tls,
            Some("The login form expired or did not come from this server; log in again."),
        ));
    }
    let addr = peer.ip();
    if let Err(e) = app.logins.check(&f.user, addr) {
        app.metrics.login_failures.fetch_add(1, Relaxed);
        tracing::warn!(user = %f.user, %addr, "console login refused: in backoff after failed logins");
        return Err(e.into());
    }
    let a = app.clone();
    let (user, password) = (f.user.clone(), f.password);
    let label = format!("{SESSION_LABEL} from {addr}");
    let r = app
        .logins
        .hash(move || a.access(|x| Ok(x.login(&user, &password, SESSION_TTL, &label)?)))
        .await?;
    match r {
        Ok(t) => {
            app.logins.succeeded(&f.user);
            app.metrics.logins.fetch_add(1, Relaxed);
            tracing::info!(user = %f.user, %addr, "console login");
            let mut r = Redirect::to("/").into_response();
            let h = r.headers_mut();
            h.append(
                header::SET_COOKIE,
                set_cookie(tls, SESSION_COOKIE, &t.token, "/", SESSION_TTL.as_secs()),
            );
            h.append(
                header::SET_COOKIE,
                set_cookie(tls, LOGIN_COOKIE, "", "/login", 0),
            );
            Ok(r)
        }
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            app.logins.failed(&f.user, addr);
            app.metrics.login_failures.fetch_add(1, Relaxed);
            tracing::warn!(user = %f.user, %addr, "console login failed: wrong user or password");
            Ok(login_form(
                StatusCode::UNAUTHORIZED,
                tls,
                Some("Wrong user or password."),
            ))
        }
        Err(e) => {
            app.metrics.login_failures.fetch_add(1, Relaxed);
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /logout`: revokes the session's token and clears the cookie.
async fn logout(
    State(app): State<Shared>,
    Extension(tls): Extension<Tls>,
    headers: HeaderMap,
    Posted(f): Posted<CsrfForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let token = s.token.clone();
    blocking(&app, move |a| a.access(|x| Ok(x.revoke_token(&token)?))).await?;
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(tls, SESSION_COOKIE, "", "/", 0),
    );
    Ok(r)
}

// ---------------------------------------------------------------------------------
// A user's machines

/// What a machine is doing: running on a station (its lease), suspended (its head
/// holds memory), or off.
enum MachineState {
    Running(mbank_catalog::Lease),
    Suspended,
    Off,
}

fn machine_state(app: &App, info: &MachineInfo) -> Result<MachineState, ApiError> {
    if let Some(l) = app.catalog(|c| Ok(c.lease(&info.name)?))? {
        return Ok(MachineState::Running(l));
    }
    let Some(head) = info.head else {
        return Ok(MachineState::Off);
    };
    let v = app.catalog(|c| Ok(c.resolve(&info.name, Some(&head.to_hex()))?))?;
    Ok(if v.has_memory() {
        MachineState::Suspended
    } else {
        MachineState::Off
    })
}

fn state_cell(st: &MachineState) -> Markup {
    html! {
        @match st {
            MachineState::Running(l) => {
                span.state.running { "running" } " on " (l.station_name) " since " (when(l.started_ms))
            }
            MachineState::Suspended => span.state.suspended { "suspended" },
            MachineState::Off => span.state.off { "off" },
        }
    }
}

/// One row of the home page: a machine, its state and the bytes its versions added.
struct Row {
    info: MachineInfo,
    state: MachineState,
    added: u64,
}

/// `GET /`: the machines the user may see (the API's `GET /v1/machines`), their state
/// and usage; the published bases to fork from.
async fn home(State(app): State<Shared>, headers: HeaderMap) -> WebResult {
    let s = session(&app, &headers).await?;
    let user = s.user.clone();
    let (rows, published, used) = blocking(&app, move |app| {
        let published: Vec<String> = app.access(|a| Ok(a.published()?))?;
        let mut rows = Vec::new();
        for info in actions::machines(app, &user)? {
            let state = machine_state(app, &info)?;
            let added = app
                .catalog(|c| Ok(c.versions(&info.name)?))?
                .iter()
                .map(|v| v.stats.bytes_stored)
                .sum();
            rows.push(Row { info, state, added });
        }
        Ok((rows, published, app.usage(&user.name)?))
    })
    .await?;
    let quota = match s.user.quota {
        Some(q) => format!("{} of {}", bytes(used), bytes(q)),
        None => format!("{} (no quota)", bytes(used)),
    };
    let (mine, others): (Vec<&Row>, Vec<&Row>) =
        rows.iter().partition(|r| r.info.name.user() == s.user.name);
    let bases: Vec<&Row> = others
        .iter()
        .copied()
        .filter(|r| published.iter().any(|p| p == r.info.name.as_str()))
        .collect();
    let body = html! {
        h1 { "Machines" }
        p id="usage" { "Storage used: " (quota) }
        @if mine.is_empty() {
            p { "No machines yet. Import one with " code { "mbank --bank URL import" } ", or fork a published base below." }
        } @else {
            (machine_table("machines", &mine))
        }
        @if s.user.admin && others.len() > bases.len() {
            h2 { "Other users' machines" }
            @let theirs: Vec<&Row> = others.iter().copied().filter(|r| !bases.iter().any(|b| b.info.name == r.info.name)).collect();
            (machine_table("others", &theirs))
        }
        h2 { "Published bases" }
        @if bases.is_empty() {
            p { "No machine is published. An administrator publishes one for every user to fork." }
        } @else {
            table id="bases" {
                thead { tr { th { "Machine" } th { "Disk" } th { "Head" } th { "Fork into" } } }
                tbody {
                    @for r in &bases {
                        tr {
                            td { a href=(format!("/machines/{}", r.info.name)) { (r.info.name) } }
                            td { (r.info.disk_size.map(bytes).unwrap_or_else(|| "-".into())) }
                            td { code { (r.info.head.map(|h| h.short()).unwrap_or_else(|| "none".into())) } }
                            td { (fork_form(&s, &r.info.name, None)) }
                        }
                    }
                }
            }
        }
    };
    Ok(Page(StatusCode::OK, layout("Machines", Some(&s), body)).into_response())
}

fn machine_table(id: &str, rows: &[&Row]) -> Markup {
    html! {
        table id=(id) {
            thead { tr { th { "Machine" } th { "State" } th { "Disk" } th { "Versions" } th { "Added" } th { "Head" } th { "Updated" } } }
            tbody {
                @for r in rows {
                    @let m = &r.info;
                    tr {
                        td { a href=(format!("/machines/{}", m.name)) { (m.name) } }
                        td { (state_cell(&r.state)) }
                        td { (m.disk_size.map(bytes).unwrap_or_else(|| "-".into())) }
                        td.num { (m.versions) }
                        td { (bytes(r.added)) }
                        td { code { (m.head.map(|h| h.short()).unwrap_or_else(|| "none".into())) } }
                        td { (m.updated_ms.map(when).unwrap_or_else(|| "-".into())) }
                    }
                }
            }
        }
    }
}

/// The fork form: a new machine of the user's, from `m`'s head or version `v`.
fn fork_form(s: &Session, m: &mbank_core::MachineName, v: Option<VersionId>) -> Markup {
    html! {
        form.inline.fork method="post" action=(format!("/machines/{m}/fork")) {
            input type="hidden" name="csrf" value=(s.csrf);
            @if let Some(v) = v { input type="hidden" name="version" value=(v.to_hex()); }
            (s.user.name) "/"
            input type="text" name="name" placeholder="new name" required size="12";
            button type="submit" name="fork" { "Fork" }
        }
    }
}

/// `GET /machines/{u}/{n}`: the history, as `GET /v1/machines/{m}/versions` and
/// `labels` answer it, the machine's state and retention policy; forms for what the
/// owner may change.
async fn machine_page(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path((u, n)): Path<(String, String)>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    let m = machine_name(&u, &n)?;
    let user = s.user.clone();
    let page = blocking(&app, move |app| {
        let info = actions::machine(app, &user, &m)?;
        let versions = app.catalog(|c| Ok(c.versions(&m)?))?;
        let labels = app.catalog(|c| Ok(c.labels(&m)?))?;
        let owner = app.owned_machine(&user, &m).is_ok();
        let policy = actions::policy(app, &user, &m)?;
        let state = machine_state(app, &info)?;
        Ok(History {
            info,
            versions,
            labels,
            owner,
            policy,
            state,
        })
    })
    .await?;
    let title = page.info.name.to_string();
    let body = history(&s, &page);
    Ok(Page(StatusCode::OK, layout(&title, Some(&s), body)).into_response())
}

struct History {
    info: MachineInfo,
    versions: Vec<VersionInfo>,
    labels: Vec<VersionLabels>,
    owner: bool,
    policy: Option<mbank_catalog::Policy>,
    state: MachineState,
}

fn history(s: &Session, h: &History) -> Markup {
    let info = &h.info;
    let owner = h.owner;
    let base = format!("/machines/{}", info.name);
    let expected = info.head.map(|h| h.to_hex()).unwrap_or_default();
    let p = h.policy.unwrap_or_default();
    html! {
        h1 { (info.name) }
        p {
            "Disk " (info.disk_size.map(bytes).unwrap_or_else(|| "-".into()))
            ", " (info.versions) " versions, head "
            code id="head" { (info.head.map(|h| h.short()).unwrap_or_else(|| "none".into())) }
        }
        p id="state" {
            "State: " (state_cell(&h.state))
            @if let MachineState::Running(l) = &h.state {
                " · last heartbeat " (when(l.heartbeat_ms))
                @if let Some(b) = l.base { " · from version " code { (b.short()) } }
            }
        }
        @if !owner { p { "Published: you may fork it; only its owner may change it." } }
        div.panel id="policy" {
            "Retention: "
            @match &h.policy {
                Some(p) => code id="policy-now" { (p) },
                None => span id="policy-now" { "none (every version is kept)" },
            }
            @if owner {
                form method="post" action=(format!("{base}/policy")) {
                    input type="hidden" name="csrf" value=(s.csrf);
                    @for (name, v) in [("keep_last", p.keep_last), ("keep_hourly", p.keep_hourly), ("keep_daily", p.keep_daily), ("keep_weekly", p.keep_weekly), ("keep_monthly", p.keep_monthly)] {
                        label.inline { (name.replace('_', " ")) " " input type="number" name=(name) min="0" max="100000" value=(v) size="4"; }
                    }
                    button type="submit" name="set-policy" { "Set policy" }
                    " "
                    button type="submit" name="clear" value="1" { "Clear policy" }
                }
            }
        }
        ol.timeline id="versions" {
            @for v in &h.versions {
                @let l = h.labels.iter().find(|l| l.version == v.id);
                @let is_head = info.head == Some(v.id);
                @let checkpoint = l.is_some_and(|l| l.labels.tags.iter().any(|t| t == "checkpoint"));
                li.version.head[is_head].checkpoint[checkpoint] id=(format!("v-{}", v.id.to_hex())) {
                    div.line {
                        code { (v.id.short()) }
                        @if is_head { " " span.badge { "head" } }
                        @if v.has_memory() { " " span.badge { "suspended" } }
                        @if checkpoint { " " span.badge.checkpoint { "checkpoint" } }
                        " " (when(v.created_ms))
                        " · added " span.added { (bytes(v.stats.bytes_stored)) }
                        " · disk " (bytes(v.disk_size))
                    }
                    @if let Some(p) = v.parent {
                        @if h.versions.iter().any(|x| x.id == p) {
                            div { "parent " a.parent href=(format!("#v-{}", p.to_hex())) { code { (p.short()) } } }
                        } @else {
                            div { "parent " code { (p.short()) } " (removed)" }
                        }
                    }
                    @if let Some((fm, fv)) = mbank_bank::fork_source(&v.stats.source) {
                        div.source { "forked from " a.forked href=(format!("/machines/{fm}#v-{}", fv.to_hex())) { (fm) "@" (fv.short()) } }
                    } @else if !v.stats.source.is_empty() {
                        div.source { (v.stats.source) }
                    }
                    @if let Some(l) = l {
                        @if let Some(note) = &l.labels.note { div.note { (note) } }
                        @if !l.labels.tags.is_empty() {
                            div.tags { @for t in &l.labels.tags { span.tag { (t) } " " } }
                        }
                    }
                    div.actions {
                        a.download href=(format!("{base}/versions/{}/disk.raw", v.id.to_hex())) download { "Download disk (raw)" }
                        " "
                        (fork_form(s, &info.name, Some(v.id)))
                        @if owner {
                            @if !is_head {
                                form.inline method="post" action=(format!("{base}/head")) {
                                    input type="hidden" name="csrf" value=(s.csrf);
                                    input type="hidden" name="to" value=(v.id.to_hex());
                                    input type="hidden" name="expected" value=(expected);
                                    button type="submit" name="set-head" { "Set as head" }
                                }
                            }
                            form.inline method="post" action=(format!("{base}/remove")) {
                                input type="hidden" name="csrf" value=(s.csrf);
                                input type="hidden" name="version" value=(v.id.to_hex());
                                button.danger type="submit" name="remove" { "Remove" }
                            }
                            form.inline.label method="post" action=(format!("{base}/label")) {
                                input type="hidden" name="csrf" value=(s.csrf);
                                input type="hidden" name="version" value=(v.id.to_hex());
                                input type="text" name="note" placeholder="note" size="14";
                                input type="text" name="tag" placeholder="tag" size="8";
                                button type="submit" name="label" { "Label" }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct HeadForm {
    #[serde(default)]
    csrf: String,
    to: String,
    /// The head the page showed; empty for none.
    #[serde(default)]
    expected: String,
}

/// `POST /machines/{u}/{n}/head`: `PUT /v1/machines/{m}/head`'s rules: the owner only
/// (others: the `404` of an absent machine), compare-and-swap on the head the page
/// showed (`409` when it moved meanwhile), refused while a session holds the machine.
async fn set_head(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path((u, n)): Path<(String, String)>,
    Posted(f): Posted<HeadForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let m = machine_name(&u, &n)?;
    let to = version_id(&f.to)?;
    let expected: Option<VersionId> = match f.expected.as_str() {
        "" => None,
        e => Some(version_id(e)?),
    };
    let user = s.user.clone();
    let back = format!("/machines/{m}");
    blocking(&app, move |app| {
        actions::set_head(app, &user, &m, to, expected)
    })
    .await?;
    Ok(Redirect::to(&back).into_response())
}

#[derive(Deserialize)]
struct RemoveForm {
    #[serde(default)]
    csrf: String,
    version: String,
}

/// `POST /machines/{u}/{n}/remove`: `DELETE /v1/machines/{m}/versions/{id}`'s rules.
async fn remove_version(
    State(app): State<Shared>,
    headers: HeaderMap,
    Path((u, n)): Path<(String, String)>,
    Posted(f): Posted<RemoveForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let m = machine_name(&u, &n)?;
    let v = version_id(&f.version)?;
    let user = s.user.clone();
    let back = format!("/machines/{m}");
    blocking(&app, move |app| actions::remove_version(app, &user, &m, v)).await?;
    Ok(Redirect::to(&back).into_response())
}

// ---------------------------------------------------------------------------------
// Tokens

async fn tokens_page(State(app): State<Shared>, headers: HeaderMap) -> WebResult {
    let s = session(&app, &headers).await?;
    let name = s.user.name.clone();
    let tokens = blocking(&app, move |a| a.access(|x| Ok(x.tokens(Some(&name))?))).await?;
    let now = mbank_catalog::now_ms();
    let current = s.token.get(4..36).unwrap_or_default().to_string();
    let body = html! {
        h1 { "Tokens" }
        p { "Each login (a station's " code { "mbank login" } ", this console) holds a token. Revoking one logs that client out." }
        table id="tokens" {
            thead { tr { th { "Id" } th { "Label" } th { "Issued" } th { "Expires" } th {} } }
            tbody {
                @for t in tokens.iter().filter(|t| t.revoked_ms.is_none() && t.expires_ms > now) {
                    tr {
                        td { code { (t.id.get(..8).unwrap_or(&t.id)) } @if t.id == current { " " span.badge { "this session" } } }
                        td { (t.label) }
                        td { (when(t.created_ms)) }
                        td { (when(t.expires_ms)) }
                        td {
                            form.inline method="post" action="/tokens/revoke" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                input type="hidden" name="id" value=(t.id);
                                button.danger type="submit" { "Revoke" }
                            }
                        }
                    }
                }
            }
        }
    };
    let body = html! {
        (body)
        h2 { "A token for a station" }
        form id="new-token-form" method="post" action="/tokens" {
            input type="hidden" name="csrf" value=(s.csrf);
            label { "Label (the station) " input type="text" name="label" maxlength="100"; }
            label { "Valid for (days) " input type="number" name="days" min="1" max="365" value="30"; }
            label { "Your password " input type="password" name="password" autocomplete="current-password" required; }
            button type="submit" { "Create token" }
        }
    };
    Ok(Page(StatusCode::OK, layout("Tokens", Some(&s), body)).into_response())
}

#[derive(Deserialize)]
struct RevokeForm {
    #[serde(default)]
    csrf: String,
    id: String,
}

/// `POST /tokens/revoke`: revokes one of the user's own tokens (another's id is `404`).
async fn revoke_token(
    State(app): State<Shared>,
    headers: HeaderMap,
    Posted(f): Posted<RevokeForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    let name = s.user.name.clone();
    let id = f.id;
    blocking(&app, move |a| {
        a.access(|x| {
            let mine = x.tokens(Some(&name))?.iter().any(|t| t.id == id);
            if !mine {
                return Err(ApiError::not_found(format!("{name} has no token {id}")));
            }
            x.revoke_token(&id)?;
            Ok(())
        })
    })
    .await?;
    Ok(Redirect::to("/tokens").into_response())
}

// ---------------------------------------------------------------------------------
// Administrators

fn admin_only(s: &Session) -> Result<(), ApiError> {
    if s.user.admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this page is for administrators; {} is not one",
            s.user.name
        )))
    }
}

/// `GET /admin/users`: every user with their usage (as `whoami` counts it) and quota.
async fn users_page(State(app): State<Shared>, headers: HeaderMap) -> WebResult {
    let s = session(&app, &headers).await?;
    admin_only(&s)?;
    let users = blocking(&app, |app| {
        let users = app.access(|x| Ok(x.users()?))?;
        users
            .into_iter()
            .map(|u| {
                let used = app.usage(&u.name)?;
                Ok((u, used))
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await?;
    let body = html! {
        h1 { "Users" }
        table id="users" {
            thead { tr { th { "User" } th { "Role" } th { "Used" } th { "Quota" } th { "Live tokens" } th { "Added" } th { "Change" } } }
            tbody {
                @for (u, used) in &users {
                    tr id=(format!("user-{}", u.name)) {
                        td { (u.name) }
                        td {
                            @if u.admin { "administrator" } @else { "user" }
                            @if u.disabled { " " span.badge.disabled { "disabled" } }
                        }
                        td { (bytes(*used)) }
                        td { (u.quota.map(bytes).unwrap_or_else(|| "none".into())) }
                        td.num { (u.tokens_live) }
                        td { (when(u.created_ms)) }
                        td.change { (user_forms(&s, &u.name, u.disabled)) }
                    }
                }
            }
        }
        h2 { "Add a user" }
        form id="add-user" method="post" action="/admin/users" {
            input type="hidden" name="csrf" value=(s.csrf);
            label { "Name " input type="text" name="name" required; }
            label { "Password " input type="password" name="password" autocomplete="new-password" required; }
            label { "Quota (GiB, empty for none) " input type="number" name="quota_gib" min="0" step="any"; }
            label { input type="checkbox" name="admin" value="1"; " administrator" }
            button type="submit" { "Add" }
        }
    };
    Ok(Page(StatusCode::OK, layout("Users", Some(&s), body)).into_response())
}

#[derive(Deserialize)]
struct AddUserForm {
    #[serde(default)]
    csrf: String,
    name: String,
    password: String,
    #[serde(default)]
    quota_gib: String,
    #[serde(default)]
    admin: Option<String>,
}

/// The forms that change one user (`web/admin.rs`, `change_user`).
fn user_forms(s: &Session, name: &str, disabled: bool) -> Markup {
    let form = |action: &str, extra: Markup, button: &str, danger: bool| {
        html! {
            form.inline method="post" action="/admin/users/change" {
                input type="hidden" name="csrf" value=(s.csrf);
                input type="hidden" name="name" value=(name);
                input type="hidden" name="action" value=(action);
                (extra)
                @if danger {
                    button.danger type="submit" name=(action) { (button) }
                } @else {
                    button type="submit" name=(action) { (button) }
                }
            }
        }
    };
    html! {
        (form("quota", html! { input type="number" name="quota_gib" min="0" step="any" size="5" placeholder="GiB"; }, "Set quota", false))
        (form("password", html! { input type="password" name="password" autocomplete="new-password" size="10" placeholder="new password"; }, "Reset password", false))
        @if name != s.user.name {
            @if disabled {
                (form("enable", html! {}, "Enable", false))
            } @else {
                (form("disable", html! {}, "Disable", true))
            }
            (form("remove", html! {}, "Remove", true))
        }
    }
}

/// A quota form field, in GiB: empty for none.
fn quota_bytes(q: &str) -> Result<Option<u64>, ApiError> {
    match q.trim() {
        "" => Ok(None),
        q => match q.parse::<f64>() {
            Ok(g) if g.is_finite() && g >= 0.0 => Ok(Some((g * (1u64 << 30) as f64) as u64)),
            _ => Err(ApiError::bad_request(format!(
                "the quota {q:?} is not a number of GiB; give one like 20 or 0.5, or leave it empty for none"
            ))),
        },
    }
}

/// `POST /admin/users`: `mbank admin user add` (`Access::add_user`: the same name and
/// password rules).
async fn add_user(
    State(app): State<Shared>,
    headers: HeaderMap,
    Posted(f): Posted<AddUserForm>,
) -> WebResult {
    let s = session(&app, &headers).await?;
    check_csrf(&s, &f.csrf)?;
    admin_only(&s)?;
    let quota = quota_bytes(&f.quota_gib)?;
    let admin = f.admin.is_some();
    let by = s.user.name.clone();
    blocking(&app, move |a| {
        a.access(|x| Ok(x.add_user(&f.name, &f.password, admin, quota)?))?;
        tracing::info!(user = %f.name, admin, ?quota, by = %by, "user added (console)");
        Ok(())
    })
    .await?;
    Ok(Redirect::to("/admin/users").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_parsed_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; mbank_session=mbt_x_y; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("mbt_x_y"));
        assert_eq!(cookie(&h, LOGIN_COOKIE), None);
    }

    #[test]
    fn session_cookie_flags() {
        let v = set_cookie(Tls(true), SESSION_COOKIE, "t", "/", 60);
        let v = v.to_str().unwrap();
        assert!(v.contains("HttpOnly") && v.contains("SameSite=Strict") && v.contains("Secure"));
        let v = set_cookie(Tls(false), SESSION_COOKIE, "t", "/", 60);
        assert!(!v.to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn csrf_depends_on_the_token() {
        assert_ne!(csrf_for("mbt_a_b"), csrf_for("mbt_a_c"));
        assert_eq!(csrf_for("mbt_a_b").len(), 64);
    }
}
