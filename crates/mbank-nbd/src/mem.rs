//! [`MemDevice`]: a sparse in-memory [`BlockDevice`] for tests, demos and benchmarks of
//! the protocol code alone.
//!
//! Memory is allocated in blocks of [`MemDevice::BLOCK`] bytes on first write, so a large
//! device that is mostly empty costs little, and block status reports real holes:
//! never-written and trimmed blocks are holes (`HOLE | ZERO`), allocated blocks that hold
//! only zeroes are `ZERO`, the rest is data. Writes are visible to every connection at
//! once and flush has nothing to do, so the device is safe for multi-conn by default.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use crate::device::{BlockDevice, DeviceError, Extent};

/// A sparse in-memory disk, for tests, demos and benchmarks of the protocol code alone.
///
/// Memory is allocated in blocks of [`MemDevice::BLOCK`] bytes on first write, so a large
/// device that is mostly empty costs little, and block status reports real holes:
/// never-written and trimmed blocks are holes (`HOLE | ZERO`), allocated blocks that hold
/// only zeroes are `ZERO`, the rest is data. Writes are visible to every connection at
/// once and flush has nothing to do, so the device is safe for multi-conn by default.
#[derive(Debug)]
pub struct MemDevice {
    size: u64,
    blocks: RwLock<Vec<Option<Box<[u8]>>>>,
    read_only: bool,
    multi_conn: bool,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    caches: AtomicU64,
}

impl MemDevice {
    /// Allocation granularity in bytes.
    pub const BLOCK: usize = 64 * 1024;

    /// An empty (all-hole) device of `size` bytes.
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(Self::BLOCK as u64);
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let mut blocks = Vec::new();
        blocks.resize_with(n, || None);
        Self {
            size,
            blocks: RwLock::new(blocks),
            read_only: false,
            multi_conn: true,
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            caches: AtomicU64::new(0),
        }
    }

    /// A device holding `data` (its size is `data.len()`).
    pub fn from_bytes(data: &[u8]) -> Self {
        let dev = Self::new(data.len() as u64);
        dev.store(0, data);
        dev
    }

    /// Makes the device refuse writes.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets what [`BlockDevice::multi_conn`] reports (true by default).
    pub fn with_multi_conn(mut self, multi_conn: bool) -> Self {
        self.multi_conn = multi_conn;
        self
    }

    /// How many flushes the device has seen.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// How many writes (including write-zeroes) asked for FUA.
    pub fn fua_write_count(&self) -> u64 {
        self.fua_writes.load(Ordering::Relaxed)
    }

    /// How many cache (prefetch) hints the device has seen.
    pub fn cache_count(&self) -> u64 {
        self.caches.load(Ordering::Relaxed)
    }

    /// The whole content (holes read as zeroes). Meant for small test devices.
    pub fn to_vec(&self) -> Vec<u8> {
        let len = usize::try_from(self.size).unwrap_or(usize::MAX);
        let mut out = vec![0u8; len];
        self.read_into(0, &mut out);
        out
    }

    /// True if the block holding byte `offset` has been allocated.
    pub fn is_allocated(&self, offset: u64) -> bool {
        let blocks = self.blocks.read().unwrap_or_else(PoisonError::into_inner);
        usize::try_from(offset / Self::BLOCK as u64)
            .ok()
            .and_then(|i| blocks.get(i))
            .is_some_and(Option::is_some)
    }

    fn block_len(&self, index: usize) -> usize {
        let start = index as u64 * Self::BLOCK as u64;
        (self.size - start).min(Self::BLOCK as u64) as usize
    }

    /// Splits `[offset, offset+len)` into (block index, offset in block, length) pieces.
    /// Callers guarantee the range lies within the device.
    fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let block = Self::BLOCK as u64;
        let end = offset + len as u64;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let index = (pos / block) as usize;
            let within = (pos % block) as usize;
            let n = (Self::BLOCK - within).min((end - pos) as usize);
            pos += n as u64;
            Some((index, within, n))
        })
    }

    fn read_into(&self, offset: u64, out: &mut [u8]) {
        let blocks = self.blocks.read().unwrap_or_else(PoisonError::into_inner);
        let mut done = 0;
        for (index, within, n) in Self::pieces(offset, out.len()) {
            let dst = &mut out[done..done + n];
            match blocks.get(index).and_then(Option::as_ref) {
                Some(b) => dst.copy_from_slice(&b[within..within + n]),
                None => dst.fill(0),
            }
            done += n;
        }
    }

    /// Stores `data` at `offset` directly (to seed a test device); fails if the range
    /// reaches past the end.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let fits = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.size);
        if !fits {
            return Err(DeviceError::Invalid(format!(
                "{} bytes at offset {offset} reach past the end of a {}-byte device",
                data.len(),
                self.size
            )));
        }
        self.store(offset, data);
        Ok(())
    }

    fn store(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.blocks.write().unwrap_or_else(PoisonError::into_inner);
        let mut done = 0;
        for (index, within, n) in Self::pieces(offset, data.len()) {
            let block_len = self.block_len(index);
            if let Some(slot) = blocks.get_mut(index) {
                let b = slot.get_or_insert_with(|| vec![0u8; block_len].into_boxed_slice());
                b[within..within + n].copy_from_slice(&data[done..done + n]);
            }
            done += n;
        }
    }

    /// Zeroes a range; whole blocks are deallocated when `punch` is set.
    fn zero_range(&self, offset: u64, len: usize, punch: bool) {
        let mut blocks = self.blocks.write().unwrap_or_else(PoisonError::into_inner);
        for (index, within, n) in Self::pieces(offset, len) {
            let whole = within == 0 && n == self.block_len(index);
            let block_len = self.block_len(index);
            let Some(slot) = blocks.get_mut(index) else {
                continue;
            };
            if whole && punch {
                *slot = None;
            } else if punch {
                if let Some(b) = slot {
                    b[within..within + n].fill(0);
                }
            } else {
                let b = slot.get_or_insert_with(|| vec![0u8; block_len].into_boxed_slice());
                b[within..within + n].fill(0);
            }
        }
    }

    fn check_writable(&self) -> Result<(), DeviceError> {
        if self.read_only {
            Err(DeviceError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn(&self) -> bool {
        self.multi_conn
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        let mut out = vec![0u8; len as usize];
        self.read_into(offset, &mut out);
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.check_writable()?;
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        self.store(offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.check_writable()?;
        self.zero_range(offset, len as usize, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.check_writable()?;
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        self.zero_range(offset, len as usize, !no_hole);
        Ok(())
    }

    async fn cache(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        self.caches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let blocks = self.blocks.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<Extent> = Vec::new();
        for (index, within, n) in Self::pieces(offset, len as usize) {
            let ext = match blocks.get(index).and_then(Option::as_ref) {
                None => Extent::hole(n as u32),
                Some(b) if crate::is_zero(&b[within..within + n]) => Extent::zero(n as u32),
                Some(_) => Extent::data(n as u32),
            };
            match out.last_mut() {
                Some(last) if last.hole == ext.hole && last.zero == ext.zero => {
                    last.len += ext.len;
                }
                _ => out.push(ext),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn sparse_read_write_trim() {
        let size = 3 * MemDevice::BLOCK as u64 + 100;
        let dev = MemDevice::new(size);
        block_on(async {
            assert_eq!(
                dev.block_status(0, size as u32).await.unwrap(),
                vec![Extent::hole(size as u32)]
            );
            dev.write(MemDevice::BLOCK as u64 - 2, vec![7; 4], false)
                .await
                .unwrap();
            let got = dev.read(MemDevice::BLOCK as u64 - 4, 8).await.unwrap();
            assert_eq!(got, vec![0, 0, 7, 7, 7, 7, 0, 0]);
            let st = dev.block_status(0, size as u32).await.unwrap();
            assert_eq!(
                st,
                vec![
                    Extent::data(2 * MemDevice::BLOCK as u32),
                    Extent::hole(MemDevice::BLOCK as u32 + 100)
                ]
            );
            // Trim the first block whole: it becomes a hole again, data stays in block 1.
            dev.trim(0, MemDevice::BLOCK as u32).await.unwrap();
            assert!(!dev.is_allocated(0));
            assert!(dev.is_allocated(MemDevice::BLOCK as u64));
            // Zeroes without punching keep the block allocated and report ZERO.
            dev.write_zeroes(MemDevice::BLOCK as u64, MemDevice::BLOCK as u32, true, true)
                .await
                .unwrap();
            let st = dev
                .block_status(MemDevice::BLOCK as u64, MemDevice::BLOCK as u32)
                .await
                .unwrap();
            assert_eq!(st, vec![Extent::zero(MemDevice::BLOCK as u32)]);
            assert_eq!(dev.fua_write_count(), 1);
            // The partial last block works.
            dev.write(size - 10, vec![1; 10], false).await.unwrap();
            assert_eq!(dev.read(size - 10, 10).await.unwrap(), vec![1; 10]);
        });
        assert_eq!(dev.to_vec().len() as u64, size);
    }

    #[test]
    fn read_only_refuses_writes() {
        let dev = MemDevice::new(4096).with_read_only(true);
        block_on(async {
            assert!(matches!(
                dev.write(0, vec![1], false).await,
                Err(DeviceError::ReadOnly)
            ));
        });
    }
}
