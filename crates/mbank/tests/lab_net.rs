//! The lab network (`scripts/lab-net.sh`, `common/lab.rs`): `mbank serve` in its own
//! network namespace, a station in another behind a link shaped to 100 Mbit/s in both
//! directions, and a disk's round trip through the server across them: import from the
//! station, export to the station, attach on the station and read through NBD. The
//! shaping is checked from the qdiscs' own counters (configured rate, bytes sent,
//! packets held back), never from the clock. Runs as root (CI does).

mod common;
#[path = "common/lab.rs"]
mod lab;
#[path = "../../mbank-nbd/tests/common/pki.rs"]
mod pki;

use std::io::BufRead;
use std::process::{Command, Stdio};

use common::*;
use lab::{Lab, LabServer, Tbf};

const MIB: usize = 1024 * 1024;
/// 100 Mbit/s in bytes/s, as tc reports a tbf rate.
const RATE_100MBIT: u64 = 100_000_000 / 8;

/// Asserts that `after` sent at least `bytes` more than `before` and held packets back
/// for tokens while doing it (a link without shaping never does).
fn assert_shaped(before: Tbf, after: Tbf, bytes: usize, what: &str) {
    assert!(
        after.bytes - before.bytes >= bytes as u64,
        "{what}: the shaped link sent {} bytes, less than the {bytes} the transfer needs \
         (before {before:?}, after {after:?}): did the traffic go around the lab's link?",
        after.bytes - before.bytes
    );
    assert!(
        after.overlimits > before.overlimits,
        "{what}: tbf held no packet back (before {before:?}, after {after:?}): the link is not shaped"
    );
}

#[test]
fn a_disk_goes_through_the_server_across_a_shaped_link() {
    let lab = Lab::up(1, "100mbit");
    assert_eq!(lab.rate_bit, 100_000_000);
    let (down0, up0) = (lab.download(1), lab.upload(1));
    assert_eq!(down0.rate, RATE_100MBIT, "download shaping: {down0:?}");
    assert_eq!(up0.rate, RATE_100MBIT, "upload shaping: {up0:?}");

    let server = LabServer::start(&lab);
    server.add_user("alice", "alice-lab-secret");
    let alice = server.login(lab.station(1), "alice", "alice-lab-secret");

    // 8 MiB of random data then an 8 MiB hole: the data crosses the link, the hole not.
    let data = random_bytes(8 * MIB, 12);
    let image = alice.file("disk.raw");
    write_image(&image, &data, 8 * MIB as u64);

    // Import from the station: the chunks go up the station's link.
    let up1 = lab.upload(1);
    let v = alice.import("alice/disk", &image, &[]);
    assert_eq!(
        v["chunks_new"].as_u64(),
        Some(128),
        "64 KiB chunks of data: {v}"
    );
    assert_eq!(v["chunks_zero"].as_u64(), Some(128), "the hole: {v}");
    let up2 = lab.upload(1);
    assert_shaped(up1, up2, data.len(), "import from the station");

    // Export to the station: they come back down, byte for byte.
    let down1 = lab.download(1);
    alice.assert_exports("alice/disk", &image);
    let down2 = lab.download(1);
    assert_shaped(down1, down2, data.len(), "export to the station");

    // Attach on the station with an empty cache, read every byte through NBD.
    let cache = alice.file("cache");
    let mut a = alice.attach(&cache, "alice/disk", &[]);
    let r = tool(
        "qemu-img",
        &[
            "compare".to_string(),
            "-f".into(),
            "raw".into(),
            "-F".into(),
            "raw".into(),
            image.display().to_string(),
            a.uri(),
        ],
    );
    assert!(
        r.success(),
        "the attached disk differs from the image:\n{r}"
    );
    let done = a.stop();
    assert!(done.success(), "attach on the station:\n{done}");
    let down3 = lab.download(1);
    assert_shaped(down2, down3, data.len(), "attach's fetches");
    assert!(
        !server.log().contains("ERROR"),
        "server log:\n{}",
        server.log()
    );
}

#[test]
fn labs_coexist_and_leave_nothing_when_a_test_panics() {
    let mut names = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let a = Lab::up(2, "none");
        let b = Lab::up(1, "1gbit");
        names.push(a.name.clone());
        names.push(b.name.clone());
        assert_eq!(a.namespaces().len(), 4, "switch, server, 2 stations");
        assert_eq!(b.namespaces().len(), 3, "switch, server, 1 station");
        assert_eq!(b.download(1).rate, 1_000_000_000 / 8);
        // The same addresses in both labs: each station reaches its own server.
        assert_eq!(a.server_addr, b.server_addr);
        panic!("a test fails with two labs up");
    }));
    assert!(r.is_err());
    assert_eq!(names.len(), 2);
    for n in &names {
        let left: Vec<_> = lab::namespaces()
            .into_iter()
            .filter(|ns| ns.starts_with(&format!("{n}-")))
            .collect();
        assert!(left.is_empty(), "lab {n} left namespaces behind: {left:?}");
    }
}

#[test]
fn run_mode_tears_the_lab_down_when_its_command_fails_or_is_stopped() {
    require_root("a lab network (network namespaces)");
    let name = format!("mbt{}-900", std::process::id());
    let gone = |what: &str| {
        let left: Vec<_> = lab::namespaces()
            .into_iter()
            .filter(|ns| ns.starts_with(&format!("{name}-")))
            .collect();
        assert!(left.is_empty(), "{what}: namespaces left behind: {left:?}");
    };

    // The command fails: its status comes back, the lab goes.
    let mut c = Command::new(lab::script());
    c.args(["run", "--name", &name, "--profile", "100mbit", "--"]);
    c.args(["sh", "-c", "test -n \"$MBANK_LAB_SERVER_NS\" && exit 7"]);
    let r = run_cmd(c);
    assert_eq!(r.code, Some(7), "{r}");
    gone("after a failing command");

    // The command runs (a process in the server's namespace too) when SIGTERM comes.
    let mut c = Command::new(lab::script());
    c.args(["run", "--name", &name, "--stations", "2", "--"]);
    c.args([
        "sh",
        "-c",
        "ip netns exec \"$MBANK_LAB_SERVER_NS\" sleep 600 & echo up; wait",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "up", "the command did not start");
    assert_eq!(
        lab::namespaces()
            .iter()
            .filter(|ns| ns.starts_with(&format!("{name}-")))
            .count(),
        4
    );
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0, "cannot signal lab-net.sh run");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{out:?}");
    gone("after SIGTERM");
}
