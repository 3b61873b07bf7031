//! Several `mbank serve` processes sharing one bank whose catalog and access rights are
//! in PostgreSQL (issue 17): a throw-away PostgreSQL server (`mbank_sql::testing`), a
//! bank made with `init --postgres`, two servers over TLS on it, and, for the station
//! that must ride out a killed server, a plain TCP balancer in front of them (round
//! robin over the servers that take the connection, as any TCP load balancer does).

mod common;
#[path = "../../mbank-nbd/tests/common/pki.rs"]
mod pki;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use mbank_sql::testing::TempPostgres;
use serde_json::Value;

const MIB: usize = 1024 * 1024;
const PASSWORD: &str = "alice-secret-1";

/// One bank on PostgreSQL, served by two servers.
struct Pair {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bank_dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    servers: Vec<Option<Child>>,
    ports: Vec<u16>,
    _pg: TempPostgres,
}

impl Pair {
    fn start() -> Pair {
        let pg = TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
        let url = pg.new_database().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let bank_dir = root.join("bank");
        let mut c = mbank();
        c.arg("--bank")
            .arg(&bank_dir)
            .args(["init", "--postgres", &url]);
        run_cmd(c).ok();
        let ca = pki::Ca::new(&root, "ca");
        let (cert, key) = ca.server(&root.join("tls"));
        let mut p = Pair {
            _tmp: tmp,
            bank_dir,
            ca: ca.cert(),
            cert,
            key,
            root,
            servers: Vec::new(),
            ports: Vec::new(),
            _pg: pg,
        };
        let mut c = mbank();
        c.arg("--bank").arg(&p.bank_dir);
        c.args(["admin", "user", "add", "alice", "--password-stdin"]);
        with_stdin(c, PASSWORD).ok();
        for i in 0..2 {
            p.servers.push(None);
            p.ports.push(0);
            p.spawn(i);
        }
        p
    }

    fn spawn(&mut self, i: usize) {
        let log = self.root.join(format!("server-{i}.log"));
        let mut c = mbank();
        c.arg("--bank").arg(&self.bank_dir).arg("serve");
        c.arg("--listen").arg("127.0.0.1:0");
        c.arg("--tls-cert")
            .arg(&self.cert)
            .arg("--tls-key")
            .arg(&self.key);
        c.stdout(Stdio::piped());
        c.stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap(),
        );
        let mut child = c.spawn().unwrap();
        self.ports[i] = serve_port(&mut child, &log);
        self.servers[i] = Some(child);
    }

    /// SIGTERM server `i` and wait: it must end cleanly (no panic in its log).
    fn stop(&mut self, i: usize) {
        let c = self.servers[i].take().expect("running");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let out = c.wait_with_output().unwrap();
        let log = fs::read_to_string(self.root.join(format!("server-{i}.log"))).unwrap();
        assert!(
            out.status.success() && !log.contains("panicked"),
            "server {i} did not end cleanly ({}):\n{log}",
            out.status
        );
    }

    /// SIGKILL server `i`: no cleanup of any kind.
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.ports[i])
    }

    fn config_dir(&self, url: &str) -> PathBuf {
        let port = url.rsplit(':').next().unwrap();
        self.root.join(format!("config-{port}"))
    }

    /// alice logged in at `url`: her client view of the bank there.
    fn login(&self, url: &str) -> Bank {
        let mut c = mbank();
        c.env("XDG_CONFIG_HOME", self.config_dir(url));
        c.arg("login")
            .arg(url)
            .args(["--user", "alice", "--password-stdin"]);
        c.arg("--ca-cert").arg(&self.ca);
        with_stdin(c, PASSWORD).ok();
        self.client(url)
    }

    fn client(&self, url: &str) -> Bank {
        let port = url.rsplit(':').next().unwrap();
        Bank::remote(
            url,
            &self.root.join(format!("scratch-{port}")),
            &self.config_dir(url),
        )
    }

    /// The token `mbank login` stored for `url`.
    fn token(&self, url: &str) -> String {
        let p = self.config_dir(url).join("mbank/credentials.json");
        let v: Value = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
        find_token(&v).expect("a token")
    }

    /// `mbank --bank DIR ARGS` on the bank's host.
    fn local(&self, args: &[&str]) -> Run {
        let mut c = mbank();
        c.arg("--bank").arg(&self.bank_dir).args(args);
        run_cmd(c)
    }

    fn server_logs(&self) -> String {
        logs_in(&self.root)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// The servers' logs under `root`.
fn logs_in(root: &Path) -> String {
    (0..2)
        .map(|i| {
            let log = fs::read_to_string(root.join(format!("server-{i}.log"))).unwrap_or_default();
            format!("--- server {i}\n{log}")
        })
        .collect()
}

/// A TCP balancer on 127.0.0.1: each connection goes to the next backend in turn that
/// accepts it; bytes are copied both ways until either side closes.
struct Balancer {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Connections handed to each backend.
    pub served: Arc<Mutex<Vec<usize>>>,
    /// Bytes each backend sent to its clients.
    sent: Arc<Vec<AtomicUsize>>,
}

impl Balancer {
    fn start(backends: Vec<u16>) -> Balancer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(vec![0; backends.len()]));
        let sent: Arc<Vec<AtomicUsize>> =
            Arc::new((0..backends.len()).map(|_| AtomicUsize::new(0)).collect());
        let next = AtomicUsize::new(0);
        let (stop2, served2, sent2) = (stop.clone(), served.clone(), sent.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let first = next.fetch_add(1, Ordering::Relaxed);
                let picked = (0..backends.len()).find_map(|k| {
                    let i = (first + k) % backends.len();
                    TcpStream::connect(("127.0.0.1", backends[i]))
                        .ok()
                        .map(|s| (i, s))
                });
                let Some((i, server)) = picked else { continue };
                served2.lock().unwrap()[i] += 1;
                pipe(client, server, sent2.clone(), i);
            }
        });
        Balancer {
            port,
            stop,
            served,
            sent,
        }
    }

    /// Bytes backend `i` has sent so far.
    fn sent_by(&self, i: usize) -> usize {
        self.sent[i].load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies client `a` <-> backend `b` (number `i`), counting what `b` sends in `sent`.
fn pipe(a: TcpStream, b: TcpStream, sent: Arc<Vec<AtomicUsize>>, i: usize) {
    for (mut from, mut to, count) in [
        (a.try_clone().unwrap(), b.try_clone().unwrap(), false),
        (b, a, true),
    ] {
        let sent = sent.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
                if count {
                    sent[i].fetch_add(n, Ordering::SeqCst);
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
            let _ = from.shutdown(std::net::Shutdown::Read);
        });
    }
}

fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    Rng::new(seed).fill(&mut v);
    v
}

fn write_img(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, data).unwrap();
    p
}

/// What one server writes, the other reads: a login (its token) and a machine.
#[test]
fn two_servers_on_one_postgresql_database_serve_one_bank() {
    let p = Pair::start();
    let a = p.login(&p.url(0));
    let img = image(3 * MIB, 1);
    let path = write_img(&p.root, "one.raw", &img);
    let r = a.import("alice/desk", &path, &[]);
    assert_eq!(r["head_moved"], true, "{r}");
    // The token made through server 0 works through server 1.
    let token = p.token(&p.url(0));
    let o = Command::new("curl")
        .args(["-s", "-f", "--cacert"])
        .arg(&p.ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("{}/v1/machines", p.url(1)))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{body}\n{}", p.server_logs());
    assert!(body.contains("alice/desk"), "{body}");
    let b = p.login(&p.url(1));
    let out = p.root.join("out.raw");
    let got = b.export("alice/desk", &out);
    assert_same_bytes(&got, &img, "the export through the other server");
    assert_eq!(b.head("alice/desk"), a.head("alice/desk"));
    // A server ends cleanly, its pooled database connections with it.
    let mut p = p;
    p.stop(0);
    p.stop(1);
}

/// Imports of one machine through both servers at once: every version is kept, and
/// the head moves by compare-and-swap across the servers: the versions that moved it
/// form one chain, none two moves from the same head.
#[test]
fn concurrent_commits_through_two_servers_move_the_head_one_at_a_time() {
    let p = Pair::start();
    let clients = [p.login(&p.url(0)), p.login(&p.url(1))];
    let first = write_img(&p.root, "base.raw", &image(MIB, 100));
    let r = clients[0].import("alice/lab", &first, &[]);
    let base = r["version"].as_str().unwrap().to_string();
    let n = 8;
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| write_img(&p.root, &format!("i{i}.raw"), &image(MIB, 200 + i as u64)))
        .collect();
    let reports: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = paths
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let c = &clients[i % 2];
                s.spawn(move || c.import("alice/lab", path, &[]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let log = clients[1].log("alice/lab");
    assert_eq!(log.len(), n + 1, "every version is kept: {log:?}");
    let moved: Vec<(&str, &str)> = reports
        .iter()
        .filter(|r| r["head_moved"] == true)
        .map(|r| {
            (
                r["version"].as_str().unwrap(),
                r["parent"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(!moved.is_empty(), "{reports:?}");
    // Each head move started from the head before it: one parent per move, and the
    // chain runs from the base to the head now.
    let mut parents: Vec<&str> = moved.iter().map(|m| m.1).collect();
    parents.sort();
    parents.dedup();
    assert_eq!(
        parents.len(),
        moved.len(),
        "two moves from one head: {moved:?}"
    );
    let head = clients[0].head("alice/lab").unwrap();
    let mut at = head.as_str();
    let mut steps = 0;
    while at != base {
        let (_, parent) = moved.iter().find(|m| m.0 == at).unwrap_or_else(|| {
            panic!("{at} is on the head's chain but did not move it: {moved:?}")
        });
        at = parent;
        steps += 1;
    }
    assert_eq!(
        steps,
        moved.len(),
        "every move is on the head's chain: {moved:?}"
    );
}

/// A session's lease, taken through one server, is refused through the other.
#[test]
fn a_lease_taken_through_one_server_is_refused_through_the_other() {
    let p = Pair::start();
    let a = p.login(&p.url(0));
    let b = p.login(&p.url(1));
    let path = write_img(&p.root, "m.raw", &image(2 * MIB, 7));
    a.import("alice/m", &path, &[]);
    let mut held = a.attach(&p.root.join("cache-a"), "alice/m", &[]);
    let refused = b
        .try_attach(&p.root.join("cache-b"), "alice/m", &[])
        .err()
        .unwrap_or_else(|| panic!("a second session through the other server"));
    refused.stderr_has(&["in use"]);
    held.stop();
    let mut second = b.attach(&p.root.join("cache-b"), "alice/m", &[]);
    second.stop();
}

/// A station reading and writing through a balancer over two servers: one server is
/// killed mid-session, as soon as it answers part of a cold read (so, most runs, in the
/// middle of an answer); the station carries on through the other, checks in, and the
/// bank holds exactly what it wrote.
#[test]
fn a_server_killed_under_a_station_costs_it_nothing() {
    let mut p = Pair::start();
    let lb = Balancer::start(p.ports.clone());
    let c = p.login(&lb.url());
    let mut want = image(32 * MIB, 9);
    let path = write_img(&p.root, "disk.raw", &want);
    c.import("alice/work", &path, &[]);
    let mut s = c.attach(&p.root.join("cache"), "alice/work", &[]);
    let uri = s.uri();
    // Read the first half (fetched through both servers), write into it.
    let root = p.root.clone();
    let io = |cmd: &str| {
        let r = tool("qemu-io", &["-f", "raw", "-c", cmd, &uri]);
        assert!(r.success(), "{r}\n{}", logs_in(&root));
    };
    io(&format!("read 0 {}", 4 * MIB));
    io(&format!("write -P 0x5a {} {}", MIB, MIB));
    want[MIB..2 * MIB].fill(0x5a);
    assert!(
        lb.served.lock().unwrap().iter().all(|&n| n > 0),
        "both servers took connections: {:?}",
        lb.served.lock().unwrap()
    );
    // A cold read; server 0 is killed once it sends part of the answers.
    let before = lb.sent_by(0);
    let (uri2, root2) = (uri.clone(), p.root.clone());
    let reader = std::thread::spawn(move || {
        let r = tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("read {} {}", 8 * MIB, 24 * MIB),
                &uri2,
            ],
        );
        assert!(r.success(), "{r}\n{}", logs_in(&root2));
    });
    while lb.sent_by(0) == before && !reader.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mid_read = !reader.is_finished();
    p.kill(0);
    reader.join().unwrap();
    eprintln!(
        "server 0 was killed {} the read",
        if mid_read { "during" } else { "after" }
    );
    // The rest is fetched, and more is written, through the server left.
    io(&format!("read {} {}", 4 * MIB, 4 * MIB));
    io(&format!("write -P 0xa5 {} {}", 6 * MIB, MIB));
    want[6 * MIB..7 * MIB].fill(0xa5);
    let cmp = compare_raw(&write_img(&p.root, "want.raw", &want), &uri);
    assert!(cmp.success(), "{cmp}");
    let done = s.stop();
    assert!(done.success(), "{done}\n{}", p.server_logs());
    let out = p.root.join("after.raw");
    let got = p.login(&p.url(1)).export("alice/work", &out);
    assert_same_bytes(&got, &want, "the bank after the check-in");
    p.local(&["verify"]).ok();
}

/// A bank on PostgreSQL on its own host: import, export, gc and verify work as on
/// SQLite; the marker and postgres.url must agree; a database that already holds a
/// bank's machines is not taken by a second init.
#[test]
fn a_bank_on_postgresql_works_on_its_host_and_is_opened_only_with_its_url() {
    let pg = TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let url = pg.new_database().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bank");
    let bank = |args: &[&str]| {
        let mut c = mbank();
        c.arg("--bank").arg(&dir).args(args);
        run_cmd(c)
    };
    bank(&["init", "--postgres", &url]).ok();
    let marker = fs::read_to_string(dir.join("MBANK")).unwrap();
    assert!(
        marker.starts_with("MBANK-BANK 3\n") && marker.contains("\ncatalog postgres\n"),
        "{marker}"
    );
    assert!(
        !dir.join("catalog.db").exists(),
        "no SQLite catalog beside it"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(dir.join("postgres.url"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "postgres.url is the owner's alone: {mode:o}"
    );
    let img = image(2 * MIB, 3);
    let path = write_img(tmp.path(), "a.raw", &img);
    bank(&["import", "alice/a", path.to_str().unwrap()]).ok();
    bank(&["rm", "alice/a"]).ok();
    let img2 = image(2 * MIB, 4);
    let path2 = write_img(tmp.path(), "b.raw", &img2);
    bank(&["import", "alice/b", path2.to_str().unwrap()]).ok();
    Bank::at(&dir, &tmp.path().join("scratch")).age_chunks();
    let gc = bank(&["gc", "--json"]).ok();
    assert!(gc.json()["chunks_deleted"].as_u64().unwrap() >= 32, "{gc}");
    let out = tmp.path().join("b.out");
    bank(&["export", "alice/b", out.to_str().unwrap()]).ok();
    assert_same_bytes(&fs::read(&out).unwrap(), &img2, "export after gc");
    bank(&["verify"]).ok();

    // Without its URL the bank is refused, not opened empty.
    let moved = tmp.path().join("postgres.url.away");
    fs::rename(dir.join("postgres.url"), &moved).unwrap();
    bank(&["ls"])
        .failed()
        .stderr_has(&["PostgreSQL", "postgres.url is missing"]);
    fs::rename(&moved, dir.join("postgres.url")).unwrap();
    // A URL without the marker's line is refused too.
    let other = tmp.path().join("other");
    let mut c = mbank();
    c.arg("--bank").arg(&other).arg("init");
    run_cmd(c).ok();
    fs::copy(dir.join("postgres.url"), other.join("postgres.url")).unwrap();
    let mut c = mbank();
    c.arg("--bank").arg(&other).arg("ls");
    run_cmd(c)
        .failed()
        .stderr_has(&["no `catalog postgres` line"]);
    // A second init on the same database: refused, and it leaves no bank behind.
    let third = tmp.path().join("third");
    let mut c = mbank();
    c.arg("--bank")
        .arg(&third)
        .args(["init", "--postgres", &url]);
    run_cmd(c)
        .failed()
        .stderr_has(&["already holds a bank's catalog"]);
    assert!(!third.join("MBANK").exists());
    bank(&["ls"]).ok();
}
