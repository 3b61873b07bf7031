//! Content-defined chunking of a stream of unknown length (memory images).
//!
//! FastCDC (the 2020 variant) with a minimum of 16 KiB, an average of 64 KiB and a
//! maximum of 256 KiB. A cut depends only on nearby content, so a page that did not
//! change between two suspends lands in a chunk that is already in the bank.

use std::io::Read;

pub const MIN_SIZE: u32 = 16 * 1024;
pub const AVG_SIZE: u32 = 64 * 1024;
pub const MAX_SIZE: u32 = 256 * 1024;

/// Cuts `reader` into content-defined chunks and hands each to `f` in order.
/// Errors from the reader, or from `f`, stop the stream and are returned.
pub fn chunk_stream<R: Read, E: From<std::io::Error>>(
    reader: R,
    mut f: impl FnMut(Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let cdc = fastcdc::v2020::StreamCDC::new(reader, MIN_SIZE, AVG_SIZE, MAX_SIZE);
    for chunk in cdc {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        })?;
        f(chunk.data)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn cuts_reassemble_and_resynchronise() {
        let a = pseudo_random(2 << 20, 7);
        let mut pieces = Vec::new();
        chunk_stream::<_, std::io::Error>(&a[..], |c| {
            pieces.push(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(pieces.concat(), a);
        assert!(pieces.iter().all(|p| p.len() <= MAX_SIZE as usize));
        // Insert bytes near the start: most later chunks are unchanged.
        let mut b = a.clone();
        b.splice(1000..1000, [1, 2, 3]);
        let mut after = Vec::new();
        chunk_stream::<_, std::io::Error>(&b[..], |c| {
            after.push(c);
            Ok(())
        })
        .unwrap();
        let same = after.iter().filter(|c| pieces.contains(c)).count();
        assert!(
            same + 3 >= pieces.len(),
            "{same} of {} reused",
            pieces.len()
        );
    }
}
