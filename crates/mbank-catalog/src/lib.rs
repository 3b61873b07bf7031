//! # mbank-catalog
//!
//! The bank's catalog: machines, their versions and heads, and the writers in flight
//! (which GC must respect). One SQLite database, `catalog.db` in the bank directory
//! (the default), or a PostgreSQL database that several bank servers share, named by
//! the bank's `postgres.url` ([`Catalog::open_in`]). The code is the same on both
//! (`mbank-sql`); only the schema's creation and SQLite's pragmas differ.
//!
//! ## Invariants
//!
//! - A version row is inserted only after every chunk its index references is durable
//!   (the caller flushes the store first; DESIGN invariant 1). The index travels in the
//!   same row, so index and version record appear in one transaction.
//! - A machine's head moves only by compare-and-swap: [`Catalog::commit_version`]
//!   inserts the version and moves the head in one `BEGIN IMMEDIATE` transaction, and
//!   only if the head is still the version the writer started from (invariant 2). A
//!   writer that loses the race still has its version kept; the caller is told.
//! - Versions are immutable; only [`Catalog::remove_version`],
//!   [`Catalog::remove_machine`] and [`Catalog::forget`] (a retention policy, see
//!   [`retention`]) delete them, and their chunks go at the next GC. `forget` never
//!   deletes the head, a session's base or a suspended version nothing was made from.
//! - [`Catalog::set_head`] (roll back) moves the head by compare-and-swap too, and not
//!   while a session holds the machine. Notes, tags and policies (schema 5) and settings (schema 6) change
//!   freely and are not covered by the record checksums below.
//!
//! ## Concurrency and crashes
//!
//! SQLite's rollback journal with a 30 s busy timeout serialises writers across
//! processes; a process killed mid-transaction leaves a hot journal that the next
//! writable opener rolls back, so a crash leaves the catalog as of its last commit. (A
//! read-only connection cannot roll back and refuses to read, so the bank opens the
//! catalog writable whenever its directory is writable, even for reading commands.) The rollback journal
//! (not WAL) is chosen so that a bank on a read-only file system can still be read.
//!
//! On PostgreSQL every write transaction first takes one advisory lock, the catalog's
//! (`mbank_sql::CATALOG_DOMAIN`), so writers are serialised across every server sharing
//! the database as SQLite serialises them across processes: a head's compare-and-swap,
//! a lease (read the holder, then write), a `forget` (read what is protected, then
//! remove) see no other writer between their read and their write. Readers do not take
//! it. A lock wait over 30 s fails as busy (retryable), as SQLite's busy timeout does. A
//! server killed mid-transaction loses its connection, and PostgreSQL rolls the
//! transaction back and frees the lock. No statement inside a transaction is allowed to
//! fail and be carried on from (PostgreSQL aborts the transaction). The walks over every
//! index ([`Catalog::for_each_index`], `check_records`) list the versions first and
//! read them one at a time, each in its own statement; a version removed meanwhile is
//! left out (GC's rule for removals covers that: `mbank-store`'s crate docs).
//!
//! ## Schema
//!
//! `PRAGMA user_version` holds the schema version; [`Catalog::open`] migrates older
//! schemas forward by code and refuses newer ones. On PostgreSQL,
//! [`Catalog::open_postgres`] creates the latest schema if there is none and keeps its
//! version in the table `catalog_schema`. The tables are documented in
//! `docs/formats.md`.
//!
//! ## Record checksums (schema 4)
//!
//! SQLite keeps no checksums of its own: a flipped bit in a row's text or integer is
//! read back as a different, valid value (a renamed machine, another parent). So each
//! version's record carries a BLAKE3 checksum (`versions.sum`), written in the
//! transaction that commits it, over every field of the row, its streams' names,
//! lengths and index checksums, and its disk index's checksum (the index's own trailer,
//! which parsing checks against the index's bytes). Each machine's record has one too
//! (`machines.sum`: name, chunk size, creation time; not the head, which moves).
//! [`Catalog::disk_index`] and [`Catalog::stream`], which export, attach and run read
//! through, refuse a version whose record fails ([`CatalogError::RecordDamaged`]); so
//! does `verify` ([`Catalog::check_records`]), which also runs SQLite's own
//! `integrity_check` ([`Catalog::integrity_check`]; on PostgreSQL, the server's own
//! checks apply). The checksums hash values as SQLite's kinds, which PostgreSQL's are
//! read as, so the same records have the same checksums in both databases. Listing and removing do not check,
//! so a damaged version can still be seen and removed. The walks of GC and stats use
//! the index, whose own checksum they check, and not the record: GC keeps what an index
//! names whatever the record says, which is the conservative choice.
//!
//! The migration from schema 3 computes the checksums of the rows already there,
//! rather than leaving them "unchecked": versions are immutable, so an unchecked row
//! would stay unprotected for ever, while a checksum computed at migration catches every
//! later change. What it cannot catch is damage done before the migration (an index
//! damaged by then still fails its own trailer). A read-only catalog of schema 3 is
//! not migrated and not checked; `verify` says so.

mod records;
pub mod retention;

pub use records::{RecordCheck, RecordProblem, integrity_check_file};
use records::{rename_records, seal_all, seal_machine, seal_version};
pub use retention::{Decision, Policy, Protected};

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mbank_core::{DiskIndex, IndexError, MachineName, MemoryIndex, VersionId};
use mbank_sql::{Behavior, Db, Dialect, ErrorKind, OptionalExtension, params};
use rusqlite::OpenFlags;
use serde::{Deserialize, Serialize};

mod usage;
pub use usage::{OwnerUsage, VERSION_OVERHEAD, version_cost};

/// A machine's settings kept in the bank (schema 6); each `None` means "the station's
/// default". Unknown fields of a newer mbank are ignored when read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineSettings {
    /// Minutes between a session's checkpoints (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_minutes: Option<u64>,
}

impl MachineSettings {
    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.checkpoint_minutes.is_none()
    }
}

/// Schema version this code writes.
pub const SCHEMA_VERSION: i64 = 8;

const SCHEMA_V1: &str = "
CREATE TABLE machines (
    name        TEXT PRIMARY KEY,
    chunk_size  INTEGER NOT NULL,
    head        BLOB,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE versions (
    id          BLOB PRIMARY KEY,
    machine     TEXT NOT NULL,
    parent      BLOB,
    created_ms  INTEGER NOT NULL,
    disk_size   INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL,
    disk_index  BLOB NOT NULL,
    stats       TEXT NOT NULL
);
CREATE INDEX versions_by_machine ON versions (machine, created_ms);
CREATE TABLE writers (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    started_ms   INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    pid          INTEGER NOT NULL,
    host         TEXT NOT NULL,
    what         TEXT NOT NULL
);
";

/// Version 2: leases, one per machine with a live session (DESIGN invariant 6).
const SCHEMA_V2: &str = "
CREATE TABLE leases (
    machine      TEXT PRIMARY KEY,
    session      TEXT NOT NULL,
    station      TEXT NOT NULL,
    station_name TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    base         BLOB,
    started_ms   INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL
);
";

/// Version 3: a machine's configuration and its byte streams (memory state, kernel,
/// initrd) travel with each version; sessions whose lease was taken over (`--force`, or
/// a crashed session's machine checked out again) keep their base version protected
/// until they check in.
const SCHEMA_V3: &str = "
CREATE TABLE displaced (
    session      TEXT PRIMARY KEY,
    machine      TEXT NOT NULL,
    station_name TEXT NOT NULL,
    base         BLOB,
    since_ms     INTEGER NOT NULL
);
ALTER TABLE versions ADD COLUMN config TEXT;
CREATE TABLE version_streams (
    version     BLOB NOT NULL,
    name        TEXT NOT NULL,
    len         INTEGER NOT NULL,
    idx         BLOB NOT NULL,
    PRIMARY KEY (version, name)
);
";

/// Version 4: a checksum of each version's record (and of each machine's), written when
/// it is committed; see "Record checksums" in the crate docs. The migration computes
/// them for the rows already there.
const SCHEMA_V4: &str = "
ALTER TABLE versions ADD COLUMN sum BLOB;
ALTER TABLE machines ADD COLUMN sum BLOB;
";

/// Version 5: notes and tags on versions, and each machine's retention policy. Both
/// change after the version is committed, so they live beside the version records and
/// are not covered by their checksums.
const SCHEMA_V5: &str = "
CREATE TABLE IF NOT EXISTS version_labels (
    version     BLOB PRIMARY KEY,
    machine     TEXT NOT NULL,
    note        TEXT,
    tags        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS version_labels_by_machine ON version_labels (machine);
CREATE TABLE IF NOT EXISTS policies (
    machine     TEXT PRIMARY KEY,
    policy      TEXT NOT NULL
);
";

/// Version 6: each machine's settings (the checkpoint interval), which, like its
/// policy, change freely and are not covered by the record checksums.
const SCHEMA_V6: &str = "
CREATE TABLE IF NOT EXISTS machine_settings (
    machine     TEXT PRIMARY KEY,
    settings    TEXT NOT NULL
);
";

/// Version 7: how many version records were ever deleted, and when the last one was,
/// whatever deleted it (`rm`, `forget`, a removed machine): GC's rule for chunks that a
/// writer in flight took from an existing version without touching them
/// (`mbank-store`'s crate docs). A trigger, so that no way of deleting a version can
/// miss it; the time is SQLite's clock (ms), the system clock that writer start times
/// are read from too.
const SCHEMA_V7: &str = "
CREATE TABLE IF NOT EXISTS gc_marks (
    name        TEXT PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    count       INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS versions_removed AFTER DELETE ON versions
BEGIN
    INSERT INTO gc_marks (name, at_ms, count)
    VALUES ('version_removed', CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER), 1)
    ON CONFLICT (name) DO UPDATE SET at_ms = excluded.at_ms, count = count + 1;
END;
";

/// Version 8: a session's last checkpoint, protected like its base while the session
/// lives (or, displaced, until it checks in): its next checkpoint and its check-in
/// derive from it. A `checkpoint BLOB` column in `leases` and in `displaced`.
const SCHEMA_V8: [(&str, &str); 2] = [("leases", "checkpoint"), ("displaced", "checkpoint")];

/// The schema on PostgreSQL: schema 8's tables as SQLite has them, with PostgreSQL's
/// types (BIGINT for integers, BYTEA for blobs, text compared byte by byte as SQLite
/// does). `versions.rowid` stands for SQLite's implicit rowid (the order of commits);
/// `writers.id` is an identity; the trigger on `versions` is a function. The schema's
/// version is the one row of `catalog_schema`.
const PG_SCHEMA: &str = r#"
CREATE TABLE catalog_schema (
    version     BIGINT NOT NULL
);
CREATE TABLE machines (
    name        TEXT COLLATE "C" PRIMARY KEY,
    chunk_size  BIGINT NOT NULL,
    head        BYTEA,
    created_ms  BIGINT NOT NULL,
    sum         BYTEA
);
CREATE TABLE versions (
    rowid       BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id          BYTEA PRIMARY KEY,
    machine     TEXT COLLATE "C" NOT NULL,
    parent      BYTEA,
    created_ms  BIGINT NOT NULL,
    disk_size   BIGINT NOT NULL,
    chunk_size  BIGINT NOT NULL,
    disk_index  BYTEA NOT NULL,
    stats       TEXT COLLATE "C" NOT NULL,
    config      TEXT COLLATE "C",
    sum         BYTEA
);
CREATE INDEX versions_by_machine ON versions (machine, created_ms);
CREATE TABLE writers (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_ms   BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    pid          BIGINT NOT NULL,
    host         TEXT COLLATE "C" NOT NULL,
    what         TEXT COLLATE "C" NOT NULL
);
CREATE TABLE leases (
    machine      TEXT COLLATE "C" PRIMARY KEY,
    session      TEXT COLLATE "C" NOT NULL,
    station      TEXT COLLATE "C" NOT NULL,
    station_name TEXT COLLATE "C" NOT NULL,
    pid          BIGINT NOT NULL,
    base         BYTEA,
    started_ms   BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    checkpoint   BYTEA
);
CREATE TABLE displaced (
    session      TEXT COLLATE "C" PRIMARY KEY,
    machine      TEXT COLLATE "C" NOT NULL,
    station_name TEXT COLLATE "C" NOT NULL,
    base         BYTEA,
    since_ms     BIGINT NOT NULL,
    checkpoint   BYTEA
);
CREATE TABLE version_streams (
    version     BYTEA NOT NULL,
    name        TEXT COLLATE "C" NOT NULL,
    len         BIGINT NOT NULL,
    idx         BYTEA NOT NULL,
    PRIMARY KEY (version, name)
);
CREATE TABLE version_labels (
    version     BYTEA PRIMARY KEY,
    machine     TEXT COLLATE "C" NOT NULL,
    note        TEXT COLLATE "C",
    tags        TEXT COLLATE "C" NOT NULL
);
CREATE INDEX version_labels_by_machine ON version_labels (machine);
CREATE TABLE policies (
    machine     TEXT COLLATE "C" PRIMARY KEY,
    policy      TEXT COLLATE "C" NOT NULL
);
CREATE TABLE machine_settings (
    machine     TEXT COLLATE "C" PRIMARY KEY,
    settings    TEXT COLLATE "C" NOT NULL
);
CREATE TABLE gc_marks (
    name        TEXT COLLATE "C" PRIMARY KEY,
    at_ms       BIGINT NOT NULL,
    count       BIGINT NOT NULL
);
CREATE FUNCTION versions_removed() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO gc_marks (name, at_ms, count)
    VALUES ('version_removed', CAST(floor(extract(epoch FROM clock_timestamp()) * 1000) AS BIGINT), 1)
    ON CONFLICT (name) DO UPDATE SET at_ms = excluded.at_ms, count = gc_marks.count + 1;
    RETURN NULL;
END
$f$;
CREATE TRIGGER versions_removed AFTER DELETE ON versions
    FOR EACH ROW EXECUTE FUNCTION versions_removed();
"#;

/// Longest note on a version, in bytes.
pub const MAX_NOTE: usize = 1024;
/// Most tags on a version, and the longest tag in bytes.
pub const MAX_TAGS: usize = 16;
pub const MAX_TAG: usize = 64;

/// What went wrong in the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{}", db_message(action, source))]
    Db {
        action: &'static str,
        source: mbank_sql::Error,
    },
    #[error("no machine named {0}")]
    MachineNotFound(String),
    /// A rename's new name is taken.
    #[error(
        "a machine named {0} exists already; choose another name, or remove it first (`mbank rm {0}`)"
    )]
    MachineExists(String),
    /// A rename that cannot be done as asked (another owner, a session still to check in).
    #[error("{0}")]
    BadRename(String),
    #[error("machine {machine} has no version {prefix}")]
    VersionNotFound { machine: String, prefix: String },
    #[error("machine {machine} has {count} versions starting with {prefix}; type more digits")]
    AmbiguousVersion {
        machine: String,
        prefix: String,
        count: usize,
    },
    #[error("{machine} is in use: checked out by station {} (pid {}) since {} UTC; end that session, or take it over with --force (its work is still kept as a version when it checks in)", held.station_name, held.pid, held.started_utc())]
    LeaseHeld { machine: String, held: Box<Lease> },
    #[error("machine {0} has no versions yet")]
    NoHead(String),
    /// A head move whose expected head is not the head (compare-and-swap lost).
    #[error(
        "the head of {machine} is {}, not {} as expected: it moved meanwhile; nothing was changed; look at `mbank log {machine}` and try again",
        head.map_or("none".to_string(), |h| h.short()),
        expected.map_or("none".to_string(), |h| h.short())
    )]
    HeadMoved {
        machine: String,
        expected: Option<VersionId>,
        head: Option<VersionId>,
    },
    /// The head cannot move while a session runs: its check-in moves it.
    #[error("{machine} has a session running on station {} (pid {}) since {} UTC, whose check-in will move the head; end that session first, then move the head", held.station_name, held.pid, held.started_utc())]
    InSession { machine: String, held: Box<Lease> },
    /// A policy with no rule on would keep only what is protected.
    #[error(
        "no retention rule given for {0}: give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly with a count above 0"
    )]
    EmptyPolicy(String),
    /// A note or tag over its limits, or a tag that is not a plain word.
    #[error("{0}")]
    BadLabel(String),
    #[error("the index of {machine}@{version} is damaged: {source}")]
    BadIndex {
        machine: String,
        version: VersionId,
        source: IndexError,
    },
    /// A version's record does not match the checksum written when it was committed:
    /// some field (its machine, id, parent, sizes, statistics, configuration, streams or
    /// index) changed since.
    #[error(
        "the catalog record of {machine}@{} is damaged: {why}; nothing was read from it; run `mbank verify` to see what else is damaged, and restore catalog.db from a backup or remove the version",
        version.short()
    )]
    RecordDamaged {
        machine: String,
        version: VersionId,
        why: &'static str,
    },
    #[error(
        "catalog schema version {0} is newer than this mbank understands ({SCHEMA_VERSION}); upgrade mbank"
    )]
    TooNew(i64),
    #[error("catalog row is malformed: {0}")]
    BadRow(String),
    /// A bank server refused or failed the request; the message is the server's (or
    /// the client's account of what failed: which server, what, how many tries).
    #[error("{0}")]
    Remote(String),
    /// A bank server did not accept the credentials (HTTP 401).
    #[error("{0}")]
    Unauthorized(String),
}

impl CatalogError {
    fn db_kind(&self) -> Option<ErrorKind> {
        match self {
            CatalogError::Db { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// True for a database that was busy (SQLite's "busy"/"locked", PostgreSQL's lock
    /// timeout) or a PostgreSQL server out of reach: a retry may get past it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CatalogError::Db { source, .. } if source.is_retryable())
    }

    /// True when the database refused a row that breaks a constraint (a version id taken).
    pub fn is_constraint(&self) -> bool {
        self.db_kind() == Some(ErrorKind::Constraint)
    }

    /// True when the database failed because its disk is full.
    pub fn is_disk_full(&self) -> bool {
        self.db_kind() == Some(ErrorKind::DiskFull)
    }

    /// True when the database found itself damaged (or the file is not a database).
    pub fn is_corrupt(&self) -> bool {
        self.db_kind() == Some(ErrorKind::Corrupt)
    }

    /// True when the database cannot be written (or opened).
    pub fn is_read_only(&self) -> bool {
        self.db_kind() == Some(ErrorKind::ReadOnly)
    }
}

fn db_message(action: &str, source: &mbank_sql::Error) -> String {
    match source.kind() {
        ErrorKind::DiskFull => format!(
            "no space left on the catalog's disk while trying to {action} in the catalog \
             (catalog.db in the bank directory, or the PostgreSQL server's disk)"
        ),
        _ => format!("catalog: cannot {action}: {source}"),
    }
}

fn sql<E: Into<mbank_sql::Error>>(action: &'static str) -> impl FnOnce(E) -> CatalogError {
    move |source| CatalogError::Db {
        action,
        source: source.into(),
    }
}

/// The catalog operations a bank's users need, local ([`Catalog`]) or over HTTP (a
/// bank server's client). Authorisation is the server's: a remote catalog answers as if
/// what the user may not see did not exist.
pub trait CatalogApi: Send {
    /// A machine, or `None`.
    fn machine(&self, name: &MachineName) -> Result<Option<MachineInfo>, CatalogError>;
    /// Every machine (that the user may see), by name.
    fn machines(&self) -> Result<Vec<MachineInfo>, CatalogError>;
    /// A machine's versions, newest first.
    fn versions(&self, machine: &MachineName) -> Result<Vec<VersionInfo>, CatalogError>;
    /// `machine`'s head, or its version whose id starts with `prefix`.
    fn resolve(
        &self,
        machine: &MachineName,
        prefix: Option<&str>,
    ) -> Result<VersionInfo, CatalogError>;
    /// A version's disk index.
    fn disk_index(&self, v: &VersionInfo) -> Result<DiskIndex, CatalogError>;
    /// One of a version's streams, or `None`.
    fn stream(&self, v: &VersionInfo, name: &str) -> Result<Option<MemoryIndex>, CatalogError>;
    /// All of a version's streams.
    fn streams(&self, v: &VersionInfo) -> Result<Vec<NamedStream>, CatalogError>;
    /// See [`Catalog::commit_version`].
    fn commit_version(
        &mut self,
        info: &VersionInfo,
        index: &DiskIndex,
        streams: &[NamedStream],
        expected_head: Option<VersionId>,
    ) -> Result<CommitOutcome, CatalogError>;
    /// Forgets a version; returns the machine's new head.
    fn remove_version(&mut self, v: &VersionInfo) -> Result<Option<VersionId>, CatalogError>;
    /// Forgets a machine; returns how many versions went.
    fn remove_machine(&mut self, machine: &MachineName) -> Result<u64, CatalogError>;
    /// Registers a writer (see the GC scheme in `mbank-store`).
    fn register_writer(&self, pid: u32, host: &str, what: &str)
    -> Result<WriterInfo, CatalogError>;
    /// Records that writer `id` is alive.
    fn heartbeat(&self, id: i64) -> Result<(), CatalogError>;
    /// Ends writer `id`.
    fn unregister_writer(&self, id: i64) -> Result<(), CatalogError>;
    /// The lease on `machine`, if any.
    fn lease(&self, machine: &MachineName) -> Result<Option<Lease>, CatalogError>;
    /// Takes the lease on `lease.machine`; a lease held by another session is replaced
    /// only if that session is `replace` (else [`CatalogError::LeaseHeld`] names the
    /// holder, and the caller decides whether to ask again with its session).
    fn take_lease(
        &mut self,
        lease: &Lease,
        replace: Option<&str>,
    ) -> Result<Option<Lease>, CatalogError>;
    /// See [`Catalog::release_lease`].
    fn release_lease(&self, machine: &MachineName, session: &str) -> Result<bool, CatalogError>;
    /// See [`Catalog::session_bases`].
    fn session_bases(
        &self,
        machine: &MachineName,
    ) -> Result<Vec<(VersionId, String)>, CatalogError>;
    /// See [`Catalog::heartbeat_lease`].
    fn heartbeat_lease(&self, machine: &MachineName, session: &str) -> Result<bool, CatalogError>;
    /// See [`Catalog::lease_checkpoint`].
    fn lease_checkpoint(
        &self,
        machine: &MachineName,
        session: &str,
        version: VersionId,
    ) -> Result<bool, CatalogError>;
    /// See [`Catalog::forget`].
    fn forget(
        &mut self,
        machine: &MachineName,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<ForgetReport, CatalogError>;
    /// See [`Catalog::set_head`].
    fn set_head(
        &mut self,
        machine: &MachineName,
        to: VersionId,
        expected: Option<VersionId>,
    ) -> Result<(), CatalogError>;
    /// Renames a machine with its versions (see [`Catalog::rename_machine`]).
    fn rename_machine(&mut self, old: &MachineName, new: &MachineName) -> Result<(), CatalogError>;
    /// See [`Catalog::label`].
    fn label(&mut self, v: &VersionInfo, change: &LabelChange) -> Result<Labels, CatalogError>;
    /// See [`Catalog::labels`].
    fn labels(&self, machine: &MachineName) -> Result<Vec<VersionLabels>, CatalogError>;
    /// See [`Catalog::policy`].
    fn policy(&self, machine: &MachineName) -> Result<Option<Policy>, CatalogError>;
    /// See [`Catalog::set_policy`].
    fn set_policy(
        &mut self,
        machine: &MachineName,
        policy: Option<&Policy>,
    ) -> Result<(), CatalogError>;
    /// See [`Catalog::settings`].
    fn settings(&self, machine: &MachineName) -> Result<MachineSettings, CatalogError>;
    /// See [`Catalog::set_settings`].
    fn set_settings(
        &mut self,
        machine: &MachineName,
        settings: &MachineSettings,
    ) -> Result<(), CatalogError>;
    /// Another handle on the same catalog (its own connection), e.g. for a writer's
    /// heartbeats from another thread.
    fn reopen(&self) -> Result<Box<dyn CatalogApi>, CatalogError>;
}

impl CatalogApi for Catalog {
    fn machine(&self, name: &MachineName) -> Result<Option<MachineInfo>, CatalogError> {
        Catalog::machine(self, name)
    }
    fn machines(&self) -> Result<Vec<MachineInfo>, CatalogError> {
        Catalog::machines(self)
    }
    fn versions(&self, machine: &MachineName) -> Result<Vec<VersionInfo>, CatalogError> {
        Catalog::versions(self, machine)
    }
    fn resolve(
        &self,
        machine: &MachineName,
        prefix: Option<&str>,
    ) -> Result<VersionInfo, CatalogError> {
        Catalog::resolve(self, machine, prefix)
    }
    fn disk_index(&self, v: &VersionInfo) -> Result<DiskIndex, CatalogError> {
        Catalog::disk_index(self, v)
    }
    fn stream(&self, v: &VersionInfo, name: &str) -> Result<Option<MemoryIndex>, CatalogError> {
        Catalog::stream(self, v, name)
    }
    fn streams(&self, v: &VersionInfo) -> Result<Vec<NamedStream>, CatalogError> {
        Catalog::streams(self, v)
    }
    fn commit_version(
        &mut self,
        info: &VersionInfo,
        index: &DiskIndex,
        streams: &[NamedStream],
        expected_head: Option<VersionId>,
    ) -> Result<CommitOutcome, CatalogError> {
        Catalog::commit_version(self, info, index, streams, expected_head)
    }
    fn remove_version(&mut self, v: &VersionInfo) -> Result<Option<VersionId>, CatalogError> {
        Catalog::remove_version(self, v)
    }
    fn remove_machine(&mut self, machine: &MachineName) -> Result<u64, CatalogError> {
        Catalog::remove_machine(self, machine)
    }
    fn register_writer(
        &self,
        pid: u32,
        host: &str,
        what: &str,
    ) -> Result<WriterInfo, CatalogError> {
        Catalog::register_writer(self, pid, host, what)
    }
    fn heartbeat(&self, id: i64) -> Result<(), CatalogError> {
        Catalog::heartbeat(self, id)
    }
    fn unregister_writer(&self, id: i64) -> Result<(), CatalogError> {
        Catalog::unregister_writer(self, id)
    }
    fn lease(&self, machine: &MachineName) -> Result<Option<Lease>, CatalogError> {
        Catalog::lease(self, machine)
    }
    fn take_lease(
        &mut self,
        lease: &Lease,
        replace: Option<&str>,
    ) -> Result<Option<Lease>, CatalogError> {
        self.acquire_lease(lease, |held| replace == Some(held.session.as_str()))
    }
    fn release_lease(&self, machine: &MachineName, session: &str) -> Result<bool, CatalogError> {
        Catalog::release_lease(self, machine, session)
    }
    fn session_bases(
        &self,
        machine: &MachineName,
    ) -> Result<Vec<(VersionId, String)>, CatalogError> {
        Catalog::session_bases(self, machine)
    }
    fn heartbeat_lease(&self, machine: &MachineName, session: &str) -> Result<bool, CatalogError> {
        Catalog::heartbeat_lease(self, machine, session)
    }
    fn lease_checkpoint(
        &self,
        machine: &MachineName,
        session: &str,
        version: VersionId,
    ) -> Result<bool, CatalogError> {
        Catalog::lease_checkpoint(self, machine, session, version)
    }
    fn forget(
        &mut self,
        machine: &MachineName,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<ForgetReport, CatalogError> {
        Catalog::forget(self, machine, policy, dry_run)
    }
    fn set_head(
        &mut self,
        machine: &MachineName,
        to: VersionId,
        expected: Option<VersionId>,
    ) -> Result<(), CatalogError> {
        Catalog::set_head(self, machine, to, expected)
    }
    fn rename_machine(&mut self, old: &MachineName, new: &MachineName) -> Result<(), CatalogError> {
        Catalog::rename_machine(self, old, new)
    }
    fn label(&mut self, v: &VersionInfo, change: &LabelChange) -> Result<Labels, CatalogError> {
        Catalog::label(self, v, change)
    }
    fn labels(&self, machine: &MachineName) -> Result<Vec<VersionLabels>, CatalogError> {
        Catalog::labels(self, machine)
    }
    fn policy(&self, machine: &MachineName) -> Result<Option<Policy>, CatalogError> {
        Catalog::policy(self, machine)
    }
    fn set_policy(
        &mut self,
        machine: &MachineName,
        policy: Option<&Policy>,
    ) -> Result<(), CatalogError> {
        Catalog::set_policy(self, machine, policy)
    }
    fn settings(&self, machine: &MachineName) -> Result<MachineSettings, CatalogError> {
        Catalog::settings(self, machine)
    }
    fn set_settings(
        &mut self,
        machine: &MachineName,
        settings: &MachineSettings,
    ) -> Result<(), CatalogError> {
        Catalog::set_settings(self, machine, settings)
    }
    fn reopen(&self) -> Result<Box<dyn CatalogApi>, CatalogError> {
        Ok(Box::new(match &self.at {
            Location::File(path) => Catalog::open(path, false, false)?,
            Location::Postgres(url) => Catalog::open_postgres(url)?,
        }))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Statistics recorded with each version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VersionStats {
    /// Where the version came from, e.g. `import disk.qcow2`.
    pub source: String,
    pub bytes_read: u64,
    pub chunks_total: u64,
    pub chunks_zero: u64,
    /// Chunks this version added to the bank.
    pub chunks_new: u64,
    /// Chunks already in the bank (or repeated within this version).
    pub chunks_dedup: u64,
    /// Stored (compressed) bytes this version added to the bank.
    pub bytes_stored: u64,
    pub seconds: f64,
}

/// A version without its index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// `version` in JSON (the API's one vocabulary); `id` is still read.
    #[serde(rename = "version", alias = "id")]
    pub id: VersionId,
    pub machine: MachineName,
    pub parent: Option<VersionId>,
    pub created_ms: i64,
    pub disk_size: u64,
    pub chunk_size: u32,
    pub stats: VersionStats,
    /// The machine's configuration (JSON, owned by `mbank-vm`), if the version has one.
    pub config: Option<String>,
    /// The names of the byte streams stored with the version (`memory`, `kernel`,
    /// `initrd`), sorted.
    pub streams: Vec<String>,
}

impl VersionInfo {
    /// True when the version holds a saved memory state (a suspended machine).
    pub fn has_memory(&self) -> bool {
        self.streams.iter().any(|s| s == "memory")
    }
}

/// A byte stream stored with a version, by name.
pub type NamedStream = (String, MemoryIndex);

/// A machine and its head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// `machine` in JSON (the API's one vocabulary); `name` is still read.
    #[serde(rename = "machine", alias = "name")]
    pub name: MachineName,
    pub chunk_size: u32,
    pub head: Option<VersionId>,
    pub created_ms: i64,
    pub versions: u64,
    pub updated_ms: Option<i64>,
    pub disk_size: Option<u64>,
}

/// What happened to the head when a version was committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitOutcome {
    /// The head moved to the new version.
    HeadMoved,
    /// Another writer moved the head first; the new version is kept, the head is this.
    Kept { head: Option<VersionId> },
}

/// The notes and tags on a version (`mbank note`): not part of the version's record,
/// they may change at any time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Labels {
    pub fn is_empty(&self) -> bool {
        self.note.is_none() && self.tags.is_empty()
    }
}

/// A change to a version's labels: a new note (`Some("")` removes it), tags to add and
/// tags to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LabelChange {
    pub note: Option<String>,
    pub add_tags: Vec<String>,
    pub remove_tags: Vec<String>,
}

/// A version's labels, as a machine's list of them gives them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionLabels {
    pub version: VersionId,
    #[serde(flatten)]
    pub labels: Labels,
}

/// What [`Catalog::forget`] did (or, with `dry_run`, would do).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetReport {
    pub machine: String,
    pub policy: Policy,
    pub dry_run: bool,
    /// Every version, newest first, with the reasons it is kept (none: removed).
    pub versions: Vec<Decision>,
    /// The versions removed (or, with `dry_run`, that would be).
    pub removed: Vec<VersionId>,
}

/// A registered writer (see the GC scheme in `mbank-store`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterInfo {
    pub id: i64,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
    pub pid: u32,
    pub host: String,
    pub what: String,
}

/// Deletions of version records ([`Catalog::version_removals`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removals {
    /// When the last one was, in ms since the epoch (0: never).
    pub last_ms: i64,
    /// How many there were.
    pub count: i64,
}

/// A machine checked out to one station (DESIGN invariant 6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub machine: String,
    /// The session's id (random, hex).
    pub session: String,
    /// The station's id (random, kept in its cache directory).
    pub station: String,
    /// A name for people: host and cache directory.
    pub station_name: String,
    pub pid: u32,
    /// The version checked out.
    pub base: Option<VersionId>,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
}

impl Lease {
    /// `started_ms` as `YYYY-MM-DD HH:MM:SS`.
    pub fn started_utc(&self) -> String {
        mbank_core::utc_datetime(self.started_ms)
    }
}

/// Where a catalog lives, to open it again ([`CatalogApi::reopen`]).
#[derive(Clone, Debug)]
enum Location {
    File(PathBuf),
    Postgres(String),
}

/// The catalog database: a SQLite file or a PostgreSQL database.
pub struct Catalog {
    conn: Db,
    at: Location,
    /// The schema version of the file as opened: a read-only catalog older than 4 has
    /// no record checksums to check.
    schema: i64,
}

fn vid(b: Vec<u8>) -> Result<VersionId, CatalogError> {
    let arr: [u8; 16] = b
        .try_into()
        .map_err(|_| CatalogError::BadRow("version id is not 16 bytes".into()))?;
    Ok(VersionId::from_bytes(arr))
}

fn opt_vid(b: Option<Vec<u8>>) -> Result<Option<VersionId>, CatalogError> {
    b.map(vid).transpose()
}

fn mname(s: String) -> Result<MachineName, CatalogError> {
    s.parse()
        .map_err(|e| CatalogError::BadRow(format!("machine name: {e}")))
}

const VERSION_COLS: &str = "id, machine, parent, created_ms, disk_size, chunk_size, stats, config,
    (SELECT group_concat(s.name, ',') FROM version_streams s WHERE s.version = versions.id)";

/// A `versions` row as SQLite returns it, before validation.
type RawVersionRow = (
    Vec<u8>,
    String,
    Option<Vec<u8>>,
    i64,
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
);

fn version_row(r: &mbank_sql::Row) -> mbank_sql::Result<RawVersionRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn version_info(row: RawVersionRow) -> Result<VersionInfo, CatalogError> {
    let (id, machine, parent, created_ms, disk_size, chunk_size, stats, config, streams) = row;
    let mut streams: Vec<String> = streams
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    streams.sort();
    Ok(VersionInfo {
        id: vid(id)?,
        machine: mname(machine)?,
        parent: opt_vid(parent)?,
        created_ms,
        disk_size: disk_size as u64,
        chunk_size: chunk_size as u32,
        stats: serde_json::from_str(&stats)
            .map_err(|e| CatalogError::BadRow(format!("version statistics: {e}")))?,
        config,
        streams,
    })
}

impl Catalog {
    /// Opens the catalog of the bank in `dir`: in the PostgreSQL database its
    /// `postgres.url` names ([`Catalog::open_postgres`]), else `dir/catalog.db`
    /// ([`Catalog::open`], with `create` and `read_only` as there).
    pub fn open_in(dir: &Path, create: bool, read_only: bool) -> Result<Self, CatalogError> {
        let url = mbank_sql::bank_url(dir).map_err(|e| CatalogError::Db {
            action: "read the bank's PostgreSQL URL",
            source: mbank_sql::Error::new(
                ErrorKind::Other,
                format!("{}: {e}", dir.join(mbank_sql::URL_FILE).display()),
            ),
        })?;
        match url {
            Some(url) => Catalog::open_postgres(&url),
            None => Catalog::open(&dir.join("catalog.db"), create, read_only),
        }
    }

    /// Opens (and with `create`, creates) the catalog at `path`. `read_only` opens it
    /// without write access, so a bank on a read-only file system can still be read.
    pub fn open(path: &Path, create: bool, read_only: bool) -> Result<Self, CatalogError> {
        let flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else if create {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn =
            rusqlite::Connection::open_with_flags(path, flags).map_err(sql("open the database"))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(sql("set the busy timeout"))?;
        if !read_only {
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(sql("set synchronous mode"))?;
        }
        let mut cat = Catalog {
            conn: Db::sqlite(conn),
            at: Location::File(path.to_path_buf()),
            schema: 0,
        };
        cat.schema = cat.migrate(read_only)?;
        Ok(cat)
    }

    /// Opens the catalog in the PostgreSQL database at `url`, creating its schema (the
    /// latest, in one transaction holding the catalog's lock) if the database has none.
    /// Refuses a schema newer than this mbank's ([`CatalogError::TooNew`]).
    pub fn open_postgres(url: &str) -> Result<Self, CatalogError> {
        let conn = Db::postgres(url, mbank_sql::CATALOG_DOMAIN)
            .map_err(sql("open the PostgreSQL database"))?;
        let mut cat = Catalog {
            conn,
            at: Location::Postgres(url.to_string()),
            schema: 0,
        };
        cat.schema = cat
            .conn
            .pg_schema("catalog_schema", PG_SCHEMA, SCHEMA_VERSION)
            .map_err(sql("create or read the schema"))?;
        if cat.schema > SCHEMA_VERSION {
            return Err(CatalogError::TooNew(cat.schema));
        }
        if cat.schema < SCHEMA_VERSION {
            // Every PostgreSQL catalog so far was made at the latest schema.
            return Err(CatalogError::BadRow(format!(
                "the PostgreSQL catalog has schema version {}, which no mbank wrote; \
                 its table catalog_schema is damaged",
                cat.schema
            )));
        }
        Ok(cat)
    }

    /// Which database the catalog is in.
    pub fn dialect(&self) -> Dialect {
        self.conn.dialect()
    }

    /// Brings the schema up to [`SCHEMA_VERSION`] (unless `read_only`); returns the
    /// schema version the file now has.
    fn migrate(&mut self, read_only: bool) -> Result<i64, CatalogError> {
        let user_version = |db: &Db| -> Result<i64, CatalogError> {
            db.as_sqlite()
                .expect("a SQLite catalog")
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(sql("read the schema version"))
        };
        let v = user_version(&self.conn)?;
        if v > SCHEMA_VERSION {
            return Err(CatalogError::TooNew(v));
        }
        if v == SCHEMA_VERSION || read_only {
            return Ok(v);
        }
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Exclusive)
            .map_err(sql("start the schema migration"))?;
        let v = user_version(&tx)?;
        if v < 1 {
            tx.execute_batch(SCHEMA_V1)
                .map_err(sql("create the schema"))?;
        }
        if v < 2 {
            tx.execute_batch(SCHEMA_V2)
                .map_err(sql("migrate the schema to version 2"))?;
        }
        if v < 3 {
            tx.execute_batch(SCHEMA_V3)
                .map_err(sql("migrate the schema to version 3"))?;
        }
        if v < 4 {
            tx.execute_batch(SCHEMA_V4)
                .map_err(sql("migrate the schema to version 4"))?;
            seal_all(&tx)?;
        }
        if v < 5 {
            tx.execute_batch(SCHEMA_V5)
                .map_err(sql("migrate the schema to version 5"))?;
        }
        if v < 6 {
            tx.execute_batch(SCHEMA_V6)
                .map_err(sql("migrate the schema to version 6"))?;
        }
        if v < 7 {
            tx.execute_batch(SCHEMA_V7)
                .map_err(sql("migrate the schema to version 7"))?;
        }
        if v < 8 {
            for (table, column) in SCHEMA_V8 {
                let has: bool = tx
                    .query_row(
                        &format!("SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"),
                        params![column],
                        |r| r.get(0),
                    )
                    .map_err(sql("migrate the schema to version 8"))?;
                if !has {
                    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} BLOB"))
                        .map_err(sql("migrate the schema to version 8"))?;
                }
            }
        }
        tx.as_sqlite()
            .expect("a SQLite catalog")
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql("set the schema version"))?;
        tx.commit().map_err(sql("commit the schema migration"))?;
        Ok(SCHEMA_VERSION)
    }

    /// How many version records were ever deleted (since schema 7) and when the last
    /// one was: GC defers its sweep when a writer in flight may have read a removed
    /// version (`mbank-store`'s crate docs).
    pub fn version_removals(&self) -> Result<Removals, CatalogError> {
        if self.schema < 7 {
            return Ok(Removals::default());
        }
        Ok(self
            .conn
            .query_row(
                "SELECT at_ms, count FROM gc_marks WHERE name = 'version_removed'",
                params![],
                |r| {
                    Ok(Removals {
                        last_ms: r.get(0)?,
                        count: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(sql("read when a version was last removed"))?
            .unwrap_or_default())
    }

    /// A machine, or `None`.
    pub fn machine(&self, name: &MachineName) -> Result<Option<MachineInfo>, CatalogError> {
        Ok(self.machines_where(Some(name))?.pop())
    }

    /// Every machine, by name.
    pub fn machines(&self) -> Result<Vec<MachineInfo>, CatalogError> {
        self.machines_where(None)
    }

    fn machines_where(&self, name: Option<&MachineName>) -> Result<Vec<MachineInfo>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT m.name, m.chunk_size, m.head, m.created_ms,
                        (SELECT count(*) FROM versions v WHERE v.machine = m.name),
                        h.created_ms, h.disk_size
                 FROM machines m LEFT JOIN versions h ON h.id = m.head
                 WHERE CAST(?1 AS TEXT) IS NULL OR m.name = ?1 ORDER BY m.name",
            )
            .map_err(sql("list machines"))?;
        let rows = st
            .query_map(params![name.map(|n| n.as_str())], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            })
            .map_err(sql("list machines"))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, cs, head, created, n, updated, size) = row.map_err(sql("list machines"))?;
            out.push(MachineInfo {
                name: mname(name)?,
                chunk_size: cs as u32,
                head: opt_vid(head)?,
                created_ms: created,
                versions: n as u64,
                updated_ms: updated,
                disk_size: size.map(|s| s as u64),
            });
        }
        Ok(out)
    }

    /// Inserts a version (with its configuration and streams) and moves its machine's
    /// head to it if the head is still `expected_head`; creates the machine (with the
    /// version's chunk size) if needed. `info.streams` is ignored: `streams` is stored.
    pub fn commit_version(
        &mut self,
        info: &VersionInfo,
        index: &DiskIndex,
        streams: &[NamedStream],
        expected_head: Option<VersionId>,
    ) -> Result<CommitOutcome, CatalogError> {
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start the commit"))?;
        let created = tx
            .execute(
                "INSERT INTO machines (name, chunk_size, head, created_ms) VALUES (?1, ?2, NULL, ?3)
                 ON CONFLICT DO NOTHING",
                params![info.machine.as_str(), info.chunk_size, info.created_ms],
            )
            .map_err(sql("create the machine"))?;
        if created == 1 {
            seal_machine(&tx, info.machine.as_str())?;
        }
        let stats = serde_json::to_string(&info.stats).expect("statistics serialise");
        tx.execute(
            "INSERT INTO versions (id, machine, parent, created_ms, disk_size, chunk_size, disk_index, stats, config)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                &info.id.as_bytes()[..],
                info.machine.as_str(),
                info.parent.as_ref().map(|p| p.as_bytes().to_vec()),
                info.created_ms,
                info.disk_size as i64,
                info.chunk_size,
                index.to_bytes(),
                stats,
                info.config,
            ],
        )
        .map_err(sql("insert the version"))?;
        for (name, idx) in streams {
            tx.execute(
                "INSERT INTO version_streams (version, name, len, idx) VALUES (?1, ?2, ?3, ?4)",
                params![
                    &info.id.as_bytes()[..],
                    name,
                    idx.total_len as i64,
                    idx.to_bytes()
                ],
            )
            .map_err(sql("insert the version's streams"))?;
        }
        seal_version(&tx, &info.id)?;
        let moved = tx
            .execute(
                "UPDATE machines SET head = ?1 WHERE name = ?2 AND head IS NOT DISTINCT FROM ?3",
                params![
                    &info.id.as_bytes()[..],
                    info.machine.as_str(),
                    expected_head.as_ref().map(|p| p.as_bytes().to_vec())
                ],
            )
            .map_err(sql("move the head"))?;
        let outcome = if moved == 1 {
            CommitOutcome::HeadMoved
        } else {
            let head: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT head FROM machines WHERE name = ?1",
                    params![info.machine.as_str()],
                    |r| r.get(0),
                )
                .map_err(sql("read the head"))?;
            CommitOutcome::Kept {
                head: opt_vid(head)?,
            }
        };
        tx.commit().map_err(sql("commit the version"))?;
        Ok(outcome)
    }

    /// The versions of a machine, newest first.
    pub fn versions(&self, machine: &MachineName) -> Result<Vec<VersionInfo>, CatalogError> {
        if self.machine(machine)?.is_none() {
            return Err(CatalogError::MachineNotFound(machine.to_string()));
        }
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {VERSION_COLS} FROM versions WHERE machine = ?1 ORDER BY created_ms DESC, rowid DESC"
            ))
            .map_err(sql("list versions"))?;
        let rows = st
            .query_map(params![machine.as_str()], version_row)
            .map_err(sql("list versions"))?;
        rows.map(|r| version_info(r.map_err(sql("list versions"))?))
            .collect()
    }

    /// Resolves `prefix` (or the head, for `None`) to one version of `machine`.
    pub fn resolve(
        &self,
        machine: &MachineName,
        prefix: Option<&str>,
    ) -> Result<VersionInfo, CatalogError> {
        let m = self
            .machine(machine)?
            .ok_or_else(|| CatalogError::MachineNotFound(machine.to_string()))?;
        let ids: Vec<Vec<u8>> = match prefix {
            None => vec![
                m.head
                    .ok_or_else(|| CatalogError::NoHead(machine.to_string()))?
                    .as_bytes()
                    .to_vec(),
            ],
            Some(p) => {
                let hex = match self.conn.dialect() {
                    Dialect::Sqlite => "lower(hex(id))",
                    Dialect::Postgres => "encode(id, 'hex')",
                };
                let mut st = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT id FROM versions WHERE machine = ?1 AND {hex} LIKE CAST(?2 AS TEXT) || '%'"
                    ))
                    .map_err(sql("find the version"))?;
                let rows = st
                    .query_map(params![machine.as_str(), p.to_ascii_lowercase()], |r| {
                        r.get(0)
                    })
                    .map_err(sql("find the version"))?;
                rows.collect::<Result<_, _>>()
                    .map_err(sql("find the version"))?
            }
        };
        match ids.len() {
            1 => self.version_by_id(&vid(ids[0].clone())?),
            0 => Err(CatalogError::VersionNotFound {
                machine: machine.to_string(),
                prefix: prefix.unwrap_or("").to_string(),
            }),
            count => Err(CatalogError::AmbiguousVersion {
                machine: machine.to_string(),
                prefix: prefix.unwrap_or("").to_string(),
                count,
            }),
        }
    }

    fn version_by_id(&self, id: &VersionId) -> Result<VersionInfo, CatalogError> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {VERSION_COLS} FROM versions WHERE id = ?1"),
                params![&id.as_bytes()[..]],
                version_row,
            )
            .map_err(sql("read the version"))?;
        version_info(row)
    }

    /// The disk index of a version.
    /// Refuses a version whose record fails its checksum.
    pub fn disk_index(&self, v: &VersionInfo) -> Result<DiskIndex, CatalogError> {
        let bytes = self.checked_index_bytes(v)?;
        DiskIndex::from_bytes(&bytes).map_err(|source| CatalogError::BadIndex {
            machine: v.machine.to_string(),
            version: v.id,
            source,
        })
    }

    /// The stream `name` of a version, or `None` if it has none by that name.
    /// Refuses a version whose record fails its checksum.
    pub fn stream(&self, v: &VersionInfo, name: &str) -> Result<Option<MemoryIndex>, CatalogError> {
        self.check_record(v)?;
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT idx FROM version_streams WHERE version = ?1 AND name = ?2",
                params![&v.id.as_bytes()[..], name],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read a stream's index"))?;
        bytes
            .map(|b| {
                MemoryIndex::from_bytes(&b).map_err(|source| CatalogError::BadIndex {
                    machine: v.machine.to_string(),
                    version: v.id,
                    source,
                })
            })
            .transpose()
    }

    /// Every stream of a version, by name.
    pub fn streams(&self, v: &VersionInfo) -> Result<Vec<NamedStream>, CatalogError> {
        let mut out = Vec::new();
        for name in &v.streams {
            if let Some(idx) = self.stream(v, name)? {
                out.push((name.clone(), idx));
            }
        }
        Ok(out)
    }

    /// Calls `f` for every stream of every version (or of one machine's versions).
    /// Streams are read one at a time, as [`Catalog::for_each_index`] reads indexes.
    pub fn for_each_stream(
        &self,
        machine: Option<&MachineName>,
        mut f: impl FnMut(
            &VersionInfo,
            &str,
            Result<MemoryIndex, CatalogError>,
        ) -> Result<(), CatalogError>,
    ) -> Result<(), CatalogError> {
        let listed = self
            .conn
            .query_all(
                "SELECT versions.rowid, s.name FROM version_streams s JOIN versions ON versions.id = s.version
                 WHERE CAST(?1 AS TEXT) IS NULL OR versions.machine = ?1 ORDER BY versions.machine, versions.created_ms, s.name",
                params![machine.map(|m| m.as_str())],
            )
            .map_err(sql("list streams"))?;
        for r in listed {
            let rowid: i64 = r.get(0).map_err(sql("list streams"))?;
            let name: String = r.get(1).map_err(sql("list streams"))?;
            let row = self
                .conn
                .query_row(
                    &format!(
                        "SELECT {VERSION_COLS}, s.idx FROM version_streams s JOIN versions ON versions.id = s.version
                         WHERE versions.rowid = ?1 AND s.name = ?2"
                    ),
                    params![rowid, name],
                    |r| Ok((version_row(r)?, r.get::<_, Vec<u8>>(9)?)),
                )
                .optional()
                .map_err(sql("read a stream"))?;
            // Removed since it was listed.
            let Some((row, bytes)) = row else { continue };
            let info = version_info(row)?;
            let idx = MemoryIndex::from_bytes(&bytes).map_err(|source| CatalogError::BadIndex {
                machine: info.machine.to_string(),
                version: info.id,
                source,
            });
            f(&info, &name, idx)?;
        }
        Ok(())
    }

    /// Calls `f` for every version of every machine (or of one machine) with its index.
    /// Indexes are read one at a time, so memory stays bounded by the largest one; a
    /// version removed meanwhile is left out.
    pub fn for_each_index(
        &self,
        machine: Option<&MachineName>,
        mut f: impl FnMut(&VersionInfo, Result<DiskIndex, CatalogError>) -> Result<(), CatalogError>,
    ) -> Result<(), CatalogError> {
        let listed = self
            .conn
            .query_all(
                "SELECT rowid FROM versions WHERE CAST(?1 AS TEXT) IS NULL OR machine = ?1 ORDER BY machine, created_ms",
                params![machine.map(|m| m.as_str())],
            )
            .map_err(sql("list versions"))?;
        for r in listed {
            let rowid: i64 = r.get(0).map_err(sql("list versions"))?;
            let row = self
                .conn
                .query_row(
                    &format!("SELECT {VERSION_COLS}, disk_index FROM versions WHERE rowid = ?1"),
                    params![rowid],
                    |r| Ok((version_row(r)?, r.get::<_, Vec<u8>>(9)?)),
                )
                .optional()
                .map_err(sql("read an index"))?;
            let Some((row, bytes)) = row else { continue };
            let info = version_info(row)?;
            let idx = DiskIndex::from_bytes(&bytes).map_err(|source| CatalogError::BadIndex {
                machine: info.machine.to_string(),
                version: info.id,
                source,
            });
            f(&info, idx)?;
        }
        Ok(())
    }

    /// Forgets one version. If it was the head, the head moves to its parent when that
    /// still exists, else to the newest remaining version, else to nothing.
    pub fn remove_version(&mut self, v: &VersionInfo) -> Result<Option<VersionId>, CatalogError> {
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start removing the version"))?;
        tx.execute(
            "DELETE FROM versions WHERE id = ?1",
            params![&v.id.as_bytes()[..]],
        )
        .map_err(sql("remove the version"))?;
        tx.execute(
            "DELETE FROM version_streams WHERE version = ?1",
            params![&v.id.as_bytes()[..]],
        )
        .map_err(sql("remove the version's streams"))?;
        tx.execute(
            "DELETE FROM version_labels WHERE version = ?1",
            params![&v.id.as_bytes()[..]],
        )
        .map_err(sql("remove the version's notes and tags"))?;
        let head: Option<Vec<u8>> = tx
            .query_row(
                "SELECT head FROM machines WHERE name = ?1",
                params![v.machine.as_str()],
                |r| r.get(0),
            )
            .map_err(sql("read the head"))?;
        let mut new_head = opt_vid(head)?;
        if new_head == Some(v.id) {
            let parent_exists = match &v.parent {
                Some(p) => tx
                    .query_row(
                        "SELECT 1 FROM versions WHERE id = ?1 AND machine = ?2",
                        params![&p.as_bytes()[..], v.machine.as_str()],
                        |_| Ok(()),
                    )
                    .optional()
                    .map_err(sql("read the parent"))?
                    .is_some(),
                None => false,
            };
            new_head = if parent_exists {
                v.parent
            } else {
                let newest: Option<Vec<u8>> = tx
                    .query_row(
                        "SELECT id FROM versions WHERE machine = ?1 ORDER BY created_ms DESC, rowid DESC LIMIT 1",
                        params![v.machine.as_str()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql("find the newest version"))?;
                opt_vid(newest)?
            };
            tx.execute(
                "UPDATE machines SET head = ?1 WHERE name = ?2",
                params![
                    new_head.as_ref().map(|h| h.as_bytes().to_vec()),
                    v.machine.as_str()
                ],
            )
            .map_err(sql("move the head"))?;
        }
        tx.commit().map_err(sql("commit the removal"))?;
        Ok(new_head)
    }

    /// Forgets a machine and all its versions; returns how many versions went.
    pub fn remove_machine(&mut self, machine: &MachineName) -> Result<u64, CatalogError> {
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start removing the machine"))?;
        tx.execute(
            "DELETE FROM version_streams WHERE version IN (SELECT id FROM versions WHERE machine = ?1)",
            params![machine.as_str()],
        )
        .map_err(sql("remove the versions' streams"))?;
        tx.execute(
            "DELETE FROM version_labels WHERE machine = ?1",
            params![machine.as_str()],
        )
        .map_err(sql("remove the versions' notes and tags"))?;
        tx.execute(
            "DELETE FROM policies WHERE machine = ?1",
            params![machine.as_str()],
        )
        .map_err(sql("remove the machine's retention policy"))?;
        tx.execute(
            "DELETE FROM machine_settings WHERE machine = ?1",
            params![machine.as_str()],
        )
        .map_err(sql("remove the machine's settings"))?;
        let n = tx
            .execute(
                "DELETE FROM versions WHERE machine = ?1",
                params![machine.as_str()],
            )
            .map_err(sql("remove the versions"))?;
        let m = tx
            .execute(
                "DELETE FROM machines WHERE name = ?1",
                params![machine.as_str()],
            )
            .map_err(sql("remove the machine"))?;
        if m == 0 {
            return Err(CatalogError::MachineNotFound(machine.to_string()));
        }
        tx.commit().map_err(sql("commit the removal"))?;
        Ok(n as u64)
    }

    /// Registers a writer; GC keeps every chunk newer than the oldest writer's start.
    pub fn register_writer(
        &self,
        pid: u32,
        host: &str,
        what: &str,
    ) -> Result<WriterInfo, CatalogError> {
        let now = now_ms();
        let id: i64 = self
            .conn
            .query_row(
                "INSERT INTO writers (started_ms, heartbeat_ms, pid, host, what) VALUES (?1, ?1, ?2, ?3, ?4)
                 RETURNING id",
                params![now, pid, host, what],
                |r| r.get(0),
            )
            .map_err(sql("register the writer"))?;
        Ok(WriterInfo {
            id,
            started_ms: now,
            heartbeat_ms: now,
            pid,
            host: host.to_string(),
            what: what.to_string(),
        })
    }

    /// Records that writer `id` is still alive.
    pub fn heartbeat(&self, id: i64) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "UPDATE writers SET heartbeat_ms = ?1 WHERE id = ?2",
                params![now_ms(), id],
            )
            .map_err(sql("record the writer's heartbeat"))?;
        Ok(())
    }

    pub fn unregister_writer(&self, id: i64) -> Result<(), CatalogError> {
        self.conn
            .execute("DELETE FROM writers WHERE id = ?1", params![id])
            .map_err(sql("unregister the writer"))?;
        Ok(())
    }

    pub fn writers(&self) -> Result<Vec<WriterInfo>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, started_ms, heartbeat_ms, pid, host, what FROM writers ORDER BY started_ms")
            .map_err(sql("list writers"))?;
        let rows = st
            .query_map(params![], |r| {
                Ok(WriterInfo {
                    id: r.get(0)?,
                    started_ms: r.get(1)?,
                    heartbeat_ms: r.get(2)?,
                    pid: r.get(3)?,
                    host: r.get(4)?,
                    what: r.get(5)?,
                })
            })
            .map_err(sql("list writers"))?;
        rows.collect::<Result<_, _>>().map_err(sql("list writers"))
    }
}

fn session_bases_in(
    conn: &Db,
    machine: &MachineName,
) -> Result<Vec<(VersionId, String)>, CatalogError> {
    let mut st = conn
        .prepare_cached(
            "SELECT base, station_name FROM leases WHERE machine = ?1 AND base IS NOT NULL
             UNION ALL
             SELECT base, station_name FROM displaced WHERE machine = ?1 AND base IS NOT NULL
             UNION ALL
             SELECT checkpoint, station_name FROM leases WHERE machine = ?1 AND checkpoint IS NOT NULL
             UNION ALL
             SELECT checkpoint, station_name FROM displaced WHERE machine = ?1 AND checkpoint IS NOT NULL",
        )
        .map_err(sql("list the sessions' versions"))?;
    let rows = st
        .query_map(params![machine.as_str()], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(sql("list the sessions' versions"))?;
    let mut out = Vec::new();
    for row in rows {
        let (b, station) = row.map_err(sql("list the sessions' versions"))?;
        out.push((vid(b)?, station));
    }
    Ok(out)
}

fn read_head(conn: &Db, machine: &MachineName) -> Result<Option<VersionId>, CatalogError> {
    let head: Option<Vec<u8>> = conn
        .query_row(
            "SELECT head FROM machines WHERE name = ?1",
            params![machine.as_str()],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql("read the head"))?
        .ok_or_else(|| CatalogError::MachineNotFound(machine.to_string()))?;
    opt_vid(head)
}

/// Checks a label change against the limits and the form of a tag.
fn check_labels(change: &LabelChange) -> Result<(), CatalogError> {
    if let Some(n) = &change.note
        && n.len() > MAX_NOTE
    {
        return Err(CatalogError::BadLabel(format!(
            "the note is {} bytes; a note holds at most {MAX_NOTE}",
            n.len()
        )));
    }
    for t in change.add_tags.iter().chain(&change.remove_tags) {
        let ok = !t.is_empty()
            && t.len() <= MAX_TAG
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:+".contains(&b));
        if !ok {
            return Err(CatalogError::BadLabel(format!(
                "tag {t:?} is not a tag: use 1 to {MAX_TAG} letters, digits and - _ . : +"
            )));
        }
    }
    Ok(())
}

fn parse_tags(text: &str) -> Result<Vec<String>, CatalogError> {
    serde_json::from_str(text).map_err(|e| CatalogError::BadRow(format!("tags: {e}")))
}

fn read_labels(conn: &Db, id: &VersionId) -> Result<Labels, CatalogError> {
    let row: Option<(Option<String>, String)> = conn
        .query_row(
            "SELECT note, tags FROM version_labels WHERE version = ?1",
            params![&id.as_bytes()[..]],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql("read the version's notes and tags"))?;
    match row {
        None => Ok(Labels::default()),
        Some((note, tags)) => Ok(Labels {
            note,
            tags: parse_tags(&tags)?,
        }),
    }
}

fn read_lease(conn: &Db, machine: &str) -> Result<Option<Lease>, CatalogError> {
    let row = conn
        .query_row(
            "SELECT session, station, station_name, pid, base, started_ms, heartbeat_ms
             FROM leases WHERE machine = ?1",
            params![machine],
            |r| {
                Ok((
                    Lease {
                        machine: machine.to_string(),
                        session: r.get(0)?,
                        station: r.get(1)?,
                        station_name: r.get(2)?,
                        pid: r.get(3)?,
                        base: None,
                        started_ms: r.get(5)?,
                        heartbeat_ms: r.get(6)?,
                    },
                    r.get::<_, Option<Vec<u8>>>(4)?,
                ))
            },
        )
        .optional()
        .map_err(sql("read the lease"))?;
    row.map(|(mut lease, base)| {
        lease.base = opt_vid(base)?;
        Ok(lease)
    })
    .transpose()
}

impl Catalog {
    /// The lease on `machine`, if any.
    pub fn lease(&self, machine: &MachineName) -> Result<Option<Lease>, CatalogError> {
        read_lease(&self.conn, machine.as_str())
    }

    /// Takes the lease on `lease.machine`. If another session holds it, `may_replace`
    /// decides: it sees the holder and returns true to take over (for `--force`, or a
    /// holder known to be dead). Returns the lease that was replaced, if any.
    pub fn acquire_lease(
        &mut self,
        lease: &Lease,
        may_replace: impl FnOnce(&Lease) -> bool,
    ) -> Result<Option<Lease>, CatalogError> {
        mname(lease.machine.clone())?; // validate before writing
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start taking the lease"))?;
        // Read through the transaction's connection: `self.lease` would borrow self.
        let held = read_lease(&tx, &lease.machine)?;
        if let Some(h) = &held
            && h.session != lease.session
            && !may_replace(h)
        {
            return Err(CatalogError::LeaseHeld {
                machine: lease.machine.clone(),
                held: Box::new(h.clone()),
            });
        }
        if let Some(h) = &held
            && h.session != lease.session
        {
            // The displaced session may still check in; until then its base stays.
            tx.execute(
                "INSERT INTO displaced (session, machine, station_name, base, since_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (session) DO UPDATE SET machine = excluded.machine,
                    station_name = excluded.station_name, base = excluded.base,
                    since_ms = excluded.since_ms, checkpoint = NULL",
                params![
                    h.session,
                    h.machine,
                    h.station_name,
                    h.base.as_ref().map(|b| b.as_bytes().to_vec()),
                    now_ms()
                ],
            )
            .map_err(sql("record the displaced session"))?;
            tx.execute(
                "UPDATE displaced SET checkpoint = (SELECT checkpoint FROM leases WHERE machine = ?1)
                 WHERE session = ?2",
                params![h.machine, h.session],
            )
            .map_err(sql("record the displaced session's checkpoint"))?;
        }
        tx.execute(
            "INSERT INTO leases (machine, session, station, station_name, pid, base, started_ms, heartbeat_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (machine) DO UPDATE SET session = excluded.session,
                station = excluded.station, station_name = excluded.station_name,
                pid = excluded.pid, base = excluded.base, started_ms = excluded.started_ms,
                heartbeat_ms = excluded.heartbeat_ms, checkpoint = NULL",
            params![
                lease.machine,
                lease.session,
                lease.station,
                lease.station_name,
                lease.pid,
                lease.base.as_ref().map(|b| b.as_bytes().to_vec()),
                lease.started_ms,
                lease.heartbeat_ms
            ],
        )
        .map_err(sql("write the lease"))?;
        tx.commit().map_err(sql("commit the lease"))?;
        Ok(held)
    }

    /// Releases the lease on `machine` if `session` still holds it; returns whether it did.
    /// A displaced session's protection of its base ends too.
    pub fn release_lease(
        &self,
        machine: &MachineName,
        session: &str,
    ) -> Result<bool, CatalogError> {
        self.conn
            .execute(
                "DELETE FROM displaced WHERE machine = ?1 AND session = ?2",
                params![machine.as_str(), session],
            )
            .map_err(sql("release the displaced session"))?;
        let n = self
            .conn
            .execute(
                "DELETE FROM leases WHERE machine = ?1 AND session = ?2",
                params![machine.as_str(), session],
            )
            .map_err(sql("release the lease"))?;
        Ok(n == 1)
    }

    /// Versions of `machine` that sessions still read from, with the station of each:
    /// the live lease's base and the bases of sessions displaced from it.
    pub fn session_bases(
        &self,
        machine: &MachineName,
    ) -> Result<Vec<(VersionId, String)>, CatalogError> {
        session_bases_in(&self.conn, machine)
    }

    /// Applies a retention policy to `machine`'s versions (see [`retention`]) and, unless
    /// `dry_run`, removes the versions it does not keep, in one transaction: the head, the
    /// sessions' bases and what is protected are read in the same transaction that
    /// removes, so a session that starts meanwhile waits or is seen. Removing a version
    /// is what `rm` does to it (its chunks go at the next GC; the versions made from it
    /// keep its id as their parent). The head is never removed, so it never moves.
    pub fn forget(
        &mut self,
        machine: &MachineName,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<ForgetReport, CatalogError> {
        if policy.is_empty() {
            return Err(CatalogError::EmptyPolicy(machine.to_string()));
        }
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start forgetting versions"))?;
        let head = read_head(&tx, machine)?;
        let bases = session_bases_in(&tx, machine)?;
        let mut candidates = Vec::new();
        {
            let mut st = tx
                .prepare_cached(
                    "SELECT id, created_ms,
                        EXISTS (SELECT 1 FROM version_streams s WHERE s.version = v.id AND s.name = 'memory'),
                        EXISTS (SELECT 1 FROM versions c WHERE c.parent = v.id)
                     FROM versions v WHERE machine = ?1 ORDER BY created_ms DESC, rowid DESC",
                )
                .map_err(sql("list versions"))?;
            let rows = st
                .query_map(params![machine.as_str()], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, bool>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                })
                .map_err(sql("list versions"))?;
            for row in rows {
                let (id, created_ms, memory, has_child) = row.map_err(sql("list versions"))?;
                let id = vid(id)?;
                let mut protected = Vec::new();
                if head == Some(id) {
                    protected.push(Protected::Head);
                }
                for (b, station) in &bases {
                    if *b == id {
                        protected.push(Protected::SessionBase {
                            station: station.clone(),
                        });
                    }
                }
                if memory && !has_child && head != Some(id) {
                    protected.push(Protected::Suspended);
                }
                candidates.push(retention::Candidate {
                    id,
                    created_ms,
                    protected,
                });
            }
        }
        let versions = retention::apply(&candidates, policy);
        let removed: Vec<VersionId> = versions
            .iter()
            .filter(|d| !d.kept())
            .map(|d| d.version)
            .collect();
        if !dry_run {
            for id in &removed {
                for (table, col) in [
                    ("versions", "id"),
                    ("version_streams", "version"),
                    ("version_labels", "version"),
                ] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE {col} = ?1"),
                        params![&id.as_bytes()[..]],
                    )
                    .map_err(sql("remove a version"))?;
                }
            }
            tx.commit().map_err(sql("commit the removals"))?;
        }
        Ok(ForgetReport {
            machine: machine.to_string(),
            policy: *policy,
            dry_run,
            versions,
            removed,
        })
    }

    /// Moves `machine`'s head to its version `to` if the head is still `expected`
    /// (compare-and-swap, DESIGN invariant 2), and only while no session holds the
    /// machine: a session's check-in moves the head by its own compare-and-swap, and
    /// would otherwise be kept beside a head the user just chose.
    pub fn set_head(
        &mut self,
        machine: &MachineName,
        to: VersionId,
        expected: Option<VersionId>,
    ) -> Result<(), CatalogError> {
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start moving the head"))?;
        let head = read_head(&tx, machine)?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM versions WHERE id = ?1 AND machine = ?2",
                params![&to.as_bytes()[..], machine.as_str()],
                |_| Ok(()),
            )
            .optional()
            .map_err(sql("find the version"))?
            .is_some();
        if !exists {
            return Err(CatalogError::VersionNotFound {
                machine: machine.to_string(),
                prefix: to.to_hex(),
            });
        }
        if let Some(held) = read_lease(&tx, machine.as_str())? {
            return Err(CatalogError::InSession {
                machine: machine.to_string(),
                held: Box::new(held),
            });
        }
        let moved = tx
            .execute(
                "UPDATE machines SET head = ?1 WHERE name = ?2 AND head IS NOT DISTINCT FROM ?3",
                params![
                    &to.as_bytes()[..],
                    machine.as_str(),
                    expected.as_ref().map(|p| p.as_bytes().to_vec())
                ],
            )
            .map_err(sql("move the head"))?;
        if moved != 1 {
            return Err(CatalogError::HeadMoved {
                machine: machine.to_string(),
                expected,
                head,
            });
        }
        tx.commit().map_err(sql("commit the head's move"))?;
        Ok(())
    }

    /// Renames machine `old` to `new`, keeping every version, its id, parent links,
    /// notes, tags, streams and the retention policy: a rename is a change of the
    /// catalog's name for the same history, so `new@VERSION` names what `old@VERSION`
    /// named. The record checksums cover the machine's name, so each record is held to
    /// its checksum first (a damaged one is refused) and sealed again under the new
    /// name, in the same transaction. Refused while a session holds `old` (its check-in
    /// would commit to the old name), while a session that was taken over has still to
    /// check in, when `new` exists, and when the owner (the user part) changes: a
    /// machine's chunks are charged to its owner, so to give a machine to another user,
    /// fork it (`mbank create NEW --from OLD`).
    pub fn rename_machine(
        &mut self,
        old: &MachineName,
        new: &MachineName,
    ) -> Result<(), CatalogError> {
        if old.user() != new.user() {
            return Err(CatalogError::BadRename(format!(
                "cannot rename {old} to {new}: a rename keeps the owner ({}); to give the \
                 machine to {}, fork it: mbank create {new} --from {old}",
                old.user(),
                new.user()
            )));
        }
        if old == new {
            return Err(CatalogError::BadRename(format!(
                "{old} already has that name; nothing to rename"
            )));
        }
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start the rename"))?;
        let exists = |name: &str| {
            tx.query_row(
                "SELECT 1 FROM machines WHERE name = ?1",
                params![name],
                |_| Ok(()),
            )
            .optional()
            .map_err(sql("look the machine up"))
            .map(|o| o.is_some())
        };
        if !exists(old.as_str())? {
            return Err(CatalogError::MachineNotFound(old.to_string()));
        }
        if exists(new.as_str())? {
            return Err(CatalogError::MachineExists(new.to_string()));
        }
        if let Some(held) = read_lease(&tx, old.as_str())? {
            return Err(CatalogError::InSession {
                machine: old.to_string(),
                held: Box::new(held),
            });
        }
        let displaced: Option<String> = tx
            .query_row(
                "SELECT station_name FROM displaced WHERE machine = ?1 LIMIT 1",
                params![old.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("look for sessions still to check in"))?;
        if let Some(station) = displaced {
            return Err(CatalogError::BadRename(format!(
                "cannot rename {old}: a session of it on station {station} was taken over and \
                 has not checked in yet (its check-in goes to {old}); run `mbank recover` \
                 there first"
            )));
        }
        rename_records(&tx, old.as_str(), new.as_str())?;
        tx.commit().map_err(sql("commit the rename"))?;
        Ok(())
    }

    /// Changes the note and tags of version `v`; returns them as they now are.
    pub fn label(&mut self, v: &VersionInfo, change: &LabelChange) -> Result<Labels, CatalogError> {
        check_labels(change)?;
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start labelling the version"))?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM versions WHERE id = ?1 AND machine = ?2",
                params![&v.id.as_bytes()[..], v.machine.as_str()],
                |_| Ok(()),
            )
            .optional()
            .map_err(sql("find the version"))?
            .is_some();
        if !exists {
            return Err(CatalogError::VersionNotFound {
                machine: v.machine.to_string(),
                prefix: v.id.to_hex(),
            });
        }
        let mut labels = read_labels(&tx, &v.id)?;
        if let Some(n) = &change.note {
            labels.note = (!n.is_empty()).then(|| n.clone());
        }
        labels.tags.retain(|t| !change.remove_tags.contains(t));
        for t in &change.add_tags {
            if !labels.tags.contains(t) {
                labels.tags.push(t.clone());
            }
        }
        labels.tags.sort();
        if labels.tags.len() > MAX_TAGS {
            return Err(CatalogError::BadLabel(format!(
                "{}@{} would have {} tags; a version holds at most {MAX_TAGS}",
                v.machine,
                v.id.short(),
                labels.tags.len()
            )));
        }
        if labels.is_empty() {
            tx.execute(
                "DELETE FROM version_labels WHERE version = ?1",
                params![&v.id.as_bytes()[..]],
            )
        } else {
            tx.execute(
                "INSERT INTO version_labels (version, machine, note, tags) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (version) DO UPDATE SET machine = excluded.machine,
                    note = excluded.note, tags = excluded.tags",
                params![
                    &v.id.as_bytes()[..],
                    v.machine.as_str(),
                    labels.note,
                    serde_json::to_string(&labels.tags).expect("tags serialise")
                ],
            )
        }
        .map_err(sql("write the version's notes and tags"))?;
        tx.commit().map_err(sql("commit the notes and tags"))?;
        Ok(labels)
    }

    /// The notes and tags of `machine`'s versions (only those that have some).
    pub fn labels(&self, machine: &MachineName) -> Result<Vec<VersionLabels>, CatalogError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT version, note, tags FROM version_labels WHERE machine = ?1")
            .map_err(sql("list notes and tags"))?;
        let rows = st
            .query_map(params![machine.as_str()], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(sql("list notes and tags"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, note, tags) = row.map_err(sql("list notes and tags"))?;
            out.push(VersionLabels {
                version: vid(id)?,
                labels: Labels {
                    note,
                    tags: parse_tags(&tags)?,
                },
            });
        }
        Ok(out)
    }

    /// `machine`'s retention policy, applied after each check-in, if it has one.
    pub fn policy(&self, machine: &MachineName) -> Result<Option<Policy>, CatalogError> {
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT policy FROM policies WHERE machine = ?1",
                params![machine.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read the retention policy"))?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| CatalogError::BadRow(format!("retention policy of {machine}: {e}")))
        })
        .transpose()
    }

    /// Sets (or with `None`, removes) `machine`'s retention policy.
    pub fn set_policy(
        &mut self,
        machine: &MachineName,
        policy: Option<&Policy>,
    ) -> Result<(), CatalogError> {
        if policy.is_some_and(Policy::is_empty) {
            return Err(CatalogError::EmptyPolicy(machine.to_string()));
        }
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start setting the retention policy"))?;
        read_head(&tx, machine)?; // the machine exists
        match policy {
            Some(p) => tx.execute(
                "INSERT INTO policies (machine, policy) VALUES (?1, ?2)
                 ON CONFLICT (machine) DO UPDATE SET policy = excluded.policy",
                params![
                    machine.as_str(),
                    serde_json::to_string(p).expect("policy serialises")
                ],
            ),
            None => tx.execute(
                "DELETE FROM policies WHERE machine = ?1",
                params![machine.as_str()],
            ),
        }
        .map_err(sql("write the retention policy"))?;
        tx.commit().map_err(sql("commit the retention policy"))?;
        Ok(())
    }

    /// `machine`'s settings (all unset when it has none). Refuses an unknown machine.
    pub fn settings(&self, machine: &MachineName) -> Result<MachineSettings, CatalogError> {
        if self.machine(machine)?.is_none() {
            return Err(CatalogError::MachineNotFound(machine.to_string()));
        }
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT settings FROM machine_settings WHERE machine = ?1",
                params![machine.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read the machine's settings"))?;
        match text {
            None => Ok(MachineSettings::default()),
            Some(t) => serde_json::from_str(&t)
                .map_err(|e| CatalogError::BadRow(format!("settings of {machine}: {e}"))),
        }
    }

    /// Replaces `machine`'s settings (all unset removes the row).
    pub fn set_settings(
        &mut self,
        machine: &MachineName,
        settings: &MachineSettings,
    ) -> Result<(), CatalogError> {
        let tx = self
            .conn
            .transaction_with_behavior(Behavior::Immediate)
            .map_err(sql("start setting the machine's settings"))?;
        read_head(&tx, machine)?; // the machine exists
        if settings.is_empty() {
            tx.execute(
                "DELETE FROM machine_settings WHERE machine = ?1",
                params![machine.as_str()],
            )
        } else {
            tx.execute(
                "INSERT INTO machine_settings (machine, settings) VALUES (?1, ?2)
                 ON CONFLICT (machine) DO UPDATE SET settings = excluded.settings",
                params![
                    machine.as_str(),
                    serde_json::to_string(settings).expect("settings serialise")
                ],
            )
        }
        .map_err(sql("write the machine's settings"))?;
        tx.commit().map_err(sql("commit the machine's settings"))?;
        Ok(())
    }

    /// Records `version` as the last checkpoint of `session` on `machine`, protected like
    /// its base from now on (and the checkpoint before it no longer); false if the
    /// session holds no lease and was not displaced (it has checked in).
    pub fn lease_checkpoint(
        &self,
        machine: &MachineName,
        session: &str,
        version: VersionId,
    ) -> Result<bool, CatalogError> {
        let mut n = 0;
        for table in ["leases", "displaced"] {
            n += self
                .conn
                .execute(
                    &format!(
                        "UPDATE {table} SET checkpoint = ?1 WHERE machine = ?2 AND session = ?3"
                    ),
                    params![version.as_bytes().to_vec(), machine.as_str(), session],
                )
                .map_err(sql("record the session's checkpoint"))?;
        }
        Ok(n > 0)
    }

    /// Records that `session` is alive; false if it no longer holds the lease.
    pub fn heartbeat_lease(
        &self,
        machine: &MachineName,
        session: &str,
    ) -> Result<bool, CatalogError> {
        let n = self
            .conn
            .execute(
                "UPDATE leases SET heartbeat_ms = ?1 WHERE machine = ?2 AND session = ?3",
                params![now_ms(), machine.as_str(), session],
            )
            .map_err(sql("renew the lease"))?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbank_core::ChunkId;
    use mbank_sql::testing::TempPostgres;
    use rusqlite::Connection;
    use std::sync::OnceLock;

    /// One PostgreSQL server for this test binary; a database per catalog.
    fn pg() -> &'static TempPostgres {
        static PG: OnceLock<TempPostgres> = OnceLock::new();
        PG.get_or_init(|| TempPostgres::start().expect("start PostgreSQL"))
    }

    /// A new catalog on a fresh PostgreSQL database, and the database's URL.
    fn pg_cat() -> (String, Catalog) {
        let url = pg().new_database().unwrap();
        let c = Catalog::open_postgres(&url).unwrap();
        (url, c)
    }

    /// A new catalog in each database: SQLite (in a temporary directory) and
    /// PostgreSQL.
    fn cats() -> Vec<(Option<tempfile::TempDir>, Catalog)> {
        let (d, lite) = cat();
        vec![(Some(d), lite), (None, pg_cat().1)]
    }

    /// `sql` with SQLite's blob literals (`x'00ff'`) as PostgreSQL takes them.
    fn dialect_sql(c: &Catalog, sql: &str) -> String {
        match c.dialect() {
            Dialect::Sqlite => sql.to_string(),
            Dialect::Postgres => {
                let re_start = "x'";
                let mut out = String::new();
                let mut rest = sql;
                while let Some(i) = rest.find(re_start) {
                    let end = rest[i + 2..].find('\'').expect("a closed literal") + i + 2;
                    out.push_str(&rest[..i]);
                    out.push_str(&format!("decode('{}', 'hex')", &rest[i + 2..end]));
                    rest = &rest[end + 1..];
                }
                out.push_str(rest);
                out
            }
        }
    }

    /// A catalog made at schema 1, as the first mbank wrote it, then opened (migrated).
    fn catalog_from_schema_1() -> (tempfile::TempDir, Catalog) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.db");
        let conn = Connection::open(&p).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);
        let c = Catalog::open(&p, false, false).unwrap();
        (d, c)
    }

    fn cat() -> (tempfile::TempDir, Catalog) {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::open(&d.path().join("catalog.db"), true, false).unwrap();
        (d, c)
    }

    /// `N` versions of machine `m` committed one on another, each moving the head.
    fn commit_chain<const N: usize>(c: &mut Catalog, m: &str) -> [VersionInfo; N] {
        let mut parent = None;
        std::array::from_fn(|i| {
            let (v, idx) = info(m, parent, i as i64 + 1);
            c.commit_version(&v, &idx, &[], parent).unwrap();
            parent = Some(v.id);
            v
        })
    }

    fn info(m: &str, parent: Option<VersionId>, t: i64) -> (VersionInfo, DiskIndex) {
        let mut idx = DiskIndex::zeroed(3 * 4096, 4096);
        idx.chunks[1] = Some(ChunkId::of(&t.to_le_bytes()));
        (
            VersionInfo {
                id: VersionId::random(),
                machine: m.parse().unwrap(),
                parent,
                created_ms: t,
                disk_size: idx.disk_size,
                chunk_size: 4096,
                stats: VersionStats {
                    chunks_total: 3,
                    ..Default::default()
                },
                config: None,
                streams: Vec::new(),
            },
            idx,
        )
    }

    #[test]
    fn head_moves_only_by_compare_and_swap() {
        for (_d, mut c) in cats() {
            let (v1, i1) = info("alice/dev", None, 1);
            assert_eq!(
                c.commit_version(&v1, &i1, &[], None).unwrap(),
                CommitOutcome::HeadMoved
            );
            // Two writers both started from v1; the second loses but keeps its version.
            let (v2, i2) = info("alice/dev", Some(v1.id), 2);
            let (v3, i3) = info("alice/dev", Some(v1.id), 3);
            assert_eq!(
                c.commit_version(&v2, &i2, &[], Some(v1.id)).unwrap(),
                CommitOutcome::HeadMoved
            );
            assert_eq!(
                c.commit_version(&v3, &i3, &[], Some(v1.id)).unwrap(),
                CommitOutcome::Kept { head: Some(v2.id) }
            );
            let m = c.machine(&v1.machine).unwrap().unwrap();
            assert_eq!(m.head, Some(v2.id));
            assert_eq!(m.versions, 3);
            let vs = c.versions(&v1.machine).unwrap();
            assert_eq!(
                vs.iter().map(|v| v.id).collect::<Vec<_>>(),
                [v3.id, v2.id, v1.id]
            );
            assert_eq!(c.disk_index(&vs[0]).unwrap(), i3);
            assert_eq!(vs[0].stats.chunks_total, 3);
        }
    }

    #[test]
    fn head_moves_back_only_from_the_head_it_expects_and_not_during_a_session() {
        for (_d, mut c) in cats() {
            let [v1, v2, v3] = commit_chain(&mut c, "alice/dev");
            let m = v1.machine.clone();
            // Two head moves that both saw v3: the first wins, the second is refused and
            // names the head it found.
            c.set_head(&m, v1.id, Some(v3.id)).unwrap();
            let e = c.set_head(&m, v2.id, Some(v3.id)).unwrap_err();
            assert!(
                matches!(e, CatalogError::HeadMoved { head, expected, .. } if head == Some(v1.id) && expected == Some(v3.id)),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&v1.id.short())
                    && msg.contains(&v3.id.short())
                    && msg.contains("moved meanwhile"),
                "{msg}"
            );
            assert_eq!(c.machine(&m).unwrap().unwrap().head, Some(v1.id));
            // A version of another machine is not a head of this one.
            let (o, oi) = info("alice/other", None, 4);
            c.commit_version(&o, &oi, &[], None).unwrap();
            assert!(matches!(
                c.set_head(&m, o.id, Some(v1.id)),
                Err(CatalogError::VersionNotFound { .. })
            ));
            // While a session holds the machine, its check-in owns the head.
            let lease = Lease {
                machine: m.to_string(),
                session: "s1".into(),
                station: "a".into(),
                station_name: "host:a".into(),
                pid: 7,
                base: Some(v1.id),
                started_ms: 0,
                heartbeat_ms: 0,
            };
            c.acquire_lease(&lease, |_| false).unwrap();
            let e = c.set_head(&m, v3.id, Some(v1.id)).unwrap_err();
            assert!(matches!(e, CatalogError::InSession { .. }), "{e:?}");
            assert!(e.to_string().contains("host:a"), "{e}");
            c.release_lease(&m, "s1").unwrap();
            c.set_head(&m, v3.id, Some(v1.id)).unwrap();
            assert_eq!(c.machine(&m).unwrap().unwrap().head, Some(v3.id));
        }
    }

    #[test]
    fn rename_keeps_versions_ids_labels_and_checksums_and_refuses_during_a_session() {
        for (_d, mut c) in cats() {
            let (v1, i1) = info("alice/dev", None, 1);
            let (v2, i2) = info("alice/dev", Some(v1.id), 2);
            c.commit_version(&v1, &i1, &[], None).unwrap();
            c.commit_version(&v2, &i2, &[], Some(v1.id)).unwrap();
            let (old, new): (MachineName, MachineName) =
                ("alice/dev".parse().unwrap(), "alice/work".parse().unwrap());
            let change = LabelChange {
                note: Some("kept".into()),
                ..Default::default()
            };
            c.label(&v1, &change).unwrap();
            let policy = Policy {
                keep_last: 3,
                ..Default::default()
            };
            c.set_policy(&old, Some(&policy)).unwrap();
            let settings = MachineSettings {
                checkpoint_minutes: Some(4),
            };
            c.set_settings(&old, &settings).unwrap();
            // Refused while a session holds it.
            let lease = Lease {
                machine: old.to_string(),
                session: "s1".into(),
                station: "a".into(),
                station_name: "host:a".into(),
                pid: 7,
                base: Some(v2.id),
                started_ms: 0,
                heartbeat_ms: 0,
            };
            c.acquire_lease(&lease, |_| false).unwrap();
            let e = c.rename_machine(&old, &new).unwrap_err();
            assert!(matches!(e, CatalogError::InSession { .. }), "{e:?}");
            c.release_lease(&old, "s1").unwrap();
            // Another owner, or a taken name, is refused.
            let e = c
                .rename_machine(&old, &"bob/dev".parse().unwrap())
                .unwrap_err();
            assert!(e.to_string().contains("keeps the owner"), "{e}");
            let (o, oi) = info("alice/other", None, 3);
            c.commit_version(&o, &oi, &[], None).unwrap();
            let e = c.rename_machine(&old, &o.machine).unwrap_err();
            assert!(matches!(e, CatalogError::MachineExists(_)), "{e:?}");

            c.rename_machine(&old, &new).unwrap();
            assert!(c.machine(&old).unwrap().is_none());
            let m = c.machine(&new).unwrap().unwrap();
            assert_eq!((m.head, m.versions), (Some(v2.id), 2));
            let vs = c.versions(&new).unwrap();
            assert_eq!(vs.iter().map(|v| v.id).collect::<Vec<_>>(), [v2.id, v1.id]);
            assert_eq!(vs[0].parent, Some(v1.id));
            assert_eq!(c.disk_index(&vs[1]).unwrap(), i1);
            assert_eq!(
                c.labels(&new).unwrap()[0].labels.note.as_deref(),
                Some("kept")
            );
            assert_eq!(
                c.policy(&new).unwrap(),
                Some(policy),
                "the policy goes along"
            );
            assert_eq!(c.settings(&new).unwrap(), settings, "the settings go along");
            let check = c.check_records(None).unwrap();
            assert!(check.problems.is_empty(), "{check:?}");
        }
    }

    #[test]
    fn rename_refuses_a_damaged_record() {
        for (_d, mut c) in cats() {
            let (v1, i1) = info("alice/dev", None, 1);
            c.commit_version(&v1, &i1, &[], None).unwrap();
            c.conn
                .execute_batch("UPDATE versions SET created_ms = created_ms + 1")
                .unwrap();
            let e = c
                .rename_machine(&v1.machine, &"alice/new".parse().unwrap())
                .unwrap_err();
            assert!(matches!(e, CatalogError::RecordDamaged { .. }), "{e:?}");
            assert!(c.machine(&v1.machine).unwrap().is_some());
        }
    }

    #[test]
    fn notes_and_tags_change_go_with_their_version_and_are_bounded() {
        for (_d, mut c) in cats() {
            let (v1, i1) = info("alice/dev", None, 1);
            let (v2, i2) = info("alice/dev", Some(v1.id), 2);
            c.commit_version(&v1, &i1, &[], None).unwrap();
            c.commit_version(&v2, &i2, &[], Some(v1.id)).unwrap();
            let m = v1.machine.clone();
            let change = LabelChange {
                note: Some("before the exam".into()),
                add_tags: vec!["exam".into(), "good".into()],
                ..Default::default()
            };
            let l = c.label(&v1, &change).unwrap();
            assert_eq!(l.note.as_deref(), Some("before the exam"));
            assert_eq!(l.tags, ["exam", "good"]);
            let l = c
                .label(
                    &v1,
                    &LabelChange {
                        remove_tags: vec!["good".into()],
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(l.tags, ["exam"]);
            assert_eq!(l.note.as_deref(), Some("before the exam"), "the note stays");
            assert_eq!(c.labels(&m).unwrap().len(), 1);
            // Record checksums do not cover labels: verify stays quiet.
            assert!(c.check_records(None).unwrap().problems.is_empty());
            for bad in ["", "two words", &"x".repeat(MAX_TAG + 1)] {
                let e = c
                    .label(
                        &v2,
                        &LabelChange {
                            add_tags: vec![bad.to_string()],
                            ..Default::default()
                        },
                    )
                    .unwrap_err();
                assert!(matches!(e, CatalogError::BadLabel(_)), "{bad:?}: {e}");
            }
            let e = c
                .label(
                    &v2,
                    &LabelChange {
                        note: Some("n".repeat(MAX_NOTE + 1)),
                        ..Default::default()
                    },
                )
                .unwrap_err();
            assert!(matches!(e, CatalogError::BadLabel(_)));
            c.remove_version(&v1).unwrap();
            assert!(
                c.labels(&m).unwrap().is_empty(),
                "labels go with their version"
            );
            let p = Policy {
                keep_daily: 3,
                ..Default::default()
            };
            c.set_policy(&m, Some(&p)).unwrap();
            assert_eq!(c.policy(&m).unwrap(), Some(p));
            assert!(matches!(
                c.set_policy(&m, Some(&Policy::default())),
                Err(CatalogError::EmptyPolicy(_))
            ));
            c.remove_machine(&m).unwrap();
            assert_eq!(
                c.policy(&m).unwrap(),
                None,
                "the policy goes with the machine"
            );
        }
    }

    #[test]
    fn resolve_prefixes() {
        for (_d, mut c) in cats() {
            let (v1, i1) = info("alice/dev", None, 1);
            c.commit_version(&v1, &i1, &[], None).unwrap();
            let m = &v1.machine;
            assert_eq!(c.resolve(m, None).unwrap().id, v1.id);
            assert_eq!(c.resolve(m, Some(&v1.id.to_hex()[..6])).unwrap().id, v1.id);
            assert_eq!(
                c.resolve(m, Some(&v1.id.to_hex().to_uppercase()))
                    .unwrap()
                    .id,
                v1.id
            );
            let other = if v1.id.to_hex().starts_with("0000") {
                "1111"
            } else {
                "0000"
            };
            assert!(matches!(
                c.resolve(m, Some(other)),
                Err(CatalogError::VersionNotFound { .. })
            ));
            let bob: MachineName = "bob/dev".parse().unwrap();
            assert!(matches!(
                c.resolve(&bob, None),
                Err(CatalogError::MachineNotFound(_))
            ));
        }
    }

    #[test]
    fn remove_moves_head_back() {
        for (_d, mut c) in cats() {
            let (v1, i1) = info("alice/dev", None, 1);
            let (v2, i2) = info("alice/dev", Some(v1.id), 2);
            c.commit_version(&v1, &i1, &[], None).unwrap();
            c.commit_version(&v2, &i2, &[], Some(v1.id)).unwrap();
            assert_eq!(c.remove_version(&v2).unwrap(), Some(v1.id));
            assert_eq!(c.remove_version(&v1).unwrap(), None);
            assert_eq!(c.machine(&v1.machine).unwrap().unwrap().head, None);
            assert_eq!(c.remove_machine(&v1.machine).unwrap(), 0);
            assert!(c.machine(&v1.machine).unwrap().is_none());
        }
    }

    /// Every deletion of a version record is counted, with the time of the last, for
    /// GC (schema 7): by `remove_version` and by `remove_machine`, in a catalog
    /// migrated from schema 1 too.
    #[test]
    fn removals_of_versions_are_counted_for_gc() {
        let (d, lite) = catalog_from_schema_1();
        for (_d, mut c) in [(Some(d), lite), (None, pg_cat().1)] {
            assert_eq!(c.version_removals().unwrap(), Removals::default());
            let [v1, _, v3] = commit_chain(&mut c, "alice/dev");
            assert_eq!(
                c.version_removals().unwrap().count,
                0,
                "commits are not removals"
            );
            let before = now_ms();
            c.remove_version(&v3).unwrap();
            let r = c.version_removals().unwrap();
            let after = now_ms();
            assert_eq!(r.count, 1);
            assert!(
                (before..=after).contains(&r.last_ms),
                "{r:?} not in {before}..={after}"
            );
            assert_eq!(c.remove_machine(&v1.machine).unwrap(), 2);
            assert_eq!(c.version_removals().unwrap().count, 3);
        }
    }

    #[test]
    fn writers_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.db");
        let c = Catalog::open(&p, true, false).unwrap();
        let w = c.register_writer(42, "host", "import").unwrap();
        c.heartbeat(w.id).unwrap();
        drop(c);
        let c = Catalog::open(&p, false, true).unwrap();
        assert_eq!(c.writers().unwrap().len(), 1);
        drop(c);
        let c = Catalog::open(&p, false, false).unwrap();
        c.unregister_writer(w.id).unwrap();
        assert!(c.writers().unwrap().is_empty());

        // On PostgreSQL: ids from the identity, seen through another connection.
        let (url, c) = pg_cat();
        let w1 = c.register_writer(42, "host", "import").unwrap();
        let w2 = c.register_writer(43, "host", "gc").unwrap();
        assert_ne!(w1.id, w2.id);
        c.heartbeat(w1.id).unwrap();
        let other = c.reopen().unwrap();
        other.unregister_writer(w1.id).unwrap();
        let left = Catalog::open_postgres(&url).unwrap().writers().unwrap();
        assert_eq!(left, vec![w2]);
    }

    #[test]
    fn one_lease_per_machine() {
        for (_d, mut c) in cats() {
            let b1 = VersionId::random();
            let b2 = VersionId::random();
            let lease = |session: &str, station: &str| Lease {
                machine: "alice/dev".into(),
                session: session.into(),
                station: station.into(),
                station_name: format!("host:{station}"),
                pid: 1,
                base: Some(if station == "a" { b1 } else { b2 }),
                started_ms: 1_795_000_000_000,
                heartbeat_ms: 0,
            };
            assert_eq!(c.acquire_lease(&lease("s1", "a"), |_| false).unwrap(), None);
            let err = c.acquire_lease(&lease("s2", "b"), |_| false).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("host:a") && msg.contains("2026-11-18 11:06:40"),
                "{msg}"
            );
            let old = c
                .acquire_lease(&lease("s2", "b"), |h| h.station == "a")
                .unwrap();
            assert_eq!(old.unwrap().session, "s1");
            let m: MachineName = "alice/dev".parse().unwrap();
            // Both sessions' bases stay protected until each checks in.
            let mut bases = c.session_bases(&m).unwrap();
            bases.sort();
            let mut want = vec![(b1, "host:a".to_string()), (b2, "host:b".to_string())];
            want.sort();
            assert_eq!(bases, want);
            assert!(
                !c.release_lease(&m, "s1").unwrap(),
                "the replaced session no longer holds it"
            );
            assert_eq!(
                c.session_bases(&m).unwrap(),
                vec![(b2, "host:b".to_string())]
            );
            assert!(!c.heartbeat_lease(&m, "s1").unwrap());
            assert!(c.heartbeat_lease(&m, "s2").unwrap());
            assert!(c.release_lease(&m, "s2").unwrap());
            assert_eq!(c.lease(&m).unwrap(), None);
            assert!(c.session_bases(&m).unwrap().is_empty());
        }
    }

    /// A session's last checkpoint is protected beside its base, the one before it no
    /// longer; a displaced session keeps both until it checks in.
    #[test]
    fn a_sessions_last_checkpoint_is_protected_like_its_base() {
        for (_d, mut c) in cats() {
            let m: MachineName = "alice/dev".parse().unwrap();
            let (b, c1, c2, b2) = (
                VersionId::random(),
                VersionId::random(),
                VersionId::random(),
                VersionId::random(),
            );
            let lease = |session: &str, station: &str, base| Lease {
                machine: "alice/dev".into(),
                session: session.into(),
                station: station.into(),
                station_name: station.into(),
                pid: 1,
                base: Some(base),
                started_ms: 1_795_000_000_000,
                heartbeat_ms: 0,
            };
            let sorted = |c: &Catalog| {
                let mut v: Vec<VersionId> = c
                    .session_bases(&m)
                    .unwrap()
                    .into_iter()
                    .map(|x| x.0)
                    .collect();
                v.sort();
                v
            };
            let set = |v: &[VersionId]| {
                let mut v = v.to_vec();
                v.sort();
                v
            };
            c.acquire_lease(&lease("s1", "a", b), |_| false).unwrap();
            assert!(c.lease_checkpoint(&m, "s1", c1).unwrap());
            assert_eq!(sorted(&c), set(&[b, c1]));
            assert!(c.lease_checkpoint(&m, "s1", c2).unwrap());
            assert_eq!(sorted(&c), set(&[b, c2]), "only the last checkpoint");
            // Taken over from the checkpoint: the displaced session keeps its own.
            c.acquire_lease(&lease("s2", "b", b2), |_| true).unwrap();
            assert_eq!(sorted(&c), set(&[b, c2, b2]));
            assert!(c.lease_checkpoint(&m, "s1", c1).unwrap(), "displaced");
            assert_eq!(sorted(&c), set(&[b, c1, b2]));
            assert!(
                !c.lease_checkpoint(&m, "s3", c1).unwrap(),
                "no such session"
            );
            c.release_lease(&m, "s1").unwrap();
            c.release_lease(&m, "s2").unwrap();
            assert!(c.session_bases(&m).unwrap().is_empty());
            assert!(!c.lease_checkpoint(&m, "s1", c2).unwrap(), "checked in");
        }
    }

    /// Records speak the API's vocabulary (`machine`, `version`) and still read the
    /// older spellings (`name`, `id`).
    #[test]
    fn records_write_machine_and_version_and_read_the_old_names() {
        let (v, _) = info("alice/dev", None, 1);
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["version"], v.id.to_hex(), "{j}");
        assert!(j.get("id").is_none(), "{j}");
        let mut old = j.clone();
        let o = old.as_object_mut().unwrap();
        let id = o.remove("version").unwrap();
        o.insert("id".into(), id);
        assert_eq!(serde_json::from_value::<VersionInfo>(old).unwrap(), v);
        let m = MachineInfo {
            name: "alice/dev".parse().unwrap(),
            chunk_size: 65536,
            head: Some(v.id),
            created_ms: 1,
            versions: 1,
            updated_ms: None,
            disk_size: None,
        };
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["machine"], "alice/dev", "{j}");
        let old = serde_json::json!({"name": "alice/dev", "chunk_size": 65536,
            "head": v.id.to_hex(), "created_ms": 1, "versions": 1, "updated_ms": null,
            "disk_size": null});
        assert_eq!(serde_json::from_value::<MachineInfo>(old).unwrap(), m);
    }

    #[test]
    fn version_1_catalog_is_migrated() {
        let (_d, mut c) = catalog_from_schema_1();
        let m: MachineName = "alice/dev".parse().unwrap();
        assert_eq!(c.lease(&m).unwrap(), None);
        // Version 3's columns and table are there too.
        let (mut v1, i1) = info("alice/dev", None, 1);
        v1.config = Some("{}".into());
        c.commit_version(&v1, &i1, &[], None).unwrap();
        assert_eq!(c.resolve(&m, None).unwrap().config.as_deref(), Some("{}"));
    }

    /// A machine's settings (schema 6): unset by default, kept, cleared by an empty
    /// value, refused for an unknown machine, removed with the machine; a catalog
    /// migrated from schema 5 has the table.
    #[test]
    fn settings_are_kept_per_machine_and_go_with_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.db");
        let conn = Connection::open(&p).unwrap();
        for schema in [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5] {
            conn.execute_batch(schema).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        drop(conn);
        let mut c = Catalog::open(&p, false, false).unwrap();
        let m: MachineName = "alice/dev".parse().unwrap();
        let nobody: MachineName = "alice/none".parse().unwrap();
        let (v1, i1) = info("alice/dev", None, 1);
        c.commit_version(&v1, &i1, &[], None).unwrap();
        assert_eq!(c.settings(&m).unwrap(), MachineSettings::default());
        let five = MachineSettings {
            checkpoint_minutes: Some(5),
        };
        c.set_settings(&m, &five).unwrap();
        assert_eq!(c.settings(&m).unwrap(), five);
        assert!(matches!(
            c.set_settings(&nobody, &five),
            Err(CatalogError::MachineNotFound(_))
        ));
        assert!(matches!(
            c.settings(&nobody),
            Err(CatalogError::MachineNotFound(_))
        ));
        c.set_settings(&m, &MachineSettings::default()).unwrap();
        assert_eq!(c.settings(&m).unwrap(), MachineSettings::default());
        c.set_settings(&m, &five).unwrap();
        c.remove_machine(&m).unwrap();
        c.commit_version(&v1, &i1, &[], None).unwrap();
        assert_eq!(
            c.settings(&m).unwrap(),
            MachineSettings::default(),
            "a machine made again under the name starts without the old settings"
        );
    }

    #[test]
    fn streams_travel_with_their_version() {
        for (_d, mut c) in cats() {
            let m: MachineName = "alice/dev".parse().unwrap();
            let (mut v1, i1) = info("alice/dev", None, 1);
            v1.config = Some(r#"{"memory_mib":256}"#.into());
            let mem = MemoryIndex {
                total_len: 10,
                runs: vec![mbank_core::MemoryRun {
                    id: Some(ChunkId::of(b"0123456789")),
                    len: 10,
                }],
            };
            let kernel = MemoryIndex {
                total_len: 4,
                runs: vec![mbank_core::MemoryRun { id: None, len: 4 }],
            };
            let streams = vec![
                ("memory".to_string(), mem.clone()),
                ("kernel".into(), kernel),
            ];
            c.commit_version(&v1, &i1, &streams, None).unwrap();
            let (v2, i2) = info("alice/dev", Some(v1.id), 2);
            c.commit_version(&v2, &i2, &[], Some(v1.id)).unwrap();
            let got = c.resolve(&m, Some(&v1.id.to_hex())).unwrap();
            assert_eq!(
                got.streams,
                vec!["kernel".to_string(), "memory".to_string()]
            );
            assert!(got.has_memory());
            assert_eq!(got.config, v1.config);
            assert_eq!(c.stream(&got, "memory").unwrap(), Some(mem));
            assert_eq!(c.stream(&got, "initrd").unwrap(), None);
            let head = c.resolve(&m, None).unwrap();
            assert!(!head.has_memory() && head.config.is_none());
            let mut seen = Vec::new();
            c.for_each_stream(None, |v, name, idx| {
                seen.push((v.id, name.to_string(), idx.unwrap().total_len));
                Ok(())
            })
            .unwrap();
            assert_eq!(
                seen,
                vec![(v1.id, "kernel".into(), 4), (v1.id, "memory".into(), 10)]
            );
            c.remove_version(&got).unwrap();
            let mut n = 0;
            c.for_each_stream(None, |_, _, _| {
                n += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(n, 0, "a removed version's streams go with it");
        }
    }

    /// Each statement changes one field a version's or machine's checksum covers, as a
    /// flipped bit on disk would.
    const CHANGES: [&str; 7] = [
        "UPDATE versions SET stats = '{\"source\":\"x\"}'",
        "UPDATE versions SET parent = x'00112233445566778899aabbccddeeff'",
        "UPDATE versions SET machine = 'alice/dew'",
        "UPDATE versions SET created_ms = created_ms + 1",
        "UPDATE version_streams SET len = 5",
        "UPDATE version_streams SET name = 'initrd'",
        "UPDATE versions SET sum = NULL",
    ];

    fn with_stream() -> (VersionInfo, DiskIndex, Vec<NamedStream>) {
        let (v, i) = info("alice/dev", None, 1);
        let kernel = MemoryIndex {
            total_len: 4,
            runs: vec![mbank_core::MemoryRun {
                id: Some(ChunkId::of(b"kern")),
                len: 4,
            }],
        };
        (v, i, vec![("kernel".to_string(), kernel)])
    }

    #[test]
    fn a_changed_record_is_refused_and_reported() {
        for (change, (_d, mut c)) in CHANGES
            .into_iter()
            .flat_map(|ch| cats().into_iter().map(move |c| (ch, c)))
        {
            let (v, i, streams) = with_stream();
            c.commit_version(&v, &i, &streams, None).unwrap();
            let check = c.check_records(None).unwrap();
            assert!(
                check.checksums_checked && check.problems.is_empty(),
                "{check:?}"
            );
            assert_eq!(check.records, 2);
            c.conn.execute_batch(&dialect_sql(&c, change)).unwrap();
            let check = c.check_records(None).unwrap();
            assert!(
                check
                    .problems
                    .iter()
                    .any(|p| p.record.ends_with(&v.id.to_hex())),
                "{change}: {check:?}"
            );
            // Readers of the index refuse it, naming the version.
            let v = c
                .conn
                .query_row("SELECT machine FROM versions", params![], |r| {
                    r.get::<_, String>(0)
                })
                .map(|m| VersionInfo {
                    machine: m.parse().unwrap(),
                    ..v.clone()
                })
                .unwrap();
            let e = c.disk_index(&v).unwrap_err();
            assert!(
                matches!(e, CatalogError::RecordDamaged { .. }),
                "{change}: {e}"
            );
            assert!(e.to_string().contains(&v.id.short()), "{e}");
            assert!(matches!(
                c.stream(&v, "kernel"),
                Err(CatalogError::RecordDamaged { .. })
            ));
        }
    }

    #[test]
    fn a_changed_machine_record_and_broken_links_are_reported() {
        for (_d, mut c) in cats() {
            let (v, i, streams) = with_stream();
            c.commit_version(&v, &i, &streams, None).unwrap();
            c.conn
                .execute_batch("UPDATE machines SET name = 'alice/dew'")
                .unwrap();
            let found: Vec<String> = c
                .check_records(None)
                .unwrap()
                .problems
                .iter()
                .map(|p| format!("{}: {}", p.record, p.problem))
                .collect();
            assert!(
                found
                    .iter()
                    .any(|p| p.starts_with("machine alice/dew: its catalog record")),
                "{found:?}"
            );
            assert!(
                found
                    .iter()
                    .any(|p| p.contains("machine alice/dev is not in the catalog")),
                "{found:?}"
            );
            c.conn
                .execute_batch("DELETE FROM versions; UPDATE machines SET name = 'alice/dev'")
                .unwrap();
            let found = format!("{:?}", c.check_records(None).unwrap().problems);
            assert!(found.contains("is not a version in the catalog"), "{found}");
            assert!(found.contains("stream kernel of version"), "{found}");
        }
    }

    #[test]
    fn version_3_catalog_gets_checksums_when_migrated() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.db");
        let (v, i, streams) = with_stream();
        {
            // A schema-3 catalog with one version, as an older mbank wrote it.
            let mut c = Catalog::open(&p, true, false).unwrap();
            c.commit_version(&v, &i, &streams, None).unwrap();
            c.conn
                .execute_batch(
                    "ALTER TABLE versions DROP COLUMN sum; ALTER TABLE machines DROP COLUMN sum;
                     PRAGMA user_version = 3;",
                )
                .unwrap();
        }
        // Read-only, it is not migrated, and says its records are unchecked.
        let c = Catalog::open(&p, false, true).unwrap();
        assert!(!c.check_records(None).unwrap().checksums_checked);
        assert_eq!(c.disk_index(&v).unwrap(), i);
        drop(c);
        let c = Catalog::open(&p, false, false).unwrap();
        let check = c.check_records(None).unwrap();
        assert!(
            check.checksums_checked && check.problems.is_empty(),
            "{check:?}"
        );
        c.conn.execute_batch(CHANGES[0]).unwrap();
        assert_eq!(c.check_records(None).unwrap().problems.len(), 1);
        assert!(c.integrity_check().unwrap().is_empty());
    }

    #[test]
    fn newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.db");
        drop(Catalog::open(&p, true, false).unwrap());
        let conn = Connection::open(&p).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Catalog::open(&p, false, false),
            Err(CatalogError::TooNew(99))
        ));
    }

    #[test]
    fn newer_postgres_schema_is_refused() {
        let (url, c) = pg_cat();
        assert_eq!(c.schema, SCHEMA_VERSION);
        c.conn
            .execute("UPDATE catalog_schema SET version = 99", params![])
            .unwrap();
        drop(c);
        let e = Catalog::open_postgres(&url).err().expect("refused");
        assert!(matches!(e, CatalogError::TooNew(99)), "{e:?}");
    }

    /// A bank directory with `postgres.url` has its catalog there; without, in
    /// `catalog.db`.
    #[test]
    fn open_in_follows_the_banks_postgres_url() {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::open_in(d.path(), true, false).unwrap();
        assert_eq!(c.dialect(), Dialect::Sqlite);
        assert!(d.path().join("catalog.db").is_file());
        drop(c);
        let d = tempfile::tempdir().unwrap();
        let url = pg().new_database().unwrap();
        std::fs::write(d.path().join(mbank_sql::URL_FILE), format!("{url}\n")).unwrap();
        let mut c = Catalog::open_in(d.path(), true, false).unwrap();
        assert_eq!(c.dialect(), Dialect::Postgres);
        assert!(!d.path().join("catalog.db").exists());
        let (v1, i1) = info("alice/dev", None, 1);
        c.commit_version(&v1, &i1, &[], None).unwrap();
        let again = Catalog::open_postgres(&url).unwrap();
        assert_eq!(
            again.machine(&v1.machine).unwrap().unwrap().head,
            Some(v1.id)
        );
    }

    /// The same records have the same checksums in SQLite and in PostgreSQL (they hash
    /// SQLite's kinds of values, which PostgreSQL's are read as).
    #[test]
    fn the_same_records_have_the_same_checksums_in_both_databases() {
        let (v1, i1, streams) = with_stream();
        let (mut v2, i2) = info("alice/dev", Some(v1.id), 2);
        v2.config = Some(r#"{"memory_mib":256,"name":"é"}"#.into());
        v2.stats.seconds = 1.25;
        let mut sums = Vec::new();
        for (_d, mut c) in cats() {
            c.commit_version(&v1, &i1, &streams, None).unwrap();
            c.commit_version(&v2, &i2, &[], Some(v1.id)).unwrap();
            let check = c.check_records(None).unwrap();
            assert!(
                check.checksums_checked && check.problems.is_empty() && check.records == 3,
                "{check:?}"
            );
            let read = |q: &str| -> Vec<Vec<u8>> {
                c.conn
                    .prepare(q)
                    .unwrap()
                    .query_map(params![], |r| r.get(0))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            };
            sums.push((
                read("SELECT sum FROM versions ORDER BY created_ms"),
                read("SELECT sum FROM machines"),
            ));
        }
        assert_eq!(sums[0].0.len(), 2);
        assert_eq!(sums[0], sums[1], "SQLite's checksums, then PostgreSQL's");
    }

    /// Two servers commit from the same head at once: exactly one moves it, the other's
    /// version is kept.
    #[test]
    fn two_catalogs_on_one_postgres_database_race_for_the_head() {
        let (url, mut c) = pg_cat();
        let (v1, i1) = info("alice/dev", None, 1);
        c.commit_version(&v1, &i1, &[], None).unwrap();
        for round in 0..5 {
            let head = c.machine(&v1.machine).unwrap().unwrap().head;
            let barrier = std::sync::Barrier::new(2);
            let outcomes: Vec<(VersionId, CommitOutcome)> = std::thread::scope(|s| {
                let threads: Vec<_> = (0..2)
                    .map(|k| {
                        let (url, barrier) = (&url, &barrier);
                        s.spawn(move || {
                            let mut mine = Catalog::open_postgres(url).unwrap();
                            let (v, i) = info("alice/dev", head, 10 * round + k + 2);
                            barrier.wait();
                            (v.id, mine.commit_version(&v, &i, &[], head).unwrap())
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let winners: Vec<VersionId> = outcomes
                .iter()
                .filter(|(_, o)| *o == CommitOutcome::HeadMoved)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
            let winner = winners[0];
            assert!(
                outcomes
                    .iter()
                    .any(|(_, o)| *o == CommitOutcome::Kept { head: Some(winner) }),
                "round {round}: {outcomes:?}"
            );
            assert_eq!(c.machine(&v1.machine).unwrap().unwrap().head, Some(winner));
            for (id, _) in &outcomes {
                assert!(c.resolve(&v1.machine, Some(&id.to_hex())).is_ok(), "kept");
            }
        }
        assert_eq!(c.versions(&v1.machine).unwrap().len(), 11);
    }

    /// A lease taken through one server is refused through another, also when both ask
    /// at once (the read of the holder and the write are one serialised transaction).
    #[test]
    fn a_lease_taken_through_one_postgres_catalog_is_refused_through_another() {
        let (url, mut a) = pg_cat();
        let mut b = Catalog::open_postgres(&url).unwrap();
        let lease = |machine: &str, session: &str| Lease {
            machine: machine.into(),
            session: session.into(),
            station: session.into(),
            station_name: format!("host:{session}"),
            pid: 1,
            base: None,
            started_ms: 0,
            heartbeat_ms: 0,
        };
        a.acquire_lease(&lease("alice/dev", "s1"), |_| false)
            .unwrap();
        let e = b
            .acquire_lease(&lease("alice/dev", "s2"), |_| false)
            .unwrap_err();
        assert!(matches!(e, CatalogError::LeaseHeld { .. }), "{e:?}");
        assert!(e.to_string().contains("host:s1"), "{e}");
        for round in 0..10 {
            let machine = format!("alice/m{round}");
            let barrier = std::sync::Barrier::new(2);
            let taken: Vec<bool> = std::thread::scope(|s| {
                let threads: Vec<_> = ["a", "b"]
                    .into_iter()
                    .map(|session| {
                        let (url, barrier, machine) = (&url, &barrier, &machine);
                        s.spawn(move || {
                            let mut mine = Catalog::open_postgres(url).unwrap();
                            barrier.wait();
                            match mine.acquire_lease(&lease(machine, session), |_| false) {
                                Ok(_) => true,
                                Err(CatalogError::LeaseHeld { .. }) => false,
                                Err(e) => panic!("{e}"),
                            }
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert_eq!(
                taken.iter().filter(|t| **t).count(),
                1,
                "round {round}: {taken:?}"
            );
        }
    }
}
