//! The bank server end to end: `mbank serve` over HTTPS (a test CA made with openssl),
//! users added with `mbank admin`, clients logged in with `mbank login`, and every
//! command run with `--bank https://…`. Raw requests (isolation probes, bad tokens,
//! garbage) go through curl.

mod common;
#[path = "common/garage.rs"]
mod garage;
#[path = "../../mbank-nbd/tests/common/pki.rs"]
mod pki;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn need(tools: &[&str]) {
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(found, "this test needs {t}: run scripts/setup.sh");
    }
}

/// A bank served by `mbank serve` with TLS, with users alice and bob.
struct Served {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bank_dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
    /// More options for `mbank serve`, from the next (re)start.
    serve_args: Vec<String>,
}

const PASSWORDS: &[(&str, &str)] = &[("alice", "alice-secret-1"), ("bob", "bob-secret-22")];

impl Served {
    fn start() -> Served {
        Served::start_on(None)
    }

    /// A served bank whose chunks are in `cluster`'s bucket, when given.
    fn start_on(cluster: Option<&garage::Cluster>) -> Served {
        need(&["openssl", "curl"]);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let bank_dir = root.join("bank");
        match cluster {
            None => {
                mbank_run(&[OsStr("--bank"), bank_dir.as_os_str(), OsStr("init")]).ok();
            }
            Some(c) => {
                // The key in the bank's credentials file (0600), so that the server
                // needs nothing in its environment.
                use std::os::unix::fs::PermissionsExt;
                fs::create_dir(&bank_dir).unwrap();
                let creds = bank_dir.join("s3-credentials");
                fs::write(
                    &creds,
                    format!("key_id={}\nsecret={}\n", c.key_id(), c.secret()),
                )
                .unwrap();
                fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).unwrap();
                let mut cmd = mbank();
                cmd.env_remove("AWS_ACCESS_KEY_ID")
                    .env_remove("AWS_SECRET_ACCESS_KEY");
                cmd.arg("--bank")
                    .arg(&bank_dir)
                    .args(["init", "--store", &c.store_url()]);
                run_cmd(cmd).ok();
            }
        }
        // A test CA and a server certificate for 127.0.0.1 signed by it.
        let ca = pki::Ca::new(&root, "ca");
        let (cert, key) = ca.server(&root.join("tls"));
        let mut s = Served {
            bank_dir,
            ca: ca.cert(),
            cert,
            key,
            log: root.join("server.log"),
            root,
            _tmp: tmp,
            port: 0,
            child: None,
            serve_args: Vec::new(),
        };
        for (user, pw) in PASSWORDS {
            s.add_user(user, pw, &[]);
        }
        s.spawn();
        s
    }

    fn add_user(&self, user: &str, pw: &str, extra: &[&str]) {
        let mut c = mbank();
        c.arg("--bank").arg(&self.bank_dir);
        c.args(["admin", "user", "add", user, "--password-stdin"]);
        c.args(extra);
        self.with_stdin(c, pw).ok();
    }

    fn with_stdin(&self, c: Command, input: &str) -> Run {
        with_stdin(c, input)
    }

    /// Starts the server (on the port it had, after the first start).
    fn spawn(&mut self) {
        let mut c = mbank();
        c.arg("--bank").arg(&self.bank_dir).arg("serve");
        c.arg("--listen").arg(format!("127.0.0.1:{}", self.port));
        c.arg("--tls-cert")
            .arg(&self.cert)
            .arg("--tls-key")
            .arg(&self.key);
        c.args(&self.serve_args);
        c.stdout(Stdio::piped());
        c.stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap(),
        );
        let mut child = c.spawn().unwrap();
        let port = common::serve_port(&mut child, &self.log);
        self.port = port;
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `mbank --bank DIR ARGS` on the bank's host.
    fn local(&self, args: &[&str]) -> Run {
        let mut c = mbank();
        c.arg("--bank").arg(&self.bank_dir).args(args);
        run_cmd(c)
    }

    fn config_dir(&self, user: &str) -> PathBuf {
        self.root.join(format!("config-{user}"))
    }

    fn try_login(&self, user: &str, pw: &str, extra: &[&str]) -> Run {
        let mut c = mbank();
        c.env("XDG_CONFIG_HOME", self.config_dir(user));
        c.arg("login")
            .arg(self.url())
            .args(["--user", user, "--password-stdin"]);
        c.arg("--ca-cert").arg(&self.ca).args(extra);
        self.with_stdin(c, pw)
    }

    /// Logs `user` in and returns their client view of the bank.
    fn login(&self, user: &str) -> Bank {
        let pw = PASSWORDS.iter().find(|(u, _)| *u == user).unwrap().1;
        self.try_login(user, pw, &[]).ok();
        self.client(user)
    }

    fn client(&self, user: &str) -> Bank {
        Bank::remote(
            &self.url(),
            &self.root.join(format!("scratch-{user}")),
            &self.config_dir(user),
        )
    }

    /// The token `mbank login` stored for `user`.
    fn token(&self, user: &str) -> String {
        let p = self.config_dir(user).join("mbank/credentials.json");
        let text = fs::read_to_string(&p).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        find_token(&v).unwrap_or_else(|| panic!("no token in {}: {text}", p.display()))
    }

    /// A raw request with curl: (status, body).
    fn curl(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> (u16, Vec<u8>) {
        let out = self.root.join(format!("curl-{}.out", unique()));
        let mut c = Command::new("curl");
        c.args(["-s", "-g", "--path-as-is", "-H", "Expect:", "-o"])
            .arg(&out);
        c.args(["-w", "%{http_code}", "-X", method, "--cacert"])
            .arg(&self.ca);
        if let Some(t) = token {
            c.arg("-H").arg(format!("Authorization: Bearer {t}"));
        }
        let body_file = self.root.join(format!("curl-{}.in", unique()));
        if let Some(b) = body {
            fs::write(&body_file, b).unwrap();
            c.arg("-H").arg("Content-Type: application/octet-stream");
            c.arg("--data-binary")
                .arg(format!("@{}", body_file.display()));
        }
        c.arg(format!("{}{path}", self.url()));
        let o = c.output().unwrap();
        let code: u16 = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let got = fs::read(&out).unwrap_or_default();
        let _ = fs::remove_file(&out);
        let _ = fs::remove_file(&body_file);
        (code, got)
    }

    fn curl_json(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        let (code, b) = self.curl(token, method, path, body);
        let v = serde_json::from_slice(&b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned()));
        (code, v)
    }

    /// Chunk files in the bank's directory (its store).
    fn chunk_count(&self) -> usize {
        chunk_files(&self.bank_dir).len()
    }

    fn server_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}

#[allow(non_snake_case)]
fn OsStr(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// An image of `size` bytes with random data in `ranges`.
fn image(size: usize, ranges: &[(usize, usize)], seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut rng = Rng::new(seed);
    for &(a, b) in ranges {
        rng.fill(&mut v[a..b]);
    }
    v
}

fn write_img(bank: &Bank, img: &[u8]) -> PathBuf {
    let p = bank.file(&format!("image-{}.raw", unique()));
    fs::write(&p, img).unwrap();
    p
}

/// Exports `r` through `bank` and checks it is `want`.
fn assert_export(bank: &Bank, r: &str, want: &[u8], what: &str) {
    assert_same_bytes(&export_bytes(bank, r), want, what);
}

fn export_bytes(bank: &Bank, r: &str) -> Vec<u8> {
    let out = bank.file(&format!("export-{}.raw", unique()));
    bank.export(r, &out)
}

/// The chunk ids of a machine's head, read from the bank directory's catalog with the
/// embedded bank (the bank's host sees everything).
fn head_chunks(s: &Served, machine: &str) -> Vec<String> {
    let bank = mbank_bank::Bank::open(&s.bank_dir, true).unwrap();
    let v = bank.resolve(&machine.parse().unwrap()).unwrap();
    let idx = bank.catalog().disk_index(&v).unwrap();
    idx.chunks.iter().flatten().map(|c| c.to_hex()).collect()
}

#[test]
fn two_users_full_flows_over_https() {
    need(&["qemu-io", "qemu-img"]);
    let s = Served::start();
    let alice = s.login("alice");
    let bob = s.login("bob");

    let img_a = image(8 * MIB, &[(0, MIB), (3 * MIB, 3 * MIB + 300 * KIB)], 1);
    let img_b = image(6 * MIB, &[(MIB, 2 * MIB + 5)], 2);
    let pa = write_img(&alice, &img_a);
    let pb = write_img(&bob, &img_b);
    let ra = alice.import("alice/dev", &pa, &[]);
    let rb = bob.import("bob/dev", &pb, &[]);
    assert!(ra["chunks_new"].as_u64().unwrap() > 0, "{ra}");
    assert_export(&alice, "alice/dev", &img_a, "alice's export");
    assert_export(&bob, "bob/dev", &img_b, "bob's export");

    // log and ls over HTTP; each sees only their own machine.
    let log = alice.log("alice/dev");
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["version"], ra["version"]);
    assert_eq!(bob.log("bob/dev")[0]["version"], rb["version"]);
    let names = |b: &Bank| -> Vec<String> {
        let v = b.json(&["ls", "--json"]);
        let names = v.as_array().unwrap().iter();
        names
            .map(|m| m["machine"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&alice), ["alice/dev"]);
    assert_eq!(names(&bob), ["bob/dev"]);

    // attach over HTTP with a real NBD client: write, read back, check in.
    let cache = s.root.join("cache-alice");
    let mut a = alice.attach(&cache, "alice/dev", &[]);
    let patch = random_bytes(100 * KIB, 9);
    let pf = alice.file("patch.bin");
    fs::write(&pf, &patch).unwrap();
    let at = 5 * MIB + 4096;
    let r = tool(
        "qemu-io",
        &[
            "-f".to_string(),
            "raw".into(),
            "-c".into(),
            format!("write -s {} {at} {}", pf.display(), patch.len()),
            "-c".into(),
            "flush".into(),
            "-c".into(),
            format!("read -v {} 16", at),
            a.uri(),
        ],
    );
    assert!(r.success() && !r.stdout.contains("failed"), "qemu-io:\n{r}");
    let done = a.stop();
    assert!(done.success(), "attach:\n{done}");
    let mut want = img_a.clone();
    want[at..at + patch.len()].copy_from_slice(&patch);
    assert_export(&alice, "alice/dev", &want, "alice's checked-in disk");
    assert_eq!(alice.log("alice/dev").len(), 2);

    // bob reads his disk through attach with qemu-img compare (every byte).
    let cache_b = s.root.join("cache-bob");
    let mut b = bob.attach(&cache_b, "bob/dev", &[]);
    let r = common::compare_raw(&pb, &b.uri());
    assert!(r.success(), "qemu-img compare:\n{r}");
    assert!(b.stop().success());

    // The server counted it all; an administrator's token reads the counts.
    let (code, _) = s.curl(None, "GET", "/metrics", None);
    assert_eq!(code, 401);
    s.add_user("ops", "ops-secret-4444", &["--admin"]);
    s.try_login("ops", "ops-secret-4444", &[]).ok();
    let (code, m) = s.curl(Some(&s.token("ops")), "GET", "/metrics", None);
    let m = String::from_utf8_lossy(&m).into_owned();
    assert_eq!(code, 200, "{m}");
    for needle in [
        "mbank_received_bytes_total",
        "mbank_chunks_stored_total",
        "mbank_dedup_ratio",
        "mbank_sessions 0",
        "mbank_users 3",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    let commits: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("mbank_commits_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(commits >= 3, "{m}");
}

#[test]
fn isolation_probes_see_nothing_of_another_user() {
    let s = Served::start();
    let alice = s.login("alice");
    let bob = s.login("bob");
    let secret = image(4 * MIB, &[(0, 4 * MIB)], 77);
    let pb = write_img(&bob, &secret);
    let rb = bob.import("bob/secret", &pb, &[]);
    let bver = rb["version"].as_str().unwrap().to_string();
    let chunks = head_chunks(&s, "bob/secret");
    let (ta, tb) = (s.token("alice"), s.token("bob"));

    // Machines and versions: exactly as if absent.
    let probe = |args: &[&str], absent: &[&str]| {
        let got = alice.run(args).failed();
        let want = alice.run(absent).failed();
        let norm = |t: &str| {
            t.replace("bob/secret", "X")
                .replace("bob/nothere", "X")
                .replace(&bver, "V")
                .replace("0123456789abcdef0123456789abcdef", "V")
        };
        assert_eq!(norm(&got.stderr), norm(&want.stderr), "{got}\n{want}");
    };
    probe(&["log", "bob/secret"], &["log", "bob/nothere"]);
    probe(
        &["export", &format!("bob/secret@{bver}"), "/dev/null"],
        &[
            "export",
            "bob/nothere@0123456789abcdef0123456789abcdef",
            "/dev/null",
        ],
    );
    let ls = alice.json(&["ls", "--json"]);
    assert!(!ls.to_string().contains("bob"), "{ls}");
    for path in [
        "/v1/machines/bob/secret".to_string(),
        "/v1/machines/bob/secret/versions".to_string(),
        format!("/v1/machines/bob/secret/versions/{bver}/index"),
        "/v1/machines/bob/secret/lease".to_string(),
    ] {
        let (code, v) = s.curl_json(Some(&ta), "GET", &path, None);
        let (code2, v2) = s.curl_json(Some(&ta), "GET", &path.replace("secret", "nothere"), None);
        assert_eq!(
            (code, &v["kind"]),
            (404, &Value::from("machine_not_found")),
            "{path}: {v}"
        );
        assert_eq!((code2, &v2["kind"]), (code, &v["kind"]), "{path}");
    }

    // A chunk id known to be bob's: alice gets what a missing chunk gets.
    let bobs = &chunks[0];
    let (code, v) = s.curl_json(Some(&ta), "GET", &format!("/v1/chunks/{bobs}"), None);
    let none = "ab".repeat(32);
    let (code2, v2) = s.curl_json(Some(&ta), "GET", &format!("/v1/chunks/{none}"), None);
    assert_eq!((code, code2), (404, 404));
    assert_eq!(v["kind"], v2["kind"]);
    assert_eq!(
        v["message"].as_str().unwrap().replace(bobs, "ID"),
        v2["message"].as_str().unwrap().replace(&none, "ID")
    );
    let (code, _) = s.curl(Some(&tb), "GET", &format!("/v1/chunks/{bobs}"), None);
    assert_eq!(code, 200, "bob reads his own chunk");
    // The same in a batch download: bob gets his chunks, alice the answer for a
    // missing one, the same whether it is bob's or no one's.
    let two: Vec<u8> = chunks[..2].iter().flat_map(|c| hex(c)).collect();
    let (code, got) = s.curl(Some(&tb), "POST", "/v1/chunks/get", Some(&two));
    assert_eq!(code, 200);
    assert!(
        got.len() > 2 * 64 * KIB / 2,
        "bob's two chunks: {} bytes",
        got.len()
    );
    let (code, v) = s.curl_json(Some(&ta), "POST", "/v1/chunks/get", Some(&two));
    let nobody: Vec<u8> = [none.clone(), none.clone()]
        .iter()
        .flat_map(|c| hex(c))
        .collect();
    let (code2, v2) = s.curl_json(Some(&ta), "POST", "/v1/chunks/get", Some(&nobody));
    assert_eq!((code, code2), (404, 404), "{v} {v2}");
    assert_eq!(v["kind"], v2["kind"]);

    // The missing-chunk query never reveals bob's chunks to alice.
    let ids: Vec<u8> = chunks.iter().flat_map(|c| hex(c)).collect();
    let (code, have_a) = s.curl(Some(&ta), "POST", "/v1/chunks/have", Some(&ids));
    assert_eq!(code, 200);
    assert!(
        have_a.iter().all(|&b| b == 0),
        "alice's have answered {have_a:?}"
    );
    let (_, have_b) = s.curl(Some(&tb), "POST", "/v1/chunks/have", Some(&ids));
    assert!(
        have_b.iter().all(|&b| b == 1),
        "bob's have answered {have_b:?}"
    );

    // Alice importing the same bytes must send them all, yet they are stored once.
    let before = s.chunk_count();
    let pa = write_img(&alice, &secret);
    let ra = alice.import("alice/copy", &pa, &[]);
    assert_eq!(
        ra["chunks_new"], rb["chunks_new"],
        "alice had to send every chunk: {ra}"
    );
    assert_eq!(s.chunk_count(), before, "the bank stores each chunk once");
    assert_export(&alice, "alice/copy", &secret, "alice's copy");

    // Naming bob's chunk in a commit without sending it is refused.
    let fresh = image(64 * KIB, &[(0, 64 * KIB)], 5);
    let pf = write_img(&alice, &fresh);
    alice.import("alice/steal", &pf, &[]);
    let other = image(4 * MIB, &[(0, 4 * MIB)], 78);
    let po = write_img(&bob, &other);
    bob.import("bob/other", &po, &[]);
    let bob_only = head_chunks(&s, "bob/other");
    let body = steal_commit(&s, "alice/steal", &bob_only[0]);
    let (code, v) = s.curl_json(
        Some(&ta),
        "POST",
        "/v1/machines/alice/steal/versions",
        Some(&body),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("send its bytes"),
        "{v}"
    );
    assert_eq!(alice.log("alice/steal").len(), 1, "nothing was committed");

    // Writing under another user's name is refused.
    alice
        .run(&["import", "bob/planted", &pf.display().to_string()])
        .failed()
        .stderr_has(&["alice may write only machines named alice/"]);
    assert!(
        s.local(&["log", "bob/planted"])
            .failed()
            .stderr
            .contains("no machine")
    );

    // What an administrator publishes, every user reads and forks.
    let base = image(2 * MIB, &[(0, MIB)], 31);
    let pbase = s.root.join("base.raw");
    fs::write(&pbase, &base).unwrap();
    s.local(&["-q", "import", "lab/base", &pbase.display().to_string()])
        .ok();
    assert!(
        alice
            .run(&["log", "lab/base"])
            .failed()
            .stderr
            .contains("no machine named lab/base")
    );
    s.local(&["admin", "publish", "lab/base"]).ok();
    assert_eq!(alice.log("lab/base").len(), 1);
    // The server reads no chunk header for the fork's commit: it trusts the lengths of
    // the published version the fork names (bob's import above read all of its own).
    s.add_user("ops", "ops-secret-4444", &["--admin"]);
    s.try_login("ops", "ops-secret-4444", &[]).ok();
    let length_reads = || {
        let (code, m) = s.curl(Some(&s.token("ops")), "GET", "/metrics", None);
        let m = String::from_utf8_lossy(&m).into_owned();
        assert_eq!(code, 200, "{m}");
        m.lines()
            .find_map(|l| l.strip_prefix("mbank_commit_length_reads_total "))
            .unwrap_or_else(|| panic!("no mbank_commit_length_reads_total in:\n{m}"))
            .parse::<u64>()
            .unwrap()
    };
    let before = length_reads();
    assert!(before > 0, "bob's import read its chunks' lengths");
    alice
        .run(&[
            "-q",
            "create",
            "alice/fork",
            "--from",
            "lab/base",
            "--memory",
            "256M",
        ])
        .ok();
    assert_eq!(
        length_reads(),
        before,
        "chunk headers read for the commit of a fork"
    );
    assert_export(
        &alice,
        "alice/fork",
        &base,
        "alice's fork of the published base",
    );
    assert!(
        s.server_log().contains("status=404"),
        "the server logs each request"
    );
}

/// Retention, the head and labels over the server: the owner forgets, rolls back and
/// labels; another user, even one who may read the machine (published), gets the answer
/// for a machine that does not exist, and nothing changes.
#[test]
fn only_the_owner_forgets_moves_the_head_or_labels_over_the_server() {
    let s = Served::start();
    let alice = s.login("alice");
    let bob = s.login("bob");
    let mut vs = Vec::new();
    for seed in [41, 42, 43] {
        let p = write_img(&bob, &image(MIB, &[(0, MIB)], seed));
        vs.push(
            bob.import("bob/secret", &p, &[])["version"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    s.local(&["admin", "publish", "bob/secret"]).ok();
    assert_eq!(
        alice.log("bob/secret").len(),
        3,
        "alice reads the published machine"
    );
    let ta = s.token("alice");
    let v1 = &vs[0];
    for (method, path, body) in [
        (
            "POST",
            "/forget".to_string(),
            r#"{"policy":{"keep_last":1}}"#,
        ),
        (
            "PUT",
            "/head".to_string(),
            &*format!(r#"{{"to":"{v1}","expected":"{}"}}"#, vs[2]),
        ),
        (
            "POST",
            format!("/versions/{v1}/labels"),
            r#"{"note":"mine now"}"#,
        ),
        (
            "PUT",
            "/policy".to_string(),
            r#"{"policy":{"keep_last":1}}"#,
        ),
        (
            "PUT",
            "/settings".to_string(),
            r#"{"checkpoint_minutes":0}"#,
        ),
    ] {
        let (code, v) = s.curl_json(
            Some(&ta),
            method,
            &format!("/v1/machines/bob/secret{path}"),
            Some(body.as_bytes()),
        );
        let (code2, v2) = s.curl_json(
            Some(&ta),
            method,
            &format!("/v1/machines/bob/nothere{path}"),
            Some(body.as_bytes()),
        );
        assert_eq!(
            (code, &v["kind"]),
            (404, &Value::from("machine_not_found")),
            "{path}: {v}"
        );
        assert_eq!((code2, &v2["kind"]), (code, &v["kind"]), "{path}");
        assert_eq!(
            v["message"].as_str().unwrap().replace("secret", "X"),
            v2["message"].as_str().unwrap().replace("nothere", "X")
        );
    }
    for args in [
        vec!["forget", "bob/secret", "--keep-last", "1"],
        vec!["head", &*format!("bob/secret@{v1}")],
        vec!["note", &*format!("bob/secret@{v1}"), "mine"],
        vec!["set", "bob/secret", "--checkpoint-minutes", "0"],
    ] {
        alice
            .run(&args)
            .failed()
            .stderr_has(&["no machine named bob/secret"]);
    }
    let log = bob.log("bob/secret");
    assert_eq!(log.len(), 3, "nothing was removed");
    assert_eq!(bob.head("bob/secret").as_deref(), Some(vs[2].as_str()));
    assert!(log.iter().all(|v| v.get("note").is_none()), "{log:?}");

    // The owner: a note and tags, shown by log --json.
    bob.run(&[
        "note",
        &format!("bob/secret@{v1}"),
        "known good",
        "--tag",
        "good",
    ])
    .ok();
    let e = bob
        .log("bob/secret")
        .into_iter()
        .find(|v| v["version"] == v1.as_str())
        .unwrap();
    assert_eq!(
        (&e["note"], &e["tags"]),
        (&Value::from("known good"), &serde_json::json!(["good"]))
    );
    // Rolls back by compare-and-swap; a move that expects the old head is refused.
    bob.run(&["head", &format!("bob/secret@{v1}")]).ok();
    assert_eq!(bob.head("bob/secret").as_deref(), Some(v1.as_str()));
    bob.run(&["head", &format!("bob/secret@{}", vs[1]), "--expect", &vs[2]])
        .failed()
        .stderr_has(&["moved meanwhile", &v1[..12]]);
    assert_eq!(bob.head("bob/secret").as_deref(), Some(v1.as_str()));
    // Forgets: the newest stays by the rule, the head (rolled back) by protection.
    let r = bob.json(&["forget", "bob/secret", "--keep-last", "1", "--json"]);
    assert_eq!(r["removed"], serde_json::json!([vs[1]]), "{r}");
    let left: Vec<String> = bob
        .log("bob/secret")
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, [vs[2].clone(), v1.clone()]);
    // A policy kept in the bank, shown by info.
    bob.run(&["forget", "bob/secret", "--keep-daily", "7", "--set-policy"])
        .ok();
    let info = bob.json(&["info", "bob/secret", "--json"]);
    assert_eq!(info["policy"]["keep_daily"], 7, "{info}");
    // A setting kept in the bank: the owner sets it, a reader of the published machine
    // sees it, and it is cleared again.
    bob.run(&["set", "bob/secret", "--checkpoint-minutes", "5"])
        .ok();
    let info = alice.json(&["info", "bob/secret", "--json"]);
    assert_eq!(info["settings"]["checkpoint_minutes"], 5, "{info}");
    bob.run(&["set", "bob/secret", "--checkpoint-minutes", "default"])
        .ok();
    let info = bob.json(&["info", "bob/secret", "--json"]);
    assert_eq!(info["settings"], serde_json::json!({}), "{info}");
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A commit body for a new version of `machine` whose one chunk is `chunk`.
fn steal_commit(s: &Served, machine: &str, chunk: &str) -> Vec<u8> {
    let bank = mbank_bank::Bank::open(&s.bank_dir, true).unwrap();
    let mut v = bank.resolve(&machine.parse().unwrap()).unwrap();
    let mut idx = bank.catalog().disk_index(&v).unwrap();
    idx.chunks[0] = Some(chunk.parse().unwrap());
    let parent = v.id;
    v.id = mbank_core::VersionId::random();
    v.parent = Some(parent);
    let index = idx.to_bytes();
    let h = mbank_remote::wire::CommitHeader {
        info: v,
        expected_head: Some(parent),
        index_len: index.len() as u64,
        streams: vec![],
    };
    mbank_remote::wire::commit_body(&h, &index, &[])
}

#[test]
fn bad_credentials_get_401_and_change_nothing() {
    let s = Served::start();
    let wrong = s.try_login("alice", "not-the-password", &[]).failed();
    let unknown = s.try_login("mallory", "whatever-password", &[]).failed();
    assert!(wrong.stderr.contains("not valid"), "{wrong}");
    assert_eq!(
        wrong.stderr, unknown.stderr,
        "a wrong password and an unknown user look alike"
    );
    let alice = s.login("alice");
    alice.json(&["ls", "--json"]);
    let token = s.token("alice");
    let img = write_img(&alice, &image(MIB, &[(0, MIB)], 3));

    // Tampered tokens: a flipped digit of the secret, of the id, cut short, garbage.
    let flip = |t: &str, at: usize| {
        let mut b = t.as_bytes().to_vec();
        b[at] = if b[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    for bad in [
        flip(&token, token.len() - 1),
        flip(&token, 5),
        token[..token.len() - 2].to_string(),
        "mbt_garbage".into(),
        "x".repeat(300),
    ] {
        let (code, v) = s.curl_json(Some(&bad), "GET", "/v1/machines", None);
        assert_eq!(code, 401, "{bad}: {v}");
        assert_eq!(v["kind"], "unauthorized");
        let mut c = alice.cmd();
        c.env("MBANK_TOKEN", &bad)
            .args(["import", "alice/x", &img.display().to_string()]);
        let r = run_cmd(c).failed();
        assert!(r.stderr.contains("not valid"), "{r}");
    }
    let (code, _) = s.curl_json(None, "GET", "/v1/machines", None);
    assert_eq!(code, 401, "no token");

    // Expired: a token that lived one second.
    s.try_login("bob", "bob-secret-22", &["--ttl", "1s"]).ok();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = s.client("bob").run(&["ls"]).failed();
    assert!(r.stderr.contains("expired"), "{r}");

    // Revoked by the administrator, and by logout.
    let id = token
        .strip_prefix("mbt_")
        .unwrap()
        .split('_')
        .next()
        .unwrap()
        .to_string();
    s.local(&["admin", "token", "revoke", &id]).ok();
    let r = alice
        .run(&["import", "alice/x", &img.display().to_string()])
        .failed();
    assert!(r.stderr.contains("revoked"), "{r}");
    let alice = s.login("alice");
    alice.run(&["ls"]).ok();
    alice.run(&["logout"]).ok();
    let (code, _) = s.curl_json(
        Some(&s.token_or_last("alice", &token)),
        "GET",
        "/v1/machines",
        None,
    );
    assert_eq!(code, 401);
    // Nothing changed: no machine was made by any refused request.
    let ls = s.local(&["ls", "--json"]).ok().json();
    assert_eq!(ls.as_array().unwrap().len(), 0, "{ls}");
}

impl Served {
    /// The stored token, or `fallback` when logout removed it.
    fn token_or_last(&self, user: &str, fallback: &str) -> String {
        let p = self.config_dir(user).join("mbank/credentials.json");
        fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| find_token(&v))
            .unwrap_or_else(|| fallback.to_string())
    }
}

#[test]
fn garbage_oversized_and_path_tricks_get_4xx_and_the_server_keeps_serving() {
    let s = Served::start();
    let alice = s.login("alice");
    let t = s.token("alice");
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("POST", "/v1/login".into(), b"not json".to_vec(), 400),
        ("POST", "/v1/login".into(), vec![b'{'; 2 * MIB], 413),
        ("PUT", "/v1/chunks/zz".into(), b"x".to_vec(), 400),
        (
            "PUT",
            format!("/v1/chunks/{}", "ab".repeat(32)),
            random_bytes(1000, 1),
            422,
        ),
        (
            "PUT",
            format!("/v1/chunks/{}", "ab".repeat(32)),
            vec![7u8; 17 * MIB],
            413,
        ),
        ("POST", "/v1/chunks/have".into(), vec![1u8; 33], 400),
        ("POST", "/v1/chunks/have".into(), vec![1u8; 32 * 4097], 413),
        (
            "GET",
            "/v1/machines/..%2F..%2Fetc/passwd".into(),
            vec![],
            400,
        ),
        ("GET", "/v1/machines/alice/..".into(), vec![], 400),
        ("GET", "/v1/machines/../../etc/passwd".into(), vec![], 404),
        (
            "GET",
            "/v1/machines/alice/dev/versions/nothex/index".into(),
            vec![],
            400,
        ),
        (
            "POST",
            "/v1/machines/alice/dev/versions".into(),
            b"\x05\x00\x00\x00{".to_vec(),
            400,
        ),
        (
            "POST",
            "/v1/machines/alice/dev/versions".into(),
            vec![0xff; 100],
            400,
        ),
        (
            "PUT",
            "/v1/machines/alice/dev/lease".into(),
            b"[1,2,3]".to_vec(),
            400,
        ),
        (
            "POST",
            "/v1/writers/notanumber/heartbeat".into(),
            vec![],
            400,
        ),
        ("GET", "/v1/nothing/here".into(), vec![], 404),
    ];
    for (method, path, body, want) in &cases {
        let b = (!body.is_empty()).then_some(&body[..]);
        let (code, v) = s.curl_json(Some(&t), method, path, b);
        assert_eq!(code, *want, "{method} {path}: {v}");
        if code != 404 || v.is_object() {
            assert!(
                v["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{method} {path}: a message: {v}"
            );
        }
    }
    let (code, v) = s.curl_json(None, "GET", "/v1/health", None);
    assert_eq!((code, &v["ok"]), (200, &Value::from(true)));
    alice.run(&["ls"]).ok();
    assert!(!s.server_log().contains("panicked"), "{}", s.server_log());

    // A quota: an import that would exceed it fails, saying so; nothing is committed.
    s.add_user("carol", "carol-secret-3", &["--quota", "1M"]);
    s.try_login("carol", "carol-secret-3", &[]).ok();
    let carol = s.client("carol");
    let p = write_img(&carol, &image(4 * MIB, &[(0, 4 * MIB)], 8));
    carol
        .run(&["import", "carol/big", &p.display().to_string()])
        .failed()
        .stderr_has(&["quota", "mbank rm"]);
    assert!(
        carol
            .run(&["log", "carol/big"])
            .failed()
            .stderr
            .contains("no machine")
    );
    // A batch that would go over is refused whole, so the refused import took none of
    // her quota. Under the quota it works; a second image as large does not fit until
    // she removes the first and the administrator's gc deletes its chunks.
    let age_and_gc = || {
        Bank::at(&s.bank_dir, &s.root).age_chunks();
        let gc = s.local(&["gc", "--json"]).ok().json();
        assert!(gc["access_rows_pruned"].as_u64().unwrap() > 0, "{gc}");
    };
    let small = write_img(&carol, &image(640 * KIB, &[(0, 640 * KIB)], 9));
    carol
        .run(&["-q", "import", "carol/small", &small.display().to_string()])
        .ok();
    let other = write_img(&carol, &image(640 * KIB, &[(0, 640 * KIB)], 10));
    carol
        .run(&["import", "carol/other", &other.display().to_string()])
        .failed()
        .stderr_has(&["quota"]);
    carol.run(&["rm", "carol/small"]).ok();
    age_and_gc();
    carol
        .run(&["-q", "import", "carol/other", &other.display().to_string()])
        .ok();
}

#[test]
fn a_station_rides_out_a_bank_restart_and_gc_verify_run_while_serving() {
    need(&["qemu-io"]);
    let mut s = Served::start();
    let alice = s.login("alice");
    let img = image(16 * MIB, &[(0, 16 * MIB)], 11);
    let p = write_img(&alice, &img);
    alice.import("alice/dev", &p, &[]);
    let cache = s.root.join("cache");
    let want = restart_under_a_station(&mut s, &alice, &img, &cache, 3 * MIB);

    // gc and verify on the bank's host while the server serves an import.
    let img2 = image(8 * MIB, &[(0, 8 * MIB)], 13);
    let p2 = write_img(&alice, &img2);
    let import = std::thread::spawn({
        let alice = s.client("alice");
        move || alice.run(&["-q", "import", "alice/two", &p2.display().to_string()])
    });
    s.local(&["gc", "--json"]).ok();
    s.local(&["verify", "--json"]).ok();
    import.join().unwrap().ok();
    s.local(&["verify", "--json"]).ok();
    assert_export(&alice, "alice/two", &img2, "the import that ran beside gc");
    assert_export(&alice, "alice/dev", &want, "alice/dev after gc");
}

/// The served bank with its chunks in a three-node Garage cluster: import and export
/// over HTTPS; one node stopped, reads and writes go on; the bank restarted while a
/// station reads and writes: the station waits, its user sees no error, nothing is lost.
#[test]
fn served_bank_on_a_three_node_garage_cluster() {
    need(&["qemu-io", "qemu-img"]);
    let cluster = garage::Cluster::start();
    let mut s = Served::start_on(Some(&cluster));
    let alice = s.login("alice");
    let bob = s.login("bob");
    let img = image(12 * MIB, &[(0, 5 * MIB), (8 * MIB, 9 * MIB)], 21);
    let p = write_img(&alice, &img);
    alice.import("alice/dev", &p, &[]);
    assert_export(&alice, "alice/dev", &img, "export from Garage over HTTPS");
    assert!(
        mbank_store::ChunkStore::stats(&cluster.store())
            .unwrap()
            .chunks
            > 0,
        "the chunks are in the bucket"
    );
    assert_eq!(s.chunk_count(), 0, "and not in the bank directory");

    // One node down: reads and writes go on (replication 3, write quorum 2).
    cluster.stop_node(2);
    let img_b = image(6 * MIB, &[(0, 6 * MIB)], 22);
    let pb = write_img(&bob, &img_b);
    bob.import("bob/dev", &pb, &[]);
    assert_export(&bob, "bob/dev", &img_b, "bob's export with a node down");
    assert_export(&alice, "alice/dev", &img, "alice's export with a node down");
    cluster.start_node(2);

    // The bank restarted under a station that reads and writes.
    let cache = s.root.join("cache-garage");
    restart_under_a_station(&mut s, &alice, &img, &cache, MIB);
    s.local(&["verify", "--json"]).ok();
}

/// Attaches alice/dev (whose disk is `img`) with an empty cache, kills the server, reads
/// the whole disk and writes 64 KiB at `at` through NBD while it is away, starts it
/// again: the station waits and its clients see no error. Checks in and checks the
/// export; returns the disk as it should now be.
fn restart_under_a_station(
    s: &mut Served,
    alice: &Bank,
    img: &[u8],
    cache: &Path,
    at: usize,
) -> Vec<u8> {
    let mut a = alice.attach(cache, "alice/dev", &[]);
    s.kill();
    let patch = random_bytes(64 * KIB, at as u64);
    let pf = alice.file(&format!("patch-{}.bin", unique()));
    fs::write(&pf, &patch).unwrap();
    let copy = alice.file(&format!("read-{}.raw", unique()));
    let io = std::thread::spawn({
        let (pf, copy, uri) = (pf.clone(), copy.clone(), a.uri());
        move || {
            let r1 = tool(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &uri,
                    &copy.display().to_string(),
                ],
            );
            let r2 = tool(
                "qemu-io",
                &[
                    "-f".to_string(),
                    "raw".into(),
                    "-c".into(),
                    format!("write -s {} {at} {}", pf.display(), 64 * KIB),
                    "-c".into(),
                    "flush".into(),
                    uri,
                ],
            );
            (r1, r2)
        }
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    s.spawn();
    let (r1, r2) = io.join().unwrap();
    assert!(r1.success(), "the read through the restart:\n{r1}");
    assert!(
        r2.success() && !r2.stdout.contains("failed"),
        "the write:\n{r2}"
    );
    assert_same_bytes(
        &fs::read(&copy).unwrap(),
        img,
        "what the station read across the restart",
    );
    let done = a.stop();
    assert!(done.success(), "check-in after the restart:\n{done}");
    let mut want = img.to_vec();
    want[at..at + 64 * KIB].copy_from_slice(&patch);
    assert_export(alice, "alice/dev", &want, "the checked-in disk");
    want
}

/// A commit body for a new head of `machine`: its head's index changed by `edit`, with
/// `streams`.
fn edited_commit(
    s: &Served,
    machine: &str,
    edit: impl FnOnce(&mut mbank_core::DiskIndex),
    streams: &[(&str, mbank_core::MemoryIndex)],
) -> Vec<u8> {
    let bank = mbank_bank::Bank::open(&s.bank_dir, true).unwrap();
    let mut v = bank.resolve(&machine.parse().unwrap()).unwrap();
    let mut idx = bank.catalog().disk_index(&v).unwrap();
    edit(&mut idx);
    let parent = v.id;
    v.id = mbank_core::VersionId::random();
    v.parent = Some(parent);
    v.streams = streams.iter().map(|(n, _)| n.to_string()).collect();
    let index = idx.to_bytes();
    let bodies: Vec<Vec<u8>> = streams.iter().map(|(_, i)| i.to_bytes()).collect();
    let h = mbank_remote::wire::CommitHeader {
        info: v,
        expected_head: Some(parent),
        index_len: index.len() as u64,
        streams: streams
            .iter()
            .zip(&bodies)
            .map(|((n, _), b)| (n.to_string(), b.len() as u64))
            .collect(),
    };
    mbank_remote::wire::commit_body(&h, &index, &bodies)
}

/// The server refuses a commit whose index puts a chunk at a place of another length
/// (a 16 MiB chunk the user sent, at a 64 KiB place of the disk; a disk chunk as a run
/// of a memory stream that claims another length): `400 bad_chunk_length` naming the
/// chunk, and nothing is committed, so no one (nor the users of a published machine)
/// is handed the version. A commit whose lengths fit is accepted.
#[test]
fn a_commit_naming_a_chunk_of_the_wrong_length_for_its_place_is_refused() {
    let s = Served::start();
    let alice = s.login("alice");
    let img = image(4 * MIB, &[(0, 4 * MIB)], 91);
    let p = write_img(&alice, &img);
    alice.import("alice/dev", &p, &[]);
    let ta = s.token("alice");
    // A 16 MiB chunk, sent as its bytes (compressed, it is small); the server takes it.
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let c = mbank_core::chunk::encode(&big, 3);
    let (code, v) = s.curl_json(
        Some(&ta),
        "PUT",
        &format!("/v1/chunks/{}", c.id),
        Some(&c.bytes),
    );
    assert_eq!(code, 201, "{v}");
    let path = "/v1/machines/alice/dev/versions";
    let body = edited_commit(&s, "alice/dev", |i| i.chunks[1] = Some(c.id), &[]);
    let (code, v) = s.curl_json(Some(&ta), "POST", path, Some(&body));
    assert_eq!(
        (code, &v["kind"]),
        (400, &Value::from("bad_chunk_length")),
        "{v}"
    );
    assert_eq!(v["chunk"], c.id.to_hex(), "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("disk chunk 1") && msg.contains("16777216") && msg.contains("65536"),
        "{v}"
    );
    assert_eq!(alice.log("alice/dev").len(), 1, "nothing was committed");

    // A memory stream whose one run claims 1000 bytes of a 64 KiB chunk.
    let disk_chunk: mbank_core::ChunkId = head_chunks(&s, "alice/dev")[0].parse().unwrap();
    let run = |len| mbank_core::MemoryIndex {
        total_len: len as u64,
        runs: vec![mbank_core::MemoryRun {
            id: Some(disk_chunk),
            len,
        }],
    };
    let body = edited_commit(&s, "alice/dev", |_| {}, &[("memory", run(1000))]);
    let (code, v) = s.curl_json(Some(&ta), "POST", path, Some(&body));
    assert_eq!(
        (code, &v["kind"]),
        (400, &Value::from("bad_chunk_length")),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap().contains("stream memory"),
        "{v}"
    );
    assert_eq!(alice.log("alice/dev").len(), 1, "nothing was committed");

    // The same run at its true length, and the disk as it was, are accepted.
    let body = edited_commit(&s, "alice/dev", |_| {}, &[("memory", run(64 << 10))]);
    let (code, v) = s.curl_json(Some(&ta), "POST", path, Some(&body));
    assert_eq!(code, 200, "{v}");
    assert_eq!(alice.log("alice/dev").len(), 2);
    assert_export(
        &alice,
        "alice/dev",
        &img,
        "alice/dev after the refused commits",
    );
}

/// A chunk a writer in flight uploaded is still the user's when `gc` runs on the bank's
/// host before the commit that names it: the server holds new chunks back until that
/// commit (they are not yet chunk files another process sees), and gc's pruning of
/// rights to chunks that are gone must not count them gone. Before, the commit was
/// refused ("not in the bank for alice") and the check-in lost its turn (the soak's
/// failed check-ins), or, pruned between the commit's checks and its catalog write, the
/// user could no longer read a chunk of their own head.
#[test]
fn gc_on_the_host_keeps_the_rights_to_chunks_a_writer_in_flight_sent() {
    let s = Served::start();
    let alice = s.login("alice");
    let img = image(MIB, &[(0, MIB)], 92);
    let p = write_img(&alice, &img);
    alice.import("alice/dev", &p, &["--chunk-size", "64K"]);
    let ta = s.token("alice");
    // A check-in in flight: its writer registered, a changed chunk sent.
    let w = serde_json::to_vec(&serde_json::json!({
        "pid": 4242, "host": "station-1", "what": "check-in alice/dev"
    }))
    .unwrap();
    let (code, v) = s.curl_json(Some(&ta), "POST", "/v1/writers", Some(&w));
    assert_eq!(code, 200, "{v}");
    let mut changed = img[..64 << 10].to_vec();
    changed[100] ^= 0x5a;
    let c = mbank_core::chunk::encode(&changed, 3);
    let (code, v) = s.curl_json(
        Some(&ta),
        "PUT",
        &format!("/v1/chunks/{}", c.id),
        Some(&c.bytes),
    );
    assert_eq!(code, 201, "{v}");
    // GC on the bank's host, now.
    let g = s.local(&["gc", "--json"]).ok().json();
    assert_eq!(g["access_rows_pruned"], 0, "{g}");
    // The commit that names the chunk goes through, and alice reads it back.
    let body = edited_commit(&s, "alice/dev", |i| i.chunks[0] = Some(c.id), &[]);
    let (code, v) = s.curl_json(
        Some(&ta),
        "POST",
        "/v1/machines/alice/dev/versions",
        Some(&body),
    );
    assert_eq!(code, 200, "{v}");
    let mut want = img.clone();
    want[..64 << 10].copy_from_slice(&changed);
    assert_export(
        &alice,
        "alice/dev",
        &want,
        "the version naming the chunk sent",
    );
}

/// `verify` on a served bank checks `access.db` against the catalog: a version whose
/// owner has lost the rights to its chunks (the server answers them as absent, so every
/// read of them fails) is reported, and `admin repair-rights` grants them again. Before,
/// verify passed such a bank (the soak's EIO reading a user's own head).
#[test]
fn verify_reports_a_version_its_owner_cannot_read_and_repair_rights_fixes_it() {
    let s = Served::start();
    let alice = s.login("alice");
    let img = image(MIB, &[(0, MIB)], 93);
    let p = write_img(&alice, &img);
    alice.import("alice/dev", &p, &["--chunk-size", "64K"]);
    let head = alice.head("alice/dev").unwrap();
    // Two of alice's rights lost.
    let chunks = head_chunks(&s, "alice/dev");
    let o = std::process::Command::new("sqlite3")
        .arg(s.bank_dir.join("access.db"))
        .arg(format!(
            "DELETE FROM chunk_owners WHERE user = 'alice' AND hex(chunk) IN ('{}', '{}');",
            chunks[0].to_uppercase(),
            chunks[1].to_uppercase()
        ))
        .output()
        .expect("sqlite3 (Debian package sqlite3) is installed");
    assert!(o.status.success(), "{o:?}");
    let out = alice
        .cmd()
        .arg("export")
        .arg("alice/dev")
        .arg(s.root.join("x.raw"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "alice cannot read her own head now");

    let v = s.local(&["verify", "--json"]).code(3);
    let r = v.json();
    assert_eq!(r["missing_rights"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["missing_rights"][0]["user"], "alice", "{r}");
    assert_eq!(r["missing_rights"][0]["chunks"], 2, "{r}");
    assert!(
        r["missing_rights"][0]["version"]
            .as_str()
            .unwrap()
            .ends_with(&head),
        "{r}"
    );
    s.local(&["verify"])
        .code(3)
        .stderr_has(&["admin repair-rights"]);

    let fixed = s.local(&["admin", "repair-rights", "--json"]).ok().json();
    assert_eq!(fixed["rights_granted"], 2, "{fixed}");
    s.local(&["verify"]).ok();
    assert_export(&alice, "alice/dev", &img, "alice's head, readable again");
}

/// Requests in the server's log that ask about chunks or send them (not reads).
fn chunk_write_requests(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("path=\"/v1/chunks"))
        .filter(|l| !l.contains("method=GET") && !l.contains("/v1/chunks/get"))
        .count()
}

/// A stream (here a kernel that `create` stores with the machine) goes to a served bank
/// in batches like a disk's chunks: one `have` question and at most one upload per
/// batch of chunks, not one round trip per chunk.
#[test]
fn a_stream_goes_to_a_served_bank_in_batches() {
    let s = Served::start();
    let alice = s.login("alice");
    let kernel = alice.file("vmlinuz");
    // Random bytes: every chunk is new, about 64 KiB each (FastCDC's average).
    fs::write(&kernel, random_bytes(8 * MIB, 77)).unwrap();
    let before = chunk_write_requests(&s.server_log());
    let r = alice.json(&[
        "create",
        "alice/k",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk-size",
        "1M",
        "--json",
    ]);
    let stored = r["chunks_new"].as_u64().unwrap();
    assert!(stored >= 64, "the kernel was cut into chunks: {r}");
    let requests = chunk_write_requests(&s.server_log()) - before;
    // Batches of 32: a `have` and an upload each, with a batch left over per worker.
    let bound = (stored as usize).div_ceil(32) * 2 + 16;
    assert!(
        requests <= bound,
        "{requests} requests to store {stored} chunks (at most {bound} in batches):\n{}",
        s.server_log()
    );
    assert_export(&alice, "alice/k", &vec![0u8; MIB], "the new machine's disk");
}

/// `rename` over the server: the owner renames and keeps the history; another user
/// gets the answer for a machine that does not exist; a published machine, another
/// owner and a taken name are refused.
#[test]
fn rename_over_the_server_keeps_history_for_the_owner_only() {
    let s = Served::start();
    let alice = s.login("alice");
    let bob = s.login("bob");
    let mut vs = Vec::new();
    for seed in [51, 52] {
        let p = write_img(&bob, &image(MIB, &[(0, MIB)], seed));
        vs.push(
            bob.import("bob/old", &p, &[])["version"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let p = write_img(&bob, &image(MIB, &[(0, MIB)], 53));
    bob.import("bob/taken", &p, &[]);
    alice
        .run(&["rename", "bob/old", "bob/mine"])
        .failed()
        .stderr_has(&["no machine named bob/old"]);
    bob.run(&["rename", "bob/old", "bob/taken"])
        .failed()
        .stderr_has(&["bob/taken exists already"]);
    bob.run(&["rename", "bob/old", "alice/old"])
        .failed()
        .stderr_has(&["keeps the owner"]);
    bob.run(&["rename", "bob/old", "bob/new"]).ok();
    let ids: Vec<String> = bob
        .log("bob/new")
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [vs[1].clone(), vs[0].clone()]);
    assert_export(
        &bob,
        &format!("bob/new@{}", vs[0]),
        &image(MIB, &[(0, MIB)], 51),
        "renamed",
    );
    bob.run(&["log", "bob/old"])
        .failed()
        .stderr_has(&["bob/old"]);
    s.local(&["admin", "publish", "bob/new"]).ok();
    bob.run(&["rename", "bob/new", "bob/newer"])
        .failed()
        .stderr_has(&["published", "unpublish"]);
}

/// A session on a served bank records each checkpoint with its lease: the last one
/// cannot be removed until the session checks in.
#[test]
fn a_sessions_checkpoint_on_a_served_bank_is_protected_until_it_checks_in() {
    let s = Served::start();
    let mut alice = s.login("alice");
    let img = image(4 * MIB, &[(0, MIB)], 61);
    let p = write_img(&alice, &img);
    alice.import("alice/dev", &p, &[]);
    alice
        .env
        .push(("MBANK_CHECKPOINT_SECONDS".into(), Some("1".into())));
    let cache = s.root.join("cache-alice");
    let mut a = alice.attach(&cache, "alice/dev", &[]);
    let r = tool(
        "qemu-io",
        &[
            "-f".to_string(),
            "raw".into(),
            "-c".into(),
            "write -P 7 65536 4096".into(),
            "-c".into(),
            "flush".into(),
            a.uri(),
        ],
    );
    assert!(r.success(), "qemu-io:\n{r}");
    let t = std::time::Instant::now();
    let ck = loop {
        let found = alice.log("alice/dev").into_iter().find(|e| {
            e["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "checkpoint"))
        });
        if let Some(e) = found {
            break e["version"].as_str().unwrap().to_string();
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(120),
            "no checkpoint"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    alice
        .run(&["rm", &format!("alice/dev@{ck}")])
        .code(1)
        .stderr_has(&["checked out on station"]);
    let done = a.stop();
    assert!(done.success(), "attach:\n{done}");
    alice.run(&["rm", &format!("alice/dev@{ck}")]).ok();
}

/// The counter `name` in the server's /metrics, read with `admin_token`.
fn metric(s: &Served, admin_token: &str, name: &str) -> u64 {
    let (code, m) = s.curl(Some(admin_token), "GET", "/metrics", None);
    let m = String::from_utf8_lossy(&m).into_owned();
    assert_eq!(code, 200, "{m}");
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{m}"))
        .parse()
        .unwrap()
}

/// The request bodies' sizes (`bytes_in`) of the logged requests to `path`.
fn logged_bytes_in(log: &str, path: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(&format!("path=\"{path}\"")) || l.contains(&format!("path={path} ")))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("bytes_in="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// alice's `POST /v1/chunks/urls` for `ids` (hex): (status, JSON answer).
fn ask_urls(s: &Served, token: &str, ids: &[&str]) -> (u16, Value) {
    let body: Vec<u8> = ids.iter().flat_map(|h| hex(h)).collect();
    s.curl_json(Some(token), "POST", "/v1/chunks/urls", Some(&body))
}

/// A bank on Garage hands stations presigned URLs: an export and a station's reads
/// fetch the chunk bytes straight from the object store (the server's bytes sent stay
/// far below them); nobody gets a URL for another user's chunk (the same `null` as for
/// an absent one); URLs that expired make the station ask again and then read through
/// the server; `--no-direct-reads` turns them off.
#[test]
fn a_station_reads_a_garage_bank_by_direct_urls() {
    need(&["qemu-img", "curl"]);
    let cluster = garage::Cluster::start();
    let mut s = Served::start_on(Some(&cluster));
    s.add_user("ops", "ops-secret-4444", &["--admin"]);
    s.try_login("ops", "ops-secret-4444", &[]).ok();
    let ops = s.token("ops");
    let alice = s.login("alice");
    let bob = s.login("bob");
    let img = image(12 * MIB, &[(0, 5 * MIB), (8 * MIB, 9 * MIB)], 31);
    let nonzero = 6 * MIB as u64;
    alice.import("alice/dev", &write_img(&alice, &img), &[]);
    let img_b = image(4 * MIB, &[(0, 4 * MIB)], 32);
    bob.import("bob/dev", &write_img(&bob, &img_b), &[]);

    // An export: the chunks come from Garage, not through the server.
    let sent = metric(&s, &ops, "mbank_sent_bytes_total");
    assert_export(&alice, "alice/dev", &img, "an export by direct reads");
    let through = metric(&s, &ops, "mbank_sent_bytes_total") - sent;
    assert!(
        through < nonzero / 10,
        "the server sent {through} bytes for an export of {nonzero} bytes of chunks:\n{}",
        s.server_log()
    );
    assert!(metric(&s, &ops, "mbank_chunk_urls_total") > 0);
    assert!(logged_bytes_in(&s.server_log(), "/v1/chunks/get").is_empty());

    // A station (empty cache) reading the whole disk over NBD: the same.
    let sent = metric(&s, &ops, "mbank_sent_bytes_total");
    let cache = s.root.join("cache-direct");
    let mut a = alice.attach(&cache, "alice/dev", &["--read-only"]);
    let copy = alice.file(&format!("read-{}.raw", unique()));
    let r = tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &a.uri(),
            &copy.display().to_string(),
        ],
    );
    assert!(r.success(), "the read through the station:\n{r}");
    assert_same_bytes(&fs::read(&copy).unwrap(), &img, "what the station read");
    assert!(a.stop().success());
    let through = metric(&s, &ops, "mbank_sent_bytes_total") - sent;
    assert!(
        through < nonzero / 10,
        "the server sent {through} bytes to a station that read {nonzero} bytes of chunks"
    );

    // Isolation: for alice, bob's chunk and an absent one get the same null; her own
    // gets a URL that works without any token.
    let alice_token = s.token("alice");
    let bobs = head_chunks(&s, "bob/dev");
    let hers = head_chunks(&s, "alice/dev");
    let absent = mbank_core::ChunkId::of(b"in no bank").to_hex();
    let (code, v) = ask_urls(&s, &alice_token, &[&bobs[0], &absent, &hers[0]]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["urls"][0], Value::Null, "bob's chunk: {v}");
    assert_eq!(v["urls"][1], Value::Null, "an absent chunk: {v}");
    let url = v["urls"][2]
        .as_str()
        .unwrap_or_else(|| panic!("no URL for her own chunk: {v}"));
    assert!(
        !url.contains(&s.url()),
        "the URL is the object store's: {url}"
    );
    let o = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "GET {url}");
    let (code, v) = ask_urls(&s, &s.token("bob"), &[&bobs[0]]);
    assert_eq!(code, 200, "{v}");
    assert!(
        v["urls"][0].is_string(),
        "bob gets his own chunk's URL: {v}"
    );

    // URLs expired when handed out: the station asks again once per chunk, then reads
    // through the server, and the read succeeds.
    s.kill();
    s.serve_args = ["--direct-url-secs", "60", "--direct-url-age-secs", "3600"]
        .map(String::from)
        .to_vec();
    s.spawn();
    let (code, v) = ask_urls(&s, &alice_token, &[&hers[0]]);
    assert_eq!(code, 200, "{v}");
    let url = v["urls"][0].as_str().unwrap();
    let o = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        code == "400" || code == "403",
        "the object store refuses an expired URL (Garage: 400, AWS: 403), not {code}"
    );
    let before_urls: u64 = logged_bytes_in(&s.server_log(), "/v1/chunks/urls")
        .iter()
        .sum();
    assert_export(
        &alice,
        "alice/dev",
        &img,
        "an export whose URLs had expired",
    );
    let log = s.server_log();
    let urls: u64 = logged_bytes_in(&log, "/v1/chunks/urls").iter().sum::<u64>() - before_urls;
    let got: u64 = logged_bytes_in(&log, "/v1/chunks/get").iter().sum();
    assert!(
        got > 0,
        "the chunks came through the server at last:\n{log}"
    );
    assert_eq!(
        urls,
        2 * got,
        "each chunk's URL was asked for twice before the server read it:\n{log}"
    );

    // Turned off: the query is answered as on a bank without an object store.
    s.kill();
    s.serve_args = vec!["--no-direct-reads".into()];
    s.spawn();
    let (code, v) = ask_urls(&s, &alice_token, &[&hers[0]]);
    assert_eq!(
        (code, v["kind"].as_str()),
        (404, Some("no_direct_reads")),
        "{v}"
    );
    assert_export(&alice, "alice/dev", &img, "an export through the server");
}

/// A bank on a directory has no direct URLs: the query says so, and clients read
/// through the server as before.
#[test]
fn a_bank_on_a_directory_offers_no_direct_urls() {
    let s = Served::start();
    let alice = s.login("alice");
    let img = image(2 * MIB, &[(0, MIB)], 33);
    alice.import("alice/dev", &write_img(&alice, &img), &[]);
    let hers = head_chunks(&s, "alice/dev");
    let (code, v) = ask_urls(&s, &s.token("alice"), &[&hers[0]]);
    assert_eq!(
        (code, v["kind"].as_str()),
        (404, Some("no_direct_reads")),
        "{v}"
    );
    let id: mbank_core::ChunkId = hers[0].parse().unwrap();
    let list = mbank_remote::wire::upload_list_body(&[mbank_remote::wire::Upload::of(id, b"x")]);
    let (code, v) = s.curl_json(
        Some(&s.token("alice")),
        "POST",
        "/v1/chunks/upload-urls",
        Some(&list),
    );
    assert_eq!(
        (code, v["kind"].as_str()),
        (404, Some("no_direct_writes")),
        "{v}"
    );
    assert_export(&alice, "alice/dev", &img, "an export from a directory bank");
    let log = s.server_log();
    assert_eq!(
        logged_bytes_in(&log, "/v1/chunks/urls").len(),
        2,
        "the client asked once:\n{log}"
    );
    assert!(!logged_bytes_in(&log, "/v1/chunks/get").is_empty());
}

/// `POST /v1/chunks/upload-urls` then `confirm` for `(id, bytes)` with curl as `token`:
/// the URL's answer to the PUT of `bytes`, and the confirmation's (status, JSON).
fn upload_direct(
    s: &Served,
    token: &str,
    id: &mbank_core::ChunkId,
    bytes: &[u8],
) -> (String, (u16, Value)) {
    let sha = mbank_store::sha256(bytes);
    let list = mbank_remote::wire::upload_list_body(&[mbank_remote::wire::Upload::of(*id, bytes)]);
    let (code, v) = s.curl_json(Some(token), "POST", "/v1/chunks/upload-urls", Some(&list));
    assert_eq!(code, 200, "{v}");
    let url = v["urls"][0].as_str().unwrap().to_string();
    let f = s.root.join(format!("put-{}.bin", unique()));
    fs::write(&f, bytes).unwrap();
    let o = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
        ])
        .arg(format!(
            "{}: {}",
            mbank_store::CHECKSUM_HEADER,
            mbank_store::base64(&sha)
        ))
        .arg("--data-binary")
        .arg(format!("@{}", f.display()))
        .arg(&url)
        .output()
        .unwrap();
    let put = String::from_utf8_lossy(&o.stdout).into_owned();
    (
        put,
        s.curl_json(Some(token), "POST", "/v1/chunks/confirm", Some(&list)),
    )
}

/// A bank on Garage takes uploads by presigned URLs: an import's chunk bytes go
/// straight to the object store (the server receives far fewer bytes than it stores),
/// and the server verifies each before a commit may name it; a presigned upload of
/// wrong bytes is refused at the confirmation, is not stored, and a commit naming the
/// chunk is refused.
#[test]
fn a_station_uploads_to_a_garage_bank_by_direct_urls() {
    let cluster = garage::Cluster::start();
    let s = Served::start_on(Some(&cluster));
    s.add_user("ops", "ops-secret-4444", &["--admin"]);
    s.try_login("ops", "ops-secret-4444", &[]).ok();
    let ops = s.token("ops");
    let alice = s.login("alice");
    let img = image(12 * MIB, &[(0, 5 * MIB), (8 * MIB, 9 * MIB)], 41);
    let nonzero = 6 * MIB as u64;
    let p = write_img(&alice, &img);
    let received = metric(&s, &ops, "mbank_received_bytes_total");
    alice.import("alice/dev", &p, &[]);
    let through = metric(&s, &ops, "mbank_received_bytes_total") - received;
    assert!(
        through < nonzero / 10,
        "the server received {through} bytes for an import of {nonzero} bytes of chunks:\n{}",
        s.server_log()
    );
    assert!(metric(&s, &ops, "mbank_chunks_confirmed_total") >= 90);
    assert_export(&alice, "alice/dev", &img, "an import by direct uploads");
    let r = s.local(&["verify", "--json"]);
    assert!(r.success(), "{r}");

    // Wrong bytes under a chunk's id: the object store takes them (they are what the
    // URL was asked for), the confirmation refuses them, and nothing names the chunk.
    let token = s.token("alice");
    let x = mbank_core::chunk::encode(&random_bytes(64 * KIB, 42), 3);
    let other = mbank_core::chunk::encode(&random_bytes(64 * KIB, 43), 3);
    let (put, (code, v)) = upload_direct(&s, &token, &x.id, &other.bytes);
    assert_eq!(put, "200", "the PUT of the bytes the URL was made for");
    assert_eq!((code, v["kind"].as_str()), (422, Some("bad_chunk")), "{v}");
    let store = cluster.store();
    assert!(
        !mbank_store::ChunkStore::touch(&store, &x.id).unwrap(),
        "the wrong bytes are not stored under the chunk's name"
    );
    let body = steal_commit(&s, "alice/dev", &x.id.to_hex());
    let (code, v) = s.curl_json(
        Some(&token),
        "POST",
        "/v1/machines/alice/dev/versions",
        Some(&body),
    );
    assert_eq!(code, 400, "a commit naming the refused chunk: {v}");
    // Bytes other than those the URL was made for: the object store refuses them.
    let sha = mbank_store::sha256(&x.bytes);
    let list =
        mbank_remote::wire::upload_list_body(&[mbank_remote::wire::Upload::of(x.id, &x.bytes)]);
    let (_, v) = s.curl_json(Some(&token), "POST", "/v1/chunks/upload-urls", Some(&list));
    let url = v["urls"][0].as_str().unwrap();
    let f = s.root.join("wrong.bin");
    fs::write(&f, &other.bytes).unwrap();
    let o = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
        ])
        .arg(format!(
            "{}: {}",
            mbank_store::CHECKSUM_HEADER,
            mbank_store::base64(&sha)
        ))
        .arg("--data-binary")
        .arg(format!("@{}", f.display()))
        .arg(url)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        code == "400" || code == "403",
        "bytes other than the URL's are refused (InvalidDigest, or a signature mismatch when their length differs), not {code}"
    );

    // The right bytes: confirmed, stored, and then a commit may name the chunk.
    let (put, (code, v)) = upload_direct(&s, &token, &x.id, &x.bytes);
    assert_eq!(put, "200");
    assert_eq!(code, 200, "{v}");
    assert!(mbank_store::ChunkStore::touch(&store, &x.id).unwrap());
    let (code, v) = s.curl_json(
        Some(&token),
        "POST",
        "/v1/machines/alice/dev/versions",
        Some(&body),
    );
    assert_eq!(code, 200, "a commit naming the confirmed chunk: {v}");

    // Uploads handed out count against the quota before they are confirmed.
    s.add_user("carol", "carol-secret-333", &["--quota", "100K"]);
    s.try_login("carol", "carol-secret-333", &[]).ok();
    let two = [x, other].map(|c| mbank_remote::wire::Upload::of(c.id, &c.bytes));
    let (code, v) = s.curl_json(
        Some(&s.token("carol")),
        "POST",
        "/v1/chunks/upload-urls",
        Some(&mbank_remote::wire::upload_list_body(&two)),
    );
    assert_eq!(
        (code, v["kind"].as_str()),
        (507, Some("quota_exceeded")),
        "{v}"
    );
    let (code, v) = s.curl_json(
        Some(&s.token("carol")),
        "POST",
        "/v1/chunks/upload-urls",
        Some(&mbank_remote::wire::upload_list_body(&two[..1])),
    );
    assert_eq!(code, 200, "one fits: {v}");
    let (code, v) = s.curl_json(
        Some(&s.token("carol")),
        "POST",
        "/v1/chunks/upload-urls",
        Some(&mbank_remote::wire::upload_list_body(&two[1..])),
    );
    assert_eq!(
        (code, v["kind"].as_str()),
        (507, Some("quota_exceeded")),
        "the first, handed out, still counts: {v}"
    );

    // An upload never confirmed stays staged until gc finds it older than its cutoff
    // (the start of the oldest writer, else now, less a second).
    let y = mbank_core::chunk::encode(&random_bytes(64 * KIB, 44), 3);
    let sha = mbank_store::sha256(&y.bytes);
    let list =
        mbank_remote::wire::upload_list_body(&[mbank_remote::wire::Upload::of(y.id, &y.bytes)]);
    let (_, v) = s.curl_json(Some(&token), "POST", "/v1/chunks/upload-urls", Some(&list));
    let f = s.root.join("staged.bin");
    fs::write(&f, &y.bytes).unwrap();
    let o = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
        ])
        .arg(format!(
            "{}: {}",
            mbank_store::CHECKSUM_HEADER,
            mbank_store::base64(&sha)
        ))
        .arg("--data-binary")
        .arg(format!("@{}", f.display()))
        .arg(v["urls"][0].as_str().unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200");
    let staging = mbank_store::ChunkStore::staging(&store).unwrap();
    assert!(staging.read_staged(&sha).unwrap().is_some());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = s.local(&["gc"]);
        assert!(r.success(), "{r}");
        if staging.read_staged(&sha).unwrap().is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "gc left a stale staged upload"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(!mbank_store::ChunkStore::touch(&store, &y.id).unwrap());
}
