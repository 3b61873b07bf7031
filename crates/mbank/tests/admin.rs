//! `mbank admin`: users, tokens and published machines in `<bank>/access.db`, through
//! the real binary; the effects are checked with the `mbank_access` library the server
//! uses.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::{Bank, Run};
use mbank_access::Access;
use mbank_core::{ChunkId, MachineName};
use serde_json::Value;

const PW: &str = "correct horse battery";

/// Runs `mbank --bank B admin ARGS` with `input` on standard input.
fn admin_with_input(bank: &Bank, args: &[&str], input: &str) -> Run {
    let mut c = bank.cmd();
    c.arg("admin").args(args);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{c:?}");
    let mut child = c.spawn().expect("spawn mbank");
    // mbank may exit before it reads (e.g. it refuses an unknown user first): a broken
    // pipe here is not a failure; the exit status and messages are checked instead.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    Run::from_output(what, child.wait_with_output().unwrap())
}

fn admin(bank: &Bank, args: &[&str]) -> Run {
    let mut a = vec!["admin"];
    a.extend_from_slice(args);
    bank.run(&a)
}

fn add_user(bank: &Bank, name: &str, extra: &[&str]) -> Run {
    // `--` so that names starting with '-' reach mbank's own check.
    let mut args = vec!["user", "add", "--password-stdin"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", name]);
    admin_with_input(bank, &args, &format!("{PW}\n"))
}

fn users(bank: &Bank) -> Vec<Value> {
    admin(bank, &["user", "ls", "--json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .clone()
}

fn login(bank: &Bank, name: &str) -> (Access, mbank_access::IssuedToken) {
    let a = Access::open(&bank.path).unwrap();
    let t = a
        .login(name, PW, Duration::from_secs(3600), "test")
        .unwrap();
    (a, t)
}

#[test]
fn user_add_ls_quota_rm() {
    let bank = Bank::new();
    add_user(&bank, "alice", &["--quota", "10G"]).ok();
    add_user(&bank, "root", &["--admin"]).ok();
    let us = users(&bank);
    assert_eq!(us.len(), 2, "{us:?}");
    assert_eq!(us[0]["name"], "alice");
    assert_eq!(us[0]["admin"], false);
    assert_eq!(us[0]["quota"], 10u64 << 30);
    assert_eq!(us[0]["used"], 0);
    assert_eq!(us[1]["name"], "root");
    assert_eq!(us[1]["admin"], true);
    assert_eq!(us[1]["quota"], Value::Null);
    assert!(bank.path.join("access.db").is_file());

    // The password given on standard input is the one that logs in (no newline).
    let (a, t) = login(&bank, "alice");
    assert_eq!(a.authenticate(&t.token).unwrap().name, "alice");

    // The human table names every user.
    let table = admin(&bank, &["user", "ls"]).ok().stdout;
    assert!(table.contains("alice") && table.contains("root"), "{table}");

    admin(&bank, &["user", "quota", "alice", "none"]).ok();
    assert_eq!(users(&bank)[0]["quota"], Value::Null);
    admin(&bank, &["user", "quota", "alice", "5M"]).ok();
    assert_eq!(users(&bank)[0]["quota"], 5u64 << 20);
    admin(&bank, &["user", "quota", "alice", "lots"])
        .failed()
        .stderr_has(&["lots"]);

    // Disabled: the token stops working, a login is refused, the user stays listed.
    admin(&bank, &["user", "disable", "alice"])
        .ok()
        .stderr_has(&["disabled alice", "tokens are revoked"]);
    assert!(a.authenticate(&t.token).unwrap_err().is_unauthorized());
    assert_eq!(users(&bank)[0]["disabled"], true, "{:?}", users(&bank));
    assert!(
        a.login("alice", PW, Duration::from_secs(3600), "test")
            .is_err(),
        "a disabled user cannot log in"
    );
    admin(&bank, &["user", "disable", "alice"])
        .ok()
        .stderr_has(&["alice was disabled already"]);
    admin(&bank, &["user", "enable", "alice"])
        .ok()
        .stderr_has(&["enabled alice"]);
    assert_eq!(users(&bank)[0]["disabled"], false);
    let (a, t) = login(&bank, "alice");
    assert_eq!(a.authenticate(&t.token).unwrap().name, "alice");
    admin(&bank, &["user", "disable", "nobody"])
        .failed()
        .stderr_has(&["nobody"]);

    admin(&bank, &["user", "rm", "alice"]).ok();
    assert!(a.authenticate(&t.token).unwrap_err().is_unauthorized());
    assert_eq!(users(&bank).len(), 1);
    admin(&bank, &["user", "rm", "alice"])
        .failed()
        .stderr_has(&["no user", "alice"]);
}

#[test]
fn duplicate_and_bad_users_are_refused() {
    let bank = Bank::new();
    add_user(&bank, "alice", &[]).ok();
    add_user(&bank, "alice", &["--admin"])
        .failed()
        .stderr_has(&["alice", "exists already"]);
    assert_eq!(
        users(&bank)[0]["admin"],
        false,
        "the first alice is unchanged"
    );
    for bad in ["Alice", "a/b", "-x", "", "a b", "ålice", &"a".repeat(33)] {
        add_user(&bank, bad, &[])
            .failed()
            .stderr_has(&["user name", "invalid", "a-z"]);
    }
    admin_with_input(
        &bank,
        &["user", "add", "bob", "--password-stdin"],
        "short\n",
    )
    .failed()
    .stderr_has(&["at least 8 characters"]);
    admin_with_input(&bank, &["user", "add", "bob", "--password-stdin"], "")
        .failed()
        .stderr_has(&["at least 8 characters"]);
    // Without --password-stdin and without a terminal: a clear refusal, no user.
    admin(&bank, &["user", "add", "carol"])
        .failed()
        .stderr_has(&["terminal", "--password-stdin"]);
    assert_eq!(users(&bank).len(), 1);
}

#[test]
fn passwd_and_tokens() {
    let bank = Bank::new();
    add_user(&bank, "alice", &[]).ok();
    let (a, t1) = login(&bank, "alice");
    let (_, t2) = login(&bank, "alice");

    let ls = admin(&bank, &["token", "ls", "--user", "alice", "--json"])
        .ok()
        .json();
    let ls = ls.as_array().unwrap();
    assert_eq!(ls.len(), 2);
    let out = admin(&bank, &["token", "ls"]).ok().stdout;
    assert!(out.contains(&t1.id) && out.contains(&t2.id), "{out}");
    assert!(
        !out.contains(&t1.token[37..]),
        "a secret was listed:\n{out}"
    );

    admin(&bank, &["token", "revoke", &t1.id]).ok();
    assert!(a.authenticate(&t1.token).unwrap_err().is_unauthorized());
    assert!(a.authenticate(&t2.token).is_ok());
    admin(&bank, &["token", "revoke", &t1.id])
        .failed()
        .stderr_has(&["no live token"]);

    admin_with_input(
        &bank,
        &["user", "passwd", "alice", "--password-stdin"],
        "a new password\n",
    )
    .ok();
    assert!(a.authenticate(&t2.token).unwrap_err().is_unauthorized());
    a.login("alice", "a new password", Duration::from_secs(60), "")
        .unwrap();
    admin_with_input(
        &bank,
        &["user", "passwd", "nobody", "--password-stdin"],
        "a new password\n",
    )
    .failed()
    .stderr_has(&["no user", "nobody"]);
    admin(&bank, &["token", "ls", "--user", "nobody"])
        .failed()
        .stderr_has(&["no user"]);
}

#[test]
fn publish_and_unpublish() {
    let bank = Bank::new();
    admin(&bank, &["publish", "lab/missing"])
        .failed()
        .stderr_has(&["no machine", "lab/missing"]);
    admin(&bank, &["publish", "not a machine"]).failed();
    assert_eq!(
        admin(&bank, &["published", "--json"]).ok().json(),
        Value::Array(vec![])
    );

    let img = bank.file("base.raw");
    common::write_image(&img, &common::random_bytes(256 << 10, 7), 64 << 10);
    bank.import("lab/base", &img, &["--chunk-size", "16K"]);
    let chunks: Vec<ChunkId> = bank
        .chunk_files()
        .iter()
        .map(|h| h.parse().unwrap())
        .collect();
    assert_eq!(chunks.len(), 16);

    add_user(&bank, "alice", &[]).ok();
    let (a, t) = login(&bank, "alice");
    let alice = a.authenticate(&t.token).unwrap();
    let m: MachineName = "lab/base".parse().unwrap();
    assert!(!a.can_read_machine(&alice, &m).unwrap());
    assert!(a.readable(&alice, &chunks).unwrap().iter().all(|r| !r));

    let published = admin(&bank, &["publish", "lab/base"]).ok();
    // Its head is packed for exports.
    assert!(published.stderr.contains("packed its head"), "{published}");
    let packs: Vec<_> = std::fs::read_dir(bank.path.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(packs.len(), 1, "{packs:?}");
    assert!(packs[0].ends_with(".pack"), "{packs:?}");
    assert_eq!(
        admin(&bank, &["published", "--json"]).ok().json(),
        serde_json::json!(["lab/base"])
    );
    assert_eq!(admin(&bank, &["published"]).ok().stdout, "lab/base\n");
    assert!(a.can_read_machine(&alice, &m).unwrap());
    assert!(
        a.readable(&alice, &chunks).unwrap().iter().all(|r| *r),
        "every chunk of the published machine is readable"
    );
    assert_eq!(a.usage("alice").unwrap(), 0);

    admin(&bank, &["unpublish", "lab/base"]).ok();
    assert!(!a.can_read_machine(&alice, &m).unwrap());
    assert!(a.readable(&alice, &chunks).unwrap().iter().all(|r| !r));
    admin(&bank, &["unpublish", "lab/base"])
        .failed()
        .stderr_has(&["not published"]);
}

#[test]
fn admin_needs_a_bank() {
    let dir = tempfile::tempdir().unwrap();
    let r = common::mbank_run(&[
        "--bank",
        dir.path().to_str().unwrap(),
        "admin",
        "user",
        "ls",
    ]);
    r.failed().stderr_has(&["not a bank"]);
    assert!(!dir.path().join("access.db").exists());
    common::mbank_run(&["admin", "user", "ls"])
        .failed()
        .stderr_has(&["--bank"]);
}

#[test]
fn publish_covers_the_streams() {
    // A machine whose only chunks are its kernel and initrd streams (its disk is empty).
    let bank = Bank::new();
    let kernel = bank.file("vmlinuz");
    let initrd = bank.file("initrd.img");
    std::fs::write(&kernel, common::random_bytes(300 << 10, 11)).unwrap();
    std::fs::write(&initrd, common::random_bytes(200 << 10, 12)).unwrap();
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    bank.run(&[
        "-q",
        "create",
        "lab/k",
        "--disk-size",
        "1M",
        "--kernel",
        k,
        "--initrd",
        i,
    ])
    .ok();
    let chunks: Vec<ChunkId> = bank
        .chunk_files()
        .iter()
        .map(|h| h.parse().unwrap())
        .collect();
    assert!(chunks.len() >= 2, "{chunks:?}");
    add_user(&bank, "alice", &[]).ok();
    let (a, t) = login(&bank, "alice");
    let alice = a.authenticate(&t.token).unwrap();
    assert!(a.readable(&alice, &chunks).unwrap().iter().all(|r| !r));
    admin(&bank, &["publish", "lab/k"]).ok();
    assert!(
        a.readable(&alice, &chunks).unwrap().iter().all(|r| *r),
        "every stream chunk of the published machine is readable"
    );
}
