//! The web console of `mbank serve` without a browser: curl with a cookie jar against
//! the real server over HTTPS (a test CA made with openssl). Each page's status, the
//! session cookie's flags, CSRF refusals, isolation (another user's machine page is
//! the 404 of an absent one), the head and remove forms, an administrator adding a
//! user, and logout revoking the token.

mod common;
#[path = "../../mbank-nbd/tests/common/pki.rs"]
mod pki;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;

const MIB: usize = 1024 * 1024;

/// A served bank with alice (two versions of alice/dev), bob (bob/secret) and root, an
/// administrator.
struct Console {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bank_dir: PathBuf,
    ca: PathBuf,
    port: u16,
    child: Option<Child>,
}

const USERS: &[(&str, &str, &[&str])] = &[
    ("alice", "alice-secret-1", &[]),
    ("bob", "bob-secret-22", &[]),
    ("root", "root-secret-333", &["--admin"]),
];

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

impl Console {
    fn start() -> Console {
        need(&["openssl", "curl"]);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let bank_dir = root.join("bank");
        let mut s = Console {
            ca: PathBuf::new(),
            bank_dir,
            root,
            _tmp: tmp,
            port: 0,
            child: None,
        };
        s.local(&["init"]).ok();
        s.certificates();
        for (user, pw, extra) in USERS {
            let mut c = mbank();
            c.arg("--bank").arg(&s.bank_dir);
            c.args(["admin", "user", "add", user, "--password-stdin"]);
            c.args(*extra);
            with_stdin(c, pw).ok();
        }
        for (machine, seed) in [("alice/dev", 1u64), ("alice/dev", 2), ("bob/secret", 3)] {
            let p = s.root.join(format!("image-{seed}.raw"));
            write_image(&p, &random_bytes(MIB, seed), 0);
            s.local(&["-q", "import", machine, p.to_str().unwrap()])
                .ok();
        }
        // Imported on the bank's host: each user gets the rights to their chunks as
        // a commit over the API would have given them (a fork needs them).
        s.local(&["admin", "repair-rights"]).ok();
        s.spawn()
    }

    /// A test CA and a certificate for 127.0.0.1 signed by it (`tls/`).
    fn certificates(&mut self) {
        let ca = pki::Ca::new(&self.root, "ca");
        ca.server(&self.root.join("tls"));
        self.ca = ca.cert();
    }

    fn spawn(mut self) -> Console {
        self.launch();
        self
    }

    /// Stops the server and serves the same bank again (on another port).
    fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.launch();
    }

    fn launch(&mut self) {
        let log = self.root.join("server.log");
        let mut c = mbank();
        c.arg("--bank").arg(&self.bank_dir).arg("serve");
        c.args(["--listen", "127.0.0.1:0", "--tls-cert"]);
        c.arg(self.root.join("tls/server-cert.pem"))
            .arg("--tls-key");
        c.arg(self.root.join("tls/server-key.pem"));
        c.stdout(Stdio::piped());
        c.stderr(fs::File::create(&log).unwrap());
        let mut child = c.spawn().unwrap();
        self.port = common::serve_port(&mut child, &log);
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `mbank ARGS` with root's credentials (`mbank login` with the test CA).
    fn as_root(&self, args: &[&str]) -> Run {
        let mut c = mbank();
        c.env("XDG_CONFIG_HOME", self.root.join("config-root"))
            .env_remove("MBANK_TOKEN")
            .args(args);
        run_cmd(c)
    }

    fn login_root(&self) {
        let mut c = mbank();
        c.env("XDG_CONFIG_HOME", self.root.join("config-root"))
            .env_remove("MBANK_TOKEN");
        c.args(["login", &self.url(), "--user", "root", "--password-stdin"]);
        c.arg("--ca-cert").arg(&self.ca);
        with_stdin(c, "root-secret-333").ok();
    }

    fn local(&self, args: &[&str]) -> Run {
        let mut c = mbank();
        c.arg("--bank").arg(&self.bank_dir).args(args);
        run_cmd(c)
    }

    /// The head of `machine`, from the bank's host.
    fn head(&self, machine: &str) -> Option<String> {
        let v = self.local(&["log", "--json", machine]).ok().json();
        let versions = v.as_array().unwrap();
        versions
            .iter()
            .find(|x| x["head"].as_bool() == Some(true))
            .map(|x| x["version"].as_str().unwrap().to_string())
    }

    fn versions(&self, machine: &str) -> Vec<String> {
        let v = self.local(&["log", "--json", machine]).ok().json();
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x["version"].as_str().unwrap().to_string())
            .collect()
    }

    fn browser(&self) -> Browser<'_> {
        Browser {
            s: self,
            jar: self.root.join(format!("jar-{}", unique())),
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One client's answers: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Vec<String> {
        self.headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no csrf field in {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_string()
    }
}

/// curl with its own cookie jar: one browser.
struct Browser<'a> {
    s: &'a Console,
    jar: PathBuf,
}

impl Browser<'_> {
    fn request(&self, method: &str, path: &str, form: &[(&str, &str)]) -> Answer {
        let out = self.s.root.join(format!("body-{}", unique()));
        let hdr = self.s.root.join(format!("headers-{}", unique()));
        let mut c = Command::new("curl");
        c.args(["-s", "-g", "-X", method, "-w", "%{http_code}", "--cacert"]);
        c.arg(&self.s.ca)
            .arg("-b")
            .arg(&self.jar)
            .arg("-c")
            .arg(&self.jar);
        c.arg("-o").arg(&out).arg("-D").arg(&hdr);
        for (k, v) in form {
            c.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        c.arg(format!("https://127.0.0.1:{}{path}", self.s.port));
        let o = c.output().unwrap();
        let status = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        Answer {
            status,
            headers: fs::read_to_string(&hdr).unwrap_or_default(),
            body: fs::read_to_string(&out).unwrap_or_default(),
        }
    }

    /// GETs `path`; an HTML page must keep the console's promise of no JavaScript (no
    /// script element, no `javascript:` URL, no event handler attribute).
    fn get(&self, path: &str) -> Answer {
        let a = self.request("GET", path, &[]);
        let lower = a.body.to_ascii_lowercase();
        if lower.contains("<html") {
            assert!(
                !lower.contains("<script") && !lower.contains("javascript:"),
                "{path} has JavaScript:\n{}",
                a.body
            );
            let handler = lower.split(['<', '>']).skip(1).step_by(2).find(|tag| {
                tag.split_whitespace()
                    .skip(1)
                    .any(|attr| attr.starts_with("on") && attr.contains('='))
            });
            assert!(
                handler.is_none(),
                "{path} has an event handler: <{}>",
                handler.unwrap_or("")
            );
        }
        a
    }

    fn post(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.request("POST", path, form)
    }

    /// Logs in through the form; returns the answer to the form's POST.
    fn login(&self, user: &str, pw: &str) -> Answer {
        let page = self.get("/login");
        assert_eq!(page.status, 200, "{}", page.body);
        let csrf = page.csrf();
        self.post(
            "/login",
            &[("user", user), ("password", pw), ("csrf", &csrf)],
        )
    }

    /// The session token in the cookie jar.
    fn token(&self) -> String {
        let jar = fs::read_to_string(&self.jar).unwrap();
        jar.lines()
            .filter(|l| l.contains("mbank_session"))
            .filter_map(|l| l.split('\t').nth(6))
            .find(|t| t.starts_with("mbt_"))
            .unwrap_or_else(|| panic!("no session cookie in {jar}"))
            .to_string()
    }
}

fn api_status(s: &Console, token: &str, path: &str) -> u16 {
    let o = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&s.ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("https://127.0.0.1:{}{path}", s.port))
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn console_login_pages_forms_and_logout() {
    let s = Console::start();
    let anon = s.browser();

    // Without a session every page leads to the login page.
    for path in ["/", "/machines/alice/dev", "/tokens", "/admin/users"] {
        let a = anon.get(path);
        assert_eq!(a.status, 303, "{path}: {}", a.body);
        assert_eq!(a.header("location"), ["/login"], "{path}");
    }
    let css = anon.get("/console.css");
    assert_eq!(css.status, 200);
    assert!(css.header("content-type")[0].starts_with("text/css"));

    // A wrong password, and a login form without its CSRF nonce, are refused.
    let alice = s.browser();
    assert_eq!(alice.login("alice", "wrong-password").status, 401);
    let forged = s.browser();
    let a = forged.post(
        "/login",
        &[
            ("user", "alice"),
            ("password", "alice-secret-1"),
            ("csrf", "0"),
        ],
    );
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(
        a.header("set-cookie")
            .iter()
            .all(|c| !c.contains("mbank_session"))
    );

    // Login: the session cookie's flags.
    let a = alice.login("alice", "alice-secret-1");
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), ["/"]);
    let cookie = a
        .header("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("mbank_session=mbt_"))
        .expect("a session cookie");
    for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(flag), "{flag} missing from {cookie}");
    }
    let token = alice.token();
    assert_eq!(api_status(&s, &token, "/v1/whoami"), 200);

    // Pages: machines, history, tokens; the console's headers.
    let home = alice.get("/");
    assert_eq!(home.status, 200);
    assert!(home.body.contains("alice/dev"), "{}", home.body);
    assert!(!home.body.contains("bob/secret"), "{}", home.body);
    assert!(home.header("content-security-policy")[0].contains("default-src 'none'"));
    assert_eq!(home.header("x-frame-options"), ["DENY"]);
    let page = alice.get("/machines/alice/dev");
    assert_eq!(page.status, 200, "{}", page.body);
    let versions = s.versions("alice/dev");
    assert_eq!(versions.len(), 2);
    for v in &versions {
        assert!(page.body.contains(v.as_str()), "{v} not on the page");
    }
    let tokens = alice.get("/tokens");
    assert_eq!(tokens.status, 200);
    assert!(tokens.body.contains("web console"), "{}", tokens.body);
    assert!(tokens.body.contains("this session"), "{}", tokens.body);

    // Isolation: bob's machine is the page of an absent one, byte for byte but the name.
    let theirs = alice.get("/machines/bob/secret");
    let absent = alice.get("/machines/bob/nothere");
    assert_eq!(theirs.status, 404);
    assert_eq!(absent.status, 404);
    assert_eq!(
        theirs.body.replace("bob/secret", "X"),
        absent.body.replace("bob/nothere", "X")
    );
    // So is a form posted at it, even with a good CSRF token.
    let csrf = page.csrf();
    let bob_head = s.head("bob/secret").unwrap();
    let a = alice.post(
        "/machines/bob/secret/head",
        &[("csrf", &csrf), ("to", &bob_head), ("expected", &bob_head)],
    );
    assert_eq!(a.status, 404, "{}", a.body);
    // Admin pages are for administrators.
    assert_eq!(alice.get("/admin/users").status, 403);

    // Set the head: refused without the CSRF token or with another session's; then done.
    let (old, new) = (versions[1].clone(), versions[0].clone());
    assert_eq!(s.head("alice/dev").as_deref(), Some(new.as_str()));
    for bad in [vec![], vec![("csrf", "not-the-token")]] {
        let mut form = vec![("to", old.as_str()), ("expected", new.as_str())];
        form.extend(bad);
        let a = alice.post("/machines/alice/dev/head", &form);
        assert_eq!(a.status, 403, "{}", a.body);
        assert!(a.body.contains("CSRF"), "{}", a.body);
    }
    assert_eq!(s.head("alice/dev").as_deref(), Some(new.as_str()));
    let a = alice.post(
        "/machines/alice/dev/head",
        &[("csrf", &csrf), ("to", &old), ("expected", &new)],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), ["/machines/alice/dev"]);
    assert_eq!(s.head("alice/dev").as_deref(), Some(old.as_str()));
    // A stale page (the head moved since) is refused as the API refuses it.
    let a = alice.post(
        "/machines/alice/dev/head",
        &[("csrf", &csrf), ("to", &new), ("expected", &new)],
    );
    assert_eq!(a.status, 409, "{}", a.body);

    // Remove a version: without CSRF refused, with it gone.
    let a = alice.post("/machines/alice/dev/remove", &[("version", &new)]);
    assert_eq!(a.status, 403);
    assert_eq!(s.versions("alice/dev").len(), 2);
    let a = alice.post(
        "/machines/alice/dev/remove",
        &[("csrf", &csrf), ("version", &new)],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(s.versions("alice/dev"), vec![old.clone()]);

    // An administrator adds a user with a quota, who then logs in.
    let root = s.browser();
    assert_eq!(root.login("root", "root-secret-333").status, 303);
    let users = root.get("/admin/users");
    assert_eq!(users.status, 200, "{}", users.body);
    assert!(users.body.contains("alice") && users.body.contains("bob"));
    let rcsrf = users.csrf();
    let form = [
        ("name", "carol"),
        ("password", "carol-secret-4444"),
        ("quota_gib", "2"),
    ];
    assert_eq!(root.post("/admin/users", &form).status, 403);
    let mut with = form.to_vec();
    with.push(("csrf", &rcsrf));
    let a = root.post("/admin/users", &with);
    assert_eq!(a.status, 303, "{}", a.body);
    let users = root.get("/admin/users");
    assert!(users.body.contains("carol") && users.body.contains("2.0 GiB"));
    let carol = s.browser();
    assert_eq!(carol.login("carol", "carol-secret-4444").status, 303);
    let home = carol.get("/");
    assert_eq!(home.status, 200);
    assert!(home.body.contains("of 2.0 GiB"), "{}", home.body);
    // A bad quota is said plainly.
    let a = root.post(
        "/admin/users",
        &[
            ("csrf", &rcsrf),
            ("name", "dave"),
            ("password", "dave-secret-55555"),
            ("quota_gib", "lots"),
        ],
    );
    assert_eq!(a.status, 400);
    assert!(a.body.contains("not a number of GiB"), "{}", a.body);

    // Logout: refused without CSRF; then the token is revoked for the API too.
    assert_eq!(alice.post("/logout", &[("csrf", "")]).status, 403);
    assert_eq!(api_status(&s, &token, "/v1/whoami"), 200);
    let a = alice.post("/logout", &[("csrf", &csrf)]);
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), ["/login"]);
    assert_eq!(api_status(&s, &token, "/v1/whoami"), 401);
    assert_eq!(alice.get("/").status, 303);
    // The old cookie, replayed, is no session either.
    let replay = s.browser();
    fs::write(
        &replay.jar,
        format!("127.0.0.1\tFALSE\t/\tTRUE\t0\tmbank_session\t{token}\n"),
    )
    .unwrap();
    assert_eq!(replay.get("/").status, 303);
}

/// The console in a real browser: headless Chromium driven by Selenium
/// (`web_browser.py`): log in, see the machines, set a head, remove a version, meet the
/// 404 of another user's machine, log out; an administrator adds a user with a quota,
/// who logs in, and runs a verify from the storage page, reloaded to its outcome. No errors in the browser's console; a screenshot of each step in
/// `target/web-screenshots` (kept by CI as artifacts).
#[test]
fn console_in_a_real_browser() {
    need(&["chromium", "chromedriver", "/usr/bin/python3"]);
    let s = Console::start();
    // target/debug/deps/web-… → target
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    let shots = target.join("web-screenshots");
    let _ = fs::remove_dir_all(&shots);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/web_browser.py");
    let mut c = Command::new("/usr/bin/python3");
    c.arg(script)
        .arg(format!("https://127.0.0.1:{}", s.port))
        .arg(&shots);
    c.env("MBANK_WEB_USER", "alice")
        .env("MBANK_WEB_PASS", "alice-secret-1")
        .env("MBANK_WEB_ADMIN", "root")
        .env("MBANK_WEB_ADMIN_PASS", "root-secret-333")
        .env("HOME", &s.root);
    let r = run_cmd(c);
    assert!(r.success(), "the browser test failed:\n{r}");
    assert!(shots.join("04-head-set.png").exists());
}

/// `curl` with a bearer token and a JSON body: the API, beside the console.
fn api(s: &Console, token: &str, method: &str, path: &str, body: &str) -> u16 {
    let o = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
        .arg("--cacert")
        .arg(&s.ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-H", "Content-Type: application/json", "--data", body])
        .arg(format!("https://127.0.0.1:{}{path}", s.port))
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

impl Browser<'_> {
    /// A download: status, headers, the body's bytes.
    fn download(&self, path: &str) -> (u16, Answer, Vec<u8>) {
        let out = self.s.root.join(format!("download-{}", unique()));
        let hdr = self.s.root.join(format!("headers-{}", unique()));
        let o = Command::new("curl")
            .args(["-s", "-g", "-w", "%{http_code}", "--cacert"])
            .arg(&self.s.ca)
            .arg("-b")
            .arg(&self.jar)
            .arg("-o")
            .arg(&out)
            .arg("-D")
            .arg(&hdr)
            .arg(format!("https://127.0.0.1:{}{path}", self.s.port))
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let a = Answer {
            status,
            headers: fs::read_to_string(&hdr).unwrap_or_default(),
            body: String::new(),
        };
        (status, a, fs::read(&out).unwrap_or_default())
    }

    /// Gets `path` until its body contains `what` (a job finishing), for up to 120 s.
    fn wait_for(&self, path: &str, what: &str) -> Answer {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let a = self.get(path);
            if a.body.contains(what) || std::time::Instant::now() > deadline {
                return a;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// The user's actions beyond head and remove (fork, retention, labels, download, a
/// station's token, the machine's state) and the administrator's pages (users
/// changed, published machines, storage with gc and verify, sessions, health), each
/// with its CSRF refusal and isolation.
#[test]
fn console_forks_downloads_and_administers() {
    let s = Console::start();
    let alice = s.browser();
    assert_eq!(alice.login("alice", "alice-secret-1").status, 303);
    let home = alice.get("/");
    assert_eq!(home.status, 200);
    assert!(home.body.contains("Published bases"), "{}", home.body);
    assert!(home.body.contains(">off<"), "{}", home.body);
    let page = alice.get("/machines/alice/dev");
    let csrf = page.csrf();
    let versions = s.versions("alice/dev");
    let head = s.head("alice/dev").unwrap();

    // Fork: refused without CSRF, from another user's machine (the 404 of an absent
    // one), into a name that exists; then done, sharing the disk.
    let a = alice.post("/machines/alice/dev/fork", &[("name", "copy")]);
    assert_eq!(a.status, 403, "{}", a.body);
    let a = alice.post(
        "/machines/bob/secret/fork",
        &[("csrf", &csrf), ("name", "stolen")],
    );
    assert_eq!(a.status, 404, "{}", a.body);
    let a = alice.post(
        "/machines/alice/dev/fork",
        &[("csrf", &csrf), ("name", "dev")],
    );
    assert_eq!(a.status, 409, "{}", a.body);
    let a = alice.post(
        "/machines/alice/dev/fork",
        &[("csrf", &csrf), ("name", "copy"), ("version", &versions[1])],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), ["/machines/alice/copy"]);
    assert_eq!(s.versions("alice/copy").len(), 1);
    let copy = alice.get("/machines/alice/copy");
    assert_eq!(copy.status, 200);
    assert!(
        copy.body
            .contains(&format!("/machines/alice/dev#v-{}", versions[1])),
        "no link to the fork's source: {}",
        copy.body
    );
    let exported = s.root.join("copy.raw");
    s.local(&["-q", "export", "alice/copy", exported.to_str().unwrap()])
        .ok();
    assert_eq!(fs::read(&exported).unwrap(), random_bytes(MIB, 1));

    // Download: the head's disk, streamed with its name; another user's is a 404.
    let (status, a, body) =
        alice.download(&format!("/machines/alice/dev/versions/{head}/disk.raw"));
    assert_eq!(status, 200);
    assert!(a.header("content-disposition")[0].starts_with("attachment; filename=\"alice-dev-"));
    assert_eq!(a.header("content-length"), [MIB.to_string()]);
    assert!(
        body == random_bytes(MIB, 2),
        "the download is not the head's disk"
    );
    let bob_head = s.head("bob/secret").unwrap();
    let (status, ..) = alice.download(&format!(
        "/machines/bob/secret/versions/{bob_head}/disk.raw"
    ));
    assert_eq!(status, 404);

    // Retention: set, shown, cleared; refused without CSRF and on another's machine.
    let policy = [("keep_last", "2"), ("keep_daily", "7")];
    assert_eq!(
        alice.post("/machines/alice/dev/policy", &policy).status,
        403
    );
    let mut with = policy.to_vec();
    with.push(("csrf", &csrf));
    assert_eq!(alice.post("/machines/bob/secret/policy", &with).status, 404);
    assert_eq!(alice.post("/machines/alice/dev/policy", &with).status, 303);
    let p = alice.get("/machines/alice/dev");
    assert!(
        p.body.contains("--keep-last 2 --keep-daily 7"),
        "{}",
        p.body
    );
    // The API reads the policy the console set.
    let o = Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(&s.ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", alice.token()))
        .arg(format!(
            "https://127.0.0.1:{}/v1/machines/alice/dev/policy",
            s.port
        ))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains("\"keep_last\":2"), "{shown}");
    let a = alice.post(
        "/machines/alice/dev/policy",
        &[("csrf", &csrf), ("clear", "1")],
    );
    assert_eq!(a.status, 303);
    assert!(
        alice
            .get("/machines/alice/dev")
            .body
            .contains("none (every version is kept)")
    );

    // Labels: a note and the checkpoint tag, shown on the timeline.
    let a = alice.post(
        "/machines/alice/dev/label",
        &[
            ("csrf", &csrf),
            ("version", &head),
            ("note", "before the exam"),
            ("tag", "checkpoint"),
        ],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    let p = alice.get("/machines/alice/dev");
    assert!(p.body.contains("before the exam"), "{}", p.body);
    assert!(p.body.contains("version head checkpoint"), "{}", p.body);

    // The machine's state: running on a station while a session holds it.
    let token = alice.token();
    let lease = format!(
        r#"{{"lease":{{"machine":"alice/dev","session":"s1","station":"st1","station_name":"lab-pc-7:/cache","pid":1,"base":"{head}","started_ms":1700000000000,"heartbeat_ms":1700000000000}},"replace":null}}"#
    );
    assert_eq!(
        api(&s, &token, "PUT", "/v1/machines/alice/dev/lease", &lease),
        200
    );
    let home = alice.get("/");
    assert!(
        home.body.contains("running") && home.body.contains("lab-pc-7:/cache"),
        "{}",
        home.body
    );
    let p = alice.get("/machines/alice/dev");
    assert!(p.body.contains("last heartbeat"), "{}", p.body);

    // A token for a station: the password again; shown once; it works on the API.
    let tokens = alice.get("/tokens");
    assert!(tokens.body.contains("A token for a station"));
    let a = alice.post(
        "/tokens",
        &[
            ("csrf", &csrf),
            ("label", "lab-pc-7"),
            ("password", "wrong-password"),
        ],
    );
    assert_eq!(a.status, 403, "{}", a.body);
    let a = alice.post(
        "/tokens",
        &[("label", "lab-pc-7"), ("password", "alice-secret-1")],
    );
    assert_eq!(a.status, 403);
    let a = alice.post(
        "/tokens",
        &[
            ("csrf", &csrf),
            ("label", "lab-pc-7"),
            ("password", "alice-secret-1"),
            ("days", "7"),
        ],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let at = a.body.find("mbt_").expect("the new token is shown");
    let station = &a.body[at..at + 101];
    assert_eq!(api_status(&s, station, "/v1/whoami"), 200);
    assert!(alice.get("/tokens").body.contains("lab-pc-7"));

    // Administrator pages are for administrators.
    for path in [
        "/admin/published",
        "/admin/storage",
        "/admin/sessions",
        "/admin/health",
    ] {
        assert_eq!(alice.get(path).status, 403, "{path}");
    }
    assert_eq!(
        alice
            .post(
                "/admin/users/change",
                &[("csrf", &csrf), ("name", "bob"), ("action", "disable")]
            )
            .status,
        403
    );

    let root = s.browser();
    assert_eq!(root.login("root", "root-secret-333").status, 303);
    let users = root.get("/admin/users");
    let rcsrf = users.csrf();
    let change = |name: &str, action: &str, extra: &[(&str, &str)]| {
        let mut f = vec![("csrf", rcsrf.as_str()), ("name", name), ("action", action)];
        f.extend_from_slice(extra);
        root.post("/admin/users/change", &f)
    };
    // Disable bob: his token stops working and he cannot log in; enable; reset password.
    let bob = s.browser();
    assert_eq!(bob.login("bob", "bob-secret-22").status, 303);
    let bob_token = bob.token();
    assert_eq!(
        root.post(
            "/admin/users/change",
            &[("name", "bob"), ("action", "disable")]
        )
        .status,
        403
    );
    assert_eq!(change("bob", "disable", &[]).status, 303);
    assert!(root.get("/admin/users").body.contains("disabled"));
    assert_eq!(api_status(&s, &bob_token, "/v1/whoami"), 401);
    assert_eq!(s.browser().login("bob", "bob-secret-22").status, 401);
    assert_eq!(change("bob", "enable", &[]).status, 303);
    assert_eq!(
        change("bob", "password", &[("password", "bob-new-secret-9")]).status,
        303
    );
    assert_eq!(s.browser().login("bob", "bob-secret-22").status, 401);
    let bob = s.browser();
    assert_eq!(bob.login("bob", "bob-new-secret-9").status, 303);
    assert_eq!(change("bob", "quota", &[("quota_gib", "3")]).status, 303);
    assert!(bob.get("/").body.contains("of 3.0 GiB"));
    // An administrator cannot lock themself out; a user is removed.
    assert_eq!(change("root", "disable", &[]).status, 400);
    root.post(
        "/admin/users",
        &[
            ("csrf", &rcsrf),
            ("name", "dave"),
            ("password", "dave-secret-55555"),
        ],
    );
    assert_eq!(change("dave", "remove", &[]).status, 303);
    assert!(!root.get("/admin/users").body.contains("dave"));
    assert_eq!(s.browser().login("dave", "dave-secret-55555").status, 401);

    // Published: bob sees alice/dev among the bases and forks it; unpublished, it is gone.
    let a = root.post(
        "/admin/published",
        &[
            ("csrf", &rcsrf),
            ("machine", "alice/dev"),
            ("action", "publish"),
        ],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert!(root.get("/admin/published").body.contains("alice/dev"));
    // The server packs the published head for exports, after its answer.
    let head = s.versions("alice/dev")[0].clone();
    let pack = s.bank_dir.join("packs").join(format!("{head}.pack"));
    let t0 = std::time::Instant::now();
    while !pack.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no pack of the published head {head} after 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let bhome = bob.get("/");
    assert!(
        bhome.body.contains("id=\"bases\"") && bhome.body.contains("alice/dev"),
        "{}",
        bhome.body
    );
    let bcsrf = bhome.csrf();
    let a = bob.post(
        "/machines/alice/dev/fork",
        &[("csrf", &bcsrf), ("name", "base")],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(s.versions("bob/base").len(), 1);
    // The published page offers bob no owner's forms.
    let p = bob.get("/machines/alice/dev");
    assert!(
        !p.body.contains("set-head") && !p.body.contains("set-policy"),
        "{}",
        p.body
    );
    assert_eq!(
        bob.post(
            "/machines/alice/dev/head",
            &[("csrf", &bcsrf), ("to", &versions[1]), ("expected", &head)]
        )
        .status,
        404
    );
    let a = root.post(
        "/admin/published",
        &[
            ("csrf", &rcsrf),
            ("machine", "alice/dev"),
            ("action", "unpublish"),
        ],
    );
    assert_eq!(a.status, 303);
    assert_eq!(bob.get("/machines/alice/dev").status, 404);

    // Sessions: alice's lease. Health: charts.
    let p = root.get("/admin/sessions");
    assert_eq!(p.status, 200);
    assert!(
        p.body.contains("alice/dev") && p.body.contains("lab-pc-7:/cache"),
        "{}",
        p.body
    );
    let p = root.get("/admin/health");
    assert_eq!(p.status, 200);
    assert!(
        p.body.contains("<svg") && p.body.contains("polyline"),
        "{}",
        p.body
    );

    // Storage: totals; gc and verify run by the server, followed to their outcome.
    let p = root.get("/admin/storage");
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.body.contains("Deduplication") && p.body.contains("id=\"use\""));
    assert_eq!(root.post("/admin/jobs", &[("kind", "gc")]).status, 403);
    assert_eq!(
        root.post("/admin/jobs", &[("csrf", &rcsrf), ("kind", "gc")])
            .status,
        303
    );
    let p = root.wait_for("/admin/storage", "Start gc");
    assert!(p.body.contains("deleted 0 chunks"), "{}", p.body);
    assert_eq!(
        root.post("/admin/jobs", &[("csrf", &rcsrf), ("kind", "verify")])
            .status,
        303
    );
    let p = root.wait_for("/admin/storage", "Start verify");
    assert!(p.body.contains("no damage"), "{}", p.body);
}

/// The part of `page` in the element with `id` (up to its table's end).
fn table<'a>(page: &'a str, id: &str) -> &'a str {
    let at = page
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element {id} in {page}"));
    let rest = &page[at..];
    &rest[..rest.find("</table>").unwrap_or(rest.len())]
}

/// `GET path` of the API with a bearer token: status and body.
fn api_get(s: &Console, token: &str, path: &str) -> (u16, String) {
    let o = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--cacert"])
        .arg(&s.ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("https://127.0.0.1:{}{path}", s.port))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// One runner for the administrator's jobs (issue 16): a gc started over the API with
/// `mbank gc --bank URL` is on the console's storage page, with who started it and
/// its outcome.
#[test]
fn a_gc_started_over_the_api_shows_on_the_storage_page() {
    let s = Console::start();
    s.login_root();
    let r = s.as_root(&["--bank", &s.url(), "gc"]).ok();
    r.stderr_has(&["gc started on", "deleted 0 chunks"]);

    let root = s.browser();
    assert_eq!(root.login("root", "root-secret-333").status, 303);
    let p = root.get("/admin/storage");
    assert_eq!(p.status, 200, "{}", p.body);
    let jobs = table(&p.body, "jobs");
    assert!(
        jobs.contains(">gc<") && jobs.contains(">root<") && jobs.contains("deleted 0 chunks"),
        "{jobs}"
    );
}

/// A verify started from the console is the API's job (`GET /v1/admin/jobs/{id}`),
/// recorded in `last-verify.json`, and its outcome is on the storage page after the
/// server restarts.
#[test]
fn a_verify_started_from_the_console_is_the_apis_job_and_outlives_a_restart() {
    let mut s = Console::start();
    let root = s.browser();
    assert_eq!(root.login("root", "root-secret-333").status, 303);
    let csrf = root.get("/admin/storage").csrf();
    let a = root.post("/admin/jobs", &[("csrf", &csrf), ("kind", "verify")]);
    assert_eq!(a.status, 303, "{}", a.body);
    let p = root.wait_for("/admin/storage", "Start verify");
    assert!(table(&p.body, "jobs").contains("no damage"), "{}", p.body);

    let (status, body) = api_get(&s, &root.token(), "/v1/admin/jobs/1");
    assert_eq!(status, 200, "{body}");
    let job: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(job["job"], "verify", "{job}");
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["result"]["ok"], true, "{job}");
    assert_eq!(job["by"], "root", "{job}");
    let record = s.bank_dir.join("last-verify.json");
    let rec: serde_json::Value = serde_json::from_slice(
        &fs::read(&record).unwrap_or_else(|e| panic!("{}: {e}", record.display())),
    )
    .unwrap();
    assert_eq!(rec["ok"], true, "{rec}");

    // The same browser (its cookie jar) on the server started again.
    let jar = root.jar.clone();
    s.restart();
    let root = Browser { s: &s, jar };
    let p = root.get("/admin/storage");
    assert_eq!(p.status, 200, "{}", p.body);
    let jobs = table(&p.body, "jobs");
    assert!(
        jobs.contains(">verify<")
            && jobs.contains("no damage")
            && jobs.contains("last-verify.json"),
        "{jobs}"
    );
}
