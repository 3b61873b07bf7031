//! Concurrent imports, and GC running while imports are in flight (DESIGN invariants 2
//! and 5): no version is lost, no chunk a version or a live writer needs is deleted.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{Bank, Run};
use serde_json::Value;

fn spawn_import(bank: &Bank, machine: &str, image: &Path, extra: &[&str]) -> Child {
    bank.cmd()
        .args(["-q", "import", "--json", machine])
        .arg(image)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mbank import")
}

/// Waits for an import spawned by [`spawn_import`]; it must succeed. Returns its report.
fn finish(child: Child, what: &str) -> Value {
    let o = child.wait_with_output().unwrap();
    Run::from_output(what.to_string(), o).ok().json()
}

fn image(bank: &Bank, name: &str, mib: usize, seed: u64) -> PathBuf {
    let p = bank.file(name);
    let mut data = common::random_bytes(mib << 20, seed);
    // Some zeros and a repeat of the first MiB, so dedup and zero paths run too.
    data.extend(vec![0u8; 256 << 10]);
    data.extend_from_within(..1 << 20);
    fs::write(&p, &data).unwrap();
    p
}

fn versions(bank: &Bank, machine: &str) -> BTreeSet<String> {
    bank.log(machine)
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect()
}

fn id(r: &Value) -> String {
    r["version"].as_str().unwrap().to_string()
}

#[test]
fn two_machines_import_at_once() {
    let bank = Bank::new();
    let a = image(&bank, "a.raw", 6, 31);
    let b = image(&bank, "b.raw", 6, 32);
    let ca = spawn_import(&bank, "alice/dev", &a, &["--chunk-size", "4K", "-j", "1"]);
    let cb = spawn_import(&bank, "bob/dev", &b, &["--chunk-size", "4K", "-j", "1"]);
    let ra = finish(ca, "import alice/dev");
    let rb = finish(cb, "import bob/dev");
    for r in [&ra, &rb] {
        assert_eq!(r["head_moved"], true, "{r}");
        assert!(r["parent"].is_null(), "{r}");
    }
    assert_eq!(versions(&bank, "alice/dev"), BTreeSet::from([id(&ra)]));
    assert_eq!(versions(&bank, "bob/dev"), BTreeSet::from([id(&rb)]));
    bank.verify_ok();
    bank.assert_exports("alice/dev", &a);
    bank.assert_exports("bob/dev", &b);
}

/// Both imports into one machine: both versions are kept; the head is one of them, and
/// an import that lost the race says so and names the head that won.
fn check_same_machine_race(bank: &Bank, machine: &str, parent: Option<&str>) {
    let a = image(bank, &format!("{}-a.raw", machine.replace('/', "-")), 6, 41);
    let b = image(bank, &format!("{}-b.raw", machine.replace('/', "-")), 6, 42);
    let before = if parent.is_some() {
        versions(bank, machine)
    } else {
        BTreeSet::new()
    };
    let ca = spawn_import(bank, machine, &a, &["--chunk-size", "4K", "-j", "1"]);
    let cb = spawn_import(bank, machine, &b, &["--chunk-size", "4K", "-j", "1"]);
    let ra = finish(ca, "import a");
    let rb = finish(cb, "import b");
    let (va, vb) = (id(&ra), id(&rb));
    let head = bank.head(machine).expect("a head");
    assert!(
        head == va || head == vb,
        "head {head} is neither {va} nor {vb}"
    );
    let mut all = before.clone();
    all.insert(va.clone());
    all.insert(vb.clone());
    assert_eq!(versions(bank, machine), all, "both versions must be kept");
    for (r, other) in [(&ra, &vb), (&rb, &va)] {
        let mine = id(r);
        if r["head_moved"] == true {
            // It won (or ran after the other finished): its parent is the old head or
            // the other version.
            let p = r["parent"].as_str();
            assert!(p == parent || p == Some(other.as_str()), "{r}");
        } else {
            assert_eq!(r["head_moved"], false, "{r}");
            assert_eq!(r["parent"].as_str(), parent, "{r}");
            assert_eq!(r["head"].as_str(), Some(other.as_str()), "{r}");
            assert_ne!(head, mine);
        }
    }
    assert!(
        ra["head_moved"] == true || rb["head_moved"] == true,
        "one import must move the head: {ra} {rb}"
    );
    if ra["head_moved"] == true && rb["head_moved"] == true {
        // Serialised after all: the later one's parent is the earlier one.
        assert!(
            ra["parent"].as_str() == Some(&vb) || rb["parent"].as_str() == Some(&va),
            "both moved the head, so one must be the other's parent: {ra} {rb}"
        );
    }
    bank.assert_exports(&format!("{machine}@{}", &va[..8]), &a);
    bank.assert_exports(&format!("{machine}@{}", &vb[..8]), &b);
    bank.assert_exports(machine, if head == va { &a } else { &b });
}

#[test]
fn one_machine_two_imports_at_once_keeps_both_versions() {
    let bank = Bank::new();
    // A machine that exists...
    let base = bank.file("base.raw");
    fs::write(&base, common::random_bytes(64 << 10, 40)).unwrap();
    let v1 = id(&bank.import("alice/dev", &base, &["--chunk-size", "4K"]));
    check_same_machine_race(&bank, "alice/dev", Some(&v1));
    // ...and one that both imports create.
    check_same_machine_race(&bank, "carol/new", None);
    bank.verify_ok();
    bank.assert_exports(&format!("alice/dev@{}", &v1[..8]), &base);
}

/// Runs `gc` again and again until `child` exits (at least once); every run must
/// succeed. Returns the child's report and the GC reports.
fn gc_until_done(bank: &Bank, mut child: Child) -> (Value, Vec<Value>) {
    let mut reports = Vec::new();
    loop {
        reports.push(bank.gc());
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let r = Run::from_output("import while gc runs".into(), out)
        .ok()
        .json();
    (r, reports)
}

#[test]
fn gc_running_during_an_import_deletes_nothing_it_needs() {
    let bank = Bank::new();
    let base = bank.file("base.raw");
    fs::write(&base, common::random_bytes(1 << 20, 50)).unwrap();
    bank.import("alice/dev", &base, &["--chunk-size", "4K"]);
    // The new image shares the base's first MiB and adds much new data.
    let big = bank.file("big.raw");
    let mut data = fs::read(&base).unwrap();
    data.extend(common::random_bytes(12 << 20, 51));
    data.extend_from_within(..1 << 20);
    fs::write(&big, &data).unwrap();
    let child = spawn_import(&bank, "alice/dev", &big, &["-j", "1"]);
    let (r, gcs) = gc_until_done(&bank, child);
    eprintln!(
        "{} gc runs during the import; live writers seen: {:?}",
        gcs.len(),
        gcs.iter()
            .map(|g| g["live_writers"].clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(r["head_moved"], true, "{r}");
    bank.verify_ok();
    bank.assert_exports("alice/dev", &big);
    // Once nobody writes, GC still keeps everything both versions need.
    bank.gc();
    bank.verify_ok();
    bank.assert_exports("alice/dev", &big);
    bank.assert_exports(
        &format!("alice/dev@{}", &r["parent"].as_str().unwrap()[..8]),
        &base,
    );
}

#[test]
fn reimport_of_removed_version_while_gc_loops_keeps_every_chunk() {
    let bank = Bank::new();
    let base = bank.file("base.raw");
    fs::write(&base, common::random_bytes(256 << 10, 60)).unwrap();
    let v1 = id(&bank.import("alice/dev", &base, &["--chunk-size", "4K"]));
    let img = image(&bank, "dev.raw", 10, 61);
    let v2 = id(&bank.import("alice/dev", &img, &[]));
    let chunks_of_v2 = bank.chunk_files().len();
    // Forget v2: its chunks are unreferenced but still present (no gc yet).
    let rm = bank.json(&["-q", "rm", "--json", &format!("alice/dev@{}", &v2[..8])]);
    assert_eq!(rm["head"].as_str(), Some(&*v1), "{rm}");
    // As if v2 had been removed long ago.
    bank.age_chunks();
    // Import the same image again while gc runs in a loop: the import finds the old
    // chunks present and reuses them; gc must not delete them under it.
    let child = spawn_import(&bank, "alice/dev", &img, &["-j", "1"]);
    let (r, gcs) = gc_until_done(&bank, child);
    let deleted: u64 = gcs
        .iter()
        .map(|g| g["chunks_deleted"].as_u64().unwrap())
        .sum();
    eprintln!(
        "{} gc runs, {deleted} chunks deleted during the import; import: {r}",
        gcs.len()
    );
    assert_eq!(r["head_moved"], true, "{r}");
    assert_eq!(r["parent"].as_str(), Some(&*v1));
    bank.verify_ok();
    bank.assert_exports("alice/dev", &img);
    bank.gc();
    bank.verify_ok();
    bank.assert_exports("alice/dev", &img);
    assert_eq!(bank.chunk_files().len(), chunks_of_v2);
}

#[test]
fn gc_during_two_concurrent_imports_of_overlapping_images() {
    let bank = Bank::new();
    let a = image(&bank, "a.raw", 5, 70);
    // b shares a's first 3 MiB.
    let b = bank.file("b.raw");
    let mut data = fs::read(&a).unwrap()[..3 << 20].to_vec();
    data.extend(common::random_bytes(3 << 20, 71));
    fs::write(&b, &data).unwrap();
    let ca = spawn_import(&bank, "alice/dev", &a, &["--chunk-size", "4K", "-j", "1"]);
    let cb = spawn_import(&bank, "bob/dev", &b, &["--chunk-size", "4K", "-j", "1"]);
    let (ra, _) = gc_until_done(&bank, ca);
    let (rb, _) = gc_until_done(&bank, cb);
    assert_eq!(ra["head_moved"], true);
    assert_eq!(rb["head_moved"], true);
    bank.verify_ok();
    bank.assert_exports("alice/dev", &a);
    bank.assert_exports("bob/dev", &b);
}
