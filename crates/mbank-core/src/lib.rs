//! # mbank-core
//!
//! The vocabulary every other Machine Bank crate speaks, with no I/O of its own:
//!
//! - [`ids`]: newtypes for chunk ids, version ids and machine names. A chunk id is the
//!   BLAKE3-256 hash of a chunk's plaintext and can never be confused with a version id.
//! - [`chunk`]: the stored form of one chunk (a 16-byte header, then the zstd or raw
//!   payload) and the one function that decodes it, which always re-hashes the plaintext.
//! - [`index`]: the ordered list of chunk ids that makes up a disk (fixed-size chunks) or
//!   a memory image (content-defined chunks), and its serialised form.
//! - [`cdc`]: content-defined chunking (FastCDC) of a stream of unknown length.
//! - [`pack`]: a version's chunks compressed as a few large frames, for sending a whole
//!   disk over a link.
//!
//! Every byte layout here is documented in `docs/formats.md`; the constants in this crate
//! are the ones that document names. Every parser checks a size bound before it reads.

pub mod cdc;
pub mod chunk;
pub mod ids;
pub mod index;
pub mod pack;

pub use chunk::{ChunkError, Codec, DecodedChunk, EncodedChunk};
pub use ids::{ChunkId, IdError, MachineName, MachineRef, VersionId};
pub use index::{DiskIndex, IndexError, MemoryIndex, MemoryRun};

/// Smallest disk chunk size a machine may use (4 KiB, one guest page / sector group).
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest disk chunk size a machine may use (4 MiB).
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Default disk chunk size; see `docs/BENCHMARKS.md` for the measurement behind it.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// Checks that `size` is a power of two between [`MIN_CHUNK_SIZE`] and [`MAX_CHUNK_SIZE`].
pub fn valid_chunk_size(size: u64) -> bool {
    size.is_power_of_two() && (MIN_CHUNK_SIZE as u64..=MAX_CHUNK_SIZE as u64).contains(&size)
}

/// True when every byte of `data` is zero. Zero chunks are never stored.
pub fn is_zero(data: &[u8]) -> bool {
    // Compare in word-sized pieces; the compiler vectorises this loop.
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only returns a middle
        // slice whose elements are properly aligned.
        unsafe { data.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0)
        && words.iter().fold(0u64, |acc, &w| acc | w) == 0
        && suffix.iter().all(|&b| b == 0)
}

/// Year, month (1-12) and day of the day `z` days after 1970-01-01 (Howard Hinnant's
/// algorithm), in the proleptic Gregorian calendar.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Milliseconds since the epoch → `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn utc_datetime(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4099]));
        for pos in [0usize, 1, 7, 8, 4000, 4098] {
            let mut v = vec![0u8; 4099];
            v[pos] = 1;
            assert!(!is_zero(&v), "byte {pos}");
            assert!(!is_zero(&v[1..]) || pos == 0);
        }
    }

    #[test]
    fn chunk_sizes() {
        assert!(valid_chunk_size(4096));
        assert!(valid_chunk_size(64 * 1024));
        assert!(valid_chunk_size(4 << 20));
        assert!(!valid_chunk_size(2048));
        assert!(!valid_chunk_size(8 << 20));
        assert!(!valid_chunk_size(65 * 1024));
    }
}
