//! [`S3Store`]: chunks as objects in an S3-compatible bucket, built and tested against
//! Garage (a 3-node cluster with replication factor 3, `scripts/garage.sh`).
//!
//! ## Layout
//!
//! ```text
//! chunks/ab/<64 hex digits>   one chunk, in the format of mbank_core::chunk
//! corrupt/<hex>.<ms>          chunks found damaged and moved aside
//! uploads/<64 hex digits>     a chunk uploaded by a presigned PUT, named by the
//!                             SHA-256 of its bytes, until the bank verified it
//! ```
//!
//! ## The client, and why
//!
//! A blocking HTTP client ([`ureq`], with rustls for `https://` endpoints) and a small
//! hand-written AWS Signature V4 signer (`sha2` + `hmac`), about 150 lines here. The
//! [`ChunkStore`] trait is synchronous and called from worker threads, so a blocking
//! client fits it as is. The alternatives cost more for less:
//! `object_store` brings an async stack (tokio runtime, reqwest, hyper, chrono,
//! quick-xml, serde) that we would drive through a private runtime, and its copy has no
//! way to say `x-amz-metadata-directive: REPLACE`, which `touch` needs;
//! `reqwest::blocking` runs a hidden tokio runtime thread and pulls hyper for the same
//! few requests. We use six S3 calls (PUT, GET (also of a byte range), DELETE, PUT
//! with a copy source, ListObjectsV2, and nothing else), all path-style, so the signer and a tolerant
//! reader of the list XML are all the protocol we need. The body hash is signed
//! (`x-amz-content-sha256`), so the server rejects a body damaged on the way.
//!
//! ## Durability: `flush` is a no-op
//!
//! A `put` returns only after the server acknowledged the PUT. Garage acknowledges a
//! write when a quorum of the nodes holding it (2 of 3 with replication factor 3) have
//! stored it, and with `data_fsync` and `metadata_fsync` set (as `scripts/garage.sh`
//! does; a production cluster must set them too) that means on disk on two nodes. So
//! every chunk is durable and visible to every client when `put` returns, and there is
//! nothing left for `flush` to do.
//!
//! ## No conditional requests
//!
//! Garage ignores `If-None-Match` / `If-Match`, so nothing here relies on them. Chunks
//! are named by their content, so two writers storing one chunk at once store the same
//! bytes and either may win.
//!
//! ## GC (the scheme in the crate docs)
//!
//! `touch` copies the object onto itself with `x-amz-metadata-directive: REPLACE`;
//! Garage then writes a new object version with a new timestamp (checked in Garage's
//! `copy.rs`: same-key copies are supported and get `now_msec()`; the data blocks are
//! shared, not copied), which the listing reports as `LastModified`. A 404 says the
//! chunk is absent. `sweep` lists every chunk once; each fan-out prefix holding a chunk
//! that `keep` rejects and whose `LastModified` is older than the cutoff is then listed
//! again under that prefix's lock (below), and what still qualifies is deleted.
//!
//! What the local store gets from `flock` (a touch and a sweep of the same fan-out
//! directory never interleave) we get from one lock per fan-out prefix: `touch` holds
//! it shared, `sweep` exclusive. Inside one `S3Store` it is an `RwLock`; across
//! processes it is also an `flock` on `lock_dir/<ab>.lock` when [`S3Config::lock_dir`]
//! is set, which a bank sets to `<bank>/locks`: every writer and GC of a bank runs on
//! the bank's host (its catalog is there), so the server, `mbank gc` and local imports
//! exclude each other. A bank served from several hosts (its catalog in PostgreSQL)
//! also sets [`S3Config::prefix_locks`], locks every host sees (PostgreSQL's advisory
//! locks), taken after the file's. Without either, two processes running a writer and
//! a GC on one bucket are *not* protected against a touch landing between the listing
//! and the delete; S3 offers no conditional delete to close that gap.
//!
//! Timestamps come from the Garage nodes' clocks and the cutoff from the bank's: keep
//! them synchronised (NTP); the scheme's 1 s margin covers small skew.
//!
//! ## Many reads at once
//!
//! Each read is a round trip to a node (tens of ms on a busy Garage), so the batch reads
//! keep several in flight: `get_raw_each` (which the bank server streams a batch get
//! from) and `get_raw_many` run up to 16 GETs on as many threads, at most 16 chunks
//! ahead of the one handed over next, and hand the chunks over in order;
//! `plain_len_many` (a commit's length check) does the same with ranged GETs of the
//! 16-byte header. `touch_many` runs 16 copies at once.
//!
//! ## Failures
//!
//! Connection errors, timeouts, 5xx and 429 answers are retried with exponential
//! backoff; each retry moves to the next endpoint, so a store given every node's
//! endpoint keeps working while one node is down. After the last try the error names
//! the endpoint, bucket and key, the number of tries and the last cause.

use std::fmt::Write as _;
use std::io::Read;
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use mbank_core::ChunkId;
use mbank_core::chunk::{self, EncodedChunk, HEADER_LEN, MAX_STORED_LEN};
use sha2::{Digest, Sha256};
use ureq::http;

use crate::{ChunkStore, StoreError, StoreStats, SweepStats};

const CHUNK_PREFIX: &str = "chunks/";
const CORRUPT_PREFIX: &str = "corrupt/";
/// Chunks uploaded by presigned PUTs, named by the SHA-256 of their bytes, until the
/// bank verified them ([`crate::Staging`]).
const UPLOAD_PREFIX: &str = "uploads/";

/// How often and how patiently to retry transient failures.
#[derive(Clone, Debug)]
pub struct Retry {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// Wait before the second try; doubled for each further one.
    pub first_backoff: Duration,
    /// The longest wait between two tries.
    pub max_backoff: Duration,
}

impl Default for Retry {
    /// 8 tries over about 6 s.
    fn default() -> Self {
        Retry {
            attempts: 8,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Where the bucket is and how to sign in.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// Base URLs of the S3 API, e.g. `http://127.0.0.1:3900`; one per node is best.
    pub endpoints: Vec<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub retry: Retry,
    /// Longest time one request may take, connecting included.
    pub request_timeout: Duration,
    /// A local directory for one lock file per fan-out prefix, so that touches and
    /// sweeps exclude each other across processes on this host (the bank's host: the
    /// server, `mbank gc`, imports). `None`: within this process only.
    pub lock_dir: Option<PathBuf>,
    /// Locks of the fan-out prefixes that other hosts of the bank see too (a bank whose
    /// catalog is in PostgreSQL, served from several hosts), taken besides `lock_dir`'s.
    pub prefix_locks: Option<crate::SharedPrefixLocks>,
}

impl S3Config {
    /// A configuration with default retries and timeouts.
    pub fn new(
        endpoints: Vec<String>,
        region: &str,
        bucket: &str,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Self {
        S3Config {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            region: region.into(),
            bucket: bucket.into(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            retry: Retry::default(),
            request_timeout: Duration::from_secs(60),
            lock_dir: None,
            prefix_locks: None,
        }
    }
}

/// A fan-out prefix's cross-process locks, released when dropped.
struct PrefixHeld(
    #[allow(dead_code)] Option<std::fs::File>,
    #[allow(dead_code)] Option<Box<dyn std::any::Any + Send>>,
);

/// Parallel requests of one [`ChunkStore::touch_many`].
const TOUCH_THREADS: usize = 16;

/// GETs in flight for one [`ChunkStore::get_raw_each`] (and `get_raw_many`): also how
/// far the reads run ahead of the consumer, so what one call holds is at most this
/// many chunks.
const GET_WINDOW: usize = 16;

/// A chunk store in an S3 bucket. See the module docs.
pub struct S3Store {
    cfg: S3Config,
    agent: ureq::Agent,
    /// Index of the endpoint to use next; moves on after a transient failure.
    preferred: AtomicUsize,
    /// Touch (shared) against sweep (exclusive), one lock per fan-out prefix.
    fanout_locks: Vec<RwLock<()>>,
}

/// One answer from the server.
struct Reply {
    /// The endpoint that answered.
    endpoint: String,
    status: u16,
    body: Vec<u8>,
    /// The object's whole length, from `Content-Range` (an answer to a ranged GET).
    whole_len: Option<u64>,
}

/// What to send.
struct Req<'a> {
    method: &'a str,
    key: &'a str,
    query: Vec<(&'a str, String)>,
    headers: Vec<(&'a str, String)>,
    body: Option<&'a [u8]>,
    /// Read at most this many bytes of the answer.
    limit: u64,
}

impl<'a> Req<'a> {
    fn new(method: &'a str, key: &'a str) -> Self {
        Req {
            method,
            key,
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
            limit: 1 << 20,
        }
    }
}

impl S3Store {
    /// A store over the bucket in `cfg`. Makes no request; see [`S3Store::check`].
    pub fn new(cfg: S3Config) -> Result<Self, StoreError> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::io(
                "open S3 store",
                format!("s3://{}", cfg.bucket),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no endpoint given"),
            ));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(cfg.request_timeout))
            .timeout_connect(Some(Duration::from_secs(3)))
            .max_redirects(0)
            .build()
            .new_agent();
        Ok(S3Store {
            cfg,
            agent,
            preferred: AtomicUsize::new(0),
            fanout_locks: (0..256).map(|_| RwLock::new(())).collect(),
        })
    }

    /// Checks that the bucket answers and the credentials work (one small listing).
    pub fn check(&self) -> Result<(), StoreError> {
        self.holds_chunks().map(|_| ())
    }

    /// Whether the bucket holds any chunk (one small listing, which also checks as
    /// [`S3Store::check`] does). A new bank refuses a bucket that does.
    pub fn holds_chunks(&self) -> Result<bool, StoreError> {
        let mut r = Req::new("GET", "");
        r.query = vec![
            ("list-type", "2".into()),
            ("max-keys", "1".into()),
            ("prefix", CHUNK_PREFIX.into()),
        ];
        let reply = self.send("list", &r)?;
        self.expect_ok("list", "", &reply)?;
        Ok(!xml_blocks(&reply.body_str(), "Contents").is_empty())
    }

    /// The object key of chunk `id`.
    /// The cross-process locks of one fan-out prefix (held until dropped): the lock
    /// directory's file on this host, then the locks every host sees, when the store
    /// has them.
    fn lock_file(&self, fanout: u8, exclusive: bool) -> Result<PrefixHeld, StoreError> {
        let file = match &self.cfg.lock_dir {
            None => None,
            Some(d) => {
                if !d.is_dir() {
                    std::fs::create_dir_all(d)
                        .map_err(|e| StoreError::io("create the lock directory", d, e))?;
                }
                Some(crate::flock_path(
                    &d.join(format!("{fanout:02x}.lock")),
                    true,
                    exclusive,
                )?)
            }
        };
        let shared = match &self.cfg.prefix_locks {
            None => None,
            Some(l) => Some(l.0.lock(fanout, exclusive)?),
        };
        Ok(PrefixHeld(file, shared))
    }

    pub fn chunk_key(id: &ChunkId) -> String {
        format!("{CHUNK_PREFIX}{:02x}/{}", id.fanout(), id.to_hex())
    }

    /// Sends `r`, retrying transient failures (see the module docs).
    fn send(&self, action: &'static str, r: &Req<'_>) -> Result<Reply, StoreError> {
        let n = self.cfg.endpoints.len();
        let started = Instant::now();
        let mut backoff = self.cfg.retry.first_backoff;
        let mut last = String::new();
        let mut endpoint = String::new();
        let attempts = self.cfg.retry.attempts.max(1);
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(self.cfg.retry.max_backoff);
            }
            let idx = self.preferred.load(Ordering::Relaxed) % n;
            endpoint.clone_from(&self.cfg.endpoints[idx]);
            match self.send_once(&endpoint, r) {
                Ok(reply) if reply.status >= 500 || reply.status == 429 => {
                    last = format!(
                        "HTTP {}{}",
                        reply.status,
                        error_code(&reply.body)
                            .map(|c| format!(" {c}"))
                            .unwrap_or_default()
                    );
                }
                Ok(reply) => return Ok(reply),
                Err(e) => last = e.to_string(),
            }
            // Try another node next time (and from now on).
            let _ = self.preferred.compare_exchange(
                idx,
                (idx + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Err(StoreError::Io {
            action,
            path: PathBuf::from(format!("s3://{}/{} at {endpoint}", self.cfg.bucket, r.key)),
            source: std::io::Error::other(format!(
                "{last} (gave up after {attempts} tries in {:.1} s)",
                started.elapsed().as_secs_f64()
            )),
        })
    }

    fn send_once(&self, endpoint: &str, r: &Req<'_>) -> Result<Reply, ureq::Error> {
        let path = if r.key.is_empty() {
            format!("/{}", self.cfg.bucket)
        } else {
            format!("/{}/{}", self.cfg.bucket, r.key)
        };
        let canonical_path = uri_encode(&path, false);
        let mut query: Vec<(String, String)> = r
            .query
            .iter()
            .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
            .collect();
        query.sort();
        let query = query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let mut url = format!("{endpoint}{canonical_path}");
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        let host = endpoint
            .split_once("://")
            .map_or(endpoint, |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let body = r.body.unwrap_or_default();
        let payload_hash = hex(&Sha256::digest(body));
        let headers = sign(
            &self.cfg,
            SystemTime::now(),
            r.method,
            &canonical_path,
            &query,
            &host,
            &payload_hash,
            &r.headers,
        );
        let mut b = http::Request::builder().method(r.method).uri(&url);
        for (k, v) in &headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let mut resp = match r.body {
            Some(body) => self.agent.run(b.body(body)?)?,
            None => self.agent.run(b.body(())?)?,
        };
        let status = resp.status().as_u16();
        let whole_len = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|n| n.trim().parse().ok());
        let mut out = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(r.limit)
            .read_to_end(&mut out)
            .map_err(ureq::Error::Io)?;
        Ok(Reply {
            endpoint: endpoint.to_string(),
            status,
            body: out,
            whole_len,
        })
    }

    /// An error for an answer that is neither success nor an expected 404.
    fn unexpected(&self, action: &'static str, key: &str, reply: &Reply) -> StoreError {
        let code = error_code(&reply.body).unwrap_or_default();
        let message = xml_tag(&reply.body_str(), "Message").unwrap_or_default();
        let kind = match reply.status {
            401 | 403 => std::io::ErrorKind::PermissionDenied,
            404 => std::io::ErrorKind::NotFound,
            _ => std::io::ErrorKind::Other,
        };
        StoreError::Io {
            action,
            path: PathBuf::from(format!(
                "s3://{}/{key} at {}",
                self.cfg.bucket, reply.endpoint
            )),
            source: std::io::Error::new(
                kind,
                format!("HTTP {} {code} {message}", reply.status)
                    .trim()
                    .to_string(),
            ),
        }
    }

    fn expect_ok(&self, action: &'static str, key: &str, reply: &Reply) -> Result<(), StoreError> {
        if (200..300).contains(&reply.status) {
            Ok(())
        } else {
            Err(self.unexpected(action, key, reply))
        }
    }

    /// Copies `from` to `to` (a new version with a new timestamp). False when `from`
    /// does not exist.
    fn copy(&self, action: &'static str, from: &str, to: &str) -> Result<bool, StoreError> {
        let mut r = Req::new("PUT", to);
        r.headers = vec![
            (
                "x-amz-copy-source",
                uri_encode(&format!("/{}/{from}", self.cfg.bucket), false),
            ),
            ("x-amz-metadata-directive", "REPLACE".into()),
        ];
        let reply = self.send(action, &r)?;
        if reply.status == 404 {
            return Ok(false);
        }
        self.expect_ok(action, to, &reply)?;
        // S3 may report a failed copy in the body of a 200.
        if error_code(&reply.body).is_some() {
            return Err(self.unexpected(action, to, &reply));
        }
        Ok(true)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let reply = self.send("delete", &Req::new("DELETE", key))?;
        if reply.status == 404 {
            return Ok(());
        }
        self.expect_ok("delete", key, &reply)
    }

    /// Every object under `prefix`, in pages, to `each`.
    fn list(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(Listed) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut token: Option<String> = None;
        loop {
            let mut r = Req::new("GET", "");
            r.query = vec![("list-type", "2".into()), ("prefix", prefix.into())];
            if let Some(t) = &token {
                r.query.push(("continuation-token", t.clone()));
            }
            r.limit = 64 << 20;
            let reply = self.send("list", &r)?;
            self.expect_ok("list", prefix, &reply)?;
            let xml = reply.body_str();
            for block in xml_blocks(&xml, "Contents") {
                let (Some(key), Some(size), Some(modified)) = (
                    xml_tag(block, "Key"),
                    xml_tag(block, "Size").and_then(|s| s.parse().ok()),
                    xml_tag(block, "LastModified").and_then(|t| parse_rfc3339(&t)),
                ) else {
                    return Err(self.unexpected("understand the listing of", prefix, &reply));
                };
                each(Listed {
                    key,
                    size,
                    modified,
                })?;
            }
            let truncated = xml_tag(&xml, "IsTruncated").is_some_and(|t| t == "true");
            token = xml_tag(&xml, "NextContinuationToken");
            if !truncated || token.is_none() {
                return Ok(());
            }
        }
    }
}

struct Listed {
    key: String,
    size: u64,
    modified: SystemTime,
}

impl Reply {
    fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn chunk_of_key(key: &str) -> Option<ChunkId> {
    let rest = key.strip_prefix(CHUNK_PREFIX)?;
    let (fan, hex) = rest.split_once('/')?;
    let id: ChunkId = hex.parse().ok()?;
    (format!("{:02x}", id.fanout()) == fan).then_some(id)
}

/// Counts one listed chunk into `s`: kept, too new, or to delete.
fn tally(
    s: &mut SweepStats,
    id: &ChunkId,
    o: &Listed,
    cutoff: SystemTime,
    keep: &(dyn Fn(&ChunkId) -> bool + Sync),
) {
    if keep(id) {
        s.chunks_kept += 1;
    } else if o.modified >= cutoff {
        s.chunks_too_new += 1;
    } else {
        s.chunks_deleted += 1;
        s.bytes_deleted += o.size;
    }
}

/// Presigned uploads (see [`crate::Staging`]): the URL writes `uploads/<SHA-256 hex>`
/// and signs the headers `content-length` and `x-amz-checksum-sha256`, so the object
/// store takes only bytes of that length and digest (Garage answers anything else `400 InvalidDigest`). What lies under
/// that name can therefore never change once the bank read and verified it, and the
/// copy to the chunk's own name copies those bytes.
impl crate::Staging for S3Store {
    fn put_url(&self, sha256: &[u8; 32], len: u64, issued: SystemTime, valid: Duration) -> String {
        let n = self.cfg.endpoints.len();
        let endpoint = &self.cfg.endpoints[self.preferred.load(Ordering::Relaxed) % n];
        let path = format!("/{}/{}", self.cfg.bucket, staged_key(sha256));
        presign_request(
            &self.cfg,
            endpoint,
            "PUT",
            &path,
            issued,
            valid,
            &[
                ("content-length", len.to_string()),
                (crate::CHECKSUM_HEADER, crate::base64(sha256)),
            ],
        )
    }

    fn read_staged(&self, sha256: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = staged_key(sha256);
        let mut r = Req::new("GET", &key);
        r.limit = MAX_STORED_LEN as u64 + 1;
        let reply = self.send("read an upload", &r)?;
        if reply.status == 404 {
            return Ok(None);
        }
        self.expect_ok("read an upload", &key, &reply)?;
        Ok(Some(reply.body))
    }

    fn promote(&self, sha256: &[u8; 32], id: &ChunkId) -> Result<(), StoreError> {
        let staged = staged_key(sha256);
        if !self.copy("store an upload", &staged, &Self::chunk_key(id))? {
            return Err(StoreError::Missing(*id));
        }
        self.delete(&staged)
    }

    fn discard(&self, sha256: &[u8; 32]) -> Result<(), StoreError> {
        self.delete(&staged_key(sha256))
    }
}

/// `f` of each of `items`, in order, on up to [`TOUCH_THREADS`] threads, each taking a
/// run of them (one item: no thread); the first error.
fn split_parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, StoreError> + Sync,
) -> Result<Vec<R>, StoreError> {
    if items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    let per = items.len().div_ceil(TOUCH_THREADS);
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Result<Vec<R>, _>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for p in parts {
            out.extend(p.join().expect("a store thread panicked")?);
        }
        Ok(out)
    })
}

fn staged_key(sha256: &[u8; 32]) -> String {
    format!("{UPLOAD_PREFIX}{}", hex(sha256))
}

impl ChunkStore for S3Store {
    fn put(&self, chunk: &EncodedChunk) -> Result<u64, StoreError> {
        let key = Self::chunk_key(&chunk.id);
        let mut r = Req::new("PUT", &key);
        r.body = Some(&chunk.bytes);
        let reply = self.send("write chunk", &r)?;
        self.expect_ok("write chunk", &key, &reply)?;
        Ok(chunk.bytes.len() as u64)
    }

    /// Puts run in parallel ([`split_parallel`]): each is a round trip and a durable
    /// write on the store's nodes (a bank server stores an upload's batch so).
    fn put_many(&self, chunks: &[EncodedChunk]) -> Result<Vec<u64>, StoreError> {
        split_parallel(chunks, |c| self.put(c))
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every put is durable when it returns (module docs).
        Ok(())
    }

    fn touch(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let _shared = self.fanout_locks[usize::from(id.fanout())]
            .read()
            .expect("fan-out lock poisoned");
        let _shared_file = self.lock_file(id.fanout(), false)?;
        let key = Self::chunk_key(id);
        self.copy("touch chunk", &key, &key)
    }

    /// Touches run in parallel ([`split_parallel`]): each is a round trip (a copy of
    /// the object onto itself), and a fork or a server's `have` query asks about
    /// thousands.
    fn touch_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        split_parallel(ids, |id| self.touch(id))
    }

    fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let key = Self::chunk_key(id);
        let mut r = Req::new("GET", &key);
        // One byte past the bound, so the decoder's length checks catch an oversized
        // object without reading all of it.
        r.limit = MAX_STORED_LEN as u64 + 1;
        let reply = self.send("read chunk", &r)?;
        if reply.status == 404 {
            return Err(StoreError::Missing(*id));
        }
        self.expect_ok("read chunk", &key, &reply)?;
        Ok(reply.body)
    }

    fn staging(&self) -> Option<&dyn crate::Staging> {
        Some(self)
    }

    /// Presigned GETs of the chunks' objects at the endpoint in use (SigV4 query
    /// authentication, the host the only signed header); at most a week, as S3 allows.
    fn direct_urls(
        &self,
        ids: &[ChunkId],
        issued: SystemTime,
        valid: Duration,
    ) -> Option<Vec<String>> {
        let n = self.cfg.endpoints.len();
        let endpoint = &self.cfg.endpoints[self.preferred.load(Ordering::Relaxed) % n];
        Some(
            ids.iter()
                .map(|id| {
                    let path = format!("/{}/{}", self.cfg.bucket, Self::chunk_key(id));
                    presign(&self.cfg, endpoint, &path, issued, valid)
                })
                .collect(),
        )
    }

    /// GETs on up to [`GET_WINDOW`] threads, each taking the next place once the
    /// consumer is less than a window behind; answers are handed over in order.
    fn get_raw_each(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(usize, Result<Vec<u8>, StoreError>) -> ControlFlow<()>,
    ) {
        in_order_ahead(ids.len(), GET_WINDOW, &|i| self.get_raw(&ids[i]), each);
    }

    /// A ranged GET of the header (and the object's length from `Content-Range`).
    fn plain_len(&self, id: &ChunkId) -> Result<usize, StoreError> {
        let key = Self::chunk_key(id);
        let mut r = Req::new("GET", &key);
        r.headers = vec![("range", format!("bytes=0-{}", HEADER_LEN - 1))];
        // A server that ignores the range sends the whole object.
        r.limit = MAX_STORED_LEN as u64 + 1;
        let reply = self.send("read the header of chunk", &r)?;
        if reply.status == 404 {
            return Err(StoreError::Missing(*id));
        }
        self.expect_ok("read the header of chunk", &key, &reply)?;
        let whole = match (reply.status, reply.whole_len) {
            (206, Some(n)) => usize::try_from(n).unwrap_or(usize::MAX),
            _ => reply.body.len(),
        };
        chunk::parse_header_of(id, &reply.body, whole)
            .map(|(_, n)| n)
            .map_err(|source| StoreError::Corrupt {
                source,
                moved_to: None,
            })
    }

    fn plain_len_many(&self, ids: &[ChunkId]) -> Result<Vec<usize>, StoreError> {
        all_in_order(ids.len(), &|i| self.plain_len(&ids[i]))
    }

    fn get_raw_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
        all_in_order(ids.len(), &|i| self.get_raw(&ids[i]))
    }

    fn quarantine(&self, id: &ChunkId) -> Result<Option<PathBuf>, StoreError> {
        let key = Self::chunk_key(id);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let to = format!("{CORRUPT_PREFIX}{}.{ms}", id.to_hex());
        if !self.copy("move damaged chunk aside", &key, &to)? {
            return Ok(None);
        }
        self.delete(&key)?;
        Ok(Some(PathBuf::from(format!(
            "s3://{}/{to}",
            self.cfg.bucket
        ))))
    }

    fn sweep(
        &self,
        cutoff: SystemTime,
        keep: &(dyn Fn(&ChunkId) -> bool + Sync),
    ) -> Result<SweepStats, StoreError> {
        // Pass 1, without locks: one listing of every chunk, counted per fan-out prefix.
        let mut per: Vec<SweepStats> = vec![SweepStats::default(); 256];
        self.list(CHUNK_PREFIX, &mut |o| {
            if let Some(id) = chunk_of_key(&o.key) {
                tally(&mut per[usize::from(id.fanout())], &id, &o, cutoff, keep);
            }
            Ok(())
        })?;
        // Pass 2: each prefix with something to delete again, listed and swept under
        // its exclusive lock, so no touch lands between the listing and the delete.
        for (fanout, stats) in per.iter_mut().enumerate() {
            if stats.chunks_deleted == 0 {
                continue;
            }
            *stats = SweepStats::default();
            let _exclusive = self.fanout_locks[fanout]
                .write()
                .expect("fan-out lock poisoned");
            let _exclusive_file = self.lock_file(fanout as u8, true)?;
            let mut doomed = Vec::new();
            self.list(&format!("{CHUNK_PREFIX}{fanout:02x}/"), &mut |o| {
                if let Some(id) = chunk_of_key(&o.key) {
                    let before = stats.chunks_deleted;
                    tally(stats, &id, &o, cutoff, keep);
                    if stats.chunks_deleted > before {
                        doomed.push(o.key);
                    }
                }
                Ok(())
            })?;
            for key in doomed {
                self.delete(&key)?;
            }
        }
        // Uploads never verified (their writer gave up) once older than the cutoff.
        let mut stale = Vec::new();
        self.list(UPLOAD_PREFIX, &mut |o| {
            if o.modified < cutoff {
                stale.push(o.key);
            }
            Ok(())
        })?;
        for key in stale {
            self.delete(&key)?;
        }
        let mut s = SweepStats::default();
        for p in per {
            s.chunks_kept += p.chunks_kept;
            s.chunks_too_new += p.chunks_too_new;
            s.chunks_deleted += p.chunks_deleted;
            s.bytes_deleted += p.bytes_deleted;
        }
        Ok(s)
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut s = StoreStats::default();
        self.list(CHUNK_PREFIX, &mut |o| {
            if chunk_of_key(&o.key).is_some() {
                s.chunks += 1;
                s.bytes += o.size;
            }
            Ok(())
        })?;
        Ok(s)
    }
}

/// Runs `work(i)` for `i` in `0..n` on up to `window` threads, never more than `window`
/// places ahead of the last one handed over, and hands each result to `each` in order
/// on the calling thread. A [`ControlFlow::Break`] from `each` stops the threads before
/// their next place; results not yet handed over are dropped.
/// `work(0..n)` with [`GET_WINDOW`] in flight ([`in_order_ahead`]), collected in order;
/// the first error stops the rest.
fn all_in_order<T: Send>(
    n: usize,
    work: &(dyn Fn(usize) -> Result<T, StoreError> + Sync),
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::with_capacity(n);
    let mut failed = None;
    in_order_ahead(n, GET_WINDOW, work, &mut |_, r| match r {
        Ok(v) => {
            out.push(v);
            ControlFlow::Continue(())
        }
        Err(e) => {
            failed = Some(e);
            ControlFlow::Break(())
        }
    });
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn in_order_ahead<T: Send>(
    n: usize,
    window: usize,
    work: &(dyn Fn(usize) -> T + Sync),
    each: &mut dyn FnMut(usize, T) -> ControlFlow<()>,
) {
    struct State<T> {
        /// The next place a thread takes.
        next: usize,
        /// The next place to hand over.
        due: usize,
        done: std::collections::BTreeMap<usize, T>,
        stop: bool,
        /// A thread's work panicked: its place will never be done.
        lost: bool,
    }
    let window = window.max(1);
    let threads = window.min(n);
    if threads <= 1 {
        for i in 0..n {
            if each(i, work(i)).is_break() {
                return;
            }
        }
        return;
    }
    let state = Mutex::new(State {
        next: 0,
        due: 0,
        done: std::collections::BTreeMap::new(),
        stop: false,
        lost: false,
    });
    // Threads wait on `room` for the window to move; the consumer on `ready`.
    let (room, ready) = (Condvar::new(), Condvar::new());
    let lock = || state.lock().expect("read-ahead state poisoned");
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut st = lock();
                        while !st.stop && st.next < n && st.next >= st.due + window {
                            st = room.wait(st).expect("read-ahead state poisoned");
                        }
                        if st.stop || st.next >= n {
                            return;
                        }
                        st.next += 1;
                        st.next - 1
                    };
                    // A panic stops everyone (the consumer would wait for its place
                    // for ever) and is raised again when the scope joins.
                    let r = match catch_unwind(AssertUnwindSafe(|| work(i))) {
                        Ok(r) => r,
                        Err(e) => {
                            let mut st = lock();
                            (st.lost, st.stop) = (true, true);
                            drop(st);
                            ready.notify_one();
                            room.notify_all();
                            resume_unwind(e);
                        }
                    };
                    lock().done.insert(i, r);
                    ready.notify_one();
                }
            });
        }
        let handed = catch_unwind(AssertUnwindSafe(|| {
            for i in 0..n {
                let r = {
                    let mut st = lock();
                    loop {
                        if let Some(r) = st.done.remove(&i) {
                            st.due = i + 1;
                            break r;
                        }
                        if st.lost {
                            return;
                        }
                        st = ready.wait(st).expect("read-ahead state poisoned");
                    }
                };
                room.notify_all();
                if each(i, r).is_break() {
                    return;
                }
            }
        }));
        lock().stop = true;
        room.notify_all();
        if let Err(e) = handed {
            resume_unwind(e);
        }
    });
}

// ---- AWS Signature Version 4 -------------------------------------------------------

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Percent-encodes all but the unreserved characters (and `/` unless `slash`).
fn uri_encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !slash => out.push('/'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The headers to send (all signed): `host` is left to the client, which sends the
/// same value.
#[allow(clippy::too_many_arguments)]
fn sign(
    cfg: &S3Config,
    now: SystemTime,
    method: &str,
    canonical_path: &str,
    canonical_query: &str,
    host: &str,
    payload_hash: &str,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let (date, time) = utc(now);
    let amz_date = format!("{date}T{time}Z");
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), host.into()),
        ("x-amz-content-sha256".into(), payload_hash.into()),
        ("x-amz-date".into(), amz_date.clone()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string())),
    );
    headers.sort();
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical = format!("{method}\n{canonical_path}\n{canonical_query}\n");
    for (k, v) in &headers {
        let _ = writeln!(canonical, "{k}:{v}");
    }
    let _ = write!(canonical, "\n{signed}\n{payload_hash}");
    let scope = format!("{date}/{}/s3/aws4_request", cfg.region);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let k = hmac(format!("AWS4{}", cfg.secret_access_key).as_bytes(), &date);
    let k = hmac(&k, &cfg.region);
    let k = hmac(&k, "s3");
    let k = hmac(&k, "aws4_request");
    let signature = hex(&hmac(&k, &to_sign));
    headers.retain(|(k, _)| k != "host");
    headers.push((
        "authorization".into(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
            cfg.access_key_id
        ),
    ));
    headers
}

/// The longest validity S3 allows a presigned URL (`X-Amz-Expires`): 7 days.
const MAX_PRESIGNED: Duration = Duration::from_secs(7 * 24 * 3600);

/// A presigned GET URL of `path` (path-style: `/BUCKET/KEY`) at `endpoint`: SigV4
/// query-string authentication, the host the only signed header, the payload
/// unsigned, valid for `valid` (1 s to 7 days) from `issued`. The holder needs no key;
/// the object store refuses the URL once it expired (Garage: 400, AWS: 403) or if any part of it
/// was changed.
fn presign(
    cfg: &S3Config,
    endpoint: &str,
    path: &str,
    issued: SystemTime,
    valid: Duration,
) -> String {
    presign_request(cfg, endpoint, "GET", path, issued, valid, &[])
}

/// A presigned URL for `method` on `path`; `headers` (lower-case names) are signed
/// too, so the request must carry them with these values.
fn presign_request(
    cfg: &S3Config,
    endpoint: &str,
    method: &str,
    path: &str,
    issued: SystemTime,
    valid: Duration,
    headers: &[(&str, String)],
) -> String {
    let host = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let (date, time) = utc(issued);
    let amz_date = format!("{date}T{time}Z");
    let scope = format!("{date}/{}/s3/aws4_request", cfg.region);
    let secs = valid.clamp(Duration::from_secs(1), MAX_PRESIGNED).as_secs();
    let canonical_path = uri_encode(path, false);
    // The signed headers, host among them, sorted by name.
    let mut signed: Vec<(&str, &str)> = std::iter::once(("host", host))
        .chain(headers.iter().map(|(k, v)| (*k, v.as_str())))
        .collect();
    signed.sort();
    let names = signed.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(";");
    // Already in order: the canonical query sorts its names.
    let query = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".to_string()),
        ("X-Amz-Credential", format!("{}/{scope}", cfg.access_key_id)),
        ("X-Amz-Date", amz_date.clone()),
        ("X-Amz-Expires", secs.to_string()),
        ("X-Amz-SignedHeaders", names.clone()),
    ]
    .iter()
    .map(|(k, v)| format!("{}={}", uri_encode(k, true), uri_encode(v, true)))
    .collect::<Vec<_>>()
    .join("&");
    let mut canonical = format!("{method}\n{canonical_path}\n{query}\n");
    for (k, v) in &signed {
        let _ = writeln!(canonical, "{k}:{v}");
    }
    let _ = write!(canonical, "\n{names}\nUNSIGNED-PAYLOAD");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let k = hmac(format!("AWS4{}", cfg.secret_access_key).as_bytes(), &date);
    let k = hmac(&k, &cfg.region);
    let k = hmac(&k, "s3");
    let k = hmac(&k, "aws4_request");
    let signature = hex(&hmac(&k, &to_sign));
    format!("{endpoint}{canonical_path}?{query}&X-Amz-Signature={signature}")
}

// ---- dates ---------------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `("YYYYMMDD", "HHMMSS")` in UTC.
fn utc(t: SystemTime) -> (String, String) {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let s = secs.rem_euclid(86400);
    (
        format!("{y:04}{m:02}{d:02}"),
        format!("{:02}{:02}{:02}", s / 3600, s / 60 % 60, s % 60),
    )
}

/// Parses `2026-11-25T16:00:00.123Z` (what S3 listings carry).
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    let secs = days_from_civil(y, mo, da) * 86400 + h * 3600 + mi * 60 + se;
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

// ---- the little XML we read ------------------------------------------------------------

/// The inner texts of every `<tag>…</tag>` in `xml`, in order (no nesting of `tag`).
fn xml_blocks<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// The unescaped text of the first `<tag>` in `xml`.
fn xml_tag(xml: &str, tag: &str) -> Option<String> {
    xml_blocks(xml, tag).first().map(|s| {
        s.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&")
    })
}

/// The `<Code>` of an S3 error document, if `body` is one.
fn error_code(body: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(body);
    if !s.contains("<Error>") {
        return None;
    }
    xml_tag(&s, "Code")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results come in order whatever order the work ends in; no more than the window
    /// is in flight or waiting; a break stops the threads.
    #[test]
    fn in_order_ahead_keeps_order_and_its_window() {
        use std::sync::atomic::AtomicUsize;
        let (busy, peak, started) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let work = |i: usize| {
            started.fetch_add(1, Ordering::SeqCst);
            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            // Later places finish first within a window.
            std::thread::sleep(Duration::from_millis((8 - (i % 8)) as u64));
            busy.fetch_sub(1, Ordering::SeqCst);
            i * 10
        };
        let mut got = Vec::new();
        in_order_ahead(100, 8, &work, &mut |i, r| {
            got.push((i, r));
            ControlFlow::Continue(())
        });
        assert_eq!(got, (0..100).map(|i| (i, i * 10)).collect::<Vec<_>>());
        let p = peak.load(Ordering::SeqCst);
        assert!((2..=8).contains(&p), "{p} at once");

        started.store(0, Ordering::SeqCst);
        let mut n = 0;
        in_order_ahead(1000, 4, &work, &mut |i, _| {
            n += 1;
            if i == 9 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(n, 10);
        let s = started.load(Ordering::SeqCst);
        assert!(s <= 10 + 4, "{s} places started after a break at the 10th");
    }

    /// A panic in the work or in the consumer is raised to the caller, with the other
    /// threads stopped, rather than leaving the consumer or the threads waiting.
    #[test]
    fn in_order_ahead_raises_a_panic_rather_than_hanging() {
        let work = |i: usize| {
            assert!(i != 5, "work of place 5 failed");
            std::thread::sleep(Duration::from_millis(1));
            i
        };
        let r = std::panic::catch_unwind(|| {
            in_order_ahead(100, 4, &work, &mut |_, _| ControlFlow::Continue(()))
        });
        assert!(r.is_err(), "a panicking work item");
        let r = std::panic::catch_unwind(|| {
            in_order_ahead(100, 4, &|i| i, &mut |i, _| {
                assert!(i != 3, "the consumer failed at place 3");
                ControlFlow::Continue(())
            })
        });
        assert!(r.is_err(), "a panicking consumer");
    }

    #[test]
    fn dates_round_trip() {
        let t = parse_rfc3339("2026-11-25T16:03:04.125Z").unwrap();
        assert_eq!(
            utc(t),
            ("20261125".to_string(), "160304".to_string()),
            "{t:?}"
        );
        let since = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(since.subsec_millis(), 125);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00Z"),
            Some(UNIX_EPOCH + Duration::from_secs(951868800))
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    /// The example of AWS's SigV4 documentation ("GET Object", examplebucket).
    #[test]
    fn signature_matches_aws_example() {
        let cfg = S3Config::new(
            vec!["https://examplebucket.s3.amazonaws.com".into()],
            "us-east-1",
            "examplebucket",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        );
        let now = parse_rfc3339("2013-05-24T00:00:00Z").unwrap();
        let h = sign(
            &cfg,
            now,
            "GET",
            "/test.txt",
            "",
            "examplebucket.s3.amazonaws.com",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            &[("Range", "bytes=0-9".into())],
        );
        let auth = &h.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The presigned-URL example of AWS's SigV4 documentation ("query string
    /// authentication", examplebucket, 24 hours).
    #[test]
    fn presigned_url_matches_aws_example() {
        let endpoint = "https://examplebucket.s3.amazonaws.com";
        let cfg = S3Config::new(
            vec![endpoint.into()],
            "us-east-1",
            "examplebucket",
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        );
        let now = parse_rfc3339("2013-05-24T00:00:00Z").unwrap();
        let url = presign(&cfg, endpoint, "/test.txt", now, Duration::from_secs(86400));
        assert_eq!(
            url,
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
             &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    #[test]
    fn keys_and_encoding() {
        let id = ChunkId::of(b"x");
        let key = S3Store::chunk_key(&id);
        assert_eq!(chunk_of_key(&key), Some(id));
        assert_eq!(chunk_of_key("chunks/zz/nothex"), None);
        assert_eq!(uri_encode("chunks/ab c+", true), "chunks%2Fab%20c%2B");
        assert_eq!(uri_encode("/b/chunks/ab", false), "/b/chunks/ab");
    }

    #[test]
    fn listing_xml() {
        let xml = "<ListBucketResult><IsTruncated>true</IsTruncated>\
            <Contents><Key>a&amp;b</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>\
            <Size>12</Size></Contents><Contents><Key>c</Key></Contents>\
            <NextContinuationToken>tok=</NextContinuationToken></ListBucketResult>";
        let blocks = xml_blocks(xml, "Contents");
        assert_eq!(blocks.len(), 2);
        assert_eq!(xml_tag(blocks[0], "Key").as_deref(), Some("a&b"));
        assert_eq!(
            xml_tag(xml, "NextContinuationToken").as_deref(),
            Some("tok=")
        );
        assert_eq!(
            error_code(b"<?xml?><Error><Code>NoSuchKey</Code></Error>").as_deref(),
            Some("NoSuchKey")
        );
        assert_eq!(error_code(xml.as_bytes()), None);
    }
}
