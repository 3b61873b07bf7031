//! The seam under the protocol: what an exported disk must do.
//!
//! The station implements [`BlockDevice`] over its overlay, chunk cache and bank; tests
//! use [`crate::MemDevice`]. The server checks every range against [`BlockDevice::size`]
//! before calling the device, so an implementation never sees a request that reaches
//! past the end, a zero-length request, or a write to a device that says it is read-only.

use std::future::Future;
use std::io;

use thiserror::Error;

/// A disk the NBD server can export.
///
/// Methods take `&self` and may run concurrently: the server runs up to
/// `ServerOptions::max_in_flight` requests per connection at once, and a device may be
/// served on several connections. Ordering between overlapping requests in flight is the
/// client's business, as in NBD itself.
///
/// Durability contract (DESIGN §5.4): `flush` returns only once every write that
/// completed before it was called is durable; `write`/`write_zeroes` with `fua` return
/// only once that write is durable.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes. Must not change while it is being served.
    fn size(&self) -> u64;

    /// True if writes must be refused (the server answers them with `EPERM` and
    /// advertises `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool {
        false
    }

    /// True if all connections see each other's writes after a flush on any one (safe for
    /// NBD multi-conn).
    fn multi_conn(&self) -> bool {
        false
    }

    /// The I/O size below which requests cost a read-modify-write, advertised to clients
    /// as the preferred block size. Must be a power of two of at least 512; the server
    /// falls back to 4096 otherwise.
    fn preferred_block_size(&self) -> u32 {
        4096
    }

    /// Reads `len` bytes at `offset`. Must return exactly `len` bytes.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<u8>, DeviceError>> + Send;

    /// Writes `data` at `offset`; durable before returning if `fua`.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Discards a range (a hint: the device may keep the data, or read back anything).
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Makes a range read as zeroes. Unless `no_hole`, the device may deallocate it; with
    /// `no_hole` it must stay allocated. Durable before returning if `fua`.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Prefetch hint: the client will soon read this range.
    fn cache(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Allocation status of a range, as consecutive extents from `offset`. The extents may
    /// cover less than `len` (the client asks again for the rest) but should cover at least
    /// one byte; the server trims them to the request and merges equal neighbours.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, DeviceError>> + Send;
}

/// One run of bytes with the same allocation status (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u32,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// Allocated data of unknown content.
    pub fn data(len: u32) -> Self {
        Self {
            len,
            hole: false,
            zero: false,
        }
    }

    /// Unallocated, reads as zeroes.
    pub fn hole(len: u32) -> Self {
        Self {
            len,
            hole: true,
            zero: true,
        }
    }

    /// Allocated, known to read as zeroes.
    pub fn zero(len: u32) -> Self {
        Self {
            len,
            hole: false,
            zero: true,
        }
    }

    /// The `base:allocation` status flags.
    pub fn status_flags(&self) -> u32 {
        let mut flags = 0;
        if self.hole {
            flags |= crate::proto::STATE_HOLE;
        }
        if self.zero {
            flags |= crate::proto::STATE_ZERO;
        }
        flags
    }
}

/// Why a device could not do what was asked. The server turns each into an NBD error
/// value in exactly one place, [`crate::device_errno`].
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A local I/O operation failed; `what` names the action and the object.
    #[error("{what}: {source}")]
    Io {
        /// The action and the object, e.g. "reading chunk 3f2a… from the station cache".
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The storage behind the device is full (or over quota).
    #[error("{0}: no space left on the device")]
    NoSpace(String),
    /// The request is not valid for this device (beyond what the server checks).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The device refuses writes.
    #[error("the device is read-only")]
    ReadOnly,
    /// The data lives in the bank and the bank cannot be reached; retrying may help.
    #[error("{0}: the bank is unreachable (retrying may help)")]
    Unavailable(String),
}

impl DeviceError {
    /// A local I/O failure.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// True if the same request may succeed later without any change on the client's side.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            Self::NoSpace(_) | Self::Invalid(_) | Self::ReadOnly => false,
        }
    }
}
