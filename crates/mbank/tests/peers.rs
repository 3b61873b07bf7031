//! LAN sharing (issue 17): stations fetch chunks from each other's caches (`mbank
//! peer`, `MBANK_PEERS`) under grants the bank server signs (`serve --lan-sharing`),
//! every chunk checked by its hash. A peer that lies, refuses or vanishes costs the
//! station nothing but the detour: the disk still reads right, from the bank.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{Bank, PlainServer};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn need(tools: &[&str]) {
    for t in tools {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{t} is missing: scripts/setup.sh installs it");
    }
}

/// A served bank with LAN sharing on, alice and bob logged in (each with a config
/// directory of their own).
struct Lab {
    server: PlainServer,
    url: String,
}

impl Lab {
    fn start() -> Lab {
        let server = PlainServer::start(
            &[
                ("alice", "alice-secret-1", false),
                ("bob", "bob-secret-22", false),
            ],
            &|_| {},
            &["--lan-sharing"],
        );
        let url = format!("http://127.0.0.1:{}", server.port);
        let lab = Lab { server, url };
        for (user, pw) in [("alice", "alice-secret-1"), ("bob", "bob-secret-22")] {
            let mut login = common::mbank();
            login.env("XDG_CONFIG_HOME", lab.config(user)).args([
                "login",
                &lab.url,
                "--user",
                user,
                "--password-stdin",
            ]);
            common::run_with_input(login, format!("{pw}\n").as_bytes()).ok();
        }
        lab
    }

    fn config(&self, user: &str) -> PathBuf {
        self.server.tmp.path().join(format!("config-{user}"))
    }

    /// `user`'s view of the bank from a station; `peers` its MBANK_PEERS.
    fn station(&self, user: &str, name: &str, peers: Option<&str>) -> (Bank, PathBuf) {
        let mut b = Bank::remote(
            &self.url,
            &self.server.tmp.path().join(format!("scratch-{name}")),
            &self.config(user),
        );
        if let Some(p) = peers {
            b.env.push(("MBANK_PEERS".into(), Some(p.into())));
            b.env
                .push(("MBANK_PEER_TIMEOUT_MS".into(), Some("3000".into())));
        }
        let cache = self.server.tmp.path().join(format!("cache-{name}"));
        (b, cache)
    }

    fn token(&self, user: &str) -> String {
        let f = self.config(user).join("mbank/credentials.json");
        let v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        fn find(v: &Value) -> Option<String> {
            match v {
                Value::Object(m) => m
                    .get("token")
                    .and_then(|t| t.as_str().map(String::from))
                    .or_else(|| m.values().find_map(find)),
                Value::Array(a) => a.iter().find_map(find),
                _ => None,
            }
        }
        find(&v).expect("a token in the credentials file")
    }
}

/// `mbank peer` on station cache `cache`, killed when dropped.
struct PeerService {
    child: Child,
    addr: String,
}

impl PeerService {
    fn start(lab: &Lab, cache: &Path) -> PeerService {
        let mut c = common::mbank();
        c.env("XDG_CONFIG_HOME", lab.config("alice"))
            .args(["--bank", &lab.url, "--cache"])
            .arg(cache)
            .args(["peer", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("mbank peer said {line:?}"))
            .to_string();
        PeerService { child, addr }
    }

    fn stats(&self) -> Value {
        let out = common::tool(
            "curl",
            &["-sS", &format!("http://{}/v1/peer/stats", self.addr)],
        );
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

impl Drop for PeerService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl: (status, body).
fn curl(method: &str, url: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut args = vec![
        "-sS".to_string(),
        "-o".into(),
        "-".into(),
        "-w".into(),
        "\n%{http_code}".into(),
        "-X".into(),
        method.into(),
        "-H".into(),
        "Content-Type: application/json".into(),
        "--data-binary".into(),
        body.into(),
        url.into(),
    ];
    if let Some(t) = token {
        args.extend(["-H".into(), format!("Authorization: Bearer {t}")]);
    }
    let r = common::tool("curl", &args);
    let (b, code) = r.stdout.rsplit_once('\n').expect("a status line");
    (code.trim().parse().unwrap(), b.to_string())
}

/// Reads alice/dev through `mbank attach` on `cache` with qemu-img compare against
/// `img` (every byte); returns attach's JSON report and its standard error.
fn read_all(bank: &Bank, cache: &Path, img: &Path) -> (Value, String) {
    let mut a = bank.attach(cache, "alice/dev", &["--json"]);
    let r = common::compare_raw(img, &a.uri());
    assert!(r.success(), "the disk read through attach differs:\n{r}");
    let done = a.stop();
    assert!(done.success(), "attach:\n{done}");
    let j: Value =
        serde_json::from_str(done.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", done.stdout));
    (j, done.stderr)
}

/// A fake peer on a free port: answers every request with `answer(request body)`
/// (raw bytes after the status line and headers it writes itself), until dropped.
fn fake_peer(answer: fn(&[u8], &mut std::net::TcpStream)) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            answer(&body, &mut s);
        }
    });
    addr
}

/// The first chunk id a peer request asks for.
fn first_asked(body: &[u8]) -> [u8; 32] {
    let v: Value = serde_json::from_slice(body).unwrap();
    let hex = v["chunks"][0].as_str().unwrap();
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

#[test]
fn a_station_reads_a_disk_from_a_peers_cache_and_every_chunk_checks() {
    need(&["qemu-img", "curl"]);
    let lab = Lab::start();
    let (a, cache_a) = lab.station("alice", "a", None);
    // Half random, half text-like: the peer sends the text half compressed.
    let mut img = common::random_bytes(4 * MIB, 7);
    let text: Vec<u8> = (0..)
        .flat_map(|k| format!("line {k:08} of a class starting one base\n").into_bytes())
        .take(2 * MIB)
        .collect();
    img[2 * MIB..].copy_from_slice(&text);
    let img_path = a.scratch.join("disk.raw");
    std::fs::write(&img_path, &img).unwrap();
    a.import("alice/dev", &img_path, &[]);
    // Station A reads the disk: its cache holds it.
    let (ja, _) = read_all(&a, &cache_a, &img_path);
    assert!(
        ja["stats"]["chunks_fetched"].as_u64().unwrap() >= 64,
        "{ja}"
    );
    let peer = PeerService::start(&lab, &cache_a);

    // Station B, its cache empty, reads it through A.
    let (b, cache_b) = lab.station("alice", "b", Some(&peer.addr));
    let (jb, _) = read_all(&b, &cache_b, &img_path);
    let fetched = jb["stats"]["chunks_fetched"].as_u64().unwrap();
    let st = peer.stats();
    assert!(fetched >= 64, "{jb}");
    assert_eq!(
        st["chunks_served"].as_u64().unwrap(),
        fetched,
        "every chunk B fetched came from A: {st}, {jb}"
    );
    // In the bank's stored form: the text half costs next to nothing.
    let served = st["bytes_served"].as_u64().unwrap();
    assert!(
        served < (2 * MIB + MIB / 2) as u64,
        "the peer sent {served} bytes for 2 MiB of random and 2 MiB of text: {st}"
    );

    // bob gets no grant over alice's chunks: the same answer as for chunks nobody has.
    let cache_file = std::fs::read_dir(cache_a.join("chunks"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .find(|n| n.len() == 64)
        .expect("a cached chunk");
    let grant = |user: &str, id: &str| {
        let (code, body) = curl(
            "POST",
            &format!("{}/v1/peers/grant", lab.url),
            Some(&lab.token(user)),
            &format!(r#"{{"chunks":["{id}"]}}"#),
        );
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let nobody = "ab".repeat(32);
    assert_eq!(
        grant("bob", &cache_file)["granted"],
        serde_json::json!([false])
    );
    assert_eq!(grant("bob", &nobody)["granted"], serde_json::json!([false]));
    let mine = grant("alice", &cache_file);
    assert_eq!(mine["granted"], serde_json::json!([true]));

    // The peer serves only against a valid grant that names the chunk.
    let ask = |g: &Value, id: &str| {
        curl(
            "POST",
            &format!("http://{}/v1/peer/chunks", peer.addr),
            None,
            &format!(
                r#"{{"grant":"{}","sig":"{}","chunks":["{id}"]}}"#,
                g["grant"].as_str().unwrap(),
                g["sig"].as_str().unwrap()
            ),
        )
    };
    let (code, body) = ask(&grant("bob", &cache_file), &cache_file);
    assert_eq!(code, 403, "bob's grant does not name alice's chunk: {body}");
    assert!(body.contains("not in the grant"), "{body}");
    let mut forged = mine.clone();
    let sig = forged["sig"].as_str().unwrap().to_string();
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    forged["sig"] = Value::from(format!("{flipped}{}", &sig[1..]));
    let (code, body) = ask(&forged, &cache_file);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("signature"), "{body}");
    let (code, _) = ask(&mine, &cache_file);
    assert_eq!(code, 200);
    assert!(peer.stats()["refused"].as_u64().unwrap() >= 2);
}

#[test]
fn a_lying_or_vanishing_peer_is_skipped_and_the_disk_reads_right() {
    need(&["qemu-img", "curl"]);
    let lab = Lab::start();
    let (a, _) = lab.station("alice", "a", None);
    let img = common::random_bytes(2 * MIB, 9);
    let img_path = a.scratch.join("disk.raw");
    std::fs::write(&img_path, &img).unwrap();
    a.import("alice/dev", &img_path, &[]);

    // A peer that answers the first chunk asked with a well-formed chunk of other
    // bytes.
    let liar = fake_peer(|body, s| {
        let id = first_asked(body);
        let junk = mbank_core::chunk::encode(&[0x5a; 65536], 3).bytes;
        let mut b = Vec::new();
        b.extend_from_slice(&id);
        b.extend_from_slice(&(junk.len() as u32).to_le_bytes());
        b.extend_from_slice(&junk);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
            b.len()
        );
        let _ = s.write_all(&b);
    });
    let (b, cache_b) = lab.station("alice", "b", Some(&liar));
    let (_, err) = read_all(&b, &cache_b, &img_path);
    assert!(
        err.contains(&format!("peer http://{liar} is skipped"))
            && err.contains("content hash mismatch"),
        "{err}"
    );

    // A peer that promises a long answer and hangs up halfway.
    let gone = fake_peer(|_, s| {
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        let _ = s.write_all(&[1u8; 5000]);
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    let (c, cache_c) = lab.station("alice", "c", Some(&gone));
    let (_, err) = read_all(&c, &cache_c, &img_path);
    assert!(
        err.contains(&format!("peer http://{gone} is skipped")),
        "{err}"
    );

    // A peer address where nothing listens.
    let nothing = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (d, cache_d) = lab.station("alice", "d", Some(&nothing));
    let (_, err) = read_all(&d, &cache_d, &img_path);
    assert!(err.contains("is skipped"), "{err}");
}

/// With two peers holding the disk, a station's requests go to both in turn, not all
/// to the first it names.
#[test]
fn a_station_spreads_its_asking_over_several_peers() {
    need(&["qemu-img", "curl"]);
    let lab = Lab::start();
    let (a, cache_a) = lab.station("alice", "a", None);
    let img = common::random_bytes(4 * MIB, 11);
    let img_path = a.scratch.join("disk.raw");
    std::fs::write(&img_path, &img).unwrap();
    a.import("alice/dev", &img_path, &[]);
    read_all(&a, &cache_a, &img_path);
    let (c, cache_c) = lab.station("alice", "c", None);
    read_all(&c, &cache_c, &img_path);
    let p1 = PeerService::start(&lab, &cache_a);
    let p2 = PeerService::start(&lab, &cache_c);
    let (b, cache_b) = lab.station("alice", "b", Some(&format!("{},{}", p1.addr, p2.addr)));
    let (jb, _) = read_all(&b, &cache_b, &img_path);
    let fetched = jb["stats"]["chunks_fetched"].as_u64().unwrap();
    let (s1, s2) = (p1.stats(), p2.stats());
    let (n1, n2) = (
        s1["chunks_served"].as_u64().unwrap(),
        s2["chunks_served"].as_u64().unwrap(),
    );
    assert_eq!(
        n1 + n2,
        fetched,
        "every chunk came from a peer: {s1} {s2} {jb}"
    );
    assert!(n1 > 0 && n2 > 0, "both peers served: {s1} {s2}");
}
