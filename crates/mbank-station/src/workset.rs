//! Recorded working sets: the chunks a machine needed while it started, in order of
//! first use, stored with a version so that a later session of it (or of a later
//! version, or of a fork) on any station can fetch them ahead of the guest.
//!
//! A session records ([`crate::device::Disk`]) each chunk the guest reads for the first
//! time (by its place in the disk) and each chunk of a stream it fetches (kernel,
//! initrd, memory on resume), from the session's start until the guest is ready: a
//! quiet period with no new chunk ([`DEFAULT_QUIET_MS`]) or a time bound
//! ([`DEFAULT_MAX_MS`]). Check-in stores the list as the version's stream named
//! [`STREAM_NAME`]; like the kernel and initrd streams, later versions and forks
//! inherit it until a session records a new one.
//!
//! A replay fetches a disk entry by its place in the *session's* version (the chunk
//! there now, which a later version may have changed) and a stream entry by its id.
//! The list is advice: a record that does not parse, or entries naming chunks the bank
//! no longer has, are skipped with a warning and the session goes on.
//!
//! The byte layout is in `docs/formats.md` ("Working set"); the constants here match it.

use mbank_core::ChunkId;

/// The name of the version stream holding a working set.
pub const STREAM_NAME: &str = "workset";
/// `MBWS`.
pub const MAGIC: [u8; 4] = *b"MBWS";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 32;
pub const ENTRY_LEN: usize = 48;
pub const TRAILER_LEN: usize = 32;
/// Most entries a record may hold (48 MiB of entries).
pub const MAX_ENTRIES: u64 = 1 << 20;
/// Entry kind: a chunk of the disk, by its place.
pub const KIND_DISK: u8 = 1;
/// Entry kind: a chunk of a stream (kernel, initrd, memory), by its id.
pub const KIND_STREAM: u8 = 2;
/// Recording ends once no new chunk was needed for this long (ms)...
pub const DEFAULT_QUIET_MS: u64 = 15_000;
/// ...or this long after the session started (ms), whichever comes first.
pub const DEFAULT_MAX_MS: u64 = 300_000;

/// One chunk of a working set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    /// The chunk at this place (chunk index) of the disk; `id` is what was there when
    /// it was recorded.
    Disk { place: u64, id: ChunkId },
    /// A chunk of one of the version's streams.
    Stream { id: ChunkId },
}

/// A working set: the chunk size of the disk it was recorded on, and its entries in
/// order of first use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    pub chunk_size: u32,
    pub entries: Vec<Entry>,
}

impl WorkingSet {
    /// This list, then the entries of `inherited` it lacks (in their order), when this
    /// one is less than half as long: a recording cut short (a guest slowed by a busy
    /// station goes quiet before it is ready) must not replace a good list it
    /// inherited. A list at least half as long as the inherited one replaces it, so
    /// chunks no longer needed leave the list.
    pub fn merged_with(mut self, inherited: &WorkingSet) -> WorkingSet {
        if self.chunk_size != inherited.chunk_size
            || self.entries.len() * 2 >= inherited.entries.len()
        {
            return self;
        }
        let have: std::collections::HashSet<Entry> = self.entries.iter().copied().collect();
        let room = (MAX_ENTRIES as usize).saturating_sub(self.entries.len());
        self.entries.extend(
            inherited
                .entries
                .iter()
                .filter(|e| !have.contains(e))
                .take(room)
                .copied(),
        );
        self
    }
}

/// Why a working-set record could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorksetError {
    #[error("the record is {len} bytes, shorter than its header and trailer")]
    Short { len: usize },
    #[error("the record does not start with the working-set magic MBWS")]
    Magic,
    #[error("the record is of format version {0}, which this mbank does not know")]
    Version(u8),
    #[error("the record claims {0} entries, more than the {MAX_ENTRIES} allowed")]
    TooMany(u64),
    #[error("the record is {len} bytes, but {count} entries need {want}")]
    Length { len: usize, count: u64, want: usize },
    #[error("the record's checksum does not match its bytes")]
    Checksum,
    #[error("entry {index} is of unknown kind {kind}")]
    Kind { index: u64, kind: u8 },
}

impl WorkingSet {
    /// The record's bytes: header, entries, BLAKE3 trailer.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + self.entries.len() * ENTRY_LEN + TRAILER_LEN);
        b.extend_from_slice(&MAGIC);
        b.push(FORMAT_VERSION);
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        for e in &self.entries {
            let (kind, place, id) = match e {
                Entry::Disk { place, id } => (KIND_DISK, *place, id),
                Entry::Stream { id } => (KIND_STREAM, 0, id),
            };
            b.push(kind);
            b.extend_from_slice(&[0; 7]);
            b.extend_from_slice(&place.to_le_bytes());
            b.extend_from_slice(id.as_bytes());
        }
        let sum = ChunkId::of(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    /// Parses a record, checking its length against its count before allocating and
    /// its checksum before reading any entry.
    pub fn decode(b: &[u8]) -> Result<WorkingSet, WorksetError> {
        if b.len() < HEADER_LEN + TRAILER_LEN {
            return Err(WorksetError::Short { len: b.len() });
        }
        if b[..4] != MAGIC {
            return Err(WorksetError::Magic);
        }
        if b[4] != FORMAT_VERSION {
            return Err(WorksetError::Version(b[4]));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let chunk_size = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let count = u64_at(16);
        if count > MAX_ENTRIES {
            return Err(WorksetError::TooMany(count));
        }
        let want = HEADER_LEN + count as usize * ENTRY_LEN + TRAILER_LEN;
        if b.len() != want {
            return Err(WorksetError::Length {
                len: b.len(),
                count,
                want,
            });
        }
        let body = &b[..b.len() - TRAILER_LEN];
        if ChunkId::of(body).as_bytes()[..] != b[b.len() - TRAILER_LEN..] {
            return Err(WorksetError::Checksum);
        }
        let mut entries = Vec::with_capacity(count as usize);
        for (index, e) in body[HEADER_LEN..].chunks_exact(ENTRY_LEN).enumerate() {
            let id = ChunkId::from_bytes(e[16..48].try_into().expect("32 bytes"));
            let place = u64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
            entries.push(match e[0] {
                KIND_DISK => Entry::Disk { place, id },
                KIND_STREAM => Entry::Stream { id },
                kind => {
                    return Err(WorksetError::Kind {
                        index: index as u64,
                        kind,
                    });
                }
            });
        }
        Ok(WorkingSet {
            chunk_size,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkingSet {
        WorkingSet {
            chunk_size: 65536,
            entries: vec![
                Entry::Stream {
                    id: ChunkId::of(b"kernel"),
                },
                Entry::Disk {
                    place: 7,
                    id: ChunkId::of(b"seven"),
                },
                Entry::Disk {
                    place: 0,
                    id: ChunkId::of(b"zero"),
                },
            ],
        }
    }

    #[test]
    fn a_short_recording_keeps_the_list_it_inherited() {
        let id = |n: u8| ChunkId::of(&[n]);
        let disk = |p: u64| Entry::Disk {
            place: p,
            id: id(p as u8),
        };
        let inherited = WorkingSet {
            chunk_size: 65536,
            entries: (0..10).map(disk).collect(),
        };
        // Cut short: its own order first, then what it lacks of the inherited list.
        let short = WorkingSet {
            chunk_size: 65536,
            entries: vec![disk(7), Entry::Stream { id: id(99) }],
        };
        let m = short.merged_with(&inherited);
        assert_eq!(m.entries.len(), 11);
        assert_eq!(m.entries[..2], [disk(7), Entry::Stream { id: id(99) }]);
        assert_eq!(
            m.entries[2..],
            (0..10).filter(|&p| p != 7).map(disk).collect::<Vec<_>>()[..]
        );
        // A full recording replaces it.
        let full = WorkingSet {
            chunk_size: 65536,
            entries: (5..12).map(disk).collect(),
        };
        assert_eq!(full.clone().merged_with(&inherited), full);
    }

    #[test]
    fn round_trip() {
        let w = sample();
        let b = w.encode();
        assert_eq!(b.len(), HEADER_LEN + 3 * ENTRY_LEN + TRAILER_LEN);
        assert_eq!(WorkingSet::decode(&b), Ok(w));
        assert_eq!(
            WorkingSet::decode(&WorkingSet::default().encode()),
            Ok(WorkingSet::default())
        );
    }

    #[test]
    fn damaged_records_are_refused() {
        let b = sample().encode();
        for cut in [0, 10, HEADER_LEN, b.len() - 1] {
            assert!(WorkingSet::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        for at in [0, 4, HEADER_LEN + 3, HEADER_LEN + 20, b.len() - 1] {
            let mut c = b.clone();
            c[at] ^= 0x40;
            assert!(WorkingSet::decode(&c).is_err(), "bit flipped at {at}");
        }
        // A huge count is refused before anything is allocated.
        let mut c = b.clone();
        c[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(WorkingSet::decode(&c), Err(WorksetError::TooMany(u64::MAX)));
    }
}
