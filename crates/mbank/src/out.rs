//! Writing to standard output and error without panicking when their reader goes away.
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader is gone fails with EPIPE, and
//! `println!` panics on it (`mbank log M | head -1`). Restoring SIGPIPE's default action
//! for the whole process would also kill `serve`, `attach` and `run` on a write to a
//! closed socket, so instead everything scripts read is written with [`outln!`], which
//! turns EPIPE on standard output into [`StdoutClosed`]. `main` ends the process on it
//! the way other Unix tools end: quietly, by SIGPIPE.

use std::io::Write;

/// The reader of standard output went away (EPIPE): nobody reads what is left.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed by its reader")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes one line to standard output. A closed pipe is [`StdoutClosed`]; any other
/// failure (a full disk under a redirected output) is an error that says so.
pub fn line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{args}") {
        Ok(()) => Ok(()),
        Err(e) => Err(stdout_error(e)),
    }
}

/// An error writing standard output, as [`line`] reports it.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("cannot write to standard output")
    }
}

/// `println!` for what scripts read: returns an `anyhow::Result` to `?` instead of
/// panicking when standard output is closed.
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// A message on standard error; lost, rather than a panic, if standard error is closed.
pub fn say(s: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{s}");
}

/// True when `e` (or one of its causes) is [`StdoutClosed`].
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// Ends the process as a Unix tool whose reader went away ends: by SIGPIPE, which
/// shells report as status 141 and do not print. Only `main` calls this, once nothing
/// is left to do.
pub fn die_of_sigpipe() -> ! {
    // SAFETY: signal(2) and raise(3) with valid constants; the process ends here, so no
    // other code runs under the changed disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    // Not reached once SIGPIPE is delivered; the status a shell would show.
    std::process::exit(128 + libc::SIGPIPE)
}
