//! Keeping QEMU's huge-page advice off a lazily served RAM file.
//!
//! QEMU advises every RAM block `MADV_HUGEPAGE`. On a file mapping that sets
//! `VM_HUGEPAGE`, and for such a mapping the kernel's page-fault path reads two
//! PMD-sized pages (4 MiB on x86-64) around each fault, whatever the file system's
//! `max_readahead` (`do_sync_mmap_readahead`). On a RAM file served lazily
//! (mbank-memfs) that turns every guest fault into a 4 MiB fetch (ARCHITECTURE.md,
//! "Lazy memory: evaluation", has the numbers).
//!
//! [`HugePageAdvice::Ignore`] installs, in the QEMU child between fork and exec, a
//! seccomp filter under which `madvise(…, MADV_HUGEPAGE)` returns 0 without doing
//! anything; every other system call, and every other advice, is untouched. A filter
//! is inherited across `exec`, needs no file on the station and no change to QEMU or
//! to host-wide settings. [`HugePageAdvice::ThpDisable`] is the measured alternative
//! (`prctl(PR_SET_THP_DISABLE)`); the kernel still sets `VM_HUGEPAGE` under it, so it
//! does not help (kept for the benchmark).

use std::io;

/// What the QEMU child does about `MADV_HUGEPAGE` before it execs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePageAdvice {
    /// Nothing: QEMU's advice applies (guest RAM in anonymous memory).
    #[default]
    Keep,
    /// `prctl(PR_SET_THP_DISABLE, 1)`: no transparent huge pages for the process.
    ThpDisable,
    /// A seccomp filter makes `madvise(…, MADV_HUGEPAGE)` a no-op returning 0.
    Ignore,
}

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// `BPF_LD | BPF_W | BPF_ABS`.
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
/// With errno 0: the call is skipped and returns 0.
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// `struct seccomp_data`: `nr` at 0, `arch` at 4, `args[6]` (u64) from 16.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of `args[2]` (little-endian).
const OFF_ARG2_LO: u32 = 16 + 2 * 8;
const OFF_ARG2_HI: u32 = 16 + 2 * 8 + 4;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

const fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jeq(k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter {
        code: BPF_JMP_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// The filter: madvise with advice MADV_HUGEPAGE on this architecture returns 0.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const FILTER: [SockFilter; 10] = [
    stmt(BPF_LD_W_ABS, OFF_ARCH),
    jeq(AUDIT_ARCH, 0, 7),
    stmt(BPF_LD_W_ABS, OFF_NR),
    jeq(libc::SYS_madvise as u32, 0, 5),
    stmt(BPF_LD_W_ABS, OFF_ARG2_LO),
    jeq(libc::MADV_HUGEPAGE as u32, 0, 3),
    stmt(BPF_LD_W_ABS, OFF_ARG2_HI),
    jeq(0, 0, 1),
    stmt(BPF_RET_K, SECCOMP_RET_ERRNO),
    stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
];

impl HugePageAdvice {
    /// Applies the choice to the calling process (and so to what it execs). Meant for
    /// `Command::pre_exec`: it only calls `prctl(2)`, which is async-signal-safe, and
    /// allocates nothing.
    pub fn apply(self) -> io::Result<()> {
        match self {
            HugePageAdvice::Keep => Ok(()),
            HugePageAdvice::ThpDisable => {
                // SAFETY: prctl with integer arguments only.
                check(unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) })
            }
            HugePageAdvice::Ignore => ignore_hugepage_advice(),
        }
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn ignore_hugepage_advice() -> io::Result<()> {
    let prog = SockFprog {
        len: FILTER.len() as u16,
        filter: FILTER.as_ptr(),
    };
    let install = || {
        // SAFETY: the kernel copies the program, which lives across the call.
        unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const SockFprog,
                0,
                0,
            )
        }
    };
    if install() == 0 {
        return Ok(());
    }
    // Without CAP_SYS_ADMIN a filter needs no_new_privs. Root does not set it, so
    // that setuid helpers QEMU may run (qemu-bridge-helper) keep working.
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EACCES) {
        return Err(e);
    }
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    check(install())
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn ignore_hugepage_advice() -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "ignoring QEMU's huge-page advice is implemented for x86-64 and aarch64 only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// A child under the filter: `madvise(MADV_HUGEPAGE)` on a fresh mapping says 0
    /// but the mapping's flags in /proc/self/smaps do not get `hg`; other advice
    /// still applies (`MADV_NOHUGEPAGE` sets `nh`).
    fn smaps_flags_after(mode: HugePageAdvice, advice: &str) -> String {
        // The child is this test binary running `advise_and_report`.
        let exe = std::env::current_exe().unwrap();
        let mut c = Command::new(exe);
        c.args(["--exact", "thp::tests::advise_and_report", "--nocapture"])
            .env("MBANK_THP_ADVICE", advice);
        // SAFETY: apply only calls prctl(2).
        unsafe {
            c.pre_exec(move || mode.apply());
        }
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix("FLAGS "))
            .unwrap_or_else(|| panic!("no flags from the child: {text}"))
            .to_string()
    }

    /// Not a test on its own: maps 4 MiB, advises it as `MBANK_THP_ADVICE` says and
    /// prints the madvise result and the mapping's VmFlags.
    #[test]
    fn advise_and_report() {
        let Ok(advice) = std::env::var("MBANK_THP_ADVICE") else {
            return;
        };
        let len = 4 << 20;
        // SAFETY: a fresh private anonymous mapping, advised and unmapped here.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let a = if advice == "huge" {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            let r = libc::madvise(p, len, a);
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let start = format!("{:x}-", p as usize);
            let flags = smaps
                .split_inclusive('\n')
                .skip_while(|l| !l.starts_with(&start))
                .find_map(|l| l.strip_prefix("VmFlags:"))
                .unwrap_or("")
                .trim()
                .to_string();
            println!("FLAGS r={r} {flags}");
            libc::munmap(p, len);
        }
    }

    #[test]
    fn the_filter_turns_hugepage_advice_into_a_no_op() {
        let keep = smaps_flags_after(HugePageAdvice::Keep, "huge");
        assert!(keep.starts_with("r=0 ") && keep.contains(" hg"), "{keep}");
        let ignored = smaps_flags_after(HugePageAdvice::Ignore, "huge");
        assert!(
            ignored.starts_with("r=0 ") && !ignored.contains(" hg"),
            "{ignored}"
        );
        let other = smaps_flags_after(HugePageAdvice::Ignore, "nohuge");
        assert!(
            other.starts_with("r=0 ") && other.contains(" nh"),
            "{other}"
        );
    }
}
