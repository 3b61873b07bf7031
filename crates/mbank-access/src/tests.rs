use std::sync::OnceLock;

use mbank_sql::testing::TempPostgres;

use super::*;

const PW: &str = "correct horse";
const HOUR: Duration = Duration::from_secs(3600);

/// Where a test's access database lives.
#[derive(Clone, Copy, Debug)]
pub(super) enum Backend {
    Sqlite,
    Postgres,
}

/// One PostgreSQL server for this test binary; a database per test.
fn pg() -> &'static TempPostgres {
    static PG: OnceLock<TempPostgres> = OnceLock::new();
    PG.get_or_init(|| TempPostgres::start().expect("start PostgreSQL"))
}

/// A bank directory whose access database is on `b` (PostgreSQL: a new database, named
/// by the directory's `postgres.url`).
fn bank(b: Backend) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if let Backend::Postgres = b {
        let url = pg().new_database().unwrap();
        std::fs::write(dir.path().join(mbank_sql::URL_FILE), url).unwrap();
    }
    dir
}

fn open(b: Backend) -> (tempfile::TempDir, Access) {
    let dir = bank(b);
    let a = Access::open(dir.path()).unwrap();
    (dir, a)
}

fn with_user(
    b: Backend,
    name: &str,
    admin: bool,
    quota: Option<u64>,
) -> (tempfile::TempDir, Access) {
    let (d, a) = open(b);
    a.add_user(name, PW, admin, quota).unwrap();
    (d, a)
}

fn id(n: u8) -> ChunkId {
    ChunkId::of(&[n])
}

fn user(a: &Access, name: &str) -> User {
    let t = a.login(name, PW, HOUR, "test").unwrap();
    a.authenticate(&t.token).unwrap()
}

fn assert_unauthorized(r: Result<User, AccessError>, what: &str) {
    match r {
        Err(e) if e.is_unauthorized() => {}
        other => panic!("{what}: expected Unauthorized, got {other:?}"),
    }
}

#[test]
fn access_is_send() {
    fn send<T: Send>() {}
    send::<Access>();
}

#[test]
fn dummy_phc_is_a_valid_argon2id_hash() {
    // If it did not parse, a login for an unknown user would be faster than one with a
    // wrong password.
    let h = argon2::password_hash::phc::PasswordHash::new(DUMMY_PHC).unwrap();
    assert_eq!(h.algorithm.as_str(), "argon2id");
    assert!(!verify_password("anything at all", DUMMY_PHC));
}

fn open_creates_and_reopens(b: Backend) {
    let dir = bank(b);
    {
        let a = Access::open(dir.path()).unwrap();
        a.add_user("alice", PW, false, None).unwrap();
    }
    let a = Access::open(dir.path()).unwrap();
    assert_eq!(a.users().unwrap().len(), 1);
    let Some(lite) = a.db.as_sqlite() else {
        assert!(
            !dir.path().join(FILE_NAME).exists(),
            "no access.db beside PostgreSQL"
        );
        let v: i64 =
            a.db.query_row("SELECT version FROM access_schema", params![], |r| r.get(0))
                .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        return;
    };
    let v: i64 = lite
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let app: i32 = lite
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    assert_eq!(app, APPLICATION_ID);
    let mode: String = lite
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn open_refuses_newer_schema_and_foreign_database() {
    let dir = tempfile::tempdir().unwrap();
    drop(Access::open(dir.path()).unwrap());
    let c = Connection::open(dir.path().join(FILE_NAME)).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    assert!(matches!(
        Access::open(dir.path()),
        Err(AccessError::TooNew(99))
    ));

    let other = tempfile::tempdir().unwrap();
    let c = Connection::open(other.path().join(FILE_NAME)).unwrap();
    c.execute_batch("CREATE TABLE t (x)").unwrap();
    drop(c);
    assert!(matches!(
        Access::open(other.path()),
        Err(AccessError::NotAccessDb { .. })
    ));
}

fn add_login_authenticate_round_trip(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, Some(1 << 20));
    let t = a.login("alice", PW, HOUR, "station-1").unwrap();
    assert!(t.token.starts_with("mbt_"));
    assert_eq!(t.token.len(), 4 + 32 + 1 + 64);
    assert!(t.token.contains(&t.id));
    let u = a.authenticate(&t.token).unwrap();
    assert_eq!(
        u,
        User {
            name: "alice".into(),
            admin: false,
            quota: Some(1 << 20)
        }
    );
    let toks = a.tokens(Some("alice")).unwrap();
    assert_eq!(toks.len(), 1);
    assert_eq!(toks[0].id, t.id);
    assert_eq!(toks[0].label, "station-1");
    assert!(toks[0].live);
    let users = a.users().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].tokens_live, 1);
    // The stored row never holds the secret itself.
    let secret = &t.token[4 + 32 + 1..];
    for r in
        a.db.query_all("SELECT secret_hash, label FROM tokens", params![])
            .unwrap()
    {
        let hash: Vec<u8> = r.get(0).unwrap();
        let label: String = r.get(1).unwrap();
        assert!(!hex(&hash).contains(secret) && !label.contains(secret));
    }
}

fn add_user_rejects_duplicates_bad_names_and_weak_passwords(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let e = a.add_user("alice", PW, false, None).unwrap_err();
    assert!(
        matches!(&e, AccessError::UserExists(n) if n == "alice"),
        "{e:?}"
    );
    assert!(e.to_string().contains("exists already"));
    for bad in [
        "",
        "Alice",
        "al/ice",
        "-alice",
        "_a",
        "a b",
        "ålice",
        "a.b",
        &"a".repeat(33),
    ] {
        assert!(
            matches!(
                a.add_user(bad, PW, false, None),
                Err(AccessError::BadName { .. })
            ),
            "{bad:?} accepted"
        );
    }
    for good in ["bob", "b0b_-x", "9", &"a".repeat(32)] {
        a.add_user(good, PW, false, None).unwrap();
    }
    for weak in ["", "short", "1234567", &"x".repeat(MAX_PASSWORD_BYTES + 1)] {
        assert!(matches!(
            a.add_user("carol", weak, false, None),
            Err(AccessError::WeakPassword)
        ));
    }
    // 8 characters, some of them multi-byte, is enough.
    a.add_user("carol", "ééééèèèè", false, None).unwrap();
}

#[test]
fn user_name_rule_matches_machine_names() {
    for s in ["a", "a-b", "A", "a/b", "", "a b", "z_9", "-x", "x-", "é"] {
        let machine_ok = format!("{s}/m").parse::<MachineName>().is_ok() && !s.contains('/');
        assert_eq!(check_user_name(s).is_ok(), machine_ok, "{s:?}");
    }
}

fn wrong_password_and_unknown_user_look_the_same(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let e1 = a.login("alice", "wrong password", HOUR, "").unwrap_err();
    let e2 = a.login("mallory", PW, HOUR, "").unwrap_err();
    let e3 = a
        .login("alice", &"x".repeat(MAX_PASSWORD_BYTES + 1), HOUR, "")
        .unwrap_err();
    assert!(e1.is_unauthorized() && e2.is_unauthorized() && e3.is_unauthorized());
    assert_eq!(e1.to_string(), e2.to_string());
    assert_eq!(e1.to_string(), e3.to_string());
    assert!(e1.to_string().contains("mbank login"));
    assert!(a.tokens(None).unwrap().is_empty());
}

fn tampered_and_malformed_tokens_are_unauthorized(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let t = a.login("alice", PW, HOUR, "").unwrap().token;
    assert!(a.authenticate(&t).is_ok());
    let flip = |s: &str, i: usize| {
        let mut b = s.as_bytes().to_vec();
        b[i] = if b[i] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    let mut cases = vec![
        flip(&t, t.len() - 1), // last digit of the secret
        flip(&t, 4 + 32 + 1),  // first digit of the secret
        flip(&t, 4),           // first digit of the id
        flip(&t, 4 + 31),      // last digit of the id
        t[..t.len() - 1].to_string(),
        format!("{t}0"),
        t.to_uppercase(),
        t.replacen("mbt_", "mbx_", 1),
        t.replacen('_', "-", 2),
        t[4..].to_string(),
        String::new(),
        "garbage".into(),
        "mbt_".into(),
        "mbt__".into(),
        format!("mbt_{}_{}", "g".repeat(32), "0".repeat(64)),
        format!("mbt_{}_{}", "0".repeat(32), "0".repeat(64)),
        format!(" {t}"),
        format!("{t}\n"),
    ];
    // Non-ASCII of the same byte length, and at every split point.
    let mut na = t.clone();
    na.replace_range(t.len() - 2.., "é");
    cases.push(na);
    cases.push(format!("mbt_{}é{}", &t[4..35], &t[37..]));
    cases.push("mbt_ééééééééééééééééééééééééééééééééééééééééééééééééé".into());
    for c in &cases {
        assert_unauthorized(a.authenticate(c), c);
    }
    // The real token still works: none of this revoked it.
    assert!(a.authenticate(&t).is_ok());
}

fn expired_tokens_are_unauthorized(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let t0 = a.login("alice", PW, Duration::ZERO, "").unwrap();
    assert_unauthorized(a.authenticate(&t0.token), "ttl 0");
    let t = a.login("alice", PW, HOUR, "").unwrap();
    assert!(a.authenticate(&t.token).is_ok());
    a.db.execute(
        "UPDATE tokens SET expires_ms = ?2 WHERE id = ?1",
        params![t.id, now_ms() - 1],
    )
    .unwrap();
    assert_unauthorized(a.authenticate(&t.token), "expired");
    assert!(!a.tokens(None).unwrap().iter().any(|t| t.live));
    assert_eq!(a.users().unwrap()[0].tokens_live, 0);
}

fn revoked_tokens_are_unauthorized(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let t1 = a.login("alice", PW, HOUR, "").unwrap();
    let t2 = a.login("alice", PW, HOUR, "").unwrap();
    let t3 = a.login("alice", PW, HOUR, "").unwrap();
    assert!(a.revoke_token(&t1.id).unwrap());
    assert!(!a.revoke_token(&t1.id).unwrap(), "second revoke is a no-op");
    assert_unauthorized(a.authenticate(&t1.token), "revoked by id");
    assert!(a.authenticate(&t2.token).is_ok());
    // By the whole token string, but only with the right secret.
    let forged = format!("mbt_{}_{}", t2.id, "0".repeat(64));
    assert!(!a.revoke_token(&forged).unwrap());
    assert!(a.authenticate(&t2.token).is_ok());
    assert!(a.revoke_token(&t2.token).unwrap());
    assert_unauthorized(a.authenticate(&t2.token), "revoked by token");
    assert!(!a.revoke_token("not an id").unwrap());
    assert_eq!(a.revoke_user_tokens("alice").unwrap(), 1);
    assert_unauthorized(a.authenticate(&t3.token), "revoked with the user's tokens");
    assert!(matches!(
        a.revoke_user_tokens("bob"),
        Err(AccessError::UnknownUser(_))
    ));
}

fn set_password_revokes_tokens(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let t = a.login("alice", PW, HOUR, "").unwrap();
    a.set_password("alice", "new password 1").unwrap();
    assert_unauthorized(a.authenticate(&t.token), "after password change");
    assert!(
        a.login("alice", PW, HOUR, "")
            .unwrap_err()
            .is_unauthorized()
    );
    let t = a.login("alice", "new password 1", HOUR, "").unwrap();
    assert!(a.authenticate(&t.token).is_ok());
    assert!(matches!(
        a.set_password("alice", "short"),
        Err(AccessError::WeakPassword)
    ));
    assert!(matches!(
        a.set_password("bob", PW),
        Err(AccessError::UnknownUser(_))
    ));
}

fn remove_user_kills_tokens_and_rows(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let u = user(&a, "alice");
    let t = a.login("alice", PW, HOUR, "").unwrap();
    a.record_upload(&u, &id(1), 100).unwrap();
    a.remove_user("alice").unwrap();
    assert_unauthorized(a.authenticate(&t.token), "removed user");
    assert!(a.tokens(None).unwrap().is_empty());
    // A new user of the same name gets nothing of the old one.
    a.add_user("alice", PW, false, None).unwrap();
    assert_unauthorized(a.authenticate(&t.token), "re-added user, old token");
    assert_eq!(a.usage("alice").unwrap(), 0);
    let u = user(&a, "alice");
    assert_eq!(a.readable(&u, &[id(1)]).unwrap(), [false]);
    assert!(matches!(
        a.remove_user("bob"),
        Err(AccessError::UnknownUser(_))
    ));
}

fn machine_rules(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    a.add_user("root", PW, true, None).unwrap();
    let alice = user(&a, "alice");
    let root = user(&a, "root");
    let own: MachineName = "alice/dev".parse().unwrap();
    let other: MachineName = "bob/dev".parse().unwrap();
    let lab: MachineName = "lab/debian".parse().unwrap();
    assert!(a.can_read_machine(&alice, &own).unwrap());
    assert!(a.can_write_machine(&alice, &own));
    assert!(!a.can_read_machine(&alice, &other).unwrap());
    assert!(!a.can_write_machine(&alice, &other));
    assert!(!a.can_read_machine(&alice, &lab).unwrap());
    assert!(a.can_read_machine(&root, &other).unwrap());
    assert!(a.can_write_machine(&root, &other));
    a.publish(&lab, "root", [id(7)]).unwrap();
    assert!(a.is_published(&lab).unwrap());
    assert!(a.can_read_machine(&alice, &lab).unwrap());
    assert!(!a.can_write_machine(&alice, &lab));
    assert_eq!(a.published().unwrap(), ["lab/debian"]);
    assert!(a.unpublish(&lab).unwrap());
    assert!(!a.unpublish(&lab).unwrap());
    assert!(!a.can_read_machine(&alice, &lab).unwrap());
    assert!(a.published().unwrap().is_empty());
}

fn readable_per_user_public_and_admin(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    a.add_user("bob", PW, false, None).unwrap();
    a.add_user("root", PW, true, None).unwrap();
    let (alice, bob, root) = (user(&a, "alice"), user(&a, "bob"), user(&a, "root"));
    a.record_upload(&alice, &id(1), 10).unwrap();
    a.record_upload(&bob, &id(2), 10).unwrap();
    let ids = [id(1), id(2), id(3)];
    assert_eq!(a.readable(&alice, &ids).unwrap(), [true, false, false]);
    assert_eq!(a.readable(&bob, &ids).unwrap(), [false, true, false]);
    assert_eq!(a.readable(&root, &ids).unwrap(), [true, true, true]);
    assert!(a.readable(&alice, &[]).unwrap().is_empty());

    // Publishing grants to everyone; unpublishing takes back only what no other
    // published machine contributed.
    let lab: MachineName = "lab/a".parse().unwrap();
    let lab2: MachineName = "lab/b".parse().unwrap();
    a.publish(&lab, "root", [id(3), id(4)]).unwrap();
    a.publish(&lab2, "root", [id(4)]).unwrap();
    assert_eq!(a.readable(&alice, &ids).unwrap(), [true, false, true]);
    assert_eq!(a.readable(&bob, &ids).unwrap(), [false, true, true]);
    assert_eq!(
        a.usage("alice").unwrap(),
        10,
        "public chunks are not charged"
    );
    a.unpublish(&lab).unwrap();
    assert_eq!(a.readable(&alice, &[id(3), id(4)]).unwrap(), [false, true]);

    // A grant (e.g. a fork of a published base) is per user and uncharged.
    a.grant("alice", &[(id(3), 50), (id(1), 50)]).unwrap();
    assert_eq!(a.readable(&alice, &ids).unwrap(), [true, false, true]);
    assert_eq!(a.readable(&bob, &ids).unwrap(), [false, true, false]);
    assert_eq!(a.usage("alice").unwrap(), 10);
    assert!(matches!(
        a.grant("nobody", &[(id(3), 1)]),
        Err(AccessError::UnknownUser(_))
    ));
}

fn record_upload_charges_once_and_enforces_the_quota(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, Some(1000));
    a.add_user("bob", PW, false, None).unwrap();
    let alice = user(&a, "alice");
    let bob = user(&a, "bob");
    a.record_upload(&alice, &id(1), 600).unwrap();
    a.record_upload(&alice, &id(1), 600).unwrap();
    assert_eq!(a.usage("alice").unwrap(), 600, "charged once");
    // Another user sending the same chunk is charged too (each proves they have it).
    a.record_upload(&bob, &id(1), 600).unwrap();
    assert_eq!(a.usage("bob").unwrap(), 600);
    // Over the quota: refused before anything is recorded.
    let e = a.record_upload(&alice, &id(2), 401).unwrap_err();
    match &e {
        AccessError::QuotaExceeded {
            user,
            used,
            quota,
            need,
        } => {
            assert_eq!(
                (user.as_str(), *used, *quota, *need),
                ("alice", 600, 1000, 401)
            );
        }
        other => panic!("expected QuotaExceeded, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("mbank rm") && msg.contains("mbank admin user quota alice"),
        "{msg}"
    );
    assert_eq!(a.readable(&alice, &[id(2)]).unwrap(), [false]);
    assert_eq!(a.usage("alice").unwrap(), 600);
    // Exactly up to the quota is fine.
    a.record_upload(&alice, &id(2), 400).unwrap();
    assert_eq!(a.usage("alice").unwrap(), 1000);
    // A chunk the user already has costs nothing even when full.
    a.record_upload(&alice, &id(2), 400).unwrap();
    // A batch over the quota records none of it.
    a.set_quota("alice", Some(1500)).unwrap();
    let batch = [(id(3), 300), (id(4), 300), (id(1), 600)];
    assert!(matches!(
        a.record_uploads(&alice, &batch),
        Err(AccessError::QuotaExceeded { need: 600, .. })
    ));
    assert_eq!(a.readable(&alice, &[id(3), id(4)]).unwrap(), [false, false]);
    a.set_quota("alice", None).unwrap();
    a.record_uploads(&alice, &batch).unwrap();
    assert_eq!(a.usage("alice").unwrap(), 1600);
    // Granted chunks are not charged, and a later upload of one is not charged either.
    a.grant("bob", &[(id(9), 5000)]).unwrap();
    a.record_upload(&bob, &id(9), 5000).unwrap();
    assert_eq!(a.usage("bob").unwrap(), 600);
    let users = a.users().unwrap();
    let al = users.iter().find(|u| u.name == "alice").unwrap();
    assert_eq!((al.used, al.quota), (1600, None));
    assert!(matches!(
        a.set_quota("nobody", None),
        Err(AccessError::UnknownUser(_))
    ));
}

fn quota_is_read_from_the_database_not_the_token(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let alice = user(&a, "alice");
    a.set_quota("alice", Some(10)).unwrap();
    assert!(matches!(
        a.record_upload(&alice, &id(1), 11),
        Err(AccessError::QuotaExceeded { .. })
    ));
}

fn prune_drops_rows_of_deleted_chunks(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    a.add_user("bob", PW, false, None).unwrap();
    let alice = user(&a, "alice");
    let bob = user(&a, "bob");
    a.record_upload(&alice, &id(1), 100).unwrap();
    a.record_upload(&alice, &id(2), 100).unwrap();
    a.record_upload(&bob, &id(2), 100).unwrap();
    let lab: MachineName = "lab/a".parse().unwrap();
    a.publish(&lab, "root", [id(2), id(3)]).unwrap();
    let keep = [id(1)];
    let n = a.prune(&|c| keep.contains(c), i64::MAX).unwrap();
    assert_eq!(
        n, 4,
        "alice's and bob's rows of chunk 2, and PUBLIC's of 2 and 3"
    );
    assert_eq!(a.usage("alice").unwrap(), 100);
    assert_eq!(a.usage("bob").unwrap(), 0);
    assert_eq!(
        a.readable(&alice, &[id(1), id(2), id(3)]).unwrap(),
        [true, false, false]
    );
    assert_eq!(a.prune(&|_| true, i64::MAX).unwrap(), 0);
    let left: i64 =
        a.db.query_row("SELECT count(*) FROM published_chunks", params![], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(left, 0);
    // The machine stays published (its remaining chunks would be re-granted by publish).
    assert!(a.is_published(&lab).unwrap());
}

fn two_connections_see_each_other(b: Backend) {
    let dir = bank(b);
    let a = Access::open(dir.path()).unwrap();
    let b = Access::open(dir.path()).unwrap();
    a.add_user("alice", PW, false, None).unwrap();
    let t = b.login("alice", PW, HOUR, "").unwrap();
    assert!(a.authenticate(&t.token).is_ok());
    a.revoke_token(&t.id).unwrap();
    assert_unauthorized(b.authenticate(&t.token), "revoked on another connection");
    let h = std::thread::spawn(move || b.users().unwrap().len());
    assert_eq!(h.join().unwrap(), 1);
}

fn prune_leaves_rights_recorded_since_the_cutoff(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    a.add_user("bob", PW, false, None).unwrap();
    let alice = user(&a, "alice");
    let bob = user(&a, "bob");
    for n in 1..=3 {
        a.record_upload(&alice, &id(n), 100).unwrap();
    }
    a.record_upload(&bob, &id(3), 100).unwrap();
    // Rights to chunks 1 and 3 recorded long ago (before any writer in flight) ...
    a.db.execute(
        "UPDATE chunk_owners SET recorded_ms = 1000 WHERE chunk IN (?1, ?2)",
        params![id(1).as_bytes().as_slice(), id(3).as_bytes().as_slice()],
    )
    .unwrap();
    // ... except bob's of chunk 3, sent again by a writer in flight: recorded again.
    a.record_upload(&bob, &id(3), 100).unwrap();
    let cutoff = now_ms() - 60_000;
    // Every chunk looks gone to GC (it cannot see chunks the server holds back).
    let n = a.prune(&|_| false, cutoff).unwrap();
    assert_eq!(n, 1, "only alice's right to chunk 1");
    assert_eq!(
        a.readable(&alice, &[id(1), id(2), id(3)]).unwrap(),
        [false, true, true],
        "a right to a chunk someone sent since the cutoff stays, for every user"
    );
    assert!(a.readable(&bob, &[id(3)]).unwrap()[0]);
}

#[test]
fn a_version_1_database_is_migrated_with_old_rights() {
    let d = tempfile::tempdir().unwrap();
    {
        let c = rusqlite::Connection::open(d.path().join(FILE_NAME)).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO chunk_owners (user, chunk, bytes, charged) VALUES ('alice', ?1, 7, 1)",
            rusqlite::params![id(9).as_bytes().as_slice()],
        )
        .unwrap();
    }
    let a = Access::open(d.path()).unwrap();
    let v: i64 =
        a.db.as_sqlite()
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let (bytes, at): (i64, i64) =
        a.db.query_row(
            "SELECT bytes, recorded_ms FROM chunk_owners",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((bytes, at), (7, 0), "kept, as recorded before any cutoff");
}

fn a_disabled_user_cannot_log_in_until_enabled(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, None);
    let t = a.login("alice", PW, HOUR, "").unwrap();
    assert!(a.set_disabled("alice", true).unwrap());
    assert_unauthorized(a.authenticate(&t.token), "disabled user's token");
    assert!(
        a.login("alice", PW, HOUR, "")
            .unwrap_err()
            .is_unauthorized()
    );
    let info = a.users().unwrap();
    assert!(info[0].disabled, "{info:?}");
    // Disabling twice changes nothing; enabling lets them log in, the old token stays revoked.
    assert!(!a.set_disabled("alice", true).unwrap());
    assert!(a.set_disabled("alice", false).unwrap());
    assert_unauthorized(a.authenticate(&t.token), "token revoked by disabling");
    let t = a.login("alice", PW, HOUR, "").unwrap();
    assert!(a.authenticate(&t.token).is_ok());
    assert!(!a.users().unwrap()[0].disabled);
    assert!(matches!(
        a.set_disabled("bob", true),
        Err(AccessError::UnknownUser(_))
    ));
}

#[test]
fn a_schema_2_database_gains_the_disabled_flag_and_first_ms() {
    let d = tempfile::tempdir().unwrap();
    {
        let a = Access::open(d.path()).unwrap();
        a.add_user("alice", PW, false, None).unwrap();
        a.db.execute_batch(
            "ALTER TABLE users DROP COLUMN disabled;
                 ALTER TABLE chunk_owners DROP COLUMN first_ms;
                 DROP TABLE last_commits;
                 DROP TABLE staged_uploads;
                 PRAGMA user_version = 2;",
        )
        .unwrap();
    }
    let a = Access::open(d.path()).unwrap();
    assert!(!a.users().unwrap()[0].disabled);
    assert!(a.login("alice", PW, HOUR, "").is_ok());
}

fn last_commits_and_staged_uploads_are_shared(b: Backend) {
    let dir = bank(b);
    let a = Access::open(dir.path()).unwrap();
    let other = Access::open(dir.path()).unwrap();
    assert_eq!(other.last_commit("alice").unwrap(), None);
    a.note_commit(&["alice", "bob"], 1000).unwrap();
    assert_eq!(other.last_commit("alice").unwrap(), Some(1000));
    assert_eq!(other.last_commit("bob").unwrap(), Some(1000));
    // A server whose clock is behind does not move it back.
    other.note_commit(&["alice"], 900).unwrap();
    assert_eq!(a.last_commit("alice").unwrap(), Some(1000));
    other.note_commit(&["alice"], 2000).unwrap();
    assert_eq!(a.last_commit("alice").unwrap(), Some(2000));

    let up = |n: u8, len: u64, expires_ms: i64| StagedUpload {
        sha256: [n; 32],
        len,
        expires_ms,
    };
    a.stage_uploads("alice", &[up(1, 10, 100), up(2, 20, 5000)])
        .unwrap();
    a.stage_uploads("bob", &[up(1, 30, 100)]).unwrap();
    assert_eq!(
        other.staged_uploads("alice").unwrap(),
        [up(1, 10, 100), up(2, 20, 5000)]
    );
    // Handed out again: one row, the new URL's.
    other.stage_uploads("alice", &[up(2, 20, 6000)]).unwrap();
    assert_eq!(
        a.staged_uploads("alice").unwrap(),
        [up(1, 10, 100), up(2, 20, 6000)]
    );
    assert_eq!(
        other.expire_staged("alice", 1000).unwrap(),
        [up(1, 10, 100)]
    );
    assert_eq!(a.expire_staged("alice", 1000).unwrap(), []);
    assert_eq!(a.staged_uploads("alice").unwrap(), [up(2, 20, 6000)]);
    assert_eq!(a.take_staged("alice", &[[2; 32], [1; 32]]).unwrap(), 1);
    assert_eq!(other.staged_uploads("alice").unwrap(), []);
    assert_eq!(other.staged_uploads("bob").unwrap(), [up(1, 30, 100)]);
}

fn with_user_lock_runs_f(b: Backend) {
    let (_d, a) = with_user(b, "alice", false, Some(100));
    let alice = user(&a, "alice");
    // `f` may use the connection that holds the lock.
    let r = a
        .with_user_lock("alice", || a.record_upload(&alice, &id(1), 10))
        .unwrap();
    r.unwrap();
    assert_eq!(a.usage("alice").unwrap(), 10);
}

/// Waits until `cond` holds, for at most a minute.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited a minute for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_user_lock_on_postgres_excludes_other_connections_until_released() {
    let dir = bank(Backend::Postgres);
    let a = Access::open(dir.path()).unwrap();
    let b = Access::open(dir.path()).unwrap();
    let watch = Access::open(dir.path()).unwrap();
    let waiting = || -> i64 {
        watch
            .db
            .query_row(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                params![],
                |r| r.get(0),
            )
            .unwrap()
    };
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (leave, leave_rx) = std::sync::mpsc::channel::<()>();
    let first = std::thread::spawn(move || {
        a.with_user_lock("alice", || {
            entered_tx.send(()).unwrap();
            leave_rx.recv().unwrap();
        })
        .unwrap();
    });
    entered.recv().unwrap();
    // Another user's lock is free meanwhile.
    assert_eq!(watch.with_user_lock("bob", || 7).unwrap(), 7);
    let got = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let second = {
        let got = got.clone();
        std::thread::spawn(move || {
            b.with_user_lock("alice", || {
                got.store(true, std::sync::atomic::Ordering::SeqCst)
            })
            .unwrap();
        })
    };
    wait_for("the second holder to wait for alice's lock", || {
        waiting() == 1
    });
    assert!(
        !got.load(std::sync::atomic::Ordering::SeqCst),
        "the second holder got in while the first held the lock"
    );
    leave.send(()).unwrap();
    first.join().unwrap();
    second.join().unwrap();
    assert!(got.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(waiting(), 0);
}

#[test]
fn a_newer_postgres_schema_is_refused() {
    let dir = bank(Backend::Postgres);
    let a = Access::open(dir.path()).unwrap();
    a.db.execute("UPDATE access_schema SET version = 99", params![])
        .unwrap();
    assert!(matches!(
        Access::open(dir.path()),
        Err(AccessError::TooNew(99))
    ));
}

#[test]
fn servers_opening_a_new_postgres_database_at_once_create_its_schema_once() {
    let dir = bank(Backend::Postgres);
    let opened: Vec<_> = (0..4)
        .map(|_| {
            let path = dir.path().to_path_buf();
            std::thread::spawn(move || Access::open(&path).map(|_| ()))
        })
        .collect();
    for h in opened {
        h.join().unwrap().unwrap();
    }
    let a = Access::open(dir.path()).unwrap();
    let n: i64 =
        a.db.query_row("SELECT count(*) FROM access_schema", params![], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 1);
}

/// Each test named runs twice: `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(super::Backend::Sqlite)
            }
            #[test]
            fn postgres() {
                super::$name(super::Backend::Postgres)
            }
        }
    )*};
}

on_both!(
    add_login_authenticate_round_trip,
    add_user_rejects_duplicates_bad_names_and_weak_passwords,
    wrong_password_and_unknown_user_look_the_same,
    tampered_and_malformed_tokens_are_unauthorized,
    expired_tokens_are_unauthorized,
    revoked_tokens_are_unauthorized,
    set_password_revokes_tokens,
    remove_user_kills_tokens_and_rows,
    machine_rules,
    readable_per_user_public_and_admin,
    record_upload_charges_once_and_enforces_the_quota,
    quota_is_read_from_the_database_not_the_token,
    prune_drops_rows_of_deleted_chunks,
    prune_leaves_rights_recorded_since_the_cutoff,
    a_disabled_user_cannot_log_in_until_enabled,
    two_connections_see_each_other,
    open_creates_and_reopens,
    last_commits_and_staged_uploads_are_shared,
    with_user_lock_runs_f,
);
