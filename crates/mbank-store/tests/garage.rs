//! The S3 store against a real Garage cluster: three nodes on 127.0.0.1, replication
//! factor 3, started by `scripts/garage.sh` in a temp dir. Builds Garage first when it
//! is not cached yet (`scripts/garage.sh install`), so this test never skips.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use mbank_core::ChunkId;
use mbank_core::chunk::{DEFAULT_ZSTD_LEVEL, EncodedChunk, encode};
use mbank_store::{ChunkStore, Retry, S3Config, S3Store, StoreError};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/garage.sh")
}

fn garage(args: &[&str]) -> String {
    let out = Command::new(script()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "garage.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running cluster; stopped when dropped, even when the test fails.
struct Cluster {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

impl Cluster {
    fn start() -> Self {
        garage(&["install"]);
        let dir = tempfile::tempdir().unwrap();
        let out = garage(&["start", dir.path().to_str().unwrap()]);
        let env = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect();
        Cluster { dir, env }
    }

    fn node(&self, verb: &str, n: u32) {
        garage(&[verb, self.dir.path().to_str().unwrap(), &n.to_string()]);
    }

    fn config(&self, endpoints: Vec<String>) -> S3Config {
        S3Config::new(
            endpoints,
            &self.env["GARAGE_REGION"],
            &self.env["GARAGE_BUCKET"],
            &self.env["AWS_ACCESS_KEY_ID"],
            &self.env["AWS_SECRET_ACCESS_KEY"],
        )
    }

    fn store(&self) -> S3Store {
        let eps = self.env["GARAGE_ENDPOINTS"]
            .split_whitespace()
            .map(String::from)
            .collect();
        S3Store::new(self.config(eps)).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", self.dir.path().to_str().unwrap()])
            .status();
    }
}

/// A TCP proxy in front of one node that counts the connections open through it at
/// once: a client keeps one connection per request in flight.
struct Proxy {
    addr: std::net::SocketAddr,
    peak: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(endpoint: &str) -> Proxy {
        let upstream = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (o, p) = (open.clone(), peak.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                let o = o.clone();
                std::thread::spawn(move || {
                    let (mut c2, mut s2) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let up = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut s2);
                        let _ = s2.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut s1, mut c1) = (server, client);
                    let _ = std::io::copy(&mut s1, &mut c1);
                    let _ = c1.shutdown(std::net::Shutdown::Both);
                    let _ = up.join();
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Proxy { addr, peak }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// Incompressible bytes (xorshift), so the object is stored in Garage's data blocks
/// rather than inline in its metadata.
fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn chunk(s: &str) -> EncodedChunk {
    encode(&s.repeat(500).into_bytes(), DEFAULT_ZSTD_LEVEL)
}

/// One cluster for every check: starting one costs seconds.
#[test]
fn s3_store_on_a_three_node_garage_cluster() {
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1} s  {what}", t0.elapsed().as_secs_f64());
    let cluster = Cluster::start();
    phase("cluster started");
    let store = cluster.store();
    store.check().unwrap();

    // Wrong credentials: a clear error at once (not retried), naming the endpoint.
    let mut wrong = cluster.config(vec![cluster.env["GARAGE_ENDPOINT_2"].clone()]);
    wrong.secret_access_key = "0".repeat(64);
    let msg = S3Store::new(wrong)
        .unwrap()
        .check()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("HTTP 403"), "{msg}");
    assert!(msg.contains(&cluster.env["GARAGE_ENDPOINT_2"]), "{msg}");
    assert!(!msg.contains("tries"), "{msg}");

    // Round trip.
    let a = chunk("alpha");
    let b = encode(b"beta", DEFAULT_ZSTD_LEVEL);
    assert!(!store.touch(&a.id).unwrap(), "touch of a missing chunk");
    assert_eq!(store.put(&a).unwrap(), a.bytes.len() as u64);
    store.put(&b).unwrap();
    store.put(&a).unwrap(); // the same chunk twice is harmless
    store.flush().unwrap();
    assert!(store.touch(&a.id).unwrap(), "touch of a present chunk");
    assert_eq!(store.read(&a.id).unwrap(), "alpha".repeat(500).into_bytes());
    assert_eq!(store.read(&b.id).unwrap(), b"beta");
    let missing = ChunkId::of(b"never stored");
    assert!(matches!(store.read(&missing), Err(StoreError::Missing(_))));
    let s = store.stats().unwrap();
    assert_eq!(
        (s.chunks, s.bytes),
        (2, (a.bytes.len() + b.bytes.len()) as u64)
    );
    let big = encode(&noise(256 << 10, 7), DEFAULT_ZSTD_LEVEL);
    store.put(&big).unwrap();
    assert!(
        store.touch(&big.id).unwrap(),
        "touch of a chunk in data blocks"
    );
    assert_eq!(store.read(&big.id).unwrap(), noise(256 << 10, 7));

    phase("round trip");

    // A damaged object is detected on read, moved under corrupt/, and repaired by a put.
    let c = chunk("precious");
    let mut bad = c.clone();
    let last = bad.bytes.len() - 1;
    bad.bytes[last] ^= 0xff;
    store.put(&bad).unwrap();
    let err = store.read(&c.id).unwrap_err();
    match &err {
        StoreError::Corrupt {
            moved_to: Some(p), ..
        } => assert!(
            p.to_str().unwrap().starts_with("s3://mbank/corrupt/"),
            "{err}"
        ),
        other => panic!("expected a quarantined corrupt chunk, got {other}"),
    }
    assert!(err.to_string().contains(&c.id.to_hex()));
    assert!(
        !store.touch(&c.id).unwrap(),
        "the damaged chunk is out of chunks/"
    );
    assert_eq!(store.stats().unwrap().chunks, 3, "corrupt/ is not counted");
    store.put(&c).unwrap();
    assert_eq!(
        store.read(&c.id).unwrap(),
        "precious".repeat(500).into_bytes()
    );

    phase("corrupt object");

    // Sweep: only unreferenced chunks older than the cutoff go; touch protects.
    let old = chunk("old and unreferenced");
    let touched = chunk("old but touched");
    store.put(&old).unwrap();
    store.put(&touched).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let cutoff = SystemTime::now();
    std::thread::sleep(Duration::from_millis(50));
    let new = chunk("new and unreferenced");
    store.put(&new).unwrap();
    assert!(store.touch(&touched.id).unwrap());
    let referenced = [a.id, b.id, c.id, big.id];
    let s = store
        .sweep(cutoff, &|id: &ChunkId| referenced.contains(id))
        .unwrap();
    assert_eq!(
        (s.chunks_kept, s.chunks_too_new, s.chunks_deleted),
        (4, 2, 1),
        "{s:?}"
    );
    assert_eq!(s.bytes_deleted, old.bytes.len() as u64);
    assert!(!store.touch(&old.id).unwrap());
    for id in [a.id, b.id, c.id, big.id, touched.id, new.id] {
        assert!(store.touch(&id).unwrap(), "{id} survived the sweep");
    }

    phase("sweep");

    // One node down (the store's first endpoint): reads and writes go on.
    cluster.node("stop-node", 1);
    phase("node 1 stopped");
    let d = chunk("written while node 1 is down");
    store.put(&d).unwrap();
    phase("put with node 1 down");
    assert_eq!(
        store.read(&d.id).unwrap(),
        "written while node 1 is down".repeat(500).into_bytes()
    );
    assert_eq!(store.read(&a.id).unwrap(), "alpha".repeat(500).into_bytes());
    assert!(store.touch(&b.id).unwrap());
    // A listing comes from a read quorum of replicas, each filtering deleted objects on
    // its own: one that has not heard of the sweep's delete yet shows the object for a
    // moment (reads of the object itself are consistent), so the count is waited for.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = store.stats().unwrap().chunks;
        if n == 7 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the store still lists {n} chunks, not 7, a minute after the sweep"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    phase("one node down");

    // A store that can reach no node says which endpoint and object it gave up on.
    let dead = cluster.env["GARAGE_ENDPOINT_1"].clone();
    let mut cfg = cluster.config(vec![dead.clone()]);
    cfg.retry = Retry {
        attempts: 3,
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
    };
    let lonely = S3Store::new(cfg).unwrap();
    let msg = lonely.get_raw(&a.id).unwrap_err().to_string();
    assert!(msg.contains(&dead), "{msg}");
    assert!(msg.contains(&S3Store::chunk_key(&a.id)), "{msg}");
    assert!(msg.contains("3 tries"), "{msg}");

    phase("no node reachable");

    // The node comes back and serves again.
    cluster.node("start-node", 1);
    phase("node 1 healthy again");
    let back = S3Store::new(cluster.config(vec![dead])).unwrap();
    assert_eq!(back.read(&d.id).unwrap().len(), 500 * 28);
    phase("node back");

    // A batch read keeps several GETs in flight (each is a round trip to a node), and
    // hands the chunks over in order, a missing one as its error in its place.
    let batch: Vec<EncodedChunk> = (0..48)
        .map(|i| encode(&noise(8 << 10, 100 + i), DEFAULT_ZSTD_LEVEL))
        .collect();
    for c in &batch {
        store.put(c).unwrap();
    }
    let proxy = Proxy::start(&cluster.env["GARAGE_ENDPOINT_1"]);
    let through = S3Store::new(cluster.config(vec![proxy.url()])).unwrap();
    let ids: Vec<ChunkId> = batch.iter().map(|c| c.id).collect();
    let raws = through.get_raw_many(&ids).unwrap();
    assert!(
        raws.iter().zip(&batch).all(|(r, c)| *r == c.bytes),
        "a batch read returns each chunk's stored bytes, in order"
    );
    let peak = proxy.peak();
    assert!(
        peak >= 4,
        "a batch read of {} chunks had at most {peak} connection(s) open at once: its \
         GETs went one after another",
        ids.len()
    );
    let mut asked = ids.clone();
    asked.insert(5, missing);
    let mut seen = Vec::new();
    through.get_raw_each(&asked, &mut |i, r| {
        seen.push((i, r.map(|raw| raw.len()).map_err(|e| e.to_string())));
        if i == 20 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    });
    assert_eq!(
        seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..=20).collect::<Vec<_>>(),
        "handed over in order, until asked to stop"
    );
    assert!(
        seen[5].1.as_ref().is_err_and(|e| e.contains("missing")),
        "{:?}",
        seen[5]
    );
    assert!(seen.iter().filter(|(_, r)| r.is_err()).count() == 1);
    // Lengths from ranged reads of the headers, also many at once.
    assert_eq!(
        through.plain_len_many(&ids).unwrap(),
        vec![8 << 10; ids.len()]
    );
    assert_eq!(through.plain_len(&big.id).unwrap(), 256 << 10);
    assert!(matches!(
        through.plain_len_many(&asked),
        Err(StoreError::Missing(id)) if id == missing
    ));
    drop(through);
    drop(proxy);

    phase("batch reads");
    // A batch goes up in parallel: every chunk there, sizes in order.
    let batch: Vec<_> = (0..40u64)
        .map(|i| encode(&noise(4096 + i as usize * 7, 100 + i), DEFAULT_ZSTD_LEVEL))
        .collect();
    let sizes = store.put_many(&batch).unwrap();
    assert_eq!(
        sizes,
        batch
            .iter()
            .map(|c| c.bytes.len() as u64)
            .collect::<Vec<_>>()
    );
    let ids: Vec<_> = batch.iter().map(|c| c.id).collect();
    assert!(store.touch_many(&ids).unwrap().iter().all(|h| *h));
    assert_eq!(store.read(&ids[39]).unwrap(), noise(4096 + 39 * 7, 139));
}

/// Prefix locks every host sees (the test's stand-in for PostgreSQL's advisory locks):
/// the test holds a prefix exclusively as another host's sweep would; shared takers
/// wait.
#[derive(Default)]
struct Gate {
    held: std::sync::Mutex<std::collections::HashSet<u8>>,
    freed: std::sync::Condvar,
    waiting: AtomicUsize,
    exclusive_taken: AtomicUsize,
}

impl Gate {
    fn hold(&self, f: u8) {
        self.held.lock().unwrap().insert(f);
    }
    fn release(&self, f: u8) {
        self.held.lock().unwrap().remove(&f);
        self.freed.notify_all();
    }
}

struct GateLocks(Arc<Gate>);

impl mbank_store::PrefixLocks for GateLocks {
    fn lock(
        &self,
        fanout: u8,
        exclusive: bool,
    ) -> Result<Box<dyn std::any::Any + Send>, StoreError> {
        if exclusive {
            self.0.exclusive_taken.fetch_add(1, Ordering::SeqCst);
            return Ok(Box::new(()));
        }
        let mut held = self.0.held.lock().unwrap();
        self.0.waiting.fetch_add(1, Ordering::SeqCst);
        while held.contains(&fanout) {
            held = self.0.freed.wait(held).unwrap();
        }
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        Ok(Box::new(()))
    }
}

/// Two hosts' stores of one bucket (their own lock directories) with shared prefix
/// locks: a touch waits while another host sweeps the chunk's prefix, and a sweep
/// takes the prefixes it deletes from exclusively.
#[test]
fn touches_wait_for_another_hosts_sweep_of_their_prefix() {
    let cluster = Cluster::start();
    let gate = Arc::new(Gate::default());
    let eps: Vec<String> = cluster.env["GARAGE_ENDPOINTS"]
        .split_whitespace()
        .map(String::from)
        .collect();
    let host = |n: &str| {
        let mut cfg = cluster.config(eps.clone());
        cfg.lock_dir = Some(cluster.dir.path().join(format!("locks-{n}")));
        cfg.prefix_locks = Some(mbank_store::SharedPrefixLocks(Arc::new(GateLocks(
            gate.clone(),
        ))));
        Arc::new(S3Store::new(cfg).unwrap())
    };
    let (a, b) = (host("a"), host("b"));
    let c = chunk("held prefix");
    a.put(&c).unwrap();
    let f = c.id.fanout();
    gate.hold(f);
    let b2 = b.clone();
    let id = c.id;
    let touch = std::thread::spawn(move || b2.touch(&id));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while gate.waiting.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the touch never asked for the lock"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !touch.is_finished(),
        "the touch went on under the other host's sweep"
    );
    gate.release(f);
    assert!(touch.join().unwrap().unwrap(), "the chunk is there");
    // A sweep that deletes takes its prefix exclusively.
    let gone = chunk("to be swept");
    b.put(&gone).unwrap();
    let later = SystemTime::now() + Duration::from_secs(3600);
    let s = a.sweep(later, &|id| *id != gone.id).unwrap();
    assert!(s.chunks_deleted >= 1, "{s:?}");
    assert!(gate.exclusive_taken.load(Ordering::SeqCst) >= 1);
}
