//! Indexes: which chunks, in which order, make up a disk or a memory image.
//!
//! ```text
//! offset size  field
//!      0    4  magic "MBIX"
//!      4    1  format version (1)
//!      5    1  kind: 1 = disk (fixed-size chunks), 2 = memory (content-defined chunks)
//!      6    2  reserved, zero
//!      8    4  chunk size, u32 LE (disk: a power of two, 4 KiB ..= 4 MiB; memory: 0)
//!     12    4  reserved, zero
//!     16    8  total length in bytes, u64 LE (disk size, or memory stream length)
//!     24    8  entry count, u64 LE
//!     32    …  entries: disk: 32-byte chunk id each; memory: 32-byte chunk id + u32 LE length
//!      …   32  BLAKE3-256 of every byte before it
//! ```
//!
//! An all-zero 32-byte id marks a run of zeros that is not stored. A disk index has
//! exactly ceil(disk size / chunk size) entries; the last one may cover less than a
//! full chunk. A memory index's lengths add up to the total length.

use crate::ids::ChunkId;
use crate::valid_chunk_size;

pub const MAGIC: [u8; 4] = *b"MBIX";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 32;
pub const TRAILER_LEN: usize = 32;
pub const KIND_DISK: u8 = 1;
pub const KIND_MEMORY: u8 = 2;
/// Largest disk an index may describe (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Largest number of entries an index may hold (bounds the allocation before parsing).
pub const MAX_ENTRIES: u64 = 1 << 26;
const ZERO_ID: [u8; 32] = [0; 32];

/// Why bytes could not be read as an index.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("index is {0} bytes, too short for its header and trailer")]
    Truncated(usize),
    #[error("index has a bad magic (not a Machine Bank index)")]
    BadMagic,
    #[error("index format version {0} is not supported by this mbank (knows 1)")]
    UnsupportedVersion(u8),
    #[error("index is of kind {found}, expected {expected}")]
    WrongKind { found: u8, expected: u8 },
    #[error("index header is inconsistent: {0}")]
    BadHeader(&'static str),
    #[error("index checksum mismatch: the index is damaged")]
    Checksum,
}

/// The chunks of one disk: fixed-size chunks, `None` where the chunk is all zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskIndex {
    pub chunk_size: u32,
    pub disk_size: u64,
    pub chunks: Vec<Option<ChunkId>>,
}

impl DiskIndex {
    /// Number of chunks a disk of `disk_size` bytes has.
    pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
        disk_size.div_ceil(chunk_size as u64)
    }

    /// An all-zero disk.
    pub fn zeroed(disk_size: u64, chunk_size: u32) -> Self {
        DiskIndex {
            chunk_size,
            disk_size,
            chunks: vec![None; Self::chunk_count(disk_size, chunk_size) as usize],
        }
    }

    /// Byte length of chunk `i` (the last chunk may be short).
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = i as u64 * self.chunk_size as u64;
        (self.disk_size - start).min(self.chunk_size as u64) as usize
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32 * self.chunks.len() + TRAILER_LEN);
        out.extend_from_slice(&header(
            KIND_DISK,
            self.chunk_size,
            self.disk_size,
            self.chunks.len() as u64,
        ));
        for c in &self.chunks {
            out.extend_from_slice(c.as_ref().map_or(&ZERO_ID, |c| c.as_bytes()));
        }
        finish(out)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IndexError> {
        let h = parse_header(bytes, KIND_DISK, 32)?;
        if !valid_chunk_size(h.chunk_size as u64) {
            return Err(IndexError::BadHeader(
                "chunk size is not a power of two in 4 KiB..4 MiB",
            ));
        }
        if h.total > MAX_DISK_SIZE {
            return Err(IndexError::BadHeader("disk size is over 64 TiB"));
        }
        if h.count != Self::chunk_count(h.total, h.chunk_size) {
            return Err(IndexError::BadHeader(
                "entry count does not match the disk size",
            ));
        }
        let chunks = h.entries.chunks_exact(32).map(read_id).collect::<Vec<_>>();
        Ok(DiskIndex {
            chunk_size: h.chunk_size,
            disk_size: h.total,
            chunks,
        })
    }
}

/// One entry of a memory index: a chunk (or a run of zeros) and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRun {
    pub id: Option<ChunkId>,
    pub len: u32,
}

/// The chunks of a memory image (or any stream), cut by content (FastCDC).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryIndex {
    pub total_len: u64,
    pub runs: Vec<MemoryRun>,
}

impl MemoryIndex {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 36 * self.runs.len() + TRAILER_LEN);
        out.extend_from_slice(&header(
            KIND_MEMORY,
            0,
            self.total_len,
            self.runs.len() as u64,
        ));
        for r in &self.runs {
            out.extend_from_slice(r.id.as_ref().map_or(&ZERO_ID, |c| c.as_bytes()));
            out.extend_from_slice(&r.len.to_le_bytes());
        }
        finish(out)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IndexError> {
        let h = parse_header(bytes, KIND_MEMORY, 36)?;
        if h.chunk_size != 0 {
            return Err(IndexError::BadHeader("memory index must have chunk size 0"));
        }
        let runs: Vec<MemoryRun> = h
            .entries
            .chunks_exact(36)
            .map(|e| MemoryRun {
                id: read_id(&e[..32]),
                len: u32::from_le_bytes(e[32..36].try_into().expect("4 bytes")),
            })
            .collect();
        let sum: u64 = runs.iter().map(|r| r.len as u64).sum();
        if sum != h.total || runs.iter().any(|r| r.len == 0) {
            return Err(IndexError::BadHeader(
                "run lengths do not add up to the total",
            ));
        }
        Ok(MemoryIndex {
            total_len: h.total,
            runs,
        })
    }
}

fn read_id(b: &[u8]) -> Option<ChunkId> {
    let b: [u8; 32] = b.try_into().expect("32 bytes");
    (b != ZERO_ID).then(|| ChunkId::from_bytes(b))
}

fn header(kind: u8, chunk_size: u32, total: u64, count: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = FORMAT_VERSION;
    h[5] = kind;
    h[8..12].copy_from_slice(&chunk_size.to_le_bytes());
    h[16..24].copy_from_slice(&total.to_le_bytes());
    h[24..32].copy_from_slice(&count.to_le_bytes());
    h
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

struct Parsed<'a> {
    chunk_size: u32,
    total: u64,
    count: u64,
    entries: &'a [u8],
}

fn parse_header(bytes: &[u8], kind: u8, entry_len: usize) -> Result<Parsed<'_>, IndexError> {
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(IndexError::Truncated(bytes.len()));
    }
    if bytes[..4] != MAGIC {
        return Err(IndexError::BadMagic);
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(IndexError::UnsupportedVersion(bytes[4]));
    }
    if bytes[5] != kind {
        return Err(IndexError::WrongKind {
            found: bytes[5],
            expected: kind,
        });
    }
    if bytes[6..8] != [0, 0] || bytes[12..16] != [0; 4] {
        return Err(IndexError::BadHeader("reserved bytes are not zero"));
    }
    let chunk_size = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let total = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let count = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
    if count > MAX_ENTRIES {
        return Err(IndexError::BadHeader("too many entries"));
    }
    let body = HEADER_LEN + count as usize * entry_len;
    if bytes.len() != body + TRAILER_LEN {
        return Err(IndexError::BadHeader(
            "length does not match the entry count",
        ));
    }
    if blake3::hash(&bytes[..body]).as_bytes() != &bytes[body..] {
        return Err(IndexError::Checksum);
    }
    Ok(Parsed {
        chunk_size,
        total,
        count,
        entries: &bytes[HEADER_LEN..body],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn disk_round_trip_and_damage() {
        let mut idx = DiskIndex::zeroed(10 * 65536 + 5, 65536);
        assert_eq!(idx.chunks.len(), 11);
        assert_eq!(idx.chunk_len(10), 5);
        idx.chunks[3] = Some(ChunkId::of(b"3"));
        let b = idx.to_bytes();
        assert_eq!(DiskIndex::from_bytes(&b).unwrap(), idx);
        for pos in 0..b.len() {
            let mut bad = b.clone();
            bad[pos] ^= 1;
            assert!(DiskIndex::from_bytes(&bad).is_err(), "flip at {pos}");
        }
        assert!(DiskIndex::from_bytes(&b[..b.len() - 1]).is_err());
        assert_eq!(
            MemoryIndex::from_bytes(&b).unwrap_err(),
            IndexError::WrongKind {
                found: 1,
                expected: 2
            }
        );
    }

    #[test]
    fn hostile_count_is_rejected_before_allocation() {
        let mut h = header(KIND_DISK, 4096, u64::MAX, u64::MAX).to_vec();
        h.extend_from_slice(&[0; 32]);
        assert!(DiskIndex::from_bytes(&h).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..400), kind in 1u8..3) {
            // Make many inputs get past the magic and version checks.
            if bytes.len() >= 6 {
                bytes[..4].copy_from_slice(&MAGIC);
                bytes[4] = FORMAT_VERSION;
                bytes[5] = kind;
            }
            let _ = DiskIndex::from_bytes(&bytes);
            let _ = MemoryIndex::from_bytes(&bytes);
        }

        #[test]
        fn memory_round_trip(lens in proptest::collection::vec((1u32..300_000, any::<bool>()), 0..50)) {
            let runs: Vec<MemoryRun> = lens.iter().enumerate().map(|(i, &(len, zero))| MemoryRun {
                id: (!zero).then(|| ChunkId::of(&i.to_le_bytes())),
                len,
            }).collect();
            let idx = MemoryIndex { total_len: runs.iter().map(|r| r.len as u64).sum(), runs };
            prop_assert_eq!(MemoryIndex::from_bytes(&idx.to_bytes()).unwrap(), idx);
        }
    }
}
