//! Crash safety: an import killed with SIGKILL at any point leaves the catalog as it was,
//! every committed version readable, and only garbage that `gc` removes.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::Duration;

use common::{Bank, Rng, require_tool};

/// When to kill the import.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// After this many milliseconds.
    After(u64),
    /// As soon as the import has written a chunk temp file.
    FirstTempFile,
    /// As soon as a store flush has renamed a new chunk into place.
    FirstNewChunk,
}

/// The big image: its first MiB is the small image's data (so the import touches chunks
/// the bank has), the rest random. Big enough, with 4K chunks and one worker, that an
/// import takes a few seconds.
fn images(bank: &Bank) -> (std::path::PathBuf, std::path::PathBuf) {
    let v1 = common::random_bytes(1 << 20, 1);
    let small = bank.file("small.raw");
    common::write_image(&small, &v1, 1 << 20);
    let mut big = v1.clone();
    big.extend(common::random_bytes(20 << 20, 2));
    big.extend(vec![0u8; 1 << 20]);
    big.extend(common::random_bytes(3 * 512, 3));
    let big_path = bank.file("big.raw");
    fs::write(&big_path, &big).unwrap();
    (small, big_path)
}

fn spawn_import(bank: &Bank, machine: &str, image: &Path) -> Child {
    bank.cmd()
        .args(["-q", "-j", "1", "import", machine])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mbank import")
}

/// Waits for the kill point (or for the import to end by itself), then kills it.
/// Returns the exit status.
fn kill_at(bank: &Bank, child: &mut Child, at: KillAt) -> ExitStatus {
    let chunks_before = bank.chunk_files().len();
    let mut waited = 0u64;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        let reached = match at {
            KillAt::After(ms) => waited >= ms,
            KillAt::FirstTempFile => !bank.temp_files().is_empty(),
            KillAt::FirstNewChunk => bank.chunk_files().len() > chunks_before,
        };
        if reached {
            break;
        }
        let step = match at {
            KillAt::After(ms) => (ms - waited).min(5),
            KillAt::FirstTempFile => 1,
            // Listing the whole store is not free: look less often.
            KillAt::FirstNewChunk => 10,
        };
        sleep(Duration::from_millis(step));
        waited += step;
    }
    // SIGKILL: no destructor, no cleanup of any kind.
    let _ = child.kill();
    child.wait().unwrap()
}

#[test]
fn sigkill_during_import_at_many_points_loses_nothing() {
    let bank = Bank::new();
    let (small, big) = images(&bank);
    let v1 = bank.import("alice/dev", &small, &["--chunk-size", "4K"]);
    let v1_at = format!("alice/dev@{}", &v1["version"].as_str().unwrap()[..8]);
    let mut expected = bank.catalog();
    let mut expected_head = v1["version"].as_str().unwrap().to_string();

    let mut rng = Rng::from_clock("kill points");
    let points = [
        KillAt::After(20),
        KillAt::After(100),
        KillAt::After(300),
        KillAt::FirstTempFile,
        KillAt::FirstNewChunk,
        KillAt::After(rng.below(1000)),
        KillAt::After(300 + rng.below(1200)),
    ];
    let mut temp_deleted = 0;
    let mut stale_removed = 0;
    let mut killed = 0;
    for at in points {
        let mut child = spawn_import(&bank, "alice/dev", &big);
        let status = kill_at(&bank, &mut child, at);
        eprintln!("kill at {at:?}: {status}");
        if status.success() {
            // The import finished before the kill point: then it must be complete.
            let head = bank.head("alice/dev").unwrap();
            assert_ne!(head, expected_head);
            expected_head = head;
            expected = bank.catalog();
            bank.assert_exports("alice/dev", &big);
        } else {
            killed += 1;
            assert_eq!(
                status.code(),
                None,
                "the import failed on its own before the kill ({at:?}); it should succeed"
            );
        }
        // The catalog is exactly as it was: the head did not move, no version appeared.
        let r = bank.run(&["log", "--json", "alice/dev"]);
        assert!(r.success(), "after a kill at {at:?}, log must work:\n{r}");
        assert_eq!(
            bank.catalog(),
            expected,
            "catalog changed by a kill at {at:?}"
        );
        assert_eq!(bank.head("alice/dev").as_deref(), Some(&*expected_head));
        // Every committed version is whole.
        bank.verify_ok();
        bank.assert_exports(&v1_at, &small);
        // GC cleans up after the dead writer and deletes nothing a version needs.
        let gc = bank.gc();
        temp_deleted += gc["temp_files_deleted"].as_u64().unwrap();
        stale_removed += gc["stale_writers_removed"].as_u64().unwrap();
        assert_eq!(
            gc["live_writers"], 0,
            "the killed import is not alive: {gc}"
        );
        bank.verify_ok();
        bank.assert_exports(&v1_at, &small);
    }
    assert!(killed > 0, "no import was killed before it finished");

    // Temp files of the dead imports are garbage once older than GC's margin.
    sleep(Duration::from_millis(1100));
    let left = bank.temp_files().len() as u64;
    let gc = bank.gc();
    temp_deleted += gc["temp_files_deleted"].as_u64().unwrap();
    stale_removed += gc["stale_writers_removed"].as_u64().unwrap();
    assert_eq!(gc["temp_files_deleted"], left, "{gc}");
    assert_eq!(bank.temp_files(), Vec::<std::path::PathBuf>::new());
    assert!(
        temp_deleted > 0,
        "a kill after the first temp file appeared must leave temp files for gc to delete"
    );
    assert!(
        stale_removed > 0,
        "a killed import leaves a registered writer for gc to remove"
    );
    assert_eq!(bank.catalog(), expected);
    bank.verify_ok();

    // Running the import again works and gives the image back.
    let r = bank.import("alice/dev", &big, &["-j", "1"]);
    assert_eq!(r["head_moved"], true, "{r}");
    assert_eq!(r["parent"].as_str(), Some(&*expected_head));
    bank.gc();
    bank.verify_ok();
    bank.assert_exports("alice/dev", &big);
    bank.assert_exports(&v1_at, &small);
}

/// Kills the import at the `nth` `unlink` of the catalog's rollback journal, by strace
/// fault injection: for the import of an existing machine the first is the writer's
/// registration, the second the commit of the version. There the database file already
/// holds the new version but the journal that undoes it is still there: the
/// transaction did not commit and must be rolled back.
fn import_killed_at_journal_unlink(bank: &Bank, image: &Path, nth: u32) -> ExitStatus {
    let journal = bank.path.join("catalog.db-journal");
    let mut c = Command::new("strace");
    c.args(["-f", "-o", "/dev/null", "-P"])
        .arg(&journal)
        .args([
            "-e",
            "trace=unlink",
            "-e",
            &format!("inject=unlink:signal=SIGKILL:when={nth}"),
            common::BIN,
            "-q",
            "--bank",
        ])
        .arg(&bank.path)
        .args([
            OsStr::new("import"),
            OsStr::new("alice/dev"),
            image.as_os_str(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c.status().expect("run strace")
}

#[test]
fn sigkill_inside_the_catalog_commit_leaves_the_bank_readable() {
    require_tool("strace", "strace");
    let bank = Bank::new();
    let v1_img = bank.file("v1.raw");
    common::write_image(&v1_img, &common::random_bytes(256 << 10, 11), 0);
    let v1 = bank.import("alice/dev", &v1_img, &["--chunk-size", "4K"]);
    let before = bank.catalog();
    let v2_img = bank.file("v2.raw");
    common::write_image(&v2_img, &common::random_bytes(512 << 10, 12), 0);

    for nth in [2, 1] {
        let st = import_killed_at_journal_unlink(&bank, &v2_img, nth);
        assert!(!st.success(), "the import was not killed (strace: {st})");
        assert!(
            bank.path.join("catalog.db-journal").exists(),
            "the kill left no journal: the injection missed the transaction"
        );
        // Reading commands must work right after the crash, and see the old catalog.
        for args in [
            vec!["log", "--json", "alice/dev"],
            vec!["ls", "--json"],
            vec!["stats", "--json"],
            vec!["verify", "--json"],
        ] {
            let r = bank.run(&args);
            assert!(
                r.success(),
                "after a crash inside a catalog transaction (journal unlink #{nth}), \
                 a reading command fails:\n{r}"
            );
        }
        assert_eq!(bank.catalog(), before);
        let out = bank.file("out.raw");
        bank.export("alice/dev", &out);
        // A writing command recovers the catalog too.
        bank.gc();
        assert_eq!(bank.catalog(), before);
        assert_eq!(
            bank.head("alice/dev").as_deref(),
            v1["version"].as_str(),
            "the half-committed version became the head"
        );
        bank.verify_ok();
    }
}
