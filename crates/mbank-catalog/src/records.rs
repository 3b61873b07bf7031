//! Record checksums, and the checks `verify` runs on the catalog itself.
//!
//! A version's checksum (`versions.sum`) is BLAKE3 over the values SQLite holds for the
//! row, each encoded with its type, and then over each of its streams in name order;
//! the disk and stream indexes enter by their 32-byte trailer, which is already the
//! BLAKE3 of the index (and checked whenever the index is parsed). A machine's checksum
//! (`machines.sum`) covers its name, chunk size and creation time, but not its head,
//! which moves; `verify` checks that each head names a version of that machine instead.
//! The encoding is in `docs/formats.md`.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use mbank_core::MachineName;
use mbank_sql::{Db, Row, Value, params};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::{Catalog, CatalogError, VersionInfo, sql};

const VERSION_DOMAIN: &[u8] = b"mbank version record 1\0";
const MACHINE_DOMAIN: &[u8] = b"mbank machine record 1\0";
const STREAM_TAG: &[u8] = b"S";

/// The columns of a `versions` row its checksum covers, in order (after `rowid`). Of
/// the last, the index, only its final 32 bytes (its trailer) count; it is read whole
/// so that [`Catalog::disk_index`] reads it once.
const VERSION_SUMMED: &str =
    "rowid, id, machine, parent, created_ms, disk_size, chunk_size, stats, config, disk_index";
/// Number of summed columns, not counting `rowid`.
const VERSION_SUMMED_N: usize = 9;
/// The columns of a `machines` row its checksum covers, in order.
const MACHINE_SUMMED: &str = "name, chunk_size, created_ms";

/// Why a record failed its check, for [`CatalogError::RecordDamaged`].
const MISMATCH: &str = "it does not match the checksum written when it was committed";
const NO_SUM: &str = "it has no checksum";

/// A damaged record (or a broken link between records) that `verify` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordProblem {
    /// What: `machine@version` (full hex id), `machine NAME`, or a row number.
    pub record: String,
    pub problem: String,
}

/// What [`Catalog::check_records`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCheck {
    /// False when the catalog predates record checksums (a read-only schema 3 catalog):
    /// only the links between records were checked.
    pub checksums_checked: bool,
    pub records: u64,
    pub problems: Vec<RecordProblem>,
}

/// A value, as SQLite's kind of it (PostgreSQL's are read as the same kinds, so a
/// record's checksum is the same in either database).
fn hash_value(h: &mut blake3::Hasher, v: &Value) {
    let bytes = |h: &mut blake3::Hasher, tag: u8, b: &[u8]| {
        h.update(&[tag]);
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    match v {
        Value::Null => {
            h.update(&[0]);
        }
        Value::Integer(i) => {
            h.update(&[1]);
            h.update(&i.to_le_bytes());
        }
        Value::Real(f) => {
            h.update(&[2]);
            h.update(&f.to_bits().to_le_bytes());
        }
        Value::Text(t) => bytes(h, 3, t.as_bytes()),
        Value::Blob(b) => bytes(h, 4, b),
    }
}

/// The checksum of the `versions` row `r` (selected as [`VERSION_SUMMED`]).
fn version_sum(conn: &Db, r: &Row) -> mbank_sql::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update(VERSION_DOMAIN);
    for i in 1..VERSION_SUMMED_N {
        hash_value(&mut h, r.get_ref(i)?);
    }
    hash_value(&mut h, &trailer(r.get_ref(VERSION_SUMMED_N)?));
    let rowid: i64 = r.get(0)?;
    // The last 32 bytes of each index (all of it if shorter), in SQL both databases
    // take (SQLite's `substr(idx, -32)`).
    let streams = conn.query_all(
        "SELECT name, len, substr(idx, length(idx) - 31) FROM version_streams
         WHERE version = (SELECT id FROM versions WHERE rowid = ?1) ORDER BY name",
        params![rowid],
    )?;
    for s in &streams {
        h.update(STREAM_TAG);
        for i in 0..3 {
            hash_value(&mut h, s.get_ref(i)?);
        }
    }
    Ok(*h.finalize().as_bytes())
}

/// An index's last 32 bytes (all of it if shorter), as SQL's `substr(idx, -32)` of a
/// blob gives them.
fn trailer(v: &Value) -> Value {
    match v {
        Value::Blob(b) => Value::Blob(b[b.len().saturating_sub(32)..].to_vec()),
        other => other.clone(),
    }
}

/// The checksum of the `machines` row `r` (selected as [`MACHINE_SUMMED`]).
fn machine_sum(r: &Row) -> mbank_sql::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update(MACHINE_DOMAIN);
    for i in 0..3 {
        hash_value(&mut h, r.get_ref(i)?);
    }
    Ok(*h.finalize().as_bytes())
}

/// How a stored checksum compares with the record's.
fn judge(stored: &Value, computed: &[u8; 32]) -> Option<&'static str> {
    match stored {
        Value::Blob(b) if b == computed => None,
        Value::Null => Some(NO_SUM),
        _ => Some(MISMATCH),
    }
}

fn seal_version_row(conn: &Db, rowid: i64) -> Result<(), CatalogError> {
    let sum = conn
        .query_row(
            &format!("SELECT {VERSION_SUMMED} FROM versions WHERE rowid = ?1"),
            params![rowid],
            |r| version_sum(conn, r),
        )
        .map_err(sql("compute the version's checksum"))?;
    conn.execute(
        "UPDATE versions SET sum = ?1 WHERE rowid = ?2",
        params![&sum[..], rowid],
    )
    .map_err(sql("record the version's checksum"))?;
    Ok(())
}

/// Records the checksum of version `id` (inside the transaction that inserts it, after
/// its streams).
pub(crate) fn seal_version(conn: &Db, id: &mbank_core::VersionId) -> Result<(), CatalogError> {
    let rowid: i64 = conn
        .query_row(
            "SELECT rowid FROM versions WHERE id = ?1",
            params![&id.as_bytes()[..]],
            |r| r.get(0),
        )
        .map_err(sql("find the version to record its checksum"))?;
    seal_version_row(conn, rowid)
}

/// Records the checksum of machine `name` (inside the transaction that creates it).
pub(crate) fn seal_machine(conn: &Db, name: &str) -> Result<(), CatalogError> {
    let sum = conn
        .query_row(
            &format!("SELECT {MACHINE_SUMMED} FROM machines WHERE name = ?1"),
            params![name],
            machine_sum,
        )
        .map_err(sql("compute the machine's checksum"))?;
    conn.execute(
        "UPDATE machines SET sum = ?1 WHERE name = ?2",
        params![&sum[..], name],
    )
    .map_err(sql("record the machine's checksum"))?;
    Ok(())
}

/// Records the checksum of every row (the migration to schema 4).
pub(crate) fn seal_all(conn: &Db) -> Result<(), CatalogError> {
    let collect = |q: &str| -> mbank_sql::Result<Vec<Value>> {
        let mut st = conn.prepare(q)?;
        let rows = st.query_map(params![], |r| r.get(0))?;
        rows.collect()
    };
    let versions = collect("SELECT rowid FROM versions").map_err(sql("list the versions"))?;
    for rowid in versions {
        if let Value::Integer(rowid) = rowid {
            seal_version_row(conn, rowid)?;
        }
    }
    let machines = collect("SELECT name FROM machines").map_err(sql("list the machines"))?;
    for name in machines {
        if let Value::Text(name) = name {
            seal_machine(conn, &name)?;
        }
    }
    Ok(())
}

/// The `versions` rows whose rowids `list` (a query and its parameters) selects, each
/// read alone as `cols` (each holds its whole index, and results are read whole) and
/// given to `f` until it breaks; a row removed meanwhile is skipped.
fn each_version_row(
    conn: &Db,
    list: (&str, mbank_sql::Params<'_>),
    cols: &str,
    action: &'static str,
    mut f: impl FnMut(&Row) -> Result<ControlFlow<()>, CatalogError>,
) -> Result<(), CatalogError> {
    let rowids = conn.query_all(list.0, list.1).map_err(sql(action))?;
    let one = format!("SELECT {cols} FROM versions WHERE rowid = ?1");
    for rowid in rowids {
        let rowid: i64 = rowid.get(0).map_err(sql(action))?;
        let Some(r) = conn
            .query_all(&one, params![rowid])
            .map_err(sql(action))?
            .pop()
        else {
            continue;
        };
        if f(&r)?.is_break() {
            break;
        }
    }
    Ok(())
}

/// Renames machine `old` to `new` in every table that names it, inside the caller's
/// transaction: each record of `old` is first held to its checksum (a damaged record
/// is refused, never sealed again under the new name), then the names change and the
/// records are sealed anew. Version ids do not change.
pub(crate) fn rename_records(conn: &Db, old: &str, new: &str) -> Result<(), CatalogError> {
    let action = "check the versions' records before the rename";
    let mut damaged = None;
    each_version_row(
        conn,
        (
            "SELECT rowid FROM versions WHERE machine = ?1",
            params![old],
        ),
        &format!("{VERSION_SUMMED}, sum"),
        action,
        |r| {
            let sum = version_sum(conn, r).map_err(sql(action))?;
            if let Some(why) = judge(r.get_ref(VERSION_SUMMED_N + 1).map_err(sql(action))?, &sum) {
                let id: Vec<u8> = r.get(1).map_err(sql(action))?;
                let id = <[u8; 16]>::try_from(id.as_slice())
                    .map(mbank_core::VersionId::from_bytes)
                    .map_err(|_| CatalogError::BadRow("a version id is not 16 bytes".into()))?;
                damaged = Some((id, why));
                return Ok(ControlFlow::Break(()));
            }
            Ok(ControlFlow::Continue(()))
        },
    )?;
    if let Some((version, why)) = damaged {
        return Err(CatalogError::RecordDamaged {
            machine: old.to_string(),
            version,
            why,
        });
    }
    for (q, what) in [
        (
            "UPDATE machines SET name = ?2 WHERE name = ?1",
            "rename the machine",
        ),
        (
            "UPDATE versions SET machine = ?2 WHERE machine = ?1",
            "rename the versions' machine",
        ),
        (
            "UPDATE version_labels SET machine = ?2 WHERE machine = ?1",
            "rename the labels' machine",
        ),
        (
            "UPDATE policies SET machine = ?2 WHERE machine = ?1",
            "rename the policy's machine",
        ),
        (
            "UPDATE machine_settings SET machine = ?2 WHERE machine = ?1",
            "rename the settings' machine",
        ),
    ] {
        conn.execute(q, params![old, new]).map_err(sql(what))?;
    }
    let rowids: Vec<i64> = {
        let mut st = conn
            .prepare("SELECT rowid FROM versions WHERE machine = ?1")
            .map_err(sql("list the renamed versions"))?;
        let rows = st
            .query_map(params![new], |r| r.get(0))
            .map_err(sql("list the renamed versions"))?;
        rows.collect::<mbank_sql::Result<_>>()
            .map_err(sql("list the renamed versions"))?
    };
    for rowid in rowids {
        seal_version_row(conn, rowid)?;
    }
    seal_machine(conn, new)
}

/// `machine@version` for a row whose values may be damaged.
fn describe_version(machine: &Value, id: &Value, rowid: i64) -> String {
    let m = match machine {
        Value::Text(t) => t.clone(),
        _ => "?".into(),
    };
    match id {
        Value::Blob(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("{m}@{hex}")
        }
        _ => format!("{m}@? (versions row {rowid})"),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        Value::Blob(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Null => "NULL".into(),
    }
}

impl Catalog {
    /// The bytes of version `v`'s disk index, read in one query with its record, which
    /// must match its checksum (see the crate docs).
    pub(crate) fn checked_index_bytes(&self, v: &VersionInfo) -> Result<Vec<u8>, CatalogError> {
        let checked = self.schema >= 4;
        let sum_col = if checked { "sum" } else { "NULL" };
        let (bytes, why) = self
            .conn
            .query_row(
                &format!("SELECT {VERSION_SUMMED}, {sum_col} FROM versions WHERE id = ?1"),
                params![&v.id.as_bytes()[..]],
                |r| {
                    let why = if checked {
                        judge(
                            r.get_ref(VERSION_SUMMED_N + 1)?,
                            &version_sum(&self.conn, r)?,
                        )
                    } else {
                        None
                    };
                    Ok((r.get::<_, Vec<u8>>(VERSION_SUMMED_N)?, why))
                },
            )
            .map_err(sql("read the index"))?;
        match why {
            None => Ok(bytes),
            Some(why) => Err(CatalogError::RecordDamaged {
                machine: v.machine.to_string(),
                version: v.id,
                why,
            }),
        }
    }

    /// Refuses version `v` if its record fails its checksum.
    pub(crate) fn check_record(&self, v: &VersionInfo) -> Result<(), CatalogError> {
        self.checked_index_bytes(v).map(drop)
    }

    /// Checks every version's and machine's record against its checksum (or those of
    /// one machine), and the links between them: each head names a version of its
    /// machine, each version's machine exists, each stream's version exists.
    pub fn check_records(
        &self,
        machine: Option<&MachineName>,
    ) -> Result<RecordCheck, CatalogError> {
        let mut out = RecordCheck {
            checksums_checked: self.schema >= 4,
            ..Default::default()
        };
        let wanted = |m: &Value| machine.is_none_or(|w| text(m) == w.as_str());
        let sum_col = if out.checksums_checked { "sum" } else { "NULL" };
        let action = "check the versions' records";
        each_version_row(
            &self.conn,
            ("SELECT rowid FROM versions ORDER BY rowid", params![]),
            &format!("{VERSION_SUMMED}, {sum_col}"),
            action,
            |r| {
                let (id, m) = (
                    r.get_ref(1).map_err(sql(action))?,
                    r.get_ref(2).map_err(sql(action))?,
                );
                if !wanted(m) {
                    return Ok(ControlFlow::Continue(()));
                }
                out.records += 1;
                if !out.checksums_checked {
                    return Ok(ControlFlow::Continue(()));
                }
                let sum = version_sum(&self.conn, r).map_err(sql(action))?;
                let stored = r.get_ref(VERSION_SUMMED_N + 1).map_err(sql(action))?;
                if let Some(why) = judge(stored, &sum) {
                    let rowid: i64 = r.get(0).map_err(sql(action))?;
                    out.problems.push(RecordProblem {
                        record: describe_version(m, id, rowid),
                        problem: format!("its catalog record is damaged: {why}"),
                    });
                }
                Ok(ControlFlow::Continue(()))
            },
        )?;
        let action = "check the machines' records";
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {MACHINE_SUMMED}, {sum_col} FROM machines ORDER BY name"
            ))
            .map_err(sql(action))?;
        let mut rows = st.query(params![]).map_err(sql(action))?;
        while let Some(r) = rows.next().map_err(sql(action))? {
            let name = r.get_ref(0).map_err(sql(action))?;
            if !wanted(name) {
                continue;
            }
            out.records += 1;
            if !out.checksums_checked {
                continue;
            }
            let sum = machine_sum(r).map_err(sql(action))?;
            if let Some(why) = judge(r.get_ref(3).map_err(sql(action))?, &sum) {
                out.problems.push(RecordProblem {
                    record: format!("machine {}", text(name)),
                    problem: format!("its catalog record is damaged: {why}"),
                });
            }
        }
        drop(rows);
        self.check_links(machine, &mut out.problems)?;
        Ok(out)
    }

    fn check_links(
        &self,
        machine: Option<&MachineName>,
        problems: &mut Vec<RecordProblem>,
    ) -> Result<(), CatalogError> {
        let action = "check the links between the catalog's records";
        let m = machine.map(|m| m.as_str());
        let mut st = self
            .conn
            .prepare(
                "SELECT m.name, m.head, v.machine FROM machines m LEFT JOIN versions v ON v.id = m.head
                 WHERE m.head IS NOT NULL AND (v.id IS NULL OR v.machine IS DISTINCT FROM m.name)
                   AND (CAST(?1 AS TEXT) IS NULL OR m.name = ?1)",
            )
            .map_err(sql(action))?;
        let mut rows = st.query(params![m]).map_err(sql(action))?;
        while let Some(r) = rows.next().map_err(sql(action))? {
            let (name, head, owner) = (r.get_ref(0), r.get_ref(1), r.get_ref(2));
            let (name, head, owner) = (
                name.map_err(sql(action))?,
                head.map_err(sql(action))?,
                owner.map_err(sql(action))?,
            );
            let problem = match owner {
                Value::Null => {
                    format!("its head {} is not a version in the catalog", text(head))
                }
                o => format!("its head {} is a version of {}", text(head), text(o)),
            };
            problems.push(RecordProblem {
                record: format!("machine {}", text(name)),
                problem,
            });
        }
        drop(rows);
        let mut st = self
            .conn
            .prepare(
                "SELECT v.rowid, v.machine, v.id FROM versions v LEFT JOIN machines m ON m.name = v.machine
                 WHERE m.name IS NULL AND (CAST(?1 AS TEXT) IS NULL OR v.machine = ?1)",
            )
            .map_err(sql(action))?;
        let mut rows = st.query(params![m]).map_err(sql(action))?;
        while let Some(r) = rows.next().map_err(sql(action))? {
            let rowid: i64 = r.get(0).map_err(sql(action))?;
            let (mv, id) = (
                r.get_ref(1).map_err(sql(action))?,
                r.get_ref(2).map_err(sql(action))?,
            );
            problems.push(RecordProblem {
                record: describe_version(mv, id, rowid),
                problem: format!("its machine {} is not in the catalog", text(mv)),
            });
        }
        drop(rows);
        if machine.is_none() {
            let mut st = self
                .conn
                .prepare(
                    "SELECT s.version, s.name FROM version_streams s
                     WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.id = s.version)",
                )
                .map_err(sql(action))?;
            let mut rows = st.query(params![]).map_err(sql(action))?;
            while let Some(r) = rows.next().map_err(sql(action))? {
                let (v, n) = (
                    r.get_ref(0).map_err(sql(action))?,
                    r.get_ref(1).map_err(sql(action))?,
                );
                problems.push(RecordProblem {
                    record: format!("stream {} of version {}", text(n), text(v)),
                    problem: "its version is not in the catalog".into(),
                });
            }
        }
        Ok(())
    }

    /// Runs SQLite's `PRAGMA integrity_check` (every page, every index against its
    /// table; `quick_check` would skip the latter) on the catalog. Returns what it found,
    /// empty when the database is sound.
    ///
    /// On PostgreSQL there is nothing to run here: the server checks its own pages
    /// (its data checksums, `amcheck`), and an empty list is returned.
    pub fn integrity_check(&self) -> Result<Vec<String>, CatalogError> {
        match self.conn.as_sqlite() {
            Some(conn) => integrity(conn),
            None => Ok(Vec::new()),
        }
    }
}

/// [`Catalog::integrity_check`] for another SQLite file (a served bank's `access.db`).
pub fn integrity_check_file(path: &Path) -> Result<Vec<String>, CatalogError> {
    // Writable when possible, so that a journal left by a killed writer is rolled back
    // rather than refused.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .or_else(|_| {
        Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    })
    .map_err(sql("open the database"))?;
    conn.busy_timeout(Duration::from_secs(30))
        .map_err(sql("set the busy timeout"))?;
    integrity(&conn)
}

fn integrity(conn: &Connection) -> Result<Vec<String>, CatalogError> {
    let run = || -> rusqlite::Result<Vec<String>> {
        let mut st = conn.prepare("PRAGMA integrity_check")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    };
    match run() {
        Ok(found) if found.len() == 1 && found[0] == "ok" => Ok(Vec::new()),
        Ok(found) => Ok(found),
        Err(source) => {
            let e = CatalogError::Db {
                action: "check the database's integrity",
                source: source.into(),
            };
            // So damaged that SQLite cannot even walk it: that is the finding.
            if e.is_corrupt() {
                Ok(vec![e.to_string()])
            } else {
                Err(e)
            }
        }
    }
}
