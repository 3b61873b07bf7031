//! The short run of the fault-injection script (`scripts/fault-inject.sh --quick`)
//! against the binary under test: kill -9 of attach during writes and during check-in,
//! full disks, a short concurrent stress and malformed NBD traffic. The long run and its
//! numbers are in docs/RELIABILITY.md. A second test checks that the script's checks
//! bite: a station whose `recover` drops the sessions must be reported as lost writes.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fault-inject.sh")
}

/// Runs the script with `MBANK=binary` and `args`.
fn run_script(binary: &Path, args: &[&str]) -> Output {
    common::require_root("the fault-injection script");
    common::require_tool("nbdsh", "libnbd-bin python3-libnbd");
    Command::new("bash")
        .arg(script())
        .args(args)
        .env("MBANK", binary)
        .env_remove("MBANK_BANK")
        .env_remove("MBANK_CACHE")
        .env_remove("MBANK_KEEP_TMP")
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/fault-inject.sh")
}

/// The counts of the script's summary (`  name   N` lines).
fn counts(stdout: &str) -> BTreeMap<String, u64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("  ["))
        .filter_map(|l| {
            let (k, v) = l.trim().rsplit_once(' ')?;
            Some((k.trim().to_string(), v.parse().ok()?))
        })
        .collect()
}

fn seed() -> String {
    (common::Rng::from_clock("fault injection").next_u64() % (1 << 32)).to_string()
}

#[test]
fn the_quick_fault_injection_run_finds_no_lost_write_or_crash() {
    let seed = seed();
    let o = run_script(Path::new(common::BIN), &["--quick", "--seed", &seed]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stdout.contains("ok: no lost write"),
        "fault injection found problems ({:?}); repeat with \
         `MBANK={} scripts/fault-inject.sh --quick --seed {seed}`:\n{stdout}\n{stderr}",
        o.status,
        common::BIN
    );
    // Every phase ran its trials: a run that did nothing would also find nothing.
    let c = counts(&stdout);
    let at_least = |k: &str, n: u64| {
        let got = c.get(k).copied().unwrap_or(0);
        assert!(got >= n, "{k}: {got}, want at least {n}:\n{stdout}");
    };
    at_least("kill-write: attach killed", 4);
    at_least("kill-write: writes durable", 1);
    let checkins = c.get("kill-checkin: killed during check-in").unwrap_or(&0)
        + c.get("kill-checkin: check-in finished before the kill")
            .unwrap_or(&0);
    assert_eq!(checkins, 4, "kill-checkin trials:\n{stdout}");
    at_least("disk-full cases", 5);
    at_least("disk-full: import into a full bank", 2);
    at_least("stress: sessions checked in", 1);
    at_least("stress: imports", 1);
    at_least("stress: surviving versions", 1);
    at_least("malformed-nbd: messages sent", 600);
    at_least("malformed-nbd: connections that reached transmission", 1);
    at_least("versions checked by sha256", 1);
}

#[test]
fn the_script_reports_a_recover_that_loses_flushed_writes() {
    // A broken station: `recover` deletes the dead sessions and says all is well.
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("mbank");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\n\
             if [[ \" $* \" == *' recover '* ]]; then\n\
             \x20 while [[ $# -gt 0 && $1 != --cache ]]; do shift; done\n\
             \x20 rm -rf \"$2/sessions\"\n\
             \x20 echo '{{\"recovered\": [], \"problems\": []}}'\n\
             \x20 exit 0\n\
             fi\n\
             exec {} \"$@\"\n",
            common::BIN
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let o = run_script(
        &wrapper,
        &["--quick", "--seed", &seed(), "--only", "kill-write"],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the script must fail on lost writes:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("[lost write] kill-write trial"),
        "the failure must name the lost writes:\n{stdout}"
    );
}
