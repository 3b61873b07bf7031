//! Chunk lengths against the places an index gives them.
//!
//! A chunk's id fixes its content and so its length, but an index names chunks by id
//! only (a disk index) or by id and a length it claims (a memory index). A version whose
//! index puts a 16 MiB chunk at a 64 KiB place of a disk would make `export` write past
//! the place, over the chunks after it. So every reader checks each chunk's length
//! against its place ([`WrongLength`]), and a bank server refuses a commit whose index
//! names a chunk of the wrong length ([`check_chunk_lengths`]), reading only each chunk's
//! header ([`ChunkStore::plain_len`]).

use std::collections::{HashMap, HashSet};
use std::fmt;

use mbank_catalog::NamedStream;
use mbank_core::{ChunkId, DiskIndex};
use mbank_store::{ChunkStore, StoreError};

/// Where in a version a chunk is placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// Chunk `index` of the disk, starting at byte `offset`.
    Disk { index: usize, offset: u64 },
    /// Run `index` of stream `stream`, starting at byte `offset` of the stream.
    Stream {
        stream: String,
        index: usize,
        offset: u64,
    },
}

/// A chunk whose plaintext is not as long as the place an index gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrongLength {
    pub chunk: ChunkId,
    pub place: Place,
    /// The place's length.
    pub expected: u64,
    /// The chunk's length.
    pub actual: u64,
}

impl WrongLength {
    /// `chunk`, of `actual` bytes, at place `i` of the disk `index`, if that is wrong.
    pub fn disk(index: &DiskIndex, i: usize, chunk: ChunkId, actual: usize) -> Option<Self> {
        let expected = index.chunk_len(i) as u64;
        (actual as u64 != expected).then(|| WrongLength {
            chunk,
            place: Place::Disk {
                index: i,
                offset: i as u64 * index.chunk_size as u64,
            },
            expected,
            actual: actual as u64,
        })
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Disk { index, offset } => write!(f, "disk chunk {index} (byte {offset})"),
            Place::Stream {
                stream,
                index,
                offset,
            } => write!(f, "run {index} of stream {stream} (byte {offset})"),
        }
    }
}

impl fmt::Display for WrongLength {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "its index puts chunk {} at {}, a place of {} bytes, but the chunk holds {} bytes",
            self.chunk, self.place, self.expected, self.actual
        )
    }
}

/// Every (chunk, length) pair a version's disk index and streams name.
pub fn length_pairs(index: &DiskIndex, streams: &[NamedStream]) -> HashSet<(ChunkId, u64)> {
    let mut out = HashSet::new();
    for (i, c) in index.chunks.iter().enumerate() {
        if let Some(id) = c {
            out.insert((*id, index.chunk_len(i) as u64));
        }
    }
    for (_, s) in streams {
        out.extend(
            s.runs
                .iter()
                .filter_map(|r| r.id.map(|id| (id, r.len as u64))),
        );
    }
    out
}

/// The distinct chunks whose length [`check_chunk_lengths`] reads from the store for
/// `index` and `streams`: those at a place whose pair of chunk and length is not in
/// `known`, in the order first met.
pub fn lengths_to_check(
    index: &DiskIndex,
    streams: &[NamedStream],
    known: &HashSet<(ChunkId, u64)>,
) -> Vec<ChunkId> {
    let mut asked = HashSet::new();
    let disk = index
        .chunks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|id| (id, index.chunk_len(i) as u64)));
    let runs = streams.iter().flat_map(|(_, s)| {
        s.runs
            .iter()
            .filter_map(|r| r.id.map(|id| (id, r.len as u64)))
    });
    disk.chain(runs)
        .filter(|pair| !known.contains(pair) && asked.insert(pair.0))
        .map(|(id, _)| id)
        .collect()
}

/// The first place of `index` or `streams` whose chunk, as `store` holds it, is not as
/// long as the place; `None` when every one fits. Pairs in `known` (a version already
/// checked, such as the parent) are not looked up; every other distinct chunk costs one
/// [`ChunkStore::plain_len`] (a header read on a local store, a ranged GET on S3, many
/// in flight: [`ChunkStore::plain_len_many`]). A chunk the
/// store lacks is [`StoreError::Missing`].
pub fn check_chunk_lengths(
    store: &dyn ChunkStore,
    index: &DiskIndex,
    streams: &[NamedStream],
    known: &HashSet<(ChunkId, u64)>,
) -> Result<Option<WrongLength>, StoreError> {
    // The distinct chunks to ask about, asked all at once (on S3 with several header
    // reads in flight).
    let ids = lengths_to_check(index, streams, known);
    let lens: HashMap<ChunkId, u64> = ids
        .iter()
        .copied()
        .zip(store.plain_len_many(&ids)?.into_iter().map(|n| n as u64))
        .collect();
    let len_of = |id: &ChunkId| -> Result<u64, StoreError> {
        lens.get(id).copied().ok_or(StoreError::Missing(*id))
    };
    for (i, c) in index.chunks.iter().enumerate() {
        let Some(id) = c else { continue };
        if known.contains(&(*id, index.chunk_len(i) as u64)) {
            continue;
        }
        let actual = len_of(id)?;
        if let Some(w) = WrongLength::disk(index, i, *id, actual as usize) {
            return Ok(Some(w));
        }
    }
    for (name, s) in streams {
        let mut offset = 0u64;
        for (k, r) in s.runs.iter().enumerate() {
            if let Some(id) = r.id
                && !known.contains(&(id, r.len as u64))
            {
                let actual = len_of(&id)?;
                if actual != r.len as u64 {
                    return Ok(Some(WrongLength {
                        chunk: id,
                        place: Place::Stream {
                            stream: name.clone(),
                            index: k,
                            offset,
                        },
                        expected: r.len as u64,
                        actual,
                    }));
                }
            }
            offset += r.len as u64;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbank_core::chunk::encode;
    use mbank_core::{MemoryIndex, MemoryRun};
    use mbank_store::MemStore;

    #[test]
    fn lengths_are_checked_against_places_and_known_pairs_are_not_read() {
        let store = MemStore::default();
        let full = encode(&[7u8; 4096], 3);
        let short = encode(&[9u8; 100], 3);
        let big = encode(&vec![5u8; 1 << 20], 3);
        for c in [&full, &short, &big] {
            store.put(c).unwrap();
        }
        store.flush().unwrap();
        // Two full chunks and a last one of 100 bytes.
        let mut idx = DiskIndex::zeroed(2 * 4096 + 100, 4096);
        idx.chunks = vec![Some(full.id), None, Some(short.id)];
        let none = HashSet::new();
        assert_eq!(check_chunk_lengths(&store, &idx, &[], &none).unwrap(), None);
        // A full chunk at the short last place, and a big one at a full place.
        idx.chunks[2] = Some(full.id);
        let w = check_chunk_lengths(&store, &idx, &[], &none)
            .unwrap()
            .unwrap();
        assert_eq!(
            (w.chunk, w.expected, w.actual, &w.place),
            (
                full.id,
                100,
                4096,
                &Place::Disk {
                    index: 2,
                    offset: 8192
                }
            )
        );
        assert!(w.to_string().contains("disk chunk 2"), "{w}");
        idx.chunks = vec![Some(big.id), None, Some(short.id)];
        let w = check_chunk_lengths(&store, &idx, &[], &none)
            .unwrap()
            .unwrap();
        assert_eq!((w.expected, w.actual), (4096, 1 << 20));
        // A stream run whose length differs from its chunk's.
        idx.chunks[0] = Some(full.id);
        let mem = MemoryIndex {
            total_len: 4096 + 50,
            runs: vec![
                MemoryRun {
                    id: None,
                    len: 4096,
                },
                MemoryRun {
                    id: Some(short.id),
                    len: 50,
                },
            ],
        };
        let streams = vec![("memory".to_string(), mem)];
        let w = check_chunk_lengths(&store, &idx, &streams, &none)
            .unwrap()
            .unwrap();
        assert_eq!(
            w.place,
            Place::Stream {
                stream: "memory".into(),
                index: 1,
                offset: 4096
            }
        );
        // Pairs known from a checked version are trusted, not read: a missing chunk
        // is found only when it is not known.
        let gone = mbank_core::ChunkId::of(b"gone");
        idx.chunks[0] = Some(gone);
        let known = HashSet::from([(gone, 4096)]);
        assert_eq!(
            check_chunk_lengths(&store, &idx, &[], &known).unwrap(),
            None
        );
        assert!(matches!(
            check_chunk_lengths(&store, &idx, &[], &none),
            Err(StoreError::Missing(_))
        ));
        assert_eq!(length_pairs(&idx, &streams).len(), 3);
    }
}
