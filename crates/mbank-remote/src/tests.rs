//! The client against a tiny scripted HTTP/1.1 server (std only): retries, error
//! mapping, batching, and the credentials file.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mbank_catalog::{CatalogApi, CatalogError, CommitOutcome, Lease, VersionInfo};
use mbank_core::{ChunkId, DiskIndex, MachineName, MemoryIndex, MemoryRun, VersionId};
use mbank_store::{ChunkStore, StoreError};

use crate::client::{Client, ClientError, ClientOptions};
use crate::credentials::{Credential, Credentials};
use crate::wire;
use crate::{RemoteCatalog, RemoteStore};

/// One request the server received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    /// Path and query.
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the script answers: status and body.
type Answer = (u16, Vec<u8>);

struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
}

impl Server {
    /// Serves `script(request, its number from 0)` on a fresh port, forever (the
    /// threads end with the test process).
    fn start(script: impl Fn(&Seen, usize) -> Answer + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let count = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let (s2, c2) = (seen.clone(), conns.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                c2.fetch_add(1, Ordering::SeqCst);
                let (seen, script, count) = (s2.clone(), script.clone(), count.clone());
                std::thread::spawn(move || {
                    let _ = serve_conn(conn, &seen, &*script, &count);
                });
            }
        });
        Server { url, seen, conns }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_conn(
    conn: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    script: &(dyn Fn(&Seen, usize) -> Answer + Send + Sync),
    count: &AtomicUsize,
) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').expect("a header line");
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        assert!(
            !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding")),
            "the test server reads only content-length bodies"
        );
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        let req = Seen {
            method,
            path,
            headers,
            body,
        };
        let n = count.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(req.clone());
        let (status, body) = script(&req, n);
        write!(
            out,
            "HTTP/1.1 {status} Whatever\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n",
            body.len()
        )?;
        out.write_all(&body)?;
        out.flush()?;
    }
}

fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

fn error(kind: &str, message: &str) -> Vec<u8> {
    json(serde_json::json!({"kind": kind, "message": message}))
}

fn client(url: &str, budget: Duration) -> Client {
    Client::with_options(
        url,
        ClientOptions {
            token: Some("mbt_test".into()),
            retry_budget: budget,
            ..ClientOptions::default()
        },
    )
    .unwrap()
}

fn lease() -> Lease {
    Lease {
        machine: "alice/dev".into(),
        session: "5e55".into(),
        station: "57a7".into(),
        station_name: "laptop:/var/cache/mbank".into(),
        pid: 4242,
        base: None,
        started_ms: 1_700_000_000_000,
        heartbeat_ms: 1_700_000_001_000,
    }
}

fn version() -> VersionInfo {
    VersionInfo {
        id: VersionId::random(),
        machine: "alice/dev".parse().unwrap(),
        parent: None,
        created_ms: 1,
        disk_size: 8192,
        chunk_size: 4096,
        stats: Default::default(),
        config: None,
        streams: vec!["memory".into()],
    }
}

#[test]
fn unavailable_twice_then_ok_is_retried() {
    let srv = Server::start(|_, n| {
        if n < 2 {
            (503, error("unavailable", "the bank is starting"))
        } else {
            (200, b"[]".to_vec())
        }
    });
    let cat = RemoteCatalog::new(client(&srv.url, Duration::from_secs(30)));
    let t = Instant::now();
    assert_eq!(cat.machines().unwrap(), vec![]);
    let seen = srv.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            ("GET", "/v1/machines")
        );
        assert_eq!(s.header("authorization"), Some("Bearer mbt_test"));
    }
    // Backoff 0.2 s then 0.4 s.
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn retries_stop_when_the_budget_is_spent() {
    let srv = Server::start(|_, _| (502, b"<html>bad gateway</html>".to_vec()));
    let cat = RemoteCatalog::new(client(&srv.url, Duration::from_millis(1000)));
    let e = cat.machines().unwrap_err();
    let CatalogError::Remote(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(msg.contains(&srv.url) && msg.contains("HTTP 502"), "{msg}");
    // 0.2 + 0.4 s of backoff fit in 1 s; 0.8 s more would not.
    assert_eq!(srv.seen().len(), 3, "{msg}");
}

#[test]
fn unauthorized_maps_to_unauthorized_naming_the_bank() {
    let srv = Server::start(|_, _| (401, error("unauthorized", "not logged in")));
    let cat = RemoteCatalog::new(client(&srv.url, Duration::from_secs(5)));
    let name: MachineName = "alice/dev".parse().unwrap();
    match cat.versions(&name) {
        Err(CatalogError::Unauthorized(m)) => {
            // The server's reason, and the command that gets a new token.
            assert_eq!(
                m,
                format!(
                    "not logged in; log in again with `mbank login {0} --user NAME` (bank {0})",
                    srv.url
                )
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.seen().len(), 1, "a 401 is not retried");
    assert_eq!(srv.seen()[0].path, "/v1/machines/alice/dev/versions");
}

#[test]
fn error_kinds_map_to_catalog_errors() {
    let srv = Server::start(|req, _| match req.path.as_str() {
        "/v1/machines/alice/gone" => (
            404,
            json(
                serde_json::json!({"kind": "machine_not_found", "message": "no machine alice/gone", "machine": "alice/gone"}),
            ),
        ),
        "/v1/machines/alice/dev/resolve?version=ab" => (
            409,
            json(
                serde_json::json!({"kind": "ambiguous_version", "message": "m", "machine": "alice/dev", "prefix": "ab", "count": 3}),
            ),
        ),
        "/v1/machines/alice/dev/resolve?version=cd" => (
            404,
            json(
                serde_json::json!({"kind": "version_not_found", "message": "m", "machine": "alice/dev", "prefix": "cd"}),
            ),
        ),
        "/v1/machines/alice/dev/resolve" => (
            404,
            json(serde_json::json!({"kind": "no_head", "message": "m", "machine": "alice/dev"})),
        ),
        _ => (500, b"oops".to_vec()),
    });
    let cat = RemoteCatalog::new(client(&srv.url, Duration::from_secs(5)));
    let dev: MachineName = "alice/dev".parse().unwrap();
    assert_eq!(cat.machine(&"alice/gone".parse().unwrap()).unwrap(), None);
    assert!(matches!(
        cat.resolve(&dev, Some("ab")),
        Err(CatalogError::AmbiguousVersion { count: 3, ref prefix, .. }) if prefix == "ab"
    ));
    assert!(matches!(
        cat.resolve(&dev, Some("cd")),
        Err(CatalogError::VersionNotFound { ref machine, ref prefix }) if machine == "alice/dev" && prefix == "cd"
    ));
    assert!(
        matches!(cat.resolve(&dev, None), Err(CatalogError::NoHead(ref m)) if m == "alice/dev")
    );
    // Not the API's JSON: described by its status, not retried.
    match cat.machine(&"alice/other".parse().unwrap()) {
        Err(CatalogError::Remote(m)) => assert_eq!(m, "HTTP 500 Internal Server Error: oops"),
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.seen().len(), 5);
}

#[test]
fn lease_held_carries_the_holder() {
    let held = lease();
    let body = json(serde_json::json!({
        "kind": "lease_held", "message": "alice/dev is in use", "lease": held,
    }));
    let srv = Server::start(move |_, _| (409, body.clone()));
    let mut cat = RemoteCatalog::new(client(&srv.url, Duration::from_secs(5)));
    let mut mine = lease();
    mine.session = "0ther".into();
    match cat.take_lease(&mine, Some("5e55")) {
        Err(CatalogError::LeaseHeld { machine, held: h }) => {
            assert_eq!(machine, "alice/dev");
            assert_eq!(*h, held);
        }
        other => panic!("{other:?}"),
    }
    let seen = srv.seen();
    assert_eq!(seen[0].method, "PUT");
    assert_eq!(seen[0].path, "/v1/machines/alice/dev/lease");
    let req: wire::LeaseRequest = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(req.lease, mine);
    assert_eq!(req.replace.as_deref(), Some("5e55"));
}

#[test]
fn commit_sends_the_framed_body() {
    let srv = Server::start(|req, _| {
        let (h, index, streams) = wire::parse_commit_body(&req.body).unwrap();
        assert_eq!(DiskIndex::from_bytes(index).unwrap().disk_size, 8192);
        assert_eq!(h.streams.len(), streams.len());
        (
            200,
            json(serde_json::json!({"outcome": {"Kept": {"head": null}}})),
        )
    });
    let mut cat = RemoteCatalog::new(client(&srv.url, Duration::from_secs(5)));
    let v = version();
    let id = ChunkId::of(b"x");
    let index = DiskIndex {
        chunk_size: 4096,
        disk_size: 8192,
        chunks: vec![Some(id), None],
    };
    let mem = MemoryIndex {
        total_len: 5,
        runs: vec![MemoryRun {
            id: Some(id),
            len: 5,
        }],
    };
    let out = cat
        .commit_version(&v, &index, &[("memory".into(), mem)], None)
        .unwrap();
    assert_eq!(out, CommitOutcome::Kept { head: None });
    let seen = srv.seen();
    assert_eq!(seen[0].path, "/v1/machines/alice/dev/versions");
    assert_eq!(
        seen[0].header("content-type"),
        Some("application/octet-stream")
    );
    let (h, _, s) = wire::parse_commit_body(&seen[0].body).unwrap();
    assert_eq!(h.info, v);
    assert_eq!(h.streams[0].0, "memory");
    assert_eq!(s.len(), 1);
}

#[test]
fn missing_chunk_maps_to_missing() {
    let id = ChunkId::of(b"absent");
    let srv = Server::start(move |req, _| {
        assert_eq!(req.path, format!("/v1/chunks/{}", id.to_hex()));
        (
            404,
            json(
                serde_json::json!({"kind": "chunk_not_found", "message": "no such chunk", "chunk": id}),
            ),
        )
    });
    let store = RemoteStore::new(client(&srv.url, Duration::from_secs(5))).with_direct_reads(false);
    assert!(matches!(store.get_raw(&id), Err(StoreError::Missing(m)) if m == id));
    assert!(matches!(store.read(&id), Err(StoreError::Missing(m)) if m == id));
}

#[test]
fn quota_message_reaches_the_user_verbatim() {
    let msg = "alice is over quota: 10 GiB used of 10 GiB, this chunk needs 64 KiB more; remove old versions or ask an administrator";
    let srv = Server::start(move |_, _| {
        (
            507,
            json(
                serde_json::json!({"kind": "quota_exceeded", "message": msg, "user": "alice", "used": 1, "quota": 1, "need": 1}),
            ),
        )
    });
    let store = RemoteStore::new(client(&srv.url, Duration::from_secs(5)));
    let chunk = mbank_core::chunk::encode(b"data", 3);
    match store.put(&chunk) {
        Err(e @ StoreError::Remote(_)) => {
            assert_eq!(e.to_string(), msg);
            assert!(!e.is_retryable());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.seen()[0].body, chunk.bytes);
    assert_eq!(srv.seen()[0].method, "PUT");
}

#[test]
fn touch_many_asks_in_batches() {
    let srv = Server::start(|req, _| {
        assert_eq!(req.path, "/v1/chunks/have");
        assert_eq!(req.body.len() % 32, 0);
        // Present: the ids whose first byte is even.
        let answer = req
            .body
            .chunks(32)
            .map(|id| id[0].is_multiple_of(2) as u8)
            .collect();
        (200, answer)
    });
    let store = RemoteStore::new(client(&srv.url, Duration::from_secs(5)));
    let ids: Vec<ChunkId> = (0..5000u32)
        .map(|i| ChunkId::of(&i.to_le_bytes()))
        .collect();
    let have = store.touch_many(&ids).unwrap();
    assert_eq!(have.len(), 5000);
    for (id, h) in ids.iter().zip(&have) {
        assert_eq!(*h, id.fanout().is_multiple_of(2));
    }
    let seen = srv.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body.len(), wire::MAX_HAVE * 32);
    assert_eq!(seen[1].body.len(), (5000 - wire::MAX_HAVE) * 32);
    assert_eq!(&seen[1].body[..32], ids[wire::MAX_HAVE].as_bytes());
    assert!(store.touch_many(&[]).unwrap().is_empty());
    assert_eq!(srv.seen().len(), 2, "no request for no ids");
    assert_eq!(
        store.touch(&ids[0]).unwrap(),
        ids[0].fanout().is_multiple_of(2)
    );
}

#[test]
fn a_short_have_answer_is_an_error() {
    let srv = Server::start(|_, _| (200, vec![1]));
    let store = RemoteStore::new(client(&srv.url, Duration::from_secs(5)));
    let ids = [ChunkId::of(b"a"), ChunkId::of(b"b")];
    let e = store.touch_many(&ids).unwrap_err();
    assert!(
        matches!(e, StoreError::Remote(ref m) if m.contains("1 bytes, expected 2")),
        "{e}"
    );
}

#[test]
fn a_dead_bank_fails_naming_its_url() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let cat = RemoteCatalog::new(client(&url, Duration::from_millis(500)));
    let t = Instant::now();
    let e = cat.machines().unwrap_err();
    let CatalogError::Remote(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(
        msg.starts_with(&format!("cannot reach the bank at {url}: ")),
        "{msg}"
    );
    assert!(msg.contains("tried 2 times"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let store = RemoteStore::new(client(&url, Duration::ZERO));
    let e = store.get_raw(&ChunkId::of(b"x")).unwrap_err();
    assert!(
        matches!(&e, StoreError::Remote(m) if m.contains(&url) && m.contains("tried once")),
        "{e}"
    );
}

#[test]
fn bad_urls_and_ca_files_are_refused() {
    assert!(Client::with_options("ftp://x", ClientOptions::default()).is_err());
    assert!(Client::with_options("/srv/bank", ClientOptions::default()).is_err());
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    std::fs::write(&pem, "not a certificate").unwrap();
    let o = ClientOptions {
        ca_file: Some(pem.clone()),
        ..ClientOptions::default()
    };
    match Client::with_options("https://bank:8443", o) {
        Err(ClientError::Local(m)) => assert!(m.contains("ca.pem"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(crate::is_url("HTTPS://bank"));
    assert!(!crate::is_url("./http:"));
}

#[test]
fn writers_and_sessions_use_their_endpoints() {
    let srv = Server::start(|req, _| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/writers") => (
            200,
            json(
                serde_json::json!({"id": 7, "started_ms": 1, "heartbeat_ms": 1, "pid": 9, "host": "h", "what": "import"}),
            ),
        ),
        ("POST", "/v1/writers/7/heartbeat") | ("DELETE", "/v1/writers/7") => (204, vec![]),
        ("DELETE", "/v1/machines/alice/dev/lease?session=5e55") => {
            (200, json(serde_json::json!({"released": true})))
        }
        ("GET", "/v1/machines/alice/dev/lease") => (200, b"null".to_vec()),
        _ => (
            400,
            error(
                "bad_request",
                &format!("unexpected {} {}", req.method, req.path),
            ),
        ),
    });
    let cat = RemoteCatalog::new(client(&srv.url, Duration::from_secs(5)));
    let w = cat.register_writer(9, "h", "import").unwrap();
    assert_eq!(w.id, 7);
    cat.heartbeat(7).unwrap();
    cat.unregister_writer(7).unwrap();
    let dev: MachineName = "alice/dev".parse().unwrap();
    assert!(cat.release_lease(&dev, "5e55").unwrap());
    assert_eq!(cat.lease(&dev).unwrap(), None);
    let again = cat.reopen().unwrap();
    assert_eq!(again.lease(&dev).unwrap(), None);
    assert_eq!(srv.seen().len(), 6);
    // Kept alive: one connection served them all (the clones share one pool).
    assert_eq!(srv.conns.load(Ordering::SeqCst), 1);
}

#[test]
fn credentials_file_is_private_and_round_trips() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir
        .path()
        .join("cfg")
        .join("mbank")
        .join("credentials.json");
    let mut c = Credentials::load_from(&path).unwrap();
    assert!(c.banks.is_empty());
    let cred = Credential {
        token: "mbt_abc_def".into(),
        user: "alice".into(),
        expires_ms: i64::MAX,
        ca: Some("/etc/mbank/ca.pem".into()),
    };
    c.set("https://bank:8443/", cred.clone());
    c.save().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    let back = Credentials::load_from(&path).unwrap();
    assert_eq!(back.get("https://bank:8443"), Some(&cred));
    assert!(!cred.expired());
    let mut back = back;
    assert_eq!(back.remove("https://bank:8443"), Some(cred));
    back.save().unwrap();
    assert!(Credentials::load_from(&path).unwrap().banks.is_empty());
    assert_eq!(mode(&path), 0o600);
    // Nothing left behind but the file.
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
    std::fs::write(&path, "{not json").unwrap();
    assert!(matches!(
        Credentials::load_from(&path),
        Err(ClientError::Local(m)) if m.contains("damaged")
    ));
}

/// A self-signed CA (P-256), for checking that a PEM file is taken.
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBhzCCAS2gAwIBAgIUOXkcJN4udffwf96sAqXH/g8LRb4wCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNbWJhbmsgdGVzdCBDQTAgFw0yNjEyMDMwNzAwNDZaGA8yMTI2
MTEwOTA3MDA0NlowGDEWMBQGA1UEAwwNbWJhbmsgdGVzdCBDQTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABMF8m9jrV9iY4k0oZ+Xw9l1JoxvECIknV8GCLh9c1AJw
TPKl++ScOKNLbCGB+yK/K912ktbCi5zCfQR7qOzVkAyjUzBRMB0GA1UdDgQWBBT2
W61jiPaNd0xbxiukL9fsHKhYdDAfBgNVHSMEGDAWgBT2W61jiPaNd0xbxiukL9fs
HKhYdDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQDUEWasUETA
JeQwWDMMb8LVZOTHaAzskjaiLtUYiOmsVQIgILwB0WiUFQqa9DTVIMoBzeZ71TwF
ohkU3N2AnfHx4Ls=
-----END CERTIFICATE-----
";

#[test]
fn a_pem_ca_file_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    std::fs::write(&pem, TEST_CA).unwrap();
    let o = ClientOptions {
        ca_file: Some(pem),
        ..ClientOptions::default()
    };
    let c = Client::with_options("https://bank.example:8443/", o).unwrap();
    assert_eq!(c.url(), "https://bank.example:8443");
}

#[test]
fn the_environment_token_wins_over_the_file() {
    let srv = Server::start(|_, _| (200, b"[]".to_vec()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials.json");
    let mut creds = Credentials::load_from(&path).unwrap();
    creds.set(
        &srv.url,
        Credential {
            token: "filed".into(),
            user: "alice".into(),
            expires_ms: 0,
            ca: None,
        },
    );
    creds.save().unwrap();
    // The token each way of connecting sends.
    let sent = |env: Option<&str>, file: &std::path::Path, url: &str| {
        let c = crate::connect_with(url, None, env, Some(file), ClientOptions::default()).unwrap();
        RemoteCatalog::new(c).machines().unwrap();
        srv.seen()
            .last()
            .unwrap()
            .header("authorization")
            .map(str::to_string)
    };
    let with_slash = format!("{}/", srv.url);
    assert_eq!(
        sent(None, &path, &with_slash).as_deref(),
        Some("Bearer filed")
    );
    assert_eq!(
        sent(Some(" mbt_env "), &path, &srv.url).as_deref(),
        Some("Bearer mbt_env")
    );
    assert_eq!(
        sent(Some(""), &path, &srv.url).as_deref(),
        Some("Bearer filed")
    );
    assert_eq!(sent(None, &dir.path().join("nope.json"), &srv.url), None);
}

#[test]
fn clients_and_adapters_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Client>();
    send_sync::<RemoteStore>();
    send_sync::<RemoteCatalog>();
}

#[test]
fn a_tls_failure_is_not_retried() {
    // A peer that answers a TLS hello with plain HTTP.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let t = Instant::now();
    let e = client(&url, Duration::from_secs(30)).health().unwrap_err();
    assert!(
        matches!(&e, ClientError::Unreachable { tries: 1, .. }),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// `n` small distinct chunks, encoded as the bank stores them.
fn some_chunks(n: usize) -> Vec<mbank_core::chunk::EncodedChunk> {
    (0..n)
        .map(|i| mbank_core::chunk::encode(format!("chunk number {i}").repeat(50).as_bytes(), 3))
        .collect()
}

/// The answer to a `POST /v1/chunks/get` naming ids of `chunks`: their frames, at most
/// `most` of them.
fn get_answer(chunks: &[mbank_core::chunk::EncodedChunk], body: &[u8], most: usize) -> Vec<u8> {
    let frames: Vec<&[u8]> = body
        .chunks_exact(ChunkId::LEN)
        .take(most)
        .map(|b| {
            let id = ChunkId::from_bytes(b.try_into().unwrap());
            &chunks.iter().find(|c| c.id == id).unwrap().bytes[..]
        })
        .collect();
    wire::chunks_answer(frames)
}

#[test]
fn read_many_keeps_several_batch_requests_in_flight() {
    // The server holds every answer back until it has 4 requests open at once (or 10 s
    // passed, after which it answers at once): a client that asks one batch at a time
    // is seen with one open, whatever the timing.
    const WANT: usize = 4;
    let chunks = Arc::new(some_chunks(4 * wire::MAX_GET_MANY));
    let gate = Arc::new((
        Mutex::new((0usize, 0usize, false)),
        std::sync::Condvar::new(),
    ));
    let (c2, g2) = (chunks.clone(), gate.clone());
    let server = Server::start(move |req, _| {
        assert_eq!(req.path, "/v1/chunks/get");
        let (lock, cv) = &*g2;
        let mut g = lock.lock().unwrap();
        g.0 += 1;
        g.1 = g.1.max(g.0);
        cv.notify_all();
        let until = Instant::now() + Duration::from_secs(10);
        while g.0 < WANT && !g.2 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                g.2 = true; // open for good: the test fails below, quickly
                break;
            }
            g = cv.wait_timeout(g, left).unwrap().0;
        }
        g.2 = true;
        g.0 -= 1;
        (200, get_answer(&c2, &req.body, usize::MAX))
    });
    let store =
        RemoteStore::new(client(&server.url, Duration::from_secs(5))).with_direct_reads(false);
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    let plains = store.read_many(&ids).unwrap();
    for (c, p) in chunks.iter().zip(&plains) {
        assert_eq!(ChunkId::of(p), c.id);
    }
    let peak = gate.0.lock().unwrap().1;
    assert!(
        peak >= WANT,
        "the server saw at most {peak} batch requests open at once; the client should keep {WANT} in flight"
    );
}

#[test]
fn answers_are_handed_over_as_they_stream_in() {
    // One connection, answered by hand: the first chunk's frame, then nothing until the
    // client has handed that chunk over (or 10 s pass), then the second.
    let chunks = some_chunks(2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let frames: Vec<Vec<u8>> = chunks
        .iter()
        .map(|c| wire::chunks_answer([&c.bytes[..]]))
        .collect();
    let h2 = handed.clone();
    let server = std::thread::spawn(move || -> bool {
        let (conn, _) = listener.accept().unwrap();
        let mut out = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if let Some((k, v)) = h.trim_end().split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
            if h.trim_end().is_empty() {
                break;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let total = frames[0].len() + frames[1].len();
        write!(out, "HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n").unwrap();
        out.write_all(&frames[0]).unwrap();
        out.flush().unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while !h2.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let streamed = h2.load(Ordering::SeqCst);
        out.write_all(&frames[1]).unwrap();
        out.flush().unwrap();
        streamed
    });
    let store = RemoteStore::new(client(&url, Duration::from_secs(5))).with_direct_reads(false);
    let ids = [chunks[0].id, chunks[1].id];
    let got = Mutex::new(Vec::new());
    store
        .read_each(&ids, 1, &|i, plain| {
            assert_eq!(ChunkId::of(&plain), ids[i]);
            got.lock().unwrap().push(i);
            handed.store(true, Ordering::SeqCst);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(*got.lock().unwrap(), [0, 1]);
    assert!(
        server.join().unwrap(),
        "the first chunk was handed over only after the whole answer arrived"
    );
}

#[test]
fn a_short_answer_is_followed_by_a_request_for_the_rest() {
    // The server answers one chunk per request (as its byte cap does for large chunks);
    // a repeated id is asked once and handed over at each of its places.
    let chunks = Arc::new(some_chunks(5));
    let c2 = chunks.clone();
    let server = Server::start(move |req, _| (200, get_answer(&c2, &req.body, 1)));
    let store =
        RemoteStore::new(client(&server.url, Duration::from_secs(5))).with_direct_reads(false);
    let mut ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    ids.push(chunks[2].id);
    let got: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    store
        .read_each(&ids, 1, &|i, plain| {
            assert_eq!(ChunkId::of(&plain), ids[i]);
            got.lock().unwrap().push(i);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    let mut got = got.into_inner().unwrap();
    got.sort();
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);
    let asked: Vec<usize> = server
        .seen()
        .iter()
        .map(|s| s.body.len() / ChunkId::LEN)
        .collect();
    assert_eq!(
        asked,
        [5, 4, 3, 2, 1],
        "each request asks for what is still missing"
    );
}

/// Where the scripted object store of the direct-read tests serves chunk `id` in the
/// `generation`th answer to a URL query.
fn object_url(base: &str, id: &ChunkId, generation: usize) -> String {
    format!("{base}/object/{}?gen={generation}", id.to_hex())
}

#[test]
fn direct_reads_ask_again_once_then_read_through_the_server() {
    // Chunk 0's first URL is expired (403), its second works; chunk 1's object answers
    // with bytes that do not verify, every time; chunk 2 gets no URL (hidden or absent).
    // The scripted server is also the object store.
    let chunks = Arc::new(some_chunks(3));
    let c2 = chunks.clone();
    let base = Arc::new(Mutex::new(String::new()));
    let b2 = base.clone();
    let queries = Arc::new(AtomicUsize::new(0));
    let q2 = queries.clone();
    let server = Server::start(move |req, _| {
        let base = b2.lock().unwrap().clone();
        if req.path == "/v1/chunks/urls" {
            let generation = q2.fetch_add(1, Ordering::SeqCst);
            let urls: Vec<Option<String>> = req
                .body
                .chunks_exact(ChunkId::LEN)
                .map(|b| {
                    let id = ChunkId::from_bytes(b.try_into().unwrap());
                    (id != c2[2].id).then(|| object_url(&base, &id, generation))
                })
                .collect();
            return (
                200,
                json(serde_json::json!({"valid_secs": 300, "urls": urls})),
            );
        }
        if let Some(rest) = req.path.strip_prefix("/object/") {
            let (hex, generation) = rest.split_once("?gen=").unwrap();
            let id: ChunkId = hex.parse().unwrap();
            return match (id == c2[0].id, generation) {
                (true, "0") => (403, b"<Error><Code>AccessDenied</Code></Error>".to_vec()),
                (true, _) => (200, c2[0].bytes.clone()),
                // Another chunk's bytes under chunk 1's name.
                _ => (200, c2[0].bytes.clone()),
            };
        }
        assert_eq!(req.path, "/v1/chunks/get");
        (200, get_answer(&c2, &req.body, usize::MAX))
    });
    *base.lock().unwrap() = server.url.clone();
    let store = RemoteStore::new(client(&server.url, Duration::from_secs(5)));
    let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
    let plains = store.read_many(&ids).unwrap();
    for (c, p) in chunks.iter().zip(&plains) {
        assert_eq!(ChunkId::of(p), c.id);
    }
    assert_eq!(store.direct_reads(), Some(true));
    let seen = server.seen();
    let paths: Vec<&str> = seen
        .iter()
        .map(|s| s.path.split('?').next().unwrap())
        .collect();
    let urls: Vec<usize> = seen
        .iter()
        .filter(|s| s.path == "/v1/chunks/urls")
        .map(|s| s.body.len() / ChunkId::LEN)
        .collect();
    assert_eq!(
        urls,
        [3, 2],
        "URLs for all, then fresh ones once for the two that failed: {paths:?}"
    );
    let through: Vec<Vec<u8>> = seen
        .iter()
        .filter(|s| s.path == "/v1/chunks/get")
        .map(|s| s.body.clone())
        .collect();
    let want: Vec<u8> = [ids[1], ids[2]]
        .iter()
        .flat_map(|id| *id.as_bytes())
        .collect();
    assert_eq!(
        through,
        [want],
        "chunks 1 and 2 come through the server: {paths:?}"
    );
    // A single read takes the same way.
    assert_eq!(ChunkId::of(&store.read(&ids[0]).unwrap()), ids[0]);
}

#[test]
fn a_bank_without_direct_urls_is_asked_once() {
    // A bank on a directory (404), and an older server whose `/v1/chunks/{id}` takes no
    // POST (405).
    for (status, kind) in [(404, wire::NO_DIRECT_READS), (405, "bad_request")] {
        let chunks = Arc::new(some_chunks(4));
        let c2 = chunks.clone();
        let server = Server::start(move |req, _| {
            if req.path == "/v1/chunks/urls" {
                return (status, error(kind, "no direct URLs here"));
            }
            if let Some(hex) = req.path.strip_prefix("/v1/chunks/")
                && let Ok(id) = hex.parse::<ChunkId>()
            {
                return (200, c2.iter().find(|c| c.id == id).unwrap().bytes.clone());
            }
            (200, get_answer(&c2, &req.body, usize::MAX))
        });
        let store = RemoteStore::new(client(&server.url, Duration::from_secs(5)));
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        for _ in 0..2 {
            let plains = store.read_many(&ids).unwrap();
            for (c, p) in chunks.iter().zip(&plains) {
                assert_eq!(ChunkId::of(p), c.id);
            }
        }
        assert_eq!(ChunkId::of(&store.read(&ids[1]).unwrap()), ids[1]);
        assert_eq!(store.direct_reads(), Some(false), "after a {status}");
        let asked = server
            .seen()
            .iter()
            .filter(|s| s.path == "/v1/chunks/urls")
            .count();
        assert_eq!(asked, 1, "after a {status}");
    }
}

#[test]
fn direct_uploads_put_to_the_urls_confirm_and_send_the_failures_through_the_server() {
    // Three chunks: the object store takes the first and the third, and fails the
    // second (503), which then goes through `POST /v1/chunks`; the confirmation names
    // the two uploaded, each with the SHA-256 it was put with.
    let chunks = Arc::new(some_chunks(3));
    let c2 = chunks.clone();
    let base = Arc::new(Mutex::new(String::new()));
    let b2 = base.clone();
    let server = Server::start(move |req, _| {
        let base = b2.lock().unwrap().clone();
        match req.path.as_str() {
            "/v1/chunks/upload-urls" => {
                let list = wire::parse_upload_list(&req.body).unwrap();
                let urls: Vec<String> = list
                    .iter()
                    .map(|u| format!("{base}/staged/{}", u.id.to_hex()))
                    .collect();
                (
                    200,
                    json(serde_json::json!({"valid_secs": 300, "urls": urls})),
                )
            }
            "/v1/chunks/confirm" => {
                let list = wire::parse_upload_list(&req.body).unwrap();
                let sizes: Vec<u64> = list.iter().map(|_| 7).collect();
                (200, json(serde_json::json!({ "bytes": sizes })))
            }
            "/v1/chunks" => (200, json(serde_json::json!({"bytes": [9]}))),
            p if p.starts_with("/staged/") => {
                let id: ChunkId = p["/staged/".len()..].parse().unwrap();
                let c = c2.iter().find(|c| c.id == id).unwrap();
                let sum = mbank_store::base64(&mbank_store::sha256(&c.bytes));
                assert_eq!(req.header(mbank_store::CHECKSUM_HEADER), Some(sum.as_str()));
                assert_eq!(req.body, c.bytes);
                if id == c2[1].id {
                    (503, b"<Error><Code>SlowDown</Code></Error>".to_vec())
                } else {
                    (200, Vec::new())
                }
            }
            other => panic!("unexpected request to {other}"),
        }
    });
    *base.lock().unwrap() = server.url.clone();
    let store = RemoteStore::new(client(&server.url, Duration::from_secs(5)));
    let sizes = store.put_many(&chunks).unwrap();
    assert_eq!(sizes, [7, 9, 7]);
    assert_eq!(store.direct_writes(), Some(true));
    let seen = server.seen();
    let confirm = seen
        .iter()
        .find(|s| s.path == "/v1/chunks/confirm")
        .unwrap();
    let want: Vec<wire::Upload> = [0, 2]
        .iter()
        .map(|&i| wire::Upload::of(chunks[i].id, &chunks[i].bytes))
        .collect();
    assert_eq!(wire::parse_upload_list(&confirm.body).unwrap(), want);
    let through = seen.iter().find(|s| s.path == "/v1/chunks").unwrap();
    assert_eq!(
        through.body,
        wire::batch_body([(&chunks[1].id, &chunks[1].bytes[..])])
    );
}

#[test]
fn a_bank_without_direct_uploads_takes_them_itself_and_is_asked_once() {
    let server = Server::start(|req, _| match req.path.as_str() {
        "/v1/chunks/upload-urls" => (404, error(wire::NO_DIRECT_WRITES, "not here")),
        "/v1/chunks" => (200, json(serde_json::json!({"bytes": [1, 1]}))),
        other => panic!("unexpected request to {other}"),
    });
    let store = RemoteStore::new(client(&server.url, Duration::from_secs(5)));
    let chunks = some_chunks(2);
    assert_eq!(store.put_many(&chunks).unwrap(), [1, 1]);
    assert_eq!(store.put_many(&chunks).unwrap(), [1, 1]);
    assert_eq!(store.direct_writes(), Some(false));
    let asked = server
        .seen()
        .iter()
        .filter(|s| s.path == "/v1/chunks/upload-urls")
        .count();
    assert_eq!(asked, 1);
}
