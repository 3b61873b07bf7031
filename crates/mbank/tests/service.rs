//! Running a bank as a service, and what its clients are told: TLS and URL mistakes,
//! login and token messages, `whoami`, administration over HTTPS, completions, man
//! pages, systemd units and metrics. Every case runs the real binary against a real
//! `mbank serve`.

mod common;
#[path = "../../mbank-nbd/tests/common/pki.rs"]
mod pki;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PASSWORD: &str = "alice-secret-1";

/// `mbank serve` on a fresh bank with user alice (and admin root), plain HTTP or TLS.
struct Server {
    tmp: tempfile::TempDir,
    bank_dir: PathBuf,
    port: u16,
    tls: bool,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Serves over plain HTTP on 127.0.0.1.
    fn plain() -> Server {
        Server::start(None)
    }

    /// Serves over TLS with `cert` and `key`.
    fn start(tls: Option<(&Path, &Path)>) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let bank_dir = tmp.path().join("bank");
        mbank_run(&[
            std::ffi::OsStr::new("--bank"),
            bank_dir.as_os_str(),
            std::ffi::OsStr::new("init"),
        ])
        .ok();
        for (user, admin) in [("alice", false), ("root", true)] {
            let mut c = mbank();
            c.arg("--bank").arg(&bank_dir);
            c.args(["admin", "user", "add", user, "--password-stdin"]);
            if admin {
                c.arg("--admin");
            }
            run_with_input(c, format!("{PASSWORD}\n").as_bytes()).ok();
        }
        let log = tmp.path().join("server.log");
        let mut c = mbank();
        c.arg("--bank").arg(&bank_dir).arg("serve");
        c.args(["--listen", "127.0.0.1:0"]);
        if let Some((cert, key)) = tls {
            c.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        c.stdout(Stdio::piped());
        c.stderr(fs::File::create(&log).unwrap());
        let mut child = c.spawn().unwrap();
        let port = serve_port(&mut child, &log);
        Server {
            tmp,
            bank_dir,
            port,
            tls: tls.is_some(),
            child,
            log,
        }
    }

    fn url(&self) -> String {
        self.url_on("127.0.0.1")
    }

    fn url_on(&self, host: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{host}:{}", self.port)
    }

    fn config(&self, user: &str) -> PathBuf {
        self.tmp.path().join(format!("config-{user}"))
    }

    /// `mbank ARGS` as `user` (their credentials file), with a short retry budget.
    fn cmd(&self, user: &str) -> Command {
        let mut c = mbank();
        c.env("XDG_CONFIG_HOME", self.config(user));
        c.env("MBANK_RETRY_SECS", "20");
        c.env_remove("MBANK_TOKEN");
        c
    }

    fn login(&self, user: &str, url: &str, extra: &[&std::ffi::OsStr]) -> Run {
        let mut c = self.cmd(user);
        c.args(["login", url, "--user", user, "--password-stdin"]);
        c.args(extra);
        run_with_input(c, format!("{PASSWORD}\n").as_bytes())
    }

    /// `mbank --bank URL ARGS` as `user`.
    fn run(&self, user: &str, url: &str, args: &[&str]) -> Run {
        let mut c = self.cmd(user);
        c.arg("--bank").arg(url).args(args);
        run_cmd(c)
    }

    /// `mbank --bank DIR ARGS` on the bank's host.
    fn local(&self, args: &[&str]) -> Run {
        let mut c = mbank();
        c.arg("--bank").arg(&self.bank_dir).args(args);
        run_cmd(c)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, as a plain `openssl req
/// -x509` makes it (a CA certificate by its basic constraints).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    pki::openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "30",
            "-subj",
            "/CN=bank.test",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        dir,
    );
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// A failure that was not retried: the client said nothing of waiting and tried once.
fn not_retried(r: &Run) {
    assert!(
        !r.stderr.contains("retrying") && !r.stderr.contains("times over"),
        "this failure should not be retried:\n{r}"
    );
}

#[test]
fn a_pinned_self_signed_certificate_is_accepted_and_its_absence_explained() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let s = Server::start(Some((&cert, &key)));
    let url = s.url();

    // Without --ca-cert: refused, once, with the option to use.
    let r = s.login("alice", &url, &[]).failed();
    r.stderr_has(&["certificate", "--ca-cert"]);
    not_retried(&r);

    // With the certificate itself as --ca-cert: accepted, and remembered.
    s.login(
        "alice",
        &url,
        &[std::ffi::OsStr::new("--ca-cert"), cert.as_os_str()],
    )
    .ok();
    let r = s.run("alice", &url, &["ls"]).ok();
    assert!(!r.stderr.contains("CaUsedAsEndEntity"), "{r}");

    // Another self-signed certificate pinned instead: refused.
    let other = tempfile::tempdir().unwrap();
    let (other_cert, _) = self_signed(other.path());
    let r = s
        .login(
            "alice",
            &url,
            &[std::ffi::OsStr::new("--ca-cert"), other_cert.as_os_str()],
        )
        .failed();
    r.stderr_has(&["certificate"]);
    not_retried(&r);
}

#[test]
fn https_to_a_plain_server_and_http_to_a_tls_server_say_so_at_once() {
    let plain = Server::plain();
    let wrong = plain.url().replace("http://", "https://");
    let r = plain.run("alice", &wrong, &["ls"]).failed();
    r.stderr_has(&["does not speak TLS", &plain.url()]);
    not_retried(&r);

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let tls = Server::start(Some((&cert, &key)));
    let wrong = tls.url().replace("https://", "http://");
    let r = tls.run("alice", &wrong, &["ls"]).failed();
    r.stderr_has(&["speaks TLS", &tls.url()]);
    not_retried(&r);
}

#[test]
fn login_messages_say_what_is_wrong_with_the_token() {
    let s = Server::plain();
    let url = s.url();

    // No token at all.
    let r = s.run("alice", &url, &["ls"]).failed();
    r.stderr_has(&[
        &format!("no token for {url}"),
        &format!("mbank login {url}"),
    ]);

    // Logged in at 127.0.0.1, used as localhost: the same server, the same token.
    s.login("alice", &url, &[]).ok();
    s.run("alice", &s.url_on("localhost"), &["ls"]).ok();

    // Filed under another spelling that need not be the same server (0.0.0.0 reaches
    // this host too, but is no loopback address): said so.
    let other = format!("http://0.0.0.0:{}", s.port);
    let r = s.run("alice", &other, &["ls"]).failed();
    r.stderr_has(&[&format!("no token for {other}"), &url]);

    // Revoked by its user elsewhere (a password change revokes every token).
    let mut c = mbank();
    c.arg("--bank").arg(&s.bank_dir);
    c.args(["admin", "user", "passwd", "alice", "--password-stdin"]);
    run_with_input(c, format!("{PASSWORD}\n").as_bytes()).ok();
    let r = s.run("alice", &url, &["ls"]).failed();
    r.stderr_has(&["revoked", &format!("mbank login {url}")]);

    // Expired.
    s.login(
        "alice",
        &url,
        &[std::ffi::OsStr::new("--ttl"), std::ffi::OsStr::new("1s")],
    )
    .ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = s.run("alice", &url, &["ls"]);
        if !r.success() {
            r.stderr_has(&["expired", &format!("mbank login {url}")]);
            break;
        }
        assert!(Instant::now() < deadline, "a 1 s token never expired:\n{r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// True for `2026-03-01T12:00:00.250Z`.
fn is_rfc3339(v: &serde_json::Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 24
            && s.as_bytes()[10] == b'T'
            && s.ends_with('Z')
            && s[..4].parse::<u32>().is_ok()
    })
}

#[test]
fn json_has_utc_times_configuration_and_counts_that_add_up() {
    let bank = Bank::new();
    let img = bank.file("disk.raw");
    // 8 MiB: 3 MiB of data, the rest zeros (64 KiB chunks: 48 data, 80 zero).
    write_image(&img, &random_bytes(3 << 20, 7), 5 << 20);
    bank.import("alice/dev", &img, &[]);

    // A fork shares every chunk: none new, the data ones deduplicated, the rest zero.
    let fork = bank.json(&["create", "alice/fork", "--from", "alice/dev", "--json"]);
    assert_eq!(fork["chunks_total"], 128, "{fork}");
    assert_eq!(fork["chunks_new"], 0, "{fork}");
    assert_eq!(fork["chunks_zero"], 80, "{fork}");
    assert_eq!(fork["chunks_dedup"], 48, "{fork}");
    // An empty disk is all zeros.
    let empty = bank.json(&[
        "create",
        "alice/empty",
        "--disk-size",
        "1M",
        "--memory",
        "256M",
        "--cpus",
        "2",
        "--json",
    ]);
    assert_eq!(empty["chunks_zero"], empty["chunks_total"], "{empty}");
    assert_eq!(empty["chunks_total"], 16, "{empty}");

    // log: the moment in RFC 3339 beside the milliseconds, and the configuration.
    let log = bank.json(&["log", "alice/empty", "--json"]);
    let v = &log[0];
    assert!(is_rfc3339(&v["created_utc"]), "{v}");
    assert_eq!(v["config"]["cpus"], 2, "{v}");
    assert_eq!(v["config"]["memory_mib"], 256, "{v}");
    let ls = bank.json(&["ls", "--json"]);
    for m in ls.as_array().unwrap() {
        assert!(is_rfc3339(&m["created_utc"]), "{m}");
        assert!(is_rfc3339(&m["updated_utc"]), "{m}");
    }
}

/// alice's `used` bytes, as `admin user ls --json` on the bank's host says.
/// alice imports `bytes` of random data (from `seed`) followed by `zeros` zero bytes
/// as `machine`, through the server at `url`; the run, unchecked.
fn alice_imports(
    s: &Server,
    url: &str,
    dir: &Path,
    machine: &str,
    bytes: usize,
    seed: u64,
    zeros: u64,
) -> Run {
    let img = dir.join(format!("{}.raw", machine.replace('/', "-")));
    write_image(&img, &random_bytes(bytes, seed), zeros);
    s.run(
        "alice",
        url,
        &["-q", "import", machine, img.to_str().unwrap()],
    )
}

fn used(s: &Server, user: &str) -> u64 {
    let users = s.local(&["admin", "user", "ls", "--json"]).ok().json();
    users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == user)
        .and_then(|u| u["used"].as_u64())
        .unwrap_or_else(|| panic!("no usage of {user} in {users}"))
}

#[test]
fn an_import_refused_over_quota_leaves_the_usage_as_it_was() {
    let s = Server::plain();
    let url = s.url();
    s.login("alice", &url, &[]).ok();
    s.local(&["admin", "user", "quota", "alice", "6M"]).ok();
    let dir = tempfile::tempdir().unwrap();
    alice_imports(&s, &url, dir.path(), "alice/small", 1 << 20, 1, 0).ok();
    let before = used(&s, "alice");
    assert!(before >= 1 << 20, "{before}");

    // 8 MiB of random data cannot fit: refused part way, after two batches of 2 MiB
    // were sent.
    let r = alice_imports(&s, &url, dir.path(), "alice/big", 8 << 20, 2, 0).failed();
    r.stderr_has(&["quota"]);
    assert_eq!(
        used(&s, "alice"),
        before,
        "the refused import is still charged:\n{r}"
    );
    // And what is left of the quota is usable.
    alice_imports(&s, &url, dir.path(), "alice/more", 1 << 20, 3, 0).ok();
}

#[test]
fn whoami_says_user_quota_and_use_served_and_local() {
    let s = Server::plain();
    let url = s.url();
    s.login("alice", &url, &[]).ok();
    s.local(&["admin", "user", "quota", "alice", "6M"]).ok();
    let dir = tempfile::tempdir().unwrap();
    alice_imports(&s, &url, dir.path(), "alice/a", 1 << 20, 1, 0).ok();
    let w = s.run("alice", &url, &["whoami", "--json"]).ok().json();
    assert_eq!(w["user"], "alice", "{w}");
    assert_eq!(w["admin"], false, "{w}");
    assert_eq!(w["quota"], 6 << 20, "{w}");
    // Its chunks, plus what its version costs in the catalog.
    assert!(w["used"].as_u64().unwrap() > used(&s, "alice"), "{w}");
    let r = s.run("alice", &url, &["whoami"]).ok();
    assert!(
        r.stdout.contains("alice") && r.stdout.contains("6.0 MiB"),
        "{r}"
    );

    // Not logged in: the message of any command without a token.
    s.run("root", &url, &["whoami"])
        .failed()
        .stderr_has(&["no token for"]);
    // A bank directory: no users, no quota.
    let w = s.local(&["whoami", "--json"]).ok().json();
    assert_eq!(w["admin"], true, "{w}");
    assert!(w["quota"].is_null() && w["used"].is_null(), "{w}");
}

/// The token `mbank login` filed for `user`.
fn token(s: &Server, user: &str) -> String {
    let p = s.config(user).join("mbank/credentials.json");
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    fn find(v: &serde_json::Value) -> Option<String> {
        match v {
            serde_json::Value::Object(m) => m
                .get("token")
                .and_then(|t| t.as_str().map(str::to_string))
                .or_else(|| m.values().find_map(find)),
            _ => None,
        }
    }
    find(&v).unwrap()
}

fn metrics(s: &Server) -> String {
    let o = Command::new("curl")
        .args(["-sf", "-H"])
        .arg(format!("Authorization: Bearer {}", token(s, "root")))
        .arg(format!("{}/metrics", s.url()))
        .output()
        .expect("this test needs curl: run scripts/setup.sh");
    assert!(o.status.success(), "curl /metrics failed");
    String::from_utf8(o.stdout).unwrap()
}

/// The value of the sample `name` (with its labels, exactly), if there is one.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_follow_prometheus_names_and_request_lines_name_user_and_address() {
    let s = Server::plain();
    let url = s.url();
    s.login("alice", &url, &[]).ok();
    s.login("root", &url, &[]).ok();
    let dir = tempfile::tempdir().unwrap();
    alice_imports(&s, &url, dir.path(), "alice/a", 1 << 20, 1, 0).ok();
    s.run("alice", &url, &["log", "alice/nope"])
        .failed()
        .stderr_has(&["alice/nope"]);
    s.local(&["gc"]).ok();
    s.local(&["verify"]).ok();

    let m = metrics(&s);
    assert!(
        m.contains(&format!(
            "mbank_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{m}"
    );
    for name in [
        "mbank_received_bytes_total",
        "mbank_sent_bytes_total",
        "mbank_stored_bytes_total",
        "mbank_stored_bytes",
        "mbank_requests_total",
    ] {
        assert!(sample(&m, name).is_some(), "no {name}:\n{m}");
    }
    for old in [
        "mbank_bytes_in_total",
        "mbank_bytes_out_total",
        "mbank_bytes_stored_total",
    ] {
        assert!(!m.contains(old), "{old} is still there:\n{m}");
    }
    // The request-duration histogram, by route.
    let route = "route=\"/v1/machines/{u}/{n}/versions\"";
    assert!(
        m.lines()
            .any(|l| l.starts_with("mbank_request_duration_seconds_bucket{")
                && l.contains(route)
                && l.contains("le=\"+Inf\"")),
        "{m}"
    );
    assert!(
        m.contains("# TYPE mbank_request_duration_seconds histogram"),
        "{m}"
    );
    // Errors by the API's kind, never by a status code.
    assert!(
        sample(&m, "mbank_errors_total{kind=\"machine_not_found\"}").is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert!(!m.contains("kind=\"404\""), "{m}");
    // When gc and verify last ran on the bank's host, and how they ended.
    for job in ["gc", "verify"] {
        let t = sample(&m, &format!("mbank_last_{job}_timestamp_seconds"))
            .unwrap_or_else(|| panic!("no last {job} time:\n{m}"));
        assert!(t > 1.6e9, "{job}: {t}");
        assert_eq!(
            sample(&m, &format!("mbank_last_{job}_success")),
            Some(1.0),
            "{m}"
        );
    }

    // One line per request, naming the user and the client's address.
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.contains("path=\"/v1/machines/alice/a\"")
                && l.contains("user=\"alice\"")
                && l.contains("client=\"127.0.0.1\"")),
        "{log}"
    );
}

#[test]
fn completions_and_man_pages_come_from_the_command_line() {
    let r = mbank_run(&["completions", "bash"]).ok();
    assert!(r.stdout.contains("_mbank()"), "{r}");
    for sub in ["whoami", "import", "export", "admin"] {
        assert!(r.stdout.contains(sub), "bash completion lacks {sub}");
    }
    assert!(
        mbank_run(&["completions", "zsh"])
            .ok()
            .stdout
            .contains("#compdef mbank")
    );
    assert!(
        mbank_run(&["completions", "fish"])
            .ok()
            .stdout
            .contains("complete -c mbank")
    );

    let dir = tempfile::tempdir().unwrap();
    mbank_run(&[std::ffi::OsStr::new("man"), dir.path().as_os_str()]).ok();
    for page in ["mbank.1", "mbank-import.1", "mbank-admin-user-add.1"] {
        let text =
            fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("no {page}: {e}"));
        assert!(text.contains(".TH"), "{page} is no man page:\n{text}");
    }
    let import = fs::read_to_string(dir.path().join("mbank-import.1")).unwrap();
    assert!(import.contains("chunk"), "{import}");
}

#[test]
fn systemd_units_pass_systemd_analyze_and_serve_notifies_readiness() {
    let tmp = tempfile::tempdir().unwrap();
    let bank = tmp.path().join("bank dir"); // a space, which the units must quote
    mbank_run(&[
        std::ffi::OsStr::new("--bank"),
        bank.as_os_str(),
        "init".as_ref(),
    ])
    .ok();
    let units = tmp.path().join("units");
    fs::create_dir(&units).unwrap();
    let mut c = mbank();
    c.arg("--bank")
        .arg(&bank)
        .arg("--cache")
        .arg(tmp.path().join("cache"));
    c.arg("units")
        .arg(&units)
        .args(["--", "--listen", "127.0.0.1:7070"]);
    run_cmd(c).ok();
    let serve = fs::read_to_string(units.join("mbank-serve.service")).unwrap();
    assert!(serve.contains("Type=notify"), "{serve}");
    assert!(serve.contains("\"--listen\" \"127.0.0.1:7070\""), "{serve}");
    let recover = fs::read_to_string(units.join("mbank-recover.service")).unwrap();
    assert!(recover.contains(" recover"), "{recover}");
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("mbank-serve.service"))
        .arg(units.join("mbank-recover.service"))
        .output()
        .expect("this test needs systemd-analyze (Debian package systemd)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !err.contains("mbank-"),
        "systemd-analyze verify:\n{err}\n{serve}\n{recover}"
    );

    // Readiness: `serve` sends READY=1 on $NOTIFY_SOCKET once it listens, STOPPING=1
    // when told to stop.
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let log = tmp.path().join("serve.log");
    let mut c = mbank();
    c.arg("--bank")
        .arg(&bank)
        .args(["serve", "--listen", "127.0.0.1:0"]);
    c.env("NOTIFY_SOCKET", &sock_path);
    c.stdout(Stdio::piped())
        .stderr(fs::File::create(&log).unwrap());
    let mut child = c.spawn().unwrap();
    let port = serve_port(&mut child, &log);
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("no READY=1 from serve");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("no STOPPING=1 from serve");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}

#[test]
fn an_administrator_runs_stats_gc_verify_and_quotas_over_the_network() {
    let s = Server::plain();
    let url = s.url();
    s.login("alice", &url, &[]).ok();
    s.login("root", &url, &[]).ok();
    let dir = tempfile::tempdir().unwrap();
    alice_imports(&s, &url, dir.path(), "alice/a", 1 << 20, 1, 1 << 20).ok();

    // Not for users.
    for cmd in [
        &["gc"][..],
        &["verify"],
        &["stats"],
        &["admin", "user", "ls"],
    ] {
        s.run("alice", &url, cmd)
            .failed()
            .stderr_has(&["for administrators"]);
    }

    let st = s.run("root", &url, &["stats", "--json"]).ok().json();
    assert_eq!(st["machines"], 1, "{st}");
    let r = s.run("root", &url, &["gc"]).ok();
    r.stderr_has(&["gc started on", "deleted"]);
    let r = s.run("root", &url, &["verify", "--json"]).ok();
    r.stderr_has(&["verify started on"]);
    assert_eq!(r.json()["ok"], true, "{r}");
    assert!(r.json()["chunks_checked"].as_u64().unwrap() >= 16, "{r}");

    // Users and quotas.
    s.run("root", &url, &["admin", "user", "quota", "alice", "5M"])
        .ok();
    let users = s
        .run("root", &url, &["admin", "user", "ls", "--json"])
        .ok()
        .json();
    let alice = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "alice")
        .unwrap();
    assert_eq!(alice["quota"], 5 << 20, "{users}");
    assert!(alice["used"].as_u64().unwrap() >= 1 << 20, "{users}");
    s.run("root", &url, &["admin", "user", "add", "carol"])
        .failed()
        .stderr_has(&["bank's host"]);

    // Damage is found by the server's verify: exit 3.
    let chunk = chunk_files(&s.bank_dir).into_iter().next().unwrap();
    let path = s.bank_dir.join("chunks").join(&chunk[..2]).join(&chunk);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    s.run("root", &url, &["verify"]).code(3);
}
