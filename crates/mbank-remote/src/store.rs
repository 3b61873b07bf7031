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

use std::collections::HashMap;
use std::io::Read;
use std::ops::{ControlFlow, Range};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use mbank_core::ChunkId;
use mbank_core::chunk::{EncodedChunk, MAX_STORED_LEN};
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

/// A bank server's chunk store.
#[derive(Clone, Debug)]
pub struct RemoteStore {
    client: Client,
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
        RemoteStore { client }
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
        let mut places: Vec<(ChunkId, Vec<usize>)> = Vec::with_capacity(run.len());
        let mut at: HashMap<ChunkId, usize> = HashMap::with_capacity(run.len());
        for i in run {
            let k = *at.entry(ids[i]).or_insert_with(|| {
                places.push((ids[i], Vec::new()));
                places.len() - 1
            });
            places[k].1.push(i);
        }
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
            let (last, rest) = at.split_last().expect("every id has a place");
            for &i in rest {
                if each(i, plain.clone()).is_break() {
                    return Ok(Streamed::Ended(ControlFlow::Break(())));
                }
            }
            if each(*last, plain).is_break() {
                return Ok(Streamed::Ended(ControlFlow::Break(())));
            }
        }
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

    /// One `POST /v1/chunks` per batch of at most `MAX_BATCH_CHUNKS` chunks and
    /// `MAX_BATCH_BYTES` bytes: the server records the user's rights to all of them in
    /// one transaction.
    fn put_many(&self, chunks: &[EncodedChunk]) -> Result<Vec<u64>, StoreError> {
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
    fn read_each(&self, ids: &[ChunkId], jobs: usize, each: &Each<'_>) -> Result<(), StoreError> {
        let threads = jobs.clamp(1, MAX_IN_FLIGHT);
        let run = ids.len().div_ceil(threads).clamp(1, wire::MAX_GET_MANY);
        mbank_store::in_runs(ids.len(), run, threads, |r| self.stream_run(ids, r, each))
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
