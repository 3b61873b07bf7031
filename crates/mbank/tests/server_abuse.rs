//! The bank server under abuse: floods of bodies without a token, login floods and
//! password guessing, slow clients, amplifying chunk queries, /metrics as an oracle, a
//! stolen version id. Each test starts the real `mbank serve` (plain HTTP on loopback,
//! so that raw sockets can misbehave exactly) and asserts bounds, not times: peak
//! resident memory (`VmHWM`), statuses, and connections closed.
//!
//! `MBANK_TEST_SERVER_BIN` runs the server from another build (to show that these tests
//! fail on a server without the bounds).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: usize = 1024 * 1024;

/// Generous: the machine is shared and slow; these bound waits, they time nothing.
const PATIENCE: Duration = Duration::from_secs(60);

const USERS: &[(&str, &str, bool)] = &[
    ("alice", "alice-secret-1", false),
    ("bob", "bob-secret-22", false),
    ("root", "root-secret-333", true),
];

struct Server(PlainServer);

impl std::ops::Deref for Server {
    type Target = PlainServer;
    fn deref(&self) -> &PlainServer {
        &self.0
    }
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server(PlainServer::start(USERS, &|_| {}, extra))
    }

    /// The server's peak resident memory so far, in MiB.
    fn peak_mib(&self) -> usize {
        let s = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: usize = s
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kib / 1024
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        s
    }

    /// One request on its own connection: (status, headers, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> (u16, String, Vec<u8>) {
        let mut s = self.connect();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        read_answer(&mut s).unwrap_or_else(|e| panic!("no answer to {method} {path}: {e}"))
    }

    fn login(&self, user: &str, pw: &str) -> (u16, String, Vec<u8>) {
        let body = serde_json::json!({"user": user, "password": pw}).to_string();
        self.request("POST", "/v1/login", None, body.as_bytes())
    }

    fn token(&self, user: &str) -> String {
        let pw = USERS.iter().find(|u| u.0 == user).unwrap().1;
        let (code, _, body) = self.login(user, pw);
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["token"].as_str().unwrap().to_string()
    }
}

/// Reads one HTTP/1.1 answer (Content-Length, chunked, or to the end).
fn read_answer(s: &mut TcpStream) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "the connection closed after {} bytes",
                raw.len()
            )));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut rest = raw[head_end..].to_vec();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&buf[..n]);
        }
        rest.truncate(len);
        return Ok((status, head, rest));
    }
    // Chunked or until the end: read everything, then decode.
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
    }
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let eol = at + rest[at..].windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[at..eol]).unwrap().trim(), 16)
                    .unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            at = eol + 2 + size + 2;
        }
        rest = out;
    }
    Ok((status, head, rest))
}

fn kind(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["kind"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// True once the server closed `s` (end of stream or reset) within [`PATIENCE`].
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn a_body_without_a_token_is_refused_before_it_is_read() {
    let s = Server::start(&[]);
    // Headers only, announcing 32 MiB: the 401 must come without the body.
    let mut c = s.connect();
    c.write_all(
        format!(
            "POST /v1/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
            32 * MIB
        )
        .as_bytes(),
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (code, _, body) = read_answer(&mut c).expect("an answer before the body is sent");
    assert_eq!(code, 401, "{}", String::from_utf8_lossy(&body));
    assert_eq!(kind(&body), "unauthorized");
    // A wrong token too.
    let mut c = s.connect();
    c.write_all(
        format!(
            "PUT /v1/chunks/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer mbt_00_11\r\nContent-Length: {}\r\n\r\n",
            "ab".repeat(32),
            16 * MIB
        )
        .as_bytes(),
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (code, _, _) = read_answer(&mut c).expect("an answer before the body is sent");
    assert_eq!(code, 401);
}

#[test]
fn a_flood_of_bodies_without_a_token_does_not_grow_the_server() {
    let s = Server::start(&[]);
    let before = s.peak_mib();
    let port = s.port;
    let flood: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let _ = c.set_write_timeout(Some(PATIENCE));
                let _ = c.write_all(
                    format!(
                        "POST /v1/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
                        32 * MIB
                    )
                    .as_bytes(),
                );
                let piece = vec![0x5au8; MIB];
                for _ in 0..32 {
                    if c.write_all(&piece).is_err() {
                        return; // refused and closed: what we want
                    }
                }
                let _ = c.set_read_timeout(Some(PATIENCE));
                let _ = read_answer(&mut c);
            })
        })
        .collect();
    // A legitimate request is answered while the flood runs.
    let (code, _, _) = s.request("GET", "/v1/health", None, b"");
    assert_eq!(code, 200);
    for t in flood {
        t.join().unwrap();
    }
    let grew = s.peak_mib().saturating_sub(before);
    assert!(
        grew < 96,
        "16 unauthenticated 32 MiB bodies grew the server's peak memory by {grew} MiB"
    );
}

#[test]
fn authenticated_bodies_wait_for_their_share_of_memory() {
    let s = Server::start(&["--body-memory", "64"]);
    let token = s.token("alice");
    let before = s.peak_mib();
    let port = s.port;
    let flood: Vec<_> = (0..12)
        .map(|_| {
            let token = token.clone();
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.set_write_timeout(Some(PATIENCE)).unwrap();
                c.set_read_timeout(Some(PATIENCE)).unwrap();
                let head = format!(
                    "POST /v1/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
                    32 * MIB
                );
                let mut body = head.into_bytes();
                body.extend(std::iter::repeat_n(0x5au8, 32 * MIB));
                if c.write_all(&body).is_err() {
                    return 0;
                }
                read_answer(&mut c).map_or(0, |(code, _, _)| code)
            })
        })
        .collect();
    let codes: Vec<u16> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    // Garbage batches: refused once read (400), or not let in (503); never held at once.
    assert!(codes.iter().all(|c| [0, 400, 503].contains(c)), "{codes:?}");
    let grew = s.peak_mib().saturating_sub(before);
    assert!(
        grew < 64 + 96,
        "12 authenticated 32 MiB bodies with 64 MiB of body memory grew the server by {grew} MiB"
    );
}

#[test]
fn password_guessing_backs_off_and_the_owner_still_logs_in() {
    let s = Server::start(&[]);
    let mut refused = None;
    for attempt in 1..=12 {
        let (code, head, body) = s.login("alice", "wrong-password");
        match code {
            401 => assert_eq!(kind(&body), "unauthorized"),
            429 => {
                assert!(head.contains("retry-after:"), "{head}");
                assert_eq!(kind(&body), "too_many_logins");
                refused = Some(attempt);
                break;
            }
            c => panic!("attempt {attempt}: {c} {}", String::from_utf8_lossy(&body)),
        }
    }
    let at = refused.expect("12 wrong passwords in a row are never slowed down");
    assert!(at <= 7, "the first 429 came at attempt {at}");
    // The failures are logged with the user and the address.
    let log = s.log();
    assert!(
        log.lines()
            .any(|l| l.contains("login failed") && l.contains("alice") && l.contains("127.0.0.1")),
        "{log}"
    );
    // From another address, alice's right password works.
    let out = Command::new("curl")
        .args([
            "-s",
            "--interface",
            "127.0.0.2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(r#"{"user":"alice","password":"alice-secret-1"}"#)
        .arg(format!("http://127.0.0.1:{}/v1/login", s.port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}

#[test]
fn concurrent_logins_hash_a_bounded_number_of_passwords_at_once() {
    let s = Server::start(&[]);
    // One login first: the peak then includes one argon2 hash.
    s.token("bob");
    let before = s.peak_mib();
    let port = s.port;
    let logins: Vec<_> = (0..24)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.set_read_timeout(Some(PATIENCE)).unwrap();
                let body = r#"{"user":"bob","password":"bob-secret-22"}"#;
                let req = format!(
                    "POST /v1/login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                c.write_all(req.as_bytes()).unwrap();
                let (code, head, _) = read_answer(&mut c).unwrap();
                (code, head.contains("retry-after:"))
            })
        })
        .collect();
    let answers: Vec<(u16, bool)> = logins.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        answers
            .iter()
            .all(|&(c, retry)| c == 200 || (c == 503 && retry)),
        "{answers:?}"
    );
    assert!(answers.iter().any(|&(c, _)| c == 200));
    let grew = s.peak_mib().saturating_sub(before);
    // argon2 takes 19 MiB a hash: 24 at once would be 456 MiB (the server before
    // the bound grew 440 MiB here). Bounded, it grows by a few hashes plus what the
    // allocator keeps in its per-thread arenas: 100-180 MiB seen on a loaded machine.
    assert!(
        grew < 300,
        "24 concurrent logins grew the server by {grew} MiB"
    );
}

#[test]
fn slow_and_idle_connections_are_closed_after_the_header_timeout() {
    let s = Server::start(&["--header-timeout", "2"]);
    // Headers that never end.
    let mut slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = s.connect();
            c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .unwrap();
            c
        })
        .collect();
    // A kept-alive connection that goes idle after one answer.
    let mut idle = s.connect();
    idle.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == b"\"ok\":t") {
        let n = idle.read(&mut buf).unwrap();
        assert!(n > 0, "no answer on the kept-alive connection");
        got.extend_from_slice(&buf[..n]);
    }
    for c in slow.iter_mut() {
        assert!(
            closed_by_server(c),
            "a connection without headers stays open"
        );
    }
    assert!(
        closed_by_server(&mut idle),
        "an idle kept-alive connection stays open"
    );
    let (code, _, _) = s.request("GET", "/v1/health", None, b"");
    assert_eq!(code, 200);
}

#[test]
fn one_address_cannot_take_every_connection() {
    let s = Server::start(&[
        "--max-connections-per-address",
        "4",
        "--header-timeout",
        "120",
    ]);
    let held: Vec<TcpStream> = (0..4).map(|_| s.connect()).collect();
    // The fifth from the same address is closed at once (it would wait 120 s for its
    // header timeout otherwise).
    let mut fifth = s.connect();
    fifth
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = fifth.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(
        closed_by_server(&mut fifth),
        "a fifth connection from one address was served"
    );
    // Another address is served.
    let out = Command::new("curl")
        .args([
            "-s",
            "--interface",
            "127.0.0.2",
            "-m",
            "60",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{}/v1/health", s.port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    drop(held);
}

/// Slow clients from any number of addresses cannot keep a legitimate user out: at
/// the connection cap, a newcomer takes the place of the connection that has waited
/// longest without a request (here, one still sending its headers).
#[test]
fn at_the_connection_cap_slow_clients_make_room_for_new_ones() {
    let s = Server::start(&["--max-connections", "6", "--header-timeout", "120"]);
    let mut held: Vec<TcpStream> = (0..6).map(|_| s.connect()).collect();
    for c in &mut held {
        // Headers begun, never finished.
        c.write_all(b"GET /v1/health HTTP/1.1\r\n").unwrap();
    }
    // Another address asks, again until it is answered: a slot frees once a slow
    // connection has waited a second; without eviction it would take 120 s.
    let mut answered = false;
    for _ in 0..40 {
        let out = Command::new("curl")
            .args([
                "-s",
                "--interface",
                "127.0.0.2",
                "-m",
                "10",
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{}/v1/health", s.port))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout) == "200" {
            answered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        answered,
        "a legitimate request was kept out by slow clients"
    );
    let mut closed = 0;
    for c in &mut held {
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        closed += usize::from(closed_by_server(c));
    }
    assert!(closed >= 1, "no slow connection was closed");
}

#[test]
fn chunks_get_answers_a_repeated_id_once() {
    let s = Server::start(&[]);
    let token = s.token("alice");
    let plain: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let chunk = mbank_core::chunk::encode(&plain, 1);
    let (code, _, body) = s.request(
        "PUT",
        &format!("/v1/chunks/{}", chunk.id.to_hex()),
        Some(&token),
        &chunk.bytes,
    );
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let ask: Vec<u8> = (0..64).flat_map(|_| *chunk.id.as_bytes()).collect();
    let (code, _, body) = s.request("POST", "/v1/chunks/get", Some(&token), &ask);
    assert_eq!(code, 200);
    assert_eq!(
        body.len(),
        4 + chunk.bytes.len(),
        "64 copies of one id must be answered with one chunk"
    );
    assert_eq!(&body[4..], &chunk.bytes[..]);
}

#[test]
fn metrics_need_an_administrators_token() {
    let s = Server::start(&[]);
    let (code, _, _) = s.request("GET", "/metrics", None, b"");
    assert_eq!(code, 401);
    let alice = s.token("alice");
    let (code, _, body) = s.request("GET", "/metrics", Some(&alice), b"");
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(kind(&body), "forbidden");
    let root = s.token("root");
    let (code, _, body) = s.request("GET", "/metrics", Some(&root), b"");
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("mbank_chunks_dedup_total"));
}

#[test]
fn a_commit_reusing_another_users_version_id_is_a_conflict() {
    let s = Server::start(&[]);
    // alice's version, imported on the bank's host (an all-zero disk: no chunks).
    let img = s.dir.parent().unwrap().join("zero.img");
    fs::write(&img, vec![0u8; 4 * MIB]).unwrap();
    let mut c = mbank();
    c.arg("--bank")
        .arg(&s.dir)
        .args(["-q", "import"])
        .arg("alice/m")
        .arg(&img);
    run_cmd(c).ok();
    let alice = s.token("alice");
    let (code, _, info) = s.request("GET", "/v1/machines/alice/m/resolve", Some(&alice), b"");
    assert_eq!(code, 200);
    let mut info: Value = serde_json::from_slice(&info).unwrap();
    let id = info["version"].as_str().unwrap().to_string();
    let (code, _, index) = s.request(
        "GET",
        &format!("/v1/machines/alice/m/versions/{id}/index"),
        Some(&alice),
        b"",
    );
    assert_eq!(code, 200);
    // bob commits a version of his own machine under alice's version id.
    info["machine"] = "bob/x".into();
    info["parent"] = Value::Null;
    let header = serde_json::json!({
        "info": info, "expected_head": null, "index_len": index.len(), "streams": []
    })
    .to_string();
    let mut body = (header.len() as u32).to_le_bytes().to_vec();
    body.extend_from_slice(header.as_bytes());
    body.extend_from_slice(&index);
    let bob = s.token("bob");
    let (code, _, answer) = s.request("POST", "/v1/machines/bob/x/versions", Some(&bob), &body);
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(kind(&answer), "version_exists");
    let msg = String::from_utf8_lossy(&answer);
    assert!(
        !msg.contains("alice"),
        "the answer names the other machine: {msg}"
    );
}
