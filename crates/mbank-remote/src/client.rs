//! [`Client`]: one bank server, one token, one pool of kept-alive connections, and the
//! retry policy of `docs/api.md`.
//!
//! Every request is safe to repeat (the API promises it), so connection failures and
//! the answers `429`, `502`, `503` and `504` are retried with exponential backoff
//! (0.2 s doubling to 5 s) until the retry budget (`MBANK_RETRY_SECS`, default 120 s)
//! is spent. While it waits the client says so on standard error, at most once every
//! 5 s: `mbank: waiting for the bank at URL (WHAT): CAUSE; retrying`. An unknown host,
//! a TLS failure or a malformed URL is not retried: waiting would not change it.
//!
//! Any other error answer is parsed as [`wire::ErrorBody`] (or, if it is not JSON,
//! described by its status) and returned as [`ClientError::Api`]; the catalog and store
//! adapters turn it into their own error types.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use ureq::http;
use ureq::tls::PemItem;
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{Connector, TcpConnector};

use crate::wire::{self, ErrorBody, Health, LoginRequest, LoginResponse, WhoAmI};

/// The environment variable holding the retry budget in seconds.
pub const RETRY_ENV: &str = "MBANK_RETRY_SECS";
/// The retry budget when [`RETRY_ENV`] is not set.
pub const DEFAULT_RETRY_SECS: u64 = 120;
/// Longest wait for a TCP (and TLS) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time one request may take, from connecting to the end of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer the client reads (a disk index can be as large as a commit).
pub const MAX_ANSWER: u64 = wire::MAX_COMMIT as u64;

/// Most requests one transfer (a [`crate::RemoteStore`] read of many chunks) keeps in
/// flight, each on its own kept-alive connection; well under the server's cap of
/// connections per address (64 by default).
pub const MAX_IN_FLIGHT: usize = 16;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const WARN_EVERY: Duration = Duration::from_secs(5);

/// What went wrong talking to a bank server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error; the message is the server's, for people.
    #[error("{}", .body.message)]
    Api {
        /// The bank's base URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The error answer (`kind` empty when the answer was not the API's JSON).
        body: Box<ErrorBody>,
    },
    /// No answer, after retrying for as long as the retry budget allows (or at once,
    /// for failures that waiting does not cure).
    #[error("cannot reach the bank at {url}: {cause} (tried {} over {secs:.1} s)", times(*.tries))]
    Unreachable {
        /// The bank's base URL.
        url: String,
        /// The last failure.
        cause: String,
        /// Requests sent, the first included.
        tries: u32,
        /// Seconds spent trying.
        secs: f64,
    },
    /// The server answered, but not as the API says it does.
    #[error("the bank at {url} sent an unexpected answer to the {what}: {why}")]
    BadAnswer {
        /// The bank's base URL.
        url: String,
        /// What was asked.
        what: String,
        /// What was wrong with the answer.
        why: String,
    },
    /// A problem on this machine before any request: a malformed URL, an unreadable CA
    /// certificate or credentials file.
    #[error("{0}")]
    Local(String),
}

fn times(n: u32) -> String {
    if n == 1 {
        "once".into()
    } else {
        format!("{n} times")
    }
}

impl ClientError {
    /// The API's error kind, for an error answer.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.kind),
            _ => None,
        }
    }
}

/// How to reach a bank server.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The bearer token sent with every request (`None`: anonymous, for login and
    /// health checks).
    pub token: Option<String>,
    /// A PEM file of CA certificates to trust for `https://` (a bank with its own CA).
    /// When given, these certificates replace the public web roots.
    pub ca_file: Option<PathBuf>,
    /// How long to keep retrying a request that gets no usable answer.
    pub retry_budget: Duration,
    /// See [`CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
}

impl Default for ClientOptions {
    /// No token, the public web roots, a 120 s retry budget, the default timeouts.
    fn default() -> Self {
        ClientOptions {
            token: None,
            ca_file: None,
            retry_budget: Duration::from_secs(DEFAULT_RETRY_SECS),
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

impl ClientOptions {
    /// The defaults, with the retry budget from `MBANK_RETRY_SECS` when it is set.
    pub fn from_env() -> Self {
        let mut o = ClientOptions::default();
        if let Some(secs) = std::env::var(RETRY_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
        {
            o.retry_budget = Duration::from_secs_f64(secs);
        }
        o
    }
}

/// A bank server's client: cheap to clone (the clones share one connection pool).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// `http(s)://host:port`, no trailing slash.
    url: String,
    token: Option<String>,
    /// The `--ca-cert` in use, for messages.
    ca_file: Option<PathBuf>,
    /// With no token: the URLs the credentials file has tokens for, for messages.
    filed_elsewhere: Vec<String>,
    agent: ureq::Agent,
    retry_budget: Duration,
    /// When the last "waiting for the bank" line went to standard error.
    last_warning: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.url)
            .field("token", &self.inner.token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// A request body.
pub(crate) enum Payload<'a> {
    Empty,
    Json(Vec<u8>),
    Bytes(&'a [u8]),
}

/// True when `s` names a bank server (`http://…` or `https://…`), not a directory.
pub fn is_url(s: &str) -> bool {
    let l = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    l.starts_with("http://") || l.starts_with("https://")
}

/// `url` without trailing slashes: the form credentials are filed under.
pub fn normalize_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

/// Percent-encodes one path segment or query value (everything but unreserved bytes).
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn load_ca(path: &Path) -> Result<rustls::ClientConfig, ClientError> {
    let local = |why: String| {
        ClientError::Local(format!(
            "cannot use {} as the bank's CA certificate: {why}",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| local(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let PemItem::Certificate(c) = item.map_err(|e| local(e.to_string()))? {
            certs.push(rustls::pki_types::CertificateDer::from(c.der().to_vec()));
        }
    }
    if certs.is_empty() {
        return Err(local("it holds no PEM certificate".into()));
    }
    crate::tls::pinned_config(certs).map_err(local)
}

/// The rustls error inside a ureq error, if any.
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    }
}

/// True for failures that may go away by waiting: the server down or restarting, the
/// network interrupted, a timeout. Not a TLS failure (an unknown issuer, a peer that does
/// not speak TLS): rustls reports those as I/O errors of kind `InvalidData`.
fn retryable(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Io(io) if io.kind() != std::io::ErrorKind::InvalidData)
        || matches!(
            e,
            ureq::Error::Timeout(_)
                | ureq::Error::ConnectionFailed
                | ureq::Error::Protocol(_)
                | ureq::Error::BodyStalled
        )
}

fn status_text(status: u16) -> String {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("HTTP {status} {reason}").trim_end().to_string()
}

/// An error answer as the API's [`ErrorBody`], or one made from the status when the
/// answer is not the API's JSON (a proxy's page, say).
pub(crate) fn error_body(status: u16, body: &[u8]) -> ErrorBody {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) if !b.kind.is_empty() => b,
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string();
            ErrorBody {
                kind: if status == 401 {
                    "unauthorized".into()
                } else {
                    String::new()
                },
                message: if text.is_empty() || text.starts_with('<') {
                    status_text(status)
                } else {
                    format!("{}: {text}", status_text(status))
                },
                ..ErrorBody::default()
            }
        }
    }
}

impl Client {
    /// A client of the bank at `url` (`http://host:port` or `https://host:port`), with
    /// `token` and an optional CA file, and the retry budget from `MBANK_RETRY_SECS`.
    /// Makes no request.
    pub fn new(
        url: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let mut o = ClientOptions::from_env();
        o.token = token;
        o.ca_file = ca_file.map(Path::to_path_buf);
        Client::with_options(url, o)
    }

    /// A client of the bank at `url` configured by `o`. Makes no request.
    pub fn with_options(url: &str, o: ClientOptions) -> Result<Self, ClientError> {
        let url = normalize_url(url);
        if !is_url(&url) || url.contains(['?', '#', ' ']) {
            return Err(ClientError::Local(format!(
                "{url:?} is not a bank URL: expected http://HOST:PORT or https://HOST:PORT"
            )));
        }
        let cfg = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(o.request_timeout))
            .timeout_connect(Some(o.connect_timeout))
            .max_redirects(0)
            // Every thread of a transfer keeps its connection between requests.
            .max_idle_connections(2 * MAX_IN_FLIGHT)
            .max_idle_connections_per_host(2 * MAX_IN_FLIGHT)
            .user_agent(concat!("mbank/", env!("CARGO_PKG_VERSION")));
        let agent = match &o.ca_file {
            // The bank's own certificate or CA: trusted and pinned (tls.rs).
            Some(ca) => {
                let config = Arc::new(load_ca(ca)?);
                let connector =
                    ().chain(TcpConnector::default())
                        .chain(crate::tls::PinnedConnector { config });
                ureq::Agent::with_parts(cfg.build(), connector, DefaultResolver::default())
            }
            None => cfg.build().new_agent(),
        };
        Ok(Client {
            inner: Arc::new(Inner {
                url,
                token: o.token,
                ca_file: o.ca_file,
                filed_elsewhere: Vec::new(),
                agent,
                retry_budget: o.retry_budget,
                last_warning: Mutex::new(None),
            }),
        })
    }

    /// The same client, told which URLs the credentials file has tokens for (when it
    /// has none for this one), so that a refusal can say so.
    pub fn with_filed_elsewhere(mut self, urls: Vec<String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.filed_elsewhere = urls;
        }
        self
    }

    /// What a `401` means for this client: no token, or the server's word on the one
    /// it sent; with the command that gets a new one.
    fn unauthorized_message(&self, server: &str) -> String {
        let url = &self.inner.url;
        let login = format!("mbank login {url} --user NAME");
        if self.inner.token.is_none() {
            let mut m = format!("no token for {url}: log in first with `{login}`");
            if !self.inner.filed_elsewhere.is_empty() {
                m.push_str(&format!(
                    " (tokens are filed for {}: a token is used only with the URL it was made for, \
                     or another spelling of the same loopback address)",
                    self.inner.filed_elsewhere.join(", ")
                ));
            }
            return m;
        }
        let why = server
            .trim_end_matches("; log in again with `mbank login`")
            .trim_end_matches('.');
        format!("{why}; log in again with `{login}`")
    }

    /// The bank's base URL, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// True when requests carry a token.
    pub fn has_token(&self) -> bool {
        self.inner.token.is_some()
    }

    /// `GET /v1/health`: the server's version (no token needed).
    pub fn health(&self) -> Result<Health, ClientError> {
        self.get_json("/health", "health check")
    }

    /// `GET /v1/whoami`: the token's user, whether an administrator, quota and use.
    pub fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.get_json("/whoami", "who-am-I question")
    }

    /// `POST /v1/admin/jobs`: starts `job` (`gc`, `verify`, `stats`) on the server's
    /// bank (administrators only); a job of that kind already running is answered.
    pub fn start_job(&self, job: &str) -> Result<wire::Job, ClientError> {
        let req = wire::JobRequest { job: job.into() };
        self.send_json(
            http::Method::POST,
            "/admin/jobs",
            &format!("start of {job}"),
            &req,
        )
    }

    /// `GET /v1/admin/jobs/{id}`: a job's progress, or its outcome.
    pub fn job(&self, id: u64) -> Result<wire::Job, ClientError> {
        self.get_json(&format!("/admin/jobs/{id}"), "job's progress")
    }

    /// `GET /v1/admin/users`: every user with quota and usage (administrators only).
    pub fn users(&self) -> Result<Vec<serde_json::Value>, ClientError> {
        self.get_json("/admin/users", "list of users")
    }

    /// `PUT /v1/admin/users/{name}/quota`: sets a user's quota (`None`: no bound).
    pub fn set_quota(&self, user: &str, quota: Option<u64>) -> Result<(), ClientError> {
        let json = serde_json::to_vec(&wire::QuotaBody { quota }).expect("serialises");
        self.call(
            http::Method::PUT,
            &format!("/admin/users/{}/quota", seg(user)),
            "quota change",
            Payload::Json(json),
            1 << 16,
        )
        .map(drop)
    }

    /// `POST /v1/login`: a new token for `user`. `ttl_secs` defaults (server side) to
    /// 30 days; `label` names the token for people (e.g. the host it was made for).
    pub fn login(
        &self,
        user: &str,
        password: &str,
        ttl_secs: Option<u64>,
        label: Option<String>,
    ) -> Result<LoginResponse, ClientError> {
        let req = LoginRequest {
            user: user.into(),
            password: password.into(),
            ttl_secs,
            label,
        };
        self.send_json(http::Method::POST, "/login", "login", &req)
    }

    /// `POST /v1/logout`: revokes the token this client uses.
    pub fn logout(&self) -> Result<(), ClientError> {
        self.call(
            http::Method::POST,
            "/logout",
            "logout",
            Payload::Empty,
            1 << 16,
        )
        .map(drop)
    }

    /// GETs `path` (under `/v1`) and parses the JSON answer.
    pub(crate) fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
    ) -> Result<T, ClientError> {
        let body = self.call(http::Method::GET, path, what, Payload::Empty, MAX_ANSWER)?;
        self.parse(&body, what)
    }

    /// Sends `body` as JSON and parses the JSON answer.
    pub(crate) fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: http::Method,
        path: &str,
        what: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let json = serde_json::to_vec(body).expect("a request body always serialises");
        let answer = self.call(method, path, what, Payload::Json(json), MAX_ANSWER)?;
        self.parse(&answer, what)
    }

    /// Parses a JSON answer.
    pub(crate) fn parse<T: DeserializeOwned>(
        &self,
        body: &[u8],
        what: &str,
    ) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::BadAnswer {
            url: self.inner.url.clone(),
            what: what.into(),
            why: format!("not the expected JSON ({e})"),
        })
    }

    /// An error for an answer that breaks the API.
    pub(crate) fn bad_answer(&self, what: &str, why: String) -> ClientError {
        ClientError::BadAnswer {
            url: self.inner.url.clone(),
            what: what.into(),
            why,
        }
    }

    /// Sends one request, retrying as the module docs say; returns a success's body
    /// (at most `limit` bytes). `what` says what the request is for, for people.
    pub(crate) fn call(
        &self,
        method: http::Method,
        path: &str,
        what: &str,
        payload: Payload<'_>,
        limit: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let mut tries = self.tries();
        loop {
            let cause = match self.open(&method, path, &payload, &mut tries)? {
                Opened::Body(body) => {
                    let mut out = Vec::new();
                    match body.take(limit + 1).read_to_end(&mut out) {
                        Ok(_) if out.len() as u64 > limit => {
                            return Err(self.bad_answer(what, format!("longer than {limit} bytes")));
                        }
                        Ok(_) => return Ok(out),
                        Err(e) => e.to_string(),
                    }
                }
                Opened::Retry(cause) => cause,
            };
            self.wait(&mut tries, what, cause)?;
        }
    }

    /// The retry state of one request (or of one streamed transfer made of several).
    pub(crate) fn tries(&self) -> Tries {
        Tries {
            started: Instant::now(),
            backoff: FIRST_BACKOFF,
            sent: 0,
        }
    }

    /// After a failure that waiting may cure (`cause`): waits with backoff, saying so
    /// at most once every 5 s, or gives up with [`ClientError::Unreachable`] when the
    /// retry budget is spent.
    pub(crate) fn wait(&self, t: &mut Tries, what: &str, cause: String) -> Result<(), ClientError> {
        if t.started.elapsed() + t.backoff > self.inner.retry_budget {
            return Err(self.unreachable(cause, t.sent, t.started));
        }
        self.warn(what, &cause);
        std::thread::sleep(t.backoff);
        t.backoff = (t.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }

    /// Sends one request and reads its status: a success's body, unread, to stream from
    /// (the connection goes back to the pool once it is read to its end); a failure
    /// that waiting may cure as [`Opened::Retry`]; any other failure as the error.
    pub(crate) fn open(
        &self,
        method: &http::Method,
        path: &str,
        payload: &Payload<'_>,
        t: &mut Tries,
    ) -> Result<Opened, ClientError> {
        t.sent += 1;
        let resp = match self.send_once(method, path, payload) {
            Ok(resp) => resp,
            Err(e) if retryable(&e) => return Ok(Opened::Retry(e.to_string())),
            Err(e) => return Err(self.unreachable(self.describe(&e), t.sent, t.started)),
        };
        let status = resp.status().as_u16();
        let mut body = resp.into_body().into_reader();
        if (200..300).contains(&status) {
            return Ok(Opened::Body(body));
        }
        // Error answers are small; read a little of them.
        let mut out = Vec::new();
        if let Err(e) = (&mut body).take(1 << 16).read_to_end(&mut out) {
            return Ok(Opened::Retry(e.to_string()));
        }
        let mut b = error_body(status, &out);
        // A refused login is a wrong user or password, said as the server says it.
        if status == 401 && path != "/login" {
            b.message = self.unauthorized_message(&b.message);
        }
        if matches!(status, 429 | 502 | 503 | 504) {
            return Ok(Opened::Retry(if b.kind.is_empty() {
                b.message
            } else {
                format!("{}: {}", status_text(status), b.message)
            }));
        }
        if status == 400 && b.kind == "use_https" {
            return Err(ClientError::Local(format!(
                "the bank at {} speaks TLS: use {}",
                self.inner.url,
                self.inner.url.replacen("http://", "https://", 1)
            )));
        }
        Err(ClientError::Api {
            url: self.inner.url.clone(),
            status,
            body: Box::new(b),
        })
    }

    /// A failure that waiting does not cure, with what to do about it: a certificate
    /// this machine does not trust, a server that does not speak TLS.
    fn describe(&self, e: &ureq::Error) -> String {
        let https = self.inner.url.starts_with("https://");
        match rustls_error(e) {
            Some(rustls::Error::InvalidCertificate(why)) => match &self.inner.ca_file {
                None => format!(
                    "the bank's certificate is not signed by an authority this machine trusts ({why:?}): \
                     give the bank's certificate (or its CA's) with --ca-cert FILE, \
                     e.g. mbank login {} --user NAME --ca-cert FILE (it is remembered with the token)",
                    self.inner.url
                ),
                Some(ca) => format!(
                    "the bank's certificate is neither the one in {} nor signed by it ({why:?}): \
                     is that the bank's certificate, and is {} the bank?",
                    ca.display(),
                    self.inner.url
                ),
            },
            Some(rustls::Error::InvalidMessage(_)) if https => {
                format!(
                    "the server at {} does not speak TLS ({e}): if it serves plain HTTP, use {}",
                    self.inner.url,
                    self.inner.url.replacen("https://", "http://", 1)
                )
            }
            _ => e.to_string(),
        }
    }

    fn unreachable(&self, cause: String, tries: u32, started: Instant) -> ClientError {
        ClientError::Unreachable {
            url: self.inner.url.clone(),
            cause,
            tries,
            secs: started.elapsed().as_secs_f64(),
        }
    }

    /// Says on standard error what the client waits for, at most once every 5 s.
    fn warn(&self, what: &str, cause: &str) {
        let mut last = self
            .inner
            .last_warning
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            eprintln!(
                "mbank: waiting for the bank at {} ({what}): {cause}; retrying",
                self.inner.url
            );
        }
    }

    fn send_once(
        &self,
        method: &http::Method,
        path: &str,
        payload: &Payload<'_>,
    ) -> Result<http::Response<ureq::Body>, ureq::Error> {
        let url = format!("{}{}{path}", self.inner.url, wire::PREFIX);
        let mut b = http::Request::builder().method(method.clone()).uri(&url);
        if let Some(t) = &self.inner.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let agent = &self.inner.agent;
        Ok(match payload {
            Payload::Empty if *method == http::Method::GET => agent.run(b.body(())?)?,
            // An explicit empty body: `content-length: 0`, not a chunked nothing.
            Payload::Empty => agent.run(b.body(&[][..])?)?,
            Payload::Json(json) => agent.run(
                b.header("content-type", "application/json")
                    .body(json.as_slice())?,
            )?,
            Payload::Bytes(bytes) => agent.run(
                b.header("content-type", "application/octet-stream")
                    .body(*bytes)?,
            )?,
        })
    }
}

/// The retry state of a request: when it started, the next wait, requests sent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tries {
    started: Instant,
    backoff: Duration,
    sent: u32,
}

/// What [`Client::open`] got.
pub(crate) enum Opened {
    /// A success's body, to read.
    Body(ureq::BodyReader<'static>),
    /// A failure that waiting may cure, described for people.
    Retry(String),
}
