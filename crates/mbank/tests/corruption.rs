//! Damaged chunks: `verify` finds them, names them and every version that needs them,
//! moves them aside; `export` refuses to write a wrong image; importing the original
//! image again repairs the bank.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use common::{Bank, Run};
use serde_json::Value;

/// A bank holding one image as three versions: alice/dev twice, bob/dev once, all with
/// 16K chunks, so every chunk is needed by all three.
struct Setup {
    bank: Bank,
    image: PathBuf,
    versions: Vec<String>,
}

fn setup() -> Setup {
    let bank = Bank::new();
    let image = bank.file("disk.raw");
    let mut data = common::random_bytes(512 << 10, 21);
    data.extend(vec![0u8; 1 << 20]);
    data.extend(common::random_bytes(128 << 10, 22));
    fs::write(&image, &data).unwrap();
    let mut versions = Vec::new();
    for m in ["alice/dev", "alice/dev", "bob/dev"] {
        let r = bank.import(m, &image, &["--chunk-size", "16K"]);
        versions.push(format!("{m}@{}", r["version"].as_str().unwrap()));
    }
    assert_eq!(bank.chunk_files().len(), 40);
    Setup {
        bank,
        image,
        versions,
    }
}

/// Picks one chunk (the first in name order) and returns its id.
fn some_chunk(bank: &Bank) -> String {
    bank.chunk_files().into_iter().next().unwrap()
}

/// Runs `verify --json`, which must exit 3, and returns the damaged chunks it reports.
fn verify_damaged(bank: &Bank) -> (Run, Vec<Value>) {
    let r = bank.run(&["verify", "--json"]).code(3);
    let v = r.json();
    let d = v["damaged_chunks"].as_array().unwrap().clone();
    (r, d)
}

fn assert_reports(d: &[Value], chunk: &str, versions: &[String], problem: Option<&str>, r: &Run) {
    assert_eq!(d.len(), 1, "exactly one damaged chunk expected:\n{r}");
    assert_eq!(d[0]["chunk"], chunk, "{r}");
    let needed: BTreeSet<&str> = d[0]["needed_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let want: BTreeSet<&str> = versions.iter().map(String::as_str).collect();
    assert_eq!(needed, want, "needed_by must list every version:\n{r}");
    let p = d[0]["problem"].as_str().unwrap();
    assert!(!p.is_empty());
    if let Some(want) = problem {
        assert_eq!(p, want, "{r}");
    }
}

/// `export` of a version that needs `chunk` fails, names the chunk, and leaves no file.
fn assert_export_refused(bank: &Bank, reference: &str, chunk: &str) {
    assert_export_refused_naming_one_of(bank, reference, &[chunk]);
}

/// `export` of a version that needs damaged `chunks` fails, names one of them, and
/// leaves no file.
fn assert_export_refused_naming_one_of(bank: &Bank, reference: &str, chunks: &[&str]) {
    let dir = bank.file(&format!("exports-{}", common::unique()));
    fs::create_dir(&dir).unwrap();
    let out = dir.join("out.raw");
    let r = bank.run(&[
        std::ffi::OsStr::new("export"),
        std::ffi::OsStr::new(reference),
        out.as_os_str(),
    ]);
    let r = r.code(1);
    assert!(
        chunks.iter().any(|c| r.stderr.contains(c)),
        "the message names none of the damaged chunks {chunks:?}:\n{r}"
    );
    assert!(!out.exists(), "a failed export left {}", out.display());
    let left: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        left.is_empty(),
        "a failed export left files behind: {left:?}"
    );
}

/// Importing the original image again puts good copies back.
fn assert_repaired(s: &Setup) {
    let r = s.bank.import("alice/dev", &s.image, &[]);
    assert!(r["chunks_new"].as_u64().unwrap() >= 1, "{r}");
    s.bank.verify_ok();
    for v in &s.versions {
        s.bank.assert_exports(v, &s.image);
    }
    s.bank.assert_exports("alice/dev", &s.image);
}

fn corrupt_dir_entries(bank: &Path) -> Vec<String> {
    fs::read_dir(bank.join("corrupt"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn flipped_byte_is_found_moved_aside_and_repaired_by_reimport() {
    let s = setup();
    let chunk = some_chunk(&s.bank);
    let path = s.bank.chunk_path(&chunk);
    let mut bytes = fs::read(&path).unwrap();
    let at = 16 + (bytes.len() - 16) / 2; // in the payload, past the 16-byte header
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).unwrap();

    let (r, d) = verify_damaged(&s.bank);
    assert_reports(&d, &chunk, &s.versions, None, &r);
    r.stderr_has(&["damaged"]);
    // Moved aside into <bank>/corrupt, with its damaged bytes kept.
    assert!(!path.exists(), "the damaged chunk is still in place");
    let moved = d[0]["moved_to"].as_str().expect("moved_to");
    let moved = Path::new(moved);
    assert!(moved.starts_with(&s.bank.path), "{moved:?}");
    assert_eq!(moved.parent().unwrap().file_name().unwrap(), "corrupt");
    assert_eq!(fs::read(moved).unwrap(), bytes);
    let entries = corrupt_dir_entries(&s.bank.path);
    assert_eq!(entries.len(), 1);
    assert!(entries[0].starts_with(&chunk), "{entries:?}");
    // The text form names the chunk and the versions too.
    let r = s.bank.run(&["verify"]).code(3);
    assert!(r.stdout.contains(&chunk), "{r}");
    for v in &s.versions {
        assert!(r.stdout.contains(v.as_str()), "{r}");
    }
    // Every version needing it refuses to export.
    for v in &s.versions {
        assert_export_refused(&s.bank, v, &chunk);
    }
    // Verifying one machine reports only that machine's versions.
    let r = s.bank.run(&["verify", "--json", "bob/dev"]).code(3);
    let d = r.json()["damaged_chunks"].as_array().unwrap().clone();
    assert_reports(&d, &chunk, &s.versions[2..], Some("missing"), &r);
    assert_repaired(&s);
}

#[test]
fn corrupt_chunk_found_by_export_first_is_refused_and_moved_aside() {
    let s = setup();
    let chunk = some_chunk(&s.bank);
    let path = s.bank.chunk_path(&chunk);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, &bytes).unwrap();
    assert_export_refused(&s.bank, &s.versions[0], &chunk);
    assert!(!path.exists(), "export must move the damaged chunk aside");
    let (r, d) = verify_damaged(&s.bank);
    assert_reports(&d, &chunk, &s.versions, Some("missing"), &r);
    assert_repaired(&s);
}

#[test]
fn truncated_chunk_files_are_found() {
    let s = setup();
    let chunks: Vec<String> = s.bank.chunk_files().into_iter().take(2).collect();
    // One cut in its payload, one cut inside its header.
    for (c, len) in chunks.iter().zip([None, Some(5)]) {
        let p = s.bank.chunk_path(c);
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        let full = f.metadata().unwrap().len();
        f.set_len(len.unwrap_or(full / 2)).unwrap();
    }
    let r = s.bank.run(&["verify", "--json"]).code(3);
    let d = r.json()["damaged_chunks"].as_array().unwrap().clone();
    let found: BTreeSet<&str> = d.iter().map(|c| c["chunk"].as_str().unwrap()).collect();
    let want: BTreeSet<&str> = chunks.iter().map(String::as_str).collect();
    assert_eq!(found, want, "{r}");
    for c in &d {
        assert_eq!(c["needed_by"].as_array().unwrap().len(), 3, "{r}");
        assert!(c["moved_to"].is_string(), "{r}");
    }
    for c in &chunks {
        assert!(!s.bank.chunk_path(c).exists());
    }
    let names: Vec<&str> = chunks.iter().map(String::as_str).collect();
    assert_export_refused_naming_one_of(&s.bank, "bob/dev", &names);
    assert_eq!(corrupt_dir_entries(&s.bank.path).len(), 2);
    assert_repaired(&s);
}

#[test]
fn deleted_chunk_is_reported_missing() {
    let s = setup();
    let chunk = some_chunk(&s.bank);
    fs::remove_file(s.bank.chunk_path(&chunk)).unwrap();
    let (r, d) = verify_damaged(&s.bank);
    assert_reports(&d, &chunk, &s.versions, Some("missing"), &r);
    assert!(d[0]["moved_to"].is_null(), "{r}");
    assert!(corrupt_dir_entries(&s.bank.path).is_empty());
    assert_export_refused(&s.bank, "alice/dev", &chunk);
    // GC does not make anything worse, and does not hide the damage.
    s.bank.gc();
    let (r, d) = verify_damaged(&s.bank);
    assert_reports(&d, &chunk, &s.versions, Some("missing"), &r);
    assert_repaired(&s);
}

/// The error line says each thing once: "version V of M cannot be read: chunk C is
/// missing from the bank", not the chunk's sentence twice.
#[test]
fn export_error_says_it_once() {
    let s = setup();
    let chunk = some_chunk(&s.bank);
    fs::remove_file(s.bank.chunk_path(&chunk)).unwrap();
    let out = s.bank.file("out.raw");
    let r = s
        .bank
        .run(&[
            std::ffi::OsStr::new("export"),
            std::ffi::OsStr::new("alice/dev"),
            out.as_os_str(),
        ])
        .code(1);
    let first = r.stderr.lines().next().unwrap_or("");
    assert_eq!(
        first.matches(chunk.as_str()).count(),
        1,
        "the error line repeats itself:\n{r}"
    );
}

// ---- Damage to the catalog itself, and a version removed while verify runs ----

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Every offset in `hay` where `needle` starts.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Where the `versions` row of `reference` (`machine@hexid`) starts its id in
/// catalog.db: the row holds the 16-byte id followed at once by the machine's name,
/// which no index of the catalog does. (A stale copy of the row in free space may be
/// found too; every place is returned, and tests damage them all.)
fn version_rows(catalog: &[u8], reference: &str) -> Vec<usize> {
    let (machine, id) = reference.split_once('@').unwrap();
    let mut needle = unhex(id);
    assert_eq!(needle.len(), 16, "{reference}");
    needle.extend_from_slice(machine.as_bytes());
    let at = find_all(catalog, &needle);
    assert!(
        !at.is_empty(),
        "the row of {reference} is not in catalog.db"
    );
    at
}

/// Flips one bit at each of `offsets` in the bank's catalog.db.
fn flip_catalog(bank: &Bank, offsets: &[usize]) {
    let path = bank.path.join("catalog.db");
    let mut bytes = fs::read(&path).unwrap();
    for &at in offsets {
        bytes[at] ^= 0x01;
    }
    fs::write(&path, &bytes).unwrap();
}

/// `verify --json` exits 3; returns its report.
fn verify_report(bank: &Bank) -> (Run, Value) {
    let r = bank.run(&["verify", "--json"]).code(3);
    let v = r.json();
    (r, v)
}

/// A flipped byte in a version's machine name: the row no longer matches the catalog's
/// index by machine, which SQLite's integrity check (not its quick check) finds.
#[test]
fn damaged_catalog_page_fails_sqlites_integrity_check() {
    let s = setup();
    let catalog = fs::read(s.bank.path.join("catalog.db")).unwrap();
    let rows = version_rows(&catalog, &s.versions[2]);
    // The 'd' of "bob/dev" becomes an 'e': still a valid name.
    flip_catalog(
        &s.bank,
        &rows.iter().map(|r| r + 16 + 4).collect::<Vec<_>>(),
    );

    let (r, v) = verify_report(&s.bank);
    let dbs = v["damaged_databases"].as_array().unwrap();
    assert_eq!(dbs.len(), 1, "{r}");
    assert!(
        dbs[0]["file"].as_str().unwrap().ends_with("catalog.db"),
        "{r}"
    );
    assert!(!dbs[0]["problems"].as_array().unwrap().is_empty(), "{r}");
    assert!(dbs[0]["advice"].as_str().unwrap().contains("backup"), "{r}");
    // The record's checksum names the version too.
    let id = s.versions[2].split_once('@').unwrap().1;
    let records = v["damaged_records"].to_string();
    assert!(records.contains(id), "{r}");
    // The text form says which file and what to do.
    let r = s.bank.run(&["verify"]).code(3);
    assert!(r.stdout.contains("catalog.db"), "{r}");
    assert!(r.stdout.contains("backup"), "{r}");
    r.stderr_has(&["damaged"]);
}

/// A flipped byte in a field no SQLite index covers (a version's parent) passes
/// SQLite's integrity check; the record's checksum catches it, and export refuses.
#[test]
fn damaged_version_record_is_found_and_refused() {
    let s = setup();
    let catalog = fs::read(s.bank.path.join("catalog.db")).unwrap();
    let (_, parent) = s.versions[0].split_once('@').unwrap();
    let parent = unhex(parent);
    let mut at = Vec::new();
    for row in version_rows(&catalog, &s.versions[1]) {
        // id (16 bytes), machine ("alice/dev"), then the parent's 16 bytes.
        let p = row + 16 + "alice/dev".len();
        assert_eq!(
            catalog[p..p + 16],
            parent[..],
            "the parent is not where expected"
        );
        at.push(p + 7);
    }
    flip_catalog(&s.bank, &at);

    let (r, v) = verify_report(&s.bank);
    assert!(v["damaged_databases"].as_array().unwrap().is_empty(), "{r}");
    let records = v["damaged_records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{r}");
    assert_eq!(records[0]["record"], s.versions[1].as_str(), "{r}");
    assert!(v["damaged_chunks"].as_array().unwrap().is_empty(), "{r}");
    let r = s.bank.run(&["verify"]).code(3);
    assert!(r.stdout.contains(&s.versions[1]), "{r}");
    // Export refuses the damaged version and names it; the others still export.
    let (machine, id) = s.versions[1].split_once('@').unwrap();
    let out = s.bank.file("out.raw");
    let r = s
        .bank
        .run(&[
            std::ffi::OsStr::new("export"),
            std::ffi::OsStr::new(&s.versions[1]),
            out.as_os_str(),
        ])
        .code(1);
    assert!(
        r.stderr.contains(machine) && r.stderr.contains(&id[..8]),
        "{r}"
    );
    r.stderr_has(&["damaged"]);
    assert!(!out.exists());
    s.bank.assert_exports(&s.versions[0], &s.image);
    s.bank.assert_exports(&s.versions[2], &s.image);
}

/// A flipped byte inside a stored disk index: its checksum catches it.
#[test]
fn damaged_stored_index_is_found_and_refused() {
    let s = setup();
    let catalog = fs::read(s.bank.path.join("catalog.db")).unwrap();
    let mut at = Vec::new();
    for row in version_rows(&catalog, &s.versions[2]) {
        let magic = row + find_all(&catalog[row..], b"MBIX")[0];
        at.push(magic + 40); // in the first chunk id
    }
    flip_catalog(&s.bank, &at);
    let (r, v) = verify_report(&s.bank);
    let d = v["damaged_indexes"].as_array().unwrap();
    assert_eq!(d.len(), 1, "{r}");
    assert_eq!(d[0]["version"], s.versions[2].as_str(), "{r}");
    let out = s.bank.file("out.raw");
    let r = s
        .bank
        .run(&[
            std::ffi::OsStr::new("export"),
            std::ffi::OsStr::new("bob/dev"),
            out.as_os_str(),
        ])
        .code(1);
    r.stderr_has(&["bob/dev", "damaged"]);
    assert!(!out.exists());
}

/// `rm` and `gc` remove a version while verify reads its chunks: verify must not call
/// that damage. The race is made certain, not likely: one of the removed version's
/// chunks is a FIFO, so verify's read of it waits until the test has run `rm` and `gc`
/// (which deletes the version's other chunks) and then closes the FIFO.
#[test]
fn version_removed_by_rm_and_gc_during_verify_is_not_damage() {
    use std::os::unix::fs::FileTypeExt;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let s = setup();
    let before = s.bank.chunk_files();
    let other = s.bank.file("other.raw");
    fs::write(&other, common::random_bytes(256 << 10, 99)).unwrap();
    s.bank.import("bob/tmp", &other, &["--chunk-size", "16K"]);
    let only_tmp: Vec<String> = s.bank.chunk_files().difference(&before).cloned().collect();
    assert!(only_tmp.len() >= 2, "{only_tmp:?}");
    s.bank.age_chunks(); // so that gc deletes them at once

    // One of bob/tmp's chunks becomes a FIFO that the test holds open for writing.
    let fifo = s.bank.chunk_path(&only_tmp[0]);
    fs::remove_file(&fifo).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let held = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    assert!(held.metadata().unwrap().file_type().is_fifo());
    held.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();

    let mut verify = s.bank.cmd();
    verify.args(["verify", "--json"]);
    verify.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = verify.spawn().unwrap();
    // Wait (bounded) until verify has the FIFO open, i.e. is blocked reading it.
    let fds = PathBuf::from(format!("/proc/{}/fd", child.id()));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open = fs::read_dir(&fds)
            .map(|d| {
                d.flatten()
                    .any(|e| fs::read_link(e.path()).ok() == Some(fifo.clone()))
            })
            .unwrap_or(false);
        if open {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "verify ended before reading the FIFO"
        );
        assert!(Instant::now() < deadline, "verify never opened the FIFO");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.bank.run(&["rm", "bob/tmp"]).ok();
    let gc = s.bank.gc();
    assert!(gc["chunks_deleted"].as_u64().unwrap() >= 2, "{gc}");
    drop(held); // verify now reads an empty file in place of the chunk
    let out = child.wait_with_output().unwrap();
    let r = Run::from_output("verify --json (racing rm and gc)".into(), out);
    let r = r.ok();
    let v = r.json();
    assert!(v["damaged_chunks"].as_array().unwrap().is_empty(), "{r}");
    assert!(v["chunks_no_longer_needed"].as_u64().unwrap() >= 1, "{r}");
    s.bank.verify_ok();
    for v in &s.versions {
        s.bank.assert_exports(v, &s.image);
    }
}
