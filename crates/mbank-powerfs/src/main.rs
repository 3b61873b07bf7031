//! `mbank-powerfs MOUNTPOINT DUMP_DIR [--journal] [--keep-unsynced SEED] [--cut-after N]`
//!
//! Mounts the power-fail file system (see the crate docs) on MOUNTPOINT and serves it
//! until a signal: SIGUSR1 cuts the power; SIGTERM or SIGINT shut down cleanly
//! (everything synced). Either way the durable state is then written to DUMP_DIR
//! (created, must not exist), the file system is unmounted lazily, and the program
//! exits 0, printing `dumped DUMP_DIR (cut|clean)`.

use std::path::PathBuf;
use std::process::ExitCode;

use mbank_powerfs::{Metadata, Options, PowerMount};

const USAGE: &str =
    "usage: mbank-powerfs MOUNTPOINT DUMP_DIR [--journal] [--keep-unsynced SEED] [--cut-after N]";

fn parse() -> Result<(PathBuf, PathBuf, Options), String> {
    let mut args = std::env::args_os().skip(1);
    let mut paths = Vec::new();
    let mut opts = Options::default();
    while let Some(a) = args.next() {
        let mut number = |what: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.to_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| format!("{what} needs a number\n{USAGE}"))
        };
        match a.to_str() {
            Some("--journal") => opts.metadata = Metadata::Journal,
            Some("--keep-unsynced") => opts.keep_unsynced = Some(number("--keep-unsynced")?),
            Some("--cut-after") => opts.cut_after = Some(number("--cut-after")?),
            Some(s) if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            _ => paths.push(PathBuf::from(a)),
        }
    }
    match <[PathBuf; 2]>::try_from(paths) {
        Ok([mount, dump]) => Ok((mount, dump, opts)),
        Err(_) => Err(USAGE.into()),
    }
}

fn main() -> ExitCode {
    let (mount, dump, opts) = match parse() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if dump.exists() {
        eprintln!(
            "mbank-powerfs: {} exists; give a new directory for the durable state",
            dump.display()
        );
        return ExitCode::from(2);
    }
    // Block the signals in every thread (the FUSE thread inherits the mask), then
    // wait for one here.
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask reads it; no other thread exists yet.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let fs = match PowerMount::mount(&mount, opts) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("mbank-powerfs: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("mounted {}", mount.display());
    let mut sig = 0;
    // SAFETY: `set` was initialised above; sigwait writes the signal into `sig`.
    unsafe { libc::sigwait(&set, &mut sig) };
    let how = if sig == libc::SIGUSR1 {
        fs.cut();
        "cut"
    } else {
        if let Err(e) = fs.sync_all() {
            eprintln!("mbank-powerfs: {e}; writing the state as the cut left it");
        }
        "clean"
    };
    let r = std::fs::create_dir_all(&dump)
        .map_err(|e| format!("cannot create {}: {e}", dump.display()))
        .and_then(|_| fs.dump(&dump).map_err(|e| e.to_string()));
    if let Err(e) = fs.unmount() {
        eprintln!("mbank-powerfs: {e}");
    }
    match r {
        Ok(()) => {
            println!("dumped {} ({how})", dump.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mbank-powerfs: {e}");
            ExitCode::FAILURE
        }
    }
}
