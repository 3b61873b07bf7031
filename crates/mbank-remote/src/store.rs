//! [`RemoteStore`]: [`ChunkStore`] over the bank server's chunk endpoints
//! (`docs/api.md`).
//!
//! `put` returns once the server has the chunk; the server makes chunks durable before
//! it commits a version that references them, so [`ChunkStore::flush`] has nothing to
//! do. Garbage collection and store statistics run on the bank's host, not through a
//! client.

use std::path::PathBuf;
use std::time::SystemTime;

use mbank_core::ChunkId;
use mbank_core::chunk::{EncodedChunk, MAX_STORED_LEN};
use mbank_store::{ChunkStore, StoreError, StoreStats, SweepStats};
use ureq::http::Method;

use crate::client::{Client, ClientError, Payload};
use crate::wire::{self, Stored};

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
