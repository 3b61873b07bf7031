//! [`RemoteStore`]: [`ChunkStore`] over the bank server's chunk endpoints
//! (`docs/api.md`).
//!
//! `put` returns once the server has the chunk; the server makes chunks durable before
//! it commits a version that references them, so [`ChunkStore::flush`] has nothing to
//! do. Garbage collection and store statistics run on the bank's host, not through a
//! client.
//!
//! Reads of many chunks ([`ChunkStore::read_each`], which export uses, and
//! [`ChunkStore::read_many`]) keep several `POST /v1/chunks/get` requests in flight,
//! one per thread on its own kept-alive connection (at most
//! [`crate::client::MAX_IN_FLIGHT`]), and read each answer frame by frame: a chunk is
//! verified and handed to its destination while the rest of its answer is still on the
//! way, so a thread holds one chunk at a time, and a slow answer holds up only its own
//! thread. (Issue 12: before, each answer was read whole before its first chunk was
//! decoded, and the next request waited for all of that.)
//!
//! ## Direct reads (issue 17)
//!
//! A bank whose chunks are in an object store (S3) hands out short-lived presigned
//! URLs (`POST /v1/chunks/urls`) for the chunks the user may read, so the chunk bytes
//! need not pass through the server. Every read ([`ChunkStore::read`], `read_many`,
//! `read_each`) first asks for the URLs of its chunks and GETs each straight from the
//! object store, [`DIRECT_IN_FLIGHT`] at a time per transfer, verifying every chunk by
//! its hash as before. A chunk whose fetch fails (an expired URL, a node down, bytes
//! that do not verify) gets a fresh URL once; if that fails too, or the server gave no
//! URL (a chunk hidden from the user or absent: the server does not tell them apart),
//! it is read through the server (`POST /v1/chunks/get`), whose answer (the chunk, or
//! its 404) is the outcome. A server that answers `404` or `405` to the URL query (a
//! bank on a directory, `serve --no-direct-reads`, an older server) is not asked again, nor
//! is one whose object store this station could not reach in three transfers running.
//!
//! Uploads likewise ([`ChunkStore::put_many`], `put_direct`): presigned
//! PUTs bound to each chunk's length and SHA-256 (`POST /v1/chunks/upload-urls`), then
//! one `POST /v1/chunks/confirm`, after which the server has verified the chunks and
//! recorded the user's rights; a failed PUT goes through `POST /v1/chunks`, as does a
//! batch whose confirmation the server refused.

use std::collections::HashMap;
use std::io::Read;
use std::ops::{ControlFlow, Range};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mbank_core::ChunkId;
use mbank_core::chunk::{self, EncodedChunk, MAX_STORED_LEN};
use mbank_store::{ChunkStore, Each, StoreError, StoreStats, SweepStats};
use ureq::http::Method;

use crate::client::{Client, ClientError, MAX_IN_FLIGHT, Opened, Payload};
use crate::wire::{self, Stored};

/// Requests [`ChunkStore::read_many`] keeps in flight for a long list of chunks.
pub const READ_MANY_IN_FLIGHT: usize = 4;

/// How one streamed answer ended.
enum Streamed {
    /// At its end (every chunk in it handed over), or stopped by the caller.
    Ended(ControlFlow<()>),
    /// Cut off midway; the cause, for people. The chunks before it were handed over.
    Lost(String),
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// GETs one transfer keeps in flight to the object store, over its threads.
pub const DIRECT_IN_FLIGHT: usize = 16;

/// Transfers running whose every direct fetch failed to reach the object store, after
/// which the store reads through the server only.
const UNREACHABLE_RUNS: u32 = 3;

const DIRECT_UNKNOWN: u8 = 0;
const DIRECT_ON: u8 = 1;
const DIRECT_OFF: u8 = 2;

/// What the store knows about direct reads and uploads, shared by its clones.
struct Direct {
    /// `DIRECT_UNKNOWN` until the server answers a URL query, then on or off.
    state: AtomicU8,
    /// Transfers running whose every direct fetch failed to connect.
    unreachable_runs: AtomicU32,
    /// The object store's client (not the bank's: its TLS trusts the bank only).
    agent: ureq::Agent,
    /// Held by the first URL query, so that the threads of a transfer ask once
    /// whether the server offers URLs, not each at once.
    probe: Mutex<()>,
    /// Like `state`, for uploads.
    writes: AtomicU8,
    /// Upload batches running whose every PUT failed to reach the object store.
    unreachable_writes: AtomicU32,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct")
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish()
    }
}

/// Why one direct fetch failed.
enum DirectFail {
    /// The object store answered, but not with the chunk (an expired URL: Garage 400, AWS 403), or
    /// with bytes that do not verify. The server's read of the chunk will say more.
    Refused,
    /// No answer.
    Unreachable(String),
}

/// A bank server's chunk store.
#[derive(Clone, Debug)]
pub struct RemoteStore {
    client: Client,
    direct: Arc<Direct>,
}

/// The distinct ids of `ids[run]`, each with its places.
fn places_of(ids: &[ChunkId], run: Range<usize>) -> Vec<(ChunkId, Vec<usize>)> {
    let mut places: Vec<(ChunkId, Vec<usize>)> = Vec::with_capacity(run.len());
    let mut at: HashMap<ChunkId, usize> = HashMap::with_capacity(run.len());
    for i in run {
        let k = *at.entry(ids[i]).or_insert_with(|| {
            places.push((ids[i], Vec::new()));
            places.len() - 1
        });
        places[k].1.push(i);
    }
    places
}

/// Hands `plain` to `each` at every place in `at`; whether `each` asked to stop.
fn hand_over(at: &[usize], plain: Vec<u8>, each: &Each<'_>) -> ControlFlow<()> {
    let (last, rest) = at.split_last().expect("every id has a place");
    for &i in rest {
        each(i, plain.clone())?;
    }
    each(*last, plain)
}

/// Turns a client error into the store's: `chunk_not_found` is
/// [`StoreError::Missing`] (`chunk` is the chunk asked for, used when the answer does not
/// name one); everything else is [`StoreError::Remote`] with the server's message as is
/// (a quota exceeded, say).
pub fn store_error(e: ClientError, chunk: Option<&ChunkId>) -> StoreError {
    match e {
        ClientError::Api { body, .. } if body.kind == "chunk_not_found" => {
            match body.chunk.or(chunk.copied()) {
                Some(id) => StoreError::Missing(id),
                None => StoreError::Remote(body.message.clone()),
            }
        }
        ClientError::Api { url, body, .. } if body.kind == "unauthorized" => {
            StoreError::Remote(format!("{} (bank {url})", body.message))
        }
        ClientError::Api { body, .. } => StoreError::Remote(body.message.clone()),
        other => StoreError::Remote(other.to_string()),
    }
}

fn short(id: &ChunkId) -> String {
    id.to_hex()[..12].to_string()
}

impl RemoteStore {
    /// The chunk store of the bank `client` talks to.
    pub fn new(client: Client) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .timeout_connect(Some(Duration::from_secs(5)))
            .max_redirects(0)
            .max_idle_connections(2 * DIRECT_IN_FLIGHT)
            .max_idle_connections_per_host(2 * DIRECT_IN_FLIGHT)
            .user_agent(concat!("mbank/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        RemoteStore {
            client,
            direct: Arc::new(Direct {
                state: AtomicU8::new(DIRECT_UNKNOWN),
                unreachable_runs: AtomicU32::new(0),
                agent,
                probe: Mutex::new(()),
                writes: AtomicU8::new(DIRECT_UNKNOWN),
                unreachable_writes: AtomicU32::new(0),
            }),
        }
    }

    /// The same store, reading every chunk through the server when `on` is false (as
    /// it does against a server that offers no direct URLs).
    pub fn with_direct_reads(self, on: bool) -> Self {
        if !on {
            self.direct.state.store(DIRECT_OFF, Ordering::Relaxed);
        }
        self
    }

    /// The same store, uploading every chunk through the server when `on` is false.
    pub fn with_direct_writes(self, on: bool) -> Self {
        if !on {
            self.direct.writes.store(DIRECT_OFF, Ordering::Relaxed);
        }
        self
    }

    /// Whether uploads go straight to the object store, as [`RemoteStore::direct_reads`]
    /// says of reads.
    pub fn direct_writes(&self) -> Option<bool> {
        match self.direct.writes.load(Ordering::Relaxed) {
            DIRECT_ON => Some(true),
            DIRECT_OFF => Some(false),
            _ => None,
        }
    }

    /// Uploads `batch` (at most [`wire::MAX_DIRECT_UPLOADS`] chunks) by presigned URLs
    /// (`POST /v1/chunks/upload-urls`, a PUT each, [`DIRECT_IN_FLIGHT`] at a time), then
    /// has the server verify and record them (`POST /v1/chunks/confirm`); the chunks
    /// whose PUT failed go through the server. `None` when the server takes no direct
    /// uploads, or refused the confirmation (the caller sends the batch through it).
    fn put_direct(&self, batch: &[EncodedChunk]) -> Result<Option<Vec<u64>>, StoreError> {
        if self.direct.writes.load(Ordering::Relaxed) == DIRECT_OFF {
            return Ok(None);
        }
        let list: Vec<wire::Upload> = batch
            .iter()
            .map(|c| wire::Upload::of(c.id, &c.bytes))
            .collect();
        let body = wire::upload_list_body(&list);
        let what = format!("question for upload URLs of {} chunks", batch.len());
        let answer = match self.client.call(
            Method::POST,
            "/chunks/upload-urls",
            &what,
            Payload::Bytes(&body),
            4 << 20,
        ) {
            Ok(a) => a,
            Err(ClientError::Api {
                status: 404 | 405, ..
            }) => {
                self.direct.writes.store(DIRECT_OFF, Ordering::Relaxed);
                return Ok(None);
            }
            Err(ClientError::Api { .. }) => return Ok(None),
            Err(e) => return Err(store_error(e, None)),
        };
        let urls = match self.client.parse::<wire::UploadUrls>(&answer, &what) {
            Ok(u) if u.urls.len() == batch.len() => u.urls,
            _ => {
                self.direct.writes.store(DIRECT_OFF, Ordering::Relaxed);
                return Ok(None);
            }
        };
        self.direct.writes.store(DIRECT_ON, Ordering::Relaxed);
        // The PUTs, DIRECT_IN_FLIGHT at a time.
        let next = AtomicUsize::new(0);
        let done: Vec<AtomicBool> = batch.iter().map(|_| AtomicBool::new(false)).collect();
        let unreachable: Mutex<Option<String>> = Mutex::new(None);
        let answered = AtomicBool::new(false);
        let work = || {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(url) = urls.get(i) else {
                    return;
                };
                let sent = self
                    .direct
                    .agent
                    .put(url)
                    .header(
                        mbank_store::CHECKSUM_HEADER,
                        mbank_store::base64(&list[i].sha256),
                    )
                    .send(&batch[i].bytes[..]);
                match sent {
                    Ok(resp) => {
                        answered.store(true, Ordering::Relaxed);
                        if resp.status().as_u16() == 200 {
                            done[i].store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        *unreachable.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(e.to_string());
                    }
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 0..DIRECT_IN_FLIGHT.min(batch.len()) {
                s.spawn(work);
            }
        });
        if answered.load(Ordering::Relaxed) {
            self.direct.unreachable_writes.store(0, Ordering::Relaxed);
        } else if let Some(cause) = unreachable.into_inner().unwrap_or_else(|p| p.into_inner()) {
            let runs = self
                .direct
                .unreachable_writes
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if runs >= UNREACHABLE_RUNS
                && self.direct.writes.swap(DIRECT_OFF, Ordering::Relaxed) != DIRECT_OFF
            {
                eprintln!(
                    "mbank: warning: the bank's object store does not take this station's uploads ({cause}): chunks go through the bank at {} from now on",
                    self.client.url()
                );
            }
        }
        let (up, through): (Vec<usize>, Vec<usize>) =
            (0..batch.len()).partition(|&i| done[i].load(Ordering::Relaxed));
        let mut sizes = vec![0u64; batch.len()];
        if !up.is_empty() {
            let up_list: Vec<wire::Upload> = up.iter().map(|&i| list[i]).collect();
            let body = wire::upload_list_body(&up_list);
            let what = format!("confirmation of {} uploaded chunks", up.len());
            let answer = match self.client.call(
                Method::POST,
                "/chunks/confirm",
                &what,
                Payload::Bytes(&body),
                1 << 20,
            ) {
                Ok(a) => a,
                // A quota exceeded is the user's to hear; anything else (a staged chunk
                // another upload took first, say): the batch goes through the server.
                Err(e) if e.kind() == Some("quota_exceeded") => return Err(store_error(e, None)),
                Err(ClientError::Api { .. }) => return Ok(None),
                Err(e) => return Err(store_error(e, None)),
            };
            let s: wire::StoredMany = self
                .client
                .parse(&answer, &what)
                .map_err(|e| store_error(e, None))?;
            if s.bytes.len() != up.len() {
                return Err(StoreError::Remote(format!(
                    "the bank answered {} sizes for a confirmation of {} chunks",
                    s.bytes.len(),
                    up.len()
                )));
            }
            for (&i, n) in up.iter().zip(s.bytes) {
                sizes[i] = n;
            }
        }
        if !through.is_empty() {
            let rest: Vec<EncodedChunk> = through.iter().map(|&i| batch[i].clone()).collect();
            for (&i, n) in through.iter().zip(self.put_through_server(&rest)?) {
                sizes[i] = n;
            }
        }
        Ok(Some(sizes))
    }

    /// Whether reads go straight to the object store: `Some(true)` once the server
    /// handed out URLs, `Some(false)` once it said it hands out none (or the object
    /// store could not be reached), `None` before the first read.
    pub fn direct_reads(&self) -> Option<bool> {
        match self.direct.state.load(Ordering::Relaxed) {
            DIRECT_ON => Some(true),
            DIRECT_OFF => Some(false),
            _ => None,
        }
    }

    fn direct_off(&self) -> bool {
        self.direct.state.load(Ordering::Relaxed) == DIRECT_OFF
    }

    /// Asks the server for direct URLs of `ids` (`POST /v1/chunks/urls`), one per id in
    /// order (`None` for a chunk to read through the server). `None` when the server
    /// hands out no URLs: after a `404` or `405` (a bank on a directory, an older server) the
    /// store stops asking; after another refusal it reads this batch through the
    /// server, whose answer will say what is wrong.
    fn chunk_urls(&self, ids: &[ChunkId]) -> Result<Option<Vec<Option<String>>>, StoreError> {
        let _probe = (self.direct.state.load(Ordering::Relaxed) == DIRECT_UNKNOWN)
            .then(|| self.direct.probe.lock().unwrap_or_else(|p| p.into_inner()));
        if self.direct_off() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(wire::MAX_URLS) {
            let body: Vec<u8> = batch.iter().flat_map(|id| *id.as_bytes()).collect();
            let what = format!("question for direct URLs of {} chunks", batch.len());
            let answer = match self.client.call(
                Method::POST,
                "/chunks/urls",
                &what,
                Payload::Bytes(&body),
                1 << 20,
            ) {
                Ok(a) => a,
                // 405: an older server, whose `/v1/chunks/{id}` takes no POST.
                Err(ClientError::Api {
                    status: 404 | 405, ..
                }) => {
                    self.direct.state.store(DIRECT_OFF, Ordering::Relaxed);
                    return Ok(None);
                }
                Err(ClientError::Api { .. }) => return Ok(None),
                Err(e) => return Err(store_error(e, None)),
            };
            // An answer that is not one URL (or null) per chunk: a server that does not
            // know the query; its chunks come through it.
            match self.client.parse::<wire::ChunkUrls>(&answer, &what) {
                Ok(urls) if urls.urls.len() == batch.len() => out.extend(urls.urls),
                _ => {
                    self.direct.state.store(DIRECT_OFF, Ordering::Relaxed);
                    return Ok(None);
                }
            }
        }
        self.direct.state.store(DIRECT_ON, Ordering::Relaxed);
        Ok(Some(out))
    }

    /// GETs one chunk's stored bytes from a direct URL and verifies them against `id`;
    /// returns the plaintext.
    fn fetch_direct(&self, id: &ChunkId, url: &str) -> Result<Vec<u8>, DirectFail> {
        let host = url
            .split_once("://")
            .map_or(url, |(_, r)| r)
            .split(['/', '?'])
            .next()
            .unwrap_or_default();
        let mut resp = self
            .direct
            .agent
            .get(url)
            .call()
            .map_err(|e| DirectFail::Unreachable(format!("{host}: {e}")))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(DirectFail::Refused);
        }
        let mut raw = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(MAX_STORED_LEN as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| DirectFail::Unreachable(format!("{host}: {e}")))?;
        chunk::decode(id, &raw)
            .map(|d| d.plain)
            .map_err(|_| DirectFail::Refused)
    }

    /// Reads `places` (distinct ids, each with its places) by direct URLs, handing each
    /// verified chunk to `each` at its places, with up to `workers` GETs in flight; a
    /// chunk whose fetch fails gets a fresh URL once, then goes through the server
    /// (see the module docs), as does every chunk the server gave no URL for.
    fn direct_run(
        &self,
        places: Vec<(ChunkId, Vec<usize>)>,
        each: &Each<'_>,
        workers: usize,
    ) -> Result<ControlFlow<()>, StoreError> {
        let mut todo: Vec<usize> = (0..places.len()).collect();
        let mut through_server: Vec<usize> = Vec::new();
        // The URLs, then fresh ones once for the chunks whose fetch failed.
        for _ in 0..2 {
            if todo.is_empty() || self.direct_off() {
                break;
            }
            let asked: Vec<ChunkId> = todo.iter().map(|&k| places[k].0).collect();
            let Some(urls) = self.chunk_urls(&asked)? else {
                break;
            };
            let mut jobs: Vec<(usize, String)> = Vec::with_capacity(todo.len());
            for (&k, url) in todo.iter().zip(urls) {
                match url {
                    Some(u) => jobs.push((k, u)),
                    None => through_server.push(k),
                }
            }
            let (failed, flow) = self.fetch_all(&places, &jobs, each, workers);
            if flow.is_break() {
                return Ok(flow);
            }
            todo = failed;
        }
        through_server.extend(todo);
        if through_server.is_empty() {
            return Ok(ControlFlow::Continue(()));
        }
        through_server.sort_unstable();
        let rest = through_server
            .into_iter()
            .map(|k| places[k].clone())
            .collect();
        self.stream_places(rest, each)
    }

    /// Fetches `jobs` (a place in `places` and its URL) on up to `workers` threads;
    /// returns the places whose fetch failed, and whether `each` asked to stop.
    fn fetch_all(
        &self,
        places: &[(ChunkId, Vec<usize>)],
        jobs: &[(usize, String)],
        each: &Each<'_>,
        workers: usize,
    ) -> (Vec<usize>, ControlFlow<()>) {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let fetched = AtomicUsize::new(0);
        let failed: Mutex<Vec<usize>> = Mutex::new(Vec::new());
        // The cause of the last failure to reach the store, if no fetch got an answer.
        let unreachable: Mutex<Option<String>> = Mutex::new(None);
        let answered = AtomicBool::new(false);
        let work = || {
            while !stop.load(Ordering::Relaxed) {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some((k, url)) = jobs.get(j) else {
                    return;
                };
                let (id, at) = &places[*k];
                match self.fetch_direct(id, url) {
                    Ok(plain) => {
                        fetched.fetch_add(1, Ordering::Relaxed);
                        answered.store(true, Ordering::Relaxed);
                        if hand_over(at, plain, each).is_break() {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(f) => {
                        match f {
                            DirectFail::Refused => answered.store(true, Ordering::Relaxed),
                            DirectFail::Unreachable(cause) => {
                                *unreachable.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(cause);
                            }
                        }
                        failed.lock().unwrap_or_else(|p| p.into_inner()).push(*k);
                    }
                }
            }
        };
        let threads = workers.clamp(1, jobs.len().max(1));
        if threads == 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(work);
                }
            });
        }
        let mut failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
        failed.sort_unstable();
        let unreachable = unreachable.into_inner().unwrap_or_else(|p| p.into_inner());
        if answered.load(Ordering::Relaxed) {
            self.direct.unreachable_runs.store(0, Ordering::Relaxed);
        } else if let Some(cause) = unreachable {
            let runs = self.direct.unreachable_runs.fetch_add(1, Ordering::Relaxed) + 1;
            if runs >= UNREACHABLE_RUNS
                && self.direct.state.swap(DIRECT_OFF, Ordering::Relaxed) != DIRECT_OFF
            {
                eprintln!(
                    "mbank: warning: the bank's object store does not answer this station ({cause}): chunks come through the bank at {} from now on",
                    self.client.url()
                );
            }
        }
        let flow = if stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        };
        (failed, flow)
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Fetches the chunks at `run` of `ids` with `POST /v1/chunks/get` and hands each
    /// to `each` as its frame arrives, verified: nothing waits for the whole answer. An
    /// answer cut short (the server's byte cap, or a connection lost midway) is
    /// followed by a request for the rest; failures that waiting may cure are retried
    /// within the retry budget, which starts again whenever a chunk arrives.
    fn stream_run(
        &self,
        ids: &[ChunkId],
        run: Range<usize>,
        each: &Each<'_>,
    ) -> Result<ControlFlow<()>, StoreError> {
        // The distinct ids, each with its places: the server answers a repeat once.
        self.stream_places(places_of(ids, run), each)
    }

    /// [`RemoteStore::stream_run`] of distinct ids, each with its places.
    fn stream_places(
        &self,
        places: Vec<(ChunkId, Vec<usize>)>,
        each: &Each<'_>,
    ) -> Result<ControlFlow<()>, StoreError> {
        let mut done = 0;
        let mut tries = self.client.tries();
        while done < places.len() {
            let part = &places[done..];
            let what = format!("download of {} chunks", part.len());
            let body: Vec<u8> = part.iter().flat_map(|(id, _)| *id.as_bytes()).collect();
            let opened = self
                .client
                .open(
                    &Method::POST,
                    "/chunks/get",
                    &Payload::Bytes(&body),
                    &mut tries,
                )
                .map_err(|e| store_error(e, None))?;
            let cause = match opened {
                Opened::Retry(cause) => cause,
                Opened::Body(mut answer) => {
                    let before = done;
                    let r = self.stream_answer(&mut answer, &places, &mut done, each, &what)?;
                    if done > before {
                        tries = self.client.tries();
                    }
                    match r {
                        Streamed::Ended(flow) => {
                            if flow.is_break() {
                                return Ok(flow);
                            }
                            continue;
                        }
                        Streamed::Lost(cause) => cause,
                    }
                }
            };
            self.client
                .wait(&mut tries, &what, cause)
                .map_err(|e| store_error(e, None))?;
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Reads one answer's frames (`places[*done..]` asked, in order), verifying each
    /// chunk and handing it to `each` at every place it has, advancing `done`.
    fn stream_answer(
        &self,
        answer: &mut impl Read,
        places: &[(ChunkId, Vec<usize>)],
        done: &mut usize,
        each: &Each<'_>,
        what: &str,
    ) -> Result<Streamed, StoreError> {
        let bad = |why: String| StoreError::Remote(format!("the bank's answer to a {what}: {why}"));
        let first = *done;
        loop {
            let mut len = [0u8; 4];
            match read_full(answer, &mut len) {
                Ok(0) if *done == first => {
                    return Err(bad(format!(
                        "it holds none of the {} chunks asked",
                        places.len() - first
                    )));
                }
                // The end of the answer: all asked, or the server's byte cap.
                Ok(0) => return Ok(Streamed::Ended(ControlFlow::Continue(()))),
                Ok(4) => {}
                Ok(_) => {
                    return Ok(Streamed::Lost(
                        "the answer ended inside a chunk's length".into(),
                    ));
                }
                Err(e) => return Ok(Streamed::Lost(e.to_string())),
            }
            let len = u32::from_le_bytes(len) as usize;
            let Some((id, at)) = places.get(*done) else {
                return Err(bad(format!(
                    "more follows the last of the {} chunks asked",
                    places.len() - first
                )));
            };
            if len > MAX_STORED_LEN {
                return Err(bad(format!(
                    "chunk {} is said to be {len} bytes, more than a chunk can be",
                    short(id)
                )));
            }
            let mut raw = vec![0u8; len];
            match read_full(answer, &mut raw) {
                Ok(n) if n == len => {}
                Ok(_) => {
                    return Ok(Streamed::Lost(format!(
                        "the answer ended inside chunk {}",
                        short(id)
                    )));
                }
                Err(e) => return Ok(Streamed::Lost(e.to_string())),
            }
            let plain = self.verify(id, raw)?;
            *done += 1;
            if hand_over(at, plain, each).is_break() {
                return Ok(Streamed::Ended(ControlFlow::Break(())));
            }
        }
    }

    /// One `POST /v1/chunks` per batch of at most `MAX_BATCH_CHUNKS` chunks and
    /// `MAX_BATCH_BYTES` bytes: the server records the user's rights to all of them in
    /// one transaction.
    fn put_through_server(&self, chunks: &[EncodedChunk]) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::with_capacity(chunks.len());
        let mut start = 0;
        while start < chunks.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < chunks.len()
                && end - start < wire::MAX_BATCH_CHUNKS
                && (end == start || bytes + 36 + chunks[end].bytes.len() <= wire::MAX_BATCH_BYTES)
            {
                bytes += 36 + chunks[end].bytes.len();
                end += 1;
            }
            let part = &chunks[start..end];
            let body = wire::batch_body(part.iter().map(|c| (&c.id, &c.bytes[..])));
            let what = format!("upload of {} chunks", part.len());
            let answer = self
                .client
                .call(
                    Method::POST,
                    "/chunks",
                    &what,
                    Payload::Bytes(&body),
                    1 << 20,
                )
                .map_err(|e| store_error(e, None))?;
            let s: wire::StoredMany = self
                .client
                .parse(&answer, &what)
                .map_err(|e| store_error(e, None))?;
            if s.bytes.len() != part.len() {
                return Err(StoreError::Remote(format!(
                    "the bank answered {} sizes for an upload of {} chunks",
                    s.bytes.len(),
                    part.len()
                )));
            }
            out.extend(s.bytes);
            start = end;
        }
        Ok(out)
    }

    fn on_the_host(&self, what: &str) -> StoreError {
        StoreError::Remote(format!(
            "{what} runs on the bank's host, not through its client: run it where the bank at {} keeps its store",
            self.client.url()
        ))
    }
}

impl ChunkStore for RemoteStore {
    fn put(&self, chunk: &EncodedChunk) -> Result<u64, StoreError> {
        let what = format!("upload of chunk {}", short(&chunk.id));
        let path = format!("/chunks/{}", chunk.id.to_hex());
        let answer = self
            .client
            .call(
                Method::PUT,
                &path,
                &what,
                Payload::Bytes(&chunk.bytes),
                1 << 16,
            )
            .map_err(|e| store_error(e, Some(&chunk.id)))?;
        let s: Stored = self
            .client
            .parse(&answer, &what)
            .map_err(|e| store_error(e, None))?;
        Ok(s.bytes)
    }

    /// Straight to the object store when the server offers it (`put_direct`,
    /// batches of [`wire::MAX_DIRECT_UPLOADS`]), else through the server.
    fn put_many(&self, chunks: &[EncodedChunk]) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::with_capacity(chunks.len());
        for batch in chunks.chunks(wire::MAX_DIRECT_UPLOADS) {
            match self.put_direct(batch)? {
                Some(sizes) => out.extend(sizes),
                None => out.extend(self.put_through_server(batch)?),
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn touch(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self.touch_many(std::slice::from_ref(id))?[0])
    }

    fn touch_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(wire::MAX_HAVE) {
            let mut body = Vec::with_capacity(batch.len() * ChunkId::LEN);
            for id in batch {
                body.extend_from_slice(id.as_bytes());
            }
            let what = format!("question which of {} chunks the bank has", batch.len());
            let answer = self
                .client
                .call(
                    Method::POST,
                    "/chunks/have",
                    &what,
                    Payload::Bytes(&body),
                    batch.len() as u64,
                )
                .map_err(|e| store_error(e, None))?;
            if answer.len() != batch.len() || answer.iter().any(|&b| b > 1) {
                return Err(store_error(
                    self.client.bad_answer(
                        &what,
                        format!(
                            "{} bytes, expected {} bytes of 0 or 1",
                            answer.len(),
                            batch.len()
                        ),
                    ),
                    None,
                ));
            }
            out.extend(answer.iter().map(|&b| b == 1));
        }
        Ok(out)
    }

    fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let what = format!("download of chunk {}", short(id));
        self.client
            .call(
                Method::GET,
                &format!("/chunks/{}", id.to_hex()),
                &what,
                Payload::Empty,
                MAX_STORED_LEN as u64,
            )
            .map_err(|e| store_error(e, Some(id)))
    }

    /// `POST /v1/chunks/get` for the distinct ids, `MAX_GET_MANY` at a time; the server
    /// may answer fewer (its byte cap), and the rest are asked again.
    fn get_raw_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut seen = std::collections::HashMap::new();
        let distinct: Vec<ChunkId> = ids
            .iter()
            .filter(|id| seen.insert(**id, ()).is_none())
            .copied()
            .collect();
        let mut got: std::collections::HashMap<ChunkId, Vec<u8>> =
            std::collections::HashMap::with_capacity(distinct.len());
        let mut rest = &distinct[..];
        while !rest.is_empty() {
            let part = &rest[..rest.len().min(wire::MAX_GET_MANY)];
            if part.len() == 1 {
                got.insert(part[0], self.get_raw(&part[0])?);
                rest = &rest[1..];
                continue;
            }
            let what = format!("download of {} chunks", part.len());
            let body: Vec<u8> = part.iter().flat_map(|id| *id.as_bytes()).collect();
            let limit = (wire::MAX_GET_BYTES + 4 + MAX_STORED_LEN) as u64;
            let answer = self
                .client
                .call(
                    Method::POST,
                    "/chunks/get",
                    &what,
                    Payload::Bytes(&body),
                    limit,
                )
                .map_err(|e| store_error(e, None))?;
            let chunks = wire::parse_chunks_answer(&answer, part.len()).map_err(|why| {
                StoreError::Remote(format!("the bank's answer to a {what}: {why}"))
            })?;
            let n = chunks.len();
            for (id, c) in part.iter().zip(chunks) {
                got.insert(*id, c.to_vec());
            }
            rest = &rest[n..];
        }
        let repeats = distinct.len() != ids.len();
        ids.iter()
            .map(|id| {
                if repeats {
                    got.get(id).cloned()
                } else {
                    got.remove(id)
                }
                .ok_or_else(|| StoreError::Remote(format!("chunk {} was not fetched", short(id))))
            })
            .collect()
    }

    /// Streams the answers: see [`RemoteStore::stream_run`]. Each thread (at most
    /// [`MAX_IN_FLIGHT`]) keeps one request in flight on its own kept-alive connection,
    /// asking for up to `MAX_GET_MANY` chunks at a time (fewer when `ids` is short, so
    /// that every thread has some); what a thread holds at any moment is one chunk.
    ///
    /// With direct reads, each thread's run is fetched from the object store by
    /// [`DIRECT_IN_FLIGHT`] / threads GETs at a time (see the module docs).
    fn read_each(&self, ids: &[ChunkId], jobs: usize, each: &Each<'_>) -> Result<(), StoreError> {
        let threads = jobs.clamp(1, MAX_IN_FLIGHT);
        let run = ids.len().div_ceil(threads).clamp(1, wire::MAX_GET_MANY);
        let workers = (DIRECT_IN_FLIGHT / threads).max(1);
        mbank_store::in_runs(ids.len(), run, threads, |r| {
            if self.direct_off() {
                self.stream_run(ids, r, each)
            } else {
                self.direct_run(places_of(ids, r), each, workers)
            }
        })
    }

    /// By a direct URL when the server offers them, else (or when that fails) through
    /// the server; verified either way.
    fn read(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        if !self.direct_off() {
            let got: Mutex<Option<Vec<u8>>> = Mutex::new(None);
            let _ = self.direct_run(
                vec![(*id, vec![0])],
                &|_, plain| {
                    *got.lock().unwrap_or_else(|p| p.into_inner()) = Some(plain);
                    ControlFlow::Continue(())
                },
                1,
            )?;
            if let Some(plain) = got.into_inner().unwrap_or_else(|p| p.into_inner()) {
                return Ok(plain);
            }
        }
        let raw = self.get_raw(id)?;
        self.verify(id, raw)
    }

    /// [`ChunkStore::read_each`] with up to [`READ_MANY_IN_FLIGHT`] requests in flight.
    fn read_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
        let got: Vec<Mutex<Option<Vec<u8>>>> = ids.iter().map(|_| Mutex::new(None)).collect();
        let jobs = ids
            .len()
            .div_ceil(wire::MAX_GET_MANY)
            .min(READ_MANY_IN_FLIGHT);
        self.read_each(ids, jobs, &|i, plain| {
            *got[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(plain);
            ControlFlow::Continue(())
        })?;
        got.into_iter()
            .zip(ids)
            .map(|(g, id)| {
                g.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .ok_or_else(|| {
                        StoreError::Remote(format!("chunk {} was not fetched", short(id)))
                    })
            })
            .collect()
    }

    fn quarantine(&self, _id: &ChunkId) -> Result<Option<PathBuf>, StoreError> {
        // The server verifies what it stores and serves; a chunk damaged on the way is
        // fetched again by the caller, and nothing here can move the server's copy.
        Ok(None)
    }

    fn sweep(
        &self,
        _cutoff: SystemTime,
        _keep: &(dyn Fn(&ChunkId) -> bool + Sync),
    ) -> Result<SweepStats, StoreError> {
        Err(self.on_the_host("garbage collection"))
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        Err(self.on_the_host("counting the stored chunks"))
    }
}
