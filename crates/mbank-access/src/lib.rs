//! # mbank-access
//!
//! The access-control database of a bank served over HTTP: who may log in, with which
//! token, which machines and chunks each user may read, how much each user may store,
//! and which machines an administrator published. One database through
//! [`mbank_sql::Db`]: by default SQLite, `access.db` in the bank directory beside the
//! catalog; or PostgreSQL, when the bank directory's `postgres.url` names a database
//! ([`mbank_sql::bank_url`]), so that several `mbank serve` processes share one bank.
//! The HTTP server opens one [`Access`] per worker thread ([`Access::open`] is cheap)
//! and calls it for every request.
//!
//! ## Users and passwords
//!
//! A user name is what the user part of a [`MachineName`] may be (1 to 32 characters
//! from `a-z 0-9 _ -`, starting with a letter or digit; [`check_user_name`]), so user
//! `alice` owns exactly the machines `alice/*`. Passwords have at least 8 characters
//! (and at most 1024 bytes) and are stored only as argon2id PHC strings (default
//! parameters, a random 16-byte salt). An administrator (`admin` flag) may read and
//! write every machine and chunk.
//!
//! ## Tokens
//!
//! [`Access::login`] checks a password and issues a token `mbt_<id>_<secret>`: a random
//! 16-byte id and a random 32-byte secret, both in lowercase hex. Only the BLAKE3 hash
//! of the secret is stored, and it is compared in constant time. A token is valid while
//! it is not expired, not revoked, and its user still exists. Every way a token or a
//! password can be wrong (malformed, unknown id, wrong secret, expired, revoked, user
//! removed, unknown user, wrong password) gives the same [`AccessError::Unauthorized`],
//! whose message does not say which check failed; a login for an unknown user still
//! runs one argon2 verification so that its time does not tell either. Changing a
//! password revokes the user's tokens; removing a user deletes them; disabling a user
//! ([`Access::set_disabled`]) revokes them and refuses logins until enabled again.
//!
//! ## Reading: isolation (DESIGN invariant 7)
//!
//! - A user may read a machine that is their own (`m.user() == user`), that an
//!   administrator published, or any machine if they are an administrator
//!   ([`Access::can_read_machine`]); they may write only their own
//!   ([`Access::can_write_machine`]).
//! - A user may read a chunk only if `chunk_owners` has a row for that user or for
//!   [`PUBLIC`] ([`Access::readable`]). Rows come from uploads ([`Access::record_upload`],
//!   charged to the quota), from grants of chunks a user's committed version references
//!   without having sent them, e.g. those of a published base it forked
//!   ([`Access::grant`], uncharged), and from publishing ([`Access::publish`], owner
//!   [`PUBLIC`], uncharged). Storage stays deduplicated across users: a chunk another
//!   user already sent is stored once, but a user gets a row only by sending its bytes
//!   (proving they have them) or by referencing it from something they can read. So
//!   "which of these chunks are missing?" must be answered per user from
//!   [`Access::readable`], never from the store alone.
//! - Publishing records the machine and grants the chunks of all its versions (disk
//!   indexes and streams) to [`PUBLIC`]; run it again after the machine gets new
//!   versions. Unpublishing forgets the machine and drops the [`PUBLIC`] rows no other
//!   published machine contributed (the table `published_chunks` remembers which
//!   machine contributed which public chunk). Users who forked it keep their grants.
//!
//! ## Quotas
//!
//! A user's usage is the sum of the stored sizes of the chunks charged to them: a chunk
//! counts once per user, when they first send it, and never when it was granted.
//! [`Access::record_upload`] fails with [`AccessError::QuotaExceeded`] before recording
//! anything when the upload would go over. [`Access::prune`] drops the rows of chunks
//! that garbage collection deleted, which gives the space back. The bank server also
//! counts what a user's versions cost in the catalog, which this database does not
//! hold: it passes that to [`Access::record_uploads_beside`].
//!
//! `access.db` is created 0600: it holds password hashes.
//!
//! ## Several servers
//!
//! What the bank server must know across servers sharing the database lives here too:
//! a per-user lock held while a user's quota is checked and what it pays for recorded
//! ([`Access::with_user_lock`]: a session advisory lock on PostgreSQL; on SQLite, which
//! one server owns, the server's own lock serves), when each user last began a commit
//! ([`Access::note_commit`], [`Access::last_commit`]: a writer released with no commit
//! since it began gives its uploads' quota back), and the direct uploads handed out and
//! not yet confirmed ([`Access::stage_uploads`], [`Access::take_staged`],
//! [`Access::expire_staged`]: they count against the quota until then).
//!
//! ## Concurrency and crashes
//!
//! SQLite: WAL journal, `synchronous=FULL`, a 5 s busy timeout; every read-modify-write
//! runs in a `BEGIN IMMEDIATE` transaction, so several connections (threads or processes)
//! may use the database at once. PostgreSQL: every write transaction first takes the
//! access domain's advisory lock ([`mbank_sql::ACCESS_DOMAIN`]), which gives the same
//! one-writer-at-a-time guarantee across servers; a lookup of many chunks reads one
//! snapshot (`REPEATABLE READ`). A crash leaves the database as of its last commit.
//!
//! ## Schema
//!
//! SQLite: `PRAGMA application_id` holds [`APPLICATION_ID`] (the magic, `MBAC`) and
//! `PRAGMA user_version` the schema version; [`Access::open`] creates or migrates the
//! schema forward and refuses a newer one or a database of another application.
//! PostgreSQL: the table `access_schema` holds the version; [`Access::open`] creates
//! the whole schema when it is missing (once, under the domain's lock) and refuses a
//! newer one. The tables are documented in `docs/formats.md`.

use std::collections::HashSet;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use mbank_core::{ChunkId, MachineName};
use mbank_sql::{Behavior, Db, Dialect, OptionalExtension, ToSql, Tx, Value, params};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

/// Schema version this code writes (SQLite: `PRAGMA user_version`; PostgreSQL: the
/// table `access_schema`).
pub const SCHEMA_VERSION: i64 = 5;

/// `PRAGMA application_id` of an access database: `MBAC` in ASCII.
pub const APPLICATION_ID: i32 = 0x4d42_4143;

/// File name of the access database inside the bank directory.
pub const FILE_NAME: &str = "access.db";

/// The owner name that holds the chunks of published machines; no user can have it.
pub const PUBLIC: &str = "";

/// Shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Longest password accepted, in bytes (a bound on the work a login costs).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Longest token label kept, in bytes; longer labels are cut.
pub const MAX_LABEL_BYTES: usize = 128;

/// Prefix of every token string.
pub const TOKEN_PREFIX: &str = "mbt_";

const SCHEMA_V1: &str = "
CREATE TABLE users (
    name        TEXT PRIMARY KEY,
    phc         TEXT NOT NULL,
    admin       INTEGER NOT NULL,
    quota_bytes INTEGER,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    secret_hash BLOB NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER,
    label       TEXT NOT NULL
);
CREATE INDEX tokens_by_user ON tokens (user);
CREATE TABLE chunk_owners (
    user        TEXT NOT NULL,
    chunk       BLOB NOT NULL,
    bytes       INTEGER NOT NULL,
    charged     INTEGER NOT NULL,
    PRIMARY KEY (user, chunk)
) WITHOUT ROWID;
CREATE TABLE published (
    machine     TEXT PRIMARY KEY,
    by          TEXT NOT NULL,
    since_ms    INTEGER NOT NULL
);
CREATE TABLE published_chunks (
    machine     TEXT NOT NULL,
    chunk       BLOB NOT NULL,
    PRIMARY KEY (machine, chunk)
) WITHOUT ROWID;
CREATE INDEX published_chunks_by_chunk ON published_chunks (chunk);
";

/// Version 2: when each right was last recorded, so that garbage collection's pruning
/// leaves alone the rights of chunks a writer in flight sent (see [`Access::prune`]).
const SCHEMA_V2: &str = "
ALTER TABLE chunk_owners ADD COLUMN recorded_ms INTEGER NOT NULL DEFAULT 0;
";

/// Version 3: a user an administrator disabled cannot log in, and their tokens do not
/// authenticate, until enabled again ([`Access::set_disabled`]).
const SCHEMA_V3: &str = "
ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
";

/// Version 4: when each right was first recorded, so that the rights a failed import
/// paid for can be given back when its writer ends (see [`Access::drop_uploads_since`]).
const SCHEMA_V4: &str = "
ALTER TABLE chunk_owners ADD COLUMN first_ms INTEGER NOT NULL DEFAULT 0;
";

/// Version 5: what must hold across several bank servers sharing the database: when
/// each user last began a commit ([`Access::note_commit`]) and the direct uploads handed
/// out and not yet confirmed ([`Access::stage_uploads`]).
const SCHEMA_V5: &str = "
CREATE TABLE last_commits (
    user        TEXT PRIMARY KEY,
    began_ms    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE staged_uploads (
    user        TEXT NOT NULL,
    sha256      BLOB NOT NULL,
    bytes       INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    PRIMARY KEY (user, sha256)
) WITHOUT ROWID;
";

/// The whole schema on PostgreSQL, created at once at [`SCHEMA_VERSION`]: the SQLite
/// tables with PostgreSQL's types (`user` is a reserved word there, hence quoted), and
/// `access_schema` holding the version.
const SCHEMA_PG: &str = r#"
CREATE TABLE access_schema (
    version     BIGINT NOT NULL
);
CREATE TABLE users (
    name        TEXT PRIMARY KEY,
    phc         TEXT NOT NULL,
    admin       BIGINT NOT NULL,
    quota_bytes BIGINT,
    created_ms  BIGINT NOT NULL,
    disabled    BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    "user"      TEXT NOT NULL,
    secret_hash BYTEA NOT NULL,
    created_ms  BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    revoked_ms  BIGINT,
    label       TEXT NOT NULL
);
CREATE INDEX tokens_by_user ON tokens ("user");
CREATE TABLE chunk_owners (
    "user"      TEXT NOT NULL,
    chunk       BYTEA NOT NULL,
    bytes       BIGINT NOT NULL,
    charged     BIGINT NOT NULL,
    recorded_ms BIGINT NOT NULL DEFAULT 0,
    first_ms    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY ("user", chunk)
);
CREATE INDEX chunk_owners_by_chunk ON chunk_owners (chunk);
CREATE TABLE published (
    machine     TEXT PRIMARY KEY,
    by          TEXT NOT NULL,
    since_ms    BIGINT NOT NULL
);
CREATE TABLE published_chunks (
    machine     TEXT NOT NULL,
    chunk       BYTEA NOT NULL,
    PRIMARY KEY (machine, chunk)
);
CREATE INDEX published_chunks_by_chunk ON published_chunks (chunk);
CREATE TABLE last_commits (
    "user"      TEXT PRIMARY KEY,
    began_ms    BIGINT NOT NULL
);
CREATE TABLE staged_uploads (
    "user"      TEXT NOT NULL,
    sha256      BYTEA NOT NULL,
    bytes       BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    PRIMARY KEY ("user", sha256)
);
"#;

/// A right recorded less than this long ago is not recorded again by an upload: a
/// pruning GC's cutoff is at least 1 s before the start of every writer in flight, so a
/// right this recent is after it.
const RECORD_AGAIN_AFTER_MS: i64 = 500;

/// An argon2id hash (default parameters) of a random password nobody knows: a login
/// for an unknown user is verified against it so that it costs as much as a real one.
const DUMMY_PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$CY+dNWhynPM0Su+iVIfiwA$bsI77qB3N9f9gXDvsbTXRP2wb5U5Ifj2lAVt92gtxYc";

/// What went wrong. Messages name the action, the object and what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Any failure of a token or a password; deliberately says no more (HTTP 401).
    #[error(
        "the token or password is not valid (wrong, expired or revoked); log in again with `mbank login`"
    )]
    Unauthorized,
    /// A token whose secret matches but whose lifetime is over (HTTP 401). Said only to
    /// the token's holder: nobody else knows its secret.
    #[error("your token expired at {} UTC; log in again with `mbank login`", mbank_core::utc_datetime(*.0))]
    TokenExpired(i64),
    /// A token whose secret matches but that was revoked (a logout, a password change,
    /// an administrator; HTTP 401). Said only to the token's holder.
    #[error("your token was revoked at {} UTC (by a logout, a password change or an administrator); log in again with `mbank login`", mbank_core::utc_datetime(*.0))]
    TokenRevoked(i64),
    /// No user has this name.
    #[error("there is no user {0:?}; `mbank admin user ls` lists them")]
    UnknownUser(String),
    /// `add_user` of a name that is taken.
    #[error(
        "user {0:?} exists already; choose another name, or change its password with `mbank admin user passwd {0}`"
    )]
    UserExists(String),
    /// A user name that is not a valid user part of a machine name.
    #[error("user name {name:?} is invalid: {why}")]
    BadName {
        /// The name as given (cut to 80 characters).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An upload that would take the user over their quota; nothing was recorded.
    #[error(
        "{user} would go over their quota: {} of {} used and this needs {} more; remove versions with `mbank rm` and wait for the administrator's gc, or ask the administrator for a larger quota (`mbank admin user quota {user} SIZE`)",
        human(*used), human(*quota), human(*need)
    )]
    QuotaExceeded {
        /// The user.
        user: String,
        /// Bytes charged to the user now.
        used: u64,
        /// The user's quota in bytes.
        quota: u64,
        /// Bytes the refused upload would add.
        need: u64,
    },
    /// A password that is empty, shorter than 8 characters or longer than 1024 bytes.
    #[error("a password must have at least 8 characters (and at most 1024 bytes)")]
    WeakPassword,
    /// The database is newer than this code.
    #[error(
        "access database schema version {0} is newer than this mbank understands ({SCHEMA_VERSION}); upgrade mbank"
    )]
    TooNew(i64),
    /// The file is not an access database.
    #[error("{} is not a Machine Bank access database (application id {found:#x})", path.display())]
    NotAccessDb {
        /// The file.
        path: PathBuf,
        /// The application id found in it.
        found: i32,
    },
    /// A row that this code could not have written.
    #[error("access database row is malformed: {0}")]
    BadRow(String),
    /// Hashing a password failed (should not happen with valid parameters).
    #[error("could not hash the password: {0}")]
    Hash(String),
    /// A file operation on the access database failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// The database (SQLite or PostgreSQL) failed.
    #[error("could not {action} in the access database: {source}")]
    Sqlite {
        /// What was being done.
        action: &'static str,
        /// The database's error.
        source: mbank_sql::Error,
    },
}

impl AccessError {
    /// True for [`AccessError::Unauthorized`] (the server answers 401).
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            AccessError::Unauthorized | AccessError::TokenExpired(_) | AccessError::TokenRevoked(_)
        )
    }

    /// True for a database that is busy (SQLite's "busy"/"locked", PostgreSQL's lock
    /// timeout) or a PostgreSQL server out of reach, which a retry may get past.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AccessError::Sqlite { source, .. } if source.is_retryable())
    }
}

fn sql(action: &'static str) -> impl Fn(mbank_sql::Error) -> AccessError {
    move |source| AccessError::Sqlite { action, source }
}

/// [`sql`] for a call on the SQLite connection itself (pragmas).
fn lite(action: &'static str) -> impl Fn(rusqlite::Error) -> AccessError {
    move |e| AccessError::Sqlite {
        action,
        source: e.into(),
    }
}

/// True if the query returns a row.
fn exists(db: &Db, q: &str, p: mbank_sql::Params<'_>) -> mbank_sql::Result<bool> {
    Ok(!db.query_all(q, p)?.is_empty())
}

/// Chunk ids a query looks up at once (`chunk IN (…)`): a round trip per batch rather
/// than per chunk, which matters on PostgreSQL.
const LOOKUP_BATCH: usize = 512;

/// The chunks of `ids` that `select` (a query of `chunk` ending in `chunk IN`, taking
/// `first` as `?1`, `?2`) returns, looked up in batches.
fn chunks_among(
    db: &Db,
    select: &str,
    first: [&dyn ToSql; 2],
    ids: &[ChunkId],
) -> mbank_sql::Result<HashSet<Vec<u8>>> {
    let mut found = HashSet::new();
    for batch in ids.chunks(LOOKUP_BATCH) {
        // A batch is padded with a repeat to a power of two: a handful of statements
        // in all, and a short list for a short batch (each is planned when it runs).
        let n = batch.len().next_power_of_two();
        let marks: Vec<String> = (3..3 + n).map(|i| format!("?{i}")).collect();
        let q = format!("{select} ({})", marks.join(", "));
        let mut p: Vec<&dyn ToSql> = first.to_vec();
        p.extend((0..n).map(|i| batch[i.min(batch.len() - 1)].as_bytes() as &dyn ToSql));
        for r in db.query_all(&q, &p)? {
            found.insert(r.get::<_, Vec<u8>>(0)?);
        }
    }
    Ok(found)
}

/// The key of `user`'s PostgreSQL advisory lock ([`Access::with_user_lock`]).
fn user_lock_key(user: &str) -> i64 {
    let h = blake3::hash(format!("mbank-access user lock {user}").as_bytes());
    i64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// `1536` → `1.5 KiB`, for messages.
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Checks that `name` can be a user name: exactly the rule for the user part of a
/// [`MachineName`] (1 to 32 characters from `a-z 0-9 _ -`, starting with a letter or digit).
pub fn check_user_name(name: &str) -> Result<(), AccessError> {
    let ok = !name.contains('/') && format!("{name}/x").parse::<MachineName>().is_ok();
    if ok {
        Ok(())
    } else {
        Err(AccessError::BadName {
            name: name.chars().take(80).collect(),
            why: "a user name has 1 to 32 characters from a-z, 0-9, '_' and '-', and starts with a letter or digit",
        })
    }
}

fn check_password(password: &str) -> Result<(), AccessError> {
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(AccessError::WeakPassword);
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS random source failing is not something a caller can act on.
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    b
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Lowercase hex only (tokens are issued lowercase; anything else is malformed).
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(s[2 * i])? << 4) | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

/// Splits `mbt_<32 hex>_<64 hex>` into id and secret; `None` for anything else.
fn parse_token(token: &str) -> Option<([u8; 16], [u8; 32])> {
    let b = token.as_bytes();
    let rest = b.strip_prefix(TOKEN_PREFIX.as_bytes())?;
    if rest.len() != 32 + 1 + 64 || rest[32] != b'_' {
        return None;
    }
    Some((unhex::<16>(&rest[..32])?, unhex::<32>(&rest[33..])?))
}

fn hash_password(password: &str) -> Result<String, AccessError> {
    let salt: [u8; 16] = random();
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccessError::Hash(e.to_string()))
}

fn verify_password(password: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), phc)
        .is_ok()
}

fn quota_from_sql(q: Option<i64>) -> Option<u64> {
    q.map(|q| u64::try_from(q).unwrap_or(0))
}

fn quota_to_sql(q: Option<u64>) -> Option<i64> {
    q.map(|q| i64::try_from(q).unwrap_or(i64::MAX))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn staged_from_row(r: &mbank_sql::Row) -> Result<StagedUpload, AccessError> {
    let e = sql("read a direct upload");
    let sha: Vec<u8> = r.get(0).map_err(&e)?;
    let sha256 = <[u8; 32]>::try_from(sha.as_slice()).map_err(|_| {
        AccessError::BadRow(format!("a staged upload's SHA-256 of {} bytes", sha.len()))
    })?;
    Ok(StagedUpload {
        sha256,
        len: r.get::<_, i64>(1).map_err(&e)?.max(0) as u64,
        expires_ms: r.get(2).map_err(&e)?,
    })
}

/// An authenticated user, as [`Access::authenticate`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// The user's name (the user part of their machines' names).
    pub name: String,
    /// May read and write every machine and chunk.
    pub admin: bool,
    /// Quota in bytes; `None` is unlimited.
    pub quota: Option<u64>,
}

/// A user as an administrator sees them ([`Access::users`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct UserInfo {
    /// The user's name.
    pub name: String,
    /// May read and write every machine and chunk.
    pub admin: bool,
    /// Quota in bytes; `None` is unlimited.
    pub quota: Option<u64>,
    /// Bytes charged to the user (stored sizes of the chunks they sent).
    pub used: u64,
    /// Tokens that are neither expired nor revoked.
    pub tokens_live: u64,
    /// Disabled by an administrator: cannot log in, their tokens do not authenticate.
    pub disabled: bool,
    /// When the user was added, milliseconds since the epoch.
    pub created_ms: i64,
}

/// A token just issued by [`Access::login`]; `token` is shown to the client once and
/// never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuedToken {
    /// `mbt_<id>_<secret>`: what the client sends (as a bearer token).
    pub token: String,
    /// The token's id (32 hex digits), which names it in listings and revocations.
    pub id: String,
    /// When it expires, milliseconds since the epoch.
    pub expires_ms: i64,
}

/// A token as an administrator sees it ([`Access::tokens`]); never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    /// The token's id (32 hex digits).
    pub id: String,
    /// Its user.
    pub user: String,
    /// What the client said it is, e.g. the station's host name.
    pub label: String,
    /// When it was issued, milliseconds since the epoch.
    pub created_ms: i64,
    /// When it expires, milliseconds since the epoch.
    pub expires_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<i64>,
    /// Neither expired nor revoked.
    pub live: bool,
}

/// A staged (direct) upload handed out to a user and not yet confirmed
/// ([`Access::stage_uploads`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedUpload {
    /// SHA-256 of the bytes the user will send (their staging name in the store).
    pub sha256: [u8; 32],
    /// Their length, charged against the user's quota until confirmed.
    pub len: u64,
    /// When the URL to send them expires, milliseconds since the epoch.
    pub expires_ms: i64,
}

/// A connection to a bank's access database. Cheap to open; `Send`, so a server keeps
/// one per worker thread.
pub struct Access {
    db: Db,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("dialect", &self.db.dialect())
            .finish()
    }
}

impl Access {
    /// Opens the access database of the bank in `bank_dir`: the PostgreSQL database
    /// its `postgres.url` names ([`mbank_sql::bank_url`]), or else
    /// `<bank_dir>/access.db`, creating it (and its schema) if missing and migrating an
    /// older schema forward.
    pub fn open(bank_dir: &Path) -> Result<Access, AccessError> {
        let url = mbank_sql::bank_url(bank_dir).map_err(|e| AccessError::Io {
            action: "read the PostgreSQL URL in",
            path: bank_dir.join(mbank_sql::URL_FILE),
            source: e,
        })?;
        match url {
            Some(url) => Self::open_postgres(&url),
            None => Self::open_sqlite(bank_dir),
        }
    }

    /// Connects to the access database on PostgreSQL at `url`, creating its schema if
    /// missing.
    pub fn open_postgres(url: &str) -> Result<Access, AccessError> {
        let db =
            Db::postgres(url, mbank_sql::ACCESS_DOMAIN).map_err(sql("connect to PostgreSQL"))?;
        let access = Access { db };
        access.migrate_postgres()?;
        Ok(access)
    }

    fn open_sqlite(bank_dir: &Path) -> Result<Access, AccessError> {
        let path = bank_dir.join(FILE_NAME);
        // Password hashes: readable by the bank's owner alone (SQLite gives its -wal
        // and -shm files the database's mode).
        match std::fs::OpenOptions::new()
            .mode(0o600)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(AccessError::Io {
                    action: "create the access database",
                    path: path.clone(),
                    source: e,
                });
            }
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(lite("open the database"))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(lite("set the busy timeout"))?;
        let app: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(lite("read the application id"))?;
        if app != 0 && app != APPLICATION_ID {
            return Err(AccessError::NotAccessDb { path, found: app });
        }
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(lite("switch to the WAL journal"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(AccessError::BadRow(format!(
                "journal mode is {mode}, not wal"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(lite("set synchronous mode"))?;
        let access = Access {
            db: Db::sqlite(conn),
        };
        access.migrate_sqlite(&path)?;
        Ok(access)
    }

    /// The SQLite connection (an [`Access`] opened on a file has one).
    fn lite(&self) -> &Connection {
        self.db
            .as_sqlite()
            .expect("the SQLite schema is handled only on SQLite")
    }

    fn migrate_sqlite(&self, path: &Path) -> Result<(), AccessError> {
        let v: i64 = self
            .lite()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(lite("read the schema version"))?;
        if v > SCHEMA_VERSION {
            return Err(AccessError::TooNew(v));
        }
        if v == SCHEMA_VERSION {
            return Ok(());
        }
        let tx = self
            .db
            .unchecked_transaction(Behavior::Exclusive)
            .map_err(sql("start the schema migration"))?;
        let conn = self.lite();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(lite("read the schema version"))?;
        if v > SCHEMA_VERSION {
            return Err(AccessError::TooNew(v));
        }
        if v == 0 {
            // A brand-new file must be empty: refuse to add tables to someone else's.
            let tables: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_schema", params![], |r| {
                    r.get(0)
                })
                .map_err(sql("inspect the database"))?;
            if tables != 0 {
                return Err(AccessError::NotAccessDb {
                    path: path.to_path_buf(),
                    found: 0,
                });
            }
            tx.execute_batch(SCHEMA_V1)
                .map_err(sql("create the schema"))?;
        }
        for (to, step) in [
            (2, SCHEMA_V2),
            (3, SCHEMA_V3),
            (4, SCHEMA_V4),
            (5, SCHEMA_V5),
        ] {
            if v < to {
                tx.execute_batch(step)
                    .map_err(sql("migrate the schema forward"))?;
            }
        }
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(lite("set the application id"))?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(lite("set the schema version"))?;
        tx.commit().map_err(sql("commit the schema migration"))
    }

    /// Creates the latest schema on PostgreSQL when it is missing (one transaction
    /// holding the domain's lock, so that servers starting at once create it once), and
    /// refuses a newer one.
    fn migrate_postgres(&self) -> Result<(), AccessError> {
        let v = self
            .db
            .pg_schema("access_schema", SCHEMA_PG, SCHEMA_VERSION)
            .map_err(sql("create or read the schema"))?;
        match v {
            v if v > SCHEMA_VERSION => Err(AccessError::TooNew(v)),
            v if v < SCHEMA_VERSION => Err(AccessError::BadRow(format!(
                "schema version {v} on PostgreSQL, which no mbank wrote (PostgreSQL access databases start at version 5)"
            ))),
            _ => Ok(()),
        }
    }

    /// A write transaction: `BEGIN IMMEDIATE` (on PostgreSQL the access domain's lock),
    /// so read-then-write never deadlocks against another connection; rolled back unless
    /// committed.
    fn write(&self, action: &'static str) -> Result<Tx<'_>, AccessError> {
        self.db
            .unchecked_transaction(Behavior::Immediate)
            .map_err(sql(action))
    }

    fn user_exists(db: &Db, name: &str) -> Result<bool, AccessError> {
        exists(db, "SELECT 1 FROM users WHERE name = ?1", params![name])
            .map_err(sql("look up a user"))
    }

    fn require_user(db: &Db, name: &str) -> Result<(), AccessError> {
        if Self::user_exists(db, name)? {
            Ok(())
        } else {
            Err(AccessError::UnknownUser(name.to_string()))
        }
    }

    /// Adds a user. Fails with [`AccessError::UserExists`] if the name is taken,
    /// [`AccessError::BadName`] or [`AccessError::WeakPassword`].
    pub fn add_user(
        &self,
        name: &str,
        password: &str,
        admin: bool,
        quota: Option<u64>,
    ) -> Result<(), AccessError> {
        check_user_name(name)?;
        check_password(password)?;
        if Self::user_exists(&self.db, name)? {
            return Err(AccessError::UserExists(name.to_string()));
        }
        let phc = hash_password(password)?;
        let tx = self.write("add a user")?;
        if Self::user_exists(&tx, name)? {
            return Err(AccessError::UserExists(name.to_string()));
        }
        tx.execute(
            "INSERT INTO users (name, phc, admin, quota_bytes, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, phc, admin, quota_to_sql(quota), now_ms()],
        )
        .map_err(sql("add a user"))?;
        tx.commit().map_err(sql("add a user"))
    }

    /// Removes a user: deletes their tokens (which stop working at once) and their
    /// chunk rows (their usage). Their machines stay in the catalog.
    pub fn remove_user(&self, name: &str) -> Result<(), AccessError> {
        let tx = self.write("remove a user")?;
        Self::require_user(&tx, name)?;
        for q in [
            "DELETE FROM tokens WHERE \"user\" = ?1",
            "DELETE FROM chunk_owners WHERE \"user\" = ?1",
            "DELETE FROM users WHERE name = ?1",
        ] {
            tx.execute(q, params![name]).map_err(sql("remove a user"))?;
        }
        tx.commit().map_err(sql("remove a user"))
    }

    /// Sets a user's password and revokes all their tokens.
    pub fn set_password(&self, name: &str, password: &str) -> Result<(), AccessError> {
        check_password(password)?;
        Self::require_user(&self.db, name)?;
        let phc = hash_password(password)?;
        let tx = self.write("change a password")?;
        let n = tx
            .execute(
                "UPDATE users SET phc = ?2 WHERE name = ?1",
                params![name, phc],
            )
            .map_err(sql("change a password"))?;
        if n == 0 {
            return Err(AccessError::UnknownUser(name.to_string()));
        }
        Self::revoke_tokens_of(&tx, name)?;
        tx.commit().map_err(sql("change a password"))
    }

    /// Sets a user's quota in bytes (`None`: unlimited). Lowering it below their usage
    /// refuses their further uploads but deletes nothing.
    pub fn set_quota(&self, name: &str, quota: Option<u64>) -> Result<(), AccessError> {
        let n = self
            .db
            .execute(
                "UPDATE users SET quota_bytes = ?2 WHERE name = ?1",
                params![name, quota_to_sql(quota)],
            )
            .map_err(sql("set a quota"))?;
        if n == 0 {
            return Err(AccessError::UnknownUser(name.to_string()));
        }
        Ok(())
    }

    /// Disables (`true`) or enables a user. A disabled user cannot log in and their
    /// tokens do not authenticate; disabling also revokes their tokens, so enabling
    /// again brings none back. Their machines, chunks and quota stay. True if the flag
    /// changed.
    pub fn set_disabled(&self, name: &str, disabled: bool) -> Result<bool, AccessError> {
        let tx = self.write("disable a user")?;
        Self::require_user(&tx, name)?;
        let n = tx
            .execute(
                "UPDATE users SET disabled = ?2 WHERE name = ?1 AND disabled != ?2",
                params![name, disabled],
            )
            .map_err(sql("disable a user"))?;
        if disabled {
            Self::revoke_tokens_of(&tx, name)?;
        }
        tx.commit().map_err(sql("disable a user"))?;
        Ok(n > 0)
    }

    /// Every user, by name, with their usage and number of live tokens.
    pub fn users(&self) -> Result<Vec<UserInfo>, AccessError> {
        let now = now_ms();
        let mut st = self
            .db
            .prepare_cached(
                "SELECT u.name, u.admin, u.quota_bytes, u.created_ms, u.disabled,
                    (SELECT CAST(coalesce(sum(bytes), 0) AS BIGINT) FROM chunk_owners c WHERE c.\"user\" = u.name AND c.charged != 0),
                    (SELECT count(*) FROM tokens t WHERE t.\"user\" = u.name AND t.revoked_ms IS NULL AND t.expires_ms > ?1)
                 FROM users u ORDER BY u.name",
            )
            .map_err(sql("list users"))?;
        let rows = st
            .query_map(params![now], |r| {
                Ok(UserInfo {
                    name: r.get(0)?,
                    admin: r.get(1)?,
                    quota: quota_from_sql(r.get(2)?),
                    created_ms: r.get(3)?,
                    disabled: r.get(4)?,
                    used: r.get::<_, i64>(5)?.max(0) as u64,
                    tokens_live: r.get::<_, i64>(6)?.max(0) as u64,
                })
            })
            .map_err(sql("list users"))?;
        rows.collect::<Result<_, _>>().map_err(sql("list users"))
    }

    /// Checks a password and issues a token valid for `ttl`, labelled `label` (e.g. the
    /// station's host; cut to 128 bytes). An unknown user and a wrong password both
    /// give [`AccessError::Unauthorized`], in about the same time.
    pub fn login(
        &self,
        name: &str,
        password: &str,
        ttl: Duration,
        label: &str,
    ) -> Result<IssuedToken, AccessError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AccessError::Unauthorized);
        }
        let phc: Option<String> = self
            .db
            .query_row(
                "SELECT phc FROM users WHERE name = ?1 AND disabled = 0",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("look up a user"))?;
        let ok = match &phc {
            Some(phc) => verify_password(password, phc),
            None => {
                let _ = verify_password(password, DUMMY_PHC);
                false
            }
        };
        if !ok {
            return Err(AccessError::Unauthorized);
        }
        let id: [u8; 16] = random();
        let secret: [u8; 32] = random();
        let now = now_ms();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_ms = now.saturating_add(ttl_ms);
        let mut label = label.to_string();
        if label.len() > MAX_LABEL_BYTES {
            let mut cut = MAX_LABEL_BYTES;
            while !label.is_char_boundary(cut) {
                cut -= 1;
            }
            label.truncate(cut);
        }
        let id_hex = hex(&id);
        let tx = self.write("issue a token")?;
        // The user may have been removed or disabled since the password was checked.
        let enabled = exists(
            &tx,
            "SELECT 1 FROM users WHERE name = ?1 AND disabled = 0",
            params![name],
        )
        .map_err(sql("look up a user"))?;
        if !enabled {
            return Err(AccessError::Unauthorized);
        }
        tx.execute(
            "INSERT INTO tokens (id, \"user\", secret_hash, created_ms, expires_ms, revoked_ms, label)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6)",
            params![
                id_hex,
                name,
                blake3::hash(&secret).as_bytes().as_slice(),
                now,
                expires_ms,
                label
            ],
        )
        .map_err(sql("issue a token"))?;
        tx.commit().map_err(sql("issue a token"))?;
        Ok(IssuedToken {
            token: format!("{TOKEN_PREFIX}{id_hex}_{}", hex(&secret)),
            id: id_hex,
            expires_ms,
        })
    }

    /// The user a token belongs to, if the token is well formed, known, its secret
    /// matches, it is neither expired nor revoked, and its user exists; else
    /// [`AccessError::Unauthorized`]. Never panics on any input.
    pub fn authenticate(&self, token: &str) -> Result<User, AccessError> {
        let Some((id, secret)) = parse_token(token) else {
            return Err(AccessError::Unauthorized);
        };
        type Row = (Vec<u8>, i64, Option<i64>, String, bool, Option<i64>);
        let row: Option<Row> = self
            .db
            .query_row(
                "SELECT t.secret_hash, t.expires_ms, t.revoked_ms, u.name, u.admin, u.quota_bytes
                 FROM tokens t JOIN users u ON u.name = t.\"user\" WHERE t.id = ?1 AND u.disabled = 0",
                params![hex(&id)],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("look up a token"))?;
        let Some((stored, expires_ms, revoked_ms, name, admin, quota)) = row else {
            return Err(AccessError::Unauthorized);
        };
        let Ok(stored) = <[u8; 32]>::try_from(stored.as_slice()) else {
            return Err(AccessError::Unauthorized);
        };
        // blake3::Hash's equality is constant-time.
        let matches = blake3::Hash::from_bytes(stored) == blake3::hash(&secret);
        if !matches {
            return Err(AccessError::Unauthorized);
        }
        if let Some(at) = revoked_ms {
            return Err(AccessError::TokenRevoked(at));
        }
        if expires_ms <= now_ms() {
            return Err(AccessError::TokenExpired(expires_ms));
        }
        Ok(User {
            name,
            admin,
            quota: quota_from_sql(quota),
        })
    }

    /// Revokes one token, named by its id (32 hex digits, as `tokens` lists it) or by
    /// the whole token string (then only if its secret matches). True if a token that
    /// was not revoked yet is revoked now.
    pub fn revoke_token(&self, id_or_token: &str) -> Result<bool, AccessError> {
        let id = if let Some((id, secret)) = parse_token(id_or_token) {
            let stored: Option<Vec<u8>> = self
                .db
                .query_row(
                    "SELECT secret_hash FROM tokens WHERE id = ?1",
                    params![hex(&id)],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("look up a token"))?;
            let ok = stored
                .and_then(|s| <[u8; 32]>::try_from(s.as_slice()).ok())
                .is_some_and(|s| blake3::Hash::from_bytes(s) == blake3::hash(&secret));
            if !ok {
                return Ok(false);
            }
            hex(&id)
        } else {
            match unhex::<16>(id_or_token.to_ascii_lowercase().as_bytes()) {
                Some(id) => hex(&id),
                None => return Ok(false),
            }
        };
        let n = self
            .db
            .execute(
                "UPDATE tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
                params![id, now_ms()],
            )
            .map_err(sql("revoke a token"))?;
        Ok(n > 0)
    }

    fn revoke_tokens_of(db: &Db, name: &str) -> Result<u64, AccessError> {
        let n = db
            .execute(
                "UPDATE tokens SET revoked_ms = ?2 WHERE \"user\" = ?1 AND revoked_ms IS NULL",
                params![name, now_ms()],
            )
            .map_err(sql("revoke tokens"))?;
        Ok(n as u64)
    }

    /// Revokes every token of a user; returns how many were not revoked yet.
    pub fn revoke_user_tokens(&self, name: &str) -> Result<u64, AccessError> {
        let tx = self.write("revoke tokens")?;
        Self::require_user(&tx, name)?;
        let n = Self::revoke_tokens_of(&tx, name)?;
        tx.commit().map_err(sql("revoke tokens"))?;
        Ok(n)
    }

    /// The tokens of one user (or of all), oldest first; never their secrets.
    pub fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenInfo>, AccessError> {
        if let Some(u) = user {
            Self::require_user(&self.db, u)?;
        }
        let now = now_ms();
        let mut st = self
            .db
            .prepare_cached(
                "SELECT id, \"user\", label, created_ms, expires_ms, revoked_ms FROM tokens
                 WHERE CAST(?1 AS TEXT) IS NULL OR \"user\" = ?1 ORDER BY \"user\", created_ms, id",
            )
            .map_err(sql("list tokens"))?;
        let rows = st
            .query_map(params![user], |r| {
                let expires_ms: i64 = r.get(4)?;
                let revoked_ms: Option<i64> = r.get(5)?;
                Ok(TokenInfo {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    label: r.get(2)?,
                    created_ms: r.get(3)?,
                    expires_ms,
                    revoked_ms,
                    live: revoked_ms.is_none() && expires_ms > now,
                })
            })
            .map_err(sql("list tokens"))?;
        rows.collect::<Result<_, _>>().map_err(sql("list tokens"))
    }

    /// Publishes a machine: records it (by `by`, an administrator's name or a note) and
    /// grants `chunks` (all chunks of all its versions) to [`PUBLIC`], uncharged. Run it
    /// again after the machine gets new versions: it adds their chunks.
    pub fn publish(
        &self,
        machine: &MachineName,
        by: &str,
        chunks: impl IntoIterator<Item = ChunkId>,
    ) -> Result<(), AccessError> {
        let tx = self.write("publish a machine")?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO published (machine, by, since_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (machine) DO UPDATE SET by = excluded.by",
            params![machine.as_str(), by, now],
        )
        .map_err(sql("publish a machine"))?;
        let chunks: Vec<ChunkId> = chunks.into_iter().collect();
        let own: Vec<Vec<Value>> = chunks
            .iter()
            .map(|c| {
                vec![
                    Value::Text(machine.to_string()),
                    Value::Blob(c.as_bytes().to_vec()),
                ]
            })
            .collect();
        tx.insert_rows(
            "INSERT INTO published_chunks (machine, chunk)",
            "(?, ?)",
            "ON CONFLICT DO NOTHING",
            &own,
        )
        .map_err(sql("publish a machine"))?;
        let public: Vec<Vec<Value>> = chunks
            .iter()
            .map(|c| {
                vec![
                    Value::Text(PUBLIC.to_string()),
                    Value::Blob(c.as_bytes().to_vec()),
                    Value::Integer(now),
                ]
            })
            .collect();
        tx.insert_rows(
            "INSERT INTO chunk_owners (\"user\", chunk, bytes, charged, recorded_ms)",
            "(?, ?, 0, 0, ?)",
            "ON CONFLICT DO NOTHING",
            &public,
        )
        .map_err(sql("publish a machine"))?;
        tx.commit().map_err(sql("publish a machine"))
    }

    /// Unpublishes a machine: forgets it, and drops the [`PUBLIC`] rows of chunks that
    /// no other published machine contributed. True if it was published.
    pub fn unpublish(&self, machine: &MachineName) -> Result<bool, AccessError> {
        let tx = self.write("unpublish a machine")?;
        let n = tx
            .execute(
                "DELETE FROM published WHERE machine = ?1",
                params![machine.as_str()],
            )
            .map_err(sql("unpublish a machine"))?;
        let chunks: Vec<Vec<u8>> = {
            let mut st = tx
                .prepare("SELECT chunk FROM published_chunks WHERE machine = ?1")
                .map_err(sql("unpublish a machine"))?;
            st.query_map(params![machine.as_str()], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(sql("unpublish a machine"))?
        };
        tx.execute(
            "DELETE FROM published_chunks WHERE machine = ?1",
            params![machine.as_str()],
        )
        .map_err(sql("unpublish a machine"))?;
        {
            let mut drop = tx
                .prepare(
                    "DELETE FROM chunk_owners WHERE \"user\" = ?1 AND chunk = ?2
                     AND NOT EXISTS (SELECT 1 FROM published_chunks p WHERE p.chunk = ?2)",
                )
                .map_err(sql("unpublish a machine"))?;
            for c in &chunks {
                drop.execute(params![PUBLIC, c])
                    .map_err(sql("unpublish a machine"))?;
            }
        }
        tx.commit().map_err(sql("unpublish a machine"))?;
        Ok(n > 0)
    }

    /// True if the machine is published.
    pub fn is_published(&self, machine: &MachineName) -> Result<bool, AccessError> {
        exists(
            &self.db,
            "SELECT 1 FROM published WHERE machine = ?1",
            params![machine.as_str()],
        )
        .map_err(sql("look up a published machine"))
    }

    /// The published machines, by name.
    pub fn published(&self) -> Result<Vec<String>, AccessError> {
        let mut st = self
            .db
            .prepare_cached("SELECT machine FROM published ORDER BY machine")
            .map_err(sql("list published machines"))?;
        st.query_map(params![], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(sql("list published machines"))
    }

    /// May `user` read machine `m`? Their own (`m.user() == user.name`), published, or
    /// `user` is an administrator.
    pub fn can_read_machine(&self, user: &User, m: &MachineName) -> Result<bool, AccessError> {
        if self.can_write_machine(user, m) {
            return Ok(true);
        }
        self.is_published(m)
    }

    /// May `user` write machine `m` (import, check in, remove, take a lease)? Their own,
    /// or `user` is an administrator.
    pub fn can_write_machine(&self, user: &User, m: &MachineName) -> bool {
        user.admin || m.user() == user.name
    }

    /// For each id: true if `user` may read the chunk (a row for the user or for
    /// [`PUBLIC`], or the user is an administrator). One consistent snapshot.
    pub fn readable(&self, user: &User, ids: &[ChunkId]) -> Result<Vec<bool>, AccessError> {
        if user.admin {
            return Ok(vec![true; ids.len()]);
        }
        let e = sql("look up chunks");
        let tx = self
            .db
            .unchecked_transaction(Behavior::Deferred)
            .map_err(&e)?;
        if tx.dialect() == Dialect::Postgres {
            // One snapshot for all the batches, as a SQLite read transaction has.
            tx.execute_batch("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .map_err(&e)?;
        }
        let found = chunks_among(
            &tx,
            "SELECT chunk FROM chunk_owners WHERE \"user\" IN (?1, ?2) AND chunk IN",
            [&user.name as &dyn ToSql, &PUBLIC],
            ids,
        )
        .map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(ids
            .iter()
            .map(|id| found.contains(id.as_bytes().as_slice()))
            .collect())
    }

    /// Records that `user` sent the bytes of chunk `id` (stored size `bytes`). It is
    /// charged against their quota unless they already had a row for it. Fails with
    /// [`AccessError::QuotaExceeded`] before recording anything when it would go over.
    pub fn record_upload(&self, user: &User, id: &ChunkId, bytes: u64) -> Result<(), AccessError> {
        self.record_uploads(user, &[(*id, bytes)])
    }

    /// [`Access::record_upload`] for a batch, in one transaction: all are recorded, or
    /// (over quota) none. The quota is checked against the sum of the chunks new to the
    /// user (each counted once).
    pub fn record_uploads(&self, user: &User, ids: &[(ChunkId, u64)]) -> Result<(), AccessError> {
        self.record_uploads_beside(user, ids, 0)
    }

    /// [`Access::record_uploads`] for a user who also uses `other` bytes that this
    /// database does not hold (the bank server passes what their versions cost in the
    /// catalog): the quota is checked against their chunks plus `other`.
    pub fn record_uploads_beside(
        &self,
        user: &User,
        ids: &[(ChunkId, u64)],
        other: u64,
    ) -> Result<(), AccessError> {
        // Most calls find every row there already, recorded just now (repeats,
        // re-records after storing): a read answers those without taking the write lock.
        let now = now_ms();
        if self.has_all(&user.name, ids, now - RECORD_AGAIN_AFTER_MS)? {
            return Ok(());
        }
        let tx = self.write("record an upload")?;
        // The quota in the database is authoritative; it may have changed since login.
        let quota: Option<Option<i64>> = tx
            .query_row(
                "SELECT quota_bytes FROM users WHERE name = ?1",
                params![user.name],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("record an upload"))?;
        let Some(quota) = quota else {
            return Err(AccessError::UnknownUser(user.name.clone()));
        };
        let quota = quota_from_sql(quota);
        let mut new = Vec::new();
        let mut seen = HashSet::new();
        {
            // A right held already is recorded again (its time moved to now): a chunk
            // sent again may be one GC deleted, held back by the server until its
            // commit, and the right must outlive a GC running meanwhile.
            let mut again = tx
                .prepare_cached(
                    "UPDATE chunk_owners SET recorded_ms = ?3 WHERE \"user\" = ?1 AND chunk = ?2",
                )
                .map_err(sql("record an upload"))?;
            for (id, bytes) in ids {
                if seen.insert(*id)
                    && again
                        .execute(params![user.name, id.as_bytes().as_slice(), now])
                        .map_err(sql("record an upload"))?
                        == 0
                {
                    new.push((*id, *bytes));
                }
            }
        }
        if new.is_empty() {
            return tx.commit().map_err(sql("record an upload"));
        }
        let need = new.iter().fold(0u64, |a, (_, b)| a.saturating_add(*b));
        if let Some(quota) = quota {
            let used = Self::usage_in(&tx, &user.name)?.saturating_add(other);
            if used.saturating_add(need) > quota {
                return Err(AccessError::QuotaExceeded {
                    user: user.name.clone(),
                    used,
                    quota,
                    need,
                });
            }
        }
        let rows: Vec<Vec<Value>> = new
            .iter()
            .map(|(id, bytes)| {
                vec![
                    Value::Text(user.name.clone()),
                    Value::Blob(id.as_bytes().to_vec()),
                    Value::Integer(to_i64(*bytes)),
                    Value::Integer(now),
                    Value::Integer(now),
                ]
            })
            .collect();
        tx.insert_rows(
            "INSERT INTO chunk_owners (\"user\", chunk, bytes, charged, recorded_ms, first_ms)",
            "(?, ?, ?, 1, ?, ?)",
            "",
            &rows,
        )
        .map_err(sql("record an upload"))?;
        tx.commit().map_err(sql("record an upload"))
    }

    /// True if `user` has a row for every chunk of `ids`, recorded at or after `since_ms`.
    fn has_all(
        &self,
        user: &str,
        ids: &[(ChunkId, u64)],
        since_ms: i64,
    ) -> Result<bool, AccessError> {
        let wanted: Vec<ChunkId> = ids.iter().map(|(id, _)| *id).collect();
        let found = chunks_among(
            &self.db,
            "SELECT chunk FROM chunk_owners WHERE \"user\" = ?1 AND recorded_ms >= ?2 AND chunk IN",
            [&user as &dyn ToSql, &since_ms],
            &wanted,
        )
        .map_err(sql("record an upload"))?;
        Ok(wanted
            .iter()
            .all(|id| found.contains(id.as_bytes().as_slice())))
    }

    /// Grants `user` read access to chunks that a version they committed references
    /// without their having sent them (e.g. from a published base they forked):
    /// uncharged rows for those they did not have. One transaction.
    pub fn grant(&self, user: &str, ids: &[(ChunkId, u64)]) -> Result<(), AccessError> {
        let tx = self.write("grant chunks")?;
        Self::require_user(&tx, user)?;
        let now = now_ms();
        let rows: Vec<Vec<Value>> = ids
            .iter()
            .map(|(id, bytes)| {
                vec![
                    Value::Text(user.to_string()),
                    Value::Blob(id.as_bytes().to_vec()),
                    Value::Integer(to_i64(*bytes)),
                    Value::Integer(now),
                ]
            })
            .collect();
        tx.insert_rows(
            "INSERT INTO chunk_owners (\"user\", chunk, bytes, charged, recorded_ms)",
            "(?, ?, ?, 0, ?)",
            "ON CONFLICT DO NOTHING",
            &rows,
        )
        .map_err(sql("grant chunks"))?;
        tx.commit().map_err(sql("grant chunks"))
    }

    fn usage_in(db: &Db, user: &str) -> Result<u64, AccessError> {
        let n: i64 = db
            .query_row(
                "SELECT CAST(coalesce(sum(bytes), 0) AS BIGINT) FROM chunk_owners WHERE \"user\" = ?1 AND charged != 0",
                params![user],
                |r| r.get(0),
            )
            .map_err(sql("sum a user's usage"))?;
        Ok(n.max(0) as u64)
    }

    /// `user`'s quota in bytes (`None`: unlimited).
    pub fn quota(&self, user: &str) -> Result<Option<u64>, AccessError> {
        let q: Option<Option<i64>> = self
            .db
            .query_row(
                "SELECT quota_bytes FROM users WHERE name = ?1",
                params![user],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read a quota"))?;
        match q {
            Some(q) => Ok(quota_from_sql(q)),
            None => Err(AccessError::UnknownUser(user.to_string())),
        }
    }

    /// Bytes charged to `user`: the stored sizes of the chunks they sent, each once.
    pub fn usage(&self, user: &str) -> Result<u64, AccessError> {
        Self::require_user(&self.db, user)?;
        Self::usage_in(&self.db, user)
    }

    /// Drops `user`'s charged rights first recorded at or after `since_ms`: the chunks
    /// a writer that started then sent, when it ended with no commit (a failed import),
    /// so that what it paid for is given back at once rather than at the next gc. The
    /// caller must know that nothing committed since `since_ms` names them. Returns the
    /// rows dropped.
    pub fn drop_uploads_since(&self, user: &str, since_ms: i64) -> Result<u64, AccessError> {
        let tx = self.write("give back a failed upload's quota")?;
        let n = tx
            .execute(
                "DELETE FROM chunk_owners WHERE \"user\" = ?1 AND charged = 1 AND first_ms >= ?2",
                params![user, since_ms],
            )
            .map_err(sql("give back a failed upload's quota"))?;
        tx.commit()
            .map_err(sql("give back a failed upload's quota"))?;
        Ok(n as u64)
    }

    /// Drops the rights (of every owner, [`PUBLIC`] included) to chunks that `keep`
    /// rejects, e.g. after garbage collection deleted them, and returns the
    /// `chunk_owners` rows dropped. Only chunks none of whose rights was recorded at or
    /// after `recorded_before_ms` are looked at: give the GC's cutoff (the start of the
    /// oldest writer in flight, less a margin), so that a chunk a writer in flight sent,
    /// which the server may hold back until the commit that names it (not yet a chunk
    /// file `keep` can see), keeps its rights. `keep` runs outside any transaction (it
    /// may read the store), and the rows are deleted only if no right to the chunk was
    /// recorded since.
    pub fn prune(
        &self,
        keep: &dyn Fn(&ChunkId) -> bool,
        recorded_before_ms: i64,
    ) -> Result<u64, AccessError> {
        let old: Vec<Vec<u8>> = {
            let mut st = self
                .db
                .prepare(
                    "SELECT chunk FROM chunk_owners GROUP BY chunk HAVING max(recorded_ms) < ?1
                     UNION SELECT chunk FROM published_chunks p
                       WHERE NOT EXISTS (SELECT 1 FROM chunk_owners c WHERE c.chunk = p.chunk)",
                )
                .map_err(sql("prune chunk rows"))?;
            st.query_map(params![recorded_before_ms], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(sql("prune chunk rows"))?
        };
        let mut gone = Vec::new();
        for c in old {
            let Ok(bytes) = <[u8; 32]>::try_from(c.as_slice()) else {
                return Err(AccessError::BadRow(format!(
                    "a chunk id of {} bytes",
                    c.len()
                )));
            };
            if !keep(&ChunkId::from_bytes(bytes)) {
                gone.push(c);
            }
        }
        if gone.is_empty() {
            return Ok(0);
        }
        let tx = self.write("prune chunk rows")?;
        let mut dropped = 0u64;
        {
            let mut del = tx
                .prepare("DELETE FROM chunk_owners WHERE chunk = ?1")
                .map_err(sql("prune chunk rows"))?;
            let mut del_pub = tx
                .prepare("DELETE FROM published_chunks WHERE chunk = ?1")
                .map_err(sql("prune chunk rows"))?;
            for c in gone {
                if exists(
                    &tx,
                    "SELECT 1 FROM chunk_owners WHERE chunk = ?1 AND recorded_ms >= ?2 LIMIT 1",
                    params![c, recorded_before_ms],
                )
                .map_err(sql("prune chunk rows"))?
                {
                    continue;
                }
                dropped += del.execute(params![c]).map_err(sql("prune chunk rows"))? as u64;
                del_pub
                    .execute(params![c])
                    .map_err(sql("prune chunk rows"))?;
            }
        }
        tx.commit().map_err(sql("prune chunk rows"))?;
        Ok(dropped)
    }

    /// Runs `f` holding `user`'s lock in the database, which the bank server holds while
    /// it checks a user's quota and records what it pays for (an upload here, a version
    /// in the catalog: neither database's transaction alone covers both). On PostgreSQL
    /// it is a session advisory lock, so it excludes every server sharing the database
    /// (waiting at most [`mbank_sql::LOCK_TIMEOUT`]); on SQLite, where one server owns
    /// the bank, `f` just runs (the server's own lock serves). `f` may use other
    /// connections, this one too.
    pub fn with_user_lock<R>(&self, user: &str, f: impl FnOnce() -> R) -> Result<R, AccessError> {
        self.db
            .with_lock(user_lock_key(user), f)
            .map_err(sql("take a user's quota lock"))
    }

    /// Notes that `users` begin a commit at `now_ms` (a time earlier than the one noted
    /// already is not kept).
    pub fn note_commit(&self, users: &[&str], now_ms: i64) -> Result<(), AccessError> {
        let e = sql("note a commit");
        let tx = self.write("note a commit")?;
        for u in users {
            tx.execute(
                "INSERT INTO last_commits (\"user\", began_ms) VALUES (?1, ?2)
                 ON CONFLICT (\"user\") DO UPDATE SET began_ms = excluded.began_ms
                 WHERE last_commits.began_ms < excluded.began_ms",
                params![u, now_ms],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)
    }

    /// When `user` last began a commit ([`Access::note_commit`]), if ever.
    pub fn last_commit(&self, user: &str) -> Result<Option<i64>, AccessError> {
        self.db
            .query_row(
                "SELECT began_ms FROM last_commits WHERE \"user\" = ?1",
                params![user],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read when a user last committed"))
    }

    /// Records direct uploads handed out to `user` (one per SHA-256: a repeat replaces
    /// the earlier).
    pub fn stage_uploads(&self, user: &str, ups: &[StagedUpload]) -> Result<(), AccessError> {
        let e = sql("record direct uploads");
        let tx = self.write("record direct uploads")?;
        for u in ups {
            tx.execute(
                "INSERT INTO staged_uploads (\"user\", sha256, bytes, expires_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (\"user\", sha256)
                 DO UPDATE SET bytes = excluded.bytes, expires_ms = excluded.expires_ms",
                params![user, u.sha256, to_i64(u.len), u.expires_ms],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)
    }

    /// The direct uploads handed out to `user` and neither confirmed nor expired.
    pub fn staged_uploads(&self, user: &str) -> Result<Vec<StagedUpload>, AccessError> {
        let rows = self
            .db
            .query_all(
                "SELECT sha256, bytes, expires_ms FROM staged_uploads WHERE \"user\" = ?1
                 ORDER BY sha256",
                params![user],
            )
            .map_err(sql("list direct uploads"))?;
        rows.iter().map(staged_from_row).collect()
    }

    /// Forgets `user`'s direct uploads of these SHA-256s (a confirm takes them, whatever
    /// its outcome); returns how many there were.
    pub fn take_staged(&self, user: &str, sha256s: &[[u8; 32]]) -> Result<u64, AccessError> {
        let e = sql("forget direct uploads");
        let tx = self.write("forget direct uploads")?;
        let mut n = 0;
        for h in sha256s {
            n += tx
                .execute(
                    "DELETE FROM staged_uploads WHERE \"user\" = ?1 AND sha256 = ?2",
                    params![user, h],
                )
                .map_err(&e)? as u64;
        }
        tx.commit().map_err(&e)?;
        Ok(n)
    }

    /// Forgets `user`'s direct uploads whose URL expired before `before_ms`, and returns
    /// them (their staged bytes are the caller's to remove).
    pub fn expire_staged(
        &self,
        user: &str,
        before_ms: i64,
    ) -> Result<Vec<StagedUpload>, AccessError> {
        let e = sql("expire direct uploads");
        let q = "FROM staged_uploads WHERE \"user\" = ?1 AND expires_ms < ?2";
        // Most calls find none: a read answers them without the write lock.
        if !exists(
            &self.db,
            &format!("SELECT 1 {q} LIMIT 1"),
            params![user, before_ms],
        )
        .map_err(&e)?
        {
            return Ok(Vec::new());
        }
        let tx = self.write("expire direct uploads")?;
        let gone = tx
            .query_all(
                &format!("SELECT sha256, bytes, expires_ms {q}"),
                params![user, before_ms],
            )
            .map_err(&e)?
            .iter()
            .map(staged_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        tx.execute(&format!("DELETE {q}"), params![user, before_ms])
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(gone)
    }
}

#[cfg(test)]
mod tests;
