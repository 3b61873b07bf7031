//! # mbank-sql
//!
//! One small SQL API over the two databases a bank's catalog and access rights can live
//! in: SQLite (a file in the bank directory, the embedded default) and PostgreSQL (so
//! that several `mbank serve` processes can share one bank).
//!
//! The API follows rusqlite's shape (`execute`, `query_row`, `prepare(..).query_map`,
//! `params!`, `optional()`, transactions that roll back when dropped), so the catalog's
//! code reads the same on both. What differs is kept here:
//!
//! - **Placeholders.** Queries are written with SQLite's `?1`, `?2` (or `?`); on
//!   PostgreSQL they become `$1`, `$2` ([`translate`]). `group_concat(` becomes
//!   `string_agg(`. Everything else must be SQL both accept: `INSERT … ON CONFLICT`,
//!   `IS NOT DISTINCT FROM`, `RETURNING`, `CAST(sum(x) AS BIGINT)` (PostgreSQL's sum of
//!   a bigint is a numeric, which [`Value`] does not take).
//! - **Values.** A row's values are [`Value`]s, SQLite's five kinds. PostgreSQL's
//!   integers and booleans read as [`Value::Integer`], its text as [`Value::Text`], its
//!   bytea as [`Value::Blob`], so a record's checksum over its values is the same on
//!   both. A parameter is bound by the type PostgreSQL inferred for it (an integer for
//!   an `int4` column is range-checked; for a text context it is written out).
//! - **Writers are serialised.** SQLite lets one writer in at a time (`BEGIN
//!   IMMEDIATE`). On PostgreSQL every write transaction, and every write statement
//!   outside one, first takes a transaction-scoped advisory lock on the database's
//!   *domain* (one key for the catalog, one for the access rights), so the catalog's
//!   read-then-write transactions (a head's compare-and-swap, a lease, a quota) keep
//!   the guarantees they have on SQLite across every server sharing the database. A
//!   lock wait longer than 30 s fails as [`ErrorKind::Busy`], as SQLite's busy timeout
//!   does.
//! - **A failed statement inside a PostgreSQL transaction aborts it**; SQLite goes on.
//!   Callers do not rely on going on after an error inside a transaction.
//! - **Statements are planned per execution** on PostgreSQL (`plan_cache_mode =
//!   force_custom_plan`): a generic plan made while a table was small keeps its
//!   sequential scans as the table grows (`chunk_owners` grows by a fork's chunks).
//!   Many rows go in few statements ([`Db::insert_rows`]): each statement is a round
//!   trip.
//! - **A lost PostgreSQL connection** fails the call in flight
//!   ([`ErrorKind::Unavailable`], retryable) and is opened again by the next call made
//!   outside a transaction.
//!
//! [`testing::TempPostgres`] starts a throw-away PostgreSQL server for tests.

pub mod testing;
mod value;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::time::Duration;

pub use value::{FromSql, ToSql, Value};

/// The file in a bank directory that holds the URL of the PostgreSQL database its
/// catalog and access rights live in (mode 0600: it may hold a password). Without it
/// they are SQLite files in the directory (`catalog.db`, `access.db`).
pub const URL_FILE: &str = "postgres.url";

/// Advisory lock domain of the catalog's writers.
pub const CATALOG_DOMAIN: i64 = 0x6d62_616e_6b01;
/// Advisory lock domain of the access rights' writers.
pub const ACCESS_DOMAIN: i64 = 0x6d62_616e_6b02;

/// The PostgreSQL URL of the bank in `dir`, if its databases live there.
pub fn bank_url(dir: &std::path::Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(dir.join(URL_FILE)) {
        Ok(s) => {
            let url = s.trim();
            if url.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is empty", dir.join(URL_FILE).display()),
                ));
            }
            Ok(Some(url.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Which database a [`Db`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// What kind of failure an [`Error`] is, for callers that act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Another writer held the database too long (SQLite busy or locked; PostgreSQL's
    /// lock timeout, a serialisation failure or a deadlock). A retry may pass.
    Busy,
    /// A row broke a constraint (a key taken).
    Constraint,
    /// The database's disk is full.
    DiskFull,
    /// The database is damaged, or not a database.
    Corrupt,
    /// The database cannot be written or opened (read-only, permissions).
    ReadOnly,
    /// The PostgreSQL server cannot be reached, or the connection broke. A retry may
    /// pass.
    Unavailable,
    /// `query_row` found no row.
    NoRows,
    /// A value of another type than asked for, or one that does not fit.
    Type,
    /// Anything else.
    Other,
}

/// A failed database call: its kind and the database's own words.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True when a retry may get past it.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Busy | ErrorKind::Unavailable)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let kind = match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                C::DatabaseBusy | C::DatabaseLocked => ErrorKind::Busy,
                C::ConstraintViolation => ErrorKind::Constraint,
                C::DiskFull => ErrorKind::DiskFull,
                C::DatabaseCorrupt | C::NotADatabase => ErrorKind::Corrupt,
                C::ReadOnly | C::CannotOpen | C::PermissionDenied => ErrorKind::ReadOnly,
                _ => ErrorKind::Other,
            },
            rusqlite::Error::QueryReturnedNoRows => ErrorKind::NoRows,
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::FromSqlConversionFailure(..) => ErrorKind::Type,
            _ => ErrorKind::Other,
        };
        Error {
            kind,
            message: e.to_string(),
        }
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        let kind = match e.code().map(|c| c.code()) {
            Some(c) if c.starts_with("23") => ErrorKind::Constraint,
            Some("53100") => ErrorKind::DiskFull,
            Some("55P03" | "40001" | "40P01") => ErrorKind::Busy,
            Some("XX001" | "XX002") => ErrorKind::Corrupt,
            Some("25006" | "42501") => ErrorKind::ReadOnly,
            Some(c) if c.starts_with("08") || c.starts_with("57P") => ErrorKind::Unavailable,
            Some(_) => ErrorKind::Other,
            None if e.is_closed() || source_is_io(&e) => ErrorKind::Unavailable,
            None => ErrorKind::Other,
        };
        // The database's own message, with its detail when it has one.
        let message = match e.as_db_error() {
            Some(db) => match db.detail() {
                Some(d) => format!("{} ({d})", db.message()),
                None => db.message().to_string(),
            },
            None => e.to_string(),
        };
        Error { kind, message }
    }
}

fn source_is_io(e: &postgres::Error) -> bool {
    let mut s: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(x) = s {
        if x.is::<std::io::Error>() {
            return true;
        }
        s = x.source();
    }
    false
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `query_row(..).optional()`: no row is `Ok(None)`.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind == ErrorKind::NoRows => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A statement's parameters: `params![a, b]`, or `[]` for none.
pub type Params<'a> = &'a [&'a dyn ToSql];

/// `params![a, b, c]`: the parameters `?1`, `?2`, `?3`.
#[macro_export]
macro_rules! params {
    () => {
        &[] as &[&dyn $crate::ToSql]
    };
    ($($p:expr),+ $(,)?) => {
        &[$(&$p as &dyn $crate::ToSql),+] as &[&dyn $crate::ToSql]
    };
}

/// One result row: its values in column order.
#[derive(Clone, Debug)]
pub struct Row {
    vals: Vec<Value>,
}

impl Row {
    /// Column `i` as a `T` (the turbofish `get::<_, T>(i)` of rusqlite works).
    pub fn get<I: RowIndex, T: FromSql>(&self, i: I) -> Result<T> {
        let i = i.index();
        let v = self.vals.get(i).ok_or_else(|| {
            Error::new(
                ErrorKind::Type,
                format!("no column {i} (the row has {})", self.vals.len()),
            )
        })?;
        T::from_value(v).map_err(|why| Error::new(ErrorKind::Type, format!("column {i}: {why}")))
    }

    /// Column `i` as the database gave it.
    pub fn get_ref(&self, i: usize) -> Result<&Value> {
        self.vals.get(i).ok_or_else(|| {
            Error::new(
                ErrorKind::Type,
                format!("no column {i} (the row has {})", self.vals.len()),
            )
        })
    }

    pub fn len(&self) -> usize {
        self.vals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vals.is_empty()
    }
}

/// A column index (a `usize`).
pub trait RowIndex {
    fn index(&self) -> usize;
}

impl RowIndex for usize {
    fn index(&self) -> usize {
        *self
    }
}

/// How a transaction begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Reads first; on SQLite the write lock is taken at the first write. On
    /// PostgreSQL the domain's lock is not taken: use only for reading.
    Deferred,
    /// Takes the write lock (SQLite `BEGIN IMMEDIATE`; PostgreSQL the domain's advisory
    /// lock) before the first statement.
    Immediate,
    /// SQLite `BEGIN EXCLUSIVE` (no readers either); on PostgreSQL as `Immediate`.
    Exclusive,
}

/// The PostgreSQL side of a [`Db`].
struct Pg {
    /// The connection string, to connect again after a lost connection.
    url: String,
    client: Option<postgres::Client>,
    /// Prepared statements by their translated text.
    statements: HashMap<String, postgres::Statement>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            drop_client(c);
        }
    }
}

/// Closes a client. The client blocks on its own runtime as it closes, which panics
/// on an async runtime's thread (a server dropping its pooled connections as it ends):
/// there it closes on a thread of its own.
fn drop_client(c: postgres::Client) {
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::spawn(move || drop(c));
    } else {
        drop(c);
    }
}

enum Conn {
    Sqlite(rusqlite::Connection),
    Pg(Box<RefCell<Pg>>),
}

/// A connection to the bank's SQLite file or to its PostgreSQL database.
pub struct Db {
    conn: Conn,
    /// The advisory lock every PostgreSQL writer takes (see the crate docs).
    domain: i64,
    in_tx: Cell<bool>,
}

/// Most rows of one statement of [`Db::insert_rows`].
const INSERT_BATCH: usize = 256;

/// How long a PostgreSQL writer waits for another's lock, as SQLite's busy timeout.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

impl Db {
    /// A [`Db`] over an open SQLite connection.
    pub fn sqlite(conn: rusqlite::Connection) -> Self {
        Db {
            conn: Conn::Sqlite(conn),
            domain: 0,
            in_tx: Cell::new(false),
        }
    }

    /// Connects to PostgreSQL at `url` (`postgresql://user[:password]@host[:port]/db`
    /// or `host=… user=… dbname=…`); writers take advisory lock `domain`.
    ///
    /// Must not be called on an async runtime's worker thread (the client blocks on its
    /// own runtime): the bank server calls it from its blocking pool.
    pub fn postgres(url: &str, domain: i64) -> Result<Self> {
        let mut pg = Pg {
            url: url.to_string(),
            client: None,
            statements: HashMap::new(),
        };
        pg.connect()?;
        Ok(Db {
            conn: Conn::Pg(Box::new(RefCell::new(pg))),
            domain,
            in_tx: Cell::new(false),
        })
    }

    pub fn dialect(&self) -> Dialect {
        match self.conn {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Pg(_) => Dialect::Postgres,
        }
    }

    /// The SQLite connection, for what only SQLite has (pragmas, integrity checks).
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.conn {
            Conn::Sqlite(c) => Some(c),
            Conn::Pg(_) => None,
        }
    }

    /// Runs one statement; returns how many rows it changed.
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<usize> {
        match &self.conn {
            Conn::Sqlite(c) => {
                let vals = sqlite_params(params)?;
                let mut st = c.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(vals.iter()))?)
            }
            Conn::Pg(pg) => {
                let n = self.pg_run(pg, sql, params, writes(sql), |client, st, p| {
                    client.execute(st, p)
                })?;
                Ok(n as usize)
            }
        }
    }

    /// Inserts `rows` with as few statements as it can: `head VALUES row, row, … tail`,
    /// where `row` is a parenthesised list of bare `?` (and constants) taking one row's
    /// values. Batches are of 256 rows and then powers of two, so that a call site
    /// prepares a handful of statements at most. Returns the rows changed.
    pub fn insert_rows(
        &self,
        head: &str,
        row: &str,
        tail: &str,
        rows: &[Vec<Value>],
    ) -> Result<usize> {
        let mut n = 0;
        let mut rest = rows;
        while !rest.is_empty() {
            let take = if rest.len() >= INSERT_BATCH {
                INSERT_BATCH
            } else {
                1 << rest.len().ilog2()
            };
            let (batch, more) = rest.split_at(take);
            let sql = format!("{head} VALUES {} {tail}", vec![row; take].join(", "));
            let params: Vec<&dyn ToSql> = batch.iter().flatten().map(|v| v as &dyn ToSql).collect();
            n += self.execute(&sql, &params)?;
            rest = more;
        }
        Ok(n)
    }

    /// The schema version a PostgreSQL database records in `table` (its `version`
    /// column); when it records none, creates `ddl` and records `version` first, in a
    /// transaction holding the domain's write lock in which the version is read again,
    /// so that servers starting at once create it once.
    pub fn pg_schema(&self, table: &str, ddl: &str, version: i64) -> Result<i64> {
        let read = |db: &Db| -> Result<Option<i64>> {
            // information_schema rather than to_regclass, whose cache may not yet
            // show a table another server has just created.
            let has: bool = db.query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
                     WHERE table_schema = current_schema() AND table_name = '{table}')"
                ),
                params![],
                |r| r.get(0),
            )?;
            if !has {
                return Ok(None);
            }
            db.query_row(
                &format!("SELECT max(version) FROM {table}"),
                params![],
                |r| r.get(0),
            )
        };
        if let Some(v) = read(self)? {
            return Ok(v);
        }
        let tx = self.unchecked_transaction(Behavior::Immediate)?;
        if let Some(v) = read(&tx)? {
            return Ok(v);
        }
        tx.execute_batch(ddl)?;
        tx.execute(
            &format!("INSERT INTO {table} (version) VALUES (?1)"),
            params![version],
        )?;
        tx.commit()?;
        Ok(version)
    }

    /// Runs statements separated by `;`, without parameters (schemas).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match &self.conn {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Pg(pg) => {
                let mut pg = pg.borrow_mut();
                let client = pg.client()?;
                Ok(client.batch_execute(sql)?)
            }
        }
    }

    /// Every row of a query.
    pub fn query_all(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        match &self.conn {
            Conn::Sqlite(c) => {
                let vals = sqlite_params(params)?;
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(vals.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut vals = Vec::with_capacity(n);
                    for i in 0..n {
                        vals.push(Value::from(r.get_ref(i)?));
                    }
                    out.push(Row { vals });
                }
                Ok(out)
            }
            Conn::Pg(pg) => {
                let rows = self.pg_run(pg, sql, params, writes(sql), |client, st, p| {
                    client.query(st, p)
                })?;
                rows.iter()
                    .map(|r| {
                        let vals = (0..r.len())
                            .map(|i| r.try_get::<_, Value>(i))
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(Row { vals })
                    })
                    .collect()
            }
        }
    }

    /// The first row of a query, through `f`; no row is [`ErrorKind::NoRows`].
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: Params<'_>,
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        let rows = self.query_all(sql, params)?;
        match rows.first() {
            Some(r) => f(r),
            None => Err(Error::new(ErrorKind::NoRows, "the query returned no row")),
        }
    }

    /// A statement to run with [`Statement::query_map`] (rusqlite's shape).
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>> {
        Ok(Statement {
            db: self,
            sql: sql.to_string(),
        })
    }

    /// The same as [`Db::prepare`]: statements are cached on both databases.
    pub fn prepare_cached(&self, sql: &str) -> Result<Statement<'_>> {
        self.prepare(sql)
    }

    /// Begins a transaction; it rolls back unless committed.
    pub fn transaction_with_behavior(&mut self, b: Behavior) -> Result<Tx<'_>> {
        self.unchecked_transaction(b)
    }

    /// Begins a transaction through a shared reference (rusqlite's
    /// `unchecked_transaction`): for a connection kept behind `&self`. Fails while
    /// another transaction of this connection is open.
    pub fn unchecked_transaction(&self, b: Behavior) -> Result<Tx<'_>> {
        if self.in_tx.get() {
            return Err(Error::new(
                ErrorKind::Other,
                "a transaction is already open on this connection",
            ));
        }
        match &self.conn {
            Conn::Sqlite(c) => c.execute_batch(match b {
                Behavior::Deferred => "BEGIN DEFERRED",
                Behavior::Immediate => "BEGIN IMMEDIATE",
                Behavior::Exclusive => "BEGIN EXCLUSIVE",
            })?,
            Conn::Pg(pg) => {
                let mut pg = pg.borrow_mut();
                let domain = self.domain;
                let client = pg.client()?;
                let begun = match b {
                    Behavior::Deferred => client.batch_execute("BEGIN"),
                    Behavior::Immediate | Behavior::Exclusive => client
                        .batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({domain})")),
                };
                if let Err(e) = begun {
                    let _ = client.batch_execute("ROLLBACK");
                    return Err(e.into());
                }
            }
        }
        self.in_tx.set(true);
        Ok(Tx {
            db: self,
            done: false,
        })
    }

    /// A deferred transaction.
    pub fn transaction(&mut self) -> Result<Tx<'_>> {
        self.transaction_with_behavior(Behavior::Deferred)
    }

    /// Runs `f` holding PostgreSQL's session advisory lock `key` (waiting for it);
    /// on SQLite runs `f` (one process's own locks serve there).
    pub fn with_lock<R>(&self, key: i64, f: impl FnOnce() -> R) -> Result<R> {
        if let Conn::Pg(pg) = &self.conn {
            let mut pg = pg.borrow_mut();
            pg.client()?
                .batch_execute(&format!("SELECT pg_advisory_lock({key})"))?;
        }
        let r = f();
        if let Conn::Pg(pg) = &self.conn {
            let mut pg = pg.borrow_mut();
            // A broken connection has dropped the lock with the session.
            if let Ok(c) = pg.client() {
                let _ = c.batch_execute(&format!("SELECT pg_advisory_unlock({key})"));
            }
        }
        Ok(r)
    }

    fn pg_run<T>(
        &self,
        pg: &RefCell<Pg>,
        sql: &str,
        params: Params<'_>,
        write: bool,
        run: impl Fn(
            &mut postgres::Client,
            &postgres::Statement,
            &[&(dyn postgres::types::ToSql + Sync)],
        ) -> Result<T, postgres::Error>,
    ) -> Result<T> {
        let vals = params
            .iter()
            .map(|p| p.to_value())
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = vals
            .iter()
            .map(|v| v as &(dyn postgres::types::ToSql + Sync))
            .collect();
        let mut pg = pg.borrow_mut();
        let in_tx = self.in_tx.get();
        let text = translate(sql);
        let st = pg.statement(&text)?;
        let client = pg.client()?;
        if write && !in_tx {
            // One write on its own: serialised with the transactions that write.
            client.batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({})",
                self.domain
            ))?;
            match run(client, &st, &refs) {
                Ok(r) => {
                    client.batch_execute("COMMIT")?;
                    Ok(r)
                }
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK");
                    Err(e.into())
                }
            }
        } else {
            Ok(run(client, &st, &refs)?)
        }
    }

    fn end_tx(&self, sql: &str) -> Result<()> {
        self.in_tx.set(false);
        match &self.conn {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Pg(pg) => {
                let mut pg = pg.borrow_mut();
                let r = pg.client()?.batch_execute(sql);
                Ok(r?)
            }
        }
    }
}

impl Pg {
    fn connect(&mut self) -> Result<()> {
        let mut client = postgres::Client::connect(&self.url, postgres::NoTls).map_err(|e| {
            let e = Error::from(e);
            Error::new(
                if e.kind == ErrorKind::Other {
                    ErrorKind::Unavailable
                } else {
                    e.kind
                },
                format!("cannot connect to PostgreSQL at {}: {e}", redact(&self.url)),
            )
        })?;
        // Custom plans: a statement prepared while a table was small (chunk_owners at a
        // bank's start) keeps its generic plan's sequential scans as the table grows;
        // planned per execution, it uses the table's size now (a fork's commit took
        // 10 s on a server whose plans were older than another's).
        client.batch_execute(&format!(
            "SET lock_timeout = '{}s'; SET client_min_messages = warning; \
             SET plan_cache_mode = force_custom_plan",
            LOCK_TIMEOUT.as_secs()
        ))?;
        self.client = Some(client);
        self.statements.clear();
        Ok(())
    }

    /// The client, connected again if the connection was lost.
    fn client(&mut self) -> Result<&mut postgres::Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            self.connect()?;
        }
        Ok(self.client.as_mut().expect("connected"))
    }

    /// A prepared statement of the current connection (connecting again first, which
    /// forgets the statements of a lost one).
    fn statement(&mut self, text: &str) -> Result<postgres::Statement> {
        self.client()?;
        if let Some(s) = self.statements.get(text) {
            return Ok(s.clone());
        }
        let s = self.client()?.prepare(text)?;
        self.statements.insert(text.to_string(), s.clone());
        Ok(s)
    }
}

/// Session advisory locks on PostgreSQL for callers on many threads (a store's
/// touches and sweeps): each lock held keeps one connection of the pool until its
/// guard drops. Waits without a time limit, as `flock` does: a holder that dies ends
/// its session, and PostgreSQL releases its locks with it.
pub struct LockPool {
    url: String,
    idle: std::sync::Mutex<Vec<postgres::Client>>,
}

impl Drop for LockPool {
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(|p| p.into_inner()));
        idle.into_iter().for_each(drop_client);
    }
}

/// Connections a [`LockPool`] keeps idle.
const LOCK_POOL_IDLE: usize = 16;

impl LockPool {
    /// A pool for the database at `url`; connects on first use.
    pub fn new(url: &str) -> std::sync::Arc<LockPool> {
        std::sync::Arc::new(LockPool {
            url: url.to_string(),
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Holds lock `key`, shared or exclusive, until the guard drops. Must not be called
    /// on an async runtime's worker thread.
    pub fn lock(self: &std::sync::Arc<Self>, key: i64, exclusive: bool) -> Result<PoolLock> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut client = match idle {
            Some(c) if !c.is_closed() => c,
            _ => {
                let mut c = postgres::Client::connect(&self.url, postgres::NoTls).map_err(|e| {
                    let e = Error::from(e);
                    Error::new(
                        ErrorKind::Unavailable,
                        format!("cannot connect to PostgreSQL at {}: {e}", redact(&self.url)),
                    )
                })?;
                c.batch_execute("SET lock_timeout = 0")?;
                c
            }
        };
        let f = if exclusive {
            "pg_advisory_lock"
        } else {
            "pg_advisory_lock_shared"
        };
        client.batch_execute(&format!("SELECT {f}({key})"))?;
        Ok(PoolLock {
            pool: self.clone(),
            client: Some(client),
            key,
            exclusive,
        })
    }
}

/// A lock of a [`LockPool`], released when dropped.
pub struct PoolLock {
    pool: std::sync::Arc<LockPool>,
    client: Option<postgres::Client>,
    key: i64,
    exclusive: bool,
}

impl Drop for PoolLock {
    fn drop(&mut self) {
        let Some(mut c) = self.client.take() else {
            return;
        };
        let f = if self.exclusive {
            "pg_advisory_unlock"
        } else {
            "pg_advisory_unlock_shared"
        };
        // A connection that cannot unlock is dropped: its session's end releases it.
        if c.batch_execute(&format!("SELECT {f}({})", self.key))
            .is_ok()
        {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < LOCK_POOL_IDLE {
                idle.push(c);
                return;
            }
        }
        drop_client(c);
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    if let Some(rest) = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        && let Some(at) = rest.find('@')
        && let Some(colon) = rest[..at].find(':')
    {
        let scheme = &url[..url.len() - rest.len()];
        return format!("{scheme}{}:***{}", &rest[..colon], &rest[at..]);
    }
    if url.contains("password") {
        return url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    url.to_string()
}

/// True for a statement that writes (its first word).
fn writes(sql: &str) -> bool {
    let first = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    matches!(
        first.to_ascii_uppercase().as_str(),
        "INSERT" | "UPDATE" | "DELETE" | "CREATE" | "ALTER" | "DROP"
    )
}

fn sqlite_params(params: Params<'_>) -> Result<Vec<rusqlite::types::Value>> {
    params
        .iter()
        .map(|p| p.to_value().map(rusqlite::types::Value::from))
        .collect()
}

/// SQLite's SQL as PostgreSQL takes it: `?N` → `$N`, a bare `?` → the next number,
/// `group_concat(` → `string_agg(`. Quoted strings and names are left alone.
pub fn translate(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut next = 0u32;
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' || c == b'"' {
            let end = sql[i + 1..]
                .find(c as char)
                .map_or(b.len(), |j| i + 1 + j + 1);
            out.push_str(&sql[i..end]);
            i = end;
        } else if c == b'?' {
            let digits = sql[i + 1..].bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 {
                let n: u32 = sql[i + 1..i + 1 + digits].parse().unwrap_or(0);
                next = next.max(n);
                out.push('$');
                out.push_str(&sql[i + 1..i + 1 + digits]);
            } else {
                next += 1;
                out.push('$');
                out.push_str(&next.to_string());
            }
            i += 1 + digits;
        } else if sql[i..].len() >= 13 && sql[i..i + 13].eq_ignore_ascii_case("group_concat(") {
            out.push_str("string_agg(");
            i += 13;
        } else {
            let ch = sql[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// A statement of a [`Db`] (rusqlite's `prepare(..).query_map(..)` shape).
pub struct Statement<'a> {
    db: &'a Db,
    sql: String,
}

impl Statement<'_> {
    /// Every row through `f`, as results to iterate over.
    pub fn query_map<T>(
        &mut self,
        params: Params<'_>,
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let rows = self.db.query_all(&self.sql, params)?;
        Ok(rows.iter().map(&mut f).collect::<Vec<_>>().into_iter())
    }

    /// Every row.
    pub fn query(&mut self, params: Params<'_>) -> Result<Rows> {
        Ok(Rows {
            rows: self.db.query_all(&self.sql, params)?.into_iter(),
            current: None,
        })
    }

    /// Runs it; how many rows it changed.
    pub fn execute(&mut self, params: Params<'_>) -> Result<usize> {
        self.db.execute(&self.sql, params)
    }
}

/// The rows of [`Statement::query`], one at a time.
pub struct Rows {
    rows: std::vec::IntoIter<Row>,
    current: Option<Row>,
}

impl Rows {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<&Row>> {
        self.current = self.rows.next();
        Ok(self.current.as_ref())
    }
}

/// A transaction; dropped without [`Tx::commit`], it rolls back.
pub struct Tx<'a> {
    db: &'a Db,
    done: bool,
}

impl Tx<'_> {
    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        self.db.end_tx("COMMIT")
    }

    pub fn rollback(mut self) -> Result<()> {
        self.done = true;
        self.db.end_tx("ROLLBACK")
    }
}

impl Deref for Tx<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.db.end_tx("ROLLBACK");
        }
    }
}

#[cfg(test)]
mod tests;
