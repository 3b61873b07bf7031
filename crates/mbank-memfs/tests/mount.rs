//! The mounted file system under a shared mapping, as QEMU uses it: pages written
//! through the mapping reach the image on [`MemMount::write_out`], which marks their
//! chunks changed, without an unmount or a sync of the overlay.

use std::sync::Arc;

use mbank_memfs::{FetchError, Fetcher, Layout, MemImage, MemMount, MountOptions};

const CS: u32 = 64 << 10;

/// An all-zero image fetches nothing.
struct NoFetch;

impl Fetcher for NoFetch {
    fn fetch(&self, chunk: usize) -> Result<Vec<u8>, FetchError> {
        Err(FetchError::new(format!("chunk {chunk} is zero")))
    }
}

#[test]
fn pages_written_through_a_shared_mapping_are_changed_chunks_after_write_out() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout {
        size: 64 * CS as u64,
        chunk_size: CS,
    };
    let image = MemImage::create(
        layout,
        &vec![false; layout.chunks()],
        &dir.path().join("overlay"),
        Arc::new(NoFetch),
    )
    .unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = MemMount::mount(&mnt, Arc::new(image), MountOptions::default()).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();
    let len = layout.size as usize;
    // SAFETY: a fresh shared mapping of the whole file, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: p maps len bytes, writable.
    let ram = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) };
    ram[3 * CS as usize + 100] = 7;
    ram[40 * CS as usize] = 9;
    m.write_out().unwrap();
    assert_eq!(m.image().take_changed(), vec![3, 40]);
    assert_eq!(m.image().read_chunk(40).unwrap()[0], 9);
    // Written again: only that chunk.
    ram[40 * CS as usize + 1] = 10;
    m.write_out().unwrap();
    assert_eq!(m.image().take_changed(), vec![40]);
    m.write_out().unwrap();
    assert!(m.image().take_changed().is_empty(), "nothing new");
    assert_eq!(m.image().dirty_chunks(), vec![3, 40]);
    // SAFETY: unmapping what was mapped above.
    unsafe { libc::munmap(p, len) };
    drop(f);
    m.unmount().unwrap();
}
