//! The one mapping from why a request failed to the NBD error value the client sees.
//!
//! A request fails either because the server refused it before asking the device
//! ([`Refusal`]: bad range, read-only export, unknown command, bad flags) or because the
//! device failed ([`DeviceError`]). [`failure_errno`] and [`device_errno`] are the only
//! places where NBD error numbers are chosen; both are exhaustive matches, so a new error
//! variant cannot compile without a decision here.
//!
//! | failure | NBD error |
//! | --- | --- |
//! | read, trim, cache or block status past the end; unknown command; bad flags; too large; block status without a context; zero-length block status | `EINVAL` |
//! | write or write-zeroes past the end; device out of space (also `EDQUOT`, `EFBIG`) | `ENOSPC` |
//! | write, trim or write-zeroes on a read-only export; device says read-only or permission denied | `EPERM` |
//! | device I/O failure; bank unreachable | `EIO` |
//! | device says the request is invalid | `EINVAL` |

use std::io;

use thiserror::Error;

use crate::device::DeviceError;
use crate::proto::{Command, EINVAL, EIO, ENOSPC, EPERM};

/// A request the server refused without calling the device.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The range reaches past the end of the export (reads, trims, cache, block status).
    #[error(
        "{} of {len} bytes at offset {offset} reaches past the end of the export ({size} bytes)",
        command.name()
    )]
    OutOfRange {
        /// The command.
        command: Command,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u32,
        /// Export size.
        size: u64,
    },
    /// A write reaches past the end of the export.
    #[error(
        "{} of {len} bytes at offset {offset} would write past the end of the export ({size} bytes)",
        command.name()
    )]
    PastEnd {
        /// The command.
        command: Command,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u32,
        /// Export size.
        size: u64,
    },
    /// A write-like command on a read-only export.
    #[error("{} refused: the export is read-only", command.name())]
    ReadOnly {
        /// The command.
        command: Command,
    },
    /// A command type this server does not know.
    #[error("unknown command type {0}")]
    UnknownCommand(u16),
    /// Command flags that are unknown or not valid for the command.
    #[error("command flags {flags:#x} are not valid for {}", command.name())]
    BadFlags {
        /// The command.
        command: Command,
        /// The offending flags.
        flags: u16,
    },
    /// A read longer than the advertised maximum block size.
    #[error("{} of {len} bytes exceeds the {max}-byte maximum", command.name())]
    TooLarge {
        /// The command.
        command: Command,
        /// Requested length.
        len: u32,
        /// The maximum.
        max: u32,
    },
    /// `BLOCK_STATUS` without a metadata context selected during the handshake.
    #[error("BLOCK_STATUS needs the base:allocation metadata context, which was not negotiated")]
    NoMetaContext,
    /// `BLOCK_STATUS` of zero bytes (it cannot return the nonzero extent it must).
    #[error("BLOCK_STATUS of zero bytes")]
    ZeroLengthStatus,
}

/// Why one request failed.
#[derive(Debug, Error)]
pub enum Failure {
    /// The server refused it.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// The NBD error value for a failed request.
pub fn failure_errno(failure: &Failure) -> u32 {
    match failure {
        Failure::Device(e) => device_errno(e),
        Failure::Refused(r) => match r {
            Refusal::OutOfRange { .. }
            | Refusal::UnknownCommand(_)
            | Refusal::BadFlags { .. }
            | Refusal::TooLarge { .. }
            | Refusal::NoMetaContext
            | Refusal::ZeroLengthStatus => EINVAL,
            Refusal::PastEnd { .. } => ENOSPC,
            Refusal::ReadOnly { .. } => EPERM,
        },
    }
}

/// The NBD error value for a device error.
pub fn device_errno(error: &DeviceError) -> u32 {
    match error {
        DeviceError::Io { source, .. } => io_errno(source),
        DeviceError::NoSpace(_) => ENOSPC,
        DeviceError::Invalid(_) => EINVAL,
        DeviceError::ReadOnly => EPERM,
        // NBD has no "try again" value; EIO makes the guest's block layer report and
        // (for QEMU, with werror=stop / rerror=stop) pause rather than corrupt.
        DeviceError::Unavailable(_) => EIO,
    }
}

/// proto.md: "SHOULD map the EDQUOT and EFBIG errors to ENOSPC".
fn io_errno(error: &io::Error) -> u32 {
    match error.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            ENOSPC
        }
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => EPERM,
        io::ErrorKind::InvalidInput => EINVAL,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let r = |r: Refusal| failure_errno(&Failure::Refused(r));
        assert_eq!(
            r(Refusal::OutOfRange {
                command: Command::Read,
                offset: 0,
                len: 1,
                size: 0
            }),
            EINVAL
        );
        assert_eq!(
            r(Refusal::PastEnd {
                command: Command::Write,
                offset: 0,
                len: 1,
                size: 0
            }),
            ENOSPC
        );
        assert_eq!(
            r(Refusal::ReadOnly {
                command: Command::Trim
            }),
            EPERM
        );
        assert_eq!(r(Refusal::UnknownCommand(99)), EINVAL);
        let d = |e: DeviceError| failure_errno(&Failure::Device(e));
        assert_eq!(d(DeviceError::NoSpace("x".into())), ENOSPC);
        assert_eq!(d(DeviceError::ReadOnly), EPERM);
        assert_eq!(d(DeviceError::Unavailable("x".into())), EIO);
        assert_eq!(d(DeviceError::Invalid("x".into())), EINVAL);
        assert_eq!(
            d(DeviceError::io(
                "w",
                io::Error::from(io::ErrorKind::StorageFull)
            )),
            ENOSPC
        );
        assert_eq!(
            d(DeviceError::io(
                "w",
                io::Error::from(io::ErrorKind::QuotaExceeded)
            )),
            ENOSPC
        );
        assert_eq!(
            d(DeviceError::io("w", io::Error::from(io::ErrorKind::Other))),
            EIO
        );
    }
}
