//! Lazy memory with a real guest under QEMU TCG (`mbank run --lazy-memory`): the RAM
//! lives on the station's memory file system, a suspend stores the device state and the
//! RAM chunks written since the start, a resume on another station fetches RAM chunks
//! as the guest touches them. Only counts and guest state are asserted.

mod common;
#[path = "common/guest.rs"]
mod guest;
#[path = "common/running.rs"]
mod running;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::Bank;
use running::{Running, create_machine_mib, start};
use serde_json::Value;

fn suspend(bank: &Bank, cache: &Path, machine: &str) -> String {
    let mut c = bank.cmd();
    c.arg("--cache").arg(cache).args(["suspend", machine]);
    let r = common::run_cmd(c).ok();
    r.stdout.trim().to_string()
}

/// The session of the one `run` on station `cache`: its control socket's `stats`.
fn session_stats(cache: &Path) -> Value {
    let dir = std::fs::read_dir(cache.join("sessions"))
        .unwrap()
        .flatten()
        .find(|d| d.path().join("session.json").exists())
        .expect("a session on the station");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("session.json")).unwrap()).unwrap();
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let sock = base
        .join(format!("mbank-{}", meta["session"].as_str().unwrap()))
        .join("control.sock");
    let mut c = UnixStream::connect(&sock).unwrap();
    writeln!(c, "stats").unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn lazy_suspend(bank: &Bank, cache: &Path, run: &mut Running) -> (String, Value) {
    let v = suspend(bank, cache, "alice/dev");
    let (ok, report) = run.wait();
    assert!(ok, "{}", run.stderr());
    let report = report.unwrap_or_else(|| panic!("no report in:\n{}", run.stdout()));
    assert_eq!(report["ending"], "suspend");
    assert_eq!(report["session"]["version"], v.as_str());
    (v, report)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn lazy_memory_resumes_on_another_station_fetching_part_and_storing_only_dirty_chunks() {
    let bank = Bank::new();
    let (a, b, c) = (
        bank.file("cacheA"),
        bank.file("cacheB"),
        bank.file("cacheC"),
    );
    create_machine_mib(&bank, "alice/dev", 64);

    // Station A boots with lazy memory and suspends: device state + RAM chunks.
    let mut run_a = start(
        &bank,
        &a,
        "alice/dev",
        &["--append", "mbank.job=counter", "--lazy-memory"],
    );
    run_a.wait_for("MBANK-COUNTER 5\n");
    let (v_a, rep_a) = lazy_suspend(&bank, &a, &mut run_a);
    let last_a = *run_a.counters().last().unwrap();
    let ram_a = &rep_a["ram_saved"];
    let state_a = n(&rep_a["memory_saved"]["bytes"]);
    assert!(
        state_a < 32 << 20,
        "the memory stream should hold device state only, it holds {state_a} bytes"
    );
    assert_eq!(n(&ram_a["bytes"]), 256 << 20);
    let nonzero_a = n(&ram_a["chunks"]) - n(&ram_a["chunks_zero"]);
    assert!(nonzero_a > 0 && n(&ram_a["chunks_new"]) > 0, "{ram_a}");
    assert_eq!(bank.log("alice/dev")[0]["suspended"], true);

    // Station B, empty cache: the counter goes on, with part of the RAM fetched.
    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.wait_for("MBANK-COUNTER");
    let at_answer = session_stats(&b);
    let ram = &at_answer["ram"];
    assert_eq!(n(&ram["chunks_nonzero"]), nonzero_a, "{at_answer}");
    assert!(
        n(&ram["chunks_fetched"]) < nonzero_a,
        "the guest answered after fetching {} of {nonzero_a} non-zero RAM chunks",
        ram["chunks_fetched"]
    );
    let first_b = run_b.counters()[0];
    assert!(
        first_b + 1 >= last_a && first_b <= last_a + 2,
        "A stopped at {last_a}, B started at {first_b}"
    );
    run_b.wait_for(&format!("MBANK-COUNTER {}\n", first_b + 3));
    let (v_b, rep_b) = lazy_suspend(&bank, &b, &mut run_b);
    let last_b = *run_b.counters().last().unwrap();
    assert_eq!(rep_b["resumed"], true);
    // Only the chunks the guest wrote are new; the rest is A's.
    let ram_b = &rep_b["ram_saved"];
    let dirty_b = n(&rep_b["ram"]["chunks_dirty"]);
    assert!(
        n(&ram_b["chunks_new"]) <= dirty_b && dirty_b < nonzero_a,
        "B stored {} new RAM chunks, wrote {dirty_b}, A's RAM had {nonzero_a} non-zero",
        ram_b["chunks_new"]
    );
    assert_ne!(v_a, v_b);
    eprintln!(
        "lazy memory: device state {state_a} B; A stored {} RAM chunks ({nonzero_a} non-zero); \
         B fetched {} before answering, {} in all, wrote {dirty_b}, stored {} new",
        ram_a["chunks_new"],
        ram["chunks_fetched"],
        rep_b["ram"]["chunks_fetched"],
        ram_b["chunks_new"]
    );

    // Station C resumes B's version without asking for lazy memory: a version whose RAM
    // was saved so resumes so, and its RAM is A's chunks under B's.
    let mut run_c = start(&bank, &c, "alice/dev", &[]);
    run_c.wait_for("MBANK-COUNTER");
    let first_c = run_c.counters()[0];
    assert!(
        first_c + 1 >= last_b && first_c <= last_b + 2,
        "B stopped at {last_b}, C started at {first_c}"
    );
    run_c.wait_for(&format!("MBANK-COUNTER {}\n", first_c + 2));
    let (_, rep_c) = lazy_suspend(&bank, &c, &mut run_c);
    assert!(rep_c["ram"]["chunks_fetched"].as_u64().unwrap() > 0);
    bank.verify_ok();
}

#[test]
fn a_version_saved_with_its_whole_memory_resumes_into_lazy_memory() {
    let bank = Bank::new();
    let (a, b) = (bank.file("cacheA"), bank.file("cacheB"));
    create_machine_mib(&bank, "alice/dev", 64);
    // Station A: the default, eager path; the memory stream holds the RAM.
    let mut run_a = start(&bank, &a, "alice/dev", &["--append", "mbank.job=counter"]);
    run_a.wait_for("MBANK-COUNTER 3\n");
    let (_, rep_a) = lazy_suspend(&bank, &a, &mut run_a);
    assert!(rep_a["ram_saved"].is_null() && rep_a["ram"].is_null());
    let last_a = *run_a.counters().last().unwrap();
    // Station B with lazy memory: the whole stream loads into the RAM file, and the
    // next suspend stores the RAM as its own stream.
    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.wait_for("MBANK-COUNTER");
    let first_b = run_b.counters()[0];
    assert!(
        first_b + 1 >= last_a && first_b <= last_a + 2,
        "A stopped at {last_a}, B started at {first_b}"
    );
    run_b.wait_for(&format!("MBANK-COUNTER {}\n", first_b + 2));
    let (_, rep_b) = lazy_suspend(&bank, &b, &mut run_b);
    assert_eq!(n(&rep_b["ram"]["chunks_fetched"]), 0, "a fresh RAM file");
    assert!(n(&rep_b["ram_saved"]["chunks_new"]) > 0);
    assert!(n(&rep_b["memory_saved"]["bytes"]) < 32 << 20);
}
