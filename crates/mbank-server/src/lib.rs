//! # mbank-server
//!
//! `mbank serve`: the HTTP API of `docs/api.md` over a bank on this machine, shared by
//! many users. The catalog (SQLite, or PostgreSQL for a bank several servers share)
//! stays the single writer of heads and sessions; the chunk store is the bank's (a
//! directory, or S3). Each request runs its catalog, store and access-database work on
//! tokio's blocking pool, with pooled connections. On a bank in PostgreSQL, every
//! guarantee that crosses requests is kept in the database (ARCHITECTURE.md, "Several
//! servers on one bank"), and uploads are durable before they are answered.
//!
//! ## Isolation (DESIGN invariant 7)
//!
//! Every request is authenticated by a bearer token ([`mbank_access::Access`]). A user
//! sees their own machines and published ones; anything else is answered as if it did
//! not exist. A chunk is readable by a user who sent its bytes, or whose committed or
//! published versions reference it; a commit may only reference chunks its user can
//! read, so knowing an id grants nothing. Storage is shared: a chunk sent by a second
//! user is verified and counted against their quota, and stored once. `/metrics` is for
//! administrators: its bank-wide counts would tell a user what others store.
//!
//! ## Direct reads
//!
//! On a bank whose chunks are in S3, `POST /v1/chunks/urls` hands out presigned GET
//! URLs ([`ChunkStore::direct_urls`]) for the chunks the user may read, by the same
//! check as `chunks/get`, and `null` for the others whether the bank has them or not;
//! the station then fetches the bytes from the object store, and the server keeps only
//! the rights. A URL grants a read of that one object until it expires
//! ([`DirectUrls::valid`]), to whoever holds it. Uploads likewise: a presigned PUT
//! (`upload-urls`) writes only a staging object named by the bytes' SHA-256
//! ([`mbank_store::Staging`]), and `confirm` reads it back, verifies it and records the
//! rights as an upload through the server does; nothing else grants them.
//!
//! ## Under abuse
//!
//! Nothing a client without a valid token sends is held: [`gate`] checks the token from
//! the headers before reading a body, refuses an oversized `Content-Length` unread, and
//! reads bodies only within a memory budget and a deadline. The connection loop
//! (`conn.rs`) bounds connections in total and per address and closes those that send
//! no headers or idle too long (hyper's header timeout). Logins hash on a few threads
//! behind a short queue and back off per address and per user (`limits.rs`). A
//! `chunks/get` answer is streamed, each id once, up to a byte cap. What a user may make
//! the catalog keep is capped, and counted toward their quota (`caps.rs`). docs/api.md
//! lists the limits and their answers.

mod actions;
mod caps;
mod conn;
mod error;
pub mod jobs;
mod limits;
mod metrics;
pub mod peer;
mod tls;
mod web;

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mbank_access::{Access, StagedUpload, User};
use mbank_catalog::{Catalog, CatalogApi, MachineSettings};
use mbank_core::chunk::{EncodedChunk, MAX_STORED_LEN};
use mbank_core::{ChunkId, DiskIndex, MachineName, MemoryIndex, VersionId};
use mbank_remote::wire;
use mbank_store::ChunkStore;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use error::ApiError;
pub use limits::Limits;
use limits::{BodyBudget, LoginGuard};
use metrics::Metrics;

/// How `mbank serve` runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The bank's directory (catalog, access database; chunks unless in S3).
    pub bank_dir: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// PEM certificate chain and key; `None` serves plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Timeouts and caps.
    pub limits: Limits,
    /// LAN sharing (`--lan-sharing`): sign grants for stations to fetch chunks from
    /// each other's caches ([`peer`]).
    pub lan_sharing: bool,
    /// Presigned object-store URLs for chunk reads (`POST /v1/chunks/urls`), when the
    /// bank's store can make them (S3); off: every chunk goes through the server.
    pub direct_reads: bool,
    /// Presigned object-store URLs for chunk uploads (`POST /v1/chunks/upload-urls`),
    /// when the store can stage them (S3).
    pub direct_writes: bool,
    /// How long those URLs last.
    pub direct_urls: DirectUrls,
}

/// How long the server's presigned URLs last (`POST /v1/chunks/urls`, `upload-urls`).
#[derive(Clone, Debug)]
pub struct DirectUrls {
    /// How long a URL stays valid.
    pub valid: Duration,
    /// How long ago each URL is said to have been made: 0, but for tests of a
    /// station's answer to an expired URL (`serve --direct-url-age-secs`).
    pub age: Duration,
}

impl Default for DirectUrls {
    /// URLs valid for 5 minutes.
    fn default() -> Self {
        DirectUrls {
            valid: Duration::from_secs(300),
            age: Duration::ZERO,
        }
    }
}

/// The server's shared state.
struct App {
    bank_dir: PathBuf,
    store: Arc<dyn ChunkStore>,
    catalogs: Mutex<Vec<Catalog>>,
    access: Mutex<Vec<Access>>,
    metrics: Metrics,
    host: String,
    limits: Limits,
    logins: LoginGuard,
    bodies: BodyBudget,
    /// Held while a user's quota is checked and what it pays for recorded (with the
    /// access database's lock of the user: [`App::user_lock`]).
    quota_locks: caps::UserLocks,
    /// The web console's health samples.
    console: web::ConsoleState,
    /// When this server started (ms since the epoch).
    started_ms: i64,
    /// gc, verify and stats started by administrators over HTTPS or from the console.
    jobs: jobs::Jobs,
    /// The bank's catalog is in PostgreSQL, so other servers may share it: uploads are
    /// made durable before they are answered (see `store_uploads`).
    shared: bool,
    /// The key that signs LAN sharing grants, when LAN sharing is on.
    peer_signer: Option<peer::Signer>,
    /// Direct reads, when on and the store can make URLs.
    direct: Option<DirectUrls>,
    /// Direct uploads, when on and the store can stage them.
    direct_writes: Option<DirectUrls>,
    /// Held while a pack is built.
    pack_builds: Mutex<()>,
    /// The pack indexes segment requests read.
    pack_indexes: mbank_bank::pack::IndexCache,
}

type Shared = Arc<App>;

impl App {
    fn catalog<R>(
        &self,
        f: impl FnOnce(&mut Catalog) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        let taken = self
            .catalogs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut c = match taken {
            Some(c) => c,
            None => Catalog::open_in(&self.bank_dir, false, false)?,
        };
        let r = f(&mut c);
        self.catalogs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
        r
    }

    fn access<R>(&self, f: impl FnOnce(&Access) -> Result<R, ApiError>) -> Result<R, ApiError> {
        let taken = self.access.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let a = match taken {
            Some(a) => a,
            None => Access::open(&self.bank_dir)?,
        };
        let r = f(&a);
        self.access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(a);
        r
    }

    /// The machine, if `user` may see it; else the answer for a machine that does not
    /// exist.
    fn readable_machine(&self, user: &User, m: &MachineName) -> Result<(), ApiError> {
        if self.access(|a| Ok(a.can_read_machine(user, m)?))? {
            Ok(())
        } else {
            Err(ApiError::no_machine(m.as_str()))
        }
    }

    /// What `owner`'s machines hold in the catalog (their versions' bytes, leases).
    fn owner_usage(&self, owner: &str) -> Result<mbank_catalog::OwnerUsage, ApiError> {
        let since = mbank_catalog::now_ms() - caps::DISPLACED_WINDOW_MS;
        self.catalog(|c| Ok(c.owner_usage(owner, since)?))
    }

    /// When `user` last began a commit (as caller or as the machine's owner), through
    /// any server sharing the access database: a writer released with no commit since
    /// it began gives back the quota its uploads took.
    fn last_commit(&self, user: &str) -> Result<Option<i64>, ApiError> {
        self.access(|a| Ok(a.last_commit(user)?))
    }

    /// Notes that `users` begin a commit now.
    fn note_commit(&self, users: &[&str]) -> Result<(), ApiError> {
        let now = mbank_catalog::now_ms();
        self.access(|a| Ok(a.note_commit(users, now)?))
    }

    /// Runs `f` holding `user`'s quota lock: this server's, then the access database's
    /// (on PostgreSQL, across every server sharing it), so that two requests of one
    /// user cannot both pass the quota check before either records what it pays for.
    fn user_lock<R>(
        &self,
        user: &str,
        f: impl FnOnce() -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        self.quota_locks
            .run(user, || self.access(|a| a.with_user_lock(user, f)?))
    }

    /// `owner`'s usage: the chunks charged to them plus their versions' catalog bytes.
    fn usage(&self, owner: &str) -> Result<u64, ApiError> {
        let chunks = self.access(|a| Ok(a.usage(owner)?))?;
        Ok(chunks.saturating_add(self.owner_usage(owner)?.bytes))
    }

    /// The machine, if `user` owns it (may write it); else the answer for a machine that
    /// does not exist, even when `user` may read it (a published machine): what only
    /// the owner may change (retention, the head, labels) is not offered to others.
    fn owned_machine(&self, user: &User, m: &MachineName) -> Result<(), ApiError> {
        if self.access(|a| Ok(a.can_write_machine(user, m)))? {
            Ok(())
        } else {
            Err(ApiError::no_machine(m.as_str()))
        }
    }

    /// Builds the pack of version `info` (one build at a time: a build takes a core).
    /// `wait`: for the build running now, rather than answering `503` (a request must not
    /// hold a worker thread while another build runs).
    pub(crate) fn build_pack(
        &self,
        info: &mbank_catalog::VersionInfo,
        wait: bool,
    ) -> Result<mbank_bank::pack::PackReport, ApiError> {
        let _one = match self.pack_builds.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if wait => {
                self.pack_builds.lock().unwrap_or_else(|p| p.into_inner())
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(ApiError::unavailable(format!(
                    "another pack is being built; {}@{} is packed after it",
                    info.machine,
                    info.id.short()
                ))
                .retry_after(5));
            }
        };
        let index = self.catalog(|c| Ok(c.disk_index(info)?))?;
        let jobs = mbank_bank::default_jobs();
        let r = mbank_bank::pack::build(
            &*self.store,
            &self.bank_dir,
            info,
            &index,
            mbank_core::pack::DEFAULT_LEVEL,
            jobs,
            &mbank_bank::NoProgress,
        )
        .map_err(|e| {
            ApiError::internal(format!(
                "cannot build the pack of {}@{}: {e}",
                info.machine,
                info.id.short()
            ))
        })?;
        tracing::info!(machine = %info.machine, version = %info.id, stored = r.stored_bytes, pack = r.pack_bytes, seconds = r.seconds, "pack built");
        Ok(r)
    }

    fn writable_machine(&self, user: &User, m: &MachineName) -> Result<(), ApiError> {
        if self.access(|a| Ok(a.can_write_machine(user, m)))? {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "{} may write only machines named {}/NAME; {m} is not one",
            user.name, user.name
        )))
    }
}

/// Runs `f` for the authenticated `caller` on the blocking pool.
async fn authed<R: Send + 'static>(
    app: &Shared,
    caller: Caller,
    f: impl FnOnce(&App, &User) -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || f(&app, &caller.0))
        .await
        .map_err(|e| ApiError::internal(format!("the request's worker failed: {e}")))?
}

/// The user a request's token belongs to, authenticated by [`gate`] from the headers
/// before any body was read.
#[derive(Clone)]
struct Caller(User);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(ApiError::unauthorized)
    }
}

/// What a request does to a machine.
#[derive(Clone, Copy)]
enum Need {
    Read,
    Write,
}

/// Runs `f` on machine `{u}/{n}` after authentication, if the user may see it (else the
/// answer for a machine that does not exist) and, for `Write`, write it.
async fn on_machine<R: Send + 'static>(
    app: &Shared,
    caller: Caller,
    u: &str,
    n: &str,
    need: Need,
    f: impl FnOnce(&App, &User, &MachineName) -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    let m = machine_name(u, n)?;
    authed(app, caller, move |app, user| {
        app.readable_machine(user, &m)?;
        if let Need::Write = need {
            app.writable_machine(user, &m)?;
        }
        f(app, user, &m)
    })
    .await
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v.strip_prefix("Bearer ")?.trim();
    (!t.is_empty() && t.len() <= 256).then(|| t.to_string())
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => ApiError::internal(format!("cannot encode the answer: {e}")).into_response(),
    }
}

fn binary(b: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response()
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("the request body is too large: {e}"))
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}

fn parse_json<T: DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
    if b.len() > wire::MAX_JSON {
        return Err(ApiError::too_large(format!(
            "a JSON body may have at most {} bytes",
            wire::MAX_JSON
        )));
    }
    serde_json::from_slice(b)
        .map_err(|e| ApiError::bad_request(format!("the JSON body is not valid: {e}")))
}

fn machine_name(user: &str, name: &str) -> Result<MachineName, ApiError> {
    format!("{user}/{name}")
        .parse()
        .map_err(|e| ApiError::bad_request(format!("{e}")))
}

fn version_id(s: &str) -> Result<VersionId, ApiError> {
    s.parse().map_err(|e| ApiError::bad_request(format!("{e}")))
}

fn chunk_id(s: &str) -> Result<ChunkId, ApiError> {
    s.parse().map_err(|e| ApiError::bad_request(format!("{e}")))
}

/// Builds the router over the bank in `bank_dir`: the API, and the web console
/// (`web.rs`, outside the API's token gate; `tls` marks its cookies `Secure`).
fn router(app: Shared, tls: bool) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/whoami", get(whoami))
        .route("/v1/admin/jobs", post(start_job))
        .route("/v1/admin/jobs/{id}", get(get_job))
        .route("/v1/admin/users", get(admin_users))
        .route(
            "/v1/admin/users/{name}/quota",
            axum::routing::put(admin_quota),
        )
        .route("/v1/machines", get(machines))
        .route("/v1/machines/{u}/{n}", get(machine).delete(remove_machine))
        .route("/v1/machines/{u}/{n}/versions", get(versions).post(commit))
        .route("/v1/machines/{u}/{n}/resolve", get(resolve))
        .route(
            "/v1/machines/{u}/{n}/versions/{v}",
            axum::routing::delete(remove_version),
        )
        .route("/v1/machines/{u}/{n}/versions/{v}/index", get(index))
        .route("/v1/machines/{u}/{n}/versions/{v}/streams/{s}", get(stream))
        .route(
            "/v1/machines/{u}/{n}/versions/{v}/pack",
            get(pack_index).post(build_pack),
        )
        .route(
            "/v1/machines/{u}/{n}/versions/{v}/pack/{k}",
            get(pack_segment),
        )
        .route(
            "/v1/machines/{u}/{n}/lease",
            get(lease).put(take_lease).delete(release_lease),
        )
        .route(
            "/v1/machines/{u}/{n}/lease/heartbeat",
            post(lease_heartbeat),
        )
        .route(
            "/v1/machines/{u}/{n}/lease/checkpoint",
            post(lease_checkpoint),
        )
        .route("/v1/machines/{u}/{n}/sessions", get(sessions))
        .route("/v1/machines/{u}/{n}/forget", post(forget))
        .route("/v1/machines/{u}/{n}/head", axum::routing::put(set_head))
        .route("/v1/machines/{u}/{n}/rename", post(rename))
        .route("/v1/machines/{u}/{n}/labels", get(labels))
        .route(
            "/v1/machines/{u}/{n}/versions/{v}/labels",
            post(label_version),
        )
        .route("/v1/machines/{u}/{n}/policy", get(policy).put(set_policy))
        .route(
            "/v1/machines/{u}/{n}/settings",
            get(settings).put(set_settings),
        )
        .route("/v1/peers/key", get(peers_key))
        .route("/v1/peers/grant", post(peers_grant))
        .route("/v1/writers", post(register_writer))
        .route("/v1/writers/{id}", axum::routing::delete(unregister_writer))
        .route("/v1/writers/{id}/heartbeat", post(writer_heartbeat))
        .route("/v1/chunks/have", post(have))
        .route("/v1/chunks/get", post(get_chunks))
        .route("/v1/chunks/urls", post(chunk_urls))
        .route("/v1/chunks/upload-urls", post(upload_urls))
        .route("/v1/chunks/confirm", post(confirm_uploads))
        .route("/v1/chunks", post(put_chunks))
        .route("/v1/chunks/{id}", get(get_chunk).put(put_chunk))
        .fallback(|| async { ApiError::not_found("no such endpoint; see docs/api.md") })
        // `gate` has read the body within its route's cap (`body_limit`).
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(app.clone(), gate))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .merge(web::routes(app.clone(), tls))
        .with_state(app)
}

/// The most body bytes a route takes; `None` for a route that reads no body.
fn body_limit(method: &Method, route: &str) -> Option<usize> {
    let m = method.as_str();
    Some(match (m, route) {
        ("POST", "/v1/chunks") => wire::MAX_BATCH_BYTES + 4096,
        ("PUT", "/v1/chunks/{id}") => MAX_STORED_LEN,
        ("POST", "/v1/machines/{u}/{n}/versions") => wire::MAX_COMMIT,
        ("POST", "/v1/chunks/have") => wire::MAX_HAVE * ChunkId::LEN,
        ("POST", "/v1/chunks/get") => wire::MAX_GET_MANY * ChunkId::LEN,
        ("POST", "/v1/chunks/urls") => wire::MAX_URLS * ChunkId::LEN,
        ("POST", "/v1/chunks/upload-urls") | ("POST", "/v1/chunks/confirm") => {
            wire::MAX_DIRECT_UPLOADS * (ChunkId::LEN + 32)
        }
        ("POST", _) | ("PUT", _) => wire::MAX_JSON,
        _ => return None,
    })
}

/// Runs before every handler, in this order, so that nobody can make the server hold
/// memory or a worker without a valid token:
///
/// 1. authenticates the token from the headers (all routes but login, health and
///    unknown paths), answering `401` before any of the body is read;
/// 2. refuses a `Content-Length` over the route's cap (`413`), still unread;
/// 3. waits (bounded) for the body's share of [`Limits::body_memory`] (`503`);
/// 4. reads the body within [`Limits::body_timeout`] plus a second per MiB (`408`).
async fn gate(State(app): State<Shared>, mut req: Request, next: Next) -> Response {
    let Some(route) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
    else {
        return next.run(req).await;
    };
    if !matches!(route.as_str(), "/v1/login" | "/v1/health" | "/v1/peers/key") {
        let Some(token) = bearer(req.headers()) else {
            return refuse_unread(req, ApiError::unauthorized().into_response(), ANON_DRAIN);
        };
        let a = app.clone();
        let user = tokio::task::spawn_blocking(move || a.access(|x| Ok(x.authenticate(&token)?)))
            .await
            .map_err(|e| ApiError::internal(format!("the request's worker failed: {e}")))
            .and_then(|r| r);
        match user {
            Ok(u) => {
                if let Some(who) = req.extensions().get::<RequestUser>() {
                    *who.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(u.name.clone());
                }
                req.extensions_mut().insert(Caller(u));
            }
            Err(e) => return refuse_unread(req, e.into_response(), ANON_DRAIN),
        }
    }
    let Some(limit) = body_limit(req.method(), &route) else {
        return next.run(req).await;
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let resp = ApiError::too_large(format!(
            "the request body has {} bytes; {} {route} takes at most {limit}",
            declared.unwrap_or(0),
            req.method()
        ))
        .into_response();
        return refuse_unread(req, resp, USER_DRAIN);
    }
    // Without a length (chunked), the body may be as large as the cap.
    let len = declared.map_or(limit, |n| n as usize);
    let permit = match app.bodies.reserve(len, app.limits.body_timeout).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (parts, body) = req.into_parts();
    let deadline = app.limits.body_timeout + Duration::from_secs((len >> 20) as u64);
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let e = e.into_inner();
            return if e.is::<http_body_util::LengthLimitError>() {
                ApiError::too_large(format!(
                    "{} {route} takes at most {limit} bytes",
                    parts.method
                ))
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} s; send it faster or in smaller parts",
                    deadline.as_secs()
                ),
            )
            .into_response();
        }
    };
    let resp = next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await;
    drop(permit);
    resp
}

/// Most bytes of an unread body discarded after refusing a request without a valid
/// token, and after refusing a user's request whose body is over its route's cap.
const ANON_DRAIN: u64 = 4 << 20;
const USER_DRAIN: u64 = 96 << 20;
/// Time a refused request's body has to arrive, to be discarded.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Answers `resp` to `req` without reading its body into memory, but reads and discards
/// that body in the background (when it declares at most `most` bytes, within
/// [`DRAIN_TIME`]): a connection closed with bytes unread is reset, and a client still
/// sending (an upload with an expired token, say) would see a dropped connection
/// instead of the answer. Discarding holds no memory; past either bound the connection
/// just closes.
fn refuse_unread(req: Request, resp: Response, most: u64) -> Response {
    use http_body_util::BodyExt;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if declared.is_some_and(|n| n == 0 || n > most) || (declared.is_none() && !chunked) {
        return resp;
    }
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut seen = 0u64;
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > most {
                    break;
                }
            }
        })
        .await;
    });
    resp
}

/// Who made a request, once `gate` has authenticated it: filled in for `observe`'s log
/// line.
#[derive(Clone, Default)]
struct RequestUser(Arc<Mutex<Option<String>>>);

/// Counts and logs every request (one structured line each, naming the user and the
/// client's address).
async fn observe(State(app): State<Shared>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let client = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "-".to_string(), |c| c.0.ip().to_string());
    let who = RequestUser::default();
    req.extensions_mut().insert(who.clone());
    let len_in = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let resp = json_errors(next.run(req).await).await;
    let m = &app.metrics;
    m.requests.fetch_add(1, Relaxed);
    m.bytes_in.fetch_add(len_in, Relaxed);
    let out = axum::body::HttpBody::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    m.bytes_out.fetch_add(out, Relaxed);
    let status = resp.status();
    let kind = resp
        .extensions()
        .get::<error::ErrorKind>()
        .map(|k| k.0.clone());
    if status.is_client_error() || status.is_server_error() {
        m.error(kind.as_deref().unwrap_or("other"));
    }
    let elapsed = started.elapsed();
    m.observe_duration(method.as_str(), &route, elapsed.as_secs_f64());
    let user = who
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| "-".into());
    tracing::info!(
        target: "mbank::http",
        %method,
        path,
        status = status.as_u16(),
        kind = kind.as_deref().unwrap_or("-"),
        user,
        client,
        bytes_in = len_in,
        bytes_out = out,
        ms = elapsed.as_millis() as u64,
    );
    resp
}

/// Error answers that axum made itself (a path segment that does not parse, a method
/// a route lacks) become JSON [`wire::ErrorBody`]s like ours.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::METHOD_NOT_ALLOWED => "bad_request",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = if text.trim().is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    ApiError::new(status, kind, message).into_response()
}

async fn health() -> Response {
    json(&wire::Health {
        ok: true,
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// `GET /metrics`, for administrators only: its bank-wide counts (deduplication above
/// all) would tell a user what others store.
async fn metrics_text(State(app): State<Shared>, caller: Caller) -> Result<Response, ApiError> {
    if !caller.0.admin {
        return Err(ApiError::forbidden(format!(
            "/metrics shows bank-wide counts and is for administrators; {} is not one (scrape it with an administrator's token)",
            caller.0.name
        )));
    }
    let a = app.clone();
    let (sessions, machines, users) = tokio::task::spawn_blocking(move || {
        let (sessions, machines) = a.catalog(|c| {
            let ms = c.machines()?;
            let mut s = 0;
            for m in &ms {
                s += u64::from(c.lease(&m.name)?.is_some());
            }
            Ok((s, ms.len() as u64))
        })?;
        let users = a.access(|x| Ok(x.users()?.len() as u64))?;
        Ok::<_, ApiError>((sessions, machines, users))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(
            sessions,
            machines,
            users,
            &[
                ("gc", metrics::LastJob::read(&app.bank_dir, "gc")),
                ("verify", metrics::LastJob::read(&app.bank_dir, "verify")),
            ],
        ),
    )
        .into_response())
}

/// `POST /v1/login`: refused at once (`429`) while the user or the address is in
/// backoff after failed logins; else waits for a password-hash slot (`503` when the
/// queue is full) and checks the password.
async fn login(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: wire::LoginRequest = parse_json(&body(b)?)?;
    let ttl = Duration::from_secs(
        req.ttl_secs
            .unwrap_or(wire::DEFAULT_TTL_SECS)
            .min(wire::MAX_TTL_SECS),
    );
    let addr = peer.ip();
    if let Err(e) = app.logins.check(&req.user, addr) {
        app.metrics.login_failures.fetch_add(1, Relaxed);
        tracing::warn!(user = %req.user, %addr, "login refused: in backoff after failed logins");
        return Err(e);
    }
    let a = app.clone();
    let user = req.user.clone();
    let r = app
        .logins
        .hash(move || {
            a.access(|x| {
                Ok(x.login(
                    &req.user,
                    &req.password,
                    ttl,
                    req.label.as_deref().unwrap_or(""),
                )?)
            })
        })
        .await?;
    match r {
        Ok(t) => {
            app.logins.succeeded(&user);
            app.metrics.logins.fetch_add(1, Relaxed);
            Ok(json(&wire::LoginResponse {
                token: t.token,
                expires_ms: t.expires_ms,
            }))
        }
        Err(e) => {
            if e.status == StatusCode::UNAUTHORIZED {
                app.logins.failed(&user, addr);
                tracing::warn!(%user, %addr, "login failed: wrong user or password");
            }
            app.metrics.login_failures.fetch_add(1, Relaxed);
            Err(e)
        }
    }
}

async fn logout(
    State(app): State<Shared>,
    headers: HeaderMap,
    caller: Caller,
) -> Result<Response, ApiError> {
    let token = bearer(&headers).ok_or_else(ApiError::unauthorized)?;
    authed(&app, caller, move |app, _| {
        app.access(|a| Ok(a.revoke_token(&token)?))?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// Refuses a user who is not an administrator (`403`).
fn require_admin(user: &User, what: &str) -> Result<(), ApiError> {
    if user.admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "{what} is for administrators, and {} is not one (an administrator adds them with `mbank admin user add NAME --admin`)",
            user.name
        )))
    }
}

/// `POST /v1/admin/jobs`: starts gc, verify or stats on the served bank.
async fn start_job(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: wire::JobRequest = parse_json(&body(b)?)?;
    authed(&app, caller, move |app, user| {
        require_admin(user, &format!("`mbank {}` over the network", req.job))?;
        let job = app
            .jobs
            .start(&app.bank_dir, &req.job, &user.name)
            .map_err(ApiError::bad_request)?;
        tracing::info!(user = %user.name, job = %job.job, id = job.id, "job requested");
        Ok((StatusCode::ACCEPTED, json(&job)).into_response())
    })
    .await
}

/// `GET /v1/admin/jobs/{id}`: a job's progress, or its report.
async fn get_job(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    authed(&app, caller, move |app, user| {
        require_admin(user, "a job's progress")?;
        let job = app
            .jobs
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("no job {id} since the server started")))?;
        Ok(json(&job))
    })
    .await
}

/// `GET /v1/admin/users`: every user with quota and usage.
async fn admin_users(State(app): State<Shared>, caller: Caller) -> Result<Response, ApiError> {
    authed(&app, caller, move |app, user| {
        require_admin(user, "the list of users")?;
        Ok(json(&app.access(|a| Ok(a.users()?))?))
    })
    .await
}

/// `PUT /v1/admin/users/{name}/quota`: sets a user's quota.
async fn admin_quota(
    State(app): State<Shared>,
    caller: Caller,
    Path(name): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: wire::QuotaBody = parse_json(&body(b)?)?;
    authed(&app, caller, move |app, user| {
        require_admin(user, "a quota change")?;
        app.access(|a| Ok(a.set_quota(&name, req.quota)?))?;
        tracing::info!(by = %user.name, user = %name, quota = ?req.quota, "quota set");
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn whoami(State(app): State<Shared>, caller: Caller) -> Result<Response, ApiError> {
    authed(&app, caller, |app, user| {
        let used = app.usage(&user.name)?;
        Ok(json(&wire::WhoAmI {
            user: user.name.clone(),
            admin: user.admin,
            quota: user.quota,
            used,
        }))
    })
    .await
}

async fn machines(State(app): State<Shared>, caller: Caller) -> Result<Response, ApiError> {
    authed(&app, caller, |app, user| {
        Ok(json(&actions::machines(app, user)?))
    })
    .await
}

async fn machine(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    on_machine(&app, caller, &u, &n, Need::Read, |app, user, m| {
        Ok(json(&actions::machine(app, user, m)?))
    })
    .await
}

async fn versions(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    on_machine(&app, caller, &u, &n, Need::Read, |app, _, m| {
        if app.catalog(|c| Ok(c.machine(m)?))?.is_none() {
            return Err(ApiError::no_machine(m.as_str()));
        }
        Ok(json(&app.catalog(|c| Ok(c.versions(m)?))?))
    })
    .await
}

#[derive(serde::Deserialize)]
struct VersionQuery {
    version: Option<String>,
}

async fn resolve(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    q: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.to_string()))?;
    on_machine(&app, caller, &u, &n, Need::Read, move |app, _, m| {
        Ok(json(
            &app.catalog(|c| Ok(c.resolve(m, q.version.as_deref())?))?,
        ))
    })
    .await
}

/// The version `v` of `m`, exactly, if `user` may see it.
fn exact_version(
    app: &App,
    user: &User,
    m: &MachineName,
    v: VersionId,
) -> Result<mbank_catalog::VersionInfo, ApiError> {
    app.readable_machine(user, m)?;
    let info = app.catalog(|c| Ok(c.resolve(m, Some(&v.to_hex()))?))?;
    if info.id != v {
        return Err(ApiError::from(
            mbank_catalog::CatalogError::VersionNotFound {
                machine: m.to_string(),
                prefix: v.to_hex(),
            },
        ));
    }
    Ok(info)
}

async fn index(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n, v)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (m, v) = (machine_name(&u, &n)?, version_id(&v)?);
    authed(&app, caller, move |app, user| {
        let info = exact_version(app, user, &m, v)?;
        let idx = app.catalog(|c| Ok(c.disk_index(&info)?))?;
        Ok(binary(idx.to_bytes()))
    })
    .await
}

/// The pack of version `v` of `m` and its serialised index, for a user who may read
/// the version; `404` when it has none. A damaged pack is logged and answered as none:
/// the export goes on from the chunks.
fn version_pack(
    app: &App,
    user: &User,
    m: &MachineName,
    v: VersionId,
) -> Result<mbank_bank::pack::PackIndexBytes, ApiError> {
    let info = exact_version(app, user, m, v)?;
    let none = || ApiError::not_found(format!("version {} of {m} has no pack", v.short()));
    match app.pack_indexes.get(&app.bank_dir, info.id) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(none()),
        Err(why) => {
            tracing::warn!(machine = %m, version = %v, "the pack cannot be used: {why}; build it again with `mbank pack`");
            Err(none())
        }
    }
}

async fn pack_index(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n, v)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (m, v) = (machine_name(&u, &n)?, version_id(&v)?);
    authed(&app, caller, move |app, user| {
        Ok(binary(version_pack(app, user, &m, v)?.1.clone()))
    })
    .await
}

async fn pack_segment(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n, v, k)): Path<(String, String, String, String)>,
) -> Result<Response, ApiError> {
    let (m, v) = (machine_name(&u, &n)?, version_id(&v)?);
    let k: usize = k
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{k:?} is not a segment number")))?;
    authed(&app, caller, move |app, user| {
        let pack = version_pack(app, user, &m, v)?;
        let idx = &pack.0;
        let seg = idx.segments.get(k).ok_or_else(|| {
            ApiError::not_found(format!(
                "the pack of {m}@{} has {} segments; there is no segment {k}",
                v.short(),
                idx.segments.len()
            ))
        })?;
        // The same rights as reading the chunks one by one.
        let ids: Vec<ChunkId> = seg.chunks.iter().map(|(id, _)| *id).collect();
        let ok = app.access(|a| Ok(a.readable(user, &ids)?))?;
        if let Some((id, _)) = ids.iter().zip(&ok).find(|(_, ok)| !**ok) {
            return Err(ApiError::no_chunk(id));
        }
        let b = mbank_bank::pack::read_segment(&app.bank_dir, v, seg).map_err(|e| {
            ApiError::internal(format!(
                "cannot read segment {k} of the pack of {m}@{}: {e}",
                v.short()
            ))
        })?;
        app.metrics.pack_segments_served.fetch_add(1, Relaxed);
        app.metrics
            .pack_bytes_served
            .fetch_add(b.len() as u64, Relaxed);
        Ok(binary(b))
    })
    .await
}

async fn build_pack(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n, v)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (m, v) = (machine_name(&u, &n)?, version_id(&v)?);
    authed(&app, caller, move |app, user| {
        // A pack is a second copy of the version's data, charged to no quota: built
        // through the server for administrators only.
        actions::admin_only(user)?;
        let info = exact_version(app, user, &m, v)?;
        Ok(json(&app.build_pack(&info, false)?))
    })
    .await
}

async fn stream(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n, v, s)): Path<(String, String, String, String)>,
) -> Result<Response, ApiError> {
    let (m, v) = (machine_name(&u, &n)?, version_id(&v)?);
    authed(&app, caller, move |app, user| {
        let info = exact_version(app, user, &m, v)?;
        match app.catalog(|c| Ok(c.stream(&info, &s)?))? {
            Some(idx) => Ok(binary(idx.to_bytes())),
            None => Err(ApiError::not_found(format!(
                "version {} of {m} has no stream {s:?}",
                v.short()
            ))),
        }
    })
    .await
}

async fn commit(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let m = machine_name(&u, &n)?;
    let b = body(b)?;
    authed(&app, caller, move |app, user| {
        app.writable_machine(user, &m)?;
        let (h, index, streams) = wire::parse_commit_body(&b).map_err(ApiError::bad_request)?;
        // Bound the work before parsing the streams (the action checks again).
        caps::check_streams(h.streams.iter().map(|(n, _)| n.as_str()))?;
        let index_len = index.len() as u64;
        let index = DiskIndex::from_bytes(index)
            .map_err(|e| ApiError::bad_request(format!("the disk index is not valid: {e}")))?;
        let mut streams_len = 0u64;
        let mut named = Vec::with_capacity(streams.len());
        let mut names = HashSet::new();
        for ((name, _), bytes) in h.streams.iter().zip(streams) {
            streams_len += (name.len() + bytes.len()) as u64;
            if !names.insert(name) {
                return Err(ApiError::bad_request(format!(
                    "the commit names stream {name:?} twice"
                )));
            }
            let idx = MemoryIndex::from_bytes(bytes).map_err(|e| {
                ApiError::bad_request(format!("the index of stream {name:?} is not valid: {e}"))
            })?;
            named.push((name.clone(), idx));
        }
        let new = actions::NewVersion {
            info: h.info,
            index,
            index_len,
            streams: named,
            streams_len,
            expected_head: h.expected_head,
        };
        let outcome = actions::commit(app, user, &m, new)?;
        Ok(json(&wire::CommitResponse { outcome }))
    })
    .await
}

/// Refuses a commit whose index or streams put a chunk at a place of another length
/// (`400 bad_chunk_length`): `export` would write such a chunk over its neighbours.
/// Pairs of chunk and length the parent (a version of the same machine, checked when
/// it was committed) already has are trusted; every other distinct chunk costs one
/// header read from the store (a GET of the chunk on S3), so a check-in pays for the
/// chunks it changed, a first commit for all of its chunks. A fork's first version
/// trusts the pairs of the version it names as its source (`mbank_bank::fork_source`),
/// if the user may read that machine: on S3 the header reads of a large base cost
/// seconds to minutes. (A false claim of a source changes no outcome: a pair a
/// committed version holds is a true one.)
fn check_lengths(
    app: &App,
    user: &User,
    m: &MachineName,
    info: &mbank_catalog::VersionInfo,
    index: &DiskIndex,
    streams: &[mbank_catalog::NamedStream],
) -> Result<(), ApiError> {
    // The (chunk, length) pairs of version `v` of `machine`, if it exists as named.
    let pairs_of = |machine: &MachineName, v: VersionId| {
        app.catalog(|c| {
            let Ok(found) = c.resolve(machine, Some(&v.to_hex())) else {
                return Ok(HashSet::new());
            };
            if found.id != v {
                return Ok(HashSet::new());
            }
            let idx = c.disk_index(&found)?;
            let streams = c.streams(&found)?;
            Ok(mbank_bank::length_pairs(&idx, &streams))
        })
    };
    let source = match (info.parent, mbank_bank::fork_source(&info.stats.source)) {
        (None, Some((sm, sv))) if app.readable_machine(user, &sm).is_ok() => pairs_of(&sm, sv)?,
        _ => HashSet::new(),
    };
    let mut known = match info.parent {
        Some(p) => pairs_of(m, p)?,
        None => HashSet::new(),
    };
    known.extend(source);
    let reads = mbank_bank::lengths_to_check(index, streams, &known).len();
    app.metrics
        .commit_length_reads
        .fetch_add(reads as u64, Relaxed);
    match mbank_bank::check_chunk_lengths(&*app.store, index, streams, &known) {
        Ok(None) => Ok(()),
        Ok(Some(w)) => {
            let mut e = ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_chunk_length",
                format!(
                    "version {} of {m} cannot be committed: {w}; a chunk's length is fixed by its content",
                    info.id
                ),
            );
            e.body.chunk = Some(w.chunk);
            Err(e)
        }
        Err(mbank_store::StoreError::Missing(id)) => {
            let mut e = ApiError::bad_request(format!(
                "the version names chunk {id}, which the bank does not have; send its bytes first"
            ));
            e.body.chunk = Some(id);
            Err(e)
        }
        Err(e) => Err(e.into()),
    }
}

/// Refuses to remove what a session reads from: the bank's rule
/// (`mbank_bank::check_not_in_use`, as `Bank::remove` applies it).
fn check_not_in_use(app: &App, m: &MachineName, going: Option<VersionId>) -> Result<(), ApiError> {
    let refused = app.catalog(|c| Ok(mbank_bank::check_not_in_use(&*c, m, going)))?;
    match refused {
        Ok(()) => Ok(()),
        Err(mbank_bank::BankError::InUse { machine, station }) => {
            let why = mbank_bank::BankError::InUse {
                machine,
                station: station.clone(),
            };
            let mut e = ApiError::new(StatusCode::CONFLICT, "in_use", why.to_string());
            e.body.machine = Some(m.to_string());
            e.body.station = Some(station);
            Err(e)
        }
        Err(mbank_bank::BankError::Catalog(e)) => Err(e.into()),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

async fn remove_version(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n, v)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (m, v) = (machine_name(&u, &n)?, version_id(&v)?);
    authed(&app, caller, move |app, user| {
        let head = actions::remove_version(app, user, &m, v)?;
        Ok(json(&wire::Head { head }))
    })
    .await
}

async fn remove_machine(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    on_machine(&app, caller, &u, &n, Need::Write, |app, _, m| {
        check_not_in_use(app, m, None)?;
        let removed = app.catalog(|c| Ok(c.remove_machine(m)?))?;
        Ok(json(&wire::Removed { removed }))
    })
    .await
}

/// Runs `f` on machine `{u}/{n}` after authentication, if the user owns it (else the
/// answer for a machine that does not exist), with the request's JSON body.
async fn on_owned_machine<B: DeserializeOwned + Send + 'static, R: Send + 'static>(
    app: &Shared,
    caller: Caller,
    u: &str,
    n: &str,
    b: Result<Bytes, BytesRejection>,
    f: impl FnOnce(&App, &User, &MachineName, B) -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    let m = machine_name(u, n)?;
    let b = body(b)?;
    authed(app, caller, move |app, user| {
        app.owned_machine(user, &m)?;
        let req: B = parse_json(&b)?;
        f(app, user, &m, req)
    })
    .await
}

async fn forget(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    on_owned_machine(
        &app,
        caller,
        &u,
        &n,
        b,
        |app, user, m, req: wire::ForgetRequest| {
            Ok(json(&actions::forget(
                app,
                user,
                m,
                &req.policy,
                req.dry_run,
            )?))
        },
    )
    .await
}

async fn set_head(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    on_owned_machine(
        &app,
        caller,
        &u,
        &n,
        b,
        |app, user, m, req: wire::HeadRequest| {
            actions::set_head(app, user, m, req.to, req.expected)?;
            Ok(json(&wire::Head { head: Some(req.to) }))
        },
    )
    .await
}

async fn rename(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    on_owned_machine(
        &app,
        caller,
        &u,
        &n,
        b,
        |app, _, m, req: wire::RenameRequest| {
            // Readers of a published machine know it by its name: it stays put.
            if app.access(|a| Ok(a.is_published(m)?))? {
                return Err(ApiError::bad_request(format!(
                    "{m} is published to every user, who know it by that name; an administrator \
                 must unpublish it first (`mbank admin unpublish {m}`)"
                )));
            }
            app.catalog(|c| Ok(c.rename_machine(m, &req.to)?))?;
            tracing::info!(machine = %m, to = %req.to, "renamed");
            Ok(json(&req))
        },
    )
    .await
}

async fn labels(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    on_machine(&app, caller, &u, &n, Need::Read, |app, _, m| {
        Ok(json(&app.catalog(|c| Ok(c.labels(m)?))?))
    })
    .await
}

async fn label_version(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n, v)): Path<(String, String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = version_id(&v)?;
    on_owned_machine(
        &app,
        caller,
        &u,
        &n,
        b,
        move |app, user, m, change: mbank_catalog::LabelChange| {
            Ok(json(&actions::label(app, user, m, v, &change)?))
        },
    )
    .await
}

async fn policy(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    on_machine(&app, caller, &u, &n, Need::Read, |app, user, m| {
        let policy = actions::policy(app, user, m)?;
        Ok(json(&wire::PolicyBody { policy }))
    })
    .await
}

async fn set_policy(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    on_owned_machine(
        &app,
        caller,
        &u,
        &n,
        b,
        |app, user, m, req: wire::PolicyBody| {
            actions::set_policy(app, user, m, req.policy.as_ref())?;
            Ok(json(&req))
        },
    )
    .await
}

async fn settings(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    on_machine(&app, caller, &u, &n, Need::Read, |app, _, m| {
        Ok(json(&app.catalog(|c| Ok(c.settings(m)?))?))
    })
    .await
}

async fn set_settings(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    on_owned_machine(
        &app,
        caller,
        &u,
        &n,
        b,
        |app, _, m, req: MachineSettings| {
            app.catalog(|c| Ok(c.set_settings(m, &req)?))?;
            Ok(json(&req))
        },
    )
    .await
}

async fn lease(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    on_machine(&app, caller, &u, &n, Need::Read, |app, user, m| {
        Ok(json(&actions::lease(app, user, m)?))
    })
    .await
}

async fn take_lease(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: wire::LeaseRequest = parse_json(&body(b)?)?;
    on_machine(&app, caller, &u, &n, Need::Write, move |app, _, m| {
        if req.lease.machine != m.as_str() {
            return Err(ApiError::bad_request(format!(
                "the lease is for {} but was sent to {m}",
                req.lease.machine
            )));
        }
        caps::check_lease(&req.lease)?;
        let owner = m.user();
        let replaced = app.user_lock(owner, || {
            let held = app.catalog(|c| Ok(c.lease(m)?))?;
            if held.as_ref().is_none_or(|h| h.session != req.lease.session) {
                let u = app.owner_usage(owner)?;
                if held.is_none() && u.leases >= caps::MAX_LEASES {
                    return Err(caps::too_many(
                        "leases",
                        owner,
                        caps::MAX_LEASES,
                        "end a session (detach, or power off) before starting another",
                    ));
                }
                let replacing = held
                    .as_ref()
                    .is_some_and(|h| req.replace.as_deref() == Some(h.session.as_str()));
                if replacing && u.displaced >= caps::MAX_DISPLACED {
                    return Err(caps::too_many(
                        "displaced sessions",
                        owner,
                        caps::MAX_DISPLACED,
                        "run `mbank` on the stations whose sessions were taken over so that they check in, or wait a day",
                    ));
                }
            }
            app.catalog(|c| {
                Ok(CatalogApi::take_lease(
                    c,
                    &req.lease,
                    req.replace.as_deref(),
                )?)
            })
        })?;
        Ok(json(&wire::LeaseResponse { replaced }))
    })
    .await
}

#[derive(serde::Deserialize)]
struct SessionQuery {
    session: String,
}

async fn release_lease(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    q: Result<Query<SessionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.to_string()))?;
    on_machine(&app, caller, &u, &n, Need::Write, move |app, _, m| {
        let released = app.catalog(|c| Ok(c.release_lease(m, &q.session)?))?;
        Ok(json(&wire::Released { released }))
    })
    .await
}

async fn lease_heartbeat(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: wire::SessionBody = parse_json(&body(b)?)?;
    on_machine(&app, caller, &u, &n, Need::Write, move |app, _, m| {
        let held = app.catalog(|c| Ok(c.heartbeat_lease(m, &req.session)?))?;
        Ok(json(&wire::Held { held }))
    })
    .await
}

async fn lease_checkpoint(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: wire::CheckpointBody = parse_json(&body(b)?)?;
    let version = version_id(&req.version)?;
    on_machine(&app, caller, &u, &n, Need::Write, move |app, _, m| {
        let held = app.catalog(|c| Ok(c.lease_checkpoint(m, &req.session, version)?))?;
        Ok(json(&wire::Held { held }))
    })
    .await
}

/// The LAN sharing signer, or `404 not_enabled`.
fn peer_signer(app: &App) -> Result<&peer::Signer, ApiError> {
    app.peer_signer.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_enabled",
            "LAN sharing is off on this bank server (`mbank serve --lan-sharing` turns it on)",
        )
    })
}

async fn peers_key(State(app): State<Shared>) -> Result<Response, ApiError> {
    Ok(json(&wire::PeerKey {
        key: peer_signer(&app)?.public_hex(),
    }))
}

/// A grant over the asked chunks the caller may read: another user's chunk is left
/// out as an absent one is.
async fn peers_grant(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: wire::GrantRequest = parse_json(&body(b)?)?;
    if req.chunks.len() > peer::MAX_CHUNKS {
        return Err(ApiError::bad_request(format!(
            "a grant covers at most {} chunks",
            peer::MAX_CHUNKS
        )));
    }
    let ids = req
        .chunks
        .iter()
        .map(|c| chunk_id(c))
        .collect::<Result<Vec<_>, _>>()?;
    authed(&app, caller, move |app, user| {
        let signer = peer_signer(app)?;
        let ok = app.access(|a| Ok(a.readable(user, &ids)?))?;
        let granted: Vec<ChunkId> = ids
            .iter()
            .zip(&ok)
            .filter(|(_, ok)| **ok)
            .map(|(id, _)| *id)
            .collect();
        let (grant, sig) = signer.grant(&user.name, &granted, mbank_catalog::now_ms());
        Ok(json(&wire::GrantAnswer {
            grant,
            sig,
            granted: ok,
        }))
    })
    .await
}

async fn sessions(
    State(app): State<Shared>,
    caller: Caller,
    Path((u, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    on_machine(&app, caller, &u, &n, Need::Read, |app, _, m| {
        Ok(json(&app.catalog(|c| Ok(c.session_bases(m)?))?))
    })
    .await
}

/// A writer's `what` starts with its user's name, so only they may touch it.
fn writer_tag(user: &str) -> String {
    format!("{user}: ")
}

async fn register_writer(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: wire::WriterRequest = parse_json(&body(b)?)?;
    authed(&app, caller, move |app, user| {
        let host: String = req.host.chars().take(128).collect();
        let what: String = req.what.chars().take(256).collect();
        let tag = writer_tag(&user.name);
        let w = app.user_lock(&user.name, || {
            app.catalog(|c| {
                // The user's writers not heard from for 10 minutes are dead (`mbank gc`
                // judges them so too): dropped, so that they do not count.
                let now = mbank_catalog::now_ms();
                let mut live = 0;
                for w in c.writers()?.into_iter().filter(|w| w.what.starts_with(&tag)) {
                    if now - w.heartbeat_ms >= caps::WRITER_SILENCE_MS {
                        c.unregister_writer(w.id)?;
                    } else {
                        live += 1;
                    }
                }
                if live >= caps::MAX_WRITERS {
                    return Err(caps::too_many(
                        "writers",
                        &user.name,
                        caps::MAX_WRITERS as u64,
                        "let an import or session finish (a writer left by a client that died stops counting 10 minutes after its last heartbeat)",
                    ));
                }
                // Another host than the server's: GC judges it by its heartbeats, not
                // its pid.
                Ok(c.register_writer(
                    req.pid,
                    &format!("{host} via {}", app.host),
                    &format!("{tag}{what}"),
                )?)
            })
        })?;
        Ok(json(&w))
    })
    .await
}

fn own_writer(app: &App, user: &User, id: i64) -> Result<(), ApiError> {
    let tag = writer_tag(&user.name);
    let found = app.catalog(|c| Ok(c.writers()?))?;
    if found.iter().any(|w| w.id == id && w.what.starts_with(&tag)) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no writer {id}")))
    }
}

async fn writer_heartbeat(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    on_writer(&app, caller, id, |c, id| Ok(c.heartbeat(id)?)).await
}

async fn unregister_writer(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    authed(&app, caller, move |app, user| {
        own_writer(app, user, id)?;
        let tag = writer_tag(&user.name);
        app.user_lock(&user.name, || {
            let writers = app.catalog(|c| Ok(c.writers()?))?;
            let started = writers.iter().find(|w| w.id == id).map(|w| w.started_ms);
            app.catalog(|c| Ok(c.unregister_writer(id)?))?;
            // A writer that ends with nothing committed since it began (a failed or
            // interrupted import) gives back the quota its uploads took, unless another
            // writer of the user is live (its commit may need those chunks) or it began
            // before this server (whose commits we did not see).
            let now = mbank_catalog::now_ms();
            let others = writers.iter().any(|w| {
                w.id != id
                    && w.what.starts_with(&tag)
                    && now - w.heartbeat_ms < caps::WRITER_SILENCE_MS
            });
            if let Some(started) = started
                && started > app.started_ms
                && !others
                && app.last_commit(&user.name)?.is_none_or(|c| c < started)
            {
                let n = app.access(|a| Ok(a.drop_uploads_since(&user.name, started)?))?;
                if n > 0 {
                    tracing::info!(user = %user.name, writer = id, chunks = n, "a writer ended with no commit: the quota its uploads took is given back");
                }
            }
            Ok::<(), ApiError>(())
        })?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// Runs `f` on writer `id` if it is the user's (else: no such writer).
async fn on_writer(
    app: &Shared,
    caller: Caller,
    id: i64,
    f: impl FnOnce(&mut Catalog, i64) -> Result<(), ApiError> + Send + 'static,
) -> Result<Response, ApiError> {
    authed(app, caller, move |app, user| {
        own_writer(app, user, id)?;
        app.catalog(|c| f(c, id))?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn have(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ids = match wire::parse_id_list(&body(b)?, wire::MAX_HAVE) {
        Ok(ids) => ids,
        Err(wire::IdListError::Ragged { bytes }) => {
            return Err(ApiError::bad_request(format!(
                "a have query is a list of {}-byte chunk ids; {bytes} bytes is not",
                ChunkId::LEN
            )));
        }
        Err(wire::IdListError::TooMany { ids, max }) => {
            return Err(ApiError::too_large(format!(
                "a have query may ask about at most {max} chunks, not {ids}"
            )));
        }
    };
    let n = ids.len();
    authed(&app, caller, move |app, user| {
        let readable = app.access(|a| Ok(a.readable(user, &ids)?))?;
        // Readable and present: touched (all at once: an S3 store copies each object
        // onto itself), so a GC running now keeps them.
        let (at, asked): (Vec<usize>, Vec<ChunkId>) = ids
            .iter()
            .zip(&readable)
            .enumerate()
            .filter(|(_, (_, ok))| **ok)
            .map(|(i, (id, _))| (i, *id))
            .unzip();
        let present = app.store.touch_many(&asked)?;
        let mut out = vec![0u8; n];
        for (i, p) in at.into_iter().zip(present) {
            out[i] = u8::from(p);
        }
        let hits = out.iter().filter(|&&x| x == 1).count() as u64;
        app.metrics.have_asked.fetch_add(n as u64, Relaxed);
        app.metrics.have_hits.fetch_add(hits, Relaxed);
        Ok(binary(out))
    })
    .await
}

async fn get_chunk(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = chunk_id(&id)?;
    authed(&app, caller, move |app, user| {
        let ok = app.access(|a| Ok(a.readable(user, &[id])?))?;
        if !ok.first().copied().unwrap_or(false) {
            return Err(ApiError::no_chunk(&id));
        }
        let raw = app.store.get_raw(&id)?;
        app.metrics.chunks_served.fetch_add(1, Relaxed);
        Ok(binary(raw))
    })
    .await
}

/// `POST /v1/chunks/get`: each distinct id once, in the order first asked, streamed one
/// chunk at a time, and only as many as fit in [`wire::MAX_GET_BYTES`] (at least one):
/// the answer is a prefix of the distinct ids and the client asks again for the rest.
/// A chunk that cannot be read after the first also ends the answer, so the client's
/// next request reports it.
async fn get_chunks(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b = body(b)?;
    let Ok(mut ids) = wire::parse_id_list(&b, wire::MAX_GET_MANY) else {
        return Err(ApiError::bad_request(format!(
            "a get query is a list of at most {} chunk ids of {} bytes; {} bytes is not",
            wire::MAX_GET_MANY,
            ChunkId::LEN,
            b.len()
        )));
    };
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
    let Some(&first_id) = ids.first() else {
        return Ok(binary(Vec::new()));
    };
    let ids = authed(&app, caller, move |app, user| {
        let ok = app.access(|a| Ok(a.readable(user, &ids)?))?;
        if let Some((id, _)) = ids.iter().zip(&ok).find(|(_, ok)| !**ok) {
            return Err(ApiError::no_chunk(id));
        }
        Ok(ids)
    })
    .await?;
    // One thread reads the chunks in order (a store on S3 keeps several GETs in
    // flight: `get_raw_each`) and streams them; the first chunk's outcome comes back
    // here first, so that a failure to read it is the answer's status.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<(), ApiError>>();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let a = app.clone();
    tokio::task::spawn_blocking(move || {
        let m = &a.metrics;
        // Frames go out in messages of about GET_MESSAGE bytes: one wake-up of the
        // connection's task per message rather than per chunk. A message is sent when
        // full and before the thread takes the next chunk, so what one answer holds is
        // about two messages (or one chunk, when a chunk is larger) and the store's
        // read-ahead window.
        let mut msg: Vec<u8> = Vec::with_capacity(GET_MESSAGE + (64 << 10));
        let mut sent = 0;
        let mut first_tx = Some(first_tx);
        a.store.get_raw_each(&ids, &mut |_, raw| {
            let raw = match (raw, first_tx.take()) {
                (Ok(raw), Some(first)) => {
                    if first.send(Ok(())).is_err() {
                        return ControlFlow::Break(());
                    }
                    raw
                }
                (Ok(raw), None) => raw,
                (Err(e), Some(first)) => {
                    let _ = first.send(Err(e.into()));
                    return ControlFlow::Break(());
                }
                // A chunk after the first that cannot be read ends the answer.
                (Err(_), None) => return ControlFlow::Break(()),
            };
            sent += 4 + raw.len();
            if sent > wire::MAX_GET_BYTES && sent > 4 + raw.len() {
                return ControlFlow::Break(());
            }
            if msg.len() >= GET_MESSAGE {
                let full =
                    std::mem::replace(&mut msg, Vec::with_capacity(GET_MESSAGE + (64 << 10)));
                if tx.blocking_send(Bytes::from(full)).is_err() {
                    return ControlFlow::Break(());
                }
            }
            msg.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            msg.extend_from_slice(&raw);
            m.chunks_served.fetch_add(1, Relaxed);
            m.bytes_out.fetch_add(4 + raw.len() as u64, Relaxed);
            ControlFlow::Continue(())
        });
        if !msg.is_empty() {
            let _ = tx.blocking_send(Bytes::from(msg));
        }
    });
    match first_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(ApiError::internal(format!(
                "the read of chunk {first_id} ended without an answer"
            )));
        }
    }
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::new(ChannelBody(rx)),
    )
        .into_response())
}

/// `POST /v1/chunks/urls`: for each id, a presigned object-store URL of its stored
/// bytes if the user may read it, else `null`, so that a hidden chunk and an absent one
/// get the same answer (a URL is made without looking whether the object exists: a
/// readable chunk the bank lacks answers 404 at the object store). On a bank that makes
/// no URLs: `404 no_direct_reads`, and the client reads through the server.
async fn chunk_urls(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Some(direct) = app.direct.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            wire::NO_DIRECT_READS,
            "this bank hands out no direct chunk URLs (its chunks are not in an object store, or the server runs with --no-direct-reads): fetch them with POST /v1/chunks/get",
        ));
    };
    let b = body(b)?;
    let Ok(ids) = wire::parse_id_list(&b, wire::MAX_URLS) else {
        return Err(ApiError::bad_request(format!(
            "a URL query is a list of at most {} chunk ids of {} bytes; {} bytes is not",
            wire::MAX_URLS,
            ChunkId::LEN,
            b.len()
        )));
    };
    authed(&app, caller, move |app, user| {
        let ok = app.access(|a| Ok(a.readable(user, &ids)?))?;
        let readable: Vec<ChunkId> = ids
            .iter()
            .zip(&ok)
            .filter(|(_, ok)| **ok)
            .map(|(id, _)| *id)
            .collect();
        let issued = std::time::SystemTime::now()
            .checked_sub(direct.age)
            .unwrap_or(std::time::UNIX_EPOCH);
        let made = app
            .store
            .direct_urls(&readable, issued, direct.valid)
            .filter(|u| u.len() == readable.len())
            .ok_or_else(|| ApiError::internal("the bank's store made no direct URLs"))?;
        let mut made = made.into_iter();
        let urls: Vec<Option<String>> = ok
            .iter()
            .map(|&ok| if ok { made.next() } else { None })
            .collect();
        app.metrics
            .chunk_urls
            .fetch_add(readable.len() as u64, Relaxed);
        Ok(json(&wire::ChunkUrls {
            valid_secs: direct.valid.as_secs(),
            urls,
        }))
    })
    .await
}

fn no_direct_writes() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        wire::NO_DIRECT_WRITES,
        "this bank takes no direct chunk uploads (its chunks are not in an object store, or the server runs with --no-direct-writes): send them with POST /v1/chunks",
    )
}

fn upload_list(b: &[u8]) -> Result<Vec<wire::Upload>, ApiError> {
    let list = wire::parse_upload_list(b).ok_or_else(|| {
        ApiError::bad_request(format!(
            "an upload list holds 1 to {} entries of a {}-byte chunk id, a 32-byte SHA-256 and a 4-byte length; {} bytes is not one",
            wire::MAX_DIRECT_UPLOADS,
            ChunkId::LEN,
            b.len()
        ))
    })?;
    if let Some(u) = list
        .iter()
        .find(|u| u.len == 0 || u.len as usize > MAX_STORED_LEN)
    {
        return Err(ApiError::bad_request(format!(
            "chunk {} cannot be {} bytes (1 to {MAX_STORED_LEN})",
            u.id, u.len
        )));
    }
    Ok(list)
}

/// Most uploads one user may have handed out and not confirmed.
const MAX_STAGED_PER_USER: usize = 4096;

/// How long after its URL expired a staged upload is removed (a PUT under way when
/// the URL expired may still be landing).
const STAGED_GRACE_MS: i64 = 60_000;

/// `POST /v1/chunks/upload-urls`: a presigned PUT URL per chunk, bound to the SHA-256
/// of the bytes the client will send (`mbank_store::Staging`). Anyone may upload any
/// chunk (storage is shared); nothing is recorded until `confirm`.
async fn upload_urls(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Some(direct) = app.direct_writes.clone() else {
        return Err(no_direct_writes());
    };
    let list = upload_list(&body(b)?)?;
    authed(&app, caller, move |app, user| {
        let staging = app.store.staging().ok_or_else(no_direct_writes)?;
        let issued = std::time::SystemTime::now()
            .checked_sub(direct.age)
            .unwrap_or(std::time::UNIX_EPOCH);
        let issued_ms = issued
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let expires_ms = issued_ms + direct.valid.as_millis() as i64;
        let need: u64 = list.iter().map(|u| u64::from(u.len)).sum();
        app.user_lock(&user.name, || {
            // Uploads whose URLs expired long enough ago are removed (none can land
            // any more), and stop counting.
            let now = mbank_catalog::now_ms();
            let expired = app.access(|a| Ok(a.expire_staged(&user.name, now - STAGED_GRACE_MS)?))?;
            for s in &expired {
                let _ = staging.discard(&s.sha256);
            }
            let quota = app.access(|a| Ok(a.quota(&user.name)?))?;
            let used = match quota {
                Some(_) => app.usage(&user.name)?,
                None => 0,
            };
            // Handed out by any server sharing the access database.
            let mine = app.access(|a| Ok(a.staged_uploads(&user.name)?))?;
            if mine.len() + list.len() > MAX_STAGED_PER_USER {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "too_many",
                    format!(
                        "{} has {} direct uploads not yet confirmed, and may have at most {MAX_STAGED_PER_USER}: confirm them (POST /v1/chunks/confirm) or upload through POST /v1/chunks",
                        user.name,
                        mine.len()
                    ),
                ));
            }
            let pending: u64 = mine.iter().map(|s| s.len).sum();
            if let Some(quota) = quota
                && used + pending + need > quota
            {
                return Err(mbank_access::AccessError::QuotaExceeded {
                    user: user.name.clone(),
                    used: used + pending,
                    quota,
                    need,
                }
                .into());
            }
            let staged: Vec<StagedUpload> = list
                .iter()
                .map(|u| StagedUpload {
                    sha256: u.sha256,
                    len: u64::from(u.len),
                    expires_ms,
                })
                .collect();
            app.access(|a| Ok(a.stage_uploads(&user.name, &staged)?))
        })?;
        let urls: Vec<String> = list
            .iter()
            .map(|u| staging.put_url(&u.sha256, u64::from(u.len), issued, direct.valid))
            .collect();
        app.metrics
            .upload_urls
            .fetch_add(urls.len() as u64, Relaxed);
        Ok(json(&wire::UploadUrls {
            valid_secs: direct.valid.as_secs(),
            urls,
        }))
    })
    .await
}

/// What reading back one staged upload gave.
type StagedRead = Result<Option<Vec<u8>>, mbank_store::StoreError>;

/// Staged chunks read back at once by one `confirm`.
const CONFIRM_READS: usize = 16;

/// `POST /v1/chunks/confirm`: the chunks the user uploaded by presigned URLs are read
/// back from their staging names, verified (SHA-256 as announced, decoding to content
/// hashing to the id) and then treated as `POST /v1/chunks` treats uploads: the user's
/// rights recorded against the quota in one transaction (refused whole if over it),
/// and those the bank lacks given their chunk names (a copy in the store). One chunk
/// that fails refuses the whole list (`422 bad_chunk`), and its staged bytes are
/// removed. Until this succeeds the user cannot read the chunks, so a commit naming
/// them is refused.
async fn confirm_uploads(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if app.direct_writes.is_none() {
        return Err(no_direct_writes());
    }
    let list = upload_list(&body(b)?)?;
    authed(&app, caller, move |app, user| {
        let staging = app.store.staging().ok_or_else(no_direct_writes)?;
        // Whatever the outcome, these uploads stop counting as handed out, and their
        // staged bytes go (promoted to their chunk names, or removed).
        let shas: Vec<[u8; 32]> = list.iter().map(|u| u.sha256).collect();
        app.access(|a| Ok(a.take_staged(&user.name, &shas)?))?;
        let discard_all = || {
            let _ = in_parallel(list.len(), CONFIRM_READS, |i| staging.discard(&list[i].sha256));
        };
        let bad = |id: &ChunkId, why: String| {
            let mut a = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_chunk",
                format!("the upload of chunk {id} {why}"),
            );
            a.body.chunk = Some(*id);
            a
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        let raws: Vec<Mutex<Option<StagedRead>>> =
            list.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|sc| {
            for _ in 0..CONFIRM_READS.min(list.len()) {
                sc.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        let Some(u) = list.get(i) else {
                            return;
                        };
                        let r = staging.read_staged(&u.sha256);
                        *raws[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                    }
                });
            }
        });
        let mut parts: Vec<(ChunkId, Vec<u8>)> = Vec::with_capacity(list.len());
        for (u, raw) in list.iter().zip(raws) {
            let (id, sha) = (&u.id, &u.sha256);
            let raw = match raw
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every staged chunk was read")
            {
                Ok(r) => r,
                Err(e) => {
                    discard_all();
                    return Err(e.into());
                }
            };
            let checked = match raw {
                None => Err(bad(id, "is not in the store: its PUT failed, or another confirm took it; send it again".into())),
                Some(raw) if raw.len() != u.len as usize || mbank_store::sha256(&raw) != *sha => {
                    Err(bad(id, "holds other bytes than those announced".into()))
                }
                Some(raw) => mbank_core::chunk::decode(id, &raw)
                    .map(|_| raw)
                    .map_err(|e| bad(id, format!("is not that chunk: {e}"))),
            };
            match checked {
                Ok(raw) => parts.push((*id, raw)),
                Err(e) => {
                    discard_all();
                    return Err(e);
                }
            }
        }
        let refs: Vec<(ChunkId, &[u8])> = parts.iter().map(|(id, b)| (*id, &b[..])).collect();
        let stored = record_and_store(app, user, &refs, |fresh| {
            in_parallel(fresh.len(), CONFIRM_READS, |k| {
                let i = fresh[k];
                staging.promote(&list[i].sha256, &list[i].id)
            })
            .map_err(ApiError::from)
        });
        // Staged copies of chunks the bank already had, or of a refused list.
        discard_all();
        let sizes = stored?;
        app.metrics
            .chunks_confirmed
            .fetch_add(list.len() as u64, Relaxed);
        Ok(json(&wire::StoredMany { bytes: sizes }))
    })
    .await
}

/// Runs `f(0..n)` on up to `threads` threads (each a round trip to the object store:
/// a confirm's copies and removals); the first error, after all have run.
fn in_parallel<E: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..threads.min(n) {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= n {
                        return;
                    }
                    if let Err(e) = f(i) {
                        first
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
    });
    match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// About how many bytes of an answer to `POST /v1/chunks/get` go to the connection at
/// once.
const GET_MESSAGE: usize = 256 << 10;

/// A response body fed by a channel, one frame per message.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}

async fn put_chunk(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<String>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = chunk_id(&id)?;
    let b = body(b)?;
    authed(&app, caller, move |app, user| {
        let sizes = store_uploads(app, user, &[(id, &b[..])])?;
        let bytes = sizes[0];
        Ok((StatusCode::CREATED, json(&wire::Stored { bytes })).into_response())
    })
    .await
}

async fn put_chunks(
    State(app): State<Shared>,
    caller: Caller,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b = body(b)?;
    authed(&app, caller, move |app, user| {
        let parts = wire::parse_batch_body(&b).map_err(ApiError::bad_request)?;
        let bytes = store_uploads(app, user, &parts)?;
        Ok((StatusCode::CREATED, json(&wire::StoredMany { bytes })).into_response())
    })
    .await
}

/// Verifies uploaded chunks (each must decode to content hashing to its id), records
/// the user's right to read them in one transaction (charged against their quota,
/// refused whole if over it), and stores those the bank lacks. Returns each one's size.
fn store_uploads(app: &App, user: &User, parts: &[(ChunkId, &[u8])]) -> Result<Vec<u64>, ApiError> {
    record_and_store(app, user, parts, |fresh| {
        let mut chunks = Vec::with_capacity(fresh.len());
        for &i in fresh {
            let (id, bytes) = parts[i];
            let codec = mbank_core::chunk::parse_header(&id, bytes)
                .map(|(c, _)| c)
                .map_err(|e| ApiError::internal(format!("chunk {id}: {e}")))?;
            chunks.push(EncodedChunk {
                id,
                bytes: bytes.to_vec(),
                codec,
            });
        }
        app.store.put_many(&chunks)?;
        if app.shared {
            // Another server may take the commit that names these chunks: it can
            // neither see nor flush this process's pending writes.
            app.store.flush()?;
        }
        Ok(())
    })
}

/// [`store_uploads`]' verification and rights, with `store` giving the chunks the bank
/// lacks (their places in `parts`) their place in the store.
fn record_and_store(
    app: &App,
    user: &User,
    parts: &[(ChunkId, &[u8])],
    store: impl FnOnce(&[usize]) -> Result<(), ApiError>,
) -> Result<Vec<u64>, ApiError> {
    let mut codecs = Vec::with_capacity(parts.len());
    for (id, bytes) in parts {
        let codec = mbank_core::chunk::decode(id, bytes)
            .and_then(|_| mbank_core::chunk::parse_header(id, bytes).map(|(c, _)| c))
            .map_err(|e| {
                let mut a = ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "bad_chunk",
                    format!("the bytes sent are not chunk {id}: {e}"),
                );
                a.body.chunk = Some(*id);
                a
            })?;
        codecs.push(codec);
    }
    let rows: Vec<(ChunkId, u64)> = parts.iter().map(|(id, b)| (*id, b.len() as u64)).collect();
    app.user_lock(&user.name, || {
        let catalog = app.owner_usage(&user.name)?.bytes;
        app.access(|a| Ok(a.record_uploads_beside(user, &rows, catalog)?))
    })?;
    let ids: Vec<ChunkId> = parts.iter().map(|(id, _)| *id).collect();
    let present = app.store.touch_many(&ids)?;
    let mut fresh = Vec::new();
    for (i, have) in present.into_iter().enumerate() {
        if have {
            app.metrics.chunks_dedup.fetch_add(1, Relaxed);
        } else {
            fresh.push(i);
        }
    }
    drop(codecs);
    store(&fresh)?;
    // `gc` on the bank's host forgets rights to chunks that are missing when it looks;
    // it may have looked between the rows above and the store: what it dropped is put
    // back now that the chunks are stored (nothing is written if nothing was dropped).
    app.user_lock(&user.name, || {
        let catalog = app.owner_usage(&user.name)?.bytes;
        app.access(|a| Ok(a.record_uploads_beside(user, &rows, catalog)?))
    })?;
    let stored: u64 = fresh.iter().map(|&i| parts[i].1.len() as u64).sum();
    app.metrics
        .chunks_stored
        .fetch_add(fresh.len() as u64, Relaxed);
    app.metrics.bytes_stored.fetch_add(stored, Relaxed);
    Ok(rows.into_iter().map(|(_, n)| n).collect())
}

/// Opens the bank in `cfg.bank_dir`, binds, and serves until `shutdown` resolves.
/// `ready` is called with the bound address (port 0 picks one) before the first accept.
pub async fn serve(
    cfg: Config,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    // On the blocking pool: a catalog in PostgreSQL is opened by a client that blocks.
    let app = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open_app(&cfg.bank_dir, cfg.limits.clone(), &cfg))
            .await
            .map_err(|e| format!("opening the bank failed: {e}"))??
    };
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None => None,
    };
    let tcp = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let local = tcp
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    ready(local);
    let secure = tls.is_some();
    conn::run(tcp, tls, router(app, secure), cfg.limits, shutdown).await;
    Ok(())
}

fn open_app(bank_dir: &FsPath, limits: Limits, cfg: &Config) -> Result<Shared, String> {
    let peer_signer = match cfg.lan_sharing {
        true => Some(peer::Signer::load_or_create(bank_dir)?),
        false => None,
    };
    // Opening the bank checks its marker and opens its store (a directory or S3).
    let bank = mbank_bank::Bank::open(bank_dir, false).map_err(|e| e.to_string())?;
    let store = bank.store_arc();
    drop(bank);
    // Direct reads need a store that makes URLs (S3); asked with no ids, it says so.
    let direct_writes =
        (cfg.direct_writes && store.staging().is_some()).then(|| cfg.direct_urls.clone());
    if let Some(d) = &direct_writes {
        tracing::info!(
            valid_secs = d.valid.as_secs(),
            "direct writes: stations upload chunks to the object store by presigned URLs"
        );
    }
    let direct = (cfg.direct_reads
        && store
            .direct_urls(&[], std::time::SystemTime::now(), cfg.direct_urls.valid)
            .is_some())
    .then(|| cfg.direct_urls.clone());
    if let Some(d) = &direct {
        tracing::info!(
            valid_secs = d.valid.as_secs(),
            "direct reads: stations fetch chunks from the object store by presigned URLs"
        );
    }
    let access = Access::open(bank_dir).map_err(|e| e.to_string())?;
    let shared = mbank_sql::bank_url(bank_dir)
        .map_err(|e| {
            format!(
                "cannot read {}: {e}",
                bank_dir.join(mbank_sql::URL_FILE).display()
            )
        })?
        .is_some();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "bank".into());
    Ok(Arc::new(App {
        bank_dir: bank_dir.to_path_buf(),
        shared,
        store,
        catalogs: Mutex::new(Vec::new()),
        access: Mutex::new(vec![access]),
        metrics: Metrics::default(),
        host,
        logins: LoginGuard::new(limits.hash_concurrency),
        bodies: BodyBudget::new(limits.body_memory),
        quota_locks: caps::UserLocks::default(),
        console: web::ConsoleState::default(),
        started_ms: mbank_catalog::now_ms(),
        jobs: jobs::Jobs::default(),
        peer_signer,
        limits,
        direct,
        direct_writes,
        pack_builds: Mutex::new(()),
        pack_indexes: mbank_bank::pack::IndexCache::new(),
    }))
}
