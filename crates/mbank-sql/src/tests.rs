use std::sync::OnceLock;

use super::*;
use crate::testing::TempPostgres;

/// One PostgreSQL server for this test binary; a database per test.
fn pg() -> &'static TempPostgres {
    static PG: OnceLock<TempPostgres> = OnceLock::new();
    PG.get_or_init(|| TempPostgres::start().expect("start PostgreSQL"))
}

fn both() -> Vec<(Db, Option<tempfile::TempDir>)> {
    let d = tempfile::tempdir().unwrap();
    let lite = Db::sqlite(rusqlite::Connection::open(d.path().join("t.db")).unwrap());
    let url = pg().new_database().unwrap();
    vec![(lite, Some(d)), (Db::postgres(&url, 7).unwrap(), None)]
}

const SCHEMA_SQLITE: &str =
    "CREATE TABLE t (id BLOB PRIMARY KEY, n INTEGER NOT NULL, s TEXT, r REAL)";
const SCHEMA_PG: &str =
    "CREATE TABLE t (id BYTEA PRIMARY KEY, n BIGINT NOT NULL, s TEXT, r DOUBLE PRECISION)";

fn schema(db: &Db) {
    db.execute_batch(match db.dialect() {
        Dialect::Sqlite => SCHEMA_SQLITE,
        Dialect::Postgres => SCHEMA_PG,
    })
    .unwrap();
}

#[test]
fn placeholders_and_functions_are_translated_outside_quotes() {
    assert_eq!(translate("a = ?1 AND b IS ?2"), "a = $1 AND b IS $2");
    assert_eq!(translate("(?, ?, ?)"), "($1, $2, $3)");
    assert_eq!(translate("x = ?3 OR y = ?"), "x = $3 OR y = $4");
    assert_eq!(translate("s = '?1' AND t = ?1"), "s = '?1' AND t = $1");
    assert_eq!(
        translate("SELECT group_concat(s.name, ',') FROM \"?x\""),
        "SELECT string_agg(s.name, ',') FROM \"?x\""
    );
    assert_eq!(translate("é = ?1"), "é = $1");
}

#[test]
fn passwords_are_left_out_of_messages() {
    assert_eq!(
        redact("postgresql://bank:s3cret@db:5432/mbank"),
        "postgresql://bank:***@db:5432/mbank"
    );
    assert_eq!(
        redact("postgresql://bank@db/mbank"),
        "postgresql://bank@db/mbank"
    );
    assert_eq!(
        redact("host=db password=s3cret user=bank"),
        "host=db password=*** user=bank"
    );
}

#[test]
fn values_read_back_the_same_on_both_databases() {
    for (mut db, _dir) in both() {
        schema(&db);
        let tx = db.transaction_with_behavior(Behavior::Immediate).unwrap();
        let n = tx
            .execute(
                "INSERT INTO t (id, n, s, r) VALUES (?1, ?2, ?3, ?4)",
                params![vec![1u8, 2], 5u32, "five", 0.5],
            )
            .unwrap();
        assert_eq!(n, 1);
        tx.execute(
            "INSERT INTO t (id, n, s) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            params![vec![1u8, 2], 6i64, None::<String>],
        )
        .unwrap();
        tx.commit().unwrap();
        let row = db
            .query_row(
                "SELECT id, n, s, r, NULL FROM t WHERE id = ?1",
                params![[1u8, 2]],
                |r| Ok(r.clone()),
            )
            .unwrap();
        assert_eq!(row.get_ref(0).unwrap(), &Value::Blob(vec![1, 2]));
        assert_eq!(row.get_ref(1).unwrap(), &Value::Integer(5));
        assert_eq!(row.get_ref(2).unwrap(), &Value::Text("five".into()));
        assert_eq!(row.get_ref(3).unwrap(), &Value::Real(0.5));
        assert_eq!(row.get::<_, u64>(1).unwrap(), 5);
        assert_eq!(row.get::<_, Option<String>>(4).unwrap(), None);
        assert_eq!(row.get::<_, String>(1).unwrap_err().kind(), ErrorKind::Type);
        let none = db
            .query_row("SELECT n FROM t WHERE id = ?1", params![[9u8]], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .unwrap();
        assert_eq!(none, None);
        // Null-safe comparison and a count.
        let c: i64 = db
            .query_row(
                "SELECT count(*) FROM t WHERE s IS NOT DISTINCT FROM ?1",
                params![None::<String>],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(c, 0);
        let mut st = db.prepare("SELECT n FROM t ORDER BY n").unwrap();
        let all: Vec<i64> = st
            .query_map(params![], |r| r.get(0))
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(all, vec![5]);
        let e = db
            .execute(
                "INSERT INTO t (id, n) VALUES (?1, ?2)",
                params![[1u8, 2], 1],
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Constraint, "{e}");
    }
}

#[test]
fn a_dropped_transaction_rolls_back() {
    for (mut db, _dir) in both() {
        schema(&db);
        {
            let tx = db.transaction_with_behavior(Behavior::Immediate).unwrap();
            tx.execute("INSERT INTO t (id, n) VALUES (?1, 1)", params![[3u8]])
                .unwrap();
        }
        let c: i64 = db
            .query_row("SELECT count(*) FROM t", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(c, 0);
        // The connection is usable after the rollback.
        db.execute("INSERT INTO t (id, n) VALUES (?1, 1)", params![[3u8]])
            .unwrap();
    }
}

/// Read-then-write transactions through separate connections do not lose updates:
/// every writer holds the domain's lock.
#[test]
fn writers_on_separate_postgres_connections_are_serialised() {
    let url = pg().new_database().unwrap();
    let db = Db::postgres(&url, 11).unwrap();
    db.execute_batch(
        "CREATE TABLE c (k TEXT PRIMARY KEY, n BIGINT NOT NULL); INSERT INTO c VALUES ('x', 0)",
    )
    .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut db = Db::postgres(&url, 11).unwrap();
                for _ in 0..25 {
                    let tx = db.transaction_with_behavior(Behavior::Immediate).unwrap();
                    let n: i64 = tx
                        .query_row("SELECT n FROM c WHERE k = 'x'", params![], |r| r.get(0))
                        .unwrap();
                    tx.execute("UPDATE c SET n = ?1 WHERE k = 'x'", params![n + 1])
                        .unwrap();
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let n: i64 = db
        .query_row("SELECT n FROM c WHERE k = 'x'", params![], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 100);
}

/// A connection lost (the server restarted) fails the call in flight, and the next
/// call connects again.
#[test]
fn a_lost_postgres_connection_is_opened_again() {
    let url = pg().new_database().unwrap();
    let db = Db::postgres(&url, 12).unwrap();
    let pid: i64 = db
        .query_row("SELECT pg_backend_pid()", params![], |r| r.get(0))
        .unwrap();
    let other = Db::postgres(&url, 12).unwrap();
    other
        .query_row(
            "SELECT pg_terminate_backend(?1)",
            params![pid as i32],
            |r| r.get::<_, bool>(0),
        )
        .unwrap();
    // pg_terminate_backend only signals: wait until the backend is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while other
        .query_row(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ?1",
            params![pid as i32],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "backend {pid} lives on"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = db.query_row("SELECT 1", params![], |r| r.get::<_, i64>(0));
    if let Err(e) = &first {
        assert!(e.is_retryable(), "{e:?}");
    }
    let again: i64 = db.query_row("SELECT 2", params![], |r| r.get(0)).unwrap();
    assert_eq!(again, 2);
}

/// A pool's exclusive lock keeps a shared one of another pool (another host) waiting
/// until it is released; shared locks do not exclude each other.
#[test]
fn pool_locks_exclude_across_pools() {
    let url = pg().new_database().unwrap();
    let (a, b) = (LockPool::new(&url), LockPool::new(&url));
    let s1 = a.lock(42, false).unwrap();
    let s2 = b.lock(42, false).unwrap();
    drop((s1, s2));
    let held = a.lock(42, true).unwrap();
    let waiter = std::thread::spawn(move || b.lock(42, false).map(drop));
    // Wait until PostgreSQL shows the shared request waiting on the key.
    let watch = Db::postgres(&url, 1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = watch
            .query_row(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 42 AND NOT granted",
                params![],
                |r| r.get(0),
            )
            .unwrap();
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no waiter on the lock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !waiter.is_finished(),
        "the shared lock was taken under the exclusive one"
    );
    drop(held);
    waiter.join().unwrap().unwrap();
}

/// Many rows go in a few statements, every one of them, on both databases.
#[test]
fn insert_rows_inserts_every_row_in_batches() {
    for (db, _dir) in both() {
        schema(&db);
        let rows: Vec<Vec<Value>> = (0..600u32)
            .map(|i| {
                vec![
                    Value::Blob(i.to_le_bytes().to_vec()),
                    Value::Integer(i as i64),
                ]
            })
            .collect();
        let n = db
            .insert_rows(
                "INSERT INTO t (id, n, s)",
                "(?, ?, 'x')",
                "ON CONFLICT DO NOTHING",
                &rows,
            )
            .unwrap();
        assert_eq!(n, 600);
        // Again: nothing new.
        let n = db
            .insert_rows(
                "INSERT INTO t (id, n, s)",
                "(?, ?, 'x')",
                "ON CONFLICT DO NOTHING",
                &rows[..77],
            )
            .unwrap();
        assert_eq!(n, 0);
        let (c, total): (i64, i64) = db
            .query_row(
                "SELECT count(*), CAST(sum(n) AS BIGINT) FROM t WHERE s = 'x'",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((c, total), (600, (0..600).sum::<i64>()));
    }
}

/// A connection dropped on an async runtime's thread (a server ending with its pool)
/// closes without a panic.
#[test]
fn a_postgres_connection_dropped_on_an_async_runtime_does_not_panic() {
    let url = pg().new_database().unwrap();
    let db = Db::postgres(&url, 13).unwrap();
    let pool = LockPool::new(&url);
    drop(pool.lock(5, true).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async move {
        drop(db);
        drop(pool);
    });
}
