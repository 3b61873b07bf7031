//! Packs: one version's chunks in the order its disk first uses them, compressed as a
//! few large zstd frames (segments) rather than one frame per chunk, for sending a
//! whole disk over a link. Each chunk compressed alone loses the context of the chunks
//! before it; a segment of many chunks keeps it (a Debian disk: 150 MB as single chunks,
//! 123 MB as 8 MiB segments at zstd level 9). A pack is derived data: built from the
//! stored chunks, it can always be thrown away and built again.
//!
//! ```text
//! offset size  field
//!      0    4  magic "MBPK"
//!      4    1  format version (1)
//!      5    3  reserved, zero
//!      8   16  the version id the pack was built for
//!     24    4  segment count, u32 LE
//!     28    4  reserved, zero
//!     32    8  chunk count, u64 LE (over all segments)
//!     40    …  segments: u64 LE frame length, u32 LE plaintext length, u32 LE chunk count
//!      …    …  chunks, segment after segment: 32-byte chunk id + u32 LE plaintext length
//!      …   32  BLAKE3-256 of every byte before it
//!      …    …  the segments' zstd frames, back to back, in order
//! ```
//!
//! Everything up to and including the checksum is the pack's index. A segment's frame
//! decompresses to exactly its plaintext length, the concatenation of its chunks'
//! plaintexts in order; each chunk is checked against its id before it is used.

use crate::ids::{ChunkId, VersionId};

pub const MAGIC: [u8; 4] = *b"MBPK";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 40;
pub const SEGMENT_ENTRY_LEN: usize = 16;
pub const CHUNK_ENTRY_LEN: usize = 36;
pub const TRAILER_LEN: usize = 32;
/// Largest plaintext of one segment (bounds a reader's buffer).
pub const MAX_SEGMENT_PLAIN: u32 = 64 << 20;
/// Most segments a pack may have.
pub const MAX_SEGMENTS: u32 = 1 << 20;
/// Most chunks a pack may name (as many as an index may hold).
pub const MAX_CHUNKS: u64 = crate::index::MAX_ENTRIES;
/// The plaintext a builder puts in one segment (a segment ends at the first chunk that
/// would take it past this).
pub const SEGMENT_TARGET: u32 = 8 << 20;
/// The zstd level packs are built with: slower than the chunks' level 3, but a pack
/// is built once and sent many times.
pub const DEFAULT_LEVEL: i32 = 9;

/// Why bytes could not be read as a pack, or a segment did not hold what its index says.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("pack index is {0} bytes, too short for its header")]
    Truncated(usize),
    #[error("pack has a bad magic (not a Machine Bank pack)")]
    BadMagic,
    #[error("pack format version {0} is not supported by this mbank (knows 1)")]
    UnsupportedVersion(u8),
    #[error("pack index is inconsistent: {0}")]
    BadHeader(&'static str),
    #[error("pack index checksum mismatch: the pack is damaged")]
    Checksum,
    #[error("segment {segment} of the pack is {found} bytes, its index says {expected}")]
    SegmentLength {
        segment: usize,
        found: usize,
        expected: u64,
    },
    #[error("segment {segment} of the pack does not decompress to its {expected} bytes: {why}")]
    SegmentData {
        segment: usize,
        expected: u32,
        why: String,
    },
    #[error("segment {segment} of the pack holds other bytes for chunk {id}")]
    ChunkMismatch { segment: usize, id: ChunkId },
}

/// One segment of a pack: where its frame is in the pack file and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the frame from the start of the pack file.
    pub offset: u64,
    /// Length of the frame.
    pub frame_len: u64,
    /// The sum of its chunks' lengths.
    pub plain_len: u32,
    /// Its chunks, in order, with their plaintext lengths.
    pub chunks: Vec<(ChunkId, u32)>,
}

/// A pack's index: which chunks each segment holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackIndex {
    pub version: VersionId,
    pub segments: Vec<Segment>,
}

/// The length of a serialised index of `segments` segments holding `chunks` chunks.
pub fn serialized_len(segments: usize, chunks: usize) -> usize {
    HEADER_LEN + segments * SEGMENT_ENTRY_LEN + chunks * CHUNK_ENTRY_LEN + TRAILER_LEN
}

impl PackIndex {
    /// The length of the serialised index whose first [`HEADER_LEN`] bytes are
    /// `header`: how much of a pack file to read for its index.
    pub fn index_len(header: &[u8]) -> Result<usize, PackError> {
        let (segments, chunks) = parse_header(header)?;
        Ok(serialized_len(segments as usize, chunks as usize))
    }

    /// The serialised index (the frames follow it in a pack file).
    pub fn to_bytes(&self) -> Vec<u8> {
        let chunks = self.chunk_count();
        let mut b = Vec::with_capacity(self.len());
        b.extend_from_slice(&MAGIC);
        b.push(FORMAT_VERSION);
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(self.version.as_bytes());
        b.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&(chunks as u64).to_le_bytes());
        for s in &self.segments {
            b.extend_from_slice(&s.frame_len.to_le_bytes());
            b.extend_from_slice(&s.plain_len.to_le_bytes());
            b.extend_from_slice(&(s.chunks.len() as u32).to_le_bytes());
        }
        for s in &self.segments {
            for (id, len) in &s.chunks {
                b.extend_from_slice(id.as_bytes());
                b.extend_from_slice(&len.to_le_bytes());
            }
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    /// Parses a serialised index: exactly the bytes up to and including its checksum.
    /// Each segment's `offset` is where its frame starts in the pack file.
    pub fn from_bytes(b: &[u8]) -> Result<PackIndex, PackError> {
        let len = Self::index_len(b)?;
        if b.len() != len {
            return Err(PackError::BadHeader("length differs from its counts"));
        }
        let (body, sum) = b.split_at(len - TRAILER_LEN);
        if blake3::hash(body).as_bytes() != sum {
            return Err(PackError::Checksum);
        }
        let (nseg, nchunks) = parse_header(b)?;
        let version = VersionId::from_bytes(b[8..24].try_into().expect("16 bytes"));
        let mut segments = Vec::with_capacity(nseg as usize);
        let mut at = HEADER_LEN;
        let mut chunk_at = HEADER_LEN + nseg as usize * SEGMENT_ENTRY_LEN;
        let mut offset = len as u64;
        let mut total = 0u64;
        for _ in 0..nseg {
            let e = &b[at..at + SEGMENT_ENTRY_LEN];
            at += SEGMENT_ENTRY_LEN;
            let frame_len = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
            let plain_len = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes"));
            let count = u32::from_le_bytes(e[12..16].try_into().expect("4 bytes"));
            if plain_len == 0 || plain_len > MAX_SEGMENT_PLAIN || count == 0 {
                return Err(PackError::BadHeader("a segment is empty or too large"));
            }
            if frame_len == 0 || frame_len > frame_bound(plain_len) {
                return Err(PackError::BadHeader(
                    "a segment's frame is longer than zstd makes",
                ));
            }
            total += count as u64;
            if total > nchunks {
                return Err(PackError::BadHeader(
                    "segments name more chunks than it has",
                ));
            }
            let mut chunks = Vec::with_capacity(count as usize);
            let mut sum = 0u64;
            for _ in 0..count {
                let c = &b[chunk_at..chunk_at + CHUNK_ENTRY_LEN];
                chunk_at += CHUNK_ENTRY_LEN;
                let id = ChunkId::from_bytes(c[0..32].try_into().expect("32 bytes"));
                let clen = u32::from_le_bytes(c[32..36].try_into().expect("4 bytes"));
                if clen == 0 || clen as usize > crate::chunk::MAX_PLAIN_LEN {
                    return Err(PackError::BadHeader("a chunk is empty or too large"));
                }
                sum += clen as u64;
                chunks.push((id, clen));
            }
            if sum != plain_len as u64 {
                return Err(PackError::BadHeader(
                    "a segment's chunks do not add up to its length",
                ));
            }
            segments.push(Segment {
                offset,
                frame_len,
                plain_len,
                chunks,
            });
            offset += frame_len;
        }
        if total != nchunks {
            return Err(PackError::BadHeader(
                "segments name fewer chunks than it has",
            ));
        }
        Ok(PackIndex { version, segments })
    }

    /// The length of the serialised index.
    pub fn len(&self) -> usize {
        serialized_len(self.segments.len(), self.chunk_count())
    }

    /// True for the pack of a disk that is all zeros: no segments.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The length of the whole pack file: its index and every frame.
    pub fn file_len(&self) -> u64 {
        self.len() as u64 + self.segments.iter().map(|s| s.frame_len).sum::<u64>()
    }

    /// Chunks over every segment.
    pub fn chunk_count(&self) -> usize {
        self.segments.iter().map(|s| s.chunks.len()).sum()
    }
}

/// The most a zstd frame of `plain` bytes may take (zstd's compress bound, rounded up).
fn frame_bound(plain: u32) -> u64 {
    plain as u64 + (plain as u64 >> 7) + 4096
}

/// The segment and chunk counts of a header, checked against their bounds.
fn parse_header(b: &[u8]) -> Result<(u32, u64), PackError> {
    if b.len() < HEADER_LEN {
        return Err(PackError::Truncated(b.len()));
    }
    if b[0..4] != MAGIC {
        return Err(PackError::BadMagic);
    }
    if b[4] != FORMAT_VERSION {
        return Err(PackError::UnsupportedVersion(b[4]));
    }
    if b[5..8] != [0; 3] || b[28..32] != [0; 4] {
        return Err(PackError::BadHeader("reserved bytes are not zero"));
    }
    let segments = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
    let chunks = u64::from_le_bytes(b[32..40].try_into().expect("8 bytes"));
    if segments > MAX_SEGMENTS || chunks > MAX_CHUNKS || (chunks as u128) < segments as u128 {
        return Err(PackError::BadHeader("too many segments or chunks"));
    }
    Ok((segments, chunks))
}

/// Compresses the plaintexts of one segment's chunks, in order, as one zstd frame.
pub fn compress_segment(chunks: &[&[u8]], level: i32) -> std::io::Result<Vec<u8>> {
    let plain: usize = chunks.iter().map(|c| c.len()).sum();
    let mut enc = zstd::stream::Encoder::new(Vec::with_capacity(plain / 2), level)?;
    enc.include_checksum(false)?;
    enc.set_pledged_src_size(Some(plain as u64))?;
    enc.include_contentsize(true)?;
    for c in chunks {
        std::io::Write::write_all(&mut enc, c)?;
    }
    enc.finish()
}

/// Decompresses segment `n` (described by `seg`) from its frame and checks every
/// chunk against its id; the segment's plaintext, its chunks back to back in order.
pub fn decode_segment(n: usize, seg: &Segment, frame: &[u8]) -> Result<Vec<u8>, PackError> {
    if frame.len() as u64 != seg.frame_len {
        return Err(PackError::SegmentLength {
            segment: n,
            found: frame.len(),
            expected: seg.frame_len,
        });
    }
    let bad = |why: String| PackError::SegmentData {
        segment: n,
        expected: seg.plain_len,
        why,
    };
    // The output buffer is exactly the claimed length: a hostile frame cannot make it
    // allocate more.
    let plain =
        zstd::bulk::decompress(frame, seg.plain_len as usize).map_err(|e| bad(e.to_string()))?;
    if plain.len() != seg.plain_len as usize {
        return Err(bad(format!("it holds {} bytes", plain.len())));
    }
    let mut at = 0usize;
    for (id, len) in &seg.chunks {
        let c = &plain[at..at + *len as usize];
        at += *len as usize;
        if ChunkId::of(c) != *id {
            return Err(PackError::ChunkMismatch {
                segment: n,
                id: *id,
            });
        }
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each segment's chunks' plaintexts.
    type Plain = Vec<Vec<Vec<u8>>>;

    fn sample() -> (PackIndex, Vec<Vec<u8>>, Plain) {
        let plain: Vec<Vec<Vec<u8>>> = vec![
            vec![b"hello world ".repeat(100), b"second chunk".repeat(50)],
            vec![(0..5000u32).flat_map(|i| i.to_le_bytes()).collect()],
        ];
        let mut frames = Vec::new();
        let mut segments = Vec::new();
        for seg in &plain {
            let refs: Vec<&[u8]> = seg.iter().map(|c| c.as_slice()).collect();
            let f = compress_segment(&refs, 3).unwrap();
            segments.push(Segment {
                offset: 0,
                frame_len: f.len() as u64,
                plain_len: seg.iter().map(|c| c.len() as u32).sum(),
                chunks: seg
                    .iter()
                    .map(|c| (ChunkId::of(c), c.len() as u32))
                    .collect(),
            });
            frames.push(f);
        }
        let idx = PackIndex {
            version: VersionId::random(),
            segments,
        };
        // Offsets as parsing gives them.
        let idx = PackIndex::from_bytes(&idx.to_bytes()).unwrap();
        (idx, frames, plain)
    }

    #[test]
    fn round_trip_and_segments_decode_to_their_chunks() {
        let (idx, frames, plain) = sample();
        let bytes = idx.to_bytes();
        assert_eq!(
            PackIndex::index_len(&bytes[..HEADER_LEN]).unwrap(),
            bytes.len()
        );
        assert_eq!(idx.segments[0].offset, bytes.len() as u64);
        assert_eq!(
            idx.segments[1].offset,
            bytes.len() as u64 + frames[0].len() as u64
        );
        assert_eq!(
            idx.file_len(),
            (bytes.len() + frames[0].len() + frames[1].len()) as u64
        );
        assert_eq!(idx.chunk_count(), 3);
        for (n, f) in frames.iter().enumerate() {
            assert_eq!(
                decode_segment(n, &idx.segments[n], f).unwrap(),
                plain[n].concat()
            );
        }
    }

    #[test]
    fn the_pack_of_a_zero_disk_is_its_index_alone() {
        let idx = PackIndex {
            version: VersionId::random(),
            segments: Vec::new(),
        };
        let b = idx.to_bytes();
        let back = PackIndex::from_bytes(&b).unwrap();
        assert!(back.is_empty());
        assert_eq!(back.file_len(), b.len() as u64);
        assert_eq!(back.len(), b.len());
    }

    #[test]
    fn damaged_indexes_are_refused() {
        let (idx, _, _) = sample();
        let good = idx.to_bytes();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x40;
            assert!(
                PackIndex::from_bytes(&b).is_err(),
                "flipped byte {i} accepted"
            );
        }
        for cut in [0, 10, HEADER_LEN, good.len() - 1] {
            assert!(
                PackIndex::from_bytes(&good[..cut]).is_err(),
                "cut at {cut} accepted"
            );
        }
        let mut huge = good.clone();
        huge[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            PackIndex::index_len(&huge),
            Err(PackError::BadHeader("too many segments or chunks"))
        );
    }

    #[test]
    fn a_segment_with_other_bytes_is_refused() {
        let (idx, frames, plain) = sample();
        // A frame of the right length whose bytes are not the chunks.
        let mut other = plain[0].clone();
        other[0][0] ^= 1;
        let refs: Vec<&[u8]> = other.iter().map(|c| c.as_slice()).collect();
        let f = compress_segment(&refs, 3).unwrap();
        let mut seg = idx.segments[0].clone();
        seg.frame_len = f.len() as u64;
        assert_eq!(
            decode_segment(0, &seg, &f),
            Err(PackError::ChunkMismatch {
                segment: 0,
                id: idx.segments[0].chunks[0].0
            })
        );
        // Truncated and garbled frames.
        let f0 = &frames[0];
        assert!(matches!(
            decode_segment(0, &idx.segments[0], &f0[..f0.len() - 1]),
            Err(PackError::SegmentLength { .. })
        ));
        let mut g = f0.clone();
        let mid = g.len() / 2;
        g[mid] ^= 0xff;
        assert!(decode_segment(0, &idx.segments[0], &g).is_err());
        // A frame that claims more than the segment's plaintext.
        let mut small = idx.segments[1].clone();
        small.plain_len -= 1;
        small.chunks[0].1 -= 1;
        assert!(matches!(
            decode_segment(1, &small, &frames[1]),
            Err(PackError::SegmentData { .. })
        ));
    }
}
